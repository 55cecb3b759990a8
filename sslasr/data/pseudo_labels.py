"""Pseudo-labels for noisy-student training (Xie et al., 2020; for ASR, Park et al., 2020): a
teacher's hypotheses on unlabeled cuts, filtered, become those cuts' transcripts.

The filter, applied in this order, counts every cut it drops under its reason:
    no_hypothesis       the teacher wrote nothing for the cut
    too_short           fewer than min_letters letters (by default: an empty hypothesis)
    too_slow, too_fast  letters per second outside rate_ratio × the labeled data's median rate
                        (a teacher that loops or stops early breaks this first)
    no_score            no score in scores.txt for the cut (decoded without --confidence?)
    low_score           the length-normalised score (sslasr.bin.decode --confidence) < min_score,
                        or -inf (no alignment)
    below_top_fraction  not among the best keep_fraction of the cuts still kept, by score
"""

import logging
import math
import statistics
from collections import Counter
from dataclasses import dataclass, fields
from typing import Dict, Iterable, Mapping, Optional, Tuple

from lhotse import CutSet
from lhotse.utils import fastcopy

from sslasr.utils.config import finite_number

DROP_REASONS = ("no_hypothesis", "too_short", "too_slow", "too_fast", "no_score", "low_score", "below_top_fraction")


@dataclass
class FilterConfig:
    keep_fraction: float = 1.0                # of the cuts that pass the other checks, best first
    min_score: Optional[float] = None         # None: no absolute threshold
    rate_ratio: Tuple[float, float] = (0.5, 2.0)
    min_letters: int = 1

    @classmethod
    def from_dict(cls, cfg: Optional[Mapping]) -> "FilterConfig":
        cfg = dict(cfg or {})
        known = {f.name for f in fields(cls)}
        unknown = set(cfg) - known
        if unknown:
            raise ValueError(f"unknown pseudo-label filter setting(s) {sorted(unknown)}; known: {sorted(known)}")
        ratio = cfg.get("rate_ratio", cls.rate_ratio)
        if not isinstance(ratio, (list, tuple)):
            raise ValueError(f"rate_ratio must be [low, high] with 0 ≤ low < high, got {ratio!r}")
        config = cls(**{**cfg, "rate_ratio": tuple(ratio)})
        # (a NaN passed every comparison below unnoticed: min_score NaN kept every hypothesis)
        if not finite_number(config.keep_fraction) or not 0.0 < config.keep_fraction <= 1.0:
            raise ValueError(f"keep_fraction must be in (0, 1], got {config.keep_fraction!r}")
        if config.min_score is not None and not finite_number(config.min_score):
            raise ValueError(f"min_score must be a finite number or null (no threshold), got {config.min_score!r}")
        if not finite_number(config.min_letters) or config.min_letters != int(config.min_letters) \
                or config.min_letters < 0:  # (0 keeps empty hypotheses: silence as speech's transcript)
            raise ValueError(f"min_letters must be a whole number ≥ 0, got {config.min_letters!r}")
        if len(config.rate_ratio) != 2 or not all(map(finite_number, config.rate_ratio)) \
                or not 0.0 <= config.rate_ratio[0] < config.rate_ratio[1]:
            raise ValueError(f"rate_ratio must be [low, high] with 0 ≤ low < high, got {list(config.rate_ratio)}")
        return config


# pseudo_label keys that say what the teacher decodes and how (the recipe driver reads them),
# not how its hypotheses are filtered
SEARCH_KEYS = ("method", "beam_size", "pool")


def filter_config(pseudo_label: Optional[Mapping]) -> FilterConfig:
    """The filter of a YAML pseudo_label section, its search keys set aside."""
    return FilterConfig.from_dict({k: v for k, v in (pseudo_label or {}).items() if k not in SEARCH_KEYS})


def letters_per_second(text: str, seconds: float) -> float:
    return len(text.replace(" ", "")) / max(seconds, 1e-3)


def median_rate(cuts: Iterable) -> float:
    """Median letters per second of the transcribed cuts (the labeled data's speaking rate)."""
    rates = [letters_per_second(c.supervisions[0].text, c.duration) for c in cuts
             if c.supervisions and c.supervisions[0].text]
    if not rates:
        raise ValueError("no transcribed cuts to measure the speaking rate on")
    return statistics.median(rates)


def select(durations: Mapping[str, float], hyps: Mapping[str, str], scores: Mapping[str, float],
           labeled_rate: float, cfg: FilterConfig) -> Tuple[Dict[str, str], Counter]:
    """The kept {cut id: hypothesis} of the cuts in DURATIONS, and the dropped count per reason."""
    dropped: Counter = Counter()
    low, high = (ratio * labeled_rate for ratio in cfg.rate_ratio)
    candidates = {}
    for cut_id, seconds in durations.items():
        text = hyps.get(cut_id)
        score = scores.get(cut_id, -math.inf)
        if text is None:
            reason = "no_hypothesis"
        elif len(text.replace(" ", "")) < cfg.min_letters:
            reason = "too_short"
        elif letters_per_second(text, seconds) < low:
            reason = "too_slow"
        elif letters_per_second(text, seconds) > high:
            reason = "too_fast"
        elif cut_id not in scores:
            reason = "no_score"
        elif not math.isfinite(score) or (cfg.min_score is not None and score < cfg.min_score):
            reason = "low_score"
        else:
            candidates[cut_id] = text
            continue
        dropped[reason] += 1
    ranked = sorted(candidates, key=lambda cut_id: (-scores[cut_id], cut_id))
    # the top fraction, rounded up; 0.55 × 100 is 55.000000000000007 in floating point, not 56
    keep = math.ceil(round(cfg.keep_fraction * len(ranked), 9))
    dropped["below_top_fraction"] += len(ranked) - keep
    return {cut_id: candidates[cut_id] for cut_id in ranked[:keep]}, dropped


def relabel(cuts: CutSet, kept: Mapping[str, str], scores: Mapping[str, float]) -> CutSet:
    """The kept cuts with their pseudo-label as the transcript (and its score in `custom`)."""
    relabelled = []
    for cut in cuts:
        if cut.id not in kept:
            continue
        if len(cut.supervisions) != 1:
            raise ValueError(f"cut {cut.id} has {len(cut.supervisions)} supervisions; pseudo-labels need one")
        supervision = fastcopy(cut.supervisions[0], text=kept[cut.id])
        custom = {**(cut.custom or {}), "pseudo_label_score": round(scores[cut.id], 6)}
        relabelled.append(fastcopy(cut, supervisions=[supervision], custom=custom))
    logging.info("relabelled %d of the cuts", len(relabelled))
    return CutSet.from_cuts(relabelled)
