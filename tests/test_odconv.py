"""ODConv: odconv_layer, its VJP and its JVP against finite differences (and each other),
condconv, torch autograd, the independence of examples in eval mode and their coupling in
train mode, bad input."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from condconv_ref import condconv, odconv_layer, odconv_layer_jvp, odconv_layer_vjp
from condconv_ref.backends import to_numpy
from condconv_ref.engine import (
    expected_forward,
    expected_vjp,
    finite_difference_check,
    judge,
    transpose_check,
)
from condconv_ref.testing import ConvConfig, Supports
from condconv_ref.testing.sampling import draw_examples
from condconv_ref.testing.strategies import cases
from condconv_ref.variants import build_case

SMALL = Supports(spatial_dims=(1, 2), max_size=5, max_batch=3)
HEADS = ("channel", "filter", "spatial", "kernel")


def _failures(comparisons):
    return [str(c) for c in comparisons if not c.passed]


# ---------------------------------------------------------------- finite differences


@pytest.mark.parametrize("mode", ["eval", "train"])
@given(case=cases("odconv_layer", SMALL), dtype=st.sampled_from(["float64", "float32"]))
def test_vjp_matches_finite_differences(backend, mode, case, dtype):
    assume(case.options["batch_norm"] == mode)
    measured = finite_difference_check(case, dtype, backend, seed=case.seed)
    assert math.isnan(measured.units) or measured.passed, measured


@pytest.mark.parametrize("mode", ["eval", "train"])
@given(case=cases("odconv_layer", SMALL), dtype=st.sampled_from(["float64", "float32"]))
def test_jvp_is_the_transpose_of_the_vjp_and_matches_finite_differences(backend, mode, case,
                                                                        dtype):
    assume(case.options["batch_norm"] == mode)
    assert transpose_check(case, dtype, backend, seed=case.seed).passed
    measured = finite_difference_check(case, dtype, backend, seed=case.seed, mode="jvp")
    assert math.isnan(measured.units) or measured.passed, measured


def _jvp_holding_the_batch_statistics_still(tangents, x, params, **options):
    """The train-mode JVP as if the batch's mean and variance were constants: eval mode with
    the batch's statistics as the running ones (the same forward, the wrong derivative)."""
    pre = x.mean(axis=tuple(range(2, x.ndim))) @ params["fc_weight"].T
    frozen = {**params, "bn_running_mean": pre.mean(axis=0), "bn_running_var": pre.var(axis=0)}
    return odconv_layer_jvp(tangents, x, frozen, **{**options, "batch_norm": "eval"})


def test_transpose_check_catches_a_jvp_holding_the_batch_statistics_still():
    # heads that are not saturated (temperature above 0.1), so that the derivative of the
    # batch statistics reaches the output
    case = next(case for case in draw_examples(cases("odconv_layer", SMALL), 60, seed=5)
                if case.options["batch_norm"] == "train" and case.options["temperature"] > 0.1
                and all(f"{head}_weight" in case.arrays for head in HEADS))
    assert transpose_check(case, "float64").passed
    measured = transpose_check(case, "float64", jvp=_jvp_holding_the_batch_statistics_still)
    assert not measured.passed and measured.units > 10, measured
    assert "argument 'fc_weight'" in measured.detail and "argument 'experts'" not in measured.detail
    wrong = finite_difference_check(case, "float64", jvp=_jvp_holding_the_batch_statistics_still,
                                    mode="jvp")
    assert not wrong.passed, wrong


# ---------------------------------------------------------------- reduction to condconv


