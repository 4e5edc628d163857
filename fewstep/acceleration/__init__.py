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
from .agreement import RELATIVE_L2_TOLERANCE, Agreement, agreement
from .compiler import (
    COMPILE_BACKEND,
    STREAM_ORDERED_ALLOCATOR,
    allocator_backend,
    CompileFailed,
    compile_for_one_shape,
    compile_unavailable_reason,
    compiled_capture_unavailable_reason,
)
from .compiler_forms import attention_by_matmuls, group_norm_by_channel_sums, group_norm_for_compiler
from .background import WORKER, CompiledCodeNotUsed, CompileJob
from .graphs import (
    DEFAULT_MAX_SHAPES,
    CapturedGraph,
    GraphCache,
    WeightSnapshot,
    cuda_graph_unavailable_reason,
    tensor_signature,
)
from .memory import gib, graph_memory_bytes

__all__ = [
    "STREAM_ORDERED_ALLOCATOR", "allocator_backend", "WORKER", "CompileJob", "CompiledCodeNotUsed", "gib", "graph_memory_bytes",
    "COMPILE_BACKEND", "DEFAULT_MAX_SHAPES", "RELATIVE_L2_TOLERANCE", "Agreement", "CapturedGraph",
    "CompileFailed", "GraphCache", "WeightSnapshot", "agreement", "attention_by_matmuls",
    "compile_for_one_shape", "compile_unavailable_reason", "compiled_capture_unavailable_reason",
    "cuda_graph_unavailable_reason", "group_norm_by_channel_sums", "group_norm_for_compiler", "tensor_signature",
]
