"""The per-part cache of CUDA graphs, one per input shape: capture (captured_graph), the weight check, the
compiled code that replaces a shape's first graph, the least recently used dropped."""
from __future__ import annotations

import contextlib
import logging
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from .background import ACTIVITY, WORKER, CompiledCodeNotUsed, CompileJob, first_line
from .saved_compiles import STORE, compile_key
from .signatures import WeightSnapshot, batch_free, batch_size, describe, tensor_signature  # noqa: F401 — re-exported
from .compiler import NATIVE_ALLOCATOR_FLAG, STREAM_ORDERED_ALLOCATOR, allocator_backend
from .captured_graph import CapturedGraph, cuda_graph_unavailable_reason  # noqa: F401 — re-exported

log = logging.getLogger("fewstep.acceleration")

# Compiled code was already run twice by the compile worker (fewstep.acceleration.background): on the
# capturing thread it needs one run for the lazy initialisation and one checked for host syncs.
COMPILED_WARMUP_RUNS = 2
DEFAULT_MAX_SHAPES = 4


@dataclass
class CaptureRecord:
    part: str  # "UNet" or "VAE decode"
    signature: tuple
    seconds: float  # on the prompt's time: warm-up runs and capture
    compiled: bool = False
    compile_seconds: float | None = None  # in the background, before a compiled capture
    backend_seconds: float | None = None  # of compile_seconds, in AOTAutograd and Inductor (or their caches)


