"""Dynamic Convolution: route_softmax, dynamic_conv_layer, their VJPs, temperature_schedule."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from hypothesis import assume, example, given
from hypothesis import strategies as st

from condconv_ref import (
    dynamic_conv_layer,
    dynamic_conv_layer_vjp,
    moe_condconv,
    route_softmax,
    route_softmax_vjp,
    temperature_schedule,
)
from condconv_ref.backends import to_numpy
from condconv_ref.engine import finite_difference_check
from condconv_ref.testing import ConvConfig, assert_close, default_tolerances
from condconv_ref.testing.strategies import arrays_for, conv_configs, seeds
from condconv_ref.variants import Case, build_case

# Finite differences move a ReLU pre-activation by about step * |tangent| ~ 1e-4;
# points drawn at least this far from the kink stay on one side of it.
KINK_MARGIN = 0.05

x_shapes = st.tuples(st.integers(1, 3), st.integers(1, 4)).flatmap(
    lambda batch_channels: st.lists(st.integers(1, 3), min_size=0, max_size=3).map(
        lambda spatial: batch_channels + tuple(spatial)))
temperatures = st.sampled_from([0.25, 1.0, 4.0])
small_configs = conv_configs(spatial_dims=(1, 2), max_batch=2, max_experts=3, max_groups=2,
                             max_channels_per_group=2, max_out_per_group=2, max_size=5)


def _pool(x):
    return x.mean(axis=tuple(range(2, x.ndim))) if x.ndim > 2 else x


def _routing_params(pooled, hidden, n_experts, *, with_bias, seed):
    """NumPy fc1/fc2 weights (and biases) with every ReLU pre-activation >= KINK_MARGIN from 0.

    Each row of fc1 (and its bias) is redrawn until ``|pooled . fc1_h + b1_h| >
    KINK_MARGIN`` for every example; returns None if some row never gets there
    (possible only when a pooled input is nearly zero and there is no bias).
    """
    rng = np.random.default_rng(seed)
    channels = pooled.shape[1]
    fc1_rows, fc1_bias = [], []
    for _ in range(hidden):
        for _attempt in range(50):
            row = rng.standard_normal(channels)
            bias = rng.standard_normal() if with_bias else 0.0
            if np.all(np.abs(pooled @ row + bias) > KINK_MARGIN):
                break
        else:
            return None
        fc1_rows.append(row)
        fc1_bias.append(bias)
    params = {"fc1_weight": np.stack(fc1_rows),
              "fc2_weight": rng.standard_normal((n_experts, hidden))}
    if with_bias:
        params["fc1_bias"] = np.array(fc1_bias)
        params["fc2_bias"] = rng.standard_normal(n_experts)
    return params


def _reference_logits(x, params):
    """The routing logits in float64 NumPy, straight from the formula."""
    pre = _pool(x) @ params["fc1_weight"].T + params.get("fc1_bias", 0.0)
    return np.maximum(pre, 0.0) @ params["fc2_weight"].T + params.get("fc2_bias", 0.0)


def _on_backend(backend, arrays, dtype="float64"):
    return {k: backend.asarray(v, dtype=dtype) for k, v in arrays.items()}


def _routing_case(x_shape, hidden, n_experts, with_bias, seed):
    """NumPy x and routing params away from the ReLU kinks (hypothesis rejects the rare miss)."""
    x = np.random.default_rng(seed).standard_normal(x_shape)
    params = _routing_params(_pool(x), hidden, n_experts, with_bias=with_bias, seed=seed + 1)
    assume(params is not None)
    return x, params


# ---------------------------------------------------------------- route_softmax forward


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@given(x_shape=x_shapes, hidden=st.integers(1, 4), n_experts=st.integers(1, 4),
       with_bias=st.booleans(), temperature=temperatures, seed=seeds())
def test_route_softmax_rows_sum_to_one(backend, dtype, x_shape, hidden, n_experts, with_bias,
                                       temperature, seed):
    x, params = _routing_case(x_shape, hidden, n_experts, with_bias, seed)
    routing = route_softmax(backend.asarray(x, dtype=dtype),
                            **_on_backend(backend, params, dtype), temperature=temperature)
    assert routing.dtype == backend.dtype(dtype)
    values = to_numpy(routing)
    assert values.shape == (x_shape[0], n_experts)
    assert np.all(values >= 0.0)
    assert_close(backend.xp.sum(routing, axis=1),
                 backend.asarray(np.ones(x_shape[0]), dtype=dtype),
                 reduction_length=n_experts, name="sum of route_softmax over experts")


@given(x_shape=x_shapes, hidden=st.integers(1, 4), n_experts=st.integers(1, 4),
       with_bias=st.booleans(), temperature=temperatures, seed=seeds())
def test_route_softmax_matches_direct_formula(backend, x_shape, hidden, n_experts, with_bias,
                                              temperature, seed):
    x, params = _routing_case(x_shape, hidden, n_experts, with_bias, seed)
    logits = _reference_logits(x, params)
    weights = np.exp((logits - logits.max(axis=1, keepdims=True)) / temperature)
    expected = weights / weights.sum(axis=1, keepdims=True)
    routing = route_softmax(backend.asarray(x), **_on_backend(backend, params),
                            temperature=temperature)
    assert_close(routing, backend.asarray(expected), name="route_softmax",
                 reduction_length=math.prod(x_shape[1:]) + hidden)


@given(x_shape=x_shapes, hidden=st.integers(1, 4), n_experts=st.integers(2, 4),
       with_bias=st.booleans(), seed=seeds())
def test_route_softmax_tends_to_uniform_at_high_temperature(backend, x_shape, hidden, n_experts,
                                                            with_bias, seed):
    # With logit spread D = max z - min z, every softmax(z / T)_e lies in
    # [exp(-D/T) / E, exp(D/T) / E], so |alpha_e - 1/E| <= (exp(D/T) - 1) / E.
    # The distance also shrinks as T grows: d log alpha_e / d(1/T) = z_e - <z, alpha>
    # is >= 0 for the largest logit and <= 0 for the smallest, so max alpha falls
    # and min alpha rises towards 1/E.
    x, params = _routing_case(x_shape, hidden, n_experts, with_bias, seed)
    logits = _reference_logits(x, params)
    spread = float(np.max(logits.max(axis=1) - logits.min(axis=1)))
    arrays = _on_backend(backend, params)
    previous_distance = math.inf
    for temperature in (1e1, 1e2, 1e3):
        routing = route_softmax(backend.asarray(x), **arrays, temperature=temperature)
        distance = float(np.max(np.abs(to_numpy(routing) - 1.0 / n_experts)))
        bound = math.expm1(spread / temperature) / n_experts
        assert distance <= bound + 1e-15, (temperature, distance, bound)
        assert distance <= previous_distance + 1e-15
        previous_distance = distance


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@given(n_experts=st.integers(2, 5), batch=st.integers(1, 3), seed=seeds())
def test_route_softmax_tends_to_one_hot_on_the_largest_logit(backend, dtype, n_experts, batch,
                                                            seed):
    # x is (B, E), each row a permutation of 2, 3, ..., E + 1, and fc1 = fc2 = I,
    # so the (positive) logits are x itself and the largest beats the next by
    # gap = 1.  Each other entry is <= exp(-gap / T), and 1 - max alpha is their
    # sum, so |softmax(z/T) - one_hot| <= (E - 1) exp(-gap / T) elementwise.
    rng = np.random.default_rng(seed)
    x = np.stack([rng.permutation(n_experts) + 2.0 for _ in range(batch)])
    eye = np.eye(n_experts)
    one_hot = (x == x.max(axis=1, keepdims=True)).astype(np.float64)
    arrays = _on_backend(backend, {"x": x, "fc1_weight": eye, "fc2_weight": eye}, dtype)
    for temperature in (1e-1, 1e-2, 1e-3):
        routing = route_softmax(arrays["x"], arrays["fc1_weight"], arrays["fc2_weight"],
                                temperature=temperature)
        bound = (n_experts - 1) * math.exp(-1.0 / temperature)
        assert_close(routing, backend.asarray(one_hot, dtype=dtype),
                     atol=bound + default_tolerances(dtype)[1], rtol=0.0,
                     name=f"route_softmax at T={temperature}")


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("temperature", [1e-3, 1.0, 1e3])
@pytest.mark.parametrize("spatial", [(), (2, 2)])
def test_route_softmax_is_stable_at_extreme_logits(backend, dtype, temperature, spatial):
    # x = 1 everywhere and fc1 = [[1]], so the hidden unit is 1 and the logits are
    # the column fc2: +-1e4, 0 and 1e4 - 1 (all exact in float32).  The expected
    # routing is the softmax of z / T written with Python floats; exp of the
    # shifted logit s has relative condition number |s|, hence the tolerance
    # (entries with s < -100 are 0 in both).  With h = 1, the fc2 gradient is
    # sum_b (diag alpha - alpha alpha^T) c_b / T, each entry at most 2 max|c| / T.
    logits = [1e4, -1e4, 0.0, 1e4 - 1.0]
    shifted = [(z - max(logits)) / temperature for z in logits]
    weights = [math.exp(s) for s in shifted]
    expected = np.array([w / sum(weights) for w in weights])
    x = backend.asarray(np.ones((2, 1) + spatial), dtype=dtype)
    fc1 = backend.asarray(np.ones((1, 1)), dtype=dtype)
    fc2 = backend.asarray(np.array(logits).reshape(-1, 1), dtype=dtype)
    cotangent_np = np.array([[1.0, -2.0, 3.0, 0.5], [0.0, 1.0, 0.0, 0.0]])
    cotangent = backend.asarray(cotangent_np, dtype=dtype)
    with warnings.catch_warnings(), np.errstate(over="raise", invalid="raise", divide="raise"):
        warnings.simplefilter("error")
        routing = route_softmax(x, fc1, fc2, temperature=temperature)
        grads = route_softmax_vjp(cotangent, x, fc1, fc2, temperature=temperature)
    tolerance = default_tolerances(dtype)[0] * (1.0 + max(abs(s) for s in shifted if s > -100))
    assert_close(routing, backend.asarray(np.stack([expected, expected]), dtype=dtype),
                 rtol=tolerance, atol=tolerance, name="route_softmax")
    for name, gradient in grads.items():
        assert np.all(np.isfinite(to_numpy(gradient))), name
    jacobian = (np.diag(expected) - np.outer(expected, expected)) / temperature
    grad_fc2 = (jacobian @ cotangent_np.sum(axis=0)).reshape(-1, 1)
    gradient_bound = len(cotangent_np) * 2 * float(np.abs(cotangent_np).max()) / temperature
    assert_close(grads["fc2_weight"], backend.asarray(grad_fc2, dtype=dtype), rtol=tolerance,
                 atol=tolerance * gradient_bound, name="route_softmax_vjp[fc2_weight]")


# ---------------------------------------------------------------- route_softmax VJP


@given(x_shape=x_shapes, hidden=st.integers(1, 4), n_experts=st.integers(1, 4),
       with_bias=st.booleans(), temperature=temperatures, seed=seeds())
def test_route_softmax_vjp_matches_finite_differences(backend, x_shape, hidden, n_experts,
                                                      with_bias, temperature, seed):
    # The library's finite-difference check, with its derived bound: the rounding of the
    # differences (large for a saturated softmax, whose outputs near 1 barely change) and
    # Richardson's correction for the truncation (large at small T) are part of it.
    x, params = _routing_case(x_shape, hidden, n_experts, with_bias, seed)
    longest = max(math.prod(x_shape[2:]), x_shape[1], hidden, n_experts)
    case = Case("route_softmax", {"x": x, **params}, {"temperature": temperature},
                (longest, longest), seed=seed)
    measured = finite_difference_check(case, "float64", backend, seed=seed)
    assert measured.passed, measured


def test_route_softmax_vjp_takes_relu_derivative_zero_at_the_kink(backend):
    # fc1 = [[1], [-1]] on pooled x = 0 puts both pre-activations exactly at 0;
    # with the documented convention nothing flows back through the ReLU.
    x = backend.asarray(np.zeros((1, 1, 3)))
    fc1 = backend.asarray(np.array([[1.0], [-1.0]]))
    fc2 = backend.asarray(np.array([[1.0, 2.0], [-1.0, 0.5]]))
    grads = route_softmax_vjp(backend.asarray(np.array([[1.0, -1.0]])), x, fc1, fc2)
    assert_close(grads["fc1_weight"], backend.asarray(np.zeros((2, 1))), name="fc1_weight")
    assert_close(grads["x"], backend.asarray(np.zeros((1, 1, 3))), name="x")


# ---------------------------------------------------------------- dynamic_conv_layer


def _layer_case(config, seed, dtype="float64"):
    """NumPy x and layer params for ``config``, away from the ReLU kinks; hidden width 1..3."""
    arrays = arrays_for(config, xp=np, seed=seed)
    hidden = 1 + seed % 3
    params = _routing_params(_pool(arrays.x), hidden, config.n_experts, with_bias=config.bias,
                             seed=seed + 1)
    assume(params is not None)
    params["experts"] = arrays.experts
    if config.bias:
        params["bias"] = arrays.bias
    return arrays.x.astype(dtype), {k: v.astype(dtype) for k, v in params.items()}


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@given(config=conv_configs(), temperature=temperatures, seed=seeds())
def test_dynamic_conv_layer_equals_mixture_of_experts(backend, dtype, config, temperature, seed):
    x_np, params_np = _layer_case(config, seed, dtype)
    x, params = backend.asarray(x_np), _on_backend(backend, params_np, dtype)
    y = dynamic_conv_layer(x, params, temperature=temperature, **config.options())
    routing = route_softmax(x, params["fc1_weight"], params["fc2_weight"],
                            params.get("fc1_bias"), params.get("fc2_bias"),
                            temperature=temperature)
    expected = moe_condconv(x, params["experts"], routing, params.get("bias"), **config.options())
    fan_in = config.in_channels // config.groups * math.prod(config.kernel)
    assert_close(y, expected, reduction_length=config.n_experts * fan_in + 1,
                 name="dynamic_conv_layer")
    assert y.shape == config.output_shape


@given(config=small_configs, temperature=temperatures, seed=seeds())
# T = 0.25 puts a third derivative of order 1/T^3 into the central difference: a flat
# 64 eps^(2/3) tolerance rejected this correct VJP (2.5e-9 of the terms' size).
@example(config=ConvConfig(batch=2, in_channels=2, out_channels=4, groups=2, spatial=(3,),
                           kernel=(1,), stride=(1,), dilation=(1,), padding="valid",
                           padding_mode="zeros", n_experts=2, bias=True),
         temperature=0.25, seed=93515)
def test_dynamic_conv_layer_vjp_matches_finite_differences(backend, config, temperature, seed):
    x, params = _layer_case(config, seed)
    case = Case("dynamic_conv_layer", {"x": x, **params},
                {"temperature": temperature, **config.options()},
                build_case("dynamic_conv_layer", config, seed).lengths, seed=seed)
    measured = finite_difference_check(case, "float64", backend, seed=seed)
    assert measured.passed, measured


def _torch_dynamic_conv(x, params, temperature, config):
    """Seed 002's DynamicConv forward in PyTorch, for 1-3 spatial dims, with padding applied.

    The batch is folded into the channels and convolved with ``groups * B``
    groups, as in the seed; the ``zeros`` path passes the padding to the
    convolution (the seed passes ``padding="valid"`` there, which is its bug).
    """
    import torch
    import torch.nn.functional as F

    batch, channels = x.shape[:2]
    pooled = x.mean(dim=tuple(range(2, x.ndim)))
    hidden = F.relu(F.linear(pooled, params["fc1_weight"], params.get("fc1_bias")))
    logits = F.linear(hidden, params["fc2_weight"], params.get("fc2_bias"))
    routing = torch.softmax(logits / temperature, dim=-1)
    experts = params["experts"]
    n_experts, out_channels = experts.shape[:2]
    weight = (routing @ experts.reshape(n_experts, -1)).reshape(
        batch * out_channels, *experts.shape[2:])
    bias = None
    if "bias" in params:
        bias = (routing @ params["bias"]).reshape(batch * out_channels)
    conv = getattr(F, f"conv{config.nd}d")
    folded = x.reshape(1, batch * channels, *x.shape[2:])
    padding = tuple(before for before, _ in config.padding_pairs)
    common = dict(stride=config.stride, dilation=config.dilation, groups=config.groups * batch)
    if config.padding_mode == "zeros":
        out = conv(folded, weight, bias, padding=padding, **common)
    else:
        reversed_padding_repeated_twice = tuple(p for p in reversed(padding) for _ in range(2))
        padded = F.pad(folded, reversed_padding_repeated_twice, mode=config.padding_mode)
        out = conv(padded, weight, bias, **common)
    return out.reshape(batch, out_channels, *out.shape[2:])


@given(config=conv_configs(padding_forms=("int", "per_dim"), max_batch=2, max_experts=3,
                          max_groups=2, max_size=5),
       temperature=temperatures, seed=seeds())
def test_dynamic_conv_layer_and_vjp_match_torch(backend, config, temperature, seed):
    torch = pytest.importorskip("torch")
    x_np, params_np = _layer_case(config, seed)
    x, params = backend.asarray(x_np), _on_backend(backend, params_np)
    cotangent_np = np.random.default_rng(seed + 2).standard_normal(config.output_shape)
    y = dynamic_conv_layer(x, params, temperature=temperature, **config.options())
    grads = dynamic_conv_layer_vjp(backend.asarray(cotangent_np), x, params,
                                   temperature=temperature, **config.options())

    leaves = {k: torch.tensor(v, requires_grad=True) for k, v in
              ({"x": x_np} | params_np).items()}
    torch_params = {k: v for k, v in leaves.items() if k != "x"}
    y_torch = _torch_dynamic_conv(leaves["x"], torch_params, temperature, config)
    (y_torch * torch.tensor(cotangent_np)).sum().backward()

    fan_in = config.in_channels // config.groups * math.prod(config.kernel)
    assert_close(y, backend.asarray(y_torch.detach().numpy()),
                 reduction_length=config.n_experts * fan_in + 1, name="dynamic_conv_layer")
    positions = math.prod(config.output_shape[1:]) * config.batch
    for name, leaf in leaves.items():
        assert_close(grads[name], backend.asarray(leaf.grad.numpy()),
                     reduction_length=positions * fan_in * config.n_experts,
                     name=f"dynamic_conv_layer_vjp[{name}]")


# ---------------------------------------------------------------- temperature_schedule


@pytest.mark.parametrize("start, end, anneal_steps", [(30.0, 1.0, 10), (34.0, 1.0, 11),
                                                      (1.0, 5.0, 4000), (30.0, 1.0, 2.5)])
def test_temperature_schedule_hits_start_middle_end_and_holds(start, end, anneal_steps):
    assert temperature_schedule(0, start=start, end=end, anneal_steps=anneal_steps) == start
    middle = temperature_schedule(anneal_steps / 2, start=start, end=end,
                                  anneal_steps=anneal_steps)
    assert middle == pytest.approx((start + end) / 2, rel=1e-15)
    assert temperature_schedule(anneal_steps, start=start, end=end,
                                anneal_steps=anneal_steps) == end
    for after in (anneal_steps + 1, 10 * anneal_steps, 1e12):
        assert temperature_schedule(after, start=start, end=end, anneal_steps=anneal_steps) == end


@given(step=st.floats(0.0, 100.0), anneal_steps=st.floats(0.5, 50.0),
       start=st.floats(0.01, 100.0), end=st.floats(0.01, 100.0))
def test_temperature_schedule_is_linear_then_constant(step, anneal_steps, start, end):
    value = temperature_schedule(step, start=start, end=end, anneal_steps=anneal_steps)
    progress = min(step / anneal_steps, 1.0)
    assert value == pytest.approx(start + (end - start) * progress, rel=1e-12, abs=1e-12)
    assert min(start, end) <= value <= max(start, end)


def test_temperature_schedule_maps_per_epoch_and_per_iteration_schedules():
    # The per-epoch decrement 34, 31, ..., 4, 1 (minus 3 after each epoch until 1)
    # is anneal_steps = (34 - 1) / 3 = 11 epochs.
    per_epoch = [temperature_schedule(e, start=34.0, end=1.0, anneal_steps=11) for e in range(14)]
    assert per_epoch == pytest.approx([max(34.0 - 3 * e, 1.0) for e in range(14)], rel=1e-14)
    # Per iteration over 10 epochs of 7 iterations agrees with the fractional epoch.
    for iteration in range(0, 90, 5):
        by_iteration = temperature_schedule(iteration, anneal_steps=10 * 7)
        by_epoch = temperature_schedule(iteration / 7, anneal_steps=10)
        assert by_iteration == pytest.approx(by_epoch, rel=1e-14)


@pytest.mark.parametrize("kwargs, error, message", [
    ({"step": -1, "anneal_steps": 10}, ValueError, "step must be finite and >= 0"),
    ({"step": math.nan, "anneal_steps": 10}, ValueError, "step must be finite and >= 0"),
    ({"step": True, "anneal_steps": 10}, TypeError, "step must be a real number"),
    ({"step": 0, "anneal_steps": 0}, ValueError, "anneal_steps must be finite and > 0"),
    ({"step": 0, "anneal_steps": math.inf}, ValueError, "anneal_steps must be finite and > 0"),
    ({"step": 0, "anneal_steps": 10, "start": 0.0}, ValueError, "start must be finite and > 0"),
    ({"step": 0, "anneal_steps": 10, "end": -1.0}, ValueError, "end must be finite and > 0"),
    ({"step": 0, "anneal_steps": 10, "end": math.inf}, ValueError, "end must be finite and > 0"),
])
def test_temperature_schedule_rejects_bad_arguments_by_name(kwargs, error, message):
    with pytest.raises(error, match=rf"^temperature_schedule: {message}"):
        temperature_schedule(**kwargs)
