r"""Dynamic Convolution (Chen et al., CVPR 2020): softmax-routed CondConv and its temperature.

The layer is CondConv whose routing is an attention over the experts,
:math:`\alpha = \mathrm{softmax}(\mathrm{fc}_2(\mathrm{relu}(\mathrm{fc}_1(\mathrm{GAP}(x)))) / T)`
(:func:`route_softmax`), annealed from a high temperature early in training
(:func:`temperature_schedule`).  Shapes: ``x`` (B, C, \*spatial), ``experts``
(E, O, C/groups, \*k), ``bias`` (E, O), ``fc1_weight`` (H, C), ``fc2_weight`` (E, H).

The layer is the shared layer plumbing (:mod:`condconv_ref._layer`) with a
softmax router, around the mixing and the convolution engine
(:mod:`condconv_ref._conv_engine`) that :func:`condconv` runs.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from functools import partial
from types import ModuleType
from typing import Any

from condconv_ref._conv_engine import run_conv, run_conv_vjp
from condconv_ref._layer import Router, layer, layer_hvp, layer_jvp, layer_params, layer_vjp
from condconv_ref._mixing import check_condconv, mixed_conv, mixed_conv_jvp, mixed_conv_vjp
from condconv_ref._routing import (
    SoftmaxRouting,
    check_softmax_routing,
    softmax_routing,
    softmax_routing_hvp,
    softmax_routing_jvp,
    softmax_routing_vjp,
)
from condconv_ref._validate import (
    ConvGeometry,
    ConvOptions,
    check_finite_positive,
    check_ndim,
    check_tangent_shapes,
    kernel_layout,
    namespace,
    public_op,
    tangent_namespace,
)

__all__ = ["dynamic_conv_layer", "dynamic_conv_layer_hvp", "dynamic_conv_layer_jvp",
           "dynamic_conv_layer_vjp", "temperature_schedule"]

_DYNAMIC_KEYS = {"experts": True, "bias": False, "fc1_weight": True, "fc1_bias": False,
                 "fc2_weight": True, "fc2_bias": False}


def _check_dynamic(fn: str, x: Any, p: dict[str, Any], temperature: Any, options: ConvOptions,
                   cotangent: Any = None, *, xp: ModuleType) -> tuple[ConvGeometry, float]:
    """Validate a :func:`dynamic_conv_layer` (``cotangent``: its VJP) call; return geometry, T."""
    check_ndim(fn, "x", x, (3, 4, 5), "(B, C, *spatial) with 1 to 3 spatial dims")
    check_ndim(fn, "experts", p["experts"], x.ndim + 1, kernel_layout(x.ndim - 2, "E, O, I/groups"))
    temperature = check_softmax_routing(fn, x, p["fc1_weight"], p["fc2_weight"], p["fc1_bias"],
                                        p["fc2_bias"], temperature, xp=xp)
    n_experts = p["experts"].shape[0]
    if p["fc2_weight"].shape[0] != n_experts:
        raise ValueError(f"{fn}: fc2_weight has shape {tuple(p['fc2_weight'].shape)}, expected "
                         f"(E, H) with E={n_experts} from experts")
    geometry = check_condconv(fn, x, p["experts"], None, p["bias"], options, cotangent, xp=xp)
    return geometry, temperature


def _route_softmax(x: Any, p: dict[str, Any], *, temperature: float,
                   xp: ModuleType) -> tuple[Any, SoftmaxRouting]:
    forward = softmax_routing(x, p["fc1_weight"], p["fc2_weight"], p["fc1_bias"], p["fc2_bias"],
                              temperature, xp=xp)
    return forward.routing, forward


def _route_softmax_vjp(grads: dict[str, Any], x: Any, p: dict[str, Any],
                       forward: SoftmaxRouting, *, temperature: float,
                       xp: ModuleType) -> dict[str, Any]:
    """Chain the op's gradients through the softmax routing into the layer's ``x`` and params."""
    route_grads = softmax_routing_vjp(grads["routing"], tuple(x.shape), p["fc1_weight"],
                                      p["fc2_weight"], p["fc1_bias"], p["fc2_bias"], forward,
                                      temperature, xp=xp)
    result = {"x": grads["x"] + route_grads.pop("x"), "experts": grads["experts"], **route_grads}
    if p["bias"] is not None:
        result["bias"] = grads["bias"]
    return result


def _route_softmax_jvp(tangents: dict[str, Any], x: Any, p: dict[str, Any],
                       forward: SoftmaxRouting, *, temperature: float, xp: ModuleType) -> Any:
    """The softmax routing's tangent along the layer's ``x`` and routing parameters."""
    return softmax_routing_jvp(tangents, p["fc1_weight"], p["fc2_weight"], forward, temperature,
                               xp=xp)


def _route_softmax_hvp(cotangent: Any, tangents: dict[str, Any], x: Any, p: dict[str, Any],
                       forward: SoftmaxRouting, *, temperature: float,
                       xp: ModuleType) -> dict[str, Any]:
    """The softmax router's second-order term at the routing's gradient ``cotangent``."""
    return softmax_routing_hvp(cotangent, tangents, tuple(x.shape), p["fc1_weight"],
                               p["fc2_weight"], p["fc1_bias"], p["fc2_bias"], forward,
                               temperature, xp=xp)


def _softmax_router(temperature: float) -> Router:
    """Dynamic Convolution's router at temperature ``temperature``."""
    return Router(partial(_route_softmax, temperature=temperature),
                  partial(_route_softmax_vjp, temperature=temperature),
                  partial(_route_softmax_jvp, temperature=temperature),
                  partial(_route_softmax_hvp, temperature=temperature))


