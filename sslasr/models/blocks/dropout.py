"""Dropout with a cheaper random stream on CPU, and the attention that uses it in training.

Same semantics as F.dropout: each element is kept with probability 1 − p and scaled by
1/(1 − p). What changes is how the keep decisions are drawn: PyTorch's CPU dropout draws one
bernoulli_ double per element (~8-10 ns each), here every 64-bit draw of the generator
(`random_` over the full int64 range, ~2 ns) gives four uniform 16-bit integers, and an element
is kept when its integer is ≥ a threshold. The keep probability is thereby 1 − p with p rounded
to a multiple of 2⁻¹⁶ (at most 7.7e-6 away; p = 0.1 keeps with probability 0.899994); the scale
stays 1/(1 − p), as F.dropout's (above p = 0.99, where that rounding would bias E[y] by more than
7.7e-4, F.dropout itself runs). 16-bit rather than 32-bit draws halve the cost of the mask
(measured 3.4 → 1.8 ms for an (8, 4, 199, 199) attention mask, one thread); dropout was 18 %
of a profiled w2v-BERT training step. Like F.dropout, the backward keeps the mask of scales in x's
dtype. Other devices use F.dropout (fused and fast there).
"""

import math
import threading
from typing import Optional

import torch
from torch import nn
import torch.nn.functional as F


_scratch = threading.local()  # per thread: the int64 buffer the random bits are drawn into
MAX_P = 0.99  # above it, F.dropout (see dropout); up to it E[y] is within 7.7e-4 of x


def _random_bits(count: int, device) -> torch.Tensor:
    """count 64-bit draws of torch's default generator, in a buffer reused from call to call: a
    fresh allocation of this size is page-faulted in on every call, which costs as much on
    CPU as drawing the numbers."""
    if torch.device(device or "cpu").type != "cpu":
        return torch.empty(count, dtype=torch.int64, device=device).random_(-2**63, None)
    buffer = getattr(_scratch, "bits", None)
    if buffer is None or len(buffer) < count:
        with torch.inference_mode(False):  # (one made under inference_mode could not be written outside it)
            buffer = _scratch.bits = torch.empty(count, dtype=torch.int64)
    return buffer[:count].random_(-2**63, None)


def keep_mask(shape: torch.Size, p: float, dtype: torch.dtype = torch.bool, device=None) -> torch.Tensor:
    """Tensor of `shape` whose entries are independently 1 (True) with probability 1 − p (p
    rounded to a multiple of 2⁻¹⁶) and 0 otherwise, drawn from torch's default generator."""
    count = math.prod(shape)
    bits = _random_bits((count + 3) // 4, device)
    uniform = bits.view(torch.int16)[:count].view(shape)     # uniform on [−2¹⁵, 2¹⁵)
    threshold = round(p * 2**16) - 2**15                      # P(uniform ≥ threshold) = 1 − p
    # written straight into `dtype`: a bool mask would be converted to x's dtype by every use
    return torch.ge(uniform, threshold, out=torch.empty(shape, dtype=dtype, device=device))


class _Dropout(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, p: float, inplace: bool) -> torch.Tensor:
        scale = keep_mask(x.shape, p, x.dtype, x.device).mul_(1.0 / (1.0 - p))  # 0 or 1/(1 − p)
        ctx.save_for_backward(scale)
        if inplace:
            ctx.mark_dirty(x)
            return x.mul_(scale)
        return x * scale

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (scale,) = ctx.saved_tensors
        return grad * scale, None, None


def dropout(x: torch.Tensor, p: float, training: bool = True, inplace: bool = False) -> torch.Tensor:
    """F.dropout(x, p, training, inplace), with the cheaper random stream on CPU.

    In place on an autograd view (a Linear's output on (B, T, C) is a view of its (B·T, C)
    matmul), autograd would rebase the view's history: in the backward, a copy of the base's
    gradient, a strided copy into it and a strided gather back out (CopySlices), three passes
    to save one allocation. So a view covering its whole base drops the base in place and
    returns the view of the result; another view is dropped out of place."""
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"dropout probability has to be between 0 and 1, but got {p}")
    if not training or p == 0.0:
        return x
    if inplace and x._base is not None:
        base = x._base
        if x.is_contiguous() and base.is_contiguous() and x.numel() == base.numel():
            return dropout(base, p, training, inplace=True).view(x.shape)
        inplace = False
    # Near p = 1 the rounded keep probability 1 − p' is far, relatively, from the 1 − p of the
    # scale (E[y] = x·(1 − p')/(1 − p): 1.007 at p = 0.999), and past 1 − 2⁻¹⁷ the int16 threshold
    # would wrap: F.dropout there
    if x.device.type != "cpu" or p > MAX_P:
        return F.dropout(x, p, training, inplace)
    return _Dropout.apply(x, p, inplace)


class Dropout(nn.Dropout):
    """nn.Dropout (same arguments, no parameters) computed by `dropout`. inplace=True saves a
    fresh output (page-faulted in on CPU at these sizes) where x is an intermediate that no
    backward needs: the output of a Linear or of GELU/SiLU (which keep their input), not of
    ReLU or softmax (which keep their output; autograd then raises an error)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dropout(x, self.p, self.training, self.inplace)


def masked_key_bias(dtype: torch.dtype) -> float:
    """The additive bias of a masked (padded) key: finite, so a row of only masked keys (a
    frameless utterance) gets finite weights where −inf made the softmax NaN, and half the
    dtype's range, so the scores added to it cannot overflow to −inf (fp16: −32752)."""
    return torch.finfo(dtype).min / 2


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor] = None,
              dropout_p: float = 0.0, scale: Optional[float] = None) -> torch.Tensor:
    """F.scaled_dot_product_attention(q, k, v, mask, dropout_p, scale=scale); mask is a bool
    keep-mask or an additive bias, broadcastable to (B, H, T, S).

    With dropout on CPU, SDPA takes its unfused math path, whose bernoulli_ dropout and NaN-safe
    softmax (isneginf, all, where over the (B, H, T, S) weights) cost as much as the matmuls:
    there it is computed here instead, from the same ops with our dropout. Masked keys get the
    dtype's lowest finite value (an additive −inf bias stays −inf), which gives them weight 0
    exactly as SDPA does, unless every key of a row is masked (an empty utterance), where SDPA
    returns zeros."""
    if dropout_p == 0.0 or q.device.type != "cpu":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, scale=scale)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    q = q * scale if scale != 1.0 else q
    logits_shape = (*q.shape[:-1], k.shape[-2])
    if mask is not None and mask.dtype == q.dtype and mask.shape == logits_shape:
        # a full bias is the matmul's accumulator: no separate pass over the logits
        flat = (-1, *logits_shape[-2:])
        logits = torch.baddbmm(mask.reshape(flat), q.reshape(-1, *q.shape[-2:]),
                               k.reshape(-1, *k.shape[-2:]).transpose(1, 2)).view(logits_shape)
    else:
        logits = q @ k.transpose(-2, -1)
        if mask is not None and mask.dtype == torch.bool:
            logits = logits.masked_fill_(~mask, torch.finfo(logits.dtype).min)
        elif mask is not None:
            logits = logits.add_(mask)
    return dropout(torch.softmax(logits, dim=-1), dropout_p) @ v
