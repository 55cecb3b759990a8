"""Token language models for shallow fusion, over the ASR tokenizer's vocabulary.

Two architectures, chosen in YAML (`lm: {name: lstm|transformer, ...}`):
  * LSTM LM (Zaremba et al., 2014; defaults = their "medium" model),
  * causal Transformer LM (Baevski & Auli, 2019; defaults = fairseq's `transformer_lm`).

A sentence y_1..y_L is modelled as p(y) = Π_i p(y_i | <sos>, y_<i) · p(<eos> | <sos>, y), with
<sos/eos> = 1 both the start symbol fed first and the end symbol predicted last; <blk> = 0 is
never predicted (its log-probability is −inf).

Decoding interface, used by every beam search (CTC prefix, attention, transducer):
    state = lm.initial_state(N)                       # N empty histories
    log_probs, state = lm.step(prev_tokens, state)    # prev (N,) long; log_probs (N, V) float32
    state = lm.select_state(state, indices)           # gather / duplicate histories (indices (M,))
    state = lm.concat_states([state_a, state_b])      # histories of several states in one
Feed prev = <sos/eos> first; the log-probs returned after feeding y_<i are log p(· | y_<i).
States are opaque: only these methods (and the search's bookkeeping of rows) touch them.
"""

from dataclasses import dataclass, fields
from pathlib import Path
from typing import Dict, List, Sequence, Tuple, Union

import torch
from torch import nn
import torch.nn.functional as F

from sslasr.models.blocks.positional import SinusoidalPositionalEncoding
from sslasr.models.blocks.transformer import TransformerConfig, TransformerLayer

BLANK_ID = 0
SOS_EOS_ID = 1
IGNORE = -100  # target padding


