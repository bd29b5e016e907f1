r"""Expert mixing: the plumbing every CondConv-style op shares, mix → conv and its VJP.

:func:`mix` and :func:`mix_vjp` mix per-example tensors from E experts,
:math:`M_b = \sum_e \alpha_{be} W_e`.  :func:`mixed_conv` mixes the kernels and
biases with the routing, then runs a convolution engine on the per-example
kernels; :func:`mixed_conv_vjp` chains that engine's VJP back through the
mixing.  :func:`check_condconv` validates the arguments of a CondConv call
(shapes, options, memory) once the caller has resolved the namespace.
Shapes: ``x`` (B, C, \*spatial), ``experts`` (E, O, C/groups, \*k), ``bias``
(E, O), ``routing`` (B, E).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial
from types import ModuleType
from typing import Any

from condconv_ref._conv_engine import conv_memory
from condconv_ref._tangent import added, conv_tangent
from condconv_ref._validate import (
    ConvGeometry,
    ConvOptions,
    check_groups,
    check_ndim,
    check_nonempty,
    check_shape,
    itemsize,
    kernel_layout,
)
from condconv_ref.memory import check_memory

__all__ = [
    "check_condconv",
    "condconv_memory",
    "mix",
    "mix_jvp",
    "mix_vjp",
    "mixed",
    "mixed_conv",
    "mixed_conv_jvp",
    "mixed_conv_vjp",
    "mixed_vjp",
    "moe_memory",
]

Conv = Callable[..., Any]
"""A convolution engine: ``conv(x, kernel, bias, geometry, *, xp)`` with per-example kernels."""


def mix(routing: Any, experts: Any, *, xp: ModuleType) -> Any:
    """(B, E) routing and (E, \\*s) experts -> (B, \\*s): one matmul over the experts."""
    flat = xp.reshape(experts, (experts.shape[0], -1))
    return xp.reshape(routing @ flat, (routing.shape[0],) + tuple(experts.shape[1:]))


def mix_vjp(cotangent: Any, routing: Any, experts: Any, *, xp: ModuleType) -> dict[str, Any]:
    """``{"routing": ᾱ, "experts": W̄}``, the VJP of :func:`mix`.

    Derived in :func:`condconv_ref.mix_experts`.
    """
    flat_experts = xp.reshape(experts, (experts.shape[0], -1))
    flat_cotangent = xp.reshape(cotangent, (routing.shape[0], -1))
    return {
        "routing": flat_cotangent @ xp.matrix_transpose(flat_experts),
        "experts": xp.reshape(xp.matrix_transpose(routing) @ flat_cotangent, experts.shape),
    }


def mix_jvp(routing_tangent: Any, experts_tangent: Any, routing: Any, experts: Any, *,
            xp: ModuleType) -> Any:
    """The tangent of :func:`mix`, :math:`\\dot\\alpha W + \\alpha \\dot W`; ``None`` when
    both tangents are ``None`` (zero).  Derived in :func:`condconv_ref.mix_experts_jvp`."""
    terms = []
    if routing_tangent is not None:
        terms.append(mix(routing_tangent, experts, xp=xp))
    if experts_tangent is not None:
        terms.append(mix(routing, experts_tangent, xp=xp))
    return added(terms)


def mixed(experts: Any, routing: Any, bias: Any, *, xp: ModuleType) -> tuple[Any, Any]:
    """The per-example kernels (B, O, C/groups, \\*k) and biases (B, O) or ``None``."""
    kernel = mix(routing, experts, xp=xp)
    return kernel, (None if bias is None else mix(routing, bias, xp=xp))


def mixed_vjp(conv_grads: dict[str, Any], experts: Any, routing: Any, bias: Any, *,
              xp: ModuleType) -> dict[str, Any]:
    """Chain a per-example conv's ``kernel``/``bias`` gradients back through :func:`mixed`."""
    kernel_grads = mix_vjp(conv_grads["kernel"], routing, experts, xp=xp)
    grads = {"x": conv_grads["x"], "experts": kernel_grads["experts"],
             "routing": kernel_grads["routing"]}
    if bias is not None:
        bias_grads = mix_vjp(conv_grads["bias"], routing, bias, xp=xp)
        grads["routing"] = grads["routing"] + bias_grads["routing"]
        grads["bias"] = bias_grads["experts"]
    return grads


def mixed_conv(x: Any, experts: Any, routing: Any, bias: Any, geometry: ConvGeometry,
               conv: Conv, *, xp: ModuleType) -> Any:
    """CondConv on validated arguments: the mixed kernels and bias, then ``conv``."""
    kernel, mixed_bias = mixed(experts, routing, bias, xp=xp)
    return conv(x, kernel, mixed_bias, geometry, xp=xp)


