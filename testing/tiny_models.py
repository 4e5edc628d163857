"""Tiny random-weight models in the real architectures ComfyUI detects, saved as real .safetensors.

No weights can be downloaded here, so the tests build their own, each twice from the same tensors:
as ComfyUI files (the UNet alone in ldm layout for UNETLoader, a single-file checkpoint with UNet,
CLIP and VAE for CheckpointLoaderSimple) and as a diffusers pipeline folder, the reference.

- SD1.5 family: SD1.5's UNet narrowed to two levels (~80M parameters), the real SD1.5 CLIP-L text
  encoder and the SD VAE.
- SDXL family: an SDXL UNet with KOALA-700M's transformer depths at 320 channels (~69M parameters),
  which ComfyUI detects as KOALA_700M (an SDXL subclass: SDXL's ADM, latent format and CLIP), the
  real CLIP-L and full-size CLIP-G (ComfyUI builds both from fixed configs) stored in fp16, the VAE.

ComfyUI itself is only used for its key maps (comfy.utils.unet_to_diffusers, comfy.diffusers_convert)
and its tokenizer files, so the files are written independently of the loaders under test.
Built files are cached per VERSION ($FEWSTEP_TEST_CACHE or ~/.cache/comfyui-fewstep-tests) and
symlinked into a test's models folder; bump VERSION whenever what is built changes.
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

VERSION = "v3"
SEED = 20261122


@dataclass(frozen=True)
class TinyModel:
    base: str  # "sd15" or "sdxl"
    unet_name: str  # under models/diffusion_models (ComfyUI ldm layout), for UNETLoader
    checkpoint_name: str  # under models/checkpoints: UNet + CLIP + VAE in one file, for CheckpointLoaderSimple
    diffusers_dir: Path  # the same weights as a diffusers pipeline folder
    latent_scale: float  # the VAE's scaling factor: ComfyUI latents × this = diffusers latents


# SD1.5's UNet narrowed to two levels: (320, 640) channels, one res block each, cross-attention on the
# first level and in the middle. ComfyUI matches SD15 on context_dim 768, model_channels 320,
# convolutional transformer projections and no ADM, so its detection is the real one.
SD15_UNET_CONFIG = dict(
    sample_size=8,
    in_channels=4,
    out_channels=4,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(320, 640),
    layers_per_block=1,
    cross_attention_dim=768,
    attention_head_dim=8,  # diffusers' legacy name for the head count: SD1.5 has 8 heads
)
# The same UNet as ComfyUI's ldm config, for comfy.utils.unet_to_diffusers' key map.
SD15_LDM_CONFIG = dict(
    num_res_blocks=[1, 1],
    channel_mult=[1, 2],
    transformer_depth=[1, 0],
    transformer_depth_output=[1, 1, 0, 0],
    transformer_depth_middle=1,
)

# An SDXL-family UNet. ComfyUI matches SDXL-family models on model_channels 320, linear transformer
# projections, context_dim 2048, adm_in_channels 2816 and the input blocks' transformer_depth only, so
# KOALA-700M's depths [0, 2, 5] at 320 channels throughout, one res block per level, are detected as
# KOALA_700M. The middle block is a single res block and only the deepest up level has attention
# (depth 1): the smallest such UNet that still has cross-attention before an upsampler, the one ldm
# key position (output_blocks.N.2.conv) the SD1.5 model does not cover.
SDXL_UNET_CONFIG = dict(
    sample_size=8,
    in_channels=4,
    out_channels=4,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    mid_block_type="UNetMidBlock2D",  # one res block, no attention: ComfyUI's transformer_depth_middle -1
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
    block_out_channels=(320, 320, 320),
    layers_per_block=1,
    transformer_layers_per_block=(1, 2, 5),
    reverse_transformer_layers_per_block=((1, 1), (0, 0), (0, 0)),
    attention_head_dim=5,  # diffusers' legacy name for the head count: 320 / 64, SDXL's 64-wide heads
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
    transformer_depth_output=[0, 0, 0, 0, 1, 1],
    transformer_depth_middle=-1,
)

# openai/clip-vit-large-patch14's text tower (SD1.5's and SDXL's first text encoder).
CLIP_L_CONFIG = dict(
    vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
    max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768,
    bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
)
# OpenCLIP ViT-bigG/14's text tower (SDXL's second text encoder), with its 1280×1280 text projection.
CLIP_G_CONFIG = dict(
    vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
    max_position_embeddings=77, hidden_act="gelu", projection_dim=1280,
    bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
)
# The SD / SDXL VAE (the same architecture; ComfyUI builds it from this fixed config, so no smaller one
# loads). Only the latent scale differs.
VAE_CONFIG = dict(
    in_channels=3, out_channels=3, latent_channels=4,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32, sample_size=512,
)
SD15_LATENT_SCALE = 0.18215
SDXL_LATENT_SCALE = 0.13025


def cache_dir() -> Path:
    root = os.environ.get("FEWSTEP_TEST_CACHE") or Path.home() / ".cache" / "comfyui-fewstep-tests"
    return Path(root) / VERSION


def comfyui_tokenizer_dir() -> Path:
    """ComfyUI's own CLIP tokenizer files, so both sides tokenize identically."""
    (comfy_root,) = importlib.util.find_spec("comfy").submodule_search_locations
    return Path(comfy_root) / "sd1_tokenizer"


