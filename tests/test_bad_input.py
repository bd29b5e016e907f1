"""Bad input raises ValueError or TypeError whose message names the function and the argument.

One table covers every public op taking arrays.  Each case is run through the
forward function and through its VJP.  The VJP gets a cotangent placeholder
(of the output's shape where a case names it): validation reports the bad
argument before it compares the cotangent with the output shape.  One more
test checks that every VJP rejects a cotangent of the wrong shape or dtype.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import math
import re

import numpy as np
import pytest

import condconv_ref
from condconv_ref.backends import get_backend


def ones(backend, *shape, dtype="float64"):
    return backend.asarray(np.ones(shape), dtype=dtype)


def foreign(backend, *shape):
    """An array of another namespace than the backend's: NumPy, or array-api-strict for NumPy."""
    other = "array_api_strict" if backend.name == "numpy" else "numpy"
    return ones(get_backend(other), *shape)


@dataclass(frozen=True)
class Case:
    """``op(*args(backend), **options)`` must raise ``error`` matching ``'^op: ' + pattern``.

    The VJP gets a cotangent of shape ``cotangent`` first.
    """

    op: str
    id: str
    args: Callable[[Any], tuple]
    error: type
    pattern: str
    options: dict = None
    cotangent: tuple = (1,)

    def call(self, backend, vjp: bool):
        fn = getattr(condconv_ref, self.op + ("_vjp" if vjp else ""))
        args = self.args(backend)
        if vjp:
            args = (ones(backend, *self.cotangent),) + args
        return fn(*args, **(self.options or {}))


# conv: x (2, 3, 5), kernel (4, 3, 3), bias (4,)
def _conv(x=(2, 3, 5), kernel=(4, 3, 3), bias=(4,)):
    return lambda b: (ones(b, *x), ones(b, *kernel), None if bias is None else ones(b, *bias))


# condconv / moe_condconv: x (2, 3, 5), experts (E=2, 4, 3, 3), routing (2, 2), bias (2, 4)
def _condconv(x=(2, 3, 5), experts=(2, 4, 3, 3), routing=(2, 2), bias=(2, 4)):
    return lambda b: (ones(b, *x), ones(b, *experts), ones(b, *routing),
                      None if bias is None else ones(b, *bias))


def _layer(x=(2, 3, 5), **shapes):
    shapes = {"experts": (2, 4, 3, 3), "route_weight": (2, 3), "bias": (2, 4),
              "route_bias": (2,)} | shapes
    return lambda b: (ones(b, *x), {k: ones(b, *s) for k, s in shapes.items() if s is not None})


def _mixed_namespaces(name):
    return rf"all arrays must come from one array namespace, got .*\b{name} is (numpy|array_api_strict)\."


