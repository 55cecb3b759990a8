"""Import of transformers checkpoints (sslasr.models.hf_import, `sslasr import-hf`, `--init-from`).

Random-initialised transformers models at small configs are saved with save_pretrained, imported,
and must give the same hidden states as transformers layer by layer (eval mode, padded batches
with attention masks; for group-norm extractors, each utterance as transformers gives it alone). transformers' `hidden_states` are the input of layer 1 and each layer's
output; the stable-layer-norm (pre-LN) variants apply the encoder's final LayerNorm only to
`last_hidden_state`, where ours applies it to the last entry of `layers`.
"""

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
import yaml
from lhotse import CutSet, Recording

transformers = pytest.importorskip("transformers")

from hf_reference import transformers_outputs  # noqa: E402
from recipe_smoke import SMOKE, recipe_copy, recipe_with_data, run_recipe  # noqa: E402
from sslasr import cli  # noqa: E402
from sslasr.models.asr import build_asr_model, load_encoder_weights  # noqa: E402
from sslasr.models.hf_import import (  # noqa: E402
    checked_frontend_name, fill_mask_embedding, import_hf, read_state_dict, wav2vec2_from_hf, weight_norm_pos_conv)
from sslasr.models.wav2vec2 import Wav2Vec2Encoder, Wav2Vec2EncoderConfig  # noqa: E402
from sslasr.train.distributed import DistInfo  # noqa: E402
from sslasr.train.tasks import _DataMixin  # noqa: E402

torch.set_num_threads(1)

# Unequal conv widths and kernels that are not multiples of their strides catch transposed or
# misplaced tensors; 3 layers (post-LN) show that every layer's output is compared.
SMALL = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=48,
             conv_dim=(16, 24, 32), conv_kernel=(10, 7, 4), conv_stride=(5, 4, 4),
             num_conv_pos_embeddings=8, num_conv_pos_embedding_groups=4)
LENGTHS = [4000, 2650]  # the second utterance padded


