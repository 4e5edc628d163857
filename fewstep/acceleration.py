"""Fixed-shape acceleration: CUDA-graph capture per input shape, and the tolerance it is held to.

Few-step sampling runs the UNet 1–4 times and the VAE decoder once, at one shape, so at 512² the GPU
mostly waits for Python to launch ~1,500 kernels per UNet call. A CUDA graph records those launches
once per shape and replays them with one call (PyTorch's "CUDA Graphs" notes, torch.cuda.CUDAGraph).
Optionally the function is first compiled by torch.compile (TorchInductor) for that shape: it fuses
the memory-bound work around the matrix products and convolutions (GroupNorm + SiLU, residual adds,
GEGLU) and lays the convolutions out channels-last, which shortens the GPU time that graphs alone
leave as it is; the graph then records the compiled kernels. Two of the VAE decoder's operations are
traced in other forms for it (group_norm_by_channel_sums, attention_by_matmuls; see there).
A graph replays fixed memory addresses: its inputs are copied into static buffers, its output is
copied out, and it is only valid while every parameter and buffer of the module it ran is the
tensor that was captured — `WeightSnapshot` checks that, so a re-patched or offloaded model is
re-captured or run eagerly instead of reading freed memory.

Torch only; the ComfyUI side (ModelPatcher wrappers, the VAE object) is in nodes/acceleration.py.
"""
from __future__ import annotations

import contextlib
import logging
import math
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable, ContextManager, Sequence

import torch

log = logging.getLogger("fewstep.acceleration")

# Eager runs on a side stream before capturing: lazy initialisation (cuBLAS handles and workspaces,
# cuDNN's algorithm choice, SDPA's backend) must happen outside the graph (PyTorch CUDA Graphs notes:
# "warm up on a side stream before capture"). Three is what the PyTorch notes' examples use.
WARMUP_RUNS = 3
DEFAULT_MAX_SHAPES = 4

# The accelerated path must agree with the eager path it replaces (same ComfyUI model, same inputs)
# to this relative L2 error, ‖accelerated − eager‖ / ‖eager‖, on the final latent and on the decoded
# image. A replayed graph runs the same kernels as eager, except where cuDNN's autotuning (optional)
# picks another convolution algorithm, which sums in another order: in fp16 (unit roundoff 4.9e-4)
# and bf16 (3.9e-3, ComfyUI's VAE dtype) that stays near 1e-3 through a UNet and a decoder. A stale
# buffer, a missed input or a wrong shape gives errors of order 1, so 1e-2 separates the two.
RELATIVE_L2_TOLERANCE = 1e-2
# Compiled kernels sum in another order than eager (fused reductions, channels-last convolutions).
# Measured on an H200 (bench/RESULTS.md): at most 5.1e-4 on the latent and 4.1e-3 on the bf16-decoded
# image, so compiled graphs are held to the same tolerance, still well apart from errors of order 1.

# torch.compile's GPU code generator. One shape per compile (dynamic=False): a few-step run repeats
# one shape, and static shapes give the fused kernels their fixed sizes. conv_1x1_as_mm runs the 1×1
# convolutions (resnet shortcuts, the VAE's attention projections) as matrix products, which
# Inductor can fuse with their neighbours. Weights stay graph inputs (no freezing): ComfyUI
# re-patches them in place.
COMPILE_BACKEND = "inductor"
COMPILE_OPTIONS = {"conv_1x1_as_mm": True}
# Dynamo keeps compiled code per Python function, shared by all its closures, and recompiles when a
# guard fails: at each new shape (dynamic=False) and for each model. Past its default limit of 8
# recompiles it would silently run that function eagerly, so a server that has seen a few sizes and
# models would lose the compiled kernels. The limit is raised only while a capture compiles.
COMPILE_RECOMPILE_LIMIT = 256
# While compiling: fail rather than run eagerly where Dynamo would give up silently (the recompile
# limit, or TORCHDYNAMO_SUPPRESS_ERRORS set in the environment), so that the fallback says so.
# Keys this torch lacks are left out. Dynamo's config is process-wide: ComfyUI runs one prompt at a
# time, and the setting lasts only for the compiling call.
COMPILE_CONFIG = {"recompile_limit": COMPILE_RECOMPILE_LIMIT, "fail_on_recompile_limit_hit": True,
                  "suppress_errors": False}


