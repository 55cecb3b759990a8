"""Import published checkpoints in the transformers format onto our encoders.

A transformers model directory holds `config.json` and the weights (`model.safetensors` or
`pytorch_model.bin`, possibly sharded with an `*.index.json`), and for speech models often a
`preprocessor_config.json`. `config["model_type"]` picks the converter:

    wav2vec2       Wav2Vec2Model / Wav2Vec2ForPreTraining / Wav2Vec2ForCTC → Wav2Vec2Encoder
    hubert         HubertModel / HubertForCTC                              → Wav2Vec2Encoder
    wavlm          sslasr.models.wavlm:from_hf
    wav2vec2-bert  sslasr.models.w2vbert:from_hf

A converter is `from_hf(config, state_dict) -> (frontend_cfg, encoder_state)`: `frontend_cfg`
is our YAML schema ({"name": ..., "encoder": {...}}) and `encoder_state` loads strictly into
the encoder that `frontend_cfg` builds. A tensor the converter cannot place, or an encoder
tensor the checkpoint lacks, is an error naming it; the heads of *ForPreTraining / *ForCTC
(quantizer, projections, lm_head) are skipped by name and logged.
"""

import dataclasses
import importlib
import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Tuple, Union

import torch
import yaml

from sslasr.models.blocks.transformer import TransformerConfig
from sslasr.models.state_dicts import listed_names, state_dict_mismatches
from sslasr.models.wav2vec2 import MaskConfig, Wav2Vec2Encoder, Wav2Vec2EncoderConfig
from sslasr.utils.io import save_torch_atomic, write_text_atomic

log = logging.getLogger(__name__)

StateDict = Dict[str, torch.Tensor]
Converter = Callable[[Dict, StateDict], Tuple[Dict, StateDict]]

# model_type → our frontend name (the encoder and pretraining objective it continues with).
FRONTEND_NAMES = {"wav2vec2": "wav2vec2", "hubert": "hubert", "wavlm": "wavlm", "wav2vec2-bert": "w2vbert"}
# Converters living with their frontend, imported on first use.
_CONVERTER_MODULES = {"wavlm": "sslasr.models.wavlm", "wav2vec2-bert": "sslasr.models.w2vbert"}


@dataclass
class ImportedCheckpoint:
    frontend: Dict                                   # {"name": ..., "encoder": {...}}
    encoder_state: StateDict
    data: Dict = field(default_factory=dict)        # e.g. {"normalize_waveform": True}
    source: Dict = field(default_factory=dict)      # where it came from (path, model_type, architectures)


# ------------------------------------------------------------------------- reading a directory
def read_config(model_dir: Union[str, Path]) -> Dict:
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{model_dir}: no config.json (expected a transformers model directory)")
    config = json.loads(path.read_text(encoding="utf-8"))
    if "model_type" not in config:
        raise ValueError(f"{path}: no 'model_type'; cannot tell which converter applies")
    return config


def read_state_dict(model_dir: Union[str, Path]) -> StateDict:
    """All tensors of the directory's weights: safetensors preferred, sharded files merged."""
    model_dir = Path(model_dir)
    for name, loader in (("model.safetensors", _load_safetensors), ("pytorch_model.bin", _load_torch_bin)):
        if (model_dir / name).is_file():
            return _read_weights(loader, model_dir / name)
        index = model_dir / f"{name}.index.json"
        if index.is_file():
            shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
            state: StateDict = {}
            for shard in shards:
                state.update(_read_weights(loader, model_dir / shard))
            return state
    raise FileNotFoundError(f"{model_dir}: no model.safetensors or pytorch_model.bin (nor a sharded index)")


def _read_weights(loader, path: Path) -> StateDict:
    """loader(path), its failure (a cut-short download, a missing shard) naming the file."""
    try:
        return loader(path)
    except Exception as err:  # safetensors and torch.load raise their own types
        raise ValueError(f"{path}: its tensors cannot be read ({type(err).__name__}: {err}); "
                         "a download cut short? fetch it again") from err


def _load_safetensors(path: Path) -> StateDict:
    from safetensors.torch import load_file
    return load_file(str(path))


def _load_torch_bin(path: Path) -> StateDict:
    return torch.load(path, map_location="cpu", weights_only=True)


# transformers' Wav2Vec2FeatureExtractor normalises unless its preprocessor_config.json says not
DEFAULT_DO_NORMALIZE = True
TRANSFORMERS_NORMALIZE_EPS = 1e-7


