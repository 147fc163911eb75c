"""Errors the service layer raises; the API maps each kind to an HTTP status.

The message is the exact text a client sees (DMR answers management errors in plain text).
"""

from __future__ import annotations


class ServiceError(Exception):
    """Something failed on our side (HTTP 500)."""


class BadRequest(ServiceError):
    """The client sent something unusable (HTTP 400)."""


class TooLarge(BadRequest):
    """The body is over the size cap: a 400 in DMR's routes, a 413 in the APIs that answer
    errors in their own shapes."""


class NotFound(ServiceError):
    """HTTP 404."""


class Conflict(ServiceError):
    """HTTP 409."""


class Unsupported(ServiceError):
    """A well-formed request for something this service cannot handle (HTTP 422)."""


class RequestTimeout(ServiceError):
    """The client did not send its request in time (HTTP 408)."""


class InsufficientStorage(ServiceError):
    """HTTP 507."""


class Unauthorized(ServiceError):
    """The registry refused our credentials, or wants some (HTTP 401)."""


class Unavailable(ServiceError):
    """No capacity now: a full queue or no memory to load a model (HTTP 503)."""

    def __init__(self, message: str, retry_after: int | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class UnknownModel(NotFound):
    """A request names a model the store lacks (HTTP 404; OpenAI's code "model_not_found")."""


def model_not_found(ref: str) -> UnknownModel:
    """DMR's answer when an inference or /v1/models request names a model the store lacks."""
    return UnknownModel(f"error while getting model: get model '\"{ref}\"': model not found")
