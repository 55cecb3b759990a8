"""Decoding for the transducer head (sslasr/models/heads/transducer.py).

greedy_search: at each frame, emit the joiner's best symbol and query again, until it is blank
(go to the next frame) or `max_symbols` tokens came out of this frame. Batched over utterances.

modified_beam_search (the "modified beam search" of k2/icefall): at most one token per frame, so
every hypothesis has read the same frames and one step of the search is one frame. At frame t each
of the ≤ K hypotheses is extended by every symbol, where blank keeps its tokens. The K best
extensions survive, and extensions with equal tokens merge, adding their probabilities (log-add).
A hypothesis y scores
    log p_AM(y) + λ·log p_LM(y) + β·|y|          (λ = options.lm_weight, β = options.length_bonus)
p_AM sums the joiner's probabilities over the alignments merged into y. The LM term and the bonus
are added as each token is emitted (shallow fusion), and the final choice adds λ·log p_LM(<eos> | y),
which completes log p_LM(y). The utterances of a batch are searched together (one joiner, prediction
network and LM call per frame for all their hypotheses); an utterance leaves when its frames end.
The LM follows sslasr/models/lm.py's decoding interface; prediction
networks offer the same four methods (initial_state, step, select_state, concat_states).
"""

import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

SOS_EOS_ID = 1


def _replace_rows(model: nn.Module, state, rows: torch.Tensor, new_state, batch_size: int):
    """`state` (batch_size histories) with histories `rows` replaced by `new_state`, using only the
    model's select_state and concat_states."""
    keep = torch.ones(batch_size, dtype=torch.bool, device=rows.device).index_fill(0, rows, False)
    kept = keep.nonzero().squeeze(1)
    merged = model.concat_states([model.select_state(state, kept), new_state])
    return model.select_state(merged, torch.cat([kept, rows]).argsort())


@torch.no_grad()
def greedy_search(head: nn.Module, hidden: torch.Tensor, lengths: torch.Tensor, max_symbols: int) -> List[List[int]]:
    """(B, T, D) encoder output → the greedy token sequence of each utterance."""
    joiner, predictor, blank = head.joiner, head.predictor, head.blank_id
    B, T, _ = hidden.shape
    encoder = joiner.encoder_proj(hidden)
    out, state = predictor.step(torch.full((B,), blank, device=hidden.device), predictor.initial_state(B))
    predicted = joiner.predictor_proj(out)
    hyps: List[List[int]] = [[] for _ in range(B)]
    for t in range(T):
        may_emit = lengths.to(hidden.device) > t
        for _ in range(max_symbols):
            best = joiner(encoder[:, t], predicted).argmax(-1)
            rows = (may_emit & (best != blank)).nonzero().squeeze(1)
            if len(rows) == 0:
                break
            for row, token in zip(rows.tolist(), best[rows].tolist()):
                hyps[row].append(token)
            if len(rows) == B:  # every utterance emitted: no rows to keep aside
                out, state = predictor.step(best, state)
                predicted = joiner.predictor_proj(out)
            else:
                out, new_state = predictor.step(best[rows], predictor.select_state(state, rows))
                predicted = predicted.index_copy(0, rows, joiner.predictor_proj(out))
                state = _replace_rows(predictor, state, rows, new_state, B)
            may_emit = torch.zeros_like(may_emit).index_fill(0, rows, True)
    return hyps


@dataclass
class _Beam:
    """The hypotheses of a batch of utterances. Rows of one utterance are contiguous, best first;
    every tensor's rows follow `tokens`."""

    tokens: List[Tuple[int, ...]]
    utterance: List[int]                    # batch row each hypothesis belongs to
    scores: torch.Tensor                    # (N,) log p_AM + λ·log p_LM + β·|y|
    predicted: torch.Tensor                 # (N, J) prediction-network output, projected for the joiner
    predictor_state: object
    lm_log_probs: Optional[torch.Tensor]    # (N, V) log p_LM(next token | y), with fusion
    lm_state: object


def _log_add(a: float, b: float) -> float:
    high, low = max(a, b), min(a, b)
    return high if low == -math.inf else high + math.log1p(math.exp(low - high))


