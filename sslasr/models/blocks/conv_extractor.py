"""Convolutional waveform encoder (wav2vec 2.0 §2, "feature encoder").

A stack of temporal convolutions maps raw samples to latent frames z_1..z_T. With the
paper's 7 layers (strides 5,2,2,2,2,2,2) one frame covers 25 ms and hops 20 ms.
"""

from typing import List, Optional, Sequence

import torch
from torch import nn
import torch.nn.functional as F

from sslasr.utils.devices import backward_without_autocast


class ConvFeatureExtractor(nn.Module):
    """Conv1d → norm → GELU blocks.

    norm="group": GroupNorm(C, C) on the first layer only (wav2vec 2.0 base). It normalises
    each channel over time. Given the utterances' `lengths`, over each one's own frames only:
    fairseq and transformers take the statistics over the padding as well, which makes an
    utterance's latents depend on its batch-mates (10 % of zero padding moved z by about 9 %, a
    2 s utterance padded to 8 s by 178 %, and greedy test WER of a minisynth model went from
    77.3 % decoded alone to 79.3 % in 200 s batches). With the lengths, a padded batch gives every
    utterance what it gives alone, which is what fairseq's pretraining (batches cropped to the
    shortest utterance) and one-utterance inference compute. norm="layer": LayerNorm over
    channels after every conv (wav2vec 2.0 large/"stable" variant) — per frame, so padding
    cannot leak.
    """

    def __init__(self, conv_layers: Sequence[Sequence[int]], norm: str = "layer", conv_bias: bool = False):
        super().__init__()
        if norm not in ("group", "layer"):
            raise ValueError(f"feature extractor norm must be 'group' or 'layer', got {norm!r}")
        self.kernels: List[int] = [k for _, k, _ in conv_layers]
        self.strides: List[int] = [s for _, _, s in conv_layers]
        self.layers = nn.ModuleList()
        in_dim = 1
        for i, (dim, kernel, stride) in enumerate(conv_layers):
            conv = nn.Conv1d(in_dim, dim, kernel, stride=stride, bias=conv_bias)
            nn.init.kaiming_normal_(conv.weight)
            if norm == "layer":
                block = nn.Sequential(conv, nn.LayerNorm(dim), nn.GELU())  # applied time-major in forward
            elif i == 0:
                block = nn.Sequential(conv, nn.GroupNorm(dim, dim), nn.GELU())
            else:
                block = nn.Sequential(conv, nn.GELU())
            self.layers.append(block)
            in_dim = dim
        self.norm = norm
        self.output_dim = in_dim

    def forward(self, waveform: torch.Tensor, lengths: Optional[torch.Tensor] = None) -> torch.Tensor:
        """(B, samples) → (B, C, T) latent frames: the modules' maths (conv → norm → GELU per
        block), computed time-major. Each conv is then a matmul over frames, the layer norm needs
        no transposes, and the result is a transposed view of a contiguous (B, T, C) tensor.
        `lengths` (B,) in samples: the first GroupNorm's statistics cover each utterance's own
        frames (None: every frame, as for a batch without padding).

        A valid strided convolution never reads the last (T − k) mod s frames of its input, so
        each layer computes only the frames the next one reads, rounded to its blocks of s
        frames (`_frames_read`); GroupNorm's statistics still cover every (valid) frame of its layer.
        """
        valid = None  # the first layer's frames of each utterance
        if self.norm == "group" and lengths is not None:
            valid = (torch.div(lengths - self.kernels[0], self.strides[0], rounding_mode="floor") + 1).clamp(min=1)
        if waveform.device.type != "cpu":  # cuDNN's convolutions beat these matmuls on a GPU
            return self._forward_modules(waveform, valid)
        frames = self._frames_read(waveform.shape[-1])
        x = waveform.unsqueeze(-1)  # (B, samples, 1)
        for i, layer in enumerate(self.layers):
            conv = layer[0]
            if i == 0 and self.norm == "group" and conv.bias is None and not waveform.requires_grad:
                gn = layer[1]
                x = _FirstConvGroupNormGELU.apply(waveform, conv.weight, gn.weight, gn.bias,
                                                  self.strides[0], gn.eps, frames[0], valid)
                continue
            if i == 0 and self.norm == "group":  # general path: statistics over the frames, then trim
                x = _conv_time_major(x, conv.weight, conv.bias, self.strides[0])
                x = F.gelu(_group_norm_time_major(x, layer[1], valid))[:, :frames[0]]
                continue
            x = _conv_time_major(x, conv.weight, conv.bias, self.strides[i], frames[i])
            if self.norm == "layer":
                x = F.layer_norm(x, x.shape[-1:], layer[1].weight, layer[1].bias, layer[1].eps)
            x = F.gelu(x)
        return x.transpose(1, 2)

    def _forward_modules(self, waveform: torch.Tensor, valid: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The same maths channel-major, by the modules themselves (LayerNorm over channels);
        VALID (B,): the first layer's frames of each utterance, for GroupNorm's statistics."""
        x = waveform.unsqueeze(1)  # (B, 1, samples)
        for conv, *norm, gelu in self.layers:  # a block is (conv, norm, GELU) or (conv, GELU)
            x = conv(x)
            if norm and self.norm == "layer":
                x = norm[0](x.transpose(1, 2)).transpose(1, 2)
            elif norm and valid is None:
                x = norm[0](x)
            elif norm:
                x = _group_norm_time_major(x.transpose(1, 2), norm[0], valid).transpose(1, 2)
            x = gelu(x)
        return x

    def _frames_read(self, samples: int) -> List[int]:
        """Per layer, how many of its output frames the rest of the stack reads (all of them for
        the last layer). Raises, as nn.Conv1d does, when the input is shorter than a kernel."""
        full, length = [], samples
        for kernel, stride in zip(self.kernels, self.strides):
            if length < kernel:
                raise RuntimeError(f"input of {samples} samples is shorter than the receptive field "
                                   f"({self.receptive_field} samples) of the feature extractor")
            length = (length - kernel) // stride + 1
            full.append(length)
        for i in range(len(full) - 2, -1, -1):  # next layer's frames, in whole blocks of its stride
            kernel, stride = self.kernels[i + 1], self.strides[i + 1]
            full[i] = min(full[i], (full[i + 1] - 1 + -(-kernel // stride)) * stride)
        return full

    def output_lengths(self, input_lengths: torch.Tensor) -> torch.Tensor:
        """Frames produced for each input length (valid convolution, no padding)."""
        lengths = input_lengths
        for kernel, stride in zip(self.kernels, self.strides):
            lengths = torch.div(lengths - kernel, stride, rounding_mode="floor") + 1
        return lengths.clamp(min=0)

    @property
    def receptive_field(self) -> int:
        field, jump = 1, 1
        for kernel, stride in zip(self.kernels, self.strides):
            field += (kernel - 1) * jump
            jump *= stride
        return field


def _conv_time_major(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], stride: int,
                     frames: Optional[int] = None) -> torch.Tensor:
    """Valid Conv1d of x (B, T, C) with weight (O, C, k): the first `frames` output frames (all by
    default) as (B, frames, O), with no im2col copy. Seen as blocks of s frames, x is a
    (B, T/s, s·C) view; the kernel is ⌈k/s⌉ slices of s taps (the last one has only k mod s taps
    when s ∤ k). Output frame t sums slice i applied to block t + i (`_ShiftedBlockMatmul`).
    The input is trimmed, or zero-padded, to a whole number of blocks: padding is never read."""
    batch, length, channels = x.shape
    out_dim, _, kernel = weight.shape
    if frames is None:
        frames = (length - kernel) // stride + 1
    slices = -(-kernel // stride)
    blocks, block = frames + slices - 1, stride * channels
    if length > blocks * stride:
        x = x[:, :blocks * stride]
    elif length < blocks * stride:
        x = F.pad(x, (0, 0, 0, blocks * stride - length))
    xb = x.reshape(batch, blocks, block)
    # w[r·C + c, i, o] = weight[o, c, i·s + r] (taps past k are zero and never multiplied)
    w = F.pad(weight, (0, slices * stride - kernel)).permute(2, 1, 0).reshape(slices, block, out_dim).transpose(0, 1)
    if slices == 1 and kernel == stride:
        out = xb @ w[:, 0]
    else:
        if torch.is_autocast_enabled(x.device.type):  # the Function runs with autocast off: cast as it would
            dtype = torch.get_autocast_dtype(x.device.type)
            xb, w = xb.to(dtype), w.to(dtype)
        out = _ShiftedBlockMatmul.apply(xb, w, frames, (kernel - (slices - 1) * stride) * channels)
    return out if bias is None else out + bias


class _ShiftedBlockMatmul(torch.autograd.Function):
    """out[:, t] = Σ_i xb[:, t + i, :D_i] @ w[:D_i, i] for t < frames; xb (B, n, D), w (D, m, O),
    D_i = D but for the last slice, which reads only its block's first `last_rows` columns.
    The full slices are one matmul forward and backward; the backward writes the shifted output
    gradient once into a (B, n, ·, O) buffer instead of summing zero-padded copies."""

    @staticmethod
    def forward(ctx, xb, w, frames: int, last_rows: int):
        batch, blocks, dim = xb.shape
        slices, out_dim = w.shape[1], w.shape[2]
        full = slices if last_rows == dim else slices - 1
        x2 = xb.reshape(batch * blocks, dim)
        terms = []
        with torch.autocast(xb.device.type, enabled=False):  # in the inputs' dtype, as its backward
            if full:
                p = (x2 @ w[:, :full].reshape(dim, full * out_dim)).view(batch, blocks, full, out_dim)
                terms = [p[:, i:i + frames, i] for i in range(full)]
            if full < slices:
                q = (x2[:, :last_rows] @ w[:last_rows, -1]).view(batch, blocks, out_dim)
                terms.append(q[:, slices - 1:slices - 1 + frames])
            out = terms[0] + terms[1] if len(terms) > 1 else terms[0].clone()
            for term in terms[2:]:
                out += term
        ctx.save_for_backward(xb, w)
        ctx.frames, ctx.last_rows = frames, last_rows
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    @backward_without_autocast
    def backward(ctx, grad):
        xb, w = ctx.saved_tensors
        batch, blocks, dim = xb.shape
        slices, out_dim, frames, last_rows = w.shape[1], w.shape[2], ctx.frames, ctx.last_rows
        full = slices if last_rows == dim else slices - 1

        def shifted(i: int, buf: torch.Tensor) -> None:  # buf (B, n, O) ← grad shifted by i blocks
            buf[:, i:i + frames] = grad
            buf[:, :i] = 0
            buf[:, i + frames:] = 0

        x2 = xb.reshape(batch * blocks, dim)
        grad_x = torch.zeros_like(x2) if full == 0 else None
        grad_w = torch.zeros_like(w) if ctx.needs_input_grad[1] else None
        if full:
            grad_p = grad.new_empty(batch, blocks, full, out_dim)
            for i in range(full):
                shifted(i, grad_p[:, :, i])
            grad_p = grad_p.view(batch * blocks, full * out_dim)
            w_full = w[:, :full].reshape(dim, full * out_dim)
            grad_x = grad_p @ w_full.t()
            if grad_w is not None:
                grad_w[:, :full] = (x2.t() @ grad_p).view(dim, full, out_dim)
        if full < slices:
            grad_q = grad.new_empty(batch, blocks, out_dim)
            shifted(slices - 1, grad_q)
            grad_q = grad_q.view(batch * blocks, out_dim)
            grad_x[:, :last_rows].addmm_(grad_q, w[:last_rows, -1].t())
            if grad_w is not None:
                grad_w[:last_rows, -1] = x2[:, :last_rows].t() @ grad_q
        grad_x = grad_x.view(batch, blocks, dim) if ctx.needs_input_grad[0] else None
        return grad_x, grad_w, None, None


def _group_norm_time_major(x: torch.Tensor, norm: nn.GroupNorm, valid: Optional[torch.Tensor] = None) -> torch.Tensor:
    """GroupNorm(C, C) of a (B, T, C) tensor: each channel normalised over time, over the first
    valid[b] frames of utterance b when VALID (B,) is given. In float32, as autocast runs
    GroupNorm: fp16 sums over a long utterance overflow (and its frame count passes 65504)."""
    if x.dtype in (torch.float16, torch.bfloat16):
        x = x.float()
    if valid is None:
        var, mean = torch.var_mean(x, dim=1, unbiased=False, keepdim=True)
    else:
        keep = (~lengths_to_padding_mask(valid, x.shape[1])).unsqueeze(-1).to(x.dtype)
        count = valid.to(x.dtype)[:, None, None]
        mean = (x * keep).sum(1, keepdim=True) / count
        var = ((x - mean) * keep).pow(2).sum(1, keepdim=True) / count
    return (x - mean) * torch.rsqrt(var + norm.eps) * norm.weight + norm.bias


class _FirstConvGroupNormGELU(torch.autograd.Function):
    """GELU(GroupNorm(Conv1d(waveform))) for the first "group" block (one input channel, no conv
    bias), time-major: (B, samples) → (B, frames, O), with the gradients of the conv weight and
    the norm's γ, β (not of the waveform).

    Frame t is f_t = samples [s·t, s·t + k), and y_t,o = f_t·w_o. Each utterance's channel
    statistics are quadratic forms of its frames' mean f̄ and covariance Σ (k × k, float64):
        mean_o = f̄·w_o,   var_o = w_oᵀ Σ w_o,   r_o = (var_o + ε)^−½,
    so the normalised conv is one batched matmul with per-utterance weights γ_o r_o w_o and shift
    β_o − γ_o r_o mean_o, and no (B, T, O) tensor other than the GELU input and output exists.
    With g' = ∂L/∂(GELU input), E_o = Σ_t g'_t,o (f_t − f̄) and D_o = E_o·w_o, GroupNorm's
    backward collapses to  ∂L/∂w_o = Σ_utt γ_o r_o (E_o − r_o² D_o Σ w_o),  ∂L/∂γ_o = Σ_utt r_o D_o,
    ∂L/∂β_o = Σ_utt,t g'_t,o.
    """

    @staticmethod
    @torch.autocast("cuda", enabled=False)
    @torch.autocast("cpu", enabled=False)
    def forward(ctx, waveform, weight, gamma, beta, stride: int, eps: float, frames: int,
                valid: Optional[torch.Tensor] = None):
        out_dim, _, kernel = weight.shape
        # GroupNorm makes the block blind to a constant added to the waveform (the bias-free conv
        # shifts each channel by a constant, which the mean removes), so the waveform is centred
        # first: then f̄ ≈ 0 and Σ = E[f fᵀ] − f̄ f̄ᵀ (float64) loses nothing to cancellation.
        centred = waveform - waveform.mean(1, keepdim=True)
        windows = centred.unfold(1, kernel, stride)                        # (B, T, k) view
        used = windows[:, :frames].contiguous()                            # (B, frames, k)
        rest = windows[:, frames:].double()                                # frames no later layer reads
        used64 = used.double()
        count = windows.shape[1]
        if valid is None:
            used_in, rest_in = used64, rest
        else:  # the statistics over each utterance's own frames: padding weighs 0
            keep = (~lengths_to_padding_mask(valid, count)).double().unsqueeze(-1)
            used_in, rest_in = used64 * keep[:, :frames], rest * keep[:, frames:]
            count = valid.double().unsqueeze(1)                            # (B, 1)
        mean_frame = (used_in.sum(1) + rest_in.sum(1)) / count             # (B, k)
        second = (used_in.transpose(1, 2) @ used64 + rest_in.transpose(1, 2) @ rest)
        second = second / (count if valid is None else count.unsqueeze(2))
        cov = second - mean_frame.unsqueeze(2) * mean_frame.unsqueeze(1)   # (B, k, k)
        w = weight.reshape(out_dim, kernel).double()
        var = torch.einsum("ok,bkl,ol->bo", w, cov, w)
        rstd = torch.rsqrt(var + eps)                                      # (B, O)
        scale = gamma.double() * rstd
        shift = beta.double() - (mean_frame @ w.t()) * scale
        pre = torch.baddbmm(shift.unsqueeze(1).to(waveform.dtype), used,
                            (w.t().unsqueeze(0) * scale.unsqueeze(1)).to(waveform.dtype))
        ctx.save_for_backward(used, pre, w, gamma, rstd, mean_frame, cov)
        return F.gelu(pre)

    @staticmethod
    @torch.autograd.function.once_differentiable
    @backward_without_autocast
    def backward(ctx, grad):
        used, pre, w, gamma, rstd, mean_frame, cov = ctx.saved_tensors
        if ctx.needs_input_grad[0]:
            raise RuntimeError("_FirstConvGroupNormGELU does not differentiate w.r.t. the waveform")
        grad_pre = torch.ops.aten.gelu_backward(grad.contiguous(), pre)    # (B, frames, O)
        sum_g = grad_pre.sum(1).double()                                   # (B, O)
        # Σ_t f_t g'_tᵀ as (B, k, O): the orientation in which the long T axis is contracted fast
        e = (used.transpose(1, 2) @ grad_pre).transpose(1, 2).double() - sum_g.unsqueeze(2) * mean_frame.unsqueeze(1)
        d = (e * w).sum(-1)                                                # (B, O)
        sigma_w = torch.einsum("bkl,ol->bok", cov, w)                      # (B, O, k)
        grad_w = ((gamma.double() * rstd).unsqueeze(2)
                  * (e - (rstd * rstd * d).unsqueeze(2) * sigma_w)).sum(0)
        dtype = pre.dtype
        return (None, grad_w.unsqueeze(1).to(dtype), (rstd * d).sum(0).to(dtype), sum_g.sum(0).to(dtype),
                None, None, None, None)


class GradMultiply(torch.autograd.Function):
    """Identity forward; scales the gradient (fairseq's feature_grad_mult, 0.1 for base)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad * ctx.scale, None


def lengths_to_padding_mask(lengths: torch.Tensor, max_len: int) -> torch.Tensor:
    """True at padded positions, shape (B, max_len)."""
    return torch.arange(max_len, device=lengths.device)[None, :] >= lengths[:, None]


def padded_to_receptive_field(inputs: torch.Tensor, receptive_field: int, time_dim: int = 1) -> torch.Tensor:
    """INPUTS zero-padded along TIME_DIM to at least RECEPTIVE_FIELD steps. An encoder runs a batch
    shorter than its feature extractor's receptive field this way: the extractor makes one frame
    that belongs to no utterance (every length is 0), so the utterances come out with no frames,
    as a short one does beside longer ones, instead of the convolution failing. Evaluation splits
    keep such utterances; heads give them empty hypotheses."""
    missing = receptive_field - inputs.shape[time_dim]
    if missing <= 0:
        return inputs
    padding = [0, 0] * (inputs.dim() - 1 - time_dim % inputs.dim()) + [0, missing]
    return F.pad(inputs, padding)


def scale_grad(x: torch.Tensor, scale: float) -> torch.Tensor:
    if scale == 1.0 or not x.requires_grad:
        return x
    return GradMultiply.apply(x, scale)


def features_with_grad_scale(extractor: nn.Module, scale: float, *inputs: torch.Tensor) -> torch.Tensor:
    """extractor(*inputs) with its gradient scaled by SCALE (feature_grad_mult). At 0 the extractor
    runs without autograd, as fairseq's: its parameters then get no gradient at all, where zero
    gradients would still be decayed by AdamW's weight decay, and no backward is computed for it."""
    if scale == 0.0:
        with torch.no_grad():
            return extractor(*inputs)
    return scale_grad(extractor(*inputs), scale)


__all__ = ["ConvFeatureExtractor", "features_with_grad_scale", "lengths_to_padding_mask", "padded_to_receptive_field",
           "scale_grad"]
