"""Fbank front ends of Conformer encoders: frame-rate reduction, then a projection to the model dim.

Two reductions, each a module with `output_dim` and `output_lengths(lengths)`:
  Conv2dSubsampling (w2v-BERT §3.1, "feature encoder"): two 3×3 conv2d layers, both with
      stride (2, 2), ReLU after each: 4× fewer frames (10 ms → 40 ms) and 4× fewer bins;
      the C channels × F' bins of a frame are flattened into one vector.
  FrameStacking (transformers' Wav2Vec2BertModel / w2v-BERT 2.0): concatenate s consecutive
      frames, s× fewer frames (80 bins × 2 → 160 values every 20 ms); a trailing remainder of
      fewer than s frames is dropped, as SeamlessM4TFeatureExtractor does.
FeatureProjection then maps a frame to the model dim: LayerNorm → Linear → dropout.
"""

from dataclasses import dataclass

import torch
from torch import nn
import torch.nn.functional as F

from sslasr.models.blocks.conv_extractor import lengths_to_padding_mask
from sslasr.models.blocks.dropout import Dropout

SUBSAMPLING_TYPES = ("conv2d", "stack")


@dataclass
class SubsamplingConfig:
    type: str = "conv2d"  # "conv2d" (paper) or "stack" (w2v-BERT 2.0 checkpoints)
    channels: int = 128   # conv2d: channels of both convolutions
    stack: int = 2        # stack: frames concatenated into one

    def __post_init__(self):
        if self.type not in SUBSAMPLING_TYPES:
            raise ValueError(f"subsampling type must be one of {SUBSAMPLING_TYPES}, got {self.type!r}")
        if self.channels < 1 or self.stack < 1:
            raise ValueError(f"subsampling channels and stack must be ≥ 1, got {self.channels}, {self.stack}")


class Conv2dSubsampling(nn.Module):
    """(B, T, F) → (B, T', C·F'): valid (unpadded) 3×3 convolutions with stride 2 on time and
    frequency. Output frame t reads input frames 4t .. 4t+6 only, so the frames inside an
    utterance's output length never see its padding."""

    kernel, stride = 3, 2

    def __init__(self, input_dim: int, channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(1, channels, self.kernel, stride=self.stride)
        self.conv2 = nn.Conv2d(channels, channels, self.kernel, stride=self.stride)
        bins = self._reduce(self._reduce(input_dim))
        if bins < 1:
            raise ValueError(f"conv2d subsampling needs at least 7 feature bins, got {input_dim}")
        self.output_dim = channels * bins
        self.receptive_field = 7

    @classmethod
    def _reduce(cls, size):
        """Output size of one valid conv: ⌊(n − k) / s⌋ + 1 = ⌊(n − 1) / 2⌋ for k = 3, s = 2."""
        return (size - cls.kernel) // cls.stride + 1

    def output_lengths(self, lengths: torch.Tensor) -> torch.Tensor:
        return self._reduce(self._reduce(lengths)).clamp(min=0)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv1(features.unsqueeze(1)))   # (B, C, T/2, F/2)
        x = F.relu(self.conv2(x))                       # (B, C, T', F')
        return x.permute(0, 2, 1, 3).flatten(2)         # (B, T', C·F')


class FrameStacking(nn.Module):
    """(B, T, F) → (B, ⌊T/s⌋, s·F): frames s·t .. s·t+s−1 side by side (no parameters)."""

    def __init__(self, input_dim: int, stack: int):
        super().__init__()
        self.stack = stack
        self.output_dim = input_dim * stack
        self.receptive_field = stack

    def output_lengths(self, lengths: torch.Tensor) -> torch.Tensor:
        return torch.div(lengths, self.stack, rounding_mode="floor")

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        batch, frames, bins = features.shape
        kept = frames - frames % self.stack
        return features[:, :kept].reshape(batch, kept // self.stack, self.stack * bins)


def normalize_fbank_bins(features: torch.Tensor, lengths: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Zero mean, unit variance per feature bin over each utterance's real frames (unbiased
    variance, as SeamlessM4TFeatureExtractor prepares w2v-BERT 2.0 inputs); padding becomes 0.
    It also removes any constant offset of the log-mel scale (e.g. int16 vs float waveforms)."""
    valid = ~lengths_to_padding_mask(lengths, features.shape[1]).unsqueeze(-1)
    count = lengths.clamp(min=1).to(features.dtype)[:, None, None]
    mean = (features * valid).sum(1, keepdim=True) / count
    var = (((features - mean) * valid) ** 2).sum(1, keepdim=True) / (count - 1).clamp(min=1)
    return (features - mean) / torch.sqrt(var + eps) * valid


def build_subsampling(input_dim: int, cfg: SubsamplingConfig) -> nn.Module:
    if cfg.type == "conv2d":
        return Conv2dSubsampling(input_dim, cfg.channels)
    return FrameStacking(input_dim, cfg.stack)


class FeatureProjection(nn.Module):
    """LayerNorm over a subsampled frame, then Linear to the model dim (then dropout). The two
    steps are separate attributes because w2v-BERT pretraining quantizes the normalised frames
    and replaces masked ones between them."""

    def __init__(self, input_dim: int, dim: int, dropout: float, eps: float = 1e-5):
        super().__init__()
        self.norm = nn.LayerNorm(input_dim, eps=eps)
        self.linear = nn.Linear(input_dim, dim)
        self.dropout = Dropout(dropout)

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.linear(self.norm(frames)))
