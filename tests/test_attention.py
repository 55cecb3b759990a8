"""Attention decoder head with joint CTC: loss, masking, label smoothing, CTC prefix scores,
greedy and joint CTC/attention beam search (against exhaustive search), LM fusion, the recipe.

Hand-checked cases: CTC prefix probabilities against sums over every CTC path; the smoothed
loss against a closed form with rigged logits; beam search against scoring every hypothesis.
"""

import itertools
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from recipe_smoke import SMOKE, recipe_with_data, run_recipe
from sslasr.decoding.attention_beam_search import joint_beam_search
from sslasr.decoding.ctc_prefix_score import CtcPrefixScorer
from sslasr.models.asr import build_asr_model
from sslasr.models.heads import build_head
from sslasr.models.heads.attention import AttentionHead
from sslasr.models.interfaces import DecodeOptions
from sslasr.models.lm import LstmLM, LstmLmConfig
from sslasr.utils.config import load_configs

ROOT = Path(__file__).resolve().parents[1]
BLANK, EOS = 0, 1
NO_END_DETECTION = {"end_detect_window": 0}  # for exhaustive comparisons: only the exact stop

torch.set_num_threads(1)


def tiny_head(vocab: int = 8, encoder_dim: int = 16, seed: int = 0, **overrides) -> AttentionHead:
    torch.manual_seed(seed)
    cfg = dict(embedding_dim=8, decoder_dim=16, decoder_layers=2, attention="location", attention_dim=12,
               location_channels=3, location_kernel=5, dropout=0.0, ctc_weight=0.3, label_smoothing=0.0)
    cfg.update(overrides)
    return AttentionHead(encoder_dim, vocab, **cfg).eval()


def ctc_distribution(batch: int, frames: int, vocab: int, seed: int) -> torch.Tensor:
    """Random (B, T, V) CTC log-posteriors that never emit <eos> (id 1), so the CTC labels are
    exactly the tokens a prefix can be extended by."""
    generator = torch.Generator().manual_seed(seed)
    logits = 2 * torch.randn(batch, frames, vocab, generator=generator)
    logits[..., EOS] = float("-inf")
    return logits.log_softmax(-1)


def collapse(path):
    out, previous = [], None
    for label in path:
        if label != previous and label != BLANK:
            out.append(label)
        previous = label
    return out


def brute_force(log_probs: torch.Tensor, prefix, exact: bool) -> float:
    """Σ over every CTC path of (T, V) log_probs whose output starts with (or is) `prefix`."""
    labels = [v for v in range(log_probs.shape[1]) if v != EOS]
    total = 0.0
    for path in itertools.product(labels, repeat=log_probs.shape[0]):
        output = collapse(path)
        if (output == list(prefix)) if exact else (output[:len(prefix)] == list(prefix)):
            total += math.exp(sum(float(log_probs[t, label]) for t, label in enumerate(path)))
    return total


def extend_by(scorer: CtcPrefixScorer, state, token: int):
    batch = state.score.shape[0]
    extensions = scorer.extend(state, torch.full((batch, 1), token))
    return extensions.select(torch.arange(batch), torch.zeros(batch, dtype=torch.long))


# ---------------------------------------------------------------------- CTC prefix scores
def assert_log_probability(score, expected, what):
    """Compared in log space, so tiny probabilities are checked as tightly as large ones and an
    impossible prefix (no path) must score −inf."""
    if expected == 0:
        assert score == -math.inf, (what, score)
    else:
        assert score == pytest.approx(math.log(expected), abs=1e-6), what


