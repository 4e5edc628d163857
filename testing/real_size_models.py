"""Random-weight model files at real size, under the names people download, in the layouts ComfyUI reads.

For the GPU runs of the flow-matching workflows (bench/workflow_gpu_check.py) and the flow rows of
bench/gpu.py: speed and crashes do not depend on the values, but on every shape, dtype and key. So each
file's keys and shapes come from ComfyUI's own module classes built on the meta device (no memory):

- diffusion models: ComfyUI's own model (model_config.get_model) for the config its detection reads from
  a state dict of the published architecture: diffusers' FluxTransformer2DModel / SD3Transformer2DModel /
  QwenImageTransformer2DModel at the published configs (FLUX and SD3 converted by ComfyUI's own
  convert_diffusers_mmdit), Z-Image from the keys its detection reads. What gets written is that model's
  state dict: ComfyUI's (BFL / SAI / Qwen / Lumina) layout, as the single files are published.
- text encoders: ComfyUI's CLIP-L, CLIP-G, T5-XXL, Qwen2.5-VL-7B and Qwen3-4B classes (their state dicts
  are what CLIPLoader / DualCLIPLoader / TripleCLIPLoader load).
- VAEs: FLUX's / SD3's 16-channel AutoencoderKL (diffusers' class, ldm layout) and Qwen-Image's Wan 2.1 VAE
  (ComfyUI's class).
- LoRAs: PEFT's LoRA layers on diffusers' transformer (meta), in the layout each release uses: diffusers
  ("transformer.….lora_A.weight": Hyper-FLUX, FLUX.1-Turbo-Alpha) or lightx2v's (module names, lora_down/
  lora_up/alpha: Qwen-Image-Lightning).

Values are drawn per tensor (on the GPU where there is one) and streamed into the .safetensors file, so a
24 GB file needs no 24 GB of host memory. fp8 files (names with "fp8") hold float8_e4m3fn matrices and
bf16 vectors; the published "_fp8_scaled" files also carry per-tensor scales, which these do not.
"""
from __future__ import annotations

import functools
import json
import math
import time
import re
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

# transformer/config.json of the published repositories
FLUX_SCHNELL_TRANSFORMER = dict(
    patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
    num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=False,
    axes_dims_rope=(16, 56, 56),
)
FLUX_DEV_TRANSFORMER = {**FLUX_SCHNELL_TRANSFORMER, "guidance_embeds": True}
SD35_LARGE_TRANSFORMER = dict(
    sample_size=128, patch_size=2, in_channels=16, num_layers=38, attention_head_dim=64, num_attention_heads=38,
    joint_attention_dim=4096, caption_projection_dim=2432, pooled_projection_dim=2048, out_channels=16,
    pos_embed_max_size=192, qk_norm="rms_norm",
)
QWEN_IMAGE_TRANSFORMER = dict(  # Qwen/Qwen-Image transformer/config.json (20B)
    patch_size=2, in_channels=64, out_channels=16, num_layers=60, attention_head_dim=128, num_attention_heads=24,
    joint_attention_dim=3584, guidance_embeds=False, axes_dims_rope=(16, 56, 56),
)
# FLUX's ae and SD3's VAE: the same layers, their own latent scaling and shift
VAE_16 = dict(
    in_channels=3, out_channels=3, latent_channels=16, down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
    norm_num_groups=32, use_quant_conv=False, use_post_quant_conv=False,
)
VAE_16_SCALING = {"flux": (0.3611, 0.1159), "sd3": (1.5305, 0.0609)}
Z_IMAGE = dict(dim=3840, n_layers=30, cap_feat_dim=2560)  # Tongyi-MAI/Z-Image-Turbo (6B)
LORA_RANK = 64

