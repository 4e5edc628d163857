"""FewStepLoraLoader on Z-Image(-Turbo) LoRAs in the layouts they are published in.

One set of random LoRA weights (peft on diffusers' ZImageTransformer2DModel, lora_alpha ≠ r) is written
by ZImagePipeline.save_lora_weights ("transformer.layers.0.attention.to_q.lora_A.weight"), with diffusers'
module names under "diffusion_model." and ".alpha" keys (ai-toolkit's and ComfyUI users' files),
musubi-tuner's flattened "lora_unet_layers_0_attention_to_q" with ".alpha", and on ComfyUI's own modules
(fused attention.qkv, by ComfyUI's map comfy.utils.z_image_to_diffusers) as its LoraSave writes them,
and Anime-Z's dotted layout (diffusers' module names with ".lora.down.weight", the same attention deltas
again on ComfyUI's fused qkv and out).
ComfyUI loads the tiny Z-Image (its layout, detected as ZImage); each file must patch it to what
diffusers' load_lora_weights + fuse_lora gives — diffusers reading that same file where it reads the
layout (all but ComfyUI's fused one), else the diffusers file — within 1e-5 relative.
"""
from __future__ import annotations

import gc
import re

import pytest
import torch

import flow_lora_factory
from flow_lora_checks import RELATIVE_TOLERANCE, comfy_patched, compare, diffusers_fused_weights
from tiny_flow_models import build_flow_model

RANK, LORA_ALPHA = 4, 2.0  # scale 0.5
LAYOUTS = ["diffusers", "diffusion_model_alpha", "musubi", "comfyui", "z_image_dotted"]
REPORTED = {"diffusers": "peft", "diffusion_model_alpha": "comfyui", "musubi": "kohya", "comfyui": "comfyui",
            "z_image_dotted": "z_image_dotted"}
READ_BY_DIFFUSERS = {"diffusers", "diffusion_model_alpha", "musubi", "z_image_dotted"}
Z_IMAGE_PIPELINE_PARTS = ("scheduler", "vae", "text_encoder", "tokenizer")


@pytest.fixture(scope="module")
def zimage(comfy):
    from comfy import model_management

    tiny = build_flow_model("z_image", comfy.models_dir)
    (model,) = comfy.nodes.UNETLoader().load_unet(tiny.unet_name, "default")
    assert type(model.model.model_config).__name__ == "ZImage"
    layers, config = flow_lora_factory.peft_layers("ZImageTransformer2DModel", tiny.transformer_dir,
                                                   flow_lora_factory.Z_IMAGE_TARGETS, RANK, LORA_ALPHA, seed=61)
    yield tiny, model, layers, config
    del model
    model_management.unload_all_models()
    gc.collect()


def to_comfy_map(model, prefix: str) -> dict:
    import comfy.utils

    return comfy.utils.z_image_to_diffusers(model.model.model_config.unet_config, output_prefix=prefix)


def write_layout(comfy, zimage, layout: str, name: str) -> str:
    tiny, model, layers, config = zimage
    folder, scale = comfy.models_dir / "loras", LORA_ALPHA / RANK
    if layout == "diffusers":
        return flow_lora_factory.save_flux_diffusers(folder, name, layers, config, pipeline="ZImagePipeline")
    if layout == "diffusion_model_alpha":
        return flow_lora_factory.save_with_alphas(layers, folder, name, scale, 0.25, prefix="diffusion_model.")
    if layout == "musubi":
        lora = flow_lora_factory.to_kohya_suffixes(layers, scale, 0.25, "lora_unet_", underscores=True)
    elif layout == "z_image_dotted":
        lora = to_z_image_dotted(layers, to_comfy_map(model, ""), scale)
    else:
        lora = flow_lora_factory.to_comfy_modules(layers, to_comfy_map(model, ""), scale, 0.25, "diffusion_model.")
    return flow_lora_factory.save(lora, folder, name)


