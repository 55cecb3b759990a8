"""Train any stage from a YAML config; resumes from exp-dir/checkpoint_last.pt if present.

    python -m sslasr.bin.train --config conf/frontend_wav2vec2.yaml conf/pretrain.yaml --exp-dir exp/pretrain \
        --set data.train_cuts=data/cuts_unlabeled.jsonl.gz trainer.max_updates=2000
Multi-GPU / multi-node: `torchrun --nproc_per_node N -m sslasr.bin.train ...`.
"""

import argparse
import logging
import sys
from pathlib import Path

import torch
import yaml

from sslasr.train.distributed import init_distributed
from sslasr.train.tasks import build_task
from sslasr.train.trainer import Trainer, seed_everything
from sslasr.utils.config import load_configs
from sslasr.utils.io import write_text_atomic
from sslasr.utils.logging import setup_logging


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, nargs="+", help="YAML files, merged in order")
    parser.add_argument("--exp-dir", required=True, type=Path)
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides")
    args = parser.parse_args(argv)

    cfg = load_configs(args.config, args.set)
    dist = init_distributed()
    setup_logging(args.exp_dir / f"train.rank{dist.rank}.log", rank=dist.rank)
    if "num_threads" in cfg.get("trainer", {}):
        torch.set_num_threads(cfg["trainer"]["num_threads"])
    seed_everything(cfg["trainer"].get("seed", 0) + dist.rank)
    if dist.is_main:
        write_text_atomic(args.exp_dir / "config.yaml", yaml.safe_dump(cfg, sort_keys=False))
        logging.info("command: %s", " ".join(sys.argv))
    task = build_task(cfg)
    if dist.is_main:
        params = sum(p.numel() for p in task.model.parameters())
        logging.info("model: %s with %.2fM parameters", type(task.model).__name__, params / 1e6)
    Trainer(cfg, task, args.exp_dir, dist).fit()


if __name__ == "__main__":
    main()