class CompileFailed(RuntimeError):
    """torch.compile failed on the first run of a function (its cause is the error it raised)."""


@dataclass(frozen=True)
class Agreement:
    """How far an accelerated output is from the eager one."""

    relative_l2: float
    max_abs: float
    tolerance: float = RELATIVE_L2_TOLERANCE

    @property
    def within_tolerance(self) -> bool:
        return self.relative_l2 <= self.tolerance  # False for NaN too

    def __str__(self) -> str:
        verdict = "within" if self.within_tolerance else "OUTSIDE"
        return f"rel L2 {self.relative_l2:.2e}, max |Δ| {self.max_abs:.2e} ({verdict} {self.tolerance:g})"


def agreement(accelerated: torch.Tensor, eager: torch.Tensor, tolerance: float = RELATIVE_L2_TOLERANCE) -> Agreement:
    """‖accelerated − eager‖₂ / ‖eager‖₂ and max |Δ|, in float64."""
    if accelerated.shape != eager.shape:
        raise ValueError(f"shapes differ: {tuple(accelerated.shape)} vs {tuple(eager.shape)}")
    a, e = accelerated.detach().double().cpu(), eager.detach().double().cpu()
    difference = a - e
    reference = torch.linalg.vector_norm(e).item()
    relative = torch.linalg.vector_norm(difference).item() / reference if reference > 0 else float("inf")
    return Agreement(relative, difference.abs().max().item(), tolerance)


def tensor_signature(value) -> tuple | None:
    """What a captured graph is specific to: shape, dtype, device, memory layout (None stays None)."""
    if value is None:
        return None
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"not a tensor: {type(value).__name__}")
    return (tuple(value.shape), value.dtype, value.device, value.stride())


def cuda_graph_unavailable_reason(device: torch.device | str) -> str | None:
    """Why CUDA graphs cannot run on `device`, or None when they can."""
    device = torch.device(device)
    if device.type != "cuda":
        return f"CUDA graphs need a CUDA device and this runs on {device.type}"
    if not torch.cuda.is_available():
        return "CUDA graphs need a CUDA device and torch sees none"
    if torch.cuda.is_current_stream_capturing():
        return "a CUDA graph is already being captured on this stream"
    return None


def compile_unavailable_reason(device: torch.device | str) -> str | None:
    """Why torch.compile's GPU backend cannot run on `device`, or None when it can."""
    device = torch.device(device)
    if device.type != "cuda":
        return f"torch.compile is used only on CUDA devices and this runs on {device.type}"
    try:
        import triton  # noqa: F401 — Inductor writes its GPU kernels in Triton
    except ImportError:
        return ("torch.compile's GPU kernels need Triton, which is not installed (pip install triton; "
                "on Windows, triton-windows)")
    return None


def compile_for_one_shape(function: Callable[..., torch.Tensor], backend=COMPILE_BACKEND,
                          options: dict | None = COMPILE_OPTIONS) -> Callable[..., torch.Tensor]:
    """`function` compiled by torch.compile for the shapes it is first called with.

    Compilation happens at that first call; graph breaks are allowed (fullgraph=False): the parts
    Dynamo cannot trace run as Python between compiled pieces, and a CUDA graph records both.
    """
    compiled = torch.compile(function, backend=backend, dynamic=False, fullgraph=False,
                             options=options if backend == "inductor" else None)
    settings = {key: value for key, value in COMPILE_CONFIG.items() if hasattr(torch._dynamo.config, key)}

    def call(*inputs):
        with torch._dynamo.config.patch(**settings):
            return compiled(*inputs)

    return call


