"""The families' update rules, in ComfyUI's (k-diffusion) space, equal to the diffusers schedulers.

ComfyUI samples x = x₀ + σ·ε with a model that returns the x₀ prediction ("denoised"); diffusers'
DDPM-style schedulers work on x_t = x / sqrt(1 + σ²). Each rule below is the diffusers step rewritten
in σ-space (derivations in the comments), because diffusers' schedulers draw their own noise and keep
their own step index, while ComfyUI's samplers draw from its noise sampler; ComfyUI's own sample_lcm
lacks LCM's boundary condition and it has no TCD rule.
"""
from __future__ import annotations

import math
from typing import Callable, Protocol, Sequence

import torch

from .families import UpdateRule

# LCMScheduler's defaults (Song et al., consistency models; LCM paper eq. 9).
LCM_TIMESTEP_SCALING = 10.0
LCM_SIGMA_DATA = 0.5

DenoiseFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x, σ) → x₀ prediction
NoiseFn = Callable[[], torch.Tensor]  # the next per-step noise draw, shaped like x
StepCallback = Callable[[int, torch.Tensor, torch.Tensor, float], None]  # (i, x, denoised, σ)


class NoiseSchedule(Protocol):
    def sigma(self, timestep: int) -> float: ...
    def timestep(self, sigma: float) -> int: ...


def lcm_boundary_condition(timestep: int, timestep_scaling: float = LCM_TIMESTEP_SCALING,
                           sigma_data: float = LCM_SIGMA_DATA) -> tuple[float, float]:
    """(c_skip, c_out) of LCMScheduler.get_scalings_for_boundary_condition_discrete."""
    scaled = timestep * timestep_scaling
    c_skip = sigma_data**2 / (scaled**2 + sigma_data**2)
    c_out = scaled / (scaled**2 + sigma_data**2) ** 0.5
    return c_skip, c_out


def sample(
    rule: UpdateRule,
    denoise: DenoiseFn,
    x: torch.Tensor,
    sigmas: Sequence[float] | torch.Tensor,
    schedule: NoiseSchedule,
    noise: NoiseFn,
    eta: float | None = None,
    callback: StepCallback | None = None,
) -> torch.Tensor:
    """Run `rule` over `sigmas` (ending in 0) from the noised latent `x`; returns the final latent.

    `noise` is called once per step that adds noise, in order, like diffusers' generator draws.
    """
    sigmas = [float(s) for s in sigmas]
    steps = len(sigmas) - 1
    for i in range(steps):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        sigma_tensor = x.new_full((x.shape[0],), sigma)
        denoised = denoise(x, sigma_tensor)
        if callback is not None:
            callback(i, x, denoised, sigma)
        x = _STEPS[rule](x, denoised, sigma, sigma_next, schedule, noise, eta)
    return x


def _euler_step(x, denoised, sigma, sigma_next, schedule, noise, eta):
    # EulerDiscreteScheduler.step (s_churn 0): derivative (x − x₀)/σ, dt = σ_next − σ.
    derivative = (x - denoised) / sigma
    return x + derivative * (sigma_next - sigma)


def _euler_ancestral_step(x, denoised, sigma, sigma_next, schedule, noise, eta):
    # EulerAncestralDiscreteScheduler.step: σ_up² = σ_next²(σ² − σ_next²)/σ², σ_down² = σ_next² − σ_up².
    sigma_up = (sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2) ** 0.5
    sigma_down = (sigma_next**2 - sigma_up**2) ** 0.5
    derivative = (x - denoised) / sigma
    x = x + derivative * (sigma_down - sigma)
    if sigma_next > 0:
        x = x + noise() * sigma_up
    return x


def _lcm_step(x, denoised, sigma, sigma_next, schedule, noise, eta):
    # LCMScheduler.step: x₀' = c_out·x₀ + c_skip·x_t, with x_t = x / sqrt(1 + σ²) its sample;
    # then x_prev = sqrt(ᾱ_prev)·x₀' + sqrt(1 − ᾱ_prev)·z, which is x₀' + σ_next·z in σ-space.
    c_skip, c_out = lcm_boundary_condition(schedule.timestep(sigma))
    consistent = c_out * denoised + c_skip * x / math.sqrt(1 + sigma**2)
    if sigma_next > 0:
        return consistent + noise() * sigma_next
    return consistent


def _tcd_step(x, denoised, sigma, sigma_next, schedule, noise, eta):
    # TCDScheduler.step with gamma = eta: s = floor((1 − γ)·t_prev);
    # x_s = sqrt(ᾱ_s)·x₀ + sqrt(1 − ᾱ_s)·ε̂ is x₀ + σ_s·ε̂ in σ-space, and the stochastic jump
    # sqrt(ᾱ_prev/ᾱ_s)·x_s + sqrt(1 − ᾱ_prev/ᾱ_s)·z is x_s + sqrt(σ_next² − σ_s²)·z.
    gamma = 0.0 if eta is None else float(eta)
    timestep_prev = schedule.timestep(sigma_next) if sigma_next > 0 else 0
    timestep_s = math.floor((1 - gamma) * timestep_prev)
    sigma_s = schedule.sigma(timestep_s)
    epsilon = (x - denoised) / sigma
    noised = denoised + sigma_s * epsilon
    if sigma_next > 0:
        if gamma > 0:
            noised = noised + noise() * math.sqrt(max(sigma_next**2 - sigma_s**2, 0.0))
        return noised
    # The last step returns x_s at t = 0 in diffusers' own space (ᾱ_0 < 1), which the pipelines
    # decode as the image; reproduce that rather than the clean x₀.
    return noised / math.sqrt(1 + sigma_s**2)


def _ddim_step(x, denoised, sigma, sigma_next, schedule, noise, eta):
    # DDIMScheduler.step with eta 0 is TCD's step with gamma 0: x_prev = x₀ + σ_prev·ε̂, and its last
    # step lands on ᾱ_0 (set_alpha_to_one is False in SD's config), not on the clean x₀.
    return _tcd_step(x, denoised, sigma, sigma_next, schedule, noise, 0.0)


_STEPS = {
    "euler": _euler_step,
    "ddim": _ddim_step,
    "euler_ancestral": _euler_ancestral_step,
    "lcm": _lcm_step,
    "tcd": _tcd_step,
}


def starts_from_unit_variance(initial_noise: str, latent: torch.Tensor) -> bool:
    """Whether the first x is noise·sqrt(1 + σ₀²) (else latent + noise·σ₀), as the family's pipeline does.

    From an empty latent (text-to-image) DDPM-style schedulers start from unit noise in their own
    space, which is noise·sqrt(1 + σ₀²) here, whatever σ₀ is (Hyper-SDXL's 1-step UNet starts at
    t = 800); Euler with trailing spacing starts from noise·σ₀. With an image (img2img) every
    scheduler's add_noise gives latent + σ₀·noise. "Empty" is ComfyUI's own test: all zeros.
    """
    return initial_noise == "unit_variance" and not bool(latent.any())
