"""Flow-transformer LoRAs (FLUX, SD3.5) for the tiny transformers, in the layouts they are published in,
made with the field's tools.

- diffusers/PEFT: peft's LoraConfig on diffusers' FluxTransformer2DModel, written by diffusers' own
  FluxPipeline.save_lora_weights ("transformer.<diffusers module>.lora_A.weight", the LoraConfig in the
  header's lora_adapter_metadata) — the layout of Hyper-FLUX.1-dev and FLUX.1-Turbo-Alpha.
- kohya ("lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight", sd-scripts' FLUX LoRAs) and ComfyUI
  ("diffusion_model.double_blocks.0.img_attn.qkv.lora_down.weight", what ComfyUI's LoraSave writes): the
  same weights moved onto FLUX's own (BFL) modules with the map ComfyUI itself reads diffusers FLUX LoRAs
  by, comfy.utils.flux_to_diffusers (used by comfy.lora.model_lora_keys_unet for Flux) — not the loader's.
  q, k and v of one attention are one fused qkv Linear there, so their LoRAs become one LoRA of rank
  r_q + r_k + r_v: the downs stacked, the ups block-diagonal at each projection's rows (exactly ΔW).
  Under PEFT's "base_model.model." with lora_A/lora_B and no alpha, the same is fal's FLUX trainer layout.
- PEFT: PeftModel.save_pretrained's adapter_model.safetensors ("base_model.model.<diffusers module>…",
  the LoraConfig only in adapter_config.json beside it).
- "transformer." + lora_A/lora_B + a ".alpha" per module, as trainers keeping diffusers' names write it.
SD3.5's kohya/ComfyUI files use SD3's own MMDiT modules ("joint_blocks.0.x_block.attn.qkv") the same way,
by comfy.utils.mmdit_to_diffusers.
"""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

# diffusers' train_dreambooth_lora_flux.py default targets, plus the modulation and embedding Linears
# full-transformer LoRAs (Hyper-FLUX's among them) also train.
FLUX_TARGETS = ["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
                "attn.add_v_proj", "attn.to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj",
                "ff_context.net.2", "norm1.linear", "norm1_context.linear", "x_embedder", "context_embedder",
                "proj_out", "norm_out.linear"]


# SD3Transformer2DModel's attention and feed-forward Linears (diffusers' train_dreambooth_lora_sd3.py
# targets the attention ones), plus its embedding and output Linears.
SD3_TARGETS = ["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
               "attn.add_v_proj", "attn.to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj",
               "ff_context.net.2", "norm1.linear", "norm1_context.linear", "context_embedder", "proj_out",
               "norm_out.linear"]


# QwenImageTransformer2DModel's Linears in its blocks, as the Qwen-Image-Lightning LoRAs train them.
QWEN_IMAGE_TARGETS = ["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
                      "attn.add_v_proj", "attn.to_add_out", "img_mlp.net.0.proj", "img_mlp.net.2",
                      "txt_mlp.net.0.proj", "txt_mlp.net.2", "img_mod.1", "txt_mod.1"]
# ZImageTransformer2DModel's attention and modulation Linears and one feed-forward one (main and refiner
# blocks); w1/w3 would only add 3840×10240 weights to patch and compare on a 2-core CPU, no other name.
# A regex (PEFT full-matches a string): the final layer's adaLN_modulation.0 is a SiLU, the blocks' a Linear.
Z_IMAGE_TARGETS = (r".*(attention\.(to_q|to_k|to_v|to_out\.0)|feed_forward\.w2"
                   r"|(layers|noise_refiner)\.\d+\.adaLN_modulation\.0)")


def peft_layers(class_name: str, transformer_dir: Path, targets: list[str] | str, rank: int, lora_alpha: float,
                seed: int, peft_folder: Path | None = None) -> tuple[dict, dict]:
    """(PEFT state dict of the transformer without PEFT's prefix, its LoraConfig as a dict), random
    non-zero weights; with `peft_folder`, also PEFT's own save_pretrained of it there (adapter_model.safetensors
    with "base_model.model." keys, the LoraConfig in adapter_config.json beside it)."""
    import diffusers
    from peft import LoraConfig, get_peft_model
    from peft.utils import get_peft_model_state_dict

    torch.manual_seed(seed)
    transformer = getattr(diffusers, class_name).from_pretrained(str(transformer_dir), torch_dtype=torch.float32)
    config = LoraConfig(r=rank, lora_alpha=lora_alpha, target_modules=targets, init_lora_weights=False)
    peft_model = get_peft_model(transformer, config)
    # PEFT's random init as is (both factors ~U(±1/√in)): B·A moves the weights by some tenths of their
    # size — enough that a scale off by any factor is far outside the tests' tolerance.
    state = get_peft_model_state_dict(peft_model)
    if peft_folder is not None:
        peft_model.save_pretrained(str(peft_folder))
    layers = {k.removeprefix("base_model.model."): v.contiguous() for k, v in state.items()}
    del peft_model, transformer
    return layers, config.to_dict()


def flux_peft_layers(transformer_dir: Path, rank: int, lora_alpha: float, seed: int,
                     peft_folder: Path | None = None) -> tuple[dict, dict]:
    return peft_layers("FluxTransformer2DModel", transformer_dir, FLUX_TARGETS, rank, lora_alpha, seed, peft_folder)


