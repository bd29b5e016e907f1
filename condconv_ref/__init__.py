"""condconv_ref: golden reference and verification toolkit for CondConv-style layers.

Every op is written once against the Python array API standard and runs on
any compliant namespace (NumPy, CuPy, torch, array-api-strict).  Each op
``f`` has a hand-derived ``f_vjp(cotangent, *args)`` that returns a dict of
gradients keyed by argument name, and ``f_jvp(tangents, *args)`` that returns
the output's derivative along tangents keyed the same way (forward mode).

Which module is which (data flows down only: layers, engines, validation):

* ops, one public module each: ``conv``, ``routing``, ``condconv``,
  ``depthwise``, ``linear``, ``dynamic``, ``odconv``.  Each op resolves the namespace and
  validates its arguments once, then calls the layers below.
* plumbing shared by the ops: ``_layer`` (routing computed from ``x`` → op,
  and the VJP and JVP through both paths), ``_tangent`` (forward mode: the
  product rule's terms, a convolution's tangent) and ``_mixing`` (expert mixing → conv, and
  its VJP; CondConv's validation).
* engines on validated arrays: ``_conv_engine`` (the one entry point of
  every convolution, which picks its form by shape: ``_gather`` for small
  convolutions, ``_flat`` for depthwise ones, ``_im2col`` for any other),
  ``_routing`` (pooling, stable sigmoid and softmax, the routings), and
  ``_conv_parts`` (padding, kernel offsets) under the convolution forms.
* at the bottom: ``_validate`` (the checks, the one namespace resolution,
  :class:`~condconv_ref._validate.ConvOptions`) and ``memory`` (the budget).
"""

from condconv_ref.condconv import (
    condconv,
    condconv_jvp,
    condconv_layer,
    condconv_layer_hvp,
    condconv_layer_jvp,
    condconv_layer_vjp,
    condconv_vjp,
    mix_experts,
    mix_experts_jvp,
    mix_experts_vjp,
    moe_condconv,
    moe_condconv_jvp,
    moe_condconv_vjp,
)
from condconv_ref.conv import conv, conv_jvp, conv_vjp
from condconv_ref.depthwise import (
    depthwise_condconv,
    depthwise_condconv_jvp,
    depthwise_condconv_layer,
    depthwise_condconv_layer_hvp,
    depthwise_condconv_layer_jvp,
    depthwise_condconv_layer_vjp,
    depthwise_condconv_vjp,
)
from condconv_ref.dynamic import (
    dynamic_conv_layer,
    dynamic_conv_layer_hvp,
    dynamic_conv_layer_jvp,
    dynamic_conv_layer_vjp,
    temperature_schedule,
)
from condconv_ref.linear import (
    cond_linear,
    cond_linear_jvp,
    cond_linear_layer,
    cond_linear_layer_hvp,
    cond_linear_layer_jvp,
    cond_linear_layer_vjp,
    cond_linear_vjp,
    moe_cond_linear,
    moe_cond_linear_jvp,
    moe_cond_linear_vjp,
)
from condconv_ref.memory import (
    MemoryBudgetError,
    get_memory_budget,
    memory_budget,
    set_memory_budget,
)
from condconv_ref.odconv import odconv_layer, odconv_layer_hvp, odconv_layer_jvp, odconv_layer_vjp
from condconv_ref.routing import (
    route_sigmoid,
    route_sigmoid_jvp,
    route_sigmoid_vjp,
    route_softmax,
    route_softmax_jvp,
    route_softmax_vjp,
)

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "MemoryBudgetError",
    "cond_linear",
    "cond_linear_jvp",
    "cond_linear_layer",
    "cond_linear_layer_hvp",
    "cond_linear_layer_jvp",
    "cond_linear_layer_vjp",
    "cond_linear_vjp",
    "condconv",
    "condconv_jvp",
    "condconv_layer",
    "condconv_layer_hvp",
    "condconv_layer_jvp",
    "condconv_layer_vjp",
    "condconv_vjp",
    "conv",
    "conv_jvp",
    "conv_vjp",
    "depthwise_condconv",
    "depthwise_condconv_jvp",
    "depthwise_condconv_layer",
    "depthwise_condconv_layer_hvp",
    "depthwise_condconv_layer_jvp",
    "depthwise_condconv_layer_vjp",
    "depthwise_condconv_vjp",
    "dynamic_conv_layer",
    "dynamic_conv_layer_hvp",
    "dynamic_conv_layer_jvp",
    "dynamic_conv_layer_vjp",
    "get_memory_budget",
    "memory_budget",
    "mix_experts",
    "mix_experts_jvp",
    "mix_experts_vjp",
    "moe_cond_linear",
    "moe_cond_linear_jvp",
    "moe_cond_linear_vjp",
    "moe_condconv",
    "moe_condconv_jvp",
    "moe_condconv_vjp",
    "odconv_layer",
    "odconv_layer_hvp",
    "odconv_layer_jvp",
    "odconv_layer_vjp",
    "route_sigmoid",
    "route_sigmoid_jvp",
    "route_sigmoid_vjp",
    "route_softmax",
    "route_softmax_jvp",
    "route_softmax_vjp",
    "set_memory_budget",
    "temperature_schedule",
]
