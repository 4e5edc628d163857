"""Every flow-matching example workflow through a real `python main.py`, on random weights at real size.

Starts ComfyUI's server as users do (`python main.py --listen 127.0.0.1 --port P`, its default flags; the
check adds only --base-directory for its models folder and --disable-auto-launch), turns each workflow
(UI JSON, as the templates browser opens it) into an API prompt with fewstep.workflow_api against the
server's /object_info, writes a random-weight file at real size under every file name the workflow's
loaders name (testing/real_size_models.py: ComfyUI's own layouts, fp8 where the published file is fp8),
and queues it --runs times (a new seed each), timing each prompt from POST to its finished history entry.
Files no later workflow names are deleted before the next workflow's are written: a device machine's
64 GB disk holds one model family's files at a time. Results are written after every workflow, so a run
cut short by --budget-s (or killed) keeps what it ran.

    python3 bench/workflow_gpu_check.py --out $OUT                 # GPU: all flow workflows
    python3 bench/workflow_gpu_check.py --workflows flux1_schnell_4step,z_image_turbo_9step --budget-s 500
    python3 bench/workflow_gpu_check.py --tiny --workflows sdxl_turbo_1step_txt2img   # CPU: tiny stand-ins
    python3 bench/workflow_gpu_check.py --workflows z_image_turbo_9step --accelerate   # with Few-Step Accelerate

--accelerate puts Few-Step Accelerate on each workflow's model and VAE (as a user adds it): after the
first prompt, a prompt a second until its background compiles are captured (bench/server_check), then
--runs prompts on the compiled graphs.

--tiny runs the same path on the CPU with the tests' tiny SD/SDXL stand-ins (testing/workflow_models.py)
at 128², for SD/SDXL workflows only (real-size text encoders for the flow ones do not fit a CPU run).
Where comfyui_frontend_package is missing, an empty stand-in package is put on the server's Python path
(main.py exits without it; API prompts do not use it); the results say so.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

PACK_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PACK_ROOT / "testing"))
import pack  # noqa: E402,F401 — registers the pack as the `comfyui_fewstep` package
from comfy_harness import COMFYUI_MISSING, ComfyServer, PromptFailed, comfyui_on_path, find_comfyui  # noqa: E402
from server_check import frontend_stand_in, reseeded, run_prompts  # noqa: E402

from comfyui_fewstep.fewstep.families import FAMILIES  # noqa: E402
from comfyui_fewstep.fewstep.workflow_api import ui_workflow_to_prompt  # noqa: E402

WORKFLOWS = PACK_ROOT / "example_workflows"
STARTED = time.perf_counter()


def log(message: str) -> None:
    print(f"[{time.perf_counter() - STARTED:7.1f}s] {message}", flush=True)


def is_flow_prompt(prompt: dict) -> bool:
    """A prompt whose Few-Step nodes run a flow-matching family."""
    return any(isinstance(node["inputs"].get("family"), str) and FAMILIES.get(node["inputs"]["family"]) is not None
               and FAMILIES[node["inputs"]["family"]].flow is not None for node in prompt.values())


def ordered(prompts: dict) -> list[str]:
    """Workflows sharing a diffusion model next to each other (each file is written once)."""
    def model_of(name):
        return sorted(str(v) for node in prompts[name].values() for k, v in node["inputs"].items()
                      if k in ("unet_name", "ckpt_name"))
    return sorted(prompts, key=lambda name: (model_of(name), name))


def with_accelerate(prompt: dict) -> dict:
    """`prompt` with Few-Step Accelerate between its model and VAE and their users: the model that
    reaches a node's `model` input and the VAE that reaches VAE Decode, each replaced everywhere."""
    prompt = json.loads(json.dumps(prompt))
    decode = next(node for node in prompt.values() if node["class_type"] == "VAEDecode")
    sampler = next(node for node in prompt.values() if node["class_type"] in ("SamplerCustom", "KSampler",
                                                                               "FewStepKSampler", "SamplerCustomAdvanced"))
    model, vae = sampler["inputs"]["model"], decode["inputs"]["vae"]
    for node in prompt.values():
        for key, source in (("model", model), ("vae", vae)):
            if node["inputs"].get(key) == source:
                node["inputs"][key] = ["fewstep_accelerate", 0 if key == "model" else 1]
    prompt["fewstep_accelerate"] = {"class_type": "FewStepAccelerate", "inputs": {
        "model": model, "vae": vae, "autotune_convolutions": True, "max_shapes": 4, "compile_kernels": True}}
    return prompt


