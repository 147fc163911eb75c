"""OpenAI's error object, for every route that speaks OpenAI's API (chat completions,
completions, embeddings, models, Responses): the one shape its SDKs read a reason from."""

from __future__ import annotations

from typing import Any


class OpenAIError(Exception):
    """A refusal in OpenAI's terms: its status and the fields of OpenAI's error object."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        return {
            "error": {"message": str(self), "type": kind, "param": self.param, "code": self.code}
        }
