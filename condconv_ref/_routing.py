r"""The routing math on validated arrays, shared by the routing ops and the layers.

Global average pooling, a sigmoid and a softmax that cannot overflow, the
affine maps, and the two routings with their VJPs: :func:`sigmoid_routing`
(CondConv's) and :func:`softmax_routing` (Dynamic Convolution's, which keeps
its intermediates in :class:`SoftmaxRouting` for the VJP).
:func:`check_softmax_routing` validates the softmax routing's arguments for
:func:`condconv_ref.route_softmax` and for the layers built on it.

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
from condconv_ref._tangent import added
from condconv_ref._validate import (
    check_finite_positive,
    check_ndim,
    check_nonempty,
    check_shape,
    itemsize,
)
from condconv_ref.memory import check_memory

__all__ = [
    "SoftmaxRouting",
    "affine",
    "affine_jvp",
    "affine_vjp",
    "affine_vjp_derivative",
    "check_softmax_routing",
    "global_average_pool",
    "global_average_pool_vjp",
    "or_zeros",
    "routing_memory",
    "sigmoid_routing",
    "sigmoid_routing_hvp",
    "sigmoid_routing_jvp",
    "sigmoid_routing_vjp",
    "sigmoid_vjp_derivative",
    "softmax_routing",
    "softmax_routing_hvp",
    "softmax_routing_jvp",
    "softmax_routing_vjp",
    "stable_sigmoid",
    "stable_softmax",
    "stable_softmax_vjp",
    "stable_softmax_vjp_derivative",
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


def routing_memory(x: Any, experts: int, *, vjp: bool, parameters: int = 0) -> dict[str, int]:
    """Elements of the largest arrays a routing function allocates: x's gradient is x-sized,
    and the gradients of its ``parameters`` (elements of its weights) as large as them."""
    batch, channels = x.shape[:2]
    parts = {"pooled input": batch * channels, "routing": batch * experts}
    if vjp:
        parts["x gradient"] = math.prod(x.shape)
        parts["parameter gradients"] = parameters
    return parts


def _logits(x: Any, weight: Any, bias: Any, *, xp: ModuleType) -> tuple[Any, Any]:
    pooled = global_average_pool(x, xp=xp)
    logits = matmul(pooled, xp.matrix_transpose(weight), xp=xp)
    if bias is not None:
        logits = logits + bias
    return pooled, logits


def sigmoid_routing(x: Any, weight: Any, bias: Any, *, xp: ModuleType) -> Any:
    """:func:`condconv_ref.route_sigmoid` on validated arguments."""
    _, logits = _logits(x, weight, bias, xp=xp)
    return stable_sigmoid(logits, xp=xp)[0]


def sigmoid_routing_vjp(cotangent: Any, x: Any, weight: Any, bias: Any, *,
                       xp: ModuleType) -> dict[str, Any]:
    """:func:`condconv_ref.route_sigmoid_vjp` on validated arguments."""
    pooled, logits = _logits(x, weight, bias, xp=xp)
    grad_logits = cotangent * stable_sigmoid(logits, xp=xp)[1]
    grads = {
        "x": global_average_pool_vjp(matmul(grad_logits, weight, xp=xp), tuple(x.shape), xp=xp),
        "weight": matmul(xp.matrix_transpose(grad_logits), pooled, xp=xp),
    }
    if bias is not None:
        grads["bias"] = xp.sum(grad_logits, axis=0)
    return grads


def sigmoid_routing_jvp(tangents: dict[str, Any], x: Any, weight: Any, bias: Any, *,
                        xp: ModuleType) -> Any:
    """:func:`condconv_ref.route_sigmoid_jvp` on validated arguments (``tangents`` keyed
    ``x``, ``weight``, ``bias``, absent ones zero); ``None`` when no tangent is given."""
    pooled, logits = _logits(x, weight, bias, xp=xp)
    x_tangent = tangents.get("x")
    logits_tangent = affine_jvp(None if x_tangent is None else global_average_pool(x_tangent, xp=xp),
                                tangents.get("weight"), tangents.get("bias"), pooled, weight,
                                xp=xp)
    if logits_tangent is None:
        return None
    return stable_sigmoid(logits, xp=xp)[1] * logits_tangent


def or_zeros(tangent: Any, like: Any, *, xp: ModuleType) -> Any:
    """``tangent``, or zeros like ``like`` where it is ``None`` (a zero tangent)."""
    return xp.zeros_like(like) if tangent is None else tangent


def affine_vjp_derivative(grad_outputs: Any, grad_outputs_tangent: Any, inputs: Any,
                           inputs_tangent: Any, weight: Any, weight_tangent: Any, *,
                           xp: ModuleType) -> tuple[Any, Any]:
    """The derivative of :func:`affine_vjp` along all three of its arguments: it is bilinear,
    each gradient linear in the cotangent and in one other argument, so the derivative is
    ``affine_vjp`` at the cotangent's tangent plus ``affine_vjp`` at the others' tangents."""
    first = affine_vjp(grad_outputs_tangent, inputs, weight, xp=xp)
    second = affine_vjp(grad_outputs, inputs_tangent, weight_tangent, xp=xp)
    return first[0] + second[0], first[1] + second[1]


def sigmoid_vjp_derivative(cotangent: Any, sigmoid: Any, sigmoid_tangent: Any) -> Any:
    r"""The derivative of the sigmoid's VJP :math:`\bar\alpha\,\sigma'(z)` at the fixed
    cotangent :math:`\bar\alpha` along the sigmoid's own tangent
    :math:`\dot\alpha = \sigma'(z)\dot z`: with :math:`\sigma'' = \sigma'(1 - 2\sigma)`,
    :math:`\bar\alpha\,\sigma''(z)\dot z = \bar\alpha(1 - 2\alpha)\dot\alpha`."""
    return cotangent * (1 - 2 * sigmoid) * sigmoid_tangent


def sigmoid_routing_hvp(cotangent: Any, tangents: dict[str, Any], x: Any, weight: Any,
                        bias: Any, *, xp: ModuleType) -> dict[str, Any]:
    r"""The derivative of :func:`sigmoid_routing_vjp` at the fixed ``cotangent``
    :math:`\bar\alpha` along ``tangents`` (keyed ``x``, ``weight``, ``bias``, absent ones zero).

    With :math:`z = \mathrm{GAP}(x)R^\top + r`, the VJP is
    :math:`g = \bar\alpha\odot\sigma'(z)`, :math:`\bar x = \mathrm{GAP}^\top(gR)`,
    :math:`\bar R = g^\top\mathrm{GAP}(x)`, :math:`\bar r = \sum_b g`.  Along
    :math:`\dot z` (:func:`affine_jvp`), :math:`\dot g = \bar\alpha\odot\sigma''(z)\dot z`
    with :math:`\sigma'' = \sigma'(1 - 2\sigma)`, the router's own second-order term; the
    bilinear products then follow the product rule.
    """
    pooled, logits = _logits(x, weight, bias, xp=xp)
    sigmoid, slope = stable_sigmoid(logits, xp=xp)
    x_tangent = tangents.get("x")
    pooled_tangent = (xp.zeros_like(pooled) if x_tangent is None
                      else global_average_pool(x_tangent, xp=xp))
    logits_tangent = affine_jvp(pooled_tangent, tangents.get("weight"), tangents.get("bias"),
                                pooled, weight, xp=xp)
    grad_logits = cotangent * slope
    grad_logits_tangent = sigmoid_vjp_derivative(cotangent, sigmoid, slope * logits_tangent)
    grad_pooled, grad_weight = affine_vjp_derivative(
        grad_logits, grad_logits_tangent, pooled, pooled_tangent, weight,
        or_zeros(tangents.get("weight"), weight, xp=xp), xp=xp)
    result = {"x": global_average_pool_vjp(grad_pooled, tuple(x.shape), xp=xp),
              "weight": grad_weight}
    if bias is not None:
        result["bias"] = xp.sum(grad_logits_tangent, axis=0)
    return result


# ---------------------------------------------------------------- softmax routing (DY-Conv)


_EXP_ZERO = 800.0


def stable_softmax(logits: Any, temperature: float, *, xp: ModuleType) -> Any:
    r"""Softmax of ``logits / temperature`` over the last axis, without overflow.

    The logits are shifted by their row maximum *before* the division,
    :math:`s = (z - \max_e z_e) / T \le 0`, so every :math:`e^{s}` lies in
    [0, 1] and the largest entry contributes :math:`e^0 = 1` to the
    denominator, which therefore lies in [1, E]: nothing overflows and nothing
    divides by zero.  ``exp`` of a very negative number underflows quietly to 0,
    which is the exact limit.  The shift leaves the softmax unchanged.
    """
    gap = logits - xp.max(logits, axis=-1, keepdims=True)
    # exp(s) is exactly 0 in every float dtype for s < -800 (float64's smallest subnormal is
    # exp(-744.4)): gaps below -800 T are raised to -800 T before the division by T, where
    # at extreme scales (a gap of 1e34, T = 1e-6) the quotient would overflow to -inf with a
    # warning for the same exact 0.  A NaN gap fails the comparison and stays NaN.
    floor = -_EXP_ZERO * temperature
    shifted = xp.where(gap < floor, floor, gap) / temperature
    weights = xp.exp(shifted)
    return weights / xp.sum(weights, axis=-1, keepdims=True)


def stable_softmax_vjp(cotangent: Any, probabilities: Any, *, xp: ModuleType) -> Any:
    r"""Adjoint of :func:`stable_softmax` at its output ``probabilities``, times ``T``.

    :math:`T\bar z = \alpha \odot (\bar\alpha - \langle \bar\alpha, \alpha\rangle)`:
    the Jacobian-vector form of :math:`(\mathrm{diag}\,\alpha - \alpha\alpha^\top)/T`,
    without the division by :math:`T`.  Only products of :math:`\alpha \in [0, 1]`
    with the cotangent appear, so it is as stable as the forward (entries are
    bounded by :math:`2\max|\bar\alpha|`).  The caller divides by :math:`T`
    *after* its own products with the weights: at a small :math:`T` and large
    weights, :math:`\bar z_e w_e` of two tied experts would each overflow to
    :math:`\pm\infty` and their sum be NaN where the exact sum is 0 or small.

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
    return probabilities * (shifted - inner)


