"""The GPU benches' CPU-checkable parts: bench/gpu_profile.py's reading of a torch.profiler trace, on
a trace written here, and bench/gpu.py's interleaved native/FewStep pairs and per-stage times, run with --smoke.

The profile it reads comes from a GPU; the arithmetic on it (busy time, idle gaps charged to the
Python stack, GPU time per replayed graph) is pure and checked on a trace whose answers are known.
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys

import pytest

from comfy_harness import PACK_ROOT, require_comfyui

import trace_reading
from interleaved_pairs import interleaved_pairs


# bench/gpu.py's table as it reports it: its columns, the ablation column, the word for a skipped cell, and
# the stages of a prompt.
COLUMNS = ["diffusers eager", "ComfyUI native", "ComfyUI + FewStep", "ComfyUI + FewStep accelerated"]
COMFYUI_COLUMNS = COLUMNS[1:]
ABLATION = "accelerated, CUDA graphs only"
SKIPPED = "skipped: over the time budget"
STAGES = ["before sampling", "sampling", "to decode", "decode", "after decode"]


def event(name, ts, dur, cat, tid=1, **args):
    return {"ph": "X", "name": name, "ts": ts, "dur": dur, "cat": cat, "tid": tid, "pid": 1, "args": args}


def test_stacks_at_rebuilds_the_nested_python_calls():
    calls = sorted([event("A", 0, 100, "python_function"), event("B", 10, 40, "python_function"),
                    event("C", 20, 10, "python_function"), event("D", 60, 30, "python_function")],
                   key=lambda e: (e["ts"], -e["dur"]))
    stacks = [[e["name"] for e in stack] for stack in trace_reading.stacks_at(calls, [5, 25, 55, 70, 95, 120])]
    assert stacks == [["A"], ["A", "B", "C"], ["A"], ["A", "D"], ["A"], []]


def test_union_counts_overlaps_once():
    assert trace_reading.union_us([(0, 10), (5, 15), (20, 30), (22, 25)]) == 25


@pytest.mark.parametrize("name, family", [
    ("nvjet_sm90_hsh_80x128_64x8_2x1_v_bz_bias_TNN", "matrix product (cuBLAS)"),
    ("sm90_xmma_fprop_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc", "convolution (cuDNN)"),
    ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16", "attention (SDPA)"),
    ("triton_red_fused_native_group_norm_45", "triton red"),
    ("sm90_xmma_gemm_f16f16_f16f32_f32_tn_n_tilesize128x128x64", "matrix product (cuBLAS)"),
    ("fmha_cutlassF_bf16_aligned_32x128_gmem_sm80", "attention (SDPA)"),
])
def test_kernel_families(name, family):
    assert trace_reading.kernel_family(name) == family


def test_read_trace_charges_idle_time_to_the_python_stack_and_times_each_graph(tmp_path):
    # One prompt, 0–1000 µs. The host is in `prepare` until 100, then launches a graph (correlation 7)
    # from `diffusion_model`, whose two kernels run 100–300 and 400–900; the GPU idles 0–100 (in
    # `prepare`), 300–400 (inside the graph) and 900–1000 (in `finish`).
    events = [
        event("prompt 0", 0, 1000, "user_annotation"),
        event("execute", 0, 1000, "python_function"),
        event("prepare", 0, 100, "python_function"),
        event("prepare", 10, 50, "python_function"),  # a recursive call: counted, its time not again
        event("diffusion_model", 100, 20, "python_function"),
        event("finish", 900, 100, "python_function"),
        event("cudaGraphLaunch", 105, 10, "cuda_runtime", correlation=7),
        event("nvjet_sm90_gemm", 100, 200, "kernel", tid=7, correlation=7),
        event("triton_poi_fused_add_0", 400, 500, "kernel", tid=7, correlation=7),
    ]
    path = tmp_path / "trace.json"
    path.write_text(json.dumps({"traceEvents": events}))
    summary = trace_reading.read_trace(path)

    assert summary["prompts"] == 1 and summary["wall_ms"] == pytest.approx(1.0)
    assert summary["gpu_busy_ms"] == pytest.approx(0.7) and summary["idle_ms"] == pytest.approx(0.3)
    idle = summary["idle_by_function_ms"]
    assert idle["execute"] == pytest.approx(0.3)
    assert idle["prepare"] == pytest.approx(0.1) and idle["finish"] == pytest.approx(0.1)
    graph = summary["graphs"]["diffusion_model"]
    assert (graph["launches_per_prompt"], graph["kernels_per_replay"]) == (1.0, 2)
    assert graph["busy_ms"] == pytest.approx(0.7) and graph["span_ms"] == pytest.approx(0.8)
    assert graph["families_ms_per_replay"] == {"triton poi": pytest.approx(0.5),
                                               "matrix product (cuBLAS)": pytest.approx(0.2)}
    assert summary["kernel_families_ms"] == {"matrix product (cuBLAS)": pytest.approx(0.2),
                                             "triton poi": pytest.approx(0.5)}
    host = summary["host_functions_per_prompt"]
    assert host["execute"] == {"calls": 1, "ms_traced": pytest.approx(1.0)}
    assert host["prepare"] == {"calls": 2, "ms_traced": pytest.approx(0.1)}
    assert host["diffusion_model"]["ms_traced"] == pytest.approx(0.02)
    assert list(host)[0] == "execute"  # most host time first


def test_gpu_bench_smoke_times_pairs_and_the_stages_of_each_prompt(tmp_path):
    """bench/gpu.py --paired in real ComfyUI on the tiny SDXL model (CPU): each batch size gets its
    pairs, and the FewStep / native verdict is taken from them; every ComfyUI cell splits its batch-1
    prompt into stages (sampling entered and left, decode entered and left) that add up to its e2e."""
    comfyui = require_comfyui()
    environment = {**os.environ, "COMFYUI_PATH": str(comfyui)}
    run = subprocess.run([sys.executable, str(PACK_ROOT / "bench" / "gpu.py"), "--smoke", "--configs", "turbo",
                          "--paired", "2", "--out", str(tmp_path)],
                         env=environment, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())["results"]["turbo"]
    paired = results["paired"]
    for batch in ("b1", "b4"):
        assert paired[batch]["pairs"] == 2
        assert paired[batch]["native_ms"] > 0 and paired[batch]["fewstep_ms"] > 0
    report = (tmp_path / "results.md").read_text()
    assert "median of 2 interleaved pairs" in report

    for column in COMFYUI_COLUMNS:
        cell = results[column]
        phases = cell["phases_ms"]
        assert list(phases) == STAGES and all(value >= 0 for value in phases.values()), (column, phases)
        # one timed run (smoke): its stages are consecutive pieces of that run's e2e
        assert sum(phases.values()) == pytest.approx(cell["e2e_ms"], rel=1e-6), (column, phases, cell["e2e_ms"])
        assert phases["sampling"] >= cell["unet_ms"] and phases["decode"] == pytest.approx(cell["vae_ms"], rel=0.05)
        assert f"| {column} | {cell['e2e_ms']:.1f} | {phases['before sampling']:.1f} |" in report


def test_paired_runs_alternate_the_order_and_divide_each_pair():
    """interleaved_pairs (bench/gpu.py --paired) with ComfyUI stood in for by a clock: native takes
    100 ms, FewStep 90, and the host slows by 10 ms a run."""
    order, times = [], []

    def clock(route, batch, seed):
        order.append(route)
        times.append((100.0 if route == "native" else 90.0) + 10.0 * len(order))
        return times[-1]

    paired = interleaved_pairs(clock, pairs=4, warm_seed=1, first_seed=500)

    # per batch: one warm-up run of each, then the pairs, native first in every other one
    assert order[:10] == ["native", "fewstep", "native", "fewstep", "fewstep", "native", "native", "fewstep",
                          "fewstep", "native"]
    b1 = list(zip(order[2:10], times[2:10]))
    native = [t for route, t in b1 if route == "native"]
    fewstep = [t for route, t in b1 if route == "fewstep"]
    assert paired["b1"]["ratio_median"] == pytest.approx(statistics.median(f / n for f, n in zip(fewstep, native)))
    assert paired["b1"]["native_ms"] == statistics.median(native)
    assert paired["b1"]["pairs"] == paired["b4"]["pairs"] == 4 and len(order) == 20


def test_gpu_bench_reports_cells_skipped_for_the_time_budget_without_failing(tmp_path):
    """--budget-s spent before any cell starts: every cell and the pairs are reported as skipped, and
    the run still exits 0 (a skip is the budget doing its job, not a failed measurement)."""
    comfyui = require_comfyui()
    environment = {**os.environ, "COMFYUI_PATH": str(comfyui)}
    run = subprocess.run([sys.executable, str(PACK_ROOT / "bench" / "gpu.py"), "--smoke", "--configs", "turbo",
                          "--ablation", "--paired", "2", "--budget-s", "0", "--out", str(tmp_path)],
                         env=environment, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())["results"]["turbo"]
    for column in [*COLUMNS, ABLATION]:
        assert results[column]["error"] == SKIPPED, column
    assert results["paired"] == {"error": SKIPPED}
    report = (tmp_path / "results.md").read_text()
    assert report.count(f"| {SKIPPED} |") == len(COLUMNS) + 1 and "failed" not in report
    assert f"pairs not measured ({SKIPPED})" in report


def test_gpu_bench_flow_rows_smoke(tmp_path):
    """bench/gpu.py's FLUX.1-schnell and SD3.5 Large Turbo rows on the tiny transformers (CPU): diffusers'
    pipelines and the three ComfyUI columns, fed the same conditioning, each timed at batch 1 with its
    transformer calls and decode; the accelerated column agrees with the eager one."""
    comfyui = require_comfyui()
    environment = {**os.environ, "COMFYUI_PATH": str(comfyui)}
    run = subprocess.run([sys.executable, str(PACK_ROOT / "bench" / "gpu.py"), "--smoke", "--configs",
                          "flux_schnell,sd35_turbo", "--out", str(tmp_path)],
                         env=environment, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())["results"]
    for key in ("flux_schnell", "sd35_turbo"):
        for column in COLUMNS:
            cell = results[key][column]
            assert not cell["error"], (key, column, cell["error"])
            assert cell["e2e_ms"] > 0 and cell["unet_ms"] > 0 and cell["vae_ms"] > 0, (key, column)
            assert cell["e2e4_ms"] is None and cell["text_ms"] is None  # batch 1 only; no text encoders
        check = results[key][COLUMNS[3]]["check"]
        assert list(check) == ["b1"] and check["b1"]["finite"] is True
    report = (tmp_path / "results.md").read_text()
    assert "| FLUX.1-schnell 4-step 64², tiny model | ComfyUI native |" in report
    assert "KSampler euler sgm_uniform cfg 1.2" in report


def test_unet_levers_smoke(tmp_path):
    """bench/unet_levers.py --smoke on the tiny SDXL UNet (CPU, aot_eager), one process per variant: fused
    projections compute what the UNet's own do, and FP8 linear layers stay near them."""
    comfyui = require_comfyui()
    environment = {**os.environ, "COMFYUI_PATH": str(comfyui)}
    run = subprocess.run([sys.executable, str(PACK_ROOT / "bench" / "unet_levers.py"), "--smoke", "--reps", "3", "--turn-timeout-s", "240",
                          "--variants", "fused", "fp8_fused", "--out", str(tmp_path)],
                         env=environment, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    variants = json.loads((tmp_path / "results.json").read_text())["variants"]
    fused, fp8 = variants["fused"]["sizes"]["64"], variants["fp8_fused"]["sizes"]["64"]
    assert fused["relative_l2_to_fp16_eager"] < 1e-5 and fused["ms_per_call"]["median"] > 0
    assert 1e-4 < fp8["relative_l2_to_fp16_eager"] < 0.1  # FP8's rounding shows, and no more than that
    assert variants["fp8_fused"]["fp8_linears"] > 0 and variants["fused"]["fp8_linears"] == 0
    assert "| fp8_fused |" in (tmp_path / "table.md").read_text()
