"""``jax_implementation``: JAX layers and Flax-style modules checked in reverse mode, forward
mode and at second order, with every derivative from JAX's own transforms.

A correct CondConv layer written with ``jax.lax.conv_general_dilated`` passes; layers whose
sigmoid has a wrong ``jax.custom_jvp`` rule, a wrong ``jax.custom_vjp`` backward, or a
derivative that is right to first order only are each caught where they are wrong.

Skipped without JAX.
"""

from __future__ import annotations

import runpy
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("hypothesis")
jax = pytest.importorskip("jax")

from hypothesis import find, settings  # noqa: E402

from condconv_ref.cli import main  # noqa: E402
from condconv_ref.testing import (  # noqa: E402
    Unsupported,
    cases,
    check_case,
    check_implementation,
)
from condconv_ref.testing.jax_adapter import jax_implementation  # noqa: E402
from condconv_ref.variants import reference_forward  # noqa: E402

pytestmark = pytest.mark.jax


@pytest.fixture(autouse=True, scope="module")
def x64():
    """JAX's x64 mode on for this module (float64 cases need it), as it was afterwards."""
    before = jax.config.read("jax_enable_x64")
    jax.config.update("jax_enable_x64", True)
    yield
    jax.config.update("jax_enable_x64", before)


# ---------------------------------------------------------------- the layers

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
HOWTO = Path(__file__).resolve().parents[1] / "docs" / "howto" / "check_jax_layer.py"
sys.path.insert(0, str(EXAMPLES))
import condconv_jax as example  # noqa: E402

sys.path.remove(str(EXAMPLES))
howto = runpy.run_path(str(HOWTO))  # the sigmoids with rules of their own, the layers

condconv_layer, NAMES, SUPPORTS = example.condconv_layer, example.PARAMETERS, example.SUPPORTS


# ---------------------------------------------------------------- a correct layer


def test_a_correct_jax_condconv_layer_passes_forward_vjp_jvp_and_hvp():
    """In float64; the Flax-style module below is checked in float32 and bfloat16."""
    report = check_implementation(jax_implementation(condconv_layer(), NAMES, supports=SUPPORTS),
                                  variant="condconv_layer", max_examples=5)
    assert report.passed and report.checked_vjp and report.checked_jvp and report.checked_hvp
    assert report.units <= 1 and report.examples == 5


@pytest.mark.parametrize("mode, dtype", [("forward-over-reverse", "float32"),
                                         ("reverse-over-reverse", "float64")])
def test_its_hvp_in_either_mode_matches_reference_hvp_within_the_bound(mode, dtype):
    implementation = jax_implementation(condconv_layer(), NAMES, supports=SUPPORTS, hvp=mode)
    second_order = replace(implementation, vjp=None, jvp=None)  # the output and the HVP
    report = check_implementation(second_order, variant="condconv_layer", dtype=dtype,
                                  max_examples=3)
    assert report.passed and report.checked_hvp and report.units <= 1


def test_a_layer_the_user_jitted_passes_with_and_without_the_adapters_jit(a_case):
    def build(case):
        return jax.jit(condconv_layer()(case))

    for jit in (True, False):  # without the adapter's jit, JAX runs the rest op by op
        report = check_case(jax_implementation(build, NAMES, jit=jit), a_case)
        assert report.passed and report.checked_vjp and report.checked_jvp


@pytest.mark.parametrize("variant, dtype", [("condconv_layer", "float32"),
                                            ("depthwise_condconv_layer", "bfloat16")])
def test_a_flax_style_module_with_channels_last_kernels_passes(variant, dtype):
    implementation = example.flax_factory()
    report = check_implementation(implementation, variant=variant, dtype=dtype, max_examples=3)
    assert report.passed and report.checked_vjp and report.checked_jvp and report.checked_hvp


# ---------------------------------------------------------------- wrong derivatives


def test_a_wrong_custom_jvp_rule_is_caught_in_forward_mode_and_shrunk():
    implementation = jax_implementation(condconv_layer(howto["wrong_rule_sigmoid"]), NAMES,
                                        supports=SUPPORTS)
    forward_mode = replace(implementation, vjp=None, hvp=None)  # JAX reverses the same rule
    report = check_implementation(forward_mode, variant="condconv_layer", max_examples=30,
                                  raise_on_failure=False)
    assert not report.passed and report.checked_jvp
    assert [mismatch.what for mismatch in report.mismatches] == ["jvp"]
    assert report.mismatches[0].units > 1e6
    assert set(report.case.shapes["experts"][:3]) == {1}  # one expert, one channel in and out
    reversed_rule = check_case(implementation, report.case, raise_on_failure=False)
    assert not reversed_rule.passed
    assert "jvp" in [mismatch.what for mismatch in reversed_rule.mismatches]
    assert any(mismatch.what.startswith("gradient") for mismatch in reversed_rule.mismatches)


