"""wav2vec 2.0 (Baevski et al., 2020): encoder and self-supervised pretraining objective.

    X --conv feature encoder--> Z --mask spans, Transformer--> C
    Z --Gumbel product quantizer--> Q
For a masked frame t the context c_t must pick its quantized latent q_t among K distractors
drawn from other masked frames of the same utterance:
    L_m = −log  exp(sim(c_t, q_t)/κ) / Σ_{q̃ ∈ {q_t} ∪ Q_t} exp(sim(c_t, q̃)/κ),   sim = cosine
    L   = L_m + α·L_d + λ·mean(z²)          (α = 0.1 diversity, λ = 10 feature penalty; mean over real frames)
Optionally (β > 0, not in the paper) unmasked frames play the same game, each c_t picking its own
q_t among distractors from the other unmasked frames: L += β·L_u. It is HuBERT's unmasked-frame
term carried over: L_m alone leaves free what the network makes of clean input, which is all
that fine-tuning shows it; L_u asks the context vectors to keep their frame's identity.
"""

import dataclasses
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn
import torch.nn.functional as F

from sslasr.models.blocks.conv_extractor import (
    ConvFeatureExtractor, features_with_grad_scale, lengths_to_padding_mask, padded_to_receptive_field)
from sslasr.models.blocks.dropout import Dropout
from sslasr.models.blocks.masking import channel_mask, masked_frame_index, span_mask
from sslasr.models.blocks.quantizer import GumbelProductQuantizer
from sslasr.models.blocks.transformer import TransformerConfig, TransformerEncoder
from sslasr.models.interfaces import EncoderOutput, Stats

BASE_CONV_LAYERS = [[512, 10, 5]] + [[512, 3, 2]] * 4 + [[512, 2, 2]] * 2


@dataclass
class MaskConfig:
    """Span masking of time frames and (fine-tuning only) of feature channels."""

    time_prob: float = 0.0
    time_length: int = 10
    time_min_masks: int = 2
    channel_prob: float = 0.0
    channel_length: int = 64


def pretraining_mask(defaults: MaskConfig, given: Dict) -> MaskConfig:
    """A pretraining objective's span mask: the fields GIVEN names over the objective's DEFAULTS
    (not MaskConfig's, which mask nothing). Masked frames are what the objective predicts, so a
    mask of none is refused (the contrastive loss had no rows, masked prediction no weight)."""
    mask = MaskConfig(**{**dataclasses.asdict(defaults), **given})
    if not mask.time_prob > 0 or mask.time_length < 1:
        raise ValueError(f"pretrain.mask: time_prob {mask.time_prob}, time_length {mask.time_length}: pretraining "
                         "predicts the masked frames, so both must be above 0")
    return mask


@dataclass
class Wav2Vec2EncoderConfig:
    conv_layers: List[List[int]] = field(default_factory=lambda: [list(l) for l in BASE_CONV_LAYERS])
    conv_norm: str = "group"
    conv_bias: bool = False
    feature_layer_norm: bool = True  # LayerNorm on the conv features (HuBERT releases may omit it)
    feature_grad_mult: float = 1.0
    dropout_input: float = 0.1
    transformer: TransformerConfig = field(default_factory=TransformerConfig)
    mask: MaskConfig = field(default_factory=MaskConfig)  # applied in training when > 0

    @classmethod
    def from_dict(cls, d: Dict) -> "Wav2Vec2EncoderConfig":
        d = dict(d)
        d["transformer"] = TransformerConfig(**d.get("transformer", {}))
        d["mask"] = MaskConfig(**d.get("mask", {}))
        return cls(**d)


