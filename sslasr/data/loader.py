"""Batches from lhotse cut manifests: dynamic-bucketing sampler + a collating Dataset.

Resuming mid-epoch: lhotse samplers are deterministic given (cuts, seed, epoch, world_size).
Either save ``loader.sampler.state_dict()`` and restore it with ``load_state_dict()`` on a
freshly built sampler (lhotse fast-forwards it), or -- exact even with prefetching workers,
whose sampler runs ahead of the consumed batches -- call ``sampler.set_epoch(epoch)`` and skip
the number of batches the trainer actually consumed (what ``sslasr.train.trainer`` does).
"""

import contextlib
import hashlib
import logging
import math
import random
from pathlib import Path
from typing import Dict, Iterable, Optional, Tuple, Union

import numpy as np
import torch
from lhotse import CutSet, load_manifest_lazy
from lhotse.dataset import DynamicBucketingSampler, SimpleCutSampler
from lhotse.dataset.collation import collate_features
from lhotse.utils import compute_num_samples
from lhotse.dataset.signal_transforms import SpecAugment
from lhotse.lazy import LazySlicer
from torch.utils.data import DataLoader, Dataset

from sslasr.data.mixing import UtteranceMixer, build_mixer, mixing_stats
from sslasr.data.tokenizer import RESERVED_SYMBOLS, Tokenizer

log = logging.getLogger(__name__)

INPUT_TYPES = ("waveform", "fbank")
TARGET_PAD = -100  # frames without a label in padded `targets` (cross-entropy's ignore_index)


def load_cuts(path: Union[str, Path]) -> CutSet:
    """A lazy CutSet (read while iterating), as DynamicBucketingSampler expects."""
    cuts = load_manifest_lazy(path)
    if cuts is None:
        raise ValueError(f"{path}: empty cut manifest")
    if not isinstance(cuts, CutSet):
        raise TypeError(f"{path}: expected a cut manifest, got {type(cuts).__name__}")
    return cuts


def feature_type(cuts_path: Union[str, Path]) -> Optional[str]:
    """The extractor of a manifest's stored features (lhotse's features.type of its first cut; one
    stage-2 run computes a whole manifest), None for a manifest without features."""
    first = next(iter(load_cuts(cuts_path)))
    return first.features.type if first.has_features else None


def computed_frames(cuts: CutSet, lens: torch.Tensor) -> torch.Tensor:
    """The cuts' frame counts (lhotse's, LENS) less the frames SeamlessFbank repeated to make them
    up: counted, they moved every frame's per-bin normalisation away from what an imported
    w2v-BERT 2.0 was trained on, and made a last frame pair it never saw."""
    from sslasr.bin.compute_fbank import SeamlessFbank  # (it imports this module)
    computed = [SeamlessFbank.frames_in(compute_num_samples(cut.duration, cut.sampling_rate), cut.sampling_rate)
                if cut.features.type == SeamlessFbank.name else length for cut, length in zip(cuts, lens.tolist())]
    return torch.minimum(lens, torch.tensor(computed, dtype=lens.dtype))


def check_feature_type(cuts_path: Union[str, Path], expected: Optional[str], model: str) -> None:
    """An fbank model reads the features it was trained on: another extractor's (say Kaldi's
    default fbank, which stage 2 computed before w2v-BERT 2.0's) shifts every filter and frame,
    and the model would run on them without a word. EXPECTED None: not recorded, not checked."""
    found = feature_type(cuts_path)
    if expected is not None and found is not None and found != expected:
        raise ValueError(f"{cuts_path} holds {found} features, but {model} reads {expected} features: compute "
                         f"them again (stage 2 with --force true) or use a model trained on {found}")


def refuse_several_supervisions(cuts: Iterable, where: str = "") -> None:
    """One transcript per cut is read (a training target, a scored reference): the first of a
    cut's several would stand for the whole audio."""
    several = [c.id for c in cuts if len(c.supervisions) > 1]
    if several:
        raise ValueError(f"{where}{len(several)} cut(s) with several supervisions, e.g. {several[:3]}: one transcript "
                         "per cut is read; split them (lhotse's trim_to_supervisions) or merge the texts")