class _Searcher:
    """Modified beam search for one batch: the head, the LM (None without fusion), λ, β, K."""

    def __init__(self, head: nn.Module, beam_size: int, lm: Optional[nn.Module], lm_weight: float,
                 length_bonus: float):
        if beam_size < 1:
            raise ValueError(f"beam_size must be ≥ 1, got {beam_size}")
        self.head, self.predictor, self.blank = head, head.predictor, head.blank_id
        self.beam_size = beam_size
        self.lm = lm if lm is not None and lm_weight != 0 else None
        self.lm_weight, self.length_bonus = lm_weight, length_bonus

    def initial(self, batch_size: int, device: torch.device) -> _Beam:
        """One empty hypothesis per utterance."""
        out, state = self.predictor.step(torch.full((batch_size,), self.blank, device=device),
                                         self.predictor.initial_state(batch_size))
        lm_log_probs = lm_state = None
        if self.lm is not None:
            lm_log_probs, lm_state = self.lm.step(torch.full((batch_size,), SOS_EOS_ID, device=device),
                                                  self.lm.initial_state(batch_size))
            if lm_log_probs.shape[1] != self.head.vocab_size:
                raise ValueError(f"the LM predicts {lm_log_probs.shape[1]} tokens, the transducer "
                                 f"{self.head.vocab_size}")
        return _Beam([()] * batch_size, list(range(batch_size)), torch.zeros(batch_size, device=device),
                     self.head.joiner.predictor_proj(out), state, lm_log_probs, lm_state)

    def final_scores(self, beam: _Beam) -> torch.Tensor:
        """Scores with λ·log p_LM(<eos> | y) added, which completes log p_LM(y)."""
        if self.lm is None:
            return beam.scores
        return beam.scores + self.lm_weight * beam.lm_log_probs[:, SOS_EOS_ID]

    def select(self, beam: _Beam, rows: List[int]) -> _Beam:
        index = torch.tensor(rows, dtype=torch.long, device=beam.scores.device)
        return _Beam([beam.tokens[r] for r in rows], [beam.utterance[r] for r in rows], beam.scores[index],
                     beam.predicted[index], self.predictor.select_state(beam.predictor_state, index),
                     beam.lm_log_probs[index] if self.lm is not None else None,
                     self.lm.select_state(beam.lm_state, index) if self.lm is not None else None)

    def extension_scores(self, beam: _Beam, encoder_t: torch.Tensor) -> torch.Tensor:
        """(N, V): each hypothesis's score after reading frame t with each symbol; blank adds
        log p_AM(∅) only, a token also λ·log p_LM(token | y) + β. With the LM, <sos/eos> is no
        token: emitted mid-sentence it would restart the LM's context (and the tokenizer drops it),
        so it scores −inf, as in the CTC prefix beam search; without the LM it is left alone there too."""
        rows = torch.tensor(beam.utterance, dtype=torch.long, device=encoder_t.device)
        log_probs = self.head.joiner(encoder_t[rows], beam.predicted).float().log_softmax(-1)
        scores = beam.scores.unsqueeze(1) + log_probs
        is_blank = torch.arange(scores.shape[1], device=scores.device) == self.blank
        if self.lm is None:
            return torch.where(is_blank, scores, scores + self.length_bonus)
        fused = scores + self.lm_weight * beam.lm_log_probs + self.length_bonus
        fused[:, SOS_EOS_ID] = -math.inf
        return torch.where(is_blank, scores, fused)

    def best_extensions(self, beam: _Beam, scores: torch.Tensor) -> List[Dict[Tuple[int, ...], List]]:
        """Per utterance, its K best extensions merged by token sequence: tokens → [score, parent,
        symbol], best first. The utterances' (hypotheses × V) scores are laid out in one padded
        (utterances, K·V) matrix so that one topk serves them all."""
        N, V = scores.shape
        K = self.beam_size
        group_of, slot_of, groups = [], [], []
        for row, utt in enumerate(beam.utterance):
            if not groups or groups[-1][0] != utt:
                groups.append((utt, row))
            group_of.append(len(groups) - 1)
            slot_of.append(row - groups[-1][1])
        padded = scores.new_full((len(groups), max(slot_of) + 1, V), -math.inf)
        padded[torch.tensor(group_of, device=scores.device), torch.tensor(slot_of, device=scores.device)] = scores
        top, flat = padded.flatten(1).topk(min(K, padded[0].numel()), dim=1)
        merged_per_group = []
        for (_, first_row), group_top, group_flat in zip(groups, top.tolist(), flat.tolist()):
            merged: Dict[Tuple[int, ...], List] = {}
            for score, index in zip(group_top, group_flat):
                if score == -math.inf:  # a padding slot: fewer than K real extensions
                    break
                slot, symbol = divmod(index, V)
                parent = first_row + slot
                tokens = beam.tokens[parent] + (() if symbol == self.blank else (symbol,))
                if tokens in merged:
                    merged[tokens][0] = _log_add(merged[tokens][0], score)
                else:
                    merged[tokens] = [score, parent, symbol]
            merged_per_group.append(merged)
        return merged_per_group

    def advance(self, beam: _Beam, encoder_t: torch.Tensor) -> _Beam:
        """One frame for every utterance in the beam."""
        merged_per_group = self.best_extensions(beam, self.extension_scores(beam, encoder_t))
        entries = [(utt, tokens, entry) for (utt, merged) in zip(_utterances(beam), merged_per_group)
                   for tokens, entry in merged.items()]
        stay = [i for i, (_, _, e) in enumerate(entries) if e[2] == self.blank]
        grow = [i for i, (_, _, e) in enumerate(entries) if e[2] != self.blank]
        parts = []
        if stay:
            parts.append(self.select(beam, [entries[i][2][1] for i in stay]))
        if grow:
            parts.append(self.grow(self.select(beam, [entries[i][2][1] for i in grow]),
                                   [entries[i][2][2] for i in grow]))
        joined = parts[0] if len(parts) == 1 else self.concat(parts)
        # back to the entries' order (grouped by utterance, best first) with their merged scores
        position = {entry_index: row for row, entry_index in enumerate(stay + grow)}
        joined = self.select(joined, [position[i] for i in range(len(entries))])
        joined.tokens = [tokens for _, tokens, _ in entries]
        joined.scores = torch.tensor([e[0] for _, _, e in entries], device=beam.scores.device)
        return joined

    def grow(self, parents: _Beam, symbols: List[int]) -> _Beam:
        """The parents with one more token each: prediction network and LM stepped."""
        tokens = torch.tensor(symbols, dtype=torch.long, device=parents.scores.device)
        out, state = self.predictor.step(tokens, parents.predictor_state)
        lm_log_probs, lm_state = None, None
        if self.lm is not None:
            lm_log_probs, lm_state = self.lm.step(tokens, parents.lm_state)
        return _Beam(parents.tokens, parents.utterance, parents.scores, self.head.joiner.predictor_proj(out),
                     state, lm_log_probs, lm_state)

    def concat(self, parts: List[_Beam]) -> _Beam:
        return _Beam(sum((p.tokens for p in parts), []), sum((p.utterance for p in parts), []),
                     torch.cat([p.scores for p in parts]), torch.cat([p.predicted for p in parts]),
                     self.predictor.concat_states([p.predictor_state for p in parts]),
                     torch.cat([p.lm_log_probs for p in parts]) if self.lm is not None else None,
                     self.lm.concat_states([p.lm_state for p in parts]) if self.lm is not None else None)