def perturb_(module: torch.nn.Module, generator: torch.Generator) -> None:
    """Make every weight differ from the library's init, so a key-map mistake can't hide.

    Random tensors get noise of 10% of their own spread (scale kept, activations stay sane); constant
    ones — biases, norm weights, zero-initialised output layers — get noise of std 0.02, so no two
    tensors of one shape are equal.
    """
    with torch.no_grad():
        for parameter in module.parameters():
            noise = torch.randn(parameter.shape, generator=generator)
            spread = parameter.float().std().item() if parameter.numel() > 1 else 0.0
            scale = 0.1 * spread if spread > 1e-6 else 0.02
            parameter.add_((noise * scale).to(parameter.dtype))


def unet_to_ldm(unet_state_dict: dict, ldm_config: dict) -> dict:
    import comfy.utils

    diffusers_to_ldm = comfy.utils.unet_to_diffusers(ldm_config)
    missing = set(unet_state_dict) - set(diffusers_to_ldm)
    if missing:
        raise RuntimeError(f"no ldm key for {sorted(missing)[:5]}")
    return {diffusers_to_ldm[k]: v for k, v in unet_state_dict.items()}


def vae_to_ldm(vae_state_dict: dict) -> dict:
    import comfy.diffusers_convert

    return comfy.diffusers_convert.convert_vae_state_dict(vae_state_dict)


def clip_hf_keys(text_encoder) -> dict:
    """The text encoder's weights under the HF key names checkpoints publish ("text_model.…"), which
    transformers ≥ 5 drops from CLIPTextModel.state_dict()."""
    published = {}
    for key, value in text_encoder.state_dict().items():
        if key.startswith(("embeddings.", "encoder.", "final_layer_norm.")):
            key = f"text_model.{key}"
        published[key] = value
    return published


def clip_g_to_open_clip(text_encoder_2) -> dict:
    """CLIP-G in the open_clip layout SDXL checkpoints use (fused in_proj, resblocks, transposed
    text_projection), through comfy.diffusers_convert's HF → open_clip map."""
    import comfy.diffusers_convert

    hf = {f"clip_g.transformer.{k}": v for k, v in clip_hf_keys(text_encoder_2).items()}
    open_clip = comfy.diffusers_convert.convert_text_enc_state_dict_v20(hf, "clip_g.")
    return {k[len("clip_g."):]: v for k, v in open_clip.items()}


def make_text_encoder(config: dict, generator: torch.Generator, dtype: torch.dtype, with_projection: bool = False):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    model_class = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    encoder = model_class(CLIPTextConfig(**config)).to(dtype)
    perturb_(encoder, generator)
    return encoder.eval()


def make_vae(scaling_factor: float, generator: torch.Generator):
    from diffusers import AutoencoderKL

    vae = AutoencoderKL(**VAE_CONFIG, scaling_factor=scaling_factor)
    perturb_(vae, generator)
    return vae.eval()


def make_unet(config: dict, generator: torch.Generator):
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel(**config)
    perturb_(unet, generator)
    return unet.eval()


def make_tokenizer(pad_token: str | None = None):
    from transformers import CLIPTokenizer

    extra = {"pad_token": pad_token} if pad_token else {}
    return CLIPTokenizer.from_pretrained(str(comfyui_tokenizer_dir()), model_max_length=77, **extra)


