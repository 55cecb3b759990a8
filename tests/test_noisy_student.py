"""Noisy-student self-training: the pseudo-label filter (every drop reason, the top fraction, the
rate check), relabelled cuts, the confidence score, the filter CLI's report, the results table's
columns, and the recipe's stage 9 at smoke size."""

import json
import math
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import kaldialign
import pytest
import torch
import torch.nn.functional as F
from lhotse import CutSet
from lhotse.testing.dummies import dummy_cut, dummy_supervision

from recipe_smoke import SMOKE, recipe_with_data, run_recipe
from sslasr.bin import pseudo_label
from sslasr.bin.score import read_kaldi_text
from sslasr.bin.decode import hypothesis_scores
from sslasr.data.pseudo_labels import FilterConfig, letters_per_second, median_rate, relabel, select
from sslasr.models.heads.attention import AttentionHead
from sslasr.models.heads.ctc import CtcHead, ctc_frames_needed
from sslasr.models.heads.transducer import TransducerHead
from sslasr.scoring import render_results_md
from sslasr.utils.config import load_config


def cut(i: int, seconds: float, text=None):
    c = dummy_cut(i, duration=seconds, supervisions=[dummy_supervision(i, duration=seconds, text=text)])
    return c


def test_select_counts_every_reason_and_keeps_the_best_scores():
    # labeled median rate 10 letters/s → kept rates within [5, 20] letters/s
    durations = {f"u{i}": 1.0 for i in range(10)}
    hyps = {"u1": "", "u2": "abc", "u3": "a" * 30, "u4": "abcd efgh", "u5": "abcd efgh ij",
            "u6": "abcdefghij", "u7": "abcdefghijk", "u8": "abcdefghijkl", "u9": "abcd efgh"}  # u0: no hypothesis
    scores = {"u4": -3.0, "u5": -0.5, "u6": -0.1, "u7": -0.2, "u8": -0.3}  # u9: none (was counted as low)
    cfg = FilterConfig(keep_fraction=0.5, min_score=-1.0, rate_ratio=(0.5, 2.0))
    kept, dropped = select(durations, hyps, scores, labeled_rate=10.0, cfg=cfg)
    assert dropped == {"no_hypothesis": 1, "too_short": 1, "too_slow": 1, "too_fast": 1, "no_score": 1,
                       "low_score": 1, "below_top_fraction": 2}
    # u5..u8 pass every check; the best ceil(0.5 × 4) = 2 by score are u6 (−0.1) and u7 (−0.2)
    assert kept == {"u6": "abcdefghij", "u7": "abcdefghijk"}
    assert sum(dropped.values()) + len(kept) == len(durations)


@pytest.mark.parametrize("fraction,candidates,kept", [(0.55, 100, 55), (0.55, 180, 99), (0.3, 10, 3), (0.3, 11, 4)])
def test_the_top_fraction_is_rounded_up_from_its_exact_value(fraction, candidates, kept):
    """0.55 × 100 is 55.000000000000007 in floating point: ceil kept 56."""
    durations = {f"u{i:03d}": 1.0 for i in range(candidates)}
    scores = {cut_id: -i / candidates for i, cut_id in enumerate(durations)}
    chosen, dropped = select(durations, {cut_id: "abcdefghij" for cut_id in durations}, scores,
                             labeled_rate=10.0, cfg=FilterConfig(keep_fraction=fraction))
    assert len(chosen) == kept and dropped == {"below_top_fraction": candidates - kept}


def test_select_without_thresholds_keeps_every_sane_hypothesis():
    durations = {"a": 2.0, "b": 2.0}
    kept, dropped = select(durations, {"a": "ab cd", "b": "abcd"}, {"a": -1.0, "b": float("-inf")},
                           labeled_rate=2.0, cfg=FilterConfig())
    assert kept == {"a": "ab cd"} and dropped["low_score"] == 1  # a −inf score (no alignment) is never kept


