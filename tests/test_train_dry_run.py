"""`sslasr.bin.train --dry-run`: the config checks (every problem reported at once; real training
runs them too), the summary of the built model on the minisynth configs, and the init checkpoint's
encoder weights: every misfit named, nothing copied unless all fit."""

import re
import socket
import subprocess
import sys
import time

import pytest
import torch
from torch import nn

from recipe_smoke import REPO
from sslasr.bin.train import dry_run
from sslasr.models.asr import build_asr_model, load_encoder_weights
from sslasr.models.state_dicts import state_dict_mismatches
from sslasr.train.config_check import ConfigError, check_training_config, effective_batch
from sslasr.utils.config import load_configs, settings_digest
from sslasr.utils.io import DirectoryInUse, lock_directory

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
    ({"trainer.find_unused_parameter": "false"}, "trainer: unknown keys ['find_unused_parameter'] (the trainer reads"),
    ({"trainer.find_unused_parameters": "1"}, "trainer.find_unused_parameters must be true or false, got 1"),
    # mistyped keys that were ignored: unnormalised waveforms, a "pretrained" system from scratch
    ({"data.normalise_waveform": "true"}, "data: unknown keys ['normalise_waveform'] (read: train_cuts"),
    ({"finetune.init_form": "exp/pretrain/model_final.pt"}, "finetune: unknown keys ['init_form']"),
    ({"init.encoder": "exp/pretrain/model_final.pt"}, "init: unknown keys ['encoder'] (read: encoder_from)"),
    ({"scheduler.final_lr_scale": "0"}, "scheduler.final_lr_scale must be a positive number, got 0"),
    ({"scheduler.phase_updates": "[8000, 0, 72000]"}, "scheduler: phase_ratio and phase_updates both given"),
    ({"scheduler": "{name: tri_stage, phase_updates: [0.1, 0.4, 0.5]}"},
     "scheduler.phase_updates must be three whole numbers of updates"),
    ({"scheduler": "{name: tri_stage, phase_updates: [0, 0, x]}"}, "scheduler.phase_updates must be three whole"),
    # accepted, then ignored or fatal late: a mistyped section, another task's, an empty one
    ({"trainr.max_updates": "5"}, "unknown top-level sections ['trainr'] (known: task, frontend"),
    ({"init.encoder_from": "exp/pretrain/model_final.pt"},
     "the init section is read by task pretrain only; this config's task is 'asr'"),
    ({"finetune": "null"}, "empty sections ['finetune'] (keys all commented out"),
    # polynomial warm-up: one key silently won over the other; a ratio under the updates' key was 1 update
    ({"scheduler": "{name: polynomial, warmup_updates: 10, warmup_ratio: 0.1}"},
     "scheduler: warmup_updates and warmup_ratio both given; give one"),
    ({"scheduler": "{name: polynomial, warmup_updates: 0.08}"},
     "scheduler.warmup_updates must be an integer in [1, trainer.max_updates = "),
    ({"scheduler": "{name: polynomial, warmup_ratio: 8}"}, "scheduler.warmup_ratio must be a fraction in [0, 1), got 8"),
    ({"trainer.best_metric": "WER"}, "trainer.best_metric 'WER' is not a validation metric of task asr (wer, loss)"),
    ({"finetune.freeze_feature_extractor": "'false'"},
     "finetune.freeze_feature_extractor must be true or false, got 'false'"),
    ({"finetune.reinit_top_layers": "true"}, "finetune.reinit_top_layers must be a non-negative integer, got True"),
])
def test_single_problems(overrides, expected):
    with pytest.raises(ConfigError, match=expected.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        check_training_config(_finetune_cfg(**overrides))


def test_a_pretraining_config_with_a_fine_tuning_start_is_refused():
    """finetune.init_from in a pretraining config was never read: the encoder started at random."""
    cfg = load_configs([MINISYNTH / "frontend_wav2vec2.yaml", MINISYNTH / "pretrain.yaml"],
                       ["finetune.init_from=exp/other/model_final.pt", "trainer.best_metric=wer"])
    with pytest.raises(ConfigError, match="the finetune section is read by task asr only; this config's task is 'pretrain'"):
        check_training_config(cfg)


def test_an_lm_config_reads_text_keys_only():
    cfg = load_configs([MINISYNTH / "lm.yaml"], ["data.train_txt=x.txt", "data.max_duration=10"])
    with pytest.raises(ConfigError, match=r"data: unknown keys \['max_duration', 'train_txt'\]"):
        check_training_config(cfg)


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


def test_dry_run_of_an_fbank_pretraining_reads_no_data(tmp_path):
    """It built the pretraining task, which opens the cuts to check their features: a w2v-BERT
    config could not be checked before its data existed."""
    cfg = load_configs([MINISYNTH / "frontend_w2vbert.yaml", MINISYNTH / "pretrain.yaml"],
                       [f"data.train_cuts={tmp_path}/none.jsonl.gz", f"data.valid_cuts={tmp_path}/none.jsonl.gz"])
    summary = dry_run(cfg, None, world_size=1)
    assert "task: pretrain" in summary and "model: W2vBertPretrainer" in summary


def test_dry_run_checks_an_init_checkpoint_fits(tmp_path):
    cfg = _finetune_cfg(**{"finetune.init_from": str(tmp_path / "missing.pt")})
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        dry_run(cfg, 31, world_size=1)


def test_dry_run_reports_an_init_checkpoint_that_does_not_fit(tmp_path, monkeypatch):
    """An encoder checkpoint with a tensor missing and one of another shape: --dry-run exits with
    a message naming both (a RuntimeError from load_state_dict used to escape it)."""
    from sslasr.bin.train import main
    monkeypatch.chdir(tmp_path)  # data.tokenizer (relative) is absent: the vocabulary is --vocab-size
    encoder = build_asr_model(_finetune_cfg(), 31).encoder.state_dict()
    first, last = next(iter(encoder)), list(encoder)[-1]
    wanted_shape = tuple(encoder[first].shape)
    encoder[first] = torch.zeros(3)
    del encoder[last]
    torch.save({"model": {f"encoder.{k}": v for k, v in encoder.items()}}, tmp_path / "init.pt")
    with pytest.raises(SystemExit) as stop:
        main(["--dry-run", "--vocab-size", "31", "--config", str(MINISYNTH / "frontend_wav2vec2.yaml"),
              str(MINISYNTH / "finetune_ctc.yaml"), "--set", f"finetune.init_from={tmp_path / 'init.pt'}"])
    assert str(stop.value) == (f"--dry-run: {tmp_path / 'init.pt'}: its encoder weights do not fit the configured "
                               f"encoder: 1 missing: {last}; 1 shape mismatch: {first} (checkpoint (3,), "
                               f"model {wanted_shape})")


class _TwoLayerAsr(nn.Module):
    """What load_encoder_weights needs of a model: an `encoder`."""

    def __init__(self, seed: int):
        super().__init__()
        torch.manual_seed(seed)
        self.encoder = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))


