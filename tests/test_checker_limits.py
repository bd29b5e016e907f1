"""What an implementation can declare to the checker: the cases it supports (fields and a
predicate), the cases it declines (:class:`Unsupported`), and how its failures read."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest

pytest.importorskip("hypothesis")

from condconv_ref import golden  # noqa: E402
from condconv_ref.testing import (  # noqa: E402
    ImplementationMismatch,
    Supports,
    Unsupported,
    check_implementation,
)
from condconv_ref.variants import reference_forward, reference_vjp  # noqa: E402


# ---------------------------------------------------------------- declining a case


def _no_circular(case):
    if case.options["padding_mode"] == "circular":
        raise Unsupported("no circular padding")
    return reference_forward(case)


def test_declined_cases_are_counted_never_passed_or_failed():
    report = check_implementation(_no_circular, variant="condconv_layer", max_examples=40)
    assert report.passed
    assert 0 < report.declined < report.examples
    assert f"{report.declined} declined" in str(report)
    assert report.to_json()["declined"] == report.declined


def test_declining_every_case_fails():
    def declines(case):
        raise Unsupported("nothing here yet")

    with pytest.raises(ImplementationMismatch) as raised:
        check_implementation(declines, variant="condconv_layer", max_examples=10)
    report = raised.value.report
    assert not report.passed and report.declined == report.examples == 10
    assert "declined all 10 cases" in report.note and "nothing here yet" in report.note


def test_declining_the_vjp_of_every_case_fails():
    def vjp(case, cotangent):
        raise Unsupported("no backward pass")

    report = check_implementation(reference_forward, vjp=vjp, variant="condconv_layer",
                                  max_examples=5, raise_on_failure=False)
    assert not report.passed and report.declined == 5


def test_a_wrong_result_still_fails_when_other_cases_are_declined():
    def wrong(case):
        if case.options["padding_mode"] == "circular":
            raise Unsupported("no circular padding")
        return 2 * reference_forward(case)

    report = check_implementation(wrong, variant="condconv_layer", max_examples=40,
                                  raise_on_failure=False)
    assert not report.passed and report.mismatches[0].what == "output"


def test_other_exceptions_still_fail():
    def raises(case):
        raise NotImplementedError("circular")

    report = check_implementation(raises, variant="condconv_layer", max_examples=5,
                                  raise_on_failure=False)
    assert not report.passed and report.declined == 0
    assert "NotImplementedError" in report.mismatches[0].reason


# ---------------------------------------------------------------- long messages


def _wrapped_error(case):
    raise ValueError("Exception encountered when calling layer 'cond_conv2d':\n\n"
                     "  Negative dimension size caused by subtracting 3 from 2\n"
                     "Call arguments received:\n  inputs=tf.Tensor(shape=(1, 2, 2, 1))")


def test_a_multi_line_exception_takes_one_report_line_and_is_saved_whole(tmp_path):
    report = check_implementation(_wrapped_error, variant="condconv_layer", max_examples=3,
                                  raise_on_failure=False)
    (mismatch,) = report.mismatches
    assert "\n" not in mismatch.reason
    assert mismatch.reason.startswith("raised ValueError: Exception encountered when calling")
    assert "(+3 more lines)" in mismatch.reason
    assert "Negative dimension size" in mismatch.detail
    lines = str(report).splitlines()
    assert sum("raised ValueError" in line for line in lines) == 1
    assert not any("Call arguments received" in line for line in lines)

    path = golden.save_case(tmp_path / "case.npz", report.case, report.mismatches)
    with np.load(path) as members:
        record = json.loads(members["case"].astype(np.uint8).tobytes().decode())
    assert "inputs=tf.Tensor(shape=(1, 2, 2, 1))" in record["mismatches"][0]["detail"]
    assert golden.load_case(path).describe() == report.case.describe()


# ---------------------------------------------------------------- limits the fields cannot say

from hypothesis import given, settings  # noqa: E402

from condconv_ref.testing import ConvConfig, cases  # noqa: E402
from condconv_ref.variants import build_case, unsupported  # noqa: E402


def _keras_limits(case):
    """Square kernels, equal strides, and not both stride and dilation above 1."""
    kernel = case.arrays["experts"].shape[3:]
    stride, dilation = case.options["stride"], case.options["dilation"]
    if len(set(kernel)) > 1:
        return f"kernel {kernel} is not square"
    if len(set(stride)) > 1:
        return f"strides {stride} differ"
    if max(stride) > 1 and max(dilation) > 1:
        return "stride and dilation both above 1"
    return None


KERAS = Supports(spatial_dims=(2,), excludes=_keras_limits)


@settings(max_examples=60, deadline=None)
@given(cases("condconv_layer", KERAS))
def test_cases_draws_only_what_excludes_lets_through(case):
    assert _keras_limits(case) is None


def _keras_forward(case):
    reason = _keras_limits(case)
    if reason:
        raise NotImplementedError(reason)  # a real layer's constructor refusing it
    return reference_forward(case)


def test_check_implementation_within_excludes_passes_and_counts_what_it_turned_away():
    report = check_implementation(_keras_forward, variant="condconv_layer", supports=KERAS,
                                  max_examples=40)
    assert report.passed and report.turned_away > 0 and report.declined == 0
    assert "drawn cases outside supports" in str(report)
    assert report.to_json()["turned_away"] == report.turned_away
    # without the predicate the same layer fails on a case it cannot build
    failed = check_implementation(_keras_forward, variant="condconv_layer",
                                  supports=Supports(spatial_dims=(2,)), max_examples=40,
                                  raise_on_failure=False)
    assert not failed.passed


def test_unsupported_names_the_reason_excludes_gives():
    config = ConvConfig(batch=1, in_channels=1, out_channels=1, groups=1, spatial=(5, 5),
                        kernel=(3, 1), stride=(1, 1), dilation=(1, 1), padding=0,
                        padding_mode="zeros", n_experts=1, bias=False)
    case = build_case("condconv_layer", config)
    assert unsupported(case, KERAS) == ["kernel (3, 1) is not square"]
    assert unsupported(case, Supports(spatial_dims=(2,))) == []


def test_excludes_that_excludes_everything_is_refused():
    never = Supports(excludes=lambda case: "nothing is supported")
    with pytest.raises(ValueError, match="supports admit no valid case: excludes turned away "
                                         "all of the first 200 cases drawn .*nothing is"):
        check_implementation(reference_forward, variant="condconv_layer", supports=never,
                             max_examples=5)


def test_bad_excludes_are_refused():
    with pytest.raises(TypeError, match="Supports: excludes must be callable"):
        Supports(excludes=3)
    returns_a_number = Supports(excludes=lambda case: 1)
    with pytest.raises(TypeError, match="Supports: excludes must return a reason"):
        check_implementation(reference_forward, variant="condconv_layer",
                             supports=returns_a_number, max_examples=2)


def test_golden_write_records_excludes_by_name(tmp_path):
    directory = golden.write(tmp_path / "set", variants=["condconv_layer"], cases=2,
                             supports=KERAS)
    manifest = json.loads((directory / golden.MANIFEST).read_text())
    assert manifest["generator"]["supports"]["excludes"] == "_keras_limits"
    assert all(_keras_limits(c.case) is None for c in golden.load(directory).cases)


# ---------------------------------------------------------------- one switch per optional array

DYNAMIC_SEED = Supports(bias=(True,), optional={"fc1_bias": (False,)})
"""A DynamicConv layer with an expert bias and a bias-free first routing layer."""


@settings(max_examples=30, deadline=None)
@given(cases("dynamic_conv_layer", DYNAMIC_SEED))
def test_each_optional_array_has_its_own_switch(case):
    assert "bias" in case.arrays and "fc2_bias" in case.arrays
    assert "fc1_bias" not in case.arrays
    assert unsupported(case, DYNAMIC_SEED) == []


def test_a_switch_is_declared_and_checked():
    def without_fc1_bias(case):
        if "fc1_bias" in case.arrays:
            raise NotImplementedError("this layer's first routing layer has no bias")
        return reference_forward(case)

    report = check_implementation(without_fc1_bias, vjp=reference_vjp,
                                  variant="dynamic_conv_layer", supports=DYNAMIC_SEED,
                                  max_examples=20)
    assert report.passed


def test_switching_one_array_off_leaves_the_others_values_alone():
    config = ConvConfig(batch=2, in_channels=3, out_channels=2, groups=1, spatial=(5,),
                        kernel=(3,), stride=(1,), dilation=(1,), padding=1,
                        padding_mode="zeros", n_experts=2, bias=True)
    both = build_case("condconv_layer", config, seed=4)
    expert_bias_only = build_case("condconv_layer",
                                  replace(config, optional=(("route_bias", False),)), seed=4)
    assert set(both.arrays) == set(expert_bias_only.arrays) | {"route_bias"}
    for name, values in expert_bias_only.arrays.items():
        np.testing.assert_array_equal(values, both.arrays[name])
    assert unsupported(both, Supports(optional={"route_bias": (False,)})) == [
        "a route_bias, optional['route_bias']=(False,)"]


def test_bad_switches_are_refused():
    with pytest.raises(ValueError, match=r"Supports: optional has 'fc3_bias', expected"):
        Supports(optional={"fc3_bias": (False,)})
    with pytest.raises(ValueError, match=r"Supports: optional\['bias'\] must be a non-empty"):
        Supports(optional={"bias": ()})


# ---------------------------------------------------------------- the hidden width


@pytest.mark.parametrize("variant, weight", [("dynamic_conv_layer", "fc1_weight"),
                                             ("odconv_layer", "fc_weight")])
def test_the_hidden_width_is_drawn_declared_and_shrunk(variant, weight):
    narrow = Supports(max_hidden=2)
    widths = set()

    @settings(max_examples=30, deadline=None)
    @given(cases(variant, narrow))
    def within(case):
        widths.add(case.arrays[weight].shape[0])
        assert unsupported(case, narrow) == []

    within()
    assert widths == {1, 2}

    def doubled(case):
        return 2 * reference_forward(case)

    report = check_implementation(doubled, variant=variant, max_examples=20,
                                  raise_on_failure=False)
    assert not report.passed and report.case.arrays[weight].shape[0] == 1


def test_a_configured_hidden_width_is_built_and_checked_against_supports():
    config = ConvConfig(batch=1, in_channels=2, out_channels=2, groups=1, spatial=(4,),
                        kernel=(1,), stride=(1,), dilation=(1,), padding=0,
                        padding_mode="zeros", n_experts=3, bias=False, hidden=3)
    case = build_case("dynamic_conv_layer", config)
    assert case.arrays["fc1_weight"].shape == (3, 2) and case.arrays["fc2_weight"].shape == (3, 3)
    assert unsupported(case, Supports(max_hidden=2)) == ["hidden width 3 > max_hidden=2"]


# ---------------------------------------------------------------- every checked variant is named


def test_depthwise_condconv_with_external_routing_is_a_variant_users_check(capsys):
    from condconv_ref.cli import main
    from condconv_ref.variants import LAYER_VARIANTS

    assert "depthwise_condconv" in LAYER_VARIANTS
    try:
        main(["check", "--help"])
    except SystemExit:
        pass
    usage = " ".join(capsys.readouterr().out.split())
    named, _, raw = usage.partition("(or a raw op")
    assert "depthwise_condconv," in named and "depthwise_condconv_layer" in named
    report = check_implementation(reference_forward, vjp=reference_vjp,
                                  variant="depthwise_condconv", max_examples=5)
    assert report.passed and report.checked_vjp
