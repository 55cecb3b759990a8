"""Token LMs: incremental decoding equals the full forward (LSTM and Transformer, ragged
histories through select/concat), hand-computed scores, the text batch sampler, training through
the shared trainer (overfit to low perplexity, exact resume after a kill), loading, perplexity CLI."""

import json
import logging
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from sslasr.bin import lm_perplexity
from sslasr.data.text import TokenBatchSampler, read_sentences, tokenize_sentences
from sslasr.data.tokenizer import train_tokenizer
from sslasr.models.lm import BLANK_ID, SOS_EOS_ID, build_lm, load_lm, teacher_forcing_batch
from sslasr.train.distributed import init_distributed
from sslasr.train.lm_task import LmTask
from sslasr.train.trainer import Trainer, seed_everything

VOCAB = 13
CONFIGS = {
    "lstm": {"name": "lstm", "embed_dim": 16, "hidden_dim": 24, "layers": 2, "dropout": 0.1},
    "transformer_post_ln": {"name": "transformer", "dim": 16, "layers": 2, "heads": 2, "ffn_dim": 32},
    "transformer_pre_ln": {"name": "transformer", "dim": 16, "layers": 2, "heads": 4, "ffn_dim": 32,
                           "layer_norm_first": True, "tie_weights": True},
}
SEQUENCES = [[3, 4, 5, 6, 7], [8, 9], [10], [11, 12, 3, 2]]


@pytest.fixture(params=sorted(CONFIGS))
def lm(request):
    torch.manual_seed(0)
    return build_lm(CONFIGS[request.param], VOCAB).eval()


def _full_log_probs(lm, sequences):
    inputs, _ = teacher_forcing_batch(sequences, VOCAB)
    with torch.no_grad():
        return lm._log_softmax(lm.logits(inputs))


def test_step_by_step_equals_full_forward(lm):
    """All four histories advance together although they end at different lengths: each row is fed
    its own tokens, and finished rows are dropped with select_state."""
    full = _full_log_probs(lm, SEQUENCES)
    with torch.no_grad():
        state = lm.initial_state(len(SEQUENCES))
        rows = list(range(len(SEQUENCES)))
        log_probs, state = lm.step(torch.full((len(rows),), SOS_EOS_ID), state)
        for position in range(max(map(len, SEQUENCES)) + 1):
            for row, seq in enumerate(rows):
                torch.testing.assert_close(log_probs[row], full[seq, position], atol=1e-5, rtol=1e-5)
            rows_alive = [i for i, seq in enumerate(rows) if position < len(SEQUENCES[seq])]
            if not rows_alive:
                break
            state = lm.select_state(state, torch.tensor(rows_alive))
            rows = [rows[i] for i in rows_alive]
            log_probs, state = lm.step(torch.tensor([SEQUENCES[s][position] for s in rows]), state)


def test_log_probs_are_normalised_without_blank(lm):
    with torch.no_grad():
        log_probs, _ = lm.step(torch.full((3,), SOS_EOS_ID), lm.initial_state(3))
    assert log_probs.shape == (3, VOCAB) and log_probs.dtype == torch.float32
    assert torch.isneginf(log_probs[:, BLANK_ID]).all()
    torch.testing.assert_close(log_probs.exp().sum(-1), torch.ones(3))


def test_select_and_concat_states_keep_each_history(lm):
    """Histories of different lengths from two separate states, duplicated and reordered, then
    merged, continue exactly as each alone would."""
    def advance(tokens_per_row):
        state = lm.initial_state(len(tokens_per_row))
        log_probs, state = lm.step(torch.full((len(tokens_per_row),), SOS_EOS_ID), state)
        for column in range(len(tokens_per_row[0])):
            log_probs, state = lm.step(torch.tensor([t[column] for t in tokens_per_row]), state)
        return log_probs, state

    with torch.no_grad():
        _, long_state = advance([[3, 4, 5, 6], [7, 8, 9, 10]])
        _, short_state = advance([[11]])
        merged = lm.concat_states([lm.select_state(long_state, torch.tensor([1, 0, 1])), short_state])
        log_probs, _ = lm.step(torch.tensor([4, 12, 5, 3]), merged)
        for row, sequence in enumerate([[7, 8, 9, 10, 4], [3, 4, 5, 6, 12], [7, 8, 9, 10, 5], [11, 3]]):
            alone, _ = advance([sequence])
            torch.testing.assert_close(log_probs[row], alone[0], atol=1e-5, rtol=1e-5)


def test_score_sequences_sums_the_steps_including_eos(lm):
    scores = lm.score_sequences(SEQUENCES)
    full = _full_log_probs(lm, SEQUENCES)
    for row, seq in enumerate(SEQUENCES):
        expected = sum(full[row, i, token].item() for i, token in enumerate(seq + [SOS_EOS_ID]))
        assert scores[row].item() == pytest.approx(expected, abs=1e-4)


