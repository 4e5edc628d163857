"""Reading a torch.profiler trace of accelerated prompts: GPU busy and idle time per prompt, kernel
families, each replayed CUDA graph's kernels, and the host's Python functions the GPU waited on.
Used by bench/gpu_profile.py, and checked on a small trace of known contents by the tests."""
from __future__ import annotations

import collections
import gzip
import json
import statistics
from pathlib import Path

from comfy_harness import COMFYUI_PATH

IDLE_GAP_US = 5.0  # GPU gaps shorter than this are launch latency between back-to-back kernels
HOST_FUNCTIONS_KEPT = 80  # the Python functions with the most host time per prompt, in the summary


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
    return name.replace(str(COMFYUI_PATH), "ComfyUI")[-110:]
