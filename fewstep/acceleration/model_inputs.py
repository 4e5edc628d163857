"""A diffusion model call's conditioning inputs as what a CUDA graph can take: tensors and constants.

ComfyUI hands a model's conditioning to BaseModel.apply_model as keyword arguments whose kinds differ
by architecture: tensors (SDXL's `y`, FLUX's `guidance`, an attention mask), lists of tensors
(Qwen-Image-Edit's reference latents), plain numbers (Lumina 2 / Z-Image's `num_tokens`) or None. A
graph replays fixed kernels on fixed buffers: tensors become its inputs (copied in at each replay),
everything else is part of what the graph is specific to (its signature) and is passed unchanged.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch

from .graphs import tensor_signature

CONSTANT_TYPES = (type(None), bool, int, float, str)


class NotCapturable(ValueError):
    """A conditioning input a graph cannot take (the message says which and why)."""


@dataclass(frozen=True)
class FlatInputs:
    tensors: list[torch.Tensor]
    # Per name, in order: ("tensor", index), ("tensors", (indices…), container type) or ("constant", value).
    layout: tuple

    def signature(self) -> tuple:
        """What a graph of these inputs is specific to: names, constants, each tensor's shape/dtype/layout."""
        return (self.layout, tuple(tensor_signature(tensor) for tensor in self.tensors))

    def rebuild(self, tensors: Sequence[torch.Tensor]) -> dict[str, Any]:
        """The keyword arguments again, with `tensors` (the graph's static copies) in the tensors' places."""
        conds = {}
        for name, kind, *place in self.layout:
            if kind == "tensor":
                conds[name] = tensors[place[0]]
            elif kind == "tensors":
                indices, container = place
                conds[name] = container(tensors[i] for i in indices)
            else:
                conds[name] = place[0]
        return conds


def flatten_conditioning(conds: Mapping[str, Any]) -> FlatInputs:
    """Split keyword arguments into graph inputs and constants; NotCapturable for anything else."""
    tensors, layout = [], []
    for name in sorted(conds):
        value = conds[name]
        if isinstance(value, torch.Tensor):
            layout.append((name, "tensor", len(tensors)))
            tensors.append(value)
        elif isinstance(value, (list, tuple)) and all(isinstance(item, torch.Tensor) for item in value):
            layout.append((name, "tensors", tuple(range(len(tensors), len(tensors) + len(value))), type(value)))
            tensors.extend(value)
        elif isinstance(value, CONSTANT_TYPES):
            layout.append((name, "constant", value))
        else:
            raise NotCapturable(f"the model gets an input '{name}' of type {type(value).__name__}, "
                                "which a graph cannot take")
    return FlatInputs(tensors, tuple(layout))
