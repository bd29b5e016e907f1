"""``condconv_ref.layouts``: every converter is undone by its inverse, and the flattened
TensorFlow / PyTorch storages mean what the public layers (timm, TensorFlow Model Garden) do."""

from __future__ import annotations

import itertools

import array_api_compat
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from condconv_ref import condconv, condconv_layer, depthwise_condconv, layouts
from condconv_ref.backends import to_numpy
from condconv_ref.testing import assert_close


@st.composite
def expert_shapes(draw, depthwise=False):
    """(E, O, C/g, *k) with 1 to 3 spatial dims; (E, C·m, 1, *k) and m when depthwise."""
    nd = draw(st.integers(1, 3))
    kernel = tuple(draw(st.lists(st.integers(1, 3), min_size=nd, max_size=nd)))
    n_experts = draw(st.integers(1, 3))
    if depthwise:
        channels, multiplier = draw(st.integers(1, 3)), draw(st.integers(1, 3))
        return (n_experts, channels * multiplier, 1) + kernel, multiplier
    return (n_experts, draw(st.integers(1, 4)), draw(st.integers(1, 4))) + kernel, None


def _kept(result, like):
    xp = array_api_compat.array_namespace(like)
    assert array_api_compat.array_namespace(result) is xp
    assert result.dtype == like.dtype
    assert array_api_compat.device(result) == array_api_compat.device(like)


def _random(backend, shape, seed=0):
    return backend.asarray(np.random.default_rng(seed).standard_normal(shape))


@given(shape=expert_shapes())
def test_torch_flat_experts_round_trip(backend, shape):
    experts = _random(backend, shape[0])
    flat = layouts.to_torch_flat_experts(experts)
    assert tuple(flat.shape) == (shape[0][0], int(np.prod(shape[0][1:])))
    back = layouts.from_torch_flat_experts(flat, shape[0][1:])
    _kept(flat, experts)
    _kept(back, experts)
    np.testing.assert_array_equal(to_numpy(back), to_numpy(experts))
    again = layouts.to_torch_flat_experts(back)
    np.testing.assert_array_equal(to_numpy(again), to_numpy(flat))


@given(shape=expert_shapes())
def test_tf_flat_experts_round_trip(backend, shape):
    experts = _random(backend, shape[0])
    flat = layouts.to_tf_flat_experts(experts)
    back = layouts.from_tf_flat_experts(flat, shape[0][1:])
    _kept(flat, experts)
    _kept(back, experts)
    np.testing.assert_array_equal(to_numpy(back), to_numpy(experts))
    np.testing.assert_array_equal(
        to_numpy(layouts.to_tf_flat_experts(layouts.from_tf_flat_experts(flat, shape[0][1:]))),
        to_numpy(flat))


@given(shape=expert_shapes(depthwise=True))
def test_tf_flat_depthwise_experts_round_trip(backend, shape):
    shape, multiplier = shape
    experts = _random(backend, shape)
    flat = layouts.to_tf_flat_depthwise_experts(experts, depth_multiplier=multiplier)
    back = layouts.from_tf_flat_depthwise_experts(flat, shape[1:], depth_multiplier=multiplier)
    _kept(flat, experts)
    _kept(back, experts)
    np.testing.assert_array_equal(to_numpy(back), to_numpy(experts))


@given(shape=expert_shapes())
def test_flax_experts_round_trip(backend, shape):
    experts = _random(backend, shape[0])
    kernels = layouts.to_flax_experts(experts)
    assert tuple(kernels.shape) == (shape[0][0],) + shape[0][3:] + (shape[0][2], shape[0][1])
    back = layouts.from_flax_experts(kernels)
    _kept(kernels, experts)
    _kept(back, experts)
    np.testing.assert_array_equal(to_numpy(back), to_numpy(experts))
    np.testing.assert_array_equal(  # the TensorFlow storage is the same kernel, flattened
        to_numpy(kernels).reshape(shape[0][0], -1),
        to_numpy(layouts.to_tf_flat_experts(experts)))


