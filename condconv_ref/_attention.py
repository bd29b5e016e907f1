r"""ODConv's attentions and the convolution they scale, on validated arrays.

:func:`trunk` (global average pooling, the fc layer, a batch norm with running
or batch statistics, ReLU) and :func:`heads` (a sigmoid per channel, filter and
spatial head, a softmax over the experts, each at temperature T) compute the
attentions of :func:`condconv_ref.odconv_layer`; :func:`attended_conv` is the
convolution they scale, multilinear in ``x``, the experts and each attention,
run by the convolution engine.  Each function sits beside its VJP and its JVP, and
the VJP's derivative (``*_vjp_derivative``, for the layer's Hessian-vector product).
:data:`ODCONV_KEYS` names the layer's params (name -> required).
"""

from __future__ import annotations

from collections.abc import Mapping
from types import ModuleType
from typing import Any, NamedTuple

from condconv_ref._conv_engine import run_conv, run_conv_vjp
from condconv_ref._mixing import mix, mix_jvp, mix_vjp
from condconv_ref._routing import (
    affine,
    affine_jvp,
    affine_vjp,
    affine_vjp_derivative,
    global_average_pool,
    global_average_pool_vjp,
    or_zeros,
    sigmoid_vjp_derivative,
    stable_sigmoid,
    stable_softmax,
    stable_softmax_vjp,
    stable_softmax_vjp_derivative,
)
from condconv_ref._tangent import added, conv_tangent, total
from condconv_ref._validate import ConvGeometry

__all__ = [
    "BATCH_NORM_MODES",
    "BUFFERS",
    "HEADS",
    "ODCONV_KEYS",
    "Trunk",
    "TrunkTangents",
    "attended_conv",
    "attended_conv_jvp",
    "attended_conv_vjp",
    "attended_conv_vjp_derivative",
    "batch_norm_jvp",
    "batch_norm_vjp",
    "heads",
    "heads_jvp",
    "heads_vjp",
    "heads_vjp_derivative",
    "normalizing_jacobian",
    "normalizing_jacobian_derivative",
    "shaped_attentions",
    "trunk",
    "trunk_jvp",
    "trunk_tangents",
    "trunk_vjp",
    "trunk_vjp_derivative",
]

HEADS = ("channel", "filter", "spatial", "kernel")
"""The four attention heads, in the order of the paper."""

BATCH_NORM_MODES = ("eval", "train")
"""The batch norm's statistics: the running ones (``"eval"``) or the batch's (``"train"``)."""
BUFFERS = ("bn_running_mean", "bn_running_var")
"""The params that are batch-norm buffers: read in ``"eval"`` mode, never differentiated."""

ODCONV_KEYS = {"experts": True, "fc_weight": True, "bn_weight": False, "bn_bias": False,
               "bn_running_mean": False, "bn_running_var": False,
                **{f"{head}_{part}": False for head in HEADS for part in ("weight", "bias")}}
"""The params of :func:`condconv_ref.odconv_layer`: name -> required."""


# ---------------------------------------------------------------- the trunk: GAP, fc, BN, ReLU


class Trunk(NamedTuple):
    """The trunk's intermediates, batch first: what :func:`trunk_vjp` needs."""

    pooled: Any  # (B, C)
    preactivation: Any  # (B, A), GAP(x) fc_weight^T
    normalized: Any  # (B, A), (preactivation - mean) / sqrt(var + eps)
    inverse_std: Any  # (A,) in eval mode, (1, A) in train mode
    activation_input: Any  # (B, A), the batch norm's output
    hidden: Any  # (B, A), relu of it


def trunk(x: Any, p: dict[str, Any], *, train: bool, eps: float, xp: ModuleType) -> Trunk:
    """Pool, fc, batch norm (running or batch statistics), ReLU."""
    pooled = global_average_pool(x, xp=xp)
    preactivation = affine(pooled, p["fc_weight"], None, xp=xp)
    if train:
        mean = xp.mean(preactivation, axis=0, keepdims=True)
        centred = preactivation - mean
        variance = xp.mean(centred * centred, axis=0, keepdims=True)
    else:
        centred, variance = preactivation - p["bn_running_mean"], p["bn_running_var"]
    inverse_std = 1.0 / xp.sqrt(variance + eps)
    normalized = centred * inverse_std
    output = normalized if p["bn_weight"] is None else normalized * p["bn_weight"]
    if p["bn_bias"] is not None:
        output = output + p["bn_bias"]
    # relu as "u <= 0 -> 0" (PyTorch's threshold): a NaN stays NaN instead of becoming 0
    hidden = xp.where(output <= 0, 0.0, output)
    return Trunk(pooled, preactivation, normalized, inverse_std, output, hidden)