def test_ctc_prefix_scores_equal_sums_over_paths():
    """Two utterances of 4 and 3 frames in one padded batch; every prefix up to 3 labels."""
    log_probs = ctc_distribution(2, 4, 5, seed=0)
    lengths = torch.tensor([4, 3])
    scorer = CtcPrefixScorer(log_probs, lengths)
    candidates = torch.tensor([[EOS, 2, 3, 4]] * 2)
    for prefix in [(), (2,), (3,), (2, 2), (2, 3), (4, 2, 4), (3, 3, 3)]:
        state = scorer.initial_state(torch.arange(2))
        for token in prefix:
            state = extend_by(scorer, state, token)
        extensions = scorer.extend(state, candidates)
        for b, frames in enumerate(lengths.tolist()):
            utterance = log_probs[b, :frames]
            assert_log_probability(float(state.score[b]), brute_force(utterance, prefix, False), prefix)
            for k, token in enumerate(candidates[b].tolist()):
                expected = (brute_force(utterance, prefix, exact=True) if token == EOS
                            else brute_force(utterance, prefix + (token,), exact=False))
                assert_log_probability(float(extensions.scores[b, k]), expected, (prefix, token))
            # ψ(g) = p(exactly g) + Σ_c ψ(g·c): the extensions partition the prefix's paths
            assert float(extensions.scores[b].logsumexp(0)) == pytest.approx(float(state.score[b]), abs=1e-5)


def test_ctc_prefix_full_sequence_matches_ctc_loss():
    log_probs = ctc_distribution(1, 12, 6, seed=3)
    scorer = CtcPrefixScorer(log_probs, torch.tensor([12]))
    state = scorer.initial_state(torch.zeros(1, dtype=torch.long))
    labels = [2, 5, 5, 3, 4]
    for token in labels:
        state = extend_by(scorer, state, token)
    full = scorer.extend(state, torch.tensor([[EOS]])).scores[0, 0]
    loss = F.ctc_loss(log_probs.transpose(0, 1), torch.tensor([labels]), torch.tensor([12]), torch.tensor([5]),
                      blank=BLANK, reduction="sum")
    assert float(full) == pytest.approx(-float(loss), abs=1e-4)
    # an impossible prefix (more labels than frames once repeats need blanks) scores −inf
    short = CtcPrefixScorer(log_probs[:, :2], torch.tensor([2]))
    state = extend_by(short, extend_by(short, short.initial_state(torch.zeros(1, dtype=torch.long)), 2), 2)
    assert float(state.score[0]) == float("-inf")


def test_ctc_prefix_scorer_rejects_blank_and_bad_lengths():
    log_probs = ctc_distribution(1, 4, 5, seed=0)
    scorer = CtcPrefixScorer(log_probs, torch.tensor([4]))
    with pytest.raises(ValueError, match="blank"):
        scorer.extend(scorer.initial_state(torch.zeros(1, dtype=torch.long)), torch.tensor([[BLANK]]))
    with pytest.raises(ValueError, match="lengths"):
        CtcPrefixScorer(log_probs, torch.tensor([5]))


# ---------------------------------------------------------------------- training loss
@pytest.mark.parametrize("attention", ["location", "additive"])
def test_padded_frames_are_never_attended(attention):
    head = tiny_head(attention=attention, ctc_weight=0.3)
    hidden = torch.randn(2, 9, 16)
    lengths = torch.tensor([9, 5])
    tokens = [[2, 3, 4], [5, 6]]
    changed = hidden.clone()
    changed[1, 5:] = 100 * torch.randn(4, 16)
    assert torch.equal(head.loss(hidden, lengths, tokens), head.loss(changed, lengths, tokens))

    memory = head.prepare(hidden, lengths)
    state = head.initial_state(memory)
    for token in [EOS, 2, 3]:
        _, state = head.step(memory, torch.full((2,), token), state)
        assert torch.allclose(state.alignment.sum(-1), torch.ones(2))
        assert torch.all(state.alignment[1, 5:] == 0)


def test_loss_is_joint_and_summed_over_the_batch():
    head = tiny_head(ctc_weight=0.3, label_smoothing=0.1)
    hidden = torch.randn(2, 9, 16)
    lengths = torch.tensor([9, 6])
    tokens = [[2, 3, 4], [5]]
    loss = head.loss(hidden, lengths, tokens)
    assert loss.shape == () and loss.requires_grad
    ctc = F.ctc_loss(head.ctc.log_probs(hidden).transpose(0, 1), torch.tensor([2, 3, 4, 5]), lengths,
                     torch.tensor([3, 1]), blank=BLANK, reduction="sum")
    attention = head.attention_loss(hidden, lengths, tokens).item()
    assert loss.item() == pytest.approx(0.7 * attention + 0.3 * ctc.item(), rel=1e-5)
    one_by_one = sum(head.loss(hidden[b:b + 1, :int(lengths[b])], lengths[b:b + 1], [tokens[b]]).item()
                     for b in range(2))
    assert loss.item() == pytest.approx(one_by_one, rel=1e-5)
    loss.backward()
    assert head.output.weight.grad.abs().sum() > 0 and head.ctc.proj.weight.grad.abs().sum() > 0