@given(shape=st.lists(st.integers(1, 4), min_size=2, max_size=3))
def test_flax_dense_round_trip(backend, shape):
    weight = _random(backend, tuple(shape))
    kernel = layouts.to_flax_dense(weight)
    assert tuple(kernel.shape) == tuple(shape[:-2]) + (shape[-1], shape[-2])
    back = layouts.from_flax_dense(kernel)
    _kept(kernel, weight)
    _kept(back, weight)
    np.testing.assert_array_equal(to_numpy(back), to_numpy(weight))
    np.testing.assert_array_equal(to_numpy(kernel), np.swapaxes(to_numpy(weight), -1, -2))


@given(nd=st.integers(1, 3), sizes=st.lists(st.integers(1, 4), min_size=5, max_size=5))
def test_channels_last_round_trip(backend, nd, sizes):
    x = _random(backend, tuple(sizes[:nd + 2]))
    last = layouts.to_channels_last(x)
    assert tuple(last.shape) == (sizes[0],) + tuple(sizes[2:nd + 2]) + (sizes[1],)
    first = layouts.to_channels_first(last)
    _kept(last, x)
    _kept(first, x)
    np.testing.assert_array_equal(to_numpy(first), to_numpy(x))
    np.testing.assert_array_equal(to_numpy(last), np.moveaxis(to_numpy(x), 1, -1))


def _tf_convolution_valid(x_nhwc, kernel_hwio):
    """``tf.nn.convolution(x, kernel, padding='VALID')`` for NHWC / HWIO, by its definition:
    out[b, i, j, o] = sum_{di, dj, c} x[b, i + di, j + dj, c] kernel[di, dj, c, o]."""
    batch, height, width, _ = x_nhwc.shape
    kh, kw, _, out_channels = kernel_hwio.shape
    out = np.zeros((batch, height - kh + 1, width - kw + 1, out_channels))
    for i, j in itertools.product(range(out.shape[1]), range(out.shape[2])):
        window = x_nhwc[:, i:i + kh, j:j + kw, :]
        out[:, i, j, :] = np.tensordot(window, kernel_hwio, axes=([1, 2, 3], [0, 1, 2]))
    return out


def _tf_depthwise_valid(x_nhwc, kernel_hwcm):
    """``tf.nn.depthwise_conv2d(x, kernel, padding='VALID')``, by its definition:
    out[b, i, j, c·m + q] = sum_{di, dj} x[b, i + di, j + dj, c] kernel[di, dj, c, q]."""
    batch, height, width, channels = x_nhwc.shape
    kh, kw, _, multiplier = kernel_hwcm.shape
    out = np.zeros((batch, height - kh + 1, width - kw + 1, channels * multiplier))
    for i, j, c, q in itertools.product(range(out.shape[1]), range(out.shape[2]),
                                        range(channels), range(multiplier)):
        window = x_nhwc[:, i:i + kh, j:j + kw, c]
        out[:, i, j, c * multiplier + q] = np.sum(window * kernel_hwcm[:, :, c, q], axis=(1, 2))
    return out


def test_tf_flat_experts_match_condconv2d_semantics(backend):
    """Seed 004's ``CondConv2D``: ``tf.reshape(routing @ condconv_kernel, (kh, kw, C, O))``
    per example, then an NHWC convolution; the reference on the converted arrays agrees."""
    rng = np.random.default_rng(4)
    batch, channels, out_channels, n_experts, kh, kw = 2, 3, 4, 3, 2, 3
    x_nhwc = rng.standard_normal((batch, 5, 6, channels))
    condconv_kernel = rng.standard_normal((n_experts, kh * kw * channels * out_channels))
    routing = rng.uniform(size=(batch, n_experts))
    expected = np.stack([
        _tf_convolution_valid(x_nhwc[b:b + 1], (routing[b] @ condconv_kernel).reshape(
            kh, kw, channels, out_channels))[0]
        for b in range(batch)])

    experts = layouts.from_tf_flat_experts(backend.asarray(condconv_kernel),
                                           (out_channels, channels, kh, kw))
    x = layouts.to_channels_first(backend.asarray(x_nhwc))
    y = layouts.to_channels_last(condconv(x, experts, backend.asarray(routing)))
    assert_close(y, backend.asarray(expected), reduction_length=n_experts * channels * kh * kw)


