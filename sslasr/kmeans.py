"""k-means frame targets for HuBERT (Hsu et al. 2021 §II-B; fairseq's simple_kmeans recipe).

Each iteration clusters frame features (MFCC first, then a Transformer layer of the previous
iteration's model, see `sslasr.data.frame_features`) and labels every frame with its nearest
centre; the next model learns to predict those labels.

Memory bound: nothing here holds more than a fixed number of frames, however much audio there is.
  * Sampling: the frames of a random `cuts_fraction` of the cuts stream in cut by cut, and a
    reservoir (Algorithm R, Vitter 1985) keeps a uniform random sample of at most
    `frames_budget` of them in one (budget, D) float32 array, allocated once; a cut's frames
    are dropped as soon as the reservoir has seen them.
  * Fitting: mini-batch k-means (Sculley 2010) with k-means++ initialisation (Arthur &
    Vassilvitskii 2007) runs on that sample only: its extra memory is a batch, an init subset
    and the (k, D) centres.
  * Labelling: one cut at a time, distances in blocks of `assign_block_frames` frames.
tests/test_hubert.py measures it: the peak traced memory of sampling + fitting does not grow when
the stream of frames grows 4× at a fixed budget.
"""

import logging
import math
from dataclasses import dataclass, field, fields
from typing import Dict, Iterable, Iterator, List, Optional, Tuple

import numpy as np
import torch

log = logging.getLogger(__name__)

FEATURE_KINDS = ("mfcc", "layer")
INIT_KINDS = ("random", "previous")


@dataclass
class KMeansIteration:
    """One HuBERT iteration: the features clustered, how many clusters, how long to pretrain."""

    features: str                  # "mfcc" (13 MFCC + Δ + ΔΔ, 100 Hz) or "layer" (hidden features)
    clusters: int
    layer: Optional[int] = None    # 1-based Transformer layer of the previous model ("layer" only)
    updates: Optional[int] = None  # pretraining updates of this iteration (None: trainer.max_updates)
    # The model this iteration's pretraining starts from: "random", a new one (the paper), or
    # "previous", the previous iteration's encoder trained on (the updates add up: for short budgets)
    init: str = "random"

    def __post_init__(self):
        if self.features not in FEATURE_KINDS:
            raise ValueError(f"k-means features must be one of {FEATURE_KINDS}, got {self.features!r}")
        if not isinstance(self.clusters, int) or self.clusters < 2:
            raise ValueError(f"k-means clusters must be an integer ≥ 2, got {self.clusters!r}")
        if self.features == "layer" and (not isinstance(self.layer, int) or self.layer < 1):
            raise ValueError(f"features: layer needs `layer`, a 1-based Transformer layer, got {self.layer!r}")
        if self.updates is not None and (not isinstance(self.updates, int) or self.updates < 1):
            raise ValueError(f"iteration updates must be an integer ≥ 1, got {self.updates!r}")
        if self.init not in INIT_KINDS:
            raise ValueError(f"iteration init must be one of {INIT_KINDS}, got {self.init!r}")


