"""The same code on a CUDA GPU: every frontend's pretraining step (fp32, bf16, fp16 with loss
scaling), the encoders and every head's loss and searches against the CPU at equal weights, and
the trainer feeding the GPU model its batches. Skipped without a GPU (CI has none); run where one
is: `./tools/test.sh tests/test_cuda.py`. The end-to-end training runs of test_trainer.py also
train on the GPU when one is visible.

SSLASR_TEST_DEVICE=cpu runs these on the CPU instead, to check the tests themselves."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from sslasr.decoding.fusion import decode_options
from sslasr.models.asr import build_asr_model
from sslasr.models.frontends import get_frontend
from sslasr.models.hubert import IGNORE_LABEL
from sslasr.models.lm import build_lm
from sslasr.train.distributed import DistInfo
from sslasr.train.trainer import Trainer
from sslasr.utils.config import load_configs
from test_ctc_beam import tiny_system  # noqa: F401  (fixture: a tiny CTC system, its LM, two sets)

DEVICE = torch.device(os.environ.get("SSLASR_TEST_DEVICE", "cuda"))
pytestmark = pytest.mark.skipif(DEVICE.type == "cuda" and not torch.cuda.is_available(), reason="needs a CUDA GPU")
CONF = Path(__file__).resolve().parents[1] / "egs/minisynth/conf"
FRONTENDS = ["wav2vec2", "hubert", "wavlm", "w2vbert"]
HEADS = ["ctc", "attention", "transducer"]
VOCAB = 12


@pytest.fixture(autouse=True)
def exact_fp32():
    """TF32 would make GPU fp32 differ from the CPU by ~1e-3: compare true fp32."""
    if not torch.cuda.is_available():
        yield
        return
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _frontend_cfg(frontend: str):
    return load_configs([CONF / f"frontend_{frontend}.yaml"])


def _inputs(frontend: str, batch: int = 3):
    """A batch of unequal lengths: 1.0, 0.8, 0.6 s of waveform or 10 ms fbank frames."""
    g = torch.Generator().manual_seed(0)
    if get_frontend(_frontend_cfg(frontend)["frontend"]).input_type == "fbank":
        lengths = torch.tensor([100, 80, 60][:batch])
        return torch.randn(batch, 100, 80, generator=g), lengths
    lengths = torch.tensor([16000, 12800, 9600][:batch])
    return torch.randn(batch, 16000, generator=g), lengths


def _pretrainer(frontend: str):
    cfg = _frontend_cfg(frontend)
    objective = dict(cfg["pretrain"])
    for key in ("collapse_warning_perplexity", "utterance_mixing"):  # the task's and the loader's
        objective.pop(key, None)
    if frontend in ("hubert", "wavlm"):
        objective.update(num_classes=20, label_rate=100)  # as iteration 1 (MFCC labels) sets them
    torch.manual_seed(0)
    return get_frontend(cfg["frontend"]).build_pretrainer(cfg["frontend"]["encoder"], objective)


def _targets(frontend: str, model, inputs, lengths):
    """Frame labels at the label rate, padded with IGNORE_LABEL past each utterance's end, for
    HuBERT/WavLM; None for the objectives that make their own targets."""
    if frontend not in ("hubert", "wavlm"):
        return None
    with torch.no_grad():
        _, frame_lengths, _ = model.encoder.features(inputs, lengths)
    label_lengths = (frame_lengths.double() * model.labels_per_frame).long()
    targets = torch.randint(model.cfg.num_classes, (len(lengths), int(label_lengths.max())),
                            generator=torch.Generator().manual_seed(1))
    targets[torch.arange(targets.shape[1])[None] >= label_lengths[:, None]] = IGNORE_LABEL
    return targets


@pytest.mark.parametrize("amp", ["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("frontend", FRONTENDS)
def test_pretraining_step_on_the_gpu(frontend, amp):
    """Loss and every gradient finite and on the GPU; with fp16 through the GradScaler, as the
    trainer does it."""
    model = _pretrainer(frontend)
    inputs, lengths = _inputs(frontend)
    targets = _targets(frontend, model, inputs, lengths)
    model.to(DEVICE).train()
    scaler = torch.amp.GradScaler(DEVICE.type, enabled=amp == "fp16")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)
    # backward inside the autocast block too (the trainer leaves it, users often don't): the
    # custom autograd Functions must not mix dtypes then
    with torch.autocast(DEVICE.type, dtype=dtype or torch.float32, enabled=dtype is not None):
        loss, stats = model(inputs.to(DEVICE), lengths.to(DEVICE), None if targets is None else targets.to(DEVICE))
        assert loss.device.type == DEVICE.type and torch.isfinite(loss), stats
        assert stats["masked_frames"] > 0
        scaler.scale(loss).backward()
    scaler.unscale_(torch.optim.SGD(model.parameters(), lr=0.0))
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert len(grads) > 0.5 * sum(1 for _ in model.parameters())
    assert all(g.device.type == DEVICE.type and torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("frontend", FRONTENDS)
def test_encoder_on_the_gpu_matches_the_cpu(frontend):
    cfg = _frontend_cfg(frontend)
    torch.manual_seed(0)
    encoder = get_frontend(cfg["frontend"]).build_encoder(cfg["frontend"]["encoder"]).eval()
    inputs, lengths = _inputs(frontend)
    with torch.no_grad():
        on_cpu = encoder(inputs, lengths)
        on_gpu = encoder.to(DEVICE)(inputs.to(DEVICE), lengths.to(DEVICE))
    assert torch.equal(on_gpu.lengths.cpu(), on_cpu.lengths)
    valid = torch.arange(on_cpu.hidden.shape[1])[None] < on_cpu.lengths[:, None]
    torch.testing.assert_close(on_gpu.hidden.cpu()[valid], on_cpu.hidden[valid], atol=1e-4, rtol=1e-4)


def _asr_model(head: str):
    cfg = load_configs([CONF / "frontend_wav2vec2.yaml", CONF / f"finetune_{head}.yaml"])
    torch.manual_seed(0)
    return build_asr_model(cfg, VOCAB).eval(), cfg.get("decode", {})


@pytest.mark.parametrize("head", HEADS)
def test_heads_score_and_decode_on_the_gpu_as_on_the_cpu(head):
    """Equal weights, eval mode: the loss agrees to 1e-4 and every search (with and without the
    LM) finds the same hypotheses."""
    model, decode_cfg = _asr_model(head)
    torch.manual_seed(1)
    lm = build_lm(load_configs([CONF / "lm.yaml"])["lm"], VOCAB).eval()
    inputs, lengths = _inputs("wav2vec2")
    tokens = [[3, 4, 5, 5, 6], [7, 8], [9]]
    results = {}
    for device in (torch.device("cpu"), DEVICE):
        model.to(device), lm.to(device)
        x, n = inputs.to(device), lengths.to(device)
        with torch.no_grad():
            loss = float(model(x, n, tokens))
        hyps = {}
        for method in model.head.methods:
            if method == "ctc_lexicon":
                continue  # a CPU-side constraint on the same scores as ctc_beam
            hyps[method] = model.decode(x, n, method, decode_options(decode_cfg, beam_size=4))
            hyps[method + "+lm"] = model.decode(x, n, method, decode_options(decode_cfg, beam_size=4, lm=lm,
                                                                              lm_weight=0.5, length_bonus=0.5))
        results[device.type] = loss, hyps
    (cpu_loss, cpu_hyps), (gpu_loss, gpu_hyps) = results["cpu"], results[DEVICE.type]
    assert gpu_loss == pytest.approx(cpu_loss, rel=1e-4)
    assert gpu_hyps == cpu_hyps
    assert any(h for hyps in cpu_hyps.values() for h in hyps)  # random weights still emit tokens


class _DeviceCheckingTask:
    """A linear regression whose forward asserts that the batch arrived on the model's device."""

    def __init__(self, batches):
        self.model = torch.nn.Linear(4, 2)
        self.batches = batches
        self.devices = set()
        self.forwards = 0

    def train_dataloader(self, dist):
        return _ListLoader(self.batches)

    def valid_dataloader(self, dist):
        return _ListLoader(self.batches[:2])

    def on_update(self, model, num_updates):
        pass

    def forward(self, model, batch):
        self.forwards += 1
        self.devices.add(batch["x"].device.type)
        loss = ((model(batch["x"]) - batch["y"]) ** 2).mean()
        return loss, {"loss": loss.item()}, 1.0

    def validate(self, model, loader):
        losses = []
        for batch in loader:
            self.devices.add(batch["x"].device.type)
            losses.append(float(((model(batch["x"]) - batch["y"]) ** 2).mean()))
        return {"loss": sum(losses), "weight": float(len(losses))}