CONV_CASES = [
    Case("conv", "x-rank", _conv(x=(2, 3)), ValueError, r"x has 2 dims, expected 3 or 4 or 5"),
    Case("conv", "x-rank-6", _conv(x=(1, 1, 2, 2, 2, 2)), ValueError, r"x has 6 dims"),
    Case("conv", "kernel-rank", _conv(kernel=(4, 3)), ValueError, r"kernel has 2 dims"),
    Case("conv", "kernel-batch", _conv(kernel=(3, 4, 3, 3)), ValueError,
         r"kernel has batch size 3, expected 2"),
    Case("conv", "kernel-channels", _conv(kernel=(4, 2, 3)), ValueError,
         r"kernel has 2 input channels per group, expected 3"),
    Case("conv", "groups-divide-in", _conv(kernel=(4, 1, 3)), ValueError,
         r"groups=2 must divide.*input channels \(3\)", {"groups": 2}),
    Case("conv", "groups-divide-out", _conv(x=(2, 4, 5), kernel=(3, 2, 3), bias=(3,)),
         ValueError, r"groups=2 must divide.*output channels \(3\)", {"groups": 2}),
    Case("conv", "groups-zero", _conv(), ValueError, r"groups must be >= 1", {"groups": 0}),
    Case("conv", "bias-shape", _conv(bias=(3,)), ValueError, r"bias has shape \(3,\), expected \(4,\)"),
    Case("conv", "bias-batch", _conv(bias=(3, 4)), ValueError,
         r"bias has shape \(3, 4\), expected \(2, 4\)"),
    Case("conv", "x-int", lambda b: (ones(b, 2, 3, 5, dtype="int64"), ones(b, 4, 3, 3)),
         TypeError, r"x has dtype .*int64.*expected a real floating dtype"),
    Case("conv", "mixed-dtype", lambda b: (ones(b, 2, 3, 5), ones(b, 4, 3, 3, dtype="float32")),
         TypeError, r"kernel has dtype .*float32.* but x has .*float64"),
    Case("conv", "x-list", lambda b: ([[[1.0] * 5] * 3] * 2, ones(b, 4, 3, 3)), TypeError,
         r"x must be an array, got builtins.list"),
    Case("conv", "two-namespaces", lambda b: (ones(b, 2, 3, 5), foreign(b, 4, 3, 3)), TypeError,
         _mixed_namespaces("kernel")),
    Case("conv", "stride-zero", _conv(), ValueError, r"stride must be >= 1", {"stride": 0}),
    Case("conv", "stride-negative", _conv(), ValueError, r"stride must be >= 1", {"stride": (-1,)}),
    Case("conv", "stride-float", _conv(), TypeError, r"stride must be an int", {"stride": 1.5}),
    Case("conv", "stride-length", _conv(), TypeError, r"stride must be an int or 1 ints",
         {"stride": (1, 1)}),
    Case("conv", "dilation-zero", _conv(), ValueError, r"dilation must be >= 1", {"dilation": 0}),
    Case("conv", "padding-mode", _conv(), ValueError,
         r"padding_mode must be one of .*got 'mirror'", {"padding_mode": "mirror"}),
    Case("conv", "reflect-as-large-as-input", _conv(x=(2, 3, 3)), ValueError,
         r"reflect padding \(3, 3\) on spatial dim 0 must be smaller than the input size 3",
         {"padding": 3, "padding_mode": "reflect"}),
    Case("conv", "circular-larger-than-input", _conv(x=(2, 3, 3)), ValueError,
         r"circular padding \(0, 4\) .* at most the input size 3",
         {"padding": ((0, 4),), "padding_mode": "circular"}),
    Case("conv", "padding-string", _conv(), ValueError, r"padding must be 'valid', 'same'.*'full'",
         {"padding": "full"}),
    Case("conv", "padding-negative", _conv(), ValueError, r"padding must be >= 0",
         {"padding": -1}),
    Case("conv", "padding-pair-length", _conv(), TypeError, r"padding pairs must be \(before, after\)",
         {"padding": ((1, 2, 3),)}),
    Case("conv", "empty-output", _conv(x=(2, 3, 2)), ValueError,
         r"padded input size 2 on spatial dim 0 is smaller than the dilated kernel extent 3"),
]

ROUTING_CASES = [
    Case("route_sigmoid", "x-rank", lambda b: (ones(b, 3), ones(b, 2, 3)), ValueError,
         r"x has 1 dims"),
    Case("route_sigmoid", "weight-rank", lambda b: (ones(b, 2, 3, 4), ones(b, 3)), ValueError,
         r"weight has 1 dims, expected 2 \(E, C\)"),
    Case("route_sigmoid", "weight-channels", lambda b: (ones(b, 2, 3, 4), ones(b, 2, 4)),
         ValueError, r"weight has shape \(2, 4\), expected \(2, 3\)"),
    Case("route_sigmoid", "no-experts", lambda b: (ones(b, 2, 3, 4), ones(b, 0, 3)), ValueError,
         r"weight has E=0 experts, expected E >= 1"),
    Case("route_sigmoid", "bias-shape", lambda b: (ones(b, 2, 3, 4), ones(b, 2, 3), ones(b, 3)),
         ValueError, r"bias has shape \(3,\), expected \(2,\)"),
    Case("route_sigmoid", "x-int",
         lambda b: (ones(b, 2, 3, 4, dtype="int32"), ones(b, 2, 3)), TypeError, r"x has dtype"),
    Case("route_sigmoid", "two-namespaces", lambda b: (ones(b, 2, 3, 4), foreign(b, 2, 3)),
         TypeError, _mixed_namespaces("weight")),
]