def test_filter_config_rejects_bad_settings():
    with pytest.raises(ValueError, match="unknown"):
        FilterConfig.from_dict({"keep_fraction": 0.9, "keep": 1})
    with pytest.raises(ValueError, match="keep_fraction"):
        FilterConfig.from_dict({"keep_fraction": 0.0})
    with pytest.raises(ValueError, match="rate_ratio"):
        FilterConfig.from_dict({"rate_ratio": [2.0, 1.0]})
    assert FilterConfig.from_dict({"rate_ratio": [0.3, 3]}).rate_ratio == (0.3, 3)
    # each of these passed, or failed with a message naming no setting: a NaN threshold kept every
    # hypothesis, min_letters 0 kept empty ones, one rate ratio was a bare unpacking error
    for bad, key in [({"min_score": float("nan")}, "min_score"), ({"min_score": True}, "min_score"),
                     ({"min_letters": -1}, "min_letters"), ({"min_letters": 1.5}, "min_letters"),
                     ({"rate_ratio": [0.5]}, "rate_ratio"), ({"rate_ratio": [0.5, float("nan")]}, "rate_ratio"),
                     ({"rate_ratio": 2.0}, "rate_ratio"), ({"rate_ratio": None}, "rate_ratio"),
                     ({"keep_fraction": "0.5"}, "keep_fraction"), ({"keep_fraction": float("nan")}, "keep_fraction")]:
        with pytest.raises(ValueError, match=key):
            FilterConfig.from_dict(bad)
    assert FilterConfig.from_dict({"min_score": -2, "min_letters": 3}).min_score == -2
    assert FilterConfig.from_dict({"min_letters": 0}).min_letters == 0  # empty hypotheses kept (a smoke test's)
    assert FilterConfig.from_dict({"min_letters": 2.0}).min_letters == 2  # (YAML's 2.0)


def test_median_rate_and_relabel():
    labeled = [cut(0, 2.0, "ab cd"), cut(1, 1.0, "abcdef"), cut(2, 4.0, "abcd")]
    assert median_rate(labeled) == pytest.approx(2.0)  # rates 2, 6 and 1 letters/s
    assert letters_per_second("a b", 0.5) == 4.0
    unlabeled = CutSet.from_cuts([cut(3, 1.0), cut(4, 1.0)])
    out = list(relabel(unlabeled, {"dummy-mono-cut-0004": "hello"}, {"dummy-mono-cut-0004": -0.25}))
    assert [c.id for c in out] == ["dummy-mono-cut-0004"]
    assert out[0].supervisions[0].text == "hello" and out[0].custom["pseudo_label_score"] == -0.25
    assert out[0].recording == unlabeled[1].recording  # the audio is untouched


def test_hypothesis_scores_are_the_ctc_log_likelihood_per_token():
    torch.manual_seed(0)
    head = CtcHead(input_dim=6, vocab_size=5).eval()
    hidden, lengths = torch.randn(2, 7, 6), torch.tensor([7, 5])
    hyps = [[1, 2, 2], []]
    scores = hypothesis_scores(head, hidden, lengths, hyps)
    for i, tokens in enumerate(hyps):
        log_probs = head.log_probs(hidden[i:i + 1, : lengths[i]]).detach()
        nll = F.ctc_loss(log_probs.transpose(0, 1), torch.tensor([tokens], dtype=torch.long).reshape(1, -1),
                         lengths[i:i + 1], torch.tensor([len(tokens)]), reduction="sum")
        assert scores[i] == pytest.approx(-nll.item() / (len(tokens) + 1), rel=1e-5)
    assert hypothesis_scores(head, hidden, lengths, [[1] * 8, [1]])[0] == -math.inf  # 8 tokens, 7 frames


def test_ctc_frames_needed_counts_a_blank_between_repeats():
    assert [ctc_frames_needed(t) for t in ([], [3], [1, 2, 3], [1, 1], [1, 1, 1], [1, 2, 2, 1], [2, 1, 2])] == [
        0, 1, 3, 3, 5, 5, 3]


def test_ctc_hypotheses_too_long_for_their_frames_score_minus_infinity():
    """On 3 frames "1 1" fits (1 blank 1) and "1 2 1" fits, each by a single path; "1 1 1" needs 5
    frames: its CTC loss is infinite, which zero_infinity would have turned into a perfect score 0."""
    torch.manual_seed(0)
    head = CtcHead(input_dim=4, vocab_size=3).eval()
    hidden, lengths = torch.randn(3, 3, 4), torch.tensor([3, 3, 3])
    hyps = [[1, 1], [1, 2, 1], [1, 1, 1]]
    scores = hypothesis_scores(head, hidden, lengths, hyps)
    for i in range(2):
        p = head.log_probs(hidden[i]).detach().exp()
        blank, one, two = p[:, 0], p[:, 1], p[:, 2]
        likelihood = one[0] * blank[1] * one[2] if i == 0 else one[0] * two[1] * one[2]  # the only path
        assert scores[i] == pytest.approx(float(likelihood.log()) / (len(hyps[i]) + 1), rel=1e-5)
    assert scores[2] == -math.inf


