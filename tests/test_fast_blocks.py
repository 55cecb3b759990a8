"""The faster CPU paths of shared blocks against the PyTorch ops they replace: dropout's random
stream (keep rate, exact scaling, its gradient), the training attention path against
scaled_dot_product_attention's maths, the FFT positional convolution against Conv1d, the
relative shift of Transformer-XL scores against an index gather, the Conformer's depthwise
convolution kept in float32 under CPU autocast, the grouped convolution over time in both of its
memory layouts against Conv1d."""

import pytest
import torch
import torch.nn.functional as F

from sslasr.models.blocks import positional
from sslasr.models.blocks import conformer
from sslasr.models.blocks import dropout as dropout_module
from sslasr.models.blocks.conv_extractor import ConvFeatureExtractor
from sslasr.models.blocks.conformer import ConformerConfig, ConvolutionModule, _shift_offsets
from sslasr.models.blocks.dropout import Dropout, attention, dropout, keep_mask
from sslasr.models.blocks.positional import ConvPositionalEmbedding, _fft_length, fft_conv, fft_conv_is_cheaper
from sslasr.models.blocks.time_conv import conv_over_time

torch.set_num_threads(1)


@pytest.mark.parametrize("p", [0.05, 0.1, 0.5, 0.9])
def test_keep_rate_within_statistical_bounds(p):
    torch.manual_seed(0)
    n = 1_000_001  # the last 64-bit draw is a quarter used
    keep = keep_mask((n,), p)
    assert keep.dtype == torch.bool and keep.shape == (n,)
    rate = keep.double().mean().item()
    assert abs(rate - (1 - p)) < 6 * ((p * (1 - p) / n) ** 0.5)
    # the four 16-bit quarters of one draw are independent: all kept with probability (1 − p)⁴,
    # and neighbours, which come from the same draw, both kept with probability (1 − p)²
    for group in (2, 4):
        groups = keep[:n - n % 4].view(-1, group)
        joint, expected = groups.all(1).double().mean().item(), (1 - p) ** group
        assert abs(joint - expected) < 6 * ((expected * (1 - expected) / len(groups)) ** 0.5)


def test_keep_probability_is_p_rounded_to_a_multiple_of_2_to_the_minus_16(monkeypatch):
    # the generator's draws replaced by every 16-bit value once: exactly 2¹⁶ − round(p·2¹⁶) kept
    every_value = torch.arange(-2**15, 2**15, dtype=torch.int16)[torch.randperm(2**16)].view(torch.int64)
    monkeypatch.setattr(dropout_module, "_random_bits", lambda count, device: every_value[:count])
    for p in (0.1, 0.3, 0.9, 2**-17):
        assert keep_mask((2**16,), p).sum().item() == 2**16 - round(p * 2**16)


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


def test_inplace_dropout_on_an_activation_output_keeps_the_gradient():
    x = torch.randn(30, 40, requires_grad=True)
    torch.manual_seed(2)
    y = dropout(F.gelu(x), 0.4, inplace=True)
    grad = torch.randn_like(y)
    y.backward(grad)
    torch.manual_seed(2)
    keep = keep_mask(y.shape, 0.4)
    x2 = x.detach().requires_grad_()
    expected = F.gelu(x2) * keep / 0.6
    expected.backward(grad)
    torch.testing.assert_close(y, expected)
    torch.testing.assert_close(x.grad, x2.grad)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):  # ReLU keeps its output
        dropout(F.relu(x), 0.4, inplace=True).sum().backward()


def _graph_ops(tensor: torch.Tensor) -> set:
    seen, stack = set(), [tensor.grad_fn]
    while stack:
        fn = stack.pop()
        if fn is not None and type(fn).__name__ not in seen:
            seen.add(type(fn).__name__)
            stack.extend(next_fn for next_fn, _ in fn.next_functions)
    return seen