MIX_CASES = [
    Case("mix_experts", "routing-rank", lambda b: (ones(b, 2), ones(b, 2, 3)), ValueError,
         r"routing has 1 dims, expected 2 \(B, E\)"),
    Case("mix_experts", "routing-experts", lambda b: (ones(b, 2, 3), ones(b, 2, 5)), ValueError,
         r"routing has shape \(2, 3\), expected \(2, 2\)"),
    Case("mix_experts", "no-experts", lambda b: (ones(b, 2, 0), ones(b, 0, 5)), ValueError,
         r"experts has shape \(0, 5\), expected \(E, \*s\) with E >= 1"),
    Case("mix_experts", "routing-int", lambda b: (ones(b, 2, 2, dtype="int64"), ones(b, 2, 5)),
         TypeError, r"routing has dtype"),
    Case("mix_experts", "two-namespaces", lambda b: (foreign(b, 2, 2), ones(b, 2, 5)),
         TypeError, _mixed_namespaces("routing")),
]


def _condconv_cases(op):
    return [
        Case(op, "x-rank", _condconv(x=(2, 3)), ValueError, r"x has 2 dims"),
        Case(op, "experts-rank", _condconv(experts=(4, 3, 3)), ValueError,
             r"experts has 3 dims, expected 4 for 1-D input \(E, O, I/groups, kw\)"),
        Case(op, "no-experts", _condconv(experts=(0, 4, 3, 3), routing=(2, 0), bias=None),
             ValueError, r"experts has E=0, expected E >= 1"),
        Case(op, "routing-batch", _condconv(routing=(3, 2)), ValueError,
             r"routing has shape \(3, 2\), expected \(2, 2\)"),
        Case(op, "routing-experts", _condconv(routing=(2, 3)), ValueError,
             r"routing has shape \(2, 3\), expected \(2, 2\)"),
        Case(op, "bias-shape", _condconv(bias=(4,)), ValueError,
             r"bias has shape \(4,\), expected \(2, 4\)"),
        Case(op, "experts-channels", _condconv(experts=(2, 4, 2, 3)), ValueError,
             r"experts has 2 input channels per group, expected 3"),
        Case(op, "groups-divide", _condconv(experts=(2, 4, 1, 3)), ValueError,
             r"groups=2 must divide", {"groups": 2}),
        Case(op, "routing-int",
             lambda b: (ones(b, 2, 3, 5), ones(b, 2, 4, 3, 3), ones(b, 2, 2, dtype="int64")),
             TypeError, r"routing has dtype"),
        Case(op, "two-namespaces",
             lambda b: (ones(b, 2, 3, 5), ones(b, 2, 4, 3, 3), foreign(b, 2, 2)), TypeError,
             _mixed_namespaces("routing")),
        Case(op, "dilation-negative", _condconv(), ValueError, r"dilation must be >= 1",
             {"dilation": -2}),
        Case(op, "padding-mode", _condconv(), ValueError, r"padding_mode must be one of",
             {"padding_mode": "symmetric"}),
        Case(op, "reflect-as-large-as-input", _condconv(x=(2, 3, 4)), ValueError,
             r"reflect padding \(4, 4\)", {"padding": 4, "padding_mode": "reflect"}),
        Case(op, "padding-string", _condconv(), ValueError, r"padding must be 'valid', 'same'",
             {"padding": "SAME"}),
    ]


