"""The one training loop every stage uses (SSL pretraining, fine-tuning, LM, students).

What it guarantees:
  * gradient accumulation (`accum_grad` micro-batches per update) to emulate large batches;
  * DDP under torchrun, each rank reading its own shard of the lhotse sampler;
  * an update's gradient is the mean over everything the update saw, whatever the micro-batch
    and rank it came from: each micro-batch's loss counts by its weight (tokens, masked frames)
    as fairseq does, so a short micro-batch or a rank with little data does not count as much
    as a full one;
  * training means in the logs are over every rank's micro-batches, not rank 0's alone;
  * an update whose loss or gradient norm is NaN/Inf is skipped on every rank alike (the
    decision is all-reduced), counted and logged;
  * atomic checkpoints every `checkpoint_every` updates holding everything a resumed run
    needs (model, optimizer, scaler, position in the epoch, every rank's RNG state), so a
    rerun after a kill continues exactly where the last checkpoint left off;
  * TensorBoard scalars and a tqdm bar on rank 0;
  * `final_model: average` makes model_final.pt the parameter average of the `average_models`
    (default 5) best validated models (by `best_metric`, default WER where the task reports it,
    else loss; ESPnet's N-best averaging) instead of the last update: each validation that enters
    the N best is written to model_valid_<update>.pt, and the list of them is part of the
    checkpoint, so a resumed run keeps exactly the models its checkpoint knew of. `final_model:
    best` is the one-model case of the same list.
"""

import logging
import math
import os
import pickle
import random
import time
from collections import defaultdict
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Protocol, Tuple, Union

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Sampler
from tqdm import tqdm

from sslasr.train.config_check import FINAL_MODELS
from sslasr.train.distributed import DistInfo, all_gather_objects, all_reduce_sum, barrier, broadcast_buffers
from sslasr.train.schedules import build_lr_scale
from sslasr.utils.io import remove_temp_files, save_torch_atomic

log = logging.getLogger(__name__)

# Test hook: exit abruptly (like SIGKILL, no cleanup) right after this many updates.
_EXIT_AFTER_ENV = "SSLASR_DEBUG_EXIT_AFTER_UPDATES"


class Task(Protocol):
    """What a stage supplies to the trainer."""

    model: nn.Module

    def train_dataloader(self, dist: DistInfo) -> DataLoader: ...

    def valid_dataloader(self, dist: DistInfo) -> Optional[DataLoader]: ...

    def forward(self, model: nn.Module, batch: Dict) -> Tuple[torch.Tensor, Dict[str, float], float]:
        """Loss to back-propagate (a mean over the batch), stats to log (floats, or 0-dim tensors
        the trainer reads only when it logs them), and their weight: what the mean is over (tokens,
        masked frames), by which the loss counts among an update's micro-batches and ranks."""

    def on_update(self, model: nn.Module, num_updates: int) -> None: ...

    # optional: on_log(metrics), the training means of a log line, e.g. to warn about them

    def validate(self, model: nn.Module, loader: DataLoader) -> Dict[str, float]: ...


class SkipBatches(Sampler):
    """Wraps a lhotse sampler and drops the first `skip` batches of the epoch: with the same
    seed and epoch the sampler is deterministic, so this lands exactly where a killed run was."""

    def __init__(self, sampler, skip: int):
        self.sampler, self.skip = sampler, skip

    def __iter__(self):
        iterator = iter(self.sampler)
        for _ in range(self.skip):
            if next(iterator, None) is None:
                break
        return iterator

    def __len__(self):  # pragma: no cover - lhotse samplers have no length
        raise TypeError("lhotse samplers have no length")


