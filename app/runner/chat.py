"""Chat prompts from the model's own Jinja template (GGUF or artifact), ChatML when it has none.

Templates come with the model, not from a trusted author: the runner renders them in a separate
process (app/runner/render.py), which bounds their time and memory. This module is what that
process runs, and what the runner uses to check at load that the template compiles.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# Far more than any context holds, far less than would hurt: request bodies stop at 10 MiB.
MAX_PROMPT_CHARS = 32 * 1024 * 1024


class TemplateError(ValueError):
    """The conversation does not fit the model's template (the message says why): a 400."""


class TemplateFailed(RuntimeError):
    """The template itself is broken, or ran past its limits (the message says how): a 500."""


def _raise(message: str) -> None:
    raise TemplateError(message)


class ChatTemplate:
    def __init__(self, source: str | None, bos_token: str, eos_token: str) -> None:
        # Hugging Face renders chat templates with these settings; templates are written for them.
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = _raise
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        self.source = source or CHATML
        try:
            self._template = env.from_string(self.source)
        except jinja2.TemplateError as exc:
            raise TemplateError(f"the model's chat template does not compile: {exc}") from None
        self.bos_token, self.eos_token = bos_token, eos_token

    def render(
        self,
        messages: list[dict[str, Any]],
        tools: list[Any] | None = None,
        max_chars: int = MAX_PROMPT_CHARS,
    ) -> str:
        parts: list[str] = []
        size = 0
        try:
            # Piece by piece, so a template that writes without end stops at the limit.
            for part in self._template.generate(
                messages=messages,
                tools=tools,
                add_generation_prompt=True,
                bos_token=self.bos_token,
                eos_token=self.eos_token,
            ):
                size += len(part)
                if size > max_chars:
                    raise TemplateError(
                        f"the chat template makes a prompt of more than {max_chars // 2**20} MiB "
                        "from these messages"
                    )
                parts.append(part)
        except TemplateError:
            raise
        except jinja2.TemplateError as exc:
            raise TemplateError(f"the chat template failed: {exc}") from None
        except (TypeError, KeyError, IndexError, AttributeError) as exc:
            raise TemplateError(f"the chat template cannot render these messages: {exc}") from None
        except MemoryError:
            raise TemplateFailed("the chat template ran out of memory") from None
        except Exception as exc:  # whatever else a template's Python raises is its own bug
            raise TemplateFailed(f"the chat template failed: {type(exc).__name__}: {exc}") from None
        return "".join(parts)