def test_a_wrong_custom_vjp_backward_is_caught_in_reverse_mode():
    implementation = jax_implementation(condconv_layer(howto["wrong_backward_sigmoid"]), NAMES,
                                        supports=SUPPORTS, jvp=False, hvp=False)
    report = check_implementation(implementation, variant="condconv_layer", max_examples=30,
                                  raise_on_failure=False)
    assert not report.passed and not report.checked_jvp
    whats = [mismatch.what for mismatch in report.mismatches]
    assert "output" not in whats and whats and all(w.startswith("gradient") for w in whats)
    assert max(mismatch.units for mismatch in report.mismatches) > 1e6


def test_forward_mode_through_a_custom_vjp_is_reported_as_a_failure_of_jvp():
    implementation = jax_implementation(condconv_layer(howto["backward_sigmoid"]), NAMES,
                                        supports=SUPPORTS)
    report = check_implementation(implementation, variant="condconv_layer", max_examples=3,
                                  raise_on_failure=False)
    assert not report.passed
    assert [mismatch.what for mismatch in report.mismatches] == ["jvp"]
    assert "can't apply forward-mode autodiff (jvp) to a custom_vjp function" in str(report)
    without = check_implementation(replace(implementation, jvp=None), variant="condconv_layer",
                                   max_examples=3)
    assert without.passed and not without.checked_jvp


@pytest.mark.parametrize("sigmoid, mode", [
    ("first_order_sigmoid", "forward-over-reverse"),
    ("first_order_backward_sigmoid", "forward-over-reverse"),
    ("first_order_backward_sigmoid", "reverse-over-reverse"),
], ids=["custom_jvp", "custom_vjp", "custom_vjp-reverse-over-reverse"])
def test_a_derivative_right_to_first_order_only_fails_at_second_order_and_is_shrunk(sigmoid,
                                                                                    mode):
    implementation = jax_implementation(condconv_layer(howto[sigmoid]), NAMES,
                                        supports=SUPPORTS, jvp=sigmoid == "first_order_sigmoid",
                                        hvp=mode)
    report = check_implementation(implementation, variant="condconv_layer", max_examples=20,
                                  raise_on_failure=False)
    assert not report.passed and report.checked_hvp
    whats = [mismatch.what for mismatch in report.mismatches]
    assert whats and all(what.startswith("hvp '") for what in whats)  # first order passes
    assert "hvp 'experts'" not in whats  # the experts enter linearly: no sigmoid'' there
    assert min(mismatch.units for mismatch in report.mismatches) > 1e6
    assert report.case.shapes["x"][0] == 1 and report.case.shapes["experts"][0] == 1


@pytest.mark.parametrize("mode", ["forward-over-reverse", "reverse-over-reverse"])
def test_a_correct_custom_vjp_passes_at_second_order(mode):
    """Both run through a ``custom_vjp``: forward over reverse differentiates its backward
    function like any other JAX code."""
    implementation = jax_implementation(condconv_layer(howto["backward_sigmoid"]), NAMES,
                                        supports=SUPPORTS, jvp=False, hvp=mode)
    report = check_implementation(implementation, variant="condconv_layer", max_examples=3)
    assert report.passed and report.checked_hvp


# ---------------------------------------------------------------- float64 without x64


def test_float64_without_x64_is_refused_saying_how_to_enable_it():
    implementation = jax_implementation(condconv_layer(), NAMES, supports=SUPPORTS)
    jax.config.update("jax_enable_x64", False)
    try:
        report = check_implementation(implementation, variant="condconv_layer", max_examples=3,
                                      raise_on_failure=False)
        float32 = check_implementation(implementation, variant="condconv_layer",
                                       dtype="float32", max_examples=3)
    finally:
        jax.config.update("jax_enable_x64", True)
    assert not report.passed and report.mismatches[0].what == "forward"
    text = str(report)
    assert "jax_implementation: dtype float64 needs JAX's 64-bit mode, which is off" in text
    assert 'jax.config.update("jax_enable_x64", True)' in text and "JAX_ENABLE_X64=1" in text
    assert float32.passed


# ---------------------------------------------------------------- bad arguments


