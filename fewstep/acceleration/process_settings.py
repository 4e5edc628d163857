"""Process-wide state that the pack holds changed for a while, from blocks on several threads that may
overlap: each comes back as it was when the last block ends."""
from __future__ import annotations

import contextlib
import sys
import threading
from concurrent.futures import Future
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
            saved = self._read() if not self._held else self._saved
            self._write(self._combine(saved, [*self._held, value]))  # raises before anything is held
            self._saved = saved
            self._held.append(value)
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


class CompileWorkersHeldBack:
    """Within `held()`: Inductor's pool of compile worker processes is not started.

    Loading a saved compile runs its generated module, which asks Inductor for each Triton kernel
    whether the pool is ready (`AsyncCompile.use_process_pool`), and the first such question starts it:
    a process per CPU core, each importing torch for seconds, beside the restarted server's first
    prompts, which ran slower until they settled (bench/RESULTS.md). A saved compile's kernels are built
    already and load in this process either way: the pool is not ready while they do.

    Inductor takes the pool as not ready while its readiness future is pending; this puts a pending one
    in place of none (a pool already started is left alone). Inductor's compile settings cannot do it:
    in some torch versions they are per thread, in others process-wide, where a compile running on
    another thread would see them change half-way. A compile that runs meanwhile builds its kernels in
    its own thread, and one that waits for the pool to be ready waits until the block ends; the next
    compile after it starts the pool as usual.
    """

    def __init__(self):
        self._lock = threading.Lock()
        self._blocks = 0
        self._pending: Future | None = None

    @staticmethod
    def _async_compile():
        try:
            from torch._inductor.async_compile import AsyncCompile
        except Exception:  # a torch without Inductor: no pool to hold back
            return None
        return AsyncCompile if hasattr(AsyncCompile, "_ready_future") else None

    @contextlib.contextmanager
    def held(self):
        async_compile = self._async_compile()
        if async_compile is None:
            yield
            return
        with self._lock:
            if self._blocks == 0 and async_compile._ready_future is None:
                self._pending = Future()
                async_compile._ready_future = self._pending
            self._blocks += 1
        try:
            yield
        finally:
            with self._lock:
                self._blocks -= 1
                if self._blocks == 0 and self._pending is not None:
                    if async_compile._ready_future is self._pending:
                        async_compile._ready_future = None
                    self._pending.set_result("held back")  # whoever waits for the pool asks again
                    self._pending = None


COMPILE_WORKERS = CompileWorkersHeldBack()


def no_compile_worker_processes():
    """Within: code Inductor compiled earlier loads without starting Inductor's compile worker processes
    (CompileWorkersHeldBack)."""
    return COMPILE_WORKERS.held()
