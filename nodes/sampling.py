"""FewStepScheduler and FewStepSampler: the family's reference timesteps and update rule in ComfyUI.

Thin glue: the maths is in fewstep.schedules, fewstep.flow_schedules and fewstep.update_rules.
"""
from __future__ import annotations

import comfy.model_sampling
import comfy.samplers
import torch
from comfy.k_diffusion.sampling import default_noise_sampler
from comfy_api.latest import io

from ..fewstep import update_rules
from ..fewstep.detection import check_family_fits_model
from ..fewstep.families import (
    ETA_FROM_FAMILY,
    FAMILY_NAMES,
    Family,
    FewStepInputError,
    get_family,
    resolve_eta,
    resolve_family,
)
from ..fewstep.flow_schedules import check_flow_steps, flow_sigmas, shift_depends_on_size
from ..fewstep.schedules import (
    LCM_ORIGINAL_INFERENCE_STEPS,
    DiscreteNoiseSchedule,
    parse_timesteps,
    reference_timesteps,
)
from .types import FewStepSettingsType
from .validation import check_numbers, validation_message

FAMILY_TOOLTIP = (
    "The few-step family the model was distilled as; it fixes timesteps and update rule. "
    + "; ".join(f"{name}: {get_family(name).reference}" for name in FAMILY_NAMES)
)


# Per-family facts in tooltips, read from fewstep/families.py.
def family_list(predicate) -> str:
    return ", ".join(name for name in FAMILY_NAMES if predicate(get_family(name)))


STEPS_TOOLTIP = "Sampling steps. The cards: " + ", ".join(
    f"{name} {get_family(name).default_steps}" for name in FAMILY_NAMES) + "."
WITHOUT_GUIDANCE = family_list(lambda family: family.default_cfg == 1.0)
ETA_REFERENCES = ", ".join(f"{get_family(name).default_eta:g} for {name}" for name in FAMILY_NAMES
                           if get_family(name).default_eta is not None)
# The node titles are what the frontend's search matches (with the node id), and the frontend widens a
# node to its title: a few words, each in some family's name (test_locales holds every family to it).
FAMILIES_IN_TITLE = "LCM, TCD, Turbo, Lightning, Hyper, DMD2, FLUX"
DENOISE_TOOLTIP = (
    "1.0 for text-to-image. Below 1 (img2img), as each family's img2img pipeline does: "
    f"{family_list(lambda f: f.timestep_rule == 'lcm')} keep `steps` steps inside the window (LCM img2img); "
    f"{family_list(lambda f: f.timestep_rule == 'trailing')} run the last int(steps × denoise) steps "
    "(so steps × denoise ≥ 1); the flow-matching families "
    f"({family_list(lambda f: f.flow is not None)}) skip the first int(steps − steps × denoise) steps "
    "(so at least one step runs)."
)
LATENT_TOOLTIP = (
    "Flow-matching families whose card shifts σ by image size "
    f"({family_list(lambda f: f.flow is not None and shift_depends_on_size(f))}): "
    "the latent being sampled, for its token count. Others ignore it."
)
GUIDED_BY_EMBEDDING = "; ".join(
    f"{family_list(lambda f, g=value: f.flow is not None and f.flow.guidance == g)} get guidance {value:g}"
    for value in sorted({f.flow.guidance for f in map(get_family, FAMILY_NAMES)
                         if f.flow is not None and f.flow.guidance is not None}))
SETTINGS_TOOLTIP = (
    "Settings a FewStep loader detected from the LoRA/UNet file; when connected, its family "
    "replaces the family widget."
)


def family_input() -> io.Combo.Input:
    return io.Combo.Input("family", options=list(FAMILY_NAMES), default="lcm", tooltip=FAMILY_TOOLTIP)


def settings_input() -> io.Input:
    return FewStepSettingsType.Input("settings", optional=True, tooltip=SETTINGS_TOOLTIP)


def noise_schedule_of(model_sampling) -> DiscreteNoiseSchedule:
    """The model's own σ table; the families are distilled from SD1.5/SDXL's discrete 1000-step one."""
    if not isinstance(model_sampling, comfy.model_sampling.ModelSamplingDiscrete):
        raise FewStepInputError(
            f"model: it samples with {type(model_sampling).__name__}, not the discrete DDPM schedule of "
            "SD1.5/SDXL that few-step families are distilled from; load an SD1.5- or SDXL-family model."
        )
    return DiscreteNoiseSchedule(model_sampling.sigmas)


def model_architecture(model) -> str:
    """ComfyUI's model config class (comfy.supported_models), e.g. 'FluxSchnell', 'SD3', 'SDXL'."""
    return type(model.model.model_config).__name__