def _randomise_norms(model: torch.nn.Module) -> None:
    """transformers initialises norms to γ=1, β=0 and conv biases to 0, under which a swapped
    or dropped norm would go unnoticed: give every such parameter random values."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                param.copy_(param + 0.3 * torch.randn(param.shape, generator=generator))


def _save(model, path: Path, do_normalize=None) -> Path:
    _randomise_norms(model)
    model.save_pretrained(path)
    if do_normalize is not None:
        transformers.Wav2Vec2FeatureExtractor(do_normalize=do_normalize).save_pretrained(path)
    return path


def _batch():
    generator = torch.Generator().manual_seed(0)
    waveform = torch.randn(len(LENGTHS), max(LENGTHS), generator=generator)
    lengths = torch.tensor(LENGTHS)
    keep = torch.arange(waveform.shape[1])[None] < lengths[:, None]
    return waveform * keep, lengths, keep.long()


def _our_encoder(model_dir: Path):
    imported = import_hf(model_dir)
    encoder = Wav2Vec2Encoder(Wav2Vec2EncoderConfig.from_dict(imported.frontend["encoder"]))
    encoder.load_state_dict(imported.encoder_state)
    return imported, encoder.eval()


def _assert_hidden_states_match(base_model, encoder, pre_ln: bool) -> None:
    waveform, lengths, attention_mask = _batch()
    base_model.eval()
    with torch.no_grad():
        ref = transformers_outputs(base_model, waveform, lengths, attention_mask)
        ours = encoder(waveform, lengths, return_all=True)
    layers = base_model.config.num_hidden_layers
    assert len(ours.layers) == len(ref.hidden_states) == layers + 1
    assert ours.lengths.tolist() == base_model._get_feat_extract_output_lengths(lengths).tolist()
    valid = ~ours.padding_mask
    for i in range(layers):
        torch.testing.assert_close(ours.layers[i][valid], ref.hidden_states[i][valid], atol=1e-4, rtol=0,
                                   msg=lambda m: f"layer {i}: {m}")
    if not pre_ln:  # post-LN: the last layer's output is the final state
        torch.testing.assert_close(ref.hidden_states[-1], ref.last_hidden_state)
    torch.testing.assert_close(ours.layers[-1][valid], ref.last_hidden_state[valid], atol=1e-4, rtol=0)
    torch.testing.assert_close(ours.hidden[valid], ref.last_hidden_state[valid], atol=1e-4, rtol=0)


# ---------------------------------------------------------------------- parity with transformers
def test_wav2vec2_post_ln_group_norm_matches_transformers(tmp_path):
    torch.manual_seed(0)
    model = transformers.Wav2Vec2Model(transformers.Wav2Vec2Config(**SMALL, feat_extract_norm="group"))
    imported, encoder = _our_encoder(_save(model, tmp_path / "w2v", do_normalize=False))
    cfg = imported.frontend
    assert cfg["name"] == "wav2vec2"
    assert cfg["encoder"]["conv_layers"] == [[16, 10, 5], [24, 7, 4], [32, 4, 4]]
    assert cfg["encoder"]["conv_norm"] == "group" and not cfg["encoder"]["transformer"]["layer_norm_first"]
    assert imported.data == {"normalize_waveform": False}
    _assert_hidden_states_match(model, encoder, pre_ln=False)


def test_wav2vec2_stable_layer_norm_with_layer_norm_extractor_matches_transformers(tmp_path):
    torch.manual_seed(0)
    config = transformers.Wav2Vec2Config(**SMALL, feat_extract_norm="layer", do_stable_layer_norm=True,
                                         conv_bias=True)
    model = transformers.Wav2Vec2Model(config)
    imported, encoder = _our_encoder(_save(model, tmp_path / "w2v_large", do_normalize=True))
    enc = imported.frontend["encoder"]
    assert enc["conv_norm"] == "layer" and enc["conv_bias"] and enc["transformer"]["layer_norm_first"]
    assert imported.data == {"normalize_waveform": True, "normalize_eps": 1e-7}
    _assert_hidden_states_match(model, encoder, pre_ln=True)


def test_wav2vec2_for_pretraining_skips_its_heads_and_logs_them(tmp_path, caplog):
    torch.manual_seed(0)
    model = transformers.Wav2Vec2ForPreTraining(transformers.Wav2Vec2Config(**SMALL))
    with caplog.at_level(logging.INFO, logger="sslasr.models.hf_import"):
        imported, encoder = _our_encoder(_save(model, tmp_path / "w2v_pt"))
    skipped = " ".join(r.getMessage() for r in caplog.records)
    for head in ["quantizer.codevectors", "quantizer.weight_proj.weight", "project_hid.weight", "project_q.bias"]:
        assert head in skipped
    # no preprocessor_config.json: transformers' feature-extractor default, said in the log
    assert imported.data == {"normalize_waveform": True, "normalize_eps": 1e-7} and "states no do_normalize" in caplog.text
    _assert_hidden_states_match(model.wav2vec2, encoder, pre_ln=False)


@pytest.mark.parametrize("classifier", ["Wav2Vec2ForSequenceClassification", "HubertForSequenceClassification",
                                        "WavLMForSequenceClassification"])
def test_sequence_classification_checkpoints_import_their_base_model(tmp_path, caplog, classifier):
    """A published emotion or keyword model as a starting point: wav2vec 2.0's and HuBERT's were
    refused (their head tensors unknown) while WavLM's imported."""
    torch.manual_seed(0)
    kind = classifier.replace("ForSequenceClassification", "")
    config = getattr(transformers, f"{kind}Config")(**SMALL, use_weighted_layer_sum=True, num_labels=3)
    model = getattr(transformers, classifier)(config)
    with caplog.at_level(logging.INFO, logger="sslasr.models.hf_import"):
        imported = import_hf(_save(model, tmp_path / kind))
    skipped = " ".join(r.getMessage() for r in caplog.records)
    assert all(head in skipped for head in ("projector.weight", "classifier.bias", "layer_weights"))
    assert imported.frontend["name"] == kind.lower()
    asr = build_asr_model({"frontend": imported.frontend, "head": {"name": "ctc"}}, vocab_size=5)
    asr.encoder.load_state_dict(imported.encoder_state)  # every encoder tensor, nothing else
    if kind != "WavLM":  # (WavLM's parity: test_wavlm.py)
        _assert_hidden_states_match(getattr(model, kind.lower()), _our_encoder(tmp_path / kind)[1], pre_ln=False)


