"""torch.compile off the prompt's path: a worker thread compiles each part for each input shape while
prompts keep running on CUDA graphs of the eager kernels; the compiled code is captured once it is ready.

Compiling the SDXL UNet for one shape takes minutes; capturing its eager kernels takes a second or two.
So the first prompt of a new size never waits for the compiler. Dynamo compiles by running the
function, so the worker runs it on copies of the inputs, on its own CUDA stream, under the grad and
inference modes of the prompt that asked (Dynamo guards on them, and they are per thread). The
prompt thread then calls the compiled function through `torch._dynamo.run`, which uses compiled code
but never compiles: if a guard no longer matches, the function runs eagerly instead of compiling
on the prompt's time, and the job sees that its compiled code did not run.

cuDNN's autotuning cannot move to the worker: PyTorch keeps its benchmark results per thread, and its
switch (torch.backends.cudnn.benchmark) is process-wide, so setting it there would make the prompt
thread's own first runs autotune instead.

Where the part's call has a saveable form (fewstep.acceleration.saved_compiles), the worker compiles it
ahead of time and saves it, or loads what an earlier server saved for the same call: a restarted server
then skips Dynamo's tracing, most of a compile's time once Inductor's cache is warm.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import queue
import threading
import time
from typing import Callable, Sequence

import torch

from .captured_graph import interrupted_by_a_sync_check, retried_after_sync_checks, wait_for
from .compiler import COMPILE_OPTIONS, compile_config
from .open_blocks import OpenBlocks
from .process_settings import shorter_switch_interval
from .saved_compiles import PRELOAD_FILES, STORE, SavedForm, aot_compile, compile_key, refusal

log = logging.getLogger("fewstep.acceleration")

# The worker starts a job only once the prompt thread has been out of every accelerated run (sampling,
# decode) this long: Dynamo's tracing is Python and holds the GIL, and started in the middle of a
# prompt it made that prompt's next capture (the VAE decoder's, seconds later) several times slower.
QUIET_SECONDS = 1.0
# While a job runs, Python's GIL switch interval (default 5 ms) is shortened to this. The compiling
# thread is busy Python for minutes; the prompt thread drops the GIL at every wait for the GPU and C
# call that releases it, hundreds of times a prompt, and each time must wait up to one interval to get
# it back from the compiler: with the default, a prompt sent during a compile took seconds instead of a
# tenth of one. A shorter interval costs the compiling thread little: it is asked to switch only when
# another thread waits.
COMPILE_SWITCH_INTERVAL_S = 0.0002
# How long a prompt waits for a saved compile of its call that is being read ahead (a restarted server's
# first prompt, SavedCompiles.preload_recent) before it captures the eager kernels instead: about what
# that capture takes for the SDXL UNet, so waiting costs the first image little and saves the switch.
PRELOAD_WAIT_S = 3.0
# The worker, which has nothing better to do, waits for a reading in progress rather than reading twice.
WORKER_PRELOAD_WAIT_S = 120.0


# Whether an accelerated run is going on, and since when none is (for the worker to wait on).
ACTIVITY = OpenBlocks()

# The first run compiles (Inductor also times its kernels' launch configurations there); the second
# runs the finished code once, so the prompt thread's capture finds nothing left to do.
COMPILE_RUNS = 2


class CompiledCodeNotUsed(RuntimeError):
    """The compiled code's guards did not match the call that was to capture it."""


