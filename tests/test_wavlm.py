"""WavLM: relative position buckets (hand-computed), the per-layer gate, the fp16 scaled softmax,
parity with transformers' WavLMModel layer by layer, utterance mixing, and the pretrainer's
clean targets."""

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml

from hf_reference import transformers_outputs
from sslasr.models.blocks.relative_position import (
    GatedRelativePositionBias, RelativePositionBias, relative_position_bucket, scaled_softmax_attention,
)
from sslasr.models.blocks.transformer import MultiHeadSelfAttention

torch.set_num_threads(1)


# ---------------------------------------------------------------------- relative position buckets
# WavLM's 320 buckets, 800 frames: 160 per direction, offsets below 80 exact, then
# 80 + ⌊log(δ/80) / log(10) · 80⌋ capped at 159; key after query (δ = j − i > 0) adds 160.
@pytest.mark.parametrize("offset, bucket", [
    (0, 0), (-1, 1), (1, 161), (-79, 79), (79, 239), (-80, 80), (80, 240),
    (-100, 87),    # log10(1.25) · 80 = 7.75
    (100, 247),
    (-160, 104),   # log10(2) · 80 = 24.08
    (-200, 111),   # log10(2.5) · 80 = 31.84
    (-400, 135),   # log10(5) · 80 = 55.92
    (-799, 159), (-800, 159), (-5000, 159), (5000, 319),
])
def test_bucket_hand_computed(offset, bucket):
    assert int(relative_position_bucket(torch.tensor(offset))) == bucket


def test_bucket_small_config_and_errors():
    # 16 buckets, distance 20: 8 per direction, 4 exact, then 4 + ⌊log(δ/4)/log(5) · 4⌋ ≤ 7
    offsets = torch.tensor([-3, -4, -6, -9, -12, -19, -20, 3, 6, 100])
    expected = [3, 4, 5, 6, 6, 7, 7, 11, 13, 15]  # log5(1.5)·4 = 1.01, log5(2.25)·4 = 2.02, log5(3)·4 = 2.73
    assert relative_position_bucket(offsets, 16, 20).tolist() == expected
    with pytest.raises(ValueError, match="even"):
        relative_position_bucket(offsets, 15, 20)
    with pytest.raises(ValueError, match="max_distance"):
        relative_position_bucket(offsets, 16, 4)


def test_relative_bias_is_a_lookup_by_offset():
    bias_module = RelativePositionBias(heads=3, num_buckets=16, max_distance=20)
    bias = bias_module(30)
    assert bias.shape == (3, 30, 30)
    table = bias_module.embedding.weight  # (buckets, heads)
    for i, j in [(0, 0), (5, 2), (2, 5), (0, 29), (29, 0), (10, 13)]:
        bucket = int(relative_position_bucket(torch.tensor(j - i), 16, 20))
        assert torch.equal(bias[:, i, j], table[bucket])
    # the same offset anywhere in the sequence gets the same bias (Toeplitz)
    assert torch.equal(bias[:, 3, 7], bias[:, 20, 24])


@pytest.mark.parametrize("length", [1, 2, 7, 60])
def test_relative_bias_gradient_equals_the_per_entry_lookups(length):
    """The bias is built from one lookup per offset (an unfold of the offset row); its gradient
    into the bucket table must equal that of looking up all T² entries."""
    torch.manual_seed(0)
    bias_module = RelativePositionBias(heads=3, num_buckets=16, max_distance=20)
    bias = bias_module(length)
    assert bias.is_contiguous()
    positions = torch.arange(length)
    buckets = relative_position_bucket(positions[None, :] - positions[:, None], 16, 20)
    lookups = bias_module.embedding(buckets).permute(2, 0, 1)
    torch.testing.assert_close(bias, lookups, rtol=0, atol=0)
    grad = torch.randn_like(bias)
    table = bias_module.embedding.weight
    torch.testing.assert_close(torch.autograd.grad(bias, table, grad)[0], torch.autograd.grad(lookups, table, grad)[0])


