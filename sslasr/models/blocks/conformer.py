"""Conformer encoder (Gulati et al., 2020), as used by w2v-BERT (Chung et al., 2021).

One block, with a half-step ("macaron") feed-forward module on each side:
    x = x + ½·FFN(LN(x))
    x = x + MHSA(LN(x))                    self-attention with relative positions
    x = x + Conv(x)                        LN → pointwise → GLU → depthwise → norm → swish → pointwise
    x = x + ½·FFN(LN(x))
    y = LN(x)
Relative position schemes (`position`):
  "relative"      Transformer-XL (Dai et al. 2019 §3.3), the Conformer paper's: with sinusoids
                  p_r of the offset r = i − j, a learned W_p and per-head biases u, v,
                    a_ij = [ (q_i + u)·k_j + (q_i + v)·W_p p_{i−j} ] / √d
  "relative_key"  Shaw et al. 2018, the w2v-BERT 2.0 checkpoints': a learned vector e per
                  clipped offset, a_ij = [ q_i·k_j + q_i·e_{clip(j−i, −left, right)} ] / √d
  "none"          plain dot-product attention.
The convolution module's norm is BatchNorm in the paper ("batch", its statistics taken over
real frames only) or LayerNorm ("layer", w2v-BERT 2.0); its depthwise convolution is centred,
or causal (left context only) as in w2v-BERT 2.0.
"""

from dataclasses import dataclass
from typing import List, Optional

import torch
from torch import nn
import torch.nn.functional as F

from sslasr.models.blocks.dropout import Dropout, attention, masked_key_bias
from sslasr.models.blocks.positional import SinusoidalPositionalEncoding
from sslasr.models.blocks.time_conv import conv_over_time
from sslasr.models.blocks.transformer import FeedForward, MultiHeadSelfAttention

POSITION_TYPES = ("relative", "relative_key", "none")
CONV_NORMS = ("batch", "layer")


@dataclass
class ConformerConfig:
    """Defaults: the Conformer XL that w2v-BERT XL uses (24 blocks of dim 1024, 8 heads,
    depthwise kernel 5; Zhang et al. 2020)."""

    dim: int = 1024
    layers: int = 24
    heads: int = 8
    ffn_dim: int = 4096
    conv_kernel: int = 5
    conv_norm: str = "batch"
    conv_causal: bool = False
    conv_bias: bool = True           # pointwise and depthwise convolutions (w2v-BERT 2.0: none)
    position: str = "relative"
    left_max_position: int = 64      # relative_key: offsets clipped to [−left, right]
    right_max_position: int = 8
    dropout: float = 0.1             # on each module's output, and on the stack's input
    attention_dropout: float = 0.1
    # on the attention module's output; None: `dropout`, as on the other modules' outputs (ESPnet,
    # fairseq); transformers' Wav2Vec2Bert uses its attention_dropout there
    attention_output_dropout: Optional[float] = None
    activation_dropout: float = 0.1
    conv_dropout: float = 0.1
    layerdrop: float = 0.0
    layer_norm_eps: float = 1e-5

    def __post_init__(self):
        if self.position not in POSITION_TYPES:
            raise ValueError(f"conformer position must be one of {POSITION_TYPES}, got {self.position!r}")
        if self.conv_norm not in CONV_NORMS:
            raise ValueError(f"conformer conv_norm must be one of {CONV_NORMS}, got {self.conv_norm!r}")
        if self.conv_kernel % 2 == 0 and not self.conv_causal:
            raise ValueError(f"a centred depthwise convolution needs an odd kernel, got {self.conv_kernel}")
        if self.dim % self.heads:
            raise ValueError(f"conformer dim {self.dim} is not divisible by heads {self.heads}")


