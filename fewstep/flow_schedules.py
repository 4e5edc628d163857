"""σ for the flow-matching families, from diffusers' FlowMatchEulerDiscreteScheduler as each pipeline sets it up.

ComfyUI's flow models (Flux, SD3, Qwen-Image, Z-Image) sample with model_sampling CONST: x = (1 − σ)·x₀ + σ·ε
and the model is called at timestep σ (ModelSamplingFlux) or σ·multiplier (ModelSamplingDiscreteFlow) — the
same σ diffusers' scheduler steps through, which its pipelines hand the transformer as σ (FLUX, /1000) or
σ·1000 (SD3). Those timestep maps ignore the model's `shift`, so SIGMAS computed here are used as they are,
whatever ModelSamplingFlux/SD3/AuraFlow node sits on the model: the shift is applied once, here.
"""
from __future__ import annotations

import functools

import numpy as np
from diffusers import FlowMatchEulerDiscreteScheduler

from .families import Family, FewStepInputError, get_family
from .schedules import check_steps_and_denoise

# The VAE's 8× downsampling and the transformers' 2×2 patches: one image token per 16×16 pixels.
LATENT_PIXELS = 8
PATCH = 2


def image_seq_len(latent_height: int, latent_width: int) -> int:
    """Image tokens of a latent, as the pipelines count them: (height // 16) · (width // 16) in pixels
    (FluxPipeline: the packed latents' length; ZImagePipeline: (h // 2)·(w // 2) of its latents)."""
    return (latent_height // PATCH) * (latent_width // PATCH)


def calculate_shift(seq_len: int, config) -> float:
    """μ for dynamic shifting: linear in the image token count (FluxPipeline's calculate_shift, with
    the config's defaults as the pipelines read them)."""
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift as pipeline_calculate_shift

    return pipeline_calculate_shift(
        seq_len, config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096),
        config.get("base_shift", 0.5), config.get("max_shift", 1.15),
    )


def uses_dynamic_shift(family: Family) -> bool:
    return bool(family.scheduler_overrides.get("use_dynamic_shifting"))


def shift_depends_on_size(family: Family) -> bool:
    """Whether the family's σ depend on the image size: dynamic shifting with μ moving between base_shift
    and max_shift. Qwen-Image-Lightning's config shifts dynamically with base_shift = max_shift, so its μ
    is the same at every size and it needs no latent."""
    if not uses_dynamic_shift(family):
        return False
    config = flow_scheduler(family).config
    return config.base_shift != config.max_shift


def flow_scheduler(family: Family) -> FlowMatchEulerDiscreteScheduler:
    return FlowMatchEulerDiscreteScheduler.from_config(dict(family.scheduler_overrides))


def img2img_start(steps: int, denoise: float) -> int:
    """The first step an img2img pipeline runs at strength `denoise` (StableDiffusion3Img2ImgPipeline's
    get_timesteps, copied into the Flux, Qwen-Image and Z-Image img2img pipelines): int(steps − steps·strength),
    so 1 step at 0.5 still runs its one step, from σ₀ = 1."""
    init_timestep = min(steps * denoise, steps)
    return int(max(steps - init_timestep, 0))


def check_flow_steps(family: Family, steps: int, denoise: float) -> None:
    check_steps_and_denoise(steps, denoise)


def flow_sigmas(family_name: str, steps: int, denoise: float = 1.0,
                latent_size: tuple[int, int] | None = None) -> list[float]:
    """The σ the family's pipeline steps through for `steps` at `denoise`, ending in 0.

    `latent_size` (latent height, width) sets the dynamic shift of families whose card uses one that
    moves with the size (shift_depends_on_size); the others' σ do not depend on it.
    """
    family = get_family(family_name)
    if family.flow is None:
        raise FewStepInputError(f"family: {family.name} is not a flow-matching family.")
    check_flow_steps(family, steps, denoise)
    seq_len = None
    if uses_dynamic_shift(family):
        if latent_size is None and shift_depends_on_size(family):
            raise FewStepInputError(
                f"latent_image: {family.display_name} shifts its σ by the image size (dynamic shifting); "
                "connect the latent being sampled (e.g. the Empty SD3 Latent Image) to the scheduler."
            )
        # Where μ is the same at every size, any token count gives it: the config's base one.
        seq_len = (image_seq_len(*latent_size) if latent_size is not None
                   else flow_scheduler(family).config.base_image_seq_len)
    return list(_flow_sigmas(family.name, steps, denoise, seq_len))


# validate_inputs runs the schedule for every queued prompt; the answer depends on the arguments alone.
@functools.lru_cache(maxsize=1024)
def _flow_sigmas(family_name: str, steps: int, denoise: float, seq_len: int | None) -> tuple[float, ...]:
    family = get_family(family_name)
    scheduler = flow_scheduler(family)
    kwargs = {}
    if family.flow.sigma_rule == "linspace":
        kwargs["sigmas"] = np.linspace(1.0, 1 / steps, steps)
    if seq_len is not None:
        kwargs["mu"] = calculate_shift(seq_len, scheduler.config)
    scheduler.set_timesteps(steps, **kwargs)
    return tuple(float(s) for s in scheduler.sigmas[img2img_start(steps, denoise):])
