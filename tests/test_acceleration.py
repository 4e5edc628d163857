"""FewStepAccelerate in real ComfyUI on CPU: its clean fallback, its wrappers and its weight check.

CUDA graphs need a GPU; CI has none, so here every call takes the fallback path, with the node's
wrappers and VAE override in place. The outputs must then equal the eager path's exactly: the same
ComfyUI code computes them, so any difference is a wrapper passing something wrong. Whether graph
replay and Inductor's kernels match eager (within fewstep.acceleration's RELATIVE_L2_TOLERANCE) is
checked on the GPU by bench/gpu.py, which prints the measured error next to the timings. What CPU can
check of compiling is that Dynamo traces the very functions the node captures, through ComfyUI's
wrapper executor, UNet and VAE decoder, in a real sampling run.
"""
from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

import lora_factory
from graphs import SEED, text_and_model

from comfyui_fewstep.fewstep.acceleration import compiler_forms
from comfyui_fewstep.fewstep.acceleration import (
    COMPILE_BACKEND,
    RELATIVE_L2_TOLERANCE,
    WeightSnapshot,
    agreement,
    compile_for_one_shape,
    compile_unavailable_reason,
    cuda_graph_unavailable_reason,
    tensor_signature,
)

IMAGE_SIZE = 64  # an 8×8 latent: what is tested is the wiring, not the arithmetic


def accelerated_prompt(tiny, family: str, steps: int, accelerate: bool, compile_kernels: bool = True) -> dict:
    """FewStep sampling and VAE decode; with `accelerate`, through FewStepAccelerate's MODEL and VAE."""
    model, vae = (["accel", 0], ["accel", 1]) if accelerate else (["ckpt", 0], ["ckpt", 2])
    prompt = {
        **text_and_model(tiny, ""),
        "latent_in": {"class_type": "EmptyLatentImage",
                      "inputs": {"width": IMAGE_SIZE, "height": IMAGE_SIZE, "batch_size": 2}},
        "sigmas": {"class_type": "FewStepScheduler",
                   "inputs": {"model": model, "family": family, "steps": steps, "denoise": 1.0}},
        "sampler": {"class_type": "FewStepSampler", "inputs": {"family": family}},
        "sample": {"class_type": "SamplerCustom", "inputs": {
            "model": model, "add_noise": True, "noise_seed": SEED, "cfg": 1.0,
            "positive": ["pos", 0], "negative": ["neg", 0], "sampler": ["sampler", 0],
            "sigmas": ["sigmas", 0], "latent_image": ["latent_in", 0]}},
        "decode": {"class_type": "VAEDecode", "inputs": {"samples": ["sample", 0], "vae": vae}},
        "image": {"class_type": "SaveImage", "inputs": {"images": ["decode", 0], "filename_prefix": "accel"}},
    }
    if accelerate:
        prompt["accel"] = {"class_type": "FewStepAccelerate", "inputs": {
            "model": ["ckpt", 0], "vae": ["ckpt", 2], "autotune_convolutions": True, "max_shapes": 4,
            "compile_kernels": compile_kernels}}
    return prompt


def loaded_node_module(comfy):
    """nodes/acceleration.py as ComfyUI imported it (a package other than the tests' comfyui_fewstep)."""
    return sys.modules[comfy.nodes.NODE_CLASS_MAPPINGS["FewStepAccelerate"].__module__]


def read_images(result) -> np.ndarray:
    from PIL import Image

    return np.stack([np.asarray(Image.open(path)) for path in result.files("image", "images")])


@pytest.mark.parametrize("base,family,steps", [("sd15", "lcm", 4), ("sdxl", "turbo", 1)])
def test_accelerated_graph_on_cpu_falls_back_and_equals_eager(comfy, request, base, family, steps):
    tiny = request.getfixturevalue(base)  # SDXL also passes the ADM vector `y` through the wrapper
    eager = comfy.run(accelerated_prompt(tiny, family, steps, accelerate=False))
    accelerated = comfy.run(accelerated_prompt(tiny, family, steps, accelerate=True))

    assert torch.equal(accelerated.latent("save"), eager.latent("save"))
    assert np.array_equal(read_images(accelerated), read_images(eager))
    (message,) = accelerated.outputs["accel"]["text"]
    assert "CUDA graphs need a CUDA device" in message and "run eager" in message


