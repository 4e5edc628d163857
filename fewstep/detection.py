"""Which few-step family a LoRA or UNet file is, and the settings its model card gives.

Few-step LoRAs have the same keys as any style LoRA, so the family is read from what names a file:
its safetensors metadata (kohya's ss_output_name, modelspec.title, or FewStep's own fewstep.family),
then its file name as published. A file none of them names is reported as not few-step, not guessed.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from .families import FAMILIES, Family, FewStepInputError, FewStepSettings, get_family


@dataclass(frozen=True)
class NameRule:
    pattern: str  # regex over the normalised name (lower case, '-' and ' ' as '_')
    family: str
    card: str

    def settings(self, match: re.Match, name: str, source: str, reason: str) -> FewStepSettings:
        steps = int(match.group("steps")) if "steps" in match.groupdict() and match.group("steps") else None
        family = self.family
        prediction_type = "epsilon"
        cfg = None
        if family == "hyper_sd" and steps == 1:
            family = "hyper_sd_1step"  # the 1-step LoRA samples with TCD, eta 1.0 (Hyper-SD card)
        if family == "lightning" and steps == 1 and "unet" in name:
            prediction_type = "sample"  # the 1-step UNet predicts x0 (SDXL-Lightning card)
        if "_cfg" in name:
            cfg = 5.0  # Hyper-SD CFG LoRAs: guidance 5–8 with a negative prompt
        definition = get_family(family)
        return FewStepSettings(
            family=family,
            steps=steps or definition.default_steps,
            cfg=cfg if cfg is not None else definition.default_cfg,
            eta=definition.default_eta,
            source=source,
            reason=f"{reason} ({self.card})",
            prediction_type=prediction_type,
        )


NAME_RULES = [
    # Flow-matching releases first: their names contain "turbo" and "lightning" too.
    NameRule(r"hyper_flux_?1?_dev_(?P<steps>\d+)steps?", "hyper_flux", "Hyper-SD card: LoRA scale 0.125, guidance 3.5"),
    NameRule(r"flux_?1?_turbo_alpha", "flux_turbo_alpha", "FLUX.1-Turbo-Alpha card: 8 steps, guidance 3.5"),
    NameRule(r"flux_?1?_schnell", "flux_schnell", "FLUX.1-schnell card: 4 steps"),
    # lightx2v: Qwen-Image-, Qwen-Image-2512-, Qwen-Image-Edit-, Qwen-Image-Edit-2509/2511-Lightning-<n>steps-V…
    NameRule(r"qwen_image(_edit)?(_\d+)?_lightning_(?P<steps>\d+)steps?", "qwen_image_lightning",
             "Qwen-Image-Lightning card: shift 3"),
    NameRule(r"(sd3_?5|stable_diffusion_3_5)_large_turbo", "sd35_large_turbo", "SD3.5 Large Turbo card: 4 steps"),
    NameRule(r"z_image_turbo", "z_image_turbo", "Z-Image-Turbo card: 9 steps"),
    NameRule(r"lcm_lora|lcm_sdxl|lcm_sd(v1_5|15)|latent_consistency", "lcm", "LCM-LoRA card: 4 steps, guidance 1"),
    NameRule(r"sdxl_lightning_(?P<steps>\d+)step", "lightning", "SDXL-Lightning card"),
    NameRule(r"hyper_sdxl_1step_unet", "hyper_sd_1step_unet", "Hyper-SD card: LCM at t=800"),
    NameRule(r"hyper_sd(xl|15)?_(?P<steps>\d+)steps?(_cfg)?_lora", "hyper_sd", "Hyper-SD card"),
    NameRule(r"tcd_sd(xl|15)", "tcd", "TCD card: eta 0.3"),
    NameRule(r"dmd2_sdxl_(?P<steps>\d+)step", "dmd2", "DMD2 card"),
    NameRule(r"sd(_xl)?_?xl?_turbo|sdxl_turbo|sd_turbo", "turbo", "SDXL-Turbo card: 1 step"),
]
METADATA_NAME_KEYS = ("ss_output_name", "modelspec.title", "name")


# Names the libraries give every file they write (diffusers' save_pretrained and save_lora_weights, PEFT's
# save_pretrained, sharded saves): such a file is named by the folder it was downloaded into, e.g.
# "FLUX.1-Turbo-Alpha/diffusion_pytorch_model.safetensors" (alimama-creative/FLUX.1-Turbo-Alpha).
GENERIC_FILE_NAMES = re.compile(
    r"(diffusion_pytorch_model|pytorch_lora_weights|adapter_model|model|lora)(_\d+_of_\d+)?")


def normalise(name: str) -> str:
    name = re.split(r"[/\\]", name)[-1].lower()
    name = re.sub(r"\.(safetensors|ckpt|pt|pth|bin)$", "", name)
    return re.sub(r"[-\s.]+", "_", name)


def _named_parts(name: str) -> list[str]:
    """The file's own name, then — for a generic library file name — its folders, nearest first."""
    parts = [part for part in re.split(r"[/\\]", name) if part]
    if not parts or not GENERIC_FILE_NAMES.fullmatch(normalise(parts[-1])):
        return parts[-1:]
    return [parts[-1], *reversed(parts[:-1])]


