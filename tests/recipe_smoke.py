"""Running the minisynth recipe at smoke size from tests: a scratch copy of the recipe, and a
corpus prepared once per test session (stages 0-3) that each frontend/head test starts from."""

import os
import shutil
import subprocess
import sys
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