def batch_norm_vjp(grad_output: Any, forward: Trunk, bn_weight: Any, *, train: bool,
                   xp: ModuleType) -> tuple[Any, Any, Any]:
    r"""Gradients of the batch norm for its input, ``bn_weight`` and ``bn_bias``.

    With :math:`\hat a = (a - \mu) r`, :math:`r = (\sigma^2 + \epsilon)^{-1/2}`
    and :math:`z = \gamma \hat a + \beta`, let :math:`g = \gamma \bar z`.  In
    eval mode :math:`\mu, \sigma^2` are constants and :math:`\bar a = r g`.  In
    train mode they are the batch's mean and biased variance, so every
    :math:`a_b` moves all of them: :math:`\partial\mu/\partial a_b = 1/B`,
    :math:`\partial\sigma^2/\partial a_b = 2(a_b - \mu)/B`, hence
    :math:`\partial r/\partial a_b = -r^3 (a_b - \mu)/B = -r^2 \hat a_b / B`, and

    .. math::

        \bar a_b = \sum_{b'} g_{b'} \frac{\partial \hat a_{b'}}{\partial a_b}
                 = r\Big(g_b - \frac1B\sum_{b'} g_{b'}
                   - \hat a_b \frac1B \sum_{b'} g_{b'} \hat a_{b'}\Big),

    per feature.  In both modes :math:`\bar\gamma = \sum_b \bar z_b \hat a_b`
    and :math:`\bar\beta = \sum_b \bar z_b`.
    """
    grad_weight = xp.sum(grad_output * forward.normalized, axis=0)
    grad_bias = xp.sum(grad_output, axis=0)
    grad_normalized = grad_output if bn_weight is None else grad_output * bn_weight
    return normalizing_jacobian(grad_normalized, forward, train=train, xp=xp), grad_weight, grad_bias


def normalizing_jacobian(vector: Any, forward: Trunk, *, train: bool, xp: ModuleType) -> Any:
    r"""The Jacobian of :math:`\hat a = (a - \mu) r` for :math:`a`, applied to ``vector``
    (B, A): :math:`r v` in eval mode, and in train mode
    :math:`r\big(v - \frac1B\sum_b v_b - \hat a\,\frac1B\sum_b v_b \hat a_b\big)` per
    feature (:func:`batch_norm_vjp` derives it).  The Jacobian is symmetric, so the VJP and
    the JVP both apply it."""
    if train:
        vector = (vector - xp.mean(vector, axis=0, keepdims=True)
                  - forward.normalized * xp.mean(vector * forward.normalized, axis=0,
                                                 keepdims=True))
    return vector * forward.inverse_std


def batch_norm_jvp(tangents: Mapping[str, Any], preactivation_tangent: Any, forward: Trunk,
                   bn_weight: Any, *, train: bool, xp: ModuleType) -> tuple[Any, Any]:
    r"""The tangents of the normalized input :math:`\hat a` and of the batch norm's output
    :math:`z = \gamma \hat a + \beta` along the input's tangent :math:`\dot a` (``None``:
    zero) and ``tangents["bn_weight"]``, ``tangents["bn_bias"]`` (absent: zero); ``None``
    for each that no tangent reaches.

    :math:`\dot z = \gamma \dot{\hat a} + \dot\gamma \hat a + \dot\beta`.  In eval mode
    :math:`\dot{\hat a} = r \dot a`.  In train mode :math:`\dot\mu = \overline{\dot a}`
    (the mean over the batch), :math:`\dot{\sigma^2} = 2\,\overline{(a - \mu)\dot a}`,
    so :math:`\dot r = -\tfrac12 r^3 \dot{\sigma^2} = -r^2\,\overline{\hat a \dot a}`
    and :math:`\dot{\hat a} = r(\dot a - \dot\mu) + (a - \mu)\dot r
    = r\big(\dot a - \overline{\dot a} - \hat a\,\overline{\hat a \dot a}\big)`:
    the same symmetric matrix the VJP applies (:func:`normalizing_jacobian`).
    """
    terms, normalized = [], None
    if preactivation_tangent is not None:
        normalized = normalizing_jacobian(preactivation_tangent, forward, train=train, xp=xp)
        terms.append(normalized if bn_weight is None else normalized * bn_weight)
    if tangents.get("bn_weight") is not None:
        terms.append(forward.normalized * tangents["bn_weight"])
    if tangents.get("bn_bias") is not None:
        terms.append(xp.broadcast_to(tangents["bn_bias"], tuple(forward.normalized.shape)))
    return normalized, added(terms)


