"""Checks of widget values that ComfyUI leaves to nodes that validate their own inputs.

For every input a node's `validate_inputs` takes, ComfyUI skips its own min/max check, and it calls
`validate_inputs` even when converting a value failed (the raw string arrives) — and NaN passes
any min/max comparison. So the FewStep nodes check the numbers they take here, against the ranges
their schema declares, before the pure layer sees them.
"""
from __future__ import annotations

import math
from typing import Callable

from comfy_api.latest import io

from ..fewstep.families import FewStepInputError


def declared_inputs(node_class: type[io.ComfyNode]) -> dict[str, io.Input]:
    return {spec.id: spec for spec in node_class.define_schema().inputs}


def check_numbers(node_class: type[io.ComfyNode], **values) -> None:
    """Raise FewStepInputError naming the first input whose value is no finite number in its range.

    None means the input is linked (or left out) and is checked where its value is made.
    """
    specs = declared_inputs(node_class)
    for name, value in values.items():
        if value is None:
            continue
        spec = specs[name]
        whole = isinstance(spec, io.Int.Input)
        kind = "a whole number" if whole else "a number"
        numeric = not isinstance(value, bool) and isinstance(value, (int, float))
        if not numeric or not math.isfinite(value) or (whole and value != int(value)):
            raise FewStepInputError(f"{name}: {value!r} is not {kind}; enter {kind} like {spec.default!r}.")
        low, high = spec.min, spec.max
        if (low is not None and value < low) or (high is not None and value > high):
            raise FewStepInputError(
                f"{name}: {value:g} is outside {low:g}–{high:g}; the reference value is {spec.default!r}."
            )


def validation_message(check: Callable[[], object]) -> bool | str:
    """Run a check for validate_inputs: True, or the message ComfyUI shows the user."""
    try:
        check()
    except FewStepInputError as error:
        return str(error)
    return True
