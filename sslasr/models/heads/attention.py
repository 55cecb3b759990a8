"""Attention encoder-decoder head trained jointly with CTC (Kim, Hori & Watanabe, 2017).

An LSTM decoder attends over the encoder states h_1..h_T; at output step i (input feeding as
in Luong et al., 2015: the previous attentional vector h̃_{i-1} is part of the input):
    s_i   = LSTM([E y_{i-1}; h̃_{i-1}], s_{i-1})          y_0 = <sos>, h̃_0 = 0
    e_i,t = wᵀ tanh(W s_i + V h_t + U f_i,t + b)        additive (Bahdanau et al., 2015) without U f;
            f_i = F * α_{i-1}                            location-aware (Chorowski et al., 2015) with it
    α_i   = softmax_t(e_i) over the valid frames,        c_i = Σ_t α_i,t h_t
    h̃_i   = tanh(W_c [s_i; c_i])
    p(y_i | y_<i, X) = softmax(W_o h̃_i)
Training is teacher-forced over y_1..y_U, <eos>; the loss is (1−λ)·L_att + λ·L_ctc with L_att
the label-smoothed cross entropy, and L_ctc from a CTC layer on the same encoder states.
<sos> = <eos> = token 1 and blank = token 0 (the tokenizer's convention); blank is never output.
"""

from dataclasses import dataclass, fields
from typing import List, Tuple

import torch
from torch import nn
import torch.nn.functional as F

from sslasr.models.blocks.conv_extractor import lengths_to_padding_mask
from sslasr.decoding.attention_beam_search import ScoredHypothesis, joint_beam_search, max_output_lengths
from sslasr.models.heads.ctc import CtcHead
from sslasr.models.interfaces import DecodeOptions

ATTENTION_TYPES = ("location", "additive")


@dataclass
class AttentionHeadConfig:
    """Defaults: the w2v-BERT paper's 2 × 640 LSTM decoder; location-aware attention with ESPnet's
    10 filters of width 201; λ = 0.3 and ε = 0.1 as in ESPnet's LibriSpeech recipes."""

    embedding_dim: int = 640
    decoder_dim: int = 640
    decoder_layers: int = 2
    attention: str = "location"     # "location" (Chorowski) or "additive" (Bahdanau)
    attention_dim: int = 640
    location_channels: int = 10
    location_kernel: int = 201      # odd: the filter is centred on each frame
    dropout: float = 0.1
    ctc_weight: float = 0.3         # λ
    label_smoothing: float = 0.1    # ε
    blank_id: int = 0
    sos_eos_id: int = 1

    def __post_init__(self):
        if self.attention not in ATTENTION_TYPES:
            raise ValueError(f"head.attention must be one of {ATTENTION_TYPES}, got {self.attention!r}")
        if self.attention == "location" and (self.location_kernel < 1 or self.location_kernel % 2 == 0):
            raise ValueError(f"head.location_kernel must be a positive odd width, got {self.location_kernel}")
        if not 0.0 <= self.ctc_weight < 1.0:  # at 1 the decoder learns nothing, and validation decodes with it
            raise ValueError(f"head.ctc_weight must be in [0, 1), got {self.ctc_weight}: at 1 the attention decoder "
                             f"gets no gradient (for CTC alone, head.name: ctc)")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"head.label_smoothing must be in [0, 1), got {self.label_smoothing}")
        if self.decoder_layers < 1:
            raise ValueError(f"head.decoder_layers must be at least 1, got {self.decoder_layers}")
        if self.blank_id == self.sos_eos_id:
            raise ValueError("head.blank_id and head.sos_eos_id must differ")


@dataclass
class EncoderMemory:
    """What every decoder step attends over, computed once per utterance."""

    values: torch.Tensor   # (N, T, D) encoder states h_t
    keys: torch.Tensor     # (N, T, A) V h_t + b
    padding: torch.Tensor  # (N, T) True = padded frame

    def repeat_interleave(self, times: int) -> "EncoderMemory":
        """Each utterance `times` times in a row (one copy per beam slot)."""
        return EncoderMemory(*(t.repeat_interleave(times, dim=0) for t in (self.values, self.keys, self.padding)))