LAYER_CASES = [
    Case("condconv_layer", "params-not-mapping", lambda b: (ones(b, 2, 3, 5), [ones(b, 2)]),
         TypeError, r"params must be a mapping of arrays, got list"),
    Case("condconv_layer", "params-missing-route-weight", _layer(route_weight=None), ValueError,
         r"params is missing the required keys \['route_weight'\]"),
    Case("condconv_layer", "params-missing-experts", _layer(experts=None), ValueError,
         r"params is missing the required keys \['experts'\]"),
    Case("condconv_layer", "params-unknown-key", _layer(gate=(2,)), ValueError,
         r"params has unknown keys \['gate'\]"),
    Case("condconv_layer", "route-weight-shape", _layer(route_weight=(2, 4)), ValueError,
         r"route_weight has shape \(2, 4\), expected \(2, 3\)"),
    Case("condconv_layer", "route-weight-experts", _layer(route_weight=(3, 3)), ValueError,
         r"route_weight has shape \(3, 3\), expected \(2, 3\)"),
    Case("condconv_layer", "route-bias-shape", _layer(route_bias=(3,)), ValueError,
         r"route_bias has shape \(3,\), expected \(2,\)"),
    Case("condconv_layer", "bias-shape", _layer(bias=(2, 5)), ValueError,
         r"bias has shape \(2, 5\), expected \(2, 4\)"),
    Case("condconv_layer", "x-rank", _layer(x=(2, 3)), ValueError, r"x has 2 dims"),
    Case("condconv_layer", "experts-int",
         lambda b: (ones(b, 2, 3, 5), {"experts": ones(b, 2, 4, 3, 3, dtype="int64"),
                                       "route_weight": ones(b, 2, 3)}),
         TypeError, r"experts has dtype"),
    Case("condconv_layer", "two-namespaces",
         lambda b: (ones(b, 2, 3, 5), {"experts": ones(b, 2, 4, 3, 3),
                                       "route_weight": foreign(b, 2, 3)}),
         TypeError, _mixed_namespaces("route_weight")),
    Case("condconv_layer", "stride-zero", _layer(), ValueError, r"stride must be >= 1",
         {"stride": 0}),
]

# depthwise_condconv: x (2, 3, 6), experts (E=2, C·m=6, 1, 3) for m = 2, routing (2, 2),
# bias (2, 6)
def _depthwise(x=(2, 3, 6), experts=(2, 6, 1, 3), routing=(2, 2), bias=(2, 6)):
    return _condconv(x, experts, routing, bias)


def _depthwise_case(id, error, message, args=_depthwise(), **options):
    """A case whose ``message`` appears anywhere in the error, after the function's name."""
    return Case("depthwise_condconv", id, args, error, ".*" + re.escape(message),
                {"depth_multiplier": 2} | options, cotangent=(2, 6, 4))


def _depthwise_layer_case(id, message, **shapes):
    shapes = {"experts": (2, 6, 1, 3), "route_weight": (2, 3), "bias": None,
              "route_bias": None} | shapes
    return Case("depthwise_condconv_layer", id, _layer(x=(2, 3, 6), **shapes), ValueError,
                ".*" + re.escape(message), {"depth_multiplier": 2}, cotangent=(2, 6, 4))


DEPTHWISE_CASES = [
    _depthwise_case("multiplier-0", ValueError, "depth_multiplier must be >= 1",
                    depth_multiplier=0),
    _depthwise_case("multiplier--1", ValueError, "depth_multiplier must be >= 1",
                    depth_multiplier=-1),
    _depthwise_case("multiplier-float", TypeError, "depth_multiplier must be an int",
                    depth_multiplier=2.0),
    _depthwise_case("multiplier-bool", TypeError, "depth_multiplier must be an int",
                    depth_multiplier=True),
    _depthwise_case("multiplier-mismatch", ValueError,
                    "experts has shape (2, 6, 1, 3), expected (2, 9, 1, 3)", depth_multiplier=3),
    _depthwise_case("grouped-experts", ValueError,
                    "experts has shape (2, 3, 2, 3), expected (2, 6, 1, 3)",
                    _depthwise(experts=(2, 3, 2, 3))),
    _depthwise_case("experts-ndim", ValueError, "experts has 5 dims, expected 4",
                    _depthwise(experts=(2, 6, 1, 3, 3))),
    _depthwise_case("x-ndim", ValueError, "x has 2 dims", _depthwise(x=(2, 3))),
    _depthwise_case("routing-experts", ValueError, "routing has shape (2, 3)",
                    _depthwise(routing=(2, 3))),
    _depthwise_case("routing-batch", ValueError, "routing has shape (1, 2)",
                    _depthwise(routing=(1, 2))),
    _depthwise_case("bias-shape", ValueError, "bias has shape (2, 3), expected (2, 6)",
                    _depthwise(bias=(2, 3))),
    _depthwise_case("kernel-too-large", ValueError, "dilated kernel extent 7",
                    _depthwise(experts=(2, 6, 1, 7))),
    _depthwise_layer_case("route-weight", "route_weight has shape (2, 4), expected (2, 3)",
                          route_weight=(2, 4)),
    _depthwise_layer_case("experts", "experts has shape (2, 3, 1, 3), expected (2, 6, 1, 3)",
                          experts=(2, 3, 1, 3)),
    _depthwise_layer_case("route-bias", "route_bias has shape (3,)", route_bias=(3,)),
    _depthwise_layer_case("unknown-key", "params has unknown keys ['gate']", gate=(2,)),
    _depthwise_layer_case("missing-experts", "params is missing the required keys ['experts']",
                          experts=None),
]