def normalizing_jacobian_derivative(vector: Any, preactivation_tangent: Any,
                                    normalized_tangent: Any, forward: Trunk, *,
                                    xp: ModuleType) -> Any:
    r"""The derivative of train mode's :func:`normalizing_jacobian` applied to a fixed
    ``vector`` :math:`v`, along the input's tangent :math:`\dot a` (whose
    :math:`\dot{\hat a}` is ``normalized_tangent``); eval mode's Jacobian :math:`r` is
    constant and has none.

    :math:`Jv = rPv` with :math:`Pv = v - \bar v - \hat a\,\overline{v\hat a}` per
    feature.  With :math:`\dot r = -r^2\,\overline{\hat a\dot a}`
    (:func:`batch_norm_jvp`) and :math:`\dot P v = -\dot{\hat a}\,\overline{v\hat a}
    - \hat a\,\overline{v\dot{\hat a}}`,

    .. math::

        \dot J v = \dot r P v + r \dot P v = -r\big(\overline{\hat a\dot a}\,Jv
                  + \dot{\hat a}\,\overline{v\hat a}
                  + \hat a\,\overline{v\dot{\hat a}}\big),

    symmetric in the batch like :math:`J`: the batch's second-order coupling.
    """
    def mean(a: Any) -> Any:
        return xp.mean(a, axis=0, keepdims=True)

    normalized = forward.normalized
    return -forward.inverse_std * (
        mean(normalized * preactivation_tangent) * normalizing_jacobian(vector, forward,
                                                                        train=True, xp=xp)
        + normalized_tangent * mean(vector * normalized)
        + normalized * mean(vector * normalized_tangent))


class TrunkTangents(NamedTuple):
    """The tangents of the trunk's intermediates (``None``: zero), what the HVP needs."""

    pooled: Any  # (B, C)
    preactivation: Any  # (B, A)
    normalized: Any  # (B, A)
    hidden: Any  # (B, A)


def trunk_vjp(grad_hidden: Any, x_shape: tuple[int, ...], p: dict[str, Any], forward: Trunk, *,
              train: bool, xp: ModuleType) -> dict[str, Any]:
    """Gradients of :func:`trunk` for ``x`` and its params (those given)."""
    grad_output = xp.where(forward.activation_input <= 0, 0.0, grad_hidden)
    grad_pre, grad_bn_weight, grad_bn_bias = batch_norm_vjp(grad_output, forward, p["bn_weight"],
                                                            train=train, xp=xp)
    grad_pooled, grad_fc = affine_vjp(grad_pre, forward.pooled, p["fc_weight"], xp=xp)
    return _trunk_grads(grad_pooled, grad_fc, grad_bn_weight, grad_bn_bias, x_shape, p, xp=xp)


def _trunk_grads(grad_pooled: Any, grad_fc: Any, grad_bn_weight: Any, grad_bn_bias: Any,
                 x_shape: tuple[int, ...], p: dict[str, Any], *, xp: ModuleType
                 ) -> dict[str, Any]:
    """The trunk's gradients by name: ``x``'s through the pooling, the params given."""
    grads = {"x": global_average_pool_vjp(grad_pooled, x_shape, xp=xp), "fc_weight": grad_fc}
    if p["bn_weight"] is not None:
        grads["bn_weight"] = grad_bn_weight
    if p["bn_bias"] is not None:
        grads["bn_bias"] = grad_bn_bias
    return grads


