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