def settings_from_name(name: str, source: str, reason: str) -> FewStepSettings | None:
    for part in _named_parts(name):
        normalised = normalise(part)
        for rule in NAME_RULES:
            match = re.search(rule.pattern, normalised)
            if match:
                where = reason if part == _named_parts(name)[0] else f"{reason}: folder '{part}'"
                return rule.settings(match, normalised, source, where)
    return None


def detect_settings(file_name: str, metadata: dict | None = None) -> FewStepSettings:
    """The file's family and reference settings; family None for a file nothing marks as few-step."""
    metadata = metadata or {}
    if metadata.get("fewstep.family"):
        family = get_family(metadata["fewstep.family"])
        steps = int(metadata.get("fewstep.steps") or family.default_steps)
        return FewStepSettings(family.name, steps, family.default_cfg, family.default_eta, file_name,
                               "metadata fewstep.family")
    for key in METADATA_NAME_KEYS:
        value = metadata.get(key)
        if value:
            found = settings_from_name(str(value), file_name, f"metadata {key} '{value}'")
            if found:
                return found
    found = settings_from_name(file_name, file_name, "file name")
    if found:
        return found
    return FewStepSettings(None, source=file_name,
                           reason="neither its metadata nor its name marks it as a few-step model")


# The loaders' family choice that means "read it from the file".
DETECT = "detect"


def resolve_settings(family_override: str, file_name: str, metadata: dict) -> FewStepSettings:
    """A loader's settings: the family picked on it (at that family's reference), or what the file says."""
    if family_override and family_override != DETECT:
        family = get_family(family_override)
        return FewStepSettings(family.name, family.default_steps, family.default_cfg, family.default_eta,
                               file_name, "family chosen on the loader")
    return detect_settings(file_name, metadata)


def families_for_architecture(architecture: str) -> list[str]:
    """The flow-matching families whose base is this ComfyUI model config class (e.g. 'FluxSchnell')."""
    return [f.name for f in FAMILIES.values() if f.flow is not None and architecture in f.flow.architectures]


def check_family_fits_model(family: Family, architecture: str, flow_model: bool) -> None:
    """Raise FewStepInputError when `family` was distilled from another base than the model's.

    `architecture` is ComfyUI's model config class name (comfy.supported_models), `flow_model` whether
    the model samples flow-matching (model_sampling CONST) rather than SD's discrete DDPM schedule.
    """
    fitting = families_for_architecture(architecture)
    suggestion = (f"set family to {' or '.join(fitting)}" if fitting
                  else "FewStep has no flow-matching family for this base yet")
    if family.flow is None:
        if flow_model:
            raise FewStepInputError(
                f"family: {family.name} is an SD1.5/SDXL family, but the model is a flow-matching {architecture} "
                f"model; {suggestion}."
            )
        return
    if architecture not in family.flow.architectures:
        bases = ", ".join(family.flow.architectures)
        raise FewStepInputError(
            f"family: {family.name} ({family.display_name}) runs on {bases} models, but the model is "
            f"{architecture}; {suggestion}, or load the model the card names."
        )