def reference_scheduler():
    """SD1.5's / SDXL's DDPM training schedule; tests set up the scheduler each family needs."""
    from diffusers import EulerDiscreteScheduler

    return EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                  num_train_timesteps=1000, steps_offset=1, timestep_spacing="leading")


def _save(tensors: dict, path: Path) -> None:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))


def _save_comfy_files(folder: Path, base: str, unet_ldm: dict, clip_and_vae: dict) -> None:
    _save(unet_ldm, folder / f"tiny_{base}_unet.safetensors")
    checkpoint = {f"model.diffusion_model.{k}": v for k, v in unet_ldm.items()}
    checkpoint.update(clip_and_vae)
    _save(checkpoint, folder / f"tiny_{base}.safetensors")


def _build_sd15_files(folder: Path) -> None:
    from diffusers import StableDiffusionPipeline

    generator = torch.Generator().manual_seed(SEED)
    torch.manual_seed(SEED)  # the libraries' own inits draw from the global generator
    unet = make_unet(SD15_UNET_CONFIG, generator)
    text_encoder = make_text_encoder(CLIP_L_CONFIG, generator, torch.float32)
    vae = make_vae(SD15_LATENT_SCALE, generator)

    clip_and_vae = {f"cond_stage_model.transformer.{k}": v for k, v in clip_hf_keys(text_encoder).items()}
    clip_and_vae.update({f"first_stage_model.{k}": v for k, v in vae_to_ldm(vae.state_dict()).items()})
    _save_comfy_files(folder, "sd15", unet_to_ldm(unet.state_dict(), SD15_LDM_CONFIG), clip_and_vae)
    StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=make_tokenizer(), unet=unet,
        scheduler=reference_scheduler(), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    ).save_pretrained(str(folder / "diffusers"), safe_serialization=True)


def _build_sdxl_files(folder: Path) -> None:
    """Text encoders in fp16 (CLIP-G is 695M parameters); both sides upcast the same fp16 values."""
    from diffusers import StableDiffusionXLPipeline

    generator = torch.Generator().manual_seed(SEED + 1)
    torch.manual_seed(SEED + 1)
    unet = make_unet(SDXL_UNET_CONFIG, generator)
    text_encoder = make_text_encoder(CLIP_L_CONFIG, generator, torch.float16)
    text_encoder_2 = make_text_encoder(CLIP_G_CONFIG, generator, torch.float16, with_projection=True)
    vae = make_vae(SDXL_LATENT_SCALE, generator)

    clip_and_vae = {f"conditioner.embedders.0.transformer.{k}": v for k, v in clip_hf_keys(text_encoder).items()}
    clip_and_vae.update({f"conditioner.embedders.1.model.{k}": v for k, v in clip_g_to_open_clip(text_encoder_2).items()})
    clip_and_vae.update({f"first_stage_model.{k}": v for k, v in vae_to_ldm(vae.state_dict()).items()})
    _save_comfy_files(folder, "sdxl", unet_to_ldm(unet.state_dict(), SDXL_LDM_CONFIG), clip_and_vae)
    StableDiffusionXLPipeline(
        vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=make_tokenizer(),
        tokenizer_2=make_tokenizer(pad_token="!"),  # SDXL's second tokenizer pads with "!" (id 0)
        unet=unet, scheduler=reference_scheduler(),
    ).save_pretrained(str(folder / "diffusers"), safe_serialization=True)


@contextlib.contextmanager
def _locked(path: Path):
    """One builder per cache entry across processes (parallel test runs share the cache)."""
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def cached_build(base: str, build) -> Path:
    """The cache folder for `base`, built (into a temporary folder, then renamed) if absent."""
    folder = cache_dir() / base
    if folder.is_dir():
        return folder
    with _locked(cache_dir() / f".{base}.lock"):
        if not folder.is_dir():
            partial = cache_dir() / f".{base}.partial-{os.getpid()}"
            shutil.rmtree(partial, ignore_errors=True)
            partial.mkdir(parents=True)
            with torch.inference_mode(False), torch.no_grad():
                build(partial)
            partial.rename(folder)
    return folder