def read_data_options(model_dir: Union[str, Path], waveform: bool = True) -> Dict:
    """Our `data` options from the saved feature extractor (_feature_extractor_settings). A
    waveform model's normalize_waveform is always written: where the file states no do_normalize
    (some published directories have no such file), transformers' feature-extractor default,
    said in the log; left unset, the model would read audio ~20× smaller than it learnt from
    without a word. Audio at another rate
    than the recipes' 16 kHz is refused."""
    path, preprocessor = _feature_extractor_settings(Path(model_dir))
    rate = preprocessor.get("sampling_rate", 16000)
    if rate != 16000:
        raise ValueError(f"{path}: the model expects {rate} Hz audio; the recipes feed 16 kHz")
    if not waveform:
        return {}
    if "do_normalize" not in preprocessor:
        log.warning("%s states no do_normalize: normalising each utterance, as transformers' "
                    "Wav2Vec2FeatureExtractor does by default (set data.normalize_waveform to change it)",
                    path if path.is_file() else f"{model_dir} has no preprocessor_config.json, which")
    if not preprocessor.get("do_normalize", DEFAULT_DO_NORMALIZE):
        return {"normalize_waveform": False}
    # the variance offset of transformers' zero_mean_unit_var_norm, not fairseq's 1e-5: a quiet
    # recording (RMS 0.003) would otherwise reach the model ~1.4x quieter than through transformers
    return {"normalize_waveform": True, "normalize_eps": TRANSFORMERS_NORMALIZE_EPS}


def _feature_extractor_settings(model_dir: Path) -> Tuple[Path, Dict]:
    """The feature extractor's saved settings and their file: preprocessor_config.json, or, as
    transformers 5 saves a whole processor, processor_config.json's "feature_extractor"."""
    path = model_dir / "preprocessor_config.json"
    if path.is_file():
        return path, json.loads(path.read_text(encoding="utf-8"))
    processor = model_dir / "processor_config.json"
    if processor.is_file():
        settings = json.loads(processor.read_text(encoding="utf-8")).get("feature_extractor")
        if isinstance(settings, dict):
            return processor, settings
    return path, {}


def frontend_name(model_dir: Union[str, Path]) -> str:
    """Our frontend name for a transformers directory, from its config.json alone."""
    model_type = read_config(model_dir)["model_type"]
    if model_type not in FRONTEND_NAMES:
        raise ValueError(f"{model_dir}: model_type {model_type!r} has no converter; "
                         f"supported: {', '.join(sorted(FRONTEND_NAMES))}")
    return FRONTEND_NAMES[model_type]


def checked_frontend_name(model_dir: Union[str, Path]) -> str:
    """frontend_name, once config.json (and preprocessor_config.json) convert: an option our
    encoders cannot reproduce, or a key the architecture needs missing, is refused from these
    small files, before a recipe spends its data stages on a checkpoint stage 4 would refuse."""
    name = frontend_name(model_dir)
    encoder_config_from_hf(read_config(model_dir))
    from sslasr.models.frontends import get_frontend  # here: the frontends import the converters
    read_data_options(model_dir, waveform=get_frontend({"name": name}).input_type == "waveform")
    return name


def encoder_config_from_hf(config: Dict):
    """Our encoder config for a transformers config (no weights read); a missing key is named."""
    model_type = config["model_type"]
    if model_type in _BASE_PREFIXES:
        encoder_config = wav2vec2_encoder_config
    else:
        encoder_config = _converter_function(model_type, "encoder_config_from_hf")
    try:
        return encoder_config(config)
    except KeyError as err:
        raise ValueError(f"config.json ({model_type}) has no {err.args[0]!r}, which the architecture needs") from err


def get_converter(model_type: str) -> Converter:
    if model_type in _BASE_PREFIXES:
        return wav2vec2_from_hf
    return _converter_function(model_type, "from_hf")


def _converter_function(model_type: str, name: str) -> Callable:
    """NAME of the module converting MODEL_TYPE, which lives with its frontend (imported on first use)."""
    if model_type not in _CONVERTER_MODULES:
        raise ValueError(f"model_type {model_type!r} has no converter; supported: {', '.join(sorted(FRONTEND_NAMES))}")
    module_name = _CONVERTER_MODULES[model_type]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name != module_name:
            raise
        raise ValueError(f"model_type {model_type!r} is converted by {module_name}.{name}, "
                         f"but {module_name} does not exist in this checkout") from err
    function = getattr(module, name, None)
    if function is None:
        raise ValueError(f"model_type {model_type!r}: {module_name} has no {name}")
    return function


