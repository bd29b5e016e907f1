"""A pytest plugin: the fixtures a test suite built on condconv_ref needs.

Installing condconv_ref registers it (the ``pytest11`` entry point
``condconv_ref``), so a test file uses the fixtures without any ``conftest.py``:

``condconv_backend``
    A :class:`condconv_ref.backends.Backend` (``.xp``, ``.device``,
    ``.asarray``), parametrised over every backend, so one test body runs on
    NumPy, array-api-strict, torch and CuPy; a backend that is not installed
    skips with the reason.  ``--condconv-backend NAME`` (repeatable) narrows
    the list.  JAX runs only when named (``--condconv-backend jax``): it
    compiles every operation anew for each new shape, and float64 needs its
    64-bit mode, which the plugin then turns on for the rest of the session.
``condconv_xp``
    The array namespace of ``condconv_backend``.
``check_layer``
    :func:`condconv_ref.testing.check_implementation` with the run's settings
    (``--condconv-examples N``, ``--condconv-seed S``): a failure raises
    :class:`~condconv_ref.testing.ImplementationMismatch`, an
    ``AssertionError`` whose message is the minimal failing case.

Nothing heavy is imported until a fixture is used, so the plugin costs
nothing in test suites that do not use it.  Without installing the package,
load it with ``pytest -p condconv_ref.testing.pytest_plugin``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

__all__: list[str] = []  # fixtures and hooks, found by pytest; documented in the how-to guide

_DEFAULT_EXAMPLES = 100


def pytest_addoption(parser: pytest.Parser) -> None:
    """The plugin's command-line options, in a ``condconv_ref`` group of ``pytest --help``."""
    from condconv_ref.backends import BACKEND_NAMES

    group = parser.getgroup("condconv_ref", "condconv_ref fixtures")
    group.addoption("--condconv-backend", action="append", dest="condconv_backends",
                    choices=BACKEND_NAMES, metavar="NAME",
                    help="run condconv_backend tests on this backend only; repeat for several "
                         f"(default: {', '.join(_default_backends())}; jax only when named, "
                         "and it turns JAX's 64-bit mode on)")
    group.addoption("--condconv-examples", type=int, default=_DEFAULT_EXAMPLES, metavar="N",
                    help="cases check_layer draws per check (default: %(default)s)")
    group.addoption("--condconv-seed", type=int, default=0, metavar="S",
                    help="seed of check_layer's cases (default: %(default)s)")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Parametrise every test that uses ``condconv_backend`` over the chosen backends."""
    if "condconv_backend" not in metafunc.fixturenames:
        return
    names = metafunc.config.getoption("condconv_backends") or _default_backends()
    metafunc.parametrize("condconv_backend", list(dict.fromkeys(names)), indirect=True,
                         scope="session")


@pytest.fixture(scope="session")
def condconv_backend(request: pytest.FixtureRequest) -> Any:
    """A :class:`condconv_ref.backends.Backend`, one per backend; unavailable ones skip."""
    from condconv_ref.backends import BackendUnavailable, get_backend

    try:
        backend = get_backend(request.param)
    except BackendUnavailable as error:
        pytest.skip(str(error))
    if request.param == "jax":
        import jax

        jax.config.update("jax_enable_x64", True)
    return backend


def _default_backends() -> tuple[str, ...]:
    """The backends ``condconv_backend`` runs on unless ``--condconv-backend`` names others."""
    from condconv_ref.backends import BACKEND_NAMES

    return tuple(name for name in BACKEND_NAMES if name != "jax")


@pytest.fixture
def condconv_xp(condconv_backend: Any) -> Any:
    """The array namespace of :func:`condconv_backend`."""
    return condconv_backend.xp


@pytest.fixture
def check_layer(request: pytest.FixtureRequest) -> Callable[..., Any]:
    """``check_layer(implementation, variant, **options) -> Report``:
    :func:`condconv_ref.testing.check_implementation` with ``max_examples`` and ``seed`` from
    the command line (``options`` override them); raises on failure."""
    from condconv_ref.testing import check_implementation

    defaults = {"max_examples": request.config.getoption("condconv_examples"),
                "seed": request.config.getoption("condconv_seed")}

    def check(implementation: Any, variant: str, **options: Any) -> Any:
        return check_implementation(implementation, variant=variant,
                                    **{**defaults, **options, "raise_on_failure": True})

    return check
