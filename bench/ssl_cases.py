"""HuBERT, WavLM and w2v-BERT pretraining steps, ours vs transformers, for pretrain_throughput.py.

transformers has no pretraining heads for HubertModel, WavLMModel or Wav2Vec2BertModel, so
their side is the base model + a linear layer and cross-entropy over the masked frames (random
targets), with the mask drawn inside the timed step. Ours is the full pretraining objective:
HuBERT/WavLM masked prediction (cosine logits over codewords, feature penalty), w2v-BERT
contrastive + diversity + masked prediction with its Gumbel quantizer, so ours does more work.

The architectures are identical by construction: the transformers config is written from our
YAML (HuBERT, WavLM), or ours is read from the transformers config by the importer's converter
(w2v-BERT, whose transformers layout is the stacked-frame, causal-convolution variant). The
encoder parameter counts are returned for the caller to print and compare.
"""

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn
import torch.nn.functional as F
import transformers
from transformers.models.wav2vec2.modeling_wav2vec2 import _compute_mask_indices

from sslasr.models.hubert import HubertPretrainConfig, HubertPretrainer
from sslasr.models.w2vbert import W2vBertPretrainConfig, W2vBertPretrainer, encoder_config_from_hf
from sslasr.models.wavlm import WavLMEncoderConfig, WavLMPretrainer
from sslasr.utils.config import load_config

ROOT = Path(__file__).resolve().parents[1]
NUM_CLASSES = 100  # k-means clusters of the HuBERT/WavLM targets (iteration 1's default)
CONFIGS = ("tiny", "small")
# `small`: base-shaped but narrower and shallower. The waveform encoder (wav2vec 2.0, HuBERT,
# WavLM): base's 7-layer conv stack at 256 channels, a 384-wide post-LN Transformer of 4 layers.
SMALL_ENCODER = {
    "conv_layers": [[256, 10, 5]] + [[256, 3, 2]] * 4 + [[256, 2, 2]] * 2,
    "conv_norm": "group", "conv_bias": False, "feature_grad_mult": 0.1, "dropout_input": 0.1,
    "transformer": {"dim": 384, "layers": 4, "heads": 6, "ffn_dim": 1536, "dropout": 0.1,
                    "attention_dropout": 0.1, "activation_dropout": 0.0, "layer_norm_first": False,
                    "layerdrop": 0.0, "pos_conv_kernel": 128, "pos_conv_groups": 16},
}
# w2v-BERT: the same width and depth as Conformer blocks with w2v-BERT 2.0's depthwise kernel
# (31), 2 contrastive + 2 masked-prediction blocks, and base-sized objective dimensions.
SMALL_CONFORMER = {"dim": 384, "layers": 4, "heads": 6, "ffn_dim": 1536, "conv_kernel": 31,
                   "dropout": 0.1, "attention_dropout": 0.1, "activation_dropout": 0.0, "conv_dropout": 0.1}
SMALL_OBJECTIVE = {"final_dim": 256, "quantizer_dim": 256, "quantizer_entries": 320, "num_negatives": 100}


@dataclass
class Case:
    ours: nn.Module
    theirs: nn.Module
    step_ours: Callable[[], None]
    step_theirs: Callable[[], None]
    encoder_params_ours: int
    encoder_params_theirs: int
    note: str


def _params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _finish(model: nn.Module, loss: torch.Tensor) -> None:
    loss.backward()
    model.zero_grad(set_to_none=True)


def _masked_ce_step(base: nn.Module, head: nn.Linear, mask_cfg, forward_kwargs, num_frames: int, batch: int):
    """transformers' side: base model with a span mask drawn in the step, linear CE on masked frames."""
    model = nn.ModuleDict({"base": base, "head": head})
    device = head.weight.device

    def step():
        mask = torch.from_numpy(_compute_mask_indices((batch, num_frames), mask_cfg.time_prob, mask_cfg.time_length,
                                                      min_masks=mask_cfg.time_min_masks)).to(device)
        hidden = base(**forward_kwargs, mask_time_indices=mask).last_hidden_state
        logits = head(hidden[mask])
        targets = torch.randint(head.out_features, (len(logits),), device=device)
        _finish(model, F.cross_entropy(logits, targets))
    return model, step


