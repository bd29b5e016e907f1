"""CondConv: the mixture-of-experts equivalence, its properties, and every op's gradients."""

from __future__ import annotations

import math
from functools import partial

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from condconv_ref import (
    condconv,
    condconv_layer,
    condconv_layer_vjp,
    condconv_vjp,
    conv,
    mix_experts,
    mix_experts_vjp,
    moe_condconv,
    moe_condconv_vjp,
    route_sigmoid,
)
from condconv_ref.backends import to_numpy
from condconv_ref.testing import assert_close, check_vjp
from condconv_ref.testing.oracles import torch_conv
from condconv_ref.testing.strategies import arrays_for, conv_configs, seeds

# Smaller inputs for the gradient checks, which run each op several times.
small_configs = conv_configs(max_batch=2, max_experts=3, max_size=5)


def inputs(backend, config, seed, dtype="float64"):
    return arrays_for(config, xp=backend.xp, device=backend.device, dtype=dtype, seed=seed)


def normal(backend, shape, seed, dtype="float64"):
    return backend.asarray(np.random.default_rng(seed).standard_normal(shape), dtype=dtype)


def mixing_length(config) -> int:
    """Terms summed into one output element: E experts times C/groups * prod(k) taps."""
    return config.n_experts * config.in_channels // config.groups * math.prod(config.kernel)


def gradient_length(config) -> int:
    """An upper bound on the terms summed into one gradient element."""
    return mixing_length(config) * math.prod(config.output_shape)


def condconv_args(a):
    return (a.x, a.experts, a.routing, a.bias)


# ---------------------------------------------------------------- the equivalence


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@given(config=conv_configs(), seed=seeds())
def test_condconv_equals_mixture_of_experts(backend, dtype, config, seed):
    a = inputs(backend, config, seed, dtype)
    y = condconv(*condconv_args(a), **config.options())
    assert tuple(y.shape) == config.output_shape
    assert_close(y, moe_condconv(*condconv_args(a), **config.options()),
                 reduction_length=mixing_length(config), name="condconv")


@given(config=conv_configs(), seed=seeds())
def test_condconv_vjp_equals_mixture_of_experts_vjp(backend, config, seed):
    a = inputs(backend, config, seed)
    cotangent = normal(backend, config.output_shape, seed + 1)
    grads = condconv_vjp(cotangent, *condconv_args(a), **config.options())
    expected = moe_condconv_vjp(cotangent, *condconv_args(a), **config.options())
    assert sorted(grads) == sorted(expected)
    for name in expected:
        assert_close(grads[name], expected[name], reduction_length=gradient_length(config),
                     name=f"condconv_vjp[{name}]")


# ---------------------------------------------------------------- properties


@given(config=conv_configs(max_experts=1), seed=seeds())
def test_one_expert_with_unit_routing_equals_conv(backend, config, seed):
    a = inputs(backend, config, seed)
    ones = backend.asarray(np.ones((config.batch, 1)))
    y = condconv(a.x, a.experts, ones, a.bias, **config.options())
    bias = None if a.bias is None else a.bias[0, ...]
    assert_close(y, conv(a.x, a.experts[0, ...], bias, **config.options()),
                 reduction_length=mixing_length(config), name="condconv")


@given(config=conv_configs(), seed=seeds())
def test_one_hot_routing_selects_that_expert(backend, config, seed):
    a = inputs(backend, config, seed)
    chosen = np.random.default_rng(seed).integers(config.n_experts, size=config.batch)
    one_hot = backend.asarray(np.eye(config.n_experts)[chosen])
    y = condconv(a.x, a.experts, one_hot, a.bias, **config.options())
    index = backend.asarray(chosen)
    kernels = backend.xp.take(a.experts, index, axis=0)  # (B, O, C/groups, *k)
    biases = None if a.bias is None else backend.xp.take(a.bias, index, axis=0)
    assert_close(y, conv(a.x, kernels, biases, **config.options()),
                 reduction_length=mixing_length(config), name="condconv")


@given(config=conv_configs(), seed=seeds(), scale_1=st.floats(-2, 2), scale_2=st.floats(-2, 2))
def test_condconv_is_linear_in_routing(backend, config, seed, scale_1, scale_2):
    # The bias is mixed by the routing too, so the map routing -> output is linear
    # (not merely affine): f(a r1 + b r2) = a f(r1) + b f(r2), and f(0) = 0.
    a = inputs(backend, config, seed)
    routing_1, routing_2 = a.routing, normal(backend, (config.batch, config.n_experts), seed + 1)

    def f(routing):
        return condconv(a.x, a.experts, routing, a.bias, **config.options())

    mixed = f(scale_1 * routing_1 + scale_2 * routing_2)
    assert_close(mixed, scale_1 * f(routing_1) + scale_2 * f(routing_2),
                 reduction_length=mixing_length(config), name="condconv")