@dataclass
class DecoderState:
    hidden: torch.Tensor       # (L, N, H) LSTM h
    cell: torch.Tensor         # (L, N, H) LSTM c
    attentional: torch.Tensor  # (N, H) h̃_{i-1}
    alignment: torch.Tensor    # (N, T) α_{i-1}

    def select(self, index: torch.Tensor) -> "DecoderState":
        return DecoderState(self.hidden[:, index], self.cell[:, index], self.attentional[index], self.alignment[index])


class AdditiveAttention(nn.Module):
    """e_t = wᵀ tanh(W s + V h_t + U f_t + b); location-aware when location_channels > 0, where
    f = F * α_prev are convolved previous weights (Chorowski et al., 2015, eq. 8-9)."""

    def __init__(self, encoder_dim: int, query_dim: int, attention_dim: int, location_channels: int = 0,
                 location_kernel: int = 1):
        super().__init__()
        self.key = nn.Linear(encoder_dim, attention_dim)                   # V, b
        self.query = nn.Linear(query_dim, attention_dim, bias=False)       # W
        self.energy = nn.Linear(attention_dim, 1, bias=False)              # w
        self.location_conv = self.location = None
        if location_channels > 0:
            self.location_conv = nn.Conv1d(1, location_channels, location_kernel, padding=location_kernel // 2,
                                           bias=False)                     # F
            self.location = nn.Linear(location_channels, attention_dim, bias=False)  # U

    def forward(self, query: torch.Tensor, memory: EncoderMemory, previous: torch.Tensor
                ) -> Tuple[torch.Tensor, torch.Tensor]:
        """query (N, Q), previous α (N, T) → context c (N, D), weights α (N, T)."""
        features = memory.keys + self.query(query)[:, None, :]
        if self.location_conv is not None:
            convolved = self.location_conv(previous[:, None, :]).transpose(1, 2)  # (N, T, channels)
            features = features + self.location(convolved)
        energies = self.energy(torch.tanh(features)).squeeze(-1).masked_fill(memory.padding, float("-inf"))
        weights = torch.softmax(energies, dim=-1)
        return torch.bmm(weights[:, None, :], memory.values).squeeze(1), weights


