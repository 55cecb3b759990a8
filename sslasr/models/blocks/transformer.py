"""Transformer encoder used by wav2vec 2.0 / HuBERT (and, with a position bias, WavLM).

Two layer orders, both from the papers' released models:
  post-LN (BERT/base):  x = LN(x + MHA(x));  x = LN(x + FFN(x))
  pre-LN  (large):      x = x + MHA(LN(x));  x = x + FFN(LN(x));  final LN after the stack
Attention uses PyTorch's fused scaled_dot_product_attention (in CPU training with dropout,
`blocks.dropout.attention`: the same maths, faster there).
"""

from dataclasses import dataclass
from typing import Callable, List, Optional, Tuple

import torch
from torch import nn
import torch.nn.functional as F

from sslasr.models.blocks.dropout import Dropout, attention, masked_key_bias
from sslasr.models.blocks.positional import ConvPositionalEmbedding
from sslasr.models.blocks.relative_position import scaled_softmax_attention


@dataclass
class TransformerConfig:
    dim: int = 768
    layers: int = 12
    heads: int = 12
    ffn_dim: int = 3072
    dropout: float = 0.1
    attention_dropout: float = 0.1
    activation_dropout: float = 0.0
    layer_norm_first: bool = False
    layerdrop: float = 0.0
    pos_conv_kernel: int = 128
    pos_conv_groups: int = 16
    # WavLM's fp16 guard (α = 32 there): fp16 attention runs as scaled_softmax_attention; 0 = off
    softmax_alpha: float = 0.0


class MultiHeadSelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int, dropout: float, softmax_alpha: float = 0.0):
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} is not divisible by heads {heads}")
        self.heads, self.dropout = heads, dropout
        self.softmax_alpha = softmax_alpha
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)

    def _project_qkv(self, x: torch.Tensor):
        """(B, T, C) → q, k, v each (B, H, T, d). The three projections as one matmul with the
        stacked weights: same maths, one pass over x forward and one matmul each for ∂x and ∂W
        backward instead of three."""
        batch, time, dim = x.shape
        weight = torch.cat([self.q_proj.weight, self.k_proj.weight, self.v_proj.weight])
        bias = torch.cat([self.q_proj.bias, self.k_proj.bias, self.v_proj.bias])
        qkv = F.linear(x, weight, bias).view(batch, time, 3, self.heads, dim // self.heads)
        return qkv.permute(2, 0, 3, 1, 4).unbind(0)

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor]) -> torch.Tensor:
        """x (B, T, C); attn_mask broadcastable to (B, H, T, T): bool keep-mask or additive bias."""
        batch, time, dim = x.shape
        q, k, v = self._project_qkv(x)
        if attn_mask is not None and attn_mask.is_floating_point() and attn_mask.dtype != q.dtype:
            # an additive bias, in the dtype autocast gave q; float32's masked keys would be −inf in fp16
            attn_mask = attn_mask.to(q.dtype).clamp_(min=masked_key_bias(q.dtype))
        dropout = self.dropout if self.training else 0.0
        if self.softmax_alpha > 0 and q.dtype == torch.float16:
            y = scaled_softmax_attention(q, k, v, attn_mask, self.softmax_alpha, dropout)
        else:
            y = attention(q, k, v, attn_mask, dropout)
        return self.out_proj(y.transpose(1, 2).reshape(batch, time, dim))

    def forward_step(self, x: torch.Tensor, cache: Tuple[torch.Tensor, torch.Tensor],
                     keep: torch.Tensor) -> Tuple[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
        """Incremental (causal) attention of the newest position over itself and the cached ones.
        x (B, 1, C); cache = (keys, values) of the earlier positions, each (B, H, t, d), t ≥ 0;
        keep (B, t + 1) True where a key may be attended (the last column is x itself).
        Returns y (B, 1, C) and the cache with x's key and value appended."""
        batch, _, dim = x.shape
        q, k, v = self._project_qkv(x)
        keys, values = torch.cat([cache[0], k], dim=2), torch.cat([cache[1], v], dim=2)
        y = F.scaled_dot_product_attention(q, keys, values, attn_mask=keep[:, None, None, :])
        return self.out_proj(y.transpose(1, 2).reshape(batch, 1, dim)), (keys, values)


class FeedForward(nn.Module):
    """Linear → activation → dropout → Linear: GELU in the Transformer, swish in the Conformer."""

    def __init__(self, dim: int, hidden: int, activation_dropout: float, activation=F.gelu):
        super().__init__()
        self.intermediate = nn.Linear(dim, hidden)
        self.output = nn.Linear(hidden, dim)
        self.dropout = Dropout(activation_dropout, inplace=True)  # on GELU/SiLU's output, which they do not keep
        self.activation = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.output(self.dropout(self.activation(self.intermediate(x))))


class TransformerLayer(nn.Module):
    """position_gate: an optional module (attention input (B, T, C), shared bias (H, T, T)) →
    this layer's additive attention bias (B, H, T, T), e.g. WavLM's gated relative position
    bias; without one a shared bias passed to forward is added as it is."""

    def __init__(self, cfg: TransformerConfig, position_gate: Optional[nn.Module] = None):
        super().__init__()
        self.layer_norm_first = cfg.layer_norm_first
        self.attention = MultiHeadSelfAttention(cfg.dim, cfg.heads, cfg.attention_dropout, cfg.softmax_alpha)
        self.position_gate = position_gate
        self.attention_norm = nn.LayerNorm(cfg.dim)
        self.feed_forward = FeedForward(cfg.dim, cfg.ffn_dim, cfg.activation_dropout)
        self.final_norm = nn.LayerNorm(cfg.dim)
        self.dropout = Dropout(cfg.dropout, inplace=True)  # on Linear outputs only

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor],
                position_bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        """attn_mask: bool keep-mask broadcastable to (B, H, T, T) or None; position_bias
        (H, T, T) additive, shared by the layers, or None."""
        if self.layer_norm_first:
            x = x + self.dropout(self._attend(self.attention_norm(x), attn_mask, position_bias))
            return x + self.dropout(self.feed_forward(self.final_norm(x)))
        x = self.attention_norm(x + self.dropout(self._attend(x, attn_mask, position_bias)))
        return self.final_norm(x + self.dropout(self.feed_forward(x)))

    def _attend(self, h: torch.Tensor, attn_mask: Optional[torch.Tensor],
                position_bias: Optional[torch.Tensor]) -> torch.Tensor:
        if position_bias is None:
            return self.attention(h, attn_mask)
        bias = self.position_gate(h, position_bias) if self.position_gate is not None else position_bias
        if attn_mask is not None:  # padded keys: finite (−inf: NaN for a frameless row)
            bias = bias.masked_fill(~attn_mask, masked_key_bias(bias.dtype))
        return self.attention(h, bias)

    def forward_step(self, x: torch.Tensor, cache: Tuple[torch.Tensor, torch.Tensor],
                     keep: torch.Tensor) -> Tuple[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
        """One new position x (B, 1, C) of a causal stack, attending to the cached keys/values
        (see MultiHeadSelfAttention.forward_step); equals forward() with a causal mask."""
        if self.layer_norm_first:
            y, cache = self.attention.forward_step(self.attention_norm(x), cache, keep)
            x = x + self.dropout(y)
            return x + self.dropout(self.feed_forward(self.final_norm(x))), cache
        y, cache = self.attention.forward_step(x, cache, keep)
        x = self.attention_norm(x + self.dropout(y))
        return self.final_norm(x + self.dropout(self.feed_forward(x))), cache


class TransformerEncoder(nn.Module):
    """Conv positional embedding + a stack of TransformerLayer with LayerDrop."""

    def __init__(self, cfg: TransformerConfig, position_bias: Optional[nn.Module] = None,
                 position_gate: Optional[Callable[[], nn.Module]] = None):
        """position_bias: optional module T → (H, T, T) additive attention bias, computed once
        per forward and shared by every layer (WavLM); position_gate: optional factory of each
        layer's module that adapts it (see TransformerLayer)."""
        super().__init__()
        self.cfg = cfg
        self.pos_conv = ConvPositionalEmbedding(cfg.dim, cfg.pos_conv_kernel, cfg.pos_conv_groups)
        self.layer_norm = nn.LayerNorm(cfg.dim)
        self.dropout = Dropout(cfg.dropout)
        self.position_bias = position_bias
        self.layers = nn.ModuleList(TransformerLayer(cfg, position_gate() if position_gate else None)
                                    for _ in range(cfg.layers))

    def forward(
        self, x: torch.Tensor, padding_mask: Optional[torch.Tensor] = None, return_all: bool = False
    ):
        """x (B, T, C), padding_mask (B, T) True=pad. Returns the last layer output, or with
        return_all the list [input to layer 1, output of layer 1, ..., final output]."""
        if padding_mask is not None:
            x = x.masked_fill(padding_mask.unsqueeze(-1), 0.0)
        x = x + self.pos_conv(x)
        if not self.cfg.layer_norm_first:
            x = self.layer_norm(x)
        x = self.dropout(x)
        # Without padding, no mask: the same attention, without SDPA's masking passes.
        attn_mask = None if padding_mask is None or not padding_mask.any() else ~padding_mask[:, None, None, :]
        # Computed before the layers, so LayerDrop can skip any of them (the first included)
        position_bias = self.position_bias(x.shape[1]) if self.position_bias is not None else None
        states: List[torch.Tensor] = [x]
        for layer in self.layers:
            if self.training and self.cfg.layerdrop > 0 and torch.rand(()) < self.cfg.layerdrop:
                continue
            x = layer(x, attn_mask) if position_bias is None else layer(x, attn_mask, position_bias)
            states.append(x)
        if self.cfg.layer_norm_first:
            x = self.layer_norm(x)
            states[-1] = x
        return states if return_all else x
