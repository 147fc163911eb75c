"""Errors on the routes that speak OpenAI's API, as OpenAI's error object: the openai SDK,
LangChain and litellm show its message (DMR's plain text reaches them as "Error code: 404")."""

from __future__ import annotations

from aiohttp import web

from app import errors
from app.api.middleware import status_of
from app.api.responses import json_response
from app.logging import get_logger
from app.protocols.openai_errors import OpenAIError
from app.service.inference import RunnerDied

log = get_logger("openai")


def openai_error_answer(exc: Exception) -> web.Response:
    """Any error before the answer starts as OpenAI's error object."""
    error = as_openai_error(exc)
    return json_response(error.body(), error.status)


def as_openai_error(exc: Exception) -> OpenAIError:
    if isinstance(exc, OpenAIError):
        return exc
    if isinstance(exc, errors.TooLarge):
        return OpenAIError(413, str(exc), None, "request_too_large")
    if isinstance(exc, RunnerDied):
        return OpenAIError(500, str(exc))
    status = status_of(exc)
    if status is None:
        log.error("unhandled error", exc_info=exc)
        return OpenAIError(500, "internal server error")
    if status >= 500:
        log.error("request failed", error=str(exc))
    if isinstance(exc, errors.UnknownModel):
        return OpenAIError(status, str(exc), "model", "model_not_found")
    return OpenAIError(status, str(exc))
