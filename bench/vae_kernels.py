"""The VAE decoder's GroupNorm and attention, compiled several ways, timed side by side on the GPU.

bench/gpu_profile.py showed where the compiled SDXL VAE decode (1024², 34 ms on an H200) spends its
time: 11.6 ms in Inductor's GroupNorm reductions and 3.7 ms in one attention call. Inductor lays the
decoder's activations out channels-last (for cuDNN's convolutions), and a GroupNorm group is then
C/G channels interleaved across every pixel; the attention has one head of 512 channels, more than
the flash kernels take, so PyTorch runs the slower memory-efficient kernel. This script times, at
the decoder's own shapes (bf16, channels-last, batch 1), each of:

GroupNorm + SiLU (as a resnet block runs them):
  F.group_norm          what ComfyUI's VAE calls (the compiled decode as measured)
  channel_sums          fewstep.acceleration.group_norm_by_channel_sums: per-channel sums, then groups
attention (q, k, v: (1, 512, H, W) → (1, 512, H, W)):
  sdpa                  what ComfyUI's VAE calls
  matmuls               fewstep.acceleration.attention_by_matmuls: QKᵀ, softmax, ·V

each compiled by torch.compile (Inductor, static shapes) and checked against a float64 reference.

    python3 bench/vae_kernels.py            # CUDA
    python3 bench/vae_kernels.py --smoke    # CPU, small shapes: checks the script, measures nothing
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "testing"))
import pack  # noqa: E402,F401 — registers the pack as the `comfyui_fewstep` package

from comfyui_fewstep.fewstep.acceleration import attention_by_matmuls, group_norm_by_channel_sums  # noqa: E402

GROUPS, EPS = 32, 1e-6
# The SDXL/SD1.5 VAE decoder's GroupNorm inputs for a 1024² image (latent 128²): (channels, side).
NORM_SHAPES = [(512, 128), (512, 256), (512, 512), (256, 512), (256, 1024), (128, 1024)]
ATTENTION_SIDES = [128, 64]  # the mid block's attention at 1024² and 512²


def sdpa_attention(q, k, v):  # ComfyUI's pytorch_attention for the VAE
    b, c, h, w = q.shape
    q, k, v = (t.view(b, 1, c, -1).transpose(2, 3).contiguous() for t in (q, k, v))
    return F.scaled_dot_product_attention(q, k, v).transpose(2, 3).reshape(b, c, h, w)


def reference_attention(q, k, v):
    b, c, h, w = q.shape
    q, k, v = (t.double().reshape(b, c, -1) for t in (q, k, v))
    weights = torch.softmax(q.transpose(1, 2) @ k / c**0.5, dim=-1)
    return (v @ weights.transpose(1, 2)).reshape(b, c, h, w)


def time_ms(function, *inputs, reps: int, cuda: bool) -> float:
    for _ in range(3):
        function(*inputs)
    if not cuda:
        return float("nan")
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        function(*inputs)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def relative_l2(value, reference) -> float:
    value, reference = value.double(), reference.double()
    return (torch.linalg.vector_norm(value - reference) / torch.linalg.vector_norm(reference)).item()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--reps", type=int, default=20)
    args = parser.parse_args(argv)
    cuda = not args.smoke
    if cuda and not torch.cuda.is_available():
        print("no CUDA device: run with --smoke for the CPU check")
        return 1
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    norm_shapes = NORM_SHAPES if cuda else [(64, 16), (32, 32)]
    attention_sides = ATTENTION_SIDES if cuda else [8]
    generator = torch.Generator(device).manual_seed(0)

    def norm_silu(norm):
        return lambda x, weight, bias: F.silu(norm(x, GROUPS, weight, bias, EPS))

    norms = {"F.group_norm": norm_silu(F.group_norm), "channel_sums": norm_silu(group_norm_by_channel_sums)}
    print("| GroupNorm + SiLU, channels-last | " + " | ".join(f"{n} ms" for n in norms) + " | speed-up | "
          + " | ".join(f"{n} rel L2" for n in norms) + " |")
    print("|---|" + "---|" * (2 * len(norms) + 1))
    total = dict.fromkeys(norms, 0.0)
    for channels, side in norm_shapes:
        # Activations with a mean away from zero, as a decoder's are, so a variance computed by
        # cancellation would show.
        x = (torch.randn(1, channels, side, side, device=device, generator=generator) * 2 + 3).to(dtype)
        x = x.contiguous(memory_format=torch.channels_last)
        weight = torch.rand(channels, device=device, generator=generator).to(dtype) + 0.5
        bias = torch.randn(channels, device=device, generator=generator).to(dtype)
        reference = F.silu(F.group_norm(x.double(), GROUPS, weight.double(), bias.double(), EPS))
        row, errors = [], []
        for name, function in norms.items():
            compiled = torch.compile(function, dynamic=False)
            ms = time_ms(compiled, x, weight, bias, reps=args.reps, cuda=cuda)
            total[name] += ms
            row.append(ms)
            errors.append(relative_l2(compiled(x, weight, bias), reference))
            torch._dynamo.reset()
        print(f"| ({channels}, {side}²) | " + " | ".join(f"{ms:.3f}" for ms in row) + f" | {row[0] / row[1]:.2f}× | "
              + " | ".join(f"{e:.1e}" for e in errors) + " |")
    print(f"| all six | " + " | ".join(f"{total[n]:.3f}" for n in norms)
          + f" | {total['F.group_norm'] / total['channel_sums']:.2f}× | | |\n")

    attentions = {"sdpa": sdpa_attention, "matmuls": attention_by_matmuls}
    print("| attention, 512 channels, one head | " + " | ".join(f"{n} ms" for n in attentions) + " | speed-up | "
          + " | ".join(f"{n} rel L2" for n in attentions) + " |")
    print("|---|" + "---|" * (2 * len(attentions) + 1))
    for side in attention_sides:
        q, k, v = ((torch.randn(1, 512, side, side, device=device, generator=generator)).to(dtype)
                   .contiguous(memory_format=torch.channels_last) for _ in range(3))
        reference = reference_attention(q, k, v)
        row, errors = [], []
        for name, function in attentions.items():
            compiled = torch.compile(function, dynamic=False)
            row.append(time_ms(compiled, q, k, v, reps=args.reps, cuda=cuda))
            errors.append(relative_l2(compiled(q, k, v), reference))
            torch._dynamo.reset()
        print(f"| {side}² ({side * side} tokens) | " + " | ".join(f"{ms:.3f}" for ms in row)
              + f" | {row[0] / row[1]:.2f}× | " + " | ".join(f"{e:.1e}" for e in errors) + " |")
    if cuda:
        print(f"\n{torch.cuda.get_device_name()}, torch {torch.__version__}, peak "
              f"{torch.cuda.max_memory_allocated() / 2**30:.1f} GiB allocated")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
