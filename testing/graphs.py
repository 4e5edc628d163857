"""API-format prompts the tests and benches run in real ComfyUI."""
from __future__ import annotations

import torch
from safetensors.torch import save_file

from diffusers_reference import IMAGE_SIZE

PROMPT = "a photo of a red fox in the snow, highly detailed"
SEED = 42


def latent_input(latent_file: str | None) -> dict:
    if latent_file is None:
        return {"class_type": "EmptyLatentImage",
                "inputs": {"width": IMAGE_SIZE, "height": IMAGE_SIZE, "batch_size": 1}}
    return {"class_type": "LoadLatent", "inputs": {"latent": latent_file}}


def text_and_model(tiny, negative: str) -> dict:
    return {
        "ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": tiny.checkpoint_name}},
        "pos": {"class_type": "CLIPTextEncode", "inputs": {"text": PROMPT, "clip": ["ckpt", 1]}},
        "neg": {"class_type": "CLIPTextEncode", "inputs": {"text": negative, "clip": ["ckpt", 1]}},
        "save": {"class_type": "SaveLatent", "inputs": {"samples": ["sample", 0], "filename_prefix": "fewstep"}},
    }


def sampling_prompt(tiny, family, steps, denoise, cfg=1.0, negative="", latent_file=None) -> dict:
    """Our scheduler and sampler in ComfyUI's SamplerCustom; "save" holds the final latent."""
    return {
        **text_and_model(tiny, negative),
        "latent_in": latent_input(latent_file),
        "sigmas": {"class_type": "FewStepScheduler",
                   "inputs": {"model": ["ckpt", 0], "family": family, "steps": steps, "denoise": denoise}},
        "sampler": {"class_type": "FewStepSampler", "inputs": {"family": family}},
        "sample": {"class_type": "SamplerCustom", "inputs": {
            "model": ["ckpt", 0], "add_noise": True, "noise_seed": SEED, "cfg": cfg,
            "positive": ["pos", 0], "negative": ["neg", 0], "sampler": ["sampler", 0],
            "sigmas": ["sigmas", 0], "latent_image": ["latent_in", 0]}},
    }


def image_latent(comfy, tiny) -> tuple[str, torch.Tensor]:
    """A fixed 'encoded image' in ComfyUI units, saved as a .latent LoadLatent reads unscaled."""
    latent = torch.randn(1, 4, IMAGE_SIZE // 8, IMAGE_SIZE // 8, generator=torch.Generator().manual_seed(5))
    name = f"fewstep_image_{tiny.base}.latent"
    save_file({"latent_tensor": latent, "latent_format_version_0": torch.tensor([])},
              str(comfy.base_directory / "input" / name))
    return name, latent