def _checkpoint(tmp_path, encoder_state) -> str:
    path = tmp_path / "pretrained.pt"
    torch.save({"model": {f"encoder.{k}": v for k, v in encoder_state.items()}}, path)
    return str(path)


def test_encoder_weights_that_fit_are_all_copied(tmp_path):
    source, target = _TwoLayerAsr(0), _TwoLayerAsr(1)
    assert load_encoder_weights(target, _checkpoint(tmp_path, source.encoder.state_dict())) == 4
    for key, value in source.encoder.state_dict().items():
        assert torch.equal(target.encoder.state_dict()[key], value), key


@pytest.mark.parametrize("change, problem", [
    (lambda state: state.pop("1.bias"), "1 missing: 1.bias"),
    (lambda state: state.update({"2.weight": torch.zeros(2, 2)}), "1 unexpected: 2.weight"),
    (lambda state: state.update({"1.weight": torch.zeros(2, 5)}),
     "1 shape mismatch: 1.weight (checkpoint (2, 5), model (2, 4))"),
])
def test_encoder_weights_that_do_not_fit_copy_nothing(tmp_path, change, problem):
    state = _TwoLayerAsr(0).encoder.state_dict()
    change(state)
    checkpoint = _checkpoint(tmp_path, state)
    target = _TwoLayerAsr(1)
    before = {k: v.clone() for k, v in target.encoder.state_dict().items()}
    with pytest.raises(ValueError) as error:
        load_encoder_weights(target, checkpoint)
    assert str(error.value) == f"{checkpoint}: its encoder weights do not fit the configured encoder: {problem}"
    for key, value in target.encoder.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_every_kind_of_misfit_is_named_at_once_and_long_lists_are_cut():
    wanted = _TwoLayerAsr(0).encoder.state_dict()
    loaded = {"0.weight": torch.zeros(4, 3), "0.bias": torch.zeros(5), "1.weight": torch.zeros(2, 4)}
    loaded.update({f"extra.{i}": torch.zeros(1) for i in range(12)})
    assert state_dict_mismatches(loaded, wanted) == [
        "1 missing: 1.bias",
        "12 unexpected: " + ", ".join(f"extra.{i}" for i in range(10)) + ", and 2 more",
        "1 shape mismatch: 0.bias (checkpoint (5,), model (4,))"]
    assert state_dict_mismatches(wanted, wanted) == []


