"""Gumbel-softmax product quantizer (wav2vec 2.0 §2, after Jang et al. 2016).

G codebooks of V entries. The latent z is projected to G·V logits l; in training
  p_{g,v} = exp((l_{g,v} + n_v)/τ) / Σ_k exp((l_{g,k} + n_k)/τ),  n = −log(−log u),
the forward pass takes the hard argmax (straight-through gradient of the soft p).
The chosen entries e_1..e_G are concatenated: q = [e_1; ...; e_G] of size `dim`.
τ anneals: τ = max(τ_max · decay^updates, τ_min).
The diversity loss L_d = (GV − Σ_g exp(−Σ_v p̄_{g,v} log p̄_{g,v})) / GV uses the softmax
probabilities p̄ averaged over the batch (without noise): it pushes toward uniform code use.
"""

from dataclasses import dataclass
from typing import Tuple

import torch
from torch import nn
import torch.nn.functional as F


@dataclass
class QuantizerOutput:
    quantized: torch.Tensor       # (N, dim)
    codes: torch.Tensor           # (N, G) chosen entry per group
    prob_perplexity: torch.Tensor  # Σ_g perplexity of the batch-averaged softmax
    code_perplexity: torch.Tensor  # Σ_g perplexity of the hard code histogram
    num_vars: int                  # G·V

    @property
    def diversity_loss(self) -> torch.Tensor:
        return (self.num_vars - self.prob_perplexity) / self.num_vars


class GumbelProductQuantizer(nn.Module):
    def __init__(self, input_dim: int, groups: int, entries: int, dim: int,
                 temperature: Tuple[float, float, float] = (2.0, 0.5, 0.999995)):
        super().__init__()
        if dim % groups:
            raise ValueError(f"quantizer dim {dim} must be divisible by groups {groups}")
        self.groups, self.entries = groups, entries
        self.max_temp, self.min_temp, self.temp_decay = temperature
        self.temperature = self.max_temp
        self.codevectors = nn.Parameter(torch.empty(1, groups * entries, dim // groups).uniform_())
        self.weight_proj = nn.Linear(input_dim, groups * entries)
        nn.init.normal_(self.weight_proj.weight, mean=0.0, std=1.0)
        nn.init.zeros_(self.weight_proj.bias)

    def set_num_updates(self, num_updates: int) -> None:
        self.temperature = max(self.max_temp * self.temp_decay ** num_updates, self.min_temp)

    @staticmethod
    def _perplexity(probs: torch.Tensor) -> torch.Tensor:
        """probs (G, V) → Σ_g exp(entropy_g)."""
        return torch.exp(-(probs * torch.log(probs + 1e-7)).sum(-1)).sum()

    def forward(self, x: torch.Tensor) -> QuantizerOutput:
        """x (N, input_dim) → quantized (N, dim)."""
        n = x.shape[0]
        # fp32 logits under autocast too: in bf16 (|logit| ~ 100 rounds by ~0.5, as much as the
        # Gumbel noise) ~2 % of argmax codes -- w2v-BERT's MLM targets -- came out other than fp32's
        with torch.autocast(x.device.type, enabled=False):
            logits = self.weight_proj(x.float()).view(n * self.groups, self.entries)
        codes = logits.argmax(-1)
        hard = F.one_hot(codes, self.entries).to(logits.dtype)
        code_ppl = self._perplexity(hard.view(n, self.groups, self.entries).mean(0))
        soft = torch.softmax(logits.float(), -1).view(n, self.groups, self.entries).mean(0)
        prob_ppl = self._perplexity(soft)
        if self.training:
            onehot = F.gumbel_softmax(logits.float(), tau=self.temperature, hard=True).type_as(logits)
        else:
            onehot = hard
        # (N·G, V) one-hots select rows of the codebook of their group: per group a (N, V) @ (V, d)
        # product, Σ_v onehot_v·e_v, without materialising the (N, G·V, d) products.
        dtype = torch.promote_types(onehot.dtype, self.codevectors.dtype)
        codebook = self.codevectors.to(dtype).view(self.groups, self.entries, -1)
        onehot = onehot.to(dtype).view(n, self.groups, self.entries).transpose(0, 1)
        with torch.autocast(x.device.type, enabled=False):  # keep the elementwise-product precision
            quantized = torch.bmm(onehot, codebook).transpose(0, 1).reshape(n, -1)
        return QuantizerOutput(quantized, codes.view(n, self.groups), prob_ppl, code_ppl,
                               self.groups * self.entries)
