"""Pretraining-step throughput, ours vs transformers at identical configurations, on the CPU
(or a GPU with --device cuda, optionally under --amp bf16 for both):
wav2vec 2.0 (our Wav2Vec2Pretrainer vs Wav2Vec2ForPreTraining) and, with --frontend, HuBERT,
WavLM and w2v-BERT (our pretrainers vs the transformers base models with a linear CE head:
see bench/ssl_cases.py).

One timed step = forward + loss + backward + zero_grad, both models in train mode (dropout on).
The optimizer step is excluded by default (it is the same AdamW over the same parameter count for
both); `--optimizer` includes an AdamW step for both. Span masks and negatives are drawn inside
the timed region for both: ours draws them inside forward (torch), and for transformers the
numpy helpers `_compute_mask_indices` / `_sample_negative_indices` run inside each timed step.
Iterations alternate ours/theirs in one process so that load from other processes hits both.

    .venv/bin/python bench/pretrain_throughput.py --config tiny --iters 10
    .venv/bin/python bench/pretrain_throughput.py --frontend all
    python bench/pretrain_throughput.py --frontend all --config small --device cuda --amp bf16 --batch 16
    python bench/pretrain_throughput.py --frontend hubert --config small --device cuda --batch 16 --profile prof/

--profile DIR then runs --profile-steps more steps of each model under torch.profiler and writes
DIR/<frontend>_<model>.txt (the ops by self time on the device, or on the CPU without one) and
prints per step: wall time, device busy time, kernel launches and host synchronisations.
"""

import argparse
import dataclasses
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Dict, Tuple

import numpy as np
import torch
from transformers import Wav2Vec2Config, Wav2Vec2ForPreTraining
from transformers.models.wav2vec2.modeling_wav2vec2 import _compute_mask_indices, _sample_negative_indices

from sslasr.models.wav2vec2 import (Wav2Vec2EncoderConfig, Wav2Vec2PretrainConfig, Wav2Vec2Pretrainer)
from sslasr.utils.config import load_config
from ssl_cases import CONFIGS, SMALL_ENCODER, build_case, wav2vec2_encoder_hf_fields

ROOT = Path(__file__).resolve().parents[1]
SMALL = {  # base-shaped (7-layer conv stack, post-LN Transformer) but narrower and shallower
    "encoder": SMALL_ENCODER,
    "pretrain": {"mask": {"time_prob": 0.65, "time_length": 10, "time_min_masks": 2},
                 "quantizer_groups": 2, "quantizer_entries": 320, "quantizer_dim": 256, "final_dim": 256,
                 "num_negatives": 100, "logit_temperature": 0.1, "diversity_weight": 0.1,
                 "dropout_features": 0.1},
}


def load_frontend(name: str):
    if name == "small":
        enc, obj = SMALL["encoder"], SMALL["pretrain"]
    else:  # tiny: exactly what the minisynth recipe pretrains
        cfg = load_config(ROOT / "egs/minisynth/conf/frontend_wav2vec2.yaml")
        enc, obj = cfg["frontend"]["encoder"], cfg["pretrain"]
    known = {f.name for f in dataclasses.fields(Wav2Vec2PretrainConfig)}
    obj = {k: v for k, v in obj.items() if k in known}  # drop recipe-only keys (collapse warning)
    return Wav2Vec2EncoderConfig.from_dict(enc), Wav2Vec2PretrainConfig.from_dict(obj)


def to_hf_config(enc: Wav2Vec2EncoderConfig, pre: Wav2Vec2PretrainConfig) -> Wav2Vec2Config:
    """Field-by-field mapping ours → transformers. Not expressible in transformers (and so not
    part of the comparison's maths): our feature_grad_mult (a gradient scale on the conv output)
    and the feature penalty λ·mean(z²) — both cost one elementwise op."""
    return Wav2Vec2Config(
        **wav2vec2_encoder_hf_fields(enc),
        mask_time_prob=pre.mask.time_prob,
        mask_time_length=pre.mask.time_length,
        mask_time_min_masks=pre.mask.time_min_masks,
        mask_feature_prob=0.0,                               # pretraining masks time only
        num_codevector_groups=pre.quantizer_groups,
        num_codevectors_per_group=pre.quantizer_entries,
        codevector_dim=pre.quantizer_dim,
        proj_codevector_dim=pre.final_dim,
        num_negatives=pre.num_negatives,
        contrastive_logits_temperature=pre.logit_temperature,
        diversity_loss_weight=pre.diversity_weight,
        feat_quantizer_dropout=pre.dropout_features,
        attn_implementation="sdpa",                          # fused attention, as ours
    )


