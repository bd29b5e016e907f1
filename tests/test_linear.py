"""Properties of linear CondConv: cond_linear, moe_cond_linear, cond_linear_layer and their VJPs."""

from __future__ import annotations

import functools

import numpy
import pytest
from hypothesis import given
from hypothesis import strategies as st

from condconv_ref import (
    cond_linear,
    cond_linear_layer,
    cond_linear_layer_vjp,
    cond_linear_vjp,
    condconv,
    condconv_layer,
    condconv_vjp,
    moe_cond_linear,
    moe_cond_linear_vjp,
)
from condconv_ref.backends import to_numpy
from condconv_ref.linear import (
    _cond_linear_mixed,
    _cond_linear_mixed_vjp,
    _cond_linear_shared,
    _cond_linear_shared_vjp,
    _uses_shared_matmuls,
)
from condconv_ref.testing import assert_close, check_vjp

# Shapes that put the public functions on each computation form: E <= F_in uses
# the shared matmuls, E > F_in the per-example mixed weights.
FORM_SHAPES = {
    "shared": {"batch": 3, "n_experts": 2, "in_features": 4, "out_features": 3},
    "mixed": {"batch": 3, "n_experts": 4, "in_features": 2, "out_features": 3},
}

dims = st.fixed_dictionaries({
    "batch": st.integers(1, 5),
    "n_experts": st.integers(1, 5),
    "in_features": st.integers(1, 6),
    "out_features": st.integers(1, 5),
})


def _draw(backend, shapes, *, seed, dtype):
    """Standard normal arrays of the given shapes on ``backend`` (``routing`` uniform in (0, 1))."""
    rng = numpy.random.default_rng(seed)
    return {name: backend.asarray(rng.uniform(0.05, 0.95, shape) if name == "routing"
                                  else rng.standard_normal(shape), dtype=dtype)
            for name, shape in shapes.items()}


def _operands(backend, *, batch, n_experts, in_features, out_features, with_bias=True,
              seed=0, dtype="float64"):
    """x, experts, routing and bias (None unless ``with_bias``) for cond_linear."""
    shapes = {"x": (batch, in_features), "experts": (n_experts, out_features, in_features),
              "routing": (batch, n_experts), "bias": (n_experts, out_features)}
    args = _draw(backend, shapes, seed=seed, dtype=dtype)
    return args if with_bias else {**args, "bias": None}


def _layer_operands(backend, *, batch, n_experts, in_features, out_features, with_bias=True,
                    seed=0, dtype="float64"):
    """x and the layer params (bias and route_bias present when ``with_bias``)."""
    shapes = {"x": (batch, in_features), "experts": (n_experts, out_features, in_features),
              "route_weight": (n_experts, in_features)}
    if with_bias:
        shapes.update(bias=(n_experts, out_features), route_bias=(n_experts,))
    return _draw(backend, shapes, seed=seed, dtype=dtype)


def _present(args):
    return {k: v for k, v in args.items() if v is not None}


def _tolerance_length(shape):
    """Terms summed into one output: F_in per expert plus the bias, over E experts."""
    return shape["n_experts"] * (shape["in_features"] + 1)


def _vjp_tolerance_length(shape):
    """A bound on the terms behind one gradient entry.

    x̄ sums E·F_out terms, W̄ and β̄ sum B, ᾱ sums F_out·(F_in + 1).
    """
    return _tolerance_length(shape) * shape["batch"] * shape["out_features"]


def _assert_grads_close(actual, desired, length, context):
    assert sorted(actual) == sorted(desired), context
    for name in desired:
        assert_close(actual[name], desired[name], reduction_length=length,
                     name=f"{context}: gradient of {name}")


def _layer_f(x, experts, route_weight, bias=None, route_bias=None):
    params = _present({"experts": experts, "route_weight": route_weight, "bias": bias,
                       "route_bias": route_bias})
    return cond_linear_layer(x, params)


def _layer_f_vjp(cotangent, x, experts, route_weight, bias=None, route_bias=None):
    params = _present({"experts": experts, "route_weight": route_weight, "bias": bias,
                       "route_bias": route_bias})
    return cond_linear_layer_vjp(cotangent, x, params)


# ---------------------------------------------------------------- equivalences


@given(shape=dims, with_bias=st.booleans(), dtype=st.sampled_from(["float32", "float64"]),
       seed=st.integers(0, 2**16))
def test_cond_linear_equals_mixture_of_experts(backend, shape, with_bias, dtype, seed):
    args = _present(_operands(backend, **shape, with_bias=with_bias, seed=seed, dtype=dtype))
    length = _tolerance_length(shape)
    assert_close(cond_linear(**args), moe_cond_linear(**args), reduction_length=length,
                 name="cond_linear vs moe_cond_linear")
    cotangent = backend.asarray(
        numpy.random.default_rng(seed + 1).standard_normal((shape["batch"], shape["out_features"])),
        dtype=dtype)
    _assert_grads_close(cond_linear_vjp(cotangent, **args), moe_cond_linear_vjp(cotangent, **args),
                        _vjp_tolerance_length(shape), "cond_linear_vjp vs moe_cond_linear_vjp")


