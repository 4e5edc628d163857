"""FewStepScheduler + FewStepSampler inside real ComfyUI's SamplerCustom, against diffusers.

Same weights (the tiny models' diffusers copy), same initial noise (ComfyUI's: a CPU generator seeded
with the seed) and the same per-step draws (seed + 1): the final latent must equal the reference loop
within 1e-3 in diffusers latent units (ComfyUI returns latents divided by the latent scale).
"""
from __future__ import annotations

import pytest
import torch

from comfyui_fewstep.fewstep.schedules import reference_timesteps
from diffusers_reference import ACCEPTANCE_GRID, DiffusersSide
from graphs import PROMPT, SEED, image_latent, sampling_prompt

NEGATIVE = "blurry, low quality"
TOLERANCE = 1e-3  # the bound; fp32 CPU runs land near 1e-5



def compare(comfy, tiny, reference: DiffusersSide, family, steps, denoise, cfg=1.0, negative="", img2img=False):
    latent_file, latent = image_latent(comfy, tiny) if img2img else (None, None)
    result = comfy.run(sampling_prompt(tiny, family, steps, denoise, cfg, negative, latent_file))
    ours = result.latent("save") * tiny.latent_scale
    timesteps, expected = reference.sample(family, steps, denoise, PROMPT, SEED, cfg, negative, latent)
    assert reference_timesteps(family, steps, denoise) == timesteps
    delta = (ours - expected).abs().max().item()
    assert delta <= TOLERANCE, f"{family} {steps} steps denoise {denoise}: max |Δ| {delta:.2e}"
    return delta


@pytest.fixture(scope="module")
def sd15_diffusers(sd15):
    return DiffusersSide(sd15)


@pytest.mark.parametrize("family,steps,denoise", ACCEPTANCE_GRID)
def test_family_matches_diffusers(comfy, sd15, sd15_diffusers, family, steps, denoise):
    compare(comfy, sd15, sd15_diffusers, family, steps, denoise, img2img=denoise < 1.0)


def test_lcm_lora_style_cfg_with_negative_prompt(comfy, sd15, sd15_diffusers):
    compare(comfy, sd15, sd15_diffusers, "lcm", 4, 1.0, cfg=1.5, negative=NEGATIVE)


def test_sdxl_family_model_matches_diffusers(comfy, sdxl):
    compare(comfy, sdxl, DiffusersSide(sdxl), "lightning", 4, 1.0)


def ksampler_prompt(tiny, family, steps, denoise, cfg=1.0, negative="", latent_file=None) -> dict:
    """The same graph with FewStepKSampler in place of scheduler + sampler + SamplerCustom."""
    prompt = sampling_prompt(tiny, family, steps, denoise, cfg, negative, latent_file)
    for node in ("sigmas", "sampler", "sample"):
        del prompt[node]
    prompt["sample"] = {"class_type": "FewStepKSampler", "inputs": {
        "model": ["ckpt", 0], "positive": ["pos", 0], "negative": ["neg", 0], "latent_image": ["latent_in", 0],
        "seed": SEED, "family": family, "steps": steps, "cfg": cfg, "denoise": denoise}}
    return prompt


@pytest.mark.parametrize("family,steps,denoise,cfg", [
    ("lcm", 4, 1.0, 1.5), ("tcd", 4, 0.5, 1.0), ("turbo", 2, 0.5, 1.0), ("hyper_sd_1step_unet", 1, 1.0, 1.0),
])
def test_one_node_sampler_is_the_scheduler_and_sampler_in_samplercustom(comfy, sd15, sd15_diffusers,
                                                                        family, steps, denoise, cfg):
    """FewStepKSampler runs exactly the core nodes: the same latent bit for bit, and diffusers' within 1e-3."""
    img2img = denoise < 1.0
    latent_file, latent = image_latent(comfy, sd15) if img2img else (None, None)
    negative = NEGATIVE if cfg > 1 else ""
    one_node = comfy.run(ksampler_prompt(sd15, family, steps, denoise, cfg, negative, latent_file)).latent("save")
    wired = comfy.run(sampling_prompt(sd15, family, steps, denoise, cfg, negative, latent_file)).latent("save")
    assert torch.equal(one_node, wired)
    _, expected = sd15_diffusers.sample(family, steps, denoise, PROMPT, SEED, cfg, negative, latent)
    delta = (one_node * sd15.latent_scale - expected).abs().max().item()
    assert delta <= TOLERANCE, f"{family}: max |Δ| {delta:.2e}"
