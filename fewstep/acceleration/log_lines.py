"""What Few-Step Accelerate's log lines about its background compiles look like, for reading a server log.

One home for the patterns: the benches that wait for the compiles through a real server read the log
with them, and the tests hold them to the messages GraphCache writes (fewstep.acceleration.graphs).
"""
from __future__ import annotations

import re

# A shape's compile handed to the worker, or the shape handed a compile of another batch size.
COMPILE_STARTED = re.compile(r"FewStepAccelerate: .* (compiles it in the background|switch to the code compiled in the "
                             r"background for batch size)")
# That compile's code captured.
COMPILED_CAPTURE = re.compile(r"FewStepAccelerate: captured (UNet|transformer|VAE decode) CUDA graph for .* \(compiled")
# A shape whose compiled code was read ahead from disk and captured at once (a restarted server): no compile
# was handed out for it.
READ_AHEAD_CAPTURE = re.compile(r"FewStepAccelerate: captured (UNet|transformer|VAE decode) CUDA graph for .* \(compiled.*"
                                r"used from the shape's first call")
# That compile will not be captured for the shape (a new COMPILE_STARTED line follows where it is retried).
COMPILE_ENDED_UNUSED = re.compile(
    r"FewStepAccelerate: .*(torch\.compile failed|compiled kernels could not be captured|does not take .*; compiling "
    r"this shape on its own|with a dynamic batch size failed|was interrupted and is not used|background compile for "
    r".* is dropped with its graph)")


def compiles_pending(log: str) -> int:
    """Compiles handed out in `log` whose code is neither captured nor given up."""
    captured = len(COMPILED_CAPTURE.findall(log)) - len(READ_AHEAD_CAPTURE.findall(log))
    return len(COMPILE_STARTED.findall(log)) - captured - len(COMPILE_ENDED_UNUSED.findall(log))