# ------------------------------------------------------------------ what the compiler traces instead
# Two of the VAE decoder's operations are slow as ComfyUI writes them once Inductor has laid the
# activations out channels-last (bench/gpu_profile.py, bench/vae_kernels.py). The compiled decode
# traces these equivalents instead; eager code is unchanged.

def group_norm_by_channel_sums(x: torch.Tensor, num_groups: int, weight: torch.Tensor | None = None,
                               bias: torch.Tensor | None = None, eps: float = 1e-5) -> torch.Tensor:
    """torch.nn.functional.group_norm, computed from per-channel sums over the positions.

    Channels-last, a group's channels are interleaved with every pixel, and a reduction over the group
    reads memory in short strided pieces; summing each channel over the positions reads whole rows of
    contiguous channels instead, and the groups' totals are then a sum over a few numbers.
    One pass, in float32, on x − s, s an estimate of each group's mean: its mean over the first line
    of positions (the first image row). var = E[(x − s)²] − E[x − s]² then loses float32's 6e-8 times
    1 + ((mean − s) / std)² of the variance to cancellation: next to nothing while the first row is
    like the rest, where without the shift a mean far from zero relative to the spread would lose
    every digit.
    """
    if x.ndim < 3:
        raise ValueError("group_norm_by_channel_sums needs positions after (batch, channels); "
                         f"got shape {tuple(x.shape)}")
    batch, channels = x.shape[:2]
    per_group = channels // num_groups
    positions = tuple(range(2, x.ndim))
    count = per_group * math.prod(x.shape[2:])
    ones = (1,) * len(positions)

    def per_channel(per_group_values):  # (batch, groups) → (batch, channels, 1, …) to broadcast
        return per_group_values.repeat_interleave(per_group, dim=1).view((batch, channels) + ones)

    def group_totals(per_channel_values):  # (batch, channels, …) summed over positions → (batch, groups)
        return per_channel_values.sum(positions).view(batch, num_groups, per_group).sum(-1)

    values = x.float()
    first_line = values[(slice(None), slice(None)) + (0,) * (len(positions) - 1)]  # (batch, channels, last)
    shift = first_line.reshape(batch, num_groups, -1).mean(-1)  # (batch, groups)
    centred = values - per_channel(shift)
    shifted_mean = group_totals(centred) / count
    variance = (group_totals(centred * centred) / count - shifted_mean * shifted_mean).clamp_min(0)
    normalised = (values - per_channel(shifted_mean + shift)) * per_channel(torch.rsqrt(variance + eps))
    if weight is not None:
        normalised = normalised * weight.float().view((1, channels) + ones)
    if bias is not None:
        normalised = normalised + bias.float().view((1, channels) + ones)
    return normalised.to(x.dtype)


# Below this many elements a GroupNorm input is left to torch's group_norm: Inductor's own reduction
# is as fast there (H200, bench/vae_kernels.py: 0.92× at 512 channels × 128², 1.25× at × 256²,
# 1.9–3.1× from 2**26 elements up, the VAE decoder's high-resolution stages).
CHANNEL_SUMS_MIN_ELEMENTS = 2**24


def group_norm_for_compiler(x: torch.Tensor, num_groups: int, weight: torch.Tensor | None = None,
                            bias: torch.Tensor | None = None, eps: float = 1e-5) -> torch.Tensor:
    """group_norm as the compiled VAE decoder computes it: by channel sums where the input is large."""
    if x.ndim < 3 or x.numel() < CHANNEL_SUMS_MIN_ELEMENTS:
        return torch.nn.functional.group_norm(x, num_groups, weight, bias, eps)
    return group_norm_by_channel_sums(x, num_groups, weight, bias, eps)


