import shutil

import pytest

from recipe_smoke import SMOKE_DATA, recipe_copy, run_recipe


@pytest.fixture(scope="session")
def prepared_minisynth(tmp_path_factory):
    """minisynth at smoke size through stages 0-3 (corpus, manifests, tokenizer), once per session.
    Copy it with recipe_smoke.recipe_with_data before running later stages."""
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed")
    recipe = recipe_copy(tmp_path_factory.mktemp("prepared_minisynth"))
    result = run_recipe(recipe, *SMOKE_DATA, "--stop-stage", "3", timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    return recipe
