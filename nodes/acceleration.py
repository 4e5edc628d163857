"""FewStepAccelerate: the UNet or transformer and the VAE decoder compiled and replayed as CUDA graphs, one
per input shape.

Thin glue: capture, per-shape caching and the weight check are fewstep.acceleration's. They are
attached through ComfyUI's own mechanisms: a ModelPatcher clone carrying a DIFFUSION_MODEL wrapper
(around the UNet's or transformer's forward; APPLY_MODEL for SD3's MMDiT) and a SAMPLER_SAMPLE wrapper (one sampling run), see
comfy/patcher_extension.py; and a VAE object that shares the loaded VAE's weights and patcher and
overrides decode. ComfyUI already fuses LoRA weights into the model when it loads it (ModelPatcher
patches the weights themselves), so a graph of the patched model runs no LoRA code at all.
"""
from __future__ import annotations

import copy
import logging

import torch

import comfy.model_management
import comfy.patcher_extension
import comfy.sd
from comfy.ldm.modules.diffusionmodules.model import AttnBlock
from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel
from comfy_api.latest import io, ui

from ..fewstep.acceleration import (
    COMPILE_BACKEND,
    DEFAULT_MAX_SHAPES,
    STREAM_ORDERED_ALLOCATOR,
    GraphCache,
    allocator_backend,
    gib,
    graph_memory_bytes,
    attention_by_matmuls,
    compile_unavailable_reason,
    compiled_capture_unavailable_reason,
    cuda_graph_unavailable_reason,
    tensor_signature,
)
from ..fewstep.acceleration.compiler_forms import GroupNormForCompiler
from ..fewstep.acceleration.model_inputs import BoundCall, NotCapturable, call_model_function, flatten_conditioning
from ..fewstep.acceleration.saved_compiles import SavedForm, describe_value, module_fingerprint
from .saved_compile_settings import comfyui_settings

WRAPPER_KEY = "fewstep_accelerate"
log = logging.getLogger("fewstep.acceleration")


