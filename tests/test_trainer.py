"""The shared trainer: exact resume after a kill, non-finite update skipping (also across DDP
ranks), gradient accumulation, a torchrun DDP smoke run and the final validation's WER.

The end-to-end runs use a tiny synthetic Kaldi-style corpus and a tiny wav2vec 2.0, launched as
subprocesses of `python -m sslasr.bin.train` exactly like the recipes do.
"""

import contextlib
import copy
import logging
import os
import re
import subprocess
import sys
import time
import types
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import pytest
import soundfile as sf
import torch
import torch.multiprocessing as mp
import yaml
from torch import nn

from sslasr.data.loader import load_cuts, make_dataloader
from sslasr.data.manifests import prepare_corpus
from sslasr.data.tokenizer import Tokenizer, train_tokenizer
from sslasr.models.asr import build_asr_model
from sslasr.scoring import align_counts
from sslasr.train.distributed import DistInfo, init_distributed, leave_distributed
from sslasr.train.tasks import AsrFinetuneTask, _init_encoder
from sslasr.train.trainer import Trainer, _finalize_valid, _Interval
from sslasr.utils.config import load_config
from sslasr.utils.threads import configure_cpu_math

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
TORCHRUN = str(Path(sys.executable).parent / "torchrun")
SR = 16000
WORDS = ["YES", "NO", "UP", "DOWN", "LEFT", "RIGHT", "GO", "STOP"]
SPEAKERS = {"spk1": 110.0, "spk2": 160.0, "spk3": 220.0}  # speaker: f0 in Hz
MAX_UPDATES, CKPT_EVERY, KILL_AT = 8, 2, 5
EXIT_ENV = "SSLASR_DEBUG_EXIT_AFTER_UPDATES"


# ====================================================================== tiny corpus
def _word(word: str, f0: float, rng: np.random.Generator) -> np.ndarray:
    """A vowel-ish burst: harmonics of f0 shaped by two word-specific 'formants'."""
    seconds = 0.22 + 0.03 * (len(word) % 4)
    t = np.arange(int(seconds * SR)) / SR
    f1 = 300.0 + 90.0 * (sum(map(ord, word)) % 7)
    f2 = 1200.0 + 150.0 * (sum(map(ord, word[::-1])) % 9)
    wave = np.zeros_like(t)
    for h in range(1, 20):
        freq = h * f0
        gain = np.exp(-((freq - f1) / 150.0) ** 2) + 0.6 * np.exp(-((freq - f2) / 250.0) ** 2) + 0.02
        wave += gain * np.sin(2 * np.pi * freq * t + rng.uniform(0, 2 * np.pi))
    envelope = np.sin(np.pi * t / seconds) ** 2
    return wave * envelope


def _utterance(words: List[str], f0: float, rng: np.random.Generator) -> np.ndarray:
    parts = [np.zeros(int(0.1 * SR))]
    for w in words:
        parts += [_word(w, f0, rng), np.zeros(int(rng.uniform(0.05, 0.12) * SR))]
    audio = np.concatenate(parts + [np.zeros(int(0.1 * SR))])
    audio = 0.5 * audio / np.abs(audio).max() + 0.003 * rng.standard_normal(audio.size)
    return audio.astype(np.float32)


def _write_split(split_dir: Path, utts: Dict[str, tuple], rng: np.random.Generator) -> None:
    (split_dir / "audio").mkdir(parents=True)
    wav, text, spk = [], [], []
    for utt, (speaker, words) in sorted(utts.items()):
        sf.write(split_dir / "audio" / f"{utt}.flac", _utterance(words, SPEAKERS[speaker], rng), SR)
        wav.append(f"{utt} audio/{utt}.flac\n")
        text.append(f"{utt} {' '.join(words)}\n")
        spk.append(f"{utt} {speaker}\n")
    (split_dir / "wav.scp").write_text("".join(wav))
    (split_dir / "text").write_text("".join(text))
    (split_dir / "utt2spk").write_text("".join(spk))


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny_corpus")
    rng = np.random.default_rng(0)
    train, dev = {}, {}
    for i in range(12):
        speaker = list(SPEAKERS)[i % 3]
        words = [WORDS[j] for j in rng.choice(len(WORDS), size=3 + i % 2, replace=False)]
        train[f"{speaker}-{i:02d}"] = (speaker, words)
    for i in range(3):
        speaker = list(SPEAKERS)[i]
        dev[f"{speaker}-dev{i}"] = (speaker, [WORDS[(2 * i + k) % len(WORDS)] for k in range(3)])
    _write_split(root / "corpus" / "train", train, rng)
    _write_split(root / "corpus" / "dev", dev, rng)
    manifests = root / "manifests"
    reports = prepare_corpus(root / "corpus", "tiny", ["train", "dev"], manifests, num_jobs=1)
    assert reports["train"]["kept"] == 12 and reports["dev"]["kept"] == 3, reports
    train_cuts = manifests / "tiny_cuts_train.jsonl.gz"
    durations = [c.duration for c in load_cuts(train_cuts)]
    assert all(1.0 <= d <= 2.0 for d in durations), durations
    tokenizer = train_tokenizer([" ".join(w) for _, w in train.values()], root / "lang", vocab_size=28)
    assert tokenizer.vocab_size > 3
    return {"root": root, "train": train_cuts, "dev": manifests / "tiny_cuts_dev.jsonl.gz",
            "lang": root / "lang"}


# ====================================================================== configs + runs
FRONTEND = {
    "frontend": {"name": "wav2vec2", "encoder": {
        "conv_layers": [[16, 10, 5], [16, 8, 4], [16, 4, 4], [16, 4, 4]],
        "conv_norm": "group", "conv_bias": False, "feature_grad_mult": 0.1, "dropout_input": 0.1,
        "transformer": {"dim": 32, "layers": 2, "heads": 2, "ffn_dim": 64, "dropout": 0.1,
                        "attention_dropout": 0.1, "activation_dropout": 0.0, "layer_norm_first": False,
                        "layerdrop": 0.0, "pos_conv_kernel": 16, "pos_conv_groups": 4}}},
    "pretrain": {"mask": {"time_prob": 0.65, "time_length": 10, "time_min_masks": 2},
                 "quantizer_groups": 2, "quantizer_entries": 8, "quantizer_dim": 16,
                 "quantizer_temperature": [2.0, 0.5, 0.9], "final_dim": 16, "num_negatives": 5,
                 "logit_temperature": 0.1, "diversity_weight": 0.1, "feature_penalty_weight": 10.0,
                 "dropout_features": 0.1, "collapse_warning_perplexity": 8.0},
}
TRAINER = {"max_updates": MAX_UPDATES, "accum_grad": 1, "clip_grad_norm": 10.0, "log_every": 1,
           "checkpoint_every": CKPT_EVERY, "seed": 0, "num_threads": 1}
DATA = {"max_duration": 4.0, "num_buckets": 2, "num_workers": 0}
PRETRAIN = {"task": "pretrain", "data": DATA,
            "optim": {"lr": 5.0e-3, "betas": [0.9, 0.98], "eps": 1.0e-6, "weight_decay": 0.01},
            "scheduler": {"name": "polynomial", "warmup_updates": 2, "end_lr_scale": 0.0, "power": 1.0},
            "trainer": dict(TRAINER, valid_every=0)}
ASR = {"task": "asr", "head": {"name": "ctc", "dropout": 0.1},
       "finetune": {"freeze_feature_extractor": True, "freeze_encoder_updates": 3},
       "frontend": {"encoder": {"mask": {"time_prob": 0.3, "time_length": 5, "time_min_masks": 0,
                                         "channel_prob": 0.1, "channel_length": 8}}},
       "data": DATA,
       "optim": {"lr": 5.0e-3, "betas": [0.9, 0.98], "eps": 1.0e-8, "weight_decay": 0.0},
       "scheduler": {"name": "tri_stage", "phase_ratio": [0.25, 0.25, 0.5], "init_lr_scale": 0.1,
                     "final_lr_scale": 0.05},
       "trainer": dict(TRAINER, valid_every=4)}