def test_a_model_of_another_sample_rate_is_refused(tmp_path):
    model_dir = _save(transformers.Wav2Vec2Model(transformers.Wav2Vec2Config(**SMALL)), tmp_path / "w2v8k")
    transformers.Wav2Vec2FeatureExtractor(sampling_rate=8000).save_pretrained(model_dir)
    with pytest.raises(ValueError, match="expects 8000 Hz audio; the recipes feed 16 kHz"):
        import_hf(model_dir)


def test_the_feature_extractor_saved_inside_a_whole_processor_is_read(tmp_path):
    """transformers 5 saves a processor as one processor_config.json (no preprocessor_config.json):
    its do_normalize false was read as the default true, and its sampling rate went unchecked."""
    model_dir = _save(transformers.Wav2Vec2Model(transformers.Wav2Vec2Config(**SMALL)), tmp_path / "w2v")
    (tmp_path / "vocab.json").write_text(json.dumps({"<pad>": 0, "a": 1, "|": 2}))
    tokenizer = transformers.Wav2Vec2CTCTokenizer(str(tmp_path / "vocab.json"))
    for do_normalize, rate in ((False, 16000), (True, 8000)):
        extractor = transformers.Wav2Vec2FeatureExtractor(do_normalize=do_normalize, sampling_rate=rate)
        transformers.Wav2Vec2Processor(feature_extractor=extractor, tokenizer=tokenizer).save_pretrained(model_dir)
        if not (model_dir / "processor_config.json").is_file():
            pytest.skip("this transformers saves a processor's feature extractor in preprocessor_config.json")
        assert not (model_dir / "preprocessor_config.json").exists()
        if rate == 16000:
            assert import_hf(model_dir).data == {"normalize_waveform": False}
        else:
            with pytest.raises(ValueError, match="processor_config.json: the model expects 8000 Hz audio"):
                import_hf(model_dir)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_a_plain_positional_weight_in_half_precision_keeps_its_value(dtype):
    """g = ‖w‖ taken in fp16 / bf16 scaled every tap by up to 1e-3 once g·v/‖v‖ ran in float32."""
    weight = torch.randn(8, 2, 5).to(dtype)
    state = weight_norm_pos_conv({"conv.weight": weight}, "conv.")
    g, v = state["conv.parametrizations.weight.original0"], state["conv.parametrizations.weight.original1"]
    rebuilt = g * v.float() / torch.linalg.vector_norm(v.float(), dim=(0, 1), keepdim=True)
    assert torch.allclose(rebuilt, weight.float(), rtol=1e-6, atol=0)


def test_half_a_weight_norm_pair_is_named():
    with pytest.raises(ValueError, match="needs both conv.weight_g and conv.weight_v; the checkpoint lacks conv.weight_v"):
        weight_norm_pos_conv({"conv.weight_g": torch.ones(1, 1, 5)}, "conv.")
    # both the old and the new names: which the model used cannot be told (the old pair was taken)
    both = {"conv.weight_g": torch.ones(1, 1, 5), "conv.weight_v": torch.ones(4, 2, 5),
            "conv.parametrizations.weight.original0": torch.ones(1, 1, 5)}
    with pytest.raises(ValueError, match="stored twice, as conv.weight_g and conv.parametrizations.weight.original0"):
        weight_norm_pos_conv(both, "conv.")


@pytest.mark.parametrize("feat_proj_layer_norm", [True, False])
def test_hubert_matches_transformers(tmp_path, feat_proj_layer_norm):
    torch.manual_seed(0)
    config = transformers.HubertConfig(**SMALL, feat_proj_layer_norm=feat_proj_layer_norm)
    model = transformers.HubertModel(config)
    imported, encoder = _our_encoder(_save(model, tmp_path / "hubert"))
    assert imported.frontend["name"] == "hubert"
    assert imported.frontend["encoder"]["feature_layer_norm"] is feat_proj_layer_norm
    assert isinstance(encoder.feature_norm, torch.nn.LayerNorm) is feat_proj_layer_norm
    _assert_hidden_states_match(model, encoder, pre_ln=False)
    # the registry's hubert frontend builds the same encoder from the imported config
    asr = build_asr_model({"frontend": imported.frontend, "head": {"name": "ctc"}}, vocab_size=5)
    asr.encoder.load_state_dict(imported.encoder_state)


