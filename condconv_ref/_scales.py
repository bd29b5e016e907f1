r"""The scale of every reference result: the magnitude its rounding error is relative to.

:func:`forward_scale` and :func:`vjp_scale` return, for one
:class:`~condconv_ref.variants.Case`, an array shaped like the output (or one
per gradient) such that a correct computation in a precision of unit
roundoff :math:`u` errs by at most :math:`\gamma_n(u)` times it
(:mod:`condconv_ref.accuracy` states the whole bound).

Multilinear ops (conv, mixing, condconv in both forms, depthwise, linear):
the op itself on the absolute values of its arguments, which sums the
magnitudes of exactly the terms the op sums; their VJPs are multilinear in the
cotangent and the other arguments, so the VJP on absolute values does the same.

Routing and layers: each step :math:`v = \phi(u_1, \ldots)` carries
:math:`s_v = \sum_k |\partial\phi/\partial u_k|\,s_{u_k} + |\phi|(|u|)`, the
errors it inherits to first order plus its own rounding (:math:`|\phi|(|u|)`,
the step on absolute values).  Inputs are exact (they are given in the
precision under test), so their scale is 0.  Sigmoid:
:math:`s_\alpha = \sigma'(z)\,s_z + \alpha`; softmax of
:math:`d = (l - \max l)/T`, whose first-order error
:math:`\delta\alpha_e = \alpha_e(\delta d_e - \sum_j \alpha_j \delta d_j)` cancels what
every logit shares: :math:`s_{\alpha_e} = \alpha_e\bigl((1 - \alpha_e)s_{d_e}
+ \sum_{j \ne e}\alpha_j s_{d_j}\bigr) + 2\alpha_e(1 - \alpha_e) + \alpha_e`; its VJP
shifts the cotangent by its value at the largest weight first, as the reference does;
ReLU is 1-Lipschitz, :math:`s_h = s_a`.  Every routing weight's scale also gets a floor
of twice the smallest normal number of the precision under test, so a weight that
underflowed into the subnormals carries its absolute error through all it multiplies.  A layer feeds
:math:`|\alpha| + s_\alpha` to its multilinear op on absolute values, as the op
is linear in the routing.

Everything here is float64 NumPy on the host: a scale needs no more accuracy
than a few digits.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any, NamedTuple

import numpy as np

from condconv_ref.accuracy import ELEMENTARY_ROUNDINGS, precision
from condconv_ref.backends import to_numpy

__all__ = ["MULTILINEAR", "TANGENT_ADDITIONS", "depth", "forward_scale", "hvp_depth",
           "hvp_scale", "jvp_depth", "jvp_scale", "vjp_scale"]

TANGENT_ADDITIONS = 4
"""Additions a JVP adds to the forward's longest chain: the product rule's terms of an op (at
most four, one per argument: three additions) and one more term in the routing's logits."""

MULTILINEAR = ("conv", "mix_experts", "condconv", "moe_condconv", "depthwise_condconv",
                "cond_linear", "moe_cond_linear")
_ROUTING_VARIANTS = ("route_sigmoid", "route_softmax")
_LAYERS = {  # layer: (its multilinear op, its routing, routing parameter names)
    "condconv_layer": ("condconv", "sigmoid", {"weight": "route_weight", "bias": "route_bias"}),
    "depthwise_condconv_layer": ("depthwise_condconv", "sigmoid",
                                 {"weight": "route_weight", "bias": "route_bias"}),
    "cond_linear_layer": ("cond_linear", "sigmoid",
                          {"weight": "route_weight", "bias": "route_bias"}),
    "dynamic_conv_layer": ("condconv", "softmax",
                           {name: name for name in ("fc1_weight", "fc1_bias", "fc2_weight",
                                                    "fc2_bias")}),
}


def depth(case: Any, *, vjp: bool) -> int:
    """The longest chain of roundings of ``case``'s forward (or forward and VJP), :math:`n`.

    Examples
    --------
    >>> from condconv_ref._scales import depth
    >>> from condconv_ref.testing import ConvConfig
    >>> from condconv_ref.variants import build_case
    >>> config = ConvConfig(batch=2, in_channels=3, out_channels=4, groups=1, spatial=(6,),
    ...                     kernel=(3,), stride=(1,), dilation=(1,), padding=1,
    ...                     padding_mode="zeros", n_experts=2, bias=True)
    >>> case = build_case("condconv", config, seed=0)
    >>> depth(case, vjp=False) == case.lengths[0] + 4
    True
    """
    longest = max(case.lengths) if vjp else case.lengths[0]
    return int(longest) + ELEMENTARY_ROUNDINGS


def _host(arrays: dict[str, Any]) -> dict[str, np.ndarray]:
    return {name: np.asarray(to_numpy(a), dtype=np.float64) for name, a in arrays.items()}