@pytest.mark.parametrize("where", ["whole_view", "part_view"])
def test_inplace_dropout_on_a_view_is_not_rebased(where):
    """A Linear's (B, T, C) output is a view of its (B·T, C) matmul: dropped in place, autograd
    would rebase the view (CopySlices: three extra passes in the backward). The base is dropped
    instead; a view of part of its base (one of q, k, v) is dropped out of place. Same values and
    gradients as the out-of-place dropout with the same draws."""
    linear = torch.nn.Linear(12, 36 if where == "part_view" else 12)
    x = torch.randn(4, 10, 12, requires_grad=True)
    grad = torch.randn(4, 10, 12)
    results = []
    for inplace in (True, False):
        out = linear(x)
        if where == "part_view":
            out = out[..., :12]
        assert out._base is not None
        torch.manual_seed(3)
        y = dropout(out, 0.3, inplace=inplace)
        assert not {"CopySlices", "AsStridedBackward0"} & _graph_ops(y)
        results.append((y, *torch.autograd.grad(y, (x, linear.weight), grad)))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b)


def test_dropout_identity_cases_and_module():
    x = torch.randn(10, 20)
    assert dropout(x, 0.0) is x and dropout(x, 0.5, training=False) is x
    assert torch.equal(dropout(x, 1.0), torch.zeros_like(x))
    # p within 2⁻¹⁷ of 1 rounds to a threshold of 2¹⁵, which wrapped in int16: everything kept × 10⁶
    nearly_all = dropout(torch.ones(100_000), 0.999999)
    assert nearly_all.count_nonzero() < 10
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


