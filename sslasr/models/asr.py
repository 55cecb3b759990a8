"""An ASR model = a frontend encoder (pretrained or not) + a head (CTC, attention, transducer)."""

import logging
from typing import Dict, List, Optional

import torch
from torch import nn

from sslasr.models.frontends import get_frontend
from sslasr.models.heads import build_head
from sslasr.models.interfaces import DecodeOptions
from sslasr.models.state_dicts import state_dict_mismatches

log = logging.getLogger(__name__)


class AsrModel(nn.Module):
    def __init__(self, encoder: nn.Module, head: nn.Module):
        super().__init__()
        self.encoder = encoder
        self.head = head
        self.freeze_encoder = False  # set by the fine-tuning schedule

    def encode(self, inputs: torch.Tensor, input_lens: torch.Tensor):
        # Frozen as fairseq's freeze_finetune_updates freezes: no gradient, the module still in
        # train mode (dropout, and BatchNorm statistics -- w2v-BERT's convolution modules --
        # following the fine-tuning batches)
        if self.freeze_encoder:
            with torch.no_grad():
                return self.encoder(inputs, input_lens)
        return self.encoder(inputs, input_lens)

    def forward(self, inputs: torch.Tensor, input_lens: torch.Tensor, tokens: List[List[int]],
                rows: Optional[List[int]] = None) -> torch.Tensor:
        """The head's loss summed over the batch. An utterance shorter than the frontend's receptive
        field has no encoder frames (evaluation splits keep every utterance): it is left out before
        the encoder, logged. Beside the others its row's attention has no keys, whose NaN reached
        every weight's gradient (WavLM, w2v-BERT); its attention loss was NaN and the transducer's
        an error. ROWS: rows_with_frames(input_lens) where the caller has it (one read of the
        device fewer)."""
        keep = self.rows_with_frames(input_lens) if rows is None else rows
        if len(keep) < len(tokens):
            log.warning("%d of %d utterances have no encoder frames (shorter than the frontend's receptive "
                        "field): left out of the loss", len(tokens) - len(keep), len(tokens))
            if not keep:  # a zero loss with a graph, through the head (the encoder may be frozen)
                return sum(p.sum() for p in self.head.parameters()) * 0.0
            index = torch.tensor(keep, device=inputs.device)
            inputs, input_lens = inputs.index_select(0, index), input_lens.index_select(0, index.to(input_lens.device))
            tokens = [tokens[i] for i in keep]
        out = self.encode(inputs, input_lens)
        return self.head.loss(out.hidden, out.lengths, tokens)

    def rows_with_frames(self, input_lens: torch.Tensor) -> List[int]:
        """The batch rows the encoder gives at least one frame: those the loss scores."""
        frames = self.encoder.feature_extractor.output_lengths(input_lens)
        return [i for i, count in enumerate(frames.tolist()) if count > 0]

    @torch.no_grad()
    def decode(self, inputs: torch.Tensor, input_lens: torch.Tensor, method: str,
               options: DecodeOptions = DecodeOptions()) -> List[List[int]]:
        out = self.encoder(inputs, input_lens)
        return self.head.decode(out.hidden, out.lengths, method, options)

    @torch.no_grad()
    def greedy(self, inputs: torch.Tensor, input_lens: torch.Tensor) -> List[List[int]]:
        return self.decode(inputs, input_lens, self.head.greedy_method)


def build_asr_model(cfg: Dict, vocab_size: int) -> AsrModel:
    frontend = get_frontend(cfg["frontend"])
    encoder = frontend.build_encoder(cfg["frontend"]["encoder"])
    return AsrModel(encoder, build_head(encoder.output_dim, vocab_size, cfg.get("head", {"name": "ctc"})))


def load_encoder_weights(model: nn.Module, checkpoint: str) -> int:
    """Copy `encoder.*` weights from a pretraining checkpoint into `model.encoder` (an ASR model's
    or a pretrainer's). Any missing, unexpected or reshaped tensor is a ValueError naming them,
    raised before anything is copied: a half-loaded encoder must never train."""
    state = torch.load(checkpoint, map_location="cpu", weights_only=False).get("model", {})
    encoder_state = {k[len("encoder."):]: v for k, v in state.items() if k.startswith("encoder.")}
    if not encoder_state:
        raise ValueError(f"{checkpoint} holds no encoder.* weights")
    problems = state_dict_mismatches(encoder_state, model.encoder.state_dict())
    if problems:
        raise ValueError(f"{checkpoint}: its encoder weights do not fit the configured encoder: {'; '.join(problems)}")
    model.encoder.load_state_dict(encoder_state)
    return len(encoder_state)
