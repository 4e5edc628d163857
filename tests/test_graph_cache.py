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

    def done(self):
        return True

    def runnable(self):
        return "compiled code"

    def check_compiled_code_ran(self, runs_before):
        pass


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
    monkeypatch.setattr(graphs, "CompileJob", lambda function, inputs, backend: (function, backend))
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

    class Graph:
        def __init__(self, function, inputs, module, pool, autotune, compiled=False, **kwargs):
            captured.append((function, compiled, autotune))
            self.compiled, self.autotuned, self.capture_seconds = compiled, autotune, 0.0
            self.snapshot = WeightSnapshot(module)

        def __call__(self, inputs):
            return "plain"

    class Worker:
        def submit(self, job):
            raise AssertionError("nothing to compile")

    monkeypatch.setattr(graphs, "CapturedGraph", Graph)
    monkeypatch.setattr(graphs, "WORKER", Worker())
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: None)
    cache = GraphCache("UNet", autotune=True, compile_backend=None)
    assert [cache.run(("shape",), "eager function", [], torch.nn.Module()) for _ in range(2)] == ["plain", "plain"]
    assert captured == [("eager function", False, True)] and not cache.compiling


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
