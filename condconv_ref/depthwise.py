r"""Depthwise CondConv (TensorFlow ``DepthwiseCondConv2D``), 1 to 3 spatial dims, and its layer.

Shapes: ``x`` (B, C, \*spatial), ``experts`` (E, C·m, 1, \*k), ``bias``
(E, C·m), ``routing`` (B, E), output (B, C·m, \*out), with ``m`` the depth
multiplier.  Output channel ``c·m + j`` is input channel ``c`` convolved with
its ``j``-th filter: the order of TensorFlow's ``depthwise_conv2d`` (kernel
(kh, kw, C, m), output channel ``c·m + j``) and of PyTorch's ``groups=C``.

The op equals :func:`condconv_ref.condconv` with ``groups=C`` but has its own
fast path: instead of a matmul per 1×1 block, each kernel offset is one
broadcast multiply-accumulate of a strided slice of the padded input with the
per-example filters of that offset.
"""

from __future__ import annotations

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
from condconv_ref.conv import _bias_broadcast, _kernel_offsets, _offset_slices, _pad, _pad_vjp

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
                             cotangent=cotangent)


def _options(stride: Any, padding: Any, dilation: Any, padding_mode: Any) -> dict[str, Any]:
    return dict(stride=stride, padding=padding, dilation=dilation, padding_mode=padding_mode)


# ---------------------------------------------------------------- the fast path


def _filters(kernel: Any, channels: int, *, xp: ModuleType) -> Any:
    """(B, C·m, 1, *k) -> (B, C, m, K): filter j of channel c at each of the K kernel offsets."""
    batch, out_channels = kernel.shape[:2]
    return xp.reshape(kernel, (batch, channels, out_channels // channels, -1))


def _at_offset(filters: Any, index: int, nd: int, *, xp: ModuleType) -> Any:
    """The filters of kernel offset ``index``, (B, C, m, 1, ...) to broadcast over positions."""
    return xp.reshape(filters[..., index], tuple(filters.shape[:3]) + (1,) * nd)


def _depthwise_conv(x: Any, kernel: Any, bias: Any, geometry: ConvGeometry, *,
                    xp: ModuleType) -> Any:
    """Depthwise conv with per-example ``kernel`` (B, C·m, 1, *k) and ``bias`` (B, C·m) or None."""
    nd = x.ndim - 2
    batch, channels = x.shape[:2]
    filters = _filters(kernel, channels, xp=xp)
    x_padded = _pad(x, geometry, xp=xp)
    y = xp.zeros(tuple(filters.shape[:3]) + geometry.out, dtype=x.dtype,
                 device=array_api_compat.device(x))
    for index, offset in enumerate(_kernel_offsets(tuple(kernel.shape[3:]))):
        window = xp.expand_dims(x_padded[_offset_slices(offset, geometry)], axis=2)
        y += _at_offset(filters, index, nd, xp=xp) * window
    y = xp.reshape(y, (batch, kernel.shape[1]) + geometry.out)
    if bias is not None:
        y = y + _bias_broadcast(bias, nd, xp=xp)
    return y


def _sum_over_positions(grad_y: Any, window: Any, *, xp: ModuleType) -> Any:
    """(B, C, m, *out) · (B, C, 1, *out) summed over positions -> (B, C, m).

    ``vecdot`` along the last axis reads the strided window in place; flattening
    the positions first would copy it.
    """
    rows = xp.vecdot(grad_y, window, axis=-1)
    return xp.sum(rows, axis=tuple(range(3, rows.ndim))) if rows.ndim > 3 else rows


def _sum_over_multiplier(grad_y: Any, filters_at: Any, *, xp: ModuleType) -> Any:
    r""":math:`\sum_j M_{b,c,j}\,\bar y_{b,c,j,p}`: (B, C, m, *out), (B, C, m, 1, ...) -> (B, C, *out).

    For m = 1 this is a product; NumPy's ``vecdot`` over a length-1 axis is ~4x slower.
    """
    if grad_y.shape[2] == 1:
        return grad_y[:, :, 0, ...] * filters_at[:, :, 0, ...]
    return xp.vecdot(grad_y, filters_at, axis=-(grad_y.ndim - 2))


def _depthwise_conv_vjp(cotangent: Any, x: Any, kernel: Any, bias: Any, geometry: ConvGeometry,
                        *, xp: ModuleType) -> dict[str, Any]:
    """VJP of :func:`_depthwise_conv`: ``{"x", "kernel"}`` (+ ``"bias"``), per example."""
    nd = x.ndim - 2
    filters = _filters(kernel, x.shape[1], xp=xp)
    grad_y = xp.reshape(cotangent, tuple(filters.shape[:3]) + geometry.out)
    x_padded = _pad(x, geometry, xp=xp)
    grad_padded = xp.zeros(x_padded.shape, dtype=x.dtype, device=array_api_compat.device(x))
    grad_filters = []
    for index, offset in enumerate(_kernel_offsets(tuple(kernel.shape[3:]))):
        region = _offset_slices(offset, geometry)
        window = xp.expand_dims(x_padded[region], axis=2)
        grad_filters.append(_sum_over_positions(grad_y, window, xp=xp))
        grad_window = _sum_over_multiplier(grad_y, _at_offset(filters, index, nd, xp=xp), xp=xp)
        grad_padded = xpx.at(grad_padded)[region].add(grad_window, xp=xp)
    grads = {
        "x": _pad_vjp(grad_padded, tuple(x.shape[2:]), geometry, xp=xp),
        "kernel": xp.reshape(xp.stack(grad_filters, axis=-1), kernel.shape),
    }
    if bias is not None:
        grads["bias"] = xp.sum(cotangent, axis=tuple(range(2, 2 + nd)))
    return grads


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

    This is :func:`condconv` with ``groups=C``, computed without matmuls: for
    each offset :math:`\kappa` the slice :math:`\tilde x_{b,c,sp+d\kappa}`
    (B, C, 1, \*out) is multiplied by the filters :math:`M_{b,c,j,\kappa}`
    (B, C, m, 1, ...) and accumulated.  Memory stays at a few arrays of the
    output's size; the input is never copied K times.

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

    Per offset, :math:`\bar M` is a dot product over positions with the same
    slice the forward read, and :math:`\sum_j M\bar y` is scatter-added onto
    that slice of :math:`\bar{\tilde x}`; the padding's adjoint then gives
    :math:`\bar x`.  Through the mixing,

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
