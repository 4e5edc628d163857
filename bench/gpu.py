"""GPU benchmark: diffusers eager · ComfyUI native nodes · ComfyUI + FewStep nodes · + FewStepAccelerate.

All four measured in one process, one run, on random fp16 weights in the real SDXL and SD1.5
architectures (speed does not depend on the values): the diffusers pipelines are built from the
modules, ComfyUI loads the same weights from a single-file checkpoint through its own
CheckpointLoaderSimple (and LoraLoaderModelOnly), and every ComfyUI column runs an API prompt through
ComfyUI's real PromptExecutor, in process, as its server would.

Per cell: median end-to-end latency of a queued generation (UNet steps + VAE decode, latent noise to
a float image on the CPU; text encoding is cached by ComfyUI and measured apart), the UNet's time per
call (CUDA events around UNetModel.forward / diffusers' UNet), the VAE decode stage (host clock,
synchronised, around VAEDecode / around vae.decode through `.cpu()`), peak VRAM the process reserved
(torch's caching allocator, CUDA-graph pools included), and images/s at batch 4. For each ComfyUI
cell, also where a batch-1 prompt's time goes: host-clock stamps at the edges of its sampling and
decode stages (PhaseClock).

    python3 bench/gpu.py                       # CUDA: the full table; compiling takes most of it, about
                                               # 4 min per SDXL model with a cold Inductor cache (H200)
    python3 bench/gpu.py --smoke               # CPU: tiny models, 64² images, one repetition
    python3 bench/gpu.py --tiny                # CUDA: the same tiny models, the GPU next to idle: what each
                                               # path costs the host per prompt (its floor)
    python3 bench/gpu.py --configs turbo --out bench/out
    python3 bench/gpu.py --configs flux_schnell,sd35_turbo --warmups 2 --reps 5 --budget-s 480
                                               # the flow rows (bench/gpu_flow.py): FLUX.1-schnell and SD3.5
                                               # Large Turbo, 4 steps 1024², batch 1 (--flow-batch4 adds 4)
    python3 bench/gpu.py --server --phases first outputs --cold
                                               # the same prompts as users run them: a real `python main.py`,
                                               # default flags, timed from POST /prompt to the image at a
                                               # websocket client (bench/server_bench.py; --server --help)
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import logging
import os
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "testing"))
import pack  # noqa: E402,F401 — registers the pack as the `comfyui_fewstep` package
from comfy_harness import COMFYUI_MISSING, COMFYUI_PATH  # noqa: E402

from comfyui_fewstep.fewstep.families import get_family  # noqa: E402
from comfyui_fewstep.fewstep.schedules import reference_scheduler  # noqa: E402

import real_size_models  # noqa: E402

from gpu_comfy import CaptureLog, Comfy, comfy_cells  # noqa: E402
from gpu_flow import FLOW_BASES, FLOW_CONFIGS, build_flow, diffusers_flow_inputs, is_flow  # noqa: E402
from gpu_models import ABLATION, Built, COLUMNS, CONFIGS, PROMPT, SEED, SKIPPED, build_full, build_tiny, tiny_config  # noqa: E402
from gpu_report import device_ceilings, environment, write_report  # noqa: E402
from gpu_timing import Cell, Marks, Memory, log, median, over_budget, synchronize  # noqa: E402

# ----------------------------------------------------------------------------------------- diffusers

def diffusers_cells(built: Built, configs, args, memory: Memory, cuda: bool, results: dict, save) -> None:
    device = "cuda" if cuda else "cpu"
    cells = results
    pipe = built.pipeline_factory().to(device)
    pipe.set_progress_bar_config(disable=True)
    if built.lora is not None:
        pipe.load_lora_weights(dict(built.lora))  # the LCM-LoRA card: load_lora_weights, then fuse_lora
        pipe.fuse_lora()
    unet_marks = Marks(cuda)
    denoiser = pipe.transformer if hasattr(pipe, "transformer") else pipe.unet
    denoiser.register_forward_pre_hook(lambda *_: unet_marks.start())
    denoiser.register_forward_hook(lambda *_: unet_marks.stop())
    decode_started = []
    decode = pipe.vae.decode

    def timed_decode(*a, **k):
        synchronize(cuda)
        decode_started.append(time.perf_counter())
        return decode(*a, **k)

    pipe.vae.decode = timed_decode
    sdxl = hasattr(pipe, "text_encoder_2")
    for config in configs:
        cell = Cell()
        if over_budget(args):
            cell.error = SKIPPED
            cells[config.key][COLUMNS[0]] = cell
            continue
        try:
            family = get_family(config.family)
            pipe.scheduler = reference_scheduler(family)

            def encode():
                if built.conditioning is not None:  # the flow rows: fixed tensors, no text encoders
                    return diffusers_flow_inputs(built)
                if sdxl:
                    embeds, _, pooled, _ = pipe.encode_prompt(PROMPT, device=device, num_images_per_prompt=1,
                                                              do_classifier_free_guidance=False)
                    return {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}
                embeds, _ = pipe.encode_prompt(PROMPT, device, 1, False)
                return {"prompt_embeds": embeds}

            text_ms = []
            with torch.inference_mode():
                for i in range(args.warmups + args.reps):
                    synchronize(cuda)
                    started = time.perf_counter()
                    embeds = encode()
                    synchronize(cuda)
                    text_ms.append((time.perf_counter() - started) * 1e3)
            cell.text_ms = median(text_ms[args.warmups:]) if built.conditioning is None else float("nan")

            def generate(batch: int, seed: int) -> float:
                extra = {"timesteps": list(config.diffusers_timesteps)} if config.diffusers_timesteps else {}
                generator = torch.Generator(device).manual_seed(seed)
                synchronize(cuda)
                started = time.perf_counter()
                images = pipe(**embeds, num_inference_steps=config.steps, guidance_scale=0.0, height=config.size,
                              width=config.size, num_images_per_prompt=batch, generator=generator,
                              output_type="pt", **extra).images.cpu()
                ended = time.perf_counter()
                assert images.shape[0] == batch
                return (ended - started) * 1e3, (ended - decode_started[-1]) * 1e3

            for batch in config.batches:
                warmups, reps = (args.warmups, args.reps) if batch == 1 else (args.warmups4, args.reps4)
                with torch.inference_mode():
                    first = generate(batch, SEED)[0]
                    for i in range(warmups - 1):
                        generate(batch, SEED + 1 + i)
                    memory.reset()
                    unet_marks.recording = True
                    runs = [generate(batch, SEED + 100 + i) for i in range(reps)]
                    unet_marks.recording = False
                stats = (median([r[0] for r in runs]), median(unet_marks.take_ms()), median([r[1] for r in runs]),
                         memory.peak_gib())
                if batch == 1:
                    cell.e2e_ms, cell.unet_ms, cell.vae_ms, cell.peak_gib = stats
                    cell.first_ms = first
                else:
                    cell.e2e4_ms, cell.unet4_ms, cell.vae4_ms, cell.peak4_gib = stats
            log(f"diffusers {config.key}: {cell.e2e_ms:.1f} ms (b1), {cell.e2e4_ms:.1f} ms (b4)")
        except Exception as error:
            cell.error = f"{type(error).__name__}: {error}"
            log(f"diffusers {config.key} FAILED: {cell.error}\n{traceback.format_exc()}")
        cells[config.key][COLUMNS[0]] = cell
        save()
    del pipe
    memory.reset()


# ----------------------------------------------------------------------------------------------- main

def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["--server"]:
        # Through ComfyUI's own server instead of in process; its phases and flags are server_bench's.
        import server_bench

        return server_bench.main(argv[1:])
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny models, 64² images, one repetition")
    parser.add_argument("--tiny", action="store_true",
                        help="CUDA, the tests' tiny models at 64²: each prompt's own host time with next to no GPU "
                             "work (the end-to-end ms targets are not judged on it)")
    parser.add_argument("--configs", default=",".join(c.key for c in CONFIGS),
                        help="comma-separated keys: " + ", ".join(c.key for c in CONFIGS + FLOW_CONFIGS)
                             + " (the flow rows, FLUX.1-schnell and SD3.5 Large Turbo, are not in the default)")
    parser.add_argument("--flow-batch4", action="store_true", help="also time batch 4 on the flow rows")
    parser.add_argument("--warmups", type=int, default=None, help="untimed runs first at batch 1 (default 3; smoke 1)")
    parser.add_argument("--warmups4", type=int, default=None, help="untimed runs first at batch 4 (default 2; smoke 1)")
    parser.add_argument("--reps", type=int, default=None, help="timed runs at batch 1 (default 10; smoke 1)")
    parser.add_argument("--reps4", type=int, default=None, help="timed runs at batch 4 (default 6; smoke 1)")
    parser.add_argument("--no-autotune", dest="autotune", action="store_false",
                        help="FewStepAccelerate's autotune_convolutions off")
    parser.add_argument("--no-compile", dest="compile", action="store_false",
                        help="FewStepAccelerate's compile_kernels off")
    parser.add_argument("--ablation", action="store_true",
                        help="also time the accelerated path with compile_kernels off (CUDA graphs only)")
    parser.add_argument("--paired", type=int, default=0, metavar="N",
                        help="also time ComfyUI native and ComfyUI + FewStep in N interleaved pairs per batch size "
                             "(the FewStep / native target is then judged on them)")
    parser.add_argument("--paired-only", action="store_true",
                        help="only the interleaved native / FewStep pairs (no diffusers, no acceleration); needs --paired")
    parser.add_argument("--out", default=os.environ.get("OUT") or "bench/out")
    parser.add_argument("--budget-s", type=float, default=float("inf"),
                        help="skip the cells not started after this many seconds (a device call's limit)")
    args = parser.parse_args(argv)
    if args.paired_only and not args.paired:
        parser.error("--paired-only needs --paired N")
    if COMFYUI_PATH is None:
        print(COMFYUI_MISSING)
        return 1
    if args.smoke and args.tiny:
        parser.error("--smoke already uses the tiny models (on the CPU); --tiny runs them on the GPU")
    cuda, tiny = not args.smoke, args.smoke or args.tiny
    if cuda and not torch.cuda.is_available():
        print("no CUDA device: run with --smoke for the CPU check")
        return 1
    args.warmups = args.warmups or (1 if args.smoke else 3)
    args.warmups4 = args.warmups4 or (1 if args.smoke else 2)
    args.reps = args.reps or (1 if args.smoke else 10)
    args.reps4 = args.reps4 or (1 if args.smoke else 6)
    keys = args.configs.split(",")
    unknown = sorted(set(keys) - {c.key for c in CONFIGS + FLOW_CONFIGS})
    if unknown:
        parser.error(f"--configs: unknown {', '.join(unknown)}; choose from "
                     + ", ".join(c.key for c in CONFIGS + FLOW_CONFIGS))
    chosen = [c for c in CONFIGS + FLOW_CONFIGS if c.key in keys]
    if args.flow_batch4:
        chosen = [dataclasses.replace(c, batches=(1, 4)) if is_flow(c) else c for c in chosen]
    if tiny:
        chosen = [tiny_config(c) for c in chosen]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    flow = any(is_flow(c) for c in chosen) and not tiny
    # the flow rows write a 22 GiB transformer: in RAM (/dev/shm) where it fits, not on the disk
    base_directory = (real_size_models.scratch_dir("fewstep-gpu-bench-", 30) if flow
                      else Path(tempfile.mkdtemp(prefix="fewstep-gpu-bench-")))

    runner = Comfy(base_directory, cpu=not cuda)
    captures = CaptureLog()
    logging.getLogger("fewstep.acceleration").addHandler(captures)
    logging.getLogger("fewstep.acceleration").setLevel(logging.INFO)
    memory = Memory(cuda)
    env = environment(cuda)
    env.update(device_ceilings(cuda))
    import comfy.ldm.modules.attention as attention
    import comfy.model_management as management

    env["ComfyUI attention"] = attention.optimized_attention.__name__
    env["ComfyUI VAE dtype"] = str(management.vae_dtype(management.vae_device(), [torch.bfloat16, torch.float32]))
    env["model files"] = str(base_directory)
    log("environment: " + json.dumps(env))

    results = {c.key: {} for c in chosen}

    def save():  # after every cell: a run cut short still leaves what it measured
        write_report(out, chosen, results, env, args)
    dtype = torch.float16 if cuda else torch.float32
    models = base_directory / "models"
    for base in ("sdxl", "sd15", *FLOW_BASES):
        group = [c for c in chosen if c.base == base]
        if not group:
            continue
        if over_budget(args):  # nothing of this model would be timed: do not spend the budget building it
            for config in group:
                for column in COLUMNS + ([ABLATION] if args.ablation else []):
                    results[config.key][column] = Cell(error=SKIPPED)
                if args.paired:
                    results[config.key]["paired"] = {"error": SKIPPED}
            save()
            continue
        if base in FLOW_BASES:  # bf16, as FLUX.1 and SD3.5 are published and run
            built = build_flow(base, models, "cuda" if cuda else "cpu", torch.bfloat16 if cuda else torch.float32, tiny)
        else:
            built = build_tiny(base, models) if tiny else build_full(base, models, "cuda", dtype)
        if not args.paired_only:
            diffusers_cells(built, group, args, memory, cuda, results, save)
        built.pipeline_factory = None  # drop the diffusers modules before ComfyUI loads its copy
        gc.collect()
        memory.reset()
        comfy_cells(runner, built, group, args, memory, cuda, captures, results, save)
        # Drop the executor's cached outputs (models, FewStepAccelerate's graphs and their memory
        # pools) before the next base model: the run of 2026-12-01 kept them, and the SD1.5
        # diffusers cell's peak VRAM included them.
        runner.executor.reset()
        management.unload_all_models()
        management.cleanup_models()
        for path in built.files:  # the 64 GB disk of a device machine holds one real-size model at a time
            path.unlink(missing_ok=True)
        del built
        gc.collect()
        memory.reset()
        write_report(out, chosen, results, env, args)  # what is done so far, should the run be cut short

    report = write_report(out, chosen, results, env, args)
    if flow:  # what is left of the model files (the VAEs), in RAM where /dev/shm held them
        shutil.rmtree(base_directory, ignore_errors=True)
    print("\n" + report, flush=True)
    failed = [f"{k}/{c}" for k, cells in results.items() for c, cell in cells.items()
              if (cell.error if isinstance(cell, Cell) else cell.get("error")) not in (None, "", SKIPPED)]
    if failed:
        print(f"failed cells: {', '.join(failed)}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