def _write_configs(root: Path) -> Dict[str, Path]:
    paths = {}
    for name, cfg in (("frontend", FRONTEND), ("pretrain", PRETRAIN), ("asr", ASR)):
        paths[name] = root / f"{name}.yaml"
        paths[name].write_text(yaml.safe_dump(cfg, sort_keys=False))
    return paths


def _env(exit_after: Optional[int] = None) -> Dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != EXIT_ENV}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    if exit_after is not None:
        env[EXIT_ENV] = str(exit_after)
    return env


def _train_cmd(configs: List[Path], exp_dir: Path, overrides: List[str]) -> List[str]:
    return [PY, "-m", "sslasr.bin.train", "--config", *map(str, configs), "--exp-dir", str(exp_dir),
            "--set", *overrides]


def _run_parallel(jobs: List[tuple]) -> List[subprocess.CompletedProcess]:
    """Start every (cmd, env) at once (two cores), wait for all; output kept for messages."""
    procs = [subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for cmd, env in jobs]
    results = []
    try:
        for (cmd, _), proc in zip(jobs, procs):
            out, _ = proc.communicate(timeout=300)
            results.append(subprocess.CompletedProcess(cmd, proc.returncode, out, None))
    finally:
        for proc in procs:  # only on a timeout or an error: never leave our runs behind
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return results


def _ok(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, f"{' '.join(result.args)} failed:\n{result.stdout[-4000:]}"


def _load(path: Path) -> Dict:
    return torch.load(path, map_location="cpu", weights_only=False)


def _batches_per_epoch(cuts: Path) -> int:
    loader = make_dataloader(load_cuts(cuts), input_type="waveform", max_duration=DATA["max_duration"],
                             shuffle=True, seed=0, num_buckets=DATA["num_buckets"])
    loader.sampler.set_epoch(0)
    return sum(1 for _ in loader.sampler)


def _killed_state(exp_dir: Path, result: subprocess.CompletedProcess) -> Dict:
    ckpt = exp_dir / "checkpoint_last.pt"
    return {"returncode": result.returncode, "output": result.stdout,
            "had_final": (exp_dir / "model_final.pt").exists(), "checkpoint": _load(ckpt) if ckpt.exists() else None}


@pytest.fixture(scope="session")
def runs(corpus, tmp_path_factory) -> Dict:
    """Every subprocess run, in three waves of parallel jobs (the machine has two cores):
      1. pretrain A (uninterrupted)  | pretrain B (killed after update KILL_AT)
      2. pretrain B resumed          | asr A (from pretrain A)  | asr B killed
      3. asr B resumed               | torchrun DDP smoke (2 ranks, pretraining)
    """
    root = tmp_path_factory.mktemp("runs")
    configs = _write_configs(root)
    pre_cfg, asr_cfg = [configs["frontend"], configs["pretrain"]], [configs["frontend"], configs["asr"]]
    data = [f"data.train_cuts={corpus['train']}", f"data.valid_cuts={corpus['dev']}"]
    pre = {"A": root / "pretrain" / "A", "B": root / "pretrain" / "B"}
    asr = {"A": root / "asr" / "A", "B": root / "asr" / "B"}
    asr_set = data + [f"data.tokenizer={corpus['lang']}", f"finetune.init_from={pre['A'] / 'model_final.pt'}"]
    ddp_exp = root / "ddp"
    ddp_cmd = [TORCHRUN, "--standalone", "--nproc_per_node", "2", "-m", "sslasr.bin.train",
               "--config", *map(str, pre_cfg), "--exp-dir", str(ddp_exp),
               "--set", f"data.train_cuts={corpus['train']}", f"data.valid_cuts={corpus['dev']}",
               "trainer.max_updates=3"]

    a, killed = _run_parallel([(_train_cmd(pre_cfg, pre["A"], data), _env()),
                               (_train_cmd(pre_cfg, pre["B"], data), _env(KILL_AT))])
    _ok(a)
    pre["killed"] = _killed_state(pre["B"], killed)
    resumed, a, killed = _run_parallel([(_train_cmd(pre_cfg, pre["B"], data), _env()),
                                        (_train_cmd(asr_cfg, asr["A"], asr_set), _env()),
                                        (_train_cmd(asr_cfg, asr["B"], asr_set), _env(KILL_AT))])
    _ok(a)
    pre["resumed"], asr["killed"] = resumed, _killed_state(asr["B"], killed)
    ddp_env = _env()
    if torch.cuda.device_count() < 2:  # two ranks need two GPUs; else both on the CPU (gloo)
        ddp_env["CUDA_VISIBLE_DEVICES"] = ""
    asr["resumed"], ddp = _run_parallel([(_train_cmd(asr_cfg, asr["B"], asr_set), _env()), (ddp_cmd, ddp_env)])
    return {"root": root, "pretrain": pre, "asr": asr, "ddp": {"exp": ddp_exp, "result": ddp}}


def _assert_same_models(a: Dict[str, torch.Tensor], b: Dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)}/{len(a)} tensors differ after resume, e.g. {different[:5]}"


@pytest.mark.parametrize("stage", ["pretrain", "asr"])
def test_resume_after_kill_is_exact(runs, corpus, stage):
    run = runs[stage]
    killed = run["killed"]
    assert killed["returncode"] == 137, killed["output"][-3000:]
    assert not killed["had_final"]
    ckpt = killed["checkpoint"]
    assert ckpt is not None and ckpt["num_updates"] == KILL_AT - KILL_AT % CKPT_EVERY == 4
    assert ckpt["epoch"] == 0 and ckpt["batches_done"] == 4 and len(ckpt["rng"]) == 1
    _ok(run["resumed"])
    assert "resumed from" in run["resumed"].stdout and "at update 4" in run["resumed"].stdout

    final_a, final_b = _load(run["A"] / "model_final.pt"), _load(run["B"] / "model_final.pt")
    assert final_a["num_updates"] == final_b["num_updates"] == MAX_UPDATES
    last_a, last_b = _load(run["A"] / "checkpoint_last.pt"), _load(run["B"] / "checkpoint_last.pt")
    # The data order was exercised across an epoch boundary, after the resume point.
    per_epoch = _batches_per_epoch(corpus["train"])
    assert 4 <= per_epoch < MAX_UPDATES, per_epoch
    assert last_a["epoch"] == last_b["epoch"] >= 1
    assert last_a["batches_done"] == last_b["batches_done"]
    # Training really moved the weights between the checkpoint and the end.
    assert any(not torch.equal(ckpt["model"][k], final_a["model"][k]) for k in ckpt["model"])

    _assert_same_models(final_a["model"], final_b["model"])
    opt_a, opt_b = last_a["optimizer"]["state"], last_b["optimizer"]["state"]
    assert opt_a.keys() == opt_b.keys()
    for key in opt_a:
        for name in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(opt_a[key][name], opt_b[key][name]), (key, name)


def test_asr_initialised_from_pretrained_encoder(runs):
    pre = _load(runs["pretrain"]["A"] / "model_final.pt")["model"]
    asr_killed = runs["asr"]["killed"]["checkpoint"]["model"]
    # the feature extractor is frozen in fine-tuning: it still holds the pretrained weights
    frozen = [k for k in asr_killed if k.startswith("encoder.feature_extractor.")]
    assert frozen
    for key in frozen:
        assert torch.equal(asr_killed[key], pre[key]), key


def test_the_encoder_is_frozen_for_the_first_updates_then_trains_with_the_head():
    """finetune.freeze_encoder_updates = 2: updates 0 and 1 give the encoder no gradient (the
    head alone learns), update 2 on gives it one; the trainer calls on_update before each."""
    torch.manual_seed(0)
    model = build_asr_model({"frontend": FRONTEND["frontend"], "head": {"name": "ctc"}}, vocab_size=8).train()
    schedule = types.SimpleNamespace(freeze_encoder_updates=2)
    waveform, lengths, tokens = torch.randn(2, 8000), torch.tensor([8000, 6000]), [[4, 5, 6], [7, 4]]
    for update, frozen in ((0, True), (1, True), (2, False), (5, False)):
        model.zero_grad(set_to_none=True)
        AsrFinetuneTask.on_update(schedule, model, update)
        model(waveform, lengths, tokens).backward()
        encoder_grads = [p.grad for p in model.encoder.parameters() if p.requires_grad]
        assert all(g is None for g in encoder_grads) == frozen, update
        assert frozen or all(g is not None and g.abs().sum() > 0 for g in encoder_grads[-4:]), update
        assert all(p.grad is not None for p in model.head.parameters()), update


