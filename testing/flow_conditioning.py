"""A test-only ComfyUI node standing in for the flow models' text encoders.

T5-XXL, CLIP-G, Qwen2.5-VL and Qwen3 are far too big for CPU tests, and what is under test starts after
them: the node returns tiny_flow_models.conditioning() for a tiny `base` as CONDITIONING, shaped as
ComfyUI's text encoders shape it ([[hidden states, {"pooled_output": pooled}]]; Qwen-Image's and
Z-Image's encoders give no pooled output, and ComfyUI's Lumina 2 model would pass one on).
"""
from __future__ import annotations

import contextlib

from tiny_flow_models import SEED as MODEL_SEED, conditioning

NODE_NAME = "FewStepTestConditioning"
BASES_WITHOUT_POOLED = ("qwen_image", "z_image")
NEGATIVE_SEED_OFFSET = 1  # the empty-prompt stand-in: conditioning() drawn with another seed


class FewStepTestConditioning:
    @classmethod
    def INPUT_TYPES(cls):
        # `rerun`: unused; a new value makes ComfyUI's cache re-run the nodes after this one, not the loader.
        return {"required": {"base": ("STRING", {"default": ""})},
                "optional": {"negative": ("BOOLEAN", {"default": False}), "rerun": ("INT", {"default": 0})}}

    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "encode"
    CATEGORY = "testing"

    def encode(self, base, negative=False, rerun=0):
        seed = MODEL_SEED + 2 + (NEGATIVE_SEED_OFFSET if negative else 0)  # conditioning()'s default seed
        prompt_embeds, pooled = conditioning(seed, base=base or None)
        if base in BASES_WITHOUT_POOLED:
            return ([[prompt_embeds, {}]],)
        return ([[prompt_embeds, {"pooled_output": pooled}]],)


@contextlib.contextmanager
def registered(comfy):
    """The node registered in an InProcessComfy's node table for the duration."""
    comfy.nodes.NODE_CLASS_MAPPINGS[NODE_NAME] = FewStepTestConditioning
    try:
        yield comfy
    finally:
        del comfy.nodes.NODE_CLASS_MAPPINGS[NODE_NAME]
