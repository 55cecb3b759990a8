"""YAML configs with `_base_` includes and dotted command-line overrides.

A config may start with `_base_: path.yaml` (or a list), relative to the file itself; the
file's own keys are deep-merged over its bases. Merging only adds and replaces; a file that must
take a section away (settings of another encoder family, say) lists it, dotted, under
`_remove_: [frontend.encoder.transformer]`: removed from what was merged before the file (its
bases, and the files before it in load_configs), where present. Overrides `a.b.c=value` are
parsed as YAML values, so `optim.lr=1e-3`, `trainer.max_updates=100`, `init.from=null` all get
their types.
"""

from pathlib import Path
from typing import Any, Dict, Iterable, List, Tuple, Union

import hashlib
import json
import math
import re

import yaml


class _Loader(yaml.SafeLoader):
    """SafeLoader that reads `1e-3` as a float (YAML 1.1 wants `1.0e-3`) and refuses a key given
    twice in one mapping (PyYAML keeps the last: an earlier section's keys were lost silently)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor`, resolved by the base class
                continue
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} given twice in one mapping", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+$"),
    list("-+0123456789."))


def deep_merge(base: Dict[str, Any], update: Dict[str, Any]) -> Dict[str, Any]:
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def load_configs(paths: Iterable[Union[str, Path]], overrides: Iterable[str] = ()) -> Dict[str, Any]:
    """Deep-merge several config files in order (later wins), then apply overrides:
    e.g. a frontend file, a stage file and a variant file such as `scratch.yaml`."""
    merged: Dict[str, Any] = {}
    for path in paths:
        removed, cfg = _load_layer(Path(path))
        merged = deep_merge(_without(merged, removed), cfg)
    for item in overrides:
        set_dotted(merged, item)
    return merged


def settings_digest(paths: Iterable[Union[str, Path]]) -> str:
    """16 hex digits of a sha256 of what the configs set, merged in order as load_configs merges
    them: a setting changed in one of their `_base_` files changes it, a comment, the order of
    keys or how a value is written (`1e-3`, `0.001`) does not."""
    settings = json.dumps(_string_keys(load_configs(paths)), sort_keys=True, ensure_ascii=False, default=repr)
    return hashlib.sha256(settings.encode("utf-8")).hexdigest()[:16]


def _string_keys(value: Any) -> Any:  # (YAML allows `1: x` beside `a: y`; json cannot sort those keys)
    if isinstance(value, dict):
        return {str(key): _string_keys(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_string_keys(item) for item in value]
    return value


def load_config(path: Union[str, Path], overrides: Iterable[str] = ()) -> Dict[str, Any]:
    merged = _load_layer(Path(path))[1]
    for item in overrides:
        set_dotted(merged, item)
    return merged


def _load_layer(path: Path, including: Tuple[Path, ...] = ()) -> Tuple[List[str], Dict[str, Any]]:
    """A file merged over its bases, and the `_remove_` lists of both for the files before it.
    INCLUDING: the files whose `_base_` led here (a file among them is a cycle)."""
    if path.resolve() in including:
        raise ValueError(f"{path}: _base_ includes form a cycle: {' -> '.join(map(str, including + (path.resolve(),)))}")
    with open(path, encoding="utf-8") as f:
        cfg = yaml.load(f, Loader=_Loader) or {}
    if not isinstance(cfg, dict):
        raise ValueError(f"{path}: a config is a mapping of sections, not a {type(cfg).__name__}")
    bases, removed = _file_list(path, cfg, "_base_"), _file_list(path, cfg, "_remove_")
    merged: Dict[str, Any] = {}
    inherited: List[str] = []
    for base in bases:
        base_removed, base_cfg = _load_layer(path.parent / base, including + (path.resolve(),))
        merged = deep_merge(_without(merged, base_removed), base_cfg)
        inherited += base_removed
    return inherited + removed, deep_merge(_without(merged, removed), cfg)


def _file_list(path: Path, cfg: Dict[str, Any], key: str) -> List[str]:
    """CFG's KEY (`_base_` files, `_remove_` keys), popped: a string or a list of them; empty, none."""
    value = cfg.pop(key, None)
    if value is None:
        return []
    value = [value] if isinstance(value, str) else value
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise ValueError(f"{path}: {key} takes a string or a list of strings, not {value!r}")
    return value


def _without(cfg: Dict[str, Any], dotted_keys: List[str]) -> Dict[str, Any]:
    """cfg less the given dotted keys (those absent are ignored); cfg itself is not changed."""
    for key in dotted_keys:
        *parents, last = key.split(".")
        parent = get_dotted(cfg, ".".join(parents)) if parents else cfg
        if not isinstance(parent, dict) or last not in parent:
            continue
        cfg = dict(cfg)  # copied along the path only: the dicts of earlier files stay as they are
        node = cfg
        for part in parents:
            node[part] = dict(node[part])
            node = node[part]
        node.pop(last, None)
    return cfg


def set_dotted(cfg: Dict[str, Any], assignment: str) -> None:
    if "=" not in assignment:
        raise ValueError(f"override {assignment!r} is not of the form key.sub=value")
    key, raw = assignment.split("=", 1)
    node = cfg
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = {}
        if not isinstance(child, dict):
            raise ValueError(f"override {assignment!r}: {part!r} is not a section")
        # copied along the path: a section YAML anchors share (`<<: *common`) keeps its value elsewhere
        node[part] = dict(child)
        node = node[part]
    node[parts[-1]] = parse_value(raw)


def parse_value(raw: str) -> Any:
    """YAML typing, with floats like `1e-3` read as floats. What YAML would read silently as other
    than written is refused unless quoted: ` #` starts a comment (`/data/run #2/x` was `/data/run`),
    `key: value` makes a mapping (only `{...}` does here), and a leading 0 an octal number (0123 → 83)."""
    if not raw.strip():
        return None
    value = yaml.load(raw, Loader=_Loader)
    quoted = raw.strip()[:1] in ("'", '"')
    if not quoted and (" #" in raw or "\t#" in raw):
        raise ValueError(f"value {raw!r}: YAML reads ' #' as the start of a comment; quote the value")
    if not quoted and isinstance(value, dict) and not raw.strip().startswith("{"):
        raise ValueError(f"value {raw!r}: YAML reads 'key: value' as a mapping; quote it, or write {{key: value}}")
    if not quoted and re.fullmatch(r"[-+]?0[0-7]+", raw.strip()):
        raise ValueError(f"value {raw!r}: YAML reads a leading 0 as octal ({value}); quote it or drop the 0")
    if not quoted and isinstance(value, (int, float)) and re.fullmatch(r"[-+]?[0-9][0-9_]*(:[0-5]?[0-9])+(\.[0-9_]*)?",
                                                                       raw.strip()):
        raise ValueError(f"value {raw!r}: YAML reads colon-separated digits as base 60 ({value}); quote it")
    return value


def get_dotted(cfg: Dict[str, Any], key: str, default: Any = None) -> Any:
    node: Any = cfg
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return default
        node = node[part]
    return node


def finite_number(value: Any) -> bool:
    """Whether a value read from YAML or JSON is a finite int or float (not a bool, which YAML's
    true/false and JSON's give, nor NaN/inf, which every comparison would pass unnoticed)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
