"""The numerical reference: a family's diffusers scheduler driven the way its pipeline drives it.

Text-to-image follows StableDiffusion(XL)Pipeline (latents = noise · init_noise_sigma); image-to-image
follows the img2img pipelines (LCM/TCD: set_timesteps(steps, strength); the others: get_timesteps
keeps the last int(steps · strength) steps and set_begin_index), then scheduler.add_noise. Per-step
noise comes from a CPU generator seeded seed + 1, as ComfyUI's default noise sampler on CPU.
"""
from __future__ import annotations

from typing import Callable

import torch

import pack  # noqa: F401 — registers `comfyui_fewstep`
from comfyui_fewstep.fewstep.families import FAMILIES, get_family
from comfyui_fewstep.fewstep.schedules import reference_scheduler

IMAGE_SIZE = 64  # an 8×8 latent for the tiny models: the sampling maths does not depend on size

# The schedules issue's acceptance grid: every family × steps 1, 2, 4, 8 × denoise 1.0 and 0.5, where
# steps · denoise ≥ 1 and the family was distilled for that many steps.
ACCEPTANCE_GRID = [
    (name, steps, denoise)
    for name, family in FAMILIES.items()
    for steps in (1, 2, 4, 8)
    for denoise in (1.0, 0.5)
    if family.flow is None  # the flow-matching families' grid is in flow_reference.py
    and steps * denoise >= 1 and (family.only_steps is None or steps in family.only_steps)
]

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

    def sample(self, family: str, steps: int, denoise: float, prompt: str, seed: int, cfg: float = 1.0,
               negative: str = "", image_latent: torch.Tensor | None = None):
        """(timesteps, final latent in diffusers units) from ComfyUI's noise for `seed`.

        `image_latent` is in ComfyUI units (as LoadLatent gives it), scaled here as ComfyUI does.
        """
        latent_size = IMAGE_SIZE // 8
        # comfy.sample.prepare_noise: a CPU generator seeded with the seed.
        noise = torch.randn((1, 4, latent_size, latent_size), generator=torch.manual_seed(seed))
        image = None if image_latent is None else image_latent * self.tiny.latent_scale
        return reference_sample(family, steps, denoise, self.epsilon_fn(prompt, negative, cfg), noise, image,
                                step_seed=seed + 1)
