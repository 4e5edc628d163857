"""FewStepLoraLoader on FLUX LoRAs in their published layouts, against diffusers' own LoRA loading.

One set of random LoRA weights (peft on diffusers' FluxTransformer2DModel, lora_alpha ≠ r) is written in
diffusers' layout by FluxPipeline.save_lora_weights, in PEFT's by PeftModel.save_pretrained (alpha only in
adapter_config.json), with ".alpha" keys under "transformer.", and in kohya's, ComfyUI's and fal's
("base_model.model.double_blocks…") by ComfyUI's own FLUX map (testing/flow_lora_factory.py). ComfyUI loads the tiny FLUX transformer with UNETLoader; each file
must load through the node with every key matched and patch the weights to what diffusers'
load_lora_weights + fuse_lora gives, within 1e-5 relative (fp32 on both sides, sums in another order).
Only the patched weights are compared: the rest of the 390M-parameter model is untouched by either side.
The kohya file is also read by diffusers itself, so its layout is kohya's by another tool's reading too.
"""
from __future__ import annotations

import gc

import pytest
import torch

import flow_lora_factory
from flow_lora_checks import RELATIVE_TOLERANCE, comfy_patched, compare, diffusers_fused_weights, relative_error
from tiny_flow_models import build_flow_model

RANK, LORA_ALPHA = 8, 4.0  # scale 0.5: diffusers reads it from the header, kohya files from `.alpha`
LAYOUTS = ["diffusers", "kohya", "comfyui", "peft_save_pretrained", "transformer_alpha", "fal_base_model"]
# The layout the loader must report for each file.
REPORTED = {"diffusers": "peft", "kohya": "kohya", "comfyui": "comfyui", "peft_save_pretrained": "peft_base_model",
            "transformer_alpha": "peft", "fal_base_model": "peft_base_model"}
PEFT_FOLDER = "peft_flux"  # PEFT's save_pretrained output: adapter_model.safetensors + adapter_config.json


