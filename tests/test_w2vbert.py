"""w2v-BERT: fbank subsampling, Conformer blocks, the two-task objective, the transformers
import, SpecAugment on fbank batches, and the minisynth recipe with --frontend w2vbert.

Hand-checked on tiny tensors: frame counts against the convolution formula, stacking and
normalisation against explicit loops, relative-position attention against its equations, the
pretraining loss against a recomputation from the model's pieces, and the encoder against a
randomly initialised transformers Wav2Vec2BertModel, layer by layer.
"""

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch
import torch.nn.functional as F
from lhotse import CutSet, Recording

from recipe_smoke import SMOKE, recipe_with_data, run_recipe
from sslasr.bin.compute_fbank import compute_fbank
from sslasr.data.loader import build_spec_augment, load_cuts, make_dataloader, spec_augment_batch
from sslasr.data.manifests import write_cuts
from sslasr.models.blocks.conformer import (
    ConformerBlock, ConformerConfig, ConvolutionModule, RelativePositionSelfAttention,
)
from sslasr.models.blocks.masking import span_mask
from sslasr.models.blocks.subsampling import Conv2dSubsampling, FrameStacking, normalize_fbank_bins
from sslasr.models.asr import build_asr_model
from sslasr.models import hf_import
from sslasr.models.frontends import get_frontend
from sslasr.models.w2vbert import (
    W2vBertEncoder, W2vBertEncoderConfig, W2vBertPretrainConfig, W2vBertPretrainer, encoder_config_from_hf, from_hf,
    w2v_bert_loss,
)
from sslasr.models.wav2vec2 import sample_negatives
from sslasr.train.tasks import PretrainTask
from sslasr.utils.config import load_configs

ROOT = Path(__file__).resolve().parents[1]
torch.set_num_threads(1)


def _conformer(**overrides) -> dict:
    cfg = dict(dim=16, layers=3, heads=2, ffn_dim=32, conv_kernel=5, conv_norm="batch", position="relative",
               dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, conv_dropout=0.0)
    cfg.update(overrides)
    return cfg


def _encoder_dict(**conformer) -> dict:
    return dict(input_dim=80, subsampling=dict(type="conv2d", channels=4), projection_dropout=0.0,
                conformer=_conformer(**conformer))


def _padded(x: torch.Tensor, extra: int) -> torch.Tensor:
    """x (B, T, ...) with `extra` frames of large junk appended."""
    junk = 100 * torch.randn(x.shape[0], extra, *x.shape[2:])
    return torch.cat([x, junk], dim=1)


