"""wav2vec 2.0 building blocks and objective, CTC greedy decoding, configs and LR schedules.

Everything here is hand-checked on tiny tensors: masking statistics against the closed form,
conv frame counts against real convolutions, the quantizer against its codebook, the
contrastive logits against an explicit cosine formula.
"""

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from sslasr.models.blocks.conv_extractor import ConvFeatureExtractor
from sslasr.models.blocks.masking import channel_mask, span_mask
from sslasr.models.blocks.quantizer import GumbelProductQuantizer, QuantizerOutput
from sslasr.models.heads.ctc import CtcHead
from sslasr.models.wav2vec2 import (
    BASE_CONV_LAYERS, Wav2Vec2Encoder, Wav2Vec2EncoderConfig, Wav2Vec2PretrainConfig, Wav2Vec2Pretrainer,
    contrastive_logits, correct_predictions, feature_penalty, sample_negatives,
)
from sslasr.train.schedules import build_lr_scale
from sslasr.utils.config import load_config, load_configs, set_dotted

ROOT = Path(__file__).resolve().parents[1]
TINY_PRESET = ROOT / "conf" / "frontend" / "wav2vec2_tiny.yaml"
TINY_CONV = [[16, 10, 5], [16, 8, 4], [16, 4, 4], [16, 4, 4]]  # the tiny preset's geometry, 16 channels
BASE_GEOMETRY = [[8, k, s] for _, k, s in BASE_CONV_LAYERS]  # base kernels/strides, 8 channels (fast)

torch.set_num_threads(1)


def _runs(row: torch.Tensor):
    """Lengths of the runs of True in a 1-D bool tensor."""
    runs, current = [], 0
    for value in row.tolist():
        if value:
            current += 1
        elif current:
            runs.append(current)
            current = 0
    if current:
        runs.append(current)
    return runs


def _tiny_encoder_dict(conv_norm: str = "group", **transformer) -> dict:
    tcfg = dict(dim=32, layers=2, heads=2, ffn_dim=64, dropout=0.1, attention_dropout=0.1,
                activation_dropout=0.0, layer_norm_first=False, layerdrop=0.0, pos_conv_kernel=8,
                pos_conv_groups=4)
    tcfg.update(transformer)
    return dict(conv_layers=[list(layer) for layer in TINY_CONV], conv_norm=conv_norm, conv_bias=False,
                feature_grad_mult=0.1, dropout_input=0.1, transformer=tcfg)


# ---------------------------------------------------------------------- span masking
def test_span_mask_fraction_matches_theory():
    T, p, L = 2000, 0.65, 10
    gen = torch.Generator().manual_seed(0)
    lengths = torch.full((200,), T, dtype=torch.long)
    mask = span_mask(lengths, T, p, L, min_masks=2, generator=gen)
    assert mask.shape == (200, T) and mask.dtype == torch.bool
    fraction = mask.float().mean().item()
    theory = 1 - (1 - L / T) ** (p * T / L)
    assert abs(theory - (1 - math.exp(-p))) < 0.002
    assert abs(fraction - theory) < 0.02, (fraction, theory)
    # Each utterance gets int(pT/L + u) = 130 spans: never more than 1300 frames, and overlaps
    # are the exception, not the rule.
    per_utt = mask.sum(1)
    assert int(per_utt.max()) <= 130 * L
    assert int(per_utt.min()) > 0.35 * T


def test_span_mask_runs_and_padding():
    gen = torch.Generator().manual_seed(1)
    lengths = torch.tensor([300, 120, 37, 9, 10])
    max_len = 300
    for _ in range(20):
        mask = span_mask(lengths, max_len, 0.5, 10, min_masks=1, generator=gen)
        for b, length in enumerate(lengths.tolist()):
            assert not mask[b, length:].any(), "padding frames must never be masked"
            runs = _runs(mask[b, :length])
            assert all(r >= 10 for r in runs), runs
        assert not mask[3].any()  # shorter than one span: nothing can be masked
        assert not mask[4].any()  # exactly one span: it would be the whole utterance


def test_span_mask_leaves_some_frame_of_every_utterance_seen():
    """Spans can cover a short utterance whole (at 12 frames a third of the draws did, as in
    fairseq): its context then held nothing of it, and a batch of such utterances had no
    unmasked frames, the unmasked-frame loss NaN."""
    gen = torch.Generator().manual_seed(0)
    lengths = torch.tensor([12, 15, 20, 11])
    masked = torch.zeros(4)
    for _ in range(300):
        mask = span_mask(lengths, 20, 0.65, 10, min_masks=2, generator=gen)
        assert all(not mask[b, :n].all() for b, n in enumerate(lengths.tolist()))
        masked += mask.sum(1)
    assert (masked / 300 / lengths > 0.6).all()  # still most of each, as before


def test_span_mask_min_masks_on_short_utterances():
    gen = torch.Generator().manual_seed(2)
    lengths = torch.full((300,), 30, dtype=torch.long)
    # p·T/L = 0.03: without min_masks almost every utterance would get 0 spans
    none = span_mask(lengths, 30, 0.01, 10, min_masks=0, generator=gen)
    assert none.sum(1).eq(0).float().mean() > 0.9
    mask = span_mask(lengths, 30, 0.01, 10, min_masks=2, generator=gen)
    counts = mask.sum(1)
    # two distinct starts → at least L + 1 frames, at most 2L
    assert int(counts.min()) >= 11 and int(counts.max()) <= 20
    assert all(len(_runs(row)) in (1, 2) for row in mask)


