r"""The im2col convolution engine: :func:`im2col_conv` and :func:`im2col_conv_vjp`.

Any grouped N-d convolution on validated arguments, built from strided slices
and matmul: per window of examples (or output rows), the columns of the
padded input are gathered with one strided slice per kernel offset, and each
group is one matmul.  :func:`im2col_memory` estimates what a call allocates.
Shapes: ``x`` is (B, C, \*spatial); a shared kernel is (O, C/groups, \*k) and
a per-example kernel is (B, O, C/groups, \*k); the output is (B, O, \*out).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from types import ModuleType
from typing import Any

import array_api_compat
import array_api_extra as xpx

from condconv_ref._conv_parts import bias_broadcast, kernel_offsets, pad, pad_vjp
from condconv_ref._validate import ConvGeometry, itemsize
from condconv_ref.memory import window_bytes

__all__ = ["im2col_conv", "im2col_conv_vjp", "im2col_memory"]


# ---------------------------------------------------------------- columns

# The columns of one window hold at most this many bytes, unless one output row
# of one example alone is larger (a window never holds less).  Windows about the
# size of a core's L2 cache run fastest: on a 2-core Xeon, 4 MiB windows made
# CondConv's forward + VJP 15-20% faster than 16 MiB ones (docs/performance.md).
_WINDOW_BYTES = 4 * 2**20


def _offset_slices(
    offset: tuple[int, ...], geometry: ConvGeometry
) -> tuple[slice, ...]:
    """Index of the padded input read by kernel offset ``offset`` at every output position."""
    return (slice(None), slice(None)) + tuple(
        slice(o * d, o * d + s * (n - 1) + 1, s)
        for o, d, s, n in zip(offset, geometry.dilation, geometry.stride, geometry.out)
    )


def _columns(x_padded: Any, kernel_spatial: tuple[int, ...], geometry: ConvGeometry, *,
             xp: ModuleType) -> Any:
    """im2col: (B, C, *padded) -> (B, groups, C/groups * K, L), K = prod(k), L = prod(out)."""
    batch, channels = x_padded.shape[:2]
    slices = [x_padded[_offset_slices(offset, geometry)] for offset in kernel_offsets(kernel_spatial)]
    columns = xp.stack(slices, axis=2)  # (B, C, K, *out)
    groups = geometry.groups
    per_group = channels // groups * math.prod(kernel_spatial)
    return xp.reshape(columns, (batch, groups, per_group, math.prod(geometry.out)))



@dataclass(frozen=True)
class _Window:
    """Examples ``batch`` and output rows ``rows`` (first spatial axis) of one convolution.

    ``geometry`` is the convolution's geometry with ``out`` cut to the window, so
    :func:`_columns` and :func:`_offset_slices` apply to :meth:`input_region`.
    """

    batch: slice
    rows: slice
    geometry: ConvGeometry

    @property
    def output_region(self) -> tuple[slice, ...]:
        return (self.batch, slice(None), self.rows, ...)

    def input_region(self, geometry: ConvGeometry,
                     kernel_spatial: tuple[int, ...]) -> tuple[slice, ...]:
        """The part of the padded input read by the window; ``geometry`` is the whole conv's."""
        stride, dilation = geometry.stride[0], geometry.dilation[0]
        first = self.rows.start * stride
        stop = (self.rows.stop - 1) * stride + dilation * (kernel_spatial[0] - 1) + 1
        return (self.batch, slice(None), slice(first, stop), ...)


