"""Per-request sampler chains (llama.cpp's ``llama_sampler`` API)."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import llama_cpp as L

from app.engine.llama import LlamaError, Model


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    seed: int | None = None
    repeat_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    repeat_last_n: int = 64
    logit_bias: dict[int, float] = field(default_factory=dict)
    grammar: str | None = None


class Sampler:
    """A chain built for one request; sampling also accepts the token (penalties, grammar).

    Plain greedy decoding (temperature 0 and nothing that reshapes the logits) builds no chain:
    the engine takes the argmax of every such sequence's logits in one numpy call instead, as a
    chain copies the whole vocabulary into candidates for each sequence at each step.
    """

    def __init__(self, model: Model, params: SamplingParams) -> None:
        self.plain_greedy = params.temperature <= 0 and not (
            params.grammar or params.logit_bias or _penalized(params)
        )
        self.ptr = None
        if self.plain_greedy:
            return
        self.ptr = L.llama_sampler_chain_init(L.llama_sampler_chain_default_params())
        self._keep: list[object] = []  # ctypes arrays the chain points into
        if params.grammar:
            grammar = L.llama_sampler_init_grammar(model.vocab, params.grammar.encode(), b"root")
            if not grammar:
                L.llama_sampler_free(self.ptr)
                raise LlamaError("the grammar could not be compiled")
            self._add(grammar)
        if params.logit_bias:
            items = list(params.logit_bias.items())
            arr = (L.llama_logit_bias * len(items))()
            for i, (token, bias) in enumerate(items):
                arr[i].token, arr[i].bias = token, bias
            self._keep.append(arr)
            self._add(L.llama_sampler_init_logit_bias(model.info.n_vocab, len(items), arr))
        if _penalized(params):
            self._add(
                L.llama_sampler_init_penalties(
                    model.info.n_vocab,
                    params.repeat_last_n,
                    params.repeat_penalty,
                    params.frequency_penalty,
                    params.presence_penalty,
                )
            )
        if params.temperature <= 0:
            self._add(L.llama_sampler_init_greedy())
            return
        if params.top_k > 0:
            self._add(L.llama_sampler_init_top_k(params.top_k))
        if params.top_p < 1.0:
            self._add(L.llama_sampler_init_top_p(params.top_p, 1))
        if params.min_p > 0:
            self._add(L.llama_sampler_init_min_p(params.min_p, 1))
        self._add(L.llama_sampler_init_temp(params.temperature))
        seed = params.seed if params.seed is not None else random.getrandbits(32)
        self._add(L.llama_sampler_init_dist(seed & 0xFFFFFFFF))

    def _add(self, sampler: object) -> None:
        L.llama_sampler_chain_add(self.ptr, sampler)

    def sample(self, ctx: object, index: int) -> int:
        assert self.ptr is not None, "plain greedy decoding has no chain"
        return int(L.llama_sampler_sample(self.ptr, ctx, index))

    def close(self) -> None:
        if self.ptr:
            L.llama_sampler_free(self.ptr)
            self.ptr = None


def _penalized(params: SamplingParams) -> bool:
    return params.repeat_penalty != 1.0 or bool(params.frequency_penalty or params.presence_penalty)