def test_span_mask_for_pretraining_masks_something_in_a_batch_of_short_utterances():
    """Pretraining's targets are the masked frames: a batch of utterances shorter than a span
    (w2v-BERT's 40 ms frames make a 0.3 s cut 7 frames) used to end training. With at_least_one
    the longest gets one span of min(L, T − 1) frames; batches that masked something are unchanged."""
    gen = torch.Generator().manual_seed(0)
    for lengths, width in (([7, 9, 4], 8), ([2], 1)):
        mask = span_mask(torch.tensor(lengths), 9, 0.65, 10, generator=gen, at_least_one=True)
        longest = max(range(len(lengths)), key=lengths.__getitem__)
        assert int(mask.sum()) == int(mask[longest].sum()) == width and _runs(mask[longest]) == [width]
        assert not mask[longest, lengths[longest]:].any()
    assert not span_mask(torch.tensor([7, 9]), 9, 0.65, 10, at_least_one=False).any()
    lengths = torch.tensor([300, 120])
    assert torch.equal(span_mask(lengths, 300, 0.65, 10, generator=torch.Generator().manual_seed(5), at_least_one=True),
                       span_mask(lengths, 300, 0.65, 10, generator=torch.Generator().manual_seed(5)))
    with pytest.raises(ValueError, match="longest utterance has 1 frame"):
        span_mask(torch.tensor([1, 1]), 1, 0.65, 10, at_least_one=True)


def test_span_mask_seeded_generator_is_reproducible_and_leaves_global_rng_alone():
    lengths = torch.tensor([500, 260, 80])
    state = torch.get_rng_state()
    a = span_mask(lengths, 500, 0.65, 10, 2, generator=torch.Generator().manual_seed(123))
    b = span_mask(lengths, 500, 0.65, 10, 2, generator=torch.Generator().manual_seed(123))
    c = span_mask(lengths, 500, 0.65, 10, 2, generator=torch.Generator().manual_seed(124))
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert span_mask(lengths, 500, 0.0, 10, 2).sum() == 0  # prob 0: no masking at all


def test_channel_mask_masks_whole_spans_of_channels():
    mask = channel_mask(64, 32, 0.3, 4, generator=torch.Generator().manual_seed(0))
    assert mask.shape == (64, 32)
    assert all(all(r >= 4 for r in _runs(row)) for row in mask)
    assert 0.1 < mask.float().mean() < 0.4  # 1 − e^−0.3 ≈ 0.26, minus edge effects


# ---------------------------------------------------------------------- conv extractor
@pytest.mark.parametrize("layers", [TINY_CONV, BASE_GEOMETRY], ids=["tiny", "base"])
def test_conv_output_lengths_match_real_convolutions(layers):
    torch.manual_seed(0)
    conv = ConvFeatureExtractor(layers, norm="layer").eval()
    rf = conv.receptive_field
    lengths = [rf, rf + 1, rf + 319, rf + 320, rf + 321, 1000, 1601, 3333, 4000, 8000, 16000]
    with torch.no_grad():
        for n in lengths:
            frames = conv(torch.randn(1, n)).shape[-1]
            assert int(conv.output_lengths(torch.tensor([n]))) == frames, n
    # and batched: one call, one answer per length
    batched = conv.output_lengths(torch.tensor(lengths))
    assert batched.tolist() == [int(conv.output_lengths(torch.tensor([n]))) for n in lengths]
    assert conv.output_lengths(torch.tensor([rf - 1, 0, 10])).tolist() == [0, 0, 0]


def test_feature_grad_mult_scales_the_gradient_into_the_extractor_only():
    """feature_grad_mult (0.1 in base pretraining): the conv extractor's parameter gradients are
    exactly that fraction of the unscaled ones; the forward pass is unchanged."""
    waveform = torch.randn(2, 4000)
    grads, outputs = {}, {}
    for mult in (1.0, 0.1):
        torch.manual_seed(0)
        encoder = Wav2Vec2Encoder(Wav2Vec2EncoderConfig.from_dict(dict(_tiny_encoder_dict(), feature_grad_mult=mult)))
        out = encoder.eval()(waveform, torch.tensor([4000, 4000])).hidden
        out.pow(2).sum().backward()
        outputs[mult] = out.detach()
        grads[mult] = {name: p.grad.clone() for name, p in encoder.named_parameters() if p.grad is not None}
    assert torch.equal(outputs[1.0], outputs[0.1])
    for name, grad in grads[1.0].items():
        expected = 0.1 * grad if name.startswith("feature_extractor.") else grad
        assert torch.allclose(grads[0.1][name], expected, rtol=1e-5, atol=1e-9), name


@pytest.mark.parametrize("layers", [TINY_CONV, BASE_GEOMETRY], ids=["tiny", "base"])
def test_conv_receptive_field_and_hop_are_what_the_network_does(layers):
    torch.manual_seed(0)
    conv = ConvFeatureExtractor(layers, norm="layer").double()
    hop = math.prod(s for _, _, s in layers)
    assert hop == 320  # 20 ms at 16 kHz for both stacks
    rf = conv.receptive_field
    assert conv.output_lengths(torch.tensor([rf, rf - 1, rf + hop - 1, rf + hop])).tolist() == [1, 0, 1, 2]
    # Samples that influence output frame 1: exactly [hop, hop + rf).
    x = torch.randn(1, rf + 3 * hop, dtype=torch.float64, requires_grad=True)
    conv(x)[0, :, 1].sum().backward()
    support = torch.nonzero(x.grad[0]).flatten()
    assert support.min().item() == hop and support.max().item() == hop + rf - 1
    assert len(support) == rf


def _extractor_by_modules(conv: ConvFeatureExtractor, waveform: torch.Tensor) -> torch.Tensor:
    """The extractor's blocks applied as plain channels-first modules: the maths its time-major
    forward (and the fused first block) must reproduce."""
    x = waveform.unsqueeze(1)
    for block in conv.layers:
        y = block[0](x)
        if conv.norm == "layer":
            y = block[1](y.transpose(1, 2)).transpose(1, 2)
        elif len(block) == 3:
            y = block[1](y)
        x = torch.nn.functional.gelu(y)
    return x


