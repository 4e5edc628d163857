"""Compiles saved to disk (fewstep.acceleration.saved_compiles): a later run loads them without tracing,
and refuses them, saying why, where they no longer fit (changed code, an unreadable file, other shapes).

Real torch.compile throughout (`aot_eager`: Dynamo and AOTAutograd, no kernel generation, so the files
are what torch writes and reads); a "restart" is Dynamo's caches reset and a new job, as after a new
process (the GPU check restarts a real server, bench/server_bench.py)."""
from __future__ import annotations

import importlib
import linecache
import logging
import os
import sys
import time

import pytest
import torch

from graphs import SEED
from test_acceleration import accelerated_prompt, loaded_node_module
from test_capture_failures import capture_fails_for_compiled_kernels, reseeded  # noqa: F401 — a fixture

from comfyui_fewstep.fewstep.acceleration import agreement
from comfyui_fewstep.fewstep.acceleration.background import CompileJob, CompiledCodeNotUsed
from comfyui_fewstep.fewstep.acceleration.log_lines import compiles_pending
from comfyui_fewstep.fewstep.acceleration.saved_compiles import SUFFIX, SavedCompiles, SavedForm

MODEL_SOURCE = '''
import torch


class Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(8, 8)

    def forward(self, x):
        return torch.nn.functional.gelu(self.linear(x)) * SCALE


def call(model, x):
    return model(x) + 1
'''


@pytest.fixture
def model_module(tmp_path, monkeypatch):
    """A model in a module file of its own, so that a test can change its source as an update would."""
    folder = tmp_path / "models"
    folder.mkdir()
    (folder / "saved_compile_model.py").write_text(MODEL_SOURCE.replace("SCALE", "2.0"))
    monkeypatch.syspath_prepend(str(folder))
    sys.modules.pop("saved_compile_model", None)
    module = importlib.import_module("saved_compile_model")
    yield module
    sys.modules.pop("saved_compile_model", None)


def job_for(module, model, x, store, dynamic_batch=False) -> CompileJob:
    form = SavedForm(module.call, (model,), {"model": "block"})
    with torch.inference_mode():  # as on ComfyUI's prompt thread, which hands the worker its jobs
        return CompileJob(lambda x: module.call(model, x), [x], "aot_eager", dynamic_batch=dynamic_batch,
                          saved_form=form, store=store)


def run_job(job: CompileJob) -> CompileJob:
    with torch.inference_mode():
        job.run()
    assert job.error is None, job.error
    return job


def frames_traced() -> int:
    return torch._dynamo.utils.counters["frames"]["total"]


def test_a_compile_is_saved_then_loaded_without_tracing(model_module, tmp_path):
    store = SavedCompiles(tmp_path / "saved")
    model = model_module.Block()
    with torch.inference_mode():
        x = torch.randn(2, 8)
        expected = model_module.call(model, x)
    first = run_job(job_for(model_module, model, x, store))
    assert first.saved_path is not None and first.saved_path.exists() and not first.loaded
    assert first.save_problem is None and first.load_problem is None

    torch._dynamo.reset()  # what a new process starts with
    traced_before = frames_traced()
    second = run_job(job_for(model_module, model, x, store))
    assert second.loaded and second.saved_path is None
    with torch.inference_mode():
        output = second.runnable()(x.clone())
    assert frames_traced() == traced_before  # Dynamo traced nothing: the saved code ran
    assert second.compiled_runs == 3  # the worker's two runs and this one
    assert agreement(output, expected, tolerance=1e-6).within_tolerance

    # Another shape: the saved guards refuse it, as the graph cache needs to be told.
    with torch.inference_mode(), pytest.raises(CompiledCodeNotUsed):
        second.runnable()(torch.randn(3, 8))


