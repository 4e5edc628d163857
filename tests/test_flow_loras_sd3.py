"""FewStepLoraLoader on SD3.5 LoRAs in their published layouts, against diffusers' own LoRA loading.

One set of random LoRA weights (peft on diffusers' SD3Transformer2DModel, SD3.5 Large's RMS q/k norm,
lora_alpha ≠ r) is written by StableDiffusion3Pipeline.save_lora_weights (diffusers' "transformer."
layout, the LoraConfig in the header), by PEFT's save_pretrained ("base_model.model.", alpha in
adapter_config.json), in OneTrainer's "lora_transformer_…" names, and on SD3's own MMDiT modules
("joint_blocks.0.x_block.attn.qkv") as kohya's sd-scripts ("lora_unet_…") and ComfyUI ("diffusion_model.")
write them, by ComfyUI's own map (comfy.utils.mmdit_to_diffusers). ComfyUI loads the tiny transformer
with UNETLoader (detected as SD3); each file must patch it to what diffusers' load_lora_weights +
fuse_lora gives the diffusers file, within 1e-5 relative.
"""
from __future__ import annotations

import gc

import pytest

import flow_lora_factory
from flow_lora_checks import RELATIVE_TOLERANCE, comfy_patched, compare, diffusers_fused_weights
from tiny_flow_models import build_flow_model

RANK, LORA_ALPHA = 4, 8.0  # scale 2
LAYOUTS = ["diffusers", "peft_save_pretrained", "onetrainer", "kohya", "comfyui"]
REPORTED = {"diffusers": "peft", "peft_save_pretrained": "peft_base_model", "onetrainer": "kohya", "kohya": "kohya",
            "comfyui": "comfyui"}
PEFT_FOLDER = "peft_sd35"
SD3_PIPELINE_PARTS = ("scheduler", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2",
                      "text_encoder_3", "tokenizer_3")


@pytest.fixture(scope="module")
def sd35(comfy):
    from comfy import model_management

    tiny = build_flow_model("sd35_large", comfy.models_dir)
    (model,) = comfy.nodes.UNETLoader().load_unet(tiny.unet_name, "default")
    assert type(model.model.model_config).__name__ == "SD3"
    layers, config = flow_lora_factory.peft_layers("SD3Transformer2DModel", tiny.transformer_dir,
                                                   flow_lora_factory.SD3_TARGETS, RANK, LORA_ALPHA, seed=41,
                                                   peft_folder=comfy.models_dir / "loras" / PEFT_FOLDER)
    yield tiny, model, layers, config
    del model
    model_management.unload_all_models()
    gc.collect()


def write_layout(comfy, sd35, layout: str, name: str) -> str:
    import comfy.utils as comfy_utils

    tiny, model, layers, config = sd35
    folder = comfy.models_dir / "loras"
    if layout == "diffusers":
        return flow_lora_factory.save_flux_diffusers(folder, name, layers, config, pipeline="StableDiffusion3Pipeline")
    if layout == "peft_save_pretrained":
        return f"{PEFT_FOLDER}/adapter_model.safetensors"
    if layout == "onetrainer":
        return flow_lora_factory.save(flow_lora_factory.to_onetrainer(layers, LORA_ALPHA / RANK, 0.5), folder, name)
    to_mmdit = comfy_utils.mmdit_to_diffusers(model.model.model_config.unet_config, output_prefix="")
    prefix = {"kohya": "lora_unet_", "comfyui": "diffusion_model."}[layout]
    lora = flow_lora_factory.to_comfy_modules(layers, to_mmdit, LORA_ALPHA / RANK, alpha_ratio=0.5, prefix=prefix)
    return flow_lora_factory.save(lora, folder, name)


