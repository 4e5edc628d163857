"""Process-wide settings held changed by overlapping blocks on several threads."""
from __future__ import annotations

import contextlib
import sys
import threading
from typing import Any, Callable


class HeldSetting:
    """A process-wide setting that blocks (on any thread, overlapping) hold at a value of their own.

    The first block saves the setting's value; the value while any block is open is `combine` of the
    saved one and every open block's; the saved value comes back when the last block ends, whatever the
    order in which they end.
    """

    def __init__(self, read: Callable[[], Any], write: Callable[[Any], None],
                 combine: Callable[[Any, list], Any]):
        self._read, self._write, self._combine = read, write, combine
        self._lock = threading.Lock()
        self._saved: Any = None
        self._held: list = []

    @contextlib.contextmanager
    def held(self, value):
        with self._lock:
            if not self._held:
                self._saved = self._read()
            self._held.append(value)
            self._write(self._combine(self._saved, self._held))
        try:
            yield
        finally:
            with self._lock:
                self._held.remove(value)
                self._write(self._combine(self._saved, self._held) if self._held else self._saved)


# Python's GIL switch interval: the shortest any block asks for.
SWITCH_INTERVAL = HeldSetting(sys.getswitchinterval, sys.setswitchinterval,
                              lambda saved, held: min([saved, *held]))


def shorter_switch_interval(seconds: float):
    """Within: Python's GIL switch interval at most `seconds` (process-wide)."""
    return SWITCH_INTERVAL.held(seconds)


def _compile_threads() -> Any:
    import torch._inductor.config

    return torch._inductor.config.compile_threads


def _set_compile_threads(value) -> None:
    import torch._inductor.config

    torch._inductor.config.compile_threads = value


# Inductor's compile threads (None: decided at its first compile). At 1, Inductor starts no pool of
# compile worker processes.
COMPILE_THREADS = HeldSetting(_compile_threads, _set_compile_threads, lambda saved, held: 1)


# Held by an Inductor compile on the worker thread, or by a load that holds the compile threads at 1:
# a compile that began with worker processes would, at 1, take its kernels' futures for the kernels.
_INDUCTOR = threading.Lock()


@contextlib.contextmanager
def inductor_compiling():
    """Within: this thread may compile with Inductor; no load holds its compile threads at 1 meanwhile."""
    with _INDUCTOR:
        yield


@contextlib.contextmanager
def no_compile_worker_processes():
    """Within: code Inductor compiled earlier is loaded without starting its compile worker processes.

    Loading a saved compile runs its generated module, which asks Inductor for each Triton kernel
    whether its pool of compile workers is ready, and that first question starts the pool: one process
    per CPU core, each importing torch for seconds, beside the restarted server's first prompts, which
    ran slower until they settled (bench/RESULTS.md). A saved compile's kernels are built already and load
    in this process either way (the pool is not ready while they do); a later compile starts the pool
    when it needs one. While a compile runs, its pool is wanted, and the load leaves the setting alone.
    """
    if not _INDUCTOR.acquire(blocking=False):
        yield
        return
    try:
        with COMPILE_THREADS.held(1):
            yield
    finally:
        _INDUCTOR.release()
