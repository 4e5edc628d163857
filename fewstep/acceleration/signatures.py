"""What a captured graph is specific to (its signature), and the same without the batch size."""
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