def _windows(x_shape: tuple[int, ...], itemsize: int, kernel_spatial: tuple[int, ...],
             geometry: ConvGeometry) -> list[_Window]:
    """Split a convolution so that no window's columns exceed the byte budget.

    Whole examples are grouped while they fit, in windows of equal size; an
    example whose columns alone exceed the budget is split along its first
    output axis.
    """
    batch, channels = x_shape[:2]
    budget = window_bytes(_WINDOW_BYTES)
    rows = geometry.out[0]
    row_bytes = channels * math.prod(kernel_spatial) * math.prod(geometry.out[1:]) * itemsize
    if row_bytes * rows <= budget:
        count = -(-batch // (budget // (row_bytes * rows)))
        step = -(-batch // count)
        return [_Window(slice(b, min(b + step, batch)), slice(0, rows), geometry)
                for b in range(0, batch, step)]
    step = max(1, budget // row_bytes)
    return [
        _Window(slice(b, b + 1), slice(r, min(r + step, rows)),
                replace(geometry, out=(min(r + step, rows) - r,) + geometry.out[1:]))
        for b in range(batch) for r in range(0, rows, step)
    ]


def im2col_memory(x_shape: tuple[int, ...], kernel_shape: tuple[int, ...],
                    geometry: ConvGeometry, itemsize: int, *, vjp: bool) -> dict[str, int]:
    """Elements of the largest arrays :func:`im2col_conv` (``vjp``: :func:`im2col_conv_vjp`) allocates.

    The output (or the gradients) and the padded input cannot be split; the
    columns take one window at a time, as :func:`_windows` cuts them.
    """
    nd = len(geometry.out)
    batch, channels = x_shape[:2]
    out_channels, taps = kernel_shape[-nd - 2], math.prod(kernel_shape[-nd:])
    row = channels * taps * math.prod(geometry.out[1:])
    whole = batch * geometry.out[0] * row
    columns = min(whole, max(row, window_bytes(_WINDOW_BYTES) // itemsize))
    padded = batch * channels * math.prod(
        n + before + after for n, (before, after) in zip(x_shape[2:], geometry.padding))
    if not vjp:
        return {"output": batch * out_channels * math.prod(geometry.out),
                "padded input": padded if geometry.padded else 0,
                "im2col columns (one window)": columns,
                "output of one window": columns // (channels * taps) * out_channels}
    return {"x gradient": math.prod(x_shape) if geometry.padded else 0,
            "padded input and its gradient": 2 * padded if geometry.padded else padded,
            "kernel gradient": math.prod(kernel_shape),
            "im2col columns and their gradient (one window)": 2 * columns}


def _scatter_columns(grad_padded: Any, grad_columns: Any, region: tuple[slice, ...],
                     kernel_spatial: tuple[int, ...], geometry: ConvGeometry, *,
                     xp: ModuleType) -> Any:
    """Adjoint of :func:`_columns` on ``grad_padded[region]`` (col2im): add each offset's slice.

    ``grad_columns`` is (b, groups, C/groups * K, L) for the window's b examples;
    ``geometry`` is the window's.  Returns the updated ``grad_padded``.
    """
    batch, channels = grad_columns.shape[0], grad_padded.shape[1]
    grad_columns = xp.reshape(
        grad_columns, (batch, channels, math.prod(kernel_spatial)) + geometry.out
    )
    first_row = region[2].start
    for k, offset in enumerate(kernel_offsets(kernel_spatial)):
        rows, *rest = _offset_slices(offset, geometry)[2:]
        target = region[:2] + (slice(first_row + rows.start, first_row + rows.stop, rows.step),
                               *rest)
        grad_padded = xpx.at(grad_padded)[target].add(grad_columns[:, :, k, ...], xp=xp)
    return grad_padded



# ---------------------------------------------------------------- forward and VJP


def im2col_conv(x: Any, kernel: Any, bias: Any, geometry: ConvGeometry, *, xp: ModuleType) -> Any:
    """:func:`conv` on validated arguments, one window of columns at a time."""
    nd = x.ndim - 2
    kernel_spatial = tuple(kernel.shape[-nd:])
    x_padded = pad(x, geometry, xp=xp)
    weights = _weights_matrix(kernel, geometry.groups, nd, xp=xp)
    windows = _windows(tuple(x.shape), itemsize(x, xp=xp), kernel_spatial, geometry)
    if len(windows) == 1:
        return _conv_window(x_padded, weights, bias, windows[0], kernel_spatial, geometry, xp=xp)
    y = xp.empty((x.shape[0], kernel.shape[-nd - 2]) + geometry.out, dtype=x.dtype,
                 device=array_api_compat.device(x))
    for window in windows:
        part = _conv_window(x_padded, weights, bias, window, kernel_spatial, geometry, xp=xp)
        y = xpx.at(y)[window.output_region].set(part, xp=xp)
    return y


def _conv_window(x_padded: Any, weights: Any, bias: Any, window: _Window,
                 kernel_spatial: tuple[int, ...], geometry: ConvGeometry, *,
                 xp: ModuleType) -> Any:
    """The output of one window, (b, O, *window out): weights @ columns + bias."""
    x_region = x_padded[window.input_region(geometry, kernel_spatial)]
    # The columns are the largest temporary: built here, freed once the matmul is done.
    y = (_per_window(weights, window, weights.ndim == 4)
         @ _columns(x_region, kernel_spatial, window.geometry, xp=xp))
    y = xp.reshape(y, (x_region.shape[0], -1) + window.geometry.out)
    if bias is not None:
        y = y + bias_broadcast(_per_window(bias, window, bias.ndim == 2), len(kernel_spatial),
                                xp=xp)
    return y


def _per_window(a: Any, window: _Window, per_example: bool) -> Any:
    """The window's examples of ``a`` if it holds one entry per example, else ``a``."""
    return a[window.batch, ...] if per_example else a


def _weights_matrix(kernel: Any, groups: int, nd: int, *, xp: ModuleType) -> Any:
    """(…, O, C/g, *k) -> (…, g, O/g, C/g * K), the left factor of each group's matmul."""
    lead = tuple(kernel.shape[:-nd - 2])
    out_channels, in_per_group = kernel.shape[-nd - 2: -nd]
    per_group = in_per_group * math.prod(kernel.shape[-nd:])
    return xp.reshape(kernel, lead + (groups, out_channels // groups, per_group))



def im2col_conv_vjp(cotangent: Any, x: Any, kernel: Any, bias: Any, geometry: ConvGeometry, *,
              xp: ModuleType) -> dict[str, Any]:
    """:func:`conv_vjp` on validated arguments, one window of columns at a time."""
    nd = x.ndim - 2
    kernel_spatial = tuple(kernel.shape[-nd:])
    x_padded = pad(x, geometry, xp=xp)
    weights = _weights_matrix(kernel, geometry.groups, nd, xp=xp)
    device = array_api_compat.device(x)
    grad_padded = xp.zeros(x_padded.shape, dtype=x.dtype, device=device)
    grad_weights = xp.zeros(weights.shape, dtype=x.dtype, device=device)
    for window in _windows(tuple(x.shape), itemsize(x, xp=xp), kernel_spatial, geometry):
        window_grad_weights, grad_padded = _conv_vjp_window(
            cotangent, x_padded, weights, grad_padded, window, kernel_spatial, geometry, xp=xp)
        if weights.ndim == 4:  # one kernel per example
            grad_weights = xpx.at(grad_weights)[window.batch, ...].add(window_grad_weights, xp=xp)
        else:
            grad_weights = grad_weights + xp.sum(window_grad_weights, axis=0)
    grads = {
        "x": pad_vjp(grad_padded, tuple(x.shape[2:]), geometry, xp=xp),
        "kernel": xp.reshape(grad_weights, kernel.shape),
    }
    if bias is not None:
        grad_bias = xp.sum(cotangent, axis=tuple(range(2, 2 + nd)))
        grads["bias"] = grad_bias if bias.ndim == 2 else xp.sum(grad_bias, axis=0)
    return grads


def _conv_vjp_window(cotangent: Any, x_padded: Any, weights: Any, grad_padded: Any,
                     window: _Window, kernel_spatial: tuple[int, ...], geometry: ConvGeometry,
                     *, xp: ModuleType) -> tuple[Any, Any]:
    """One window's kernel gradient (b, g, O/g, C/g·K), and ``grad_padded`` plus its x̄ share."""
    region = window.input_region(geometry, kernel_spatial)
    x_region = x_padded[region]
    grad_y = xp.reshape(cotangent[window.output_region],
                        (x_region.shape[0], geometry.groups, -1, math.prod(window.geometry.out)))
    # Columns and their gradient are the largest temporaries; only one is alive at a time.
    grad_weights = grad_y @ xp.matrix_transpose(
        _columns(x_region, kernel_spatial, window.geometry, xp=xp))
    grad_columns = xp.matrix_transpose(_per_window(weights, window, weights.ndim == 4)) @ grad_y
    grad_padded = _scatter_columns(grad_padded, grad_columns, region, kernel_spatial,
                                   window.geometry, xp=xp)
    return grad_weights, grad_padded

