"""Depthwise CondConv: equal to grouped CondConv and to the mixture of experts, VJPs, torch, bad input.

Rounding bounds.  ``depthwise_condconv`` and its references evaluate the same
sums of products in different orders (offset by offset, a matmul, E
convolutions then a weighted sum).  If every product in a sum passes through
at most ``n`` roundings, then for any summation order the computed value is
within ``γ_n · Σ|terms|`` of the exact one, with ``γ_n = n u / (1 - n u)`` and
``u = eps / 2`` (Higham, *Accuracy and Stability of Numerical Algorithms*,
§3.1 and §4.2).  Two such results differ by at most ``2 γ_n · Σ|terms|``.
``Σ|terms|`` is the same computation on the absolute values of every input,
done by the reference (``condconv`` / ``condconv_vjp`` with ``groups=C``): its
own rounding only makes it smaller by a factor ``(1 - γ_n)``, which the bound
divides out.  The ``n`` of each comparison is derived where it is used.  This
is the "exact up to float rounding" of the issue, with no free tolerance.
"""

from __future__ import annotations

import math
from functools import partial

import array_api_compat
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from condconv_ref import (
    condconv,
    condconv_layer,
    condconv_vjp,
    depthwise_condconv,
    depthwise_condconv_layer,
    depthwise_condconv_layer_vjp,
    depthwise_condconv_vjp,
    moe_condconv,
    route_sigmoid,
)
from condconv_ref.backends import to_numpy
from condconv_ref.testing import check_vjp
from condconv_ref.testing.strategies import arrays_for, conv_configs, seeds
from condconv_ref.testing.oracles import torch_conv
from engine_forms import FORMS, engine_form

EPS = {"float32": 2.0**-23, "float64": 2.0**-52}

depthwise_configs = partial(conv_configs, depthwise=True, max_size=6)


def depthwise_options(config) -> dict:
    """The keywords of the depthwise ops for a ``groups == C`` config."""
    return dict(depth_multiplier=config.depth_multiplier, stride=config.stride,
                padding=config.padding, dilation=config.dilation,
                padding_mode=config.padding_mode)


def op_args(arrays) -> dict:
    return {"x": arrays.x, "experts": arrays.experts, "routing": arrays.routing,
            "bias": arrays.bias}


def absolute(args: dict) -> dict:
    return {name: None if a is None else array_api_compat.array_namespace(a).abs(a)
            for name, a in args.items()}


def forward_roundings(config) -> int:
    """Roundings per term of one output element.

    Mixed first (``depthwise_condconv``, ``condconv``): α·W (1), the sum over
    experts (E - 1), ·x (1), the sum over the K offsets (K - 1), + bias (1).
    Experts first (``moe_condconv``): W·x (1), K - 1, + β (1), ·α (1), E - 1.
    Both are at most K + E + 1.
    """
    return math.prod(config.kernel) + config.n_experts + 1


def vjp_roundings(config) -> dict[str, int]:
    """Roundings per term of one element of each gradient, P = output positions.

    x: α·W (1), E - 1, ·ȳ (1), then m·K·F - 1 additions, F the padded positions
    that fold onto one input position (at most 1 + before + after per axis).
    experts and bias: ȳ·x (1), P - 1, ·α (1), B - 1.
    routing: ȳ·x (1), P - 1, ·W (1), then C·m·K + C·m - 1 additions.
    """
    kernel, positions = math.prod(config.kernel), math.prod(config.geometry.out)
    fold = math.prod(1 + before + after for before, after in config.padding_pairs)
    return {
        "x": config.n_experts + 1 + config.depth_multiplier * kernel * fold,
        "experts": positions + config.batch,
        "bias": positions + config.batch,
        "routing": positions + 1 + config.out_channels * (kernel + 1),
    }


def assert_within_rounding(actual, desired, scale, roundings: int, name: str) -> None:
    """``|actual - desired| <= 2 γ_n scale / (1 - γ_n)`` elementwise, one namespace/device/dtype."""
    assert array_api_compat.array_namespace(actual) is array_api_compat.array_namespace(desired)
    assert array_api_compat.device(actual) == array_api_compat.device(desired), name
    assert actual.dtype == desired.dtype, name
    assert tuple(actual.shape) == tuple(desired.shape), name
    u = EPS[np.dtype(to_numpy(actual).dtype).name] / 2
    gamma = roundings * u / (1 - roundings * u)
    error = np.abs(to_numpy(actual).astype(np.float64) - to_numpy(desired).astype(np.float64))
    bound = 2 * gamma / (1 - gamma) * to_numpy(scale).astype(np.float64)
    worst = np.unravel_index(np.argmax(error - bound), error.shape)
    assert np.all(error <= bound), (
        f"{name}: |difference| {error[worst]:.3g} exceeds the rounding bound {bound[worst]:.3g} "
        f"(n={roundings}) at index {tuple(int(i) for i in worst)}"
    )