def test_attention_scores_need_ctc_frames_only_with_a_ctc_layer():
    """Joint CTC (ctc_weight 0.3): "1 1" on 2 frames is unalignable, −inf. Without a CTC layer the
    score is the attention log-likelihood per token, however many tokens a frame."""
    torch.manual_seed(0)
    small = {"embedding_dim": 4, "decoder_dim": 4, "decoder_layers": 1, "attention_dim": 4, "location_kernel": 3,
             "dropout": 0.0, "label_smoothing": 0.0}
    hidden, lengths = torch.randn(1, 2, 4), torch.tensor([2])
    joint = AttentionHead(4, 5, ctc_weight=0.3, **small).eval()
    assert hypothesis_scores(joint, hidden, lengths, [[2, 2]]) == [-math.inf]
    alone = AttentionHead(4, 5, ctc_weight=0.0, **small).eval()
    tokens = [2, 2, 3, 4]
    expected = float(alone.sequence_log_probs(hidden, lengths, [tokens])[0].detach()) / 5
    assert hypothesis_scores(alone, hidden, lengths, [tokens]) == [pytest.approx(expected, rel=1e-5)]


def test_transducer_scores_hypotheses_longer_than_their_frames():
    """One frame, two tokens: a transducer emits both on it, then a blank. The score is that single
    path's log-probability over 3 (tokens + end), not −inf."""
    torch.manual_seed(0)
    head = TransducerHead(4, 5, joiner_dim=6, predictor={"type": "stateless", "embed_dim": 4, "context_size": 1},
                          loss={"variant": "full"}).eval()
    hidden, lengths, tokens = torch.randn(1, 1, 4), torch.tensor([1]), [3, 4]
    predicted = head.joiner.predictor_proj(head.predictor(torch.tensor([[0, 3, 4]])))[0]  # g_0, g_1, g_2
    log_probs = head.joiner(head.joiner.encoder_proj(hidden[0, 0]), predicted).log_softmax(-1)  # (3 nodes, V)
    path = log_probs[0, 3] + log_probs[1, 4] + log_probs[2, 0]
    assert hypothesis_scores(head, hidden, lengths, [tokens]) == [pytest.approx(float(path.detach()) / 3, rel=1e-5)]


def test_a_pruned_transducer_scores_by_its_full_lattice_likelihood():
    """The pruned objective (0.5·simple + pruned) scored hypotheses before: one repeating a token
    more often than 2 frames × (prune_range − 1) hold got a pruned term of 0 and jumped to the top
    of the pseudo-label ranking. The score is log p(y|x) over the full lattice."""
    torch.manual_seed(0)
    options = dict(joiner_dim=6, predictor={"type": "stateless", "embed_dim": 4, "context_size": 1})
    pruned = TransducerHead(4, 5, loss={"variant": "pruned", "prune_range": 5}, **options).eval()
    full = TransducerHead(4, 5, loss={"variant": "full"}, **options).eval()
    full.load_state_dict(pruned.state_dict(), strict=False)  # the same joiner and predictor
    hidden, lengths = torch.randn(1, 2, 4), torch.tensor([2])
    hyps = [[3] * n for n in (8, 9, 10)]
    scores = [hypothesis_scores(pruned, hidden, lengths, [tokens])[0] for tokens in hyps]
    for tokens, score in zip(hyps, scores):
        nll = float(full.loss(hidden, lengths, [tokens]))
        assert score == pytest.approx(-nll / (len(tokens) + 1), rel=1e-5)
    training_loss_score = -float(pruned.loss(hidden, lengths, [hyps[1]])) / 10  # what ranked it before
    assert training_loss_score > scores[1] + 0.1


def test_an_utterance_without_frames_scores_minus_infinity():
    """Shorter than the encoder's receptive field: no frames, an empty hypothesis; the transducer's
    loss refused it and stopped the whole decode with --confidence."""
    torch.manual_seed(0)
    hidden, lengths = torch.randn(2, 3, 4), torch.tensor([3, 0])
    transducer = TransducerHead(4, 5, joiner_dim=6, predictor={"type": "stateless", "embed_dim": 4, "context_size": 1}).eval()
    for head in (transducer, CtcHead(input_dim=4, vocab_size=5).eval()):
        scores = hypothesis_scores(head, hidden, lengths, [[1], []])
        assert math.isfinite(scores[0]) and scores[1] == -math.inf