@public_op
def dynamic_conv_layer(x: Any, params: Mapping[str, Any], *, temperature: float = 1.0,
                       stride: Any = 1, padding: Any = 0, dilation: Any = 1, groups: int = 1,
                       padding_mode: str = "zeros") -> Any:
    r"""The Dynamic Convolution layer: softmax routing computed from ``x``, then :func:`condconv`.

    .. math::

        \alpha = \mathrm{softmax}\Big(\big(\mathrm{relu}(\mathrm{GAP}(x) W_1^\top + b_1)
                 W_2^\top + b_2\big) / T\Big),\qquad
        y_b = \Big(\sum_e \alpha_{be} W_e\Big) \ast x_b + \sum_e \alpha_{be}\,\beta_e .

    Parameters
    ----------
    x : array, shape (B, C, \*spatial)
    params : mapping
        ``experts`` :math:`W` (E, O, C/groups, \*k); ``fc1_weight`` :math:`W_1`
        (H, C) with H >= 1; ``fc2_weight`` :math:`W_2` (E, H); optional ``bias``
        :math:`\beta` (E, O), ``fc1_bias`` :math:`b_1` (H,) and ``fc2_bias``
        :math:`b_2` (E,).
    temperature : float, keyword-only
        :math:`T`, finite and > 0; see :func:`temperature_schedule`.
    stride, padding, dilation, groups, padding_mode
        As in :func:`conv`; unlike some public implementations, ``padding`` is
        applied for every ``padding_mode``, ``"zeros"`` included.

    Returns
    -------
    array, shape (B, O, \*out)

    Notes
    -----
    ``x`` reaches the output along two paths, the convolution and the routing.
    With :math:`\bar\alpha` from :func:`condconv_vjp`,

    .. math::

        \bar x = \mathrm{condconv\_vjp}_x + \mathrm{route\_softmax\_vjp}_x(\bar\alpha),

    and the routing parameters get :func:`route_softmax_vjp` at
    :math:`\bar\alpha` (derivation there, including the ReLU convention at 0).
    :math:`T` is a hyper-parameter and is not differentiated.

    Examples
    --------
    >>> import numpy as np
    >>> from condconv_ref import condconv, dynamic_conv_layer, route_softmax
    >>> rng = np.random.default_rng(0)
    >>> x = rng.normal(size=(2, 4, 6, 6))
    >>> params = {"experts": rng.normal(size=(3, 5, 4, 3, 3)),
    ...           "fc1_weight": rng.normal(size=(2, 4)), "fc2_weight": rng.normal(size=(3, 2))}
    >>> y = dynamic_conv_layer(x, params, temperature=30.0, padding=1)
    >>> y.shape
    (2, 5, 6, 6)
    >>> routing = route_softmax(x, params["fc1_weight"], params["fc2_weight"], temperature=30.0)
    >>> bool(np.allclose(y, condconv(x, params["experts"], routing, padding=1)))
    True
    """
    fn = "dynamic_conv_layer"
    p = layer_params(fn, params, _DYNAMIC_KEYS)
    xp = namespace(fn, x=x, **p)
    geometry, temperature = _check_dynamic(
        fn, x, p, temperature, ConvOptions(stride, padding, dilation, groups, padding_mode), xp=xp)
    return layer(x, p, _softmax_router(temperature),
                 partial(mixed_conv, geometry=geometry, conv=run_conv), xp=xp)