@given(shape=dims, with_bias=st.booleans(), dtype=st.sampled_from(["float32", "float64"]),
       seed=st.integers(0, 2**16))
def test_shared_and_mixed_forms_agree(backend, shape, with_bias, dtype, seed):
    args = _operands(backend, **shape, with_bias=with_bias, seed=seed, dtype=dtype)
    length = _tolerance_length(shape)
    xp = backend.xp
    assert_close(_cond_linear_shared(**args, xp=xp), _cond_linear_mixed(**args, xp=xp),
                 reduction_length=length, name="shared vs mixed forward")
    cotangent = backend.asarray(
        numpy.random.default_rng(seed + 1).standard_normal((shape["batch"], shape["out_features"])),
        dtype=dtype)
    _assert_grads_close(_cond_linear_shared_vjp(cotangent, **args, xp=xp),
                        _cond_linear_mixed_vjp(cotangent, **args, xp=xp),
                        _vjp_tolerance_length(shape), "shared vs mixed VJP")


@pytest.mark.parametrize(("n_experts", "in_features", "shared"),
                         [(3, 2, False), (3, 3, True), (3, 4, True), (1, 1, True)])
def test_shared_matmuls_are_used_exactly_when_experts_do_not_outnumber_features(
        backend, n_experts, in_features, shared):
    experts = backend.asarray(numpy.ones((n_experts, 2, in_features)))
    assert _uses_shared_matmuls(experts) is shared


@pytest.mark.parametrize("form", sorted(FORM_SHAPES))
def test_cond_linear_selects_form_by_cost(backend, form):
    shape = FORM_SHAPES[form]
    args = _operands(backend, **shape)
    assert _uses_shared_matmuls(args["experts"]) == (shape["n_experts"] <= shape["in_features"])
    assert _uses_shared_matmuls(args["experts"]) == (form == "shared")
    worker = {"shared": _cond_linear_shared, "mixed": _cond_linear_mixed}[form]
    worker_vjp = {"shared": _cond_linear_shared_vjp, "mixed": _cond_linear_mixed_vjp}[form]
    assert_close(cond_linear(**args), worker(**args, xp=backend.xp), rtol=0.0, atol=0.0,
                 name=f"cond_linear vs the {form} form")
    cotangent = backend.asarray(numpy.ones((shape["batch"], shape["out_features"])))
    expected = worker_vjp(cotangent, **args, xp=backend.xp)
    for name, grad in cond_linear_vjp(cotangent, **args).items():
        assert_close(grad, expected[name], rtol=0.0, atol=0.0,
                     name=f"cond_linear_vjp[{name}] vs the {form} form")


@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("form", sorted(FORM_SHAPES))
def test_one_hot_routing_selects_an_expert(backend, form, with_bias):
    shape = FORM_SHAPES[form]
    args = _operands(backend, **shape, with_bias=with_bias)
    x, experts = to_numpy(args["x"]), to_numpy(args["experts"])
    chosen = numpy.arange(shape["batch"]) % shape["n_experts"]
    one_hot = numpy.eye(shape["n_experts"])[chosen]
    expected = numpy.einsum("boi,bi->bo", experts[chosen], x)
    if with_bias:
        expected = expected + to_numpy(args["bias"])[chosen]
    args["routing"] = backend.asarray(one_hot)
    assert_close(cond_linear(**_present(args)), backend.asarray(expected),
                 reduction_length=shape["in_features"] + 1, name="one-hot cond_linear")


@given(shape=dims, with_bias=st.booleans(), seed=st.integers(0, 2**16))
def test_cond_linear_is_linear_in_routing(backend, shape, with_bias, seed):
    args = _present(_operands(backend, **shape, with_bias=with_bias, seed=seed))
    other = backend.asarray(numpy.random.default_rng(seed + 1).standard_normal(
        (shape["batch"], shape["n_experts"])))
    a, b = 0.75, -2.0
    combined = cond_linear(**{**args, "routing": a * args["routing"] + b * other})
    separate = a * cond_linear(**args) + b * cond_linear(**{**args, "routing": other})
    # Both sides round at magnitudes up to |a| + |b| = 2.75 times the routing's: four times
    # the length doubles the tolerance to cover that.
    assert_close(combined, separate, reduction_length=_tolerance_length(shape) * 4,
                 name="cond_linear(a α + b α') vs a cond_linear(α) + b cond_linear(α')")