def test_attention_scores_are_the_joint_decoding_score_without_label_smoothing():
    torch.manual_seed(0)
    small = {"embedding_dim": 4, "decoder_dim": 4, "decoder_layers": 1, "attention_dim": 4, "location_kernel": 3,
             "dropout": 0.0, "label_smoothing": 0.1}
    head = AttentionHead(4, 5, ctc_weight=0.3, **small).eval()
    hidden, lengths, tokens = torch.randn(1, 6, 4), torch.tensor([6]), [2, 3, 4]
    # log p_att(y, <eos>) from the teacher-forced logits by plain cross entropy (no smoothing)
    logits, targets = head.teacher_forced_logits(hidden, lengths, [tokens])
    att = -float(F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100, reduction="sum"))
    ctc = -float(F.ctc_loss(head.ctc_log_probs(hidden).transpose(0, 1), torch.tensor([tokens]), lengths,
                            torch.tensor([3]), reduction="sum"))
    (score,) = hypothesis_scores(head, hidden, lengths, [tokens])
    assert score == pytest.approx((0.7 * att + 0.3 * ctc) / 4, rel=1e-5)
    smoothed = -float(head.loss(hidden, lengths, [tokens])) / 4  # the training loss, label-smoothed
    assert abs(score - smoothed) > 1e-4  # (50× the tolerance above)


def test_pseudo_label_cli_without_scores_says_to_decode_with_confidence(tmp_path: Path):
    """decode.py writes no scores.txt without --confidence: this stopped on a bare FileNotFoundError."""
    CutSet.from_cuts([cut(0, 1.0, "abcde")]).to_file(tmp_path / "cuts.jsonl.gz")
    (tmp_path / "decode").mkdir()
    (tmp_path / "decode/hyp.txt").write_text("x abc\n")
    with pytest.raises(SystemExit, match="no scores.txt: decode the pool with --confidence"):
        pseudo_label.main(["--cuts", str(tmp_path / "cuts.jsonl.gz"), "--decode-dir", str(tmp_path / "decode"),
                           "--labeled-cuts", str(tmp_path / "cuts.jsonl.gz"), "--report", str(tmp_path / "r.json")])


def test_pseudo_label_cli_writes_cuts_and_a_report(tmp_path: Path):
    """The pool's first cut carries its true transcript (train beyond the labeled subset), the
    others' truth is in --reference: the WERs use both, and the written cuts carry only hypotheses."""
    labeled = CutSet.from_cuts([cut(i, 1.0, "abcde") for i in range(3)])  # 5 letters/s
    unlabeled = CutSet.from_cuts([cut(10, 1.0, "abc dx")] + [cut(10 + i, 1.0) for i in range(1, 4)])
    labeled.to_file(tmp_path / "labeled.jsonl.gz")
    unlabeled.to_file(tmp_path / "unlabeled.jsonl.gz")
    ids = [c.id for c in unlabeled]
    decode = tmp_path / "decode"
    decode.mkdir()
    (decode / "hyp.txt").write_text(f"{ids[0]} abc de\n{ids[1]} abcd\n{ids[2]}\n{ids[3]} abcdefghijklmnopqrstu\n")
    (decode / "scores.txt").write_text(f"{ids[0]} -0.1\n{ids[1]} -0.2\n{ids[2]} -0.3\n{ids[3]} -0.4\n")
    # (ids[2]'s is id-only: no words, left out of the WERs as an empty supervision would be)
    (tmp_path / "reference").write_text(f"{ids[1]} abcd x\n{ids[2]}\n{ids[3]} q\n")
    (tmp_path / "ns.yaml").write_text("pseudo_label: {method: ctc_beam+lm, beam_size: 4, keep_fraction: 1.0, "
                                      "pool: [unlabeled, rest_of_train]}\n")
    pseudo_label.main(["--cuts", str(tmp_path / "unlabeled.jsonl.gz"), "--decode-dir", str(decode),
                       "--labeled-cuts", str(tmp_path / "labeled.jsonl.gz"), "--config", str(tmp_path / "ns.yaml"),
                       "--reference", str(tmp_path / "reference"), "--out-cuts", str(tmp_path / "out.jsonl.gz"),
                       "--report", str(tmp_path / "report.json")])
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["kept"] == 2 and report["dropped"]["too_short"] == 1 and report["dropped"]["too_fast"] == 1
    assert report["kept_seconds"] == 2.0 and report["labeled_letters_per_second"] == 5.0
    # all: 1 + 1 + 1 errors over 2 + 2 + 1 words; kept (ids 0 and 1): 2 errors over 4 words
    assert report["num_references"] == 3
    assert report["wer_all"] == pytest.approx(100 * 3 / 5, abs=0.01) and report["wer_kept"] == 50.0
    out = CutSet.from_file(tmp_path / "out.jsonl.gz")
    assert {c.id: c.supervisions[0].text for c in out} == {ids[0]: "abc de", ids[1]: "abcd"}