# ---------------------------------------------------------------------- subsampling
def test_conv2d_subsampling_frames_follow_the_conv_formula():
    torch.manual_seed(0)
    sub = Conv2dSubsampling(80, channels=3).eval()
    assert sub.output_dim == 3 * 19  # 80 bins → 39 → 19
    for frames in [7, 8, 9, 10, 11, 12, 50, 101, 333]:
        by_hand = ((frames - 1) // 2 - 1) // 2  # ⌊(n − 3)/2⌋ + 1 twice
        with torch.no_grad():
            out = sub(torch.randn(1, frames, 80))
        assert out.shape == (1, by_hand, 3 * 19), frames
        assert int(sub.output_lengths(torch.tensor([frames]))) == by_hand
    assert sub.output_lengths(torch.tensor([0, 3, 6, 7])).tolist() == [0, 0, 0, 1]  # 7-frame receptive field
    with pytest.raises(ValueError, match="at least 7 feature bins"):
        Conv2dSubsampling(6, channels=3)


@pytest.mark.parametrize("kind", ["conv2d", "stack"])
def test_subsampling_ignores_padding(kind):
    torch.manual_seed(1)
    sub = (Conv2dSubsampling(80, 4) if kind == "conv2d" else FrameStacking(80, 2)).eval()
    x = torch.randn(1, 45, 80)
    n = int(sub.output_lengths(torch.tensor([45])))
    with torch.no_grad():
        alone, padded = sub(x), sub(_padded(x, 17))
    assert padded.shape[1] > n
    torch.testing.assert_close(padded[:, :n], alone[:, :n], rtol=0, atol=0)


def test_frame_stacking_puts_frame_pairs_side_by_side():
    x = torch.arange(2 * 7 * 3, dtype=torch.float32).view(2, 7, 3)
    stack = FrameStacking(3, 2)
    out = stack(x)
    assert out.shape == (2, 3, 6)  # the 7th frame has no partner: dropped
    for t in range(3):
        assert torch.equal(out[:, t], torch.cat([x[:, 2 * t], x[:, 2 * t + 1]], dim=-1))
    assert stack.output_lengths(torch.tensor([7, 6, 1])).tolist() == [3, 3, 0]


def test_per_utterance_normalisation_uses_real_frames_only():
    torch.manual_seed(2)
    x = 5 + 3 * torch.randn(2, 30, 4)
    lens = torch.tensor([30, 12])
    out = normalize_fbank_bins(x, lens)
    for b, n in enumerate(lens.tolist()):
        real = x[b, :n].double().numpy()
        by_hand = (real - real.mean(0)) / np.sqrt(real.var(0, ddof=1) + 1e-7)
        np.testing.assert_allclose(out[b, :n].numpy(), by_hand, atol=1e-5)
        assert torch.all(out[b, n:] == 0)


# ---------------------------------------------------------------------- Conformer
def test_relative_attention_matches_its_equations():
    """a_ij = [(q_i + u)·k_j + (q_i + v)·W_p p_{i−j}] / √d (Transformer-XL) and
    a_ij = [q_i·k_j + q_i·e_{clip(j−i)}] / √d (Shaw), written out pair by pair."""
    torch.manual_seed(3)
    dim, heads, time = 8, 2, 6
    d = dim // heads
    x = torch.randn(1, time, dim)
    for position in ["relative", "relative_key"]:
        attn = RelativePositionSelfAttention(dim, heads, 0.0, position, left=2, right=1).eval()
        with torch.no_grad():
            for p in attn.parameters():
                p.add_(0.3 * torch.randn_like(p))
            q = attn.q_proj(x)[0].view(time, heads, d)
            k = attn.k_proj(x)[0].view(time, heads, d)
            v = attn.v_proj(x)[0].view(time, heads, d)
            logits = torch.zeros(heads, time, time)
            for h in range(heads):
                for i in range(time):
                    for j in range(time):
                        if position == "relative":
                            r = i - j
                            angles = r / 10000 ** (torch.arange(0, dim, 2) / dim)
                            p_r = torch.stack([angles.sin(), angles.cos()], -1).flatten()
                            w_p = attn.pos_proj(p_r).view(heads, d)[h]
                            logits[h, i, j] = ((q[i, h] + attn.pos_bias_u[h]) @ k[j, h]
                                               + (q[i, h] + attn.pos_bias_v[h]) @ w_p) / math.sqrt(d)
                        else:
                            e = attn.distance_embedding.weight[min(max(j - i, -2), 1) + 2]
                            logits[h, i, j] = (q[i, h] @ k[j, h] + q[i, h] @ e) / math.sqrt(d)
            context = torch.einsum("hij,jhd->ihd", logits.softmax(-1), v).reshape(time, dim)
            expected = attn.out_proj(context)
            torch.testing.assert_close(attn(x)[0], expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("position", ["relative", "relative_key", "none"])
@pytest.mark.parametrize("conv_norm,causal", [("batch", False), ("layer", True)])
def test_conformer_block_shapes_and_padding_invariance(position, conv_norm, causal):
    torch.manual_seed(4)
    block = ConformerBlock(ConformerConfig(**_conformer(position=position, conv_norm=conv_norm, conv_causal=causal)))
    x = torch.randn(3, 20, 16)
    lens = torch.tensor([20, 13, 7])
    pad = torch.arange(20)[None, :] >= lens[:, None]
    for training in (True, False):  # dropout is 0: training differs only by BatchNorm's batch statistics
        block.train(training)
        with torch.no_grad():
            out = block(x.masked_fill(pad[..., None], 0.0), pad)
            longer = _padded(x, 9)  # every padded frame junk, and more of them
            out_longer = block(longer, torch.arange(29)[None, :] >= lens[:, None])
        assert out.shape == (3, 20, 16)
        for b, n in enumerate(lens.tolist()):
            torch.testing.assert_close(out_longer[b, :n], out[b, :n], atol=1e-5, rtol=1e-5)
    if conv_norm == "layer":  # no batch statistics: each utterance alone gives the same frames
        with torch.no_grad():
            alone = block(x[2:, :7], None)
        torch.testing.assert_close(alone[0], out[2, :7], atol=1e-5, rtol=1e-5)


def test_masked_batch_norm_statistics_come_from_real_frames():
    torch.manual_seed(5)
    module = ConvolutionModule(ConformerConfig(**_conformer(conv_norm="batch", conv_kernel=3)))
    norm = module.norm
    x = torch.randn(2, 10, 16)
    pad = torch.zeros(2, 10, dtype=torch.bool)
    pad[1, 4:] = True
    norm.train()
    y = norm(x, pad)
    real = x[~pad]
    by_hand = (real - real.mean(0)) / torch.sqrt(real.var(0, unbiased=False) + norm.eps)
    torch.testing.assert_close(y[~pad], by_hand * norm.weight + norm.bias, atol=1e-5, rtol=1e-5)
    assert torch.all(y[pad] == 0)
    torch.testing.assert_close(norm.running_mean, 0.1 * real.mean(0), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(norm.running_var, 0.9 + 0.1 * real.var(0, unbiased=True), atol=1e-6, rtol=1e-5)
    norm.eval()  # the running statistics, real frames only
    by_running = (real - norm.running_mean) / torch.sqrt(norm.running_var + norm.eps)
    torch.testing.assert_close(norm(x, pad)[~pad], by_running * norm.weight + norm.bias, atol=1e-5, rtol=1e-5)


def test_causal_convolution_module_sees_only_the_past():
    torch.manual_seed(6)
    module = ConvolutionModule(ConformerConfig(**_conformer(conv_norm="layer", conv_causal=True))).eval()
    x = torch.randn(1, 12, 16)
    changed = x.clone()
    changed[:, 8:] += torch.randn(1, 4, 16)
    with torch.no_grad():
        a, b = module(x), module(changed)
    torch.testing.assert_close(a[:, :8], b[:, :8], atol=0, rtol=0)
    assert not torch.allclose(a[:, 8:], b[:, 8:])
    centred = ConvolutionModule(ConformerConfig(**_conformer(conv_norm="layer", conv_causal=False))).eval()
    with torch.no_grad():
        assert not torch.allclose(centred(x)[:, 6:8], centred(changed)[:, 6:8])  # reaches 2 frames ahead


def test_config_errors_name_the_problem():
    with pytest.raises(ValueError, match="position must be one of"):
        ConformerConfig(position="rotary")
    with pytest.raises(ValueError, match="odd kernel"):
        ConformerConfig(conv_kernel=4)
    with pytest.raises(ValueError, match="subsampling type"):
        W2vBertEncoderConfig.from_dict({"subsampling": {"type": "conv1d"}})
    with pytest.raises(ValueError, match="contrastive_layers"):
        W2vBertPretrainer(W2vBertEncoderConfig.from_dict(_encoder_dict()), W2vBertPretrainConfig(contrastive_layers=3))
    encoder = W2vBertEncoder(W2vBertEncoderConfig.from_dict(_encoder_dict())).eval()
    with pytest.raises(ValueError, match=r"\(batch, frames, 80\)"):
        encoder(torch.randn(2, 50, 40), torch.tensor([50, 50]))


# ---------------------------------------------------------------------- encoder
def test_encoder_padding_invariance_and_layers():
    torch.manual_seed(7)
    encoder = W2vBertEncoder(W2vBertEncoderConfig.from_dict(_encoder_dict())).eval()
    x = torch.randn(2, 90, 80)
    lens = torch.tensor([90, 61])
    with torch.no_grad():
        out = encoder(x, lens, return_all=True)
        alone = encoder(x[1:, :61], lens[1:])
    assert out.lengths.tolist() == [21, 14]
    assert out.hidden.shape == (2, 21, 16) and len(out.layers) == 4  # stack input + 3 blocks
    assert torch.equal(out.layers[-1], out.hidden)
    torch.testing.assert_close(alone.hidden[0], out.hidden[1, :14], atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------- pretraining objective
def test_loss_combination_by_hand():
    """Recompute L = β·(L_c + α·L_d) + γ·L_m from the model's pieces with the same random draws
    (masks, replacement vectors, distractors), each term written out frame by frame."""
    torch.manual_seed(8)
    cfg = W2vBertPretrainConfig.from_dict(dict(
        contrastive_layers=1, mask={"time_prob": 0.5, "time_length": 2, "time_min_masks": 1}, quantizer_groups=1,
        quantizer_entries=6, quantizer_dim=8, final_dim=8, num_negatives=3, logit_temperature=0.5,
        diversity_weight=0.3, contrastive_weight=0.7, mlm_weight=2.0))
    model = W2vBertPretrainer(W2vBertEncoderConfig.from_dict(_encoder_dict(layers=2)), cfg).eval()
    x, lens = torch.randn(2, 60, 80), torch.tensor([60, 47])
    torch.manual_seed(123)
    with torch.no_grad():
        loss, stats = model(x, lens)
        stats = {key: float(value) for key, value in stats.items()}  # 0-dim tensors → numbers

    enc = model.encoder
    with torch.no_grad():
        z, frame_lens, pad = enc.features(x, lens)
        z = enc.feature_projection.norm(z)
        torch.manual_seed(123)
        mask = span_mask(frame_lens, z.shape[1], 0.5, 2, 1)
        replaced = torch.where(mask[..., None], torch.randn_like(z), z)
        h = enc.conformer.embed(enc.feature_projection.linear(replaced), pad)
        context = enc.conformer.layers[0](h, pad)
        top = enc.conformer.layers[1](context, pad)
        q = model.quantizer(z[mask])
        negatives = sample_negatives(mask.sum(1), 3)
        predictions, targets = model.final_proj(context[mask]), model.project_q(q.quantized)
        codes = model.quantizer.weight_proj(z[mask]).argmax(-1)
        contrastive, mlm, contrastive_hits, mlm_hits = [], [], [], []
        for n in range(len(predictions)):
            candidates = [targets[n]] + [targets[i] for i in negatives[n]]
            sims = [F.cosine_similarity(predictions[n], c, dim=0) / 0.5 for c in candidates]
            sims = [s if i == 0 or not torch.equal(codes[negatives[n, i - 1]], codes[n]) else torch.tensor(-math.inf)
                    for i, s in enumerate(sims)]
            contrastive.append(-(sims[0] - torch.logsumexp(torch.stack(sims), 0)))
            contrastive_hits.append(all(sims[0] > s for s in sims[1:]))
            mlm_logits = model.mlm_proj(top[mask][n])
            mlm.append(-torch.log_softmax(mlm_logits, -1)[codes[n]])
            mlm_hits.append(all(mlm_logits[codes[n]] > v for i, v in enumerate(mlm_logits) if i != codes[n]))
        probs = torch.softmax(model.quantizer.weight_proj(z[mask]), -1).mean(0)
        diversity = (6 - torch.exp(-(probs * torch.log(probs + 1e-7)).sum())) / 6
        l_c, l_m = torch.stack(contrastive).mean(), torch.stack(mlm).mean()
        by_hand = 0.7 * (l_c + 0.3 * diversity) + 2.0 * l_m

    assert stats["masked_frames"] == float(mask.sum())
    assert stats["contrastive"] == pytest.approx(float(l_c), rel=1e-5)
    assert stats["mlm"] == pytest.approx(float(l_m), rel=1e-5)
    assert stats["diversity"] == pytest.approx(float(diversity), rel=1e-5)
    assert stats["contrastive_accuracy"] == pytest.approx(sum(contrastive_hits) / len(contrastive_hits))
    assert stats["mlm_accuracy"] == pytest.approx(sum(mlm_hits) / len(mlm_hits))
    assert float(loss) == pytest.approx(float(by_hand), rel=1e-5)
    assert float(w2v_bert_loss(l_c, diversity, l_m, cfg)) == pytest.approx(float(by_hand), rel=1e-6)


def test_pretrainer_trains_on_a_batch_shorter_than_a_mask_span():
    """0.3 s cuts (the manifests' minimum) are 7 frames after the 4x subsampling, under a 10-frame
    span: such a batch used to stop training ("no frame was masked"); now its longest utterance
    gets one span of T - 1 frames, and the loss is finite with gradients."""
    torch.manual_seed(3)
    cfg = W2vBertPretrainConfig.from_dict(dict(contrastive_layers=1, quantizer_entries=8, quantizer_dim=8,
                                               final_dim=8, num_negatives=4,
                                               mask=dict(time_prob=0.65, time_length=10, time_min_masks=2)))
    model = W2vBertPretrainer(W2vBertEncoderConfig.from_dict(_encoder_dict(layers=2)), cfg).train()
    loss, stats = model(torch.randn(2, 30, 80), torch.tensor([30, 24]))
    loss.backward()
    frames = model.encoder.features(torch.randn(1, 30, 80), torch.tensor([30]))[1].item()
    assert frames < 10 and float(stats["masked_frames"]) == frames - 1
    assert torch.isfinite(loss) and model.final_proj.weight.grad.abs().sum() > 0


def test_pretrainer_trains_every_part_and_reports_its_stats():
    torch.manual_seed(9)
    cfg = W2vBertPretrainConfig.from_dict(dict(contrastive_layers=1, quantizer_entries=8, quantizer_dim=8,
                                               final_dim=8, num_negatives=4,
                                               mask=dict(time_prob=0.65, time_length=2, time_min_masks=1)))
    model = W2vBertPretrainer(W2vBertEncoderConfig.from_dict(_encoder_dict(layers=2)), cfg).train()
    loss, stats = model(torch.randn(3, 70, 80), torch.tensor([70, 55, 40]))
    stats = {key: float(value) for key, value in stats.items()}  # 0-dim tensors → numbers
    loss.backward()
    assert set(stats) == {"loss", "contrastive", "diversity", "mlm", "contrastive_accuracy", "mlm_accuracy",
                          "code_perplexity", "prob_perplexity", "temperature", "masked_frames"}
    assert 0 <= stats["contrastive_accuracy"] <= 1 and 0 <= stats["mlm_accuracy"] <= 1
    assert stats["mlm"] == pytest.approx(math.log(8), rel=0.3)  # an untrained 8-way classifier
    for name, param in model.named_parameters():
        if name == "encoder.mask_embedding":  # fine-tuning's masks; pretraining uses random vectors
            assert param.grad is None
            continue
        assert param.grad is not None and param.grad.abs().sum() > 0, name
    with pytest.raises(ValueError, match="external targets"):
        model(torch.randn(1, 70, 80), torch.tensor([70]), torch.zeros(1, 16, dtype=torch.long))


def test_registered_as_an_fbank_frontend_and_the_presets_build():
    frontend = get_frontend({"name": "w2vbert"})
    assert frontend.input_type == "fbank"
    cfg = load_configs([ROOT / "egs/minisynth/conf/frontend_w2vbert.yaml", ROOT / "egs/minisynth/conf/pretrain.yaml"])
    pretrainer = frontend.build_pretrainer(cfg["frontend"]["encoder"],
                                           {k: v for k, v in cfg["pretrain"].items() if k != "collapse_warning_perplexity"})
    conformer = cfg["frontend"]["encoder"]["conformer"]
    assert pretrainer.cfg.contrastive_layers == 2 and conformer["layers"] == 4 and conformer["dim"] == 144
    xl = load_configs([ROOT / "conf/frontend/w2vbert_xl.yaml"])
    assert xl["frontend"]["encoder"]["conformer"]["layers"] == 24 and xl["pretrain"]["contrastive_layers"] == 12


# ---------------------------------------------------------------------- transformers import
def _hf_model(tmp_path: Path, position, task: str = "model"):
    transformers = pytest.importorskip("transformers")
    config = transformers.Wav2Vec2BertConfig(
        hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=48,
        conv_depthwise_kernel_size=5, position_embeddings_type=position, left_max_position_embeddings=6,
        right_max_position_embeddings=3, vocab_size=9)
    torch.manual_seed(10)
    cls = transformers.Wav2Vec2BertModel if task == "model" else transformers.Wav2Vec2BertForCTC
    model = cls(config).eval()
    with torch.no_grad():  # LayerNorms at 1/0 and zero biases would hide swapped names
        for param in model.parameters():
            param.add_(0.2 * torch.randn_like(param))
    model.save_pretrained(tmp_path)
    return model, tmp_path


def _read_hf(directory: Path):
    return hf_import.read_config(directory), hf_import.read_state_dict(directory)


@pytest.mark.parametrize("position,task", [("relative_key", "model"), ("relative", "model"), ("relative_key", "ctc")])
def test_from_hf_matches_transformers_layer_by_layer(tmp_path, position, task):
    model, directory = _hf_model(tmp_path, position, task)
    frontend, state = from_hf(*_read_hf(directory))
    assert frontend["name"] == "w2vbert"
    imported = hf_import.import_hf(directory)
    assert imported.frontend == frontend  # by model_type
    assert imported.data["feature_type"] == "sslasr-seamless-fbank-2"  # fine-tuned on the features it learnt from
    encoder = W2vBertEncoder(W2vBertEncoderConfig.from_dict(frontend["encoder"])).eval()
    encoder.load_state_dict(state)  # strict: every tensor placed, none missing

    torch.manual_seed(11)
    fbank, lens = 3 * torch.randn(2, 75, 80) + 2, torch.tensor([75, 52])
    with torch.no_grad():
        ours = encoder(fbank, lens, return_all=True)
        # what SeamlessM4TFeatureExtractor feeds the model: normalised per bin, frame pairs stacked
        stacked = normalize_fbank_bins(fbank, lens)[:, :74].reshape(2, 37, 160)
        attention_mask = (torch.arange(37)[None, :] < ours.lengths[:, None]).long()
        base = model if task == "model" else model.wav2vec2_bert
        theirs = base(stacked, attention_mask=attention_mask, output_hidden_states=True)
    assert ours.lengths.tolist() == [37, 26]
    assert len(theirs.hidden_states) == len(ours.layers) == 4
    real = ~ours.padding_mask
    for layer, (a, b) in enumerate(zip(theirs.hidden_states, ours.layers)):
        assert (a[real] - b[real]).abs().max() < 1e-4, layer
    assert (theirs.last_hidden_state[real] - ours.hidden[real]).abs().max() < 1e-4


def test_from_hf_takes_each_dropout_where_transformers_applies_it():
    """transformers' Wav2Vec2Bert drops the attention module's output with attention_dropout (its
    self_attn_dropout), the feed-forward output with hidden_dropout; both went to hidden_dropout."""
    config = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 4, "intermediate_size": 48,
              "hidden_act": "swish", "attention_dropout": 0.3, "hidden_dropout": 0.1, "activation_dropout": 0.2}
    block = W2vBertEncoder(encoder_config_from_hf(config)).conformer.layers[0]
    assert (block.attention_dropout.p, block.attention.dropout, block.dropout.p) == (0.3, 0.3, 0.1)
    own = W2vBertEncoder(W2vBertEncoderConfig.from_dict(_encoder_dict(dropout=0.15))).conformer.layers[0]
    assert own.attention_dropout.p == own.dropout.p == 0.15  # ours: every module's output alike


def test_from_hf_errors_name_the_tensors(tmp_path):
    _, directory = _hf_model(tmp_path, "relative_key")
    config, state = _read_hf(directory)
    with pytest.raises(ValueError, match="adapter"):
        from_hf(dict(config, add_adapter=True), state)
    with pytest.raises(ValueError, match="rotary"):
        from_hf(dict(config, position_embeddings_type="rotary"), state)
    extra = dict(state, **{"encoder.layers.0.self_attn.linear_extra.weight": torch.zeros(2)})
    with pytest.raises(ValueError, match="linear_extra"):
        from_hf(config, extra)
    missing = {k: v for k, v in state.items() if k != "encoder.layers.2.conv_module.depthwise_conv.weight"}
    with pytest.raises(ValueError, match=r"conformer\.layers\.2\.conv\.depthwise\.weight"):
        from_hf(config, missing)


# ---------------------------------------------------------------------- SpecAugment on fbank batches
@pytest.fixture(scope="module")
def fbank_cuts(tmp_path_factory) -> Path:
    """Four short synthetic recordings with stored 80-bin fbank (stage 2's compute_fbank)."""
    root = tmp_path_factory.mktemp("fbank")
    rng = np.random.default_rng(0)
    recordings = []
    for i, seconds in enumerate([1.2, 0.9, 1.5, 0.7]):
        t = np.arange(int(16000 * seconds)) / 16000
        audio = 0.3 * np.sin(2 * np.pi * (200 + 150 * i) * t) + 0.05 * rng.standard_normal(len(t))
        soundfile.write(root / f"utt{i}.wav", audio.astype(np.float32), 16000)
        recordings.append(Recording.from_file(root / f"utt{i}.wav", recording_id=f"utt{i}"))
    write_cuts(CutSet.from_manifests(recordings=recordings), root / "cuts.jsonl.gz")
    compute_fbank(root / "cuts.jsonl.gz", root / "cuts_fbank.jsonl.gz", root / "storage", num_jobs=1)
    return root / "cuts_fbank.jsonl.gz"


def _raw_features(cuts_path: Path):
    return {cut.id: torch.from_numpy(cut.load_features()) for cut in load_cuts(cuts_path)}


def test_spec_augment_masks_training_batches_only(fbank_cuts):
    spec = dict(time_warp_factor=None, num_feature_masks=2, features_mask_size=30, num_frame_masks=2,
                frames_mask_size=30, max_frames_mask_fraction=0.5, p=1.0)
    cfg = load_configs([ROOT / "egs/minisynth/conf/frontend_w2vbert.yaml", ROOT / "egs/minisynth/conf/pretrain.yaml"],
                       ["task=pretrain", f"data.train_cuts={fbank_cuts}", f"data.valid_cuts={fbank_cuts}",
                        "data.num_workers=0", "data.max_duration=100", "data.num_buckets=2"])
    cfg["data"]["spec_augment"] = spec
    task = PretrainTask(cfg)

    class Single:
        world_size, rank = 1, 0

    raw = _raw_features(fbank_cuts)
    torch.manual_seed(12)
    train = task.train_dataloader(Single())
    train.sampler.set_epoch(0)
    valid = task.valid_dataloader(Single())
    augmented_cuts = 0
    for batch in train:
        for row, n, cut_id in zip(batch["inputs"], batch["input_lens"].tolist(), batch["cut_ids"]):
            original = raw[cut_id]
            assert 1 <= len(original) - n <= 2  # the last frames, repeated to lhotse's count, are left out
            original = original[:n]
            changed = row[:n] != original
            if changed.any():
                augmented_cuts += 1
                # masked cells hold one value: the utterance's mean (no warp configured)
                assert torch.allclose(row[:n][changed], original.mean().expand(int(changed.sum())), atol=1e-4)
    assert augmented_cuts >= 3
    for batch in valid:
        for row, n, cut_id in zip(batch["inputs"], batch["input_lens"].tolist(), batch["cut_ids"]):
            assert torch.equal(row[:n], raw[cut_id][:n])


def test_spec_augment_batch_leaves_padding_alone():
    transform = build_spec_augment(dict(time_warp_factor=5, num_feature_masks=2, features_mask_size=20,
                                        num_frame_masks=2, frames_mask_size=10, max_frames_mask_fraction=0.3, p=1.0))
    torch.manual_seed(13)
    features = torch.randn(3, 60, 80)
    lens = torch.tensor([60, 41, 25])
    features[1, 41:] = features[2, 25:] = -7.0
    augmented = spec_augment_batch(features, lens, transform)
    assert torch.all(augmented[1, 41:] == -7.0) and torch.all(augmented[2, 25:] == -7.0)
    assert all(not torch.equal(augmented[b, :n], features[b, :n]) for b, n in enumerate(lens.tolist()))
    assert not torch.equal(features, augmented) and features[1, 41:].eq(-7.0).all()  # input untouched


def test_spec_augment_leaves_an_utterance_too_short_for_a_time_mask_as_it_is():
    """lhotse's time mask of a 6-frame utterance is 0.15 · 6 // 1 = 0 frames wide, and drawing
    it failed: one such row stopped the training."""
    transform = build_spec_augment(dict(num_feature_masks=2, features_mask_size=20, p=1.0))  # fraction 0.15
    features, lens = torch.randn(3, 60, 80), torch.tensor([60, 7, 6])
    augmented = spec_augment_batch(features, lens, transform, key="b")
    assert torch.equal(augmented[2], features[2]) and not torch.equal(augmented[1, :7], features[1, :7])
    assert not torch.equal(augmented[0], features[0])


def test_spec_augment_config_errors(fbank_cuts):
    with pytest.raises(ValueError, match="unknown keys.*frames_mask"):
        build_spec_augment({"frames_mask": 10})
    for bad in ({"num_frame_masks": 0}, {"max_frames_mask_fraction": 0.0}):  # a ZeroDivisionError at the first batch
        with pytest.raises(ValueError, match=f"{next(iter(bad))} must be positive"):
            build_spec_augment(bad)
    assert build_spec_augment(None) is None
    with pytest.raises(ValueError, match="fbank features"):
        make_dataloader(load_cuts(fbank_cuts), input_type="waveform", max_duration=10, shuffle=True,
                        num_buckets=2, spec_augment={"p": 1.0})


def test_minisynth_finetuning_turns_spec_augment_on_and_pretraining_does_not():
    conf = ROOT / "egs/minisynth/conf"
    finetune = load_configs([conf / "frontend_w2vbert.yaml", conf / "finetune_ctc.yaml", conf / "finetune_w2vbert.yaml"])
    assert finetune["data"]["spec_augment"]["num_feature_masks"] > 0
    assert finetune["frontend"]["encoder"]["mask"]["time_prob"] == 0.0  # SpecAugment replaces span masks
    pretrain = load_configs([conf / "frontend_w2vbert.yaml", conf / "pretrain.yaml"])
    assert "spec_augment" not in pretrain["data"]
    scratch = load_configs([conf / "frontend_w2vbert.yaml", conf / "finetune_ctc.yaml", conf / "finetune_w2vbert.yaml",
                            conf / "scratch.yaml"])
    for cfg in (finetune, scratch):
        model = build_asr_model(cfg, vocab_size=30)
        assert isinstance(model.encoder, W2vBertEncoder) and model.encoder.output_dim == 144


# ---------------------------------------------------------------------- recipe
@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng is not installed")
def test_recipe_runs_with_w2vbert(tmp_path, prepared_minisynth):
    recipe = recipe_with_data(tmp_path, prepared_minisynth)
    # the scratch system's configs are checked in test_minisynth_finetuning_...; here only the pretrained one
    result = run_recipe(recipe, *SMOKE, "--frontend", "w2vbert", "--compare-scratch", "false", "--stage", "2",
                        "--speed-perturb", "0.9 1.1", timeout=1200)
    assert result.returncode == 0, result.stderr[-4000:]
    manifests = recipe / "data/manifests"
    assert (manifests / ".fbank.done").exists()
    for split in ["train", "dev", "test", "pretrain"]:
        assert (manifests / f"minisynth_cuts_{split}_fbank.jsonl.gz").exists(), split
    exp = recipe / "exp/ctc_w2vbert_all_sp0.9-1.1"
    finetuned = load_configs([exp / "config.yaml"])
    assert finetuned["data"]["spec_augment"] and finetuned["frontend"]["name"] == "w2vbert"
    # speed perturbation: fine-tuned on the labeled cuts plus fbank'd copies at 0.9 and 1.1
    assert finetuned["data"]["train_cuts"] == "data/manifests/minisynth_cuts_train_fbank_sp0.9-1.1.jsonl.gz"
    originals = load_cuts(manifests / "minisynth_cuts_train_fbank.jsonl.gz").to_eager()
    perturbed = load_cuts(recipe / finetuned["data"]["train_cuts"]).to_eager()
    assert len(perturbed) == 3 * len(originals) and all(c.has_features for c in perturbed)
    slow = perturbed[f"{originals[0].id}_sp0.9"]
    assert slow.num_frames == pytest.approx(originals[0].num_frames / 0.9, abs=2)
    labeled = sum(c.duration for c in originals)
    assert float((exp / "labeled_seconds").read_text()) == pytest.approx(labeled, abs=0.01)
    assert "spec_augment" not in load_configs([recipe / "exp/pretrain_w2vbert/config.yaml"])["data"]
    rows = [json.loads(line) for line in (recipe / "exp/results.jsonl").read_text().splitlines()]
    pretrained = [r for r in rows if r["pretrained"]]
    assert {r["test_set"] for r in pretrained} == {"dev", "test"}
    assert all(r["frontend"] == "w2vbert" and r["num_utts"] == 8 for r in pretrained)
    assert all(r["speed_perturb"] == "0.9,1.1" and r["labeled_seconds"] == pytest.approx(labeled, abs=0.01)
               for r in rows)
    assert len(pretrained) == len(rows)
