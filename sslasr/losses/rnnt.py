"""RNN-transducer loss (Graves, 2012, "Sequence Transduction with Recurrent Neural Networks") and
its pruned variant (Kuang et al., 2022, "Pruned RNN-T for fast, memory-efficient ASR training"),
in plain PyTorch.

The lattice. An utterance has T frames and U tokens y_1..y_U. Node (t, u) means "frame t is being
read and u tokens are out". Two arcs leave it:
    blank  ∅(t, u) = log p(∅ | t, u)          to (t+1, u)
    emit   y(t, u) = log p(y_{u+1} | t, u)    to (t, u+1)      (u < U)
The forward variables sum over every partial alignment that reaches a node,
    α(0, 0) = 0,    α(t, u) = logaddexp(α(t−1, u) + ∅(t−1, u),  α(t, u−1) + y(t, u−1)),
    log p(y | x) = α(T−1, U) + ∅(T−1, U),
and the backward variables over every completion, with (T, U) the end node past the last blank,
    β(T, U) = 0,    β(t, u) = logaddexp(∅(t, u) + β(t+1, u),  y(t, u) + β(t, u+1)).
The derivative of −log p(y|x) with respect to an arc's log-probability is minus the arc's posterior,
exp(α(source) + arc + β(target) − log p(y|x)). So one α pass (forward) and one β pass (backward)
give the exact gradient, without autograd recording T·U small operations. `lattice_nll_autograd`
differentiates the α pass instead; it is kept as the cross-check of the β gradient, and
bench/rnnt_loss.py times the two.

Vectorisation. Nodes on one anti-diagonal n = t + u depend only on diagonal n − 1, so each pass is
T + U steps over (B, U+1) vectors. The arc log-probabilities are first "skewed",
X̃[b, n, u] = X[b, n − u, u], which makes each diagonal one contiguous row.

Memory. p(·|t, u) comes from (B, T, U+1, V) joiner logits. The arc log-probabilities are read from
them without storing a log-softmax copy: forward takes a logsumexp and two gathers; backward writes
softmax minus the one-hot arcs into a single (B, T, U+1, V) gradient buffer. Apart from the
logits, the loss keeps only O(B·T·U) values.

The lean variant: pruned RNN-T. For long utterances and large vocabularies the logits themselves
are too big. Kuang et al. first score the lattice with a trivial joiner whose logits are a sum,
am[t] + lm[u] (linear maps of the encoder frame and of the prediction-network output). Its
normaliser log Σ_v exp(am[t, v] + lm[u, v]) is a (T, V) × (V, U+1) matrix product, so this
"simple" loss never forms (T, U+1, V). Its node posteriors show, for every frame, which s_range
consecutive values of u carry the most probability. The real joiner is then evaluated only on
those windows, (B, T, s_range, V), and the same lattice recursion runs with every arc outside the
windows set to log 0. We chose this over function merging (running the full joiner and loss in
chunks of utterances). Function merging saves only memory. Pruning also removes most of the
joiner's work, T·s_range·V instead of T·(U+1)·V. The price is that pruning scores only the
alignments that stay inside the windows:

    pruned loss = full loss − log P(alignment inside the windows | x, y)  ≥  full loss,

with equality when the windows cover the lattice (s_range ≥ U+1). A window path exists only when
U ≤ T·(s_range − 1), because a frame can emit at most s_range − 1 tokens. Longer targets get loss 0
and no gradient; `pruned_feasible` finds them.

Arithmetic is in float32 whatever the logits' dtype; float64 inputs stay in float64.
"""

from typing import Tuple

import torch
from torch.autograd.function import once_differentiable
import torch.nn.functional as F

from sslasr.utils.devices import backward_without_autocast

# log 0 as a finite number: with −inf, logaddexp(−inf, −inf) has a NaN gradient. Sums of a few
# thousand of them stay far inside float32's range.
LOG_ZERO = -1.0e30
_IMPOSSIBLE = LOG_ZERO / 2  # a log-likelihood below this has no path through the lattice


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _full_precision(x: torch.Tensor):
    """Autocast off: under mixed precision the lattice sums and the simple loss's matrix product
    would otherwise run in 16 bits."""
    return torch.autocast(device_type=x.device.type, enabled=False)


