"""The flow-matching families' σ (fewstep.flow_schedules), ComfyUI-free, against the cards' own rules.

Each expected schedule is written from what the card or base model's reference code says — a fixed
shift, FLUX.1-dev's resolution-dependent μ, the Lightning distillation's "shift=3" — not from the
diffusers scheduler flow_schedules calls; img2img is checked against diffusers' img2img pipelines' own
get_timesteps.
"""
from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from comfyui_fewstep.fewstep.families import FAMILIES, FewStepInputError
from comfyui_fewstep.fewstep.flow_schedules import flow_sigmas, image_seq_len, shift_depends_on_size
from comfyui_fewstep.fewstep.schedules import reference_timesteps

FLOW_FAMILIES = [name for name, family in FAMILIES.items() if family.flow is not None]
LATENT_SIZES = [(8, 8), (16, 8), (128, 128), (96, 160)]  # latent (height, width): 64² px … 768×1280 px


def shifted(t: float, shift: float) -> float:
    """A fixed shift s: σ = s·t / (1 + (s − 1)·t) (SD3's time shift; exp(μ) = s in FLUX's form)."""
    return shift * t / (1 + (shift - 1) * t)


def flux_dev_mu(latent_height: int, latent_width: int) -> float:
    """FLUX.1-dev's μ: linear in image tokens from 0.5 at 256 to 1.15 at 4096 (BFL's get_schedule)."""
    tokens = (latent_height * 8 // 16) * (latent_width * 8 // 16)
    return 0.5 + (1.15 - 0.5) * (tokens - 256) / (4096 - 256)


def linspace_steps(steps: int) -> list[float]:
    return [1 - i / steps for i in range(steps)]


def expected_sigmas(family: str, steps: int, latent_size) -> list[float]:
    if family == "flux_schnell":  # shift 1.0: the plain linear schedule
        return linspace_steps(steps) + [0.0]
    if family in ("qwen_image_lightning", "z_image_turbo"):  # shift 3 at every size
        return [shifted(t, 3.0) for t in linspace_steps(steps)] + [0.0]
    if family in ("flux_turbo_alpha", "hyper_flux"):
        mu = flux_dev_mu(*latent_size)
        return [math.exp(mu) / (math.exp(mu) + (1 / t - 1)) for t in linspace_steps(steps)] + [0.0]
    if family == "sd35_large_turbo":
        # StableDiffusion3Pipeline passes no sigmas: the scheduler spaces `steps` points between its own
        # shifted σ_max = 1 and σ_min = shift(1/1000), then shifts them again.
        sigma_min = shifted(1 / 1000, 3.0)
        return [shifted(float(t), 3.0) for t in np.linspace(1.0, sigma_min, steps)] + [0.0]
    raise AssertionError(f"no expectation written for {family}")


@pytest.mark.parametrize("family", FLOW_FAMILIES)
@pytest.mark.parametrize("latent_size", LATENT_SIZES)
def test_sigmas_follow_the_card(family, latent_size):
    for steps in sorted(set(FAMILIES[family].flow.published_steps) | {1, 4}):
        sigmas = flow_sigmas(family, steps, 1.0, latent_size)
        assert sigmas == pytest.approx(expected_sigmas(family, steps, latent_size), abs=1e-6)


def test_dynamic_shift_moves_with_resolution_and_fixed_shifts_do_not():
    small, large = flow_sigmas("hyper_flux", 8, 1.0, (8, 8)), flow_sigmas("hyper_flux", 8, 1.0, (128, 128))
    assert all(a < b for a, b in zip(small[1:-1], large[1:-1]))  # more tokens, more time at high σ
    for family in ("flux_schnell", "sd35_large_turbo", "qwen_image_lightning", "z_image_turbo"):
        assert flow_sigmas(family, 4, 1.0, (8, 8)) == flow_sigmas(family, 4, 1.0, (128, 128))


def test_image_tokens_are_counted_like_the_pipelines():
    assert image_seq_len(128, 128) == 4096  # 1024² px: FLUX's max_image_seq_len
    assert image_seq_len(32, 32) == 256  # 256² px: its base_image_seq_len
    assert image_seq_len(16, 8) == 32


@pytest.mark.parametrize("family", FLOW_FAMILIES)
@pytest.mark.parametrize("strength", [0.25, 0.5, 0.6, 0.75, 1.0])
def test_img2img_keeps_the_steps_diffusers_img2img_pipelines_keep(family, strength):
    import diffusers

    pipeline = getattr(diffusers, {"sd35_large_turbo": "StableDiffusion3Img2ImgPipeline",
                                   "qwen_image_lightning": "QwenImageImg2ImgPipeline",
                                   "z_image_turbo": "ZImageImg2ImgPipeline"}.get(family, "FluxImg2ImgPipeline"))
    for steps in (1, 2, 3, 4, 8, 9, 16):
        full = flow_sigmas(family, steps, 1.0, (16, 16))
        # get_timesteps reads only the scheduler's timesteps (one per step) and order.
        scheduler = SimpleNamespace(timesteps=torch.arange(steps), order=1)
        kept_timesteps, kept = pipeline.get_timesteps(SimpleNamespace(scheduler=scheduler), steps, strength, "cpu")
        sigmas = flow_sigmas(family, steps, strength, (16, 16))
        assert len(sigmas) - 1 == kept == len(kept_timesteps)
        assert sigmas == full[steps - kept:]


def test_dynamic_shift_needs_the_latent():
    with pytest.raises(FewStepInputError, match="latent_image"):
        flow_sigmas("flux_turbo_alpha", 8, 1.0, None)
    assert flow_sigmas("flux_schnell", 4, 1.0, None) == flow_sigmas("flux_schnell", 4, 1.0, (8, 8))
    # Qwen-Image-Lightning shifts dynamically, but with base_shift = max_shift: μ = ln 3 at every size.
    assert flow_sigmas("qwen_image_lightning", 8, 1.0, None) == flow_sigmas("qwen_image_lightning", 8, 1.0, (128, 96))


def test_only_flux_dev_families_shift_by_size():
    assert [name for name in FLOW_FAMILIES if shift_depends_on_size(FAMILIES[name])] == ["flux_turbo_alpha", "hyper_flux"]


def test_flow_families_have_no_sd_timesteps():
    with pytest.raises(FewStepInputError, match="flow-matching"):
        reference_timesteps("flux_schnell", 4)
    with pytest.raises(FewStepInputError, match="not a flow-matching family"):
        flow_sigmas("lcm", 4)


@pytest.mark.parametrize("family", FLOW_FAMILIES)
def test_published_step_counts_give_decreasing_sigmas_to_zero(family):
    definition = FAMILIES[family]
    assert definition.default_steps == definition.flow.published_steps[0]
    for steps in definition.flow.published_steps:
        sigmas = flow_sigmas(family, steps, 1.0, (128, 128))
        assert len(sigmas) == steps + 1 and sigmas[0] == 1.0 and sigmas[-1] == 0.0
        assert all(a > b for a, b in zip(sigmas, sigmas[1:]))
