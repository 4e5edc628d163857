"""FP8 matrix products and fused attention projections on ComfyUI's SDXL UNet, timed side by side on a GPU.

The SDXL UNet as ComfyUI loads it (full size, random weights drawn by diffusers' initialisation, fp16),
compiled by torch.compile with the pack's Inductor options and replayed as a CUDA graph, as
Few-Step Accelerate runs it, in four variants (testing/unet_levers.py says what each changes):

  fp16        the UNet as loaded: what Few-Step Accelerate compiles
  fused       self-attention q/k/v one product per block; every cross-attention's keys and values one
              product per call
  fp8         the transformer blocks' linear layers as FP8 (e4m3) products, row-wise scales
  fp8_fused   both

Two more variants, asked for by name, compare a compile saved to disk with the same compile loaded by
another process, as a cold server saves it and a restarted one loads it (fewstep.acceleration.saved_compiles;
RESULTS.md reports restarted servers slower per prompt):

  fp16_saved   the pack's ahead-of-time compile of the UNet call, saved to `--out`/saved
  fp16_loaded  that file, loaded in a process of its own (it waits for the file)

Each variant and size runs in a process of its own, so that their compiles (minutes each) run side by side
on the host's cores; then the processes take turns on the GPU, so that the times are side by side in one run.
Per variant and image size (batch 1): the GPU time of one UNet call (the graph's replay, median of
`--reps`), and the output's relative L2 distance from the fp16 UNet run eagerly on the same inputs.

    python3 bench/unet_levers.py --out bench/out/levers                # CUDA: 512² and 1024²
    python3 bench/unet_levers.py --variants fp16 fp16_saved fp16_loaded --out bench/out/saved
    python3 bench/unet_levers.py --smoke --out /tmp/levers             # CPU, tiny UNet: checks the script
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "testing"))
import pack  # noqa: E402,F401 — registers the pack as the `comfyui_fewstep` package
import tiny_models  # noqa: E402
from comfy_attention import attention_as_on_cuda  # noqa: E402
import unet_levers  # noqa: E402
from comfy_harness import find_comfyui  # noqa: E402

from comfyui_fewstep.fewstep.acceleration.compiler import COMPILE_OPTIONS  # noqa: E402
from comfyui_fewstep.fewstep.acceleration.saved_compiles import SavedCompiles, SavedForm, aot_compile  # noqa: E402
from gpu_models import SDXL_LDM, SDXL_UNET  # noqa: E402

LEVERS = ("fp16", "fused", "fp8", "fp8_fused")
SAVED_VARIANTS = ("fp16_saved", "fp16_loaded")
VARIANTS = LEVERS + SAVED_VARIANTS
SEED = 1234
CONTEXT_TOKENS = 77


def build_unet(smoke: bool, device: str) -> torch.nn.Module:
    """ComfyUI's SDXL UNet from a diffusers-initialised state dict, through ComfyUI's own loader."""
    import comfy.sd
    from diffusers import UNet2DConditionModel

    config, ldm = ((tiny_models.SDXL_UNET_CONFIG, tiny_models.SDXL_LDM_CONFIG) if smoke else (SDXL_UNET, SDXL_LDM))
    dtype = torch.float32 if smoke else torch.float16
    torch.manual_seed(SEED)
    with torch.device(device):
        diffusers_unet = UNet2DConditionModel(**config).to(dtype)
    state = tiny_models.unet_to_ldm(diffusers_unet.state_dict(), ldm)
    del diffusers_unet
    patcher = comfy.sd.load_diffusion_model_state_dict(state, model_options={"dtype": dtype})
    return patcher.model.diffusion_model.to(device=device, dtype=dtype).eval().requires_grad_(False)


def unet_inputs(unet, size: int, device: str, dtype) -> tuple:
    generator = torch.Generator(device).manual_seed(SEED + size)
    latent = size // 8
    return (torch.randn(1, 4, latent, latent, generator=generator, device=device).to(dtype),
            torch.tensor([999.0], device=device).to(dtype),
            torch.randn(1, CONTEXT_TOKENS, unet.context_dim, generator=generator, device=device).to(dtype),
            torch.randn(1, unet.label_emb[0][0].in_features, generator=generator, device=device).to(dtype))


def worker(args) -> int:
    """One variant (at the sizes given, one in the orchestrated runs): build, compile and capture, say ready,
    time on its turn."""
    out = args.out / f"{args.worker}-{'-'.join(map(str, args.sizes))}"
    out.mkdir(parents=True, exist_ok=True)
    result = {"variant": args.worker, "sizes": {}}
    try:
        cuda = not args.smoke
        device = "cuda" if cuda else "cpu"
        unet = build_unet(args.smoke, device)
        dtype = next(unet.parameters()).dtype
        context_dim = next(m.attn2 for m in unet.modules() if type(m).__name__ == "BasicTransformerBlock").to_k.weight.shape[1]
        unet.context_dim = context_dim
        inputs = {size: unet_inputs(unet, size, device, dtype) for size in args.sizes}
        with torch.inference_mode():
            reference = {size: unet(x, t, context=c, y=y).float() for size, (x, t, c, y) in inputs.items()}
        bank = unet_levers.fuse_projections(unet) if "fused" in args.worker else None
        result["fp8_linears"] = unet_levers.fp8_linears(unet) if "fp8" in args.worker else 0

        def call(x, t, c, y):
            if bank is not None:
                bank.compute(c)
            return unet(x, t, context=c, y=y)

        backend = "aot_eager" if args.smoke else "inductor"
        options = None if args.smoke else COMPILE_OPTIONS
        graphs = {}
        for size, example in inputs.items():
            torch._dynamo.reset()
            started = time.perf_counter()
            # In inference mode as ComfyUI runs prompts (a saved compile's guards hold it); on the CPU with
            # the attention a GPU runs (the CPU's breaks the graph, which a saved compile cannot have).
            with (torch.inference_mode(), attention_as_on_cuda() if args.smoke and args.worker in SAVED_VARIANTS
                  else contextlib.nullcontext()):
                compiled, waited_s = compile_variant(args, unet, call, size, example, backend, options)
                output = compiled(*example)
                if cuda:
                    torch.cuda.synchronize()
                compile_s = time.perf_counter() - started - waited_s  # fp16_loaded: its load
                graphs[size] = capture(compiled, example) if cuda else (lambda e=example, f=compiled: f(*e))
                output = graphs[size]()
            result["sizes"][size] = {"compile_s": round(compile_s, 1),
                                     "relative_l2_to_fp16_eager": unet_levers.relative_l2(output, reference[size])}
            print(f"{args.worker} {size}²: compiled in {compile_s:.1f} s, "
                  f"rel L2 {result['sizes'][size]['relative_l2_to_fp16_eager']:.2e}", flush=True)
        (out / "ready").write_text("ready")
        wait_for(out / "turn", args.turn_timeout_s)
        for size, replay in graphs.items():
            result["sizes"][size]["ms_per_call"] = time_calls(replay, args.reps, cuda)
    except BaseException as error:
        result["error"] = f"{type(error).__name__}: {error}"
        result["traceback"] = traceback.format_exc()[-3000:]
        (out / "ready").write_text("failed")
    (out / "result.json").write_text(json.dumps(result, indent=1))
    (out / "done").write_text("done")
    return 0


def unet_call(unet, x, t, c, y):
    """The call whose compile is saved (a module-level function: the loading process finds it by name)."""
    return unet(x, t, context=c, y=y)


def compile_variant(args, unet, call, size: int, example, backend: str, options):
    """`call` compiled as the worker's variant does (torch.compile, or saved ahead of time, or loaded), and
    the seconds spent waiting for another process's file."""
    if args.worker not in SAVED_VARIANTS:
        return torch.compile(call, backend=backend, dynamic=False, options=options), 0.0
    store, key = SavedCompiles(args.out / "saved"), f"unet-{size}"
    if args.worker == "fp16_saved":
        function = aot_compile(SavedForm(unet_call, (unet,), {"bench": "unet"}), list(example), backend, options,
                               dynamic=False)
        store.save(key, function)
    else:
        saving = args.out / f"fp16_saved-{size}" / "ready"
        began = time.perf_counter()
        deadline = time.monotonic() + args.turn_timeout_s
        while not store.path(key).exists():
            if time.monotonic() > deadline or (saving.exists() and saving.read_text() == "failed"):
                raise TimeoutError(f"no saved compile at {store.path(key)} (fp16_saved writes it; see its log)")
            time.sleep(0.2)
        waited_s = time.perf_counter() - began
        function, why = store.read(store.path(key), delete_unreadable=False)
        if function is None:
            raise RuntimeError(why)
        return (lambda *tensors: function(unet, *tensors)), waited_s
    return (lambda *tensors: function(unet, *tensors)), 0.0


