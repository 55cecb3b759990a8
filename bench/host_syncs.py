"""Host synchronisations of one pretraining step, ours vs transformers, counted on the CPU.

On a GPU, the host waits for the device whenever a step reads a value back (`.item()`,
`bool(tensor)`, `.tolist()`, and ops whose output size depends on the data: `nonzero`, boolean
indexing, `masked_select`, `repeat_interleave` without `output_size`, ...) and whenever it copies a
tensor built on the host (from numpy or a Python list) to the device, which a blocking copy
synchronises. In a step of a few tens of milliseconds each of these leaves the GPU idle while the
host catches up (bench/README.md, "On a GPU"). These points are properties of the code, not of
the device, so this script counts them on the CPU: it runs the step of bench/pretrain_throughput.py
(same models, same inputs) under a dispatch mode that sees every aten op, and wraps the Python
entry points that read or build host data.

    .venv/bin/python bench/host_syncs.py --frontend all
    .venv/bin/python bench/host_syncs.py --frontend hubert --where     # the source line of each

Counts are of one step after a warm-up step, forward + loss + backward + zero_grad, train mode.
"""

import argparse
import collections
import sys
import traceback
import weakref
from pathlib import Path
from typing import Callable, Counter, Iterator

import numpy as np
import torch
import torch.utils._pytree as pytree
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pretrain_throughput import wav2vec2_steps  # noqa: E402
from ssl_cases import build_case  # noqa: E402

aten = torch.ops.aten
# ops whose result the host must read, or whose output shape depends on the data
READ_OPS = {aten._local_scalar_dense.default, aten.nonzero.default, aten.masked_select.default,
            aten.equal.default, aten.is_nonzero.default, aten.bincount.default, aten._unique2.default,
            aten.unique_dim.default, aten.unique_consecutive.default, aten.repeat_interleave.Tensor}
INDEX_OPS = {aten.index.Tensor, aten.index_put.default, aten.index_put_.default, aten._index_put_impl_.default}
HOST_READS = {torch.Tensor.tolist, torch.Tensor.numpy}  # never reach the dispatcher
MOVES = {torch.Tensor.to, torch.Tensor.cuda}
OURS = str(Path(__file__).resolve().parents[1] / "sslasr")


def _bool_index(args) -> bool:
    indices = args[1] if len(args) > 1 else []
    return any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in indices or [])


def _tensors(tree) -> list:
    return [t for t in pytree.tree_leaves(tree) if isinstance(t, torch.Tensor)]


def _call_site(library_prefix: str) -> str:
    """The innermost frame in LIBRARY_PREFIX (our package or transformers), else the innermost
    frame outside torch and this script."""
    frames = traceback.extract_stack()[:-3]
    for frame in reversed(frames):
        if frame.filename.startswith(library_prefix):
            return f"{Path(frame.filename).name}:{frame.lineno} {frame.name}"
    for frame in reversed(frames):
        if "/torch/" not in frame.filename and not frame.filename.endswith("host_syncs.py"):
            return f"{Path(frame.filename).name}:{frame.lineno} {frame.name}"
    return "?"


class TensorSet:
    """Tensors by identity (a WeakSet compares tensors with ==), not keeping them alive."""

    def __init__(self, tensors=()):
        self._refs = {}
        self.update(tensors)

    def add(self, tensor: torch.Tensor) -> None:
        self._refs[id(tensor)] = weakref.ref(tensor)

    def update(self, tensors) -> None:
        for tensor in tensors:
            self.add(tensor)

    def __contains__(self, tensor: torch.Tensor) -> bool:
        ref = self._refs.get(id(tensor))
        return ref is not None and ref() is tensor


