r"""Depthwise CondConv (TensorFlow ``DepthwiseCondConv2D``), 1 to 3 spatial dims, and its layer.

Shapes: ``x`` (B, C, \*spatial), ``experts`` (E, C·m, 1, \*k), ``bias``
(E, C·m), ``routing`` (B, E), output (B, C·m, \*out), with ``m`` the depth
multiplier.  Output channel ``c·m + j`` is input channel ``c`` convolved with
its ``j``-th filter: the order of TensorFlow's ``depthwise_conv2d`` (kernel
(kh, kw, C, m), output channel ``c·m + j``) and of PyTorch's ``groups=C``.

The op equals :func:`condconv_ref.condconv` with ``groups=C`` but has its own
fast path.  A matmul per 1×1 block over strided windows spends its time in
loops over one output row at a time; here each (example, channel) row is
flattened with its padding, so every kernel offset reads one long contiguous
slice (see :class:`condconv_ref.conv._Flat`), and the rows are processed in
chunks whose columns stay in cache.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from types import ModuleType
from typing import Any

import array_api_compat
import array_api_extra as xpx

from condconv_ref._validate import (
    ConvGeometry,
    check_ndim,
    check_positive_int,
    check_shape,
    kernel_layout,
    namespace,
    public_op,
)
from condconv_ref.condconv import (
    _condconv_prepare,
    _layer_params,
    _layer_routing,
    _layer_vjp,
    _mixed,
    _mixed_vjp,
)
from condconv_ref.conv import (
    _all_finite,
    _bias_broadcast,
    _Flat,
    _flat_cotangent,
    _flat_input,
    _flat_layout,
    _gather,
    _narrow,
    _pad_vjp,
    _scatter_flat,
    _widen,
    _without_gaps,
)
from condconv_ref.memory import window_bytes

__all__ = [
    "depthwise_condconv",
    "depthwise_condconv_layer",
    "depthwise_condconv_layer_vjp",
    "depthwise_condconv_vjp",
]


# ---------------------------------------------------------------- validation


def _depthwise_prepare(fn: str, x: Any, experts: Any, routing: Any, bias: Any,
                       depth_multiplier: Any, options: dict[str, Any], cotangent: Any = None,
                       ) -> tuple[ModuleType, ConvGeometry]:
    """Check the depthwise layout (E, C·m, 1, *k), then everything else as :func:`condconv` does."""
    multiplier = check_positive_int(fn, "depth_multiplier", depth_multiplier)
    namespace(fn, x=x, experts=experts)
    check_ndim(fn, "x", x, (3, 4, 5), "(B, C, *spatial) with 1 to 3 spatial dims")
    nd = x.ndim - 2
    channels = x.shape[1]
    if channels < 1:
        raise ValueError(f"{fn}: x has C={channels} channels, expected C >= 1")
    check_ndim(fn, "experts", experts, nd + 3, kernel_layout(nd, "E, C·m, 1"))
    check_shape(fn, "experts", experts,
                (experts.shape[0], channels * multiplier, 1) + tuple(experts.shape[3:]),
                f"(E, C·m, 1, *k) with C={channels} from x and m={multiplier} "
                "from depth_multiplier")
    return _condconv_prepare(fn, x, experts, routing, bias, {**options, "groups": channels},
                             cotangent=cotangent, memory=_depthwise_memory)


def _depthwise_memory(x: Any, experts: Any, geometry: ConvGeometry, itemsize: int, *,
                      vjp: bool) -> dict[str, int]:
    """Elements of the largest arrays the flat path allocates (see :mod:`condconv_ref.memory`).

    The output (or x̄), the mixed filters (and their gradient) and one chunk's
    columns: :data:`_CHUNK_BYTES`, or one row's when a single row is larger.
    """
    batch, channels = x.shape[:2]
    filters = batch * math.prod(experts.shape[1:])
    flat = _layout(x, experts, geometry)
    multiplier = experts.shape[1] // channels
    chunk = min(batch * channels, _rows_per_chunk(flat, multiplier, itemsize))
    parts = {"mixed filters (B, C·m, K)": filters,
             "columns of one chunk of rows": chunk * _row_elements(flat, multiplier)}
    if vjp:
        parts.update({"x gradient": math.prod(x.shape), "filter gradient": filters,
                      "experts gradient": math.prod(experts.shape)})
    else:
        parts["output"] = batch * experts.shape[1] * math.prod(geometry.out)
    return parts


def _options(stride: Any, padding: Any, dilation: Any, padding_mode: Any) -> dict[str, Any]:
    return dict(stride=stride, padding=padding, dilation=dilation, padding_mode=padding_mode)


# ---------------------------------------------------------------- the fast path

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


def _depthwise_conv(x: Any, kernel: Any, bias: Any, geometry: ConvGeometry, *,
                    xp: ModuleType) -> Any:
    """Depthwise conv with per-example ``kernel`` (B, C·m, 1, *k) and ``bias`` (B, C·m) or None.

    Per chunk of rows: the flat columns (n, K, L) of the padded rows, one
    (m, K) @ (K, L) matmul per row, then the gaps of the wide grid dropped.
    """
    nd = x.ndim - 2
    x_rows, filters = _rows(x, kernel, xp=xp)
    flat = _layout(x, kernel, geometry)
    y = xp.empty((x_rows.shape[0], filters.shape[1]) + geometry.out, dtype=x.dtype,
                 device=array_api_compat.device(x))
    for chunk in _chunks(x, kernel, flat, xp=xp):
        columns = _gather(_flat_input(x_rows[chunk, ...], geometry, flat, xp=xp), flat.taps(),
                          xp=xp)
        y = xpx.at(y)[chunk, ...].set(
            _narrow(filters[chunk, ...] @ columns[:, 0, ...], flat, xp=xp), xp=xp)
    y = xp.reshape(y, (x.shape[0], kernel.shape[1]) + geometry.out)
    if bias is not None:
        y = y + _bias_broadcast(bias, nd, xp=xp)
    return y


def _depthwise_conv_vjp(cotangent: Any, x: Any, kernel: Any, bias: Any, geometry: ConvGeometry,
                        *, xp: ModuleType) -> dict[str, Any]:
    """VJP of :func:`_depthwise_conv`: ``{"x", "kernel"}`` (+ ``"bias"``), per example.

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
            _pad_vjp(grad_padded, tuple(x.shape[2:]), geometry, xp=xp), xp=xp)
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
    finite has its gaps zeroed first (:func:`condconv_ref.conv._without_gaps`).
    """
    rows = filters.shape[0]
    x_finite, filters_finite = finite
    if flat.step == 1 and x_finite and filters_finite:
        span = math.prod(flat.padded)
        columns = _gather(_flat_cotangent(grad_y, flat, xp=xp), flat.adjoint_taps(), xp=xp)
        columns = xp.reshape(columns, (rows, -1, span))
        grad_filters = x_flat[..., :span] @ xp.matrix_transpose(columns)
        grad_padded = xp.reshape(filters, (rows, 1, -1)) @ columns
        return (xp.reshape(grad_filters, filters.shape),
                xp.reshape(grad_padded, (rows, 1) + flat.padded))
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


# ---------------------------------------------------------------- public ops


@public_op
def depthwise_condconv(x: Any, experts: Any, routing: Any, bias: Any = None, *,
                       depth_multiplier: int = 1, stride: Any = 1, padding: Any = 0,
                       dilation: Any = 1, padding_mode: str = "zeros") -> Any:
    r"""Depthwise CondConv with routing weights given from outside.

    Each input channel is convolved with its own ``depth_multiplier`` filters,
    mixed per example from ``E`` experts.  Output channel :math:`c m + j` is
    input channel :math:`c` convolved with its :math:`j`-th filter, the order
    of TensorFlow's ``DepthwiseCondConv2D`` and of PyTorch's ``groups=C``.

    Parameters
    ----------
    x : array, shape (B, C, \*spatial)
        Input, channels first, with 1, 2 or 3 spatial dims.
    experts : array, shape (E, C·m, 1, \*k)
        One depthwise kernel per expert (the ``groups=C`` layout of
        :func:`condconv`).
    routing : array, shape (B, E)
        :math:`\alpha`; any real values.
    bias : array, shape (E, C·m), optional
        One bias per expert, mixed by the routing like the kernels.
    depth_multiplier : int
        :math:`m \ge 1`, filters per input channel.
    stride, padding, dilation, padding_mode
        As in :func:`conv` (there is no ``groups``: it is C).

    Returns
    -------
    array, shape (B, C·m, \*out)

    Notes
    -----
    With :math:`M_b = \sum_e \alpha_{be} W_e`, :math:`\mu_b = \sum_e \alpha_{be}\beta_e`,
    :math:`\tilde x` the padded input and :math:`\kappa` the kernel offsets,

    .. math::

        y_{b,\,cm+j,\,p} = \sum_\kappa M_{b,\,cm+j,\,0,\,\kappa}\;
                           \tilde x_{b,\,c,\,s p + d\kappa} + \mu_{b,\,cm+j}.

    This is :func:`condconv` with ``groups=C``, computed one (example,
    channel) row at a time: the row is padded and flattened, so that kernel
    offset :math:`\kappa` reads one long slice of it (the outputs plus the
    ends of the padded rows, dropped afterwards), and the row's output is one
    (m, K) @ (K, positions) matmul with those slices as columns.  Rows are
    processed in chunks whose columns take about 2 MiB, so memory stays near
    the size of the input and output.

    Examples
    --------
    >>> import numpy as np
    >>> from condconv_ref import depthwise_condconv
    >>> x = np.stack([np.ones((1, 4)), np.arange(4.0)[None]], axis=1)  # (1, 2, 4)
    >>> # one expert; channel 0 gets filters [1, 1], [-1, -1] and channel 1 [2, 2], [-2, -2]
    >>> experts = np.ones((1, 4, 1, 2)) * np.array([1.0, -1.0, 2.0, -2.0])[:, None, None]
    >>> depthwise_condconv(x, experts, np.ones((1, 1)), depth_multiplier=2)
    array([[[  2.,   2.,   2.],
            [ -2.,  -2.,  -2.],
            [  2.,   6.,  10.],
            [ -2.,  -6., -10.]]])
    """
    xp, geometry = _depthwise_prepare(
        "depthwise_condconv", x, experts, routing, bias, depth_multiplier,
        _options(stride, padding, dilation, padding_mode))
    kernel, mixed_bias = _mixed(experts, routing, bias, xp=xp)
    return _depthwise_conv(x, kernel, mixed_bias, geometry, xp=xp)


@public_op
def depthwise_condconv_vjp(cotangent: Any, x: Any, experts: Any, routing: Any, bias: Any = None,
                           *, depth_multiplier: int = 1, stride: Any = 1, padding: Any = 0,
                           dilation: Any = 1, padding_mode: str = "zeros") -> dict[str, Any]:
    r"""Vector-Jacobian product of :func:`depthwise_condconv`.

    Parameters
    ----------
    cotangent : array, shape (B, C·m, \*out)
        :math:`\bar y`, the gradient of a scalar loss with respect to the output.
    x, experts, routing, bias, depth_multiplier, stride, padding, dilation, padding_mode
        Exactly the arguments given to :func:`depthwise_condconv`.

    Returns
    -------
    dict
        ``{"x", "experts", "routing"}`` plus ``"bias"`` when ``bias`` is given,
        each with the shape of its argument.

    Notes
    -----
    Differentiating the formula of :func:`depthwise_condconv`, with
    :math:`o = cm + j`,

    .. math::

        \bar M_{b,o,0,\kappa} = \sum_p \bar y_{b,o,p}\,\tilde x_{b,c,sp+d\kappa},\qquad
        \bar{\tilde x}_{b,c,q} = \sum_{j,\kappa,p\,:\,sp+d\kappa=q} M_{b,o,0,\kappa}\,\bar y_{b,o,p},
        \qquad \bar\mu_{b,o} = \sum_p \bar y_{b,o,p}.

    Per row, at stride 1 with finite inputs, both sums are products with
    one set of columns, those of the cotangent shifted by each offset:
    :math:`\bar M` with the padded input and :math:`\bar{\tilde x}` with the
    filters.  Otherwise (other strides, or inf/NaN, where a product with a
    zero that is not in the sums would make a NaN) :math:`\bar M = \bar Y
    X^\top` with the input's columns :math:`X`, and the column gradient
    :math:`M^\top \bar Y` is scatter-added onto the slices it came from.  The
    padding's adjoint then gives :math:`\bar x`.  Through the mixing,

    .. math::

        \bar W_e = \sum_b \alpha_{be} \bar M_b,\quad
        \bar\beta_e = \sum_b \alpha_{be} \bar\mu_b,\quad
        \bar\alpha_{be} = \langle \bar M_b, W_e\rangle + \langle \bar\mu_b, \beta_e\rangle.

    Examples
    --------
    >>> import numpy as np
    >>> from condconv_ref import depthwise_condconv_vjp
    >>> grads = depthwise_condconv_vjp(np.ones((1, 1, 3)), np.arange(4.0).reshape(1, 1, 4),
    ...                                np.ones((2, 1, 1, 2)), np.array([[1.0, 0.5]]))
    >>> grads["x"], grads["routing"]
    (array([[[1.5, 3. , 3. , 1.5]]]), array([[9., 9.]]))
    >>> grads["experts"][:, 0, 0]
    array([[3. , 6. ],
           [1.5, 3. ]])
    """
    xp, geometry = _depthwise_prepare(
        "depthwise_condconv_vjp", x, experts, routing, bias, depth_multiplier,
        _options(stride, padding, dilation, padding_mode), cotangent=cotangent)
    return _depthwise_condconv_vjp(cotangent, x, experts, routing, bias, geometry, xp=xp)


def _depthwise_condconv_vjp(cotangent: Any, x: Any, experts: Any, routing: Any, bias: Any,
                            geometry: ConvGeometry, *, xp: ModuleType) -> dict[str, Any]:
    kernel, mixed_bias = _mixed(experts, routing, bias, xp=xp)
    conv_grads = _depthwise_conv_vjp(cotangent, x, kernel, mixed_bias, geometry, xp=xp)
    return _mixed_vjp(conv_grads, experts, routing, bias, xp=xp)


# ---------------------------------------------------------------- the layer


@public_op
def depthwise_condconv_layer(x: Any, params: Mapping[str, Any], *, depth_multiplier: int = 1,
                             stride: Any = 1, padding: Any = 0, dilation: Any = 1,
                             padding_mode: str = "zeros") -> Any:
    r"""The whole depthwise CondConv layer: sigmoid routing from ``x``, then :func:`depthwise_condconv`.

    .. math::

        \alpha = \sigma(\mathrm{GAP}(x) R^\top + r),\qquad
        y = \mathrm{depthwise\_condconv}(x, W, \alpha, \beta)

    The routing is that of :func:`condconv_layer`.

    Parameters
    ----------
    x : array, shape (B, C, \*spatial)
    params : mapping
        ``experts`` (E, C·m, 1, \*k); ``route_weight`` :math:`R` (E, C);
        optional ``bias`` (E, C·m) and ``route_bias`` :math:`r` (E,).
    depth_multiplier, stride, padding, dilation, padding_mode
        As in :func:`depthwise_condconv`.

    Returns
    -------
    array, shape (B, C·m, \*out)

    Notes
    -----
    ``x`` reaches the output through the convolution and through the routing,
    so :math:`\bar x = \mathrm{depthwise\_condconv\_vjp}_x +
    \mathrm{route\_sigmoid\_vjp}_x(\bar\alpha)` with :math:`\bar\alpha` from
    :func:`depthwise_condconv_vjp`.

    Examples
    --------
    >>> import numpy as np
    >>> from condconv_ref import depthwise_condconv_layer
    >>> rng = np.random.default_rng(0)
    >>> params = {"experts": rng.normal(size=(3, 6, 1, 3, 3)),
    ...           "route_weight": rng.normal(size=(3, 2))}
    >>> depthwise_condconv_layer(rng.normal(size=(5, 2, 8, 8)), params, depth_multiplier=3,
    ...                          padding="same").shape
    (5, 6, 8, 8)
    """
    fn = "depthwise_condconv_layer"
    p = _layer_params(fn, params)
    routing = _layer_routing(fn, x, p)
    xp, geometry = _depthwise_prepare(fn, x, p["experts"], routing, p["bias"], depth_multiplier,
                                      _options(stride, padding, dilation, padding_mode))
    kernel, mixed_bias = _mixed(p["experts"], routing, p["bias"], xp=xp)
    return _depthwise_conv(x, kernel, mixed_bias, geometry, xp=xp)


@public_op
def depthwise_condconv_layer_vjp(cotangent: Any, x: Any, params: Mapping[str, Any], *,
                                 depth_multiplier: int = 1, stride: Any = 1, padding: Any = 0,
                                 dilation: Any = 1, padding_mode: str = "zeros") -> dict[str, Any]:
    r"""Vector-Jacobian product of :func:`depthwise_condconv_layer`.

    Returns
    -------
    dict
        ``"x"`` (through both the convolution and the routing) and one entry
        per key present in ``params``.  The derivation is in
        :func:`depthwise_condconv_layer`.

    Examples
    --------
    >>> import numpy as np
    >>> from condconv_ref import depthwise_condconv_layer_vjp
    >>> params = {"experts": np.ones((2, 1, 1, 2)), "route_weight": np.zeros((2, 1))}
    >>> sorted(depthwise_condconv_layer_vjp(np.ones((1, 1, 3)), np.ones((1, 1, 4)), params))
    ['experts', 'route_weight', 'x']
    """
    fn = "depthwise_condconv_layer_vjp"
    p = _layer_params(fn, params)
    routing = _layer_routing(fn, x, p)
    xp, geometry = _depthwise_prepare(fn, x, p["experts"], routing, p["bias"], depth_multiplier,
                                      _options(stride, padding, dilation, padding_mode),
                                      cotangent=cotangent)
    grads = _depthwise_condconv_vjp(cotangent, x, p["experts"], routing, p["bias"], geometry,
                                    xp=xp)
    return _layer_vjp(grads, x, p)
