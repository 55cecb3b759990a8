"""Frame features that HuBERT's k-means turns into targets (Hsu et al. 2021 §III-B).

Iteration 1 clusters MFCCs: 13 cepstra + Δ + ΔΔ = 39 dims at 100 Hz (lhotse's pure-torch
Kaldi-style MFCC; the deltas as Kaldi's / torchaudio's compute_deltas with a 5-frame window).
Later iterations cluster the output of one Transformer layer of the previous iteration's model,
at the encoder frame rate (16000 / 320 = 50 Hz). Every extractor maps one cut to a (T, D)
float32 array and tells its `frame_rate` (frames per second) and `dim`; `cut_features` runs
one over many cuts, in order, optionally in several processes.
"""

import collections
import multiprocessing
import warnings
from pathlib import Path
from typing import Deque, Dict, Iterable, Iterator, Optional, Tuple, Union

import numpy as np
import torch
from lhotse import Mfcc, MfccConfig
from lhotse.utils import compute_num_frames

from sslasr.data.loader import normalize_waveforms, waveform_normalization
from sslasr.models.frontends import get_frontend

MFCC_CEPSTRA = 13
DELTA_WINDOW = 2  # N: Δ_t uses frames t−N..t+N (Kaldi's and torchaudio's default 5-frame window)


def deltas(features: np.ndarray, window: int = DELTA_WINDOW) -> np.ndarray:
    """Regression deltas over time of (T, D) features, edges replicated:
        Δ_t = Σ_{n=1..N} n·(c_{t+n} − c_{t−n}) / (2·Σ_{n=1..N} n²)"""
    padded = np.pad(features, ((window, window), (0, 0)), mode="edge")
    steps = len(features)
    numerator = sum(n * (padded[window + n:window + n + steps] - padded[window - n:window - n + steps])
                    for n in range(1, window + 1))
    return (numerator / (2 * sum(n * n for n in range(1, window + 1)))).astype(features.dtype)


def pad_to_one_window(samples, window_seconds: float, sampling_rate: int):
    """SAMPLES (numpy or torch, time last) zero-padded at the end to at least one analysis window."""
    missing = round(window_seconds * sampling_rate) - samples.shape[-1]
    if missing <= 0:
        return samples
    if isinstance(samples, torch.Tensor):
        return torch.nn.functional.pad(samples, (0, missing))
    return np.pad(samples, [(0, 0)] * (samples.ndim - 1) + [(0, missing)])


def mono_samples(cut) -> np.ndarray:
    """The cut's audio as one channel (channels averaged, as the training data loader does)."""
    audio = cut.load_audio()
    return audio.mean(axis=0) if audio.shape[0] > 1 else audio[0]


class MfccFeatures:
    """13 MFCC + Δ + ΔΔ per 10 ms frame (25 ms window), no normalisation, as fairseq's
    HuBERT MFCC dump."""

    frame_rate = 100.0
    dim = 3 * MFCC_CEPSTRA
    # recorded with a k-means fitted on them: labels are assigned with the same features only (a
    # k-means without it was fitted when the mel filters stopped at Nyquist − 400 Hz, lhotse's default)
    definition = "kaldi-mfcc 13 ceps, 23 mel 20 Hz-Nyquist, lifter 22, snip_edges; +delta+delta2 (N=2)"

    def __init__(self):
        self._extractors: Dict[int, Mfcc] = {}

    def _extractor(self, sampling_rate: int) -> Mfcc:
        if sampling_rate not in self._extractors:
            # high_freq 0: the mel filters reach Nyquist, as torchaudio's kaldi.mfcc (fairseq's dump);
            # lhotse's default stops them 400 Hz below it
            config = MfccConfig(num_ceps=MFCC_CEPSTRA, sampling_rate=sampling_rate, snip_edges=True, high_freq=0.0)
            self._extractors[sampling_rate] = Mfcc(config)
        return self._extractors[sampling_rate]

    def __call__(self, cut) -> np.ndarray:
        """Frame t covers samples [160t, 160t + 400) at 16 kHz, as fairseq's dump (torchaudio's
        Kaldi MFCC, snip_edges): frame 2t covers encoder frame t's [320t, 320t + 400) exactly, and is
        its label at 50 Hz (align_targets takes every second one, as fairseq).
        lhotse's default centres frames on the shift, 7.5 ms before the encoder frame they label.
        The last frame is repeated up to lhotse's count (round(duration / 10 ms), one or two
        more), which the labels' storage assumes; audio shorter than one window is zero-padded
        to one (lhotse's extractor fails under 10 ms), and under 5 ms has no frames."""
        samples = mono_samples(cut)
        wanted = compute_num_frames(len(samples) / cut.sampling_rate, 1 / self.frame_rate, cut.sampling_rate)
        if wanted == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        samples = pad_to_one_window(samples, MfccConfig().frame_length, cut.sampling_rate)
        with warnings.catch_warnings():  # lhotse's note that its frame counts assume snip_edges=False
            warnings.simplefilter("ignore", UserWarning)
            mfcc = self._extractor(cut.sampling_rate).extract(samples, cut.sampling_rate)
        mfcc = mfcc[np.minimum(np.arange(wanted), len(mfcc) - 1)]
        delta = deltas(mfcc)
        return np.concatenate([mfcc, delta, deltas(delta)], axis=1).astype(np.float32)