def trunk_tangents(tangents: Mapping[str, Any], p: dict[str, Any], forward: Trunk, *,
                   train: bool, xp: ModuleType) -> TrunkTangents:
    r"""The tangents of :func:`trunk`'s intermediates along ``tangents`` (any of ``"x"``,
    ``"fc_weight"``, ``"bn_weight"``, ``"bn_bias"``).

    :math:`\dot{\bar x} = \mathrm{GAP}(\dot x)`, :math:`\dot a = \dot{\bar x} W_\mathrm{fc}^\top
    + \bar x \dot W_\mathrm{fc}^\top`, the batch norm's tangent (:func:`batch_norm_jvp`),
    then the ReLU's: :math:`\dot h = \dot z` where :math:`z > 0`, else 0.
    """
    x_tangent = tangents.get("x")
    pooled_tangent = None if x_tangent is None else global_average_pool(x_tangent, xp=xp)
    pre_tangent = affine_jvp(pooled_tangent, tangents.get("fc_weight"), None, forward.pooled,
                             p["fc_weight"], xp=xp)
    normalized_tangent, output_tangent = batch_norm_jvp(tangents, pre_tangent, forward,
                                                        p["bn_weight"], train=train, xp=xp)
    hidden_tangent = (None if output_tangent is None
                      else xp.where(forward.activation_input <= 0, 0.0, output_tangent))
    return TrunkTangents(pooled_tangent, pre_tangent, normalized_tangent, hidden_tangent)


def trunk_jvp(tangents: Mapping[str, Any], p: dict[str, Any], forward: Trunk, *, train: bool,
              xp: ModuleType) -> Any:
    """The tangent of :func:`trunk`'s ``hidden`` along ``tangents``
    (:func:`trunk_tangents`); ``None`` when none reaches it."""
    return trunk_tangents(tangents, p, forward, train=train, xp=xp).hidden


def trunk_vjp_derivative(grad_hidden: Any, grad_hidden_tangent: Any,
                         tangents: Mapping[str, Any], moved: TrunkTangents,
                         x_shape: tuple[int, ...], p: dict[str, Any], forward: Trunk, *,
                         train: bool, xp: ModuleType) -> dict[str, Any]:
    r"""The derivative of :func:`trunk_vjp` along ``grad_hidden_tangent`` (the tangent of
    its cotangent :math:`\bar h`), the params' ``tangents`` and the intermediates'
    tangents ``moved`` (:func:`trunk_tangents`).

    The ReLU's mask is constant off its kink: :math:`\dot{\bar z} = \dot{\bar h}` where
    :math:`z > 0`.  The batch norm's gradients :math:`\bar\gamma = \sum_b \bar z\hat a`,
    :math:`\bar\beta = \sum_b \bar z` and :math:`\bar a = J(\gamma\bar z)` move as
    :math:`\sum_b(\dot{\bar z}\hat a + \bar z\dot{\hat a})`, :math:`\sum_b\dot{\bar z}`
    and :math:`J(\dot\gamma\bar z + \gamma\dot{\bar z}) + \dot J(\gamma\bar z)`, the
    last term train mode's alone (:func:`normalizing_jacobian_derivative`); the fc layer's
    VJP is bilinear (:func:`~condconv_ref._routing.affine_vjp_derivative`) and the
    pooling's linear.
    """
    inactive = forward.activation_input <= 0
    grad_output = xp.where(inactive, 0.0, grad_hidden)
    grad_output_tangent = xp.where(inactive, 0.0, grad_hidden_tangent)
    normalized_tangent = or_zeros(moved.normalized, forward.normalized, xp=xp)
    grad_bn_weight = xp.sum(grad_output_tangent * forward.normalized
                            + grad_output * normalized_tangent, axis=0)
    weight, weight_tangent = p["bn_weight"], tangents.get("bn_weight")
    scaled = grad_output if weight is None else grad_output * weight
    scaled_tangent = grad_output_tangent if weight is None else grad_output_tangent * weight
    if weight_tangent is not None:
        scaled_tangent = scaled_tangent + grad_output * weight_tangent
    grad_pre_tangent = normalizing_jacobian(scaled_tangent, forward, train=train, xp=xp)
    if train and moved.preactivation is not None:
        grad_pre_tangent = grad_pre_tangent + normalizing_jacobian_derivative(
            scaled, moved.preactivation, normalized_tangent, forward, xp=xp)
    grad_pooled, grad_fc = affine_vjp_derivative(
        normalizing_jacobian(scaled, forward, train=train, xp=xp), grad_pre_tangent,
        forward.pooled, or_zeros(moved.pooled, forward.pooled, xp=xp), p["fc_weight"],
        or_zeros(tangents.get("fc_weight"), p["fc_weight"], xp=xp), xp=xp)
    return _trunk_grads(grad_pooled, grad_fc, grad_bn_weight,
                        xp.sum(grad_output_tangent, axis=0), x_shape, p, xp=xp)


# ---------------------------------------------------------------- the four heads