# The most scores attention_by_matmuls makes at once: 2**28, 512 MiB in bf16 (and twice that again for
# a float32 softmax, should Inductor not fuse it into one pass).
MAX_ATTENTION_SCORES = 2**28


def attention_by_matmuls(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                         max_scores: int = MAX_ATTENTION_SCORES) -> torch.Tensor:
    """One-head attention over the positions of (batch, channels, H, W) maps, as the VAE's AttnBlock
    does, written as QKᵀ, softmax and ·V: two matrix products and one fusable softmax.

    The VAE's single head has 512 channels, more than the flash kernels take, so scaled_dot_product_
    attention runs the memory-efficient kernel, slower than the two matrix products (bench/
    vae_kernels.py). The queries are scaled first, so that fp16 scores cannot overflow where the
    softmax's would not; the scores are rounded to the inputs' dtype, as ComfyUI's split attention
    does, and the softmax runs in float32; the queries are taken in chunks so that no more than
    `max_scores` scores exist at once.
    """
    batch, channels = q.shape[:2]
    positions = math.prod(q.shape[2:])
    queries = (q * channels ** -0.5).reshape(batch, channels, positions).transpose(1, 2)
    keys = k.reshape(batch, channels, positions)
    values = v.reshape(batch, channels, positions).transpose(1, 2)
    chunk = max(1, min(positions, max_scores // (batch * positions)))
    pieces = []
    for start in range(0, positions, chunk):
        scores = torch.bmm(queries[:, start:start + chunk], keys)
        weights = torch.softmax(scores.float(), dim=-1).to(values.dtype)
        pieces.append(torch.bmm(weights, values))
    out = pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=1)
    return out.transpose(1, 2).reshape(q.shape)


class WeightSnapshot:
    """The storage address of every parameter and buffer of a module, as a graph captured them.

    ComfyUI patches weights (LoRA, offloading, lowvram) either in place — the graph then reads the
    new values, correctly — or by swapping in new tensors, which `unchanged()` detects.
    """

    def __init__(self, module: torch.nn.Module):
        self.slots, self.names, tensors = [], [], []
        for owner in module.modules():
            for slots in (owner._parameters, owner._buffers):
                for name, tensor in slots.items():
                    if tensor is not None:
                        self.slots.append(slots)
                        self.names.append(name)
                        tensors.append(tensor)
        self.addresses = [tensor.data_ptr() for tensor in tensors]

    def unchanged(self) -> bool:
        # Checked before every replay, with the GPU idle: map() over C-level callables reads the
        # 1,680 tensors of an SDXL UNet in a quarter less time than a Python loop (0.28 against 0.38
        # ms on a 2-core CI machine); data_ptr() itself is most of what is left.
        try:
            return list(map(torch.Tensor.data_ptr, map(dict.get, self.slots, self.names))) == self.addresses
        except TypeError:  # a slot emptied (None) or holding something that is not a tensor
            return False


class CapturedGraph:
    """One callable captured as a CUDA graph for one set of input shapes.

    `function(*inputs)` must return one tensor and only read tensors that stay where they are
    (its inputs, which are copied into static buffers, and the module's weights).
    """

    def __init__(self, function: Callable[..., torch.Tensor], inputs: Sequence[torch.Tensor | None],
                 module: torch.nn.Module, pool, autotune: bool, compile_backend: str | None = None,
                 tracing_context: Callable[[], ContextManager] | None = None):
        """`tracing_context`, where compiling: entered around the warm-up runs and the capture, which
        is while the compiler traces `function` (see GraphCache.run)."""
        started = time.perf_counter()
        self.static_inputs = [None if x is None else x.clone() for x in inputs]
        self.snapshot = WeightSnapshot(module)
        self.compiled = compile_backend is not None
        if self.compiled:
            function = compile_for_one_shape(function, compile_backend)
        traced = tracing_context() if self.compiled and tracing_context is not None else contextlib.nullcontext()
        benchmark = torch.backends.cudnn.benchmark
        # cuDNN's benchmark mode times each convolution's algorithms for this shape during warm-up
        # and caches the choice, which the capture then records; it is switched back afterwards so
        # eager code elsewhere in the process is unaffected.
        torch.backends.cudnn.benchmark = autotune or benchmark
        try:
            with traced:
                side = torch.cuda.Stream()
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):
                    for run in range(WARMUP_RUNS):
                        try:
                            function(*self.static_inputs)
                        except Exception as error:
                            if run == 0 and self.compiled:  # the first run is where torch.compile compiles
                                raise CompileFailed(first_line(error)) from error
                            raise
                torch.cuda.current_stream().wait_stream(side)
                self.graph = torch.cuda.CUDAGraph()
                # thread_local: another thread's CUDA calls (a server's) don't invalidate this capture.
                with torch.cuda.graph(self.graph, pool=pool, capture_error_mode="thread_local"):
                    self.static_output = function(*self.static_inputs)
        finally:
            torch.backends.cudnn.benchmark = benchmark
        if not isinstance(self.static_output, torch.Tensor):
            raise TypeError(f"captured function returned {type(self.static_output).__name__}, not a tensor")
        torch.cuda.current_stream().synchronize()
        self.capture_seconds = time.perf_counter() - started
        self.replays = 0

    def __call__(self, inputs: Sequence[torch.Tensor | None]) -> torch.Tensor:
        """Replay on `inputs`; returns the static output itself: copy it before the next replay."""
        for static, value in zip(self.static_inputs, inputs):
            if static is not None:
                static.copy_(value)
        self.graph.replay()
        self.replays += 1
        return self.static_output