def test_training_refuses_a_config_the_check_rejects(tmp_path):
    """Not only --dry-run: a real run stops before training on a mistyped override."""
    from sslasr.bin.train import main
    with pytest.raises(SystemExit, match=r"optim: unknown keys \['bogus'\]"):
        main(["--config", str(MINISYNTH / "frontend_wav2vec2.yaml"), str(MINISYNTH / "finetune_ctc.yaml"),
              "--exp-dir", str(tmp_path / "exp"), "--set", "task=asr", "optim.bogus=1"])
    assert not (tmp_path / "exp").exists()


def test_training_removes_the_temporary_config_of_a_killed_start(tmp_path):
    from sslasr.bin.train import main
    exp = tmp_path / "exp"
    exp.mkdir()
    (exp / ".config.yaml.k1ll.tmp.yaml").write_text("trainer: {max_upd")
    try:
        with pytest.raises(Exception):  # the tokenizer is missing: it stops after the lock is taken
            main(["--config", str(MINISYNTH / "frontend_wav2vec2.yaml"), str(MINISYNTH / "finetune_ctc.yaml"),
                  "--exp-dir", str(exp), "--set", "task=asr", f"data.tokenizer={tmp_path / 'missing'}"])
    finally:
        torch.set_flush_denormal(False)  # main() set it for this process: leave the other tests as they were
    assert not list(exp.glob(".config.yaml.*"))


def test_training_refuses_an_exp_dir_another_process_trains_in(tmp_path):
    """A second trainer in the same exp dir stops before writing anything there (log, config);
    the lock goes with its holder, also when that is killed."""
    from sslasr.bin.train import main
    exp = tmp_path / "exp"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from sslasr.utils.io import lock_directory; "
                               "lock = lock_directory(sys.argv[1]); print('locked', flush=True); time.sleep(60)",
                               str(exp)], stdout=subprocess.PIPE, text=True, cwd=REPO)
    try:
        assert holder.stdout.readline().strip() == "locked"
        args = ["--config", str(MINISYNTH / "frontend_wav2vec2.yaml"), str(MINISYNTH / "finetune_ctc.yaml"),
                "--exp-dir", str(exp), "--set", "task=asr", f"data.tokenizer={tmp_path / 'missing'}"]
        with pytest.raises(SystemExit, match=rf"{exp} is in use by another process \(pid {holder.pid}\)"):
            main(args)
        assert sorted(p.name for p in exp.iterdir()) == [".lock"]
    finally:
        holder.kill()
        holder.wait()
    lock = lock_directory(exp)  # free again once the holder is gone
    lock.close()