def _replace_example(backend, array, b, seed):
    """``array`` with example ``b`` replaced by new standard normal values."""
    values = to_numpy(array).copy()
    values[b] = np.random.default_rng(seed).standard_normal(values.shape[1:])
    return backend.asarray(values)


def _reads_some_input(config) -> bool:
    """Whether any output reads a real input position, not only zero padding.

    With zero padding, a dilated kernel on a tiny input can read nothing but
    padding (e.g. size 1, k = 2, dilation 2, 'same'): the output then cannot
    depend on x at all.
    """
    if config.padding_mode != "zeros":
        return True
    return all(
        any(0 <= s * p + d * k - before < n for p in range(out) for k in range(kernel))
        for n, kernel, s, d, (before, _), out in zip(
            config.spatial, config.kernel, config.stride, config.dilation,
            config.padding_pairs, config.output_shape[2:]))


def _assert_other_examples_unchanged(y_before, y_after, b, *, changed: bool = True):
    """Examples other than ``b`` are bit-for-bit unchanged; ``b`` changed when ``changed``."""
    before, after = to_numpy(y_before), to_numpy(y_after)
    others = [i for i in range(before.shape[0]) if i != b]
    np.testing.assert_array_equal(after[others], before[others])
    if changed:
        assert not np.array_equal(after[b], before[b])


@given(config=conv_configs().filter(lambda c: c.batch > 1), seed=seeds(), data=st.data())
def test_examples_are_independent(backend, config, seed, data):
    a = inputs(backend, config, seed)
    b = data.draw(st.integers(0, config.batch - 1), label="changed example")
    x = _replace_example(backend, a.x, b, seed + 1)
    routing = _replace_example(backend, a.routing, b, seed + 2)
    # With a bias the output moves with the routing, which changed too.
    changed = _reads_some_input(config) or config.bias
    _assert_other_examples_unchanged(
        condconv(*condconv_args(a), **config.options()),
        condconv(x, a.experts, routing, a.bias, **config.options()), b, changed=changed)
    _assert_other_examples_unchanged(
        condconv_layer(a.x, a.layer_params(), **config.options()),
        condconv_layer(x, a.layer_params(), **config.options()), b, changed=changed)


@given(config=conv_configs(), seed=seeds())
def test_permuting_experts_with_routing_columns_changes_nothing(backend, config, seed):
    a = inputs(backend, config, seed)
    xp = backend.xp
    order = backend.asarray(np.random.default_rng(seed).permutation(config.n_experts))
    experts = xp.take(a.experts, order, axis=0)
    routing = xp.take(a.routing, order, axis=1)
    bias = None if a.bias is None else xp.take(a.bias, order, axis=0)
    assert_close(condconv(a.x, experts, routing, bias, **config.options()),
                 condconv(*condconv_args(a), **config.options()),
                 reduction_length=mixing_length(config), name="condconv")


@given(batch=st.integers(1, 3), n_experts=st.integers(1, 4),
       shape=st.lists(st.integers(1, 3), max_size=4).map(tuple), seed=seeds())
def test_mix_experts_is_the_routing_weighted_sum(backend, batch, n_experts, shape, seed):
    rng = np.random.default_rng(seed)
    routing, experts = rng.standard_normal((batch, n_experts)), rng.standard_normal((n_experts,) + shape)
    expected = sum(routing[:, e].reshape((batch,) + (1,) * len(shape)) * experts[e]
                   for e in range(n_experts))
    mixed = mix_experts(backend.asarray(routing), backend.asarray(experts))
    assert_close(mixed, backend.asarray(expected), reduction_length=n_experts, name="mix_experts")


# ---------------------------------------------------------------- gradients


@given(batch=st.integers(1, 3), n_experts=st.integers(1, 4),
       shape=st.lists(st.integers(1, 3), max_size=3).map(tuple), seed=seeds())
def test_mix_experts_vjp_matches_finite_differences(backend, batch, n_experts, shape, seed):
    args = {"routing": normal(backend, (batch, n_experts), seed),
            "experts": normal(backend, (n_experts,) + shape, seed + 1)}
    check_vjp(mix_experts, mix_experts_vjp, args, seed=seed)


