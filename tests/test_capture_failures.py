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
import threading
import types

import pytest
import torch

from graphs import SEED
from test_acceleration import accelerated_prompt, loaded_node_module

from comfyui_fewstep.fewstep.acceleration import agreement

from comfyui_fewstep.fewstep.acceleration import compiler
from comfyui_fewstep.fewstep.acceleration.log_lines import compiles_pending

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
    pass, cudaMallocAsync is the allocator, the compile worker compiles for real with `aot_eager`
    (Dynamo and AOTAutograd, no kernel generation), and capturing compiled code fails with the
    driver's error. The stand-in "replays" by running the function it was given."""
    node_module = loaded_node_module(comfy)
    graphs_module = sys.modules[node_module.GraphCache.__module__]
    compiler_module = sys.modules[graphs_module.allocator_backend.__module__]
    attempts = []

    class CaptureStandIn:
        def __init__(self, function, inputs, module, pool, autotune, compiled=False, warmup_runs=3,
                     before_capture=None):
            attempts.append("compiled" if compiled else "eager kernels")
            for _ in range(warmup_runs):
                function(*inputs)
            if before_capture is not None:
                before_capture()
            if compiled and stand_in.compiled_capture_fails:
                raise RuntimeError(DRIVER_ERROR)
            self.function, self.compiled, self.autotuned, self.capture_seconds = function, compiled, autotune, 0.0
            self.snapshot = graphs_module.WeightSnapshot(module)

        def __call__(self, inputs):
            return self.function(*inputs)

    monkeypatch.setattr(graphs_module, "CapturedGraph", CaptureStandIn)
    for module in (graphs_module, compiler_module):
        monkeypatch.setattr(module, "allocator_backend", lambda: "cudaMallocAsync")
    monkeypatch.setattr(node_module, "cuda_graph_unavailable_reason", lambda device: None)
    monkeypatch.setattr(node_module, "compile_unavailable_reason", lambda device: None)
    monkeypatch.setattr(node_module, "compiled_capture_unavailable_reason", lambda: None)
    monkeypatch.setattr(node_module, "COMPILE_BACKEND", "aot_eager")
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: None)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    monkeypatch.setattr(graphs_module, "FAILED_CAPTURES_KEPT", [])
    stand_in = types.SimpleNamespace(attempts=attempts, graphs_module=graphs_module, compiled_capture_fails=True)
    return stand_in


def compiled_here_or_loaded(message: str) -> bool:
    """A compiled capture's line names where its code came from: this server's compile (the split of its
    time where it is measured: the compile that cannot be saved), or one saved by an earlier run."""
    return (("compiled in the background in" in message
             and ("of which AOTAutograd and Inductor" in message or "saved on disk for a restart" in message))
            or "loaded from the compile saved on disk in" in message)


def reseeded(prompt, seed):
    """Another seed, so that ComfyUI runs the sampler again rather than answering from its cache."""
    prompt["sample"]["inputs"]["noise_seed"] = seed
    return prompt


def test_a_failed_capture_falls_back_with_a_message_and_the_next_prompt_runs(
        comfy, sd15, capture_fails_for_compiled_kernels, caplog):
    stand_in = capture_fails_for_compiled_kernels
    attempts, graphs_module = stand_in.attempts, stand_in.graphs_module
    worker = sys.modules[graphs_module.CompileJob.__module__].WORKER
    eager = comfy.run(accelerated_prompt(sd15, "lcm", 2, accelerate=False))
    with caplog.at_level(logging.INFO, logger="fewstep.acceleration"):
        # The first prompt runs on graphs of the eager kernels and hands both parts to the compile worker.
        first = comfy.run(accelerated_prompt(sd15, "lcm", 2, accelerate=True))
        assert attempts == ["eager kernels", "eager kernels"]
        assert worker.wait_until_idle(timeout=300)
        # The next prompt finds the compiled code ready and tries to capture it: the driver refuses.
        second = comfy.run(reseeded(accelerated_prompt(sd15, "lcm", 2, accelerate=True), SEED + 1))
    assert torch.equal(first.latent("save"), eager.latent("save"))
    second_eager = comfy.run(reseeded(accelerated_prompt(sd15, "lcm", 2, accelerate=False), SEED + 1))
    assert torch.equal(second.latent("save"), second_eager.latent("save"))
    assert not torch.equal(second.latent("save"), first.latent("save"))
    messages = [record.getMessage() for record in caplog.records if record.name == "fewstep.acceleration"]
    for part in ("UNet", "VAE decode"):
        assert any(message.startswith(f"FewStepAccelerate: {part} for (2, 4, 8, 8) float32") and
                   "runs on a CUDA graph of the eager kernels now; torch.compile compiles it in the background"
                   in message for message in messages)
        (said,) = [message for message in messages
                   if message.startswith(f"FewStepAccelerate: {part}: the compiled kernels could not be captured")]
        assert "could not be captured for (2, 4, 8, 8) float32" in said
        assert f"(RuntimeError: {DRIVER_ERROR}); keeping the graph of the eager kernels from now on" in said
        assert "start ComfyUI with --disable-cuda-malloc for compiled graphs" in said
    assert compiles_pending("\n".join(messages)) == 0
    # The compiled code itself ran on the prompt's thread (the capture was refused after the warm-up),
    # and each failed capture is kept, so nothing it allocated is freed outside a capture.
    assert attempts == ["eager kernels", "eager kernels", "compiled", "compiled"]
    assert len(graphs_module.FAILED_CAPTURES_KEPT) == 2
    assert all(DRIVER_ERROR in str(error) for error in graphs_module.FAILED_CAPTURES_KEPT)

    # Compiling is off for these caches now: a third prompt tries no compiled capture.
    third = comfy.run(reseeded(accelerated_prompt(sd15, "lcm", 2, accelerate=True), SEED + 2))
    third_eager = comfy.run(reseeded(accelerated_prompt(sd15, "lcm", 2, accelerate=False), SEED + 2))
    assert "compiled" not in attempts[4:]
    assert torch.equal(third.latent("save"), third_eager.latent("save"))