def save_with_alphas(layers: dict, folder: Path, name: str, scale: float, alpha_ratio: float,
                     prefix: str = "transformer.") -> str:
    """The PEFT layers under `prefix` with lora_A/lora_B and a ".alpha" per module (alpha_ratio × rank),
    the ups rescaled so that read at its alpha the file is the LoRA at `scale` — as trainers that keep
    diffusers' names write it (and as diffusers reads it: network alphas)."""
    out = {}
    for module, (down, up) in _peft_modules(layers).items():
        out[f"{prefix}{module}.lora_A.weight"] = down
        out[f"{prefix}{module}.lora_B.weight"] = up * (scale / alpha_ratio)
        out[f"{prefix}{module}.alpha"] = torch.tensor(alpha_ratio * down.shape[0])
    return save(out, folder, name)


def save_flux_diffusers(folder: Path, name: str, layers: dict, config: dict,
                        pipeline: str = "FluxPipeline") -> str:
    """diffusers' own writer (the pipeline's save_lora_weights): "transformer." keys, the LoraConfig in the header."""
    import diffusers

    folder.mkdir(parents=True, exist_ok=True)
    getattr(diffusers, pipeline).save_lora_weights(str(folder), transformer_lora_layers=layers, weight_name=name,
                                                   safe_serialization=True, transformer_lora_adapter_metadata=config)
    return name


def _peft_modules(layers: dict) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    modules = {}
    for key in layers:
        if key.endswith(".lora_A.weight"):
            module = key[: -len(".lora_A.weight")]
            modules[module] = (layers[key], layers[f"{module}.lora_B.weight"])
    return modules


def to_flux_bfl(layers: dict, unet_config: dict, scale: float, alpha_ratio: float | None, prefix: str) -> dict:
    import comfy.utils

    return to_comfy_modules(layers, comfy.utils.flux_to_diffusers(unet_config, output_prefix=""), scale,
                            alpha_ratio, prefix)


def to_comfy_modules(layers: dict, diffusers_to_comfy: dict, scale: float, alpha_ratio: float | None,
                     prefix: str) -> dict:
    """The PEFT layers (applied at `scale` = lora_alpha / r) on ComfyUI's own modules (FLUX's BFL ones, SD3's
    MMDiT ones), under ComfyUI's diffusers map (comfy.utils.flux_to_diffusers / mmdit_to_diffusers).

    prefix "lora_unet_" gives kohya's names (dots as underscores), "diffusion_model." ComfyUI's. Each
    fused module gets `.alpha` = alpha_ratio × its rank, its ups scaled by scale / alpha_ratio, so the
    file must be read at its alpha to equal the PEFT file. alpha_ratio None: PEFT's names (lora_A/lora_B)
    and no alpha, the scale in the ups (fal's FLUX trainer under "base_model.model.").
    """
    fused: dict[str, list] = {}
    for module, (down, up) in _peft_modules(layers).items():
        target = diffusers_to_comfy[module + ".weight"]
        if isinstance(target, str):
            target, rows, permute = target, None, None
        else:
            target, rows, permute = target[0], target[1], (target[2] if len(target) > 2 else None)
        if permute is not None:
            up = permute(up)  # norm_out.linear: diffusers has (scale, shift), BFL (shift, scale) rows
        fused.setdefault(target, []).append((down, up, rows))
    out = {}
    for target, parts in fused.items():
        name = prefix + target[: -len(".weight")].replace(".", "_" if prefix == "lora_unet_" else ".")
        downs = torch.cat([down for down, _, _ in parts])
        total_rank = downs.shape[0]
        if parts[0][2] is None:
            ups = parts[0][1]
        else:
            out_features = max(offset + length for _, _, (_, offset, length) in parts)
            ups = torch.zeros(out_features, total_rank)
            column = 0
            for down, up, (_, offset, length) in parts:
                ups[offset: offset + length, column: column + down.shape[0]] = up
                column += down.shape[0]
        if alpha_ratio is None:
            out[f"{name}.lora_A.weight"] = downs.contiguous()
            out[f"{name}.lora_B.weight"] = (ups * scale).contiguous()
            continue
        out[f"{name}.lora_down.weight"] = downs.contiguous()
        out[f"{name}.lora_up.weight"] = (ups * (scale / alpha_ratio)).contiguous()
        out[f"{name}.alpha"] = torch.tensor(alpha_ratio * total_rank)
    return out


def to_kohya_suffixes(layers: dict, scale: float, alpha_ratio: float, prefix: str, underscores: bool = False) -> dict:
    """diffusers' module paths under `prefix` with kohya's lora_down/lora_up and a ".alpha" (alpha_ratio ×
    rank), the ups rescaled as in to_comfy_modules: lightx2v's Qwen-Image-Lightning files (no prefix),
    ComfyUI's "diffusion_model.", and with underscores OneTrainer's "lora_transformer_" and musubi-tuner's
    "lora_unet_"."""
    out = {}
    for module, (down, up) in _peft_modules(layers).items():
        name = prefix + (module.replace(".", "_") if underscores else module)
        out[f"{name}.lora_down.weight"] = down
        out[f"{name}.lora_up.weight"] = up * (scale / alpha_ratio)
        out[f"{name}.alpha"] = torch.tensor(alpha_ratio * down.shape[0])
    return out


def to_onetrainer(layers: dict, scale: float, alpha_ratio: float) -> dict:
    return to_kohya_suffixes(layers, scale, alpha_ratio, "lora_transformer_", underscores=True)


def with_adapter_name(layers: dict, scale: float, adapter: str = "default") -> dict:
    """PEFT's module state with its adapter name left in (".lora_A.default.weight"), no alpha: the scale
    in the ups, as some Qwen-Image LoRAs are published."""
    out = {}
    for module, (down, up) in _peft_modules(layers).items():
        out[f"{module}.lora_A.{adapter}.weight"] = down
        out[f"{module}.lora_B.{adapter}.weight"] = up * scale
    return out


def save(lora: dict, folder: Path, name: str, metadata: dict | None = None) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in lora.items()}, str(folder / name), metadata=metadata)
    return name