def _softmax_routing(case):
    """The kernel head's attention computed in plain NumPy from the case's arrays."""
    a, options = case.arrays, case.options
    pre = a["x"].mean(axis=tuple(range(2, a["x"].ndim))) @ a["fc_weight"].T
    if options["batch_norm"] == "train":
        mean, variance = pre.mean(axis=0), pre.var(axis=0)
    else:
        mean, variance = a["bn_running_mean"], a["bn_running_var"]
    z = (pre - mean) / np.sqrt(variance + 1e-5) * a.get("bn_weight", 1.0) + a.get("bn_bias", 0.0)
    logits = np.maximum(z, 0.0) @ a["kernel_weight"].T + a.get("kernel_bias", 0.0)
    shifted = np.exp((logits - logits.max(axis=1, keepdims=True)) / options["temperature"])
    return shifted / shifted.sum(axis=1, keepdims=True)


@given(case=cases("odconv_layer", SMALL))
def test_with_only_the_kernel_head_it_is_condconv_with_softmax_routing(backend, case):
    assume("kernel_weight" in case.arrays)
    arrays = {name: a for name, a in case.arrays.items()
              if not name.startswith(("channel_", "filter_", "spatial_"))}
    only_kernel = replace(case, arrays=arrays)
    conv_options = {name: case.options[name] for name in ("stride", "padding", "dilation",
                                                          "groups", "padding_mode")}
    routing = backend.asarray(_softmax_routing(only_kernel))
    y = condconv(backend.asarray(arrays["x"]), backend.asarray(arrays["experts"]), routing,
                 **conv_options)
    assert _failures(judge(to_numpy(y), expected_forward(only_kernel, backend), "float64")) == []


def test_without_any_head_it_is_the_convolution_with_the_summed_experts():
    config = ConvConfig(batch=2, in_channels=2, out_channels=3, groups=1, spatial=(5,),
                        kernel=(3,), stride=(1,), dilation=(1,), padding=1,
                        padding_mode="zeros", n_experts=3, bias=False)
    case = build_case("odconv_layer", config, seed=4)
    arrays = {name: a for name, a in case.arrays.items() if not name.startswith(HEADS)}
    bare = replace(case, arrays=arrays)
    ones = np.ones((2, 3))
    y = condconv(arrays["x"], arrays["experts"], ones, padding=1)
    assert _failures(judge(y, expected_forward(bare), "float64")) == []


# ---------------------------------------------------------------- torch autograd as oracle


def _torch_odconv(torch, x, p, options):
    """ODConv written the plain PyTorch way: F.batch_norm, sigmoid/softmax, a per-example
    conv loop; autograd gives the VJP."""
    functional = torch.nn.functional
    nd = x.ndim - 2
    pre = x.mean(dim=tuple(range(2, x.ndim))) @ p["fc_weight"].T
    train = options["batch_norm"] == "train"
    z = functional.batch_norm(pre, None if train else p["bn_running_mean"],
                              None if train else p["bn_running_var"], p.get("bn_weight"),
                              p.get("bn_bias"), training=train, eps=1e-5)
    h = functional.relu(z)
    temperature = options["temperature"]
    experts = p["experts"]
    kernel = (torch.einsum("be,e...->b...", torch.softmax(
        (h @ p["kernel_weight"].T + p.get("kernel_bias", 0.0)) / temperature, dim=1), experts)
        if "kernel_weight" in p else experts.sum(dim=0).expand(x.shape[0], *experts.shape[1:]))

    def sigmoid(head):
        return torch.sigmoid((h @ p[f"{head}_weight"].T + p.get(f"{head}_bias", 0.0))
                             / temperature)

    if "spatial_weight" in p:
        kernel = kernel * sigmoid("spatial").reshape(x.shape[0], 1, 1, *experts.shape[3:])
    if "channel_weight" in p:
        x = x * sigmoid("channel").reshape(*x.shape[:2], *(1,) * nd)
    conv = getattr(functional, f"conv{nd}d")
    y = torch.cat([conv(x[b:b + 1], kernel[b], stride=options["stride"],
                        padding=options["padding"], dilation=options["dilation"],
                        groups=options["groups"]) for b in range(x.shape[0])])
    if "filter_weight" in p:
        y = y * sigmoid("filter").reshape(*y.shape[:2], *(1,) * nd)
    return y