def test_the_validation_set_is_filtered_at_the_pools_score_cutoff(tmp_path: Path):
    """keep_fraction ranked the validation set on its own: its reported pseudo-label WER was that of
    its own top fraction, whatever score the pool's filter had ended at."""
    labeled = CutSet.from_cuts([cut(i, 1.0, "abcde") for i in range(3)])
    labeled.to_file(tmp_path / "labeled.jsonl.gz")
    (tmp_path / "ns.yaml").write_text("pseudo_label: {keep_fraction: 0.5}\n")

    def run(name: str, first: int, scores: list, *extra: str) -> dict:
        cuts = CutSet.from_cuts([cut(first + i, 1.0, "abcde") for i in range(len(scores))])
        cuts.to_file(tmp_path / f"{name}.jsonl.gz")
        decode = tmp_path / f"decode_{name}"
        decode.mkdir()
        ids = [c.id for c in cuts]
        (decode / "hyp.txt").write_text("".join(f"{i} abcde\n" for i in ids))
        (decode / "scores.txt").write_text("".join(f"{i} {s}\n" for i, s in zip(ids, scores)))
        pseudo_label.main(["--cuts", str(tmp_path / f"{name}.jsonl.gz"), "--decode-dir", str(decode),
                           "--labeled-cuts", str(tmp_path / "labeled.jsonl.gz"), "--config", str(tmp_path / "ns.yaml"),
                           "--report", str(tmp_path / f"report_{name}.json"), *extra])
        return json.loads((tmp_path / f"report_{name}.json").read_text())

    pool = run("pool", 10, [-2.0, -1.5, -1.2, -1.1])
    assert pool["kept"] == 2 and pool["score_cutoff"] == -1.2
    dev = run("dev", 20, [-1.3, -1.0, -0.9, -0.8, -0.7], "--score-cutoff-of", str(tmp_path / "report_pool.json"))
    assert dev["kept"] == 4 and dev["dropped"]["low_score"] == 1 and dev["dropped"]["below_top_fraction"] == 0
    assert run("alone", 30, [-1.3, -1.0, -0.9, -0.8, -0.7])["kept"] == 3  # its own top half
    (tmp_path / "ns.yaml").write_text("pseudo_label: {min_score: -1.6}\n")  # no fraction: the threshold itself
    assert run("pool_all", 40, [-2.0, -1.5, -1.2])["score_cutoff"] == -1.6


