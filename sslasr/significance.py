"""Is system B's WER really lower than system A's? The paired bootstrap of Bisani & Ney (2004).

Both systems decoded the same utterances. Resample utterances with replacement, S times; in
each resample b, the WER difference is

    Δ_b = (Σ_u w_bu·e_B(u) − Σ_u w_bu·e_A(u)) / Σ_u w_bu·n(u)

with w_bu how often utterance u was drawn, e(u) a system's word errors on it and n(u) its
reference words. The 2.5th and 97.5th percentiles of Δ_b are the 95 % confidence interval of
the difference, and the fraction of resamples with Δ_b < 0 is Bisani & Ney's "probability of
improvement" of B over A. Pairing matters: most of a WER's sampling noise is which utterances
the test set happened to hold, and both systems see the same ones, so a difference can be
significant while the two systems' own intervals overlap.

Utterances are the resampled unit by default, as in Kaldi's compute-wer-bootci. Utterances of one
speaker are correlated, so on a test set of few speakers that interval is somewhat too narrow;
with `groups` (e.g. each utterance's speaker) whole groups are resampled instead. On
speechocean762's test set (400 utterances, 20 speakers) the speakers widened a noisy student's
interval against its teacher from [−4.98, −1.33] to [−5.12, −1.18] (greedy) and from
[−1.48, +2.61] to [−1.69, +2.65] (lexicon + LM).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Optional, Sequence

import numpy as np

from sslasr.scoring import UttResult


@dataclass(frozen=True)
class PairedBootstrap:
    """WERs in percent; delta = WER(B) − WER(A), negative when B makes fewer errors."""

    wer_a: float
    wer_b: float
    delta: float
    ci_low: float
    ci_high: float
    p_improvement: float  # P(Δ < 0) over the resamples
    samples: int
    utterances: int
    groups: Optional[int] = None  # resampled groups (speakers), None: utterances were resampled
    wordless: int = 0  # resamples left out: they drew only utterances without reference words

    def summary(self) -> str:
        by_group = "" if self.groups is None else f" in {self.groups} resampled groups"
        left_out = f", {self.wordless} without reference words left out" if self.wordless else ""
        return (f"WER {self.wer_a:.2f} -> {self.wer_b:.2f} %: delta {self.delta:+.2f} points, "
                f"95 % CI [{self.ci_low:+.2f}, {self.ci_high:+.2f}], P(improvement) {self.p_improvement:.3f} "
                f"({self.utterances} utterances{by_group}, {self.samples} resamples{left_out})")

    def row_fields(self) -> dict:
        """The results-row fields (sslasr.bin.score --baseline)."""
        return {"wer_delta": round(self.delta, 4), "wer_delta_low": round(self.ci_low, 4),
                "wer_delta_high": round(self.ci_high, 4), "p_improvement": round(self.p_improvement, 4)}


def paired_bootstrap(errors_a: Sequence[int], errors_b: Sequence[int], ref_words: Sequence[int],
                     samples: int = 10000, seed: int = 0, chunk: int = 500,
                     groups: Optional[Sequence[str]] = None) -> PairedBootstrap:
    """Per-utterance word errors of A and B and reference word counts, aligned by utterance;
    `groups`, one label per utterance, makes the groups the resampled unit."""
    e_a, e_b, n = (np.asarray(x, dtype=np.int64) for x in (errors_a, errors_b, ref_words))
    if not (e_a.shape == e_b.shape == n.shape) or e_a.ndim != 1:
        raise ValueError(f"per-utterance counts differ in shape: {e_a.shape}, {e_b.shape}, {n.shape}")
    utterances = len(n)
    if groups is not None:
        if len(groups) != utterances:
            raise ValueError(f"{len(groups)} group labels for {utterances} utterances")
        _, group_of = np.unique(np.asarray(groups), return_inverse=True)
        e_a, e_b, n = (np.bincount(group_of, weights=x).astype(np.int64) for x in (e_a, e_b, n))
    if n.sum() == 0:
        raise ValueError("no reference words: a WER difference is undefined")
    if samples < 1:
        raise ValueError(f"need at least one resample, got {samples}")
    rng = np.random.default_rng(seed)
    diff = e_b - e_a
    deltas = []
    for start in range(0, samples, chunk):  # (chunk, U) draws at a time: memory stays bounded
        draws = rng.integers(0, len(n), size=(min(chunk, samples - start), len(n)))
        words = n[draws].sum(1)
        # a resample of utterances without reference words has no WER, so no difference: left
        # out (dividing by 1 instead made its insertions a difference of hundreds of points)
        deltas.append(100.0 * diff[draws].sum(1)[words > 0] / words[words > 0])
    delta_b = np.concatenate(deltas)
    wordless = samples - len(delta_b)
    if not len(delta_b):
        raise ValueError("no resample drew a reference word: a WER difference is undefined")
    low, high = np.percentile(delta_b, [2.5, 97.5])
    total = n.sum()
    return PairedBootstrap(
        wer_a=100.0 * e_a.sum() / total, wer_b=100.0 * e_b.sum() / total,
        delta=100.0 * diff.sum() / total, ci_low=float(low), ci_high=float(high),
        p_improvement=float((delta_b < 0).mean()), samples=samples, utterances=utterances,
        groups=None if groups is None else len(n), wordless=wordless)


def compare_scored(baseline: Sequence[UttResult], system: Sequence[UttResult], samples: int = 10000,
                   seed: int = 0, group_of: Optional[Mapping[str, str]] = None) -> PairedBootstrap:
    """The bootstrap of two scorings (score_corpus's per-utterance results) of one test set: A is
    the baseline. Their utterances and reference words must be the same. `group_of` maps each
    utterance id to its group (speaker) to resample groups."""
    by_id = {u.utt_id: u for u in baseline}
    other = {u.utt_id: u for u in system}
    if by_id.keys() != other.keys():
        only_a, only_b = sorted(by_id.keys() - other.keys()), sorted(other.keys() - by_id.keys())
        raise ValueError(f"the two scorings cover different utterances: {len(only_a)} only in the "
                         f"baseline (e.g. {only_a[:3]}), {len(only_b)} only in the system (e.g. {only_b[:3]})")
    differ = [i for i in by_id if by_id[i].ref != other[i].ref]
    if differ:
        raise ValueError(f"{len(differ)} utterance(s) have different references, e.g. {differ[:3]}")
    ids = sorted(by_id)
    groups = None
    if group_of is not None:
        unmapped = [i for i in ids if i not in group_of]
        if unmapped:
            raise ValueError(f"{len(unmapped)} utterance(s) have no group (speaker), e.g. {unmapped[:3]}")
        groups = [group_of[i] for i in ids]
    return paired_bootstrap([by_id[i].counts.errors for i in ids], [other[i].counts.errors for i in ids],
                            [by_id[i].counts.ref_words for i in ids], samples=samples, seed=seed, groups=groups)
