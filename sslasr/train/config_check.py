"""Checks of a merged training config: which sections there are, and the keys and values of data,
finetune, init, optim, scheduler and trainer, so a typo or an impossible value fails at once
(`sslasr.bin.train --dry-run`) rather than hours into a run -- or never, as an ignored key would."""

from typing import Dict, List

from sslasr.train.schedules import SCHEDULER_KEYS, build_lr_scale
from sslasr.utils.config import finite_number

OPTIM_KEYS = ("lr", "betas", "eps", "weight_decay")  # what the Trainer's AdamW reads
AMP_MODES = ("none", "bf16", "fp16")
FINAL_MODELS = ("last", "best", "average")  # trainer.final_model: what model_final.pt holds
# what the tasks and their loaders read (sslasr/train/tasks.py, lm_task.py)
AUDIO_DATA_KEYS = ("train_cuts", "valid_cuts", "tokenizer", "max_duration", "valid_max_duration", "num_buckets",
                   "buffer_size", "num_workers", "normalize_waveform", "normalize_eps", "targets_field", "spec_augment",
                   "feature_type")
TEXT_DATA_KEYS = ("tokenizer", "train_text", "extra_text", "valid_text", "max_tokens", "valid_max_tokens")
FINETUNE_KEYS = ("init_from", "reinit_top_layers", "freeze_feature_extractor", "freeze_encoder_updates")
INIT_KEYS = ("encoder_from",)  # pretraining: the encoder to start from (a k-means iteration's previous model)
# Top-level sections, and the task each is read by where that is one task alone. A frontend
# preset carries pretrain / kmeans settings that fine-tuning configs merge in and never read.
SECTIONS = ("task", "frontend", "pretrain", "kmeans", "init", "finetune", "head", "decode", "pseudo_label", "lm",
            "data", "optim", "scheduler", "trainer")
SECTION_TASK = {"init": "pretrain", "finetune": "asr"}
# validation metrics a best_metric can name, where a task's are fixed
TASK_METRICS = {"asr": ("wer", "loss"), "lm": ("loss", "perplexity")}


class ConfigError(ValueError):
    """Every problem found, one per line."""


def _check_number(problems: List[str], section: Dict, key: str, name: str, *, required: bool = True,
              allow_zero: bool = False, integer: bool = False) -> None:
    if key not in section:
        if required:
            problems.append(f"{name}.{key} is missing")
        return
    value = section[key]
    ok = finite_number(value) and (value >= 0 if allow_zero else value > 0) and (not integer or isinstance(value, int))
    if not ok:
        kind = "integer" if integer else "number"
        problems.append(f"{name}.{key} must be a {'non-negative' if allow_zero else 'positive'} {kind}, got {value!r}")


def _check_data(cfg: Dict, problems: List[str]) -> None:
    data = cfg.get("data")
    if not isinstance(data, dict):
        problems.append("the data section is missing")
        return
    known = TEXT_DATA_KEYS if cfg.get("task") == "lm" else AUDIO_DATA_KEYS
    _check_known(problems, data, known, "data")
    if cfg.get("task") == "lm":
        _check_number(problems, data, "max_tokens", "data", integer=True)
        _check_number(problems, data, "valid_max_tokens", "data", required=False, integer=True)
        return
    _check_number(problems, data, "max_duration", "data")
    _check_number(problems, data, "valid_max_duration", "data", required=False)
    _check_number(problems, data, "num_buckets", "data", required=False, integer=True)
    _check_number(problems, data, "buffer_size", "data", required=False, integer=True)
    _check_number(problems, data, "num_workers", "data", required=False, allow_zero=True, integer=True)
    _check_number(problems, data, "normalize_eps", "data", required=False)


def _check_known(problems: List[str], section: Dict, known, name: str) -> None:
    """A mistyped key would otherwise be ignored for the whole run (finetune.init_form: a
    'pretrained' system trained from scratch)."""
    unknown = sorted(set(section) - set(known))
    if unknown:
        problems.append(f"{name}: unknown keys {unknown} (read: {', '.join(known)})")


def _check_sections(cfg: Dict, problems: List[str]) -> None:
    """A mistyped section (trainr:) would be ignored for the whole run, and so would a section of
    another task (init.encoder_from in a fine-tuning: trained from scratch); an empty one (its keys
    all commented out) reads as null, which the tasks cannot read."""
    unknown = sorted(set(cfg) - set(SECTIONS))
    if unknown:
        problems.append(f"unknown top-level sections {unknown} (known: {', '.join(SECTIONS)})")
    task = cfg.get("task")
    for name, reader in SECTION_TASK.items():
        if name in cfg and task != reader:
            problems.append(f"the {name} section is read by task {reader} only; this config's task is {task!r}")
    empty = sorted(name for name in SECTIONS if name in cfg and cfg[name] is None)
    if empty:
        problems.append(f"empty sections {empty} (keys all commented out?): remove them or give them keys")