def heads(hidden: Any, p: dict[str, Any], *, temperature: float,
          xp: ModuleType) -> dict[str, Any]:
    """The attentions of the heads present: sigmoid (channel, filter, spatial) or softmax
    (kernel) of ``(hidden @ weight.T + bias) / T``, flat (B, N) as the heads compute them."""
    attentions = {}
    for head in HEADS:
        weight = p[f"{head}_weight"]
        if weight is None:
            continue
        logits = affine(hidden, weight, p[f"{head}_bias"], xp=xp)
        attentions[head] = (stable_softmax(logits, temperature, xp=xp) if head == "kernel"
                            else stable_sigmoid(logits / temperature, xp=xp)[0])
    return attentions


def _slope(hidden: Any, p: dict[str, Any], head: str, *, temperature: float,
           xp: ModuleType) -> tuple[Any, Any]:
    r"""A sigmoid head's attention and slope :math:`\sigma'(l/T)`, from its logits: as
    ``alpha * (1 - alpha)`` the slope would be lost where alpha rounds to 1."""
    logits = affine(hidden, p[f"{head}_weight"], p[f"{head}_bias"], xp=xp)
    return stable_sigmoid(logits / temperature, xp=xp)


def heads_vjp(grads: Mapping[str, Any], hidden: Any, p: dict[str, Any],
              attentions: Mapping[str, Any], *, temperature: float,
              xp: ModuleType) -> tuple[Any, dict[str, Any]]:
    r"""The gradient for ``hidden`` and for each head's weight and bias, from the
    attentions' gradients.  A sigmoid head has
    :math:`\bar l = \bar\alpha\,\alpha(1 - \alpha)/T`; the kernel head the softmax VJP
    (:func:`condconv_ref._routing.stable_softmax_vjp`).  Both are formed as
    :math:`T\bar l` and divided by :math:`T` after the products with the weights, as the
    softmax VJP asks (at a small :math:`T` the products of :math:`\bar l` could overflow)."""
    grad_hidden, params = xp.zeros_like(hidden), {}
    for head, alpha in attentions.items():
        if head == "kernel":
            scaled_logits = stable_softmax_vjp(grads[head], alpha, xp=xp)
        else:
            scaled_logits = grads[head] * _slope(hidden, p, head, temperature=temperature,
                                                 xp=xp)[1]
        into_hidden, weight_grad = affine_vjp(scaled_logits, hidden, p[f"{head}_weight"], xp=xp)
        grad_hidden = grad_hidden + into_hidden / temperature
        params.update(_head_grads(head, weight_grad, scaled_logits, p, temperature, xp=xp))
    return grad_hidden, params


def _head_grads(head: str, scaled_weight_grad: Any, scaled_logits: Any, p: dict[str, Any],
                temperature: float, *, xp: ModuleType) -> dict[str, Any]:
    """A head's weight's and bias's gradients from :math:`T` times them (the bias's a sum)."""
    grads = {f"{head}_weight": scaled_weight_grad / temperature}
    if p[f"{head}_bias"] is not None:
        grads[f"{head}_bias"] = xp.sum(scaled_logits, axis=0) / temperature
    return grads


