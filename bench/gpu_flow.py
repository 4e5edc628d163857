"""bench/gpu.py's flow-matching rows: FLUX.1-schnell and SD3.5 Large Turbo, 4 steps at 1024².

The transformers are diffusers' own classes at the published configs (black-forest-labs/FLUX.1-schnell,
stabilityai/stable-diffusion-3.5-large-turbo: transformer/config.json) with random bf16 weights, made on
the device; the VAE is the real 16-channel AutoencoderKL (FLUX's ae / SD3's VAE: same layers, their own
scaling and shift). The diffusers pipeline uses these modules; ComfyUI reads the same weights from files
written here in its own layout (the transformer through comfy.model_detection.convert_diffusers_mmdit, as
its UNETLoader would convert a diffusers file; the VAE in the ldm layout), through UNETLoader and VAELoader.

Text encoding is outside the timed part: real-size T5-XXL adds nothing to a sampler's speed, so both sides
get the same random conditioning tensors, shaped as each pipeline's encoders return them (FLUX: 256 T5
tokens, schnell's max_sequence_length, and the 768-wide CLIP pooled vector; SD3: 77 CLIP + 256 T5 tokens
and the 2048-wide pooled vector). ComfyUI takes them from a bench node standing in for CLIPTextEncode.

The columns, as a ComfyUI user runs each model: native is what ComfyUI's examples use (FLUX.1-schnell:
KSampler, euler, simple, 4 steps, cfg 1; SD3.5 Large Turbo: the SD3.5 example's KSampler, euler,
sgm_uniform, at 4 steps and cfg 1.2 as its notes set for Turbo, so with the negative prompt evaluated
too); FewStep is Few-Step Scheduler + Sampler in SamplerCustom at cfg 1 (the cards' guidance 0); the
accelerated column adds Few-Step Accelerate.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "testing"))
import pack  # noqa: E402,F401 — registers the pack as the `comfyui_fewstep` package

from real_size_models import FLUX_SCHNELL_TRANSFORMER, SD35_LARGE_TRANSFORMER, VAE_16, VAE_16_SCALING  # noqa: E402

from gpu_models import Built, Config, SEED, add_decode_and_sink, add_fewstep_sampling  # noqa: E402
from gpu_timing import log  # noqa: E402

FLOW_BASES = ("flux_schnell", "sd35_large")

FLOW_CONFIGS = [
    Config("flux_schnell", "FLUX.1-schnell 4-step 1024²", "flux_schnell", "flux_schnell", 4, 1024, batches=(1,)),
    Config("sd35_turbo", "SD3.5 Large Turbo 4-step 1024²", "sd35_large", "sd35_large_turbo", 4, 1024, batches=(1,)),
]

# ComfyUI's examples for each model (comfyanonymous/ComfyUI_examples: flux, sd3).
NATIVE_FLOW_ROUTES = {
    "flux_schnell": dict(sampler_name="euler", scheduler="simple", cfg=1.0),
    "sd35_large_turbo": dict(sampler_name="euler", scheduler="sgm_uniform", cfg=1.2),
}

# base → (transformer class, published config, VAE scaling_factor, shift_factor, (text tokens, pooled width))
FLOW_MODELS = {
    "flux_schnell": ("FluxTransformer2DModel", FLUX_SCHNELL_TRANSFORMER, *VAE_16_SCALING["flux"], (256, 768)),
    "sd35_large": ("SD3Transformer2DModel", SD35_LARGE_TRANSFORMER, *VAE_16_SCALING["sd3"], (77 + 256, 2048)),
}
TEXT_WIDTH = 4096  # T5-XXL's hidden size: the transformers' joint_attention_dim


def is_flow(config: Config) -> bool:
    return config.base in FLOW_BASES


def random_conditioning(tokens: int, text_width: int, pooled_width: int, device, dtype) -> dict:
    """Stand-ins for the text encoders' output, positive and negative, the same tensors for both sides."""
    generator = torch.Generator("cpu").manual_seed(SEED + 3)
    out = {}
    for tag in ("positive", "negative"):
        out[tag] = (torch.randn(1, tokens, text_width, generator=generator).to(device, dtype),
                    torch.randn(1, pooled_width, generator=generator).to(device, dtype))
    return out


def _vae(base: str, device, dtype):
    from diffusers import AutoencoderKL

    _, _, scale, shift, _ = FLOW_MODELS[base]
    torch.manual_seed(SEED + 1)
    with torch.device(device):
        return AutoencoderKL(**VAE_16, scaling_factor=scale, shift_factor=shift, force_upcast=False).to(dtype).eval()


def _save(path: Path, tensors: dict) -> None:
    from real_size_models import write_tensors

    write_tensors(path, tensors)


