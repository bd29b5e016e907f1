r"""Routing functions: example-dependent expert weights computed from the input.

``route_sigmoid`` is CondConv's routing (Yang et al., 2019): global average
pooling, a fully-connected layer, a sigmoid.  ``route_softmax`` is Dynamic
Convolution's (Chen et al., 2020): global average pooling, a squeeze-and-excite
pair of fully-connected layers with a ReLU between them, and a softmax over the
experts at a temperature.

Every matrix product here goes through :func:`condconv_ref._matmul.matmul`, so
that a floating-point flag a BLAS kernel raises in lanes it discards (OpenBLAS's
AVX-512 ``sgemv_t`` for an inner dimension of 5 does) is not reported as a
warning of the routing.
"""

from __future__ import annotations

import math
from types import ModuleType
from typing import Any, NamedTuple

from condconv_ref._matmul import matmul
from condconv_ref._validate import (
    check_finite_positive,
    check_ndim,
    check_nonempty,
    check_shape,
    namespace,
    public_op,
)
from condconv_ref.memory import check_memory

__all__ = [
    "global_average_pool",
    "route_sigmoid",
    "route_sigmoid_vjp",
    "route_softmax",
    "route_softmax_vjp",
]


def global_average_pool(x: Any, *, xp: ModuleType) -> Any:
    """Mean over the spatial axes: ``(B, C, *spatial) -> (B, C)``; ``(B, C)`` is returned as is."""
    if x.ndim == 2:
        return x
    return xp.mean(x, axis=tuple(range(2, x.ndim)))


def global_average_pool_vjp(grad_pooled: Any, x_shape: tuple[int, ...], *,
                            xp: ModuleType) -> Any:
    """Adjoint of :func:`global_average_pool`: spread each gradient evenly over its positions."""
    if len(x_shape) == 2:
        return grad_pooled
    spread = xp.reshape(grad_pooled / math.prod(x_shape[2:]), tuple(grad_pooled.shape) + (1,) * (len(x_shape) - 2))
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
    check_nonempty(fn, x=x, weight=weight, bias=bias)
    check_memory(fn, x, _working_memory(x, experts, vjp=cotangent is not None))
    return xp


def _working_memory(x: Any, experts: int, *, vjp: bool) -> dict[str, int]:
    """Elements of the largest arrays a routing function allocates: x's gradient is x-sized."""
    batch, channels = x.shape[:2]
    parts = {"pooled input": batch * channels, "routing": batch * experts}
    if vjp:
        parts["x gradient"] = math.prod(x.shape)
    return parts


def _logits(x: Any, weight: Any, bias: Any, *, xp: ModuleType) -> tuple[Any, Any]:
    pooled = global_average_pool(x, xp=xp)
    logits = matmul(pooled, xp.matrix_transpose(weight), xp=xp)
    if bias is not None:
        logits = logits + bias
    return pooled, logits


@public_op
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
    return _route_sigmoid(x, weight, bias, xp=xp)


def _route_sigmoid(x: Any, weight: Any, bias: Any, *, xp: ModuleType) -> Any:
    """:func:`route_sigmoid` on validated arguments (layers call it with their own checks)."""
    _, logits = _logits(x, weight, bias, xp=xp)
    return stable_sigmoid(logits, xp=xp)[0]


@public_op
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
    return _route_sigmoid_vjp(cotangent, x, weight, bias, xp=xp)


def _route_sigmoid_vjp(cotangent: Any, x: Any, weight: Any, bias: Any, *,
                       xp: ModuleType) -> dict[str, Any]:
    """:func:`route_sigmoid_vjp` on validated arguments."""
    pooled, logits = _logits(x, weight, bias, xp=xp)
    grad_logits = cotangent * stable_sigmoid(logits, xp=xp)[1]
    grads = {
        "x": global_average_pool_vjp(matmul(grad_logits, weight, xp=xp), tuple(x.shape), xp=xp),
        "weight": matmul(xp.matrix_transpose(grad_logits), pooled, xp=xp),
    }
    if bias is not None:
        grads["bias"] = xp.sum(grad_logits, axis=0)
    return grads


# ---------------------------------------------------------------- softmax routing (DY-Conv)


def stable_softmax(logits: Any, temperature: float, *, xp: ModuleType) -> Any:
    r"""Softmax of ``logits / temperature`` over the last axis, without overflow.

    The logits are shifted by their row maximum *before* the division,
    :math:`s = (z - \max_e z_e) / T \le 0`, so every :math:`e^{s}` lies in
    [0, 1] and the largest entry contributes :math:`e^0 = 1` to the
    denominator, which therefore lies in [1, E]: nothing overflows and nothing
    divides by zero.  ``exp`` of a very negative number underflows quietly to 0,
    which is the exact limit.  The shift leaves the softmax unchanged.
    """
    shifted = (logits - xp.max(logits, axis=-1, keepdims=True)) / temperature
    weights = xp.exp(shifted)
    return weights / xp.sum(weights, axis=-1, keepdims=True)


