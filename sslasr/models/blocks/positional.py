"""Convolutional relative positional embedding (wav2vec 2.0 §2, after Mohamed et al. 2019).

A wide grouped convolution over the frame sequence, weight-normalised, added to its input:
x ← x + GELU(conv(x)). It replaces absolute position embeddings.

Its kernel is wide (128 frames in the base model), so in CPU training it usually runs as an
FFT convolution (`fft_conv`), the same function up to float rounding, when a count of the
multiply-adds says that is at least twice cheaper than the direct convolution.
"""

import functools
import math

import torch
from torch import nn

from sslasr.models.blocks.time_conv import conv_over_time


class ConvPositionalEmbedding(nn.Module):
    def __init__(self, dim: int, kernel: int = 128, groups: int = 16):
        super().__init__()
        self.conv = nn.Conv1d(dim, dim, kernel, padding=kernel // 2, groups=groups)
        # fairseq init: N(0, sqrt(4 / (k · C))) then weight norm over the kernel axis
        std = (4.0 / (kernel * dim)) ** 0.5
        nn.init.normal_(self.conv.weight, mean=0.0, std=std)
        nn.init.zeros_(self.conv.bias)
        self.conv = nn.utils.parametrizations.weight_norm(self.conv, name="weight", dim=2)
        self.trim = 1 if kernel % 2 == 0 else 0  # even kernels give one extra frame
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, C) → positional term of shape (B, T, C) (caller adds it).

        self.conv's maths, in training by FFT where that is cheaper (see fft_conv_is_cheaper),
        otherwise by `conv_over_time` (the layout each device's library is fastest on)."""
        conv, weight = self.conv, self.conv.weight  # (weight norm recomputes it on each access)
        # Only in training: the FFT's rounding depends on the transform length, i.e. on the
        # batch's padded length, and decoding a near-tie should not change with the batching.
        if self.training and fft_conv_is_cheaper(x, weight.shape, conv.padding[0]):
            return self.act(fft_conv(x, weight, conv.bias, conv.padding[0]))
        y = conv_over_time(x, weight, conv.bias, conv.padding[0], conv.groups)
        if self.trim:
            y = y[:, :, : -self.trim]
        return self.act(y).transpose(1, 2)


def fft_conv_is_cheaper(x: torch.Tensor, weight_shape, padding: int) -> bool:
    """Whether fft_conv's multiply-adds (weight transform, per-frequency products, FFTs of x)
    are under half the direct convolution's, on CPU in float32/64 (torch.fft has no CPU
    half-precision kernels; other devices keep their convolution libraries)."""
    if x.device.type != "cpu" or x.dtype not in (torch.float32, torch.float64) or torch.is_autocast_enabled("cpu"):
        return False
    batch, time, channels = x.shape
    out_channels, group_channels, kernel = weight_shape
    length = _fft_length(time + padding)
    freqs = length // 2 + 1
    direct = batch * time * out_channels * group_channels * kernel
    fft = (2 * freqs * kernel + 4 * batch * freqs) * out_channels * group_channels \
        + 2 * batch * channels * length * math.log2(length)
    return 2 * fft < direct


def fft_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, padding: int) -> torch.Tensor:
    """Grouped convolution over time by FFT: x (B, T, C), weight (O, C/G, k) of G groups →
    y (B, T, O), y[t] = bias + Σ_j weight[:, :, j] · x[t + j − padding] (the first T
    frames of Conv1d(padding=padding)'s output).

    x is transformed by an rFFT of length L ≥ T + padding (no wrap-around reaches the kept
    frames); the weight by a matmul with a DFT table, since its k ≪ L taps would make an FFT
    of length L mostly zeros (forward and backward). Per frequency and group, the complex
    product X·W runs as one real matmul: [[Xr, −Xi], [Xi, Xr]] @ [Wr; Wi] = [Yr; Yi]."""
    batch, time, channels = x.shape
    out_channels, group_channels, kernel = weight.shape
    groups = channels // group_channels
    per_group = out_channels // groups
    length = _fft_length(time + padding)
    freqs = length // 2 + 1
    w = weight.view(groups, per_group, group_channels, kernel).permute(0, 3, 2, 1)
    w = torch.matmul(_dft_table(kernel, length, x.dtype, x.device), w.reshape(groups, kernel, -1))
    w = w.view(groups * freqs, 2 * group_channels, per_group)                 # [Wr; Wi] per (g, f)
    xf = torch.fft.rfft(x, n=length, dim=1).view(batch, freqs, groups, group_channels)
    xr, xi = xf.real, xf.imag
    xs = torch.stack([torch.cat([xr, -xi], -1), torch.cat([xi, xr], -1)])     # (2, B, F, G, 2·C/G)
    xs = xs.permute(3, 2, 0, 1, 4).reshape(groups * freqs, 2 * batch, 2 * group_channels)
    ys = torch.bmm(xs, w).view(groups, freqs, 2, batch, per_group)
    y = torch.fft.irfft(torch.complex(ys[:, :, 0], ys[:, :, 1]), n=length, dim=1)  # (G, L, B, O/G)
    start = kernel - 1 - padding
    return y[:, start:start + time].permute(2, 1, 0, 3).reshape(batch, time, out_channels) + bias


def _fft_length(n: int) -> int:
    """The smallest 2^a·3^b·5^c ≥ n: pocketfft's fast sizes, up to 2× shorter than a power of 2."""
    best, p3 = 1 << max(n - 1, 0).bit_length(), 1
    while p3 < best:
        p35 = p3
        while p35 < best:
            best = min(best, p35 << max(0, math.ceil(math.log2(n / p35))))
            p35 *= 5
        p3 *= 3
    return best


@functools.lru_cache(maxsize=16)
def _dft_table(kernel: int, length: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """(2F, k) table whose product with taps w_j is [Re; Im] per frequency f of the length-L
    DFT of the flipped, zero-padded kernel: rows 2f, 2f+1 = cos θ, −sin θ with θ = 2π·f·(k−1−j)/L
    (the flip turns the convolution's correlation into a product of transforms)."""
    with torch.inference_mode(False):  # cached: one made under inference_mode could not be saved for a backward
        freq = torch.arange(length // 2 + 1)[:, None]
        flipped = torch.arange(kernel - 1, -1, -1)[None, :]
        theta = (freq * flipped % length).double() * (2 * math.pi / length)  # exact integer phase first
        return torch.stack([theta.cos(), -theta.sin()], 1).reshape(-1, kernel).to(dtype=dtype, device=device)


class SinusoidalPositionalEncoding(nn.Module):
    """Absolute sinusoidal positions (Vaswani et al., 2017 §3.5), computed for any position:
    PE(p, 2i) = sin(p / 10000^(2i/C)),  PE(p, 2i+1) = cos(p / 10000^(2i/C))."""

    def __init__(self, dim: int):
        super().__init__()
        if dim % 2:
            raise ValueError(f"sinusoidal positions need an even dim, got {dim}")
        inverse_frequency = 1.0 / (10000.0 ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
        self.register_buffer("inverse_frequency", inverse_frequency, persistent=False)

    def forward(self, positions: torch.Tensor) -> torch.Tensor:
        """Integer positions of any shape (...) → (..., C) float32 encodings."""
        angles = positions.to(torch.float32).unsqueeze(-1) * self.inverse_frequency
        return torch.stack([angles.sin(), angles.cos()], dim=-1).flatten(-2)