class DiffusionModelAccelerator:
    """The UNet or transformer part: a model-call wrapper and a SAMPLER_SAMPLE wrapper sharing one GraphCache.

    The model-call wrapper is a DIFFUSION_MODEL wrapper (around the UNet's or transformer's _forward)
    where the architecture has that wrapper point, else an APPLY_MODEL one (around BaseModel._apply_model:
    σ to the model's input and timestep, the model, the denoised output), for SD3's MMDiT. The
    DIFFUSION_MODEL point comes first: _apply_model's discrete-σ timestep lookup reads a table ComfyUI
    keeps on the CPU, which no CUDA graph can capture (seen on the H200).
    """

    def __init__(self, graphs: GraphCache, base_model):
        self.graphs = graphs
        self.base_model = base_model  # comfy.model_base.BaseModel, shared by every clone of the patcher

    @staticmethod
    def wrapper_type(base_model):
        # The architectures that call DIFFUSION_MODEL wrappers (UNetModel, Flux, QwenImage, Lumina's
        # NextDiT, …) do it from forward() around a _forward() method; MMDiT has neither.
        has_point = callable(getattr(type(base_model.diffusion_model), "_forward", None))
        return (comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL if has_point
                else comfy.patcher_extension.WrappersMP.APPLY_MODEL)

    def eager_reason(self, device, control, transformer_options: dict) -> str | None:
        """Why this model call cannot be replayed from a graph, or None."""
        reason = cuda_graph_unavailable_reason(device)
        if reason is not None:
            return reason
        if control is not None:
            return (f"a ControlNet/T2I-Adapter is attached (its residuals are computed outside the "
                    f"{self.graphs.part} each step)")
        patches = {**(transformer_options.get("patches") or {}), **(transformer_options.get("patches_replace") or {})}
        if patches:
            return (f"model patches are attached ({', '.join(sorted(patches))}); they run Python inside the "
                    f"{self.graphs.part}")
        if "optimized_attention_override" in transformer_options:
            return "an attention override is attached"
        if getattr(self.base_model, "model_lowvram", False) or getattr(self.base_model, "lowvram_patch_counter", 0):
            return "the model is only partly on the GPU (lowvram): its weights are streamed and patched per layer"
        if getattr(self.base_model, "manual_cast_dtype", None) is not None:
            return "the model's weights are cast to the compute dtype per layer (manual cast)"
        return None

    def model_call(self, executor, *args, **kwargs):
        call = BoundCall.of(executor.original, args, kwargs)
        inputs = dict(call.arguments)
        control = inputs.pop("control", None)
        transformer_options = inputs.pop("transformer_options", None) or {}
        x = next(iter(inputs.values()))  # the latent: every model function's first parameter
        reason = self.eager_reason(x.device, control, transformer_options)
        if reason is None:
            try:
                flat = flatten_conditioning(inputs)
            except NotCapturable as error:
                reason = str(error)
        if reason is None:
            signature = (flat.signature(), torch.is_inference_mode_enabled())

            # A copy: the compile worker may trace this function while ComfyUI goes on changing the
            # options it passes to later calls.
            options = dict(transformer_options)
            # And the options as ComfyUI passed them, for a saved compile's key: the UNet writes its
            # place (block, index, shapes) into the dict it is given, so `options` after a run differs
            # from `options` before one, and the key must not depend on whether a run came first.
            passed = dict(transformer_options)

            def forward(*tensors):
                return call.call(executor, {**flat.rebuild(tensors), "control": None, "transformer_options": options})

            def saved_form():
                return self.saved_form(executor, call, flat, options, passed)

            output = self.graphs.run(signature, forward, flat.tensors, executor.class_obj,
                                     saved_form=saved_form if innermost(executor) else None)
            if output is not None:
                return output.clone()  # the graph's output buffer is rewritten by the next replay
        else:
            self.graphs.eager(reason)
        return executor(*args, **kwargs)

    def saved_form(self, executor, call: BoundCall, flat, options: dict, passed: dict) -> SavedForm:
        """The model call as a compile saved to disk takes it: the model function itself (this wrapper
        is the innermost), everything the traced code may depend on besides the tensors in `identity`
        (the transformer options as `passed` to the call)."""
        original = executor.original
        fixed = {"control": None, "transformer_options": options}
        identity = {"model": module_fingerprint(self.base_model.diffusion_model),
                    "function": f"{type(getattr(original, '__self__', None)).__qualname__}.{original.__name__}",
                    "parameters": [[parameter.name, str(parameter.kind)] for parameter in call.parameters],
                    "layout": describe_value(flat.layout), "options": describe_value(passed),
                    "comfyui": comfyui_settings()}
        return SavedForm(call_model_function, (original, call, flat, fixed), identity)

    def sampler_sample(self, executor, *args, **kwargs):
        # Models are loaded (and weights patched) before the sampler runs and not during it, so each
        # graph's weights are checked once per sampling run rather than at every step.
        with self.graphs.one_run():
            return executor(*args, **kwargs)