@pytest.mark.parametrize("frontend", ["wav2vec2", "w2vbert"])
def test_reinit_top_layers_keeps_the_random_init_of_the_top_blocks_only(tmp_path, frontend):
    if frontend == "wav2vec2":
        frontend_cfg = FRONTEND["frontend"]
    else:
        frontend_cfg = load_config(ROOT / "conf/frontend/w2vbert_tiny.yaml")["frontend"]
    cfg = {"frontend": frontend_cfg, "head": {"name": "ctc"}}
    torch.manual_seed(0)
    pretrained = build_asr_model(cfg, vocab_size=8)
    checkpoint = tmp_path / "pretrained.pt"
    torch.save({"model": {f"encoder.{k}": v for k, v in pretrained.encoder.state_dict().items()}}, checkpoint)
    torch.manual_seed(1)
    model = build_asr_model(cfg, vocab_size=8)
    random_init = {k: v.clone() for k, v in model.encoder.state_dict().items()}
    _init_encoder(model, str(checkpoint), reinit_top_layers=1)
    blocks = model.encoder.blocks
    top = f"{'transformer' if frontend == 'wav2vec2' else 'conformer'}.layers.{len(blocks) - 1}."
    loaded = pretrained.encoder.state_dict()
    for key, value in model.encoder.state_dict().items():
        expected = random_init[key] if key.startswith(top) else loaded[key]
        assert torch.equal(value, expected), key
    assert any(k.startswith(top) for k in random_init)
    with pytest.raises(ValueError, match="reinit_top_layers must be in"):
        _init_encoder(model, str(checkpoint), reinit_top_layers=len(blocks) + 1)


def _log_lines(exp_dir: Path, kind: str) -> List[str]:
    text = (exp_dir / "train.rank0.log").read_text()
    return [line for line in text.splitlines() if f" {kind} update " in line]


def test_training_flushes_denormal_floats(runs):
    """Every training process flushes denormals (a long CPU run slowed by a third without)."""
    for exp in (runs["pretrain"]["A"], runs["asr"]["A"]):
        assert "denormal floats flushed to zero" in (exp / "train.rank0.log").read_text(), exp


def test_configure_cpu_math_flushes_denormals():
    try:
        torch.set_flush_denormal(False)
        tiny = torch.tensor([1e-39])  # below float32's smallest normal number, 1.18e-38
        assert (tiny * 1.0).item() > 0
        configure_cpu_math(flush_denormal=True)
        assert (tiny * 1.0).item() == 0.0
        assert (torch.tensor([1e-30]) * 1.0).item() > 0  # normal floats are untouched
    finally:
        torch.set_flush_denormal(False)  # process-global: leave the other tests as they were


def test_asr_final_validation_reports_wer(runs, corpus):
    exp = runs["asr"]["A"]
    valid = _log_lines(exp, "valid")
    # valid_every=4 → after updates 4 and 8; the final update was just validated, so no extra pass
    assert [int(re.search(r"valid update (\d+):", l).group(1)) for l in valid] == [4, 8]
    final = valid[-1]
    match = re.search(r"\bwer=([0-9.eE+-]+)", final)
    assert match, final
    wer = float(match.group(1))
    assert "loss=" in final

    # Recompute it from model_final.pt (saved right after that pass).
    saved = _load(exp / "model_final.pt")
    tokenizer = Tokenizer(corpus["lang"])
    model = build_asr_model(saved["config"], tokenizer.vocab_size)
    model.load_state_dict(saved["model"])
    model.eval()
    errors = words = 0
    # The batches the trainer validated on: the encoder's GroupNorm statistics include zero
    # padding, so other batching can flip a near-tie of this barely-trained model's greedy output.
    loader = make_dataloader(load_cuts(corpus["dev"]), input_type="waveform", max_duration=DATA["max_duration"],
                             num_buckets=DATA["num_buckets"], shuffle=False, tokenizer=tokenizer)
    for batch in loader:
        for hyp, ref in zip(model.greedy(batch["inputs"], batch["input_lens"]), batch["texts"]):
            counts = align_counts(ref.split(), tokenizer.decode(hyp).split())
            errors, words = errors + counts.errors, words + counts.ref_words
    assert words == 9
    assert wer == pytest.approx(100.0 * errors / words, abs=1e-3 * max(1.0, wer))
    # the pretraining run has no 'wer', only its training lines
    assert all("wer=" not in line for line in _log_lines(runs["pretrain"]["A"], "train"))


def test_asr_validation_wer_is_the_word_error_count_over_the_reference_words():
    """A model with fixed greedy output, scored by hand: 'THE CAT SAT' → 'THE BAT SAT ON' (1 sub,
    1 ins) and 'A DOG' → 'DOG' (1 del), 3 errors over 5 reference words = 60 %; the loss is the
    mean per token."""
    hyps = {"u1": "THE BAT SAT ON", "u2": "DOG"}

    class FixedModel(nn.Module):
        def forward(self, inputs, input_lens, tokens, rows=None):
            return torch.tensor(6.0)  # summed over the batch's 6 tokens

        def greedy(self, inputs, input_lens):
            return [hyps[cut] for cut in batch["cut_ids"]]

        def rows_with_frames(self, input_lens):
            return list(range(len(input_lens)))

    task = types.SimpleNamespace(tokenizer=types.SimpleNamespace(decode=lambda hyp: hyp))
    batch = {"inputs": torch.zeros(2, 10), "input_lens": torch.tensor([10, 8]), "cut_ids": ["u1", "u2"],
             "texts": ["THE CAT SAT", "A DOG"], "tokens": [[1, 2, 3], [4, 5, 6]]}
    totals = AsrFinetuneTask.validate(task, FixedModel(), [batch])
    metrics = _finalize_valid(dict(totals))
    assert metrics["wer"] == pytest.approx(60.0) and metrics["loss"] == pytest.approx(1.0)
    assert metrics["num_utterances"] == 2


def test_ddp_smoke_torchrun(runs, corpus):
    exp = runs["ddp"]["exp"]
    _ok(runs["ddp"]["result"])
    final = _load(exp / "model_final.pt")
    assert final["num_updates"] == 3
    last = _load(exp / "checkpoint_last.pt")
    assert last["world_size"] == 2 and len(last["rng"]) == 2
    assert not torch.equal(last["rng"][0]["torch"], last["rng"][1]["torch"])  # seeded per rank
    assert (exp / "train.rank0.log").exists() and (exp / "train.rank1.log").exists()
    for value in final["model"].values():
        assert torch.isfinite(value).all()
    # the final validation ran over both ranks' shards of dev, summed in one agreed reduction
    valid = _log_lines(exp, "valid")
    assert len(valid) == 1 and " valid update 3: " in valid[0], valid
    loss = float(re.search(r" loss=([0-9.]+)", valid[0]).group(1))
    assert 0 < loss < 20
    # every dev utterance once: the two shards neither overlap nor leave one out
    validated = int(re.search(r" num_utterances=([0-9]+)", valid[0]).group(1))
    assert validated == len(load_cuts(corpus["dev"])) > 2


# ====================================================================== in-process trainer
class _ListSampler:
    def __init__(self, n: int):
        self.n, self.epochs = n, []

    def set_epoch(self, epoch: int) -> None:
        self.epochs.append(epoch)

    def __iter__(self):
        return iter(range(self.n))


class _FakeLoader:
    """What Trainer._epoch_batches needs: .sampler (set_epoch, iterable), .dataset, .num_workers."""

    def __init__(self, batches: List[Dict]):
        self.dataset = batches
        self.sampler = _ListSampler(len(batches))
        self.num_workers = 0


class _Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.hidden = nn.Linear(4, 8)
        self.out = nn.Linear(8, 2)

    def forward(self, x):
        return self.out(torch.tanh(self.hidden(x)))