def schedule_sigmas(model, family: Family, steps: int, denoise: float, timesteps: str = "",
                    original_inference_steps: int = LCM_ORIGINAL_INFERENCE_STEPS, latent=None):
    """SIGMAS for the family's reference timesteps, read through the model's own σ table; for a
    flow-matching family, its pipeline's σ (model_sampling CONST: ComfyUI's σ is diffusers' σ)."""
    model_sampling = model.get_model_object("model_sampling")
    check_family_fits_model(family, model_architecture(model), isinstance(model_sampling, comfy.model_sampling.CONST))
    if family.flow is not None:
        if (timesteps or "").strip():
            raise FewStepInputError(
                f"timesteps: {family.name} is a flow-matching family, whose σ come from its card's scheduler; "
                "leave timesteps empty."
            )
        latent_size = None if latent is None else tuple(latent["samples"].shape[-2:])
        return torch.tensor(flow_sigmas(family.name, steps, denoise, latent_size), dtype=torch.float32)
    timestep_list = reference_timesteps(
        family.name, steps, denoise, parse_timesteps(timesteps or ""), original_inference_steps
    )
    if isinstance(model_sampling, comfy.model_sampling.X0) and family.update_rule not in ("euler", "euler_ancestral"):
        raise FewStepInputError(
            f"family: {family.name} with a model that predicts x0 (the 1-step SDXL-Lightning UNet); "
            "that UNet was distilled for Euler sampling — set family to lightning."
        )
    return noise_schedule_of(model_sampling).sigmas_for(timestep_list)


def check_schedule(family, steps, denoise, timesteps, original_inference_steps) -> None:
    """The scheduler's checks on constant widget values, for validate_inputs (None: linked)."""
    if family is not None:
        get_family(family)
    if family is not None and get_family(family).flow is not None:
        if steps is not None and denoise is not None:
            check_flow_steps(get_family(family), steps, denoise)
        return
    if family is not None and steps is not None and denoise is not None:
        reference_timesteps(
            family, steps, denoise, parse_timesteps(timesteps or ""),
            original_inference_steps or LCM_ORIGINAL_INFERENCE_STEPS,
        )


def eta_input() -> io.Float.Input:
    return io.Float.Input(
        "eta", default=ETA_FROM_FAMILY, min=-1.0, max=1.0, step=0.05, optional=True,
        tooltip=(f"TCD's gamma (stochasticity); -1 uses the family's reference: {ETA_REFERENCES}. "
                 "Other families ignore it."),
    )


class FewStepScheduler(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="FewStepScheduler",
            display_name=f"Few-Step Scheduler ({FAMILIES_IN_TITLE})",
            category="sampling/few-step",
            description=(
                "The σ schedule a few-step model's card samples with, from the diffusers scheduler "
                "it names. Use with Few-Step Sampler in SamplerCustom."
            ),
            inputs=[
                io.Model.Input("model", tooltip=(
                    "The model to sample. SD1.5/SDXL families: its own σ table turns timesteps into σ; "
                    "flow-matching families: it must be the base the family's card runs on.")),
                family_input(),
                io.Int.Input(
                    "steps", default=4, min=1, max=50,
                    tooltip=STEPS_TOOLTIP,
                ),
                io.Float.Input("denoise", default=1.0, min=0.0, max=1.0, step=0.01, tooltip=DENOISE_TOOLTIP),
                io.String.Input(
                    "timesteps", default="", optional=True,
                    tooltip=(
                        "Explicit timesteps, e.g. '999, 759, 499, 259', as the cards' timesteps=[…]; "
                        "empty uses the family's schedule. SD1.5/SDXL families only: leave it empty for a "
                        "flow-matching family, whose σ come from its card's scheduler."
                    ),
                ),
                io.Int.Input(
                    "original_inference_steps", default=LCM_ORIGINAL_INFERENCE_STEPS, min=1, max=1000,
                    optional=True,
                    tooltip=(f"{family_list(lambda f: f.timestep_rule == 'lcm')} only (LCMScheduler/TCDScheduler): "
                             "the distillation grid the steps are picked from "
                             f"(reference {LCM_ORIGINAL_INFERENCE_STEPS})."),
                ),
                settings_input(),
                io.Latent.Input("latent_image", optional=True, tooltip=LATENT_TOOLTIP),
            ],
            outputs=[io.Sigmas.Output(tooltip="σ for each timestep, then 0.")],
        )

    @classmethod
    def validate_inputs(cls, family=None, steps=None, denoise=None, timesteps=None,
                        original_inference_steps=None) -> bool | str:
        # Linked inputs arrive as None: only constants are checked before running.
        def check():
            check_numbers(cls, steps=steps, denoise=denoise, original_inference_steps=original_inference_steps)
            check_schedule(family, steps, denoise, timesteps, original_inference_steps)
        return validation_message(check)

    @classmethod
    def execute(cls, model, family, steps, denoise, timesteps="",
                original_inference_steps=LCM_ORIGINAL_INFERENCE_STEPS, settings=None, latent_image=None) -> io.NodeOutput:
        check_numbers(cls, steps=steps, denoise=denoise, original_inference_steps=original_inference_steps)
        chosen = resolve_family(family, settings)
        return io.NodeOutput(schedule_sigmas(model, chosen, steps, denoise, timesteps, original_inference_steps,
                                             latent_image))


