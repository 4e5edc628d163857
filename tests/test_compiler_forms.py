"""The VAE decoder's operations in the forms the compiler traces (fewstep.acceleration.compiler_forms):
the same function as torch's, within each dtype's rounding, and safe where the naive forms are not."""
from __future__ import annotations

import pytest
import torch

from comfyui_fewstep.fewstep.acceleration import agreement, compiler_forms
from comfyui_fewstep.fewstep.acceleration.compiler_forms import attention_by_matmuls, group_norm_by_channel_sums


@pytest.mark.parametrize("shape, groups, channels_last", [
    ((2, 64, 16, 16), 32, True), ((1, 32, 8, 12), 8, False), ((3, 12, 5), 4, False), ((1, 8, 2, 3, 4), 2, False)])
def test_group_norm_by_channel_sums_equals_group_norm(shape, groups, channels_last):
    generator = torch.Generator().manual_seed(11)
    # A mean 1000 standard deviations from zero: a variance taken as E[x²] − E[x]² without the shift
    # would lose every digit to cancellation in float32. Float32 itself rounds x − mean here to about
    # 1e-5 of the spread, so the bound is PyTorch's own float32 group_norm's error.
    x = torch.randn(shape, generator=generator) * 0.1 + 100.0
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    weight, bias = torch.rand(shape[1], generator=generator) + 0.5, torch.randn(shape[1], generator=generator)
    for affine in ((weight, bias), (None, None)):
        expected = torch.nn.functional.group_norm(x.double(), groups, *(None if t is None else t.double() for t in affine),
                                                  1e-6)
        torch_error = agreement(torch.nn.functional.group_norm(x, groups, *affine, 1e-6), expected).relative_l2
        ours = agreement(group_norm_by_channel_sums(x, groups, *affine, 1e-6), expected)
        assert ours.relative_l2 <= 2 * torch_error + 1e-6, (ours, torch_error)



def test_group_norm_by_channel_sums_keeps_its_precision_when_the_first_row_is_an_outlier():
    # The shift is each group's mean over the first row. A first row 50 standard deviations off the
    # rest puts the shift that far from the mean; the variance's cancellation, float32's 6e-8 × 50²,
    # still stays far below the bf16 output's own rounding (3.9e-3).
    generator = torch.Generator().manual_seed(13)
    x = torch.randn(1, 32, 16, 16, generator=generator) * 0.1 + 100.0
    x[:, :, 0, :] += 5.0
    expected = torch.nn.functional.group_norm(x.double(), 8, eps=1e-6)
    assert agreement(group_norm_by_channel_sums(x, 8, eps=1e-6), expected).relative_l2 < 1e-4



@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_group_norm_by_channel_sums_in_half_precision_is_as_close_as_group_norm(dtype):
    generator = torch.Generator().manual_seed(14)
    x = (torch.randn(2, 32, 8, 8, generator=generator) * 3 + 5).to(dtype)
    weight, bias = (torch.rand(32, generator=generator) + 0.5).to(dtype), torch.randn(32, generator=generator).to(dtype)
    expected = torch.nn.functional.group_norm(x.double(), 8, weight.double(), bias.double(), 1e-6)
    ours = group_norm_by_channel_sums(x, 8, weight, bias, 1e-6)
    assert ours.dtype == dtype
    torch_error = agreement(torch.nn.functional.group_norm(x.float(), 8, weight.float(), bias.float(), 1e-6).to(dtype),
                            expected).relative_l2
    assert agreement(ours, expected).relative_l2 <= 1.5 * torch_error



def test_group_norm_for_compiler_leaves_inputs_without_positions_to_torch():
    x = torch.randn(4, 32)
    assert torch.equal(compiler_forms.group_norm_for_compiler(x, 8), torch.nn.functional.group_norm(x, 8))
    with pytest.raises(ValueError, match="positions"):
        group_norm_by_channel_sums(x, 8)



def test_attention_by_matmuls_does_not_overflow_in_fp16():
    # Unscaled, these scores (16 · 70² = 78,400) would pass fp16's largest value (65,504).
    q = k = torch.full((1, 16, 2, 2), 70.0, dtype=torch.float16)
    v = torch.randn(1, 16, 2, 2, generator=torch.Generator().manual_seed(15)).to(torch.float16)
    out = attention_by_matmuls(q, k, v)
    assert torch.isfinite(out).all()
    assert agreement(out, v.double().mean(dim=(2, 3), keepdim=True).expand_as(v)).relative_l2 < 1e-2



@pytest.mark.parametrize("max_scores", [2**28, 64 * 10])  # one piece; queries in chunks of 5 (a short last one)
def test_attention_by_matmuls_equals_scaled_dot_product_attention(max_scores):
    generator = torch.Generator().manual_seed(12)
    q, k, v = (torch.randn(2, 16, 8, 8, generator=generator) for _ in range(3))

    def as_tokens(t):  # ComfyUI's VAE attention: (batch, 1 head, positions, channels)
        return t.reshape(2, 16, 64).transpose(1, 2).unsqueeze(1)

    expected = torch.nn.functional.scaled_dot_product_attention(*(as_tokens(t).double() for t in (q, k, v)))
    expected = expected.squeeze(1).transpose(1, 2).reshape(q.shape)
    ours = attention_by_matmuls(q, k, v, max_scores=max_scores)
    assert ours.shape == q.shape
    assert agreement(ours, expected, tolerance=1e-5).within_tolerance