def stable_softmax_vjp_derivative(cotangent: Any, probabilities: Any,
                                  probabilities_tangent: Any, *, xp: ModuleType) -> Any:
    r"""The derivative of :func:`stable_softmax_vjp` at the fixed ``cotangent``
    :math:`\bar\alpha` along the softmax's own tangent :math:`\dot\alpha`: the derivative of
    the softmax's Jacobian, :math:`T\dot{\bar z} = \dot\alpha\odot(\bar\alpha -
    \langle\bar\alpha, \alpha\rangle) - \alpha\langle\bar\alpha, \dot\alpha\rangle`
    (times ``T``, as :func:`stable_softmax_vjp`)."""
    centred = cotangent - xp.sum(cotangent * probabilities, axis=-1, keepdims=True)
    return (probabilities_tangent * centred
            - probabilities * xp.sum(cotangent * probabilities_tangent, axis=-1, keepdims=True))


def affine(inputs: Any, weight: Any, bias: Any, *, xp: ModuleType) -> Any:
    """``inputs @ weight.T + bias`` for inputs (B, N_in), weight (N_out, N_in), bias (N_out,)."""
    outputs = matmul(inputs, xp.matrix_transpose(weight), xp=xp)
    return outputs if bias is None else outputs + bias


def affine_jvp(inputs_tangent: Any, weight_tangent: Any, bias_tangent: Any, inputs: Any,
               weight: Any, *, xp: ModuleType) -> Any:
    """The tangent of :func:`affine`, :math:`\\dot u W^\\top + u \\dot W^\\top + \\dot b`
    (absent tangents ``None``); ``None`` when all three are ``None``."""
    terms = []
    if inputs_tangent is not None:
        terms.append(matmul(inputs_tangent, xp.matrix_transpose(weight), xp=xp))
    if weight_tangent is not None:
        terms.append(matmul(inputs, xp.matrix_transpose(weight_tangent), xp=xp))
    if bias_tangent is not None:
        terms.append(xp.broadcast_to(bias_tangent, (inputs.shape[0], weight.shape[0])))
    return added(terms)


