"""The paired bootstrap of two systems' WER (sslasr.significance), its CLI, and the results rows
and RESULTS.md columns it feeds (sslasr.bin.score --baseline)."""

import math

import numpy as np
import pytest

from sslasr.bin import compare_wer, score
from sslasr.scoring import read_results, render_results_md, score_corpus
from sslasr.significance import compare_scored, paired_bootstrap


def test_identical_systems_differ_by_nothing():
    errors, words = [3, 0, 5, 2], [10, 4, 9, 7]
    result = paired_bootstrap(errors, errors, words, samples=2000)
    assert result.delta == result.ci_low == result.ci_high == 0.0
    assert result.p_improvement == 0.0  # "improvement" is a strictly lower WER
    assert result.wer_a == result.wer_b == pytest.approx(100 * 10 / 30)


def test_better_on_every_utterance_is_certain_improvement():
    words = np.full(50, 10)
    a = np.full(50, 4)
    b = a - np.arange(50) % 2 - 1  # 1 or 2 errors fewer on each utterance
    result = paired_bootstrap(a, b, words, samples=2000)
    assert result.delta == pytest.approx(-15.0)
    assert result.p_improvement == 1.0
    assert -20.0 <= result.ci_low < result.delta < result.ci_high <= -10.0


def test_resamples_without_reference_words_are_left_out_and_counted():
    """Two of three utterances have no reference words and B inserts 5 words in each. A resample
    of those two alone has no WER: it used to count as a difference of up to +1500 points."""
    result = paired_bootstrap([0, 0, 0], [0, 5, 5], [10, 0, 0], samples=3000)
    draws_without_words = (2 / 3) ** 3
    assert result.wordless == pytest.approx(3000 * draws_without_words, rel=0.2)
    assert 0 <= result.ci_low <= result.ci_high <= 100.0  # 10 insertions over u1's 10 words at most
    assert result.delta == pytest.approx(100.0)
    assert f"{result.wordless} without reference words left out" in result.summary()


def test_interval_matches_the_normal_approximation():
    # Equal-length utterances: Δ_b is the mean of U resampled per-utterance differences, so its
    # spread is the differences' standard deviation / √U, and the 95 % interval ±1.96 of it.
    rng = np.random.default_rng(7)
    utts, words = 400, 10
    a = rng.binomial(words, 0.5, utts)
    b = np.clip(a + rng.integers(-3, 3, utts), 0, None)  # b a little better on average
    result = paired_bootstrap(a, b, np.full(utts, words), samples=20000, seed=1)
    d = 100.0 * (b - a) / words
    half_width = 1.96 * d.std() / math.sqrt(utts)
    assert result.delta == pytest.approx(d.mean())
    assert result.ci_low == pytest.approx(d.mean() - half_width, abs=0.06 * half_width)
    assert result.ci_high == pytest.approx(d.mean() + half_width, abs=0.06 * half_width)
    z = d.mean() / (d.std() / math.sqrt(utts))
    normal_cdf = 0.5 * (1 + math.erf(-z / math.sqrt(2)))  # P(Δ < 0) under the approximation
    assert result.p_improvement == pytest.approx(normal_cdf, abs=0.02)


def test_seeded_and_chunking_does_not_change_the_draws():
    # The resamples are drawn `chunk` rows at a time to bound memory; numpy's generator yields
    # the same stream however the draws are split, so every chunk size gives the same result
    # (a chunk lost, repeated or reused would move the interval and P(improvement)).
    rng = np.random.default_rng(3)
    a, b, n = rng.integers(0, 5, 100), rng.integers(0, 5, 100), rng.integers(5, 10, 100)
    first = paired_bootstrap(a, b, n, samples=4000, seed=5)
    for chunk in (7, 333, 500, 4000):
        assert paired_bootstrap(a, b, n, samples=4000, seed=5, chunk=chunk) == first
    assert paired_bootstrap(a, b, n, samples=4000, seed=6) != first


def test_bad_inputs_are_errors():
    with pytest.raises(ValueError, match="shape"):
        paired_bootstrap([1, 2], [1], [3, 3])
    with pytest.raises(ValueError, match="no reference words"):
        paired_bootstrap([0], [1], [0])
    with pytest.raises(ValueError, match="resample"):
        paired_bootstrap([1], [1], [2], samples=0)


