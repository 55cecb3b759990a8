"""The minisynth recipe end to end at smoke size: every stage, results rows, RESULTS.md,
skipping of finished stages, and resumption of pretraining after a SIGKILL."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SMOKE = [
    "--data-opts", "--num-train 40 --num-unlabeled 40 --num-dev 8 --num-test 8",
    "--pretrain-opts", "trainer.max_updates=4 trainer.checkpoint_every=2 data.max_duration=15",
    "--finetune-opts", "trainer.max_updates=4 trainer.valid_every=0 data.max_duration=15",
]

pytestmark = pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng is not installed")


def recipe_copy(tmp_path: Path) -> Path:
    """The recipe and the shared driver in a scratch tree, so the test never writes into the repo."""
    shutil.copytree(REPO / "local", tmp_path / "local")
    shutil.copytree(REPO / "conf", tmp_path / "conf")
    shutil.copytree(REPO / "egs" / "minisynth", tmp_path / "egs" / "minisynth",
                    ignore=shutil.ignore_patterns("data", "exp", "corpus", "RESULTS.md"))
    return tmp_path / "egs" / "minisynth"


def run_recipe(recipe: Path, *args: str, **popen) -> subprocess.CompletedProcess:
    env = dict(os.environ, SSLASR_PYTHON=sys.executable)
    return subprocess.run(["./run.sh", *args], cwd=recipe, env=env, capture_output=True, text=True, **popen)


@pytest.fixture(scope="module")
def finished_recipe(tmp_path_factory) -> Path:
    recipe = recipe_copy(tmp_path_factory.mktemp("minisynth"))
    result = run_recipe(recipe, *SMOKE, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    return recipe


def test_every_stage_writes_its_outputs(finished_recipe: Path):
    recipe = finished_recipe
    for marker in ["data/.data.done", "data/manifests/.done", "data/lang_char_40/.done",
                   "exp/pretrain_wav2vec2/.done", "exp/ctc_wav2vec2_all/.done", "exp/ctc_scratch_wav2vec2_all/.done"]:
        assert (recipe / marker).exists(), marker
    validation = json.loads((recipe / "data/manifests/minisynth_train_validation.json").read_text())
    assert validation["kept"] == 40
    hyp = (recipe / "exp/ctc_wav2vec2_all/decode_test_ctc_greedy/hyp.txt").read_text().splitlines()
    assert len(hyp) == 8


def test_results_rows_and_table(finished_recipe: Path):
    rows = [json.loads(line) for line in (finished_recipe / "exp/results.jsonl").read_text().splitlines()]
    assert len(rows) == 4  # {pretrained, scratch} x {dev, test}
    assert {(r["pretrained"], r["frontend"], r["test_set"]) for r in rows} == {
        (True, "wav2vec2", "dev"), (True, "wav2vec2", "test"), (False, "none", "dev"), (False, "none", "test")}
    for row in rows:
        assert row["corpus"] == "minisynth" and row["head"] == "ctc" and row["decoding"] == "ctc_greedy"
        assert row["num_utts"] == 8 and row["num_words"] > 8
        assert row["sub"] + row["del"] + row["ins"] == pytest.approx(row["wer"] * row["num_words"] / 100, abs=0.01)
        assert 0 < row["labeled_seconds"] < 200  # 40 short utterances
        assert row["command"].startswith("./run.sh")
    table = (finished_recipe / "RESULTS.md").read_text()
    assert "do not edit" in table.lower() and "./run.sh --data-opts" in table


def test_rerun_skips_finished_stages(finished_recipe: Path):
    before = (finished_recipe / "exp/results.jsonl").read_text()
    start = time.monotonic()
    result = run_recipe(finished_recipe, *SMOKE, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "pretrained wav2vec2 ready" in result.stderr
    assert (finished_recipe / "exp/results.jsonl").read_text() == before  # nothing scored twice
    assert time.monotonic() - start < 120


def test_pretraining_resumes_after_sigkill(tmp_path: Path):
    recipe = recipe_copy(tmp_path)
    opts = list(SMOKE)
    opts[opts.index("--pretrain-opts") + 1] = ("trainer.max_updates=12 trainer.checkpoint_every=2 "
                                               "data.max_duration=10")
    prepared = run_recipe(recipe, *opts, "--stop-stage", "3", timeout=600)
    assert prepared.returncode == 0, prepared.stderr[-4000:]

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