def import_hf(model_dir: Union[str, Path]) -> ImportedCheckpoint:
    """Read and convert a transformers model directory."""
    config = read_config(model_dir)
    converter = get_converter(config["model_type"])
    try:
        frontend, encoder_state = converter(config, read_state_dict(model_dir))
    except KeyError as err:  # the converters index config.json for what the architecture needs
        raise ValueError(f"{model_dir}: {err.args[0]!r} is missing (config.json has no such key, or the weights "
                         f"no such tensor); a {config['model_type']} model needs it") from err
    source = {"path": str(Path(model_dir).resolve()), "model_type": config["model_type"],
              "architectures": config.get("architectures") or []}
    from sslasr.models.frontends import get_frontend  # here: the frontends import the converters
    data = read_data_options(model_dir, waveform=get_frontend(frontend).input_type == "waveform")
    if get_frontend(frontend).input_type == "fbank":  # w2v-BERT 2.0: the features it learnt from
        from sslasr.bin.compute_fbank import SeamlessFbank
        data["feature_type"] = SeamlessFbank.name
    return ImportedCheckpoint(frontend, encoder_state, data, source)


def save_imported(imported: ImportedCheckpoint, out: Union[str, Path]) -> Path:
    """Write `out` in the format of a pretraining model_final.pt (the `encoder.*` tensors that
    `load_encoder_weights` reads, and the config that builds the encoder), and `frontend.yaml`
    next to it: the architecture for fine-tuning configs. Both atomically. Returns the yaml."""
    out = Path(out)
    config = {"frontend": imported.frontend}
    if imported.data:
        config["data"] = dict(imported.data)
    checkpoint = {"model": {f"encoder.{k}": v for k, v in imported.encoder_state.items()},
                  "config": config, "num_updates": 0, "imported_from": imported.source}
    save_torch_atomic(checkpoint, out)
    frontend_yaml = out.parent / "frontend.yaml"
    header = (f"# Imported by `sslasr import-hf` from {imported.source.get('path', '?')} "
              f"({imported.source.get('model_type', '?')}): the architecture of {out.name}.\n")
    write_text_atomic(frontend_yaml, header + yaml.safe_dump(config, sort_keys=False))
    return frontend_yaml


# ------------------------------------------------------------------------- wav2vec 2.0 / HuBERT
# transformers name (after the base-model prefix) → ours, for Wav2Vec2Model and HubertModel.
WAV2VEC2_KEY_RULES: List[Tuple[str, str]] = [
    (r"feature_extractor\.conv_layers\.(\d+)\.conv\.(weight|bias)", r"feature_extractor.layers.\1.0.\2"),
    (r"feature_extractor\.conv_layers\.(\d+)\.layer_norm\.(weight|bias)", r"feature_extractor.layers.\1.1.\2"),
    (r"feature_projection\.layer_norm\.(weight|bias)", r"feature_norm.\1"),
    (r"feature_projection\.projection\.(weight|bias)", r"feature_projection.\1"),
    (r"masked_spec_embed", r"mask_embedding"),
    (r"encoder\.pos_conv_embed\.conv\.bias", r"transformer.pos_conv.conv.bias"),
    (r"encoder\.pos_conv_embed\.conv\.(parametrizations\.weight\.original[01])", r"transformer.pos_conv.conv.\1"),
    (r"encoder\.layer_norm\.(weight|bias)", r"transformer.layer_norm.\1"),
    (r"encoder\.layers\.(\d+)\.attention\.(q_proj|k_proj|v_proj|out_proj)\.(weight|bias)",
     r"transformer.layers.\1.attention.\2.\3"),
    (r"encoder\.layers\.(\d+)\.layer_norm\.(weight|bias)", r"transformer.layers.\1.attention_norm.\2"),
    (r"encoder\.layers\.(\d+)\.feed_forward\.intermediate_dense\.(weight|bias)",
     r"transformer.layers.\1.feed_forward.intermediate.\2"),
    (r"encoder\.layers\.(\d+)\.feed_forward\.output_dense\.(weight|bias)", r"transformer.layers.\1.feed_forward.output.\2"),
    (r"encoder\.layers\.(\d+)\.final_layer_norm\.(weight|bias)", r"transformer.layers.\1.final_norm.\2"),
]
# Tensors of transformers' task heads around a base model, not part of the encoder: *ForCTC's
# lm_head, *ForSequenceClassification's projector, classifier and layer_weights (the weighted
# layer sum), alike for every class; *ForPreTraining's quantizer and projections (wav2vec 2.0).
TASK_HEAD_MODULES = ("lm_head", "projector", "classifier", "layer_weights")
WAV2VEC2_HEAD_MODULES = ("quantizer", "project_hid", "project_q") + TASK_HEAD_MODULES
_BASE_PREFIXES = {"wav2vec2": "wav2vec2", "hubert": "hubert"}
_POS_CONV = "encoder.pos_conv_embed.conv."


