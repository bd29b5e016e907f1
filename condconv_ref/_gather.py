r"""The gather form of the convolution engine, for small convolutions: one ``take`` per call.

At property-test sizes a convolution costs less than the Python that sets it
up: im2col's one strided slice per kernel offset, the padded copy and the
scatter-adds of col2im take most of the time.  Here the whole index
arithmetic (kernel offsets, stride, dilation, padding mode) is folded into one
integer index array per shape, computed once and cached (:func:`_plan`):

* forward: the columns are one ``take`` from the flattened unpadded input
  (with one zero appended, which zero padding reads), then one matmul per
  group;
* VJP: the kernel gradient is :math:`\bar Y X^\top` with the same columns;
  the input gradient gathers the cotangent instead of scattering the columns'
  gradient: position :math:`q` of the (padded) input is read by kernel offset
  :math:`\kappa` at most at one output :math:`p`, so
  :math:`\bar{\tilde x}_q = \sum_{o,\kappa} W_{o,\kappa}\,\bar y_{o,\,p(\kappa, q)}`
  with :math:`\bar y = 0` where no :math:`p` exists — one ``take`` and one
  matmul.  Those extra zero terms change nothing unless a kernel entry is inf
  or NaN (0·inf = NaN); the engine sends such kernels to im2col, whose sums
  hold exactly the reference's terms.  Padding other than zeros is folded back
  by :func:`condconv_ref._conv_parts.pad_vjp`.

Shapes as in :mod:`condconv_ref.conv`.  Nothing is windowed, so the engine
takes this form only for convolutions whose columns are small
(:data:`GATHER_ELEMENTS`).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import array_api_compat

from condconv_ref._conv_parts import bias_broadcast, kernel_offsets, pad_vjp
from condconv_ref._validate import ConvGeometry

__all__ = ["GATHER_ELEMENTS", "gather_conv", "gather_conv_vjp", "gather_memory"]

# The engine takes the gather form when its largest gathered array, the
# columns (B·C·K·L) or the gathered cotangent (B·O·K·padded), holds at most
# this many elements (4 MiB in float64, im2col's window).  Forward + VJP on a
# 2-core Xeon (``python -m benchmarks.forms``, docs/performance.md): the
# gather form is 3-4x faster than im2col up to 2^15 elements, 1.3x at 2^18.5,
# and im2col's strided slices (the flat form, for depthwise) catch up near
# 2^19.5 in float64 and win from 2^21 on in both dtypes.
GATHER_ELEMENTS = 2**19


def _source(size: int, before: int, mode: str, positions: Any, *, xp: ModuleType) -> Any:
    """Input index read at padded positions ``positions`` of one axis; -1 for a zero.

    PyTorch's padding semantics, as :func:`condconv_ref._conv_parts.pad` applies them.
    """
    j = positions - before
    if mode == "zeros":
        return xp.where((j >= 0) & (j < size), j, -1)
    if mode == "reflect":
        j = xp.abs(j)
        return xp.where(j >= size, 2 * (size - 1) - j, j)
    if mode == "replicate":
        return xp.clip(j, 0, size - 1)
    return j % size  # circular


def _combine(per_axis: list[Any], sizes: tuple[int, ...], *, xp: ModuleType) -> Any:
    """Flat row-major index from per-axis indices (broadcast together); -1 where any is -1."""
    per_axis = xp.broadcast_arrays(*per_axis)
    flat, missing = per_axis[0], per_axis[0] < 0
    for index, size in zip(per_axis[1:], sizes[1:]):
        flat = flat * size + index
        missing = missing | (index < 0)
    return xp.where(missing, -1, flat)


@dataclass(frozen=True)
class _Plan:
    """Index arrays of one convolution shape, on the arrays' device.

    ``columns`` (K·L,) indexes the flat input with one zero appended (index
    N); ``adjoint`` (K·Q,) indexes the flat cotangent with one zero appended
    (index L), for the Q positions of the input (zero padding) or of the padded
    input (other modes, folded back by ``pad_vjp``).
    """

    columns: Any
    adjoint: Any
    reads_zero: bool
    adjoint_shape: tuple[int, ...]


@functools.lru_cache(maxsize=128)
def _cached_plan(spatial: tuple[int, ...], kernel_spatial: tuple[int, ...],
                 geometry: ConvGeometry, xp: ModuleType, device: Any) -> _Plan:
    r"""The plan of one shape, computed with ``xp`` on ``device`` in its index dtype.

    Per axis, kernel offset :math:`\kappa` reads output :math:`p`'s padded position
    :math:`t = s p + d \kappa`; the columns map it to its source in the input.  The
    adjoint inverts it: grid position :math:`q` (shifted onto the padded grid) is read
    by offset :math:`\kappa` at :math:`p = (q - d\kappa) / s` where that is an integer
    in :math:`[0, L)`, and by none otherwise (the appended zero, index :math:`L`).
    """
    nd = len(spatial)
    index = xp.__array_namespace_info__().default_dtypes(device=device)["indexing"]
    offsets = kernel_offsets(kernel_spatial)
    padded = tuple(n + b + a for n, (b, a) in zip(spatial, geometry.padding))
    zeros = geometry.padding_mode == "zeros"
    grid = spatial if zeros else padded

    def along(axis: int, values: Any) -> Any:
        """``values`` on the axis after the kernel-offset axis, broadcastable over the rest."""
        return xp.reshape(values, (1,) + (1,) * axis + (-1,) + (1,) * (nd - axis - 1))

    columns_axes, adjoint_axes = [], []
    for axis in range(nd):
        s, d = geometry.stride[axis], geometry.dilation[axis]
        before = geometry.padding[axis][0]
        kappa = xp.reshape(xp.asarray([o[axis] for o in offsets], dtype=index, device=device),
                           (-1,) + (1,) * nd)
        p = along(axis, xp.arange(geometry.out[axis], dtype=index, device=device))
        columns_axes.append(_source(spatial[axis], before, geometry.padding_mode,
                                    s * p + d * kappa, xp=xp))
        q = along(axis, xp.arange(grid[axis], dtype=index, device=device))
        reach = q + (before if zeros else 0) - d * kappa
        p_of_q = reach // s
        hit = (reach >= 0) & (reach % s == 0) & (p_of_q < geometry.out[axis])
        adjoint_axes.append(xp.where(hit, p_of_q, -1))
    columns = _combine(columns_axes, spatial, xp=xp)
    adjoint = _combine(adjoint_axes, geometry.out, xp=xp)
    reads_zero = bool(xp.any(columns < 0))
    columns = xp.where(columns < 0, math.prod(spatial), columns)
    adjoint = xp.where(adjoint < 0, math.prod(geometry.out), adjoint)
    return _Plan(xp.reshape(columns, (-1,)), xp.reshape(adjoint, (-1,)), reads_zero, tuple(grid))


def _plan(x: Any, kernel_spatial: tuple[int, ...], geometry: ConvGeometry, *,
          xp: ModuleType) -> _Plan:
    device = array_api_compat.device(x)
    key = (tuple(x.shape[2:]), kernel_spatial, geometry, xp, device)
    try:
        return _cached_plan(*key)
    except TypeError:  # an unhashable device: build the plan for this call only
        return _cached_plan.__wrapped__(*key)


def _append_zero(a: Any, *, xp: ModuleType) -> Any:
    """``a`` (..., n) with one zero appended along the last axis: (..., n + 1)."""
    zero = xp.zeros(tuple(a.shape[:-1]) + (1,), dtype=a.dtype, device=array_api_compat.device(a))
    return xp.concat([a, zero], axis=-1)


def _columns(x: Any, plan: _Plan, groups: int, taps: int, *, xp: ModuleType) -> Any:
    """(B, C, *spatial) -> (B, groups, C/groups · K, L): one ``take``."""
    batch, channels = x.shape[:2]
    flat = xp.reshape(x, (batch, channels, -1))
    if plan.reads_zero:
        flat = _append_zero(flat, xp=xp)
    columns = xp.take(flat, plan.columns, axis=-1)
    return xp.reshape(columns, (batch, groups, channels // groups * taps, -1))


def _weights(kernel: Any, groups: int, nd: int, *, xp: ModuleType) -> Any:
    """(…, O, C/g, *k) -> (…, g, O/g, C/g · K)."""
    lead = tuple(kernel.shape[:-nd - 2])
    out_channels, in_per_group = kernel.shape[-nd - 2: -nd]
    return xp.reshape(kernel, lead + (groups, out_channels // groups,
                                      in_per_group * math.prod(kernel.shape[-nd:])))


def gather_conv(x: Any, kernel: Any, bias: Any, geometry: ConvGeometry, *,
                xp: ModuleType) -> Any:
    """:func:`condconv_ref.conv` on validated arguments: one ``take``, one matmul per group."""
    nd = x.ndim - 2
    kernel_spatial = tuple(kernel.shape[-nd:])
    plan = _plan(x, kernel_spatial, geometry, xp=xp)
    columns = _columns(x, plan, geometry.groups, math.prod(kernel_spatial), xp=xp)
    y = xp.reshape(_weights(kernel, geometry.groups, nd, xp=xp) @ columns,
                   (x.shape[0], -1) + geometry.out)
    if bias is not None:
        y = y + bias_broadcast(bias, nd, xp=xp)
    return y


def gather_conv_vjp(cotangent: Any, x: Any, kernel: Any, bias: Any, geometry: ConvGeometry, *,
                    xp: ModuleType) -> dict[str, Any]:
    """:func:`condconv_ref.conv_vjp` on validated arguments whose kernel is finite."""
    nd = x.ndim - 2
    batch, channels = x.shape[:2]
    groups = geometry.groups
    kernel_spatial = tuple(kernel.shape[-nd:])
    taps = math.prod(kernel_spatial)
    plan = _plan(x, kernel_spatial, geometry, xp=xp)
    grad_y = xp.reshape(cotangent, (batch, groups, -1, math.prod(geometry.out)))
    grad_weights = grad_y @ xp.matrix_transpose(_columns(x, plan, groups, taps, xp=xp))
    if kernel.ndim == nd + 2:  # shared by the batch
        grad_weights = xp.sum(grad_weights, axis=0)
    # x̄: (…, g, C/g, O/g·K) @ (B, g, O/g·K, Q), the (o, κ) pairs in the same order.
    weights = _weights(kernel, groups, nd, xp=xp)
    lead = tuple(weights.shape[:-3])
    weights = xp.reshape(weights, lead + (groups, -1, channels // groups, taps))
    weights = xp.reshape(xp.permute_dims(weights, tuple(range(len(lead))) + tuple(
        len(lead) + a for a in (0, 2, 1, 3))), lead + (groups, channels // groups, -1))
    read = xp.take(_append_zero(grad_y, xp=xp), plan.adjoint, axis=-1)
    read = xp.reshape(read, (batch, groups, -1, math.prod(plan.adjoint_shape)))
    grad_x = xp.reshape(weights @ read, (batch, channels) + plan.adjoint_shape)
    if geometry.padding_mode != "zeros":
        grad_x = pad_vjp(grad_x, tuple(x.shape[2:]), geometry, xp=xp)
    grads = {"x": grad_x, "kernel": xp.reshape(grad_weights, kernel.shape)}
    if bias is not None:
        grad_bias = xp.sum(cotangent, axis=tuple(range(2, 2 + nd)))
        grads["bias"] = grad_bias if bias.ndim == 2 else xp.sum(grad_bias, axis=0)
    return grads


def gather_memory(x_shape: tuple[int, ...], kernel_shape: tuple[int, ...],
                  geometry: ConvGeometry, itemsize: int, *, vjp: bool) -> dict[str, int]:
    """Elements of the largest arrays :func:`gather_conv` (``vjp``: the VJP) allocates."""
    nd = len(geometry.out)
    batch, channels = x_shape[:2]
    out_channels, taps = kernel_shape[-nd - 2], math.prod(kernel_shape[-nd:])
    columns = batch * channels * taps * math.prod(geometry.out)
    padded = math.prod(n + b + a for n, (b, a) in zip(x_shape[2:], geometry.padding))
    if not vjp:
        return {"output": batch * out_channels * math.prod(geometry.out), "columns": columns}
    return {"x gradient": math.prod(x_shape), "kernel gradient": math.prod(kernel_shape),
            "columns": columns,
            "gathered cotangent": batch * out_channels * taps * padded}
