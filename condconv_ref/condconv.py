r"""CondConv (Yang et al., 2019): expert mixing, the conditional convolution, the layer.

Shapes: ``x`` (B, C, \*spatial), ``experts`` (E, O, C/groups, \*k),
``bias`` (E, O), ``routing`` (B, E).  Every op sits beside its VJP.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from functools import partial
from types import ModuleType
from typing import Any

import array_api_compat

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
from condconv_ref.conv import _conv, _conv_vjp, _itemsize, _working_memory
from condconv_ref.memory import check_memory
from condconv_ref.routing import _route_sigmoid, _route_sigmoid_vjp

__all__ = [
    "condconv",
    "condconv_layer",
    "condconv_layer_vjp",
    "condconv_vjp",
    "mix_experts",
    "mix_experts_vjp",
    "moe_condconv",
    "moe_condconv_vjp",
]


# ---------------------------------------------------------------- mix_experts


def _mix_prepare(fn: str, routing: Any, experts: Any, cotangent: Any = None) -> ModuleType:
    xp = namespace(fn, routing=routing, experts=experts, cotangent=cotangent)
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
    check_memory(fn, experts, parts)
    return xp


def _mix(routing: Any, experts: Any, *, xp: ModuleType) -> Any:
    flat = xp.reshape(experts, (experts.shape[0], -1))
    return xp.reshape(routing @ flat, (routing.shape[0],) + tuple(experts.shape[1:]))


def _mix_vjp(cotangent: Any, routing: Any, experts: Any, *, xp: ModuleType) -> dict[str, Any]:
    flat_experts = xp.reshape(experts, (experts.shape[0], -1))
    flat_cotangent = xp.reshape(cotangent, (routing.shape[0], -1))
    return {
        "routing": flat_cotangent @ xp.matrix_transpose(flat_experts),
        "experts": xp.reshape(xp.matrix_transpose(routing) @ flat_cotangent, experts.shape),
    }


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
    xp = _mix_prepare("mix_experts", routing, experts)
    return _mix(routing, experts, xp=xp)


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
    xp = _mix_prepare("mix_experts_vjp", routing, experts, cotangent)
    return _mix_vjp(cotangent, routing, experts, xp=xp)


# ---------------------------------------------------------------- condconv


def _condconv_prepare(fn: str, x: Any, experts: Any, routing: Any, bias: Any,
                      options: dict[str, Any], cotangent: Any = None, *,
                      memory: Callable[..., dict[str, int]] | None = None,
                      ) -> tuple[ModuleType, ConvGeometry]:
    """Validate a CondConv call.

    ``memory(x, experts, geometry, itemsize, vjp=...)`` estimates the working
    memory; the default is :func:`_condconv_memory` of the mixed form (the
    E-conv form and variants with their own kernel pass theirs).
    """
    xp = namespace(fn, x=x, experts=experts, routing=routing, bias=bias, cotangent=cotangent)
    check_ndim(fn, "x", x, (3, 4, 5), "(B, C, *spatial) with 1 to 3 spatial dims")
    nd = x.ndim - 2
    batch, channels = x.shape[:2]
    check_ndim(fn, "experts", experts, nd + 3, kernel_layout(nd, "E, O, I/groups"))
    n_experts, out_channels, in_per_group = experts.shape[:3]
    if n_experts < 1:
        raise ValueError(f"{fn}: experts has E={n_experts}, expected E >= 1")
    check_ndim(fn, "routing", routing, 2, "(B, E)")
    check_shape(fn, "routing", routing, (batch, n_experts),
                f"(B, E) with B={batch} from x and E={n_experts} from experts")
    if bias is not None:
        check_shape(fn, "bias", bias, (n_experts, out_channels), "(E, O)")
    geometry = conv_geometry(fn, x.shape[2:], experts.shape[3:], **options)
    check_groups(fn, "experts", channels, out_channels, in_per_group, geometry.groups)
    if cotangent is not None:
        check_shape(fn, "cotangent", cotangent, (batch, out_channels) + geometry.out,
                    "(B, O, *out), the output shape")
    check_nonempty(fn, x=x, experts=experts, routing=routing, bias=bias)
    estimate = partial(_condconv_memory, moe=False) if memory is None else memory
    check_memory(fn, x, estimate(x, experts, geometry, _itemsize(x, xp=xp),
                                 vjp=cotangent is not None))
    return xp, geometry


def _condconv_memory(x: Any, experts: Any, geometry: ConvGeometry, itemsize: int, *, vjp: bool,
                     moe: bool) -> dict[str, int]:
    """Elements of the largest arrays a CondConv call allocates (see :mod:`condconv_ref.memory`).

    The mixed form adds the per-example kernels to one convolution's needs; the
    mixture-of-experts form keeps the E expert outputs instead.
    """
    batch, n_experts = x.shape[0], experts.shape[0]
    if moe:
        parts = _working_memory(tuple(x.shape), tuple(experts.shape[1:]), geometry, itemsize,
                                vjp=vjp)
        parts["expert outputs"] = (n_experts * batch * experts.shape[1]
                                   * math.prod(geometry.out))
    else:
        kernels = (batch,) + tuple(experts.shape[1:])
        parts = _working_memory(tuple(x.shape), kernels, geometry, itemsize, vjp=vjp)
        parts["mixed kernels (B, O, C/groups, *k)"] = math.prod(kernels)
    if vjp:
        parts["experts gradient"] = math.prod(experts.shape)
    return parts


_moe_memory = partial(_condconv_memory, moe=True)


def _mixed(experts: Any, routing: Any, bias: Any, *, xp: ModuleType) -> tuple[Any, Any]:
    kernel = _mix(routing, experts, xp=xp)
    return kernel, (None if bias is None else _mix(routing, bias, xp=xp))


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
    xp, geometry = _condconv_prepare(
        "condconv", x, experts, routing, bias,
        dict(stride=stride, padding=padding, dilation=dilation, groups=groups,
             padding_mode=padding_mode))
    kernel, mixed_bias = _mixed(experts, routing, bias, xp=xp)
    return _conv(x, kernel, mixed_bias, geometry, xp=xp)


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
    xp, geometry = _condconv_prepare(
        "condconv_vjp", x, experts, routing, bias,
        dict(stride=stride, padding=padding, dilation=dilation, groups=groups,
             padding_mode=padding_mode),
        cotangent=cotangent)
    return _condconv_vjp(cotangent, x, experts, routing, bias, geometry, xp=xp)


def _condconv_vjp(cotangent: Any, x: Any, experts: Any, routing: Any, bias: Any,
                  geometry: ConvGeometry, *, xp: ModuleType) -> dict[str, Any]:
    kernel, mixed_bias = _mixed(experts, routing, bias, xp=xp)
    conv_grads = _conv_vjp(cotangent, x, kernel, mixed_bias, geometry, xp=xp)
    return _mixed_vjp(conv_grads, experts, routing, bias, xp=xp)


def _mixed_vjp(conv_grads: dict[str, Any], experts: Any, routing: Any, bias: Any, *,
               xp: ModuleType) -> dict[str, Any]:
    """Chain a per-example conv's ``kernel``/``bias`` gradients back through :func:`_mixed`."""
    kernel_grads = _mix_vjp(conv_grads["kernel"], routing, experts, xp=xp)
    grads = {"x": conv_grads["x"], "experts": kernel_grads["experts"],
             "routing": kernel_grads["routing"]}
    if bias is not None:
        bias_grads = _mix_vjp(conv_grads["bias"], routing, bias, xp=xp)
        grads["routing"] = grads["routing"] + bias_grads["routing"]
        grads["bias"] = bias_grads["experts"]
    return grads


