"""Scoring: WER parity with jiwer, missing hypotheses, results jsonl, RESULTS.md, CLIs.

About comparing with jiwer: kaldialign and jiwer both compute a minimum-edit-distance
(Levenshtein, unit costs) alignment, but when several alignments have the same cost they
may pick different ones, e.g. ref "a b" / hyp "b a" is either 2 substitutions or
1 deletion + 1 insertion. What every minimum alignment shares is:
  * the total error count S + D + I (it is the edit distance), hence the WER;
  * D - I = len(ref) - len(hyp) (hits + S + D = len(ref) and hits + S + I = len(hyp)).
So those are compared exactly. S, D and I individually are fixed only when S must be 0,
i.e. when the edit distance equals |len(ref) - len(hyp)| (which covers empty hyp, empty
ref and identical pairs); there they are compared exactly too.
"""

import json
import math
import random
import subprocess
import sys
from pathlib import Path

import jiwer
import pytest

from sslasr.bin import render_results, score
from sslasr.scoring import (
    REQUIRED_RESULT_KEYS,
    ErrorCounts,
    align_counts,
    append_result,
    archive_results,
    human_duration,
    read_results,
    render_results_md,
    score_corpus,
    write_errors_file,
)

REPO = Path(__file__).resolve().parents[1]

HANDPICKED_PAIRS = [
    ("the cat sat on the mat", "the cat sat on the mat"),  # identical
    ("the cat sat", ""),  # empty hyp: all deletions
    ("", "oh no"),  # empty ref: all insertions
    ("a", "a b c d"),  # insertions only
    ("a b c d", "b d"),  # deletions only
    ("a b c d e", "a x c e f"),  # sub + del + ins
    ("a b", "b a"),  # ambiguous: 2 sub or 1 del + 1 ins
    ("one two three four five six", "one too three for five sticks seven"),
    ("x", "y"),
    ("  spaced   out  words ", "spaced out words"),  # whitespace is not a word
]


def random_pairs(n: int, seed: int = 1234) -> list[tuple[str, str]]:
    # A small vocabulary makes chance matches, and so ambiguous alignments, frequent.
    rng = random.Random(seed)
    vocab = ["a", "b", "c", "d", "e", "the", "of"]

    def sentence() -> str:
        return " ".join(rng.choice(vocab) for _ in range(rng.randint(0, 12)))

    return [(sentence(), sentence()) for _ in range(n)]


ALL_PAIRS = HANDPICKED_PAIRS + random_pairs(250)


def assert_matches_jiwer(ours: ErrorCounts, refs: list[str], hyps: list[str]) -> None:
    theirs = jiwer.process_words(refs, hyps)
    their_errors = theirs.substitutions + theirs.deletions + theirs.insertions
    their_ref_words = theirs.hits + theirs.substitutions + theirs.deletions
    assert ours.ref_words == their_ref_words
    assert ours.errors == their_errors
    assert ours.dels - ours.ins == theirs.deletions - theirs.insertions
    if their_ref_words:
        assert ours.wer == pytest.approx(100 * theirs.wer, rel=1e-12)
    if ours.errors == abs(ours.ref_words - len(" ".join(hyps).split())):
        # Substitution-free: the split into sub/del/ins is unique.
        assert (ours.sub, ours.dels, ours.ins) == (
            theirs.substitutions, theirs.deletions, theirs.insertions,
        )  # fmt: skip


@pytest.mark.parametrize("ref,hyp", HANDPICKED_PAIRS)
def test_handpicked_pairs_match_jiwer(ref, hyp):
    assert_matches_jiwer(align_counts(ref.split(), hyp.split()), [ref], [hyp])


def test_random_pairs_match_jiwer_per_pair_and_corpus():
    assert len(ALL_PAIRS) >= 200
    total = ErrorCounts()
    for ref, hyp in ALL_PAIRS:
        counts = align_counts(ref.split(), hyp.split())
        assert_matches_jiwer(counts, [ref], [hyp])
        total = total + counts
    refs, hyps = zip(*ALL_PAIRS)
    assert_matches_jiwer(total, list(refs), list(hyps))

    corpus_total, _ = score_corpus(
        {f"u{i:04d}": r for i, r in enumerate(refs)}, {f"u{i:04d}": h for i, h in enumerate(hyps)}
    )
    assert corpus_total == total