def to_z_image_dotted(layers: dict, diffusers_to_comfy: dict, scale: float) -> dict:
    """The LoRA rewritten the way Anime-Z's released file has it — this mirrors that file's key list, as
    diffusers issue #13203 quotes it: kohya's suffixes with dots, q/k/v as "attention.to.q.lora.down.weight"
    with the alpha under diffusers' "attention.to_q.alpha", "attention.to_out.0.lora.down.weight" with its
    alpha, and the same attention deltas again on Z-Image's own modules: the fused "attention.qkv" (downs
    stacked, ups block-diagonal: exactly q/k/v's ΔW, with its alpha) and the bare "attention.out" (to_out.0's
    ΔW, no alpha of its own). The other modules take the same dotted suffixes. A loader that applied the
    duplicates as well would double the attention deltas; one that lost q/k/v would miss them."""
    split = flow_lora_factory.to_kohya_suffixes(layers, scale, 0.25, "")
    fused = flow_lora_factory.to_comfy_modules(layers, diffusers_to_comfy, scale, 0.25, "")
    duplicates = {k: v for k, v in fused.items()
                  if re.search(r"\.attention\.(qkv|out)\.", k) and not k.endswith(".out.alpha")}
    assert any(".attention.qkv." in k for k in duplicates) and any(".attention.out." in k for k in duplicates)
    dotted = {}
    for key, tensor in {**split, **duplicates}.items():
        key = key.replace(".lora_down.weight", ".lora.down.weight").replace(".lora_up.weight", ".lora.up.weight")
        dotted[re.sub(r"\.to_([qkv])\.lora\.", r".to.\1.lora.", key)] = tensor
    return dotted


@pytest.fixture(scope="module")
def diffusers_fused(comfy, zimage):
    """diffusers' fused weights of a file (by name; default: the ZImagePipeline file), as ComfyUI keys and rows."""
    tiny, model, layers, _ = zimage
    reference = write_layout(comfy, zimage, "diffusers", "reference_zimage.safetensors")
    modules = {key.rsplit(".lora_", 1)[0] for key in layers}
    cache = {}

    def fused(weight_name: str = reference) -> dict:
        if weight_name in cache:
            return cache[weight_name]
        weights = diffusers_fused_weights(
            "ZImagePipeline", "ZImageTransformer2DModel", tiny.transformer_dir, comfy.models_dir / "loras",
            weight_name, 1.0, modules, to_comfy_map(model, "diffusion_model."), Z_IMAGE_PIPELINE_PARTS)
        if weight_name == reference:  # only the reference is asked for twice; each copy is ~1 GB
            cache[weight_name] = weights
        return weights

    yield fused
    cache.clear()
    gc.collect()


@pytest.mark.parametrize("layout", LAYOUTS)
def test_z_image_layout_patches_like_diffusers(comfy, zimage, diffusers_fused, layout):
    tiny, model, layers, _ = zimage
    name = write_layout(comfy, zimage, layout, f"style_zimage_{layout}.safetensors")
    output, patched = comfy_patched(comfy, model, name)
    expected = diffusers_fused(name) if layout in READ_BY_DIFFUSERS else diffusers_fused()
    # Every LoRA module landed: q, k and v of one attention share ComfyUI's fused qkv.
    assert set(patched) == {t[0] if isinstance(t, tuple) else t for t, _ in expected.values()}
    worst = compare(patched, expected, model.model.state_dict())
    print(f"Z-Image {layout}: max relative error {worst:.2e}")
    assert worst < RELATIVE_TOLERANCE, f"{layout}: {worst:.2e}"
    assert f"({REPORTED[layout]} layout)" in output.ui["text"][0]
    del patched, expected
    gc.collect()


def test_z_image_dotted_module_the_model_lacks_is_refused(comfy, zimage):
    tiny, model, layers, _ = zimage
    lora = to_z_image_dotted(layers, to_comfy_map(model, ""), LORA_ALPHA / RANK)
    # A layer the one-block tiny model lacks, as a LoRA for another Z-Image variant would have.
    lora.update({"layers.7.attention.to.q.lora.down.weight": lora["layers.0.attention.to.q.lora.down.weight"].clone(),
                 "layers.7.attention.to.q.lora.up.weight": lora["layers.0.attention.to.q.lora.up.weight"].clone(),
                 "layers.7.attention.to_q.alpha": torch.tensor(1.0)})
    name = flow_lora_factory.save(lora, comfy.models_dir / "loras", "zimage_dotted_layer7.safetensors")
    loader = comfy.nodes.NODE_CLASS_MAPPINGS["FewStepLoraLoader"]
    with pytest.raises(ValueError) as failure:  # FewStepInputError, by name: ComfyUI imported the pack itself
        loader.execute(model=model, clip=None, lora_name=name, strength_model=1.0, strength_clip=1.0, family="detect")
    assert type(failure.value).__name__ == "FewStepInputError"
    message = str(failure.value)
    assert "(z_image_dotted layout): 1 LoRA modules match no weight" in message
    assert "transformer.layers.7.attention.to_q" in message
