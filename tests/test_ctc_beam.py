"""CTC prefix beam search: exact against brute force on tiny cases, hand-computed cases, beam ≥
greedy, shallow fusion with rigged LMs (λ and β), batch = per utterance, the head method,
decoding options, λ/β tuning, and the recipe's LM / decode / score stages at smoke size."""

import dataclasses
import itertools
import json
import math
import shutil
from pathlib import Path
from typing import Dict

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from recipe_smoke import SMOKE, recipe_with_data, run_recipe
from sslasr.decoding.ctc_prefix_beam import CtcBeamConfig, ctc_prefix_beam_search, ctc_prefix_beam_search_batch
from sslasr.decoding.fusion import corpus_wer, decode_options, tune_fusion
from sslasr.decoding.lexicon import NOT_ALLOWED, ROOT, Lexicon
from sslasr.data.tokenizer import Tokenizer
from sslasr.models.asr import build_asr_model
from sslasr.models.heads.ctc import CtcHead, best_path, ctc_loss
from sslasr.models.interfaces import DecodeOptions
from sslasr.models.lm import build_lm
from sslasr.utils.config import load_config

EXACT = CtcBeamConfig(beam_size=1000, token_topk=0, blank_skip_threshold=1.0)  # no pruning at all


def brute_force(log_probs: np.ndarray):
    """log p(y) for every label sequence y: the sum over all T-frame paths collapsing to y."""
    totals = {}
    frames, vocab = log_probs.shape
    for path in itertools.product(range(vocab), repeat=frames):
        labels, previous = [], None
        for token in path:
            if token != previous and token != 0:
                labels.append(token)
            previous = token
        key = tuple(labels)
        totals[key] = np.logaddexp(totals.get(key, -np.inf), sum(log_probs[t, c] for t, c in enumerate(path)))
    return totals


def ctc_log_prob(log_probs: torch.Tensor, tokens) -> float:
    """log p(tokens | x) by the forward algorithm (torch's CTC loss)."""
    if not tokens:
        return float(log_probs[:, 0].sum())
    return -float(F.ctc_loss(log_probs.unsqueeze(1), torch.tensor([tokens]), torch.tensor([log_probs.shape[0]]),
                             torch.tensor([len(tokens)]), reduction="sum"))


@pytest.mark.parametrize("seed", range(6))
def test_exact_search_equals_brute_force(seed):
    """With nothing pruned the search is exact: the best label sequence, and each of the n-best
    sequences' probabilities, equal brute-force sums over every path (repeats included: V = 3 on
    6 frames has sequences like 1 1 and 1 2 1)."""
    torch.manual_seed(seed)
    log_probs = torch.log_softmax(torch.randn(6, 3) * 1.5, -1)
    totals = brute_force(log_probs.double().numpy())
    hyps = ctc_prefix_beam_search(log_probs, EXACT, nbest=len(totals))
    best = max(totals, key=totals.get)
    assert tuple(hyps[0].tokens) == best and hyps[0].ctc_log_prob == pytest.approx(totals[best], abs=1e-9)
    assert len(hyps) == len(totals)
    for hyp in hyps:
        assert hyp.ctc_log_prob == pytest.approx(totals[tuple(hyp.tokens)], abs=1e-9)


def test_hand_computed_case_where_greedy_is_wrong():
    """Two frames, p(blank) = 0.6, p(a) = 0.4 each: the best path is blank blank (p 0.36, empty
    output) but "a" collects aa + a· + ·a = 0.16 + 0.24 + 0.24 = 0.64."""
    log_probs = torch.tensor([[0.6, 0.4], [0.6, 0.4]]).log()
    assert best_path(log_probs.argmax(-1)[None], torch.tensor([2]))[0] == []
    hyp = ctc_prefix_beam_search(log_probs, CtcBeamConfig(beam_size=2))[0]
    assert hyp.tokens == [1] and hyp.ctc_log_prob == pytest.approx(math.log(0.64))


def test_repeats_need_a_blank_between_them():
    """Frames mostly a, a, blank, a: "a a" exists only through paths with a blank between the
    two a's; the search's probabilities of "a a" and "a" match the forward algorithm."""
    log_probs = torch.tensor([[0.1, 0.9], [0.1, 0.9], [0.9, 0.1], [0.1, 0.9]]).log()
    hyps = ctc_prefix_beam_search(log_probs, EXACT, nbest=10)
    by_tokens = {tuple(h.tokens): h.ctc_log_prob for h in hyps}
    assert by_tokens[(1, 1)] == pytest.approx(ctc_log_prob(log_probs, [1, 1]))
    assert by_tokens[(1,)] == pytest.approx(ctc_log_prob(log_probs, [1]))
    assert hyps[0].tokens == [1, 1]


@pytest.mark.parametrize("seed", range(5))
def test_beam_is_at_least_as_probable_as_greedy(seed):
    """Pruned as by default (8 of 12 tokens a frame, beam 8), on 40 noisy frames."""
    torch.manual_seed(seed)
    log_probs = torch.log_softmax(torch.randn(40, 12) * 2.0, -1)
    greedy = best_path(log_probs.argmax(-1)[None], torch.tensor([40]))[0]
    beam = ctc_prefix_beam_search(log_probs, CtcBeamConfig(beam_size=8))[0]
    assert ctc_log_prob(log_probs, beam.tokens) >= ctc_log_prob(log_probs, greedy) - 1e-6
    # pruning can only lose paths: the tracked probability is a lower bound of the true one
    assert beam.ctc_log_prob <= ctc_log_prob(log_probs, beam.tokens) + 1e-4


def _rigged_lm(vocab: int, favourite: int, name: str = "lstm"):
    """An LM with zero weights except an output bias: every context predicts `favourite` with
    probability e^5 / (e^5 + V − 2) ≈ 0.93."""
    cfg = {"name": "lstm", "embed_dim": 8, "hidden_dim": 8, "layers": 1, "dropout": 0.0} if name == "lstm" else \
        {"name": "transformer", "dim": 8, "layers": 1, "heads": 2, "ffn_dim": 16}
    lm = build_lm(cfg, vocab).eval()
    with torch.no_grad():
        for parameter in lm.parameters():
            parameter.zero_()
        lm.output.bias[favourite] = 5.0
    return lm


@pytest.mark.parametrize("name", ["lstm", "transformer"])
def test_shallow_fusion_with_a_rigged_lm_changes_the_hypothesis(name):
    """Acoustics slightly prefer token 2 over 3; an LM sure of 3 flips it once λ is large enough:
    per token the LM gap is log(e^5) = 5 nats against an acoustic gap of log(.5/.4) ≈ 0.22."""
    frame = torch.tensor([0.05, 0.01, 0.5, 0.4, 0.04]).log()
    log_probs = torch.stack([frame, torch.tensor([0.96, 0.01, 0.01, 0.01, 0.01]).log()])
    lm = _rigged_lm(5, favourite=3, name=name)
    plain = ctc_prefix_beam_search(log_probs, CtcBeamConfig(beam_size=4), lm=None)[0]
    fused = ctc_prefix_beam_search(log_probs, CtcBeamConfig(beam_size=4, lm_weight=0.5), lm=lm)[0]
    tiny = ctc_prefix_beam_search(log_probs, CtcBeamConfig(beam_size=4, lm_weight=0.01), lm=lm)[0]
    assert plain.tokens == [2] and fused.tokens == [3] and tiny.tokens == [2]
    # the reported LM score is log p_LM(3) + log p_LM(<eos> | 3) under the rigged distribution
    normaliser = math.exp(5.0) + 5 - 2
    assert fused.lm_log_prob == pytest.approx(5.0 - math.log(normaliser) - math.log(normaliser), abs=1e-5)
    assert fused.score == pytest.approx(fused.ctc_log_prob + 0.5 * fused.lm_log_prob, abs=1e-6)