# ---------------------------------------------------------------------- key styles and errors
@pytest.fixture(scope="module")
def saved_wav2vec2(tmp_path_factory):
    torch.manual_seed(0)
    model = transformers.Wav2Vec2ForCTC(transformers.Wav2Vec2Config(**SMALL, vocab_size=12))
    return _save(model, tmp_path_factory.mktemp("w2v_ctc") / "model")


def _converted(model_dir: Path, state):
    config = json.loads((model_dir / "config.json").read_text())
    return wav2vec2_from_hf(config, state)


def test_old_weight_norm_names_and_plain_weight_give_the_same_encoder(saved_wav2vec2):
    state = read_state_dict(saved_wav2vec2)
    assert "lm_head.weight" in state  # a *ForCTC checkpoint: the CTC head is skipped
    _, reference = _converted(saved_wav2vec2, state)
    prefix = "wav2vec2.encoder.pos_conv_embed.conv."
    g, v = state[prefix + "parametrizations.weight.original0"], state[prefix + "parametrizations.weight.original1"]
    old = {k: t for k, t in state.items() if ".parametrizations." not in k}
    _, from_old = _converted(saved_wav2vec2, {**old, prefix + "weight_g": g, prefix + "weight_v": v})
    for key in reference:
        assert torch.equal(from_old[key], reference[key]), key
    # a checkpoint with the weight already folded: same conv weight g·v/‖v‖
    weight = g * v / torch.linalg.vector_norm(v, dim=(0, 1), keepdim=True)
    _, from_plain = _converted(saved_wav2vec2, {**old, prefix + "weight": weight})
    encoder = Wav2Vec2Encoder(Wav2Vec2EncoderConfig.from_dict(_converted(saved_wav2vec2, state)[0]["encoder"]))
    encoder.load_state_dict(from_plain)
    expected = Wav2Vec2Encoder(encoder.cfg)
    expected.load_state_dict(reference)
    torch.testing.assert_close(encoder.transformer.pos_conv.conv.weight, expected.transformer.pos_conv.conv.weight)


def test_extra_missing_and_misshaped_tensors_are_errors_naming_them(saved_wav2vec2):
    state = read_state_dict(saved_wav2vec2)
    with pytest.raises(ValueError, match=r"1 unmapped \(no rule matches\): encoder.layers.0.attention.rotary.weight$"):
        _converted(saved_wav2vec2, {**state, "wav2vec2.encoder.layers.0.attention.rotary.weight": torch.zeros(2)})
    with pytest.raises(ValueError, match=r"1 unexpected: encoder.layers.3.final_layer_norm.bias$"):
        _converted(saved_wav2vec2, {**state, "wav2vec2.encoder.layers.3.final_layer_norm.bias": torch.zeros(32)})
    with pytest.raises(ValueError, match=r"no known head .*\['speaker_head.weight'\]"):
        _converted(saved_wav2vec2, {**state, "speaker_head.weight": torch.zeros(2, 32)})
    missing = {k: t for k, t in state.items() if k != "wav2vec2.encoder.layers.1.feed_forward.output_dense.bias"}
    with pytest.raises(ValueError, match=r"1 missing: transformer.layers.1.feed_forward.output.bias$"):
        _converted(saved_wav2vec2, missing)
    misshaped = {**state, "wav2vec2.feature_projection.projection.weight": torch.zeros(32, 16)}
    with pytest.raises(ValueError, match=r"1 shape mismatch: feature_projection.projection.weight \(checkpoint \(32, 16\), model \(32, 32\)\)$"):
        _converted(saved_wav2vec2, misshaped)


