"""WavLM (Chen et al., 2022): HuBERT's masked prediction, denoising, with a gated relative
position bias in the Transformer.

    X --conv feature encoder--> Z --mask spans, Transformer (+ gated relative bias)--> O
Architecture: the wav2vec 2.0 encoder (conv feature encoder, conv positional embedding,
Transformer) whose attention logits get the bucketed relative position bias of
`blocks/relative_position.py`, learned once and gated per layer by the layer's input.
Objective ("denoising masked speech modeling"): the input X is a *mixture* — with some
probability an utterance gets a region overlapped by a segment of another utterance of the
batch or by noise (`sslasr/data/mixing.py`, done by the data loader) — while the targets stay
the k-means labels of the *clean* primary utterance, so the model must predict the primary
speaker's content under the interference:
    L = HuBERT's loss( O(mix(X)), z(X) )
"""

import dataclasses
from dataclasses import dataclass, field
from typing import Dict, Tuple

import torch

from sslasr.models.blocks.relative_position import GatedRelativePositionBias, RelativePositionBias
from sslasr.models.blocks.transformer import TransformerConfig, TransformerEncoder
from sslasr.models.hubert import HubertPretrainer
from sslasr.models.wav2vec2 import MaskConfig, Wav2Vec2Encoder, Wav2Vec2EncoderConfig


@dataclass
class RelativePositionConfig:
    num_buckets: int = 320   # half per direction; offsets below num_buckets / 4 get their own
    max_distance: int = 800  # frames (16 s at 50 Hz); farther offsets share the last bucket


@dataclass
class WavLMEncoderConfig(Wav2Vec2EncoderConfig):
    relative_position: RelativePositionConfig = field(default_factory=RelativePositionConfig)

    @classmethod
    def from_dict(cls, d: Dict) -> "WavLMEncoderConfig":
        d = dict(d)
        relative = RelativePositionConfig(**d.pop("relative_position", {}))
        base = Wav2Vec2EncoderConfig.from_dict(d)
        return cls(**{f.name: getattr(base, f.name) for f in dataclasses.fields(base)}, relative_position=relative)


class WavLMEncoder(Wav2Vec2Encoder):
    """The wav2vec 2.0 encoder with WavLM's context network; same Encoder contract."""

    cfg: WavLMEncoderConfig

    def build_context_network(self, cfg: WavLMEncoderConfig) -> TransformerEncoder:
        t, rel = cfg.transformer, cfg.relative_position
        return TransformerEncoder(t, position_bias=RelativePositionBias(t.heads, rel.num_buckets, rel.max_distance),
                                  position_gate=lambda: GatedRelativePositionBias(t.dim, t.heads))


class WavLMPretrainer(HubertPretrainer):
    """HuBERT's masked prediction on the WavLM encoder. The denoising comes from the batches:
    `inputs` are mixed by the loader, `targets` are the labels of the clean primary
    utterances (the loader reads them from the cuts and never mixes them)."""

    encoder_class = WavLMEncoder


# ------------------------------------------------------------------------- transformers import
_HF_RELATIVE_POSITION_RULES = [
    # the bucket embedding lives in the first layer's attention in transformers; here it is
    # the Transformer's shared position_bias (any other layer holding one is unmapped: an error)
    (r"encoder\.layers\.0\.attention\.rel_attn_embed\.weight", r"transformer.position_bias.embedding.weight"),
    (r"encoder\.layers\.(\d+)\.attention\.gru_rel_pos_linear\.(weight|bias)",
     r"transformer.layers.\1.position_gate.gate_proj.\2"),
    (r"encoder\.layers\.(\d+)\.attention\.gru_rel_pos_const", r"transformer.layers.\1.position_gate.reset_scale"),
]
WAVLM_SOFTMAX_ALPHA = 32.0  # the paper's α (used only for fp16 attention; see scaled_softmax_attention)


def encoder_config_from_hf(config: Dict) -> WavLMEncoderConfig:
    """Our encoder config for a transformers WavLMConfig: the wav2vec 2.0 options as
    hf_import maps them (unsupported ones are an error there), plus the relative positions."""
    from sslasr.models import hf_import  # it imports this module lazily by name: no cycle

    if config.get("model_type") != "wavlm":
        raise ValueError(f"wavlm.from_hf converts model_type 'wavlm', got {config.get('model_type')!r}")
    base = hf_import.wav2vec2_encoder_config(config)
    transformer = TransformerConfig(**{**dataclasses.asdict(base.transformer), "softmax_alpha": WAVLM_SOFTMAX_ALPHA})
    relative = RelativePositionConfig(num_buckets=int(config.get("num_buckets", 320)),
                                      max_distance=int(config.get("max_bucket_distance", 800)))
    fields = {f.name: getattr(base, f.name) for f in dataclasses.fields(base)}
    return WavLMEncoderConfig(**{**fields, "transformer": transformer, "mask": MaskConfig()},
                              relative_position=relative)


def from_hf(config: Dict, state_dict: Dict[str, torch.Tensor]) -> Tuple[Dict, Dict[str, torch.Tensor]]:
    """A transformers WavLMModel / WavLMForCTC (config.json as a dict, its tensors) →
    (our frontend config {"name": "wavlm", "encoder": {...}}, a WavLMEncoder state dict).
    A tensor that maps nowhere, or an encoder tensor the checkpoint lacks, is an error naming
    it; task-head tensors (hf_import.TASK_HEAD_MODULES) are skipped and logged."""
    from sslasr.models import hf_import

    cfg = encoder_config_from_hf(config)
    base = hf_import.split_base_model(state_dict, "wavlm", hf_import.TASK_HEAD_MODULES)
    base = hf_import.weight_norm_pos_conv(base, "encoder.pos_conv_embed.conv.")
    with torch.device("meta"):  # names and shapes only
        expected = WavLMEncoder(cfg).state_dict()
    base = hf_import.fill_mask_embedding(base, config, cfg.transformer.dim)
    rules = hf_import.WAV2VEC2_KEY_RULES + _HF_RELATIVE_POSITION_RULES
    encoder_state = hf_import.rename_checked(base, rules, expected)
    return {"name": "wavlm", "encoder": dataclasses.asdict(cfg)}, encoder_state


__all__ = ["RelativePositionConfig", "WavLMEncoderConfig", "WavLMEncoder", "WavLMPretrainer",
           "encoder_config_from_hf", "from_hf"]