class HiddenLayerFeatures:
    """Output of Transformer layer `layer` (1-based) of a pretrained model's encoder, one cut at
    a time (no padding, so a cut's features never depend on its batch), in eval mode, on DEVICE."""

    def __init__(self, checkpoint: Union[str, Path], layer: int, device: Union[str, torch.device] = "cpu"):
        state = torch.load(checkpoint, map_location="cpu", weights_only=False)
        cfg = state["config"]
        self.encoder = get_frontend(cfg["frontend"]).build_encoder(cfg["frontend"]["encoder"])
        weights = {k[len("encoder."):]: v for k, v in state["model"].items() if k.startswith("encoder.")}
        if not weights:
            raise ValueError(f"{checkpoint} holds no encoder.* weights")
        self.encoder.load_state_dict(weights)
        self.device = torch.device(device)
        self.encoder.to(self.device).eval()
        num_layers = len(self.encoder.transformer.layers)
        if not 1 <= layer <= num_layers:
            raise ValueError(f"layer {layer} does not exist: the model in {checkpoint} has {num_layers} layers")
        self.layer = layer
        self.normalization = waveform_normalization(cfg.get("data", {}))  # as in training
        self.sample_rate = int(cfg.get("pretrain", {}).get("sample_rate", 16000))
        self.frame_rate = self.sample_rate / self.encoder.frame_shift_samples
        self.dim = self.encoder.output_dim

    @torch.no_grad()
    def __call__(self, cut) -> np.ndarray:
        if cut.sampling_rate != self.sample_rate:
            raise ValueError(f"cut {cut.id} is sampled at {cut.sampling_rate} Hz, the model at {self.sample_rate} Hz")
        samples = torch.from_numpy(np.ascontiguousarray(mono_samples(cut), dtype=np.float32)).unsqueeze(0)
        lengths = torch.tensor([samples.shape[1]])
        if self.normalization["normalize_waveform"]:
            samples = normalize_waveforms(samples, lengths, self.normalization["normalize_eps"])
        out = self.encoder(samples.to(self.device), lengths.to(self.device), return_all=True)
        return out.layers[self.layer][0, : int(out.lengths[0])].float().cpu().numpy()


def encoder_frame_rate(encoder_cfg: Dict, sample_rate: int = 16000) -> float:
    """Frames per second of a conv feature encoder from its config (sample rate / Π strides); a
    config that names no conv_layers has the encoder's default (wav2vec 2.0 base's) stack."""
    from sslasr.models.wav2vec2 import BASE_CONV_LAYERS
    stride = 1
    for _, _, layer_stride in encoder_cfg.get("conv_layers", BASE_CONV_LAYERS):
        stride *= layer_stride
    return sample_rate / stride


def build_features(kind: str, model: Optional[Union[str, Path]] = None, layer: Optional[int] = None,
                   device: Union[str, torch.device] = "cpu"):
    if kind == "mfcc":
        return MfccFeatures()
    if kind == "layer":
        if model is None:
            raise ValueError("layer features need the previous iteration's model (--model)")
        return HiddenLayerFeatures(model, layer, device)
    raise ValueError(f"unknown frame features {kind!r}: 'mfcc' or 'layer'")


# Cuts in flight per worker process: enough to keep each busy while the consumer reads a result,
# few enough that the features computed ahead stay a few utterances' worth.
PENDING_PER_JOB = 2

# One extractor per worker process, built by its initializer (a model is loaded once per worker).
_worker_features = None


def _start_worker(kind: str, model, layer) -> None:
    global _worker_features
    torch.set_num_threads(1)
    _worker_features = build_features(kind, model, layer)


def _cut_and_features(cut) -> Tuple:
    return cut, _worker_features(cut)


def cut_features(cuts: Iterable, kind: str, model=None, layer: Optional[int] = None,
                 num_jobs: int = 1, device: Union[str, torch.device] = "cpu") -> Iterator[Tuple]:
    """(cut, (T, D) features) for every cut, in the input order. With num_jobs > 1 that many
    single-threaded worker processes compute them (at most PENDING_PER_JOB cuts per worker in
    flight); the result is the same as num_jobs = 1. A model's layer on a GPU is computed in this
    process (num_jobs is ignored: one process feeds the GPU, and CUDA does not survive a fork)."""
    on_gpu = kind == "layer" and torch.device(device).type != "cpu"
    if num_jobs <= 1 or on_gpu:
        features = build_features(kind, model, layer, device if on_gpu else "cpu")
        for cut in cuts:
            yield cut, features(cut)
        return
    with multiprocessing.get_context("fork").Pool(num_jobs, _start_worker, (kind, model, layer)) as pool:
        yield from _bounded_imap(pool, _cut_and_features, cuts, PENDING_PER_JOB * num_jobs)


def _bounded_imap(pool, function, items: Iterable, max_pending: int) -> Iterator:
    """pool.imap with at most MAX_PENDING results computed ahead of the consumer, in order.
    pool.imap queues every item at once and keeps every finished result until it is read, so a
    consumer slower than the workers (k-means, labelling) makes memory grow without bound."""
    pending: Deque = collections.deque()
    for item in items:
        pending.append(pool.apply_async(function, (item,)))
        if len(pending) >= max_pending:
            yield pending.popleft().get()
    while pending:
        yield pending.popleft().get()
