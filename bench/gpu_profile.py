"""Where the accelerated path's time goes: a torch.profiler trace of FewStepAccelerate prompts, read back.

bench/gpu.py gives the table; this says, for one model, what fills each end-to-end run:
- the GPU's busy time per prompt, by kernel family (matrix products, convolutions, attention,
  Triton kernels, copies), and per replayed CUDA graph (UNet step, VAE decode);
- the time the GPU sits idle inside a prompt, charged to the Python functions the host was in
  (inclusive: a function is charged for every idle microsecond while it is on the stack);
- the host's time per Python function (calls and inclusive time per prompt, tracer overhead included).

Variants of the accelerated path run one after another in the same process, each measured with the
profiler off (median end-to-end) and then traced, and each checked against the eager FewStep chain
(bench/gpu.py's accelerated_agreement):

    python3 bench/gpu_profile.py --config lightning --variants default,coordinate_descent
    python3 bench/gpu_profile.py --read bench/out/trace_default.json.gz   # read a trace it wrote again

default                the node as shipped
coordinate_descent     Inductor's coordinate_descent_tuning on (tunes the block sizes of the fused
                       pointwise and reduction kernels; longer compile)
max_autotune_gemm      Inductor's max_autotune_gemm on (Triton templates timed against cuBLAS and cuDNN
                       for every matrix product and convolution; the Turbo UNet's first shape had not
                       finished compiling after about 9 min on an H200, bench/RESULTS.md run 10)
"""
from __future__ import annotations

import argparse
import collections
import gc
import gzip
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpu  # noqa: E402 — bench/gpu.py: models, ComfyUI in process, prompts

VARIANT_OPTIONS = {
    "default": {},
    "coordinate_descent": {"coordinate_descent_tuning": True},
    "max_autotune_gemm": {"max_autotune_gemm": True},
}

IDLE_GAP_US = 5.0  # GPU gaps shorter than this are launch latency between back-to-back kernels
HOST_FUNCTIONS_KEPT = 80  # the Python functions with the most host time per prompt, in the summary


def pack_modules(suffix: str):
    """The pack's module `suffix` under every name it was imported as (ComfyUI's and the tests')."""
    return [m for name, m in list(sys.modules.items()) if name.endswith(suffix) and m is not None]


_SHIPPED_COMPILE_OPTIONS: dict[int, dict] = {}  # id(module) → its COMPILE_OPTIONS as the pack ships them


def set_compile_options(extra: dict) -> None:
    """The pack's own compile options plus `extra`, in place (compile_for_one_shape's default is that dict)."""
    for module in pack_modules("fewstep.acceleration"):
        shipped = _SHIPPED_COMPILE_OPTIONS.setdefault(id(module), dict(module.COMPILE_OPTIONS))
        module.COMPILE_OPTIONS.clear()
        module.COMPILE_OPTIONS.update({**shipped, **extra})


# ---------------------------------------------------------------------------------------- the trace

def kernel_family(name: str) -> str:
    lowered = name.lower()
    if "flash" in lowered or "fmha" in lowered or "attention" in lowered or "sdpa" in lowered:
        return "attention (SDPA)"
    if lowered.startswith("triton_"):
        kind = lowered.split("_")[1]  # triton_poi_… pointwise, triton_red_… reduction, triton_per_… persistent
        return f"triton {kind}"
    if any(k in lowered for k in ("fprop", "dgrad", "wgrad", "conv", "nhwc")):
        return "convolution (cuDNN)"
    if any(k in lowered for k in ("gemm", "cutlass", "cublas", "nvjet", "matmul")):
        return "matrix product (cuBLAS)"
    if "memcpy" in lowered or "memset" in lowered:
        return name
    if "elementwise" in lowered or "copy" in lowered or "reduce" in lowered:
        return "aten elementwise/copy"
    return "other: " + name[:60]


def union_us(intervals) -> float:
    total, end = 0.0, -1.0
    for start, stop in sorted(intervals):
        if stop <= end:
            continue
        total += stop - max(start, end)
        end = stop
    return total


def stacks_at(python: list[dict], times: list[float]):
    """The Python call stack (outermost first) at each of `times` (sorted), from one thread's nested
    function events sorted by start: a sweep that pushes calls as they begin and pops them as they end."""
    stack, next_event = [], 0
    for t in times:
        while next_event < len(python) and python[next_event]["ts"] <= t:
            event = python[next_event]
            while stack and stack[-1]["ts"] + stack[-1]["dur"] <= event["ts"]:
                stack.pop()
            stack.append(event)
            next_event += 1
        while stack and stack[-1]["ts"] + stack[-1]["dur"] <= t:
            stack.pop()
        yield [e for e in stack if e["ts"] + e["dur"] > t]