# cond_linear / moe_cond_linear: x (2, 4), experts (E=3, 5, 4), routing (2, 3), bias (3, 5)
def _linear(x=(2, 4), experts=(3, 5, 4), routing=(2, 3), bias=(3, 5), routing_dtype="float64"):
    return lambda b: (ones(b, *x), ones(b, *experts), ones(b, *routing, dtype=routing_dtype),
                      None if bias is None else ones(b, *bias))


def _linear_cases(op):
    return [Case(op, id, args, error, pattern, cotangent=(2, 5)) for id, args, error, pattern in [
        ("x-features", _linear(x=(2, 6)), ValueError,
         r"experts has shape \(3, 5, 4\), expected \(3, 5, 6\) \(E, F_out, F_in\) "
         r"with F_in=6 from x"),
        ("x-rank", _linear(x=(2, 4, 1)), ValueError, r"x has 3 dims, expected 2 \(B, F_in\)"),
        ("experts-rank", _linear(experts=(3, 20)), ValueError,
         r"experts has 2 dims, expected 3 \(E, F_out, F_in\)"),
        ("no-experts", _linear(experts=(0, 5, 4), routing=(2, 0), bias=None), ValueError,
         r"experts has E=0, expected E >= 1"),
        ("routing-experts", _linear(routing=(2, 4)), ValueError,
         r"routing has shape \(2, 4\), expected \(2, 3\) \(B, E\) with B=2 from x and "
         r"E=3 from experts"),
        ("routing-batch", _linear(routing=(1, 3)), ValueError,
         r"routing has shape \(1, 3\), expected \(2, 3\)"),
        ("bias-shape", _linear(bias=(3, 4)), ValueError,
         r"bias has shape \(3, 4\), expected \(3, 5\) \(E, F_out\)"),
        ("mixed-dtype", _linear(routing_dtype="float32"), TypeError,
         r"routing has dtype .*float32.* but x has .*float64"),
        ("x-list", lambda b: ([[1.0] * 4] * 2,) + _linear()(b)[1:], TypeError,
         r"x must be an array"),
    ]]


def _linear_layer(x=(2, 4), **shapes):
    shapes = {"experts": (3, 5, 4), "route_weight": (3, 4), "bias": (3, 5),
              "route_bias": (3,)} | shapes
    return _layer(x=x, **shapes)


LINEAR_LAYER_CASES = [Case("cond_linear_layer", id, args, error, pattern, cotangent=(2, 5))
                      for id, args, error, pattern in [
    ("route-weight-features", _linear_layer(route_weight=(3, 5)), ValueError,
     r"route_weight has shape \(3, 5\), expected \(3, 4\) \(E, F_in\) with E=3 "
     r"from experts and F_in=4 from x"),
    ("route-weight-rank", _linear_layer(route_weight=(12,)), ValueError,
     r"route_weight has 1 dims, expected 2 \(E, F_in\)"),
    ("route-bias-shape", _linear_layer(route_bias=(4,)), ValueError,
     r"route_bias has shape \(4,\), expected \(3,\) \(E,\)"),
    ("experts-features", _linear_layer(experts=(3, 5, 6)), ValueError,
     r"experts has shape \(3, 5, 6\), expected \(3, 5, 4\)"),
    ("missing-experts", _linear_layer(experts=None), ValueError,
     r"params is missing the required keys \['experts'\]"),
    ("unknown-key", _linear_layer(fc1_weight=(2, 4)), ValueError,
     r"params has unknown keys \['fc1_weight'\]"),
    ("params-not-mapping", lambda b: (ones(b, 2, 4), [ones(b, 3, 5, 4)]), TypeError,
     r"params must be a mapping"),
]]


