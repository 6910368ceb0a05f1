from recsys.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DegradationReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DEGRADATION_REASON_UNSPECIFIED: _ClassVar[DegradationReason]
    DEGRADATION_REASON_RANKING_UNAVAILABLE: _ClassVar[DegradationReason]
    DEGRADATION_REASON_RANKING_DEADLINE: _ClassVar[DegradationReason]
    DEGRADATION_REASON_RANKING_PARTIAL: _ClassVar[DegradationReason]
    DEGRADATION_REASON_RETRIEVAL_UNAVAILABLE: _ClassVar[DegradationReason]
    DEGRADATION_REASON_UNKNOWN_USER: _ClassVar[DegradationReason]
    DEGRADATION_REASON_RANKING_INVALID_SCORES: _ClassVar[DegradationReason]
DEGRADATION_REASON_UNSPECIFIED: DegradationReason
DEGRADATION_REASON_RANKING_UNAVAILABLE: DegradationReason
DEGRADATION_REASON_RANKING_DEADLINE: DegradationReason
DEGRADATION_REASON_RANKING_PARTIAL: DegradationReason
DEGRADATION_REASON_RETRIEVAL_UNAVAILABLE: DegradationReason
DEGRADATION_REASON_UNKNOWN_USER: DegradationReason
DEGRADATION_REASON_RANKING_INVALID_SCORES: DegradationReason

class RecommendRequest(_message.Message):
    __slots__ = ("user_id", "domain", "k", "exclude_seen", "recent_item_ids")
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    DOMAIN_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    EXCLUDE_SEEN_FIELD_NUMBER: _ClassVar[int]
    RECENT_ITEM_IDS_FIELD_NUMBER: _ClassVar[int]
    user_id: str
    domain: str
    k: int
    exclude_seen: bool
    recent_item_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, user_id: _Optional[str] = ..., domain: _Optional[str] = ..., k: _Optional[int] = ..., exclude_seen: _Optional[bool] = ..., recent_item_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class RecommendedItem(_message.Message):
    __slots__ = ("item_id", "score", "title", "source", "ranked", "sources", "retrieval_position")
    ITEM_ID_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    TITLE_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    RANKED_FIELD_NUMBER: _ClassVar[int]
    SOURCES_FIELD_NUMBER: _ClassVar[int]
    RETRIEVAL_POSITION_FIELD_NUMBER: _ClassVar[int]
    item_id: str
    score: float
    title: str
    source: _common_pb2.CandidateSource
    ranked: bool
    sources: _containers.RepeatedScalarFieldContainer[_common_pb2.CandidateSource]
    retrieval_position: int
    def __init__(self, item_id: _Optional[str] = ..., score: _Optional[float] = ..., title: _Optional[str] = ..., source: _Optional[_Union[_common_pb2.CandidateSource, str]] = ..., ranked: _Optional[bool] = ..., sources: _Optional[_Iterable[_Union[_common_pb2.CandidateSource, str]]] = ..., retrieval_position: _Optional[int] = ...) -> None: ...

class Degradation(_message.Message):
    __slots__ = ("reason", "detail")
    REASON_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    reason: DegradationReason
    detail: str
    def __init__(self, reason: _Optional[_Union[DegradationReason, str]] = ..., detail: _Optional[str] = ...) -> None: ...

class RecommendResponse(_message.Message):
    __slots__ = ("items", "model_versions", "degraded", "degradations")
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSIONS_FIELD_NUMBER: _ClassVar[int]
    DEGRADED_FIELD_NUMBER: _ClassVar[int]
    DEGRADATIONS_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[RecommendedItem]
    model_versions: _containers.RepeatedCompositeFieldContainer[_common_pb2.ModelVersion]
    degraded: bool
    degradations: _containers.RepeatedCompositeFieldContainer[Degradation]
    def __init__(self, items: _Optional[_Iterable[_Union[RecommendedItem, _Mapping]]] = ..., model_versions: _Optional[_Iterable[_Union[_common_pb2.ModelVersion, _Mapping]]] = ..., degraded: _Optional[bool] = ..., degradations: _Optional[_Iterable[_Union[Degradation, _Mapping]]] = ...) -> None: ...