def test_prediction_depends_on_the_whole_history_and_nothing_after_it(lm):
    """Random weights: changing the first token changes the prediction three tokens later (an LM
    that saw only its last token would pass the step-by-step test above); changing a later token
    leaves the earlier positions' predictions exactly as they were (no look-ahead)."""
    original, first_changed, last_changed = [3, 4, 5, 6], [9, 4, 5, 6], [3, 4, 5, 11]
    full = _full_log_probs(lm, [original, first_changed, last_changed])[:, :, BLANK_ID + 1:]  # blank: −inf
    assert (full[0, 4] - full[1, 4]).abs().max() > 1e-3
    torch.testing.assert_close(full[0, :4], full[2, :4], atol=1e-6, rtol=0)
    assert (full[0, 4] - full[2, 4]).abs().max() > 1e-3


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_zero_weights_give_uniform_scores(name):
    """An LM with every weight zero predicts uniformly over the V − 1 non-blank tokens, so a
    sentence of L tokens scores −(L + 1)·log(V − 1)."""
    lm = build_lm(CONFIGS[name], VOCAB).eval()
    with torch.no_grad():
        for parameter in lm.parameters():
            parameter.zero_()
    expected = [-(len(s) + 1) * math.log(VOCAB - 1) for s in SEQUENCES]
    torch.testing.assert_close(lm.score_sequences(SEQUENCES), torch.tensor(expected))


def test_bad_config_and_tokens_are_named():
    with pytest.raises(ValueError, match="lm.name must be one of"):
        build_lm({"name": "gru"}, VOCAB)
    with pytest.raises(ValueError, match="unknown lstm LM options \\['hidden'\\]"):
        build_lm({"name": "lstm", "hidden": 3}, VOCAB)
    with pytest.raises(ValueError, match="tie_weights needs hidden_dim == embed_dim"):
        build_lm({"name": "lstm", "embed_dim": 4, "hidden_dim": 8, "tie_weights": True}, VOCAB)
    with pytest.raises(ValueError, match="cannot occur inside an LM sentence"):
        teacher_forcing_batch([[3, 0, 4]], VOCAB)


# ------------------------------------------------------------------ text batches
def test_token_batch_sampler_is_a_deterministic_partition():
    lengths = [(7 * i) % 23 + 1 for i in range(200)]
    sampler = TokenBatchSampler(lengths, max_tokens=60, shuffle=True, seed=3)
    sampler.set_epoch(1)
    epoch1 = list(sampler)
    assert sorted(i for batch in epoch1 for i in batch) == list(range(200))  # each sentence once
    assert all(max(lengths[i] + 1 for i in b) * len(b) <= 60 for b in epoch1)
    again = TokenBatchSampler(lengths, max_tokens=60, shuffle=True, seed=3)
    again.set_epoch(1)
    assert list(again) == epoch1  # what resuming relies on
    sampler.set_epoch(2)
    assert list(sampler) != epoch1



@pytest.mark.parametrize("shuffle", [True, False])
def test_a_sentence_over_max_tokens_is_a_batch_of_its_own(shuffle, caplog):
    """One long line of an LM text (a paragraph) stopped the LM's training, or its validation,
    when the loader was built."""
    lengths = [5, 40, 6, 7, 39, 4]
    with caplog.at_level("WARNING"):
        batches = list(TokenBatchSampler(lengths, max_tokens=20, shuffle=shuffle, seed=1))
    assert "2 sentences are longer than max_tokens 20 (the longest: 40 tokens + <eos>)" in caplog.text
    assert sorted(i for batch in batches for i in batch) == list(range(6))
    assert [1] in batches and [4] in batches
    assert all(max(lengths[i] + 1 for i in b) * len(b) <= 20 for b in batches if b not in ([1], [4]))


