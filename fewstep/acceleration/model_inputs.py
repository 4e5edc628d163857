"""A diffusion model call's conditioning inputs as what a CUDA graph can take: tensors and constants.

ComfyUI hands a model's conditioning to BaseModel.apply_model as keyword arguments whose kinds differ
by architecture: tensors (SDXL's `y`, FLUX's `guidance`, an attention mask), lists of tensors
(Qwen-Image-Edit's reference latents), plain numbers (Lumina 2 / Z-Image's `num_tokens`) or None. A
graph replays fixed kernels on fixed buffers: tensors become its inputs (copied in at each replay),
everything else is part of what the graph is specific to (its signature) and is passed unchanged.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch

from .signatures import tensor_signature

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
    """Split keyword arguments into graph inputs and constants (in the order given: a model function's
    own parameter order, the latent first); NotCapturable for anything else."""
    tensors, layout = [], []
    for name, value in conds.items():
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


@dataclass(frozen=True)
class BoundCall:
    """One call of a ComfyUI model function, by parameter name, to be made again in the same order."""

    parameters: tuple[inspect.Parameter, ...]
    arguments: dict[str, Any]  # every argument by name, the **kwargs ones included

    @classmethod
    def of(cls, function, args: Sequence[Any], kwargs: Mapping[str, Any]) -> "BoundCall":
        """`function(*args, **kwargs)` by name (a TypeError where they do not fit its signature)."""
        signature = _signature(function)
        bound = signature.bind(*args, **kwargs)
        arguments = {}
        for name, value in bound.arguments.items():
            kind = signature.parameters[name].kind
            if kind is inspect.Parameter.VAR_POSITIONAL:
                if value:
                    raise TypeError(f"{len(value)} extra positional arguments")
            elif kind is inspect.Parameter.VAR_KEYWORD:
                arguments.update(value)
            else:
                arguments[name] = value
        return cls(tuple(signature.parameters.values()), arguments)

    def call(self, function, arguments: Mapping[str, Any]):
        """`function` called as the original call was: its positional parameters in order (a wrapper
        further down ComfyUI's chain may take them positionally), the rest by keyword."""
        arguments = dict(arguments)
        positional = []
        for parameter in self.parameters:
            if parameter.kind is not inspect.Parameter.POSITIONAL_OR_KEYWORD:
                break
            positional.append(arguments.pop(parameter.name, parameter.default))
        return function(*positional, **arguments)


def call_model_function(function, call: BoundCall, flat: FlatInputs, fixed: dict, *tensors: torch.Tensor):
    """`function` called as `call` was, `tensors` in the flat inputs' places and `fixed` added: the form of
    a model call whose compile can be saved (a module-level function, the model reached through its
    arguments; fewstep.acceleration.saved_compiles)."""
    return call.call(function, {**flat.rebuild(tensors), **fixed})


_SIGNATURES: dict = {}


def _signature(function) -> inspect.Signature:
    """inspect.signature, once per function: the wrapper binds every model call (each sampling step), and
    a bound method's signature is the same for every instance of its class."""
    key = (getattr(function, "__func__", function), hasattr(function, "__self__"))
    signature = _SIGNATURES.get(key)
    if signature is None:
        signature = _SIGNATURES[key] = inspect.signature(function)
    return signature
