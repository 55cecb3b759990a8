"""Gated relative position bias (WavLM, Chen et al. 2022) and its fp16-safe softmax.

Self-attention logits get an additive bias that depends on the offset j − i between key j and
query i, learned per offset bucket and head (T5, Raffel et al. 2020) and shared by all layers:
    a_ij = softmax_j( q_i·k_j / √d + r_{i−j} )
Each layer gates the shared bias d_{i−j} with its own query:
    g_i^update = σ(q_i·u),  g_i^reset = σ(q_i·w),  r̃_{i−j} = c·d_{i−j}
    r_{i−j}   = d_{i−j} + g_i^update·d_{i−j} + (1 − g_i^update)·g_i^reset·r̃_{i−j}
with u, w and the per-head scalar c learned per layer. "q_i" is the layer's attention input at
frame i, split into heads (not the projected query), as in the released model.
"""

import math
from typing import Optional

import torch
from torch import nn

from sslasr.models.blocks.dropout import dropout as dropout_fn, masked_key_bias
from sslasr.utils.devices import backward_without_autocast


def relative_position_bucket(relative: torch.Tensor, num_buckets: int = 320, max_distance: int = 800) -> torch.Tensor:
    """Bidirectional T5 buckets of offsets `key − query`: half of the buckets per direction
    (offsets > 0 take the upper half). Within a half of n buckets, offsets below n/2 get a bucket
    each; larger ones share log-spaced buckets up to `max_distance`, beyond which they all fall
    into the last bucket:
        bucket(δ) = n/2 + ⌊ log(δ / (n/2)) / log(max_distance / (n/2)) · n/2 ⌋,  capped at n − 1."""
    if num_buckets < 4 or num_buckets % 2:
        raise ValueError(f"num_buckets must be an even number ≥ 4, got {num_buckets}")
    half = num_buckets // 2
    exact = half // 2
    if max_distance <= exact:
        raise ValueError(f"max_distance {max_distance} must exceed the exact range {exact} (num_buckets / 4)")
    direction = (relative > 0).long() * half
    distance = relative.abs()
    # clamp(min=1): log(0) would be −inf; those offsets take the exact branch anyway
    log_ratio = torch.log(distance.clamp(min=1).float() / exact) / math.log(max_distance / exact)
    far = (exact + log_ratio * (half - exact)).long().clamp(max=half - 1)
    return direction + torch.where(distance < exact, distance, far)


class RelativePositionBias(nn.Module):
    """d_{i−j}: a learned scalar per (bucket, head), computed once per forward for all layers."""

    def __init__(self, heads: int, num_buckets: int = 320, max_distance: int = 800):
        super().__init__()
        self.num_buckets, self.max_distance = num_buckets, max_distance
        self.embedding = nn.Embedding(num_buckets, heads)

    def forward(self, length: int) -> torch.Tensor:
        """(H, T, T) bias; entry [h, i, j] is for query i attending to key j.

        The bias is Toeplitz: it depends on j − i only. So the table is looked up once per
        offset, v[h, m] for the offsets m − (T − 1) = −(T − 1) … T − 1, and with r = v reversed,
        bias[h, i, j] = r[h, T − 1 + i − j]: an unfold of r, flipped. Its backward sums the
        (H, T, T) gradient along diagonals into 2T − 1 offsets before it reaches the table,
        instead of scattering T² rows into it. The result is contiguous: every layer's gate
        multiplies it, and a head-last view made those multiplies strided (3× slower)."""
        offsets = torch.arange(-(length - 1), length, device=self.embedding.weight.device)
        table = self.embedding(relative_position_bucket(offsets, self.num_buckets, self.max_distance))  # (2T−1, H)
        reversed_by_offset = table.flip(0).t().contiguous()                    # r (H, 2T − 1)
        return reversed_by_offset.unfold(1, length, 1).flip(-1)                # (H, T, T), a copy


