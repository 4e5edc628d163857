"""The flow-matching families in real ComfyUI against their diffusers pipelines, on tiny transformers.

ComfyUI side: UNETLoader reads the diffusers-layout transformer file (ComfyUI converts and detects it as
Flux / FluxSchnell / SD3), Few-Step Scheduler and Sampler run inside SamplerCustom, through ComfyUI's
executor. The text encoders (T5-XXL, CLIP) are too big for CPU tests, so both sides get the same fixed
conditioning tensors directly: here through a test node that returns them as CONDITIONING, with
ComfyUI's FluxGuidance adding the card's distilled guidance where the family has one.

Same space: ComfyUI's LATENT is the VAE's latent; its model samples latent_format.process_in of it,
(z − shift)·scale, which is what diffusers' pipelines sample and return with output_type="latent". So
ComfyUI's output goes through process_in, and the img2img input (a LATENT for LoadLatent) goes to
diffusers through process_in too. FLUX's 2×2 packing is undone on the diffusers side (_unpack_latents).
Same noise: ComfyUI's prepare_noise and the pipelines' randn_tensor both draw from a CPU generator seeded
with the seed, in the (1, 16, h, w) layout.
"""
from __future__ import annotations

import gc

import pytest
import torch
from safetensors.torch import save_file

from flow_reference import FAMILY_BASES, PARITY_GRID, SHARED_CASES, FlowReference
from tiny_flow_models import build_flow_model, conditioning

SEED = 42
TOLERANCE = 1e-3  # the bound on the final latent; fp32 on both sides


class FewStepTestConditioning:
    """Test-only node: the stand-in text encoding, as ComfyUI's text encoders shape it
    ([[hidden states, {"pooled_output": pooled}]])."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"seed": ("INT", {"default": 0})}}

    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "encode"
    CATEGORY = "testing"

    def encode(self, seed):
        prompt_embeds, pooled = conditioning()
        return ([[prompt_embeds, {"pooled_output": pooled}]],)


@pytest.fixture(scope="module")
def flow_comfy(comfy):
    comfy.nodes.NODE_CLASS_MAPPINGS["FewStepTestConditioning"] = FewStepTestConditioning
    yield comfy
    del comfy.nodes.NODE_CLASS_MAPPINGS["FewStepTestConditioning"]


class _OneBaseAtATime:
    """The tiny FLUX is 2.1 GB per copy: keep one base's diffusers copy, and let ComfyUI unload the last."""

    def __init__(self, comfy):
        self.comfy, self.base, self.tiny, self.reference = comfy, None, None, None

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
    import comfy.latent_formats

    return comfy.latent_formats.SD3() if tiny.comfy_class == "SD3" else comfy.latent_formats.Flux()


def image_latent(comfy, latent_size) -> tuple[str, torch.Tensor]:
    """A fixed 'encoded image' (a VAE latent, ComfyUI units) saved for LoadLatent."""
    latent = torch.randn(1, 16, *latent_size, generator=torch.Generator().manual_seed(5))
    name = f"fewstep_flow_image_{latent_size[0]}x{latent_size[1]}.latent"
    save_file({"latent_tensor": latent, "latent_format_version_0": torch.tensor([])},
              str(comfy.base_directory / "input" / name))
    return name, latent


