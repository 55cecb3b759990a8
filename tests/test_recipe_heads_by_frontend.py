"""Every head on every frontend through the recipe, at smoke size.

The CTC head runs on each frontend in that frontend's own recipe test, and the attention and
transducer heads on wav2vec 2.0 in theirs; here the two other heads run on HuBERT, WavLM and
w2v-BERT encoders (scratch systems: pretraining is head-independent and tested per frontend),
from fine-tuning through LM fusion tuning, decoding and scoring."""

import json
import shutil
from pathlib import Path

import pytest
import torch

from recipe_smoke import SMOKE, recipe_with_data, run_recipe

# Narrow beams and one λ, β point (either head): a 4-update model's hypotheses run to the length limit.
SMOKE_DECODING = "decode.beam_size=2 decode.tune.lm_weight=[0.3] decode.tune.length_bonus=[0.5]"
METHODS = {
    "attention": ["attention_greedy", "attention_beam", "attention_beam+lm"],
    "transducer": ["transducer_greedy", "transducer_beam", "transducer_beam+lm"],
}


@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng is not installed")
@pytest.mark.parametrize("frontend", ["hubert", "wavlm", "w2vbert"])
def test_attention_and_transducer_heads_on_frontend(tmp_path: Path, prepared_minisynth: Path, frontend: str):
    recipe = recipe_with_data(tmp_path, prepared_minisynth)
    first_stage = "2"  # w2v-BERT's fbank features; a no-op for the waveform frontends
    for head in ("attention", "transducer"):
        opts = list(SMOKE)
        opts[opts.index("--finetune-opts") + 1] += " " + SMOKE_DECODING
        result = run_recipe(recipe, *opts, "--frontend", frontend, "--head", head, "--no-pretrain", "true",
                            "--stage", first_stage, timeout=900)
        assert result.returncode == 0, f"{head}: " + result.stderr[-4000:]
        first_stage = "5"
        system = recipe / "exp" / f"{head}_scratch_{frontend}_all"
        checkpoint = torch.load(system / "model_final.pt", map_location="cpu", weights_only=False)
        assert checkpoint["config"]["frontend"]["name"] == frontend
        assert checkpoint["config"]["head"]["name"] == head
        assert len((system / f"decode_test_{head}_greedy" / "hyp.txt").read_text().splitlines()) == 8
    rows = [json.loads(line) for line in (recipe / "exp" / "results.jsonl").read_text().splitlines()]
    assert sorted((r["head"], r["decoding"], r["test_set"]) for r in rows) == sorted(
        (head, method, test_set) for head in METHODS for method in METHODS[head] for test_set in ("dev", "test"))
    assert all(r["frontend"] == "none" and r["num_utts"] == 8 for r in rows)
    fused = [r for r in rows if r["decoding"].endswith("+lm")]
    assert all(r["lm_weight"] == 0.3 and r["length_bonus"] == 0.5 for r in fused)
