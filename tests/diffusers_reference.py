"""The numerical reference: a family's diffusers scheduler driven the way its pipeline drives it.

Text-to-image follows StableDiffusion(XL)Pipeline (latents = noise · init_noise_sigma); image-to-image
follows the img2img pipelines (LCM/TCD: set_timesteps(steps, strength); the others: get_timesteps
keeps the last int(steps · strength) steps and set_begin_index), then scheduler.add_noise. Per-step
noise comes from a CPU generator seeded seed + 1, as ComfyUI's default noise sampler on CPU.
"""
from __future__ import annotations

from typing import Callable

import torch

from comfyui_fewstep.fewstep.families import get_family
from comfyui_fewstep.fewstep.schedules import reference_scheduler

EpsilonFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (model input, t) → ε


def scheduler_for(family_name: str, steps: int, denoise: float):
    """(scheduler, timesteps to run) exactly as the family's diffusers pipeline sets them up."""
    family = get_family(family_name)
    scheduler = reference_scheduler(family)
    published = family.published_timesteps.get(steps)
    if family.timestep_rule == "lcm":
        kwargs = {"timesteps": list(published)} if published else {"num_inference_steps": steps}
        scheduler.set_timesteps(strength=denoise, **kwargs)
        timesteps, begin = scheduler.timesteps, 0
    else:
        if published:
            scheduler.set_timesteps(timesteps=list(published))
        elif "timestep_spacing" in family.scheduler_overrides:
            scheduler.set_timesteps(steps)
        else:
            # DMD2 beyond its published counts: LCMScheduler at the trailing timesteps, taken here
            # from EulerDiscreteScheduler's trailing spacing.
            euler = reference_scheduler(get_family("lightning"))
            euler.set_timesteps(steps)
            scheduler.set_timesteps(timesteps=[int(round(float(t))) for t in euler.timesteps])
        begin = steps - min(int(steps * denoise), steps)  # img2img pipelines' get_timesteps
        timesteps = scheduler.timesteps[begin:]
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(begin)
    return scheduler, timesteps


def reference_sample(family_name: str, steps: int, denoise: float, epsilon: EpsilonFn,
                     noise: torch.Tensor, image_latent: torch.Tensor | None, step_seed: int,
                     eta: float | None = None) -> tuple[list[int], torch.Tensor]:
    """Run the reference loop; returns (timesteps, final latents in diffusers units)."""
    family = get_family(family_name)
    scheduler, timesteps = scheduler_for(family_name, steps, denoise)
    if image_latent is None:
        latents = noise * scheduler.init_noise_sigma
    else:
        latents = scheduler.add_noise(image_latent, noise, timesteps[:1])
    generator = torch.Generator().manual_seed(step_seed)
    step_kwargs = {"eta": family.default_eta if eta is None else eta} if family.update_rule == "tcd" else {}
    with torch.no_grad():
        for t in timesteps:
            model_input = scheduler.scale_model_input(latents, t)
            latents = scheduler.step(epsilon(model_input, t), t, latents, generator=generator,
                                     **step_kwargs).prev_sample
    return [int(round(float(t))) for t in timesteps], latents
