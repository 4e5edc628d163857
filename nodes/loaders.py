"""FewStepLoraLoader and FewStepUNetLoader: load published few-step files, detect their family.

Thin glue: layouts and detection live in fewstep.lora_layouts and fewstep.detection; patching is
ComfyUI's own (comfy.lora key maps, ModelPatcher.add_patches, ModelSamplingDiscrete's x0 patch).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import re
from pathlib import Path

import comfy.lora
import comfy.model_sampling
import comfy.sd
import comfy.supported_models
import comfy.utils
import folder_paths
import torch
from comfy_api.latest import io

from ..fewstep.detection import DETECT, check_family_fits_model, resolve_settings
from ..fewstep.families import FAMILIES, FAMILY_NAMES, FewStepInputError, FewStepSettings, get_family
from ..fewstep.lora_layouts import (canonicalize, card_lora_scale, lora_base, read_safetensors,
                                    resolve_kohya_aliases, with_peft_adapter_config)
from .types import FewStepSettingsType
from .validation import check_numbers, validation_message

FEW_STEP_LORAS = "fewstep_loras"  # model_options entry: the few-step LoRAs already on this model
log = logging.getLogger("ComfyUI-FewStep")

# The bases whose LoRAs the loader reads (fewstep.lora_layouts), as the frontend's search finds them.
LORA_BASES = "SD1.5, SDXL, FLUX, SD3.5, Qwen-Image or Z-Image"
# The distilled full flow-matching models, which the UNet loader reads (trained_on_distilled_model's families).
DISTILLED_FLOW_MODELS = ", ".join(family.display_name for family in FAMILIES.values()
                                  if family.flow is not None and family.flow.lora_scale is None)

FAMILY_OVERRIDE_TOOLTIP = (
    "'detect' reads the family from the file's metadata and published name; pick a family to override "
    "a renamed or unknown file."
)


def model_base(model) -> str:
    config = model.model.model_config
    if isinstance(config, comfy.supported_models.SDXL):
        return "sdxl"
    if isinstance(config, comfy.supported_models.SD15):
        return "sd15"
    return type(config).__name__


def _in_file(input_name: str, file_name: str, error: FewStepInputError) -> FewStepInputError:
    return FewStepInputError(f"{input_name}: {file_name}: {error}".replace(f"{file_name}: {file_name}:", f"{file_name}:"))


def trained_on_distilled_model(family_name: str) -> bool:
    """Whether a LoRA detected as `family_name` was trained on that family's distilled full model (FLUX.1-schnell,
    SD3.5 Large Turbo, Z-Image-Turbo: flow families with no LoRA scale of their own) rather than being a
    few-step LoRA; it is no distillation stacked on another."""
    flow = get_family(family_name).flow
    return flow is not None and flow.lora_scale is None


def settings_ui(settings: FewStepSettings, lines: list[str]) -> dict:
    """What the node shows after it runs: its report as text, and the settings for web/fewstep.js,
    which moves the connected samplers' widgets to the file's reference values."""
    return {"text": ("\n".join(lines),), "fewstep_settings": [dataclasses.asdict(settings)]}


class FewStepLoraLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="FewStepLoraLoader",
            display_name="Few-Step LoRA Loader (LCM, Lightning, Hyper, TCD, DMD2, FLUX)",
            category="loaders/few-step",
            description=(
                f"Applies a few-step LoRA in any published layout (kohya, diffusers, PEFT, ComfyUI, …; {LORA_BASES}) "
                "with every key matched, and outputs the family and settings its model card gives."
            ),
            inputs=[
                io.Model.Input("model", tooltip=f"The model the LoRA was trained on ({LORA_BASES})."),
                io.Clip.Input("clip", optional=True,
                              tooltip="Connect to apply the LoRA's text-encoder part (LCM-LoRA has none; some style LoRAs do)."),
                io.Combo.Input("lora_name", options=folder_paths.get_filename_list("loras"),
                               tooltip="A .safetensors LoRA in ComfyUI's loras folder; pickles (.ckpt/.pt) are refused."),
                io.Float.Input("strength_model", default=1.0, min=-10.0, max=10.0, step=0.01,
                               tooltip=("LoRA scale on the UNet or transformer, times the card's fixed scale where it has "
                                        "one (Hyper-FLUX: 0.125, so 1.0 applies 0.125); the other cards use 1.0.")),
                io.Float.Input("strength_clip", default=1.0, min=-10.0, max=10.0, step=0.01,
                               tooltip="LoRA scale on the text encoders (when the file has that part), times the card's fixed scale like strength_model."),
                io.Combo.Input("family", options=[DETECT, *FAMILY_NAMES], default=DETECT, tooltip=FAMILY_OVERRIDE_TOOLTIP),
            ],
            outputs=[
                io.Model.Output(),
                io.Clip.Output(),
                FewStepSettingsType.Output(display_name="settings",
                                           tooltip="The detected family and settings, for the FewStep scheduler and samplers."),
            ],
        )

    @classmethod
    def validate_inputs(cls, strength_model=None, strength_clip=None) -> bool | str:
        return validation_message(lambda: check_numbers(cls, strength_model=strength_model, strength_clip=strength_clip))

    @classmethod
    def execute(cls, model, lora_name, strength_model, strength_clip, family=DETECT, clip=None) -> io.NodeOutput:
        check_numbers(cls, strength_model=strength_model, strength_clip=strength_clip)
        path = folder_paths.get_full_path_or_raise("loras", lora_name)
        try:
            tensors, metadata = read_safetensors(path)
            metadata, config_source = with_peft_adapter_config(path, metadata)
            canonical = canonicalize(tensors, metadata)
        except FewStepInputError as error:
            raise _in_file("lora_name", lora_name, error) from None

        base, expected = lora_base(tensors), model_base(model)
        if base is not None and expected in ("sd15", "sdxl") and base != expected:
            names = {"sd15": "SD1.5", "sdxl": "SDXL"}
            raise FewStepInputError(
                f"lora_name: {lora_name} is an {names[base]} LoRA but the model is {names[expected]}-family; "
                f"use the {names[expected]} release of this LoRA or load an {names[base]} checkpoint."
            )

        key_map = comfy.lora.model_lora_keys_unet(model.model, {})
        if clip is not None:
            key_map = comfy.lora.model_lora_keys_clip(clip.cond_stage_model, key_map)
        canonical = resolve_kohya_aliases(canonical, key_map)
        modules = canonical.modules
        text_modules = {m for m in modules if m.startswith(("lora_te", "text_encoders."))}
        considered = modules if clip is not None else modules - text_modules
        unmatched = sorted(m for m in considered if m not in key_map)
        if unmatched or canonical.unrecognized:
            sample = ", ".join((unmatched + canonical.unrecognized)[:5])
            raise FewStepInputError(
                f"lora_name: {lora_name} ({canonical.layout} layout): {len(unmatched)} LoRA modules match no "
                f"weight of this {expected} model and {len(canonical.unrecognized)} keys are no LoRA weight "
                f"(e.g. {sample}); applying it in part would give subtly wrong images. Check that it is "
                "a LoRA for this base model."
            )

        settings = resolve_settings(family, lora_name, metadata)
        # The strengths scale the card's own LoRA scale, as diffusers' fuse_lora(lora_scale=…) does for
        # every component: 1.0 is the card's setting (Hyper-FLUX: 0.125), another value moves from it.
        card_scale = card_lora_scale(settings.family)
        patches = comfy.lora.load_lora(canonical.tensors, key_map, log_missing=False)
        new_model = model.clone()
        new_model.add_patches(patches, strength_model * card_scale)
        new_clip = None
        if clip is not None:
            new_clip = clip.clone()
            new_clip.add_patches(patches, strength_clip * card_scale)

        lines = [settings.summary(), f"{len(modules)} LoRA modules applied ({canonical.layout} layout)"]
        if config_source:
            lines.append(f"lora_alpha and r from the {config_source} saved beside it")
        if card_scale != 1.0:
            lines.append(f"LoRA scale {card_scale:g} from the {settings.family} card × strength_model "
                         f"{strength_model:g} = {card_scale * strength_model:g}")
        if settings.family is not None and trained_on_distilled_model(settings.family):
            lines.append(f"a LoRA for the distilled {get_family(settings.family).display_name} model, not a "
                         "few-step distillation itself: sample at that model's settings")
        if text_modules and clip is None:
            lines.append(f"{len(text_modules)} text-encoder modules not applied: connect a CLIP to apply them")
        if settings.family is not None and not trained_on_distilled_model(settings.family):
            earlier = new_model.model_options.get(FEW_STEP_LORAS, [])
            if earlier:
                warning = (f"warning: {lora_name} is stacked on another few-step LoRA ({', '.join(earlier)}); "
                           "two distillations rarely combine well — keep one, or lower their strengths.")
                log.warning(warning)
                lines.append(warning)
            new_model.model_options[FEW_STEP_LORAS] = [*earlier, lora_name]
        ui = settings_ui(settings, lines)
        ui["fewstep_settings"][0]["lora_scale"] = card_scale * strength_model
        return io.NodeOutput(new_model, new_clip, settings, ui=ui)


class FewStepUNetLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="FewStepUNetLoader",
            display_name="Few-Step UNet Loader (Lightning, Hyper, DMD2, FLUX, SD3.5, Z-Image)",
            category="loaders/few-step",
            description=(
                f"Loads a distilled SD1.5/SDXL UNet or flow-matching transformer ({DISTILLED_FLOW_MODELS}), in "
                "ComfyUI's or diffusers' layout, with the prediction type its card uses — x0 for the 1-step "
                "SDXL-Lightning UNet — and outputs its family and settings; a family for another base is refused."
            ),
            inputs=[
                io.Combo.Input("unet_name", options=folder_paths.get_filename_list("diffusion_models"),
                               tooltip=("A .safetensors UNet or transformer in ComfyUI's diffusion_models "
                                        "(unet) folder; pickles are refused. For a diffusers transformer saved in "
                                        "shards (…-00001-of-00003.safetensors), pick any shard: the whole set loads.")),
                io.Combo.Input("family", options=[DETECT, *FAMILY_NAMES], default=DETECT, tooltip=FAMILY_OVERRIDE_TOOLTIP),
            ],
            outputs=[
                io.Model.Output(),
                FewStepSettingsType.Output(display_name="settings",
                                           tooltip="The detected family and settings, for the FewStep scheduler and samplers."),
            ],
        )

    @classmethod
    def execute(cls, unet_name, family=DETECT) -> io.NodeOutput:
        path = folder_paths.get_full_path_or_raise("diffusion_models", unet_name)
        try:
            state_dict, metadata = read_diffusion_model(Path(path))
        except FewStepInputError as error:
            raise _in_file("unet_name", unet_name, error) from None
        state_dict = z_image_diffusers_to_comfy(state_dict)
        model = comfy.sd.load_diffusion_model_state_dict(state_dict, metadata=metadata)
        if model is None:
            raise FewStepInputError(
                f"unet_name: {unet_name} is not a diffusion model ComfyUI recognises (SD1.5/SDXL UNets; FLUX, "
                "SD3.5, Qwen-Image and Z-Image transformers; ComfyUI or diffusers layout); for a LoRA use "
                "Few-Step LoRA Loader, for a full checkpoint a checkpoint loader."
            )
        settings = resolve_settings(family, unet_name, metadata)
        if settings.family is not None:
            architecture = type(model.model.model_config).__name__
            flow_model = isinstance(model.get_model_object("model_sampling"), comfy.model_sampling.CONST)
            try:
                check_family_fits_model(get_family(settings.family), architecture, flow_model)
            except FewStepInputError as error:
                if family != DETECT:
                    raise
                raise FewStepInputError(f"unet_name: {unet_name} is named as a {settings.family} file, but {error}; "
                                        "pick the family on the loader") from None
        if settings.prediction_type == "sample":
            import comfy_extras.nodes_model_advanced as advanced

            (model,) = advanced.ModelSamplingDiscrete().patch(model, "x0", False)
        return io.NodeOutput(model, settings, ui=settings_ui(settings, [settings.summary()]))


# diffusers' (and transformers') name for one file of a sharded save_pretrained:
# "diffusion_pytorch_model-00002-of-00003.safetensors", listed in "diffusion_pytorch_model.safetensors.index.json".
_SHARD_NAME = re.compile(r"^(?P<stem>.+)-(?P<index>\d{5})-of-(?P<count>\d{5})\.safetensors$")


def shard_set(path: Path) -> tuple[list[Path], dict] | None:
    """(every file of the sharded set `path` belongs to, the index json's weight_map or {}); None if it is no
    shard. The files are those the index beside it maps weights to, when it lists this file, else the
    siblings numbered 1…count with its stem."""
    match = _SHARD_NAME.match(path.name)
    if match is None:
        return None
    stem, count = match["stem"], int(match["count"])
    index = path.parent / f"{stem}.safetensors.index.json"
    names = [f"{stem}-{number:05d}-of-{count:05d}.safetensors" for number in range(1, count + 1)]
    weight_map = {}
    if index.is_file():
        try:
            weight_map = dict(json.loads(index.read_text())["weight_map"])
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError):
            raise FewStepInputError(f"{index.name} beside it has no readable weight_map; download it again") from None
        if path.name in set(weight_map.values()):
            names = sorted(set(weight_map.values()))
        else:  # an index of another set in the same folder
            weight_map = {}
    missing = [name for name in names if not (path.parent / name).is_file()]
    if missing:
        raise FewStepInputError(
            f"it is one shard of a transformer saved in {len(names)} files, and {len(missing)} of them "
            f"({', '.join(missing)}) are not in {path.parent}; copy every shard of the set (with {index.name}) into "
            "that folder, as the model's repository has them, and pick any one of them")
    return [path.parent / name for name in names], weight_map


def read_diffusion_model(path: Path) -> tuple[dict, dict]:
    """(state dict, metadata) of a diffusion model file; for one shard of a sharded diffusers save, of the
    whole set merged (as diffusers' from_pretrained reads it), with the first shard's metadata."""
    shards = shard_set(path)
    if shards is None:
        return read_safetensors(path)
    state_dict, metadata = {}, None
    for shard in shards[0]:
        tensors, shard_metadata = read_safetensors(shard)
        state_dict.update(tensors)
        metadata = shard_metadata if metadata is None else metadata
    absent = sorted(key for key in shards[1] if key not in state_dict)
    if absent:
        raise FewStepInputError(
            f"{len(absent)} weights its index json lists are in none of the shards (e.g. {', '.join(absent[:3])}): "
            "the shards and the index come from different downloads; download the whole set again")
    return state_dict, metadata


def z_image_diffusers_to_comfy(state_dict: dict) -> dict:
    """A Z-Image transformer in diffusers' layout (ZImageTransformer2DModel.save_pretrained) in ComfyUI's own,
    by ComfyUI's map (comfy.utils.z_image_to_diffusers, which its LoRA loader uses); other files as they are.
    ComfyUI's loader converts FLUX and SD3 diffusers files itself (convert_diffusers_mmdit), not Z-Image's:
    it would detect the model and leave its attention weights unloaded."""
    if "cap_embedder.1.weight" not in state_dict or not any(k.endswith(".attention.to_q.weight") for k in state_dict):
        return state_dict
    count = lambda prefix: len({k.split(".")[1] for k in state_dict if k.startswith(prefix)})  # noqa: E731
    key_map = comfy.utils.z_image_to_diffusers({"n_layers": count("layers."), "n_refiner_layers": count("noise_refiner."),
                                                "dim": state_dict["cap_embedder.1.weight"].shape[0]})
    unknown = sorted(k for k in state_dict if k not in key_map)
    if unknown:
        raise FewStepInputError(f"unet_name: a Z-Image transformer in diffusers' layout with {len(unknown)} keys "
                                f"ComfyUI has no place for (e.g. {', '.join(unknown[:3])}); use ComfyUI's release")
    out, fused = {}, {}
    for key, tensor in state_dict.items():
        target = key_map[key]
        if isinstance(target, str):
            out[target] = tensor
        else:  # q, k and v: row slices of ComfyUI's fused attention.qkv, in their offset order
            fused.setdefault(target[0], []).append((target[1][1], target[1][0], tensor))
    for name, parts in fused.items():
        parts.sort(key=lambda part: part[0])
        out[name] = torch.cat([tensor for _, _, tensor in parts], dim=parts[0][1])
    return out


LOADER_NODES = [FewStepLoraLoader, FewStepUNetLoader]
