"""A capture's check for waits on the GPU is process-wide in torch: while the prompt thread checks a
warm-up run (captured_graph.host_syncs_are_errors, torch.cuda.set_sync_debug_mode("error")), a wait on
any other thread is refused too. The compile worker's job and a saved compile's reading that are
refused this way run again, and the saved file is kept.

CI has no GPU, so the refusal is stood in for by torch's own error raised where a wait would be refused
(inside the compiler backend, inside the file's loading); the job, the worker's retries, the store and
its files are real (Dynamo, AOTAutograd, torch's saved-compile format).
"""
from __future__ import annotations

import logging
import threading

import pytest
import torch

from test_saved_compiles import job_for, model_module  # noqa: F401 — a fixture

from comfyui_fewstep.fewstep.acceleration import agreement
from comfyui_fewstep.fewstep.acceleration.background import CompileJob
from comfyui_fewstep.fewstep.acceleration.captured_graph import (HOST_SYNC_REFUSED, SYNC_CHECK_RETRIES, SYNC_CHECKS,
                                                                interrupted_by_a_sync_check)
from comfyui_fewstep.fewstep.acceleration.saved_compiles import SavedCompiles


def refusing_backend(refusals: int, error: str = HOST_SYNC_REFUSED):
    """aot_eager, whose first `refusals` compiles raise `error` (as torch does for a wait it refuses)."""
    real, calls = torch._dynamo.lookup_backend("aot_eager"), []

    def backend(graph_module, example_inputs):
        calls.append(len(calls))
        if len(calls) <= refusals:
            raise RuntimeError(error)
        return real(graph_module, example_inputs)

    return backend, calls


def job_with(module, backend) -> tuple[CompileJob, torch.Tensor, torch.Tensor]:
    torch._dynamo.reset()
    model = module.Block()
    with torch.inference_mode():
        x = torch.randn(2, 8)
        expected = module.call(model, x)
        job = CompileJob(lambda x: module.call(model, x), [x], backend)
        job.run()
    return job, x, expected


def test_the_refusal_is_told_apart_from_other_errors():
    assert interrupted_by_a_sync_check(RuntimeError(f"CUDA error: {HOST_SYNC_REFUSED}"))
    assert not interrupted_by_a_sync_check(RuntimeError("CUDA error: an illegal memory access was encountered"))
    assert not interrupted_by_a_sync_check(ValueError(HOST_SYNC_REFUSED))


def test_a_compile_refused_a_wait_by_another_threads_check_runs_again(model_module, caplog):
    backend, calls = refusing_backend(refusals=1)
    with caplog.at_level(logging.INFO, logger="fewstep.acceleration"):
        job, x, expected = job_with(model_module, backend)
    assert job.error is None and len(calls) == 2  # refused once (torch wraps it: BackendCompilerFailed), then compiled
    assert "running the compile again" in caplog.text
    runs_before = job.compiled_runs
    with torch.inference_mode():
        output = job.runnable()(x.clone())
    job.check_compiled_code_ran(runs_before)
    assert agreement(output, expected, tolerance=1e-6).within_tolerance


def test_a_refused_compile_runs_again_only_once_the_check_has_ended(model_module):
    """The check lasts a warm-up run; an attempt made at once would meet the same check."""
    backend, calls = refusing_backend(refusals=1)
    finished = threading.Event()
    with SYNC_CHECKS.open():  # the prompt thread's warm-up run, checked
        worker = threading.Thread(target=lambda: (job_with(model_module, backend), finished.set()))
        worker.start()
        assert not finished.wait(timeout=10) and len(calls) == 1  # refused, and waiting
    assert finished.wait(timeout=120) and len(calls) == 2
    worker.join()


def test_a_compile_refused_every_time_or_failing_otherwise_reports_its_error(model_module):
    backend, calls = refusing_backend(refusals=1 + SYNC_CHECK_RETRIES)
    job, _, _ = job_with(model_module, backend)
    assert interrupted_by_a_sync_check(job.error) and len(calls) == 1 + SYNC_CHECK_RETRIES

    backend, calls = refusing_backend(refusals=1, error="CUDA error: out of memory")
    job, _, _ = job_with(model_module, backend)
    assert job.error is not None and "out of memory" in str(job.error) and len(calls) == 1  # not run again