def _link(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.is_symlink() or target.exists():
        target.unlink()
    target.symlink_to(source)


def _install(base: str, build, models_dir: Path, latent_scale: float) -> TinyModel:
    folder = cached_build(base, build)
    unet_file, checkpoint_file = folder / f"tiny_{base}_unet.safetensors", folder / f"tiny_{base}.safetensors"
    _link(unet_file, Path(models_dir) / "diffusion_models" / unet_file.name)
    _link(checkpoint_file, Path(models_dir) / "checkpoints" / checkpoint_file.name)
    return TinyModel(base, unet_file.name, checkpoint_file.name, folder / "diffusers", latent_scale)


def build_sd15(models_dir: Path) -> TinyModel:
    """The tiny SD1.5-family model, linked into models_dir (diffusion_models/, checkpoints/)."""
    return _install("sd15", _build_sd15_files, models_dir, SD15_LATENT_SCALE)


def build_sdxl(models_dir: Path) -> TinyModel:
    """The tiny SDXL-family model, linked into models_dir (diffusion_models/, checkpoints/)."""
    return _install("sdxl", _build_sdxl_files, models_dir, SDXL_LATENT_SCALE)


def controlnet_to_ldm(controlnet_state_dict: dict, ldm_config: dict) -> dict:
    """A diffusers ControlNetModel's weights in the ldm ControlNet layout (zero_convs, input_hint_block,
    middle_block_out), the one ComfyUI reads for any size: its diffusers-layout path matches only the
    full-size configs."""
    import comfy.utils

    names = comfy.utils.unet_to_diffusers(ldm_config)
    names["controlnet_mid_block.weight"], names["controlnet_mid_block.bias"] = (
        "middle_block_out.0.weight", "middle_block_out.0.bias")
    hint_blocks = 1 + len({k.split(".")[2] for k in controlnet_state_dict
                           if k.startswith("controlnet_cond_embedding.blocks.")})
    for suffix in (".weight", ".bias"):
        names[f"controlnet_cond_embedding.conv_in{suffix}"] = f"input_hint_block.0{suffix}"
        for index in range(hint_blocks - 1):
            names[f"controlnet_cond_embedding.blocks.{index}{suffix}"] = f"input_hint_block.{2 * (index + 1)}{suffix}"
        names[f"controlnet_cond_embedding.conv_out{suffix}"] = f"input_hint_block.{2 * hint_blocks}{suffix}"
        for index in range(len([k for k in controlnet_state_dict if k.startswith("controlnet_down_blocks.")]) // 2):
            names[f"controlnet_down_blocks.{index}{suffix}"] = f"zero_convs.{index}.0{suffix}"
    missing = set(controlnet_state_dict) - set(names)
    if missing:
        raise RuntimeError(f"no ldm key for {sorted(missing)[:5]}")
    return {names[k]: v for k, v in controlnet_state_dict.items()}


def build_controlnet(tiny: TinyModel, path: Path) -> None:
    """A ControlNet for the tiny model (diffusers' ControlNetModel.from_unet, weights perturbed so its
    zero-initialised outputs act), saved in the ldm ControlNet layout at `path`."""
    from diffusers import ControlNetModel, UNet2DConditionModel

    with torch.inference_mode(False), torch.no_grad():
        unet = UNet2DConditionModel.from_pretrained(str(tiny.diffusers_dir / "unet"))
        controlnet = ControlNetModel.from_unet(unet)
        perturb_(controlnet, torch.Generator().manual_seed(SEED + 2))
        ldm_config = SDXL_LDM_CONFIG if tiny.base == "sdxl" else SD15_LDM_CONFIG
        partial = path.with_name(f".{path.name}.partial-{os.getpid()}")
        _save(controlnet_to_ldm(controlnet.state_dict(), ldm_config), partial)
        partial.rename(path)


if __name__ == "__main__":
    # Prebuild the cache (e.g. in a CI step): python tests/tiny_models.py MODELS_DIR
    import sys
    import time

    from comfy_harness import comfyui_on_path

    comfyui_on_path()
    target = Path(sys.argv[1] if len(sys.argv) > 1 else cache_dir() / "models")
    for builder in (build_sd15, build_sdxl):
        start = time.perf_counter()
        tiny = builder(target)
        sizes = {p.name: p.stat().st_size for p in tiny.diffusers_dir.parent.iterdir() if p.is_file()}
        diffusers_size = sum(p.stat().st_size for p in tiny.diffusers_dir.rglob("*") if p.is_file())
        print(f"{tiny.base}: {time.perf_counter() - start:.1f}s, "
              + ", ".join(f"{name} {size / 2**20:.0f} MiB" for name, size in sizes.items())
              + f", diffusers/ {diffusers_size / 2**20:.0f} MiB")
