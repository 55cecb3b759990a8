"""RNN-T loss (full and pruned) and the transducer head: loss values against an enumeration of
every alignment, gradients against finite differences and autograd, the pruning identity,
decoding of hand-wired models, shallow fusion, and the recipe at smoke size."""

import itertools
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from recipe_smoke import SMOKE, recipe_with_data, run_recipe
from sslasr.losses.rnnt import (gather_windows, lattice_nll, lattice_nll_autograd, next_tokens,
                                node_posteriors, prune_ranges, pruned_rnnt_loss, rnnt_loss, simple_lattice)
from sslasr.models.asr import build_asr_model
from sslasr.models.heads import build_head
from sslasr.models.heads.transducer import TransducerHead
from sslasr.models.heads.transducer_search import greedy_search, modified_beam_search
from sslasr.models.interfaces import DecodeOptions
from sslasr.utils.config import load_configs

torch.set_num_threads(1)


# ---------------------------------------------------------------------------- references
def alignments(num_frames: int, num_tokens: int):
    """Every alignment as the list of its arcs: ("blank", t, u) or ("emit", t, u). The last arc is
    the blank that leaves frame T−1 after all tokens."""
    for emit_steps in itertools.combinations(range(num_frames - 1 + num_tokens), num_tokens):
        t = u = 0
        arcs = []
        for step in range(num_frames - 1 + num_tokens):
            if step in emit_steps:
                arcs.append(("emit", t, u))
                u += 1
            else:
                arcs.append(("blank", t, u))
                t += 1
        arcs.append(("blank", num_frames - 1, num_tokens))
        yield arcs


def alignment_log_probs(log_probs: torch.Tensor, tokens) -> torch.Tensor:
    """log p of every alignment, from (T, U+1, V) log-probabilities, in float64."""
    T = log_probs.shape[0]
    scores = [sum(log_probs[t, u, 0 if kind == "blank" else tokens[u]].double() for kind, t, u in arcs)
              for arcs in alignments(T, len(tokens))]
    return torch.stack(scores)


def brute_force_nll(log_probs: torch.Tensor, tokens) -> float:
    return -float(torch.logsumexp(alignment_log_probs(log_probs.detach(), tokens), 0))


def random_batch(B, T, U, V, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, T, U + 1, V, generator=gen, dtype=dtype) * 2
    targets = torch.randint(1, V, (B, U), generator=gen)
    return logits, targets


# ---------------------------------------------------------------------------- full loss
@pytest.mark.parametrize("T,U,V", [(1, 0, 2), (1, 3, 4), (3, 1, 2), (4, 3, 5), (6, 2, 7), (2, 5, 3)])
def test_loss_equals_sum_over_all_alignments(T, U, V):
    logits, targets = random_batch(1, T, U, V, seed=T * 100 + U)
    expected = brute_force_nll(logits[0].log_softmax(-1), targets[0].tolist())
    for dtype, tolerance in [(torch.float64, 1e-10), (torch.float32, 1e-5)]:
        loss = rnnt_loss(logits.to(dtype), targets, torch.tensor([T]), torch.tensor([U]))
        assert loss.dtype == dtype
        assert abs(loss.item() - expected) < tolerance * max(1.0, abs(expected)), (dtype, loss.item(), expected)


def test_batch_with_different_lengths_ignores_padding():
    B, T, U, V = 4, 5, 3, 6
    logits, targets = random_batch(B, T, U, V)
    frames, lengths = torch.tensor([5, 2, 4, 1]), torch.tensor([3, 1, 0, 2])
    # garbage in the padding: huge logits past each utterance's frames, out-of-range padded tokens
    for b in range(B):
        logits[b, frames[b]:] = 1e4
        targets[b, lengths[b]:] = 99
    per_utt = rnnt_loss(logits, targets, frames, lengths, reduction="none")
    expected = [brute_force_nll(logits[b, :frames[b], :lengths[b] + 1].log_softmax(-1), targets[b, :lengths[b]].tolist())
                for b in range(B)]
    assert per_utt.tolist() == pytest.approx(expected, abs=1e-10)
    assert rnnt_loss(logits, targets, frames, lengths).item() == pytest.approx(sum(expected), abs=1e-9)
    assert rnnt_loss(logits, targets, frames, lengths, reduction="mean").item() == pytest.approx(sum(expected) / B)


