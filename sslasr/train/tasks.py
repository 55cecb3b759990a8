"""Stage tasks for the trainer: SSL pretraining of a frontend, and ASR fine-tuning."""

import logging
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

from sslasr.data.loader import (SHUFFLE_BUFFER, check_feature_type, feature_type, load_cuts, make_dataloader,
                                waveform_normalization)
from sslasr.data.tokenizer import Tokenizer
from sslasr.models.asr import build_asr_model, load_encoder_weights
from sslasr.models.frontends import get_frontend
from sslasr.scoring import align_counts
from sslasr.train.distributed import DistInfo
from sslasr.train.lm_task import LmTask

log = logging.getLogger(__name__)


def _init_encoder(model: nn.Module, checkpoint: Optional[str], reinit_top_layers: int = 0) -> None:
    """model.encoder's weights from a pretraining checkpoint, where one is given; the top
    `reinit_top_layers` blocks keep their random initialisation. The last blocks of a pretrained
    encoder specialise in its pretext task and carry less phonetic information than the middle
    ones; re-initialising them helps low-resource fine-tuning (Pasad et al. 2021, "Layer-wise
    analysis of a self-supervised speech representation model")."""
    if not checkpoint:
        return
    blocks = model.encoder.blocks
    if not 0 <= reinit_top_layers <= len(blocks):
        raise ValueError(f"finetune.reinit_top_layers must be in [0, {len(blocks)}] (the encoder's blocks), "
                         f"got {reinit_top_layers}")
    top = blocks[len(blocks) - reinit_top_layers:]
    random_init = [{k: v.clone() for k, v in block.state_dict().items()} for block in top]
    count = load_encoder_weights(model, checkpoint)
    for block, state in zip(top, random_init):
        block.load_state_dict(state)
    log.info("initialised %d encoder tensors from %s; top %d of %d blocks left at random init",
             count, checkpoint, reinit_top_layers, len(blocks))


def checkpoint_feature_type(checkpoint: str) -> Optional[str]:
    """The features a checkpoint's model was trained on (data.feature_type), None where unrecorded."""
    config = torch.load(checkpoint, map_location="cpu", weights_only=False, mmap=True).get("config") or {}
    return (config.get("data") or {}).get("feature_type")


class _DataMixin:
    """Train/valid loaders from the `data` section of the config."""

    cfg: Dict
    input_type: str
    tokenizer: Optional[Tokenizer] = None
    utterance_mixing: Optional[Dict] = None  # mixes training batches (WavLM pretraining)

    def _agree_on_features(self, init_checkpoint: Optional[str]) -> None:
        """An fbank model records the extractor of its features in data.feature_type (given by the
        config, as an imported w2v-BERT 2.0's frontend.yaml does, else the training cuts'), which
        decoding checks; cuts or a checkpoint to start from of another extractor are an error."""
        data = self.cfg.get("data") or {}
        if self.input_type != "fbank" or not data.get("train_cuts"):
            return
        expected = data.get("feature_type") or feature_type(data["train_cuts"])
        for key in ("train_cuts", "valid_cuts"):
            if data.get(key):
                check_feature_type(data[key], expected, f"this training (data.feature_type {expected})")
        if init_checkpoint:
            started = checkpoint_feature_type(init_checkpoint)
            if None not in (started, expected) and started != expected:
                raise ValueError(f"{init_checkpoint} was trained on {started} features, but this training reads "
                                 f"{expected} features: compute the fbank again (stage 2 with --force true), or "
                                 f"start from a model of these features (one imported with --init-from: import "
                                 f"it again, stage 4 with --force true)")
        data["feature_type"] = expected

    def _loader(self, cuts_path: str, dist: DistInfo, train: bool):
        data = self.cfg["data"]
        return make_dataloader(
            load_cuts(cuts_path), input_type=self.input_type,
            max_duration=data["max_duration"] if train else data.get("valid_max_duration", data["max_duration"]),
            shuffle=train, seed=self.cfg["trainer"].get("seed", 0), num_buckets=data.get("num_buckets", 10),
            buffer_size=data.get("buffer_size", SHUFFLE_BUFFER),
            num_workers=data.get("num_workers", 0), tokenizer=self.tokenizer, drop_last=False,
            world_size=dist.world_size, rank=dist.rank, **waveform_normalization(data),
            targets_field=data.get("targets_field"),  # frame labels for objectives that predict them (HuBERT)
            spec_augment=data.get("spec_augment") if train else None,  # fbank training batches only
            utterance_mixing=self.utterance_mixing if train else None)

    def train_dataloader(self, dist: DistInfo):
        return self._loader(self.cfg["data"]["train_cuts"], dist, train=True)

    def valid_dataloader(self, dist: DistInfo):
        path = self.cfg["data"].get("valid_cuts")
        return self._loader(path, dist, train=False) if path else None