class SyncCounter:
    """Follows which tensors would live on the accelerator and counts the step's host syncs.

    On the device: the model's parameters and buffers, the step's inputs, tensors made by a
    factory given an explicit `device=` (code writes `device=x.device` to follow its inputs) or
    moved with `.to(device)`, and every result of an op with an input on the device (gradients
    included: the dispatch level sees the backward too). Counted:
    - reads: a device tensor's value read by the host (`.item()`, `bool()`, `.tolist()`, ...) or an
      op on device tensors whose output size depends on the data (`nonzero`, boolean indexing, ...);
    - copies: a host tensor entering the device (`.to(device)`, `torch.tensor(data, device=...)`,
      or a host index tensor indexing a device tensor).
    Elsewhere a host tensor beside device ones is not counted: on an accelerator that is an error
    unless it is 0-dimensional (passed by value), so what it meets here are the CPU-only fast
    paths (our dropout's reused random buffer, cached DFT tables), which other devices skip.
    Likewise reads inside CPU-only code are counted though a GPU would not make them: F.one_hot
    checks its input's range on the CPU (2 reads in a wav2vec 2.0 or w2v-BERT step), not on CUDA.
    """

    def __init__(self, library_prefix: str, on_device):
        self.library_prefix = library_prefix
        self.device = TensorSet(on_device)
        self.reads: Counter[str] = collections.Counter()
        self.copies: Counter[str] = collections.Counter()

    def site(self, what: str) -> str:
        return f"{what} @ {_call_site(self.library_prefix)}"

    def dispatch(self, func, args, kwargs):
        inputs = _tensors((args, kwargs))
        on_device = any(t in self.device for t in inputs)
        if on_device:
            if func in READ_OPS and not (func is aten.repeat_interleave.Tensor and kwargs.get("output_size")):
                self.reads[self.site(func.__name__)] += 1
            elif func in INDEX_OPS and _bool_index(args):
                self.reads[self.site(f"{func.__name__}[bool]")] += 1
            if func in INDEX_OPS:  # PyTorch copies a host index to the indexed tensor's device
                for index in _tensors(args[1] if len(args) > 1 else []):
                    if index not in self.device:
                        self.copies[self.site(f"host index into {func.__name__}")] += 1
                        self.device.add(index)
        out = func(*args, **kwargs)
        if on_device:
            self.device.update(_tensors(out))
        return out

    def function(self, func, args, kwargs):
        out = func(*args, **kwargs)
        self_tensor = args[0] if args and isinstance(args[0], torch.Tensor) else None
        if func in HOST_READS and self_tensor is not None and self_tensor in self.device:
            self.reads[self.site(func.__name__)] += 1
        elif func in MOVES and self_tensor is not None and self_tensor not in self.device and self._names_device(args, kwargs):
            self.copies[self.site(func.__name__)] += 1
            self.device.update(_tensors(out))
        elif kwargs.get("device") is not None and not _tensors(args):  # factory placed with its inputs
            if func is torch.tensor:
                self.copies[self.site("torch.tensor")] += 1
            self.device.update(_tensors(out))
        return out

    def _names_device(self, args, kwargs) -> bool:
        targets = list(args[1:]) + [kwargs.get("device"), kwargs.get("other")]
        return any(isinstance(t, (torch.device, str)) or (isinstance(t, torch.Tensor) and t in self.device)
                   for t in targets if t is not None)


class _Dispatch(TorchDispatchMode):
    def __init__(self, counter: SyncCounter):
        super().__init__()
        self.counter = counter

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return self.counter.dispatch(func, args, kwargs or {})


class _Function(TorchFunctionMode):
    def __init__(self, counter: SyncCounter):
        super().__init__()
        self.counter = counter

    def __torch_function__(self, func, types, args=(), kwargs=None):
        return self.counter.function(func, args, kwargs or {})


def _closure_tensors(fn, seen=None) -> Iterator[torch.Tensor]:
    """The tensors a step function works on: its closure's tensors and modules' parameters and
    buffers, followed into nested closures and dicts (the step's inputs and models)."""
    seen = set() if seen is None else seen
    if id(fn) in seen:
        return
    seen.add(id(fn))
    for cell in fn.__closure__ or ():
        value = cell.cell_contents
        if isinstance(value, torch.Tensor):
            yield value
        elif isinstance(value, torch.nn.Module):
            yield from value.parameters()
            yield from value.buffers()
        elif isinstance(value, dict):
            yield from (v for v in value.values() if isinstance(v, torch.Tensor))
            for v in value.values():
                if isinstance(v, torch.nn.Module):
                    yield from v.parameters()
                    yield from v.buffers()
        elif callable(value) and hasattr(value, "__closure__"):
            yield from _closure_tensors(value, seen)


def count(step: Callable[[], None], library_prefix: str) -> SyncCounter:
    step()  # warm-up: lazily built buffers and caches are not part of a steady step
    counter = SyncCounter(library_prefix, _closure_tensors(step))
    with _Function(counter), _Dispatch(counter):
        step()
    return counter


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frontend", choices=["wav2vec2", "hubert", "wavlm", "w2vbert", "all"], default="all")
    parser.add_argument("--config", choices=["tiny", "small"], default="tiny")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--where", action="store_true", help="list each count by its source line")
    args = parser.parse_args()
    args.device, args.amp, args.threads, args.iters, args.warmup, args.optimizer = \
        torch.device("cpu"), "none", 1, 1, 1, False
    torch.set_num_threads(2)
    import transformers
    libraries = {"ours": OURS, "transformers": str(Path(transformers.__file__).parent)}
    frontends = ["wav2vec2", "hubert", "wavlm", "w2vbert"] if args.frontend == "all" else [args.frontend]
    print(f"config={args.config} batch={args.batch}x{args.seconds:g}s; one step, counted after a warm-up step")
    print(f"{'frontend':<10}{'model':<14}{'reads':>7}{'copies':>8}{'total':>7}")
    for frontend in frontends:
        torch.manual_seed(0)
        np.random.seed(0)
        if frontend == "wav2vec2":
            steps = wav2vec2_steps(args)
        else:
            case = build_case(frontend, args.batch, args.seconds, args.config)
            steps = {"ours": case.step_ours, "transformers": case.step_theirs}
        for name, step in steps.items():
            counter = count(step, libraries[name])
            reads, copies = sum(counter.reads.values()), sum(counter.copies.values())
            print(f"{frontend:<10}{name:<14}{reads:>7}{copies:>8}{reads + copies:>7}")
            if args.where:
                for site, n in sorted({**counter.reads, **counter.copies}.items(), key=lambda kv: -kv[1]):
                    print(f"{'':<24}{n:>4}  {site}")


if __name__ == "__main__":
    main()
