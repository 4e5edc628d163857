"""What the flow-LoRA tests compare: ComfyUI's patched weights after the Few-Step LoRA Loader, and
diffusers' own load_lora_weights + fuse_lora of the same LoRA, each module at its place in ComfyUI's
(often fused) weight by ComfyUI's own diffusers map (comfy.utils.flux_to_diffusers, mmdit_to_diffusers, …).
"""
from __future__ import annotations

import gc
from pathlib import Path

import torch

# fp32 on both sides, the same products summed in another order.
RELATIVE_TOLERANCE = 1e-5


def relative_error(ours, expected) -> float:
    return ((ours.float() - expected.float()).abs().max() / expected.float().abs().max().clamp_min(1e-12)).item()


def comfy_patched(comfy, model, lora_name, strength=1.0, family="detect"):
    """The node's output, and the weights ComfyUI patches the model to when it loads it for sampling."""
    from comfy import model_management as management

    loader = comfy.nodes.NODE_CLASS_MAPPINGS["FewStepLoraLoader"]
    output = loader.execute(model=model, clip=None, lora_name=lora_name, strength_model=strength,
                            strength_clip=1.0, family=family)
    new_model = output.args[0]
    patched_keys = {key[0] if isinstance(key, tuple) else key for key in new_model.patches}
    management.load_models_gpu([new_model], force_full_load=True)
    state = new_model.model.state_dict()
    weights = {key: state[key].clone() for key in patched_keys}
    management.unload_all_models()
    return output, weights


def diffusers_fused_weights(pipeline_class: str, transformer_class: str, transformer_dir: Path, lora_folder: Path,
                            weight_name: str, scale: float, modules, to_comfy: dict,
                            pipeline_parts: tuple[str, ...] = ()) -> dict:
    """{diffusers module: (its place in ComfyUI's weights, diffusers' fused weight)} after the pipeline's own
    load_lora_weights + fuse_lora(lora_scale=scale); `pipeline_parts` are the components passed as None."""
    import diffusers

    transformer = getattr(diffusers, transformer_class).from_pretrained(str(transformer_dir), torch_dtype=torch.float32)
    pipe = getattr(diffusers, pipeline_class)(transformer=transformer, **{part: None for part in pipeline_parts})
    pipe.load_lora_weights(str(lora_folder), weight_name=weight_name)
    pipe.fuse_lora(lora_scale=scale)
    pipe.unload_lora_weights()
    state = transformer.state_dict()
    fused = {module: (to_comfy[module + ".weight"], state[module + ".weight"].clone()) for module in modules}
    del pipe, transformer, state
    gc.collect()
    return fused


def weight_at(weights: dict, target):
    """A diffusers module's weight inside ComfyUI's, by ComfyUI's map entry: a key, or (key, rows, fn)."""
    if isinstance(target, str):
        return weights[target]
    ours = weights[target[0]]
    if target[1] is not None:
        ours = ours.narrow(*target[1])
    return target[2](ours) if len(target) > 2 else ours  # swap_scale_shift is its own inverse


def compare(patched: dict, expected: dict, base: dict) -> float:
    """Largest relative error over the diffusers modules, each at its place in ComfyUI's (fused) weight."""
    worst = 0.0
    for target, weight in expected.values():
        ours = weight_at(patched, target)
        assert ours.shape == weight.shape, target
        # The LoRA moves every weight far more than the tolerance, so a wrong scale cannot pass.
        assert relative_error(weight_at(base, target), weight) > 100 * RELATIVE_TOLERANCE, target
        worst = max(worst, relative_error(ours, weight))
    return worst
