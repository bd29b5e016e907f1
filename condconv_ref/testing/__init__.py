"""Test helpers for CondConv-style ops: closeness assertions, VJP checks, hypothesis strategies,
and :func:`check_implementation`, which checks anyone's implementation against the reference.

Only the strategies (:func:`cases`, :func:`condconv_inputs`, :func:`conv_configs`) and the
functions that draw cases with them (:func:`check_implementation`) need hypothesis; the
strategies are imported on first use, so everything else here works without it.

The adapters turn a framework's layer into the callables the checker takes:
:func:`torch_implementation` a PyTorch module and :func:`jax_implementation` a JAX function or
a Flax-style module, each imported from its module (``condconv_ref.testing.torch_adapter``,
``jax_adapter``) on first use, importing its framework only when its callables run;
``condconv_ref.testing.tf_adapter.keras_implementation`` a Keras layer.
"""

import importlib
from typing import TYPE_CHECKING, Any

from condconv_ref._cases import CondConvArrays, ConvConfig, Supports, arrays_for
from condconv_ref.testing._numerics import (
    VJPCheck,
    assert_close,
    check_vjp,
    default_tolerances,
    numerical_jvp,
    numerical_vjp,
)
from condconv_ref.accuracy import Comparison
from condconv_ref.testing.checker import (
    Implementation,
    ImplementationMismatch,
    Report,
    Unsupported,
    check_case,
    check_implementation,
)

if TYPE_CHECKING:
    from condconv_ref.testing.jax_adapter import jax_implementation
    from condconv_ref.testing.torch_adapter import torch_implementation
    from condconv_ref.testing.strategies import cases, condconv_inputs, conv_configs

__all__ = [
    "Comparison",
    "CondConvArrays",
    "ConvConfig",
    "Implementation",
    "ImplementationMismatch",
    "Report",
    "Supports",
    "Unsupported",
    "VJPCheck",
    "arrays_for",
    "assert_close",
    "cases",
    "check_case",
    "check_implementation",
    "check_vjp",
    "condconv_inputs",
    "conv_configs",
    "default_tolerances",
    "jax_implementation",
    "numerical_jvp",
    "numerical_vjp",
    "torch_implementation",
]

_STRATEGIES = ("cases", "condconv_inputs", "conv_configs")
_ADAPTERS = {"jax_implementation": "jax_adapter", "torch_implementation": "torch_adapter"}


def __getattr__(name: str) -> Any:
    """The hypothesis strategies, imported from :mod:`condconv_ref.testing.strategies` on
    first use (an ``ImportError`` naming hypothesis when it is not installed), and the
    adapters, imported from their modules on first use."""
    if name in _STRATEGIES:
        from condconv_ref.testing import strategies

        return getattr(strategies, name)
    if name in _ADAPTERS:
        return getattr(importlib.import_module(f"{__name__}.{_ADAPTERS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