def wav2vec2_from_hf(config: Dict, state_dict: StateDict) -> Tuple[Dict, StateDict]:
    """transformers Wav2Vec2* / Hubert* → (frontend cfg, Wav2Vec2Encoder state dict)."""
    model_type = config.get("model_type")
    if model_type not in _BASE_PREFIXES:
        raise ValueError(f"wav2vec2_from_hf converts model_type wav2vec2 or hubert, got {model_type!r}")
    encoder_cfg = wav2vec2_encoder_config(config)
    base = split_base_model(state_dict, _BASE_PREFIXES[model_type], WAV2VEC2_HEAD_MODULES)
    base = weight_norm_pos_conv(base, _POS_CONV)
    with torch.device("meta"):  # the expected names and shapes, without allocating weights
        expected = Wav2Vec2Encoder(encoder_cfg).state_dict()
    if "mask_embedding" in expected:
        base = fill_mask_embedding(base, config, encoder_cfg.transformer.dim)
    encoder_state = rename_checked(base, WAV2VEC2_KEY_RULES, expected)
    return {"name": FRONTEND_NAMES[model_type], "encoder": dataclasses.asdict(encoder_cfg)}, encoder_state


def wav2vec2_encoder_config(config: Dict) -> Wav2Vec2EncoderConfig:
    """Our encoder config for a transformers Wav2Vec2Config / HubertConfig. Options our encoder
    cannot reproduce are an error; fine-tuning knobs (SpecAugment masks, CTC settings) are not
    architecture and are left to the recipe's fine-tuning YAML."""
    _require(config, "feat_extract_activation", "gelu")
    _require(config, "hidden_act", "gelu")
    _require(config, "add_adapter", False)
    _require(config, "adapter_attn_dim", None)
    _require(config, "conv_pos_batch_norm", False)
    eps = config.get("layer_norm_eps", 1e-5)
    if abs(eps - 1e-5) > 1e-12:
        raise ValueError(f"layer_norm_eps={eps}: our LayerNorms use 1e-5")
    dims, kernels, strides = config["conv_dim"], config["conv_kernel"], config["conv_stride"]
    layers = config.get("num_feat_extract_layers", len(dims))
    if not len(dims) == len(kernels) == len(strides) == layers:
        raise ValueError(f"conv_dim, conv_kernel, conv_stride and num_feat_extract_layers disagree: "
                         f"{len(dims)}, {len(kernels)}, {len(strides)}, {layers}")
    if config.get("feat_extract_norm", "group") not in ("group", "layer"):
        raise ValueError(f"feat_extract_norm={config['feat_extract_norm']!r}: expected 'group' or 'layer'")
    transformer = TransformerConfig(
        dim=config["hidden_size"], layers=config["num_hidden_layers"], heads=config["num_attention_heads"],
        ffn_dim=config["intermediate_size"], dropout=config.get("hidden_dropout", 0.1),
        attention_dropout=config.get("attention_dropout", 0.1),
        activation_dropout=config.get("activation_dropout", 0.1),
        layer_norm_first=bool(config.get("do_stable_layer_norm", False)), layerdrop=config.get("layerdrop", 0.1),
        pos_conv_kernel=config.get("num_conv_pos_embeddings", 128),
        pos_conv_groups=config.get("num_conv_pos_embedding_groups", 16))
    return Wav2Vec2EncoderConfig(
        conv_layers=[[int(d), int(k), int(s)] for d, k, s in zip(dims, kernels, strides)],
        conv_norm=config.get("feat_extract_norm", "group"), conv_bias=bool(config.get("conv_bias", False)),
        # Wav2Vec2FeatureProjection always normalises; HubertFeatureProjection when told to
        feature_layer_norm=bool(config.get("feat_proj_layer_norm", True)) if config["model_type"] == "hubert" else True,
        dropout_input=config.get("feat_proj_dropout", 0.0), transformer=transformer, mask=MaskConfig())


def _require(config: Dict, key: str, supported) -> None:
    value = config.get(key, supported)
    if value != supported:
        raise ValueError(f"{key}={value!r} is not supported by our encoder (only {supported!r})")


