"""CTC head (Graves et al., 2006): a linear layer over encoder states, blank = token 0."""

from typing import List

import torch
from torch import nn
import torch.nn.functional as F


class CtcHead(nn.Module):
    def __init__(self, input_dim: int, vocab_size: int, dropout: float = 0.0, blank_id: int = 0):
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.proj = nn.Linear(input_dim, vocab_size)
        self.blank_id = blank_id

    def log_probs(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.log_softmax(self.proj(self.dropout(hidden)).float(), dim=-1)

    def loss(self, hidden: torch.Tensor, lengths: torch.Tensor, tokens: List[List[int]]) -> torch.Tensor:
        """Summed CTC loss over the batch. Impossible alignments (more tokens than frames)
        give +inf; they are zeroed (zero_infinity) and the caller counts them."""
        log_probs = self.log_probs(hidden).transpose(0, 1)  # (T, B, V)
        targets = torch.tensor([t for seq in tokens for t in seq], dtype=torch.long)
        target_lengths = torch.tensor([len(seq) for seq in tokens], dtype=torch.long)
        return F.ctc_loss(log_probs, targets.to(hidden.device), lengths, target_lengths.to(hidden.device),
                          blank=self.blank_id, reduction="sum", zero_infinity=True)

    def greedy(self, hidden: torch.Tensor, lengths: torch.Tensor) -> List[List[int]]:
        """Best path: argmax per frame, merge repeats, drop blanks."""
        best = self.proj(hidden).argmax(-1)
        results = []
        for path, length in zip(best.tolist(), lengths.tolist()):
            tokens, previous = [], None
            for token in path[:length]:
                if token != previous and token != self.blank_id:
                    tokens.append(token)
                previous = token
            results.append(tokens)
        return results
