"""Foundation acceptance: the tiny models run through ComfyUI's own loader, text and VAE nodes in the
real executor, are detected as the right family, and compute what diffusers computes from the same
weights. Every later comparison with diffusers rests on these.

The executor's outputs are collected by a test-only output node registered in process, so the
objects compared are exactly what UNETLoader, CheckpointLoaderSimple, CLIPTextEncode and VAEDecode
hand to the next node in a real graph.
"""
from __future__ import annotations

import uuid

import pytest
import torch
from safetensors.torch import save_file

PROMPTS = ["a photo of a red fox in the snow, highly detailed", ""]
CAPTURE_NODE = "TinyModelsTestCapture"
EXPECTED_CLASS = {"sd15": "SD15", "sdxl": "KOALA_700M"}  # ComfyUI's supported_models class names
EXPECTED_CLIP = {"sd15": "SD1ClipModel", "sdxl": "SDXLClipModel"}
CONTEXT_DIM = {"sd15": 768, "sdxl": 2048}

# Same fp32 weights and inputs on both sides: what differs is only the order of floating-point
# operations (attention kernels, norms), ~1e-6 at these activation sizes (|ε| ≲ 1.3).
UNET_TOLERANCE = 1e-5
# 12- / 32-layer text transformers and ~30 VAE conv layers accumulate more rounding (values ≲ 4).
TEXT_TOLERANCE = 1e-4
VAE_TOLERANCE = 1e-4


class _Capture:
    """Output node that keeps what it is given, keyed by a per-prompt key (which also defeats the cache)."""

    captured: dict = {}
    RETURN_TYPES = ()
    OUTPUT_NODE = True
    FUNCTION = "capture"
    CATEGORY = "testing"

    @classmethod
    def INPUT_TYPES(cls):
        optional = {f"text_{i}": ("CONDITIONING",) for i in range(len(PROMPTS))}
        optional.update({"unet_model": ("MODEL",), "checkpoint_model": ("MODEL",), "clip": ("CLIP",),
                         "image": ("IMAGE",)})
        return {"required": {"key": ("STRING", {"default": ""})}, "optional": optional}

    def capture(self, key, **inputs):
        _Capture.captured[key] = inputs
        return {}


@pytest.fixture(scope="module")
def capture_node(comfy):
    comfy.nodes.NODE_CLASS_MAPPINGS[CAPTURE_NODE] = _Capture
    yield
    comfy.nodes.NODE_CLASS_MAPPINGS.pop(CAPTURE_NODE, None)
    _Capture.captured.clear()


def loaders_prompt(tiny, latent_file: str, key: str) -> dict:
    prompt = {
        "unet": {"class_type": "UNETLoader", "inputs": {"unet_name": tiny.unet_name, "weight_dtype": "default"}},
        "ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": tiny.checkpoint_name}},
        "latent": {"class_type": "LoadLatent", "inputs": {"latent": latent_file}},
        "decode": {"class_type": "VAEDecode", "inputs": {"samples": ["latent", 0], "vae": ["ckpt", 2]}},
    }
    capture_inputs = {"key": key, "unet_model": ["unet", 0], "checkpoint_model": ["ckpt", 0],
                      "clip": ["ckpt", 1], "image": ["decode", 0]}
    for i, text in enumerate(PROMPTS):
        prompt[f"text_{i}"] = {"class_type": "CLIPTextEncode", "inputs": {"text": text, "clip": ["ckpt", 1]}}
        capture_inputs[f"text_{i}"] = [f"text_{i}", 0]
    prompt["capture"] = {"class_type": CAPTURE_NODE, "inputs": capture_inputs}
    return prompt


@pytest.fixture(scope="module", params=["sd15", "sdxl"])
def loaded(request, comfy, capture_node):
    """One family's models through the executor: (tiny, captured node outputs, ComfyUI latent decoded)."""
    tiny = request.getfixturevalue(request.param)
    latent = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(4))
    latent_file = f"tiny_models_test_{tiny.base}.latent"
    # The version key tells LoadLatent the tensor is in ComfyUI units already (no 1/0.18215).
    save_file({"latent_tensor": latent, "latent_format_version_0": torch.tensor([])},
              str(comfy.base_directory / "input" / latent_file))
    key = uuid.uuid4().hex
    comfy.run(loaders_prompt(tiny, latent_file, key))
    yield tiny, _Capture.captured.pop(key), latent


def _pipeline(tiny, **components):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    if tiny.base == "sdxl":
        return StableDiffusionXLPipeline.from_pretrained(str(tiny.diffusers_dir), dtype=torch.float32, **components)
    return StableDiffusionPipeline.from_pretrained(str(tiny.diffusers_dir), dtype=torch.float32, safety_checker=None,
                                                   feature_extractor=None, **components)