@pytest.mark.parametrize(("op", "op_vjp"), [(condconv, condconv_vjp),
                                            (moe_condconv, moe_condconv_vjp)])
@given(config=small_configs, seed=seeds())
def test_condconv_vjp_matches_finite_differences(backend, op, op_vjp, config, seed):
    a = inputs(backend, config, seed)
    args = {"x": a.x, "experts": a.experts, "routing": a.routing}
    if a.bias is not None:
        args["bias"] = a.bias
    check_vjp(partial(op, **config.options()), partial(op_vjp, **config.options()), args,
              seed=seed)


def _layer_functions(options):
    """condconv_layer and its VJP with the params mapping spread into keyword arrays."""

    def layer(x, **params):
        return condconv_layer(x, params, **options)

    def layer_vjp(cotangent, x, **params):
        return condconv_layer_vjp(cotangent, x, params, **options)

    return layer, layer_vjp


@given(config=small_configs, seed=seeds())
def test_condconv_layer_vjp_matches_finite_differences(backend, config, seed):
    a = inputs(backend, config, seed)
    layer, layer_vjp = _layer_functions(config.options())
    check_vjp(layer, layer_vjp, {"x": a.x, **a.layer_params()}, seed=seed, name="condconv_layer")


@given(config=conv_configs(max_batch=2, max_experts=3, max_size=5,
                           padding_modes=("reflect", "replicate", "circular")), seed=seeds())
def test_condconv_layer_x_gradient_includes_the_routing_path(backend, config, seed):
    # The layer's x-gradient passes the dot-product test, whose finite differences
    # see both paths from x to the output; the gradient through the convolution
    # alone, with the routing frozen, misses it by more than the tolerance.  (Zero
    # padding is left out: a kernel that reads only padding makes both paths vanish.)
    a = inputs(backend, config, seed)
    params = a.layer_params()
    layer, layer_vjp = _layer_functions(config.options())
    cotangent = normal(backend, config.output_shape, seed + 1)
    result = check_vjp(layer, layer_vjp, {"x": a.x, **params}, cotangent=cotangent, wrt=("x",),
                       seed=seed, name="condconv_layer")
    tangent = normal(backend, config.x_shape, seed)  # the tangent check_vjp drew from its seed
    routing = route_sigmoid(a.x, a.route_weight, a.route_bias)
    frozen = condconv_vjp(cotangent, a.x, a.experts, routing, a.bias, **config.options())["x"]
    frozen_dot = float(backend.xp.sum(frozen * tangent))
    assert abs(frozen_dot - result.numeric) > result.atol + result.rtol * result.scale


def _torch_condconv_layer(torch, x, params, config):
    """The CondConv layer in torch ops: sigmoid routing, mixed kernels, F.pad + conv per example."""
    pooled = torch.mean(x, dim=tuple(range(2, x.ndim)))
    logits = pooled @ params["route_weight"].T
    if "route_bias" in params:
        logits = logits + params["route_bias"]
    routing = torch.sigmoid(logits)
    experts = params["experts"]
    kernels = (routing @ experts.reshape(experts.shape[0], -1)).reshape(
        (config.batch,) + tuple(experts.shape[1:]))
    bias = routing @ params["bias"] if "bias" in params else None
    return torch_conv(torch, x, kernels, bias, config)


@given(config=small_configs, seed=seeds())
def test_condconv_layer_and_vjp_match_torch_autograd(backend, config, seed):
    torch = pytest.importorskip("torch")
    a = inputs(backend, config, seed)
    args = {"x": a.x, **a.layer_params()}
    leaves = {name: torch.tensor(to_numpy(value), requires_grad=True)
              for name, value in args.items()}
    params = {name: leaf for name, leaf in leaves.items() if name != "x"}
    y_torch = _torch_condconv_layer(torch, leaves["x"], params, config)
    cotangent = np.random.default_rng(seed + 1).standard_normal(config.output_shape)
    y_torch.backward(torch.tensor(cotangent))

    y = condconv_layer(a.x, a.layer_params(), **config.options())
    assert_close(y, backend.asarray(y_torch.detach().numpy()),
                 reduction_length=mixing_length(config), name="condconv_layer")
    grads = condconv_layer_vjp(backend.asarray(cotangent), a.x, a.layer_params(),
                               **config.options())
    assert sorted(grads) == sorted(leaves)
    for name, leaf in leaves.items():
        assert_close(grads[name], backend.asarray(leaf.grad.numpy()),
                     reduction_length=gradient_length(config), name=f"condconv_layer_vjp[{name}]")