@given(case=cases("odconv_layer", replace(SMALL, spatial_dims=(1, 2, 3), padding_forms=("int",),
                                          padding_modes=("zeros",), max_size=4)))
def test_forward_and_vjp_match_torch_autograd(case):
    torch = pytest.importorskip("torch")
    tensors = {name: torch.tensor(a, requires_grad=name in case.differentiable)
               for name, a in case.arrays.items()}
    p = {name: t for name, t in tensors.items() if name != "x"}
    y = _torch_odconv(torch, tensors["x"], p, case.options)
    assert _failures(judge(y.detach().numpy(), expected_forward(case), "float64")) == []
    cotangent = case.cotangent(tuple(y.shape))
    names = case.differentiable
    grads = torch.autograd.grad(y, [tensors[name] for name in names], torch.tensor(cotangent),
                                allow_unused=True)
    autograd = {name: np.zeros(case.shapes[name]) if g is None else g.numpy()
                for name, g in zip(names, grads)}
    assert _failures(judge(autograd, expected_vjp(case, cotangent), "float64")) == []


# ---------------------------------------------------------------- eval: independent, train: coupled


def _coupling_case(mode):
    config = ConvConfig(batch=3, in_channels=3, out_channels=2, groups=1, spatial=(4, 4),
                        kernel=(3, 3), stride=(1, 1), dilation=(1, 1), padding=1,
                        padding_mode="zeros", n_experts=2, bias=True)
    rng = np.random.default_rng(1)
    width = 4
    params = {"experts": rng.standard_normal((2, 2, 3, 3, 3)),
              "fc_weight": rng.standard_normal((width, 3)), "bn_weight": np.ones(width),
              "bn_bias": np.full(width, 0.5), "bn_running_mean": np.zeros(width),
              "bn_running_var": np.ones(width)}
    for head, size in zip(HEADS, (3, 2, 9, 2)):
        params[f"{head}_weight"] = rng.standard_normal((size, width))
    x = rng.standard_normal(config.x_shape)
    return x, params, dict(config.options(), batch_norm=mode)


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_examples_are_independent_in_eval_mode_and_coupled_in_train_mode(backend, mode):
    x, params, options = _coupling_case(mode)
    moved = x.copy()
    moved[1] += 1.0  # another input for example 1 alone
    p = {name: backend.asarray(a) for name, a in params.items()}
    before = to_numpy(odconv_layer(backend.asarray(x), p, **options))
    after = to_numpy(odconv_layer(backend.asarray(moved), p, **options))
    cotangent = np.zeros(before.shape)
    cotangent[0] = 1.0  # the loss reads example 0 alone
    grad_x = to_numpy(odconv_layer_vjp(backend.asarray(cotangent), backend.asarray(x), p,
                                       **options)["x"])
    tangent = np.zeros(x.shape)
    tangent[1] = 1.0  # the same move of example 1, in forward mode
    moved_y = to_numpy(odconv_layer_jvp({"x": backend.asarray(tangent)}, backend.asarray(x), p,
                                        **options))
    if mode == "eval":
        np.testing.assert_array_equal(after[0], before[0])
        np.testing.assert_array_equal(grad_x[1:], 0.0)
        np.testing.assert_array_equal(moved_y[0], 0.0)
    else:  # example 1 moves the batch statistics, and so example 0's output
        assert np.all(np.abs(after[0] - before[0]) > 0)
        assert np.all(np.abs(grad_x[1:]) > 0)
        assert np.all(np.abs(moved_y[0]) > 0)


# ---------------------------------------------------------------- the drawn cases


