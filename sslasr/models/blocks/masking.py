"""Span masking (wav2vec 2.0 §3.1; fairseq `compute_mask_indices`, static spans).

For an utterance of T frames, sample ⌊p·T/L + u⌋, u~U[0,1), distinct start frames (p·T/L on
average: fairseq's stochastic rounding) and mask the L frames after each start. Spans may
overlap, so the expected masked fraction is
≈ 1 − (1 − L/T)^(pT/L) → 1 − e^(−p) for long T (≈ 49 % at p = 0.65, L = 10).
"""

from typing import Optional

import torch


def span_mask(
    lengths: torch.Tensor,
    max_len: int,
    prob: float,
    span: int,
    min_masks: int = 0,
    generator: Optional[torch.Generator] = None,
    at_least_one: bool = False,
) -> torch.Tensor:
    """Boolean (B, max_len) mask; True = masked. Padding (≥ length) is never masked, and some
    frame of every utterance stays seen: one no longer than a span is not masked (its one span
    would cover it), and where the spans happen to cover one whole, a random frame is unmasked
    (the context network would see nothing of it, and the unmasked-frame terms nothing at all).
    `at_least_one` (pretraining, where masked frames are the targets): a batch whose draws masked
    nothing (all its utterances shorter than a span, or unlucky) gets one span of min(L, T − 1)
    frames in its longest utterance, as fairseq gives an utterance whose spans came out empty."""
    batch = lengths.shape[0]
    mask = torch.zeros(batch, max_len, dtype=torch.bool)
    if prob <= 0.0:
        return mask.to(lengths.device)
    sizes = lengths.tolist()
    for b, length in enumerate(sizes):
        num_starts = length - span + 1  # starts whose span fits inside the utterance
        if num_starts <= 1:
            continue
        draw = torch.rand((), generator=generator).item()
        num_spans = max(min_masks, int(prob * length / span + draw))
        num_spans = min(num_spans, num_starts - 1)
        starts = torch.randperm(num_starts, generator=generator)[:num_spans]
        frames = (starts[:, None] + torch.arange(span)[None, :]).reshape(-1)
        mask[b, frames] = True
        if mask[b, :length].all():
            mask[b, int(torch.randint(length, (), generator=generator))] = False
    if at_least_one and not mask.any():
        longest = max(range(batch), key=sizes.__getitem__)
        if sizes[longest] < 2:
            raise ValueError(f"nothing to mask: the batch's longest utterance has {sizes[longest]} frame(s), "
                             "and masked prediction needs at least 2 (one masked, one seen)")
        width = min(span, sizes[longest] - 1)
        start = int(torch.randint(sizes[longest] - width + 1, (), generator=generator))
        mask[longest, start:start + width] = True
    return mask.to(lengths.device)


def masked_frame_index(mask: torch.Tensor) -> torch.Tensor:
    """Flat indices of the True frames of a (B, T) mask, for x.flatten(0, 1)[index]. An index
    rather than x[mask]: one read of the device (the count) for every tensor it selects from,
    where each boolean index is resolved on the host again, and again in the backward."""
    return mask.flatten().nonzero().squeeze(1)


def channel_mask(
    batch: int, channels: int, prob: float, span: int, generator: Optional[torch.Generator] = None
) -> torch.Tensor:
    """Boolean (B, channels) mask of feature channels (fairseq mask_channel_*), same rule."""
    lengths = torch.full((batch,), channels, dtype=torch.long)
    return span_mask(lengths, channels, prob, span, generator=generator)