class AttentionHead(nn.Module):
    methods = ("attention_greedy", "attention_beam")
    greedy_method = "attention_greedy"

    def __init__(self, encoder_dim: int, vocab_size: int, **cfg):
        super().__init__()
        known = {f.name for f in fields(AttentionHeadConfig)}
        unknown = sorted(set(cfg) - known)
        if unknown:
            raise ValueError(f"unknown attention head option(s) {unknown}; known: {sorted(known)}")
        self.cfg = c = AttentionHeadConfig(**cfg)
        if vocab_size <= max(c.blank_id, c.sos_eos_id) + 1:
            raise ValueError(f"vocab size {vocab_size} leaves no tokens besides blank and <sos/eos>")
        self.vocab_size, self.blank_id, self.sos_eos_id = vocab_size, c.blank_id, c.sos_eos_id
        self.ctc = CtcHead(encoder_dim, vocab_size, c.dropout, c.blank_id) if c.ctc_weight > 0 else None
        self.embedding = nn.Embedding(vocab_size, c.embedding_dim)
        self.lstm = nn.LSTM(c.embedding_dim + c.decoder_dim, c.decoder_dim, c.decoder_layers, batch_first=True,
                            dropout=c.dropout if c.decoder_layers > 1 else 0.0)
        location_channels = c.location_channels if c.attention == "location" else 0
        self.attention = AdditiveAttention(encoder_dim, c.decoder_dim, c.attention_dim, location_channels,
                                           c.location_kernel)
        self.attentional = nn.Linear(c.decoder_dim + encoder_dim, c.decoder_dim)  # W_c
        self.output = nn.Linear(c.decoder_dim, vocab_size)                         # W_o
        self.dropout = nn.Dropout(c.dropout)

    # ------------------------------------------------------------------ decoder
    def prepare(self, hidden: torch.Tensor, lengths: torch.Tensor) -> EncoderMemory:
        padding = lengths_to_padding_mask(lengths.to(hidden.device), hidden.shape[1])
        return EncoderMemory(values=hidden, keys=self.attention.key(hidden), padding=padding)

    def initial_state(self, memory: EncoderMemory) -> DecoderState:
        """Zero LSTM state and h̃_0; α_0 uniform over the valid frames (what the location filter sees first)."""
        count, dim = memory.values.shape[0], self.cfg.decoder_dim
        zeros = memory.values.new_zeros(self.cfg.decoder_layers, count, dim)
        valid = (~memory.padding).to(memory.values.dtype)
        return DecoderState(zeros, zeros.clone(), memory.values.new_zeros(count, dim),
                            valid / valid.sum(-1, keepdim=True))

    def step(self, memory: EncoderMemory, previous_tokens: torch.Tensor, state: DecoderState
             ) -> Tuple[torch.Tensor, DecoderState]:
        """One output step: (N,) previous tokens → (N, V) logits of the next token, new state."""
        inputs = torch.cat([self.dropout(self.embedding(previous_tokens)), state.attentional], dim=-1)
        output, (hidden, cell) = self.lstm(inputs[:, None, :], (state.hidden, state.cell))
        query = self.dropout(output.squeeze(1))
        context, alignment = self.attention(query, memory, state.alignment)
        attentional = torch.tanh(self.attentional(torch.cat([query, context], dim=-1)))
        logits = self.output(self.dropout(attentional)).float()
        return logits, DecoderState(hidden, cell, attentional, alignment)

    def teacher_forced_logits(self, hidden: torch.Tensor, lengths: torch.Tensor, tokens: List[List[int]]
                              ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Logits (B, U+1, V) for y_1..y_U, <eos> given the true history, and those targets
        (B, U+1) with -100 after each utterance's <eos>."""
        self._check_tokens(tokens, hidden.shape[0])
        steps = max(len(seq) for seq in tokens) + 1
        targets = torch.full((len(tokens), steps), -100, dtype=torch.long)
        inputs = torch.full((len(tokens), steps), self.sos_eos_id, dtype=torch.long)
        for row, seq in enumerate(tokens):
            targets[row, :len(seq) + 1] = torch.tensor(seq + [self.sos_eos_id], dtype=torch.long)
            inputs[row, 1:len(seq) + 1] = torch.tensor(seq, dtype=torch.long)
        inputs, targets = inputs.to(hidden.device), targets.to(hidden.device)
        memory = self.prepare(hidden, lengths)
        state = self.initial_state(memory)
        logits = []
        for i in range(steps):
            step_logits, state = self.step(memory, inputs[:, i], state)
            logits.append(step_logits)
        return torch.stack(logits, dim=1), targets

    # ------------------------------------------------------------------ training
    def loss(self, hidden: torch.Tensor, lengths: torch.Tensor, tokens: List[List[int]]) -> torch.Tensor:
        """(1−λ)·L_att + λ·L_ctc, each summed over the batch."""
        weight = self.cfg.ctc_weight
        total = hidden.new_zeros((), dtype=torch.float32)
        if weight < 1.0:
            total = total + (1.0 - weight) * self.attention_loss(hidden, lengths, tokens)
        if self.ctc is not None:
            total = total + weight * self.ctc.loss(hidden, lengths, tokens)
        return total

    def attention_loss(self, hidden: torch.Tensor, lengths: torch.Tensor, tokens: List[List[int]]) -> torch.Tensor:
        """Cross entropy against (1−ε)·one-hot + ε·uniform over the vocabulary, summed over tokens."""
        logits, targets = self.teacher_forced_logits(hidden, lengths, tokens)
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100,
                               label_smoothing=self.cfg.label_smoothing, reduction="sum")

    def sequence_log_probs(self, hidden: torch.Tensor, lengths: torch.Tensor, tokens: List[List[int]]) -> torch.Tensor:
        """(B,) log p_att(y_1..y_U, <eos> | X), no smoothing: what the searches' attention scores sum."""
        logits, targets = self.teacher_forced_logits(hidden, lengths, tokens)
        log_probs = torch.log_softmax(logits, dim=-1)
        picked = log_probs.gather(-1, targets.clamp(min=0)[..., None]).squeeze(-1)
        return picked.masked_fill(targets < 0, 0.0).sum(-1)

    def log_likelihood(self, hidden: torch.Tensor, lengths: torch.Tensor, tokens: List[List[int]]) -> torch.Tensor:
        """(B,) (1−λ)·log p_att + λ·log p_ctc, the joint score of decoding (λ = ctc_weight; no
        label smoothing): −inf for tokens the CTC layer cannot align to the frames."""
        weight = self.cfg.ctc_weight
        score = (1.0 - weight) * self.sequence_log_probs(hidden, lengths, tokens)
        if self.ctc is not None and weight > 0:
            score = score + weight * self.ctc.log_likelihood(hidden, lengths, tokens)
        return score

    def ctc_log_probs(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.ctc is None:
            raise ValueError("this attention head was trained with ctc_weight 0 and has no CTC layer; "
                             "decode with ctc_weight 0")
        return self.ctc.log_probs(hidden)

    def _check_tokens(self, tokens: List[List[int]], batch: int) -> None:
        if len(tokens) != batch:
            raise ValueError(f"{len(tokens)} token sequences for a batch of {batch}")
        flat = [t for seq in tokens for t in seq]
        bad = [t for t in flat if not 0 <= t < self.vocab_size or t in (self.blank_id, self.sos_eos_id)]
        if bad:
            raise ValueError(f"targets hold ids {sorted(set(bad))[:10]} that are blank, <sos/eos> or outside "
                             f"the vocabulary of {self.vocab_size}")

    # ------------------------------------------------------------------ decoding
    def decode(self, hidden: torch.Tensor, lengths: torch.Tensor, method: str,
               options: DecodeOptions = DecodeOptions()) -> List[List[int]]:
        """Rows without encoder frames (a cut shorter than the frontend's receptive field, which
        a test set kept whole or made with a small --min-duration can hold) have nothing to attend
        to (α_0 would be 0/0) and no CTC prefix scores: their hypothesis is empty, as in the CTC
        and transducer searches, and the other rows are searched without them."""
        if method not in self.methods:
            raise ValueError(f"attention head cannot decode with {method!r}; available: {', '.join(self.methods)}")
        searched = (lengths > 0).nonzero().flatten().tolist()
        if len(searched) == len(lengths):
            return self._search(hidden, lengths, method, options)
        hyps: List[List[int]] = [[] for _ in range(len(lengths))]
        if searched:
            index = torch.tensor(searched, dtype=torch.long)
            found = self._search(hidden[index.to(hidden.device)], lengths[index.to(lengths.device)], method, options)
            for row, tokens in zip(searched, found):
                hyps[row] = tokens
        return hyps

    def _search(self, hidden: torch.Tensor, lengths: torch.Tensor, method: str,
                options: DecodeOptions) -> List[List[int]]:
        if method == "attention_greedy":
            return [h.tokens for h in self.greedy_search(hidden, lengths, options.max_len_ratio)]
        return [h.tokens for h in joint_beam_search(self, hidden, lengths, options)]

    @torch.no_grad()
    def greedy_search(self, hidden: torch.Tensor, lengths: torch.Tensor, max_len_ratio: float = 1.0
                      ) -> List[ScoredHypothesis]:
        """The most likely next token at every step, until <eos>; at max_len_ratio × frames
        tokens only <eos> is allowed. Scores are log p_att(y, <eos> | X)."""
        max_len = max_output_lengths(lengths, max_len_ratio).to(hidden.device)
        memory = self.prepare(hidden, lengths)
        state = self.initial_state(memory)
        batch = hidden.shape[0]
        previous = torch.full((batch,), self.sos_eos_id, dtype=torch.long, device=hidden.device)
        scores = torch.zeros(batch, device=hidden.device)
        finished = torch.zeros(batch, dtype=torch.bool, device=hidden.device)
        outputs: List[List[int]] = [[] for _ in range(batch)]
        vocab = torch.arange(self.vocab_size, device=hidden.device)
        for i in range(int(max_len.max()) + 1):
            logits, state = self.step(memory, previous, state)
            log_probs = torch.log_softmax(logits, dim=-1)
            allowed = (vocab != self.blank_id)[None, :] & ((vocab == self.sos_eos_id)[None, :] | (i < max_len)[:, None])
            best_score, best = log_probs.masked_fill(~allowed, float("-inf")).max(-1)
            scores += best_score.masked_fill(finished, 0.0)
            for row in (~finished & (best != self.sos_eos_id)).nonzero().flatten().tolist():
                outputs[row].append(int(best[row]))
            finished |= best == self.sos_eos_id
            if bool(finished.all()):
                break
            previous = best
        return [ScoredHypothesis(tokens, float(score), attention=float(score))
                for tokens, score in zip(outputs, scores.tolist())]