def affine_vjp(grad_outputs: Any, inputs: Any, weight: Any, *,
                xp: ModuleType) -> tuple[Any, Any]:
    """Gradients of :func:`affine` for ``inputs`` and ``weight`` (the bias's is a sum over B)."""
    return (matmul(grad_outputs, weight, xp=xp),
            matmul(xp.matrix_transpose(grad_outputs), inputs, xp=xp))


class SoftmaxRouting(NamedTuple):
    """Intermediates of :func:`condconv_ref.route_softmax` that its VJP needs, batch first."""

    pooled: Any
    hidden_preactivation: Any
    hidden: Any
    routing: Any


def check_softmax_routing(fn: str, x: Any, fc1_weight: Any, fc2_weight: Any, fc1_bias: Any,
                          fc2_bias: Any, temperature: Any, cotangent: Any = None, *,
                          xp: ModuleType) -> float:
    """Validate the arguments of :func:`condconv_ref.route_softmax`; return ``float(T)``.

    The caller has resolved ``xp`` (:func:`condconv_ref._validate.namespace`).
    Layers built on the softmax routing call it with their own ``fn`` so that
    messages name the public function the user called.
    """
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
    check_memory(fn, itemsize(x, xp=xp),
                 {**routing_memory(x, experts, vjp=cotangent is not None,
                                   parameters=(hidden + 1) * (x.shape[1] + experts + 1)),
                  "hidden layer": 2 * x.shape[0] * hidden})
    return temperature