@pytest.mark.parametrize("name, seed", [("lstm", 0), ("lstm", 1), ("transformer", 0), ("transformer", 1)])
def test_exact_fused_search_equals_brute_force_over_label_sequences(name, seed):
    """Unpruned, the fused search is exact: its n-best are every label sequence y (without
    <sos/eos>, which the LM reads as the end) ranked by log p_CTC(y) + λ·log p_LM(y, <eos>) + β·|y|,
    with p_CTC summed over all paths and p_LM the LM's teacher-forced probability; and the LM
    reorders the CTC-only ranking (it is not too weak to matter)."""
    torch.manual_seed(seed)
    lm = build_lm({"name": "lstm", "embed_dim": 8, "hidden_dim": 8, "layers": 2, "dropout": 0.0} if name == "lstm"
                  else {"name": "transformer", "dim": 8, "layers": 2, "heads": 2, "ffn_dim": 16}, 4).eval()
    with torch.no_grad():
        lm.output.weight.mul_(8.0)  # sharper than at initialisation, so that the LM's preferences count
    log_probs = torch.log_softmax(torch.randn(5, 4) * 1.5, -1)
    lm_weight, length_bonus = 0.8, 0.4
    ctc = {y: p for y, p in brute_force(log_probs.double().numpy()).items() if 1 not in y}
    sequences = sorted(ctc)
    lm_scores = lm.score_sequences([list(y) for y in sequences]).double().tolist()
    fused = {y: ctc[y] + lm_weight * lm_y + length_bonus * len(y) for y, lm_y in zip(sequences, lm_scores)}
    config = dataclasses.replace(EXACT, lm_weight=lm_weight, length_bonus=length_bonus)
    hyps = ctc_prefix_beam_search(log_probs, config, lm, nbest=len(fused))
    assert [tuple(h.tokens) for h in hyps] == sorted(fused, key=fused.get, reverse=True)
    for hyp, lm_y in zip(hyps, (lm_scores[sequences.index(tuple(h.tokens))] for h in hyps)):
        assert hyp.score == pytest.approx(fused[tuple(hyp.tokens)], abs=1e-5)
        assert hyp.ctc_log_prob == pytest.approx(ctc[tuple(hyp.tokens)], abs=1e-9)
        assert hyp.lm_log_prob == pytest.approx(lm_y, abs=1e-5)
    assert sorted(fused, key=fused.get) != sorted(ctc, key=ctc.get)


def test_length_bonus_trades_deletions_for_insertions():
    """A token at 30 % between blank-dominated frames: dropped at β = 0, kept with a bonus."""
    blank = torch.tensor([0.9, 0.05, 0.05]).log()
    middle = torch.tensor([0.7, 0.3, 0.0001]).log()
    log_probs = torch.stack([blank, middle, blank])
    assert ctc_prefix_beam_search(log_probs, CtcBeamConfig(beam_size=4))[0].tokens == []
    assert ctc_prefix_beam_search(log_probs, CtcBeamConfig(beam_size=4, length_bonus=1.0))[0].tokens == [1]


@pytest.mark.parametrize("name", ["lstm", "transformer"])
def test_batch_search_equals_one_utterance_at_a_time(name):
    """Lockstep batching (one LM step per frame for every utterance) changes nothing."""
    torch.manual_seed(1)
    lm = build_lm({"name": "lstm", "embed_dim": 8, "hidden_dim": 16, "layers": 2, "dropout": 0.0}
                  if name == "lstm" else {"name": "transformer", "dim": 8, "layers": 2, "heads": 2, "ffn_dim": 16},
                  9).eval()
    log_probs = torch.log_softmax(torch.randn(3, 30, 9) * 2.0, -1)
    lengths = torch.tensor([30, 12, 21])
    cfg = CtcBeamConfig(beam_size=5, token_topk=4, blank_skip_threshold=0.9, lm_weight=0.7, length_bonus=0.5)
    batched = ctc_prefix_beam_search_batch(log_probs, lengths, cfg, lm, nbest=3)
    for b in range(3):
        alone = ctc_prefix_beam_search(log_probs[b, : lengths[b]], cfg, lm, nbest=3)
        assert [h.tokens for h in batched[b]] == [h.tokens for h in alone]
        assert [h.score for h in batched[b]] == pytest.approx([h.score for h in alone], abs=1e-5)


def test_blank_skipping_keeps_peaky_posteriors_exact():
    """Frames ≥ 99.9 % blank extend nothing, but their blank/repeat updates are exact: on peaky
    posteriors the result and its probability match the unpruned search."""
    torch.manual_seed(2)
    logits = torch.randn(60, 7)
    logits[:, 0] += torch.where(torch.rand(60) < 0.7, 12.0, -2.0)
    log_probs = torch.log_softmax(logits, -1)
    pruned = ctc_prefix_beam_search(log_probs, CtcBeamConfig(beam_size=8))[0]
    exact = ctc_prefix_beam_search(log_probs, CtcBeamConfig(beam_size=8, token_topk=0, blank_skip_threshold=1.0))[0]
    assert pruned.tokens == exact.tokens
    assert pruned.ctc_log_prob == pytest.approx(exact.ctc_log_prob, abs=1e-3)


def test_ctc_head_decodes_with_ctc_beam():
    torch.manual_seed(0)
    head = CtcHead(6, 9).eval()
    hidden, lengths = torch.randn(2, 15, 6), torch.tensor([15, 9])
    options = DecodeOptions(beam_size=4)
    expected = [h[0].tokens for h in ctc_prefix_beam_search_batch(head.log_probs(hidden), lengths,
                                                                  CtcBeamConfig(beam_size=4))]
    assert head.decode(hidden, lengths, "ctc_beam", options) == expected
    assert "ctc_beam" in head.methods
    with pytest.raises(ValueError, match="the LM has 5 tokens but the CTC head 9"):
        head.decode(hidden, lengths, "ctc_beam", DecodeOptions(lm=_rigged_lm(5, 3), lm_weight=0.5))
    with pytest.raises(ValueError, match="ctc_greedy, ctc_beam, ctc_lexicon"):
        head.decode(hidden, lengths, "ctc_prefix", options)


def test_decode_options_from_the_yaml_section():
    section = {"methods": ["ctc_greedy"], "lm_methods": ["ctc_beam"], "beam_size": 6, "ctc_token_topk": 3,
               "ctc_weight": 0.4, "tune": {"lm_weight": [0.1]}}
    options = decode_options(section, lm_weight=0.3, beam_size=None)
    assert (options.beam_size, options.lm_weight, options.ctc_weight) == (6, 0.3, 0.4)
    assert options.extra == {"ctc_token_topk": 3}
    assert CtcBeamConfig.from_options(options).token_topk == 3
    assert decode_options(section, beam_size=12).beam_size == 12
    with pytest.raises(ValueError, match="'lm_wieght' is not a decoding option"):
        decode_options(section, lm_wieght=0.3)
    # with an LM, lm_beam_size (when set) replaces beam_size; an explicit --beam-size still wins
    wide = dict(section, lm_beam_size=32)
    assert decode_options(wide).beam_size == 6
    assert decode_options(wide, lm=object()).beam_size == 32
    assert decode_options(wide, lm=object(), beam_size=4).beam_size == 4
    assert "lm_beam_size" not in decode_options(wide).extra


