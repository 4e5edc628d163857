"""Two levers on ComfyUI's SDXL UNet that bench/unet_levers.py measures: FP8 matrix products, and fused
attention projections. Each changes the loaded UNet's modules in place; the UNet is ComfyUI's own
(comfy.ldm.modules.diffusionmodules.openaimodel.UNetModel with its CrossAttention blocks).

- `fuse_projections`: each self-attention's queries, keys and values become one product (one weight of
  three stacked), and the keys and values of every cross-attention, all on the same 77 text tokens,
  become one product per call for the whole UNet (computed before the first block, sliced by each).
  On the GPU the 70 cross-attention key/value products are small and latency-bound; one product with
  the stacked weights does the same arithmetic at once.
- `fp8_linears`: every linear layer of the transformer blocks (attention projections, feed-forward,
  proj_in/proj_out) computes in float8 e4m3: the weight scaled per output channel once, the activation
  per row at each call (the "rowwise" scaling of torch._scaled_mm, which runs on cuBLASLt on Hopper).
  Convolutions stay fp16.
"""
from __future__ import annotations

import types

import torch

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max


class FP8Linear(torch.nn.Module):
    """A linear layer computed as an FP8 product: out = (x / s_x)·(W / s_W)ᵀ · s_x s_W (+ bias)."""

    def __init__(self, linear: torch.nn.Linear):
        super().__init__()
        weight = linear.weight.detach().float()
        scale = weight.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / FP8_MAX
        self.register_buffer("weight_fp8", (weight / scale).to(FP8))
        self.register_buffer("weight_scale", scale.reshape(1, -1).contiguous())
        self.bias = linear.bias
        self.out_features = linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1])
        scale = rows.abs().amax(dim=1, keepdim=True).float().clamp(min=1e-12) / FP8_MAX
        quantized = (rows.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8)
        # Row-wise scales give a bf16 product (cuBLASLt's rowwise kernels); cast back to the model's dtype.
        out = torch._scaled_mm(quantized, self.weight_fp8.t(), scale_a=scale, scale_b=self.weight_scale,
                               out_dtype=torch.bfloat16, use_fast_accum=True).to(x.dtype)
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*x.shape[:-1], self.out_features)


def transformer_linears(unet: torch.nn.Module):
    """(parent, attribute name, linear) for every nn.Linear inside the UNet's SpatialTransformers."""
    for module in unet.modules():
        if type(module).__name__ != "SpatialTransformer":
            continue
        for parent in module.modules():
            for name, child in parent.named_children():
                if isinstance(child, torch.nn.Linear):
                    yield parent, name, child


def fp8_linears(unet: torch.nn.Module) -> int:
    """Replace the transformer blocks' linear layers by FP8Linear; returns how many."""
    replaced = list(transformer_linears(unet))
    for parent, name, linear in replaced:
        setattr(parent, name, FP8Linear(linear))
    return len(replaced)


def _self_attention(self, x, context=None, value=None, mask=None, transformer_options={}):
    from comfy.ldm.modules import attention

    q, k, v = self.to_qkv(x).chunk(3, dim=-1)
    out = attention.optimized_attention(q, k, v, self.heads, attn_precision=self.attn_precision,
                                        transformer_options=transformer_options)
    return self.to_out(out)


class TextKeysAndValues:
    """The keys and values of every cross-attention, from one product on the text tokens per UNet call."""

    def __init__(self, attentions: list):
        weights, self.slices, start = [], {}, 0
        for attention in attentions:
            width = attention.to_k.weight.shape[0]
            weights += [attention.to_k.weight.detach(), attention.to_v.weight.detach()]
            self.slices[id(attention)] = (start, start + width, start + 2 * width)
            start += 2 * width
        self.weight = torch.cat(weights)
        self.values = None  # (batch, tokens, all keys and values), set at the start of each call

    def compute(self, context: torch.Tensor) -> None:
        self.values = torch.nn.functional.linear(context, self.weight)

    def of(self, attention):
        start, middle, end = self.slices[id(attention)]
        return self.values[..., start:middle], self.values[..., middle:end]


def _cross_attention(self, x, context=None, value=None, mask=None, transformer_options={}):
    from comfy.ldm.modules import attention

    k, v = self.text_keys_and_values.of(self)
    out = attention.optimized_attention(self.to_q(x), k, v, self.heads, attn_precision=self.attn_precision,
                                        transformer_options=transformer_options)
    return self.to_out(out)


def fuse_projections(unet: torch.nn.Module) -> TextKeysAndValues:
    """Self-attention q/k/v as one product per block; all cross-attention k/v as one product per call.

    Returns the shared key/value bank: call `bank.compute(context)` before each UNet call (the bench's
    function does, inside the compiled region)."""
    self_attentions, cross_attentions = [], []
    for module in unet.modules():
        if type(module).__name__ == "BasicTransformerBlock":
            self_attentions.append(module.attn1)
            cross_attentions.append(module.attn2)
    for attention in self_attentions:
        stacked = torch.cat([attention.to_q.weight, attention.to_k.weight, attention.to_v.weight]).detach()
        fused = torch.nn.Linear(stacked.shape[1], stacked.shape[0], bias=False, device=stacked.device,
                                dtype=stacked.dtype)
        fused.weight = torch.nn.Parameter(stacked, requires_grad=False)
        attention.to_qkv = fused
        del attention.to_q, attention.to_k, attention.to_v
        attention.forward = types.MethodType(_self_attention, attention)
    bank = TextKeysAndValues(cross_attentions)
    for attention in cross_attentions:
        attention.text_keys_and_values = bank
        del attention.to_k, attention.to_v
        attention.forward = types.MethodType(_cross_attention, attention)
    return bank


def relative_l2(value: torch.Tensor, reference: torch.Tensor) -> float:
    value, reference = value.float(), reference.float()
    return float((value - reference).norm() / reference.norm().clamp(min=1e-12))