def _check_model_start(cfg: Dict, problems: List[str]) -> None:
    for name, known in (("finetune", FINETUNE_KEYS), ("init", INIT_KEYS)):
        section = cfg.get(name)
        if section is None:
            continue
        if not isinstance(section, dict):
            problems.append(f"{name} must be a section of keys, got {section!r}")
            continue
        _check_known(problems, section, known, name)
    finetune = cfg.get("finetune")
    if not isinstance(finetune, dict):
        return
    # (a quoted "false" would be true; `reinit_top_layers: true` would re-initialise one block)
    if not isinstance(finetune.get("freeze_feature_extractor", False), bool):
        problems.append("finetune.freeze_feature_extractor must be true or false, "
                        f"got {finetune['freeze_feature_extractor']!r}")
    for key in ("reinit_top_layers", "freeze_encoder_updates"):
        _check_number(problems, finetune, key, "finetune", required=False, allow_zero=True, integer=True)
    if not isinstance(finetune.get("init_from"), (str, type(None))):
        problems.append(f"finetune.init_from must be a path or null, got {finetune['init_from']!r}")


def _check_optim(cfg: Dict, problems: List[str]) -> None:
    optim = cfg.get("optim")
    if not isinstance(optim, dict):
        problems.append("the optim section is missing")
        return
    unknown = sorted(set(optim) - set(OPTIM_KEYS))
    if unknown:
        problems.append(f"optim: unknown keys {unknown} (AdamW reads {', '.join(OPTIM_KEYS)})")
    _check_number(problems, optim, "lr", "optim")
    _check_number(problems, optim, "eps", "optim", required=False)
    _check_number(problems, optim, "weight_decay", "optim", required=False, allow_zero=True)
    betas = optim.get("betas", (0.9, 0.98))
    if not (isinstance(betas, (list, tuple)) and len(betas) == 2 and all(finite_number(b) and 0 <= b < 1 for b in betas)):
        problems.append(f"optim.betas must be two numbers in [0, 1), got {betas!r}")