class Wav2Vec2Encoder(nn.Module):
    """Feature encoder + projection + masked-span embedding + Transformer context network."""

    frame_shift_samples: int

    def __init__(self, cfg: Wav2Vec2EncoderConfig):
        super().__init__()
        self.cfg = cfg
        self.feature_extractor = ConvFeatureExtractor(cfg.conv_layers, cfg.conv_norm, cfg.conv_bias)
        conv_dim, dim = self.feature_extractor.output_dim, cfg.transformer.dim
        self.feature_norm = nn.LayerNorm(conv_dim) if cfg.feature_layer_norm else nn.Identity()
        self.feature_projection = nn.Linear(conv_dim, dim)
        self.dropout_input = Dropout(cfg.dropout_input)
        self.mask_embedding = nn.Parameter(torch.empty(dim).uniform_())
        self.transformer = self.build_context_network(cfg)
        self.output_dim = dim
        self.frame_shift_samples = 1
        for stride in self.feature_extractor.strides:
            self.frame_shift_samples *= stride

    @property
    def blocks(self) -> nn.ModuleList:
        """The Transformer layers, bottom first (the interface's block stack)."""
        return self.transformer.layers

    def build_context_network(self, cfg: Wav2Vec2EncoderConfig) -> TransformerEncoder:
        """The Transformer over projected features (WavLM's adds its relative position bias)."""
        return TransformerEncoder(cfg.transformer)

    def features(self, waveform: torch.Tensor, lengths: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Latents z: (B, T, C) before LayerNorm, their lengths, and the padding mask."""
        z = features_with_grad_scale(self.feature_extractor, self.cfg.feature_grad_mult, waveform, lengths)
        z = z.transpose(1, 2)
        frame_lengths = self.feature_extractor.output_lengths(lengths)
        return z, frame_lengths, lengths_to_padding_mask(frame_lengths, z.shape[1])

    def contextualize(self, projected: torch.Tensor, padding_mask: torch.Tensor,
                      time_mask: Optional[torch.Tensor], return_all: bool = False,
                      dropped_channels: Optional[torch.Tensor] = None):
        """Replace masked frames by the learned mask embedding, zero the (B, C) dropped channels,
        run the Transformer. Channels are zeroed after the embedding is put in, so a time-masked
        frame loses them too (as in fairseq and transformers)."""
        if time_mask is not None:
            projected = torch.where(time_mask.unsqueeze(-1), self.mask_embedding.to(projected.dtype), projected)
        if dropped_channels is not None:
            projected = projected.masked_fill(dropped_channels.unsqueeze(1), 0.0)
        return self.transformer(projected, padding_mask, return_all=return_all)

    def forward(self, waveform: torch.Tensor, lengths: torch.Tensor, return_all: bool = False) -> EncoderOutput:
        """Encode for downstream heads. In training, applies the configured fine-tuning masks
        (time spans with the mask embedding, feature channels zeroed)."""
        waveform = padded_to_receptive_field(waveform, self.feature_extractor.receptive_field)
        z, frame_lengths, padding_mask = self.features(waveform, lengths)
        x = self.dropout_input(self.feature_projection(self.feature_norm(z)))
        time_mask = dropped = None
        mask = self.cfg.mask
        if self.training and mask.time_prob > 0:
            time_mask = span_mask(frame_lengths, x.shape[1], mask.time_prob, mask.time_length, mask.time_min_masks)
        if self.training and mask.channel_prob > 0:
            dropped = channel_mask(x.shape[0], x.shape[2], mask.channel_prob, mask.channel_length).to(x.device)
        out = self.contextualize(x, padding_mask, time_mask, return_all, dropped)
        if return_all:
            return EncoderOutput(out[-1], frame_lengths, padding_mask, out)
        return EncoderOutput(out, frame_lengths, padding_mask)


@dataclass
class Wav2Vec2PretrainConfig:
    mask: MaskConfig = field(default_factory=lambda: MaskConfig(time_prob=0.65, time_length=10))
    quantizer_groups: int = 2
    quantizer_entries: int = 320
    quantizer_dim: int = 256
    quantizer_temperature: Sequence[float] = (2.0, 0.5, 0.999995)
    final_dim: int = 256
    num_negatives: int = 100
    logit_temperature: float = 0.1
    diversity_weight: float = 0.1
    feature_penalty_weight: float = 10.0
    dropout_features: float = 0.1
    unmasked_weight: float = 0.0   # β of the unmasked-frame contrastive term (0: the paper's loss)

    @classmethod
    def from_dict(cls, d: Dict) -> "Wav2Vec2PretrainConfig":
        d = dict(d)
        d["mask"] = pretraining_mask(cls().mask, d.get("mask", {}))
        return cls(**d)


def sample_negatives(counts: torch.Tensor, num_negatives: int, generator: Optional[torch.Generator] = None,
                     total: Optional[int] = None) -> torch.Tensor:
    """For each of the N = Σ counts masked frames (utterances laid out consecutively), draw
    `num_negatives` indices of *other* masked frames of the same utterance, uniformly with
    replacement. Returns (N, K) indices into the flattened masked frames. A caller that knows
    N passes it as `total`, which spares reading `counts` back from the device; the draws are
    made on counts' device (on the generator's, when one is given)."""
    total = int(counts.sum()) if total is None else total
    offsets = torch.cumsum(counts, 0) - counts
    utt = torch.repeat_interleave(torch.arange(len(counts), device=counts.device), counts, output_size=total)
    local = torch.arange(total, device=counts.device) - offsets[utt]
    others = (counts[utt] - 1).unsqueeze(1)
    uniform = torch.rand(total, num_negatives, generator=generator,
                         device=generator.device if generator is not None else counts.device)
    draw = (uniform.to(counts.device) * others.clamp(min=1)).long()
    # Skip the positive itself. A lone masked frame has no other: it draws itself, and
    # contrastive_logits gives a distractor equal to the positive a −inf logit.
    draw = draw + ((draw >= local.unsqueeze(1)) & (others > 0)).long()
    return offsets[utt].unsqueeze(1) + draw


def feature_penalty(z: torch.Tensor, padding_mask: torch.Tensor) -> torch.Tensor:
    """mean(z²) over the real frames of the (B, T, C) conv features: a mean over the padded
    tensor would shrink the penalty with the batch's padding (fairseq crops its batches to the
    shortest utterance, so its plain mean is one over real frames)."""
    real = (~padding_mask).unsqueeze(-1).to(torch.float32)
    return (z.float().pow(2) * real).sum() / (real.sum() * z.shape[-1]).clamp(min=1.0)


def _unit(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """x / max(‖x‖, eps) along the last dim: the normalisation F.cosine_similarity applies to
    each input (the clamp outside autograd, as there)."""
    norm = torch.linalg.vector_norm(x, 2, dim=-1, keepdim=True).clone()
    with torch.no_grad():
        norm.clamp_min_(eps)
    return x / norm


def _rows_equal(targets: torch.Tensor, negative_idx: torch.Tensor) -> torch.Tensor:
    """(N, K): targets[negative_idx[n, k]] == targets[n] in every component. Equal rows have
    equal first components, so only the pairs that pass that cheap test are compared in full."""
    same = targets[:, 0][negative_idx] == targets[:, :1]
    rows, cols = same.nonzero(as_tuple=True)
    if len(rows):
        same[rows, cols] = (targets[negative_idx[rows, cols]] == targets[rows]).all(-1)
    return same


ALL_PAIRS_MAX_FRAMES = 8192  # 256 MB of float32 similarities; CPU-recipe batches stay far below


def contrastive_logits(context: torch.Tensor, targets: torch.Tensor, negative_idx: torch.Tensor,
                       temperature: float) -> torch.Tensor:
    """context, targets (N, D); negative_idx (N, K) → logits (N, 1 + K), the positive first.
    A distractor identical to the positive (same code) cannot be told apart: its logit is −inf.
    Cosine similarity as F.cosine_similarity computes it, <c/‖c‖, q/‖q‖>, but each vector is
    normalised once, not once per candidate it appears in, and while N ≤ (1+K)·D all N×N
    similarities come from one matmul, cheaper than gathering N·(1+K) candidate vectors (up to
    ALL_PAIRS_MAX_FRAMES: beyond, the N×N matrix and its gradient would take gigabytes)."""
    index = torch.cat([torch.arange(len(targets), device=targets.device).unsqueeze(1), negative_idx], dim=1)
    unit_targets, unit_context = _unit(targets.float()), _unit(context.float())
    with torch.autocast(context.device.type, enabled=False):  # float32, as F.cosine_similarity
        if len(targets) <= min(index.shape[1] * targets.shape[1], ALL_PAIRS_MAX_FRAMES):
            logits = (unit_context @ unit_targets.t()).gather(1, index)
        else:
            logits = torch.bmm(unit_targets[index], unit_context.unsqueeze(-1)).squeeze(-1)
    logits = logits / temperature
    with torch.no_grad():
        same_as_positive = _rows_equal(targets, negative_idx)
    logits[:, 1:] = logits[:, 1:].masked_fill(same_as_positive, float("-inf"))
    return logits


def correct_predictions(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(N,) bool: the target's logit above every other one. A tie for the top counts as wrong
    (as fairseq's accuracy): argmax would call it right whenever the target comes first, so a
    collapsed model with equal logits would report perfect accuracy."""
    target_logits = logits.gather(1, targets.unsqueeze(1)).squeeze(1)
    others = logits.scatter(1, targets.unsqueeze(1), float("-inf"))
    return target_logits > others.max(-1).values


