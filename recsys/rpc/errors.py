"""Domain exceptions and the one table that maps them to gRPC status codes."""

from __future__ import annotations

from collections.abc import Sequence

import grpc


class RecsysError(Exception):
    """Base of the errors a service raises on purpose; the message is shown to the caller."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL


class InvalidRequest(RecsysError):
    """The request is malformed: a missing field, a value out of range, a wrong tensor."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(RecsysError):
    """A model, version, domain, user or item the request names does not exist."""

    code = grpc.StatusCode.NOT_FOUND


class FailedPrecondition(RecsysError):
    """The system is not in a state that allows the operation (e.g. a version mismatch)."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class ResourceExhausted(RecsysError):
    """A bounded resource is full (the batching queue); the caller may retry later."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unavailable(RecsysError):
    """The service cannot answer now (model not loaded, shutting down, upstream down)."""

    code = grpc.StatusCode.UNAVAILABLE


class ModelNotReady(Unavailable):
    """No version of the model is loaded and warmed yet."""


class UpstreamUnavailable(Unavailable):
    """A service this one depends on is unavailable."""


class DeadlineExceeded(RecsysError):
    """The caller's deadline (or an upstream's) passed before the work was done."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED


INTERNAL_ERROR_MESSAGE = "Internal server error"

# Most characters of a client-supplied value (an id, a name) that an error message repeats. A
# status message travels in the trailing metadata, which gRPC caps at 16 KiB: a message that
# echoed a whole long id would arrive as RESOURCE_EXHAUSTED instead of the intended status.
ECHO_CHARS = 32


def shorten(value: str, limit: int = ECHO_CHARS) -> str:
    """A short, escaped form of a client-supplied value for error messages: repr() of at most
    `limit` characters, with the full length when it was cut ('abc...' (20000 chars))."""
    if len(value) <= limit:
        return ascii(value)
    quoted = ascii(value[:limit])
    return f"{quoted[:-1]}...{quoted[-1]} ({len(value)} chars)"


def check_id(value: str, field: str, max_length: int) -> None:
    """InvalidRequest if `value` (an id or name named `field`) is longer than `max_length`."""
    if len(value) > max_length:
        raise InvalidRequest(
            f"{field} is {len(value)} characters long, above the limit of {max_length}: "
            f"{shorten(value)}"
        )


def check_ids(values: Sequence[str], field: str, max_count: int, max_length: int) -> None:
    """InvalidRequest if the repeated field `field` has more than `max_count` ids, an empty id or
    one longer than `max_length`."""
    if len(values) > max_count:
        raise InvalidRequest(f"{field} has {len(values)} ids, above the limit of {max_count}")
    for value in values:
        if not value:
            raise InvalidRequest(f"{field} must not contain empty ids")
        check_id(value, f"an id in {field}", max_length)


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status code and client-facing message for an exception.

    Domain errors keep their message; an upstream's deadline keeps its code; anything else is
    INTERNAL with a generic message (the caller logs the traceback).
    """
    if isinstance(exc, RecsysError):
        return exc.code, str(exc)
    if isinstance(exc, grpc.RpcError) and hasattr(exc, "code"):
        code = exc.code()
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            return code, "upstream deadline exceeded"
        if code == grpc.StatusCode.UNAVAILABLE:
            return code, "upstream unavailable"
    if isinstance(exc, TimeoutError):
        return grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded"
    return grpc.StatusCode.INTERNAL, INTERNAL_ERROR_MESSAGE