# route_softmax: x (2, 3, 4), fc1_weight (H=5, 3), fc2_weight (E=4, 5), fc1_bias (5,), fc2_bias (4,)
_SOFTMAX = {"x": (2, 3, 4), "fc1_weight": (5, 3), "fc2_weight": (4, 5), "fc1_bias": (5,),
            "fc2_bias": (4,)}


def _softmax(**shapes):
    shapes = _SOFTMAX | shapes
    return lambda b: tuple(ones(b, *shape) for shape in shapes.values())


def _dynamic(x=(2, 3, 4), dtypes=None, **shapes):
    """x and the params of dynamic_conv_layer: experts (E=4, 2, 3, 3), bias (4, 2), fc layers."""
    shapes = {"experts": (4, 2, 3, 3), "bias": (4, 2)} | {
        k: v for k, v in _SOFTMAX.items() if k != "x"} | shapes
    dtypes = dtypes or {}
    return lambda b: (ones(b, *x), {k: ones(b, *s, dtype=dtypes.get(k, "float64"))
                                    for k, s in shapes.items() if s is not None})


def _dynamic_case(id, args, error, pattern, **options):
    return Case("dynamic_conv_layer", id, args, error, pattern, options, cotangent=(2, 2, 2))


BAD_TEMPERATURES = [(0.0, ValueError), (-1.0, ValueError), (math.inf, ValueError),
                    (math.nan, ValueError), ("1.0", TypeError), (None, TypeError)]

DYNAMIC_CASES = [
    *(Case("route_softmax", f"temperature-{t}", lambda b: _softmax()(b)[:3], error,
           r"temperature must be",
           {"temperature": t}, cotangent=(2, 4)) for t, error in BAD_TEMPERATURES),
    *(_dynamic_case(f"temperature-{t}", _dynamic(), error, r"temperature must be", temperature=t)
      for t, error in BAD_TEMPERATURES),
    *(Case("route_softmax", id, _softmax(**shapes), ValueError, pattern, cotangent=(2, 4))
      for id, shapes, pattern in [
          ("hidden-0", {"fc1_weight": (0, 3), "fc2_weight": (4, 0)},
           r"fc1_weight has shape \(0, 3\), a hidden width of H=0; expected \(H, C\) with H >= 1"),
          ("fc1-channels", {"fc1_weight": (5, 2)},
           r"fc1_weight has shape \(5, 2\), expected \(5, 3\) \(H, C\) with C=3"),
          ("fc2-hidden", {"fc2_weight": (4, 6)},
           r"fc2_weight has shape \(4, 6\), expected \(4, 5\) \(E, H\) with H=5"),
          ("no-experts", {"fc2_weight": (0, 5)}, r"fc2_weight has shape \(0, 5\), E=0 experts"),
          ("fc1-bias", {"fc1_bias": (4,)}, r"fc1_bias has shape \(4,\), expected \(5,\)"),
          ("fc2-bias", {"fc2_bias": (5,)}, r"fc2_bias has shape \(5,\), expected \(4,\)"),
          ("fc1-rank", {"fc1_weight": (5, 3, 1)}, r"fc1_weight has 3 dims, expected 2"),
          ("x-rank", {"x": (2, 3, 1, 1, 1, 1)}, r"x has 6 dims, expected 2 or 3 or 4 or 5"),
      ]),
    *(_dynamic_case(id, _dynamic(**shapes), error, pattern) for id, shapes, error, pattern in [
        ("hidden-0", {"fc1_weight": (0, 3), "fc2_weight": (4, 0)}, ValueError,
         r"fc1_weight has shape \(0, 3\), a hidden width of H=0"),
        ("fc2-experts", {"fc2_weight": (3, 5), "fc2_bias": (3,)}, ValueError,
         r"fc2_weight has shape \(3, 5\), expected \(E, H\) with E=4 from experts"),
        ("fc1-channels", {"fc1_weight": (5, 2)}, ValueError,
         r"fc1_weight has shape \(5, 2\), expected \(5, 3\)"),
        ("experts-channels", {"experts": (4, 2, 2, 3)}, ValueError,
         r"experts has 2 input channels per group, expected 3"),
        ("experts-rank", {"experts": (4, 2, 3)}, ValueError, r"experts has 3 dims, expected 4"),
        ("bias-shape", {"bias": (4, 3)}, ValueError, r"bias has shape \(4, 3\), expected \(4, 2\)"),
        ("unknown-key", {"route_weight": (4, 5)}, ValueError,
         r"params has unknown keys \['route_weight'\]"),
        ("missing-fc2", {"fc2_weight": None}, ValueError,
         r"params is missing the required keys \['fc2_weight'\]"),
    ]),
    _dynamic_case("x-rank", _dynamic(x=(2, 3)), ValueError, r"x has 2 dims, expected 3 or 4 or 5"),
    _dynamic_case("params-not-mapping",
                  lambda b: (ones(b, 2, 3, 4), list(_dynamic()(b)[1].values())),
                  TypeError, r"params must be a mapping"),
    _dynamic_case("fc1-bias-dtype", _dynamic(dtypes={"fc1_bias": "float32"}), TypeError,
                  r"fc1_bias has dtype"),
]


