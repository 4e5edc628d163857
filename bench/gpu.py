"""GPU benchmark: diffusers eager · ComfyUI native nodes · ComfyUI + FewStep nodes · + FewStepAccelerate.

All four measured in one process, one run, on random fp16 weights in the real SDXL and SD1.5
architectures (speed does not depend on the values): the diffusers pipelines are built from the
modules, ComfyUI loads the same weights from a single-file checkpoint through its own
CheckpointLoaderSimple (and LoraLoaderModelOnly), and every ComfyUI column runs an API prompt through
ComfyUI's real PromptExecutor, in process, as its server would.

Per cell: median end-to-end latency of a queued generation (UNet steps + VAE decode, latent noise to
a float image on the CPU; text encoding is cached by ComfyUI and measured apart), the UNet's time per
call (CUDA events around UNetModel.forward / diffusers' UNet), the VAE decode stage (host clock,
synchronised, around VAEDecode / around vae.decode through `.cpu()`), peak VRAM the process reserved
(torch's caching allocator, CUDA-graph pools included), and images/s at batch 4. For each ComfyUI
cell, also where a batch-1 prompt's time goes: host-clock stamps at the edges of its sampling and
decode stages (PhaseClock).

    python3 bench/gpu.py                       # CUDA: the full table; compiling takes most of it, about
                                               # 4 min per SDXL model with a cold Inductor cache (H200)
    python3 bench/gpu.py --smoke               # CPU: tiny models, 64² images, one repetition
    python3 bench/gpu.py --tiny                # CUDA: the same tiny models, the GPU next to idle: what each
                                               # path costs the host per prompt (its floor)
    python3 bench/gpu.py --configs turbo --out bench/out
"""
from __future__ import annotations

import argparse
import asyncio
import datetime
import gc
import json
import logging
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

TESTS = Path(__file__).resolve().parent.parent / "tests"
sys.path.insert(0, str(TESTS))
import conftest  # noqa: E402,F401 — registers the pack as the `comfyui_fewstep` package
import tiny_models  # noqa: E402
from comfy_harness import COMFYUI_MISSING, COMFYUI_PATH, make_base_directory  # noqa: E402

from comfyui_fewstep.fewstep.acceleration import RELATIVE_L2_TOLERANCE, agreement  # noqa: E402
from comfyui_fewstep.fewstep.families import get_family  # noqa: E402
from comfyui_fewstep.fewstep.schedules import reference_scheduler  # noqa: E402

STARTED = time.perf_counter()
PROMPT = "a photo of a red fox in the snow, highly detailed"
SEED = 1234
CHECK_SEED = 777
LORA_RANK = 64  # LCM-LoRA SD1.5's rank (latent-consistency/lcm-lora-sdv1-5)

# What a ComfyUI user does without FewStep (bench/fidelity.py's routes).
NATIVE_ROUTES = {
    "lightning": ("euler", "sgm_uniform"),
    "turbo": ("euler_ancestral", "SDTurboScheduler"),
    "lcm": ("lcm", "sgm_uniform"),
    "hyper_sd_1step_unet": ("lcm", "sgm_uniform"),
}


@dataclass(frozen=True)
class Config:
    key: str
    title: str
    base: str  # "sdxl" or "sd15"
    family: str  # FewStep family
    steps: int
    size: int
    lora: bool = False
    diffusers_timesteps: tuple | None = None  # passed to the pipeline where the card passes them
    targets_ms: float | None = None  # the end-to-end target with acceleration (H100)


CONFIGS = [  # turbo first: the quickest exercise of every column
    Config("turbo", "SDXL-Turbo 1-step 512²", "sdxl", "turbo", 1, 512, targets_ms=20.0),
    Config("lightning", "SDXL-Lightning 4-step 1024²", "sdxl", "lightning", 4, 1024, targets_ms=120.0),
    Config("hyper_sd", "Hyper-SDXL 1-step UNet 1024²", "sdxl", "hyper_sd_1step_unet", 1, 1024,
           diffusers_timesteps=(800,)),
    Config("lcm_lora", "LCM-LoRA SD1.5 4-step 512²", "sd15", "lcm", 4, 512, lora=True),
]
COLUMNS = ["diffusers eager", "ComfyUI native", "ComfyUI + FewStep", "ComfyUI + FewStep accelerated"]
ABLATION = "accelerated, CUDA graphs only"  # --ablation: FewStepAccelerate with compile_kernels off, same run
# A cell not started because the run's --budget-s was spent: reported, but not a failure of the run.
SKIPPED = "skipped: over the time budget"

# The real architectures (diffusers configs of stabilityai/stable-diffusion-xl-base-1.0 and
# runwayml/stable-diffusion-v1-5) and the same UNets as ComfyUI ldm configs for the key map.
SDXL_UNET = dict(
    sample_size=128, in_channels=4, out_channels=4,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(320, 640, 1280), layers_per_block=2, transformer_layers_per_block=(1, 2, 10),
    attention_head_dim=(5, 10, 20), cross_attention_dim=2048, use_linear_projection=True,
    addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
)
SDXL_LDM = dict(num_res_blocks=[2, 2, 2], channel_mult=[1, 2, 4], transformer_depth=[0, 0, 2, 2, 10, 10],
                transformer_depth_output=[0, 0, 0, 2, 2, 2, 10, 10, 10], transformer_depth_middle=10)
SD15_UNET = dict(sample_size=64, cross_attention_dim=768, attention_head_dim=8)  # the rest: diffusers' defaults = SD1.x
SD15_LDM = dict(num_res_blocks=[2, 2, 2, 2], channel_mult=[1, 2, 4, 4], transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0],
                transformer_depth_output=[1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0], transformer_depth_middle=1)


def tiny_config(config: Config) -> Config:
    """`config` for the tests' tiny models (--smoke, --tiny): 64² images, no end-to-end target."""
    return Config(config.key, config.title.replace("1024²", "64²").replace("512²", "64²") + ", tiny model",
                  config.base, config.family, config.steps, 64, config.lora, config.diffusers_timesteps)


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


# ---------------------------------------------------------------------------------------------- timing