class _GatedBias(torch.autograd.Function):
    """scale (B, H, T, 1) · bias (H, T, T) → (B, H, T, T), with both gradients as batched
    matrix products over the H·T rows, each reading the (B, H, T, T) gradient once:
        ∂L/∂scale[b, n] = Σ_j G[b, n, j] bias[n, j],   ∂L/∂bias[n, j] = Σ_b scale[b, n] G[b, n, j].
    Autograd's broadcasting multiply would write two more (B, H, T, T) products and sum them."""

    @staticmethod
    def forward(ctx, scale: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(scale, bias)
        return scale * bias

    @staticmethod
    @torch.autograd.function.once_differentiable
    @backward_without_autocast
    def backward(ctx, grad: torch.Tensor):
        scale, bias = ctx.saved_tensors
        batch, heads, time, _ = scale.shape
        rows = heads * time
        by_row = grad.reshape(batch, rows, -1).transpose(0, 1)                 # (H·T, B, T) view
        grad_scale = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_scale = torch.bmm(by_row, bias.reshape(rows, -1, 1)).view(rows, batch).t().reshape(scale.shape)
        if ctx.needs_input_grad[1]:
            grad_bias = torch.bmm(scale.reshape(batch, rows, 1).permute(1, 2, 0), by_row).view(bias.shape)
        return grad_scale, grad_bias


class GatedRelativePositionBias(nn.Module):
    """One layer's gate on the shared bias ("gru_rel_pos" of the released model).

    The released model projects each head's d/H-dim slice of the attention input to 8 values
    and sums them in two groups of 4 (a parameterisation of the two dot products u, w above);
    σ of the sums are a = 1 − g^update and b = g^reset, and the bias is scaled by
        a·(b·c − 1) + 2 = 1 + g^update + (1 − g^update)·g^reset·c.
    """

    def __init__(self, dim: int, heads: int):
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} is not divisible by heads {heads}")
        self.heads = heads
        self.gate_proj = nn.Linear(dim // heads, 8)
        self.reset_scale = nn.Parameter(torch.ones(1, heads, 1, 1))  # c, per head

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """x (B, T, C) the attention input, bias (H, T, T) shared → gated bias (B, H, T, T)."""
        batch, time, dim = x.shape
        per_head = x.view(batch, time, self.heads, dim // self.heads).transpose(1, 2)   # (B, H, T, d)
        sums = self.gate_proj(per_head).view(batch, self.heads, time, 2, 4).sum(-1)       # (B, H, T, 2)
        not_update, reset = torch.sigmoid(sums).chunk(2, dim=-1)                          # (B, H, T, 1) each
        scale = not_update * (reset * self.reset_scale - 1.0) + 2.0
        dtype = torch.promote_types(scale.dtype, bias.dtype)  # what `scale * bias` would give
        return _GatedBias.apply(scale.to(dtype), bias.to(dtype))


def scaled_softmax_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor],
                             alpha: float = 32.0, dropout: float = 0.0) -> torch.Tensor:
    """softmax(q·kᵀ/√d + bias)·v, computed as WavLM does to train in fp16:

        softmax(q·kᵀ/√d + B) = softmax( (q·kᵀ/(α√d) − max_j q·kᵀ/(α√d))·α + B )

    q is scaled by 1/(α√d) *before* the product, so the fp16 logits stay α times inside the
    range that overflows, and the row maximum is subtracted before scaling back. Softmax is
    shift invariant, so in fp32 this equals the plain formula up to rounding.
    q, k, v (B, H, T, d); mask broadcastable to (B, H, T, T): a bool keep-mask or an additive
    bias (−inf = masked), as for F.scaled_dot_product_attention."""
    if alpha <= 0:
        raise ValueError(f"alpha must be positive, got {alpha}")
    logits = (q * (1.0 / (alpha * math.sqrt(q.shape[-1])))) @ k.transpose(-2, -1)
    logits = (logits - logits.amax(dim=-1, keepdim=True)) * alpha
    if mask is not None and mask.dtype == torch.bool:  # finite: a row of only masked keys stays finite
        logits = logits.masked_fill(~mask, masked_key_bias(logits.dtype))
    elif mask is not None:
        logits = logits + mask.to(logits.dtype)
    weights = torch.softmax(logits, dim=-1, dtype=torch.float32).to(v.dtype)
    if dropout > 0.0:
        weights = dropout_fn(weights, dropout)
    return weights @ v