# ------------------------------------------------------------------------- shared helpers
def split_base_model(state_dict: StateDict, prefix: str, head_modules) -> StateDict:
    """The base model's tensors, prefix stripped. A *ForPreTraining / *ForCTC checkpoint holds
    them under `prefix.`; its other tensors must belong to one of `head_modules`: those are
    skipped and logged, anything else is an error."""
    dotted = prefix + "."
    if not any(k.startswith(dotted) for k in state_dict):
        return dict(state_dict)  # a bare *Model
    base = {k[len(dotted):]: v for k, v in state_dict.items() if k.startswith(dotted)}
    others = sorted(k for k in state_dict if not k.startswith(dotted))
    unknown = [k for k in others if k.split(".")[0] not in head_modules]
    if unknown:
        raise ValueError(f"tensors outside the {prefix} base model that are no known head "
                         f"({', '.join(head_modules)}): {unknown}")
    if others:
        heads = sorted({k.split(".")[0] for k in others})
        log.info("skipping %d tensors of the task head(s) %s, which are not part of the encoder: %s",
                 len(others), ", ".join(heads), others)
    return base


def fill_mask_embedding(base: StateDict, config: Dict, dim: int, default_mask_time_prob: float = 0.0) -> StateDict:
    """transformers creates `masked_spec_embed` only when its config masks frames
    (mask_time_prob or mask_feature_prob > 0): without it, our mask embedding starts from its
    random init U(0, 1), with a warning; missing although the config masks is an error."""
    if "masked_spec_embed" in base:
        return base
    if config.get("mask_time_prob", default_mask_time_prob) > 0 or config.get("mask_feature_prob", 0) > 0:
        raise ValueError("the checkpoint lacks masked_spec_embed although its config masks frames")
    log.warning("the checkpoint has no masked_spec_embed (its config never masks): the mask "
                "embedding starts from our random init U(0, 1)")
    return dict(base, masked_spec_embed=torch.empty(dim).uniform_())


def weight_norm_pos_conv(state: StateDict, prefix: str) -> StateDict:
    """Bring the weight-normalised positional conv to torch's parametrizations.* names: older
    checkpoints store weight_g / weight_v (same tensors), a few the plain weight w (then g = ‖w‖
    over all but the kernel axis, v = w, so that g·v/‖v‖ = w)."""
    state = dict(state)
    g_name, v_name = prefix + "parametrizations.weight.original0", prefix + "parametrizations.weight.original1"
    pair = [prefix + "weight_g", prefix + "weight_v"]
    styles = [names for names in (pair, [g_name, v_name], [prefix + "weight"]) if any(n in state for n in names)]
    if len(styles) > 1:  # which one the model was saved from cannot be told
        raise ValueError(f"the positional convolution's weight is stored twice, as {' and '.join(n[0] for n in styles)}")
    if any(name in state for name in pair):
        missing = [name for name in pair if name not in state]
        if missing:
            raise ValueError(f"the positional convolution's weight norm needs both {pair[0]} and {pair[1]}; "
                             f"the checkpoint lacks {missing[0]}")
        state[g_name], state[v_name] = state.pop(pair[0]), state.pop(pair[1])
    elif prefix + "weight" in state:
        # in float32: g rounded to fp16 / bf16 would scale every tap by up to 1e-3 (g·v/‖v‖ ≠ w)
        weight = state.pop(prefix + "weight").float()
        state[g_name] = torch.linalg.vector_norm(weight, dim=(0, 1), keepdim=True)
        state[v_name] = weight
    return state


def rename_checked(state: StateDict, rules: List[Tuple[str, str]], expected: StateDict) -> StateDict:
    """Rename every tensor by the first rule whose pattern matches its whole name, then check the
    result against `expected` (names and shapes). Names no rule matches, and renamed tensors that
    are missing, unexpected or reshaped, are one error listing them all (the checkpoint's names,
    except for missing tensors, which only have ours)."""
    compiled = [(re.compile(pattern), replacement) for pattern, replacement in rules]
    renamed, source, unmapped = {}, {}, []
    for name, tensor in state.items():
        for pattern, replacement in compiled:
            if pattern.fullmatch(name):
                ours = pattern.sub(replacement, name)
                renamed[ours], source[ours] = tensor, name
                break
        else:
            unmapped.append(name)
    problems = [listed_names("unmapped (no rule matches)", sorted(unmapped))] if unmapped else []
    problems += state_dict_mismatches(renamed, expected, loaded_name=source.get)
    if problems:
        raise ValueError("checkpoint does not match the architecture its config describes: " + "; ".join(problems))
    return {k: renamed[k] for k in expected}


__all__ = ["ImportedCheckpoint", "import_hf", "save_imported", "read_config", "read_state_dict",
           "read_data_options", "frontend_name", "get_converter", "wav2vec2_from_hf", "wav2vec2_encoder_config",
           "split_base_model", "weight_norm_pos_conv", "rename_checked", "WAV2VEC2_KEY_RULES",
           "TASK_HEAD_MODULES"]
