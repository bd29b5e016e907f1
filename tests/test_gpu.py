"""``condconv_ref.gpu`` and ``condconv-ref gpu-check``: the error measure, the rows, the
determinism check, the TF32 subprocess protocol, torch's conv2d, and the command.

The comparison is backend-generic, so every part of it runs here on the CPU backends; the
``cupy`` parameter of the ``backend`` fixture (marked ``gpu``) runs the same bodies on a GPU.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import types
from dataclasses import replace

import numpy as np
import pytest

from condconv_ref import conv, gpu
from condconv_ref.backends import Backend, BackendUnavailable, get_backend
from condconv_ref.cli import main
from condconv_ref.engine import Row, expected_forward, judge, rounded, worst
from condconv_ref.testing import ConvConfig
from condconv_ref.variants import VARIANTS, build_case

ANSI = re.compile(r"\x1b\[[0-9;]*m")
SMALL = {}  # the test suite's own configuration bounds: fast on the CPU


def _cupy_backend():
    try:
        return get_backend("cupy")
    except BackendUnavailable as reason:
        pytest.skip(str(reason))


def _noisy_conv():
    """``conv`` whose result changes in its last bits on every other call: a nondeterministic op."""
    calls = []

    def noisy(x, kernel, bias=None, **options):
        y = conv(x, kernel, bias, **options)
        calls.append(None)
        eps = float(np.finfo(str(y.dtype).rsplit(".", 1)[-1]).eps)
        return y * (1 + eps * (len(calls) % 2))

    return replace(VARIANTS["conv"], forward=noisy)


# ---------------------------------------------------------------- the error measure


def test_float16_is_judged_as_float32_arithmetic_plus_one_final_rounding(backend):
    """A float16 result of float32 arithmetic rounded once passes; one that carries float16
    accumulation error (several float16 roundings) does not."""
    if not hasattr(backend.xp, "float16"):
        pytest.skip(f"{backend.name} has no float16")
    case = build_case("conv", ConvConfig(batch=1, in_channels=8, out_channels=2, groups=1,
                                         spatial=(12,), kernel=(5,), stride=(1,),
                                         dilation=(1,), padding=2, padding_mode="zeros",
                                         n_experts=1, bias=False), seed=3)
    at = rounded(case, "float16")
    expected = expected_forward(at)
    once = backend.asarray(expected.value, dtype="float16")  # one correct final rounding
    assert worst(judge(once, expected, gpu.COMPUTED_IN["float16"])).passed
    # accumulating in float16 errs by up to gamma_n(2^-11) of the scale: far beyond the policy
    accumulated = expected.value + 8 * 2.0**-11 * expected.scale
    found = worst(judge(accumulated, expected, gpu.COMPUTED_IN["float16"]))
    assert not found.passed
    assert worst(judge(accumulated, expected, "float16")).passed  # float16's own bound


def test_nan_results_are_infinitely_wrong(backend):
    case = build_case("mix_experts", ConvConfig(batch=1, in_channels=1, out_channels=1,
                                                groups=1, spatial=(1,), kernel=(1,),
                                                stride=(1,), dilation=(1,), padding=0,
                                                padding_mode="zeros", n_experts=2,
                                                bias=False), seed=0)
    expected = expected_forward(case)
    actual = expected.value.copy()
    actual.reshape(-1)[0] = math.nan
    assert worst(judge(backend.asarray(actual), expected, "float64")).units == math.inf


# ---------------------------------------------------------------- rows


def _expected_order(variants, dtypes):
    return [(variant, direction, dtype) for variant in variants for direction in gpu.DIRECTIONS
            for dtype in dtypes]


def test_reference_rows_pass_in_float32_and_float64_on_every_backend(backend):
    rows = gpu.compare_backend(backend, cases=2, sizes=SMALL, dtypes=("float32", "float64"))
    assert [(r.op, r.kind, r.dtype) for r in rows] == _expected_order(
        VARIANTS, ("float32", "float64"))
    failures = [f"{r.op} {r.kind} {r.dtype}: {r.units:.3g} x the bound; {r.detail}"
                for r in rows if r.status != "PASS"]
    assert not failures, "\n".join(failures)
    for row in rows:
        assert row.cases == 2 and row.failed == 0 and row.repeat_identical is True
        assert row.precision == row.dtype
        assert 0 <= row.units <= 1


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_float16_ops_accumulate_in_float32_and_round_once(backend, variant):
    rows = gpu.compare_backend(backend, cases=3, sizes=SMALL, dtypes=("float16",),
                               variants=[variant])
    if not hasattr(backend.xp, "float16"):
        assert {row.status for row in rows} == {"SKIP"}
        assert all(row.skipped == f"{backend.name} has no float16" for row in rows)
        return
    for row in rows:
        assert row.precision == "float16/float32"
        assert row.status == "PASS", f"{row.kind}: {row.units:.3g} x the bound; {row.detail}"


def test_progress_counts_every_case_of_every_variant_and_dtype(backend):
    calls = []
    gpu.compare_backend(backend, cases=2, sizes=SMALL, dtypes=("float32", "float64"),
                        variants=["conv", "mix_experts"],
                        progress=lambda *call: calls.append(call))
    assert [done for _, done, _ in calls] == list(range(1, 9))
    assert {total for _, _, total in calls} == {8}
    assert calls[0][0] == "conv float32" and calls[-1][0] == "mix_experts float64"


def test_same_seed_gives_the_same_rows_and_another_seed_does_not():
    def errors(seed):
        rows = gpu.compare_backend("numpy", cases=2, seed=seed, sizes=SMALL,
                                   dtypes=("float32",), variants=["condconv"])
        return [(row.units, row.where) for row in rows]

    assert errors(1) == errors(1)
    assert errors(1) != errors(2)


def test_nondeterministic_op_is_named_and_fails(backend, monkeypatch):
    monkeypatch.setitem(VARIANTS, "conv", _noisy_conv())
    report = gpu.check(cases=2, dtypes=("float32",), tf32=False, torch=False,
                       backend=backend.name, variants=["conv", "mix_experts"], sizes=SMALL)
    assert report.nondeterministic == ("conv forward float32",)
    assert [row.op for row in report.failures] == ["conv"]
    noisy = report.failures[0]
    assert noisy.repeat_identical is False and noisy.units <= 1
    assert "the repeat differs bitwise in cases 0, 1" in noisy.detail
    assert not report.passed


def test_without_determinism_the_repeat_is_not_run(monkeypatch):
    monkeypatch.setitem(VARIANTS, "conv", _noisy_conv())
    rows = gpu.compare_backend("numpy", cases=1, sizes=SMALL, dtypes=("float32",),
                               variants=["conv"], determinism=False)
    assert [row.repeat_identical for row in rows] == [None, None]
    assert [row.status for row in rows] == ["PASS", "PASS"]


def test_op_that_raises_fails_its_rows_with_the_error(backend, monkeypatch):
    def broken(*args, **kwargs):
        raise ZeroDivisionError("boom")

    monkeypatch.setitem(VARIANTS, "mix_experts", replace(VARIANTS["mix_experts"], vjp=broken))
    rows = gpu.compare_backend(backend, cases=2, sizes=SMALL, dtypes=("float32",),
                               variants=["mix_experts", "conv"])
    by_op = {(row.op, row.kind): row for row in rows}
    for direction in gpu.DIRECTIONS:
        row = by_op["mix_experts", direction]
        assert row.status == "FAIL" and row.failed == 2 and math.isnan(row.units)
        assert row.detail == "case 0: ZeroDivisionError: boom"
        assert by_op["conv", direction].status == "PASS"


@pytest.mark.parametrize("arguments, message", [
    (dict(dtypes=("int8",)), "dtypes"), (dict(dtypes=()), "dtypes"),
    (dict(variants=["nope"]), "variants"),
    (dict(cases=0), "cases"), (dict(seed=-1), "seed"),
])
def test_bad_arguments_raise_naming_them(arguments, message):
    with pytest.raises(ValueError, match=message):
        gpu.compare_backend("numpy", **arguments)


# ---------------------------------------------------------------- report, environment, TF32


def test_environment_names_the_backend_and_versions(backend):
    found = gpu.environment(backend)
    assert found["backend"] == backend.name and found["numpy"] == np.__version__
    if backend.name == "cupy":
        for key in ("device", "CUDA runtime", "CUDA driver", "CuPy", "memory pool"):
            assert found[key]


def _fake_cupy(monkeypatch, capability, compute_type):
    """A stand-in for the few CuPy calls the environment and TF32 probes make, shaped as
    CuPy documents them; the ``gpu`` tests make the same calls on the real CuPy."""
    linalg = types.ModuleType("cupy._core._routines_linalg")
    linalg.COMPUTE_TYPE_TF32 = 4
    linalg.get_compute_type = lambda dtype: compute_type
    core = types.ModuleType("cupy._core")
    core._routines_linalg = linalg
    device = types.SimpleNamespace(id=0, compute_capability=capability,
                                   mem_info=(2**30, 80 * 2**30))
    runtime = types.SimpleNamespace(getDeviceProperties=lambda index: {"name": b"Fake GPU"},
                                    runtimeGetVersion=lambda: 12040,
                                    driverGetVersion=lambda: 13000)
    pool = types.SimpleNamespace(total_bytes=lambda: 3 * 2**20, used_bytes=lambda: 2**19)
    cupy = types.ModuleType("cupy")
    cupy.__version__ = "13.3.0"
    cupy.cuda = types.SimpleNamespace(runtime=runtime, Device=lambda: device)
    cupy.get_default_memory_pool = lambda: pool
    cupy._core = core
    for name, module in (("cupy", cupy), ("cupy._core", core),
                         ("cupy._core._routines_linalg", linalg)):
        monkeypatch.setitem(sys.modules, name, module)


def test_cupy_environment_reports_device_versions_and_pool(monkeypatch):
    _fake_cupy(monkeypatch, "120", compute_type=1)
    found = gpu.environment(Backend("cupy", get_backend("numpy").xp))
    assert found["device"] == "Fake GPU" and found["compute capability"] == "12.0"
    assert (found["CUDA runtime"], found["CUDA driver"], found["CuPy"]) == ("12.4", "13.0",
                                                                           "13.3.0")
    assert found["device memory"] == "81920.0 MiB total, 1024.0 MiB free"
    assert found["memory pool"] == "3.0 MiB held (peak of this process), 0.5 MiB in use"


@pytest.mark.parametrize("variable, capability, compute_type, expected", [
    ("1", "90", 4, (True, "")),
    ("1", "90", 1, (False, "CuPy's float32 compute type is not TF32")),
    ("1", "70", 4, (False, "compute capability 7.0 has no TF32")),
    (None, "90", 4, (False, "CUPY_TF32 is not 1 in the subprocess")),
])
def test_tf32_probe_needs_the_variable_ampere_and_cupys_compute_type(
        monkeypatch, variable, capability, compute_type, expected):
    _fake_cupy(monkeypatch, capability, compute_type)
    if variable is None:
        monkeypatch.delenv("CUPY_TF32", raising=False)
    else:
        monkeypatch.setenv("CUPY_TF32", variable)
    assert gpu._cupy_tf32_in_effect() == expected


def test_tf32_child_reruns_the_float32_cases_and_reports_json(backend):
    """The child judges its rows by TF32's bound, with float32's as the baseline."""
    variants = ["conv", "route_softmax"]
    rows, in_effect, why = gpu.run_tf32_child(backend.name, cases=2, seed=3,
                                              variants=variants, sizes=SMALL)
    assert [(r.op, r.kind, r.dtype) for r in rows] == _expected_order(variants,
                                                                            ("float32",))
    if backend.name != "cupy":
        assert not in_effect and why == f"backend {backend.name} has no TF32 mode"
        here = gpu.compare_backend(backend, cases=2, seed=3, variants=variants, sizes=SMALL,
                                   dtypes=("float32",), determinism=False, precision="tf32")
        assert rows == here  # the same cases, the same numbers, through JSON
    elif in_effect:
        assert {row.precision for row in rows} == {"tf32"}
        assert all(row.status == "PASS" for row in rows), [r.detail for r in rows]


def test_tf32_child_sets_cupy_tf32_before_anything_runs():
    command = [sys.executable, "-m", "condconv_ref.gpu", "--tf32-child", "--backend", "numpy",
               "--cases", "1", "--variant", "mix_experts", "--sizes", "{}"]
    done = subprocess.run(command, env={**os.environ, "CUPY_TF32": "1"}, capture_output=True,
                          text=True, check=True)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["cupy_tf32"] == "1" and result["tf32"] is False
    assert [row["op"] for row in result["rows"]] == ["mix_experts", "mix_experts"]


def test_failing_tf32_child_raises_with_its_last_error_line():
    with pytest.raises(RuntimeError,
                       match=r"exited with status 1: .*unknown backend 'tensorflow'"):
        gpu.run_tf32_child("tensorflow", cases=1, variants=["conv"], sizes=SMALL)


def test_tf32_rows_join_the_report_when_the_child_confirms_tf32(monkeypatch):
    real_run = subprocess.run

    def child_with_tf32(command, **kwargs):
        """The real child, its answer edited to say TF32 was in effect."""
        done = real_run(command, **kwargs)
        result = json.loads(done.stdout.strip().splitlines()[-1])
        result.update(tf32=True, why="confirmed")
        return subprocess.CompletedProcess(done.args, 0, json.dumps(result), done.stderr)

    monkeypatch.setattr(gpu.subprocess, "run", child_with_tf32)
    report = gpu.check(cases=1, dtypes=("float32",), determinism=False, torch=False,
                       backend="numpy", variants=["conv"], sizes=SMALL)
    assert [(row.op, row.kind, row.precision) for row in report.rows] == [
        ("conv", "forward", "float32"), ("conv", "vjp", "float32"),
        ("conv", "forward", "tf32"), ("conv", "vjp", "tf32")]
    assert report.notes == ("TF32: confirmed",)
    extra = report.tf32_extra()
    plain, tf32 = report.rows[:2], report.rows[2:]
    assert extra == [(row.op, row.kind, row.units, twin.baseline_units)
                     for row, twin in zip(plain, tf32)]
    assert all(0 <= twin.baseline_units for twin in tf32)


def test_tf32_run_needs_float32_among_the_dtypes(monkeypatch):
    def no_child(command, **kwargs):
        raise AssertionError("the TF32 subprocess was started")

    monkeypatch.setattr(gpu.subprocess, "run", no_child)
    report = gpu.check(cases=1, dtypes=("float64",), torch=False, backend="numpy",
                       variants=["conv"], sizes=SMALL)
    assert report.notes == ("TF32 run skipped: float32 is not among the dtypes",)
    assert report.passed


def test_failed_tf32_child_is_a_problem_of_the_report(monkeypatch):
    def failing(command, **kwargs):
        return subprocess.CompletedProcess(command, 1, "", "ImportError: no cupy here\n")

    monkeypatch.setattr(gpu.subprocess, "run", failing)
    report = gpu.check(cases=1, dtypes=("float32",), torch=False, backend="numpy",
                       variants=["conv"], sizes=SMALL)
    assert report.problems == ("the TF32 subprocess exited with status 1: ImportError: no "
                               "cupy here",)
    assert all(row.status == "PASS" for row in report.rows) and not report.passed


def test_rows_survive_json():
    row = Row("conv", "vjp", cases=3, failed=1, units=math.inf, where="case 1, output [0]",
              dtype="float16", precision="float16/float32", repeat_identical=False,
              detail="d", baseline_units=0.5)
    assert Row.from_json(json.loads(json.dumps(row.to_json(), allow_nan=False))) == row


# ---------------------------------------------------------------- torch


@pytest.mark.torch
def test_torch_conv2d_agrees_with_the_reference_in_float32():
    torch = pytest.importorskip("torch")
    before = torch.backends.cudnn.allow_tf32
    device = "cuda" if torch.cuda.is_available() else "cpu"
    rows = gpu.compare_torch(device, cases=3, sizes=SMALL)
    assert torch.backends.cudnn.allow_tf32 == before
    if device == "cpu":
        assert [(r.op, r.kind, r.precision) for r in rows] == [
            (gpu.TORCH_OP, "forward", "float32"), (gpu.TORCH_OP, "vjp", "float32")]
    assert all(row.status == "PASS" for row in rows), [row.detail for row in rows]


@pytest.mark.torch
def test_torch_without_cuda_is_a_note_not_a_failure(monkeypatch):
    torch = pytest.importorskip("torch")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(BackendUnavailable, match="torch has no CUDA device"):
        gpu.compare_torch("cuda", cases=1)


# ---------------------------------------------------------------- the command


def _text(captured: str) -> str:
    return ANSI.sub("", captured)


def test_gpu_check_without_cupy_is_one_line_and_exit_2(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "cupy", None)  # as on a machine without CuPy
    assert main(["gpu-check"]) == 2
    captured = capsys.readouterr()
    lines = [line for line in _text(captured.err).splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in captured.err
    assert lines[0].startswith("condconv-ref gpu-check: error: backend 'cupy' is not available")
    assert "gpu-check needs CuPy and a CUDA GPU" in lines[0]
    assert captured.out == ""


def test_gpu_check_command_exits_2_on_a_machine_without_a_gpu():
    try:
        get_backend("cupy")
    except BackendUnavailable:
        pass
    else:
        pytest.skip("CuPy and a GPU are present here")
    done = subprocess.run([sys.executable, "-m", "condconv_ref.cli", "gpu-check"],
                          capture_output=True, text=True, check=False)
    assert done.returncode == 2 and done.stdout == ""
    assert len(done.stderr.strip().splitlines()) == 1


def _row_line(output: str, *cells: str) -> str:
    lines = [line for line in output.splitlines() if all(f"│ {cell} " in line for cell in cells)]
    assert len(lines) == 1, f"expected one row for {cells} in:\n{output}"
    return lines[0]


def test_gpu_check_prints_a_row_per_op_direction_and_dtype(capsys):
    argv = ["gpu-check", "--backend", "numpy", "--cases", "1", "--dtype", "float32",
            "--dtype", "float64", "--variant", "conv", "--variant", "condconv", "--no-torch"]
    assert main(argv) == 0
    out = _text(capsys.readouterr().out)
    for op, direction, dtype in _expected_order(["conv", "condconv"], ("float32", "float64")):
        line = _row_line(out, op, direction, dtype)
        assert "same" in line and "PASS" in line
    assert "backend: numpy" in out
    assert "note: TF32 rows left out: backend numpy has no TF32 mode" in out
    assert "all 8 rows passed" in out


def test_gpu_check_exits_1_and_names_the_nondeterministic_op(monkeypatch, capsys):
    monkeypatch.setitem(VARIANTS, "conv", _noisy_conv())
    argv = ["gpu-check", "--backend", "numpy", "--cases", "1", "--dtype", "float64",
            "--variant", "conv", "--no-tf32", "--no-torch"]
    assert main(argv) == 1
    out = _text(capsys.readouterr().out)
    assert "DIFFERS" in _row_line(out, "conv", "forward") and "FAIL" in _row_line(
        out, "conv", "forward")
    assert "not bitwise repeatable: conv forward float64" in out
    assert "1 of 2 rows failed" in out


# ---------------------------------------------------------------- on a GPU


@pytest.mark.gpu
def test_gpu_check_passes_on_this_gpu():
    _cupy_backend()
    report = gpu.check(cases=3)
    assert report.environment["device"]
    failures = [f"{r.op} {r.kind} {r.dtype}/{r.precision}: {r.units:.3g}; {r.detail}"
                for r in report.failures]
    assert report.passed, "\n".join(failures + list(report.problems))
