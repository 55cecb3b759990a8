"""bench/pretrain_throughput.py's summaries: the ratio's bootstrap interval and the reading of
a run's output by --runs."""

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from pretrain_throughput import ratio_interval, run_ratios  # noqa: E402


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


def test_run_ratios_names_each_ratio_by_its_frontend():
    header = "config=tiny device=cpu\nparameters: ours 1  transformers 1\nmodel ...\n"
    line = "ratio (ours / transformers): {:.2f}× (95 % bootstrap interval over the 9 paired iterations: 1.00-2.00×)\n"
    everything = (header + line.format(3.88) + "\nhubert: ours = full masked prediction\n" + line.format(1.53)
                  + "\nwavlm: ours = full masked prediction\n" + line.format(1.41)
                  + "\nw2vbert: ours = contrastive\n" + line.format(1.44)
                  + "\nwav2vec2: 3.88×  hubert: 1.53×  wavlm: 1.41×  w2vbert: 1.44×\n")
    assert run_ratios(everything) == {"wav2vec2": 3.88, "hubert": 1.53, "wavlm": 1.41, "w2vbert": 1.44}
    assert run_ratios(header + line.format(3.5)) == {"wav2vec2": 3.5}
    assert run_ratios("\nwavlm: ours = full masked prediction\n" + line.format(1.3)) == {"wavlm": 1.3}
    with pytest.raises(SystemExit, match="cannot read"):
        run_ratios("Traceback (most recent call last): ...")
