"""LoRAs for the tiny models, made with the field's tooling (peft, diffusers) in the published layouts.

One set of random LoRA weights (peft on the diffusers UNet and text encoder) is written out in each
layout, so every layout must patch to the same weights diffusers' own loader gives.
"""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

ATTENTION_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
ALL_TARGETS = ATTENTION_TARGETS + ["proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1", "conv2",
                                   "time_emb_proj"]
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]


def peft_lora(tiny, rank: int, seed: int, targets=ALL_TARGETS, text_encoder: bool = True) -> dict:
    """diffusers' PEFT save format: "unet.….lora_A.weight", "text_encoder.….lora_A.weight" (scale 1)."""
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict
    from transformers import CLIPTextModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel.from_pretrained(str(tiny.diffusers_dir / "unet"))
    config = LoraConfig(r=rank, lora_alpha=rank, target_modules=targets, init_lora_weights=False)
    unet.add_adapter(config)
    lora = {f"unet.{k}": v * 0.1 for k, v in get_peft_model_state_dict(unet).items()}
    if text_encoder:
        encoder = CLIPTextModel.from_pretrained(str(tiny.diffusers_dir / "text_encoder"))
        encoder.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=TEXT_TARGETS, init_lora_weights=False))
        for key, value in get_peft_model_state_dict(encoder).items():
            key = key if key.startswith("text_model.") else f"text_model.{key}"
            lora[f"text_encoder.{key}"] = value * 0.1
    return {k: v.contiguous() for k, v in lora.items()}


def to_kohya(lora: dict, alpha: float | None) -> dict:
    from diffusers.utils import convert_state_dict_to_kohya

    kohya = convert_state_dict_to_kohya(dict(lora))
    if alpha is not None:
        for key in [k for k in kohya if k.endswith(".alpha")]:
            kohya[key] = torch.tensor(float(alpha))
    return kohya


def to_base_model_prefix(lora: dict) -> dict:
    """PEFT's own save of a wrapped model: "base_model.model.<module>.lora_A.weight"."""
    out = {}
    for key, value in lora.items():
        component, rest = key.split(".", 1)
        out[f"base_model.model.{rest}"] = value
    return out


def to_diffusers_legacy(lora: dict) -> dict:
    """The attention-processor layout of diffusers < 0.21: "….processor.to_q_lora.down.weight"."""
    out = {}
    for key, value in lora.items():
        role = "down" if ".lora_A." in key else "up"
        module = key.rsplit(".lora_", 1)[0]
        if module.startswith("unet."):
            head, projection = module.rsplit(".", 1) if not module.endswith("to_out.0") else (module[:-9], "to_out")
            out[f"{head}.processor.{projection}_lora.{role}.weight"] = value
        else:
            out[f"{module}.lora_linear_layer.{role}.weight"] = value
    return out


def to_comfyui(lora: dict, ldm_config: dict) -> dict:
    """ComfyUI's own layout: "diffusion_model.<ldm key>.lora_down.weight", "text_encoders.clip_l.…"."""
    import comfy.utils

    diffusers_to_ldm = comfy.utils.unet_to_diffusers(ldm_config)
    out = {}
    for key, value in lora.items():
        role = "lora_down" if ".lora_A." in key else "lora_up"
        module = key.rsplit(".lora_", 1)[0]
        if module.startswith("unet."):
            ldm = diffusers_to_ldm[module[len("unet."):] + ".weight"][: -len(".weight")]
            out[f"diffusion_model.{ldm}.{role}.weight"] = value
        else:
            out[f"text_encoders.clip_l.transformer.{module[len('text_encoder.'):]}.{role}.weight"] = value
    return out


def save(lora: dict, folder: Path, name: str, metadata: dict | None = None) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in lora.items()}, str(folder / name), metadata=metadata)
    return name


def save_with_diffusers(tiny, folder: Path, name: str, rank: int, unet_alpha: float, text_alpha: float, seed: int,
                        unet_alpha_pattern: dict | None = None) -> str:
    """A LoRA saved by diffusers' own save_lora_weights with adapters whose lora_alpha is not their rank:
    diffusers keeps each adapter's LoraConfig in the file's header (lora_adapter_metadata)."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict
    from transformers import CLIPTextModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel.from_pretrained(str(tiny.diffusers_dir / "unet"))
    unet_config = LoraConfig(r=rank, lora_alpha=unet_alpha, target_modules=ALL_TARGETS, init_lora_weights=False,
                             alpha_pattern=unet_alpha_pattern or {})
    unet.add_adapter(unet_config)
    encoder = CLIPTextModel.from_pretrained(str(tiny.diffusers_dir / "text_encoder"))
    text_config = LoraConfig(r=rank, lora_alpha=text_alpha, target_modules=TEXT_TARGETS, init_lora_weights=False)
    encoder.add_adapter(text_config)
    pipeline_class = StableDiffusionXLPipeline if tiny.base == "sdxl" else StableDiffusionPipeline
    pipeline_class.save_lora_weights(
        str(folder), weight_name=name, safe_serialization=True,
        unet_lora_layers={k: v * 0.1 for k, v in get_peft_model_state_dict(unet).items()},
        text_encoder_lora_layers={k: v * 0.1 for k, v in get_peft_model_state_dict(encoder).items()},
        unet_lora_adapter_metadata=unet_config.to_dict(), text_encoder_lora_adapter_metadata=text_config.to_dict())
    return name