@pytest.mark.parametrize("path", ["fused", "time_major", "modules"])
def test_group_norm_extractor_gives_a_padded_utterance_what_it_gives_alone(path):
    """With the lengths, the first GroupNorm's statistics skip the padding: each utterance of a
    padded batch gets its unpadded output on its frames, on every path (the fused first block,
    the general time-major one taken with a conv bias or a waveform gradient, and the modules'
    one of GPUs), and the parameter gradients are those of the utterances run one by one."""
    torch.manual_seed(0)
    conv = ConvFeatureExtractor(TINY_CONV, norm="group", conv_bias=path == "time_major").double()
    lengths = [4000, 2650, 1300]
    utterances = [5.0 + 0.1 * torch.randn(n, dtype=torch.float64) for n in lengths]
    batch = torch.zeros(3, 4000, dtype=torch.float64)
    for b, utterance in enumerate(utterances):
        batch[b, :len(utterance)] = utterance
    forward = conv._forward_modules if path == "modules" else conv
    if path == "modules":
        valid = (torch.tensor(lengths) - conv.kernels[0]) // conv.strides[0] + 1
        padded = forward(batch, valid)
    else:
        padded = forward(batch, torch.tensor(lengths))
    frames = conv.output_lengths(torch.tensor(lengths)).tolist()
    params = list(conv.parameters())
    upstream = torch.randn_like(padded)
    alone_total = 0.0
    for b, utterance in enumerate(utterances):
        alone = _extractor_by_modules(conv, utterance.unsqueeze(0))[0]
        torch.testing.assert_close(padded[b, :, :frames[b]], alone[:, :frames[b]], msg=f"utterance {b}")
        alone_total = alone_total + (alone[:, :frames[b]] * upstream[b, :, :frames[b]]).sum()
    # the padded frames' outputs get no gradient from above, as in a model that masks them
    keep = (torch.arange(padded.shape[2])[None, None, :] < torch.tensor(frames)[:, None, None]).double()
    grads_masked = torch.autograd.grad((forward(batch, torch.tensor(lengths) if path != "modules" else valid)
                                        * upstream * keep).sum(), params)
    for name, a, b in zip([n for n, _ in conv.named_parameters()], grads_masked,
                          torch.autograd.grad(alone_total, params)):
        torch.testing.assert_close(a, b, msg=name)
    # without the lengths the padding counts, as in fairseq and transformers
    assert not torch.allclose(conv(batch)[2, :, :frames[2]], padded[2, :, :frames[2]], atol=1e-3)


