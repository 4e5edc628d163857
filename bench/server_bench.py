"""What a user of Few-Step Accelerate waits for, through a real `python main.py` on a GPU.

Each phase starts ComfyUI's server (default flags unless `--flags`), queues SDXL-Turbo 1-step 512²
prompts (a full-size random-weight SDXL fp16 checkpoint under the published name) from a websocket
client that stays connected, and times every prompt from POST /prompt to its image (bench/server_timing).

- `first`: a size the server has not seen: the first prompt's time (time to first image), then a prompt
  a second until the log says both the UNet and the VAE decode replay compiled graphs (time until
  accelerated). With an empty Inductor cache (`--cold`, the first call) or the one the previous phase
  filled (a restarted server).
- `outputs`: steady prompts ending in SaveImage, PreviewImage, Few-Step Preview Image (JPEG) and
  SaveLatent (no decode, no image), for FewStep + Accelerate, FewStep without it (native ComfyUI
  sampling would be the same graph minus our sampler), and ComfyUI's TorchCompileModel (its first
  prompt compiles in the foreground).
- `batches`: batch sizes 2, 3 and 4 at 512² in turn, each timed as `first` does: the first compile
  for a batch above 1 makes the batch dimension dynamic, so batches 3 and 4 should take its compiled
  code within a prompt or two instead of compiling again.
- `cycle`: `--cycle-prompts` prompts cycling through three sizes × two batch sizes on one
  Few-Step Accelerate node (graphs of the eager kernels, max_shapes 6, so compiling does not run
  for minutes), with the GPU memory nvidia-smi reports for the server after the first pass and
  every tenth, beside what the node says its graphs hold; then `--evicting-prompts` on a node that
  keeps 4, so that every new shape drops the least recently used graph.

    python3 bench/server_bench.py --phases first outputs cycle --cold --out bench/out/server_bench
    python3 bench/server_bench.py --phases first --out bench/out/server_bench            # restart, warm cache
    python3 bench/server_bench.py --phases batches --cold --out bench/out/server_bench
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "testing"))
import pack  # noqa: E402,F401 — registers the pack as the `comfyui_fewstep` package
from comfy_harness import ComfyServer, find_comfyui  # noqa: E402
from server_check import PLAIN_WORKFLOW, WORKFLOWS, frontend_stand_in, install_models, reseeded  # noqa: E402
from server_timing import TimedClient, process_gpu_memory_mib, summary  # noqa: E402

from comfyui_fewstep.fewstep.acceleration.log_lines import compiles_pending  # noqa: E402
from comfyui_fewstep.fewstep.workflow_api import ui_workflow_to_prompt  # noqa: E402

ACCELERATED_WORKFLOW = WORKFLOWS / "sdxl_turbo_1step_accelerated.json"
OUTPUTS = ("SaveImage", "PreviewImage", "FewStepPreviewImage", "SaveLatent")
CYCLE_SIZES = ((512, 1), (768, 1), (1024, 1), (512, 2), (768, 2), (1024, 2))
HELD = re.compile(r"GPU memory held by (.+?): ([0-9.]+) GiB")


def node_of(prompt: dict, class_type: str) -> str:
    return next(key for key, node in prompt.items() if node["class_type"] == class_type)


def with_output(prompt: dict, output: str) -> tuple[dict, str]:
    """`prompt` ending in `output` instead of its SaveImage; returns it and the output node's id."""
    prompt = json.loads(json.dumps(prompt))
    save = node_of(prompt, "SaveImage")
    images = prompt[save]["inputs"]["images"]
    if output == "PreviewImage":
        prompt[save] = {"class_type": "PreviewImage", "inputs": {"images": images}}
    elif output == "FewStepPreviewImage":
        prompt[save] = {"class_type": "FewStepPreviewImage", "inputs": {"images": images, "quality": 90}}
    elif output == "SaveLatent":
        samples = prompt[images[0]]["inputs"]["samples"]
        del prompt[images[0]]
        prompt[save] = {"class_type": "SaveLatent", "inputs": {"samples": samples, "filename_prefix": "bench"}}
    return prompt, save


def with_torch_compile_model(prompt: dict) -> dict:
    """The plain workflow with ComfyUI's TorchCompileModel on the model path, as a user would add it."""
    prompt = json.loads(json.dumps(prompt))
    checkpoint = node_of(prompt, "CheckpointLoaderSimple")
    prompt["torch_compile"] = {"class_type": "TorchCompileModel", "inputs": {"model": [checkpoint, 0],
                                                                            "backend": "inductor"}}
    for key, node in prompt.items():
        if key != "torch_compile" and node["inputs"].get("model") == [checkpoint, 0]:
            node["inputs"]["model"] = ["torch_compile", 0]
    return prompt


