r"""The flat-axis convolution engine: depthwise convolution of per-example filters.

With the padded spatial axes of one (example, channel) row flattened, every
kernel offset reads one long contiguous slice of the row (:class:`_Flat`), so
a depthwise convolution (C/groups = 1) is one (m, K) @ (K, positions) matmul
per row, the rows taken in chunks whose columns stay in cache.
:func:`flat_depthwise_conv` and :func:`flat_depthwise_conv_vjp` run it on
validated arguments; :func:`flat_memory` estimates what a call
allocates.  Shapes: ``x`` (B, C, \*spatial), filters (B, C·m, 1, \*k), bias
(B, C·m), output (B, C·m, \*out).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import array_api_compat
import array_api_extra as xpx

from condconv_ref._conv_parts import bias_broadcast, kernel_offsets, pad, pad_vjp
from condconv_ref._validate import ConvGeometry
from condconv_ref.memory import window_bytes

__all__ = ["flat_depthwise_conv", "flat_depthwise_conv_vjp", "flat_memory"]


@dataclass(frozen=True)
class _Flat:
    """A convolution read along one flat axis of its padded input.

    With the padded spatial axes flattened (C order), kernel offset κ starts at
    flat position ``offsets[κ]`` and every offset reads the same arithmetic
    progression from there: ``step`` apart, ``length`` long.  One slice per
    offset therefore gathers what :func:`condconv_ref._im2col._offset_slices` gathers in one
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
    inner: tuple[int, ...]
    """Offsets along the last axis alone (j·d for its k taps): ``offsets[κ]`` is
    ``outer[i] + inner[j]`` for κ = (i, j), the last axis running fastest."""

    @property
    def outer(self) -> tuple[int, ...]:
        """Offsets of the other axes: one per run of ``len(inner)`` consecutive offsets."""
        return self.offsets[::len(self.inner)]

    @property
    def span(self) -> int:
        """Elements from the first to the last read by one offset, gaps included."""
        return self.step * (self.length - 1) + 1

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
        """The flat slice read by each kernel offset, in :func:`kernel_offsets` order."""
        return [slice(offset, offset + self.span, self.step) for offset in self.offsets]

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
        for offset in kernel_offsets(kernel_spatial)
    )
    step = geometry.stride[0] if len(set(geometry.stride)) == 1 else 1
    every = [s // step for s in geometry.stride]  # pick every s/step-th wide position
    reach = [r * (n - 1) + 1 for r, n in zip(every, geometry.out)]
    wide = (reach[0],) + tuple(padded[1:])
    pick = tuple(slice(0, n, r) for n, r in zip(reach, every))
    last_read = max(offsets) + step * (math.prod(wide) - 1)
    rows = max(padded[0], last_read // strides[0] + 1)
    inner = tuple(j * geometry.dilation[-1] for j in range(kernel_spatial[-1]))
    return _Flat(tuple(padded), offsets, step, wide, pick, rows, inner)


def _embedded(a: Any, grid: tuple[int, ...], region: tuple[slice, ...], *,
              xp: ModuleType) -> Any:
    """``a`` written at ``region`` of zeros (*lead, *grid), flattened to (*lead, prod(grid))."""
    lead = tuple(a.shape[:a.ndim - len(grid)])
    zeros = xp.zeros(lead + grid, dtype=a.dtype, device=array_api_compat.device(a))
    return xp.reshape(xpx.at(zeros)[(...,) + region].set(a, xp=xp), lead + (math.prod(grid),))


def _flat_input(x: Any, geometry: ConvGeometry, flat: _Flat, *, xp: ModuleType) -> Any:
    """(B, C, *spatial) -> (B, C, size): padded as ``geometry`` says, flattened, zero rows added.

    Zero padding writes ``x`` into one zeroed array; the other modes pad with
    :func:`pad` first.
    """
    extra = flat.rows - flat.padded[0]
    if geometry.padding_mode != "zeros" and geometry.padded:
        x = pad(x, geometry, xp=xp)
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



# ---------------------------------------------------------------- depthwise convolution


# The columns of one chunk of (example, channel) rows hold at most this many
# bytes (at least one row).  Measured on S4 (forward + VJP, 2-core Xeon with
# 2 MiB of L2 per core): 1-4 MiB chunks ran within the machine's noise of each
# other; 8 MiB ones were 1.3-1.8x slower (the columns leave the cache) and
# 256 KiB ones 2.5-3x slower (Python overhead per chunk of one or two rows).
_CHUNK_BYTES = 2 * 2**20


def _rows(x: Any, kernel: Any, *, xp: ModuleType) -> tuple[Any, Any]:
    """``x`` as (B·C, 1, *spatial) and the filters (B, C·m, 1, *k) as (B·C, m, K).

    Row ``b·C + c`` is channel ``c`` of example ``b`` with its ``m`` filters:
    output channel ``c·m + j`` of example ``b`` is row ``b·C + c``, filter ``j``.
    """
    batch, channels = x.shape[:2]
    rows = batch * channels
    x_rows = xp.reshape(x, (rows, 1) + tuple(x.shape[2:]))
    filters = xp.reshape(kernel, (rows, kernel.shape[1] // channels, -1))
    return x_rows, filters


def _rows_per_chunk(flat: _Flat, multiplier: int, itemsize: int) -> int:
    """Rows whose columns fit :data:`_CHUNK_BYTES` (or the memory budget); at least one."""
    return max(1, window_bytes(_CHUNK_BYTES) // (_row_elements(flat, multiplier) * itemsize))


def _chunks(x: Any, kernel: Any, flat: _Flat, *, xp: ModuleType) -> list[slice]:
    """Consecutive row ranges of :func:`_rows_per_chunk` rows."""
    rows = x.shape[0] * x.shape[1]
    step = _rows_per_chunk(flat, kernel.shape[1] // x.shape[1], xp.finfo(x.dtype).bits // 8)
    return [slice(start, min(start + step, rows)) for start in range(0, rows, step)]


def _row_elements(flat: _Flat, multiplier: int) -> int:
    """Column elements of one row: its input's K slices (forward) or its cotangent's m·K
    padded-length slices (VJP, :func:`_chunk_vjp`), whichever is larger."""
    return len(flat.offsets) * max(flat.length, multiplier * math.prod(flat.padded))


def _layout(x: Any, kernel: Any, geometry: ConvGeometry) -> _Flat:
    padded = tuple(n + before + after for n, (before, after) in zip(x.shape[2:], geometry.padding))
    return _flat_layout(padded, tuple(kernel.shape[3:]), geometry)


def flat_depthwise_conv(x: Any, kernel: Any, bias: Any, geometry: ConvGeometry, *,
                    xp: ModuleType) -> Any:
    """Depthwise conv with per-example ``kernel`` (B, C·m, 1, *k) and ``bias`` (B, C·m) or None.

    Per chunk of rows: the padded rows' flat slices, one per offset of all
    axes but the last, k matmuls over their shifted views
    (:func:`_correlate_rows`), then the gaps of the wide grid dropped.
    """
    nd = x.ndim - 2
    x_rows, filters = _rows(x, kernel, xp=xp)
    flat = _layout(x, kernel, geometry)
    y = xp.empty((x_rows.shape[0], filters.shape[1]) + geometry.out, dtype=x.dtype,
                 device=array_api_compat.device(x))
    for chunk in _chunks(x, kernel, flat, xp=xp):
        wide = _correlate_rows(_flat_input(x_rows[chunk, ...], geometry, flat, xp=xp)[:, 0, :],
                               filters[chunk, ...], flat, xp=xp)
        y = xpx.at(y)[chunk, ...].set(_narrow(wide, flat, xp=xp), xp=xp)
    y = xp.reshape(y, (x.shape[0], kernel.shape[1]) + geometry.out)
    if bias is not None:
        y = y + bias_broadcast(bias, nd, xp=xp)
    return y


def _correlate_rows(x_flat: Any, filters: Any, flat: _Flat, *, xp: ModuleType) -> Any:
    r"""(n, size) flat padded rows and their (n, m, K) filters -> (n, m, length), the wide grid.

    Offset κ = (i, j) reads ``x_flat`` from ``outer[i] + inner[j]``, so the
    slices of one ``i`` are shifts of one longer slice :math:`R_i`: the
    columns are gathered once per ``i`` (k times fewer copies than one per
    offset), and the output is a sum of ``len(inner)`` matmuls, each over
    the shifted views :math:`R_{:, j}`,

    .. math:: y = \sum_j M_{:, :, j}\, R[\ldots, \mathrm{inner}_j + \mathrm{step}\cdot l].
    """
    rows, multiplier = filters.shape[:2]
    reach = flat.span + flat.inner[-1]
    gathered = xp.stack([x_flat[:, offset:offset + reach] for offset in flat.outer], axis=-2)
    per_axis = xp.reshape(filters, (rows, multiplier, len(flat.outer), len(flat.inner)))
    wide = None
    for j, shift in enumerate(flat.inner):
        part = per_axis[..., j] @ gathered[..., shift:shift + flat.span:flat.step]
        wide = part if wide is None else wide + part
    return wide


def flat_depthwise_conv_vjp(cotangent: Any, x: Any, kernel: Any, bias: Any, geometry: ConvGeometry,
                        *, xp: ModuleType) -> dict[str, Any]:
    """VJP of :func:`flat_depthwise_conv`: ``{"x", "kernel"}`` (+ ``"bias"``), per example.

    Chunk by chunk of rows (:func:`_chunk_vjp`), then the padding's adjoint.
    """
    nd = x.ndim - 2
    x_rows, filters = _rows(x, kernel, xp=xp)
    flat = _layout(x, kernel, geometry)
    grad_y = xp.reshape(cotangent, tuple(filters.shape[:2]) + geometry.out)
    device = array_api_compat.device(x)
    grad_x = xp.empty(x_rows.shape, dtype=x.dtype, device=device)
    grad_filters = xp.empty(filters.shape, dtype=x.dtype, device=device)
    # One finiteness test per call: on a GPU each is a synchronisation with the host.
    finite = (_all_finite(x, xp=xp), _all_finite(filters, xp=xp))
    for chunk in _chunks(x, kernel, flat, xp=xp):
        chunk_grad_filters, grad_padded = _chunk_vjp(
            _flat_input(x_rows[chunk, ...], geometry, flat, xp=xp), grad_y[chunk, ...],
            filters[chunk, ...], flat, finite=finite, xp=xp)
        grad_filters = xpx.at(grad_filters)[chunk, ...].set(chunk_grad_filters, xp=xp)
        grad_x = xpx.at(grad_x)[chunk, ...].set(
            pad_vjp(grad_padded, tuple(x.shape[2:]), geometry, xp=xp), xp=xp)
    grads = {"x": xp.reshape(grad_x, x.shape), "kernel": xp.reshape(grad_filters, kernel.shape)}
    if bias is not None:
        grads["bias"] = xp.sum(cotangent, axis=tuple(range(2, 2 + nd)))
    return grads


def _chunk_vjp(x_flat: Any, grad_y: Any, filters: Any, flat: _Flat, *,
               finite: tuple[bool, bool], xp: ModuleType) -> tuple[Any, Any]:
    r"""Filter gradient (n, m, K) and padded-input gradient (n, 1, \*padded) of a chunk of rows.

    ``x_flat`` is the rows' flat padded input (n, 1, size), ``grad_y`` their
    cotangent (n, m, \*out) and ``filters`` (n, m, K); ``finite`` says whether
    the whole input and the whole filters are free of inf and NaN.  Both
    gradients sum over the outputs p that read an input through an offset κ:

    .. math::

        \bar M_{j\kappa} = \sum_p \bar y_{jp}\,\tilde x_{p + o_\kappa},\qquad
        \bar{\tilde x}_q = \sum_{j,\kappa} M_{j\kappa}\,\bar y_{j,\,q - o_\kappa}.

    With step 1 and everything finite, both are products with the columns of
    the cotangent, :math:`C_{(j\kappa),q} = \bar y_{j,\,q-o_\kappa}` (zero where no
    output is): :math:`\bar M = \tilde x C^\top` and :math:`\bar{\tilde x} = M C`,
    one gather for both.  Otherwise (a stride above 1, or inf/NaN in x or the
    filters, where 0·inf would add NaN terms the sums do not have) the columns
    :math:`X` of the input give :math:`\bar M = \bar Y X^\top`, and the column
    gradient :math:`M^\top \bar Y` is scatter-added back; a factor that is not
    finite has its gaps zeroed first (:func:`_without_gaps`).
    """
    x_finite, filters_finite = finite
    if flat.step == 1 and x_finite and filters_finite:
        return _chunk_vjp_step_one(x_flat, grad_y, filters, flat, xp=xp)
    columns = _gather(x_flat, flat.taps(), xp=xp)[:, 0, ...]
    if not x_finite:
        columns = _without_gaps(columns, flat, xp=xp)
    grad_wide = _widen(grad_y, flat, xp=xp)
    # (n, m, K, 1) * (n, m, 1, L) summed over m: NumPy runs a matmul with inner
    # size m = 1 in a slow generic loop.
    grad_columns = xp.sum(filters[..., None] * grad_wide[:, :, None, :], axis=1)
    if not filters_finite:
        grad_columns = _without_gaps(grad_columns, flat, xp=xp)
    return (grad_wide @ xp.matrix_transpose(columns),
            _scatter_flat(grad_columns[:, None, ...], flat, xp=xp))


def _chunk_vjp_step_one(x_flat: Any, grad_y: Any, filters: Any, flat: _Flat, *,
                        xp: ModuleType) -> tuple[Any, Any]:
    r""":func:`_chunk_vjp` at step 1 with finite factors, from the cotangent's columns.

    The columns :math:`C_{(j\kappa),q} = \bar y_{j,\,q-o_\kappa}` of offset
    κ = (i, j) are the slice of the flat cotangent from ``lead - outer[i] -
    inner[j]``: shifts of one slice per ``i``, gathered once (as in
    :func:`_correlate_rows`), then read through views, one per ``j``:
    :math:`\bar M_{:, :, j} = \tilde x\, C_j^\top` and
    :math:`\bar{\tilde x} = \sum_j M_{:, :, j}\, C_j`.
    """
    rows, multiplier = filters.shape[:2]
    span, last = math.prod(flat.padded), flat.inner[-1]
    lead = flat.lead_rows * flat.row
    cotangent = _flat_cotangent(grad_y, flat, xp=xp)  # (n, m, lead + padded)
    gathered = xp.stack([cotangent[..., lead - offset - last:lead - offset + span]
                         for offset in flat.outer], axis=-2)  # (n, m, outer, span + last)
    per_axis = xp.reshape(filters, (rows, multiplier, len(flat.outer), len(flat.inner)))
    x_row = x_flat[:, None, :, :span]  # (n, 1, 1, span)
    grad_filters, grad_padded = [], None
    for j, shift in enumerate(flat.inner):
        columns = gathered[..., last - shift:last - shift + span]  # (n, m, outer, span)
        grad_filters.append(xp.reshape(x_row @ xp.matrix_transpose(columns),
                                       (rows, multiplier, len(flat.outer))))
        part = xp.sum(per_axis[:, :, None, :, j] @ columns, axis=1)  # (n, 1, span)
        grad_padded = part if grad_padded is None else grad_padded + part
    grad_filters = xp.reshape(xp.stack(grad_filters, axis=-1), filters.shape)
    return grad_filters, xp.reshape(grad_padded, (rows, 1) + flat.padded)


def flat_memory(x_shape: tuple[int, ...], kernel_shape: tuple[int, ...], geometry: ConvGeometry,
                itemsize: int, *, vjp: bool) -> dict[str, int]:
    """Elements of the largest arrays the flat form allocates (see :mod:`condconv_ref.memory`).

    ``kernel_shape`` is (O, 1, *k) or per example (B, O, 1, *k).  The output
    (or x̄ and the per-example filter gradient) and one chunk's columns:
    :data:`_CHUNK_BYTES`, or one row's when a single row is larger.
    """
    nd = len(geometry.out)
    batch, channels = x_shape[:2]
    out_channels, kernel_spatial = kernel_shape[-nd - 2], tuple(kernel_shape[-nd:])
    padded = tuple(n + before + after for n, (before, after) in zip(x_shape[2:], geometry.padding))
    flat = _flat_layout(padded, kernel_spatial, geometry)
    multiplier = out_channels // channels
    chunk = min(batch * channels, _rows_per_chunk(flat, multiplier, itemsize))
    parts = {"columns of one chunk of rows": chunk * _row_elements(flat, multiplier)}
    if vjp:
        parts.update({"x gradient": math.prod(x_shape),
                      "filter gradient (B, O, K)": batch * out_channels * len(flat.offsets)})
    else:
        parts["output"] = batch * out_channels * math.prod(geometry.out)
    return parts