class _ToyTask:
    """Mean squared error; optionally a non-finite loss/gradient on one update of one rank."""

    def __init__(self, batches, bad_update=None, mode="nan", bad_rank=0, rank=0):
        self.model = _Toy()
        self.loader = _FakeLoader(batches)
        self.bad_update, self.mode, self.bad_rank, self.rank = bad_update, mode, bad_rank, rank
        self.num_updates = 0
        self.params_before: Dict[int, List[torch.Tensor]] = {}
        self.losses: Dict[int, float] = {}

    def train_dataloader(self, dist):
        return self.loader

    def valid_dataloader(self, dist):
        return None

    def on_update(self, model, num_updates):
        self.num_updates = num_updates

    def forward(self, model, batch):
        self.params_before.setdefault(self.num_updates, [p.detach().clone() for p in self.model.parameters()])
        pred = model(batch["x"])
        if self.num_updates == self.bad_update and self.rank == self.bad_rank and self.mode == "inf_grad":
            pred.register_hook(lambda g: g * float("inf"))  # loss stays finite, gradient does not
        loss = ((pred - batch["y"]) ** 2).mean()
        if self.num_updates == self.bad_update and self.rank == self.bad_rank and self.mode == "nan":
            loss = loss + float("nan")  # NaN loss, but finite gradients
        self.losses[self.num_updates] = loss.item()
        return loss, {"loss": loss.item()}, float(len(batch["x"]))  # a mean over the rows

    def validate(self, model, loader):  # pragma: no cover - no valid loader
        return {}


def _toy_batches(n: int, seed: int, rows: int = 4) -> List[Dict]:
    g = torch.Generator().manual_seed(seed)
    return [{"x": torch.randn(rows, 4, generator=g), "y": torch.randn(rows, 2, generator=g)} for _ in range(n)]


def _toy_cfg(max_updates: int, accum_grad: int = 1, **optim) -> Dict:
    return {"trainer": {"max_updates": max_updates, "accum_grad": accum_grad, "log_every": 1,
                        "checkpoint_every": 1000, "clip_grad_norm": 0.0},
            "optim": dict({"lr": 0.05, "eps": 1e-8, "weight_decay": 0.0}, **optim),
            "scheduler": {"name": "constant"}}


def _params(model: nn.Module) -> List[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def _equal(a: List[torch.Tensor], b: List[torch.Tensor]) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("mode", ["nan", "inf_grad"])
def test_non_finite_update_is_skipped(tmp_path, caplog, mode):
    torch.manual_seed(0)
    task = _ToyTask(_toy_batches(6, seed=1), bad_update=2, mode=mode)
    trainer = Trainer(_toy_cfg(5), task, tmp_path / "exp", DistInfo())
    with caplog.at_level(logging.WARNING, logger="sslasr.train.trainer"):
        trainer.fit()
    final = _params(task.model)
    before = task.params_before
    assert sorted(before) == [0, 1, 2, 3, 4]
    assert (mode == "nan") == (not np.isfinite(task.losses[2]))
    assert _equal(before[3], before[2]), "the non-finite update changed the weights"
    for k in (0, 1, 3):
        assert not _equal(before[k + 1], before[k]), k
    assert not _equal(final, before[4])
    assert all(torch.isfinite(p).all() for p in final)
    assert trainer.num_updates == 5 and trainer.skipped_updates == 1 and trainer.batches_done == 5
    steps = {int(s["step"]) for s in trainer.optimizer.state.values()}
    assert steps == {4}  # the optimizer never stepped on the bad update
    what = "loss" if mode == "nan" else "gradient"  # a finite loss with an infinite gradient
    assert any(f"update 3: non-finite {what}, skipped (1 so far)" in r.getMessage() for r in caplog.records)
    assert _load(tmp_path / "exp" / "checkpoint_last.pt")["skipped_updates"] == 1


@contextlib.contextmanager
def _gloo_group(rank: int, world_size: int, out_dir: str):
    """This spawned process as rank RANK of a CPU process group (gloo: one GPU cannot hold two
    ranks), met through a file in OUT_DIR: a TCP port found free beforehand can be taken by
    another process before rank 0 binds it. The ranks meet once more before the group is torn
    down (as train.py leaves it), so that neither closes its connections while the other is still
    in a collective; a failed worker only tears its own down."""
    os.environ["CUDA_VISIBLE_DEVICES"] = ""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"file://{Path(out_dir) / 'rendezvous'}",
                                         rank=rank, world_size=world_size)
    try:
        yield init_distributed()  # finds the group made
    except BaseException:
        torch.distributed.destroy_process_group()
        raise
    leave_distributed()


def _ddp_nan_worker(rank: int, world_size: int, out_dir: str) -> None:
    with _gloo_group(rank, world_size, out_dir) as dist:
        assert dist.rank == rank and dist.world_size == world_size and dist.is_distributed
        torch.manual_seed(100 + rank)  # different init per rank: DDP must broadcast rank 0's
        task = _ToyTask(_toy_batches(6, seed=10 + rank), bad_update=2, mode="nan", bad_rank=1, rank=rank)
        trainer = Trainer(_toy_cfg(5), task, Path(out_dir) / "exp", dist)
        trainer.fit()
        torch.save({"final": _params(task.model), "before": task.params_before, "losses": task.losses,
                    "skipped": trainer.skipped_updates, "num_updates": trainer.num_updates},
                   Path(out_dir) / f"rank{rank}.pt")


def _split_exp_dir_worker(rank: int, world_size: int, out_dir: str) -> None:
    """Rank 0 finds a checkpoint (at update 2), rank 1 an empty exp dir, as a node whose exp dir
    is not the shared one would."""
    with _gloo_group(rank, world_size, out_dir) as dist:
        task = _ToyTask(_toy_batches(6, seed=10 + rank), rank=rank)
        trainer = Trainer(_toy_cfg(5), task, Path(out_dir) / f"exp{rank}", dist)
        with pytest.raises(RuntimeError, match=r"different points \(update, epoch\) \[\(2, 0\), \(0, 0\)\]"):
            trainer.fit()
        (Path(out_dir) / f"rank{rank}.stopped").touch()


def test_ranks_that_would_resume_from_different_points_stop(tmp_path):
    task = _ToyTask(_toy_batches(6, seed=10))
    Trainer(_toy_cfg(2), task, tmp_path / "exp0", DistInfo()).fit()  # rank 0's exp dir: update 2
    mp.spawn(_split_exp_dir_worker, args=(2, str(tmp_path)), nprocs=2, join=True)
    assert (tmp_path / "rank0.stopped").exists() and (tmp_path / "rank1.stopped").exists()
    assert _load(tmp_path / "exp0" / "checkpoint_last.pt")["num_updates"] == 2  # nothing trained on


