"""RetrievalService over gRPC: validate, call the domain's index, convert the answer."""

from __future__ import annotations

import asyncio
import functools
import time
from concurrent.futures import ThreadPoolExecutor

import faiss
import grpc
from prometheus_client import Counter, Histogram

from recsys.candidates import Source
from recsys.rpc.errors import InvalidRequest, NotFound, check_id, check_ids, shorten
from recsys.v1 import retrieval_pb2, retrieval_pb2_grpc
from serving.retrieval import metrics
from serving.retrieval.index import RetrieveResult
from serving.retrieval.manager import IndexManager

SERVICE_NAME = "recsys.v1.RetrievalService"


def validate(
    request: retrieval_pb2.RetrieveRequest,
    max_k: int,
    *,
    max_request_ids: int = 10_000,
    max_id_length: int = 1024,
) -> None:
    """INVALID_ARGUMENT for a request out of bounds (the server's settings RETRIEVAL_MAX_K,
    RETRIEVAL_MAX_REQUEST_IDS and RETRIEVAL_MAX_ID_LENGTH); messages repeat at most a short
    escaped prefix of a client's id."""
    if not request.domain:
        raise InvalidRequest("domain is required")
    check_id(request.domain, "domain", max_id_length)
    check_id(request.user_id, "user_id", max_id_length)
    check_id(request.model_version, "model_version", max_id_length)
    if request.k < 1 or request.k > max_k:
        raise InvalidRequest(f"k must be between 1 and {max_k}, got {request.k}")
    if request.popular_k > max_k:
        raise InvalidRequest(f"popular_k must be at most {max_k}, got {request.popular_k}")
    check_ids(request.exclude_item_ids, "exclude_item_ids", max_request_ids, max_id_length)
    check_ids(request.history_item_ids, "history_item_ids", max_request_ids, max_id_length)
    for source in request.sources:
        if source not in Source._value2member_map_ or source == Source.UNSPECIFIED:
            raise InvalidRequest(f"unknown candidate source {source}")


# Label lookups cost more than the updates; domains are the served ones, sources a fixed set.
@functools.cache
def _search_duration(domain: str) -> Histogram:
    return metrics.SEARCH_DURATION.labels(domain)


@functools.cache
def _requests(domain: str, source: str) -> Counter:
    return metrics.REQUESTS.labels(domain, source)


def build_response(
    result: RetrieveResult,
    model_name: str,
    version: int,
    *,
    columnar: bool = False,
    packed: bool = False,
) -> retrieval_pb2.RetrieveResponse:
    """The wire answer: the candidates as columns (`columnar`, filled from the arrays; with
    `packed`, the numeric ones as little-endian bytes) or as one message per candidate (the row
    form, for clients that do not ask for columns); the popular list, when asked for, in
    `popular` in the same form."""
    response = retrieval_pb2.RetrieveResponse()
    _fill(response, result, model_name, version, columnar=columnar, packed=packed)
    if result.popular is not None:
        popular = RetrieveResult(result.popular, (Source.POPULAR,), result.user)
        _fill(response.popular, popular, model_name, version, columnar=columnar, packed=packed)
    return response


def _fill(
    response: retrieval_pb2.RetrieveResponse,
    result: RetrieveResult,
    model_name: str,
    version: int,
    *,
    columnar: bool,
    packed: bool,
) -> None:
    """Writes one candidate list, its model and user into `response` (in place: building a
    message and then copying it costs twice as much)."""
    response.model.model_name = model_name
    response.model.model_version = str(version)
    user = response.user
    user.known = result.user.known
    user.mapped = result.user.mapped
    user.target_history = result.user.target_history
    user.source_history = result.user.source_history
    table = result.table
    if columnar:
        columns = response.columns
        # Present even when empty: a columnar answer always has its columns.
        columns.SetInParent()
        columns.item_ids.extend(table.item_ids)
        if any(table.titles):
            columns.titles.extend(table.titles)
        if packed:
            # One copy per column, no protobuf work per value.
            columns.sources_i32 = table.sources.astype("<i4").tobytes()
            columns.scores_f32 = table.scores.astype("<f4").tobytes()
            for j, source in enumerate(table.score_sources):
                columns.source_scores.add(
                    source=source,
                    scores_f32=table.source_scores[:, j].astype("<f4").tobytes(),
                    ranks_u32=table.source_ranks[:, j].astype("<u4").tobytes(),
                )
            return
        columns.sources.extend(table.sources.tolist())
        columns.scores.extend(table.scores.tolist())
        for j, source in enumerate(table.score_sources):
            columns.source_scores.add(
                source=source,
                scores=table.source_scores[:, j].tolist(),
                ranks=table.source_ranks[:, j].tolist(),
            )
        return
    add_candidate = response.candidates.add
    for c in table.rows():
        add_score = add_candidate(
            item_id=c.item_id, score=c.score, source=c.source, title=c.title
        ).source_scores.add
        for s in c.scores:
            add_score(source=s.source, score=s.score, rank=s.rank)


class RetrievalServicer(retrieval_pb2_grpc.RetrievalServiceServicer):
    """Searches run on a small thread pool whose threads each use `search_threads` OpenMP
    threads (the OpenMP setting is per thread, so it is set in every pool thread)."""

    def __init__(
        self,
        manager: IndexManager,
        max_k: int,
        *,
        max_request_ids: int = 10_000,
        max_id_length: int = 1024,
        search_threads: int = 1,
        workers: int = 4,
    ) -> None:
        self.manager = manager
        self.max_k = max_k
        self.max_request_ids = max_request_ids
        self.max_id_length = max_id_length
        self.executor = ThreadPoolExecutor(
            max_workers=workers,
            thread_name_prefix="search",
            initializer=faiss.omp_set_num_threads,
            initargs=(search_threads,),
        )

    async def Retrieve(
        self, request: retrieval_pb2.RetrieveRequest, context: grpc.aio.ServicerContext
    ) -> retrieval_pb2.RetrieveResponse:
        validate(
            request,
            self.max_k,
            max_request_ids=self.max_request_ids,
            max_id_length=self.max_id_length,
        )
        index = self.manager.get(request.domain)
        if request.model_version and request.model_version != str(index.version):
            raise NotFound(
                f"version {shorten(request.model_version)} of {index.model_name} is not served "
                f"(serving {index.version})"
            )
        start = time.perf_counter()
        search = functools.partial(
            index.retrieve,
            request.user_id,
            request.k,
            exclude_item_ids=list(request.exclude_item_ids),
            exclude_seen=request.exclude_seen,
            history_item_ids=list(request.history_item_ids),
            sources=[Source(s) for s in request.sources],
            popular_k=request.popular_k,
        )
        result = await asyncio.get_running_loop().run_in_executor(self.executor, search)
        _search_duration(index.domain).observe(time.perf_counter() - start)
        for source in result.sources:
            _requests(index.domain, source.name.lower()).inc()
        if not result.sources:
            _requests(index.domain, "none").inc()
        if result.popular is not None:
            _requests(index.domain, "popular").inc()
        return build_response(
            result,
            index.model_name,
            index.version,
            columnar=request.columnar,
            packed=request.packed,
        )
