"""bench/gpu.py's report: the device's ceilings and versions, and the tables written from the results."""
from __future__ import annotations

import datetime
import json
import math
import platform
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "testing"))
import pack  # noqa: E402,F401 — registers the pack as the `comfyui_fewstep` package

from comfyui_fewstep.fewstep.acceleration import RELATIVE_L2_TOLERANCE  # noqa: E402

from gpu_flow import is_flow  # noqa: E402
from gpu_models import ABLATION, COLUMNS, SKIPPED  # noqa: E402

FLOW_NOTE = ("Flow rows (FLUX.1-schnell, SD3.5 Large Turbo): random bf16 weights at the published transformer "
             "configs and the real 16-channel VAE; text encoding is not timed: both sides get the same random "
             "conditioning tensors (FLUX 256 T5 tokens; SD3 77 + 256 tokens); ComfyUI loads the transformer "
             "through UNETLoader and the VAE through VAELoader; native = ComfyUI's examples (schnell: KSampler "
             "euler simple cfg 1; SD3.5 Large Turbo: KSampler euler sgm_uniform cfg 1.2, so two transformer "
             "passes per step), FewStep = Few-Step Scheduler + Sampler at cfg 1.")
from gpu_timing import Cell, STARTED  # noqa: E402

# --------------------------------------------------------------------------------------------- report

