"""The minisynth recipe end to end at smoke size: every stage, results rows, RESULTS.md,
skipping of finished stages, and resumption of pretraining after a SIGKILL."""

import gzip
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
from lhotse import CutSet

from recipe_smoke import SMOKE, SMOKE_DATA, node_0_running, recipe_copy, recipe_with_data, run_recipe
from sslasr.scoring import read_results

pytestmark = pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng is not installed")


@pytest.fixture(scope="module")
def finished_recipe(tmp_path_factory) -> Path:
    """Every stage from nothing (the corpus too), as a user's first ./run.sh."""
    recipe = recipe_copy(tmp_path_factory.mktemp("minisynth"))
    result = run_recipe(recipe, *SMOKE, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    return recipe


def test_every_stage_writes_its_outputs(finished_recipe: Path):
    recipe = finished_recipe
    for marker in ["data/.data.done", "data/manifests/.done", "data/lang_char_40/.done",
                   "exp/pretrain_wav2vec2/.done", "exp/ctc_wav2vec2_all/.done", "exp/ctc_scratch_wav2vec2_all/.done",
                   "exp/lm_char_40/.done", "exp/ctc_wav2vec2_all/.decode.done",
                   "exp/ctc_wav2vec2_all/decode_dev_ctc_beam_lm/fusion_tuning.json"]:
        assert (recipe / marker).exists(), marker
    validation = json.loads((recipe / "data/manifests/minisynth_train_validation.json").read_text())
    assert validation["kept"] == 40
    hyp = (recipe / "exp/ctc_wav2vec2_all/decode_test_ctc_greedy/hyp.txt").read_text().splitlines()
    assert len(hyp) == 8


def test_results_rows_and_table(finished_recipe: Path):
    rows = [json.loads(line) for line in (finished_recipe / "exp/results.jsonl").read_text().splitlines()]
    assert len(rows) == 12  # {pretrained, scratch} x {dev, test} x {ctc_greedy, ctc_beam, ctc_beam+lm}
    assert {(r["pretrained"], r["frontend"], r["test_set"], r["decoding"]) for r in rows} == {
        (pretrained, frontend, test_set, decoding) for pretrained, frontend in ((True, "wav2vec2"), (False, "none"))
        for test_set in ("dev", "test") for decoding in ("ctc_greedy", "ctc_beam", "ctc_beam+lm")}
    for row in rows:
        assert row["corpus"] == "minisynth" and row["head"] == "ctc"
        assert (row["lm_weight"] > 0) == (row["decoding"] == "ctc_beam+lm")
        assert row["num_utts"] == 8 and row["num_words"] > 8
        assert row["sub"] + row["del"] + row["ins"] == pytest.approx(row["wer"] * row["num_words"] / 100, abs=0.01)
        assert 0 < row["labeled_seconds"] < 200  # 40 short utterances
        assert row["command"].startswith("./run.sh")
        # the pretrained system's rows against the scratch one's decode of the same set and method
        if row["pretrained"]:
            method_dir = row["decoding"].replace("+lm", "_lm")
            assert row["baseline"] == f"exp/ctc_scratch_wav2vec2_all/decode_{row['test_set']}_{method_dir}"
            scratch = next(r for r in rows if not r["pretrained"] and r["test_set"] == row["test_set"]
                           and r["decoding"] == row["decoding"])
            assert row["wer_delta"] == pytest.approx(row["wer"] - scratch["wer"], abs=1e-3)
            assert row["wer_delta_low"] <= row["wer_delta"] <= row["wer_delta_high"]
            assert 0 <= row["p_improvement"] <= 1
            # the share of resamples with B < A agrees with the 95 % interval's side of 0
            assert row["wer_delta_high"] >= 0 or row["p_improvement"] >= 0.97
            assert row["wer_delta_low"] <= 0 or row["p_improvement"] <= 0.03
        else:
            assert "baseline" not in row
    table = (finished_recipe / "RESULTS.md").read_text()
    assert "do not edit" in table.lower() and "./run.sh --data-opts" in table
    assert "from RESULTS.jsonl" in table  # rendered from the tracked history, which has this run's rows
    assert read_results(finished_recipe / "RESULTS.jsonl") == rows


def test_rerun_skips_finished_stages(finished_recipe: Path):
    before = (finished_recipe / "exp/results.jsonl").read_text()
    start = time.monotonic()
    result = run_recipe(finished_recipe, *SMOKE, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "pretrained wav2vec2 ready" in result.stderr
    assert (finished_recipe / "exp/results.jsonl").read_text() == before  # nothing scored twice
    assert len(read_results(finished_recipe / "RESULTS.jsonl")) == 12  # nor archived twice
    assert time.monotonic() - start < 120


def test_pretraining_resumes_after_sigkill(tmp_path: Path, prepared_minisynth: Path):
    recipe = recipe_with_data(tmp_path, prepared_minisynth)
    opts = list(SMOKE)
    opts[opts.index("--pretrain-opts") + 1] = ("trainer.max_updates=12 trainer.checkpoint_every=2 "
                                               "data.max_duration=10")

    env = dict(os.environ, SSLASR_PYTHON=sys.executable)
    process = subprocess.Popen(["./run.sh", *opts, "--stage", "4", "--stop-stage", "4"], cwd=recipe, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    checkpoint = recipe / "exp/pretrain_wav2vec2/checkpoint_last.pt"
    deadline = time.monotonic() + 300
    while not checkpoint.exists() and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.2)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert checkpoint.exists(), "no checkpoint was written before the kill"
    killed_at = torch.load(checkpoint, weights_only=False)["num_updates"]
    assert 2 <= killed_at < 12
    assert not (recipe / "exp/pretrain_wav2vec2/.done").exists()

    resumed = run_recipe(recipe, *opts, "--stage", "4", "--stop-stage", "4", timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert f"resumed from exp/pretrain_wav2vec2/checkpoint_last.pt at update {killed_at}" in resumed.stderr
    assert torch.load(recipe / "exp/pretrain_wav2vec2/model_final.pt", weights_only=False)["num_updates"] == 12


def test_forced_finetuning_retrains_from_update_0_and_keeps_its_logs(tmp_path: Path, prepared_minisynth: Path):
    """--force true on stage 5 makes the labeled subset and its speed-perturbed copies again, and
    trains both systems (fine-tuned together: finetune_jobs=2) from update 0 instead of resuming
    the old checkpoint, appending to their logs rather than deleting them."""
    recipe = recipe_with_data(tmp_path, prepared_minisynth)
    opts = list(SMOKE)
    opts[opts.index("--finetune-opts") + 1] += " trainer.log_every=1"
    opts += ["--labeled", "30", "--speed-perturb", "1.1"]
    first = run_recipe(recipe, *opts, "--stage", "4", "--stop-stage", "5", timeout=600)
    assert first.returncode == 0, first.stderr[-4000:]
    subset = recipe / "data/manifests/minisynth_cuts_train_30.jsonl.gz"
    perturbed = recipe / "data/manifests/minisynth_cuts_train_30_sp1.1.jsonl.gz"
    labeled = len(CutSet.from_file(subset))
    assert 1 < labeled < 40 and len(CutSet.from_file(perturbed)) == 2 * labeled
    for path in (subset, perturbed):  # stale, as if stage 1 had remade train since
        CutSet.from_file(path).subset(first=1).to_file(path)

    forced = run_recipe(recipe, *opts, "--stage", "5", "--stop-stage", "5", "--force", "true", timeout=600)
    assert forced.returncode == 0, forced.stderr[-4000:]
    assert len(CutSet.from_file(subset)) == labeled and len(CutSet.from_file(perturbed)) == 2 * labeled
    for system in ("ctc_wav2vec2_30_sp1.1", "ctc_scratch_wav2vec2_30_sp1.1"):
        exp = recipe / "exp" / system
        train_log = (exp / "train.rank0.log").read_text()
        assert "resumed from" not in train_log, system
        assert train_log.count("command: ") == 2, system  # the first run's lines are still there
        assert train_log.count("train update 1:") == train_log.count("train update 4:") == 2, system
        assert (exp / "finetune.log").read_text().count("train update 1:") == 2, system
        assert torch.load(exp / "model_final.pt", weights_only=False)["num_updates"] == 4
        assert len(list((exp / "tensorboard").glob("events.*"))) == 1, system  # the old run's removed


def test_tag_trains_a_variant_beside_the_system(tmp_path: Path, prepared_minisynth: Path):
    """--tag suffixes the fine-tuned systems' exp dirs, so a variant (here another seed) trains
    beside the untagged system instead of resuming it; tags are path-safe or refused."""
    recipe = recipe_with_data(tmp_path, prepared_minisynth)
    opts = list(SMOKE) + ["--no-pretrain", "true", "--stage", "5", "--stop-stage", "5"]
    for tag, seed in (("", 0), ("_seed1", 1)):
        tagged = list(opts)
        tagged[tagged.index("--finetune-opts") + 1] += f" trainer.seed={seed}"
        result = run_recipe(recipe, *tagged, "--tag", tag, timeout=600)
        assert result.returncode == 0, result.stderr[-4000:]
    for tag, seed in (("", 0), ("_seed1", 1)):
        checkpoint = torch.load(recipe / f"exp/ctc_scratch_wav2vec2_all{tag}/model_final.pt", weights_only=False)
        assert checkpoint["config"]["trainer"]["seed"] == seed and checkpoint["num_updates"] == 4
    refused = run_recipe(recipe, *opts, "--tag", "/seed1", timeout=60)
    assert refused.returncode == 2 and "--tag" in refused.stderr


def test_another_conf_dir_has_its_own_exp_root(tmp_path: Path, prepared_minisynth: Path):
    """--conf-dir conf/alt trains in exp/conf_alt/ and writes nothing in the default exp root, so
    its models never resume from or overwrite conf/'s. Stage 6 (the LM) stands for every stage."""
    recipe = recipe_with_data(tmp_path, prepared_minisynth)
    alt = recipe / "conf/alt"
    alt.mkdir()
    for path in (recipe / "conf").glob("*.yaml"):  # one level deeper: the `_base_:` paths get one more ../
        (alt / path.name).write_text(path.read_text().replace("../../../conf/", "../../../../conf/"))
    result = run_recipe(recipe, *SMOKE, "--conf-dir", "conf/alt", "--stage", "6", "--stop-stage", "6", timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    lm = recipe / "exp/conf_alt/lm_char_40"
    for name in (".done", "model_final.pt", "perplexity.json", "words.txt"):
        assert (lm / name).exists(), name
    assert [path.name for path in (recipe / "exp").iterdir()] == ["conf_alt"]


def test_fbank_stage_skips_manifests_with_features(tmp_path: Path, prepared_minisynth: Path):
    """Stage 2 computes fbank for each split's manifest, not again for manifests that have it:
    stage 5's speed-perturbed copies of an fbank subset are named *_fbank_sp<factors>.jsonl.gz."""
    recipe = recipe_with_data(tmp_path, prepared_minisynth)
    manifests = recipe / "data/manifests"
    shutil.copy(manifests / "minisynth_cuts_dev.jsonl.gz", manifests / "minisynth_cuts_train_30_fbank_sp1.1.jsonl.gz")
    result = run_recipe(recipe, *SMOKE, "--frontend", "w2vbert", "--stage", "2", "--stop-stage", "2", timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    for split in ("train", "unlabeled", "dev", "test"):
        assert (manifests / f"minisynth_cuts_{split}_fbank.jsonl.gz").exists(), split
    # an earlier version's Kaldi-default fbank is refused, not taken as ready
    dev = manifests / "minisynth_cuts_dev_fbank.jsonl.gz"
    with gzip.open(dev, "rt") as f:
        rows = [json.loads(line) for line in f]
    for row in rows:
        row["features"]["type"] = "kaldi-fbank"
    with gzip.open(dev, "wt") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)
    refused = run_recipe(recipe, *SMOKE, "--frontend", "w2vbert", "--stage", "2", "--stop-stage", "2", timeout=600)
    assert refused.returncode == 2, refused.stderr[-3000:]
    assert ("fbank computed by another extractor than this version's: "
            "data/manifests/minisynth_cuts_dev_fbank.jsonl.gz (kaldi-fbank)") in refused.stderr
    assert not list(manifests.glob("*_fbank_*_fbank.jsonl.gz"))


def test_frontend_all_runs_each_frontend_in_turn(tmp_path: Path, prepared_minisynth: Path):
    """--frontend all is the same command once per frontend, in the registry's order, less the
    `--frontend all` (each result row records its own frontend's command). Stage 2 stands for
    every stage: each frontend says whether it computes features (the fbank ones find them made)."""
    recipe = recipe_with_data(tmp_path, prepared_minisynth)
    (recipe / "data/manifests/.fbank.done").touch()
    result = run_recipe(recipe, *SMOKE_DATA, "--frontend=all", "--stage", "2", "--stop-stage", "2", timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    commands = [line.split("--frontend all: ")[1] for line in result.stderr.splitlines() if "--frontend all: " in line]
    frontends = ["wav2vec2", "hubert", "wavlm", "w2vbert"]
    assert [shlex.split(command) for command in commands] == [
        ["./run.sh", *SMOKE_DATA, "--stage", "2", "--stop-stage", "2", "--frontend", f] for f in frontends]
    said = [line.split("[stage 2] ")[1] for line in result.stderr.splitlines() if "[stage 2] " in line]
    assert said == [f"{f} reads raw waveforms: no features to compute" for f in frontends[:3]] + ["fbank ready"]
    # options that contradict it are refused before any work
    for bad in (["--init-from", str(recipe)], ["--force", "true"]):
        refused = run_recipe(recipe, "--frontend", "all", *bad, timeout=60)
        assert refused.returncode == 2 and "--frontend all" in refused.stderr, refused.stderr[-2000:]


NODE_1 = ["--launcher", "torchrun --nnodes 2 --node_rank 1 --master_addr 127.0.0.1 --nproc_per_node 1"]


@pytest.mark.parametrize("marker_age_s, expected", [
    (-60, "node 1: node 0 failed in its pretraining manifest"),  # written after node 1 started
    (3600, "node 1: node 0's pretraining manifest (data/manifests/minisynth_cuts_pretrain.jsonl.gz) "
           "not there, or older than its inputs, after 0 h (--node-wait-hours)"),  # an earlier run's failure: waits, up to the limit
])
def test_other_nodes_stop_when_node_0_fails_its_stage_4_work(tmp_path: Path, prepared_minisynth: Path,
                                                              marker_age_s: int, expected: str):
    """A multi-node HuBERT stage 4 on node 1: the manifest and k-means are node 0's to write.
    Node 0 failing leaves .node0_failed, and node 1 stops instead of waiting forever; a marker
    from before node 1 started is an earlier run's, and node 1 waits (here 0 h) for the manifest."""
    recipe = recipe_with_data(tmp_path, prepared_minisynth)
    failed = recipe / "exp/pretrain_hubert/.node0_failed"
    failed.parent.mkdir(parents=True)
    failed.touch()
    stamp = time.time() - marker_age_s
    os.utime(failed, (stamp, stamp))
    wait_hours = ["--node-wait-hours", "0"] if marker_age_s > 0 else []
    result = run_recipe(recipe, *SMOKE, *NODE_1, *wait_hours, "--frontend", "hubert", "--stage", "4",
                        "--stop-stage", "4", timeout=120)
    assert result.returncode == 1, result.stderr[-3000:]
    assert expected in result.stderr, result.stderr[-3000:]
    assert not (recipe / "exp/pretrain_hubert/.done").exists()


@pytest.mark.parametrize("manifest_age_s, force, waits_for", [
    # newer than the splits: taken (a k-means marker has no inputs to be older than)
    (-60, [], "iteration 1 k-means (exp/pretrain_hubert/iter1/.kmeans.done) not there"),
    # a split made again since
    (3600, [], "pretraining manifest (data/manifests/minisynth_cuts_pretrain.jsonl.gz) not there, or older than its inputs"),
    # under --force, node 0 makes them again: an earlier run's (from before node 0 started) are not taken
    (-60, ["--force", "true"], "pretraining manifest (data/manifests/minisynth_cuts_pretrain.jsonl.gz) not there, "
                               "or older than its inputs"),
    ("after node 0 started", ["--force", "true"], "iteration 1 k-means (exp/pretrain_hubert/iter1/.kmeans.done) "
                                                  "not there, or older than its inputs"),
    # ... and until node 0 of this run beats, whose start they are not known to follow
    ("no node 0", ["--force", "true"], "node 0 of this run has not started (no beat in exp/.node0_alive."),
])
def test_other_nodes_take_a_pretraining_manifest_only_if_made_from_the_current_splits(
        tmp_path: Path, prepared_minisynth: Path, manifest_age_s, force: list, waits_for: str):
    """Node 1 of a HuBERT stage 4 finds a pretraining manifest left by an earlier run. Node 0
    combines it again, so it is taken only if no split manifest is newer (the same content);
    one older than a split would start node 1's training on other cuts than node 0's. Under
    --force, node 0 removes the earlier run's k-means markers, maybe after node 1 looked: node 1
    takes only what node 0 made after it started (a start stamp, with a beat since node 1 started:
    taking what was made after node 1's own start hung a node started a little after node 0)."""
    recipe = recipe_with_data(tmp_path, prepared_minisynth)
    manifests = recipe / "data/manifests"
    pretrain = manifests / "minisynth_cuts_pretrain.jsonl.gz"
    shutil.copy(manifests / "minisynth_cuts_train.jsonl.gz", pretrain)
    if force:  # data/ made 10 min earlier (each file's order kept): the manifests too, before node 0 started
        for path in (recipe / "data").rglob("*"):
            made = path.stat().st_mtime - 600
            os.utime(path, (made, made))
    if manifest_age_s != "no node 0" and force:
        node_0_running(recipe / "exp", NODE_1[1], started=time.time() - 30)
    if manifest_age_s == "after node 0 started":
        stamp = time.time() - 10  # before node 1 started: taken, node 0 made it in this run
        kmeans_done = recipe / "exp/pretrain_hubert/iter1/.kmeans.done"  # an earlier run's
        kmeans_done.parent.mkdir(parents=True)
        kmeans_done.touch()
        os.utime(kmeans_done, (time.time() - 120,) * 2)
    elif manifest_age_s == "no node 0":
        stamp = time.time() - 10
    else:
        stamp = (manifests / "minisynth_cuts_train.jsonl.gz").stat().st_mtime - manifest_age_s
    os.utime(pretrain, (stamp, stamp))
    result = run_recipe(recipe, *SMOKE, *NODE_1, "--node-wait-hours", "0", "--frontend", "hubert", "--stage", "4",
                        "--stop-stage", "4", *force, timeout=120)
    assert result.returncode == 1, result.stderr[-3000:]
    said = f"node 1: {waits_for}" if manifest_age_s == "no node 0" else f"node 1: node 0's {waits_for}, after 0 h"
    assert said in result.stderr, \
        result.stderr[-3000:]