CASES = (CONV_CASES + ROUTING_CASES + MIX_CASES + _condconv_cases("condconv")
         + _condconv_cases("moe_condconv") + LAYER_CASES + DEPTHWISE_CASES
         + _linear_cases("cond_linear") + _linear_cases("moe_cond_linear") + LINEAR_LAYER_CASES
         + DYNAMIC_CASES)


@pytest.mark.parametrize("vjp", [False, True], ids=["forward", "vjp"])
@pytest.mark.parametrize("case", CASES, ids=[f"{c.op}-{c.id}" for c in CASES])
def test_bad_input_raises_with_a_message_naming_function_and_argument(backend, case, vjp):
    fn = case.op + ("_vjp" if vjp else "")
    with pytest.raises(case.error, match=rf"^{fn}: {case.pattern}"):
        case.call(backend, vjp)


@dataclass(frozen=True)
class CotangentCase:
    """Valid ``args`` of ``op``, whose output has ``output_shape``; ``wrong`` is a cotangent shape
    its VJP must reject with ``pattern`` (default: the output's shape with one more in its last
    axis, rejected as ``cotangent has shape <wrong>, expected <output_shape>``)."""

    op: str
    args: Callable[[Any], tuple]
    output_shape: tuple
    options: dict = None
    wrong: tuple = None
    pattern: str = None

    @property
    def wrong_shape(self):
        return self.wrong or self.output_shape[:-1] + (self.output_shape[-1] + 1,)

    @property
    def message(self):
        return self.pattern or re.escape(f"cotangent has shape {self.wrong_shape}, "
                                         f"expected {self.output_shape}")


COTANGENT_CASES = [
    CotangentCase("conv", _conv(), (2, 4, 3)),
    CotangentCase("route_sigmoid", lambda b: (ones(b, 2, 3, 4), ones(b, 5, 3)), (2, 5)),
    CotangentCase("route_softmax", lambda b: _softmax()(b)[:3], (2, 4), wrong=(2, 3)),
    CotangentCase("mix_experts", lambda b: (ones(b, 2, 3), ones(b, 3, 4, 5)), (2, 4, 5)),
    CotangentCase("condconv", _condconv(), (2, 4, 3)),
    CotangentCase("moe_condconv", _condconv(), (2, 4, 3)),
    CotangentCase("condconv_layer", _layer(), (2, 4, 3)),
    CotangentCase("depthwise_condconv", _depthwise(), (2, 6, 4), {"depth_multiplier": 2},
                  wrong=(2, 3, 4)),
    CotangentCase("cond_linear", _linear(), (2, 5), wrong=(2, 4),
                  pattern=r"cotangent has shape \(2, 4\), expected \(2, 5\) \(B, F_out\), "
                          r"the output shape"),
    CotangentCase("cond_linear_layer", _linear_layer(bias=None, route_bias=None), (2, 5),
                  wrong=(10,), pattern=r"cotangent has 1 dims"),
    CotangentCase("dynamic_conv_layer", _dynamic(), (2, 2, 2)),
]