def test_label_smoothing_matches_hand_computation():
    """Rigged output layer: p = (.1, .2, .3, .4) at every step, whatever the decoder state."""
    head = tiny_head(vocab=4, ctc_weight=0.0, label_smoothing=0.1)
    assert head.ctc is None
    with torch.no_grad():
        head.output.weight.zero_()
        head.output.bias.copy_(torch.log(torch.tensor([0.1, 0.2, 0.3, 0.4])))
    hidden, lengths = torch.randn(1, 5, 16), torch.tensor([5])
    targets_nll = -math.log(0.3) - math.log(0.4) - math.log(0.2)  # y = (2, 3), then <eos> = 1
    uniform_nll = -(math.log(0.1) + math.log(0.2) + math.log(0.3) + math.log(0.4)) / 4
    expected = 0.9 * targets_nll + 0.1 * 3 * uniform_nll
    assert head.loss(hidden, lengths, [[2, 3]]).item() == pytest.approx(expected, rel=1e-6)
    assert forced_scores(head, hidden, lengths, [[2, 3]])[0].item() == pytest.approx(-targets_nll, rel=1e-6)


def test_bad_configuration_and_targets_are_named():
    with pytest.raises(ValueError, match="unknown attention head option"):
        AttentionHead(16, 8, decoder_units=3)
    with pytest.raises(ValueError, match="ctc_weight"):
        AttentionHead(16, 8, ctc_weight=1.5)
    with pytest.raises(ValueError, match="no gradient"):  # validation would rank an untrained decoder's output
        AttentionHead(16, 8, ctc_weight=1.0)
    with pytest.raises(ValueError, match="location_kernel"):
        AttentionHead(16, 8, location_kernel=4)
    head = tiny_head()
    hidden, lengths = torch.randn(1, 5, 16), torch.tensor([5])
    with pytest.raises(ValueError, match="blank, <sos/eos> or outside"):
        head.loss(hidden, lengths, [[2, EOS]])
    with pytest.raises(ValueError, match="available: attention_greedy, attention_beam"):
        head.decode(hidden, lengths, "ctc_greedy")
    with pytest.raises(ValueError, match="no CTC layer"):
        tiny_head(ctc_weight=0.0).decode(hidden, lengths, "attention_beam", DecodeOptions(ctc_weight=0.3))
    with pytest.raises(ValueError, match="needs an LM"):
        head.decode(hidden, lengths, "attention_beam", DecodeOptions(lm_weight=0.5))


# ---------------------------------------------------------------------- decoding
@pytest.fixture(scope="module")
def memorised():
    """A head trained on two utterances (fixed encoder states) until it reproduces them."""
    head = tiny_head(vocab=8, seed=1, ctc_weight=0.3, label_smoothing=0.0, decoder_dim=32, attention_dim=16)
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 12, 16, generator=generator)
    lengths = torch.tensor([12, 9])
    tokens = [[3, 4, 5, 3], [6, 2, 7]]
    optimizer = torch.optim.Adam(head.parameters(), lr=0.03)
    head.train()
    for _ in range(60):  # memorised after ~25
        optimizer.zero_grad()
        head.loss(hidden, lengths, tokens).backward()
        optimizer.step()
    return head.eval(), hidden, lengths, tokens


def test_greedy_and_beam_reproduce_memorised_utterances(memorised):
    head, hidden, lengths, tokens = memorised
    assert head.decode(hidden, lengths, "attention_greedy") == tokens
    for ctc_weight in (0.0, 0.3, 1.0):
        options = DecodeOptions(beam_size=4, ctc_weight=ctc_weight)
        assert head.decode(hidden, lengths, "attention_beam", options) == tokens