# ---------------------------------------------------------------- mixture of experts


def _expert_outputs(x: Any, experts: Any, bias: Any, geometry: ConvGeometry, *,
                    xp: ModuleType) -> list[Any]:
    """conv(x, W_e) + β_e for every expert e, each (B, O, *out)."""
    return [
        _conv(x, experts[e, ...], None if bias is None else bias[e, ...], geometry, xp=xp)
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
    xp, geometry = _condconv_prepare(
        "moe_condconv", x, experts, routing, bias,
        dict(stride=stride, padding=padding, dilation=dilation, groups=groups,
             padding_mode=padding_mode), memory=_moe_memory)
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
    xp, geometry = _condconv_prepare(
        "moe_condconv_vjp", x, experts, routing, bias,
        dict(stride=stride, padding=padding, dilation=dilation, groups=groups,
             padding_mode=padding_mode),
        cotangent=cotangent, memory=_moe_memory)
    nd = x.ndim - 2
    non_batch = tuple(range(1, nd + 2))
    outputs = _expert_outputs(x, experts, bias, geometry, xp=xp)
    grad_x = xp.zeros_like(x)
    expert_grads, bias_grads, routing_grads = [], [], []
    for e, output in enumerate(outputs):
        routing_grads.append(xp.sum(cotangent * output, axis=non_batch))
        grads = _conv_vjp(_per_example(routing, e, nd, xp=xp) * cotangent, x, experts[e, ...],
                          None if bias is None else bias[e, ...], geometry, xp=xp)
        grad_x = grad_x + grads["x"]
        expert_grads.append(grads["kernel"])
        if bias is not None:
            bias_grads.append(grads["bias"])
    result = {"x": grad_x, "experts": xp.stack(expert_grads),
              "routing": xp.stack(routing_grads, axis=1)}
    if bias is not None:
        result["bias"] = xp.stack(bias_grads)
    return result


# ---------------------------------------------------------------- the layer

_LAYER_KEYS = {"experts": True, "bias": False, "route_weight": True, "route_bias": False}


def _layer_params(fn: str, params: Any,
                  keys: Mapping[str, bool] = _LAYER_KEYS) -> dict[str, Any]:
    """Check ``params`` against ``keys`` (name -> required); absent optional keys map to None."""
    if not isinstance(params, Mapping):
        raise TypeError(f"{fn}: params must be a mapping of arrays, got {type(params).__name__}")
    unknown = sorted(set(params) - set(keys))
    if unknown:
        raise ValueError(f"{fn}: params has unknown keys {unknown}, expected keys from "
                         f"{sorted(keys)}")
    missing = sorted(k for k, required in keys.items() if required and params.get(k) is None)
    if missing:
        raise ValueError(f"{fn}: params is missing the required keys {missing}")
    return {k: params.get(k) for k in keys}


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
    p = _layer_params(fn, params)
    options = dict(stride=stride, padding=padding, dilation=dilation, groups=groups,
                   padding_mode=padding_mode)
    routing = _layer_routing(fn, x, p)
    xp, geometry = _condconv_prepare(fn, x, p["experts"], routing, p["bias"], options)
    kernel, mixed_bias = _mixed(p["experts"], routing, p["bias"], xp=xp)
    return _conv(x, kernel, mixed_bias, geometry, xp=xp)


def _layer_routing(fn: str, x: Any, p: dict[str, Any]) -> Any:
    xp = namespace(fn, x=x, **{k: v for k, v in p.items()})
    check_nonempty(fn, x=x, **p)
    check_ndim(fn, "x", x, (3, 4, 5), "(B, C, *spatial) with 1 to 3 spatial dims")
    check_ndim(fn, "route_weight", p["route_weight"], 2, "(E, C)")
    n_experts = p["experts"].shape[0] if p["experts"].ndim else 0
    check_shape(fn, "route_weight", p["route_weight"], (n_experts, x.shape[1]),
                f"(E, C) with E={n_experts} from experts and C={x.shape[1]} from x")
    if p["route_bias"] is not None:
        check_shape(fn, "route_bias", p["route_bias"], (n_experts,), "(E,)")
    return _route_sigmoid(x, p["route_weight"], p["route_bias"], xp=xp)


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
    p = _layer_params(fn, params)
    options = dict(stride=stride, padding=padding, dilation=dilation, groups=groups,
                   padding_mode=padding_mode)
    routing = _layer_routing(fn, x, p)
    xp, geometry = _condconv_prepare(fn, x, p["experts"], routing, p["bias"], options,
                                     cotangent=cotangent)
    grads = _condconv_vjp(cotangent, x, p["experts"], routing, p["bias"], geometry, xp=xp)
    return _layer_vjp(grads, x, p)


def _layer_vjp(grads: dict[str, Any], x: Any, p: dict[str, Any]) -> dict[str, Any]:
    """Chain an op's gradients through the sigmoid routing into the layer's ``x`` and params."""
    route_grads = _route_sigmoid_vjp(grads["routing"], x, p["route_weight"], p["route_bias"],
                                     xp=array_api_compat.array_namespace(x))
    result = {"x": grads["x"] + route_grads["x"], "experts": grads["experts"],
              "route_weight": route_grads["weight"]}
    if p["bias"] is not None:
        result["bias"] = grads["bias"]
    if p["route_bias"] is not None:
        result["route_bias"] = route_grads["bias"]
    return result