@pytest.mark.parametrize("arguments, error, message", [
    ({"parameters": {"experts": 3}}, TypeError,
     r"jax_implementation: parameters\['experts'\] must be a place in the variables pytree "
     r"or a \(name, converter\) pair, got 3"),
    ({"parameters": {"experts": "params//kernel"}}, ValueError,
     r"jax_implementation: parameters\['experts'\] must name a place in the variables pytree "
     r"as keys joined by '/'"),
    ({"parameters": {"experts": "params/w", "bias": "params/w/b"}}, ValueError,
     r"jax_implementation: parameters\['experts'\] and parameters\['bias'\] both go to "
     r"'params/w'"),
    ({"data_format": "NHWC"}, ValueError,
     r"jax_implementation: data_format must be one of \('channels_last', 'channels_first'\), "
     r"got 'NHWC'"),
    ({"jvp": "yes"}, TypeError, r"jax_implementation: jvp must be True or False, got 'yes'"),
    ({"jit": 1}, TypeError, r"jax_implementation: jit must be True or False, got 1"),
    ({"hvp": "forward"}, ValueError,
     r"jax_implementation: hvp must be True, False or one of \('forward-over-reverse', "
     r"'reverse-over-reverse'\), got 'forward'"),
])
def test_bad_arguments_are_clear_errors(arguments, error, message):
    given = {"build": condconv_layer(), "parameters": NAMES, **arguments}
    with pytest.raises(error, match=message):
        jax_implementation(given.pop("build"), given.pop("parameters"), **given)


@pytest.fixture(scope="module")
def a_case():
    return find(cases("condconv_layer", SUPPORTS), lambda case: "bias" in case.arrays,
                settings=settings(database=None))


def test_a_case_array_left_unmapped_is_named(a_case):
    implementation = jax_implementation(condconv_layer(), {"experts": "experts"})
    with pytest.raises(ValueError, match=r"jax_implementation: case arrays \['bias', "
                                         r"'route_bias', 'route_weight'\] are neither mapped"):
        implementation.forward(a_case)


def test_a_build_returning_no_layer_is_a_clear_error(a_case):
    with pytest.raises(TypeError, match=r"jax_implementation: build\(case\) must return a "
                                        r"function f\(variables, \*inputs\) or a module with "
                                        r"\.apply\(variables, \*inputs\), got int"):
        jax_implementation(lambda case: 3, NAMES).forward(a_case)


def test_tangents_of_unknown_arrays_are_refused_and_absent_ones_are_zero(a_case):
    implementation = jax_implementation(condconv_layer(), NAMES)
    shape = np.shape(reference_forward(a_case))
    with pytest.raises(ValueError, match=r"jax_implementation \(jvp\): tangents for "
                                         r"\['weights'\], which are not differentiable"):
        implementation.jvp(a_case, {"weights": np.ones(3)})
    only_x = {"x": a_case.tangents()["x"]}
    zeros = {name: np.zeros_like(a) for name, a in a_case.arrays.items() if name != "x"}
    np.testing.assert_array_equal(implementation.jvp(a_case, only_x),
                                  implementation.jvp(a_case, {**only_x, **zeros}))
    cotangent = np.ones(shape)
    np.testing.assert_equal(implementation.hvp(a_case, cotangent, only_x),
                            implementation.hvp(a_case, cotangent, {**only_x, **zeros}))


def test_unsupported_from_build_declines_the_case():
    def build(case):
        if case.x.shape[0] > 1:
            raise Unsupported("one example at a time")
        return condconv_layer()(case)

    report = check_implementation(jax_implementation(build, NAMES, supports=SUPPORTS),
                                  variant="condconv_layer", dtype="float32", max_examples=4)
    assert report.passed and 0 < report.declined < report.examples


# ---------------------------------------------------------------- condconv-ref check


def test_the_check_command_runs_a_jax_factory(capsys):
    argv = ["check", f"{EXAMPLES / 'condconv_jax.py'}:flax_factory", "--variant",
            "depthwise_condconv_layer", "--examples", "3", "--dtype", "float32"]
    assert main(argv) == 0
    assert ("depthwise_condconv_layer (forward, VJP, JVP and HVP, float32, seed 0): PASSED after "
            "3 examples" in capsys.readouterr().out)


@pytest.mark.parametrize("factory, flags, status, line", [
    ("first_order_layer", [], 1, "hvp 'route_weight' differs in"),
    ("first_order_layer", ["--no-hvp"], 0, "(forward, VJP and JVP, float64, seed 0): PASSED"),
    ("custom_vjp_layer", [], 1, "jvp: raised TypeError: can't apply forward-mode autodiff"),
    ("custom_vjp_layer", ["--no-jvp"], 0, "(forward, VJP and HVP, float64, seed 0): PASSED"),
])
def test_the_check_command_runs_the_how_to_layers(factory, flags, status, line, capsys):
    assert main(["check", f"{HOWTO}:{factory}", "--variant", "condconv_layer", "--examples",
                 "3", *flags]) == status
    assert line in capsys.readouterr().out