class TokenLM(nn.Module):
    """Shared behaviour: teacher-forced batches, the training loss, sentence scores."""

    vocab_size: int

    def logits(self, inputs: torch.Tensor) -> torch.Tensor:
        """(B, L) input tokens (<sos> first, right-padded) → (B, L, V) next-token logits."""
        raise NotImplementedError

    def _log_softmax(self, logits: torch.Tensor) -> torch.Tensor:
        """Next-token log-probabilities in float32, blank excluded (−inf)."""
        blank = torch.tensor([BLANK_ID], device=logits.device)
        return F.log_softmax(logits.float().index_fill(-1, blank, float("-inf")), dim=-1)

    def forward(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Summed negative log-likelihood of `targets` (padding = IGNORE) given `inputs`."""
        log_probs = self._log_softmax(self.logits(inputs))
        return F.nll_loss(log_probs.flatten(0, 1), targets.flatten(), ignore_index=IGNORE, reduction="sum")

    @torch.no_grad()
    def score_sequences(self, sequences: Sequence[Sequence[int]]) -> torch.Tensor:
        """log p(y) including the final <eos>, one float per token sequence (B,)."""
        inputs, targets = teacher_forcing_batch(sequences, self.vocab_size)
        device = next(self.parameters()).device
        inputs, targets = inputs.to(device), targets.to(device)
        log_probs = self._log_softmax(self.logits(inputs))
        picked = log_probs.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        return picked.masked_fill(targets == IGNORE, 0.0).sum(-1)

    # decoding interface (see the module docstring)
    def initial_state(self, batch_size: int):
        raise NotImplementedError

    def step(self, prev_tokens: torch.Tensor, state) -> Tuple[torch.Tensor, object]:
        raise NotImplementedError

    def select_state(self, state, indices: torch.Tensor):
        raise NotImplementedError

    def concat_states(self, states: List):
        raise NotImplementedError


def teacher_forcing_batch(sequences: Sequence[Sequence[int]], vocab_size: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Token lists → inputs [<sos>, y...] (padded with blank, which is never a target) and
    targets [y..., <eos>] (padded with IGNORE), each (B, max_len + 1)."""
    if not sequences:
        raise ValueError("no sequences to score")
    width = max(len(s) for s in sequences) + 1
    inputs = torch.full((len(sequences), width), BLANK_ID, dtype=torch.long)
    targets = torch.full((len(sequences), width), IGNORE, dtype=torch.long)
    for row, seq in enumerate(sequences):
        seq = [int(t) for t in seq]
        bad = [t for t in seq if t in (BLANK_ID, SOS_EOS_ID) or not 0 <= t < vocab_size]
        if bad:
            raise ValueError(f"token ids {bad[:5]} cannot occur inside an LM sentence (vocab {vocab_size}; "
                             f"{BLANK_ID} = blank and {SOS_EOS_ID} = <sos/eos> are reserved)")
        inputs[row, : len(seq) + 1] = torch.tensor([SOS_EOS_ID] + seq)
        targets[row, : len(seq) + 1] = torch.tensor(seq + [SOS_EOS_ID])
    return inputs, targets


# ---------------------------------------------------------------------------- LSTM
@dataclass
class LstmLmConfig:
    embed_dim: int = 650
    hidden_dim: int = 650
    layers: int = 2
    dropout: float = 0.5
    tie_weights: bool = False  # output projection = input embedding (needs hidden_dim == embed_dim)


class LstmLM(TokenLM):
    """embedding → dropout → L-layer LSTM → dropout → linear; state = (h, c), each (L, N, H)."""

    def __init__(self, vocab_size: int, cfg: LstmLmConfig):
        super().__init__()
        self.vocab_size, self.cfg = vocab_size, cfg
        self.embedding = nn.Embedding(vocab_size, cfg.embed_dim)
        self.dropout = nn.Dropout(cfg.dropout)
        self.lstm = nn.LSTM(cfg.embed_dim, cfg.hidden_dim, cfg.layers, batch_first=True,
                            dropout=cfg.dropout if cfg.layers > 1 else 0.0)
        self.lstm_dropout = nn.Dropout(cfg.dropout)  # between layers, as nn.LSTM's own dropout
        self.output = nn.Linear(cfg.hidden_dim, vocab_size)
        if cfg.tie_weights:
            if cfg.hidden_dim != cfg.embed_dim:
                raise ValueError(f"tie_weights needs hidden_dim == embed_dim, got {cfg.hidden_dim} and {cfg.embed_dim}")
            self.output.weight = self.embedding.weight

    def logits(self, inputs: torch.Tensor) -> torch.Tensor:
        hidden, _ = self.lstm(self.dropout(self.embedding(inputs)))
        return self.output(self.dropout(hidden))

    def initial_state(self, batch_size: int) -> Tuple[torch.Tensor, torch.Tensor]:
        weight = self.output.weight
        zeros = weight.new_zeros(self.cfg.layers, batch_size, self.cfg.hidden_dim)
        return zeros, zeros.clone()

    def step(self, prev_tokens: torch.Tensor, state):
        """One time step, written out with the LSTM's own weights: for the few rows of a beam,
        nn.LSTM's per-call overhead costs several times these few matmuls (gate order i, f, g, o)."""
        x = self.dropout(self.embedding(prev_tokens))
        hs, cs = [], []
        for layer in range(self.cfg.layers):
            if layer:
                x = self.lstm_dropout(x)
            gates = (F.linear(x, getattr(self.lstm, f"weight_ih_l{layer}"), getattr(self.lstm, f"bias_ih_l{layer}"))
                     + F.linear(state[0][layer], getattr(self.lstm, f"weight_hh_l{layer}"),
                                getattr(self.lstm, f"bias_hh_l{layer}")))
            i, f, g, o = gates.chunk(4, dim=-1)
            c = torch.sigmoid(f) * state[1][layer] + torch.sigmoid(i) * torch.tanh(g)
            x = torch.sigmoid(o) * torch.tanh(c)
            hs.append(x)
            cs.append(c)
        return self._log_softmax(self.output(self.dropout(x))), (torch.stack(hs), torch.stack(cs))

    def select_state(self, state, indices: torch.Tensor):
        return state[0].index_select(1, indices), state[1].index_select(1, indices)

    def concat_states(self, states: List):
        return torch.cat([s[0] for s in states], dim=1), torch.cat([s[1] for s in states], dim=1)


# ---------------------------------------------------------------------------- Transformer
@dataclass
class TransformerLmConfig:
    dim: int = 512
    layers: int = 6
    heads: int = 8
    ffn_dim: int = 2048
    dropout: float = 0.1
    attention_dropout: float = 0.0
    activation_dropout: float = 0.0
    layer_norm_first: bool = False  # fairseq transformer_lm: post-LN
    tie_weights: bool = False       # fairseq: share_decoder_input_output_embed off


class TransformerLM(TokenLM):
    """Scaled token embedding + sinusoidal positions → causal Transformer layers → linear.
    The layers are the shared `TransformerLayer`s, so their feed-forward activation is GELU
    (fairseq's transformer_lm defaults to ReLU).

    State (a dict) for N histories: per layer cached keys/values (N, H, t, d) and `lengths`
    (N,). Histories of different lengths share one tensor by left-padding: row n's keys are
    the last lengths[n] columns, so appending a column keeps them contiguous and selecting
    rows can trim columns no row uses."""

    def __init__(self, vocab_size: int, cfg: TransformerLmConfig):
        super().__init__()
        self.vocab_size, self.cfg = vocab_size, cfg
        self.embedding = nn.Embedding(vocab_size, cfg.dim)
        self.embed_scale = cfg.dim ** 0.5
        self.positions = SinusoidalPositionalEncoding(cfg.dim)
        self.dropout = nn.Dropout(cfg.dropout)
        block = TransformerConfig(dim=cfg.dim, layers=cfg.layers, heads=cfg.heads, ffn_dim=cfg.ffn_dim,
                                  dropout=cfg.dropout, attention_dropout=cfg.attention_dropout,
                                  activation_dropout=cfg.activation_dropout, layer_norm_first=cfg.layer_norm_first)
        self.layers = nn.ModuleList(TransformerLayer(block) for _ in range(cfg.layers))
        # pre-LN stacks end with a LayerNorm (post-LN layers already end normalised)
        self.final_norm = nn.LayerNorm(cfg.dim) if cfg.layer_norm_first else nn.Identity()
        self.output = nn.Linear(cfg.dim, vocab_size)
        if cfg.tie_weights:
            self.output.weight = self.embedding.weight

    def _embed(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.embedding(tokens) * self.embed_scale + self.positions(positions))

    def logits(self, inputs: torch.Tensor) -> torch.Tensor:
        length = inputs.shape[1]
        x = self._embed(inputs, torch.arange(length, device=inputs.device))
        causal = torch.ones(length, length, dtype=torch.bool, device=inputs.device).tril()
        for layer in self.layers:
            x = layer(x, causal)
        return self.output(self.final_norm(x))

    def initial_state(self, batch_size: int) -> Dict:
        weight = self.output.weight
        head_dim = self.cfg.dim // self.cfg.heads
        empty = weight.new_zeros(batch_size, self.cfg.heads, 0, head_dim)
        return {"keys": [empty] * self.cfg.layers, "values": [empty] * self.cfg.layers,
                "lengths": torch.zeros(batch_size, dtype=torch.long, device=weight.device)}

    def step(self, prev_tokens: torch.Tensor, state: Dict):
        lengths = state["lengths"]
        x = self._embed(prev_tokens.unsqueeze(1), lengths.unsqueeze(1))
        width = state["keys"][0].shape[2]
        # column j of row n is a real key iff j ≥ width − lengths[n]; the new column always is
        keep = torch.arange(width + 1, device=x.device) >= (width - lengths).unsqueeze(1)
        keys, values = [], []
        for layer, k, v in zip(self.layers, state["keys"], state["values"]):
            x, (k, v) = layer.forward_step(x, (k, v), keep)
            keys.append(k)
            values.append(v)
        log_probs = self._log_softmax(self.output(self.final_norm(x[:, 0])))
        return log_probs, {"keys": keys, "values": values, "lengths": lengths + 1}

    def select_state(self, state: Dict, indices: torch.Tensor) -> Dict:
        lengths = state["lengths"].index_select(0, indices)
        width = state["keys"][0].shape[2]
        start = width - int(lengths.max()) if len(lengths) else width  # columns no selected row uses
        return {"keys": [k.index_select(0, indices)[:, :, start:] for k in state["keys"]],
                "values": [v.index_select(0, indices)[:, :, start:] for v in state["values"]],
                "lengths": lengths}

    def concat_states(self, states: List[Dict]) -> Dict:
        width = max(s["keys"][0].shape[2] for s in states)

        def left_pad(t: torch.Tensor) -> torch.Tensor:
            return F.pad(t, (0, 0, width - t.shape[2], 0))

        return {"keys": [torch.cat([left_pad(s["keys"][i]) for s in states]) for i in range(self.cfg.layers)],
                "values": [torch.cat([left_pad(s["values"][i]) for s in states]) for i in range(self.cfg.layers)],
                "lengths": torch.cat([s["lengths"] for s in states])}


# ---------------------------------------------------------------------------- building, loading
LMS = {"lstm": (LstmLM, LstmLmConfig), "transformer": (TransformerLM, TransformerLmConfig)}


def build_lm(cfg: Dict, vocab_size: int) -> TokenLM:
    """`cfg` is the YAML `lm` section: {name: lstm|transformer, <config fields>}."""
    options = dict(cfg)
    name = options.pop("name", None)
    if name not in LMS:
        raise ValueError(f"lm.name must be one of {sorted(LMS)}, got {name!r}")
    model_class, config_class = LMS[name]
    known = {f.name for f in fields(config_class)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ValueError(f"unknown {name} LM options {unknown}; known: {sorted(known)}")
    return model_class(vocab_size, config_class(**options))


def load_lm(path: Union[str, Path], device: Union[str, torch.device] = "cpu") -> TokenLM:
    """A trained LM (model_final.pt or checkpoint_last.pt of an `lm` task), in eval mode."""
    checkpoint = torch.load(path, map_location=device, weights_only=False)
    cfg = checkpoint.get("config", {})
    if "lm" not in cfg or cfg.get("task") != "lm":
        raise ValueError(f"{path} is not a language-model checkpoint (config task={cfg.get('task')!r})")
    state = checkpoint["model"]
    lm = build_lm(cfg["lm"], vocab_size=state["embedding.weight"].shape[0])
    lm.load_state_dict(state)
    return lm.to(device).eval()