def test_unsupported_options_and_converters_are_clear_errors(saved_wav2vec2, tmp_path, monkeypatch):
    config = json.loads((saved_wav2vec2 / "config.json").read_text())
    state = read_state_dict(saved_wav2vec2)
    with pytest.raises(ValueError, match="add_adapter=True is not supported"):
        wav2vec2_from_hf({**config, "add_adapter": True}, state)
    with pytest.raises(ValueError, match="hidden_act='relu' is not supported"):
        wav2vec2_from_hf({**config, "hidden_act": "relu"}, state)
    with pytest.raises(ValueError, match="layer_norm_eps=1e-06"):
        wav2vec2_from_hf({**config, "layer_norm_eps": 1e-6}, state)

    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({**config, "model_type": "whisper"}))
    with pytest.raises(ValueError, match="model_type 'whisper' has no converter"):
        import_hf(other)
    # a converter module that is not (yet) in the checkout
    from sslasr.models import hf_import
    monkeypatch.setitem(hf_import._CONVERTER_MODULES, "wavlm", "sslasr.models.no_such_module")
    (other / "config.json").write_text(json.dumps({**config, "model_type": "wavlm"}))
    with pytest.raises(ValueError, match="sslasr.models.no_such_module does not exist"):
        import_hf(other)
    with pytest.raises(FileNotFoundError, match="no config.json"):
        import_hf(tmp_path / "nowhere")


def test_a_checkpoint_stage_4_would_refuse_is_refused_before_the_data_stages(saved_wav2vec2, tmp_path):
    """--init-from read only config.json's model_type up front: an option the import refuses (an
    adapter, as MMS-1b-all has) stopped the recipe at stage 4, after hours of data stages; a
    config without a key the architecture needs, or a weights file cut short, gave a traceback."""
    config = json.loads((saved_wav2vec2 / "config.json").read_text())
    model_dir = tmp_path / "adapter"
    shutil.copytree(saved_wav2vec2, model_dir)
    (model_dir / "config.json").write_text(json.dumps({**config, "adapter_attn_dim": 16}))
    with pytest.raises(ValueError, match="adapter_attn_dim=16 is not supported"):
        checked_frontend_name(model_dir)
    recipe = recipe_copy(tmp_path / "recipe")
    refused = run_recipe(recipe, "--init-from", str(model_dir), timeout=120)
    assert refused.returncode == 2, refused.stderr[-2000:]
    assert f"--init-from {model_dir}: adapter_attn_dim=16 is not supported" in refused.stderr
    assert "Traceback" not in refused.stderr and not (recipe / "data").exists()  # stopped before stage 0

    (model_dir / "config.json").write_text(json.dumps({k: v for k, v in config.items() if k != "conv_dim"}))
    with pytest.raises(ValueError, match="config.json \\(wav2vec2\\) has no 'conv_dim', which the architecture needs"):
        checked_frontend_name(model_dir)
    with pytest.raises(ValueError, match="'conv_dim' is missing"):
        import_hf(model_dir)
    (model_dir / "config.json").write_text(json.dumps(config))
    weights = model_dir / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # a download cut short
    with pytest.raises(ValueError, match="model.safetensors: its tensors cannot be read .*a download cut short"):
        import_hf(model_dir)
    assert checked_frontend_name(model_dir) == "wav2vec2"  # config.json alone is read up front


def test_converters_of_other_frontends_are_found_by_module_name(saved_wav2vec2, tmp_path, monkeypatch):
    """wavlm / wav2vec2-bert converters live in their frontends' modules, imported on first use."""
    from sslasr.models import hf_import
    package = tmp_path / "converters"
    package.mkdir()
    (package / "fake_wavlm.py").write_text(
        "def from_hf(config, state_dict):\n"
        "    return {'name': 'wavlm', 'encoder': {'layers': config['num_hidden_layers']}}, "
        "{'n': len(state_dict)}\n")
    (package / "no_converter.py").write_text("x = 1\n")
    monkeypatch.syspath_prepend(str(package))
    config = json.loads((saved_wav2vec2 / "config.json").read_text())
    model_dir = tmp_path / "wavlm"
    shutil.copytree(saved_wav2vec2, model_dir)
    (model_dir / "config.json").write_text(json.dumps({**config, "model_type": "wavlm"}))

    monkeypatch.setitem(hf_import._CONVERTER_MODULES, "wavlm", "fake_wavlm")
    imported = import_hf(model_dir)
    assert imported.frontend == {"name": "wavlm", "encoder": {"layers": 3}}
    assert imported.encoder_state == {"n": len(read_state_dict(saved_wav2vec2))}
    assert imported.source["model_type"] == "wavlm"
    monkeypatch.setitem(hf_import._CONVERTER_MODULES, "wavlm", "no_converter")
    with pytest.raises(ValueError, match="no_converter has no from_hf"):
        import_hf(model_dir)