class Marks:
    """Start/stop marks around a stage: CUDA events on the GPU (no synchronisation inside a run),
    the host clock on the CPU. Recorded only while `recording`."""

    def __init__(self, cuda: bool):
        self.cuda, self.recording, self.pairs, self._open = cuda, False, [], None

    def _mark(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def start(self):
        if self.recording:
            self._open = self._mark()

    def stop(self):
        if self.recording and self._open is not None:
            self.pairs.append((self._open, self._mark()))
            self._open = None

    def take_ms(self) -> list[float]:
        synchronize(self.cuda)
        out = [s.elapsed_time(e) if self.cuda else (e - s) * 1e3 for s, e in self.pairs]
        self.pairs = []
        return out


# The stages of one ComfyUI prompt, in order, between host-clock stamps (PhaseClock).
PHASES = ("before sampling", "sampling", "to decode", "decode", "after decode")


class PhaseClock:
    """Host-clock stamps at the edges of a prompt's stages: where the end-to-end time that is neither
    UNet nor VAE goes (the executor, the sampler's set-up, copies). No synchronisation is added: the
    sampling stage ends with its latent copied to the CPU, and the decode stage is timed synchronised."""

    EDGES = ("sampling", "sampled", "decoding", "decoded")

    def __init__(self):
        self.stamps: dict[str, float] = {}

    def clear(self) -> None:
        """Before a timed prompt: the stamps of earlier prompts (warm-ups too) are dropped."""
        self.stamps = {}

    def mark(self, edge: str) -> None:
        self.stamps.setdefault(edge, time.perf_counter())  # the first: a prompt here samples once

    def phases_ms(self, started: float, finished: float) -> dict[str, float]:
        """The stages (PHASES) of the prompt stamped since clear(), in ms; empty where one was not stamped."""
        edges = [started, *(self.stamps.get(edge) for edge in self.EDGES), finished]
        if None in edges:
            return {}
        return {name: (end - begin) * 1e3 for name, begin, end in zip(PHASES, edges, edges[1:])}


def synchronize(cuda: bool) -> None:
    if cuda:
        torch.cuda.synchronize()


def median(values):
    return statistics.median(values) if values else float("nan")


@dataclass
class Cell:
    e2e_ms: float = float("nan")  # batch 1
    first_ms: float = float("nan")  # the first run at batch 1 (capture included where there is one)
    unet_ms: float = float("nan")  # per UNet call, batch 1
    vae_ms: float = float("nan")  # VAE decode stage, batch 1
    text_ms: float = float("nan")  # text encoding (prompt), measured apart
    peak_gib: float = float("nan")  # batch 1
    e2e4_ms: float = float("nan")  # batch 4
    unet4_ms: float = float("nan")
    vae4_ms: float = float("nan")
    peak4_gib: float = float("nan")
    capture_s: float = float("nan")  # accelerated: capture time of the batch-1 graphs
    capture4_s: float = float("nan")
    check: dict = field(default_factory=dict)  # accelerated vs eager agreement
    phases_ms: dict = field(default_factory=dict)  # ComfyUI, batch 1: median ms per stage of a prompt (PHASES)
    error: str = ""

    @property
    def images_per_s4(self) -> float:
        return 4e3 / self.e2e4_ms


class Memory:
    def __init__(self, cuda):
        self.cuda = cuda

    def reset(self):
        if self.cuda:
            gc.collect()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()

    def peak_gib(self) -> float:
        return torch.cuda.max_memory_reserved() / 2**30 if self.cuda else float("nan")


# ------------------------------------------------------------------------------------------- models

@dataclass
class Built:
    checkpoint_name: str
    pipeline_factory: object  # () → diffusers pipeline on the device
    lora_name: str | None = None
    lora: dict | None = None  # the same LoRA for diffusers' load_lora_weights


def random_lora(unet_config: dict, device, dtype, seed: int) -> dict:
    """A random LoRA of LCM-LoRA's rank over the UNet's attention, feed-forward and resnet layers, in
    kohya's layout (both ComfyUI's LoraLoader and diffusers' load_lora_weights read it). The module
    list and shapes come from peft on a meta-device UNet; the values are drawn here."""
    import lora_factory
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    with torch.device("meta"):
        unet = UNet2DConditionModel(**unet_config)
        unet.add_adapter(LoraConfig(r=LORA_RANK, lora_alpha=LORA_RANK, target_modules=lora_factory.ALL_TARGETS,
                                    init_lora_weights=False))
        shapes = {f"unet.{k}": v.shape for k, v in get_peft_model_state_dict(unet).items()}
    generator = torch.Generator(device).manual_seed(seed)
    lora = {}
    for key, shape in sorted(shapes.items()):
        fan_in = math.prod(shape[1:])
        scale = (0.01 if ".lora_B." in key else 1.0) / math.sqrt(fan_in)
        lora[key] = (torch.randn(shape, generator=generator, device=device) * scale).to(dtype)
    return lora_factory.to_kohya(lora, alpha=LORA_RANK)


def save_checkpoint(path: Path, unet, ldm_config, clip_and_vae: dict) -> None:
    from safetensors.torch import save_file

    tensors = {f"model.diffusion_model.{k}": v for k, v in tiny_models.unet_to_ldm(unet.state_dict(), ldm_config).items()}
    tensors.update(clip_and_vae)
    save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, str(path))