def test_tune_fusion_picks_the_lowest_dev_wer():
    """A constructed decoder whose output depends on (λ, β): only λ = 0.5, β = 1 gets every word
    right; the grid is fully evaluated and the tie at WER 50 % is not chosen."""
    refs = {"u1": "A B", "u2": "C D"}

    def decode(lm_weight, length_bonus):
        if (lm_weight, length_bonus) == (0.5, 1.0):
            return {"u1": "A B", "u2": "C D"}
        if length_bonus == 0.0:
            return {"u1": "A", "u2": "C"}            # two deletions: 50 %
        return {"u1": "A B X", "u2": "C D Y"}        # two insertions: 50 %

    best = tune_fusion(decode, refs, [0.1, 0.5, 1.0], [0.0, 1.0])
    assert (best["lm_weight"], best["length_bonus"], best["dev_wer"]) == (0.5, 1.0, 0.0)
    assert len(best["grid"]) == 6 and {p["dev_wer"] for p in best["grid"]} == {0.0, 50.0}
    assert corpus_wer({"u1": "A"}, refs) == 75.0  # a missing hypothesis counts as all deletions
    with pytest.raises(ValueError, match="hold no word"):  # was 200 %: insertions over max(1, 0) words
        corpus_wer({"u1": "A B"}, {"u1": ""})
    with pytest.raises(ValueError, match="at least one"):
        tune_fusion(decode, refs, [], [0.0])


def test_tuning_grid_from_the_command_line_or_the_model_config():
    from sslasr.bin.decode import tuning_grid
    config = {"lm_weight": [0.3, 1], "length_bonus": [0.5]}
    assert tuning_grid(config, None, None) == {"lm_weight": [0.3, 1.0], "length_bonus": [0.5]}
    assert tuning_grid(config, [1.5, 2.0], None) == {"lm_weight": [1.5, 2.0], "length_bonus": [0.5]}
    assert tuning_grid({}, [1.0], None) == {"lm_weight": [1.0], "length_bonus": [0.0]}
    assert tuning_grid({}, None, [1.0]) == {"lm_weight": [], "length_bonus": [1.0]}


def test_a_saved_tuning_is_reused_only_for_the_same_grid(tmp_path):
    """A resumed decode keeps the saved λ, β when its grid and LM are this run's; over another grid
    it stops and says to --overwrite (the other sets were decoded with the old λ, β); made with
    another LM, it is tuned again (a file from before tunings named their LM is kept)."""
    from types import SimpleNamespace
    from sslasr.bin.decode import TUNING_FILE
    from sslasr.bin.decode import known_fusion as decode_known_fusion
    saved = tmp_path / "decode_dev_ctc_beam_lm"
    saved.mkdir()
    points = [{"lm_weight": lw, "length_bonus": lb, "dev_wer": 50.0} for lw in (0.3, 1.0) for lb in (0.5, 1.5)]
    (saved / TUNING_FILE).write_text(json.dumps({"lm_weight": 1.0, "length_bonus": 0.5, "grid": points,
                                                 "lm": "lm_a.pt"}))
    args = SimpleNamespace(lm_weight=None, length_bonus=0.0, out_dir=str(tmp_path / "decode_{set}_{method}"),
                           tune_on="dev", overwrite=False, lm="lm_a.pt", lexicon=None, model=None, cuts=[])
    same = {"lm_weight": [1.0, 0.3], "length_bonus": [0.5, 1.5]}

    def known_fusion(args, fused, grid):
        return decode_known_fusion(args, fused, grid, lambda method: 8)

    assert known_fusion(args, ["ctc_beam+lm"], same) == {"ctc_beam+lm": (1.0, 0.5)}
    wider = {"lm_weight": [0.3, 1.0, 1.5], "length_bonus": [0.5, 1.5]}
    with pytest.raises(SystemExit, match=r"λ \[0.3, 1.0\] × β \[0.5, 1.5\].*λ \[0.3, 1.0, 1.5\].*--overwrite"):
        known_fusion(args, ["ctc_beam+lm"], wider)
    assert known_fusion(SimpleNamespace(**{**vars(args), "overwrite": True}), ["ctc_beam+lm"], wider) == {}
    given = SimpleNamespace(**{**vars(args), "lm_weight": 2.0, "length_bonus": 1.0})
    assert known_fusion(given, ["ctc_beam+lm"], wider) == {"ctc_beam+lm": (2.0, 1.0)}
    # tuned for another LM: not reused (tuned again), whatever its grid
    assert known_fusion(SimpleNamespace(**{**vars(args), "lm": "lm_b.pt"}), ["ctc_beam+lm"], wider) == {}
    # a file from before tunings named their LM is taken as this LM's
    (saved / TUNING_FILE).write_text(json.dumps({"lm_weight": 1.0, "length_bonus": 0.5, "grid": points}))
    assert known_fusion(SimpleNamespace(**{**vars(args), "lm": "lm_b.pt"}), ["ctc_beam+lm"], same) == {
        "ctc_beam+lm": (1.0, 0.5)}


def test_a_saved_tuning_is_tuned_again_for_another_beam_size_or_lexicon(tmp_path, caplog):
    """λ, β tuned with beam 4 and one words.txt are not reused, but logged and tuned again, with
    another --beam-size or after words.txt changed; a method without the lexicon ignores it."""
    from types import SimpleNamespace
    from sslasr.bin.decode import TUNING_FILE, known_fusion, search_inputs, tuning_settings
    words = tmp_path / "words.txt"
    words.write_text("AB\nBA\n")
    args = SimpleNamespace(lm_weight=None, length_bonus=0.0, out_dir=str(tmp_path / "decode_{set}_{method}"),
                           tune_on="dev", overwrite=False, lm="lm_a.pt", lexicon=str(words), model=None, cuts=[])
    grid = {"lm_weight": [0.3], "length_bonus": [0.5]}
    for method in ("ctc_lexicon+lm", "ctc_beam+lm"):
        saved = tmp_path / f"decode_dev_{method.replace('+lm', '_lm')}"
        saved.mkdir()
        (saved / TUNING_FILE).write_text(json.dumps({
            "lm_weight": 0.3, "length_bonus": 0.5, "grid": [{"lm_weight": 0.3, "length_bonus": 0.5, "dev_wer": 9.0}],
            **tuning_settings(search_inputs(args, method), 4)}))
    both = ["ctc_lexicon+lm", "ctc_beam+lm"]
    assert known_fusion(args, both, grid, lambda method: 4) == {m: (0.3, 0.5) for m in both}
    with caplog.at_level("WARNING"):
        assert known_fusion(args, both, grid, lambda method: 8) == {}
    assert "beam_size 4 (this run: 8): tuning ctc_beam+lm on dev again" in caplog.text
    words.write_text("AB\nBA\nBAB\n")
    caplog.clear()
    with caplog.at_level("WARNING"):
        assert known_fusion(args, both, grid, lambda method: 4) == {"ctc_beam+lm": (0.3, 0.5)}
    assert "lexicon_sha256" in caplog.text and "tuning ctc_lexicon+lm on dev again" in caplog.text


# ------------------------------------------------------------------ decode.py on a tiny system
TINY_ENCODER = {"conv_layers": [[16, 10, 5], [16, 8, 4], [16, 4, 4], [16, 4, 4]], "conv_norm": "group",
                "conv_bias": False, "transformer": {"dim": 16, "layers": 1, "heads": 2, "ffn_dim": 32,
                                                    "pos_conv_kernel": 8, "pos_conv_groups": 4}}