def _absolute(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {name: np.abs(a) for name, a in arrays.items()}


def _call(variant: str, arrays: dict[str, np.ndarray], options: dict[str, Any]) -> Any:
    from condconv_ref.variants import VARIANTS

    return VARIANTS[variant].forward(**arrays, **options)


def _call_vjp(variant: str, cotangent: np.ndarray, arrays: dict[str, np.ndarray],
              options: dict[str, Any]) -> dict[str, Any]:
    from condconv_ref.variants import VARIANTS

    return VARIANTS[variant].vjp(cotangent, **arrays, **options)


# ---------------------------------------------------------------- routing, propagated


class _Pooled(NamedTuple):
    value: np.ndarray  # (B, C): pooled input, or the input itself for linear routing
    scale: np.ndarray
    positions: int  # spatial positions averaged over (1: no pooling)
    x_shape: tuple[int, ...]


def _pool(x: np.ndarray, *, pooled: bool) -> _Pooled:
    if not pooled:
        return _Pooled(x, np.zeros_like(x), 1, x.shape)
    axes = tuple(range(2, x.ndim))
    return _Pooled(x.mean(axis=axes), np.abs(x).mean(axis=axes), math.prod(x.shape[2:]),
                   x.shape)


def _pool_vjp_scale(pool: _Pooled, grad: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """Scale of the gradient with respect to the input through the pooling."""
    if pool.positions == 1 and len(pool.x_shape) == 2:
        return scale
    spread = (scale + np.abs(grad)) / pool.positions
    return np.broadcast_to(spread.reshape(spread.shape + (1,) * (len(pool.x_shape) - 2)),
                           pool.x_shape).copy()


def _affine(pool_value: np.ndarray, pool_scale: np.ndarray, weight: np.ndarray,
            bias: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """``u @ weight.T + bias`` and its scale, for an inexact ``u``."""
    value = pool_value @ weight.T + (0.0 if bias is None else bias)
    scale = (pool_scale + np.abs(pool_value)) @ np.abs(weight).T + (
        0.0 if bias is None else np.abs(bias))
    return value, scale


def _affine_vjp(grad: np.ndarray, grad_scale: np.ndarray, inputs: np.ndarray,
                input_scale: np.ndarray, weight: np.ndarray) -> dict[str, np.ndarray]:
    """Scales of the gradients of ``inputs @ weight.T + bias`` at an inexact ``grad``."""
    magnitude = np.abs(grad)
    return {"inputs": (grad_scale + magnitude) @ np.abs(weight),
            "weight": (grad_scale + magnitude).T @ np.abs(inputs) + magnitude.T @ input_scale,
            "bias": (grad_scale + magnitude).sum(axis=0)}


def _sigmoid(z: np.ndarray) -> np.ndarray:
    e = np.exp(-np.abs(z))
    return np.where(z >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


class _Routing(NamedTuple):
    kind: str
    value: np.ndarray  # (B, E) routing weights
    scale: np.ndarray
    saved: dict[str, Any]


def _sigmoid_routing(x: np.ndarray, weight: np.ndarray, bias: np.ndarray | None, *,
                     pooled: bool, floor: float) -> _Routing:
    pool = _pool(x, pooled=pooled)
    z, z_scale = _affine(pool.value, pool.scale, weight, bias)
    alpha = _sigmoid(z)
    slope = alpha * (1.0 - alpha)
    return _Routing("sigmoid", alpha, slope * z_scale + alpha + floor,
                    {"pool": pool, "weight": weight, "slope": slope + floor})


def _sigmoid_vjp(alpha: np.ndarray, alpha_scale: np.ndarray, slope: np.ndarray,
                 cotangent: np.ndarray, cotangent_scale: np.ndarray
                 ) -> tuple[np.ndarray, np.ndarray]:
    """The gradient of a sigmoid's input, ``cotangent * slope``, and its scale."""
    slope_scale = np.abs(1.0 - 2.0 * alpha) * alpha_scale + slope
    grad = cotangent * slope
    return grad, np.abs(cotangent) * slope_scale + cotangent_scale * slope + np.abs(grad)


def _sigmoid_slope(routing: _Routing, v: np.ndarray, v_scale: np.ndarray
                   ) -> tuple[np.ndarray, np.ndarray]:
    """``v * sigmoid'(z)`` and its scale, for an inexact ``v``: the sigmoid's Jacobian (diagonal,
    so the same for its VJP and its JVP) applied to ``v`` (:func:`_sigmoid_vjp`)."""
    return _sigmoid_vjp(routing.value, routing.scale, routing.saved["slope"], v, v_scale)


def _sigmoid_routing_vjp(routing: _Routing, cotangent: np.ndarray,
                         cotangent_scale: np.ndarray) -> dict[str, np.ndarray]:
    saved = routing.saved
    grad_z, grad_z_scale = _sigmoid_vjp(routing.value, routing.scale, saved["slope"], cotangent,
                                        cotangent_scale)
    pool = saved["pool"]
    scales = _affine_vjp(grad_z, grad_z_scale, pool.value, pool.scale, saved["weight"])
    grad_pool = grad_z @ saved["weight"]
    return {"x": _pool_vjp_scale(pool, grad_pool, scales["inputs"]), "weight": scales["weight"],
            "bias": scales["bias"]}


def _softmax(logits: np.ndarray, logits_scale: np.ndarray, temperature: float,
             floor: float) -> tuple[np.ndarray, np.ndarray]:
    """The stable softmax of ``logits / temperature`` (shifted by the row maximum first, as
    the reference computes it) and its scale."""
    top = np.argmax(logits, axis=-1)[..., None]
    scaled = (logits - np.take_along_axis(logits, top, axis=-1)) / temperature
    scaled_scale = (logits_scale + np.take_along_axis(logits_scale, top, axis=-1)
                    ) / temperature + np.abs(scaled)
    q = np.exp(scaled)
    alpha = q / q.sum(axis=-1, keepdims=True)
    # first order: d alpha_e = alpha_e (d s_e - sum_j alpha_j d s_j), so an error common to
    # every logit cancels; exp's own rounding enters the same way, the sum and the division
    # once each relative to alpha
    spread = (alpha * scaled_scale).sum(axis=-1, keepdims=True)
    return alpha, (alpha * ((1.0 - alpha) * scaled_scale + (spread - alpha * scaled_scale))
                   + 2.0 * alpha * (1.0 - alpha) + alpha + floor)


def _softmax_routing(x: np.ndarray, fc1_weight: np.ndarray, fc2_weight: np.ndarray,
                     fc1_bias: np.ndarray | None, fc2_bias: np.ndarray | None,
                     temperature: float, *, floor: float) -> _Routing:
    pool = _pool(x, pooled=True)
    pre, pre_scale = _affine(pool.value, pool.scale, fc1_weight, fc1_bias)
    hidden = np.maximum(pre, 0.0)
    hidden_scale = pre_scale  # ReLU is 1-Lipschitz and exact
    logits, logits_scale = _affine(hidden, hidden_scale, fc2_weight, fc2_bias)
    alpha, alpha_scale = _softmax(logits, logits_scale, temperature, floor)
    return _Routing("softmax", alpha, alpha_scale,
                    {"pool": pool, "pre": pre, "pre_scale": pre_scale, "hidden": hidden,
                     "hidden_scale": hidden_scale, "fc1_weight": fc1_weight,
                     "fc2_weight": fc2_weight, "temperature": temperature})


def _softmax_vjp(alpha: np.ndarray, alpha_scale: np.ndarray, cotangent: np.ndarray,
                 cotangent_scale: np.ndarray, temperature: float
                 ) -> tuple[np.ndarray, np.ndarray]:
    """The gradient of the softmax's logits and its scale, the cotangent shifted by its value
    at the largest weight first (the reference VJP's own shift)."""
    top = np.argmax(alpha, axis=-1)[..., None]
    shifted = cotangent - np.take_along_axis(cotangent, top, axis=-1)
    shifted_scale = (cotangent_scale + np.take_along_axis(cotangent_scale, top, axis=-1)
                     + np.abs(shifted))
    magnitude = np.abs(shifted)
    inner = (shifted * alpha).sum(axis=-1, keepdims=True)
    inner_scale = (magnitude * alpha_scale + shifted_scale * alpha
                   + magnitude * alpha).sum(axis=-1, keepdims=True)
    difference = shifted - inner
    difference_scale = shifted_scale + inner_scale + magnitude + np.abs(inner)
    grad_logits = alpha * difference / temperature
    return grad_logits, (alpha_scale * np.abs(difference) + alpha * difference_scale
                         + alpha * np.abs(difference)) / temperature + np.abs(grad_logits)


def _softmax_jacobian(routing: _Routing, cotangent: np.ndarray, cotangent_scale: np.ndarray
                      ) -> tuple[np.ndarray, np.ndarray]:
    """The softmax's Jacobian (symmetric: the same for its VJP and its JVP) applied to an
    inexact ``cotangent``, and the scale of the result (:func:`_softmax_vjp`)."""
    return _softmax_vjp(routing.value, routing.scale, cotangent, cotangent_scale,
                        routing.saved["temperature"])


def _softmax_routing_vjp(routing: _Routing, cotangent: np.ndarray,
                         cotangent_scale: np.ndarray) -> dict[str, np.ndarray]:
    saved = routing.saved
    grad_logits, grad_logits_scale = _softmax_vjp(routing.value, routing.scale, cotangent,
                                                  cotangent_scale, saved["temperature"])
    second = _affine_vjp(grad_logits, grad_logits_scale, saved["hidden"], saved["hidden_scale"],
                         saved["fc2_weight"])
    active = saved["pre"] > 0
    grad_pre = (grad_logits @ saved["fc2_weight"]) * active
    grad_pre_scale = second["inputs"] * active
    pool = saved["pool"]
    first = _affine_vjp(grad_pre, grad_pre_scale, pool.value, pool.scale, saved["fc1_weight"])
    grad_pool = grad_pre @ saved["fc1_weight"]
    return {"x": _pool_vjp_scale(pool, grad_pool, first["inputs"]),
            "fc1_weight": first["weight"], "fc1_bias": first["bias"],
            "fc2_weight": second["weight"], "fc2_bias": second["bias"]}


_ROUTING_VJP = {"sigmoid": _sigmoid_routing_vjp, "softmax": _softmax_routing_vjp}


def _routing(variant: str, arrays: dict[str, np.ndarray], options: dict[str, Any],
             floor: float) -> _Routing:
    """The routing of a layer, or of a routing variant itself, with its scale."""
    kind = "sigmoid" if variant == "route_sigmoid" else (
        "softmax" if variant == "route_softmax" else _LAYERS[variant][1])
    x = arrays["x"]
    if kind == "sigmoid":
        weight = arrays.get("route_weight", arrays.get("weight"))
        bias = arrays.get("route_bias", arrays.get("bias") if variant == "route_sigmoid"
                          else None)
        return _sigmoid_routing(x, weight, bias, pooled=variant != "cond_linear_layer",
                                floor=floor)
    return _softmax_routing(x, arrays["fc1_weight"], arrays["fc2_weight"],
                            arrays.get("fc1_bias"), arrays.get("fc2_bias"),
                            options["temperature"], floor=floor)


def _floor(dtype: Any) -> float:
    r"""Twice the smallest normal number of ``dtype``: added to a routing weight's scale, it
    turns :math:`\gamma_n(u)` of the scale into at least the absolute error
    :math:`2\lambda u` of a weight that underflowed into the subnormals, and carries it on
    through everything the weight multiplies."""
    return 2.0 * precision(dtype).smallest_normal


def _layer_operands(variant: str, arrays: dict[str, np.ndarray], routing: np.ndarray
                    ) -> dict[str, np.ndarray]:
    """The layer's multilinear op's arguments, with ``routing`` as its routing weights."""
    operands = {"x": arrays["x"], "experts": arrays["experts"], "routing": routing}
    if "bias" in arrays:
        operands["bias"] = arrays["bias"]
    return operands


def _op_options(options: dict[str, Any]) -> dict[str, Any]:
    return {name: value for name, value in options.items() if name != "temperature"}


# ---------------------------------------------------------------- ODConv, propagated


class _ODConv(NamedTuple):
    """An ``odconv_layer`` case's trunk and attentions, values (float64) and scales."""

    p: dict[str, Any]  # every param name, None where absent
    pool: _Pooled
    trunk: Any  # condconv_ref.odconv.Trunk of the values
    centred_scale: np.ndarray
    inverse_std_scale: np.ndarray
    normalized_scale: np.ndarray
    hidden_scale: np.ndarray
    attentions: dict[str, np.ndarray]  # flat (B, N) values
    scales: dict[str, np.ndarray]
    slopes: dict[str, np.ndarray]  # the sigmoid heads' slopes


def _numpy() -> Any:
    import array_api_compat.numpy

    return array_api_compat.numpy


def _batch_norm_scales(pre: np.ndarray, pre_scale: np.ndarray, trunk: Any, p: dict[str, Any],
                       train: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    r"""Scales of the centred input :math:`a - \mu`, of :math:`r = (\sigma^2 + \epsilon)^{-1/2}`
    and of :math:`\hat a = (a - \mu) r`.  In train mode :math:`\mu` and :math:`\sigma^2` are
    the batch's, so every example's error reaches every other's through them:
    :math:`s_\mu = \overline{s_a} + \overline{|a|}`,
    :math:`s_{\sigma^2} = \overline{2|a - \mu|\,s_{a-\mu}} + \sigma^2` and
    :math:`s_r = 	frac12 r^3 s_{\sigma^2} + r`."""
    centred = pre - (pre.mean(axis=0) if train else p["bn_running_mean"])
    if train:
        centred_scale = (pre_scale + (pre_scale + np.abs(pre)).mean(axis=0, keepdims=True)
                         + np.abs(centred))
        variance = (centred * centred).mean(axis=0, keepdims=True)
        variance_scale = (2.0 * np.abs(centred) * centred_scale).mean(axis=0, keepdims=True)
        variance_scale = variance_scale + variance
    else:
        centred_scale = pre_scale + np.abs(centred)
        variance_scale = np.zeros_like(trunk.inverse_std)
    inverse_std = trunk.inverse_std
    inverse_std_scale = 0.5 * inverse_std**3 * variance_scale + inverse_std
    normalized_scale = (centred_scale * inverse_std + np.abs(centred) * inverse_std_scale
                        + np.abs(trunk.normalized))
    return centred_scale, inverse_std_scale, normalized_scale


def _odconv(arrays: dict[str, np.ndarray], options: dict[str, Any], floor: float) -> _ODConv:
    """The trunk and the heads of an ``odconv_layer`` case, each value with its scale."""
    from condconv_ref._attention import ODCONV_KEYS, trunk

    p = {name: arrays.get(name) for name in ODCONV_KEYS}
    train, temperature = options.get("batch_norm", "eval") == "train", options["temperature"]
    values = trunk(arrays["x"], p, train=train, eps=options.get("bn_eps", 1e-5), xp=_numpy())
    pool = _pool(arrays["x"], pooled=True)
    _, pre_scale = _affine(pool.value, pool.scale, p["fc_weight"], None)
    centred_scale, inverse_std_scale, normalized_scale = _batch_norm_scales(
        values.preactivation, pre_scale, values, p, train)
    weight = 1.0 if p["bn_weight"] is None else p["bn_weight"]
    shift = 0.0 if p["bn_bias"] is None else np.abs(p["bn_bias"])
    hidden_scale = (np.abs(weight) * (normalized_scale + np.abs(values.normalized)) + shift
                    + np.abs(values.activation_input))  # ReLU is 1-Lipschitz and exact
    attentions, scales, slopes = {}, {}, {}
    for head in ("channel", "filter", "spatial", "kernel"):
        if p[f"{head}_weight"] is None:
            continue
        logits, logits_scale = _affine(values.hidden, hidden_scale, p[f"{head}_weight"],
                                       p[f"{head}_bias"])
        if head == "kernel":
            attentions[head], scales[head] = _softmax(logits, logits_scale, temperature, floor)
            continue
        scaled = logits / temperature
        alpha = _sigmoid(scaled)
        slope = alpha * (1.0 - alpha)
        attentions[head] = alpha
        scales[head] = slope * (logits_scale / temperature + np.abs(scaled)) + alpha + floor
        slopes[head] = slope + floor
    return _ODConv(p, pool, values, centred_scale, inverse_std_scale, normalized_scale,
                   hidden_scale, attentions, scales, slopes)


def _odconv_conv(od: _ODConv, x: np.ndarray, experts: np.ndarray, attentions: dict[str, Any],
                 geometry: Any, cotangent: np.ndarray | None = None) -> Any:
    """:func:`condconv_ref.odconv.attended_conv` (or its VJP at ``cotangent``) in float64."""
    from condconv_ref._attention import attended_conv, attended_conv_vjp, shaped_attentions

    xp = _numpy()
    shaped = shaped_attentions(attentions, experts, xp=xp)
    if cotangent is None:
        return attended_conv(x, experts, shaped, geometry, xp=xp)
    grads = attended_conv_vjp(cotangent, x, experts, shaped, geometry, xp=xp)
    return {name: np.reshape(g, od.attentions[name].shape) if name in od.attentions else g
            for name, g in grads.items()}


def _odconv_forward_scale(case: Any, arrays: dict[str, np.ndarray], dtype: Any) -> np.ndarray:
    r"""The attended convolution on absolute values, each attention at :math:`|\alpha| + s`."""
    od = _odconv(arrays, case.options, _floor(dtype))
    inexact = {head: od.attentions[head] + od.scales[head] for head in od.attentions}
    return np.asarray(_odconv_conv(od, np.abs(arrays["x"]), np.abs(arrays["experts"]), inexact,
                                   case.geometry))


def _normalizing_jacobian_scale(od: _ODConv, vector: np.ndarray, vector_scale: np.ndarray,
                                train: bool) -> tuple[np.ndarray, np.ndarray]:
    """:func:`condconv_ref._attention.normalizing_jacobian` applied to an inexact ``vector``
    (B, A): the value and its scale.  The Jacobian is symmetric: the VJP and the JVP share it."""
    normalized, inverse_std = od.trunk.normalized, od.trunk.inverse_std
    if train:
        mean = vector.mean(axis=0, keepdims=True)
        mean_scale = (vector_scale + np.abs(vector)).mean(axis=0, keepdims=True)
        moment = (vector * normalized).mean(axis=0, keepdims=True)
        moment_scale = (vector_scale * np.abs(normalized) + np.abs(vector) * od.normalized_scale
                        + np.abs(vector * normalized)).mean(axis=0, keepdims=True)
        vector_scale = (vector_scale + mean_scale + od.normalized_scale * np.abs(moment)
                        + np.abs(normalized) * moment_scale + np.abs(vector) + np.abs(mean)
                        + np.abs(normalized * moment))
        vector = vector - mean - normalized * moment
    result = vector * inverse_std
    return result, (vector_scale * inverse_std + np.abs(vector) * od.inverse_std_scale
                    + np.abs(result))


def _batch_norm_vjp_scales(od: _ODConv, grad: np.ndarray, grad_scale: np.ndarray, train: bool
                           ) -> dict[str, np.ndarray]:
    """Scales of the batch norm's gradients for its input, ``bn_weight`` and ``bn_bias``, at
    an inexact ``grad`` of its output (the derivation is in
    :func:`condconv_ref.odconv.batch_norm_vjp`)."""
    p, normalized = od.p, od.trunk.normalized
    weight = np.ones_like(od.trunk.inverse_std) if p["bn_weight"] is None else p["bn_weight"]
    scales = {"bn_weight": (grad_scale * np.abs(normalized) + np.abs(grad) * od.normalized_scale
                            + np.abs(grad * normalized)).sum(axis=0),
              "bn_bias": (grad_scale + np.abs(grad)).sum(axis=0)}
    g = grad * weight
    scales["input value"], scales["input"] = _normalizing_jacobian_scale(
        od, g, grad_scale * np.abs(weight) + np.abs(g), train)
    return scales


def _head_jacobian(od: _ODConv, head: str, v: np.ndarray, v_scale: np.ndarray,
                   temperature: float) -> tuple[np.ndarray, np.ndarray]:
    r"""A head's Jacobian (symmetric: the same for its VJP and its JVP) applied to an inexact
    ``v``, from the attention to the logits: :math:`\sigma'(l/T)v/T` or the softmax's; the
    value and its scale."""
    alpha = od.attentions[head]
    if head == "kernel":
        return _softmax_vjp(alpha, od.scales[head], v, v_scale, temperature)
    value, scale = _sigmoid_vjp(alpha, od.scales[head], od.slopes[head], v, v_scale)
    return value / temperature, scale / temperature + np.abs(value / temperature)


def _odconv_vjp_scale(case: Any, arrays: dict[str, np.ndarray], c: np.ndarray,
                      dtype: Any) -> dict[str, np.ndarray]:
    """The attended convolution's VJP on absolute values for ``x``, the experts and the
    attentions, then each head, the ReLU, the batch norm, the fc layer and the pooling with
    the first-order rule, as for the routings."""
    od = _odconv(arrays, case.options, _floor(dtype))
    temperature, p, geometry = case.options["temperature"], od.p, case.geometry
    train = case.options.get("batch_norm", "eval") == "train"
    inexact = {head: od.attentions[head] + od.scales[head] for head in od.attentions}
    through = _odconv_conv(od, np.abs(arrays["x"]), np.abs(arrays["experts"]), inexact, geometry,
                           np.abs(c))
    values = _odconv_conv(od, arrays["x"], arrays["experts"], od.attentions, geometry, c)
    scales: dict[str, np.ndarray] = {"experts": np.asarray(through["experts"])}
    grad_hidden = np.zeros_like(od.trunk.hidden)
    grad_hidden_scale = np.zeros_like(od.trunk.hidden)
    for head in od.attentions:
        grad_logits, logits_scale = _head_jacobian(od, head, np.asarray(values[head]),
                                                   np.asarray(through[head]), temperature)
        head_scales = _affine_vjp(grad_logits, logits_scale, od.trunk.hidden, od.hidden_scale,
                                  p[f"{head}_weight"])
        scales[f"{head}_weight"] = head_scales["weight"]
        if p[f"{head}_bias"] is not None:
            scales[f"{head}_bias"] = head_scales["bias"]
        grad_hidden = grad_hidden + grad_logits @ p[f"{head}_weight"]
        grad_hidden_scale = grad_hidden_scale + head_scales["inputs"]
    active = od.trunk.activation_input > 0
    grad_hidden_scale = (grad_hidden_scale + np.abs(grad_hidden)) * active
    norm = _batch_norm_vjp_scales(od, grad_hidden * active, grad_hidden_scale, train)
    for name in ("bn_weight", "bn_bias"):
        if p[name] is not None:
            scales[name] = norm[name]
    fc = _affine_vjp(norm["input value"], norm["input"], od.pool.value, od.pool.scale,
                     p["fc_weight"])
    scales["fc_weight"] = fc["weight"]
    from condconv_ref._routing import global_average_pool_vjp

    grad_pool = norm["input value"] @ p["fc_weight"]
    grad_x = np.asarray(values["x"]) + global_average_pool_vjp(grad_pool, od.pool.x_shape,
                                                               xp=_numpy())
    scales["x"] = (np.asarray(through["x"]) + _pool_vjp_scale(od.pool, grad_pool, fc["inputs"])
                   + np.abs(grad_x))
    return scales


class _Moved(NamedTuple):
    """The tangents of an ``odconv_layer`` case's trunk and attentions, values and scales."""

    pooled: _Pooled
    pre: np.ndarray
    pre_scale: np.ndarray
    normalized: np.ndarray
    normalized_scale: np.ndarray
    hidden: np.ndarray
    hidden_scale: np.ndarray
    attentions: dict[str, tuple[np.ndarray, np.ndarray]]  # flat (B, N) values and scales


def _odconv_tangents(od: _ODConv, arrays: dict[str, np.ndarray], given: dict[str, np.ndarray],
                     options: dict[str, Any]) -> _Moved:
    """The trunk's and the heads' tangents along ``given`` with the first-order rule, as for
    the routings (the batch norm's Jacobian as its VJP applies it)."""
    temperature, p = options["temperature"], od.p
    train = options.get("batch_norm", "eval") == "train"

    def tangent(name: str) -> np.ndarray:
        return given.get(name, np.zeros(arrays[name].shape))

    moved = _pool(tangent("x"), pooled=True)
    pre, pre_scale = _affine_tangent(od.pool.value, od.pool.scale, moved.value, moved.scale,
                                     p["fc_weight"], tangent("fc_weight"),
                                     np.zeros(p["fc_weight"].shape[0]))
    normalized, normalized_scale = _normalizing_jacobian_scale(od, pre, pre_scale, train)
    weight = np.ones_like(normalized[0]) if p["bn_weight"] is None else p["bn_weight"]
    weight_tangent = np.abs(given.get("bn_weight", np.zeros_like(weight)))
    output = (weight * normalized + given.get("bn_weight", 0.0) * od.trunk.normalized
              + given.get("bn_bias", 0.0))
    output_scale = (np.abs(weight) * (normalized_scale + np.abs(normalized))
                    + weight_tangent * (od.normalized_scale + np.abs(od.trunk.normalized))
                    + np.abs(given.get("bn_bias", 0.0)) + np.abs(output))
    active = od.trunk.activation_input > 0  # ReLU is 1-Lipschitz and exact
    hidden, hidden_scale = output * active, output_scale * active
    attentions = {}
    for head in od.attentions:
        head_weight = p[f"{head}_weight"]
        logits, logits_scale = _affine_tangent(
            od.trunk.hidden, od.hidden_scale, hidden, hidden_scale, head_weight,
            tangent(f"{head}_weight"), given.get(f"{head}_bias", np.zeros(head_weight.shape[0])))
        attentions[head] = _head_jacobian(od, head, logits, logits_scale, temperature)
    return _Moved(moved, pre, pre_scale, normalized, normalized_scale, hidden, hidden_scale,
                  attentions)


def _odconv_jvp_scale(case: Any, arrays: dict[str, np.ndarray], given: dict[str, np.ndarray],
                      dtype: Any) -> np.ndarray:
    r"""The trunk's and the heads' tangents (:func:`_odconv_tangents`), then the attended
    convolution's JVP on absolute values, each attention at :math:`|\alpha| + s_\alpha` and
    each attention's tangent at :math:`|\dot\alpha| + s_{\dot\alpha}`."""
    od = _odconv(arrays, case.options, _floor(dtype))
    moved = _odconv_tangents(od, arrays, given, case.options)
    attentions = {head: od.attentions[head] + od.scales[head] for head in od.attentions}
    tangents = {name: np.abs(given.get(name, np.zeros(arrays[name].shape)))
                for name in ("x", "experts")}
    tangents.update({head: np.abs(value) + scale
                     for head, (value, scale) in moved.attentions.items()})
    from condconv_ref._attention import attended_conv_jvp, shaped_attentions

    xp = _numpy()
    experts = np.abs(arrays["experts"])
    return np.asarray(attended_conv_jvp(shaped_attentions(tangents, experts, xp=xp),
                                        np.abs(arrays["x"]), experts,
                                        shaped_attentions(attentions, experts, xp=xp),
                                        case.geometry, xp=xp))


def _product(a: np.ndarray, a_scale: np.ndarray, b: np.ndarray, b_scale: np.ndarray
             ) -> tuple[np.ndarray, np.ndarray]:
    """``a * b`` of two inexact values and its scale, :math:`s_a|b| + |a|s_b + |ab|`."""
    value = a * b
    return value, a_scale * np.abs(b) + np.abs(a) * b_scale + np.abs(value)


def _batch_mean(a: np.ndarray, a_scale: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The mean over the batch of an inexact ``a`` and its scale."""
    return a.mean(axis=0, keepdims=True), (a_scale + np.abs(a)).mean(axis=0, keepdims=True)


def _head_own_term(od: _ODConv, head: str, grad: np.ndarray, grad_scale: np.ndarray,
                   tangent: np.ndarray, tangent_scale: np.ndarray, temperature: float
                   ) -> tuple[np.ndarray, np.ndarray]:
    r"""A head's own second-order term at the attention's gradient :math:`\bar\alpha` along
    its tangent :math:`\dot\alpha` (over :math:`T`), the value and its scale: a sigmoid's
    :math:`\bar\alpha(1 - 2\alpha)\dot\alpha`, the softmax's
    :math:`\dot\alpha\odot(\bar\alpha - \langle\bar\alpha,\alpha\rangle)
    - \alpha\langle\bar\alpha,\dot\alpha\rangle`."""
    alpha, alpha_scale = od.attentions[head], od.scales[head]
    if head == "kernel":
        def inner(a: np.ndarray, a_scale: np.ndarray, b: np.ndarray, b_scale: np.ndarray
                  ) -> tuple[np.ndarray, np.ndarray]:
            value, scale = _product(a, a_scale, b, b_scale)
            return (value.sum(axis=-1, keepdims=True),
                    (scale + np.abs(value)).sum(axis=-1, keepdims=True))

        mean, mean_scale = inner(grad, grad_scale, alpha, alpha_scale)
        centred = grad - mean
        first = _product(tangent, tangent_scale, centred,
                         grad_scale + mean_scale + np.abs(centred))
        second = _product(alpha, alpha_scale, *inner(grad, grad_scale, tangent, tangent_scale))
        value, scale = first[0] - second[0], first[1] + second[1]
    else:
        opposite = 1.0 - 2.0 * alpha
        value, scale = _product(*_product(grad, grad_scale, opposite,
                                          2.0 * alpha_scale + np.abs(opposite)),
                                tangent, tangent_scale)
    value = value / temperature
    return value, scale / temperature + np.abs(value)


def _normalizing_jacobian_derivative_scale(od: _ODConv, moved: _Moved, vector: np.ndarray,
                                           vector_scale: np.ndarray
                                           ) -> tuple[np.ndarray, np.ndarray]:
    r"""Train mode's :func:`condconv_ref._attention.normalizing_jacobian_derivative` at an
    inexact ``vector``, :math:`-r(\overline{\hat a\dot a}\,Jv + \dot{\hat a}\,
    \overline{v\hat a} + \hat a\,\overline{v\dot{\hat a}})`, and its scale."""
    normalized, normalized_scale = od.trunk.normalized, od.normalized_scale
    terms = [
        _product(*_batch_mean(*_product(normalized, normalized_scale, moved.pre,
                                        moved.pre_scale)),
                 *_normalizing_jacobian_scale(od, vector, vector_scale, True)),
        _product(moved.normalized, moved.normalized_scale,
                 *_batch_mean(*_product(vector, vector_scale, normalized, normalized_scale))),
        _product(normalized, normalized_scale,
                 *_batch_mean(*_product(vector, vector_scale, moved.normalized,
                                        moved.normalized_scale))),
    ]
    total = sum(value for value, _ in terms)
    value, scale = _product(od.trunk.inverse_std, od.inverse_std_scale, total,
                            sum(scale for _, scale in terms) + np.abs(total))
    return -value, scale


def _odconv_hvp_scale(case: Any, arrays: dict[str, np.ndarray], c: np.ndarray,
                      given: dict[str, np.ndarray], dtype: Any) -> dict[str, np.ndarray]:
    """The HVP's gradients' scales by the first-order rule through each step of
    :func:`condconv_ref.odconv_layer_hvp`: the tangents (:func:`_odconv_tangents`); the
    attended convolution's VJP's derivative on absolute values (multilinear: it sums the
    magnitudes of its terms), each attention and its tangent inexact; each head's Jacobian at
    the gradient's tangent and its own term; the bilinear affine maps' two terms each; the
    batch norm's gradients and, in train mode, its Jacobian's derivative; the pooling."""
    from condconv_ref._attention import attended_conv_vjp_derivative, shaped_attentions

    xp = _numpy()
    od = _odconv(arrays, case.options, _floor(dtype))
    moved = _odconv_tangents(od, arrays, given, case.options)
    temperature, p, geometry = case.options["temperature"], od.p, case.geometry
    train = case.options.get("batch_norm", "eval") == "train"

    def tangent(name: str) -> np.ndarray:
        return given.get(name, np.zeros(arrays[name].shape))

    def derivative(cotangent: np.ndarray, tangents: dict[str, np.ndarray], x: np.ndarray,
                   experts: np.ndarray, attentions: dict[str, np.ndarray]) -> dict[str, Any]:
        grads = attended_conv_vjp_derivative(
            cotangent, {**tangents, **shaped_attentions(tangents, experts, xp=xp)}, x, experts,
            shaped_attentions(attentions, experts, xp=xp), geometry, xp=xp)
        return {name: np.reshape(g, od.attentions[name].shape) if name in od.attentions
                else np.asarray(g) for name, g in grads.items()}

    inexact = {head: od.attentions[head] + od.scales[head] for head in od.attentions}
    values = _odconv_conv(od, arrays["x"], arrays["experts"], od.attentions, geometry, c)
    through = _odconv_conv(od, np.abs(arrays["x"]), np.abs(arrays["experts"]), inexact, geometry,
                           np.abs(c))
    moved_values = derivative(c, {"x": tangent("x"), "experts": tangent("experts"),
                                  **{head: value for head, (value, _) in moved.attentions.items()}},
                              arrays["x"], arrays["experts"], od.attentions)
    moved_through = derivative(
        np.abs(c), {"x": np.abs(tangent("x")), "experts": np.abs(tangent("experts")),
                    **{head: np.abs(value) + scale
                       for head, (value, scale) in moved.attentions.items()}},
        np.abs(arrays["x"]), np.abs(arrays["experts"]), inexact)
    scales: dict[str, np.ndarray] = {"experts": moved_through["experts"]}
    hidden = (od.trunk.hidden, od.hidden_scale)
    grad_hidden = [np.zeros_like(od.trunk.hidden), np.zeros_like(od.trunk.hidden)]
    grad_hidden_tangent = [np.zeros_like(od.trunk.hidden), np.zeros_like(od.trunk.hidden)]
    for head, (alpha_tangent, alpha_tangent_scale) in moved.attentions.items():
        weight, weight_tangent = p[f"{head}_weight"], tangent(f"{head}_weight")
        grad_logits = _head_jacobian(od, head, np.asarray(values[head]),
                                     np.asarray(through[head]), temperature)
        first = _head_jacobian(od, head, moved_values[head], moved_through[head], temperature)
        own = _head_own_term(od, head, np.asarray(values[head]), np.asarray(through[head]),
                             alpha_tangent, alpha_tangent_scale, temperature)
        logits_tangent = first[0] + own[0]
        logits_tangent_scale = first[1] + own[1] + np.abs(logits_tangent)
        moving = _affine_vjp(logits_tangent, logits_tangent_scale, *hidden, weight)
        held = _affine_vjp(*grad_logits, moved.hidden, moved.hidden_scale, weight_tangent)
        weight_value = logits_tangent.T @ hidden[0] + grad_logits[0].T @ moved.hidden
        scales[f"{head}_weight"] = moving["weight"] + held["weight"] + np.abs(weight_value)
        if p[f"{head}_bias"] is not None:
            scales[f"{head}_bias"] = moving["bias"]
        grad_hidden[0] = grad_hidden[0] + grad_logits[0] @ weight
        grad_hidden[1] = grad_hidden[1] + _affine_vjp(*grad_logits, *hidden, weight)["inputs"]
        grad_hidden_tangent[0] = (grad_hidden_tangent[0] + logits_tangent @ weight
                                  + grad_logits[0] @ weight_tangent)
        grad_hidden_tangent[1] = grad_hidden_tangent[1] + moving["inputs"] + held["inputs"]
    active = od.trunk.activation_input > 0
    grad_output = grad_hidden[0] * active, (grad_hidden[1] + np.abs(grad_hidden[0])) * active
    grad_output_tangent = (grad_hidden_tangent[0] * active,
                           (grad_hidden_tangent[1] + np.abs(grad_hidden_tangent[0])) * active)
    normalized = (od.trunk.normalized, od.normalized_scale)
    normalized_tangent = (moved.normalized, moved.normalized_scale)
    if p["bn_weight"] is not None:
        first, second = (_product(*grad_output_tangent, *normalized),
                         _product(*grad_output, *normalized_tangent))
        scales["bn_weight"] = (first[1] + second[1] + np.abs(first[0] + second[0])).sum(axis=0)
    if p["bn_bias"] is not None:
        scales["bn_bias"] = (grad_output_tangent[1] + np.abs(grad_output_tangent[0])).sum(axis=0)
    weight = np.ones_like(od.trunk.inverse_std) if p["bn_weight"] is None else p["bn_weight"]
    scaled = _product(*grad_output, weight, 0.0)
    terms = [_product(*grad_output_tangent, weight, 0.0),
             _product(*grad_output, tangent("bn_weight") if p["bn_weight"] is not None
                      else np.zeros_like(weight), 0.0)]
    scaled_tangent = terms[0][0] + terms[1][0]
    grad_pre_tangent = list(_normalizing_jacobian_scale(
        od, scaled_tangent, terms[0][1] + terms[1][1] + np.abs(scaled_tangent), train))
    if train:
        coupling = _normalizing_jacobian_derivative_scale(od, moved, *scaled)
        grad_pre_tangent[0] = grad_pre_tangent[0] + coupling[0]
        grad_pre_tangent[1] = grad_pre_tangent[1] + coupling[1] + np.abs(grad_pre_tangent[0])
    grad_pre = _normalizing_jacobian_scale(od, *scaled, train)
    fc_weight, fc_tangent = p["fc_weight"], tangent("fc_weight")
    moving = _affine_vjp(*grad_pre_tangent, od.pool.value, od.pool.scale, fc_weight)
    held = _affine_vjp(*grad_pre, moved.pooled.value, moved.pooled.scale, fc_tangent)
    fc_value = grad_pre_tangent[0].T @ od.pool.value + grad_pre[0].T @ moved.pooled.value
    scales["fc_weight"] = moving["weight"] + held["weight"] + np.abs(fc_value)
    from condconv_ref._routing import global_average_pool_vjp

    grad_pool = grad_pre_tangent[0] @ fc_weight + grad_pre[0] @ fc_tangent
    grad_x = moved_values["x"] + global_average_pool_vjp(grad_pool, od.pool.x_shape, xp=xp)
    scales["x"] = (moved_through["x"]
                   + _pool_vjp_scale(od.pool, grad_pool, moving["inputs"] + held["inputs"])
                   + np.abs(grad_x))
    return scales


# ---------------------------------------------------------------- the scales


def forward_scale(case: Any, dtype: Any = "float64") -> np.ndarray:
    """The scale of every element of ``case``'s reference output computed in ``dtype``.

    Examples
    --------
    A cancelling sum: ``cond_linear`` of one feature and one expert,
    :math:`y = \\alpha (w x) + \\alpha b`, has the scale
    :math:`|\\alpha|(|w||x| + |b|)`:

    >>> import numpy as np
    >>> from condconv_ref._scales import forward_scale
    >>> from condconv_ref.variants import Case
    >>> arrays = {"x": np.array([[2.0]]), "experts": np.array([[[-0.25]]]),
    ...           "routing": np.array([[0.5]]), "bias": np.array([[0.47]])}
    >>> forward_scale(Case("cond_linear", arrays, {}, (2, 2)))
    array([[0.485]])
    """
    arrays = _host(case.arrays)
    if case.variant in MULTILINEAR:
        return np.asarray(_call(case.variant, _absolute(arrays), case.options))
    if case.variant == "odconv_layer":
        return _odconv_forward_scale(case, arrays, dtype)
    if case.variant not in _LAYERS and case.variant not in _ROUTING_VARIANTS:
        raise ValueError(f"forward_scale: no scale for variant {case.variant!r}")
    routing = _routing(case.variant, arrays, case.options, _floor(dtype))
    if case.variant in _ROUTING_VARIANTS:
        return routing.scale
    operands = _layer_operands(case.variant, _absolute(arrays), routing.value + routing.scale)
    return np.asarray(_call(_LAYERS[case.variant][0], operands, _op_options(case.options)))


def vjp_scale(case: Any, cotangent: Any, dtype: Any = "float64") -> dict[str, np.ndarray]:
    """The scale of every element of every gradient of ``case``'s reference VJP at
    ``cotangent`` (an exact input, like the arrays), computed in ``dtype``.

    Examples
    --------
    >>> import numpy as np
    >>> from condconv_ref._scales import vjp_scale
    >>> from condconv_ref.variants import Case
    >>> arrays = {"routing": np.array([[0.5, -0.25]]), "experts": np.array([[1.0], [-3.0]])}
    >>> scales = vjp_scale(Case("mix_experts", arrays, {}, (2, 2)), np.array([[-2.0]]))
    >>> scales["routing"].tolist(), scales["experts"].tolist()
    ([[2.0, 6.0]], [[1.0], [0.5]])
    """
    arrays = _host(case.arrays)
    c = np.asarray(to_numpy(cotangent), dtype=np.float64)
    exact = np.zeros_like(c)
    if case.variant in MULTILINEAR:
        return {name: np.asarray(g) for name, g in
                _call_vjp(case.variant, np.abs(c), _absolute(arrays), case.options).items()}
    if case.variant == "odconv_layer":
        return _odconv_vjp_scale(case, arrays, c, dtype)
    if case.variant in _ROUTING_VARIANTS:
        routing = _routing(case.variant, arrays, case.options, _floor(dtype))
        scales = _ROUTING_VJP[routing.kind](routing, c, exact)
        return {name: scales[name] for name in arrays}
    if case.variant not in _LAYERS:
        raise ValueError(f"vjp_scale: no scale for variant {case.variant!r}")
    op, _, names = _LAYERS[case.variant]
    options = _op_options(case.options)
    routing = _routing(case.variant, arrays, case.options, _floor(dtype))
    absolute = _absolute(arrays)
    through_op = _call_vjp(op, np.abs(c), _layer_operands(case.variant, absolute,
                                                          routing.value + routing.scale), options)
    values = _call_vjp(op, c, _layer_operands(case.variant, arrays, routing.value), options)
    routing_scale = np.asarray(_call_vjp(op, np.abs(c), _layer_operands(
        case.variant, absolute, routing.value), options)["routing"])
    through_routing = _ROUTING_VJP[routing.kind](routing, np.asarray(values["routing"]),
                                                 routing_scale)
    from condconv_ref.variants import reference_vjp

    grad_x = np.asarray(to_numpy(reference_vjp(case, c)["x"]))
    scales = {"x": np.asarray(through_op["x"]) + through_routing["x"] + np.abs(grad_x)}
    for name in ("experts", "bias"):
        if name in arrays:
            scales[name] = np.asarray(through_op[name])
    for own, name in names.items():
        if name in arrays:
            scales[name] = through_routing[own]
    return scales


# ---------------------------------------------------------------- forward mode


def jvp_depth(case: Any) -> int:
    """The longest chain of roundings of ``case``'s JVP: the forward's, plus
    :data:`TANGENT_ADDITIONS`."""
    return depth(case, vjp=False) + TANGENT_ADDITIONS


def _affine_tangent(inputs: np.ndarray, inputs_scale: np.ndarray, inputs_tangent: np.ndarray,
                    tangent_scale: np.ndarray, weight: np.ndarray, weight_tangent: np.ndarray,
                    bias_tangent: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The tangent of ``u @ W.T + b`` for an inexact ``u`` and its inexact tangent, exact
    ``W`` and tangents of ``W`` and ``b``, and its scale (:func:`_affine`'s rule per term)."""
    value = inputs_tangent @ weight.T + inputs @ weight_tangent.T + bias_tangent
    scale = ((tangent_scale + np.abs(inputs_tangent)) @ np.abs(weight).T
             + (inputs_scale + np.abs(inputs)) @ np.abs(weight_tangent).T + np.abs(bias_tangent))
    return value, scale


def _routing_tangent(variant: str, routing: _Routing, arrays: dict[str, np.ndarray],
                     tangents: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """The routing's tangent along ``tangents`` (absent ones zero) and its scale."""
    def tangent(name: str) -> np.ndarray:
        return tangents.get(name, np.zeros(arrays[name].shape))

    saved = routing.saved
    pool = saved["pool"]
    moved = _pool(tangent("x"), pooled=variant != "cond_linear_layer")
    if routing.kind == "sigmoid":
        own = "" if variant in _ROUTING_VARIANTS else "route_"
        weight = arrays[own + "weight"]
        logits = _affine_tangent(pool.value, pool.scale, moved.value, moved.scale, weight,
                                 tangent(own + "weight"),
                                 tangents.get(own + "bias", np.zeros(weight.shape[0])))
        return _sigmoid_slope(routing, *logits)
    fc1, fc2 = arrays["fc1_weight"], arrays["fc2_weight"]
    pre, pre_scale = _affine_tangent(pool.value, pool.scale, moved.value, moved.scale, fc1,
                                     tangent("fc1_weight"),
                                     tangents.get("fc1_bias", np.zeros(fc1.shape[0])))
    active = saved["pre"] > 0
    logits = _affine_tangent(saved["hidden"], saved["hidden_scale"], pre * active,
                             pre_scale * active, fc2, tangent("fc2_weight"),
                             tangents.get("fc2_bias", np.zeros(fc2.shape[0])))
    return _softmax_jacobian(routing, *logits)


def _call_jvp(variant: str, tangents: dict[str, np.ndarray], arrays: dict[str, np.ndarray],
              options: dict[str, Any]) -> Any:
    from condconv_ref.variants import VARIANTS

    return VARIANTS[variant].jvp(tangents, **arrays, **options)


def jvp_scale(case: Any, tangents: Any, dtype: Any = "float64") -> np.ndarray:
    """The scale of every element of ``case``'s reference JVP along ``tangents`` (a mapping
    keyed like the VJP's gradients, absent keys zero; exact inputs, like the arrays),
    computed in ``dtype``.

    Multilinear ops: the JVP on the absolute values of the tangents and the
    arguments, which sums the magnitudes of the product rule's terms.  The
    routings: each step's tangent carries the rule of the module docstring
    (:func:`_affine_tangent`; the sigmoid's and the softmax's Jacobians as
    their VJPs apply them, which they equal).  Layers: the op's JVP on
    absolute values, with :math:`|\\alpha| + s_\\alpha` as the routing and
    :math:`|\\dot\\alpha| + s_{\\dot\\alpha}` as its tangent; ODConv the same through its
    trunk (the batch norm's Jacobian as its VJP applies it) and its four heads.

    Examples
    --------
    :math:`y = \\alpha w x` of one feature and one expert along
    :math:`\\dot x = 1`, :math:`\\dot\\alpha = -1`:
    :math:`\\dot y = \\alpha w - w x`, of scale :math:`|\\alpha w| + |w x|`:

    >>> import numpy as np
    >>> from condconv_ref._scales import jvp_scale
    >>> from condconv_ref.variants import Case
    >>> arrays = {"x": np.array([[2.0]]), "experts": np.array([[[-0.25]]]),
    ...           "routing": np.array([[0.5]])}
    >>> tangents = {"x": np.array([[1.0]]), "routing": np.array([[-1.0]])}
    >>> jvp_scale(Case("cond_linear", arrays, {}, (2, 2)), tangents)
    array([[0.625]])
    """
    arrays = _host(case.arrays)
    given = _host(dict(tangents))
    if case.variant in MULTILINEAR:
        return np.asarray(_call_jvp(case.variant, _absolute(given), _absolute(arrays),
                                    case.options))
    if case.variant == "odconv_layer":
        return _odconv_jvp_scale(case, arrays, given, dtype)
    if case.variant not in _LAYERS and case.variant not in _ROUTING_VARIANTS:
        raise ValueError(f"jvp_scale: no scale for variant {case.variant!r}")
    routing = _routing(case.variant, arrays, case.options, _floor(dtype))
    routing_tangent, routing_tangent_scale = _routing_tangent(case.variant, routing, arrays,
                                                              given)
    if case.variant in _ROUTING_VARIANTS:
        return routing_tangent_scale
    absolute = _absolute(arrays)
    op_tangents = {name: np.abs(given[name]) for name in ("x", "experts", "bias")
                   if name in given}
    op_tangents["routing"] = np.abs(routing_tangent) + routing_tangent_scale
    return np.asarray(_call_jvp(_LAYERS[case.variant][0], op_tangents,
                                _layer_operands(case.variant, absolute,
                                                routing.value + routing.scale),
                                _op_options(case.options)))


# ---------------------------------------------------------------- second order


def hvp_depth(case: Any) -> int:
    """The longest chain of roundings of ``case``'s Hessian-vector product: the VJP's
    (:func:`depth`), plus :data:`TANGENT_ADDITIONS`."""
    return depth(case, vjp=True) + TANGENT_ADDITIONS


def hvp_scale(case: Any, cotangent: Any, tangents: Any,
              dtype: Any = "float64") -> dict[str, np.ndarray]:
    r"""The scale of every element of every array of ``case``'s reference Hessian-vector
    product at ``cotangent`` along ``tangents`` (keyed like the VJP's gradients, absent keys
    zero; exact inputs, like the arrays), computed in ``dtype``.

    The HVP of a layer is ``route_vjp`` of the op's VJP differentiated along
    :math:`(\dot x, \dot W, \dot\alpha, \dot\beta)`, plus the router's own
    second-order term (:func:`condconv_ref._layer.layer_hvp`).

    - The op's share, every term of the op's VJP with one factor replaced by
      its tangent: the op's VJP on absolute values at :math:`|c|`, with
      :math:`|x| + |\dot x|`, :math:`|W| + |\dot W|`, :math:`|\beta| +
      |\dot\beta|` and the routing :math:`|\alpha| + s_\alpha + |\dot\alpha| +
      s_{\dot\alpha}` (the routing's tangent and its scale, as
      :func:`jvp_scale` has them).  The op is multilinear with non-negative
      coefficients, so this sums the magnitudes of those terms (and of the
      VJP's own); it is the whole scale of the experts' and the bias's HVP.
    - Its routing gradient's derivative :math:`\dot{\bar\alpha}` chained
      through the router's VJP, with that scale (the router's rules of
      :func:`vjp_scale`).
    - The router's own second-order term (the derivative of its VJP at the
      fixed :math:`\bar\alpha`): the VJP's scale at the point widened by
      the tangents, :math:`|\theta| + |t|`, and at :math:`|c|`.  A model
      rather than a derivation: each term of it is a term of the VJP with
      one factor replaced by its tangent, but the sigmoid's and the
      softmax's derivatives are not monotone in their arguments.

    ODConv: the first-order rule through each step of its HVP, as for its VJP
    and JVP (the batch norm's statistics and the heads' slopes at the point
    itself).  Other variants get the widened VJP's scale alone.

    Examples
    --------
    :math:`\bar x = c\,\alpha w` of one feature and one expert, whose HVP
    along :math:`\dot\alpha = 1` is :math:`c w`; the scale is the VJP's at
    :math:`|\alpha| + |\dot\alpha|`:

    >>> import numpy as np
    >>> from condconv_ref._scales import hvp_scale
    >>> from condconv_ref.variants import Case
    >>> arrays = {"x": np.array([[2.0]]), "experts": np.array([[[-0.25]]]),
    ...           "routing": np.array([[0.5]])}
    >>> hvp_scale(Case("cond_linear", arrays, {}, (2, 2)), np.array([[-2.0]]),
    ...           {"routing": np.array([[1.0]])})["x"]
    array([[0.75]])
    """
    arrays, given = _host(case.arrays), _host(dict(tangents))
    c = np.asarray(to_numpy(cotangent), dtype=np.float64)
    if case.variant == "odconv_layer":
        return _odconv_hvp_scale(case, arrays, c, given, dtype)
    widened = {name: np.abs(a) + np.abs(given[name]) if name in given else np.abs(a)
               for name, a in arrays.items()}
    model = vjp_scale(replace(case, arrays=widened), np.abs(c), dtype)
    if case.variant not in _LAYERS:
        return model
    op, _, names = _LAYERS[case.variant]
    options = _op_options(case.options)
    routing = _routing(case.variant, arrays, case.options, _floor(dtype))
    routing_tangent, routing_tangent_scale = _routing_tangent(case.variant, routing, arrays,
                                                              given)
    through_op = _call_vjp(op, np.abs(c), _layer_operands(
        case.variant, widened, np.abs(routing.value) + routing.scale + np.abs(routing_tangent)
        + routing_tangent_scale), options)
    through_routing = _ROUTING_VJP[routing.kind](
        routing, _routing_gradient_derivative(case.variant, c, arrays, given, routing.value,
                                              options),
        np.asarray(through_op["routing"]))
    scales = {"x": np.asarray(through_op["x"]) + through_routing["x"] + model["x"]}
    for name in ("experts", "bias"):
        if name in arrays:
            scales[name] = np.asarray(through_op[name])
    for own, name in names.items():
        if name in arrays:
            scales[name] = through_routing[own] + model[name]
    return scales


def _routing_gradient_derivative(variant: str, c: np.ndarray, arrays: dict[str, np.ndarray],
                                 tangents: dict[str, np.ndarray], routing: np.ndarray,
                                 options: dict[str, Any]) -> np.ndarray:
    """The derivative of the layer's op's routing gradient along the tangents of ``x``, the
    experts and the bias: that gradient is bilinear in ``x`` and the experts, linear in the
    bias and independent of the routing, so it is the gradient at ``(x', W, beta')`` plus the
    one at ``(x, W', 0)`` (a prime: the tangent, zero where absent)."""
    op = _LAYERS[variant][0]

    def tangent(name: str) -> np.ndarray:
        return tangents.get(name, np.zeros(arrays[name].shape))

    bias = {"bias": tangent("bias")} if "bias" in arrays else {}
    along_x = _layer_operands(variant, {**arrays, "x": tangent("x"), **bias}, routing)
    no_bias = {name: np.zeros(a.shape) for name, a in bias.items()}
    along_experts = _layer_operands(variant, {**arrays, "experts": tangent("experts"),
                                              **no_bias}, routing)
    return (np.asarray(_call_vjp(op, c, along_x, options)["routing"])
            + np.asarray(_call_vjp(op, c, along_experts, options)["routing"]))
