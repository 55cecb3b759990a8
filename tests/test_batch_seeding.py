"""SpecAugment's masks are a function of the batch (seed, epoch, cut ids), not of a worker's RNG
stream: a run resumed mid-epoch with data-loader workers augments as an uninterrupted one."""

import random
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import soundfile
import torch
from lhotse import CutSet, Recording
from torch import nn

from sslasr.bin.compute_fbank import compute_fbank
from sslasr.data.loader import SpeechDataset, build_spec_augment, load_cuts, make_dataloader, spec_augment_batch
from sslasr.data.manifests import write_cuts
from sslasr.train.distributed import DistInfo
from sslasr.train.trainer import Trainer

SPEC = dict(time_warp_factor=None, num_feature_masks=2, features_mask_size=20, num_frame_masks=2,
            frames_mask_size=10, max_frames_mask_fraction=0.4, p=1.0)


def _augment(features, lens, key):
    return spec_augment_batch(features, lens, build_spec_augment(SPEC), key)


def test_a_batch_gets_the_same_masks_wherever_the_random_streams_are():
    features, lens = torch.randn(2, 50, 40), torch.tensor([50, 37])
    torch.manual_seed(1), random.seed(1), np.random.seed(1)
    first = _augment(features, lens, "0|0|a|b")
    after = (random.random(), float(np.random.rand()), float(torch.rand(())))
    torch.manual_seed(99), random.seed(99), np.random.seed(99)
    assert torch.equal(_augment(features, lens, "0|0|a|b"), first)
    torch.manual_seed(1), random.seed(1), np.random.seed(1)
    _augment(features, lens, "other")
    # the global streams go on as if nothing had drawn from them
    assert (random.random(), float(np.random.rand()), float(torch.rand(()))) == after
    assert not torch.equal(first, features)
    assert not torch.equal(_augment(features, lens, "0|0|a|c"), first)


def test_a_batch_seed_leaves_the_accelerators_generators_alone(monkeypatch):
    """With 0 loader workers the batch is augmented in the training process: reseeding the GPU's
    generator there (torch.manual_seed does) made its dropout follow the batch key."""
    reseeded = []
    monkeypatch.setattr(torch.cuda, "manual_seed_all", lambda seed: reseeded.append(seed))
    monkeypatch.setattr(torch.cuda, "manual_seed", lambda seed: reseeded.append(seed))
    _augment(torch.randn(2, 50, 40), torch.tensor([50, 37]), "0|0|a|b")
    assert reseeded == []


def test_the_batch_key_holds_the_seed_the_epoch_and_the_cut_ids():
    dataset = SpeechDataset("fbank", spec_augment=build_spec_augment(SPEC), seed=3)
    cuts = [SimpleNamespace(id="a"), SimpleNamespace(id="b")]
    keys = {dataset.augmentation_key(cuts), dataset.augmentation_key(cuts[:1])}
    dataset.set_epoch(1)
    keys.add(dataset.augmentation_key(cuts))
    keys.add(SpeechDataset("fbank", seed=4).augmentation_key(cuts))
    assert len(keys) == 4


def test_utterance_mixing_is_keyed_by_the_epoch_too(tmp_path):
    """Keyed by the cut ids alone, a batch that recurred in a later epoch (or a later k-means
    iteration's training) was mixed exactly as before; SpecAugment's key has the epoch."""
    from sslasr.data.mixing import build_mixer
    rng = np.random.default_rng(0)
    recordings = []
    for i in range(3):
        soundfile.write(tmp_path / f"u{i}.wav", (0.1 * rng.standard_normal(16000)).astype(np.float32), 16000)
        recordings.append(Recording.from_file(tmp_path / f"u{i}.wav", recording_id=f"u{i}"))
    cuts = CutSet.from_manifests(recordings=recordings)
    dataset = SpeechDataset("waveform", utterance_mixing=build_mixer({"prob": 1.0}, 0), seed=0)
    first, again = dataset[cuts]["inputs"], dataset[cuts]["inputs"]
    dataset.set_epoch(1)
    later = dataset[cuts]["inputs"]
    assert torch.equal(first, again) and not torch.equal(first, later)


@pytest.fixture(scope="module")
def fbank_cuts(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("fbank")
    rng = np.random.default_rng(0)
    recordings = []
    for i in range(4):
        soundfile.write(root / f"u{i}.wav", (0.1 * rng.standard_normal(8000)).astype(np.float32), 16000)
        recordings.append(Recording.from_file(root / f"u{i}.wav", recording_id=f"u{i}"))
    write_cuts(CutSet.from_manifests(recordings=recordings), root / "cuts.jsonl.gz")
    compute_fbank(root / "cuts.jsonl.gz", root / "fbank.jsonl.gz", root / "storage", num_jobs=1)
    return root / "fbank.jsonl.gz"


def _batches(loader, batches_done: int):
    task = SimpleNamespace(model=nn.Linear(1, 1))
    trainer = Trainer({"trainer": {"max_updates": 1, "seed": 5}, "optim": {"lr": 0.1}}, task, Path("."), DistInfo())
    trainer.epoch, trainer.batches_done = 1, batches_done
    epoch = trainer._epoch_batches(loader)
    return {tuple(b["cut_ids"]): b["inputs"] for b in iter(lambda: next(epoch), None)}


def test_resumed_epoch_with_workers_augments_as_an_uninterrupted_one(fbank_cuts):
    loader = make_dataloader(load_cuts(fbank_cuts), input_type="fbank", max_duration=100, max_cuts=1,
                             shuffle=True, num_buckets=2, num_workers=2, seed=5, spec_augment=SPEC)
    whole, resumed = _batches(loader, 0), _batches(loader, 2)
    assert loader.dataset.epoch == 1  # the trainer tells the dataset (its workers) the epoch
    assert len(whole) == 4 and len(resumed) == 2
    for cut_ids, inputs in resumed.items():  # made by other workers, at other points of their streams
        assert torch.equal(inputs, whole[cut_ids])
    # ... and augmented there: the same batches without SpecAugment differ from them
    plain = _batches(make_dataloader(load_cuts(fbank_cuts), input_type="fbank", max_duration=100, max_cuts=1,
                                     shuffle=True, num_buckets=2, num_workers=2, seed=5), 2)
    assert plain.keys() == resumed.keys()
    assert all(not torch.equal(inputs, plain[cut_ids]) for cut_ids, inputs in resumed.items())