class Trainer:
    def __init__(self, cfg: Dict, task: Task, exp_dir: Path, dist: DistInfo):
        self.cfg, self.task, self.dist = cfg, task, dist
        self.exp_dir = Path(exp_dir)
        tcfg = cfg["trainer"]
        self.max_updates: int = tcfg["max_updates"]
        self.accum_grad: int = tcfg.get("accum_grad", 1)
        self.clip_grad_norm: float = tcfg.get("clip_grad_norm", 0.0)
        self.log_every: int = tcfg.get("log_every", 50)
        self.valid_every: int = tcfg.get("valid_every", 0)
        self.checkpoint_every: int = tcfg.get("checkpoint_every", 500)
        self.amp = tcfg.get("amp", "none")
        self.checkpoint_path = self.exp_dir / "checkpoint_last.pt"
        self.final_model: str = tcfg.get("final_model", "last")
        self.best_metric: Optional[str] = tcfg.get("best_metric")
        if self.final_model not in FINAL_MODELS:
            raise ValueError(f"trainer.final_model must be one of {', '.join(FINAL_MODELS)}, got {self.final_model!r}")
        self.average_models: int = tcfg.get("average_models", 5)
        if self.average_models < 1:
            raise ValueError(f"trainer.average_models must be at least 1, got {self.average_models}")
        # how many validated models to keep on disk: the best one, the N best, or none
        self.models_kept = {"best": 1, "average": self.average_models}.get(self.final_model, 0)

        self.model = task.model.to(dist.device)
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        ocfg = cfg["optim"]
        self.optimizer_settings = dict(betas=tuple(ocfg.get("betas", (0.9, 0.98))), eps=ocfg.get("eps", 1e-6),
                                       weight_decay=ocfg.get("weight_decay", 0.01))
        self.optimizer = torch.optim.AdamW(trainable, lr=ocfg["lr"], **self.optimizer_settings)
        self.peak_lr = ocfg["lr"]
        self.lr_scale = build_lr_scale(cfg.get("scheduler", {}), self.max_updates)
        self.scaler = torch.amp.GradScaler(dist.device.type, enabled=self.amp == "fp16")
        self.wrapped = self.model
        if dist.is_distributed:
            self.wrapped = nn.parallel.DistributedDataParallel(
                self.model, device_ids=[dist.device.index] if dist.device.type == "cuda" else None,
                find_unused_parameters=tcfg.get("find_unused_parameters", True))

        self.num_updates = 0
        self.epoch = 0
        self.batches_done = 0  # micro-batches of the current epoch already consumed
        self.skipped_updates = 0
        # Under DDP, the ranks' common divisor of each micro-batch's weight in its backward (DDP
        # sums the ranks' gradients before the update's total weight is known): the previous
        # update's mean micro-batch weight, so the accumulated gradient keeps its usual size (fp16).
        self.weight_scale: Optional[float] = None
        self.best_valid: Optional[float] = None
        self.kept_models: List[Tuple[float, int]] = []  # (metric, update) of the models_kept best
        self.validated_at = -1  # the update last validated (a resumed run validates no update twice)
        self.writer = None

    # ------------------------------------------------------------------ state
    def _rng_state(self) -> Dict:
        """This rank's streams; on a GPU its own device's only (the rank that resumes it may see
        the GPUs under other indices: another CUDA_VISIBLE_DEVICES or node layout)."""
        on_gpu = self.dist.device.type == "cuda"
        return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
                "cuda_device": torch.cuda.get_rng_state(self.dist.device) if on_gpu else None}

    def _set_rng_state(self, state: Dict) -> None:
        torch.set_rng_state(state["torch"])
        np.random.set_state(state["numpy"])
        random.setstate(state["python"])
        if state.get("cuda_device") is not None and self.dist.device.type == "cuda":
            torch.cuda.set_rng_state(state["cuda_device"], self.dist.device)
        elif state.get("cuda") is not None and self.dist.device.type == "cuda":  # before 2026-12-07: every GPU's
            log.warning("this checkpoint holds the random states of every GPU its ranks saw: this rank's "
                        "GPU stream starts afresh")

    def save_checkpoint(self) -> None:
        rng_states = all_gather_objects(self._rng_state())
        if self.dist.is_main:
            state = {
                "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scaler": self.scaler.state_dict(), "num_updates": self.num_updates, "epoch": self.epoch,
                "batches_done": self.batches_done, "skipped_updates": self.skipped_updates,
                "best_valid": self.best_valid, "kept_models": self.kept_models, "rng": rng_states,
                "validated_at": self.validated_at,
                "weight_scale": self.weight_scale,
                "world_size": self.dist.world_size, "config": self.cfg,
            }
            save_torch_atomic(state, self.checkpoint_path)
            self._remove_unkept_models()  # only now: the checkpoint no longer lists them
        barrier()

    def maybe_resume(self) -> bool:
        if not self.checkpoint_path.exists():
            return False
        # on the CPU: the RNG states must stay there; load_state_dict moves the rest to the model's device
        try:
            state = torch.load(self.checkpoint_path, map_location="cpu", weights_only=False)
        except (RuntimeError, EOFError, pickle.UnpicklingError) as e:  # torch's message names no file
            raise RuntimeError(f"{self.checkpoint_path} cannot be read ({type(e).__name__}: {e}): remove it to "
                               "start this training again, or put back a copy") from e
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        for group in self.optimizer.param_groups:  # the config's (load_state_dict took the checkpoint's),
            group.update(self.optimizer_settings)  # as the learning rate is: a changed weight decay applies
        if state["scaler"]:  # (a run without fp16 saved its disabled scaler's empty state: fp16 starts afresh)
            self.scaler.load_state_dict(state["scaler"])
        self.num_updates, self.epoch = state["num_updates"], state["epoch"]
        self.batches_done, self.skipped_updates = state["batches_done"], state["skipped_updates"]
        self.best_valid = state["best_valid"]
        self.validated_at = state.get("validated_at", -1)  # (older checkpoints: not known)
        self.weight_scale = state.get("weight_scale")
        # a rerun may keep fewer (average_models lowered, final_model best): the best of them
        self.kept_models = [tuple(entry) for entry in state.get("kept_models", [])][:self.models_kept]
        rng = state["rng"]
        if len(rng) == self.dist.world_size:
            self._set_rng_state(rng[self.dist.rank])
        else:
            self.batches_done = self._batches_done_on_this_world_size(len(rng), state["batches_done"])
        if self.dist.is_main:
            log.info("resumed from %s at update %d (epoch %d, batch %d)", self.checkpoint_path,
                     self.num_updates, self.epoch, self.batches_done)
            changed = config_changes(state.get("config"), self.cfg)
            if changed:  # e.g. max_updates raised to train on; other changes alter what is resumed
                log.warning("resuming under another config than the checkpoint's (the batch order, learning "
                            "rate and what the final model records follow the new one): %s", "; ".join(changed))
        return True

    def _check_ranks_agree_on_the_start(self) -> None:
        """Every rank reads checkpoint_last.pt itself: a node that sees another exp dir (a local
        disk, a lagging network filesystem) would start elsewhere, and train on for hours with its
        own weights. Stop at once instead."""
        if not self.dist.is_distributed:
            return
        starts = all_gather_objects((self.num_updates, self.epoch))
        if len(set(starts)) > 1:
            raise RuntimeError(f"the ranks start from different points (update, epoch) {starts}: each rank "
                               f"reads {self.checkpoint_path}, which must be one shared directory")

    def _batches_done_on_this_world_size(self, old_world_size: int, batches_done: int) -> int:
        """Each of the old ranks had consumed `batches_done` batches of the epoch: the new ranks
        share those out, rounded up so that no batch is trained on twice. Which cuts a batch holds
        depends on the world size, so the position is approximate; the RNG streams restart."""
        consumed = old_world_size * batches_done
        per_rank = -(-consumed // self.dist.world_size)
        if self.dist.is_main:
            log.warning("checkpoint was written by %d ranks, now %d: RNG streams restart, and the epoch "
                        "resumes after %d batches per rank (%d per rank before)", old_world_size,
                        self.dist.world_size, per_rank, batches_done)
        return per_rank

    # ------------------------------------------------------------------ loop
    def _epoch_batches(self, loader: DataLoader) -> Iterator[Optional[Dict]]:
        """This rank's batches for the current epoch, resuming mid-epoch; then None forever."""
        sampler = loader.sampler
        sampler.set_epoch(self.epoch)
        if hasattr(loader.dataset, "set_epoch"):  # before the iterator: workers copy the dataset then
            loader.dataset.set_epoch(self.epoch)
        # Its own generator: creating a DataLoader iterator draws from the global RNG, which
        # would make a resumed run's masks and dropout differ from an uninterrupted run's. The
        # workers' RNGs are seeded from it, but their streams restart at the epoch's start on a
        # resume, while SkipBatches starts later: augmentation that must match an uninterrupted
        # run seeds itself per batch (SpeechDataset's SpecAugment, utterance mixing).
        seed = self.cfg["trainer"].get("seed", 0) * 100003 + self.epoch + self.dist.rank * 1_000_003
        generator = torch.Generator().manual_seed(seed)
        resumed = DataLoader(loader.dataset, batch_size=None, sampler=SkipBatches(sampler, self.batches_done),
                             num_workers=loader.num_workers, persistent_workers=False, generator=generator)
        for batch in resumed:
            yield to_device(batch, self.dist.device)
        while True:
            yield None

    def _next_batch(self, batches: Iterator[Optional[Dict]]) -> Optional[Dict]:
        """Next micro-batch, or None once any rank has run out (so all ranks stop together)."""
        batch = next(batches)
        if not self.dist.is_distributed:  # no one to agree with: no device round trip
            return batch
        exhausted = torch.tensor([0.0 if batch is not None else 1.0], device=self.dist.device)
        if all_reduce_sum(exhausted).item() > 0:
            return None
        return batch

    def fit(self) -> None:
        self.exp_dir.mkdir(parents=True, exist_ok=True)
        self.maybe_resume()
        self._check_ranks_agree_on_the_start()
        if self.dist.is_main:
            # an earlier run's, or a killed run's written after its last checkpoint: not this run's
            self._remove_unkept_models()
            self._remove_temp_files()
            from torch.utils.tensorboard import SummaryWriter
            # a killed run's events after its checkpoint are hidden; those of the checkpoint's own
            # update (train means, validation) were written before it was saved, and stay
            self.writer = SummaryWriter(str(self.exp_dir / "tensorboard"), purge_step=self.num_updates + 1)
        train_loader = self.task.train_dataloader(self.dist)
        valid_loader = self.task.valid_dataloader(self.dist)
        if self.models_kept and valid_loader is None:  # found now, not after the last update
            raise RuntimeError(f"trainer.final_model={self.final_model} picks validated models, but the task "
                               "has no validation data")
        self.task.on_update(self.model, self.num_updates)
        exit_after = int(os.environ.get(_EXIT_AFTER_ENV, "0"))
        bar = tqdm(total=self.max_updates, initial=self.num_updates, disable=not self.dist.is_main,
                   dynamic_ncols=True, desc=self.exp_dir.name)
        interval = _Interval()
        batches = self._epoch_batches(train_loader)
        empty_epochs = 0
        while self.num_updates < self.max_updates:
            micro, fetch_start = [], time.perf_counter()  # an update's time includes loading its batches
            for _ in range(self.accum_grad):
                batch = self._next_batch(batches)
                if batch is None:
                    break
                micro.append(batch)
            if not micro:  # epoch over on some rank: start the next one everywhere
                empty_epochs = empty_epochs + 1 if self.batches_done == 0 else 0
                if empty_epochs > 1:
                    raise RuntimeError(self._no_batches_message())
                self.epoch, self.batches_done = self.epoch + 1, 0
                batches = self._epoch_batches(train_loader)
                continue
            self._update(micro, interval, fetch_start)
            self.batches_done += len(micro)
            bar.update(1)
            if self.num_updates % self.log_every == 0:
                self._log_interval(interval, bar)
            if self.valid_every and valid_loader is not None and self.num_updates % self.valid_every == 0:
                self._validate(valid_loader)
            if self.num_updates % self.checkpoint_every == 0:
                self.save_checkpoint()
            if exit_after and self.num_updates >= exit_after:
                os._exit(137)
        if interval.weights:  # the updates since the last log line (max_updates not a multiple of log_every)
            self._log_interval(interval, bar)
        bar.close()
        # killed after the last validation's checkpoint, a rerun validated the update again: with
        # other random masks in pretraining, another metric for it went into kept_models
        validated_last_update = self.validated_at == self.num_updates or (
            bool(self.valid_every) and self.num_updates % self.valid_every == 0)
        if valid_loader is not None and not validated_last_update:
            self.save_checkpoint()  # the updates are safe whatever the validation does (a wrong best_metric)
            self._validate(valid_loader)
        self.save_checkpoint()
        if self.dist.is_main:
            self._write_final_model()
            log.info("finished %d updates (%d skipped: non-finite loss or gradient, fp16 overflows included)",
                     self.num_updates, self.skipped_updates)
            self.writer.close()

    def _write_final_model(self) -> None:
        if self.final_model == "last":
            final = self._model_file()
        elif not self.kept_models:
            raise RuntimeError(f"trainer.final_model={self.final_model}, but no validation ever ran, or none "
                               "gave a finite metric: give the task validation data, or see the warnings above")
        elif self.final_model == "average":
            final = self._averaged_model_file()
        else:
            final = torch.load(self._kept_model_path(self.kept_models[0][1]), map_location="cpu", weights_only=False)
            final["config"] = self.cfg  # the run's config, as the last model's file has it
            log.info("model_final.pt: the best validated model, update %d of %d (%s)", final["num_updates"],
                     self.num_updates, " ".join(f"{k}={v:.4g}" for k, v in final["valid"].items()))
        save_torch_atomic(final, self.exp_dir / "model_final.pt")

    def _no_batches_message(self) -> str:
        if not self.dist.is_distributed:
            return "the training data loader yields no batches"
        # an epoch ends on every rank when one runs out: one rank's empty shard stops them all
        return (f"the training data loader yields no batches on at least one of the {self.dist.world_size} "
                "ranks: every rank needs a batch per epoch (fewer batches than ranks, and a sampler that "
                "does not pad its ranks' shards to equal counts?)")

    def _update(self, micro, interval: "_Interval", start: float) -> None:
        """One optimizer update from the micro-batches MICRO, fetched from START (perf_counter)."""
        self.model.train()
        self.task.on_update(self.model, self.num_updates)
        lr = self.peak_lr * self.lr_scale(self.num_updates)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)
        # read from the device once per update (the skip decision): an accelerator runs ahead of
        # the host until then (bench/host_syncs.py counts a step's reads)
        finite = torch.ones((), dtype=torch.bool, device=self.dist.device)  # every loss
        local_weight, scale = 0.0, None
        batch_stats = _Interval()  # logged only if the update is taken: one NaN would make the log line's mean NaN
        for i, batch in enumerate(micro):
            sync = i == len(micro) - 1 or not self.dist.is_distributed
            context = self.wrapped.no_sync() if not sync else _null_context()
            with context:
                with self._autocast():  # the forward only: backward runs in the forward's dtypes
                    loss, stats, weight = self.task.forward(self.wrapped, batch)
                weight = float(weight)
                finite &= torch.isfinite(loss.detach()).to(finite.device)
                scale = scale or self._weight_scale(weight)
                # backward of weight·loss / scale (× 1.0 exactly for one process and micro-batch);
                # _normalise_gradients divides by Σ weight / scale
                self.scaler.scale(loss * (weight / scale)).backward()
            local_weight += weight
            batch_stats.add(stats, weight)
        self.scaler.unscale_(self.optimizer)
        params = [p for p in self.model.parameters() if p.grad is not None]
        raw_norm = torch.nn.utils.get_total_norm([p.grad for p in params]) if params else torch.zeros(())
        # Every rank must agree on skipping, or their weights would drift apart: one reduction of
        # (ranks with a non-finite loss, ranks with a non-finite gradient, the update's weight), one read.
        bad_loss, bad_grad, total_weight = all_reduce_sum(torch.stack([
            (~finite).double(), (~torch.isfinite(raw_norm)).double().to(finite.device),
            torch.tensor(local_weight, dtype=torch.float64, device=finite.device)])).tolist()
        if bad_loss or bad_grad or total_weight <= 0:
            self.skipped_updates += 1
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.update()
            if self.dist.is_main and not bad_loss and not bad_grad:
                log.warning("update %d: its batches have no weight (no tokens or masked frames), skipped "
                            "(%d so far)", self.num_updates + 1, self.skipped_updates)
            elif self.dist.is_main and not bad_loss and self.amp == "fp16":  # the loss scaler's routine
                log.info("update %d: fp16 gradients overflowed, skipped; loss scale now %g (%d skipped so far)",
                         self.num_updates + 1, self.scaler.get_scale(), self.skipped_updates)
            elif self.dist.is_main:
                log.warning("update %d: non-finite %s, skipped (%d so far)", self.num_updates + 1,
                            "loss" if bad_loss else "gradient", self.skipped_updates)
            interval.add({"skipped": 1.0}, 1.0)
        else:
            interval.absorb(batch_stats)
            grad_norm = self._normalise_gradients(params, raw_norm, scale / total_weight)
            self.scaler.step(self.optimizer)
            self.scaler.update()
            interval.add({"grad_norm": grad_norm.detach(), "lr": lr}, 1.0)
        if self.dist.is_distributed:
            self.weight_scale = total_weight / (self.dist.world_size * len(micro)) or self.weight_scale
        elapsed = time.perf_counter() - start
        audio_seconds = sum(sum(batch.get("durations", ())) for batch in micro)
        interval.add({"seconds_per_update": elapsed}, 1.0)
        # weighted by the time: the interval's mean is its total audio over its total time
        interval.add({"audio_seconds_per_second": audio_seconds / elapsed}, elapsed)
        self.num_updates += 1

    def _weight_scale(self, first_weight: float) -> float:
        """What the micro-batches' weights are divided by in their backward: any constant common to
        the ranks gives the same update, since _normalise_gradients multiplies it back. One process
        takes its update's first weight; ranks take the previous update's mean micro-batch weight,
        agreed once at the first update."""
        if not self.dist.is_distributed:
            return first_weight or 1.0
        if self.weight_scale is None:
            mean = all_reduce_sum(torch.tensor([first_weight], dtype=torch.float64, device=self.dist.device))
            self.weight_scale = mean.item() / self.dist.world_size or 1.0
        return self.weight_scale

    def _normalise_gradients(self, params: List[torch.Tensor], raw_norm: torch.Tensor,
                             scale_per_weight: float) -> torch.Tensor:
        """The accumulated gradients hold Σ w·∇loss / scale, averaged over the ranks by DDP:
        times ranks · scale / Σ w makes them the weighted mean over the update's micro-batches, and
        clipping to clip_grad_norm joins the same multiplication. Returns the norm before clipping."""
        factor = self.dist.world_size * scale_per_weight
        norm = raw_norm * factor
        if self.clip_grad_norm:
            factor = factor * torch.clamp(self.clip_grad_norm / (norm + 1e-6), max=1.0)
        if not (isinstance(factor, float) and factor == 1.0):
            torch._foreach_mul_([p.grad for p in params], factor)
        return norm

    def _autocast(self):
        if self.amp in ("bf16", "fp16"):
            dtype = torch.bfloat16 if self.amp == "bf16" else torch.float16
            return torch.autocast(self.dist.device.type, dtype=dtype)
        return _null_context()

    def _validate(self, loader: DataLoader) -> None:
        self.validated_at = self.num_updates
        # rank 0's model is the one saved: every rank validates it, BatchNorm statistics included
        broadcast_buffers(self.model)
        self.model.eval()
        with torch.no_grad():
            stats = self.task.validate(self.model, OnDevice(loader, self.dist.device))
        totals = _sum_over_ranks(stats, self.dist.device)
        metrics = _finalize_valid(totals)
        finalize = getattr(self.task, "finalize_valid", None)  # derived metrics, e.g. perplexity
        if finalize is not None:
            metrics = finalize(metrics)
        self._log(metrics, "valid")
        name = self.best_metric or ("wer" if "wer" in metrics else "loss")
        if name not in metrics and self.best_metric:
            raise KeyError(f"trainer.best_metric {name!r} is not a validation metric of this task "
                           f"(it reports {', '.join(sorted(metrics))})")
        if name in metrics and not math.isfinite(metrics[name]):
            log.warning("update %d: validation %s is %s: ranked below every finite one%s", self.num_updates, name,
                        metrics[name], ", not kept among the best models" if self.models_kept else "")
        if name in metrics and (self.best_valid is None or _rank_key(name, metrics[name]) < _rank_key(name, self.best_valid)):
            self.best_valid = metrics[name]
        if name in metrics and self.models_kept:
            self._keep_if_among_best(name, metrics[name])
        self.model.train()

    # ------------------------------------------------------------------ the best validated models
    def _kept_model_path(self, update: int) -> Path:
        return self.exp_dir / f"model_valid_{update}.pt"

    def _keep_if_among_best(self, name: str, value: float) -> None:
        """Adds this update's model to the N best by metric NAME (ties: the earlier model stays).
        A model that drops out keeps its file until the next checkpoint, which no longer lists it."""
        valid = {name: value}
        others = [entry for entry in self.kept_models if entry[1] != self.num_updates]  # a rerun's revalidation
        if not math.isfinite(value):  # sorted last, it still filled a free place among the averaged models
            self.kept_models = others  # (_validate said so)
            return
        ranked = sorted(others + [(value, self.num_updates)],
                        key=lambda entry: (_rank_key(name, entry[0]), entry[1]))[:self.models_kept]
        if (value, self.num_updates) not in ranked:
            return
        self.kept_models = ranked
        if self.dist.is_main:
            save_torch_atomic(self._model_file(valid=valid), self._kept_model_path(self.num_updates))

    def _remove_unkept_models(self) -> None:
        kept = {self._kept_model_path(update) for _, update in self.kept_models}
        for path in self.exp_dir.glob("model_valid_*.pt"):
            if path not in kept:
                path.unlink()

    def _remove_temp_files(self) -> None:
        """A run killed while saving leaves its temporary file; reruns would pile them up. Only
        this trainer writes these names here: bin/train.py holds the exp dir's lock by now."""
        names = (self.checkpoint_path.name, "model_valid_*.pt", "model_final.pt")  # see _kept_model_path
        removed = sum(remove_temp_files(self.exp_dir, name) for name in names)
        if removed:
            log.info("removed %d temporary files of killed saves from %s", removed, self.exp_dir)

    def _averaged_model_file(self) -> Dict:
        """The mean of the kept models' floating-point tensors (accumulated in float64); other
        entries (integer buffers) are the best model's."""
        files = [torch.load(self._kept_model_path(update), map_location="cpu", weights_only=False)
                 for _, update in self.kept_models]
        averaged = dict(files[0]["model"])
        for key, value in averaged.items():
            if value.is_floating_point():
                total = sum(f["model"][key].double() for f in files)
                averaged[key] = (total / len(files)).to(value.dtype)
        updates = [update for _, update in self.kept_models]
        log.info("model_final.pt: the average of %d best validated models, updates %s (%s)", len(files),
                 ", ".join(map(str, updates)), ", ".join(f"{value:.4g}" for value, _ in self.kept_models))
        return {"model": averaged, "config": self.cfg, "num_updates": self.num_updates, "averaged_updates": updates,
                "valid": [f["valid"] for f in files]}

    def _log_interval(self, interval: "_Interval", bar) -> None:
        """The log line of the updates since the last one (every rank calls it: one reduction)."""
        metrics = interval.flush(self.dist)
        bar.set_postfix(loss=f"{metrics.get('loss', float('nan')):.3f}", refresh=False)
        if hasattr(self.task, "on_log"):
            self.task.on_log(metrics)
        self._log(metrics, "train")

    def _model_file(self, **extra) -> Dict:
        """What model_final.pt / model_valid_<update>.pt hold: the weights, the config, the update count."""
        return {"model": self.model.state_dict(), "config": self.cfg, "num_updates": self.num_updates, **extra}

    def _log(self, metrics: Dict[str, float], split: str) -> None:
        if not self.dist.is_main or not metrics:
            return
        text = " ".join(f"{k}={v:.4g}" for k, v in sorted(metrics.items()))
        log.info("%s update %d: %s", split, self.num_updates, text)
        for key, value in metrics.items():
            self.writer.add_scalar(f"{split}/{key}", value, self.num_updates)
        self.writer.flush()


