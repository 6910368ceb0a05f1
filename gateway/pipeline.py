"""The recommendation pipeline, independent of the transport: retrieve candidates from several
sources in parallel, merge and de-duplicate them, filter seen items, rank them in shards on the
ranking replicas, merge the shards and keep the top k.

The gateway runs it over gRPC clients and `offline` runs it over in-process objects; both
implement the `Retriever` and `Ranker` protocols below and raise `UpstreamError` for failures, so
the degradation rules live here once:

- ranking unavailable or late: candidates in retrieval order (`RANKING_UNAVAILABLE`,
  `RANKING_DEADLINE`); some shards unranked: ranked ones first, the rest after in retrieval order
  (`RANKING_PARTIAL`);
- retrieval unavailable or late: the domain's popular items from a cache (`RETRIEVAL_UNAVAILABLE`),
  still ranked when the rankers answer;
- the ranker does not know the user (NOT_FOUND naming the user): retrieval order, or the cached
  popular items when retrieval is down too (`UNKNOWN_USER`);
- a score that is not finite (NaN, infinity) is never ranked by: that item is unranked
  (`RANKING_INVALID_SCORES`);
- retrieval and ranking both only late (a deadline too short for the pipeline): the cached popular
  items, unranked; late with nothing cached: `PipelineDeadline` (DEADLINE_EXCEEDED);
- retrieval and ranking both down, or nothing to fall back on: `PipelineUnavailable` (the
  gateway answers UNAVAILABLE at once rather than unranked popular items).

Unranked items carry no score (`Recommended.ranked` false, score 0): retrieval scores of different
sources (inner products, interaction counts) are not comparable. A shard a replica has not
answered within `hedge_s` is also sent to another replica and the first answer wins; calls that
failed for their own size are never retried.

Feature rankers score the features that retrieval's answer carries (recsys.features, built here
once per request and sent with each shard together with the retrieval version that computed
them). A ranker version that expects another retrieval version's features refuses the shard with
FAILED_PRECONDITION; the shard is re-sent pinned to the ranker version published with the
features' retrieval version (one publish gives both the same number), and stays unranked if no
replica has it.

Version skew: all scores of one answer come from one ranker model version. Shards are first sent
with no version; if the answers name different versions, the version that answered most shards
(the newer one on a tie) is chosen and the other shards are re-sent pinned to it, on other
replicas if needed. A shard that cannot be scored with the chosen version stays unranked. Item ids
travel as strings and every ranker maps them with its own version's vocabulary.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import IntEnum
from typing import NamedTuple, Protocol

import numpy as np

from recsys.candidates import (
    PERSONAL_SOURCES,
    SOURCE_BY_VALUE,
    CandidateTable,
    Source,
    merge_candidates,
)
from recsys.features import UserContext, candidate_features

__all__ = ["merge_candidates"]


class Reason(IntEnum):
    """Why an answer is degraded; the values are those of recsys.v1.DegradationReason."""

    UNSPECIFIED = 0
    RANKING_UNAVAILABLE = 1
    RANKING_DEADLINE = 2
    RANKING_PARTIAL = 3
    RETRIEVAL_UNAVAILABLE = 4
    UNKNOWN_USER = 5
    RANKING_INVALID_SCORES = 6


# Status codes (grpc.StatusCode names) on which a call can be sent again, to another replica:
# the call was refused before any work (UNAVAILABLE, RESOURCE_EXHAUSTED). Both calls the pipeline
# makes are reads, so a repeat is harmless; the retry budget keeps repeats from piling up. A call
# that failed for its own size (a message or its metadata over a limit) fails the same way
# everywhere, so it is never repeated.
RETRYABLE_CODES = frozenset({"UNAVAILABLE", "RESOURCE_EXHAUSTED"})
DEADLINE_CODES = frozenset({"DEADLINE_EXCEEDED"})
# How gRPC words a message or metadata over a size limit (RESOURCE_EXHAUSTED).
SIZE_ERROR_MARKERS = ("larger than max", "metadata size", "message too large", "too large")
# Most characters of an upstream's error text kept in a degradation detail or status message.
DETAIL_CHARS = 200


def is_size_error(code: str, detail: str) -> bool:
    """Whether a failure is a message or its metadata over a size limit."""
    text = detail.lower()
    return code == "RESOURCE_EXHAUSTED" and any(marker in text for marker in SIZE_ERROR_MARKERS)


class UpstreamError(Exception):
    """A retrieval or ranking call failed; `code` is the gRPC status code name. A ranker sets
    `replica` to the replica that failed, so that a retry goes to the next one. The detail is cut
    to DETAIL_CHARS characters."""

    def __init__(self, code: str, detail: str = "", *, replica: int | None = None) -> None:
        if len(detail) > DETAIL_CHARS:
            detail = detail[:DETAIL_CHARS] + "..."
        super().__init__(f"{code}: {detail}" if detail else code)
        self.code = code
        self.detail = detail
        self.replica = replica

    @property
    def retryable(self) -> bool:
        """Refused before any work, and not for the call's own size."""
        return self.code in RETRYABLE_CODES and not is_size_error(self.code, self.detail)


