"""A user's test file built on the condconv_ref pytest plugin: no conftest.py needed.

Run it with ``pytest test_my_layer.py``; ``--condconv-examples 500`` for a longer search,
``--condconv-backend numpy`` for one backend only.
"""

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from condconv_ref import condconv_layer
from condconv_ref.testing import Supports, cases, check_case, conv_configs
from condconv_ref.testing.strategies import arrays_for, seeds


def my_cond_linear_layer(case):
    """The layer under test: linear CondConv with sigmoid routing, in plain NumPy."""
    a = case.arrays
    logits = a["x"] @ a["route_weight"].T + a.get("route_bias", 0.0)
    routing = 1.0 / (1.0 + np.exp(-logits))
    y = np.einsum("be,eof,bf->bo", routing, a["experts"], a["x"])
    return y + routing @ a["bias"] if "bias" in a else y


def test_my_layer_matches_the_reference(check_layer):
    # A failure raises with the minimal failing case as the message.
    check_layer(my_cond_linear_layer, "cond_linear_layer")


def test_my_layer_in_float32(check_layer):
    check_layer(my_cond_linear_layer, "cond_linear_layer", dtype="float32", max_examples=30)


@settings(max_examples=20)
@given(case=cases("cond_linear_layer", Supports(max_features=4)),
       dtype=st.sampled_from(["float64", "float32"]))
def test_inside_my_own_property_test(case, dtype):
    # Draw the case in your own @given and check it with check_case: check_layer runs a
    # hypothesis search of its own, which hypothesis refuses to nest in yours.
    check_case(my_cond_linear_layer, case, dtype=dtype)


@settings(max_examples=10)
@given(config=conv_configs(spatial_dims=(2,)), seed=seeds())
def test_reference_keeps_the_namespace(condconv_backend, config, seed):
    # Runs once per backend (NumPy, array-api-strict, torch, CuPy); missing ones skip.
    a = arrays_for(config, xp=condconv_backend.xp, device=condconv_backend.device, seed=seed)
    y = condconv_layer(a.x, a.layer_params(), **config.options())
    assert type(y) is type(a.x) and tuple(y.shape) == config.output_shape
