"""Learning-rate schedules as pure functions of the update count (so resuming needs no state).

polynomial: linear warm-up to the peak, then (1 − progress)^power decay to end_lr_scale·peak
            (fairseq's wav2vec 2.0 pretraining: 8 % warm-up, power 1).
tri_stage:  warm-up from init_lr_scale·peak, hold, exponential decay to final_lr_scale·peak, then
            held there (fairseq's wav2vec 2.0 fine-tuning: phases 10 % / 40 % / 50 % of the updates,
            phase_ratio; or phase_updates, fairseq's warmup/hold/decay_steps, which need not add
            up to max_updates: HuBERT's base_10h decays over 72k steps of a 25k-update run).
"""

import math
from typing import Callable, Dict


# The keys each schedule reads (besides `name`), for config checks.
SCHEDULER_KEYS = {
    "polynomial": ("warmup_updates", "warmup_ratio", "end_lr_scale", "power"),
    "tri_stage": ("phase_ratio", "phase_updates", "init_lr_scale", "final_lr_scale"),
    "constant": (),
}


def build_lr_scale(cfg: Dict, max_updates: int) -> Callable[[int], float]:
    name = cfg.get("name", "polynomial")
    if name == "polynomial":
        warmup = _updates(cfg, "warmup", max_updates)
        end, power = cfg.get("end_lr_scale", 0.0), cfg.get("power", 1.0)

        def polynomial(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            progress = min(1.0, (step - warmup) / max(1, max_updates - warmup))
            return end + (1.0 - end) * (1.0 - progress) ** power

        return polynomial
    if name == "tri_stage":
        if "phase_updates" in cfg:
            warmup, hold, decay = (int(n) for n in cfg["phase_updates"])
        else:
            warmup_ratio, hold_ratio, decay_ratio = cfg.get("phase_ratio", [0.1, 0.4, 0.5])
            warmup, hold, decay = (int(r * max_updates) for r in (warmup_ratio, hold_ratio, decay_ratio))
        decay = max(1, decay)
        init, final = cfg.get("init_lr_scale", 0.01), cfg.get("final_lr_scale", 0.05)

        def tri_stage(step: int) -> float:
            if step < warmup:
                return init + (1.0 - init) * step / max(1, warmup)
            if step < warmup + hold:
                return 1.0
            progress = min(1.0, (step - warmup - hold) / decay)
            return math.exp(math.log(final) * progress)

        return tri_stage
    if name == "constant":
        return lambda step: 1.0
    raise ValueError(f"unknown scheduler {name!r} (polynomial, tri_stage, constant)")


def _updates(cfg: Dict, key: str, max_updates: int) -> int:
    """`warmup_updates: N` or `warmup_ratio: r` (fraction of max_updates)."""
    if f"{key}_updates" in cfg:
        return max(1, int(cfg[f"{key}_updates"]))
    return max(1, int(cfg.get(f"{key}_ratio", 0.08) * max_updates))
