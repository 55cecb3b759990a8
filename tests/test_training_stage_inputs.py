"""Stages 4-10 of the stage driver (local/ssl_asr.sh): a training dir made from other inputs is
refused, a killed pseudo-labelling of another teacher is not resumed, students' rows name every
command that made them, other nodes leave decoding and scoring to node 0, fine-tunings run
together end with the driver, and failures inside $(...) stop it.

As in test_data_stage_markers, the driver runs for real with a fake $SSLASR_PYTHON: it records
the programs it is asked to run and makes what they would (a model file holding the training's
options, decode folders); the small Python scripts of the driver itself run for real."""

import gzip
import hashlib
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from recipe_smoke import node_0_running
from test_data_stage_markers import REPO, _executable, _lines

FAKE_PYTHON = r"""#!/usr/bin/env bash
real=@REAL@
case "$1" in
  -c) case "$2" in
        *FRONTENDS*) [ "${FAKE_FAIL:-}" != frontends ] || exit 1; echo "${FAKE_FRONTENDS:-wav2vec2}" ;;
        *frontend_name*) echo wav2vec2 ;;  # --init-from's family
        *sslasr.models*) echo "${FAKE_INPUT_TYPE:-waveform}" ;;  # the frontend's input type
        *"import json"*) if [ -n "${FAKE_REAL_JSON:-}" ] && [ -f "$3" ]; then exec "$real" "$@"; else echo null; fi ;;  # json_value
        *) exec "$real" "$@" ;;
      esac ;;
  -) exec "$real" "$@" ;;  # the driver's scripts: row_command, decode_methods, noisy_student_setting
  -m) printf '%q ' "${@:2}" >> python_calls; echo >> python_calls
      case "${*:2}" in ${FAKE_FAIL:-none}) exit 1 ;; esac
      case "${*:2}" in ${FAKE_NOTHING_LEFT:-none}) exit 3 ;; esac  # sslasr.bin.cuts exclude's
      out=""; previous=""
      for a in "$@"; do [ "$previous" != --out ] || out=$a; previous=$a; done
      [ -z "$out" ] || mkdir -p "$(dirname "$out")"
      case "$2 $3" in
        "sslasr.bin.kmeans plan") case " $* " in *" --count "*) echo "${FAKE_KMEANS:-0}" ;; *) echo kmeans.iteration=1 ;; esac ;;
        "sslasr.bin.cuts seconds") echo 30 ;;
        "sslasr.bin.cuts combine"|"sslasr.bin.cuts subset"|"sslasr.bin.cuts select"|"sslasr.bin.cuts perturb-speed")
          echo "$*" | gzip > "$out" ;;
        "sslasr.cli import-hf") echo "$4" > "$out" ;;
        "sslasr.bin.train --exp-dir")
          mkdir -p "$4"; echo "${*:5}" > "$4/model_final.pt"
          printf 'decode:\n  methods: [%s]\n' "${FAKE_METHOD:-ctc_greedy}" > "$4/config.yaml"
          if [ -n "${FAKE_TRAIN_SLEEP:-}" ]; then sleep 30 & echo $! > "$4/sleeper.pid"; wait; fi ;;
        "sslasr.bin.decode "*)  # a folder with hyp.txt per (set, method)
          sets=() methods=() template="" mode=""
          for a in "${@:3}"; do
            case $a in
              --cuts|--methods|--out-dir) mode=$a ;;
              --*) mode="" ;;
              *) case $mode in --cuts) sets+=("${a%%=*}") ;; --methods) methods+=("$a") ;; --out-dir) template=$a ;; esac ;;
            esac
          done
          for s in "${sets[@]}"; do for m in "${methods[@]}"; do
            d=${template//\{set\}/$s}; d=${d//\{method\}/${m/+lm/_lm}}; mkdir -p "$d"; echo hyp > "$d/hyp.txt"
          done; done ;;
        "sslasr.bin.score "*)
          for a in "$@"; do case $a in command=*) printf '%s\n----\n' "${a#command=}" >> score_commands ;; esac; done ;;
      esac ;;
  *) exit 3 ;;
esac
"""