# fairseq normalises with F.layer_norm (eps 1e-5); transformers' Wav2Vec2FeatureExtractor adds
# 1e-7 to the variance, which an imported model's config says (data.normalize_eps)
NORMALIZE_EPS = 1e-5


def waveform_normalization(data: Dict) -> Dict:
    """make_dataloader's normalisation arguments from a config's data section."""
    return {"normalize_waveform": bool(data.get("normalize_waveform", False)),
            "normalize_eps": float(data.get("normalize_eps", NORMALIZE_EPS))}


def normalize_waveforms(audio: torch.Tensor, lens: torch.Tensor, eps: float = NORMALIZE_EPS) -> torch.Tensor:
    """Zero mean / unit variance over each utterance's real samples; padding stays 0. EPS is
    added to the variance: it decides how much a near-silent recording is amplified."""
    mask = torch.arange(audio.shape[1]).unsqueeze(0) < lens.unsqueeze(1)
    count = lens.clamp(min=1).unsqueeze(1).to(audio.dtype)
    mean = (audio * mask).sum(1, keepdim=True) / count
    var = (((audio - mean) * mask) ** 2).sum(1, keepdim=True) / count
    return (audio - mean) / torch.sqrt(var + eps) * mask


def collate_waveforms(cuts: CutSet):
    """Zero-padded (B, T) float32 samples and their lengths. Resampling (recording transforms)
    happens inside lhotse's loading; multi-channel audio is averaged to mono. Written here
    because lhotse's collate_vectors copies element-wise in Python and dominated loading."""
    arrays = []
    for cut in cuts:
        audio = cut.load_audio()
        arrays.append(audio.mean(axis=0) if audio.shape[0] > 1 else audio[0])
    lens = torch.tensor([len(a) for a in arrays], dtype=torch.long)
    batch = torch.zeros(len(arrays), int(lens.max()), dtype=torch.float32)
    for row, samples in zip(batch, arrays):
        row[: len(samples)] = torch.from_numpy(np.ascontiguousarray(samples, dtype=np.float32))
    return batch, lens


def collate_targets(cuts: CutSet, field: str) -> torch.Tensor:
    """Each cut's frame labels from its TemporalArray custom field `field` (e.g. k-means
    targets written by sslasr.bin.kmeans), padded with TARGET_PAD to a (B, frames) LongTensor."""
    missing = [c.id for c in cuts if not c.has_custom(field)]
    if missing:
        raise ValueError(f"cuts without the {field!r} labels field (data.targets_field): {missing[:5]}")
    arrays = [np.asarray(c.load_custom(field)).reshape(-1) for c in cuts]
    targets = torch.full((len(arrays), max(len(a) for a in arrays)), TARGET_PAD, dtype=torch.long)
    for row, labels in zip(targets, arrays):
        row[: len(labels)] = torch.from_numpy(labels.astype(np.int64))
    return targets


SPEC_AUGMENT_KEYS = ("time_warp_factor", "num_feature_masks", "features_mask_size", "num_frame_masks",
                     "frames_mask_size", "max_frames_mask_fraction", "p")


def build_spec_augment(cfg: Optional[Dict]) -> Optional[SpecAugment]:
    """lhotse's SpecAugment (Park et al. 2019: time warp, F frequency masks, T time masks) from
    the YAML `data.spec_augment` mapping; None (or no mapping) means off."""
    if cfg is None:
        return None
    unknown = sorted(set(cfg) - set(SPEC_AUGMENT_KEYS))
    if unknown:
        raise ValueError(f"data.spec_augment: unknown keys {unknown}; known: {', '.join(SPEC_AUGMENT_KEYS)}")
    # lhotse divides by these (num_frame_masks 0 did not turn time masks off: it failed)
    small = [key for key in ("num_frame_masks", "frames_mask_size") if key in cfg and not cfg[key] >= 1]
    small += ["max_frames_mask_fraction"] if not cfg.get("max_frames_mask_fraction", 0.15) > 0 else []
    if small:
        raise ValueError(f"data.spec_augment: {', '.join(small)} must be positive (num_frame_masks and "
                         "frames_mask_size at least 1): lhotse's SpecAugment always draws time masks")
    return SpecAugment(**cfg)


