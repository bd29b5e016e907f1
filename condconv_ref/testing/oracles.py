"""Independent oracles: padding resolved by hand, SciPy and torch convolutions.

Nothing here calls the library's ops or its option resolution, so comparing an
op with these functions checks it against an independent implementation; the
test suite and ``condconv-ref verify`` both do.  Each function takes a
:class:`condconv_ref.testing.ConvConfig` for the convolution options.  SciPy
is imported when :func:`scipy_conv` is called (it is a test extra, not a
dependency), and torch is passed in by the caller.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["NUMPY_PAD_MODES", "TORCH_PAD_MODES", "dilate", "explicit_pairs", "scipy_conv",
           "torch_conv"]

NUMPY_PAD_MODES = {"zeros": "constant", "reflect": "reflect", "replicate": "edge",
                   "circular": "wrap"}
TORCH_PAD_MODES = {"zeros": "constant", "reflect": "reflect", "replicate": "replicate",
                   "circular": "circular"}


def explicit_pairs(config) -> tuple[tuple[int, int], ...]:
    """The padding of ``config`` as (before, after) pairs, resolved here without the library."""
    padding, nd = config.padding, config.nd
    if padding == "valid":
        return ((0, 0),) * nd
    if padding == "same":  # TensorFlow: output ceil(n / s), the odd element at the end
        pairs = []
        for n, k, s, d in zip(config.spatial, config.kernel, config.stride, config.dilation):
            total = max((math.ceil(n / s) - 1) * s + (k - 1) * d + 1 - n, 0)
            pairs.append((total // 2, total - total // 2))
        return tuple(pairs)
    if isinstance(padding, int):
        return ((padding, padding),) * nd
    if all(isinstance(p, int) for p in padding):
        return tuple((p, p) for p in padding)
    return tuple(tuple(p) for p in padding)


def dilate(kernel: np.ndarray, dilation: tuple[int, ...]) -> np.ndarray:
    """The kernel with d - 1 zeros inserted between neighbouring taps along each axis."""
    shape = tuple((k - 1) * d + 1 for k, d in zip(kernel.shape, dilation))
    dilated = np.zeros(shape)
    dilated[tuple(slice(None, None, d) for d in dilation)] = kernel
    return dilated


def scipy_conv(x: np.ndarray, kernel: np.ndarray, bias: np.ndarray | None, config) -> np.ndarray:
    """``scipy.signal.correlate`` per example, output channel and input channel, in float64.

    ``kernel`` is ``(O, C/groups, *k)`` or per example ``(B, O, C/groups, *k)``; ``bias``
    is None, (O,) or (B, O).  The input is padded by ``np.pad`` (zeros ->
    constant, reflect -> reflect, replicate -> edge, circular -> wrap), the
    dilation is a kernel with zeros inserted, and the stride subsamples the
    stride-1 result.
    """
    import scipy.signal

    x, kernel = x.astype(np.float64), kernel.astype(np.float64)
    padded = np.pad(x, ((0, 0), (0, 0)) + explicit_pairs(config),
                    mode=NUMPY_PAD_MODES[config.padding_mode])
    in_per_group = config.in_channels // config.groups
    out_per_group = config.out_channels // config.groups
    subsample = tuple(slice(None, None, s) for s in config.stride)
    examples = []
    for b in range(config.batch):
        kernels = kernel[b] if kernel.ndim == config.nd + 3 else kernel
        channels = []
        for o in range(config.out_channels):
            first = o // out_per_group * in_per_group
            total = sum(
                scipy.signal.correlate(padded[b, first + c], dilate(kernels[o, c], config.dilation),
                                       mode="valid", method="direct")
                for c in range(in_per_group)
            )[subsample]
            if bias is not None:
                total = total + (bias[b, o] if bias.ndim == 2 else bias[o])
            channels.append(total)
        examples.append(np.stack(channels))
    return np.stack(examples)


def torch_conv(torch, x, kernel, bias, config):
    """``F.pad`` then ``torch.nn.functional.conv1d/2d/3d``, one example at a time.

    Takes and returns torch tensors (autograd flows through); ``kernel`` and
    ``bias`` may be shared or per example as in :func:`scipy_conv`.
    """
    functional = torch.nn.functional
    pad = [amount for pair in reversed(explicit_pairs(config)) for amount in pair]
    if any(pad):
        x = functional.pad(x, pad, mode=TORCH_PAD_MODES[config.padding_mode])
    conv_nd = (functional.conv1d, functional.conv2d, functional.conv3d)[config.nd - 1]
    outputs = []
    for b in range(config.batch):
        example_kernel = kernel[b] if kernel.ndim == config.nd + 3 else kernel
        example_bias = None if bias is None else (bias[b] if bias.ndim == 2 else bias)
        outputs.append(conv_nd(x[b:b + 1], example_kernel, example_bias, stride=config.stride,
                               dilation=config.dilation, groups=config.groups))
    return torch.cat(outputs)
