"""Run a UI-format workflow headless through a real ComfyUI server and print where its images went.

    python scripts/run_workflow.py [WORKFLOW.json] [--checkpoint NAME] [--models DIR]

With no --checkpoint/--models, the published model files a workflow names are replaced by tiny
random-weight models of the same family (the image is noise-like, but every node runs for real);
the script says what it replaced. With --models, your ComfyUI models folder is used as it is.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

PACK_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PACK_ROOT / "tests"))
import conftest  # noqa: E402,F401 — registers the pack as the `comfyui_fewstep` package
from comfy_harness import COMFYUI_MISSING, ComfyServer, find_comfyui  # noqa: E402
from comfyui_fewstep.fewstep.workflow_api import ui_workflow_to_prompt  # noqa: E402

DEFAULT_WORKFLOW = PACK_ROOT / "example_workflows" / "sdxl_turbo_1step_txt2img.json"
WORK_DIR = Path.home() / ".cache" / "comfyui-fewstep" / "run_workflow"
MODEL_INPUTS = {"ckpt_name": "checkpoint", "unet_name": "unet", "lora_name": "lora"}


def is_sdxl_name(name: str) -> bool:
    lowered = name.lower()
    return any(mark in lowered for mark in ("xl", "dmd2", "lightning", "koala", "vega", "ssd-1b"))


def substitute_tiny_models(prompt: dict, models_dir: Path) -> list[str]:
    """Point every model-file input at a tiny model of the same base; returns what was replaced."""
    import tiny_models  # builds with ComfyUI's key maps: ComfyUI must be importable (see main)

    built: dict[str, object] = {}
    replaced = []
    for node_id, node in prompt.items():
        for input_name, kind in MODEL_INPUTS.items():
            published = node["inputs"].get(input_name)
            if not isinstance(published, str):
                continue
            base = "sdxl" if is_sdxl_name(published) else "sd15"
            if base not in built:
                built[base] = (tiny_models.build_sdxl if base == "sdxl" else tiny_models.build_sd15)(models_dir)
            tiny = built[base]
            if kind == "checkpoint":
                tiny_name = tiny.checkpoint_name
            elif kind == "unet":
                tiny_name = tiny.unet_name
            else:
                tiny_name = tiny_models.build_lora(models_dir, published, base)
            node["inputs"][input_name] = tiny_name
            replaced.append(f"{published} → {tiny_name} (tiny {base}, random weights)")
    return replaced


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workflow", nargs="?", type=Path, default=DEFAULT_WORKFLOW)
    parser.add_argument("--checkpoint", help="a checkpoint in --models' checkpoints/ to use for every checkpoint loader")
    parser.add_argument("--models", type=Path, help="your ComfyUI models folder (default: ComfyUI/models with --checkpoint)")
    parser.add_argument("--cpu", action="store_true", help="run on the CPU even where a GPU is present")
    args = parser.parse_args(argv)

    comfyui = find_comfyui()
    if comfyui is None:
        print(COMFYUI_MISSING.replace("ComfyUI-bound tests skipped", "cannot run the workflow"), file=sys.stderr)
        return 2
    workflow = json.loads(args.workflow.read_text())
    base = WORK_DIR
    base.mkdir(parents=True, exist_ok=True)
    models = args.models or (comfyui / "models" if args.checkpoint else None)
    if models is not None:
        link = base / "models"
        if link.is_symlink() or link.exists():
            link.unlink() if link.is_symlink() else None
        if not link.exists():
            link.symlink_to(models.resolve(), target_is_directory=True)

    import torch

    use_cpu = args.cpu or not torch.cuda.is_available()
    sys.path.insert(0, str(comfyui))  # the tiny models are built with ComfyUI's own key maps
    from comfy.cli_args import args as comfy_args

    comfy_args.cpu = True  # this process only builds files; the server picks its own device
    with ComfyServer(comfyui, base, cpu=use_cpu) as server:
        prompt = ui_workflow_to_prompt(workflow, server.get("/object_info"))
        if args.checkpoint:
            for node in prompt.values():
                if "ckpt_name" in node["inputs"]:
                    node["inputs"]["ckpt_name"] = args.checkpoint
        elif models is None:
            for line in substitute_tiny_models(prompt, base / "models"):
                print(f"model: {line}")
        print(f"running {args.workflow.name} on ComfyUI at {comfyui} ({'CPU' if use_cpu else 'GPU'}) …")
        history = server.run(prompt, timeout=1800)
    images = [
        base / "output" / item.get("subfolder", "") / item["filename"]
        for output in history["outputs"].values()
        for item in output.get("images", [])
        if item.get("type") == "output"
    ]
    for image in images:
        print(f"image: {image}")
    if not images:
        print("the workflow finished but saved no image (it has no SaveImage node)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