def _time_masks_fit(transform: SpecAugment, frames: int) -> bool:
    """Whether lhotse's time masks of an utterance of FRAMES are at least a frame wide: its width
    is min(frames_mask_size, fraction * T // masks), and a width of 0 fails (about 65 ms and
    shorter at the usual 0.15; evaluation splits and lowered --min-duration keep such cuts)."""
    total = transform.max_frames_mask_fraction * frames
    masks = min(transform.num_frame_masks, math.ceil(total / transform.frames_mask_size))
    return masks >= 1 and min(transform.frames_mask_size, total // masks) >= 1


def spec_augment_batch(features: torch.Tensor, lens: torch.Tensor, transform: SpecAugment,
                       key: Optional[str] = None) -> torch.Tensor:
    """Augment each utterance over its own frames only: the warp, the mask widths (a fraction of
    the utterance) and the mask value (its mean) never involve the batch's padding. With a KEY
    (the batch's identity) the masks are a function of it alone, see seeded_global_rngs. An
    utterance too short for a time mask a frame wide is left as it is."""
    features = features.clone()
    with seeded_global_rngs(key) if key is not None else contextlib.nullcontext():
        for row, length in zip(features, lens.tolist()):
            if _time_masks_fit(transform, length):
                row[:length] = transform(row[None, :length])[0]
    return features


@contextlib.contextmanager
def seeded_global_rngs(key: str):
    """Python's, numpy's and torch's global RNGs seeded from KEY inside, restored after. lhotse's
    SpecAugment draws from these: a worker's stream depends on which batches that worker made
    before (and restarts at the epoch's start after a resume, while the sampler skips ahead), so
    drawing from the batch's own seed is what makes a resumed run augment as an uninterrupted one.
    Restoring keeps everything else drawing from those streams unaffected."""
    digest = hashlib.sha256(key.encode()).digest()
    python_state, numpy_state = random.getstate(), np.random.get_state()
    try:
        with torch.random.fork_rng(devices=[]):
            random.seed(int.from_bytes(digest[:8], "little"))
            np.random.seed(int.from_bytes(digest[8:12], "little"))
            # the CPU generator only (SpecAugment's): torch.manual_seed would also reseed every
            # accelerator's, which fork_rng(devices=[]) does not restore, so with 0 loader workers
            # the training process's GPU dropout would follow the batch key
            torch.default_generator.manual_seed(int.from_bytes(digest[12:20], "little") & (2 ** 63 - 1))
            yield
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)