def to_device(batch, device: torch.device):
    """The batch with every tensor in it (in dicts, lists, tuples) on DEVICE; the rest as it is."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {key: to_device(value, device) for key, value in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(value, device) for value in batch)
    return batch


class OnDevice:
    """Iterates a loader's batches moved to DEVICE (what a task's validate() reads)."""

    def __init__(self, loader, device: torch.device):
        self.loader, self.device = loader, device

    def __iter__(self):
        return (to_device(batch, self.device) for batch in self.loader)


def _sum_over_ranks(stats: Dict[str, float], device: torch.device) -> Dict[str, float]:
    """Each stat summed over the ranks, in one reduction. A rank may lack some (a rank with no
    validation batches reports fewer): the names are agreed first, a missing one counts 0. On the
    rank's device, since NCCL reduces only CUDA tensors."""
    names = sorted(set().union(*all_gather_objects(sorted(stats))))
    values = torch.tensor([float(stats.get(name, 0.0)) for name in names], dtype=torch.float64, device=device)
    return dict(zip(names, all_reduce_sum(values).tolist()))


def config_changes(old: Optional[Dict], new: Dict, prefix: str = "") -> List[str]:
    """`section.key: old -> new` for each setting that differs (a checkpoint without a config: none)."""
    if old is None:
        return []
    changes = []
    for key in sorted(set(old) | set(new), key=str):
        a, b = old.get(key, "(unset)"), new.get(key, "(unset)")
        if isinstance(a, dict) and isinstance(b, dict):
            changes += config_changes(a, b, f"{prefix}{key}.")
        elif a != b:
            changes.append(f"{prefix}{key}: {a} -> {b}")
    return changes