@pytest.mark.parametrize("norm", ["group", "layer"])
@pytest.mark.parametrize("samples", [4000, 4321])
def test_conv_extractor_matches_its_modules_forward_and_parameter_gradients(norm, samples):
    """Output and every parameter gradient equal the modules' own, for a waveform with a large
    DC offset (the fused first block's statistics must not lose it to cancellation) and a
    length whose last samples no frame of the next layers reads."""
    torch.manual_seed(0)
    conv = ConvFeatureExtractor(TINY_CONV, norm=norm).double()
    waveform = 5.0 + 0.1 * torch.randn(3, samples, dtype=torch.float64)
    waveform[2, samples // 2:] = 0.0  # a padded utterance: zeros count in GroupNorm's statistics
    got = conv(waveform)
    want = _extractor_by_modules(conv, waveform)
    torch.testing.assert_close(got, want)
    grad = torch.randn_like(got)
    params = list(conv.parameters())
    for name, a, b in zip([n for n, _ in conv.named_parameters()], torch.autograd.grad(got, params, grad),
                          torch.autograd.grad(want, params, grad)):
        torch.testing.assert_close(a, b, msg=name)


def test_base_receptive_field_is_400_samples():
    assert ConvFeatureExtractor(BASE_GEOMETRY).receptive_field == 400  # 25 ms


def test_tiny_preset_has_its_documented_geometry():
    """conf/frontend/wav2vec2_tiny.yaml documents 320 samples per frame and a 345-sample
    receptive field: kernels 10, 8, 4, 4 with strides 5, 4, 4, 4 give 10 + 7·5 + 3·20 + 3·80."""
    layers = yaml.safe_load(TINY_PRESET.read_text())["frontend"]["encoder"]["conv_layers"]
    conv = ConvFeatureExtractor(layers)
    assert math.prod(conv.strides) == 320
    assert conv.receptive_field == 345


# ---------------------------------------------------------------------- quantizer
def test_quantizer_shapes_and_eval_codebook_lookup():
    torch.manual_seed(0)
    G, V, dim = 2, 4, 6
    q = GumbelProductQuantizer(12, G, V, dim).eval()
    x = torch.randn(5, 12)
    out = q(x)
    assert out.quantized.shape == (5, dim) and out.codes.shape == (5, G)
    assert out.codes.min() >= 0 and out.codes.max() < V
    assert out.num_vars == G * V
    logits = (x @ q.weight_proj.weight.T + q.weight_proj.bias).view(5, G, V)
    assert torch.equal(out.codes, logits.argmax(-1))
    book = q.codevectors.detach()[0]  # (G·V, dim/G)
    for n in range(5):
        expected = torch.cat([book[g * V + int(out.codes[n, g])] for g in range(G)])
        assert torch.allclose(out.quantized[n], expected, atol=0, rtol=0), n


def test_quantizer_training_output_rows_are_codebook_entries():
    torch.manual_seed(1)
    G, V, dim = 2, 4, 6
    q = GumbelProductQuantizer(12, G, V, dim).train()
    out = q(torch.randn(7, 12))
    book = q.codevectors.detach()[0].view(G, V, dim // G)
    chunks = out.quantized.detach().view(7, G, dim // G)
    for n in range(7):
        for g in range(G):
            assert (chunks[n, g] == book[g]).all(-1).sum() == 1  # exactly one entry of group g


def test_perplexities_and_diversity_loss():
    G, V = 2, 8
    uniform = torch.full((G, V), 1.0 / V)
    assert GumbelProductQuantizer._perplexity(uniform).item() == pytest.approx(G * V, rel=1e-5)
    one_hot = torch.zeros(G, V)
    one_hot[0, 3] = one_hot[1, 5] = 1.0
    assert GumbelProductQuantizer._perplexity(one_hot).item() == pytest.approx(G, rel=1e-5)
    half = torch.zeros(G, V)
    half[:, :2] = 0.5  # each group uses 2 entries equally → perplexity 2 per group
    assert GumbelProductQuantizer._perplexity(half).item() == pytest.approx(2 * G, rel=1e-5)
    full = QuantizerOutput(torch.zeros(1, 4), torch.zeros(1, G), torch.tensor(float(G * V)),
                           torch.tensor(1.0), G * V)
    assert full.diversity_loss.item() == 0.0
    collapsed = QuantizerOutput(torch.zeros(1, 4), torch.zeros(1, G), torch.tensor(float(G)),
                                torch.tensor(1.0), G * V)
    assert collapsed.diversity_loss.item() == pytest.approx((G * V - G) / (G * V))

    # Through forward: all-zero logits → uniform softmax (ppl G·V, no diversity loss) and
    # argmax = entry 0 everywhere (code ppl G).
    q = GumbelProductQuantizer(4, G, V, 16).eval()
    with torch.no_grad():
        q.weight_proj.weight.zero_()
    out = q(torch.randn(10, 4))
    assert out.prob_perplexity.item() == pytest.approx(G * V, rel=1e-5)
    assert out.diversity_loss.item() == pytest.approx(0.0, abs=1e-5)
    assert out.code_perplexity.item() == pytest.approx(G, rel=1e-5)
    assert (out.codes == 0).all()


def test_quantizer_codes_under_bf16_autocast_are_the_fp32_ones():
    """w2v-BERT's MLM targets are these codes: bf16 logits tied or flipped ~2 % of them."""
    torch.manual_seed(0)
    q = GumbelProductQuantizer(512, 2, 320, 16).eval()
    x = torch.randn(1000, 512).bfloat16()  # as an encoder under autocast hands them over
    with torch.no_grad():
        exact = q(x.float()).codes
        with torch.autocast("cpu", dtype=torch.bfloat16):
            mixed = q(x)
    assert torch.equal(mixed.codes, exact) and mixed.quantized.shape == (1000, 16)


def test_temperature_annealing():
    q = GumbelProductQuantizer(4, 2, 4, 8, temperature=(2.0, 0.5, 0.9))
    assert q.temperature == 2.0
    for n in (0, 1, 5, 13, 14, 100, 10_000):
        q.set_num_updates(n)
        assert q.temperature == pytest.approx(max(2.0 * 0.9 ** n, 0.5))
    q.set_num_updates(5)
    assert q.temperature == pytest.approx(1.18098)
    q.set_num_updates(100)
    assert q.temperature == 0.5


# ---------------------------------------------------------------------- contrastive loss
def _cos(a, b):
    return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_contrastive_logits_against_hand_computation():
    context = np.array([[1.0, 0.0, 2.0], [0.5, -1.0, 1.0], [-2.0, 1.0, 0.0], [0.0, 3.0, 1.0]])
    targets = np.array([[1.0, 1.0, 0.0], [0.0, 1.0, -1.0], [1.0, 1.0, 0.0], [2.0, 0.0, 1.0]])
    # target 2 is identical to target 0 (same code): as a distractor of frame 0 it must be −inf
    negative_idx = np.array([[1, 2, 3], [0, 3, 3], [1, 3, 0], [0, 1, 2]])
    kappa = 0.1
    logits = contrastive_logits(torch.tensor(context, dtype=torch.float32),
                                torch.tensor(targets, dtype=torch.float32),
                                torch.tensor(negative_idx), kappa)
    assert logits.shape == (4, 4) and logits.dtype == torch.float32
    for n in range(4):
        candidates = [n] + negative_idx[n].tolist()
        for j, c in enumerate(candidates):
            if j > 0 and np.array_equal(targets[c], targets[n]):
                assert logits[n, j].item() == float("-inf"), (n, j)
            else:
                assert logits[n, j].item() == pytest.approx(_cos(context[n], targets[c]) / kappa, abs=1e-5), (n, j)
    assert logits[0, 2].item() == float("-inf")
    assert logits[2, 3].item() == float("-inf")  # frame 2 sees target 0, which equals its own
    assert torch.isfinite(logits[:, 0]).all()  # the positive itself is never masked
    assert torch.isinf(logits).sum() == 2
    # The cross-entropy ignores the −inf distractor: it is −log softmax over the rest.
    row = [_cos(context[0], targets[c]) / kappa for c in (0, 1, 3)]
    expected = -row[0] + math.log(sum(math.exp(v) for v in row))
    loss0 = torch.nn.functional.cross_entropy(logits[:1], torch.zeros(1, dtype=torch.long))
    assert loss0.item() == pytest.approx(expected, rel=1e-5)


def test_a_tie_for_the_top_logit_is_not_a_correct_prediction():
    """As fairseq's accuracy: a collapsed model (equal logits) scores 0, not 1 as argmax would
    have it whenever the target is the first candidate."""
    logits = torch.tensor([[2.0, 1.0, 0.0], [1.0, 1.0, 0.0], [0.0, 0.0, 0.0], [0.0, 3.0, float("-inf")]])
    targets = torch.tensor([0, 0, 0, 1])
    assert correct_predictions(logits, targets).tolist() == [True, False, False, True]
    assert correct_predictions(logits, torch.tensor([1, 1, 2, 0])).tolist() == [False, False, False, False]


# ---------------------------------------------------------------------- negatives
@pytest.mark.parametrize("counts", [[3, 5, 2], [3, 0, 4, 2], [2, 2]])
def test_sample_negatives_stay_in_block_and_skip_positive(counts):
    counts_t = torch.tensor(counts)
    idx = sample_negatives(counts_t, 400, generator=torch.Generator().manual_seed(0))
    total = sum(counts)
    assert idx.shape == (total, 400) and idx.dtype == torch.long
    start = 0
    for count in counts:
        for i in range(start, start + count):
            row = idx[i]
            assert (row >= start).all() and (row < start + count).all(), (i, row.min(), row.max())
            assert (row != i).all()
            others = set(range(start, start + count)) - {i}
            assert set(row.tolist()) == others  # every other frame of the utterance is drawn
        start += count


def test_sample_negatives_is_roughly_uniform_and_seeded():
    counts = torch.tensor([5])
    idx = sample_negatives(counts, 4000, generator=torch.Generator().manual_seed(1))
    hist = torch.bincount(idx[0], minlength=5).float() / 4000
    assert hist[0] == 0 and torch.allclose(hist[1:], torch.full((4,), 0.25), atol=0.04)
    a = sample_negatives(torch.tensor([3, 5, 2]), 7, generator=torch.Generator().manual_seed(9))
    b = sample_negatives(torch.tensor([3, 5, 2]), 7, generator=torch.Generator().manual_seed(9))
    assert torch.equal(a, b)


# ---------------------------------------------------------------------- whole pretrainer
def test_pretrainer_loss_grads_and_stats():
    torch.manual_seed(0)
    enc = Wav2Vec2EncoderConfig.from_dict(_tiny_encoder_dict())
    cfg = Wav2Vec2PretrainConfig.from_dict(dict(
        mask=dict(time_prob=0.65, time_length=5, time_min_masks=2), quantizer_groups=2, quantizer_entries=8,
        quantizer_dim=16, quantizer_temperature=[2.0, 0.5, 0.9], final_dim=16, num_negatives=5))
    model = Wav2Vec2Pretrainer(enc, cfg).train()
    model.set_num_updates(3)
    assert model.quantizer.temperature == pytest.approx(2.0 * 0.9 ** 3)
    waveform = torch.randn(2, 16000)
    lengths = torch.tensor([16000, 11000])
    waveform[1, 11000:] = 0.0
    loss, stats = model(waveform, lengths)
    stats = {key: float(value) for key, value in stats.items()}  # 0-dim tensors → numbers
    assert loss.ndim == 0 and torch.isfinite(loss)
    assert set(stats) >= {"loss", "contrastive", "diversity", "feature_penalty", "accuracy", "code_perplexity",
                          "prob_perplexity", "temperature", "masked_frames"}
    assert 0.0 <= stats["accuracy"] <= 1.0
    assert stats["loss"] == pytest.approx(
        stats["contrastive"] + 0.1 * stats["diversity"] + 10.0 * stats["feature_penalty"], rel=1e-5)
    assert stats["temperature"] == pytest.approx(2.0 * 0.9 ** 3)
    frames = model.encoder.feature_extractor.output_lengths(lengths)
    assert frames.tolist() == [49, 34]
    assert 2 * 5 <= stats["masked_frames"] <= int(frames.sum())
    assert 1.0 <= stats["code_perplexity"] <= 16.0 and 1.0 <= stats["prob_perplexity"] <= 16.0

    loss.backward()
    named = dict(model.named_parameters())
    must_train = ["encoder.feature_extractor.layers.0.0.weight", "encoder.feature_extractor.layers.3.0.weight",
                  "encoder.mask_embedding", "encoder.feature_projection.weight",
                  "encoder.transformer.layers.0.attention.q_proj.weight",
                  "encoder.transformer.layers.1.feed_forward.output.weight",
                  "quantizer.weight_proj.weight", "quantizer.codevectors", "project_q.weight", "final_proj.weight"]
    for name in must_train:
        grad = named[name].grad
        assert grad is not None, name
        assert torch.isfinite(grad).all(), name
        assert grad.abs().sum() > 0, name
    for name, p in named.items():
        assert p.grad is None or torch.isfinite(p.grad).all(), name


def tone_steps(num_samples: int = 16000, step: int = 1600, flip: bool = False) -> torch.Tensor:
    """A waveform that changes tone every STEP samples (200-1100 Hz): its frames differ, so a
    context vector can learn to tell its own frame's latent from the others'."""
    freqs = 200 + 150 * (torch.arange(num_samples // step).repeat_interleave(step) % 7)
    freqs = freqs.flip(0) if flip else freqs
    return torch.sin(2 * math.pi * freqs * torch.arange(num_samples) / 16000)


def test_pretraining_learns_to_pick_the_true_latent():
    """200 Adam steps on one batch: the contrastive loss falls from ln(1 + K) (chance) and the
    accuracy of picking the true quantized latent among K = 5 distractors rises well above 1/6."""
    torch.manual_seed(0)
    cfg = Wav2Vec2PretrainConfig.from_dict(dict(
        mask=dict(time_prob=0.5, time_length=5, time_min_masks=2), quantizer_groups=2, quantizer_entries=8,
        quantizer_dim=16, final_dim=16, num_negatives=5))
    model = Wav2Vec2Pretrainer(Wav2Vec2EncoderConfig.from_dict(_tiny_encoder_dict()), cfg).train()
    waveform, lengths = torch.stack([tone_steps(), tone_steps(flip=True)]), torch.tensor([16000, 16000])
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    history = []
    for _ in range(200):
        loss, stats = model(waveform, lengths)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        history.append((float(stats["contrastive"]), float(stats["accuracy"])))
    first, last = np.mean(history[:20], axis=0), np.mean(history[-20:], axis=0)
    assert first[0] > 0.9 * math.log(6) and first[1] < 0.3  # near chance at the start
    assert last[0] < 0.75 * first[0] and last[1] > 0.45


def test_unmasked_frame_term_adds_a_contrastive_loss_over_the_unmasked_frames():
    """β > 0: L gains β·L_u, a contrastive loss over the unmasked, unpadded frames (reported
    with its accuracy), on the same masks; β = 0 reports no such term."""
    enc = Wav2Vec2EncoderConfig.from_dict(_tiny_encoder_dict())
    base = dict(mask=dict(time_prob=0.5, time_length=5, time_min_masks=2), quantizer_groups=2,
                quantizer_entries=8, quantizer_dim=16, final_dim=16, num_negatives=5)
    waveform, lengths = torch.randn(2, 16000), torch.tensor([16000, 11000])
    runs = {}
    for weight in (0.0, 0.5):
        torch.manual_seed(0)
        model = Wav2Vec2Pretrainer(enc, Wav2Vec2PretrainConfig.from_dict({**base, "unmasked_weight": weight}))
        torch.manual_seed(1)
        loss, stats = model.train()(waveform, lengths)
        runs[weight] = {key: float(value) for key, value in stats.items()}
        runs[weight]["loss_tensor"] = float(loss)
    plain, with_unmasked = runs[0.0], runs[0.5]
    assert "unmasked_contrastive" not in plain
    assert 0.0 <= with_unmasked["unmasked_accuracy"] <= 1.0
    # The same masks and masked-frame count; the unmasked loss is near ln(1 + 5) at init.
    assert with_unmasked["masked_frames"] == plain["masked_frames"]
    assert 0.5 * math.log(6) < with_unmasked["unmasked_contrastive"] < 2 * math.log(6)
    assert with_unmasked["loss"] == pytest.approx(
        with_unmasked["contrastive"] + 0.1 * with_unmasked["diversity"] + 10.0 * with_unmasked["feature_penalty"]
        + 0.5 * with_unmasked["unmasked_contrastive"], rel=1e-5)
    assert with_unmasked["loss_tensor"] == pytest.approx(with_unmasked["loss"])


def test_a_batch_of_utterances_one_span_long_keeps_unmasked_frames_for_their_term():
    enc = Wav2Vec2EncoderConfig.from_dict(_tiny_encoder_dict())
    cfg = dict(mask=dict(time_prob=0.65, time_length=10, time_min_masks=2), quantizer_groups=2,
               quantizer_entries=8, quantizer_dim=16, final_dim=16, num_negatives=5, unmasked_weight=1.0)
    torch.manual_seed(0)
    model = Wav2Vec2Pretrainer(enc, Wav2Vec2PretrainConfig.from_dict(cfg)).train()
    samples = next(n for n in range(2000, 6000, 10) if model.encoder.feature_extractor.output_lengths(torch.tensor([n])).item() == 10)
    loss, stats = model(torch.randn(2, samples), torch.tensor([samples, samples]))
    assert math.isfinite(float(loss)) and math.isfinite(float(stats["unmasked_contrastive"]))
    assert 0 < stats["masked_frames"] < 20


def test_feature_penalty_is_the_mean_square_of_the_real_frames_only():
    """A padded batch's penalty is that of its utterances' real frames, pooled: a batch-mate's
    padding neither dilutes it nor (whatever the padded frames hold) adds to it."""
    torch.manual_seed(0)
    long_, short = torch.randn(7, 3), torch.randn(4, 3)
    z = torch.full((2, 7, 3), 100.0)
    z[0], z[1, :4] = long_, short
    padding_mask = torch.tensor([[False] * 7, [False] * 4 + [True] * 3])
    expected = torch.cat([long_, short]).pow(2).mean()
    assert float(feature_penalty(z, padding_mask)) == pytest.approx(float(expected), rel=1e-6)
    z.requires_grad_(True)
    feature_penalty(z, padding_mask).backward()
    assert z.grad[1, 4:].abs().max() == 0 and z.grad[1, :4].abs().min() > 0


def test_fine_tuning_masks_zero_the_dropped_channels_of_time_masked_frames_too():
    """As fairseq and transformers: the mask embedding goes in first, then the dropped channels
    are zeroed in every frame, time-masked ones included."""
    torch.manual_seed(0)
    enc_dict = _tiny_encoder_dict()
    enc_dict["mask"] = dict(time_prob=0.9, time_length=2, time_min_masks=1, channel_prob=0.5, channel_length=4)
    encoder = Wav2Vec2Encoder(Wav2Vec2EncoderConfig.from_dict(enc_dict)).train()
    torch.nn.init.normal_(encoder.mask_embedding)  # nonzero in every channel
    seen = {}
    encoder.transformer.register_forward_pre_hook(lambda module, args: seen.update(input=args[0].detach()))
    encoder(torch.randn(2, 16000), torch.tensor([16000, 16000]))
    x = seen["input"]
    for utterance in x:
        dropped = (utterance == 0).all(dim=0)  # channels zero in every frame
        assert dropped.any()  # (were the mask embedding left whole, no channel would be)
        masked_frames = (utterance[:, ~dropped] == encoder.mask_embedding[~dropped]).all(-1)
        assert masked_frames.any()  # the time-masked frames, which lost the dropped channels too


def test_encoder_padding_invariance_with_layer_norm_convs():
    torch.manual_seed(0)
    enc = Wav2Vec2Encoder(Wav2Vec2EncoderConfig.from_dict(_tiny_encoder_dict(conv_norm="layer"))).eval()
    short, long_ = torch.randn(6000), torch.randn(9600)
    batch = torch.zeros(2, 9600)
    batch[0, :6000], batch[1] = short, long_
    with torch.no_grad():
        alone = enc(short[None], torch.tensor([6000]))
        together = enc(batch, torch.tensor([6000, 9600]))
        long_alone = enc(long_[None], torch.tensor([9600]))
        unmasked = enc(batch, torch.tensor([9600, 9600]))  # padding treated as signal
    t = int(alone.lengths[0])
    assert t == 18 and together.lengths.tolist() == [18, 29]
    assert together.padding_mask[0].tolist() == [False] * 18 + [True] * 11
    assert torch.allclose(alone.hidden[0], together.hidden[0, :t], atol=1e-5)
    assert torch.allclose(long_alone.hidden[0], together.hidden[1], atol=1e-5)
    # sanity: the comparison is sensitive to padding when it is not masked out
    assert (unmasked.hidden[0, :t] - alone.hidden[0]).abs().max() > 1e-3


def test_encoder_return_all_layers():
    torch.manual_seed(0)
    enc = Wav2Vec2Encoder(Wav2Vec2EncoderConfig.from_dict(_tiny_encoder_dict())).eval()
    with torch.no_grad():
        out = enc(torch.randn(1, 8000), torch.tensor([8000]), return_all=True)
    assert len(out.layers) == 3  # input to layer 1 + 2 layers
    assert torch.equal(out.layers[-1], out.hidden)
    assert out.hidden.shape == (1, 24, 32)


# ---------------------------------------------------------------------- CTC greedy
def test_ctc_greedy_collapses_repeats_and_drops_blanks():
    V = 6
    head = CtcHead(V, V)
    with torch.no_grad():
        head.proj.weight.copy_(torch.eye(V))
        head.proj.bias.zero_()
    paths = [[0, 3, 3, 0, 3, 5, 5, 0, 0, 2], [4, 4, 1, 0, 2, 2, 2, 2, 2, 2]]
    log_probs = torch.full((2, 10, V), math.log(0.02))
    for b, path in enumerate(paths):
        for t, token in enumerate(path):
            log_probs[b, t, token] = math.log(0.9)
    # a blank between two 3s separates them; repeats merge; frames past the length are ignored
    assert head.greedy(log_probs, torch.tensor([10, 4])) == [[3, 3, 5, 2], [4, 1]]
    assert head.greedy(log_probs, torch.tensor([3, 0])) == [[3], []]


# ---------------------------------------------------------------------- configs
def test_load_config_with_bases_and_overrides(tmp_path):
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(
        {"model": {"dim": 8, "layers": 2, "act": "gelu"}, "optim": {"lr": 0.1}, "tags": [1, 2]}))
    (tmp_path / "extra.yaml").write_text(yaml.safe_dump({"model": {"layers": 3}, "data": {"sr": 16000}}))
    sub = tmp_path / "sub"
    sub.mkdir()
    (sub / "mid.yaml").write_text("_base_: ../base.yaml\nmodel: {dim: 16}\n")
    (sub / "child.yaml").write_text(
        "_base_: [mid.yaml, ../extra.yaml]\nmodel: {act: relu}\ntags: [3]\n")
    cfg = load_config(sub / "child.yaml", ["optim.lr=0.5", "model.dim=64", "new.section.flag=true",
                                           "data.path=null", "name=run1", "tags=[4, 5]"])
    assert cfg == {
        "model": {"dim": 64, "layers": 3, "act": "relu"},
        "optim": {"lr": 0.5},
        "tags": [4, 5],
        "data": {"sr": 16000, "path": None},
        "new": {"section": {"flag": True}},
        "name": "run1",
    }
    assert "_base_" not in load_config(sub / "mid.yaml")
    with pytest.raises(ValueError, match="'dim' is not a section"):
        load_config(sub / "child.yaml", ["model.dim.x=1"])  # model.dim is not a section
    with pytest.raises(ValueError, match="'no_equals_sign' is not of the form key.sub=value"):
        load_config(sub / "child.yaml", ["no_equals_sign"])


def test_load_configs_merges_in_order(tmp_path):
    (tmp_path / "a.yaml").write_text("task: pretrain\ntrainer: {max_updates: 10, seed: 1}\nx: {y: {z: 1, w: 2}}\n")
    (tmp_path / "b.yaml").write_text("trainer: {max_updates: 20}\nx: {y: {z: 3}}\n")
    (tmp_path / "c.yaml").write_text("_base_: a.yaml\ntask: asr\n")
    cfg = load_configs([tmp_path / "a.yaml", tmp_path / "b.yaml"], ["trainer.seed=7"])
    assert cfg == {"task": "pretrain", "trainer": {"max_updates": 20, "seed": 7}, "x": {"y": {"z": 3, "w": 2}}}
    cfg = load_configs([tmp_path / "b.yaml", tmp_path / "c.yaml"])  # c (with its base a) wins
    assert cfg["trainer"] == {"max_updates": 10, "seed": 1} and cfg["task"] == "asr"
    assert cfg["x"] == {"y": {"z": 1, "w": 2}}


def test_recipe_configs_compose():
    conf = ROOT / "egs" / "minisynth" / "conf"
    cfg = load_configs([conf / "frontend_wav2vec2.yaml", conf / "finetune_ctc.yaml"], ["optim.lr=0.0005"])
    assert cfg["frontend"]["name"] == "wav2vec2"
    enc = cfg["frontend"]["encoder"]
    preset = yaml.safe_load(TINY_PRESET.read_text())["frontend"]["encoder"]
    finetune = yaml.safe_load((conf / "finetune_ctc.yaml").read_text())["frontend"]["encoder"]
    # deep-merged: the architecture from the shared preset, the fine-tuning masks from the stage file
    assert enc["transformer"] == preset["transformer"] and enc["conv_layers"] == preset["conv_layers"]
    assert enc["mask"] == finetune["mask"]
    assert cfg["optim"]["lr"] == 0.0005 and cfg["task"] == "asr"
    Wav2Vec2EncoderConfig.from_dict(enc)  # every key is a real field


def test_override_in_scientific_notation_is_a_float():
    """The module docstring promises `optim.lr=1e-3` gets its type; PyYAML (YAML 1.1) reads
    '1e-3' (no dot) as the *string* '1e-3', which AdamW then rejects."""
    cfg = {}
    set_dotted(cfg, "optim.lr=1e-3")
    assert cfg["optim"]["lr"] == 1e-3 and isinstance(cfg["optim"]["lr"], float)


# ---------------------------------------------------------------------- schedules
def test_polynomial_schedule():
    f = build_lr_scale({"name": "polynomial", "warmup_ratio": 0.1, "end_lr_scale": 0.0, "power": 1.0}, 100)
    assert [f(s) for s in (0, 4, 9)] == pytest.approx([0.1, 0.5, 1.0])
    assert [f(s) for s in (10, 55, 100, 150)] == pytest.approx([1.0, 0.5, 0.0, 0.0])
    g = build_lr_scale({"name": "polynomial", "warmup_updates": 4, "end_lr_scale": 0.1, "power": 2.0}, 104)
    assert g(0) == pytest.approx(0.25) and g(3) == pytest.approx(1.0)
    assert g(54) == pytest.approx(0.1 + 0.9 * 0.5 ** 2)
    assert g(104) == pytest.approx(0.1)
    assert build_lr_scale({}, 100)(7) == pytest.approx(1.0)  # default: 8 % warm-up → step 7 peaks


def test_tri_stage_schedule():
    f = build_lr_scale({"name": "tri_stage", "phase_ratio": [0.1, 0.4, 0.5], "init_lr_scale": 0.01,
                        "final_lr_scale": 0.05}, 100)
    assert f(0) == pytest.approx(0.01)
    assert f(5) == pytest.approx(0.01 + 0.99 * 0.5)
    assert f(10) == pytest.approx(1.0) and f(49) == pytest.approx(1.0) and f(50) == pytest.approx(1.0)
    assert f(75) == pytest.approx(math.sqrt(0.05))
    assert f(100) == pytest.approx(0.05) and f(1000) == pytest.approx(0.05)
    assert all(f(s) >= f(s + 1) for s in range(50, 100))
    # fairseq's HuBERT base_10h: warm-up 8000, hold 0, decay over 72000 steps of a 25000-update run
    h = build_lr_scale({"name": "tri_stage", "phase_updates": [8000, 0, 72000], "init_lr_scale": 0.01,
                        "final_lr_scale": 0.05}, 25000)
    assert h(0) == pytest.approx(0.01) and h(8000) == pytest.approx(1.0)
    assert h(24999) == pytest.approx(0.05 ** (16999 / 72000)) and 0.48 < h(24999) < 0.5  # the decay cut short
    assert build_lr_scale({"name": "constant"}, 10)(7) == 1.0
    with pytest.raises(ValueError, match="unknown scheduler 'cosine'"):
        build_lr_scale({"name": "cosine"}, 10)


def test_pretrain_config_keeps_the_objectives_mask_defaults():
    """A config without `mask:` (or with part of it) must still mask as the paper does."""
    from sslasr.models.hubert import HubertPretrainConfig
    from sslasr.models.w2vbert import W2vBertPretrainConfig

    assert Wav2Vec2PretrainConfig.from_dict({}).mask.time_prob == 0.65
    partial = Wav2Vec2PretrainConfig.from_dict({"mask": {"time_length": 5}}).mask
    assert (partial.time_prob, partial.time_length) == (0.65, 5)
    assert HubertPretrainConfig.from_dict({}).mask.time_prob == 0.8
    assert W2vBertPretrainConfig.from_dict({"mask": {"time_min_masks": 1}}).mask.time_prob == 0.65


def test_group_norm_statistics_are_float32_under_half_precision():
    """Under fp16 autocast the conv output is fp16: its sums over a long utterance (and a frame
    count past 65504) would overflow. The statistics are taken in float32, as autocast runs GroupNorm."""
    from sslasr.models.blocks.conv_extractor import _group_norm_time_major
    norm = torch.nn.GroupNorm(4, 4)
    x = 10 * torch.randn(1, 70000, 4)
    out = _group_norm_time_major(x.half(), norm, torch.tensor([70000]))
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    torch.testing.assert_close(out, _group_norm_time_major(x.half().float(), norm, torch.tensor([70000])))


@pytest.mark.parametrize("frontend", ["wav2vec2", "hubert", "w2vbert"])  # (WavLM's objective is HuBERT's)
def test_a_pretraining_mask_of_nothing_is_refused(frontend):
    """pretrain.mask.time_prob 0 masked nothing: wav2vec 2.0 and w2v-BERT stopped in the quantizer on
    a reshape of 0 rows, HuBERT and WavLM skipped every update ("its batches have no weight")."""
    from sslasr.models.hubert import HubertPretrainConfig
    from sslasr.models.w2vbert import W2vBertPretrainConfig
    config = {"wav2vec2": Wav2Vec2PretrainConfig, "hubert": HubertPretrainConfig, "w2vbert": W2vBertPretrainConfig}[frontend]
    assert config.from_dict({"mask": {"time_length": 5}}).mask.time_prob == config().mask.time_prob > 0
    for mask in ({"time_prob": 0.0}, {"time_length": 0}):
        with pytest.raises(ValueError, match="pretraining predicts the masked frames"):
            config.from_dict({"mask": mask})