@dataclass
class GraphCache:
    """Captured graphs of one part (the UNet, the VAE decoder) by input signature.

    A new signature is captured at once with the eager kernels; with `compile_backend` set, the
    function is also handed to the compile worker, and the first call after it finished captures the
    compiled code in place of the first graph (fewstep.acceleration.background). With `autotune`,
    cuDNN times the convolutions in the capture of the graph that stays: the compiled one where
    compiling, else the first (a wait of seconds to tens of seconds on the prompt thread, once per shape:
    PyTorch keeps cuDNN's results per thread, so the worker cannot do it).
    At most `max_shapes` graphs are kept (least recently used dropped). All share one memory pool:
    they never run at once and each output is copied out before the next replay.
    """

    part: str
    max_shapes: int = DEFAULT_MAX_SHAPES
    autotune: bool = True
    compile_backend: str | None = None  # e.g. COMPILE_BACKEND: compile each shape in the background
    passthrough: tuple = ()  # exception types raised on, not fallen back from (a user's Cancel)
    graphs: OrderedDict = field(default_factory=OrderedDict)
    failures: dict = field(default_factory=dict)  # signature → why capture failed (not retried)
    compiling: dict = field(default_factory=dict)  # signature → CompileJob not yet captured
    compile_failures: dict = field(default_factory=dict)  # signature → why compiled code is not used
    # batch_free(signature) → the CompileJob whose compiled code takes any batch size above 1 there;
    # a new batch size of that call is handed it instead of a compile of its own.
    batch_compiles: dict = field(default_factory=dict)
    shared: set = field(default_factory=set)  # signatures handed a job of batch_compiles, not their own
    reuse_refused: set = field(default_factory=set)  # signatures to compile on their own, for their own batch size
    captures: list = field(default_factory=list)  # CaptureRecord per capture, in order
    eager_calls: int = 0
    pool: object = None  # torch.cuda.graph_pool_handle() shared by this cache's graphs
    on_change: Callable[[], None] | None = None  # called after each capture (what the graphs hold changed)
    _trusted: set | None = None  # graphs whose weights were checked in the current sampling run
    _said: set = field(default_factory=set)

    def run(self, signature: tuple, function: Callable[..., torch.Tensor],
            inputs: Sequence[torch.Tensor | None], module: torch.nn.Module,
            compiler_form: Callable[[], Callable[..., torch.Tensor]] | None = None,
            saved_form: Callable[[], object] | None = None) -> torch.Tensor | None:
        """The graph's output for `inputs` (capturing it the first time), or None: run eagerly.

        `compiler_form` makes the function the compiler is given, where it differs from `function`
        (the VAE decoder's operations in the forms Inductor makes fast, on a copy of the module that
        shares its weights; see nodes/acceleration.py). The eager kernels are captured from `function`.
        `saved_form` makes the SavedForm of the compiler's function, where its compile can be saved to
        disk and loaded by a restarted server (fewstep.acceleration.saved_compiles).
        """
        if signature in self.failures:
            return None
        graph = self.graphs.get(signature)
        if graph is not None and not self._weights_still_captured(graph):
            self.say(f"{self.part}: the model's weights moved since capture (re-patched or reloaded); re-capturing")
            del self.graphs[signature]
            graph = None
        job = self.compiling.get(signature)
        if job is not None and job.done():
            with WORKER.paused() as paused:
                if paused:  # else the worker is compiling another shape: capture at a later call
                    del self.compiling[signature]
                    graph = self._capture_compiled(signature, job, inputs, module) or graph
                    if graph is not None and not graph.compiled and signature in self.reuse_refused:
                        self._compile_in_background(signature, function, compiler_form, inputs, saved_form)
        if graph is None and signature not in self.graphs:
            graph = self._capture_read_ahead(signature, function, compiler_form, inputs, module, saved_form)
        if graph is None:
            graph = self._capture(signature, function, inputs, module)
            if graph is None:
                return None
            self._compile_in_background(signature, function, compiler_form, inputs, saved_form)
        self.graphs.move_to_end(signature)
        try:
            return graph(inputs)
        except self.passthrough:
            raise
        except Exception as error:  # e.g. out of memory for a graph's allocations at its first replay
            del self.graphs[signature]
            self._give_up(signature, f"replay failed for {describe(signature)}", error)
            return None

    @contextlib.contextmanager
    def one_run(self):
        """One run (a sampling run, a decode): weights don't move within it, so each graph's are checked
        once; and the compile worker waits for it to end (fewstep.acceleration.background)."""
        self._trusted = set()
        try:
            with ACTIVITY.open():
                yield
        finally:
            self._trusted = None

    def _weights_still_captured(self, graph: CapturedGraph) -> bool:
        if self._trusted is not None and id(graph) in self._trusted:
            return True
        if not graph.snapshot.unchanged():
            return False
        if self._trusted is not None:
            self._trusted.add(id(graph))
        return True

    def replayable(self, signature: tuple) -> bool:
        """Whether a kept graph for `signature` would replay (in its own memory pool), not be re-captured."""
        graph = self.graphs.get(signature)
        return graph is not None and self._weights_still_captured(graph)

    def _capture_read_ahead(self, signature, function, compiler_form, inputs, module, saved_form):
        """A call an earlier server compiled and saved, its file read ahead (a restarted server's first
        prompt; SavedCompiles.preload_recent): its compiled code captured at once, with no graph of the
        eager kernels before it and no job for the worker. None where there is none, or it does not fit."""
        if (self.compile_backend is None or saved_form is None or not STORE.reading_ahead()
                or signature in self.compiling or signature in self.compile_failures):
            return None
        batch = batch_size(inputs)
        if batch not in (None, 0, 1) and batch_free(signature) in self.batch_compiles:
            return None  # another batch size's compile is handed out as usual
        dynamic = batch not in (None, 0, 1) and signature not in self.reuse_refused
        try:
            form = saved_form()
            # The key first: a job (copies of the inputs, a compiler form) only for a call read ahead. The
            # key holds the strides of the job's copies, which empty_like gives without copying.
            key = compile_key(form, [None if x is None else torch.empty_like(x) for x in inputs], dynamic,
                              self.compile_backend)
        except Exception:  # the usual path runs, and says what fails there
            return None
        if not STORE.expecting(key):
            return None
        with WORKER.paused() as paused:  # no compiled code runs while the worker traces
            if not paused:
                return None
            try:
                job = CompileJob(compiler_form() if compiler_form else function, inputs, self.compile_backend,
                                 dynamic_batch=dynamic, saved_form=form)
                used = job.key == key and job.use_preloaded()
            except self.passthrough:
                raise
            except Exception as error:  # the usual path runs
                self.say(f"{self.part}: the compile read ahead for {describe(signature)} is not used ({first_line(error)})")
                return None
            if not used:
                if isinstance(job.error, self.passthrough):  # a Cancel during its runs stops the prompt
                    raise job.error
                if job.error is not None:
                    self.say(f"{self.part}: the compile read ahead for {describe(signature)} is not used "
                             f"({first_line(job.error)})")
                return None
            self._make_room()
            if self.pool is None:
                self.pool = torch.cuda.graph_pool_handle()
            graph = self._capture_compiled(signature, job, inputs, module, first_call=True)
        if graph is not None and job.dynamic_batch:
            self.batch_compiles[batch_free(signature)] = job
        return graph

    def _compile_in_background(self, signature, function, compiler_form, inputs, saved_form=None) -> None:
        if (self.compile_backend is None or signature in self.compiling
                or signature in self.compile_failures or self.graphs[signature].compiled):
            return
        batch = batch_size(inputs)
        shared = self.batch_compiles.get(batch_free(signature))
        # Code with a dynamic batch takes sizes above 1 only (Dynamo specialises 0 and 1).
        if (shared is not None and batch not in (None, 0, 1) and signature not in self.reuse_refused
                and not shared.cancelled and not (shared.done() and shared.error is not None)):
            self.compiling[signature] = shared
            self.shared.add(signature)
            log.info("FewStepAccelerate: %s for %s runs on a CUDA graph of the eager kernels now; later runs "
                     "switch to the code compiled in the background for batch size %d, which takes other batch "
                     "sizes too", self.part, describe(signature), shared.batch)
            return
        dynamic = batch not in (None, 0, 1) and signature not in self.reuse_refused
        saving = {}
        if saved_form is not None:
            try:
                saving["saved_form"] = saved_form()
            except Exception as error:  # compiled as before, not saved; the prompt goes on
                self.say(f"{self.part}: compiles are not saved for a restart ({first_line(error)})")
        job = WORKER.submit(CompileJob(compiler_form() if compiler_form else function, inputs,
                                       self.compile_backend, dynamic_batch=dynamic, **saving))
        self.compiling[signature] = job
        self.shared.discard(signature)
        if dynamic:
            self.batch_compiles[batch_free(signature)] = job
        # Said once per shape: the log then shows when the compiled graph took over.
        log.info("FewStepAccelerate: %s for %s runs on a CUDA graph of the eager kernels now; torch.compile "
                 "compiles it in the background%s (minutes for SDXL the first time, less with Inductor's cache "
                 "warm) and later runs switch to the compiled graph", self.part, describe(signature),
                 " for every batch size above 1" if dynamic else "")

    def _capture_compiled(self, signature, job: CompileJob, inputs, module, first_call: bool = False):
        """The compiled code of a finished job captured for `inputs` in place of the first graph (or, with
        `first_call`, as the shape's first: read ahead); None where it cannot be (said, and the first
        graph stays)."""
        if job.error is not None:
            if isinstance(job.error, self.passthrough):  # interrupted: not a failure, but not used either
                self.say(f"{self.part}: the compile for {describe(signature)} was interrupted and is not used; "
                         "this shape stays on the graph of the eager kernels")
                return None
            if getattr(job, "dynamic_batch", False) and signature not in self.reuse_refused:
                # Compiling for any batch size failed (dynamic shapes fail more often): try this one alone.
                self.reuse_refused.add(signature)
                if self.batch_compiles.get(batch_free(signature)) is job:
                    del self.batch_compiles[batch_free(signature)]
                self.say(f"{self.part}: torch.compile with a dynamic batch size failed ({first_line(job.error)}); "
                         f"compiling {describe(signature)} for its own batch size")
                return None
            self.compile_failures[signature] = first_line(job.error)
            self.say(f"{self.part}: torch.compile failed for {describe(signature)} ({first_line(job.error)}); "
                     "this shape stays on the graph of the eager kernels")
            return None
        runs_before = job.compiled_runs
        try:
            graph = CapturedGraph(job.runnable(), inputs, module, self.pool, self.autotune, compiled=True,
                                  warmup_runs=COMPILED_WARMUP_RUNS,
                                  before_capture=lambda: job.check_compiled_code_ran(runs_before))
        except self.passthrough:
            raise
        except Exception as error:
            refused = isinstance(error, CompiledCodeNotUsed)  # refused before any capture began
            if not refused:
                keep_failed_capture(error)
            if refused and signature in self.shared:
                # Code compiled for another batch size (or before the weights moved) whose guards refuse
                # this call: it gets its own compile.
                self.reuse_refused.add(signature)
                self.shared.discard(signature)
                self.say(f"{self.part}: the code compiled for batch size {job.batch} does not take "
                         f"{describe(signature)}; compiling this shape on its own")
                return None
            self.compile_failures[signature] = first_line(error)
            how = "for this shape"
            if allocator_backend() == STREAM_ORDERED_ALLOCATOR and not refused and signature not in self.shared:
                self.compile_backend = None  # it would fail the same way at every shape
                how = (f"from now on (under the {STREAM_ORDERED_ALLOCATOR} allocator; start ComfyUI with "
                       f"{NATIVE_ALLOCATOR_FLAG} for compiled graphs)")
            self.say(f"{self.part}: the compiled kernels could not be captured for {describe(signature)} "
                     f"({first_line(error)}); keeping the graph of the eager kernels {how}")
            torch.cuda.synchronize()
            return None
        self.graphs.pop(signature, None)  # the eager-kernel graph's memory goes back to the pool
        for problem, what in ((getattr(job, "load_problem", None), "the compile saved on disk is not used"),
                              (getattr(job, "save_problem", None), "the compile is not saved for a restart")):
            if problem:
                self.say(f"{self.part}: {what} for {describe(signature)}: {problem}")
        reused_from = job.batch if job.batch != batch_size(inputs) else None
        return self._keep(signature, graph, job, reused_from, first_call)

    def _capture(self, signature, function, inputs, module) -> CapturedGraph | None:
        self._make_room()
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        try:
            # Where a compiled graph will replace this one, cuDNN's autotuning waits for that capture.
            graph = CapturedGraph(function, inputs, module, self.pool, autotune=self.autotune and not self.compile_backend)
        except self.passthrough:
            raise
        except Exception as error:  # an op that cannot be captured: this shape runs eagerly from now on
            self._give_up(signature, f"capture failed for {describe(signature)}", error)
            return None
        return self._keep(signature, graph)

    def _make_room(self) -> None:
        """Drop the least recently used graphs (and their pending compiles) until one more fits."""
        while len(self.graphs) >= self.max_shapes:
            dropped, _ = self.graphs.popitem(last=False)
            job = self.compiling.pop(dropped, None)
            # A job other shapes wait for, or a finished one (batch_compiles may hand it out again), stays.
            if job is not None and not job.done() and all(other is not job for other in self.compiling.values()):
                job.cancelled = True  # not started yet: skipped; running: its result unused
            if job is not None:
                log.info("FewStepAccelerate: %s: the background compile for %s is dropped with its graph "
                         "(max_shapes)", self.part, describe(dropped))

    def _give_up(self, signature, what: str, error: Exception) -> None:
        """This shape runs eagerly from now on, and says why."""
        keep_failed_capture(error)
        reason = first_line(error)
        self.failures[signature] = reason
        self.say(f"{self.part}: {what} ({reason}); running eager for this shape")
        torch.cuda.synchronize()

    def _keep(self, signature, graph: CapturedGraph, job=None, reused_from: int | None = None,
              first_call: bool = False) -> CapturedGraph:
        self.graphs[signature] = graph
        record = CaptureRecord(self.part, signature, graph.capture_seconds, graph.compiled,
                               job.seconds if job else None, job.backend_seconds if job else None)
        self.captures.append(record)
        how = [what for what, used in (("compiled", graph.compiled), ("cuDNN autotuned", graph.autotuned)) if used]
        log.info("FewStepAccelerate: captured %s CUDA graph for %s in %.2f s%s; replayed for every later "
                 "call of this shape%s", self.part, describe(signature), graph.capture_seconds,
                 f" ({', '.join(how)})" if how else "",
                 f" ({f'the code compiled for batch size {reused_from}, ' if reused_from else ''}"
                 f"{compile_origin(job, first_call)})" if job is not None else "",
                 extra={"fewstep_capture": record})
        if self.on_change is not None:
            self.on_change()
        return graph

    def eager(self, reason: str) -> None:
        """Count an eager call and say why, once per reason."""
        self.eager_calls += 1
        self.say(f"{self.part}: {reason}; running eager")

    def say(self, message: str) -> None:
        if message not in self._said:
            self._said.add(message)
            log.warning("FewStepAccelerate: %s", message)


