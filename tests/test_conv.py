"""conv and conv_vjp against independent oracles (SciPy, torch) and finite differences."""

from __future__ import annotations

import importlib
import math
from functools import partial

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import condconv_ref
from condconv_ref import conv, conv_vjp
from condconv_ref.backends import to_numpy
from condconv_ref.testing import assert_close, check_vjp
from condconv_ref.testing.oracles import explicit_pairs, scipy_conv, torch_conv
from condconv_ref.testing.strategies import conv_configs, seeds
from engine_forms import FORMS, engine_form

BIAS_KINDS = (None, "shared", "per_example")
# The im2col engine, whose window size the test shrinks.
im2col_module = importlib.import_module("condconv_ref._im2col")


def conv_arrays(config, seed, per_example_kernel, bias_kind, dtype):
    """NumPy x, kernel and bias (or None) for ``config``, rounded to ``dtype``."""
    rng = np.random.default_rng(seed)
    batch = (config.batch,) if per_example_kernel else ()
    x = rng.standard_normal(config.x_shape)
    kernel = rng.standard_normal(batch + config.kernel_shape)
    bias = None
    if bias_kind is not None:
        lead = (config.batch,) if bias_kind == "per_example" else ()
        bias = rng.standard_normal(lead + (config.out_channels,)).astype(dtype)
    return x.astype(dtype), kernel.astype(dtype), bias


def on_backend(backend, *arrays):
    return [None if a is None else backend.asarray(a) for a in arrays]


def reduction_length(config) -> int:
    return config.in_channels // config.groups * math.prod(config.kernel)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@given(config=conv_configs(max_size=6), seed=seeds(), per_example_kernel=st.booleans(),
       bias_kind=st.sampled_from(BIAS_KINDS), form=st.sampled_from(FORMS))
def test_conv_matches_scipy_correlate(backend, dtype, config, seed, per_example_kernel,
                                      bias_kind, form):
    x, kernel, bias = conv_arrays(config, seed, per_example_kernel, bias_kind, dtype)
    with engine_form(form):
        y = conv(*on_backend(backend, x, kernel, bias), **config.options())
    expected = backend.asarray(scipy_conv(x, kernel, bias, config), dtype=dtype)
    assert_close(y, expected, reduction_length=reduction_length(config), name="conv")


@given(config=conv_configs(max_size=6), seed=seeds(), per_example_kernel=st.booleans(),
       bias_kind=st.sampled_from(BIAS_KINDS), form=st.sampled_from(FORMS))
def test_conv_and_vjp_match_torch_autograd(backend, config, seed, per_example_kernel, bias_kind,
                                           form):
    torch = pytest.importorskip("torch")
    x, kernel, bias = conv_arrays(config, seed, per_example_kernel, bias_kind, "float64")
    cotangent = np.random.default_rng(seed + 1).standard_normal(config.output_shape)
    leaves = {name: torch.tensor(a, requires_grad=True)
              for name, a in (("x", x), ("kernel", kernel), ("bias", bias)) if a is not None}
    y_torch = torch_conv(torch, leaves["x"], leaves["kernel"], leaves.get("bias"), config)
    y_torch.backward(torch.tensor(cotangent))
    args = on_backend(backend, x, kernel, bias)
    length = reduction_length(config)
    with engine_form(form):
        y = conv(*args, **config.options())
        grads = conv_vjp(backend.asarray(cotangent), *args, **config.options())
    assert_close(y, backend.asarray(y_torch.detach().numpy()), reduction_length=length,
                 name="conv")
    assert sorted(grads) == sorted(leaves)
    for name, leaf in leaves.items():
        assert_close(grads[name], backend.asarray(leaf.grad.numpy()),
                     reduction_length=math.prod(config.output_shape), name=f"conv_vjp[{name}]")