def pretraining_model(cfg: Dict) -> nn.Module:
    """The configured frontend's pretrainer, from the config alone (no data: --dry-run builds it so).
    `pretrain` also holds two settings that are not the model's: the collapse warning's threshold,
    and utterance mixing (WavLM's denoising), which the loader does to the training batches (in
    `pretrain`, so that fine-tuning, which reads the same frontend YAML, never mixes)."""
    objective = {k: v for k, v in cfg["pretrain"].items() if k not in ("collapse_warning_perplexity", "utterance_mixing")}
    model = get_frontend(cfg["frontend"]).build_pretrainer(cfg["frontend"]["encoder"], objective)
    # A k-means iteration with `init: previous` trains the previous iteration's encoder on
    # (its prediction head is new: the classes changed)
    _init_encoder(model, cfg.get("init", {}).get("encoder_from"))
    return model


class PretrainTask(_DataMixin):
    """Self-supervised pretraining of the configured frontend on unlabeled audio."""

    def __init__(self, cfg: Dict):
        self.cfg = cfg
        self.input_type = get_frontend(cfg["frontend"]).input_type
        self.collapse_perplexity = cfg["pretrain"].get("collapse_warning_perplexity", 0.0)
        self.utterance_mixing = cfg["pretrain"].get("utterance_mixing")
        self.model = pretraining_model(cfg)
        self._agree_on_features(cfg.get("init", {}).get("encoder_from"))
        self._collapse_warned = False

    def forward(self, model: nn.Module, batch: Dict) -> Tuple[torch.Tensor, Dict[str, float], float]:
        loss, stats = model(batch["inputs"], batch["input_lens"], batch.get("targets"))
        stats.update(batch.get("mixing", {}))  # mixed_utterances, noise_utterances per batch
        return loss, stats, stats["masked_frames"]

    def on_log(self, metrics: Dict[str, float]) -> None:
        """Codebook collapse (few codes used) makes the contrastive task trivial; say so once,
        from a log line's mean (a per-batch check would read the device every update)."""
        if self.collapse_perplexity and metrics.get("code_perplexity", float("inf")) < self.collapse_perplexity and not self._collapse_warned:
            log.warning("codebook perplexity %.1f is below %.1f: the quantizer may be collapsing "
                        "(raise diversity_weight or the Gumbel temperature)", metrics["code_perplexity"],
                        self.collapse_perplexity)
            self._collapse_warned = True

    def on_update(self, model: nn.Module, num_updates: int) -> None:
        if hasattr(model, "set_num_updates"):  # optional in the Pretrainer contract (HuBERT has no schedule)
            model.set_num_updates(num_updates)

    def validate(self, model: nn.Module, loader) -> Dict[str, float]:
        """Every stat the objective reports, averaged over masked frames."""
        totals: Dict[str, float] = {"weight": 0.0, "num_utterances": 0.0}
        for batch in loader:
            _, stats = model(batch["inputs"], batch["input_lens"], batch.get("targets"))
            weight = stats["masked_frames"]
            for key, value in stats.items():
                if key not in ("masked_frames", "temperature"):
                    totals[key] = totals.get(key, 0.0) + float(value) * weight
            totals["weight"] += weight
            totals["num_utterances"] += len(batch["input_lens"])
        return totals


