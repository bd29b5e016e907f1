r"""Layer plumbing: routing computed from ``x``, then the op, and the VJP through both paths.

A layer is an op (:func:`condconv_ref._mixing.mixed_conv` with a convolution
engine, or the linear CondConv) whose routing a :class:`Router` computes from
the input.  :func:`layer` runs routing → op; :func:`layer_vjp` runs the op's
VJP and chains its routing gradient back through the router, so ``x`` gets
both paths: :math:`\bar x = \mathrm{op\_vjp}_x + \mathrm{route\_vjp}_x(\bar\alpha)`.
:func:`layer_jvp` and :func:`layer_hvp` are its forward-mode and second-order
counterparts.
:func:`layer_params` checks a layer's ``params`` mapping; :data:`SIGMOID` is
CondConv's router and :func:`check_sigmoid_router` validates its parameters.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from types import ModuleType
from typing import Any, NamedTuple

from condconv_ref._routing import (
    sigmoid_routing,
    sigmoid_routing_hvp,
    sigmoid_routing_jvp,
    sigmoid_routing_vjp,
)
from condconv_ref._tangent import mixed_vjp_derivative
from condconv_ref._validate import check_ndim, check_nonempty, check_shape

__all__ = [
    "LAYER_KEYS",
    "Router",
    "SIGMOID",
    "check_sigmoid_router",
    "layer",
    "layer_hvp",
    "layer_jvp",
    "layer_params",
    "layer_vjp",
]

LAYER_KEYS = {"experts": True, "bias": False, "route_weight": True, "route_bias": False}
"""The params of a sigmoid-routed layer: name -> required."""

Op = Callable[..., Any]
"""An op on validated arguments: ``op(x, experts, routing, bias, *, xp)``, or its VJP with the
cotangent first, returning ``{"x", "experts", "routing"}`` plus ``"bias"``."""


class Router(NamedTuple):
    """How a layer routes.

    ``route(x, p, *, xp)`` returns the routing (B, E) and whatever its VJP
    needs; ``route_vjp(grads, x, p, saved, *, xp)`` turns the op's gradients
    into the layer's: ``"x"`` through both paths and one entry per param given.
    ``route_jvp(tangents, x, p, saved, *, xp)`` returns the routing's tangent
    along the layer's ``tangents`` (keyed like its gradients), or ``None`` when
    no tangent reaches the routing.  ``route_hvp(cotangent, tangents, x, p, saved, *, xp)``
    is the derivative of the router's own VJP at the fixed routing cotangent along
    ``tangents``, keyed ``"x"`` and one entry per routing param given.
    """

    route: Callable[..., tuple[Any, Any]]
    route_vjp: Callable[..., dict[str, Any]]
    route_jvp: Callable[..., Any] | None = None
    route_hvp: Callable[..., dict[str, Any]] | None = None


def layer_params(fn: str, params: Any,
                 keys: Mapping[str, bool] = LAYER_KEYS) -> dict[str, Any]:
    """Check ``params`` against ``keys`` (name -> required); absent optional keys map to None."""
    if not isinstance(params, Mapping):
        raise TypeError(f"{fn}: params must be a mapping of arrays, got {type(params).__name__}")
    not_named = [k for k in params if not isinstance(k, str)]
    if not_named:
        raise TypeError(f"{fn}: params has keys that are not strings {not_named}, expected "
                        f"keys from {sorted(keys)}")
    unknown = sorted(set(params) - set(keys))
    if unknown:
        raise ValueError(f"{fn}: params has unknown keys {unknown}, expected keys from "
                         f"{sorted(keys)}")
    missing = sorted(k for k, required in keys.items() if required and params.get(k) is None)
    if missing:
        raise ValueError(f"{fn}: params is missing the required keys {missing}")
    return {k: params.get(k) for k in keys}


def layer(x: Any, p: dict[str, Any], router: Router, op: Op, *, xp: ModuleType) -> Any:
    """The layer's output: the routing from ``x``, then ``op``."""
    routing, _ = router.route(x, p, xp=xp)
    return op(x, p["experts"], routing, p["bias"], xp=xp)


def layer_vjp(cotangent: Any, x: Any, p: dict[str, Any], router: Router, op_vjp: Op, *,
              xp: ModuleType) -> dict[str, Any]:
    """The layer's gradients: ``op_vjp`` at the routing, chained back through the router."""
    routing, saved = router.route(x, p, xp=xp)
    grads = op_vjp(cotangent, x, p["experts"], routing, p["bias"], xp=xp)
    return router.route_vjp(grads, x, p, saved, xp=xp)


def layer_jvp(tangents: dict[str, Any], x: Any, p: dict[str, Any], router: Router, op_jvp: Op,
              *, xp: ModuleType) -> Any:
    """The layer's tangent: the routing's tangent from the router, then ``op_jvp`` along
    ``x``, ``experts``, ``bias`` and the routing (``x`` thus reaches it along both paths)."""
    if router.route_jvp is None:
        raise NotImplementedError("layer_jvp: this router has no route_jvp")
    routing, saved = router.route(x, p, xp=xp)
    return op_jvp(_op_tangents(tangents, x, p, router, saved, xp=xp), x, p["experts"], routing,
                  p["bias"], xp=xp)


