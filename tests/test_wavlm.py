"""WavLM: relative position buckets (hand-computed), the per-layer gate, the fp16 scaled softmax."""

import math

import pytest
import torch
import torch.nn.functional as F

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