def test_beam_is_at_least_as_good_as_greedy():
    """ctc_weight 0: both maximise log p_att; the greedy path is one of the beam's candidates for
    beam 1, and the scores each search reports are the model's teacher-forced scores."""
    hidden = torch.randn(3, 10, 16, generator=torch.Generator().manual_seed(5))
    lengths = torch.tensor([10, 7, 4])
    for seed in range(4):
        head = tiny_head(seed=seed)
        greedy = head.greedy_search(hidden, lengths)
        forced = forced_scores(head, hidden, lengths, [h.tokens for h in greedy])
        assert [h.score for h in greedy] == pytest.approx(forced.tolist(), abs=1e-4)
        for beam_size in (1, 4):
            beam = joint_beam_search(head, hidden, lengths, DecodeOptions(beam_size=beam_size, ctc_weight=0.0))
            forced = forced_scores(head, hidden, lengths, [h.tokens for h in beam])
            assert [h.attention for h in beam] == pytest.approx(forced.tolist(), abs=1e-4)
            for b, g in zip(beam, greedy):
                assert b.score >= g.score - 1e-5


@torch.no_grad()
def forced_scores(head, hidden, lengths, tokens) -> torch.Tensor:
    return head.sequence_log_probs(hidden, lengths, tokens)


def all_sequences(tokens, max_len):
    return [list(seq) for n in range(max_len + 1) for seq in itertools.product(tokens, repeat=n)]


@pytest.mark.parametrize("ctc_weight,lm_weight,length_bonus", [
    (0.0, 0.0, 0.0), (0.5, 0.0, 0.0), (1.0, 0.0, 0.0), (0.3, 0.6, 0.5), (0.5, 0.4, -0.5)])
def test_beam_search_finds_the_exhaustive_best(ctc_weight, lm_weight, length_bonus):
    """3 real tokens, utterances of 4 and 3 frames: a beam of 81 keeps every prefix, so it must
    return the best of all sequences under (1−λ)·log p_att + λ·log p_ctc + μ·log p_LM + β·|y|."""
    vocab = 5
    head = tiny_head(vocab=vocab, seed=2)
    with torch.no_grad():
        head.ctc.proj.bias[EOS] = -1e4  # the CTC never emits <eos>, as after training
        head.ctc.proj.weight.mul_(8.0)  # peakier CTC: the two scores disagree more
    torch.manual_seed(3)
    lm = LstmLM(vocab, LstmLmConfig(embed_dim=8, hidden_dim=8, layers=1, dropout=0.0)).eval()
    hidden = torch.randn(2, 4, 16, generator=torch.Generator().manual_seed(7))
    lengths = torch.tensor([4, 3])
    options = DecodeOptions(beam_size=81, ctc_weight=ctc_weight, lm=lm, lm_weight=lm_weight,
                            length_bonus=length_bonus, max_len_ratio=1.0, extra=NO_END_DETECTION)
    results = joint_beam_search(head, hidden, lengths, options)
    ctc_log_probs = head.ctc.log_probs(hidden).detach()
    for b, frames in enumerate(lengths.tolist()):
        candidates = all_sequences([2, 3, 4], frames)
        h = hidden[b:b + 1].expand(len(candidates), -1, -1)[:, :frames]
        attention = forced_scores(head, h, torch.full((len(candidates),), frames), candidates)
        ctc = torch.tensor([-float(F.ctc_loss(ctc_log_probs[b, :frames, None], torch.tensor([seq], dtype=torch.long),
                                              torch.tensor([frames]), torch.tensor([len(seq)]), reduction="sum"))
                            for seq in candidates])
        lm_scores = lm.score_sequences(candidates)
        total = (1 - ctc_weight) * attention + length_bonus * torch.tensor([len(seq) for seq in candidates])
        if ctc_weight > 0:  # (0 · −inf would be nan for the sequences CTC cannot emit)
            total += ctc_weight * ctc
        if lm_weight > 0:
            total += lm_weight * lm_scores
        best = int(total.argmax())
        assert results[b].tokens == candidates[best]
        assert results[b].score == pytest.approx(float(total[best]), abs=1e-3)
        assert results[b].attention == pytest.approx(float(attention[best]), abs=1e-3)
        if ctc_weight > 0:
            assert results[b].ctc == pytest.approx(float(ctc[best]), abs=1e-3)
        if lm_weight > 0:
            assert results[b].lm == pytest.approx(float(lm_scores[best]), abs=1e-3)