def run_workflow(server: ComfyServer, name: str, prompt: dict, runs: int, seed: int) -> dict:
    times, errors = [], []
    for index in range(runs):
        started = time.perf_counter()
        try:
            history = server.run(reseeded(prompt, seed + index), timeout=900)
            times.append(round((time.perf_counter() - started) * 1e3, 1))
            images = sum(len(out.get("images", [])) for out in history.get("outputs", {}).values())
            log(f"  {name} prompt {index + 1}: {times[-1] / 1e3:.2f} s, {images} image(s)")
        except PromptFailed as failure:
            errors.append((failure.message or str(failure))[:800])
            log(f"  {name} prompt {index + 1}: FAILED {errors[-1][:300]}")
        except Exception as error:  # the connection dropped: the server may be gone
            errors.append(f"{type(error).__name__}: {error}"[:800])
            log(f"  {name} prompt {index + 1}: FAILED {errors[-1][:300]}")
        if server.process.poll() is not None:
            errors.append(f"the server exited with {server.process.returncode}")
            break
    return {"prompts": runs, "completed": len(times), "first_ms": times[0] if times else None,
            "second_ms": times[1] if len(times) > 1 else None, "times_ms": times, "errors": errors}


def report(results: dict) -> str:
    lines = ["| workflow | completed | first prompt s | second prompt s | files written (GiB, write s) | "
             "GiB of model files on hand | error |", "|---|---|---|---|---|---|---|"]
    for name, result in results["workflows"].items():
        first = f"{result['first_ms'] / 1e3:.2f}" if result.get("first_ms") else "–"
        second = f"{result['second_ms'] / 1e3:.2f}" if result.get("second_ms") else "–"
        if result.get("median_counted_ms"):  # --accelerate: after the compiles, the median of --runs
            second = (f"{result['median_counted_ms'] / 1e3:.2f} (median of {result['counted_prompts']}, "
                      f"compiled after {result['compiled_after_s']} s)")
        files = "; ".join(f"{f['file']} ({f['GiB']}, {f['write_s']})" for f in result.get("files", []))
        error = (result.get("errors") or [""])[0][:300].replace("|", "/").replace("\n", " ")
        lines.append(f"| {name} | {result.get('completed', 0)}/{result.get('prompts', 0)} | {first} | {second} | "
                     f"{files} | {result.get('GiB on hand', '–')} | {error} |")
    lines += ["", f"server: {results['server']}", f"frontend: {results['frontend']}",
              f"models: {results['models']}", f"base directory: {results.get('base directory')}",
              f"device: {results.get('device')}",
              f"server alive at the end: {results.get('server_alive_at_end')}",
              f"wall time: {results.get('wall_s')} s"]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or PACK_ROOT / "bench" / "out") / "workflow_gpu_check")
    parser.add_argument("--workflows", default="", help="comma-separated workflow names (default: every flow workflow)")
    parser.add_argument("--runs", type=int, default=2, help="prompts per workflow (the first loads the models)")
    parser.add_argument("--plan", action="store_true", help="list the real-size files each workflow needs and the "
                        "space on hand after each (a CPU server converts the workflows; nothing is written or run)")
    parser.add_argument("--tiny", action="store_true", help="CPU, tiny SD/SDXL stand-ins at 128² (a check of this script)")
    parser.add_argument("--base-dir", type=Path, default=None, help="the server's base directory (models, output); "
                        "default: a new temporary folder, removed at the end (never under --out: a device call "
                        "brings back what is under $OUT)")
    parser.add_argument("--accelerate", action="store_true", help="put Few-Step Accelerate on each workflow")
    parser.add_argument("--compile-limit-s", type=float, default=300,
                        help="with --accelerate: longest wait for the background compiles")
    parser.add_argument("--budget-s", type=float, default=float("inf"),
                        help="start no workflow after this many seconds (a device call's limit); results are kept")
    args = parser.parse_args(argv)
    comfyui = find_comfyui()
    if comfyui is None:
        print(COMFYUI_MISSING.replace("ComfyUI-bound tests skipped", "nothing to check"), file=sys.stderr)
        return 2
    import torch

    cuda = torch.cuda.is_available() and not args.tiny and not args.plan
    if not cuda and not args.tiny and not args.plan:
        print("no CUDA device: real-size models need the GPU machine; run with --tiny for the CPU check", file=sys.stderr)
        return 2
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    frontend = "comfyui_frontend_package as installed"
    try:
        import comfyui_frontend_package  # noqa: F401
    except ImportError:
        folder = frontend_stand_in(Path(tempfile.mkdtemp(prefix="fewstep-frontend-")))
        os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(folder), os.environ.get("PYTHONPATH")]))
        frontend = "an empty stand-in comfyui_frontend_package (API prompts only; the UI is not served)"
    if args.base_dir is not None:
        base = args.base_dir.resolve()
    else:  # one family's files at a time: at most ~40 GiB (Qwen-Image's, with FLUX's T5 and ae kept for later)
        import real_size_models

        base = real_size_models.scratch_dir("fewstep-workflow-check-", 48 if cuda else 0).resolve()
    models = base / "models"
    (models / "text_encoders").mkdir(parents=True, exist_ok=True)
    comfyui_on_path(comfyui)
    from comfy.cli_args import args as comfy_args

    comfy_args.cpu = not cuda  # this process builds ComfyUI's modules on the meta device (file layouts) only
    flags = "(defaults)" if cuda else "--cpu (CPU check)"
    results = {"server": f"python main.py {flags} --base-directory B --disable-auto-launch, 127.0.0.1",
               "frontend": frontend, "models": "tiny stand-ins (testing/workflow_models.py)" if args.tiny else
               "random weights at real size (testing/real_size_models.py)", "workflows": {},
               "base directory": f"{base} ({shutil.disk_usage(base).free / 2**30:.0f} GiB free at the start)"}

    def save():
        results["wall_s"] = round(time.perf_counter() - STARTED, 1)
        (out / "results.json").write_text(json.dumps(results, indent=1))
        (out / "results.md").write_text(report(results) + "\n")

    server = ComfyServer(comfyui, base, log_path=out / "server.log", cpu=not cuda)
    log(f"starting ComfyUI: {results['server']}")
    server.start(timeout=300)
    log("server up")
    try:
        object_info = server.get("/object_info", timeout=120)
        paths = sorted(WORKFLOWS.glob("*.json"))
        chosen = [p for p in paths if not args.workflows or p.stem in args.workflows.split(",")]
        prompts = {}
        for path in chosen:
            try:
                prompt = ui_workflow_to_prompt(json.loads(path.read_text()), object_info)
            except Exception as error:
                results["workflows"][path.stem] = {"errors": [f"conversion: {type(error).__name__}: {error}"]}
                continue
            if args.workflows or is_flow_prompt(prompt):
                prompts[path.stem] = with_accelerate(prompt) if args.accelerate else prompt
        if args.workflows:
            missing = set(args.workflows.split(",")) - {p.stem for p in paths}
            for name in sorted(missing):
                results["workflows"][name] = {"errors": ["no such example workflow"]}
        names = ordered(prompts)
        log(f"workflows: {', '.join(names)}")
        built: dict = {}
        for position, name in enumerate(names):
            if time.perf_counter() - STARTED > args.budget_s:
                results["workflows"][name] = {"errors": ["skipped: over the time budget"]}
                save()
                continue
            log(f"== {name}")
            prompt = prompts[name]
            entry = results["workflows"][name] = {}
            try:
                if args.tiny:
                    import workflow_models

                    entry["files"] = [{"file": p, "GiB": 0, "write_s": 0} for p in workflow_models.install_stand_ins(prompt, base)]
                    workflow_models.shrink_sizes(prompt)
                else:
                    import real_size_models

                    entry["files"] = real_size_models.provide(prompt, [prompts[n] for n in names[position + 1:]],
                                                              models, "cuda" if cuda else "cpu", built, log,
                                                              dry_run=args.plan)
                    entry["GiB on hand"] = round(sum(record["GiB"] for record in built.values()), 1)
                    if args.plan:
                        continue
                if args.accelerate:
                    entry.update(run_prompts(server, name, prompt, args.runs, 1000 * (position + 1), args.compile_limit_s))
                    entry["fewstep_messages"] = [line.split("FewStepAccelerate:", 1)[1].strip()[:400]
                                                 for line in server.log_text().splitlines() if "FewStepAccelerate:" in line]
                else:
                    entry.update(run_workflow(server, name, prompt, args.runs, 1000 * (position + 1)))
            except Exception as error:
                entry.setdefault("errors", []).append(f"{type(error).__name__}: {error}"[:800])
                log(f"  {name}: {traceback.format_exc()}")
            save()
            if server.process.poll() is not None:
                log("the server is gone; stopping")
                break
        results["server_alive_at_end"] = server.process.poll() is None
        log_text = server.log_text()
        results["device"] = next((line.strip() for line in log_text.splitlines() if line.startswith("Device:")), None)
    finally:
        server.stop()
        save()
        if args.base_dir is None:
            shutil.rmtree(base, ignore_errors=True)
    text = report(results)
    print(text, flush=True)
    healthy = results.get("server_alive_at_end") and all(
        (args.plan or r.get("completed") == r.get("prompts")) and not r.get("errors") for r in results["workflows"].values())
    return 0 if healthy else 1


if __name__ == "__main__":
    raise SystemExit(main())