class SpeechDataset(Dataset):
    """Maps a CutSet mini-batch (from a lhotse sampler) to a dict of tensors.

    Keys: ``inputs`` ((B, T) samples or (B, T, F) fbank), ``input_lens`` (LongTensor),
    ``cut_ids``, ``durations`` (seconds), ``texts`` (None where a cut has no transcript), with a
    tokenizer and transcripts for every cut ``tokens`` (list of id lists), and with a
    ``targets_field`` the cuts' frame labels ``targets`` ((B, frames) LongTensor, TARGET_PAD-padded).
    With an ``utterance_mixing`` mixer (WavLM pretraining) the waveforms are mixed, the targets
    stay the clean cuts' labels, and ``mixing`` counts the mixed and noise utterances.
    SpecAugment's masks and the mixing depend on (seed, epoch, the batch's cut ids) only: call ``set_epoch``
    before each epoch's loader iterator is made (workers copy the dataset then).
    """

    def __init__(self, input_type: str, tokenizer: Optional[Tokenizer] = None, normalize_waveform: bool = False,
                 normalize_eps: float = NORMALIZE_EPS, targets_field: Optional[str] = None,
                 spec_augment: Optional[SpecAugment] = None,
                 utterance_mixing: Optional[UtteranceMixer] = None, seed: int = 0):
        if input_type not in INPUT_TYPES:
            raise ValueError(f"input_type must be one of {INPUT_TYPES}, got {input_type!r}")
        if utterance_mixing is not None and input_type != "waveform":
            raise ValueError(f"utterance mixing works on waveforms, but the inputs are {input_type}")
        self.utterance_mixing = utterance_mixing  # training batches only: None for evaluation
        if spec_augment is not None and input_type != "fbank":
            raise ValueError(f"data.spec_augment works on fbank features, but the inputs are {input_type}s")
        self.spec_augment = spec_augment  # training batches only: the caller passes None for evaluation
        self.input_type = input_type
        self.tokenizer = tokenizer
        # wav2vec2 "base" was trained on raw samples, "large" on normalised ones: keep both.
        self.normalize_waveform, self.normalize_eps = normalize_waveform, normalize_eps
        self.targets_field = targets_field
        self.seed, self.epoch = seed, 0

    def set_epoch(self, epoch: int) -> None:
        """In the augmentation's seed: a batch that recurs in a later epoch gets other masks."""
        self.epoch = epoch

    def augmentation_key(self, cuts: CutSet) -> str:
        return f"{self.seed}|{self.epoch}|" + "|".join(c.id for c in cuts)

    def __getitem__(self, cuts: CutSet) -> Dict:
        inputs, input_lens, mixing = self._inputs(cuts)
        texts = [c.supervisions[0].text if c.supervisions else None for c in cuts]
        batch = {"inputs": inputs, "input_lens": input_lens.long(), "cut_ids": [c.id for c in cuts],
                 "texts": texts, "durations": [c.duration for c in cuts]}
        if self.tokenizer is not None:
            refuse_several_supervisions(cuts)
        if self.tokenizer is not None and all(t is not None for t in texts):
            batch["tokens"] = self.tokenizer.encode_batch(texts)
            spelt = [c.id for c, ids in zip(cuts, batch["tokens"]) if self.tokenizer.spells_reserved(ids)]
            if spelt:  # CTC would take a blank as a target, the decoders an <eos> mid-sentence
                raise ValueError(f"the transcripts of {len(spelt)} cuts (e.g. {spelt[0]}) spell the tokenizer's "
                                 f"reserved symbols {' '.join(RESERVED_SYMBOLS)}: take them out of the manifest "
                                 f"(Kaldi-folder preparation drops such utterances, counted)")
            unknown = [t for t, ids in zip(texts, batch["tokens"]) if self.tokenizer.unk_id in ids]
            if unknown:  # trained on as <unk>: say so, the text normalisation may be missing a step
                log.warning("%d of %d transcripts have characters outside the tokenizer (%s), read as <unk>: "
                            "e.g. %r", len(unknown), len(texts), self.tokenizer.model_path, unknown[0][:80])
            empty = [c.id for c, ids in zip(cuts, batch["tokens"]) if not ids]
            if empty:  # a target of no tokens: the model is taught that this audio says nothing
                log.warning("%d of %d transcripts are empty (no tokens): read as silence, e.g. cut %s",
                            len(empty), len(texts), empty[0])
        if self.targets_field:
            batch["targets"] = collate_targets(cuts, self.targets_field)
        if mixing is not None:
            batch["mixing"] = mixing
        return batch

    def _inputs(self, cuts: CutSet):
        """(inputs, lengths, mixing counts or None)."""
        if self.input_type == "fbank":
            missing = [c.id for c in cuts if not c.has_features]
            if missing:
                raise ValueError(f"cuts without stored features (run sslasr.bin.compute_fbank): {missing[:5]}")
            features, lens = collate_features(cuts)
            lens = computed_frames(cuts, lens)
            if self.spec_augment is not None:
                features = spec_augment_batch(features, lens, self.spec_augment, self.augmentation_key(cuts))
            return features, lens, None
        audio, lens = collate_waveforms(cuts)
        mixing = None
        if self.utterance_mixing is not None:  # before normalising: the model sees the mixture's statistics
            # keyed as SpecAugment: a batch that recurs in a later epoch is mixed anew
            audio, mixes = self.utterance_mixing(audio, lens, cuts[0].sampling_rate, key=self.augmentation_key(cuts))
            mixing = mixing_stats(mixes)
        if self.normalize_waveform:
            audio = normalize_waveforms(audio, lens, self.normalize_eps)
        return audio, lens, mixing


SHUFFLE_BUFFER = 20000  # lhotse's default buffer_size