def test_a_saved_compile_whose_code_changed_is_compiled_again(model_module, tmp_path):
    store = SavedCompiles(tmp_path / "saved")
    model = model_module.Block()
    with torch.inference_mode():
        x = torch.randn(2, 8)
    run_job(job_for(model_module, model, x, store))

    # An update changes the traced source (the scale): the saved compile must not be used.
    path = model_module.__file__
    with open(path, "w") as file:
        file.write(MODEL_SOURCE.replace("SCALE", "3.0"))
    linecache.checkcache(path)
    updated = importlib.reload(model_module)
    model.__class__ = updated.Block
    torch._dynamo.reset()
    again = run_job(job_for(updated, model, x, store))
    assert not again.loaded and "the code it traced has changed since it was saved" in again.load_problem
    assert "saved_compile_model:" in again.load_problem
    with torch.inference_mode():
        assert agreement(again.runnable()(x.clone()), updated.call(model, x), tolerance=1e-6).within_tolerance
    assert again.saved_path is not None  # replaced by the new compile


def test_an_unreadable_saved_compile_is_replaced(model_module, tmp_path):
    store = SavedCompiles(tmp_path / "saved")
    model = model_module.Block()
    with torch.inference_mode():
        x = torch.randn(2, 8)
    path = run_job(job_for(model_module, model, x, store)).saved_path
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])  # cut short, as by a full disk
    torch._dynamo.reset()
    again = run_job(job_for(model_module, model, x, store))
    assert not again.loaded and again.load_problem.startswith("the saved file could not be read")
    assert again.saved_path == path and path.stat().st_size > 0
    torch._dynamo.reset()
    assert run_job(job_for(model_module, model, x, store)).loaded


def test_a_dynamic_batch_compile_is_loaded_for_other_batch_sizes(model_module, tmp_path):
    store = SavedCompiles(tmp_path / "saved")
    model = model_module.Block()
    with torch.inference_mode():
        x2, x5 = torch.randn(2, 8), torch.randn(5, 8)
    run_job(job_for(model_module, model, x2, store, dynamic_batch=True))
    torch._dynamo.reset()
    loaded = run_job(job_for(model_module, model, x2, store, dynamic_batch=True))
    assert loaded.loaded
    with torch.inference_mode():
        assert agreement(loaded.runnable()(x5), model_module.call(model, x5), tolerance=1e-6).within_tolerance


def test_the_saved_compiles_take_at_most_the_disk_allowed_the_most_recently_used_kept(model_module, tmp_path):
    model = model_module.Block()
    one = run_job(job_for(model_module, model, torch.randn(2, 8), SavedCompiles(tmp_path / "saved")))
    size = one.saved_path.stat().st_size
    store = SavedCompiles(tmp_path / "saved", max_bytes=int(2.5 * size))  # room for two
    two = run_job(job_for(model_module, model, torch.randn(3, 8), store))
    torch._dynamo.reset()
    assert run_job(job_for(model_module, model, torch.randn(2, 8), store)).loaded  # batch 2 used again
    three = run_job(job_for(model_module, model, torch.randn(4, 8), store))
    kept = sorted((tmp_path / "saved").iterdir())
    assert kept == sorted([one.saved_path, three.saved_path])  # batch 3's, least recently used, went
    assert not two.saved_path.exists()


