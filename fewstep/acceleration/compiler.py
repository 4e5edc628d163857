"""torch.compile for one input shape, and whether it can run here."""
from __future__ import annotations

import contextlib
from typing import Callable

import torch

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
# Automatic dynamic shapes off: Dynamo remembers every shape a function's code was compiled for, across
# the process, and would make a dimension that differed from an earlier compile (the image's height and
# width, a text length) dynamic on its own; only the batch dimension is made dynamic, where asked.
COMPILE_CONFIG = {"recompile_limit": COMPILE_RECOMPILE_LIMIT, "fail_on_recompile_limit_hit": True,
                  "suppress_errors": False, "automatic_dynamic_shapes": False}


def compile_config() -> dict:
    """COMPILE_CONFIG without the keys this torch's Dynamo lacks, for torch._dynamo.config.patch."""
    return {key: value for key, value in COMPILE_CONFIG.items() if hasattr(torch._dynamo.config, key)}


class CompileFailed(RuntimeError):
    """torch.compile failed on the first run of a function (its cause is the error it raised)."""


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
    settings = compile_config()

    def call(*inputs):
        with torch._dynamo.config.patch(**settings):
            return compiled(*inputs)

    return call


# The memory allocator PyTorch runs on: ComfyUI's main.py selects cudaMallocAsync on CUDA builds of
# torch (its cuda_malloc.py) unless started with --disable-cuda-malloc.
STREAM_ORDERED_ALLOCATOR = "cudaMallocAsync"
NATIVE_ALLOCATOR_FLAG = "--disable-cuda-malloc"


def allocator_backend() -> str:
    """"native" (PyTorch's caching allocator) or "cudaMallocAsync"."""
    try:
        return torch.cuda.get_allocator_backend()
    except (AttributeError, RuntimeError):
        return "native"


def _inductor_kernel_launcher():
    """The class whose `run` every Inductor-generated Triton kernel is launched through, or None."""
    try:
        from torch._inductor.runtime.triton_heuristics import CachingAutotuner
    except ImportError:
        return None
    return CachingAutotuner if callable(getattr(CachingAutotuner, "run", None)) else None


def compiled_capture_unavailable_reason() -> str | None:
    """Why compiled kernels cannot be captured as a CUDA graph in this process, or None when they can."""
    if allocator_backend() == STREAM_ORDERED_ALLOCATOR and _inductor_kernel_launcher() is None:
        return (f"under PyTorch's {STREAM_ORDERED_ALLOCATOR} allocator (ComfyUI's default) this torch's compiled "
                f"kernels cannot be captured; start ComfyUI with {NATIVE_ALLOCATOR_FLAG} for compiled graphs")
    return None


@contextlib.contextmanager
def kernel_launches_by_address():
    """While compiled code is captured: Inductor's Triton kernels get each tensor argument as its address.

    Both of Triton's launchers (Inductor's static one and Triton's own) check a tensor argument with
    cuPointerGetAttribute before launching. Under the cudaMallocAsync allocator, memory allocated
    during a capture is a graph allocation, an address the driver maps only when the graph first runs,
    so the check fails ("CUDA driver error: invalid argument", or Triton's "Pointer argument cannot be
    accessed from Triton") and the capture with it. An integer argument is taken as the address it is,
    unchecked, and the launch is recorded as any other: the same kernels already ran on ordinary memory
    in the warm-up. Only needed, and only applied, under cudaMallocAsync.
    """
    launcher = _inductor_kernel_launcher() if allocator_backend() == STREAM_ORDERED_ALLOCATOR else None
    if launcher is None:
        yield
        return
    launch = launcher.run

    def run_by_address(self, *args, **kwargs):
        return launch(self, *[arg.data_ptr() if isinstance(arg, torch.Tensor) else arg for arg in args], **kwargs)

    launcher.run = run_by_address
    try:
        yield
    finally:
        launcher.run = launch
