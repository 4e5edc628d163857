"""How far ComfyUI's native routes for the flow-matching families, and FewStep's nodes, are from diffusers.

The flow half of bench/fidelity.py. Each family's native route is what its ComfyUI examples set (cited in
NATIVE_FLOW_ROUTES), run in real ComfyUI (in process, CPU) on the tiny random-weight transformer of its
base (testing/tiny_flow_models.py), beside Few-Step Scheduler + Sampler on the same graph, against the
family's own diffusers pipeline (testing/flow_reference.py) with the same weights, noise and conditioning.
Distance: max |Δ| of the final latent in the space the pipelines return with output_type="latent" (the
transformer's: ComfyUI's latent_format.process_in of its LATENT).

The text encoders (T5-XXL, CLIP-G, Qwen2.5-VL, Qwen3) are far too big for a CPU run, so both sides get
tiny_flow_models.conditioning's fixed tensors; where a route runs real CFG (SD3.5 Large Turbo's cfg 1.2)
its negative, an empty prompt's encoding in the example, is another fixed tensor. The LoRA families run
their base without the LoRA: ComfyUI's LoraLoaderModelOnly and Few-Step LoRA Loader patch the same
weights (tests/test_flow_loras.py), and what differs between the routes is the sampling.
"""
from __future__ import annotations

import gc
from dataclasses import dataclass

import torch
from safetensors.torch import save_file

import flow_conditioning  # testing/, on the path bench/fidelity.py sets

SEED = 42


@dataclass(frozen=True)
class NativeRoute:
    """What a ComfyUI user's graph does for a family, as one of its published workflows sets it."""

    source: str  # where the settings come from
    sampler: str = "euler"
    scheduler: str = "simple"
    cfg: float = 1.0
    # A ModelSampling* node between the loader and the sampler: (class_type, inputs); ModelSamplingFlux's
    # width/height follow the latent, as the FLUX.1-dev example links them to the latent's size.
    model_sampling: tuple[str, dict] | None = None
    # ComfyUI's own FLUX examples sample with SamplerCustomAdvanced (RandomNoise, BasicGuider,
    # KSamplerSelect, BasicScheduler); the others with KSampler.
    custom_advanced: bool = False
    steps: int | None = None  # the workflow's own step count where it differs from the family's

    def describe(self) -> str:
        parts = [f"{self.sampler} + {self.scheduler}"]
        if self.model_sampling is not None:
            class_type, inputs = self.model_sampling
            parts.append(f"{class_type} shift {inputs['shift']:g}" if "shift" in inputs
                         else f"{class_type} (max {inputs['max_shift']:g}, base {inputs['base_shift']:g}, the image's size)")
        if self.cfg != 1.0:
            parts.append(f"cfg {self.cfg:g}")
        if self.steps is not None:
            parts.append(f"{self.steps} steps")
        return ", ".join(parts)


