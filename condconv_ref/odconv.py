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
``fc_weight`` (A, C) for an attention width A.  This module validates a call
once and composes the pieces of :mod:`condconv_ref._attention`: the trunk and
the heads compute the attentions, the attended convolution (per-example
kernels on the convolution engine) applies them, and the VJP runs the same
chain backwards, through the batch norm's statistics in train mode.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from types import ModuleType
from typing import Any, NamedTuple

from condconv_ref._attention import (
    BATCH_NORM_MODES,
    BUFFERS,
    HEADS,
    ODCONV_KEYS,
    Trunk,
    attended_conv,
    attended_conv_jvp,
    attended_conv_vjp,
    attended_conv_vjp_derivative,
    heads,
    heads_jvp,
    heads_vjp,
    heads_vjp_derivative,
    shaped_attentions,
    trunk,
    trunk_jvp,
    trunk_tangents,
    trunk_vjp,
    trunk_vjp_derivative,
)
from condconv_ref._layer import layer_params
from condconv_ref._mixing import check_condconv, condconv_memory
from condconv_ref._validate import (
    ConvGeometry,
    ConvOptions,
    check_finite_positive,
    check_ndim,
    check_nonempty,
    check_shape,
    check_tangent_shapes,
    namespace,
    public_op,
    tangent_arrays,
    tangent_names,
)

__all__ = ["odconv_layer", "odconv_layer_hvp", "odconv_layer_jvp", "odconv_layer_vjp"]

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
                  options: ConvOptions, cotangent: Any = None, tangents: Any = None
                  ) -> tuple[_Call, ModuleType, dict[str, Any]]:
    """Validate an :func:`odconv_layer` call (``cotangent``: its VJP's; ``tangents``: its
    JVP's), resolving the namespace; return the call, ``xp`` and the tangents by name."""
    p = layer_params(fn, params, ODCONV_KEYS)
    given: dict[str, Any] = {}
    if tangents is not None:
        buffers = sorted(name for name in BUFFERS if isinstance(tangents, Mapping)
                         and tangents.get(name) is not None)
        if buffers:
            raise ValueError(f"{fn}: tangents has {buffers}, the batch norm's running "
                             "statistics, which are buffers and take no tangent; expected "
                             "tangents for x and the other params only")
        given = tangent_arrays(fn, tangents, {"x": x, **{name: a for name, a in p.items()
                                                          if name not in BUFFERS}})
    xp = namespace(fn, x=x, **p, cotangent=cotangent, **tangent_names(given))
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
    check_tangent_shapes(fn, given, {"x": x, **p})
    return _Call(p, geometry, temperature, train, eps), xp, given


def _attentions(x: Any, call: _Call, *, xp: ModuleType) -> tuple[Trunk, dict[str, Any]]:
    forward = trunk(x, call.p, train=call.train, eps=call.eps, xp=xp)
    return forward, heads(forward.hidden, call.p, temperature=call.temperature, xp=xp)


