"""The real-size model files of the GPU runs (testing/real_size_models.py) and bench/workflow_gpu_check.py.

The GPU machine runs the flow workflows on random weights at real size (FLUX 12B, SD3.5 Large 8B,
Qwen-Image 20B, Z-Image 6B, T5-XXL, Qwen2.5-VL-7B, Qwen3-4B); a wrong key or shape there would cost a
device call. So here, on the CPU: every file's layout is checked against what ComfyUI's own loaders detect
(on the meta device: no memory), two small real-size files are written and read back by ComfyUI (the
streaming writer, the ldm VAE layout), and the check script itself runs through a real `main.py` with the
tests' tiny SDXL stand-ins.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from comfy_harness import PACK_ROOT


DIFFUSION_FILES = [  # (loader input, published name, ComfyUI model config class)
    ("unet_name", "flux1-schnell.safetensors", "FluxSchnell"),
    ("unet_name", "flux1-dev.safetensors", "Flux"),
    ("ckpt_name", "sd3.5_large_turbo.safetensors", "SD3"),
    ("unet_name", "qwen_image_fp8_e4m3fn.safetensors", "QwenImage"),
    ("unet_name", "z_image_turbo_bf16.safetensors", "ZImage"),
]
TEXT_ENCODER_FILES = [("clip_l.safetensors", "CLIP_L"), ("clip_g.safetensors", "CLIP_G"),
                      ("t5xxl_fp16.safetensors", "T5_XXL"), ("qwen_2.5_vl_7b_fp8_scaled.safetensors", "QWEN25_7B"),
                      ("qwen_3_4b.safetensors", "QWEN3_4B")]


def meta(spec) -> dict:
    return {k: torch.empty(shape, dtype=spec.dtypes[k], device="meta") for k, shape in spec.shapes.items()}


@pytest.mark.parametrize("input_name,name,comfy_class", DIFFUSION_FILES)
def test_real_size_diffusion_models_load_as_their_architecture(comfy, input_name, name, comfy_class):
    """ComfyUI's detection reads the written keys as the published model's, and its model has exactly them."""
    import real_size_models
    from comfy.model_detection import model_config_from_unet, unet_prefix_from_state_dict

    (spec,) = real_size_models.spec_for(input_name, name)
    state = meta(spec)
    prefix = unet_prefix_from_state_dict(state) if input_name == "ckpt_name" else ""
    model_config = model_config_from_unet(state, prefix)
    assert type(model_config).__name__ == comfy_class
    with torch.device("meta"):
        model = model_config.get_model(state, prefix, device="meta")
    expected = {f"{prefix}{k}": tuple(v.shape) for k, v in model.diffusion_model.state_dict().items()}
    written = {k: s for k, s in spec.shapes.items() if k.startswith(prefix)}
    assert written == expected
    if "fp8" in name:
        assert spec.dtypes["transformer_blocks.0.attn.to_q.weight"] == torch.float8_e4m3fn


@pytest.mark.parametrize("name,te_model", TEXT_ENCODER_FILES)
def test_real_size_text_encoders_are_detected(comfy, name, te_model):
    import comfy.sd
    import real_size_models

    (spec,) = real_size_models.spec_for("clip_name", name)
    assert comfy.sd.detect_te_model(meta(spec)).name == te_model


def test_written_files_load_in_comfyui(comfy, tmp_path):
    """Real-size CLIP-L and FLUX ae, provided for a prompt by the streaming writer: safetensors reads every
    tensor back, CLIPLoader's loader takes CLIP-L with no key left over, ComfyUI's VAE decodes a 16-channel
    latent; a later prompt without CLIP-L has it deleted."""
    import comfy.sd
    import comfy.utils
    import real_size_models

    (clip_spec,) = real_size_models.spec_for("clip_name1", "clip_l.safetensors")
    (vae_spec,) = real_size_models.spec_for("vae_name", "ae.safetensors")
    flux_like = {"clip": {"class_type": "DualCLIPLoader", "inputs": {"clip_name1": "clip_l.safetensors"}},
                 "vae": {"class_type": "VAELoader", "inputs": {"vae_name": "ae.safetensors"}}}
    written = {}
    records = real_size_models.provide(flux_like, [], tmp_path, "cpu", written)
    assert [r["file"] for r in records] == ["text_encoders/clip_l.safetensors", "vae/ae.safetensors"]
    clip_path, vae_path = tmp_path / "text_encoders" / "clip_l.safetensors", tmp_path / "vae" / "ae.safetensors"
    assert clip_path.stat().st_size == pytest.approx(clip_spec.bytes, abs=64 * 1024)

    clip_sd = comfy.utils.load_torch_file(str(clip_path))
    assert {k: tuple(v.shape) for k, v in clip_sd.items()} == clip_spec.shapes
    assert all(v.dtype == torch.bfloat16 and torch.isfinite(v.float()).all() for v in clip_sd.values())
    clip = comfy.sd.load_text_encoder_state_dicts([clip_sd], clip_type=comfy.sd.CLIPType.STABLE_DIFFUSION)
    missing, unexpected = clip.cond_stage_model.clip_l.transformer.load_state_dict(clip_sd, strict=False)
    assert not unexpected and not [k for k in missing if "position_ids" not in k]

    vae = comfy.sd.VAE(sd=comfy.utils.load_torch_file(str(vae_path)))
    assert vae.latent_channels == 16
    image = vae.decode(torch.randn(1, 16, 4, 4))
    assert image.shape[-3:] == (32, 32, 3) and torch.isfinite(image).all()

    # The next prompt needs only the VAE: CLIP-L goes (disk), the VAE is not written again.
    modified = vae_path.stat().st_mtime_ns
    only_vae = {"vae": flux_like["vae"]}
    real_size_models.provide(only_vae, [], tmp_path, "cpu", written, log=lambda message: None)
    assert not clip_path.exists() and vae_path.stat().st_mtime_ns == modified and list(written) == [("vae", "ae.safetensors")]


def test_loras_are_in_each_releases_layout(comfy):
    """FLUX LoRAs in diffusers' layout (Hyper-FLUX, Turbo-Alpha), Qwen-Image-Lightning in lightx2v's."""
    import real_size_models

    (flux,) = real_size_models.spec_for("lora_name", "Hyper-FLUX.1-dev-8steps-lora.safetensors")
    assert "transformer.single_transformer_blocks.37.proj_out.lora_A.weight" in flux.shapes
    assert flux.shapes["transformer.transformer_blocks.0.attn.to_q.lora_B.weight"] == (3072, 64)
    (qwen,) = real_size_models.spec_for("lora_name", "Qwen-Image-Lightning-8steps-V1.0.safetensors")
    assert qwen.shapes["transformer_blocks.59.attn.to_q.lora_down.weight"] == (64, 3072)
    assert qwen.shapes["transformer_blocks.59.attn.to_q.alpha"] == ()


def test_workflow_check_runs_a_workflow_through_main_py(tmp_path):
    """bench/workflow_gpu_check.py --tiny: a real main.py, the workflow converted, the stand-ins placed, two
    prompts queued and timed, the results written."""
    from comfy_harness import require_comfyui

    comfyui = require_comfyui()
    run = subprocess.run([sys.executable, str(PACK_ROOT / "bench" / "workflow_gpu_check.py"), "--tiny",
                          "--workflows", "sdxl_turbo_1step_txt2img", "--out", str(tmp_path)],
                         env={**os.environ, "COMFYUI_PATH": str(comfyui)}, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    entry = results["workflows"]["sdxl_turbo_1step_txt2img"]
    assert entry["completed"] == 2 and entry["errors"] == [] and entry["first_ms"] > 0 and entry["second_ms"] > 0
    assert results["server_alive_at_end"] is True
    assert "| sdxl_turbo_1step_txt2img | 2/2 |" in (tmp_path / "results.md").read_text()


def test_workflow_check_plans_real_size_files_for_every_flow_workflow(tmp_path):
    """bench/workflow_gpu_check.py --plan (CPU): every flow example workflow converts, each file its loaders
    name has a real-size layout, and the files on hand at any time fit the device's space (48 GiB)."""
    from comfy_harness import require_comfyui

    comfyui = require_comfyui()
    run = subprocess.run([sys.executable, str(PACK_ROOT / "bench" / "workflow_gpu_check.py"), "--plan",
                          "--out", str(tmp_path)],
                         env={**os.environ, "COMFYUI_PATH": str(comfyui)}, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    workflows = json.loads((tmp_path / "results.json").read_text())["workflows"]
    from comfyui_fewstep.fewstep.families import FAMILIES

    flow_families = [name for name, family in FAMILIES.items() if family.flow is not None]
    flow = {path.stem for path in (PACK_ROOT / "example_workflows").glob("*.json")
            if any(f'"{family}"' in path.read_text() for family in flow_families)}
    assert set(workflows) == flow and len(flow) >= 6
    for name, entry in workflows.items():
        assert not entry.get("errors") and entry["files"], name
        assert 0 < entry["GiB on hand"] < 48, name
