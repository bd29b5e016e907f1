"""The library inside a user's test suite: the pytest plugin (declared as an entry point; the
how-to's test file passes with it and a broken layer fails with its minimal case, in a separate
pytest run), and check_case inside the user's own @given."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings

from condconv_ref import golden
from condconv_ref.testing import ImplementationMismatch, cases, check_case, check_implementation
from condconv_ref.variants import reference_forward, reference_vjp

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "docs" / "howto" / "test_my_layer.py"


def _pytest(folder: Path, *arguments: str,
            backends: tuple[str, ...] = ("numpy", "array_api_strict")
            ) -> subprocess.CompletedProcess:
    """A pytest run in ``folder`` with only this plugin loaded (as the entry point loads it),
    its ``condconv_backend`` narrowed to ``backends`` (none: the plugin's default)."""
    environment = {**os.environ, "PYTHONPATH": str(ROOT), "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"}
    environment.pop("PYTEST_ADDOPTS", None)
    environment.pop("JAX_ENABLE_X64", None)
    chosen = [option for name in backends for option in ("--condconv-backend", name)]
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "condconv_ref.testing.pytest_plugin", "-q",
         "-p", "no:cacheprovider", *chosen, *arguments],
        cwd=folder, env=environment, capture_output=True, text=True, timeout=300)


FLOAT64_KEPT = """
import numpy as np

def test_float64_is_kept(condconv_backend):
    assert str(condconv_backend.asarray(np.ones(2)).dtype).endswith("float64")
"""


def test_the_plugin_runs_jax_only_when_named(tmp_path):
    (tmp_path / "test_kept.py").write_text(FLOAT64_KEPT)
    result = _pytest(tmp_path, "--collect-only", backends=())
    assert result.returncode == 0, result.stdout + result.stderr
    assert "test_float64_is_kept[numpy]" in result.stdout
    assert "jax" not in result.stdout


def test_the_plugin_runs_jax_in_float64_when_named(tmp_path):
    pytest.importorskip("jax", reason="needs JAX (pip install condconv_ref[jax])")
    (tmp_path / "test_kept.py").write_text(FLOAT64_KEPT)
    result = _pytest(tmp_path, "-rs", backends=("jax",))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 passed" in result.stdout


def test_the_plugin_is_the_pytest11_entry_point():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["entry-points"]["pytest11"] == {
        "condconv_ref": "condconv_ref.testing.pytest_plugin"}


def test_the_how_to_test_file_passes_with_the_plugin(tmp_path):
    shutil.copy(EXAMPLE, tmp_path)
    result = _pytest(tmp_path, "--condconv-examples", "20", "-rs")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "5 passed" in result.stdout  # three checks, and one test per chosen backend


def test_a_broken_layer_fails_with_its_minimal_case(tmp_path):
    broken = EXAMPLE.read_text().replace("1.0 / (1.0 + np.exp(-logits))", "np.exp(logits)")
    (tmp_path / "test_broken.py").write_text(broken)
    result = _pytest(tmp_path, "--condconv-examples", "20", "-k", "matches_the_reference",
                     "--condconv-seed", "3")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "ImplementationMismatch" in result.stdout
    assert "cond_linear_layer (forward, float64, seed 3): FAILED" in result.stdout
    assert "minimal failing case:" in result.stdout


def test_inside_a_users_given_check_case_works_and_check_implementation_says_what_to_do():
    @settings(max_examples=5, database=None)
    @given(cases("cond_linear_layer"))
    def nested(case):
        check_implementation(reference_forward, variant="cond_linear_layer", max_examples=2)

    with pytest.raises(ValueError, match=r"called inside a hypothesis test.*check_case"):
        nested()

    checked = []

    @settings(max_examples=5, database=None)
    @given(cases("cond_linear_layer"))
    def drawn_by_the_user(case):
        checked.append(check_case(reference_forward, case, vjp=reference_vjp).passed)

    drawn_by_the_user()
    assert checked == [True] * 5


def test_check_case_fails_a_broken_layer_on_the_case_given():
    case = golden.load(golden.SHIPPED).cases[21].case
    with pytest.raises(ImplementationMismatch, match="minimal failing case"):
        check_case(lambda c: 2 * reference_forward(c), case)
    report = check_case(lambda c: 2 * reference_forward(c), case, dtype="float32",
                        raise_on_failure=False)
    assert report.examples == 1 and report.case.dtype == "float32"
    assert report.case.shapes == case.shapes


@pytest.mark.parametrize("variant", ["condconv_layer", "cond_linear_layer", "dynamic_conv_layer"])
def test_a_failing_case_shrinks_to_whole_numbers_not_only_to_small_shapes(variant):
    report = check_implementation(lambda case: 2 * reference_forward(case), variant=variant,
                                  max_examples=30, raise_on_failure=False)
    x = report.case.arrays["x"]
    assert x.size == 1 and x.item() in (1.0, -1.0)
    drawn = ("x", "experts", "bias", "routing", "route_weight", "route_bias")  # not the softmax
    assert all((a == np.round(a)).all()  # MLP, which keeps clear of its ReLU kinks
               for name, a in report.case.arrays.items() if name in drawn)
    assert f"x = {x.tolist()}" in str(report)