def test_unambiguous_counts_are_exact():
    assert align_counts("a b c".split(), []) == ErrorCounts(sub=0, dels=3, ins=0, ref_words=3)
    assert align_counts([], "a b".split()) == ErrorCounts(sub=0, dels=0, ins=2, ref_words=0)
    assert align_counts(["x"], ["y"]) == ErrorCounts(sub=1, dels=0, ins=0, ref_words=1)
    c = align_counts("a b c d e".split(), "a x c e f".split())
    assert (c.errors, c.corr, c.wer) == (3, 3, 60.0)


def test_star_is_an_ordinary_word():
    # "*" is the display epsilon; as a real word it must still be scored correctly.
    assert align_counts(["*", "a"], ["*", "a"]).errors == 0
    assert align_counts(["*"], ["b"]) == ErrorCounts(sub=1, ref_words=1)


def test_case_is_not_normalised():
    assert align_counts(["Hello"], ["hello"]).sub == 1


def test_missing_hyp_scored_as_deletions_and_reported(tmp_path, caplog):
    refs = {"u1": "a b c", "u2": "d e", "u3": "f"}
    hyps = {"u1": "a b c", "u3": ""}  # u2 missing; u3 present but empty
    with caplog.at_level("WARNING"):
        total, per_utt = score_corpus(refs, hyps)
    assert total == ErrorCounts(sub=0, dels=3, ins=0, ref_words=6)
    assert [u.utt_id for u in per_utt if u.missing_hyp] == ["u2"]
    assert "1 of 3 utterances have no hypothesis" in caplog.text

    write_errors_file(tmp_path / "errors.txt", per_utt)
    text = (tmp_path / "errors.txt").read_text()
    assert text.splitlines()[0] == "%WER 50.00 [ 3 / 6, 0 ins, 3 del, 0 sub ]"
    assert "u2:\thyp=[]  (MISSING: no hypothesis)" in text
    assert "u2:\t(d->*) (e->*)" in text
    assert "of which 1 had no hypothesis" in text


def test_hyp_without_ref_is_an_error():
    with pytest.raises(ValueError, match="no reference"):
        score_corpus({"u1": "a"}, {"u1": "a", "stray": "b"})


def test_errors_file_layout(tmp_path):
    _, per_utt = score_corpus(
        {"u1": "a b c", "u2": "a b c"}, {"u1": "a x c d", "u2": "a x"}
    )
    write_errors_file(tmp_path / "errors.txt", per_utt)
    lines = (tmp_path / "errors.txt").read_text().splitlines()
    assert lines[0] == "%WER 66.67 [ 4 / 6, 1 ins, 1 del, 2 sub ]"
    assert "u1:\tref=['a', 'b', 'c']" in lines
    assert "u1:\thyp=['a', 'x', 'c', 'd']" in lines
    assert "u1:\ta (b->x) c (*->d)" in lines
    subs = lines.index("SUBSTITUTIONS: count ref -> hyp")
    assert lines[subs + 1] == "2\tb -> x"
    assert lines[lines.index("DELETIONS: count ref") + 1] == "1\tc"
    assert lines[lines.index("INSERTIONS: count hyp") + 1] == "1\td"
    assert not list(tmp_path.glob(".*tmp*"))  # atomic write left no temp file


# --------------------------------------------------------------------------- results


def make_row(**overrides):
    row = {
        "corpus": "librispeech", "test_set": "test-clean", "frontend": "wav2vec2",
        "head": "ctc", "decoding": "greedy", "lm_weight": None, "labeled_seconds": 3600,
        "pretrained": True, "generation": 1, "wer": 12.5, "sub": 10, "del": 3, "ins": 2,
        "num_words": 120, "num_utts": 10, "command": "python -m sslasr.bin.decode --x 1",
    }  # fmt: skip
    row.update(overrides)
    return row


def test_append_result_names_missing_keys(tmp_path):
    row = make_row()
    del row["lm_weight"], row["command"]
    with pytest.raises(ValueError, match="lm_weight, command"):
        append_result(tmp_path / "r.jsonl", row)
    assert not (tmp_path / "r.jsonl").exists()


