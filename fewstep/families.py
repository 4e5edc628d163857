"""One definition per few-step family: how its authors sampled it, as diffusers reproduces it.

Adding a family means adding one `Family` entry to `FAMILIES`; the scheduler, sampler, one-node
sampler, loaders and frontend all read from here.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal, Mapping

# How the sampler turns the model's x0 prediction into the next latent (see update_rules.py). The
# flow-matching families use "euler": with ComfyUI's x0 = x − σ·v, Euler's x + (σ_next − σ)·(x − x0)/σ is
# FlowMatchEulerDiscreteScheduler.step's x + (σ_next − σ)·v.
UpdateRule = Literal["euler", "euler_ancestral", "ddim", "lcm", "tcd"]

# How the first latent is made from noise when sampling from an empty latent:
# "unit_variance": diffusers' DDPM-style schedulers start from N(0, 1) in their own (scaled) space,
#                  i.e. noise · sqrt(1 + σ₀²) in ComfyUI's space (init_noise_sigma = 1.0).
# "sigma":         diffusers' Euler schedulers with trailing spacing start from noise · σ₀
#                  (init_noise_sigma = max σ of the schedule), where ComfyUI would use sqrt(1 + σ₀²).
InitialNoise = Literal["unit_variance", "sigma"]


@dataclass(frozen=True)
class Family:
    name: str
    display_name: str
    # The diffusers scheduler class the model cards use, and what they change in SD/SDXL's config
    # (flow families: the whole scheduler config the card's pipeline loads).
    scheduler_class: str
    scheduler_overrides: Mapping[str, object]
    # "lcm": the scheduler's own set_timesteps(steps, strength=denoise) (LCM img2img pipeline).
    # "trailing": the scheduler's full schedule for `steps`, of which img2img runs the last
    #             int(steps · denoise) steps (diffusers' img2img get_timesteps).
    # "flow": σ from FlowMatchEulerDiscreteScheduler as `flow` says (fewstep/flow_schedules.py).
    timestep_rule: Literal["lcm", "trailing", "flow"]
    update_rule: UpdateRule
    initial_noise: InitialNoise
    default_steps: int
    default_cfg: float
    reference: str
    # Timesteps a model card publishes for a given step count; they win over the computed spacing.
    published_timesteps: Mapping[int, tuple[int, ...]] = field(default_factory=dict)
    # TCD's gamma; None where the rule has no stochasticity parameter.
    default_eta: float | None = None
    # Step counts the family was distilled for (the one the card names first is the default).
    only_steps: tuple[int, ...] | None = None
    # Flow-matching families only: how their pipeline builds σ (None for the SD1.5/SDXL families).
    flow: "FlowSampling | None" = None


@dataclass(frozen=True)
class FlowSampling:
    """How a flow-matching family's diffusers pipeline sets up FlowMatchEulerDiscreteScheduler."""

    # ComfyUI's model config classes (comfy.supported_models) of the base the family runs on.
    architectures: tuple[str, ...]
    # "linspace": the pipeline passes sigmas=np.linspace(1, 1/steps, steps) to set_timesteps
    #             (FluxPipeline, QwenImagePipeline, ZImagePipeline);
    # "scheduler": set_timesteps(steps) spaces the scheduler's own σ range (StableDiffusion3Pipeline).
    sigma_rule: Literal["linspace", "scheduler"]
    # Step counts the cards publish; the parity tests run each.
    published_steps: tuple[int, ...]
    # The guidance-embedding value of guidance-distilled bases (FLUX.1-dev: FluxGuidance), else None.
    guidance: float | None = None
    # The LoRA scale the card fuses with (pipe.fuse_lora(lora_scale=…)); None for full models.
    lora_scale: float | None = None


# SD 1.5 and SDXL ship the same training noise schedule; the cards build their schedulers from it.
SD_SCHEDULER_CONFIG: Mapping[str, object] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "steps_offset": 1,
    "set_alpha_to_one": False,
    "clip_sample": False,
    "timestep_spacing": "leading",
    "prediction_type": "epsilon",
}

LCM_ORIGINAL_INFERENCE_STEPS = 50  # LCMScheduler's default, as in the LCM and LCM-LoRA cards.

FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        Family(
            name="lcm",
            display_name="LCM / LCM-LoRA",
            scheduler_class="LCMScheduler",
            scheduler_overrides={},
            timestep_rule="lcm",
            update_rule="lcm",
            initial_noise="unit_variance",
            default_steps=4,
            default_cfg=1.0,
            reference="latent-consistency/lcm-lora-sdv1-5, lcm-lora-sdxl: LCMScheduler, 4 steps, guidance 1.0",
        ),
        Family(
            name="tcd",
            display_name="TCD (Trajectory Consistency Distillation)",
            scheduler_class="TCDScheduler",
            scheduler_overrides={},
            timestep_rule="lcm",
            update_rule="tcd",
            initial_noise="unit_variance",
            default_steps=4,
            default_cfg=1.0,
            default_eta=0.3,
            reference="h1t/TCD-SD15-LoRA, TCD-SDXL-LoRA: TCDScheduler, 4 steps, eta (gamma) 0.3, guidance 0",
        ),
        Family(
            name="turbo",
            display_name="SD-Turbo / SDXL-Turbo (ADD)",
            scheduler_class="EulerAncestralDiscreteScheduler",
            scheduler_overrides={"timestep_spacing": "trailing"},
            timestep_rule="trailing",
            update_rule="euler_ancestral",
            initial_noise="sigma",
            default_steps=1,
            default_cfg=1.0,
            reference="stabilityai/sdxl-turbo: EulerAncestral, trailing, 1 step at 512², guidance 0",
        ),
        Family(
            name="lightning",
            display_name="SDXL-Lightning",
            scheduler_class="EulerDiscreteScheduler",
            scheduler_overrides={"timestep_spacing": "trailing"},
            timestep_rule="trailing",
            update_rule="euler",
            initial_noise="sigma",
            default_steps=4,
            default_cfg=1.0,
            reference="ByteDance/SDXL-Lightning: EulerDiscrete, trailing, guidance 0 (1-step UNet: x0 prediction)",
        ),
        Family(
            name="hyper_sd",
            display_name="Hyper-SD (2/4/8/12-step LoRA)",
            scheduler_class="DDIMScheduler",
            scheduler_overrides={"timestep_spacing": "trailing"},
            timestep_rule="trailing",
            update_rule="ddim",
            initial_noise="unit_variance",
            default_steps=8,
            default_cfg=1.0,
            reference="ByteDance/Hyper-SD: DDIMScheduler, trailing, guidance 0 (CFG LoRAs: 5–8)",
        ),
        Family(
            name="hyper_sd_1step",
            display_name="Hyper-SD 1-step LoRA",
            scheduler_class="TCDScheduler",
            scheduler_overrides={},
            timestep_rule="lcm",
            update_rule="tcd",
            initial_noise="unit_variance",
            default_steps=1,
            default_cfg=1.0,
            default_eta=1.0,
            reference="ByteDance/Hyper-SD 1-step LoRA: TCDScheduler, eta 1.0, guidance 0",
        ),
        Family(
            name="hyper_sd_1step_unet",
            display_name="Hyper-SDXL 1-step UNet",
            scheduler_class="LCMScheduler",
            scheduler_overrides={},
            timestep_rule="lcm",
            update_rule="lcm",
            initial_noise="unit_variance",
            default_steps=1,
            default_cfg=1.0,
            published_timesteps={1: (800,)},
            only_steps=(1,),
            reference="ByteDance/Hyper-SD Hyper-SDXL-1step-Unet: LCMScheduler, timesteps [800], guidance 0",
        ),
        Family(
            name="dmd2",
            display_name="DMD2",
            scheduler_class="LCMScheduler",
            scheduler_overrides={},
            timestep_rule="trailing",
            update_rule="lcm",
            initial_noise="unit_variance",
            default_steps=4,
            default_cfg=1.0,
            # 4-step card: timesteps [999, 749, 499, 249]; 1-step card: [399]. Other counts: trailing.
            published_timesteps={4: (999, 749, 499, 249), 1: (399,)},
            reference="tianweiy/DMD2: LCMScheduler, timesteps [999, 749, 499, 249], guidance 0",
        ),
    )
}