def heads_vjp_derivative(grads: Mapping[str, Any], grad_tangents: Mapping[str, Any],
                         hidden: Any, hidden_tangent: Any, tangents: Mapping[str, Any],
                         p: dict[str, Any], attentions: Mapping[str, Any],
                         attention_tangents: Mapping[str, Any], *, temperature: float,
                         xp: ModuleType) -> tuple[Any, dict[str, Any]]:
    r"""The derivative of :func:`heads_vjp` along the attentions' gradients' tangents
    ``grad_tangents``, ``hidden_tangent`` (``None``: zero), the heads' ``tangents`` and the
    attentions' own tangents ``attention_tangents`` (:func:`heads_jvp`; a head absent is
    still).

    :math:`T\bar l` moves with the gradient it is formed from and with the attention: a
    sigmoid head's :math:`T\dot{\bar l} = \dot{\bar\alpha}\,\sigma'
    + \bar\alpha(1 - 2\alpha)\dot\alpha` (:func:`~condconv_ref._routing.sigmoid_vjp_derivative`),
    the kernel head's :math:`\alpha\odot(\dot{\bar\alpha} - \langle\dot{\bar\alpha},
    \alpha\rangle) + \dot\alpha\odot(\bar\alpha - \langle\bar\alpha,\alpha\rangle)
    - \alpha\langle\bar\alpha,\dot\alpha\rangle`
    (:func:`~condconv_ref._routing.stable_softmax_vjp_derivative`); each head's affine VJP
    is bilinear (:func:`~condconv_ref._routing.affine_vjp_derivative`).
    """
    grad_hidden, params = xp.zeros_like(hidden), {}
    hidden_tangent = or_zeros(hidden_tangent, hidden, xp=xp)
    for head, alpha in attentions.items():
        moved = attention_tangents.get(head)
        if head == "kernel":
            scaled_logits = stable_softmax_vjp(grads[head], alpha, xp=xp)
            scaled_tangent = stable_softmax_vjp(grad_tangents[head], alpha, xp=xp)
            if moved is not None:
                scaled_tangent = scaled_tangent + stable_softmax_vjp_derivative(
                    grads[head], alpha, moved, xp=xp)
        else:
            sigmoid, slope = _slope(hidden, p, head, temperature=temperature, xp=xp)
            scaled_logits, scaled_tangent = grads[head] * slope, grad_tangents[head] * slope
            if moved is not None:
                scaled_tangent = scaled_tangent + sigmoid_vjp_derivative(grads[head], sigmoid,
                                                                         moved)
        weight = p[f"{head}_weight"]
        into_hidden, weight_grad = affine_vjp_derivative(
            scaled_logits, scaled_tangent, hidden, hidden_tangent, weight,
            or_zeros(tangents.get(f"{head}_weight"), weight, xp=xp), xp=xp)
        grad_hidden = grad_hidden + into_hidden / temperature
        params.update(_head_grads(head, weight_grad, scaled_tangent, p, temperature, xp=xp))
    return grad_hidden, params


def heads_jvp(hidden_tangent: Any, tangents: Mapping[str, Any], hidden: Any,
              p: dict[str, Any], attentions: Mapping[str, Any], *, temperature: float,
              xp: ModuleType) -> dict[str, Any]:
    r"""The tangents of the attentions (flat (B, N)) along ``hidden_tangent`` (``None``: zero)
    and the heads' ``tangents`` (``"<head>_weight"``, ``"<head>_bias"``); a head no tangent
    reaches is left out.

    The logits' tangent :math:`\dot l = \dot h W^\top + h \dot W^\top + \dot b`; a sigmoid
    head has :math:`\dot\alpha = \sigma'(l/T)\,\dot l / T`, the kernel head the softmax's
    Jacobian :math:`(\mathrm{diag}\,\alpha - \alpha\alpha^\top)/T`, symmetric, so applied
    by :func:`~condconv_ref._routing.stable_softmax_vjp` (then divided by :math:`T`).
    """
    result = {}
    for head, alpha in attentions.items():
        weight, bias = p[f"{head}_weight"], p[f"{head}_bias"]
        logits_tangent = affine_jvp(hidden_tangent, tangents.get(f"{head}_weight"),
                                    tangents.get(f"{head}_bias"), hidden, weight, xp=xp)
        if logits_tangent is None:
            continue
        if head == "kernel":
            result[head] = stable_softmax_vjp(logits_tangent, alpha, xp=xp) / temperature
        else:
            slope = _slope(hidden, p, head, temperature=temperature, xp=xp)[1]
            result[head] = slope * logits_tangent / temperature
    return result


# ---------------------------------------------------------------- the attended convolution


def _along(attention: Any, axis_count: int, *, xp: ModuleType) -> Any:
    """(B, N) attention shaped (B, N, 1, ..., 1) to scale an axis of an array of
    ``axis_count`` dims."""
    return xp.reshape(attention, tuple(attention.shape) + (1,) * (axis_count - 2))


def _kernel(experts: Any, attentions: Mapping[str, Any], *, xp: ModuleType) -> tuple[Any, Any]:
    """The kernels (B, O, C/g, \\*k), or one (O, C/g, \\*k) shared by the batch, and the
    expert mixture before the spatial attention."""
    if "kernel" in attentions:
        mixture = mix(attentions["kernel"], experts, xp=xp)
    else:
        mixture = xp.sum(experts, axis=0)
    if "spatial" not in attentions:
        return mixture, mixture
    return _spread(attentions["spatial"], xp=xp) * mixture, mixture


def _spread(spatial: Any, *, xp: ModuleType) -> Any:
    """A spatial attention (B, \\*k) shaped (B, 1, 1, \\*k) to scale kernels (B, O, C/g, \\*k)."""
    return xp.reshape(spatial, (spatial.shape[0], 1, 1) + tuple(spatial.shape[1:]))


