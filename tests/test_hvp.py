"""Second order: each layer's Hessian-vector product matches finite differences of its VJP,
applies a symmetric Hessian, is validated at the public boundary like the VJP, and a wrong one
(without the router's own second-order term; for ODConv without the batch norm's coupling of
the batch or a head's own term) is caught."""

from __future__ import annotations

import re
from dataclasses import replace

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import condconv_ref
from condconv_ref import _attention, engine
from condconv_ref._attention import HEADS
from condconv_ref.backends import to_numpy
from condconv_ref.testing.strategies import cases
from condconv_ref.variants import VARIANTS, bind, build_case, hvp_variants
from derivative_cases import CONFIG, DTYPES, SMALL, routers_without_second_order

HVP_VARIANTS = hvp_variants()


ROUTED = [name for name in HVP_VARIANTS if name != "odconv_layer"]
ODCONV_CONFIG = replace(CONFIG, batch=3)
"""Three examples: with two, train mode normalizes each feature to :math:`\\pm 1` whatever the
input, and the batch norm's derivatives all but vanish."""
ODCONV_SEEDS = {"train": 7, "eval": 8}
"""Seeds of ODCONV_CONFIG's ``odconv_layer`` case with all four heads, in each mode."""


def test_the_sigmoid_and_softmax_routed_layers_and_odconv_have_an_hvp():
    assert HVP_VARIANTS == ["cond_linear_layer", "condconv_layer", "depthwise_condconv_layer",
                            "dynamic_conv_layer", "odconv_layer"]
    assert all(name + "_hvp" in condconv_ref.__all__ for name in HVP_VARIANTS)


@pytest.mark.parametrize("variant", HVP_VARIANTS)
@settings(max_examples=5)
@given(data=st.data(), dtype=DTYPES)
def test_hvp_matches_finite_differences_of_the_vjp(backend, variant, data, dtype):
    case = data.draw(cases(variant, SMALL), label="case")
    measured = engine.hvp_check(case, dtype, backend, seed=case.seed)
    assert measured.passed or np.isnan(measured.units), measured


@pytest.mark.parametrize("variant", HVP_VARIANTS)
@settings(max_examples=5)
@given(data=st.data(), dtype=DTYPES)
def test_the_hessian_the_hvp_applies_is_symmetric(backend, variant, data, dtype):
    case = data.draw(cases(variant, SMALL), label="case")
    measured = engine.hvp_symmetry_check(case, dtype, backend, seed=case.seed)
    assert measured.passed, measured


def _odconv_case(mode):
    case = build_case("odconv_layer", ODCONV_CONFIG, seed=ODCONV_SEEDS[mode])
    assert case.options["batch_norm"] == mode
    assert all(f"{head}_weight" in case.arrays for head in HEADS)
    return case


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_the_odconv_hvp_matches_its_vjp_in_both_batch_norm_modes(backend, mode, dtype):
    case = _odconv_case(mode)
    assert engine.hvp_check(case, dtype, backend).passed
    assert engine.hvp_symmetry_check(case, dtype, backend).passed


# ---------------------------------------------------------------- wrong HVPs are caught


@pytest.mark.parametrize("variant", ROUTED)
def test_an_hvp_without_the_routers_second_order_term_is_caught(variant, monkeypatch):
    def wrong(*args, **kwargs):
        with routers_without_second_order(variant, monkeypatch):
            return VARIANTS[variant].hvp(*args, **kwargs)

    case = build_case(variant, CONFIG, seed=7)
    assert engine.hvp_check(case, "float64").passed
    measured = engine.hvp_check(case, "float64", hvp=wrong)
    assert measured.units > 1, measured
    assert "x" in measured.detail


