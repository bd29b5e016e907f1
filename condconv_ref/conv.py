r"""N-d grouped cross-correlation and its VJP, built from strided slices and matmul.

Shapes: ``x`` is (B, C, \*spatial); a shared kernel is (O, C/groups, \*k) and a
per-example kernel is (B, O, C/groups, \*k); the output is (B, O, \*out).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, replace
from types import ModuleType
from typing import Any

import array_api_compat
import array_api_extra as xpx

from condconv_ref._validate import (
    ConvGeometry,
    check_groups,
    check_ndim,
    check_nonempty,
    check_shape,
    conv_geometry,
    kernel_layout,
    namespace,
    public_op,
)
from condconv_ref.memory import check_memory, window_bytes

__all__ = ["conv", "conv_vjp"]


# ---------------------------------------------------------------- padding


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


def _pad(x: Any, geometry: ConvGeometry, *, xp: ModuleType) -> Any:
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


def _pad_vjp(
    grad_padded: Any, spatial: tuple[int, ...], geometry: ConvGeometry, *, xp: ModuleType
) -> Any:
    """Adjoint of :func:`_pad`: fold the gradient of the padded input back onto x.

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


def _kernel_offsets(kernel_spatial: tuple[int, ...]) -> list[tuple[int, ...]]:
    return list(itertools.product(*(range(k) for k in kernel_spatial)))


def _columns(x_padded: Any, kernel_spatial: tuple[int, ...], geometry: ConvGeometry, *,
             xp: ModuleType) -> Any:
    """im2col: (B, C, *padded) -> (B, groups, C/groups * K, L), K = prod(k), L = prod(out)."""
    batch, channels = x_padded.shape[:2]
    slices = [x_padded[_offset_slices(offset, geometry)] for offset in _kernel_offsets(kernel_spatial)]
    columns = xp.stack(slices, axis=2)  # (B, C, K, *out)
    groups = geometry.groups
    per_group = channels // groups * math.prod(kernel_spatial)
    return xp.reshape(columns, (batch, groups, per_group, math.prod(geometry.out)))


