"""Bad input raises ValueError or TypeError whose message names the function and the argument.

Each case is run through the forward function and through its VJP.  The VJP
gets a well-formed cotangent placeholder: validation reports the bad argument
before it compares the cotangent with the output shape.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

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
    """``op(*args(backend), **options)`` must raise ``error`` matching ``'^op: ' + pattern``."""

    op: str
    id: str
    args: Callable[[Any], tuple]
    error: type
    pattern: str
    options: dict = None

    def call(self, backend, vjp: bool):
        fn = getattr(condconv_ref, self.op + ("_vjp" if vjp else ""))
        args = self.args(backend)
        if vjp:
            args = (ones(backend, 1),) + args
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

CASES = (CONV_CASES + ROUTING_CASES + MIX_CASES + _condconv_cases("condconv")
         + _condconv_cases("moe_condconv") + LAYER_CASES)


@pytest.mark.parametrize("vjp", [False, True], ids=["forward", "vjp"])
@pytest.mark.parametrize("case", CASES, ids=[f"{c.op}-{c.id}" for c in CASES])
def test_bad_input_raises_with_a_message_naming_function_and_argument(backend, case, vjp):
    fn = case.op + ("_vjp" if vjp else "")
    with pytest.raises(case.error, match=rf"^{fn}: {case.pattern}"):
        case.call(backend, vjp)


# A VJP's cotangent must have the forward output's shape: (op, valid args, output shape).
COTANGENT_CASES = [
    ("conv", _conv(), (2, 4, 3)),
    ("route_sigmoid", lambda b: (ones(b, 2, 3, 4), ones(b, 5, 3)), (2, 5)),
    ("mix_experts", lambda b: (ones(b, 2, 3), ones(b, 3, 4, 5)), (2, 4, 5)),
    ("condconv", _condconv(), (2, 4, 3)),
    ("moe_condconv", _condconv(), (2, 4, 3)),
    ("condconv_layer", _layer(), (2, 4, 3)),
]


@pytest.mark.parametrize(("op", "args", "output_shape"), COTANGENT_CASES,
                         ids=[case[0] for case in COTANGENT_CASES])
def test_vjp_rejects_a_cotangent_of_the_wrong_shape(backend, op, args, output_shape):
    forward, vjp = getattr(condconv_ref, op), getattr(condconv_ref, op + "_vjp")
    assert tuple(forward(*args(backend)).shape) == output_shape
    wrong = output_shape[:-1] + (output_shape[-1] + 1,)
    with pytest.raises(ValueError, match=rf"^{op}_vjp: cotangent has shape {wrong}".replace(
            "(", r"\(").replace(")", r"\)")):
        vjp(ones(backend, *wrong), *args(backend))
    with pytest.raises(TypeError, match=rf"^{op}_vjp: cotangent has dtype"):
        vjp(ones(backend, *output_shape, dtype="float32"), *args(backend))


def test_arrays_on_two_devices_are_rejected(backend):
    if not backend.name.startswith("array_api_strict"):
        pytest.skip("needs two devices of one namespace (array-api-strict)")
    other = get_backend("array_api_strict" if backend.device is not None
                        else "array_api_strict:device1")
    with pytest.raises(ValueError, match=r"^condconv: routing is on device .* all arrays must be"):
        condconv_ref.condconv(ones(backend, 2, 3, 5), ones(backend, 2, 4, 3, 3),
                              ones(other, 2, 2))
