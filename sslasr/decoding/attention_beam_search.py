"""One-pass joint CTC/attention beam search (Watanabe et al., 2017, "Hybrid CTC/Attention
Architecture for End-to-End Speech Recognition", Sec. IV-B), with optional shallow fusion:

    score(h) = (1−λ)·log p_att(h | X) + λ·log ψ_ctc(h | X) + μ·log p_LM(h) + β·|h|

Every step, each utterance's `beam` running hypotheses are extended by <eos> and by the tokens
that (1−λ)·log p_att + μ·log p_LM ranks highest (the pre-beam: ceil(1.5·beam) tokens as in
ESPnet; all tokens when λ = 1, where attention has no say; `beam` tokens when λ = 0, which is
exact). CTC prefix scores (sslasr/decoding/ctc_prefix_score.py) rescore the extensions; every
<eos> extension is a finished hypothesis, and the best `beam` others keep running. An utterance
stops at its maximum length (max_len_ratio × frames, where only <eos> is allowed), when no
running hypothesis can still beat the best finished one (every term but β·|h| only falls as h
grows, so this is exact for β ≤ 0), or, for β > 0, where there is no exact stop, by the paper's
end detection (eq. 50): hypotheses ended at each of the last M lengths, and the best of each is
more than |D_end| below the best overall. As in ESPnet, a hypothesis counts as ended there only
if its <eos> extension ranks among the utterance's best `beam` extensions: every <eos> extension
is kept as a candidate answer, but a mid-word one (very unlikely) must not say "the ended
hypotheses stopped improving", which stopped the search inside the word that followed a
plausible stopping point and returned the truncated prefix.

The decoder is anything with `prepare(hidden, lengths)` → memory (with `repeat_interleave(k)`),
`initial_state(memory)` → state (with `select(index)`), `step(memory, previous_tokens, state)`
→ (logits (N, V), state), `ctc_log_probs(hidden)`, and `vocab_size`, `blank_id`, `sos_eos_id`.
The LM: `initial_state(n)`, `step(previous_tokens, state)` → (log_probs (N, V), state),
`select_state(state, index)`.
"""

import math
from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch

from sslasr.decoding.ctc_prefix_score import CtcPrefixScorer
from sslasr.models.interfaces import DecodeOptions

NEG_INF = float("-inf")
PRE_BEAM_RATIO = 1.5        # ESPnet's pre-beam: 1.5 × beam candidate tokens per hypothesis
END_DETECT_WINDOW = 3       # M in eq. 50
END_DETECT_THRESHOLD = -10.0  # D_end in eq. 50


@dataclass
class ScoredHypothesis:
    tokens: List[int]
    score: float            # the search's total score
    attention: float = 0.0  # log p_att(y, <eos> | X)
    ctc: float = 0.0        # log p_ctc(y | X)
    lm: float = 0.0         # log p_LM(y, <eos>)


def max_output_lengths(lengths: torch.Tensor, max_len_ratio: float) -> torch.Tensor:
    """floor(max_len_ratio × frames) output tokens per utterance."""
    if not max_len_ratio > 0:
        raise ValueError(f"max_len_ratio must be positive, got {max_len_ratio}")
    return (lengths.double() * max_len_ratio).floor().long()


@dataclass
class _Weights:
    ctc: float
    lm: float
    length_bonus: float
    lm_module: Optional[torch.nn.Module]

    @classmethod
    def from_options(cls, options: DecodeOptions) -> "_Weights":
        if options.beam_size < 1:
            raise ValueError(f"beam_size must be at least 1, got {options.beam_size}")
        if not 0.0 <= options.ctc_weight <= 1.0:
            raise ValueError(f"ctc_weight must be in [0, 1], got {options.ctc_weight}")
        if options.lm_weight < 0:
            raise ValueError(f"lm_weight must not be negative, got {options.lm_weight}")
        if options.lm_weight > 0 and options.lm is None:
            raise ValueError(f"lm_weight {options.lm_weight} needs an LM (options.lm)")
        lm = options.lm if options.lm_weight > 0 else None
        return cls(options.ctc_weight, options.lm_weight, options.length_bonus, lm)


