"""Tiny stand-ins for the published model files the example workflows name, under those very names.

The workflows name the files people download (sd_xl_base_1.0.safetensors,
sdxl_lightning_4step_lora.safetensors, …). None can be downloaded here, so each named file is put in
a ComfyUI base directory's models folders as a link to a tiny random-weight file of the same base
(SD1.5 or SDXL family) and kind, in a real layout: the workflow runs unchanged, and the loaders still
detect the family from the published name. Images a LoadImage node names become a fixed noise PNG.

ComfyUI must be importable (the tiny models are built with its key maps).
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

import lora_factory
import tiny_models

# EmptyLatentImage / ImageScale width/height (pixels) the CPU runs use: SDXL-sized latents would cost minutes of
# VAE decode per workflow on 2 cores; the sampling maths does not depend on the size.
CPU_TEST_SIZE = 128

# ComfyUI input name → models folder
MODEL_INPUTS = {
    "ckpt_name": "checkpoints",
    "unet_name": "diffusion_models",
    "lora_name": "loras",
    "control_net_name": "controlnet",
}
SDXL_MARKS = ("xl", "dmd2", "lightning", "koala", "vega", "ssd-1b")
# Loaders of separate text encoders and VAEs: the flow-matching bases' workflows (FLUX, SD3.5, Qwen-Image,
# Z-Image) load them, and ComfyUI builds those encoders (T5-XXL, Qwen2.5-VL 7B, Qwen3-4B) from fixed
# full-size configs whatever the file holds, so no tiny stand-in can take their place.
TEXT_ENCODER_LOADERS = ("CLIPLoader", "DualCLIPLoader", "TripleCLIPLoader")
# Every file-name input of the example workflows' loaders → its models folder.
FILE_INPUTS = {
    **MODEL_INPUTS,
    "clip_name": "text_encoders",
    "clip_name1": "text_encoders",
    "clip_name2": "text_encoders",
    "clip_name3": "text_encoders",
    "vae_name": "vae",
}


def base_of(published_name: str) -> str:
    """"sdxl" or "sd15" from a published file name (every SDXL release says so in its name)."""
    lowered = published_name.lower()
    return "sdxl" if any(mark in lowered for mark in SDXL_MARKS) else "sd15"


def _tiny(base: str, models_dir: Path) -> tiny_models.TinyModel:
    return (tiny_models.build_sdxl if base == "sdxl" else tiny_models.build_sd15)(models_dir)


def _stand_in_lora(tiny: tiny_models.TinyModel) -> Path:
    """A rank-4 kohya-layout LoRA on every attention projection of the tiny UNet (cached)."""
    path = tiny_models.cache_dir() / f"stand_in_lora_{tiny.base}.safetensors"
    if not path.is_file():
        peft = lora_factory.peft_lora(tiny, 4, seed=11, targets=lora_factory.ATTENTION_TARGETS, text_encoder=False)
        partial = path.with_suffix(f".partial-{os.getpid()}")
        lora_factory.save(lora_factory.to_kohya(peft, alpha=4.0), partial.parent, partial.name)
        partial.rename(path)
    return path


def _stand_in_controlnet(tiny: tiny_models.TinyModel) -> Path:
    path = tiny_models.cache_dir() / f"stand_in_controlnet_{tiny.base}.safetensors"
    if not path.is_file():
        tiny_models.build_controlnet(tiny, path)
    return path


def _stand_in_image(path: Path) -> None:
    from PIL import Image

    generator = torch.Generator().manual_seed(3)
    pixels = (torch.rand(CPU_TEST_SIZE, CPU_TEST_SIZE, 3, generator=generator) * 255).to(torch.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels.numpy()).save(path)


def _link(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.is_symlink() or target.exists():
        target.unlink()
    target.symlink_to(source)


def install_stand_ins(prompt: dict, base_dir: Path) -> list[str]:
    """Put a tiny stand-in under every file name `prompt` (API format) loads; returns what it placed."""
    base_dir = Path(base_dir)
    encoders = sorted({node["class_type"] for node in prompt.values() if node["class_type"] in TEXT_ENCODER_LOADERS})
    if encoders:
        raise ValueError(
            f"this workflow loads its text encoders separately ({', '.join(encoders)}): ComfyUI builds T5-XXL, "
            "Qwen2.5-VL and Qwen3-4B at full size whatever the file holds, so there is no tiny stand-in for them; "
            "run it with --models pointing at the real files (the workflow's note says where to get each)."
        )
    models_dir = base_dir / "models"
    placed = []
    for node in prompt.values():
        inputs = node["inputs"]
        for input_name, folder in MODEL_INPUTS.items():
            published = inputs.get(input_name)
            if not isinstance(published, str):
                continue
            base = base_of(published)
            tiny = _tiny(base, models_dir)
            if folder == "checkpoints":
                source = tiny.diffusers_dir.parent / tiny.checkpoint_name
            elif folder == "diffusion_models":
                source = tiny.diffusers_dir.parent / tiny.unet_name
            elif folder == "loras":
                source = _stand_in_lora(tiny)
            else:
                source = _stand_in_controlnet(tiny)
            _link(source.resolve(), models_dir / folder / published)
            placed.append(f"{folder}/{published} ← tiny {base} stand-in (random weights)")
        if node["class_type"] == "LoadImage" and isinstance(inputs.get("image"), str):
            image = base_dir / "input" / inputs["image"]
            if not image.exists():
                _stand_in_image(image)
            placed.append(f"input/{inputs['image']} ← {CPU_TEST_SIZE}² noise image")
    return placed


def place_file_names(prompt: dict, base_dir: Path) -> list[str]:
    """A .safetensors file holding no tensor under every file name `prompt` (API format) loads, where none
    is: enough for ComfyUI to list it (the loaders' choices, so the prompt validates and the frontend opens
    it without a missing model) and for FewStep to read its header, never to load it. Returns what it made."""
    from safetensors.torch import save_file

    made = []
    for node in prompt.values():
        for input_name, folder in FILE_INPUTS.items():
            published = node["inputs"].get(input_name)
            path = Path(base_dir) / "models" / folder / str(published)
            if isinstance(published, str) and not (path.exists() or path.is_symlink()):
                path.parent.mkdir(parents=True, exist_ok=True)
                save_file({}, str(path))
                made.append(f"{folder}/{published}")
    return made


# FLUX.1's VAE (ae.safetensors) as diffusers' AutoencoderKL holds it (black-forest-labs/FLUX.1-schnell's
# vae/config.json): 16 latent channels, no quant convs. ComfyUI builds it from these shapes, so it is the
# real size (84M parameters); a 128² decode takes a second.
FLUX_VAE_CONFIG = dict(
    in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2,
    use_quant_conv=False, use_post_quant_conv=False, scaling_factor=0.3611, shift_factor=0.1159,
)
FLUX_STAND_IN_VERSION = "w1"  # bump whenever what _build_flux_stand_ins writes changes
# A LoRA on the tiny FLUX in ComfyUI's layout (what its LoraSave writes), on the double block's attention
# output projections: enough for Few-Step LoRA Loader to match every key and patch the model.
FLUX_LORA_MODULES = ("double_blocks.0.img_attn.proj", "double_blocks.0.txt_attn.proj")
FLUX_HIDDEN = 3072  # the tiny FLUX keeps FLUX's width (tiny_flow_models)


def _build_flux_stand_ins(folder: Path) -> None:
    from diffusers import AutoencoderKL
    from safetensors.torch import save_file

    torch.manual_seed(5)
    vae = AutoencoderKL(**FLUX_VAE_CONFIG)
    save_file({k: v.contiguous() for k, v in vae.state_dict().items()}, str(folder / "flux_vae.safetensors"))
    generator, rank, lora = torch.Generator().manual_seed(6), 4, {}
    for module in FLUX_LORA_MODULES:
        lora[f"diffusion_model.{module}.lora_down.weight"] = torch.randn(rank, FLUX_HIDDEN, generator=generator) * 0.02
        lora[f"diffusion_model.{module}.lora_up.weight"] = torch.randn(FLUX_HIDDEN, rank, generator=generator) * 0.02
        lora[f"diffusion_model.{module}.alpha"] = torch.tensor(float(rank))
    save_file(lora, str(folder / "flux_lora.safetensors"))


# Published diffusion-model names (lower case) → the tiny_flow_models base standing in for them.
FLOW_BASES = {"flux1-schnell": "flux_schnell", "flux1-dev": "flux_dev", "z_image": "z_image"}


def flow_base_of(published_name: str) -> str:
    for mark, base in FLOW_BASES.items():
        if published_name.lower().startswith(mark):
            return base
    raise ValueError(
        f"{published_name}: no tiny stand-in for this diffusion model (stand-ins: {', '.join(FLOW_BASES)})")


def install_flow_stand_ins(prompt: dict, base_dir: Path) -> list[str]:
    """For a FLUX or Z-Image workflow: the tiny transformer (tiny_flow_models), a random FLUX VAE (Z-Image
    uses FLUX's) and a tiny FLUX LoRA under the published names it loads. Its text encoders have none
    (TEXT_ENCODER_LOADERS): replace them with with_conditioning_stand_in. Returns the links it made
    (folder/name under models)."""
    import tiny_flow_models

    models_dir = Path(base_dir) / "models"
    folder = tiny_models.cached_build(f"workflow_flux_{FLUX_STAND_IN_VERSION}", _build_flux_stand_ins)
    placed = []
    for node in prompt.values():
        inputs = node["inputs"]
        if isinstance(inputs.get("unet_name"), str):
            tiny = tiny_flow_models.build_flow_model(flow_base_of(inputs["unet_name"]), models_dir)
            source, target = models_dir / "diffusion_models" / tiny.unet_name, ("diffusion_models", inputs["unet_name"])
        elif isinstance(inputs.get("vae_name"), str):
            source, target = folder / "flux_vae.safetensors", ("vae", inputs["vae_name"])
        elif isinstance(inputs.get("lora_name"), str):
            source, target = folder / "flux_lora.safetensors", ("loras", inputs["lora_name"])
        else:
            continue
        _link(source.resolve(), models_dir / target[0] / target[1])
        placed.append(f"{target[0]}/{target[1]}")
    return placed


def with_conditioning_stand_in(prompt: dict, node_type: str, base: str) -> dict:
    """`prompt` with every Text Encode node replaced by `node_type`, a test node giving fixed conditioning
    as wide as the tiny `base` transformer reads (input `base`), and the text-encoder loaders left out."""
    changed = {}
    for node_id, node in prompt.items():
        if node["class_type"] == "CLIPTextEncode":
            changed[node_id] = {"class_type": node_type, "inputs": {"base": base}}
        elif node["class_type"] not in TEXT_ENCODER_LOADERS:
            changed[node_id] = node
    return changed


# Nodes whose width/height widgets set the picture size a workflow samples at.
SIZED_NODES = ("EmptyLatentImage", "EmptySD3LatentImage", "ImageScale")


def shrink_sizes(prompt: dict, size: int = CPU_TEST_SIZE) -> list[str]:
    """Set every Empty (SD3) Latent Image and Image Scale to size × size pixels (CPU runs); returns what changed."""
    changed = []
    for node_id, node in prompt.items():
        if node["class_type"] in SIZED_NODES:
            inputs = node["inputs"]
            changed.append(f"#{node_id} {node['class_type']} {inputs.get('width')}×{inputs.get('height')} → {size}×{size}")
            inputs["width"] = inputs["height"] = size
    return changed