def test_the_most_recently_used_compiles_are_read_ahead_and_used_once_without_tracing(model_module, tmp_path):
    """A restarted server reads its latest saved compiles ahead (as a prompt is queued); a job for one of them
    takes it from memory on the prompt's thread, traces nothing, and agrees with eager; others read from disk."""
    store = SavedCompiles(tmp_path / "saved")
    model = model_module.Block()
    with torch.inference_mode():
        x_old, x_new = torch.randn(2, 8), torch.randn(3, 8)
    old, new = (run_job(job_for(model_module, model, x, store)) for x in (x_old, x_new))
    os.utime(old.saved_path, (time.time() - 60, time.time() - 60))  # used before the other

    torch._dynamo.reset()
    restarted = SavedCompiles(tmp_path / "saved")
    assert restarted.preload_recent(count=1) == [new.key]
    assert restarted.preload_recent(count=1) == []  # once per process
    traced_before = frames_traced()
    job = job_for(model_module, model, x_new, restarted)
    assert restarted.expecting(job.key)
    with torch.inference_mode():
        assert job.use_preloaded(timeout=60)
        output = job.runnable()(x_new.clone())
        expected = model_module.call(model, x_new)
    assert job.loaded and job.load_seconds is not None and job.error is None and job.saved_path is None
    assert frames_traced() == traced_before
    assert agreement(output, expected, tolerance=1e-6).within_tolerance
    assert restarted.take_preloaded(job.key) is None and not restarted.expecting(job.key)  # taken once

    # Read outside inference mode, a compile is not handed to a job in it (torch 2.11's guards would refuse).
    elsewhere = SavedCompiles(tmp_path / "saved")
    assert elsewhere.preload_recent(count=1, inference_mode=False) == [new.key]
    assert elsewhere.take_preloaded(new.key, timeout=60, inference_mode=True) is None

    # Another installation's files (another pack folder, whose module names the files refer to) are not
    # read ahead; one that cannot be read is left for its own installation's load to replace.
    assert SavedCompiles(tmp_path / "saved", installation="another").preload_recent() == []
    broken = SavedCompiles(tmp_path / "broken")
    broken.path("f" * 40).parent.mkdir()
    broken.path("f" * 40).write_bytes(b"not a compiled function")
    assert broken.preload_recent() == ["f" * 40]
    assert broken.take_preloaded("f" * 40, timeout=60) is None and broken.path("f" * 40).exists()

    other = job_for(model_module, model, x_old, restarted)  # not read ahead: read from disk by the worker
    with torch.inference_mode():
        assert not other.use_preloaded(timeout=0) and not other.done()
    run_job(other)
    assert other.loaded and other.load_seconds is None


