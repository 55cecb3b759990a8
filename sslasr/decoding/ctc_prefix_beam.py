"""CTC prefix beam search (Graves, 2012 §7.5; Hannun et al., 2014) with LM shallow fusion.

Each prefix y keeps two CTC probabilities over the frames seen so far:
    p_b(y)  — all paths that collapse to y and end in blank,
    p_nb(y) — those ending in y's last token.
At frame t with posteriors p_t:
    p_b(y)    ← (p_b(y) + p_nb(y)) · p_t(blank)
    p_nb(y)   ← p_nb(y) · p_t(last(y))                         (repeat, collapses into y)
    p_nb(y+c) ← (p_b(y) + p_nb(y)) · p_t(c)   for c ≠ last(y)
    p_nb(y+c) ← p_b(y) · p_t(c)               for c = last(y)  (a blank must separate repeats)
and an extension equal to another prefix in the beam adds to that prefix's p_nb.
Prefixes are ranked by
    log(p_b + p_nb) + λ · log p_LM(y) + β · |y|
where log p_LM(y) grows by log p_LM(c | y) when c is appended (shallow fusion at token
extension); at the end the LM's log p(<eos> | y) is added.

With a lexicon (`sslasr.decoding.lexicon`), each prefix also carries its node in the lexicon's
trie; extensions that leave the lexicon's words are not allowed, and at the end only prefixes
that end on a whole word compete (if none does, the best prefix is returned as it is).

Pruning, so that beam + LM decoding runs well inside real time on a CPU: each frame extends
prefixes only by its `token_topk` most probable tokens, and a frame whose blank posterior is
above `blank_skip_threshold` extends nothing (its blank / repeat updates are still exact).
"""

import logging
from dataclasses import dataclass
from typing import List, Optional, Tuple

import numpy as np
import torch

from sslasr.decoding.lexicon import NOT_ALLOWED, Lexicon
from sslasr.models.interfaces import DecodeOptions
from sslasr.utils.threads import one_thread

log = logging.getLogger(__name__)

SOS_EOS_ID = 1
NEG_INF = -np.inf


@dataclass
class CtcBeamConfig:
    beam_size: int = 8
    token_topk: int = 8                  # extension candidates per frame; 0 = every token
    blank_skip_threshold: float = 0.999  # p(blank) above this: no extensions at that frame; ≥ 1 never skips
    lm_weight: float = 0.0               # λ
    length_bonus: float = 0.0            # β
    lexicon: Optional[Lexicon] = None    # constrain hypotheses to its words

    @classmethod
    def from_options(cls, options: DecodeOptions) -> "CtcBeamConfig":
        """Beam, λ and β from the shared options; the pruning knobs from `options.extra`."""
        extra = options.extra or {}
        return cls(beam_size=options.beam_size, token_topk=int(extra.get("ctc_token_topk", cls.token_topk)),
                   blank_skip_threshold=float(extra.get("ctc_blank_skip_threshold", cls.blank_skip_threshold)),
                   lm_weight=options.lm_weight, length_bonus=options.length_bonus, lexicon=options.lexicon)

    def __post_init__(self):
        # 0 would skip every frame (p(blank) > 0 always holds): every hypothesis empty, silently
        if not self.blank_skip_threshold > 0:
            raise ValueError(f"ctc_blank_skip_threshold must be above 0 (1 or more: never skip frames), "
                             f"got {self.blank_skip_threshold}")
        if self.token_topk < 0 or self.beam_size < 1:
            raise ValueError(f"ctc_token_topk must be ≥ 0 (0: every token) and beam_size ≥ 1, "
                             f"got {self.token_topk} and {self.beam_size}")


@dataclass
class Hypothesis:
    tokens: List[int]
    ctc_log_prob: float   # log(p_b + p_nb): the CTC probability of the label sequence
    lm_log_prob: float    # log p_LM(y, <eos>) (0 without an LM)
    score: float          # ctc + λ·lm + β·|y|