def contrastive_loss(predictions: torch.Tensor, targets: torch.Tensor, counts: torch.Tensor,
                     num_negatives: int, temperature: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """L_m over N frames (utterances laid out consecutively, `counts` frames each): the mean
    cross-entropy of picking each frame's own target among `num_negatives` distractors drawn
    from the other frames of its utterance; and the accuracy of that pick."""
    negative_idx = sample_negatives(counts, num_negatives, total=len(targets))
    logits = contrastive_logits(predictions, targets, negative_idx, temperature)
    target_idx = torch.zeros(len(logits), dtype=torch.long, device=logits.device)
    with torch.no_grad():
        accuracy = correct_predictions(logits, target_idx).float().mean()
    return F.cross_entropy(logits, target_idx), accuracy


class Wav2Vec2Pretrainer(nn.Module):
    """Encoder + quantizer + projections; forward returns the loss and its terms."""

    def __init__(self, encoder_cfg: Wav2Vec2EncoderConfig, cfg: Wav2Vec2PretrainConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = Wav2Vec2Encoder(encoder_cfg)
        conv_dim = self.encoder.feature_extractor.output_dim
        self.dropout_features = Dropout(cfg.dropout_features)
        self.quantizer = GumbelProductQuantizer(conv_dim, cfg.quantizer_groups, cfg.quantizer_entries,
                                                cfg.quantizer_dim, tuple(cfg.quantizer_temperature))
        self.project_q = nn.Linear(cfg.quantizer_dim, cfg.final_dim)
        self.final_proj = nn.Linear(encoder_cfg.transformer.dim, cfg.final_dim)

    def set_num_updates(self, num_updates: int) -> None:
        self.quantizer.set_num_updates(num_updates)

    def forward(self, waveform: torch.Tensor, lengths: torch.Tensor,
                targets: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, Stats]:
        if targets is not None:
            raise ValueError("wav2vec 2.0 learns its own targets (the quantizer); got external targets")
        enc, cfg = self.encoder, self.cfg
        z, frame_lengths, padding_mask = enc.features(waveform, lengths)
        penalty = feature_penalty(z, padding_mask)
        z = enc.feature_norm(z)
        x = enc.dropout_input(enc.feature_projection(z))
        time_mask = span_mask(frame_lengths, x.shape[1], cfg.mask.time_prob, cfg.mask.time_length,
                              cfg.mask.time_min_masks, at_least_one=True)
        context = enc.contextualize(x, padding_mask, time_mask)

        # The masked frames first, then (β > 0) the unmasked ones: one quantizer call for both,
        # so with β > 0 the diversity loss and the perplexities count the unmasked frames too.
        selections = [(masked_frame_index(time_mask), time_mask.sum(1))]
        if cfg.unmasked_weight > 0:
            unmasked = ~time_mask & ~padding_mask
            selections.append((masked_frame_index(unmasked), unmasked.sum(1)))
        index = torch.cat([frames for frames, _ in selections])
        sizes = [len(frames) for frames, _ in selections]
        q = self.quantizer(self.dropout_features(z).flatten(0, 1)[index])
        targets = self.project_q(q.quantized).split(sizes)
        predictions = self.final_proj(context.flatten(0, 1)[index]).split(sizes)
        (contrastive, accuracy), *unmasked_terms = [
            contrastive_loss(p, t, counts, cfg.num_negatives, cfg.logit_temperature)
            for p, t, (_, counts) in zip(predictions, targets, selections)]
        loss = contrastive + cfg.diversity_weight * q.diversity_loss + cfg.feature_penalty_weight * penalty
        stats = {
            "contrastive": contrastive.detach(),
            "diversity": q.diversity_loss.detach(),
            "feature_penalty": penalty.detach(),
            "accuracy": accuracy,
            "code_perplexity": q.code_perplexity.detach(),
            "prob_perplexity": q.prob_perplexity.detach(),
            "temperature": self.quantizer.temperature,
            "masked_frames": float(len(targets[0])),
        }
        if unmasked_terms:
            unmasked_loss, stats["unmasked_accuracy"] = unmasked_terms[0]
            loss = loss + cfg.unmasked_weight * unmasked_loss
            stats["unmasked_contrastive"] = unmasked_loss.detach()
        stats["loss"] = loss.detach()
        return loss, stats