def test_a_restarted_node_loads_the_unet_and_decoder_compiles_its_first_run_saved(
        comfy, sd15, capture_fails_for_compiled_kernels, monkeypatch, tmp_path, caplog):  # noqa: F811
    """Through ComfyUI: the first node compiles both parts in the background and saves them; after
    Dynamo's caches are reset (a new process), a new node's compile jobs load them, trace nothing, and
    the prompt agrees with eager."""
    stand_in = capture_fails_for_compiled_kernels
    stand_in.compiled_capture_fails = False
    background = sys.modules[stand_in.graphs_module.CompileJob.__module__]
    monkeypatch.setattr(background.STORE, "directory", tmp_path / "saved")
    # The attention ComfyUI picks on a CUDA GPU: its CPU choice asks psutil for free memory inside the
    # UNet, which no whole-graph compile can trace (so the UNet's compile would not be saved).
    import comfy.ldm.modules.attention as attention
    import comfy.ldm.modules.diffusionmodules.model as vae_model

    monkeypatch.setattr(attention, "optimized_attention", attention.attention_pytorch)
    monkeypatch.setattr(attention, "optimized_attention_masked", attention.attention_pytorch)
    monkeypatch.setattr(vae_model, "vae_attention", lambda: vae_model.pytorch_attention)

    def until_compiled(seed, max_shapes):
        def prompt(seed):
            built = reseeded(accelerated_prompt(sd15, "lcm", 2, accelerate=True), seed)
            built["accel"]["inputs"]["max_shapes"] = max_shapes  # a new node: ComfyUI runs it again
            return built

        comfy.run(prompt(seed))
        assert background.WORKER.wait_until_idle(timeout=300)
        return comfy.run(prompt(seed + 1))

    with caplog.at_level(logging.INFO, logger="fewstep.acceleration"):
        until_compiled(SEED, max_shapes=3)
        saved = sorted((tmp_path / "saved").glob(f"*{SUFFIX}"))
        assert len(saved) == 2  # the UNet's and the decoder's
        first_messages = [r.getMessage() for r in caplog.records if r.name == "fewstep.acceleration"]
        caplog.clear()
        torch._dynamo.reset()
        traced_before = frames_traced()
        result = until_compiled(SEED + 10, max_shapes=5)
        traced = frames_traced() - traced_before
    messages = [r.getMessage() for r in caplog.records if r.name == "fewstep.acceleration"]
    for part in ("UNet", "VAE decode"):
        assert any(m.startswith(f"FewStepAccelerate: captured {part} CUDA graph") and "saved on disk for a restart"
                   in m for m in first_messages), part
        assert any(m.startswith(f"FewStepAccelerate: captured {part} CUDA graph")
                   and "loaded from the compile saved on disk in" in m and "without tracing" in m
                   for m in messages), part
    assert not any("not saved" in m or "is not used" in m for m in first_messages + messages)
    assert traced == 0  # nothing compiled by Dynamo after the "restart"
    assert sorted((tmp_path / "saved").glob(f"*{SUFFIX}")) == saved
    eager = comfy.run(reseeded(accelerated_prompt(sd15, "lcm", 2, accelerate=False), SEED + 11))
    assert agreement(result.latent("save"), eager.latent("save"), tolerance=1e-5).within_tolerance

    # Restarted again, with the saved compiles read ahead as the prompt is queued (the server's on-prompt
    # hook): the first prompt's first call of each part captures the compiled code, with nothing before it.
    for name, fresh in (("_preload_started", False), ("_preloading", {}), ("_preloaded", {})):
        monkeypatch.setattr(background.STORE, name, fresh)
    caplog.clear()
    torch._dynamo.reset()
    traced_before = frames_traced()
    stand_in.attempts.clear()
    with caplog.at_level(logging.INFO, logger="fewstep.acceleration"):
        assert len(background.read_ahead_saved_compiles()) == 2
        assert background.STORE.wait_until_read(timeout=120)  # the server's checkpoint loading, here nothing
        queued = reseeded(accelerated_prompt(sd15, "lcm", 2, accelerate=True), SEED + 11)
        queued["accel"]["inputs"]["max_shapes"] = 6  # a new node: ComfyUI runs it again
        first = comfy.run(queued)
    messages = [r.getMessage() for r in caplog.records if r.name == "fewstep.acceleration"]
    assert stand_in.attempts == ["compiled", "compiled"], messages  # no graph of the eager kernels first
    for part in ("UNet", "VAE decode"):
        assert any(m.startswith(f"FewStepAccelerate: captured {part} CUDA graph") and "read ahead as the prompt "
                   "was queued, used from the shape's first call, without tracing" in m for m in messages), part
    assert not any("compiles it in the background" in m for m in messages)
    assert compiles_pending("\n".join(messages)) == 0  # what the server benches wait on reads these lines
    assert frames_traced() == traced_before
    assert agreement(first.latent("save"), eager.latent("save"), tolerance=1e-5).within_tolerance


def test_a_queued_accelerated_prompt_reads_the_saved_compiles_ahead_through_main_py(comfy_server, server_sd15):
    """Through a real main.py: the pack's on-prompt hook starts the reading as a prompt with Few-Step
    Accelerate is queued, not for one without it (the reading's line in the server's log, once per process)."""
    line = "most recently used saved compiles ahead in"
    before = comfy_server.log_path.read_text(errors="replace")
    comfy_server.run(reseeded(accelerated_prompt(server_sd15, "lcm", 2, accelerate=False), SEED))
    assert comfy_server.log_path.read_text(errors="replace")[len(before):].count(line) == 0
    comfy_server.run(reseeded(accelerated_prompt(server_sd15, "lcm", 2, accelerate=True), SEED))
    deadline = time.monotonic() + 60
    while line not in comfy_server.log_path.read_text(errors="replace") and time.monotonic() < deadline:
        time.sleep(0.2)
    assert comfy_server.log_path.read_text(errors="replace").count(line) == 1


