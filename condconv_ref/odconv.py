r"""Omni-dimensional dynamic convolution (ODConv; Li, Zhou and Yao, ICLR 2022).

A squeeze-and-excitation trunk computes, from the input, four attentions that
scale the convolution along four dimensions: the input channels
(:math:`\alpha_c`, B×C), the output channels (:math:`\alpha_f`, B×O), the
kernel's spatial positions (:math:`\alpha_s`, B×k) and the experts
(:math:`\alpha_k`, B×E):

.. math::

    h = \mathrm{relu}\big(\mathrm{BN}(\mathrm{GAP}(x)\,W_\mathrm{fc}^\top)\big),\qquad
    y_b = \alpha_{f,b} \odot \Big(\big(\textstyle\sum_e \alpha_{k,be}\,
          \alpha_{s,b} \odot W_e\big) \ast (\alpha_{c,b} \odot x_b)\Big).

Shapes: ``x`` (B, C, \*spatial), ``experts`` (E, O, C/groups, \*k),
``fc_weight`` (A, C) for an attention width A.  The attentions are computed by
:func:`trunk` and :func:`heads`; :func:`attended_conv` is the convolution they
scale, a multilinear function of ``x``, the experts and the four attentions,
run by the convolution engine on per-example kernels.  Each forward sits beside
its VJP; the batch-norm VJP in training mode, which couples the examples
through the batch statistics, is derived in :func:`batch_norm_vjp`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from types import ModuleType
from typing import Any, NamedTuple

from condconv_ref._conv_engine import run_conv, run_conv_vjp
from condconv_ref._layer import layer_params
from condconv_ref._mixing import check_condconv, condconv_memory, mix, mix_vjp
from condconv_ref._routing import (
    affine,
    affine_vjp,
    global_average_pool,
    global_average_pool_vjp,
    stable_sigmoid,
    stable_softmax,
    stable_softmax_vjp,
)
from condconv_ref._validate import (
    ConvGeometry,
    ConvOptions,
    check_finite_positive,
    check_ndim,
    check_nonempty,
    check_shape,
    namespace,
    public_op,
)

__all__ = ["odconv_layer", "odconv_layer_vjp"]

HEADS = ("channel", "filter", "spatial", "kernel")
"""The four attention heads, in the order of the paper."""

BATCH_NORM_MODES = ("eval", "train")
BUFFERS = ("bn_running_mean", "bn_running_var")
"""The params that are batch-norm buffers: read in ``"eval"`` mode, never differentiated."""

_ODCONV_KEYS = {"experts": True, "fc_weight": True, "bn_weight": False, "bn_bias": False,
                "bn_running_mean": False, "bn_running_var": False,
                **{f"{head}_{part}": False for head in HEADS for part in ("weight", "bias")}}


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
    if train:
        grad_normalized = (grad_normalized - xp.mean(grad_normalized, axis=0, keepdims=True)
                           - forward.normalized * xp.mean(grad_normalized * forward.normalized,
                                                          axis=0, keepdims=True))
    return grad_normalized * forward.inverse_std, grad_weight, grad_bias


def trunk_vjp(grad_hidden: Any, x_shape: tuple[int, ...], p: dict[str, Any], forward: Trunk, *,
              train: bool, xp: ModuleType) -> dict[str, Any]:
    """Gradients of :func:`trunk` for ``x`` and its params (those given)."""
    grad_output = xp.where(forward.activation_input <= 0, 0.0, grad_hidden)
    grad_pre, grad_bn_weight, grad_bn_bias = batch_norm_vjp(grad_output, forward, p["bn_weight"],
                                                            train=train, xp=xp)
    grad_pooled, grad_fc = affine_vjp(grad_pre, forward.pooled, p["fc_weight"], xp=xp)
    grads = {"x": global_average_pool_vjp(grad_pooled, x_shape, xp=xp), "fc_weight": grad_fc}
    if p["bn_weight"] is not None:
        grads["bn_weight"] = grad_bn_weight
    if p["bn_bias"] is not None:
        grads["bn_bias"] = grad_bn_bias
    return grads


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


def heads_vjp(grads: Mapping[str, Any], hidden: Any, p: dict[str, Any],
              attentions: Mapping[str, Any], *, temperature: float,
              xp: ModuleType) -> tuple[Any, dict[str, Any]]:
    r"""The gradient for ``hidden`` and for each head's weight and bias, from the
    attentions' gradients.  A sigmoid head has
    :math:`\bar l = \bar\alpha\,\alpha(1 - \alpha)/T`; the kernel head the softmax VJP
    (:func:`condconv_ref._routing.stable_softmax_vjp`)."""
    grad_hidden, params = xp.zeros_like(hidden), {}
    for head, alpha in attentions.items():
        weight, bias = p[f"{head}_weight"], p[f"{head}_bias"]
        if head == "kernel":
            grad_logits = stable_softmax_vjp(grads[head], alpha, temperature, xp=xp)
        else:  # the slope from the logits: alpha (1 - alpha) loses it where alpha rounds to 1
            slope = stable_sigmoid(affine(hidden, weight, bias, xp=xp) / temperature, xp=xp)[1]
            grad_logits = grads[head] * slope / temperature
        into_hidden, params[f"{head}_weight"] = affine_vjp(grad_logits, hidden, weight, xp=xp)
        grad_hidden = grad_hidden + into_hidden
        if bias is not None:
            params[f"{head}_bias"] = xp.sum(grad_logits, axis=0)
    return grad_hidden, params


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
    spatial = attentions["spatial"]
    return xp.reshape(spatial, (spatial.shape[0], 1, 1) + tuple(spatial.shape[1:])) * mixture, mixture


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
        grad_mixture = grad_kernel * xp.reshape(spatial,
                                                (spatial.shape[0], 1, 1) + tuple(spatial.shape[1:]))
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


# ---------------------------------------------------------------- validation


def _check_heads(fn: str, p: dict[str, Any], width: int, sizes: dict[str, tuple[int, str]]
                 ) -> None:
    for head in HEADS:
        weight, bias = p[f"{head}_weight"], p[f"{head}_bias"]
        size, what = sizes[head]
        if weight is None:
            if bias is not None:
                raise ValueError(f"{fn}: params has {head}_bias but no {head}_weight; expected "
                                 f"both, or {head}_weight alone, or neither (the {head} head "
                                 "skipped)")
            continue
        check_ndim(fn, f"{head}_weight", weight, 2, f"({what}, A)")
        check_shape(fn, f"{head}_weight", weight, (size, width),
                    f"({what}, A) with {what}={size} and A={width} from fc_weight")
        if bias is not None:
            check_shape(fn, f"{head}_bias", bias, (size,), f"({what},)")


def _check_batch_norm(fn: str, x: Any, p: dict[str, Any], width: int, mode: Any, eps: Any, *,
                      xp: ModuleType) -> tuple[bool, float]:
    if not isinstance(mode, str) or mode not in BATCH_NORM_MODES:
        raise ValueError(f"{fn}: batch_norm must be one of {BATCH_NORM_MODES}, got {mode!r}")
    eps = check_finite_positive(fn, "bn_eps", eps)
    for name in ("bn_weight", "bn_bias", *BUFFERS):
        if p[name] is not None:
            check_shape(fn, name, p[name], (width,), f"(A,) with A={width} from fc_weight")
    if mode == "train" and x.shape[0] < 2:
        raise ValueError(f"{fn}: x has batch size {x.shape[0]}, expected B >= 2 with "
                         "batch_norm='train' (the variance of one example is 0); use "
                         "batch_norm='eval' with running statistics for a single example")
    if mode == "eval":
        missing = [name for name in BUFFERS if p[name] is None]
        if missing:
            raise ValueError(f"{fn}: params is missing {missing}, expected the running "
                             "statistics with batch_norm='eval' (or batch_norm='train')")
    if p["bn_running_var"] is not None and bool(xp.any(p["bn_running_var"] < 0)):
        raise ValueError(f"{fn}: bn_running_var has a negative entry, expected variances >= 0")
    return mode == "train", eps


def _odconv_memory(x: Any, experts: Any, geometry: ConvGeometry, itemsize: int, *,
                   vjp: bool) -> dict[str, int]:
    """The mixed form's needs (per-example kernels) plus the input scaled by channel."""
    parts = condconv_memory(x, experts, geometry, itemsize, vjp=vjp, moe=False)
    parts["input scaled by the channel attention"] = math.prod(x.shape)
    return parts


