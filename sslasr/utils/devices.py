"""Where the maths runs: device names, and custom autograd backwards under mixed precision."""

import functools

import torch


def backward_without_autocast(backward):
    """A custom autograd Function's backward, run in the dtypes its forward saw. Called under
    autocast (loss.backward() inside the autocast block), some of its matmuls would be cast to
    half precision and others not, and mixed-dtype in-place ops fail."""

    @functools.wraps(backward)
    def wrapped(ctx, *grads):
        device = next((g.device.type for g in grads if isinstance(g, torch.Tensor)), "cpu")
        with torch.autocast(device, enabled=False):
            return backward(ctx, *grads)
    return wrapped


def resolve_device(name: str) -> torch.device:
    """NAME as a torch device; "auto" is the GPU when one is visible, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)
