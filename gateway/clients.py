"""gRPC clients of the upstream services, one channel per upstream target created at start; they
implement the pipeline's Retriever and Ranker and turn failures into UpstreamError."""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Iterable, Sized
from dataclasses import dataclass, field

import grpc
import numpy as np

from gateway import metrics
from gateway.config import GatewaySettings
from gateway.pipeline import Ranked, RankQuery, Retrieval, RetrieveQuery, UpstreamError
from recsys.candidates import SOURCE_BY_VALUE, Candidate, CandidateTable, Source, SourceScore
from recsys.features import UserContext
from recsys.rpc.tls import channel_options
from recsys.v1 import ranking_pb2, ranking_pb2_grpc, retrieval_pb2, retrieval_pb2_grpc

logger = logging.getLogger(__name__)


def upstream_error(upstream: str, exc: grpc.RpcError) -> UpstreamError:
    code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
    detail = exc.details() if hasattr(exc, "details") else str(exc)
    metrics.UPSTREAM_ERRORS.labels(upstream, code.name).inc()
    return UpstreamError(code.name, f"{upstream}: {detail or ''}".rstrip(": "))


# Whether each value up to the largest is a Source this version knows.
_KNOWN_SOURCE = np.zeros(max(SOURCE_BY_VALUE) + 1, bool)
_KNOWN_SOURCE[list(SOURCE_BY_VALUE)] = True


def _source_values(values: np.ndarray) -> np.ndarray:
    """Source values, with any this version does not know read as UNSPECIFIED."""
    inside = (values >= 0) & (values < len(_KNOWN_SOURCE))
    known = inside & _KNOWN_SOURCE[np.where(inside, values, 0)]
    return values if known.all() else np.where(known, values, int(Source.UNSPECIFIED))


def _length(packed: bytes, values: Sized) -> int:
    """How many values a numeric column holds: 4 bytes each when packed (-1 when the bytes are
    not a whole number of values), else its repeated values."""
    if packed:
        return len(packed) // 4 if len(packed) % 4 == 0 else -1
    return len(values)


def _values(packed: bytes, values: Iterable[float], wire: str, dtype: type, n: int) -> np.ndarray:
    """The column as an array of `dtype`: from its little-endian bytes (one copy) when packed,
    else one step per repeated value."""
    if packed:
        return np.frombuffer(packed, wire).astype(dtype)
    return np.fromiter(values, dtype, n)


def table_from_columns(columns: retrieval_pb2.CandidateColumns) -> CandidateTable:
    """The candidate table of the columnar answer, its numeric columns packed or repeated;
    UpstreamError (INTERNAL) when its columns differ in length."""
    n = len(columns.item_ids)
    titles = list(columns.titles) or [""] * n
    score_columns = list(columns.source_scores)
    lengths = {
        _length(columns.sources_i32, columns.sources),
        _length(columns.scores_f32, columns.scores),
        len(titles),
    }
    for c in score_columns:
        lengths |= {_length(c.scores_f32, c.scores), _length(c.ranks_u32, c.ranks)}
    if lengths - {n}:
        raise UpstreamError(
            "INTERNAL", f"retrieval: candidate columns of unequal lengths {sorted(lengths)}"
        )
    source_of, unknown = SOURCE_BY_VALUE.get, Source.UNSPECIFIED
    return CandidateTable(
        list(columns.item_ids),
        _source_values(_values(columns.sources_i32, columns.sources, "<i4", np.int64, n)),
        _values(columns.scores_f32, columns.scores, "<f4", np.float32, n),
        titles,
        tuple(source_of(c.source, unknown) for c in score_columns),
        np.stack(
            [_values(c.scores_f32, c.scores, "<f4", np.float32, n) for c in score_columns], axis=1
        )
        if score_columns
        else np.zeros((n, 0), np.float32),
        np.stack([_values(c.ranks_u32, c.ranks, "<u4", np.int64, n) for c in score_columns], axis=1)
        if score_columns
        else np.zeros((n, 0), np.int64),
    )