def build_flow(base: str, models_dir: Path, device: str, dtype, tiny: bool) -> Built:
    """The `base` transformer and VAE (real size, or the tests' tiny transformer for --smoke/--tiny), the
    files ComfyUI loads, and the diffusers pipeline over the same modules."""
    import diffusers
    import tiny_models
    import tiny_flow_models
    from comfy.model_detection import convert_diffusers_mmdit

    started = time.perf_counter()
    class_name, config, _, _, (tokens, pooled) = FLOW_MODELS[base]
    vae = _vae(base, device, dtype)
    vae_name = f"bench_{base}_vae.safetensors"
    _save(models_dir / "vae" / vae_name, tiny_models.vae_to_ldm(vae.state_dict()))
    if tiny:
        built_tiny = tiny_flow_models.build_flow_model(base, models_dir)
        transformer = getattr(diffusers, class_name).from_pretrained(str(built_tiny.transformer_dir),
                                                                     torch_dtype=dtype).to(device).eval()
        unet_name = built_tiny.unet_name
        conditioning = random_conditioning(tiny_flow_models.TEXT_TOKENS, tiny_flow_models.TEXT_DIM,
                                           tiny_flow_models.POOLED_DIM, device, dtype)
    else:
        torch.manual_seed(SEED)
        with torch.device(device):  # the library's own init, in fp32, then cast: as a checkpoint would be
            transformer = getattr(diffusers, class_name)(**config).to(dtype).eval()
        unet_name = f"bench_{base}_transformer.safetensors"
        # ComfyUI's layout (as black-forest-labs / Stability publish the single files), converted by ComfyUI's own map
        converted = convert_diffusers_mmdit(transformer.state_dict(), "")
        _save(models_dir / "diffusion_models" / unet_name, converted)
        del converted
        conditioning = random_conditioning(tokens, TEXT_WIDTH, pooled, device, dtype)
    params = sum(p.numel() for p in transformer.parameters()) / 1e9
    size = (models_dir / "diffusion_models" / unet_name).stat().st_size / 2**30
    log(f"built {base}: transformer {params:.2f}B parameters, file {size:.2f} GiB, {time.perf_counter() - started:.1f}s")

    def pipeline():
        from diffusers import FlowMatchEulerDiscreteScheduler

        from comfyui_fewstep.fewstep.families import get_family

        family = get_family("flux_schnell" if base == "flux_schnell" else "sd35_large_turbo")
        scheduler = FlowMatchEulerDiscreteScheduler.from_config(dict(family.scheduler_overrides))
        if base == "flux_schnell":
            return diffusers.FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=None, tokenizer=None,
                                          text_encoder_2=None, tokenizer_2=None, transformer=transformer)
        return diffusers.StableDiffusion3Pipeline(transformer=transformer, scheduler=scheduler, vae=vae,
                                                  text_encoder=None, tokenizer=None, text_encoder_2=None,
                                                  tokenizer_2=None, text_encoder_3=None, tokenizer_3=None)

    return Built(None, pipeline, unet_name=unet_name, vae_name=vae_name, conditioning=conditioning,
                 files=[models_dir / "vae" / vae_name] + ([] if tiny else [models_dir / "diffusion_models" / unet_name]))


def diffusers_flow_inputs(built: Built) -> dict:
    """The pipeline's text inputs: the conditioning tensors (no CFG at the cards' guidance 0)."""
    embeds, pooled = built.conditioning["positive"]
    return {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}


class BenchFlowConditioning:
    """Bench node standing in for CLIPTextEncode: the fixed conditioning tensors of `tag`, shaped as ComfyUI's
    text encoders return them ([[hidden states, {"pooled_output": pooled}]])."""

    tensors: dict = {}

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"tag": ("STRING", {"default": "positive"})}}

    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "encode"
    CATEGORY = "_bench"

    def encode(self, tag):
        embeds, pooled = self.tensors[tag]
        return ([[embeds, {"pooled_output": pooled}]],)


def flow_prompt(config: Config, built: Built, route: str, batch: int, seed: int, tag: str = "main",
                chain: str = "", accelerate: dict | None = None) -> dict:
    """bench/gpu_comfy.comfy_prompt for the flow rows: UNETLoader and VAELoader read the files written
    above, the bench conditioning node stands in for the text encoders."""
    BenchFlowConditioning.tensors = built.conditioning
    p = chain
    prompt = {
        "unet": {"class_type": "UNETLoader", "inputs": {"unet_name": built.unet_name, "weight_dtype": "default"}},
        "vae": {"class_type": "VAELoader", "inputs": {"vae_name": built.vae_name}},
        "pos": {"class_type": "FewStepBenchFlowConditioning", "inputs": {"tag": "positive"}},
        "neg": {"class_type": "FewStepBenchFlowConditioning", "inputs": {"tag": "negative"}},
        f"{p}latent": {"class_type": "EmptySD3LatentImage",
                       "inputs": {"width": config.size, "height": config.size, "batch_size": batch}},
    }
    model, vae = ["unet", 0], ["vae", 0]
    if route == "accelerated":
        prompt["accel"] = {"class_type": "FewStepAccelerate", "inputs": {
            "model": model, "vae": vae, "max_shapes": 4, **(accelerate or {})}}
        model, vae = ["accel", 0], ["accel", 1]
    common = {"positive": ["pos", 0], "negative": ["neg", 0], "latent_image": [f"{p}latent", 0]}
    if route == "native":
        prompt[f"{p}sample"] = {"class_type": "KSampler", "inputs": {
            "model": model, "seed": seed, "steps": config.steps, "denoise": 1.0,
            **NATIVE_FLOW_ROUTES[config.family], **common}}
    else:
        add_fewstep_sampling(prompt, p, model, config, seed, common, latent_image=[f"{p}latent", 0])
    add_decode_and_sink(prompt, p, vae, tag)
    return prompt


def transformer_classes() -> list:
    """ComfyUI's diffusion-model classes of the flow rows: their forward is timed per call."""
    from comfy.ldm.flux.model import Flux
    from comfy.ldm.modules.diffusionmodules.mmdit import OpenAISignatureMMDITWrapper

    return [Flux, OpenAISignatureMMDITWrapper]