@pytest.fixture(scope="module")
def tiny_system(tmp_path_factory) -> Dict[str, str]:
    """A random tiny wav2vec 2.0 + CTC model, a random LSTM LM over its char tokenizer, and two
    transcribed sets (dev, test) of three 1-second noise cuts each: enough to drive decode.py."""
    import soundfile as sf
    from lhotse import CutSet, Recording, RecordingSet, SupervisionSegment, SupervisionSet
    from sslasr.data.tokenizer import train_tokenizer
    root = tmp_path_factory.mktemp("tiny_system")
    texts = ["AB BA", "BA", "AB AB", "B A", "AAB", "BAB"]
    tokenizer = train_tokenizer(texts, root / "lang", vocab_size=6, model_type="char")
    torch.manual_seed(0)
    cfg = {"task": "asr", "data": {"tokenizer": str(root / "lang")}, "head": {"name": "ctc"},
           "frontend": {"name": "wav2vec2", "encoder": TINY_ENCODER}, "decode": {"beam_size": 4}}
    model = build_asr_model(cfg, tokenizer.vocab_size)
    torch.save({"model": model.state_dict(), "config": cfg}, root / "asr.pt")
    lm_cfg = {"name": "lstm", "embed_dim": 8, "hidden_dim": 8, "layers": 1, "dropout": 0.0}
    torch.save({"model": build_lm(lm_cfg, tokenizer.vocab_size).state_dict(), "config": {"task": "lm", "lm": lm_cfg}},
               root / "lm.pt")
    paths = {"model": str(root / "asr.pt"), "lm": str(root / "lm.pt")}
    rng = np.random.default_rng(0)
    for name, set_texts in (("dev", texts[:3]), ("test", texts[3:])):
        recordings, supervisions = [], []
        for i, text in enumerate(set_texts):
            sf.write(root / f"{name}{i}.wav", 0.1 * rng.standard_normal(16000).astype(np.float32), 16000)
            recordings.append(Recording.from_file(root / f"{name}{i}.wav", recording_id=f"{name}{i}"))
            supervisions.append(SupervisionSegment(f"{name}{i}", f"{name}{i}", 0.0, 1.0, text=text))
        cuts = CutSet.from_manifests(RecordingSet.from_recordings(recordings), SupervisionSet.from_segments(supervisions))
        cuts.to_file(root / f"{name}.jsonl.gz")
        paths[name] = str(root / f"{name}.jsonl.gz")
    return paths


def test_lm_methods_are_tuned_on_the_tuning_set_never_on_another(tiny_system, tmp_path):
    """Run 1 decodes dev with a given λ = 0.3 (no tuning file). Run 2 tunes on dev over λ ∈ {0.5, 1}:
    dev's λ = 0.3 decoding does not count, so dev is decoded again and tuned; test is decoded with
    dev's λ, β and never tuned itself; ctc_greedy (no LM) is not redone. Run 3 repeats run 2 and
    redoes nothing; run 4 gives λ = 0.7, and every +lm decoding made with another λ is redone."""
    from sslasr.bin import decode
    from sslasr.bin.decode import TUNING_FILE
    out = tmp_path / "decode_{set}_{method}"
    common = ["--model", tiny_system["model"], "--lm", tiny_system["lm"], "--methods", "ctc_greedy", "ctc_beam+lm",
              "--out-dir", str(out)]
    decode.main(common + ["--cuts", f"dev={tiny_system['dev']}", "--lm-weight", "0.3"])
    greedy_dev = tmp_path / "decode_dev_ctc_greedy/decode_info.json"
    greedy_written = greedy_dev.stat().st_mtime_ns

    tune = common + ["--cuts", f"dev={tiny_system['dev']}", f"test={tiny_system['test']}", "--tune-on", "dev",
                     "--tune-lm-weights", "0.5", "1.0"]
    decode.main(tune)
    tuning = json.loads((tmp_path / "decode_dev_ctc_beam_lm" / TUNING_FILE).read_text())
    assert [(p["lm_weight"], p["length_bonus"]) for p in tuning["grid"]] == [(0.5, 0.0), (1.0, 0.0)]
    assert (tuning["lm"], tuning["beam_size"], tuning["lexicon"]) == (tiny_system["lm"], 4, None)
    assert not (tmp_path / "decode_test_ctc_beam_lm" / TUNING_FILE).exists()
    infos = {s: json.loads((tmp_path / f"decode_{s}_ctc_beam_lm/decode_info.json").read_text()) for s in ("dev", "test")}
    for info in infos.values():
        assert (info["lm_weight"], info["length_bonus"], info["tuned_on"]) == (
            tuning["lm_weight"], tuning["length_bonus"], "dev")
        assert info["lm"] == tiny_system["lm"]
    assert greedy_dev.stat().st_mtime_ns == greedy_written

    written = {p: p.stat().st_mtime_ns for p in tmp_path.glob("decode_*/*.json")}
    decode.main(tune)
    assert {p: p.stat().st_mtime_ns for p in written} == written

    decode.main(common + ["--cuts", f"dev={tiny_system['dev']}", f"test={tiny_system['test']}", "--lm-weight", "0.7"])
    for name in ("dev", "test"):
        info = json.loads((tmp_path / f"decode_{name}_ctc_beam_lm/decode_info.json").read_text())
        assert (info["lm_weight"], info["length_bonus"]) == (0.7, 0.0) and "tuned_on" not in info
    assert (tmp_path / "decode_dev_ctc_beam_lm" / TUNING_FILE).stat().st_mtime_ns == written[
        tmp_path / "decode_dev_ctc_beam_lm" / TUNING_FILE]


def test_an_lm_retrained_in_place_is_decoded_and_tuned_again(tiny_system, tmp_path):
    """Stage 6 retrained with more text writes the same path: the +lm decodings and their tuning
    are redone with the new LM (they used to be kept, as the path had not changed); the decodings
    without it are kept."""
    from sslasr.bin import decode
    from sslasr.bin.decode import TUNING_FILE
    lm = tmp_path / "lm_model_final.pt"
    shutil.copy(tiny_system["lm"], lm)
    run = ["--model", tiny_system["model"], "--lm", str(lm), "--methods", "ctc_greedy", "ctc_beam+lm",
           "--out-dir", str(tmp_path / "decode_{set}_{method}"), "--cuts", f"dev={tiny_system['dev']}",
           f"test={tiny_system['test']}", "--tune-on", "dev", "--tune-lm-weights", "0.5", "1.0"]
    decode.main(run)
    files = sorted(tmp_path.glob("decode_*/*.json"))
    written = {p: p.stat().st_mtime_ns for p in files}
    first = json.loads((tmp_path / "decode_test_ctc_beam_lm/decode_info.json").read_text())["lm_sha256"]
    saved = torch.load(lm, weights_only=False)
    torch.manual_seed(1)
    saved["model"] = {k: torch.randn_like(v) for k, v in saved["model"].items()}
    torch.save(saved, lm)
    decode.main(run)
    again = {p: p.stat().st_mtime_ns for p in files}
    redone = sorted(p.parent.name + "/" + p.name for p in files if again[p] != written[p])
    assert redone == ["decode_dev_ctc_beam_lm/decode_info.json", f"decode_dev_ctc_beam_lm/{TUNING_FILE}",
                      "decode_test_ctc_beam_lm/decode_info.json"]
    info = json.loads((tmp_path / "decode_test_ctc_beam_lm/decode_info.json").read_text())
    tuning = json.loads((tmp_path / f"decode_dev_ctc_beam_lm/{TUNING_FILE}").read_text())
    assert info["lm_sha256"] == tuning["lm_sha256"] != first and len(first) == 64