FLUX_DEV_EXAMPLE = NativeRoute(
    # comfyanonymous/ComfyUI_examples flux/flux_dev_example.png (the workflow in the PNG): UNETLoader →
    # ModelSamplingFlux(max_shift 1.15, base_shift 0.5, width/height linked to EmptySD3LatentImage's),
    # FluxGuidance 3.5, BasicScheduler simple, KSamplerSelect euler, SamplerCustomAdvanced; the LoRAs'
    # cards give 8 (16) steps and guidance 3.5 and no ComfyUI graph of their own.
    source="ComfyUI_examples flux_dev_example (steps set to the LoRA's)",
    model_sampling=("ModelSamplingFlux", {"max_shift": 1.15, "base_shift": 0.5}),
    custom_advanced=True,
)
NATIVE_FLOW_ROUTES: dict[str, tuple[NativeRoute, ...]] = {
    # ComfyUI_examples flux/flux_schnell_example.png: UNETLoader, BasicScheduler simple 4 steps, euler,
    # BasicGuider, SamplerCustomAdvanced; no ModelSampling node, so the model's own (FluxSchnell:
    # ModelSamplingFlux with shift 1.0). flux_schnell_checkpoint_example: KSampler euler simple cfg 1, the same σ.
    "flux_schnell": (NativeRoute(source="ComfyUI_examples flux_schnell_example", custom_advanced=True),),
    # ComfyUI_examples sd3/README.md: for sd3.5_large_turbo "use the above example [sd3.5_text_encoders_example:
    # KSampler euler sgm_uniform, negative CLIPTextEncode('')] and set steps to 4 and cfg to 1.2".
    "sd35_large_turbo": (NativeRoute(source="ComfyUI_examples sd3 README (turbo: 4 steps, cfg 1.2)",
                                     scheduler="sgm_uniform", cfg=1.2),),
    "qwen_image_lightning": (
        # ModelTC/Qwen-Image-Lightning workflows/qwen-image-8steps.json (and -4steps): LoraLoaderModelOnly
        # → ModelSamplingAuraFlow shift 3 → KSampler euler simple, cfg 1, 8 (4) steps.
        NativeRoute(source="lightx2v Qwen-Image-Lightning workflows",
                    model_sampling=("ModelSamplingAuraFlow", {"shift": 3.0})),
        # Comfy-Org/workflow_templates templates/image_qwen_image.json: the Lightning 8-step LoRA with
        # ModelSamplingAuraFlow shift 3.1, KSampler euler simple; its notes: "+ 8steps LoRA: 8 steps, cfg 1.0".
        NativeRoute(source="Comfy-Org template image_qwen_image",
                    model_sampling=("ModelSamplingAuraFlow", {"shift": 3.1})),
    ),
    "flux_turbo_alpha": (FLUX_DEV_EXAMPLE,),
    "hyper_flux": (FLUX_DEV_EXAMPLE,),
    "z_image_turbo": (
        # ComfyUI_examples z_image/z_image_turbo_example.png: KSampler euler simple, 9 steps, cfg 1, no
        # ModelSampling node (the model's own: ZImage, shift 3.0).
        NativeRoute(source="ComfyUI_examples z_image_turbo_example"),
        # Comfy-Org/workflow_templates templates/image_z_image_turbo.json: ModelSamplingAuraFlow shift 3,
        # KSampler res_multistep simple, 8 steps, cfg 1 (negative: ConditioningZeroOut, unused at cfg 1).
        NativeRoute(source="Comfy-Org template image_z_image_turbo", sampler="res_multistep", steps=8,
                    model_sampling=("ModelSamplingAuraFlow", {"shift": 3.0})),
    ),
}


def flow_cases(family_bases: dict[str, str], families=None) -> list[tuple[str, int, float, tuple[int, int]]]:
    """(family, steps, denoise, latent (h, w)) per family with a tiny base: each published step count at
    64²; the card's own count also at 128×64 (the resolution-dependent shifts) and as img2img at 0.5."""
    from comfyui_fewstep.fewstep.families import get_family

    cases = []
    for family in family_bases:
        if families and family not in families:
            continue
        published = get_family(family).flow.published_steps
        cases += [(family, steps, 1.0, (8, 8)) for steps in published]
        cases += [(family, published[0], 1.0, (16, 8)), (family, published[0], 0.5, (8, 8))]
    return cases


def _common_nodes(tiny, latent_size, latent_file) -> dict:
    height, width = (side * 8 for side in latent_size)
    return {
        "unet": {"class_type": "UNETLoader", "inputs": {"unet_name": tiny.unet_name, "weight_dtype": "default"}},
        "cond": {"class_type": flow_conditioning.NODE_NAME, "inputs": {"base": tiny.base, "negative": False}},
        "latent_in": ({"class_type": "LoadLatent", "inputs": {"latent": latent_file}} if latent_file else
                      {"class_type": "EmptySD3LatentImage", "inputs": {"width": width, "height": height, "batch_size": 1}}),
        "save": {"class_type": "SaveLatent", "inputs": {"samples": ["sample", 0], "filename_prefix": "fewstep_fidelity"}},
    }