class AsrFinetuneTask(_DataMixin):
    """Supervised training of encoder + head; the encoder pretrained (init_from) or not."""

    def __init__(self, cfg: Dict):
        self.cfg = cfg
        self.tokenizer = Tokenizer(cfg["data"]["tokenizer"])
        frontend = get_frontend(cfg["frontend"])
        self.input_type = frontend.input_type
        self.model = build_asr_model(cfg, self.tokenizer.vocab_size)
        ft = cfg.get("finetune", {})
        _init_encoder(self.model, ft.get("init_from"), ft.get("reinit_top_layers", 0))
        self._agree_on_features(ft.get("init_from"))
        if ft.get("freeze_feature_extractor", False):
            for p in self.model.encoder.feature_extractor.parameters():
                p.requires_grad_(False)
        self.freeze_encoder_updates = ft.get("freeze_encoder_updates", 0)

    def on_update(self, model: nn.Module, num_updates: int) -> None:
        model.freeze_encoder = num_updates < self.freeze_encoder_updates

    def forward(self, model: nn.Module, batch: Dict) -> Tuple[torch.Tensor, Dict[str, float], float]:
        tokens = _transcripts(batch)
        rows = _rows_with_frames(model, batch)
        loss_sum = model(batch["inputs"], batch["input_lens"], tokens, rows=rows)
        num_tokens = float(sum(len(tokens[i]) for i in rows))  # the loss is a mean over the tokens it scores
        loss = loss_sum / max(1.0, num_tokens)
        return loss, {"loss": loss.detach(), "utterances": float(len(tokens))}, num_tokens

    def validate(self, model: nn.Module, loader) -> Dict[str, float]:
        totals = {"loss": 0.0, "weight": 0.0, "errors": 0.0, "ref_words": 0.0, "num_utterances": 0.0}
        for batch in loader:
            tokens = _transcripts(batch)
            totals["num_utterances"] += len(tokens)
            rows = _rows_with_frames(model, batch)
            totals["loss"] += float(model(batch["inputs"], batch["input_lens"], tokens, rows=rows))
            totals["weight"] += float(sum(len(tokens[i]) for i in rows))
            for hyp, ref in zip(model.greedy(batch["inputs"], batch["input_lens"]), batch["texts"]):
                counts = align_counts(ref.split(), self.tokenizer.decode(hyp).split())
                totals["errors"] += counts.errors
                totals["ref_words"] += counts.ref_words
        return totals


def _rows_with_frames(model: nn.Module, batch: Dict) -> List[int]:
    """The rows the loss scores (not utterances without encoder frames), whose tokens weigh the
    loss. MODEL: the AsrModel, or DistributedDataParallel's wrap."""
    return getattr(model, "module", model).rows_with_frames(batch["input_lens"])


def _transcripts(batch: Dict) -> List[List[int]]:
    """The batch's token ids; the loader leaves them out when a cut has no transcript."""
    if "tokens" not in batch:
        missing = [cut for cut, text in zip(batch["cut_ids"], batch["texts"]) if text is None]
        raise ValueError(f"ASR fine-tuning reads transcripts, but {len(missing)} cut(s) of a batch have none, "
                         f"e.g. {missing[:3]}: data.train_cuts and data.valid_cuts must be transcribed sets")
    return batch["tokens"]


TASKS = {"pretrain": PretrainTask, "asr": AsrFinetuneTask, "lm": LmTask}


def build_task(cfg: Dict):
    name = cfg.get("task")
    if name not in TASKS:
        raise ValueError(f"config 'task' must be one of {sorted(TASKS)}, got {name!r}")
    return TASKS[name](cfg)
