"""RNN-transducer head (Graves, 2012, "Sequence Transduction with Recurrent Neural Networks").

    encoder frame h_t ───────────── encoder_proj ───┐
                                                    ├─ tanh ─ output ─ z(t, u) ∈ R^V   (blank = 0)
    tokens ∅, y_1..y_u ─ prediction net ─ g_u ─ predictor_proj ─┘
p(k | t, u) = softmax(z(t, u))_k, and training minimises −log p(y | x), summed over every
alignment of the tokens to the frames (sslasr/losses/rnnt.py). The prediction network reads the
tokens emitted so far, starting from blank, which stands in for <sos>. YAML picks one of two:
  * "lstm": embedding → LSTM, as in Graves (2012);
  * "stateless": embeddings of the last `context_size` tokens mixed by a grouped 1-D conv, then
    ReLU (Ghodsi et al., 2020, "RNN-Transducer with stateless prediction network", as icefall
    extends it: context 2, groups of 4 channels). It is a fixed-order token n-gram network.
Loss variants (YAML `loss.variant`):
  * "full": joiner logits for every (t, u), the (B, T, U+1, V) lattice;
  * "pruned": Kuang et al. (2022). A trivial joiner am(h_t) + lm(g_u) gives a "simple" loss and the
    node posteriors that place `prune_range` nodes per frame; the joiner runs only there. The
    objective is simple_loss_scale · simple + pruned.
Decoding (sslasr/models/heads/transducer_search.py): "transducer_greedy" (at most
`max_symbols_per_frame` tokens per frame) and "transducer_beam" (modified beam search, one token
per frame, optional LM shallow fusion).
"""

import logging
from dataclasses import dataclass, field, fields
from typing import Dict, List, Tuple

import torch
from torch import nn
import torch.nn.functional as F

from sslasr.losses.rnnt import (gather_windows, lattice_nll, node_posteriors, prune_ranges, pruned_feasible,
                                pruned_rnnt_loss, rnnt_loss, simple_lattice)
from sslasr.models.heads.transducer_search import greedy_search, modified_beam_search
from sslasr.models.interfaces import DecodeOptions
from sslasr.utils.threads import one_thread

log = logging.getLogger(__name__)

BLANK_ID = 0


# ---------------------------------------------------------------------------- configuration
@dataclass
class PredictorConfig:
    type: str = "stateless"    # "stateless" | "lstm"
    embed_dim: int = 512       # icefall's decoder_dim
    context_size: int = 2      # stateless: tokens the network sees
    conv_group_size: int = 4   # stateless: channels per conv group
    hidden_dim: int = 640      # lstm (Gulati et al., 2020, Conformer transducer: 1 × 640)
    layers: int = 1            # lstm
    dropout: float = 0.0       # lstm: on its input and output


@dataclass
class TransducerLossConfig:
    variant: str = "pruned"    # "full" | "pruned"
    prune_range: int = 5       # pruned: nodes kept per frame (icefall: 5)
    simple_loss_scale: float = 0.5  # pruned: weight of the simple loss (icefall: 0.5)


@dataclass
class TransducerConfig:
    predictor: PredictorConfig = field(default_factory=PredictorConfig)
    joiner_dim: int = 512
    loss: TransducerLossConfig = field(default_factory=TransducerLossConfig)
    max_symbols_per_frame: int = 3  # greedy decoding: bound on tokens emitted per frame

    @classmethod
    def from_dict(cls, d: Dict) -> "TransducerConfig":
        _check_keys(cls, d, "head")
        d = dict(d)
        _check_keys(PredictorConfig, d.get("predictor", {}), "head.predictor")
        _check_keys(TransducerLossConfig, d.get("loss", {}), "head.loss")
        d["predictor"] = PredictorConfig(**d.get("predictor", {}))
        d["loss"] = TransducerLossConfig(**d.get("loss", {}))
        return cls(**d)


def _check_keys(config_class, d: Dict, where: str) -> None:
    unknown = sorted(set(d) - {f.name for f in fields(config_class)})
    if unknown:
        raise ValueError(f"unknown {where} options {unknown}; known: {sorted(f.name for f in fields(config_class))}")