def device_ceilings(cuda: bool) -> dict:
    """The two ceilings METHOD.md asks for: a large fp16 matrix product and a device-to-device copy."""
    if not cuda:
        return {}
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.float16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.float16)
    for _ in range(3):
        a @ b
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        a @ b
    end.record()
    torch.cuda.synchronize()
    tflops = 10 * 2 * 8192**3 / (start.elapsed_time(end) / 1e3) / 1e12
    x = torch.randn(2**30 // 2, device="cuda", dtype=torch.float16)  # 1 GiB
    y = torch.empty_like(x)
    y.copy_(x)
    start.record()
    for _ in range(10):
        y.copy_(x)
    end.record()
    torch.cuda.synchronize()
    bandwidth = 10 * 2 * x.numel() * 2 / (start.elapsed_time(end) / 1e3) / 1e12
    del a, b, x, y
    torch.cuda.empty_cache()
    return {"fp16 matmul TFLOP/s (8192³)": round(tflops, 1), "D2D copy TB/s (read+write)": round(bandwidth, 2)}


def environment(cuda: bool) -> dict:
    import diffusers
    import transformers

    from comfyui_version import __version__ as comfyui_version  # ComfyUI is on sys.path (Comfy)

    env = {
        "date (UTC)": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M"),
        "python": platform.python_version(), "torch": torch.__version__, "diffusers": diffusers.__version__,
        "transformers": transformers.__version__, "ComfyUI": comfyui_version,
    }
    if cuda:
        env["device"] = torch.cuda.get_device_name()
        env["CUDA (torch)"] = torch.version.cuda
        env["cuDNN"] = torch.backends.cudnn.version()
        try:
            import triton

            env["Triton"] = triton.__version__
        except ImportError:
            env["Triton"] = "not installed"
        try:
            env["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                           capture_output=True, text=True, timeout=20).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            env["driver"] = "unknown (nvidia-smi failed)"
    else:
        env["device"] = f"CPU ({platform.processor() or platform.machine()}), --smoke"
    return env


def fmt(value, digits=1, suffix=""):
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:.{digits}f}{suffix}"


def table(configs, results: dict) -> str:
    header = ("| model | path | e2e b1 ms | speed-up vs diffusers | UNet ms/call | VAE ms | text enc ms | "
              "peak GiB b1 | e2e b4 ms | img/s b4 | speed-up b4 | peak GiB b4 | compile + capture s (b1+b4) | "
              "accelerated vs eager rel L2 (latent / image, b1; b4) |")
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for config in configs:
        base = results[config.key].get(COLUMNS[0], Cell())
        for column in [*COLUMNS, ABLATION]:
            cell = results[config.key].get(column)
            if cell is None:
                continue
            if cell.error:
                status = cell.error if cell.error == SKIPPED else f"failed: {cell.error[:120]}"
                lines.append(f"| {config.title} | {column} | {status} |" + " |" * 11)
                continue
            speed = base.e2e_ms / cell.e2e_ms if column != COLUMNS[0] else 1.0
            speed4 = cell.images_per_s4 / base.images_per_s4 if column != COLUMNS[0] else 1.0
            capture = (f"{fmt(cell.capture_s)} + {fmt(cell.capture4_s)}" if cell.check else "")
            check = ""
            if cell.check:  # b1, and b4 where that batch was timed
                checks = list(cell.check.values())
                check = ("; ".join(f"{c['latent'].relative_l2:.1e} / {c['image'].relative_l2:.1e}" for c in checks)
                         + ("" if all(c[k].within_tolerance for c in checks for k in ("latent", "image"))
                            else " OUTSIDE tolerance"))
            if cell.note:
                check = f"{check} ({cell.note})"
            lines.append(
                f"| {config.title} | {column} | {fmt(cell.e2e_ms)} | {fmt(speed, 2, '×')} | {fmt(cell.unet_ms, 2)} | "
                f"{fmt(cell.vae_ms)} | {fmt(cell.text_ms)} | {fmt(cell.peak_gib, 1)} | {fmt(cell.e2e4_ms)} | "
                f"{fmt(cell.images_per_s4, 2)} | {fmt(speed4, 2, '×')} | {fmt(cell.peak4_gib, 1)} | {capture} | {check} |")
    return "\n".join(lines)


def phase_table(configs, results: dict) -> str:
    """Batch 1, ComfyUI columns: each prompt's stages (medians over its runs; the stages' medians need
    not add up to the e2e median exactly). "UNet" is the steps' GPU time (steps × UNet ms/call), and
    "sampling − UNet" what the sampling stage spends besides it (set-up, the host-side steps, the
    latent's copy to the CPU): the UNet's GPU time hides the host's launches except where the host
    falls behind."""
    header = ("| model | path | e2e b1 ms | before sampling | sampling | UNet (steps × call) | sampling − UNet | "
              "to decode | decode | after decode |")
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for config in configs:
        for column in [*COLUMNS[1:], ABLATION]:
            cell = results[config.key].get(column)
            if cell is None or cell.error or not cell.phases_ms:
                continue
            phase = cell.phases_ms
            unet = config.steps * cell.unet_ms
            lines.append(f"| {config.title} | {column} | {fmt(cell.e2e_ms)} | {fmt(phase['before sampling'])} | "
                         f"{fmt(phase['sampling'])} | {fmt(unet)} | {fmt(phase['sampling'] - unet)} | "
                         f"{fmt(phase['to decode'])} | {fmt(phase['decode'])} | {fmt(phase['after decode'])} |")
    return "\n".join(lines)


def targets(configs, results: dict) -> list[str]:
    lines = []
    for config in configs:
        cells = results[config.key]
        native, ours, fast, base = (cells.get(c) for c in (COLUMNS[1], COLUMNS[2], COLUMNS[3], COLUMNS[0]))
        paired = cells.get("paired")
        if paired and "error" in paired:
            lines.append(f"- {config.title}: interleaved native / FewStep pairs not measured ({paired['error']})")
            paired = None
        if paired:
            r1, r4 = paired["b1"]["ratio_median"], paired["b4"]["ratio_median"]
            quartiles = {b: ", ".join(f"{q:.3f}" for q in p["ratio_quartiles"]) for b, p in paired.items()}
            lines.append(f"- {config.title}: FewStep / native latency, median of {paired['b1']['pairs']} interleaved pairs: "
                         f"{r1:.3f} (b1, quartiles {quartiles['b1']}), {r4:.3f} (b4, quartiles {quartiles['b4']}) "
                         f"— target ≤ 1.02: {'met' if max(r1, r4) <= 1.02 else 'MISSED'}")
        elif native and ours and not native.error and not ours.error:
            ratios = {f"b{b}": (ours.e2e_ms / native.e2e_ms if b == 1 else ours.e2e4_ms / native.e2e4_ms)
                      for b in config.batches}
            lines.append(f"- {config.title}: FewStep / native latency "
                         + ", ".join(f"{r:.3f} ({b})" for b, r in ratios.items())
                         + f" — target ≤ 1.02: {'met' if max(ratios.values()) <= 1.02 else 'MISSED'}"
                         + (" (native runs cfg 1.2 as ComfyUI's SD3.5 example sets it: two passes a step)"
                            if config.family == "sd35_large_turbo" else ""))
        if fast and base and not fast.error and not base.error:
            speed = base.e2e_ms / fast.e2e_ms
            target = f", target ≤ {config.targets_ms:g} ms: {'met' if fast.e2e_ms <= config.targets_ms else 'MISSED'}" \
                if config.targets_ms else ""
            lines.append(f"- {config.title}: accelerated {fast.e2e_ms:.1f} ms end to end, {speed:.2f}× diffusers eager "
                         f"(target ≥ 3×: {'met' if speed >= 3 else 'MISSED'}){target}")
    return lines


def to_json(value):
    if isinstance(value, Cell):
        return {**{k: to_json(v) for k, v in asdict(value).items() if k != "check"},
                "check": {b: {k: (str(v) if not isinstance(v, bool) else v) for k, v in c.items()}
                          for b, c in value.check.items()}}
    if isinstance(value, dict):
        return {k: to_json(v) for k, v in value.items()}
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def write_report(out: Path, configs, results: dict, env: dict, args) -> str:
    env_lines = "\n".join(f"- {k}: {v}" for k, v in env.items())
    report = (f"{env_lines}\n\n{table(configs, results)}\n\nWhere the batch-1 time goes (ComfyUI columns, "
              f"host clock, medians in ms; UNet: its GPU time, steps × UNet ms/call):\n\n"
              f"{phase_table(configs, results)}\n\n"
              + "\n".join(targets(configs, results))
              + f"\n\nreps: batch 1 median of {args.reps} after {args.warmups} warm-ups; batch 4 median of "
                f"{args.reps4} after {args.warmups4}; FewStepAccelerate compile_kernels={args.compile}, "
                f"autotune_convolutions={args.autotune}; "
                f"tolerance rel L2 ≤ {RELATIVE_L2_TOLERANCE:g}; bench wall time {time.perf_counter() - STARTED:.0f} s\n"
              + (f"\n{FLOW_NOTE}\n" if any(is_flow(c) for c in configs) else ""))
    (out / "results.md").write_text(report)
    (out / "results.json").write_text(json.dumps({"environment": env, "results": to_json(results)}, indent=1, default=str))
    return report


