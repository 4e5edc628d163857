"""GraphCache and WeightSnapshot without a GPU: the order of captures, the compile worker's hand-over,
the fallbacks and the weight check, with CapturedGraph (CUDA-only) and the worker stood in for."""
from __future__ import annotations

import contextlib

import pytest
import torch

from comfyui_fewstep.fewstep.acceleration import graphs
from comfyui_fewstep.fewstep.acceleration import COMPILE_BACKEND, CompileFailed, GraphCache, WeightSnapshot


class Interrupted(Exception):
    """Stands in for ComfyUI's InterruptProcessingException (a user's Cancel)."""


class FinishedJob:
    """A CompileJob the worker has finished, as told (compile error or not)."""

    def __init__(self, error=None):
        self.error, self.seconds, self.backend_seconds, self.compiled_runs = error, 1.0, 0.5, 0
        self.batch = None

    def done(self):
        return True

    def runnable(self):
        return "compiled code"

    def check_compiled_code_ran(self, runs_before):
        pass


def plain_graphs(captured: list):
    """A CapturedGraph stand-in whose replays return "plain"; each capture appends (function, compiled,
    autotune) to `captured`."""

    class PlainGraph:
        def __init__(self, function, inputs, module, pool, autotune, compiled=False, **kwargs):
            captured.append((function, compiled, autotune))
            self.compiled, self.autotuned, self.capture_seconds = compiled, autotune, 0.0
            self.snapshot = WeightSnapshot(module)

        def __call__(self, inputs):
            return "plain"

    return PlainGraph


@pytest.mark.parametrize("compile_error, compiled_capture, plain, outputs, compiler_kept", [
    (None, None, None, ["plain", "plain", "compiled"], True),
    (CompileFailed("ValueError: no kernel"), None, None, ["plain", "plain", "plain"], True),  # stays on the plain graph
    (None, RuntimeError("not capturable"), None, ["plain", "plain", "plain"], True),  # compiled kernels didn't capture
    (None, None, RuntimeError("not capturable"), [None, None, None], True),  # not even the eager kernels: eager
])
def test_graph_cache_captures_eager_kernels_at_once_and_the_compiled_code_when_ready(
        monkeypatch, compile_error, compiled_capture, plain, outputs, compiler_kept):
    """GraphCache's order, with CapturedGraph (CUDA-only) and the compile worker replaced by stand-ins
    that fail as told: the first call captures the eager kernels and submits a compile; a call after
    the compile finished, at which the worker is not compiling something else, captures its code in
    place of the eager graph, or keeps the eager graph."""
    submitted, captured, worker_busy = [], [], [True]  # busy at the second call, idle at the third

    class CapturedGraphFailingAsTold:
        def __init__(self, function, inputs, module, pool, autotune, compiled=False, warmup_runs=3,
                     before_capture=None):
            captured.append((function, compiled, autotune))
            failure = compiled_capture if function == "compiled code" else plain
            if failure is not None:
                raise failure
            self.function, self.compiled, self.autotuned, self.capture_seconds = function, compiled, autotune, 0.0
            self.snapshot = WeightSnapshot(module)

        def __call__(self, inputs):
            return "plain" if self.function == "eager function" else "compiled"

    class Worker:
        def submit(self, job):
            submitted.append(job)
            return FinishedJob(compile_error)

        @contextlib.contextmanager
        def paused(self):
            yield not (worker_busy and worker_busy.pop())

    monkeypatch.setattr(graphs, "CapturedGraph", CapturedGraphFailingAsTold)
    monkeypatch.setattr(graphs, "WORKER", Worker())
    monkeypatch.setattr(graphs, "CompileJob", lambda function, inputs, backend, dynamic_batch: (function, backend))
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: None)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    cache = GraphCache("UNet", compile_backend=COMPILE_BACKEND, passthrough=(Interrupted,))
    compiler_form = lambda: "the compiler's form"  # noqa: E731 — stands in for the VAE's decoder_for_compiler
    assert [cache.run(("shape",), "eager function", [], torch.nn.Module(), compiler_form) for _ in range(3)] == outputs
    # The eager kernels are captured from the function itself at once, with cuDNN's heuristics; only
    # the compiler gets its form; cuDNN's autotuning waits for the compiled graph's capture.
    assert captured[0] == ("eager function", False, False)
    assert submitted == ([] if plain else [("the compiler's form", COMPILE_BACKEND)])
    assert captured[1:] == ([] if plain or compile_error else [("compiled code", True, True)])
    assert (cache.compile_backend == COMPILE_BACKEND) == compiler_kept
    assert ("shape",) in cache.failures if plain else not cache.failures
    assert (("shape",) in cache.compile_failures) == bool(compile_error or compiled_capture)
    if compile_error or compiled_capture:
        assert any(("torch.compile failed" if compile_error else "could not be captured") in said
                   for said in cache._said)