def _rank_key(metric: str, value: float) -> float:
    """Sorts validation values best first: losses, error rates and perplexities are best low,
    accuracies (pretraining's masked_accuracy, ...) high."""
    if not math.isfinite(value):  # NaN compares neither way: sorted would leave it first
        return math.inf
    return -value if metric.endswith("accuracy") else value


def _finalize_valid(totals: Dict[str, float]) -> Dict[str, float]:
    """Validation stats arrive as sums plus a `weight` (and `ref_words` for WER); the means are
    over the weight, counts (`num_*`: what was validated, over every rank) stay totals."""
    weight = totals.pop("weight", 1.0) or 1.0
    metrics = {}
    if "errors" in totals:
        metrics["wer"] = 100.0 * totals.pop("errors") / max(1.0, totals.pop("ref_words", 1.0))
    for key, value in totals.items():
        metrics[key] = value if key.startswith("num_") else value / weight
    return metrics


class _Interval:
    """Weighted running means of logged stats between two log lines. Stats given as tensors are
    summed where they are (on the device) and read in one go by flush()."""

    # per-rank rates whose sum over the ranks is what a reader wants (the job's throughput)
    SUMMED_OVER_RANKS = ("audio_seconds_per_second",)

    def __init__(self):
        self.sums: Dict[str, Union[float, torch.Tensor]] = defaultdict(float)
        self.weights: Dict[str, float] = defaultdict(float)

    def absorb(self, other: "_Interval") -> None:
        """Adds another interval's sums and weights to this one's."""
        for key, value in other.sums.items():
            self.sums[key] = self.sums[key] + value
            self.weights[key] += other.weights[key]

    def add(self, stats: Dict[str, Union[float, torch.Tensor]], weight: float) -> None:
        for key, value in stats.items():
            if isinstance(value, torch.Tensor):
                value = value.detach().float()
            self.sums[key] = self.sums[key] + value * weight
            self.weights[key] += float(weight)

    def flush(self, dist: Optional[DistInfo] = None) -> Dict[str, float]:
        """The means since the last flush; with DIST (every rank calls it at the same update)
        over every rank's micro-batches, in one reduction."""
        tensors = [k for k, v in self.sums.items() if isinstance(v, torch.Tensor)]
        if tensors:
            device = self.sums[tensors[0]].device  # one copy to the host for them all
            values = torch.stack([self.sums[k].reshape(()).to(device) for k in tensors]).tolist()
            self.sums.update(zip(tensors, values))
        sums, weights = dict(self.sums), dict(self.weights)
        ranks = 1
        if dist is not None and dist.is_distributed:
            ranks = dist.world_size
            both = _sum_over_ranks({**{f"sum:{k}": v for k, v in sums.items()},
                                    **{f"weight:{k}": v for k, v in weights.items()}}, dist.device)
            sums = {k[4:]: v for k, v in both.items() if k.startswith("sum:")}
            weights = {k[7:]: v for k, v in both.items() if k.startswith("weight:")}
        out = {k: sums[k] / weights[k] for k in sums if weights.get(k, 0) > 0}
        for key in self.SUMMED_OVER_RANKS:
            if key in out:
                out[key] *= ranks
        if "skipped" in sums:
            out["skipped"] = sums["skipped"] / ranks  # every rank skips the same updates
        self.sums.clear()
        self.weights.clear()
        return out


class _null_context:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
