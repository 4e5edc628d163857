"""FewStepLoraLoader on Qwen-Image LoRAs (Qwen-Image-Lightning and style LoRAs) in their published layouts.

One set of random LoRA weights (peft on diffusers' QwenImageTransformer2DModel, rank 16 at lora_alpha 2:
the Lightning files' alpha/rank of 8/64) is written as lightx2v releases Qwen-Image-Lightning
(diffusers' module names, kohya's lora_down/lora_up and ".alpha", no prefix), by
QwenImagePipeline.save_lora_weights ("transformer." + lora_A/lora_B), as ComfyUI writes it
("diffusion_model."), as musubi-tuner writes it ("lora_unet_transformer_blocks_0_attn_to_q") and with
PEFT's adapter name left in (".lora_A.default.weight"). diffusers 0.42's QwenImagePipeline.load_lora_weights
reads every one of these files itself (its _convert_non_diffusers_qwen_lora_to_diffusers); each must patch
ComfyUI's QwenImage (tiny, loaded by UNETLoader) to what diffusers' load_lora_weights + fuse_lora gives
that same file, within 1e-5 relative.
"""
from __future__ import annotations

import gc

import pytest

import flow_lora_factory
from flow_lora_checks import RELATIVE_TOLERANCE, comfy_patched, compare, diffusers_fused_weights
from tiny_flow_models import build_flow_model

RANK, LORA_ALPHA = 16, 2.0  # scale 1/8, as the Lightning files' alpha 8 at rank 64
ALPHA_RATIO = LORA_ALPHA / RANK  # the files' own .alpha (alpha_ratio × rank)
LAYOUTS = ["lightx2v", "diffusers", "comfyui", "musubi", "peft_adapter_name"]
REPORTED = {"lightx2v": "lightx2v", "diffusers": "peft", "comfyui": "comfyui", "musubi": "kohya",
            "peft_adapter_name": "peft"}
QWEN_PIPELINE_PARTS = ("scheduler", "vae", "text_encoder", "tokenizer")


@pytest.fixture(scope="module")
def qwen(comfy):
    from comfy import model_management

    tiny = build_flow_model("qwen_image", comfy.models_dir)
    (model,) = comfy.nodes.UNETLoader().load_unet(tiny.unet_name, "default")
    assert type(model.model.model_config).__name__ == "QwenImage"
    layers, config = flow_lora_factory.peft_layers("QwenImageTransformer2DModel", tiny.transformer_dir,
                                                   flow_lora_factory.QWEN_IMAGE_TARGETS, RANK, LORA_ALPHA, seed=51)
    yield tiny, model, layers, config
    del model
    model_management.unload_all_models()
    gc.collect()


def write_layout(comfy, qwen, layout: str, name: str) -> str:
    tiny, model, layers, config = qwen
    folder, scale = comfy.models_dir / "loras", LORA_ALPHA / RANK
    if layout == "diffusers":
        return flow_lora_factory.save_flux_diffusers(folder, name, layers, config, pipeline="QwenImagePipeline")
    if layout == "peft_adapter_name":
        return flow_lora_factory.save(flow_lora_factory.with_adapter_name(layers, scale), folder, name)
    prefix, underscores = {"lightx2v": ("", False), "comfyui": ("diffusion_model.", False),
                           "musubi": ("lora_unet_", True)}[layout]
    lora = flow_lora_factory.to_kohya_suffixes(layers, scale, ALPHA_RATIO, prefix, underscores)
    return flow_lora_factory.save(lora, folder, name)


def diffusers_fused(comfy, qwen, weight_name: str, scale: float = 1.0) -> dict:
    """diffusers' own reading of the file, fused at lora_scale, as ComfyUI keys (its Qwen-Image names are
    diffusers' own)."""
    tiny, _, layers, _ = qwen
    modules = {key.rsplit(".lora_", 1)[0] for key in layers}
    to_comfy = {f"{module}.weight": f"diffusion_model.{module}.weight" for module in modules}
    return diffusers_fused_weights("QwenImagePipeline", "QwenImageTransformer2DModel", tiny.transformer_dir,
                                   comfy.models_dir / "loras", weight_name, scale, modules, to_comfy,
                                   QWEN_PIPELINE_PARTS)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_qwen_image_layout_patches_like_diffusers(comfy, qwen, layout):
    tiny, model, layers, _ = qwen
    name = write_layout(comfy, qwen, layout, f"style_qwen_{layout}.safetensors")
    output, patched = comfy_patched(comfy, model, name)
    expected = diffusers_fused(comfy, qwen, name)
    assert set(patched) == {target for target, _ in expected.values()}  # every module landed
    worst = compare(patched, expected, model.model.state_dict())
    print(f"Qwen-Image {layout}: max relative error {worst:.2e}")
    assert worst < RELATIVE_TOLERANCE, f"{layout}: {worst:.2e}"
    assert f"({REPORTED[layout]} layout)" in output.ui["text"][0]
    assert output.args[2].family is None


def test_qwen_image_lightning_release_is_detected_at_its_card_scale(comfy, qwen):
    """The 8-step release as lightx2v names and lays it out: Lightning's 8 steps at scale 1 (its card loads it
    with load_lora_weights, no lora_scale); strength 0.5 halves it, as diffusers' fuse_lora(lora_scale=0.5)."""
    tiny, model, _, _ = qwen
    name = write_layout(comfy, qwen, "lightx2v", "Qwen-Image-Lightning-8steps-V1.0.safetensors")
    output, patched = comfy_patched(comfy, model, name, strength=0.5)
    settings = output.args[2]
    assert (settings.family, settings.steps, settings.cfg) == ("qwen_image_lightning", 8, 1.0)
    assert output.ui["fewstep_settings"][0]["lora_scale"] == 0.5
    worst = compare(patched, diffusers_fused(comfy, qwen, name, 0.5), model.model.state_dict())
    assert worst < RELATIVE_TOLERANCE, f"{worst:.2e}"


def test_unmatched_qwen_keys_name_the_file_and_the_keys(comfy, qwen):
    tiny, model, layers, _ = qwen
    lora = flow_lora_factory.to_kohya_suffixes(layers, 1.0, 1.0, "")
    for suffix in ("lora_down.weight", "lora_up.weight"):  # a block the one-block model does not have
        lora[f"transformer_blocks.7.attn.to_q.{suffix}"] = lora[f"transformer_blocks.0.attn.to_q.{suffix}"].clone()
    name = flow_lora_factory.save(lora, comfy.models_dir / "loras", "Qwen-Image-Lightning-4steps-V9.safetensors")
    loader = comfy.nodes.NODE_CLASS_MAPPINGS["FewStepLoraLoader"]
    with pytest.raises(ValueError) as failure:
        loader.execute(model=model, clip=None, lora_name=name, strength_model=1.0, strength_clip=1.0)
    message = str(failure.value)
    assert "Qwen-Image-Lightning-4steps-V9.safetensors (lightx2v layout): 1 LoRA modules" in message
    assert "transformer.transformer_blocks.7.attn.to_q" in message
