"""Process-wide state that the pack holds changed for a while (fewstep.acceleration.process_settings):
overlapping blocks on several threads give a setting back as they found it, and a saved compile is read
without starting Inductor's pool of compile worker processes."""
from __future__ import annotations

import os
import subprocess
import sys
import threading

import pytest
import torch
from torch._inductor.async_compile import AsyncCompile

from comfyui_fewstep.fewstep.acceleration.process_settings import (HeldSetting, no_compile_worker_processes,
                                                                   shorter_switch_interval)
from comfyui_fewstep.fewstep.acceleration.saved_compiles import SavedCompiles, SavedForm, aot_compile


def test_overlapping_blocks_on_threads_hold_the_smallest_and_give_back_the_saved_value():
    value = {"now": 5.0}
    setting = HeldSetting(lambda: value["now"], lambda v: value.__setitem__("now", v),
                          lambda saved, held: min([saved, *held]))
    first_in, second_in, first_read, first_may_end = (threading.Event() for _ in range(4))
    seen = {}

    def first():
        with setting.held(2.0):
            first_in.set()
            second_in.wait(5)
            seen["both"] = value["now"]
            first_read.set()
            first_may_end.wait(5)
        seen["after_first"] = value["now"]

    thread = threading.Thread(target=first)
    thread.start()
    first_in.wait(5)
    with setting.held(1.0):  # opened second, ends first
        second_in.set()
        first_read.wait(5)
    seen["after_second"] = value["now"]
    first_may_end.set()
    thread.join(5)
    assert seen == {"both": 1.0, "after_second": 2.0, "after_first": 5.0}


def test_the_switch_interval_comes_back():
    before = sys.getswitchinterval()
    with shorter_switch_interval(before / 10):
        assert sys.getswitchinterval() == before / 10
        with shorter_switch_interval(before * 10):  # never longer than the process's own
            assert sys.getswitchinterval() == before / 10
    assert sys.getswitchinterval() == before


# Inductor's pool is once per process, and an earlier test's compile may have started it: the two tests
# of it run in a process of their own (test_the_pool_tests_in_a_fresh_process), skipped in the suite's.
FRESH = os.environ.get("FEWSTEP_FRESH_PROCESS") == "1"
in_a_fresh_process = pytest.mark.skipif(not FRESH, reason="run by test_the_pool_tests_in_a_fresh_process")


def test_the_pool_tests_in_a_fresh_process():
    if FRESH:
        pytest.skip("this is the fresh process")
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "pool",
                             "-rs", __file__], env={**os.environ, "FEWSTEP_FRESH_PROCESS": "1"},
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0 and "2 passed" in result.stdout, result.stdout[-3000:] + result.stderr[-2000:]


def pool_started() -> bool:
    return AsyncCompile.process_pool.cache_info().currsize > 0


@in_a_fresh_process
def test_held_back_the_pool_is_not_ready_nor_started_and_a_waiter_is_released_at_the_end():
    assert AsyncCompile._ready_future is None and not pool_started()  # a fresh test process
    released = {}
    with torch._inductor.config.patch(compile_threads=4):  # a pool would be used, were it ready
        with no_compile_worker_processes():
            with no_compile_worker_processes():  # another thread's reading, overlapping
                assert AsyncCompile.use_process_pool() is False
            assert AsyncCompile.use_process_pool() is False
            waiting = AsyncCompile._ready_future  # as a compile waiting for the pool to be ready does
            waiter = threading.Thread(target=lambda: released.setdefault("result", waiting.result(10)))
            waiter.start()
        waiter.join(10)
        assert released == {"result": "held back"}
        assert AsyncCompile._ready_future is None and not pool_started()


def scaled(x):
    return torch.nn.functional.gelu(x) * 3


@in_a_fresh_process
def test_a_saved_compile_is_read_without_the_pool_being_started(tmp_path, monkeypatch):
    store = SavedCompiles(tmp_path / "saved")
    x = torch.randn(2, 8)
    form = SavedForm(scaled, (), {"test": "threads"})
    function = aot_compile(form, [x], "aot_eager", None, dynamic=False)
    path = store.save("threads", function)

    real_load, pool_used = torch.compiler.load_compiled_function, []

    def load_asking_for_the_pool(file, *args, **kwargs):
        # What a Triton kernel's loading asks first (AsyncCompile.triton); the CPU has none to load.
        pool_used.append(AsyncCompile.use_process_pool())
        return real_load(file, *args, **kwargs)

    monkeypatch.setattr(torch.compiler, "load_compiled_function", load_asking_for_the_pool)
    torch._dynamo.reset()
    with torch._inductor.config.patch(compile_threads=4):
        loaded, why = store.read(path)
    assert why is None and pool_used == [False] and not pool_started()
    assert torch.allclose(loaded(x), scaled(x))


def test_a_setting_that_cannot_be_written_is_not_left_held():
    value = {"now": 5.0}

    def write(v):
        if v <= 0:
            raise ValueError("must be positive")
        value["now"] = v

    setting = HeldSetting(lambda: value["now"], write, lambda saved, held: min([saved, *held]))
    with pytest.raises(ValueError):
        with setting.held(0.0):
            pass
    with setting.held(2.0):
        assert value["now"] == 2.0
    assert value["now"] == 5.0
