"""What a captured graph is specific to: its input signature (also without the batch size) and the
weights it read."""
from __future__ import annotations

import torch


def tensor_signature(value) -> tuple | None:
    """What a captured graph is specific to: shape, dtype, device, memory layout (None stays None)."""
    if value is None:
        return None
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"not a tensor: {type(value).__name__}")
    return (tuple(value.shape), value.dtype, value.device, value.stride())


def _is_tensor_signature(item) -> bool:
    return isinstance(item, tuple) and len(item) == 4 and isinstance(item[1], torch.dtype)


def batch_size(inputs) -> int | None:
    """The batch size of a call: its first input's first dimension (the latent's, for every model)."""
    first = next(iter(inputs), None)
    return first.shape[0] if isinstance(first, torch.Tensor) and first.ndim else None


def batch_free(signature):
    """`signature` with every tensor's first dimension left out: signatures of one model call at
    different batch sizes map to the same value. (A first dimension that is not the batch is left out
    too; compiled code reused on such a match still runs only where Dynamo's guards pass.)"""
    if _is_tensor_signature(signature):
        shape, dtype, device, stride = signature
        return (shape[1:], dtype, device, stride[1:])
    if isinstance(signature, tuple):
        return tuple(batch_free(item) for item in signature)
    return signature


def describe(signature: tuple) -> str:
    """The shapes and dtypes of a signature, for messages: '(1, 4, 128, 128) float16, …'."""
    parts = []

    def walk(item):
        if _is_tensor_signature(item):
            parts.append(f"{item[0]} {str(item[1]).replace('torch.', '')}")
        elif isinstance(item, tuple):
            for inner in item:
                walk(inner)

    walk(signature)
    return ", ".join(parts) or str(signature)


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
        # 1,680 tensors of an SDXL UNet faster than a Python loop; data_ptr() itself is most of what
        # is left.
        try:
            return list(map(torch.Tensor.data_ptr, map(dict.get, self.slots, self.names))) == self.addresses
        except TypeError:  # a slot emptied (None) or holding something that is not a tensor
            return False
