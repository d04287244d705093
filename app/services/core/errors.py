"""Errors the service layer raises. Each carries a *kind* (what went wrong, in the service's own
words) and a *type* (the finer name clients see, ``context_length_exceeded``); only the HTTP
layer turns kinds into statuses (app/routes/http/errors.py), as llama-server's
``format_error_response`` maps its error types to codes in one place."""
from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Optional


class ErrorKind(str, Enum):
    INVALID_REQUEST = "invalid_request"  # the request is wrong; the field says where
    FORBIDDEN = "forbidden"  # a path outside what the server may touch
    NOT_FOUND = "not_found"
    CONFLICT = "conflict"  # the thing is in a state that refuses this (an eval running, a vote cast)
    UNSUPPORTED_MEDIA_TYPE = "unsupported_media_type"
    QUEUE_FULL = "queue_full"  # busy: come back after retry_after_s
    INTERNAL = "internal"  # the server failed
    UNAVAILABLE = "unavailable"  # what the request needs (the model, the remote server) is not there
    TIMEOUT = "timeout"  # the work ran past the server's time limit
    STORAGE_FULL = "storage_full"  # results would pass the operator's cap on their space


@dataclass(frozen=True)
class ErrorDetails:
    """Facts an error carries besides its message and field, for the answer's body."""

    running: Optional[str] = None  # the eval that holds the server (EvalRunning)
    line: Optional[int] = None  # the line of a test set that is wrong (InvalidTestSet)


class ServiceError(Exception):
    kind = ErrorKind.INTERNAL
    type = "server_error"

    def __init__(self, message: str, field: Optional[str] = None):
        super().__init__(message)
        self.message = message
        self.field = field

    def details(self) -> ErrorDetails:
        """What the JSON answer carries besides error, type and field (a line number...)."""
        return ErrorDetails()


class NotFound(ServiceError):
    kind = ErrorKind.NOT_FOUND
    type = "not_found"


class InvalidRequest(ServiceError):
    kind = ErrorKind.INVALID_REQUEST
    type = "invalid_request_error"


class ContextLengthExceeded(InvalidRequest):
    type = "context_length_exceeded"

    def __init__(self, prompt_tokens: int, max_new_tokens: int, n_ctx: int, field: str = "messages",
                 message: Optional[str] = None):
        super().__init__(
            message or f"the prompt is {prompt_tokens} tokens and the context holds {n_ctx}; "
            f"shorten the conversation (at least one token must be left for the answer)",
            field,
        )
        self.prompt_tokens = prompt_tokens
        self.n_ctx = n_ctx


class ModelNotFound(ServiceError):
    kind = ErrorKind.NOT_FOUND
    type = "model_not_found"


class InvalidModel(ServiceError):
    kind = ErrorKind.INVALID_REQUEST
    type = "invalid_model"


class ModelLoadFailed(ServiceError):
    kind = ErrorKind.INTERNAL
    type = "model_load_failed"


class NoModelLoaded(ServiceError):
    """The request needs the model and it cannot be loaded; the type names the cause when there is one."""

    kind = ErrorKind.UNAVAILABLE
    type = "model_not_loaded"

    def __init__(self, message: str, cause: Optional[ServiceError] = None):
        super().__init__(message, field=cause.field if cause else None)
        if cause is not None:
            self.type = cause.type


class QueueFull(ServiceError):
    kind = ErrorKind.QUEUE_FULL
    type = "queue_full"

    def __init__(self, message: str, retry_after_s: int):
        super().__init__(message)
        self.retry_after_s = retry_after_s


class ModelTooLarge(InvalidModel):
    type = "model_too_large"


class RemoteUnavailable(ServiceError):
    """The remote OpenAI-compatible server (the remote backend) is down, unreachable or refuses us."""

    kind = ErrorKind.UNAVAILABLE
    type = "remote_unavailable"


class PathNotAllowed(ServiceError):
    kind = ErrorKind.FORBIDDEN
    type = "path_not_allowed"


class BackendIncomplete(ServiceError):
    """A backend declares a capability and lacks the methods that go with it: a bug in the backend."""

    kind = ErrorKind.INTERNAL
    type = "backend_incomplete"


class GenerationTimeout(ServiceError):
    kind = ErrorKind.TIMEOUT
    type = "generation_timeout"


class GenerationError(ServiceError):
    """A generation that failed after it started (the backend raised, the remote server broke off)."""

    kind = ErrorKind.INTERNAL
    type = "generation_error"


def generation_failure(message: Optional[str], error_type: Optional[str]) -> ServiceError:
    """The error a generation that ended in failure stands for, from its last chunk's ``error``
    and ``error_type``: the same kind whether it is raised (a whole answer) or sent as an event
    (a stream that had already begun)."""
    if error_type == GenerationTimeout.type:
        return GenerationTimeout(message or "the generation ran past the server's time limit")
    return GenerationError(message or "generation failed")


class EvalRunning(ServiceError):
    kind = ErrorKind.CONFLICT
    type = "eval_running"

    def __init__(self, message: str, running: str):
        super().__init__(message)
        self.running = running

    def details(self) -> ErrorDetails:
        return ErrorDetails(running=self.running)


class AlreadyVoted(ServiceError):
    kind = ErrorKind.CONFLICT
    type = "already_voted"


class UnsupportedMediaType(ServiceError):
    kind = ErrorKind.UNSUPPORTED_MEDIA_TYPE
    type = "unsupported_media_type"


class StorageFull(ServiceError):
    """Results would pass the operator's cap on the space they take (results/evals/)."""

    kind = ErrorKind.STORAGE_FULL
    type = "storage_full"


class TooManyStreams(QueueFull):
    type = "too_many_streams"