def test_graph_cache_without_compiling_autotunes_its_one_capture_and_submits_nothing(monkeypatch):
    captured = []

    class Worker:
        def submit(self, job):
            raise AssertionError("nothing to compile")

    monkeypatch.setattr(graphs, "CapturedGraph", plain_graphs(captured))
    monkeypatch.setattr(graphs, "WORKER", Worker())
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: None)
    cache = GraphCache("UNet", autotune=True, compile_backend=None)
    assert [cache.run(("shape",), "eager function", [], torch.nn.Module()) for _ in range(2)] == ["plain", "plain"]
    assert captured == [("eager function", False, True)] and not cache.compiling


def batch_cache(monkeypatch, refusing=(), failing=(), max_shapes=8):
    """A GraphCache whose compile jobs finish at once and whose stand-in capture runs the compiled code's
    guard check: the code compiled for batch b refuses the batch sizes in `refusing`; a dynamic-batch
    compile for a batch in `failing` fails. Returns the cache, a function making two calls at a batch
    size (returning their outputs) and the list of submitted (batch, dynamic) compiles."""
    submitted = []

    class Job:
        def __init__(self, function, inputs, backend, dynamic_batch=False):
            self.batch, self.dynamic_batch = inputs[0].shape[0], dynamic_batch
            self.error = RuntimeError("dynamic shapes") if dynamic_batch and self.batch in failing else None
            self.seconds, self.backend_seconds, self.compiled_runs, self.cancelled = 9.0, 1.0, 0, False
            submitted.append((self.batch, dynamic_batch))

        def done(self):
            return True

        def runnable(self):
            return ("compiled for", self.batch)

    class Graph:
        def __init__(self, function, inputs, module, pool, autotune, compiled=False, warmup_runs=3,
                     before_capture=None):
            if before_capture is not None and inputs[0].shape[0] in refusing and function[1] != inputs[0].shape[0]:
                raise graphs.CompiledCodeNotUsed("guards")
            self.function, self.compiled, self.autotuned, self.capture_seconds = function, compiled, autotune, 0.0
            self.snapshot = WeightSnapshot(module)

        def __call__(self, inputs):
            return self.function

    class Worker:
        def submit(self, job):
            return job

        @contextlib.contextmanager
        def paused(self):
            yield True

    monkeypatch.setattr(graphs, "CapturedGraph", Graph)
    monkeypatch.setattr(graphs, "WORKER", Worker())
    monkeypatch.setattr(graphs, "CompileJob", Job)
    monkeypatch.setattr(graphs, "keep_failed_capture", lambda error: None)
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: None)
    cache = GraphCache("UNet", max_shapes=max_shapes, compile_backend=COMPILE_BACKEND)
    module = torch.nn.Module()

    def calls(batch, count=2):
        inputs = [torch.zeros(batch, 4, 8, 8), torch.zeros(batch, 77, 16)]
        signature = (tuple(graphs.tensor_signature(x) for x in inputs),)
        return [cache.run(signature, "eager", inputs, module) for _ in range(count)]

    return cache, calls, submitted


def test_a_new_batch_size_reuses_the_code_compiled_with_a_dynamic_batch(monkeypatch):
    """Batch 1 compiles on its own (static: Dynamo specialises size 1); the first batch above 1 is
    compiled with a dynamic batch dimension, and later batch sizes of the same call capture that code
    instead of compiling again, unless its guards refuse them: then they compile on their own."""
    cache, calls, submitted = batch_cache(monkeypatch, refusing={5})
    assert calls(1) == ["eager", ("compiled for", 1)]
    assert calls(2) == ["eager", ("compiled for", 2)]
    assert calls(3) == ["eager", ("compiled for", 2)]  # no compile of its own
    assert calls(4) == ["eager", ("compiled for", 2)]
    assert submitted == [(1, False), (2, True)]
    # Refused by the shared code's guards: batch 5 keeps its eager graph and compiles on its own.
    assert calls(5, 3) == ["eager", "eager", ("compiled for", 5)]
    assert submitted[-1] == (5, False) and not cache.compile_failures
    assert any("the code compiled for batch size 2 does not take (5, 4, 8, 8) float32" in said for said in cache._said)
    assert graphs.batch_free(((1, 4, 8, 8), torch.float16, "cuda", (256, 64, 8, 1))) == \
        ((4, 8, 8), torch.float16, "cuda", (64, 8, 1))