def test_results_table_shows_pseudo_label_columns_only_with_students(tmp_path: Path):
    base = {"corpus": "c", "test_set": "test", "frontend": "wav2vec2", "head": "ctc", "decoding": "ctc_greedy",
            "lm_weight": 0, "labeled_seconds": 600, "pretrained": True, "sub": 1, "del": 0, "ins": 0,
            "num_words": 10, "num_utts": 2, "command": "./run.sh"}
    rows = [dict(base, generation=0, wer=10.0),
            dict(base, generation=1, wer=8.0, pseudo_label_seconds=3600, pseudo_label_wer=12.5)]
    (tmp_path / "r.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    table = render_results_md(tmp_path / "r.jsonl", tmp_path / "R.md").splitlines()
    header = next(line for line in table if line.startswith("| #"))
    assert "| generation | pseudo-labeled | pseudo-label WER % | WER % |" in header
    assert any("| 1 | 1 h | 12.5 | 8.00 |" in line for line in table)
    assert any("| 0 | - | - | 10.00 |" in line for line in table)
    (tmp_path / "r0.jsonl").write_text(json.dumps(rows[0]) + "\n")
    assert "pseudo-label" not in render_results_md(tmp_path / "r0.jsonl", tmp_path / "R0.md")


def test_results_table_shows_the_validation_set_pseudo_label_wer(tmp_path: Path):
    """An unlabeled pool without true text (speechocean762): the row's pseudo-label WER is null,
    and the same teacher and filter's WER on the validation set gets its own column."""
    row = {"corpus": "c", "test_set": "test", "frontend": "w2vbert", "head": "ctc", "decoding": "ctc_greedy",
           "lm_weight": 0, "labeled_seconds": 600, "pretrained": True, "generation": 1, "wer": 8.0,
           "sub": 1, "del": 0, "ins": 0, "num_words": 10, "num_utts": 2, "command": "./run.sh",
           "pseudo_label_seconds": 960, "pseudo_label_wer": None, "pseudo_label_dev_wer": 55.25}
    (tmp_path / "r.jsonl").write_text(json.dumps(row) + "\n")
    table = render_results_md(tmp_path / "r.jsonl", tmp_path / "R.md").splitlines()
    header = next(line for line in table if line.startswith("| #"))
    assert "| generation | pseudo-labeled | pseudo-label WER % | pseudo-label WER % (dev) | WER % |" in header
    assert any("| 1 | 16 min | - | 55.25 | 8.00 |" in line for line in table)


@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng is not installed")
def test_recipe_noisy_student_generation(tmp_path: Path, prepared_minisynth: Path):
    """Stage 9 at smoke size, 30 s labeled: the pretrained teacher labels the pool (the 40
    unlabeled cuts and the train cuts beyond the labeled 30 s), the filter's counts add up, the
    search's LM has read only the labeled transcripts, the student trains on labels + kept
    pseudo-labels (never the withheld transcripts) with its noise and gets a results row per
    (set, method) with generation 1 and the pseudo-labels' WER."""
    recipe = recipe_with_data(tmp_path, prepared_minisynth)
    # a teacher of 4 updates writes (nearly) empty hypotheses: here, keep them all
    conf = recipe / "conf/noisy_student.yaml"
    settings = conf.read_text().replace("rate_ratio: [0.5, 2.0]", "rate_ratio: [0.0, 1000.0]")
    conf.write_text(settings.replace("min_letters: 1", "min_letters: 0"))
    # a filter for this labeled amount, merged over noisy_student.yaml (as speechocean762's 1 h one)
    (recipe / "conf/noisy_student_30.yaml").write_text("pseudo_label:\n  keep_fraction: 1.0\n")
    result = run_recipe(recipe, *SMOKE, "--labeled", "30", "--compare-scratch", "false", "--generations", "1",
                        timeout=1200)
    assert result.returncode == 0, result.stderr[-4000:]
    labels = recipe / "exp/noisy_student_ctc_wav2vec2_30/gen1/pseudo_labels"
    train = CutSet.from_file(recipe / "data/manifests/minisynth_cuts_train.jsonl.gz")
    labeled = CutSet.from_file(recipe / "data/manifests/minisynth_cuts_train_30.jsonl.gz")
    rest = CutSet.from_file(labels / "rest_of_train.jsonl.gz")
    assert 0 < len(labeled) < 40 and sorted(rest.ids) == sorted(set(train.ids) - set(labeled.ids))
    report = json.loads((labels / "report.json").read_text())
    assert report["num_cuts"] == 40 + len(rest) and report["kept"] + sum(report["dropped"].values()) == 40 + len(rest)
    assert report["filter"]["keep_fraction"] == 1.0 and report["dropped"]["below_top_fraction"] == 0
    # the truth of every pool cut is known: minisynth keeps the unlabeled text aside, the rest carries its own
    assert report["num_references"] == 40 + len(rest)
    corpus_dir = Path((recipe / "data/corpus_dir").read_text().strip())
    references = {c.id: c.supervisions[0].text for c in rest}
    references.update(read_kaldi_text(corpus_dir / "unlabeled/text.reference"))
    pool_hyps = read_kaldi_text(labels / "decode_unlabeled/hyp.txt")


    def wer(cuts) -> float:  # by kaldialign itself, not through sslasr.scoring
        errors = sum(kaldialign.edit_distance(references[c].split(), pool_hyps.get(c, "").split())["total"]
                     for c in cuts)
        return 100 * errors / sum(len(references[c].split()) for c in cuts)

    assert report["wer_all"] == pytest.approx(wer(references), abs=0.01)
    kept = set(CutSet.from_file(labels / "student_train.jsonl.gz").ids) - set(labeled.ids)
    assert len(kept) == report["kept"] and report["wer_kept"] == pytest.approx(wer(kept), abs=0.01)
    student_cuts = CutSet.from_file(labels / "student_train.jsonl.gz")
    assert len(student_cuts) == len(labeled) + report["kept"]
    hyps = read_kaldi_text(labels / "decode_unlabeled/hyp.txt")
    truth = {c.id: c.supervisions[0].text for c in train}
    for c in student_cuts:
        expected = truth[c.id] if c.id in set(labeled.ids) else hyps[c.id]
        assert c.supervisions[0].text == expected, c.id  # pseudo-labels only, even where the truth is known
    # the search's LM and lexicon have read the labeled transcripts only, not the rest of train's
    lm_dirs = list((recipe / "exp").glob("lm_*_labeled_30"))
    assert len(lm_dirs) == 1 and (lm_dirs[0] / "model_final.pt").is_file()
    lm_cfg = load_config(lm_dirs[0] / "config.yaml")
    assert Path(lm_cfg["data"]["train_text"]).name == "minisynth_cuts_train_30.jsonl.gz"  # not all of train
    labeled_words = {w for c in labeled for w in c.supervisions[0].text.split()}
    assert set((lm_dirs[0] / "words.txt").read_text().split()) == labeled_words
    info = json.loads((labels / "decode_unlabeled/decode_info.json").read_text())
    assert Path(info["lm"]).parent.name == lm_dirs[0].name
    student_cfg = load_config(recipe / "exp/noisy_student_ctc_wav2vec2_30/gen1/config.yaml")
    assert student_cfg["frontend"]["encoder"]["mask"]["time_prob"] > 0  # the student's noise
    assert student_cfg["pseudo_label"]["keep_fraction"] == 1.0  # the filter it was trained behind
    assert student_cfg["finetune"]["init_from"].endswith("pretrain_wav2vec2/model_final.pt")

    rows = [json.loads(line) for line in (recipe / "exp/results.jsonl").read_text().splitlines()]
    students = [r for r in rows if r["generation"] == 1]
    assert sorted((r["test_set"], r["decoding"]) for r in students) == sorted(
        (s, d) for s in ("dev", "test") for d in ("ctc_greedy", "ctc_beam", "ctc_beam+lm"))
    for row in students:
        assert row["pseudo_label_seconds"] == report["kept_seconds"] and row["pretrained"] is True
        assert row["pseudo_label_wer"] == report["wer_kept"] and row["teacher"] == "exp/ctc_wav2vec2_30"
        # and the paired bootstrap against the teacher's decode of the same set and method
        teacher = next(r for r in rows if r["generation"] == 0 and r["test_set"] == row["test_set"]
                       and r["decoding"] == row["decoding"])
        assert row["baseline"].startswith("exp/ctc_wav2vec2_30/decode_")
        assert row["wer_delta"] == pytest.approx(row["wer"] - teacher["wer"], abs=1e-3)
    assert "pseudo-label WER %" in (recipe / "RESULTS.md").read_text()

    # the teacher trained again (as --force would): stage 9 labels the pool and trains the student
    # again instead of keeping the old teacher's (it used to keep them)
    student = recipe / "exp/noisy_student_ctc_wav2vec2_30/gen1"
    before = {p: p.stat().st_mtime_ns for p in (labels / ".done", student / "model_final.pt")}
    teacher_model = recipe / "exp/ctc_wav2vec2_30/model_final.pt"
    later = time.time() + 2
    os.utime(teacher_model, (later, later))
    result = run_recipe(recipe, *SMOKE, "--labeled", "30", "--compare-scratch", "false", "--generations", "1",
                        "--stage", "9", "--stop-stage", "9", timeout=1200)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "exp/ctc_wav2vec2_30 changed after its pseudo-labels were made" in result.stderr
    assert all(p.stat().st_mtime_ns > before[p] for p in before)

    # the same when the search's LM was trained again (e.g. on more --lm-text): it used to warn only
    before = {p: p.stat().st_mtime_ns for p in before}
    later = time.time() + 2
    os.utime(lm_dirs[0] / ".done", (later, later))
    result = run_recipe(recipe, *SMOKE, "--labeled", "30", "--compare-scratch", "false", "--generations", "1",
                        "--stage", "9", "--stop-stage", "9", timeout=1200)
    assert result.returncode == 0, result.stderr[-4000:]
    assert f"exp/{lm_dirs[0].name} (the ctc_beam+lm search's LM and lexicon) changed after its pseudo-labels " \
           "were made: labelling and training the student again" in result.stderr
    assert all(p.stat().st_mtime_ns > before[p] for p in before)


def test_student_rows_read_against_the_teacher_run_that_taught_them(tmp_path: Path):
    """The teacher's exp is rerun after its student was scored: the table's teacher row shows the
    rerun, the student row keeps the WER of the run that labelled its data (same set and method)."""
    base = {"corpus": "c", "frontend": "w2vbert", "head": "ctc", "lm_weight": 0, "labeled_seconds": 600,
            "pretrained": True, "sub": 1, "del": 0, "ins": 0, "num_words": 10, "num_utts": 2,
            "command": "./run.sh"}
    teacher, student = dict(base, generation=0, exp="exp/t"), dict(base, generation=1, exp="exp/s", teacher="exp/t")
    rows = [dict(teacher, test_set="test", decoding="ctc_greedy", wer=30.0),
            dict(teacher, test_set="test", decoding="ctc_beam", wer=20.0),
            dict(teacher, test_set="dev", decoding="ctc_beam", wer=25.0),
            dict(student, test_set="test", decoding="ctc_greedy", wer=28.0),
            dict(student, test_set="test", decoding="ctc_beam", wer=19.0),
            dict(teacher, test_set="test", decoding="ctc_beam", wer=15.0)]  # the teacher rerun
    (tmp_path / "r.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    table = render_results_md(tmp_path / "r.jsonl", tmp_path / "R.md").split("### test")[1].splitlines()
    header = next(line for line in table if line.startswith("| #"))
    assert "| generation | teacher WER % | WER % |" in header
    assert any("| ctc_beam | 0 | 10 min | 1 | 20.00 | 19.00 |" in line for line in table)
    assert any("| ctc_greedy | 0 | 10 min | 1 | 30.00 | 28.00 |" in line for line in table)
    assert any("| ctc_beam | 0 | 10 min | 0 | - | 15.00 |" in line for line in table)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_nodes_train_the_noisy_student_together(tmp_path: Path, prepared_minisynth: Path):
    """Stage 9 with a two-node --launcher (both "nodes" on this machine, torchrun's c10d
    rendezvous): node 0 decodes the teacher and labels the pool while node 1 waits; both ranks
    train the student (rank 1's log in its exp dir); node 0 alone decodes and scores it."""
    recipe = recipe_with_data(tmp_path, prepared_minisynth)
    opts = [*SMOKE, "--labeled", "30", "--compare-scratch", "false"]
    trained = run_recipe(recipe, *opts, "--stage", "4", "--stop-stage", "6", timeout=600)
    assert trained.returncode == 0, trained.stderr[-4000:]
    env = dict(os.environ, SSLASR_PYTHON=sys.executable, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    launcher = f"torchrun --nnodes 2 --master_addr 127.0.0.1 --master_port {_free_port()} --nproc_per_node 1 --node_rank"
    nodes = [subprocess.Popen(["./run.sh", *opts, "--stage", "7", "--generations", "1", "--launcher", f"{launcher} {rank}"],
                              cwd=recipe, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for rank in (1, 0)]
    try:
        logs = [node.communicate(timeout=600)[1] for node in nodes]
    finally:
        for node in nodes:
            node.kill()
    assert [node.returncode for node in nodes] == [0, 0], logs[1][-3000:] + logs[0][-3000:]
    assert "node 1: generation 1: training the noisy student" in logs[0]
    student = recipe / "exp/noisy_student_ctc_wav2vec2_30/gen1"
    assert (student / "train.rank0.log").exists() and (student / "train.rank1.log").exists()  # a world of two
    rows = [json.loads(line) for line in (recipe / "exp/results.jsonl").read_text().splitlines()]
    assert len([r for r in rows if r["generation"] == 1]) == 6  # {dev, test} x 3 methods, once (node 0's)
    assert not (recipe / "exp/noisy_student_ctc_wav2vec2_30/.node0_failed").exists()