class FamilySampler(comfy.samplers.KSAMPLER):
    """ComfyUI's KSAMPLER running the family's update rule, with the family's initial-noise rule.

    KSAMPLER scales the first noise by sqrt(1 + σ₀²) where max_denoise() says so, by default only when
    σ₀ is the model's σ_max; the families' pipelines decide by text-to-image vs img2img instead
    (update_rules.starts_from_unit_variance), which only sample() sees (its latent_image). So each
    sampling run is handed to a KSAMPLER whose max_denoise gives that run's answer.
    """

    def __init__(self, family: Family, eta: float | None):
        self.family = family
        super().__init__(self._sample_function, extra_options={"eta": eta})

    def sample(self, model_wrap, sigmas, extra_args, callback, noise, latent_image=None,
               denoise_mask=None, disable_pbar=False):
        empty = noise.new_zeros(()) if latent_image is None else latent_image
        unit_variance = update_rules.starts_from_unit_variance(self.family.initial_noise, empty)
        run = comfy.samplers.KSAMPLER(self.sampler_function, self.extra_options, self.inpaint_options)
        run.max_denoise = lambda model_wrap, sigmas: unit_variance
        return run.sample(model_wrap, sigmas, extra_args, callback, noise, latent_image, denoise_mask, disable_pbar)

    def _sample_function(self, model, x, sigmas, extra_args=None, callback=None, disable=None, eta=None):
        extra_args = {} if extra_args is None else extra_args
        schedule = noise_schedule_of(model.inner_model.inner_model.model_sampling)
        noise_sampler = default_noise_sampler(x, seed=extra_args.get("seed"))

        def denoise(x, sigma):
            return model(x, sigma, **extra_args)

        def report(i, x, denoised, sigma):
            if callback is not None:
                callback({"x": x, "i": i, "sigma": sigma, "sigma_hat": sigma, "denoised": denoised})

        return update_rules.sample(
            self.family.update_rule, denoise, x, sigmas, schedule,
            noise=lambda: noise_sampler(None, None), eta=eta, callback=report,
        )


def with_family_guidance(conditioning, family: Family):
    """The card's distilled guidance (FLUX.1-dev's guidance embedding) on every entry that sets none, as
    ComfyUI's FluxGuidance sets it (node_helpers.conditioning_set_values); an entry with a guidance of
    its own (FluxGuidance, FluxDisableGuidance's None) keeps it. Both prompts get it: diffusers'
    FluxPipeline feeds the same guidance to its negative pass when true_cfg_scale > 1."""
    import node_helpers

    guidance = None if family.flow is None else family.flow.guidance
    if guidance is None:
        return conditioning
    return [entry if "guidance" in entry[1] else node_helpers.conditioning_set_values([entry], {"guidance": guidance})[0]
            for entry in conditioning]


def family_sampler(family: Family, eta: float | None) -> comfy.samplers.KSAMPLER:
    """The family's SAMPLER. Flow-matching families take ComfyUI's own `euler`: on a CONST model its step
    x + (σ_next − σ)·(x − x₀)/σ is FlowMatchEulerDiscreteScheduler.step's x + (σ_next − σ)·v, down to σ = 0,
    and KSAMPLER's CONST noise_scaling σ₀·noise + (1 − σ₀)·latent is the pipelines' scale_noise."""
    if family.flow is not None:
        return comfy.samplers.ksampler("euler")
    return FamilySampler(family, eta)


class FewStepSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="FewStepSampler",
            display_name=f"Few-Step Sampler ({FAMILIES_IN_TITLE})",
            category="sampling/few-step",
            description=(
                "The family's update rule as its diffusers scheduler steps it (LCM's boundary condition, TCD's "
                "gamma, Euler ancestral, …; the flow-matching families: Euler on the velocity, as "
                "FlowMatchEulerDiscreteScheduler steps). Use with Few-Step Scheduler in SamplerCustom."
            ),
            inputs=[
                family_input(),
                eta_input(),
                settings_input(),
            ],
            outputs=[io.Sampler.Output()],
        )

    @classmethod
    def validate_inputs(cls, family=None, eta=None) -> bool | str:
        def check():
            check_numbers(cls, eta=eta)
            check_schedule(family, None, None, None, None)
        return validation_message(check)

    @classmethod
    def execute(cls, family, eta=ETA_FROM_FAMILY, settings=None) -> io.NodeOutput:
        check_numbers(cls, eta=eta)
        chosen = resolve_family(family, settings)
        return io.NodeOutput(family_sampler(chosen, resolve_eta(eta, settings, chosen)))


class FewStepKSampler(io.ComfyNode):
    """Scheduler + sampler + ComfyUI's SamplerCustom in one node, for graphs wired like KSampler."""

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="FewStepKSampler",
            display_name=f"Few-Step KSampler ({FAMILIES_IN_TITLE})",
            category="sampling/few-step",
            description=(
                "Samples a few-step model the way its card does — the family's timesteps, update rule and "
                "initial noise — in one node: Few-Step Scheduler and Sampler run inside ComfyUI's SamplerCustom."
            ),
            inputs=[
                io.Model.Input("model", tooltip=("The few-step model (a distilled checkpoint, UNet or transformer, "
                                                 "or a base model with its LoRA).")),
                io.Conditioning.Input("positive", tooltip="The prompt's conditioning."),
                io.Conditioning.Input(
                    "negative",
                    tooltip=f"Used only when cfg > 1. At the cards' cfg 1 ({WITHOUT_GUIDANCE}) it has no effect.",
                ),
                io.Latent.Input(
                    "latent_image",
                    tooltip=("An empty latent for text-to-image (Empty Latent Image for SD1.5/SDXL, Empty SD3 Latent "
                             "Image for the flow-matching families), at the size the model card uses, or an encoded "
                             "image with denoise < 1."),
                ),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                             tooltip="Seed of the initial and per-step noise, drawn as ComfyUI's SamplerCustom draws it."),
                family_input(),
                io.Int.Input("steps", default=4, min=1, max=50,
                             tooltip=STEPS_TOOLTIP),
                io.Float.Input(
                    "cfg", default=1.0, min=0.0, max=100.0, step=0.1, round=0.01,
                    tooltip=(
                        "Classifier-free guidance. The cards use 1.0 (no guidance: the negative prompt has no "
                        f"effect) for {WITHOUT_GUIDANCE}; LCM-LoRA takes 1–2, Hyper-SD's CFG LoRAs 5–8. "
                        f"FLUX.1-dev's distilled guidance is no cfg: {GUIDED_BY_EMBEDDING} on the conditioning, as "
                        "FluxGuidance sets it, unless a FluxGuidance already set one."
                    ),
                ),
                io.Float.Input(
                    "denoise", default=1.0, min=0.0, max=1.0, step=0.01,
                    tooltip="1.0 for text-to-image; below 1 keeps part of latent_image (see Few-Step Scheduler).",
                ),
                eta_input(),
                settings_input(),
            ],
            outputs=[io.Latent.Output()],
        )

    @classmethod
    def validate_inputs(cls, family=None, steps=None, cfg=None, denoise=None, seed=None, eta=None) -> bool | str:
        def check():
            check_numbers(cls, seed=seed, steps=steps, cfg=cfg, denoise=denoise, eta=eta)
            check_schedule(family, steps, denoise, None, None)
        return validation_message(check)

    @classmethod
    def execute(cls, model, positive, negative, latent_image, seed, family, steps, cfg, denoise,
                eta=ETA_FROM_FAMILY, settings=None) -> io.NodeOutput:
        from comfy_extras.nodes_custom_sampler import SamplerCustom

        check_numbers(cls, seed=seed, steps=steps, cfg=cfg, denoise=denoise, eta=eta)
        chosen = resolve_family(family, settings)
        sigmas = schedule_sigmas(model, chosen, steps, denoise, latent=latent_image)
        sampler = family_sampler(chosen, resolve_eta(eta, settings, chosen))
        positive, negative = (with_family_guidance(c, chosen) for c in (positive, negative))
        sampled = SamplerCustom.execute(model, True, seed, cfg, positive, negative, sampler, sigmas, latent_image)
        return io.NodeOutput(sampled[0])


SAMPLING_NODES = [FewStepScheduler, FewStepSampler, FewStepKSampler]