def test_batched_beam_search_equals_one_utterance_at_a_time():
    head = tiny_head(seed=4)
    hidden = torch.randn(3, 11, 16, generator=torch.Generator().manual_seed(1))
    lengths = torch.tensor([11, 6, 8])
    options = DecodeOptions(beam_size=3, ctc_weight=0.4)
    batched = joint_beam_search(head, hidden, lengths, options)
    for b in range(3):
        alone = joint_beam_search(head, hidden[b:b + 1, :int(lengths[b])], lengths[b:b + 1], options)[0]
        assert alone.tokens == batched[b].tokens
        assert alone.score == pytest.approx(batched[b].score, abs=1e-4)


def test_rows_without_encoder_frames_decode_to_empty_hypotheses():
    """A cut shorter than one encoder frame: its row gets [] (joint CTC scoring would otherwise
    reject the whole batch), and the other rows decode as they do without it."""
    head = tiny_head(seed=4)
    hidden = torch.randn(3, 6, 16, generator=torch.Generator().manual_seed(2))
    lengths = torch.tensor([6, 0, 4])
    for method, options in [("attention_greedy", DecodeOptions()),
                            ("attention_beam", DecodeOptions(beam_size=3, ctc_weight=0.4))]:
        batched = head.decode(hidden, lengths, method, options)
        others = head.decode(hidden[[0, 2]], lengths[[0, 2]], method, options)
        assert batched == [others[0], [], others[1]], method
        assert head.decode(hidden[1:2], lengths[1:2], method, options) == [[]], method


class _PeakedDecoder:
    """A trained character decoder's shape: the next token of TARGET at log p −0.05, <eos> −3 after
    2 tokens (a word end), −0.01 after all 8, −40 inside a word; CTC spikes on TARGET's tokens."""
    TARGET, EOS_LOG_P, FRAMES = [2, 3, 2, 3, 2, 3, 2, 3], {2: -3.0, 8: -0.01}, 12
    vocab_size, blank_id, sos_eos_id = 5, BLANK, EOS

    class _Memory:
        def __init__(self, rows):
            self.rows = rows

        def repeat_interleave(self, k):
            return _PeakedDecoder._Memory(self.rows * k)

    class _Emitted:  # tokens emitted so far, per row
        def __init__(self, count):
            self.count = count

        def select(self, index):
            return _PeakedDecoder._Emitted(self.count[index])

    def prepare(self, hidden, lengths):
        return self._Memory(hidden.shape[0])

    def initial_state(self, memory):
        return self._Emitted(torch.zeros(memory.rows, dtype=torch.long))

    def step(self, memory, previous, state):
        log_p = torch.full((state.count.shape[0], self.vocab_size), -20.0)
        for row, emitted in enumerate(state.count.tolist()):
            log_p[row, EOS] = self.EOS_LOG_P.get(emitted, -40.0)
            if emitted < len(self.TARGET):
                log_p[row, self.TARGET[emitted]] = -0.05
        return log_p, self._Emitted(state.count + 1)

    def ctc_log_probs(self, hidden):
        log_p = torch.full((1, self.FRAMES, self.vocab_size), -9.0)
        log_p[0, :, BLANK] = -0.001
        for t, token in enumerate(self.TARGET):
            log_p[0, 1 + t, token], log_p[0, 1 + t, BLANK] = -0.01, -6.0
        return log_p.log_softmax(-1)


@pytest.mark.parametrize("length_bonus", [0.0, 0.5])
def test_end_detection_does_not_stop_inside_a_word(length_bonus):
    """Every <eos> extension counted as an ended hypothesis, so eq. 50 fired three tokens after a
    plausible word end (the mid-word <eos> extensions far below it) and returned the 2-token prefix,
    9.7 below the full hypothesis; it also ran at β = 0, where the exact stop needs no heuristic."""
    decoder, frames = _PeakedDecoder(), _PeakedDecoder.FRAMES
    best = joint_beam_search(decoder, torch.zeros(1, frames, 1), torch.tensor([frames]),
                             DecodeOptions(beam_size=4, ctc_weight=0.3, length_bonus=length_bonus))[0]
    assert best.tokens == _PeakedDecoder.TARGET