class _Call(NamedTuple):
    """One validated call: its params, geometry and options."""

    p: dict[str, Any]
    geometry: ConvGeometry
    temperature: float
    train: bool
    eps: float


def _check_odconv(fn: str, x: Any, params: Any, temperature: Any, batch_norm: Any, bn_eps: Any,
                  options: ConvOptions, cotangent: Any = None) -> tuple[_Call, ModuleType]:
    """Validate an :func:`odconv_layer` (``cotangent``: its VJP) call, resolving the namespace."""
    p = layer_params(fn, params, _ODCONV_KEYS)
    xp = namespace(fn, x=x, **p, cotangent=cotangent)
    check_ndim(fn, "x", x, (3, 4, 5), "(B, C, *spatial) with 1 to 3 spatial dims")
    check_ndim(fn, "fc_weight", p["fc_weight"], 2, "(A, C)")
    width = p["fc_weight"].shape[0]
    check_shape(fn, "fc_weight", p["fc_weight"], (width, x.shape[1]),
                f"(A, C) with C={x.shape[1]} from x")
    temperature = check_finite_positive(fn, "temperature", temperature)
    geometry = check_condconv(fn, x, p["experts"], None, None, options, cotangent, xp=xp,
                              memory=_odconv_memory)
    n_experts, out_channels = p["experts"].shape[:2]
    taps = math.prod(p["experts"].shape[3:])
    _check_heads(fn, p, width, {"channel": (x.shape[1], "C"), "filter": (out_channels, "O"),
                                "spatial": (taps, "prod(k)"), "kernel": (n_experts, "E")})
    train, eps = _check_batch_norm(fn, x, p, width, batch_norm, bn_eps, xp=xp)
    check_nonempty(fn, **p)
    return _Call(p, geometry, temperature, train, eps), xp