def make_steps(ours, theirs, hf_cfg, wav, lengths, optimizer: bool):
    device = wav.device
    num_frames = int(theirs._get_feat_extract_output_lengths(wav.shape[1]))
    opts = {m: torch.optim.AdamW(m.parameters(), lr=1e-5) for m in (ours, theirs)} if optimizer else {}

    def finish(model, loss):
        loss.backward()
        if optimizer:
            opts[model].step()
        model.zero_grad(set_to_none=True)

    def step_ours():
        loss, _ = ours(wav, lengths)
        finish(ours, loss)

    def step_theirs():
        shape = (wav.shape[0], num_frames)
        mask = _compute_mask_indices(shape, hf_cfg.mask_time_prob, hf_cfg.mask_time_length,
                                     min_masks=hf_cfg.mask_time_min_masks)
        negatives = _sample_negative_indices(shape, hf_cfg.num_negatives, mask)
        out = theirs(wav, mask_time_indices=torch.from_numpy(mask).to(device),
                     sampled_negative_indices=torch.from_numpy(negatives).long().to(device))
        finish(theirs, out.loss)

    return step_ours, step_theirs


def repeat_in_fresh_processes(runs: int) -> None:
    """--runs N: this command (less --runs) N times, each in a new process, then each frontend's
    median ratio and range over the runs. Runs differ by more than the iterations within one
    (±10 % on the 2-core machine: what the allocator and the caches hold is per process), so a
    target is judged on the range over runs, not on one run's interval."""
    argv = [*sys.argv[1:], "--runs", "1"]  # argparse keeps the last --runs
    by_frontend: Dict[str, list] = {}
    for run in range(1, runs + 1):
        done = subprocess.run([sys.executable, __file__, *argv], capture_output=True, text=True)
        if done.returncode:
            raise SystemExit(f"run {run} failed:\n{done.stderr[-3000:]}")
        ratios = run_ratios(done.stdout)
        print(f"run {run}: " + "  ".join(f"{name}: {ratio:.2f}×" for name, ratio in ratios.items()), flush=True)
        for name, ratio in ratios.items():
            by_frontend.setdefault(name, []).append(ratio)
    print(f"\nover {runs} runs (median, range): " + "  ".join(
        f"{name}: {statistics.median(r):.2f}× ({min(r):.2f}-{max(r):.2f}×)" for name, r in by_frontend.items()))


RATIO_LINE = re.compile(r"^ratio \(ours / transformers\), (\w+): ([0-9.]+)×", flags=re.M)


def ratio_line(frontend: str, ratio: float, interval: Tuple[float, float], iterations: int) -> str:
    """The line a run ends each frontend's measurement with (`run_ratios` reads it back)."""
    return (f"ratio (ours / transformers), {frontend}: {ratio:.2f}× (95 % bootstrap interval over the "
            f"{iterations} paired iterations: {interval[0]:.2f}-{interval[1]:.2f}×)")


