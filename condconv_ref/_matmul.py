r"""``a @ b`` without the spurious floating-point warnings of some BLAS kernels.

NumPy hands float32/float64 matrix products to BLAS and, after the call, turns
any floating-point exception flag that is set into a ``RuntimeWarning``
("invalid value encountered in matmul") or an error, as ``np.errstate``
says.  That assumes the BLAS raises a flag only for an operation of the
product itself.  Not every kernel does: OpenBLAS's SkylakeX ``sgemv_t`` for an
inner dimension of 5 (``sgemv_kernel_t_5``, used by NumPy wheels on AVX-512
CPUs) stores the five products of a row to a stack buffer of eight floats and
sums them; the compiler sums two rows at once in 4-lane SIMD registers, and
lanes 2 and 3 read the three entries nobody wrote.  The two results are
right, but when that stack memory holds a signalling NaN or an opposite pair
of infinities left by an earlier call, the discarded lanes raise FE_INVALID
and NumPy warns.  So ``(2, 5) @ (5, 1)`` in float32 warns or not depending on
what ran before it (NumPy itself ignores BLAS flags only for BLAS builds it
knows to be affected, ``npy_blas_supports_fpe``).

:func:`matmul` computes the product with "invalid" and "overflow" masked, then
looks at the result: an invalid operation of the product itself (inf·0,
inf − inf) leaves a NaN in the output it belongs to, and an overflow an inf or a
NaN, because neither is ever absorbed by a later product or sum.  If some
output is NaN although its row of ``a`` and column of ``b`` hold no NaN, or
non-finite although they are all finite, the flag was real, and the product is
recomputed unmasked so that NumPy reports it exactly as the caller's
``np.errstate`` asks.  Otherwise the flags came from outside the product and
are dropped.  Only NumPy-backed namespaces (NumPy, array-api-strict) check
flags; the others multiply as they are.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

import array_api_compat
import numpy as np

__all__ = ["matmul"]


def _numpy_backed(xp: ModuleType) -> bool:
    return (array_api_compat.is_numpy_namespace(xp)
            or array_api_compat.is_array_api_strict_namespace(xp))


def _made_non_finite(a: Any, b: Any, product: Any, *, xp: ModuleType) -> bool:
    """Whether the product itself made a NaN or an inf: an output NaN whose row of
    ``a`` and column of ``b`` hold no NaN, or an output inf or NaN whose row and
    column are all finite."""
    finite = xp.isfinite(product)
    if bool(xp.all(finite)):
        return False

    def outer(rows: Any, columns: Any) -> Any:
        return xp.expand_dims(rows, axis=-1) & xp.expand_dims(columns, axis=-2)

    reads_no_nan = outer(~xp.any(xp.isnan(a), axis=-1), ~xp.any(xp.isnan(b), axis=-2))
    reads_finite = outer(xp.all(xp.isfinite(a), axis=-1), xp.all(xp.isfinite(b), axis=-2))
    made = (xp.isnan(product) & reads_no_nan) | (~finite & reads_finite)
    return bool(xp.any(made))


def matmul(a: Any, b: Any, *, xp: ModuleType) -> Any:
    """``a @ b`` for ``a`` of shape (..., M, N) and ``b`` of shape (..., N, P).

    Warns (or raises, per ``np.errstate``) for an invalid operation or an
    overflow of the product itself, as ``a @ b`` does, but not for flags a BLAS
    kernel raised in lanes it discards (see the module docstring).  Where an
    output also reads a NaN or inf input its own inf·0 or overflow is not
    reported: the output is non-finite either way.
    """
    if not _numpy_backed(xp):
        return a @ b
    with np.errstate(invalid="ignore", over="ignore"):
        product = a @ b
    if _made_non_finite(a, b, product, xp=xp):
        return a @ b  # a real inf·0, inf − inf or overflow: let NumPy report it
    return product
