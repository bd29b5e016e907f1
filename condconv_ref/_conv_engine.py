r"""The convolution engine every op runs: one entry point that picks its form by shape.

:func:`run_conv` and :func:`run_conv_vjp` take validated arguments (``x``
(B, C, \*spatial), a kernel shared by the batch (O, C/groups, \*k) or one per
example (B, O, C/groups, \*k), a bias (O,) or (B, O) or ``None``) and choose
the form that computes them fastest (:func:`conv_form`):

* ``"gather"`` (:mod:`condconv_ref._gather`) for small convolutions, where
  setting up costs more than the arithmetic: one ``take`` with an index array
  cached per shape, then one matmul per group;
* ``"flat"`` (:mod:`condconv_ref._flat`) when every group holds one input
  channel (C/groups = 1, depthwise): each (example, channel) row is read along
  one flat axis, so every kernel offset is one long contiguous slice;
* ``"im2col"`` (:mod:`condconv_ref._im2col`) otherwise: strided slices per
  kernel offset, one matmul per group, in windows that stay in cache.

Every form computes the same sums (the gather form's VJP adds zero terms, so
a kernel holding inf or NaN goes to im2col), so results agree to rounding
whichever is taken.  :func:`conv_memory` estimates what the chosen form
allocates, for the memory budget.
"""

from __future__ import annotations

import functools
from types import ModuleType
from typing import Any

from condconv_ref._flat import flat_depthwise_conv, flat_depthwise_conv_vjp, flat_memory
from condconv_ref._gather import GATHER_ELEMENTS, gather_conv, gather_conv_vjp, gather_memory
from condconv_ref._im2col import im2col_conv, im2col_conv_vjp, im2col_memory
from condconv_ref._validate import ConvGeometry, itemsize
from condconv_ref.memory import window_bytes

__all__ = ["conv_form", "conv_memory", "run_conv", "run_conv_vjp"]


@functools.lru_cache(maxsize=1024)
def _gathered_elements(x_shape: tuple[int, ...], kernel_shape: tuple[int, ...],
                       geometry: ConvGeometry) -> int:
    """Elements of the largest array the gather form would build (remembered per shape)."""
    return max(gather_memory(x_shape, kernel_shape, geometry, 1, vjp=True).values())


def conv_form(x_shape: tuple[int, ...], kernel_shape: tuple[int, ...], geometry: ConvGeometry,
              itemsize: int) -> str:
    """The form :func:`run_conv` takes: ``"gather"``, ``"flat"`` or ``"im2col"``.

    The gather form, which is not windowed, is taken only while its largest
    array holds at most :data:`~condconv_ref._gather.GATHER_ELEMENTS` elements
    and fits one window of the memory budget (:func:`condconv_ref.memory.window_bytes`).
    """
    gathered = _gathered_elements(x_shape, kernel_shape, geometry) * itemsize
    if gathered <= GATHER_ELEMENTS * itemsize and window_bytes(gathered) == gathered:
        return "gather"
    nd = len(geometry.out)
    return "flat" if kernel_shape[-nd - 1] == 1 else "im2col"


def conv_memory(x_shape: tuple[int, ...], kernel_shape: tuple[int, ...], geometry: ConvGeometry,
                itemsize: int, *, vjp: bool) -> dict[str, int]:
    """Elements of the largest arrays the chosen form allocates (see :mod:`condconv_ref.memory`)."""
    form = conv_form(x_shape, kernel_shape, geometry, itemsize)
    if form == "gather":
        return gather_memory(x_shape, kernel_shape, geometry, itemsize, vjp=vjp)
    if form == "flat":
        return flat_memory(x_shape, kernel_shape, geometry, itemsize, vjp=vjp)
    return im2col_memory(x_shape, kernel_shape, geometry, itemsize, vjp=vjp)


def _per_example(kernel: Any, batch: int, nd: int, *, xp: ModuleType) -> Any:
    """A shared kernel (O, 1, *k) as the per-example kernels (B, O, 1, *k) the flat form reads."""
    if kernel.ndim == nd + 3:
        return kernel
    return xp.broadcast_to(kernel[None, ...], (batch,) + tuple(kernel.shape))


def run_conv(x: Any, kernel: Any, bias: Any, geometry: ConvGeometry, *, xp: ModuleType) -> Any:
    """:func:`condconv_ref.conv` on validated arguments, in the form :func:`conv_form` picks."""
    form = conv_form(tuple(x.shape), tuple(kernel.shape), geometry, itemsize(x, xp=xp))
    if form == "gather":
        return gather_conv(x, kernel, bias, geometry, xp=xp)
    if form == "flat":
        kernel = _per_example(kernel, x.shape[0], x.ndim - 2, xp=xp)
        return flat_depthwise_conv(x, kernel, bias, geometry, xp=xp)
    return im2col_conv(x, kernel, bias, geometry, xp=xp)


def run_conv_vjp(cotangent: Any, x: Any, kernel: Any, bias: Any, geometry: ConvGeometry, *,
                 xp: ModuleType) -> dict[str, Any]:
    """:func:`condconv_ref.conv_vjp` on validated arguments, in the form :func:`conv_form` picks."""
    form = conv_form(tuple(x.shape), tuple(kernel.shape), geometry, itemsize(x, xp=xp))
    if form == "gather" and bool(xp.all(xp.isfinite(kernel))):
        return gather_conv_vjp(cotangent, x, kernel, bias, geometry, xp=xp)
    if form != "flat":
        return im2col_conv_vjp(cotangent, x, kernel, bias, geometry, xp=xp)
    nd = x.ndim - 2
    grads = flat_depthwise_conv_vjp(cotangent, x, _per_example(kernel, x.shape[0], nd, xp=xp),
                                    bias, geometry, xp=xp)
    if kernel.ndim == nd + 2:  # shared by the batch: its gradient sums the examples'
        grads["kernel"] = xp.sum(grads["kernel"], axis=0)
    if bias is not None and bias.ndim == 1:
        grads["bias"] = xp.sum(grads["bias"], axis=0)
    return grads
