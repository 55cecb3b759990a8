"""Stages 0-3 of the stage driver (local/ssl_asr.sh) and their markers: data/ made from other
inputs is refused, manifests older than data/, and fbank or a tokenizer older than the
manifests, are made again.

The driver runs for real, with a fake local/data.sh and a fake $SSLASR_PYTHON that records the
programs it is asked to run: what is tested is the driver's decisions, in well under a second."""

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

FAKE_DATA_SH = """#!/usr/bin/env bash
echo "$*" >> data_sh_calls
mkdir -p data/kaldi/train && echo "$(cd data/kaldi && pwd)" > data/corpus_dir
"""
FAKE_PYTHON = """#!/usr/bin/env bash
case "$1" in
  -c) echo "${FAKE_INPUT_TYPE:-waveform}" ;;  # the frontend's input type
  -m) echo "${*:2}" >> python_calls ;;
  -) echo "${*:2}" > checked_fbank; [ -z "${FAKE_OTHER_FBANK:-}" ] || echo "$FAKE_OTHER_FBANK" ;;  # other_extractors_fbank
  *) exit 3 ;;
esac
"""


def _executable(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(0o755)


def _recipe(tmp_path: Path) -> Path:
    shutil.copytree(REPO / "local", tmp_path / "local")
    recipe = tmp_path / "egs" / "toy"
    _executable(recipe / "run.sh", '#!/usr/bin/env bash\ncd "$(dirname "$0")"\ncorpus=toy\n. ../../local/ssl_asr.sh\n')
    _executable(recipe / "local" / "data.sh", FAKE_DATA_SH)
    _executable(tmp_path / "python", FAKE_PYTHON)
    return recipe


def _run(recipe: Path, *args: str, input_type: str = "waveform", other_fbank: str = "") -> subprocess.CompletedProcess:
    env = dict(os.environ, SSLASR_PYTHON=str(recipe.parents[1] / "python"), FAKE_INPUT_TYPE=input_type,
               FAKE_OTHER_FBANK=other_fbank)
    return subprocess.run(["./run.sh", *args], cwd=recipe, env=env, capture_output=True, text=True, timeout=60)


def _lines(path: Path) -> list:
    return path.read_text().splitlines() if path.exists() else []


def test_stage_0_refuses_data_prepared_from_other_inputs(tmp_path: Path):
    recipe = _recipe(tmp_path)
    first = _run(recipe, "--stop-stage", "0", "--data-opts", "--max-utts 50")
    assert first.returncode == 0, first.stderr
    assert _lines(recipe / "data/.data.done") == ["corpus_dir ", "data_opts --max-utts 50"]

    other = _run(recipe, "--stop-stage", "0")
    assert other.returncode == 2, other.stderr
    assert "data/ was prepared from other inputs: < data_opts --max-utts 50 > data_opts " in other.stderr
    assert "pass --force true" in other.stderr
    assert len(_lines(recipe / "data_sh_calls")) == 1  # not prepared again, not reused

    forced = _run(recipe, "--stop-stage", "0", "--force", "true")
    assert forced.returncode == 0, forced.stderr
    assert _lines(recipe / "data/.data.done") == ["corpus_dir ", "data_opts "]
    same = _run(recipe, "--stop-stage", "0")
    assert same.returncode == 0 and "data ready (data/.data.done)" in same.stderr, same.stderr
    assert len(_lines(recipe / "data_sh_calls")) == 2


def test_stage_0_takes_the_recorded_corpus_dir_when_a_later_command_leaves_it_out(tmp_path: Path):
    """A recipe header gives --corpus-dir once; its later commands were refused at stage 0."""
    recipe = _recipe(tmp_path)
    assert _run(recipe, "--stop-stage", "0", "--corpus-dir", "/data/my corpus").returncode == 0
    later = _run(recipe, "--stop-stage", "0")
    assert later.returncode == 0, later.stderr
    notes = _lines(recipe / "data/commands.txt")  # the command that prepared it, for the results rows
    assert len(notes) == 1 and notes[0].endswith("\tdata prepared\t./run.sh --stop-stage 0 --corpus-dir /data/my\\ corpus")
    assert "--corpus-dir /data/my corpus (data/.data.done's)" in later.stderr and "data ready" in later.stderr
    other = _run(recipe, "--stop-stage", "0", "--corpus-dir", "/data/other")
    assert other.returncode == 2 and "< corpus_dir /data/my corpus > corpus_dir /data/other" in other.stderr
    assert len(_lines(recipe / "data_sh_calls")) == 1


def test_stage_0_takes_a_marker_from_before_inputs_were_recorded_and_says_so(tmp_path: Path):
    recipe = _recipe(tmp_path)
    (recipe / "data").mkdir()
    (recipe / "data/.data.done").touch()
    result = _run(recipe, "--stop-stage", "0", "--data-opts", "--max-utts 50")
    assert result.returncode == 0, result.stderr
    assert "made before inputs were recorded: not checked" in result.stderr
    assert not (recipe / "data_sh_calls").exists()


def test_a_corpus_keeps_its_fixed_labeled_subsets_whole(tmp_path: Path):
    """Stage 1's duration limits (0.3-30 s) dropped utterances of Libri-Light's fixed subsets,
    which are a benchmark's exact lists: a run.sh names them in whole_splits."""
    recipe = _recipe(tmp_path)
    _executable(recipe / "run.sh", '#!/usr/bin/env bash\ncd "$(dirname "$0")"\ncorpus=toy\n'
                'whole_splits="train_10m train_1h"\n. ../../local/ssl_asr.sh\n')
    assert _run(recipe, "--stop-stage", "0").returncode == 0
    (recipe / "data/manifests").mkdir()
    result = _run(recipe, "--stage", "1", "--stop-stage", "1")
    assert result.returncode == 0, result.stderr
    assert "--eval-splits dev test dev train_10m train_1h --out-dir" in _lines(recipe / "python_calls")[0]
    librispeech = (REPO / "egs/librispeech/run.sh").read_text()
    assert 'whole_splits="train_10m train_1h train_10h"' in librispeech


def test_stage_1_makes_the_manifests_again_for_other_splits_kept_whole(tmp_path: Path):
    """Its marker held no options: a --valid-set or whole_splits added later kept that split's
    manifest cut by the duration limits, and the log said "manifests ready"."""
    recipe = _recipe(tmp_path)
    assert _run(recipe, "--stop-stage", "0").returncode == 0
    (recipe / "data/kaldi/train/wav.scp").write_text("u1 a.wav\n")
    (recipe / "data/manifests").mkdir()
    assert _run(recipe, "--stage", "1", "--stop-stage", "1").returncode == 0
    assert _lines(recipe / "data/manifests/.done") == ["splits train", "eval_splits dev test"]
    same = _run(recipe, "--stage", "1", "--stop-stage", "1")
    assert "manifests ready" in same.stderr and len(_lines(recipe / "python_calls")) == 1, same.stderr
    other = _run(recipe, "--stage", "1", "--stop-stage", "1", "--valid-set", "train_dev")
    assert other.returncode == 0, other.stderr
    assert ("the manifests were made for other splits: < eval_splits dev test > eval_splits dev test "
            "train_dev : making them again") in other.stderr
    assert "--eval-splits dev test train_dev --out-dir" in _lines(recipe / "python_calls")[1]
    assert _lines(recipe / "data/manifests/.done")[1] == "eval_splits dev test train_dev"
    reordered = _run(recipe, "--stage", "1", "--stop-stage", "1", "--valid-set", "train_dev", "--test-sets", "test dev")
    assert "manifests ready" in reordered.stderr and len(_lines(recipe / "python_calls")) == 2, reordered.stderr
    (recipe / "data/manifests/.done").write_text("")  # a marker from before the splits were recorded
    legacy = _run(recipe, "--stage", "1", "--stop-stage", "1")
    assert "manifests ready" in legacy.stderr and len(_lines(recipe / "python_calls")) == 2, legacy.stderr


def test_stages_1_to_3_redo_outputs_older_than_their_inputs(tmp_path: Path):
    recipe = _recipe(tmp_path)
    assert _run(recipe, "--stop-stage", "0").returncode == 0
    (recipe / "data/kaldi/train/wav.scp").write_text("u1 a.wav\n")
    manifests = recipe / "data/manifests"
    manifests.mkdir()
    for name in ("toy_recordings_train", "toy_cuts_train", "toy_cuts_pretrain", "toy_cuts_train_1h"):
        (manifests / f"{name}.jsonl.gz").touch()  # the last two: what waveform frontends made of train
    lang = recipe / "data/lang_unigram_200"
    lang.mkdir()
    for age_s, marker in ((300, manifests / ".fbank.done"), (200, manifests / ".done"), (100, lang / ".done")):
        marker.touch()
        stamp = time.time() - age_s  # an earlier run's: data/.data.done is newer than both
        os.utime(marker, (stamp, stamp))

    redone = _run(recipe, "--stage", "1", "--stop-stage", "3", input_type="fbank")
    assert redone.returncode == 0, redone.stderr
    assert "data/ was prepared again after the manifests: making them again" in redone.stderr
    assert "the manifests were made again after the fbank: computing it again" in redone.stderr
    assert "the manifests were made again after the tokenizer: training it again" in redone.stderr
    calls = _lines(recipe / "python_calls")
    assert [call.split()[0] for call in calls] == [  # fbank for stage 1's split only
        "sslasr.bin.prepare_manifests", "sslasr.bin.compute_fbank", "sslasr.bin.train_tokenizer"]
    assert calls[1].split()[1:3] == ["--cuts", "data/manifests/toy_cuts_train.jsonl.gz"]
    assert "--eval-splits dev test dev --out-dir" in calls[0]  # $test_sets and $valid_set

    again = _run(recipe, "--stage", "1", "--stop-stage", "3", input_type="fbank")
    assert again.returncode == 0, again.stderr
    assert "manifests ready" in again.stderr and "fbank ready" in again.stderr and "tokenizer ready" in again.stderr
    assert len(_lines(recipe / "python_calls")) == 3
    # fbank an earlier version computed with another extractor (Kaldi's defaults) is not taken as ready
    old = "data/manifests/toy_cuts_train_fbank.jsonl.gz (kaldi-fbank)"
    refused = _run(recipe, "--stage", "2", "--stop-stage", "3", input_type="fbank", other_fbank=old)
    assert refused.returncode == 2, refused.stderr
    assert f"fbank computed by another extractor than this version's: {old}" in refused.stderr
    assert "--stage 2 --stop-stage 2 --force true" in refused.stderr and "tokenizer ready" not in refused.stderr
    # what stages 4-5 made of the fbank is not stage 2's to check; computing it again removes it
    derived = [manifests / f"toy_cuts_{name}_fbank.jsonl.gz" for name in ("pretrain", "train_1h")]
    derived.append(manifests / "toy_cuts_train_1h_fbank_sp0.9-1.1.jsonl.gz")
    for path in derived + [manifests / "toy_cuts_train_fbank.jsonl.gz"]:
        path.touch()
    assert _run(recipe, "--stage", "2", "--stop-stage", "2", input_type="fbank").returncode == 0
    assert (recipe / "checked_fbank").read_text().split() == ["data/manifests/toy_cuts_train_fbank.jsonl.gz"]
    forced = _run(recipe, "--stage", "2", "--stop-stage", "2", "--force", "true", input_type="fbank")
    assert forced.returncode == 0, forced.stderr
    assert _lines(recipe / "python_calls")[-1].split()[:5] == [
        "sslasr.bin.compute_fbank", "--cuts", "data/manifests/toy_cuts_train.jsonl.gz", "--out-cuts",
        "data/manifests/toy_cuts_train_fbank.jsonl.gz"]
    assert not any(path.exists() for path in derived) and (manifests / "toy_cuts_train_fbank.jsonl.gz").exists()
    assert f"removing {derived[0].relative_to(recipe)}: made from the earlier fbank" in forced.stderr


def test_an_fbank_computation_killed_part_way_is_not_taken_as_done(tmp_path: Path):
    """The archives are rewritten in place: killed under --force, the old marker stood, and the next
    run took manifests pointing into truncated archives as "fbank ready"."""
    recipe = _recipe(tmp_path)
    assert _run(recipe, "--stop-stage", "0").returncode == 0
    (recipe / "data/kaldi/train/wav.scp").write_text("u1 a.wav\n")
    manifests = recipe / "data/manifests"
    manifests.mkdir(parents=True)
    for name in ("toy_recordings_train", "toy_cuts_train"):  # stage 1's split
        (manifests / f"{name}.jsonl.gz").touch()
    assert _run(recipe, "--stage", "1", "--stop-stage", "3", input_type="fbank").returncode == 0
    assert (manifests / ".fbank.done").exists()
    derived = manifests / "toy_cuts_pretrain_fbank.jsonl.gz"
    derived.touch()  # what stage 4 made of it
    fake = recipe.parents[1] / "python"
    fake.write_text(FAKE_PYTHON.replace('-m) echo "${*:2}" >> python_calls ;;',
                                        '-m) echo "${*:2}" >> python_calls; exit 9 ;;'))  # killed
    killed = _run(recipe, "--stage", "2", "--stop-stage", "2", "--force", "true", input_type="fbank")
    assert killed.returncode != 0
    assert not (manifests / ".fbank.done").exists() and not derived.exists()
    fake.write_text(FAKE_PYTHON)
    later = _run(recipe, "--stage", "3", "--stop-stage", "4", input_type="fbank")
    assert later.returncode == 2 and "stage 2 has not finished the fbank" in later.stderr
    calls = len(_lines(recipe / "python_calls"))
    again = _run(recipe, "--stage", "2", "--stop-stage", "2", input_type="fbank")
    assert again.returncode == 0 and (manifests / ".fbank.done").exists(), again.stderr
    assert _lines(recipe / "python_calls")[calls:][0].startswith("sslasr.bin.compute_fbank")


def test_a_data_preparation_or_manifests_killed_part_way_are_not_taken_as_done(tmp_path: Path):
    """--force removes data/.data.done before data.sh rewrites data/: killed there, a later --stage 1
    found the old manifests newer than no marker and took them as ready. Manifests remade in
    place (other splits kept whole) kept their old marker until the end."""
    recipe = _recipe(tmp_path)
    assert _run(recipe, "--stop-stage", "0").returncode == 0
    (recipe / "data/kaldi/train/wav.scp").write_text("u1 a.wav\n")
    (recipe / "data/manifests").mkdir()
    assert _run(recipe, "--stage", "1", "--stop-stage", "1").returncode == 0
    _executable(recipe / "local" / "data.sh", FAKE_DATA_SH + "exit 9\n")  # killed part-way
    killed = _run(recipe, "--stop-stage", "0", "--force", "true")
    assert killed.returncode != 0 and not (recipe / "data/.data.done").exists()
    later = _run(recipe, "--stage", "1", "--stop-stage", "1")
    assert later.returncode == 2 and "stage 0 has not finished data/" in later.stderr, later.stderr
    assert "manifests ready" not in later.stderr and len(_lines(recipe / "python_calls")) == 1
    _executable(recipe / "local" / "data.sh", FAKE_DATA_SH)
    assert _run(recipe, "--stop-stage", "0").returncode == 0  # finished: the stages after it go on
    assert _run(recipe, "--stage", "1", "--stop-stage", "1").returncode == 0
    assert len(_lines(recipe / "python_calls")) == 2  # data/ newer than the manifests: made again
    fake = recipe.parents[1] / "python"
    fake.write_text(FAKE_PYTHON.replace('-m) echo "${*:2}" >> python_calls ;;',
                                        '-m) echo "${*:2}" >> python_calls; exit 9 ;;'))
    (recipe / "data/.data.started").touch()  # killed between the marker and the start mark's removal:
    os.utime(recipe / "data/.data.started", (time.time() - 60, time.time() - 60))  # finished, and taken so
    assert _run(recipe, "--stage", "1", "--stop-stage", "1").returncode == 0
    assert not (recipe / "data/.data.started").exists()
    remade = _run(recipe, "--stage", "1", "--stop-stage", "1", "--valid-set", "train_dev")
    assert remade.returncode != 0 and not (recipe / "data/manifests/.done").exists()
    fake.write_text(FAKE_PYTHON)
    assert "stage 1 has not finished the manifests" in _run(recipe, "--stage", "2").stderr


@pytest.mark.parametrize("remade, first_stage, input_type, expected", [
    ("data/.data.done", 2, "waveform", "data/ was prepared again after the manifests: include stage 1"),
    ("data/manifests/.done", 3, "fbank", "the manifests were made again after the fbank: include stage 2"),
    ("data/manifests/.done", 4, "waveform", "the manifests were made again after the tokenizer: include stage 3"),
])
def test_a_left_out_stage_whose_input_was_made_again_stops_the_run(tmp_path: Path, remade, first_stage,
                                                                   input_type, expected):
    """Stage 0 alone under --force, then --stage 4: stages 4-10 took the old manifests as done."""
    recipe = _recipe(tmp_path)
    earlier = time.time() - 100
    for marker in ("data/.data.done", "data/manifests/.done", "data/manifests/.fbank.done",
                   "data/lang_unigram_200/.done"):
        (recipe / marker).parent.mkdir(parents=True, exist_ok=True)
        (recipe / marker).touch()
        os.utime(recipe / marker, (earlier, earlier))
    (recipe / remade).touch()
    result = _run(recipe, "--stage", str(first_stage), "--stop-stage", str(first_stage), input_type=input_type)
    assert result.returncode == 2 and expected in result.stderr, result.stderr
    os.utime(recipe / remade, (earlier, earlier))  # as old as the rest again: nothing stale
    result = _run(recipe, "--stage", str(first_stage), "--stop-stage", str(first_stage), input_type=input_type)
    assert "include stage" not in result.stderr


def test_stage_1_removes_the_manifests_of_a_split_the_corpus_no_longer_has(tmp_path: Path):
    """A corpus prepared again without its unlabeled/ kept the old unlabeled manifests, which
    pretraining and the noisy-student pool went on reading."""
    recipe = _recipe(tmp_path)
    assert _run(recipe, "--stop-stage", "0").returncode == 0
    (recipe / "data/kaldi/train/wav.scp").write_text("u1 a.wav\n")
    manifests = recipe / "data/manifests"
    manifests.mkdir()
    names = [f"toy_{kind}_{split}.jsonl.gz" for split in ("train", "unlabeled")
             for kind in ("recordings", "supervisions", "cuts")]
    names += ["toy_cuts_unlabeled_fbank.jsonl.gz", "toy_unlabeled_validation.json", "toy_cuts_pretrain.jsonl.gz"]
    for name in names:
        (manifests / name).touch()
    result = _run(recipe, "--stage", "1", "--stop-stage", "1")
    assert result.returncode == 0, result.stderr
    assert "removing the manifests of split unlabeled" in result.stderr
    assert sorted(p.name for p in manifests.iterdir() if p.name.endswith(".gz")) == [
        "toy_cuts_pretrain.jsonl.gz", "toy_cuts_train.jsonl.gz", "toy_recordings_train.jsonl.gz",
        "toy_supervisions_train.jsonl.gz"]
