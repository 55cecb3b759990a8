"""Decoding settings from a model's YAML `decode` section, and the λ/β grid search for shallow fusion.

The `decode` section of a head's fine-tuning YAML, e.g.
    decode:
      methods: [ctc_greedy, ctc_beam]     # decoded without an LM
      lm_methods: [ctc_beam]              # also decoded with the LM, λ and β tuned on dev
      beam_size: 8
      lm_beam_size: 64                    # with an LM (it reorders hypotheses: a wider beam pays)
      ctc_token_topk: 8                   # any other key: a DecodeOptions field, else options.extra
      tune: {lm_weight: [0.2, 0.5, 0.8], length_bonus: [0.0, 1.0, 2.0]}
"""

from dataclasses import fields
from typing import Callable, Dict, Iterable, List, Mapping, Optional

from sslasr.models.interfaces import DecodeOptions
from sslasr.scoring import align_counts

PLAN_KEYS = ("methods", "lm_methods", "tune")  # what to decode, not how


def decode_options(decode_cfg: Optional[Mapping] = None, **overrides) -> DecodeOptions:
    """DecodeOptions from a `decode` section; keyword overrides (None = keep) win."""
    known = {f.name for f in fields(DecodeOptions)} - {"extra"}
    settings, extra = {}, {}
    for key, value in (decode_cfg or {}).items():
        if key in PLAN_KEYS or key == "lm_beam_size":
            continue
        (settings if key in known else extra)[key] = value
    if overrides.get("lm") is not None and (decode_cfg or {}).get("lm_beam_size"):
        settings["beam_size"] = decode_cfg["lm_beam_size"]
    for key, value in overrides.items():
        if key not in known:
            raise ValueError(f"{key!r} is not a decoding option; known: {sorted(known)}")
        if value is not None:
            settings[key] = value
    return DecodeOptions(**settings, extra=extra)


def corpus_wer(hyps: Mapping[str, str], refs: Mapping[str, str]) -> float:
    """WER (%) of hypotheses against references over the references' utterances. Undefined
    (ValueError) when the references hold no word: any insertion would be infinitely many %."""
    errors = words = 0
    for utt, ref in refs.items():
        counts = align_counts(ref.split(), hyps.get(utt, "").split())
        errors += counts.errors
        words += counts.ref_words
    if words == 0:
        raise ValueError(f"no WER: the {len(refs)} reference transcripts hold no word")
    return 100.0 * errors / words


def tune_fusion(decode: Callable[[float, float], Mapping[str, str]], refs: Mapping[str, str],
                lm_weights: Iterable[float], length_bonuses: Iterable[float]) -> Dict:
    """Decode once per (λ, β) of the grid; the setting with the lowest WER wins (the first in
    grid order on ties). Returns {lm_weight, length_bonus, dev_wer, grid: [...]}."""
    lm_weights, length_bonuses = [float(x) for x in lm_weights], [float(x) for x in length_bonuses]
    if not lm_weights or not length_bonuses:
        raise ValueError("the tuning grid needs at least one lm_weight and one length_bonus")
    grid: List[Dict] = []
    for lm_weight in lm_weights:
        for length_bonus in length_bonuses:
            wer = corpus_wer(decode(lm_weight, length_bonus), refs)
            grid.append({"lm_weight": lm_weight, "length_bonus": length_bonus, "dev_wer": round(wer, 4)})
    best = min(grid, key=lambda point: point["dev_wer"])
    return {**best, "grid": grid}
