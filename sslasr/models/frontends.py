"""Frontend registry: YAML `frontend.name` → encoder class, its pretraining objective, input type.

Every encoder takes (inputs, input_lens) and returns an EncoderOutput; every pretrainer has
an `.encoder` and returns (loss, stats). Adding a frontend = one entry here.
"""

from dataclasses import dataclass
from typing import Callable, Dict

from torch import nn

from sslasr.models import hubert, w2vbert, wav2vec2, wavlm


@dataclass(frozen=True)
class Frontend:
    input_type: str  # "waveform" or "fbank"
    build_encoder: Callable[[Dict], nn.Module]
    build_pretrainer: Callable[[Dict, Dict], nn.Module]


FRONTENDS: Dict[str, Frontend] = {
    "wav2vec2": Frontend(
        input_type="waveform",
        build_encoder=lambda enc: wav2vec2.Wav2Vec2Encoder(wav2vec2.Wav2Vec2EncoderConfig.from_dict(enc)),
        build_pretrainer=lambda enc, obj: wav2vec2.Wav2Vec2Pretrainer(
            wav2vec2.Wav2Vec2EncoderConfig.from_dict(enc), wav2vec2.Wav2Vec2PretrainConfig.from_dict(obj)),
    ),
    "hubert": Frontend(  # the wav2vec 2.0 encoder, trained to predict k-means labels
        input_type="waveform",
        build_encoder=lambda enc: wav2vec2.Wav2Vec2Encoder(wav2vec2.Wav2Vec2EncoderConfig.from_dict(enc)),
        build_pretrainer=lambda enc, obj: hubert.HubertPretrainer(
            wav2vec2.Wav2Vec2EncoderConfig.from_dict(enc), hubert.HubertPretrainConfig.from_dict(obj)),
    ),
    "wavlm": Frontend(  # gated relative position bias; HuBERT's objective on mixed utterances
        input_type="waveform",
        build_encoder=lambda enc: wavlm.WavLMEncoder(wavlm.WavLMEncoderConfig.from_dict(enc)),
        build_pretrainer=lambda enc, obj: wavlm.WavLMPretrainer(
            wavlm.WavLMEncoderConfig.from_dict(enc), hubert.HubertPretrainConfig.from_dict(obj)),
    ),
    "w2vbert": Frontend(  # Conformer on fbank; contrastive + masked-prediction pretraining
        input_type="fbank",
        build_encoder=lambda enc: w2vbert.W2vBertEncoder(w2vbert.W2vBertEncoderConfig.from_dict(enc)),
        build_pretrainer=lambda enc, obj: w2vbert.W2vBertPretrainer(
            w2vbert.W2vBertEncoderConfig.from_dict(enc), w2vbert.W2vBertPretrainConfig.from_dict(obj)),
    ),
}


def get_frontend(frontend_cfg: Dict) -> Frontend:
    name = frontend_cfg.get("name")
    if name not in FRONTENDS:
        raise ValueError(f"unknown frontend {name!r}; available: {', '.join(sorted(FRONTENDS))}")
    return FRONTENDS[name]