def test_append_result_adds_timestamp_and_appends(tmp_path):
    path = tmp_path / "r.jsonl"
    append_result(path, make_row())
    append_result(path, make_row(wer=11.0, timestamp="2024-01-01T00:00:00+00:00"))
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(rows) == 2
    assert "T" in rows[0]["timestamp"]
    assert rows[1]["timestamp"] == "2024-01-01T00:00:00+00:00"


def test_a_result_rescored_after_a_kill_is_not_appended_twice(tmp_path):
    """Killed between score.py's append and the stage's done mark, the rerun scores the same
    result again: the experiment's latest row already says so (timestamp aside), so nothing is
    appended and the first row is returned. Rows of other experiments in between change nothing."""
    path = tmp_path / "r.jsonl"
    first = append_result(path, make_row(timestamp="2024-01-01T00:00:00+00:00"))
    append_result(path, make_row(test_set="test-other", wer=20.0))
    again = append_result(path, make_row(timestamp="2024-01-02T00:00:00+00:00"))
    assert again == first and again["timestamp"] == "2024-01-01T00:00:00+00:00"
    assert [(r["test_set"], r["wer"]) for r in read_results(path)] == [("test-clean", 12.5), ("test-other", 20.0)]
    assert len(path.read_text().splitlines()) == 2


def test_a_result_differing_in_any_field_or_no_longer_the_latest_is_appended(tmp_path):
    """Another value than the timestamp is another result; and a result that a later row of the
    same experiment replaced is appended again, so that it is the latest (RESULTS.md shows it)."""
    path = tmp_path / "r.jsonl"
    append_result(path, make_row(timestamp="2024-01-01T00:00:00+00:00"))
    append_result(path, make_row(command="python -m sslasr.bin.decode --x 2"))  # same WER, another run
    append_result(path, make_row(timestamp="2024-01-03T00:00:00+00:00"))        # the first result, again
    assert [r["command"][-1] for r in read_results(path)] == ["1", "2", "1"]
    assert read_results(path)[-1]["timestamp"] == "2024-01-03T00:00:00+00:00"


def test_human_duration():
    assert human_duration(600) == "10 min"
    assert human_duration(1800) == "30 min"
    assert human_duration(3600) == "1 h"
    assert human_duration(36000) == "10 h"
    assert human_duration(5400) == "1.5 h"
    assert human_duration(45) == "45 s"
    assert human_duration(None) == "all"


def test_render_dedups_latest_wins_and_shows_commands(tmp_path):
    path = tmp_path / "results.jsonl"
    append_result(path, make_row(wer=20.0, command="cmd-old"))
    append_result(path, make_row(labeled_seconds=1800, wer=30.0, command="cmd-30min"))
    append_result(path, make_row(wer=11.25, command="cmd-new"))  # same key as the first
    append_result(path, make_row(test_set="test-other", wer=25.0, command="cmd-other"))
    append_result(path, make_row(corpus="tedlium", wer=15.0, command="cmd | with pipe"))

    text = render_results_md(path, tmp_path / "RESULTS.md", title="My results")
    assert (tmp_path / "RESULTS.md").read_text() == text
    assert text.startswith("# My results\n")
    assert "Generated by `python -m sslasr.bin.render_results` from" in text
    assert "do not edit by hand" in text
    assert "11.25" in text and "cmd-new" in text
    assert "20.00" not in text and "cmd-old" not in text
    for cmd in ("cmd-30min", "cmd-other", "cmd | with pipe"):
        assert cmd in text
    assert text.index("## librispeech") < text.index("## tedlium")
    assert text.index("### test-clean") < text.index("### test-other")
    # Within a table: 30 min before 1 h.
    clean = text[text.index("### test-clean"): text.index("### test-other")]
    assert clean.index("| 30 min |") < clean.index("| 1 h |")
    assert "```bash" in clean