DIFFUSERS_TRANSFORMERS = {  # kind → diffusers class and config
    "flux_schnell": ("FluxTransformer2DModel", FLUX_SCHNELL_TRANSFORMER),
    "flux_dev": ("FluxTransformer2DModel", FLUX_DEV_TRANSFORMER),
    "sd35_large": ("SD3Transformer2DModel", SD35_LARGE_TRANSFORMER),
    "qwen_image": ("QwenImageTransformer2DModel", QWEN_IMAGE_TRANSFORMER),
}
# ComfyUI model config class each diffusion model must be detected as
COMFY_CLASSES = {"flux_schnell": "FluxSchnell", "flux_dev": "Flux", "sd35_large": "SD3", "qwen_image": "QwenImage",
                 "z_image": "ZImage"}

# (pattern on the lower-cased published file name, kind), first match wins
DIFFUSION_NAMES = [(r"flux1?-?schnell", "flux_schnell"), (r"flux1?-?dev", "flux_dev"), (r"sd3\.?5_large", "sd35_large"),
                   (r"qwen_image", "qwen_image"), (r"z_image", "z_image")]
TEXT_ENCODER_NAMES = [(r"clip_l", "clip_l"), (r"clip_g", "clip_g"), (r"t5xxl", "t5xxl"),
                      (r"qwen_2\.5_vl_7b|qwen2\.5-vl-7b", "qwen25_7b"), (r"qwen_3_4b|qwen3-4b", "qwen3_4b")]
VAE_NAMES = [(r"qwen_image_vae|wan_2\.1_vae|wan2\.1_vae", "wan21_vae"), (r"^ae\.|flux.*vae|flux_ae", "flux_vae"),
             (r"sd3.*vae", "sd3_vae")]
LORA_NAMES = [(r"qwen.image.*lightning", "qwen_image_lightning"), (r"flux", "flux_dev_lora")]
FOLDERS = {"unet_name": "diffusion_models", "ckpt_name": "checkpoints", "vae_name": "vae", "lora_name": "loras",
           "clip_name": "text_encoders", "clip_name1": "text_encoders", "clip_name2": "text_encoders",
           "clip_name3": "text_encoders"}


class UnknownModelFile(ValueError):
    """A published name this module has no real-size layout for."""


def _match(table, name: str, what: str) -> str:
    lowered = name.lower()
    for pattern, kind in table:
        if re.search(pattern, lowered):
            return kind
    raise UnknownModelFile(f"{what} '{name}': no real-size layout for it (known: {', '.join(k for _, k in table)})")


@dataclass
class FileSpec:
    folder: str  # ComfyUI models folder
    name: str  # the published file name
    kind: str
    shapes: dict  # key → shape
    dtypes: dict  # key → dtype

    @property
    def bytes(self) -> int:
        return sum(math.prod(s) * _itemsize(self.dtypes[k]) for k, s in self.shapes.items())

    def describe(self) -> str:
        params = sum(math.prod(s) for s in self.shapes.values()) / 1e9
        kinds = sorted({str(d).replace("torch.", "") for d in self.dtypes.values()})
        return f"{self.folder}/{self.name} ← {self.kind}, {params:.2f}B parameters, {'/'.join(kinds)}, random"


