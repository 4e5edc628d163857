"""A test-only ComfyUI node standing in for the flow models' text encoders.

T5-XXL, CLIP-G, Qwen2.5-VL and Qwen3 are far too big for CPU tests, and what is under test starts after
them: the node returns tiny_flow_models.conditioning() as CONDITIONING, shaped as ComfyUI's text
encoders shape it ([[hidden states, {"pooled_output": pooled}]]).
"""
from __future__ import annotations

import contextlib

from tiny_flow_models import conditioning

NODE_NAME = "FewStepTestConditioning"


class FewStepTestConditioning:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"seed": ("INT", {"default": 0})}}

    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "encode"
    CATEGORY = "testing"

    def encode(self, seed):
        prompt_embeds, pooled = conditioning()
        return ([[prompt_embeds, {"pooled_output": pooled}]],)


@contextlib.contextmanager
def registered(comfy):
    """The node registered in an InProcessComfy's node table for the duration."""
    comfy.nodes.NODE_CLASS_MAPPINGS[NODE_NAME] = FewStepTestConditioning
    try:
        yield comfy
    finally:
        del comfy.nodes.NODE_CLASS_MAPPINGS[NODE_NAME]