# FlowMatchEulerDiscreteScheduler configs, as the base models' repositories ship them
# (scheduler/scheduler_config.json) or the distillation cards set them.
FLUX_SCHNELL_SCHEDULER: Mapping[str, object] = {  # black-forest-labs/FLUX.1-schnell
    "num_train_timesteps": 1000, "shift": 1.0, "use_dynamic_shifting": False,
    "base_shift": 0.5, "max_shift": 1.15, "base_image_seq_len": 256, "max_image_seq_len": 4096,
}
FLUX_DEV_SCHEDULER: Mapping[str, object] = {  # black-forest-labs/FLUX.1-dev: shift by image token count
    "num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": True,
    "base_shift": 0.5, "max_shift": 1.15, "base_image_seq_len": 256, "max_image_seq_len": 4096,
}
SD35_SCHEDULER: Mapping[str, object] = {  # stabilityai/stable-diffusion-3.5-large(-turbo)
    "num_train_timesteps": 1000, "shift": 3.0,
}
# ModelTC/Qwen-Image-Lightning generate_with_diffusers.py: "We use shift=3 in distillation" — dynamic
# shifting with base_shift = max_shift = ln 3 gives exp(μ) = 3 at every resolution.
QWEN_IMAGE_LIGHTNING_SCHEDULER: Mapping[str, object] = {
    "num_train_timesteps": 1000, "shift": 1.0, "use_dynamic_shifting": True, "time_shift_type": "exponential",
    "base_shift": math.log(3), "max_shift": math.log(3), "base_image_seq_len": 256, "max_image_seq_len": 8192,
    "shift_terminal": None, "invert_sigmas": False, "stochastic_sampling": False,
    "use_karras_sigmas": False, "use_exponential_sigmas": False, "use_beta_sigmas": False,
}
Z_IMAGE_TURBO_SCHEDULER: Mapping[str, object] = {  # Tongyi-MAI/Z-Image-Turbo (ComfyUI's ZImage: shift 3.0 too)
    "num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": False,
}


def _flow_family(name: str, display_name: str, scheduler_config: Mapping[str, object], flow: FlowSampling,
                 reference: str) -> Family:
    """A flow-matching family: Euler on the velocity (FlowMatchEulerDiscreteScheduler.step), started from
    σ₀·noise + (1 − σ₀)·image (its scale_noise; σ₀ = 1 for text-to-image), no CFG at the cards' settings."""
    return Family(
        name=name, display_name=display_name, scheduler_class="FlowMatchEulerDiscreteScheduler",
        scheduler_overrides=scheduler_config, timestep_rule="flow", update_rule="euler", initial_noise="sigma",
        default_steps=flow.published_steps[0], default_cfg=1.0, reference=reference, flow=flow,
    )