def _itemsize(dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


# ------------------------------------------------------------------------------------- shapes (meta)

def _shapes(state_dict: dict) -> dict:
    return {k: tuple(v.shape) for k, v in state_dict.items()}


def _comfy_model_shapes(seed: dict) -> tuple[dict, str]:
    """ComfyUI's model for what its detection reads from `seed` (meta tensors), built on meta: its keys/shapes."""
    from comfy.model_detection import model_config_from_unet

    model_config = model_config_from_unet(seed, "")
    if model_config is None:
        raise RuntimeError("ComfyUI's detection did not recognise the architecture")
    with torch.device("meta"):
        model = model_config.get_model(seed, "", device="meta")
    return _shapes(model.diffusion_model.state_dict()), type(model_config).__name__


def diffusion_model_shapes(kind: str) -> tuple[dict, str]:
    """(key → shape in ComfyUI's layout, ComfyUI model config class name) of a real-size diffusion model."""
    import diffusers
    from comfy.model_detection import convert_diffusers_mmdit

    if kind == "z_image":
        meta = lambda *shape: torch.empty(shape, device="meta")  # noqa: E731 — what detection reads
        seed = {"cap_embedder.1.weight": meta(Z_IMAGE["dim"], Z_IMAGE["cap_feat_dim"]), "cap_pad_token": meta(1, Z_IMAGE["dim"]),
                **{f"layers.{i}.attention_norm1.weight": meta(Z_IMAGE["dim"]) for i in range(Z_IMAGE["n_layers"])}}
        return _comfy_model_shapes(seed)
    class_name, config = DIFFUSERS_TRANSFORMERS[kind]
    with torch.device("meta"):
        transformer = getattr(diffusers, class_name)(**config)
    state = transformer.state_dict()
    seed = state if kind == "qwen_image" else convert_diffusers_mmdit(state, "")  # Qwen-Image: same names
    return _comfy_model_shapes(seed)


def vae_shapes(kind: str) -> dict:
    if kind == "wan21_vae":
        import comfy.ldm.wan.vae

        with torch.device("meta"):
            vae = comfy.ldm.wan.vae.WanVAE(dim=96, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
                                           temperal_downsample=[False, True, True], image_channels=3, dropout=0.0)
        return _shapes(vae.state_dict())
    from diffusers import AutoencoderKL

    import tiny_models

    with torch.device("meta"):
        vae = AutoencoderKL(**VAE_16)
    return _shapes(tiny_models.vae_to_ldm(vae.state_dict()))


def text_encoder_shapes(kind: str) -> dict:
    import comfy.sd1_clip
    import comfy.sdxl_clip
    import comfy.text_encoders.qwen_image
    import comfy.text_encoders.sd3_clip
    import comfy.text_encoders.z_image

    classes = {"clip_l": comfy.sd1_clip.SDClipModel, "clip_g": comfy.sdxl_clip.SDXLClipG,
               "t5xxl": comfy.text_encoders.sd3_clip.T5XXLModel,
               "qwen25_7b": comfy.text_encoders.qwen_image.Qwen25_7BVLIModel,
               "qwen3_4b": comfy.text_encoders.z_image.Qwen3_4BModel}
    with torch.device("meta"):
        encoder = classes[kind](device="meta", dtype=torch.bfloat16)
    return _shapes(encoder.transformer.state_dict())


def lora_shapes(kind: str) -> dict:
    """A rank-64 LoRA over the transformer's attention, MLP and modulation Linears, in the release's layout."""
    import diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    base = "qwen_image" if kind == "qwen_image_lightning" else "flux_dev"
    class_name, config = DIFFUSERS_TRANSFORMERS[base]
    targets = (["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
                "img_mlp.net.0.proj", "img_mlp.net.2", "txt_mlp.net.0.proj", "txt_mlp.net.2", "img_mod.1", "txt_mod.1"]
               if base == "qwen_image" else
               ["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
                "attn.add_v_proj", "attn.to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj",
                "ff_context.net.2", "norm1.linear", "norm1_context.linear", "proj_mlp", "proj_out"])
    with torch.device("meta"):
        transformer = getattr(diffusers, class_name)(**config)
        transformer.add_adapter(LoraConfig(r=LORA_RANK, lora_alpha=LORA_RANK, target_modules=targets,
                                           init_lora_weights=False))
        layers = _shapes(get_peft_model_state_dict(transformer))
    if kind == "qwen_image_lightning":  # lightx2v: module names, kohya's suffixes, an alpha per layer
        out = {}
        for key, shape in layers.items():
            out[key.replace(".lora_A.weight", ".lora_down.weight").replace(".lora_B.weight", ".lora_up.weight")] = shape
            if key.endswith(".lora_A.weight"):
                out[key.replace(".lora_A.weight", ".alpha")] = ()
        return out
    return {f"transformer.{k}": v for k, v in layers.items()}


# --------------------------------------------------------------------------------------------- specs

def _dtypes(shapes: dict, name: str, default) -> dict:
    fp8 = "fp8" in name.lower()
    return {k: (torch.float8_e4m3fn if fp8 and len(s) >= 2 else default) for k, s in shapes.items()}


@functools.lru_cache(maxsize=None)
def spec_for(input_name: str, published: str) -> tuple[FileSpec, ...]:
    """The file(s) a loader input names, at real size. A checkpoint (SD3.5's) holds the MMDiT and the VAE."""
    return tuple(_spec_for(input_name, published))


def _spec_for(input_name: str, published: str) -> list[FileSpec]:
    folder = FOLDERS[input_name]
    half = torch.float16 if "fp16" in published.lower() else torch.bfloat16
    if folder == "diffusion_models":
        kind = _match(DIFFUSION_NAMES, published, "diffusion model")
        shapes, _ = diffusion_model_shapes(kind)
        return [FileSpec(folder, published, kind, shapes, _dtypes(shapes, published, half))]
    if folder == "checkpoints":
        kind = _match(DIFFUSION_NAMES, published, "checkpoint")
        if kind != "sd35_large":
            raise UnknownModelFile(f"checkpoint '{published}': only SD3.5 single-file checkpoints are built at real size")
        model, _ = diffusion_model_shapes(kind)
        shapes = {**{f"model.diffusion_model.{k}": s for k, s in model.items()},
                  **{f"first_stage_model.{k}": s for k, s in vae_shapes("sd3_vae").items()}}
        return [FileSpec(folder, published, kind, shapes, _dtypes(shapes, published, half))]
    if folder == "text_encoders":
        kind = _match(TEXT_ENCODER_NAMES, published, "text encoder")
        shapes = text_encoder_shapes(kind)
        return [FileSpec(folder, published, kind, shapes, _dtypes(shapes, published, half))]
    if folder == "vae":
        kind = _match(VAE_NAMES, published, "VAE")
        shapes = vae_shapes(kind)
        return [FileSpec(folder, published, kind, shapes, _dtypes(shapes, published, half))]
    kind = _match(LORA_NAMES, published, "LoRA")
    shapes = lora_shapes(kind)
    return [FileSpec(folder, published, kind, shapes, {k: torch.bfloat16 for k in shapes})]


def specs_for_prompt(prompt: dict) -> list[FileSpec]:
    """Every model file an API prompt's loader nodes name."""
    specs, seen = [], set()
    for node in prompt.values():
        for input_name, value in node["inputs"].items():
            if input_name in FOLDERS and isinstance(value, str) and (FOLDERS[input_name], value) not in seen:
                seen.add((FOLDERS[input_name], value))
                specs.extend(spec_for(input_name, value))
    return specs


def provide(prompt: dict, later: list[dict], models_dir: Path, device: str, written: dict, log=print,
            dry_run: bool = False) -> list[dict]:
    """Write the files `prompt` names that are not there yet, after deleting those written earlier that
    neither it nor any `later` prompt names (one model family's files on disk at a time). `written`:
    (folder, name) → record, kept by the caller across prompts. Returns the records of `prompt`'s files.
    `dry_run`: the same bookkeeping, nothing written or deleted (a plan of the files and the space they take)."""
    specs = specs_for_prompt(prompt)
    wanted = {(s.folder, s.name) for s in specs}
    for other in later:
        wanted |= {(s.folder, s.name) for s in specs_for_prompt(other)}
    for key in [k for k in written if k not in wanted]:
        if not dry_run:
            (Path(models_dir) / key[0] / key[1]).unlink(missing_ok=True)
        log(f"  {'would delete' if dry_run else 'deleted'} {key[0]}/{key[1]}")
        del written[key]
    records = []
    for index, spec in enumerate(specs):
        key = (spec.folder, spec.name)
        if key not in written:
            started = time.perf_counter()
            if not dry_run:
                write_random(spec, models_dir, device, seed=1000 + len(written) + index)
            if device == "cuda":
                torch.cuda.empty_cache()
            written[key] = {"file": f"{spec.folder}/{spec.name}", "description": spec.describe(),
                            "GiB": round(spec.bytes / 2**30, 2), "write_s": round(time.perf_counter() - started, 1)}
            log(f"  {'would write' if dry_run else 'wrote'} {spec.describe()}: {written[key]['GiB']} GiB"
                + ("" if dry_run else f" in {written[key]['write_s']} s"))
        records.append(written[key])
    return records


def scratch_dir(prefix: str, need_gib: float) -> Path:
    """A new temporary folder for model files: in /dev/shm (RAM) where it has `need_gib` free, so writing
    tens of GB costs seconds rather than a disk's minutes; else in the system's temporary folder."""
    import shutil
    import tempfile

    shm = Path("/dev/shm")
    if shm.is_dir() and shutil.disk_usage(shm).free / 2**30 >= need_gib:
        return Path(tempfile.mkdtemp(prefix=prefix, dir=shm))
    return Path(tempfile.mkdtemp(prefix=prefix))


# ---------------------------------------------------------------------------------------------- write

_SAFETENSORS_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float8_e4m3fn: "F8_E4M3"}


