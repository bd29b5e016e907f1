"""``condconv-ref verify``: rows, exit status, one-line errors; and the library's ``verify.run``.
Every command reports a case beyond the memory budget in one line, and ``check`` imports the
file it is given under its package's name when it has one."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import condconv_ref
from condconv_ref import conv, conv_vjp, memory_budget, verify
from condconv_ref.cli import EXIT_INCOMPLETE, main
from condconv_ref.testing.checker import load_implementation

ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _text(captured: str) -> str:
    return ANSI.sub("", captured)


def _row_line(output: str, op: str, kind: str) -> str:
    """The table line of one check (cells are delimited by the table's vertical bars)."""
    lines = [line for line in output.splitlines()
             if f"│ {op} " in line and f"│ {kind} " in line]
    assert len(lines) == 1, f"expected one row for {op} / {kind} in:\n{output}"
    return lines[0]


def _one_line_error(err: str) -> str:
    lines = [line for line in _text(err).splitlines() if line.strip()]
    assert len(lines) == 1, f"expected a one-line error, got:\n{err}"
    assert "Traceback" not in err
    return lines[0]


def _broken_conv_vjp(cotangent, x, kernel, bias=None, **options):
    grads = conv_vjp(cotangent, x, kernel, bias, **options)
    return {**grads, "x": 2 * grads["x"]}


def test_verify_passes_every_check_on_every_backend(backend):
    calls = []

    def progress(check, done, total):
        calls.append((done, total))

    rows = verify.run(backend=backend, cases=2, progress=progress)
    assert [(row.op, row.kind) for row in rows] == [(c.op, c.kind) for c in verify.CHECKS]
    failures = [f"{row.op} / {row.kind}: {row.detail}" for row in rows if row.status != "PASS"]
    assert not failures, "\n".join(failures)
    for row in rows:
        assert row.cases == 2 and row.failed == 0
        assert 0 <= row.units <= 1
    assert calls[-1] == (2 * len(verify.CHECKS), 2 * len(verify.CHECKS))


def test_verify_command_prints_every_row_and_exits_0(capsys):
    assert main(["verify", "--cases", "2"]) == 0
    out = _text(capsys.readouterr().out)
    for check in verify.CHECKS:
        line = _row_line(out, check.op, check.kind)
        assert re.search(r"│\s+2 │", line) and "PASS" in line
    assert f"all {len(verify.CHECKS)} checks passed" in out


def test_verify_at_its_defaults_passes(capsys):
    """What a new user runs first: the README's ``condconv-ref verify``, no options (it
    reported a false FAIL on a cancelling sum before the derived bound)."""
    assert main(["verify"]) == 0
    assert f"all {len(verify.CHECKS)} checks passed" in _text(capsys.readouterr().out)


@pytest.mark.parametrize("seed", [1, 2])
def test_verify_passes_200_cases_where_flat_tolerances_failed(seed):
    """Seed 1 failed cond_linear's MoE equivalence on a cancelling sum, seed 2 the softmax
    routing's finite differences on a saturated softmax; both are correct."""
    rows = verify.run(cases=200, seed=seed)
    assert [row.status for row in rows] == ["PASS"] * len(rows), [
        f"{row.op} / {row.kind}: {row.detail}" for row in rows if row.status != "PASS"]


def test_same_seed_reruns_the_same_cases_and_another_seed_does_not():
    def errors(seed):
        return [(row.units, row.where) for row in verify.run(cases=1, seed=seed)]

    first = errors(3)
    assert errors(3) == first
    assert errors(4) != first


def test_failing_check_gives_fail_row_and_exit_1(monkeypatch, capsys):
    broken = verify.gradient_check("conv", conv, _broken_conv_vjp, verify.conv_inputs)
    healthy = verify.gradient_check("conv", conv, conv_vjp, verify.conv_inputs)
    healthy = verify.Check("conv", "healthy VJP", healthy.run)
    monkeypatch.setattr(verify, "CHECKS", [broken, healthy])
    assert main(["verify", "--cases", "2"]) == 1
    out = _text(capsys.readouterr().out)
    assert "FAIL" in _row_line(out, "conv", verify.FINITE_DIFFERENCES)
    assert "PASS" in _row_line(out, "conv", "healthy VJP")
    assert "FAIL conv / VJP vs finite diff.: 2 of 2 cases failed" in out
    assert "argument 'x'" in out  # the report names the wrong gradient
    assert "1 of 2 checks failed" in out


def test_check_that_raises_fails_its_row_without_a_traceback(monkeypatch, capsys):
    def raising(case):
        raise ZeroDivisionError("boom")

    monkeypatch.setattr(verify, "CHECKS", [verify.Check("conv", "raises", raising)])
    assert main(["verify", "--cases", "1"]) == 1
    captured = capsys.readouterr()
    assert "FAIL" in _row_line(_text(captured.out), "conv", "raises")
    assert "case 0: ZeroDivisionError: boom" in _text(captured.out)
    assert "Traceback" not in captured.out + captured.err


def test_missing_scipy_is_reported_incomplete_not_passed(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "scipy", None)  # importing scipy now fails
    oracles = [c for c in verify.CHECKS if c.kind == verify.ORACLE]
    finite_differences = next(c for c in verify.CHECKS if c.kind == verify.FINITE_DIFFERENCES)
    monkeypatch.setattr(verify, "CHECKS", [finite_differences, *oracles])
    assert main(["verify", "--cases", "1"]) == EXIT_INCOMPLETE == 3
    out = _text(capsys.readouterr().out)
    for check in oracles:
        assert "SKIP" in _row_line(out, check.op, check.kind)
        assert f"{check.op} / {verify.ORACLE} skipped: scipy is not installed" in out
    assert f"INCOMPLETE: {len(oracles)} of {len(oracles) + 1} checks did not run" in out
    assert "checks passed" not in out
    assert main(["verify", "--cases", "1", "--json"]) == EXIT_INCOMPLETE
    document = json.loads(capsys.readouterr().out)
    assert document["passed"] is False and document["complete"] is False
    assert len(document["not_run"]) == len(oracles)


def test_unavailable_backend_is_one_line_and_exit_2(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "cupy", None)  # as on a machine without CuPy
    assert main(["verify", "--backend", "cupy"]) == 2
    captured = capsys.readouterr()
    line = _one_line_error(captured.err)
    assert line.startswith("condconv-ref verify: error: backend 'cupy' is not available")
    assert captured.out == ""


@pytest.mark.parametrize("argv, names", [
    (["verify", "--cases", "0"], "--cases"),
    (["verify", "--cases", "many"], "--cases"),
    (["verify", "--seed", "-1"], "--seed"),
    (["verify", "--dtype", "int8"], "--dtype"),
    (["verify", "--backend", "tensorflow"], "--backend"),
    (["verify", "--no-such-option"], "--no-such-option"),
    ([], "COMMAND"),
])
def test_bad_option_is_one_line_and_exit_2(argv, names, capsys):
    assert main(argv) == 2
    captured = capsys.readouterr()
    line = _one_line_error(captured.err)
    assert "error:" in line and names in line
    assert captured.out == ""


@pytest.mark.parametrize("arguments, name", [
    (dict(cases=0), "cases"), (dict(seed=-1), "seed"), (dict(dtype="int8"), "dtype"),
    (dict(backend="tensorflow"), "backend"),
])
def test_run_rejects_bad_arguments_naming_them(arguments, name):
    with pytest.raises(ValueError, match=name):
        verify.run(**arguments)


def test_console_script_runs_verify():
    # The script of the environment running the tests (a venv need not be on PATH, and PATH
    # may hold another environment's script), else whatever PATH finds.
    beside = Path(sys.executable).with_name("condconv-ref")
    script = str(beside) if beside.is_file() else shutil.which("condconv-ref")
    if script is None:
        pytest.skip("the condconv-ref console script is not installed (pip install -e .)")
    result = subprocess.run([script, "verify", "--cases", "1"], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    out = _text(result.stdout)
    for check in verify.CHECKS:
        assert "PASS" in _row_line(out, check.op, check.kind)


# ---------------------------------------------------------------- the memory budget

FACTORY = ("from condconv_ref.variants import reference_forward\n\n\n"
           "def factory():\n    return reference_forward\n")


@pytest.mark.parametrize("argv", [
    ["verify", "--cases", "1"],
    ["golden", "write", "--out", "{folder}/set", "--variant", "conv"],
    ["golden", "verify", "--variant", "conv"],
    ["golden", "verify", "--variant", "conv", "--against", "{folder}/mine.py:factory"],
    ["check", "{folder}/mine.py:factory", "--variant", "condconv_layer", "--examples", "2"],
    ["gpu-check", "--backend", "numpy", "--cases", "1", "--variant", "conv", "--no-tf32",
     "--no-torch"],
], ids=["verify", "golden-write", "golden-verify", "golden-verify-against", "check",
        "gpu-check"])
def test_case_beyond_the_memory_budget_is_one_line_and_exit_2(argv, tmp_path, capsys):
    (tmp_path / "mine.py").write_text(FACTORY)
    with memory_budget(1):  # one byte: every case is beyond it
        status = main([arg.format(folder=tmp_path) for arg in argv])
    assert status == 2
    line = _one_line_error(capsys.readouterr().err)
    assert line.startswith(f"condconv-ref {argv[0]}: error: ")
    assert "needs about" in line and "more than the memory budget of 1 B" in line


# ---------------------------------------------------------------- check FILE.py:factory

PACKAGE = "cli_checked_layers"


@pytest.fixture
def package(tmp_path):
    """``PACKAGE/layers/impl.py``, which imports its neighbour ``shared.py`` relatively and
    defines a dataclass; its modules leave ``sys.modules`` after the test."""
    files = {
        "__init__.py": "",
        "layers/__init__.py": "",
        "layers/shared.py": "from condconv_ref.variants import reference_forward\n\n\n"
                            "def forward(case):\n    return reference_forward(case)\n",
        "layers/impl.py": "from dataclasses import dataclass\n\nfrom .shared import forward\n\n\n"
                          "@dataclass\nclass Settings:\n    name: str = 'mine'\n\n\n"
                          "def factory():\n    return forward\n",
    }
    for name, text in files.items():
        (tmp_path / PACKAGE / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / PACKAGE / name).write_text(text)
    yield tmp_path / PACKAGE
    for name in [name for name in sys.modules if name.split(".")[0] == PACKAGE]:
        del sys.modules[name]


def test_check_imports_a_package_file_under_its_package_name(package, capsys):
    impl = package / "layers" / "impl.py"
    assert main(["check", f"{impl}:factory", "--variant", "condconv_layer",
                 "--examples", "3"]) == 0
    assert "PASSED after 3 examples" in capsys.readouterr().out
    assert sys.modules[f"{PACKAGE}.layers.impl"].__file__ == str(impl)
    implementation = load_implementation(f"{impl}:factory")
    assert implementation.forward.__module__ == f"{PACKAGE}.layers.shared"


def test_check_of_a_file_of_this_package_reaches_its_factory(capsys):
    """``condconv-ref check condconv_ref/conv.py:conv`` used to import conv.py standalone and
    fail with an AttributeError; now the module is condconv_ref.conv and the factory runs."""
    conv_file = Path(condconv_ref.__file__).parent / "conv.py"
    assert main(["check", f"{conv_file}:conv", "--variant", "conv"]) == 2
    line = _one_line_error(capsys.readouterr().err)
    assert "conv() raised TypeError: conv: missing a required argument" in line
    assert "AttributeError" not in line


def test_check_still_imports_a_standalone_file_next_to_its_neighbours(tmp_path, capsys):
    (tmp_path / "helper.py").write_text("from condconv_ref.variants import reference_forward\n")
    (tmp_path / "mine.py").write_text(
        "from dataclasses import dataclass\n\nfrom helper import reference_forward\n\n\n"
        "@dataclass\nclass Settings:\n    name: str = 'mine'\n\n\n"
        "def factory():\n    return reference_forward\n")
    assert main(["check", f"{tmp_path / 'mine.py'}:factory", "--variant", "condconv",
                 "--examples", "3"]) == 0
    assert "PASSED after 3 examples" in capsys.readouterr().out


def test_package_file_whose_name_imports_another_file_is_refused(tmp_path, capsys):
    """A copy of this package elsewhere: its conv.py is condconv_ref.conv by name, and that
    name is the installed module, so checking the copy would check the wrong file."""
    copy = tmp_path / "condconv_ref"
    copy.mkdir()
    (copy / "__init__.py").write_text("")
    (copy / "conv.py").write_text(FACTORY)
    assert main(["check", f"{copy / 'conv.py'}:factory", "--variant", "conv"]) == 2
    line = _one_line_error(capsys.readouterr().err)
    assert "is module condconv_ref.conv of its package, but importing condconv_ref.conv gives" \
        in line