# ---------------------------------------------------------------------------- checks and layout
def _check_lengths(num_frames: int, max_tokens: int, frames: torch.Tensor, target_lengths: torch.Tensor) -> None:
    if frames.dim() != 1 or target_lengths.shape != frames.shape:
        raise ValueError(f"frames and target_lengths must both be (batch,), got {tuple(frames.shape)} "
                         f"and {tuple(target_lengths.shape)}")
    if len(frames) and (int(frames.min()) < 1 or int(frames.max()) > num_frames):
        raise ValueError(f"frame lengths must lie in [1, {num_frames}] (the logits' frames), "
                         f"got {frames.tolist()}")
    if len(frames) and (int(target_lengths.min()) < 0 or int(target_lengths.max()) > max_tokens):
        raise ValueError(f"target lengths must lie in [0, {max_tokens}] (the targets' width), "
                         f"got {target_lengths.tolist()}")


def next_tokens(targets: torch.Tensor, target_lengths: torch.Tensor, vocab_size: int, blank: int) -> torch.Tensor:
    """(B, U) padded targets → (B, U+1) with column u holding y_{u+1}, the token an emit arc from
    node (·, u) outputs. Past an utterance's last token (no emit arc) it holds `blank`."""
    positions = torch.arange(targets.shape[1], device=targets.device)
    valid = positions < target_lengths.unsqueeze(1)
    real = targets[valid]
    if real.numel() and (int(real.min()) < 0 or int(real.max()) >= vocab_size):
        raise ValueError(f"target token ids must lie in [0, {vocab_size}), got {int(real.min())}..{int(real.max())}")
    if bool((real == blank).any()):
        raise ValueError(f"targets contain the blank id {blank}")
    tokens = targets.masked_fill(~valid, blank)
    return F.pad(tokens, (0, 1), value=blank)


def _skew(x: torch.Tensor, fill: float) -> torch.Tensor:
    """(B, T, W) → (B, T+W, W) with out[b, n, u] = x[b, n − u, u]; cells off the grid = fill.
    Row n is anti-diagonal n; the last row (n = T+W−1) is where an end node (T, W−1) lies."""
    B, T, W = x.shape
    t = torch.arange(T + W, device=x.device).unsqueeze(1) - torch.arange(W, device=x.device)
    out = x.gather(1, t.clamp(0, T - 1).expand(B, -1, -1))
    return out.masked_fill(~((t >= 0) & (t < T)), fill)


def _unskew(x: torch.Tensor, num_frames: int) -> torch.Tensor:
    """Inverse of _skew: (B, N, W) → (B, T, W), reading row t + u for cell (t, u)."""
    B, _, W = x.shape
    n = torch.arange(num_frames, device=x.device).unsqueeze(1) + torch.arange(W, device=x.device)
    return x.gather(1, n.expand(B, -1, -1))


# ---------------------------------------------------------------------------- the two passes
def _alpha(blank_s: torch.Tensor, emit_s: torch.Tensor) -> torch.Tensor:
    """Forward variables on the skewed lattice, (B, N, W) with row n, column u = α(n − u, u).
    Written without in-place updates so that autograd can differentiate it."""
    B, N, W = blank_s.shape
    row = torch.cat([blank_s.new_zeros(B, 1), blank_s.new_full((B, W - 1), LOG_ZERO)], dim=1)
    rows = [row]
    for n in range(1, N):
        stay = row + blank_s[:, n - 1]                  # α(t−1, u) + ∅(t−1, u)
        move = row[:, :-1] + emit_s[:, n - 1, :-1]      # α(t, u−1) + y(t, u−1)
        row = torch.cat([stay[:, :1], torch.logaddexp(stay[:, 1:], move)], dim=1)
        rows.append(row)
    return torch.stack(rows, dim=1)


def _lattice_masks(N: int, W: int, frames: torch.Tensor, target_lengths: torch.Tensor):
    """On the skewed grid: `inside` = nodes (t, u) with t < T_b, u ≤ U_b; `end` = the end node (T_b, U_b)."""
    n = torch.arange(N, device=frames.device).view(1, N, 1)
    u = torch.arange(W, device=frames.device).view(1, 1, W)
    t = n - u
    frames, tokens = frames.view(-1, 1, 1), target_lengths.view(-1, 1, 1)
    inside = (t >= 0) & (t < frames) & (u <= tokens)
    end = (t == frames) & (u == tokens)
    return inside, end