class AcceleratedVAE(comfy.sd.VAE):
    """A VAE sharing a loaded VAE's weights, patcher and settings, whose decode replays a CUDA graph.

    The graph covers what ComfyUI's VAE.decode does to one batch — decode, float, process_output —
    on the GPU, then one copy to ComfyUI's intermediate device; anything else is VAE.decode itself.
    """

    @classmethod
    def sharing(cls, vae: comfy.sd.VAE, graphs: GraphCache) -> "AcceleratedVAE":
        accelerated = cls.__new__(cls)
        accelerated.__dict__.update(vae.__dict__)
        accelerated.decode_graphs = graphs
        return accelerated

    def decode_eager_reason(self, samples_in, vae_options) -> str | None:
        reason = cuda_graph_unavailable_reason(self.device)
        if reason is not None:
            return reason
        if self.latent_dim != 2 or samples_in.ndim != 4:
            return f"only image latents (4-D) are captured, this one is {samples_in.ndim}-D"
        if vae_options:
            return f"vae_options are set ({', '.join(sorted(vae_options))})"
        return None

    def decode(self, samples_in, vae_options={}):
        self.throw_exception_if_invalid()
        # One decode is one run: its graph's weights are checked once, by replayable(), not again by run().
        with self.decode_graphs.one_run():
            image = self._decode_by_graph(samples_in, vae_options)
            if image is None:
                return super().decode(samples_in, vae_options)
            return self._to_output_device(image).movedim(1, -1)

    def _decode_by_graph(self, samples_in, vae_options):
        """The decoded image, still on the GPU, from a captured graph; None: decode as ComfyUI does."""
        reason = self.decode_eager_reason(samples_in, vae_options)
        if reason is None:
            memory_used = self.memory_used_decode(samples_in.shape, self.vae_dtype)
            comfy.model_management.load_models_gpu([self.patcher], memory_required=memory_used,
                                                   force_full_load=self.disable_offload)
            latent = samples_in.to(self.vae_dtype).to(self.device)
            signature = (tensor_signature(latent), torch.is_inference_mode_enabled())
            # A kept graph replays in its own memory pool: only a capture needs the batch to fit now
            # (checking for every decode would also cost a millisecond of the GPU idle).
            if (not self.decode_graphs.replayable(signature)
                    and int(comfy.model_management.get_free_memory(self.device) / memory_used) < samples_in.shape[0]):
                reason = "the batch does not fit in free memory in one piece (ComfyUI splits it)"
        if reason is not None:
            self.decode_graphs.eager(reason)
            return None
        return self.decode_graphs.run(signature, self._decode_to_image, [latent], self.first_stage_model,
                                      compiler_form=self._decode_to_image_for_compiler,
                                      saved_form=self._decode_to_image_saved_form)

    def _decode_to_image(self, latent, first_stage_model=None):
        # VAE.decode computes process_output(decode(samples).to(output_device).float()): the same
        # elementwise float32 maths, here before the copy instead of after it.
        return self.process_output((first_stage_model or self.first_stage_model).decode(latent).float())

    def _decode_to_image_for_compiler(self):
        decoder = decoder_for_compiler(self.first_stage_model)
        return lambda latent: self._decode_to_image(latent, decoder)

    def _decode_to_image_saved_form(self) -> SavedForm:
        identity = {"model": module_fingerprint(self.first_stage_model), "vae": type(self).__mro__[1].__qualname__,
                    "forms": ["group_norm_for_compiler", "attention_by_matmuls"], "comfyui": comfyui_settings()}
        return SavedForm(decoded_image, (self, decoder_for_compiler(self.first_stage_model)), identity)

    def _to_output_device(self, image):
        if image.device.type == "cpu":  # no staging copy (the graph path runs on the CPU only in tests)
            return image.to(self.output_device)
        if self.output_device.type != "cpu":
            return image.clone().to(self.output_device)
        # Page-locked memory (PyTorch's host caching allocator) copies at full PCIe speed.
        output = torch.empty(image.shape, dtype=image.dtype, pin_memory=True)
        output.copy_(image, non_blocking=True)
        torch.cuda.current_stream().synchronize()
        return output


def decoded_image(vae: AcceleratedVAE, first_stage_model: torch.nn.Module, latent: torch.Tensor) -> torch.Tensor:
    """The VAE decode a compile saved to disk takes: a module-level function, the VAE as an argument."""
    return vae._decode_to_image(latent, first_stage_model)


def innermost(executor) -> bool:
    """Whether the model function comes next in ComfyUI's wrapper chain (no other pack's wrapper after
    this one, which a compile saved without it would leave out)."""
    return getattr(executor, "idx", None) == len(getattr(executor, "wrappers", ())) - 1


