"""Head registry: YAML `head.name` → class. A head is built as Head(encoder_dim, vocab_size, cfg)
and follows the contract in `sslasr/models/interfaces.py`. Adding a head = one entry here."""

from typing import Dict

from torch import nn

from sslasr.models.heads.attention import AttentionHead
from sslasr.models.heads.ctc import CtcHead
from sslasr.models.heads.transducer import TransducerHead

HEADS = {"ctc": CtcHead, "attention": AttentionHead, "transducer": TransducerHead}


def build_head(encoder_dim: int, vocab_size: int, cfg: Dict) -> nn.Module:
    name = cfg.get("name", "ctc")
    if name not in HEADS:
        raise ValueError(f"unknown head {name!r}; available: {', '.join(sorted(HEADS))}")
    options = {k: v for k, v in cfg.items() if k != "name"}
    return HEADS[name](encoder_dim, vocab_size, **options)