class PipelineUnavailable(Exception):
    """Neither retrieval nor its fallback could produce candidates."""


class PipelineDeadline(Exception):
    """The deadline left no time to produce candidates (retrieval was late and nothing is cached
    to fall back on)."""


def is_unknown_user(error: UpstreamError) -> bool:
    """Whether a ranker refused a call because its model does not know the user (NOT_FOUND that
    names the user id, as the ranking service words it), rather than the model or an item."""
    return error.code == "NOT_FOUND" and "unknown user" in error.detail.lower()


@dataclass(frozen=True)
class RetrieveQuery:
    user_id: str
    domain: str
    k: int
    exclude_item_ids: tuple[str, ...] = ()
    exclude_seen: bool = False
    history_item_ids: tuple[str, ...] = ()
    sources: tuple[Source, ...] = ()
    # Also the popular list a query with sources (POPULAR,) and k = popular_k would get, in the
    # same answer (Retrieval.popular); 0: none.
    popular_k: int = 0


@dataclass(frozen=True)
class Retrieval:
    candidates: CandidateTable
    model_name: str
    model_version: str
    user: UserContext = UserContext()
    # The popular list asked for with RetrieveQuery.popular_k; None when not asked for or when
    # the retriever does not answer it (a server older than the field): the pipeline then asks
    # for it in a call of its own.
    popular: CandidateTable | None = None


@dataclass(frozen=True)
class RankQuery:
    model_name: str
    model_version: str
    user_id: str
    item_ids: tuple[str, ...]
    # The shard's rows of the request's features (FP32 [N, F]) and the retrieval version that
    # computed them; feature rankers need both, dot-product rankers ignore them.
    features: np.ndarray | None = None
    features_version: str = ""


@dataclass(frozen=True)
class Ranked:
    scores: Sequence[float] | np.ndarray  # one per item of the query, in order
    model_name: str
    model_version: str


class Retriever(Protocol):
    async def retrieve(self, query: RetrieveQuery, *, timeout: float) -> Retrieval:
        """Candidates best first; raises UpstreamError."""
        ...


class Ranker(Protocol):
    @property
    def replicas(self) -> int:
        """How many replicas (or channels) `replica` can address; at least 1."""
        ...

    async def rank(self, query: RankQuery, *, replica: int, timeout: float) -> Ranked:
        """One score per item, in order, from the version the answer names. `replica` is a hint
        (taken modulo `replicas`) that spreads shards and sends a retry elsewhere; raises
        UpstreamError."""
        ...