@pytest.mark.parametrize("extra, message", [
    ({"end_detect_window": -1}, "end_detect_window must be a whole number"),
    ({"end_detect_window": 2.5}, "end_detect_window must be a whole number"),
    ({"end_detect_threshold": 10}, "end_detect_threshold must be negative"),  # held for every length
])
def test_end_detection_settings_are_checked(extra, message):
    with pytest.raises(ValueError, match=message):
        joint_beam_search(_PeakedDecoder(), torch.zeros(1, 12, 1), torch.tensor([12]),
                          DecodeOptions(beam_size=2, length_bonus=0.5, extra=extra))


def test_pure_ctc_beam_agrees_with_ctc_prefix_beam_search():
    """ctc_weight 1 ranks hypotheses by CTC alone, as the CTC head's prefix beam search does."""
    from sslasr.decoding.ctc_prefix_beam import CtcBeamConfig, ctc_prefix_beam_search
    vocab, frames = 6, 7
    head = tiny_head(vocab=vocab, encoder_dim=vocab)
    with torch.no_grad():  # rig the CTC layer to pass the encoder states through as logits
        head.ctc.proj.weight.copy_(torch.eye(vocab))
        head.ctc.proj.bias.zero_()
    for seed in range(3):
        logits = ctc_distribution(1, frames, vocab, seed=10 + seed).clamp(min=-1e4)
        ours = joint_beam_search(head, logits, torch.tensor([frames]),
                                 DecodeOptions(beam_size=16, ctc_weight=1.0, extra=NO_END_DETECTION))[0]
        # (a frame-synchronous beam drops the paths through pruned prefixes, so its probability is
        # a lower bound; with a wide beam it is exact, as prefix scores always are)
        theirs = ctc_prefix_beam_search(logits[0], CtcBeamConfig(beam_size=256, token_topk=0,
                                                                 blank_skip_threshold=1.0))[0]
        assert ours.tokens == theirs.tokens
        exact = -F.ctc_loss(logits.transpose(0, 1), torch.tensor([ours.tokens]), torch.tensor([frames]),
                            torch.tensor([len(ours.tokens)]), reduction="sum").item()
        assert ours.ctc == pytest.approx(exact, abs=1e-4)
        assert theirs.ctc_log_prob == pytest.approx(exact, abs=1e-4)


