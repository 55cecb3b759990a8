"""HuBERT: the masked-prediction loss against a hand computation, label-rate alignment, the
pretrainer end to end on a tiny encoder."""

import math

import pytest
import torch

from sslasr.models.frontends import get_frontend
from sslasr.models.hubert import (
    IGNORE_LABEL, HubertPretrainConfig, HubertPretrainer, MaskedPredictionHead, align_targets,
)
from sslasr.models.wav2vec2 import Wav2Vec2EncoderConfig

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
    assert loss.item() == 0.0 and stats["masked_frames"] == 0.0


def test_masked_prediction_rejects_bad_targets():
    head = _hand_head()
    ones = torch.ones(1, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match="num_classes"):
        head(torch.randn(1, 3, 2), torch.tensor([[0, 3, 1]]), ones, ~ones)
    with pytest.raises(TypeError, match="LongTensor"):
        head(torch.randn(1, 3, 2), torch.tensor([[0.0, 1.0, 1.0]]), ones, ~ones)
    with pytest.raises(ValueError, match="must be"):
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
