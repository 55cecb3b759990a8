"""Mixed precision helpers."""

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
