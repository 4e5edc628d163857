"""One callable captured as a CUDA graph for one set of input shapes: warm-up, capture, replay."""
from __future__ import annotations

import contextlib
import logging
import time
from typing import Callable, Sequence

import torch

from .compiler import kernel_launches_by_address
from .open_blocks import OpenBlocks
from .signatures import WeightSnapshot

log = logging.getLogger("fewstep.acceleration")

# Eager runs on a side stream before capturing: lazy initialisation (cuBLAS handles and workspaces,
# cuDNN's algorithm choice, SDPA's backend) must happen outside the graph (PyTorch CUDA Graphs notes:
# "warm up on a side stream before capture"). Three is what the PyTorch notes' examples use.
WARMUP_RUNS = 3


def cuda_graph_unavailable_reason(device: torch.device | str) -> str | None:
    """Why CUDA graphs cannot run on `device`, or None when they can."""
    device = torch.device(device)
    if device.type != "cuda":
        return f"CUDA graphs need a CUDA device and this runs on {device.type}"
    if not torch.cuda.is_available():
        return "CUDA graphs need a CUDA device and torch sees none"
    if torch.cuda.is_current_stream_capturing():
        return "a CUDA graph is already being captured on this stream"
    return None



class CapturedGraph:
    """One callable captured as a CUDA graph for one set of input shapes.

    `function(*inputs)` must return one tensor and only read tensors that stay where they are
    (its inputs, which are copied into static buffers, and the module's weights). `compiled`: the
    function is compiled code (CompileJob.runnable); `before_capture` runs after the warm-up runs and
    may refuse the capture by raising.
    """

    def __init__(self, function: Callable[..., torch.Tensor], inputs: Sequence[torch.Tensor | None],
                 module: torch.nn.Module, pool, autotune: bool, compiled: bool = False,
                 warmup_runs: int = WARMUP_RUNS, before_capture: Callable[[], None] | None = None):
        started = time.perf_counter()
        self.static_inputs = [None if x is None else x.clone() for x in inputs]
        self.snapshot = WeightSnapshot(module)
        self.compiled, self.autotuned = compiled, autotune
        # Compiled code whose kernels the graph launches stays referenced while the graph lives (a saved
        # compile loaded from disk is owned by no Dynamo cache).
        self.code = function if compiled else None
        benchmark = torch.backends.cudnn.benchmark
        # cuDNN's benchmark mode times each convolution's algorithms for this shape during warm-up
        # and caches the choice, which the capture then records; it is switched back afterwards so
        # eager code elsewhere in the process is unaffected.
        torch.backends.cudnn.benchmark = autotune or benchmark
        try:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for run in range(warmup_runs):
                    with host_syncs_are_errors() if run == warmup_runs - 1 else contextlib.nullcontext():
                        function(*self.static_inputs)
            torch.cuda.current_stream().wait_stream(side)
            if before_capture is not None:
                before_capture()
            self.graph = torch.cuda.CUDAGraph()
            launches = kernel_launches_by_address() if compiled else contextlib.nullcontext()
            # thread_local: another thread's CUDA calls (a server's, the compile worker's) don't
            # invalidate this capture.
            with launches, torch.cuda.graph(self.graph, pool=pool, capture_error_mode="thread_local"):
                self.static_output = function(*self.static_inputs)
        finally:
            torch.backends.cudnn.benchmark = benchmark
        if not isinstance(self.static_output, torch.Tensor):
            raise TypeError(f"captured function returned {type(self.static_output).__name__}, not a tensor")
        torch.cuda.current_stream().synchronize()
        self.capture_seconds = time.perf_counter() - started

    def __call__(self, inputs: Sequence[torch.Tensor | None]) -> torch.Tensor:
        """Replay on `inputs`; returns the static output itself: copy it before the next replay."""
        for static, value in zip(self.static_inputs, inputs):
            if static is not None:
                static.copy_(value)
        self.graph.replay()
        return self.static_output


# What torch raises for a synchronising operation while its sync debug mode is "error".
HOST_SYNC_REFUSED = "called a synchronizing CUDA operation"
# How long refused work waits for the checks to end before it runs again: a check lasts one warm-up run
# (well under a second for the models the pack accelerates).
SYNC_CHECK_WAIT_S = 30.0
# Refused work runs again this many times at most: a later attempt is refused only if another capture's
# check starts meanwhile.
SYNC_CHECK_RETRIES = 2


# How many host_syncs_are_errors blocks are open, for refused work to wait until none is.
SYNC_CHECKS = OpenBlocks()


@contextlib.contextmanager
def host_syncs_are_errors():
    """Within: an operation that waits for the GPU (.item(), .cpu(), nonzero, …) raises.

    Such an operation cannot be captured, and a capture it breaks off half-way can take the process
    down under the cudaMallocAsync allocator (the capture's memory is then freed on a stream whose
    capture failed, inside a tensor's deleter). The last warm-up run checks for it, so such a
    function is never captured at all.

    torch's switch is process-wide: while it is on, a wait for the GPU on any other thread (the compile
    worker's, the read-ahead's) is refused as well. Those threads wait through events, which it does not
    count (wait_for), and work refused all the same is done again once no check is open
    (retried_after_sync_checks).
    """
    with SYNC_CHECKS.open():
        previous = torch.cuda.get_sync_debug_mode()
        torch.cuda.set_sync_debug_mode("error")
        try:
            yield
        finally:
            torch.cuda.set_sync_debug_mode(previous)


def interrupted_by_a_sync_check(error: BaseException) -> bool:
    """Whether `error` is torch refusing a wait for the GPU under host_syncs_are_errors. Raised on a
    thread that never turns the check on, it says only that the prompt thread was checking a warm-up
    run at that moment, not that anything is wrong with the work that was refused."""
    return isinstance(error, RuntimeError) and HOST_SYNC_REFUSED in str(error)


def retried_after_sync_checks(action: Callable[[], object], again: str, retries: int = SYNC_CHECK_RETRIES):
    """`action()`, run again once no check is open where a check refused one of its waits for the GPU
    (`retries` times at most, each said in the log with `again`); any other error is raised at once."""
    for attempt in range(1 + retries):
        try:
            return action()
        except RuntimeError as error:
            if not interrupted_by_a_sync_check(error) or attempt == retries:
                raise
            log.info("FewStepAccelerate: a wait for the GPU was refused while a capture checked its warm-up "
                     "for such waits (%s); %s", str(error).splitlines()[0][:200], again)
            SYNC_CHECKS.wait_until_none(SYNC_CHECK_WAIT_S)


def wait_for(stream: torch.cuda.Stream) -> None:
    """Wait on the host until the work queued on `stream` is done, through an event: torch's sync debug
    mode counts a stream's synchronisation, which another thread's host_syncs_are_errors would refuse,
    and not an event's."""
    done = torch.cuda.Event()
    done.record(stream)
    done.synchronize()