def _attentions(x: Any, call: _Call, *, xp: ModuleType) -> tuple[Trunk, dict[str, Any]]:
    forward = trunk(x, call.p, train=call.train, eps=call.eps, xp=xp)
    return forward, heads(forward.hidden, call.p, temperature=call.temperature, xp=xp)


def _shaped(attentions: Mapping[str, Any], experts: Any, *, xp: ModuleType) -> dict[str, Any]:
    """The spatial attention (B, prod(k)) as (B, \\*k), row-major; the others as they are."""
    shaped = dict(attentions)
    if "spatial" in shaped:
        spatial = shaped["spatial"]
        shaped["spatial"] = xp.reshape(spatial, (spatial.shape[0],) + tuple(experts.shape[3:]))
    return shaped


# ---------------------------------------------------------------- the public layer


@public_op
def odconv_layer(x: Any, params: Mapping[str, Any], *, temperature: float = 1.0,
                 batch_norm: str = "eval", bn_eps: float = 1e-5, stride: Any = 1,
                 padding: Any = 0, dilation: Any = 1, groups: int = 1,
                 padding_mode: str = "zeros") -> Any:
    r"""The ODConv layer: four attentions computed from ``x`` scale a CondConv.

    .. math::

        h &= \mathrm{relu}\big(\mathrm{BN}(\mathrm{GAP}(x)\,W_\mathrm{fc}^\top)\big),\qquad
        \alpha_\ast = \sigma\big((h W_\ast^\top + b_\ast)/T\big)\ (\ast = c, f, s),\qquad
        \alpha_k = \mathrm{softmax}\big((h W_k^\top + b_k)/T\big),\\
        y_b &= \alpha_{f,b} \odot \Big(\big(\textstyle\sum_e \alpha_{k,be}\,
               \alpha_{s,b} \odot W_e\big) \ast (\alpha_{c,b} \odot x_b)\Big).

    :math:`\mathrm{BN}(a) = \gamma (a - \mu)/\sqrt{\sigma^2 + \epsilon} + \beta` per
    feature, with the running statistics (``batch_norm="eval"``) or the batch's mean
    and biased variance (``batch_norm="train"``, which couples the examples).

    Parameters
    ----------
    x : array, shape (B, C, \*spatial)
        1 to 3 spatial dims; B >= 2 with ``batch_norm="train"``.
    params : mapping
        Named after the parameters of the authors' PyTorch module:

        * ``experts`` :math:`W` (E, O, C/groups, \*k);
        * ``fc_weight`` :math:`W_\mathrm{fc}` (A, C), any attention width A >= 1;
        * optional ``bn_weight`` :math:`\gamma` and ``bn_bias`` :math:`\beta` (A,)
          (absent: 1 and 0); ``bn_running_mean`` and ``bn_running_var`` (A,), the
          running statistics, required with ``batch_norm="eval"`` (variances >= 0);
        * per head, optional ``channel_weight`` (C, A), ``filter_weight`` (O, A),
          ``spatial_weight`` (prod(k), A) and ``kernel_weight`` (E, A), each with an
          optional bias (``channel_bias`` (C,), ...).  A head whose weight is absent is
          skipped: its attention is 1, and without the kernel head the E experts are
          summed.

        The module stores the fc and head weights as 1×1 convolutions (N, A, 1, 1);
        ``weight.reshape(N, A)`` gives the matrices here.
    temperature : float, keyword-only
        :math:`T`, finite and > 0, dividing the logits of every head.
    batch_norm : {"eval", "train"}, keyword-only
        Which statistics normalise the trunk.
    bn_eps : float, keyword-only
        :math:`\epsilon`, finite and > 0.
    stride, padding, dilation, groups, padding_mode
        As in :func:`conv`.

    Returns
    -------
    array, shape (B, O, \*out)

    Notes
    -----
    A pure function: in train mode it normalises with the batch's statistics and
    does not update the running statistics.  To compare a training step of a
    module, run the module in train mode on a batch and this layer with
    ``batch_norm="train"`` on the same batch and parameters; compare the updated
    running statistics, if at all, separately, as
    :math:`(1 - m)\,\mu_\text{old} + m\,\mu_\text{batch}` with PyTorch's unbiased
    batch variance.  The derivation of the VJP is in :func:`odconv_layer_vjp`.

    Examples
    --------
    With only the kernel head, the layer is :func:`condconv` routed by a softmax:

    >>> import numpy as np
    >>> from condconv_ref import condconv, odconv_layer
    >>> rng = np.random.default_rng(0)
    >>> x = rng.normal(size=(2, 3, 6, 6))
    >>> params = {"experts": rng.normal(size=(4, 5, 3, 3, 3)), "fc_weight": rng.normal(size=(2, 3)),
    ...           "bn_running_mean": np.zeros(2), "bn_running_var": np.ones(2),
    ...           "kernel_weight": rng.normal(size=(4, 2))}
    >>> y = odconv_layer(x, params, padding=1)
    >>> y.shape
    (2, 5, 6, 6)
    """
    fn = "odconv_layer"
    call, xp = _check_odconv(fn, x, params, temperature, batch_norm, bn_eps,
                             ConvOptions(stride, padding, dilation, groups, padding_mode))
    _, attentions = _attentions(x, call, xp=xp)
    return attended_conv(x, call.p["experts"], _shaped(attentions, call.p["experts"], xp=xp),
                         call.geometry, xp=xp)