class _Finished:
    """Per utterance: the best finished hypothesis, and the best finished score of each length."""

    def __init__(self, batch: int, max_len: int, device: torch.device):
        self.best_score = torch.full((batch,), NEG_INF, device=device)
        self.by_length = torch.full((batch, max_len + 1), NEG_INF, device=device)
        self.best: List[ScoredHypothesis] = [ScoredHypothesis([], NEG_INF) for _ in range(batch)]

    def add(self, length: int, scores: torch.Tensor, in_beam: torch.Tensor, prefixes: torch.Tensor,
            components: List[torch.Tensor]) -> None:
        """scores (B, beam) of the hypotheses ending now, in_beam (B, beam) whether each ranks among
        its utterance's best `beam` extensions (end detection's "ended"); prefixes (B·beam, length)."""
        beam = scores.shape[1]
        best, slot = scores.max(-1)
        self.by_length[:, length] = scores.masked_fill(~in_beam, NEG_INF).max(-1).values
        for row in (best > self.best_score).nonzero().flatten().tolist():
            index = row * beam + int(slot[row])
            attention, ctc, lm = (float(c[index]) for c in components)
            self.best[row] = ScoredHypothesis(prefixes[index].tolist(), float(best[row]), attention, ctc, lm)
        self.best_score = torch.maximum(self.best_score, best)

    def end_detected(self, length: int, window: int, threshold: float) -> torch.Tensor:
        """Eq. 50: for each of the last `window` lengths, finished hypotheses exist and the best of
        them is more than |threshold| below the best overall."""
        count = torch.zeros_like(self.best_score, dtype=torch.long)
        for m in range(min(window, length + 1)):
            scores = self.by_length[:, length - m]
            count += (scores > NEG_INF) & (scores - self.best_score < threshold)
        return count == window