def _random_tensor(key: str, shape: tuple, dtype, device, generator) -> torch.Tensor:
    """Weights ~ N(0, 1/fan_in) (activations stay finite through deep stacks), norms' scales 1, other vectors
    and LoRA ups small, alphas the rank."""
    if key.endswith(".alpha"):
        return torch.tensor(float(LORA_RANK), dtype=dtype)
    if len(shape) <= 1:
        fill = 1.0 if re.search(r"norm|scale|gamma|ln_|layernorm", key.lower()) else 0.0
        return torch.full(shape, fill, dtype=dtype, device=device)
    fan_in = math.prod(shape[1:])
    std = (0.01 if (".lora_B." in key or ".lora_up." in key) else 1.0) / math.sqrt(fan_in)
    values = torch.randn(shape, generator=generator, device=device, dtype=torch.float32) * std
    return values.to(dtype)


def write_random(spec: FileSpec, models_dir: Path, device: str = "cpu", seed: int = 0) -> Path:
    """Write `spec` as a .safetensors file of random values, a tensor at a time; returns its path."""
    generator = torch.Generator(device).manual_seed(seed)
    path = Path(models_dir) / spec.folder / spec.name
    stream_safetensors(path, spec.shapes, spec.dtypes,
                       lambda key: _random_tensor(key, spec.shapes[key], spec.dtypes[key], device, generator))
    return path


