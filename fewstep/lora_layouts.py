"""LoRA files in the layouts people publish, read safely and renamed to one canonical layout.

Canonical = kohya's names ("lora_unet_<diffusers module path with _>", "lora_te1_…", "lora_te2_…")
with ".lora_down.weight" / ".lora_up.weight" / ".alpha", which ComfyUI's comfy.lora maps onto every
SD1.5/SDXL weight. ComfyUI already reads kohya and its own layout; diffusers' PEFT keys
("unet.….to_q.lora_A.weight"), PEFT's "base_model.model." prefix and the legacy attention-processor
keys ("….processor.to_q_lora.down.weight") it maps only in part, so they are renamed here. Flow
transformers' (FLUX, SD3.5, Qwen-Image, Z-Image) diffusers keys keep their "transformer." names, which
ComfyUI maps itself; the same module names without a prefix (lightx2v's Qwen-Image-Lightning files:
"transformer_blocks.0.attn.to_q.lora_down.weight" + ".alpha"), under PEFT's "base_model.model." or with
PEFT's adapter name (".lora_A.default.weight") are given it. Z-Image's dotted layout (Anime-Z) is read as
diffusers reads it, its duplicated modules dropped. Only names change: the tensors go to ComfyUI's own
loader untouched.
"""
from __future__ import annotations

import json
import math
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .families import FewStepInputError, get_family

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl")

# (suffix in the file, canonical role), longest first so ".lora.down.weight" beats ".down.weight".
_SUFFIXES = [
    (".lora_linear_layer.down.weight", "down"), (".lora_linear_layer.up.weight", "up"),
    (".lora_A.default.weight", "down"), (".lora_B.default.weight", "up"),
    ("_lora.down.weight", "down"), ("_lora.up.weight", "up"),
    (".lora.down.weight", "down"), (".lora.up.weight", "up"),
    (".lora_down.weight", "down"), (".lora_up.weight", "up"),
    (".lora_A.weight", "down"), (".lora_B.weight", "up"),
    (".alpha", "alpha"),
]
_CANONICAL_SUFFIX = {"down": ".lora_down.weight", "up": ".lora_up.weight", "alpha": ".alpha"}
_UNET_ROOTS = ("down_blocks.", "up_blocks.", "mid_block.", "conv_in.", "conv_out.", "conv_norm_out.",
               "time_embedding.", "add_embedding.")
# Top-level modules of diffusers' flow transformers, as one model's save_lora_adapter (or a trainer
# that keeps diffusers' names, lightx2v's) writes them without the pipeline's "transformer." prefix:
# FluxTransformer2DModel and SD3Transformer2DModel (transformer_blocks, embedders, norm_out, proj_out;
# SD3's pos_embed), QwenImageTransformer2DModel (img_in, txt_in) and ZImageTransformer2DModel (layers,
# noise_refiner, context_refiner, t_embedder, cap_embedder, all_x_embedder, all_final_layer).
_TRANSFORMER_ROOTS = ("transformer_blocks.", "single_transformer_blocks.", "x_embedder", "context_embedder",
                      "time_text_embed.", "norm_out.", "proj_out", "pos_embed.", "img_in", "txt_in",
                      "layers.", "noise_refiner.", "context_refiner.", "t_embedder.", "cap_embedder.",
                      "all_x_embedder.", "all_final_layer.")
# FLUX's own (BFL) module names, as ComfyUI names the model ("diffusion_model.double_blocks.…"); fal's
# FLUX trainers write them under PEFT's "base_model.model." prefix.
_BFL_ROOTS = ("double_blocks.", "single_blocks.", "img_in", "txt_in", "time_in.", "vector_in.", "guidance_in.",
              "final_layer.")
# diffusers' old attention-processor names in the CLIP text encoder → HF CLIP's.
_TEXT_PROCESSOR_NAMES = {".to_q": ".q_proj", ".to_k": ".k_proj", ".to_v": ".v_proj", ".to_out": ".out_proj"}


@dataclass
class CanonicalLora:
    tensors: dict  # canonical key → tensor
    # "kohya" (also OneTrainer's "lora_transformer_"), "diffusers", "diffusers_legacy", "peft",
    # "peft_base_model", "comfyui", "lightx2v" (diffusers module names, kohya's lora_down/lora_up/alpha),
    # "z_image_dotted" (Anime-Z's)
    layout: str
    unrecognized: list[str] = field(default_factory=list)  # keys that are no LoRA weight at all

    @property
    def modules(self) -> set[str]:
        return {key.rsplit(".lora_", 1)[0].removesuffix(".alpha") for key in self.tensors}