def test_a_set_made_again_or_a_model_trained_again_is_decoded_again(tiny_system, tmp_path):
    """A decoded folder stood for its set's name and the model's path: a test manifest drawn
    again (other utterances) kept the old hyp.txt and ref.txt, and so did a model retrained in place."""
    from lhotse import load_manifest
    from sslasr.bin import decode
    model, test = tmp_path / "model_final.pt", tmp_path / "test.jsonl.gz"
    shutil.copy(tiny_system["model"], model)
    shutil.copy(tiny_system["test"], test)
    run = ["--model", str(model), "--methods", "ctc_greedy", "--out-dir", str(tmp_path / "decode_{set}_{method}"),
           "--cuts", f"dev={tiny_system['dev']}", f"test={test}"]
    decode.main(run)
    infos = sorted(tmp_path.glob("decode_*/decode_info.json"))

    def redone(action) -> list:
        before = {p: p.stat().st_mtime_ns for p in infos}
        action()
        decode.main(run)
        return sorted(p.parent.name for p in infos if p.stat().st_mtime_ns != before[p])

    assert redone(lambda: None) == []
    cuts = load_manifest(test)
    assert redone(lambda: cuts.subset(first=len(cuts) - 1).to_file(test)) == ["decode_test_ctc_greedy"]
    assert len((tmp_path / "decode_test_ctc_greedy/hyp.txt").read_text().splitlines()) == len(cuts) - 1

    def retrain():
        saved = torch.load(model, weights_only=False)
        saved["model"] = {k: v + 0.01 if v.is_floating_point() else v for k, v in saved["model"].items()}
        torch.save(saved, model)
    assert redone(retrain) == ["decode_dev_ctc_greedy", "decode_test_ctc_greedy"]


def test_a_killed_rewrite_leaves_no_done_mark_and_no_other_sets_references(tiny_system, tmp_path, monkeypatch):
    """write_decoding replaced hyp.txt while the earlier decoding's decode_info.json (the folder's
    done mark) stayed until its last line: killed in between, a rerun with the earlier settings
    took the new hypotheses for its own. And a set without transcripts kept the ref.txt of the
    transcribed set decoded there before."""
    from lhotse import load_manifest
    from lhotse.utils import fastcopy
    from sslasr.bin import decode
    test = tmp_path / "test.jsonl.gz"
    shutil.copy(tiny_system["test"], test)
    folder = tmp_path / "decode_test_ctc_beam"

    def run(beam: int) -> None:
        decode.main(["--model", tiny_system["model"], "--methods", "ctc_beam", "--beam-size", str(beam),
                     "--out-dir", str(tmp_path / "decode_{set}_{method}"), "--cuts", f"test={test}"])

    run(4)
    real_write = decode.write_text_atomic

    def killed_at_the_mark(path, text):
        if Path(path).name == "decode_info.json":
            raise KeyboardInterrupt
        real_write(path, text)
    monkeypatch.setattr(decode, "write_text_atomic", killed_at_the_mark)
    with pytest.raises(KeyboardInterrupt):
        run(2)
    monkeypatch.undo()
    assert (folder / "hyp.txt").exists() and not (folder / "decode_info.json").exists()
    run(4)  # decoded again, not taken as done
    assert json.loads((folder / "decode_info.json").read_text())["beam_size"] == 4

    cuts = load_manifest(test)
    cuts.map_supervisions(lambda s: fastcopy(s, text=None)).to_file(test)  # the same audio, untranscribed
    run(4)
    assert (folder / "hyp.txt").exists() and not (folder / "ref.txt").exists()


def test_a_tuning_set_made_again_is_tuned_on_again(tiny_system, tmp_path):
    """λ, β tuned on the dev set: a dev manifest drawn again was decoded again, but with the λ, β
    of the earlier dev set, as if tuned on this one; the same cuts written again are not redone."""
    from lhotse import load_manifest
    from sslasr.bin import decode
    from sslasr.bin.decode import TUNING_FILE
    dev = tmp_path / "dev.jsonl.gz"
    shutil.copy(tiny_system["dev"], dev)
    run = ["--model", tiny_system["model"], "--lm", tiny_system["lm"], "--methods", "ctc_beam+lm",
           "--out-dir", str(tmp_path / "decode_{set}_{method}"), "--cuts", f"dev={dev}", f"test={tiny_system['test']}",
           "--tune-on", "dev", "--tune-lm-weights", "0.5", "1.0"]
    decode.main(run)
    tuning = tmp_path / f"decode_dev_ctc_beam_lm/{TUNING_FILE}"
    written = tuning.stat().st_mtime_ns
    cuts = load_manifest(dev)
    cuts.to_file(dev)  # the same cuts, another gzip header
    decode.main(run)
    assert tuning.stat().st_mtime_ns == written
    cuts.subset(first=len(cuts) - 1).to_file(dev)
    decode.main(run)
    assert tuning.stat().st_mtime_ns != written
    assert len((tmp_path / "decode_dev_ctc_beam_lm/hyp.txt").read_text().splitlines()) == len(cuts) - 1


def test_a_partly_transcribed_set_is_decoded_and_scored(tiny_system, tmp_path):
    """One of three cuts has no transcript: hyp.txt has all three, ref.txt two, decode_info.json
    and the log count the third, and the folder scores over the two transcribed cuts."""
    import dataclasses
    from lhotse import CutSet, load_manifest
    from sslasr.bin import decode, score
    cuts = load_manifest(tiny_system["dev"])
    untranscribed = cuts[1].id
    CutSet.from_cuts(dataclasses.replace(cut, supervisions=[]) if cut.id == untranscribed else cut
                     for cut in cuts).to_file(tmp_path / "part.jsonl.gz")
    out = tmp_path / "decode"
    decode.main(["--model", tiny_system["model"], "--methods", "ctc_greedy", "--cuts",
                 f"part={tmp_path / 'part.jsonl.gz'}", "--out-dir", str(out)])
    assert "1 of 3 cuts have no transcript" in (tmp_path / "decode.log").read_text()
    assert json.loads((out / "decode_info.json").read_text())["num_unreferenced"] == 1
    assert [line.split()[0] for line in (out / "ref.txt").read_text().splitlines()] == [cuts[0].id, cuts[2].id]
    assert len((out / "hyp.txt").read_text().splitlines()) == 3
    score.main(["--ref", str(out / "ref.txt"), "--hyp", str(out / "hyp.txt"), "--out-dir", str(out)])
    assert "over 4 reference words" in (out / "errors.txt").read_text()  # "AB BA" and "AB AB"


def test_plan_searches_tunes_nowhere_but_the_tuning_set():
    from sslasr.bin.decode import plan_searches

    def options(method, lm_weight=0.0, length_bonus=0.0):
        return DecodeOptions(lm_weight=lm_weight, length_bonus=length_bonus)

    grid = {"lm_weight": [0.5, 1.0], "length_bonus": [0.0]}
    assert set(plan_searches(["ctc_beam+lm"], {}, grid, options)) == {("ctc_beam+lm", 0.5, 0.0),
                                                                       ("ctc_beam+lm", 1.0, 0.0)}
    known = plan_searches(["ctc_beam+lm"], {"ctc_beam+lm": (0.5, 1.0)}, None, options)
    assert (known["ctc_beam+lm"].options.lm_weight, known["ctc_beam+lm"].options.length_bonus) == (0.5, 1.0)
    with pytest.raises(ValueError, match="ctc_beam\\+lm: λ and β are not known yet and this is not the tuning set"):
        plan_searches(["ctc_beam+lm"], {}, None, options)