@public_op
def dynamic_conv_layer_vjp(cotangent: Any, x: Any, params: Mapping[str, Any], *,
                           temperature: float = 1.0, stride: Any = 1, padding: Any = 0,
                           dilation: Any = 1, groups: int = 1,
                           padding_mode: str = "zeros") -> dict[str, Any]:
    r"""Vector-Jacobian product of :func:`dynamic_conv_layer`.

    Returns
    -------
    dict
        ``"x"`` (through both the convolution and the routing) and one entry
        per key present in ``params``.  The derivation is in
        :func:`dynamic_conv_layer`.

    Examples
    --------
    >>> import numpy as np
    >>> from condconv_ref import dynamic_conv_layer_vjp
    >>> params = {"experts": np.ones((2, 1, 1, 2)), "fc1_weight": np.ones((3, 1)),
    ...           "fc2_weight": np.ones((2, 3)), "fc2_bias": np.zeros(2)}
    >>> grads = dynamic_conv_layer_vjp(np.ones((1, 1, 3)), np.ones((1, 1, 4)), params)
    >>> sorted(grads)
    ['experts', 'fc1_weight', 'fc2_bias', 'fc2_weight', 'x']
    >>> grads["experts"][:, 0, 0]
    array([[1.5, 1.5],
           [1.5, 1.5]])
    """
    fn = "dynamic_conv_layer_vjp"
    p = layer_params(fn, params, _DYNAMIC_KEYS)
    xp = namespace(fn, x=x, **p, cotangent=cotangent)
    geometry, temperature = _check_dynamic(
        fn, x, p, temperature, ConvOptions(stride, padding, dilation, groups, padding_mode),
        cotangent, xp=xp)
    return layer_vjp(cotangent, x, p, _softmax_router(temperature),
                     partial(mixed_conv_vjp, geometry=geometry, conv_vjp=run_conv_vjp), xp=xp)