def _check_scheduler(cfg: Dict, problems: List[str]) -> None:
    scheduler = cfg.get("scheduler", {})
    if not isinstance(scheduler, dict):
        if scheduler is not None:  # (None: said by _check_sections)
            problems.append(f"scheduler must be a section of keys, got {scheduler!r}")
        return
    name = scheduler.get("name", "polynomial")
    if name not in SCHEDULER_KEYS:
        problems.append(f"scheduler.name {name!r} is not one of {', '.join(SCHEDULER_KEYS)}")
        return
    unknown = sorted(set(scheduler) - {"name", *SCHEDULER_KEYS[name]})
    if unknown:
        problems.append(f"scheduler: unknown keys {unknown} for {name} (it reads {', '.join(SCHEDULER_KEYS[name])})")
    if name == "tri_stage":
        if "phase_ratio" in scheduler and "phase_updates" in scheduler:
            problems.append("scheduler: phase_ratio and phase_updates both given; give one (a _remove_ of the "
                            "inherited one, where a later config sets the other)")
            return
        phases = scheduler.get("phase_ratio", [0.1, 0.4, 0.5])
        if not (isinstance(phases, (list, tuple)) and len(phases) == 3 and all(finite_number(p) and p >= 0 for p in phases)
                and abs(sum(phases) - 1.0) < 1e-6):
            problems.append(f"scheduler.phase_ratio must be three non-negative fractions summing to 1, got {phases!r}")
            return
        steps = scheduler.get("phase_updates")
        whole = isinstance(steps, (list, tuple)) and len(steps) == 3 and all(
            isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in steps)
        if steps is not None and not (whole and steps[2] > 0):
            problems.append(f"scheduler.phase_updates must be three whole numbers of updates (warm-up, hold, "
                            f"decay; the decay above 0), got {steps!r}")
            return
        found = len(problems)  # the decay is exponential towards final_lr_scale: log(0) has no value
        _check_number(problems, scheduler, "final_lr_scale", "scheduler", required=False)
        _check_number(problems, scheduler, "init_lr_scale", "scheduler", required=False, allow_zero=True)
        if len(problems) > found:
            return
    max_updates = (cfg.get("trainer") or {}).get("max_updates")
    if not (finite_number(max_updates) and max_updates > 0):
        return  # reported by the trainer check
    if name == "polynomial" and not _check_warmup(scheduler, int(max_updates), problems):
        return
    scale = build_lr_scale(scheduler, int(max_updates))
    steps = sorted({0, 1, int(max_updates) // 2, int(max_updates) - 1})
    bad = [(step, scale(step)) for step in steps if not (finite_number(scale(step)) and 0 <= scale(step) <= 1)]
    if bad:
        problems.append(f"scheduler gives learning-rate scales outside [0, 1]: {bad}")


def _check_warmup(scheduler: Dict, max_updates: int, problems: List[str]) -> bool:
    """warmup_updates or warmup_ratio, not both (the updates won: the ratio was ignored), each a
    warm-up that ends before the last update (else the rate never peaks nor decays)."""
    found = len(problems)
    if "warmup_updates" in scheduler and "warmup_ratio" in scheduler:
        problems.append("scheduler: warmup_updates and warmup_ratio both given; give one")
    updates = scheduler.get("warmup_updates")
    if updates is not None and not (finite_number(updates) and isinstance(updates, int) and 0 < updates < max_updates):
        problems.append(f"scheduler.warmup_updates must be an integer in [1, trainer.max_updates = {max_updates}), "
                        f"got {updates!r}")
    ratio = scheduler.get("warmup_ratio")
    if ratio is not None and not (finite_number(ratio) and 0 <= ratio < 1):
        problems.append(f"scheduler.warmup_ratio must be a fraction in [0, 1), got {ratio!r}")
    for key in ("end_lr_scale", "power"):
        _check_number(problems, scheduler, key, "scheduler", required=False, allow_zero=key == "end_lr_scale")
    return len(problems) == found


TRAINER_KEYS = ("max_updates", "accum_grad", "clip_grad_norm", "log_every", "valid_every", "checkpoint_every",
                "amp", "final_model", "best_metric", "average_models", "find_unused_parameters", "seed",
                "num_threads", "flush_denormal")


def _check_trainer(cfg: Dict, problems: List[str]) -> None:
    trainer = cfg.get("trainer")
    if not isinstance(trainer, dict):
        problems.append("the trainer section is missing")
        return
    unknown = sorted(set(trainer) - set(TRAINER_KEYS))
    if unknown:  # a mistyped key would otherwise be ignored for the whole run
        problems.append(f"trainer: unknown keys {unknown} (the trainer reads {', '.join(TRAINER_KEYS)})")
    _check_number(problems, trainer, "max_updates", "trainer", integer=True)
    _check_number(problems, trainer, "accum_grad", "trainer", required=False, integer=True)
    _check_number(problems, trainer, "clip_grad_norm", "trainer", required=False, allow_zero=True)
    for key in ("log_every", "checkpoint_every"):
        _check_number(problems, trainer, key, "trainer", required=False, integer=True)
    _check_number(problems, trainer, "valid_every", "trainer", required=False, allow_zero=True, integer=True)
    # (YAML reads 08 as the string '08' and on as true: the run would crash, or use 1 thread)
    for key in ("seed", "num_threads"):
        _check_number(problems, trainer, key, "trainer", required=False, allow_zero=True, integer=True)
    for key in ("flush_denormal", "find_unused_parameters"):
        if not isinstance(trainer.get(key, True), bool):
            problems.append(f"trainer.{key} must be true or false, got {trainer[key]!r}")
    if trainer.get("amp", "none") not in AMP_MODES:
        problems.append(f"trainer.amp must be one of {', '.join(AMP_MODES)}, got {trainer['amp']!r}")
    if trainer.get("final_model", "last") not in FINAL_MODELS:
        problems.append(f"trainer.final_model must be one of {', '.join(FINAL_MODELS)}, got {trainer['final_model']!r}")
    _check_number(problems, trainer, "average_models", "trainer", required=False, integer=True)
    best_metric = trainer.get("best_metric")
    if best_metric is not None and not (isinstance(best_metric, str) and best_metric):
        problems.append(f"trainer.best_metric must name a validation metric (e.g. loss, wer), got {best_metric!r}")
    elif best_metric is not None and best_metric not in TASK_METRICS.get(cfg.get("task"), (best_metric,)):
        # (else a KeyError at the first validation, after valid_every updates)
        problems.append(f"trainer.best_metric {best_metric!r} is not a validation metric of task {cfg['task']} "
                        f"({', '.join(TASK_METRICS[cfg['task']])})")


def check_training_config(cfg: Dict) -> None:
    """Raise ConfigError listing every problem in the data, finetune, init, optim, scheduler and
    trainer sections."""
    problems: List[str] = []
    for check in (_check_sections, _check_data, _check_model_start, _check_optim, _check_scheduler, _check_trainer):
        check(cfg, problems)
    if problems:
        raise ConfigError("invalid training config:\n  " + "\n  ".join(problems))


def effective_batch(cfg: Dict, world_size: int) -> str:
    """What one update sees: per-process batch × accumulation × processes."""
    data, accum = cfg["data"], cfg["trainer"].get("accum_grad", 1)
    if cfg.get("task") == "lm":
        return f"{data['max_tokens'] * accum * world_size} tokens ({data['max_tokens']} × {accum} accum × {world_size} proc)"
    seconds = data["max_duration"] * accum * world_size
    return (f"{seconds:.0f} s = {seconds / 3600:.2f} h of audio "
            f"({data['max_duration']} s × {accum} accum × {world_size} proc)")
