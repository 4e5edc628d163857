"""Process-wide settings that the pack holds changed for a while (fewstep.acceleration.process_settings):
overlapping blocks on several threads give the setting back as they found it, and a saved compile is
read with Inductor's compile threads at 1 (so its pool of worker processes is not started) except
while a compile runs, which wants that pool."""
from __future__ import annotations

import sys
import threading

import torch

from comfyui_fewstep.fewstep.acceleration import process_settings
from comfyui_fewstep.fewstep.acceleration.process_settings import (HeldSetting, inductor_compiling,
                                                                   no_compile_worker_processes,
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


def test_loads_hold_the_compile_threads_at_one_unless_a_compile_runs():
    config = torch._inductor.config
    before = config.compile_threads
    with no_compile_worker_processes():
        assert config.compile_threads == 1
    assert config.compile_threads == before

    compiling, may_end = threading.Event(), threading.Event()

    def compile_on_the_worker():
        with inductor_compiling():
            compiling.set()
            may_end.wait(5)

    worker = threading.Thread(target=compile_on_the_worker)
    worker.start()
    compiling.wait(5)
    try:
        with no_compile_worker_processes():  # the compile's futures need its threads
            assert config.compile_threads == before
    finally:
        may_end.set()
        worker.join(5)
    assert config.compile_threads == before


def scaled(x):
    return torch.nn.functional.gelu(x) * 3


def test_a_saved_compile_is_read_with_the_compile_threads_at_one(tmp_path, monkeypatch):
    store = SavedCompiles(tmp_path / "saved")
    x = torch.randn(2, 8)
    form = SavedForm(scaled, (), {"test": "threads"})
    function = aot_compile(form, [x], "aot_eager", None, dynamic=False)
    path = store.save("threads", function)

    real_load, seen = torch.compiler.load_compiled_function, []

    def load_seeing_the_threads(file, *args, **kwargs):
        seen.append(process_settings._compile_threads())
        return real_load(file, *args, **kwargs)

    monkeypatch.setattr(torch.compiler, "load_compiled_function", load_seeing_the_threads)
    torch._dynamo.reset()
    loaded, why = store.read(path)
    assert why is None and seen == [1]
    assert torch.allclose(loaded(x), scaled(x))