@pytest.mark.parametrize("base,family,steps", [("sd15", "lcm", 2), ("sdxl", "lightning", 2)])
def test_dynamo_traces_what_the_node_captures_in_a_real_sampling_run(comfy, request, monkeypatch, base, family, steps):
    """With the CUDA-only parts taken out (the device checks, the graph replay), the node must hand
    its caches the compiler, and its wrappers their functions to compile_for_one_shape, which must
    trace each — ComfyUI's wrapper
    executor, UNetModel._forward, the VAE decoder — into one graph whose results equal eager. The
    `aot_eager` backend runs the traced ATen graph without generating kernels (Inductor's GPU kernels
    are the benchmark's to check)."""
    from torch._dynamo.testing import CompileCounterWithBackend

    tiny = request.getfixturevalue(base)
    node_module = loaded_node_module(comfy)
    counters, backends, traced_differently = {}, {}, {}

    def compile_and_run(cache, signature, function, inputs, module, compiler_form=None, saved_form=None):
        backends[cache.part] = cache.compile_backend
        traced_differently[cache.part] = compiler_form is not None
        counter = counters.setdefault(cache.part, CompileCounterWithBackend("aot_eager"))
        output = compile_for_one_shape(compiler_form() if compiler_form else function, backend=counter)(*inputs)
        # The form whose compile is saved to disk: the same computation, also one graph (torch saves
        # only whole-graph compiles).
        form = saved_form()
        saved_counter = counters.setdefault(f"{cache.part} (saved form)", CompileCounterWithBackend("aot_eager"))
        saved_output = compile_for_one_shape(form.function, backend=saved_counter)(*form.leading, *inputs)
        assert agreement(saved_output, output, tolerance=1e-5).within_tolerance, cache.part
        return output

    # The attention ComfyUI picks on a CUDA GPU (SDPA) rather than its CPU choice (sub-quadratic
    # attention, which asks psutil for free memory inside the UNet and so breaks the graph there).
    import comfy.ldm.modules.attention as attention
    import comfy.ldm.modules.diffusionmodules.model as vae_model

    monkeypatch.setattr(attention, "optimized_attention", attention.attention_pytorch)
    monkeypatch.setattr(attention, "optimized_attention_masked", attention.attention_pytorch)
    monkeypatch.setattr(vae_model, "vae_attention", lambda: vae_model.pytorch_attention)
    # Channel sums at every size: the tiny decoder never reaches the GPU's threshold, and they must
    # trace without a graph break too.
    monkeypatch.setattr(sys.modules[node_module.GroupNormForCompiler.__module__], "CHANNEL_SUMS_MIN_ELEMENTS", 0)
    monkeypatch.setattr(node_module, "cuda_graph_unavailable_reason", lambda device: None)
    monkeypatch.setattr(node_module, "compile_unavailable_reason", lambda device: None)
    monkeypatch.setattr(node_module.GraphCache, "run", compile_and_run)
    eager = comfy.run(accelerated_prompt(tiny, family, steps, accelerate=False))
    compiled = comfy.run(accelerated_prompt(tiny, family, steps, accelerate=True))

    assert backends == {"UNet": COMPILE_BACKEND, "VAE decode": COMPILE_BACKEND}
    # The decoder is traced with its GroupNorms and attention in the compiler's forms.
    assert traced_differently == {"UNet": False, "VAE decode": True}
    assert set(counters) == {"UNet", "VAE decode", "UNet (saved form)", "VAE decode (saved form)"}
    for part, counter in counters.items():
        # One graph for the whole call, reused at every step:
        # a graph break would split Inductor's fusion and mean a Python fallback inside the UNet.
        assert (counter.frame_count, counter.op_count > 100) == (1, True), part
    # aot_eager runs the same ATen ops in the same order; only decompositions may round differently.
    assert agreement(compiled.latent("save"), eager.latent("save"), tolerance=1e-5).within_tolerance
    assert np.abs(read_images(compiled).astype(int) - read_images(eager).astype(int)).max() <= 1


def test_compiling_is_only_offered_on_cuda():
    assert "CUDA" in compile_unavailable_reason("cpu")


