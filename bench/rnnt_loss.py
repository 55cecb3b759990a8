"""RNN-T loss, forward + backward: time and peak memory of

  reference        full (B, T, U+1, V) logits → F.log_softmax → the textbook dynamic programme, one
                   (t, u) cell at a time (vectorised over the batch), gradient by autograd
  full/autograd    our fused arc log-probs + the anti-diagonal α recursion, gradient by autograd
  full             our rnnt_loss: fused arc log-probs, α forward, β backward (sslasr/losses/rnnt.py)
  pruned           simple loss of the trivial joiner + the joiner on s_range nodes per frame only

Two tables per case. "Through the joiner" starts from the encoder and prediction-network
projections, so the full-lattice variants pay for the (B, T, U+1, J) joiner activations and the
(B, T, U+1, V) logits, and the pruned one for its windows: the comparison a training step sees.
"Loss only" starts from given (B, T, U+1, V) logits and isolates the loss itself (no pruned row:
pruning is a way of not computing those logits).

Each variant runs in its own process. Peak memory is how far the process's resident set rises
above its size at the start of one forward + backward (Linux: the high-water mark VmHWM, reset
through /proc/self/clear_refs once the inputs exist), so it counts every buffer an operation
allocates. glibc's mmap threshold is pinned at 64 KiB in those processes, so that freed tensors
leave the resident set instead of being reused unseen. The time is the median of --iters steps
after that one.
All variants first agree on the loss value (pruned ≥ full, as it must).

    .venv/bin/python bench/rnnt_loss.py                       # base and large_vocab, 1 thread
    .venv/bin/python bench/rnnt_loss.py --case base --iters 5 --threads 2
"""

import argparse
import multiprocessing as mp
import os
import re
import statistics
import time

import torch
import torch.nn.functional as F

from sslasr.losses.rnnt import (arc_log_probs, gather_windows, lattice_nll, lattice_nll_autograd, next_tokens,
                                node_posteriors, prune_ranges, pruned_rnnt_loss, rnnt_loss, simple_lattice)

CASES = {  # B, T (frames after subsampling, 10 s at 40 ms), U, V, joiner dim
    "base": dict(B=8, T=250, U=60, V=500, J=512),
    "large_vocab": dict(B=4, T=250, U=60, V=2000, J=256),
    "smoke": dict(B=2, T=20, U=5, V=30, J=16),  # checks the script, not a measurement
}
MEASURED = ("base", "large_vocab")
VARIANTS = ("reference", "full/autograd", "full", "pruned")
S_RANGE = 5