def test_batch_reuse_orders_a_user_meets(monkeypatch):
    """Batch 1 after batch 2 is never handed the dynamic code (it cannot take size 1); a failed
    dynamic-batch compile is retried for the shape's own batch size."""
    cache, calls, submitted = batch_cache(monkeypatch, failing={3})
    assert calls(2) == ["eager", ("compiled for", 2)]
    assert calls(1) == ["eager", ("compiled for", 1)]
    assert submitted == [(2, True), (1, False)]
    cache.batch_compiles.clear()
    assert calls(3, 3) == ["eager", "eager", ("compiled for", 3)]
    assert submitted[-2:] == [(3, True), (3, False)] and not cache.compile_failures


def test_a_graph_dropped_for_max_shapes_keeps_the_finished_shared_compile(monkeypatch):
    """With room for one graph, batch 3 (handed batch 2's finished compile) is dropped before it
    captured it: the compile stays usable, and batch 4 takes it instead of compiling for minutes."""
    cache, calls, submitted = batch_cache(monkeypatch, max_shapes=1)
    assert calls(2) == ["eager", ("compiled for", 2)]
    assert calls(3, 1) == ["eager"]  # handed batch 2's compile, not yet captured
    assert calls(4) == ["eager", ("compiled for", 2)]
    assert submitted == [(2, True)]


def test_graph_cache_passes_a_cancel_through_instead_of_falling_back(monkeypatch):
    class CapturedGraphCancelled:
        def __init__(self, *args, **kwargs):
            raise Interrupted()

    monkeypatch.setattr(graphs, "CapturedGraph", CapturedGraphCancelled)
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: None)
    cache = GraphCache("UNet", compile_backend=COMPILE_BACKEND, passthrough=(Interrupted,))
    with pytest.raises(Interrupted):
        cache.run(("shape",), None, [], torch.nn.Module())
    assert cache.compile_backend == COMPILE_BACKEND and not cache.failures and not cache.compiling


def test_graph_cache_replays_only_a_kept_graph_whose_weights_stayed():
    class Graph:
        def __init__(self, weights_stayed):
            self.snapshot = type("Snapshot", (), {"unchanged": lambda self: weights_stayed})()

    cache = GraphCache("VAE decode")
    cache.graphs.update({("kept",): Graph(True), ("moved",): Graph(False)})
    assert cache.replayable(("kept",)) and not cache.replayable(("moved",)) and not cache.replayable(("new",))


def test_weight_snapshot_sees_every_way_a_weight_can_leave_its_address():
    """In place is fine (the graph reads the new values); a new tensor, a new storage under the same
    Parameter (what Module.to() does), an emptied slot or a swapped buffer is not."""
    def fresh():
        module = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4))
        return module, WeightSnapshot(module)

    module, snapshot = fresh()
    with torch.no_grad():
        module[0].weight.mul_(2)
    assert snapshot.unchanged()
    module[0].weight = torch.nn.Parameter(module[0].weight.detach().clone())
    assert not snapshot.unchanged()
    module, snapshot = fresh()
    module[0].weight.data = module[0].weight.data.clone()
    assert not snapshot.unchanged()
    module, snapshot = fresh()
    module[0].bias = None
    assert not snapshot.unchanged()
    module, snapshot = fresh()
    module[1].running_mean = module[1].running_mean.clone()
    assert not snapshot.unchanged()


def test_a_saved_form_that_cannot_be_made_leaves_the_usual_compile_and_the_prompt_running(monkeypatch):
    """Making the saved form (the model's fingerprint, the call's identity) runs on the prompt's thread: if it
    raises, the shape is still captured and compiled as before, not saved, and the log says so once."""
    jobs = []

    class Worker:
        def submit(self, job):
            jobs.append(job)
            return job

    def saved_form():
        raise ValueError("an option that cannot be described")

    monkeypatch.setattr(graphs, "CapturedGraph", plain_graphs([]))
    monkeypatch.setattr(graphs, "WORKER", Worker())
    monkeypatch.setattr(graphs, "CompileJob", lambda function, inputs, backend, dynamic_batch, **saving: saving)
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: None)
    cache = GraphCache("UNet", compile_backend=COMPILE_BACKEND)
    assert cache.run(("shape",), "eager function", [], torch.nn.Module(), saved_form=saved_form) == "plain"
    assert jobs == [{}]  # compiled as before, without a saved form
    assert any("compiles are not saved for a restart (ValueError: an option that cannot be described)" in said
               for said in cache._said)
