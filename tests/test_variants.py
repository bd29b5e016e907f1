"""``condconv_ref.variants``: every variant builds cases its reference accepts, on every backend,
and ``strategies.cases`` draws only what ``Supports`` allows."""

from __future__ import annotations

import array_api_compat
import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from condconv_ref.backends import to_numpy
from condconv_ref.testing import ConvConfig, Supports, assert_close, cases
from condconv_ref.variants import VARIANTS, build_case, reference_forward, reference_vjp


@given(data=st.data(), variant=st.sampled_from(sorted(VARIANTS)))
def test_reference_runs_every_variant_on_every_backend_and_keeps_its_namespace(
        backend, data, variant):
    case = data.draw(cases(variant, Supports(max_size=5)))
    y = reference_forward(case, backend)
    assert array_api_compat.array_namespace(y) is backend.xp
    assert array_api_compat.device(y) == array_api_compat.device(backend.asarray(np.zeros(1)))
    assert_close(backend.asarray(to_numpy(reference_forward(case))), y,
                 reduction_length=case.lengths[0])
    cotangent = np.random.default_rng(case.seed).standard_normal(tuple(y.shape))
    grads = reference_vjp(case, cotangent, backend)
    assert sorted(grads) == sorted(case.differentiable)
    for name, gradient in grads.items():
        assert tuple(gradient.shape) == case.shapes[name]
        assert array_api_compat.array_namespace(gradient) is backend.xp


@given(case=cases("condconv_layer", Supports(spatial_dims=(2,), padding_forms=("int",),
                                             padding_modes=("reflect",), bias=(True,),
                                             max_groups=1, max_stride=1, max_experts=2)))
def test_cases_stay_within_supports(backend, case):
    assert case.x.ndim == 4 and isinstance(case.options["padding"], int)
    assert case.options["padding_mode"] == "reflect" and case.options["groups"] == 1
    assert case.options["stride"] == (1, 1) and case.shapes["experts"][0] <= 2
    assert "bias" in case.arrays and "route_bias" in case.arrays
    moved = case.to(backend.xp, dtype="float32", device=backend.device)
    assert all(a.dtype == backend.xp.float32 for a in moved.arrays.values())
    np.testing.assert_array_equal(to_numpy(moved.x), case.x.astype(np.float32))


@given(case=cases("dynamic_conv_layer", Supports(temperatures=(2.0, 3.0))))
def test_dynamic_cases_draw_their_temperature_from_supports(backend, case):
    assert 2.0 <= case.options["temperature"] <= 3.0
    y = reference_forward(case, backend)
    assert tuple(y.shape) == (case.shapes["x"][0], case.shapes["experts"][1],
                              *case.geometry.out)


def test_the_same_seed_builds_the_same_case_and_another_seed_does_not(backend):
    config = ConvConfig(batch=2, in_channels=2, out_channels=2, groups=2, spatial=(4, 3),
                        kernel=(2, 2), stride=(1, 1), dilation=(1, 1), padding="same",
                        padding_mode="circular", n_experts=3, bias=True)
    first, again = (build_case("depthwise_condconv_layer", config, seed=5) for _ in range(2))
    other = build_case("depthwise_condconv_layer", config, seed=6)
    assert first.options == again.options and first.options["depth_multiplier"] == 1
    for name in first.arrays:
        np.testing.assert_array_equal(first.arrays[name], again.arrays[name])
    assert not np.array_equal(first.x, other.x)
    assert first.geometry.padding == ((0, 1), (0, 1))
    assert_close(reference_forward(first, backend), reference_forward(again, backend))