def test_the_model_call_form_keeps_other_packs_wrappers_by_not_saving(comfy):
    """Where another pack's wrapper runs after Few-Step Accelerate's, the saved form (which calls the
    model function itself) would leave it out: such calls are compiled as before, not saved."""
    from comfy.patcher_extension import WrapperExecutor

    node_module = loaded_node_module(comfy)
    innermost = node_module.innermost
    ours = lambda executor, *args: executor(*args)  # noqa: E731
    theirs = lambda executor, *args: executor(*args)  # noqa: E731
    assert innermost(WrapperExecutor.new_executor(print, [ours], idx=0))
    assert not innermost(WrapperExecutor.new_executor(print, [ours, theirs], idx=0))
    assert innermost(WrapperExecutor.new_executor(print, [theirs, ours], idx=1))


def test_the_key_leaves_out_the_server_flags_no_model_code_reads(comfy, monkeypatch):
    """A restarted server listens on another port or writes to another folder: its saved compiles must
    still be found; a flag that changes the model code (the attention) must find others."""
    from comfy.cli_args import args

    node_module = loaded_node_module(comfy)
    before = node_module.comfyui_settings()
    monkeypatch.setattr(args, "port", args.port + 1)
    monkeypatch.setattr(args, "output_directory", "/elsewhere")
    monkeypatch.setattr(args, "disable_cuda_malloc", not args.disable_cuda_malloc)
    assert node_module.comfyui_settings() == before
    monkeypatch.setattr(args, "use_sage_attention", not args.use_sage_attention)
    assert node_module.comfyui_settings() != before


def test_the_worker_loads_a_saved_compile_without_waiting_for_the_prompt_to_end(model_module, tmp_path):
    """A compile waits for a quiet second after the prompt's runs (its tracing would slow them); loading a
    saved one traces nothing and starts while the prompt still runs."""
    from comfyui_fewstep.fewstep.acceleration.background import ACTIVITY, QUIET_SECONDS, CompileWorker

    store = SavedCompiles(tmp_path / "saved")
    model = model_module.Block()
    with torch.inference_mode():
        x = torch.randn(2, 8)
    first = job_for(model_module, model, x, store)
    assert not first.saved_on_disk()
    run_job(first)
    torch._dynamo.reset()
    worker = CompileWorker()
    with ACTIVITY.open():  # a prompt is running
        job = worker.submit(job_for(model_module, model, x, store))
        assert job.saved_on_disk()
        assert worker.wait_until_idle(timeout=60)
        assert job.loaded and job.error is None
        fresh = worker.submit(job_for(model_module, model, torch.randn(3, 8), store))  # nothing saved: waits
        assert not worker.wait_until_idle(timeout=QUIET_SECONDS + 0.5) and not fresh.done()
    assert worker.wait_until_idle(timeout=120) and fresh.saved_path is not None


def test_the_prompt_hook_reads_ahead_only_for_prompts_that_compile_with_few_step_accelerate(comfy, monkeypatch):
    routes = sys.modules[loaded_node_module(comfy).__name__.rpartition(".")[0] + ".routes"]
    started = []
    monkeypatch.setattr(routes, "read_ahead_saved_compiles", lambda: started.append(True) or [])

    def queued(**inputs):
        return {"prompt": {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {}},
                           "2": {"class_type": "FewStepAccelerate", "inputs": inputs}}}

    plain = {"prompt": {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {}}}}
    for request, reads in ((plain, 0), (queued(compile_kernels=False), 0), (queued(), 1),
                           (queued(compile_kernels=True), 1), ({"prompt": "not a prompt"}, 0), (None, 0)):
        started.clear()
        assert routes.read_ahead_for_accelerated_prompts(request) is request  # passed on unchanged
        assert len(started) == reads, request