def test_loaders_detect_the_family(loaded):
    import comfy.model_base
    import comfy.supported_models

    tiny, captured, _ = loaded
    for name in ("unet_model", "checkpoint_model"):
        model = captured[name].model
        assert type(model.model_config).__name__ == EXPECTED_CLASS[tiny.base], name
        assert model.model_type == comfy.model_base.ModelType.EPS, name
        assert model.latent_format.scale_factor == tiny.latent_scale, name
        if tiny.base == "sdxl":
            # SDXL-family: SDXL's model class, so its ADM (pooled CLIP-G + size/crop embeddings) is used.
            assert isinstance(model.model_config, comfy.supported_models.SDXL), name
            assert type(model) is comfy.model_base.SDXL, name
        else:
            assert type(model) is comfy.model_base.BaseModel, name
        assert model.get_dtype() == torch.float32, name
    assert type(captured["clip"].cond_stage_model).__name__ == EXPECTED_CLIP[tiny.base]


def test_unet_forward_matches_diffusers(loaded):
    from diffusers import UNet2DConditionModel

    tiny, captured, _ = loaded
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(2, 4, 8, 8, generator=generator)
    timesteps = torch.tensor([999.0, 259.0])
    context = torch.randn(2, 77, CONTEXT_DIM[tiny.base], generator=generator)
    pooled = torch.randn(2, 1280, generator=generator)
    unet = UNet2DConditionModel.from_pretrained(str(tiny.diffusers_dir / "unet")).eval()
    # Non-square sizes and unequal crops, so a swapped height/width or crop order shows.
    size = dict(height=1024, width=768, crop_h=16, crop_w=32, target_height=896, target_width=640)
    extra = {}
    if tiny.base == "sdxl":
        time_ids = torch.tensor([[size["height"], size["width"], size["crop_h"], size["crop_w"],
                                  size["target_height"], size["target_width"]]] * 2, dtype=torch.float32)
        extra = {"added_cond_kwargs": {"text_embeds": pooled, "time_ids": time_ids}}
    with torch.no_grad():
        expected = unet(x, timesteps, encoder_hidden_states=context, **extra).sample
        for name in ("unet_model", "checkpoint_model"):
            model = captured[name].model
            adm = model.encode_adm(pooled_output=pooled, **size) if tiny.base == "sdxl" else None
            ours = model.diffusion_model(x, timesteps, context=context, y=adm)
            delta = (ours - expected).abs().max().item()
            print(f"{tiny.base} {name} UNet forward: max |Δ| = {delta:.2e} (|ε| max {expected.abs().max():.2f})")
            assert delta < UNET_TOLERANCE, name


def test_text_encoding_matches_diffusers(loaded):
    tiny, captured, _ = loaded
    pipe = _pipeline(tiny, unet=None, vae=None)
    for i, text in enumerate(PROMPTS):
        ((cond, extras),) = captured[f"text_{i}"]
        with torch.no_grad():
            # SD1.5: CLIP-L's last hidden state. SDXL: CLIP-L's and CLIP-G's penultimate hidden states
            # concatenated, and CLIP-G's projected pooled output.
            encoded = pipe.encode_prompt(text, device="cpu", num_images_per_prompt=1,
                                         do_classifier_free_guidance=False)
        assert cond.shape == encoded[0].shape
        delta = (cond - encoded[0]).abs().max().item()
        print(f"{tiny.base} CLIPTextEncode {text!r}: max |Δ| = {delta:.2e}")
        assert delta < TEXT_TOLERANCE, text
        if tiny.base == "sdxl":
            delta = (extras["pooled_output"] - encoded[2]).abs().max().item()
            print(f"{tiny.base} CLIPTextEncode pooled {text!r}: max |Δ| = {delta:.2e}")
            assert delta < TEXT_TOLERANCE, text


def test_vae_decode_matches_diffusers(loaded):
    from diffusers import AutoencoderKL

    tiny, captured, comfy_latent = loaded
    vae = AutoencoderKL.from_pretrained(str(tiny.diffusers_dir / "vae")).eval()
    assert vae.config.scaling_factor == tiny.latent_scale
    # ComfyUI latents are the VAE's raw latents; diffusers' pipelines hold them × scaling_factor and
    # decode latents / scaling_factor.
    diffusers_latent = comfy_latent * tiny.latent_scale
    with torch.no_grad():
        decoded = vae.decode(diffusers_latent / vae.config.scaling_factor).sample
    expected = ((decoded + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1)  # ComfyUI's IMAGE: BHWC in [0, 1]
    image = captured["image"]
    assert image.shape == expected.shape == (1, 64, 64, 3)
    # Not a vacuous match of clamped pixels: the random decoder's output is mostly inside the range.
    assert ((expected > 0) & (expected < 1)).float().mean() > 0.9
    delta = (image - expected).abs().max().item()
    print(f"{tiny.base} VAEDecode: max |Δ| = {delta:.2e}")
    assert delta < VAE_TOLERANCE
