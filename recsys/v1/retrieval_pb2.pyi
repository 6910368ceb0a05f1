from recsys.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class RetrieveRequest(_message.Message):
    __slots__ = ("user_id", "domain", "k", "exclude_item_ids", "exclude_seen", "history_item_ids", "sources", "model_version", "columnar", "packed", "popular_k")
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    DOMAIN_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    EXCLUDE_ITEM_IDS_FIELD_NUMBER: _ClassVar[int]
    EXCLUDE_SEEN_FIELD_NUMBER: _ClassVar[int]
    HISTORY_ITEM_IDS_FIELD_NUMBER: _ClassVar[int]
    SOURCES_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    COLUMNAR_FIELD_NUMBER: _ClassVar[int]
    PACKED_FIELD_NUMBER: _ClassVar[int]
    POPULAR_K_FIELD_NUMBER: _ClassVar[int]
    user_id: str
    domain: str
    k: int
    exclude_item_ids: _containers.RepeatedScalarFieldContainer[str]
    exclude_seen: bool
    history_item_ids: _containers.RepeatedScalarFieldContainer[str]
    sources: _containers.RepeatedScalarFieldContainer[_common_pb2.CandidateSource]
    model_version: str
    columnar: bool
    packed: bool
    popular_k: int
    def __init__(self, user_id: _Optional[str] = ..., domain: _Optional[str] = ..., k: _Optional[int] = ..., exclude_item_ids: _Optional[_Iterable[str]] = ..., exclude_seen: _Optional[bool] = ..., history_item_ids: _Optional[_Iterable[str]] = ..., sources: _Optional[_Iterable[_Union[_common_pb2.CandidateSource, str]]] = ..., model_version: _Optional[str] = ..., columnar: _Optional[bool] = ..., packed: _Optional[bool] = ..., popular_k: _Optional[int] = ...) -> None: ...

class Candidate(_message.Message):
    __slots__ = ("item_id", "score", "source", "title", "source_scores")
    ITEM_ID_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    TITLE_FIELD_NUMBER: _ClassVar[int]
    SOURCE_SCORES_FIELD_NUMBER: _ClassVar[int]
    item_id: str
    score: float
    source: _common_pb2.CandidateSource
    title: str
    source_scores: _containers.RepeatedCompositeFieldContainer[_common_pb2.SourceScore]
    def __init__(self, item_id: _Optional[str] = ..., score: _Optional[float] = ..., source: _Optional[_Union[_common_pb2.CandidateSource, str]] = ..., title: _Optional[str] = ..., source_scores: _Optional[_Iterable[_Union[_common_pb2.SourceScore, _Mapping]]] = ...) -> None: ...

class UserContext(_message.Message):
    __slots__ = ("known", "mapped", "target_history", "source_history")
    KNOWN_FIELD_NUMBER: _ClassVar[int]
    MAPPED_FIELD_NUMBER: _ClassVar[int]
    TARGET_HISTORY_FIELD_NUMBER: _ClassVar[int]
    SOURCE_HISTORY_FIELD_NUMBER: _ClassVar[int]
    known: bool
    mapped: bool
    target_history: int
    source_history: int
    def __init__(self, known: _Optional[bool] = ..., mapped: _Optional[bool] = ..., target_history: _Optional[int] = ..., source_history: _Optional[int] = ...) -> None: ...

class CandidateColumns(_message.Message):
    __slots__ = ("item_ids", "sources", "scores", "titles", "source_scores", "sources_i32", "scores_f32")
    ITEM_IDS_FIELD_NUMBER: _ClassVar[int]
    SOURCES_FIELD_NUMBER: _ClassVar[int]
    SCORES_FIELD_NUMBER: _ClassVar[int]
    TITLES_FIELD_NUMBER: _ClassVar[int]
    SOURCE_SCORES_FIELD_NUMBER: _ClassVar[int]
    SOURCES_I32_FIELD_NUMBER: _ClassVar[int]
    SCORES_F32_FIELD_NUMBER: _ClassVar[int]
    item_ids: _containers.RepeatedScalarFieldContainer[str]
    sources: _containers.RepeatedScalarFieldContainer[_common_pb2.CandidateSource]
    scores: _containers.RepeatedScalarFieldContainer[float]
    titles: _containers.RepeatedScalarFieldContainer[str]
    source_scores: _containers.RepeatedCompositeFieldContainer[SourceColumn]
    sources_i32: bytes
    scores_f32: bytes
    def __init__(self, item_ids: _Optional[_Iterable[str]] = ..., sources: _Optional[_Iterable[_Union[_common_pb2.CandidateSource, str]]] = ..., scores: _Optional[_Iterable[float]] = ..., titles: _Optional[_Iterable[str]] = ..., source_scores: _Optional[_Iterable[_Union[SourceColumn, _Mapping]]] = ..., sources_i32: _Optional[bytes] = ..., scores_f32: _Optional[bytes] = ...) -> None: ...

class SourceColumn(_message.Message):
    __slots__ = ("source", "scores", "ranks", "scores_f32", "ranks_u32")
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    SCORES_FIELD_NUMBER: _ClassVar[int]
    RANKS_FIELD_NUMBER: _ClassVar[int]
    SCORES_F32_FIELD_NUMBER: _ClassVar[int]
    RANKS_U32_FIELD_NUMBER: _ClassVar[int]
    source: _common_pb2.CandidateSource
    scores: _containers.RepeatedScalarFieldContainer[float]
    ranks: _containers.RepeatedScalarFieldContainer[int]
    scores_f32: bytes
    ranks_u32: bytes
    def __init__(self, source: _Optional[_Union[_common_pb2.CandidateSource, str]] = ..., scores: _Optional[_Iterable[float]] = ..., ranks: _Optional[_Iterable[int]] = ..., scores_f32: _Optional[bytes] = ..., ranks_u32: _Optional[bytes] = ...) -> None: ...

class RetrieveResponse(_message.Message):
    __slots__ = ("candidates", "model", "user", "columns", "popular")
    CANDIDATES_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    USER_FIELD_NUMBER: _ClassVar[int]
    COLUMNS_FIELD_NUMBER: _ClassVar[int]
    POPULAR_FIELD_NUMBER: _ClassVar[int]
    candidates: _containers.RepeatedCompositeFieldContainer[Candidate]
    model: _common_pb2.ModelVersion
    user: UserContext
    columns: CandidateColumns
    popular: RetrieveResponse
    def __init__(self, candidates: _Optional[_Iterable[_Union[Candidate, _Mapping]]] = ..., model: _Optional[_Union[_common_pb2.ModelVersion, _Mapping]] = ..., user: _Optional[_Union[UserContext, _Mapping]] = ..., columns: _Optional[_Union[CandidateColumns, _Mapping]] = ..., popular: _Optional[_Union[RetrieveResponse, _Mapping]] = ...) -> None: ...