def softmax_routing(x: Any, fc1_weight: Any, fc2_weight: Any, fc1_bias: Any, fc2_bias: Any,
                   temperature: float, *, xp: ModuleType) -> SoftmaxRouting:
    """Forward worker of :func:`condconv_ref.route_softmax`, keeping the intermediates."""
    pooled = global_average_pool(x, xp=xp)
    preactivation = affine(pooled, fc1_weight, fc1_bias, xp=xp)
    # relu as "u <= 0 -> 0" (PyTorch's threshold): a NaN stays NaN instead of becoming 0
    hidden = xp.where(preactivation <= 0, 0.0, preactivation)
    logits = affine(hidden, fc2_weight, fc2_bias, xp=xp)
    return SoftmaxRouting(pooled, preactivation, hidden,
                           stable_softmax(logits, temperature, xp=xp))


def softmax_routing_vjp(cotangent: Any, x_shape: tuple[int, ...], fc1_weight: Any,
                       fc2_weight: Any, fc1_bias: Any, fc2_bias: Any, forward: SoftmaxRouting,
                       temperature: float, *, xp: ModuleType) -> dict[str, Any]:
    """VJP worker of :func:`condconv_ref.route_softmax` from the intermediates ``forward``."""
    # T times the gradients of the logits: the products with the weights come first, then
    # the division by T (stable_softmax_vjp says why).
    scaled_logits = stable_softmax_vjp(cotangent, forward.routing, xp=xp)
    scaled_hidden, scaled_fc2 = affine_vjp(scaled_logits, forward.hidden, fc2_weight, xp=xp)
    grad_logits, grad_fc2 = scaled_logits / temperature, scaled_fc2 / temperature
    grad_preactivation = xp.where(forward.hidden_preactivation <= 0, 0.0,
                                  scaled_hidden / temperature)
    grad_pooled, grad_fc1 = affine_vjp(grad_preactivation, forward.pooled, fc1_weight, xp=xp)
    grads = {"x": global_average_pool_vjp(grad_pooled, x_shape, xp=xp),
             "fc1_weight": grad_fc1, "fc2_weight": grad_fc2}
    if fc1_bias is not None:
        grads["fc1_bias"] = xp.sum(grad_preactivation, axis=0)
    if fc2_bias is not None:
        grads["fc2_bias"] = xp.sum(grad_logits, axis=0)
    return grads


def softmax_routing_jvp(tangents: dict[str, Any], fc1_weight: Any, fc2_weight: Any,
                        forward: SoftmaxRouting, temperature: float, *,
                        xp: ModuleType) -> Any:
    """JVP worker of :func:`condconv_ref.route_softmax` from the intermediates ``forward``
    (``tangents`` keyed like its VJP's gradients); ``None`` when no tangent is given.

    The softmax's Jacobian :math:`(\\mathrm{diag}\\,\\alpha - \\alpha\\alpha^\\top)/T` is
    symmetric, so :func:`stable_softmax_vjp` applies it to the logits' tangent too.
    """
    x_tangent = tangents.get("x")
    pooled_tangent = None if x_tangent is None else global_average_pool(x_tangent, xp=xp)
    pre_tangent = affine_jvp(pooled_tangent, tangents.get("fc1_weight"),
                             tangents.get("fc1_bias"), forward.pooled, fc1_weight, xp=xp)
    hidden_tangent = None if pre_tangent is None else xp.where(
        forward.hidden_preactivation <= 0, 0.0, pre_tangent)
    logits_tangent = affine_jvp(hidden_tangent, tangents.get("fc2_weight"),
                                tangents.get("fc2_bias"), forward.hidden, fc2_weight, xp=xp)
    if logits_tangent is None:
        return None
    return stable_softmax_vjp(logits_tangent, forward.routing, xp=xp) / temperature