def test_accelerated_vae_decode_equals_vae_decode_in_float(comfy, sd15):
    # SaveImage quantises to 8 bits; here the float images themselves must be identical.
    model, _, vae = comfy.nodes.CheckpointLoaderSimple().load_checkpoint(sd15.checkpoint_name)
    node = comfy.nodes.NODE_CLASS_MAPPINGS["FewStepAccelerate"]
    _, accelerated_vae = node.execute(model=model, vae=vae).args
    latent = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        expected = vae.decode(latent)
        ours = accelerated_vae.decode(latent)
    assert ours.shape == expected.shape == (2, 64, 64, 3)
    assert torch.equal(ours, expected)
    assert accelerated_vae.decode_graphs.eager_calls == 1 and not accelerated_vae.decode_graphs.graphs
    assert accelerated_vae.first_stage_model is vae.first_stage_model  # shares weights, no copy


@pytest.mark.parametrize("channel_sums_from", [0, compiler_forms.CHANNEL_SUMS_MIN_ELEMENTS])
def test_decoder_for_compiler_shares_the_weights_and_leaves_comfyuis_modules_alone(comfy, sd15, monkeypatch,
                                                                                   channel_sums_from):
    """What the compiler traces of ComfyUI's decoder: a copy sharing every weight tensor whose
    GroupNorms are group_norm_for_compiler (by channel sums everywhere, or as on the GPU only from a
    size the tiny VAE never reaches) and attention attention_by_matmuls; the same decode (float32
    here); ComfyUI's own modules untouched, so eager decodes meanwhile stay ComfyUI's."""
    from comfy.ldm.modules.diffusionmodules.model import AttnBlock

    node_module = loaded_node_module(comfy)
    pack_acceleration = sys.modules[node_module.GroupNormForCompiler.__module__]  # ComfyUI's import of it
    monkeypatch.setattr(pack_acceleration, "CHANNEL_SUMS_MIN_ELEMENTS", channel_sums_from)
    _, _, vae = comfy.nodes.CheckpointLoaderSimple().load_checkpoint(sd15.checkpoint_name)
    original = vae.first_stage_model
    attentions = [m.optimized_attention for m in original.decoder.modules() if isinstance(m, AttnBlock)]
    copy = node_module.decoder_for_compiler(original)
    norms = [m for m in copy.decoder.modules() if isinstance(m, torch.nn.GroupNorm)]
    blocks = [m for m in copy.decoder.modules() if isinstance(m, AttnBlock)]
    assert norms and blocks and copy is not original
    assert all(type(norm) is node_module.GroupNormForCompiler for norm in norms)
    assert all(block.optimized_attention is node_module.attention_by_matmuls for block in blocks)
    assert all(mine is theirs for mine, theirs in zip(copy.parameters(), original.parameters()))
    assert all(mine is theirs for mine, theirs in zip(copy.buffers(), original.buffers()))
    assert len(list(copy.parameters())) == len(list(original.parameters())) > 0
    assert all("forward" not in m.__dict__ and type(m) is not node_module.GroupNormForCompiler
               for m in original.modules() if isinstance(m, torch.nn.GroupNorm))
    assert [m.optimized_attention for m in original.decoder.modules() if isinstance(m, AttnBlock)] == attentions
    latent = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    with torch.inference_mode():
        expected, traced = original.decode(latent), copy.decode(latent)
    assert agreement(traced, expected, tolerance=1e-5).within_tolerance