def make_inputs(B, T, U, V, J, seed=0, logits=False):
    gen = torch.Generator().manual_seed(seed)
    frames = torch.randint(T * 3 // 4, T + 1, (B,), generator=gen)
    frames[0] = T
    lengths = torch.randint(U * 3 // 4, U + 1, (B,), generator=gen)
    lengths[0] = U
    x = {
        "encoder": torch.randn(B, T, J, generator=gen).requires_grad_(True),
        "predictor": torch.randn(B, U + 1, J, generator=gen).requires_grad_(True),
        "output": (torch.randn(V, J, generator=gen) / J ** 0.5).requires_grad_(True),
        "am": torch.randn(B, T, V, generator=gen).requires_grad_(True),
        "lm": torch.randn(B, U + 1, V, generator=gen).requires_grad_(True),
        "targets": torch.randint(1, V, (B, U), generator=gen),
        "frames": frames,
        "lengths": lengths,
    }
    if logits:  # the "loss only" scope starts from the joiner's output
        with torch.no_grad():
            x["logits"] = joiner_logits(x, x["predictor"].unsqueeze(1)).requires_grad_(True)
    return x


def joiner_logits(x, predictor):
    return torch.tanh(x["encoder"].unsqueeze(2) + predictor) @ x["output"].T


def full_logits(x):
    """The (B, T, U+1, V) logits: given (loss only), or from the joiner."""
    return x["logits"] if "logits" in x else joiner_logits(x, x["predictor"].unsqueeze(1))


def reference_loss(x):
    """Textbook RNN-T: log-softmax over the full lattice, α(t, u) cell by cell."""
    log_probs = F.log_softmax(full_logits(x), dim=-1)
    B, T, W, V = log_probs.shape
    tokens = next_tokens(x["targets"], x["lengths"], V, 0)
    blank = log_probs[..., 0]
    emit = log_probs.gather(3, tokens[:, None, :, None].expand(B, T, W, 1))[..., 0]
    alpha = [[None] * W for _ in range(T)]
    for t in range(T):
        for u in range(W):
            if t == 0 and u == 0:
                alpha[t][u] = blank.new_zeros(B)
            elif t == 0:
                alpha[t][u] = alpha[t][u - 1] + emit[:, t, u - 1]
            elif u == 0:
                alpha[t][u] = alpha[t - 1][u] + blank[:, t - 1, u]
            else:
                alpha[t][u] = torch.logaddexp(alpha[t - 1][u] + blank[:, t - 1, u], alpha[t][u - 1] + emit[:, t, u - 1])
    rows = torch.arange(B)
    final = torch.stack([torch.stack(row, 1) for row in alpha], 1)  # (B, T, W)
    last_t, last_u = x["frames"] - 1, x["lengths"]
    return -(final[rows, last_t, last_u] + blank[rows, last_t, last_u]).sum()


def full_autograd_loss(x):
    logits = full_logits(x)
    tokens = next_tokens(x["targets"], x["lengths"], logits.shape[-1], 0)
    blank, emit = arc_log_probs(logits, tokens.unsqueeze(1), 0)
    return lattice_nll_autograd(blank, emit[..., :-1], x["frames"], x["lengths"]).sum()


def full_loss(x):
    return rnnt_loss(full_logits(x), x["targets"], x["frames"], x["lengths"])


def pruned_loss(x, simple_loss_scale=0.5):
    blank, emit = simple_lattice(x["am"], x["lm"], x["targets"], x["lengths"])
    simple = lattice_nll(blank, emit, x["frames"], x["lengths"]).sum()
    posteriors = node_posteriors(blank.detach(), emit.detach(), x["frames"], x["lengths"])
    starts = prune_ranges(posteriors, x["frames"], x["lengths"], S_RANGE)
    logits = joiner_logits(x, gather_windows(x["predictor"], starts, S_RANGE))
    return simple_loss_scale * simple + pruned_rnnt_loss(logits, starts, x["targets"], x["frames"], x["lengths"])


LOSSES = {"reference": reference_loss, "full/autograd": full_autograd_loss, "full": full_loss, "pruned": pruned_loss}


def _status_mib(key: str) -> float:
    with open("/proc/self/status") as f:
        return int(re.search(rf"{key}:\s+(\d+)", f.read()).group(1)) / 1024  # kB


def reset_peak_rss() -> float:
    """Reset the resident-set high-water mark; returns the current resident set (MiB)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status_mib("VmRSS")


def run_variant(variant: str, case: dict, loss_only: bool, iters: int, threads: int, queue) -> None:
    torch.set_num_threads(threads)
    x = make_inputs(**case, logits=loss_only)
    fn = LOSSES[variant]
    fn(x).backward()  # once before the measured step: the process's one-time allocations (about 8 MiB
    for tensor in x.values():  # of kernels and buffers) are not the step's
        tensor.grad = None
    before = reset_peak_rss()
    loss = fn(x)
    loss.backward()
    peak = _status_mib("VmHWM") - before
    value = float(loss.detach())
    times = []
    for _ in range(iters):
        for tensor in x.values():
            tensor.grad = None
        start = time.perf_counter()
        fn(x).backward()
        times.append(time.perf_counter() - start)
    queue.put({"variant": variant, "loss": value, "peak_mib": peak, "median_s": statistics.median(times),
               "min_s": min(times)})


def measure(variant: str, case: dict, loss_only: bool, iters: int, threads: int) -> dict:
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"  # read by the child's glibc at start
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    process = ctx.Process(target=run_variant, args=(variant, case, loss_only, iters, threads, queue))
    process.start()
    result = queue.get()
    process.join()
    return result


def print_table(title: str, results: dict) -> None:
    print(f"  {title}")
    base = results.get("full")
    print(f"  {'variant':<15}{'loss':>12}{'median s':>10}{'min s':>9}{'peak MiB':>10}"
          + (f"{'time / full':>13}{'memory / full':>15}" if base else ""))
    for v, r in results.items():
        line = f"  {v:<15}{r['loss']:>12.2f}{r['median_s']:>10.3f}{r['min_s']:>9.3f}{r['peak_mib']:>10.0f}"
        if base:
            line += f"{r['median_s'] / base['median_s']:>12.2f}×{r['peak_mib'] / max(base['peak_mib'], 1):>14.2f}×"
        print(line)
    if base and "reference" in results:
        agree = abs(results["reference"]["loss"] - base["loss"]) <= 1e-4 * abs(base["loss"])
        print(f"  reference and full agree on the loss: {agree}")
    if base and "pruned" in results:
        print("  pruned ≥ full (a subset of the alignments, plus the weighted simple loss): "
              f"{results['pruned']['loss'] >= base['loss']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", choices=sorted(CASES), action="append", help="default: base and large_vocab")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {args.threads} thread(s), load average {os.getloadavg()[0]:.1f}, "
          f"s_range {S_RANGE}; fp32; forward + backward")
    for name in args.case or MEASURED:
        case = CASES[name]
        print(f"\n{name}: " + ", ".join(f"{k}={v}" for k, v in case.items()))
        print_table("through the joiner", {v: measure(v, case, False, args.iters, args.threads) for v in args.variants})
        print_table("loss only, from given logits", {v: measure(v, case, True, args.iters, args.threads)
                                                     for v in args.variants if v != "pruned"})
        print(f"  load average now {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