def build_full(base: str, models_dir: Path, device: str, dtype) -> Built:
    """Full-size random-weight SDXL or SD1.5 (UNet, CLIP, VAE) made on the device in `dtype`, saved
    as one checkpoint in ComfyUI's layout; the diffusers pipeline reuses the same modules."""
    from diffusers import AutoencoderKL, StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    started = time.perf_counter()
    torch.manual_seed(SEED)
    unet_config = SDXL_UNET if base == "sdxl" else SD15_UNET
    scale = tiny_models.SDXL_LATENT_SCALE if base == "sdxl" else tiny_models.SD15_LATENT_SCALE
    with torch.device(device):
        unet = UNet2DConditionModel(**unet_config).to(dtype).eval()
        # force_upcast=False: decode in fp16 as with the fp16-fixed SDXL VAE, not upcast to fp32.
        vae = AutoencoderKL(**tiny_models.VAE_CONFIG, scaling_factor=scale, force_upcast=False).to(dtype).eval()
        text_encoder = CLIPTextModel(CLIPTextConfig(**tiny_models.CLIP_L_CONFIG)).to(dtype).eval()
        text_encoder_2 = (CLIPTextModelWithProjection(CLIPTextConfig(**tiny_models.CLIP_G_CONFIG)).to(dtype).eval()
                          if base == "sdxl" else None)
    vae_ldm = {f"first_stage_model.{k}": v for k, v in tiny_models.vae_to_ldm(vae.state_dict()).items()}
    if base == "sdxl":
        clip_and_vae = {f"conditioner.embedders.0.transformer.{k}": v for k, v in tiny_models.clip_hf_keys(text_encoder).items()}
        clip_and_vae.update({f"conditioner.embedders.1.model.{k}": v
                             for k, v in tiny_models.clip_g_to_open_clip(text_encoder_2).items()})
    else:
        clip_and_vae = {f"cond_stage_model.transformer.{k}": v for k, v in tiny_models.clip_hf_keys(text_encoder).items()}
    clip_and_vae.update(vae_ldm)
    name = f"bench_{base}.safetensors"
    save_checkpoint(models_dir / "checkpoints" / name, unet, SDXL_LDM if base == "sdxl" else SD15_LDM, clip_and_vae)
    del clip_and_vae, vae_ldm
    params = sum(p.numel() for p in unet.parameters()) / 1e9
    log(f"built {base}: UNet {params:.2f}B parameters, checkpoint "
        f"{(models_dir / 'checkpoints' / name).stat().st_size / 2**30:.2f} GiB, {time.perf_counter() - started:.1f}s")

    def pipeline():
        if base == "sdxl":
            return StableDiffusionXLPipeline(
                vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tiny_models.make_tokenizer(),
                tokenizer_2=tiny_models.make_tokenizer(pad_token="!"), unet=unet,
                scheduler=tiny_models.reference_scheduler())
        return StableDiffusionPipeline(
            vae=vae, text_encoder=text_encoder, tokenizer=tiny_models.make_tokenizer(), unet=unet,
            scheduler=tiny_models.reference_scheduler(), safety_checker=None, feature_extractor=None,
            requires_safety_checker=False)

    built = Built(name, pipeline)
    if base == "sd15":
        built.lora = random_lora(unet_config, device, dtype, SEED + 7)
        built.lora_name = save_lora(models_dir, built.lora)
    return built


def save_lora(models_dir: Path, lora: dict) -> str:
    from safetensors.torch import save_file

    name = "bench_lcm_lora_sd15.safetensors"
    save_file({k: v.detach().to("cpu").contiguous() for k, v in lora.items()}, str(models_dir / "loras" / name))
    return name


def build_tiny(base: str, models_dir: Path) -> Built:
    """--smoke and --tiny: the tests' tiny models (fp32 files; diffusers runs them in fp32), same code paths."""
    from diffusers import AutoPipelineForText2Image

    tiny = tiny_models.build_sdxl(models_dir) if base == "sdxl" else tiny_models.build_sd15(models_dir)
    built = Built(tiny.checkpoint_name,
                  lambda: AutoPipelineForText2Image.from_pretrained(str(tiny.diffusers_dir), torch_dtype=torch.float32))
    if base == "sd15":
        config = json.loads((tiny.diffusers_dir / "unet" / "config.json").read_text())
        config = {k: v for k, v in config.items() if not k.startswith("_")}
        built.lora = random_lora(config, "cpu", torch.float32, SEED + 7)
        built.lora_name = save_lora(models_dir, built.lora)
    return built


# ----------------------------------------------------------------------------------------- diffusers

def diffusers_cells(built: Built, configs, args, memory: Memory, cuda: bool, results: dict, save) -> None:
    device = "cuda" if cuda else "cpu"
    cells = results
    pipe = built.pipeline_factory().to(device)
    pipe.set_progress_bar_config(disable=True)
    if built.lora is not None:
        pipe.load_lora_weights(dict(built.lora))  # the LCM-LoRA card: load_lora_weights, then fuse_lora
        pipe.fuse_lora()
    unet_marks = Marks(cuda)
    pipe.unet.register_forward_pre_hook(lambda *_: unet_marks.start())
    pipe.unet.register_forward_hook(lambda *_: unet_marks.stop())
    decode_started = []
    decode = pipe.vae.decode

    def timed_decode(*a, **k):
        synchronize(cuda)
        decode_started.append(time.perf_counter())
        return decode(*a, **k)

    pipe.vae.decode = timed_decode
    sdxl = hasattr(pipe, "text_encoder_2")
    for config in configs:
        cell = Cell()
        if over_budget(args):
            cell.error = SKIPPED
            cells[config.key][COLUMNS[0]] = cell
            continue
        try:
            family = get_family(config.family)
            pipe.scheduler = reference_scheduler(family)

            def encode():
                if sdxl:
                    embeds, _, pooled, _ = pipe.encode_prompt(PROMPT, device=device, num_images_per_prompt=1,
                                                              do_classifier_free_guidance=False)
                    return {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}
                embeds, _ = pipe.encode_prompt(PROMPT, device, 1, False)
                return {"prompt_embeds": embeds}

            text_ms = []
            with torch.inference_mode():
                for i in range(args.warmups + args.reps):
                    synchronize(cuda)
                    started = time.perf_counter()
                    embeds = encode()
                    synchronize(cuda)
                    text_ms.append((time.perf_counter() - started) * 1e3)
            cell.text_ms = median(text_ms[args.warmups:])

            def generate(batch: int, seed: int) -> float:
                extra = {"timesteps": list(config.diffusers_timesteps)} if config.diffusers_timesteps else {}
                generator = torch.Generator(device).manual_seed(seed)
                synchronize(cuda)
                started = time.perf_counter()
                images = pipe(**embeds, num_inference_steps=config.steps, guidance_scale=0.0, height=config.size,
                              width=config.size, num_images_per_prompt=batch, generator=generator,
                              output_type="pt", **extra).images.cpu()
                ended = time.perf_counter()
                assert images.shape[0] == batch
                return (ended - started) * 1e3, (ended - decode_started[-1]) * 1e3

            for batch in (1, 4):
                warmups, reps = (args.warmups, args.reps) if batch == 1 else (args.warmups4, args.reps4)
                with torch.inference_mode():
                    first = generate(batch, SEED)[0]
                    for i in range(warmups - 1):
                        generate(batch, SEED + 1 + i)
                    memory.reset()
                    unet_marks.recording = True
                    runs = [generate(batch, SEED + 100 + i) for i in range(reps)]
                    unet_marks.recording = False
                stats = (median([r[0] for r in runs]), median(unet_marks.take_ms()), median([r[1] for r in runs]),
                         memory.peak_gib())
                if batch == 1:
                    cell.e2e_ms, cell.unet_ms, cell.vae_ms, cell.peak_gib = stats
                    cell.first_ms = first
                else:
                    cell.e2e4_ms, cell.unet4_ms, cell.vae4_ms, cell.peak4_gib = stats
            log(f"diffusers {config.key}: {cell.e2e_ms:.1f} ms (b1), {cell.e2e4_ms:.1f} ms (b4)")
        except Exception as error:
            cell.error = f"{type(error).__name__}: {error}"
            log(f"diffusers {config.key} FAILED: {cell.error}\n{traceback.format_exc()}")
        cells[config.key][COLUMNS[0]] = cell
        save()
    del pipe
    memory.reset()