def _beta(blank_s: torch.Tensor, emit_s: torch.Tensor, inside: torch.Tensor, end: torch.Tensor) -> torch.Tensor:
    """Backward variables on the skewed lattice, (B, N, W); β = 0 at each utterance's end node,
    log 0 on every other node outside its lattice."""
    B, N, W = blank_s.shape
    off_lattice = torch.where(end, 0.0, LOG_ZERO).to(blank_s.dtype)
    row = off_lattice[:, N - 1]
    rows = [row]
    for n in range(N - 2, -1, -1):
        stay = blank_s[:, n] + row                      # ∅(t, u) + β(t+1, u)
        move = emit_s[:, n, :-1] + row[:, 1:]           # y(t, u) + β(t, u+1)
        row = torch.cat([torch.logaddexp(stay[:, :-1], move), stay[:, -1:]], dim=1)
        row = torch.where(inside[:, n], row, off_lattice[:, n])
        rows.append(row)
    return torch.stack(rows[::-1], dim=1)


def _log_likelihood(alpha: torch.Tensor, blank_s: torch.Tensor, frames: torch.Tensor,
                    target_lengths: torch.Tensor) -> torch.Tensor:
    """log p(y|x) = α(T_b−1, U_b) + ∅(T_b−1, U_b) per utterance, (B,)."""
    rows = torch.arange(len(frames), device=frames.device)
    last = frames - 1 + target_lengths
    return alpha[rows, last, target_lengths] + blank_s[rows, last, target_lengths]


def _arc_posteriors(blank_s, emit_s, alpha, log_like, inside, end) -> Tuple[torch.Tensor, torch.Tensor]:
    """Posterior probability of every blank and emit arc, skewed, (B, N−1, W) and (B, N−1, W−1).
    Only arcs that leave a node inside the lattice count; utterances without any path get 0."""
    beta = _beta(blank_s, emit_s, inside, end)
    possible = (log_like > _IMPOSSIBLE).view(-1, 1, 1)
    log_z = log_like.view(-1, 1, 1)
    source = inside[:, :-1] & possible
    blank_post = torch.exp(alpha[:, :-1] + blank_s[:, :-1] + beta[:, 1:] - log_z)
    emit_post = torch.exp(alpha[:, :-1, :-1] + emit_s[:, :-1, :-1] + beta[:, 1:, 1:] - log_z)
    zero = blank_post.new_zeros(())
    return torch.where(source, blank_post, zero), torch.where(source[..., :-1], emit_post, zero)


