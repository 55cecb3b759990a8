"""HuBERT: the masked-prediction loss against a hand computation, label-rate alignment, the
pretrainer on a tiny encoder; k-means (recovery, memory bound, streaming labels), features, labels
stored with the cuts and read back by the loader; the recipe at smoke size."""

import copy
import json
import math
import shutil
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
import yaml
from lhotse import CutSet, Recording, RecordingSet
from recipe_smoke import SMOKE, recipe_with_data, run_recipe

from sslasr.bin import kmeans as kmeans_cli
from sslasr.data.frame_features import HiddenLayerFeatures, MfccFeatures, deltas
from sslasr.data.loader import load_cuts, make_dataloader
from sslasr.kmeans import (
    FrameReservoir, KMeansConfig, assign_labels, chosen_cuts, cluster_usage, fit_kmeans, kmeans_plus_plus,
    sample_frames,
)
from sslasr.models.frontends import get_frontend
from sslasr.models.hubert import (
    IGNORE_LABEL, HubertPretrainConfig, HubertPretrainer, MaskedPredictionHead, align_targets,
)
from sslasr.models.wav2vec2 import Wav2Vec2EncoderConfig
from sslasr.train.tasks import PretrainTask
from sslasr.utils.config import load_configs, set_dotted

ROOT = Path(__file__).resolve().parents[1]
torch.set_num_threads(1)

TINY_ENCODER = dict(
    conv_layers=[[16, 10, 5], [16, 8, 4], [16, 4, 4], [16, 4, 4]], conv_norm="group", conv_bias=False,
    feature_grad_mult=0.1, dropout_input=0.0,
    transformer=dict(dim=32, layers=2, heads=2, ffn_dim=64, dropout=0.0, attention_dropout=0.0,
                     activation_dropout=0.0, layer_norm_first=True, layerdrop=0.0, pos_conv_kernel=8,
                     pos_conv_groups=4))


# ---------------------------------------------------------------------- masked prediction loss
def _hand_head(unmasked_weight: float = 0.0) -> MaskedPredictionHead:
    """D = 2, C = 3, A = identity: logits are cos(o_t, e_c)/τ of the vectors below."""
    head = MaskedPredictionHead(2, 3, final_dim=2, logit_temperature=0.5, masked_weight=1.0,
                                unmasked_weight=unmasked_weight)
    with torch.no_grad():
        head.final_proj.weight.copy_(torch.eye(2))
        head.final_proj.bias.zero_()
        head.label_embeddings.copy_(torch.tensor([[1.0, 0.0], [0.0, 2.0], [-1.0, -1.0]]))
    return head


def _hand_ce(o, target, temperature=0.5):
    """−log softmax_c(cos(o, e_c)/τ)[target] with the cosines written out."""
    embeddings = [(1.0, 0.0), (0.0, 2.0), (-1.0, -1.0)]
    norm_o = math.hypot(*o)
    logits = [(o[0] * e[0] + o[1] * e[1]) / (norm_o * math.hypot(*e)) / temperature for e in embeddings]
    log_z = math.log(sum(math.exp(l) for l in logits))
    return log_z - logits[target], max(range(3), key=lambda c: logits[c]) == target


def test_masked_prediction_loss_matches_hand_computation():
    head = _hand_head()
    # one utterance of 5 frames: frames 0, 1, 3 masked; frame 3 has no label; frame 4 is padding
    context = torch.tensor([[[3.0, 4.0], [-1.0, 0.5], [0.2, 0.1], [5.0, 5.0], [1.0, 1.0]]])
    targets = torch.tensor([[0, 2, 1, IGNORE_LABEL, 1]])
    time_mask = torch.tensor([[True, True, False, True, True]])
    padding = torch.tensor([[False, False, False, False, True]])
    loss, stats = head(context, targets, time_mask, padding)
    stats = {key: float(value) for key, value in stats.items()}  # 0-dim tensors → numbers

    ce0, right0 = _hand_ce((3.0, 4.0), 0)
    ce1, right1 = _hand_ce((-1.0, 0.5), 2)
    assert loss.item() == pytest.approx((ce0 + ce1) / 2, rel=1e-5)
    assert stats["masked_loss"] == pytest.approx((ce0 + ce1) / 2, rel=1e-5)
    assert stats["masked_frames"] == 2.0
    assert stats["masked_accuracy"] == pytest.approx((right0 + right1) / 2)
    assert "unmasked_accuracy" not in stats  # β = 0: unmasked frames are not scored

    # β > 0 adds the unmasked labelled frame (frame 2), still averaged over the masked count
    loss_u, stats_u = _hand_head(unmasked_weight=0.5)(context, targets, time_mask, padding)
    ce2, right2 = _hand_ce((0.2, 0.1), 1)
    assert loss_u.item() == pytest.approx((ce0 + ce1 + 0.5 * ce2) / 2, rel=1e-5)
    assert stats_u["unmasked_loss"] == pytest.approx(ce2, rel=1e-5)
    assert stats_u["unmasked_accuracy"] == float(right2)


def test_masked_prediction_gradient_reaches_projection_and_codewords():
    head = _hand_head()
    context = torch.randn(2, 6, 2, requires_grad=True)
    targets = torch.randint(0, 3, (2, 6))
    loss, _ = head(context, targets, torch.ones(2, 6, dtype=torch.bool), torch.zeros(2, 6, dtype=torch.bool))
    loss.backward()
    assert context.grad.abs().sum() > 0
    assert head.final_proj.weight.grad.abs().sum() > 0 and head.label_embeddings.grad.abs().sum() > 0


def test_masked_prediction_without_masked_labels_is_zero_and_finite():
    head = _hand_head()
    targets = torch.full((1, 4), IGNORE_LABEL)
    loss, stats = head(torch.randn(1, 4, 2), targets, torch.ones(1, 4, dtype=torch.bool),
                       torch.zeros(1, 4, dtype=torch.bool))
    stats = {key: float(value) for key, value in stats.items()}  # 0-dim tensors → numbers
    assert loss.item() == 0.0 and stats["masked_frames"] == 0.0


