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


def _pad_source_indices(size: int, before: int, after: int, mode: str) -> list[int]:
    """For each padded position, the input index it copies (PyTorch semantics)."""
    indices = []
    for j in range(-before, size + after):
        if mode == "reflect":
            j = -j if j < 0 else j
            j = 2 * (size - 1) - j if j >= size else j
        elif mode == "replicate":
            j = min(max(j, 0), size - 1)
        else:  # circular
            j %= size
        indices.append(j)
    return indices


def pad(x: Any, geometry: ConvGeometry, *, xp: ModuleType) -> Any:
    """Pad the spatial axes of ``x`` (B, C, *spatial) as ``geometry`` says."""
    if not geometry.padded:
        return x
    if geometry.padding_mode == "zeros":
        return xpx.pad(x, ((0, 0), (0, 0)) + geometry.padding, xp=xp)
    device = array_api_compat.device(x)
    for axis, (before, after) in enumerate(geometry.padding, start=2):
        if before or after:
            source = _pad_source_indices(x.shape[axis], before, after, geometry.padding_mode)
            x = xp.take(x, xp.asarray(source, dtype=xp.int64, device=device), axis=axis)
    return x


def pad_vjp(
    grad_padded: Any, spatial: tuple[int, ...], geometry: ConvGeometry, *, xp: ModuleType
) -> Any:
    """Adjoint of :func:`pad`: fold the gradient of the padded input back onto x.

    Zero padding is a slice of the padded gradient.  The other modes copy input
    index ``i[j]`` to padded position ``j``; the adjoint sums every padded
    position into its source: along each padded axis, the interior slice plus
    one addition per border position.  (A product with the one-hot matrix
    ``P[j, i] = [i[j] == i]`` would be the same sum, but would spread a NaN
    through its zeros to every input position of the axis.)
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
            source = _pad_source_indices(size, before, after, geometry.padding_mode)
            grad_padded = _fold_border(grad_padded, axis, before, size, source, xp=xp)
    return grad_padded


def _fold_border(grad_padded: Any, axis: int, before: int, size: int, source: list[int], *,
                 xp: ModuleType) -> Any:
    """Along ``axis``: the interior of ``grad_padded`` plus each border position at its source."""
    def at(index: Any) -> tuple[Any, ...]:
        return (slice(None),) * axis + (index, ...)

    folded = xp.asarray(grad_padded[at(slice(before, before + size))], copy=True)
    for j, i in enumerate(source):
        if not before <= j < before + size:
            folded = xpx.at(folded)[at(i)].add(grad_padded[at(j)], xp=xp)
    return folded



def kernel_offsets(kernel_spatial: tuple[int, ...]) -> list[tuple[int, ...]]:
    return list(itertools.product(*(range(k) for k in kernel_spatial)))


def bias_broadcast(bias: Any, nd: int, *, xp: ModuleType) -> Any:
    return xp.reshape(bias, tuple(bias.shape) + (1,) * nd)

