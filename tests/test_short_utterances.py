"""Utterances shorter than a frontend's receptive field (evaluation splits keep every utterance):
no encoder frames, left out of the loss before the encoder, an empty hypothesis when decoded,
alone in a batch or beside longer ones, for every frontend and head."""

from pathlib import Path

import pytest
import torch

from sslasr.decoding.fusion import decode_options
from sslasr.models.asr import build_asr_model
from sslasr.models.blocks.conformer import MaskedBatchNorm1d
from sslasr.models.lm import build_lm
from sslasr.models.w2vbert import W2vBertPretrainConfig, W2vBertPretrainer
from sslasr.utils.config import load_configs

CONF = Path(__file__).resolve().parents[1] / "egs" / "minisynth" / "conf"
VOCAB = 30


def _model(frontend: str, head: str = "ctc"):
    files = [CONF / f"frontend_{frontend}.yaml", CONF / f"finetune_{head}.yaml"]
    if (CONF / f"finetune_{frontend}.yaml").exists():
        files.append(CONF / f"finetune_{frontend}.yaml")
    cfg = load_configs(files)
    torch.manual_seed(0)
    return build_asr_model(cfg, VOCAB), cfg


def _batches(frontend: str):
    """A long utterance beside one shorter than the receptive field, and the short one alone."""
    torch.manual_seed(1)
    if frontend == "w2vbert":  # fbank frames; the conv2d subsampling reads 7
        long, short = torch.randn(300, 80), torch.randn(4, 80)
    else:  # samples; the tiny conv extractor reads 345
        long, short = torch.randn(8000), torch.randn(100)
    both = torch.zeros((2,) + long.shape)
    both[0], both[1, :len(short)] = long, short
    return (both, torch.tensor([len(long), len(short)])), (short.unsqueeze(0), torch.tensor([len(short)]))


@pytest.mark.parametrize("frontend", ["wav2vec2", "hubert", "wavlm", "w2vbert"])
def test_short_rows_have_no_frames_and_change_nothing_else(frontend):
    model, _ = _model(frontend)
    (both, both_lens), (short, short_lens) = _batches(frontend)
    # the first updates run the Conformer's BatchNorm on such batches in training mode
    model.train()
    model.encoder(short, short_lens)
    model.eval()
    with torch.no_grad():
        together = model.encoder(both, both_lens)
        alone = model.encoder(both[:1], both_lens[:1])
        nothing = model.encoder(short, short_lens)  # failed: shorter than the convolution
    frames = int(alone.lengths[0])
    assert together.lengths.tolist() == [frames, 0] and nothing.lengths.tolist() == [0]
    assert torch.allclose(together.hidden[0, :frames], alone.hidden[0, :frames], atol=1e-5)
    assert torch.isfinite(alone.hidden).all()  # BatchNorm's averages did not take 0/0


@pytest.mark.parametrize("frontend, dropout, amp", [("wavlm", "transformer.attention_dropout", None),
                                                    ("wavlm", "transformer.attention_dropout", torch.bfloat16),
                                                    ("w2vbert", "conformer.attention_dropout", None),
                                                    ("w2vbert", "conformer.attention_dropout", torch.bfloat16)])
def test_an_encoder_trained_beside_a_frameless_row_keeps_finite_gradients(frontend, dropout, amp):
    """The model leaves such rows out before the encoder; the encoder itself must not turn one
    into NaN either (WavLM pretraining on a manifest made with --min-duration 0): its padded
    keys were −inf, and CPU training attention's softmax over a row of only those was NaN; under
    autocast, float32's lowest value cast to bf16 was −inf again."""
    cfg = load_configs([CONF / f"frontend_{frontend}.yaml", CONF / "finetune_ctc.yaml"],
                       [f"frontend.encoder.{dropout}=0.1"])
    torch.manual_seed(0)
    encoder = build_asr_model(cfg, VOCAB).encoder.train()
    (both, both_lens), _ = _batches(frontend)
    with torch.autocast("cpu", dtype=amp or torch.bfloat16, enabled=amp is not None):
        out = encoder(both, both_lens)
    out.hidden[0, : int(out.lengths[0])].float().pow(2).mean().backward()
    bad = [name for name, p in encoder.named_parameters() if p.grad is not None and not torch.isfinite(p.grad).all()]
    assert not bad, bad


