r"""CondConv (Yang et al., 2019): expert mixing, the conditional convolution, the layer.

Shapes: ``x`` (B, C, \*spatial), ``experts`` (E, O, C/groups, \*k),
``bias`` (E, O), ``routing`` (B, E).  Every op sits beside its VJP.  Each
resolves the namespace and validates its arguments once, then runs the shared
plumbing on them: the mixing of :mod:`condconv_ref._mixing`, the convolution
engine of :mod:`condconv_ref._conv_engine` and, for the layer, the routing of
:mod:`condconv_ref._layer`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
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
from condconv_ref._mixing import (
    check_condconv,
    mix,
    mix_jvp,
    mix_vjp,
    mixed_conv,
    mixed_conv_jvp,
    mixed_conv_vjp,
    moe_memory,
)
from condconv_ref._tangent import conv_tangent, total
from condconv_ref._validate import (
    ConvGeometry,
    ConvOptions,
    check_ndim,
    check_nonempty,
    check_shape,
    check_tangent_shapes,
    itemsize,
    namespace,
    public_op,
    tangent_namespace,
)
from condconv_ref.memory import check_memory

__all__ = [
    "condconv",
    "condconv_jvp",
    "condconv_layer",
    "condconv_layer_hvp",
    "condconv_layer_jvp",
    "condconv_layer_vjp",
    "condconv_vjp",
    "mix_experts",
    "mix_experts_jvp",
    "mix_experts_vjp",
    "moe_condconv",
    "moe_condconv_jvp",
    "moe_condconv_vjp",
]


# ---------------------------------------------------------------- mix_experts


def _check_mix(fn: str, routing: Any, experts: Any, cotangent: Any = None, *,
               xp: ModuleType) -> None:
    """Validate a :func:`mix_experts` (``cotangent``: :func:`mix_experts_vjp`) call."""
    check_ndim(fn, "routing", routing, 2, "(B, E)")
    if experts.ndim < 1 or experts.shape[0] < 1:
        raise ValueError(f"{fn}: experts has shape {tuple(experts.shape)}, expected (E, *s) with E >= 1")
    check_shape(fn, "routing", routing, (routing.shape[0], experts.shape[0]),
                f"(B, E) with E={experts.shape[0]} from experts")
    if cotangent is not None:
        check_shape(fn, "cotangent", cotangent, (routing.shape[0],) + tuple(experts.shape[1:]),
                    "(B, *s), the output shape")
    check_nonempty(fn, routing=routing, experts=experts)
    mixed = routing.shape[0] * math.prod(experts.shape[1:])
    parts = {"mixed experts (B, *s)": mixed}
    if cotangent is not None:
        parts["experts gradient"] = math.prod(experts.shape)
    check_memory(fn, itemsize(experts, xp=xp), parts)


@public_op
def mix_experts(routing: Any, experts: Any) -> Any:
    r"""Mix experts per example: :math:`M_b = \sum_e \alpha_{be} W_e`.

    Parameters
    ----------
    routing : array, shape (B, E)
    experts : array, shape (E, \*s)

    Returns
    -------
    array, shape (B, \*s)

    Notes
    -----
    Flattening :math:`W` to (E, S) makes this one matmul, :math:`M = \alpha W`,
    whose VJP is :math:`\bar\alpha = \bar M W^\top` and :math:`\bar W = \alpha^\top \bar M`.

    Examples
    --------
    >>> import numpy as np
    >>> from condconv_ref import mix_experts
    >>> mix_experts(np.array([[1.0, 0.5]]), np.array([[2.0, 4.0], [10.0, 20.0]]))
    array([[ 7., 14.]])
    """
    xp = namespace("mix_experts", routing=routing, experts=experts)
    _check_mix("mix_experts", routing, experts, xp=xp)
    return mix(routing, experts, xp=xp)


@public_op
def mix_experts_vjp(cotangent: Any, routing: Any, experts: Any) -> dict[str, Any]:
    r"""Vector-Jacobian product of :func:`mix_experts`: ``{"routing": ᾱ, "experts": W̄}``.

    :math:`\bar\alpha_{be} = \langle \bar M_b, W_e\rangle`,
    :math:`\bar W_e = \sum_b \alpha_{be} \bar M_b`.

    Examples
    --------
    >>> import numpy as np
    >>> from condconv_ref import mix_experts_vjp
    >>> grads = mix_experts_vjp(np.ones((1, 2)), np.array([[1.0, 0.5]]), np.eye(2))
    >>> grads["routing"], grads["experts"]
    (array([[1., 1.]]), array([[1. , 1. ],
           [0.5, 0.5]]))
    """
    xp = namespace("mix_experts_vjp", routing=routing, experts=experts, cotangent=cotangent)
    _check_mix("mix_experts_vjp", routing, experts, cotangent, xp=xp)
    return mix_vjp(cotangent, routing, experts, xp=xp)


@public_op
def mix_experts_jvp(tangents: Mapping[str, Any], routing: Any, experts: Any) -> Any:
    r"""Jacobian-vector product of :func:`mix_experts`: the output's derivative along ``tangents``.

    ``tangents`` maps ``"routing"`` and/or ``"experts"`` (the keys of
    :func:`mix_experts_vjp`) to :math:`\dot\alpha` (B, E) and :math:`\dot W`
    (E, \*s); a missing key is a zero tangent.  Returns (B, \*s).

    Notes
    -----
    :math:`M = \alpha W` is linear in each factor, so
    :math:`\dot M = \dot\alpha W + \alpha \dot W`, i.e.
    :math:`\dot M_b = \sum_e \dot\alpha_{be} W_e + \alpha_{be}\dot W_e`.
    Its transpose is :func:`mix_experts_vjp`:
    :math:`\langle \bar M, \dot\alpha W\rangle = \langle \bar M W^\top, \dot\alpha\rangle`
    and :math:`\langle \bar M, \alpha\dot W\rangle = \langle \alpha^\top\bar M, \dot W\rangle`.

    Examples
    --------
    >>> import numpy as np
    >>> from condconv_ref import mix_experts_jvp
    >>> mix_experts_jvp({"routing": np.array([[0.0, 1.0]])}, np.array([[1.0, 0.5]]),
    ...                 np.array([[2.0, 4.0], [10.0, 20.0]]))
    array([[10., 20.]])
    """
    fn = "mix_experts_jvp"
    arrays = {"routing": routing, "experts": experts}
    tangents, xp = tangent_namespace(fn, tangents, arrays)
    _check_mix(fn, routing, experts, xp=xp)
    check_tangent_shapes(fn, tangents, arrays)
    mixed = mix_jvp(tangents.get("routing"), tangents.get("experts"), routing, experts, xp=xp)
    shape = (routing.shape[0],) + tuple(experts.shape[1:])
    return total([] if mixed is None else [mixed], shape, experts, xp=xp)


# ---------------------------------------------------------------- condconv


@public_op
def condconv(x: Any, experts: Any, routing: Any, bias: Any = None, *, stride: Any = 1,
             padding: Any = 0, dilation: Any = 1, groups: int = 1,
             padding_mode: str = "zeros") -> Any:
    r"""Conditionally parameterized convolution with routing weights given from outside.

    For each example :math:`b`,

    .. math::

        y_b = \Big(\sum_e \alpha_{be} W_e\Big) \ast x_b + \sum_e \alpha_{be}\,\beta_e .

    This is the TensorFlow ``CondConv2D.call(inputs, routing_weights)`` form,
    where one routing vector can be shared by the convolutions of a block.

    Parameters
    ----------
    x : array, shape (B, C, \*spatial)
    experts : array, shape (E, O, C/groups, \*k)
    routing : array, shape (B, E)
        :math:`\alpha`; any real values (sigmoid outputs, softmax outputs, ...).
    bias : array, shape (E, O), optional
        One bias per expert, mixed by the routing like the kernels.
    stride, padding, dilation, groups, padding_mode
        As in :func:`conv`.

    Returns
    -------
    array, shape (B, O, \*out)

    Notes
    -----
    With :math:`M_b = \sum_e \alpha_{be} W_e` and :math:`m_b = \sum_e
    \alpha_{be}\beta_e`, :math:`y = \mathrm{conv}(x, M, m)` with per-example
    kernels.  The chain rule through :func:`conv_vjp` and :func:`mix_experts_vjp`
    gives

    .. math::

        \bar x = \mathrm{conv\_vjp}_x,\quad
        \bar W_e = \sum_b \alpha_{be} \bar M_b,\quad
        \bar\beta_e = \sum_b \alpha_{be} \bar m_b,\quad
        \bar\alpha_{be} = \langle \bar M_b, W_e\rangle + \langle \bar m_b, \beta_e\rangle,

    where :math:`\bar M_b = \sum_p \bar y_{b,:,p} X_{b,p}^\top` and
    :math:`\bar m_b = \sum_p \bar y_{b,:,p}` come from :func:`conv_vjp`.

    Examples
    --------
    >>> import numpy as np
    >>> from condconv_ref import condconv
    >>> x = np.ones((2, 1, 4))
    >>> experts = np.stack([np.ones((1, 1, 2)), 2 * np.ones((1, 1, 2))])
    >>> condconv(x, experts, np.array([[1.0, 0.0], [0.5, 0.5]]))
    array([[[2., 2., 2.]],
    <BLANKLINE>
           [[3., 3., 3.]]])
    """
    fn = "condconv"
    xp = namespace(fn, x=x, experts=experts, routing=routing, bias=bias)
    geometry = check_condconv(fn, x, experts, routing, bias,
                              ConvOptions(stride, padding, dilation, groups, padding_mode), xp=xp)
    return mixed_conv(x, experts, routing, bias, geometry, run_conv, xp=xp)


@public_op
def condconv_vjp(cotangent: Any, x: Any, experts: Any, routing: Any, bias: Any = None, *,
                 stride: Any = 1, padding: Any = 0, dilation: Any = 1, groups: int = 1,
                 padding_mode: str = "zeros") -> dict[str, Any]:
    r"""Vector-Jacobian product of :func:`condconv`.

    Returns
    -------
    dict
        ``{"x", "experts", "routing"}`` plus ``"bias"`` when ``bias`` is given.
        The derivation is in :func:`condconv`.

    Examples
    --------
    >>> import numpy as np
    >>> from condconv_ref import condconv_vjp
    >>> grads = condconv_vjp(np.ones((1, 1, 3)), np.ones((1, 1, 4)),
    ...                      np.ones((2, 1, 1, 2)), np.array([[1.0, 0.0]]))
    >>> grads["routing"], grads["experts"][:, 0, 0]
    (array([[6., 6.]]), array([[3., 3.],
           [0., 0.]]))
    """
    fn = "condconv_vjp"
    xp = namespace(fn, x=x, experts=experts, routing=routing, bias=bias, cotangent=cotangent)
    geometry = check_condconv(fn, x, experts, routing, bias,
                              ConvOptions(stride, padding, dilation, groups, padding_mode),
                              cotangent, xp=xp)
    return mixed_conv_vjp(cotangent, x, experts, routing, bias, geometry, run_conv_vjp, xp=xp)


@public_op
def condconv_jvp(tangents: Mapping[str, Any], x: Any, experts: Any, routing: Any,
                 bias: Any = None, *, stride: Any = 1, padding: Any = 0, dilation: Any = 1,
                 groups: int = 1, padding_mode: str = "zeros") -> Any:
    r"""Jacobian-vector product of :func:`condconv`: the output's derivative along ``tangents``.

    Parameters
    ----------
    tangents : mapping
        Any of ``"x"``, ``"experts"``, ``"routing"`` and (when ``bias`` is
        given) ``"bias"``, the keys of :func:`condconv_vjp`, each with the
        shape of its argument; a missing key is a zero tangent.
    x, experts, routing, bias, stride, padding, dilation, groups, padding_mode
        Exactly the arguments given to :func:`condconv`.

    Returns
    -------
    array, shape (B, O, \*out)

    Notes
    -----
    With :math:`M_b = \sum_e \alpha_{be} W_e` and :math:`m_b = \sum_e\alpha_{be}\beta_e`,
    :math:`y = \mathrm{conv}(x, M, m)` is linear in :math:`x` and in
    :math:`(M, m)`, and these are linear in :math:`\alpha` and in
    :math:`(W, \beta)`.  The product rule gives

    .. math::

        \dot M = \dot\alpha W + \alpha\dot W,\quad
        \dot m = \dot\alpha\beta + \alpha\dot\beta,\quad
        \dot y = \mathrm{conv}(\dot x, M) + \mathrm{conv}(x, \dot M) + \dot m,

    two convolutions with per-example kernels run by the forward's engine
    (:func:`conv_jvp` and :func:`mix_experts_jvp` chained).  Transposing each
    linear map gives back :func:`condconv_vjp`.

    Examples
    --------
    Along the routing alone the tangent is the output of the routing's
    direction, here the second expert's:

    >>> import numpy as np
    >>> from condconv_ref import condconv_jvp
    >>> x = np.ones((1, 1, 4))
    >>> experts = np.stack([np.ones((1, 1, 2)), 2 * np.ones((1, 1, 2))])
    >>> condconv_jvp({"routing": np.array([[0.0, 1.0]])}, x, experts, np.array([[1.0, 0.0]]))
    array([[[4., 4., 4.]]])
    """
    fn = "condconv_jvp"
    arrays = {"x": x, "experts": experts, "routing": routing, "bias": bias}
    tangents, xp = tangent_namespace(fn, tangents, arrays)
    geometry = check_condconv(fn, x, experts, routing, bias,
                              ConvOptions(stride, padding, dilation, groups, padding_mode), xp=xp)
    check_tangent_shapes(fn, tangents, arrays)
    return mixed_conv_jvp(tangents, x, experts, routing, bias, geometry, xp=xp)


# ---------------------------------------------------------------- mixture of experts


def _expert_outputs(x: Any, experts: Any, bias: Any, geometry: ConvGeometry, *,
                    xp: ModuleType) -> list[Any]:
    """conv(x, W_e) + β_e for every expert e, each (B, O, *out)."""
    return [
        run_conv(x, experts[e, ...], None if bias is None else bias[e, ...], geometry,
                    xp=xp)
        for e in range(experts.shape[0])
    ]


def _per_example(routing: Any, e: int, nd: int, *, xp: ModuleType) -> Any:
    """Column e of the routing, shaped (B, 1, 1, ...) to scale (B, O, *out)."""
    return xp.reshape(routing[:, e], (routing.shape[0],) + (1,) * (nd + 1))


@public_op
def moe_condconv(x: Any, experts: Any, routing: Any, bias: Any = None, *, stride: Any = 1,
                 padding: Any = 0, dilation: Any = 1, groups: int = 1,
                 padding_mode: str = "zeros") -> Any:
    r"""The mixture-of-experts form that CondConv equals: E convolutions, then a weighted sum.

    .. math::

        y_b = \sum_e \alpha_{be}\,\big(W_e \ast x_b + \beta_e\big)

    Same arguments and result as :func:`condconv`; it costs E convolutions
    instead of one, and exists to test the equivalence
    :math:`\sum_e \alpha_e (W_e \ast x) = (\sum_e \alpha_e W_e) \ast x`.

    Notes
    -----
    With :math:`y^{(e)} = W_e \ast x + \beta_e`, the VJP is
    :math:`\bar\alpha_{be} = \langle \bar y_b, y^{(e)}_b\rangle` and, for each
    expert, :func:`conv_vjp` at cotangent :math:`\alpha_{be}\bar y_b`, whose
    input gradients are summed over the experts.

    Examples
    --------
    >>> import numpy as np
    >>> from condconv_ref import condconv, moe_condconv
    >>> rng = np.random.default_rng(0)
    >>> x, experts = rng.normal(size=(2, 3, 5, 5)), rng.normal(size=(4, 2, 3, 3, 3))
    >>> routing = rng.uniform(size=(2, 4))
    >>> bool(np.allclose(moe_condconv(x, experts, routing), condconv(x, experts, routing)))
    True
    """
    fn = "moe_condconv"
    xp = namespace(fn, x=x, experts=experts, routing=routing, bias=bias)
    geometry = check_condconv(fn, x, experts, routing, bias,
                              ConvOptions(stride, padding, dilation, groups, padding_mode),
                              xp=xp, memory=moe_memory)
    nd = x.ndim - 2
    outputs = _expert_outputs(x, experts, bias, geometry, xp=xp)
    y = _per_example(routing, 0, nd, xp=xp) * outputs[0]
    for e in range(1, len(outputs)):
        y = y + _per_example(routing, e, nd, xp=xp) * outputs[e]
    return y


@public_op
def moe_condconv_vjp(cotangent: Any, x: Any, experts: Any, routing: Any, bias: Any = None, *,
                     stride: Any = 1, padding: Any = 0, dilation: Any = 1, groups: int = 1,
                     padding_mode: str = "zeros") -> dict[str, Any]:
    r"""Vector-Jacobian product of :func:`moe_condconv` (derivation there).

    Examples
    --------
    >>> import numpy as np
    >>> from condconv_ref import moe_condconv_vjp
    >>> grads = moe_condconv_vjp(np.ones((1, 1, 3)), np.ones((1, 1, 4)),
    ...                          np.ones((2, 1, 1, 2)), np.array([[1.0, 0.0]]))
    >>> grads["routing"]
    array([[6., 6.]])
    """
    fn = "moe_condconv_vjp"
    xp = namespace(fn, x=x, experts=experts, routing=routing, bias=bias, cotangent=cotangent)
    geometry = check_condconv(fn, x, experts, routing, bias,
                              ConvOptions(stride, padding, dilation, groups, padding_mode),
                              cotangent, xp=xp, memory=moe_memory)
    nd = x.ndim - 2
    non_batch = tuple(range(1, nd + 2))
    outputs = _expert_outputs(x, experts, bias, geometry, xp=xp)
    grad_x = xp.zeros_like(x)
    expert_grads, bias_grads, routing_grads = [], [], []
    for e, output in enumerate(outputs):
        routing_grads.append(xp.sum(cotangent * output, axis=non_batch))
        grads = run_conv_vjp(_per_example(routing, e, nd, xp=xp) * cotangent, x,
                                experts[e, ...], None if bias is None else bias[e, ...],
                                geometry, xp=xp)
        grad_x = grad_x + grads["x"]
        expert_grads.append(grads["kernel"])
        if bias is not None:
            bias_grads.append(grads["bias"])
    result = {"x": grad_x, "experts": xp.stack(expert_grads),
              "routing": xp.stack(routing_grads, axis=1)}
    if bias is not None:
        result["bias"] = xp.stack(bias_grads)
    return result


@public_op
def moe_condconv_jvp(tangents: Mapping[str, Any], x: Any, experts: Any, routing: Any,
                     bias: Any = None, *, stride: Any = 1, padding: Any = 0, dilation: Any = 1,
                     groups: int = 1, padding_mode: str = "zeros") -> Any:
    r"""Jacobian-vector product of :func:`moe_condconv`; arguments as :func:`condconv_jvp`.

    Notes
    -----
    With :math:`y^{(e)} = W_e \ast x + \beta_e`, the product rule on
    :math:`y_b = \sum_e \alpha_{be} y^{(e)}_b` gives

    .. math::

        \dot y_b = \sum_e \dot\alpha_{be}\, y^{(e)}_b
                  + \alpha_{be}\,\big(W_e \ast \dot x_b + \dot W_e \ast x_b + \dot\beta_e\big),

    one :func:`conv_jvp` per expert.

    Examples
    --------
    >>> import numpy as np
    >>> from condconv_ref import moe_condconv_jvp
    >>> x = np.ones((1, 1, 4))
    >>> experts = np.stack([np.ones((1, 1, 2)), 2 * np.ones((1, 1, 2))])
    >>> moe_condconv_jvp({"x": np.ones((1, 1, 4))}, x, experts, np.array([[1.0, 0.5]]))
    array([[[4., 4., 4.]]])
    """
    fn = "moe_condconv_jvp"
    arrays = {"x": x, "experts": experts, "routing": routing, "bias": bias}
    tangents, xp = tangent_namespace(fn, tangents, arrays)
    geometry = check_condconv(fn, x, experts, routing, bias,
                              ConvOptions(stride, padding, dilation, groups, padding_mode),
                              xp=xp, memory=moe_memory)
    check_tangent_shapes(fn, tangents, arrays)
    nd = x.ndim - 2
    outputs = (_expert_outputs(x, experts, bias, geometry, xp=xp) if "routing" in tangents
               else None)
    terms = []
    for e in range(experts.shape[0]):
        expert_tangents = {"x": tangents.get("x"),
                           "kernel": None if "experts" not in tangents else tangents["experts"][e, ...],
                           "bias": None if "bias" not in tangents else tangents["bias"][e, ...]}
        expert_tangents = {name: t for name, t in expert_tangents.items() if t is not None}
        if expert_tangents:
            terms.append(_per_example(routing, e, nd, xp=xp) * conv_tangent(
                expert_tangents, x, experts[e, ...], geometry, xp=xp))
        if outputs is not None:
            terms.append(_per_example(tangents["routing"], e, nd, xp=xp) * outputs[e])
    shape = (x.shape[0], experts.shape[1]) + geometry.out
    return total(terms, shape, x, xp=xp)


# ---------------------------------------------------------------- the layer


def _check_layer(fn: str, x: Any, p: dict[str, Any], options: ConvOptions,
                 cotangent: Any = None, *, xp: ModuleType) -> ConvGeometry:
    """Validate a :func:`condconv_layer` (``cotangent``: its VJP) call; return its geometry."""
    check_sigmoid_router(fn, x, p)
    return check_condconv(fn, x, p["experts"], None, p["bias"], options, cotangent, xp=xp)


@public_op
def condconv_layer(x: Any, params: Mapping[str, Any], *, stride: Any = 1, padding: Any = 0,
                   dilation: Any = 1, groups: int = 1, padding_mode: str = "zeros") -> Any:
    r"""The whole CondConv layer: sigmoid routing computed from ``x``, then :func:`condconv`.

    .. math::

        \alpha = \sigma(\mathrm{GAP}(x) R^\top + r),\qquad
        y = \mathrm{condconv}(x, W, \alpha, \beta)

    Parameters
    ----------
    x : array, shape (B, C, \*spatial)
    params : mapping
        ``experts`` (E, O, C/groups, \*k); ``route_weight`` :math:`R` (E, C);
        optional ``bias`` (E, O) and ``route_bias`` :math:`r` (E,).
    stride, padding, dilation, groups, padding_mode
        As in :func:`conv`.

    Returns
    -------
    array, shape (B, O, \*out)

    Notes
    -----
    ``x`` reaches the output along two paths, the convolution and the routing,
    so :math:`\bar x = \mathrm{condconv\_vjp}_x + \mathrm{route\_sigmoid\_vjp}_x(\bar\alpha)`
    with :math:`\bar\alpha` from :func:`condconv_vjp`.

    Examples
    --------
    >>> import numpy as np
    >>> from condconv_ref import condconv_layer
    >>> rng = np.random.default_rng(0)
    >>> params = {"experts": rng.normal(size=(3, 4, 2, 3, 3)),
    ...           "route_weight": rng.normal(size=(3, 2))}
    >>> condconv_layer(rng.normal(size=(5, 2, 8, 8)), params, padding="same").shape
    (5, 4, 8, 8)
    """
    fn = "condconv_layer"
    p = layer_params(fn, params)
    xp = namespace(fn, x=x, **p)
    geometry = _check_layer(fn, x, p, ConvOptions(stride, padding, dilation, groups, padding_mode),
                            xp=xp)
    return layer(x, p, SIGMOID, partial(mixed_conv, geometry=geometry, conv=run_conv), xp=xp)


@public_op
def condconv_layer_vjp(cotangent: Any, x: Any, params: Mapping[str, Any], *, stride: Any = 1,
                       padding: Any = 0, dilation: Any = 1, groups: int = 1,
                       padding_mode: str = "zeros") -> dict[str, Any]:
    r"""Vector-Jacobian product of :func:`condconv_layer`.

    Returns
    -------
    dict
        ``"x"`` (through both the convolution and the routing) and one entry
        per key present in ``params``.

    Examples
    --------
    >>> import numpy as np
    >>> from condconv_ref import condconv_layer_vjp
    >>> params = {"experts": np.ones((2, 1, 1, 2)), "route_weight": np.zeros((2, 1))}
    >>> sorted(condconv_layer_vjp(np.ones((1, 1, 3)), np.ones((1, 1, 4)), params))
    ['experts', 'route_weight', 'x']
    """
    fn = "condconv_layer_vjp"
    p = layer_params(fn, params)
    xp = namespace(fn, x=x, **p, cotangent=cotangent)
    geometry = _check_layer(fn, x, p, ConvOptions(stride, padding, dilation, groups, padding_mode),
                            cotangent, xp=xp)
    return layer_vjp(cotangent, x, p, SIGMOID,
                     partial(mixed_conv_vjp, geometry=geometry, conv_vjp=run_conv_vjp), xp=xp)


@public_op
def condconv_layer_jvp(tangents: Mapping[str, Any], x: Any, params: Mapping[str, Any], *,
                       stride: Any = 1, padding: Any = 0, dilation: Any = 1, groups: int = 1,
                       padding_mode: str = "zeros") -> Any:
    r"""Jacobian-vector product of :func:`condconv_layer`: the output's derivative along ``tangents``.

    Parameters
    ----------
    tangents : mapping
        Any of ``"x"`` and the keys present in ``params`` (the keys of
        :func:`condconv_layer_vjp`), each with the shape of its argument; a
        missing key is a zero tangent.
    x, params, stride, padding, dilation, groups, padding_mode
        Exactly the arguments given to :func:`condconv_layer`.

    Returns
    -------
    array, shape (B, O, \*out)

    Notes
    -----
    The routing's tangent comes first, from :func:`route_sigmoid_jvp`:
    :math:`\dot\alpha = \sigma'(z) \odot (\mathrm{GAP}(\dot x) R^\top +
    \mathrm{GAP}(x)\dot R^\top + \dot r)`; then :func:`condconv_jvp` along
    :math:`(\dot x, \dot W, \dot\alpha, \dot\beta)`.  ``x`` thus reaches the
    tangent along both paths, the convolution and the routing, as it reaches
    the gradient of :func:`condconv_layer_vjp`.

    Examples
    --------
    >>> import numpy as np
    >>> from condconv_ref import condconv_layer_jvp
    >>> params = {"experts": np.ones((2, 1, 1, 2)), "route_weight": np.zeros((2, 1))}
    >>> condconv_layer_jvp({"route_weight": np.ones((2, 1))}, np.ones((1, 1, 4)), params)
    array([[[1., 1., 1.]]])
    """
    fn = "condconv_layer_jvp"
    p = layer_params(fn, params)
    arrays = {"x": x, **p}
    tangents, xp = tangent_namespace(fn, tangents, arrays)
    geometry = _check_layer(fn, x, p, ConvOptions(stride, padding, dilation, groups, padding_mode),
                            xp=xp)
    check_tangent_shapes(fn, tangents, arrays)
    return layer_jvp(tangents, x, p, SIGMOID, partial(mixed_conv_jvp, geometry=geometry), xp=xp)


@public_op
def condconv_layer_hvp(cotangent: Any, tangents: Mapping[str, Any], x: Any,
                       params: Mapping[str, Any], *, stride: Any = 1, padding: Any = 0,
                       dilation: Any = 1, groups: int = 1,
                       padding_mode: str = "zeros") -> dict[str, Any]:
    r"""Hessian-vector product of :func:`condconv_layer`: the derivative of
    :func:`condconv_layer_vjp` at a fixed ``cotangent`` along ``tangents``.

    Parameters
    ----------
    cotangent : array, shape (B, O, \*out)
        :math:`c`, held fixed.
    tangents : mapping
        As for :func:`condconv_layer_jvp`: any of ``"x"`` and the keys present
        in ``params``; a missing key is a zero tangent.
    x, params, stride, padding, dilation, groups, padding_mode
        Exactly the arguments given to :func:`condconv_layer`.

    Returns
    -------
    dict
        Keyed like :func:`condconv_layer_vjp`: :math:`H t` for the Hessian
        :math:`H` of :math:`\langle c, f(x, \theta)\rangle` over the input and
        all parameters, i.e. :math:`\partial_\varepsilon\,\mathrm{vjp}(c, (x, \theta)
        + \varepsilon t)` at :math:`\varepsilon = 0`.

    Notes
    -----
    :func:`condconv` is linear in each of :math:`x, W, \alpha, \beta`, so the
    derivative of its VJP along a tangent is a sum of VJPs, each with one
    argument replaced by its tangent.  The routing's tangent
    :math:`\dot\alpha` comes from :func:`route_sigmoid_jvp`; the router adds
    its own term at the routing's gradient :math:`\bar\alpha`: with
    :math:`g = \bar\alpha\odot\sigma'(z)`,
    :math:`\dot g = \bar\alpha\odot\sigma'(z)(1 - 2\sigma(z))\dot z`, chained
    back like :math:`g` in :func:`route_sigmoid_vjp`.

    Examples
    --------
    >>> import numpy as np
    >>> from condconv_ref import condconv_layer_hvp
    >>> params = {"experts": np.ones((2, 1, 1, 2)), "route_weight": np.zeros((2, 1))}
    >>> hvp = condconv_layer_hvp(np.ones((1, 1, 3)), {"x": np.ones((1, 1, 4))},
    ...                          np.ones((1, 1, 4)), params)
    >>> hvp["experts"].shape, sorted(hvp)
    ((2, 1, 1, 2), ['experts', 'route_weight', 'x'])
    """
    fn = "condconv_layer_hvp"
    p = layer_params(fn, params)
    arrays = {"x": x, **p}
    tangents, xp = tangent_namespace(fn, tangents, arrays, cotangent)
    geometry = _check_layer(fn, x, p, ConvOptions(stride, padding, dilation, groups, padding_mode),
                            cotangent, xp=xp)
    check_tangent_shapes(fn, tangents, arrays)
    return layer_hvp(cotangent, tangents, x, p, SIGMOID,
                     partial(mixed_conv_vjp, geometry=geometry, conv_vjp=run_conv_vjp), xp=xp)
