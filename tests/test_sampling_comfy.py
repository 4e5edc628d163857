"""FewStepScheduler + FewStepSampler inside real ComfyUI's SamplerCustom, against diffusers.

Same weights (the tiny models' diffusers copy), same initial noise (ComfyUI's: a CPU generator seeded
with the seed) and the same per-step draws (seed + 1): the final latent must equal the reference loop
within 1e-3 in diffusers latent units (ComfyUI returns latents divided by the latent scale).
"""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from comfyui_fewstep.fewstep.families import FAMILIES
from comfyui_fewstep.fewstep.schedules import reference_timesteps
from diffusers_reference import reference_sample, scheduler_for

PROMPT = "a photo of a red fox in the snow, highly detailed"
NEGATIVE = "blurry, low quality"
SEED = 42
IMAGE_SIZE = 64  # an 8×8 latent: the sampling maths does not depend on size
TOLERANCE = 1e-3  # the bound; fp32 CPU runs land near 1e-5

GRID = [
    (name, steps, denoise)
    for name, family in FAMILIES.items()
    for steps in (1, 2, 4, 8)
    for denoise in (1.0, 0.5)
    if steps * denoise >= 1 and (family.only_steps is None or steps in family.only_steps)
]


class DiffusersSide:
    """The tiny model's diffusers copy: text encoding and an ε-function with CFG, as the pipelines."""

    def __init__(self, tiny):
        from diffusers import AutoPipelineForText2Image

        self.tiny = tiny
        self.pipe = AutoPipelineForText2Image.from_pretrained(str(tiny.diffusers_dir), torch_dtype=torch.float32)
        self.pipe.set_progress_bar_config(disable=True)

    def epsilon_fn(self, prompt: str, negative: str, cfg: float):
        do_cfg = cfg > 1.0
        sdxl = self.tiny.base == "sdxl"
        with torch.no_grad():
            encoded = self.pipe.encode_prompt(
                prompt=prompt, device="cpu", num_images_per_prompt=1,
                do_classifier_free_guidance=do_cfg, negative_prompt=negative if do_cfg else None,
                **({"prompt_2": None} if sdxl else {}),
            )
        cond, uncond = encoded[0], encoded[1]
        extra, extra_uncond = {}, {}
        if sdxl:
            pooled, pooled_uncond = encoded[2], encoded[3]
            time_ids = torch.tensor([[IMAGE_SIZE, IMAGE_SIZE, 0, 0, IMAGE_SIZE, IMAGE_SIZE]], dtype=torch.float32)
            extra = {"added_cond_kwargs": {"text_embeds": pooled, "time_ids": time_ids}}
            if do_cfg:
                extra_uncond = {"added_cond_kwargs": {"text_embeds": pooled_uncond, "time_ids": time_ids}}
        unet = self.pipe.unet

        def epsilon(model_input, t):
            eps = unet(model_input, t, encoder_hidden_states=cond, **extra).sample
            if not do_cfg:
                return eps
            eps_uncond = unet(model_input, t, encoder_hidden_states=uncond, **extra_uncond).sample
            return eps_uncond + cfg * (eps - eps_uncond)

        return epsilon


def sampling_prompt(tiny, family, steps, denoise, cfg=1.0, negative="", latent_file=None) -> dict:
    latent = (["latent_in", 0])
    prompt = {
        "ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": tiny.checkpoint_name}},
        "pos": {"class_type": "CLIPTextEncode", "inputs": {"text": PROMPT, "clip": ["ckpt", 1]}},
        "neg": {"class_type": "CLIPTextEncode", "inputs": {"text": negative, "clip": ["ckpt", 1]}},
        "sigmas": {"class_type": "FewStepScheduler",
                   "inputs": {"model": ["ckpt", 0], "family": family, "steps": steps, "denoise": denoise}},
        "sampler": {"class_type": "FewStepSampler", "inputs": {"family": family}},
        "sample": {"class_type": "SamplerCustom", "inputs": {
            "model": ["ckpt", 0], "add_noise": True, "noise_seed": SEED, "cfg": cfg,
            "positive": ["pos", 0], "negative": ["neg", 0], "sampler": ["sampler", 0],
            "sigmas": ["sigmas", 0], "latent_image": latent}},
        "save": {"class_type": "SaveLatent", "inputs": {"samples": ["sample", 0], "filename_prefix": "fewstep"}},
    }
    if latent_file is None:
        prompt["latent_in"] = {"class_type": "EmptyLatentImage",
                               "inputs": {"width": IMAGE_SIZE, "height": IMAGE_SIZE, "batch_size": 1}}
    else:
        prompt["latent_in"] = {"class_type": "LoadLatent", "inputs": {"latent": latent_file}}
    return prompt


def image_latent(comfy, tiny) -> tuple[str, torch.Tensor]:
    """A fixed 'encoded image' in ComfyUI units, saved as a .latent LoadLatent reads unscaled."""
    latent = torch.randn(1, 4, IMAGE_SIZE // 8, IMAGE_SIZE // 8, generator=torch.Generator().manual_seed(5))
    name = f"fewstep_image_{tiny.base}.latent"
    save_file({"latent_tensor": latent, "latent_format_version_0": torch.tensor([])},
              str(comfy.base_directory / "input" / name))
    return name, latent


def compare(comfy, tiny, reference: DiffusersSide, family, steps, denoise, cfg=1.0, negative="", img2img=False):
    latent_file, latent = image_latent(comfy, tiny) if img2img else (None, None)
    result = comfy.run(sampling_prompt(tiny, family, steps, denoise, cfg, negative, latent_file))
    ours = result.latent("save") * tiny.latent_scale

    noise = torch.randn((1, 4, IMAGE_SIZE // 8, IMAGE_SIZE // 8), generator=torch.manual_seed(SEED))
    image = None if latent is None else latent * tiny.latent_scale
    timesteps, expected = reference_sample(
        family, steps, denoise, reference.epsilon_fn(PROMPT, negative, cfg), noise, image, step_seed=SEED + 1
    )
    assert reference_timesteps(family, steps, denoise) == timesteps
    delta = (ours - expected).abs().max().item()
    assert delta <= TOLERANCE, f"{family} {steps} steps denoise {denoise}: max |Δ| {delta:.2e}"
    return delta


@pytest.fixture(scope="module")
def sd15_diffusers(sd15):
    return DiffusersSide(sd15)


@pytest.mark.parametrize("family,steps,denoise", GRID)
def test_family_matches_diffusers(comfy, sd15, sd15_diffusers, family, steps, denoise):
    compare(comfy, sd15, sd15_diffusers, family, steps, denoise, img2img=denoise < 1.0)


def test_lcm_lora_style_cfg_with_negative_prompt(comfy, sd15, sd15_diffusers):
    compare(comfy, sd15, sd15_diffusers, "lcm", 4, 1.0, cfg=1.5, negative=NEGATIVE)


def test_sdxl_family_model_matches_diffusers(comfy, sdxl):
    compare(comfy, sdxl, DiffusersSide(sdxl), "lightning", 4, 1.0)