def _flat(grads: dict[str, Any], attentions: dict[str, Any], *, xp: ModuleType) -> dict[str, Any]:
    """The attended convolution's gradients for the attentions, flat (B, N) like them."""
    return {head: xp.reshape(grads[head], tuple(attentions[head].shape)) for head in attentions}


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
    call, xp, _ = _check_odconv(fn, x, params, temperature, batch_norm, bn_eps,
                                ConvOptions(stride, padding, dilation, groups, padding_mode))
    _, attentions = _attentions(x, call, xp=xp)
    experts = call.p["experts"]
    return attended_conv(x, experts, shaped_attentions(attentions, experts, xp=xp),
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
    not differentiated.  The JVP, :func:`odconv_layer_jvp`, runs the same chain
    forwards.

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
    call, xp, _ = _check_odconv(fn, x, params, temperature, batch_norm, bn_eps,
                                ConvOptions(stride, padding, dilation, groups, padding_mode),
                                cotangent)
    p = call.p
    forward, attentions = _attentions(x, call, xp=xp)
    shaped = shaped_attentions(attentions, p["experts"], xp=xp)
    conv_grads = attended_conv_vjp(cotangent, x, p["experts"], shaped, call.geometry, xp=xp)
    grad_hidden, head_grads = heads_vjp(_flat(conv_grads, attentions, xp=xp), forward.hidden, p,
                                        attentions, temperature=call.temperature, xp=xp)
    trunk_grads = trunk_vjp(grad_hidden, tuple(x.shape), p, forward, train=call.train, xp=xp)
    return {**trunk_grads, **head_grads, "x": conv_grads["x"] + trunk_grads["x"],
            "experts": conv_grads["experts"]}


@public_op
def odconv_layer_jvp(tangents: Mapping[str, Any], x: Any, params: Mapping[str, Any], *,
                     temperature: float = 1.0, batch_norm: str = "eval", bn_eps: float = 1e-5,
                     stride: Any = 1, padding: Any = 0, dilation: Any = 1, groups: int = 1,
                     padding_mode: str = "zeros") -> Any:
    r"""Jacobian-vector product of :func:`odconv_layer`.

    Parameters
    ----------
    tangents : mapping
        Any of ``"x"`` and the keys present in ``params`` except the running
        statistics (the keys of :func:`odconv_layer_vjp`), each with the shape
        of its argument; a missing key is a zero tangent.  ``bn_running_mean``
        and ``bn_running_var`` are buffers: a tangent for them is an error.
    x, params, temperature, batch_norm, bn_eps, stride, padding, dilation, groups, padding_mode
        Exactly the arguments given to :func:`odconv_layer`.

    Returns
    -------
    array, shape (B, O, \*out)

    Notes
    -----
    The chain of :func:`odconv_layer_vjp`, run forwards.  The trunk:
    :math:`\dot a = \mathrm{GAP}(\dot x) W_\mathrm{fc}^\top + \mathrm{GAP}(x)
    \dot W_\mathrm{fc}^\top`; the batch norm
    :math:`\dot z = \gamma \dot{\hat a} + \dot\gamma \hat a + \dot\beta` with
    :math:`\dot{\hat a} = r \dot a` in eval mode and, in train mode, where the batch's
    :math:`\mu` and :math:`r = (\sigma^2 + \epsilon)^{-1/2}` move with every example,
    :math:`\dot{\hat a} = r\big(\dot a - \overline{\dot a}
    - \hat a\,\overline{\hat a \dot a}\big)` (bars: means over the batch); the ReLU
    :math:`\dot h = \dot z` where :math:`z > 0`, else 0.  Each head's logits
    :math:`\dot l_\ast = \dot h W_\ast^\top + h \dot W_\ast^\top + \dot b_\ast`, and
    its attention's tangent :math:`\dot\alpha_\ast = \sigma'(l_\ast/T)\,\dot l_\ast/T`
    (sigmoid heads) or :math:`\alpha_k \odot (\dot l_k - \langle \dot l_k,
    \alpha_k\rangle)/T` (the kernel head).  Then the product rule through the
    attended convolution, multilinear in :math:`x`, :math:`W` and the four attentions:

    .. math::

        \dot y_b = \dot\alpha_{f,b} \odot u_b + \alpha_{f,b} \odot
                   \big(\dot K_b \ast \tilde x_b + K_b \ast \dot{\tilde x}_b\big),

    with :math:`\dot K_b = \dot\alpha_{s,b} \odot M_b + \alpha_{s,b} \odot
    \sum_e(\dot\alpha_{k,be} W_e + \alpha_{k,be} \dot W_e)` and
    :math:`\dot{\tilde x}_b = \dot\alpha_{c,b} \odot x_b + \alpha_{c,b} \odot
    \dot x_b`.  ``x`` reaches the tangent through the convolution and through
    the trunk.  Every step is the transpose of the VJP's: the batch norm's
    Jacobian is symmetric, and so is the softmax's.

    Examples
    --------
    Moving ``bn_bias`` moves every attention's logits, so the output:

    >>> import numpy as np
    >>> from condconv_ref import odconv_layer_jvp
    >>> params = {"experts": np.ones((2, 1, 1, 3)), "fc_weight": np.ones((2, 1)),
    ...           "bn_bias": np.ones(2), "filter_weight": np.ones((1, 2))}
    >>> x = np.arange(8.0).reshape(2, 1, 4)
    >>> tangent = odconv_layer_jvp({"bn_bias": np.ones(2)}, x, params, batch_norm="train")
    >>> tangent.shape
    (2, 1, 2)
    >>> odconv_layer_jvp({}, x, params, batch_norm="train").tolist()
    [[[0.0, 0.0]], [[0.0, 0.0]]]
    """
    fn = "odconv_layer_jvp"
    call, xp, given = _check_odconv(fn, x, params, temperature, batch_norm, bn_eps,
                                    ConvOptions(stride, padding, dilation, groups, padding_mode),
                                    tangents=tangents)
    p, experts = call.p, call.p["experts"]
    forward, attentions = _attentions(x, call, xp=xp)
    hidden_tangent = trunk_jvp(given, p, forward, train=call.train, xp=xp)
    attention_tangents = heads_jvp(hidden_tangent, given, forward.hidden, p, attentions,
                                   temperature=call.temperature, xp=xp)
    conv_tangents = {name: given[name] for name in ("x", "experts") if name in given}
    conv_tangents.update(shaped_attentions(attention_tangents, experts, xp=xp))
    return attended_conv_jvp(conv_tangents, x, experts, shaped_attentions(attentions, experts,
                                                                          xp=xp),
                             call.geometry, xp=xp)


@public_op
def odconv_layer_hvp(cotangent: Any, tangents: Mapping[str, Any], x: Any,
                     params: Mapping[str, Any], *, temperature: float = 1.0,
                     batch_norm: str = "eval", bn_eps: float = 1e-5, stride: Any = 1,
                     padding: Any = 0, dilation: Any = 1, groups: int = 1,
                     padding_mode: str = "zeros") -> dict[str, Any]:
    r"""Hessian-vector product of :func:`odconv_layer`: the derivative of
    :func:`odconv_layer_vjp` at a fixed ``cotangent`` along ``tangents``.

    Parameters
    ----------
    cotangent : array, shape (B, O, \*out)
        :math:`c`, held fixed.
    tangents : mapping
        As for :func:`odconv_layer_jvp`: any of ``"x"`` and the keys present in
        ``params`` except the running statistics, which are buffers; a missing
        key is a zero tangent.
    x, params, temperature, batch_norm, bn_eps, stride, padding, dilation, groups, padding_mode
        Exactly the arguments given to :func:`odconv_layer`.

    Returns
    -------
    dict
        Keyed like :func:`odconv_layer_vjp`: :math:`Ht` for the Hessian :math:`H`
        of :math:`\langle c, f(x, \theta)\rangle` over the input and every
        parameter but the running statistics.

    Notes
    -----
    The VJP is a chain: the attended convolution's VJP gives :math:`\bar x`,
    :math:`\bar W` and the attentions' gradients :math:`\bar\alpha_\ast`; the heads
    turn those into :math:`\bar h` and their weights' and biases'; the trunk turns
    :math:`\bar h` into :math:`\bar x`'s second share and the fc and batch-norm
    gradients.  Its derivative along :math:`t` runs the JVP's forward tangents first
    (:math:`\dot{\bar x}, \dot a, \dot{\hat a}, \dot h` of the trunk and
    :math:`\dot\alpha_\ast` of the heads, as :func:`odconv_layer_jvp`), then:

    * the attended convolution is one product, linear in each of :math:`x, W,
      \alpha_c, \alpha_f, \alpha_s, \alpha_k`: the derivative of its VJP is a sum
      of its VJPs, each with one argument replaced by its tangent, each contributing
      to the other arguments' gradients;
    * a sigmoid head's :math:`T\bar l = \bar\alpha\,\sigma'(l/T)` moves as
      :math:`\dot{\bar\alpha}\,\sigma' + \bar\alpha(1 - 2\alpha)\dot\alpha`; the
      kernel head's :math:`T\bar l = \alpha\odot(\bar\alpha - \langle\bar\alpha,
      \alpha\rangle)` as its VJP at :math:`\dot{\bar\alpha}` plus the derivative of
      the softmax's Jacobian, :math:`\dot\alpha\odot(\bar\alpha -
      \langle\bar\alpha, \alpha\rangle) - \alpha\langle\bar\alpha,
      \dot\alpha\rangle`; each head's affine VJP is bilinear, so
      :math:`\dot{\bar h} = \sum_\ast(T\dot{\bar l}_\ast W_\ast + T\bar l_\ast
      \dot W_\ast)/T`;
    * the ReLU's mask is constant off its kink (no second-order term); the batch norm's
      :math:`\bar a = J(\gamma\bar z)` moves as :math:`J(\dot\gamma\bar z +
      \gamma\dot{\bar z}) + \dot J(\gamma\bar z)`.  In eval mode
      :math:`J = r` is constant (the running statistics are buffers); in train mode
      :math:`J v = r(v - \bar v - \hat a\,\overline{v\hat a})` moves with the batch,

      .. math::

          \dot J v = -r\big(\overline{\hat a\dot a}\,J v
                    + \dot{\hat a}\,\overline{v\hat a}
                    + \hat a\,\overline{v\dot{\hat a}}\big),

      which couples every example's second derivative to the whole batch;
      :math:`\dot{\bar\gamma} = \sum_b(\dot{\bar z}\hat a + \bar z\dot{\hat a})`;
    * the fc layer's VJP is bilinear and the pooling's linear.

    ``x`` collects the convolution's and the trunk's shares.  :math:`T` and
    :math:`\epsilon` are not differentiated.

    Examples
    --------
    >>> import numpy as np
    >>> from condconv_ref import odconv_layer_hvp
    >>> params = {"experts": np.ones((2, 1, 1, 3)), "fc_weight": np.ones((2, 1)),
    ...           "bn_bias": np.ones(2), "filter_weight": np.ones((1, 2))}
    >>> x = np.arange(8.0).reshape(2, 1, 4)
    >>> hvp = odconv_layer_hvp(np.ones((2, 1, 2)), {"bn_bias": np.ones(2)}, x, params,
    ...                        batch_norm="train")
    >>> sorted(hvp)
    ['bn_bias', 'experts', 'fc_weight', 'filter_weight', 'x']
    >>> odconv_layer_hvp(np.ones((2, 1, 2)), {}, x, params, batch_norm="train")["x"].tolist()
    [[[0.0, 0.0, 0.0, 0.0]], [[0.0, 0.0, 0.0, 0.0]]]
    """
    fn = "odconv_layer_hvp"
    call, xp, given = _check_odconv(fn, x, params, temperature, batch_norm, bn_eps,
                                    ConvOptions(stride, padding, dilation, groups, padding_mode),
                                    cotangent, tangents)
    p, experts = call.p, call.p["experts"]
    forward, attentions = _attentions(x, call, xp=xp)
    moved = trunk_tangents(given, p, forward, train=call.train, xp=xp)
    attention_tangents = heads_jvp(moved.hidden, given, forward.hidden, p, attentions,
                                   temperature=call.temperature, xp=xp)
    conv_tangents = {name: given[name] for name in ("x", "experts") if name in given}
    conv_tangents.update(shaped_attentions(attention_tangents, experts, xp=xp))
    shaped = shaped_attentions(attentions, experts, xp=xp)
    conv_grads = _flat(attended_conv_vjp(cotangent, x, experts, shaped, call.geometry, xp=xp),
                       attentions, xp=xp)
    conv_terms = attended_conv_vjp_derivative(cotangent, conv_tangents, x, experts, shaped,
                                              call.geometry, xp=xp)
    grad_hidden, _ = heads_vjp(conv_grads, forward.hidden, p, attentions,
                               temperature=call.temperature, xp=xp)
    grad_hidden_tangent, head_terms = heads_vjp_derivative(
        conv_grads, _flat(conv_terms, attentions, xp=xp), forward.hidden, moved.hidden, given,
        p, attentions, attention_tangents, temperature=call.temperature, xp=xp)
    trunk_terms = trunk_vjp_derivative(grad_hidden, grad_hidden_tangent, given, moved,
                                       tuple(x.shape), p, forward, train=call.train, xp=xp)
    return {**trunk_terms, **head_terms, "x": conv_terms["x"] + trunk_terms["x"],
            "experts": conv_terms["experts"]}
