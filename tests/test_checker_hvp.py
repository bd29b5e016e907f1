"""The checker at second order: an implementation's ``hvp`` is judged against the reference
Hessian-vector product with the derived bound, reported as ``hvp 'name'``, shrunk, declined
and refused like the other derivatives.  (A torch layer's double backward: tests/test_checker.py.)
"""

from __future__ import annotations

import pytest

pytest.importorskip("hypothesis")


from condconv_ref.testing import (  # noqa: E402
    ConvConfig,
    Implementation,
    Supports,
    Unsupported,
    check_case,
    check_implementation,
)
from condconv_ref.testing.checker import load_implementation  # noqa: E402
from condconv_ref.variants import (  # noqa: E402
    build_case,
    hvp_variants,
    reference_forward,
    reference_hvp,
    reference_vjp,
)

SMALL = Supports(spatial_dims=(1,), max_batch=2, max_experts=3, max_size=5)


def _hvp(case, cotangent, tangents):
    """The reference HVP computed in the dtype the case was handed over in."""
    dtype = "float32" if case.dtype == "bfloat16" else case.dtype
    return reference_hvp(case, cotangent, tangents, dtype=dtype)


@pytest.mark.parametrize("variant", hvp_variants())
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_the_reference_hvp_in_the_dtype_passes(variant, dtype):
    report = check_implementation(reference_forward, hvp=_hvp, variant=variant, dtype=dtype,
                                  supports=SMALL, max_examples=15)
    assert report.passed and report.checked_hvp and not report.checked_jvp, report
    assert "(forward and HVP, " in str(report)
    assert report.to_json()["checked_hvp"] is True


def _off_in_one_element(case, cotangent, tangents):
    grads = _hvp(case, cotangent, tangents)
    experts = grads["experts"].copy()
    experts.flat[0] += 1e-6 * (1 + abs(experts.flat[0]))
    return {**grads, "experts": experts}


def test_an_hvp_off_in_one_element_fails_there_on_a_minimal_case():
    report = check_implementation(reference_forward, hvp=_off_in_one_element,
                                  variant="condconv_layer", max_examples=20,
                                  raise_on_failure=False)
    assert not report.passed and report.checked_hvp
    (mismatch,) = report.mismatches
    assert mismatch.what == "hvp 'experts'" and mismatch.count == 1
    assert mismatch.index == (0,) * len(report.case.shapes["experts"])
    assert mismatch.units > 1e3
    assert report.case.shapes["x"][0] == 1  # shrunk
    assert "hvp 'experts' differs in 1 of" in str(report)


def test_an_hvp_that_raises_fails_with_the_exception_text():
    def raises(case, cotangent, tangents):
        raise RuntimeError("double backward is not implemented")

    report = check_implementation(reference_forward, hvp=raises, variant="cond_linear_layer",
                                  max_examples=5, raise_on_failure=False)
    assert not report.passed and report.declined == 0
    assert [m.what for m in report.mismatches] == ["hvp"]
    assert "raised RuntimeError: double backward is not implemented" in str(report)


def test_an_hvp_with_missing_gradients_fails_naming_them():
    def without_x(case, cotangent, tangents):
        return {name: g for name, g in _hvp(case, cotangent, tangents).items() if name != "x"}

    report = check_implementation(reference_forward, hvp=without_x, variant="condconv_layer",
                                  max_examples=5, raise_on_failure=False)
    assert not report.passed
    assert report.mismatches[0].what == "hvp"
    assert "returned gradients for" in report.mismatches[0].reason


def test_an_hvp_that_declines_is_counted_and_declining_every_case_fails():
    def declines_batches(case, cotangent, tangents):
        if case.shapes["x"][0] > 1:
            raise Unsupported("no second order for batches")
        return _hvp(case, cotangent, tangents)

    report = check_implementation(reference_forward, vjp=reference_vjp, hvp=declines_batches,
                                  variant="condconv_layer", max_examples=30)
    assert report.passed and 0 < report.declined < report.examples

    def declines(case, cotangent, tangents):
        raise Unsupported("no second order")

    report = check_implementation(reference_forward, hvp=declines, variant="condconv_layer",
                                  max_examples=5, raise_on_failure=False)
    assert not report.passed and report.declined == 5
    assert "no second order" in report.note


@pytest.mark.parametrize("fn", ["check_implementation", "check_case"])
def test_an_hvp_for_a_variant_without_a_reference_hvp_is_a_clear_error(fn):
    variant = "condconv"
    assert variant not in hvp_variants()
    with pytest.raises(ValueError) as raised:
        if fn == "check_implementation":
            check_implementation(reference_forward, hvp=_hvp, variant=variant, max_examples=1)
        else:
            config = ConvConfig(batch=1, in_channels=1, out_channels=1, groups=1, spatial=(3,),
                                kernel=(1,), stride=(1,), dilation=(1,), padding=0,
                                padding_mode="zeros", n_experts=2, bias=False)
            check_case(reference_forward, build_case(variant, config), hvp=_hvp)
    message = str(raised.value)
    assert message.startswith(f"{fn}: hvp is given for variant 'condconv'")
    assert str(hvp_variants()) in message


def test_an_implementations_hvp_for_such_a_variant_is_left_out_and_the_report_says_so():
    implementation = Implementation(reference_forward, reference_vjp, hvp=_hvp)
    report = check_implementation(implementation, variant="condconv", max_examples=3)
    assert report.passed and report.checked_vjp and not report.checked_hvp
    assert report.note.startswith("hvp not checked: condconv has no reference Hessian-vector")
    assert "hvp not checked" in str(report)


def test_check_case_checks_an_hvp_on_the_case_given():
    config = ConvConfig(batch=2, in_channels=2, out_channels=2, groups=1, spatial=(4,),
                        kernel=(3,), stride=(1,), dilation=(1,), padding=1,
                        padding_mode="zeros", n_experts=2, bias=True)
    case = build_case("dynamic_conv_layer", config, seed=3)
    passed = check_case(reference_forward, case, hvp=_hvp, dtype="float32")
    assert passed.passed and passed.checked_hvp and passed.examples == 1
    failed = check_case(Implementation(reference_forward, hvp=_off_in_one_element), case,
                        raise_on_failure=False)
    assert [m.what for m in failed.mismatches] == ["hvp 'experts'"]


def test_load_implementation_keeps_the_factorys_hvp(tmp_path):
    path = tmp_path / "second_order.py"
    path.write_text(
        "from condconv_ref.testing import Implementation\n"
        "from condconv_ref.variants import reference_forward, reference_hvp\n"
        "def factory():\n"
        "    return Implementation(reference_forward,\n"
        "                          hvp=lambda case, c, t: reference_hvp(case, c, t))\n")
    implementation = load_implementation(f"{path}:factory")
    assert implementation.hvp is not None
    report = check_implementation(implementation, variant="cond_linear_layer", max_examples=3)
    assert report.passed and report.checked_hvp


def test_an_hvp_that_is_not_callable_is_named():
    with pytest.raises(TypeError, match="check_implementation: hvp must be callable"):
        check_implementation(reference_forward, hvp="reference_hvp", variant="condconv_layer")
