"""The contracts every frontend, pretrainer and head follows (written once, used everywhere).

Encoder (one per frontend, `sslasr/models/<frontend>.py`):
    encoder(inputs, input_lens, return_all=False) -> EncoderOutput
    inputs: (B, samples) waveform or (B, frames, mel) fbank; `encoder.output_dim` is D;
    `encoder.feature_extractor` is the module that turns inputs into frame features (what
    `finetune.freeze_feature_extractor` freezes); `encoder.blocks` is its Transformer or Conformer
    block stack, bottom first (the top `finetune.reinit_top_layers` keep their random init).
Pretrainer:
    pretrainer(inputs, input_lens, targets=None) -> (loss, stats)
    `.encoder` is the Encoder above (its weights become the fine-tuning init);
    stats maps names to floats or detached 0-dim tensors, with at least "loss" and
    "masked_frames" (the weight used to average stats over batches); tensors stay on the device
    until the trainer logs them (reading each value every step would make an accelerator wait for
    the host: bench/host_syncs.py); optional `set_num_updates(n)`.
Head (registry in `sslasr/models/heads/__init__.py`):
    head.loss(hidden, lengths, tokens) -> summed loss over the batch
    head.log_likelihood(hidden, lengths, tokens) -> (B,) log p(tokens | hidden): the model's
        probability, without the training loss's regularisers (label smoothing, a pruned
        transducer's simple loss); −inf where the head cannot produce the tokens from the frames
    head.decode(hidden, lengths, method, options) -> list of token-id lists
    `head.methods` names the decoding methods; `head.greedy_method` is used in validation.
"""

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Union

import torch

Stats = Dict[str, Union[float, torch.Tensor]]  # a pretrainer's logged values (see above)


@dataclass
class EncoderOutput:
    hidden: torch.Tensor                 # (B, T, D) last layer
    lengths: torch.Tensor                # (B,) valid frames
    padding_mask: torch.Tensor           # (B, T) True = pad
    layers: Optional[List[torch.Tensor]] = None  # all layer outputs when requested


@dataclass
class DecodeOptions:
    """Search settings shared by every decoding method; unused fields are ignored."""

    beam_size: int = 8
    lm: Optional[torch.nn.Module] = None  # a TokenLM for shallow fusion
    lm_weight: float = 0.0                 # λ in log p_AM + λ·log p_LM + β·|y|
    length_bonus: float = 0.0              # β
    ctc_weight: float = 0.3                # attention decoding: joint CTC prefix score weight
    max_len_ratio: float = 1.0             # attention decoding: max output tokens per encoder frame
    lexicon: Optional[object] = None       # a decoding.lexicon.Lexicon: hypotheses spell its words only
    extra: dict = field(default_factory=dict)
