"""Properties of the numerical test helpers in condconv_ref.testing."""

from __future__ import annotations

import math

import array_api_compat
import array_api_strict
import numpy
import pytest

from condconv_ref.testing import (
    assert_close,
    check_vjp,
    default_tolerances,
    numerical_jvp,
    numerical_vjp,
)


def _random(backend, shape, seed, dtype_name="float64"):
    xp, device = backend.xp, backend.device
    draws = numpy.random.default_rng(seed).standard_normal(shape)
    return xp.asarray(draws, dtype=getattr(xp, dtype_name), device=device)


def _tanh_matmul(x, w):
    xp = array_api_compat.array_namespace(x, w)
    return xp.tanh(x @ w)


def _tanh_matmul_vjp(cotangent, x, w):
    xp = array_api_compat.array_namespace(cotangent, x, w)
    pre = cotangent * (1.0 - xp.tanh(x @ w) ** 2)
    return {"x": pre @ xp.matrix_transpose(w), "w": xp.matrix_transpose(x) @ pre}


# ---------------------------------------------------------------- default_tolerances


def test_default_tolerances_read_every_dtype_spelling():
    torch = pytest.importorskip("torch")
    spellings = [numpy.float32, numpy.dtype("float32"), "float32", torch.float32,
                 array_api_strict.float32]
    assert {default_tolerances(dtype) for dtype in spellings} == {default_tolerances("float32")}


def test_default_tolerances_grow_with_eps_and_reduction_length():
    rtol16, _ = default_tolerances("float16")
    rtol32, _ = default_tolerances("float32")
    rtol64, atol64 = default_tolerances("float64")
    assert rtol16 > rtol32 > rtol64 == atol64 > 0
    assert default_tolerances("float32", reduction_length=100)[0] == pytest.approx(10 * rtol32)
    assert default_tolerances("int64") == (0.0, 0.0)


# ---------------------------------------------------------------- assert_close


def test_assert_close_passes_on_equal_arrays(backend):
    xp, device = backend.xp, backend.device
    a = _random(backend, (3, 4), seed=0)
    assert_close(a, xp.asarray(a, copy=True))
    nan_and_inf = xp.asarray([math.nan, math.inf, -math.inf, 1.0], device=device)
    assert_close(nan_and_inf, xp.asarray(nan_and_inf, copy=True))


def test_assert_close_names_the_worst_element(backend):
    xp, device = backend.xp, backend.device
    desired = xp.ones((3, 4), dtype=xp.float64, device=device)
    offset = numpy.zeros((3, 4))
    offset[1, 2], offset[0, 0] = 1e-3, 1e-6
    actual = desired + xp.asarray(offset, device=device)
    with pytest.raises(AssertionError) as info:
        assert_close(actual, desired, name="output")
    message = str(info.value)
    assert message.startswith("output: 2 of 12 elements differ")
    assert "worst at index (1, 2): actual 1.001, desired 1.0" in message
    assert "max abs error 0.001" in message
    assert f"rtol={default_tolerances('float64')[0]:.3g}" in message


def test_assert_close_requires_matching_nan_positions(backend):
    xp, device = backend.xp, backend.device
    with pytest.raises(AssertionError, match=r"index \(1,\): actual nan, desired 2.0"):
        assert_close(xp.asarray([1.0, math.nan], device=device),
                     xp.asarray([1.0, 2.0], device=device))


def test_assert_close_equal_nan_switch_decides_whether_nan_matches_nan(backend):
    xp, device = backend.xp, backend.device
    with_nan = xp.asarray([1.0, math.nan], device=device)
    assert_close(with_nan, xp.asarray([1.0, math.nan], device=device))
    with pytest.raises(AssertionError, match=r"(?s)1 of 2 elements differ.*index \(1,\)"):
        assert_close(with_nan, xp.asarray([1.0, math.nan], device=device), equal_nan=False)
    assert_close(xp.asarray([1.0, math.inf], device=device),
                 xp.asarray([1.0, math.inf], device=device), equal_nan=False)


@pytest.mark.parametrize("actual, desired, argument", [
    (1.0, numpy.array(1.0), "actual"), (numpy.array([1.0]), [1.0], "desired"),
    (numpy.array(True), True, "desired")])
def test_assert_close_names_itself_for_python_scalars_and_lists(actual, desired, argument):
    with pytest.raises(TypeError, match=f"assert_close: {argument} must be an array"):
        assert_close(actual, desired)