def wav2vec2_encoder_hf_fields(enc) -> dict:
    """Our Wav2Vec2EncoderConfig (also HuBERT's and WavLM's architecture) as transformers config
    fields, shared by Wav2Vec2Config, HubertConfig and WavLMConfig."""
    t = enc.transformer
    return dict(
        conv_dim=[c for c, _, _ in enc.conv_layers],        # encoder.conv_layers[i][0]
        conv_kernel=[k for _, k, _ in enc.conv_layers],     # encoder.conv_layers[i][1]
        conv_stride=[s for _, _, s in enc.conv_layers],     # encoder.conv_layers[i][2]
        feat_extract_norm=enc.conv_norm,                     # "group": GroupNorm on conv layer 0 only
        conv_bias=enc.conv_bias,
        feat_extract_activation="gelu",
        feat_proj_dropout=enc.dropout_input,                 # dropout after feature_projection
        hidden_size=t.dim,
        num_hidden_layers=t.layers,
        num_attention_heads=t.heads,
        intermediate_size=t.ffn_dim,
        hidden_act="gelu",
        hidden_dropout=t.dropout,
        attention_dropout=t.attention_dropout,
        activation_dropout=t.activation_dropout,
        do_stable_layer_norm=t.layer_norm_first,
        layerdrop=t.layerdrop,
        num_conv_pos_embeddings=t.pos_conv_kernel,
        num_conv_pos_embedding_groups=t.pos_conv_groups,
        layer_norm_eps=1e-5,                                 # torch LayerNorm default, as ours
    )


def _wav2vec2_style_hf_config(enc, config_class, **extra):
    return config_class(**wav2vec2_encoder_hf_fields(enc), mask_time_prob=0.05, mask_feature_prob=0.0, **extra)


def _targeted_case(name: str, batch: int, seconds: float, config: str, device: torch.device) -> Case:
    """tiny: the minisynth recipe's HuBERT/WavLM; small: SMALL_ENCODER with that objective at
    fairseq hubert_base's final_dim 256."""
    cfg = load_config(ROOT / f"egs/minisynth/conf/frontend_{name}.yaml")
    objective = {k: v for k, v in cfg["pretrain"].items() if k in HubertPretrainConfig.__dataclass_fields__}
    if config == "small":
        objective["final_dim"] = SMALL_OBJECTIVE["final_dim"]
        cfg["frontend"]["encoder"] = dict(cfg["frontend"]["encoder"], **SMALL_ENCODER)
    pre = HubertPretrainConfig.from_dict(dict(objective, num_classes=NUM_CLASSES, label_rate=50))
    if name == "hubert":
        from sslasr.models.frontends import get_frontend
        enc = get_frontend(cfg["frontend"]).build_encoder(cfg["frontend"]["encoder"]).cfg
        ours = HubertPretrainer(enc, pre)
        base = transformers.HubertModel(_wav2vec2_style_hf_config(enc, transformers.HubertConfig,
                                                                   feat_proj_layer_norm=True))
    else:
        enc = WavLMEncoderConfig.from_dict(cfg["frontend"]["encoder"])
        ours = WavLMPretrainer(enc, pre)
        rel = enc.relative_position
        base = transformers.WavLMModel(_wav2vec2_style_hf_config(
            enc, transformers.WavLMConfig, num_buckets=rel.num_buckets, max_bucket_distance=rel.max_distance))
    samples = int(seconds * 16000)
    wav = torch.randn(batch, samples, device=device)
    lengths = torch.full((batch,), samples, dtype=torch.long, device=device)
    num_frames = int(base._get_feat_extract_output_lengths(samples))
    targets = torch.randint(NUM_CLASSES, (batch, num_frames), device=device)
    ours.to(device).train()
    theirs, step_theirs = _masked_ce_step(base.to(device).train(),
                                          nn.Linear(enc.transformer.dim, NUM_CLASSES, device=device), pre.mask,
                                          {"input_values": wav}, num_frames, batch)

    def step_ours():
        loss, _ = ours(wav, lengths, targets)
        _finish(ours, loss)
    return Case(ours, theirs, step_ours, step_theirs, _params(ours.encoder), _params(base),
                note=f"{name}: ours = full masked prediction (cosine logits, {NUM_CLASSES} classes); "
                     f"transformers = {type(base).__name__} + linear CE")