def read_trace(path: Path) -> dict:
    path = Path(path)
    text = gzip.open(path, "rt").read() if path.suffix == ".gz" else path.read_text()
    events = [e for e in json.loads(text)["traceEvents"] if e.get("ph") == "X"]
    gpu_events = sorted((e for e in events if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")), key=lambda e: e["ts"])
    prompts = sorted((e for e in events if e.get("cat") == "user_annotation" and e.get("name", "").startswith("prompt ")),
                     key=lambda e: e["ts"])
    launches = {e["args"]["correlation"]: e for e in events if e.get("cat") == "cuda_runtime"
                and e.get("name") == "cudaGraphLaunch" and "correlation" in e.get("args", {})}
    python = [e for e in events if e.get("cat") == "python_function"]
    main_tid = prompts[0]["tid"] if prompts else None
    python = sorted((e for e in python if e["tid"] == main_tid) if any(e["tid"] == main_tid for e in python) else python,
                    key=lambda e: (e["ts"], -e["dur"]))

    families, walls, busy = collections.Counter(), [], []
    per_launch = collections.defaultdict(list)
    gaps = []  # (length, start, prompt start)
    for prompt in prompts:
        lo, hi = prompt["ts"], prompt["ts"] + prompt["dur"]
        inside = [e for e in gpu_events if lo <= e["ts"] < hi]
        walls.append(prompt["dur"])
        busy.append(union_us([(e["ts"], e["ts"] + e["dur"]) for e in inside]))
        cursor = lo
        for e in inside:
            families[kernel_family(e["name"])] += e["dur"]
            correlation = e.get("args", {}).get("correlation")
            if correlation in launches:
                per_launch[correlation].append(e)
            if e["ts"] - cursor > IDLE_GAP_US:
                gaps.append((e["ts"] - cursor, cursor, lo))
            cursor = max(cursor, e["ts"] + e["dur"])
        if hi - cursor > IDLE_GAP_US:
            gaps.append((hi - cursor, cursor, lo))

    idle_by_function, idle_gaps = collections.Counter(), []
    gaps.sort(key=lambda g: g[1] + g[0] / 2)
    for (length, start, prompt_start), stack in zip(gaps, stacks_at(python, [g[1] + g[0] / 2 for g in gaps])):
        for name in {short(e["name"]) for e in stack}:
            idle_by_function[name] += length
        idle_gaps.append((length, start - prompt_start, short(stack[-1]["name"]) if stack else "(no Python)"))

    # Host time per Python function inside the prompts: calls and inclusive time (a recursive
    # function's inner calls are not counted again), with the tracer's own overhead in it.
    host_calls, host_us = collections.Counter(), collections.Counter()
    for prompt in prompts:
        lo, hi = prompt["ts"], prompt["ts"] + prompt["dur"]
        open_until: dict[str, float] = {}
        for e in python:
            if not lo <= e["ts"] < hi:
                continue
            name = short(e["name"])
            host_calls[name] += 1
            if e["ts"] >= open_until.get(name, -1.0):
                host_us[name] += e["dur"]
                open_until[name] = e["ts"] + e["dur"]

    graphs = collections.defaultdict(list)
    order = sorted(per_launch, key=lambda c: launches[c]["ts"])
    for correlation, stack in zip(order, stacks_at(python, [launches[c]["ts"] for c in order])):
        owner = next((short(e["name"]) for e in reversed(stack)
                      if any(k in e["name"] for k in ("diffusion_model", "_decode_to_image", "decode"))), "?")
        graphs[owner].append(per_launch[correlation])
    n = max(len(prompts), 1)
    return {
        "prompts": len(prompts),
        "python_events": len(python),
        "wall_ms": statistics.median(walls) / 1e3 if walls else float("nan"),
        "gpu_busy_ms": statistics.median(busy) / 1e3 if busy else float("nan"),
        "kernel_families_ms": {k: v / n / 1e3 for k, v in families.most_common()},
        "graphs": {owner: graph_summary(replays, n) for owner, replays in graphs.items()},
        "idle_ms": sum(g[0] for g in gaps) / n / 1e3,
        "idle_by_function_ms": {k: v / n / 1e3 for k, v in idle_by_function.most_common(45)},
        "largest_idle_gaps": [{"ms": g / 1e3, "at_ms": at / 1e3, "in": where}
                              for g, at, where in sorted(idle_gaps, reverse=True)[:25]],
        "host_functions_per_prompt": {name: {"calls": host_calls[name] / n, "ms_traced": us / n / 1e3}
                                      for name, us in host_us.most_common(HOST_FUNCTIONS_KEPT)},
    }


def graph_summary(replays: list[list[dict]], prompts: int) -> dict:
    """One replayed graph's kernels: per replay (median), its busy time, span and kernel count, its
    GPU time by kernel family and its longest kernels (mean per replay)."""
    families, kernels = collections.Counter(), collections.Counter()
    for replay in replays:
        for e in replay:
            families[kernel_family(e["name"])] += e["dur"]
            kernels[e["name"][:100]] += e["dur"]
    count = len(replays)
    return {
        "launches_per_prompt": count / prompts,
        "kernels_per_replay": statistics.median(len(r) for r in replays),
        "busy_ms": statistics.median(union_us([(e["ts"], e["ts"] + e["dur"]) for e in r]) for r in replays) / 1e3,
        "span_ms": statistics.median(max(e["ts"] + e["dur"] for e in r) - min(e["ts"] for e in r) for r in replays) / 1e3,
        "families_ms_per_replay": {k: v / count / 1e3 for k, v in families.most_common()},
        "longest_kernels_ms_per_replay": {k: v / count / 1e3 for k, v in kernels.most_common(12)},
    }


def short(name: str) -> str:
    return name.replace(str(gpu.COMFYUI_PATH), "ComfyUI")[-110:]


# ------------------------------------------------------------------------------------------- main

def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="lightning", choices=[c.key for c in gpu.CONFIGS])
    parser.add_argument("--variants", default="default", help=", ".join(VARIANT_OPTIONS))
    parser.add_argument("--warmups", type=int, default=3, help="accelerated runs before timing (the first compiles)")
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--profile-reps", type=int, default=3)
    parser.add_argument("--budget-s", type=float, default=float("inf"), help="skip variants not started by then")
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny models, 64² (checks this script, measures nothing)")
    parser.add_argument("--read", metavar="TRACE", help="only read a kept trace (.json or .json.gz) and print its summary")
    parser.add_argument("--out", default=os.environ.get("OUT") or "bench/out")
    args = parser.parse_args(argv)
    if args.read:
        print(json.dumps(read_trace(Path(args.read)), indent=1))
        return 0
    if gpu.COMFYUI_PATH is None:
        print(gpu.COMFYUI_MISSING)
        return 1
    cuda = not args.smoke
    if cuda and not torch.cuda.is_available():
        print("no CUDA device: run with --smoke for the CPU check")
        return 1
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    config = next(c for c in gpu.CONFIGS if c.key == args.config)
    if args.smoke:
        config = gpu.tiny_config(config)
    base_directory = Path(tempfile.mkdtemp(prefix="fewstep-gpu-profile-"))
    runner = gpu.Comfy(base_directory, cpu=not cuda)
    models = base_directory / "models"
    built = gpu.build_full(config.base, models, "cuda", torch.float16) if cuda else gpu.build_tiny(config.base, models)
    built.pipeline_factory = None
    gc.collect()
    import comfy.model_management as management

    results = {"config": config.title, "environment": gpu.environment(cuda), "variants": {}}

    def save():
        (out / "profile.json").write_text(json.dumps(results, indent=1, default=str))

    for index, variant in enumerate(args.variants.split(",")):
        if time.perf_counter() - gpu.STARTED > args.budget_s:
            results["variants"][variant] = {"skipped": "over the time budget"}
            save()
            continue
        set_compile_options(VARIANT_OPTIONS[variant])
        accelerate = {"compile_kernels": True, "autotune_convolutions": True, "max_shapes": 4 + index}  # a new node each
        started = time.perf_counter()
        seed = 1000 * (index + 1)
        for i in range(args.warmups):
            runner.run(gpu.comfy_prompt(config, built, "accelerated", 1, seed + 1 + i, accelerate=accelerate))
        first_s = time.perf_counter() - started
        e2e = [runner.run(gpu.comfy_prompt(config, built, "accelerated", 1, seed + 100 + i, accelerate=accelerate))
               for i in range(args.reps)]
        trace = out / f"trace_{variant}.json"
        activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
        with torch.profiler.profile(activities=activities, with_stack=True) as profiler:
            for i in range(args.profile_reps):
                prompt = gpu.comfy_prompt(config, built, "accelerated", 1, seed + 200 + i, accelerate=accelerate)
                with torch.profiler.record_function(f"prompt {i}"):
                    runner.run(prompt)
        profiler.export_chrome_trace(str(trace))
        summary = read_trace(trace)
        check = gpu.accelerated_agreement(runner, config, built, {k: v for k, v in accelerate.items() if k != "max_shapes"},
                                          batches=(1,))  # batch 4 would compile another shape
        summary.update({"e2e_ms_median": statistics.median(e2e), "e2e_ms_all": e2e, "compile_and_warmup_s": first_s,
                        "agreement_b1": {k: str(v) for k, v in check["b1"].items()}})
        results["variants"][variant] = summary
        with open(trace, "rb") as raw, gzip.open(f"{trace}.gz", "wb", compresslevel=6) as packed:
            packed.write(raw.read())
        trace.unlink()
        if os.path.getsize(f"{trace}.gz") > 15 * 2**20:
            os.unlink(f"{trace}.gz")
        gpu.log(f"{variant}: e2e {summary['e2e_ms_median']:.1f} ms, GPU busy {summary['gpu_busy_ms']:.1f} of "
                f"{summary['wall_ms']:.1f} ms traced, compile + warm-up {first_s:.0f} s; {summary['agreement_b1']}")
        print(json.dumps({k: summary[k] for k in ("kernel_families_ms", "graphs", "idle_by_function_ms",
                                                   "largest_idle_gaps")}, indent=1), flush=True)
        save()
        runner.executor.reset()  # drop this variant's node outputs, graphs and models (the next loads afresh)
        management.unload_all_models()
        management.cleanup_models()
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
