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

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "testing"))
import pack  # noqa: E402,F401 — registers the pack as the `comfyui_fewstep` package
from comfy_harness import COMFYUI_MISSING, COMFYUI_PATH  # noqa: E402
from gpu_comfy import Comfy, accelerated_agreement, comfy_prompt  # noqa: E402
from gpu_models import CONFIGS, build_full, build_tiny, tiny_config  # noqa: E402
from gpu_report import environment  # noqa: E402
from gpu_timing import STARTED, log  # noqa: E402
from trace_reading import read_trace  # noqa: E402 — testing/

VARIANT_OPTIONS = {
    "default": {},
    "coordinate_descent": {"coordinate_descent_tuning": True},
    "max_autotune_gemm": {"max_autotune_gemm": True},
}


def pack_modules(suffix: str):
    """The pack's module `suffix` under every name it was imported as (ComfyUI's and the tests')."""
    return [m for name, m in list(sys.modules.items()) if name.endswith(suffix) and m is not None]


_SHIPPED_COMPILE_OPTIONS: dict[int, dict] = {}  # id(module) → its COMPILE_OPTIONS as the pack ships them


def set_compile_options(extra: dict) -> None:
    """The pack's own compile options plus `extra`, in place (compile_for_one_shape's default is that dict)."""
    for module in pack_modules("fewstep.acceleration.compiler"):
        shipped = _SHIPPED_COMPILE_OPTIONS.setdefault(id(module), dict(module.COMPILE_OPTIONS))
        module.COMPILE_OPTIONS.clear()
        module.COMPILE_OPTIONS.update({**shipped, **extra})


# ------------------------------------------------------------------------------------------- main

def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="lightning", choices=[c.key for c in CONFIGS])
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
    if COMFYUI_PATH is None:
        print(COMFYUI_MISSING)
        return 1
    cuda = not args.smoke
    if cuda and not torch.cuda.is_available():
        print("no CUDA device: run with --smoke for the CPU check")
        return 1
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    config = next(c for c in CONFIGS if c.key == args.config)
    if args.smoke:
        config = tiny_config(config)
    base_directory = Path(tempfile.mkdtemp(prefix="fewstep-gpu-profile-"))
    runner = Comfy(base_directory, cpu=not cuda)
    models = base_directory / "models"
    built = build_full(config.base, models, "cuda", torch.float16) if cuda else build_tiny(config.base, models)
    built.pipeline_factory = None
    gc.collect()
    import comfy.model_management as management

    results = {"config": config.title, "environment": environment(cuda), "variants": {}}

    def save():
        (out / "profile.json").write_text(json.dumps(results, indent=1, default=str))

    for index, variant in enumerate(args.variants.split(",")):
        if time.perf_counter() - STARTED > args.budget_s:
            results["variants"][variant] = {"skipped": "over the time budget"}
            save()
            continue
        set_compile_options(VARIANT_OPTIONS[variant])
        accelerate = {"compile_kernels": True, "autotune_convolutions": True, "max_shapes": 4 + index}  # a new node each
        started = time.perf_counter()
        seed = 1000 * (index + 1)
        for i in range(args.warmups):
            runner.run(comfy_prompt(config, built, "accelerated", 1, seed + 1 + i, accelerate=accelerate))
        first_s = time.perf_counter() - started
        e2e = [runner.run(comfy_prompt(config, built, "accelerated", 1, seed + 100 + i, accelerate=accelerate))
               for i in range(args.reps)]
        trace = out / f"trace_{variant}.json"
        activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
        with torch.profiler.profile(activities=activities, with_stack=True) as profiler:
            for i in range(args.profile_reps):
                prompt = comfy_prompt(config, built, "accelerated", 1, seed + 200 + i, accelerate=accelerate)
                with torch.profiler.record_function(f"prompt {i}"):
                    runner.run(prompt)
        profiler.export_chrome_trace(str(trace))
        summary = read_trace(trace)
        check = accelerated_agreement(runner, config, built, {k: v for k, v in accelerate.items() if k != "max_shapes"},
                                          batches=(1,))  # batch 4 would compile another shape
        summary.update({"e2e_ms_median": statistics.median(e2e), "e2e_ms_all": e2e, "compile_and_warmup_s": first_s,
                        "agreement_b1": {k: str(v) for k, v in check["b1"].items()}})
        results["variants"][variant] = summary
        with open(trace, "rb") as raw, gzip.open(f"{trace}.gz", "wb", compresslevel=6) as packed:
            packed.write(raw.read())
        trace.unlink()
        if os.path.getsize(f"{trace}.gz") > 15 * 2**20:
            os.unlink(f"{trace}.gz")
        log(f"{variant}: e2e {summary['e2e_ms_median']:.1f} ms, GPU busy {summary['gpu_busy_ms']:.1f} of "
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