FLUX_PIPELINE_PARTS = ("scheduler", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")


@pytest.fixture(scope="module")
def flux(comfy):
    """(tiny FLUX.1-dev-shaped transformer, ComfyUI's MODEL of it, the PEFT LoRA layers and config)."""
    from comfy import model_management

    tiny = build_flow_model("flux_dev", comfy.models_dir)
    (model,) = comfy.nodes.UNETLoader().load_unet(tiny.unet_name, "default")
    layers, config = flow_lora_factory.flux_peft_layers(tiny.transformer_dir, RANK, LORA_ALPHA, seed=31,
                                                        peft_folder=comfy.models_dir / "loras" / PEFT_FOLDER)
    yield tiny, model, layers, config
    del model
    model_management.unload_all_models()
    gc.collect()


def write_layout(comfy, flux, layout: str, name: str) -> str:
    tiny, model, layers, config = flux
    folder = comfy.models_dir / "loras"
    if layout == "diffusers":
        return flow_lora_factory.save_flux_diffusers(folder, name, layers, config)
    if layout == "peft_save_pretrained":
        return f"{PEFT_FOLDER}/adapter_model.safetensors"  # written by the fixture, alpha only in its JSON
    if layout == "transformer_alpha":
        return flow_lora_factory.save_with_alphas(layers, folder, name, scale=LORA_ALPHA / RANK, alpha_ratio=0.25)
    prefix = {"kohya": "lora_unet_", "comfyui": "diffusion_model.", "fal_base_model": "base_model.model."}[layout]
    bfl = flow_lora_factory.to_flux_bfl(layers, model.model.model_config.unet_config, scale=LORA_ALPHA / RANK,
                                        alpha_ratio=None if layout == "fal_base_model" else 0.25, prefix=prefix)
    return flow_lora_factory.save(bfl, folder, name)


@pytest.fixture(scope="module")
def diffusers_fused(comfy, flux):
    """diffusers' fused weights of the diffusers-layout file at a lora_scale, as ComfyUI keys and rows."""
    from comfy import utils as comfy_utils

    tiny, model, layers, config = flux
    name = write_layout(comfy, flux, "diffusers", "reference_flux.safetensors")
    to_comfy = comfy_utils.flux_to_diffusers(model.model.model_config.unet_config, output_prefix="diffusion_model.")
    modules = {key.rsplit(".lora_", 1)[0] for key in layers}
    cache = {}

    def fused(scale: float, weight_name: str = name) -> dict:
        if (scale, weight_name) not in cache:
            cache[scale, weight_name] = diffusers_fused_weights(
                "FluxPipeline", "FluxTransformer2DModel", tiny.transformer_dir, comfy.models_dir / "loras",
                weight_name, scale, modules, to_comfy, FLUX_PIPELINE_PARTS)
        return cache[scale, weight_name]

    return fused


@pytest.mark.parametrize("layout", LAYOUTS)
def test_flux_layout_patches_like_diffusers(comfy, flux, diffusers_fused, layout):
    tiny, model, layers, _ = flux
    name = write_layout(comfy, flux, layout, f"style_flux_{layout}.safetensors")
    output, patched = comfy_patched(comfy, model, name)
    expected = diffusers_fused(1.0)
    base = model.model.state_dict()
    # Every LoRA module landed: 18 targets, q/k/v (and their text-side twins) sharing a fused qkv.
    assert len(patched) == len({t[0] if isinstance(t, tuple) else t for t, _ in expected.values()}) == 14
    worst = compare(patched, expected, base)
    print(f"FLUX {layout}: max relative error {worst:.2e}")
    assert worst < RELATIVE_TOLERANCE, f"{layout}: {worst:.2e}"
    assert output.args[2].family is None  # a style LoRA: not reported as few-step
    assert f"({REPORTED[layout]} layout)" in "\n".join(output.ui["text"])
    if layout == "peft_save_pretrained":
        assert "lora_alpha and r from the adapter_config.json saved beside it" in "\n".join(output.ui["text"])
    if layout == "transformer_alpha":
        # diffusers reads this file's `.alpha` keys itself (FluxLoraLoaderMixin's network alphas).
        by_diffusers = diffusers_fused(1.0, name)
        worst = max(relative_error(by_diffusers[m][1], expected[m][1]) for m in expected)
        assert worst < RELATIVE_TOLERANCE, f"diffusers reading the .alpha file: {worst:.2e}"
    if layout == "kohya":
        # The kohya file is kohya's layout as diffusers reads it too (its own sd-scripts converter): the
        # same LoRA on the double blocks, the fused qkv split back. Only there: diffusers 0.42 applies
        # final_layer without its alpha (lora_conversion_utils: "TODO: alphas"), and its img_in/txt_in
        # results differ from its own PEFT load as well.
        by_diffusers = diffusers_fused(1.0, name)
        blocks = [module for module in expected if module.startswith("transformer_blocks.")]
        assert len(blocks) == 14
        worst = max(relative_error(by_diffusers[m][1], expected[m][1]) for m in blocks)
        assert worst < RELATIVE_TOLERANCE, f"diffusers reading the kohya file: {worst:.2e}"


def test_hyper_flux_is_applied_at_its_card_scale(comfy, flux, diffusers_fused):
    """Hyper-FLUX's card fuses at lora_scale 0.125: detected from the published name, applied at strength
    1.0, shown, and scaled by the user's strength from there."""
    tiny, model, _, _ = flux
    name = write_layout(comfy, flux, "diffusers", "Hyper-FLUX.1-dev-8steps-lora.safetensors")
    output, patched = comfy_patched(comfy, model, name)
    settings = output.args[2]
    assert (settings.family, settings.steps) == ("hyper_flux", 8)
    assert output.ui["fewstep_settings"][0]["lora_scale"] == 0.125
    assert "LoRA scale 0.125 from the hyper_flux card × strength_model 1 = 0.125" in output.ui["text"][0]
    base = model.model.state_dict()
    worst = compare(patched, diffusers_fused(0.125), base)
    assert worst < RELATIVE_TOLERANCE, f"{worst:.2e}"

    # strength 2 doubles the card's change: diffusers' fuse_lora(lora_scale=0.25).
    _, doubled = comfy_patched(comfy, model, name, strength=2.0)
    worst = compare(doubled, diffusers_fused(0.25), base)
    assert worst < RELATIVE_TOLERANCE, f"{worst:.2e}"


def test_unmatched_flux_keys_name_the_file_and_the_keys(comfy, flux):
    """A module the model does not have (single blocks: the tiny FLUX has none) stops the load."""
    tiny, model, layers, config = flux
    extra = dict(layers)
    extra["single_transformer_blocks.0.attn.to_q.lora_A.weight"] = torch.zeros(RANK, 3072)
    extra["single_transformer_blocks.0.attn.to_q.lora_B.weight"] = torch.zeros(3072, RANK)
    name = flow_lora_factory.save_flux_diffusers(comfy.models_dir / "loras", "flux_extra_block.safetensors",
                                                 extra, config)
    loader = comfy.nodes.NODE_CLASS_MAPPINGS["FewStepLoraLoader"]
    # ComfyUI imported the pack under its own package name: the error class is matched by name.
    with pytest.raises(ValueError) as failure:
        loader.execute(model=model, clip=None, lora_name=name, strength_model=1.0, strength_clip=1.0)
    assert type(failure.value).__name__ == "FewStepInputError"
    message = str(failure.value)
    assert "flux_extra_block.safetensors" in message
    assert "transformer.single_transformer_blocks.0.attn.to_q" in message and "1 LoRA modules" in message
