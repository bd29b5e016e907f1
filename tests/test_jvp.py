"""Forward mode: every op's JVP is the transpose of its VJP, matches finite differences,
and is validated at the public boundary like the VJP."""

from __future__ import annotations

import re

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import condconv_ref
from condconv_ref import engine
from condconv_ref.backends import to_numpy
from condconv_ref.testing.strategies import cases
from condconv_ref.variants import VARIANTS, bind, build_case
from derivative_cases import CONFIG, DTYPES, SMALL

VARIANT_NAMES = sorted(name for name, entry in VARIANTS.items() if entry.jvp is not None)


def test_every_variant_has_a_jvp():
    assert [name for name, entry in VARIANTS.items() if entry.jvp is None] == []
    assert set(VARIANT_NAMES) == set(VARIANTS)




def _case(variant):
    return build_case(variant, CONFIG, seed=7)


def _jvp(variant, case, backend, tangents, dtype="float64"):
    """The variant's JVP on ``backend`` along host ``tangents``, as a float64 host array."""
    given = {name: backend.asarray(t, dtype=dtype) for name, t in tangents.items()}
    result = bind(VARIANTS[variant].jvp, case, vjp=True)(given, **case.arrays_on(backend, dtype))
    return np.asarray(to_numpy(result))


# ---------------------------------------------------------------- exact and numeric identities


@pytest.mark.parametrize("variant", VARIANT_NAMES)
@settings(max_examples=8)
@given(data=st.data(), dtype=DTYPES)
def test_jvp_is_the_transpose_of_the_vjp(backend, variant, data, dtype):
    case = data.draw(cases(variant, SMALL), label="case")
    measured = engine.transpose_check(case, dtype, backend, seed=case.seed)
    assert measured.passed, measured


@pytest.mark.parametrize("variant", VARIANT_NAMES)
@settings(max_examples=6)
@given(data=st.data(), dtype=DTYPES)
def test_jvp_matches_finite_differences(backend, variant, data, dtype):
    case = data.draw(cases(variant, SMALL), label="case")
    measured = engine.finite_difference_check(case, dtype, backend, seed=case.seed, mode="jvp")
    assert measured.passed or np.isnan(measured.units), measured


def _scaled(jvp, factor):
    def wrong(*args, **kwargs):
        return jvp(*args, **kwargs) * factor
    return wrong


def _layer_jvp_forgetting_the_routing_path(tangents, x, params, **options):
    """condconv_layer's JVP as if ``x`` moved the convolution only, not the routing."""
    routing = condconv_ref.route_sigmoid(x, params["route_weight"], params.get("route_bias"))
    held = condconv_ref.condconv_jvp({"x": tangents["x"]}, x, params["experts"], routing,
                                     params.get("bias"), **options)
    others = {name: t for name, t in tangents.items() if name != "x"}
    return condconv_ref.condconv_layer_jvp(others, x, params, **options) + held


@pytest.mark.parametrize("variant", ["conv", "condconv", "route_softmax", "dynamic_conv_layer"])
def test_transpose_check_catches_a_jvp_off_by_one_part_in_a_billion(variant):
    case = _case(variant)
    assert engine.transpose_check(case, "float64").passed
    wrong = _scaled(VARIANTS[variant].jvp, 1 + 1e-9)
    measured = engine.transpose_check(case, "float64", jvp=wrong)
    assert not measured.passed and measured.units > 10, measured


@pytest.mark.parametrize("variant", ["conv", "condconv", "route_softmax", "dynamic_conv_layer"])
def test_finite_differences_catch_a_jvp_off_by_one_part_in_ten_thousand(variant):
    # The differences' own rounding (about u^(2/3)) hides smaller errors: the transpose
    # identity above is the sharp check, this one is independent of the VJP.
    case = _case(variant)
    assert engine.finite_difference_check(case, "float64", mode="jvp").passed
    wrong = _scaled(VARIANTS[variant].jvp, 1 + 1e-4)
    assert not engine.finite_difference_check(case, "float64", jvp=wrong, mode="jvp").passed


def test_transpose_check_names_the_argument_of_a_missing_path():
    case = _case("condconv_layer")
    measured = engine.transpose_check(case, "float64", jvp=_layer_jvp_forgetting_the_routing_path)
    assert not measured.passed
    assert "argument 'x'" in measured.detail and "argument 'experts'" not in measured.detail


# ---------------------------------------------------------------- tangents: keys, zeros, shapes


@pytest.mark.parametrize("variant", VARIANT_NAMES)
def test_missing_tangents_are_zero(backend, variant):
    case = _case(variant)
    output_shape = tuple(to_numpy(bind(VARIANTS[variant].forward, case)(**case.arrays)).shape)
    assert np.array_equal(_jvp(variant, case, backend, {}), np.zeros(output_shape))
    zeros = {name: np.zeros(a.shape) for name, a in case.arrays.items()}
    assert np.array_equal(_jvp(variant, case, backend, zeros), np.zeros(output_shape))


@pytest.mark.parametrize("variant", VARIANT_NAMES)
def test_bad_tangents_are_clear_errors(variant):
    case = _case(variant)
    jvp = bind(VARIANTS[variant].jvp, case, vjp=True)
    fn = VARIANTS[variant].jvp.__name__
    with pytest.raises(TypeError, match=rf"^{fn}: tangents must be a mapping"):
        jvp([np.ones(3)], **case.arrays)
    with pytest.raises(ValueError, match=rf"^{fn}: tangents has unknown keys \['cotangent'\]"):
        jvp({"cotangent": np.ones(3)}, **case.arrays)
    name, first = next(iter(case.arrays.items()))
    with pytest.raises(ValueError, match=rf"^{fn}: tangents\['{name}'\] has shape \(1,\), "
                                         rf"expected {re.escape(str(tuple(first.shape)))} "
                                         rf"\(the shape of {name}\)"):
        jvp({name: np.ones(1)}, **case.arrays)
    with pytest.raises(TypeError, match=rf"^{fn}: tangents\['{name}'\] must be an array"):
        jvp({name: [1.0]}, **case.arrays)
    with pytest.raises(TypeError, match=rf"^{fn}: tangents\['{name}'\] has dtype float32"):
        jvp({name: first.astype(np.float32)}, **case.arrays)


def test_no_tangent_for_an_absent_bias():
    case = _case("condconv")
    arrays = {name: a for name, a in case.arrays.items() if name != "bias"}
    with pytest.raises(ValueError, match=r"^condconv_jvp: tangents has unknown keys \['bias'\], "
                                         r"expected keys from \['experts', 'routing', 'x'\]"):
        condconv_ref.condconv_jvp({"bias": case.arrays["bias"]}, **arrays, padding=1, groups=2)


def test_float16_tangents_are_computed_in_float32_and_rounded_once():
    case = _case("condconv_layer")
    half = {name: a.astype(np.float16) for name, a in case.arrays.items()}
    tangents = {name: np.ones_like(a) for name, a in half.items()}
    result = condconv_ref.condconv_layer_jvp(tangents, half["x"], {
        name: a for name, a in half.items() if name != "x"}, **case.options)
    single = condconv_ref.condconv_layer_jvp(
        {name: t.astype(np.float32) for name, t in tangents.items()},
        half["x"].astype(np.float32),
        {name: a.astype(np.float32) for name, a in half.items() if name != "x"}, **case.options)
    assert result.dtype == np.float16
    assert np.array_equal(result, single.astype(np.float16))