def decoder_for_compiler(first_stage_model: torch.nn.Module) -> torch.nn.Module:
    """A copy of the VAE model sharing every weight tensor, whose decoder computes its GroupNorms by
    group_norm_for_compiler and its attention by attention_by_matmuls, the forms Inductor makes fast
    (fewstep.acceleration says why). A copy, because the compile worker traces it while ComfyUI may be
    decoding with the original: ComfyUI's own modules stay as they are. A GroupNorm whose weights
    ComfyUI casts or patches per call, or whose forward something else has replaced, keeps its own."""
    shared = {id(tensor): tensor for tensor in (*first_stage_model.parameters(), *first_stage_model.buffers())}
    model = copy.deepcopy(first_stage_model, memo=shared)
    decoder = getattr(model, "decoder", model)
    for module in decoder.modules():
        if (isinstance(module, torch.nn.GroupNorm) and "forward" not in module.__dict__
                and not getattr(module, "comfy_cast_weights", False)
                and not getattr(module, "weight_function", None) and not getattr(module, "bias_function", None)):
            module.__class__ = GroupNormForCompiler
        elif isinstance(module, AttnBlock):
            module.optimized_attention = attention_by_matmuls
    return model


class FewStepAccelerate(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="FewStepAccelerate",
            display_name="Few-Step Accelerate (torch.compile + CUDA graphs for the model and VAE decode)",
            category="sampling/few-step",
            description=(
                "Replays the UNet or transformer (SD1.5, SDXL, FLUX, SD3.5, Qwen-Image, Z-Image) and the VAE "
                "decoder as CUDA graphs, one per image size and batch, to remove "
                "the launch overhead and memory-bound work that dominate 1–4-step sampling. A new size runs at "
                "once on a graph of the eager kernels while torch.compile compiles it in the background; later "
                "runs switch to the compiled graph. Outputs stay within a measured tolerance of eager. What it "
                "cannot capture (CPU, ControlNet, model patches, lowvram) runs eagerly with a message; the node "
                "shows how much GPU memory its graphs hold."
            ),
            hidden=[io.Hidden.unique_id],
            inputs=[
                io.Model.Input("model", tooltip=(
                    "The model to sample, LoRAs already applied (ComfyUI fuses them into the weights). "
                    "Put this node last on the model path, right before the sampler.")),
                io.Vae.Input("vae", tooltip="The VAE whose decode is captured; connect the output to VAE Decode."),
                io.Boolean.Input("autotune_convolutions", default=False, tooltip=(
                    "Let cuDNN time the convolution algorithms for each shape and capture its choice. It runs "
                    "on the prompt's time (tens of seconds for SDXL, once per image size and batch, in the "
                    "capture of the compiled graph where compiling): PyTorch keeps cuDNN's results per thread, "
                    "so it cannot happen in the background. Off: cuDNN's heuristic choice, the kernels eager uses.")),
                io.Int.Input("max_shapes", default=DEFAULT_MAX_SHAPES, min=1, max=64, tooltip=(
                    "How many image size × batch combinations keep a captured graph each for the UNet or "
                    "transformer and the VAE (least recently used dropped): the bound on the GPU memory the graphs hold "
                    "(their activations; the node shows the amount after each capture).")),
                # Last and optional: workflows saved before it existed keep their widget values in place.
                io.Boolean.Input("compile_kernels", default=True, optional=True, tooltip=(
                    "Also compile the UNet or transformer and the VAE decoder with torch.compile (Triton "
                    "kernels): faster kernels (README, Speed). Compiling runs in the background, minutes per image size and batch "
                    "for SDXL (less with Inductor's cache warm); no prompt waits for it, each runs on a graph of "
                    "the eager kernels (captured in about a second) until the compiled one is ready. Off: graphs "
                    "of the eager kernels only. Without Triton it is skipped with a message.")),
            ],
            outputs=[
                io.Model.Output(tooltip="The model with its UNet or transformer calls replayed from CUDA graphs."),
                io.Vae.Output(tooltip="The VAE with its decode replayed from CUDA graphs."),
            ],
        )

    @classmethod
    def execute(cls, model, vae, autotune_convolutions=False, max_shapes=DEFAULT_MAX_SHAPES,
                compile_kernels=True) -> io.NodeOutput:
        graph_reasons = {reason for reason in (cuda_graph_unavailable_reason(model.load_device),
                                               cuda_graph_unavailable_reason(vae.device)) if reason}
        compile_reason = backend = None
        if compile_kernels and not graph_reasons:
            compile_reason = (compile_unavailable_reason(model.load_device)
                              or compile_unavailable_reason(vae.device)
                              or compiled_capture_unavailable_reason())
            backend = None if compile_reason else COMPILE_BACKEND

        # A user's Cancel raised inside a UNet or decoder run must stop the prompt, not be fallen back from.
        passthrough = (comfy.model_management.InterruptProcessingException,)
        model_part = "UNet" if isinstance(model.model.diffusion_model, UNetModel) else "transformer"
        caches = [GraphCache(part, max_shapes, autotune_convolutions, backend, passthrough=passthrough)
                  for part in (model_part, "VAE decode")]
        holdings = GraphHoldings(caches, cls.hidden.unique_id if cls.hidden else None)
        for cache in caches:
            cache.on_change = holdings.show
        diffusion = DiffusionModelAccelerator(caches[0], model.model)
        accelerated = model.clone()
        for wrapper_type, wrapper in ((diffusion.wrapper_type(model.model), diffusion.model_call),
                                      (comfy.patcher_extension.WrappersMP.SAMPLER_SAMPLE, diffusion.sampler_sample)):
            accelerated.remove_wrappers_with_key(wrapper_type, WRAPPER_KEY)  # accelerating twice replaces
            accelerated.add_wrapper_with_key(wrapper_type, WRAPPER_KEY, wrapper)
        accelerated_vae = AcceleratedVAE.sharing(vae, caches[1])

        if graph_reasons:
            message = f"{'; '.join(sorted(graph_reasons))}: {model_part} and VAE decode run eager, as without this node."
        else:
            message = (f"On {model.load_device}, {model_part} and VAE decode are captured as CUDA graphs at the first run "
                       f"of each image size and batch (up to {max_shapes} kept each), replayed on later runs; "
                       "times go to the log.")
            if backend:
                message += (" torch.compile compiles each new size in the background (minutes for SDXL) while "
                            "it runs on the eager kernels' graph; later runs use the compiled graph. Compiles are "
                            "saved to disk: a restarted server reads them as its first prompt is queued and uses "
                            "them from that prompt on, or within seconds.")
            if compile_reason:
                message += f" Not compiled: {compile_reason}."
        return io.NodeOutput(accelerated, accelerated_vae, ui=ui.PreviewText(message))