class _Beam:
    """One utterance's beam as parallel arrays (row i = prefix i). `rows[i]` is prefix i's row
    in the shared LM rows (state and next-token log-probs of every utterance's prefixes)."""

    def __init__(self, prefixes, p_blank, p_nonblank, lm_log_prob, rows, nodes):
        self.prefixes: List[Tuple[int, ...]] = prefixes
        self.p_blank, self.p_nonblank = p_blank, p_nonblank    # (K,) float64 log domain
        self.lm_log_prob = lm_log_prob                         # (K,) Σ log p_LM of the prefix's tokens
        self.rows = rows                                       # (K,) int64
        self.nodes = nodes                                     # (K,) lexicon trie nodes (0 without one)
        self.lengths = np.array([len(p) for p in prefixes], dtype=np.float64)
        self.last = np.array([p[-1] if p else -1 for p in prefixes], dtype=np.int64)


class _LmRows:
    """The LM state and next-token log-probs of every live prefix of a batch, one row each, so
    that each frame's new prefixes of all utterances advance in a single `lm.step`."""

    def __init__(self, lm, batch_size: int):
        self.lm = lm
        self.device = next(lm.parameters()).device
        state = lm.initial_state(batch_size)
        log_p, self.state = lm.step(torch.full((batch_size,), SOS_EOS_ID, dtype=torch.long, device=self.device), state)
        self.next = log_p.double().cpu().numpy()   # (R, V)

    def advance(self, kept: np.ndarray, parents: np.ndarray, tokens: np.ndarray) -> None:
        """New rows = the `kept` rows, then `parents` rows each fed its token."""
        kept_state = self.lm.select_state(self.state, torch.as_tensor(kept, device=self.device))
        parent_state = self.lm.select_state(self.state, torch.as_tensor(parents, device=self.device))
        log_p, new_state = self.lm.step(torch.as_tensor(tokens, device=self.device), parent_state)
        self.state = self.lm.concat_states([kept_state, new_state]) if len(kept) else new_state
        self.next = np.concatenate([self.next[kept], log_p.double().cpu().numpy()])


def ctc_prefix_beam_search(log_probs: torch.Tensor, cfg: CtcBeamConfig, lm=None, blank_id: int = 0,
                           nbest: int = 1) -> List[Hypothesis]:
    """(T, V) CTC log-posteriors of one utterance → the `nbest` best hypotheses, best first."""
    lengths = torch.tensor([log_probs.shape[0]])
    return ctc_prefix_beam_search_batch(log_probs.unsqueeze(0), lengths, cfg, lm, blank_id, nbest)[0]


@torch.no_grad()
def ctc_prefix_beam_search_batch(log_probs: torch.Tensor, lengths: torch.Tensor, cfg: CtcBeamConfig, lm=None,
                                 blank_id: int = 0, nbest: int = 1) -> List[List[Hypothesis]]:
    """(B, T, V) CTC log-posteriors with (B,) valid lengths → per utterance the `nbest` best
    hypotheses. Utterances are searched independently, in lockstep over frames (for the LM)."""
    if cfg.beam_size < 1:
        raise ValueError(f"beam_size must be at least 1, got {cfg.beam_size}")
    frames = log_probs.detach().to(torch.float64).cpu().numpy()
    lengths = [int(n) for n in lengths]
    vocab = frames.shape[2]
    use_lm = lm is not None and cfg.lm_weight != 0.0
    topk = vocab if cfg.token_topk <= 0 else min(cfg.token_topk, vocab)
    # blank never extends a prefix; with an LM neither does <sos/eos>, which the LM reads as sentence end
    excluded = [blank_id] + ([SOS_EOS_ID] if use_lm else [])

    with one_thread():
        return _search(frames, lengths, cfg, lm if use_lm else None, blank_id, nbest, excluded, topk)


