"""Errors on the routes that speak OpenAI's API, as OpenAI's error object: the openai SDK,
LangChain and litellm show its message (DMR's plain text reaches them as "Error code: 404")."""

from __future__ import annotations

from aiohttp import web

from app import errors
from app.api.middleware import failure
from app.api.responses import json_response
from app.protocols.openai_errors import OpenAIError


def openai_error_answer(exc: Exception) -> web.Response:
    """Any error before the answer starts as OpenAI's error object."""
    error = as_openai_error(exc)
    return json_response(error.body(), error.status)


def as_openai_error(exc: Exception) -> OpenAIError:
    if isinstance(exc, OpenAIError):
        return exc
    status, message = failure(exc)
    if isinstance(exc, errors.TooLarge):
        return OpenAIError(status, message, None, "request_too_large")
    if isinstance(exc, errors.UnknownModel):
        return OpenAIError(status, message, "model", "model_not_found")
    return OpenAIError(status, message)