class CompileJob:
    """One function compiled by `backend` for one set of input shapes, on the worker thread."""

    def __init__(self, function: Callable[..., torch.Tensor], inputs: Sequence[torch.Tensor | None], backend,
                 dynamic_batch: bool = False, saved_form: SavedForm | None = None, store=None):
        self.inputs = [None if x is None else x.clone() for x in inputs]
        # With `dynamic_batch`, the compiled code takes any batch size above 1 (Dynamo specialises sizes 0
        # and 1), so a new batch size reuses it instead of compiling for minutes again. Marked "maybe":
        # where the model's code fixes the batch size, Dynamo specialises it instead of failing.
        self.batch = self.inputs[0].shape[0] if self.inputs and self.inputs[0] is not None and self.inputs[0].ndim else None
        self.dynamic_batch = bool(dynamic_batch and self.batch is not None and self.batch > 1)
        if self.dynamic_batch:
            for x in self.inputs:
                if x is not None and x.ndim and x.shape[0] == self.batch:
                    torch._dynamo.maybe_mark_dynamic(x, 0)
        self.grad_enabled = torch.is_grad_enabled()
        self.inference_mode = torch.is_inference_mode_enabled()
        self.compiled_runs = 0  # calls of the compiled graphs, whichever thread makes them
        # Of `seconds`, the time spent in the backend (AOTAutograd and Inductor, or their caches'
        # loading); the rest is Dynamo tracing the Python and the runs: what a warm cache cannot save.
        self.backend_seconds = 0.0
        self.compiled = torch.compile(function, backend=self._counting(backend),
                                      dynamic=None if self.dynamic_batch else False, fullgraph=False)
        # The ahead-of-time path (a backend given by name: a wrapped one cannot be saved).
        self.saved_form = saved_form if isinstance(backend, str) else None
        self.backend_name = backend if isinstance(backend, str) else None
        self.store = store if store is not None else STORE
        self.key = (compile_key(self.saved_form, self.inputs, self.dynamic_batch, self.backend_name)
                    if self.saved_form is not None else None)
        self.saved = None  # the ahead-of-time compiled function, loaded or compiled here
        self.loaded = False  # it was loaded from disk
        self.load_seconds: float | None = None  # where read ahead: the reading's time (before `seconds`)
        self.saved_path = None  # where it was saved for later servers
        self.save_problem: str | None = None  # why it was not saved (the usual compile ran instead)
        self.load_problem: str | None = None  # why a file saved for this call was not used
        self.error: BaseException | None = None
        self.seconds: float | None = None
        self.cancelled = False
        self._done = threading.Event()

    def _counting(self, backend):
        """`backend`, with each graph it compiles counting its calls in `compiled_runs`."""
        backend = backend_function(backend)

        def compile_counting(graph_module, example_inputs):
            started = time.perf_counter()
            compiled = backend(graph_module, example_inputs)
            self.backend_seconds += time.perf_counter() - started

            @functools.wraps(compiled)
            def run(*args):
                self.compiled_runs += 1
                return compiled(*args)

            return run

        return compile_counting

    def done(self) -> bool:
        return self._done.is_set()

    def run(self) -> None:
        """On the worker thread: compile, run the compiled code once more, release the inputs."""
        started = time.perf_counter()
        try:
            # A wait refused by a capture's check on the prompt thread (torch's switch for it is
            # process-wide; captured_graph.host_syncs_are_errors): nothing wrong with the job.
            retried_after_sync_checks(self._run_once, "running the compile again after it")
        except BaseException as error:  # reported by the cache on the prompt thread, never raised here
            self.error = error
        finally:
            self.inputs = None  # the copies' memory goes back before anyone waits on this job
            self.seconds = time.perf_counter() - started
            self._done.set()

    def _run_once(self) -> None:
        if self.cancelled:
            return
        device = next((x.device for x in self.inputs if x is not None), torch.device("cpu"))
        # Its own stream: the prompt thread may be capturing a graph meanwhile, and work on the
        # legacy default stream would synchronise with the capturing stream and break it.
        stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        with (torch.inference_mode(self.inference_mode), torch.set_grad_enabled(self.grad_enabled),
              torch._dynamo.config.patch(**compile_config()),
              torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()):
            if self.saved_form is not None and self.saved is None and self.save_problem is None:
                self._compile_saved()  # once: where it could not be, the usual compile runs instead
            compiled, inputs = self.compiled, self.inputs
            if self.saved is not None:  # called as the prompt thread will: on unmarked tensors
                compiled, inputs = self.runnable(), unmarked(self.inputs)
            for _ in range(COMPILE_RUNS):
                compiled(*inputs)
        if stream is not None:
            wait_for(stream)

    def _compile_saved(self) -> None:
        """`saved`: loaded from disk, or compiled ahead of time and saved; left None where torch cannot
        (a graph break, an object it cannot save), for the usual compile to run."""
        form, key = self.saved_form, self.key
        taken = self.store.take_preloaded(key, WORKER_PRELOAD_WAIT_S, self.inference_mode)
        if taken is not None:
            (function, self.load_seconds), why = taken, None
        else:
            function, why = self.store.load(key)
        if function is not None:
            why = refusal(function, (*form.leading, *unmarked(self.inputs)))
            function = function if why is None else None
        if function is not None:
            self.saved, self.loaded = function, True
            return
        if why != "none saved":
            self.load_problem = why
        try:
            options = COMPILE_OPTIONS if self.backend_name == "inductor" else None
            function = aot_compile(form, self.inputs, self.backend_name, options,
                                   dynamic=None if self.dynamic_batch else False)
        except Exception as error:
            if interrupted_by_a_sync_check(error):
                raise  # nothing wrong with the form: the job runs again (run)
            log.debug("FewStepAccelerate: the ahead-of-time compile failed", exc_info=True)
            self.save_problem = f"torch cannot compile it in a form it can save ({first_line(error)})"
            return
        self.saved, self.backend_seconds = function, None  # not measured apart on this path
        try:
            self.saved_path = retried_after_sync_checks(lambda: self.store.save(key, function),
                                                        "saving the compile again after it")
        except Exception as error:  # a full disk, a read-only folder: used now, compiled again next time
            self.save_problem = f"saving it failed ({first_line(error)})"

    def use_preloaded(self, timeout: float = PRELOAD_WAIT_S) -> bool:
        """On the prompt thread, for a call an earlier server compiled: where its saved compile was read
        ahead (waiting up to `timeout` for a reading in progress) and its guards take the call, make it
        this job's code and run it as the worker would, and say True. False with nothing run where none
        was read ahead or its guards refuse the call (the usual path then reads the file again and says
        why it is not used); False after the runs where they failed (`error` says why)."""
        if self.key is None:
            return False
        taken = self.store.take_preloaded(self.key, timeout, self.inference_mode)
        if taken is None:
            return False
        function, seconds = taken
        with torch.inference_mode(self.inference_mode), torch.set_grad_enabled(self.grad_enabled):
            refused = refusal(function, (*self.saved_form.leading, *unmarked(self.inputs)))
        if refused is not None:
            return False
        self.saved, self.loaded, self.load_seconds = function, True, seconds
        self.run()
        return self.error is None

    def saved_on_disk(self) -> bool:
        """Whether a compile saved for this call is there to load (its fit is checked when loading)."""
        return self.key is not None and self.store.path(self.key).exists()

    def runnable(self) -> Callable[..., torch.Tensor]:
        """The compiled function as the prompt thread calls it: compiled code only, never a compile."""
        if self.saved is None:
            return torch._dynamo.run(self.compiled)
        saved, leading = self.saved, self.saved_form.leading

        def run_saved(*tensors):
            if not saved.guard_check(*leading, *tensors):
                raise CompiledCodeNotUsed("the compiled code's guards did not match the prompt's call")
            self.compiled_runs += 1
            return saved(*leading, *tensors)

        return run_saved

    def check_compiled_code_ran(self, runs_before: int) -> None:
        if self.compiled_runs == runs_before:
            raise CompiledCodeNotUsed(
                "the compiled code's guards did not match the prompt's call (the model or its settings "
                "changed while it compiled)")