def test_masked_prediction_rejects_bad_targets():
    head = _hand_head()
    ones = torch.ones(1, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match="num_classes"):
        head(torch.randn(1, 3, 2), torch.tensor([[0, 3, 1]]), ones, ~ones)
    with pytest.raises(TypeError, match="LongTensor"):
        head(torch.randn(1, 3, 2), torch.tensor([[0.0, 1.0, 1.0]]), ones, ~ones)
    with pytest.raises(ValueError, match=r"must be \(B, T\) of context"):
        head(torch.randn(1, 3, 2), torch.tensor([[0, 1]]), ones, ~ones)
    with pytest.raises(ValueError, match="num_classes"):
        MaskedPredictionHead(4, None)


# ---------------------------------------------------------------------- label rate
def test_align_targets_100hz_labels_on_50hz_frames():
    # utterance 0: 10 frames, 21 labels (one extra MFCC frame); utterance 1: 6 frames, 11 labels
    labels0, labels1 = torch.arange(100, 121), torch.arange(200, 211)
    targets = torch.full((2, 21), IGNORE_LABEL)
    targets[0], targets[1, :11] = labels0, labels1
    aligned = align_targets(targets, torch.tensor([10, 6]), 10, ratio=2.0)
    assert aligned[0].tolist() == list(range(100, 120, 2))          # frame t ← label 2t
    assert aligned[1].tolist() == [200, 202, 204, 206, 208, 210] + [IGNORE_LABEL] * 4  # padding frames


def test_align_targets_short_and_long_labels_at_the_frame_rate():
    # 50 Hz labels: one label short (the last frame goes unpredicted) and two labels long (unused)
    targets = torch.full((2, 10), IGNORE_LABEL)
    targets[0, :7] = torch.arange(7)
    targets[1, :10] = torch.arange(10, 20)
    aligned = align_targets(targets, torch.tensor([8, 8]), 8, ratio=1.0)
    assert aligned[0].tolist() == [0, 1, 2, 3, 4, 5, 6, IGNORE_LABEL]
    assert aligned[1].tolist() == list(range(10, 18))


def test_align_targets_fractional_ratio():
    # 25 Hz labels on 50 Hz frames: each label covers two frames
    targets = torch.tensor([[7, 8, 9]])
    assert align_targets(targets, torch.tensor([6]), 6, ratio=0.5).tolist() == [[7, 7, 8, 8, 9, 9]]


def test_align_targets_rejects_a_wrong_label_rate():
    targets = torch.arange(100).unsqueeze(0)  # 100 labels: 1 s at 100 Hz
    with pytest.raises(ValueError, match="label_rate"):
        align_targets(targets, torch.tensor([50]), 50, ratio=1.0)  # configured as 50 Hz labels


# ---------------------------------------------------------------------- pretrainer
def _pretrainer(label_rate=100.0, **objective) -> HubertPretrainer:
    cfg = dict(num_classes=12, label_rate=label_rate, final_dim=16, mask=dict(time_prob=0.8, time_length=3))
    cfg.update(objective)
    return get_frontend({"name": "hubert"}).build_pretrainer(TINY_ENCODER, cfg)