@dataclass(frozen=True)
class _Flat:
    """A convolution read along one flat axis of its padded input.

    With the padded spatial axes flattened (C order), kernel offset κ starts at
    flat position ``offsets[κ]`` and every offset reads the same arithmetic
    progression from there: ``step`` apart, ``length`` long.  One slice per
    offset therefore gathers what :func:`_offset_slices` gathers in one
    strided slice per axis, but with a long inner loop (whole padded rows
    instead of one output row).

    The progression covers a *wide* grid: the padded grid's shape, with its
    first axis cut to the rows the outputs reach.  The outputs are the
    ``pick`` slices of the wide grid; the other positions ("gaps": the ends of
    the padded rows) read real input too, and are dropped.  When all strides
    are equal to ``s`` the progression steps ``s`` and the wide grid is (out₀,
    padded₁, …); otherwise it steps 1 and ``pick`` takes every ``s_d``-th
    position.  The slices may run past the padded input by less than one
    padded row, so the flat input has ``rows`` rows, the padded ones followed
    by zero rows (only gaps read them).
    """

    padded: tuple[int, ...]
    offsets: tuple[int, ...]
    step: int
    wide: tuple[int, ...]
    pick: tuple[slice, ...]
    rows: int

    @property
    def row(self) -> int:
        """Elements in one padded row (all axes but the first)."""
        return math.prod(self.padded[1:])

    @property
    def length(self) -> int:
        return math.prod(self.wide)

    @property
    def size(self) -> int:
        """Length of the flat input, zero rows included."""
        return self.rows * self.row

    def taps(self) -> list[slice]:
        """The flat slice read by each kernel offset, in :func:`_kernel_offsets` order."""
        span = self.step * (self.length - 1) + 1
        return [slice(offset, offset + span, self.step) for offset in self.offsets]

    @property
    def lead_rows(self) -> int:
        """Zero rows ahead of the cotangent in :func:`_flat_cotangent`, enough for any offset."""
        return -(-max(self.offsets) // self.row)

    def adjoint_taps(self) -> list[slice]:
        """Step 1 only: the slice of :func:`_flat_cotangent`'s output that offset κ adds to x̄.

        Position q of the flat padded input is read by offset κ at wide
        position ``q - offsets[κ]``, which sits at ``q - offsets[κ] + lead``
        in the flat cotangent: x̄_q = Σ_κ M_κ ȳ_{q - offsets[κ]} is a
        correlation with these slices, one per offset, each
        ``prod(padded)`` long.
        """
        lead = self.lead_rows * self.row
        span = math.prod(self.padded)
        return [slice(lead - offset, lead - offset + span) for offset in self.offsets]


def _flat_layout(padded: tuple[int, ...], kernel_spatial: tuple[int, ...],
                 geometry: ConvGeometry) -> _Flat:
    """The :class:`_Flat` reading of a padded input of spatial shape ``padded``."""
    strides = [math.prod(padded[axis + 1:]) for axis in range(len(padded))]
    offsets = tuple(
        sum(o * d * p for o, d, p in zip(offset, geometry.dilation, strides))
        for offset in _kernel_offsets(kernel_spatial)
    )
    step = geometry.stride[0] if len(set(geometry.stride)) == 1 else 1
    every = [s // step for s in geometry.stride]  # pick every s/step-th wide position
    reach = [r * (n - 1) + 1 for r, n in zip(every, geometry.out)]
    wide = (reach[0],) + tuple(padded[1:])
    pick = tuple(slice(0, n, r) for n, r in zip(reach, every))
    last_read = max(offsets) + step * (math.prod(wide) - 1)
    rows = max(padded[0], last_read // strides[0] + 1)
    return _Flat(tuple(padded), offsets, step, wide, pick, rows)


def _embedded(a: Any, grid: tuple[int, ...], region: tuple[slice, ...], *,
              xp: ModuleType) -> Any:
    """``a`` written at ``region`` of zeros (*lead, *grid), flattened to (*lead, prod(grid))."""
    lead = tuple(a.shape[:a.ndim - len(grid)])
    zeros = xp.zeros(lead + grid, dtype=a.dtype, device=array_api_compat.device(a))
    return xp.reshape(xpx.at(zeros)[(...,) + region].set(a, xp=xp), lead + (math.prod(grid),))


def _flat_input(x: Any, geometry: ConvGeometry, flat: _Flat, *, xp: ModuleType) -> Any:
    """(B, C, *spatial) -> (B, C, size): padded as ``geometry`` says, flattened, zero rows added.

    Zero padding writes ``x`` into one zeroed array; the other modes pad with
    :func:`_pad` first.
    """
    extra = flat.rows - flat.padded[0]
    if geometry.padding_mode != "zeros" and geometry.padded:
        x = _pad(x, geometry, xp=xp)
        pairs = ((0, extra),) + ((0, 0),) * (len(flat.padded) - 1)
    else:
        pairs = ((geometry.padding[0][0], geometry.padding[0][1] + extra),) + geometry.padding[1:]
    if not any(before or after for before, after in pairs):
        return xp.reshape(x, tuple(x.shape[:2]) + (flat.size,))
    region = tuple(slice(before, before + n) for (before, _), n in zip(pairs, x.shape[2:]))
    return _embedded(x, (flat.rows,) + flat.padded[1:], region, xp=xp)


def _gather(source: Any, taps: list[slice], *, xp: ModuleType) -> Any:
    """im2col along the flat axis: (..., n) -> (..., K, len), one row per slice in ``taps``."""
    return xp.stack([source[..., taps_k] for taps_k in taps], axis=-2)


def _scatter_flat(grad_columns: Any, flat: _Flat, *, xp: ModuleType) -> Any:
    """Adjoint of :func:`_gather` with :meth:`_Flat.taps`: (..., K, length) -> (..., *padded)."""
    lead = tuple(grad_columns.shape[:-2])
    grad_flat = xp.zeros(lead + (flat.size,), dtype=grad_columns.dtype,
                         device=array_api_compat.device(grad_columns))
    for k, taps_k in enumerate(flat.taps()):
        grad_flat = xpx.at(grad_flat)[..., taps_k].add(grad_columns[..., k, :], xp=xp)
    return xp.reshape(grad_flat[..., :math.prod(flat.padded)], lead + flat.padded)


def _narrow(wide: Any, flat: _Flat, *, xp: ModuleType) -> Any:
    """(..., length) on the wide grid -> (..., *out): the outputs, without the gaps."""
    lead = tuple(wide.shape[:-1])
    return xp.reshape(wide, lead + flat.wide)[(...,) + flat.pick]


def _widen(y: Any, flat: _Flat, *, xp: ModuleType) -> Any:
    """Adjoint of :func:`_narrow`: (..., *out) -> (..., length), zeros in the gaps."""
    return _embedded(y, flat.wide, flat.pick, xp=xp)


def _flat_cotangent(grad_y: Any, flat: _Flat, *, xp: ModuleType) -> Any:
    """Step 1 only: (..., *out) -> (..., (lead_rows + padded₀)·row), read by ``adjoint_taps``.

    The cotangent on the wide grid (whose rows are padded rows), ``lead_rows``
    zero rows ahead of it and zeros wherever no output is.
    """
    first = flat.pick[0]
    region = (slice(flat.lead_rows + first.start, flat.lead_rows + first.stop, first.step),
              *flat.pick[1:])
    return _embedded(grad_y, (flat.lead_rows + flat.padded[0],) + flat.padded[1:], region, xp=xp)


def _without_gaps(columns: Any, flat: _Flat, *, xp: ModuleType) -> Any:
    """``columns`` (..., length) with zeros in the gaps.

    A product with a gradient that is zero in the gaps is zero there anyway,
    unless the other factor is inf or NaN: then 0·inf = NaN would leak into a
    sum the reference does not have.  Callers skip this pass when the factor
    is finite.
    """
    device = array_api_compat.device(columns)
    keep = xp.zeros(flat.wide, dtype=xp.bool, device=device)
    keep = xp.reshape(xpx.at(keep)[flat.pick].set(True, xp=xp), (flat.length,))
    return xp.where(keep, columns, xp.zeros((), dtype=columns.dtype, device=device))


def _all_finite(a: Any, *, xp: ModuleType) -> bool:
    return bool(xp.all(xp.isfinite(a)))


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


def _working_memory(x_shape: tuple[int, ...], kernel_shape: tuple[int, ...],
                    geometry: ConvGeometry, itemsize: int, *, vjp: bool) -> dict[str, int]:
    """Elements of the largest arrays :func:`_conv` (``vjp``: :func:`_conv_vjp`) allocates.

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
    for k, offset in enumerate(_kernel_offsets(kernel_spatial)):
        rows, *rest = _offset_slices(offset, geometry)[2:]
        target = region[:2] + (slice(first_row + rows.start, first_row + rows.stop, rows.step),
                               *rest)
        grad_padded = xpx.at(grad_padded)[target].add(grad_columns[:, :, k, ...], xp=xp)
    return grad_padded


# ---------------------------------------------------------------- validation


def _prepare(fn: str, x: Any, kernel: Any, bias: Any, options: dict[str, Any],
             cotangent: Any = None) -> tuple[ModuleType, ConvGeometry]:
    xp = namespace(fn, x=x, kernel=kernel, bias=bias, cotangent=cotangent)
    check_ndim(fn, "x", x, (3, 4, 5), "(B, C, *spatial) with 1 to 3 spatial dims")
    nd = x.ndim - 2
    batch, channels = x.shape[:2]
    check_ndim(fn, "kernel", kernel, (nd + 2, nd + 3),
               f"{kernel_layout(nd, 'O, I/groups')} or per example (B, O, I/groups, *k)")
    per_example = kernel.ndim == nd + 3
    if per_example and kernel.shape[0] != batch:
        raise ValueError(f"{fn}: kernel has batch size {kernel.shape[0]}, expected {batch} to match x")
    out_channels, in_per_group = kernel.shape[-nd - 2: -nd]
    geometry = conv_geometry(fn, x.shape[2:], kernel.shape[-nd:], **options)
    check_groups(fn, "kernel", channels, out_channels, in_per_group, geometry.groups)
    if bias is not None:
        check_ndim(fn, "bias", bias, (1, 2), "(O,) or per example (B, O)")
        expected = (batch, out_channels) if bias.ndim == 2 else (out_channels,)
        check_shape(fn, "bias", bias, expected, "(O,) or per example (B, O)")
    if cotangent is not None:
        check_shape(fn, "cotangent", cotangent, (batch, out_channels) + geometry.out,
                    "(B, O, *out), the shape of the output")
    check_nonempty(fn, x=x, kernel=kernel, bias=bias)
    check_memory(fn, x, _working_memory(
        tuple(x.shape), tuple(kernel.shape), geometry, _itemsize(x, xp=xp),
        vjp=cotangent is not None))
    return xp, geometry


def _options(stride: Any, padding: Any, dilation: Any, groups: Any,
             padding_mode: Any) -> dict[str, Any]:
    return dict(stride=stride, padding=padding, dilation=dilation, groups=groups,
                padding_mode=padding_mode)


def _bias_broadcast(bias: Any, nd: int, *, xp: ModuleType) -> Any:
    return xp.reshape(bias, tuple(bias.shape) + (1,) * nd)


# ---------------------------------------------------------------- public ops


@public_op
def conv(x: Any, kernel: Any, bias: Any = None, *, stride: Any = 1, padding: Any = 0,
         dilation: Any = 1, groups: int = 1, padding_mode: str = "zeros") -> Any:
    r"""N-d grouped cross-correlation (what deep-learning frameworks call convolution).

    Parameters
    ----------
    x : array, shape (B, C, \*spatial)
        Input, channels first, with 1, 2 or 3 spatial dims.
    kernel : array, shape (O, C/groups, \*k) or (B, O, C/groups, \*k)
        A kernel shared by the batch, or one kernel per example.
    bias : array, shape (O,) or (B, O), optional
        Added to every output position.
    stride, dilation : int or sequence of int
        Per spatial dim, each >= 1.
    padding : int, sequence of int, sequence of (before, after), 'valid' or 'same'
        'same' follows TensorFlow: per dim the total padding is
        ``max((ceil(n/s) - 1) s + (k - 1) d + 1 - n, 0)`` and the odd element
        goes at the end.
    groups : int
        Channels are split into ``groups`` independent blocks.
    padding_mode : {'zeros', 'reflect', 'replicate', 'circular'}
        PyTorch semantics.

    Returns
    -------
    array, shape (B, O, \*out)
        ``out_i = floor((n_i + pad_i - d_i (k_i - 1) - 1) / s_i) + 1``, in the
        namespace, device and dtype of ``x``.

    Notes
    -----
    With :math:`\tilde x` the padded input, group :math:`g(o)` of output
    channel :math:`o`, and :math:`c` running over that group's channels,

    .. math::

        y_{b,o,p} = \sum_{c,\kappa} W_{(b,)o,c,\kappa}\,
                    \tilde x_{b,\,g(o)\,C/G + c,\; s p + d \kappa} + \beta_{(b,)o}.

    The columns :math:`X_{b,g}[(c,\kappa), p] = \tilde x_{b,gC/G+c, sp + d\kappa}`
    are gathered with one strided slice per kernel offset :math:`\kappa`, so each
    group is one matmul :math:`Y_{b,g} = W_g X_{b,g}`.

    Examples
    --------
    >>> import numpy as np
    >>> from condconv_ref import conv
    >>> x = np.arange(5.0).reshape(1, 1, 5)
    >>> conv(x, np.ones((1, 1, 3)), padding="same")
    array([[[1., 3., 6., 9., 7.]]])
    """
    xp, geometry = _prepare("conv", x, kernel, bias,
                            _options(stride, padding, dilation, groups, padding_mode))
    return _conv(x, kernel, bias, geometry, xp=xp)


def _conv(x: Any, kernel: Any, bias: Any, geometry: ConvGeometry, *, xp: ModuleType) -> Any:
    """:func:`conv` on validated arguments, one window of columns at a time."""
    nd = x.ndim - 2
    kernel_spatial = tuple(kernel.shape[-nd:])
    x_padded = _pad(x, geometry, xp=xp)
    weights = _weights_matrix(kernel, geometry.groups, nd, xp=xp)
    windows = _windows(tuple(x.shape), _itemsize(x, xp=xp), kernel_spatial, geometry)
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
        y = y + _bias_broadcast(_per_window(bias, window, bias.ndim == 2), len(kernel_spatial),
                                xp=xp)
    return y


def _per_window(a: Any, window: _Window, per_example: bool) -> Any:
    """The window's examples of ``a`` if it holds one entry per example, else ``a``."""
    return a[window.batch, ...] if per_example else a


def _itemsize(a: Any, *, xp: ModuleType) -> int:
    return xp.finfo(a.dtype).bits // 8


def _weights_matrix(kernel: Any, groups: int, nd: int, *, xp: ModuleType) -> Any:
    """(…, O, C/g, *k) -> (…, g, O/g, C/g * K), the left factor of each group's matmul."""
    lead = tuple(kernel.shape[:-nd - 2])
    out_channels, in_per_group = kernel.shape[-nd - 2: -nd]
    per_group = in_per_group * math.prod(kernel.shape[-nd:])
    return xp.reshape(kernel, lead + (groups, out_channels // groups, per_group))


@public_op
def conv_vjp(cotangent: Any, x: Any, kernel: Any, bias: Any = None, *, stride: Any = 1,
             padding: Any = 0, dilation: Any = 1, groups: int = 1,
             padding_mode: str = "zeros") -> dict[str, Any]:
    r"""Vector-Jacobian product of :func:`conv`.

    Parameters
    ----------
    cotangent : array, shape (B, O, \*out)
        :math:`\bar y`, the gradient of a scalar loss with respect to the output.
    x, kernel, bias, stride, padding, dilation, groups, padding_mode
        Exactly the arguments given to :func:`conv`.

    Returns
    -------
    dict
        ``{"x": x̄, "kernel": W̄}`` plus ``"bias": β̄`` when ``bias`` is given,
        each with the shape of its argument.

    Notes
    -----
    Per group, :math:`Y = W X + \beta \mathbf 1^\top` with the columns
    :math:`X` of the padded input.  Differentiating the matmul,

    .. math::

        \bar W = \bar Y X^\top \;(\text{summed over } b \text{ for a shared kernel}),\qquad
        \bar X = W^\top \bar Y,\qquad
        \bar\beta_{(b,)o} = \sum_{(b,)p} \bar y_{b,o,p}.

    :math:`\bar X` is scattered back onto the padded input (col2im, the adjoint
    of the strided gathers: each kernel offset adds its slice), and the padding
    is undone by its adjoint: zero padding drops the border, while reflect,
    replicate and circular padding add each border position's gradient onto the
    input position it was copied from.

    Examples
    --------
    >>> import numpy as np
    >>> from condconv_ref import conv_vjp
    >>> grads = conv_vjp(np.ones((1, 1, 3)), np.arange(5.0).reshape(1, 1, 5), np.ones((1, 1, 3)))
    >>> grads["x"]
    array([[[1., 2., 3., 2., 1.]]])
    >>> grads["kernel"]
    array([[[3., 6., 9.]]])
    """
    xp, geometry = _prepare("conv_vjp", x, kernel, bias,
                            _options(stride, padding, dilation, groups, padding_mode),
                            cotangent=cotangent)
    return _conv_vjp(cotangent, x, kernel, bias, geometry, xp=xp)


def _conv_vjp(cotangent: Any, x: Any, kernel: Any, bias: Any, geometry: ConvGeometry, *,
              xp: ModuleType) -> dict[str, Any]:
    """:func:`conv_vjp` on validated arguments, one window of columns at a time."""
    nd = x.ndim - 2
    kernel_spatial = tuple(kernel.shape[-nd:])
    x_padded = _pad(x, geometry, xp=xp)
    weights = _weights_matrix(kernel, geometry.groups, nd, xp=xp)
    device = array_api_compat.device(x)
    grad_padded = xp.zeros(x_padded.shape, dtype=x.dtype, device=device)
    grad_weights = xp.zeros(weights.shape, dtype=x.dtype, device=device)
    for window in _windows(tuple(x.shape), _itemsize(x, xp=xp), kernel_spatial, geometry):
        window_grad_weights, grad_padded = _conv_vjp_window(
            cotangent, x_padded, weights, grad_padded, window, kernel_spatial, geometry, xp=xp)
        if weights.ndim == 4:  # one kernel per example
            grad_weights = xpx.at(grad_weights)[window.batch, ...].add(window_grad_weights, xp=xp)
        else:
            grad_weights = grad_weights + xp.sum(window_grad_weights, axis=0)
    grads = {
        "x": _pad_vjp(grad_padded, tuple(x.shape[2:]), geometry, xp=xp),
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
