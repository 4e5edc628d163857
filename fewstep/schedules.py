"""Timesteps and σ for each family, computed by the diffusers scheduler the family's card uses."""
from __future__ import annotations

import functools
import logging
import math
from typing import Sequence

import torch
from diffusers import schedulers as diffusers_schedulers

from .families import (
    LCM_ORIGINAL_INFERENCE_STEPS,
    SD_SCHEDULER_CONFIG,
    Family,
    FewStepInputError,
    get_family,
)

NUM_TRAIN_TIMESTEPS = int(SD_SCHEDULER_CONFIG["num_train_timesteps"])


def reference_scheduler(family: Family, **overrides):
    """The diffusers scheduler the family's model card builds from SD/SDXL's scheduler config."""
    scheduler_class = getattr(diffusers_schedulers, family.scheduler_class)
    return scheduler_class.from_config({**SD_SCHEDULER_CONFIG, **family.scheduler_overrides, **overrides})


def parse_timesteps(text: str) -> list[int] | None:
    """'999, 759, 499, 259' → [999, 759, 499, 259]; blank → None."""
    text = text.strip().strip("[]")
    if not text:
        return None
    try:
        values = [int(part) for part in text.replace(",", " ").split()]
    except ValueError:
        raise FewStepInputError(
            f"timesteps: '{text}' is not a list of whole numbers; write them like '999, 759, 499, 259' "
            "or leave it empty for the family's schedule."
        ) from None
    return values


def _check_timesteps(timesteps: Sequence[int]) -> None:
    if any(not 0 <= t < NUM_TRAIN_TIMESTEPS for t in timesteps):
        raise FewStepInputError(
            f"timesteps: {list(timesteps)} has values outside 0–{NUM_TRAIN_TIMESTEPS - 1}; "
            "use training timesteps of the model."
        )
    if any(a <= b for a, b in zip(timesteps, timesteps[1:])):
        raise FewStepInputError(
            f"timesteps: {list(timesteps)} must strictly decrease (e.g. 999, 759, 499, 259)."
        )


def check_steps_and_denoise(steps: int, denoise: float) -> None:
    """What every schedule needs, discrete or flow-matching: a step, and denoise in (0, 1]."""
    if steps < 1:
        raise FewStepInputError(f"steps: {steps} — a schedule needs at least 1 step.")
    if not 0.0 < denoise <= 1.0:
        raise FewStepInputError(
            f"denoise: {denoise} — must be above 0 and at most 1 (1.0 is text-to-image, "
            "below 1 keeps part of the input latent)."
        )


def check_steps(family: Family, steps: int, denoise: float,
                original_inference_steps: int = LCM_ORIGINAL_INFERENCE_STEPS) -> None:
    """Raise FewStepInputError, naming the input and the fix, for step/denoise a family can't run."""
    check_steps_and_denoise(steps, denoise)
    if family.only_steps is not None and steps not in family.only_steps:
        allowed = ", ".join(str(s) for s in family.only_steps)
        raise FewStepInputError(
            f"steps: {steps} — the {family.display_name} was distilled for {allowed} step(s) only; "
            f"set steps to {family.only_steps[0]}."
        )
    if family.timestep_rule == "trailing" and int(steps * denoise) < 1:
        minimum = math.ceil(1 / steps * 100) / 100
        raise FewStepInputError(
            f"steps × denoise must be ≥ 1 for {family.name}: {steps} × {denoise:g} runs no step. "
            f"With {steps} steps use denoise ≥ {minimum:g}, or raise steps to {math.ceil(1 / denoise)}."
        )
    if family.timestep_rule == "lcm":
        if not 1 <= original_inference_steps <= NUM_TRAIN_TIMESTEPS:
            raise FewStepInputError(
                f"original_inference_steps: {original_inference_steps} — must be 1–{NUM_TRAIN_TIMESTEPS} "
                f"(the cards use {LCM_ORIGINAL_INFERENCE_STEPS})."
            )
        usable = int(original_inference_steps * denoise)
        if steps > usable and not family.published_timesteps.get(steps):
            raise FewStepInputError(
                f"steps: {steps} with denoise {denoise:g} — {family.name} picks its steps from "
                f"original_inference_steps × denoise = {original_inference_steps} × {denoise:g} = {usable} "
                f"timesteps; use at most {usable} steps or a higher denoise."
            )