def test_gradcheck_and_zero_gradient_in_padding():
    B, T, U, V = 2, 4, 2, 4
    logits, targets = random_batch(B, T, U, V)
    frames, lengths = torch.tensor([4, 3]), torch.tensor([2, 1])
    logits.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: rnnt_loss(x, targets, frames, lengths), (logits,))
    rnnt_loss(logits, targets, frames, lengths).backward()
    assert logits.grad[1, 3:].abs().max() == 0 and logits.grad[1, :, 2:].abs().max() == 0
    # each cell's gradient is softmax·(occupancy) minus one-hots: it sums to 0 over the vocabulary
    assert logits.grad.sum(-1).abs().max() < 1e-12


def test_beta_gradient_equals_autograd_through_alpha():
    B, T, U, V = 3, 7, 4, 5
    logits, targets = random_batch(B, T, U, V)
    frames, lengths = torch.tensor([7, 5, 2]), torch.tensor([4, 2, 3])
    log_probs = logits.log_softmax(-1)
    tokens = next_tokens(targets, lengths, V, 0)
    blank = log_probs[..., 0]
    emit = log_probs.gather(-1, tokens[:, None, :, None].expand(B, T, U + 1, 1))[..., 0][..., :U]
    weights = torch.tensor([1.0, -0.5, 2.0], dtype=torch.float64)  # distinct upstream gradients
    grads = []
    for nll in (lattice_nll, lattice_nll_autograd):
        b, e = blank.clone().requires_grad_(True), emit.clone().requires_grad_(True)
        loss = nll(b, e, frames, lengths)
        grads.append((loss.detach(), *torch.autograd.grad((loss * weights).sum(), (b, e))))
    for ours, reference in zip(*grads):
        torch.testing.assert_close(ours, reference, rtol=0, atol=1e-12)


def test_low_precision_logits_accumulate_in_float32():
    logits, targets = random_batch(2, 6, 3, 9, dtype=torch.float32)
    frames, lengths = torch.tensor([6, 4]), torch.tensor([3, 2])
    half = logits.to(torch.bfloat16).requires_grad_(True)
    loss = rnnt_loss(half, targets, frames, lengths)
    assert loss.dtype == torch.float32
    reference = rnnt_loss(half.detach().float().requires_grad_(True), targets, frames, lengths)
    assert abs(loss.item() - reference.item()) < 1e-5
    loss.backward()
    assert half.grad.dtype == torch.bfloat16 and torch.isfinite(half.grad.float()).all()
    # under autocast the simple loss's normaliser (a matrix product) still runs in float32
    am, lm = torch.randn(2, 6, 9) * 4, torch.randn(2, 4, 9) * 4
    exact = lattice_nll(*simple_lattice(am, lm, targets, lengths), frames, lengths)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = lattice_nll(*simple_lattice(am, lm, targets, lengths), frames, lengths)
    assert mixed.dtype == torch.float32
    torch.testing.assert_close(mixed, exact, rtol=1e-6, atol=1e-5)


def test_bad_input_is_named():
    logits, targets = random_batch(1, 3, 2, 4)
    with pytest.raises(ValueError, match="frame lengths"):
        rnnt_loss(logits, targets, torch.tensor([4]), torch.tensor([2]))
    with pytest.raises(ValueError, match="frame lengths"):
        rnnt_loss(logits, targets, torch.tensor([0]), torch.tensor([2]))
    with pytest.raises(ValueError, match="token ids"):
        rnnt_loss(logits, torch.tensor([[1, 4]]), torch.tensor([3]), torch.tensor([2]))
    with pytest.raises(ValueError, match="blank"):
        rnnt_loss(logits, torch.tensor([[1, 0]]), torch.tensor([3]), torch.tensor([2]))
    with pytest.raises(ValueError, match="targets must be"):
        rnnt_loss(logits, targets[:, :1], torch.tensor([3]), torch.tensor([1]))


# ---------------------------------------------------------------------------- pruned loss
def additive_joiner_inputs(B, T, U, V, J=6, seed=0):
    gen = torch.Generator().manual_seed(seed)
    encoder = torch.randn(B, T, J, generator=gen, dtype=torch.float64)
    predictor = torch.randn(B, U + 1, J, generator=gen, dtype=torch.float64)
    output = torch.randn(V, J, generator=gen, dtype=torch.float64)
    targets = torch.randint(1, V, (B, U), generator=gen)
    return encoder, predictor, output, targets