# ---------------------------------------------------------------------- the gate
def test_gate_hand_computed():
    gate = GatedRelativePositionBias(dim=4, heads=2)
    with torch.no_grad():
        gate.gate_proj.weight.zero_()
        gate.gate_proj.bias.copy_(torch.tensor([1.0, 0, 0, 0, 0, 0, 0, -1.0]))  # group sums 1 and −1
        gate.reset_scale.copy_(torch.tensor([3.0, 0.5]).view(1, 2, 1, 1))
    bias = torch.arange(2 * 3 * 3, dtype=torch.float32).view(2, 3, 3)
    out = gate(torch.randn(2, 3, 4), bias)
    a, b = 1 / (1 + math.exp(-1.0)), 1 / (1 + math.exp(1.0))  # σ(1), σ(−1)
    scale = [a * (b * 3.0 - 1) + 2, a * (b * 0.5 - 1) + 2]  # 1.85878, 1.63198
    assert scale[0] == pytest.approx(1.8587773, abs=1e-6)
    # the paper's form: 1 + g_update + (1 − g_update)·g_reset·c with g_update = 1 − a
    assert scale[0] == pytest.approx(1 + (1 - a) + a * b * 3.0)
    assert out.shape == (2, 2, 3, 3)
    for h in range(2):
        torch.testing.assert_close(out[:, h], (scale[h] * bias[h]).expand(2, 3, 3))


def test_gate_gradients_equal_the_broadcast_product():
    """The gated bias's hand-written backward (two batched products) against autograd through
    scale (B, H, T, 1) · bias (H, T, T)."""
    torch.manual_seed(0)
    gate = GatedRelativePositionBias(dim=12, heads=3).double()
    x = torch.randn(2, 5, 12, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(3, 5, 5, dtype=torch.float64, requires_grad=True)
    out = gate(x, bias)
    per_head = x.view(2, 5, 3, 4).transpose(1, 2)
    not_update, reset = torch.sigmoid(gate.gate_proj(per_head).view(2, 3, 5, 2, 4).sum(-1)).chunk(2, dim=-1)
    expected = (not_update * (reset * gate.reset_scale - 1.0) + 2.0) * bias
    torch.testing.assert_close(out, expected)
    grad = torch.randn_like(out)
    inputs = [x, bias, *gate.parameters()]
    for got, want in zip(torch.autograd.grad(out, inputs, grad), torch.autograd.grad(expected, inputs, grad)):
        torch.testing.assert_close(got, want)


def test_gate_reads_each_heads_slice_of_its_query_frame():
    gate = GatedRelativePositionBias(dim=4, heads=2)
    with torch.no_grad():
        gate.gate_proj.weight.zero_()
        gate.gate_proj.weight[0, 1] = 1.0  # first group sum = second channel of the head's slice
        gate.gate_proj.bias.zero_()
        gate.reset_scale.fill_(1.0)
    x = torch.zeros(1, 2, 4)
    x[0, 1, 1] = 2.0   # frame 1, head 0
    x[0, 0, 3] = -1.0  # frame 0, head 1
    out = gate(x, torch.ones(2, 2, 2))
    sig = lambda v: 1 / (1 + math.exp(-v))  # noqa: E731
    expect = lambda g: sig(g) * (0.5 - 1) + 2  # noqa: E731  (b = σ(0) = 0.5, c = 1)
    assert out[0, 0, 0, 0].item() == pytest.approx(expect(0.0))
    assert out[0, 0, 1, 0].item() == pytest.approx(expect(2.0))   # row = query frame
    assert out[0, 1, 0, 1].item() == pytest.approx(expect(-1.0))
    assert out[0, 1, 1, 1].item() == pytest.approx(expect(0.0))


# ---------------------------------------------------------------------- scaled softmax (fp16)
def test_scaled_softmax_equals_plain_attention_in_fp32():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 7, 16) for _ in range(3))
    bias = torch.randn(2, 3, 7, 7)
    keep = torch.ones(2, 1, 1, 7, dtype=torch.bool)
    keep[1, :, :, 5:] = False
    for mask in (None, bias, keep, bias.masked_fill(~keep, float("-inf"))):
        expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        torch.testing.assert_close(scaled_softmax_attention(q, k, v, mask, alpha=32.0), expected,
                                   atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="alpha"):
        scaled_softmax_attention(q, k, v, None, alpha=0.0)