def test_a_rerun_in_the_same_exp_dir_on_a_redrawn_subset_replaces_its_row(tmp_path):
    """labeled_seconds is measured: a system retrained in its exp dir on a redrawn subset of about
    the same size got another key, both rows stayed in the table, and the summary (one row per exp
    dir) showed whichever sorted last by labeled_seconds, here the stale one."""
    path = tmp_path / "results.jsonl"
    append_result(path, make_row(exp="exp/ctc_1h", labeled_seconds=3601.57, wer=90.0, timestamp="2026-01-01T00:00:00"))
    append_result(path, make_row(exp="exp/ctc_1h", labeled_seconds=3598.2, wer=70.0, timestamp="2026-02-01T00:00:00"))
    text = render_results_md(path, tmp_path / "RESULTS.md")
    assert "70.00" in text and "90.00" not in text
    assert "**70.00**" in text  # the summary's


def test_summary_has_one_row_per_system_and_one_column_per_method(tmp_path):
    path = tmp_path / "results.jsonl"
    rows = [("exp/scratch", False, "ctc_greedy", 40.0), ("exp/scratch", False, "ctc_beam+lm", 30.0),
            ("exp/ssl", True, "ctc_beam+lm", 20.5), ("exp/ssl", True, "ctc_greedy", 35.0),
            ("exp/ssl", True, "ctc_beam", 34.0), ("exp/ssl", True, "ctc_greedy", 33.25)]  # a rerun
    for exp, pretrained, decoding, wer in rows:
        append_result(path, make_row(exp=exp, pretrained=pretrained, decoding=decoding, wer=wer,
                                     frontend="wav2vec2" if pretrained else "none"))
    text = render_results_md(path, tmp_path / "RESULTS.md")
    summary = text[text.index("WER % by system"):text.index("Every result")]
    lines = [line for line in summary.splitlines() if line.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    # greedy, beam, then the LM methods (the head's prefix dropped); the system's names before, exp last
    assert header == ["labeled", "frontend", "pretrained", "head", "generation",
                      "greedy", "beam", "beam+lm", "exp"]
    body = {cells[-1]: cells for cells in ([c.strip() for c in line.strip("|").split("|")]
                                           for line in lines[2:])}
    assert len(lines) == 4 and set(body) == {"exp/scratch", "exp/ssl"}
    assert body["exp/scratch"][5:8] == ["40.00", "-", "30.00"]
    assert body["exp/ssl"][5:8] == ["**33.25**", "**34.00**", "**20.50**"]  # latest greedy; column minima bold
    assert body["exp/ssl"][:5] == ["1 h", "wav2vec2", "yes", "ctc", "1"]


def test_parameters_column_only_where_a_row_has_the_model_size(tmp_path):
    path = tmp_path / "results.jsonl"
    append_result(path, make_row(wer=20.0, exp="exp/old", model_parameters=None))  # decoded before sizes were kept
    without = render_results_md(path, tmp_path / "RESULTS.md")
    assert "| parameters |" not in without
    append_result(path, make_row(wer=18.0, exp="exp/medium", model_parameters=9_681_234))
    table = render_results_md(path, tmp_path / "RESULTS.md")
    header = next(line for line in table.splitlines() if line.startswith("| # |"))
    cells = [c.strip() for c in header.split("|")]
    assert cells[cells.index("frontend") + 1] == "parameters"
    medium = next(line for line in table.splitlines() if "exp/medium" in line)
    old = next(line for line in table.splitlines() if "exp/old" in line)
    assert "| 9.68M |" in medium and "| 9.68M |" not in old
    assert [c.strip() for c in old.split("|")][cells.index("parameters")] == "-"


def test_archive_keeps_earlier_runs_rows_once(tmp_path):
    archive = tmp_path / "RESULTS.jsonl"
    run1, run2 = tmp_path / "run1.jsonl", tmp_path / "run2.jsonl"  # two machines' exp/results.jsonl
    append_result(run1, make_row(exp="exp/ctc_hubert_all", wer=12.0, command="./run.sh --frontend hubert"))
    append_result(run2, make_row(exp="exp/ctc_wavlm_all", wer=9.5, command="./run.sh --frontend wavlm"))
    assert archive_results(run1, archive) == 1
    assert archive_results(run1, archive) == 0  # a rerun of stage 10 adds nothing twice
    assert archive_results(run2, archive) == 1
    assert [row["exp"] for row in read_results(archive)] == ["exp/ctc_hubert_all", "exp/ctc_wavlm_all"]
    text = render_results_md(archive, tmp_path / "RESULTS.md")
    assert "12.00" in text and "9.50" in text  # run 1's row outlives its exp/ directory

    (tmp_path / "bad.jsonl").write_text('{"wer": 1}\n')
    with pytest.raises(ValueError, match="missing required key"):
        archive_results(tmp_path / "bad.jsonl", archive)
    assert len(read_results(archive)) == 2  # nothing written on failure

    # stage 10 on a checkout with the archive but a fresh exp/: rendered from the archive alone
    (tmp_path / "RESULTS.md").unlink()
    render_results.main(["--results", str(tmp_path / "exp/results.jsonl"), "--archive", str(archive),
                         "--out", str(tmp_path / "RESULTS.md")])
    assert "12.00" in (tmp_path / "RESULTS.md").read_text() and len(read_results(archive)) == 2


def test_an_out_of_date_results_file_merged_later_does_not_replace_a_newer_row(tmp_path):
    """Machine B's exp/results.jsonl holds a January result; the archive pulled from machine A has
    the same experiment's March one. Rendering on B merges B's row after A's: the March row must
    stay the system's result (file order made the older row the latest), and a noisy student
    reads against the teacher run before it in time."""
    archive, stale = tmp_path / "RESULTS.jsonl", tmp_path / "results.jsonl"
    append_result(archive, make_row(exp="exp/ctc_1h", wer=5.0, timestamp="2025-03-01T10:00:00+00:00"))
    append_result(archive, make_row(exp="exp/noisy_student/gen1", wer=4.0, teacher="exp/ctc_1h",
                                    timestamp="2025-03-02T10:00:00+00:00"))
    append_result(stale, make_row(exp="exp/ctc_1h", wer=20.0, timestamp="2025-01-01T10:00:00+00:00"))
    assert archive_results(stale, archive) == 1
    rows = read_results(archive)
    assert [row["wer"] for row in rows] == [20.0, 5.0, 4.0]  # in run order
    text = render_results_md(archive, tmp_path / "RESULTS.md")
    summary = next(line for line in text.splitlines() if "| exp/ctc_1h |" in line)
    assert "5.00" in summary and "20.00" not in summary
    student = next(line for line in text.splitlines() if "exp/noisy_student/gen1" in line and "| 4.00 |" in line)
    assert "| 5.00 |" in student  # its teacher's WER: the March run's


def test_render_exp_column_is_part_of_the_key(tmp_path):
    path = tmp_path / "results.jsonl"
    append_result(path, make_row(exp="exp/a", wer=10.0))
    append_result(path, make_row(exp="exp/b", wer=11.0))
    text = render_results_md(path, tmp_path / "RESULTS.md")
    assert "10.00" in text and "11.00" in text
    assert "| exp |" in text


def test_a_rerun_with_a_newly_tuned_lm_weight_replaces_the_row(tmp_path):
    path = tmp_path / "results.jsonl"
    append_result(path, make_row(decoding="ctc_beam+lm", lm_weight=0.3, wer=40.0))
    append_result(path, make_row(decoding="ctc_beam+lm", lm_weight=1.0, wer=35.5))
    text = render_results_md(path, tmp_path / "RESULTS.md")
    assert "35.50" in text and "40.00" not in text


def test_malformed_jsonl_raises_with_line_number(tmp_path):
    path = tmp_path / "results.jsonl"
    append_result(path, make_row())
    with open(path, "a") as f:
        f.write("\n{not json\n")
    with pytest.raises(ValueError, match=r"results.jsonl:3: malformed JSON"):
        read_results(path)
    with pytest.raises(ValueError, match=r":3:"):
        render_results_md(path, tmp_path / "RESULTS.md")
    assert not (tmp_path / "RESULTS.md").exists()


def test_jsonl_row_missing_keys_raises_with_line_number(tmp_path):
    path = tmp_path / "results.jsonl"
    path.write_text(json.dumps(make_row()) + "\n" + json.dumps({"corpus": "x"}) + "\n")
    with pytest.raises(ValueError, match=r":2: row is missing required key\(s\): test_set"):
        read_results(path)


def test_a_stored_row_with_a_non_number_is_named_not_a_traceback(tmp_path):
    """Rows written before append_result checked their numbers (or merged by hand) reached the
    renderer, whose formatting raised a TypeError naming no line."""
    path = tmp_path / "results.jsonl"
    path.write_text(json.dumps(make_row()) + "\n" + json.dumps(make_row(labeled_seconds="1h")) + "\n")
    with pytest.raises(ValueError, match=r"results.jsonl:2: row .*labeled_seconds='1h' must be a number"):
        read_results(path)
    path.write_text(json.dumps(make_row(wer="12.5")) + "\n")
    with pytest.raises(ValueError, match=r":1: row .*non-numeric wer: '12.5'"):
        render_results_md(path, tmp_path / "RESULTS.md")


def test_cells_that_read_the_same_are_both_bold(tmp_path):
    """The column minimum was taken at full precision: of 52.3k words, 1309 and 1310 errors both
    read 2.50, and only one of them was bold."""
    path = tmp_path / "results.jsonl"
    for exp, errors in (("exp/a", 1309), ("exp/b", 1310), ("exp/c", 1400)):
        append_result(path, make_row(exp=exp, wer=100 * errors / 52341, num_words=52341))
    text = render_results_md(path, tmp_path / "RESULTS.md")
    summary = text[text.index("WER % by system"):text.index("Every result")]
    assert summary.count("**2.50**") == 2 and "| 2.67 |" in summary


# --------------------------------------------------------------------------- CLIs


def write_texts(tmp_path):
    (tmp_path / "ref").write_text("u1 a b c\nu2 d e\nu3 f g\n")
    (tmp_path / "hyp").write_text("u1 a x c\nu3\n")  # u2 missing, u3 empty
    return tmp_path / "ref", tmp_path / "hyp"


SETS = [
    "corpus=librispeech", "test_set=test-clean", "frontend=hubert", "head=ctc",
    "decoding=beam", "lm_weight=0.3", "labeled_seconds=36000", "pretrained=true",
    "generation=2", "command=python -m sslasr.bin.decode --lm-weight 0.3",
]  # fmt: skip


def test_score_cli_end_to_end(tmp_path, capsys):
    ref, hyp = write_texts(tmp_path)
    out, results = tmp_path / "out", tmp_path / "results.jsonl"
    argv = ["--ref", str(ref), "--hyp", str(hyp), "--out-dir", str(out), "--results",
            str(results)] + [a for s in SETS for a in ("--set", s)]  # fmt: skip
    assert score.main(argv) == 0

    wer_line = "%WER 71.43 [ 5 / 7, 0 ins, 4 del, 1 sub ]"
    assert capsys.readouterr().out.strip() == wer_line
    assert (out / "wer.txt").read_text() == wer_line + "\n"
    assert (out / "errors.txt").read_text().startswith(wer_line)
    (row,) = read_results(results)
    assert row["lm_weight"] == 0.3 and row["labeled_seconds"] == 36000
    assert row["pretrained"] is True and row["generation"] == 2
    assert row["command"] == "python -m sslasr.bin.decode --lm-weight 0.3"
    assert (row["sub"], row["del"], row["ins"], row["num_words"]) == (1, 4, 0, 7)
    assert (row["num_utts"], row["num_missing_hyps"]) == (3, 1)
    assert row["wer"] == pytest.approx(71.4286)
    assert score.main(argv) == 0  # rerun after a kill before the stage's done mark: still one row
    assert read_results(results) == [row]

    md = tmp_path / "RESULTS.md"
    assert render_results.main(["--results", str(results), "--out", str(md)]) == 0
    assert "71.43" in md.read_text() and "10 h" in md.read_text()


def test_score_cli_scores_a_partly_transcribed_set(tmp_path, caplog):
    """decode.py writes every cut's hypothesis but only the transcribed cuts' references: the
    untranscribed cut is left out of the WER, with its count logged, in errors.txt and in the row."""
    ref, hyp = write_texts(tmp_path)
    hyp.write_text(hyp.read_text() + "u4 no transcript\n")
    out, results = tmp_path / "out", tmp_path / "results.jsonl"
    argv = ["--ref", str(ref), "--hyp", str(hyp), "--out-dir", str(out), "--results",
            str(results)] + [a for s in SETS for a in ("--set", s)]  # fmt: skip
    with caplog.at_level("WARNING"):
        assert score.main(argv) == 0
    assert "1 of 3 hypotheses have no reference; not scored, e.g. ['u4']" in caplog.text
    (row,) = read_results(results)
    assert (row["wer"], row["ins"], row["num_utts"], row["num_unreferenced_hyps"]) == (pytest.approx(71.4286), 0, 3, 1)
    assert "Hypotheses without a reference (not scored): 1" in (out / "errors.txt").read_text()
    with pytest.raises(ValueError, match="no reference"):  # the library's default stays strict
        score_corpus({"u1": "a"}, {"u1": "a", "u4": "b"})


def test_score_cli_names_a_set_without_reference_words(tmp_path):
    """Insertions over 0 reference words would be a WER of inf: a clear error naming the set,
    before anything is written."""
    (tmp_path / "ref").write_text("u1\nu2\n")
    (tmp_path / "hyp").write_text("u1 oh\nu2\n")
    argv = ["--ref", str(tmp_path / "ref"), "--hyp", str(tmp_path / "hyp"), "--out-dir", str(tmp_path / "out"),
            "--results", str(tmp_path / "r.jsonl")] + [a for s in SETS for a in ("--set", s)]  # fmt: skip
    with pytest.raises(SystemExit, match=r"ref \(test_set test-clean\): no reference words in its 2 utterance"):
        score.main(argv)
    assert not (tmp_path / "out").exists() and not (tmp_path / "r.jsonl").exists()
    with pytest.raises(ValueError, match="librispeech/test-clean \\(beam\\) has a non-finite .* inf over 0 reference"):
        append_result(tmp_path / "r.jsonl", {**score.parse_sets(SETS), "wer": math.inf, "sub": 0, "del": 0,
                                             "ins": 1, "num_words": 0, "num_utts": 2})


def test_score_cli_missing_set_fails_before_writing(tmp_path):
    ref, hyp = write_texts(tmp_path)
    argv = ["--ref", str(ref), "--hyp", str(hyp), "--out-dir", str(tmp_path / "out"),
            "--results", str(tmp_path / "r.jsonl"), "--set", "corpus=x"]  # fmt: skip
    with pytest.raises(SystemExit, match="missing --set for required key"):
        score.main(argv)
    assert not (tmp_path / "out").exists() and not (tmp_path / "r.jsonl").exists()


def test_parse_sets_types_values():
    row = score.parse_sets(["a=1", "b=1e-3", "c=null", "d=off-the-shelf", "e=2024-01-01",
                            "command=true", "f=false"])  # fmt: skip
    assert row == {"a": 1, "b": 0.001, "c": None, "d": "off-the-shelf", "e": "2024-01-01",
                   "command": "true", "f": False}  # fmt: skip
    # names stay names: Norwegian's corpus "no", a set "on", a system dir "1e3"
    assert score.parse_sets(["corpus=no", "test_set=on", "exp=1e3", "frontend=null", "generation=1"]) == {
        "corpus": "no", "test_set": "on", "exp": "1e3", "frontend": "null", "generation": 1}
    with pytest.raises(ValueError, match="computed"):
        score.parse_sets(["wer=1"])
    with pytest.raises(ValueError, match="twice"):
        score.parse_sets(["a=1", "a=2"])


def test_clis_run_as_modules(tmp_path):
    ref, hyp = write_texts(tmp_path)
    results = tmp_path / "results.jsonl"
    cmd = [sys.executable, "-m", "sslasr.bin.score", "--ref", str(ref), "--hyp", str(hyp),
           "--out-dir", str(tmp_path / "out"), "--results", str(results)]  # fmt: skip
    cmd += [a for s in SETS for a in ("--set", s)]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=True)
    assert done.stdout.startswith("%WER 71.43")

    md = tmp_path / "RESULTS.md"
    cmd = [sys.executable, "-m", "sslasr.bin.render_results", "--results", str(results),
           "--out", str(md), "--title", "T"]  # fmt: skip
    subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=True)
    assert md.read_text().startswith("# T\n")

    results.write_text("garbage\n")
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    assert done.returncode != 0 and ":1: malformed JSON" in done.stderr