def test_simple_lattice_equals_full_loss_of_the_additive_joiner():
    B, T, U, V = 2, 5, 3, 7
    gen = torch.Generator().manual_seed(3)
    am = (torch.randn(B, T, V, generator=gen, dtype=torch.float64) * 3).requires_grad_(True)
    lm = (torch.randn(B, U + 1, V, generator=gen, dtype=torch.float64) * 3).requires_grad_(True)
    targets = torch.randint(1, V, (B, U), generator=gen)
    frames, lengths = torch.tensor([5, 3]), torch.tensor([3, 2])
    simple = lattice_nll(*simple_lattice(am, lm, targets, lengths), frames, lengths)
    full = rnnt_loss(am.unsqueeze(2) + lm.unsqueeze(1), targets, frames, lengths, reduction="none")
    torch.testing.assert_close(simple, full)
    grads_simple = torch.autograd.grad(simple.sum(), (am, lm))
    grads_full = torch.autograd.grad(full.sum(), (am, lm))
    for a, b in zip(grads_simple, grads_full):
        torch.testing.assert_close(a, b)


def test_prune_ranges_leave_a_path_through_the_windows():
    gen = torch.Generator().manual_seed(5)
    for trial in range(30):
        B, T, U, S = 3, int(torch.randint(1, 9, (1,), generator=gen)), int(torch.randint(0, 12, (1,), generator=gen)), 3
        frames = torch.randint(1, T + 1, (B,), generator=gen)
        lengths = torch.minimum(torch.randint(0, U + 1, (B,), generator=gen), frames * (S - 1))
        posteriors = torch.rand(B, T, U + 1, generator=gen) ** 4
        s_range = min(S, U + 1)
        starts = prune_ranges(posteriors, frames, lengths, s_range)
        for b in range(B):
            s, top = starts[b, :frames[b]], max(int(lengths[b]) + 1 - s_range, 0)
            assert int(s[0]) == 0 and int(s[-1]) == top, (trial, s.tolist(), top)
            steps = (s[1:] - s[:-1]).tolist()
            assert all(0 <= step <= s_range - 1 for step in steps), (trial, s.tolist())


def test_prune_ranges_follow_a_confident_alignment():
    """Posterior mass on one diagonal-ish path: each frame's window is centred on it when allowed."""
    T, U, S = 6, 8, 3
    path = [0, 1, 3, 4, 6, 8]  # u at frame t
    posteriors = torch.zeros(1, T, U + 1)
    for t, u in enumerate(path):
        posteriors[0, t, u] = 1.0
    starts = prune_ranges(posteriors, torch.tensor([T]), torch.tensor([U]), S)[0]
    assert all(s <= u < s + S for s, u in zip(starts.tolist(), path)), starts.tolist()


def _pruned_and_full(encoder, predictor, output, targets, frames, lengths, s_range):
    """Full and pruned loss of one joiner z = output·tanh(encoder + predictor), windows from the
    simple loss of am = encoder·outputᵀ, lm = predictor·outputᵀ (any trivial joiner will do)."""
    logits_full = torch.tanh(encoder.unsqueeze(2) + predictor.unsqueeze(1)) @ output.T
    full = rnnt_loss(logits_full, targets, frames, lengths, reduction="none")
    blank, emit = simple_lattice(encoder @ output.T, predictor @ output.T, targets, lengths)
    starts = prune_ranges(node_posteriors(blank, emit, frames, lengths), frames, lengths, s_range)
    logits = torch.tanh(encoder.unsqueeze(2) + gather_windows(predictor, starts, s_range)) @ output.T
    return full, pruned_rnnt_loss(logits, starts, targets, frames, lengths, reduction="none"), starts, logits_full