def test_a_failed_replay_falls_back_to_eager_for_that_shape(comfy, sd15, capture_fails_for_compiled_kernels, caplog):
    """A graph whose replay fails (e.g. out of memory for its allocations on its first run) is
    dropped, the call runs eagerly, and the shape stays eager."""
    graphs_module = capture_fails_for_compiled_kernels.graphs_module

    class ReplayOutOfMemory(graphs_module.CapturedGraph):
        def __call__(self, inputs):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    graphs_module.CapturedGraph = ReplayOutOfMemory  # restored by the fixture's monkeypatch
    eager = comfy.run(accelerated_prompt(sd15, "tcd", 2, accelerate=False))
    with caplog.at_level(logging.WARNING, logger="fewstep.acceleration"):
        accelerated = comfy.run(accelerated_prompt(sd15, "tcd", 2, accelerate=True, compile_kernels=False))
    assert torch.equal(accelerated.latent("save"), eager.latent("save"))
    assert any("replay failed for (2, 4, 8, 8) float32" in record.getMessage()
               and "(OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB); running eager for this shape"
               in record.getMessage() for record in caplog.records)


def test_no_prompt_waits_for_the_compile_and_the_compiled_graph_takes_over(
        comfy, sd15, capture_fails_for_compiled_kernels, caplog):
    """While the worker compiles (held here until the first prompt is done), prompts run on the
    eager kernels' graphs; the first prompt after it finished captures the compiled code, whose
    output agrees with eager, and later prompts replay it."""
    stand_in = capture_fails_for_compiled_kernels
    attempts, graphs_module = stand_in.attempts, stand_in.graphs_module
    stand_in.compiled_capture_fails = False
    background = sys.modules[graphs_module.CompileJob.__module__]
    released = threading.Event()
    run = background.CompileJob.run

    def run_when_released(job):
        released.wait(timeout=300)
        run(job)

    try:
        background.CompileJob.run = run_when_released
        with caplog.at_level(logging.INFO, logger="fewstep.acceleration"):
            first = comfy.run(accelerated_prompt(sd15, "lcm", 2, accelerate=True))
            assert attempts == ["eager kernels", "eager kernels"]  # and no compile has started
            released.set()
            assert background.WORKER.wait_until_idle(timeout=300)
            second = comfy.run(reseeded(accelerated_prompt(sd15, "lcm", 2, accelerate=True), SEED + 1))
            third = comfy.run(reseeded(accelerated_prompt(sd15, "lcm", 2, accelerate=True), SEED + 2))
    finally:
        background.CompileJob.run = run
    assert attempts == ["eager kernels", "eager kernels", "compiled", "compiled"]
    for result, seed in ((first, SEED), (second, SEED + 1), (third, SEED + 2)):
        eager = comfy.run(reseeded(accelerated_prompt(sd15, "lcm", 2, accelerate=False), seed))
        # aot_eager runs the traced ATen ops; only decompositions may round differently.
        assert agreement(result.latent("save"), eager.latent("save"), tolerance=1e-5).within_tolerance
    messages = [record.getMessage() for record in caplog.records if record.name == "fewstep.acceleration"]
    for part in ("UNet", "VAE decode"):
        assert any(message.startswith(f"FewStepAccelerate: captured {part} CUDA graph for (2, 4, 8, 8) float32")
                   and "(compiled, cuDNN autotuned)" in message and compiled_here_or_loaded(message)
                   for message in messages)
    assert any("UNet: 1 of at most 4 sizes captured (1 compiled, 0 compiling)" in message for message in messages)
    assert compiles_pending("\n".join(messages)) == 0  # what the server benches wait on reads these lines