def softmax_routing_hvp(cotangent: Any, tangents: dict[str, Any], x_shape: tuple[int, ...],
                        fc1_weight: Any, fc2_weight: Any, fc1_bias: Any, fc2_bias: Any,
                        forward: SoftmaxRouting, temperature: float, *,
                        xp: ModuleType) -> dict[str, Any]:
    r"""The derivative of :func:`softmax_routing_vjp` at the fixed ``cotangent``
    :math:`\bar\alpha` along ``tangents`` (keyed like its gradients, absent ones zero).

    The forward's tangents come first (:func:`softmax_routing_jvp`'s steps).  The
    softmax's share :math:`T\bar z = \alpha\odot(\bar\alpha - \langle\bar\alpha,
    \alpha\rangle)` moves with :math:`\alpha` alone, the derivative of the softmax's
    Jacobian: :math:`T\dot{\bar z} = \dot\alpha\odot(\bar\alpha - \langle\bar\alpha,
    \alpha\rangle) - \alpha\langle\bar\alpha, \dot\alpha\rangle`.  The ReLU's mask is
    constant almost everywhere (its second derivative is zero off the kink), and each affine
    map's VJP is bilinear (:func:`affine_vjp_derivative`).
    """
    def given(name: str, like: Any) -> Any:
        return or_zeros(tangents.get(name), like, xp=xp)

    pooled_tangent = (xp.zeros_like(forward.pooled) if "x" not in tangents
                      else global_average_pool(tangents["x"], xp=xp))
    active = forward.hidden_preactivation > 0
    pre_tangent = affine_jvp(pooled_tangent, given("fc1_weight", fc1_weight),
                             tangents.get("fc1_bias"), forward.pooled, fc1_weight, xp=xp)
    hidden_tangent = xp.where(active, pre_tangent, 0.0)
    logits_tangent = affine_jvp(hidden_tangent, tangents.get("fc2_weight"),
                                tangents.get("fc2_bias"), forward.hidden, fc2_weight, xp=xp)
    routing_tangent = stable_softmax_vjp(logits_tangent, forward.routing, xp=xp) / temperature
    scaled_logits = stable_softmax_vjp(cotangent, forward.routing, xp=xp)
    scaled_logits_tangent = stable_softmax_vjp_derivative(cotangent, forward.routing,
                                                          routing_tangent, xp=xp)
    scaled_hidden_tangent, scaled_fc2 = affine_vjp_derivative(
        scaled_logits, scaled_logits_tangent, forward.hidden, hidden_tangent, fc2_weight,
        given("fc2_weight", fc2_weight), xp=xp)
    grad_preactivation = xp.where(active, affine_vjp(scaled_logits, forward.hidden, fc2_weight,
                                                     xp=xp)[0] / temperature, 0.0)
    grad_preactivation_tangent = xp.where(active, scaled_hidden_tangent / temperature, 0.0)
    grad_pooled, grad_fc1 = affine_vjp_derivative(
        grad_preactivation, grad_preactivation_tangent, forward.pooled, pooled_tangent,
        fc1_weight, given("fc1_weight", fc1_weight), xp=xp)
    result = {"x": global_average_pool_vjp(grad_pooled, x_shape, xp=xp),
              "fc1_weight": grad_fc1, "fc2_weight": scaled_fc2 / temperature}
    if fc1_bias is not None:
        result["fc1_bias"] = xp.sum(grad_preactivation_tangent, axis=0)
    if fc2_bias is not None:
        result["fc2_bias"] = xp.sum(scaled_logits_tangent, axis=0) / temperature
    return result
