"""Doctest collection for the whole repository (``--doctest-modules`` over ``condconv_ref``).

torch is optional (``pip install -e ".[test]"`` does not install it), so a doctest
that needs it is marked ``torch``, like the torch backend's tests in
``tests/conftest.py``, and skipped with a reason when torch is not installed,
instead of failing with ``ModuleNotFoundError``; so is one that imports TensorFlow
or Keras (the ``tensorflow`` extra) when TensorFlow is not installed, and one that
imports JAX (marked ``jax``, the ``jax`` extra) when JAX is not installed.  A doctest
needs torch when one of its examples imports torch, or when it is listed in
``TORCH_DOCTESTS`` (examples that reach torch through the library, which raises
``BackendUnavailable`` without it).
"""

from __future__ import annotations

import importlib.util
import re

import pytest
from _pytest.doctest import DoctestItem

TORCH_DOCTESTS = frozenset({
    "condconv_ref.gpu.compare_torch",              # runs torch's conv2d on the CPU
    "condconv_ref.testing.torch_adapter",          # the module docstring: a torch layer
})
_IMPORTS_TORCH = re.compile(r"^\s*(import|from)\s+torch\b", re.MULTILINE)


_IMPORTS_TENSORFLOW = re.compile(r"^\s*(import|from)\s+(tensorflow|keras)\b", re.MULTILINE)
_IMPORTS_JAX = re.compile(r"^\s*(import|from)\s+jax\b", re.MULTILINE)


def needs_jax(item: DoctestItem) -> bool:
    """Whether the doctest ``item`` runs JAX (imports it)."""
    return any(_IMPORTS_JAX.search(example.source) for example in item.dtest.examples)


def needs_tensorflow(item: DoctestItem) -> bool:
    """Whether the doctest ``item`` runs TensorFlow (imports it, or Keras)."""
    return any(_IMPORTS_TENSORFLOW.search(example.source) for example in item.dtest.examples)


def needs_torch(item: DoctestItem) -> bool:
    """Whether the doctest ``item`` runs torch."""
    return item.dtest.name in TORCH_DOCTESTS or any(
        _IMPORTS_TORCH.search(example.source) for example in item.dtest.examples)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    torch_missing = importlib.util.find_spec("torch") is None
    skip = pytest.mark.skip(reason="needs torch, which is not installed "
                                   "(pip install torch to run this doctest)")
    tensorflow_missing = importlib.util.find_spec("tensorflow") is None
    skip_tensorflow = pytest.mark.skip(reason="needs TensorFlow, which is not installed "
                                              "(pip install condconv_ref[tensorflow])")
    jax_missing = importlib.util.find_spec("jax") is None
    skip_jax = pytest.mark.skip(reason="needs JAX, which is not installed "
                                       "(pip install condconv_ref[jax])")
    for item in items:
        if isinstance(item, DoctestItem) and needs_torch(item):
            item.add_marker(pytest.mark.torch)
            if torch_missing:
                item.add_marker(skip)
        if isinstance(item, DoctestItem) and needs_tensorflow(item):
            item.add_marker(pytest.mark.tensorflow)
            if tensorflow_missing:
                item.add_marker(skip_tensorflow)
        if isinstance(item, DoctestItem) and needs_jax(item):
            item.add_marker(pytest.mark.jax)
            if jax_missing:
                item.add_marker(skip_jax)