@dataclass
class KMeansConfig:
    """The `kmeans` section of a frontend config. Defaults: fairseq's learn_kmeans.py (sklearn
    MiniBatchKMeans: batch 10000, 100 epochs, k-means++ best of 20, init on 3 batches, all
    utterances unless --percent); `frames_budget` caps what the fit holds in memory."""

    iterations: List[KMeansIteration] = field(default_factory=list)
    cuts_fraction: float = 1.0       # cuts (drawn at random) whose frames reach the sample: fairseq's --percent
    frames_budget: int = 1_000_000   # most frames the fit holds: a uniform sample of those frames
    batch_size: int = 10_000
    max_epochs: int = 100
    max_no_improvement: int = 100   # stop after this many batches without a better smoothed inertia
    n_init: int = 20
    init_size: Optional[int] = None  # frames k-means++ runs on; None: 3 × batch_size
    assign_block_frames: int = 8192  # frames per distance block when labelling
    targets_field: str = "kmeans_labels"  # the cuts' custom field holding the labels
    seed: int = 0

    @classmethod
    def from_dict(cls, d: Optional[Dict]) -> "KMeansConfig":
        d = dict(d or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown kmeans options {unknown}; known: {sorted(known)}")
        iterations = []
        for number, it in enumerate(d.get("iterations", []), start=1):
            extra = sorted(set(it) - {f.name for f in fields(KMeansIteration)})
            if extra:
                raise ValueError(f"kmeans iteration {number}: unknown keys {extra}")
            iterations.append(KMeansIteration(**it))
        if iterations and iterations[0].init == "previous":
            raise ValueError("kmeans iteration 1 has no previous iteration to start from (init: previous)")
        d["iterations"] = iterations
        cfg = cls(**d)
        if not 0 < cfg.cuts_fraction <= 1:
            raise ValueError(f"kmeans.cuts_fraction must be in (0, 1], got {cfg.cuts_fraction}")
        for name in ("frames_budget", "batch_size", "max_epochs", "max_no_improvement", "n_init",
                     "assign_block_frames"):
            if getattr(cfg, name) < 1:
                raise ValueError(f"kmeans.{name} must be ≥ 1, got {getattr(cfg, name)}")
        return cfg

    def iteration(self, number: int) -> KMeansIteration:
        """1-based, as the recipe numbers them (exp/pretrain_hubert/iter1, ...)."""
        if not 1 <= number <= len(self.iterations):
            raise ValueError(f"iteration {number} is not configured (kmeans.iterations has {len(self.iterations)})")
        return self.iterations[number - 1]


# ---------------------------------------------------------------------- sampling
class FrameReservoir:
    """A uniform random sample of at most `capacity` frames of a stream of (T, D) blocks.

    Algorithm R: the i-th frame seen (0-based) draws j ~ U{0..i} and takes slot j when
    j < capacity, so every frame seen so far is in the sample with the same probability.
    Memory: one (capacity, D) float32 array, allocated at the first block.
    """

    def __init__(self, capacity: int, seed: int = 0):
        if capacity < 1:
            raise ValueError(f"reservoir capacity must be ≥ 1, got {capacity}")
        self.capacity = capacity
        self.rng = np.random.default_rng(seed)
        self.buffer: Optional[np.ndarray] = None
        self.filled = 0
        self.seen = 0

    def add(self, frames: np.ndarray) -> None:
        frames = np.asarray(frames, dtype=np.float32)
        if frames.ndim != 2:
            raise ValueError(f"frames must be (T, D), got shape {frames.shape}")
        if self.buffer is None:
            self.buffer = np.empty((self.capacity, frames.shape[1]), dtype=np.float32)
        elif frames.shape[1] != self.buffer.shape[1]:
            raise ValueError(f"frames of dimension {frames.shape[1]} after frames of {self.buffer.shape[1]}")
        fill = min(len(frames), self.capacity - self.filled)
        self.buffer[self.filled:self.filled + fill] = frames[:fill]
        self.filled += fill
        rest = frames[fill:]
        if len(rest):
            first = self.seen + fill
            slots = self.rng.integers(0, np.arange(first, first + len(rest)) + 1)
            taken = np.flatnonzero(slots < self.capacity)
            # A slot drawn twice keeps the later frame, as the sequential algorithm would.
            reversed_slots = slots[taken][::-1]
            _, first_in_reversed = np.unique(reversed_slots, return_index=True)
            last = taken[len(taken) - 1 - first_in_reversed]
            self.buffer[slots[last]] = rest[last]
        self.seen += len(frames)

    @property
    def sample(self) -> np.ndarray:
        if self.buffer is None:
            raise ValueError("the reservoir saw no frames")
        return self.buffer[:self.filled]


def chosen_cuts(cuts: Iterable, fraction: float, seed: int = 0) -> Iterator:
    """Each cut kept with probability FRACTION (fairseq's --percent), drawn from a stream of its
    own: drawn from the reservoir's (sample_frames with the same seed), which frames the sample
    kept depended on which cuts were chosen (some frames 15 times likelier than others)."""
    rng = np.random.default_rng([seed, 1])
    return (cut for cut in cuts if rng.random() < fraction)


def sample_frames(blocks: Iterable[np.ndarray], budget: int, seed: int = 0) -> Tuple[np.ndarray, int]:
    """A uniform sample of at most `budget` frames of the stream, and how many frames it had."""
    reservoir = FrameReservoir(budget, seed)
    for block in blocks:
        reservoir.add(block)
    if reservoir.seen == 0:
        raise ValueError("no frames to cluster: no cuts, empty cuts, or a kmeans.cuts_fraction that chose none")
    return reservoir.sample, reservoir.seen


# ---------------------------------------------------------------------- k-means
def nearest_centers(frames: torch.Tensor, centers: torch.Tensor, block_frames: int = 8192
                    ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Index of the nearest centre of each frame and its squared distance, computed
    ‖x‖² − 2 x·c + ‖c‖² in blocks of `block_frames` frames (a block × k matrix at a time)."""
    if frames.shape[-1] != centers.shape[-1]:
        raise ValueError(f"frames of dimension {frames.shape[-1]} for centres of dimension {centers.shape[-1]}")
    center_norms = centers.pow(2).sum(1)
    labels, distances = [], []
    for start in range(0, len(frames), block_frames):
        block = frames[start:start + block_frames]
        d = (block.pow(2).sum(1, keepdim=True) - 2 * block @ centers.t() + center_norms).clamp_min_(0)
        best, index = d.min(1)
        labels.append(index)
        distances.append(best)
    if not labels:
        return torch.zeros(0, dtype=torch.long), torch.zeros(0)
    return torch.cat(labels), torch.cat(distances)


def kmeans_plus_plus(points: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """k centres drawn from `points`: the first uniformly, each next one with probability
    proportional to its squared distance D(x)² to the nearest centre chosen so far."""
    centers = torch.empty(k, points.shape[1], dtype=points.dtype)
    first = int(torch.randint(len(points), (1,), generator=generator))
    centers[0] = points[first]
    closest = (points - centers[0]).pow(2).sum(1)
    for i in range(1, k):
        total = float(closest.sum())
        if total > 0:
            pick = int(torch.multinomial(closest / total, 1, generator=generator))
        else:  # fewer distinct points than k: any point will do
            pick = int(torch.randint(len(points), (1,), generator=generator))
        centers[i] = points[pick]
        closest = torch.minimum(closest, (points - centers[i]).pow(2).sum(1))
    return centers


def initial_centers(points: torch.Tensor, clusters: int, cfg: KMeansConfig, generator: torch.Generator
                    ) -> torch.Tensor:
    """The best (lowest inertia on the init subset) of `n_init` k-means++ draws from a random
    subset of `init_size` points."""
    init_size = min(len(points), max(cfg.init_size or 3 * cfg.batch_size, clusters))
    init_points = points[torch.randperm(len(points), generator=generator)[:init_size]]
    best_inertia, best = math.inf, None
    for _ in range(cfg.n_init):
        candidate = kmeans_plus_plus(init_points, clusters, generator)
        inertia = float(nearest_centers(init_points, candidate, cfg.assign_block_frames)[1].sum())
        if best is None or inertia < best_inertia:
            best_inertia, best = inertia, candidate
    return best


def fit_kmeans(sample: np.ndarray, clusters: int, cfg: KMeansConfig) -> torch.Tensor:
    """Mini-batch k-means on the sample → (clusters, D) centres, from `initial_centers`.

    Each step assigns a random batch to its nearest centres and moves every centre c hit by
    n_c frames of sum s_c towards their mean with a per-centre rate 1/N_c (N_c: frames it has
    absorbed so far): c ← c + (s_c − n_c·c)/N_c. Stops after `max_epochs` passes' worth of
    batches, or once the smoothed batch inertia has not improved for `max_no_improvement` steps.
    """
    points = torch.from_numpy(np.ascontiguousarray(sample, dtype=np.float32))
    n = len(points)
    if n < clusters:
        raise ValueError(f"{n} sampled frames cannot make {clusters} clusters: raise kmeans.frames_budget "
                         f"(or give more audio) or use fewer clusters")
    generator = torch.Generator().manual_seed(cfg.seed)
    centers = initial_centers(points, clusters, cfg, generator)
    batch_size = min(cfg.batch_size, n)
    counts = torch.zeros(clusters)
    smoothing = min(1.0, 2.0 * batch_size / (n + 1))  # sklearn's EWA weight of one batch
    smoothed, best, stale = None, math.inf, 0
    steps = cfg.max_epochs * math.ceil(n / batch_size)
    for step in range(steps):
        batch = points[torch.randint(n, (batch_size,), generator=generator)]
        labels, distances = nearest_centers(batch, centers, cfg.assign_block_frames)
        hits = torch.bincount(labels, minlength=clusters).float()
        sums = torch.zeros_like(centers).index_add_(0, labels, batch)
        counts += hits
        moved = hits > 0
        centers[moved] += (sums[moved] - hits[moved, None] * centers[moved]) / counts[moved, None]
        inertia = float(distances.mean())
        smoothed = inertia if smoothed is None else (1 - smoothing) * smoothed + smoothing * inertia
        if smoothed < best:
            best, stale = smoothed, 0
        else:
            stale += 1
            if stale >= cfg.max_no_improvement:
                log.info("k-means converged after %d of %d steps (smoothed inertia %.4g)", step + 1, steps, best)
                break
    return centers


# ---------------------------------------------------------------------- usage and labelling
def cluster_usage(counts: np.ndarray) -> Dict[str, float]:
    """How evenly the labels use the clusters: used and empty clusters, and the perplexity
    exp(H(p)) of the usage distribution p (= the number of clusters when all are equally used)."""
    counts = np.asarray(counts, dtype=np.float64)
    total = counts.sum()
    p = counts[counts > 0] / max(total, 1.0)
    return {"clusters": int(len(counts)), "frames": int(total), "used": int((counts > 0).sum()),
            "empty": int((counts == 0).sum()), "perplexity": float(np.exp(-(p * np.log(p)).sum())) if total else 0.0}


def log_usage(what: str, usage: Dict[str, float]) -> None:
    log.info("%s: %d frames use %d of %d clusters (%d empty), usage perplexity %.1f", what, usage["frames"],
             usage["used"], usage["clusters"], usage["empty"], usage["perplexity"])


def assign_labels(frames: np.ndarray, centers: torch.Tensor, block_frames: int = 8192) -> np.ndarray:
    """Nearest-centre label of each frame of a (T, D) array, as int32."""
    features = torch.from_numpy(np.ascontiguousarray(frames, dtype=np.float32))
    return nearest_centers(features, centers, block_frames)[0].numpy().astype(np.int32)


def label_cuts(cuts_and_features: Iterable[Tuple], centers: torch.Tensor, writer, field_name: str,
               frame_rate: float, counts: np.ndarray, block_frames: int = 8192) -> Iterator:
    """For each (cut, (T, D) features), yield the cut with its frame labels stored through
    `writer` (a lhotse features writer) as the TemporalArray custom field `field_name`
    (frame_shift 1/frame_rate, so lhotse can slice it with the cut); `counts` accumulates
    cluster usage. One cut's features are needed at a time."""
    for cut, features in cuts_and_features:
        labels = assign_labels(features, centers, block_frames)
        counts += np.bincount(labels, minlength=len(counts))
        stored = writer.store_array(cut.id, labels, frame_shift=1.0 / frame_rate, temporal_dim=0, start=cut.start)
        yield cut.with_custom(field_name, stored)