def test_lock_of_an_exited_holder_waits_for_its_forked_children(tmp_path):
    """A trainer killed with its data-loader workers still alive: they share its lock for the
    second or so they take to notice; the next run waits for them instead of failing."""
    code = ("import os, sys, time; from sslasr.utils.io import lock_directory; lock = lock_directory(sys.argv[1])\n"
            "if os.fork() == 0:\n    time.sleep(float(sys.argv[2])); os._exit(0)\n"
            "print('locked', flush=True)")
    def exited_holder(directory, child_seconds):
        holder = subprocess.Popen([sys.executable, "-c", code, str(directory), str(child_seconds)],
                                  stdout=subprocess.PIPE, text=True, cwd=REPO)
        assert holder.stdout.readline().strip() == "locked"
        holder.wait()
        return holder.pid
    pid = exited_holder(tmp_path / "a", 5)
    with pytest.raises(DirectoryInUse, match=rf"\(pid {pid}, exited; its children hold it\)"):
        lock_directory(tmp_path / "a", wait_for_exited=0.5)
    exited_holder(tmp_path / "b", 1.0)
    lock_directory(tmp_path / "b").close()  # waited for the child


def test_a_lock_held_on_another_host_names_that_host(tmp_path):
    """The exp dir is shared by the nodes: a holder's pid was looked up on this host (and blamed on
    exited children, or on an unrelated local process of that pid)."""
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from sslasr.utils.io import lock_directory; "
                               "lock = lock_directory(sys.argv[1]); print('locked', flush=True); time.sleep(60)",
                               str(tmp_path)], stdout=subprocess.PIPE, text=True, cwd=REPO)
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert (tmp_path / ".lock").read_text().split() == [str(holder.pid), socket.gethostname()]
        (tmp_path / ".lock").write_text("4242 node7\n")  # as a trainer on node7 leaves it
        started = time.monotonic()
        with pytest.raises(DirectoryInUse, match=r"\(pid 4242 on host node7\): stop it"):
            lock_directory(tmp_path, wait_for_exited=30)
        assert time.monotonic() - started < 5  # not waited for as exited
    finally:
        holder.kill()
        holder.wait()


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


def test_the_settings_digest_follows_settings_not_text(tmp_path):
    """What the driver records of a training's configs: their merged settings, _base_ included."""
    (tmp_path / "base.yaml").write_text("optim: {lr: 1.0e-3, betas: [0.9, 0.98]}\n")
    (tmp_path / "a.yaml").write_text("_base_: base.yaml\ntrainer: {max_updates: 10, seed: 1}\n1: one\n")
    (tmp_path / "b.yaml").write_text("# the same, written otherwise\n1: one\n_base_: base.yaml\n"
                                     "trainer:\n  seed: 1\n  max_updates: 10  # updates\n")
    digest = settings_digest([tmp_path / "a.yaml"])
    assert len(digest) == 16 and int(digest, 16) >= 0
    assert settings_digest([tmp_path / "b.yaml"]) == digest
    (tmp_path / "base.yaml").write_text("optim: {lr: 0.001, betas: [0.9, 0.98]}  # 1e-3\n")
    assert settings_digest([tmp_path / "a.yaml"]) == digest
    (tmp_path / "base.yaml").write_text("optim: {lr: 0.002, betas: [0.9, 0.98]}\n")
    assert settings_digest([tmp_path / "a.yaml"]) != digest
    (tmp_path / "later.yaml").write_text("trainer: {seed: 2}\n")  # merged in order: later files win
    assert settings_digest([tmp_path / "a.yaml", tmp_path / "later.yaml"]) != settings_digest([tmp_path / "a.yaml"])


@pytest.mark.parametrize("override, expected", [
    ("trainer.seed=08", "trainer.seed must be a non-negative integer, got '08'"),  # YAML 1.1: not octal, a string
    ("trainer.num_threads=on", "trainer.num_threads must be a non-negative integer, got True"),
    ("trainer.max_updates=1e5", "trainer.max_updates must be a positive integer, got 100000.0"),
    ("data.normalize_eps=0", "data.normalize_eps must be a positive number, got 0"),  # silence would be NaN
])
def test_numeric_settings_are_checked(override, expected):
    with pytest.raises(ConfigError, match=re.escape(expected)):
        check_training_config(_finetune_cfg(**dict([override.split("=")])))