@pytest.mark.parametrize(("term", "mode", "caught_in"), [
    ("normalizing_jacobian_derivative", "train", ("x", "fc_weight")),
    ("stable_softmax_vjp_derivative", "train", ("kernel_weight",)),
    ("stable_softmax_vjp_derivative", "eval", ("kernel_weight",)),
    ("sigmoid_vjp_derivative", "eval", ("channel_weight", "filter_weight", "spatial_weight")),
])
def test_an_odconv_hvp_without_a_second_order_term_is_caught(term, mode, caught_in,
                                                             monkeypatch):
    """Without the batch norm's train-mode coupling (the derivative of its Jacobian), the
    kernel head's softmax term or the sigmoid heads' term, the HVP is off."""
    original = getattr(_attention, term)

    def wrong(*args, **kwargs):
        with monkeypatch.context() as patch:
            patch.setattr(_attention, term, lambda *a, **k: 0 * original(*a, **k))
            return VARIANTS["odconv_layer"].hvp(*args, **kwargs)

    case = _odconv_case(mode)
    assert engine.hvp_check(case, "float64").passed
    measured = engine.hvp_check(case, "float64", hvp=wrong)
    assert measured.units > 1, measured
    assert any(f"argument {name!r}" in measured.detail for name in caught_in), measured.detail


def test_an_asymmetric_hvp_is_caught():
    variant = "condconv_layer"

    def asymmetric(cotangent, tangents, x, params, **options):
        grads = VARIANTS[variant].hvp(cotangent, tangents, x, params, **options)
        # the Hessian's experts-x block doubled in one direction only
        shifted = dict(tangents, experts=0 * tangents["experts"])
        extra = VARIANTS[variant].hvp(cotangent, shifted, x, params, **options)
        return {**grads, "experts": grads["experts"] + extra["experts"]}

    case = build_case(variant, CONFIG, seed=7)
    assert engine.hvp_symmetry_check(case, "float64").passed
    assert not engine.hvp_symmetry_check(case, "float64", hvp=asymmetric).passed


# ---------------------------------------------------------------- the public boundary


def _bound_hvp(variant):
    """The variant's HVP on CONFIG's case, as ``hvp(cotangent, tangents)``, and the case."""
    case = build_case(variant, CONFIG, seed=7)
    x, params = case.arrays["x"], {n: a for n, a in case.arrays.items() if n != "x"}
    return (lambda cotangent, tangents: VARIANTS[variant].hvp(cotangent, tangents, x, params,
                                                              **case.options)), case


def _output_shape(variant, case):
    return tuple(bind(VARIANTS[variant].forward, case)(**case.arrays).shape)


@pytest.mark.parametrize("variant", HVP_VARIANTS)
def test_bad_tangents_and_cotangents_are_clear_errors(variant):
    hvp, case = _bound_hvp(variant)
    fn = VARIANTS[variant].hvp.__name__
    cotangent = np.ones(_output_shape(variant, case))
    x = case.arrays["x"]
    with pytest.raises(TypeError, match=rf"^{fn}: tangents must be a mapping"):
        hvp(cotangent, [x])
    with pytest.raises(ValueError, match=rf"^{fn}: tangents has unknown keys \['cotangent'\]"):
        hvp(cotangent, {"cotangent": x})
    with pytest.raises(ValueError, match=rf"^{fn}: tangents\['x'\] has shape \(1,\), "
                                         rf"expected {re.escape(str(tuple(x.shape)))}"):
        hvp(cotangent, {"x": np.ones(1)})
    with pytest.raises(TypeError, match=rf"^{fn}: tangents\['x'\] has dtype float32"):
        hvp(cotangent, {"x": x.astype(np.float32)})
    with pytest.raises(ValueError, match=rf"^{fn}: cotangent has shape"):
        hvp(cotangent[:1], {"x": x})
    with pytest.raises(TypeError, match=rf"^{fn}: cotangent has dtype float32"):
        hvp(cotangent.astype(np.float32), {"x": x})


@pytest.mark.parametrize("variant", HVP_VARIANTS)
def test_missing_tangents_are_zero(backend, variant):
    hvp, case = _bound_hvp(variant)
    cotangent = np.ones(_output_shape(variant, case))
    on = {name: backend.asarray(a, dtype="float64") for name, a in case.arrays.items()}
    x, params = on["x"], {n: a for n, a in on.items() if n != "x"}
    grads = VARIANTS[variant].hvp(backend.asarray(cotangent, dtype="float64"), {}, x, params,
                                  **case.options)
    assert sorted(grads) == sorted(case.arrays)
    assert all(not np.any(to_numpy(g)) for g in grads.values())