def compile_origin(job, first_call: bool = False) -> str:
    """Where a captured compiled graph's code came from, for the capture's log line."""
    if getattr(job, "loaded", False):
        read_ahead = getattr(job, "load_seconds", None)
        if read_ahead is not None:
            first = ", used from the shape's first call" if first_call else ""
            return (f"loaded from the compile saved on disk in {read_ahead + job.seconds:.1f} s, read ahead as "
                    f"the prompt was queued{first}, without tracing")
        return f"loaded from the compile saved on disk in {job.seconds:.1f} s, without tracing"
    split = (f", of which AOTAutograd and Inductor {job.backend_seconds:.1f} s"
             if job.backend_seconds is not None else "")
    saved = ", saved on disk for a restart" if getattr(job, "saved_path", None) else ""
    return f"compiled in the background in {job.seconds:.1f} s{split}{saved}"


# Failed captures kept for the life of the process, under the cudaMallocAsync allocator. Memory that
# allocator hands out during a capture belongs to the graph; freed outside a capture after the capture
# failed, it makes cudaFreeAsync fail inside a tensor's deleter, where PyTorch can only terminate the
# process. The error's traceback holds the frames, and so the tensors, of the failed capture: kept,
# they are never freed. Their memory is address space the driver maps only if a graph runs, so a
# failed capture costs next to no GPU memory.
FAILED_CAPTURES_KEPT: list[BaseException] = []


def keep_failed_capture(error: BaseException) -> None:
    if allocator_backend() == STREAM_ORDERED_ALLOCATOR:
        FAILED_CAPTURES_KEPT.append(error)