@pytest.mark.parametrize("channels, kernel, groups, batch, time", [(16, 8, 4, 3, 21), (12, 7, 3, 2, 30), (8, 16, 2, 2, 5)])
def test_fft_conv_equals_conv1d_forward_and_gradients(channels, kernel, groups, batch, time):
    torch.manual_seed(0)
    x = torch.randn(batch, time, channels, requires_grad=True)
    weight = torch.randn(channels, channels // groups, kernel, requires_grad=True)
    bias = torch.randn(channels, requires_grad=True)
    padding = kernel // 2
    expected = F.conv1d(x.transpose(1, 2), weight, bias, padding=padding, groups=groups)[:, :, :time].transpose(1, 2)
    got = fft_conv(x, weight, bias, padding)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    grad = torch.randn_like(got)
    for a, b in zip(torch.autograd.grad(got, (x, weight, bias), grad),
                    torch.autograd.grad(expected, (x, weight, bias), grad)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_positional_embedding_takes_fft_only_when_cheaper_and_matches_the_convolution(monkeypatch):
    torch.manual_seed(0)
    module = ConvPositionalEmbedding(32, kernel=32, groups=4)
    x = torch.randn(8, 100, 32)
    weight = module.conv.weight
    assert fft_conv_is_cheaper(x, weight.shape, 16)
    assert not fft_conv_is_cheaper(x, (32, 8, 3), 1)           # a narrow kernel stays direct
    assert not fft_conv_is_cheaper(x.to(torch.bfloat16), weight.shape, 16)
    calls = []
    monkeypatch.setattr(positional, "fft_conv", lambda *args: calls.append(1) or fft_conv(*args))
    fast = module(x)
    assert calls == [1]                                           # training, cheaper: the FFT path
    monkeypatch.setattr(positional, "fft_conv", None)            # eval: the direct convolution
    direct = module.eval()(x)
    torch.testing.assert_close(fast, direct, atol=1e-5, rtol=1e-5)
    monkeypatch.setattr(positional, "fft_conv_is_cheaper", lambda *args: False)
    torch.testing.assert_close(module.train()(x), direct, atol=0, rtol=0)


def test_fft_lengths_are_the_smallest_5_smooth_sizes():
    def smooth(n):
        for p in (2, 3, 5):
            while n % p == 0:
                n //= p
        return n == 1
    for n in range(1, 700):
        length = _fft_length(n)
        assert length >= n and smooth(length) and not any(smooth(m) for m in range(n, length))


@pytest.mark.parametrize("time", [1, 2, 3, 8, 41])
def test_relative_shift_view_equals_the_index_gather_and_its_gradient(time):
    """Entry [i, j] of the shifted scores is column T−1−(i−j); the view's backward must put each
    gradient back on that column, and nothing on the columns no pair reads."""
    torch.manual_seed(time)
    scores = torch.randn(2, 3, time, 2 * time - 1, requires_grad=True)
    i, j = torch.meshgrid(torch.arange(time), torch.arange(time), indexing="ij")
    columns = (time - 1 - i + j).expand(2, 3, time, time)
    expected = scores.gather(-1, columns)
    shifted = _shift_offsets(scores)
    assert torch.equal(shifted, expected)
    upstream = torch.randn(2, 3, time, time)
    (grad,) = torch.autograd.grad(shifted, scores, upstream)
    (expected_grad,) = torch.autograd.grad(expected, scores, upstream)
    assert torch.equal(grad, expected_grad)
    with pytest.raises(ValueError, match="2T−1"):
        _shift_offsets(torch.zeros(1, 1, time, 2 * time))


@pytest.mark.parametrize("groups,kernel,padding", [(4, 8, 4), (16, 5, 0), (1, 3, 1)])
def test_convolution_over_time_equals_conv1d_in_both_layouts(groups, kernel, padding, monkeypatch):
    """The (B, C, 1, T) channels-last view (the CPU's) and Conv1d on the transposed frames (every
    other device's, where cuDNN would take the view to its slow NHWC kernel) compute Conv1d:
    outputs and gradients, for the positional (grouped, even kernel) and depthwise shapes."""
    torch.manual_seed(groups)
    conv = torch.nn.Conv1d(16, 16, kernel, padding=padding, groups=groups)
    x = torch.randn(3, 40, 16, requires_grad=True)                 # time-major frames
    expected = conv(x.transpose(1, 2))
    upstream = torch.randn_like(expected)
    expected_grads = torch.autograd.grad(expected, (x, conv.weight, conv.bias), upstream)
    for view in (True, False):
        got = conv_over_time(x, conv.weight, conv.bias, padding, groups, channels_last_view=view)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
        for a, b in zip(torch.autograd.grad(got, (x, conv.weight, conv.bias), upstream), expected_grads):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    # the default is the view on the CPU only
    calls = []
    monkeypatch.setattr(F, "conv2d", lambda *args, **kwargs: calls.append("conv2d") or torch.zeros(1, 1, 1, 1))
    monkeypatch.setattr(F, "conv1d", lambda *args, **kwargs: calls.append("conv1d"))
    conv_over_time(x, conv.weight, conv.bias, padding, groups)
    conv_over_time(x.to("meta"), conv.weight.to("meta"), conv.bias.to("meta"), padding, groups)
    assert calls == ["conv2d", "conv1d"]


def test_depthwise_convolution_runs_in_float32_under_cpu_autocast(monkeypatch):
    """oneDNN's bf16 depthwise kernel on the (B, C, 1, T) view stalls for minutes once T passes
    ~100 frames, so under CPU autocast the module must hand conv2d float32 tensors; its output
    stays the float32 module's up to bf16 rounding of the pointwise layers."""
    torch.manual_seed(0)
    module = ConvolutionModule(ConformerConfig(dim=16, heads=2, ffn_dim=32, conv_kernel=15)).eval()
    x = torch.randn(2, 160, 16)
    padding = torch.zeros(2, 160, dtype=torch.bool)
    padding[1, 120:] = True
    real_conv2d, seen = F.conv2d, []

    def conv2d(input, weight, bias=None, *args, **kwargs):
        seen.append((input.dtype, weight.dtype, torch.is_autocast_enabled("cpu")))
        assert input.dtype == weight.dtype == torch.float32 and not torch.is_autocast_enabled("cpu")
        return real_conv2d(input, weight, bias, *args, **kwargs)

    monkeypatch.setattr(conformer.F, "conv2d", conv2d)
    expected = module(x, padding)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = module(x, padding)
    assert len(seen) == 2
    assert out.dtype == torch.bfloat16  # the last pointwise layer still runs in bf16
    error = (out.float() - expected).norm() / expected.norm()
    assert error < 3e-2, error



@pytest.mark.parametrize("norm, bias", [("group", False), ("group", True), ("layer", True)])
def test_time_major_feature_extractor_equals_its_modules(norm, bias):
    """The CPU's time-major matmul path against the Conv1d/GroupNorm/LayerNorm modules themselves
    (the path taken on a GPU): outputs and every gradient, the waveform's included."""
    torch.manual_seed(0)
    extractor = ConvFeatureExtractor([[16, 10, 5], [24, 8, 4], [24, 4, 2], [24, 3, 3]], norm=norm, conv_bias=bias)
    waveform = torch.randn(2, 3000, requires_grad=True)
    upstream = torch.randn(2, 24, 24)  # a random gradient from above: (B, C, frames)
    outputs, gradients = [], []
    for forward in (extractor, extractor._forward_modules):
        out = forward(waveform)
        outputs.append(out)
        gradients.append(torch.autograd.grad((out * upstream).sum(), [waveform, *extractor.parameters()]))
    torch.testing.assert_close(outputs[0], outputs[1], atol=1e-5, rtol=1e-5)
    for fast, modules in zip(*gradients):
        torch.testing.assert_close(fast, modules, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("norm", ["group", "layer"])
def test_time_major_feature_extractor_under_cpu_autocast(norm):
    """A layer with kernel = stride (a plain matmul: bf16 out under autocast) before one with
    kernel ≠ stride (the shifted block matmul, run with autocast off) multiplied bf16 activations
    by a float32 weight: an error, where the modules run."""
    torch.manual_seed(0)
    extractor = ConvFeatureExtractor([[4, 10, 5], [4, 2, 2], [4, 3, 2]], norm=norm)
    waveform = torch.randn(2, 3000)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fast, modules = extractor(waveform), extractor._forward_modules(waveform)
    torch.testing.assert_close(fast.float(), modules.float(), atol=0.1, rtol=0.05)


def test_dropout_refuses_a_probability_outside_0_1_and_is_unbiased_near_1():
    """A negative p dropped everything (F.dropout raises); near p = 1 the rounded keep probability
    made E[y] = 1.5·x at p = 0.99999 (the scale stays 1/(1 − p)): F.dropout there."""
    for p in (-0.1, 1.5):
        with pytest.raises(ValueError, match="between 0 and 1"):
            dropout(torch.ones(4), p)
    torch.manual_seed(0)
    assert abs(dropout(torch.ones(4_000_000), 0.99999).mean().item() - 1) < 0.2  # (1.53 before)
    # up to MAX_P the rounding moves E[y] by at most 7.7e-4 (the worst p just below it)
    worst = max(abs((1 - round(p * 2**16) / 2**16) / (1 - p) - 1)
                for p in (dropout_module.MAX_P - i * 1e-7 for i in range(2000)))
    assert worst < 7.7e-4


def test_the_cached_buffers_survive_a_call_under_inference_mode():
    """The dropout draw buffer and the DFT table were cached as inference tensors when first made
    under torch.inference_mode: every later training call failed."""
    dropout_module._scratch.bits = None
    positional._dft_table.cache_clear()
    w = torch.randn(4, 2, 8)
    with torch.inference_mode():
        dropout(torch.randn(1000), 0.1)
        fft_conv(torch.randn(1, 5, 4), w, torch.zeros(4), 4)
    x = torch.randn(1000, requires_grad=True)
    dropout(x, 0.1).sum().backward()
    fft_conv(torch.randn(1, 5, 4), w.requires_grad_(), torch.zeros(4), 4).sum().backward()
    assert x.grad is not None and w.grad is not None


def test_masked_batch_norm_without_real_frames_or_with_one_frame():
    """A batch without real frames had NaN gradients (0/0 statistics in the backward); a batch of
    one frame and no padding mask failed (BatchNorm1d trains on no single value)."""
    norm = conformer.MaskedBatchNorm1d(3).train()
    x = torch.randn(2, 4, 3, requires_grad=True)
    out = norm(x, torch.ones(2, 4, dtype=torch.bool))
    out.sum().backward()
    assert torch.equal(out, torch.zeros_like(out)) and torch.isfinite(x.grad).all()
    assert torch.isfinite(norm.weight.grad).all() and torch.equal(norm.running_mean, torch.zeros(3))
    one = torch.randn(1, 1, 3)
    before = norm.running_var.clone()
    # one frame: its own mean, no variance: β, and no unbiased variance for the running average
    torch.testing.assert_close(norm(one), norm.bias.detach().expand(1, 1, 3))
    assert torch.equal(norm.running_var, before)


def test_a_feature_grad_mult_of_0_freezes_the_extractor_as_fairseqs():
    """At 0 the extractor got zero gradients, which AdamW's weight decay still acted on."""
    from sslasr.models.blocks.conv_extractor import features_with_grad_scale
    extractor = ConvFeatureExtractor([(4, 10, 5), (4, 3, 2)], "group")
    wav = torch.randn(2, 400)
    frozen = features_with_grad_scale(extractor, 0.0, wav)
    assert not frozen.requires_grad and torch.equal(frozen, extractor(wav))
    features_with_grad_scale(extractor, 0.1, wav).square().sum().backward()
    assert all(p.grad is not None for p in extractor.parameters())
