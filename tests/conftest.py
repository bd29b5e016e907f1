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


JAX_EXAMPLES = 2
"""Examples a hypothesis test draws on JAX, at most.  JAX compiles every primitive anew for
each new shape (about 15 ms each, 10 to 30 per op call), and every drawn case has new shapes,
so one example costs JAX about 100 times what it costs NumPy.  The other backends run the
full count, so the properties are proven there; on JAX a few cases prove that every op runs
and agrees (immutable arrays, dtypes, the device)."""


@pytest.fixture(autouse=True)
def _few_examples_on_jax(request):
    """Cap a hypothesis test's examples at :data:`JAX_EXAMPLES` while it runs on JAX."""
    callspec = getattr(request.node, "callspec", None)
    test = request.function
    own = getattr(test, "_hypothesis_internal_use_settings", None)
    if callspec is None or callspec.params.get("backend") != "jax" or own is None:
        yield
        return
    test._hypothesis_internal_use_settings = settings(own, max_examples=min(own.max_examples,
                                                                             JAX_EXAMPLES))
    try:
        yield
    finally:
        test._hypothesis_internal_use_settings = own


@pytest.fixture(scope="session")
def jax_x64():
    """JAX's 64-bit mode, on for the rest of the session (restored at its end)."""
    jax = pytest.importorskip("jax", reason="needs JAX (pip install condconv_ref[jax])")
    enabled = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    yield
    jax.config.update("jax_enable_x64", enabled)
