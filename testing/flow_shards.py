"""Tiny flow transformers saved in shards, as the big diffusers repositories ship theirs
(FLUX.1-schnell's, SD3.5 Large Turbo's and Z-Image-Turbo's transformer/: diffusion_pytorch_model-0000N-of-0000M
.safetensors plus diffusion_pytorch_model.safetensors.index.json), written by diffusers' own
save_pretrained(max_shard_size=…) from the tiny model's single-file save — the same weights."""
from __future__ import annotations

from pathlib import Path

import torch

from tiny_flow_models import BASES, FLOW_VERSION
from tiny_models import cached_build

# Below each tiny transformer's size (FLUX ~1.6 GB, Z-Image ~3.6 GB in fp32), so each is split in several files.
MAX_SHARD_SIZE = {"flux_schnell": "700MB", "flux_dev": "700MB", "z_image": "1500MB"}
INDEX_NAME = "diffusion_pytorch_model.safetensors.index.json"


def sharded_transformer(base: str, transformer_dir: Path) -> Path:
    """A folder holding the tiny `base` transformer (read from its save_pretrained folder) re-saved in shards."""
    def build(partial: Path) -> None:
        import diffusers

        transformer = getattr(diffusers, BASES[base][0]).from_pretrained(str(transformer_dir), torch_dtype=torch.float32)
        transformer.save_pretrained(str(partial), safe_serialization=True, max_shard_size=MAX_SHARD_SIZE[base])
        del transformer

    folder = cached_build(f"flow_{FLOW_VERSION}_{base}_sharded", build)
    if len(shard_files(folder)) < 2 or not (folder / INDEX_NAME).is_file():
        raise RuntimeError(f"{folder}: save_pretrained wrote no sharded set")
    return folder


def shard_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("diffusion_pytorch_model-*-of-*.safetensors"))