def test_an_ahead_of_time_compile_refused_a_wait_runs_again_and_is_saved(model_module, tmp_path, monkeypatch):
    from comfyui_fewstep.fewstep.acceleration import background

    compile_ahead, calls = background.aot_compile, []

    def refused_at_first(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError(HOST_SYNC_REFUSED)
        return compile_ahead(*args, **kwargs)

    monkeypatch.setattr(background, "aot_compile", refused_at_first)
    torch._dynamo.reset()
    store = SavedCompiles(tmp_path / "saved")
    with torch.inference_mode():
        job = job_for(model_module, model_module.Block(), torch.randn(2, 8), store)
        job.run()
    # Not taken for a form torch cannot save (which would leave the usual compile, unsaved).
    assert job.error is None and job.save_problem is None and len(calls) == 2
    assert job.saved is not None and job.saved_path.exists()


def test_a_saving_refused_a_wait_is_tried_again(model_module, tmp_path, monkeypatch):
    store = SavedCompiles(tmp_path / "saved")
    save, tries = store.save, []

    def refused_at_first(key, function):
        tries.append(1)
        if len(tries) == 1:
            raise RuntimeError(HOST_SYNC_REFUSED)
        return save(key, function)

    monkeypatch.setattr(store, "save", refused_at_first)
    torch._dynamo.reset()
    with torch.inference_mode():
        job = job_for(model_module, model_module.Block(), torch.randn(2, 8), store)
        job.run()
    assert job.error is None and job.save_problem is None and len(tries) == 2 and job.saved_path.exists()


@pytest.mark.parametrize("refusals", [1, 1 + SYNC_CHECK_RETRIES])
def test_a_reading_refused_a_wait_is_read_again_and_the_file_kept(model_module, tmp_path, monkeypatch, refusals):
    store = SavedCompiles(tmp_path / "saved")
    model = model_module.Block()
    with torch.inference_mode():
        x = torch.randn(2, 8)
        job = job_for(model_module, model, x, store)
        job.run()
    assert job.error is None and job.saved_path.exists()
    size = job.saved_path.stat().st_size

    load, tries = torch.compiler.load_compiled_function, []

    def refused_at_first(file, *args, **kwargs):
        tries.append(1)
        if len(tries) <= refusals:
            raise RuntimeError(HOST_SYNC_REFUSED)
        return load(file, *args, **kwargs)

    monkeypatch.setattr(torch.compiler, "load_compiled_function", refused_at_first)
    torch._dynamo.reset()
    function, why = store.read(job.saved_path)  # as a job's own load: an unreadable file would be deleted
    if refusals <= SYNC_CHECK_RETRIES:
        assert function is not None and why is None and len(tries) == refusals + 1
    else:
        assert function is None and HOST_SYNC_REFUSED in why and len(tries) == refusals
    assert job.saved_path.exists() and job.saved_path.stat().st_size == size  # the file is not at fault


@pytest.mark.skipif(not torch.cuda.is_available(), reason="torch's check is for CUDA operations")
def test_on_a_gpu_the_check_refuses_other_threads_waits_but_not_a_wait_through_an_event():
    """What the retries and wait_for rest on, as torch does it on a GPU: the check is process-wide, a
    stream's synchronisation and a copy to the host are refused on another thread, an event's is not."""
    from comfyui_fewstep.fewstep.acceleration.captured_graph import host_syncs_are_errors, wait_for

    x = torch.randn(1024, 1024, device="cuda")
    outcomes = {}

    def attempt(name, action):
        try:
            action()
            outcomes[name] = "passed"
        except RuntimeError as error:
            outcomes[name] = "refused" if interrupted_by_a_sync_check(error) else repr(error)

    def on_another_thread():
        stream = torch.cuda.Stream()
        with torch.cuda.stream(stream):
            y = x @ x
        attempt("event", lambda: wait_for(stream))
        attempt("stream", stream.synchronize)
        attempt("to the host", lambda: y[:2, :2].cpu())

    with host_syncs_are_errors():
        thread = threading.Thread(target=on_another_thread)
        thread.start()
        thread.join(30)
    assert not thread.is_alive(), "a wait on the other thread hung"
    assert outcomes == {"event": "passed", "stream": "refused", "to the host": "refused"}