def capture(compiled, example):
    """The compiled call captured as a CUDA graph on static copies of `example`; returns its replay."""
    static = [x.clone() for x in example]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            compiled(*static)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        output = compiled(*static)

    def replay():
        graph.replay()
        return output

    return replay


def time_calls(replay, reps: int, cuda: bool) -> dict:
    for _ in range(10):
        replay()
    times = []
    for _ in range(reps):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            replay()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            started = time.perf_counter()
            replay()
            times.append((time.perf_counter() - started) * 1e3)
    return {"median": round(statistics.median(times), 3), "min": round(min(times), 3), "max": round(max(times), 3)}


def wait_for(path: Path, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


def orchestrate(args) -> int:
    """One worker per variant and size, compiling side by side; then each timed in turn."""
    args.out.mkdir(parents=True, exist_ok=True)
    cells = [(variant, size) for variant in args.variants for size in args.sizes]
    env = {**os.environ, "TORCHINDUCTOR_COMPILE_THREADS": str(max(1, (os.cpu_count() or 4) // len(cells)))}
    if "fp16_saved" in args.variants:  # fp16_loaded waits for this run's files, not an earlier run's
        for size in args.sizes:
            SavedCompiles(args.out / "saved").path(f"unet-{size}").unlink(missing_ok=True)
    for variant, size in cells:  # before any worker starts: fp16_loaded reads fp16_saved's marker
        for leftover in ("ready", "turn", "done", "result.json"):
            (args.out / f"{variant}-{size}" / leftover).unlink(missing_ok=True)
    processes = {}
    for variant, size in cells:
        name = f"{variant}-{size}"
        command = [sys.executable, __file__, "--worker", variant, "--out", str(args.out), "--reps", str(args.reps),
                   "--sizes", str(size), "--turn-timeout-s", str(args.turn_timeout_s),
                   *(["--smoke"] if args.smoke else [])]
        log = open(args.out / f"{name}.log", "w")
        processes[name] = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    started = time.perf_counter()
    for name in processes:  # compiles side by side
        wait_for(args.out / name / "ready", args.turn_timeout_s)
    compiled_after = time.perf_counter() - started
    for name in processes:  # one at a time on the GPU
        (args.out / name).mkdir(parents=True, exist_ok=True)
        (args.out / name / "turn").write_text("go")
        wait_for(args.out / name / "done", 120)
    for process in processes.values():
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
    results = {variant: {"variant": variant, "sizes": {}} for variant in args.variants}
    for variant, size in cells:
        path = args.out / f"{variant}-{size}" / "result.json"
        cell = json.loads(path.read_text()) if path.exists() else {"error": "no result (see its log)"}
        results[variant]["fp8_linears"] = cell.get("fp8_linears", results[variant].get("fp8_linears"))
        results[variant]["sizes"][size] = (cell["sizes"].get(str(size)) or cell["sizes"].get(size)
                                           if "error" not in cell else {"error": cell["error"]})
    summary = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() and not args.smoke else "cpu",
               "torch": torch.__version__, "compiled_side_by_side_s": round(compiled_after, 1), "variants": results}
    (args.out / "results.json").write_text(json.dumps(summary, indent=1))
    table = report(summary, args.sizes)
    (args.out / "table.md").write_text(table)
    print(table)
    return 0 if all("error" not in cell for result in results.values() for cell in result["sizes"].values()) else 1


def report(summary: dict, sizes) -> str:
    base = summary["variants"].get("fp16", {}).get("sizes", {})
    lines = [f"{summary['device']}, torch {summary['torch']}; GPU ms per UNet call (CUDA graph replay, median), batch 1",
             "", "| variant | " + " | ".join(f"{size}²: ms (× fp16) | {size}²: rel L2 to fp16 eager" for size in sizes)
             + " |", "|---|" + "---|---|" * len(sizes)]
    for variant, result in summary["variants"].items():
        cells = []
        for size in sizes:
            cell = result["sizes"].get(size) or result["sizes"].get(str(size), {})
            if "error" in cell:
                cells += [cell["error"].splitlines()[0][:160], "–"]
                continue
            ms = cell.get("ms_per_call", {}).get("median")
            fp16 = (base.get(size) or base.get(str(size)) or {}).get("ms_per_call", {}).get("median")
            ratio = f" ({ms / fp16:.2f}×)" if ms and fp16 else ""
            cells += [f"{ms}{ratio}", f"{cell.get('relative_l2_to_fp16_eager', float('nan')):.2e}"]
        lines.append(f"| {variant} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "out" / "unet_levers")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(LEVERS))
    parser.add_argument("--sizes", nargs="+", type=int, default=None)
    parser.add_argument("--reps", type=int, default=50)
    parser.add_argument("--turn-timeout-s", type=float, default=540)
    parser.add_argument("--smoke", action="store_true", help="CPU, the tests' tiny SDXL UNet, aot_eager")
    parser.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.out = args.out.resolve()
    args.sizes = args.sizes or ([64] if args.smoke else [512, 1024])
    comfyui = find_comfyui()
    if comfyui is not None and str(comfyui) not in sys.path:
        sys.path.insert(0, str(comfyui))
    if args.smoke:
        from comfy.cli_args import args as comfy_args

        comfy_args.cpu = True
    return worker(args) if args.worker else orchestrate(args)


if __name__ == "__main__":
    raise SystemExit(main())
