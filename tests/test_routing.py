"""route_sigmoid: the formula, stability for any logit, no pooling of 2-D x, its VJP."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from condconv_ref import route_sigmoid, route_sigmoid_vjp
from condconv_ref.backends import to_numpy
from condconv_ref.testing import assert_close, check_vjp
from condconv_ref.testing.strategies import seeds

x_shapes = st.tuples(st.integers(1, 3), st.integers(1, 4)).flatmap(
    lambda batch_channels: st.lists(st.integers(1, 4), min_size=0, max_size=3).map(
        lambda spatial: batch_channels + tuple(spatial)))


def routing_arrays(x_shape, n_experts, with_bias, seed, dtype="float64"):
    """NumPy x (B, C, *spatial), weight (E, C) and bias (E,) or None, rounded to ``dtype``."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(x_shape).astype(dtype)
    weight = rng.standard_normal((n_experts, x_shape[1])).astype(dtype)
    bias = rng.standard_normal(n_experts).astype(dtype) if with_bias else None
    return x, weight, bias


def on_backend(backend, *arrays):
    return [None if a is None else backend.asarray(a) for a in arrays]


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@given(x_shape=x_shapes, n_experts=st.integers(1, 4), with_bias=st.booleans(), seed=seeds())
def test_route_sigmoid_matches_direct_formula(backend, dtype, x_shape, n_experts, with_bias,
                                              seed):
    x, weight, bias = routing_arrays(x_shape, n_experts, with_bias, seed, dtype)
    pooled = x.astype(np.float64).mean(axis=tuple(range(2, x.ndim)))
    logits = pooled @ weight.astype(np.float64).T + (0.0 if bias is None else bias)
    expected = 1.0 / (1.0 + np.exp(-logits))
    routing = route_sigmoid(*on_backend(backend, x, weight, bias))
    assert_close(routing, backend.asarray(expected, dtype=dtype),
                 reduction_length=x[0, 0].size * x.shape[1], name="route_sigmoid")


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("spatial", [(), (3,), (2, 2), (1, 2, 2)])
def test_route_sigmoid_is_stable_for_extreme_logits(backend, dtype, spatial):
    # x = 1 everywhere, so the pooled input is 1 and the logits are the rows of weight.
    logits = np.array([1e4, -1e4, 0.0, 80.0, -80.0, 800.0, -800.0])
    expected = 1.0 / (1.0 + np.exp(-np.clip(logits, -700.0, 700.0)))
    x = backend.asarray(np.ones((2, 1) + spatial), dtype=dtype)
    weight = backend.asarray(logits.reshape(-1, 1), dtype=dtype)
    cotangent = backend.asarray(np.ones((2, logits.size)), dtype=dtype)
    with warnings.catch_warnings(), np.errstate(over="raise", invalid="raise", divide="raise"):
        warnings.simplefilter("error")
        routing = route_sigmoid(x, weight)
        grads = route_sigmoid_vjp(cotangent, x, weight)
    values = to_numpy(routing)
    assert np.all(np.isfinite(values)) and np.all((values >= 0.0) & (values <= 1.0))
    assert_close(routing, backend.asarray(np.broadcast_to(expected, (2, logits.size)),
                                          dtype=dtype), name="route_sigmoid")
    for name, gradient in grads.items():
        assert np.all(np.isfinite(to_numpy(gradient))), name


@given(x_shape=st.tuples(st.integers(1, 3), st.integers(1, 4)), n_experts=st.integers(1, 4),
       with_bias=st.booleans(), seed=seeds())
def test_route_sigmoid_does_not_pool_2d_input(backend, x_shape, n_experts, with_bias, seed):
    x, weight, bias = routing_arrays(x_shape, n_experts, with_bias, seed)
    logits = x @ weight.T + (0.0 if bias is None else bias)
    routing = route_sigmoid(*on_backend(backend, x, weight, bias))
    assert_close(routing, backend.asarray(1.0 / (1.0 + np.exp(-logits))),
                 reduction_length=x.shape[1], name="route_sigmoid")


@given(x_shape=x_shapes, n_experts=st.integers(1, 4), with_bias=st.booleans(), seed=seeds())
def test_route_sigmoid_vjp_matches_finite_differences(backend, x_shape, n_experts, with_bias,
                                                      seed):
    x, weight, bias = on_backend(backend, *routing_arrays(x_shape, n_experts, with_bias, seed))
    args = {"x": x, "weight": weight} | ({} if bias is None else {"bias": bias})
    check_vjp(route_sigmoid, route_sigmoid_vjp, args, seed=seed)


def test_route_sigmoid_vjp_is_accurate_in_the_saturated_regime(backend):
    # sigma'(z) = e / (1 + e)^2 with e = exp(-|z|): exp(-30) / (1 + exp(-30))^2 for z = +-30.
    x = backend.asarray(np.ones((1, 2)))
    weight = backend.asarray(np.array([[15.0, 15.0], [-15.0, -15.0]]))
    grads = route_sigmoid_vjp(backend.asarray(np.ones((1, 2))), x, weight)
    e = np.exp(-30.0)
    # atol = 0: the values are ~1e-13, so only the relative error says anything.
    assert_close(grads["weight"], backend.asarray(np.full((2, 2), e / (1.0 + e) ** 2)),
                 atol=0.0, name="route_sigmoid_vjp[weight]")
