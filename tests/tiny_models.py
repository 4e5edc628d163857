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

VERSION = "v2"
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


def clip_checkpoint_keys(text_encoder) -> dict:
    """The text encoder's weights under the HF key names checkpoints publish ("text_model.…"),
    which transformers ≥ 5 drops from state_dict()."""
    published = {}
    for key, value in text_encoder.state_dict().items():
        if key.startswith(("embeddings.", "encoder.", "final_layer_norm.")):
            key = f"text_model.{key}"
        published[key] = value
    return published


def _link(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists() or target.is_symlink():
        target.unlink()
    target.symlink_to(source)


def make_vae(scaling_factor: float, generator: torch.Generator):
    """The SD/SDXL VAE architecture (they share it; only the latent scale differs)."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL(
        block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        norm_num_groups=32, sample_size=512, scaling_factor=scaling_factor,
    )
    perturb_(vae, generator)
    return vae


def reference_scheduler():
    from diffusers import LCMScheduler

    return LCMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                        set_alpha_to_one=False, steps_offset=1, clip_sample=False)


def _save_comfy_files(unet_ldm: dict, clip_and_vae: dict, unet_file: Path, checkpoint_file: Path) -> None:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in unet_ldm.items()}, str(unet_file))
    checkpoint = {f"model.diffusion_model.{k}": v for k, v in unet_ldm.items()}
    checkpoint.update(clip_and_vae)
    save_file({k: v.contiguous() for k, v in checkpoint.items()}, str(checkpoint_file))


def _built(folder: Path, *files: Path) -> bool:
    return all(f.exists() for f in files) and (folder / "diffusers" / "model_index.json").exists()


def build_sd15(models_dir: Path) -> TinyModel:
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    folder = cache_dir() / "sd15"
    unet_file, checkpoint_file = folder / "tiny_sd15_unet.safetensors", folder / "tiny_sd15.safetensors"
    if not _built(folder, unet_file, checkpoint_file):
        folder.mkdir(parents=True, exist_ok=True)
        generator = torch.Generator().manual_seed(SEED)
        torch.manual_seed(SEED)
        unet = UNet2DConditionModel(**SD15_UNET_CONFIG)
        perturb_(unet, generator)
        text_encoder = CLIPTextModel(CLIPTextConfig.from_json_file(str(comfyui_tokenizer_dir().parent / "sd1_clip_config.json")))
        perturb_(text_encoder, generator)
        vae = make_vae(0.18215, generator)
        tokenizer = CLIPTokenizer.from_pretrained(str(comfyui_tokenizer_dir()), model_max_length=77)

        clip_and_vae = {f"cond_stage_model.transformer.{k}": v for k, v in clip_checkpoint_keys(text_encoder).items()}
        clip_and_vae.update({f"first_stage_model.{k}": v for k, v in vae_to_ldm(vae.state_dict()).items()})
        _save_comfy_files(unet_to_ldm(unet.state_dict(), SD15_LDM_CONFIG), clip_and_vae, unet_file, checkpoint_file)
        StableDiffusionPipeline(
            vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=reference_scheduler(),
            safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        ).save_pretrained(str(folder / "diffusers"), safe_serialization=True)

    _link(unet_file, models_dir / "diffusion_models" / unet_file.name)
    _link(checkpoint_file, models_dir / "checkpoints" / checkpoint_file.name)
    return TinyModel("sd15", unet_file.name, checkpoint_file.name, folder / "diffusers", 0.18215)


# An SDXL-family UNet: ComfyUI matches SDXL-family models on model_channels 320, linear transformer
# projections, context_dim 2048, adm_in_channels 2816 and transformer_depth, not on channel_mult or
# res blocks per level. KOALA-700M's transformer_depth [0, 2, 5] with one res block per level at 320
# channels throughout is detected as KOALA_700M (an SDXL subclass: SDXL's ADM, latent format and
# CLIP-L + CLIP-G) at ~1/20 of SDXL's size.
SDXL_UNET_CONFIG = dict(
    sample_size=8,
    in_channels=4,
    out_channels=4,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(320, 320, 320),
    layers_per_block=1,
    transformer_layers_per_block=(1, 2, 5),
    attention_head_dim=5,  # diffusers' name for the head count: 320 / 64, as SDXL's 64-wide heads
    cross_attention_dim=2048,
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
)
SDXL_LDM_CONFIG = dict(
    num_res_blocks=[1, 1, 1],
    channel_mult=[1, 1, 1],
    transformer_depth=[0, 2, 5],
    transformer_depth_output=[0, 0, 2, 2, 5, 5],
    transformer_depth_middle=5,
)


def build_sdxl(models_dir: Path) -> TinyModel:
    """The SDXL-family UNet above with the real CLIP-L and full-size CLIP-G text encoders and the VAE.

    CLIP-G must be full size (ComfyUI builds it from a fixed config); its weights are stored in fp16
    to halve the files, and both sides upcast the same fp16 values to fp32.
    """
    import comfy.supported_models
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    folder = cache_dir() / "sdxl"
    unet_file, checkpoint_file = folder / "tiny_sdxl_unet.safetensors", folder / "tiny_sdxl.safetensors"
    if not _built(folder, unet_file, checkpoint_file):
        folder.mkdir(parents=True, exist_ok=True)
        generator = torch.Generator().manual_seed(SEED + 1)
        torch.manual_seed(SEED + 1)
        unet = UNet2DConditionModel(**SDXL_UNET_CONFIG)
        perturb_(unet, generator)
        configs = comfyui_tokenizer_dir().parent
        text_encoder = CLIPTextModel(CLIPTextConfig.from_json_file(str(configs / "sd1_clip_config.json")))
        perturb_(text_encoder, generator)
        text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig.from_json_file(str(configs / "clip_config_bigg.json")))
        perturb_(text_encoder_2, generator)
        text_encoder.half().float()  # round to fp16 values, as stored
        text_encoder_2.half()
        vae = make_vae(0.13025, generator)
        tokenizer = CLIPTokenizer.from_pretrained(str(comfyui_tokenizer_dir()), model_max_length=77)
        tokenizer_2 = CLIPTokenizer.from_pretrained(str(comfyui_tokenizer_dir()), model_max_length=77, pad_token="!")

        clip = {f"clip_l.transformer.{k}": v.half() for k, v in clip_checkpoint_keys(text_encoder).items()}
        clip.update({f"clip_g.transformer.{k}": v for k, v in clip_checkpoint_keys(text_encoder_2).items()})
        clip_and_vae = comfy.supported_models.SDXL.process_clip_state_dict_for_saving(None, clip)
        clip_and_vae.update({f"first_stage_model.{k}": v for k, v in vae_to_ldm(vae.state_dict()).items()})
        _save_comfy_files(unet_to_ldm(unet.state_dict(), SDXL_LDM_CONFIG), clip_and_vae, unet_file, checkpoint_file)
        StableDiffusionXLPipeline(
            vae=vae, text_encoder=text_encoder.half(), text_encoder_2=text_encoder_2, tokenizer=tokenizer,
            tokenizer_2=tokenizer_2, unet=unet, scheduler=reference_scheduler(),
        ).save_pretrained(str(folder / "diffusers"), safe_serialization=True)

    _link(unet_file, models_dir / "diffusion_models" / unet_file.name)
    _link(checkpoint_file, models_dir / "checkpoints" / checkpoint_file.name)
    return TinyModel("sdxl", unet_file.name, checkpoint_file.name, folder / "diffusers", 0.13025)
