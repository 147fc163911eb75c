"""Ollama's API (spec 7.1) in terms of OpenAI chat completions, completions and embeddings, the
service's internal representations: requests checked and translated, answers (always read as a
stream from the runner, so that Ollama's timings are real) translated back. Plain dicts in and
out; no HTTP.

Beyond DMR, where Ollama's clients need it: real sizes and bare-hex digests in ``/api/tags``,
``size_vram`` and ``context_length`` in ``/api/ps``, ``model_info`` and ``capabilities`` in
``/api/show``, ``/api/embed``, ``/api/copy``, tool calls, ``format`` and logprobs.
"""

from __future__ import annotations

import json
import math
import re
import time
from collections import defaultdict, deque
from dataclasses import dataclass, field
from typing import Any

from app.durations import DurationError, KeepAlive, parse_keep_alive
from app.protocols.openai_calls import arguments_object
from app.timestamps import go_time


class InvalidRequest(ValueError):
    """A request Ollama would refuse with 400; the message names the field."""


@dataclass(frozen=True)
class Settings:
    """What a request asks of the runner rather than of one answer; None where it does not
    say. ``keep_alive`` holds for this request only, as in Ollama (the next request without
    one gets the model's own); ``context_size`` (num_ctx) reconfigures the model's runner, as
    DMR's ``_configure`` does (spec 7.1)."""

    keep_alive: KeepAlive | None = None
    context_size: int | None = None

    def configure_body(self, model: str, mode: str) -> dict[str, Any] | None:
        if self.context_size is None:
            return None
        return {"model": model, "mode": mode, "context-size": self.context_size}

    @property
    def unloads(self) -> bool:
        """keep_alive 0: a request without a prompt unloads the model (Ollama's way)."""
        return self.keep_alive is not None and self.keep_alive.seconds == 0


@dataclass
class GenerationRequest:
    """A chat or generate request: the model, what to ask the runner (None: nothing to ask,
    the request only loads or unloads the model), on which route, and how to answer."""

    model: str
    route: str  # "chat/completions" or "completions"
    body: dict[str, Any] | None
    stream: bool
    settings: Settings
    chat: bool  # answer with Ollama's chat shape (message) or generate's (response)


# -- requests ---------------------------------------------------------------------------------
def model_name(body: Any) -> str:
    """``model``, or the older ``name`` (both are accepted by Ollama)."""
    if not isinstance(body, dict):
        raise InvalidRequest("the request body must be a JSON object")
    name = body.get("model") or body.get("name")
    if not isinstance(name, str) or not name.strip():
        raise InvalidRequest("model is required")
    return name.strip()


def parse_chat(body: Any) -> GenerationRequest:
    model = model_name(body)
    messages = body.get("messages") or []
    if not isinstance(messages, list):
        raise InvalidRequest("messages must be a list")
    chat_messages = _messages(messages)
    request = _generation(body, model, "chat/completions", chat=True)
    if not chat_messages:
        request.body = None
        return request
    assert request.body is not None
    request.body["messages"] = chat_messages
    if body.get("tools"):
        request.body["tools"] = _tools(body["tools"])
    return request


def parse_generate(body: Any) -> GenerationRequest:
    model = model_name(body)
    prompt = _optional_text(body, "prompt")
    system = _optional_text(body, "system")
    if _optional_text(body, "suffix"):
        raise InvalidRequest(f'"{model}" does not support insert')
    if _optional_text(body, "template"):
        raise InvalidRequest("template: overriding the model's template is not supported")
    if body.get("images"):
        raise InvalidRequest(f'"{model}" does not support images')
    raw = _flag(body, "raw")
    request = _generation(body, model, "completions" if raw else "chat/completions", chat=False)
    if not prompt and not system:
        request.body = None  # Ollama: no prompt loads (or, with keep_alive 0, unloads)
        return request
    assert request.body is not None
    if raw:
        request.body["prompt"] = prompt
    else:
        turns = [{"role": "system", "content": system}] if system else []
        request.body["messages"] = [*turns, {"role": "user", "content": prompt}]
    return request


