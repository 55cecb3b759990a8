"""Train any stage from a YAML config; resumes from exp-dir/checkpoint_last.pt if present.

    python -m sslasr.bin.train --config conf/frontend_wav2vec2.yaml conf/pretrain.yaml --exp-dir exp/pretrain \
        --set data.train_cuts=data/cuts_unlabeled.jsonl.gz trainer.max_updates=2000
Multi-GPU / multi-node: `torchrun --nproc_per_node N -m sslasr.bin.train ...`.

    python -m sslasr.bin.train --dry-run --config conf/frontend_wav2vec2.yaml conf/finetune_ctc.yaml \
        --vocab-size 32 --world-size 8
checks the merged config (data, finetune, init, optim, scheduler, trainer sections), builds the model, prints
a summary with its parameter count and effective batch, and exits: no data, no exp dir.
"""

import argparse
import logging
import os
import shlex
import sys
from pathlib import Path
from typing import Optional

import torch
import yaml

from sslasr.data.tokenizer import Tokenizer
from sslasr.models.asr import build_asr_model, load_encoder_weights
from sslasr.models.lm import build_lm
from sslasr.train.config_check import ConfigError, check_training_config, effective_batch
from sslasr.train.distributed import init_distributed, leave_distributed
from sslasr.train.tasks import build_task, pretraining_model
from sslasr.train.trainer import Trainer, seed_everything
from sslasr.utils.config import load_configs
from sslasr.utils.io import DirectoryInUse, lock_directory, remove_temp_files, write_text_atomic
from sslasr.utils.logging import setup_logging
from sslasr.utils.threads import configure_cpu_math


def _vocab_size(cfg: dict, vocab_size: Optional[int]) -> int:
    """The tokenizer's size when data.tokenizer exists (as training would use), else --vocab-size."""
    path = cfg.get("data", {}).get("tokenizer")
    if path and Path(path).exists():
        return Tokenizer(path).vocab_size
    if vocab_size is None:
        raise ConfigError(f"task {cfg.get('task')!r} needs a vocabulary: data.tokenizer ({path!r}) does not "
                          "exist, so give --vocab-size")
    return vocab_size


def build_model_only(cfg: dict, vocab_size: Optional[int]) -> torch.nn.Module:
    """The model training would build, without the data a task's constructor may read."""
    task = cfg.get("task")
    if task == "asr":
        model = build_asr_model(cfg, _vocab_size(cfg, vocab_size))
        init_from = cfg.get("finetune", {}).get("init_from")
        if init_from:  # a real run would load it: check it fits the configured encoder
            load_encoder_weights(model, init_from)
        return model
    if task == "lm":
        return build_lm(cfg["lm"], _vocab_size(cfg, vocab_size))
    if task == "pretrain":  # (the task itself reads the cuts: an fbank model checks their features)
        return pretraining_model(cfg)
    return build_task(cfg).model


def dry_run(cfg: dict, vocab_size: Optional[int], world_size: int) -> str:
    """Check the config and build its model; returns the summary printed by --dry-run."""
    check_training_config(cfg)
    model = build_model_only(cfg, vocab_size)
    total = sum(p.numel() for p in model.parameters())
    lines = [f"task: {cfg['task']}", f"model: {type(model).__name__}, {total / 1e6:.3g}M parameters"]
    for part in ("encoder", "head"):
        if hasattr(model, part):
            lines.append(f"  {part}: {sum(p.numel() for p in getattr(model, part).parameters()) / 1e6:.3g}M")
    if "frontend" in cfg:
        lines.append(f"frontend: {cfg['frontend'].get('name')}")
    trainer, scheduler = cfg["trainer"], cfg.get("scheduler", {})
    lines += [f"batch per update: {effective_batch(cfg, world_size)}",
              f"updates: {trainer['max_updates']}, peak lr {cfg['optim']['lr']}, "
              f"scheduler {scheduler.get('name', 'polynomial')}, amp {trainer.get('amp', 'none')}"]
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, nargs="+", help="YAML files, merged in order")
    parser.add_argument("--exp-dir", type=Path, help="where checkpoints and logs go (not for --dry-run)")
    parser.add_argument("--set", action="extend", nargs="*", default=[], metavar="KEY=VALUE",
                        help="config overrides (--set may be given more than once: each adds)")
    parser.add_argument("--dry-run", action="store_true",
                        help="check the config, build the model, print a summary and exit (no data, no training)")
    parser.add_argument("--vocab-size", type=int, help="--dry-run: vocabulary when data.tokenizer does not exist yet")
    parser.add_argument("--world-size", type=int, default=int(os.environ.get("WORLD_SIZE", "1")),
                        help="--dry-run: training processes, for the effective batch (default $WORLD_SIZE or 1)")
    args = parser.parse_args(argv)

    try:
        cfg = load_configs(args.config, args.set)
    except (ValueError, OSError, yaml.YAMLError) as e:  # a missing file, a bad override, a YAML error
        parser.error(str(e))
    if args.dry_run:
        try:
            print(dry_run(cfg, args.vocab_size, args.world_size))
        except (ConfigError, ValueError, FileNotFoundError) as e:
            raise SystemExit(f"--dry-run: {e}")
        return
    if args.exp_dir is None:
        parser.error("--exp-dir is required (unless --dry-run)")
    try:  # a mistyped override must stop the run, not be ignored for hours
        check_training_config(cfg)
    except ConfigError as e:  # its message begins "invalid training config:"
        raise SystemExit(str(e))
    dist = init_distributed()
    if dist.is_main:  # before anything is written there; held until the process ends
        try:
            exp_dir_lock = lock_directory(args.exp_dir)  # noqa: F841
        except DirectoryInUse as e:
            raise SystemExit(str(e))
        remove_temp_files(args.exp_dir, "config.yaml")  # a killed write's; the trainer removes its own
    setup_logging(args.exp_dir / f"train.rank{dist.rank}.log", rank=dist.rank)
    tcfg = cfg["trainer"]
    configure_cpu_math(tcfg.get("num_threads", 0), tcfg.get("flush_denormal", True))
    seed_everything(tcfg.get("seed", 0) + dist.rank)
    if dist.is_main:
        logging.info("command: %s", shlex.join(sys.argv))  # (quoted: it can be run again as logged)
    task = build_task(cfg)  # it may complete the config (data.feature_type of fbank models)
    if dist.is_main:
        write_text_atomic(args.exp_dir / "config.yaml", yaml.safe_dump(cfg, sort_keys=False))
        params = sum(p.numel() for p in task.model.parameters())
        logging.info("model: %s with %.2fM parameters", type(task.model).__name__, params / 1e6)
    Trainer(cfg, task, args.exp_dir, dist).fit()
    leave_distributed()


if __name__ == "__main__":
    main()