@public_op
def dynamic_conv_layer_jvp(tangents: Mapping[str, Any], x: Any, params: Mapping[str, Any], *,
                           temperature: float = 1.0, stride: Any = 1, padding: Any = 0,
                           dilation: Any = 1, groups: int = 1, padding_mode: str = "zeros") -> Any:
    r"""Jacobian-vector product of :func:`dynamic_conv_layer`.

    Parameters
    ----------
    tangents : mapping
        Any of ``"x"`` and the keys present in ``params`` (the keys of
        :func:`dynamic_conv_layer_vjp`), each with the shape of its
        argument; a missing key is a zero tangent.  :math:`T` has none.
    x, params, temperature, stride, padding, dilation, groups, padding_mode
        Exactly the arguments given to :func:`dynamic_conv_layer`.

    Returns
    -------
    array, shape (B, O, \*out)

    Notes
    -----
    The routing's tangent :math:`\dot\alpha` from :func:`route_softmax_jvp`
    (through the routing MLP and the softmax), then :func:`condconv_jvp` along
    :math:`(\dot x, \dot W, \dot\alpha, \dot\beta)`; ``x`` reaches the tangent
    through the convolution and the routing.

    Examples
    --------
    A tangent of the routing MLP alone is one of the output's routing: a
    shift common to all logits changes nothing.

    >>> import numpy as np
    >>> from condconv_ref import dynamic_conv_layer_jvp
    >>> params = {"experts": np.ones((2, 1, 1, 2)), "fc1_weight": np.ones((3, 1)),
    ...           "fc2_weight": np.ones((2, 3)), "fc2_bias": np.zeros(2)}
    >>> dynamic_conv_layer_jvp({"fc2_bias": np.ones(2)}, np.ones((1, 1, 4)), params)
    array([[[0., 0., 0.]]])
    """
    fn = "dynamic_conv_layer_jvp"
    p = layer_params(fn, params, _DYNAMIC_KEYS)
    arrays = {"x": x, **p}
    tangents, xp = tangent_namespace(fn, tangents, arrays)
    geometry, temperature = _check_dynamic(
        fn, x, p, temperature, ConvOptions(stride, padding, dilation, groups, padding_mode), xp=xp)
    check_tangent_shapes(fn, tangents, arrays)
    return layer_jvp(tangents, x, p, _softmax_router(temperature),
                     partial(mixed_conv_jvp, geometry=geometry), xp=xp)


def temperature_schedule(step: float, *, start: float = 30.0, end: float = 1.0,
                         anneal_steps: float) -> float:
    r"""Softmax temperature annealed linearly from ``start`` to ``end``, then held at ``end``.

    .. math::

        T(s) = (1 - \rho)\,T_\text{start} + \rho\,T_\text{end},\qquad
        \rho = \min(s / S, 1),

    with :math:`S` = ``anneal_steps``.  It returns ``start`` exactly at
    ``step=0``, ``end`` exactly from ``step=anneal_steps`` on, and in between
    never leaves the interval spanned by the two, rounding included.

    Parameters
    ----------
    step : int or float
        Progress so far, >= 0: an epoch index, a global iteration count, or a
        fractional epoch, in the same unit as ``anneal_steps``.
    start, end : float, keyword-only
        Temperatures at the start and the end of the annealing, finite and > 0.
    anneal_steps : int or float, keyword-only
        Length of the annealing, finite and > 0.

    Returns
    -------
    float

    Notes
    -----
    How the schedules of the paper and of public code map onto it (``step``
    counts from 0 at the start of training):

    * **Epoch-based, DY-Conv paper** (Chen et al., 2020: :math:`T` falls
      linearly from 30 to 1 over the first 10 epochs): ``step`` = index of the
      current epoch, ``temperature_schedule(epoch, start=30, end=1,
      anneal_steps=10)``; :math:`T = 1` from epoch 10 on.
    * **Epoch-based decrement**: code that starts at 34 and subtracts 3 after
      every epoch until it reaches 1 (e.g. the widely copied
      ``Dynamic_conv2d``, ``temperature=34``) is ``start=34, end=1,
      anneal_steps=11`` with ``step`` = number of completed epochs; in general
      a decrement :math:`d` per epoch is ``anneal_steps = (start - end) / d``.
    * **Iteration-based**: code that updates :math:`T` every iteration uses
      ``step`` = global iteration (``epoch * iters_per_epoch + i``) and
      ``anneal_steps`` = annealing epochs × ``iters_per_epoch`` (e.g.
      ``10 * len(loader)``).  Passing the fractional epoch
      ``epoch + i / iters_per_epoch`` with ``anneal_steps=10`` gives the same
      values.

    Examples
    --------
    >>> from condconv_ref import temperature_schedule
    >>> [temperature_schedule(epoch, anneal_steps=10) for epoch in (0, 5, 10, 50)]
    [30.0, 15.5, 1.0, 1.0]
    >>> [round(temperature_schedule(epoch, start=34, end=1, anneal_steps=11), 9)
    ...  for epoch in range(0, 14, 3)]
    [34.0, 25.0, 16.0, 7.0, 1.0]
    >>> iters_per_epoch = 500
    >>> temperature_schedule(2 * iters_per_epoch + 250, anneal_steps=10 * iters_per_epoch)
    22.75
    """
    fn = "temperature_schedule"
    start = check_finite_positive(fn, "start", start)
    end = check_finite_positive(fn, "end", end)
    anneal_steps = check_finite_positive(fn, "anneal_steps", anneal_steps)
    if isinstance(step, bool) or not isinstance(step, numbers.Real):
        raise TypeError(f"{fn}: step must be a real number, got {step!r}")
    if not math.isfinite(step) or step < 0:
        raise ValueError(f"{fn}: step must be finite and >= 0, got {step!r}")
    progress = float(step) / anneal_steps
    if progress >= 1.0:
        return end
    value = start + (end - start) * progress
    return min(max(value, min(start, end)), max(start, end))