def _search(frames: np.ndarray, lengths: List[int], cfg: CtcBeamConfig, lm, blank_id: int, nbest: int,
            excluded: List[int], topk: int) -> List[List[Hypothesis]]:
    use_lm = lm is not None
    skip_log = np.log(cfg.blank_skip_threshold) if cfg.blank_skip_threshold < 1.0 else np.inf
    lm_rows = _LmRows(lm, len(lengths)) if use_lm else None
    beams = [_Beam([()], np.zeros(1), np.full(1, NEG_INF), np.zeros(1), np.array([u]), np.zeros(1, dtype=np.int64))
             for u in range(len(lengths))]
    for t in range(max(lengths, default=0)):
        requests = []  # per utterance: (kept rows, parent rows, tokens) of its new beam
        for u, beam in enumerate(beams):
            frame = frames[u, t].copy()
            blank = frame[blank_id]
            frame[excluded] = NEG_INF
            if t >= lengths[u]:
                requests.append((beam.rows, beam.rows[:0], beam.rows[:0]))
            elif blank > skip_log:
                beam.p_blank, beam.p_nonblank = _stay_probs(beam, frame, blank)
                requests.append((beam.rows, beam.rows[:0], beam.rows[:0]))
            else:
                lm_next = lm_rows.next[beam.rows] if use_lm else None
                beams[u], request = _extend_frame(beam, frame, blank, topk, cfg, lm_next)
                requests.append(request)
        _assign_rows(beams, requests, lm_rows)
    return [_finish(beam, lm_rows, cfg, use_lm, nbest) for beam in beams]


def _assign_rows(beams: List[_Beam], requests, lm_rows: Optional[_LmRows]) -> None:
    """Give each new beam its LM rows; with new prefixes anywhere, the LM advances once for all."""
    if lm_rows is None:  # rows only index LM rows
        for beam in beams:
            beam.rows = np.zeros(len(beam.prefixes), dtype=np.int64)
        return
    if all(len(parents) == 0 for _, parents, _ in requests):  # no new prefix: the LM rows stand
        for beam, (kept, _, _) in zip(beams, requests):
            beam.rows = kept
        return
    kept_all = np.concatenate([kept for kept, _, _ in requests])
    lm_rows.advance(kept_all, np.concatenate([p for _, p, _ in requests]), np.concatenate([c for _, _, c in requests]))
    kept_offset, new_offset = 0, len(kept_all)
    for beam, (kept, parents, _) in zip(beams, requests):
        beam.rows = np.concatenate([np.arange(kept_offset, kept_offset + len(kept)),
                                    np.arange(new_offset, new_offset + len(parents))])
        kept_offset += len(kept)
        new_offset += len(parents)


def _stay_probs(beam: _Beam, frame: np.ndarray, blank: float) -> Tuple[np.ndarray, np.ndarray]:
    """The prefixes' own p_b, p_nb after this frame (blank, or a repeat of the last token)."""
    total = np.logaddexp(beam.p_blank, beam.p_nonblank)
    repeat = np.where(beam.last >= 0, frame[np.maximum(beam.last, 0)], NEG_INF)
    return total + blank, beam.p_nonblank + repeat


def _extend_frame(beam: _Beam, frame: np.ndarray, blank: float, topk: int, cfg: CtcBeamConfig,
                  lm_next: Optional[np.ndarray]):
    """The new beam after a frame that may extend prefixes, and its LM request (kept rows,
    parent rows, appended tokens): kept prefixes come first, then the extensions."""
    candidates = np.argpartition(-frame, topk - 1)[:topk] if topk < len(frame) else np.arange(len(frame))
    candidates = candidates[np.isfinite(frame[candidates])]
    p_blank, p_nonblank = _stay_probs(beam, frame, blank)
    total = np.logaddexp(beam.p_blank, beam.p_nonblank)
    # (K, C): p_nb of prefix k extended by candidate c
    is_repeat = candidates[None, :] == beam.last[:, None]
    extended = np.where(is_repeat, beam.p_blank[:, None], total[:, None]) + frame[candidates][None, :]
    _merge_into_beam(beam, candidates, extended, p_nonblank)
    if cfg.lexicon is not None:
        next_nodes = cfg.lexicon.next_nodes(beam.nodes, candidates)
        extended[next_nodes == NOT_ALLOWED] = NEG_INF

    extend_lm = beam.lm_log_prob[:, None] + (lm_next[:, candidates] if lm_next is not None else 0.0)
    stay_score = np.logaddexp(p_blank, p_nonblank) + cfg.length_bonus * beam.lengths
    extend_score = extended + cfg.length_bonus * (beam.lengths[:, None] + 1)
    if lm_next is not None:
        stay_score = stay_score + cfg.lm_weight * beam.lm_log_prob
        extend_score = extend_score + cfg.lm_weight * extend_lm
    scores = np.concatenate([stay_score, extend_score.ravel()])
    finite = np.flatnonzero(np.isfinite(scores))
    best = finite[np.argsort(-scores[finite], kind="stable")[: cfg.beam_size]]
    stay = best[best < len(beam.prefixes)]
    parent, column = np.divmod(best[best >= len(beam.prefixes)] - len(beam.prefixes), len(candidates))
    tokens = candidates[column]

    prefixes = [beam.prefixes[i] for i in stay] + [beam.prefixes[j] + (int(c),) for j, c in zip(parent, tokens)]
    nodes = (np.concatenate([beam.nodes[stay], next_nodes[parent, column]]) if cfg.lexicon is not None
             else np.zeros(len(prefixes), dtype=np.int64))
    new_beam = _Beam(prefixes,
                     np.concatenate([p_blank[stay], np.full(len(parent), NEG_INF)]),
                     np.concatenate([p_nonblank[stay], extended[parent, column]]),
                     np.concatenate([beam.lm_log_prob[stay], extend_lm[parent, column] if lm_next is not None
                                     else np.zeros(len(parent))]),
                     rows=None, nodes=nodes)
    return new_beam, (beam.rows[stay], beam.rows[parent], tokens)