def retrieval_from_reply(reply: retrieval_pb2.RetrieveResponse) -> Retrieval:
    """The pipeline's Retrieval from the wire answer, columnar or rows (a server that does not
    know RetrieveRequest.columnar answers rows), with the popular list when the answer has one;
    unknown source values read as UNSPECIFIED."""
    if reply.HasField("columns"):
        table = table_from_columns(reply.columns)
    else:
        source_of, unknown = SOURCE_BY_VALUE.get, Source.UNSPECIFIED
        table = CandidateTable.from_rows(
            [
                Candidate(
                    c.item_id,
                    c.score,
                    source_of(c.source, unknown),
                    c.title,
                    tuple(
                        [
                            SourceScore(source_of(s.source, unknown), s.score, s.rank)
                            for s in c.source_scores
                        ]
                    ),
                )
                for c in reply.candidates
            ]
        )
    return Retrieval(
        table,
        reply.model.model_name,
        reply.model.model_version,
        UserContext(
            known=reply.user.known,
            mapped=reply.user.mapped,
            target_history=reply.user.target_history,
            source_history=reply.user.source_history,
        ),
        retrieval_from_reply(reply.popular).candidates if reply.HasField("popular") else None,
    )


class GrpcRetriever:
    """Retriever over the retrieval service's channel."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self.channel = channel
        self.stub = retrieval_pb2_grpc.RetrievalServiceStub(channel)
        self._duration = metrics.UPSTREAM_DURATION.labels("retrieval", "Retrieve")

    async def retrieve(self, query: RetrieveQuery, *, timeout: float) -> Retrieval:
        request = retrieval_pb2.RetrieveRequest(
            user_id=query.user_id,
            domain=query.domain,
            k=query.k,
            exclude_item_ids=query.exclude_item_ids,
            exclude_seen=query.exclude_seen,
            history_item_ids=query.history_item_ids,
            sources=[int(s) for s in query.sources],  # type: ignore[misc]
            columnar=True,
            packed=True,
            popular_k=query.popular_k,
        )
        start = time.perf_counter()
        try:
            reply = await self.stub.Retrieve(request, timeout=timeout)
        except grpc.RpcError as exc:
            raise upstream_error("retrieval", exc) from None
        finally:
            self._duration.observe(time.perf_counter() - start)
        return retrieval_from_reply(reply)


@dataclass
class _RankerChannel:
    target: str
    channel: grpc.aio.Channel
    stub: ranking_pb2_grpc.RankingServiceStub
    ejected_until: float = 0.0
    # Start times of the calls in flight on this channel, by call number.
    in_flight: dict[int, float] = field(default_factory=dict)

    def stalled(self, now: float, slow_s: float) -> bool:
        """Whether a call has been in flight longer than `slow_s` (the replica stopped
        answering: paused, overloaded, stuck on a network path)."""
        return slow_s > 0 and any(now - t > slow_s for t in self.in_flight.values())


class GrpcRankers:
    """Ranker over one channel per configured target. A target that resolves to several
    addresses (a headless Service) is balanced round robin by its channel; several targets are
    spread by the `replica` hint, skipping for `eject_s` a channel that refused a call or was
    slow: a call that ran longer than `slow_s` and was then cancelled (a hedged copy answered
    first) or timed out ejects its channel, and a channel with a call in flight for longer than
    `slow_s` is skipped meanwhile (outlier detection on latency)."""

    def __init__(
        self,
        channels: list[tuple[str, grpc.aio.Channel]],
        eject_s: float = 1.0,
        slow_s: float = 0.0,
    ) -> None:
        if not channels:
            raise ValueError("at least one ranker channel is required")
        self._channels = [
            _RankerChannel(target, channel, ranking_pb2_grpc.RankingServiceStub(channel))
            for target, channel in channels
        ]
        self.eject_s = eject_s
        self.slow_s = slow_s
        self._calls = itertools.count()
        self._duration = metrics.UPSTREAM_DURATION.labels("ranker", "Rank")

    @property
    def replicas(self) -> int:
        return len(self._channels)

    def _pick(self, replica: int) -> int:
        """From the hinted channel on, the first that is connected (READY: some backend is up
        and its health says SERVING) and not ejected; else the first not ejected; else the
        hinted one."""
        n = len(self._channels)
        now = time.monotonic()
        order = [(replica + step) % n for step in range(n)]
        usable = [
            i
            for i in order
            if self._channels[i].ejected_until <= now
            and not self._channels[i].stalled(now, self.slow_s)
        ]
        for i in usable:
            state = self._channels[i].channel.get_state(try_to_connect=True)
            if state == grpc.ChannelConnectivity.READY:
                return i
        return usable[0] if usable else order[0]

    async def rank(self, query: RankQuery, *, replica: int, timeout: float) -> Ranked:
        index = self._pick(replica)
        chosen = self._channels[index]
        request = ranking_pb2.RankRequest(
            model_name=query.model_name,
            model_version=query.model_version,
            user_id=query.user_id,
            item_ids=query.item_ids,
            # Packed little-endian float32 bytes: one copy, no per-value protobuf work.
            features_f32=b""
            if query.features is None
            else query.features.astype("<f4", copy=False).tobytes(),
            features_version=query.features_version,
            packed_scores=True,
        )
        start = time.perf_counter()
        call = next(self._calls)
        chosen.in_flight[call] = time.monotonic()
        answered = False
        try:
            reply = await chosen.stub.Rank(request, timeout=timeout)
            answered = True
        except grpc.RpcError as exc:
            error = upstream_error("ranker", exc)
            error.replica = index
            if error.retryable and self.eject_s > 0:
                chosen.ejected_until = time.monotonic() + self.eject_s
            raise error from None
        finally:
            elapsed = time.perf_counter() - start
            del chosen.in_flight[call]
            self._duration.observe(elapsed)
            if not answered and 0 < self.slow_s < elapsed and self.eject_s > 0:
                # Cancelled or timed out after running slow: take the replica out for a while.
                chosen.ejected_until = max(chosen.ejected_until, time.monotonic() + self.eject_s)
                logger.info(
                    "Ranker %s did not answer within %.3f s: ejected", chosen.target, elapsed
                )
        # Packed little-endian float32 where the ranker supports it; an older one answers the
        # repeated field.
        scores = (
            np.frombuffer(reply.scores_f32, "<f4")
            if reply.scores_f32
            else np.fromiter(reply.scores, np.float32, len(reply.scores))
        )
        return Ranked(scores, reply.model_name, reply.model_version)


def create_upstream_channel(target: str, settings: GatewaySettings) -> grpc.aio.Channel:
    """The kit's channel (limits, keepalive, round robin over every resolved address with
    client-side health checking, TLS) with a bounded reconnect backoff, so that a replica that
    comes back on an address it had before is used again within about a second."""
    tls = settings.upstream_tls
    options = channel_options(
        settings.max_message_bytes,
        round_robin=True,
        server_name=tls.server_name if tls else None,
    )
    options += [
        ("grpc.initial_reconnect_backoff_ms", 200),
        ("grpc.min_reconnect_backoff_ms", 200),
        ("grpc.max_reconnect_backoff_ms", int(settings.max_reconnect_backoff_ms)),
    ]
    if tls is None:
        return grpc.aio.insecure_channel(target, options=options)
    return grpc.aio.secure_channel(target, tls.credentials(), options=options)


class Upstreams:
    """Every upstream channel of the gateway, created once at start."""

    def __init__(self, settings: GatewaySettings) -> None:
        self.retrieval_channel = create_upstream_channel(settings.retrieval_target, settings)
        self.ranker_channels = [
            (target, create_upstream_channel(target, settings))
            for target in settings.ranker_target_list
        ]
        self.retriever = GrpcRetriever(self.retrieval_channel)
        self.rankers = GrpcRankers(
            self.ranker_channels,
            settings.ranker_eject_s,
            slow_s=settings.ranker_hedge_ms / 1000,
        )
        logger.info(
            "Upstreams: retrieval %s, rankers %s",
            settings.retrieval_target,
            ", ".join(settings.ranker_target_list),
        )

    async def close(self) -> None:
        await self.retrieval_channel.close(None)
        for _, channel in self.ranker_channels:
            await channel.close(None)
