"""Running the minisynth recipe at smoke size from tests: a scratch copy of the recipe, and a
corpus prepared once per test session (stages 0-3) that each frontend/head test starts from."""

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SMOKE_DATA = ["--data-opts", "--num-train 40 --num-unlabeled 40 --num-dev 8 --num-test 8"]
SMOKE = SMOKE_DATA + [
    "--pretrain-opts", "trainer.max_updates=4 trainer.checkpoint_every=2 data.max_duration=15",
    "--finetune-opts", "trainer.max_updates=4 trainer.valid_every=0 data.max_duration=15",
    "--lm-opts", "trainer.max_updates=4 trainer.valid_every=0",
]


def recipe_copy(tmp_path: Path) -> Path:
    """The recipe and the shared driver in a scratch tree, so the test never writes into the repo."""
    shutil.copytree(REPO / "local", tmp_path / "local")
    shutil.copytree(REPO / "conf", tmp_path / "conf")
    shutil.copytree(REPO / "egs" / "minisynth", tmp_path / "egs" / "minisynth",
                    ignore=shutil.ignore_patterns("data", "exp", "corpus", "RESULTS.md", "RESULTS.jsonl"))
    return tmp_path / "egs" / "minisynth"


def run_recipe(recipe: Path, *args: str, **popen) -> subprocess.CompletedProcess:
    env = dict(os.environ, SSLASR_PYTHON=sys.executable)
    return subprocess.run(["./run.sh", *args], cwd=recipe, env=env, capture_output=True, text=True, **popen)


def recipe_with_data(tmp_path: Path, prepared: Path) -> Path:
    """A fresh recipe copy whose data/ (corpus, manifests, tokenizer) is the prepared one's.
    Manifests point at the corpus audio by absolute path, which stays in `prepared`."""
    recipe = recipe_copy(tmp_path)
    shutil.copytree(prepared / "data", recipe / "data")
    return recipe


def dry_run_parameters(summary: str) -> float:
    """Millions of parameters in the summary sslasr.bin.train.dry_run prints
    (`model: AsrModel, 9.68M parameters`)."""
    return float(summary.split("model: ")[1].split(", ")[1].split("M")[0])


def node_0_running(exp: Path, launcher: str, started: float) -> None:
    """What node 0 of a multi-node run leaves on the shared exp dir while it runs (local/ssl_asr.sh):
    its start stamp (at STARTED, a time) and a fresh heartbeat, both named by the run's key (the
    cksum of its launcher less --node_rank)."""
    key = subprocess.run(["bash", "-c", "printf '%s' \"$1\" | sed -E 's/--node[_-]rank[= ]*[0-9]+//' | cksum "
                          "| cut -d' ' -f1", "-", launcher], capture_output=True, text=True, check=True).stdout.strip()
    exp.mkdir(parents=True, exist_ok=True)
    (exp / f".node0_started.{key}").touch()
    os.utime(exp / f".node0_started.{key}", (started, started))
    (exp / f".node0_alive.{key}").touch()
    beat = time.time() + 5  # after the node under test starts
    os.utime(exp / f".node0_alive.{key}", (beat, beat))
