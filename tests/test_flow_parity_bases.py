"""The tiny Qwen-Image and Z-Image transformers load in real ComfyUI as the models they stand in for.

UNETLoader (ComfyUI's node, its detection from the file's keys and shapes) must pick
comfy.supported_models.QwenImage / ZImage and load every weight (ComfyUI only logs keys it did not
load: "unet missing" / "unet unexpected"). Z-Image's UNETLoader file is written in ComfyUI's layout
(testing/tiny_flow_models.py says why); diffusers' own single-file converter must read it back to the
weights the diffusers reference loads, so the conversion is checked by a tool other than the one that
wrote it.
"""
from __future__ import annotations

import gc
import logging

import pytest
import torch

from tiny_flow_models import build_flow_model


@pytest.mark.parametrize("base", ["qwen_image", "z_image"])
def test_unet_loader_detects_the_tiny_base_and_loads_every_weight(comfy, caplog, base):
    import nodes
    from comfy import model_management, supported_models  # (binds no local `comfy`: the fixture)

    tiny = build_flow_model(base, comfy.models_dir)
    with caplog.at_level(logging.WARNING):
        (model,) = nodes.UNETLoader().load_unet(tiny.unet_name, "default")
    try:
        assert type(model.model.model_config) is getattr(supported_models, tiny.comfy_class)
        not_loaded = [r.getMessage()[:200] for r in caplog.records if r.getMessage().startswith(("unet missing", "unet unexpected"))]
        assert not not_loaded, not_loaded
    finally:
        del model
        model_management.unload_all_models()
        gc.collect()


def test_the_comfyui_layout_z_image_file_reads_back_as_the_diffusers_weights(comfy):
    from diffusers.loaders.single_file_utils import convert_z_image_transformer_checkpoint_to_diffusers
    from safetensors import safe_open
    from safetensors.torch import load_file

    tiny = build_flow_model("z_image", comfy.models_dir)
    converted = convert_z_image_transformer_checkpoint_to_diffusers(
        load_file(str(comfy.models_dir / "diffusion_models" / tiny.unet_name)))
    with safe_open(str(tiny.transformer_dir / "diffusion_pytorch_model.safetensors"), "pt") as diffusers_file:
        assert sorted(converted) == sorted(diffusers_file.keys())
        for key in diffusers_file.keys():
            assert torch.equal(converted[key], diffusers_file.get_tensor(key)), key
