"""ComfyUI's attention as it picks it on a CUDA GPU, for CPU runs that need the GPU's graph.

On the CPU ComfyUI picks split attention, which asks psutil for the free memory at each call and so
breaks Dynamo's graph; on a CUDA GPU it picks PyTorch's scaled_dot_product_attention, which traces as
one graph (what a compile saved to disk needs: fewstep.acceleration.saved_compiles)."""
from __future__ import annotations

import contextlib
import sys


@contextlib.contextmanager
def attention_as_on_cuda():
    """Within: every ComfyUI module's `optimized_attention` (and its masked form) that is a CPU choice is
    PyTorch's; restored afterwards."""
    from comfy.ldm.modules import attention

    cpu_forms = (attention.attention_split, attention.attention_sub_quad, attention.attention_basic)
    swapped = [(module, name, getattr(module, name)) for module in list(sys.modules.values())
               if getattr(module, "__name__", "").startswith("comfy.")
               for name in ("optimized_attention", "optimized_attention_masked")
               if getattr(module, name, None) in cpu_forms]
    for module, name, _ in swapped:
        setattr(module, name, attention.attention_pytorch)
    try:
        yield
    finally:
        for module, name, cpu_form in swapped:
            setattr(module, name, cpu_form)
