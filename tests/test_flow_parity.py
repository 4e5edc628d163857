"""The flow-matching families in real ComfyUI against their diffusers pipelines, on tiny transformers.

ComfyUI side: UNETLoader reads the tiny transformer file (ComfyUI converts and detects it as Flux /
FluxSchnell / SD3 / QwenImage / ZImage), Few-Step Scheduler and Sampler run inside SamplerCustom (with
ComfyUI's FluxGuidance adding the card's distilled guidance where the family has one), or Few-Step
KSampler alone (which adds it itself), through ComfyUI's executor. The text encoders (T5-XXL, CLIP,
Qwen2.5-VL-7B, Qwen3-4B) are too big for CPU tests, so both sides get the same fixed conditioning tensors
directly: here through a test node that returns them as CONDITIONING.

Same space: ComfyUI's LATENT is the VAE's latent; its model samples latent_format.process_in of it
((z − shift)·scale; Qwen-Image: (z − mean)/std per channel), which is what diffusers' pipelines sample
and return with output_type="latent". So ComfyUI's output goes through process_in, and the img2img input
(a LATENT for LoadLatent) goes to diffusers through process_in too. FLUX's and Qwen-Image's 2×2 packing
is undone on the diffusers side (_unpack_latents).
Same noise: ComfyUI's prepare_noise and the pipelines' randn_tensor both draw from a CPU generator seeded
with the seed, in the same order: (1, 16, h, w), or for Qwen-Image (1, 16, 1, h, w) in ComfyUI and
(1, 1, 16, h, w) in diffusers, one frame, so the same element order.
"""
from __future__ import annotations

import gc

import pytest
import torch
from safetensors.torch import save_file

import flow_conditioning
from flow_reference import FAMILY_BASES, PARITY_GRID, SHARED_CASES, FlowReference, sampling_key
from tiny_flow_models import build_flow_model

SEED = 42
TOLERANCE = 1e-3  # the bound on the final latent; fp32 on both sides


@pytest.fixture(scope="module")
def flow_comfy(comfy):
    with flow_conditioning.registered(comfy):
        yield comfy


class _OneBaseAtATime:
    """The tiny FLUX is 2.1 GB per copy: keep one base's diffusers copy, and let ComfyUI unload the last."""

    def __init__(self, comfy):
        self.comfy, self.base, self.tiny, self.reference = comfy, None, None, None
        self.expected = {}  # diffusers' latents by sampling_key, for this base

    def expected_latent(self, family, steps, denoise, latent_size, image) -> torch.Tensor:
        """The diffusers pipeline's final latent; `image` (processed) is the img2img input, fixed per size."""
        key = sampling_key(family, steps, denoise, latent_size)
        if key not in self.expected:
            self.expected[key] = self.reference.sample(family, steps, denoise, latent_size, SEED, image)
        return self.expected[key]

    def release(self):
        """After the module: the last base goes too (the tests after it load SD models)."""
        import comfy.model_management

        self.base = self.tiny = self.reference = None
        self.comfy.forget_outputs()
        comfy.model_management.unload_all_models()
        gc.collect()

    def get(self, base):
        if base != self.base:
            import comfy.model_management

            self.reference = self.tiny = None
            self.expected = {}
            # ComfyUI's executor keeps the last prompt's outputs (the loaded MODEL among them): a fresh
            # one lets the previous base go, so one base at a time is all this module holds.
            self.comfy.forget_outputs()
            comfy.model_management.unload_all_models()
            gc.collect()
            self.tiny = build_flow_model(base, self.comfy.models_dir)
            self.reference, self.base = FlowReference(self.tiny), base
        return self.tiny, self.reference


@pytest.fixture(scope="module")
def flow_bases(flow_comfy):
    bases = _OneBaseAtATime(flow_comfy)
    yield bases
    bases.release()


def latent_format(tiny):
    """ComfyUI's latent format of the detected model (Z-Image: Flux's; Qwen-Image: Wan 2.1's)."""
    import comfy.supported_models

    return getattr(comfy.supported_models, tiny.comfy_class).latent_format()


def processed(tiny, latent: torch.Tensor) -> torch.Tensor:
    """latent_format.process_in of a (1, 16, h, w) LATENT, in that layout. Wan 2.1's per-channel mean
    and std are (1, 16, 1, 1, 1): a Qwen-Image latent takes its frame axis for it, as ComfyUI's sampler
    gives it one (comfy.sample.fix_empty_latent_channels)."""
    fmt = latent_format(tiny)
    if fmt.latent_dimensions == 3:
        return fmt.process_in(latent.unsqueeze(2)).squeeze(2)
    return fmt.process_in(latent)