def reference_timesteps(
    family_name: str,
    steps: int,
    denoise: float = 1.0,
    timesteps: Sequence[int] | None = None,
    original_inference_steps: int = LCM_ORIGINAL_INFERENCE_STEPS,
) -> list[int]:
    """The timesteps the family's reference pipeline runs for `steps` at `denoise`.

    `timesteps` replaces the schedule (as the cards' `timesteps=[…]` argument does) and is run as
    given: it sets its own start, so it takes no denoise (start the list lower for img2img).
    """
    family = get_family(family_name)
    if family.flow is not None:
        raise FewStepInputError(
            f"family: {family.name} is a flow-matching family; its σ depend on the image size and come from "
            "fewstep.flow_schedules.flow_sigmas, not from SD's 1000 training timesteps."
        )
    if timesteps is not None:
        timesteps = [int(t) for t in timesteps]
        _check_timesteps(timesteps)
        if denoise != 1.0:
            raise FewStepInputError(
                f"denoise: {denoise:g} with an explicit timesteps list — the list sets where sampling "
                "starts; leave denoise at 1.0 and start the list lower (e.g. 499, 259) for img2img."
            )
        return timesteps
    return list(_family_timesteps(family.name, steps, denoise, original_inference_steps))


# ComfyUI validates every queued prompt (FewStepScheduler.validate_inputs computes the schedule) and
# building a diffusers scheduler takes about a millisecond; the answer depends on the arguments alone
# (FAMILIES is fixed at import). Invalid arguments raise, and exceptions are not cached.
@functools.lru_cache(maxsize=1024)
def _family_timesteps(family_name: str, steps: int, denoise: float, original_inference_steps: int) -> tuple[int, ...]:
    family = get_family(family_name)
    check_steps(family, steps, denoise, original_inference_steps)

    published = family.published_timesteps.get(steps)
    if family.timestep_rule == "lcm":
        scheduler = reference_scheduler(family, original_inference_steps=original_inference_steps)
        # LatentConsistencyModelImg2ImgPipeline: set_timesteps(steps, strength=denoise), with the
        # original_inference_steps from the config (passing it to set_timesteps switches TCD to another grid).
        kwargs = {"timesteps": list(published)} if published else {"num_inference_steps": steps}
        with _quiet_diffusers():
            scheduler.set_timesteps(strength=denoise, **kwargs)
        return tuple(int(t) for t in scheduler.timesteps)

    # Trailing spacing: the full schedule, then diffusers' img2img get_timesteps keeps the last
    # int(steps · denoise) of it.
    full = list(published) if published else trailing_timesteps(steps)
    kept = min(int(steps * denoise), steps)
    return tuple(full[steps - kept:])


def trailing_timesteps(steps: int) -> list[int]:
    """diffusers' "trailing" spacing (Lin et al. 2023, table 2): 999, 749, 499, 249 for 4 steps.

    DDIMScheduler computes it; Euler and EulerAncestral compute the same integers, and DMD2's
    LCMScheduler has no spacing option, so one scheduler serves every trailing family.
    """
    scheduler = diffusers_schedulers.DDIMScheduler.from_config(
        {**SD_SCHEDULER_CONFIG, "timestep_spacing": "trailing"}
    )
    scheduler.set_timesteps(steps)
    return [int(t) for t in scheduler.timesteps]


class _quiet_diffusers:
    """LCMScheduler warns when custom timesteps (DMD2's, Hyper-SD's 800) are off its 50-step grid;
    the cards choose them deliberately, so the warning would only alarm users."""

    def __enter__(self):
        self._logger = logging.getLogger("diffusers.schedulers.scheduling_lcm")
        self._level = self._logger.level
        self._logger.setLevel(logging.ERROR)

    def __exit__(self, *exc):
        self._logger.setLevel(self._level)


class DiscreteNoiseSchedule:
    """σ(t) = sqrt((1 − ᾱ_t) / ᾱ_t) over the training timesteps, and its inverse.

    Built from the model's own σ table in ComfyUI (ModelSamplingDiscrete.sigmas) or from a diffusers
    scheduler's alphas_cumprod in tests, so the sampler reads timesteps the same way the model does.
    """

    def __init__(self, sigmas: torch.Tensor):
        self.sigmas = sigmas.detach().to(torch.float32).cpu()
        self.log_sigmas = self.sigmas.log()

    @classmethod
    def from_alphas_cumprod(cls, alphas_cumprod: torch.Tensor) -> "DiscreteNoiseSchedule":
        return cls(((1 - alphas_cumprod) / alphas_cumprod) ** 0.5)

    @classmethod
    def reference(cls) -> "DiscreteNoiseSchedule":
        return cls.from_alphas_cumprod(reference_scheduler(get_family("lcm")).alphas_cumprod)

    def sigma(self, timestep: int) -> float:
        return float(self.sigmas[int(timestep)])

    def timestep(self, sigma: float) -> int:
        """Nearest training timestep in log σ, as ComfyUI's ModelSamplingDiscrete.timestep does."""
        return int((math.log(float(sigma)) - self.log_sigmas).abs().argmin())

    def sigmas_for(self, timesteps: Sequence[int]) -> torch.Tensor:
        """ComfyUI SIGMAS for these timesteps: σ(t) each, then 0 for the clean end."""
        return torch.tensor([self.sigma(t) for t in timesteps] + [0.0], dtype=torch.float32)