def attended_conv(x: Any, experts: Any, attentions: Mapping[str, Any], geometry: ConvGeometry,
                  *, xp: ModuleType) -> Any:
    """The convolution the attentions scale (module docstring), on validated arrays; a head
    absent from ``attentions`` is an attention of 1 (without the kernel head the experts
    are summed).  Multilinear in ``x``, ``experts`` and each attention."""
    kernel, _ = _kernel(experts, attentions, xp=xp)
    scaled = x if "channel" not in attentions else x * _along(attentions["channel"], x.ndim, xp=xp)
    y = run_conv(scaled, kernel, None, geometry, xp=xp)
    return y if "filter" not in attentions else y * _along(attentions["filter"], y.ndim, xp=xp)


def attended_conv_vjp(cotangent: Any, x: Any, experts: Any, attentions: Mapping[str, Any],
                      geometry: ConvGeometry, *, xp: ModuleType) -> dict[str, Any]:
    r"""Gradients of :func:`attended_conv` for ``x``, ``experts`` and each attention given.

    With :math:`K_b = \alpha_{s,b} \odot M_b`, :math:`M_b = \sum_e \alpha_{k,be} W_e`,
    :math:`\tilde x_b = \alpha_{c,b} \odot x_b` and :math:`u = K \ast \tilde x`, so
    :math:`y = \alpha_f \odot u`: :math:`\bar u = \alpha_f \odot \bar y` and
    :math:`\bar\alpha_{f,bo} = \sum_{\text{pos}} \bar y_{bo} u_{bo}`; the convolution's
    VJP gives :math:`\bar{\tilde x}` and :math:`\bar K`; then
    :math:`\bar x = \alpha_c \odot \bar{\tilde x}`,
    :math:`\bar\alpha_{c,bc} = \sum_{\text{pos}} \bar{\tilde x}_{bc} x_{bc}`,
    :math:`\bar\alpha_{s,b} = \sum_{o,i} \bar K_b \odot M_b`,
    :math:`\bar M = \alpha_s \odot \bar K`, and the mixing's VJP
    (:func:`condconv_ref.mix_experts_vjp`) gives :math:`\bar W` and
    :math:`\bar\alpha_k` (without the kernel head, :math:`\bar W_e = \sum_b \bar M_b`).
    """
    kernel, mixture = _kernel(experts, attentions, xp=xp)
    channel = attentions.get("channel")
    scaled = x if channel is None else x * _along(channel, x.ndim, xp=xp)
    grads: dict[str, Any] = {}
    grad_conv = cotangent
    if "filter" in attentions:
        output = run_conv(scaled, kernel, None, geometry, xp=xp)
        grads["filter"] = xp.sum(cotangent * output, axis=tuple(range(2, output.ndim)))
        grad_conv = cotangent * _along(attentions["filter"], cotangent.ndim, xp=xp)
    conv_grads = run_conv_vjp(grad_conv, scaled, kernel, None, geometry, xp=xp)
    grad_scaled, grad_kernel = conv_grads["x"], conv_grads["kernel"]
    if channel is None:
        grads["x"] = grad_scaled
    else:
        grads["x"] = grad_scaled * _along(channel, x.ndim, xp=xp)
        grads["channel"] = xp.sum(grad_scaled * x, axis=tuple(range(2, x.ndim)))
    grad_mixture = grad_kernel
    if "spatial" in attentions:
        spatial = attentions["spatial"]
        grads["spatial"] = xp.sum(grad_kernel * mixture, axis=(1, 2))
        grad_mixture = grad_kernel * _spread(spatial, xp=xp)
        if mixture.ndim != grad_mixture.ndim:
            grad_mixture = xp.sum(grad_mixture, axis=0)
    if "kernel" in attentions:
        mixed = mix_vjp(grad_mixture, attentions["kernel"], experts, xp=xp)
        grads["experts"], grads["kernel"] = mixed["experts"], mixed["routing"]
    else:
        shared = grad_mixture if grad_mixture.ndim == experts.ndim - 1 else xp.sum(grad_mixture,
                                                                                 axis=0)
        grads["experts"] = xp.asarray(xp.broadcast_to(shared[None, ...], tuple(experts.shape)),
                                      copy=True)
    return grads


