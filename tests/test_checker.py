"""``check_implementation``: independent PyTorch layers pass without false alarms, and each
broken one is caught with a minimal case that points at the bug.

The correct layers are the ones in ``examples/`` (grouped-conv batch trick and per-example
loop) plus small ones written here for the other variants; each broken layer overrides one
method of a correct one, the way such bugs are written.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import sys
from pathlib import Path

import numpy as np
import pytest

from condconv_ref import layouts
from condconv_ref.testing import (
    ImplementationMismatch,
    Supports,
    check_implementation,
)
from condconv_ref.variants import reference_forward, reference_vjp

torch = pytest.importorskip("torch")
F = torch.nn.functional
from condconv_ref.testing.torch_adapter import torch_implementation  # noqa: E402

pytestmark = pytest.mark.torch

CI = bool(os.environ.get("CI"))
PASSING_EXAMPLES = 30 if CI else 60
"""Cases per correct implementation: with 6 of them (and 2 at half), 210 to 420 cases in all."""
BUG_EXAMPLES = 40
"""Upper bound on the cases drawn before a broken implementation must fail."""


def _import_example(name):
    examples = str(Path(__file__).resolve().parents[1] / "examples")
    sys.path.insert(0, examples)
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(examples)


condconv_torch = _import_example("condconv_torch")
dynamic_conv_torch = _import_example("dynamic_conv_torch")
CondConv2d, LoopCondConv2d = condconv_torch.CondConv2d, condconv_torch.LoopCondConv2d
DynamicConv2d = dynamic_conv_torch.DynamicConv2d


def _layer(layer_class, supports=condconv_torch.SUPPORTS):
    return torch_implementation(condconv_torch.build(layer_class), condconv_torch.PARAMETERS,
                                supports=supports)


def _dynamic(layer_class):
    def build(case):
        module = dynamic_conv_torch.build(case)
        module.__class__ = layer_class
        return module

    return torch_implementation(build, dynamic_conv_torch.PARAMETERS,
                                supports=condconv_torch.SUPPORTS)


def _failing(implementation, variant, **options):
    report = check_implementation(implementation, variant=variant, max_examples=BUG_EXAMPLES,
                                  raise_on_failure=False, **options)
    assert not report.passed, str(report)
    assert report.variant == variant
    assert report.case is not None and report.case.variant == variant
    return report


def _differing(report):
    return {mismatch.what for mismatch in report.mismatches}


# ---------------------------------------------------------------- correct layers of other variants


def _depthwise_layer():
    """``depthwise_condconv_layer`` as the grouped-trick CondConv2d with groups = C."""

    def build(case):
        n_experts, out_channels, _, *kernel = case.arrays["experts"].shape
        options = case.options
        channels = out_channels // options["depth_multiplier"]
        return CondConv2d(channels, out_channels, tuple(kernel), stride=options["stride"],
                          padding=options["padding"], dilation=options["dilation"],
                          groups=channels, bias="bias" in case.arrays,
                          padding_mode=options["padding_mode"], num_experts=n_experts,
                          routing_bias="route_bias" in case.arrays)

    return torch_implementation(build, condconv_torch.PARAMETERS,
                                supports=condconv_torch.SUPPORTS)


class CondLinear(torch.nn.Module):
    """Linear CondConv: experts flattened to (E, F_out*F_in), one bmm per batch."""

    def __init__(self, in_features, out_features, num_experts, bias):
        super().__init__()
        self.out_features, self.in_features = out_features, in_features
        self.weight = torch.nn.Parameter(torch.zeros(num_experts, out_features * in_features))
        self.bias = torch.nn.Parameter(torch.zeros(num_experts, out_features)) if bias else None
        self.routing = torch.nn.Linear(in_features, num_experts, bias=bias)

    def forward(self, x):
        routing = torch.sigmoid(self.routing(x))
        weight = (routing @ self.weight).view(-1, self.out_features, self.in_features)
        y = torch.bmm(weight, x[:, :, None])[:, :, 0]
        return y if self.bias is None else y + routing @ self.bias


def _linear_layer():
    def build(case):
        n_experts, out_features, in_features = case.arrays["experts"].shape
        return CondLinear(in_features, out_features, n_experts, "bias" in case.arrays)

    return torch_implementation(build, condconv_torch.PARAMETERS)


def _external_routing_condconv():
    """``condconv`` as plain functions of the case (no module, no adapter), in 1 to 3 dims."""
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}

    def run(case, arrays):
        x, experts, routing = arrays["x"], arrays["experts"], arrays["routing"]
        batch, channels, *spatial = x.shape
        out_channels, groups = experts.shape[1], case.options["groups"]
        geometry = case.geometry
        pads = [amount for pair in reversed(geometry.padding) for amount in pair]
        mode = {"zeros": "constant"}.get(geometry.padding_mode, geometry.padding_mode)
        x = F.pad(x.reshape(1, batch * channels, *spatial), pads, mode=mode)
        kernels = torch.tensordot(routing, experts, dims=1)
        kernels = kernels.reshape(batch * out_channels, *experts.shape[2:])
        bias = (routing @ arrays["bias"]).reshape(-1) if "bias" in arrays else None
        y = conv[len(spatial)](x, kernels, bias, stride=geometry.stride,
                               dilation=geometry.dilation, groups=groups * batch)
        return y.reshape(batch, out_channels, *y.shape[2:])

    def forward(case):
        return run(case, {name: torch.from_numpy(a) for name, a in case.arrays.items()})

    def vjp(case, cotangent):
        arrays = {name: torch.from_numpy(a).requires_grad_() for name, a in case.arrays.items()}
        grads = torch.autograd.grad(run(case, arrays), list(arrays.values()),
                                    torch.from_numpy(cotangent))
        return dict(zip(arrays, grads))

    return forward, vjp


# ---------------------------------------------------------------- no false alarms


@pytest.mark.parametrize("variant, make", [
    ("condconv_layer", lambda: _layer(CondConv2d)),
    ("condconv_layer", lambda: _layer(LoopCondConv2d)),
    ("dynamic_conv_layer", dynamic_conv_torch.factory),
    ("depthwise_condconv_layer", _depthwise_layer),
    ("cond_linear_layer", _linear_layer),
], ids=["grouped-trick", "per-example-loop", "dynamic", "depthwise", "linear"])
def test_correct_torch_layers_pass_forward_vjp_jvp_and_hvp(variant, make):
    report = check_implementation(make(), variant=variant, max_examples=PASSING_EXAMPLES)
    assert report.passed and report.checked_vjp and report.checked_jvp and report.checked_hvp
    assert report.examples == PASSING_EXAMPLES
    assert 0 < report.units <= 1
    assert "PASSED" in str(report)


def test_functional_condconv_with_external_routing_passes_in_every_dimension_and_mode():
    forward, vjp = _external_routing_condconv()
    report = check_implementation(forward, vjp=vjp, variant="condconv",
                                  supports=Supports(padding_forms=("int", "per_dim", "pairs",
                                                                   "valid", "same")),
                                  max_examples=PASSING_EXAMPLES)
    assert report.passed, str(report)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_low_precision_layer_passes_with_its_dtype_tolerances(dtype):
    report = check_implementation(_layer(CondConv2d), variant="condconv_layer", dtype=dtype,
                                  max_examples=PASSING_EXAMPLES // 2)
    assert report.passed, str(report)
    assert report.dtype == dtype


def test_float32_arithmetic_fails_a_float64_check():
    """The tolerances are the dtype's: a layer that secretly computes in float32 is not
    float64-accurate."""

    def forward(case):
        return reference_forward(case, dtype="float32")

    report = _failing(forward, "condconv_layer")
    assert _differing(report) == {"output"}
    assert report.mismatches[0].bound < 1e-12


# ---------------------------------------------------------------- broken layers are caught


class IgnoredPadding(CondConv2d):
    """Seeds 000 and 002: the zeros path convolves with ``padding="valid"``."""

    def convolve(self, x, weight, bias, groups):
        if self.padding_mode == "zeros":
            return F.conv2d(x, weight, bias, stride=self.stride, padding="valid",
                            dilation=self.dilation, groups=groups)
        return super().convolve(x, weight, bias, groups)


def test_ignored_zero_padding_is_caught_with_a_minimal_padded_case():
    report = _failing(_layer(IgnoredPadding), "condconv_layer")
    case = report.case
    assert case.options["padding_mode"] == "zeros"
    assert any(before or after for before, after in case.geometry.padding)
    assert case.shapes["x"][0] == 1
    assert report.mismatches[0].what == "output"
    assert "shape" in report.mismatches[0].reason


class UnmixedBias(CondConv2d):
    """Adds the sum of the expert biases instead of the routed mixture."""

    def mixed_parameters(self, routing_weights):
        weight, bias = super().mixed_parameters(routing_weights)
        if bias is None:
            return weight, None
        return weight, self.bias.sum(0).repeat(routing_weights.shape[0])


def test_unmixed_bias_is_caught_on_a_case_with_bias():
    report = _failing(_layer(UnmixedBias), "condconv_layer")
    assert "bias" in report.case.arrays
    assert report.case.shapes["x"][0] == 1
    assert "output" in _differing(report)
    mismatch = report.mismatches[0]
    assert mismatch.index is not None and abs(mismatch.actual - mismatch.reference) > 1e-3


class SoftmaxRouting(CondConv2d):
    """CondConv routed by a softmax over the experts instead of independent sigmoids."""

    def routing_weights(self, x):
        return torch.softmax(self.routing(F.adaptive_avg_pool2d(x, 1).flatten(1)), dim=-1)


def test_softmax_instead_of_sigmoid_routing_is_caught():
    report = _failing(_layer(SoftmaxRouting), "condconv_layer")
    assert report.case.shapes["x"][0] == 1
    assert "output" in _differing(report)


class BatchCrossTalk(CondConv2d):
    """Every example gets the batch-averaged routing: examples leak into each other."""

    def routing_weights(self, x):
        routing = super().routing_weights(x)
        return routing.mean(dim=0, keepdim=True).expand_as(routing)


def test_cross_talk_between_examples_is_caught_on_a_batch_of_two():
    report = _failing(_layer(BatchCrossTalk), "condconv_layer")
    assert report.case.shapes["x"][0] == 2
    assert "output" in _differing(report)


class MisFlattenedExperts(CondConv2d):
    """Reads the flattened (E, O*C/g*kh*kw) storage as if it were (E, C/g, O, kh, kw)."""

    def mixed_parameters(self, routing_weights):
        weight, bias = super().mixed_parameters(routing_weights)
        batch, per_group = routing_weights.shape[0], self.in_channels // self.groups
        weight = weight.reshape(batch, per_group, self.out_channels, *self.kernel_size)
        return weight.transpose(1, 2).reshape(batch * self.out_channels, per_group,
                                              *self.kernel_size), bias


def test_mis_flattened_expert_layout_is_caught_where_the_layouts_differ():
    report = _failing(_layer(MisFlattenedExperts), "condconv_layer")
    _, out_channels, per_group, *_ = report.case.shapes["experts"]
    assert out_channels >= 2 and per_group >= 2  # O = 1 or C/g = 1 read the same either way
    assert report.case.shapes["x"][0] == 1
    assert "output" in _differing(report)


class DetachedRouting(CondConv2d):
    """Routing cut out of the graph: the output is right, its gradients are not."""

    def routing_weights(self, x):
        return super().routing_weights(x).detach()


def test_detached_routing_passes_forward_and_is_caught_by_the_vjp():
    implementation = _layer(DetachedRouting)
    forward_only = check_implementation(implementation.forward, variant="condconv_layer",
                                        supports=condconv_torch.SUPPORTS,
                                        max_examples=BUG_EXAMPLES)
    assert forward_only.passed and not forward_only.checked_vjp
    report = _failing(implementation, "condconv_layer")
    differing = _differing(report)
    assert "output" not in differing
    assert "gradient 'route_weight'" in differing
    assert report.case.shapes["x"][0] == 1


class _Sigmoid(torch.autograd.Function):
    """A sigmoid with hand-written derivatives, its JVP rule given as ``jvp``: forward-mode AD
    runs that rule, reverse mode the backward."""

    @staticmethod
    def forward(logits, jvp):
        return torch.sigmoid(logits)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(output)
        ctx.save_for_forward(output)
        ctx.jvp = inputs[1]

    @staticmethod
    def backward(ctx, grad):
        (y,) = ctx.saved_tensors
        return grad * y * (1 - y), None

    @staticmethod
    def jvp(ctx, tangent, _):
        (y,) = ctx.saved_tensors
        return ctx.jvp(tangent, y)


def _custom_sigmoid_layer(jvp_rule):
    class CustomSigmoidRouting(CondConv2d):
        def routing_weights(self, x):
            return _Sigmoid.apply(self.routing(F.adaptive_avg_pool2d(x, 1).flatten(1)),
                                  jvp_rule)

    return _layer(CustomSigmoidRouting)


def test_a_jvp_rule_is_checked_and_a_wrong_one_caught_while_forward_and_vjp_pass():
    right = check_implementation(_custom_sigmoid_layer(lambda t, y: t * y * (1 - y)),
                                 variant="condconv_layer", max_examples=BUG_EXAMPLES)
    assert right.passed and right.checked_vjp and right.checked_jvp
    assert "forward, VJP, JVP and HVP" in str(right)
    # the rule forgets the factor 1 - y; forward and backward are right
    report = _failing(_custom_sigmoid_layer(lambda t, y: t * y), "condconv_layer")
    assert _differing(report) == {"jvp"}
    assert report.checked_jvp and "jvp differs" in str(report)
    assert report.case.shapes["x"][0] == 1  # shrunk like any failure


def test_without_the_adapters_jvp_a_rule_less_function_is_checked_in_reverse_mode():
    class NoJvpRule(_Sigmoid):
        jvp = torch.autograd.Function.jvp  # the default: raises, "not implemented"

    class Routing(CondConv2d):
        def routing_weights(self, x):
            return NoJvpRule.apply(self.routing(F.adaptive_avg_pool2d(x, 1).flatten(1)), None)

    build = condconv_torch.build(Routing)
    with_jvp = _failing(torch_implementation(build, condconv_torch.PARAMETERS,
                                             supports=condconv_torch.SUPPORTS), "condconv_layer")
    assert [m.what for m in with_jvp.mismatches] == ["jvp"]
    assert "raised" in with_jvp.mismatches[0].reason
    report = check_implementation(torch_implementation(build, condconv_torch.PARAMETERS,
                                                       supports=condconv_torch.SUPPORTS,
                                                       jvp=False),
                                  variant="condconv_layer", max_examples=10)
    assert report.passed and report.checked_vjp and not report.checked_jvp


class _Mix(torch.autograd.Function):
    """``routing @ weight`` whose backward takes the weight detached for the routing's
    gradient: every first derivative right, the second ones silently wrong."""

    @staticmethod
    def forward(routing, weight):
        return routing @ weight

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs)
        ctx.save_for_forward(*inputs)

    @staticmethod
    def backward(ctx, grad):
        routing, weight = ctx.saved_tensors
        return grad @ weight.detach().T, routing.T @ grad

    @staticmethod
    def jvp(ctx, routing_tangent, weight_tangent):
        routing, weight = ctx.saved_tensors
        return routing_tangent @ weight + routing @ weight_tangent


class DetachedWeightMixing(CondConv2d):
    def mixed_parameters(self, routing_weights):
        weight = _Mix.apply(routing_weights, self.weight).view(
            -1, self.in_channels // self.groups, *self.kernel_size)
        bias = None if self.bias is None else (routing_weights @ self.bias).view(-1)
        return weight, bias


def test_a_wrong_double_backward_is_caught_and_shrunk_while_the_first_order_passes():
    implementation = _layer(DetachedWeightMixing)
    first_order = check_implementation(dataclasses.replace(implementation, hvp=None),
                                       variant="condconv_layer", max_examples=BUG_EXAMPLES)
    assert first_order.passed and first_order.checked_jvp and not first_order.checked_hvp
    report = _failing(implementation, "condconv_layer")
    assert report.checked_hvp and "(forward, VJP, JVP and HVP, " in str(report)
    differing = _differing(report)
    assert differing and all(what.startswith("hvp '") for what in differing), differing
    assert min(m.units for m in report.mismatches) > 1e6  # no rounding: a missing term
    assert report.case.shapes["x"][0] == 1  # shrunk like any failure


def test_once_differentiable_is_caught_at_second_order_and_checked_to_first_without_hvp():
    """torch's ``once_differentiable`` raises in double backward only when the incoming
    gradient requires grad; at a fixed cotangent (a gradient penalty's) the backward's result
    is silently a constant, and the second derivatives through it are lost."""

    class OnceDifferentiable(_Sigmoid):
        @staticmethod
        @torch.autograd.function.once_differentiable
        def backward(ctx, grad):
            (y,) = ctx.saved_tensors
            return grad * y * (1 - y), None

    class Routing(CondConv2d):
        def routing_weights(self, x):
            return OnceDifferentiable.apply(self.routing(F.adaptive_avg_pool2d(x, 1).flatten(1)),
                                            lambda t, y: t * y * (1 - y))

    build = condconv_torch.build(Routing)
    with_hvp = _failing(torch_implementation(build, condconv_torch.PARAMETERS,
                                             supports=condconv_torch.SUPPORTS), "condconv_layer")
    assert all(m.what.startswith("hvp '") for m in with_hvp.mismatches), with_hvp
    report = check_implementation(torch_implementation(build, condconv_torch.PARAMETERS,
                                                       supports=condconv_torch.SUPPORTS,
                                                       hvp=False),
                                  variant="condconv_layer", max_examples=10)
    assert report.passed and report.checked_jvp and not report.checked_hvp


class TemperatureMultiplied(DynamicConv2d):
    """Sharpens the softmax with the temperature instead of flattening it: logits * T."""

    def routing_weights(self, x):
        logits = self.fc2(F.relu(self.fc1(F.adaptive_avg_pool2d(x, 1).flatten(1))))
        return torch.softmax(logits * self.temperature, dim=-1)


def test_temperature_applied_the_wrong_way_is_caught():
    report = _failing(_dynamic(TemperatureMultiplied), "dynamic_conv_layer")
    assert report.case.shapes["experts"][0] >= 2  # one expert has routing 1 at any temperature
    assert report.case.options["temperature"] != 1.0
    assert report.case.shapes["x"][0] == 1
    # the routing is wrong: the output shows it, or, where the shrunk experts are equal (the
    # output then does not depend on the routing), the experts' gradient does
    assert _differing(report) & {"output", "gradient 'experts'"}


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_bugs_are_caught_at_low_precision_too(dtype):
    report = _failing(_layer(BatchCrossTalk), "condconv_layer", dtype=dtype)
    assert report.case.shapes["x"][0] == 2
    assert report.case.x.dtype == dtype
    report = _failing(_dynamic(TemperatureMultiplied), "dynamic_conv_layer", dtype=dtype)
    assert report.case.shapes["experts"][0] >= 2


def test_implementation_that_raises_is_a_failure_reported_with_its_case():
    """A 2-D layer run on the default supports (1 to 3 spatial dims) raises on the first
    1-D case; the report names the exception instead of crashing."""
    report = _failing(_layer(CondConv2d, supports=None), "condconv_layer")
    assert report.mismatches[0].what == "forward"
    assert "raised" in report.mismatches[0].reason
    assert len(report.case.shapes["x"]) != 4
    assert "forward: raised" in str(report)


def test_failure_raises_implementation_mismatch_with_the_report():
    with pytest.raises(ImplementationMismatch) as raised:
        check_implementation(_layer(UnmixedBias), variant="condconv_layer",
                             max_examples=BUG_EXAMPLES)
    report = raised.value.report
    assert not report.passed
    text = str(raised.value)
    for expected in ("condconv_layer", "FAILED", "minimal failing case", "worst at",
                     "reference", "x bound", "bias (1, "):
        assert expected in text


def test_the_reference_backend_does_not_change_the_verdict(backend):
    passing = check_implementation(reference_forward, vjp=reference_vjp,
                                   variant="dynamic_conv_layer", max_examples=5,
                                   backend=backend)
    assert passing.passed
    failing = check_implementation(_layer(BatchCrossTalk), variant="condconv_layer",
                                   max_examples=BUG_EXAMPLES, backend=backend,
                                   raise_on_failure=False)
    assert not failing.passed and failing.case.shapes["x"][0] == 2


@pytest.mark.parametrize("options, message", [
    (dict(variant="condconv2d"), "variant must be one of"),
    (dict(variant="condconv", dtype="int8"), "dtype must be one of"),
    (dict(variant="condconv", max_examples=0), "max_examples"),
    (dict(variant="condconv", supports=Supports(max_size=1, padding_forms=("valid",),
                                                max_kernel=3), seed=1), None),
])
def test_bad_arguments_raise_value_error(options, message):
    if message is None:  # supports that admit few cases still work (kernel 1 only)
        assert check_implementation(reference_forward, max_examples=3, **options).passed
        return
    with pytest.raises(ValueError, match=message):
        check_implementation(reference_forward, **options)


def test_gradients_missing_or_extra_are_reported():
    def vjp(case, cotangent):
        grads = reference_vjp(case, cotangent)
        grads.pop("x")
        return {**grads, "weights": np.zeros(1)}

    report = _failing(reference_forward, "condconv", vjp=vjp)
    assert any(m.what == "vjp" and "expected" in m.reason for m in report.mismatches)


def test_layout_converter_from_the_other_framework_is_caught():
    """Loading the flattened experts with TensorFlow's HWIO order into a PyTorch layer."""
    parameters = {**condconv_torch.PARAMETERS,
                  "experts": ("weight", lambda e, case: layouts.to_tf_flat_experts(e))}
    implementation = torch_implementation(condconv_torch.build(CondConv2d), parameters,
                                          supports=condconv_torch.SUPPORTS)
    report = _failing(implementation, "condconv_layer")
    assert "output" in _differing(report)


@pytest.mark.parametrize("options, error, message", [
    (dict(variant=["condconv"]), ValueError, r"variant must be one of"),
    (dict(variant="condconv", supports="everything"), TypeError,
     r"supports must be a condconv_ref.testing.Supports, got 'everything'"),
    (dict(variant="condconv", backend=3), TypeError,
     r"backend must be a backend name or a Backend, got 3"),
    (dict(variant="condconv", raise_on_failure="no"), TypeError,
     r"raise_on_failure must be True or False"),
    (dict(variant="condconv", vjp="reference_vjp"), TypeError, r"vjp must be callable"),
    (dict(variant="condconv", jvp="reference_jvp"), TypeError, r"jvp must be callable"),
])
def test_arguments_of_the_wrong_type_are_named_before_any_case_runs(options, error, message):
    with pytest.raises(error, match=r"^check_implementation: " + message):
        check_implementation(reference_forward, max_examples=2, **options)


def _returning(convert):
    """A forward returning the reference's output passed through ``convert``."""
    return lambda case: convert(np.asarray(reference_forward(case)))


WRONG_KINDS = {
    "complex": (_returning(lambda y: y + 1e6j), "has dtype complex128 (kind 'c')"),
    "torch complex": (_returning(lambda y: torch.from_numpy(y) + 1e6j),
                      "has dtype complex128 (kind 'c')"),
    "integer": (_returning(lambda y: y.astype(np.int64)), "has dtype int64 (kind 'i')"),
    "boolean": (_returning(lambda y: y != 0), "has dtype bool (kind 'b')"),
    "list": (_returning(lambda y: y.tolist()), "is a builtins.list, expected an array"),
    "masked array": (_returning(lambda y: np.ma.masked_array(y + 1e6, mask=np.ones(y.shape))),
                     "is a numpy masked array"),
    "one axis too many": (_returning(lambda y: y[None]), "has shape (1, "),
}


@pytest.mark.parametrize("forward, reason", WRONG_KINDS.values(), ids=WRONG_KINDS.keys())
def test_an_output_of_the_wrong_kind_fails_with_its_reason(forward, reason):
    """The values may be right (or hidden): a result that is not a real floating array of
    the output's shape fails, and nothing is converted away (an imaginary part, a mask)."""
    report = check_implementation(forward, variant="condconv", max_examples=3,
                                  raise_on_failure=False)
    assert not report.passed
    assert reason in report.mismatches[0].reason, report.mismatches[0]


def test_a_gradient_of_the_wrong_kind_fails_with_its_reason():
    def vjp(case, cotangent):
        grads = reference_vjp(case, cotangent)
        return {**grads, "x": np.asarray(grads["x"]).astype(np.int32)}

    report = _failing(reference_forward, "condconv", vjp=vjp)
    (mismatch,) = report.mismatches
    assert mismatch.what == "gradient 'x'" and "has dtype int32 (kind 'i')" in mismatch.reason


def test_module_parameter_the_case_does_not_set_is_named_not_run_with_its_built_values():
    """A layer that always has an expert bias, checked on a case without one: without the
    check it ran with its ``torch.empty`` bias and reported a numeric mismatch."""

    def always_biased(case):
        n_experts, out_features, in_features = case.arrays["experts"].shape
        layer = CondLinear(in_features, out_features, n_experts, bias=True)
        layer.bias = torch.nn.Parameter(torch.empty(n_experts, out_features))
        return layer

    implementation = torch_implementation(always_biased, condconv_torch.PARAMETERS)
    report = check_implementation(implementation, variant="cond_linear_layer", max_examples=20,
                                  raise_on_failure=False)
    assert not report.passed and "bias" not in report.case.arrays
    (mismatch,) = report.mismatches
    assert mismatch.what == "forward"
    assert "module parameter 'bias' is not mapped from the case" in mismatch.reason
    assert "mapped from 'bias', which this case does not have" in mismatch.reason


def test_module_parameter_missing_from_the_mapping_is_named():
    def build(case):
        n_experts, out_features, in_features = case.arrays["experts"].shape
        layer = CondLinear(in_features, out_features, n_experts, "bias" in case.arrays)
        layer.register_parameter("gain", torch.nn.Parameter(torch.ones(())))  # never mapped
        return layer

    implementation = torch_implementation(build, condconv_torch.PARAMETERS)
    report = check_implementation(implementation, variant="cond_linear_layer", max_examples=5,
                                  raise_on_failure=False)
    assert "module parameter 'gain' is not mapped from the case: no case array is " \
           "mapped to it" in str(report)