def _utterances(beam: _Beam) -> List[int]:
    """The utterances in the beam, in row order."""
    return [utt for row, utt in enumerate(beam.utterance) if row == 0 or beam.utterance[row - 1] != utt]


@torch.no_grad()
def modified_beam_search(head: nn.Module, hidden: torch.Tensor, lengths: torch.Tensor, beam_size: int,
                         lm: Optional[nn.Module] = None, lm_weight: float = 0.0, length_bonus: float = 0.0,
                         return_scores: bool = False):
    """(B, T, D) encoder output → the best token sequence of each utterance; with return_scores,
    (tokens, search score) pairs. The utterances are searched together, one frame at a time; an
    utterance leaves the beam when its frames run out."""
    searcher = _Searcher(head, beam_size, lm, lm_weight, length_bonus)
    if hidden.shape[0] == 0:
        return []
    encoder = head.joiner.encoder_proj(hidden)
    lengths = lengths.tolist()
    results: List = [None] * len(lengths)
    beam = searcher.initial(len(lengths), hidden.device)
    for t in range(max(lengths, default=0) + 1):
        finished = [row for row, utt in enumerate(beam.utterance) if lengths[utt] == t]
        if finished:
            final = searcher.final_scores(beam).tolist()
            for row in finished:
                utt = beam.utterance[row]
                if results[utt] is None or final[row] > results[utt][1]:
                    results[utt] = (list(beam.tokens[row]), final[row])
            remaining = [row for row, utt in enumerate(beam.utterance) if lengths[utt] > t]
            if not remaining:
                break
            beam = searcher.select(beam, remaining)
        beam = searcher.advance(beam, encoder[:, t])
    return results if return_scores else [tokens for tokens, _ in results]