def attended_conv_jvp(tangents: Mapping[str, Any], x: Any, experts: Any,
                      attentions: Mapping[str, Any], geometry: ConvGeometry, *,
                      xp: ModuleType) -> Any:
    r"""The tangent of :func:`attended_conv` along ``tangents`` (any of ``"x"``, ``"experts"``
    and the heads in ``attentions``, shaped like them).

    The product rule through each multilinear step:
    :math:`\dot M = \sum_e (\dot\alpha_{k,e} W_e + \alpha_{k,e} \dot W_e)`,
    :math:`\dot K = \dot\alpha_s \odot M + \alpha_s \odot \dot M`,
    :math:`\dot{\tilde x} = \dot\alpha_c \odot x + \alpha_c \odot \dot x`,
    :math:`\dot u = \dot K \ast \tilde x + K \ast \dot{\tilde x}`
    (:func:`~condconv_ref._tangent.conv_tangent`) and
    :math:`\dot y = \dot\alpha_f \odot u + \alpha_f \odot \dot u`.
    """
    kernel, mixture = _kernel(experts, attentions, xp=xp)
    if "kernel" in attentions:
        mixture_tangent = mix_jvp(tangents.get("kernel"), tangents.get("experts"),
                                  attentions["kernel"], experts, xp=xp)
    else:
        mixture_tangent = (None if "experts" not in tangents
                           else xp.sum(tangents["experts"], axis=0))
    kernel_tangent = mixture_tangent
    if "spatial" in attentions:
        terms = ([] if mixture_tangent is None
                 else [_spread(attentions["spatial"], xp=xp) * mixture_tangent])
        if "spatial" in tangents:
            terms.append(_spread(tangents["spatial"], xp=xp) * mixture)
        kernel_tangent = added(terms)
    channel = attentions.get("channel")
    scaled = x if channel is None else x * _along(channel, x.ndim, xp=xp)
    terms = []
    if "x" in tangents:
        terms.append(tangents["x"] if channel is None
                     else tangents["x"] * _along(channel, x.ndim, xp=xp))
    if "channel" in tangents:
        terms.append(x * _along(tangents["channel"], x.ndim, xp=xp))
    conv_tangents = {"kernel": kernel_tangent, "x": added(terms)}
    output_tangent = conv_tangent({name: t for name, t in conv_tangents.items() if t is not None},
                                  scaled, kernel, geometry, xp=xp)
    if "filter" not in attentions:
        return output_tangent
    result = output_tangent * _along(attentions["filter"], output_tangent.ndim, xp=xp)
    if "filter" in tangents:
        output = run_conv(scaled, kernel, None, geometry, xp=xp)
        result = result + output * _along(tangents["filter"], output.ndim, xp=xp)
    return result


def attended_conv_vjp_derivative(cotangent: Any, tangents: Mapping[str, Any], x: Any,
                                 experts: Any, attentions: Mapping[str, Any],
                                 geometry: ConvGeometry, *, xp: ModuleType) -> dict[str, Any]:
    r"""The derivative of :func:`attended_conv_vjp` at the fixed ``cotangent`` along
    ``tangents`` (any of ``"x"``, ``"experts"`` and the heads in ``attentions``, shaped like
    them); keyed like its gradients, every entry present.

    :func:`attended_conv` is one product, linear in each of :math:`x`, :math:`W` and the
    attentions, so the gradient for one argument is multilinear in the others and does not
    depend on itself: its derivative is the sum, over the other arguments :math:`a_j`, of
    the VJP with :math:`a_j` replaced by its tangent :math:`\dot a_j`, one VJP call per
    tangent (the rule of :mod:`condconv_ref._tangent`).
    """
    arguments = {"x": x, "experts": experts, **attentions}
    terms: dict[str, list[Any]] = {name: [] for name in arguments}
    for name, tangent in tangents.items():
        replaced = {**arguments, name: tangent}
        grads = attended_conv_vjp(cotangent, replaced["x"], replaced["experts"],
                                  {head: replaced[head] for head in attentions}, geometry, xp=xp)
        for other in arguments:
            if other != name:
                terms[other].append(grads[other])
    return {name: total(terms[name], tuple(a.shape), x, xp=xp) for name, a in arguments.items()}


def shaped_attentions(attentions: Mapping[str, Any], experts: Any, *,
                      xp: ModuleType) -> dict[str, Any]:
    """The spatial attention (B, prod(k)) as (B, \\*k), row-major; the others as they are."""
    shaped = dict(attentions)
    if "spatial" in shaped:
        spatial = shaped["spatial"]
        shaped["spatial"] = xp.reshape(spatial, (spatial.shape[0],) + tuple(experts.shape[3:]))
    return shaped