def test_scaled_softmax_survives_fp16_logits_that_overflow():
    torch.manual_seed(0)
    q, k = torch.randn(1, 2, 5, 64) * 100, torch.randn(1, 2, 5, 64) * 100
    v, bias = torch.randn(1, 2, 5, 64), torch.randn(1, 2, 5, 5)
    logits = q.double() @ k.double().transpose(-1, -2)
    assert logits.abs().max() > 65504  # fp16's largest finite value
    reference = torch.softmax(logits / 8 + bias.double(), -1) @ v.double()
    naive = torch.softmax(q.half() @ k.half().transpose(-1, -2) / 8 + bias.half(), -1) @ v.half()
    assert not torch.isfinite(naive).all()
    out = scaled_softmax_attention(q.half(), k.half(), v.half(), bias.half(), alpha=32.0)
    assert out.dtype == torch.float16
    torch.testing.assert_close(out.double(), reference, atol=3e-3, rtol=0)


def test_attention_module_takes_the_scaled_path_in_fp16_only():
    torch.manual_seed(0)
    attention = MultiHeadSelfAttention(dim=16, heads=2, dropout=0.0, softmax_alpha=32.0).eval()
    x = torch.randn(1, 6, 16)
    bias = torch.randn(1, 2, 6, 6)
    with torch.no_grad():
        fp32 = attention(x, bias)
        plain = MultiHeadSelfAttention(dim=16, heads=2, dropout=0.0).eval()
        plain.load_state_dict(attention.state_dict())
        assert torch.equal(plain(x, bias), fp32)  # fp32: SDPA either way
        q, k, v = (t.half() for t in attention.half()._project_qkv(x.half()))
        fp16 = attention(x.half(), bias.half())
        scaled = attention.out_proj(scaled_softmax_attention(q, k, v, bias.half(), 32.0).transpose(1, 2).reshape(1, 6, 16))
    assert torch.equal(fp16, scaled)
    torch.testing.assert_close(fp16.float(), fp32, atol=2e-2, rtol=0)


# ---------------------------------------------------------------------- transformers parity
def _hf_wavlm(stable: bool, seed: int = 0):
    transformers = pytest.importorskip("transformers")
    config = transformers.WavLMConfig(
        hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64,
        conv_dim=[16, 16, 16, 16], conv_kernel=[10, 8, 4, 4], conv_stride=[5, 4, 4, 4],
        num_conv_pos_embeddings=8, num_conv_pos_embedding_groups=4,
        num_buckets=16, max_bucket_distance=20,  # 49 frames reach the log-spaced and capped buckets
        do_stable_layer_norm=stable, feat_extract_norm="layer" if stable else "group")
    torch.manual_seed(seed)
    model = transformers.WavLMModel(config).eval()
    with torch.no_grad():  # move the init values (ones, small normals) somewhere that tests them
        for name, param in model.named_parameters():
            if "rel_attn_embed" in name or "gru_rel_pos" in name:
                param.normal_(0.0, 1.0)
    return model


def _import(model, tmp_path):
    from sslasr.models.hf_import import read_config, read_state_dict
    from sslasr.models.wavlm import WavLMEncoder, WavLMEncoderConfig, from_hf

    model.save_pretrained(tmp_path)
    frontend, state = from_hf(read_config(tmp_path), read_state_dict(tmp_path))
    assert frontend["name"] == "wavlm"
    encoder = WavLMEncoder(WavLMEncoderConfig.from_dict(frontend["encoder"])).eval()
    encoder.load_state_dict(state)  # strict: every tensor placed
    return frontend, encoder


@pytest.mark.parametrize("stable", [False, True], ids=["post_ln_group_norm", "pre_ln_layer_norm"])
def test_hidden_states_match_transformers(stable, tmp_path):
    model = _hf_wavlm(stable)
    frontend, encoder = _import(model, tmp_path)
    assert frontend["encoder"]["relative_position"] == {"num_buckets": 16, "max_distance": 20}
    assert frontend["encoder"]["transformer"]["layer_norm_first"] is stable
    torch.manual_seed(1)
    lengths = torch.tensor([16000, 9000])
    audio = torch.randn(2, 16000) * (torch.arange(16000)[None] < lengths[:, None])
    attention_mask = (torch.arange(16000)[None] < lengths[:, None]).long()
    with torch.no_grad():
        ref = transformers_outputs(model, audio, lengths, attention_mask)
        ours = encoder(audio, lengths, return_all=True)
    valid = ~ours.padding_mask
    assert valid.sum(1).tolist() == [49, 28]
    layers = len(ours.layers) - 1
    assert len(ref.hidden_states) == layers + 1 == 4
    # transformers: [input of layer 1, output of layer 1, ...]; with pre-LN its last entry is
    # before the final LayerNorm, which ours (and its last_hidden_state) include
    compared = list(zip(ref.hidden_states[:layers], ours.layers[:layers])) + [(ref.last_hidden_state, ours.hidden)]
    if not stable:
        compared.append((ref.hidden_states[layers], ours.layers[layers]))
    for theirs, mine in compared:
        torch.testing.assert_close(mine[valid], theirs[valid], atol=1e-4, rtol=0)
    # the relative bias matters: without it the outputs part
    with torch.no_grad():
        encoder.transformer.position_bias.embedding.weight.zero_()
        assert (encoder(audio, lengths).hidden - ref.last_hidden_state)[valid].abs().max() > 1e-2


