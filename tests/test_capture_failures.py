"""FewStepAccelerate when a capture fails: the prompt falls back and says why, the next prompt runs.

On a GPU under ComfyUI's default allocator (cudaMallocAsync), capturing Inductor's kernels failed with
"CUDA driver error: invalid argument" and the clean-up of that failed capture then took the whole
server down. CI has no GPU, so the capture is stood in for here: a stand-in that raises that very error
when asked to capture compiled kernels and otherwise "replays" by running the function eagerly. What
is checked is everything around it in real ComfyUI: the fallback order, the message, the failed
capture kept (never freed outside a capture), and the next prompt. bench/server_check.py checks the
real thing through `python main.py` on a GPU.
"""
from __future__ import annotations

import logging
import sys

import pytest
import torch

from graphs import SEED
from test_acceleration import accelerated_prompt, loaded_node_module

from comfyui_fewstep.fewstep.acceleration import compiler

DRIVER_ERROR = "CUDA driver error: invalid argument"  # what the H200 raised under cudaMallocAsync


def test_kernel_launches_by_address_hands_triton_launchers_addresses_only_under_cuda_malloc_async(monkeypatch):
    from torch._inductor.runtime.triton_heuristics import CachingAutotuner

    launched = []
    monkeypatch.setattr(CachingAutotuner, "run", lambda self, *args, **kwargs: launched.append((args, kwargs)))
    tensor, number = torch.arange(4.0), 7
    for backend in ("native", "cudaMallocAsync"):
        monkeypatch.setattr(compiler, "allocator_backend", lambda backend=backend: backend)
        with compiler.kernel_launches_by_address():
            CachingAutotuner.run(object(), tensor, number, stream=3)
        CachingAutotuner.run(object(), tensor, number, stream=3)  # afterwards: as before
    (native, native_after, by_address, after) = launched
    assert native[0][0] is tensor and native_after[0][0] is tensor and after[0][0] is tensor
    assert by_address == ((tensor.data_ptr(), number), {"stream": 3})


def test_without_a_launcher_to_hand_addresses_to_compiled_capture_is_refused_up_front(monkeypatch):
    monkeypatch.setattr(compiler, "allocator_backend", lambda: "cudaMallocAsync")
    monkeypatch.setattr(compiler, "_inductor_kernel_launcher", lambda: None)
    reason = compiler.compiled_capture_unavailable_reason()
    assert "cudaMallocAsync" in reason and "--disable-cuda-malloc" in reason
    monkeypatch.setattr(compiler, "allocator_backend", lambda: "native")
    assert compiler.compiled_capture_unavailable_reason() is None


@pytest.fixture
def capture_fails_for_compiled_kernels(comfy, monkeypatch):
    """ComfyUI's import of the pack, patched so its graph path runs on the CPU: the device checks
    pass, cudaMallocAsync is the allocator, and compiled capture fails with the driver's error."""
    node_module = loaded_node_module(comfy)
    graphs_module = sys.modules[node_module.GraphCache.__module__]
    compiler_module = sys.modules[graphs_module.CompileFailed.__module__]
    attempts = []

    class CaptureStandIn:
        def __init__(self, function, inputs, module, pool, autotune, compile_backend=None, tracing_context=None):
            attempts.append("compiled" if compile_backend else "eager kernels")
            if compile_backend is not None:
                raise RuntimeError(DRIVER_ERROR)
            self.function, self.compiled, self.capture_seconds = function, False, 0.0
            self.snapshot = graphs_module.WeightSnapshot(module)

        def __call__(self, inputs):
            return self.function(*inputs)

    monkeypatch.setattr(graphs_module, "CapturedGraph", CaptureStandIn)
    for module in (graphs_module, compiler_module):
        monkeypatch.setattr(module, "allocator_backend", lambda: "cudaMallocAsync")
    monkeypatch.setattr(node_module, "cuda_graph_unavailable_reason", lambda device: None)
    monkeypatch.setattr(node_module, "compile_unavailable_reason", lambda device: None)
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: None)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    monkeypatch.setattr(graphs_module, "FAILED_CAPTURES_KEPT", [])
    return attempts, graphs_module


def test_a_failed_capture_falls_back_with_a_message_and_the_next_prompt_runs(
        comfy, sd15, capture_fails_for_compiled_kernels, caplog):
    attempts, graphs_module = capture_fails_for_compiled_kernels
    eager = comfy.run(accelerated_prompt(sd15, "lcm", 2, accelerate=False))
    with caplog.at_level(logging.WARNING, logger="fewstep.acceleration"):
        first = comfy.run(accelerated_prompt(sd15, "lcm", 2, accelerate=True))
    assert torch.equal(first.latent("save"), eager.latent("save"))
    messages = [record.getMessage() for record in caplog.records if record.name == "fewstep.acceleration"]
    for part in ("UNet", "VAE decode"):
        (said,) = [message for message in messages if message.startswith(f"FewStepAccelerate: {part}: ")]
        assert "the compiled kernels could not be captured for (2, 4, 8, 8) float32" in said
        assert f"(RuntimeError: {DRIVER_ERROR}); capturing the eager kernels from now on" in said
        assert "start ComfyUI with --disable-cuda-malloc for compiled graphs" in said
    # Each part tried its compiled capture once, then captured its eager kernels; the failed captures
    # are kept, so nothing they allocated is freed outside a capture.
    assert attempts == ["compiled", "eager kernels", "compiled", "eager kernels"]
    assert len(graphs_module.FAILED_CAPTURES_KEPT) == 2
    assert all(DRIVER_ERROR in str(error) for error in graphs_module.FAILED_CAPTURES_KEPT)

    # The next prompt (another seed, so it runs again rather than from ComfyUI's cache) replays the
    # eager-kernel capture without trying to compile again, and matches eager at its seed.
    def reseeded(prompt):
        prompt["sample"]["inputs"]["noise_seed"] = SEED + 1
        return prompt

    second = comfy.run(reseeded(accelerated_prompt(sd15, "lcm", 2, accelerate=True)))
    second_eager = comfy.run(reseeded(accelerated_prompt(sd15, "lcm", 2, accelerate=False)))
    assert attempts == ["compiled", "eager kernels", "compiled", "eager kernels"]
    assert torch.equal(second.latent("save"), second_eager.latent("save"))
    assert not torch.equal(second.latent("save"), first.latent("save"))


def test_a_failed_replay_falls_back_to_eager_for_that_shape(comfy, sd15, capture_fails_for_compiled_kernels, caplog):
    """A graph whose replay fails (e.g. out of memory for its allocations on its first run) is
    dropped, the call runs eagerly, and the shape stays eager."""
    attempts, graphs_module = capture_fails_for_compiled_kernels

    class ReplayOutOfMemory(graphs_module.CapturedGraph):
        def __call__(self, inputs):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    graphs_module.CapturedGraph = ReplayOutOfMemory  # restored by the fixture's monkeypatch
    eager = comfy.run(accelerated_prompt(sd15, "tcd", 2, accelerate=False))
    with caplog.at_level(logging.WARNING, logger="fewstep.acceleration"):
        accelerated = comfy.run(accelerated_prompt(sd15, "tcd", 2, accelerate=True))
    assert torch.equal(accelerated.latent("save"), eager.latent("save"))
    assert any("replay failed for (2, 4, 8, 8) float32" in record.getMessage()
               and "(OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB); running eager for this shape"
               in record.getMessage() for record in caplog.records)