# ---------------------------------------------------------------------- CLI and fine-tuning init
def test_cli_import_then_build_and_load_matches_transformers(saved_wav2vec2, tmp_path):
    out = tmp_path / "exp" / "pretrain_wav2vec2_imported" / "model_final.pt"
    assert cli.main(["import-hf", str(saved_wav2vec2), "--out", str(out)]) == 0
    checkpoint = torch.load(out, weights_only=False)
    assert checkpoint["imported_from"]["architectures"] == ["Wav2Vec2ForCTC"]
    assert all(k.startswith("encoder.") for k in checkpoint["model"])
    frontend_yaml = yaml.safe_load((out.parent / "frontend.yaml").read_text())
    assert frontend_yaml["frontend"] == checkpoint["config"]["frontend"]

    cfg = {"frontend": frontend_yaml["frontend"], "head": {"name": "ctc"}}
    model = build_asr_model(cfg, vocab_size=7)
    assert load_encoder_weights(model, str(out)) == len(checkpoint["model"])
    model.eval()
    reference = transformers.Wav2Vec2ForCTC.from_pretrained(saved_wav2vec2).wav2vec2.eval()
    waveform, lengths, attention_mask = _batch()
    with torch.no_grad():
        expected = transformers_outputs(reference, waveform, lengths, attention_mask).last_hidden_state
        ours = model.encoder(waveform, lengths)
    valid = ~ours.padding_mask
    torch.testing.assert_close(ours.hidden[valid], expected[valid], atol=1e-4, rtol=0)

    with pytest.raises(SystemExit, match="sslasr import-hf: .*no config.json"):
        cli.main(["import-hf", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x.pt")])


def test_loader_honours_normalize_waveform_from_yaml(tmp_path):
    samples = 0.3 + 0.2 * np.sin(np.arange(8000) / 7.0)  # an offset, as a DC-biased recording
    sf.write(tmp_path / "a.wav", samples.astype(np.float32), 16000)
    CutSet.from_manifests(recordings=[Recording.from_file(tmp_path / "a.wav")]).to_file(tmp_path / "cuts.jsonl.gz")

    class Task(_DataMixin):
        input_type = "waveform"

    for normalize in (True, False):
        task = Task()
        task.cfg = {"data": {"max_duration": 10, "normalize_waveform": normalize}, "trainer": {"seed": 0}}
        batch = next(iter(task._loader(str(tmp_path / "cuts.jsonl.gz"), DistInfo(), train=False)))
        x = batch["inputs"][0]
        if normalize:
            assert abs(x.mean().item()) < 1e-4 and abs(x.std().item() - 1) < 1e-3
        else:
            assert abs(x.mean().item() - 0.3) < 1e-3 and abs(x.std().item() - 0.2 / 2 ** 0.5) < 1e-3


def test_an_imported_model_reads_quiet_audio_as_transformers_feature_extractor_gives_it(tmp_path):
    """A recording at RMS 0.003 (-50 dBFS): with fairseq's variance offset 1e-5 it would reach the
    model 1.4x quieter than through Wav2Vec2FeatureExtractor (1e-7), which the import carries."""
    samples = (0.003 * 2 ** 0.5 * np.sin(np.arange(8000) / 7.0)).astype(np.float32)
    sf.write(tmp_path / "quiet.wav", samples, 16000, subtype="FLOAT")
    CutSet.from_manifests(recordings=[Recording.from_file(tmp_path / "quiet.wav")]).to_file(tmp_path / "cuts.jsonl.gz")
    model_dir = _save(transformers.Wav2Vec2Model(transformers.Wav2Vec2Config(**SMALL)), tmp_path / "w2v",
                      do_normalize=True)
    data = import_hf(model_dir).data

    class Task(_DataMixin):
        input_type = "waveform"

    task = Task()
    task.cfg = {"data": {"max_duration": 10, **data}, "trainer": {"seed": 0}}
    ours = next(iter(task._loader(str(tmp_path / "cuts.jsonl.gz"), DistInfo(), train=False)))["inputs"][0]
    extractor = transformers.Wav2Vec2FeatureExtractor(do_normalize=True)
    expected = extractor(samples, sampling_rate=16000, return_tensors="pt").input_values[0]
    torch.testing.assert_close(ours, expected, atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------------- the recipe with --init-from
def test_recipe_fine_tunes_from_an_imported_checkpoint(tmp_path, prepared_minisynth):
    torch.manual_seed(0)
    config = transformers.Wav2Vec2Config(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        conv_dim=(16, 16, 16, 16), conv_kernel=(10, 8, 4, 4), conv_stride=(5, 4, 4, 4),
        num_conv_pos_embeddings=8, num_conv_pos_embedding_groups=4, feat_extract_norm="layer",
        do_stable_layer_norm=True)
    model_dir = _save(transformers.Wav2Vec2ForPreTraining(config), tmp_path / "tiny-w2v", do_normalize=True)
    recipe = recipe_with_data(tmp_path / "recipe", prepared_minisynth)
    # a recipe that re-initialises its own encoders' top block (as speechocean762's does)
    (recipe / "conf/finetune_wav2vec2.yaml").write_text("finetune: {reinit_top_layers: 1}\n")
    result = run_recipe(recipe, *SMOKE, "--stage", "5", "--init-from", str(model_dir),
                        "--compare-scratch", "false", timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]

    imported = recipe / "exp/pretrain_wav2vec2_imported_tiny-w2v"
    assert (imported / ".done").exists() and (imported / "frontend.yaml").exists()
    assert not (recipe / "exp/pretrain_wav2vec2").exists()  # no pretraining ran
    system = recipe / "exp/ctc_wav2vec2_imported_tiny-w2v_all"
    finetuned = torch.load(system / "model_final.pt", weights_only=False)
    # the architecture is the checkpoint's, fine-tuning knobs (masks) the recipe's
    encoder_cfg = finetuned["config"]["frontend"]["encoder"]
    assert encoder_cfg["conv_layers"] == [[16, 10, 5], [16, 8, 4], [16, 4, 4], [16, 4, 4]]
    assert encoder_cfg["transformer"]["dim"] == 32 and encoder_cfg["conv_norm"] == "layer"
    recipe_ft = yaml.safe_load((recipe / "conf/finetune_ctc.yaml").read_text())
    assert encoder_cfg["mask"] == recipe_ft["frontend"]["encoder"]["mask"]
    assert finetuned["config"]["data"]["normalize_waveform"] is True
    # ... keeps every block of a published model (conf/finetune/imported.yaml)
    assert finetuned["config"]["finetune"]["reinit_top_layers"] == 0
    assert "top 0 of 2 blocks left at random init" in (system / "train.rank0.log").read_text()

    rows = [json.loads(line) for line in (recipe / "exp/results.jsonl").read_text().splitlines()]
    assert {(r["test_set"], r["frontend"], r["pretrained"]) for r in rows} == {
        ("dev", "wav2vec2", True), ("test", "wav2vec2", True)}
    assert all(r["exp"] == "exp/ctc_wav2vec2_imported_tiny-w2v_all" and "--init-from" in r["command"] for r in rows)

    # the checkpoint's family decides the frontend: a contradicting --frontend is refused
    refused = run_recipe(recipe, "--stage", "5", "--init-from", str(model_dir), "--frontend", "hubert", timeout=120)
    assert refused.returncode == 2 and "holds a wav2vec2 model" in refused.stderr


def test_missing_mask_embedding_is_filled_only_when_the_config_never_masks():
    present = {"masked_spec_embed": torch.ones(4)}
    assert fill_mask_embedding(present, {"mask_time_prob": 0.05}, 4) is present
    filled = fill_mask_embedding({}, {"mask_time_prob": 0.0, "mask_feature_prob": 0.0}, 6)
    assert filled["masked_spec_embed"].shape == (6,)
    assert 0 <= float(filled["masked_spec_embed"].min()) and float(filled["masked_spec_embed"].max()) <= 1
    for config in ({"mask_time_prob": 0.05}, {"mask_time_prob": 0.0, "mask_feature_prob": 0.1}):
        with pytest.raises(ValueError, match="lacks masked_spec_embed"):
            fill_mask_embedding({}, config, 6)
    # a config without mask_time_prob takes the caller's default (transformers' Wav2Vec2Bert: 0.05)
    with pytest.raises(ValueError, match="lacks masked_spec_embed"):
        fill_mask_embedding({}, {}, 6, default_mask_time_prob=0.05)
    assert "masked_spec_embed" in fill_mask_embedding({}, {}, 6)
