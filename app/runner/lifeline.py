"""A runner never outlives the front that started it.

The front starts each runner with its stdin on a pipe whose write end only the front holds and
never writes to. When the front exits, however it exits (SIGKILL included), the kernel closes
that end and the runner reads end-of-file: it stops as on SIGTERM, and is gone for good shortly
after if its event loop is too stuck to stop.

This replaces ``prctl(PR_SET_PDEATHSIG)``: on a CUDA machine every runner that had made that
call died with SIGSEGV while llama.cpp loaded the model. A thread blocked in read(2) touches
nothing llama.cpp or the CUDA driver depend on.
"""

from __future__ import annotations

import os
import signal
import threading
import time

# How long a graceful stop may take before the runner is ended outright.
GRACE_S = 5.0


def watch(fd: int = 0, grace_s: float = GRACE_S) -> None:
    threading.Thread(target=_wait_for_eof, args=(fd, grace_s), name="lifeline", daemon=True).start()


def _wait_for_eof(fd: int, grace_s: float) -> None:
    try:
        while os.read(fd, 4096):
            pass  # the front writes nothing; whatever comes is ignored
    except OSError:
        pass  # a closed or broken descriptor means the same: the front is gone
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(grace_s)
    os._exit(1)
