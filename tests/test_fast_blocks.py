"""The faster CPU paths of shared blocks against the PyTorch ops they replace: dropout's random
stream (keep rate, exact scaling, its gradient), the training attention path against
scaled_dot_product_attention's maths."""

import pytest
import torch
import torch.nn.functional as F

from sslasr.models.blocks.dropout import Dropout, attention, dropout, keep_mask

torch.set_num_threads(1)


@pytest.mark.parametrize("p", [0.05, 0.1, 0.5, 0.9])
def test_keep_rate_within_statistical_bounds(p):
    torch.manual_seed(0)
    n = 1_000_001  # odd: the last 64-bit draw is half used
    keep = keep_mask((n,), p)
    assert keep.dtype == torch.bool and keep.shape == (n,)
    rate = keep.double().mean().item()
    assert abs(rate - (1 - p)) < 6 * ((p * (1 - p) / n) ** 0.5)
    # the two 32-bit halves of one draw are independent: both kept with probability (1 − p)²
    pairs = keep[:-1].view(-1, 2)
    both = pairs.all(1).double().mean().item()
    assert abs(both - (1 - p) ** 2) < 6 * (((1 - p) ** 2 * (1 - (1 - p) ** 2) / len(pairs)) ** 0.5)


def test_dropout_scales_exactly_and_its_gradient_uses_the_same_mask():
    torch.manual_seed(0)
    p = 0.3
    x = torch.randn(64, 50, 7, requires_grad=True)
    torch.manual_seed(1)
    y = dropout(x, p)
    kept = y != 0
    scale = torch.tensor(1 / (1 - p), dtype=torch.float32)
    assert torch.equal(y[kept], x[kept] * scale)
    grad = torch.randn_like(y)
    y.backward(grad)
    assert torch.equal(x.grad, torch.where(kept, grad * scale, 0.0))
    # the stream is torch's generator: the same seed, the same mask
    torch.manual_seed(1)
    assert torch.equal(dropout(x, p) != 0, kept)


def test_dropout_identity_cases_and_module():
    x = torch.randn(10, 20)
    assert dropout(x, 0.0) is x and dropout(x, 0.5, training=False) is x
    assert torch.equal(dropout(x, 1.0), torch.zeros_like(x))
    module = Dropout(0.2)
    assert isinstance(module, torch.nn.Dropout) and module.p == 0.2
    assert torch.equal(module.eval()(x), x)
    assert module.train()(x).eq(0).any()
    half = dropout(x.to(torch.bfloat16), 0.5)
    assert half.dtype == torch.bfloat16


def _reference_attention(q, k, v, mask, p, scale, keep):
    logits = q @ k.transpose(-2, -1) * scale
    if mask is not None and mask.dtype == torch.bool:
        logits = logits.masked_fill(~mask, float("-inf"))
    elif mask is not None:
        logits = logits + mask
    return (torch.softmax(logits, -1) * keep / (1 - p)) @ v


@pytest.mark.parametrize("mask_kind", [None, "bool", "bias"])
def test_training_attention_is_sdpa_maths_with_our_dropout(mask_kind):
    torch.manual_seed(0)
    B, H, T, d, p = 2, 3, 9, 4, 0.2
    q, k, v = (torch.randn(B, H, T, d, dtype=torch.float64, requires_grad=True) for _ in range(3))
    mask = None
    if mask_kind == "bool":
        mask = torch.ones(B, 1, 1, T, dtype=torch.bool)
        mask[1, ..., 6:] = False  # the second utterance's last 3 frames are padding
    elif mask_kind == "bias":
        mask = torch.randn(B, H, T, T, dtype=torch.float64, requires_grad=True)
    torch.manual_seed(1)
    out = attention(q, k, v, mask, p, scale=0.3)
    torch.manual_seed(1)
    keep = keep_mask((B, H, T, T), p, torch.float64)  # the draw attention made
    expected = _reference_attention(q, k, v, mask, p, 0.3, keep)
    torch.testing.assert_close(out, expected)
    inputs = [q, k, v] + ([mask] if mask_kind == "bias" else [])
    grads = torch.autograd.grad(out.sum(), inputs)
    expected_grads = torch.autograd.grad(expected.sum(), inputs)
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want)


def test_attention_without_dropout_is_sdpa():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 9, 4) for _ in range(3))
    bias = torch.randn(2, 3, 9, 9)
    torch.testing.assert_close(attention(q, k, v, bias), F.scaled_dot_product_attention(q, k, v, attn_mask=bias))
