"""FewStepPreviewImage: a preview a few-step prompt does not wait for.

At 1–4 steps the image path is as long as the model: ComfyUI's PreviewImage writes a PNG
(compress_level 1), which for a 1024² image costs tens of milliseconds on the CPU, longer than an
accelerated SDXL-Turbo step. A JPEG of the same image is written in a few milliseconds and is what
the frontend shows the same way (a temp-folder image in the node's output); the full image stays
available to SaveImage on the same IMAGE.
"""
from __future__ import annotations

import os
import uuid

import torch
from PIL import Image

import folder_paths
from comfy_api.latest import io, ui

JPEG_QUALITY = 90  # visually lossless for a preview; PIL's default is 75


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """ComfyUI IMAGE (batch, height, width, channels) floats in [0, 1] → uint8, truncated as SaveImage does."""
    return (images * 255.0).clamp_(0, 255).to(torch.uint8)


class FewStepPreviewImage(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="FewStepPreviewImage",
            display_name="Few-Step Preview Image (fast JPEG)",
            category="sampling/few-step",
            description=("Shows the images in the node like Preview Image, written as JPEG instead of PNG: a few "
                         "milliseconds instead of tens at 1024², which at 1–4 steps is a large part of the wait."),
            inputs=[
                io.Image.Input("images", tooltip="The images to show (not saved to the output folder)."),
                io.Int.Input("quality", default=JPEG_QUALITY, min=50, max=100, tooltip=(
                    f"JPEG quality: {JPEG_QUALITY} looks like the original at preview size; higher is slower "
                    "and larger.")),
            ],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, images, quality=JPEG_QUALITY) -> io.NodeOutput:
        folder = folder_paths.get_temp_directory()
        os.makedirs(folder, exist_ok=True)
        results = []
        for pixels in to_uint8(images.detach().cpu()).numpy():
            name = f"fewstep_preview_{uuid.uuid4().hex[:12]}.jpg"
            Image.fromarray(pixels[..., :3] if pixels.shape[-1] >= 3 else pixels[..., 0]).save(
                os.path.join(folder, name), quality=quality)
            results.append(ui.SavedResult(name, "", io.FolderType.temp))
        return io.NodeOutput(ui={"images": results})


PREVIEW_NODES = [FewStepPreviewImage]
