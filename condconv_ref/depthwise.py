r"""Depthwise CondConv (TensorFlow ``DepthwiseCondConv2D``), 1 to 3 spatial dims, and its layer.

Shapes: ``x`` (B, C, \*spatial), ``experts`` (E, C·m, 1, \*k), ``bias``
(E, C·m), ``routing`` (B, E), output (B, C·m, \*out), with ``m`` the depth
multiplier.  Output channel ``c·m + j`` is input channel ``c`` convolved with
its ``j``-th filter: the order of TensorFlow's ``depthwise_conv2d`` (kernel
(kh, kw, C, m), output channel ``c·m + j``) and of PyTorch's ``groups=C``.

The op equals :func:`condconv_ref.condconv` with ``groups=C``, and runs the
same convolution engine (:mod:`condconv_ref._conv_engine`), which takes its
flat-axis form for every depthwise convolution that is not small: each
(example, channel) row is flattened with its padding, so every kernel offset
reads one long contiguous slice, and the rows are processed in chunks whose
columns stay in cache.  What this module adds is the depth multiplier and
TensorFlow's channel order.  Each op resolves the namespace and validates its
arguments once, then runs the shared mixing (:mod:`condconv_ref._mixing`)
and, for the layer, the routing (:mod:`condconv_ref._layer`) around the
engine.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from functools import partial
from types import ModuleType
from typing import Any

from condconv_ref._conv_engine import run_conv, run_conv_vjp
from condconv_ref._layer import (
    SIGMOID,
    check_sigmoid_router,
    layer,
    layer_hvp,
    layer_jvp,
    layer_params,
    layer_vjp,
)
from condconv_ref._mixing import check_condconv, mixed_conv, mixed_conv_jvp, mixed_conv_vjp
from condconv_ref._validate import (
    ConvGeometry,
    ConvOptions,
    check_ndim,
    check_positive_int,
    check_shape,
    check_tangent_shapes,
    kernel_layout,
    namespace,
    public_op,
    tangent_namespace,
)

__all__ = [
    "depthwise_condconv",
    "depthwise_condconv_jvp",
    "depthwise_condconv_layer",
    "depthwise_condconv_layer_hvp",
    "depthwise_condconv_layer_jvp",
    "depthwise_condconv_layer_vjp",
    "depthwise_condconv_vjp",
]


# ---------------------------------------------------------------- validation


def _check_depthwise(fn: str, x: Any, experts: Any, routing: Any, bias: Any,
                     depth_multiplier: Any, options: ConvOptions, cotangent: Any = None, *,
                     xp: ModuleType) -> ConvGeometry:
    """Check the depthwise layout (E, C·m, 1, *k), then everything else as :func:`condconv` does.

    ``routing`` is ``None`` for the layer.  Returns the geometry, with ``groups=C``.
    """
    multiplier = check_positive_int(fn, "depth_multiplier", depth_multiplier)
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
    return check_condconv(fn, x, experts, routing, bias, replace(options, groups=channels),
                          cotangent, xp=xp)


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

    This is :func:`condconv` with ``groups=C`` (and runs the same engine).
    Unless the call is small, it is computed one (example, channel) row at a
    time: the row is padded and flattened, so that kernel
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
    fn = "depthwise_condconv"
    xp = namespace(fn, x=x, experts=experts, routing=routing, bias=bias)
    geometry = _check_depthwise(fn, x, experts, routing, bias, depth_multiplier,
                                ConvOptions(stride, padding, dilation, padding_mode=padding_mode),
                                xp=xp)
    return mixed_conv(x, experts, routing, bias, geometry, run_conv, xp=xp)


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
    fn = "depthwise_condconv_vjp"
    xp = namespace(fn, x=x, experts=experts, routing=routing, bias=bias, cotangent=cotangent)
    geometry = _check_depthwise(fn, x, experts, routing, bias, depth_multiplier,
                                ConvOptions(stride, padding, dilation, padding_mode=padding_mode),
                                cotangent, xp=xp)
    return mixed_conv_vjp(cotangent, x, experts, routing, bias, geometry,
                          run_conv_vjp, xp=xp)


@public_op
def depthwise_condconv_jvp(tangents: Mapping[str, Any], x: Any, experts: Any, routing: Any,
                           bias: Any = None, *, depth_multiplier: int = 1, stride: Any = 1,
                           padding: Any = 0, dilation: Any = 1,
                           padding_mode: str = "zeros") -> Any:
    r"""Jacobian-vector product of :func:`depthwise_condconv`.

    Parameters
    ----------
    tangents : mapping
        Any of ``"x"``, ``"experts"``, ``"routing"`` and (when ``bias`` is
        given) ``"bias"``, the keys of :func:`depthwise_condconv_vjp`, each
        with the shape of its argument; a missing key is a zero tangent.
    x, experts, routing, bias, depth_multiplier, stride, padding, dilation, padding_mode
        Exactly the arguments given to :func:`depthwise_condconv`.

    Returns
    -------
    array, shape (B, C·m, \*out)

    Notes
    -----
    The op is :func:`condconv` with ``groups=C``, so its tangent is that of
    :func:`condconv_jvp`: with :math:`\dot M = \dot\alpha W + \alpha\dot W`
    and :math:`\dot\mu = \dot\alpha\beta + \alpha\dot\beta`,

    .. math::

        \dot y_{b,\,cm+j,\,p} = \sum_\kappa \big(M_{b,cm+j,0,\kappa}\,\dot{\tilde x}_{b,c,sp+d\kappa}
            + \dot M_{b,cm+j,0,\kappa}\,\tilde x_{b,c,sp+d\kappa}\big) + \dot\mu_{b,cm+j},

    two depthwise convolutions run by the forward's engine.

    Examples
    --------
    >>> import numpy as np
    >>> from condconv_ref import depthwise_condconv_jvp
    >>> x = np.arange(4.0).reshape(1, 1, 4)
    >>> depthwise_condconv_jvp({"x": np.ones((1, 1, 4))}, x, np.ones((2, 1, 1, 2)),
    ...                        np.array([[1.0, 0.5]]))
    array([[[3., 3., 3.]]])
    """
    fn = "depthwise_condconv_jvp"
    arrays = {"x": x, "experts": experts, "routing": routing, "bias": bias}
    tangents, xp = tangent_namespace(fn, tangents, arrays)
    geometry = _check_depthwise(fn, x, experts, routing, bias, depth_multiplier,
                                ConvOptions(stride, padding, dilation, padding_mode=padding_mode),
                                xp=xp)
    check_tangent_shapes(fn, tangents, arrays)
    return mixed_conv_jvp(tangents, x, experts, routing, bias, geometry, xp=xp)


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
    p = layer_params(fn, params)
    xp = namespace(fn, x=x, **p)
    check_sigmoid_router(fn, x, p)
    geometry = _check_depthwise(fn, x, p["experts"], None, p["bias"], depth_multiplier,
                                ConvOptions(stride, padding, dilation, padding_mode=padding_mode),
                                xp=xp)
    return layer(x, p, SIGMOID, partial(mixed_conv, geometry=geometry, conv=run_conv),
                 xp=xp)


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
    p = layer_params(fn, params)
    xp = namespace(fn, x=x, **p, cotangent=cotangent)
    check_sigmoid_router(fn, x, p)
    geometry = _check_depthwise(fn, x, p["experts"], None, p["bias"], depth_multiplier,
                                ConvOptions(stride, padding, dilation, padding_mode=padding_mode),
                                cotangent, xp=xp)
    return layer_vjp(cotangent, x, p, SIGMOID,
                     partial(mixed_conv_vjp, geometry=geometry, conv_vjp=run_conv_vjp),
                     xp=xp)


@public_op
def depthwise_condconv_layer_jvp(tangents: Mapping[str, Any], x: Any, params: Mapping[str, Any],
                                 *, depth_multiplier: int = 1, stride: Any = 1, padding: Any = 0,
                                 dilation: Any = 1, padding_mode: str = "zeros") -> Any:
    r"""Jacobian-vector product of :func:`depthwise_condconv_layer`.

    ``tangents`` maps any of ``"x"`` and the keys present in ``params`` (the
    keys of :func:`depthwise_condconv_layer_vjp`) to tangents of their
    arguments' shapes; a missing key is a zero tangent.  The other arguments
    are exactly those given to :func:`depthwise_condconv_layer`.  Returns
    (B, C·m, \*out).

    Notes
    -----
    The routing's tangent :math:`\dot\alpha` from :func:`route_sigmoid_jvp`,
    then :func:`depthwise_condconv_jvp` along
    :math:`(\dot x, \dot W, \dot\alpha, \dot\beta)`, as in
    :func:`condconv_layer_jvp`.

    Examples
    --------
    >>> import numpy as np
    >>> from condconv_ref import depthwise_condconv_layer_jvp
    >>> params = {"experts": np.ones((2, 1, 1, 2)), "route_weight": np.zeros((2, 1))}
    >>> depthwise_condconv_layer_jvp({"experts": np.ones((2, 1, 1, 2))}, np.ones((1, 1, 4)),
    ...                              params)
    array([[[2., 2., 2.]]])
    """
    fn = "depthwise_condconv_layer_jvp"
    p = layer_params(fn, params)
    arrays = {"x": x, **p}
    tangents, xp = tangent_namespace(fn, tangents, arrays)
    check_sigmoid_router(fn, x, p)
    geometry = _check_depthwise(fn, x, p["experts"], None, p["bias"], depth_multiplier,
                                ConvOptions(stride, padding, dilation, padding_mode=padding_mode),
                                xp=xp)
    check_tangent_shapes(fn, tangents, arrays)
    return layer_jvp(tangents, x, p, SIGMOID, partial(mixed_conv_jvp, geometry=geometry), xp=xp)


@public_op
def depthwise_condconv_layer_hvp(cotangent: Any, tangents: Mapping[str, Any], x: Any,
                                 params: Mapping[str, Any], *, depth_multiplier: int = 1,
                                 stride: Any = 1, padding: Any = 0, dilation: Any = 1,
                                 padding_mode: str = "zeros") -> dict[str, Any]:
    r"""Hessian-vector product of :func:`depthwise_condconv_layer`: the derivative of
    :func:`depthwise_condconv_layer_vjp` at a fixed ``cotangent`` along ``tangents``.

    ``tangents`` is keyed as for :func:`depthwise_condconv_layer_jvp`; the other
    arguments are exactly those of :func:`depthwise_condconv_layer_vjp`.  Returns a
    dict keyed like the VJP's gradients.  Derived as in :func:`condconv_layer_hvp`:
    the op is linear in each argument and the sigmoid router adds its own term.

    Examples
    --------
    >>> import numpy as np
    >>> from condconv_ref import depthwise_condconv_layer_hvp
    >>> params = {"experts": np.ones((2, 1, 1, 2)), "route_weight": np.zeros((2, 1))}
    >>> hvp = depthwise_condconv_layer_hvp(np.ones((1, 1, 3)), {"x": np.ones((1, 1, 4))},
    ...                                    np.ones((1, 1, 4)), params)
    >>> sorted(hvp)
    ['experts', 'route_weight', 'x']
    """
    fn = "depthwise_condconv_layer_hvp"
    p = layer_params(fn, params)
    arrays = {"x": x, **p}
    tangents, xp = tangent_namespace(fn, tangents, arrays, cotangent)
    check_sigmoid_router(fn, x, p)
    geometry = _check_depthwise(fn, x, p["experts"], None, p["bias"], depth_multiplier,
                                ConvOptions(stride, padding, dilation, padding_mode=padding_mode),
                                cotangent, xp=xp)
    check_tangent_shapes(fn, tangents, arrays)
    return layer_hvp(cotangent, tangents, x, p, SIGMOID,
                     partial(mixed_conv_vjp, geometry=geometry, conv_vjp=run_conv_vjp), xp=xp)
