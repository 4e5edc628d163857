"""The σ-space update rules against diffusers' schedulers, with a stand-in ε-model (ComfyUI-free).

The stand-in is a fixed nonlinear map of (x_t, t), so a mismatch in how a rule reads the sample,
the timestep or the noise shows up; the UNet itself is exercised by the integration tests.
"""
import math

import pytest
import torch

from comfyui_fewstep.fewstep import update_rules
from comfyui_fewstep.fewstep.families import get_family
from comfyui_fewstep.fewstep.schedules import DiscreteNoiseSchedule, reference_timesteps
from diffusers_reference import ACCEPTANCE_GRID, reference_sample

SHAPE = (1, 4, 8, 8)
SEED = 1234
MIXING = torch.randn(4, 4, generator=torch.Generator().manual_seed(7))


def epsilon_model(sample: torch.Tensor, timestep) -> torch.Tensor:
    mixed = torch.einsum("ij,bjhw->bihw", MIXING, sample) / 2
    return torch.tanh(mixed + float(timestep) / 1000.0)


def ours(family_name, steps, denoise, noise, image_latent):
    family = get_family(family_name)
    schedule = DiscreteNoiseSchedule.reference()
    timesteps = reference_timesteps(family_name, steps, denoise)
    sigmas = schedule.sigmas_for(timesteps)
    latent = torch.zeros(SHAPE) if image_latent is None else image_latent
    sigma0 = float(sigmas[0])
    if update_rules.starts_from_unit_variance(family.initial_noise, latent):
        x = latent + noise * math.sqrt(1 + sigma0**2)
    else:
        x = latent + noise * sigma0
    # diffusers' sample is x / sqrt(1 + σ²) for every scheduler here (Euler's scale_model_input).
    def denoise_fn(x, sigma):
        s = float(sigma[0])
        epsilon = epsilon_model(x / math.sqrt(1 + s**2), schedule.timestep(s))
        return x - s * epsilon

    generator = torch.Generator().manual_seed(SEED + 1)
    noise_fn = lambda: torch.randn(SHAPE, generator=generator)
    result = update_rules.sample(family.update_rule, denoise_fn, x, sigmas, schedule, noise_fn, eta=family.default_eta)
    return timesteps, result




@pytest.mark.parametrize("family_name,steps,denoise", ACCEPTANCE_GRID)
def test_rule_matches_diffusers_scheduler(family_name, steps, denoise):
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(SEED))
    image_latent = None if denoise == 1.0 else torch.randn(SHAPE, generator=torch.Generator().manual_seed(99))
    expected_timesteps, expected = reference_sample(
        family_name, steps, denoise, epsilon_model, noise, image_latent, step_seed=SEED + 1
    )
    timesteps, result = ours(family_name, steps, denoise, noise, image_latent)
    assert timesteps == expected_timesteps
    # fp32 σ tables differ from diffusers' in the last bits; the rules themselves are exact.
    assert (result - expected).abs().max().item() < 1e-4