def test_compile_worker_is_paused_only_between_jobs():
    """Compiled code runs on the prompt thread only while no job compiles (torch.fx's tracing flag is
    process-wide): paused() refuses during a job and holds the next one back while granted."""
    from comfyui_fewstep.fewstep.acceleration.background import CompileWorker

    worker, started, release, order = CompileWorker(), threading.Event(), threading.Event(), []

    class Job:
        def __init__(self, name, block=False):
            self.name, self.block = name, block

        def run(self):
            order.append(self.name)
            started.set()
            if self.block:
                release.wait(timeout=60)

    worker.submit(Job("first", block=True))
    assert started.wait(timeout=60)
    with worker.paused() as paused:
        assert not paused
    release.set()
    assert worker.wait_until_idle(timeout=60)
    with worker.paused() as paused:
        assert paused
        worker.submit(Job("second"))
        assert not worker.wait_until_idle(timeout=0.5) and order == ["first"]  # held back while paused
    assert worker.wait_until_idle(timeout=60) and order == ["first", "second"]


def test_compile_worker_shortens_the_gil_switch_interval_only_while_a_job_runs():
    """A prompt sent while the worker compiles gets the GIL back within COMPILE_SWITCH_INTERVAL_S at each
    hand-over instead of Python's default 5 ms; before and after a job the interval is the process's own."""
    import sys

    from comfyui_fewstep.fewstep.acceleration.background import COMPILE_SWITCH_INTERVAL_S, CompileWorker

    seen, worker, before = [], CompileWorker(), sys.getswitchinterval()

    class Job:
        def run(self):
            seen.append(sys.getswitchinterval())

    worker.submit(Job())
    assert worker.wait_until_idle(timeout=60)
    assert seen == [pytest.approx(min(before, COMPILE_SWITCH_INTERVAL_S))] and before > COMPILE_SWITCH_INTERVAL_S
    assert sys.getswitchinterval() == before


def test_compile_worker_starts_a_job_only_after_the_prompt_threads_runs_have_ended():
    """Dynamo's tracing holds the GIL: a job waits until no accelerated run (sampling, decode) has
    been going on for QUIET_SECONDS, so it does not slow the rest of the prompt that submitted it."""
    import time

    from comfyui_fewstep.fewstep.acceleration.background import ACTIVITY, QUIET_SECONDS, CompileWorker

    worker, started = CompileWorker(), []

    class Job:
        def run(self):
            started.append(time.monotonic())

    with ACTIVITY.open():
        worker.submit(Job())
        assert not worker.wait_until_idle(timeout=QUIET_SECONDS + 0.5) and not started
        ended = time.monotonic()
    assert worker.wait_until_idle(timeout=60)
    assert started[0] >= ended + QUIET_SECONDS * 0.99


def test_a_new_batch_size_replays_the_code_compiled_for_another_without_compiling_again(
        comfy, sd15, capture_fails_for_compiled_kernels, caplog):
    """The first compile for a batch above 1 marks the batch dimension dynamic (real Dynamo and
    AOTAutograd here): a later batch size runs on a graph of the eager kernels once, then captures
    that compiled code, submitting no compile of its own, and agrees with eager."""
    stand_in = capture_fails_for_compiled_kernels
    attempts, graphs_module = stand_in.attempts, stand_in.graphs_module
    stand_in.compiled_capture_fails = False
    worker = sys.modules[graphs_module.CompileJob.__module__].WORKER
    submitted, submit = [], worker.submit

    def submit_counted(job):
        submitted.append((job.batch, job.dynamic_batch))
        return submit(job)

    def prompt(batch, seed, accelerate=True):
        built = reseeded(accelerated_prompt(sd15, "lcm", 2, accelerate=accelerate), seed)
        built["latent_in"]["inputs"]["batch_size"] = batch
        return built

    worker.submit = submit_counted
    try:
        with caplog.at_level(logging.INFO, logger="fewstep.acceleration"):
            comfy.run(prompt(2, SEED))
            assert worker.wait_until_idle(timeout=300)
            comfy.run(prompt(2, SEED + 1))
            assert submitted == [(2, True), (2, True)]  # the UNet's and the VAE decoder's
            first_of_three = comfy.run(prompt(3, SEED + 2))
            second_of_three = comfy.run(prompt(3, SEED + 3))
    finally:
        worker.submit = submit
    assert submitted == [(2, True), (2, True)]
    # Batch 3: the UNet's first step captures its eager kernels, its second the shared compiled code
    # (ready already); the decode does the same over the two prompts.
    assert attempts == ["eager kernels", "eager kernels", "compiled", "compiled", "eager kernels", "compiled",
                        "eager kernels", "compiled"]
    for result, seed in ((first_of_three, SEED + 2), (second_of_three, SEED + 3)):
        eager = comfy.run(prompt(3, seed, accelerate=False))
        assert result.latent("save").shape[0] == 3
        assert agreement(result.latent("save"), eager.latent("save"), tolerance=1e-5).within_tolerance
    messages = [record.getMessage() for record in caplog.records if record.name == "fewstep.acceleration"]
    for part in ("UNet", "VAE decode"):
        assert any(message.startswith(f"FewStepAccelerate: captured {part} CUDA graph for (3, 4, 8, 8) float32")
                   and "the code compiled for batch size 2, " in message and compiled_here_or_loaded(message)
                   for message in messages)
        assert any(message.startswith(f"FewStepAccelerate: {part} for (3, 4, 8, 8) float32")
                   and "switch to the code compiled in the background for batch size 2" in message
                   for message in messages)
    assert compiles_pending("\n".join(messages)) == 0