def _w2vbert_case(batch: int, seconds: float, config: str, device: torch.device) -> Case:
    """The minisynth preset's width and depth (tiny) or SMALL_CONFORMER (small) in transformers'
    Wav2Vec2Bert layout."""
    cfg = load_config(ROOT / "egs/minisynth/conf/frontend_w2vbert.yaml")
    conformer = cfg["frontend"]["encoder"]["conformer"]
    if config == "small":
        conformer = dict(conformer, **SMALL_CONFORMER)
        cfg["pretrain"].update(SMALL_OBJECTIVE)
    hf_cfg = transformers.Wav2Vec2BertConfig(
        hidden_size=conformer["dim"], num_hidden_layers=conformer["layers"], num_attention_heads=conformer["heads"],
        intermediate_size=conformer["ffn_dim"], conv_depthwise_kernel_size=conformer["conv_kernel"],
        hidden_dropout=conformer["dropout"], attention_dropout=conformer["attention_dropout"],
        activation_dropout=conformer["activation_dropout"], conformer_conv_dropout=conformer["conv_dropout"],
        feat_proj_dropout=0.1, layerdrop=0.0, mask_time_prob=0.05)
    enc = encoder_config_from_hf(hf_cfg.to_dict())
    objective = {k: v for k, v in cfg["pretrain"].items() if k in W2vBertPretrainConfig.__dataclass_fields__}
    pre = W2vBertPretrainConfig.from_dict(objective)
    ours = W2vBertPretrainer(enc, pre).to(device).train()
    base = transformers.Wav2Vec2BertModel(hf_cfg).to(device).train()
    frames = int(seconds * 100) // 2 * 2  # 10 ms fbank frames, an even count for the pair stacking
    fbank = torch.randn(batch, frames, 80, device=device)
    lengths = torch.full((batch,), frames, dtype=torch.long, device=device)
    stacked = fbank.reshape(batch, frames // 2, 160)  # what transformers' feature extractor feeds it
    theirs, step_theirs = _masked_ce_step(base, nn.Linear(hf_cfg.hidden_size, pre.quantizer_entries, device=device),
                                          pre.mask, {"input_features": stacked}, frames // 2, batch)

    def step_ours():
        loss, _ = ours(fbank, lengths)
        _finish(ours, loss)
    return Case(ours, theirs, step_ours, step_theirs, _params(ours.encoder), _params(base),
                note="w2vbert: ours = contrastive + diversity + masked prediction (quantizer ids); "
                     "transformers = Wav2Vec2BertModel + linear CE; both in transformers' layout "
                     "(stacked frames, causal LayerNorm convolution, relative_key positions)")


def build_case(name: str, batch: int, seconds: float, config: str = "tiny",
               device: torch.device = torch.device("cpu")) -> Case:
    """Both models and their inputs on DEVICE."""
    if config not in CONFIGS:
        raise ValueError(f"config must be one of {CONFIGS}, got {config!r}")
    if name in ("hubert", "wavlm"):
        return _targeted_case(name, batch, seconds, config, device)
    if name == "w2vbert":
        return _w2vbert_case(batch, seconds, config, device)
    raise ValueError(f"no benchmark case for {name!r}")