def test_non_finite_on_one_rank_is_skipped_on_all(tmp_path):
    mp.spawn(_ddp_nan_worker, args=(2, str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (_load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert np.isfinite(r0["losses"][2]) and np.isnan(r1["losses"][2])  # only rank 1 saw the NaN
    assert r0["skipped"] == r1["skipped"] == 1
    assert r0["num_updates"] == r1["num_updates"] == 5
    assert _equal(r0["final"], r1["final"])
    for k in range(5):
        assert _equal(r0["before"][k], r1["before"][k]), k
    assert _equal(r0["before"][3], r0["before"][2])  # rank 0 skipped despite its finite loss
    assert not _equal(r0["before"][2], r0["before"][1]) and not _equal(r0["before"][4], r0["before"][3])


def _rows(seed: int, *sizes: int) -> List[Dict]:
    return [_toy_batches(1, seed=seed + i, rows=n)[0] for i, n in enumerate(sizes)]


def _merged(batches: List[Dict]) -> Dict:
    return {key: torch.cat([b[key] for b in batches]) for key in ("x", "y")}


# A large Adam eps makes the step proportional to the gradient (not just its sign), so a
# wrongly scaled accumulated gradient would show.
ADAM_PROPORTIONAL = {"lr": 0.5, "eps": 10.0, "weight_decay": 0.01}


def test_gradient_accumulation_matches_one_big_batch(tmp_path):
    micro = _toy_batches(4, seed=3)
    merged = [_merged(micro[i:i + 2]) for i in (0, 2)]

    def train(batches, accum, name, updates=2):
        torch.manual_seed(0)
        task = _ToyTask(batches)
        start = _params(task.model)
        trainer = Trainer(_toy_cfg(updates, accum, **ADAM_PROPORTIONAL), task, tmp_path / name, DistInfo())
        trainer.fit()
        return start, _params(task.model), trainer

    start_a, accumulated, trainer_a = train(micro, 2, "accum")
    start_b, big_batch, trainer_b = train(merged, 1, "big")
    _, first_micro_only, _ = train(micro[:1], 1, "single", updates=1)
    assert _equal(start_a, start_b)
    assert trainer_a.num_updates == trainer_b.num_updates == 2 and trainer_a.batches_done == 4
    for a, b in zip(accumulated, big_batch):
        assert torch.allclose(a, b, atol=1e-6, rtol=0), (a - b).abs().max()
    assert max((a - s).abs().max().item() for a, s in zip(accumulated, start_a)) > 1e-3  # it moved
    assert max((a - b).abs().max().item() for a, b in zip(big_batch, first_micro_only)) > 1e-4


def test_accumulated_micro_batches_count_by_their_weight(tmp_path):
    """Micro-batches of 1 and 7 rows make the update of one batch of 8: the mean over the rows,
    not the mean of the two micro-batch means (which would count the lone row 7 times over)."""
    micro = _rows(20, 1, 7, 5, 3)

    def train(batches, accum, name):
        torch.manual_seed(0)
        task = _ToyTask(batches)
        Trainer(_toy_cfg(2, accum, **ADAM_PROPORTIONAL), task, tmp_path / name, DistInfo()).fit()
        return _params(task.model)

    accumulated = train(micro, 2, "accum")
    big_batch = train([_merged(micro[:2]), _merged(micro[2:])], 1, "big")
    for a, b in zip(accumulated, big_batch):
        assert torch.allclose(a, b, atol=1e-6, rtol=0), (a - b).abs().max()
    # the mean of the two micro-batch means, what equal weighting trained on: a batch with
    # each micro-batch repeated as many times as the other has rows
    equal = [_merged([micro[i]] * len(micro[i + 1]["x"]) + [micro[i + 1]] * len(micro[i]["x"])) for i in (0, 2)]
    equally_weighted = train(equal, 1, "equal")
    assert max((a - b).abs().max().item() for a, b in zip(accumulated, equally_weighted)) > 1e-4


def _ddp_weighted_worker(rank: int, world_size: int, out_dir: str) -> None:
    with _gloo_group(rank, world_size, out_dir) as dist:
        torch.manual_seed(0)
        task = _ToyTask(_rows(30 + 10 * rank, *([2, 1, 2, 1] if rank == 0 else [6, 7, 5, 6])), rank=rank)
        trainer = Trainer(_toy_cfg(2, 2, **ADAM_PROPORTIONAL), task, Path(out_dir) / "exp", dist)
        trainer.fit()
        interval = _Interval()  # rank 0: loss 1 over 2 rows, rank 1: loss 3 over 6 rows
        interval.add({"loss": 1.0 + 2 * rank}, 2.0 + 4 * rank)
        interval.add({"audio_seconds_per_second": 10.0 * (rank + 1)}, 1.0)
        interval.add({"skipped": 1.0}, 1.0)
        torch.save({"final": _params(task.model), "logged": interval.flush(dist)}, Path(out_dir) / f"rank{rank}.pt")


def test_ranks_with_unequal_batches_make_the_update_of_their_union(tmp_path):
    """Two ranks, two micro-batches each, 1-2 rows on rank 0 and 5-7 on rank 1: the updates of
    one process training on the four micro-batches of each update as one batch."""
    mp.spawn(_ddp_weighted_worker, args=(2, str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (_load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    rank0, rank1 = _rows(30, 2, 1, 2, 1), _rows(40, 6, 7, 5, 6)
    torch.manual_seed(0)
    task = _ToyTask([_merged(rank0[:2] + rank1[:2]), _merged(rank0[2:] + rank1[2:])])
    Trainer(_toy_cfg(2, 1, **ADAM_PROPORTIONAL), task, tmp_path / "one", DistInfo()).fit()
    assert _equal(r0["final"], r1["final"])
    for a, b in zip(r0["final"], _params(task.model)):
        assert torch.allclose(a, b, atol=1e-6, rtol=0), (a - b).abs().max()
    # the logged training means are over both ranks: (1·2 + 3·6) / 8; throughput summed; one skip
    assert r0["logged"] == r1["logged"] == {"loss": 2.5, "audio_seconds_per_second": 30.0, "skipped": 1.0}


class _ValidatedToyTask(_ToyTask):
    """The toy task with a scripted validation loss per update count."""

    def __init__(self, batches, valid_losses: Dict[int, float]):
        super().__init__(batches)
        self.valid_losses = valid_losses

    def valid_dataloader(self, dist):
        return "dev"

    def validate(self, model, loader):
        return {"loss": self.valid_losses[self.num_updates + 1], "weight": 1.0}


@pytest.mark.parametrize("final_model", ["last", "best", "average"])
def test_final_model_is_the_best_validated_one_on_request_and_survives_a_resume(tmp_path, final_model):
    """Validation every 2 updates with dev loss 3, 1, 2, 2.5: with final_model=best, model_final.pt
    holds the weights after update 4; with final_model=average (2 models), the mean of the weights
    after updates 4 and 6. Both also when training stops at 6 and a second run resumes to 8."""
    losses = {2: 3.0, 4: 1.0, 6: 2.0, 8: 2.5}
    batches = _toy_batches(8, seed=5)
    cfg = _toy_cfg(6)
    cfg["trainer"].update(valid_every=2, final_model=final_model, average_models=2)
    torch.manual_seed(0)
    task = _ValidatedToyTask(batches, losses)
    Trainer(cfg, task, tmp_path / "exp", DistInfo()).fit()
    after_4 = task.params_before[4]
    cfg["trainer"]["max_updates"] = 8
    resumed = _ValidatedToyTask(batches, losses)
    trainer = Trainer(cfg, resumed, tmp_path / "exp", DistInfo())
    trainer.fit()
    assert trainer.num_updates == 8 and trainer.best_valid == 1.0
    final = _load(tmp_path / "exp/model_final.pt")
    weights = [final["model"][name] for name, _ in resumed.model.named_parameters()]
    kept = sorted(path.name for path in (tmp_path / "exp").glob("model_valid_*.pt"))
    if final_model == "best":
        assert _equal(weights, after_4) and final["num_updates"] == 4 and final["valid"] == {"loss": 1.0}
        assert final["config"]["trainer"]["max_updates"] == 8
        assert kept == ["model_valid_4.pt"]
    elif final_model == "average":
        after_6 = resumed.params_before[6]
        assert all(torch.allclose(w, (a + b) / 2, atol=1e-7, rtol=0) for w, a, b in zip(weights, after_4, after_6))
        assert not _equal(after_4, after_6)
        assert final["averaged_updates"] == [4, 6] and final["valid"] == [{"loss": 1.0}, {"loss": 2.0}]
        assert kept == ["model_valid_4.pt", "model_valid_6.pt"]  # update 2's file went at a checkpoint
    else:
        assert _equal(weights, _params(resumed.model)) and final["num_updates"] == 8
        assert kept == []
    assert not _equal(after_4, _params(resumed.model))  # training went on after the best model


def test_averaging_keeps_the_n_best_files_through_kills_and_reruns(tmp_path):
    """A model that leaves the N best keeps its file until a checkpoint no longer lists it, so a
    kill in between resumes with every listed file present; a rerun of a finished run does not
    validate its last update again; a fresh run removes an earlier run's files."""
    losses = {1: 5.0, 2: 4.0, 3: 3.0, 4: 2.0}
    batches = _toy_batches(4, seed=2)
    cfg = _toy_cfg(4)
    cfg["trainer"].update(valid_every=1, checkpoint_every=2, final_model="average", average_models=2)
    exp = tmp_path / "exp"
    exp.mkdir()
    torch.save({"stale": True}, exp / "model_valid_99.pt")
    torch.manual_seed(0)
    trainer = Trainer(cfg, _ValidatedToyTask(batches, losses), exp, DistInfo())
    trainer.fit()
    assert trainer.kept_models == [(2.0, 4), (3.0, 3)]
    assert sorted(p.name for p in exp.glob("model_valid_*.pt")) == ["model_valid_3.pt", "model_valid_4.pt"]
    first = _load(exp / "model_final.pt")["model"]

    # update 4 would be validated after the loop by valid_every 3: the checkpoint says it was (a rerun
    # after a kill past the last checkpoint validated it again, in pretraining on other random masks)
    cfg["trainer"]["valid_every"] = 3
    rerun_task = _ValidatedToyTask(batches, {**losses, 5: 2.5})
    validations = []
    rerun_task.validate = lambda model, loader: validations.append(1) or {"loss": 2.5, "weight": 1.0}
    rerun = Trainer(cfg, rerun_task, exp, DistInfo())
    rerun.fit()
    assert validations == [] and rerun.kept_models == [(2.0, 4), (3.0, 3)]
    assert all(torch.equal(first[k], v) for k, v in _load(exp / "model_final.pt")["model"].items())

    # A kill at the checkpoint of update 4: validation at update 3 had pushed update 1 out of the
    # two best, but the checkpoint on disk (update 2) still lists updates 1 and 2.
    killed = tmp_path / "killed"
    cfg["trainer"]["valid_every"] = 1
    torch.manual_seed(0)
    interrupted = Trainer(cfg, _ValidatedToyTask(batches, losses), killed, DistInfo())
    save = interrupted.save_checkpoint

    def save_or_die():
        if interrupted.num_updates == 4:
            raise KeyboardInterrupt("killed")
        save()
    interrupted.save_checkpoint = save_or_die
    with pytest.raises(KeyboardInterrupt):
        interrupted.fit()
    assert _load(killed / "checkpoint_last.pt")["kept_models"] == [(4.0, 2), (5.0, 1)]
    assert sorted(p.name for p in killed.glob("model_valid_*.pt")) == [f"model_valid_{u}.pt" for u in (1, 2, 3, 4)]
    resumed = Trainer(cfg, _ValidatedToyTask(batches, losses), killed, DistInfo())
    resumed.fit()
    assert resumed.kept_models == [(2.0, 4), (3.0, 3)]
    assert sorted(p.name for p in killed.glob("model_valid_*.pt")) == ["model_valid_3.pt", "model_valid_4.pt"]
    assert all(torch.equal(first[k], v) for k, v in _load(killed / "model_final.pt")["model"].items())


def test_a_non_finite_validation_value_ranks_below_every_finite_one(tmp_path, caplog):
    """NaN compares neither way: a first validation of NaN stayed the best and among the kept
    models for the whole run, and a better model was dropped for it."""
    losses = {1: float("nan"), 2: 5.0, 3: 3.0, 4: 4.0}
    cfg = _toy_cfg(4)
    cfg["trainer"].update(valid_every=1, final_model="average", average_models=2)
    torch.manual_seed(0)
    trainer = Trainer(cfg, _ValidatedToyTask(_toy_batches(4, seed=2), losses), tmp_path / "exp", DistInfo())
    with caplog.at_level(logging.WARNING, logger="sslasr.train.trainer"):
        trainer.fit()
    assert trainer.kept_models == [(3.0, 3), (4.0, 4)] and trainer.best_valid == 3.0
    assert "update 1: validation loss is nan: ranked below every finite one" in caplog.text


def test_the_last_updates_are_logged_and_their_time_includes_loading_their_batches(tmp_path, caplog):
    """max_updates 5 with log_every 2: update 5's stats were never logged. And the logged time
    began after the batches were loaded: with waveforms decoded in the main process
    (num_workers 0), the rate read several times the real one."""

    class SlowBatches(list):  # 50 ms to load each batch; the toy update itself takes about 1 ms
        def __getitem__(self, index):
            time.sleep(0.05)
            return super().__getitem__(index)
    batches = [{**batch, "durations": [1.0] * 4} for batch in _toy_batches(5, seed=3)]
    task = _ToyTask(batches)
    task.loader.dataset = SlowBatches(batches)
    cfg = _toy_cfg(5)
    cfg["trainer"]["log_every"] = 2
    torch.manual_seed(0)
    with caplog.at_level(logging.INFO, logger="sslasr.train.trainer"):
        Trainer(cfg, task, tmp_path / "exp", DistInfo()).fit()
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("train update")]
    assert [line.split(":")[0] for line in lines] == ["train update 2", "train update 4", "train update 5"]
    for line in lines:
        seconds = float(re.search(r"seconds_per_update=(\S+)", line).group(1))
        rate = float(re.search(r"audio_seconds_per_second=(\S+)", line).group(1))
        assert seconds >= 0.05 and rate <= 4.0 / 0.05 and rate == pytest.approx(4.0 / seconds, rel=0.01)


def test_a_non_finite_validation_value_is_never_averaged(tmp_path, caplog):
    """With fewer validated models than average_models, a NaN one (sorted last) filled a free place
    and went into model_final.pt's average."""
    losses = {1: float("nan"), 2: 5.0, 3: float("inf"), 4: 4.0}
    cfg = _toy_cfg(4)
    cfg["trainer"].update(valid_every=1, final_model="average", average_models=5)
    torch.manual_seed(0)
    exp = tmp_path / "exp"
    trainer = Trainer(cfg, _ValidatedToyTask(_toy_batches(4, seed=2), losses), exp, DistInfo())
    with caplog.at_level(logging.WARNING, logger="sslasr.train.trainer"):
        trainer.fit()
    assert trainer.kept_models == [(4.0, 4), (5.0, 2)]
    assert _load(exp / "model_final.pt")["averaged_updates"] == [4, 2]
    assert ("update 3: validation loss is inf: ranked below every finite one, not kept among the best models"
            in caplog.text)


def test_a_resumed_run_keeps_the_tensorboard_scalars_of_its_checkpoint_update(tmp_path, caplog):
    """They were written before the checkpoint was: purging from that update on lost them. A
    resume under a changed config says what changed."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    cfg = _toy_cfg(2)
    cfg["trainer"].update(valid_every=2, checkpoint_every=2)
    batches, losses = _toy_batches(4, seed=3), {k: float(k) for k in range(1, 6)}
    torch.manual_seed(0)
    Trainer(cfg, _ValidatedToyTask(batches, losses), tmp_path / "exp", DistInfo()).fit()
    cfg = copy.deepcopy(cfg)
    cfg["trainer"]["max_updates"] = 4  # the same run, resumed at its checkpoint of update 2
    cfg["optim"].pop("eps")
    with caplog.at_level(logging.WARNING, logger="sslasr.train.trainer"):
        Trainer(cfg, _ValidatedToyTask(batches, losses), tmp_path / "exp", DistInfo()).fit()
    assert "another config than the checkpoint's (" in caplog.text
    assert caplog.text.rstrip().endswith("optim.eps: 1e-08 -> (unset); trainer.max_updates: 2 -> 4")
    events = EventAccumulator(str(tmp_path / "exp" / "tensorboard"))
    events.Reload()
    assert sorted({e.step for e in events.Scalars("train/loss")}) == [1, 2, 3, 4]
    assert sorted({e.step for e in events.Scalars("valid/loss")}) == [2, 4]


def test_an_unreadable_checkpoint_is_named(tmp_path):
    exp = tmp_path / "exp"
    exp.mkdir()
    (exp / "checkpoint_last.pt").write_bytes(b"PK\x03\x04 cut short")
    trainer = Trainer(_toy_cfg(2), _ToyTask(_toy_batches(2, seed=1)), exp, DistInfo())
    with pytest.raises(RuntimeError, match=rf"{exp / 'checkpoint_last.pt'} cannot be read \(.*remove it"):
        trainer.fit()


def test_final_model_best_needs_a_known_metric_and_validation(tmp_path):
    cfg = _toy_cfg(2)
    cfg["trainer"].update(valid_every=1, final_model="best", best_metric="wer")
    with pytest.raises(KeyError, match="'wer' is not a validation metric of this task .*loss"):
        Trainer(cfg, _ValidatedToyTask(_toy_batches(2, seed=1), {1: 1.0, 2: 1.0}), tmp_path / "a", DistInfo()).fit()
    cfg = _toy_cfg(2)
    cfg["trainer"].update(final_model="best")
    (tmp_path / "b").mkdir()
    torch.save({"stale": True}, tmp_path / "b/model_valid_9.pt")  # an earlier run's: removed, not used
    with pytest.raises(RuntimeError, match="final_model=best picks validated models, but the task has no validation"):
        Trainer(cfg, _ToyTask(_toy_batches(2, seed=1)), tmp_path / "b", DistInfo()).fit()
    assert not (tmp_path / "b/model_valid_9.pt").exists()
    assert not (tmp_path / "b/checkpoint_last.pt").exists()  # stopped before the first update, not after the last
    with pytest.raises(ValueError, match="final_model"):
        Trainer(dict(cfg, trainer=dict(cfg["trainer"], final_model="mean")), _ToyTask([]), tmp_path / "c", DistInfo())
    cfg["trainer"].update(final_model="average")
    with pytest.raises(RuntimeError, match="final_model=average picks validated models"):
        Trainer(cfg, _ToyTask(_toy_batches(2, seed=1)), tmp_path / "d", DistInfo()).fit()
    with pytest.raises(ValueError, match="average_models must be at least 1"):
        Trainer(dict(cfg, trainer=dict(cfg["trainer"], average_models=0)), _ToyTask([]), tmp_path / "e", DistInfo())


def _kill_at_checkpoint(trainer: Trainer, update: int) -> Trainer:
    """The trainer dies (like a kill) when it is about to write the checkpoint of UPDATE."""
    save = trainer.save_checkpoint

    def save_or_die():
        if trainer.num_updates == update:
            raise KeyboardInterrupt("killed")
        save()
    trainer.save_checkpoint = save_or_die
    return trainer


def test_best_model_written_after_the_last_checkpoint_of_a_killed_run_is_not_used(tmp_path):
    """A killed run validated update 3 as its best (dev loss 1.0) after its last checkpoint
    (update 2). The resumed run validates update 3 differently (another dev set, or
    non-deterministic kernels: 4.5), so its best is update 2; the killed run's file must neither
    survive nor become model_final.pt."""
    cfg = _toy_cfg(4)
    cfg["trainer"].update(valid_every=1, checkpoint_every=2, final_model="best")
    batches = _toy_batches(4, seed=4)
    exp = tmp_path / "exp"
    torch.manual_seed(0)
    killed = _kill_at_checkpoint(Trainer(cfg, _ValidatedToyTask(batches, {1: 5.0, 2: 4.0, 3: 1.0, 4: 3.0}), exp,
                                         DistInfo()), update=4)
    with pytest.raises(KeyboardInterrupt):
        killed.fit()
    assert sorted(p.name for p in exp.glob("model_valid_*.pt")) == ["model_valid_2.pt", "model_valid_3.pt"]
    assert _load(exp / "checkpoint_last.pt")["kept_models"] == [(4.0, 2)]
    resumed_task = _ValidatedToyTask(batches, {3: 4.5, 4: 4.2})
    resumed = Trainer(cfg, resumed_task, exp, DistInfo())
    resumed.fit()
    final = _load(exp / "model_final.pt")
    assert final["num_updates"] == 2 and final["valid"] == {"loss": 4.0}
    weights = [final["model"][name] for name, _ in resumed_task.model.named_parameters()]
    assert _equal(weights, killed.task.params_before[2])
    assert sorted(p.name for p in exp.glob("model_valid_*.pt")) == ["model_valid_2.pt"]
    assert resumed.kept_models == [(4.0, 2)] and resumed.best_valid == 4.0


def test_temporary_files_of_killed_saves_are_removed_at_the_start(tmp_path, caplog):
    """What a SIGKILL inside atomic_path leaves (its finally never runs): reruns must not pile them up."""
    exp = tmp_path / "exp"
    exp.mkdir()
    leftovers = [".checkpoint_last.pt.a1b2.tmp.pt", ".model_valid_7.pt.c3.tmp.pt", ".model_final.pt.d4.tmp.pt"]
    for name in leftovers + [".config.yaml.e5.tmp.yaml"]:  # the last one is not the trainer's to remove
        (exp / name).write_bytes(b"half a checkpoint")
    with caplog.at_level(logging.INFO, logger="sslasr.train.trainer"):
        Trainer(_toy_cfg(1), _ToyTask(_toy_batches(2, seed=8)), exp, DistInfo()).fit()
    assert sorted(p.name for p in exp.glob(".*.tmp*")) == [".config.yaml.e5.tmp.yaml"]
    assert any("removed 3 temporary files" in r.getMessage() for r in caplog.records)


def test_a_training_loader_without_batches_is_named_with_the_ranks(tmp_path):
    trainer = Trainer(_toy_cfg(1), _ToyTask([]), tmp_path / "exp", DistInfo())
    with pytest.raises(RuntimeError, match="yields no batches$"):
        trainer.fit()
    trainer.dist = DistInfo(world_size=3)  # what a rank of three would say: one empty shard stops all
    assert "no batches on at least one of the 3 ranks" in trainer._no_batches_message()


def test_resuming_on_fewer_ranks_skips_what_every_rank_had_consumed(tmp_path, caplog):
    """A checkpoint of 2 ranks after 3 batches each: one rank resumes after batch 6 of the epoch."""
    batches = _toy_batches(8, seed=6)
    exp = tmp_path / "exp"
    torch.manual_seed(0)
    Trainer(_toy_cfg(3), _ToyTask(batches), exp, DistInfo()).fit()
    state = _load(exp / "checkpoint_last.pt")
    assert state["batches_done"] == 3
    state.update(rng=state["rng"] * 2, world_size=2)  # as if written by two ranks
    torch.save(state, exp / "checkpoint_last.pt")
    task = _SeenBatchesTask(batches)
    trainer = Trainer(_toy_cfg(5), task, exp, DistInfo())
    with caplog.at_level(logging.WARNING, logger="sslasr.train.trainer"):
        trainer.fit()
    assert task.seen == [6, 7]
    assert trainer.num_updates == 5 and trainer.epoch == 0 and trainer.batches_done == 8
    assert any("written by 2 ranks, now 1" in r.getMessage() and "after 6 batches per rank" in r.getMessage()
               for r in caplog.records)


class _SeenBatchesTask(_ToyTask):
    """Records which batches (by index in the epoch) it trains on."""

    def forward(self, model, batch):
        self.seen.append(next(i for i, b in enumerate(self.loader.dataset) if torch.equal(b["x"], batch["x"])))
        return super().forward(model, batch)

    def __init__(self, batches):
        super().__init__(batches)
        self.seen: List[int] = []


class _UnevenValidationTask(_ToyTask):
    """Rank 1 has no validation batches, so it reports no loss at all."""

    def validate(self, model, loader):
        if self.rank == 1:
            return {"weight": 0.0}
        return {"loss": 6.0, "weight": 3.0, "accuracy": 1.5}


def _validation_worker(rank: int, world_size: int, out_dir: str, task_kind: str = "uneven") -> None:
    """One validation on each rank of a gloo group; the logged metrics saved per rank."""
    with _gloo_group(rank, world_size, out_dir) as dist:
        task = _UnevenValidationTask([], rank=rank) if task_kind == "uneven" else _RunningStatsTask(rank)
        trainer = Trainer(_toy_cfg(1), task, Path(out_dir) / "exp", dist)  # DDP sends rank 0's buffers
        if task_kind == "running_stats":
            task.model.running_mean.fill_(rank + 1.0)  # as a training forward on the rank's own batch
        logged = []
        trainer._log = lambda metrics, split: logged.append(metrics)
        trainer._validate("dev")
        torch.save(logged, Path(out_dir) / f"rank{rank}.pt")


def test_validation_stats_missing_on_one_rank_count_zero_there(tmp_path):
    """Every rank must make the same reductions: with the stat names agreed first, a rank that
    lacks one adds 0 instead of leaving the others waiting on a reduction it never makes."""
    context = mp.spawn(_validation_worker, args=(2, str(tmp_path)), nprocs=2, join=False)
    started = time.monotonic()
    while not context.join(timeout=5):  # False until every rank has exited
        if time.monotonic() - started > 120:
            for process in context.processes:
                process.kill()
            pytest.fail("the ranks hung in validation")
    for rank in (0, 1):
        assert _load(tmp_path / f"rank{rank}.pt") == [{"loss": 2.0, "accuracy": 0.5}]


class _RunningStatsTask(_UnevenValidationTask):
    """A BatchNorm-like buffer each rank's own batches moved; validation reports what it sees."""

    def __init__(self, rank):
        super().__init__([], rank=rank)
        self.model.register_buffer("running_mean", torch.zeros(3))

    def validate(self, model, loader):
        return {"loss": float(model.running_mean.sum()), "weight": 1.0}


def test_every_rank_validates_rank_0s_running_statistics(tmp_path):
    """DDP sends rank 0's buffers before each training forward, which then moves each rank's copy
    by its own batch: validation mixed the ranks' BatchNorm statistics, where rank 0's model is
    the one saved. Rank 0's buffer sums to 3, rank 1's to 6: the loss over both is 3, not 4.5."""
    mp.spawn(_validation_worker, args=(2, str(tmp_path), "running_stats"), nprocs=2, join=True)
    for rank in (0, 1):
        assert _load(tmp_path / f"rank{rank}.pt") == [{"loss": 3.0}]


def test_interval_averages_device_tensors_and_floats_by_weight():
    """Stats may be 0-dim tensors (kept on the device until the log line) or floats; the log
    line's value is the weighted mean either way."""
    interval = _Interval()
    interval.add({"loss": torch.tensor(2.0), "masked_frames": 10.0}, 10.0)
    interval.add({"loss": torch.tensor(5.0), "masked_frames": 30.0}, 30.0)
    interval.add({"grad_norm": torch.tensor(1.5), "lr": 0.1}, 1.0)
    metrics = interval.flush()
    assert metrics == pytest.approx({"loss": (2 * 10 + 5 * 30) / 40, "masked_frames": (100 + 900) / 40,
                                     "grad_norm": 1.5, "lr": 0.1})
    assert all(isinstance(value, float) for value in metrics.values())
    assert interval.flush() == {}


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_mixed_precision_training_on_the_cpu_resumes_exactly(tmp_path, amp):
    """trainer.amp on the CPU (autocast; fp16 with a loss scaler, whose state the checkpoint
    keeps): 3 updates, then a resumed run to 5, end with the weights of 5 straight ones."""
    from test_cuda import _DeviceCheckingTask
    g = torch.Generator().manual_seed(0)
    batches = [{"x": torch.randn(8, 4, generator=g), "y": torch.randn(8, 2, generator=g)} for _ in range(4)]

    def run(exp_dir: Path, max_updates: int) -> Trainer:
        cfg = {"trainer": {"max_updates": max_updates, "log_every": 1, "valid_every": 0, "checkpoint_every": 1,
                           "amp": amp}, "optim": {"lr": 0.05}, "scheduler": {"name": "constant"}}
        torch.manual_seed(0)
        trainer = Trainer(cfg, _DeviceCheckingTask(batches), exp_dir, DistInfo(device=torch.device("cpu")))
        trainer.fit()
        return trainer

    straight = run(tmp_path / "straight", 5)
    run(tmp_path / "resumed", 3)
    checkpoint = torch.load(tmp_path / "resumed/checkpoint_last.pt", weights_only=False)
    assert checkpoint["num_updates"] == 3
    assert bool(checkpoint["scaler"]) == (amp == "fp16")  # the scaler's scale and growth tracker
    resumed = run(tmp_path / "resumed", 5)
    assert resumed.num_updates == 5
    for a, b in zip(straight.task.model.parameters(), resumed.task.model.parameters()):
        assert torch.equal(a, b)
    torch.manual_seed(0)
    start = torch.nn.Linear(4, 2)  # the trainers' init (seed 0): training moved it
    assert not torch.equal(start.weight, straight.task.model.weight)


class _AccuracyToyTask(_ValidatedToyTask):
    """Validation reports a scripted accuracy (higher is better) beside a constant loss."""

    def validate(self, model, loader):
        return {"loss": 1.0, "accuracy": self.valid_losses[self.num_updates + 1], "weight": 1.0}


def test_the_best_accuracy_is_the_highest(tmp_path):
    """best_metric: accuracy (pretraining reports masked_accuracy) kept the lowest, the worst model."""
    cfg = _toy_cfg(4)
    cfg["trainer"].update(valid_every=1, final_model="average", average_models=2, best_metric="accuracy")
    trainer = Trainer(cfg, _AccuracyToyTask(_toy_batches(4, seed=3), {1: 0.2, 2: 0.9, 3: 0.5, 4: 0.4}),
                      tmp_path / "exp", DistInfo())
    trainer.fit()
    assert trainer.best_valid == 0.9 and trainer.kept_models == [(0.9, 2), (0.5, 3)]
    assert _load(tmp_path / "exp" / "model_final.pt")["averaged_updates"] == [2, 3]


def test_a_rerun_that_keeps_fewer_models_averages_fewer(tmp_path):
    losses = {1: 5.0, 2: 4.0, 3: 3.0, 4: 2.0}
    cfg = _toy_cfg(4)
    cfg["trainer"].update(valid_every=1, final_model="average", average_models=4)
    Trainer(cfg, _ValidatedToyTask(_toy_batches(4, seed=4), losses), tmp_path / "exp", DistInfo()).fit()
    assert _load(tmp_path / "exp" / "model_final.pt")["averaged_updates"] == [4, 3, 2, 1]
    cfg["trainer"]["average_models"] = 2
    Trainer(cfg, _ValidatedToyTask(_toy_batches(4, seed=4), losses), tmp_path / "exp", DistInfo()).fit()
    assert _load(tmp_path / "exp" / "model_final.pt")["averaged_updates"] == [4, 3]
    assert sorted(p.name for p in (tmp_path / "exp").glob("model_valid_*.pt")) == ["model_valid_3.pt", "model_valid_4.pt"]


def test_a_best_metric_the_task_lacks_fails_after_the_updates_are_saved(tmp_path):
    """With validation only after the last update, a wrong best_metric failed there: the updates
    since the last checkpoint were lost, and every rerun trained them again."""
    cfg = _toy_cfg(4)
    cfg["trainer"].update(checkpoint_every=3, best_metric="wer")
    trainer = Trainer(cfg, _ValidatedToyTask(_toy_batches(4, seed=6), {4: 1.0}), tmp_path / "exp", DistInfo())
    with pytest.raises(KeyError, match="'wer' is not a validation metric"):
        trainer.fit()
    assert _load(tmp_path / "exp" / "checkpoint_last.pt")["num_updates"] == 4


def test_a_skipped_update_leaves_the_logged_means_alone(tmp_path):
    logged = []

    class Logged(_ToyTask):
        def on_log(self, metrics):
            logged.append(metrics)

    cfg = _toy_cfg(4)
    cfg["trainer"]["log_every"] = 4
    Trainer(cfg, Logged(_toy_batches(4, seed=7), bad_update=1, mode="nan"), tmp_path / "exp", DistInfo()).fit()
    assert len(logged) == 1 and logged[0]["skipped"] == 1.0
    assert np.isfinite(logged[0]["loss"])  # the mean of the three updates taken, not NaN


def test_a_resume_takes_the_configs_optimizer_settings_and_amp(tmp_path):
    """load_state_dict put the checkpoint's weight decay, betas and eps back (the resume's warning
    listed the change as taken); and a bf16 or float32 run resumed under fp16 failed on the
    disabled GradScaler's empty state."""
    exp = tmp_path / "exp"
    cfg = _toy_cfg(2, weight_decay=0.0, betas=[0.9, 0.98])
    cfg["trainer"]["amp"] = "bf16"
    Trainer(cfg, _ToyTask(_toy_batches(4, seed=1)), exp, DistInfo()).fit()
    cfg = _toy_cfg(4, weight_decay=0.1, betas=[0.8, 0.9], eps=1e-7)
    cfg["trainer"]["amp"] = "fp16"
    trainer = Trainer(cfg, _ToyTask(_toy_batches(4, seed=1)), exp, DistInfo())
    assert trainer.maybe_resume() and trainer.num_updates == 2
    group = trainer.optimizer.param_groups[0]
    assert (group["weight_decay"], group["betas"], group["eps"]) == (0.1, (0.8, 0.9), 1e-7)
    assert trainer.optimizer.state  # the moments are the checkpoint's
    assert trainer.scaler.is_enabled() and trainer.scaler.get_scale() == 2.0 ** 16  # a fresh scaler
