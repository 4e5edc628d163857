"""Run UI-format workflows headless through a real ComfyUI server and print where their images went.

    python scripts/run_workflow.py [WORKFLOW.json ...] [--models DIR] [--checkpoint NAME] [--size PX]

With no --models/--checkpoint, every model file a workflow names (checkpoint, LoRA, UNet, ControlNet)
is stood in for, under its published name, by a tiny random-weight model of the same family and
layout, and every image it loads by a noise image: the picture is noise-like, but every node —
ComfyUI's and FewStep's — runs for real. The script says what it stood in for. With --models, your
ComfyUI models folder is used as it is (add --checkpoint to swap every checkpoint loader's file).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

PACK_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PACK_ROOT / "testing"))
import pack  # noqa: E402,F401 — registers the pack as the `comfyui_fewstep` package
from comfy_harness import COMFYUI_MISSING, ComfyServer, PromptFailed, find_comfyui  # noqa: E402
from comfyui_fewstep.fewstep.workflow_api import ui_workflow_to_prompt  # noqa: E402

DEFAULT_WORKFLOW = PACK_ROOT / "example_workflows" / "sdxl_turbo_1step_txt2img.json"
WORK_DIR = Path.home() / ".cache" / "comfyui-fewstep" / "run_workflow"


def link_models(base: Path, models: Path) -> None:
    link = base / "models"
    if link.is_symlink():
        link.unlink()
    elif link.exists():
        raise SystemExit(f"{link} exists and is not a link; use another --work-dir")
    link.symlink_to(models.resolve(), target_is_directory=True)


def saved_images(base: Path, history: dict) -> list[Path]:
    return [
        base / "output" / item.get("subfolder", "") / item["filename"]
        for output in history["outputs"].values()
        for item in output.get("images", [])
        if item.get("type") == "output"
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workflows", nargs="*", type=Path, default=[DEFAULT_WORKFLOW])
    parser.add_argument("--models", type=Path, help="your ComfyUI models folder, used as it is")
    parser.add_argument("--checkpoint", help="a checkpoint in the models folder for every checkpoint loader")
    parser.add_argument("--size", type=int,
                        help="set every Empty Latent Image and Image Scale to SIZE×SIZE pixels (quick CPU runs)")
    parser.add_argument("--cpu", action="store_true", help="run on the CPU even where a GPU is present")
    parser.add_argument("--work-dir", type=Path, default=WORK_DIR, help=f"ComfyUI base directory (default {WORK_DIR})")
    args = parser.parse_args(argv)

    comfyui = find_comfyui()
    if comfyui is None:
        print(COMFYUI_MISSING.replace("ComfyUI-bound tests skipped", "cannot run the workflow"), file=sys.stderr)
        return 2
    base = args.work_dir
    base.mkdir(parents=True, exist_ok=True)
    models = args.models or (comfyui / "models" if args.checkpoint else None)
    stand_ins = models is None
    if not stand_ins:
        link_models(base, models)
    elif (base / "models").is_symlink():
        (base / "models").unlink()  # a folder of the user's from an earlier run: never write stand-ins there

    import torch

    use_cpu = args.cpu or not torch.cuda.is_available()
    sys.path.insert(0, str(comfyui))  # the stand-ins are built with ComfyUI's own key maps
    from comfy.cli_args import args as comfy_args

    comfy_args.cpu = True  # this process only builds files; the server picks its own device
    import workflow_models

    failed = 0
    with ComfyServer(comfyui, base, cpu=use_cpu) as server:
        object_info = server.get("/object_info")
        for workflow_path in args.workflows:
            prompt = ui_workflow_to_prompt(json.loads(workflow_path.read_text()), object_info)
            if args.checkpoint:
                for node in prompt.values():
                    if "ckpt_name" in node["inputs"]:
                        node["inputs"]["ckpt_name"] = args.checkpoint
            if stand_ins:
                try:
                    placed = workflow_models.install_stand_ins(prompt, base)
                except ValueError as refused:  # a workflow no tiny stand-in can run (its message says what to do)
                    failed += 1
                    print(f"SKIPPED {workflow_path.name}: {refused}", file=sys.stderr)
                    continue
                for line in placed:
                    print(f"  stand-in: {line}")
            if args.size:
                for line in workflow_models.shrink_sizes(prompt, args.size):
                    print(f"  size: {line}")
            print(f"running {workflow_path.name} on ComfyUI at {comfyui} ({'CPU' if use_cpu else 'GPU'}) …", flush=True)
            try:
                history = server.run(prompt, timeout=1800)
            except PromptFailed as failure:
                failed += 1
                print(f"FAILED {workflow_path.name}: {failure}", file=sys.stderr)
                continue
            images = saved_images(base, history)
            for image in images:
                print(f"image: {image}")
            if not images:
                print("the workflow finished but saved no image (it has no SaveImage node)")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