def read_safetensors(path: Path) -> tuple[dict, dict]:
    """(tensors, metadata) of a .safetensors file; refuses pickles and says what is wrong with others."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    name = Path(path).name
    if name.lower().endswith(PICKLE_SUFFIXES):
        raise FewStepInputError(
            f"{name}: a pickle file ({Path(name).suffix}) can run code when opened, so FewStep does not "
            "open it. Use the .safetensors release of this file, or convert it with a tool you trust."
        )
    if not Path(path).is_file():
        raise FewStepInputError(f"{name}: file not found at {path}; put it in ComfyUI's models folder and refresh.")
    try:
        metadata = read_safetensors_metadata(path)
        return load_file(str(path)), metadata
    except (SafetensorError, ValueError, OSError, json.JSONDecodeError, struct.error) as error:
        raise FewStepInputError(
            f"{name}: not a readable .safetensors file ({error}); it may be truncated by an interrupted "
            "download. Download it again."
        ) from None


def read_safetensors_metadata(path: Path) -> dict:
    """The file's __metadata__ block, from its JSON header (no tensor is read)."""
    with open(path, "rb") as handle:
        header_size = struct.unpack("<Q", handle.read(8))[0]
        if header_size > 100_000_000:
            raise ValueError(f"header of {header_size} bytes")
        header = json.loads(handle.read(header_size))
    return header.get("__metadata__") or {}


# Z-Image attention as some trainers write it (Anime-Z; diffusers issue #13203): kohya's suffixes with dots
# ("layers.0.attention.to.q.lora.down.weight"), the alphas under diffusers' names ("….attention.to_q.alpha"),
# and beside q/k/v and to_out.0 the same deltas again on Z-Image's own modules, the fused "attention.qkv" and
# the bare "attention.out". Read as diffusers' ZImageLoraLoaderMixin reads it
# (lora_conversion_utils._convert_non_diffusers_z_image_lora_to_diffusers): to.q/k/v → to_q/k/v; qkv dropped
# (with its alpha) where split q/k/v keys exist, else split in thirds of its rows under its alpha; out
# dropped where to_out.0 exists, else read as to_out.0 — so no delta is lost or applied twice.
# Told apart by its split "to.q/k/v" (a fused qkv alone under "diffusion_model." is ComfyUI's own layout).
_Z_IMAGE_DOTTED = re.compile(r"\.attention\.to\.[qkv]\.lora\.down\.weight$")
_DOT_DOWN, _DOT_UP = ".lora.down.weight", ".lora.up.weight"


def _z_image_dotted_to_kohya_suffixes(state_dict: dict) -> dict:
    """The dotted Z-Image layout with diffusers' module names and kohya's ".lora_down"/".lora_up"/".alpha";
    an alpha scales its module as alpha / rank on both sides, so it is kept rather than folded in."""
    if any(k.startswith("diffusion_model.") for k in state_dict):
        state_dict = {k.removeprefix("diffusion_model."): v for k, v in state_dict.items()}
    # diffusers renames a bare "out"'s alpha to to_out.0's before anything else; where both exist, the later
    # key in the file's order wins, as in its dict comprehension.
    state_dict = {(k if ".to_out" in k else re.sub(r"\.out(?=\.(?:lora_down|lora_up)\.weight$|\.alpha$)",
                                                   ".to_out.0", k)): v for k, v in state_dict.items()}
    out = {k: v for k, v in state_dict.items() if not k.endswith((_DOT_DOWN, _DOT_UP))}
    for key, down in state_dict.items():
        if not key.endswith(_DOT_DOWN):
            continue
        base = key[: -len(_DOT_DOWN)]
        up = state_dict.get(base + _DOT_UP)
        if base.endswith(".qkv"):
            block = base[: -len(".qkv")]
            alpha = out.pop(base + ".alpha", None)
            split = any(f"{block}.{form}{_DOT_DOWN}" in state_dict for p in "qkv" for form in (f"to.{p}", f"to_{p}"))
            if split or up is None:
                continue
            for projection, rows in zip("qkv", up.chunk(3, dim=0)):
                out[f"{block}.to_{projection}.lora_down.weight"] = down
                out[f"{block}.to_{projection}.lora_up.weight"] = rows
                if alpha is not None:
                    out[f"{block}.to_{projection}.alpha"] = alpha
            continue
        if re.search(r"\.out$", base) and ".to_out" not in base:
            if up is None or f"{base[: -len('.out')]}.to_out.0{_DOT_DOWN}" in state_dict:
                continue
            base = base[: -len(".out")] + ".to_out.0"  # its alpha already renamed so
        if up is None:
            raise FewStepInputError(f"{key} has no {base}{_DOT_UP} beside it: the file is incomplete; download it again")
        base = re.sub(r"\.to\.([qkv])$", r".to_\1", base)
        out[base + ".lora_down.weight"], out[base + ".lora_up.weight"] = down, up
    return out


