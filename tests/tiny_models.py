"""Tiny random-weight models in the real architectures ComfyUI detects, saved as real .safetensors.

No weights can be downloaded here, so the tests build their own: a narrow SD1.5-family UNet that
ComfyUI's detection classifies as SD15, with the real SD1.5 CLIP-L text encoder and SD VAE
architectures, once as ComfyUI files (UNet in ldm layout for UNETLoader, single-file checkpoint for
CheckpointLoaderSimple) and once as a diffusers folder with the same weights for the reference.
Files are cached per version tag so repeated runs only link them into a test's models folder.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

VERSION = "v1"
SEED = 20261122


@dataclass(frozen=True)
class TinyModel:
    base: str  # "sd15" or "sdxl"
    unet_name: str  # under models/diffusion_models (ComfyUI ldm layout)
    checkpoint_name: str  # under models/checkpoints: UNet + CLIP + VAE in one file
    diffusers_dir: Path  # the same weights as a diffusers pipeline folder
    latent_scale: float  # the VAE's scaling factor: ComfyUI latents × this = diffusers latents


def cache_dir() -> Path:
    root = os.environ.get("FEWSTEP_TEST_CACHE") or Path.home() / ".cache" / "comfyui-fewstep-tests"
    return Path(root) / VERSION


def comfyui_tokenizer_dir() -> Path:
    import comfy.sd1_clip

    return Path(comfy.sd1_clip.__file__).parent / "sd1_tokenizer"


def perturb_(module: torch.nn.Module, generator: torch.Generator, scale: float = 0.02) -> None:
    """Add noise to every weight, so zero-initialised layers (conv_out, proj_out) can't hide a mistake."""
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * scale)


# SD1.5's UNet narrowed to two levels: (320, 640) channels, one res block each, cross-attention on the
# first level and in the middle. ComfyUI matches SD15 on context_dim 768, model_channels 320 and
# non-linear transformer projections, so detection is the real one.
SD15_UNET_CONFIG = dict(
    sample_size=8,
    in_channels=4,
    out_channels=4,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(320, 640),
    layers_per_block=1,
    cross_attention_dim=768,
    attention_head_dim=8,
)
# The same UNet as ComfyUI's ldm config, for comfy.utils.unet_to_diffusers' key map.
SD15_LDM_CONFIG = dict(
    num_res_blocks=[1, 1],
    channel_mult=[1, 2],
    transformer_depth=[1, 0],
    transformer_depth_output=[1, 1, 0, 0],
    transformer_depth_middle=1,
)


def unet_to_ldm(unet_state_dict: dict, ldm_config: dict) -> dict:
    import comfy.utils

    diffusers_to_ldm = comfy.utils.unet_to_diffusers(ldm_config)
    converted = {diffusers_to_ldm[k]: v for k, v in unet_state_dict.items() if k in diffusers_to_ldm}
    missing = set(unet_state_dict) - set(diffusers_to_ldm)
    if missing:
        raise RuntimeError(f"no ldm key for {sorted(missing)[:5]}")
    return converted


def vae_to_ldm(vae_state_dict: dict) -> dict:
    import comfy.diffusers_convert

    return comfy.diffusers_convert.convert_vae_state_dict(vae_state_dict)


def _link(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists() or target.is_symlink():
        target.unlink()
    target.symlink_to(source)


def build_sd15(models_dir: Path) -> TinyModel:
    from diffusers import AutoencoderKL, LCMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from safetensors.torch import save_file
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    folder = cache_dir() / "sd15"
    unet_file, checkpoint_file = folder / "tiny_sd15_unet.safetensors", folder / "tiny_sd15.safetensors"
    diffusers_dir = folder / "diffusers"
    if not (unet_file.exists() and checkpoint_file.exists() and (diffusers_dir / "model_index.json").exists()):
        folder.mkdir(parents=True, exist_ok=True)
        generator = torch.Generator().manual_seed(SEED)
        torch.manual_seed(SEED)
        unet = UNet2DConditionModel(**SD15_UNET_CONFIG)
        perturb_(unet, generator)
        text_encoder = CLIPTextModel(CLIPTextConfig.from_json_file(
            str(Path(comfyui_tokenizer_dir()).parent / "sd1_clip_config.json")))
        perturb_(text_encoder, generator)
        vae = AutoencoderKL(
            block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
            norm_num_groups=32, sample_size=512, scaling_factor=0.18215,
        )
        perturb_(vae, generator)
        tokenizer = CLIPTokenizer.from_pretrained(str(comfyui_tokenizer_dir()), model_max_length=77)

        unet_ldm = unet_to_ldm(unet.state_dict(), SD15_LDM_CONFIG)
        save_file({k: v.contiguous() for k, v in unet_ldm.items()}, str(unet_file))
        checkpoint = {f"model.diffusion_model.{k}": v for k, v in unet_ldm.items()}
        checkpoint.update({f"cond_stage_model.transformer.{k}": v for k, v in text_encoder.state_dict().items()})
        checkpoint.update({f"first_stage_model.{k}": v for k, v in vae_to_ldm(vae.state_dict()).items()})
        save_file({k: v.contiguous() for k, v in checkpoint.items()}, str(checkpoint_file))

        scheduler = LCMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                 set_alpha_to_one=False, steps_offset=1, clip_sample=False)
        StableDiffusionPipeline(
            vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
            safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        ).save_pretrained(str(diffusers_dir), safe_serialization=True)

    _link(unet_file, models_dir / "diffusion_models" / unet_file.name)
    _link(checkpoint_file, models_dir / "checkpoints" / checkpoint_file.name)
    return TinyModel("sd15", unet_file.name, checkpoint_file.name, diffusers_dir, 0.18215)


def build_sdxl(models_dir: Path) -> TinyModel:
    import pytest

    pytest.skip("tiny SDXL-family model not built yet")