# ------------------------------------------------------------------ the recipe's stages 5-9
@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng is not installed")
def test_recipe_lm_decode_score_stages(tmp_path: Path, prepared_minisynth: Path, monkeypatch):
    """From fine-tuning to RESULTS.md at smoke size (scratch system): the LM stage, λ/β tuning on
    dev, and a results row per (test set, method) for ctc_greedy, ctc_beam and ctc_beam+lm; the
    decode reuses its tuning when resumed, and its tuned hypotheses are a plain decode's."""
    recipe = recipe_with_data(tmp_path, prepared_minisynth)
    result = run_recipe(recipe, *SMOKE, "--stage", "5", "--no-pretrain", "true", timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    system = recipe / "exp/ctc_scratch_wav2vec2_all"
    perplexity = json.loads((recipe / "exp/lm_char_40/perplexity.json").read_text())
    lm_vocab = Tokenizer(str(recipe / "data/lang_char_40/bpe.model")).vocab_size
    # learnt, not merely run: well below a uniform LM's (every token but blank)
    assert 1.0 < perplexity["perplexity"] < 0.75 * (lm_vocab - 1) and perplexity["num_sentences"] == 8
    tuned = json.loads((system / "decode_dev_ctc_beam_lm/fusion_tuning.json").read_text())
    decode_cfg = load_config(recipe / "conf/finetune_ctc.yaml")["decode"]
    grid_size = len(decode_cfg["tune"]["lm_weight"]) * len(decode_cfg["tune"]["length_bonus"])
    assert len(tuned["grid"]) == grid_size and tuned["dev_wer"] == min(p["dev_wer"] for p in tuned["grid"])

    checkpoint = torch.load(system / "model_final.pt", weights_only=False)
    vocab_size = Tokenizer(str(recipe / checkpoint["config"]["data"]["tokenizer"])).vocab_size
    trained_parameters = sum(p.numel() for p in build_asr_model(checkpoint["config"], vocab_size).parameters())
    rows = [json.loads(line) for line in (recipe / "exp/results.jsonl").read_text().splitlines()]
    assert sorted((r["test_set"], r["decoding"]) for r in rows) == sorted(
        (s, d) for s in ("dev", "test") for d in ("ctc_greedy", "ctc_beam", "ctc_beam+lm"))
    for row in rows:
        info = json.loads((system / f"decode_{row['test_set']}_{row['decoding'].replace('+lm', '_lm')}"
                           / "decode_info.json").read_text())
        assert info["method"] == row["decoding"].split("+")[0] and info["real_time_factor"] > 0
        assert row["model_parameters"] == info["model_parameters"] == trained_parameters
        if row["decoding"] == "ctc_beam+lm":
            assert (row["lm_weight"], row["length_bonus"]) == (tuned["lm_weight"], tuned["length_bonus"])
            assert row["lm_perplexity"] == perplexity["perplexity"] and info["lm"].endswith("model_final.pt")
            assert info["beam_size"] == decode_cfg["lm_beam_size"]  # the wider beam with the LM
        else:
            assert row["lm_weight"] == 0 and row["length_bonus"] == 0 and "lm_perplexity" not in row
            if row["decoding"] == "ctc_beam":
                assert info["beam_size"] == decode_cfg["beam_size"]
    table = (recipe / "RESULTS.md").read_text()
    assert "ctc_beam+lm" in table and "length bonus" in table

    # resumed after losing one decode: only that one is redone, with the saved λ, β, to the same words
    lost = system / "decode_test_ctc_beam_lm"
    hyps = (lost / "hyp.txt").read_text()
    (lost / "decode_info.json").unlink()
    (system / ".decode.done").unlink()
    kept = {p: p.stat().st_mtime_ns for p in system.glob("decode_*/*.json")}
    result = run_recipe(recipe, *SMOKE, "--stage", "7", "--stop-stage", "7", "--no-pretrain", "true")
    assert result.returncode == 0, result.stderr[-4000:]
    assert (lost / "hyp.txt").read_text() == hyps and (lost / "decode_info.json").exists()
    assert kept == {p: p.stat().st_mtime_ns for p in kept}

    # the tuning's dev hypotheses = dev decoded on its own at the chosen λ, β
    from sslasr.bin import decode
    monkeypatch.chdir(recipe)  # the model config names its tokenizer relative to the recipe
    decode.main(["--model", str(system / "model_final.pt"), "--cuts", "data/manifests/minisynth_cuts_dev.jsonl.gz",
                 "--methods", "ctc_beam+lm", "--lm", "exp/lm_char_40/model_final.pt", "--lm-weight", str(tuned["lm_weight"]),
                 "--length-bonus", str(tuned["length_bonus"]), "--out-dir", str(tmp_path / "alone")])
    assert ((tmp_path / "alone/hyp.txt").read_text()
            == (system / "decode_dev_ctc_beam_lm/hyp.txt").read_text())

    # stage 6 again with more LM text (the run.sh usage line): the LM is trained again, and only the
    # decodings with it are redone and scored again; they used to be kept, the LM's path unchanged
    extra = tmp_path / "more_text.txt"
    extra.write_text("THE CAT SAT ON THE MAT\nA DOG RAN HOME\n")
    lm_file = recipe / "exp/lm_char_40/model_final.pt"
    lm_before = lm_file.read_bytes()
    decoded = {p: p.stat().st_mtime_ns for p in system.glob("decode_*/decode_info.json")}
    result = run_recipe(recipe, *SMOKE, "--stage", "6", "--stop-stage", "8", "--no-pretrain", "true",
                        "--lm-text", str(extra), timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "exp/lm_char_40 was trained on other inputs; training it again" in result.stderr
    assert lm_file.read_bytes() != lm_before and str(extra) in (recipe / "exp/lm_char_40/inputs.txt").read_text()
    assert sorted(p.parent.name for p in decoded if p.stat().st_mtime_ns != decoded[p]) == [
        "decode_dev_ctc_beam_lm", "decode_test_ctc_beam_lm"]
    perplexity = json.loads((recipe / "exp/lm_char_40/perplexity.json").read_text())
    rows = [json.loads(line) for line in (recipe / "exp/results.jsonl").read_text().splitlines()]
    latest = [r for r in rows if r["decoding"] == "ctc_beam+lm" and r["test_set"] == "test"][-1]
    assert latest["lm_perplexity"] == perplexity["perplexity"]
    # the row names every command that made it, each with what it did: the data preparation's too
    prepared, first, resumed, second = latest["command"].splitlines()  # in the order they ran
    assert "--stop-stage 3" in prepared and prepared.endswith("  # data prepared, manifests made, tokenizer trained")
    assert first.startswith("./run.sh ") and "--lm-text" not in first
    # (its LM was trained again by the last command: that note went to commands.superseded.txt)
    assert first.endswith("  # fine-tuned, decoded")
    assert "\tLM trained\t" in (recipe / "exp/lm_char_40/commands.superseded.txt").read_text()
    assert "--stage 7 --stop-stage 7" in resumed and resumed.endswith("  # decoded")
    assert "--lm-text" in second and second.endswith("  # LM trained, decoded, scored")
    greedy = [r for r in rows if r["decoding"] == "ctc_greedy" and r["test_set"] == "test"]
    # made and scored by the first command alone, after the data preparation
    assert len(greedy) == 1 and greedy[0]["command"].splitlines() == [
        prepared, first.split("  # ")[0] + "  # fine-tuned, decoded, scored"]
    result = run_recipe(recipe, *SMOKE, "--stage", "6", "--stop-stage", "8", "--no-pretrain", "true",
                        "--lm-text", str(extra), timeout=900)
    assert "LM ready" in result.stderr and "training it again" not in result.stderr


class LetterTokenizer:
    """The char sentencepiece convention on a 2-letter alphabet: 0 <blk>, 1 <sos/eos>, 2 <unk>,
    3 '▁' (starts each word), 4 'A', 5 'B'."""
    unk_id, vocab_size = 2, 6

    def encode(self, word):
        return [3] + [{"A": 4, "B": 5}.get(letter, 2) for letter in word]


def lexicon_words(tokens):
    """The words a token sequence spells, or None when it is not a sequence of whole words."""
    if (tokens and tokens[0] != 3) or not set(tokens) <= {3, 4, 5}:
        return None
    words = "".join({3: " ", 4: "A", 5: "B"}[t] for t in tokens).split(" ")[1:]
    return words if all(words) else None


def test_lexicon_trie_follows_words_and_starts_new_ones():
    lexicon = Lexicon(["AB", "B", "BBA", "AB", "XA"], LetterTokenizer())
    assert lexicon.words == ["AB", "B", "BBA"]  # duplicates merged; X is outside the tokenizer's letters
    node = np.array([ROOT])
    path = []
    for token in [3, 4, 5, 3, 5, 5, 4]:  # ▁AB ▁BBA, through ▁B (a word) and ▁BB (not one)
        node = lexicon.next_nodes(node, np.array([token]))[:, 0]
        assert node[0] != NOT_ALLOWED
        path.append(bool(lexicon.is_complete(node)[0]))
    assert path == [False, False, True, False, True, False, True]
    ab = lexicon.next_nodes(lexicon.next_nodes(lexicon.next_nodes(np.array([ROOT]), np.array([3]))[:, 0],
                                               np.array([4]))[:, 0], np.array([5]))[:, 0]
    # after "▁AB": no word goes on with A or B, and only '▁' starts the next word
    assert list(lexicon.next_nodes(ab, np.array([3, 4, 5]))[0, 1:]) == [NOT_ALLOWED, NOT_ALLOWED]
    assert lexicon.next_nodes(ab, np.array([3]))[0, 0] != NOT_ALLOWED
    # the root takes only a word's first token
    assert list(lexicon.next_nodes(np.array([ROOT]), np.array([4, 5]))[0]) == [NOT_ALLOWED, NOT_ALLOWED]


def test_a_lexicon_over_a_large_vocabulary_takes_memory_by_its_edges():
    """The trie was a dense nodes × vocabulary table: with a LibriSpeech-size lexicon and a
    5000-piece vocabulary, ~10 GB. Here 10⁸ token ids (800 GB dense) and random words; every
    transition is checked against the words' own prefixes."""
    rng = np.random.default_rng(0)

    class WideTokenizer:  # a word's pieces: its letters, at ids spread over 10⁸
        unk_id, vocab_size = 2, 10 ** 8

        def encode(self, word):
            return [3 + 997 * (ord(c) - 96) ** 3 for c in word]
    words = sorted({"".join(rng.choice(list("abcdef"), size=rng.integers(1, 6))) for _ in range(300)})
    tokenizer = WideTokenizer()
    lexicon = Lexicon(words, tokenizer)
    assert lexicon.edge_keys.nbytes < 100_000
    prefixes = {tuple(tokenizer.encode(w)[:i]) for w in words for i in range(1, len(w) + 1)}
    letters = np.array(tokenizer.encode("abcdefg"))
    for word in words[:50]:
        node, spelt = np.array([ROOT]), ()
        for token in tokenizer.encode(word):
            nxt = lexicon.next_nodes(node, letters)[0]
            allowed = {t for t, n in zip(letters.tolist(), nxt.tolist()) if n != NOT_ALLOWED}
            goes_on = {t for t in letters.tolist() if spelt + (t,) in prefixes}
            starts = {t for t in letters.tolist() if (t,) in prefixes} if lexicon.is_complete(node)[0] else set()
            assert allowed == goes_on | starts
            node, spelt = nxt[letters.tolist().index(token)][None], spelt + (token,)
        assert lexicon.is_complete(node)[0]


@pytest.mark.parametrize("seed", range(4))
def test_exact_lexicon_search_is_the_best_sequence_of_lexicon_words(seed):
    """Unpruned, the lexicon-constrained search returns exactly the brute-force most probable
    label sequence among those spelling lexicon words, with its exact probability; and the
    unconstrained best is (for these seeds) outside the lexicon, so the constraint acted."""
    torch.manual_seed(seed)
    log_probs = torch.log_softmax(torch.randn(6, 6) * 2.0, -1)
    log_probs[:, 1:3] = -30.0  # <sos/eos> and <unk> never win
    totals = brute_force(log_probs.double().numpy())
    words = {"AB", "B", "BA"}
    in_lexicon = {seq: p for seq, p in totals.items()
                  if (w := lexicon_words(list(seq))) is not None and set(w) <= words}
    config = dataclasses.replace(EXACT, lexicon=Lexicon(words, LetterTokenizer()))
    hyps = ctc_prefix_beam_search(log_probs, config, nbest=3)
    best = max(in_lexicon, key=in_lexicon.get)
    assert tuple(hyps[0].tokens) == best
    assert hyps[0].ctc_log_prob == pytest.approx(in_lexicon[best], abs=1e-9)
    assert all(tuple(h.tokens) in in_lexicon for h in hyps)
    assert max(totals, key=totals.get) not in in_lexicon


def test_ctc_head_lexicon_method_needs_a_lexicon_and_ctc_beam_ignores_it():
    torch.manual_seed(0)
    head = CtcHead(6, 6).eval()
    hidden, lengths = torch.randn(2, 15, 6), torch.tensor([15, 9])
    lexicon = Lexicon(["AB", "BA", "B"], LetterTokenizer())
    with pytest.raises(ValueError, match="ctc_lexicon needs a lexicon"):
        head.decode(hidden, lengths, "ctc_lexicon", DecodeOptions(beam_size=4))
    constrained = head.decode(hidden, lengths, "ctc_lexicon", DecodeOptions(beam_size=4, lexicon=lexicon))
    assert any(constrained)  # (an empty hypothesis would pass the check below vacuously)
    assert all(lexicon_words(t) is not None and set(lexicon_words(t)) <= {"AB", "BA", "B"}
               for t in constrained if t)
    assert (head.decode(hidden, lengths, "ctc_beam", DecodeOptions(beam_size=4, lexicon=lexicon))
            == head.decode(hidden, lengths, "ctc_beam", DecodeOptions(beam_size=4)))


def test_lexicon_cli_writes_the_words_a_char_tokenizer_spells(tmp_path):
    """sslasr.bin.lexicon: the distinct words of the text, sorted; loaded with a real char
    sentencepiece model, each word's trie path is '▁' then its letters and ends a word."""
    from sslasr.bin import lexicon as lexicon_cli
    from sslasr.data.tokenizer import train_tokenizer
    sentences = ["THE CAT SAT", "A CAT RAN", "THE END"]
    (tmp_path / "text.txt").write_text("\n".join(sentences) + "\n")
    tokenizer = train_tokenizer(sentences, tmp_path / "lang", vocab_size=20, model_type="char")
    lexicon_cli.main(["--text", str(tmp_path / "text.txt"), "--out", str(tmp_path / "words.txt")])
    assert (tmp_path / "words.txt").read_text().split() == ["A", "CAT", "END", "RAN", "SAT", "THE"]
    lexicon = Lexicon.load(tmp_path / "words.txt", tokenizer)
    assert len(lexicon.words) == 6
    for word in lexicon.words:
        node = np.array([ROOT])
        for token in tokenizer.encode(word):
            node = lexicon.next_nodes(node, np.array([token]))[:, 0]
        assert node[0] != NOT_ALLOWED and lexicon.is_complete(node)[0]
    # "CA" is a prefix of CAT, not a word
    node = np.array([ROOT])
    for token in tokenizer.encode("CA"):
        node = lexicon.next_nodes(node, np.array([token]))[:, 0]
    assert not lexicon.is_complete(node)[0]


def test_a_decoding_with_another_beam_or_lexicon_is_redone(tiny_system, tmp_path):
    """A rerun with another --beam-size redoes the beam searches but not greedy; another lexicon
    redoes the lexicon search only; the same settings redo nothing."""
    from sslasr.bin import decode
    methods = ("ctc_greedy", "ctc_beam", "ctc_lexicon")
    for name, words in (("words.txt", "AB\nBA\n"), ("fewer_words.txt", "AB\n")):
        (tmp_path / name).write_text(words)

    def run(*extra, lexicon="words.txt"):
        decode.main(["--model", tiny_system["model"], "--cuts", f"dev={tiny_system['dev']}", "--methods", *methods,
                     "--lexicon", str(tmp_path / lexicon), "--out-dir", str(tmp_path / "{method}"), *extra])
        return {m: (tmp_path / m / "decode_info.json").stat().st_mtime_ns for m in methods}

    first = run()
    assert run() == first
    second = run("--beam-size", "2")
    assert second["ctc_greedy"] == first["ctc_greedy"]
    assert second["ctc_beam"] != first["ctc_beam"] and second["ctc_lexicon"] != first["ctc_lexicon"]
    assert json.loads((tmp_path / "ctc_beam/decode_info.json").read_text())["beam_size"] == 2
    third = run("--beam-size", "2", lexicon="fewer_words.txt")
    assert (third["ctc_greedy"], third["ctc_beam"]) == (first["ctc_greedy"], second["ctc_beam"])
    assert third["ctc_lexicon"] != second["ctc_lexicon"]


def test_ctc_loss_counts_utterances_without_an_alignment(caplog):
    """3 frames: [5, 6] fits, [5, 5] needs a blank between the repeats (3 frames, fits),
    [5, 5, 5] needs 5 and [4, 5, 6, 7] needs 4: those two count 0, and the warning says so."""
    gen = torch.Generator().manual_seed(0)
    log_probs = torch.randn(4, 3, 9, generator=gen, dtype=torch.float64).log_softmax(-1)
    lengths = torch.tensor([3, 3, 3, 3])
    tokens = [[5, 6], [5, 5], [5, 5, 5], [4, 5, 6, 7]]
    with caplog.at_level("WARNING"):
        total = ctc_loss(log_probs, lengths, tokens)
    each = [-ctc_log_prob(log_probs[b], tokens[b]) for b in range(2)]
    assert float(total) == pytest.approx(sum(each), rel=1e-9) and all(0 < x < math.inf for x in each)
    assert "2 of 4 utterances have fewer frames than their transcripts need (e.g. 3, needing 5)" in caplog.text
    caplog.clear()
    ctc_loss(log_probs[:2], lengths[:2], tokens[:2])
    assert not caplog.text


def test_ctc_head_learns_to_transcribe_fixed_features():
    """A frame whose features encode the token (with noise) per token, a blank-like frame between:
    300 Adam steps of the CTC loss are enough for greedy decoding to transcribe every utterance."""
    gen = torch.Generator().manual_seed(0)
    vocab, dim = 7, 12
    codebook = torch.randn(vocab, dim, generator=gen)
    transcripts = [[2, 3, 4], [5, 6, 2, 3], [4, 4, 6], [6, 5]]
    rows = [torch.stack([codebook[k] if k else torch.zeros(dim) for k in [0] + sum(([k, 0] for k in t), [])])
            for t in transcripts]
    lengths = torch.tensor([len(r) for r in rows])
    hidden = torch.nn.utils.rnn.pad_sequence(rows, batch_first=True)
    torch.manual_seed(0)
    head = CtcHead(input_dim=dim, vocab_size=vocab).train()
    optimizer = torch.optim.Adam(head.parameters(), lr=0.05)
    assert head.eval().greedy(hidden, lengths) != transcripts
    for _ in range(300):
        noisy = hidden + 0.1 * torch.randn(hidden.shape, generator=gen)
        loss = head.train().loss(noisy, lengths, transcripts) / sum(map(len, transcripts))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert head.eval().greedy(hidden, lengths) == transcripts


def test_greedy_with_an_lm_is_refused(tiny_system, tmp_path, capsys):
    """Greedy search never reads the LM: ctc_greedy+lm decoded and tuned plain greedy output,
    recorded as fused."""
    from sslasr.bin import decode
    with pytest.raises(SystemExit):
        decode.main(["--model", tiny_system["model"], "--lm", tiny_system["lm"], "--methods", "ctc_greedy+lm", "--lm-weight", "0.5",
                     "--cuts", f"dev={tiny_system['dev']}", "--out-dir", str(tmp_path / "out")])
    assert "greedy search takes no LM" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_lexicon_without_a_spellable_word_is_an_error():
    """Lower-case words and an upper-case tokenizer: every ctc_lexicon hypothesis came out empty."""
    with pytest.raises(ValueError, match="no word of the lexicon can be spelt"):
        Lexicon(["ab", "ba"], LetterTokenizer())
    assert Lexicon(["ab", "AB"], LetterTokenizer()).words == ["AB"]


@pytest.mark.parametrize("threshold", [0.0, -0.5])
def test_a_blank_skip_threshold_at_or_below_zero_is_an_error(threshold):
    """0 skipped every frame (every hypothesis empty); a negative one never skipped, silently."""
    with pytest.raises(ValueError, match="ctc_blank_skip_threshold must be above 0"):
        CtcBeamConfig.from_options(DecodeOptions(extra={"ctc_blank_skip_threshold": threshold}))


def test_scores_of_an_earlier_decoding_never_sit_beside_new_hypotheses(tiny_system, tmp_path):
    """pseudo_label ranks hyp.txt by scores.txt: a redo without --confidence removes the old
    scores, and a folder decoded without them is decoded again when they are asked for."""
    from sslasr.bin import decode
    out = tmp_path / "out"

    def run(*extra):
        decode.main(["--model", tiny_system["model"], "--methods", "ctc_beam", "--cuts", f"dev={tiny_system['dev']}",
                     "--out-dir", str(out), *extra])

    run()
    assert not (out / "scores.txt").exists()
    run("--confidence")
    assert len((out / "scores.txt").read_text().splitlines()) == 3
    run("--beam-size", "2")  # redone without --confidence
    assert not (out / "scores.txt").exists()


def test_a_lexicon_search_ending_inside_a_word_says_so(caplog):
    """Two frames cannot spell "▁AB" (3 tokens): the one hypothesis kept stops inside the word, is
    returned, and the log says so (it used to go out silently as a non-word)."""
    log_probs = torch.full((2, 6), -30.0)
    log_probs[0, 3] = log_probs[1, 4] = 0.0  # '▁' then 'A'
    config = dataclasses.replace(EXACT, beam_size=1, lexicon=Lexicon(["AB"], LetterTokenizer()))
    with caplog.at_level("WARNING"):
        hyps = ctc_prefix_beam_search(log_probs, config, nbest=1)
    assert hyps[0].tokens == [3, 4] and "no hypothesis in the beam ends on a whole word" in caplog.text


def test_decode_takes_no_abbreviated_options(tmp_path, capsys):
    """The driver refuses --decode-opts naming its own options (--tune-on, ...): an abbreviation
    (--tune-o test) would have slipped past it."""
    from sslasr.bin import decode
    with pytest.raises(SystemExit) as stop:
        decode.main(["--model", str(tmp_path / "m.pt"), "--cuts", str(tmp_path / "a.jsonl.gz"),
                     "--out-dir", str(tmp_path), "--tune-o", "test"])
    assert stop.value.code == 2 and "unrecognized arguments: --tune-o test" in capsys.readouterr().err


def test_cuts_are_named_before_the_first_equals_sign_and_paths_may_hold_one():
    """The name was cut at the last `=`: `dev=/data/run=3/cuts_dev.jsonl.gz` decoded
    `3/cuts_dev.jsonl.gz` as a set named `dev=/data/run`."""
    from sslasr.bin.decode import parse_cuts
    assert parse_cuts(["dev=/data/run=3/cuts_dev.jsonl.gz", "/data/run=3/cuts_test.jsonl.gz", "x.jsonl.gz"]) == {
        "dev": "/data/run=3/cuts_dev.jsonl.gz", "cuts_test": "/data/run=3/cuts_test.jsonl.gz", "x": "x.jsonl.gz"}
    with pytest.raises(ValueError, match="names 'dev' twice"):
        parse_cuts(["dev=a.jsonl.gz", "dev=b.jsonl.gz"])