# ------------------------------------------------------------------------------------------- ComfyUI

class Comfy:
    """Real ComfyUI in this process: its node loader (this pack in custom_nodes) and PromptExecutor."""

    def __init__(self, base_directory: Path, cpu: bool):
        make_base_directory(base_directory)
        if str(COMFYUI_PATH) not in sys.path:  # once: `comfy` is a namespace package, found per entry
            sys.path.insert(0, str(COMFYUI_PATH))
        from comfy.cli_args import args

        args.cpu = cpu  # before comfy.model_management is imported
        args.base_directory = str(base_directory)
        args.disable_metadata = True
        import utils.install_util  # noqa: F401 — before `nodes` puts comfy/ first on the path
        import execution
        import nodes

        self.loop = asyncio.new_event_loop()
        self.loop.run_until_complete(nodes.init_extra_nodes(init_custom_nodes=True, init_api_nodes=False))
        if "FewStepAccelerate" not in nodes.NODE_CLASS_MAPPINGS:
            raise RuntimeError("ComfyUI did not load the FewStep pack (FewStepAccelerate missing); see the log above")
        self.nodes, self.execution = nodes, execution
        self.kept: dict = {}
        self.last_run = (float("nan"), float("nan"))  # host clock at the start and end of the last execution
        nodes.NODE_CLASS_MAPPINGS["FewStepBenchSink"] = self._sink_class()
        nodes.NODE_CLASS_MAPPINGS["FewStepBenchConditioningSink"] = _ConditioningSink
        self.executor = execution.PromptExecutor(_QuietServer(), cache_type=execution.CacheType.CLASSIC,
                                                 cache_args={"lru": 0, "ram": 0})

    def _sink_class(self):
        kept = self.kept

        class FewStepBenchSink:
            """Keeps the decoded images and the latent (an output node that saves nothing)."""

            @classmethod
            def INPUT_TYPES(cls):
                return {"required": {"images": ("IMAGE",), "latent": ("LATENT",), "tag": ("STRING", {"default": ""})}}

            RETURN_TYPES = ()
            FUNCTION = "keep"
            OUTPUT_NODE = True
            CATEGORY = "_bench"

            def keep(self, images, latent, tag):
                kept[tag] = (images, latent["samples"])
                return {}

        return FewStepBenchSink

    def run(self, prompt: dict) -> float:
        """Validate (untimed), then execute; returns the execution's wall time in ms."""
        prompt_id = str(uuid.uuid4())
        valid, error, outputs, node_errors = self.loop.run_until_complete(
            self.execution.validate_prompt(prompt_id, prompt, None))
        if not valid:
            raise RuntimeError(f"prompt invalid: {error} {json.dumps(node_errors, default=str)[:2000]}")
        cuda = torch.cuda.is_available() and not self.cpu
        synchronize(cuda)
        started = time.perf_counter()
        self.loop.run_until_complete(self.executor.execute_async(prompt, prompt_id, {}, outputs))
        synchronize(cuda)
        self.last_run = (started, time.perf_counter())
        elapsed = (self.last_run[1] - started) * 1e3
        if not self.executor.success:
            errors = [data for event, data in self.executor.status_messages if event == "execution_error"]
            raise RuntimeError(f"execution failed: {json.dumps(errors, default=str)[:3000]}")
        return elapsed

    @property
    def cpu(self) -> bool:
        from comfy.cli_args import args

        return args.cpu


class _ConditioningSink:
    """An output node that takes a CONDITIONING and keeps nothing: lets a prompt run text encoding alone."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"conditioning": ("CONDITIONING",)}}

    RETURN_TYPES = ()
    FUNCTION = "keep"
    OUTPUT_NODE = True
    CATEGORY = "_bench"

    def keep(self, conditioning):
        return {}


class _QuietServer:
    """What PromptExecutor needs of PromptServer; progress messages are dropped."""

    client_id = last_node_id = last_prompt_id = None

    def send_sync(self, event, data, sid=None):
        pass

    def queue_updated(self):
        pass


def comfy_prompt(config: Config, built: Built, route: str, batch: int, seed: int, tag: str = "main",
                 chain: str = "", accelerate: dict | None = None) -> dict:
    """An API prompt for one column ('native', 'fewstep', 'accelerated'); `chain` prefixes node ids
    so that two routes can sit in one prompt; `accelerate`: FewStepAccelerate's settings."""
    p = chain
    prompt = {
        "ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": built.checkpoint_name}},
        "pos": {"class_type": "CLIPTextEncode", "inputs": {"text": PROMPT, "clip": ["ckpt", 1]}},
        "neg": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["ckpt", 1]}},
        f"{p}latent": {"class_type": "EmptyLatentImage",
                       "inputs": {"width": config.size, "height": config.size, "batch_size": batch}},
    }
    model, vae = ["ckpt", 0], ["ckpt", 2]
    if config.lora:
        prompt["lora"] = {"class_type": "LoraLoaderModelOnly",
                          "inputs": {"model": ["ckpt", 0], "lora_name": built.lora_name, "strength_model": 1.0}}
        model = ["lora", 0]
    if route == "accelerated":
        prompt["accel"] = {"class_type": "FewStepAccelerate", "inputs": {
            "model": model, "vae": vae, "max_shapes": 4, **(accelerate or {})}}
        model, vae = ["accel", 0], ["accel", 1]
    common = {"positive": ["pos", 0], "negative": ["neg", 0], "latent_image": [f"{p}latent", 0]}
    if route == "native":
        sampler_name, scheduler = NATIVE_ROUTES[config.family]
        if scheduler == "SDTurboScheduler":
            prompt[f"{p}sigmas"] = {"class_type": "SDTurboScheduler",
                                    "inputs": {"model": model, "steps": config.steps, "denoise": 1.0}}
            prompt[f"{p}sampler"] = {"class_type": "KSamplerSelect", "inputs": {"sampler_name": sampler_name}}
            prompt[f"{p}sample"] = {"class_type": "SamplerCustom", "inputs": {
                "model": model, "add_noise": True, "noise_seed": seed, "cfg": 1.0,
                "sampler": [f"{p}sampler", 0], "sigmas": [f"{p}sigmas", 0], **common}}
        else:
            prompt[f"{p}sample"] = {"class_type": "KSampler", "inputs": {
                "model": model, "seed": seed, "steps": config.steps, "cfg": 1.0, "sampler_name": sampler_name,
                "scheduler": scheduler, "denoise": 1.0, **common}}
    else:
        prompt[f"{p}sigmas"] = {"class_type": "FewStepScheduler", "inputs": {
            "model": model, "family": config.family, "steps": config.steps, "denoise": 1.0}}
        prompt[f"{p}sampler"] = {"class_type": "FewStepSampler", "inputs": {"family": config.family}}
        prompt[f"{p}sample"] = {"class_type": "SamplerCustom", "inputs": {
            "model": model, "add_noise": True, "noise_seed": seed, "cfg": 1.0,
            "sampler": [f"{p}sampler", 0], "sigmas": [f"{p}sigmas", 0], **common}}
    prompt[f"{p}decode"] = {"class_type": "VAEDecode", "inputs": {"samples": [f"{p}sample", 0], "vae": vae}}
    prompt[f"{p}sink"] = {"class_type": "FewStepBenchSink",
                          "inputs": {"images": [f"{p}decode", 0], "latent": [f"{p}sample", 0], "tag": tag}}
    return prompt