def test_masked_prediction_learns_the_frame_labels():
    """Labels that follow the audio (one per 0.1 s tone): 150 Adam steps on one batch take the
    masked-frame accuracy from chance (1/12 at the start) to over half of the frames."""
    torch.manual_seed(0)
    model = _pretrainer().train()
    freqs = 200 + 150 * (torch.arange(10).repeat_interleave(1600) % 7)
    waveform = torch.sin(2 * math.pi * freqs * torch.arange(16000) / 16000).repeat(2, 1)
    waveform[1] = waveform[1].flip(0)
    labels = (torch.arange(10) % 7).repeat_interleave(10)  # 100 Hz labels: the tone's index
    targets, lengths = torch.stack([labels, labels.flip(0)]), torch.tensor([16000, 16000])
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    accuracy = []
    for _ in range(150):
        loss, stats = model(waveform, lengths, targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        accuracy.append(float(stats["masked_accuracy"]))
    assert np.mean(accuracy[:10]) < 0.3 and np.mean(accuracy[-10:]) > 0.5


def test_hubert_config_defaults_are_fairseq_base():
    cfg = HubertPretrainConfig()
    assert (cfg.mask.time_prob, cfg.mask.time_length, cfg.final_dim, cfg.logit_temperature) == (0.8, 10, 256, 0.1)
    assert (cfg.pred_masked_weight, cfg.pred_nomask_weight, cfg.feature_penalty_weight) == (1.0, 0.0, 10.0)


def test_pretrainer_trains_on_100hz_labels():
    torch.manual_seed(0)
    model = _pretrainer()
    assert model.labels_per_frame == 2.0  # 100 Hz labels, 16000 / 320 = 50 Hz frames
    lengths = torch.tensor([16000, 12000])
    waveform = torch.randn(2, 16000) * (torch.arange(16000) < lengths.unsqueeze(1))
    targets = torch.full((2, 100), IGNORE_LABEL)
    targets[0], targets[1, :75] = torch.randint(0, 12, (100,)), torch.randint(0, 12, (75,))
    loss, stats = model(waveform, lengths, targets)
    stats = {key: float(value) for key, value in stats.items()}  # 0-dim tensors → numbers
    assert set(stats) >= {"loss", "masked_loss", "masked_accuracy", "masked_frames", "feature_penalty"}
    assert stats["loss"] == pytest.approx(stats["masked_loss"] + 10.0 * stats["feature_penalty"], rel=1e-5)
    # about log(12) at initialisation, and masked frames are real frames of both utterances
    assert 1.0 < stats["masked_loss"] < 2 * math.log(12)
    assert 0 < stats["masked_frames"] <= 49 + 37
    loss.backward()
    assert model.encoder.feature_projection.weight.grad.abs().sum() > 0


def test_pretrainer_encoder_is_the_plain_wav2vec2_encoder():
    model = _pretrainer()
    encoder = get_frontend({"name": "hubert"}).build_encoder(TINY_ENCODER)
    assert type(model.encoder) is type(encoder)
    assert model.encoder.state_dict().keys() == encoder.state_dict().keys()
    assert isinstance(model.encoder.cfg, Wav2Vec2EncoderConfig)


def test_pretrainer_needs_targets_and_a_label_rate():
    with pytest.raises(ValueError, match="label_rate"):
        _pretrainer(label_rate=None)
    with pytest.raises(ValueError, match="targets"):
        _pretrainer()(torch.randn(1, 8000), torch.tensor([8000]))


# ---------------------------------------------------------------------- k-means
def _blobs(per_cluster=400, dim=8, clusters=5, seed=0):
    """Gaussian blobs of std 0.05 around centres 3 apart along different axes."""
    rng = np.random.default_rng(seed)
    means = np.zeros((clusters, dim), dtype=np.float32)
    for c in range(clusters):
        means[c, c % dim] = 3.0 * (1 + c // dim)
    truth = np.repeat(np.arange(clusters), per_cluster)
    points = means[truth] + 0.05 * rng.standard_normal((len(truth), dim)).astype(np.float32)
    order = rng.permutation(len(truth))
    return points[order], truth[order], means


def _small_kmeans(**overrides) -> KMeansConfig:
    cfg = dict(batch_size=256, max_epochs=5, max_no_improvement=20, n_init=3, seed=0)
    cfg.update(overrides)
    return KMeansConfig.from_dict(cfg)


def test_kmeans_recovers_well_separated_clusters():
    points, truth, means = _blobs()
    centers = fit_kmeans(points, 5, _small_kmeans())
    labels = assign_labels(points, centers)
    # one label per true cluster and vice versa (a perfect clustering up to renaming)
    pairs = set(zip(truth.tolist(), labels.tolist()))
    assert len(pairs) == 5 and len({label for _, label in pairs}) == 5
    for true, label in pairs:
        assert np.abs(centers[label].numpy() - means[true]).max() < 0.05
    usage = cluster_usage(np.bincount(labels, minlength=5))
    assert (usage["used"], usage["empty"]) == (5, 0) and usage["perplexity"] == pytest.approx(5.0)


def test_kmeans_plus_plus_spreads_its_centres():
    points, truth, _ = _blobs(per_cluster=200)
    centers = kmeans_plus_plus(torch.from_numpy(points), 5, torch.Generator().manual_seed(3))
    nearest_truth = {int(truth[np.argmin(((points - c.numpy()) ** 2).sum(1))]) for c in centers}
    assert nearest_truth == set(range(5))  # D²-sampling picks one seed in every blob


def test_cluster_usage_hand_computed():
    usage = cluster_usage(np.array([3, 1, 0, 0]))
    p = np.array([0.75, 0.25])
    assert usage == {"clusters": 4, "frames": 4, "used": 2, "empty": 2,
                     "perplexity": pytest.approx(float(np.exp(-(p * np.log(p)).sum())))}


def test_blockwise_assignment_equals_one_block():
    points, _, _ = _blobs(per_cluster=50)
    centers = torch.randn(7, 8)
    whole = assign_labels(points, centers, block_frames=len(points))
    assert np.array_equal(assign_labels(points, centers, block_frames=13), whole)
    squared = ((points[:, None, :] - centers.numpy()[None]) ** 2).sum(-1)
    assert np.array_equal(whole, squared.argmin(1))


def test_kmeans_needs_enough_frames():
    with pytest.raises(ValueError, match="frames_budget"):
        fit_kmeans(np.zeros((3, 2), np.float32), 5, _small_kmeans())


def test_kmeans_config_errors_name_the_problem():
    with pytest.raises(ValueError, match="features must be one of"):
        KMeansConfig.from_dict({"iterations": [{"features": "fbank", "clusters": 10}]})
    with pytest.raises(ValueError, match="features: layer needs `layer`"):
        KMeansConfig.from_dict({"iterations": [{"features": "layer", "clusters": 10}]})
    with pytest.raises(ValueError, match="unknown kmeans options"):
        KMeansConfig.from_dict({"budget": 10})
    with pytest.raises(ValueError, match="iteration 1: unknown keys"):
        KMeansConfig.from_dict({"iterations": [{"features": "mfcc", "clusters": 10, "k": 3}]})
    with pytest.raises(ValueError, match="iteration 3 is not configured"):
        KMeansConfig.from_dict({"iterations": [{"features": "mfcc", "clusters": 10}]}).iteration(3)
    with pytest.raises(ValueError, match="init must be one of"):
        KMeansConfig.from_dict({"iterations": [{"features": "mfcc", "clusters": 10, "init": "best"}]})
    with pytest.raises(ValueError, match="iteration 1 has no previous"):
        KMeansConfig.from_dict({"iterations": [{"features": "mfcc", "clusters": 10, "init": "previous"}]})
    # refused here, not by the trainer's config check after the k-means fit and labels
    with pytest.raises(ValueError, match="iteration updates must be an integer ≥ 1, got 20000.0"):
        KMeansConfig.from_dict({"iterations": [{"features": "mfcc", "clusters": 10, "updates": 2e4}]})


def test_iteration_from_the_previous_model_gets_its_encoder(tmp_path):
    """init: previous: the plan names the previous model, and the pretraining task starts its
    encoder from it while the prediction head (the new classes) starts afresh."""
    iterations = [{"features": "mfcc", "clusters": 12}, {"features": "layer", "layer": 1, "clusters": 7, "init": "previous"}]
    cfg = {"task": "pretrain", "frontend": {"name": "hubert", "encoder": TINY_ENCODER},
           "pretrain": {"label_rate": 100, "num_classes": 12, "final_dim": 16}, "kmeans": {"iterations": iterations}}
    with pytest.raises(ValueError, match="give its model_final.pt"):
        kmeans_cli.training_overrides(cfg, 2)
    assert not any(o.startswith("init.") for o in kmeans_cli.training_overrides(cfg, 1, "ignored.pt"))
    previous = PretrainTask(cfg).model
    torch.save({"model": previous.state_dict()}, tmp_path / "model_final.pt")
    overrides = kmeans_cli.training_overrides(cfg, 2, str(tmp_path / "model_final.pt"))
    assert overrides[-1] == f"init.encoder_from={tmp_path / 'model_final.pt'}"
    second = copy.deepcopy(cfg)
    for override in overrides:
        set_dotted(second, override)
    model = PretrainTask(second).model
    for name, tensor in previous.encoder.state_dict().items():
        assert torch.equal(model.encoder.state_dict()[name], tensor), name
    assert model.head.label_embeddings.shape[0] == 7  # the head is the new iteration's


# ---------------------------------------------------------------------- memory bound
def test_reservoir_is_a_uniform_sample_of_fixed_size():
    capacity, total = 500, 10_000
    first_half = []
    for seed in range(20):
        reservoir = FrameReservoir(capacity, seed)
        for start in range(0, total, 333):  # uneven blocks
            block = np.arange(start, min(start + 333, total), dtype=np.float32)[:, None]
            reservoir.add(np.repeat(block, 2, axis=1))
            assert reservoir.buffer.shape == (capacity, 2)  # never more than the budget
        sample = reservoir.sample[:, 0]
        assert reservoir.seen == total and len(sample) == capacity and len(set(sample.tolist())) == capacity
        first_half.append(float((sample < total / 2).mean()))
    # each frame is kept with probability capacity/total: half of the sample from each half
    assert np.mean(first_half) == pytest.approx(0.5, abs=0.02)


def test_which_frames_are_sampled_does_not_depend_on_which_cuts_were_chosen():
    """kmeans fit keeps a cuts_fraction of the cuts, then a reservoir sample of their frames,
    both from kmeans.seed. From one random stream, numpy's 32-bit halves of one 64-bit draw tied
    the keep decision of stream frame budget + 2k + 1 to whether cut k was chosen (kept 19 % of
    the time after a chosen cut, 1 % after another, for a uniform 10 %)."""
    cuts, frames_per_cut, budget = 2000, 10, 1000
    kept = {True: [], False: []}
    for seed in range(40):
        chosen = np.zeros(cuts, bool)
        chosen[list(chosen_cuts(range(cuts), 0.5, seed))] = True
        reservoir = FrameReservoir(budget, seed)
        total = frames_per_cut * int(chosen.sum())
        for start in range(0, total, frames_per_cut):
            reservoir.add(np.arange(start, start + frames_per_cut, dtype=np.float32)[:, None])
        taken = np.zeros(total, bool)
        taken[reservoir.sample[:, 0].astype(int)] = True
        k = np.arange(0, (total - budget - 1) // 2)
        k = k[k < cuts]
        for was_chosen in (True, False):
            kept[was_chosen].append(taken[budget + 2 * k + 1][chosen[k] == was_chosen].mean())
    uniform = budget / (frames_per_cut * cuts / 2)
    assert np.mean(kept[True]) == pytest.approx(uniform, rel=0.25)
    assert np.mean(kept[False]) == pytest.approx(uniform, rel=0.25)


def test_fit_memory_does_not_grow_with_the_data():
    """Peak traced memory (numpy's allocations, which tracemalloc sees) of sampling + fitting a
    stream of 40k frames and of 160k frames, at the same 4000-frame budget: equal within 20 %.
    Holding the stream (e.g. concatenating its blocks) would make the second 4× the first."""
    dim, budget, block = 39, 4000, 500
    cfg = _small_kmeans(frames_budget=budget, max_epochs=2)

    def stream(frames):
        rng = np.random.default_rng(0)
        for _ in range(frames // block):
            yield rng.standard_normal((block, dim)).astype(np.float32)

    def peak(frames):
        tracemalloc.start()
        sample, seen = sample_frames(stream(frames), budget, seed=0)
        fit_kmeans(sample, 16, cfg)
        _, top = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        assert seen == frames and len(sample) == budget
        return top

    peak(8_000)  # first calls allocate once-only state (lazy initialisation): not part of the bound
    small, large = peak(40_000), peak(160_000)
    assert small >= budget * dim * 4  # the reservoir itself is traced: the measurement sees numpy
    assert large < 1.2 * small, (small, large)


# ---------------------------------------------------------------------- features
def test_deltas_of_ramp_and_parabola():
    t = np.arange(12, dtype=np.float32)[:, None]
    ramp = deltas(t)
    assert np.allclose(ramp[2:-2], 1.0)  # Δ of c_t = t is the slope
    # edges replicate the first/last frame: Δ_0 = (1·(1−0) + 2·(2−0))/10
    assert ramp[0, 0] == pytest.approx(0.5) and ramp[-1, 0] == pytest.approx(0.5)
    parabola = deltas(t ** 2)
    assert np.allclose(parabola[2:-2, 0], 2 * t[2:-2, 0])     # Δ(t²) = 2t
    assert np.allclose(deltas(parabola)[4:-4], 2.0)            # ΔΔ(t²) = 2


def _audio_cuts(tmp_path, durations=(1.0, 1.37, 0.8), sampling_rate=16000):
    """Cuts over tone+noise wav files: distinct frames for MFCC k-means."""
    rng = np.random.default_rng(0)
    recordings = []
    for i, seconds in enumerate(durations):
        t = np.arange(int(seconds * sampling_rate)) / sampling_rate
        audio = 0.3 * np.sin(2 * np.pi * (200 + 300 * i) * t) * (t < seconds / 2) + 0.05 * rng.standard_normal(len(t))
        path = tmp_path / f"utt{i}.wav"
        sf.write(path, audio.astype(np.float32), sampling_rate)
        recordings.append(Recording.from_file(path, recording_id=f"utt{i}"))
    cuts = CutSet.from_manifests(recordings=RecordingSet.from_recordings(recordings))
    path = tmp_path / "cuts_all.jsonl.gz"
    cuts.to_file(path)
    return path


def test_mfcc_features_are_39_dims_at_100_hz(tmp_path):
    cut = next(iter(load_cuts(_audio_cuts(tmp_path))))
    features = MfccFeatures()(cut)
    assert features.shape == (100, 39) and features.dtype == np.float32
    assert np.allclose(features[:, 13:26], deltas(features[:, :13]))
    assert np.allclose(features[:, 26:], deltas(features[:, 13:26]))


def _kaldi_mfcc(samples: np.ndarray, rate: int = 16000) -> np.ndarray:
    """Kaldi's MFCC as torchaudio.compliance.kaldi.mfcc(x, use_energy=False) computes it, the
    features fairseq's HuBERT dump clusters: 25 ms povey windows every 10 ms (snip_edges), DC
    removed, pre-emphasis 0.97, |FFT(512)|², 23 triangular mel filters from 20 Hz to Nyquist
    (mel = 1127 ln(1 + f/700), FFT bins below Nyquist), log floored at float32's eps, the
    orthonormal DCT-II, cepstral lifter 22, 13 cepstra."""
    window, shift, fft, bins, ceps, lifter = 400, 160, 512, 23, 13, 22
    starts = np.arange(1 + (len(samples) - window) // shift) * shift
    frames = samples[starts[:, None] + np.arange(window)].astype(np.float64)
    frames -= frames.mean(axis=1, keepdims=True)
    frames = np.concatenate([frames[:, :1] * (1 - 0.97), frames[:, 1:] - 0.97 * frames[:, :-1]], axis=1)
    frames *= (0.5 - 0.5 * np.cos(2 * np.pi * np.arange(window) / (window - 1))) ** 0.85
    power = np.abs(np.fft.rfft(frames, n=fft)) ** 2
    mel = lambda f: 1127.0 * np.log(1.0 + f / 700.0)  # noqa: E731
    low, high = mel(20.0), mel(rate / 2)
    edges = low + np.arange(bins + 2) * (high - low) / (bins + 1)
    fft_mel = mel(np.arange(fft // 2) * rate / fft)
    left, centre, right = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    rising, falling = (fft_mel - left) / (centre - left), (right - fft_mel) / (right - centre)
    filters = np.where((fft_mel > left) & (fft_mel < right), np.where(fft_mel <= centre, rising, falling), 0.0)
    log_mel = np.log(np.maximum(power[:, :fft // 2] @ filters.T, np.finfo(np.float32).eps))
    k, n = np.arange(ceps)[:, None], np.arange(bins)[None, :]
    dct = np.sqrt(2.0 / bins) * np.cos(np.pi / bins * (n + 0.5) * k)
    dct[0] = np.sqrt(1.0 / bins)
    return (log_mel @ dct.T) * (1 + 0.5 * lifter * np.sin(np.pi * np.arange(ceps) / lifter))


def test_mfcc_features_are_fairseqs_kaldi_mfcc(tmp_path):
    """lhotse's MfccConfig stops its mel filters 400 Hz below Nyquist (Kaldi's command-line
    default), fairseq's dump (torchaudio's kaldi.mfcc) at Nyquist: every filter moved, the
    higher cepstra by 15-25 % of their size."""
    cut = list(load_cuts(_audio_cuts(tmp_path)))[1]
    samples = cut.load_audio()[0]
    expected = _kaldi_mfcc(samples)
    features = MfccFeatures()(cut)[:len(expected), :13]  # (the rest repeat the last frame: lhotse's count)
    assert len(expected) == 135 and np.abs(features - expected).max() < 1e-3  # (cepstra up to ~50)


def _tiny_checkpoint(path, layers=2):
    enc = dict(TINY_ENCODER, transformer=dict(TINY_ENCODER["transformer"], layers=layers))
    cfg = {"frontend": {"name": "hubert", "encoder": enc},
           "pretrain": {"num_classes": 8, "label_rate": 100, "final_dim": 16}}
    model = get_frontend(cfg["frontend"]).build_pretrainer(enc, cfg["pretrain"])
    torch.save({"model": model.state_dict(), "config": cfg, "num_updates": 0}, path)
    return model


def test_hidden_layer_features_are_the_encoder_layer_output(tmp_path):
    model = _tiny_checkpoint(tmp_path / "model.pt")
    cut = list(load_cuts(_audio_cuts(tmp_path)))[1]
    extractor = HiddenLayerFeatures(tmp_path / "model.pt", layer=1)
    features = extractor(cut)
    model.encoder.eval()
    samples = torch.from_numpy(cut.load_audio()[0]).unsqueeze(0)
    with torch.no_grad():
        expected = model.encoder(samples, torch.tensor([samples.shape[1]]), return_all=True).layers[1][0]
    assert extractor.frame_rate == 50.0 and features.shape == (68, 32)  # 1.37 s at 20 ms frames
    assert np.allclose(features, expected.numpy(), atol=1e-5)
    with pytest.raises(ValueError, match="layer 3 does not exist"):
        HiddenLayerFeatures(tmp_path / "model.pt", layer=3)


# ---------------------------------------------------------------------- labels in the cuts
def test_labels_round_trip_through_cuts_and_loader(tmp_path):
    cuts_path = _audio_cuts(tmp_path)
    cfg = {"kmeans": {"iterations": [{"features": "mfcc", "clusters": 6}], "frames_budget": 200,
                      "batch_size": 64, "max_epochs": 3, "n_init": 2, "assign_block_frames": 50}}
    state = kmeans_cli.fit(cfg, 1, str(cuts_path), None, tmp_path / "km" / "kmeans.pt")
    assert state["frames_seen"] == 100 + 137 + 80 and state["frames_sampled"] == 200
    usage = kmeans_cli.label(cfg, str(tmp_path / "km" / "kmeans.pt"), [str(cuts_path)], tmp_path / "labels")
    assert usage["frames"] == 317

    labelled = list(load_cuts(tmp_path / "labels" / "cuts_all.jsonl.gz"))
    mfcc = MfccFeatures()
    streamed = [cut.load_custom("kmeans_labels") for cut in labelled]
    # streaming labels (cut by cut, 50-frame blocks) equal the labels of all frames at once
    everything = np.concatenate([mfcc(cut) for cut in labelled])
    assert np.array_equal(np.concatenate(streamed), assign_labels(everything, state["centers"], len(everything)))
    # the logged usage is that of the labels written
    assert usage == cluster_usage(np.bincount(np.concatenate(streamed), minlength=6))
    # two worker processes label the same frames the same way, in the same order
    kmeans_cli.label(cfg, str(tmp_path / "km" / "kmeans.pt"), [str(cuts_path)], tmp_path / "labels2", num_jobs=2)
    in_parallel = list(load_cuts(tmp_path / "labels2" / "cuts_all.jsonl.gz"))
    assert [c.id for c in in_parallel] == [c.id for c in labelled]
    assert all(np.array_equal(c.load_custom("kmeans_labels"), l) for c, l in zip(in_parallel, streamed))
    field = labelled[0].custom["kmeans_labels"]
    assert field.frame_shift == pytest.approx(0.01) and Path(field.array.storage_path) == tmp_path / "labels" / "storage"

    loader = make_dataloader(load_cuts(tmp_path / "labels" / "cuts_all.jsonl.gz"), input_type="waveform",
                             max_duration=100, shuffle=False, targets_field="kmeans_labels")
    batch = next(iter(loader))
    assert batch["targets"].dtype == torch.long and batch["targets"].shape == (3, 137)
    for row, labels in zip(batch["targets"], streamed):
        assert row[:len(labels)].tolist() == labels.tolist()
        assert (row[len(labels):] == -100).all()
    # a model trains on these targets at their 100 Hz label rate
    loss, stats = _pretrainer(num_classes=6)(batch["inputs"], batch["input_lens"], batch["targets"])
    stats = {key: float(value) for key, value in stats.items()}  # 0-dim tensors → numbers
    assert math.isfinite(loss.item()) and stats["masked_frames"] > 0


def test_labelling_resumes_after_the_manifests_it_finished(tmp_path):
    """A run killed while labelling the second manifest redoes only that one; the usage counts
    all frames either way. Labels of another k-means (refitted) are made again."""
    cuts = list(load_cuts(_audio_cuts(tmp_path)))
    first, second = tmp_path / "first.jsonl.gz", tmp_path / "second.jsonl.gz"
    CutSet.from_cuts(cuts[:2]).to_file(first)
    CutSet.from_cuts(cuts[2:]).to_file(second)
    cfg = {"kmeans": {"iterations": [{"features": "mfcc", "clusters": 6}], "frames_budget": 200,
                      "batch_size": 64, "max_epochs": 3, "n_init": 2}}
    kmeans_path = tmp_path / "km" / "kmeans.pt"
    kmeans_cli.fit(cfg, 1, str(first), None, kmeans_path)
    labels = tmp_path / "labels"
    full = kmeans_cli.label(cfg, str(kmeans_path), [str(first), str(second)], labels)
    assert full["frames"] == 317
    (labels / "second.jsonl.gz").unlink()  # as if killed while writing it (atomic: not there yet)
    (labels / "second.jsonl.gz.counts.json").unlink()
    kept = (labels / "first.jsonl.gz").stat().st_mtime_ns
    CutSet.from_cuts(cuts[:2]).to_file(first)  # written again, as stage 4 does: same cuts, another gzip header
    assert kmeans_cli.label(cfg, str(kmeans_path), [str(first), str(second)], labels) == full
    assert (labels / "first.jsonl.gz").stat().st_mtime_ns == kept and (labels / "second.jsonl.gz").exists()
    # labels under another field name (the training reads them from it) are made again
    cfg["kmeans"]["targets_field"] = "units"
    kmeans_cli.label(cfg, str(kmeans_path), [str(first), str(second)], labels)
    assert all("units" in cut.custom for cut in load_cuts(labels / "first.jsonl.gz"))
    kept = (labels / "first.jsonl.gz").stat().st_mtime_ns
    cfg["kmeans"]["seed"] = 1
    kmeans_cli.fit(cfg, 1, str(first), None, kmeans_path)
    kmeans_cli.label(cfg, str(kmeans_path), [str(first), str(second)], labels)
    assert (labels / "first.jsonl.gz").stat().st_mtime_ns != kept


def test_manifests_of_one_file_name_are_refused(tmp_path):
    """train/cuts.jsonl.gz and dev/cuts.jsonl.gz were both labelled into OUT_DIR/cuts.jsonl.gz:
    dev's labels replaced train's, and every rerun labelled both again."""
    paths = []
    for split in ("train", "dev"):
        (tmp_path / split).mkdir()
        paths.append(str(tmp_path / split / "cuts.jsonl.gz"))
    with pytest.raises(ValueError, match=r"share file names \(cuts.jsonl.gz\)"):
        kmeans_cli.label({}, str(tmp_path / "kmeans.pt"), paths, tmp_path / "labels")
    assert not (tmp_path / "labels").exists()


def test_labelling_a_manifest_resumes_after_the_parts_it_finished(tmp_path, monkeypatch):
    """One manifest (stage 4's pretraining manifest) was labelled in one go: a kill inside it
    redid all of it (hours of a model's layer features at scale). Parts of it are kept now."""
    cuts_path = _audio_cuts(tmp_path)
    cfg = {"kmeans": {"iterations": [{"features": "mfcc", "clusters": 6}], "frames_budget": 200,
                      "batch_size": 64, "max_epochs": 3, "n_init": 2}}
    kmeans_path = tmp_path / "km" / "kmeans.pt"
    kmeans_cli.fit(cfg, 1, str(cuts_path), None, kmeans_path)
    whole = kmeans_cli.label(cfg, str(kmeans_path), [str(cuts_path)], tmp_path / "whole")
    monkeypatch.setattr(kmeans_cli, "LABEL_PART_CUTS", 2)  # parts of 2 + 1 cuts
    computed = []
    real_cut_features = kmeans_cli.cut_features

    def cut_features(cuts, *args):
        computed.append([cut.id for cut in cuts])
        if len(computed) == 2 and killed:
            raise KeyboardInterrupt("killed in the second part")
        return real_cut_features(cuts, *args)
    monkeypatch.setattr(kmeans_cli, "cut_features", cut_features)
    labels, killed = tmp_path / "labels", True
    with pytest.raises(KeyboardInterrupt):
        kmeans_cli.label(cfg, str(kmeans_path), [str(cuts_path)], labels)
    assert not (labels / "cuts_all.jsonl.gz").exists()
    ids = [cut.id for cut in load_cuts(cuts_path)]
    computed.clear()
    killed = False
    parts_dir = labels / ".cuts_all.jsonl.gz.parts"
    records_at_flush = []  # the label files reach the disk before the record that vouches for them
    monkeypatch.setattr(kmeans_cli, "flush_to_disk", lambda: records_at_flush.append(
        sorted(p.name for p in parts_dir.glob("*.counts.json"))))
    assert kmeans_cli.label(cfg, str(kmeans_path), [str(cuts_path)], labels) == whole
    assert computed == [ids[2:]]  # the first part was kept
    assert records_at_flush == [["part00000.counts.json"]]  # the second part's flush, before its record
    resumed, expected = list(load_cuts(labels / "cuts_all.jsonl.gz")), list(load_cuts(tmp_path / "whole/cuts_all.jsonl.gz"))
    assert [cut.id for cut in resumed] == ids
    assert all(np.array_equal(a.load_custom("kmeans_labels"), b.load_custom("kmeans_labels"))
               for a, b in zip(resumed, expected))
    assert not (labels / ".cuts_all.jsonl.gz.parts").exists()


def test_mfcc_labels_refuse_a_kmeans_fitted_on_other_mfccs(tmp_path):
    """The MFCCs' mel filters moved (to Nyquist): a k-means fitted before would have labelled the
    new features by centres of the old ones."""
    cuts_path = _audio_cuts(tmp_path)
    cfg = {"kmeans": {"iterations": [{"features": "mfcc", "clusters": 4}], "frames_budget": 200,
                      "batch_size": 64, "max_epochs": 2, "n_init": 1}}
    kmeans_path = tmp_path / "km.pt"
    state = kmeans_cli.fit(cfg, 1, str(cuts_path), None, kmeans_path)
    assert state["features"]["definition"] == MfccFeatures.definition
    kmeans_cli.label(cfg, str(kmeans_path), [str(cuts_path)], tmp_path / "labels")
    del state["features"]["definition"]  # fitted before the definition was recorded
    torch.save(state, kmeans_path)
    with pytest.raises(ValueError, match="fitted on other mfcc features .*Nyquist − 400 Hz.*--force true"):
        kmeans_cli.label(cfg, str(kmeans_path), [str(cuts_path)], tmp_path / "labels_again")
    assert not (tmp_path / "labels_again").exists()


def test_layer_labels_refuse_a_model_changed_since_the_fit(tmp_path):
    """The previous iteration's model was recorded by path: trained again in place, its new
    features were labelled by centres fitted on the old ones (and labels were reused as made)."""
    _tiny_checkpoint(tmp_path / "model.pt")
    cuts_path = _audio_cuts(tmp_path)
    cfg = {"kmeans": {"iterations": [{"features": "mfcc", "clusters": 4},
                                     {"features": "layer", "layer": 1, "clusters": 4}],
                      "frames_budget": 200, "batch_size": 64, "max_epochs": 2, "n_init": 1}}
    kmeans_path, labels = tmp_path / "km.pt", tmp_path / "labels"
    kmeans_cli.fit(cfg, 2, str(cuts_path), str(tmp_path / "model.pt"), kmeans_path)
    kmeans_cli.label(cfg, str(kmeans_path), [str(cuts_path)], labels)
    torch.manual_seed(1)
    _tiny_checkpoint(tmp_path / "model.pt")  # trained again: other weights at the same path
    with pytest.raises(ValueError, match="is not the model .* was fitted on"):
        kmeans_cli.label(cfg, str(kmeans_path), [str(cuts_path)], labels)
    # on purpose, with --model: labelled again, not taken as made
    kept = (labels / cuts_path.name).stat().st_mtime_ns
    kmeans_cli.label(cfg, str(kmeans_path), [str(cuts_path)], labels, model=str(tmp_path / "model.pt"))
    assert (labels / cuts_path.name).stat().st_mtime_ns != kept
    # a k-means and labels from before digests were recorded: taken as made, not labelled again in full
    kmeans_cli.fit(cfg, 2, str(cuts_path), str(tmp_path / "model.pt"), kmeans_path)
    state = torch.load(kmeans_path, weights_only=False)
    del state["features"]["model_sha256"]
    torch.save(state, kmeans_path)
    kmeans_cli.label(cfg, str(kmeans_path), [str(cuts_path)], labels)
    record = labels / f"{cuts_path.name}.counts.json"
    old = json.loads(record.read_text())
    del old["made_from"]["model_sha256"]  # as the labelling wrote it then
    record.write_text(json.dumps(old))
    kept = (labels / cuts_path.name).stat().st_mtime_ns
    kmeans_cli.label(cfg, str(kmeans_path), [str(cuts_path)], labels)
    assert (labels / cuts_path.name).stat().st_mtime_ns == kept
    # an MFCC k-means of today records no model (None): its labels' records match as written
    mfcc_path, mfcc_labels = tmp_path / "mfcc.pt", tmp_path / "mfcc_labels"
    kmeans_cli.fit(cfg, 1, str(cuts_path), None, mfcc_path)
    kmeans_cli.label(cfg, str(mfcc_path), [str(cuts_path)], mfcc_labels)
    kept = (mfcc_labels / cuts_path.name).stat().st_mtime_ns
    kmeans_cli.label(cfg, str(mfcc_path), [str(cuts_path)], mfcc_labels)
    assert (mfcc_labels / cuts_path.name).stat().st_mtime_ns == kept


def test_loader_names_cuts_without_labels(tmp_path):
    loader = make_dataloader(load_cuts(_audio_cuts(tmp_path)), input_type="waveform", max_duration=100,
                             shuffle=False, targets_field="kmeans_labels")
    with pytest.raises(ValueError, match="utt0"):
        next(iter(loader))


def test_plan_gives_each_iteration_its_training_overrides():
    cfg = load_configs([ROOT / "egs" / "minisynth" / "conf" / "frontend_hubert.yaml"])
    kmeans = KMeansConfig.from_dict(cfg["kmeans"])
    first, second = kmeans.iterations
    assert kmeans_cli.training_overrides(cfg, 1)[:3] == [
        f"pretrain.num_classes={first.clusters}", "pretrain.label_rate=100", "data.targets_field=kmeans_labels"]
    assert kmeans_cli.training_overrides(cfg, 2)[:2] == [f"pretrain.num_classes={second.clusters}",
                                                         "pretrain.label_rate=50"]
    # the minisynth budget: about the 800 updates wav2vec 2.0 pretrains for, split over the iterations
    pretrain = load_configs([ROOT / "egs" / "minisynth" / "conf" / "pretrain.yaml"])
    assert first.updates + second.updates == pretrain["trainer"]["max_updates"]
    base = load_configs([ROOT / "conf" / "frontend" / "hubert_tiny.yaml"])["kmeans"]["iterations"]
    assert [(it["features"], it["clusters"]) for it in base] == [("mfcc", 100), ("layer", 500)]
    # a config without conv_layers has the encoder's default stack (base's, 320 samples a frame):
    # its iteration-2 plan failed with a KeyError, after that iteration's k-means fit and labelling
    del cfg["frontend"]["encoder"]["conv_layers"]
    assert kmeans_cli.training_overrides(cfg, 2)[1] == "pretrain.label_rate=50"
    cfg["frontend"]["encoder"]["conv_layers"] = [[32, 10, 5], [32, 2, 2]]  # 16000 / 10 frames a second
    assert kmeans_cli.training_overrides(cfg, 2)[1] == "pretrain.label_rate=1600"


# ---------------------------------------------------------------------- recipe
# all 80 pretraining cuts of the smoke corpus (minisynth's config fits on 10 %), at most 3000 frames
KMEANS_SMOKE = ("kmeans.cuts_fraction=1.0 kmeans.frames_budget=3000 kmeans.batch_size=1000 kmeans.max_epochs=2 "
                "kmeans.n_init=1")


@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng is not installed")
def test_recipe_pretrains_hubert_over_kmeans_iterations(tmp_path, prepared_minisynth, monkeypatch):
    recipe = recipe_with_data(tmp_path, prepared_minisynth)
    result = run_recipe(recipe, *SMOKE, "--frontend", "hubert", "--compare-scratch", "false",
                        "--kmeans-opts", KMEANS_SMOKE, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    monkeypatch.chdir(recipe)  # label storage paths in the manifests are relative to the recipe, as data/fbank
    pretrain = recipe / "exp" / "pretrain_hubert"
    iterations = load_configs([recipe / "conf" / "frontend_hubert.yaml"])["kmeans"]["iterations"]
    assert len(iterations) == 2
    for number, (iteration, rate) in enumerate(zip(iterations, (100, 50)), start=1):
        it = pretrain / f"iter{number}"
        for marker in (".kmeans.done", ".labels.done", ".done"):
            assert (it / marker).exists(), f"iter{number}/{marker}"
        trained = yaml.safe_load((it / "config.yaml").read_text())
        assert trained["pretrain"]["num_classes"] == iteration["clusters"]
        assert trained["pretrain"]["label_rate"] == rate and trained["trainer"]["max_updates"] == 4
        # every pretraining and dev cut carries its frame labels, at the iteration's label rate
        for manifest in ("minisynth_cuts_pretrain.jsonl.gz", "minisynth_cuts_dev.jsonl.gz"):
            cuts = list(load_cuts(it / "labels" / manifest))
            assert len(cuts) == {"minisynth_cuts_pretrain.jsonl.gz": 80, "minisynth_cuts_dev.jsonl.gz": 8}[manifest]
            for cut in cuts[:5]:
                labels = cut.load_custom("kmeans_labels")
                assert abs(len(labels) - cut.duration * rate) <= 2
                assert 0 <= labels.min() and labels.max() < iteration["clusters"]
        usage = json.loads((it / "labels" / "usage.json").read_text())
        assert usage["clusters"] == iteration["clusters"] and usage["used"] > 1
    fitted = torch.load(pretrain / "iter1" / "kmeans.pt", weights_only=False)
    assert fitted["frames_sampled"] == 3000 < fitted["frames_seen"]  # --kmeans-opts sized the sample
    assert "k-means sample" in result.stderr and "usage perplexity" in result.stderr

    # stage 5 fine-tuned the last iteration's model, a real file at the usual place
    final = pretrain / "model_final.pt"
    assert final.is_file() and not final.is_symlink()
    assert final.read_bytes() == (pretrain / "iter2" / "model_final.pt").read_bytes()
    assert "initialised" in (recipe / "exp" / "ctc_hubert_all" / "train.rank0.log").read_text()
    rows = [json.loads(line) for line in (recipe / "exp" / "results.jsonl").read_text().splitlines()]
    assert rows and all(r["frontend"] == "hubert" and r["pretrained"] is True for r in rows)
    assert {r["test_set"] for r in rows if r["decoding"] == "ctc_greedy"} == {"dev", "test"}

    # each sub-step resumes on its own: with iteration 2's training marker gone, stage 4 redoes
    # nothing else and the training resumes from its checkpoint
    for path in (pretrain / ".done", pretrain / "iter2" / ".done", final):
        path.unlink()
    rerun = run_recipe(recipe, *SMOKE, "--frontend", "hubert", "--kmeans-opts", KMEANS_SMOKE,
                       "--stage", "4", "--stop-stage", "4", timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-4000:]
    for step in ("iteration 1: k-means ready", "iteration 1: labels ready", "iteration 1: pretrained",
                 "iteration 2: k-means ready", "iteration 2: labels ready",
                 "resumed from exp/pretrain_hubert/iter2/checkpoint_last.pt at update 4"):
        assert step in rerun.stderr, step
    assert final.read_bytes() == (pretrain / "iter2" / "model_final.pt").read_bytes()


def test_mfcc_frame_t_covers_the_samples_its_label_is_for(tmp_path):
    """MFCC frame t covers [160t, 160t + 400) at 16 kHz (fairseq's Kaldi MFCC with snip_edges),
    so frames 2t and 2t + 1 lie inside encoder frame t; lhotse's default frames start 120 samples
    earlier (a click at sample 290 missed frame 0). The count stays lhotse's (the labels' storage)."""
    audio = np.zeros(16000, dtype=np.float32)
    audio[290] = 1.0
    path = tmp_path / "click.wav"
    sf.write(path, audio, 16000)
    cut = CutSet.from_manifests(recordings=RecordingSet.from_recordings([Recording.from_file(path)]))[0]
    c0 = MfccFeatures()(cut)[:, 0]
    assert len(c0) == 100
    silent = c0[10:].max()
    assert c0[0] > silent + 20 and c0[1] > silent + 20 and c0[2] < silent + 1  # [0, 400), [160, 560), [320, 720)
    # under one window (lhotse's extractor failed under 10 ms): zero-padded to one window, its
    # frame repeated to lhotse's count; under 5 ms lhotse counts no frames
    for samples, frames in ((300, 2), (100, 1), (50, 0)):
        short = tmp_path / f"short{samples}.wav"
        sf.write(short, np.full(samples, 0.5, dtype=np.float32), 16000)
        mfcc = MfccFeatures()(CutSet.from_manifests(recordings=RecordingSet.from_recordings(
            [Recording.from_file(short)]))[0])
        assert mfcc.shape == (frames, 39) and np.isfinite(mfcc).all()