# ---------------------------------------------------------------- equivalences


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@given(config=depthwise_configs(), seed=seeds(), form=st.sampled_from(FORMS))
def test_depthwise_equals_grouped_condconv(backend, dtype, config, seed, form):
    # depthwise_condconv in one of the engine's forms; condconv with groups=C in im2col.
    arrays = arrays_for(config, xp=backend.xp, device=backend.device, dtype=dtype, seed=seed)
    args = op_args(arrays)
    cotangent = backend.asarray(np.random.default_rng(seed).standard_normal(config.output_shape),
                                dtype=dtype)
    with engine_form(form):
        y = depthwise_condconv(**args, **depthwise_options(config))
        grads = depthwise_condconv_vjp(cotangent, **args, **depthwise_options(config))
    assert array_api_compat.device(y) == array_api_compat.device(arrays.x)
    with engine_form("im2col"):
        scale = condconv(**absolute(args), **config.options())
        assert_within_rounding(y, condconv(**args, **config.options()), scale,
                               forward_roundings(config), "depthwise_condconv")
        expected = condconv_vjp(cotangent, **args, **config.options())
    scales = condconv_vjp(backend.xp.abs(cotangent), **absolute(args), **config.options())
    assert sorted(grads) == sorted(expected)
    roundings = vjp_roundings(config)
    for name in expected:
        assert_within_rounding(grads[name], expected[name], scales[name], roundings[name],
                               f"depthwise_condconv_vjp[{name}]")


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@given(config=depthwise_configs(), seed=seeds())
def test_depthwise_equals_mixture_of_experts(backend, dtype, config, seed):
    arrays = arrays_for(config, xp=backend.xp, device=backend.device, dtype=dtype, seed=seed)
    args = op_args(arrays)
    scale = condconv(**absolute(args), **config.options())
    assert_within_rounding(depthwise_condconv(**args, **depthwise_options(config)),
                           moe_condconv(**args, **config.options()), scale,
                           forward_roundings(config), "depthwise_condconv vs moe_condconv")


# inf - inf and 0 · inf are NaN, and NumPy says so.
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("where", ["x", "experts"])
@pytest.mark.parametrize("value", [math.nan, math.inf], ids=["nan", "inf"])
@given(config=depthwise_configs(), seed=seeds(), data=st.data(), form=st.sampled_from(FORMS))
def test_depthwise_has_the_nan_and_inf_pattern_of_grouped_condconv(backend, where, value, config,
                                                                   seed, data, form):
    """One non-finite entry in x or in the experts reaches exactly what it reaches in the
    grouped condconv reference, forward and VJP: the fast path's gaps (wide-grid positions
    that are not outputs) and its correlation for x̄ must not add 0 · inf terms."""
    args = op_args(arrays_for(config, xp=backend.xp, device=backend.device, dtype="float64",
                              seed=seed))
    spoiled = to_numpy(args[where]).copy()
    spoiled[tuple(data.draw(st.integers(0, n - 1), label=f"index {axis}")
                  for axis, n in enumerate(spoiled.shape))] = value
    args[where] = backend.asarray(spoiled)
    cotangent = backend.asarray(np.random.default_rng(seed).standard_normal(config.output_shape))
    with engine_form(form):
        results = {"y": depthwise_condconv(**args, **depthwise_options(config)),
                   **depthwise_condconv_vjp(cotangent, **args, **depthwise_options(config))}
    with engine_form("im2col"):
        expected = {"y": condconv(**args, **config.options()),
                    **condconv_vjp(cotangent, **args, **config.options())}
    assert sorted(results) == sorted(expected)
    for name, result in results.items():
        actual, desired = to_numpy(result), to_numpy(expected[name])
        assert np.array_equal(np.isnan(actual), np.isnan(desired)), f"{name}: NaN pattern"
        assert np.array_equal(actual == math.inf, desired == math.inf), f"{name}: +inf pattern"
        assert np.array_equal(actual == -math.inf, desired == -math.inf), f"{name}: -inf pattern"


@given(config=depthwise_configs(), seed=seeds())
def test_depthwise_layer_equals_grouped_condconv_layer(backend, config, seed):
    arrays = arrays_for(config, xp=backend.xp, device=backend.device, seed=seed)
    params = arrays.layer_params()
    routing = route_sigmoid(arrays.x, arrays.route_weight, arrays.route_bias)
    scale = condconv(**absolute({**op_args(arrays), "routing": routing}), **config.options())
    assert_within_rounding(depthwise_condconv_layer(arrays.x, params, **depthwise_options(config)),
                           condconv_layer(arrays.x, params, **config.options()), scale,
                           forward_roundings(config), "depthwise_condconv_layer")


def test_output_channel_c_m_plus_j_is_channel_c_with_filter_j(backend):
    # One expert, routing 1: channel c's filter j is the constant c·10 + j + 1, so
    # output channel c·m + j of a constant-one input equals (c·10 + j + 1)·k.
    channels, multiplier, k = 3, 2, 3
    taps = np.array([c * 10 + j + 1.0 for c in range(channels) for j in range(multiplier)])
    experts = np.broadcast_to(taps[None, :, None, None], (1, channels * multiplier, 1, k)).copy()
    y = depthwise_condconv(backend.asarray(np.ones((1, channels, 5))), backend.asarray(experts),
                           backend.asarray(np.ones((1, 1))), depth_multiplier=multiplier)
    np.testing.assert_array_equal(to_numpy(y), np.broadcast_to(k * taps[None, :, None], (1, 6, 3)))


