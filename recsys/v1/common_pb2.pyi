from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class CandidateSource(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    CANDIDATE_SOURCE_UNSPECIFIED: _ClassVar[CandidateSource]
    CANDIDATE_SOURCE_ANN: _ClassVar[CandidateSource]
    CANDIDATE_SOURCE_POPULAR: _ClassVar[CandidateSource]
    CANDIDATE_SOURCE_TRANSFER: _ClassVar[CandidateSource]
    CANDIDATE_SOURCE_HISTORY: _ClassVar[CandidateSource]
    CANDIDATE_SOURCE_ITEM2ITEM: _ClassVar[CandidateSource]
    CANDIDATE_SOURCE_RECENT: _ClassVar[CandidateSource]
CANDIDATE_SOURCE_UNSPECIFIED: CandidateSource
CANDIDATE_SOURCE_ANN: CandidateSource
CANDIDATE_SOURCE_POPULAR: CandidateSource
CANDIDATE_SOURCE_TRANSFER: CandidateSource
CANDIDATE_SOURCE_HISTORY: CandidateSource
CANDIDATE_SOURCE_ITEM2ITEM: CandidateSource
CANDIDATE_SOURCE_RECENT: CandidateSource

class SourceScore(_message.Message):
    __slots__ = ("source", "score", "rank")
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    source: CandidateSource
    score: float
    rank: int
    def __init__(self, source: _Optional[_Union[CandidateSource, str]] = ..., score: _Optional[float] = ..., rank: _Optional[int] = ...) -> None: ...

class ModelVersion(_message.Message):
    __slots__ = ("model_name", "model_version")
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    model_name: str
    model_version: str
    def __init__(self, model_name: _Optional[str] = ..., model_version: _Optional[str] = ...) -> None: ...
