"""bench/pretrain_throughput.py's summaries: the ratio's bootstrap interval and the reading of
a run's output by --runs."""

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from pretrain_throughput import ratio_interval, ratio_line, run_ratios  # noqa: E402


def test_ratio_interval_brackets_the_ratio_of_medians_and_shrinks_with_the_noise():
    rng = np.random.default_rng(0)
    ours = 0.2 * (1 + 0.05 * rng.standard_normal(15))
    assert ratio_interval(ours, 1.5 * ours) == pytest.approx((1.5, 1.5))  # every pair the same ratio
    theirs_noisy = 0.3 * (1 + 0.2 * rng.standard_normal(15))
    theirs_quiet = 0.3 * (1 + 0.02 * rng.standard_normal(15))
    noisy, quiet = ratio_interval(ours, theirs_noisy), ratio_interval(ours, theirs_quiet)
    assert noisy[0] <= np.median(theirs_noisy) / np.median(ours) <= noisy[1]
    assert quiet[1] - quiet[0] < noisy[1] - noisy[0]
    assert noisy[0] < 1.5 < noisy[1]


def test_run_ratios_reads_back_each_frontends_ratio_line():
    lines = {name: ratio_line(name, ratio, (ratio - 0.1, ratio + 0.1), 9)
             for name, ratio in [("wav2vec2", 3.88), ("hubert", 1.53), ("wavlm", 1.406), ("w2vbert", 1.44)]}
    everything = "config=tiny device=cpu\n" + "\nencoder parameters: ours 1  transformers 1\n".join(
        lines.values()) + "\nwav2vec2: 3.88×  hubert: 1.53×  wavlm: 1.41×  w2vbert: 1.44×\n"
    assert run_ratios(everything) == {"wav2vec2": 3.88, "hubert": 1.53, "wavlm": 1.41, "w2vbert": 1.44}
    assert run_ratios("model ...\n" + lines["wavlm"] + "\n") == {"wavlm": 1.41}  # one frontend, whichever
    with pytest.raises(SystemExit, match="cannot read"):
        run_ratios("Traceback (most recent call last): ...")


def test_hf_no_input_grad_leaves_transformers_without_the_waveform_gradient():
    """--hf-no-input-grad: transformers' feature encoder marks its input as needing a gradient in
    training (for gradient checkpointing), work ours does not do; turned off, its weights still train."""
    import torch
    import transformers
    from pretrain_throughput import drop_hf_input_gradient
    cfg = transformers.HubertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                                    conv_dim=(8, 8), conv_kernel=(10, 3), conv_stride=(5, 2), num_conv_pos_embeddings=4,
                                    num_conv_pos_embedding_groups=2)
    model = transformers.HubertModel(cfg).train()
    seen = []
    model.feature_extractor.conv_layers[0].register_forward_hook(lambda m, inputs, out: seen.append(inputs[0].requires_grad))
    wav = torch.randn(1, 1600)
    model(wav).last_hidden_state.sum().backward()
    drop_hf_input_gradient(model)
    model.zero_grad()
    model(wav).last_hidden_state.sum().backward()
    assert seen == [True, False]
    assert model.feature_extractor.conv_layers[0].conv.weight.grad is not None
