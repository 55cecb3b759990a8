"""CTC head (Graves et al., 2006): a linear layer over encoder states, blank = token 0."""

import logging
from dataclasses import replace
from typing import List, Sequence, Tuple

import torch
from torch import nn
import torch.nn.functional as F

from sslasr.decoding.ctc_prefix_beam import ctc_beam_decode
from sslasr.models.interfaces import DecodeOptions

log = logging.getLogger(__name__)


class CtcHead(nn.Module):
    methods = ("ctc_greedy", "ctc_beam", "ctc_lexicon")
    greedy_method = "ctc_greedy"

    def __init__(self, input_dim: int, vocab_size: int, dropout: float = 0.0, blank_id: int = 0):
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.proj = nn.Linear(input_dim, vocab_size)
        self.blank_id = blank_id

    def log_probs(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.log_softmax(self.proj(self.dropout(hidden)).float(), dim=-1)

    def loss(self, hidden: torch.Tensor, lengths: torch.Tensor, tokens: List[List[int]]) -> torch.Tensor:
        """Summed CTC loss over the batch; an utterance without an alignment counts 0, logged."""
        return ctc_loss(self.log_probs(hidden), lengths, tokens, self.blank_id)

    def log_likelihood(self, hidden: torch.Tensor, lengths: torch.Tensor, tokens: List[List[int]]) -> torch.Tensor:
        """(B,) log p(tokens | hidden) summed over alignments; −inf without one (no zero_infinity)."""
        log_probs = self.log_probs(hidden)
        targets, target_lengths = _flat_targets(tokens, log_probs.device)
        return -F.ctc_loss(log_probs.transpose(0, 1), targets, lengths, target_lengths, blank=self.blank_id,
                           reduction="none", zero_infinity=False)

    def decode(self, hidden: torch.Tensor, lengths: torch.Tensor, method: str,
               options: DecodeOptions = DecodeOptions()) -> List[List[int]]:
        if method == "ctc_greedy":
            return self.greedy(hidden, lengths)
        if method == "ctc_beam":  # prefix beam search; shallow fusion when options.lm is set
            return ctc_beam_decode(self.log_probs(hidden), lengths, replace(options, lexicon=None), self.blank_id)
        if method == "ctc_lexicon":  # the same search, restricted to the lexicon's words
            if options.lexicon is None:
                raise ValueError("ctc_lexicon needs a lexicon (sslasr.bin.decode --lexicon words.txt)")
            return ctc_beam_decode(self.log_probs(hidden), lengths, options, self.blank_id)
        raise ValueError(f"CTC head cannot decode with {method!r}; available: {', '.join(self.methods)}")

    def greedy(self, hidden: torch.Tensor, lengths: torch.Tensor) -> List[List[int]]:
        """Best path: argmax per frame, merge repeats, drop blanks."""
        return best_path(self.proj(hidden).argmax(-1), lengths, self.blank_id)


def ctc_loss(log_probs: torch.Tensor, lengths: torch.Tensor, tokens: List[List[int]], blank_id: int = 0) -> torch.Tensor:
    """Summed CTC loss of (B, T, V) log-probabilities. An utterance with fewer frames than its
    tokens need has no alignment: its loss would be +inf, so it counts 0 (zero_infinity) and a
    warning says how many (a subsampling encoder on short, fast speech can get there)."""
    frames = lengths.tolist()  # F.ctc_loss reads the lengths on the host as well
    needed = [ctc_frames_needed(seq) for seq in tokens]
    short = [(f, n) for f, n in zip(frames, needed) if n > f]
    if short:
        log.warning("%d of %d utterances have fewer frames than their transcripts need (e.g. %d, needing %d): "
                    "no CTC alignment, their loss counts 0", len(short), len(tokens), *short[0])
    targets, target_lengths = _flat_targets(tokens, log_probs.device)
    return F.ctc_loss(log_probs.transpose(0, 1), targets, lengths, target_lengths, blank=blank_id,
                      reduction="sum", zero_infinity=True)


def _flat_targets(tokens: List[List[int]], device) -> Tuple[torch.Tensor, torch.Tensor]:
    """F.ctc_loss's concatenated targets and their lengths, on DEVICE."""
    targets = torch.tensor([t for seq in tokens for t in seq], dtype=torch.long, device=device)
    return targets, torch.tensor([len(seq) for seq in tokens], dtype=torch.long, device=device)


def best_path(best: torch.Tensor, lengths: torch.Tensor, blank_id: int = 0) -> List[List[int]]:
    """(B, T) per-frame argmax ids → token lists: merge repeats, drop blanks."""
    results = []
    for path, length in zip(best.tolist(), lengths.tolist()):
        tokens, previous = [], None
        for token in path[:length]:
            if token != previous and token != blank_id:
                tokens.append(token)
            previous = token
        results.append(tokens)
    return results


def ctc_frames_needed(tokens: Sequence[int]) -> int:
    """The fewest frames a CTC alignment of TOKENS takes: one a token, plus a blank between each
    two equal neighbours (without it the repeat would merge into one token)."""
    return len(tokens) + sum(a == b for a, b in zip(tokens, tokens[1:]))