def run_ratios(stdout: str) -> Dict[str, float]:
    """The frontend → ratio of one run's output, from its `ratio_line`s."""
    ratios = {name: float(ratio) for name, ratio in RATIO_LINE.findall(stdout)}
    if not ratios:
        raise SystemExit(f"cannot read the ratios of a run's output:\n{stdout[-2000:]}")
    return ratios


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", choices=CONFIGS, default="tiny")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8, help="utterances per batch")
    parser.add_argument("--seconds", type=float, default=4.0, help="seconds of audio per utterance")
    parser.add_argument("--iters", type=int, default=10, help="timed iterations per model")
    parser.add_argument("--warmup", type=int, default=2, help="untimed iterations per model")
    parser.add_argument("--optimizer", action="store_true", help="include an AdamW step for both")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--frontend", choices=["wav2vec2", "hubert", "wavlm", "w2vbert", "all"], default="wav2vec2")
    parser.add_argument("--device", default="cpu", help="cpu, or cuda[:N]")
    parser.add_argument("--amp", choices=["none", "bf16"], default="none", help="autocast both models' steps")
    parser.add_argument("--profile", type=Path, default=None,
                        help="folder for a torch.profiler table of each model's step (after the timing)")
    parser.add_argument("--profile-steps", type=int, default=3, help="steps per model under the profiler")
    parser.add_argument("--hf-no-input-grad", action="store_true",
                        help="turn off transformers' gradient w.r.t. the input waveform (equal work)")
    parser.add_argument("--runs", type=int, default=1,
                        help="repeat the whole measurement in this many fresh processes and summarise the ratios")
    args = parser.parse_args()
    if args.runs > 1:
        return repeat_in_fresh_processes(args.runs)
    args.device = torch.device(args.device)

    if args.frontend != "wav2vec2" and args.optimizer:
        parser.error("--optimizer applies to --frontend wav2vec2 only")
    torch.set_num_threads(args.threads)
    print(f"config={args.config} device={args.device} amp={args.amp} threads={args.threads} "
          f"batch={args.batch}x{args.seconds:g}s iters={args.iters} warmup={args.warmup} "
          f"optimizer_step={'yes' if args.optimizer else 'no'} hf_input_grad={'no' if args.hf_no_input_grad else 'yes'} "
          f"load_avg_1min={os.getloadavg()[0]:.1f}")
    frontends = ["wav2vec2", "hubert", "wavlm", "w2vbert"] if args.frontend == "all" else [args.frontend]
    ratios = {}
    for frontend in frontends:
        torch.manual_seed(args.seed)
        np.random.seed(args.seed)
        if frontend == "wav2vec2":
            steps = wav2vec2_steps(args)
        else:
            case = build_case(frontend, args.batch, args.seconds, args.config, args.device)
            print(f"\n{case.note}")
            print(f"encoder parameters: ours {case.encoder_params_ours:,}  transformers {case.encoder_params_theirs:,}"
                  f"  (transformers' attention: {case.theirs['base'].config._attn_implementation})")
            assert case.encoder_params_ours == case.encoder_params_theirs, "architectures do not match"
            steps = {"ours": case.step_ours, "transformers": case.step_theirs}
            if args.hf_no_input_grad:
                drop_hf_input_gradient(case.theirs)
        ratios[frontend] = time_steps(steps, args, frontend)
        if args.profile is not None:
            profile_steps(steps, args, frontend)
    if len(ratios) > 1:
        print("\n" + "  ".join(f"{name}: {ratio:.2f}×" for name, ratio in ratios.items()))


def wav2vec2_steps(args):
    enc_cfg, pre_cfg = load_frontend(args.config)
    hf_cfg = to_hf_config(enc_cfg, pre_cfg)
    ours = Wav2Vec2Pretrainer(enc_cfg, pre_cfg).to(args.device).train()
    theirs = Wav2Vec2ForPreTraining(hf_cfg).to(args.device).train()
    if args.hf_no_input_grad:
        drop_hf_input_gradient(theirs)

    n_ours = sum(p.numel() for p in ours.parameters())
    n_theirs = sum(p.numel() for p in theirs.parameters())
    print(f"parameters: ours {n_ours:,}  transformers {n_theirs:,}  (transformers' attention: "
          f"{theirs.config._attn_implementation})")
    assert n_ours == n_theirs, "configs do not match"

    samples = int(args.seconds * 16000)
    wav = torch.randn(args.batch, samples, device=args.device)
    lengths = torch.full((args.batch,), samples, dtype=torch.long, device=args.device)
    return dict(zip(("ours", "transformers"), make_steps(ours, theirs, hf_cfg, wav, lengths, args.optimizer)))


def drop_hf_input_gradient(model: torch.nn.Module) -> None:
    """transformers' conv feature encoder sets requires_grad on the input waveform in training
    (for gradient checkpointing, off here), so its backward computes a gradient no one reads;
    ours does not. Off (its private flag, which freeze_feature_encoder() also clears, without
    freezing the weights here), both steps do the same work. w2v-BERT has no such encoder."""
    for module in model.modules():
        if type(module).__name__.endswith("FeatureEncoder") and hasattr(module, "_requires_grad"):
            module._requires_grad = False