def _guided(prompt: dict, family: str) -> list:
    """The positive conditioning, through FluxGuidance where the family has a distilled guidance value."""
    from comfyui_fewstep.fewstep.families import get_family

    guidance = get_family(family).flow.guidance
    if guidance is None:
        return ["cond", 0]
    prompt["guided"] = {"class_type": "FluxGuidance", "inputs": {"conditioning": ["cond", 0], "guidance": guidance}}
    return ["guided", 0]


def native_flow_prompt(tiny, family, route: NativeRoute, steps, denoise, latent_size, latent_file=None) -> dict:
    prompt = _common_nodes(tiny, latent_size, latent_file)
    model = ["unet", 0]
    if route.model_sampling is not None:
        class_type, inputs = route.model_sampling
        if class_type == "ModelSamplingFlux":
            inputs = {**inputs, "width": latent_size[1] * 8, "height": latent_size[0] * 8}
        prompt["model"] = {"class_type": class_type, "inputs": {"model": ["unet", 0], **inputs}}
        model = ["model", 0]
    positive, negative = _guided(prompt, family), ["cond", 0]
    if route.cfg != 1.0:
        prompt["uncond"] = {"class_type": flow_conditioning.NODE_NAME, "inputs": {"base": tiny.base, "negative": True}}
        negative = ["uncond", 0]
    steps = route.steps or steps
    if route.custom_advanced:
        prompt.update({
            "noise": {"class_type": "RandomNoise", "inputs": {"noise_seed": SEED}},
            "guider": {"class_type": "BasicGuider", "inputs": {"model": model, "conditioning": positive}},
            "sampler": {"class_type": "KSamplerSelect", "inputs": {"sampler_name": route.sampler}},
            "sigmas": {"class_type": "BasicScheduler", "inputs": {
                "model": model, "scheduler": route.scheduler, "steps": steps, "denoise": denoise}},
            "sample": {"class_type": "SamplerCustomAdvanced", "inputs": {
                "noise": ["noise", 0], "guider": ["guider", 0], "sampler": ["sampler", 0],
                "sigmas": ["sigmas", 0], "latent_image": ["latent_in", 0]}},
        })
    else:
        prompt["sample"] = {"class_type": "KSampler", "inputs": {
            "model": model, "seed": SEED, "steps": steps, "cfg": route.cfg, "sampler_name": route.sampler,
            "scheduler": route.scheduler, "positive": positive, "negative": negative,
            "latent_image": ["latent_in", 0], "denoise": denoise}}
    return prompt


def fewstep_flow_prompt(tiny, family, steps, denoise, latent_size, latent_file=None) -> dict:
    """Few-Step Scheduler + Sampler in SamplerCustom, as the pack's flow workflows wire them."""
    prompt = _common_nodes(tiny, latent_size, latent_file)
    positive = _guided(prompt, family)
    prompt["sigmas"] = {"class_type": "FewStepScheduler", "inputs": {
        "model": ["unet", 0], "family": family, "steps": steps, "denoise": denoise, "latent_image": ["latent_in", 0]}}
    prompt["sampler"] = {"class_type": "FewStepSampler", "inputs": {"family": family}}
    prompt["sample"] = {"class_type": "SamplerCustom", "inputs": {
        "model": ["unet", 0], "add_noise": True, "noise_seed": SEED, "cfg": 1.0, "positive": positive,
        "negative": ["cond", 0], "sampler": ["sampler", 0], "sigmas": ["sigmas", 0], "latent_image": ["latent_in", 0]}}
    return prompt


