"""Few-Step Accelerate on the flow-matching transformers (FLUX, SD3.5's MMDiT), in real ComfyUI on CPU.

The node wraps each architecture's model call (DIFFUSION_MODEL; APPLY_MODEL for the MMDiT, which has
no such wrapper point); each takes its inputs differently (SDXL's `y`, FLUX's `guidance` tensor,
Lumina 2's `num_tokens` number).
CUDA graphs need a GPU, so here (as in test_acceleration) the capture is replaced by what it wraps:
the node's function compiled by Dynamo with the `aot_eager` backend, which must trace ComfyUI's
apply_model, the transformer and its conditioning rebuilt from the graph's inputs, and compute what
the same prompt computes without the node. Graph replay on the GPU is bench/gpu.py's to check.
"""
from __future__ import annotations

import sys

import pytest
import torch

import flow_conditioning
from comfy_attention import attention_as_on_cuda
from tiny_flow_models import build_flow_model

from comfyui_fewstep.fewstep.acceleration import compile_for_one_shape
from comfyui_fewstep.fewstep.acceleration.model_inputs import BoundCall, NotCapturable, flatten_conditioning

SEED = 7
# aot_eager runs the traced ATen ops one by one, the same kernels as eager on CPU; what can differ is
# the order of a few float32 reductions that Dynamo's decompositions regroup.
TOLERANCE = 1e-4


def test_conditioning_is_split_into_graph_inputs_and_constants():
    y, first, second = torch.ones(1, 4), torch.zeros(1, 2), torch.zeros(1, 3)
    flat = flatten_conditioning({"y": y, "num_tokens": 7, "ref_latents": [first, second], "c_concat": None})
    assert [t is e for t, e in zip(flat.tensors, (y, first, second))] == [True] * 3  # in the order given
    copies = [t.clone() + 1 for t in flat.tensors]
    rebuilt = flat.rebuild(copies)
    assert rebuilt["num_tokens"] == 7 and rebuilt["c_concat"] is None
    assert rebuilt["y"] is copies[0] and isinstance(rebuilt["ref_latents"], list)
    assert [t is c for t, c in zip(rebuilt["ref_latents"], copies[1:])] == [True, True]
    # A different constant is a different graph; so is a different tensor shape.
    assert flat.signature() != flatten_conditioning({"y": y, "num_tokens": 8, "ref_latents": [first, second],
                                                    "c_concat": None}).signature()
    assert flat.signature() != flatten_conditioning({"y": torch.ones(2, 4), "num_tokens": 7,
                                                    "ref_latents": [first, second], "c_concat": None}).signature()
    with pytest.raises(NotCapturable, match="'hooks'"):
        flatten_conditioning({"hooks": object()})


def test_a_model_call_is_made_again_as_comfyui_made_it():
    """Bound by the function's own signature (ComfyUI's architectures take their inputs in different
    orders and names), called again with its positional parameters positionally."""
    seen = []

    def forward(x, timestep, context, y=None, guidance=None, control=None, transformer_options={}, **kwargs):
        seen.append(((x, timestep, context, y, guidance, control, transformer_options), kwargs))

    call = BoundCall.of(forward, (1, 2, 3, None, 5, None, {}), {"ref_latents": None})
    assert list(call.arguments) == ["x", "timestep", "context", "y", "guidance", "control", "transformer_options",
                                    "ref_latents"]
    call.call(forward, {**call.arguments, "x": 10})
    assert seen == [((10, 2, 3, None, 5, None, {}), {"ref_latents": None})]
    with pytest.raises(TypeError):
        BoundCall.of(lambda x, *rest: None, (1, 2), {})