def test_drawn_cases_skip_heads_use_both_modes_and_temperatures_over_six_decades():
    drawn = draw_examples(cases("odconv_layer", SMALL), 60, seed=3)
    assert {case.options["batch_norm"] for case in drawn} == {"eval", "train"}
    for head in HEADS:
        present = [f"{head}_weight" in case.arrays for case in drawn]
        assert any(present) and not all(present), head
    temperatures = [case.options["temperature"] for case in drawn]
    assert all(1e-3 <= t <= 1e3 for t in temperatures)
    assert min(temperatures) < 1e-1 and max(temperatures) > 1e1


# ---------------------------------------------------------------- bad input


def _valid(batch=2):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((batch, 3, 5, 5))
    params = {"experts": rng.standard_normal((2, 4, 3, 3, 3)),
              "fc_weight": rng.standard_normal((5, 3)), "bn_running_mean": np.zeros(5),
              "bn_running_var": np.ones(5), "channel_weight": rng.standard_normal((3, 5)),
              "filter_weight": rng.standard_normal((4, 5)),
              "spatial_weight": rng.standard_normal((9, 5)),
              "kernel_weight": rng.standard_normal((2, 5)), "kernel_bias": np.zeros(2)}
    return x, params


def _without(params, name):
    return {key: a for key, a in params.items() if key != name}


BAD = [
    ("missing fc_weight", lambda p: _without(p, "fc_weight"), {}, ValueError,
     r"params is missing the required keys \['fc_weight'\]"),
    ("bias without its head", lambda p: {**_without(p, "channel_weight"),
                                         "channel_bias": np.zeros(3)}, {}, ValueError,
     r"params has channel_bias but no channel_weight"),
    ("channel head of other width", lambda p: {**p, "channel_weight": np.ones((3, 4))}, {},
     ValueError, r"channel_weight has shape \(3, 4\), expected \(3, 5\)"),
    ("filter head for other O", lambda p: {**p, "filter_weight": np.ones((3, 5))}, {},
     ValueError, r"filter_weight has shape \(3, 5\), expected \(4, 5\)"),
    ("spatial head for other k", lambda p: {**p, "spatial_weight": np.ones((3, 3, 5))}, {},
     ValueError, r"spatial_weight has 3 dims, expected 2"),
    ("kernel head for other E", lambda p: {**p, "kernel_weight": np.ones((3, 5))}, {},
     ValueError, r"kernel_weight has shape \(3, 5\), expected \(2, 5\)"),
    ("kernel bias", lambda p: {**p, "kernel_bias": np.ones(3)}, {}, ValueError,
     r"kernel_bias has shape \(3,\), expected \(2,\)"),
    ("bn_weight", lambda p: {**p, "bn_weight": np.ones(4)}, {}, ValueError,
     r"bn_weight has shape \(4,\), expected \(5,\)"),
    ("unknown key", lambda p: {**p, "reduction_weight": np.ones(5)}, {}, ValueError,
     r"params has unknown keys \['reduction_weight'\]"),
    ("negative running variance", lambda p: {**p, "bn_running_var": np.array([1, 1, -1e-3, 1, 1.])},
     {}, ValueError, r"bn_running_var has a negative entry"),
    ("eval without running statistics", lambda p: _without(p, "bn_running_var"), {},
     ValueError, r"params is missing \['bn_running_var'\], expected the running statistics"),
    ("unknown batch_norm", lambda p: p, {"batch_norm": "training"}, ValueError,
     r"batch_norm must be one of \('eval', 'train'\), got 'training'"),
    ("batch_norm as a bool", lambda p: p, {"batch_norm": True}, ValueError,
     r"batch_norm must be one of"),
    *((f"temperature {t!r}", lambda p: p, {"temperature": t}, ValueError,
       r"temperature must be finite and > 0") for t in (0.0, -1.0, math.inf, math.nan)),
    *((f"temperature {t!r}", lambda p: p, {"temperature": t}, TypeError,
       r"temperature must be a real number") for t in ("1", True, None)),
    ("bn_eps 0", lambda p: p, {"bn_eps": 0.0}, ValueError, r"bn_eps must be finite and > 0"),
]


