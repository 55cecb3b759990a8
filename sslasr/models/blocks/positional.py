"""Convolutional relative positional embedding (wav2vec 2.0 §2, after Mohamed et al. 2019).

A wide grouped convolution over the frame sequence, weight-normalised, added to its input:
x ← x + GELU(conv(x)). It replaces absolute position embeddings.
"""

import torch
from torch import nn
import torch.nn.functional as F


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

        self.conv's maths, run as a 2-D convolution over a (B, C, 1, T) view of x: that view is
        channels-last in memory, which oneDNN's grouped convolution takes without relayout (and
        runs, forward and backward, 2-3× faster on CPU than Conv1d on the transposed input)."""
        conv = self.conv
        y = F.conv2d(x.transpose(1, 2).unsqueeze(2), conv.weight.unsqueeze(2), conv.bias,
                     padding=(0, conv.padding[0]), groups=conv.groups).squeeze(2)
        if self.trim:
            y = y[:, :, : -self.trim]
        return self.act(y).transpose(1, 2)


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
