from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class RankRequest(_message.Message):
    __slots__ = ("model_name", "model_version", "user_id", "item_ids", "context", "allow_unknown_items", "features", "features_f32", "features_version", "packed_scores")
    class ContextEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    ITEM_IDS_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_FIELD_NUMBER: _ClassVar[int]
    ALLOW_UNKNOWN_ITEMS_FIELD_NUMBER: _ClassVar[int]
    FEATURES_FIELD_NUMBER: _ClassVar[int]
    FEATURES_F32_FIELD_NUMBER: _ClassVar[int]
    FEATURES_VERSION_FIELD_NUMBER: _ClassVar[int]
    PACKED_SCORES_FIELD_NUMBER: _ClassVar[int]
    model_name: str
    model_version: str
    user_id: str
    item_ids: _containers.RepeatedScalarFieldContainer[str]
    context: _containers.ScalarMap[str, str]
    allow_unknown_items: bool
    features: _containers.RepeatedScalarFieldContainer[float]
    features_f32: bytes
    features_version: str
    packed_scores: bool
    def __init__(self, model_name: _Optional[str] = ..., model_version: _Optional[str] = ..., user_id: _Optional[str] = ..., item_ids: _Optional[_Iterable[str]] = ..., context: _Optional[_Mapping[str, str]] = ..., allow_unknown_items: _Optional[bool] = ..., features: _Optional[_Iterable[float]] = ..., features_f32: _Optional[bytes] = ..., features_version: _Optional[str] = ..., packed_scores: _Optional[bool] = ...) -> None: ...

class RankResponse(_message.Message):
    __slots__ = ("scores", "scores_f32", "model_name", "model_version", "missing")
    SCORES_FIELD_NUMBER: _ClassVar[int]
    SCORES_F32_FIELD_NUMBER: _ClassVar[int]
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    MISSING_FIELD_NUMBER: _ClassVar[int]
    scores: _containers.RepeatedScalarFieldContainer[float]
    scores_f32: bytes
    model_name: str
    model_version: str
    missing: _containers.RepeatedScalarFieldContainer[bool]
    def __init__(self, scores: _Optional[_Iterable[float]] = ..., scores_f32: _Optional[bytes] = ..., model_name: _Optional[str] = ..., model_version: _Optional[str] = ..., missing: _Optional[_Iterable[bool]] = ...) -> None: ...