@dataclass
class CaptureRecord:
    part: str  # "UNet" or "VAE decode"
    signature: tuple
    seconds: float  # everything: compiling (if), warm-up runs, capture
    compiled: bool = False


@dataclass
class GraphCache:
    """Captured graphs of one part (the UNet, the VAE decoder) by input signature.

    At most `max_shapes` graphs are kept (least recently used dropped). All share one memory pool:
    they never run at once and each output is copied out before the next replay.
    """

    part: str
    max_shapes: int = DEFAULT_MAX_SHAPES
    autotune: bool = True
    compile_backend: str | None = None  # e.g. COMPILE_BACKEND: compile each shape before capturing it
    passthrough: tuple = ()  # exception types raised on, not fallen back from (a user's Cancel)
    graphs: OrderedDict = field(default_factory=OrderedDict)
    failures: dict = field(default_factory=dict)  # signature → why capture failed (not retried)
    captures: list = field(default_factory=list)  # CaptureRecord per capture, in order
    eager_calls: int = 0
    _pool: object = None
    _trusted: set | None = None  # graphs whose weights were checked in the current sampling run
    _said: set = field(default_factory=set)

    def run(self, signature: tuple, function: Callable[..., torch.Tensor],
            inputs: Sequence[torch.Tensor | None], module: torch.nn.Module,
            tracing_context: Callable[[], ContextManager] | None = None) -> torch.Tensor | None:
        """The graph's output for `inputs` (capturing it the first time), or None: run eagerly.

        `tracing_context` makes a context under which the compiler traces `function`: where an
        operation is written differently for it than for eager (fewstep.acceleration's
        group_norm_by_channel_sums, attention_by_matmuls). The eager kernels are captured without it.
        """
        if signature in self.failures:
            return None
        graph = self.graphs.get(signature)
        if graph is not None and not self._weights_still_captured(graph):
            self.say(f"{self.part}: the model's weights moved since capture (re-patched or reloaded); re-capturing")
            del self.graphs[signature]
            graph = None
        if graph is None:
            graph = self._capture(signature, function, inputs, module, tracing_context)
            if graph is None:
                return None
        self.graphs.move_to_end(signature)
        return graph(inputs)

    def begin_run(self) -> None:
        """Within one run (a sampling run, a decode) weights don't move: check each graph's once per run."""
        self._trusted = set()

    def end_run(self) -> None:
        self._trusted = None

    def _weights_still_captured(self, graph: CapturedGraph) -> bool:
        if self._trusted is not None and id(graph) in self._trusted:
            return True
        if not graph.snapshot.unchanged():
            return False
        if self._trusted is not None:
            self._trusted.add(id(graph))
        return True

    def replayable(self, signature: tuple) -> bool:
        """Whether a kept graph for `signature` would replay (in its own memory pool), not be re-captured."""
        graph = self.graphs.get(signature)
        return graph is not None and self._weights_still_captured(graph)

    def _capture(self, signature, function, inputs, module, tracing_context=None) -> CapturedGraph | None:
        while len(self.graphs) >= self.max_shapes:
            self.graphs.popitem(last=False)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        if self.compile_backend is not None:
            # Said before the wait, which is long enough to look like a hang in the console.
            log.info("FewStepAccelerate: compiling the %s for %s with torch.compile, then capturing it; the first "
                     "time for a model and size this takes a minute or two", self.part, describe(signature))
            # Compiling is an optimisation: where it fails, the eager kernels are captured instead.
            try:
                return self._keep(signature, CapturedGraph(function, inputs, module, self._pool, self.autotune,
                                                           self.compile_backend, tracing_context))
            except self.passthrough:
                raise
            except CompileFailed as error:
                if isinstance(error.__cause__, self.passthrough):
                    raise error.__cause__
                self.compile_backend = None  # the compiler itself failed: it would at every shape
                self.say(f"{self.part}: torch.compile failed ({error}); capturing the eager kernels from now on")
            except Exception as error:
                self.say(f"{self.part}: the compiled kernels could not be captured for {describe(signature)} "
                         f"({first_line(error)}); capturing the eager kernels for this shape")
            torch.cuda.synchronize()
        try:
            graph = CapturedGraph(function, inputs, module, self._pool, self.autotune)
        except self.passthrough:
            raise
        except Exception as error:  # an op that cannot be captured: this shape runs eagerly from now on
            reason = first_line(error)
            self.failures[signature] = reason
            self.say(f"{self.part}: capture failed for {describe(signature)} ({reason}); running eager for this shape")
            torch.cuda.synchronize()
            return None
        return self._keep(signature, graph)

    def _keep(self, signature, graph: CapturedGraph) -> CapturedGraph:
        self.graphs[signature] = graph
        record = CaptureRecord(self.part, signature, graph.capture_seconds, graph.compiled)
        self.captures.append(record)
        how = [what for what, used in (("compiled", graph.compiled), ("cuDNN autotuned", self.autotune)) if used]
        log.info("FewStepAccelerate: captured %s CUDA graph for %s in %.2f s%s; replayed for every later "
                 "call of this shape", self.part, describe(signature), graph.capture_seconds,
                 f" ({', '.join(how)})" if how else "", extra={"fewstep_capture": record})
        return graph

    def eager(self, reason: str) -> None:
        """Count an eager call and say why, once per reason."""
        self.eager_calls += 1
        self.say(f"{self.part}: {reason}; running eager")

    def say(self, message: str) -> None:
        if message not in self._said:
            self._said.add(message)
            log.warning("FewStepAccelerate: %s", message)


def first_line(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}".splitlines()[0][:300]


def describe(signature: tuple) -> str:
    """The shapes and dtypes of a signature, for messages: '(1, 4, 128, 128) float16, …'."""
    parts = []
    for item in signature:
        if isinstance(item, tuple) and len(item) == 4 and isinstance(item[1], torch.dtype):
            parts.append(f"{item[0]} {str(item[1]).replace('torch.', '')}")
    return ", ".join(parts) or str(signature)
