"""OpenAI request bodies to engine parameters, with a 400 naming the field for anything off."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from app.engine.sampling import SamplingParams

_MAX_REPEAT = 1000
_MAX_GRAMMAR = 256 * 1024
# Schema lengths and item counts (minLength, maxItems...): the converter writes out every
# repetition they ask for (minLength 100000000: a 500 MB grammar, 1.5 GB of memory for 4 s), and
# llama.cpp's grammar parser recurses once per nested one (maxLength 19000 crashed the runner).
# Each count may be up to _MAX_COUNT, all of them together _MAX_COUNTS (a 100,000-repetition
# grammar takes milliseconds to write, then is refused by _MAX_GRAMMAR if it is too large).
_MAX_COUNT = 10_000
_MAX_COUNTS = 100_000


class ParamError(ValueError):
    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class Generation:
    max_tokens: int | None
    sampling: SamplingParams
    stop: list[str]
    stream: bool
    include_usage: bool
    top_logprobs: int | None  # None: no logprobs


def _get(body: dict[str, Any], name: str, kinds: type | tuple[type, ...], default: Any) -> Any:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) and bool not in (kinds if isinstance(kinds, tuple) else (kinds,)):
        raise ParamError(f"'{name}' must be a number, not a boolean", name)
    if not isinstance(value, kinds):
        raise ParamError(f"'{name}' has the wrong type ({type(value).__name__})", name)
    return value


def _number(body: dict[str, Any], name: str, default: float, lo: float, hi: float) -> float:
    value = float(_get(body, name, (int, float), default))
    if not lo <= value <= hi:
        raise ParamError(f"'{name}' must be between {lo} and {hi}, got {value}", name)
    return value


def _int(body: dict[str, Any], name: str, default: int | None, lo: int) -> int | None:
    value = _get(body, name, int, default)
    if value is not None and value < lo:
        raise ParamError(f"'{name}' must be at least {lo}, got {value}", name)
    return value


def _logprobs(body: dict[str, Any], chat: bool) -> int | None:
    """Chat: ``logprobs: true`` plus ``top_logprobs`` (0-20). Completions: ``logprobs: n`` (0-5)."""
    if not chat:
        n = _int(body, "logprobs", None, 0)
        if n is not None and n > 5:
            raise ParamError("'logprobs' must be between 0 and 5", "logprobs")
        return n
    wanted = _get(body, "logprobs", bool, False)
    top = _int(body, "top_logprobs", None, 0)
    if top is not None and top > 20:
        raise ParamError("'top_logprobs' must be between 0 and 20", "top_logprobs")
    if top is not None and not wanted:
        raise ParamError("'top_logprobs' needs 'logprobs': true", "top_logprobs")
    return (top or 0) if wanted else None


def parse_generation(body: dict[str, Any], n_vocab: int, chat: bool = True) -> Generation:
    n = _int(body, "n", 1, 1)
    if n != 1:
        raise ParamError("'n' must be 1: only one choice per request is supported", "n")
    top_logprobs = _logprobs(body, chat)
    max_tokens = _int(body, "max_completion_tokens", None, 1)
    if max_tokens is None:
        max_tokens = _int(body, "max_tokens", None, 1)
    stop = body.get("stop")
    if stop is None:
        stops: list[str] = []
    elif isinstance(stop, str):
        stops = [stop]
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        stops = stop
    else:
        raise ParamError("'stop' must be a string or a list of strings", "stop")
    seed = _get(body, "seed", int, None)
    sampling = SamplingParams(
        temperature=_number(body, "temperature", 0.8, 0.0, 2.0),
        top_p=_number(body, "top_p", 0.95, 0.0, 1.0),
        top_k=int(_number(body, "top_k", 40, 0, 1_000_000)),
        min_p=_number(body, "min_p", 0.05, 0.0, 1.0),
        seed=seed,
        presence_penalty=_number(body, "presence_penalty", 0.0, -2.0, 2.0),
        frequency_penalty=_number(body, "frequency_penalty", 0.0, -2.0, 2.0),
        repeat_penalty=_number(body, "repeat_penalty", 1.0, 0.01, 10.0),
        logit_bias=_logit_bias(body, n_vocab),
        grammar=_grammar(body),
    )
    stream = _get(body, "stream", bool, False)
    options = _get(body, "stream_options", dict, {})
    include_usage = bool(options.get("include_usage", False))
    return Generation(max_tokens, sampling, stops, stream, include_usage, top_logprobs)


def _logit_bias(body: dict[str, Any], n_vocab: int) -> dict[int, float]:
    raw = _get(body, "logit_bias", dict, {})
    out: dict[int, float] = {}
    for key, bias in raw.items():
        try:
            token = int(key)
        except ValueError:
            raise ParamError(f"'logit_bias' key {key!r} is not a token id", "logit_bias") from None
        if not 0 <= token < n_vocab:
            raise ParamError(f"'logit_bias' token {token} is not in the vocabulary", "logit_bias")
        if isinstance(bias, bool) or not isinstance(bias, int | float) or not -100 <= bias <= 100:
            raise ParamError("'logit_bias' values must be numbers from -100 to 100", "logit_bias")
        # OpenAI's -100 means "never". A huge finite bias rather than -inf: with a grammar that
        # allows only banned tokens, llama.cpp aborts when every candidate is -inf.
        out[token] = -1e30 if bias <= -100 else float(bias)
    return out


def _grammar(body: dict[str, Any]) -> str | None:
    from llama_cpp.llama_grammar import JSON_GBNF

    fmt = _get(body, "response_format", dict, None)
    if fmt is None or fmt.get("type") in (None, "text"):
        return None
    if fmt.get("type") == "json_object":
        return JSON_GBNF
    if fmt.get("type") == "json_schema":
        spec = fmt.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if not isinstance(schema, dict):
            raise ParamError(
                "'response_format.json_schema.schema' must be an object", "response_format"
            )
        return schema_grammar(schema, "response_format")
    raise ParamError(f"unknown response_format type {fmt.get('type')!r}", "response_format")


def schema_grammar(schema: dict[str, Any], field: str) -> str:
    """A JSON schema as a GBNF grammar, within the limits that keep llama.cpp safe; a 400
    naming ``field`` (where the schema came from) when it is past them or not convertible."""
    from llama_cpp.llama_grammar import json_schema_to_gbnf

    _check_counts(schema, field)
    text = json.dumps(schema)
    # llama.cpp expands {m,n} repetitions into the grammar; huge counts crash it.
    if any(int(n) > _MAX_REPEAT for n in re.findall(r"\{\d*,?(\d+)\}", text)):
        raise ParamError(f"pattern repetitions above {_MAX_REPEAT} are not supported", field)
    try:
        grammar = json_schema_to_gbnf(text)
    except Exception as exc:  # the converter raises plain exceptions on odd schemas
        raise ParamError(f"unsupported JSON schema: {exc}", field) from None
    if len(grammar) > _MAX_GRAMMAR:
        raise ParamError("the JSON schema makes too large a grammar", field)
    return grammar


def _check_counts(schema: dict[str, Any], field: str) -> None:
    """Refuse a schema whose lengths and item counts would make a huge grammar: each one, and
    all of them together, since every one the schema holds adds its own repetitions."""
    total = 0
    todo: list[Any] = [schema]
    while todo:
        node = todo.pop()
        if isinstance(node, list):
            todo.extend(node)
        elif isinstance(node, dict):
            todo.extend(node.values())
            for family in ("Length", "Items"):
                # minLength 5 and maxLength 9 write out 9 repetitions: 5, then 4 optional ones.
                total += max(_count(node, bound + family) for bound in ("min", "max"))
    if total > _MAX_COUNTS:
        raise ParamError(
            f"the JSON schema's lengths and item counts add up to {total}, more than the "
            f"{_MAX_COUNTS} supported",
            field,
        )


def _count(node: dict[str, Any], key: str) -> int:
    value = node.get(key)
    if not isinstance(value, int | float) or isinstance(value, bool):
        return 0  # not a count: the converter refuses it, or ignores it
    if not 0 <= value <= _MAX_COUNT:  # NaN too
        raise ParamError(f"'{key}' must be from 0 to {_MAX_COUNT}, not {value}", "response_format")
    return int(value)


def parse_messages(body: dict[str, Any]) -> list[dict[str, Any]]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ParamError("'messages' must be a non-empty list", "messages")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise ParamError(f"'messages[{i}]' must be an object with a 'role'", "messages")
        content = message.get("content")
        if isinstance(content, list):  # content parts: keep the text ones
            texts = [p.get("text", "") for p in content if isinstance(p, dict)]
            content = "".join(t for t in texts if isinstance(t, str))
        elif content is None:
            content = ""
        elif not isinstance(content, str):
            raise ParamError(f"'messages[{i}].content' must be a string or a list", "messages")
        out.append({**message, "content": content})
    return out


def parse_prompt(body: dict[str, Any], n_vocab: int) -> str | list[int]:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and prompt and _token_ids(prompt, n_vocab, "prompt"):
        return prompt
    raise ParamError("'prompt' must be a string or a list of token ids", "prompt")


def parse_inputs(body: dict[str, Any], n_vocab: int) -> list[str | list[int]]:
    value = body.get("input")
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and value:
        if _token_ids(value, n_vocab, "input"):
            return [value]
        if all(isinstance(v, str) for v in value):
            return list(value)
        if all(isinstance(v, list) and v and _token_ids(v, n_vocab, "input") for v in value):
            return list(value)
    raise ParamError("'input' must be a string, a list of strings, or token arrays", "input")


def _token_ids(values: list[Any], n_vocab: int, field: str) -> bool:
    """True for a list of token ids; ids outside the vocabulary are a 400, not a crash."""
    if not all(isinstance(t, int) and not isinstance(t, bool) for t in values):
        return False
    bad = [t for t in values if not 0 <= t < n_vocab]
    if bad:
        raise ParamError(f"token id {bad[0]} is not in the vocabulary (0-{n_vocab - 1})", field)
    return True