def sized(prompt: dict, size: int, batch: int, **accelerate) -> dict:
    prompt = json.loads(json.dumps(prompt))
    latent = prompt[node_of(prompt, "EmptyLatentImage")]["inputs"]
    latent.update(width=size, height=size, batch_size=batch)
    if accelerate:
        prompt[node_of(prompt, "FewStepAccelerate")]["inputs"].update(accelerate)
    return prompt


def compiled_parts(log: str) -> set[str]:
    return {part for part in ("UNet", "VAE decode")
            if re.search(rf"captured {part} CUDA graph for .* \(compiled", log)}


def phase_first(server: ComfyServer, client: TimedClient, prompt: dict, limit_s: float, runs: int = 10) -> dict:
    """Time to first image of a new size, then time until both parts replay compiled graphs (no
    compile of the node's left pending: every one captured or given up)."""
    prompt, output = with_output(prompt, "FewStepPreviewImage")
    log_start = len(server.log_text())  # this phase's compiles only
    started = time.perf_counter()
    first = client.time_prompt(reseeded(prompt, 1), output)
    result = {"first_prompt": first, "accelerated_after_s": None, "prompts_until_accelerated": 1}
    seed, while_compiling = 2, []
    while compiles_pending(server.log_text()[log_start:]) > 0 and time.perf_counter() - started < limit_s:
        time.sleep(1.0)  # a prompt a second: enough resolution for a wait of minutes, few files
        before = compiled_parts(server.log_text())
        run = client.time_prompt(reseeded(prompt, seed), output)
        seed += 1
        result["prompts_until_accelerated"] += 1
        if "error" in run:
            result["error"] = run["error"]
            break
        result["accelerated_prompt"] = run
        result["compiled_before_this_prompt"] = sorted(before)
        if not {"UNet", "VAE decode"} <= set(before):
            while_compiling.append(run)
    if compiles_pending(server.log_text()[log_start:]) == 0:
        result["accelerated_after_s"] = round(time.perf_counter() - started, 2)
    # Prompts sent while a part still compiled (they run on graphs of the eager kernels beside the worker).
    result["while_compiling"] = summary(while_compiling) if while_compiling else None
    after = [client.time_prompt(reseeded(prompt, 900 + index), output) for index in range(runs)]
    result["after_accelerated"] = summary(after)
    # Each prompt's time to the image, in order: whether a server gets faster as it runs shows here.
    result["after_accelerated_image_ms"] = [round(run["image"], 1) if "image" in run else None for run in after]
    return result


def phase_outputs(client: TimedClient, routes: dict, runs: int) -> dict:
    results = {}
    for route, prompt in routes.items():
        for output in OUTPUTS:
            variant, node = with_output(prompt, output)
            first = client.time_prompt(reseeded(variant, 5000), node)  # a compile (TorchCompileModel) lands here
            times = [client.time_prompt(reseeded(variant, 5001 + index), node) for index in range(runs)]
            results[f"{route} → {output}"] = {"first": first, **summary(times)}
            print(f"  {route} → {output}: {results[f'{route} → {output}']}", flush=True)
    return results


