r"""Routing functions: example-dependent expert weights computed from the input.

``route_sigmoid`` is CondConv's routing (Yang et al., 2019): global average
pooling, a fully-connected layer, a sigmoid.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

from condconv_ref._validate import check_ndim, check_shape, namespace

__all__ = ["global_average_pool", "route_sigmoid", "route_sigmoid_vjp"]


def global_average_pool(x: Any, *, xp: ModuleType) -> Any:
    """Mean over the spatial axes: (B, C, *spatial) -> (B, C); (B, C) is returned as is."""
    if x.ndim == 2:
        return x
    return xp.mean(x, axis=tuple(range(2, x.ndim)))


def global_average_pool_vjp(grad_pooled: Any, x_shape: tuple[int, ...], *,
                            xp: ModuleType) -> Any:
    """Adjoint of :func:`global_average_pool`: spread each gradient evenly over its positions."""
    if len(x_shape) == 2:
        return grad_pooled
    positions = 1
    for n in x_shape[2:]:
        positions *= n
    spread = xp.reshape(grad_pooled / positions, tuple(grad_pooled.shape) + (1,) * (len(x_shape) - 2))
    return xp.asarray(xp.broadcast_to(spread, x_shape), copy=True)


def stable_sigmoid(z: Any, *, xp: ModuleType) -> tuple[Any, Any]:
    """Return ``(sigmoid(z), sigmoid(z) * (1 - sigmoid(z)))`` without overflow.

    With :math:`e = \\exp(-|z|) \\in (0, 1]`, :math:`\\sigma(z) = 1/(1+e)` for
    :math:`z \\ge 0` and :math:`e/(1+e)` otherwise, and the derivative is
    :math:`e/(1+e)^2` for either sign.  Nothing overflows for any finite ``z``;
    ``exp`` of a large negative number underflows quietly to 0.
    """
    e = xp.exp(-xp.abs(z))
    denominator = 1 + e
    sigmoid = xp.where(z >= 0, 1 / denominator, e / denominator)
    return sigmoid, e / (denominator * denominator)


def _prepare(fn: str, x: Any, weight: Any, bias: Any, cotangent: Any = None) -> ModuleType:
    xp = namespace(fn, x=x, weight=weight, bias=bias, cotangent=cotangent)
    check_ndim(fn, "x", x, (2, 3, 4, 5), "(B, C) or (B, C, *spatial) with 1 to 3 spatial dims")
    check_ndim(fn, "weight", weight, 2, "(E, C)")
    channels = x.shape[1]
    experts = weight.shape[0]
    if experts < 1:
        raise ValueError(f"{fn}: weight has E={experts} experts, expected E >= 1")
    check_shape(fn, "weight", weight, (experts, channels), f"(E, C) with C={channels} from x")
    if bias is not None:
        check_shape(fn, "bias", bias, (experts,), "(E,)")
    if cotangent is not None:
        check_shape(fn, "cotangent", cotangent, (x.shape[0], experts), "(B, E), the output shape")
    return xp


def _logits(x: Any, weight: Any, bias: Any, *, xp: ModuleType) -> tuple[Any, Any]:
    pooled = global_average_pool(x, xp=xp)
    logits = pooled @ xp.matrix_transpose(weight)
    if bias is not None:
        logits = logits + bias
    return pooled, logits


def route_sigmoid(x: Any, weight: Any, bias: Any = None) -> Any:
    r"""CondConv routing weights :math:`\alpha = \sigma(\bar x R^\top + r)`.

    Parameters
    ----------
    x : array, shape (B, C, \*spatial) or (B, C)
        Layer input; :math:`\bar x` is its mean over the spatial axes (a 2-D
        ``x`` has none, and is used as it is).
    weight : array, shape (E, C)
        Routing matrix :math:`R`, one row per expert.
    bias : array, shape (E,), optional
        Routing bias :math:`r`.

    Returns
    -------
    array, shape (B, E)
        Each entry in (0, 1); computed without overflow for any finite logit.

    Notes
    -----
    Forward: :math:`z = \bar x R^\top + r`, :math:`\alpha = \sigma(z)`.
    Backward, with :math:`\sigma'(z) = \sigma(z)(1-\sigma(z))`:

    .. math::

        \bar z = \bar\alpha \odot \sigma'(z),\quad
        \bar R = \bar z^\top \bar x,\quad
        \bar r = \textstyle\sum_b \bar z_b,\quad
        \bar{\bar x} = \bar z R,\quad
        \bar x_{b,c,p} = \bar{\bar x}_{b,c} / P,

    where :math:`P` is the number of spatial positions (pooling spreads the
    gradient evenly).

    Examples
    --------
    >>> import numpy as np
    >>> from condconv_ref import route_sigmoid
    >>> route_sigmoid(np.zeros((1, 2, 4, 4)), np.ones((3, 2)))
    array([[0.5, 0.5, 0.5]])
    """
    xp = _prepare("route_sigmoid", x, weight, bias)
    _, logits = _logits(x, weight, bias, xp=xp)
    return stable_sigmoid(logits, xp=xp)[0]


def route_sigmoid_vjp(cotangent: Any, x: Any, weight: Any, bias: Any = None) -> dict[str, Any]:
    r"""Vector-Jacobian product of :func:`route_sigmoid`.

    Returns
    -------
    dict
        ``{"x": ..., "weight": ...}`` plus ``"bias"`` when ``bias`` is given.
        The derivation is in :func:`route_sigmoid`.

    Examples
    --------
    >>> import numpy as np
    >>> from condconv_ref import route_sigmoid_vjp
    >>> grads = route_sigmoid_vjp(np.ones((1, 1)), np.zeros((1, 2, 2)), np.ones((1, 2)))
    >>> grads["weight"], grads["x"]
    (array([[0., 0.]]), array([[[0.125, 0.125],
            [0.125, 0.125]]]))
    """
    xp = _prepare("route_sigmoid_vjp", x, weight, bias, cotangent)
    pooled, logits = _logits(x, weight, bias, xp=xp)
    grad_logits = cotangent * stable_sigmoid(logits, xp=xp)[1]
    grads = {
        "x": global_average_pool_vjp(grad_logits @ weight, tuple(x.shape), xp=xp),
        "weight": xp.matrix_transpose(grad_logits) @ pooled,
    }
    if bias is not None:
        grads["bias"] = xp.sum(grad_logits, axis=0)
    return grads
