"""Convolutional waveform encoder (wav2vec 2.0 §2, "feature encoder").

A stack of temporal convolutions maps raw samples to latent frames z_1..z_T. With the
paper's 7 layers (strides 5,2,2,2,2,2,2) one frame covers 25 ms and hops 20 ms.
"""

from typing import List, Sequence

import torch
from torch import nn


class _ChannelLayerNorm(nn.LayerNorm):
    """LayerNorm over channels of a (B, C, T) tensor."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.transpose(1, 2)).transpose(1, 2)


class ConvFeatureExtractor(nn.Module):
    """Conv1d → norm → GELU blocks.

    norm="group": GroupNorm(C, C) on the first layer only (wav2vec 2.0 base). It normalises
    each channel over time, so zero padding leaks into statistics; fine for pretraining on
    similar lengths. norm="layer": LayerNorm over channels after every conv (wav2vec 2.0
    large/"stable" variant) — per frame, so padding cannot leak.
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
                block = nn.Sequential(conv, _ChannelLayerNorm(dim), nn.GELU())
            elif i == 0:
                block = nn.Sequential(conv, nn.GroupNorm(dim, dim), nn.GELU())
            else:
                block = nn.Sequential(conv, nn.GELU())
            self.layers.append(block)
            in_dim = dim
        self.output_dim = in_dim

    def forward(self, waveform: torch.Tensor) -> torch.Tensor:
        """(B, samples) → (B, C, T) latent frames."""
        x = waveform.unsqueeze(1)
        for layer in self.layers:
            x = layer(x)
        return x

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


def scale_grad(x: torch.Tensor, scale: float) -> torch.Tensor:
    if scale == 1.0 or not x.requires_grad:
        return x
    return GradMultiply.apply(x, scale)


__all__ = ["ConvFeatureExtractor", "lengths_to_padding_mask", "scale_grad"]