def _split(key: str) -> tuple[str, str] | None:
    for suffix, role in _SUFFIXES:
        if key.endswith(suffix):
            return key[: -len(suffix)], role
    return None


def detect_layout(keys) -> str | None:
    keys = list(keys)
    if any(_Z_IMAGE_DOTTED.search(k) for k in keys):
        return "z_image_dotted"
    if any(k.startswith(("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_", "lora_transformer_")) for k in keys):
        return "kohya"
    if any(k.startswith(("diffusion_model.", "text_encoders.")) for k in keys):
        return "comfyui"
    if any(k.startswith("base_model.model.") for k in keys):
        return "peft_base_model"
    if any(".processor." in k or "_lora.down." in k or ".lora_linear_layer." in k for k in keys):
        return "diffusers_legacy"
    if any(".lora_A." in k or ".lora_B." in k for k in keys):
        return "peft"
    if any(".lora.down." in k for k in keys):
        return "diffusers"
    if any(k.endswith(".lora_down.weight") and k.startswith(_TRANSFORMER_ROOTS) for k in keys):
        return "lightx2v"
    return None


def _canonical_module(module: str) -> str | None:
    """kohya name of a module path in any of the diffusers-side layouts (for a flow transformer, diffusers'
    own "transformer." name); None if it is no part of a model FewStep knows."""
    peft_prefixed = module.startswith("base_model.model.")
    module = module.removeprefix("base_model.model.")
    if peft_prefixed and module.startswith(_BFL_ROOTS):
        return "diffusion_model." + module  # ComfyUI's own names for FLUX: it maps them itself
    if module.startswith("transformer."):
        # ComfyUI maps diffusers' "transformer.<module>" names itself for its flow models (comfy.lora's
        # model_lora_keys_unet: Flux through comfy.utils.flux_to_diffusers, with the row slices of the fused
        # qkv Linears; SD3, AuraFlow, PixArt alike), so the name stays as diffusers wrote it.
        return module
    if module.startswith(_TRANSFORMER_ROOTS):
        return "transformer." + module
    if module.startswith("unet."):
        component, path = "unet", module[len("unet."):]
    elif module.startswith("text_encoder_2."):
        component, path = "te2", module[len("text_encoder_2."):]
    elif module.startswith("text_encoder."):
        component, path = "te1", module[len("text_encoder."):]
    elif module.startswith(_UNET_ROOTS):
        component, path = "unet", module
    elif module.startswith("text_model."):
        component, path = "te1", module
    else:
        return None
    if component == "unet":
        path = path.replace(".processor.", ".")
        if path.endswith(".to_out"):
            path = path + ".0"  # the processor named the output projection without its index
        return "lora_unet_" + path.replace(".", "_")
    path = path.replace(".processor.", ".")
    if not path.startswith("text_model."):
        # PEFT's state dict of a transformers CLIPTextModel that has no text_model wrapper (as saved
        # with transformers ≥ 5) starts at "encoder."; kohya's names and ComfyUI's start a level up.
        path = "text_model." + path
    for old, new in _TEXT_PROCESSOR_NAMES.items():
        if path.endswith(old):
            path = path[: -len(old)] + new
    return f"lora_{component}_" + path.replace(".", "_")