def stable_softmax_vjp(cotangent: Any, probabilities: Any, temperature: float, *,
                       xp: ModuleType) -> Any:
    r"""Adjoint of :func:`stable_softmax` at its output ``probabilities``.

    :math:`\bar z = \alpha \odot (\bar\alpha - \langle \bar\alpha, \alpha\rangle) / T`:
    the Jacobian-vector form of :math:`(\mathrm{diag}\,\alpha - \alpha\alpha^\top)/T`.
    Only products of :math:`\alpha \in [0, 1]` with the cotangent appear, so it
    is as stable as the forward (entries are bounded by :math:`2\max|\bar\alpha| / T`).

    The cotangent is first shifted by its value :math:`\bar\alpha_m` at the
    largest weight, which changes nothing exactly (the rows of the Jacobian sum
    to zero, :math:`\sum_e \partial\alpha_e/\partial z = 0`) but keeps the
    result accurate when the softmax saturates: unshifted, the dominant entry
    :math:`\alpha_m(\bar\alpha_m - \langle\bar\alpha,\alpha\rangle)
    \approx \alpha_m \sum_{j \ne m}\alpha_j(\bar\alpha_m - \bar\alpha_j)` is a
    difference of two numbers of size :math:`|\bar\alpha|` whose result is
    :math:`1 - \alpha_m` times smaller, and loses that many digits; shifted,
    :math:`\bar\alpha_m - \bar\alpha_m = 0` exactly and the inner product is
    made of the small weights alone.
    """
    largest = probabilities == xp.max(probabilities, axis=-1, keepdims=True)
    ties = xp.sum(xp.astype(largest, cotangent.dtype), axis=-1, keepdims=True)
    pivot = xp.sum(xp.where(largest, cotangent, xp.zeros_like(cotangent)), axis=-1,
                   keepdims=True) / ties
    shifted = cotangent - pivot
    inner = xp.sum(shifted * probabilities, axis=-1, keepdims=True)
    return probabilities * (shifted - inner) / temperature


def _affine(inputs: Any, weight: Any, bias: Any, *, xp: ModuleType) -> Any:
    """``inputs @ weight.T + bias`` for inputs (B, N_in), weight (N_out, N_in), bias (N_out,)."""
    outputs = matmul(inputs, xp.matrix_transpose(weight), xp=xp)
    return outputs if bias is None else outputs + bias


def _affine_vjp(grad_outputs: Any, inputs: Any, weight: Any, *,
                xp: ModuleType) -> tuple[Any, Any]:
    """Gradients of :func:`_affine` for ``inputs`` and ``weight`` (the bias's is a sum over B)."""
    return (matmul(grad_outputs, weight, xp=xp),
            matmul(xp.matrix_transpose(grad_outputs), inputs, xp=xp))


class _SoftmaxRouting(NamedTuple):
    """Intermediates of :func:`route_softmax` that its VJP needs, batch first."""

    pooled: Any
    hidden_preactivation: Any
    hidden: Any
    routing: Any


