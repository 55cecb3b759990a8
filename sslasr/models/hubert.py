"""HuBERT (Hsu et al., 2021): masked prediction of offline cluster targets.

    X --conv feature encoder--> Z --mask spans, Transformer--> O
Every frame t has a discrete target z_t ∈ {0..C−1}: the k-means cluster of its MFCC (first
iteration) or of a previous iteration's hidden features. A projection A and learned codeword
embeddings e_c score the classes,
    p(c | O, t) = exp(cos(A o_t, e_c)/τ) / Σ_c' exp(cos(A o_t, e_c')/τ)
    L_m = −Σ_{t ∈ M} log p(z_t | O, t),    L_u = −Σ_{t ∉ M} log p(z_t | O, t)
    L   = (α·L_m + β·L_u) / |M| + λ·mean(z²)       (α = 1, β = 0, λ = 10: fairseq's base)
M are the masked frames (spans: p = 0.8, length 10). The encoder is the wav2vec 2.0 encoder
unchanged (same modules, same parameter names), so HuBERT checkpoints map onto it.
"""

from dataclasses import dataclass, field
from typing import Dict, Optional, Tuple

import torch
from torch import nn
import torch.nn.functional as F

from sslasr.models.blocks.conv_extractor import lengths_to_padding_mask
from sslasr.models.blocks.masking import masked_frame_index, span_mask
from sslasr.models.interfaces import Stats
from sslasr.models.wav2vec2 import (
    MaskConfig, Wav2Vec2Encoder, Wav2Vec2EncoderConfig, correct_predictions, feature_penalty, pretraining_mask,
)

IGNORE_LABEL = -100  # a frame without a target (padding, or past the end of its labels)
# Labels and frames of one utterance come from different front ends (MFCC framing, conv
# strides) and may disagree by a frame or two; more than this means a wrong label_rate.
LABEL_SLACK_FRAMES = 3


@dataclass
class HubertPretrainConfig:
    mask: MaskConfig = field(default_factory=lambda: MaskConfig(time_prob=0.8, time_length=10))
    num_classes: Optional[int] = None   # k-means clusters of the labels (set per iteration)
    label_rate: Optional[float] = None  # labels per second: 100 for MFCC, 50 for hidden features
    sample_rate: int = 16000            # audio samples per second (encoder frame rate = this / stride)
    final_dim: int = 256
    logit_temperature: float = 0.1
    pred_masked_weight: float = 1.0     # α
    pred_nomask_weight: float = 0.0     # β
    feature_penalty_weight: float = 10.0  # λ

    @classmethod
    def from_dict(cls, d: Dict) -> "HubertPretrainConfig":
        d = dict(d)
        d["mask"] = pretraining_mask(cls().mask, d.get("mask", {}))
        return cls(**d)