def flow_prompt(tiny, family, steps, denoise, latent_size, latent_file=None, model_sampling=None) -> dict:
    """Few-Step Scheduler + Sampler in SamplerCustom on the UNETLoader's model (or on `model_sampling`,
    a ModelSampling* node applied to it); "save" holds the final LATENT."""
    from comfyui_fewstep.fewstep.families import get_family

    height, width = (side * 8 for side in latent_size)
    model = ["unet", 0]
    prompt = {
        "unet": {"class_type": "UNETLoader", "inputs": {"unet_name": tiny.unet_name, "weight_dtype": "default"}},
        "cond": {"class_type": "FewStepTestConditioning", "inputs": {"seed": 0}},
        "latent_in": ({"class_type": "LoadLatent", "inputs": {"latent": latent_file}} if latent_file else
                      {"class_type": "EmptySD3LatentImage", "inputs": {"width": width, "height": height, "batch_size": 1}}),
        "save": {"class_type": "SaveLatent", "inputs": {"samples": ["sample", 0], "filename_prefix": "fewstep_flow"}},
    }
    if model_sampling is not None:
        class_type, inputs = model_sampling
        prompt["model"] = {"class_type": class_type, "inputs": {"model": ["unet", 0], **inputs}}
        model = ["model", 0]
    positive = ["cond", 0]
    guidance = get_family(family).flow.guidance
    if guidance is not None:  # FLUX.1-dev's distilled guidance, as ComfyUI's Flux workflows set it
        prompt["guided"] = {"class_type": "FluxGuidance", "inputs": {"conditioning": ["cond", 0], "guidance": guidance}}
        positive = ["guided", 0]
    prompt["sigmas"] = {"class_type": "FewStepScheduler", "inputs": {
        "model": model, "family": family, "steps": steps, "denoise": denoise, "latent_image": ["latent_in", 0]}}
    prompt["sampler"] = {"class_type": "FewStepSampler", "inputs": {"family": family}}
    prompt["sample"] = {"class_type": "SamplerCustom", "inputs": {
        "model": model, "add_noise": True, "noise_seed": SEED, "cfg": 1.0, "positive": positive,
        "negative": ["cond", 0], "sampler": ["sampler", 0], "sigmas": ["sigmas", 0], "latent_image": ["latent_in", 0]}}
    return prompt


def run_both(flow_comfy, flow_bases, family, steps, denoise, latent_size, model_sampling=None):
    """(ComfyUI's final latent, diffusers'), both in the transformer's (processed) latent space."""
    tiny, reference = flow_bases.get(FAMILY_BASES[family])
    latent_file, image = image_latent(flow_comfy, latent_size) if denoise < 1.0 else (None, None)
    result = flow_comfy.run(flow_prompt(tiny, family, steps, denoise, latent_size, latent_file, model_sampling))
    fmt = latent_format(tiny)
    ours = fmt.process_in(result.latent("save"))
    expected = reference.sample(family, steps, denoise, latent_size, SEED,
                                None if image is None else fmt.process_in(image))
    return ours, expected


@pytest.mark.parametrize("family,steps,denoise,latent_size", PARITY_GRID)
def test_flow_family_matches_its_diffusers_pipeline(flow_comfy, flow_bases, family, steps, denoise, latent_size):
    ours, expected = run_both(flow_comfy, flow_bases, family, steps, denoise, latent_size)
    assert ours.shape == expected.shape
    delta = (ours - expected).abs().max().item()
    assert delta <= TOLERANCE, f"{family} {steps} steps denoise {denoise} latent {latent_size}: max |Δ| {delta:.2e}"


@pytest.mark.parametrize("case,run_as", SHARED_CASES)
def test_cases_run_once_share_their_sigmas(case, run_as):
    """A family's case the grid runs under another family's name has the same σ (and guidance)."""
    from comfyui_fewstep.fewstep.families import get_family
    from comfyui_fewstep.fewstep.flow_schedules import flow_sigmas

    (family, steps, denoise, size), (other, *_rest) = case, run_as
    assert flow_sigmas(family, steps, denoise, size) == flow_sigmas(other, steps, denoise, size)
    assert get_family(family).flow.guidance == get_family(other).flow.guidance


@pytest.mark.parametrize("family,model_sampling", [
    ("flux_turbo_alpha", ("ModelSamplingFlux", {"max_shift": 2.0, "base_shift": 0.1, "width": 1024, "height": 1024})),
    ("sd35_large_turbo", ("ModelSamplingSD3", {"shift": 6.0})),
])
def test_the_models_own_shift_is_not_applied_twice(flow_comfy, flow_bases, family, model_sampling):
    """A ModelSampling* node (as ComfyUI's FLUX/SD3 workflows put before the sampler) changes only how
    ComfyUI's own schedulers space σ; FewStep's σ reach the model unchanged, so the result is the card's."""
    ours, expected = run_both(flow_comfy, flow_bases, family, 4, 1.0, (8, 8), model_sampling)
    assert (ours - expected).abs().max().item() <= TOLERANCE


def test_a_family_for_another_base_is_refused_with_the_fitting_one(flow_comfy, flow_bases):
    from comfy_harness import PromptFailed

    tiny, _ = flow_bases.get("flux_dev")
    with pytest.raises(PromptFailed) as failure:
        flow_comfy.run(flow_prompt(tiny, "flux_schnell", 4, 1.0, (8, 8)))
    assert "set family to flux_turbo_alpha or hyper_flux" in failure.value.message