class _ListLoader:
    def __init__(self, batches):
        self.dataset, self.num_workers = batches, 0
        self.sampler = _RangeSampler(len(batches))

    def __iter__(self):
        return iter(self.dataset)


class _RangeSampler:
    def __init__(self, n):
        self.n = n

    def set_epoch(self, epoch):
        pass

    def __iter__(self):
        return iter(range(self.n))


@pytest.mark.parametrize("amp", ["none", "bf16", "fp16"])
def test_trainer_feeds_the_gpu_model_and_resumes_on_it(tmp_path, amp):
    g = torch.Generator().manual_seed(0)
    batches = [{"x": torch.randn(8, 4, generator=g), "y": torch.randn(8, 2, generator=g)} for _ in range(4)]
    cfg = {"trainer": {"max_updates": 3, "log_every": 1, "valid_every": 2, "checkpoint_every": 2, "amp": amp,
                       "final_model": "best"},
           "optim": {"lr": 0.01}, "scheduler": {"name": "constant"}}
    task = _DeviceCheckingTask(batches)
    trainer = Trainer(cfg, task, tmp_path, DistInfo(device=DEVICE))
    trainer.fit()
    assert task.devices == {DEVICE.type}
    assert next(task.model.parameters()).device.type == DEVICE.type
    cfg["trainer"]["max_updates"] = 5
    resumed_task = _DeviceCheckingTask(batches)
    resumed = Trainer(cfg, resumed_task, tmp_path, DistInfo(device=DEVICE))
    resumed.fit()
    assert resumed.num_updates == 5 and resumed.kept_models
    # resumed on the GPU from the checkpoint (update 2 or 3), not trained again from update 0
    assert resumed_task.devices == {DEVICE.type} and next(resumed_task.model.parameters()).device.type == DEVICE.type
    assert 2 <= resumed_task.forwards <= 3
    # final_model best: the kept model of the lowest validation metric, not merely some validated one
    assert resumed.kept_models[0][0] == min(metric for metric, _ in resumed.kept_models)
    assert torch.load(tmp_path / "model_final.pt", weights_only=False)["num_updates"] == resumed.kept_models[0][1]