def test_pruned_loss_equals_full_loss_when_windows_cover_the_lattice():
    B, T, U, V = 3, 6, 4, 7
    encoder, predictor, output, targets = additive_joiner_inputs(B, T, U, V)
    frames, lengths = torch.tensor([6, 4, 3]), torch.tensor([4, 2, 4])
    encoder.requires_grad_(True)
    predictor.requires_grad_(True)
    full, pruned, starts, _ = _pruned_and_full(encoder, predictor, output, targets, frames, lengths, U + 1)
    assert starts.abs().max() == 0
    torch.testing.assert_close(pruned, full, rtol=0, atol=1e-12)
    for a, b in zip(torch.autograd.grad(pruned.sum(), (encoder, predictor), retain_graph=True),
                    torch.autograd.grad(full.sum(), (encoder, predictor))):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_pruned_loss_is_full_loss_minus_log_mass_inside_the_windows():
    """What holds for narrow windows: pruned = full − log P(alignment ⊂ windows | x, y) ≥ full,
    checked by enumerating every alignment (and gradients by finite differences)."""
    B, T, U, V, S = 2, 5, 4, 6, 2
    encoder, predictor, output, targets = additive_joiner_inputs(B, T, U, V, seed=7)
    frames, lengths = torch.tensor([5, 4]), torch.tensor([4, 3])
    full, pruned, starts, logits_full = _pruned_and_full(encoder, predictor, output, targets, frames, lengths, S)
    for b in range(B):
        T_b, U_b = int(frames[b]), int(lengths[b])
        tokens = targets[b, :U_b].tolist()
        scores = alignment_log_probs(logits_full[b, :T_b, :U_b + 1].log_softmax(-1), tokens)
        inside = torch.tensor([all(int(starts[b, t]) <= u < int(starts[b, t]) + S for _, t, u in arcs)
                               for arcs in alignments(T_b, U_b)])
        assert 0 < int(inside.sum()) < len(inside)  # the windows cut some alignments, keep others
        log_mass = torch.logsumexp(scores[inside], 0) - torch.logsumexp(scores, 0)
        assert pruned[b].item() == pytest.approx(full[b].item() - log_mass.item(), abs=1e-10)
        assert pruned[b] > full[b]
    # gradient of the pruned loss w.r.t. the window logits
    window_logits = (torch.tanh(encoder.unsqueeze(2) + gather_windows(predictor, starts, S)) @ output.T)
    assert torch.autograd.gradcheck(
        lambda x: pruned_rnnt_loss(x, starts, targets, frames, lengths), (window_logits.requires_grad_(True),))


def test_pruned_loss_without_a_window_path_is_zero():
    logits = torch.randn(2, 2, 2, 5, dtype=torch.float64, requires_grad=True)
    starts = torch.tensor([[0, 2], [0, 1]])  # S = 2 over 4 columns: first utterance cannot reach u = 3 … 
    targets = torch.tensor([[2, 3, 4], [2, 3, 0]])
    frames, lengths = torch.tensor([1, 2]), torch.tensor([3, 2])  # 3 tokens > 1 frame × (2 − 1)
    losses = pruned_rnnt_loss(logits, starts, targets, frames, lengths, reduction="none")
    assert losses[0] == 0 and 0 < losses[1] < 1e3
    losses.sum().backward()
    assert torch.isfinite(logits.grad).all() and logits.grad[0].abs().max() == 0


# ---------------------------------------------------------------------------- the head
def tiny_head(predictor="stateless", variant="full", vocab=8, encoder_dim=6, seed=0, **extra):
    torch.manual_seed(seed)
    cfg = {"name": "transducer", "joiner_dim": 10, "loss": {"variant": variant, "prune_range": 3},
           "predictor": {"type": predictor, "embed_dim": 8, "context_size": 2, "hidden_dim": 9}, **extra}
    return build_head(encoder_dim, vocab, cfg).double().eval()


@pytest.mark.parametrize("kind,context", [("stateless", 1), ("stateless", 2), ("stateless", 3), ("lstm", 1)])
def test_predictor_steps_equal_the_teacher_forced_pass(kind, context):
    torch.manual_seed(1)
    head = build_head(6, 8, {"name": "transducer", "predictor": {"type": kind, "embed_dim": 8,
                                                                 "context_size": context, "hidden_dim": 5}})
    tokens = torch.tensor([[0, 3, 5, 2, 7], [0, 4, 4, 6, 2]])
    full = head.predictor(tokens)
    state = head.predictor.initial_state(2)
    for u in range(tokens.shape[1]):
        out, state = head.predictor.step(tokens[:, u], state)
        torch.testing.assert_close(out, full[:, u])