@given(config=conv_configs(padding_forms=("same",), max_size=9, max_stride=3), seed=seeds())
def test_same_padding_output_size_is_ceil_of_size_over_stride(backend, config, seed):
    x, kernel, _ = conv_arrays(config, seed, False, None, "float64")
    y = conv(*on_backend(backend, x, kernel), **config.options())
    assert tuple(y.shape[2:]) == tuple(-(-n // s) for n, s in zip(config.spatial, config.stride))


@pytest.mark.parametrize(
    ("padding_mode", "expected"),
    [  # x = [0, 1, 2, 3], k = [1, 1]: total padding 1, all of it after x
        ("zeros", [1.0, 3.0, 5.0, 3.0]),  # 0 1 2 3 | 0
        ("reflect", [1.0, 3.0, 5.0, 5.0]),  # 0 1 2 3 | 2
        ("replicate", [1.0, 3.0, 5.0, 6.0]),  # 0 1 2 3 | 3
        ("circular", [1.0, 3.0, 5.0, 3.0]),  # 0 1 2 3 | 0
    ],
)
def test_same_padding_puts_the_odd_element_at_the_end(backend, padding_mode, expected):
    x = backend.asarray(np.arange(4.0).reshape(1, 1, 4))
    y = conv(x, backend.asarray(np.ones((1, 1, 2))), padding="same", padding_mode=padding_mode)
    assert_close(y, backend.asarray(np.array(expected).reshape(1, 1, 4)), name="conv")


@given(config=conv_configs(), seed=seeds())
def test_every_padding_form_equals_its_explicit_pairs(backend, config, seed):
    x, kernel, bias = on_backend(backend, *conv_arrays(config, seed, False, "shared", "float64"))
    y = conv(x, kernel, bias, **config.options())
    explicit = conv(x, kernel, bias, **{**config.options(), "padding": explicit_pairs(config)})
    assert_close(y, explicit, rtol=0.0, atol=0.0, name=f"conv(padding={config.padding!r})")


@given(config=conv_configs(max_size=5, max_batch=2), seed=seeds(),
       per_example_kernel=st.booleans(), bias_kind=st.sampled_from(BIAS_KINDS),
       form=st.sampled_from(FORMS))
def test_conv_vjp_matches_finite_differences(backend, config, seed, per_example_kernel,
                                             bias_kind, form):
    x, kernel, bias = on_backend(
        backend, *conv_arrays(config, seed, per_example_kernel, bias_kind, "float64"))
    args = {"x": x, "kernel": kernel} | ({} if bias is None else {"bias": bias})
    with engine_form(form):
        check_vjp(partial(conv, **config.options()), partial(conv_vjp, **config.options()), args,
                  seed=seed)


@given(config=conv_configs(max_size=6), seed=seeds(), per_example_kernel=st.booleans(),
       window_bytes=st.sampled_from([1, 256, 4096]))
def test_conv_in_windows_equals_conv_in_one_piece(backend, config, seed, per_example_kernel,
                                                  window_bytes):
    # Large convolutions are computed in windows of examples and output rows;
    # a tiny byte budget forces small inputs through that path.
    x, kernel, bias = on_backend(
        backend, *conv_arrays(config, seed, per_example_kernel, "shared", "float64"))
    cotangent = backend.asarray(np.random.default_rng(seed + 1).standard_normal(config.output_shape))
    whole = conv(x, kernel, bias, **config.options())
    whole_grads = conv_vjp(cotangent, x, kernel, bias, **config.options())
    with pytest.MonkeyPatch.context() as patch, engine_form("im2col"):
        patch.setattr(im2col_module, "_WINDOW_BYTES", window_bytes)
        windowed = conv(x, kernel, bias, **config.options())
        windowed_grads = conv_vjp(cotangent, x, kernel, bias, **config.options())
    assert_close(windowed, whole, reduction_length=reduction_length(config), name="conv")
    for name, gradient in whole_grads.items():
        assert_close(windowed_grads[name], gradient,
                     reduction_length=math.prod(config.output_shape), name=f"conv_vjp[{name}]")


# inf - inf and 0 · inf are NaN, and NumPy says so.
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("where", ["x", "kernel", "cotangent"])
@pytest.mark.parametrize("value", [math.nan, math.inf], ids=["nan", "inf"])
@given(config=conv_configs(max_size=5), seed=seeds(), per_example_kernel=st.booleans(),
       form=st.sampled_from(FORMS), data=st.data())
def test_every_engine_form_has_the_nan_and_inf_pattern_of_im2col(backend, where, value, config,
                                                                 seed, per_example_kernel, form,
                                                                 data):
    """One non-finite entry reaches exactly the outputs and gradients it reaches in im2col,
    whose sums hold only the terms of the definition: no form may add 0 · inf terms (the
    gather form's zero reads, the flat form's gaps)."""
    x, kernel, bias = conv_arrays(config, seed, per_example_kernel, "shared", "float64")
    arrays = {"x": x, "kernel": kernel,
              "cotangent": np.random.default_rng(seed + 1).standard_normal(config.output_shape)}
    spoiled = arrays[where]
    spoiled[tuple(data.draw(st.integers(0, n - 1), label=f"index {axis}")
                  for axis, n in enumerate(spoiled.shape))] = value
    x, kernel, bias, cotangent = on_backend(backend, arrays["x"], arrays["kernel"], bias,
                                            arrays["cotangent"])
    results = {}
    for name in (form, "im2col"):
        with engine_form(name):
            results[name] = {"y": conv(x, kernel, bias, **config.options()),
                             **conv_vjp(cotangent, x, kernel, bias, **config.options())}
    for key, result in results[form].items():
        actual, desired = to_numpy(result), to_numpy(results["im2col"][key])
        assert np.array_equal(np.isnan(actual), np.isnan(desired)), f"{key}: NaN pattern"
        assert np.array_equal(actual == math.inf, desired == math.inf), f"{key}: +inf pattern"
        assert np.array_equal(actual == -math.inf, desired == -math.inf), f"{key}: -inf pattern"


def python_calls(function) -> int:
    """How many Python and built-in function calls condconv_ref's own code makes while
    ``function()`` runs (a count, not a time).

    What the array library does inside one of those calls is not counted: JAX, say, compiles
    each primitive in Python the first time it meets a shape, and array-api-strict's checks
    differ with the shapes; neither is work of the library's."""
    import os
    import sys

    library = os.path.dirname(condconv_ref.__file__) + os.sep
    calls = 0

    def count(frame, event, arg):
        nonlocal calls
        caller = frame.f_back if event == "call" else frame
        if event in ("call", "c_call") and caller is not None:
            calls += caller.f_code.co_filename.startswith(library)

    sys.setprofile(count)
    try:
        function()
    finally:
        sys.setprofile(None)
    return calls


@pytest.mark.parametrize("padding_mode", ["reflect", "replicate", "circular"])
def test_padding_costs_no_python_work_per_border_position(backend, padding_mode):
    """pad and its adjoint gather and fold each border with array operations: the Python calls
    of a conv and its VJP are the same for a padding of 4 and of 4000 (a Python loop over the
    border made a replicate padding of 10**6 take 20 s)."""
    size = 4001

    def run(padding):
        x = backend.asarray(np.ones((1, 1, size)))
        kernel = backend.asarray(np.ones((1, 1, 3)))
        cotangent = backend.asarray(np.ones((1, 1, size + 2 * padding - 2)))
        options = dict(padding=padding, padding_mode=padding_mode)
        return lambda: (conv(x, kernel, **options), conv_vjp(cotangent, x, kernel, **options))

    python_calls(run(2))  # fills the caches that do not depend on the shapes
    assert python_calls(run(4000)) == python_calls(run(4))


@pytest.mark.parametrize("padding_mode", ["reflect", "replicate", "circular"])
def test_the_padding_adjoint_adds_each_border_position_to_its_source(backend, padding_mode):
    """The adjoint of padding, through conv_vjp with a 1-tap kernel, equals the explicit sum of
    the cotangent over every padded position that copies each input (PyTorch's semantics)."""
    size, before, after = 5, 4, 3
    if padding_mode == "circular":
        before, after = 5, 2
    padded = np.arange(-before, size + after)
    source = {"reflect": np.where(np.abs(padded) >= size, 2 * (size - 1) - np.abs(padded),
                                  np.abs(padded)),
              "replicate": np.clip(padded, 0, size - 1),
              "circular": padded % size}[padding_mode]
    cotangent = np.random.default_rng(0).standard_normal((1, 1, padded.size))
    expected = np.zeros(size)
    np.add.at(expected, source, cotangent[0, 0])
    grads = conv_vjp(backend.asarray(cotangent), backend.asarray(np.ones((1, 1, size))),
                     backend.asarray(np.ones((1, 1, 1))), padding=((before, after),),
                     padding_mode=padding_mode)
    assert_close(grads["x"], backend.asarray(expected[None, None]), reduction_length=padded.size,
                 name=f"{padding_mode} padding adjoint")
