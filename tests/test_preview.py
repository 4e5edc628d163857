"""FewStepPreviewImage in real ComfyUI: the JPEG it shows holds the very pixels SaveImage writes."""
from __future__ import annotations

import io as bytes_io

import numpy as np
from PIL import Image

from graphs import SEED, text_and_model


def test_preview_is_a_jpeg_of_the_pixels_saveimage_writes(comfy, sd15):
    import folder_paths

    prompt = {
        **text_and_model(sd15, ""),
        "latent_in": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 2}},
        "sample": {"class_type": "KSampler", "inputs": {
            "model": ["ckpt", 0], "seed": SEED, "steps": 1, "cfg": 1.0, "sampler_name": "euler",
            "scheduler": "normal", "denoise": 1.0, "positive": ["pos", 0], "negative": ["neg", 0],
            "latent_image": ["latent_in", 0]}},
        "decode": {"class_type": "VAEDecode", "inputs": {"samples": ["sample", 0], "vae": ["ckpt", 2]}},
        "save": {"class_type": "SaveImage", "inputs": {"images": ["decode", 0], "filename_prefix": "preview"}},
        "preview": {"class_type": "FewStepPreviewImage", "inputs": {"images": ["decode", 0], "quality": 95}},
    }
    result = comfy.run(prompt)
    saved = [np.asarray(Image.open(path)) for path in result.files("save", "images")]
    shown = result.outputs["preview"]["images"]
    assert len(saved) == len(shown) == 2
    for pixels, item in zip(saved, shown):
        assert item["type"] == "temp" and item["filename"].endswith(".jpg")
        path = folder_paths.get_temp_directory() + "/" + item["filename"]
        with Image.open(path) as preview:
            assert preview.format == "JPEG" and preview.size == (64, 64)
            decoded = np.asarray(preview)
        # PIL's own JPEG of SaveImage's pixels at the same quality decodes to the same pixels.
        reference = bytes_io.BytesIO()
        Image.fromarray(pixels).save(reference, format="JPEG", quality=95)
        assert np.array_equal(decoded, np.asarray(Image.open(reference)))
