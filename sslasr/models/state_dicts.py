"""Checking a state dict against the one a module expects, before anything is copied."""

from typing import Callable, Dict, List, Optional

import torch


def state_dict_mismatches(loaded: Dict[str, torch.Tensor], wanted: Dict[str, torch.Tensor], shown: int = 10,
                          loaded_name: Optional[Callable[[str], str]] = None) -> List[str]:
    """What keeps LOADED from replacing WANTED: missing, unexpected and reshaped tensors, one
    entry per kind, naming the first SHOWN of each (a wrong frontend mismatches hundreds).
    `loaded_name` gives the name to show for a loaded tensor (an importer shows the checkpoint's
    own name for a tensor it renamed); missing tensors are named as WANTED names them."""
    show = loaded_name or (lambda name: name)
    missing = [k for k in wanted if k not in loaded]
    unexpected = [show(k) for k in loaded if k not in wanted]
    reshaped = [f"{show(k)} (checkpoint {tuple(v.shape)}, model {tuple(wanted[k].shape)})"
                for k, v in loaded.items() if k in wanted and v.shape != wanted[k].shape]
    return [listed_names(kind, names, shown) for kind, names in
            (("missing", missing), ("unexpected", unexpected), ("shape mismatch", reshaped)) if names]


def listed_names(kind: str, names: List[str], shown: int = 10) -> str:
    """One entry, e.g. "3 missing: a, b, c", naming the first SHOWN of NAMES."""
    more = f", and {len(names) - shown} more" if len(names) > shown else ""
    return f"{len(names)} {kind}: {', '.join(names[:shown])}{more}"
