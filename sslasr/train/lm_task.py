"""Trainer task for a token language model (config `task: lm`).

Data: `data.train_text` (cut manifests and/or text files: transcripts of the training cuts)
plus `data.extra_text` (more text files), `data.valid_text` for dev perplexity, all tokenised
with `data.tokenizer` (the ASR tokenizer, so the LM scores the ASR's own tokens).
"""

import math
from typing import Dict, Optional, Tuple

import torch
from torch import nn

from sslasr.data.text import make_text_dataloader
from sslasr.data.tokenizer import Tokenizer
from sslasr.models.lm import build_lm
from sslasr.train.distributed import DistInfo


class LmTask:
    def __init__(self, cfg: Dict):
        self.cfg = cfg
        data = cfg["data"]
        for key in ("tokenizer", "train_text", "max_tokens"):
            if data.get(key) in (None, ""):
                raise ValueError(f"the lm task needs data.{key}")
        self.tokenizer = Tokenizer(data["tokenizer"])
        self.model = build_lm(cfg["lm"], self.tokenizer.vocab_size)

    def _loader(self, paths, dist: DistInfo, train: bool):
        data = self.cfg["data"]
        return make_text_dataloader(paths, self.tokenizer, shuffle=train, seed=self.cfg["trainer"].get("seed", 0),
                                    max_tokens=data["max_tokens"] if train else data.get("valid_max_tokens", data["max_tokens"]),
                                    world_size=dist.world_size, rank=dist.rank, drop_unknown=train)

    def train_dataloader(self, dist: DistInfo):
        data = self.cfg["data"]
        paths = _listed(data["train_text"]) + _listed(data.get("extra_text"))
        return self._loader(paths, dist, train=True)

    def valid_dataloader(self, dist: DistInfo):
        paths = _listed(self.cfg["data"].get("valid_text"))
        return self._loader(paths, dist, train=False) if paths else None

    def on_update(self, model: nn.Module, num_updates: int) -> None:
        pass

    def forward(self, model: nn.Module, batch: Dict) -> Tuple[torch.Tensor, Dict[str, float], float]:
        """Mean per-token negative log-likelihood (nats), weighted by the target count."""
        count = float(batch["num_targets"])
        loss = model(batch["inputs"], batch["targets"]) / count
        return loss, {"loss": loss.detach()}, count

    def validate(self, model: nn.Module, loader) -> Dict[str, float]:
        totals = {"loss": 0.0, "weight": 0.0, "num_sentences": 0.0}
        for batch in loader:
            totals["loss"] += float(model(batch["inputs"], batch["targets"]))
            totals["num_sentences"] += len(batch["inputs"])
            totals["weight"] += float(batch["num_targets"])
        return totals

    @staticmethod
    def finalize_valid(metrics: Dict[str, float]) -> Dict[str, float]:
        """Token perplexity = exp(mean negative log-likelihood per token, <eos> included)."""
        return {**metrics, "perplexity": math.exp(metrics["loss"])}


def _listed(value: Optional[object]) -> list:
    if value in (None, ""):
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]
