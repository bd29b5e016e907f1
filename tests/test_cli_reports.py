"""What the command line hands to machines and to bug reports: JUnit XML, a saved minimal case
that reruns, ``python -m condconv_ref``, and internal errors told apart from bad input."""

from __future__ import annotations

import json
import subprocess
import sys
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import numpy as np
import pytest

import condconv_ref
from condconv_ref import golden, verify
from condconv_ref.cli import EXIT_INTERNAL, main

LAYERS = '''
from condconv_ref.testing import Implementation
from condconv_ref.variants import reference_forward, reference_hvp, reference_vjp


def correct():
    return reference_forward, reference_vjp


def doubled():
    return lambda case: 2 * reference_forward(case)


def doubled_second_order():
    def hvp(case, cotangent, tangents):
        grads = reference_hvp(case, cotangent, tangents)
        return {**grads, "experts": 2 * grads["experts"]}

    return Implementation(reference_forward, reference_vjp, hvp=hvp)
'''


@pytest.fixture
def layers(tmp_path):
    path = tmp_path / "layers.py"
    path.write_text(LAYERS)
    return path


def _testcases(path):
    suite = ElementTree.parse(path).getroot().find("testsuite")
    return suite, suite.findall("testcase")


def test_check_saves_the_minimal_failing_case_which_reruns(layers, tmp_path, capsys):
    saved = tmp_path / "minimal.npz"
    argv = ["check", f"{layers}:doubled", "--variant", "cond_linear_layer", "--examples", "20",
            "--dtype", "float32"]
    assert main([*argv, "--save-case", str(saved), "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["saved_case"] == str(saved) and not report["passed"]
    case = golden.load_case(saved)
    assert case.variant == "cond_linear_layer" and case.dtype == "float32"
    assert {name: list(shape) for name, shape in case.shapes.items()} == report["case"]["shapes"]
    assert all(a.dtype == np.float32 for a in case.arrays.values())
    rerun = ["check", f"{layers}:doubled", "--variant", "cond_linear_layer", "--case", str(saved)]
    assert main(rerun) == 1
    assert "FAILED after 1 examples" in capsys.readouterr().out
    assert main(["check", f"{layers}:correct", "--variant", "cond_linear_layer",
                 "--case", str(saved)]) == 0
    assert main(["check", f"{layers}:correct", "--variant", "condconv",
                 "--case", str(saved)]) == 2
    assert "holds a cond_linear_layer case, but --variant is condconv" in capsys.readouterr().err


def test_a_file_that_is_not_a_saved_case_is_one_line_exit_2(layers, tmp_path, capsys):
    golden.write(tmp_path / "set", variants=["conv"], cases=1)
    argv = ["check", f"{layers}:correct", "--variant", "conv", "--case",
            str(tmp_path / "set" / "0000-conv.npz")]
    assert main(argv) == 2
    assert "not a 'condconv-ref case' file" in capsys.readouterr().err


def test_check_writes_junit_xml(layers, tmp_path):
    passing, failing = tmp_path / "passing.xml", tmp_path / "failing.xml"
    assert main(["check", f"{layers}:correct", "--variant", "cond_linear_layer",
                 "--examples", "5", "--junit-xml", str(passing)]) == 0
    assert main(["check", f"{layers}:doubled", "--variant", "cond_linear_layer",
                 "--examples", "5", "--junit-xml", str(failing)]) == 1
    suite, (case,) = _testcases(passing)
    assert suite.get("tests") == "1" and suite.get("failures") == "0"
    assert case.find("failure") is None
    suite, (case,) = _testcases(failing)
    assert suite.get("failures") == "1"
    assert "minimal failing case" in case.find("failure").text


def test_verify_writes_junit_xml_with_a_testcase_per_row(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "scipy", None)  # the oracle rows cannot run
    path = tmp_path / "verify.xml"
    assert main(["verify", "--cases", "1", "--junit-xml", str(path)]) == 3
    suite, testcases = _testcases(path)
    assert len(testcases) == len(verify.CHECKS)
    skipped = [case for case in testcases if case.find("skipped") is not None]
    assert len(skipped) == int(suite.get("skipped")) == sum(
        check.kind == verify.ORACLE for check in verify.CHECKS)
    assert "scipy is not installed" in skipped[0].find("skipped").get("message")


def test_golden_verify_writes_junit_xml(tmp_path, capsys):
    path = tmp_path / "golden.xml"
    assert main(["golden", "verify", "--variant", "conv", "--junit-xml", str(path)]) == 0
    suite, testcases = _testcases(path)
    assert [case.get("name") for case in testcases] == [
        case.file for case in golden.load(golden.SHIPPED).cases if case.variant == "conv"]
    assert suite.get("failures") == "0"


def test_python_dash_m_runs_the_command():
    result = subprocess.run([sys.executable, "-m", "condconv_ref", "--version"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stdout.startswith("condconv-ref ")


# ---------------------------------------------------------------- internal errors


def _bug_inside_the_library(*args, **kwargs):
    return np.ones((2, 3)) @ np.ones((2, 3))  # NumPy raises ValueError: a bug, not bad input


def test_internal_error_prints_its_traceback_and_exit_70(monkeypatch, capsys):
    monkeypatch.setattr(verify, "run", _bug_inside_the_library)
    assert main(["verify", "--cases", "1"]) == EXIT_INTERNAL == 70
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "_bug_inside_the_library" in err
    assert "internal error: ValueError: matmul" in err
    assert "This is a bug in condconv_ref, not in your input" in err


def test_bad_input_stays_one_line_and_debug_adds_the_traceback(capsys):
    argv = ["golden", "verify", "no/such/directory"]
    assert main(argv) == 2
    assert "Traceback" not in capsys.readouterr().err
    assert main([*argv, "--debug"]) == 2
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err
    assert err.rstrip().splitlines()[-1].startswith("condconv-ref golden: error:")


def test_the_package_declares_its_annotations_and_classifiers():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    root = Path(condconv_ref.__file__).resolve().parent
    assert (root / "py.typed").is_file()
    project = tomllib.loads((root.parent / "pyproject.toml").read_text())
    assert "py.typed" in project["tool"]["setuptools"]["package-data"]["condconv_ref"]
    assert "Typing :: Typed" in project["project"]["classifiers"]


def test_check_reports_the_hvp_in_json_and_junit_and_skips_it_when_told(layers, tmp_path,
                                                                         capsys):
    junit = tmp_path / "second_order.xml"
    argv = ["check", f"{layers}:doubled_second_order", "--variant", "cond_linear_layer",
            "--examples", "10"]
    assert main([*argv, "--json", "--junit-xml", str(junit)]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["checked_vjp"] and report["checked_hvp"] and not report["checked_jvp"]
    assert [m["what"] for m in report["mismatches"]] == ["hvp 'experts'"]
    _, (case,) = _testcases(junit)
    assert "(forward, VJP and HVP, float64" in case.find("failure").get("message") + (
        case.find("failure").text or "")
    assert main([*argv, "--no-hvp", "--json"]) == 0
    skipped = json.loads(capsys.readouterr().out)
    assert skipped["passed"] and skipped["checked_vjp"] and not skipped["checked_hvp"]