@torch.no_grad()
def joint_beam_search(decoder, hidden: torch.Tensor, lengths: torch.Tensor,
                      options: DecodeOptions = DecodeOptions()) -> List[ScoredHypothesis]:
    """The best hypothesis per utterance of a (B, T, D) batch of encoder states."""
    weights = _Weights.from_options(options)
    beam, batch, device = options.beam_size, hidden.shape[0], hidden.device
    eos, blank, vocab = decoder.sos_eos_id, decoder.blank_id, decoder.vocab_size
    lengths = lengths.to(device)
    max_len = max_output_lengths(lengths, options.max_len_ratio)
    count = batch * beam
    utterance = torch.arange(batch, device=device).repeat_interleave(beam)

    memory = decoder.prepare(hidden, lengths).repeat_interleave(beam)
    state = decoder.initial_state(memory)
    scorer = ctc_state = None
    if weights.ctc > 0:
        scorer = CtcPrefixScorer(decoder.ctc_log_probs(hidden), lengths, blank, eos)
        ctc_state = scorer.initial_state(utterance)
    lm_state = weights.lm_module.initial_state(count) if weights.lm_module is not None else None
    candidates_per_hyp = _pre_beam_size(options, weights.ctc, vocab - 2)

    # Beam slot 0 of each utterance holds the empty prefix; the other slots start empty (dead).
    alive = torch.arange(count, device=device) % beam == 0
    attention = torch.zeros(count, device=device)
    lm = torch.zeros(count, device=device)
    ctc = torch.zeros(count, device=device)
    prefixes = torch.zeros(count, 0, dtype=torch.long, device=device)
    previous = torch.full((count,), eos, dtype=torch.long, device=device)
    finished = _Finished(batch, int(max_len.max()), device)
    window, threshold = _end_detection(options)

    for i in range(int(max_len.max()) + 1):
        logits, state = decoder.step(memory, previous, state)
        attention_step = torch.log_softmax(logits.float(), dim=-1)
        lm_step = None
        if weights.lm_module is not None:
            lm_step, lm_state = weights.lm_module.step(previous, lm_state)
            if lm_step.shape != attention_step.shape:
                raise ValueError(f"LM log-probs {tuple(lm_step.shape)} do not match the decoder's "
                                 f"{tuple(attention_step.shape)} (same vocabulary needed)")

        # Candidates: <eos> in column 0, then the pre-beam's best real tokens.
        pre_beam = (1.0 - weights.ctc) * attention_step
        if lm_step is not None:
            pre_beam = pre_beam + weights.lm * lm_step
        pre_beam[:, [blank, eos]] = NEG_INF
        tokens = torch.cat([torch.full((count, 1), eos, dtype=torch.long, device=device),
                            pre_beam.topk(candidates_per_hyp, dim=-1).indices], dim=1)

        new_attention = attention[:, None] + attention_step.gather(1, tokens)
        total = (1.0 - weights.ctc) * new_attention
        new_lm = lm[:, None] + lm_step.gather(1, tokens) if lm_step is not None else lm[:, None].expand_as(tokens)
        if lm_step is not None:
            total = total + weights.lm * new_lm
        extensions = None
        new_ctc = ctc[:, None].expand_as(tokens)
        if scorer is not None:
            extensions = scorer.extend(ctc_state, tokens)
            new_ctc = extensions.scores
            total = total + weights.ctc * new_ctc
        total = total + weights.length_bonus * (i + (tokens != eos).float())
        total = total.masked_fill(~alive[:, None], NEG_INF)
        at_max_len = (i >= max_len)[utterance]
        total[:, 1:] = total[:, 1:].masked_fill(at_max_len[:, None], NEG_INF)

        eos_scores = total[:, 0].view(batch, beam)
        kth_best = total.view(batch, -1).topk(beam, dim=-1).values[:, -1:]
        finished.add(i, eos_scores, eos_scores >= kth_best, prefixes,
                     [new_attention[:, 0], new_ctc[:, 0], new_lm[:, 0]])

        running = total.clone()
        running[:, 0] = NEG_INF
        width = tokens.shape[1]
        best, flat = running.view(batch, beam * width).topk(beam, dim=-1)
        parent = (flat // width + torch.arange(batch, device=device)[:, None] * beam).flatten()
        column = (flat % width).flatten()
        chosen = tokens[parent, column]
        alive = best.flatten() > NEG_INF
        attention, lm, ctc = new_attention[parent, column], new_lm[parent, column], new_ctc[parent, column]
        prefixes = torch.cat([prefixes[parent], chosen[:, None]], dim=1)
        state = state.select(parent)
        if extensions is not None:
            ctc_state = extensions.select(parent, column)
        if weights.lm_module is not None:
            lm_state = weights.lm_module.select_state(lm_state, parent)
        previous = chosen

        if weights.length_bonus <= 0:
            done = best[:, 0] <= finished.best_score  # nothing running can still win: exact
        elif window:
            done = finished.end_detected(i, window, threshold)
        else:
            done = torch.zeros_like(best[:, 0], dtype=torch.bool)  # to the maximum length
        alive &= ~done[utterance]
        if not bool(alive.any()):
            break
    return finished.best


def _end_detection(options: DecodeOptions) -> Tuple[int, float]:
    """(M, D_end) of eq. 50 from options.extra; M = 0 turns end detection off."""
    window = options.extra.get("end_detect_window", END_DETECT_WINDOW)
    threshold = options.extra.get("end_detect_threshold", END_DETECT_THRESHOLD)
    if isinstance(window, bool) or not isinstance(window, int) or window < 0:
        raise ValueError(f"end_detect_window must be a whole number of lengths (0: no end detection), got {window!r}")
    if not float(threshold) < 0:  # a score difference, below the best: ≥ 0 would hold for every length
        raise ValueError(f"end_detect_threshold must be negative (D_end of eq. 50), got {threshold!r}")
    return window, float(threshold)


def _pre_beam_size(options: DecodeOptions, ctc_weight: float, real_tokens: int) -> int:
    """Real tokens scored per hypothesis and step (see the module docstring)."""
    if ctc_weight == 1.0:
        return real_tokens
    if ctc_weight == 0.0:
        return min(real_tokens, options.beam_size)
    ratio = float(options.extra.get("pre_beam_ratio", PRE_BEAM_RATIO))
    return min(real_tokens, max(1, math.ceil(ratio * options.beam_size)))
