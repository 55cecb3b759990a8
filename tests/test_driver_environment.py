"""The stage driver reads a corpus's presets (frontend, vocab_size, ...) as ${name:-default}; the
same names exported in the user's shell are refused rather than taken as presets unseen."""

import os
import subprocess
import sys

from recipe_smoke import recipe_copy


def run_with_environment(recipe, **exported):
    env = dict(os.environ, SSLASR_PYTHON=sys.executable, **exported)
    return subprocess.run(["./run.sh", "--stage", "100"], cwd=recipe, env=env, capture_output=True, text=True,
                          timeout=60)


def test_an_exported_preset_is_refused_naming_the_option_to_use(tmp_path):
    recipe = recipe_copy(tmp_path)
    assert run_with_environment(recipe).returncode == 0  # nothing exported: nothing refused
    for name, option in [("frontend", "--frontend"), ("vocab_size", "--vocab-size"), ("conf_dir", "--conf-dir")]:
        refused = run_with_environment(recipe, **{name: "hubert"})
        assert refused.returncode == 2, (name, refused.stderr)
        assert f"'{name}' is exported in the environment" in refused.stderr and f"pass {option} instead" in refused.stderr
