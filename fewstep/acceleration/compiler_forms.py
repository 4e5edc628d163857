"""Two of the VAE decoder's operations in the forms the compiler makes fast (traced instead of ComfyUI's)."""
from __future__ import annotations

import math

import torch

# Two of the VAE decoder's operations are slow as ComfyUI writes them once Inductor has laid the
# activations out channels-last (bench/gpu_profile.py, bench/vae_kernels.py). The compiled decode
# traces these equivalents instead; eager code is unchanged.

def group_norm_by_channel_sums(x: torch.Tensor, num_groups: int, weight: torch.Tensor | None = None,
                               bias: torch.Tensor | None = None, eps: float = 1e-5) -> torch.Tensor:
    """torch.nn.functional.group_norm, computed from per-channel sums over the positions.

    Channels-last, a group's channels are interleaved with every pixel, and a reduction over the group
    reads memory in short strided pieces; summing each channel over the positions reads whole rows of
    contiguous channels instead, and the groups' totals are then a sum over a few numbers.
    One pass, in float32, on x − s, s an estimate of each group's mean: its mean over the first line
    of positions (the first image row). var = E[(x − s)²] − E[x − s]² then loses float32's 6e-8 times
    1 + ((mean − s) / std)² of the variance to cancellation: next to nothing while the first row is
    like the rest, where without the shift a mean far from zero relative to the spread would lose
    every digit.
    """
    if x.ndim < 3:
        raise ValueError("group_norm_by_channel_sums needs positions after (batch, channels); "
                         f"got shape {tuple(x.shape)}")
    batch, channels = x.shape[:2]
    per_group = channels // num_groups
    positions = tuple(range(2, x.ndim))
    count = per_group * math.prod(x.shape[2:])
    ones = (1,) * len(positions)

    def per_channel(per_group_values):  # (batch, groups) → (batch, channels, 1, …) to broadcast
        return per_group_values.repeat_interleave(per_group, dim=1).view((batch, channels) + ones)

    def group_totals(per_channel_values):  # (batch, channels, …) summed over positions → (batch, groups)
        return per_channel_values.sum(positions).view(batch, num_groups, per_group).sum(-1)

    values = x.float()
    first_line = values[(slice(None), slice(None)) + (0,) * (len(positions) - 1)]  # (batch, channels, last)
    shift = first_line.reshape(batch, num_groups, -1).mean(-1)  # (batch, groups)
    centred = values - per_channel(shift)
    shifted_mean = group_totals(centred) / count
    variance = (group_totals(centred * centred) / count - shifted_mean * shifted_mean).clamp_min(0)
    normalised = (values - per_channel(shifted_mean + shift)) * per_channel(torch.rsqrt(variance + eps))
    if weight is not None:
        normalised = normalised * weight.float().view((1, channels) + ones)
    if bias is not None:
        normalised = normalised + bias.float().view((1, channels) + ones)
    return normalised.to(x.dtype)


# Below this many elements a GroupNorm input is left to torch's group_norm: Inductor's own reduction
# is as fast there (H200, bench/vae_kernels.py: 0.92× at 512 channels × 128², 1.25× at × 256²,
# 1.9–3.1× from 2**26 elements up, the VAE decoder's high-resolution stages).
CHANNEL_SUMS_MIN_ELEMENTS = 2**24


def group_norm_for_compiler(x: torch.Tensor, num_groups: int, weight: torch.Tensor | None = None,
                            bias: torch.Tensor | None = None, eps: float = 1e-5) -> torch.Tensor:
    """group_norm as the compiled VAE decoder computes it: by channel sums where the input is large."""
    if x.ndim < 3 or x.numel() < CHANNEL_SUMS_MIN_ELEMENTS:
        return torch.nn.functional.group_norm(x, num_groups, weight, bias, eps)
    return group_norm_by_channel_sums(x, num_groups, weight, bias, eps)


# The most scores attention_by_matmuls makes at once: 2**28, 512 MiB in bf16 (and twice that again for
# a float32 softmax, should Inductor not fuse it into one pass).
MAX_ATTENTION_SCORES = 2**28


def attention_by_matmuls(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                         max_scores: int = MAX_ATTENTION_SCORES) -> torch.Tensor:
    """One-head attention over the positions of (batch, channels, H, W) maps, as the VAE's AttnBlock
    does, written as QKᵀ, softmax and ·V: two matrix products and one fusable softmax.

    The VAE's single head has 512 channels, more than the flash kernels take, so scaled_dot_product_
    attention runs the memory-efficient kernel, slower than the two matrix products (bench/
    vae_kernels.py). The queries are scaled first, so that fp16 scores cannot overflow where the
    softmax's would not; the scores are rounded to the inputs' dtype, as ComfyUI's split attention
    does, and the softmax runs in float32; the queries are taken in chunks so that no more than
    `max_scores` scores exist at once.
    """
    batch, channels = q.shape[:2]
    positions = math.prod(q.shape[2:])
    queries = (q * channels ** -0.5).reshape(batch, channels, positions).transpose(1, 2)
    keys = k.reshape(batch, channels, positions)
    values = v.reshape(batch, channels, positions).transpose(1, 2)
    chunk = max(1, min(positions, max_scores // (batch * positions)))
    pieces = []
    for start in range(0, positions, chunk):
        scores = torch.bmm(queries[:, start:start + chunk], keys)
        weights = torch.softmax(scores.float(), dim=-1).to(values.dtype)
        pieces.append(torch.bmm(weights, values))
    out = pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=1)
    return out.transpose(1, 2).reshape(q.shape)


class GroupNormForCompiler(torch.nn.GroupNorm):
    """A GroupNorm computed by group_norm_for_compiler: the class the compiled decoder's copy gives its
    norms. A class of its own at module level rather than a per-module forward: torch can then save a
    compile of the decoder (fewstep.acceleration.saved_compiles)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return group_norm_for_compiler(x, self.num_groups, self.weight, self.bias, self.eps)