@pytest.fixture(scope="module")
def sd35_fused(comfy, sd35):
    """diffusers' fused weights of the StableDiffusion3Pipeline file at lora_scale 1, as ComfyUI keys and rows."""
    from comfy import utils as comfy_utils

    tiny, model, layers, _ = sd35
    name = write_layout(comfy, sd35, "diffusers", "reference_sd35.safetensors")
    to_comfy = comfy_utils.mmdit_to_diffusers(model.model.model_config.unet_config, output_prefix="diffusion_model.")
    modules = {key.rsplit(".lora_", 1)[0] for key in layers}
    return diffusers_fused_weights("StableDiffusion3Pipeline", "SD3Transformer2DModel", tiny.transformer_dir,
                                   comfy.models_dir / "loras", name, 1.0, modules, to_comfy, SD3_PIPELINE_PARTS)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_sd35_layout_patches_like_diffusers(comfy, sd35, sd35_fused, layout):
    tiny, model, layers, _ = sd35
    name = write_layout(comfy, sd35, layout, f"style_sd35_{layout}.safetensors")
    output, patched = comfy_patched(comfy, model, name)
    base = model.model.state_dict()
    # Every LoRA module landed: q, k and v (and their context twins) share one fused qkv in ComfyUI.
    targets = {t[0] if isinstance(t, tuple) else t for t, _ in sd35_fused.values()}
    assert set(patched) == targets and len(sd35_fused) == len({k.rsplit(".lora_", 1)[0] for k in layers})
    worst = compare(patched, sd35_fused, base)
    print(f"SD3.5 {layout}: max relative error {worst:.2e}")
    assert worst < RELATIVE_TOLERANCE, f"{layout}: {worst:.2e}"
    assert f"({REPORTED[layout]} layout)" in output.ui["text"][0]
    assert output.args[2].family is None  # a style LoRA: not reported as few-step


def test_sd35_large_turbo_lora_is_detected(comfy, sd35):
    """A LoRA named for SD3.5 Large Turbo runs at that card's settings (4 steps, no CFG) at scale 1."""
    name = write_layout(comfy, sd35, "diffusers", "sd3.5_large_turbo_style_lora.safetensors")
    output, _ = comfy_patched(comfy, sd35[1], name)
    settings = output.args[2]
    assert (settings.family, settings.steps, settings.cfg) == ("sd35_large_turbo", 4, 1.0)
    assert output.ui["fewstep_settings"][0]["lora_scale"] == 1.0
    # Trained on the distilled model, it is no few-step LoRA of its own: another one on top is no stack.
    assert "a LoRA for the distilled SD3.5 Large Turbo model" in output.ui["text"][0]
    loader = comfy.nodes.NODE_CLASS_MAPPINGS["FewStepLoraLoader"]
    second = loader.execute(model=output.args[0], clip=None, lora_name=name, strength_model=1.0, strength_clip=1.0)
    assert "stacked" not in second.ui["text"][0]


def test_adapter_config_is_read_only_beside_its_own_weights(tmp_path):
    """PEFT's adapter_config.json belongs to the adapter_model.safetensors beside it (or the folder's only
    LoRA): never to another LoRA that happens to share the folder, nor over a config the file carries."""
    import json

    from comfyui_fewstep.fewstep.lora_layouts import ADAPTER_METADATA_KEY, with_peft_adapter_config

    (tmp_path / "adapter_config.json").write_text(json.dumps({"r": 8, "lora_alpha": 4, "peft_type": "LORA"}))
    for name in ("adapter_model.safetensors", "renamed.safetensors"):
        (tmp_path / name).write_bytes(b"")
    metadata, source = with_peft_adapter_config(tmp_path / "adapter_model.safetensors", {})
    assert source == "adapter_config.json" and json.loads(metadata[ADAPTER_METADATA_KEY])["lora_alpha"] == 4
    assert with_peft_adapter_config(tmp_path / "renamed.safetensors", {}) == ({}, None)
    own = {ADAPTER_METADATA_KEY: json.dumps({"r": 4, "lora_alpha": 4})}
    assert with_peft_adapter_config(tmp_path / "adapter_model.safetensors", own) == (own, None)
    (tmp_path / "adapter_model.safetensors").unlink()  # now the folder's only LoRA
    assert with_peft_adapter_config(tmp_path / "renamed.safetensors", {})[1] == "adapter_config.json"