def image_latent(comfy, latent_size) -> tuple[str, torch.Tensor]:
    """A fixed 'encoded image' (a VAE latent, ComfyUI units) saved for LoadLatent."""
    latent = torch.randn(1, 16, *latent_size, generator=torch.Generator().manual_seed(5))
    name = f"fewstep_flow_image_{latent_size[0]}x{latent_size[1]}.latent"
    save_file({"latent_tensor": latent, "latent_format_version_0": torch.tensor([])},
              str(comfy.base_directory / "input" / name))
    return name, latent


def flow_prompt(tiny, family, steps, denoise, latent_size, latent_file=None, model_sampling=None,
                route="SamplerCustom", guidance="family") -> dict:
    """Few-Step Scheduler + Sampler in SamplerCustom, or Few-Step KSampler (`route`), on the UNETLoader's
    model (or on `model_sampling`, a ModelSampling* node applied to it); "save" holds the final LATENT.

    `guidance`: "family" puts FluxGuidance at the card's value before SamplerCustom (as ComfyUI's Flux
    workflows do) and nothing before Few-Step KSampler (it adds the card's value itself); a number puts
    FluxGuidance at that value before either (a user's own setting)."""
    from comfyui_fewstep.fewstep.families import get_family

    height, width = (side * 8 for side in latent_size)
    model = ["unet", 0]
    prompt = {
        "unet": {"class_type": "UNETLoader", "inputs": {"unet_name": tiny.unet_name, "weight_dtype": "default"}},
        "cond": {"class_type": "FewStepTestConditioning", "inputs": {"base": tiny.base}},
        "latent_in": ({"class_type": "LoadLatent", "inputs": {"latent": latent_file}} if latent_file else
                      {"class_type": "EmptySD3LatentImage", "inputs": {"width": width, "height": height, "batch_size": 1}}),
        "save": {"class_type": "SaveLatent", "inputs": {"samples": ["sample", 0], "filename_prefix": "fewstep_flow"}},
    }
    if model_sampling is not None:
        class_type, inputs = model_sampling
        prompt["model"] = {"class_type": class_type, "inputs": {"model": ["unet", 0], **inputs}}
        model = ["model", 0]
    positive = ["cond", 0]
    if guidance == "family":
        guidance = get_family(family).flow.guidance if route == "SamplerCustom" else None
    if guidance is not None:  # FLUX.1-dev's distilled guidance, as ComfyUI's Flux workflows set it
        prompt["guided"] = {"class_type": "FluxGuidance", "inputs": {"conditioning": ["cond", 0], "guidance": guidance}}
        positive = ["guided", 0]
    if route == "FewStepKSampler":
        prompt["sample"] = {"class_type": "FewStepKSampler", "inputs": {
            "model": model, "positive": positive, "negative": ["cond", 0], "latent_image": ["latent_in", 0],
            "seed": SEED, "family": family, "steps": steps, "cfg": 1.0, "denoise": denoise}}
        return prompt
    prompt["sigmas"] = {"class_type": "FewStepScheduler", "inputs": {
        "model": model, "family": family, "steps": steps, "denoise": denoise, "latent_image": ["latent_in", 0]}}
    prompt["sampler"] = {"class_type": "FewStepSampler", "inputs": {"family": family}}
    prompt["sample"] = {"class_type": "SamplerCustom", "inputs": {
        "model": model, "add_noise": True, "noise_seed": SEED, "cfg": 1.0, "positive": positive,
        "negative": ["cond", 0], "sampler": ["sampler", 0], "sigmas": ["sigmas", 0], "latent_image": ["latent_in", 0]}}
    return prompt


def run_both(flow_comfy, flow_bases, family, steps, denoise, latent_size, model_sampling=None, route="SamplerCustom"):
    """(ComfyUI's final latent, diffusers'), both in the transformer's (processed) latent space."""
    tiny, _ = flow_bases.get(FAMILY_BASES[family])
    latent_file, image = image_latent(flow_comfy, latent_size) if denoise < 1.0 else (None, None)
    prompt = flow_prompt(tiny, family, steps, denoise, latent_size, latent_file, model_sampling, route)
    ours = latent_format(tiny).process_in(flow_comfy.run(prompt).latent("save"))  # Qwen-Image's: 5-D, one frame
    expected = flow_bases.expected_latent(family, steps, denoise, latent_size,
                                          None if image is None else processed(tiny, image))
    return ours, expected


