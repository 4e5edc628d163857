"""A count of open `with` blocks that other threads can wait on."""
from __future__ import annotations

import contextlib
import threading
import time


class OpenBlocks:
    """How many blocks of one kind are open, and since when none is.

    Serves both the running accelerated prompts (the compile worker waits for a quiet moment) and the
    open host-sync checks (work they refused waits for them to close).
    """

    def __init__(self):
        self._condition = threading.Condition()
        self._open = 0
        self._last_end = 0.0

    @contextlib.contextmanager
    def open(self):
        with self._condition:
            self._open += 1
        try:
            yield
        finally:
            with self._condition:
                self._open -= 1
                self._last_end = time.monotonic()
                self._condition.notify_all()

    def wait_until_none(self, timeout: float) -> bool:
        """Wait until no block is open; False if `timeout` passed first."""
        with self._condition:
            return self._condition.wait_for(lambda: self._open == 0, timeout)

    def wait_until_quiet(self, seconds: float) -> None:
        """Wait until no block is open and none has closed for `seconds`."""
        with self._condition:
            while True:
                if self._open == 0:
                    remaining = self._last_end + seconds - time.monotonic()
                    if remaining <= 0:
                        return
                    self._condition.wait(remaining)
                else:
                    self._condition.wait()