def _scored(pairs):
    refs = {f"u{i}": ref for i, (ref, _) in enumerate(pairs)}
    hyps = {f"u{i}": hyp for i, (_, hyp) in enumerate(pairs)}
    return score_corpus(refs, hyps)[1]


def test_compare_scored_pairs_by_utterance_and_checks_the_references():
    baseline = _scored([("a b c", "a x c"), ("d e", "d e"), ("f g h i", "")])
    system = _scored([("a b c", "a b c"), ("d e", "d"), ("f g h i", "f g h")])
    result = compare_scored(baseline, system, samples=500)
    assert (result.wer_a, result.wer_b) == pytest.approx((100 * 5 / 9, 100 * 2 / 9))
    assert result.delta == pytest.approx(-100 * 3 / 9)
    assert result.utterances == 3
    with pytest.raises(ValueError, match="different utterances"):
        compare_scored(baseline, system[:2])
    with pytest.raises(ValueError, match="different references"):
        compare_scored(baseline, _scored([("a b c", "a"), ("d e", "d"), ("f g h", "f")]))


def _decode_dir(path, refs, hyps):
    path.mkdir(parents=True)
    (path / "ref.txt").write_text("".join(f"{u} {t}\n" for u, t in refs.items()))
    (path / "hyp.txt").write_text("".join(f"{u} {t}\n" for u, t in hyps.items()))
    return path


REFS = {f"utt{i:02d}": "the cat sat on the mat" for i in range(20)}


def test_score_baseline_fields_reach_the_row_and_results_md(tmp_path, capsys):
    teacher = _decode_dir(tmp_path / "exp/teacher/decode_test_greedy", REFS,
                          {u: "the cat sat on a hat" for u in REFS})       # 2 errors each
    student = _decode_dir(tmp_path / "exp/student/decode_test_greedy", REFS,
                          {u: "the cat sat on the hat" for u in REFS})     # 1 error each
    results = tmp_path / "results.jsonl"
    sets = ["corpus=c", "test_set=test", "frontend=w2vbert", "head=ctc", "decoding=ctc_greedy",
            "lm_weight=0", "labeled_seconds=3600", "pretrained=true", "generation=1", "command=cmd",
            f"exp={tmp_path / 'exp/student'}"]
    argv = ["--ref", str(student / "ref.txt"), "--hyp", str(student / "hyp.txt"), "--out-dir", str(student),
            "--results", str(results), "--baseline", str(teacher)] + [a for s in sets for a in ("--set", s)]
    assert score.main(argv) == 0
    assert "delta -16.67 points" in capsys.readouterr().out
    (row,) = read_results(results)
    assert row["baseline"] == str(teacher)
    assert row["wer_delta"] == row["wer_delta_low"] == row["wer_delta_high"] == pytest.approx(-16.6667)
    assert row["p_improvement"] == 1.0
    with pytest.raises(ValueError, match="computed"):
        score.parse_sets(["p_improvement=1"])

    table = render_results_md(results, tmp_path / "RESULTS.md")
    header = next(line for line in table.splitlines() if line.startswith("| # |"))
    cells = [c.strip() for c in header.split("|")]
    assert cells[cells.index("WER %") + 1:cells.index("WER %") + 4] == [
        "Δ WER vs baseline [95 % CI]", "P(improvement)", "baseline"]
    line = next(line for line in table.splitlines() if line.startswith("| 1 |"))
    assert f"| -16.67 [-16.67, -16.67] | 1.000 | {tmp_path / 'exp/teacher'} |" in line


def test_rows_without_a_baseline_render_no_such_columns(tmp_path):
    decode = _decode_dir(tmp_path / "d", REFS, REFS)
    results = tmp_path / "results.jsonl"
    sets = ["corpus=c", "test_set=test", "frontend=none", "head=ctc", "decoding=ctc_greedy", "lm_weight=0",
            "labeled_seconds=3600", "pretrained=false", "generation=0", "command=cmd"]
    score.main(["--ref", str(decode / "ref.txt"), "--hyp", str(decode / "hyp.txt"), "--out-dir", str(decode),
                "--results", str(results)] + [a for s in sets for a in ("--set", s)])
    assert "P(improvement)" not in render_results_md(results, tmp_path / "RESULTS.md")