@pytest.mark.parametrize("family,steps,denoise,latent_size,route", PARITY_GRID)
def test_flow_family_matches_its_diffusers_pipeline(flow_comfy, flow_bases, family, steps, denoise, latent_size, route):
    ours, expected = run_both(flow_comfy, flow_bases, family, steps, denoise, latent_size, route=route)
    assert ours.shape == expected.shape
    delta = (ours - expected).abs().max().item()
    assert delta <= TOLERANCE, f"{family} {steps} steps denoise {denoise} latent {latent_size} via {route}: max |Δ| {delta:.2e}"


def test_few_step_ksampler_sets_the_family_guidance_as_flux_guidance_does(flow_comfy, flow_bases, monkeypatch):
    """FLUX.1-dev families: Few-Step KSampler on conditioning without guidance gives, bit for bit, what
    FluxGuidance at the card's 3.5 before Few-Step Scheduler + Sampler in SamplerCustom gives (and the
    grid above checks that against FluxPipeline at guidance_scale 3.5). ComfyUI's Flux model itself takes
    3.5 where the conditioning has none, so the check is repeated with the family's value changed: the
    node must read it from families.py. A guidance the user set (FluxGuidance before the node) stays."""
    import dataclasses
    import sys

    tiny, _ = flow_bases.get("flux_dev")
    # The families module of the pack as ComfyUI loaded it (from custom_nodes/, under its own name).
    node_module = flow_comfy.nodes.NODE_CLASS_MAPPINGS["FewStepKSampler"].__module__
    families = sys.modules[f"{node_module.split('.')[0]}.fewstep.families"]
    family, steps, size = "hyper_flux", 2, (8, 8)

    def run(route, guidance="family", rerun=0):
        prompt = flow_prompt(tiny, family, steps, 1.0, size, route=route, guidance=guidance)
        prompt["cond"]["inputs"]["rerun"] = rerun
        return flow_comfy.run(prompt).latent("save")

    card = run("FewStepKSampler")
    assert torch.equal(card, run("SamplerCustom"))
    user_set = run("FewStepKSampler", guidance=2.0)
    assert torch.equal(user_set, run("SamplerCustom", guidance=2.0))
    assert (user_set - card).abs().max().item() > 10 * TOLERANCE  # guidance changes this tiny FLUX's output

    hyper_flux = families.FAMILIES[family]
    monkeypatch.setitem(families.FAMILIES, family,
                        dataclasses.replace(hyper_flux, flow=dataclasses.replace(hyper_flux.flow, guidance=2.0)))
    assert torch.equal(run("FewStepKSampler", rerun=1), user_set)


@pytest.mark.parametrize("case,run_as", SHARED_CASES)
def test_cases_run_once_share_their_sigmas(case, run_as):
    """A family's case the grid runs under another family's name has the same σ (and guidance)."""
    from comfyui_fewstep.fewstep.families import get_family
    from comfyui_fewstep.fewstep.flow_schedules import flow_sigmas

    (family, steps, denoise, size), (other, *_rest) = case, run_as
    assert flow_sigmas(family, steps, denoise, size) == flow_sigmas(other, steps, denoise, size)
    assert get_family(family).flow.guidance == get_family(other).flow.guidance


def test_a_family_for_another_base_is_refused_with_the_fitting_one(flow_comfy, flow_bases):
    from comfy_harness import PromptFailed

    tiny, _ = flow_bases.get("flux_dev")
    with pytest.raises(PromptFailed) as failure:
        flow_comfy.run(flow_prompt(tiny, "flux_schnell", 4, 1.0, (8, 8)))
    assert "set family to flux_turbo_alpha or hyper_flux" in failure.value.message


@pytest.mark.parametrize("family,model_sampling", [
    ("flux_turbo_alpha", ("ModelSamplingFlux", {"max_shift": 2.0, "base_shift": 0.1, "width": 1024, "height": 1024})),
    ("sd35_large_turbo", ("ModelSamplingSD3", {"shift": 6.0})),
])
def test_the_models_own_shift_is_not_applied_twice(flow_comfy, flow_bases, family, model_sampling):
    """A ModelSampling* node (as ComfyUI's FLUX/SD3 workflows put before the sampler) changes only how
    ComfyUI's own schedulers space σ; FewStep's σ reach the model unchanged, so the result is the card's."""
    ours, expected = run_both(flow_comfy, flow_bases, family, 4, 1.0, (8, 8), model_sampling)
    assert (ours - expected).abs().max().item() <= TOLERANCE
