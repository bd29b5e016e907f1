"""Test helpers for CondConv-style ops: closeness assertions, VJP checks, hypothesis strategies,
and :func:`check_implementation`, which checks anyone's implementation against the reference.

``condconv_ref.testing.torch_adapter`` (not imported here: it needs torch) turns a PyTorch
module into the callables the checker takes.
"""

from condconv_ref.testing._numerics import (
    VJPCheck,
    assert_close,
    check_vjp,
    default_tolerances,
    numerical_jvp,
    numerical_vjp,
)
from condconv_ref.testing.checker import (
    Implementation,
    ImplementationMismatch,
    Mismatch,
    Report,
    check_implementation,
)
from condconv_ref.testing.strategies import (
    CondConvArrays,
    ConvConfig,
    Supports,
    arrays_for,
    cases,
    condconv_inputs,
    conv_configs,
)

__all__ = [
    "CondConvArrays",
    "ConvConfig",
    "Implementation",
    "ImplementationMismatch",
    "Mismatch",
    "Report",
    "Supports",
    "VJPCheck",
    "arrays_for",
    "assert_close",
    "cases",
    "check_implementation",
    "check_vjp",
    "condconv_inputs",
    "conv_configs",
    "default_tolerances",
    "numerical_jvp",
    "numerical_vjp",
]