class RetryBudget:
    """A token bucket that bounds retries to a fraction of calls: every first attempt adds
    `ratio` tokens (up to `burst`), every retry takes one."""

    def __init__(self, ratio: float = 0.1, burst: float = 50.0) -> None:
        self.ratio = ratio
        self.burst = burst
        self._tokens = burst

    def record_call(self) -> None:
        self._tokens = min(self.burst, self._tokens + self.ratio)

    def try_spend(self) -> bool:
        if self._tokens >= 1.0 - 1e-9:
            self._tokens -= 1.0
            return True
        return False


class PopularItems:
    """Each domain's popular items, kept by the caller (refreshed from retrieval or read from the
    model repository) for when retrieval is down."""

    def __init__(self) -> None:
        self._items: dict[str, CandidateTable] = {}
        self.updated_at: dict[str, float] = {}

    def set(self, domain: str, items: CandidateTable) -> None:
        """Keep the items as POPULAR candidates with their scores (no per-source columns)."""
        self._items[domain] = CandidateTable.unscored(
            list(items.item_ids), Source.POPULAR, items.scores, list(items.titles)
        )
        self.updated_at[domain] = time.monotonic()

    def get(self, domain: str) -> CandidateTable:
        return self._items.get(domain, CandidateTable.empty())

    def has(self, domain: str) -> bool:
        return bool(len(self.get(domain)))


@dataclass(frozen=True)
class PipelineConfig:
    retrieval_candidates: int = 500  # personalised candidates asked of retrieval
    popular_candidates: int = 50  # popular candidates merged in (0: none)
    shards: int = 4  # a candidate list is split into at most this many ranking calls
    min_shard_size: int = 1024  # ... each with at least this many candidates
    max_rank_attempts: int = 3  # attempts per shard (first try and retries on other replicas)
    margin_s: float = 0.005  # kept back from the caller's deadline to merge and answer
    retrieval_fraction: float = 0.4  # share of the remaining time retrieval may take
    hedge_s: float = 0.0  # a shard unanswered this long also goes to another replica (0: never)


@dataclass(frozen=True)
class RecommendQuery:
    user_id: str
    domain: str
    k: int
    exclude_seen: bool = True
    recent_item_ids: tuple[str, ...] = ()


@dataclass(frozen=True)
class Degradation:
    reason: Reason
    detail: str


@dataclass
class Recommendation:
    items: list[Recommended]
    model_versions: list[tuple[str, str]] = field(default_factory=list)
    degradations: list[Degradation] = field(default_factory=list)
    ranked: bool = False
    # Retrieval failed only because its share of the deadline ran out.
    retrieval_late: bool = False
    # Seconds spent per stage: "retrieval", "ranking", "merge".
    timings: dict[str, float] = field(default_factory=dict)
    # Per item of `items`, its 1-based position in the merged retrieval order.
    retrieval_positions: list[int] = field(default_factory=list)

    @property
    def degraded(self) -> bool:
        return bool(self.degradations)


# --- pure helpers -----------------------------------------------------------------------------