def unmarked(inputs: Sequence[torch.Tensor | None]) -> list:
    """The same tensors without Dynamo's dynamic-dimension marks (saved guards compare those too)."""
    return [None if x is None else x.detach() for x in inputs]


def first_line(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}".splitlines()[0][:300]


def backend_function(backend):
    """A torch.compile backend name as the function Dynamo calls; Inductor with COMPILE_OPTIONS."""
    if backend == "inductor":
        from torch._inductor.compile_fx import compile_fx

        return functools.partial(compile_fx, config_patches=COMPILE_OPTIONS)
    return torch._dynamo.lookup_backend(backend) if isinstance(backend, str) else backend


class CompileWorker:
    """One daemon thread running CompileJobs in turn.

    One at a time: two compiles at once would not finish sooner (they share the CPU and the GIL) and
    would each hold a copy of the activations. A daemon thread, so that a server stopped mid-compile
    exits at once instead of waiting minutes for it.
    """

    def __init__(self):
        self._queue: queue.Queue[CompileJob] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._running = threading.Lock()  # held while a job runs

    def submit(self, job: CompileJob) -> CompileJob:
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._serve, name="fewstep-compile", daemon=True)
                self._thread.start()
        self._queue.put(job)
        return job

    def wait_until_idle(self, timeout: float | None = None) -> bool:
        """Wait until every submitted job has finished (for benchmarks and tests); False on timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._queue.all_tasks_done:
            while self._queue.unfinished_tasks:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                self._queue.all_tasks_done.wait(remaining)
        return True

    def _serve(self) -> None:
        while True:
            job = self._queue.get()
            try:
                # Loading a saved compile traces nothing (the tracing is what slowed a running prompt), so it
                # starts at once: a restarted server's first prompt is still running while it loads.
                saved_on_disk = getattr(job, "saved_on_disk", None)
                if not (callable(saved_on_disk) and saved_on_disk()):
                    ACTIVITY.wait_until_quiet(QUIET_SECONDS)
                with self._running, shorter_switch_interval(COMPILE_SWITCH_INTERVAL_S):
                    job.run()
            finally:
                self._queue.task_done()

    @contextlib.contextmanager
    def paused(self):
        """Yields True, with no job running until the block ends, or False where a job is running now.

        Compiled code must not run on another thread while the worker compiles: torch.fx marks that
        it is tracing in a process-wide flag, and Dynamo refuses to run compiled code while it is set
        ("Detected that you are using FX to symbolically trace a dynamo-optimized function").
        """
        acquired = self._running.acquire(blocking=False)
        try:
            yield acquired
        finally:
            if acquired:
                self._running.release()


WORKER = CompileWorker()


def read_ahead_saved_compiles() -> list[str]:
    """Start reading the most recently used saved compiles (SavedCompiles.preload_recent), once per
    process: called when a prompt with Few-Step Accelerate is queued, so that a restarted server's first
    prompt finds them read while it loads its models. The reading is Python beside the running prompt,
    hence the compile's GIL interval."""
    return STORE.preload_recent(PRELOAD_FILES, around=functools.partial(shorter_switch_interval,
                                                                        COMPILE_SWITCH_INTERVAL_S))