FAMILIES.update({
    f.name: f
    for f in (
        _flow_family(
            "flux_schnell", "FLUX.1-schnell", FLUX_SCHNELL_SCHEDULER,
            FlowSampling(architectures=("FluxSchnell",), sigma_rule="linspace", published_steps=(4, 1, 2, 3)),
            "black-forest-labs/FLUX.1-schnell: FluxPipeline, 1–4 steps (card: 4), guidance_scale 0, "
            "max_sequence_length 256; shift 1.0, no dynamic shifting",
        ),
        _flow_family(
            "sd35_large_turbo", "SD3.5 Large Turbo", SD35_SCHEDULER,
            FlowSampling(architectures=("SD3",), sigma_rule="scheduler", published_steps=(4,)),
            "stabilityai/stable-diffusion-3.5-large-turbo: StableDiffusion3Pipeline, 4 steps, guidance_scale 0; shift 3.0",
        ),
        _flow_family(
            "qwen_image_lightning", "Qwen-Image-Lightning (4/8-step LoRA)", QWEN_IMAGE_LIGHTNING_SCHEDULER,
            FlowSampling(architectures=("QwenImage",), sigma_rule="linspace", published_steps=(8, 4), lora_scale=1.0),
            "lightx2v/Qwen-Image-Lightning: QwenImagePipeline, 8 or 4 steps, true_cfg_scale 1; the distillation "
            "scheduler (dynamic shift, base_shift = max_shift = ln 3, exponential, no shift_terminal)",
        ),
        _flow_family(
            "flux_turbo_alpha", "FLUX.1-Turbo-Alpha (8-step LoRA)", FLUX_DEV_SCHEDULER,
            FlowSampling(architectures=("Flux",), sigma_rule="linspace", published_steps=(8,), guidance=3.5,
                         lora_scale=1.0),
            "alimama-creative/FLUX.1-Turbo-Alpha: FluxPipeline on FLUX.1-dev, 8 steps, guidance_scale 3.5 "
            "(distilled guidance), lora_scale 1; FLUX.1-dev's dynamic shift (base 0.5, max 1.15 by image tokens)",
        ),
        _flow_family(
            "hyper_flux", "Hyper-FLUX.1-dev (8/16-step LoRA)", FLUX_DEV_SCHEDULER,
            FlowSampling(architectures=("Flux",), sigma_rule="linspace", published_steps=(8, 16), guidance=3.5,
                         lora_scale=0.125),
            "ByteDance/Hyper-SD Hyper-FLUX.1-dev-8steps/16steps-lora: FluxPipeline on FLUX.1-dev, "
            "fuse_lora(lora_scale=0.125), 8 or 16 steps, guidance_scale 3.5; FLUX.1-dev's dynamic shift",
        ),
        _flow_family(
            "z_image_turbo", "Z-Image-Turbo", Z_IMAGE_TURBO_SCHEDULER,
            # The card's 9 steps are 9 transformer calls in diffusers 0.42's ZImagePipeline, which passes
            # sigmas linspace(1, 1/9, 9) (get_default_z_image_sigmas) like FluxPipeline.
            FlowSampling(architectures=("ZImage",), sigma_rule="linspace", published_steps=(9,)),
            "Tongyi-MAI/Z-Image-Turbo: ZImagePipeline, num_inference_steps 9, guidance_scale 0; shift 3.0",
        ),
    )
})

FAMILY_NAMES: tuple[str, ...] = tuple(FAMILIES)


class FewStepInputError(ValueError):
    """Something the user set is wrong; the message names the input and what to do."""


def get_family(name: str) -> Family:
    try:
        return FAMILIES[name]
    except KeyError:
        raise FewStepInputError(
            f"family: '{name}' is not a FewStep family (a workflow saved by another version may use "
            f"an old name). Choose one of: {', '.join(FAMILY_NAMES)}."
        ) from None


@dataclass(frozen=True)
class FewStepSettings:
    """What a loader detected about a file: the family and its reference settings.

    Passed between nodes as the FEWSTEP_SETTINGS type so the scheduler, sampler and one-node sampler
    follow the file's card without the user knowing it by heart.
    """

    family: str | None  # None: not a few-step file (a style LoRA, say)
    steps: int | None = None
    cfg: float | None = None
    eta: float | None = None
    source: str = ""  # the file the settings were detected from
    reason: str = ""  # how they were detected (metadata, key signature, file name)
    prediction_type: str = "epsilon"

    def summary(self) -> str:
        if self.family is None:
            return f"{self.source}: not a few-step model ({self.reason})"
        parts = [f"family {self.family}"]
        if self.steps is not None:
            parts.append(f"{self.steps} steps")
        if self.cfg is not None:
            parts.append(f"cfg {self.cfg:g}")
        if self.eta is not None:
            parts.append(f"eta {self.eta:g}")
        if self.prediction_type != "epsilon":
            parts.append(f"{self.prediction_type} prediction")
        return f"{self.source}: {', '.join(parts)} ({self.reason})"


# The eta inputs' value for "the reference": the loader's file's, else the family's own.
ETA_FROM_FAMILY = -1.0


def resolve_family(family: str, settings: FewStepSettings | None) -> Family:
    """The family a sampler or scheduler runs: a connected loader's detected one, else the widget's."""
    if settings is not None and settings.family is not None:
        return get_family(settings.family)
    return get_family(family)


def resolve_eta(eta: float | None, settings: FewStepSettings | None, family: Family) -> float | None:
    """The sampler's eta: the widget's, unless it asks for the reference (ETA_FROM_FAMILY): the file's, else the family's."""
    if eta is not None and eta >= 0:
        return eta
    if settings is not None and settings.eta is not None and settings.family == family.name:
        return settings.eta
    return family.default_eta