# diffusers' save_lora_weights / save_lora_adapter write the adapters' LoraConfig into the safetensors
# header under this key, as JSON: each field prefixed by its component ("unet.lora_alpha",
# "text_encoder.r", …) for a pipeline's save, unprefixed for one model's. diffusers' load_lora_weights
# builds its LoraConfig from it, so a module's scale is that config's lora_alpha / r (alpha_pattern and
# rank_pattern override per module; √r with use_rslora), not 1.
ADAPTER_METADATA_KEY = "lora_adapter_metadata"
_COMPONENTS = ("unet", "text_encoder", "text_encoder_2", "transformer")


# PEFT's PeftModel.save_pretrained writes the weights as adapter_model.safetensors ("base_model.model.…"
# keys, no alphas) and the LoraConfig beside them as adapter_config.json; diffusers' and PEFT's loaders
# take lora_alpha / r from there, so FewStep does too where the file carries no config of its own.
PEFT_WEIGHTS_NAME, PEFT_CONFIG_NAME = "adapter_model.safetensors", "adapter_config.json"


def with_peft_adapter_config(path: Path, metadata: dict) -> tuple[dict, str | None]:
    """(metadata, where its LoraConfig came from): the file's own header, else the adapter_config.json PEFT
    saved beside it — used when the file is PEFT's adapter_model.safetensors or the folder's only
    .safetensors, so that one folder's config is never applied to another LoRA."""
    if (metadata or {}).get(ADAPTER_METADATA_KEY):
        return metadata, None
    path = Path(path)
    config_path = path.parent / PEFT_CONFIG_NAME
    if not config_path.is_file():
        return metadata, None
    if path.name != PEFT_WEIGHTS_NAME and len(list(path.parent.glob("*.safetensors"))) != 1:
        return metadata, None
    try:
        config = json.loads(config_path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        raise FewStepInputError(f"the {PEFT_CONFIG_NAME} beside it is not valid JSON; save the adapter again") from None
    fields = {k: config.get(k) for k in ("r", "lora_alpha", "alpha_pattern", "rank_pattern", "use_rslora")}
    if fields["r"] is None or fields["lora_alpha"] is None:
        return metadata, None
    return {**(metadata or {}), ADAPTER_METADATA_KEY: json.dumps(fields)}, PEFT_CONFIG_NAME


def adapter_configs(metadata: dict) -> dict[str | None, dict]:
    """The LoraConfig fields diffusers saved, by component (None: one model's, for every module)."""
    raw = (metadata or {}).get(ADAPTER_METADATA_KEY)
    if not raw:
        return {}
    try:
        fields = json.loads(raw) if isinstance(raw, str) else dict(raw)
    except (json.JSONDecodeError, TypeError, ValueError):
        raise FewStepInputError(f"its '{ADAPTER_METADATA_KEY}' header is not valid JSON; the file may be damaged") from None
    configs: dict[str | None, dict] = {}
    for key, value in fields.items():
        component, _, name = key.partition(".")
        if component in _COMPONENTS and name:
            configs.setdefault(component, {})[name] = value
        else:
            configs.setdefault(None, {})[key] = value
    return configs


def _pattern_value(patterns: dict, module_path: str):
    """PEFT's get_pattern_key: the first pattern that matches the end of the module path."""
    for pattern, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", module_path):
            return value
    return None


def adapter_scale(config: dict, module_path: str) -> float | None:
    """lora_alpha / r of `module_path` under a saved LoraConfig, as PEFT computes it; None if unsaid."""
    if config.get("lora_alpha") is None or config.get("r") is None:
        return None
    rank = _pattern_value(config.get("rank_pattern"), module_path) or config["r"]
    alpha = _pattern_value(config.get("alpha_pattern"), module_path) or config["lora_alpha"]
    return float(alpha) / (math.sqrt(rank) if config.get("use_rslora") else float(rank))


def _component_and_path(module: str) -> tuple[str | None, str]:
    module = module.removeprefix("base_model.model.")
    component, _, path = module.partition(".")
    return (component, path) if component in _COMPONENTS and path else (None, module)


def canonicalize(state_dict: dict, metadata: dict | None = None) -> CanonicalLora:
    """Rename a LoRA's keys to the canonical layout; report keys that are no LoRA weight.

    Where the file carries no kohya `.alpha` for a module but diffusers saved its LoraConfig in the
    header (`metadata`), that module gets the `.alpha` giving the config's scale, as ComfyUI reads
    alphas (scale = alpha / rank of the down weight).
    """
    layout = detect_layout(state_dict.keys())
    if layout is None:
        raise FewStepInputError(
            "no LoRA weights found (no lora_down/lora_up, lora_A/lora_B or kohya keys): this file is "
            "not a LoRA. Load full models with a checkpoint or UNet loader instead."
        )
    if layout == "z_image_dotted":
        state_dict = _z_image_dotted_to_kohya_suffixes(state_dict)
    tensors, unrecognized, scales = {}, [], {}
    configs = adapter_configs(metadata)
    for key, tensor in state_dict.items():
        split = _split(key)
        if split is None:
            unrecognized.append(key)
            continue
        module, role = split
        if layout in ("kohya", "comfyui"):
            name = module  # ComfyUI reads these names itself
        else:
            name = _canonical_module(module)
            if name is None:
                unrecognized.append(key)
                continue
        tensors[name + _CANONICAL_SUFFIX[role]] = tensor
        if role == "down" and layout not in ("kohya", "comfyui"):
            component, path = _component_and_path(module)
            config = configs.get(component) or configs.get(None)
            scale = adapter_scale(config, path) if config else None
            if scale is not None:
                scales[name] = (scale, tensor.shape[0])
    for name, (scale, rank) in scales.items():
        if name + ".alpha" not in tensors:
            tensors[name + ".alpha"] = torch.tensor(scale * rank, dtype=torch.float32)
    return CanonicalLora(tensors, layout, unrecognized)


# ComfyUI's key maps name some models' modules by diffusers' paths under a trainer's prefix: "lycoris_"
# (SimpleTuner: FLUX, SD, Qwen-Image, Z-Image) and "lora_transformer_" (OneTrainer: FLUX, SD3), while
# musubi-tuner and others write the same flattened path after kohya's "lora_unet_" (Z-Image:
# "lora_unet_layers_0_attention_to_q", where ComfyUI's own "lora_unet_" names are its fused qkv).
_KOHYA_PREFIXES = ("lora_unet_", "lycoris_", "lora_transformer_")


def resolve_kohya_aliases(canonical: CanonicalLora, known) -> CanonicalLora:
    """`canonical` with each kohya-style module that matches nothing in `known` (ComfyUI's key map) renamed to
    the one alias under another of those prefixes that does; the rest as it is."""
    if canonical.layout != "kohya":
        return canonical
    renames = {}
    for module in canonical.modules:
        prefix = next((p for p in _KOHYA_PREFIXES if module.startswith(p)), None)
        if module in known or prefix is None:
            continue
        aliases = [p + module[len(prefix):] for p in _KOHYA_PREFIXES if p != prefix and p + module[len(prefix):] in known]
        if len(aliases) == 1:
            renames[module] = aliases[0]
    if not renames:
        return canonical
    tensors = {}
    for key, tensor in canonical.tensors.items():
        module, dot, suffix = key.partition(".")
        tensors[renames.get(module, module) + dot + suffix] = tensor
    return CanonicalLora(tensors, canonical.layout, canonical.unrecognized)


def card_lora_scale(family_name: str | None) -> float:
    """The LoRA scale the family's card fuses with (pipe.fuse_lora(lora_scale=…); Hyper-FLUX: 0.125),
    read from fewstep/families.py; 1.0 where the card fixes none (every SD1.5/SDXL family, style LoRAs)."""
    if family_name is None:
        return 1.0
    flow = get_family(family_name).flow
    return flow.lora_scale if flow is not None and flow.lora_scale is not None else 1.0


def lora_base(state_dict: dict) -> str | None:
    """"sdxl" or "sd15" from a LoRA's shapes and parts; None when it can't tell."""
    keys = list(state_dict)
    if any(k.startswith(("lora_te2_", "text_encoder_2.", "text_encoders.clip_g.")) or "add_embedding" in k
           or "label_emb" in k for k in keys):
        return "sdxl"
    for key, tensor in state_dict.items():
        # Cross-attention key/value projections read the text embedding: 768 wide in SD1.5,
        # 2048 in SDXL. PEFT's lora_A / kohya's lora_down has it as its input dimension.
        if ("attn2" in key and ("to_k" in key or "to_v" in key) and tensor.ndim == 2
                and _split(key) is not None and _split(key)[1] == "down"):
            return {768: "sd15", 2048: "sdxl"}.get(tensor.shape[1])
    return None