# ---------------------------------------------------------------------------- prediction networks
# Both take (B, L) token ids starting with blank and give (B, L, D); for decoding they step one
# token at a time. States are opaque to the search, which only uses initial_state, step,
# select_state and concat_states (the token LM's interface, sslasr/models/lm.py).
class StatelessPredictor(nn.Module):
    """g_u = ReLU(conv(E y_{u−context+1}, …, E y_u)); blank embeds to 0, so left padding is blank."""

    def __init__(self, vocab_size: int, cfg: PredictorConfig):
        super().__init__()
        if cfg.context_size < 1:
            raise ValueError(f"stateless predictor: context_size must be ≥ 1, got {cfg.context_size}")
        if cfg.context_size > 1 and cfg.embed_dim % cfg.conv_group_size:
            raise ValueError(f"stateless predictor: embed_dim {cfg.embed_dim} is not a multiple of "
                             f"conv_group_size {cfg.conv_group_size}")
        self.context_size = cfg.context_size
        self.output_dim = cfg.embed_dim
        self.embedding = nn.Embedding(vocab_size, cfg.embed_dim, padding_idx=BLANK_ID)
        self.conv = None
        if cfg.context_size > 1:
            self.conv = nn.Conv1d(cfg.embed_dim, cfg.embed_dim, cfg.context_size,
                                  groups=cfg.embed_dim // cfg.conv_group_size, bias=False)

    def _mix(self, embedded: torch.Tensor) -> torch.Tensor:
        """(B, D, context − 1 + L) embeddings → (B, L, D) outputs."""
        if self.conv is not None:
            embedded = self.conv(embedded)
        return F.relu(embedded.transpose(1, 2))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        embedded = self.embedding(tokens).transpose(1, 2)
        return self._mix(F.pad(embedded, (self.context_size - 1, 0)))

    def initial_state(self, batch_size: int) -> torch.Tensor:
        """The last `context_size` tokens read: all blank."""
        return torch.full((batch_size, self.context_size), BLANK_ID, dtype=torch.long,
                          device=self.embedding.weight.device)

    def step(self, tokens: torch.Tensor, state: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        context = torch.cat([state[:, 1:], tokens.unsqueeze(1)], dim=1)
        return self._mix(self.embedding(context).transpose(1, 2))[:, -1], context

    def select_state(self, state: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        return state.index_select(0, indices)

    def concat_states(self, states: List[torch.Tensor]) -> torch.Tensor:
        return torch.cat(states, dim=0)


class LstmPredictor(nn.Module):
    """g_u = LSTM(E ∅, E y_1, …, E y_u); state (h, c), each (layers, N, hidden)."""

    def __init__(self, vocab_size: int, cfg: PredictorConfig):
        super().__init__()
        self.output_dim = cfg.hidden_dim
        self.embedding = nn.Embedding(vocab_size, cfg.embed_dim, padding_idx=BLANK_ID)
        self.dropout = nn.Dropout(cfg.dropout)
        self.lstm = nn.LSTM(cfg.embed_dim, cfg.hidden_dim, cfg.layers, batch_first=True,
                            dropout=cfg.dropout if cfg.layers > 1 else 0.0)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(self.dropout(self.embedding(tokens)))
        return self.dropout(out)

    def initial_state(self, batch_size: int) -> Tuple[torch.Tensor, torch.Tensor]:
        zeros = self.embedding.weight.new_zeros(self.lstm.num_layers, batch_size, self.lstm.hidden_size)
        return zeros, zeros.clone()

    def step(self, tokens: torch.Tensor, state):
        out, state = self.lstm(self.dropout(self.embedding(tokens.unsqueeze(1))), state)
        return self.dropout(out[:, 0]), state

    def select_state(self, state, indices: torch.Tensor):
        return state[0].index_select(1, indices), state[1].index_select(1, indices)

    def concat_states(self, states: List):
        return torch.cat([s[0] for s in states], dim=1), torch.cat([s[1] for s in states], dim=1)


PREDICTORS = {"stateless": StatelessPredictor, "lstm": LstmPredictor}


class Joiner(nn.Module):
    """z = output(tanh(encoder_proj(h_t) + predictor_proj(g_u))). The projections are applied once
    per frame and per token, outside the lattice; `forward` takes them already projected."""

    def __init__(self, encoder_dim: int, predictor_dim: int, joiner_dim: int, vocab_size: int):
        super().__init__()
        self.encoder_proj = nn.Linear(encoder_dim, joiner_dim)
        self.predictor_proj = nn.Linear(predictor_dim, joiner_dim)
        self.output = nn.Linear(joiner_dim, vocab_size)

    def forward(self, encoder: torch.Tensor, predictor: torch.Tensor) -> torch.Tensor:
        return self.output(torch.tanh(encoder + predictor))


# ---------------------------------------------------------------------------- the head
class TransducerHead(nn.Module):
    methods = ("transducer_greedy", "transducer_beam")
    greedy_method = "transducer_greedy"
    blank_id = BLANK_ID

    def __init__(self, encoder_dim: int, vocab_size: int, **cfg):
        super().__init__()
        self.cfg = TransducerConfig.from_dict(cfg)
        predictor_cfg, loss_cfg = self.cfg.predictor, self.cfg.loss
        if predictor_cfg.type not in PREDICTORS:
            raise ValueError(f"head.predictor.type must be one of {sorted(PREDICTORS)}, got {predictor_cfg.type!r}")
        if loss_cfg.variant not in ("full", "pruned"):
            raise ValueError(f"head.loss.variant must be 'full' or 'pruned', got {loss_cfg.variant!r}")
        if loss_cfg.prune_range < 2:
            raise ValueError(f"head.loss.prune_range must be ≥ 2 (a window must hold an emit arc), "
                             f"got {loss_cfg.prune_range}")
        if self.cfg.max_symbols_per_frame < 1:
            raise ValueError(f"head.max_symbols_per_frame must be ≥ 1, got {self.cfg.max_symbols_per_frame}")
        self.vocab_size = vocab_size
        self.predictor = PREDICTORS[predictor_cfg.type](vocab_size, predictor_cfg)
        self.joiner = Joiner(encoder_dim, self.predictor.output_dim, self.cfg.joiner_dim, vocab_size)
        if loss_cfg.variant == "pruned":  # the trivial joiner of the simple loss
            self.simple_am_proj = nn.Linear(encoder_dim, vocab_size)
            self.simple_lm_proj = nn.Linear(self.predictor.output_dim, vocab_size)

    def _targets(self, tokens: List[List[int]], device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
        """Token lists → (B, U) targets padded with blank, and their lengths (B,)."""
        lengths = torch.tensor([len(seq) for seq in tokens], dtype=torch.long)
        targets = torch.full((len(tokens), max((len(seq) for seq in tokens), default=0)), BLANK_ID, dtype=torch.long)
        for row, seq in enumerate(tokens):
            targets[row, :len(seq)] = torch.as_tensor(seq, dtype=torch.long)
        return targets.to(device), lengths.to(device)

    def loss(self, hidden: torch.Tensor, lengths: torch.Tensor, tokens: List[List[int]]) -> torch.Tensor:
        """Summed −log p(y|x) over the batch (pruned: simple_loss_scale · simple + pruned)."""
        if len(tokens) != hidden.shape[0]:
            raise ValueError(f"{len(tokens)} token sequences for a batch of {hidden.shape[0]}")
        targets, target_lengths, predicted, encoder, predictor = self._projected(hidden, tokens)
        if self.cfg.loss.variant == "full":
            logits = self.joiner(encoder.unsqueeze(2), predictor.unsqueeze(1))
            return rnnt_loss(logits, targets, lengths, target_lengths, BLANK_ID, reduction="sum")
        return self._pruned_loss(hidden, lengths, targets, target_lengths, predicted, encoder, predictor)

    def log_likelihood(self, hidden: torch.Tensor, lengths: torch.Tensor, tokens: List[List[int]]) -> torch.Tensor:
        """(B,) log p(tokens | hidden) over the full lattice, whichever loss trained the head (the
        pruned objective adds the simple loss, and counts 0 for more tokens than its windows hold)."""
        targets, target_lengths, _, encoder, predictor = self._projected(hidden, tokens)
        logits = self.joiner(encoder.unsqueeze(2), predictor.unsqueeze(1))
        return -rnnt_loss(logits, targets, lengths, target_lengths, BLANK_ID, reduction="none")

    def _projected(self, hidden: torch.Tensor, tokens: List[List[int]]):
        """(targets, target lengths, predictor outputs g_0 … g_U, and the joiner's projections of
        the encoder and predictor outputs)."""
        targets, target_lengths = self._targets(tokens, hidden.device)
        predicted = self.predictor(F.pad(targets, (1, 0), value=BLANK_ID))   # g_0 … g_U
        return (targets, target_lengths, predicted, self.joiner.encoder_proj(hidden),
                self.joiner.predictor_proj(predicted))

    def _pruned_loss(self, hidden, lengths, targets, target_lengths, predicted, encoder, predictor) -> torch.Tensor:
        blank, emit = simple_lattice(self.simple_am_proj(hidden), self.simple_lm_proj(predicted), targets,
                                     target_lengths, BLANK_ID)
        simple = lattice_nll(blank, emit, lengths, target_lengths)
        s_range = min(self.cfg.loss.prune_range, targets.shape[1] + 1)
        starts = prune_ranges(node_posteriors(blank.detach(), emit.detach(), lengths, target_lengths),
                              lengths, target_lengths, s_range)
        logits = self.joiner(encoder.unsqueeze(2), gather_windows(predictor, starts, s_range))
        pruned = pruned_rnnt_loss(logits, starts, targets, lengths, target_lengths, BLANK_ID, reduction="none")
        infeasible = int((~pruned_feasible(lengths, target_lengths, s_range)).sum())
        if infeasible:
            log.warning("%d utterance(s) have more tokens than frames × (prune_range − 1); their pruned "
                        "loss is 0 (raise head.loss.prune_range)", infeasible)
        return self.cfg.loss.simple_loss_scale * simple.sum() + pruned.sum()

    def decode(self, hidden: torch.Tensor, lengths: torch.Tensor, method: str,
               options: DecodeOptions = DecodeOptions()) -> List[List[int]]:
        if method == "transducer_greedy":
            max_symbols = options.extra.get("max_symbols_per_frame", self.cfg.max_symbols_per_frame)
            with one_thread():
                return greedy_search(self, hidden, lengths, max_symbols)
        if method == "transducer_beam":
            with one_thread():
                return modified_beam_search(self, hidden, lengths, options.beam_size, options.lm,
                                            options.lm_weight, options.length_bonus)
        raise ValueError(f"transducer head cannot decode with {method!r}; available: {', '.join(self.methods)}")