def _image_latent(harness, latent_size) -> tuple[str, torch.Tensor]:
    """A fixed 'encoded image' (a VAE latent, ComfyUI units) saved for LoadLatent."""
    latent = torch.randn(1, 16, *latent_size, generator=torch.Generator().manual_seed(5))
    name = f"fewstep_fidelity_image_{latent_size[0]}x{latent_size[1]}.latent"
    save_file({"latent_tensor": latent, "latent_format_version_0": torch.tensor([])},
              str(harness.base_directory / "input" / name))
    return name, latent


def _processed(latent_format, latent: torch.Tensor) -> torch.Tensor:
    """latent_format.process_in of a (1, 16, h, w) LATENT, in that layout: Wan 2.1's (Qwen-Image's)
    per-channel mean and std are 5-D, so the latent takes a frame axis for it, as ComfyUI's sampler gives it."""
    if latent_format.latent_dimensions == 3:
        return latent_format.process_in(latent.unsqueeze(2)).squeeze(2)
    return latent_format.process_in(latent)


def _release(harness) -> None:
    """Let the last base go: the executor's cached outputs hold its MODEL (the tiny FLUX is 1.6 GB)."""
    import comfy.model_management

    harness.forget_outputs()
    comfy.model_management.unload_all_models()
    gc.collect()


def run_flow(harness, families=None) -> list[tuple]:
    """Rows (family, steps, denoise, latent size, route, native Δ, FewStep Δ), one base in memory at a time."""
    import comfy.supported_models
    from flow_reference import FAMILY_BASES, FlowReference
    from tiny_flow_models import build_flow_model

    harness.nodes.NODE_CLASS_MAPPINGS[flow_conditioning.NODE_NAME] = flow_conditioning.FewStepTestConditioning
    cases = flow_cases(FAMILY_BASES, families)
    cases.sort(key=lambda case: list(FAMILY_BASES.values()).index(FAMILY_BASES[case[0]]))
    rows, base, tiny, reference = [], None, None, None
    for family, steps, denoise, latent_size in cases:
        if FAMILY_BASES[family] != base:
            tiny = reference = None
            _release(harness)
            base = FAMILY_BASES[family]
            tiny = build_flow_model(base, harness.models_dir)
            reference = FlowReference(tiny)
        latent_format = getattr(comfy.supported_models, tiny.comfy_class).latent_format()
        latent_file, image = _image_latent(harness, latent_size) if denoise < 1 else (None, None)
        expected = reference.sample(family, steps, denoise, latent_size, SEED,
                                    None if image is None else _processed(latent_format, image))

        def distance(prompt) -> float:
            # Qwen-Image's LATENT comes out 5-D, with the frame axis ComfyUI's sampler gives it.
            ours = latent_format.process_in(harness.run(prompt).latent("save"))
            if ours.shape != expected.shape:
                raise RuntimeError(f"{family}: ComfyUI's latent {tuple(ours.shape)} against diffusers' {tuple(expected.shape)}")
            return (ours - expected).abs().max().item()

        fewstep = distance(fewstep_flow_prompt(tiny, family, steps, denoise, latent_size, latent_file))
        for route in NATIVE_FLOW_ROUTES[family]:
            native = distance(native_flow_prompt(tiny, family, route, steps, denoise, latent_size, latent_file))
            rows.append((family, steps, denoise, latent_size, route, native, fewstep))
    _release(harness)
    del harness.nodes.NODE_CLASS_MAPPINGS[flow_conditioning.NODE_NAME]
    return rows


def print_flow_table(rows) -> None:
    print("\nmax |Δ| of the final latent from the family's diffusers pipeline (the transformer's latent "
          "space, tiny random-weight transformers, fp32 CPU)\n")
    print("| family | steps | denoise | image | native ComfyUI route | from | native max abs diff | FewStep max abs diff |")
    print("|---|---|---|---|---|---|---|---|")
    for family, steps, denoise, (h, w), route, native, ours in rows:
        print(f"| {family} | {steps} | {denoise:g} | {w * 8}×{h * 8} | {route.describe()} | {route.source} "
              f"| {native:.3g} | {ours:.1e} |")