def flow_prompt(tiny, family: str, steps: int, vae_checkpoint: str | None = None) -> dict:
    """FewStep sampling of the tiny transformer, 64² px, batch 2; with `vae_checkpoint`, through the node
    (its VAE input is that checkpoint's: nothing is decoded, the final LATENT is compared)."""
    from comfyui_fewstep.fewstep.families import get_family

    model = ["accel", 0] if vae_checkpoint else ["unet", 0]
    prompt = {
        "unet": {"class_type": "UNETLoader", "inputs": {"unet_name": tiny.unet_name, "weight_dtype": "default"}},
        "cond": {"class_type": flow_conditioning.NODE_NAME, "inputs": {"base": tiny.base}},
        "latent_in": {"class_type": "EmptySD3LatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 2}},
        "sigmas": {"class_type": "FewStepScheduler", "inputs": {"model": model, "family": family, "steps": steps,
                                                                 "denoise": 1.0, "latent_image": ["latent_in", 0]}},
        "sampler": {"class_type": "FewStepSampler", "inputs": {"family": family}},
        "sample": {"class_type": "SamplerCustom", "inputs": {
            "model": model, "add_noise": True, "noise_seed": SEED, "cfg": 1.0, "positive": ["cond", 0],
            "negative": ["cond", 0], "sampler": ["sampler", 0], "sigmas": ["sigmas", 0],
            "latent_image": ["latent_in", 0]}},
        "save": {"class_type": "SaveLatent", "inputs": {"samples": ["sample", 0], "filename_prefix": "accel_flow"}},
    }
    guidance = get_family(family).flow.guidance
    if guidance is not None:  # FLUX.1-dev's distilled guidance reaches the model as a `guidance` tensor
        prompt["guided"] = {"class_type": "FluxGuidance", "inputs": {"conditioning": ["cond", 0], "guidance": guidance}}
        prompt["sample"]["inputs"]["positive"] = ["guided", 0]
    if vae_checkpoint:
        prompt["ckpt"] = {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": vae_checkpoint}}
        prompt["accel"] = {"class_type": "FewStepAccelerate", "inputs": {
            "model": ["unet", 0], "vae": ["ckpt", 2], "autotune_convolutions": False, "max_shapes": 4}}
    return prompt


@pytest.mark.parametrize("base,family,steps", [("sd35_large", "sd35_large_turbo", 4), ("flux_dev", "flux_turbo_alpha", 8),
                                               ("qwen_image", "qwen_image_lightning", 1)])
def test_accelerate_traces_the_transformer_as_comfyui_calls_it(comfy, sd15, monkeypatch, base, family, steps):
    from comfy import model_management
    from torch._dynamo.testing import CompileCounterWithBackend

    node_module = sys.modules[comfy.nodes.NODE_CLASS_MAPPINGS["FewStepAccelerate"].__module__]
    tiny = build_flow_model(base, comfy.models_dir)
    calls, counter = [], CompileCounterWithBackend("aot_eager")

    saved_counter, saved_forms = CompileCounterWithBackend("aot_eager"), []

    def compile_and_run(cache, signature, function, inputs, module, compiler_form=None, saved_form=None):
        calls.append((cache.part, signature))
        output = compile_for_one_shape(compiler_form() if compiler_form else function, backend=counter)(*inputs)
        # The form whose compile is saved to disk computes the same (the model function called directly).
        saved_forms.append(saved_form is not None)
        form = saved_form()
        saved_output = compile_for_one_shape(form.function, backend=saved_counter)(*form.leading, *inputs)
        assert (saved_output - output).abs().max().item() <= 1e-5
        # A compile is saved only where the whole call is one graph (aot_compile): with the attention a
        # GPU runs, each transformer's is, so a restarted server loads it instead of compiling again.
        # Checked at the first call; the reset drops the earlier tests' graphs of the same saved-form
        # function, which count towards Dynamo's recompile limit (a hard failure under fullgraph).
        if len(calls) > 1:
            return output
        torch._dynamo.reset()
        with attention_as_on_cuda():
            whole = torch.compile(form.function, backend=CompileCounterWithBackend("aot_eager"), fullgraph=True,
                                  dynamic=False)(*form.leading, *inputs)
        assert (whole - output).abs().max().item() <= 1e-4
        return output

    monkeypatch.setattr(node_module, "cuda_graph_unavailable_reason", lambda device: None)
    monkeypatch.setattr(node_module, "compile_unavailable_reason", lambda device: None)
    monkeypatch.setattr(node_module.GraphCache, "run", compile_and_run)
    with flow_conditioning.registered(comfy):
        try:
            eager = comfy.run(flow_prompt(tiny, family, steps)).latent("save")
            result = comfy.run(flow_prompt(tiny, family, steps, vae_checkpoint=sd15.checkpoint_name))
        finally:
            comfy.forget_outputs()
            model_management.unload_all_models()
    accelerated = result.latent("save")

    assert {part for part, _ in calls} == {"transformer"}  # nothing decoded
    assert len(calls) == steps and counter.frame_count >= 1
    assert all(saved_forms) and saved_counter.frame_count >= 1
    assert (accelerated - eager).abs().max().item() <= TOLERANCE