def test_flax_experts_and_dense_match_a_flax_condconv_layer(backend):
    """A Flax-style layer: routing ``sigmoid(Dense(mean(x)))`` with the kernel (C, E), each
    example's HWIO kernel ``jnp.tensordot(routing, kernels, 1)``, an NHWC convolution; the
    reference on the converted arrays agrees."""
    rng = np.random.default_rng(5)
    batch, channels, out_channels, n_experts, kh, kw = 2, 3, 4, 3, 2, 3
    x_nhwc = rng.standard_normal((batch, 5, 6, channels))
    kernels = rng.standard_normal((n_experts, kh, kw, channels, out_channels))
    dense_kernel = rng.standard_normal((channels, n_experts))
    routing = 1 / (1 + np.exp(-x_nhwc.mean(axis=(1, 2)) @ dense_kernel))
    expected = np.stack([
        _tf_convolution_valid(x_nhwc[b:b + 1], np.tensordot(routing[b], kernels, axes=1))[0]
        for b in range(batch)])

    params = {"experts": layouts.from_flax_experts(backend.asarray(kernels)),
              "route_weight": layouts.from_flax_dense(backend.asarray(dense_kernel))}
    x = layouts.to_channels_first(backend.asarray(x_nhwc))
    y = layouts.to_channels_last(condconv_layer(x, params))
    assert_close(y, backend.asarray(expected), reduction_length=n_experts * channels * kh * kw)


def test_tf_flat_depthwise_experts_match_depthwise_condconv2d_semantics(backend):
    """Seed 004's ``DepthwiseCondConv2D``: ``tf.reshape(routing @ kernel, (kh, kw, C, m))``
    per example, then ``depthwise_conv2d``; the reference on the converted arrays agrees."""
    rng = np.random.default_rng(40)
    batch, channels, multiplier, n_experts, kh, kw = 2, 3, 2, 2, 3, 2
    x_nhwc = rng.standard_normal((batch, 5, 4, channels))
    kernel = rng.standard_normal((n_experts, kh * kw * channels * multiplier))
    routing = rng.uniform(size=(batch, n_experts))
    expected = np.stack([
        _tf_depthwise_valid(x_nhwc[b:b + 1], (routing[b] @ kernel).reshape(
            kh, kw, channels, multiplier))[0]
        for b in range(batch)])

    experts = layouts.from_tf_flat_depthwise_experts(
        backend.asarray(kernel), (channels * multiplier, 1, kh, kw), depth_multiplier=multiplier)
    x = layouts.to_channels_first(backend.asarray(x_nhwc))
    y = depthwise_condconv(x, experts, backend.asarray(routing), depth_multiplier=multiplier)
    assert_close(layouts.to_channels_last(y), backend.asarray(expected),
                 reduction_length=n_experts * kh * kw)


def test_torch_flat_experts_match_grouped_batch_trick_semantics(backend):
    """Seed 000's storage: ``(routing @ weight).view(B·O, C/g, kh, kw)`` is example b's
    kernel in rows b·O ... b·O + O - 1; the reference on the converted experts agrees with
    a grouped convolution written out by its definition."""
    rng = np.random.default_rng(0)
    batch, groups, per_group, out_channels, n_experts, kh, kw = 2, 2, 2, 4, 3, 2, 2
    x = rng.standard_normal((batch, groups * per_group, 4, 5))
    weight = rng.standard_normal((n_experts, out_channels * per_group * kh * kw))
    routing = rng.uniform(size=(batch, n_experts))
    kernels = (routing @ weight).reshape(batch * out_channels, per_group, kh, kw)
    expected = np.zeros((batch, out_channels, 4 - kh + 1, 5 - kw + 1))
    per_out_group = out_channels // groups
    for b, o, i, j in itertools.product(range(batch), range(out_channels),
                                        range(expected.shape[2]), range(expected.shape[3])):
        group = o // per_out_group
        window = x[b, group * per_group:(group + 1) * per_group, i:i + kh, j:j + kw]
        expected[b, o, i, j] = np.sum(window * kernels[b * out_channels + o])

    experts = layouts.from_torch_flat_experts(backend.asarray(weight),
                                              (out_channels, per_group, kh, kw))
    y = condconv(backend.asarray(x), experts, backend.asarray(routing), groups=groups)
    assert_close(y, backend.asarray(expected), reduction_length=n_experts * per_group * kh * kw)