def _op_tangents(tangents: dict[str, Any], x: Any, p: dict[str, Any], router: Router,
                 saved: Any, *, xp: ModuleType) -> dict[str, Any]:
    """The op's tangents: the layer's ``x``, ``experts``, ``bias`` and the routing's tangent
    from ``route_jvp`` (absent when no tangent reaches the routing)."""
    op_tangents = {name: tangents[name] for name in ("x", "experts", "bias") if name in tangents}
    routing_tangent = router.route_jvp(tangents, x, p, saved, xp=xp)
    if routing_tangent is not None:
        op_tangents["routing"] = routing_tangent
    return op_tangents


def layer_hvp(cotangent: Any, tangents: dict[str, Any], x: Any, p: dict[str, Any],
              router: Router, op_vjp: Op, *, xp: ModuleType) -> dict[str, Any]:
    r"""The derivative of :func:`layer_vjp` at the fixed ``cotangent`` along ``tangents``.

    :func:`layer_vjp` is ``route_vjp(op_vjp(c, x, W, α(x, p), β), x, p)``.  Its
    derivative has two parts: ``route_vjp`` (linear in the op's gradients) of the
    op's VJP differentiated along :math:`(\dot x, \dot W, \dot\alpha, \dot\beta)`
    (:func:`~condconv_ref._tangent.mixed_vjp_derivative`, with :math:`\dot\alpha`
    from ``route_jvp``), plus the router's own second-order term ``route_hvp`` at the
    routing's gradient :math:`\bar\alpha`.
    """
    if router.route_jvp is None or router.route_hvp is None:
        raise NotImplementedError("layer_hvp: this router has no route_jvp or route_hvp")
    routing, saved = router.route(x, p, xp=xp)
    op_tangents = _op_tangents(tangents, x, p, router, saved, xp=xp)
    grads = op_vjp(cotangent, x, p["experts"], routing, p["bias"], xp=xp)
    derivative = mixed_vjp_derivative(op_vjp, cotangent, op_tangents, x, p["experts"], routing,
                                      p["bias"], xp=xp)
    result = router.route_vjp(derivative, x, p, saved, xp=xp)
    for name, term in router.route_hvp(grads["routing"], tangents, x, p, saved, xp=xp).items():
        result[name] = result[name] + term
    return result


# ---------------------------------------------------------------- CondConv's sigmoid router


def check_sigmoid_router(fn: str, x: Any, p: dict[str, Any]) -> None:
    """Validate the input and routing params of a convolutional sigmoid-routed layer."""
    check_nonempty(fn, x=x, **p)
    check_ndim(fn, "x", x, (3, 4, 5), "(B, C, *spatial) with 1 to 3 spatial dims")
    check_ndim(fn, "route_weight", p["route_weight"], 2, "(E, C)")
    n_experts = p["experts"].shape[0] if p["experts"].ndim else 0
    check_shape(fn, "route_weight", p["route_weight"], (n_experts, x.shape[1]),
                f"(E, C) with E={n_experts} from experts and C={x.shape[1]} from x")
    if p["route_bias"] is not None:
        check_shape(fn, "route_bias", p["route_bias"], (n_experts,), "(E,)")


def _route_sigmoid(x: Any, p: dict[str, Any], *, xp: ModuleType) -> tuple[Any, None]:
    return sigmoid_routing(x, p["route_weight"], p["route_bias"], xp=xp), None


def _route_sigmoid_vjp(grads: dict[str, Any], x: Any, p: dict[str, Any], saved: None, *,
                       xp: ModuleType) -> dict[str, Any]:
    """Chain an op's gradients through the sigmoid routing into the layer's ``x`` and params."""
    route_grads = sigmoid_routing_vjp(grads["routing"], x, p["route_weight"], p["route_bias"],
                                      xp=xp)
    result = {"x": grads["x"] + route_grads["x"], "experts": grads["experts"],
              "route_weight": route_grads["weight"]}
    if p["bias"] is not None:
        result["bias"] = grads["bias"]
    if p["route_bias"] is not None:
        result["route_bias"] = route_grads["bias"]
    return result


def _route_sigmoid_jvp(tangents: dict[str, Any], x: Any, p: dict[str, Any], saved: None, *,
                       xp: ModuleType) -> Any:
    """The sigmoid routing's tangent along the layer's ``x``, ``route_weight``, ``route_bias``."""
    own = {"x": tangents.get("x"), "weight": tangents.get("route_weight"),
           "bias": tangents.get("route_bias")}
    return sigmoid_routing_jvp({name: t for name, t in own.items() if t is not None}, x,
                               p["route_weight"], p["route_bias"], xp=xp)


def _route_sigmoid_hvp(cotangent: Any, tangents: dict[str, Any], x: Any, p: dict[str, Any],
                       saved: None, *, xp: ModuleType) -> dict[str, Any]:
    """The sigmoid router's second-order term, keyed ``x``, ``route_weight``, ``route_bias``."""
    own = {"x": tangents.get("x"), "weight": tangents.get("route_weight"),
           "bias": tangents.get("route_bias")}
    terms = sigmoid_routing_hvp(cotangent, {name: t for name, t in own.items() if t is not None},
                                x, p["route_weight"], p["route_bias"], xp=xp)
    return {"route_" + name if name != "x" else name: term for name, term in terms.items()}


SIGMOID = Router(_route_sigmoid, _route_sigmoid_vjp, _route_sigmoid_jvp, _route_sigmoid_hvp)
"""CondConv's router, :func:`condconv_ref.route_sigmoid` on ``route_weight`` and ``route_bias``."""