def phase_cycle(server: ComfyServer, client: TimedClient, prompt: dict, prompts: int, evicting_prompts: int) -> dict:
    """`prompts` cycling through CYCLE_SIZES with room for all of them (max_shapes 6), then
    `evicting_prompts` on a second node with room for 4, which drops a graph at every new shape."""
    prompt, output = with_output(prompt, "FewStepPreviewImage")
    result = {"sizes": CYCLE_SIZES}
    for label, count, max_shapes in (("cycle", prompts, len(CYCLE_SIZES)), ("evicting", evicting_prompts, 4)):
        passes, memory, runs = count // len(CYCLE_SIZES), [], []
        for index in range(passes):
            for size, batch in CYCLE_SIZES:
                variant = sized(prompt, size, batch, max_shapes=max_shapes, compile_kernels=False)
                runs.append(client.time_prompt(reseeded(variant, 7000 + len(runs)), output))
            if index == 0 or (index + 1) % 10 == 0 or index == passes - 1:
                held = HELD.findall(server.log_text())
                memory.append({"after_pass": index + 1, "server_gpu_mib": process_gpu_memory_mib(server.process.pid),
                               "node_says_held": f"{held[-1][1]} GiB ({held[-1][0]})" if held else None})
                print(f"  {label} pass {index + 1}: {memory[-1]}", flush=True)
        result[label] = {"max_shapes": max_shapes, "passes": passes, **summary(runs), "memory": memory}
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "out" / "server_bench")
    parser.add_argument("--phases", nargs="+", choices=("first", "batches", "outputs", "cycle"), default=["first"])
    parser.add_argument("--label", default=None, help="name of this call's results (default: the phases)")
    parser.add_argument("--flags", nargs="*", default=[], help="main.py flags (default: none, as users start it)")
    parser.add_argument("--cold", action="store_true", help="empty the Inductor cache first")
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--cycle-prompts", type=int, default=300)
    parser.add_argument("--evicting-prompts", type=int, default=36)
    parser.add_argument("--first-limit-s", type=float, default=420)
    parser.add_argument("--model", choices=("full", "tiny"), default="full",
                        help="tiny: the tests' stand-ins, on the CPU where there is no GPU (a check of this script)")
    args = parser.parse_args(argv)
    args.out = args.out.resolve()  # main.py runs in ComfyUI's folder
    args.out.mkdir(parents=True, exist_ok=True)
    cache = args.out / "inductor-cache"
    cache_existed = cache.exists() and any(cache.iterdir())
    if args.cold and cache.exists():
        import shutil

        shutil.rmtree(cache)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(cache)  # one place, so "warm" means this bench's own cache
    try:
        import comfyui_frontend_package  # noqa: F401
        frontend = "comfyui_frontend_package as installed"
    except ImportError:
        folder = frontend_stand_in(args.out / "frontend_stand_in")
        os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(folder), os.environ.get("PYTHONPATH")]))
        frontend = "an empty stand-in comfyui_frontend_package (API prompts only)"
    comfyui, base = find_comfyui(), args.out / "base"
    with ComfyServer(comfyui, base, log_path=args.out / "server-object-info.log", cpu=True) as server:
        object_info = server.get("/object_info")
    accelerated = ui_workflow_to_prompt(json.loads(ACCELERATED_WORKFLOW.read_text()), object_info)
    plain = ui_workflow_to_prompt(json.loads(PLAIN_WORKFLOW.read_text()), object_info)
    if args.model == "tiny" or not (base / "models" / "checkpoints" / "bench_sdxl.safetensors").exists():
        install_models(args.model, base, {"accelerated": accelerated, "plain": plain})
    import torch
    label = args.label or "-".join(args.phases)
    log_path = args.out / f"server-{label}.log"
    log_path.unlink(missing_ok=True)
    started = time.perf_counter()
    server = ComfyServer(comfyui, base, extra_args=tuple(args.flags), log_path=log_path,
                         cpu=not torch.cuda.is_available())
    server.start(timeout=600)
    results = {"flags": args.flags, "frontend": frontend, "inductor_cache_was_warm": cache_existed and not args.cold,
               "server_start_s": round(time.perf_counter() - started, 2)}
    client = TimedClient(server)
    try:
        if "first" in args.phases:
            results["first"] = phase_first(server, client, accelerated, args.first_limit_s, args.runs)
            print(f"first: {json.dumps(results['first'])[:1500]}", flush=True)
        if "batches" in args.phases:
            results["batches"] = {}
            for batch in (2, 3, 4):
                results["batches"][batch] = phase_first(server, client, sized(accelerated, 512, batch),
                                                        args.first_limit_s)
                print(f"batch {batch}: {json.dumps(results['batches'][batch])[:1500]}", flush=True)
        if "outputs" in args.phases:
            results["outputs"] = phase_outputs(client, {"FewStep + Accelerate": accelerated, "FewStep": plain,
                                                        "TorchCompileModel": with_torch_compile_model(plain)},
                                               args.runs)
        if "cycle" in args.phases:
            results["cycle"] = phase_cycle(server, client, accelerated, args.cycle_prompts, args.evicting_prompts)
    finally:
        client.close()
        results["server_alive_at_end"] = server.process.poll() is None
        server.stop()
        log = log_path.read_text(errors="replace")
        results["fewstep_messages"] = sorted({line.split("FewStepAccelerate:", 1)[1].strip()[:300]
                                              for line in log.splitlines() if "FewStepAccelerate:" in line})[:60]
        (args.out / f"results-{label}.json").write_text(json.dumps(results, indent=1))
    print(json.dumps({key: value for key, value in results.items() if key != "fewstep_messages"}, indent=1)[:6000])
    return 0 if results["server_alive_at_end"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
