"""What turning a decoded image into a file costs on this host, for a noise-like image and a natural-looking one.

At 1–4 steps the image path is as long as the model (RESULTS.md), and the server benchmarks measure it on
random-weight images, which decode to noise: PNG's worst case. This times the same encodings ComfyUI's
output nodes do, on the host's CPU, for

- `noise`: independent uniform pixels, what a random-weight model decodes to;
- `natural`: a deterministic image with the statistics of photographs — an amplitude spectrum falling as
  1/f^1.5 (photographs measure 1/f^0.8–1.5: Field 1987; van der Schaaf & van Hateren 1996; the steep end,
  as a generated image is smooth) with a lens-like blur at the finest scale, each colour channel sharing
  most of its structure — as a stand-in for a real generation (no image files are downloaded here).

Encodings: SaveImage's PNG (compress_level 4, with its metadata chunk), PreviewImage's PNG
(compress_level 1), Few-Step Preview Image's JPEG (quality 90); plus the float → uint8 conversion the
nodes do first. Median of `--reps` per cell, with the file size.

    python3 bench/image_encoding.py                      # 512², 1024²
    python3 bench/image_encoding.py --sizes 512 --reps 50
"""
from __future__ import annotations

import argparse
import io
import json
import os
import platform
import statistics
import time

import numpy as np
from PIL import Image
from PIL.PngImagePlugin import PngInfo

ENCODINGS = {
    "SaveImage PNG (level 4)": {"format": "PNG", "compress_level": 4, "metadata": True},
    "PreviewImage PNG (level 1)": {"format": "PNG", "compress_level": 1, "metadata": True},
    "Few-Step Preview JPEG (q 90)": {"format": "JPEG", "quality": 90},
}


def noise_image(size: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((size, size, 3), dtype=np.float32)


def natural_image(size: int, seed: int = 0) -> np.ndarray:
    """Float RGB in [0, 1] whose amplitude spectrum falls as 1/f^1.5, channels sharing most of their structure."""
    rng = np.random.default_rng(seed)
    fy = np.fft.fftfreq(size)[:, None]
    fx = np.fft.rfftfreq(size)[None, :]
    frequency = np.maximum(np.hypot(fx, fy), 1.0 / size)  # cycles per pixel
    falloff = frequency ** -1.5 * np.exp(-((frequency / 0.3) ** 2))
    shared = rng.standard_normal((size, size // 2 + 1)) + 1j * rng.standard_normal((size, size // 2 + 1))
    channels = []
    for _ in range(3):
        own = rng.standard_normal(shared.shape) + 1j * rng.standard_normal(shared.shape)
        field = np.fft.irfft2((0.85 * shared + 0.15 * own) * falloff, s=(size, size))
        channels.append((field - field.mean()) / (field.std() + 1e-12))
    image = np.stack(channels, axis=-1)
    return (1.0 / (1.0 + np.exp(-1.2 * image))).astype(np.float32)  # soft contrast into [0, 1]


def to_uint8(pixels: np.ndarray) -> np.ndarray:
    """What SaveImage does to a decoded image before PIL: × 255, clip, uint8."""
    return np.clip(255.0 * pixels, 0, 255).astype(np.uint8)


def encode(image: Image.Image, settings: dict) -> int:
    buffer = io.BytesIO()
    if settings["format"] == "PNG":
        metadata = PngInfo()
        if settings.get("metadata"):
            metadata.add_text("prompt", json.dumps({"3": {"class_type": "KSampler", "inputs": {"seed": 1}}}))
        image.save(buffer, format="PNG", pnginfo=metadata, compress_level=settings["compress_level"])
    else:
        image.save(buffer, format="JPEG", quality=settings["quality"])
    return buffer.tell()


def timed(function, reps: int) -> tuple[float, object]:
    result, times = None, []
    for _ in range(reps):
        started = time.perf_counter()
        result = function()
        times.append((time.perf_counter() - started) * 1e3)
    return statistics.median(times), result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[512, 1024])
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--out", default=None, help="also write the table and JSON here")
    args = parser.parse_args(argv)
    rows, lines = [], ["| image | size | float → uint8 | " + " | ".join(ENCODINGS) + " |",
                       "|---|---|---|" + "---|" * len(ENCODINGS)]
    for size in args.sizes:
        for kind, make in (("noise", noise_image), ("natural", natural_image)):
            pixels = make(size)
            convert_ms, pixels8 = timed(lambda: to_uint8(pixels), args.reps)
            image = Image.fromarray(pixels8)
            cells = []
            for name, settings in ENCODINGS.items():
                ms, size_bytes = timed(lambda: encode(image, settings), args.reps)
                rows.append({"image": kind, "size": size, "encoding": name, "ms": round(ms, 2), "bytes": size_bytes})
                cells.append(f"{ms:.1f} ms, {size_bytes / 1024:.0f} KiB")
            lines.append(f"| {kind} | {size}² | {convert_ms:.1f} ms | " + " | ".join(cells) + " |")
    host = f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, Pillow {Image.__version__}"
    text = "\n".join(lines) + f"\n\nmedian of {args.reps}; host: {host}"
    print(text)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "image_encoding.md"), "w") as handle:
            handle.write(text + "\n")
        with open(os.path.join(args.out, "image_encoding.json"), "w") as handle:
            json.dump({"host": host, "reps": args.reps, "rows": rows}, handle, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