@public_op
def odconv_layer_vjp(cotangent: Any, x: Any, params: Mapping[str, Any], *,
                     temperature: float = 1.0, batch_norm: str = "eval", bn_eps: float = 1e-5,
                     stride: Any = 1, padding: Any = 0, dilation: Any = 1, groups: int = 1,
                     padding_mode: str = "zeros") -> dict[str, Any]:
    r"""Vector-Jacobian product of :func:`odconv_layer`.

    Returns
    -------
    dict
        ``"x"`` and one entry per key of ``params`` except the running statistics
        ``bn_running_mean`` and ``bn_running_var``, which are buffers.

    Notes
    -----
    ``x`` reaches the output through the convolution and through the trunk. The
    convolution's VJP (:func:`attended_conv_vjp`) gives :math:`\bar x`,
    :math:`\bar W` and the attentions' gradients; each head turns its attention's
    gradient into its logits' (:math:`\bar\alpha\,\alpha(1-\alpha)/T` for a sigmoid
    head, the softmax VJP for the kernel head), and so into its weight's and bias's
    and into :math:`\bar h = \sum_\ast \bar l_\ast W_\ast`.  Then the ReLU
    (:math:`\bar z = \bar h` where :math:`z > 0`, else 0), the batch norm
    (:func:`batch_norm_vjp`: in train mode each example's gradient involves the
    whole batch), the fc layer and the pooling add the trunk's share of
    :math:`\bar x`.  :math:`T` and :math:`\epsilon` are hyper-parameters and are
    not differentiated.

    Examples
    --------
    >>> import numpy as np
    >>> from condconv_ref import odconv_layer_vjp
    >>> params = {"experts": np.ones((2, 1, 1, 3)), "fc_weight": np.ones((2, 1)),
    ...           "bn_bias": np.ones(2), "filter_weight": np.ones((1, 2))}
    >>> grads = odconv_layer_vjp(np.ones((2, 1, 2)), np.arange(8.0).reshape(2, 1, 4), params,
    ...                          batch_norm="train")
    >>> sorted(grads)
    ['bn_bias', 'experts', 'fc_weight', 'filter_weight', 'x']
    """
    fn = "odconv_layer_vjp"
    call, xp = _check_odconv(fn, x, params, temperature, batch_norm, bn_eps,
                             ConvOptions(stride, padding, dilation, groups, padding_mode),
                             cotangent)
    p = call.p
    forward, attentions = _attentions(x, call, xp=xp)
    shaped = _shaped(attentions, p["experts"], xp=xp)
    conv_grads = attended_conv_vjp(cotangent, x, p["experts"], shaped, call.geometry, xp=xp)
    flat = {head: xp.reshape(conv_grads[head], tuple(attentions[head].shape))
            for head in attentions}
    grad_hidden, head_grads = heads_vjp(flat, forward.hidden, p, attentions,
                                        temperature=call.temperature, xp=xp)
    trunk_grads = trunk_vjp(grad_hidden, tuple(x.shape), p, forward, train=call.train, xp=xp)
    return {**trunk_grads, **head_grads, "x": conv_grads["x"] + trunk_grads["x"],
            "experts": conv_grads["experts"]}