def test_compare_wer_cli(tmp_path, capsys):
    a = _decode_dir(tmp_path / "a", REFS, {u: "the cat sat" for u in REFS})    # 3 deletions each
    b = _decode_dir(tmp_path / "b", REFS, {u: "the cat sat on" for u in REFS})  # 2
    assert compare_wer.main([str(a), str(b), "--samples", "300"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("WER 50.00 -> 33.33 %: delta -16.67 points") and "P(improvement) 1.000" in out
    c = _decode_dir(tmp_path / "c", dict(list(REFS.items())[:5]), dict(list(REFS.items())[:5]))
    with pytest.raises(SystemExit, match="different utterances"):
        compare_wer.main([str(a), str(c)])
    with pytest.raises(SystemExit, match="missing/ref.txt"):
        compare_wer.main([str(a), str(tmp_path / "missing")])


def test_groups_are_resampled_whole():
    rng = np.random.default_rng(11)
    a = rng.integers(0, 6, 200)
    b = np.clip(a + rng.integers(-2, 2, 200), 0, None)
    n = np.full(200, 8)
    ids = [f"u{i:03d}" for i in range(200)]
    # one group per utterance: the same resampling as none
    assert paired_bootstrap(a, b, n, samples=1000, groups=ids).ci_low == paired_bootstrap(a, b, n, samples=1000).ci_low
    # 10 speakers of 20 utterances whose difference is the speaker's: utterances are not independent,
    # and resampling them understates the spread that resampling speakers shows
    speaker_effect = np.repeat(rng.integers(-3, 4, 10), 20)
    b2 = np.clip(a + speaker_effect, 0, None)
    speakers = [f"s{i // 20}" for i in range(200)]
    by_utt = paired_bootstrap(a, b2, n, samples=4000)
    by_spk = paired_bootstrap(a, b2, n, samples=4000, groups=speakers)
    assert by_spk.delta == by_utt.delta and by_spk.groups == 10 and by_utt.groups is None
    assert by_spk.ci_high - by_spk.ci_low > 2 * (by_utt.ci_high - by_utt.ci_low)
    with pytest.raises(ValueError, match="group labels"):
        paired_bootstrap(a, b, n, groups=speakers[:5])


def test_compare_wer_cli_resamples_speakers(tmp_path, capsys):
    a = _decode_dir(tmp_path / "a", REFS, {u: "the cat sat" for u in REFS})
    b = _decode_dir(tmp_path / "b", REFS, {u: "the cat sat on" for u in REFS})
    utt2spk = tmp_path / "utt2spk"
    utt2spk.write_text("".join(f"{u} spk{i % 4}\n" for i, u in enumerate(REFS)))
    assert compare_wer.main([str(a), str(b), "--samples", "300", "--utt2spk", str(utt2spk)]) == 0
    assert "(20 utterances in 4 resampled groups, 300 resamples)" in capsys.readouterr().out
    utt2spk.write_text("".join(f"{u} spk0\n" for u in list(REFS)[:-1]))
    with pytest.raises(SystemExit, match="1 utterance\\(s\\) have no group"):
        compare_wer.main([str(a), str(b), "--utt2spk", str(utt2spk)])


def test_the_legend_follows_a_table_with_the_delta_column_only(tmp_path):
    from sslasr.scoring import BASELINE_LEGEND, append_result
    base = {"corpus": "c", "test_set": "test", "frontend": "w2vbert", "head": "ctc", "decoding": "ctc_greedy",
            "lm_weight": 0, "labeled_seconds": 3600, "pretrained": True, "generation": 0, "wer": 10.0, "sub": 1,
            "del": 0, "ins": 0, "num_words": 10, "num_utts": 2, "command": "./run.sh"}
    results = tmp_path / "r.jsonl"
    append_result(results, dict(base, test_set="dev"))
    append_result(results, dict(base, wer_delta=-1.0, wer_delta_low=-2.0, wer_delta_high=0.5,
                                p_improvement=0.9, baseline="exp/s/decode_test_ctc_greedy"))
    text = render_results_md(results, tmp_path / "RESULTS.md")
    dev, test = text.split("### test")
    assert BASELINE_LEGEND not in dev and "P(improvement)" not in dev
    assert test.index("| -1.00 [-2.00, +0.50] | 0.900 | exp/s |") < test.index(BASELINE_LEGEND) < test.index("Commands")