# ---------------------------------------------------------------- gradients


@given(config=depthwise_configs(max_size=5), seed=seeds())
def test_depthwise_vjp_matches_finite_differences(backend, config, seed):
    arrays = arrays_for(config, xp=backend.xp, device=backend.device, seed=seed)
    args = {k: v for k, v in op_args(arrays).items() if v is not None}
    options = depthwise_options(config)
    check_vjp(partial(depthwise_condconv, **options), partial(depthwise_condconv_vjp, **options),
              args, seed=seed, name="depthwise_condconv")


def layer_as_function(x, *, options, **params):
    """The layer with its params as keyword arguments, the form ``check_vjp`` perturbs."""
    return depthwise_condconv_layer(x, params, **options)


def layer_vjp_as_function(cotangent, x, *, options, **params):
    return depthwise_condconv_layer_vjp(cotangent, x, params, **options)


@given(config=depthwise_configs(max_size=5), seed=seeds())
def test_depthwise_layer_vjp_matches_finite_differences(backend, config, seed):
    # "x" moves both the convolution and the routing, so the check covers the routing path.
    arrays = arrays_for(config, xp=backend.xp, device=backend.device, seed=seed)
    args = {"x": arrays.x, **arrays.layer_params()}
    options = depthwise_options(config)
    check_vjp(partial(layer_as_function, options=options),
              partial(layer_vjp_as_function, options=options),
              args, seed=seed, name="depthwise_condconv_layer")


def test_layer_vjp_returns_x_and_each_given_param(backend):
    rng = np.random.default_rng(0)
    x = backend.asarray(rng.standard_normal((2, 3, 5)))
    params = {"experts": backend.asarray(rng.standard_normal((2, 6, 1, 3))),
              "route_weight": backend.asarray(rng.standard_normal((2, 3)))}
    cotangent = backend.asarray(rng.standard_normal((2, 6, 3)))
    grads = depthwise_condconv_layer_vjp(cotangent, x, params, depth_multiplier=2)
    assert sorted(grads) == ["experts", "route_weight", "x"]
    params["bias"] = backend.asarray(rng.standard_normal((2, 6)))
    params["route_bias"] = backend.asarray(rng.standard_normal((2,)))
    grads = depthwise_condconv_layer_vjp(cotangent, x, params, depth_multiplier=2)
    assert sorted(grads) == ["bias", "experts", "route_bias", "route_weight", "x"]
    for name, grad in grads.items():
        reference = x if name == "x" else params[name]
        assert tuple(grad.shape) == tuple(reference.shape), name
        assert array_api_compat.device(grad) == array_api_compat.device(reference), name
        assert grad.dtype == reference.dtype, name


# ---------------------------------------------------------------- torch


@given(config=depthwise_configs(), seed=seeds())
def test_depthwise_and_vjp_match_torch_grouped_conv_autograd(backend, config, seed):
    """torch: mix the experts per example, then ``F.conv{1,2,3}d(groups=C)`` per example."""
    torch = pytest.importorskip("torch")
    arrays = arrays_for(config, xp=np, seed=seed)
    args = op_args(arrays)
    cotangent = np.random.default_rng(seed).standard_normal(config.output_shape)
    leaves = {name: torch.tensor(a, requires_grad=True) for name, a in args.items()
              if a is not None}
    routing, experts = leaves["routing"], leaves["experts"]
    kernel = (routing @ experts.reshape(config.n_experts, -1)).reshape(
        (config.batch,) + config.experts_shape[1:])
    bias = None if "bias" not in leaves else routing @ leaves["bias"]
    y_torch = torch_conv(torch, leaves["x"], kernel, bias, config)
    y_torch.backward(torch.tensor(cotangent))

    on_backend = {k: None if v is None else backend.asarray(v) for k, v in args.items()}
    options = depthwise_options(config)
    scale = condconv(**absolute(on_backend), **config.options())
    assert_within_rounding(depthwise_condconv(**on_backend, **options),
                           backend.asarray(y_torch.detach().numpy()), scale,
                           forward_roundings(config), "depthwise_condconv vs torch")
    backend_cotangent = backend.asarray(cotangent)
    grads = depthwise_condconv_vjp(backend_cotangent, **on_backend, **options)
    scales = condconv_vjp(backend.xp.abs(backend_cotangent), **absolute(on_backend),
                          **config.options())
    assert sorted(grads) == sorted(leaves)
    roundings = vjp_roundings(config)
    for name, leaf in leaves.items():
        assert_within_rounding(grads[name], backend.asarray(leaf.grad.numpy()), scales[name],
                               roundings[name], f"depthwise_condconv_vjp[{name}] vs torch")
