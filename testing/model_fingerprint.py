"""Loaded ComfyUI models compared exactly, and let go of, without holding two copies in memory."""
from __future__ import annotations

import gc
import hashlib

import torch


def fingerprint(model) -> dict[str, str]:
    """sha1 of every weight's bytes of a ComfyUI ModelPatcher's diffusion model."""
    return {key: hashlib.sha1(tensor.detach().contiguous().view(-1).view(dtype=torch.uint8).numpy().tobytes()).hexdigest()
            for key, tensor in model.model.diffusion_model.state_dict().items()}


def release(*models) -> None:
    from comfy import model_management

    for model in models:
        del model
    model_management.unload_all_models()
    gc.collect()