@pytest.mark.parametrize("override, expected", [
    ("data.train_cuts=/data/run #2/cuts.jsonl.gz", "start of a comment"),  # was '/data/run'
    ("data.train_cuts=exp/a: b", "as a mapping"),                          # was {'exp/a': 'b'}
    ("trainer.seed=0123", "as octal"),                                     # was 83
    ("data.max_duration=1:30", "as base 60"),                              # was 90
])
def test_overrides_yaml_would_read_as_other_than_written_are_refused(override, expected):
    with pytest.raises(ValueError, match=expected):
        load_configs([MINISYNTH / "pretrain.yaml"], [override])
    key, value = override.split("=", 1)
    cfg = load_configs([MINISYNTH / "pretrain.yaml"], [f"{key}='{value}'"])  # quoted: as written
    assert cfg[key.split(".")[0]][key.split(".")[1]] == value
    assert load_configs([MINISYNTH / "pretrain.yaml"], ["data.tag=0:30"])["data"]["tag"] == "0:30"  # YAML's string


def test_an_override_leaves_sections_that_share_a_yaml_anchor_alone(tmp_path):
    """--set finetune.optim.lr=5 also set pretrain's and common's: the anchored dict, edited in place."""
    (tmp_path / "a.yaml").write_text("common: &c {optim: {lr: 1.0e-3}}\npretrain: {<<: *c}\nfinetune: {<<: *c}\n"
                                     "x: &d {lr: 1}\ny: *d\n")
    cfg = load_configs([tmp_path / "a.yaml"], ["finetune.optim.lr=5", "x.lr=2", "z.new=1"])
    assert cfg["finetune"]["optim"]["lr"] == 5 and cfg["x"]["lr"] == 2 and cfg["z"] == {"new": 1}
    assert cfg["pretrain"]["optim"]["lr"] == cfg["common"]["optim"]["lr"] == 1e-3 and cfg["y"]["lr"] == 1


def test_every_set_adds_its_overrides(tmp_path, capsys):
    """A second --set replaced the first one's overrides, silently."""
    from sslasr.bin import train
    train.main(["--dry-run", "--config", str(MINISYNTH / "frontend_wav2vec2.yaml"), str(MINISYNTH / "pretrain.yaml"),
                "--set", "trainer.max_updates=7", "--set", "optim.lr=5e-4"])
    summary = capsys.readouterr().out
    assert "updates: 7" in summary and "peak lr 0.0005" in summary


@pytest.mark.parametrize("text, expected", [
    ("trainer:\n  max_updates: 5\ntrainer:\n  seed: 1\n", "key 'trainer' given twice"),
    ("- a\n- b\n", "a config is a mapping of sections, not a list"),
    ("_base_: self.yaml\n", "_base_ includes form a cycle"),
    ("_base_:\n_remove_: [optim, 3]\n", "_remove_ takes a string or a list of strings"),  # was a TypeError
])
def test_config_files_that_would_lose_settings_are_errors(tmp_path, text, expected):
    merged = tmp_path / "merge.yaml"  # YAML merge keys are not keys given twice
    merged.write_text("base: &base {lr: 1.0, eps: 2.0}\noptim:\n  <<: *base\n  lr: 3.0\n")
    assert load_configs([merged])["optim"] == {"lr": 3.0, "eps": 2.0}
    path = tmp_path / "self.yaml"
    path.write_text(text)
    with pytest.raises(Exception, match=expected):
        load_configs([path])
    result = subprocess.run([sys.executable, "-m", "sslasr.bin.train", "--dry-run", "--config", str(path)],
                            capture_output=True, text=True)
    assert result.returncode == 2 and expected in result.stderr and "Traceback" not in result.stderr