def split_shards(n: int, shards: int, min_shard_size: int) -> list[tuple[int, int]]:
    """[start, stop) ranges that cover 0..n in at most `shards` near-equal contiguous pieces of at
    least `min_shard_size` items (except when n itself is smaller)."""
    if n <= 0:
        return []
    count = max(1, min(shards, n // max(1, min_shard_size)))
    size = math.ceil(n / count)
    return [(start, min(n, start + size)) for start in range(0, n, size)]


class Recommended(NamedTuple):
    """An item of an answer. `score` is the ranking model's score when `ranked`; an unranked item
    has score 0.0 and keeps retrieval order, because retrieval scores of different sources are
    not comparable (inner products for ANN, TRANSFER and HISTORY, interaction counts for
    POPULAR)."""

    item_id: str
    score: float
    source: Source
    title: str = ""
    ranked: bool = False
    proposed_by: tuple[Source, ...] = ()


def top_order(scores: np.ndarray, k: int) -> np.ndarray:
    """Positions of the ranked candidates by score (best first, ties in retrieval order), then
    of the unranked ones in retrieval order; the first k. A score that is not finite (NaN for
    unranked, infinite) counts as unranked: it cannot be ordered."""
    finite = np.isfinite(scores)
    ranked = np.flatnonzero(finite)
    # Best first; a stable sort keeps ties in retrieval order.
    best = ranked[np.argsort(-scores[ranked], kind="stable")[:k]]
    return np.concatenate([best, np.flatnonzero(~finite)[: k - len(best)]])


def top_k(candidates: CandidateTable, scores: np.ndarray, k: int) -> list[Recommended]:
    """The first k candidates in `top_order`, ranked ones with their score."""
    out = []
    for i in top_order(scores, k).tolist():
        score = float(scores[i])
        ranked = math.isfinite(score)
        out.append(
            Recommended(
                candidates.item_ids[i],
                score if ranked else 0.0,
                SOURCE_BY_VALUE.get(int(candidates.sources[i]), Source.UNSPECIFIED),
                candidates.titles[i],
                ranked,
                candidates.proposed_by(i),
            )
        )
    return out


def choose_version(versions: Sequence[str]) -> str:
    """The version that answered most shards; the newer one on a tie."""
    counts = Counter(versions)

    def key(v: str) -> tuple[int, int, str]:
        return (counts[v], int(v) if v.isdigit() else -1, v)

    return max(counts, key=key)


def _ranking_reason(errors: Sequence[UpstreamError]) -> Reason:
    if errors and all(e.code in DEADLINE_CODES for e in errors):
        return Reason.RANKING_DEADLINE
    if errors and all(is_unknown_user(e) for e in errors):
        return Reason.UNKNOWN_USER
    return Reason.RANKING_UNAVAILABLE


def _describe(errors: Sequence[UpstreamError]) -> str:
    codes = Counter(e.code for e in errors)
    first = errors[0].detail if errors else ""
    summary = ", ".join(f"{code} x{n}" for code, n in sorted(codes.items()))
    return f"{summary}: {first}" if first else summary


# --- the pipeline -----------------------------------------------------------------------------


class Pipeline:
    """Recommend k items for a user: retrieval, merge, ranking in shards, top k."""

    def __init__(
        self,
        retriever: Retriever,
        ranker: Ranker,
        config: PipelineConfig | None = None,
        *,
        popular: PopularItems | None = None,
        budget: RetryBudget | None = None,
    ) -> None:
        self.retriever = retriever
        self.ranker = ranker
        self.config = config or PipelineConfig()
        self.popular = popular or PopularItems()
        self.budget = budget or RetryBudget()

    async def recommend(self, query: RecommendQuery, *, timeout: float) -> Recommendation:
        """Raises PipelineUnavailable when there are no candidates to return at all."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        cfg = self.config
        result = Recommendation(items=[])

        start = time.perf_counter()
        retrieval_timeout = max(0.0, (timeout - cfg.margin_s) * cfg.retrieval_fraction)
        candidates, rank, retrieved, personal = await self._retrieve(
            query, retrieval_timeout, result
        )
        result.timings["retrieval"] = time.perf_counter() - start

        scores = np.full(len(candidates), math.nan)  # NaN: unranked
        if len(candidates) and rank:
            start = time.perf_counter()
            ranking_timeout = deadline - loop.time() - cfg.margin_s
            scores, needs_features = await self._rank(
                query, candidates, ranking_timeout, result, personal
            )
            result.timings["ranking"] = time.perf_counter() - start
            reasons = {d.reason for d in result.degradations}
            # Retrieval is down and no shard was ranked. The cached popular items are answered
            # when the ranker does not know the user (nothing better exists for them) or when
            # both were only late (the deadline is too short for the pipeline); when both are
            # down the gateway refuses rather than answer unranked, unpersonalised items. A feature
            # ranker cannot rank the cached popular items (no retrieval, no features): they are
            # answered unranked rather than not at all.
            late = result.retrieval_late and Reason.RANKING_DEADLINE in reasons
            if (
                not retrieved
                and not result.ranked
                and Reason.UNKNOWN_USER not in reasons
                and not late
                and not needs_features
            ):
                details = "; ".join(d.detail for d in result.degradations)
                raise PipelineUnavailable(f"retrieval and ranking are both unavailable ({details})")

        start = time.perf_counter()
        result.items = top_k(candidates, scores, query.k)
        result.retrieval_positions = (top_order(scores, query.k) + 1).tolist()
        result.timings["merge"] = time.perf_counter() - start
        return result

    # -- retrieval ------------------------------------------------------------------------------

    async def _call_retriever(self, query: RetrieveQuery, timeout: float) -> Retrieval:
        self.budget.record_call()
        attempt = 0
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout
        while True:
            remaining = end - loop.time()
            if remaining <= 0:
                raise UpstreamError("DEADLINE_EXCEEDED", "no time left for retrieval")
            try:
                async with asyncio.timeout(remaining):
                    return await self.retriever.retrieve(query, timeout=remaining)
            except TimeoutError:
                raise UpstreamError("DEADLINE_EXCEEDED", "retrieval timed out") from None
            except UpstreamError as exc:
                attempt += 1
                if not exc.retryable or attempt >= 2 or not self.budget.try_spend():
                    raise

    async def _retrieve(
        self, query: RecommendQuery, timeout: float, result: Recommendation
    ) -> tuple[CandidateTable, bool, bool, Retrieval | None]:
        """Merged candidates, whether to rank them, whether retrieval answered at all, and the
        personal call's answer (None when it failed).

        Users the retrieval model knows (ANN or TRANSFER candidates) are ranked. Users it does not
        know (history neighbours or popular items only) are unknown to the ranker of the same
        training run too, so their candidates keep retrieval order. When retrieval failed the
        user is unknown here, so ranking is tried.
        """
        cfg = self.config
        exclude = frozenset(query.recent_item_ids) if query.exclude_seen else frozenset()

        def ask(k: int, sources: tuple[Source, ...], popular_k: int = 0) -> RetrieveQuery:
            return RetrieveQuery(
                user_id=query.user_id,
                domain=query.domain,
                k=k,
                exclude_item_ids=tuple(sorted(exclude)),
                exclude_seen=query.exclude_seen,
                history_item_ids=query.recent_item_ids,
                sources=sources,
                popular_k=popular_k,
            )

        # One call answers both lists; a retriever that does not answer the popular list (a
        # server older than popular_k) is asked for it in a second call.
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout

        async def answer(retrieve_query: RetrieveQuery) -> Retrieval | UpstreamError:
            try:
                return await self._call_retriever(retrieve_query, max(0.0, end - loop.time()))
            except UpstreamError as exc:
                return exc

        personal_k = max(cfg.retrieval_candidates, query.k)
        first = await answer(ask(personal_k, PERSONAL_SOURCES, cfg.popular_candidates))
        answers = [first]
        if cfg.popular_candidates and isinstance(first, Retrieval) and first.popular is None:
            answers.append(await answer(ask(cfg.popular_candidates, (Source.POPULAR,))))
        ok = [a for a in answers if isinstance(a, Retrieval)]
        errors = [a for a in answers if isinstance(a, UpstreamError)]
        if ok:
            result.model_versions.append((ok[0].model_name, ok[0].model_version))
        personal = answers[0] if isinstance(answers[0], Retrieval) else None
        if errors:
            result.degradations.append(
                Degradation(Reason.RETRIEVAL_UNAVAILABLE, f"retrieval: {_describe(errors)}")
            )
            result.retrieval_late = all(e.code in DEADLINE_CODES for e in errors)
        lists = [r.candidates for r in ok]
        if personal is not None and personal.popular is not None:
            lists.append(personal.popular)
        if not ok:
            fallback = self.popular.get(query.domain)
            if not len(fallback) and result.retrieval_late:
                raise PipelineDeadline(
                    f"retrieval did not answer within its share of the deadline "
                    f"({_describe(errors)}) and no popular items are cached for domain "
                    f"{query.domain!r}"
                )
            if not len(fallback):
                raise PipelineUnavailable(
                    f"retrieval failed ({_describe(errors)}) and no popular items are cached "
                    f"for domain {query.domain!r}"
                )
            size = min(len(fallback), cfg.retrieval_candidates + cfg.popular_candidates)
            lists = [fallback.take(np.arange(size))]
        candidates = merge_candidates(lists, exclude)
        if personal is None:
            return candidates, True, bool(ok), None
        sources = personal.candidates.sources
        known = bool(((sources == Source.ANN) | (sources == Source.TRANSFER)).any())
        return candidates, known, True, personal

    # -- ranking --------------------------------------------------------------------------------

    async def _attempt(self, query: RankQuery, replica: int, end: float) -> Ranked:
        """One call to one replica, with its answer checked."""
        remaining = end - asyncio.get_running_loop().time()
        if remaining <= 0:
            raise UpstreamError("DEADLINE_EXCEEDED", "no time left for ranking")
        try:
            async with asyncio.timeout(remaining):
                ranked = await self.ranker.rank(query, replica=replica, timeout=remaining)
        except TimeoutError:
            raise UpstreamError("DEADLINE_EXCEEDED", "ranking timed out") from None
        if len(ranked.scores) != len(query.item_ids):
            raise UpstreamError(
                "INTERNAL",
                f"ranker returned {len(ranked.scores)} scores for {len(query.item_ids)} items",
                replica=replica,
            )
        if query.model_version and ranked.model_version != query.model_version:
            raise UpstreamError(
                "FAILED_PRECONDITION",
                f"asked for version {query.model_version}, got {ranked.model_version}",
                replica=replica,
            )
        return ranked

    async def _hedged(self, query: RankQuery, replica: int, end: float) -> Ranked:
        """One attempt, hedged: when the replica has not answered within `hedge_s` and there is
        another one, the same shard also goes to the next replica (a read, so harmless; paid
        from the retry budget). The first answer wins and the other call is cancelled, so one
        stalled replica costs a shard `hedge_s`, not the whole deadline."""
        hedge_s = self.config.hedge_s
        if hedge_s <= 0 or self.ranker.replicas < 2:
            return await self._attempt(query, replica, end)
        primary = asyncio.ensure_future(self._attempt(query, replica, end))
        tasks = [primary]
        try:
            done, _ = await asyncio.wait(tasks, timeout=hedge_s)
            if done or not self.budget.try_spend():
                return await primary
            tasks.append(asyncio.ensure_future(self._attempt(query, replica + 1, end)))
            pending = set(tasks)
            while pending:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    if task.exception() is None:
                        return task.result()
            # Both failed: the primary's error decides what happens next.
            return primary.result()
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _rank_shard(
        self, query: RankQuery, first_replica: int, end: float, attempts: int
    ) -> Ranked:
        """One shard, hedged when slow, retried on other replicas when refused (and, for a
        pinned version, when the replica does not have that version)."""
        self.budget.record_call()
        replica = first_replica
        tried = 0
        while True:
            try:
                return await self._hedged(query, replica, end)
            except UpstreamError as exc:
                tried += 1
                retry = exc.retryable or (bool(query.model_version) and exc.code == "NOT_FOUND")
                if (
                    exc.code == "FAILED_PRECONDITION"
                    and query.features_version
                    and query.model_version != query.features_version
                ):
                    # The ranker expects another retrieval version's features: ask for the
                    # ranker version published with the features' retrieval version.
                    query = RankQuery(
                        query.model_name,
                        query.features_version,
                        query.user_id,
                        query.item_ids,
                        query.features,
                        query.features_version,
                    )
                    retry = True
                if not retry or tried >= attempts or not self.budget.try_spend():
                    raise
                replica = (replica if exc.replica is None else exc.replica) + 1

    async def _rank(
        self,
        query: RecommendQuery,
        candidates: CandidateTable,
        timeout: float,
        result: Recommendation,
        retrieval: Retrieval | None = None,
    ) -> tuple[np.ndarray, bool]:
        """Scores per candidate (NaN: unranked), and whether every shard was refused for
        lack of features (a feature ranker asked without a retrieval answer)."""
        cfg = self.config
        loop = asyncio.get_running_loop()
        end = loop.time() + max(0.0, timeout)
        model = f"{query.domain}-ranker"
        ranges = split_shards(len(candidates), cfg.shards, cfg.min_shard_size)
        attempts = max(cfg.max_rank_attempts, 1)

        features: np.ndarray | None = None
        features_version = ""
        if retrieval is not None:
            features = candidate_features(candidates, retrieval.user)
            features_version = retrieval.model_version

        def shard_query(lo: int, hi: int, version: str) -> RankQuery:
            ids = tuple(candidates.item_ids[lo:hi])
            rows = features[lo:hi] if features is not None else None
            return RankQuery(model, version, query.user_id, ids, rows, features_version)

        first = await asyncio.gather(
            *(
                self._rank_shard(shard_query(lo, hi, ""), i, end, attempts)
                for i, (lo, hi) in enumerate(ranges)
            ),
            return_exceptions=True,
        )
        answers: list[Ranked | UpstreamError] = []
        for answer in first:
            if isinstance(answer, BaseException) and not isinstance(answer, UpstreamError):
                raise answer
            answers.append(answer)

        ok_versions = [a.model_version for a in answers if isinstance(a, Ranked)]
        if ok_versions:
            chosen = choose_version(ok_versions)
            stale = [
                i
                for i, a in enumerate(answers)
                if isinstance(a, Ranked) and a.model_version != chosen
            ]
            if stale:
                # Another version answered these shards: score them again with the chosen one.
                again = await asyncio.gather(
                    *(
                        self._rank_shard(shard_query(*ranges[i], chosen), i + 1, end, attempts)
                        for i in stale
                    ),
                    return_exceptions=True,
                )
                for i, answer in zip(stale, again, strict=True):
                    if isinstance(answer, BaseException) and not isinstance(answer, UpstreamError):
                        raise answer
                    answers[i] = answer
            result.model_versions.append((model, chosen))

        scores = np.full(len(candidates), math.nan)
        errors = [a for a in answers if isinstance(a, UpstreamError)]
        invalid = 0
        for (lo, _hi), answer in zip(ranges, answers, strict=True):
            if isinstance(answer, Ranked):
                shard = np.asarray(answer.scores, np.float64)
                scores[lo : lo + len(shard)] = shard
                invalid += int((~np.isfinite(shard)).sum())
        if invalid:
            # A model that answers NaN (or infinity) for some pairs: those items stay unranked.
            result.degradations.append(
                Degradation(
                    Reason.RANKING_INVALID_SCORES,
                    f"ranking: {invalid} of {len(scores)} scores are not finite; those items "
                    "are unranked",
                )
            )
        if errors and len(errors) == len(answers):
            result.degradations.append(
                Degradation(_ranking_reason(errors), f"ranking: {_describe(errors)}")
            )
        elif errors:
            result.degradations.append(
                Degradation(
                    Reason.RANKING_PARTIAL,
                    f"ranking: {len(errors)} of {len(answers)} shards unranked: "
                    f"{_describe(errors)}",
                )
            )
        result.ranked = len(errors) < len(answers)
        needs_features = (
            features is None
            and bool(errors)
            and all(e.code == "FAILED_PRECONDITION" for e in errors)
        )
        return scores, needs_features