@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("form", sorted(FORM_SHAPES))
def test_cond_linear_equals_condconv_on_a_1x1_kernel(backend, form, with_bias):
    shape = FORM_SHAPES[form]
    args = _operands(backend, **shape, with_bias=with_bias)
    xp = backend.xp
    batch, n_experts = shape["batch"], shape["n_experts"]
    in_features, out_features = shape["in_features"], shape["out_features"]
    image = {**args, "x": xp.reshape(args["x"], (batch, in_features, 1, 1)),
             "experts": xp.reshape(args["experts"], (n_experts, out_features, in_features, 1, 1))}
    length = _tolerance_length(shape)
    assert_close(cond_linear(**_present(args)),
                 xp.reshape(condconv(**_present(image)), (batch, out_features)),
                 reduction_length=length, name="cond_linear vs condconv 1x1")
    cotangent = backend.asarray(numpy.random.default_rng(1).standard_normal((batch, out_features)))
    grads = cond_linear_vjp(cotangent, **_present(args))
    image_grads = condconv_vjp(xp.reshape(cotangent, (batch, out_features, 1, 1)),
                               **_present(image))
    assert sorted(grads) == sorted(image_grads)
    for name, grad in grads.items():
        assert_close(grad, xp.reshape(image_grads[name], grad.shape),
                     reduction_length=_vjp_tolerance_length(shape),
                     name=f"gradient of {name} vs condconv 1x1")


@pytest.mark.parametrize("form", sorted(FORM_SHAPES))
def test_cond_linear_layer_equals_condconv_layer_on_a_1x1_kernel(backend, form):
    shape = FORM_SHAPES[form]
    operands = _layer_operands(backend, **shape)
    xp = backend.xp
    batch, in_features = shape["batch"], shape["in_features"]
    x = operands.pop("x")
    image_params = {**operands, "experts": xp.reshape(
        operands["experts"], tuple(operands["experts"].shape) + (1, 1))}
    assert_close(cond_linear_layer(x, operands),
                 xp.reshape(condconv_layer(xp.reshape(x, (batch, in_features, 1, 1)), image_params),
                            (batch, shape["out_features"])),
                 reduction_length=_tolerance_length(shape), name="layer vs condconv_layer 1x1")


# ---------------------------------------------------------------- gradients


@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("form", sorted(FORM_SHAPES))
@pytest.mark.parametrize("op", ["cond_linear", "moe_cond_linear"])
def test_vjp_matches_finite_differences(backend, op, form, with_bias):
    f, f_vjp = {"cond_linear": (cond_linear, cond_linear_vjp),
                "moe_cond_linear": (moe_cond_linear, moe_cond_linear_vjp)}[op]
    args = _present(_operands(backend, **FORM_SHAPES[form], with_bias=with_bias, seed=3))
    for name in args:
        check_vjp(f, f_vjp, args, wrt=[name], name=f"{op} ({form} shapes)", seed=4)
    check_vjp(f, f_vjp, args, name=f"{op} ({form} shapes)", seed=5)


@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("form", sorted(FORM_SHAPES))
def test_layer_vjp_matches_finite_differences(backend, form, with_bias):
    args = _layer_operands(backend, **FORM_SHAPES[form], with_bias=with_bias, seed=6)
    name = f"cond_linear_layer ({form} shapes)"
    for arg_name in args:
        check_vjp(_layer_f, _layer_f_vjp, args, wrt=[arg_name], name=name, seed=7)
    check_vjp(_layer_f, _layer_f_vjp, args, name=name, seed=8)


@pytest.mark.parametrize("form", sorted(FORM_SHAPES))
def test_private_forms_match_finite_differences(backend, form):
    worker, worker_vjp = {"shared": (_cond_linear_shared, _cond_linear_shared_vjp),
                          "mixed": (_cond_linear_mixed, _cond_linear_mixed_vjp)}[form]
    args = _operands(backend, **FORM_SHAPES["mixed" if form == "shared" else "shared"], seed=9)
    check_vjp(functools.partial(worker, xp=backend.xp),
              functools.partial(worker_vjp, xp=backend.xp), args,
              name=f"the {form} form on the other form's shapes")


# ---------------------------------------------------------------- against torch autograd


@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("form", sorted(FORM_SHAPES))
def test_layer_matches_torch_autograd(backend, form, with_bias):
    torch = pytest.importorskip("torch")
    shape = FORM_SHAPES[form]
    args = _layer_operands(backend, **shape, with_bias=with_bias, seed=10)
    cotangent = backend.asarray(numpy.random.default_rng(11).standard_normal(
        (shape["batch"], shape["out_features"])))
    leaves = {k: torch.tensor(to_numpy(v), requires_grad=True) for k, v in args.items()}
    logits = leaves["x"] @ leaves["route_weight"].T
    if with_bias:
        logits = logits + leaves["route_bias"]
    routing = torch.sigmoid(logits)
    y = torch.einsum("be,eoi,bi->bo", routing, leaves["experts"], leaves["x"])
    if with_bias:
        y = y + routing @ leaves["bias"]
    names = sorted(leaves)
    torch_grads = torch.autograd.grad(y, [leaves[k] for k in names],
                                      grad_outputs=torch.tensor(to_numpy(cotangent)))
    length = _vjp_tolerance_length(shape)
    assert_close(_layer_f(**args), backend.asarray(y.detach().numpy()),
                 reduction_length=length, name="cond_linear_layer vs torch")
    grads = _layer_f_vjp(cotangent, **args)
    _assert_grads_close(grads, {k: backend.asarray(g.numpy()) for k, g in zip(names, torch_grads)},
                        length, "cond_linear_layer_vjp vs torch autograd")