def _merge_into_beam(beam: _Beam, candidates: np.ndarray, extended: np.ndarray, p_nonblank: np.ndarray) -> None:
    """An extension y+c that is itself in the beam (as prefix i) is the same label sequence:
    its mass joins p_nb(i), and the duplicate extension is removed (set to −inf)."""
    row_of = {prefix: i for i, prefix in enumerate(beam.prefixes)}
    column_of = {int(c): j for j, c in enumerate(candidates)}
    for i, prefix in enumerate(beam.prefixes):
        if not prefix:
            continue
        parent = row_of.get(prefix[:-1])
        column = column_of.get(prefix[-1])
        if parent is not None and column is not None:
            p_nonblank[i] = np.logaddexp(p_nonblank[i], extended[parent, column])
            extended[parent, column] = NEG_INF


def _finish(beam: _Beam, lm_rows: Optional[_LmRows], cfg: CtcBeamConfig, use_lm: bool, nbest: int) -> List[Hypothesis]:
    ctc = np.logaddexp(beam.p_blank, beam.p_nonblank)
    lm_total = beam.lm_log_prob + (lm_rows.next[beam.rows, SOS_EOS_ID] if use_lm else 0.0)
    scores = ctc + cfg.length_bonus * beam.lengths + (cfg.lm_weight * lm_total if use_lm else 0.0)
    candidates = np.arange(len(scores))
    if cfg.lexicon is not None:
        complete = np.flatnonzero(cfg.lexicon.is_complete(beam.nodes))
        if len(complete):  # not those that stop inside a word
            candidates = complete
        else:
            log.warning("ctc_lexicon: no hypothesis in the beam ends on a whole word; the best one, ending "
                        "inside a word, is returned (a larger beam_size keeps more)")
    order = candidates[np.argsort(-scores[candidates], kind="stable")[:nbest]]
    return [Hypothesis(list(beam.prefixes[i]), float(ctc[i]), float(lm_total[i]) if use_lm else 0.0,
                       float(scores[i])) for i in order]


def ctc_beam_decode(log_probs: torch.Tensor, lengths: torch.Tensor, options: DecodeOptions,
                    blank_id: int = 0) -> List[List[int]]:
    """A batch (B, T, V) → the best token list per utterance."""
    cfg = CtcBeamConfig.from_options(options)
    lm = options.lm
    if lm is not None and lm.vocab_size != log_probs.shape[-1]:
        raise ValueError(f"the LM has {lm.vocab_size} tokens but the CTC head {log_probs.shape[-1]}: "
                         "train the LM with the ASR model's tokenizer")
    return [hyps[0].tokens for hyps in ctc_prefix_beam_search_batch(log_probs, lengths, cfg, lm, blank_id)]