@pytest.mark.parametrize("world_size", [2, 3])
def test_token_batch_sampler_gives_every_rank_as_many_batches(world_size):
    """DDP ranks step together: an uneven shard would leave its peers' last batches untrained."""
    lengths = [(7 * i) % 23 + 1 for i in range(200)]
    whole = list(TokenBatchSampler(lengths, 70, True, 3))
    assert len(whole) % world_size  # 43 batches: uneven shards unless padded
    shards = [list(TokenBatchSampler(lengths, 70, True, 3, world_size, rank)) for rank in range(world_size)]
    assert {len(shard) for shard in shards} == {-(-len(whole) // world_size)}
    padding = whole[:world_size * len(shards[0]) - len(whole)]  # the epoch's first batches again
    assert sorted(b for shard in shards for b in shard) == sorted(whole + padding)
    # fewer batches (2) than ranks: each rank still trains
    few = [list(TokenBatchSampler([3] * 4, 8, True, 0, world_size, rank)) for rank in range(world_size)]
    assert [len(shard) for shard in few] == [1] * world_size
    # evaluation: every sentence once over the ranks, nothing repeated
    evaluated = [i for rank in range(world_size) for b in TokenBatchSampler(lengths, 70, False, 3, world_size, rank)
                 for i in b]
    assert sorted(evaluated) == list(range(200))


def test_sentences_outside_the_tokenizer_are_dropped_and_counted(tmp_path, caplog):
    tokenizer = train_tokenizer(["THE CAT SEES A DOG", "A RED FISH"], tmp_path / "lang", vocab_size=40,
                                model_type="char")
    with caplog.at_level(logging.WARNING):
        ids = tokenize_sentences(["THE DOG", "the dog", "A CAT 3", "   ", "SEE A FISH"], tokenizer)
    assert [tokenizer.decode(s) for s in ids] == ["THE DOG", "SEE A FISH"]
    assert "dropped 1 sentences that tokenise to nothing" in caplog.text
    assert "dropped 2 sentences with characters outside the tokenizer" in caplog.text and "'the dog'" in caplog.text
    with pytest.raises(ValueError, match="no LM sentences left .* 2 with characters outside"):
        tokenize_sentences(["lower case", "digits 42"], tokenizer)
    # evaluation (validation, perplexity) keeps them: the perplexity covers the whole text
    kept = tokenize_sentences(["THE DOG", "the dog"], tokenizer, drop_unknown=False)
    assert len(kept) == 2 and tokenizer.unk_id in kept[1]
    # the reserved symbols written out: a blank or an <eos> inside a sentence, which stopped the
    # LM's training at the batch that held it (and a perplexity with a traceback)
    for drop_unknown in (True, False):
        ids = tokenize_sentences(["THE CAT", "THE <sos/eos> CAT", "A <blk> DOG"], tokenizer, drop_unknown=drop_unknown)
        assert [tokenizer.decode(s) for s in ids] == ["THE CAT"]
    assert "dropped 2 sentences that spell the tokenizer's reserved symbols" in caplog.text


# ------------------------------------------------------------------ training through the trainer
GRAMMAR_SUBJECTS = ["THE CAT", "A DOG", "MY BIRD"]
GRAMMAR_VERBS = ["SEES", "LIKES"]
GRAMMAR_OBJECTS = ["THE SUN", "A TREE", "RED FISH"]


@pytest.fixture(scope="module")
def text_corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("lm_text")
    sentences = [f"{s} {v} {o}" for s in GRAMMAR_SUBJECTS for v in GRAMMAR_VERBS for o in GRAMMAR_OBJECTS]
    (root / "train.txt").write_text("\n".join(sentences) + "\n")
    (root / "extra.txt").write_text("\n".join(sentences[:4]) + "\n")
    (root / "valid.txt").write_text("\n".join(sentences[::5]) + "\n")
    train_tokenizer(sentences, root / "lang", vocab_size=40, model_type="char")
    return root


def _config(root: Path, max_updates: int) -> dict:
    return {"task": "lm",
            "lm": {"name": "lstm", "embed_dim": 32, "hidden_dim": 64, "layers": 1, "dropout": 0.1},
            "data": {"tokenizer": str(root / "lang/bpe.model"), "train_text": str(root / "train.txt"),
                     "extra_text": [str(root / "extra.txt")], "valid_text": str(root / "valid.txt"),
                     "max_tokens": 200},
            "optim": {"lr": 1.0e-2, "weight_decay": 0.0},
            "scheduler": {"name": "polynomial", "warmup_ratio": 0.05},
            "trainer": {"max_updates": max_updates, "checkpoint_every": 4, "log_every": 10, "valid_every": 0,
                        "seed": 1, "num_threads": 1}}


def _train(root: Path, exp: str, max_updates: int) -> subprocess.CompletedProcess:
    """As the recipe runs it: `python -m sslasr.bin.train --config lm.yaml`."""
    (root / f"{exp}.yaml").write_text(yaml.safe_dump(_config(root, max_updates)))
    return subprocess.run([sys.executable, "-m", "sslasr.bin.train", "--config", str(root / f"{exp}.yaml"),
                           "--exp-dir", str(root / exp)], capture_output=True, text=True, timeout=300)


class _Killed(Exception):
    pass


def _train_in_process(root: Path, exp: str, max_updates: int, die_at_batch: int = 0) -> None:
    """The trainer in this process (fast); `die_at_batch` raises inside that training batch, as
    a kill would stop the run there (checkpoints written before it remain)."""
    cfg = _config(root, max_updates)
    seed_everything(cfg["trainer"]["seed"])
    task = LmTask(cfg)
    if die_at_batch:
        forward, calls = task.forward, []

        def dying_forward(model, batch):
            calls.append(1)
            if len(calls) == die_at_batch:
                raise _Killed
            return forward(model, batch)

        task.forward = dying_forward
    Trainer(cfg, task, root / exp, init_distributed()).fit()


@pytest.fixture(scope="module")
def trained(text_corpus):
    result = _train(text_corpus, "lm", max_updates=150)
    assert result.returncode == 0, result.stderr[-3000:]
    return text_corpus / "lm"


def test_overfit_lm_reaches_low_perplexity(trained, text_corpus):
    """18 grammar sentences: the LM learns them almost by heart (uniform over the ~20 letters
    would be perplexity ~20; the validation log reports exp(mean NLL))."""
    log = (trained / "train.rank0.log").read_text()
    valid = [line for line in log.splitlines() if "valid update 150" in line][-1]
    perplexity = float(valid.split("perplexity=")[1].split()[0])
    assert perplexity < 1.6, valid
    assert math.exp(float(valid.split(" loss=")[1].split()[0])) == pytest.approx(perplexity, rel=1e-3)
    lm = load_lm(trained / "model_final.pt")
    assert not lm.training
    from sslasr.data.tokenizer import Tokenizer
    tokenizer = Tokenizer(text_corpus / "lang")
    seen = tokenizer.encode("THE CAT SEES A TREE")
    unseen = tokenizer.encode("TREE A SEES CAT THE")
    scores = lm.score_sequences([seen, unseen])
    assert scores[0] > scores[1] + 10  # the grammar's word order is much more likely


def test_perplexity_cli_matches_the_validation(trained, text_corpus, capsys):
    out = trained / "perplexity.json"
    lm_perplexity.main(["--lm", str(trained / "model_final.pt"), "--text", str(text_corpus / "valid.txt"),
                        "--out", str(out)])
    result = json.loads(out.read_text())
    log = (trained / "train.rank0.log").read_text()
    valid = [line for line in log.splitlines() if "valid update 150" in line][-1]
    assert result["perplexity"] == pytest.approx(float(valid.split("perplexity=")[1].split()[0]), rel=1e-3)
    assert result["num_sentences"] == len(read_sentences(text_corpus / "valid.txt")) == 4
    (trained / "blank.txt").write_text("\n \n")
    for text, said in ((trained / "missing.txt", "does not exist"), (trained / "blank.txt", "holds no sentences")):
        with pytest.raises(SystemExit):  # a usage error naming the file, not a traceback
            lm_perplexity.main(["--lm", str(trained / "model_final.pt"), "--text", str(text)])
        assert said in capsys.readouterr().err


def test_load_lm_rejects_other_checkpoints(tmp_path):
    torch.save({"model": {}, "config": {"task": "asr"}}, tmp_path / "asr.pt")
    with pytest.raises(ValueError, match="not a language-model checkpoint"):
        load_lm(tmp_path / "asr.pt")


def test_lm_training_resumes_exactly_after_kill(text_corpus, caplog):
    """Killed during update 7 (last checkpoint: update 4), resumed, it ends with the very weights
    of an uninterrupted run; 22 sentences make ~3 batches an epoch, so the resumed part crosses
    epoch boundaries and relies on the sampler replaying its seeded order."""
    with pytest.raises(_Killed):
        _train_in_process(text_corpus, "killed", 10, die_at_batch=7)
    assert torch.load(text_corpus / "killed/checkpoint_last.pt", weights_only=False)["num_updates"] == 4
    with caplog.at_level(logging.INFO, logger="sslasr.train.trainer"):
        _train_in_process(text_corpus, "killed", 10)
    assert "at update 4 (epoch 1, batch 1)" in caplog.text  # resumed mid-epoch, not restarted
    _train_in_process(text_corpus, "straight", 10)
    a = torch.load(text_corpus / "killed/model_final.pt", weights_only=False)["model"]
    b = torch.load(text_corpus / "straight/model_final.pt", weights_only=False)["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    last = torch.load(text_corpus / "killed/checkpoint_last.pt", weights_only=False)
    assert last["num_updates"] == 10 and last["epoch"] >= 2


def test_lm_text_lines_end_at_newline_only_and_a_bom_is_dropped(tmp_path: Path):
    """Words end one space apart: sentencepiece splits words at spaces only, the lexicon and
    scoring at any whitespace (a no-break space made one sentencepiece word of two lexicon words)."""
    text = tmp_path / "more.txt"
    text.write_text("\ufeffHELLO WORLD\r\nONE\u2028TWO\n\nTHREE\u00a0FOUR\tFIVE  SIX\nSEVEN\rEIGHT\n", encoding="utf-8",
                    newline="")
    # a lone \r is whitespace inside its sentence (universal newlines made two sentences of it)
    assert read_sentences(text) == ["HELLO WORLD", "ONE TWO", "THREE FOUR FIVE SIX", "SEVEN EIGHT"]
