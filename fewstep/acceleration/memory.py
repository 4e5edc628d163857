"""How much GPU memory captured CUDA graphs hold, as each allocator can tell it."""
from __future__ import annotations

import ctypes
import functools

import torch

from .compiler import STREAM_ORDERED_ALLOCATOR, allocator_backend

# cudaGraphMemAttributeType's cudaGraphMemAttrReservedMemCurrent (CUDA runtime API, "Graph Management").
GRAPH_MEMORY_RESERVED_CURRENT = 2


def graph_memory_bytes(pools) -> int | None:
    """Bytes held by the graphs of the memory pools `pools` (graph_pool_handle()s, None for none yet);
    under cudaMallocAsync, by all graphs on the device (the driver keeps graph allocations in one pool
    per device). None where neither can be read."""
    pools = {tuple(pool) for pool in pools if pool is not None}
    if not pools:
        return 0
    if not torch.cuda.is_available():
        return None
    if allocator_backend() == STREAM_ORDERED_ALLOCATOR:
        return device_graph_memory_bytes(torch.cuda.current_device())
    # PyTorch's caching allocator keeps each graph pool's memory in its own segments, tagged with the pool.
    return sum(segment["total_size"] for segment in torch.cuda.memory_snapshot()
               if tuple(segment.get("segment_pool_id", ())) in pools)


def device_graph_memory_bytes(device: int) -> int | None:
    cudart = _cuda_runtime()
    if cudart is None:
        return None
    value = ctypes.c_uint64()
    if cudart.cudaDeviceGetGraphMemAttribute(device, GRAPH_MEMORY_RESERVED_CURRENT, ctypes.byref(value)) != 0:
        return None
    return value.value


@functools.cache
def _cuda_runtime():
    """The CUDA runtime library torch loaded (libcudart.so.<major> or cudart64_<major>.dll), or None."""
    major = (torch.version.cuda or "").split(".")[0]
    for name in (f"libcudart.so.{major}", "libcudart.so", f"cudart64_{major}0.dll", f"cudart64_{major}.dll"):
        try:
            return ctypes.CDLL(name)
        except OSError:
            continue
    return None


def gib(size: int | None) -> str:
    return "unknown" if size is None else f"{size / 2**30:.2f} GiB"