@pytest.mark.parametrize("call, message", [
    (lambda xp: layouts.from_tf_flat_experts(xp.zeros((2, 7)), (2, 3, 1)),
     "from_tf_flat_experts: flat has shape (2, 7), expected (2, 6)"),
    (lambda xp: layouts.to_tf_flat_depthwise_experts(xp.zeros((1, 3, 1, 2)), depth_multiplier=2),
     "to_tf_flat_depthwise_experts: experts has shape (1, 3, 1, 2)"),
    (lambda xp: layouts.from_flax_experts(xp.zeros((2, 3, 4))),
     "from_flax_experts: kernels has 3 dims, expected 4 or 5 or 6"),
    (lambda xp: layouts.to_flax_dense(xp.zeros((2, 3, 4, 5))),
     "to_flax_dense: weight has 4 dims, expected 2 or 3 (out, in) or (E, out, in)"),
    (lambda xp: layouts.to_channels_last(xp.zeros((2, 3))),
     "to_channels_last: x has 2 dims, expected 3 or 4 or 5"),
])
def test_bad_layouts_raise_naming_the_function_and_argument(backend, call, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        call(backend.xp)


class _OnlyArrayProtocol:
    """An array of a library outside the array API, readable through ``__array__`` only
    (as a TensorFlow tensor is)."""

    def __init__(self, values):
        self._values = values

    def __array__(self, dtype=None, copy=None):
        return self._values if dtype is None else self._values.astype(dtype)


class _OnlyDLPack:
    """An array readable through DLPack only."""

    def __init__(self, values):
        self._values = values

    def __dlpack__(self, **kwargs):
        return self._values.__dlpack__(**kwargs)

    def __dlpack_device__(self):
        return self._values.__dlpack_device__()


CONVERTERS = [
    (layouts.to_torch_flat_experts, (2, 3, 4, 2, 2), {}),
    (layouts.from_torch_flat_experts, (2, 48), {"kernel_shape": (3, 4, 2, 2)}),
    (layouts.to_tf_flat_experts, (2, 3, 4, 2, 2), {}),
    (layouts.from_tf_flat_experts, (2, 48), {"kernel_shape": (3, 4, 2, 2)}),
    (layouts.to_tf_flat_depthwise_experts, (2, 6, 1, 2, 2), {"depth_multiplier": 2}),
    (layouts.from_tf_flat_depthwise_experts, (2, 24), {"kernel_shape": (6, 1, 2, 2),
                                                       "depth_multiplier": 2}),
    (layouts.to_flax_experts, (2, 3, 4, 2, 2), {}),
    (layouts.from_flax_experts, (2, 2, 2, 4, 3), {}),
    (layouts.to_flax_dense, (3, 4), {}),
    (layouts.from_flax_dense, (2, 4, 3), {}),
    (layouts.to_channels_last, (2, 3, 4, 5), {}),
    (layouts.to_channels_first, (2, 4, 5, 3), {}),
]


@pytest.mark.parametrize("wrapper", [_OnlyArrayProtocol, _OnlyDLPack])
@pytest.mark.parametrize("convert, shape, options", CONVERTERS,
                         ids=[convert.__name__ for convert, _, _ in CONVERTERS])
def test_converters_read_any_array_through_numpy_or_dlpack(wrapper, convert, shape, options):
    values = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    converted = convert(wrapper(values), **options)
    assert type(converted) is np.ndarray and converted.dtype == np.float32
    np.testing.assert_array_equal(converted, convert(values, **options))


@pytest.mark.parametrize("convert, shape, options", CONVERTERS,
                         ids=[convert.__name__ for convert, _, _ in CONVERTERS])
def test_converters_refuse_what_is_no_array(convert, shape, options):
    with pytest.raises(TypeError, match=rf"{convert.__name__}: \w+ must be an array \(of the "
                                        r"array API, or readable through DLPack or NumPy's "
                                        r"__array__\), got list"):
        convert([[1.0, 2.0]], **options)
