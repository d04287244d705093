"""Errors the service layer raises; routes turn them into HTTP answers."""
from __future__ import annotations

from typing import Optional


class ServiceError(Exception):
    status = 500
    type = "server_error"

    def __init__(self, message: str, field: Optional[str] = None):
        super().__init__(message)
        self.message = message
        self.field = field

    def details(self) -> dict:
        """Fields besides error, type and field that the JSON answer carries (a line number...)."""
        return {}


class NotFound(ServiceError):
    status = 404
    type = "not_found"


class InvalidRequest(ServiceError):
    status = 400
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
    status = 404
    type = "model_not_found"


class InvalidModel(ServiceError):
    status = 400
    type = "invalid_model"


class ModelLoadFailed(ServiceError):
    status = 500
    type = "model_load_failed"


class NoModelLoaded(ServiceError):
    """The request needs the model and it cannot be loaded; the type names the cause when there is one."""

    status = 503
    type = "model_not_loaded"

    def __init__(self, message: str, cause: Optional[ServiceError] = None):
        super().__init__(message, field=cause.field if cause else None)
        if cause is not None:
            self.type = cause.type


class QueueFull(ServiceError):
    status = 429
    type = "queue_full"

    def __init__(self, message: str, retry_after_s: int):
        super().__init__(message)
        self.retry_after_s = retry_after_s


class ModelTooLarge(InvalidModel):
    type = "model_too_large"


class RemoteUnavailable(ServiceError):
    """The remote OpenAI-compatible server (openai backend) is down, unreachable or refuses us."""

    status = 503
    type = "remote_unavailable"


class PathNotAllowed(ServiceError):
    status = 403
    type = "path_not_allowed"


class GenerationTimeout(ServiceError):
    status = 504
    type = "generation_timeout"


class RequestCancelled(ServiceError):
    """The client went away (or asked to stop) while its request was being computed."""

    status = 499  # nginx's "client closed request": nobody reads this answer
    type = "cancelled"


class GenerationError(ServiceError):
    """A generation that failed after it started (the backend raised, the remote server broke off)."""

    status = 500
    type = "generation_error"


class EvalRunning(ServiceError):
    status = 409
    type = "eval_running"

    def __init__(self, message: str, running: str):
        super().__init__(message)
        self.running = running

    def details(self) -> dict:
        return {"running": self.running}


class VoteNotAllowed(ServiceError):
    """A vote without the token the comparison's creator was given: only that client votes."""

    status = 403
    type = "vote_not_allowed"


class AlreadyVoted(ServiceError):
    status = 409
    type = "already_voted"


class UnsupportedMediaType(ServiceError):
    status = 415
    type = "unsupported_media_type"


class StorageFull(ServiceError):
    """Results would pass the operator's cap on the space they take (results/evals/)."""

    status = 507
    type = "storage_full"


class TooManyStreams(QueueFull):
    type = "too_many_streams"