def test_assert_close_rejects_dtype_and_shape_mismatch(backend):
    xp = backend.xp
    a = _random(backend, (2, 3), seed=0)
    with pytest.raises(AssertionError, match="dtype mismatch"):
        assert_close(xp.astype(a, xp.float32), a)
    with pytest.raises(AssertionError, match=r"shape mismatch.*\(2, 3\).*\(3, 2\)"):
        assert_close(a, xp.reshape(a, (3, 2)))
    assert_close(xp.astype(a, xp.float32), a, check_dtype=False)
    row = a[0:1, :]
    assert_close(xp.concat([row, row]), row, check_shape=False)


def test_assert_close_rejects_other_namespace_and_device():
    a = numpy.arange(3.0)
    with pytest.raises(AssertionError, match="namespace mismatch"):
        assert_close(array_api_strict.asarray(a), a)
    assert_close(array_api_strict.asarray(a), a, check_namespace=False)
    with pytest.raises(AssertionError, match="device mismatch"):
        assert_close(array_api_strict.asarray(a),
                     array_api_strict.asarray(a, device=array_api_strict.Device("device1")))


# ---------------------------------------------------------------- finite differences


def test_numerical_jvp_of_linear_map_is_its_matrix(backend):
    x, matrix, tangent = (_random(backend, shape, seed) for seed, shape in
                          enumerate([(2, 3), (3, 4), (2, 3)]))
    jvp = numerical_jvp(lambda x: x @ matrix, {"x": x}, {"x": tangent})
    assert_close(jvp, tangent @ matrix, rtol=1e-9, atol=1e-9)


def test_numerical_vjp_matches_analytic_gradient(backend):
    xp = backend.xp
    x, y, cotangent = (_random(backend, (2, 3), seed) for seed in range(3))
    gradients = numerical_vjp(lambda x, y: xp.sin(x) * y, {"x": x, "y": y}, cotangent)
    assert sorted(gradients) == ["x", "y"]
    assert_close(gradients["x"], cotangent * xp.cos(x) * y, rtol=1e-8, atol=1e-8)
    assert_close(gradients["y"], cotangent * xp.sin(x), rtol=1e-8, atol=1e-8)


# ---------------------------------------------------------------- check_vjp


@pytest.mark.parametrize("dtype_name", ["float64", "float32"])
def test_check_vjp_accepts_correct_vjp(backend, dtype_name):
    args = {
        "x": _random(backend, (2, 3), 0, dtype_name),
        "w": _random(backend, (3, 4), 1, dtype_name),
    }
    result = check_vjp(_tanh_matmul, _tanh_matmul_vjp, args)
    assert result.name == "_tanh_matmul"
    assert result.error <= result.rtol * result.scale


def test_check_vjp_names_argument_with_wrong_gradient(backend):
    def scaled_w_vjp(cotangent, x, w):
        gradients = _tanh_matmul_vjp(cotangent, x, w)
        return {"x": gradients["x"], "w": 1.01 * gradients["w"]}

    args = {"x": _random(backend, (2, 3), 0), "w": _random(backend, (3, 4), 1)}
    with pytest.raises(AssertionError) as info:
        check_vjp(_tanh_matmul, scaled_w_vjp, args, name="tanh_matmul")
    message = str(info.value)
    assert message.startswith("tanh_matmul: the VJP fails the dot-product test")
    assert "argument 'w': 12 of 12 gradient elements differ; worst at index (" in message
    assert "argument 'x'" not in message


def test_check_vjp_rejects_missing_and_misshapen_gradients(backend):
    xp = backend.xp
    args = {"x": _random(backend, (2, 3), 0), "w": _random(backend, (3, 4), 1)}

    def missing_w_vjp(cotangent, x, w):
        return {"x": _tanh_matmul_vjp(cotangent, x, w)["x"]}

    def transposed_w_vjp(cotangent, x, w):
        gradients = _tanh_matmul_vjp(cotangent, x, w)
        return {"x": gradients["x"], "w": xp.matrix_transpose(gradients["w"])}

    with pytest.raises(AssertionError, match=r"missing \['w'\]"):
        check_vjp(_tanh_matmul, missing_w_vjp, args)
    with pytest.raises(AssertionError, match=r"gradient for 'w' has shape \(4, 3\)"):
        check_vjp(_tanh_matmul, transposed_w_vjp, args)
    check_vjp(_tanh_matmul, missing_w_vjp, args, wrt=["x"])