def parse_embed(body: Any, legacy: bool) -> tuple[str, dict[str, Any] | None, Settings]:
    """``/api/embed`` (``input``: text or texts) or the older ``/api/embeddings`` (``prompt``):
    the model, the OpenAI embeddings request (None when there is nothing to embed) and the
    runner settings it asks for."""
    model = model_name(body)
    options = _options(body)
    settings = _settings(body, options)
    if legacy:
        prompt = _optional_text(body, "prompt")
        return model, ({"model": model, "input": [prompt]} if prompt else None), settings
    texts = body.get("input")
    if isinstance(texts, str):
        texts = [texts]
    if texts is None or texts == []:
        return model, None, settings
    if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
        raise InvalidRequest("input must be a string or a list of strings")
    request: dict[str, Any] = {"model": model, "input": texts}
    dimensions = body.get("dimensions")
    if dimensions is not None:
        if not _is_int(dimensions) or dimensions < 1:
            raise InvalidRequest("dimensions must be a positive whole number")
        request["dimensions"] = dimensions
    return model, request, settings


def _generation(body: dict[str, Any], model: str, route: str, chat: bool) -> GenerationRequest:
    options = _options(body)
    think = body.get("think")
    if think not in (None, False):
        raise InvalidRequest(f'"{model}" does not support thinking')
    request: dict[str, Any] = {
        "model": model,
        "stream": True,  # always: Ollama's timings come from when tokens arrive
        "stream_options": {"include_usage": True},
        **_sampling(options),
    }
    request.update(_format(body.get("format")))
    if _flag(body, "logprobs"):
        top = body.get("top_logprobs")
        if top is not None and (not _is_int(top) or not 0 <= top <= 20):
            raise InvalidRequest("top_logprobs must be a whole number from 0 to 20")
        if route == "completions":  # OpenAI's completions take the count in `logprobs`
            request["logprobs"] = top or 0
        else:
            request["logprobs"] = True
            if top is not None:
                request["top_logprobs"] = top
    stream = wants_stream(body)
    return GenerationRequest(model, route, request, stream, _settings(body, options), chat)


# Ollama's options that the runner reads under the same names (OpenAI's, or llama.cpp's). Options
# of Ollama's own runner that change nothing here (num_thread, num_gpu, mirostat, ...) are
# accepted and ignored, as Ollama itself ignores options a model does not use.
_SAMPLING = (
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "seed",
    "presence_penalty",
    "frequency_penalty",
    "repeat_penalty",
)


def _options(body: dict[str, Any]) -> dict[str, Any]:
    options = body.get("options") or {}
    if not isinstance(options, dict):
        raise InvalidRequest("options must be an object")
    return options


def _sampling(options: dict[str, Any]) -> dict[str, Any]:
    out = {name: options[name] for name in _SAMPLING if name in options}
    for name, value in out.items():
        if not _is_number(value):
            raise InvalidRequest(f"options.{name} must be a number, not {value!r}")
    limit = options.get("num_predict")
    if limit is not None:
        if not _is_int(limit):
            raise InvalidRequest(f"options.num_predict must be a whole number, not {limit!r}")
        if limit > 0:  # -1: no limit; -2: until the context is full (the runner's own limit)
            out["max_tokens"] = limit
    stop = options.get("stop")
    if stop is not None:
        if isinstance(stop, str):
            stop = [stop]
        if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
            raise InvalidRequest("options.stop must be a string or a list of strings")
        out["stop"] = stop
    return out


def _settings(body: dict[str, Any], options: dict[str, Any]) -> Settings:
    value = body.get("keep_alive")
    if value is None:
        value = options.get("keep_alive")
    keep_alive = None
    if value is not None:
        try:
            keep_alive = KeepAlive(parse_keep_alive(value))
        except DurationError as exc:
            raise InvalidRequest(str(exc)) from None
    ctx = options.get("num_ctx")
    if ctx is not None and (not _is_int(ctx) or ctx < 1):
        raise InvalidRequest(f"options.num_ctx must be a positive whole number, not {ctx!r}")
    return Settings(keep_alive, ctx)


def _format(value: Any) -> dict[str, Any]:
    if value in (None, ""):
        return {}
    if value == "json":
        return {"response_format": {"type": "json_object"}}
    if isinstance(value, dict):
        return {
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": "format", "schema": value},
            }
        }
    raise InvalidRequest(f'format must be "json" or a JSON schema, not {value!r}')


