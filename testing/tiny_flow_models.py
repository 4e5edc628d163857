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
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from tiny_models import _link, cached_build, perturb_

SEED = 20261203
FLOW_VERSION = "f2"  # bump whenever what is built changes (cached per version under tiny_models' cache)
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
# What each tiny base stands in for: (diffusers class, config, ComfyUI model config class it must load as).
BASES = {
    "flux_dev": ("FluxTransformer2DModel", {**FLUX_CONFIG, "guidance_embeds": True}, "Flux"),
    "flux_schnell": ("FluxTransformer2DModel", {**FLUX_CONFIG, "guidance_embeds": False}, "FluxSchnell"),
    "sd35_large": ("SD3Transformer2DModel", SD3_CONFIG, "SD3"),
}


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


def build_flow_model(base: str, models_dir: Path) -> TinyFlowModel:
    """The tiny `base` transformer (built once per cache version), linked into models_dir/diffusion_models."""
    folder = cached_build(f"flow_{FLOW_VERSION}_{base}", lambda partial: _build(base, partial))
    unet_name = f"tiny_{base}_transformer.safetensors"
    _link(folder / "transformer" / "diffusion_pytorch_model.safetensors",
          Path(models_dir) / "diffusion_models" / unet_name)
    return TinyFlowModel(base, unet_name, folder / "transformer", BASES[base][2])


def conditioning(seed: int = SEED + 2) -> tuple[torch.Tensor, torch.Tensor]:
    """Fixed stand-ins for the text encoders' output: (prompt_embeds, pooled_prompt_embeds).

    T5-XXL (4.7B parameters) and CLIP-G are far too big for CPU tests, and the sampling under test starts
    after them, so both sides get the same tensors directly.
    """
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(1, TEXT_TOKENS, TEXT_DIM, generator=generator),
            torch.randn(1, POOLED_DIM, generator=generator))