def test_head_pruned_loss_covers_the_full_loss():
    """prune_range ≥ U+1 and no simple loss: the pruned head loss is the full head loss."""
    full_head = tiny_head(variant="full")
    pruned_head = tiny_head(variant="pruned", loss={"variant": "pruned", "prune_range": 10, "simple_loss_scale": 0.0})
    pruned_head.load_state_dict(full_head.state_dict(), strict=False)
    hidden = torch.randn(3, 7, 6, dtype=torch.float64)
    lengths, tokens = torch.tensor([7, 5, 2]), [[2, 3, 4], [5], [7, 6, 5, 4]]
    torch.testing.assert_close(pruned_head.loss(hidden, lengths, tokens), full_head.loss(hidden, lengths, tokens))
    expected = sum(brute_force_nll(
        full_head.joiner(full_head.joiner.encoder_proj(hidden[b, :lengths[b]]).unsqueeze(1),
                         full_head.joiner.predictor_proj(full_head.predictor(torch.tensor([[0] + tokens[b]])))[0]
                         .unsqueeze(0)).log_softmax(-1), tokens[b]) for b in range(3))
    assert full_head.loss(hidden, lengths, tokens).item() == pytest.approx(expected, abs=1e-9)
    # The recipe's objective: prune_range 3 < U + 1 = 5, simple_loss_scale 0.5. Its simple term is
    # the full loss of the additive joiner am(h_t) + lm(g_u); its pruned term sums fewer paths, so
    # it is at least the full loss with the same joiner.
    with_simple = tiny_head(variant="pruned")
    with_simple.load_state_dict(full_head.state_dict(), strict=False)
    pruned_only = tiny_head(variant="pruned", loss={"variant": "pruned", "prune_range": 3, "simple_loss_scale": 0.0})
    pruned_only.load_state_dict(with_simple.state_dict())
    targets, target_lengths = with_simple._targets(tokens, hidden.device)
    predicted = with_simple.predictor(torch.nn.functional.pad(targets, (1, 0)))
    additive = with_simple.simple_am_proj(hidden).unsqueeze(2) + with_simple.simple_lm_proj(predicted).unsqueeze(1)
    simple = rnnt_loss(additive, targets, lengths, target_lengths, reduction="sum")
    pruned = pruned_only.loss(hidden, lengths, tokens)
    full = full_head.loss(hidden, lengths, tokens)
    assert with_simple.loss(hidden, lengths, tokens).item() == pytest.approx(0.5 * simple.item() + pruned.item(), abs=1e-9)
    assert full.item() < pruned.item() < full.item() + 5


def test_config_errors_are_named():
    with pytest.raises(ValueError, match="predictor.type"):
        tiny_head(predictor="gru")
    with pytest.raises(ValueError, match="loss.variant"):
        tiny_head(variant="chunked")
    with pytest.raises(ValueError, match="unknown head.loss options"):
        tiny_head(loss={"variant": "pruned", "range": 3})
    with pytest.raises(ValueError, match="cannot decode"):
        tiny_head().decode(torch.zeros(1, 2, 6, dtype=torch.float64), torch.tensor([2]), "ctc_greedy")


# ---------------------------------------------------------------------------- decoding
V_RIG, A, M, C = 8, 20.0, 10.0, 5.0  # vocabulary, projection gain, token logit, blank logit


def rigged_head(predictor: str) -> TransducerHead:
    """A head whose joiner emits token k at a frame whose encoder vector is onehot(k), unless k was
    the last token emitted; blank otherwise. The encoder and prediction sides meet in tanh:
    A·onehot(k) − A·onehot(last) saturates to +1 at k only when k ≠ last."""
    V = V_RIG
    head = build_head(V, V, {"name": "transducer", "joiner_dim": V, "max_symbols_per_frame": 3,
                             "predictor": {"type": predictor, "embed_dim": V, "context_size": 1, "hidden_dim": V}})
    eye = torch.eye(V)
    eye[0, 0] = 0.0  # blank: no direction of its own
    with torch.no_grad():
        for p in head.parameters():
            p.zero_()
        head.predictor.embedding.weight.copy_(eye)
        gain = 1.0
        if predictor == "lstm":  # input gate open, forget gate shut, cell = tanh(G·x), output gate open
            lstm, G, H = head.predictor.lstm, 30.0, V
            lstm.weight_ih_l0[2 * H:3 * H].copy_(G * eye)
            lstm.bias_ih_l0[:H] = G
            lstm.bias_ih_l0[H:2 * H] = -G
            lstm.bias_ih_l0[3 * H:] = G
            gain = math.tanh(1.0)  # h = σ(G)·tanh(c), c ≈ onehot
        head.joiner.encoder_proj.weight.copy_(A * eye)
        head.joiner.predictor_proj.weight.copy_(-A / gain * eye)
        head.joiner.output.weight.copy_(M * eye)
        head.joiner.output.bias[0] = C
    return head.eval()


def frames_of(schedule, length=None):
    """Encoder vectors: onehot(k) for a scheduled token k, 0 for a blank frame (k = 0)."""
    hidden = torch.zeros(len(schedule), V_RIG)
    for t, k in enumerate(schedule):
        if k:
            hidden[t, k] = 1.0
    return hidden


SCHEDULES = [([2, 0, 3, 3, 0, 4, 5, 0], [2, 3, 4, 5]),   # a repeated frame token is emitted once
             ([5, 0, 0, 2, 2, 3, 4, 5], [5, 2])]          # frames past the length (5) are ignored
RIG_LENGTHS = torch.tensor([8, 5])