def test_required_keys_are_the_documented_ones():
    assert set(REQUIRED_RESULT_KEYS) == {
        "corpus", "test_set", "frontend", "head", "decoding", "lm_weight", "labeled_seconds",
        "pretrained", "generation", "wer", "sub", "del", "ins", "num_words", "num_utts",
        "command",
    }  # fmt: skip


def test_kaldi_text_lines_end_at_newline_only_and_a_bom_is_dropped(tmp_path: Path):
    """ref.txt / hyp.txt as Kaldi reads them: an editor's BOM is not part of the first id (it
    made u1 an id without a hypothesis: WER 66.7 % for identical files), and U+2028 or \\x85
    inside a transcript do not end its line (str.splitlines made them utterances)."""
    ref, hyp = tmp_path / "ref.txt", tmp_path / "hyp.txt"
    ref.write_text("\ufeffu1 HELLO WORLD\r\nu2 A\u2028B C\x85D\n", encoding="utf-8")
    hyp.write_text("u1 HELLO WORLD\nu2 A\u2028B C\x85D\n", encoding="utf-8")
    assert score.read_kaldi_text(ref) == {"u1": "HELLO WORLD", "u2": "A\u2028B C\x85D"}
    result = subprocess.run([sys.executable, "-m", "sslasr.bin.score", "--ref", str(ref), "--hyp", str(hyp),
                             "--out-dir", str(tmp_path / "scored")], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "%WER 0.00 [ 0 / 6," in (tmp_path / "scored/wer.txt").read_text()  # words split at any space


def test_a_row_appended_after_a_cut_short_line_stays_whole(tmp_path: Path):
    """A results file whose last write was cut short (no newline): the next row goes on a line
    of its own, and reading names the fragment's line instead of losing the new row in it."""
    path = tmp_path / "results.jsonl"
    append_result(path, make_row(exp="exp/a", wer=10.0))
    with open(path, "a", encoding="utf-8") as f:
        f.write('{"corpus": "librispeech", "test_')  # a write cut short by a full disk
    append_result(path, make_row(exp="exp/b", wer=9.0))
    lines = path.read_text().splitlines()
    assert len(lines) == 3 and json.loads(lines[2])["exp"] == "exp/b"
    with pytest.raises(ValueError, match=r"results.jsonl:2: malformed JSON line"):
        read_results(path)


def test_a_row_holding_a_unicode_line_separator_reads_back(tmp_path):
    """Rows are written with ensure_ascii=False, which leaves U+2028 and U+0085 as they are, and
    were read with str.splitlines, which breaks lines there: every later render failed."""
    results = tmp_path / "r.jsonl"
    row = make_row(command="run.sh --tag a\u2028b\u0085c")
    append_result(results, row)
    append_result(results, row)  # the same result: found, not appended twice
    (read,) = read_results(results)
    assert read["command"] == "run.sh --tag a\u2028b\u0085c"
    assert len(results.read_text(encoding="utf-8").split("\n")) == 2


@pytest.mark.parametrize("key, value", [("labeled_seconds", "10h"), ("model_parameters", "95M"),
                                        ("pseudo_label_seconds", True), ("teacher_wer", float("nan"))])
def test_a_row_whose_numeric_field_is_not_a_number_is_refused(tmp_path, key, value):
    """Accepted and stored, such a row stopped every later RESULTS.md render with a TypeError."""
    with pytest.raises(ValueError, match=f"{key}=.* must be a number"):
        append_result(tmp_path / "r.jsonl", make_row(**{key: value}))
    assert not (tmp_path / "r.jsonl").exists()


def test_rendering_waits_for_another_runs_archive_merge(tmp_path):
    """Two recipes' stage 10 at once each replaced RESULTS.jsonl with its own merge: one run's rows
    were lost from it. A merge waits while another holds the archive's lock."""
    import fcntl
    import threading
    results, archive = tmp_path / "results.jsonl", tmp_path / "RESULTS.jsonl"
    append_result(results, make_row())
    with open(tmp_path / ".RESULTS.jsonl.lock", "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        merge = threading.Thread(target=render_results.main, args=(
            ["--results", str(results), "--archive", str(archive), "--out", str(tmp_path / "RESULTS.md")],))
        merge.start()
        merge.join(timeout=3)
        assert merge.is_alive() and not archive.exists()
    merge.join(timeout=60)
    assert not merge.is_alive() and len(read_results(archive)) == 1
