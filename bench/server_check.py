"""Few-Step Accelerate as users run it: a real `python main.py`, its default flags, prompts over HTTP.

Starts ComfyUI's server with its default flags (on CUDA: PyTorch's cudaMallocAsync allocator) and, for
every example workflow that uses Few-Step Accelerate: queues it once (a size the server has not seen runs
at once on CUDA graphs of the eager kernels while torch.compile works in the background), then a prompt a
second until the node's log says every background compile was captured or given up, then `--runs`
prompts more, which replay the compiled graphs (a new seed each time, so each prompt samples and decodes
again). Then a workflow without it. After every prompt it checks that the server is still up. Then the
same again with `--disable-cuda-malloc`. Each prompt is timed from POST /prompt to its finished history
entry, as a websocket client sees it.

    python3 bench/server_check.py --out bench/out/server_check            # GPU: full-size SDXL, random weights
    python3 bench/server_check.py --model tiny --runs 2 --flag-sets default   # quick: the tests' tiny stand-ins

`--model full` builds a random-weight SDXL checkpoint (fp16, the real architecture) and puts it under
every published checkpoint name the workflows load; `--model tiny` uses the tests' tiny stand-ins.
Where comfyui_frontend_package is missing, `--frontend-stand-in` supplies an empty one (main.py exits
without it; API prompts do not use it); the results say so.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

PACK_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PACK_ROOT / "testing"))
import pack  # noqa: E402,F401 — registers the pack as the `comfyui_fewstep` package
from comfy_harness import COMFYUI_MISSING, ComfyServer, PromptFailed, comfyui_on_path, find_comfyui  # noqa: E402

from comfyui_fewstep.fewstep.acceleration.log_lines import compiles_pending  # noqa: E402
from comfyui_fewstep.fewstep.workflow_api import ui_workflow_to_prompt  # noqa: E402

WORKFLOWS = PACK_ROOT / "example_workflows"
PLAIN_WORKFLOW = WORKFLOWS / "sdxl_turbo_1step_txt2img.json"
PLAIN_RUNS = 3
# The acceptance pair first (ComfyUI's defaults, then its native allocator), then the memory and
# speed modes a user may start with.
FLAG_SETS = {"default": (), "disable-cuda-malloc": ("--disable-cuda-malloc",), "lowvram": ("--lowvram",),
             "highvram": ("--highvram",), "fast": ("--fast",)}
DEFAULT_FLAG_SETS = ("default", "disable-cuda-malloc")
SEED_INPUTS = ("noise_seed", "seed")
# Lines of a server log that mean trouble for the process, whatever the prompts said.
FATAL_MARKS = ("terminate called", "Aborted", "Segmentation fault", "core dumped", "CUDA error")


def accelerated_workflows() -> list[Path]:
    return sorted(path for path in WORKFLOWS.glob("*.json") if '"FewStepAccelerate"' in path.read_text())


def install_models(model: str, base: Path, prompts: dict[str, dict]) -> list[str]:
    """Put a random-weight model under every file name the prompts load; returns what was placed."""
    comfyui_on_path()
    if model == "tiny":
        import workflow_models

        placed = []
        for prompt in prompts.values():
            placed += workflow_models.install_stand_ins(prompt, base)
        return sorted(set(placed))
    import torch

    from gpu_models import build_full  # bench/, this script's folder

    models = base / "models"
    built = build_full("sdxl", models, "cuda", torch.float16)
    torch.cuda.empty_cache()
    placed = []
    for prompt in prompts.values():
        for node in prompt.values():
            name = node["inputs"].get("ckpt_name")
            if isinstance(name, str) and name != built.checkpoint_name:
                link = models / "checkpoints" / name
                if not link.exists():
                    link.symlink_to(models / "checkpoints" / built.checkpoint_name)
                placed.append(f"checkpoints/{name} ← full-size SDXL, random fp16 weights")
    return sorted(set(placed))


def frontend_stand_in(folder: Path) -> Path:
    """An empty comfyui_frontend_package: main.py starts with it and serves an empty page."""
    package = folder / "comfyui_frontend_package"
    (package / "static").mkdir(parents=True, exist_ok=True)
    (package / "__init__.py").write_text("")
    (package / "static" / "index.html").write_text("<!doctype html><title>stand-in frontend</title>\n")
    return folder


def reseeded(prompt: dict, seed: int) -> dict:
    copy = json.loads(json.dumps(prompt))
    for node in copy.values():
        for name in SEED_INPUTS:
            if isinstance(node["inputs"].get(name), int):
                node["inputs"][name] = seed
    return copy


class PromptRuns:
    """Prompts of one workflow on one server, each timed and checked; stops at the first lost server."""

    def __init__(self, server: ComfyServer, name: str, prompt: dict, first_seed: int):
        self.server, self.name, self.prompt, self.seed = server, name, prompt, first_seed
        self.times, self.errors = [], []

    def run(self, label: str) -> bool:
        """One prompt; False once the server is gone."""
        started = time.perf_counter()
        try:
            self.server.run(reseeded(self.prompt, self.seed), timeout=1200)
            self.times.append((time.perf_counter() - started) * 1e3)
            outcome = f"{self.times[-1]:.1f} ms"
        except PromptFailed as failure:
            self.errors.append(failure.message[:500] or str(failure)[:500])
            outcome = f"FAILED: {self.errors[-1][:200]}"
        except Exception as error:  # the connection dropped: the server may be gone
            self.errors.append(f"{type(error).__name__}: {error}"[:500])
            outcome = f"FAILED: {self.errors[-1][:200]}"
        self.seed += 1
        alive = self.server.process.poll() is None
        print(f"  {self.name} {label}: {outcome}{'' if alive else ' — SERVER GONE'}", flush=True)
        return alive


def run_prompts(server: ComfyServer, name: str, prompt: dict, runs: int, first_seed: int,
                compile_limit_s: float | None = None) -> dict:
    """The first prompt; with `compile_limit_s`, a prompt a second while compiles are pending (at most
    that long); then `runs` prompts, timed apart."""
    prompts = PromptRuns(server, name, prompt, first_seed)
    log_start = len(server.log_text())  # this workflow's compiles only

    def pending() -> int:
        return compiles_pending(server.log_text()[log_start:])

    started = time.perf_counter()
    alive = prompts.run("first")
    waiting, accelerated_after_s = 0, None
    while alive and compile_limit_s is not None and pending() > 0:
        if time.perf_counter() - started > compile_limit_s:
            break
        time.sleep(1.0)
        waiting += 1
        alive = prompts.run(f"while compiling #{waiting}")
    if compile_limit_s is not None and pending() == 0:
        accelerated_after_s = round(time.perf_counter() - started, 2)
    counted_from = len(prompts.times)
    for index in range(runs if alive else 0):
        if not prompts.run(f"#{index + 1}"):
            break
    times = prompts.times
    counted = times[counted_from:]
    return {"workflow": name, "prompts": 1 + waiting + runs, "completed": len(times), "errors": prompts.errors,
            "first_ms": times[0] if times else None, "prompts_while_compiling": waiting,
            "compiled_after_s": accelerated_after_s, "counted_prompts": len(counted),
            "median_counted_ms": statistics.median(counted) if counted else None,
            "times_ms": [round(t, 2) for t in times]}


def check_flag_set(comfyui: Path, base: Path, label: str, flags: tuple, workflows: list[Path],
                   prompts: dict, runs: int, out: Path, compile_limit_s: float) -> dict:
    log_path = out / f"server-{label}.log"
    log_path.unlink(missing_ok=True)
    print(f"== python main.py {' '.join(flags) or '(default flags)'}", flush=True)
    import torch

    # Without a GPU (a quick check of this script) main.py needs --cpu; Few-Step Accelerate then runs eager.
    server = ComfyServer(comfyui, base, extra_args=flags, log_path=log_path, cpu=not torch.cuda.is_available())
    server.start(timeout=300)
    results = []
    try:
        for seed_base, path in enumerate(workflows, start=1):
            results.append(run_prompts(server, path.name, prompts[path.name], runs, 1000 * seed_base, compile_limit_s))
            if server.process.poll() is not None:
                break
        if server.process.poll() is None:
            results.append(run_prompts(server, PLAIN_WORKFLOW.name, prompts[PLAIN_WORKFLOW.name], PLAIN_RUNS - 1, 99))
        alive = server.process.poll() is None
        exit_code = server.process.returncode
    finally:
        server.stop()
    log = log_path.read_text(errors="replace")
    return {
        "flags": list(flags), "server_alive_at_end": alive, "exit_code": exit_code, "results": results,
        "device": next((line.strip() for line in log.splitlines() if line.startswith("Device:")), None),
        "fewstep_messages": sorted({line.split("FewStepAccelerate:", 1)[1].strip()[:400]
                                    for line in log.splitlines() if "FewStepAccelerate:" in line}),
        "fatal_lines": [line for line in log.splitlines() if any(mark in line for mark in FATAL_MARKS)][:20],
    }


def report(checks: dict, placed: list[str], frontend: str) -> str:
    lines = ["| server flags | workflow | prompts | completed | first prompt | prompts while compiling | compiled "
             "after | median of the counted prompts | server up after |", "|---|---|---|---|---|---|---|---|---|"]
    for check in checks.values():
        flags = " ".join(check["flags"]) or "(defaults)"
        for result in check["results"]:
            first = f"{result['first_ms'] / 1e3:.2f} s" if result["first_ms"] is not None else "–"
            compiled = f"{result['compiled_after_s']:.1f} s" if result["compiled_after_s"] is not None else "–"
            median = (f"{result['median_counted_ms']:.1f} ms ({result['counted_prompts']})"
                      if result["median_counted_ms"] else "–")
            lines.append(f"| {flags} | {result['workflow']} | {result['prompts']} | {result['completed']} | {first} "
                         f"| {result['prompts_while_compiling']} | {compiled} | {median} "
                         f"| {'yes' if check['server_alive_at_end'] else 'NO'} |")
    lines.append("")
    lines.append(f"models: {'; '.join(placed)}")
    lines.append(f"frontend: {frontend}")
    for label, check in checks.items():
        lines.append(f"{label}: device: {check['device']}; fatal log lines: {len(check['fatal_lines'])}")
        for message in check["fewstep_messages"]:
            lines.append(f"  FewStepAccelerate: {message}")
        for result in check["results"]:
            for error in result["errors"][:3]:
                lines.append(f"  error in {result['workflow']}: {error}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=PACK_ROOT / "bench" / "out" / "server_check")
    parser.add_argument("--runs", type=int, default=20, help="prompts per accelerated workflow and flag set")
    parser.add_argument("--model", choices=("full", "tiny"), default="full")
    parser.add_argument("--compile-limit-s", type=float, default=420,
                        help="longest wait, per workflow and server, for the background compiles (cold: minutes)")
    parser.add_argument("--flag-sets", nargs="+", choices=list(FLAG_SETS), default=list(DEFAULT_FLAG_SETS))
    parser.add_argument("--frontend-stand-in", action="store_true",
                        help="supply an empty comfyui_frontend_package where it is not installed")
    args = parser.parse_args(argv)
    args.out = args.out.resolve()  # main.py runs in ComfyUI's folder
    comfyui = find_comfyui()
    if comfyui is None:
        print(COMFYUI_MISSING.replace("ComfyUI-bound tests skipped", "nothing to check"), file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    frontend = "comfyui_frontend_package as installed"
    try:
        import comfyui_frontend_package  # noqa: F401
    except ImportError:
        if not args.frontend_stand_in:
            print("comfyui_frontend_package is missing (main.py exits without it): pip install "
                  "comfyui-frontend-package, or pass --frontend-stand-in for API-only runs", file=sys.stderr)
            return 2
        folder = frontend_stand_in(args.out / "frontend_stand_in")
        os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(folder), os.environ.get("PYTHONPATH")]))
        frontend = "an empty stand-in comfyui_frontend_package (API prompts only)"

    base = args.out / "base"
    workflows = accelerated_workflows()
    with ComfyServer(comfyui, base, log_path=args.out / "server-object-info.log", cpu=True) as server:
        object_info = server.get("/object_info")
    prompts = {path.name: ui_workflow_to_prompt(json.loads(path.read_text()), object_info)
               for path in [*workflows, PLAIN_WORKFLOW]}
    placed = install_models(args.model, base, prompts)
    environment = {"torch": subprocess.run([sys.executable, "-c", "import torch; print(torch.__version__)"],
                                           capture_output=True, text=True).stdout.strip(),
                   "gpu": subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
                                         capture_output=True, text=True).stdout.strip() if args.model == "full" else None}
    checks = {}
    for label in args.flag_sets:
        checks[label] = check_flag_set(comfyui, base, label, FLAG_SETS[label], workflows, prompts, args.runs, args.out,
                                       args.compile_limit_s)
        # Written after each server, so that a run stopped by a time limit keeps what it saw.
        (args.out / "results.json").write_text(json.dumps(
            {"model": args.model, "frontend": frontend, "placed": placed, "environment": environment,
             "checks": checks}, indent=1))
        text = report(checks, placed, frontend)
        (args.out / "results.md").write_text(text + "\n")
    print(text)
    healthy = all(check["server_alive_at_end"] and not check["fatal_lines"]
                  and all(result["completed"] == result["prompts"] for result in check["results"])
                  for check in checks.values())
    return 0 if healthy else 1


if __name__ == "__main__":
    raise SystemExit(main())