def mixed_conv_vjp(cotangent: Any, x: Any, experts: Any, routing: Any, bias: Any,
                   geometry: ConvGeometry, conv_vjp: Conv, *, xp: ModuleType) -> dict[str, Any]:
    """VJP of :func:`mixed_conv`: ``conv_vjp`` at the mixed kernels, then :func:`mixed_vjp`."""
    kernel, mixed_bias = mixed(experts, routing, bias, xp=xp)
    conv_grads = conv_vjp(cotangent, x, kernel, mixed_bias, geometry, xp=xp)
    return mixed_vjp(conv_grads, experts, routing, bias, xp=xp)


def mixed_conv_jvp(tangents: dict[str, Any], x: Any, experts: Any, routing: Any, bias: Any,
                   geometry: ConvGeometry, *, xp: ModuleType) -> Any:
    """JVP of :func:`mixed_conv` along ``tangents`` (any of ``x``, ``experts``, ``routing``,
    ``bias``): the tangents of the mixed kernels and bias, then the conv's tangent."""
    kernel, _ = mixed(experts, routing, bias, xp=xp)
    routing_tangent = tangents.get("routing")
    conv_tangents = {"x": tangents.get("x"),
                     "kernel": mix_jvp(routing_tangent, tangents.get("experts"), routing,
                                       experts, xp=xp),
                     "bias": None if bias is None else mix_jvp(
                         routing_tangent, tangents.get("bias"), routing, bias, xp=xp)}
    return conv_tangent({name: t for name, t in conv_tangents.items() if t is not None},
                        x, kernel, geometry, xp=xp)


def check_condconv(fn: str, x: Any, experts: Any, routing: Any, bias: Any,
                   options: ConvOptions, cotangent: Any = None, *, xp: ModuleType,
                   memory: Callable[..., dict[str, int]] | None = None) -> ConvGeometry:
    """Validate a CondConv call whose namespace ``xp`` is resolved; return its geometry.

    ``routing`` is ``None`` for a layer, which computes it from valid
    arguments.  ``memory(x, experts, geometry, itemsize, vjp=...)`` estimates
    the working memory; the default is :func:`condconv_memory` of the mixed
    form (the E-conv form and variants with their own engine pass theirs).
    """
    check_ndim(fn, "x", x, (3, 4, 5), "(B, C, *spatial) with 1 to 3 spatial dims")
    nd = x.ndim - 2
    batch, channels = x.shape[:2]
    check_ndim(fn, "experts", experts, nd + 3, kernel_layout(nd, "E, O, I/groups"))
    n_experts, out_channels, in_per_group = experts.shape[:3]
    if n_experts < 1:
        raise ValueError(f"{fn}: experts has E={n_experts}, expected E >= 1")
    if routing is not None:
        check_ndim(fn, "routing", routing, 2, "(B, E)")
        check_shape(fn, "routing", routing, (batch, n_experts),
                    f"(B, E) with B={batch} from x and E={n_experts} from experts")
    if bias is not None:
        check_shape(fn, "bias", bias, (n_experts, out_channels), "(E, O)")
    geometry = options.geometry(fn, x.shape[2:], experts.shape[3:])
    check_groups(fn, "experts", channels, out_channels, in_per_group, geometry.groups)
    if cotangent is not None:
        check_shape(fn, "cotangent", cotangent, (batch, out_channels) + geometry.out,
                    "(B, O, *out), the output shape")
    check_nonempty(fn, x=x, experts=experts, routing=routing, bias=bias)
    estimate = partial(condconv_memory, moe=False) if memory is None else memory
    size = itemsize(x, xp=xp)
    check_memory(fn, size, estimate(x, experts, geometry, size, vjp=cotangent is not None))
    return geometry


def condconv_memory(x: Any, experts: Any, geometry: ConvGeometry, itemsize: int, *, vjp: bool,
                    moe: bool) -> dict[str, int]:
    """Elements of the largest arrays a CondConv call allocates (see :mod:`condconv_ref.memory`).

    The mixed form adds the per-example kernels to one convolution's needs; the
    mixture-of-experts form keeps the E expert outputs instead.
    """
    batch, n_experts = x.shape[0], experts.shape[0]
    if moe:
        parts = conv_memory(tuple(x.shape), tuple(experts.shape[1:]), geometry, itemsize,
                              vjp=vjp)
        parts["expert outputs"] = (n_experts * batch * experts.shape[1]
                                   * math.prod(geometry.out))
    else:
        kernels = (batch,) + tuple(experts.shape[1:])
        parts = conv_memory(tuple(x.shape), kernels, geometry, itemsize, vjp=vjp)
        parts["mixed kernels (B, O, C/groups, *k)"] = math.prod(kernels)
    if vjp:
        parts["experts gradient"] = math.prod(experts.shape)
    return parts


moe_memory = partial(condconv_memory, moe=True)