def _messages(messages: list[Any]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    serial = 0
    # Ollama's tool turns name their tool, not a call: each answers the oldest unanswered
    # call of that tool, so that templates that pair results with calls by id get it right.
    unanswered: dict[str, deque[str]] = defaultdict(deque)
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise InvalidRequest(f"{where} must be an object with a role")
        if message.get("images"):
            raise InvalidRequest(f"{where}.images: this model does not support images")
        content = _optional_text(message, "content", where)
        turn: dict[str, Any] = {"role": message["role"], "content": content}
        if message.get("tool_calls"):
            calls = _list(message["tool_calls"], f"{where}.tool_calls")
            turn["tool_calls"] = []
            for j, call in enumerate(calls):
                made = _tool_call(call, f"{where}.tool_calls[{j}]", f"call_{serial}")
                serial += 1
                turn["tool_calls"].append(made)
                unanswered[made["function"]["name"]].append(made["id"])
        if message["role"] == "tool":
            name = _optional_text(message, "tool_name", where) or _optional_text(
                message, "name", where
            )
            if name:
                turn["name"] = name
            call_id = _optional_text(message, "tool_call_id", where)
            waiting = unanswered[name]
            if call_id in waiting:
                waiting.remove(call_id)
            elif not call_id:
                call_id = waiting.popleft() if waiting else f"call_{serial}"
            turn["tool_call_id"] = call_id
        out.append(turn)
    return out


def _tool_call(call: Any, where: str, default_id: str) -> dict[str, Any]:
    function = call.get("function") if isinstance(call, dict) else None
    if not isinstance(function, dict) or not isinstance(function.get("name"), str):
        raise InvalidRequest(f"{where} must have a function with a name")
    arguments = function.get("arguments") or {}
    if not isinstance(arguments, dict | str):
        raise InvalidRequest(f"{where}.function.arguments must be an object")
    return {
        "id": _optional_text(call, "id", where) or default_id,
        "type": "function",
        "function": {
            "name": function["name"],
            "arguments": arguments if isinstance(arguments, str) else json.dumps(arguments),
        },
    }


def _tools(value: Any) -> list[dict[str, Any]]:
    # Ollama's tools are OpenAI's; the runner checks their schemas (400 naming `tools`).
    return [
        {"type": tool.get("type") or "function", "function": tool.get("function")}
        if isinstance(tool, dict)
        else tool
        for tool in _list(value, "tools")
    ]


def _list(value: Any, where: str) -> list[Any]:
    if not isinstance(value, list):
        raise InvalidRequest(f"{where} must be a list")
    return value


def _optional_text(body: dict[str, Any], name: str, where: str = "") -> str:
    value = body.get(name)
    if value is None:
        return ""
    if not isinstance(value, str):
        field = f"{where}.{name}" if where else name
        raise InvalidRequest(f"{field} must be a string")
    return value


def wants_stream(body: dict[str, Any]) -> bool:
    """Ollama streams unless told not to."""
    return _flag(body, "stream", default=True)


def _flag(body: dict[str, Any], name: str, default: bool = False) -> bool:
    value = body.get(name)
    if value is None:  # null: not set, as Go reads it
        return default
    if not isinstance(value, bool):
        raise InvalidRequest(f"{name} must be true or false")
    return value


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


# -- answers ----------------------------------------------------------------------------------
def load_answer(model: str, chat: bool, unloaded: bool) -> dict[str, Any]:
    """The answer to a request without a prompt: the model is loaded (or unloaded)."""
    body: dict[str, Any] = {"model": model, "created_at": go_time()}
    if chat:
        body["message"] = {"role": "assistant", "content": ""}
    else:
        body["response"] = ""
    return {**body, "done": True, "done_reason": "unload" if unloaded else "load"}


@dataclass
class Answer:
    """An answer as it arrives from the runner's chat (or completion) stream: Ollama's chunks
    for a stream, and what the last chunk (or the whole answer) reports.

    Timings (nanoseconds, from when the request arrived): ``load_duration`` until the runner
    took the request (queueing and loading), ``prompt_eval_duration`` from there to the first
    token, ``eval_duration`` from the first token to the last.
    """

    request: GenerationRequest
    started_ns: int = field(default_factory=time.perf_counter_ns)
    model: str = ""
    accepted_ns: int | None = None
    first_token_ns: int | None = None
    text: list[str] = field(default_factory=list)
    calls: list[dict[str, Any]] = field(default_factory=list)
    logprobs: list[dict[str, Any]] = field(default_factory=list)
    finish_reason: str | None = None
    usage: dict[str, Any] = field(default_factory=dict)
    error: str | None = None

    def accepted(self) -> None:
        self.accepted_ns = time.perf_counter_ns()

    def feed(self, chunk: dict[str, Any]) -> list[dict[str, Any]]:
        """Ollama's chunks for one of the runner's (none for its bookkeeping chunks)."""
        if "error" in chunk:
            error = chunk["error"]
            self.error = str(error.get("message") if isinstance(error, dict) else error)
            return [{"error": self.error}]
        self.model = chunk.get("model") or self.model
        if chunk.get("usage"):
            self.usage = chunk["usage"]
        out: list[dict[str, Any]] = []
        for choice in chunk.get("choices") or []:
            piece, calls, logprobs = self._piece(choice)
            if choice.get("finish_reason"):
                self.finish_reason = choice["finish_reason"]
            if not piece and not calls:
                continue
            if self.first_token_ns is None:
                self.first_token_ns = time.perf_counter_ns()
            self.text.append(piece)
            self.calls.extend(calls)
            self.logprobs.extend(logprobs)
            out.append(self._chunk(piece, calls, logprobs))
        return out

    def _piece(
        self, choice: dict[str, Any]
    ) -> tuple[str, list[dict[str, Any]], list[dict[str, Any]]]:
        raw = choice.get("logprobs")
        if self.request.route == "completions":
            return choice.get("text") or "", [], _completion_logprobs(raw)
        delta = choice.get("delta") or {}
        calls = [_ollama_call(call) for call in delta.get("tool_calls") or []]
        return delta.get("content") or "", calls, _chat_logprobs(raw)

    def _chunk(
        self, piece: str, calls: list[dict[str, Any]], logprobs: list[dict[str, Any]]
    ) -> dict[str, Any]:
        body: dict[str, Any] = {"model": self.model or self.request.model}
        body["created_at"] = go_time()
        if self.request.chat:
            message: dict[str, Any] = {"role": "assistant", "content": piece}
            if calls:
                message["tool_calls"] = calls
            body["message"] = message
        else:
            body["response"] = piece
        if logprobs:
            body["logprobs"] = logprobs
        body["done"] = False
        return body

    def last(self) -> dict[str, Any]:
        """The stream's closing chunk: no text, the reason and the counts."""
        return {**self._chunk("", [], []), **self._end()}

    def whole(self) -> dict[str, Any]:
        """The answer in one object (``stream: false``)."""
        body = self._chunk("".join(self.text), self.calls, self.logprobs)
        return {**body, **self._end()}

    def _end(self) -> dict[str, Any]:
        end = time.perf_counter_ns()
        accepted = self.accepted_ns or self.started_ns
        first = self.first_token_ns or end
        return {
            "done": True,
            "done_reason": "length" if self.finish_reason == "length" else "stop",
            "total_duration": end - self.started_ns,
            "load_duration": accepted - self.started_ns,
            "prompt_eval_count": int(self.usage.get("prompt_tokens") or 0),
            "prompt_eval_duration": first - accepted,
            "eval_count": int(self.usage.get("completion_tokens") or 0),
            "eval_duration": end - first,
        }


def _ollama_call(call: dict[str, Any]) -> dict[str, Any]:
    function = call.get("function") or {}
    return {
        "id": call.get("id"),
        "function": {
            "index": call.get("index", 0),
            "name": function.get("name", ""),
            "arguments": arguments_object(function.get("arguments")),
        },
    }


def _chat_logprobs(raw: Any) -> list[dict[str, Any]]:
    if not isinstance(raw, dict):
        return []
    return [
        {
            "token": e["token"],
            "logprob": e["logprob"],
            "bytes": e.get("bytes"),
            "top_logprobs": [
                {"token": t["token"], "logprob": t["logprob"], "bytes": t.get("bytes")}
                for t in e.get("top_logprobs") or []
            ],
        }
        for e in raw.get("content") or []
    ]


def _completion_logprobs(raw: Any) -> list[dict[str, Any]]:
    if not isinstance(raw, dict):
        return []
    tops = raw.get("top_logprobs") or []
    return [
        {
            "token": token,
            "logprob": logprob,
            "top_logprobs": [
                {"token": t, "logprob": lp} for t, lp in (tops[i] if i < len(tops) else {}).items()
            ],
        }
        for i, (token, logprob) in enumerate(
            zip(raw.get("tokens") or [], raw.get("token_logprobs") or [], strict=False)
        )
    ]


def embed_answer(
    reply: dict[str, Any], model: str, started_ns: int, legacy: bool
) -> dict[str, Any]:
    vectors = [item["embedding"] for item in sorted(reply["data"], key=lambda d: d["index"])]
    if legacy:
        return {"embedding": vectors[0] if vectors else []}
    total = time.perf_counter_ns() - started_ns
    return {
        "model": reply.get("model") or model,
        "embeddings": vectors,
        "total_duration": total,
        "load_duration": 0,
        "prompt_eval_count": int((reply.get("usage") or {}).get("prompt_tokens") or 0),
    }


def error_body(message: str) -> dict[str, Any]:
    return {"error": message}


# -- models -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelFacts:
    """What Ollama's model listings show of a stored model."""

    name: str
    digest: str  # bare hex, as Ollama's digests are
    size: int  # bytes on disk, every layer
    modified_at: str
    config: dict[str, Any]  # DMR's config (format, architecture, parameters, quantization, gguf)

    def details(self) -> dict[str, Any]:
        arch = self.config.get("architecture") or ""
        return {
            "parent_model": "",
            "format": self.config.get("format") or "gguf",
            "family": arch,
            "families": [arch] if arch else None,
            "parameter_size": self.config.get("parameters") or "",
            "quantization_level": self.config.get("quantization") or "",
        }

    def listed(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "model": self.name,
            "modified_at": self.modified_at,
            "size": self.size,
            "digest": self.digest,
            "details": self.details(),
        }


def running(
    facts: ModelFacts, memory: int, vram: int, expires_at: str, context_length: int
) -> dict[str, Any]:
    return {
        "name": facts.name,
        "model": facts.name,
        "size": memory,
        "digest": facts.digest,
        "details": facts.details(),
        "expires_at": expires_at,
        "size_vram": vram,
        "context_length": context_length,
    }


def show(facts: ModelFacts, template: str, capabilities: list[str]) -> dict[str, Any]:
    return {
        "modelfile": f"# Modelfile generated by model-runner\nFROM {facts.name}\n",
        "parameters": "",
        "template": template,
        "details": facts.details(),
        "model_info": model_info(facts.config.get("gguf") or {}),
        "capabilities": capabilities,
        "modified_at": facts.modified_at,
    }


def model_info(gguf: dict[str, Any]) -> dict[str, Any]:
    """The GGUF metadata, its values typed again (DMR's config keeps them as text)."""
    return {key: _typed(value) for key, value in gguf.items()}


_JSON_NUMBER = re.compile(r"-?(0|[1-9]\d*)(\.\d+)?([eE][+-]?\d+)?")


def _typed(value: Any) -> Any:
    if not isinstance(value, str):
        return value
    if value in ("true", "false"):
        return value == "true"
    if not _JSON_NUMBER.fullmatch(value):  # "nan", "inf", "1_0" stay text: JSON has no such
        return value
    number = float(value) if any(c in value for c in ".eE") else int(value)
    return number if math.isfinite(number) else value


# -- pulls and pushes -------------------------------------------------------------------------
# Ollama's first and last words around the layers, for each direction.
TRANSFER_START = {"pull": "pulling manifest", "push": "retrieving manifest"}
_TRANSFER_END = {
    "pull": ("verifying sha256 digest", "writing manifest"),
    "push": ("pushing manifest",),
}


def transfer_lines(message: dict[str, Any], mode: str) -> list[dict[str, Any]]:
    """Ollama's progress lines for one of DMR's (spec 3.1, 7.1); ``mode`` pull or push."""
    kind = message.get("type")
    if kind == "progress":
        layer = message.get("layer") or {}
        digest = str(layer.get("id") or "")
        verb = "pulling" if mode == "pull" else "pushing"
        return [
            {
                "status": f"{verb} {digest.removeprefix('sha256:')[:12]}",
                "digest": digest,
                "total": int(layer.get("size") or 0),
                "completed": int(layer.get("current") or 0),
            }
        ]
    if kind == "success":
        return [{"status": status} for status in _TRANSFER_END[mode]]
    if kind == "error":
        return [{"error": str(message.get("message") or f"{mode} failed")}]
    return [{"status": str(message.get("message") or "")}] if message.get("message") else []
