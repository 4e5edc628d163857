"""The scale diffusers gives a LoRA module from the LoraConfig it saved in the file's header, computed
as PEFT computes it (LoraLayer: lora_alpha / r, or / √r with use_rslora; alpha_pattern and rank_pattern
matched against the end of the module path)."""
import json
import math

import pytest
import torch

from comfyui_fewstep.fewstep.families import FewStepInputError
from comfyui_fewstep.fewstep.lora_layouts import ADAPTER_METADATA_KEY, adapter_configs, adapter_scale, canonicalize


def header(**fields) -> dict:
    return {ADAPTER_METADATA_KEY: json.dumps(fields)}


def test_scale_follows_peft_patterns_and_rslora():
    config = {"r": 8, "lora_alpha": 4, "alpha_pattern": {"ff.net.2": 24}, "rank_pattern": {"attn2.to_k": 16}}
    assert adapter_scale(config, "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q") == 0.5
    assert adapter_scale(config, "mid_block.attentions.0.transformer_blocks.0.ff.net.2") == 3.0
    assert adapter_scale(config, "up_blocks.0.attentions.1.transformer_blocks.0.attn2.to_k") == 0.25
    assert adapter_scale({"r": 16, "lora_alpha": 8, "use_rslora": True}, "x.to_q") == pytest.approx(8 / math.sqrt(16))
    assert adapter_scale({"r": 16}, "x.to_q") is None  # no alpha saved: diffusers' default, scale 1


def test_canonical_alpha_gives_the_saved_scale_per_component():
    down, up = torch.zeros(8, 32), torch.zeros(32, 8)
    state_dict = {"unet.mid_block.attentions.0.proj_in.lora_A.weight": down,
                  "unet.mid_block.attentions.0.proj_in.lora_B.weight": up,
                  "text_encoder.text_model.encoder.layers.0.mlp.fc1.lora_A.weight": down,
                  "text_encoder.text_model.encoder.layers.0.mlp.fc1.lora_B.weight": up}
    metadata = header(**{"unet.r": 8, "unet.lora_alpha": 2, "text_encoder.r": 8, "text_encoder.lora_alpha": 16})
    tensors = canonicalize(state_dict, metadata).tensors
    # ComfyUI scales by alpha / rank of the down weight: 2/8 and 16/8.
    assert tensors["lora_unet_mid_block_attentions_0_proj_in.alpha"].item() == 2.0
    assert tensors["lora_te1_text_model_encoder_layers_0_mlp_fc1.alpha"].item() == 16.0
    assert not any(key.endswith(".alpha") for key in canonicalize(state_dict).tensors)  # no header: scale 1


def test_one_models_unprefixed_config_applies_to_every_module():
    assert adapter_configs(header(r=4, lora_alpha=8)) == {None: {"r": 4, "lora_alpha": 8}}


def test_a_damaged_header_is_named():
    with pytest.raises(FewStepInputError, match="lora_adapter_metadata"):
        adapter_configs({ADAPTER_METADATA_KEY: "{not json"})