@pytest.mark.parametrize("case", COTANGENT_CASES, ids=[case.op for case in COTANGENT_CASES])
def test_vjp_rejects_a_cotangent_of_the_wrong_shape_or_dtype(backend, case):
    forward = getattr(condconv_ref, case.op)
    vjp = getattr(condconv_ref, case.op + "_vjp")
    options = case.options or {}
    assert tuple(forward(*case.args(backend), **options).shape) == case.output_shape
    with pytest.raises(ValueError, match=rf"^{case.op}_vjp: {case.message}"):
        vjp(ones(backend, *case.wrong_shape), *case.args(backend), **options)
    with pytest.raises(TypeError, match=rf"^{case.op}_vjp: cotangent has dtype"):
        vjp(ones(backend, *case.output_shape, dtype="float32"), *case.args(backend), **options)


def test_arrays_on_two_devices_are_rejected(backend):
    if not backend.name.startswith("array_api_strict"):
        pytest.skip("needs two devices of one namespace (array-api-strict)")
    other = get_backend("array_api_strict" if backend.device is not None
                        else "array_api_strict:device1")
    with pytest.raises(ValueError, match=r"^condconv: routing is on device .* all arrays must be"):
        condconv_ref.condconv(ones(backend, 2, 3, 5), ones(backend, 2, 4, 3, 3),
                              ones(other, 2, 2))


NUMPY_SUBCLASSES = {
    "masked array": (lambda a: np.ma.masked_array(a, mask=np.zeros(a.shape, dtype=bool)),
                     r"x is a numpy\.ma(\.core)?\.MaskedArray, expected a plain numpy\.ndarray"),
    "matrix": (lambda a: np.asmatrix(a[0]), r"x must be an array, got numpy\.matrix"),
}


@pytest.mark.parametrize("vjp", [False, True], ids=["forward", "vjp"])
@pytest.mark.parametrize("subclass, message", NUMPY_SUBCLASSES.values(),
                         ids=NUMPY_SUBCLASSES.keys())
def test_numpy_subclasses_are_refused_at_the_boundary(subclass, message, vjp):
    """A masked array (whose mask the array API would ignore) used to fail deep inside NumPy
    ("operands could not be broadcast"); a matrix (always 2-D) is no array API array."""
    x = subclass(np.ones((2, 3, 5)))
    kernel = np.ones((4, 3, 3))
    with pytest.raises(TypeError, match=("^conv_vjp: " if vjp else "^conv: ") + message):
        if vjp:
            condconv_ref.conv_vjp(np.ones((2, 4, 3)), x, kernel)
        else:
            condconv_ref.conv(x, kernel)


def test_a_memmap_is_a_plain_array(tmp_path):
    x = np.memmap(tmp_path / "x", dtype="float64", mode="w+", shape=(2, 3, 5))
    x[:] = 1.0
    assert condconv_ref.conv(x, np.ones((4, 3, 3))).shape == (2, 4, 3)


def test_params_keys_of_mixed_types_are_named():
    """Two unknown keys of different types used to fail inside sorted() with '<' not
    supported."""
    params = {"experts": np.ones((2, 4, 3, 3)), "route_weight": np.ones((2, 3)),
              0: np.ones(1), "gate": np.ones(1)}
    with pytest.raises(TypeError, match=r"^condconv_layer: params has keys that are not "
                                        r"strings \[0\]"):
        condconv_ref.condconv_layer(np.ones((2, 3, 5)), params)


@pytest.mark.parametrize("tolerance", [-1e-3, float("nan"), float("inf")])
@pytest.mark.parametrize("name", ["rtol", "atol"])
def test_a_tolerance_must_be_finite_and_non_negative(name, tolerance):
    from condconv_ref.testing import assert_close, check_vjp

    x = np.ones(3)
    with pytest.raises(ValueError, match=rf"^assert_close: {name} must be finite and >= 0"):
        assert_close(x, x + 1.0, **{name: tolerance})
    with pytest.raises(ValueError, match=rf"^check_vjp: {name} must be finite and >= 0"):
        check_vjp(lambda x: 2 * x, lambda c, x: {"x": 3 * c}, {"x": x}, **{name: tolerance})
