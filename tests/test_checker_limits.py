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