def _gz(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wt") as f:
        f.write(text)


def _recipe(tmp_path: Path) -> Path:
    """A toy recipe past stage 3: conf files, split manifests, a tokenizer, a corpus folder (with a space)."""
    shutil.copytree(REPO / "local", tmp_path / "local")
    recipe = tmp_path / "egs" / "toy"
    _executable(recipe / "run.sh", '#!/usr/bin/env bash\ncd "$(dirname "$0")"\ncorpus=toy\n. ../../local/ssl_asr.sh\n')
    _executable(tmp_path / "python", FAKE_PYTHON.replace("@REAL@", shlex.quote(sys.executable)))
    conf = recipe / "conf"
    conf.mkdir()
    for name in ("frontend_wav2vec2", "pretrain", "finetune_ctc", "scratch"):
        (conf / f"{name}.yaml").write_text(f"# {name}\n")
    (conf / "noisy_student.yaml").write_text("pseudo_label:\n  method: ctc_greedy\n")
    for split in ("train", "unlabeled", "dev", "test"):
        _gz(recipe / f"data/manifests/toy_cuts_{split}.jsonl.gz", f"{split} cuts\n")
    (recipe / "data/manifests/.done").touch()  # stages 1 and 3 finished (in this order)
    (recipe / "data/lang_unigram_200").mkdir()
    (recipe / "data/lang_unigram_200/bpe.model").write_text("tokenizer\n")
    (recipe / "data/lang_unigram_200/.done").touch()
    corpus = tmp_path / "my corpus"
    (corpus / "unlabeled").mkdir(parents=True)
    (recipe / "data/corpus_dir").write_text(f"{corpus}\n")
    return recipe


def _env(recipe: Path, **fake: str) -> dict:
    env = dict(os.environ, SSLASR_PYTHON=str(recipe.parents[1] / "python"))
    env.update({f"FAKE_{key.upper()}": value for key, value in fake.items()})
    return env


def _run(recipe: Path, *args: str, **fake: str) -> subprocess.CompletedProcess:
    return subprocess.run(["./run.sh", *args], cwd=recipe, env=_env(recipe, **fake), capture_output=True, text=True,
                          timeout=60)


def _calls(recipe: Path, program: str) -> list:
    return [shlex.split(line) for line in _lines(recipe / "python_calls") if line.startswith(program + " ")]


def _trained(tmp_path: Path, *args: str, **fake: str) -> Path:
    recipe = _recipe(tmp_path)
    result = _run(recipe, "--stage", "4", "--stop-stage", "5", *args, **fake)
    assert result.returncode == 0, result.stderr
    return recipe


def test_a_frontends_settings_for_a_labeled_amount_are_merged_last_but_scratch(tmp_path: Path):
    """finetune_<head>_<frontend>_<labeled>.yaml (LibriSpeech's HuBERT base_10h settings) after the
    amount's and the frontend's files: in the pretrained and the scratch system's configs."""
    recipe = _recipe(tmp_path)
    (recipe / "conf/finetune_ctc_all.yaml").write_text("# the amount's\n")
    (recipe / "conf/finetune_wav2vec2.yaml").write_text("# the frontend's\n")
    (recipe / "conf/finetune_ctc_wav2vec2_all.yaml").write_text("# both\n")
    assert _run(recipe, "--stage", "4", "--stop-stage", "5").returncode == 0
    configs = {call[call.index("--exp-dir") + 1]: [a for a in call if a.startswith("conf/")]
               for call in _calls(recipe, "sslasr.bin.train")}
    tail = ["conf/finetune_ctc.yaml", "conf/finetune_ctc_all.yaml", "conf/finetune_wav2vec2.yaml",
            "conf/finetune_ctc_wav2vec2_all.yaml"]
    assert configs["exp/ctc_wav2vec2_all"][-4:] == tail
    assert configs["exp/ctc_scratch_wav2vec2_all"][-5:] == tail + ["conf/scratch.yaml"]


def test_finetuned_systems_made_from_other_inputs_are_refused(tmp_path: Path):
    recipe = _trained(tmp_path, "--finetune-opts", "optim.lr=1")
    system, scratch = recipe / "exp/ctc_wav2vec2_all", recipe / "exp/ctc_scratch_wav2vec2_all"
    inputs = _lines(system / "inputs.txt")
    assert "finetune_opts optim.lr=1" in inputs and any(line.startswith("pretrained ") for line in inputs)
    assert not any(line.startswith("pretrained ") for line in _lines(scratch / "inputs.txt"))
    trainings = len(_calls(recipe, "sslasr.bin.train"))
    assert trainings == 3

    other = _run(recipe, "--stage", "5", "--stop-stage", "5", "--finetune-opts", "optim.lr=2")
    assert other.returncode == 2, other.stderr
    assert "exp/ctc_wav2vec2_all was made from other inputs: < finetune_opts optim.lr=1 > finetune_opts optim.lr=2" \
        in other.stderr and "pass --force true" in other.stderr and "--tag" in other.stderr
    # a tokenizer trained again, an edited config, a pretraining redone: each refused, named
    (recipe / "data/lang_unigram_200/bpe.model").write_text("another tokenizer\n")
    assert "< tokenizer data/lang_unigram_200 " in _run(recipe, "--stage", "5", "--stop-stage", "5",
                                                         "--finetune-opts", "optim.lr=1").stderr
    (recipe / "data/lang_unigram_200/bpe.model").write_text("tokenizer\n")
    (recipe / "conf/finetune_ctc.yaml").write_text("optim: {lr: 3}\n")
    assert "< configs conf/frontend_wav2vec2.yaml conf/finetune_ctc.yaml " in _run(
        recipe, "--stage", "5", "--stop-stage", "5", "--finetune-opts", "optim.lr=1").stderr
    (recipe / "conf/finetune_ctc.yaml").write_text("# finetune_ctc\n")
    (recipe / "exp/pretrain_wav2vec2/model_final.pt").write_text("pretrained again\n")
    refused = _run(recipe, "--stage", "5", "--stop-stage", "5", "--finetune-opts", "optim.lr=1")
    assert refused.returncode == 2 and "< pretrained exp/pretrain_wav2vec2/model_final.pt " in refused.stderr
    assert len(_calls(recipe, "sslasr.bin.train")) == trainings

    tagged = _run(recipe, "--stage", "5", "--stop-stage", "5", "--finetune-opts", "optim.lr=2", "--tag", "_lr2",
                  "--compare-scratch", "false")
    assert tagged.returncode == 0, tagged.stderr
    forced = _run(recipe, "--stage", "5", "--stop-stage", "5", "--finetune-opts", "optim.lr=2", "--force", "true")
    assert forced.returncode == 0, forced.stderr
    assert "finetune_opts optim.lr=2" in _lines(system / "inputs.txt")
    assert len(_calls(recipe, "sslasr.bin.train")) == trainings + 3
    same = _run(recipe, "--stage", "5", "--stop-stage", "5", "--finetune-opts", "optim.lr=2")
    assert same.returncode == 0 and "exp/ctc_wav2vec2_all ready" in same.stderr, same.stderr


def test_a_dir_from_before_inputs_were_recorded_is_taken_and_a_failed_start_is_not_refused(tmp_path: Path):
    recipe = _trained(tmp_path)
    system = recipe / "exp/ctc_wav2vec2_all"
    (system / "inputs.txt").unlink()
    old = _run(recipe, "--stage", "5", "--stop-stage", "5", "--finetune-opts", "optim.lr=2", "--compare-scratch", "false")
    assert old.returncode == 0, old.stderr
    assert "exp/ctc_wav2vec2_all: made before its inputs were recorded: not checked" in old.stderr
    assert not (system / "inputs.txt").exists() and len(_calls(recipe, "sslasr.bin.train")) == 3
    # inputs recorded, but the training failed before any checkpoint: nothing to protect
    for name in (".done", "model_final.pt"):
        (system / name).unlink()
    (system / "inputs.txt").write_text("finetune_opts optim.lr=9\n")
    again = _run(recipe, "--stage", "5", "--stop-stage", "5", "--finetune-opts", "optim.lr=2", "--compare-scratch", "false")
    assert again.returncode == 0, again.stderr
    assert "finetune_opts optim.lr=2" in _lines(system / "inputs.txt")


def test_a_pretraining_made_from_other_inputs_is_refused(tmp_path: Path):
    recipe = _trained(tmp_path)
    pretrain = recipe / "exp/pretrain_wav2vec2"
    assert [line.split()[0] for line in _lines(pretrain / "inputs.txt")] == [
        "configs", "pretrain_opts", "kmeans_opts", "cuts", "cuts"]
    other = _run(recipe, "--stage", "4", "--stop-stage", "4", "--pretrain-opts", "trainer.max_updates=9")
    assert other.returncode == 2 and "< pretrain_opts  > pretrain_opts trainer.max_updates=9" in other.stderr, \
        other.stderr
    assert "--pretrain-tag" in other.stderr
    (recipe / "conf/pretrain.yaml").write_text("trainer: {max_updates: 9}\n")
    assert _run(recipe, "--stage", "4", "--stop-stage", "4").returncode == 2
    (recipe / "conf/pretrain.yaml").write_text("# pretrain\n")
    _gz(recipe / "data/manifests/toy_cuts_unlabeled.jsonl.gz", "more unlabeled cuts\n")
    other = _run(recipe, "--stage", "4", "--stop-stage", "4")
    assert other.returncode == 2 and "< cuts data/manifests/toy_cuts_unlabeled.jsonl.gz" in other.stderr
    _gz(recipe / "data/manifests/toy_cuts_unlabeled.jsonl.gz", "unlabeled cuts\n")  # same text, another gzip time
    assert _run(recipe, "--stage", "4", "--stop-stage", "4").returncode == 0


def test_configs_are_recorded_by_what_they_set(tmp_path: Path):
    """Configs were recorded by a hash of their bytes, their _base_ files left out: an edited
    comment refused a trained dir, and another setting in a base file (the frontend preset's
    architecture, say) was resumed as the same training."""
    recipe = _recipe(tmp_path)
    conf = recipe / "conf"
    (conf / "preset.yaml").write_text("frontend: {encoder: {layers: 2}}\n")
    (conf / "frontend_wav2vec2.yaml").write_text("_base_: preset.yaml\n# the recipe's frontend\n")
    (conf / "lm.yaml").write_text("model: {layers: 1}\n")
    assert _run(recipe, "--stage", "4", "--stop-stage", "6").returncode == 0
    system, lm = recipe / "exp/ctc_wav2vec2_all", recipe / "exp/lm_unigram_200"
    records = {d: (d / "inputs.txt").read_text() for d in (recipe / "exp/pretrain_wav2vec2", system, lm)}
    trainings = len(_calls(recipe, "sslasr.bin.train"))

    (conf / "frontend_wav2vec2.yaml").write_text("_base_: preset.yaml  # same settings\n")
    (conf / "lm.yaml").write_text("model:\n  layers: 1  # the same, written otherwise\n")
    same = _run(recipe, "--stage", "4", "--stop-stage", "6")
    assert same.returncode == 0, same.stderr
    assert len(_calls(recipe, "sslasr.bin.train")) == trainings
    assert {d: (d / "inputs.txt").read_text() for d in records} == records

    (conf / "preset.yaml").write_text("frontend: {encoder: {layers: 3}}\n")
    refused = _run(recipe, "--stage", "5", "--stop-stage", "5")
    assert refused.returncode == 2 and "exp/ctc_wav2vec2_all was made from other inputs: < configs " in refused.stderr
    assert _run(recipe, "--stage", "4", "--stop-stage", "4").returncode == 2
    (conf / "preset.yaml").write_text("frontend: {encoder: {layers: 2}}\n")

    # records of before, with the configs' bytes hashed: taken and recorded again
    def bytes_of(*names: str) -> str:
        return hashlib.sha256(b"".join((conf / name).read_bytes() for name in names)).hexdigest()[:16]
    for d, record in records.items():
        old = []
        for line in record.splitlines():
            if line.startswith("configs "):
                names = [Path(f).name for f in line.split()[1:-1]]
                line = " ".join(line.split()[:-1] + [bytes_of(*names)])
            elif line.startswith("config "):
                line = "config " + bytes_of("lm.yaml")
            old.append(line)
        assert old != record.splitlines()
        (d / "inputs.txt").write_text("\n".join(old) + "\n")
    taken = _run(recipe, "--stage", "4", "--stop-stage", "6")
    assert taken.returncode == 0, taken.stderr
    assert "exp/ctc_wav2vec2_all: its configs were recorded by their bytes: taken" in taken.stderr
    assert "exp/lm_unigram_200: its config was recorded by its bytes: taken" in taken.stderr
    assert len(_calls(recipe, "sslasr.bin.train")) == trainings
    assert {d: (d / "inputs.txt").read_text() for d in records} == records

    (conf / "finetune_ctc.yaml").write_text("optim: {lr: [unclosed\n")
    broken = _run(recipe, "--stage", "5", "--stop-stage", "5")
    assert broken.returncode != 0 and "do not load" in broken.stderr
    assert len(_calls(recipe, "sslasr.bin.train")) == trainings


def test_an_import_of_another_checkpoint_of_the_same_name_is_refused(tmp_path: Path):
    recipe = _recipe(tmp_path)
    for parent in ("a", "b"):
        (tmp_path / parent / "w2v").mkdir(parents=True)
        (tmp_path / parent / "w2v/config.json").write_text("{}")
    first = _run(recipe, "--stage", "4", "--stop-stage", "5", "--init-from", str(tmp_path / "a/w2v"))
    assert first.returncode == 0, first.stderr
    other = _run(recipe, "--stage", "5", "--stop-stage", "5", "--init-from", str(tmp_path / "b/w2v"))
    assert other.returncode == 2, other.stderr
    assert f"exp/pretrain_wav2vec2_imported_w2v was made from other inputs: < init_from {tmp_path}/a/w2v" in other.stderr
    assert len(_calls(recipe, "sslasr.cli")) == 1
    # other weights downloaded into the same folder: another model, refused as well (the path alone was recorded)
    (tmp_path / "a/w2v/model.safetensors").write_bytes(b"new weights")
    again = _run(recipe, "--stage", "5", "--stop-stage", "5", "--init-from", str(tmp_path / "a/w2v"))
    assert again.returncode == 2 and "was made from other inputs: < init_from " in again.stderr, again.stderr
    assert len(_calls(recipe, "sslasr.cli")) == 1
    # an import recorded by its path alone (before the files were hashed) is taken, and recorded with them
    imported = recipe / "exp/pretrain_wav2vec2_imported_w2v"
    (imported / "inputs.txt").write_text(f"init_from {tmp_path}/a/w2v\n")
    taken = _run(recipe, "--stage", "5", "--stop-stage", "5", "--init-from", str(tmp_path / "a/w2v"))
    assert taken.returncode == 0 and "recorded by --init-from's path alone" in taken.stderr, taken.stderr
    assert (imported / "inputs.txt").read_text().startswith(f"init_from {tmp_path}/a/w2v ")
    assert len(_calls(recipe, "sslasr.cli")) == 1


def _labelled(recipe: Path, *args: str, **fake: str) -> subprocess.CompletedProcess:
    return _run(recipe, "--stage", "9", "--stop-stage", "9", *args, **fake)


@pytest.mark.parametrize("teacher_newer", [True, False])
def test_a_killed_pseudo_labelling_is_resumed_only_with_the_same_teacher(tmp_path: Path, teacher_newer: bool):
    recipe = _trained(tmp_path)
    labels = recipe / "exp/noisy_student_ctc_wav2vec2_all/gen1/pseudo_labels"
    (labels / "decode_unlabeled").mkdir(parents=True)
    (labels / "decode_unlabeled/the_old_teachers").touch()
    stamp = time.time() - 100
    os.utime(labels, (stamp, stamp))
    teacher = recipe / "exp/ctc_wav2vec2_all/model_final.pt"
    stamp += 50 if teacher_newer else -50
    os.utime(teacher, (stamp, stamp))
    result = _labelled(recipe, "--generations", "1")
    assert result.returncode == 0, result.stderr
    said = "exp/ctc_wav2vec2_all changed after its pseudo-labels were made" in result.stderr
    assert said == teacher_newer, result.stderr
    assert (labels / "decode_unlabeled/the_old_teachers").exists() != teacher_newer


def test_pseudo_labels_of_another_filter_are_made_again(tmp_path: Path):
    """Only the teacher and the LM were checked: killed before the student's first checkpoint,
    a rerun with another keep_fraction trained the student on the labels of the old filter."""
    recipe = _trained(tmp_path)
    assert _labelled(recipe, "--generations", "1").returncode == 0
    labels = recipe / "exp/noisy_student_ctc_wav2vec2_all/gen1/pseudo_labels"
    assert '"keep_fraction"' not in (labels / "inputs.txt").read_text()
    filters = len([c for c in _calls(recipe, "sslasr.bin.pseudo_label") if "--out-cuts" in c])
    assert _labelled(recipe, "--generations", "1").returncode == 0  # unchanged: kept
    assert len([c for c in _calls(recipe, "sslasr.bin.pseudo_label") if "--out-cuts" in c]) == filters
    (recipe / "conf/noisy_student.yaml").write_text("pseudo_label:\n  method: ctc_greedy\n  keep_fraction: 0.3\n")
    result = _labelled(recipe, "--generations", "1")
    assert result.returncode == 0, result.stderr
    assert "generation 1: its inputs changed" in result.stderr and "keep_fraction" in result.stderr
    assert len([c for c in _calls(recipe, "sslasr.bin.pseudo_label") if "--out-cuts" in c]) == filters + 1
    assert '"keep_fraction": 0.3' in (labels / "inputs.txt").read_text()


def test_decode_options_of_where_and_how_fast_keep_the_pseudo_labels(tmp_path: Path):
    """Any other --decode-opts made the pool's pseudo-labels outdated: --num-threads 8 relabelled
    the pool and retrained every student (on LibriSpeech, ~950 h decoded again per generation)."""
    recipe = _trained(tmp_path)
    assert _labelled(recipe, "--generations", "1").returncode == 0
    labels = recipe / "exp/noisy_student_ctc_wav2vec2_all/gen1/pseudo_labels"

    def filters() -> int:
        return len([c for c in _calls(recipe, "sslasr.bin.pseudo_label") if "--out-cuts" in c])
    made = filters()
    runtime = _labelled(recipe, "--generations", "1", "--decode-opts", "--num-threads 8 --max-duration=50 --device cpu")
    assert runtime.returncode == 0 and "inputs changed" not in runtime.stderr, runtime.stderr
    assert filters() == made and "decode_opts \n" in (labels / "inputs.txt").read_text()
    # a record from before: it held them (the same run, upgraded, must not relabel)
    record = labels / "inputs.txt"
    record.write_text(record.read_text().replace("decode_opts \n", "decode_opts --num-threads 8\n"))
    legacy = _labelled(recipe, "--generations", "1", "--decode-opts", "--num-threads 8")
    assert legacy.returncode == 0 and "inputs changed" not in legacy.stderr and filters() == made, legacy.stderr
    searched = _labelled(recipe, "--generations", "1", "--decode-opts", "--num-threads 8 --beam-size 4")
    assert searched.returncode == 0 and "its inputs changed" in searched.stderr, searched.stderr
    assert filters() == made + 1 and "decode_opts --beam-size 4\n" in (labels / "inputs.txt").read_text()


def test_other_nodes_do_not_take_pseudo_labels_of_another_filter(tmp_path: Path):
    """Node 0 makes the pseudo-labels again when their settings changed (inputs.txt); node 1,
    reading only the markers' times, trained on the old ones (or alone, a hang)."""
    recipe = _trained(tmp_path)
    assert _labelled(recipe, "--generations", "1").returncode == 0
    (recipe / "conf/noisy_student.yaml").write_text("pseudo_label:\n  method: ctc_greedy\n  keep_fraction: 0.3\n")
    command, env = _node(recipe, 1, "--stage", "9", "--generations", "1", "--node-wait-hours", "0")
    node_1 = subprocess.run(command, cwd=recipe, env=env, capture_output=True, text=True, timeout=60)
    assert node_1.returncode == 1, node_1.stderr
    assert "node 0's generation 1 pseudo-labels (exp/noisy_student_ctc_wav2vec2_all/gen1/pseudo_labels/.done) " \
           "not there, or older than its inputs, after 0 h" in node_1.stderr
    (recipe / "conf/noisy_student.yaml").write_text("pseudo_label:\n  method: ctc_greedy\n")  # as they were made
    node_1 = subprocess.run(command, cwd=recipe, env=env, capture_output=True, text=True, timeout=60)
    assert node_1.returncode == 0 and "generation 1: student ready" in node_1.stderr, node_1.stderr
    # new --decode-opts: node 0 decodes the teacher again (new λ, β) and labels again; node 1 waits for that
    command, env = _node(recipe, 1, "--stage", "9", "--generations", "1", "--node-wait-hours", "0",
                         "--decode-opts", "--beam-size 4")
    node_1 = subprocess.run(command, cwd=recipe, env=env, capture_output=True, text=True, timeout=60)
    assert node_1.returncode == 1 and "not there, or older than its inputs, after 0 h" in node_1.stderr, node_1.stderr
    assert not _calls(recipe, "node1")
    # pseudo-labels node 0 made in this run (after node 1 started) from other options than node 1's: said, not waited on
    labels = recipe / "exp/noisy_student_ctc_wav2vec2_all/gen1/pseudo_labels"
    for name, ahead in (("inputs.txt", 60), (".done", 70)):
        os.utime(labels / name, (time.time() + ahead,) * 2)
    node_1 = subprocess.run(command, cwd=recipe, env=env, capture_output=True, text=True, timeout=60)
    assert node_1.returncode == 1, node_1.stderr
    assert "node 1: node 0 made exp/noisy_student_ctc_wav2vec2_all/gen1/pseudo_labels from other settings than " \
           "this node's (< decode_opts  > decode_opts --beam-size 4 ); run every node with the same options" \
           in node_1.stderr, node_1.stderr
    assert not _calls(recipe, "node1")


def test_the_pool_reference_in_a_folder_with_a_space_is_one_argument(tmp_path: Path):
    recipe = _trained(tmp_path)
    (tmp_path / "my corpus/unlabeled/text.reference").write_text("u1 a b\n")
    result = _labelled(recipe, "--generations", "1")
    assert result.returncode == 0, result.stderr
    calls = [call for call in _calls(recipe, "sslasr.bin.pseudo_label") if "--out-cuts" in call]
    assert len(calls) == 1
    assert calls[0][calls[0].index("--reference") + 1] == f"{tmp_path}/my corpus/unlabeled/text.reference"


def test_student_rows_name_the_commands_of_their_teachers(tmp_path: Path):
    recipe = _recipe(tmp_path)
    commands = [("--stage", "4", "--stop-stage", "4"), ("--stage", "5", "--stop-stage", "5"),
                ("--stage", "9", "--stop-stage", "9", "--generations", "1"),
                ("--stage", "9", "--stop-stage", "9", "--generations", "2")]
    for command in commands:
        result = _run(recipe, *command)
        assert result.returncode == 0, result.stderr
        time.sleep(1.05)  # commands.txt notes are in seconds
    rows = (recipe / "score_commands").read_text().split("----\n")
    last = rows[-2]  # generation 2's (one set, one method: one row per test set)
    for command in commands:
        assert "./run.sh " + " ".join(command) in last, (command, last)
    for bad in (("--stage", "9", "--stop-stage", "9", "--generations", "2", "--finetune-opts", "x=1"),):
        refused = _run(recipe, *bad)  # the students too are refused when made from other inputs
        assert refused.returncode == 2 and "noisy_student_ctc_wav2vec2_all/gen1 was made from other" in refused.stderr


def test_rows_name_the_commands_that_prepared_the_data(tmp_path: Path):
    """A header's `--corpus-dir ... --data-opts ... --stop-stage 3`, then `--stage 4`: the rows
    named the later command only, and what train held was lost."""
    recipe = _recipe(tmp_path)
    stamp = int(time.time()) - 100
    for where, what in (("data", "data prepared"), ("data/manifests", "manifests made")):
        (recipe / where / "commands.txt").write_text(f"{stamp}\t{what}\t./run.sh --data-opts --max-utts 50\n")
    result = _run(recipe, "--stage", "4", "--stop-stage", "8")
    assert result.returncode == 0, result.stderr
    rows = (recipe / "score_commands").read_text().split("----\n")[:-1]
    assert rows and all(row.startswith("./run.sh --data-opts --max-utts 50  # data prepared, manifests made\n")
                        for row in rows), rows


def test_rows_name_no_command_whose_work_was_redone(tmp_path: Path):
    """commands.txt was only appended to: after --force true, the rows still named the commands
    that made the replaced model (and fbank systems' rows never named the fbank's command)."""
    recipe = _recipe(tmp_path)
    assert _run(recipe, "--stage", "4", "--stop-stage", "8", "--finetune-opts", "optim.lr=1").returncode == 0
    system = recipe / "exp/ctc_wav2vec2_all"
    assert "optim.lr=1" in (system / "commands.txt").read_text()
    forced = _run(recipe, "--stage", "5", "--stop-stage", "8", "--finetune-opts", "optim.lr=2", "--force", "true")
    assert forced.returncode == 0, forced.stderr
    assert "optim.lr=1" not in (system / "commands.txt").read_text()
    assert "optim.lr=1" in (system / "commands.superseded.txt").read_text()
    rows = (recipe / "score_commands").read_text().split("----\n")[:-1]
    assert "optim.lr=2" in rows[-1] and "optim.lr=1" not in rows[-1]


def test_boolean_options_take_true_or_false_only(tmp_path: Path):
    """--force yes meant false; `--force --labeled=1h` took --labeled=1h for --force's value."""
    recipe = _recipe(tmp_path)
    for args in (("--force", "yes"), ("--force", "--labeled=1h"), ("--no-pretrain", "1"),
                 ("--compare-scratch", "TRUE")):
        result = _run(recipe, "--stage", "100", *args)
        assert result.returncode == 2 and ": true or false" in result.stderr, (args, result.stderr)
    assert _run(recipe, "--stage", "100", "--force", "true", "--no-pretrain", "false").returncode == 0


def test_frontend_all_says_at_once_that_the_fbank_was_never_finished(tmp_path: Path):
    """w2v-BERT runs last: the others trained before its run stopped on the missing fbank."""
    recipe = _recipe(tmp_path)
    (recipe / "data/manifests/.done").touch()
    result = _run(recipe, "--frontend", "all", "--stage", "4", frontends="wav2vec2 w2vbert")
    assert result.returncode == 2 and "stage 2 has not finished the fbank" in result.stderr, result.stderr
    assert not _calls(recipe, "sslasr.bin.train")


def test_lexicon_rows_name_the_command_that_made_the_lexicon(tmp_path: Path):
    """The lexicon is the words of the LM's text (--lm-text included): its rows named the LM's
    command only for the +lm methods."""
    recipe = _trained(tmp_path, method="ctc_lexicon")
    (recipe / "conf/lm.yaml").write_text("# lm\n")
    (recipe / "extra.txt").write_text("MORE WORDS\n")
    lm_command = ("--stage", "6", "--stop-stage", "6", "--lm-text", "extra.txt")
    assert _run(recipe, *lm_command).returncode == 0
    (recipe / "exp/lm_unigram_200/words.txt").write_text("MORE\nWORDS\n")  # (the fake makes none)
    time.sleep(1.05)  # commands.txt notes are in seconds
    result = _run(recipe, "--stage", "7", "--stop-stage", "8", "--lm-text", "extra.txt", method="ctc_lexicon")
    assert result.returncode == 0, result.stderr
    rows = (recipe / "score_commands").read_text().split("----\n")[:-1]
    assert rows and all("./run.sh " + " ".join(lm_command) in row for row in rows), rows


NODES = "torchrun --nnodes 2 --node_rank {} --master_addr 127.0.0.1 --nproc_per_node 1"


def test_other_nodes_leave_stages_7_to_10_to_node_0(tmp_path: Path):
    recipe = _trained(tmp_path)
    calls = len(_lines(recipe / "python_calls"))
    other = _run(recipe, "--stage", "7", "--launcher", NODES.format(1))
    assert other.returncode == 0, other.stderr
    assert "node 1: stages 7-10 run on node 0 alone: done here" in other.stderr
    assert len(_lines(recipe / "python_calls")) == calls and not (recipe / "score_commands").exists()


FAKE_TORCHRUN = r"""#!/usr/bin/env bash
# node 0's trainer runs (the fake python); another node's records its call, as a joining rank
rank=0 previous=""
while [ $# -gt 0 ] && [ "$1" != -m ]; do [ "$previous" != --node_rank ] || rank=$1; previous=$1; shift; done
[ "$rank" != 0 ] || exec "$SSLASR_PYTHON" "$@"
shift; printf 'node%s %s\n' "$rank" "$(printf '%q ' "$@")" >> python_calls
"""


def _node(recipe: Path, rank: int, *args: str, **fake: str) -> list:
    """The command and environment of node RANK of a two-node run (torchrun faked on PATH)."""
    _executable(recipe.parents[1] / "bin/torchrun", FAKE_TORCHRUN)
    env = _env(recipe, **fake)
    env["PATH"] = f"{recipe.parents[1] / 'bin'}:{env['PATH']}"
    return [["./run.sh", *args, "--launcher", NODES.format(rank)], env]


def test_a_bare_torchrun_launcher_is_the_installs_when_none_is_on_path(tmp_path: Path):
    """`--launcher "torchrun ..."` (the LibriSpeech header's) failed without the venv activated."""
    recipe = _recipe(tmp_path)
    _executable(recipe.parents[1] / "torchrun", FAKE_TORCHRUN)  # beside $SSLASR_PYTHON, as in .venv/bin
    env = _env(recipe)
    env["PATH"] = "/usr/bin:/bin"
    result = subprocess.run(["./run.sh", "--stage", "5", "--stop-stage", "5", "--no-pretrain", "true", "--launcher",
                             NODES.format(1)], cwd=recipe, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert _calls(recipe, "node1")  # the fake torchrun beside the python ran node 1's trainer


def test_other_nodes_train_the_students_with_node_0(tmp_path: Path):
    """Node 1 of a two-node --generations 2 run: stages 7, 8 and 10 are node 0's; in stage 9 it
    waits for each generation's pseudo-labels, takes a student node 0 finished, and joins the
    training of one node 0 has not: the same trainer command, launched on node 1."""
    recipe = _trained(tmp_path)
    calls = len(_lines(recipe / "python_calls"))
    noisy = recipe / "exp/noisy_student_ctc_wav2vec2_all"
    command, env = _node(recipe, 1, "--stage", "7", "--generations", "2")
    node_1 = subprocess.Popen(command, cwd=recipe, env=env, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(1.5)  # node 1 is waiting for generation 1's pseudo-labels
        assert not (noisy / "gen1/pseudo_labels/.done").exists() and node_1.poll() is None
        assert len(_lines(recipe / "python_calls")) == calls  # nothing run yet
        # node 0: decodes, labels, trains generation 1, labels generation 2, then fails in its training
        command, env = _node(recipe, 0, "--stage", "7", "--generations", "2",
                             fail="sslasr.bin.train --exp-dir exp/noisy_student_*/gen2 *")
        node_0 = subprocess.run(command, cwd=recipe, env=env, capture_output=True, text=True, timeout=60)
        assert node_0.returncode == 1, node_0.stderr
        assert (noisy / ".node0_failed").exists()  # for the other nodes to see
        _, stderr = node_1.communicate(timeout=40)
    finally:
        node_1.kill()
    assert node_1.returncode == 0, stderr
    assert "node 1: stages 7, 8 and 10 run on node 0 alone; stage 9's students train here too" in stderr
    assert "node 1: generation 1: student ready" in stderr
    assert "node 1: generation 2: training the noisy student" in stderr
    trainings = [call for call in _calls(recipe, "sslasr.bin.train") if "noisy_student" in call[2]]
    joined = [call[1:] for call in _calls(recipe, "node1")]
    assert [call[2] for call in trainings] == ["exp/noisy_student_ctc_wav2vec2_all/gen1",
                                               "exp/noisy_student_ctc_wav2vec2_all/gen2"]
    assert joined == [trainings[1]]  # generation 2's, with the same options


@pytest.mark.parametrize("case, expected", [
    ("node 0 failed", "node 1: node 0 failed in its generation 1 pseudo-labels"),
    ("none yet", "node 1: node 0's generation 1 pseudo-labels (exp/noisy_student_ctc_wav2vec2_all/gen1/pseudo_labels/"
                 ".done) not there, or older than its inputs, after 0 h"),
    ("older than the teacher", "generation 1 pseudo-labels (exp/noisy_student_ctc_wav2vec2_all/gen1/pseudo_labels/"
                               ".done) not there, or older than its inputs"),
    ("made before --force", "generation 1 pseudo-labels (exp/noisy_student_ctc_wav2vec2_all/gen1/pseudo_labels/"
                            ".done) not there, or older than its inputs"),
    ("teacher model missing", "generation 1 pseudo-labels (exp/noisy_student_ctc_wav2vec2_all/gen1/pseudo_labels/"
                              ".done) not there, or older than its inputs"),  # being written: not older than it
])
def test_other_nodes_take_only_this_teachers_pseudo_labels(tmp_path: Path, case: str, expected: str):
    """Node 1 stops when node 0 failed since it started, and does not train on pseudo-labels of an
    earlier teacher or, under --force (node 0 makes them again), of an earlier run."""
    recipe = _trained(tmp_path)
    noisy = recipe / "exp/noisy_student_ctc_wav2vec2_all"
    labels = noisy / "gen1/pseudo_labels"
    teacher_made = time.time() - 120
    for name in ("model_final.pt", ".done"):
        os.utime(recipe / "exp/ctc_wav2vec2_all" / name, (teacher_made, teacher_made))
    force = []
    if case == "node 0 failed":
        (noisy / ".node0_failed").parent.mkdir(parents=True)
        (noisy / ".node0_failed").touch()
        os.utime(noisy / ".node0_failed", (time.time() + 60,) * 2)  # after node 1 started
    elif case != "none yet":
        labels.mkdir(parents=True)
        _gz(labels / "student_train.jsonl.gz", "labels\n")
        (labels / ".done").touch()
        stamp = teacher_made - 10 if case == "older than the teacher" else teacher_made + 60
        os.utime(labels / ".done", (stamp, stamp))
        force = ["--force", "true"] if case == "made before --force" else []
        if force:  # node 0 of this run started after these labels were made (and beats)
            node_0_running(recipe / "exp", NODES.format(0), started=teacher_made + 70)
        if case == "teacher model missing":
            (recipe / "exp/ctc_wav2vec2_all/model_final.pt").unlink()
    command, env = _node(recipe, 1, "--stage", "9", "--generations", "1", "--node-wait-hours", "0", *force)
    result = subprocess.run(command, cwd=recipe, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and expected in result.stderr, result.stderr
    assert not _calls(recipe, "node1")
    assert labels.exists() == (case not in ("node 0 failed", "none yet"))  # node 0's to remove
    if case == "made before --force":  # without it, this teacher's pseudo-labels are taken
        command, env = _node(recipe, 1, "--stage", "9", "--generations", "1", "--node-wait-hours", "0")
        taken = subprocess.run(command, cwd=recipe, env=env, capture_output=True, text=True, timeout=60)
        assert taken.returncode == 0, taken.stderr
        assert [call[3] for call in _calls(recipe, "node1")] == ["exp/noisy_student_ctc_wav2vec2_all/gen1"]


def _gone(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1].startswith("Z")
    except FileNotFoundError:
        return True


@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143), (signal.SIGHUP, 129)])
def test_interrupting_fine_tunings_run_together_ends_them(tmp_path: Path, signum: int, code: int):
    recipe = _trained(tmp_path)
    env = _env(recipe, train_sleep="1")
    driver = subprocess.Popen(["./run.sh", "--stage", "5", "--stop-stage", "5", "--force", "true",
                               "--finetune-jobs", "2"], cwd=recipe, env=env, stderr=subprocess.PIPE, text=True,
                              # as a shell starts it: a SIGINT ignored in this process (an earlier test's
                              # library), or a SIGHUP (nohup), would be inherited, and bash cannot trap
                              # a signal ignored at entry
                              preexec_fn=lambda: [signal.signal(s, signal.SIG_DFL) for s in (signal.SIGINT, signal.SIGHUP)])
    pid_files = [recipe / "exp/ctc_wav2vec2_all/sleeper.pid", recipe / "exp/ctc_scratch_wav2vec2_all/sleeper.pid"]
    sleepers = []
    try:
        deadline = time.monotonic() + 10
        while not all(p.exists() and p.read_text().strip() for p in pid_files) and time.monotonic() < deadline:
            time.sleep(0.05)
        sleepers = [int(p.read_text()) for p in pid_files]
        driver.send_signal(signum)
        assert driver.wait(timeout=10) == code
        deadline = time.monotonic() + 3
        while not all(_gone(pid) for pid in sleepers) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert all(_gone(pid) for pid in sleepers)  # a trainer's own children too
    finally:
        driver.kill()
        for pid in sleepers:
            if not _gone(pid):
                os.kill(pid, signal.SIGKILL)


@pytest.mark.parametrize("args, fake", [
    (("--stage", "4", "--stop-stage", "4", "--force", "true"), {"fail": "sslasr.bin.kmeans plan *--count*"}),
    (("--stage", "4", "--stop-stage", "4", "--force", "true"),
     {"kmeans": "1", "fail": "sslasr.bin.kmeans plan *--iteration*"}),
    (("--frontend", "all", "--stage", "4", "--stop-stage", "4"), {"fail": "frontends"}),
])
def test_a_failing_helper_inside_a_substitution_stops_the_driver(tmp_path: Path, args, fake):
    recipe = _trained(tmp_path)
    trainings = len(_calls(recipe, "sslasr.bin.train"))
    result = _run(recipe, *args, **fake)
    assert result.returncode != 0, result.stderr
    assert len(_calls(recipe, "sslasr.bin.train")) == trainings


def test_a_system_without_its_config_is_not_scored_as_nothing(tmp_path: Path):
    recipe = _trained(tmp_path)
    assert _run(recipe, "--stage", "7", "--stop-stage", "7").returncode == 0
    (recipe / "exp/ctc_wav2vec2_all/config.yaml").unlink()
    result = _run(recipe, "--stage", "8", "--stop-stage", "8")
    assert result.returncode != 0, result.stderr
    assert not (recipe / "score_commands").exists()  # the scratch system's rows neither


def test_a_row_is_scored_again_when_its_baseline_is_decoded_again_or_appears(tmp_path: Path):
    """Only the system's own hyp.txt was compared with its .scored: a scratch system decoded again
    (or first decoded after the pretrained one was scored) left the pretrained rows' Δ and
    confidence interval describing a scratch decode the tables no longer showed."""
    recipe = _trained(tmp_path)
    assert _run(recipe, "--stage", "7", "--stop-stage", "7").returncode == 0
    scratch = [recipe / f"exp/ctc_scratch_wav2vec2_all/decode_{s}_ctc_greedy" for s in ("dev", "test")]
    for folder in scratch:
        (folder / "hyp.txt").rename(folder / "hyp.txt.later")

    def scored() -> list:  # (system, baseline or None) per score call since the last look
        calls = _calls(recipe, "sslasr.bin.score")
        (recipe / "python_calls").write_text("")
        return sorted((c[c.index("--out-dir") + 1].split("/")[1], "--baseline" in c) for c in calls)

    result = _run(recipe, "--stage", "8", "--stop-stage", "8")
    assert result.returncode == 0 and "hyp.txt to compare with; its row has no baseline" in result.stderr
    assert scored() == [("ctc_scratch_wav2vec2_all", False)] * 2 + [("ctc_wav2vec2_all", False)] * 2
    for folder in scratch:  # there now (with their old times: the scratch rows stay as they are)
        (folder / "hyp.txt.later").rename(folder / "hyp.txt")
    assert _run(recipe, "--stage", "8", "--stop-stage", "8").returncode == 0
    assert scored() == [("ctc_wav2vec2_all", True)] * 2
    assert _run(recipe, "--stage", "8", "--stop-stage", "8").returncode == 0
    assert scored() == []  # nothing new
    later = time.time() + 5
    os.utime(scratch[1] / "hyp.txt", (later, later))  # the scratch system's test set decoded again
    assert _run(recipe, "--stage", "8", "--stop-stage", "8").returncode == 0
    assert scored() == [("ctc_scratch_wav2vec2_all", False), ("ctc_wav2vec2_all", True)]
    # an empty .scored (touched before it named its baseline) counts as scored with the one there then
    for marker in recipe.glob("exp/*/decode_*/.scored"):
        marker.write_text("")
        os.utime(marker, (later + 5, later + 5))
    assert _run(recipe, "--stage", "8", "--stop-stage", "8").returncode == 0
    assert scored() == []


def test_a_kmeans_iteration_made_from_an_earlier_model_is_made_again_after_it(tmp_path: Path):
    """Iteration 2's markers only said its files existed: after iteration 1 trained again, its
    k-means (fitted on the old model's features), labels and model were taken as they were."""
    recipe = _trained(tmp_path, kmeans="2")
    pretrain = recipe / "exp/pretrain_wav2vec2"
    for i in (1, 2):  # what the real labelling leaves (the fake writes nothing), before its marker
        _gz(pretrain / f"iter{i}/labels/toy_cuts_dev.jsonl.gz", "labels\n")
        made = (pretrain / f"iter{i}/.labels.done").stat().st_mtime - 1
        os.utime(pretrain / f"iter{i}/labels/toy_cuts_dev.jsonl.gz", (made, made))

    def calls() -> list:
        made = [shlex.split(line) for line in _lines(recipe / "python_calls")]
        (recipe / "python_calls").write_text("")
        return [" ".join(c[:3] if c[0] == "sslasr.bin.train" else c[:2]) for c in made
                if c[0] == "sslasr.bin.train" or c[:2] in (["sslasr.bin.kmeans", "fit"], ["sslasr.bin.kmeans", "label"])]

    calls()
    (pretrain / ".done").unlink()
    (pretrain / "iter1/.done").unlink()  # iteration 1 trained again
    result = _run(recipe, "--stage", "4", "--stop-stage", "4", kmeans="2")
    assert result.returncode == 0, result.stderr
    assert "iteration 2: iteration 1's model changed after this k-means" in result.stderr
    assert calls() == [f"sslasr.bin.train --exp-dir {pretrain.relative_to(recipe)}/iter1",
                       "sslasr.bin.kmeans fit", "sslasr.bin.kmeans label",
                       f"sslasr.bin.train --exp-dir {pretrain.relative_to(recipe)}/iter2"]
    # another validation set's labels are missing: labelled, the model kept
    (pretrain / ".done").unlink()
    (pretrain / "iter1/labels/toy_cuts_dev.jsonl.gz").unlink()
    assert _run(recipe, "--stage", "4", "--stop-stage", "4", kmeans="2").returncode == 0
    assert calls() == ["sslasr.bin.kmeans label"]
    _gz(pretrain / "iter1/labels/toy_cuts_dev.jsonl.gz", "labels\n")
    made = (pretrain / "iter1/.labels.done").stat().st_mtime - 1
    os.utime(pretrain / "iter1/labels/toy_cuts_dev.jsonl.gz", (made, made))
    # iteration 1's training run again to the same weights (a newer file, the same digest): kept
    model = pretrain / "iter1/model_final.pt"
    torch.save({"features": {"model_sha256": hashlib.sha256(model.read_bytes()).hexdigest()}}, pretrain / "iter2/kmeans.pt")
    (pretrain / ".done").unlink()
    later = time.time() + 5
    os.utime(model, (later, later))
    result = _run(recipe, "--stage", "4", "--stop-stage", "4", kmeans="2")
    assert result.returncode == 0 and "changed after this k-means" not in result.stderr, result.stderr
    assert calls() == []
    # the k-means fitted again by hand (its marker removed): its labels and model made again too
    (pretrain / ".done").unlink()
    (pretrain / "iter2/.kmeans.done").unlink()
    assert _run(recipe, "--stage", "4", "--stop-stage", "4", kmeans="2").returncode == 0
    assert calls() == ["sslasr.bin.kmeans fit", "sslasr.bin.kmeans label",
                       f"sslasr.bin.train --exp-dir {pretrain.relative_to(recipe)}/iter2"]


def test_a_lexicon_method_without_the_lexicon_does_not_decode(tmp_path: Path):
    recipe = _trained(tmp_path, method="ctc_lexicon")
    result = _run(recipe, "--stage", "7", "--stop-stage", "7")
    assert result.returncode == 1 and "the lexicon methods need stage 6" in result.stderr, result.stderr
    assert not _calls(recipe, "sslasr.bin.decode")


def test_pretraining_leaves_out_a_split_the_corpus_does_not_have(tmp_path: Path):
    """The OpenSLR release of speechocean762 has no unlabeled/: pretraining takes train alone,
    saying so, where the combine of the missing manifest used to stop stage 4."""
    recipe = _recipe(tmp_path)
    (recipe / "data/manifests/toy_cuts_unlabeled.jsonl.gz").unlink()
    result = _run(recipe, "--stage", "4", "--stop-stage", "4")
    assert result.returncode == 0, result.stderr
    assert "no unlabeled split (data/manifests/toy_cuts_unlabeled.jsonl.gz): left out" in result.stderr
    [combine] = _calls(recipe, "sslasr.bin.cuts")
    assert combine[-1] == "data/manifests/toy_cuts_train.jsonl.gz" and combine[:3] == ["sslasr.bin.cuts", "combine", "--out"]
    assert [line.split()[1] for line in _lines(recipe / "exp/pretrain_wav2vec2/inputs.txt") if line.startswith("cuts ")] \
        == ["data/manifests/toy_cuts_train.jsonl.gz"]
    (recipe / "data/manifests/toy_cuts_train.jsonl.gz").unlink()
    none = _run(recipe, "--stage", "4", "--stop-stage", "4", "--force", "true")
    assert none.returncode == 1 and "none of the pretraining splits (train unlabeled) has a manifest" in none.stderr


def _lm_and_rest_of_train(recipe: Path) -> None:
    (recipe / "conf/lm.yaml").write_text("# lm\n")
    (recipe / "conf/noisy_student.yaml").write_text("pseudo_label:\n  method: ctc_greedy\n  pool: [rest_of_train]\n")


def test_the_pseudo_labelling_lm_trains_before_stage_7_on_every_node(tmp_path: Path):
    """With rest_of_train in the pool, stage 9's LM (of the labeled transcripts only) trains
    before stage 7: node 1 skips stages 7-8, so in stage 9 it reached that training while node 0
    was still decoding (a rendezvous that times out). Only node 0 writes the files beside it."""
    recipe = _recipe(tmp_path)
    _lm_and_rest_of_train(recipe)
    assert _run(recipe, "--stage", "4", "--stop-stage", "6", "--labeled", "30").returncode == 0
    calls = len(_lines(recipe / "python_calls"))
    command, env = _node(recipe, 1, "--stage", "7", "--generations", "1", "--labeled", "30", "--node-wait-hours", "0")
    node_1 = subprocess.run(command, cwd=recipe, env=env, capture_output=True, text=True, timeout=60)
    assert node_1.returncode == 1 and "generation 1 pseudo-labels" in node_1.stderr, node_1.stderr
    assert [call[3] for call in _calls(recipe, "node1")] == ["exp/lm_unigram_200_labeled_30"]
    assert len(_lines(recipe / "python_calls")) == calls + 1  # its trainer; no perplexity, no lexicon
    command, env = _node(recipe, 0, "--stage", "7", "--generations", "1", "--labeled", "30")
    node_0 = subprocess.run(command, cwd=recipe, env=env, capture_output=True, text=True, timeout=60)
    assert node_0.returncode == 0, node_0.stderr
    programs = [" ".join(call[:3]) for call in (shlex.split(line) for line in _lines(recipe / "python_calls")[calls + 1:])]
    lm = programs.index("sslasr.bin.train --exp-dir exp/lm_unigram_200_labeled_30")
    assert lm < min(i for i, p in enumerate(programs) if p.startswith("sslasr.bin.decode"))


def test_every_node_retrains_a_student_whose_pseudo_labels_were_made_again(tmp_path: Path):
    """Pseudo-labels made again after their student (say, removed by hand: node 0 labels the pool
    again) make the student stale on every node: node 0 used to keep it while node 1 trained, alone."""
    recipe = _trained(tmp_path)
    assert _labelled(recipe, "--generations", "1").returncode == 0
    student = recipe / "exp/noisy_student_ctc_wav2vec2_all/gen1"
    _gz(student / "pseudo_labels/student_train.jsonl.gz", "other pseudo-labels\n")  # the pool labelled again
    later = time.time() + 5
    os.utime(student / "pseudo_labels/.done", (later, later))
    command, env = _node(recipe, 1, "--stage", "9", "--generations", "1", "--node-wait-hours", "0")
    node_1 = subprocess.run(command, cwd=recipe, env=env, capture_output=True, text=True, timeout=60)
    assert node_1.returncode == 0, node_1.stderr
    assert [call[3] for call in _calls(recipe, "node1")] == [str(student.relative_to(recipe))]
    trainings = len(_calls(recipe, "sslasr.bin.train"))
    command, env = _node(recipe, 0, "--stage", "9", "--generations", "1")
    node_0 = subprocess.run(command, cwd=recipe, env=env, capture_output=True, text=True, timeout=60)
    assert node_0.returncode == 0, node_0.stderr
    assert "generation 1: its pseudo-labels were made after the student: training it again" in node_0.stderr
    assert len(_calls(recipe, "sslasr.bin.train")) == trainings + 1


def test_other_nodes_stop_when_node_0_stops_beating(tmp_path: Path):
    """A node 0 killed outright leaves no .node0_failed: node 1 stops once node 0's heartbeat,
    begun after node 1 started, has been silent --node-silence-seconds (not --node-wait-hours later)."""
    recipe = _trained(tmp_path)
    command, env = _node(recipe, 1, "--stage", "9", "--generations", "1", "--node-silence-seconds", "1")
    node_1 = subprocess.Popen(command, cwd=recipe, env=env, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(1.5)  # node 1 waits for the pseudo-labels; node 0 beats once, then is killed
        beat = _beat_file(recipe)
        beat.touch()
        _, stderr = node_1.communicate(timeout=40)
    finally:
        node_1.kill()
    assert node_1.returncode == 1
    assert f"node 1: node 0's driver has not run for over 1 s (exp/{beat.name})" in stderr, stderr
    assert not _calls(recipe, "node1")


def _beat_file(recipe: Path, launcher: str = NODES.format(0)) -> Path:
    """Node 0's heartbeat of the run of LAUNCHER: named by the launcher less --node_rank."""
    run = subprocess.run(f"printf '%s' {shlex.quote(launcher)} | sed -E 's/--node[_-]rank[= ]*[0-9]+//' | cksum",
                         shell=True, capture_output=True, text=True, check=True)
    return recipe / f"exp/.node0_alive.{run.stdout.split()[0]}"


def test_node_0_beats_while_its_driver_runs(tmp_path: Path):
    """... in a file of its run's: another multi-node run in the same exp root beat in the same
    file, and kept a killed node 0 alive for the first run's other nodes."""
    recipe = _trained(tmp_path)
    beat = _beat_file(recipe)
    assert beat != _beat_file(recipe, NODES.format(0).replace("127.0.0.1", "10.0.0.2")) == _beat_file(
        recipe, NODES.format(1).replace("127.0.0.1", "10.0.0.2"))
    command, env = _node(recipe, 0, "--stage", "3", "--stop-stage", "3")
    result = subprocess.run(command, cwd=recipe, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert beat.exists() and time.time() - beat.stat().st_mtime < 30


def test_a_labeled_subset_is_drawn_again_from_a_remade_train_manifest(tmp_path: Path):
    """Stage 1 under --force (other speakers held out) remakes train: the --labeled subset and its
    speed-perturbed copy were kept, and the systems fine-tuned on the old draw."""
    recipe = _recipe(tmp_path)
    args = ("--stage", "5", "--stop-stage", "5", "--no-pretrain", "true", "--labeled", "1h",
            "--speed-perturb", "0.9 1.1")
    for _ in range(2):
        assert _run(recipe, *args).returncode == 0
    assert len(_calls(recipe, "sslasr.bin.cuts subset")) == len(_calls(recipe, "sslasr.bin.cuts perturb-speed")) == 1
    later = time.time() + 60
    os.utime(recipe / "data/manifests/toy_cuts_train.jsonl.gz", (later, later))
    result = _run(recipe, *args)
    assert result.returncode == 0, result.stderr
    assert len(_calls(recipe, "sslasr.bin.cuts subset")) == len(_calls(recipe, "sslasr.bin.cuts perturb-speed")) == 2


def test_a_speed_perturbation_killed_under_force_is_made_again(tmp_path: Path):
    """Under --force the perturbed fbank archives are rewritten in place while the old manifest
    stood: killed, a rerun took that manifest (at --labeled all nothing newer says otherwise) and
    trained on truncated archives."""
    recipe = _recipe(tmp_path)
    args = ("--stage", "5", "--stop-stage", "5", "--no-pretrain", "true", "--speed-perturb", "0.9 1.1")
    assert _run(recipe, *args).returncode == 0
    assert _run(recipe, *args, "--force", "true", fail="sslasr.bin.cuts perturb-speed*").returncode != 0
    assert _run(recipe, *args).returncode == 0
    assert len(_calls(recipe, "sslasr.bin.cuts perturb-speed")) == 3  # made, killed, made again


def test_an_fbank_frontend_takes_the_audio_subsets_cuts_so_the_lm_text_is_the_same(tmp_path: Path):
    """The LM records its text's path: an fbank frontend's run first recorded the fbank subset, and a
    waveform frontend's later run (--frontend all) retrained the LM and redid the noisy students.
    The subset is drawn from the audio manifest; the fbank one holds the same cuts' copies."""
    recipe = _recipe(tmp_path)
    _lm_and_rest_of_train(recipe)  # the pseudo-labelling LM: trained on the labeled subset's text
    for split in ("train", "dev", "test", "unlabeled"):
        _gz(recipe / f"data/manifests/toy_cuts_{split}_fbank.jsonl.gz", f"{split} cuts with fbank\n")
    (recipe / "data/manifests/.fbank.done").touch()
    args = ("--stage", "4", "--stop-stage", "9", "--labeled", "1h", "--generations", "1")
    first = _run(recipe, *args, input_type="fbank")
    assert first.returncode == 0, first.stderr
    (subset,) = _calls(recipe, "sslasr.bin.cuts subset")
    assert subset[subset.index("--cuts") + 1:subset.index("--out") + 2:4] == [
        "data/manifests/toy_cuts_train.jsonl.gz", "data/manifests/toy_cuts_train_1h.jsonl.gz"]
    (select,) = _calls(recipe, "sslasr.bin.cuts select")
    assert select[2:] == ["--cuts", "data/manifests/toy_cuts_train_fbank.jsonl.gz", "--ids-of",
                          "data/manifests/toy_cuts_train_1h.jsonl.gz", "--out", "data/manifests/toy_cuts_train_1h_fbank.jsonl.gz"]
    lm = recipe / "exp/lm_unigram_200_labeled_1h"
    assert (lm / "inputs.txt").read_text().startswith("text data/manifests/toy_cuts_train_1h.jsonl.gz ")

    def lm_trainings() -> int:
        return sum(f"--exp-dir {lm.relative_to(recipe)}" in " ".join(call) for call in _calls(recipe, "sslasr.bin.train"))
    assert lm_trainings() == 1
    waveform = _run(recipe, "--stage", "5", *args[2:], "--tag", "_waveform")  # (the fake's frontend is one name)
    assert waveform.returncode == 0, waveform.stderr
    assert lm_trainings() == 1 and f"LM ready ({lm.relative_to(recipe)})" in waveform.stderr


def test_the_lm_is_trained_again_on_a_remade_manifest_or_tokenizer(tmp_path: Path):
    """The LM's inputs were the text manifest's path alone: a tokenizer trained again (other token
    ids) or a remade train manifest kept the old LM for shallow fusion and the lexicon."""
    recipe = _recipe(tmp_path)
    (recipe / "conf/lm.yaml").write_text("# lm\n")

    def lm_trainings() -> int:
        return sum("task=lm" in call for call in _calls(recipe, "sslasr.bin.train"))

    for _ in range(2):
        result = _run(recipe, "--stage", "6", "--stop-stage", "6")
        assert result.returncode == 0, result.stderr
    assert lm_trainings() == 1 and "LM ready" in result.stderr
    # a record from before the contents were: taken (not trained again), completed
    record = recipe / "exp/lm_unigram_200/inputs.txt"
    recorded = record.read_text()
    lm_yaml_bytes = hashlib.sha256((recipe / "conf/lm.yaml").read_bytes()).hexdigest()[:16]
    old = ["text " + line.split()[1] if line.startswith("text ") else
           f"config {lm_yaml_bytes}" if line.startswith("config ") else line
           for line in recorded.splitlines() if not line.startswith("tokenizer ")]
    record.write_text("\n".join(old) + "\n")
    result = _run(recipe, "--stage", "6", "--stop-stage", "6")
    assert lm_trainings() == 1 and "inputs recorded before their contents were: taken" in result.stderr
    assert record.read_text() == recorded
    (recipe / "data/lang_unigram_200/bpe.model").write_text("another tokenizer\n")
    result = _run(recipe, "--stage", "6", "--stop-stage", "6")
    assert lm_trainings() == 2 and "was trained on other inputs" in result.stderr and "tokenizer" in result.stderr
    _gz(recipe / "data/manifests/toy_cuts_train.jsonl.gz", "other train cuts\n")
    assert _run(recipe, "--stage", "6", "--stop-stage", "6").returncode == 0
    assert lm_trainings() == 3


def test_a_killed_lm_training_is_not_resumed_on_other_inputs(tmp_path: Path):
    """Its inputs were recorded once it had finished: a training killed and rerun with more
    --lm-text resumed the checkpoint of the text before, then recorded the new text as its own;
    and a lexicon of earlier inputs passed for the new LM's."""
    recipe = _recipe(tmp_path)
    (recipe / "conf/lm.yaml").write_text("# lm\n")
    lm = recipe / "exp/lm_unigram_200"
    killed = _run(recipe, "--stage", "6", "--stop-stage", "6", fail="*task=lm*")
    assert killed.returncode != 0 and (lm / "inputs.txt").exists() and not (lm / ".done").exists()
    (lm / "checkpoint_last.pt").write_text("update 40 of the text without extra.txt\n")
    (lm / "words.txt").write_text("WORDS OF THE EARLIER TEXT\n")
    (recipe / "extra.txt").write_text("MORE TEXT\n")
    result = _run(recipe, "--stage", "6", "--stop-stage", "6", "--lm-text", "extra.txt")
    assert result.returncode == 0, result.stderr
    assert "was trained on other inputs; training it again:" in result.stderr and "lm_text extra.txt" in result.stderr
    assert not (lm / "checkpoint_last.pt").exists() and not (lm / "words.txt").exists()
    assert "lm_text extra.txt" in (lm / "inputs.txt").read_text()


def test_a_multi_node_launcher_without_a_node_rank_is_refused(tmp_path: Path):
    """Every node took itself for node 0: all fitted k-means, decoded into the same folders and
    appended the same results rows."""
    recipe = _recipe(tmp_path)
    for launcher in ("torchrun --nnodes 2 --rdzv-backend c10d --rdzv-endpoint h:29400", "torchrun --nnodes=1:4"):
        result = _run(recipe, "--stage", "7", "--stop-stage", "7", "--launcher", launcher)
        assert result.returncode == 2 and "names no --node_rank: every node would take itself" in result.stderr
    assert not _lines(recipe / "python_calls")
    single = _run(recipe, "--stage", "7", "--stop-stage", "7", "--launcher", "torchrun --nnodes 1 --nproc_per_node 2")
    assert "names no --node_rank" not in single.stderr


def test_nproc_beside_a_launcher_is_refused(tmp_path: Path):
    """The launcher's own process count ran (one per node, torchrun's default) and --nproc 8 was
    silently ignored."""
    recipe = _recipe(tmp_path)
    result = _run(recipe, "--stage", "5", "--nproc", "8", "--launcher", NODES.format(0))
    assert result.returncode == 2 and "--nproc 8 and --launcher contradict" in result.stderr, result.stderr
    assert not _lines(recipe / "python_calls")


def test_only_node_0_marks_a_training_done(tmp_path: Path):
    """Another node's torchrun returns 0 even when node 0, which alone writes model_final.pt,
    failed after the last barrier: that node's .done would have stood for a model never written."""
    recipe = _recipe(tmp_path)
    system = recipe / "exp/ctc_scratch_wav2vec2_all"
    command, env = _node(recipe, 1, "--stage", "5", "--stop-stage", "5", "--no-pretrain", "true")
    result = subprocess.run(command, cwd=recipe, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert _calls(recipe, "node1") and not (system / ".done").exists()
    command, env = _node(recipe, 0, "--stage", "5", "--stop-stage", "5", "--no-pretrain", "true")
    result = subprocess.run(command, cwd=recipe, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert (system / ".done").exists() and (system / "model_final.pt").exists()


def test_decoding_with_stages_5_and_6_left_out_stops_on_models_of_other_inputs(tmp_path: Path):
    """A tokenizer trained again (stages 0-3 under --force), then --stage 7: the fine-tuned model
    was decoded through the new token table; an LM of another text likewise. Options a
    decode-only command does not repeat (--finetune-opts of a --tag variant, --lm-text) are
    not compared."""
    recipe = _trained(tmp_path)
    (recipe / "conf/lm.yaml").write_text("# lm\n")
    (recipe / "extra.txt").write_text("MORE TEXT\n")
    assert _run(recipe, "--stage", "5", "--stop-stage", "6", "--tag", "_48k", "--finetune-opts", "x=48000",
                "--lm-text", "extra.txt").returncode == 0
    decode_only = _run(recipe, "--stage", "7", "--stop-stage", "8", "--tag", "_48k")
    assert decode_only.returncode == 0, decode_only.stderr
    decodes = len(_calls(recipe, "sslasr.bin.decode"))
    (recipe / "data/lang_unigram_200/bpe.model").write_text("another tokenizer\n")
    for first in ("7", "8"):
        result = _run(recipe, "--stage", first, "--stop-stage", "8", "--tag", "_48k")
        assert result.returncode == 2, result.stderr
        assert "exp/ctc_wav2vec2_all_48k was made from other files than stage 5 would use now" in result.stderr
        assert "< tokenizer" in result.stderr and "include stage 5 (--stage 5) with the options" in result.stderr
    # stage 9 alone: its first teacher (stage 5's system) labelled the pool through the new token table
    result = _run(recipe, "--stage", "9", "--generations", "1", "--tag", "_48k")
    assert result.returncode == 2 and "exp/ctc_wav2vec2_all_48k was made from other files" in result.stderr
    assert len(_calls(recipe, "sslasr.bin.decode")) == decodes
    (recipe / "data/lang_unigram_200/bpe.model").write_text("tokenizer\n")
    record = recipe / "exp/lm_unigram_200/inputs.txt"
    record.write_text(record.read_text().replace("text data/manifests/toy_cuts_train.jsonl.gz ",
                                                 "text data/manifests/toy_cuts_train.jsonl.gz 0ther"))
    result = _run(recipe, "--stage", "7", "--stop-stage", "8", "--tag", "_48k")
    assert result.returncode == 2 and "exp/lm_unigram_200 was made from other files than stage 6" in result.stderr


def test_stage_7_decodes_again_for_other_sets_or_options(tmp_path: Path):
    """.decode.done stood for any request: another --decode-opts or --test-sets was 'decoded'."""
    recipe = _trained(tmp_path)

    def decodes(*args: str) -> int:
        result = _run(recipe, "--stage", "7", "--stop-stage", "7", *args)
        assert result.returncode == 0, result.stderr
        return len([call for call in _calls(recipe, "sslasr.bin.decode") if "exp/ctc_wav2vec2_all/model_final.pt" in call])

    assert decodes() == decodes() == 1
    assert decodes("--decode-opts", "--beam-size 50") == 2
    assert decodes("--decode-opts", "--beam-size 50", "--test-sets", "test unlabeled") == 3
    assert decodes("--decode-opts", "--beam-size 50", "--test-sets", "test unlabeled") == 3
    # a set's manifest made again (e.g. more test sentences drawn): decode.py redoes that set
    _gz(recipe / "data/manifests/toy_cuts_test.jsonl.gz", "500 test cuts\n")
    assert decodes("--decode-opts", "--beam-size 50", "--test-sets", "test unlabeled") == 4
    assert decodes("--decode-opts", "--beam-size 50", "--test-sets", "test unlabeled") == 4
    record = recipe / "exp/ctc_wav2vec2_all/.decode.done"  # one from before the sets' contents were recorded
    record.write_text("\n".join(line for line in _lines(record) if not line.startswith("set_contents ")) + "\n")
    assert decodes("--decode-opts", "--beam-size 50", "--test-sets", "test unlabeled") == 4
    record.write_text("\n".join(line for line in _lines(record) if not line.startswith("set_contents ")) + "\n")
    time.sleep(0.01)
    _gz(recipe / "data/manifests/toy_cuts_test.jsonl.gz", "600 test cuts\n")  # made again after that decode
    assert decodes("--decode-opts", "--beam-size 50", "--test-sets", "test unlabeled") == 5
    # killed while decoding another request: its folders may hold the new decodes, so the earlier
    # request (whose .decode.done stayed) is decoded again, not taken as done
    killed = _run(recipe, "--stage", "7", "--stop-stage", "7", "--decode-opts", "--beam-size 20",
                  "--test-sets", "test unlabeled", fail="sslasr.bin.decode*")
    assert killed.returncode != 0 and not record.exists()
    assert decodes("--decode-opts", "--beam-size 50", "--test-sets", "test unlabeled") == 7


def test_frontend_all_under_force_trains_the_shared_lm_once(tmp_path: Path):
    """The LM is every frontend's: --frontend all --force true trained it again for each one, and
    the earlier frontends' rows named an LM replaced since."""
    recipe = _recipe(tmp_path)
    (recipe / "conf/lm.yaml").write_text("# lm\n")
    (recipe / "conf/frontend_hubert.yaml").write_text("# frontend_hubert\n")
    (recipe / "data/manifests/.fbank.done").touch()  # (--frontend all checks stage 2 for its fbank frontend)
    result = _run(recipe, "--frontend", "all", "--stage", "4", "--stop-stage", "6", "--force", "true",
                  frontends="wav2vec2 hubert")
    assert result.returncode == 0, result.stderr
    trainings = [call[2] for call in _calls(recipe, "sslasr.bin.train")]
    assert sum(d.startswith("exp/pretrain_") for d in trainings) == 2 and trainings.count("exp/lm_unigram_200") == 1


def test_pseudo_labels_are_not_made_with_lm_weights_tuned_for_an_earlier_lm(tmp_path: Path):
    """Stage 6 alone (more --lm-text) after stage 7, then --stage 9: the teacher's λ, β, tuned with
    the earlier LM, were used with the new one. Judged by the LM's contents (the hash decode.py
    records), before anything is reset; a record without the hash is taken."""
    import hashlib
    recipe = _trained(tmp_path)
    (recipe / "conf/noisy_student.yaml").write_text("pseudo_label:\n  method: ctc_beam+lm\n")
    lm = recipe / "exp/lm_unigram_200"
    lm.mkdir(parents=True)
    (lm / "model_final.pt").write_text("lm\n")
    (lm / ".done").touch()
    tuned = recipe / "exp/ctc_wav2vec2_all/decode_dev_ctc_beam_lm/decode_info.json"
    # not decoded at all (fine-tuned again under --force, which removed its decodes): named, no traceback
    result = _labelled(recipe, "--generations", "1", real_json="1")
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert "exp/ctc_wav2vec2_all has no ctc_beam+lm decoding of dev to take λ, β from" in result.stderr
    assert "exp/ctc_wav2vec2_all is not decoded since it was trained (include stage 7)" in result.stderr
    tuned.parent.mkdir(parents=True)
    earlier_labels = recipe / "exp/noisy_student_ctc_wav2vec2_all/gen1/pseudo_labels"
    earlier_labels.mkdir(parents=True)
    for recorded, refused in ((hashlib.sha256(b"an earlier lm\n").hexdigest(), True),
                              (hashlib.sha256(b"lm\n").hexdigest(), False), (None, False)):
        info = {"lm_weight": 0.5, "length_bonus": 1.0, **({"lm_sha256": recorded} if recorded else {})}
        tuned.write_text(json.dumps(info) + "\n")
        result = _labelled(recipe, "--generations", "1", real_json="1")
        assert ("exp/lm_unigram_200 was trained again after exp/ctc_wav2vec2_all's decoding tuned λ, β"
                in result.stderr) == refused, result.stderr
        if refused:
            assert result.returncode == 2 and earlier_labels.exists() and not _calls(recipe, "sslasr.bin.decode")
    assert any("--lm-weight" in call for call in _calls(recipe, "sslasr.bin.decode"))


def test_an_empty_rest_of_train_leaves_the_pool_to_the_unlabeled_audio(tmp_path: Path):
    """--labeled beyond the corpus's train takes all of it: rest_of_train had no cuts, and the
    pool's combine failed with a traceback although the unlabeled audio made a pool."""
    recipe = _trained(tmp_path, "--labeled", "10h")
    (recipe / "conf/noisy_student.yaml").write_text("pseudo_label:\n  method: ctc_greedy\n  pool: [unlabeled, rest_of_train]\n")
    result = _labelled(recipe, "--generations", "1", "--labeled", "10h", nothing_left="sslasr.bin.cuts exclude *")
    assert result.returncode == 0, result.stderr
    assert "pseudo_label.pool: rest_of_train is empty (--labeled 10h holds all of train)" in result.stderr
    combined = [call for call in _calls(recipe, "sslasr.bin.cuts combine") if "pool.jsonl.gz" in call[3]]
    assert combined and combined[0][4:] == ["data/manifests/toy_cuts_unlabeled.jsonl.gz"]


def test_frontend_all_says_at_once_that_the_fbank_is_older_than_the_manifests(tmp_path: Path):
    """Only the fbank frontend's run (the last) stopped on it, after the others had trained."""
    recipe = _recipe(tmp_path)
    manifests = recipe / "data/manifests"
    (manifests / ".fbank.done").touch()
    os.utime(manifests / ".fbank.done", (time.time() - 60,) * 2)
    (manifests / ".done").touch()
    result = _run(recipe, "--frontend", "all", "--stage", "4", frontends="wav2vec2 hubert")
    assert result.returncode == 2 and "include stage 2 with an fbank frontend" in result.stderr, result.stderr
    assert not _calls(recipe, "sslasr.bin.train")


@pytest.mark.parametrize("marker, expected", [
    ("data/manifests/.done", "stage 1 has not finished the manifests (no data/manifests/.done: killed part-way?)"),
    ("data/lang_unigram_200/.done", "stage 3 has not finished the tokenizer (no data/lang_unigram_200/.done"),
])
def test_a_left_out_stage_killed_under_force_is_not_taken_as_done(tmp_path: Path, marker: str, expected: str):
    """--force removes a stage's marker before it rewrites the stage's files in place: killed
    part-way, a later --stage 4 took half-rewritten manifests or tokenizer as done."""
    recipe = _recipe(tmp_path)
    (recipe / marker).unlink()
    result = _run(recipe, "--stage", "4", "--stop-stage", "5")
    assert result.returncode == 2 and f"{expected}" in result.stderr, result.stderr
    assert "include stage" in result.stderr and not _calls(recipe, "sslasr.bin.train")


@pytest.mark.parametrize("signum, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_ending_a_frontend_all_run_ends_the_frontend_being_trained(tmp_path: Path, signum: int, code: int):
    """--frontend all ran each frontend's driver in the foreground: a TERM (a scheduler's) killed
    the loop alone, and the frontend's driver and trainer ran on into stages 4-10."""
    recipe = _recipe(tmp_path)
    (recipe / "data/manifests/.fbank.done").touch()
    driver = subprocess.Popen(["./run.sh", "--frontend", "all", "--stage", "4", "--stop-stage", "4"], cwd=recipe,
                              env=_env(recipe, train_sleep="1", frontends="wav2vec2 hubert"), stderr=subprocess.PIPE,
                              text=True, preexec_fn=lambda: [signal.signal(s, signal.SIG_DFL)
                                                             for s in (signal.SIGINT, signal.SIGHUP)])
    pid_file = recipe / "exp/pretrain_wav2vec2/sleeper.pid"
    sleeper = None
    try:
        deadline = time.monotonic() + 20
        while not (pid_file.exists() and pid_file.read_text().strip()) and time.monotonic() < deadline:
            time.sleep(0.05)
        sleeper = int(pid_file.read_text())
        driver.send_signal(signum)
        assert driver.wait(timeout=10) == code
        deadline = time.monotonic() + 3
        while not _gone(sleeper) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _gone(sleeper)
        assert not (recipe / "exp/pretrain_hubert").exists()  # the loop ended too
    finally:
        driver.kill()
        if sleeper and not _gone(sleeper):
            os.kill(sleeper, signal.SIGKILL)


def test_frontend_all_with_a_model_size_some_frontend_lacks_is_refused_up_front(tmp_path: Path):
    recipe = _recipe(tmp_path)
    (recipe / "data/manifests/.fbank.done").touch()
    (recipe / "conf/frontend_wav2vec2_large.yaml").write_text("# large\n")
    result = _run(recipe, "--frontend", "all", "--model-size", "large", "--stage", "4", frontends="wav2vec2 hubert")
    assert result.returncode == 2 and "--model-size large: no conf/frontend_hubert_large.yaml" in result.stderr, result.stderr
    assert not _calls(recipe, "sslasr.bin.train")  # wav2vec2's was not trained first


def test_pseudo_labels_of_another_pool_are_made_again(tmp_path: Path):
    """The record named the filter, the search and the labeled cuts, not the pool: with more
    untranscribed audio in the unlabeled manifest since, the students kept training on the
    pseudo-labels of the old pool. A record from before the pool line is kept as it is."""
    recipe = _trained(tmp_path)
    assert _labelled(recipe, "--generations", "1").returncode == 0
    record = recipe / "exp/noisy_student_ctc_wav2vec2_all/gen1/pseudo_labels/inputs.txt"
    assert "\npool " in record.read_text()

    def filters() -> int:
        return len([c for c in _calls(recipe, "sslasr.bin.pseudo_label") if "--out-cuts" in c])
    made = filters()
    record.write_text("".join(line for line in record.read_text().splitlines(True) if not line.startswith("pool ")))
    legacy = _labelled(recipe, "--generations", "1")
    assert legacy.returncode == 0 and "inputs changed" not in legacy.stderr and filters() == made, legacy.stderr
    assert _labelled(recipe, "--generations", "1", "--force", "true").returncode == 0  # the record made again
    made = filters()
    _gz(recipe / "data/manifests/toy_cuts_unlabeled.jsonl.gz", "unlabeled cuts\nmore unlabeled cuts\n")
    result = _labelled(recipe, "--generations", "1")
    assert result.returncode == 0, result.stderr
    assert "generation 1: its inputs changed" in result.stderr and "pool" in result.stderr
    assert filters() == made + 1


def test_other_nodes_wait_for_node_0s_labeled_manifests(tmp_path: Path):
    """Every node drew the --labeled subset and its speed-perturbed copy into the shared data/: with
    an fbank frontend, each rewrote the same fbank archives at once. Node 0 makes them; the
    others wait until they are there, newer than what they are made of."""
    recipe = _recipe(tmp_path)
    args = ("--stage", "5", "--stop-stage", "5", "--no-pretrain", "true", "--labeled", "1h", "--speed-perturb", "0.9 1.1")
    command, env = _node(recipe, 1, *args)
    waiting = subprocess.run(command + ["--node-wait-hours", "0"], cwd=recipe, env=env, capture_output=True,
                             text=True, timeout=60)
    assert waiting.returncode == 1 and "node 0's labeled manifests" in waiting.stderr, waiting.stderr
    assert not _calls(recipe, "sslasr.bin.cuts")  # nothing drawn or perturbed on node 1
    command, env = _node(recipe, 0, *args)
    assert subprocess.run(command, cwd=recipe, env=env, capture_output=True, text=True, timeout=60).returncode == 0
    assert [c[1] for c in _calls(recipe, "sslasr.bin.cuts")] == ["subset", "perturb-speed", "seconds"]
    command, env = _node(recipe, 1, *args)
    joined = subprocess.run(command, cwd=recipe, env=env, capture_output=True, text=True, timeout=60)
    assert joined.returncode == 0, joined.stderr
    assert [c[1] for c in _calls(recipe, "sslasr.bin.cuts")] == ["subset", "perturb-speed", "seconds"]


def test_other_nodes_wait_for_node_0s_pretrained_model(tmp_path: Path):
    """Node 0 alone writes model_final.pt, after the last barrier: another node went on to stage 5
    as soon as its own torchrun returned (the k-means iterations waited; plain pretraining did not)."""
    recipe = _recipe(tmp_path)
    args = ("--stage", "4", "--stop-stage", "4")
    command, env = _node(recipe, 0, *args, fail="sslasr.bin.train*")  # the manifest made, the training failed
    assert subprocess.run(command, cwd=recipe, env=env, capture_output=True, text=True, timeout=60).returncode != 0
    earlier = time.time() - 100  # an earlier run's failure: not this one's
    os.utime(recipe / "exp/pretrain_wav2vec2/.node0_failed", (earlier, earlier))
    command, env = _node(recipe, 1, *args)
    waited = subprocess.run(command + ["--node-wait-hours", "0"], cwd=recipe, env=env, capture_output=True,
                            text=True, timeout=60)
    assert waited.returncode == 1 and "node 0's pretrained model" in waited.stderr, waited.stderr
    assert len(_calls(recipe, "node1")) == 1  # it trained with node 0, then waited for the model
    command, env = _node(recipe, 0, *args)
    assert subprocess.run(command, cwd=recipe, env=env, capture_output=True, text=True, timeout=60).returncode == 0
    command, env = _node(recipe, 1, *args)
    ready = subprocess.run(command, cwd=recipe, env=env, capture_output=True, text=True, timeout=60)
    assert ready.returncode == 0 and "pretrained wav2vec2 ready" in ready.stderr, ready.stderr


def test_fine_tuning_refuses_an_unfinished_pretraining(tmp_path: Path):
    """--force removes the pretrained model before training again: killed there, a later --stage 5
    recorded a missing model and the trainer stopped on a bare FileNotFoundError (the scratch
    system, trained beside it, ran to its end first)."""
    recipe = _trained(tmp_path)
    assert _run(recipe, "--stage", "4", "--stop-stage", "4", "--force", "true", fail="sslasr.bin.train*").returncode != 0
    trainings = len(_calls(recipe, "sslasr.bin.train"))
    result = _run(recipe, "--stage", "5", "--stop-stage", "5", "--force", "true")
    assert result.returncode == 2 and "stage 4 has not finished the pretraining" in result.stderr, result.stderr
    assert len(_calls(recipe, "sslasr.bin.train")) == trainings
    assert _run(recipe, "--stage", "5", "--stop-stage", "5", "--no-pretrain", "true").returncode == 0  # scratch alone


def test_under_force_the_old_training_goes_before_the_new_inputs_are_recorded(tmp_path: Path):
    """The new inputs were recorded first, the old .done, checkpoint and k-means markers removed
    after: killed in between, a rerun without --force took the old model (or resumed its
    checkpoint) as made from the new inputs."""
    recipe = _trained(tmp_path)
    iteration = recipe / "exp/pretrain_wav2vec2/iter1"
    iteration.mkdir(parents=True, exist_ok=True)
    (iteration / ".kmeans.done").touch()
    for system in ("exp/ctc_wav2vec2_all", "exp/ctc_scratch_wav2vec2_all"):
        (recipe / system / "checkpoint_last.pt").write_text("the old training's\n")
    bin_dir = recipe.parents[1] / "bin"  # mv, as record_inputs renames the record into place: what is left then
    _executable(bin_dir / "mv", f'#!/usr/bin/env bash\nfor last; do :; done\ncase $last in */inputs.txt)\n'
                f'  d=$(dirname "$last"); ls -A "$d" "$d"/iter1 2>/dev/null | grep -E "^(\\.done|checkpoint_last.pt|'
                f'model_final.pt|\\.kmeans\\.done)$" >> {recipe}/left_at_record ;;\nesac\nexec {shutil.which("mv")} "$@"\n')
    env = _env(recipe)
    env["PATH"] = f"{bin_dir}:{env['PATH']}"
    result = subprocess.run(["./run.sh", "--stage", "4", "--stop-stage", "5", "--force", "true"], cwd=recipe, env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert (recipe / "exp/pretrain_wav2vec2/inputs.txt").exists()
    assert _lines(recipe / "left_at_record") == []


def test_other_nodes_under_force_take_a_labeled_manifest_node_0_does_not_make_again(tmp_path: Path):
    """At --labeled all (no speed perturbation) stage 5 takes stage 1's manifest as it is: under
    --force another node waited for it to be newer than node 0's start, which it never became."""
    recipe = _recipe(tmp_path)
    node_0_running(recipe / "exp", NODES.format(1), started=time.time() + 5)  # node 0 started after the manifests
    command, env = _node(recipe, 1, "--stage", "5", "--stop-stage", "5", "--no-pretrain", "true", "--force", "true")
    result = subprocess.run(command + ["--node-wait-hours", "0"], cwd=recipe, env=env, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert _calls(recipe, "node1")  # it trained with node 0


def test_other_nodes_wait_for_an_fbank_subset_of_a_newer_draw(tmp_path: Path):
    """An fbank frontend's subset is a selection of the waveform draw: drawn again since (another
    frontend's --force), node 0 selects again; another node took the old selection at once."""
    recipe = _recipe(tmp_path)
    manifests = recipe / "data/manifests"
    earlier = time.time() - 100
    for name in ("toy_cuts_train_fbank.jsonl.gz", "toy_cuts_train_1h_fbank.jsonl.gz", ".fbank.done"):
        _gz(manifests / name, f"{name}\n")
        os.utime(manifests / name, (earlier, earlier))
    os.utime(manifests / ".done", (earlier - 10, earlier - 10))  # stage 1, then stage 2
    for name in ("toy_cuts_train.jsonl.gz", "toy_cuts_train_fbank.jsonl.gz"):  # the draw alone is newer
        os.utime(manifests / name, (earlier - 20, earlier - 20))
    _gz(manifests / "toy_cuts_train_1h.jsonl.gz", "a newer draw\n")  # newer than the fbank selection
    command, env = _node(recipe, 1, "--stage", "5", "--stop-stage", "5", "--no-pretrain", "true", "--labeled", "1h",
                         input_type="fbank")
    result = subprocess.run(command + ["--node-wait-hours", "0"], cwd=recipe, env=env, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 1 and "node 0's labeled manifests" in result.stderr, result.stderr
    assert not _calls(recipe, "node1")


def test_node_0s_failure_anywhere_is_left_for_the_other_nodes(tmp_path: Path):
    """Only stage 4's k-means work and stage 9 marked node 0's failures: one in stage 5 (a refusal,
    a failed draw) left the other nodes waiting for a node 0 that had gone."""
    recipe = _trained(tmp_path)
    failed = recipe / "exp/pretrain_wav2vec2/.node0_failed"
    command, env = _node(recipe, 0, "--stage", "5", "--stop-stage", "5", "--labeled", "1h",
                         fail="sslasr.bin.cuts subset*")
    assert subprocess.run(command, cwd=recipe, env=env, capture_output=True, text=True, timeout=60).returncode != 0
    assert failed.exists()
    failed.unlink()
    command, env = _node(recipe, 0, "--stage", "5", "--stop-stage", "5")
    assert subprocess.run(command, cwd=recipe, env=env, capture_output=True, text=True, timeout=60).returncode == 0
    assert not failed.exists()
