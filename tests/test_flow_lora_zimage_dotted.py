"""Z-Image's dotted LoRA layout (Anime-Z) read as diffusers reads it, without ComfyUI: for each variant of
the layout, every module's ΔW after fewstep's canonicalize (up · down · alpha / rank, as ComfyUI applies it)
equals ΔW after diffusers' own converter for Z-Image (B · A, the alpha folded in), module for module.
The variants are where diffusers decides: the duplicated fused qkv and bare out dropped beside the split
modules, a bare out read as to_out.0 where that is absent, and which alpha wins when out's and to_out.0's
both exist.
"""
from __future__ import annotations

import zlib

import pytest
import torch

from comfyui_fewstep.fewstep.lora_layouts import canonicalize

RANK, DIM = 2, 12


def lora(module: str, rank: int = RANK, out_features: int = DIM, alpha: float | None = None,
         alpha_name: str | None = None) -> dict:
    generator = torch.Generator().manual_seed(zlib.crc32(module.encode()))
    tensors = {f"{module}.lora.down.weight": torch.randn(rank, DIM, generator=generator),
               f"{module}.lora.up.weight": torch.randn(out_features, rank, generator=generator)}
    if alpha is not None:
        tensors[f"{alpha_name or module}.alpha"] = torch.tensor(alpha)
    return tensors


def anime_z(block: str = "layers.0", to_out: bool = True, out_alpha: float | None = None) -> dict:
    """One attention as Anime-Z's file has it (diffusers issue #13203's key list), plus a feed-forward."""
    attention = f"{block}.attention"
    state = {}
    for projection, alpha in zip("qkv", (1.0, 3.0, 2.0)):
        state |= lora(f"{attention}.to.{projection}", alpha=alpha, alpha_name=f"{attention}.to_{projection}")
    state |= lora(f"{attention}.qkv", rank=3 * RANK, out_features=3 * DIM, alpha=5.0)
    state |= lora(f"{attention}.out", alpha=out_alpha)
    if to_out:
        state |= lora(f"{attention}.to_out.0", alpha=4.0)
    state |= lora(f"{block}.feed_forward.w2", alpha=0.5)
    return state


def diffusers_deltas(state_dict: dict) -> dict:
    from diffusers.loaders.lora_conversion_utils import _convert_non_diffusers_z_image_lora_to_diffusers

    converted = _convert_non_diffusers_z_image_lora_to_diffusers(dict(state_dict))
    return {key[: -len(".lora_A.weight")]: converted[key.replace("lora_A", "lora_B")] @ converted[key]
            for key in converted if key.endswith(".lora_A.weight")}


def fewstep_deltas(state_dict: dict) -> dict:
    canonical = canonicalize(dict(state_dict))
    assert canonical.layout == "z_image_dotted" and not canonical.unrecognized
    tensors, deltas = canonical.tensors, {}
    for module in canonical.modules:
        down, up = tensors[f"{module}.lora_down.weight"], tensors[f"{module}.lora_up.weight"]
        alpha = tensors.get(f"{module}.alpha")
        deltas[module] = up @ down * (1.0 if alpha is None else alpha.item() / down.shape[0])
    return deltas


VARIANTS = {
    "anime_z": anime_z(),
    "anime_z_refiner_under_diffusion_model": {f"diffusion_model.{k}": v for k, v in anime_z("noise_refiner.1").items()},
    # No to_out.0: the bare out is to_out.0, under its own alpha (renamed to to_out.0's).
    "bare_out_alone": anime_z(to_out=False, out_alpha=6.0),
    # Both alphas: diffusers renames out's onto to_out.0's, and the one later in the file wins.
    "out_alpha_first": anime_z(out_alpha=8.0),
    # The bare out's weights after to_out.0's in the file: still dropped, not read over to_out.0's.
    "out_after_to_out_0": dict(sorted(anime_z().items(), key=lambda item: ".attention.out." in item[0])),
    "out_alpha_last": {**{k: v for k, v in anime_z().items() if k != "layers.0.attention.to_out.0.alpha"},
                       "layers.0.attention.to_out.0.alpha": torch.tensor(4.0),
                       "layers.0.attention.out.alpha": torch.tensor(8.0)},
}


@pytest.mark.parametrize("variant", VARIANTS)
def test_dotted_layout_gives_diffusers_deltas(variant):
    state_dict = VARIANTS[variant]
    expected, ours = diffusers_deltas(state_dict), fewstep_deltas(state_dict)
    assert set(ours) == set(expected)
    assert not any(name.endswith((".qkv", ".out", ".to.q")) for name in ours)
    for module, delta in expected.items():
        torch.testing.assert_close(ours[module], delta, rtol=1e-6, atol=1e-6, msg=module)


def test_an_up_weight_missing_is_named():
    state_dict = anime_z()
    del state_dict["layers.0.attention.to.k.lora.up.weight"]
    with pytest.raises(ValueError, match=r"layers\.0\.attention\.to\.k\.lora\.down\.weight has no"):
        canonicalize(state_dict)
