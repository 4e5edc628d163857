"""FewStep's HTTP routes for the frontend (web/fewstep.js), and its hook on queued prompts.

- GET /fewstep/families: each family's reference settings. The browser reads the defaults from here
  rather than keeping a copy of fewstep.families in JS, so a new family reaches the widgets and
  badges without a frontend change.
- GET /fewstep/detect?node=FewStepLoraLoader&name=FILE[&family=detect]: the settings the loader will
  report for that file when it runs (its name and safetensors metadata, read from the header only),
  so the widgets follow a file as soon as it is chosen.
- On POST /prompt (PromptServer's on-prompt handlers): a prompt with Few-Step Accelerate compiling its
  kernels starts reading the saved compiles ahead, once per process (fewstep.acceleration.background), so
  that a restarted server's first prompt finds them read while it loads its checkpoint.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import sys

from ..fewstep.acceleration.background import read_ahead_saved_compiles
from ..fewstep.detection import DETECT, resolve_settings
from ..fewstep.families import ETA_FROM_FAMILY, FAMILIES, Family, FewStepInputError
from ..fewstep.lora_layouts import read_safetensors_metadata

ROUTE = "/fewstep/families"
DETECT_ROUTE = "/fewstep/detect"
# Each FewStep loader: the input naming its file, and the models folder it is in.
LOADER_FILES = {
    "FewStepLoraLoader": ("lora_name", "loras"),
    "FewStepUNetLoader": ("unet_name", "diffusion_models"),
}
log = logging.getLogger(__name__)
_registered = False


def flow_shift(family: Family) -> float | str | None:
    """The σ shift the family's card samples with, for the badge: a number where it is fixed (Qwen-Image-
    Lightning's dynamic shift with base_shift = max_shift = ln 3 is exp(ln 3) = 3 at every size), "dynamic"
    where it follows the image's token count (FLUX.1-dev), None for the SD1.5/SDXL families."""
    if family.flow is None:
        return None
    config = family.scheduler_overrides
    if not config.get("use_dynamic_shifting"):
        return float(config.get("shift", 1.0))
    if config.get("time_shift_type") == "exponential" and config.get("base_shift") == config.get("max_shift"):
        return round(math.exp(config["base_shift"]), 6)
    return "dynamic"


def family_defaults(family: Family) -> dict:
    """What the frontend moves a node's widgets to, and the line its badge shows."""
    return {
        "name": family.name,
        "display_name": family.display_name,
        "default_steps": family.default_steps,
        "default_cfg": family.default_cfg,
        "default_eta": family.default_eta,
        "only_steps": list(family.only_steps) if family.only_steps else None,
        # Flow-matching families: FLUX.1-dev's distilled guidance (FluxGuidance), and the σ shift the
        # scheduler applies itself (a ModelSamplingFlux/SD3/AuraFlow shift does not change its σ).
        "guidance": family.flow.guidance if family.flow is not None else None,
        "shift": flow_shift(family),
        "reference": family.reference,
    }


def families_payload() -> dict:
    return {
        "families": {name: family_defaults(family) for name, family in FAMILIES.items()},
        "loaders": {node: file_input for node, (file_input, _folder) in LOADER_FILES.items()},
        # The inputs' values that mean "read it from the file" and "the reference eta".
        "detect": DETECT,
        "eta_from_family": ETA_FROM_FAMILY,
    }


def detected_settings(node: str, file_name: str, family: str = DETECT) -> dict:
    """What `node` will detect in `file_name` (resolve_settings, as the loader's execute() calls it)."""
    import folder_paths

    if node not in LOADER_FILES:
        raise FewStepInputError(f"node: '{node}' is not a FewStep loader ({', '.join(LOADER_FILES)}).")
    _file_input, folder = LOADER_FILES[node]
    path = folder_paths.get_full_path(folder, file_name)
    metadata = {}
    if path is not None and path.lower().endswith(".safetensors"):
        try:
            metadata = read_safetensors_metadata(path)
        except (OSError, ValueError) as error:  # unreadable header: the loader reports it when it runs
            log.debug("FewStep: no metadata from %s: %s", path, error)
    return dataclasses.asdict(resolve_settings(family, file_name, metadata))


def read_ahead_for_accelerated_prompts(json_data):
    """On-prompt handler: start reading the saved compiles ahead where the prompt accelerates with compiled
    kernels; returns the request unchanged (never raises: a queued prompt must not fail on it)."""
    try:
        prompt = json_data.get("prompt") if isinstance(json_data, dict) else None
        if isinstance(prompt, dict) and any(
                isinstance(node, dict) and node.get("class_type") == "FewStepAccelerate"
                and (node.get("inputs") or {}).get("compile_kernels", True) is not False
                for node in prompt.values()):
            read_ahead_saved_compiles()
    except Exception:
        log.warning("FewStep: reading the saved compiles ahead failed", exc_info=True)
    return json_data


def register_routes() -> bool:
    """Add the routes to ComfyUI's PromptServer, once; False where there is no server (in-process tests)."""
    global _registered
    if _registered:
        return True
    # main.py imports ComfyUI's `server` and makes its PromptServer before loading custom nodes; where
    # it has not (ComfyUI's executor imported in process), there is no server to add a route to.
    server = sys.modules.get("server")
    instance = getattr(getattr(server, "PromptServer", None), "instance", None)
    if instance is None:
        return False
    from aiohttp import web

    @instance.routes.get(ROUTE)
    async def get_families(request):
        return web.json_response(families_payload())

    @instance.routes.get(DETECT_ROUTE)
    async def get_detected(request):
        query = request.rel_url.query
        try:
            settings = detected_settings(query.get("node", ""), query.get("name", ""), query.get("family", "detect"))
        except FewStepInputError as error:
            return web.json_response({"error": str(error)}, status=400)
        return web.json_response({"settings": settings})

    instance.add_on_prompt_handler(read_ahead_for_accelerated_prompts)
    _registered = True
    log.debug("FewStep: serving %s and %s", ROUTE, DETECT_ROUTE)
    return True
