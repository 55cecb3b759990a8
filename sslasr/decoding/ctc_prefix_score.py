"""CTC prefix scores (Watanabe et al., 2017, "Hybrid CTC/Attention Architecture for End-to-End
Speech Recognition", Algorithm 2), for many hypotheses and candidate tokens at once.

The prefix probability of h is the CTC probability of every label sequence that starts with h,
ψ(h) = Σ_ν p_ctc(h·ν | X). For h = g·c it follows from two forward variables of g over frames
t = 1..T, with y_t^k the frame posteriors:
    r_t^n(h): probability of the paths over frames 1..t that output h and end in c (non-blank),
    r_t^b(h): the same paths ending in blank.
With φ_t = r_t^b(g) + [c ≠ last(g)]·r_t^n(g) (a repeated label needs a blank in between):
    r_1^n(h) = y_1^c if g is empty else 0;     r_1^b(h) = 0
    r_t^n(h) = (r_{t-1}^n(h) + φ_{t-1}) · y_t^c
    r_t^b(h) = (r_{t-1}^b(h) + r_{t-1}^n(h)) · y_t^blank
    ψ(h)     = r_1^n(h) + Σ_{t=2..T} φ_{t-1} · y_t^c
and ending g (c = eos) scores its full-sequence probability p_ctc(g | X) = r_T^n(g) + r_T^b(g).
All of it in the log domain. Frames past an utterance's length get log y^blank = 0 and
log y^c = −inf: they carry r^n + r^b unchanged to the last frame and add nothing to ψ, so a
padded batch scores exactly like its utterances one by one.
"""

from dataclasses import dataclass

import torch

from sslasr.models.blocks.conv_extractor import lengths_to_padding_mask

NEG_INF = float("-inf")


@dataclass
class CtcPrefixState:
    """The CTC side of N hypotheses (prefixes g)."""

    r: torch.Tensor          # (T, 2, N) log r_t^n(g), log r_t^b(g)
    score: torch.Tensor      # (N,) log ψ(g)
    last: torch.Tensor       # (N,) last token of g; -1 for the empty prefix
    length: torch.Tensor     # (N,) tokens in g
    utterance: torch.Tensor  # (N,) batch row whose frames g is scored on


@dataclass
class CtcExtensions:
    """Every hypothesis extended by each of its K candidate tokens."""

    parent: CtcPrefixState
    tokens: torch.Tensor     # (N, K) candidate tokens c
    scores: torch.Tensor     # (N, K) log ψ(g·c); for c = eos, log p_ctc(g | X)
    r: torch.Tensor          # (T, 2, N, K) forward variables of g·c

    def select(self, hypothesis: torch.Tensor, column: torch.Tensor) -> CtcPrefixState:
        """The state of the extensions g_hypothesis · tokens[hypothesis, column] (M of them)."""
        return CtcPrefixState(r=self.r[:, :, hypothesis, column], score=self.scores[hypothesis, column],
                              last=self.tokens[hypothesis, column], length=self.parent.length[hypothesis] + 1,
                              utterance=self.parent.utterance[hypothesis])


class CtcPrefixScorer:
    """Prefix scores under (B, T, V) CTC log-posteriors of a padded batch."""

    def __init__(self, log_probs: torch.Tensor, lengths: torch.Tensor, blank_id: int = 0, eos_id: int = 1):
        if log_probs.dim() != 3:
            raise ValueError(f"log_probs must be (batch, frames, vocab), got shape {tuple(log_probs.shape)}")
        if lengths.shape != log_probs.shape[:1] or int(lengths.max()) > log_probs.shape[1] or int(lengths.min()) < 1:
            raise ValueError(f"lengths {lengths.tolist()} do not fit log_probs of shape {tuple(log_probs.shape)}")
        if blank_id == eos_id:
            raise ValueError("blank and eos must be different tokens")
        self.blank_id, self.eos_id = blank_id, eos_id
        frames = log_probs.shape[1]
        padding = lengths_to_padding_mask(lengths.to(log_probs.device), frames)
        padded = log_probs.masked_fill(padding[..., None], NEG_INF)
        padded[..., blank_id] = padded[..., blank_id].masked_fill(padding, 0.0)
        self.frames = padded.transpose(0, 1).contiguous()  # (T, B, V)

    def initial_state(self, utterance: torch.Tensor) -> CtcPrefixState:
        """The empty prefix for each batch row in `utterance` (N,): ψ = 1, only blanks so far."""
        utterance = utterance.to(self.frames.device)
        blank_paths = self.frames[:, utterance, self.blank_id].cumsum(0)
        r = torch.stack([torch.full_like(blank_paths, NEG_INF), blank_paths], dim=1)
        count = utterance.shape[0]
        return CtcPrefixState(r=r, score=torch.zeros(count, device=r.device),
                              last=torch.full((count,), -1, dtype=torch.long, device=r.device),
                              length=torch.zeros(count, dtype=torch.long, device=r.device), utterance=utterance)

    def extend(self, state: CtcPrefixState, tokens: torch.Tensor) -> CtcExtensions:
        """log ψ(g·c) for every hypothesis g (N) and candidate c in `tokens` (N, K)."""
        if bool((tokens == self.blank_id).any()):
            raise ValueError("blank is not an output token and cannot extend a prefix")
        frames = self.frames.shape[0]
        y = self.frames[:, state.utterance[:, None], tokens]                    # (T, N, K) log y_t^c
        y_blank = self.frames[:, state.utterance, self.blank_id][..., None]      # (T, N, 1)
        r_n_g, r_b_g = state.r[:, 0, :, None], state.r[:, 1, :, None]           # (T, N, 1)
        phi = torch.where(tokens == state.last[:, None], r_b_g, torch.logaddexp(r_n_g, r_b_g))  # (T, N, K)

        r = torch.full((frames, 2) + tokens.shape, NEG_INF, device=y.device, dtype=y.dtype)
        r[0, 0] = torch.where(state.length[:, None] == 0, y[0], torch.full_like(y[0], NEG_INF))
        # h has |g| + 1 labels, so r_t(h) = 0 before frame |g| + 1: start the recursion there.
        start = max(1, int(state.length.min()))
        for t in range(start, frames):
            r[t, 0] = torch.logaddexp(r[t - 1, 0], phi[t - 1]) + y[t]
            r[t, 1] = torch.logaddexp(r[t - 1, 0], r[t - 1, 1]) + y_blank[t]
        scores = torch.logsumexp(torch.cat([r[start - 1, :1, ...], phi[start - 1:-1] + y[start:]]), dim=0)

        full_sequence = torch.logaddexp(state.r[-1, 0], state.r[-1, 1])         # (N,) log p_ctc(g | X)
        scores = torch.where(tokens == self.eos_id, full_sequence[:, None], scores)
        return CtcExtensions(parent=state, tokens=tokens, scores=scores, r=r)