@pytest.mark.parametrize("frontend", ["wavlm", "w2vbert"])
def test_a_short_row_leaves_the_gradient_as_without_it(frontend, caplog):
    """Beside a longer one, a frameless row's attention had no keys: NaN reached every gradient."""
    model, _ = _model(frontend)
    model.eval()  # no dropout: the two passes compute the same function
    (both, both_lens), (short, short_lens) = _batches(frontend)
    tokens = [[1, 2, 3], [4]]
    grads = []
    for inputs, lens, toks in ((both, both_lens, tokens), (both[:1], both_lens[:1], tokens[:1])):
        model.zero_grad()
        with caplog.at_level("WARNING"):
            model(inputs, lens, toks).backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    assert torch.isfinite(grads[0]).all() and torch.allclose(grads[0], grads[1], atol=1e-5)
    assert "1 of 2 utterances have no encoder frames" in caplog.text
    model.zero_grad()
    model(short, short_lens, tokens[1:]).backward()  # only frameless rows: a zero loss that steps
    assert all(p.grad is None or not p.grad.any() for p in model.parameters())


@pytest.mark.parametrize("frontend,head", [("wav2vec2", "ctc"), ("wav2vec2", "attention"),
                                           ("wav2vec2", "transducer"), ("w2vbert", "ctc")])
def test_every_planned_decoding_method_gives_a_short_row_an_empty_hypothesis(frontend, head):
    """The methods the recipe's decode plan lists, with and without the LM (no plan lists a lexicon
    method here: ctc_lexicon's frameless rows are not covered by this test)."""
    model, cfg = _model(frontend, head)
    model.eval()
    lm = build_lm(load_configs([CONF / "lm.yaml"])["lm"], VOCAB).eval()
    (both, both_lens), (short, short_lens) = _batches(frontend)
    plan = cfg["decode"]
    methods = [(m, None) for m in plan["methods"]] + [(m, lm) for m in plan.get("lm_methods", [])]
    assert len(methods) >= 3
    for method, with_lm in methods:
        options = decode_options(plan, lm=with_lm, lm_weight=0.5 if with_lm else 0.0)
        together = model.decode(both, both_lens, method, options)
        assert together[1] == [] and together[0] == model.decode(both[:1], both_lens[:1], method, options)[0]
        assert model.decode(short, short_lens, method, options) == [[]]


def test_w2vbert_pretraining_still_refuses_frameless_utterances():
    """Its span masks and contrastive targets need frames: a clear error, as before."""
    model, cfg = _model("w2vbert")
    (both, both_lens), _ = _batches("w2vbert")
    pretrainer = W2vBertPretrainer(model.encoder.cfg, W2vBertPretrainConfig(contrastive_layers=2))
    with pytest.raises(ValueError, match="receptive field"):
        pretrainer(both, both_lens)


def test_masked_batch_norm_keeps_its_averages_over_a_batch_without_real_frames():
    norm = MaskedBatchNorm1d(4).train()
    x = torch.randn(2, 5, 4)
    norm(x, torch.zeros(2, 5, dtype=torch.bool))
    mean, var, seen = norm.running_mean.clone(), norm.running_var.clone(), int(norm.num_batches_tracked)
    out = norm(x, torch.ones(2, 5, dtype=torch.bool))
    assert not out.any()
    assert torch.equal(norm.running_mean, mean) and torch.equal(norm.running_var, var)
    assert int(norm.num_batches_tracked) == seen == 1


def test_the_loss_is_a_mean_over_the_tokens_it_scores():
    """Training and validation weights count the tokens of rows with frames only (the validation
    loss of a batch with a frameless row came out low)."""
    from sslasr.train.tasks import AsrFinetuneTask
    model, _ = _model("wav2vec2")
    model.eval()
    task = AsrFinetuneTask.__new__(AsrFinetuneTask)  # forward reads only the model it is given
    (both, both_lens), _ = _batches("wav2vec2")
    batch = {"inputs": both, "input_lens": both_lens, "tokens": [[1, 2, 3], [4, 5, 6, 7, 8]]}
    with torch.no_grad():
        loss, _, weight = task.forward(model, batch)
        alone = model(both[:1], both_lens[:1], [[1, 2, 3]])
    assert weight == 3 and loss.item() == pytest.approx(alone.item() / 3, rel=1e-5)
