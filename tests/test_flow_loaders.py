"""FewStepUNetLoader on the distilled full flow models (FLUX.1-schnell, SD3.5 Large Turbo, Z-Image-Turbo).

For each, the tiny transformer is written in diffusers' layout (save_pretrained) and in ComfyUI's own
(BFL's for FLUX, SAI's MMDiT under "model.diffusion_model." for SD3.5, Tongyi-MAI's original for
Z-Image — what ComfyUI users download), under the published names: both files must load through the node
to the same model, bit for bit, as the model ComfyUI's own UNETLoader makes of its layout, with the family
read from the name. A family for another base is refused, naming the one that fits.
"""
from __future__ import annotations

import os

import pytest
from safetensors.torch import save_file

from model_fingerprint import fingerprint, release
from tiny_flow_models import build_flow_model

# (tiny base, ComfyUI-layout name, diffusers-layout name as downloaded, family the names give)
MODELS = [
    ("flux_schnell", "flux1-schnell.safetensors", "FLUX.1-schnell/transformer/diffusion_pytorch_model.safetensors",
     "flux_schnell"),
    ("sd35_large", "sd3.5_large_turbo.safetensors",
     "stable-diffusion-3.5-large-turbo/transformer/diffusion_pytorch_model.safetensors", "sd35_large_turbo"),
    ("z_image", "z_image_turbo_bf16.safetensors", "Z-Image-Turbo/transformer/diffusion_pytorch_model.safetensors",
     "z_image_turbo"),
]


def place(comfy, source, name: str) -> str:
    target = comfy.models_dir / "diffusion_models" / name
    target.parent.mkdir(parents=True, exist_ok=True)
    target.unlink(missing_ok=True)
    target.symlink_to(os.path.realpath(source))
    return name


@pytest.mark.parametrize("base,comfy_name,diffusers_name,family", MODELS, ids=[m[0] for m in MODELS])
def test_both_layouts_load_to_the_same_model(comfy, base, comfy_name, diffusers_name, family):
    loader = comfy.nodes.NODE_CLASS_MAPPINGS["FewStepUNetLoader"]
    tiny = build_flow_model(base, comfy.models_dir)
    folder = comfy.models_dir / "diffusion_models"
    # ComfyUI's own UNETLoader on what it reads natively: the reference model.
    (reference,) = comfy.nodes.UNETLoader().load_unet(tiny.unet_name, "default")
    expected = fingerprint(reference)
    if base == "z_image":  # the tiny base's UNETLoader file is already ComfyUI's layout
        place(comfy, folder / tiny.unet_name, comfy_name)
    else:  # ComfyUI's own conversion of the diffusers file, saved as the published files are
        prefix = "model.diffusion_model." if base == "sd35_large" else ""
        save_file({prefix + k: v.contiguous() for k, v in reference.model.diffusion_model.state_dict().items()},
                  str(folder / comfy_name))
    release(reference)
    place(comfy, tiny.transformer_dir / "diffusion_pytorch_model.safetensors", diffusers_name)

    for name in (comfy_name, diffusers_name):
        model, settings = loader.execute(unet_name=name, family="detect").args
        assert type(model.model.model_config).__name__ == tiny.comfy_class, name
        assert fingerprint(model) == expected, f"{name} loads to another model than ComfyUI's UNETLoader"
        assert (settings.family, settings.steps) == (family, loader_steps(family)), name
        release(model)


def loader_steps(family: str) -> int:
    from comfyui_fewstep.fewstep.families import get_family

    return get_family(family).default_steps


def test_a_family_for_another_base_is_refused_naming_the_fitting_one(comfy):
    loader = comfy.nodes.NODE_CLASS_MAPPINGS["FewStepUNetLoader"]
    tiny = build_flow_model("sd35_large", comfy.models_dir)
    # ComfyUI imported the pack under its own package name: the error class is matched by name.
    with pytest.raises(ValueError) as failure:
        loader.execute(unet_name=tiny.unet_name, family="flux_schnell")
    assert type(failure.value).__name__ == "FewStepInputError"
    assert "runs on FluxSchnell models, but the model is SD3" in str(failure.value)
    assert "set family to sd35_large_turbo" in str(failure.value)
    with pytest.raises(ValueError) as failure:
        loader.execute(unet_name=tiny.unet_name, family="lcm")
    assert "set family to sd35_large_turbo" in str(failure.value)
    # A file whose name says another base is refused too, naming the file.
    renamed = place(comfy, comfy.models_dir / "diffusion_models" / tiny.unet_name, "flux1-schnell-merged.safetensors")
    with pytest.raises(ValueError) as failure:
        loader.execute(unet_name=renamed, family="detect")
    message = str(failure.value)
    assert "flux1-schnell-merged.safetensors is named as a flux_schnell file" in message
    assert "set family to sd35_large_turbo" in message
    release()