def test_decoder_for_compiler_leaves_norms_that_others_patch_or_comfyui_casts(comfy, sd15):
    node_module = loaded_node_module(comfy)
    _, _, vae = comfy.nodes.CheckpointLoaderSimple().load_checkpoint(sd15.checkpoint_name)
    patched, cast, *plain = [m for m in vae.first_stage_model.decoder.modules() if isinstance(m, torch.nn.GroupNorm)]
    patched.forward = lambda x: x  # another extension's instance-level patch
    cast.comfy_cast_weights = True  # ComfyUI casts this one's weights per call
    copy_patched, copy_cast, *copy_plain = [m for m in node_module.decoder_for_compiler(
        vae.first_stage_model).decoder.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert copy_patched.forward is patched.forward
    assert "forward" not in copy_cast.__dict__ and type(copy_cast) is type(cast)
    assert type(copy_patched) is type(patched)
    assert all(type(norm) is node_module.GroupNormForCompiler for norm in copy_plain)


def test_node_clones_the_model_and_accelerating_twice_keeps_one_wrapper(comfy, sd15):
    from comfy.patcher_extension import WrappersMP

    model, _, vae = comfy.nodes.CheckpointLoaderSimple().load_checkpoint(sd15.checkpoint_name)
    node = comfy.nodes.NODE_CLASS_MAPPINGS["FewStepAccelerate"]
    once, once_vae = node.execute(model=model, vae=vae).args
    twice, _ = node.execute(model=once, vae=once_vae).args
    for wrapper_type in (WrappersMP.DIFFUSION_MODEL, WrappersMP.SAMPLER_SAMPLE):
        assert model.get_all_wrappers(wrapper_type) == []  # the input MODEL is left as it was
        assert len(once.get_all_wrappers(wrapper_type)) == 1
        assert len(twice.get_all_wrappers(wrapper_type)) == 1
    assert once.model is model.model  # a ModelPatcher clone: same weights


def test_weight_snapshot_follows_comfyui_patching_a_lora_in_and_out(comfy, sd15, tmp_path):
    """A graph may replay only while every weight is the tensor it captured: ComfyUI swaps in new
    tensors when it patches a LoRA in and restores the originals when it patches it out."""
    from comfy import model_management
    from comfy.sd import load_lora_for_models
    from safetensors.torch import load_file

    model, _, _ = comfy.nodes.CheckpointLoaderSimple().load_checkpoint(sd15.checkpoint_name)
    lora_file = lora_factory.save(lora_factory.to_kohya(lora_factory.peft_lora(sd15, 4, seed=5, text_encoder=False),
                                                        alpha=None), tmp_path, "snapshot_lora.safetensors")
    with_lora, _ = load_lora_for_models(model, None, load_file(str(tmp_path / lora_file)), 1.0, 0.0)

    model_management.load_models_gpu([model], force_full_load=True)
    snapshot = WeightSnapshot(model.model.diffusion_model)
    assert snapshot.unchanged()
    model_management.load_models_gpu([with_lora], force_full_load=True)
    assert not snapshot.unchanged()
    model_management.load_models_gpu([model], force_full_load=True)
    assert snapshot.unchanged()
    model_management.unload_all_models()


def test_node_schema_has_a_tooltip_on_every_input(comfy):
    node = comfy.nodes.NODE_CLASS_MAPPINGS["FewStepAccelerate"]
    info = node.GET_SCHEMA() if hasattr(node, "GET_SCHEMA") else node.define_schema()
    assert info.category.startswith("sampling/few-step")
    # compile_kernels came later: last and optional, so older workflows' widget values stay in place.
    assert [i.id for i in info.inputs] == ["model", "vae", "autotune_convolutions", "max_shapes", "compile_kernels"]
    assert [i.optional for i in info.inputs][-1] is True
    assert all(i.tooltip for i in info.inputs)


def test_agreement_is_the_relative_l2_error():
    generator = torch.Generator().manual_seed(0)
    eager = torch.randn(2, 4, 8, 8, generator=generator)
    accelerated = eager + 1e-3 * torch.randn(2, 4, 8, 8, generator=generator)
    a, e = accelerated.numpy().astype(np.float64), eager.numpy().astype(np.float64)
    measured = agreement(accelerated, eager)
    assert measured.relative_l2 == pytest.approx(np.linalg.norm(a - e) / np.linalg.norm(e), rel=1e-12)
    assert measured.max_abs == pytest.approx(np.abs(a - e).max(), rel=1e-12)
    assert measured.within_tolerance
    assert not agreement(torch.full_like(eager, float("nan")), eager).within_tolerance
    assert not agreement(eager * (1 + 2 * RELATIVE_L2_TOLERANCE), eager).within_tolerance
    with pytest.raises(ValueError):
        agreement(eager[:1], eager)


def test_signatures_and_reasons():
    x = torch.zeros(1, 4, 8, 8)
    assert tensor_signature(x) != tensor_signature(torch.zeros(2, 4, 8, 8))
    assert tensor_signature(x) != tensor_signature(x.half())
    assert tensor_signature(x) != tensor_signature(x.to(memory_format=torch.channels_last))
    assert tensor_signature(None) is None
    assert "CUDA device" in cuda_graph_unavailable_reason("cpu")