class BigramLM(torch.nn.Module):
    """A rigged LM: log p(next | previous) from a fixed (V, V) table; its state is None."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.table = table

    def initial_state(self, batch_size: int):
        return None

    def step(self, prev_tokens: torch.Tensor, state):
        return self.table[prev_tokens], state

    def select_state(self, state, indices: torch.Tensor):
        return state


def test_lm_fusion_and_length_bonus_change_the_choice(memorised):
    head, hidden, lengths, tokens = memorised
    preferred = [3, 4, 6, 3]  # the memorised [3, 4, 5, 3] with one token changed
    table = torch.full((8, 8), -20.0)
    for previous, following in zip([EOS] + preferred, preferred + [EOS]):
        table[previous, following] = 0.0
    lm = BigramLM(table.log_softmax(-1))
    fused = DecodeOptions(beam_size=4, ctc_weight=0.3, lm=lm, lm_weight=2.0)
    best = joint_beam_search(head, hidden[:1], lengths[:1], fused)[0]
    transitions = zip([EOS] + preferred, preferred + [EOS])
    assert best.tokens == preferred
    assert best.lm == pytest.approx(sum(float(lm.table[p, n]) for p, n in transitions), abs=1e-5)
    plain = DecodeOptions(beam_size=4, ctc_weight=0.3, lm=lm, lm_weight=0.0)
    assert head.decode(hidden[:1], lengths[:1], "attention_beam", plain) == [tokens[0]]
    # β·|y|: a large penalty ends at once, a large bonus runs to max_len_ratio × frames
    short = DecodeOptions(beam_size=4, ctc_weight=0.3, length_bonus=-100.0)
    assert head.decode(hidden, lengths, "attention_beam", short) == [[], []]
    long = DecodeOptions(beam_size=4, ctc_weight=0.0, length_bonus=100.0, max_len_ratio=0.5)
    assert [len(y) for y in head.decode(hidden, lengths, "attention_beam", long)] == [6, 4]


# ---------------------------------------------------------------------- configs and recipe
def test_recipe_config_builds_the_head():
    conf = ROOT / "egs" / "minisynth" / "conf"
    cfg = load_configs([conf / "frontend_wav2vec2.yaml", conf / "finetune_attention.yaml"])
    assert cfg["head"]["name"] == "attention"
    assert cfg["head"]["ctc_weight"] == 0.3 and cfg["head"]["label_smoothing"] == 0.1
    head = build_head(144, 30, cfg["head"])  # every key is a real option
    assert isinstance(head, AttentionHead) and head.cfg.decoder_layers == 2
    model = build_asr_model(cfg, vocab_size=30)
    assert model.head.greedy_method == "attention_greedy"
    decode = cfg["decode"]
    assert set(decode["methods"] + decode["lm_methods"]) <= set(AttentionHead.methods)
    assert decode["ctc_weight"] == cfg["head"]["ctc_weight"]


@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng is not installed")
def test_recipe_with_attention_head(tmp_path: Path, prepared_minisynth: Path):
    """Stages 5 to the end, scratch system only; both methods decoded (a narrow beam, no LM
    methods: fusion is tested above, and a 4-update model's beams run long)."""
    recipe = recipe_with_data(tmp_path, prepared_minisynth)
    opts = list(SMOKE)
    opts[opts.index("--finetune-opts") + 1] += " decode.beam_size=2 decode.lm_methods=[]"
    result = run_recipe(recipe, *opts, "--head", "attention", "--no-pretrain", "true", "--stage", "5",
                        "--lm-opts", "trainer.max_updates=4 trainer.valid_every=0", timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    exp = recipe / "exp" / "attention_scratch_wav2vec2_all"
    checkpoint = torch.load(exp / "model_final.pt", map_location="cpu", weights_only=False)
    assert checkpoint["config"]["head"]["name"] == "attention"
    assert any(key.startswith("head.attention.location_conv") for key in checkpoint["model"])
    for method in AttentionHead.methods:
        assert len((exp / f"decode_test_{method}" / "hyp.txt").read_text().splitlines()) == 8
    rows = [json.loads(line) for line in (recipe / "exp" / "results.jsonl").read_text().splitlines()]
    assert sorted((r["head"], r["decoding"], r["test_set"]) for r in rows) == sorted(
        ("attention", method, test_set) for method in AttentionHead.methods for test_set in ("dev", "test"))
    assert "attention_beam" in (recipe / "RESULTS.md").read_text()


@pytest.mark.parametrize("head", ["ctc", "attention", "transducer"])
def test_an_utterance_without_encoder_frames_is_left_out_of_the_loss(head, caplog):
    """Evaluation splits keep every utterance, so validation can batch one shorter than the conv
    extractor's receptive field (400 samples): its row has no frames. The attention loss of the
    batch was NaN and the transducer's an error; now the row is left out, said, for every head."""
    conf = ROOT / "egs" / "minisynth" / "conf"
    torch.manual_seed(0)
    model = build_asr_model(load_configs([conf / "frontend_wav2vec2.yaml", conf / f"finetune_{head}.yaml"]),
                            vocab_size=30).eval()
    audio = torch.zeros(2, 8000)
    audio[0] = torch.randn(8000)
    audio[1, :200] = torch.randn(200)
    tokens = [[5, 6, 7], [8]]
    with torch.no_grad(), caplog.at_level("WARNING"):
        batch = model(audio, torch.tensor([8000, 200]), tokens)
        alone = model(audio[:1], torch.tensor([8000]), tokens[:1])
    assert torch.isfinite(batch) and batch.item() == pytest.approx(alone.item(), rel=1e-4)
    assert "1 of 2 utterances have no encoder frames" in caplog.text
    model.freeze_encoder = True  # the first updates of fine-tuning: the encoder runs without a graph
    empty = model(audio[1:], torch.tensor([200]), tokens[1:])
    assert empty.item() == 0.0
    empty.backward()  # a batch of such rows still steps (zero gradients), not an error
