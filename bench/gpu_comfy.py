"""bench/gpu.py's ComfyUI columns: real ComfyUI in this process, the prompt of each column, and the
timed runs, interleaved pairs and agreement checks made with them."""
from __future__ import annotations

import asyncio
import json
import logging
import sys
import time
import traceback
import uuid
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "testing"))
import pack  # noqa: E402,F401 — registers the pack as the `comfyui_fewstep` package
from comfy_harness import COMFYUI_PATH, InProcessComfy  # noqa: E402
from interleaved_pairs import interleaved_pairs  # noqa: E402

from comfyui_fewstep.fewstep.acceleration import agreement  # noqa: E402

from gpu_flow import BenchFlowConditioning, flow_prompt, is_flow, transformer_classes  # noqa: E402
from gpu_models import (  # noqa: E402
    ABLATION, Built, CHECK_SEED, COLUMNS, Config, NATIVE_ROUTES, PROMPT, SEED, SKIPPED, add_decode_and_sink,
    add_fewstep_sampling,
)
from gpu_timing import STARTED as BENCH_STARTED, Cell, Marks, Memory, PHASES, PhaseClock, log, median, over_budget, synchronize  # noqa: E402

# ------------------------------------------------------------------------------------------- ComfyUI

class Comfy(InProcessComfy):
    """The tests' in-process ComfyUI (its node loader with this pack, its PromptExecutor) in the
    bench's dtype settings, with output nodes that keep what a prompt made, and timed runs."""

    def __init__(self, base_directory: Path, cpu: bool):
        super().__init__(COMFYUI_PATH, base_directory, cpu=cpu, fp32_text_encoders=False)
        if "FewStepAccelerate" not in self.nodes.NODE_CLASS_MAPPINGS:
            raise RuntimeError("ComfyUI did not load the FewStep pack (FewStepAccelerate missing); see the log above")
        self.loop = asyncio.new_event_loop()
        self.kept: dict = {}
        self.last_run = (float("nan"), float("nan"))  # host clock at the start and end of the last execution
        self.nodes.NODE_CLASS_MAPPINGS["FewStepBenchSink"] = self._sink_class()
        self.nodes.NODE_CLASS_MAPPINGS["FewStepBenchConditioningSink"] = _ConditioningSink
        self.nodes.NODE_CLASS_MAPPINGS["FewStepBenchFlowConditioning"] = BenchFlowConditioning
        self.executor = self.execution.PromptExecutor(_QuietServer(), cache_type=self.execution.CacheType.CLASSIC,
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
    if is_flow(config):
        return flow_prompt(config, built, route, batch, seed, tag, chain, accelerate)
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
        add_fewstep_sampling(prompt, p, model, config, seed, common)
    add_decode_and_sink(prompt, p, vae, tag)
    return prompt


def compile_worker(comfy: Comfy):
    """FewStepAccelerate's compile worker as ComfyUI imported the pack (its own copy of the modules)."""
    node_module = sys.modules[comfy.nodes.NODE_CLASS_MAPPINGS["FewStepAccelerate"].__module__]
    return sys.modules[node_module.GraphCache.__module__].WORKER


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
    denoisers = [UNetModel, *transformer_classes()]  # the UNet, and the flow rows' transformers
    forwards = {cls: cls.forward for cls in denoisers}

    def timed_forward(forward):
        def wrapper(self, *a, **k):
            unet_marks.start()
            try:
                return forward(self, *a, **k)
            finally:
                unet_marks.stop()
        return wrapper

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
    for cls, forward in forwards.items():
        cls.forward = timed_forward(forward)
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
                # (the flow rows feed fixed conditioning: no text encoders to time)
                for i in range(0 if args.paired_only or built.checkpoint_name is None else args.warmups + args.reps):
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
                    for batch in config.batches:
                        warmups, reps = (args.warmups, args.reps) if batch == 1 else (args.warmups4, args.reps4)
                        before = len(captures.records)
                        first = comfy.run(comfy_prompt(config, built, route, batch, SEED, accelerate=accelerate))
                        compiling = accelerate and accelerate["compile_kernels"]
                        compiled_in_time = True
                        if compiling:  # the compile runs in the background: the timed runs are of its graphs
                            # ... within what is left of --budget-s (a device call's limit), else timed without it
                            left = args.budget_s - (time.perf_counter() - BENCH_STARTED)
                            limit = None if left == float("inf") else max(left, 60.0)
                            compiled_in_time = compile_worker(comfy).wait_until_idle(limit)
                            if not compiled_in_time:
                                cell.note = "; ".join(filter(None, [cell.note, (
                                    f"b{batch}: the compile had not finished {limit:.0f} s after the first prompt "
                                    f"(--budget-s): timed on the graphs captured without it")]))
                                log(f"ComfyUI {column} {config.key}: {cell.note}")
                        for i in range(max(warmups - 1, 1 if compiling else 0)):
                            comfy.run(comfy_prompt(config, built, route, batch, SEED + 1 + i, accelerate=accelerate))
                        capture_s = sum(r.seconds for r in captures.records[before:])
                        captured = captures.records[before:]  # none where the node runs eager (the CPU smoke)
                        compiled_parts = {r.part for r in captured if r.compiled}  # the denoiser ("UNet"/"transformer") and the VAE
                        if compiling and compiled_in_time and captured and (
                                len(compiled_parts) != 2 or "VAE decode" not in compiled_parts):
                            raise RuntimeError("compile_kernels is on but a part has no compiled graph "
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
                        cell.check = accelerated_agreement(comfy, config, built, accelerate, config.batches)
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
        for cls, forward in forwards.items():
            cls.forward = forward
        comfy.nodes.VAEDecode.decode, comfy.nodes.CLIPTextEncode.encode = decode, encode
        comfy_sample.sample, comfy_sample.sample_custom = sample, sample_custom


def paired_native_fewstep(comfy: Comfy, config: Config, built: Built, pairs: int) -> dict:
    """ComfyUI native and ComfyUI + FewStep timed in turn (testing/interleaved_pairs.py says why)."""
    return interleaved_pairs(lambda route, batch, seed: comfy.run(comfy_prompt(config, built, route, batch, seed)),
                             pairs, warm_seed=SEED, first_seed=SEED + 500)


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