@pytest.mark.parametrize("which", ["forward", "vjp", "jvp"])
@pytest.mark.parametrize("corrupt, options, error, message",
                         [bad[1:] for bad in BAD], ids=[bad[0] for bad in BAD])
def test_bad_input_raises_naming_the_function_and_argument(corrupt, options, error, message,
                                                           which):
    x, params = _valid()
    calls = {"forward": lambda p: odconv_layer(x, p, **options),
             "vjp": lambda p: odconv_layer_vjp(np.ones((2, 4, 3, 3)), x, p, **options),
             "jvp": lambda p: odconv_layer_jvp({"x": np.ones(x.shape)}, x, p, **options)}
    name = "odconv_layer" if which == "forward" else f"odconv_layer_{which}"
    with pytest.raises(error, match=f"{name}: " + message):
        calls[which](corrupt(params))


@pytest.mark.parametrize("buffer", ["bn_running_mean", "bn_running_var"])
def test_a_tangent_for_a_running_statistic_is_a_clear_error(buffer):
    x, params = _valid()
    with pytest.raises(ValueError, match=rf"^odconv_layer_jvp: tangents has \['{buffer}'\], the "
                                         r"batch norm's running statistics, which are buffers "
                                         r"and take no tangent"):
        odconv_layer_jvp({"x": np.ones(x.shape), buffer: np.ones(5)}, x, params)


def test_train_mode_at_batch_1_is_bad_input_not_nan():
    x, params = _valid(batch=1)
    with pytest.raises(ValueError, match=r"odconv_layer: x has batch size 1, expected B >= 2 "
                                         r"with batch_norm='train'"):
        odconv_layer(x, params, batch_norm="train")
    assert np.all(np.isfinite(odconv_layer(x, params, batch_norm="eval")))


def test_the_layers_the_authors_module_builds_are_accepted():
    """kernel_num = 1 (no kernel head), a 1x1 kernel (no spatial head), depthwise (no filter
    head): each runs, and its VJP returns a gradient for every param given."""
    rng = np.random.default_rng(2)
    x = rng.standard_normal((2, 4, 5, 5))
    common = {"fc_weight": rng.standard_normal((16, 4)), "bn_weight": np.ones(16),
              "bn_bias": np.zeros(16), "bn_running_mean": np.zeros(16),
              "bn_running_var": np.ones(16), "channel_weight": rng.standard_normal((4, 16)),
              "channel_bias": np.zeros(4)}
    layers = {
        "kernel_num=1": ({"experts": rng.standard_normal((1, 6, 4, 3, 3)),
                          "filter_weight": rng.standard_normal((6, 16)),
                          "spatial_weight": rng.standard_normal((9, 16))}, {"padding": 1}),
        "1x1": ({"experts": rng.standard_normal((3, 6, 4, 1, 1)),
                 "filter_weight": rng.standard_normal((6, 16)),
                 "kernel_weight": rng.standard_normal((3, 16))}, {}),
        "depthwise": ({"experts": rng.standard_normal((3, 4, 1, 3, 3)),
                       "spatial_weight": rng.standard_normal((9, 16)),
                       "kernel_weight": rng.standard_normal((3, 16))}, {"groups": 4}),
    }
    for name, (params, options) in layers.items():
        params = {**common, **params}
        for mode in ("eval", "train"):
            y = odconv_layer(x, params, batch_norm=mode, **options)
            assert np.all(np.isfinite(y)), name
            grads = odconv_layer_vjp(np.ones(y.shape), x, params, batch_norm=mode, **options)
            tangents = {name: np.ones(a.shape) for name, a in grads.items()}
            assert np.all(np.isfinite(odconv_layer_jvp(tangents, x, params, batch_norm=mode,
                                                       **options))), name
            assert sorted(grads) == sorted({"x", *params} - {"bn_running_mean",
                                                             "bn_running_var"}), name