@pytest.mark.parametrize("predictor", ["stateless", "lstm"])
def test_greedy_and_beam_decode_a_rigged_joiner(predictor):
    head = rigged_head(predictor)
    hidden = torch.stack([frames_of(s) for s, _ in SCHEDULES])
    expected = [tokens for _, tokens in SCHEDULES]
    assert head.decode(hidden, RIG_LENGTHS, "transducer_greedy") == expected
    for beam in (1, 4):
        assert head.decode(hidden, RIG_LENGTHS, "transducer_beam", DecodeOptions(beam_size=beam)) == expected


def test_greedy_emits_several_tokens_per_frame_up_to_the_bound():
    """A joiner that always prefers token 3 (prediction side ignored): greedy emits
    max_symbols_per_frame tokens at every frame."""
    head = rigged_head("stateless")
    with torch.no_grad():
        head.joiner.predictor_proj.weight.zero_()
    hidden = frames_of([3, 3]).unsqueeze(0)
    assert head.decode(hidden, torch.tensor([2]), "transducer_greedy") == [[3] * 6]
    options = DecodeOptions(extra={"max_symbols_per_frame": 1})
    assert head.decode(hidden, torch.tensor([2]), "transducer_greedy", options) == [[3, 3]]


def test_beam_search_scores_at_least_greedy_on_random_models():
    """What holds, in the search's own score (log-probability of the alignments with at most one
    token per frame that it kept, merged): beam 1 is greedy with one symbol per frame, and on
    12 random models × 3 utterances beam 4 scores at least as high as beam 1 everywhere and higher
    on some. It is a heuristic, not a theorem (the greedy prefix can be pruned early); and
    in the full log p(y|x), which also sums alignments with several tokens per frame, beam 4 loses
    to greedy on about one utterance in seven for these models."""
    better = 0
    for seed in range(12):
        head = tiny_head(predictor="lstm" if seed % 2 else "stateless", variant="full", seed=seed)
        with torch.no_grad():
            head.joiner.output.weight.mul_(3.0)  # sharper distributions, so that choices matter
        hidden = torch.randn(3, 9, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
        lengths = torch.tensor([9, 7, 4])
        greedy = greedy_search(head, hidden, lengths, max_symbols=1)
        beam_1 = modified_beam_search(head, hidden, lengths, beam_size=1, return_scores=True)
        beam_4 = modified_beam_search(head, hidden, lengths, beam_size=4, return_scores=True)
        for b, length in enumerate(lengths.tolist()):
            (tokens_1, score_1), (tokens_4, score_4) = beam_1[b], beam_4[b]
            assert tokens_1 == greedy[b]
            assert score_4 >= score_1 - 1e-9, (seed, b, tokens_1, tokens_4, score_1, score_4)
            better += score_4 > score_1 + 1e-6
            # searched alone, an utterance gets the same result as in the batch
            alone_tokens, alone_score = modified_beam_search(head, hidden[b:b + 1, :length], lengths[b:b + 1], 4,
                                                             return_scores=True)[0]
            assert alone_tokens == tokens_4 and alone_score == pytest.approx(score_4, abs=1e-5)
    assert better >= 6


class BigramLM(torch.nn.Module):
    """The LM decoding interface (sslasr/models/lm.py) over a fixed bigram table: state = last token."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.table = table  # (V, V) log p(next | previous); column 0 (blank) is −inf
        self.vocab_size = table.shape[0]

    def initial_state(self, batch_size):
        return torch.full((batch_size,), -1, dtype=torch.long)

    def step(self, prev_tokens, state):
        return self.table[prev_tokens], prev_tokens

    def select_state(self, state, indices):
        return state.index_select(0, indices)

    def concat_states(self, states):
        return torch.cat(states)


def test_shallow_fusion_changes_the_choice_as_the_lm_weight_grows():
    """The first frame leans towards token 2 over token 3 (AM log-odds ≈ 0.42); the LM prefers 3
    after <sos> by log(0.9/0.05) ≈ 2.89. Fusion flips the choice once λ·2.89 > 0.42."""
    head = rigged_head("stateless")
    hidden = torch.zeros(1, 3, V_RIG)
    hidden[0, 0, 2], hidden[0, 0, 3] = 0.1, 0.08
    lengths = torch.tensor([3])
    table = torch.full((V_RIG, V_RIG), math.log(0.05 / (V_RIG - 3)))
    table[:, 0] = -math.inf
    table[1, 2], table[1, 3] = math.log(0.05), math.log(0.9)  # after <sos>
    table[2:, 1] = math.log(0.9)                               # <eos> after either token
    lm = BigramLM(table.log_softmax(-1))
    with torch.no_grad():
        am_odds = (head.joiner(head.joiner.encoder_proj(hidden[0, 0]), head.joiner.predictor_proj(torch.zeros(V_RIG)))
                   .log_softmax(-1))
    assert 0.3 < float(am_odds[2] - am_odds[3]) < 0.5

    def beam(lm_weight, length_bonus=0.0):
        return head.decode(hidden, lengths, "transducer_beam",
                           DecodeOptions(beam_size=4, lm=lm, lm_weight=lm_weight, length_bonus=length_bonus))[0]

    assert beam(0.0) == [2] and beam(0.1) == [2]
    assert beam(0.2) == [3] and beam(1.0) == [3]
    # a length bonus outweighing blank's lead (C − 0 = 5 nats per token at blank frames) adds tokens
    assert len(beam(0.0, length_bonus=8.0)) > 1
    assert beam(0.0, length_bonus=-8.0) == []


class HistoryLM(torch.nn.Module):
    """A bigram LM whose state is every token fed to it, <sos> first; it records each history it
    is stepped to, so a test sees what the search conditions the LM on."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.table = table  # (V, V) log p(next | previous)
        self.vocab_size = table.shape[0]
        self.histories = set()

    def initial_state(self, batch_size):
        return [()] * batch_size

    def step(self, prev_tokens, state):
        histories = [history + (token,) for history, token in zip(state, prev_tokens.tolist())]
        self.histories.update(histories)
        return self.table[prev_tokens], histories

    def select_state(self, state, indices):
        return [state[i] for i in indices.tolist()]

    def concat_states(self, states):
        return [history for part in states for history in part]


@pytest.mark.parametrize("predictor", ["stateless", "lstm"])
def test_shallow_fusion_conditions_the_lm_on_the_emitted_tokens_only(predictor):
    """Frames 2 ∅ 3 3 ∅ 4 5 ∅ (blank frames, a repeated frame) decode to 2 3 4 5 with the LM too.
    The LM is only ever stepped to <sos> followed by emitted tokens (never a blank, whatever the
    frames), the winner's history among them; and the fused score is λ·log p_LM(2 3 4 5 <eos>)
    under the bigram table plus an AM score between that of the best alignment alone and that of
    every alignment merged (which alignments of 2 3 4 5 a beam of 4 keeps turns on near-ties, so
    on the CPU's rounding: on an AMD EPYC the plain search kept one, the fused one more)."""
    head = rigged_head(predictor)
    hidden, lengths = frames_of(SCHEDULES[0][0]).unsqueeze(0), torch.tensor([8])
    table = torch.randn(V_RIG, V_RIG, generator=torch.Generator().manual_seed(0))
    table[:, 0] = -math.inf  # the LM never predicts blank
    lm, lm_weight = HistoryLM(table.log_softmax(-1)), 0.3
    (plain, plain_score), = modified_beam_search(head, hidden, lengths, 4, return_scores=True)
    (fused, fused_score), = modified_beam_search(head, hidden, lengths, 4, lm=lm, lm_weight=lm_weight,
                                                 return_scores=True)
    assert plain == fused == [2, 3, 4, 5]
    assert all(h[0] == 1 and 0 not in h and 1 not in h[1:] for h in lm.histories)
    assert (1, 2, 3, 4, 5) in lm.histories and len(lm.histories) > 5  # other hypotheses were scored too
    lm_log_prob = sum(float(lm.table[a, b]) for a, b in zip([1, 2, 3, 4, 5], [2, 3, 4, 5, 1]))
    # the AM's part: at least the best alignment's score (beam 1), at most every alignment's (beam 64);
    # which alignments a beam of 4 merges depends on near-ties, i.e. on the CPU's rounding
    (_, best_alignment), = modified_beam_search(head, hidden, lengths, 1, return_scores=True)
    (_, all_alignments), = modified_beam_search(head, hidden, lengths, 64, return_scores=True)
    assert best_alignment - 1e-5 <= plain_score <= all_alignments + 1e-5
    assert best_alignment - 1e-5 <= fused_score - lm_weight * lm_log_prob <= all_alignments + 1e-5
    assert all_alignments - best_alignment < 0.1 < abs(lm_weight * lm_log_prob)  # the band is narrow


def test_shallow_fusion_never_emits_sos_eos_as_a_token():
    """Frames 2 1 3 make the joiner all but certain of token 1 (<sos/eos>) at the middle frame.
    Without the LM it is an ordinary symbol there (as in the CTC search); with the LM it would
    restart the LM's context mid-sentence, so the fused search must never emit it."""
    head = rigged_head("stateless")
    hidden, lengths = frames_of([2, 1, 3]).unsqueeze(0), torch.tensor([3])
    lm = BigramLM(torch.zeros(V_RIG, V_RIG).log_softmax(-1))  # uniform: the LM prefers nothing
    assert modified_beam_search(head, hidden, lengths, 4) == [[2, 1, 3]]
    for beam_size in (1, 4):
        fused = modified_beam_search(head, hidden, lengths, beam_size, lm=lm, lm_weight=0.3)
        assert fused == [[2, 3]], beam_size


# ---------------------------------------------------------------------------- training and the recipe
def test_tiny_transducer_learns_to_transcribe_fixed_features():
    """Frame features that encode the token (with noise): 150 Adam steps of the pruned loss are
    enough for greedy and beam decoding to transcribe all utterances."""
    gen = torch.Generator().manual_seed(0)
    V, D = 7, 12
    codebook = torch.randn(V, D, generator=gen)
    transcripts = [[2, 3, 4], [5, 6, 2, 3], [4, 4, 6], [6, 5]]
    hidden_rows = []
    for tokens in transcripts:  # each token over two frames, a blank frame in between
        schedule = [0] + sum(([k, k, 0] for k in tokens), [])
        rows = torch.stack([codebook[k] if k else torch.zeros(D) for k in schedule])
        hidden_rows.append(rows)
    lengths = torch.tensor([len(r) for r in hidden_rows])
    hidden = torch.nn.utils.rnn.pad_sequence(hidden_rows, batch_first=True)
    torch.manual_seed(0)
    head = build_head(D, V, {"name": "transducer", "joiner_dim": 24, "loss": {"variant": "pruned", "prune_range": 3},
                             "predictor": {"type": "stateless", "embed_dim": 16, "context_size": 2}})
    optimizer = torch.optim.Adam(head.parameters(), lr=0.02)
    head.train()
    for _ in range(150):
        noisy = hidden + 0.1 * torch.randn(hidden.shape, generator=gen)
        loss = head.loss(noisy, lengths, transcripts) / sum(map(len, transcripts))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    head.eval()
    assert head.decode(hidden, lengths, "transducer_greedy") == transcripts
    assert head.decode(hidden, lengths, "transducer_beam", DecodeOptions(beam_size=4)) == transcripts


@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng is not installed")
def test_recipe_runs_with_the_transducer_head(tmp_path: Path, prepared_minisynth: Path):
    recipe = recipe_with_data(tmp_path, prepared_minisynth)
    opts = list(SMOKE)  # one λ, β point instead of the 3 × 3 tuning grid
    opts[opts.index("--finetune-opts") + 1] += " decode.tune.lm_weight=[0.3] decode.tune.length_bonus=[0.5]"
    result = run_recipe(recipe, *opts, "--head", "transducer", "--no-pretrain", "true", "--stage", "5", timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    system = recipe / "exp/transducer_scratch_wav2vec2_all"
    hyp = (system / "decode_test_transducer_greedy/hyp.txt").read_text().splitlines()
    assert len(hyp) == 8
    rows = [json.loads(line) for line in (recipe / "exp/results.jsonl").read_text().splitlines()]
    decoded = {(r["head"], r["decoding"], r["test_set"]) for r in rows}
    methods = ["transducer_greedy", "transducer_beam", "transducer_beam+lm"]
    assert decoded == {("transducer", m, s) for m in methods for s in ("dev", "test")}


def test_recipe_config_builds_the_transducer_model():
    """finetune_transducer.yaml: finetune_ctc.yaml's training regime, a head built as configured,
    decoding methods the head has."""
    conf = Path(__file__).resolve().parents[1] / "egs/minisynth/conf"
    cfg = load_configs([conf / "frontend_wav2vec2.yaml", conf / "finetune_transducer.yaml"])
    ours = yaml.safe_load((conf / "finetune_transducer.yaml").read_text())
    ctc = yaml.safe_load((conf / "finetune_ctc.yaml").read_text())
    for section in ("finetune", "frontend", "data", "optim", "scheduler", "trainer"):
        assert ours[section] == ctc[section], section
    head = build_asr_model(cfg, vocab_size=40).head
    assert isinstance(head, TransducerHead)
    assert head.cfg.loss.variant == ours["head"]["loss"]["variant"] == "pruned"
    assert head.cfg.predictor.context_size == ours["head"]["predictor"]["context_size"]
    assert set(ours["decode"]["methods"]) | set(ours["decode"]["lm_methods"]) <= set(head.methods)