def _softmax_prepare(fn: str, x: Any, fc1_weight: Any, fc2_weight: Any, fc1_bias: Any,
                     fc2_bias: Any, temperature: Any, cotangent: Any = None,
                     ) -> tuple[ModuleType, float]:
    """Validate the arguments of :func:`route_softmax`; return the namespace and ``float(T)``.

    Layers built on the softmax routing call it with their own ``fn`` so that
    messages name the public function the user called.
    """
    xp = namespace(fn, x=x, fc1_weight=fc1_weight, fc2_weight=fc2_weight, fc1_bias=fc1_bias,
                   fc2_bias=fc2_bias, cotangent=cotangent)
    check_ndim(fn, "x", x, (2, 3, 4, 5), "(B, C) or (B, C, *spatial) with 1 to 3 spatial dims")
    check_ndim(fn, "fc1_weight", fc1_weight, 2, "(H, C)")
    check_ndim(fn, "fc2_weight", fc2_weight, 2, "(E, H)")
    hidden, experts = fc1_weight.shape[0], fc2_weight.shape[0]
    if hidden < 1:
        raise ValueError(f"{fn}: fc1_weight has shape {tuple(fc1_weight.shape)}, a hidden width "
                         f"of H={hidden}; expected (H, C) with H >= 1")
    if experts < 1:
        raise ValueError(f"{fn}: fc2_weight has shape {tuple(fc2_weight.shape)}, E={experts} "
                         "experts; expected (E, H) with E >= 1")
    check_shape(fn, "fc1_weight", fc1_weight, (hidden, x.shape[1]),
                f"(H, C) with C={x.shape[1]} from x")
    check_shape(fn, "fc2_weight", fc2_weight, (experts, hidden),
                f"(E, H) with H={hidden} from fc1_weight")
    if fc1_bias is not None:
        check_shape(fn, "fc1_bias", fc1_bias, (hidden,), "(H,)")
    if fc2_bias is not None:
        check_shape(fn, "fc2_bias", fc2_bias, (experts,), "(E,)")
    if cotangent is not None:
        check_shape(fn, "cotangent", cotangent, (x.shape[0], experts), "(B, E), the output shape")
    temperature = check_finite_positive(fn, "temperature", temperature)
    check_nonempty(fn, x=x, fc1_weight=fc1_weight, fc2_weight=fc2_weight, fc1_bias=fc1_bias,
                   fc2_bias=fc2_bias)
    check_memory(fn, x, {**_working_memory(x, experts, vjp=cotangent is not None),
                         "hidden layer": x.shape[0] * hidden})
    return xp, temperature


def _route_softmax(x: Any, fc1_weight: Any, fc2_weight: Any, fc1_bias: Any, fc2_bias: Any,
                   temperature: float, *, xp: ModuleType) -> _SoftmaxRouting:
    """Forward worker of :func:`route_softmax`, keeping the intermediates."""
    pooled = global_average_pool(x, xp=xp)
    preactivation = _affine(pooled, fc1_weight, fc1_bias, xp=xp)
    # relu as "u <= 0 -> 0" (PyTorch's threshold): a NaN stays NaN instead of becoming 0
    hidden = xp.where(preactivation <= 0, 0.0, preactivation)
    logits = _affine(hidden, fc2_weight, fc2_bias, xp=xp)
    return _SoftmaxRouting(pooled, preactivation, hidden,
                           stable_softmax(logits, temperature, xp=xp))


def _route_softmax_vjp(cotangent: Any, x_shape: tuple[int, ...], fc1_weight: Any,
                       fc2_weight: Any, fc1_bias: Any, fc2_bias: Any, forward: _SoftmaxRouting,
                       temperature: float, *, xp: ModuleType) -> dict[str, Any]:
    """VJP worker of :func:`route_softmax` from the intermediates ``forward``."""
    grad_logits = stable_softmax_vjp(cotangent, forward.routing, temperature, xp=xp)
    grad_hidden, grad_fc2 = _affine_vjp(grad_logits, forward.hidden, fc2_weight, xp=xp)
    grad_preactivation = xp.where(forward.hidden_preactivation <= 0, 0.0, grad_hidden)
    grad_pooled, grad_fc1 = _affine_vjp(grad_preactivation, forward.pooled, fc1_weight, xp=xp)
    grads = {"x": global_average_pool_vjp(grad_pooled, x_shape, xp=xp),
             "fc1_weight": grad_fc1, "fc2_weight": grad_fc2}
    if fc1_bias is not None:
        grads["fc1_bias"] = xp.sum(grad_preactivation, axis=0)
    if fc2_bias is not None:
        grads["fc2_bias"] = xp.sum(grad_logits, axis=0)
    return grads