class GraphHoldings:
    """What a FewStepAccelerate node's graphs hold, in the log and on the node (ComfyUI's progress
    text, which the frontend shows under the node) after each capture."""

    def __init__(self, caches: list[GraphCache], node_id: str | None):
        self.caches, self.node_id = caches, node_id

    def describe(self) -> str:
        parts = []
        for cache in self.caches:
            compiled = sum(graph.compiled for graph in cache.graphs.values())
            parts.append(f"{cache.part}: {len(cache.graphs)} of at most {cache.max_shapes} sizes captured "
                         f"({compiled} compiled, {len(cache.compiling)} compiling)")
        held = graph_memory_bytes([cache.pool for cache in self.caches])
        # Under cudaMallocAsync the driver pools every graph's memory per device (fewstep.acceleration.memory).
        scope = "all CUDA graphs on this GPU" if allocator_backend() == STREAM_ORDERED_ALLOCATOR else "these graphs"
        return f"{'; '.join(parts)}. GPU memory held by {scope}: {gib(held)}."

    def show(self) -> None:
        text = self.describe()
        log.info("FewStepAccelerate: %s", text)
        if self.node_id is None:
            return
        try:
            from server import PromptServer
        except ImportError:
            return
        if getattr(PromptServer, "instance", None) is not None:
            PromptServer.instance.send_progress_text(text, self.node_id)


ACCELERATION_NODES = [FewStepAccelerate]