class RelativePositionSelfAttention(MultiHeadSelfAttention):
    """Multi-head self-attention plus a relative-position term in the logits (see the module
    docstring); SDPA takes that term, with −∞ at padded keys, as its additive mask."""

    def __init__(self, dim: int, heads: int, dropout: float, position: str, left: int = 64, right: int = 8):
        super().__init__(dim, heads, dropout)
        self.position = position
        head_dim = dim // heads
        if position == "relative":
            self.sinusoids = SinusoidalPositionalEncoding(dim)
            self.pos_proj = nn.Linear(dim, dim, bias=False)                   # W_p
            self.pos_bias_u = nn.Parameter(torch.empty(heads, head_dim))
            self.pos_bias_v = nn.Parameter(torch.empty(heads, head_dim))
            nn.init.xavier_uniform_(self.pos_bias_u)
            nn.init.xavier_uniform_(self.pos_bias_v)
        elif position == "relative_key":
            self.left, self.right = left, right
            self.distance_embedding = nn.Embedding(left + right + 1, head_dim)  # e_{−left} .. e_{right}

    def forward(self, x: torch.Tensor, padding_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x (B, T, C), padding_mask (B, T) True = pad → (B, T, C)."""
        batch, time, dim = x.shape
        q, k, v = self._project_qkv(x)                                      # (B, H, T, d) each
        # 1/√d scales q (B, H, T, d) (and u, v) before the products, not the (B, H, T, T) logits
        scale = q.shape[-1] ** -0.5
        q = q * scale
        bias = None
        if self.position == "relative":
            offsets = torch.arange(time - 1, -time, -1, device=x.device)      # r = T−1 .. −(T−1)
            p = self.pos_proj(self.sinusoids(offsets).to(x.dtype))             # (2T−1, C)
            p = p.view(2 * time - 1, self.heads, -1).permute(1, 2, 0)           # (H, d, 2T−1)
            scores = (q + self.pos_bias_v[:, None].to(q.dtype) * scale) @ p   # (B, H, T, 2T−1)
            bias = _shift_offsets(scores)                                     # column T−1−(i−j)
            q = q + self.pos_bias_u[:, None].to(q.dtype) * scale
        elif self.position == "relative_key":
            scores = q @ self.distance_embedding.weight.to(q.dtype).t()        # (B, H, T, left+1+right)
            clipped = (-_offsets(time, x.device)).clamp(-self.left, self.right)  # j − i
            bias = _gather_offsets(scores, clipped + self.left)
        if padding_mask is not None:  # None for a batch without padding (ConformerEncoder.blocks_mask)
            pad = torch.zeros(batch, 1, 1, time, dtype=q.dtype, device=x.device)
            pad = pad.masked_fill(padding_mask[:, None, None, :], masked_key_bias(q.dtype))
            bias = pad if bias is None else bias + pad
        y = attention(q, k, v, bias, self.dropout if self.training else 0.0, scale=1.0)
        return self.out_proj(y.transpose(1, 2).reshape(batch, time, dim))


def _offsets(time: int, device) -> torch.Tensor:
    """(T, T) matrix of i − j (query i, key j)."""
    positions = torch.arange(time, device=device)
    return positions[:, None] - positions[None, :]


def _shift_offsets(scores: torch.Tensor) -> torch.Tensor:
    """scores (B, H, T, 2T−1), column c for offset i − j = T−1−c → (B, H, T, T) with entry
    [i, j] = scores[i, T−1−i+j] (Transformer-XL's "relative shift"). In the row-major storage
    that entry sits at i·(2T−1) + T−1−i+j = (T−1) + i·(2T−2) + j, so it is a view: skip T−1
    elements, read rows of 2T−2, keep the first T of each. Unlike a gather, its backward is a
    strided copy, not an index scatter-add."""
    batch, heads, time, width = scores.shape
    if width != 2 * time - 1:
        raise ValueError(f"expected 2T−1 = {2 * time - 1} offset columns, got {width}")
    if time == 1:
        return scores
    flat = scores.contiguous().view(batch, heads, time * width)
    return flat.narrow(-1, time - 1, time * (width - 1)).view(batch, heads, time, width - 1)[..., :time]


def _gather_offsets(scores: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
    """scores (B, H, T, R) per query and offset bucket, columns (T, T) the bucket of each
    (query, key) pair → (B, H, T, T). Scoring R ≪ T² buckets and gathering is cheaper than
    materialising a (T, T, d) table of offset vectors."""
    batch, heads, time, _ = scores.shape
    return scores.gather(-1, columns.expand(batch, heads, time, time))


class MaskedBatchNorm1d(nn.BatchNorm1d):
    """BatchNorm over the channels of (B, T, C) whose training statistics come from real frames
    only, so padding changes neither the batch's output nor the running averages; padded frames
    come out as zeros. The statistics are sums weighted by the real-frame mask rather than
    BatchNorm over the selected frames: selecting them would read the frame count back from an
    accelerator in every block, forward and backward."""

    def forward(self, x: torch.Tensor, padding_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        if padding_mask is None and (x.shape[0] * x.shape[1] > 1 or not self.training):
            return super().forward(x.reshape(-1, x.shape[-1])).view_as(x)
        if padding_mask is None:  # one frame in all (BatchNorm refuses to train on it): as a padded batch would
            padding_mask = torch.zeros(x.shape[:2], dtype=torch.bool, device=x.device)
        real = (~padding_mask).unsqueeze(-1)
        xf = x.float()  # statistics in float32, as BatchNorm's under autocast
        if self.training or not self.track_running_stats:
            count = real.sum()
            frames = count.clamp(min=1)  # no real frame: mean, var 0 (not 0/0), outputs 0 and no NaN gradient
            mean = (xf * real).sum((0, 1)) / frames
            var = ((xf - mean).square() * real).sum((0, 1)) / frames  # biased, to normalise
            if self.training and self.track_running_stats:
                self._update_running_stats(mean, var, count)
        else:
            mean, var = self.running_mean, self.running_var
        y = (xf - mean) * torch.rsqrt(var + self.eps)
        if self.affine:
            y = y * self.weight + self.bias
        return y.to(x.dtype).masked_fill(~real, 0.0)

    @torch.no_grad()
    def _update_running_stats(self, mean: torch.Tensor, var: torch.Tensor, count: torch.Tensor) -> None:
        """As nn.BatchNorm1d: momentum (or, with momentum None, a cumulative average) towards the
        batch mean and the unbiased batch variance. A batch without real frames (utterances
        shorter than the subsampling's receptive field) has no statistics (0/0), one of a single
        frame no unbiased variance: it leaves the averages as they are, where they would have
        become NaN for good."""
        has_frames = count > 1  # (one frame has no unbiased variance: nn.BatchNorm1d refuses it)
        self.num_batches_tracked.add_(has_frames.to(self.num_batches_tracked.dtype))
        momentum = 1.0 / float(self.num_batches_tracked.clamp(min=1)) if self.momentum is None else self.momentum
        unbiased = var * count / (count - 1).clamp(min=1)
        for average, batch_value in ((self.running_mean, mean), (self.running_var, unbiased)):
            average.copy_(torch.where(has_frames, average.lerp(batch_value.to(average.dtype), momentum), average))


class ConvolutionModule(nn.Module):
    """LN → pointwise conv to 2C → GLU → depthwise conv → norm → swish → pointwise conv → dropout.
    Pointwise convolutions are Linear layers on (B, T, C); padded frames are zeroed before the
    depthwise convolution so that they never reach real frames."""

    def __init__(self, cfg: ConformerConfig):
        super().__init__()
        dim, kernel = cfg.dim, cfg.conv_kernel
        self.layer_norm = nn.LayerNorm(dim, eps=cfg.layer_norm_eps)
        self.pointwise1 = nn.Linear(dim, 2 * dim, bias=cfg.conv_bias)
        self.depthwise = nn.Conv1d(dim, dim, kernel, groups=dim, bias=cfg.conv_bias)
        self.left_pad = kernel - 1 if cfg.conv_causal else (kernel - 1) // 2
        self.right_pad = kernel - 1 - self.left_pad
        if cfg.conv_norm == "batch":
            self.norm = MaskedBatchNorm1d(dim, eps=cfg.layer_norm_eps)
        else:
            self.norm = nn.LayerNorm(dim, eps=cfg.layer_norm_eps)
        self.pointwise2 = nn.Linear(dim, dim, bias=cfg.conv_bias)
        self.dropout = Dropout(cfg.conv_dropout, inplace=True)  # on a Linear output

    def forward(self, x: torch.Tensor, padding_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        x = F.glu(self.pointwise1(self.layer_norm(x)), dim=-1)
        if padding_mask is not None:
            x = x.masked_fill(padding_mask.unsqueeze(-1), 0.0)
        x = self._depthwise(F.pad(x, (0, 0, self.left_pad, self.right_pad))).transpose(1, 2)  # (B, T, C)
        x = self.norm(x, padding_mask) if isinstance(self.norm, MaskedBatchNorm1d) else self.norm(x)
        return self.dropout(self.pointwise2(F.silu(x)))

    def _depthwise(self, x: torch.Tensor) -> torch.Tensor:
        """self.depthwise over padded (B, T + k − 1, C) frames → (B, C, T), by `conv_over_time`
        (the layout each device's library is fastest on). Under CPU autocast it runs in float32:
        oneDNN's bf16 depthwise kernel on the CPU's layout took minutes per batch once T passed
        ~100 frames (measured, torch 2.13), and its few multiply-adds gain nothing from bf16."""
        weight, bias, groups = self.depthwise.weight, self.depthwise.bias, self.depthwise.groups
        if x.device.type == "cpu" and torch.is_autocast_enabled("cpu"):
            with torch.autocast("cpu", enabled=False):
                return conv_over_time(x.float(), weight.float(), None if bias is None else bias.float(), groups=groups)
        return conv_over_time(x, weight, bias, groups=groups)


class ConformerBlock(nn.Module):
    def __init__(self, cfg: ConformerConfig):
        super().__init__()
        dim, eps = cfg.dim, cfg.layer_norm_eps
        self.ffn1_norm = nn.LayerNorm(dim, eps=eps)
        self.ffn1 = FeedForward(dim, cfg.ffn_dim, cfg.activation_dropout, activation=F.silu)
        self.attention_norm = nn.LayerNorm(dim, eps=eps)
        self.attention = RelativePositionSelfAttention(dim, cfg.heads, cfg.attention_dropout, cfg.position,
                                                       cfg.left_max_position, cfg.right_max_position)
        self.conv = ConvolutionModule(cfg)
        self.ffn2_norm = nn.LayerNorm(dim, eps=eps)
        self.ffn2 = FeedForward(dim, cfg.ffn_dim, cfg.activation_dropout, activation=F.silu)
        self.final_norm = nn.LayerNorm(dim, eps=eps)
        self.dropout = Dropout(cfg.dropout, inplace=True)  # on Linear outputs only
        attention_output = cfg.dropout if cfg.attention_output_dropout is None else cfg.attention_output_dropout
        self.attention_dropout = Dropout(attention_output, inplace=True)

    def forward(self, x: torch.Tensor, padding_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        x = x + 0.5 * self.dropout(self.ffn1(self.ffn1_norm(x)))
        x = x + self.attention_dropout(self.attention(self.attention_norm(x), padding_mask))
        x = x + self.conv(x, padding_mask)
        x = x + 0.5 * self.dropout(self.ffn2(self.ffn2_norm(x)))
        return self.final_norm(x)


class ConformerEncoder(nn.Module):
    """A stack of ConformerBlock with LayerDrop. `run_blocks` runs any slice of the stack, so a
    pretraining objective can read intermediate outputs (w2v-BERT's contrastive module)."""

    def __init__(self, cfg: ConformerConfig):
        super().__init__()
        self.cfg = cfg
        self.dropout = Dropout(cfg.dropout)
        self.layers = nn.ModuleList(ConformerBlock(cfg) for _ in range(cfg.layers))

    def embed(self, x: torch.Tensor, padding_mask: Optional[torch.Tensor]) -> torch.Tensor:
        """The stack's input: padded frames zeroed, dropout."""
        if padding_mask is not None:
            x = x.masked_fill(padding_mask.unsqueeze(-1), 0.0)
        return self.dropout(x)

    @staticmethod
    def blocks_mask(padding_mask: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """The padding mask the blocks take: None for a batch without padding, which spares them
        the attention bias and the masked BatchNorm. Decided once per batch (a read of the
        device), not in every block."""
        return None if padding_mask is None or not bool(padding_mask.any()) else padding_mask

    def run_blocks(self, x: torch.Tensor, padding_mask: Optional[torch.Tensor], blocks: nn.ModuleList,
                   return_all: bool = False):
        """x through `blocks` (a slice of self.layers), padding_mask as blocks_mask gives it.
        Returns the output, or with return_all the list [x, output of each block run]."""
        states: List[torch.Tensor] = [x]
        for block in blocks:
            if self.training and self.cfg.layerdrop > 0 and torch.rand(()) < self.cfg.layerdrop:
                continue
            x = block(x, padding_mask)
            states.append(x)
        return states if return_all else x

    def forward(self, x: torch.Tensor, padding_mask: Optional[torch.Tensor] = None, return_all: bool = False):
        """x (B, T, C), padding_mask (B, T) True = pad → last block's output, or with return_all
        [stack input, output of block 1, ..., output of the last block]."""
        padding_mask = self.blocks_mask(padding_mask)
        return self.run_blocks(self.embed(x, padding_mask), padding_mask, self.layers, return_all)
