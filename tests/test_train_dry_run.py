"""`sslasr.bin.train --dry-run`: the config checks (every problem reported at once; real training
runs them too) and the summary of the built model, on the minisynth configs."""

import pytest

from recipe_smoke import REPO
from sslasr.bin.train import dry_run
from sslasr.models.asr import build_asr_model
from sslasr.train.config_check import ConfigError, check_training_config, effective_batch
from sslasr.utils.config import load_configs

MINISYNTH = REPO / "egs" / "minisynth" / "conf"


def _finetune_cfg(**overrides):
    cfg = load_configs([MINISYNTH / "frontend_wav2vec2.yaml", MINISYNTH / "finetune_ctc.yaml"],
                       [f"{k}={v}" for k, v in overrides.items()])
    return cfg


def test_recipe_configs_pass():
    check_training_config(_finetune_cfg())
    check_training_config(load_configs([MINISYNTH / "frontend_wav2vec2.yaml", MINISYNTH / "pretrain.yaml"]))
    check_training_config(load_configs([MINISYNTH / "lm.yaml"]))


def test_every_problem_is_reported_at_once():
    cfg = _finetune_cfg(**{"optim.learning_rate": "1e-3", "scheduler.phase_ratio": "[0.1, 0.4, 0.4]",
                           "trainer.amp": "fp32", "data.max_duration": "-5", "trainer.accum_grad": "0"})
    with pytest.raises(ConfigError) as error:
        check_training_config(cfg)
    message = str(error.value)
    for expected in ("optim: unknown keys ['learning_rate']", "scheduler.phase_ratio must be three",
                     "trainer.amp must be one of none, bf16, fp16, got 'fp32'",
                     "data.max_duration must be a positive number, got -5",
                     "trainer.accum_grad must be a positive integer, got 0"):
        assert expected in message
    assert len(message.splitlines()) == 6  # the heading and the five problems


@pytest.mark.parametrize("overrides, expected", [
    ({"scheduler": "{name: cosine}"}, "scheduler.name 'cosine' is not one of polynomial, tri_stage, constant"),
    ({"scheduler.warmup_ratio": "0.1"}, "scheduler: unknown keys ['warmup_ratio'] for tri_stage"),
    ({"optim.betas": "[0.9]"}, "optim.betas must be two numbers in [0, 1)"),
    ({"trainer.max_updates": "0"}, "trainer.max_updates must be a positive integer"),
    ({"trainer.final_model": "mean"}, "trainer.final_model must be one of last, best, average, got 'mean'"),
    ({"trainer.average_models": "0"}, "trainer.average_models must be a positive integer"),
    ({"trainer.best_metric": "5"}, "trainer.best_metric must name a validation metric"),
    ({"scheduler.final_lr_scale": "2.0"}, "learning-rate scales outside [0, 1]"),
])
def test_single_problems(overrides, expected):
    with pytest.raises(ConfigError, match=expected.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        check_training_config(_finetune_cfg(**overrides))


def test_effective_batch_multiplies_accumulation_and_processes():
    cfg = _finetune_cfg(**{"data.max_duration": "87.5", "trainer.accum_grad": "8"})
    assert effective_batch(cfg, 8).startswith("5600 s = 1.56 h of audio (87.5 s × 8 accum × 8 proc)")
    lm = load_configs([MINISYNTH / "lm.yaml"], ["trainer.accum_grad=3"])
    assert effective_batch(lm, 2) == f"{lm['data']['max_tokens'] * 6} tokens ({lm['data']['max_tokens']} × 3 accum × 2 proc)"


def test_dry_run_summary_counts_the_models_parameters():
    cfg = _finetune_cfg()
    expected = sum(p.numel() for p in build_asr_model(cfg, 31).parameters())
    summary = dry_run(cfg, 31, world_size=1)
    assert f"model: AsrModel, {expected / 1e6:.3g}M parameters" in summary
    assert "updates: 900, peak lr 0.005, scheduler tri_stage, amp none" in summary


def test_dry_run_checks_an_init_checkpoint_fits(tmp_path):
    cfg = _finetune_cfg(**{"finetune.init_from": str(tmp_path / "missing.pt")})
    with pytest.raises(FileNotFoundError):
        dry_run(cfg, 31, world_size=1)


def test_training_refuses_a_config_the_check_rejects(tmp_path):
    """Not only --dry-run: a real run stops before training on a mistyped override."""
    from sslasr.bin.train import main
    with pytest.raises(SystemExit, match=r"optim: unknown keys \['bogus'\]"):
        main(["--config", str(MINISYNTH / "frontend_wav2vec2.yaml"), str(MINISYNTH / "finetune_ctc.yaml"),
              "--exp-dir", str(tmp_path / "exp"), "--set", "task=asr", "optim.bogus=1"])
    assert not (tmp_path / "exp").exists()


def test_a_config_file_removes_sections_merged_before_it(tmp_path):
    """`_remove_` takes dotted keys away from the files merged before (and from its own bases),
    leaves absent ones alone, and adds its own keys after; the earlier dicts are not changed."""
    (tmp_path / "family.yaml").write_text(
        "frontend: {encoder: {dropout_input: 0.0, transformer: {layerdrop: 0.1}, mask: {time_prob: 0.65}}}\n"
        "optim: {lr: 1.0}\n")
    (tmp_path / "base.yaml").write_text("_base_: family.yaml\nhead: {name: ctc}\n")
    (tmp_path / "other.yaml").write_text(
        "_remove_: [frontend.encoder.transformer, frontend.encoder.dropout_input, nowhere.at.all, optim.lr.x]\n"
        "frontend: {encoder: {conformer: {layerdrop: 0.1}}}\n")
    cfg = load_configs([tmp_path / "base.yaml", tmp_path / "other.yaml"])
    assert cfg["frontend"]["encoder"] == {"mask": {"time_prob": 0.65}, "conformer": {"layerdrop": 0.1}}
    assert cfg["optim"] == {"lr": 1.0} and cfg["head"] == {"name": "ctc"} and "_remove_" not in cfg
    (tmp_path / "child.yaml").write_text("_base_: family.yaml\n_remove_: optim\n")
    (tmp_path / "shared.yaml").write_text("_base_: other.yaml\n")  # a _remove_ inherited from a base
    assert load_configs([tmp_path / "base.yaml", tmp_path / "shared.yaml"]) == cfg
    family = load_configs([tmp_path / "family.yaml"])
    assert load_configs([tmp_path / "child.yaml"]) == {"frontend": family["frontend"]} and "optim" in family