class CaptureLog(logging.Handler):
    """FewStepAccelerate's capture records (fewstep.acceleration logs one per captured graph)."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.records = []

    def emit(self, record):
        capture = getattr(record, "fewstep_capture", None)
        if capture is not None:
            self.records.append(capture)
        if record.levelno < logging.WARNING:  # warnings already reach the root logger's output
            print(f"    [{record.name}] {record.getMessage()}", flush=True)


def comfy_cells(comfy: Comfy, built: Built, configs, args, memory: Memory, cuda: bool, captures: CaptureLog,
                results: dict, save) -> None:
    import comfy.sample as comfy_sample  # `comfy` here is the Comfy runner
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    unet_marks, vae_ms, text_ms, clock = Marks(cuda), [], [], PhaseClock()
    forward = UNetModel.forward

    def timed_forward(self, *a, **k):
        unet_marks.start()
        try:
            return forward(self, *a, **k)
        finally:
            unet_marks.stop()

    def timed(method, sink, begin=None, end=None):
        def wrapper(self, *a, **k):
            synchronize(cuda)
            started = time.perf_counter()
            if begin:
                clock.mark(begin)
            out = method(self, *a, **k)
            synchronize(cuda)
            if end:
                clock.mark(end)
            sink.append((time.perf_counter() - started) * 1e3)
            return out
        return wrapper

    def stamped(function):  # comfy.sample's sample / sample_custom: what KSampler and SamplerCustom call
        def wrapper(*a, **k):
            clock.mark("sampling")
            out = function(*a, **k)  # ends with the latent copied to ComfyUI's intermediate device
            clock.mark("sampled")
            return out
        return wrapper

    decode, encode = comfy.nodes.VAEDecode.decode, comfy.nodes.CLIPTextEncode.encode
    sample, sample_custom = comfy_sample.sample, comfy_sample.sample_custom
    UNetModel.forward = timed_forward
    comfy.nodes.VAEDecode.decode = timed(decode, vae_ms, "decoding", "decoded")
    comfy.nodes.CLIPTextEncode.encode = timed(encode, text_ms)
    comfy_sample.sample, comfy_sample.sample_custom = stamped(sample), stamped(sample_custom)
    cells = results
    try:
        for config in configs:
            # Text encoding, apart: a prompt that only encodes, with a changed text each time.
            text = float("nan")
            try:
                text_ms.clear()
                for i in range(0 if args.paired_only else args.warmups + args.reps):
                    comfy.run({
                        "ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": built.checkpoint_name}},
                        "pos": {"class_type": "CLIPTextEncode", "inputs": {"text": f"{PROMPT}, variant {i}", "clip": ["ckpt", 1]}},
                        "keep": {"class_type": "FewStepBenchConditioningSink", "inputs": {"conditioning": ["pos", 0]}},
                    })
                text = median(text_ms[args.warmups:])
            except Exception as error:
                log(f"ComfyUI text encoding {config.key} FAILED: {error}\n{traceback.format_exc()}")
            settings = {"compile_kernels": args.compile, "autotune_convolutions": args.autotune}
            routes = [("native", COLUMNS[1], None), ("fewstep", COLUMNS[2], None), ("accelerated", COLUMNS[3], settings)]
            if args.paired_only:
                routes = []
            elif args.ablation:
                routes.append(("accelerated", ABLATION, {**settings, "compile_kernels": False}))
            for route, column, accelerate in routes:
                cell = Cell(text_ms=text)
                if over_budget(args):
                    cell.error = SKIPPED
                    cells[config.key][column] = cell
                    continue
                try:
                    for batch in (1, 4):
                        warmups, reps = (args.warmups, args.reps) if batch == 1 else (args.warmups4, args.reps4)
                        before = len(captures.records)
                        first = comfy.run(comfy_prompt(config, built, route, batch, SEED, accelerate=accelerate))
                        for i in range(warmups - 1):
                            comfy.run(comfy_prompt(config, built, route, batch, SEED + 1 + i, accelerate=accelerate))
                        capture_s = sum(r.seconds for r in captures.records[before:])
                        if accelerate and accelerate["compile_kernels"] and not all(
                                r.compiled for r in captures.records[before:]):
                            raise RuntimeError("compile_kernels is on but a graph was captured without compiling "
                                               "(FewStepAccelerate's warning above says why)")
                        memory.reset()
                        vae_ms.clear()
                        unet_marks.recording = True
                        runs, phases = [], []
                        for i in range(reps):
                            clock.clear()
                            runs.append(comfy.run(comfy_prompt(config, built, route, batch, SEED + 100 + i,
                                                               accelerate=accelerate)))
                            phases.append(clock.phases_ms(*comfy.last_run))
                        unet_marks.recording = False
                        stats = (median(runs), median(unet_marks.take_ms()), median(vae_ms), memory.peak_gib())
                        if batch == 1:
                            cell.e2e_ms, cell.unet_ms, cell.vae_ms, cell.peak_gib = stats
                            if all(phases):
                                cell.phases_ms = {name: median([p[name] for p in phases]) for name in PHASES}
                            cell.first_ms, cell.capture_s = first, capture_s
                        else:
                            cell.e2e4_ms, cell.unet4_ms, cell.vae4_ms, cell.peak4_gib = stats
                            cell.capture4_s = capture_s
                    if route == "accelerated":
                        cell.check = accelerated_agreement(comfy, config, built, accelerate)
                    log(f"ComfyUI {column} {config.key}: {cell.e2e_ms:.1f} ms (b1), {cell.e2e4_ms:.1f} ms (b4)"
                        + (f", capture {cell.capture_s:.2f}s + {cell.capture4_s:.2f}s, " + "; ".join(
                            f"{b} latent {c['latent']} image {c['image']}" for b, c in cell.check.items())
                           if route == "accelerated" else ""))
                except Exception as error:
                    unet_marks.recording = False
                    cell.error = f"{type(error).__name__}: {error}"[:500]
                    log(f"ComfyUI {route} {config.key} FAILED: {cell.error}\n{traceback.format_exc()}")
                cells[config.key][column] = cell
                save()
            if args.paired and over_budget(args):
                cells[config.key]["paired"] = {"error": SKIPPED}
                log(f"ComfyUI native vs FewStep pairs, {config.key}: {SKIPPED}")
            elif args.paired:
                try:
                    cells[config.key]["paired"] = paired_native_fewstep(comfy, config, built, args.paired)
                    log(f"ComfyUI native vs FewStep, {args.paired} interleaved pairs, {config.key}: "
                        + "; ".join(f"{b} FewStep/native {p['ratio_median']:.3f}" for b, p in cells[config.key]["paired"].items()))
                except Exception as error:
                    cells[config.key]["paired"] = {"error": f"{type(error).__name__}: {error}"[:500]}
                    log(f"paired native/FewStep {config.key} FAILED: {error}\n{traceback.format_exc()}")
                save()
    finally:
        UNetModel.forward = forward
        comfy.nodes.VAEDecode.decode, comfy.nodes.CLIPTextEncode.encode = decode, encode
        comfy_sample.sample, comfy_sample.sample_custom = sample, sample_custom


def paired_native_fewstep(comfy: Comfy, config: Config, built: Built, pairs: int) -> dict:
    """ComfyUI native and ComfyUI + FewStep, one run of each in turn (the order swapped every pair),
    `pairs` times per batch size: eager sampling follows the shared host CPU's speed, which drifts
    within a run by more than the two routes differ, and runs taken in turn see the same drift."""
    paired = {}
    for batch in (1, 4):
        for route in ("native", "fewstep"):  # warm: models loaded, nothing compiled (eager)
            comfy.run(comfy_prompt(config, built, route, batch, SEED))
        times = {"native": [], "fewstep": []}
        for i in range(pairs):
            for route in (("native", "fewstep") if i % 2 == 0 else ("fewstep", "native")):
                times[route].append(comfy.run(comfy_prompt(config, built, route, batch, SEED + 500 + i)))
        ratios = [f / n for f, n in zip(times["fewstep"], times["native"])]
        paired[f"b{batch}"] = {"pairs": pairs, "native_ms": median(times["native"]),
                               "fewstep_ms": median(times["fewstep"]), "ratio_median": median(ratios),
                               "ratio_quartiles": (statistics.quantiles(ratios, n=4, method="inclusive")
                                                   if len(ratios) > 1 else ratios * 3)}
    return paired


def accelerated_agreement(comfy: Comfy, config: Config, built: Built, accelerate: dict, batches=(1, 4)) -> dict:
    """The accelerated chain and the eager FewStep chain in one prompt, same seed: their final
    latents and decoded images compared (fewstep.acceleration.agreement)."""
    check = {}
    for batch in batches:
        prompt = comfy_prompt(config, built, "fewstep", batch, CHECK_SEED, tag="eager", chain="eager_")
        prompt.update(comfy_prompt(config, built, "accelerated", batch, CHECK_SEED, tag="accelerated",
                                   accelerate=accelerate))
        comfy.run(prompt)
        (eager_images, eager_latent), (images, latent) = comfy.kept["eager"], comfy.kept["accelerated"]
        check[f"b{batch}"] = {"latent": agreement(latent, eager_latent), "image": agreement(images, eager_images),
                              "finite": bool(torch.isfinite(eager_latent).all() and torch.isfinite(eager_images).all())}
    return check


# --------------------------------------------------------------------------------------------- report

def device_ceilings(cuda: bool) -> dict:
    """The two ceilings METHOD.md asks for: a large fp16 matrix product and a device-to-device copy."""
    if not cuda:
        return {}
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.float16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.float16)
    for _ in range(3):
        a @ b
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        a @ b
    end.record()
    torch.cuda.synchronize()
    tflops = 10 * 2 * 8192**3 / (start.elapsed_time(end) / 1e3) / 1e12
    x = torch.randn(2**30 // 2, device="cuda", dtype=torch.float16)  # 1 GiB
    y = torch.empty_like(x)
    y.copy_(x)
    start.record()
    for _ in range(10):
        y.copy_(x)
    end.record()
    torch.cuda.synchronize()
    bandwidth = 10 * 2 * x.numel() * 2 / (start.elapsed_time(end) / 1e3) / 1e12
    del a, b, x, y
    torch.cuda.empty_cache()
    return {"fp16 matmul TFLOP/s (8192³)": round(tflops, 1), "D2D copy TB/s (read+write)": round(bandwidth, 2)}


def environment(cuda: bool) -> dict:
    import diffusers
    import transformers

    from comfyui_version import __version__ as comfyui_version  # ComfyUI is on sys.path (Comfy)

    env = {
        "date (UTC)": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M"),
        "python": platform.python_version(), "torch": torch.__version__, "diffusers": diffusers.__version__,
        "transformers": transformers.__version__, "ComfyUI": comfyui_version,
    }
    if cuda:
        env["device"] = torch.cuda.get_device_name()
        env["CUDA (torch)"] = torch.version.cuda
        env["cuDNN"] = torch.backends.cudnn.version()
        try:
            import triton

            env["Triton"] = triton.__version__
        except ImportError:
            env["Triton"] = "not installed"
        try:
            env["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                           capture_output=True, text=True, timeout=20).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            env["driver"] = "unknown (nvidia-smi failed)"
    else:
        env["device"] = f"CPU ({platform.processor() or platform.machine()}), --smoke"
    return env


def fmt(value, digits=1, suffix=""):
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:.{digits}f}{suffix}"


def table(configs, results: dict) -> str:
    header = ("| model | path | e2e b1 ms | speed-up vs diffusers | UNet ms/call | VAE ms | text enc ms | "
              "peak GiB b1 | e2e b4 ms | img/s b4 | speed-up b4 | peak GiB b4 | compile + capture s (b1+b4) | "
              "accelerated vs eager rel L2 (latent / image, b1; b4) |")
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for config in configs:
        base = results[config.key].get(COLUMNS[0], Cell())
        for column in [*COLUMNS, ABLATION]:
            cell = results[config.key].get(column)
            if cell is None:
                continue
            if cell.error:
                status = cell.error if cell.error == SKIPPED else f"failed: {cell.error[:120]}"
                lines.append(f"| {config.title} | {column} | {status} |" + " |" * 11)
                continue
            speed = base.e2e_ms / cell.e2e_ms if column != COLUMNS[0] else 1.0
            speed4 = cell.images_per_s4 / base.images_per_s4 if column != COLUMNS[0] else 1.0
            capture = (f"{cell.capture_s:.1f} + {cell.capture4_s:.1f}" if cell.check else "")
            check = ""
            if cell.check:
                b1, b4 = cell.check["b1"], cell.check["b4"]
                check = (f"{b1['latent'].relative_l2:.1e} / {b1['image'].relative_l2:.1e}; "
                         f"{b4['latent'].relative_l2:.1e} / {b4['image'].relative_l2:.1e}"
                         + ("" if all(c[k].within_tolerance for c in (b1, b4) for k in ("latent", "image"))
                            else " OUTSIDE tolerance"))
            lines.append(
                f"| {config.title} | {column} | {fmt(cell.e2e_ms)} | {fmt(speed, 2, '×')} | {fmt(cell.unet_ms, 2)} | "
                f"{fmt(cell.vae_ms)} | {fmt(cell.text_ms)} | {fmt(cell.peak_gib, 1)} | {fmt(cell.e2e4_ms)} | "
                f"{fmt(cell.images_per_s4, 2)} | {fmt(speed4, 2, '×')} | {fmt(cell.peak4_gib, 1)} | {capture} | {check} |")
    return "\n".join(lines)


def phase_table(configs, results: dict) -> str:
    """Batch 1, ComfyUI columns: each prompt's stages (medians over its runs; the stages' medians need
    not add up to the e2e median exactly). "UNet" is the steps' GPU time (steps × UNet ms/call), and
    "sampling − UNet" what the sampling stage spends besides it (set-up, the host-side steps, the
    latent's copy to the CPU): the UNet's GPU time hides the host's launches except where the host
    falls behind."""
    header = ("| model | path | e2e b1 ms | before sampling | sampling | UNet (steps × call) | sampling − UNet | "
              "to decode | decode | after decode |")
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for config in configs:
        for column in [*COLUMNS[1:], ABLATION]:
            cell = results[config.key].get(column)
            if cell is None or cell.error or not cell.phases_ms:
                continue
            phase = cell.phases_ms
            unet = config.steps * cell.unet_ms
            lines.append(f"| {config.title} | {column} | {fmt(cell.e2e_ms)} | {fmt(phase['before sampling'])} | "
                         f"{fmt(phase['sampling'])} | {fmt(unet)} | {fmt(phase['sampling'] - unet)} | "
                         f"{fmt(phase['to decode'])} | {fmt(phase['decode'])} | {fmt(phase['after decode'])} |")
    return "\n".join(lines)


def targets(configs, results: dict) -> list[str]:
    lines = []
    for config in configs:
        cells = results[config.key]
        native, ours, fast, base = (cells.get(c) for c in (COLUMNS[1], COLUMNS[2], COLUMNS[3], COLUMNS[0]))
        paired = cells.get("paired")
        if paired and "error" in paired:
            lines.append(f"- {config.title}: interleaved native / FewStep pairs not measured ({paired['error']})")
            paired = None
        if paired:
            r1, r4 = paired["b1"]["ratio_median"], paired["b4"]["ratio_median"]
            quartiles = {b: ", ".join(f"{q:.3f}" for q in p["ratio_quartiles"]) for b, p in paired.items()}
            lines.append(f"- {config.title}: FewStep / native latency, median of {paired['b1']['pairs']} interleaved pairs: "
                         f"{r1:.3f} (b1, quartiles {quartiles['b1']}), {r4:.3f} (b4, quartiles {quartiles['b4']}) "
                         f"— target ≤ 1.02: {'met' if max(r1, r4) <= 1.02 else 'MISSED'}")
        elif native and ours and not native.error and not ours.error:
            r1, r4 = ours.e2e_ms / native.e2e_ms, ours.e2e4_ms / native.e2e4_ms
            lines.append(f"- {config.title}: FewStep / native latency {r1:.3f} (b1), {r4:.3f} (b4) — target ≤ 1.02: "
                         f"{'met' if max(r1, r4) <= 1.02 else 'MISSED'}")
        if fast and base and not fast.error and not base.error:
            speed = base.e2e_ms / fast.e2e_ms
            target = f", target ≤ {config.targets_ms:g} ms: {'met' if fast.e2e_ms <= config.targets_ms else 'MISSED'}" \
                if config.targets_ms else ""
            lines.append(f"- {config.title}: accelerated {fast.e2e_ms:.1f} ms end to end, {speed:.2f}× diffusers eager "
                         f"(target ≥ 3×: {'met' if speed >= 3 else 'MISSED'}){target}")
    return lines


def to_json(value):
    if isinstance(value, Cell):
        return {**{k: to_json(v) for k, v in asdict(value).items() if k != "check"},
                "check": {b: {k: (str(v) if not isinstance(v, bool) else v) for k, v in c.items()}
                          for b, c in value.check.items()}}
    if isinstance(value, dict):
        return {k: to_json(v) for k, v in value.items()}
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def write_report(out: Path, configs, results: dict, env: dict, args) -> str:
    env_lines = "\n".join(f"- {k}: {v}" for k, v in env.items())
    report = (f"{env_lines}\n\n{table(configs, results)}\n\nWhere the batch-1 time goes (ComfyUI columns, "
              f"host clock, medians in ms; UNet: its GPU time, steps × UNet ms/call):\n\n"
              f"{phase_table(configs, results)}\n\n"
              + "\n".join(targets(configs, results))
              + f"\n\nreps: batch 1 median of {args.reps} after {args.warmups} warm-ups; batch 4 median of "
                f"{args.reps4} after {args.warmups4}; FewStepAccelerate compile_kernels={args.compile}, "
                f"autotune_convolutions={args.autotune}; "
                f"tolerance rel L2 ≤ {RELATIVE_L2_TOLERANCE:g}; bench wall time {time.perf_counter() - STARTED:.0f} s\n")
    (out / "results.md").write_text(report)
    (out / "results.json").write_text(json.dumps({"environment": env, "results": to_json(results)}, indent=1, default=str))
    return report


def over_budget(args) -> bool:
    return time.perf_counter() - STARTED > args.budget_s


# ----------------------------------------------------------------------------------------------- main

def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny models, 64² images, one repetition")
    parser.add_argument("--tiny", action="store_true",
                        help="CUDA, the tests' tiny models at 64²: each prompt's own host time with next to no GPU "
                             "work (the end-to-end ms targets are not judged on it)")
    parser.add_argument("--configs", default=",".join(c.key for c in CONFIGS))
    parser.add_argument("--warmups", type=int, default=None, help="untimed runs first at batch 1 (default 3; smoke 1)")
    parser.add_argument("--warmups4", type=int, default=None, help="untimed runs first at batch 4 (default 2; smoke 1)")
    parser.add_argument("--reps", type=int, default=None, help="timed runs at batch 1 (default 10; smoke 1)")
    parser.add_argument("--reps4", type=int, default=None, help="timed runs at batch 4 (default 6; smoke 1)")
    parser.add_argument("--no-autotune", dest="autotune", action="store_false",
                        help="FewStepAccelerate's autotune_convolutions off")
    parser.add_argument("--no-compile", dest="compile", action="store_false",
                        help="FewStepAccelerate's compile_kernels off")
    parser.add_argument("--ablation", action="store_true",
                        help="also time the accelerated path with compile_kernels off (CUDA graphs only)")
    parser.add_argument("--paired", type=int, default=0, metavar="N",
                        help="also time ComfyUI native and ComfyUI + FewStep in N interleaved pairs per batch size "
                             "(the FewStep / native target is then judged on them)")
    parser.add_argument("--paired-only", action="store_true",
                        help="only the interleaved native / FewStep pairs (no diffusers, no acceleration); needs --paired")
    parser.add_argument("--out", default=os.environ.get("OUT") or "bench/out")
    parser.add_argument("--budget-s", type=float, default=float("inf"),
                        help="skip the cells not started after this many seconds (a device call's limit)")
    args = parser.parse_args(argv)
    if args.paired_only and not args.paired:
        parser.error("--paired-only needs --paired N")
    if COMFYUI_PATH is None:
        print(COMFYUI_MISSING)
        return 1
    if args.smoke and args.tiny:
        parser.error("--smoke already uses the tiny models (on the CPU); --tiny runs them on the GPU")
    cuda, tiny = not args.smoke, args.smoke or args.tiny
    if cuda and not torch.cuda.is_available():
        print("no CUDA device: run with --smoke for the CPU check")
        return 1
    args.warmups = args.warmups or (1 if args.smoke else 3)
    args.warmups4 = args.warmups4 or (1 if args.smoke else 2)
    args.reps = args.reps or (1 if args.smoke else 10)
    args.reps4 = args.reps4 or (1 if args.smoke else 6)
    chosen = [c for c in CONFIGS if c.key in args.configs.split(",")]
    if tiny:
        chosen = [tiny_config(c) for c in chosen]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    base_directory = Path(tempfile.mkdtemp(prefix="fewstep-gpu-bench-"))

    runner = Comfy(base_directory, cpu=not cuda)
    captures = CaptureLog()
    logging.getLogger("fewstep.acceleration").addHandler(captures)
    logging.getLogger("fewstep.acceleration").setLevel(logging.INFO)
    memory = Memory(cuda)
    env = environment(cuda)
    env.update(device_ceilings(cuda))
    import comfy.ldm.modules.attention as attention
    import comfy.model_management as management

    env["ComfyUI attention"] = attention.optimized_attention.__name__
    env["ComfyUI VAE dtype"] = str(management.vae_dtype(management.vae_device(), [torch.bfloat16, torch.float32]))
    log("environment: " + json.dumps(env))

    results = {c.key: {} for c in chosen}

    def save():  # after every cell: a run cut short still leaves what it measured
        write_report(out, chosen, results, env, args)
    dtype = torch.float16 if cuda else torch.float32
    models = base_directory / "models"
    for base in ("sdxl", "sd15"):
        group = [c for c in chosen if c.base == base]
        if not group:
            continue
        built = build_tiny(base, models) if tiny else build_full(base, models, "cuda", dtype)
        if not args.paired_only:
            diffusers_cells(built, group, args, memory, cuda, results, save)
        built.pipeline_factory = None  # drop the diffusers modules before ComfyUI loads its copy
        gc.collect()
        memory.reset()
        comfy_cells(runner, built, group, args, memory, cuda, captures, results, save)
        # Drop the executor's cached outputs (models, FewStepAccelerate's graphs and their memory
        # pools) before the next base model: the run of 2026-12-01 kept them, and the SD1.5
        # diffusers cell's peak VRAM included them.
        runner.executor.reset()
        management.unload_all_models()
        management.cleanup_models()
        gc.collect()
        memory.reset()
        write_report(out, chosen, results, env, args)  # what is done so far, should the run be cut short

    report = write_report(out, chosen, results, env, args)
    print("\n" + report, flush=True)
    failed = [f"{k}/{c}" for k, cells in results.items() for c, cell in cells.items()
              if (cell.error if isinstance(cell, Cell) else cell.get("error")) not in (None, "", SKIPPED)]
    if failed:
        print(f"failed cells: {', '.join(failed)}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