def make_sampler(cuts: CutSet, *, max_duration: float, shuffle: bool, seed: int = 0, num_buckets: int = 10,
                 drop_last: bool = False, world_size: Optional[int] = None, rank: Optional[int] = None,
                 max_cuts: Optional[int] = None, buffer_size: int = SHUFFLE_BUFFER):
    """Training: bucketed + shuffled. The sampler reads the manifest in order and draws batches at
    random from the `buffer_size` cuts it holds, so a manifest sorted by speaker is shuffled only
    within that window: a corpus of more cuts than the buffer is visited in manifest order, each
    epoch alike (data.buffer_size covering the corpus shuffles all of it, at ~2 KB a cut).
    max_duration bounds a batch's summed durations, not its padded size: lhotse's batcher takes
    the cut that crosses the limit, and a batch is padded to its longest cut (with few buckets,
    up to ~1.4x the limit measured on LibriSpeech-like durations; more with cuts longer than the
    last bucket). Size memory for that, not for max_duration alone.
    Evaluation (shuffle=False): manifest order, every cut kept --
    over DDP ranks every cut exactly once: rank r of W takes the cuts at indices i % W == r.

    lhotse's own rank split pads the ranks to equal batch counts with copies of cuts (ids ending
    in ``_dup``): training needs the equal counts (DDP's gradient sync), but a validation summed
    over ranks would count those cuts twice. Evaluation needs no lockstep (the trainer validates
    the unwrapped model), so the ranks' shares may differ by a batch."""
    if shuffle:
        return DynamicBucketingSampler(cuts, max_duration=max_duration, max_cuts=max_cuts, shuffle=True,
                                       seed=seed, num_buckets=num_buckets, drop_last=drop_last,
                                       world_size=world_size, rank=rank, buffer_size=buffer_size)
    world_size, rank = _ddp_position(world_size, rank)
    share = cuts if world_size == 1 else CutSet(LazySlicer(cuts, k=rank, n=world_size))
    return SimpleCutSampler(share, max_duration=max_duration, max_cuts=max_cuts, shuffle=False,
                            drop_last=drop_last, world_size=1, rank=0, seed=seed)


def _ddp_position(world_size: Optional[int], rank: Optional[int]) -> Tuple[int, int]:
    """(world_size, rank), each taken from torch.distributed where not given (as lhotse does)."""
    initialized = torch.distributed.is_available() and torch.distributed.is_initialized()
    if world_size is None:
        world_size = torch.distributed.get_world_size() if initialized else 1
    if rank is None:
        rank = torch.distributed.get_rank() if initialized else 0
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not one of the {world_size} ranks")
    return world_size, rank


def make_dataloader(cuts: CutSet, *, input_type: str, max_duration: float, shuffle: bool, seed: int = 0,
                    num_buckets: int = 10, buffer_size: int = SHUFFLE_BUFFER, num_workers: int = 0,
                    tokenizer: Optional[Tokenizer] = None,
                    drop_last: bool = False, world_size: Optional[int] = None, rank: Optional[int] = None,
                    max_cuts: Optional[int] = None, normalize_waveform: bool = False,
                    normalize_eps: float = NORMALIZE_EPS, targets_field: Optional[str] = None,
                    spec_augment: Optional[Dict] = None,
                    utterance_mixing: Optional[Dict] = None) -> DataLoader:
    """DataLoader yielding SpeechDataset dicts; the sampler (``loader.sampler``) makes the batches.

    Call ``loader.sampler.set_epoch(epoch)`` before each epoch so shuffling differs per epoch.
    Caution: with shuffle=True, lhotse's ``drop_last`` drops the incomplete batch of *every*
    bucket, which on a 10-minute labeled set can drop most (or all) cuts; with drop_last=False
    DDP training ranks still get equal batch counts (lhotse redistributes, duplicating at most a
    few cuts). Evaluation ranks split the cuts without copies (see make_sampler).
    """
    sampler = make_sampler(cuts, max_duration=max_duration, shuffle=shuffle, seed=seed,
                           num_buckets=num_buckets, drop_last=drop_last, world_size=world_size,
                           rank=rank, max_cuts=max_cuts, buffer_size=buffer_size)
    dataset = SpeechDataset(input_type, tokenizer=tokenizer, normalize_waveform=normalize_waveform,
                            normalize_eps=normalize_eps, targets_field=targets_field,
                            spec_augment=build_spec_augment(spec_augment),
                            utterance_mixing=build_mixer(utterance_mixing, seed), seed=seed)
    return DataLoader(dataset, batch_size=None, sampler=sampler, num_workers=num_workers,
                      persistent_workers=False)
