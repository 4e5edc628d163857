"""The GPU benches' CPU-checkable parts: bench/gpu_profile.py's reading of a torch.profiler trace, on
a trace written here, and bench/gpu.py's interleaved native/FewStep pairs, run with --smoke.

The profile it reads comes from a GPU; the arithmetic on it (busy time, idle gaps charged to the
Python stack, GPU time per replayed graph) is pure and checked on a trace whose answers are known.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from comfy_harness import PACK_ROOT, require_comfyui

sys.path.insert(0, str(PACK_ROOT / "bench"))
import gpu_profile  # noqa: E402


def event(name, ts, dur, cat, tid=1, **args):
    return {"ph": "X", "name": name, "ts": ts, "dur": dur, "cat": cat, "tid": tid, "pid": 1, "args": args}


def test_stacks_at_rebuilds_the_nested_python_calls():
    calls = sorted([event("A", 0, 100, "python_function"), event("B", 10, 40, "python_function"),
                    event("C", 20, 10, "python_function"), event("D", 60, 30, "python_function")],
                   key=lambda e: (e["ts"], -e["dur"]))
    stacks = [[e["name"] for e in stack] for stack in gpu_profile.stacks_at(calls, [5, 25, 55, 70, 95, 120])]
    assert stacks == [["A"], ["A", "B", "C"], ["A"], ["A", "D"], ["A"], []]


def test_union_counts_overlaps_once():
    assert gpu_profile.union_us([(0, 10), (5, 15), (20, 30), (22, 25)]) == 25


@pytest.mark.parametrize("name, family", [
    ("nvjet_sm90_hsh_80x128_64x8_2x1_v_bz_bias_TNN", "matrix product (cuBLAS)"),
    ("sm90_xmma_fprop_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc", "convolution (cuDNN)"),
    ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16", "attention (SDPA)"),
    ("triton_red_fused_native_group_norm_45", "triton red"),
])
def test_kernel_families(name, family):
    assert gpu_profile.kernel_family(name) == family


def test_read_trace_charges_idle_time_to_the_python_stack_and_times_each_graph(tmp_path):
    # One prompt, 0–1000 µs. The host is in `prepare` until 100, then launches a graph (correlation 7)
    # from `diffusion_model`, whose two kernels run 100–300 and 400–900; the GPU idles 0–100 (in
    # `prepare`), 300–400 (inside the graph) and 900–1000 (in `finish`).
    events = [
        event("prompt 0", 0, 1000, "user_annotation"),
        event("execute", 0, 1000, "python_function"),
        event("prepare", 0, 100, "python_function"),
        event("diffusion_model", 100, 20, "python_function"),
        event("finish", 900, 100, "python_function"),
        event("cudaGraphLaunch", 105, 10, "cuda_runtime", correlation=7),
        event("nvjet_sm90_gemm", 100, 200, "kernel", tid=7, correlation=7),
        event("triton_poi_fused_add_0", 400, 500, "kernel", tid=7, correlation=7),
    ]
    path = tmp_path / "trace.json"
    path.write_text(json.dumps({"traceEvents": events}))
    summary = gpu_profile.read_trace(path)

    assert summary["prompts"] == 1 and summary["wall_ms"] == pytest.approx(1.0)
    assert summary["gpu_busy_ms"] == pytest.approx(0.7) and summary["idle_ms"] == pytest.approx(0.3)
    idle = summary["idle_by_function_ms"]
    assert idle["execute"] == pytest.approx(0.3)
    assert idle["prepare"] == pytest.approx(0.1) and idle["finish"] == pytest.approx(0.1)
    assert summary["graphs"] == {"diffusion_model": {"launches_per_prompt": 1.0, "busy_ms": pytest.approx(0.7),
                                                      "span_ms": pytest.approx(0.8)}}
    assert summary["kernel_families_ms"] == {"matrix product (cuBLAS)": pytest.approx(0.2),
                                             "triton poi": pytest.approx(0.5)}


def test_gpu_bench_smoke_times_native_and_fewstep_in_interleaved_pairs(tmp_path):
    """bench/gpu.py --paired in real ComfyUI on the tiny SDXL model (CPU): each batch size gets its
    pairs, and the FewStep / native verdict is taken from them."""
    comfyui = require_comfyui()
    environment = {**os.environ, "COMFYUI_PATH": str(comfyui)}
    run = subprocess.run([sys.executable, str(PACK_ROOT / "bench" / "gpu.py"), "--smoke", "--configs", "turbo",
                          "--paired", "2", "--paired-only", "--out", str(tmp_path)],
                         env=environment, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    paired = json.loads((tmp_path / "results.json").read_text())["results"]["turbo"]["paired"]
    for batch in ("b1", "b4"):
        assert paired[batch]["pairs"] == 2
        assert paired[batch]["native_ms"] > 0 and paired[batch]["fewstep_ms"] > 0
        assert paired[batch]["ratio_median"] == pytest.approx(
            paired[batch]["ratio_quartiles"][1])  # the middle quartile is the median
    assert "median of 2 interleaved pairs" in (tmp_path / "results.md").read_text()
