"""Tiny random-weight flow-matching transformers in the real architectures ComfyUI detects.

Built with diffusers' own classes and saved with save_pretrained (safetensors, diffusers layout); the
same file is linked into a test's models/diffusion_models/ for ComfyUI's UNETLoader, which converts the
diffusers layout itself (comfy.model_detection.convert_diffusers_mmdit), and loaded back by diffusers
for the reference pipelines — one set of weights, read by both sides.

- FLUX: ComfyUI detects a Flux model only with FLUX's 24 heads of 128 (comfy/model_detection.py fixes
  num_heads 24 and axes_dim 16/56/56) and a double block, so the hidden size stays 3072; one double block
  and no single block (detection accepts none; each would add 141M parameters), small text (64) and
  pooled (32) widths: ~390M parameters, 1.6 GB in fp32. A call reads all of it, so on a 2-core CPU it is
  memory-bound at about half a second.
  FLUX.1-dev has a guidance embedding (ComfyUI: Flux), FLUX.1-schnell none (ComfyUI: FluxSchnell).
- SD3.5 Large-style MMDiT: 2 heads of 64 (ComfyUI reads depth = hidden / 64), two joint blocks with
  RMS q/k norm as in SD3.5 Large (ComfyUI: SD3), ~1M parameters.
- Qwen-Image: ComfyUI reads only in_channels and the block count from the file (model_detection: the
  `txt_norm.weight` key) and builds the rest from QwenImageTransformer2DModel's defaults: 24 heads of 128
  and Qwen2.5-VL's 3584-wide text states. So one block at full width: ~380M parameters. Published files
  (Qwen/Qwen-Image's transformer, Comfy-Org's repackaged qwen_image_*.safetensors) use diffusers' key
  names, which are ComfyUI's own for this model: UNETLoader reads the save_pretrained file as it is.
- Z-Image: ComfyUI takes a Lumina-2-style NextDiT (key `cap_embedder.1.weight`) as Z-Image only at
  dim 3840 (30 heads of 128, fixed), with two noise- and two context-refiner blocks (NextDiT's default,
  not read from the file); the caption width and the main block count are read. One main block (where
  caption and image tokens meet) and a 64-wide caption: ~900M parameters, 3.6 GB in fp32.
  ComfyUI 0.8's UNETLoader reads Z-Image only in its own layout — fused `attention.qkv`, `x_embedder`,
  `final_layer`, the layout of Tongyi-MAI's original checkpoint and of Comfy-Org's repackaged
  z_image_turbo_bf16.safetensors that ComfyUI users download — a diffusers-layout file would be detected
  as Z-Image but its attention and embedder weights left unloaded. So the same tensors are also written
  in that layout, through ComfyUI's own diffusers→ComfyUI map for Z-Image (comfy.utils.z_image_to_diffusers,
  which its LoRA loader uses); diffusers' single-file converter reads that file back to the same weights
  (tests/test_flow_parity_bases.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from tiny_models import _link, cached_build, perturb_

SEED = 20261203
FLOW_VERSION = "f3"  # bump whenever what is built changes (cached per version under tiny_models' cache)
TEXT_DIM = 64  # joint_attention_dim: the width of the (stand-in) text encoder's hidden states
POOLED_DIM = 32  # pooled_projection_dim: the width of the pooled (CLIP) embedding
TEXT_TOKENS = 8

FLUX_CONFIG = dict(
    patch_size=1, in_channels=64, num_layers=1, num_single_layers=0, attention_head_dim=128,
    num_attention_heads=24, joint_attention_dim=TEXT_DIM, pooled_projection_dim=POOLED_DIM,
    axes_dims_rope=(16, 56, 56),
)
SD3_CONFIG = dict(
    sample_size=32, patch_size=2, in_channels=16, num_layers=2, attention_head_dim=64, num_attention_heads=2,
    joint_attention_dim=TEXT_DIM, caption_projection_dim=128, pooled_projection_dim=POOLED_DIM, out_channels=16,
    pos_embed_max_size=32, qk_norm="rms_norm",
)
QWEN_IMAGE_TEXT_DIM = 3584  # Qwen2.5-VL-7B's hidden states: ComfyUI's QwenImage fixes joint_attention_dim
QWEN_IMAGE_CONFIG = dict(
    patch_size=2, in_channels=64, out_channels=16, num_layers=1, attention_head_dim=128, num_attention_heads=24,
    joint_attention_dim=QWEN_IMAGE_TEXT_DIM, axes_dims_rope=(16, 56, 56),
)
Z_IMAGE_CONFIG = dict(  # Tongyi-MAI/Z-Image-Turbo's transformer config, but for n_layers and cap_feat_dim
    all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=3840, n_layers=1, n_refiner_layers=2,
    n_heads=30, n_kv_heads=30, norm_eps=1e-5, qk_norm=True, cap_feat_dim=TEXT_DIM, rope_theta=256.0,
    t_scale=1000.0, axes_dims=[32, 48, 48], axes_lens=[1536, 512, 512],
)
# What each tiny base stands in for: (diffusers class, config, ComfyUI model config class it must load as).
BASES = {
    "flux_dev": ("FluxTransformer2DModel", {**FLUX_CONFIG, "guidance_embeds": True}, "Flux"),
    "flux_schnell": ("FluxTransformer2DModel", {**FLUX_CONFIG, "guidance_embeds": False}, "FluxSchnell"),
    "sd35_large": ("SD3Transformer2DModel", SD3_CONFIG, "SD3"),
    "qwen_image": ("QwenImageTransformer2DModel", QWEN_IMAGE_CONFIG, "QwenImage"),
    "z_image": ("ZImageTransformer2DModel", Z_IMAGE_CONFIG, "ZImage"),
}
# The width of the text states each base's transformer reads (the conditioning stand-ins' width).
TEXT_DIMS = {"qwen_image": QWEN_IMAGE_TEXT_DIM}
# Bases whose UNETLoader file is written in ComfyUI's layout (the file name under the cache folder);
# the others' is the save_pretrained file itself.
COMFY_LAYOUT_FILES = {"z_image": "comfyui/z_image_transformer.safetensors"}


@dataclass(frozen=True)
class TinyFlowModel:
    base: str  # a key of BASES
    unet_name: str  # under models/diffusion_models: the diffusers-layout transformer, for UNETLoader
    transformer_dir: Path  # the same weights as a diffusers model folder
    comfy_class: str  # the comfy.supported_models class ComfyUI must detect


def _build(base: str, folder: Path) -> None:
    import diffusers

    class_name, config, _ = BASES[base]
    torch.manual_seed(SEED)  # the libraries' own inits draw from the global generator
    transformer = getattr(diffusers, class_name)(**config)
    perturb_(transformer, torch.Generator().manual_seed(SEED + 1))
    transformer.eval().save_pretrained(str(folder / "transformer"), safe_serialization=True)
    if base == "z_image":
        from safetensors.torch import save_file

        target = folder / COMFY_LAYOUT_FILES[base]
        target.parent.mkdir()
        save_file(z_image_to_comfy_layout(transformer.state_dict(), config), str(target))


def z_image_to_comfy_layout(state_dict: dict, config: dict) -> dict:
    """A diffusers ZImageTransformer2DModel state dict in ComfyUI's (the original checkpoint's) layout.

    comfy.utils.z_image_to_diffusers maps each diffusers key to ComfyUI's, q/k/v as (fused key,
    (dim, offset, size)) slices of `attention.qkv`; every diffusers key must have a place."""
    import comfy.utils

    key_map = comfy.utils.z_image_to_diffusers(
        {"n_layers": config["n_layers"], "dim": config["dim"], "n_refiner_layers": config["n_refiner_layers"]})
    missing = sorted(set(state_dict) - set(key_map))
    if missing:
        raise RuntimeError(f"no ComfyUI key for {missing[:5]}")
    out, fused = {}, {}
    for key, tensor in state_dict.items():
        target = key_map[key]
        if isinstance(target, str):
            out[target] = tensor.contiguous()
        else:  # a slice of a fused tensor: collect the parts in their offset order
            name, (dim, offset, _size) = target[0], target[1]
            fused.setdefault(name, []).append((offset, dim, tensor))
    for name, parts in fused.items():
        parts.sort(key=lambda part: part[0])
        out[name] = torch.cat([tensor for _, _, tensor in parts], dim=parts[0][1]).contiguous()
    return out


def build_flow_model(base: str, models_dir: Path) -> TinyFlowModel:
    """The tiny `base` transformer (built once per cache version), linked into models_dir/diffusion_models."""
    folder = cached_build(f"flow_{FLOW_VERSION}_{base}", lambda partial: _build(base, partial))
    unet_name = f"tiny_{base}_transformer.safetensors"
    unet_file = folder / COMFY_LAYOUT_FILES.get(base, "transformer/diffusion_pytorch_model.safetensors")
    _link(unet_file, Path(models_dir) / "diffusion_models" / unet_name)
    return TinyFlowModel(base, unet_name, folder / "transformer", BASES[base][2])


def conditioning(seed: int = SEED + 2, base: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Fixed stand-ins for the text encoders' output: (prompt_embeds, pooled_prompt_embeds), as wide
    as `base`'s transformer reads (the FLUX/SD3 stand-in width when None).

    T5-XXL (4.7B parameters), CLIP-G, Qwen2.5-VL-7B and Qwen3-4B are far too big for CPU tests, and the
    sampling under test starts after them, so both sides get the same tensors directly. (Qwen-Image and
    Z-Image read no pooled embedding; it is returned all the same.)
    """
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(1, TEXT_TOKENS, TEXT_DIMS.get(base, TEXT_DIM), generator=generator),
            torch.randn(1, POOLED_DIM, generator=generator))