def test_from_hf_names_unmapped_and_missing_tensors(tmp_path):
    from sslasr.models.hf_import import read_config, read_state_dict
    from sslasr.models.wavlm import from_hf

    model = _hf_wavlm(stable=False)
    model.save_pretrained(tmp_path)
    config, state = read_config(tmp_path), read_state_dict(tmp_path)
    extra = dict(state, **{"encoder.layers.1.attention.rel_attn_embed.weight": torch.zeros(16, 4)})
    with pytest.raises(ValueError, match=r"unmapped.*encoder\.layers\.1\.attention\.rel_attn_embed\.weight"):
        from_hf(config, extra)
    missing = {k: v for k, v in state.items() if "layers.2.attention.gru_rel_pos_const" not in k}
    with pytest.raises(ValueError, match=r"missing.*transformer\.layers\.2\.position_gate\.reset_scale"):
        from_hf(config, missing)
    with pytest.raises(ValueError, match="model_type 'wavlm'"):
        from_hf(dict(config, model_type="hubert"), state)
    with pytest.raises(ValueError, match="hidden_act"):
        from_hf(dict(config, hidden_act="relu"), state)
    # a CTC checkpoint: the base model under "wavlm.", its lm_head skipped
    ctc_state = {f"wavlm.{k}": v for k, v in state.items()}
    ctc_state.update({"lm_head.weight": torch.zeros(32, 32), "lm_head.bias": torch.zeros(32)})
    _, encoder_state = from_hf(config, ctc_state)
    assert set(encoder_state) == set(from_hf(config, state)[1])