def step_autocast(args) -> torch.autocast:
    """The context every timed or profiled step runs in: bf16 autocast under --amp bf16."""
    return torch.autocast(args.device.type, dtype=torch.bfloat16, enabled=args.amp == "bf16")


def time_steps(steps, args, frontend: str) -> float:
    """Alternating timed iterations; prints the table and returns the median-time ratio."""
    times = {name: [] for name in steps}
    cuda = args.device.type == "cuda"
    autocast = step_autocast(args)
    for i in range(args.warmup + args.iters):
        order = list(steps) if i % 2 == 0 else list(steps)[::-1]  # alternate who goes first
        for name in order:
            if cuda:  # a step's time is its kernels' time, not its launches'
                torch.cuda.synchronize(args.device)
            start = time.perf_counter()
            with autocast:
                steps[name]()
            if cuda:
                torch.cuda.synchronize(args.device)
            if i >= args.warmup:
                times[name].append(time.perf_counter() - start)

    audio = args.batch * args.seconds
    print(f"{'model':<14}{'median s/step':>14}{'min s/step':>12}{'audio-s/s':>12}")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"{name:<14}{med:>14.3f}{min(ts):>12.3f}{audio / med:>12.1f}")
    ratio = statistics.median(times["transformers"]) / statistics.median(times["ours"])
    low, high = ratio_interval(times["ours"], times["transformers"])
    print(ratio_line(frontend, ratio, (low, high), len(times["ours"])))
    return ratio


def ratio_interval(ours, theirs, resamples: int = 2000, seed: int = 0):
    """95 % percentile-bootstrap interval of median(theirs) / median(ours). Iterations are resampled
    as pairs: the two steps of an iteration run back to back, so load that slows one slows both."""
    ours, theirs = np.asarray(ours), np.asarray(theirs)
    picks = np.random.default_rng(seed).integers(len(ours), size=(resamples, len(ours)))
    ratios = np.median(theirs[picks], axis=1) / np.median(ours[picks], axis=1)
    low, high = np.percentile(ratios, [2.5, 97.5])
    return float(low), float(high)


# Host-side events of the CUDA runtime (and driver) API under the profiler: kernel launches, and
# the calls that make the host wait for the device (a blocking copy, an explicit synchronisation).
LAUNCHES = ("cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cuLaunchKernelEx")
SYNCS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy")


def profile_steps(steps: Dict[str, Callable[[], None]], args, frontend: str) -> None:
    """--profile-steps steps of each model under torch.profiler: a table of ops by self time in
    args.profile, and one summary line per model (per-step means)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    cuda = args.device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    autocast = step_autocast(args)
    args.profile.mkdir(parents=True, exist_ok=True)
    n = args.profile_steps
    print(f"profile ({n} steps each, per-step means): wall ms, device busy ms, kernel launches, "
          f"host syncs (cudaMemcpy/…Synchronize calls), CPU ops")
    for name, step in steps.items():
        if cuda:
            torch.cuda.synchronize(args.device)
        with profile(activities=activities) as prof:
            start = time.perf_counter()
            for _ in range(n):
                with autocast:
                    step()
            if cuda:
                torch.cuda.synchronize(args.device)
            wall = time.perf_counter() - start
        events = prof.key_averages()
        sort_by = "self_device_time_total" if cuda else "self_cpu_time_total"
        table = args.profile / f"{frontend}_{name}.txt"
        table.write_text(events.table(sort_by=sort_by, row_limit=60) + "\n")
        # device time from the kernel and copy rows alone: an op's row repeats its kernels' time
        device_us = sum(e.self_device_time_total for e in events if e.device_type == DeviceType.CUDA)
        launches, syncs = (sum(e.count for e in events if e.key in names) for names in (LAUNCHES, SYNCS))
        ops = sum(e.count for e in events if e.key.startswith("aten::"))
        print(f"  {name:<13} {1e3 * wall / n:8.1f} {device_us / 1e3 / n:8.1f} {launches / n:8.0f} "
              f"{syncs / n:6.0f} {ops / n:7.0f}   {table}")


if __name__ == "__main__":
    main()