@public_op
def route_softmax(x: Any, fc1_weight: Any, fc2_weight: Any, fc1_bias: Any = None,
                  fc2_bias: Any = None, *, temperature: float = 1.0) -> Any:
    r"""Dynamic Convolution routing: a softmax over the experts at temperature :math:`T`.

    .. math::

        h = \mathrm{relu}(\bar x W_1^\top + b_1),\qquad
        z = h W_2^\top + b_2,\qquad
        \alpha = \mathrm{softmax}(z / T)

    along the expert axis (Chen et al., CVPR 2020: the squeeze-and-excitation
    attention with its sigmoid replaced by a softmax).  Every row of
    :math:`\alpha` is positive and sums to 1; as :math:`T \to \infty` it tends to
    the uniform :math:`1/E`, and as :math:`T \to 0` to one-hot on the largest
    logit.

    Parameters
    ----------
    x : array, shape (B, C, \*spatial) or (B, C)
        Layer input; :math:`\bar x` is its mean over the spatial axes (a 2-D
        ``x`` has none, and is used as it is).
    fc1_weight : array, shape (H, C)
        :math:`W_1`, the squeeze layer; the hidden width H must be >= 1.
    fc2_weight : array, shape (E, H)
        :math:`W_2`, one row per expert.
    fc1_bias : array, shape (H,), optional
        :math:`b_1`.
    fc2_bias : array, shape (E,), optional
        :math:`b_2`.
    temperature : float, keyword-only
        :math:`T`, finite and > 0 (``ValueError`` otherwise).

    Returns
    -------
    array, shape (B, E)

    Notes
    -----
    *Stability.*  The softmax shifts the logits by their row maximum before
    dividing by :math:`T` (see :func:`stable_softmax`), so it neither overflows
    nor warns for logits of any size whose differences divided by :math:`T` are
    finite; e.g. logits :math:`\pm 10^4` with :math:`T = 10^{-3}` in float32.

    *Backward.*  With the softmax Jacobian
    :math:`\partial\alpha/\partial z = (\mathrm{diag}\,\alpha - \alpha\alpha^\top)/T`,

    .. math::

        \bar z = \alpha \odot (\bar\alpha - \langle\bar\alpha, \alpha\rangle) / T,\quad
        \bar W_2 = \bar z^\top h,\quad \bar b_2 = \textstyle\sum_b \bar z_b,\quad
        \bar u = (\bar z W_2) \odot [u > 0],

    where :math:`u = \bar x W_1^\top + b_1` is the pre-activation, then
    :math:`\bar W_1 = \bar u^\top \bar x`, :math:`\bar b_1 = \sum_b \bar u_b`,
    :math:`\bar{\bar x} = \bar u W_1` and
    :math:`\bar x_{b,c,p} = \bar{\bar x}_{b,c} / P` over the :math:`P` spatial
    positions.  The ReLU derivative at exactly :math:`u = 0` is taken as 0, the
    convention of PyTorch, TensorFlow and JAX; finite differences disagree only
    at such kinks.  :math:`T` is a hyper-parameter and gets no gradient.

    Examples
    --------
    >>> import numpy as np
    >>> from condconv_ref import route_softmax
    >>> route_softmax(np.zeros((1, 2, 4, 4)), np.ones((3, 2)), np.ones((4, 3)))
    array([[0.25, 0.25, 0.25, 0.25]])

    Logits of :math:`\pm 10^4` stay finite; a high temperature softens them:

    >>> x, fc1, fc2 = np.array([[1e4]]), np.array([[1.0]]), np.array([[1.0], [-1.0]])
    >>> route_softmax(x, fc1, fc2)
    array([[1., 0.]])
    >>> route_softmax(x, fc1, fc2, temperature=1e4).round(4)
    array([[0.8808, 0.1192]])
    """
    xp, temperature = _softmax_prepare("route_softmax", x, fc1_weight, fc2_weight,
                                       fc1_bias, fc2_bias, temperature)
    return _route_softmax(x, fc1_weight, fc2_weight, fc1_bias, fc2_bias, temperature,
                          xp=xp).routing


@public_op
def route_softmax_vjp(cotangent: Any, x: Any, fc1_weight: Any, fc2_weight: Any,
                      fc1_bias: Any = None, fc2_bias: Any = None, *,
                      temperature: float = 1.0) -> dict[str, Any]:
    r"""Vector-Jacobian product of :func:`route_softmax`.

    Returns
    -------
    dict
        ``{"x", "fc1_weight", "fc2_weight"}`` plus ``"fc1_bias"`` / ``"fc2_bias"``
        when given; the temperature is not differentiated.  The derivation is in
        :func:`route_softmax`.

    Examples
    --------
    A cotangent that is constant over the experts has zero gradient, because
    the routing always sums to 1:

    >>> import numpy as np
    >>> from condconv_ref import route_softmax_vjp
    >>> rng = np.random.default_rng(0)
    >>> x, fc1, fc2 = rng.normal(size=(2, 3, 4)), rng.normal(size=(5, 3)), rng.normal(size=(4, 5))
    >>> grads = route_softmax_vjp(np.ones((2, 4)), x, fc1, fc2, temperature=0.5)
    >>> sorted(grads), bool(np.allclose(grads["x"], 0.0))
    (['fc1_weight', 'fc2_weight', 'x'], True)
    """
    xp, temperature = _softmax_prepare("route_softmax_vjp", x, fc1_weight, fc2_weight,
                                       fc1_bias, fc2_bias, temperature, cotangent)
    forward = _route_softmax(x, fc1_weight, fc2_weight, fc1_bias, fc2_bias, temperature, xp=xp)
    return _route_softmax_vjp(cotangent, tuple(x.shape), fc1_weight, fc2_weight, fc1_bias,
                              fc2_bias, forward, temperature, xp=xp)
