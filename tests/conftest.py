"""Shared fixtures: one ``backend`` fixture runs every test body on every backend."""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, settings

from condconv_ref.backends import BackendUnavailable, get_backend

settings.register_profile("dev", max_examples=25, deadline=None)
settings.register_profile(
    "ci", max_examples=40, deadline=None, derandomize=True, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))

BACKENDS = [
    pytest.param("numpy", id="numpy"),
    pytest.param("array_api_strict", id="strict"),
    pytest.param("array_api_strict:device1", id="strict-device1"),
    pytest.param("torch", id="torch", marks=pytest.mark.torch),
    pytest.param("jax", id="jax", marks=pytest.mark.jax),
    pytest.param("cupy", id="cupy", marks=pytest.mark.gpu),
]


@pytest.fixture(scope="session", params=BACKENDS)
def backend(request):
    """A :class:`condconv_ref.backends.Backend`; unavailable backends skip with the reason.

    JAX runs with its 64-bit mode on (:func:`jax_x64`), as float64 needs it."""
    try:
        chosen = get_backend(request.param)
    except BackendUnavailable as exc:
        pytest.skip(str(exc))
    if request.param == "jax":
        request.getfixturevalue("jax_x64")
    return chosen


@pytest.fixture(scope="session")
def jax_x64():
    """JAX's 64-bit mode, on for the rest of the session (restored at its end)."""
    jax = pytest.importorskip("jax", reason="needs JAX (pip install condconv_ref[jax])")
    enabled = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    yield
    jax.config.update("jax_enable_x64", enabled)