class MaskedPredictionHead(nn.Module):
    """The HuBERT prediction loss over cluster targets, shared by HuBERT and WavLM.

    forward(context, targets, time_mask, padding_mask) -> (loss, stats)
        context       (B, T, D) Transformer output
        targets       (B, T) long, one cluster id per encoder frame, IGNORE_LABEL (−100) = none
        time_mask     (B, T) bool, True = the frame was masked at the input
        padding_mask  (B, T) bool, True = padding
    loss = (α·Σ_{masked} CE + β·Σ_{unmasked} CE) / (number of masked labelled frames), a scalar.
    stats (0-dim tensors and floats): masked_loss and masked_accuracy (means over masked labelled frames),
    masked_frames (their count, the weight of this batch), and with β > 0 unmasked_loss and
    unmasked_accuracy. A caller adds its own terms and sets stats["loss"].
    """

    def __init__(self, input_dim: int, num_classes: int, final_dim: int = 256, logit_temperature: float = 0.1,
                 masked_weight: float = 1.0, unmasked_weight: float = 0.0):
        super().__init__()
        if num_classes is None or num_classes < 2:
            raise ValueError(f"masked prediction needs num_classes ≥ 2 (the k-means cluster count), got {num_classes}")
        self.num_classes = num_classes
        self.temperature = logit_temperature
        self.masked_weight, self.unmasked_weight = masked_weight, unmasked_weight
        self.final_proj = nn.Linear(input_dim, final_dim)
        self.label_embeddings = nn.Parameter(torch.empty(num_classes, final_dim).uniform_())  # fairseq's init

    def logits(self, context: torch.Tensor) -> torch.Tensor:
        """(N, D) → (N, C) cos(A o, e_c)/τ, in float32 as fairseq's cosine similarity."""
        projected = F.normalize(self.final_proj(context).float(), dim=-1, eps=1e-8)
        embeddings = F.normalize(self.label_embeddings.float(), dim=-1, eps=1e-8)
        with torch.autocast(context.device.type, enabled=False):
            return projected @ embeddings.t() / self.temperature

    def _check(self, context: torch.Tensor, targets: torch.Tensor, time_mask: torch.Tensor,
               padding_mask: torch.Tensor) -> None:
        if context.dim() != 3 or targets.shape != context.shape[:2]:
            raise ValueError(f"targets {tuple(targets.shape)} must be (B, T) of context {tuple(context.shape)}")
        if time_mask.shape != targets.shape or padding_mask.shape != targets.shape:
            raise ValueError(f"time_mask {tuple(time_mask.shape)} and padding_mask {tuple(padding_mask.shape)} "
                             f"must match targets {tuple(targets.shape)}")
        if targets.dtype != torch.long:
            raise TypeError(f"targets must be a LongTensor, got {targets.dtype}")
        out_of_range = (targets != IGNORE_LABEL) & ((targets < 0) | (targets >= self.num_classes))
        if bool(out_of_range.any()):  # one read of the device per batch
            labelled = targets[targets != IGNORE_LABEL]
            raise ValueError(f"targets must be cluster ids in [0, {self.num_classes}) or {IGNORE_LABEL}, found "
                             f"values in [{int(labelled.min())}, {int(labelled.max())}]: is num_classes right?")

    def forward(self, context: torch.Tensor, targets: torch.Tensor, time_mask: torch.Tensor,
                padding_mask: torch.Tensor) -> Tuple[torch.Tensor, Stats]:
        self._check(context, targets, time_mask, padding_mask)
        labelled = (targets != IGNORE_LABEL) & ~padding_mask
        frames, flat_targets = context.flatten(0, 1), targets.flatten()
        masked = masked_frame_index(labelled & time_mask)
        num_masked = len(masked)
        masked_sum, masked_correct = self._cross_entropy(frames[masked], flat_targets[masked])
        loss = self.masked_weight * masked_sum
        stats = {"masked_loss": masked_sum.detach() / max(num_masked, 1),
                 "masked_accuracy": masked_correct / max(num_masked, 1),
                 "masked_frames": float(num_masked)}
        if self.unmasked_weight > 0:
            unmasked = masked_frame_index(labelled & ~time_mask)
            unmasked_sum, unmasked_correct = self._cross_entropy(frames[unmasked], flat_targets[unmasked])
            loss = loss + self.unmasked_weight * unmasked_sum
            stats["unmasked_loss"] = unmasked_sum.detach() / max(len(unmasked), 1)
            stats["unmasked_accuracy"] = unmasked_correct / max(len(unmasked), 1)
        # Normalised by the masked frames only. fairseq's criterion divides by |M| + |U| when the
        # unmasked weight is on: with β = 1 (the CPU recipes) its prediction loss is about half of
        # ours against the same feature penalty (Adam cancels the overall scale, not that ratio).
        # The recipes' β = 1 results were measured with this normalisation, so it stays.
        return loss / max(num_masked, 1), stats

    def _cross_entropy(self, context: torch.Tensor, targets: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Summed CE over the given frames and how many were predicted right (a 0-dim tensor)."""
        logits = self.logits(context)
        total = F.cross_entropy(logits, targets, reduction="sum")
        with torch.no_grad():
            correct = correct_predictions(logits, targets).sum().float()
        return total, correct


def align_targets(targets: torch.Tensor, frame_lengths: torch.Tensor, num_frames: int, ratio: float) -> torch.Tensor:
    """Labels at `label_rate` → one label per encoder frame, as fairseq's feat2tar_ratio:
    frame t takes label ⌊t·r⌋ with r = label_rate / frame_rate (2 for 100 Hz MFCC labels on
    50 Hz frames, 1 for labels made from a previous iteration's frames).

    targets (B, L) padded with IGNORE_LABEL → (B, num_frames). Frames past the last label of
    their utterance get IGNORE_LABEL (fairseq crops them: neither predicts them); labels past
    the last frame go unused. Counts that disagree by more than LABEL_SLACK_FRAMES frames
    mean labels made at another rate than `label_rate`: an error.
    """
    batch, width = targets.shape
    valid = targets != IGNORE_LABEL
    # labels of an utterance run from 0 to its last valid one; padding is only at the end
    last = width - torch.flip(valid, [1]).float().argmax(1)
    label_lengths = torch.where(valid.any(1), last, torch.zeros_like(last))
    label_frames = label_lengths.double() / ratio
    off = (label_frames - frame_lengths.double()).abs() > LABEL_SLACK_FRAMES
    if off.any():
        b = int(off.nonzero()[0])
        raise ValueError(f"utterance {b} of the batch has {int(label_lengths[b])} labels for "
                         f"{int(frame_lengths[b])} encoder frames; at {ratio:g} labels per frame that is "
                         f"{float(label_frames[b]):.1f} frames: is label_rate the rate the labels were made at?")
    index = (torch.arange(num_frames, device=targets.device, dtype=torch.float64) * ratio).long()
    aligned = targets.gather(1, index.clamp(max=width - 1).unsqueeze(0).expand(batch, -1))
    beyond = (index.unsqueeze(0) >= label_lengths.unsqueeze(1)) | lengths_to_padding_mask(frame_lengths, num_frames)
    return aligned.masked_fill(beyond, IGNORE_LABEL)


class HubertPretrainer(nn.Module):
    """wav2vec 2.0 encoder + masked prediction of frame labels; forward returns (loss, stats)."""

    encoder_class = Wav2Vec2Encoder  # WavLM trains its own encoder with this objective

    def __init__(self, encoder_cfg: Wav2Vec2EncoderConfig, cfg: HubertPretrainConfig):
        super().__init__()
        if cfg.label_rate is None or cfg.label_rate <= 0:
            raise ValueError(f"HuBERT needs label_rate (labels per second: 100 for MFCC k-means labels, "
                             f"50 for labels from hidden features), got {cfg.label_rate}")
        self.cfg = cfg
        self.encoder = self.encoder_class(encoder_cfg)
        self.head = MaskedPredictionHead(encoder_cfg.transformer.dim, cfg.num_classes, cfg.final_dim,
                                         cfg.logit_temperature, cfg.pred_masked_weight, cfg.pred_nomask_weight)
        frame_rate = cfg.sample_rate / self.encoder.frame_shift_samples
        self.labels_per_frame = cfg.label_rate / frame_rate

    def forward(self, waveform: torch.Tensor, lengths: torch.Tensor,
                targets: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, Stats]:
        if targets is None:
            raise ValueError("HuBERT predicts frame labels: the batch has no targets "
                             "(set data.targets_field to the cuts' label field)")
        enc, cfg = self.encoder, self.cfg
        z, frame_lengths, padding_mask = enc.features(waveform, lengths)
        targets = align_targets(targets.to(z.device), frame_lengths, z.shape[1], self.labels_per_frame)
        penalty = feature_penalty(z, padding_mask)
        x = enc.dropout_input(enc.feature_projection(enc.feature_norm(z)))
        time_mask = span_mask(frame_lengths, x.shape[1], cfg.mask.time_prob, cfg.mask.time_length,
                              cfg.mask.time_min_masks, at_least_one=True)
        context = enc.contextualize(x, padding_mask, time_mask)
        prediction, stats = self.head(context, targets, time_mask, padding_mask)
        loss = prediction + cfg.feature_penalty_weight * penalty
        stats = {"loss": loss.detach(), **stats, "feature_penalty": penalty.detach()}
        return loss, stats