def test_decode_cli_on_the_gpu_writes_what_the_cpu_writes(tiny_system, tmp_path):  # noqa: F811
    """decode.py --device: every CTC method, lexicon and LM ones included, finds the same
    hypotheses on the GPU as on the CPU, and says where it ran."""
    from sslasr.bin import decode
    (tmp_path / "words.txt").write_text("AB\nBA\nA\nB\n")
    methods = ["ctc_greedy", "ctc_beam", "ctc_lexicon", "ctc_beam+lm", "ctc_lexicon+lm"]
    for device in ("cpu", DEVICE.type):
        decode.main(["--model", tiny_system["model"], "--lm", tiny_system["lm"], "--lexicon", str(tmp_path / "words.txt"),
                     "--cuts", f"dev={tiny_system['dev']}", "--methods", *methods, "--lm-weight", "0.5",
                     "--device", device, "--out-dir", str(tmp_path / device / "{method}")])
    for method in methods:
        folder = method.replace("+lm", "_lm")
        cpu, gpu = (tmp_path / device / folder for device in ("cpu", DEVICE.type))
        assert (gpu / "hyp.txt").read_text() == (cpu / "hyp.txt").read_text(), method
        assert json.loads((gpu / "decode_info.json").read_text())["device"] == DEVICE.type


def test_hidden_layer_features_on_the_gpu_match_the_cpu(tmp_path):
    """HuBERT's iteration-2 features (a layer of the iteration-1 model) on the GPU: the CPU's to
    1e-4, computed in this process even when worker processes are asked for."""
    from sslasr.data.frame_features import cut_features
    from sslasr.data.loader import load_cuts
    from test_hubert import _audio_cuts, _tiny_checkpoint
    _tiny_checkpoint(tmp_path / "model.pt")
    cuts = list(load_cuts(_audio_cuts(tmp_path)))
    on_cpu = list(cut_features(cuts, "layer", tmp_path / "model.pt", layer=1, num_jobs=1))
    on_gpu = list(cut_features(cuts, "layer", tmp_path / "model.pt", layer=1, num_jobs=2, device=DEVICE))
    assert [cut.id for cut, _ in on_gpu] == [cut.id for cut in cuts]
    for (_, cpu), (_, gpu) in zip(on_cpu, on_gpu):
        assert gpu.shape == cpu.shape and gpu.dtype == cpu.dtype
        np.testing.assert_allclose(gpu, cpu, atol=1e-4, rtol=1e-4)
