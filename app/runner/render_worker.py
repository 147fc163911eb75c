"""The render worker: ``python -m app.runner.render_worker RUNNER_PID``, started by
app/runner/render.py. It renders chat templates, one at a time, for as long as its runner lives.

Wire format: the runner sends length-prefixed JSON objects (the template first, then one per
render); the worker answers each render with a status byte, a length, and the payload: the
prompt as UTF-8, or the error message. Only the standard library and Jinja are imported here:
every worker costs the runner its memory.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import math
import os
import resource
import signal
import struct
import sys
from typing import IO

from app.runner.chat import ChatTemplate, TemplateError, TemplateFailed

CPU_S = 3  # per render; legitimate ones take milliseconds (40,000 messages: 0.05 s)
MEMORY_LIMIT = 1 << 30  # the worker's address space
OK, REJECTED, FAILED = 0, 1, 2  # answers: the prompt, a 400's message, a 500's message
CPU_EXIT = 3  # the exit status when a render ran out of CPU time
HEADER = struct.Struct(">BI")  # an answer's status and length
LENGTH = struct.Struct(">I")  # a request's length


def main(parent: int) -> None:
    _die_with(parent)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a terminal's Ctrl-C is the runner's to handle
    signal.signal(signal.SIGXCPU, lambda *_: os._exit(CPU_EXIT))
    _limit(resource.RLIMIT_CORE, 0)
    _limit(resource.RLIMIT_AS, MEMORY_LIMIT)
    source, out = sys.stdin.buffer, sys.stdout.buffer
    setup = _read(source)
    if setup is None:
        return
    config = json.loads(setup)
    template = ChatTemplate(config["source"], config["bos"], config["eos"])
    while True:
        _cpu_budget(CPU_S)
        request = _read(source)
        if request is None:
            return  # the runner closed the pipe: it is stopping
        status, payload = _answer(template, request)
        out.write(HEADER.pack(status, len(payload)) + payload)
        out.flush()


def _answer(template: ChatTemplate, request: bytes) -> tuple[int, bytes]:
    try:
        fields = json.loads(request)
        text = template.render(fields["messages"], fields["tools"])
        return OK, text.encode("utf-8", "replace")
    except TemplateError as exc:
        return REJECTED, str(exc).encode("utf-8", "replace")
    except TemplateFailed as exc:
        return FAILED, str(exc).encode("utf-8", "replace")
    except MemoryError:  # decoding the request, or encoding the prompt
        return FAILED, b"the chat template ran out of memory"


def _read(source: IO[bytes]) -> bytes | None:
    head = source.read(LENGTH.size)
    if len(head) < LENGTH.size:
        return None
    (size,) = LENGTH.unpack(head)
    return source.read(size)


def _cpu_budget(seconds: int) -> None:
    """From now, the worker may use ``seconds`` more of CPU time (whole seconds: the kernel's
    unit), then SIGXCPU. Set per render: the limit counts the process's whole life."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    _limit(resource.RLIMIT_CPU, math.ceil(usage.ru_utime + usage.ru_stime) + seconds)


def _limit(kind: int, soft: int) -> None:
    _, hard = resource.getrlimit(kind)
    resource.setrlimit(kind, (soft if hard == resource.RLIM_INFINITY else min(soft, hard), hard))


def _die_with(parent: int) -> None:
    with contextlib.suppress(OSError, AttributeError):  # Linux only; elsewhere stdin's EOF does
        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:  # the runner was gone before the line above took effect
        os._exit(0)


if __name__ == "__main__":
    main(int(sys.argv[1]))