def _skew_arcs(blank: torch.Tensor, emit: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(B, T, U+1) blank and (B, T, U) emit log-probabilities → skewed (B, T+U+1, U+1) each
    (emit gets a log-0 column for u = U, where no emit arc exists)."""
    return _skew(blank, LOG_ZERO), _skew(F.pad(emit, (0, 1), value=LOG_ZERO), LOG_ZERO)


class _LatticeNLL(torch.autograd.Function):
    """−log p(y|x) from arc log-probabilities; α forward, β backward."""

    @staticmethod
    def forward(ctx, blank, emit, frames, target_lengths):
        blank_s, emit_s = _skew_arcs(blank, emit)
        alpha = _alpha(blank_s, emit_s)
        log_like = _log_likelihood(alpha, blank_s, frames, target_lengths)
        ctx.save_for_backward(blank_s, emit_s, alpha, log_like, frames, target_lengths)
        ctx.num_frames = blank.shape[1]
        return -log_like

    @staticmethod
    @once_differentiable
    @backward_without_autocast
    def backward(ctx, grad):
        blank_s, emit_s, alpha, log_like, frames, target_lengths = ctx.saved_tensors
        inside, end = _lattice_masks(blank_s.shape[1], blank_s.shape[2], frames, target_lengths)
        blank_post, emit_post = _arc_posteriors(blank_s, emit_s, alpha, log_like, inside, end)
        scale = -grad.view(-1, 1, 1)  # d(−log p)/d(arc) = −posterior
        return (_unskew(blank_post, ctx.num_frames) * scale, _unskew(emit_post, ctx.num_frames) * scale,
                None, None)


def _check_arcs(blank: torch.Tensor, emit: torch.Tensor, frames: torch.Tensor, target_lengths: torch.Tensor) -> None:
    B, T, W = blank.shape
    if emit.shape != (B, T, W - 1):
        raise ValueError(f"emit log-probs must be (B, T, U) = {(B, T, W - 1)} for blank (B, T, U+1) = "
                         f"{tuple(blank.shape)}, got {tuple(emit.shape)}")
    _check_lengths(T, W - 1, frames, target_lengths)


def lattice_nll(blank: torch.Tensor, emit: torch.Tensor, frames: torch.Tensor,
                target_lengths: torch.Tensor) -> torch.Tensor:
    """−log p(y|x) per utterance (B,) from blank log-probs (B, T, U+1) and emit log-probs (B, T, U)
    (column u = log p(y_{u+1} | t, u)). Cells past an utterance's frames/tokens are ignored."""
    _check_arcs(blank, emit, frames, target_lengths)
    with _full_precision(blank):
        return _LatticeNLL.apply(blank, emit, frames.long(), target_lengths.long())


def lattice_nll_autograd(blank: torch.Tensor, emit: torch.Tensor, frames: torch.Tensor,
                         target_lengths: torch.Tensor) -> torch.Tensor:
    """lattice_nll with the gradient taken by autograd through the α pass (reference and benchmark)."""
    _check_arcs(blank, emit, frames, target_lengths)
    blank_s, emit_s = _skew_arcs(blank, emit)
    return -_log_likelihood(_alpha(blank_s, emit_s), blank_s, frames.long(), target_lengths.long())


@torch.no_grad()
def node_posteriors(blank: torch.Tensor, emit: torch.Tensor, frames: torch.Tensor,
                    target_lengths: torch.Tensor) -> torch.Tensor:
    """P(an alignment passes through node (t, u) | x, y), (B, T, U+1): the sum of the posteriors of
    the two arcs that leave the node."""
    _check_arcs(blank, emit, frames, target_lengths)
    frames, target_lengths = frames.long(), target_lengths.long()
    blank_s, emit_s = _skew_arcs(blank, emit)
    alpha = _alpha(blank_s, emit_s)
    log_like = _log_likelihood(alpha, blank_s, frames, target_lengths)
    inside, end = _lattice_masks(blank_s.shape[1], blank_s.shape[2], frames, target_lengths)
    blank_post, emit_post = _arc_posteriors(blank_s, emit_s, alpha, log_like, inside, end)
    return _unskew(blank_post + F.pad(emit_post, (0, 1)), blank.shape[1])


# ---------------------------------------------------------------------------- arc log-probs from logits
class _ArcLogProbs(torch.autograd.Function):
    """(…, V) logits → log p(∅) and log p(token) per cell, without keeping a log-softmax copy."""

    @staticmethod
    def forward(ctx, logits, tokens, blank):
        x = logits.to(compute_dtype(logits.dtype))
        normaliser = torch.logsumexp(x, dim=-1)
        blank_lp = x[..., blank] - normaliser
        emit_lp = x.gather(-1, tokens.unsqueeze(-1)).squeeze(-1) - normaliser
        ctx.save_for_backward(logits, normaliser, tokens)
        ctx.blank = blank
        return blank_lp, emit_lp

    @staticmethod
    @once_differentiable
    @backward_without_autocast
    def backward(ctx, grad_blank, grad_emit):
        logits, normaliser, tokens = ctx.saved_tensors
        # d(x_k − logsumexp x)/dx_j = [j = k] − softmax_j: one buffer holds −softmax·(g∅ + g_y) + one-hots
        grad = torch.sub(logits, normaliser.unsqueeze(-1)).exp_()
        grad.mul_((grad_blank + grad_emit).neg_().unsqueeze(-1))
        grad.select(-1, ctx.blank).add_(grad_blank)
        grad.scatter_add_(-1, tokens.unsqueeze(-1), grad_emit.unsqueeze(-1))
        return grad.to(logits.dtype), None, None


def arc_log_probs(logits: torch.Tensor, tokens: torch.Tensor, blank: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """log_softmax(logits)[..., blank] and log_softmax(logits)[..., tokens], each shaped like `tokens`."""
    return _ArcLogProbs.apply(logits, tokens.expand(logits.shape[:-1]), blank)


def _reduce(losses: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "sum":
        return losses.sum()
    if reduction == "mean":
        return losses.mean()
    if reduction == "none":
        return losses
    raise ValueError(f"reduction must be 'sum', 'mean' or 'none', got {reduction!r}")


# ---------------------------------------------------------------------------- full loss
def rnnt_loss(logits: torch.Tensor, targets: torch.Tensor, frames: torch.Tensor, target_lengths: torch.Tensor,
              blank: int = 0, reduction: str = "sum") -> torch.Tensor:
    """RNN-T negative log-likelihood.

    logits (B, T, U+1, V): joiner outputs for every frame t and prediction-network step u;
    targets (B, U) token ids, padded with anything past target_lengths; frames (B,) valid frames.
    reduction "sum" | "mean" (over utterances) | "none" (B,)."""
    if logits.dim() != 4:
        raise ValueError(f"logits must be (B, T, U+1, V), got shape {tuple(logits.shape)}")
    B, T, W, V = logits.shape
    if targets.shape != (B, W - 1):
        raise ValueError(f"targets must be (B, U) = {(B, W - 1)} for logits {tuple(logits.shape)}, "
                         f"got {tuple(targets.shape)}")
    _check_lengths(T, W - 1, frames, target_lengths)
    tokens = next_tokens(targets, target_lengths, V, blank)
    with _full_precision(logits):
        blank_lp, emit_lp = arc_log_probs(logits, tokens.unsqueeze(1), blank)
    return _reduce(lattice_nll(blank_lp, emit_lp[..., :-1], frames, target_lengths), reduction)


# ---------------------------------------------------------------------------- pruned loss
def simple_lattice(am: torch.Tensor, lm: torch.Tensor, targets: torch.Tensor, target_lengths: torch.Tensor,
                   blank: int = 0) -> Tuple[torch.Tensor, torch.Tensor]:
    """Arc log-probs of the trivial joiner logits(t, u) = am[t] + lm[u]: blank (B, T, U+1) and
    emit (B, T, U), from am (B, T, V) and lm (B, U+1, V) without forming (B, T, U+1, V)."""
    with _full_precision(am):
        return _simple_lattice(am, lm, targets, target_lengths, blank)


def _simple_lattice(am, lm, targets, target_lengths, blank):
    dtype = compute_dtype(am.dtype)
    am, lm = am.to(dtype), lm.to(dtype)
    B, T, V = am.shape
    tokens = next_tokens(targets, target_lengths, V, blank)
    # log Σ_v exp(am[t, v] + lm[u, v]), shifted by the row maxima (constants: exact for any shift)
    am_max, lm_max = am.detach().amax(-1, keepdim=True), lm.detach().amax(-1, keepdim=True)
    products = torch.matmul((am - am_max).exp(), (lm - lm_max).exp().transpose(1, 2))
    normaliser = products.clamp_min(torch.finfo(dtype).tiny).log() + am_max + lm_max.transpose(1, 2)
    blank_lp = am[..., blank:blank + 1] + lm[..., blank].unsqueeze(1) - normaliser
    emit_lp = (am.gather(2, tokens.unsqueeze(1).expand(B, T, -1))
               + lm.gather(2, tokens.unsqueeze(2)).transpose(1, 2) - normaliser)
    return blank_lp, emit_lp[..., :-1]


def prune_ranges(posteriors: torch.Tensor, frames: torch.Tensor, target_lengths: torch.Tensor,
                 s_range: int) -> torch.Tensor:
    """Window starts s_t (B, T): frame t keeps nodes u ∈ [s_t, s_t + s_range).

    Each frame takes the window holding the most node posterior mass, with the start kept within
    [0, U_b + 1 − s_range] so the window stays on the lattice. The starts are then adjusted so that
    an alignment can run through the windows: s_0 = 0 (start node), s_{T_b−1} = U_b + 1 − s_range
    (or 0; end node), and 0 ≤ s_{t+1} − s_t ≤ s_range − 1 (blank arcs land in the next window).
    Feasible when U_b ≤ T_b·(s_range − 1)."""
    B, T, W = posteriors.shape
    S, step = s_range, s_range - 1
    top = (target_lengths + 1 - S).clamp(min=0).unsqueeze(1)             # (B, 1) highest start
    cumulative = F.pad(posteriors.cumsum(-1), (1, 0))
    mass = cumulative[..., S:] - cumulative[..., :-S]                   # (B, T, W−S+1) by start
    starts = torch.arange(W - S + 1, device=posteriors.device)
    best = mass.masked_fill(starts > top.unsqueeze(2), -1.0).argmax(-1)
    t = torch.arange(T, device=posteriors.device)
    # the band of starts from which both ends of the lattice are still reachable
    low = (top - (frames.unsqueeze(1) - 1 - t) * step).clamp(min=0)
    high = torch.minimum(top, t * step)
    s = torch.maximum(torch.minimum(best, high), low)
    s = torch.where(t >= frames.unsqueeze(1), top, s)
    s = torch.cummax(s, dim=1).values                                   # non-decreasing
    # s_t ≥ s_t' − (t' − t)·step for every later t': raise s_t where a later window is out of reach
    slack = s - t * step
    return t * step + torch.flip(torch.cummax(torch.flip(slack, [1]), dim=1).values, [1])


def window_indices(starts: torch.Tensor, s_range: int) -> torch.Tensor:
    """(B, T) starts → (B, T, s_range) lattice columns u of every frame's window."""
    return starts.unsqueeze(-1) + torch.arange(s_range, device=starts.device)


def gather_windows(x: torch.Tensor, starts: torch.Tensor, s_range: int) -> torch.Tensor:
    """(B, U+1, D) per-u vectors (prediction network side) → (B, T, s_range, D) for the windows."""
    B, T = starts.shape
    index = window_indices(starts, s_range).reshape(B, -1, 1).expand(-1, -1, x.shape[-1])
    return x.gather(1, index).view(B, T, s_range, x.shape[-1])


def pruned_feasible(frames: torch.Tensor, target_lengths: torch.Tensor, s_range: int) -> torch.Tensor:
    """(B,) bool: whether windows of s_range nodes per frame can hold an alignment of the targets."""
    return target_lengths <= frames * (s_range - 1)


def pruned_rnnt_loss(logits: torch.Tensor, starts: torch.Tensor, targets: torch.Tensor, frames: torch.Tensor,
                     target_lengths: torch.Tensor, blank: int = 0, reduction: str = "sum") -> torch.Tensor:
    """RNN-T loss over the windows only. logits (B, T, S, V) are the joiner's outputs for nodes
    (t, starts[b, t] + k), k < S; arcs outside the windows count as log 0. Utterances that no
    window path can hold (see pruned_feasible) get loss 0."""
    if logits.dim() != 4 or starts.shape != logits.shape[:2]:
        raise ValueError(f"logits must be (B, T, S, V) and starts (B, T), got {tuple(logits.shape)} "
                         f"and {tuple(starts.shape)}")
    B, T, S, V = logits.shape
    W = targets.shape[1] + 1
    _check_lengths(T, W - 1, frames, target_lengths)
    if S > W or int(starts.min()) < 0 or int(starts.max()) > W - S:
        raise ValueError(f"windows of {S} nodes starting at {int(starts.min())}..{int(starts.max())} leave "
                         f"the lattice's {W} columns")
    columns = window_indices(starts, S)
    tokens = next_tokens(targets, target_lengths, V, blank).gather(1, columns.view(B, -1)).view(B, T, S)
    with _full_precision(logits):
        blank_w, emit_w = arc_log_probs(logits, tokens, blank)
        blank_lp = blank_w.new_full((B, T, W), LOG_ZERO).scatter(2, columns, blank_w)
        emit_lp = emit_w.new_full((B, T, W), LOG_ZERO).scatter(2, columns, emit_w)
    losses = lattice_nll(blank_lp, emit_lp[..., :-1], frames, target_lengths)
    feasible = pruned_feasible(frames, target_lengths, S)
    return _reduce(torch.where(feasible, losses, losses.new_zeros(())), reduction)
