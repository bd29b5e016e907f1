r"""Pieces every convolution engine shares: padding and its adjoint, kernel offsets, bias.

Used by the im2col engine (:mod:`condconv_ref._im2col`) and the flat-axis
engine (:mod:`condconv_ref._flat`).  Shapes as in :mod:`condconv_ref.conv`.
"""

from __future__ import annotations

import itertools
from types import ModuleType
from typing import Any

import array_api_compat
import array_api_extra as xpx

from condconv_ref._validate import ConvGeometry

__all__ = ["bias_broadcast", "kernel_offsets", "pad", "pad_vjp"]


def _pad_source_indices(size: int, before: int, after: int, mode: str, *, xp: ModuleType,
                        device: Any) -> Any:
    """For each padded position, the input index it copies (PyTorch semantics), as an array."""
    j = xp.arange(-before, size + after, dtype=xp.int64, device=device)
    if mode == "reflect":
        j = xp.abs(j)
        return xp.where(j >= size, 2 * (size - 1) - j, j)
    if mode == "replicate":
        return xp.clip(j, 0, size - 1)
    return xp.remainder(j, size)  # circular


def pad(x: Any, geometry: ConvGeometry, *, xp: ModuleType) -> Any:
    """Pad the spatial axes of ``x`` (B, C, *spatial) as ``geometry`` says.

    Reflect, replicate and circular padding gather along each padded axis with
    one ``take`` of an index array, so the cost does not depend on Python.
    """
    if not geometry.padded:
        return x
    if geometry.padding_mode == "zeros":
        return xpx.pad(x, ((0, 0), (0, 0)) + geometry.padding, xp=xp)
    device = array_api_compat.device(x)
    for axis, (before, after) in enumerate(geometry.padding, start=2):
        if before or after:
            source = _pad_source_indices(x.shape[axis], before, after, geometry.padding_mode,
                                         xp=xp, device=device)
            x = xp.take(x, source, axis=axis)
    return x


def pad_vjp(
    grad_padded: Any, spatial: tuple[int, ...], geometry: ConvGeometry, *, xp: ModuleType
) -> Any:
    """Adjoint of :func:`pad`: fold the gradient of the padded input back onto x.

    Zero padding is a slice of the padded gradient.  The other modes copy input
    index ``i[j]`` to padded position ``j``; the adjoint sums every padded
    position into its source.  Along each padded axis, each of the two borders
    is folded with one array operation (:func:`_fold_border`), never a Python
    loop over its positions.  (A product with the one-hot matrix
    ``P[j, i] = [i[j] == i]`` would be the same sum, but would spread a NaN
    through its zeros to every input position of the axis; the folds below add
    each border position to its own source only.)
    """
    if not geometry.padded:
        return grad_padded
    if geometry.padding_mode == "zeros":
        interior = tuple(
            slice(before, before + size) for (before, _), size in zip(geometry.padding, spatial)
        )
        return grad_padded[(slice(None), slice(None)) + interior]
    for axis, ((before, after), size) in enumerate(zip(geometry.padding, spatial), start=2):
        if before or after:
            grad_padded = _fold_border(grad_padded, axis, before, after, size,
                                       geometry.padding_mode, xp=xp)
    return grad_padded


def _fold_border(grad_padded: Any, axis: int, before: int, after: int, size: int, mode: str, *,
                 xp: ModuleType) -> Any:
    """Along ``axis``: the interior of ``grad_padded`` plus each border position at its source.

    Padded position ``p < before`` copies input ``before - p`` (reflect),
    ``size - before + p`` (circular) or ``0`` (replicate); position
    ``before + size + q`` copies ``size - 2 - q``, ``q`` or ``size - 1``.  The
    sources of one border are distinct and contiguous for reflect and circular
    (the padding is smaller than, or at most, the size), so each border is one
    slice addition (reversed for reflect); replicate adds the border's sum to
    the edge.
    """
    def at(index: slice) -> tuple[Any, ...]:
        return (slice(None),) * axis + (index, ...)

    folded = xp.asarray(grad_padded[at(slice(before, before + size))], copy=True)
    borders = ((grad_padded[at(slice(0, before))], before, True),
               (grad_padded[at(slice(before + size, before + size + after))], after, False))
    for border, width, leading in borders:
        if not width:
            continue
        if mode == "replicate":
            edge = 0 if leading else size - 1
            target, values = slice(edge, edge + 1), xp.sum(border, axis=axis, keepdims=True)
        elif mode == "reflect":
            target = slice(1, width + 1) if leading else slice(size - 1 - width, size - 1)
            values = xp.flip(border, axis=axis)
        else:  # circular
            target = slice(size - width, size) if leading else slice(0, width)
            values = border
        folded = xpx.at(folded)[at(target)].add(values, xp=xp)
    return folded


def kernel_offsets(kernel_spatial: tuple[int, ...]) -> list[tuple[int, ...]]:
    return list(itertools.product(*(range(k) for k in kernel_spatial)))


def bias_broadcast(bias: Any, nd: int, *, xp: ModuleType) -> Any:
    return xp.reshape(bias, tuple(bias.shape) + (1,) * nd)