@public_op
def dynamic_conv_layer_hvp(cotangent: Any, tangents: Mapping[str, Any], x: Any,
                           params: Mapping[str, Any], *, temperature: float = 1.0,
                           stride: Any = 1, padding: Any = 0, dilation: Any = 1, groups: int = 1,
                           padding_mode: str = "zeros") -> dict[str, Any]:
    r"""Hessian-vector product of :func:`dynamic_conv_layer`: the derivative of
    :func:`dynamic_conv_layer_vjp` at a fixed ``cotangent`` along ``tangents``.

    ``tangents`` is keyed as for :func:`dynamic_conv_layer_jvp`; the other
    arguments are exactly those of :func:`dynamic_conv_layer_vjp`.  Returns a
    dict keyed like the VJP's gradients.

    Notes
    -----
    As in :func:`condconv_layer_hvp`, the op's share is a sum of VJPs with one
    argument replaced by its tangent.  The softmax router's own term moves its
    Jacobian with the routing: with :math:`T\bar z = \alpha\odot(\bar\alpha -
    \langle\bar\alpha, \alpha\rangle)`, :math:`T\dot{\bar z} = \dot\alpha\odot
    (\bar\alpha - \langle\bar\alpha,\alpha\rangle) - \alpha\langle\bar\alpha,
    \dot\alpha\rangle`, chained back through the two affine maps by the product rule;
    the ReLU contributes no second-order term (its mask is constant off the kink).

    Examples
    --------
    >>> import numpy as np
    >>> from condconv_ref import dynamic_conv_layer_hvp
    >>> params = {"experts": np.ones((2, 1, 1, 2)), "fc1_weight": np.ones((3, 1)),
    ...           "fc2_weight": np.ones((2, 3))}
    >>> hvp = dynamic_conv_layer_hvp(np.ones((1, 1, 3)), {"x": np.ones((1, 1, 4))},
    ...                              np.ones((1, 1, 4)), params)
    >>> sorted(hvp)
    ['experts', 'fc1_weight', 'fc2_weight', 'x']
    """
    fn = "dynamic_conv_layer_hvp"
    p = layer_params(fn, params, _DYNAMIC_KEYS)
    arrays = {"x": x, **p}
    tangents, xp = tangent_namespace(fn, tangents, arrays, cotangent)
    geometry, temperature = _check_dynamic(
        fn, x, p, temperature, ConvOptions(stride, padding, dilation, groups, padding_mode),
        cotangent, xp=xp)
    check_tangent_shapes(fn, tangents, arrays)
    return layer_hvp(cotangent, tangents, x, p, _softmax_router(temperature),
                     partial(mixed_conv_vjp, geometry=geometry, conv_vjp=run_conv_vjp), xp=xp)
