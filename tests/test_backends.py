"""The backend registry: JAX by name, and float64 on JAX refused while its 64-bit mode is off.

JAX turns a float64 request into float32 when its 64-bit mode is off (its default); every way
of making float64 arrays on the jax backend refuses instead, with a message saying how to turn
the mode on.  The tests that need JAX skip with the reason where it is not installed."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from condconv_ref import cli, golden, verify
from condconv_ref.backends import BACKEND_NAMES, BackendUnavailable, get_backend, to_numpy
from condconv_ref.variants import build_case, reference_forward, reference_vjp
from derivative_cases import CONFIG

HOW_TO = r'jax\.config\.update\("jax_enable_x64", True\).*JAX_ENABLE_X64=1'


@pytest.fixture
def x64_off():
    """JAX with its 64-bit mode off (its default), restored afterwards."""
    jax = pytest.importorskip("jax", reason="needs JAX (pip install condconv_ref[jax])")
    enabled = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", False)
    yield jax
    jax.config.update("jax_enable_x64", enabled)


def test_jax_is_a_backend_name():
    assert "jax" in BACKEND_NAMES


def test_jax_without_jax_is_unavailable_in_one_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "jax", None)
    with pytest.raises(BackendUnavailable, match=r"^backend 'jax' is not available: cannot "
                                                 r"import jax [^\n]*$"):
        get_backend("jax")


def test_jax_backend_makes_jax_arrays_on_the_cpu(x64_off):
    backend = get_backend("jax")
    a = backend.asarray([1.5, 2.5], dtype="float32")
    assert isinstance(a, x64_off.Array)
    assert a.dtype == backend.dtype("float32") == x64_off.numpy.float32
    assert a.device == x64_off.devices("cpu")[0] == backend.device
    np.testing.assert_array_equal(to_numpy(a), np.array([1.5, 2.5], dtype=np.float32))


def test_jax_float64_is_refused_while_x64_is_off(x64_off):
    backend = get_backend("jax")
    with pytest.raises(ValueError, match=r"^backend 'jax': dtype float64 needs JAX's 64-bit "
                                         r"mode.*" + HOW_TO):
        backend.asarray(np.ones(2))  # float64 given, none asked for
    with pytest.raises(ValueError, match=HOW_TO):
        backend.asarray(np.ones(2, dtype=np.float32), dtype="float64")
    with pytest.raises(ValueError, match=HOW_TO):
        backend.dtype("float64")


def test_jax_float64_is_kept_with_x64_on(x64_off):
    x64_off.config.update("jax_enable_x64", True)
    backend = get_backend("jax")
    assert backend.asarray(np.ones(2)).dtype == backend.dtype("float64") == x64_off.numpy.float64


def test_reference_and_verify_refuse_float64_on_jax_while_x64_is_off(x64_off):
    case = build_case("condconv", CONFIG, seed=0)
    with pytest.raises(ValueError, match=HOW_TO):
        reference_forward(case, "jax")
    with pytest.raises(ValueError, match=HOW_TO):
        reference_vjp(case, np.ones(CONFIG.output_shape), "jax")
    with pytest.raises(ValueError, match=r"^verify \(its finite differences run in float64\): "
                                         r"dtype float64 .*" + HOW_TO):
        verify.run(backend="jax", cases=1, dtype="float32")


def test_float32_on_jax_runs_while_x64_is_off(x64_off):
    case = build_case("condconv", CONFIG, seed=0)
    y = reference_forward(case, "jax", "float32")
    assert y.dtype == x64_off.numpy.float32
    grads = reference_vjp(case, np.ones(CONFIG.output_shape), "jax", "float32")
    assert {str(g.dtype) for g in grads.values()} == {"float32"}


def test_golden_verify_refuses_float64_on_jax_while_x64_is_off(x64_off):
    with pytest.raises(ValueError, match=HOW_TO):
        golden.verify(golden.SHIPPED, backend="jax", variants=["conv"])


def test_the_command_refuses_float64_on_jax_when_the_environment_turns_x64_off(
        x64_off, monkeypatch, capsys):
    monkeypatch.setenv("JAX_ENABLE_X64", "0")
    assert cli.main(["verify", "--backend", "jax", "--cases", "1"]) == cli.EXIT_USAGE
    error = " ".join(capsys.readouterr().err.split())
    assert error.startswith("condconv-ref verify: error: verify (its finite differences run in "
                            "float64): dtype float64 needs JAX's 64-bit mode")
    assert "JAX_ENABLE_X64=1" in error
    assert not x64_off.config.jax_enable_x64


def test_the_command_turns_x64_on_for_jax_unless_the_environment_says(x64_off, monkeypatch):
    monkeypatch.delenv("JAX_ENABLE_X64", raising=False)
    assert cli.main(["golden", "verify", "--backend", "jax", "--variant", "conv"]) == 0
    assert x64_off.config.jax_enable_x64
