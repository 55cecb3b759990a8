"""A grouped convolution over the frames of a (B, T, C) sequence, laid out for the device.

The positional convolution (wav2vec 2.0, HuBERT, WavLM) and the Conformer's depthwise
convolution both convolve over time a sequence held time-major, (B, T, C). Its transpose,
(B, C, T), is what Conv1d computes on; which memory layout the convolution then sees decides
which kernel the backend picks:

  * CPU: the transpose viewed as (B, C, 1, T) is channels-last in memory, which oneDNN's grouped
    and depthwise kernels take without relayout: 2-3× faster, forward and backward, than Conv1d
    on the transposed input (which copies it to (B, C, T) first).
  * CUDA and other devices: Conv1d, whose copy to (B, C, T) is deliberate (PyTorch makes a
    permuted 3-D input contiguous "to avoid accidentally going through NHWC"). Given the
    channels-last view instead, cuDNN picks its NHWC kernel, which on an H200 took 4× the time
    of the tensor-op kernels transformers' identically shaped convolutions ran (bench/README.md,
    the GPU profile).
"""

from typing import Optional

import torch
import torch.nn.functional as F


def conv_over_time(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], padding: int = 0,
                   groups: int = 1, channels_last_view: Optional[bool] = None) -> torch.Tensor:
    """F.conv1d(x.transpose(1, 2), weight, bias, padding=padding, groups=groups) for x (B, T, C)
    and weight (O, C/groups, k) → (B, O, T'). channels_last_view: compute it as a 2-D
    convolution over the (B, C, 1, T) view of x (default: on the CPU only, see the module
    docstring); the result is the same up to float rounding either way."""
    if channels_last_view is None:
        channels_last_view = x.device.type == "cpu"
    if not channels_last_view:
        return F.conv1d(x.transpose(1, 2), weight, bias, padding=padding, groups=groups)
    return F.conv2d(x.transpose(1, 2).unsqueeze(2), weight.unsqueeze(2), bias,
                    padding=(0, padding), groups=groups).squeeze(2)