# ---------------------------------------------------------------------- utterance mixing
def _speech_like_batch(seed: int = 0, batch: int = 6):
    """Zero-padded utterances of different lengths and levels, no silent stretch."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(4000, 16000, (batch,), generator=gen)
    audio = torch.zeros(batch, int(lengths.max()))
    t = torch.arange(audio.shape[1]) / 16000
    for i, length in enumerate(lengths.tolist()):
        level = 0.05 + 0.5 * torch.rand((), generator=gen)
        tone = torch.sin(2 * math.pi * (150 + 50 * i) * t[:length])
        audio[i, :length] = level * (tone + 0.3 * torch.randn(length, generator=gen))
    return audio, lengths


def _measured_snr_db(clean: torch.Tensor, mixed: torch.Tensor, mix) -> float:
    region = slice(mix.start, mix.start + mix.length)
    added = (mixed[mix.index, region] - clean[mix.index, region]).double()
    return 10 * math.log10(clean[mix.index, region].double().pow(2).mean() / added.pow(2).mean())


def test_mixing_energy_ratios_regions_and_sources():
    from sslasr.data.mixing import UtteranceMixer, UtteranceMixingConfig

    mixer = UtteranceMixer(UtteranceMixingConfig(prob=1.0, noise_prob=0.5), seed=3)
    snrs = {"speech": [], "noise": []}
    for batch_index in range(25):
        audio, lengths = _speech_like_batch(batch_index)
        mixed, mixes = mixer(audio, lengths, 16000, key=f"batch{batch_index}")
        assert len(mixes) == len(lengths)  # prob 1: every utterance
        touched = torch.zeros_like(audio, dtype=torch.bool)
        for mix in mixes:
            length = int(lengths[mix.index])
            assert 1 <= mix.length <= length // 2 and 0 <= mix.start <= length - mix.length
            measured = _measured_snr_db(audio, mixed, mix)
            assert measured == pytest.approx(mix.snr_db, abs=1e-3)
            low, high = (-5.0, 5.0) if mix.kind == "speech" else (-5.0, 20.0)
            assert low <= measured <= high
            snrs[mix.kind].append(measured)
            region = slice(mix.start, mix.start + mix.length)
            added = mixed[mix.index, region] - audio[mix.index, region]
            if mix.kind == "speech":  # a clean segment of another utterance, scaled
                j = int(mix.source)
                assert j != mix.index and mix.source_offset + mix.length <= int(lengths[j])
                segment = audio[j, mix.source_offset: mix.source_offset + mix.length]
                torch.testing.assert_close(added, mix.gain * segment, atol=1e-6, rtol=1e-4)
            else:
                assert mix.source.startswith("synthetic(beta=")
            touched[mix.index, region] = True
        assert torch.equal(mixed[~touched], audio[~touched])  # outside the regions (padding too): as it was
    # both kinds happen and the ratios spread over their ranges
    assert min(len(snrs["speech"]), len(snrs["noise"])) > 40
    assert min(snrs["speech"]) < -3.5 and max(snrs["speech"]) > 3.5
    assert min(snrs["noise"]) < -2 and max(snrs["noise"]) > 17


def test_mixing_is_deterministic_and_counts_follow_the_probabilities():
    from sslasr.data.mixing import UtteranceMixer, UtteranceMixingConfig, mixing_stats

    audio, lengths = _speech_like_batch(0)
    mixer = UtteranceMixer(UtteranceMixingConfig(prob=0.5), seed=0)
    first, first_mixes = mixer(audio, lengths, 16000, key="a|b|c")
    again, again_mixes = UtteranceMixer(UtteranceMixingConfig(prob=0.5), seed=0)(audio, lengths, 16000, key="a|b|c")
    assert torch.equal(first, again) and first_mixes == again_mixes
    other_key, _ = mixer(audio, lengths, 16000, key="a|b|d")
    other_seed, _ = UtteranceMixer(UtteranceMixingConfig(prob=0.5), seed=1)(audio, lengths, 16000, key="a|b|c")
    assert not torch.equal(first, other_key) and not torch.equal(first, other_seed)

    config = UtteranceMixingConfig(prob=0.2, noise_prob=0.25)
    mixer = UtteranceMixer(config, seed=0)
    totals = {"mixed_utterances": 0.0, "noise_utterances": 0.0}
    for b in range(400):
        _, mixes = mixer(audio, lengths, 16000, key=str(b))
        for name, value in mixing_stats(mixes).items():
            totals[name] += value
    utterances = 400 * len(lengths)
    assert totals["mixed_utterances"] / utterances == pytest.approx(0.2, abs=0.03)
    assert totals["noise_utterances"] / totals["mixed_utterances"] == pytest.approx(0.25, abs=0.06)
    for prob, noise_prob, kinds in [(0.0, 0.5, set()), (1.0, 0.0, {"speech"}), (1.0, 1.0, {"noise"})]:
        _, mixes = UtteranceMixer(UtteranceMixingConfig(prob=prob, noise_prob=noise_prob))(audio, lengths, 16000, "k")
        assert {m.kind for m in mixes} == kinds
    # a batch of one has no other utterance: it gets noise
    _, mixes = UtteranceMixer(UtteranceMixingConfig(prob=1.0, noise_prob=0.0))(audio[:1], lengths[:1], 16000, "k")
    assert [m.kind for m in mixes] == ["noise"]


@pytest.mark.parametrize("beta", [0.0, 1.0, 2.0])
def test_coloured_noise_spectrum_slope(beta):
    from sslasr.data.mixing import coloured_noise

    noise = coloured_noise(2 ** 16, beta, torch.Generator().manual_seed(0)).double()
    assert noise.mean().abs() < 1e-6 and noise.pow(2).mean() == pytest.approx(1.0, rel=1e-4)
    power = torch.fft.rfft(noise).abs().pow(2)[1:]
    frequency = torch.fft.rfftfreq(2 ** 16, dtype=torch.float64)[1:]
    # average the periodogram in log-spaced bands, then fit log P = −β log f + c
    edges = torch.logspace(math.log10(frequency[0]), math.log10(frequency[-1]), 30, dtype=torch.float64)
    band = torch.bucketize(frequency, edges)
    points = [(frequency[band == b].log().mean(), power[band == b].mean().log()) for b in band.unique()
              if (band == b).sum() >= 4]
    x = torch.stack([p[0] for p in points])
    y = torch.stack([p[1] for p in points])
    slope = ((x - x.mean()) * (y - y.mean())).sum() / (x - x.mean()).pow(2).sum()
    assert float(slope) == pytest.approx(-beta, abs=0.1)


def test_mixing_with_a_noise_manifest(tmp_path):
    soundfile = pytest.importorskip("soundfile")
    from lhotse import CutSet, Recording

    from sslasr.data.mixing import UtteranceMixer, UtteranceMixingConfig

    gen = np.random.default_rng(0)
    recordings = []
    for name, rate, seconds in [("hum", 16000, 0.1), ("hiss", 16000, 1.0)]:  # the short one loops
        path = tmp_path / f"{name}.wav"
        soundfile.write(path, (0.1 * gen.standard_normal(int(rate * seconds))).astype(np.float32), rate)
        recordings.append(Recording.from_file(path, recording_id=name))
    manifest = tmp_path / "noise_cuts.jsonl.gz"
    CutSet.from_manifests(recordings=recordings).to_file(manifest)
    mixer = UtteranceMixer(UtteranceMixingConfig(prob=1.0, noise_prob=1.0, noise_cuts=str(manifest)), seed=0)
    sources, looped = set(), 0
    for b in range(4):
        audio, lengths = _speech_like_batch(b, batch=4)
        mixed, mixes = mixer(audio, lengths, 16000, key=str(b))
        for mix in mixes:
            sources.add(mix.source)
            assert _measured_snr_db(audio, mixed, mix) == pytest.approx(mix.snr_db, abs=1e-3)
            assert -5.0 <= mix.snr_db <= 20.0
            if mix.source.startswith("hum") and mix.length > 1600:  # longer than the 0.1 s hum: it loops
                region = slice(mix.start, mix.start + mix.length)
                noise = (mixed[mix.index, region] - audio[mix.index, region]).double() / mix.gain
                torch.testing.assert_close(noise[1600:], noise[:-1600], atol=1e-5, rtol=1e-4)
                assert noise[-1600:].abs().max() > 0.01  # not zero-padded
                looped += 1
    assert {name for name in ("hum", "hiss") for source in sources if source.startswith(name)} == {"hum", "hiss"}
    assert looped


def test_mixing_config_errors():
    from sslasr.data.mixing import build_mixer

    assert build_mixer(None) is None
    with pytest.raises(ValueError, match=r"unknown keys \['probability'\]"):
        build_mixer({"probability": 0.2})
    with pytest.raises(ValueError, match="prob must be in"):
        build_mixer({"prob": 1.5})
    with pytest.raises(ValueError, match="speech_snr_db"):
        build_mixer({"speech_snr_db": [5, -5]})
    mixer = build_mixer({"prob": 0.3, "noise_snr_db": [0, 10]}, seed=7)
    assert mixer.cfg.noise_snr_db == (0, 10) and mixer.seed == 7


# ---------------------------------------------------------------------- pretraining on mixed batches
TINY_WAVLM = dict(
    conv_layers=[[16, 10, 5], [16, 8, 4], [16, 4, 4], [16, 4, 4]], conv_norm="group", conv_bias=False,
    feature_grad_mult=0.1, dropout_input=0.0,
    transformer=dict(dim=32, layers=2, heads=4, ffn_dim=64, dropout=0.0, attention_dropout=0.0,
                     activation_dropout=0.0, layer_norm_first=True, layerdrop=0.0, pos_conv_kernel=8,
                     pos_conv_groups=4, softmax_alpha=32.0),
    relative_position=dict(num_buckets=32, max_distance=100))


def _labelled_cuts(tmp_path, durations=(1.0, 1.4, 0.8), rate=16000, clusters=8):
    """Cuts over distinct tone+noise wav files, each with 50 Hz frame labels (a TemporalArray
    stored with lhotse's NumpyFilesWriter, as the k-means stage writes them): utterance i has
    labels i, i+3, i+6, ... so every utterance's labels differ from the others'."""
    soundfile = pytest.importorskip("soundfile")
    from lhotse import CutSet, NumpyFilesWriter, Recording

    rng = np.random.default_rng(0)
    cuts = []
    with NumpyFilesWriter(tmp_path / "labels") as writer:
        for i, seconds in enumerate(durations):
            t = np.arange(int(seconds * rate)) / rate
            audio = 0.3 * np.sin(2 * np.pi * (200 + 150 * i) * t) + 0.05 * rng.standard_normal(len(t))
            path = tmp_path / f"utt{i}.wav"
            soundfile.write(path, audio.astype(np.float32), rate)
            cut = Recording.from_file(path, recording_id=f"utt{i}").to_cut()
            frames = int(seconds * 50)
            labels = ((i + 3 * np.arange(frames)) % clusters).astype(np.int32)
            cut.custom = {"labels": writer.store_array(cut.id, labels, frame_shift=0.02, temporal_dim=0)}
            cuts.append(cut)
    path = tmp_path / "cuts.jsonl.gz"
    CutSet.from_cuts(cuts).to_file(path)
    return path


def test_wavlm_registry_builds_the_pretrainer_with_the_wavlm_encoder():
    from sslasr.models.frontends import get_frontend
    from sslasr.models.wavlm import WavLMEncoder, WavLMPretrainer

    frontend = get_frontend({"name": "wavlm"})
    assert frontend.input_type == "waveform"
    model = frontend.build_pretrainer(TINY_WAVLM, {"num_classes": 8, "label_rate": 50, "final_dim": 16})
    assert isinstance(model, WavLMPretrainer) and type(model.encoder) is WavLMEncoder
    assert model.encoder.transformer.position_bias.embedding.weight.shape == (32, 4)
    assert all(layer.position_gate is not None for layer in model.encoder.transformer.layers)
    assert type(frontend.build_encoder(TINY_WAVLM)) is WavLMEncoder


def test_mixed_batches_keep_the_clean_targets(tmp_path):
    """The loader mixes the waveforms but the targets stay the primary (clean) cuts' labels, and
    the pretrainer's loss is the masked prediction of exactly those labels from the mixture."""
    from sslasr.data.loader import load_cuts, make_dataloader
    from sslasr.data.mixing import UtteranceMixer, UtteranceMixingConfig
    from sslasr.models.blocks.masking import span_mask
    from sslasr.models.hubert import align_targets
    from sslasr.train.distributed import DistInfo
    from sslasr.train.tasks import build_task

    cuts_path = _labelled_cuts(tmp_path)
    clean = next(iter(make_dataloader(load_cuts(cuts_path), input_type="waveform", max_duration=100,
                                      shuffle=False, targets_field="labels")))
    mixing = {"prob": 1.0, "noise_prob": 0.0}  # every utterance gets another one's speech
    cfg = {"task": "pretrain", "frontend": {"name": "wavlm", "encoder": TINY_WAVLM},
           "pretrain": {"num_classes": 8, "label_rate": 50, "final_dim": 16, "utterance_mixing": mixing,
                        "mask": {"time_prob": 0.8, "time_length": 10, "time_min_masks": 2}},
           "data": {"train_cuts": str(cuts_path), "valid_cuts": str(cuts_path), "max_duration": 100,
                    "num_buckets": 2, "targets_field": "labels"},
           "trainer": {"seed": 5}}
    task = build_task(cfg)
    batch = next(iter(task.train_dataloader(DistInfo())))
    order = [clean["cut_ids"].index(cut_id) for cut_id in batch["cut_ids"]]
    size = len(order)
    assert size >= 2 and batch["mixing"] == {"mixed_utterances": float(size), "noise_utterances": 0.0}
    width = int(batch["input_lens"].max())
    targets_width = batch["targets"].shape[1]
    assert torch.equal(batch["targets"], clean["targets"][order][:, :targets_width])  # the clean cuts' labels
    assert (clean["targets"][order][:, targets_width:] == -100).all()
    clean_inputs, clean_lens = clean["inputs"][order][:, :width], clean["input_lens"][order]
    assert not torch.equal(batch["inputs"], clean_inputs)
    # the mixture is the clean audio plus one scaled region (as the mixer, seeded like the task, made it)
    mixer = UtteranceMixer(UtteranceMixingConfig(**mixing), seed=5)
    expected, mixes = mixer(clean_inputs, clean_lens, 16000, "|".join(["5", "0", *batch["cut_ids"]]))  # seed|epoch|ids
    assert torch.equal(batch["inputs"], expected) and {m.kind for m in mixes} == {"speech"}
    valid = next(iter(task.valid_dataloader(DistInfo())))
    assert "mixing" not in valid and torch.equal(valid["inputs"], clean["inputs"])  # validation stays clean

    model = task.model.eval()
    torch.manual_seed(0)
    loss, stats, weight = task.forward(model, batch)
    stats = {key: float(value) for key, value in stats.items()}  # 0-dim tensors → numbers
    assert stats["mixed_utterances"] == size and stats["noise_utterances"] == 0.0
    assert weight == stats["masked_frames"] > 0
    # by hand: the same masks (same seed), the encoder on the mixture, CE against the clean labels
    enc = model.encoder
    torch.manual_seed(0)
    with torch.no_grad():
        z, frame_lengths, padding = enc.features(batch["inputs"], batch["input_lens"])
        penalty = z[~padding].pow(2).mean()  # real frames only
        time_mask = span_mask(frame_lengths, z.shape[1], 0.8, 10, 2)
        context = enc.contextualize(enc.feature_projection(enc.feature_norm(z)), padding, time_mask)
        targets = align_targets(batch["targets"], frame_lengths, z.shape[1], 1.0)
        chosen = time_mask & ~padding & (targets != -100)
        logits = model.head.logits(context[chosen])
        masked_ce = F.cross_entropy(logits, targets[chosen])
    assert chosen.sum() == stats["masked_frames"]
    assert loss.item() == pytest.approx(masked_ce.item() + 10.0 * penalty.item(), rel=1e-5)


# ---------------------------------------------------------------------- recipe
def test_minisynth_wavlm_config_shares_hubert_labels_and_budget():
    from sslasr.utils.config import load_configs

    conf = Path(__file__).resolve().parents[1] / "egs" / "minisynth" / "conf"
    wavlm, hubert = (load_configs([conf / f"frontend_{name}.yaml"]) for name in ("wavlm", "hubert"))
    assert wavlm["frontend"]["name"] == "wavlm"
    assert wavlm["kmeans"] == hubert["kmeans"]  # the same k-means iterations and budget
    objective = {k: v for k, v in wavlm["pretrain"].items() if k != "utterance_mixing"}
    assert objective == hubert["pretrain"]
    assert wavlm["pretrain"]["utterance_mixing"]["prob"] == 0.2
    # the encoder is HuBERT's tiny one plus the relative position bias
    encoder = dict(wavlm["frontend"]["encoder"])
    assert encoder.pop("relative_position") == {"num_buckets": 320, "max_distance": 800}
    assert encoder["transformer"].pop("softmax_alpha") == 32.0
    assert encoder == hubert["frontend"]["encoder"]


@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng is not installed")
def test_recipe_pretrains_wavlm_on_mixed_batches(tmp_path, prepared_minisynth):
    from recipe_smoke import SMOKE, recipe_with_data, run_recipe

    recipe = recipe_with_data(tmp_path, prepared_minisynth)
    (recipe / "conf" / "lm.yaml").unlink(missing_ok=True)  # the LM and its decodings are not what this tests
    opts = list(SMOKE)
    opts[opts.index("--pretrain-opts") + 1] += " trainer.log_every=1"
    opts[opts.index("--finetune-opts") + 1] += " decode.methods=[ctc_greedy] decode.lm_methods=[]"
    kmeans = "kmeans.frames_budget=3000 kmeans.batch_size=1000 kmeans.max_epochs=2 kmeans.n_init=1"
    result = run_recipe(recipe, *opts, "--frontend", "wavlm", "--compare-scratch", "false",
                        "--kmeans-opts", kmeans, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    pretrain = recipe / "exp" / "pretrain_wavlm"
    for number in (1, 2):
        it = pretrain / f"iter{number}"
        assert all((it / marker).exists() for marker in (".kmeans.done", ".labels.done", ".done"))
        trained = yaml.safe_load((it / "config.yaml").read_text())
        assert trained["frontend"]["name"] == "wavlm" and trained["data"]["targets_field"] == "kmeans_labels"
        assert trained["pretrain"]["utterance_mixing"]["prob"] == 0.2
        assert "mixed_utterances" in (it / "train.rank0.log").read_text()  # the counts are logged
    checkpoint = torch.load(pretrain / "model_final.pt", map_location="cpu", weights_only=False)
    assert "encoder.transformer.position_bias.embedding.weight" in checkpoint["model"]
    assert "initialised" in (recipe / "exp" / "ctc_wavlm_all" / "train.rank0.log").read_text()
    rows = [json.loads(line) for line in (recipe / "exp" / "results.jsonl").read_text().splitlines()]
    assert {(r["frontend"], r["pretrained"], r["test_set"], r["decoding"]) for r in rows} == {
        ("wavlm", True, "dev", "ctc_greedy"), ("wavlm", True, "test", "ctc_greedy")}