def write_tensors(path: Path, tensors: dict) -> None:
    """safetensors' save_file without its host copy of the whole file: each tensor goes to the file from its device."""
    stream_safetensors(Path(path), {k: tuple(v.shape) for k, v in tensors.items()},
                       {k: v.dtype for k, v in tensors.items()}, tensors.__getitem__)


def stream_safetensors(path: Path, shapes: dict, dtypes: dict, tensor_for) -> None:
    """The .safetensors format (an 8-byte header length, the JSON header, the tensors' bytes in its order),
    written a tensor at a time: `tensor_for(key)` is called once per key, in sorted order."""
    path.parent.mkdir(parents=True, exist_ok=True)
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    keys = sorted(shapes)
    for key in keys:
        size = math.prod(shapes[key]) * _itemsize(dtypes[key])
        header[key] = {"dtype": _SAFETENSORS_DTYPES[dtypes[key]], "shape": list(shapes[key]),
                       "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    partial = path.with_name(path.name + ".partial")
    with open(partial, "wb") as out:
        out.write(struct.pack("<Q", len(encoded)))
        out.write(encoded)
        for key in keys:
            tensor = tensor_for(key).detach().to("cpu").contiguous()
            if tensor.numel():
                out.write(memoryview(tensor.reshape(-1).view(torch.uint8).numpy()))
    partial.rename(path)
