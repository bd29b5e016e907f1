r"""Forward-mode plumbing shared by every JVP: the product rule's terms and a conv's tangent.

Every op here is linear in each of its array arguments (conv, mixing, CondConv,
linear CondConv) or is built from such ops and elementwise maps (the routings,
the layers).  The directional derivative along tangents :math:`\dot a_j` of an
op :math:`f` linear in each argument is, by the product rule, the sum over the
arguments of :math:`f` with that one argument replaced by its tangent:

.. math::

    \dot y = \sum_j f(a_1, \ldots, \dot a_j, \ldots).

:func:`total` adds such terms (absent tangents contribute nothing, and an
output with no term is an exact zero; :func:`added` leaves it ``None`` for the
next step to skip); :func:`conv_tangent` is the rule for
a convolution, each of whose terms the convolution engine
(:mod:`condconv_ref._conv_engine`) runs.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

import array_api_compat

from condconv_ref._conv_engine import run_conv
from condconv_ref._validate import ConvGeometry

__all__ = ["added", "bias_term", "conv_tangent", "total"]


def total(terms: list[Any], shape: tuple[int, ...], like: Any, *, xp: ModuleType) -> Any:
    """The sum of ``terms`` (arrays that broadcast to ``shape``) as one ``shape`` array in the
    dtype and on the device of ``like``; zeros when there is no term."""
    result = xp.zeros(shape, dtype=like.dtype, device=array_api_compat.device(like))
    for term in terms:
        result = result + term
    return result


def added(terms: list[Any]) -> Any:
    """The sum of ``terms``, or ``None`` (a zero tangent) when there is none."""
    if not terms:
        return None
    result = terms[0]
    for term in terms[1:]:
        result = result + term
    return result


def bias_term(bias: Any, nd: int, *, xp: ModuleType) -> Any:
    """A bias (O,) or per example (B, O) shaped to broadcast against (B, O, \\*out)."""
    leading = (1,) if bias.ndim == 1 else (bias.shape[0],)
    return xp.reshape(bias, leading + (bias.shape[-1],) + (1,) * nd)


def conv_tangent(tangents: dict[str, Any], x: Any, kernel: Any, geometry: ConvGeometry, *,
                 xp: ModuleType) -> Any:
    r"""The tangent of :math:`y = \mathrm{conv}(x, W, \beta)` along ``tangents``.

    ``tangents`` holds any of ``"x"``, ``"kernel"`` (either may be per example)
    and ``"bias"``; the product rule gives
    :math:`\dot y = \mathrm{conv}(\dot x, W) + \mathrm{conv}(x, \dot W) + \dot\beta`,
    the two convolutions run by :func:`~condconv_ref._conv_engine.run_conv`.
    """
    nd = x.ndim - 2
    terms = []
    if "x" in tangents:
        terms.append(run_conv(tangents["x"], kernel, None, geometry, xp=xp))
    if "kernel" in tangents:
        terms.append(run_conv(x, tangents["kernel"], None, geometry, xp=xp))
    if "bias" in tangents:
        terms.append(bias_term(tangents["bias"], nd, xp=xp))
    shape = (x.shape[0], kernel.shape[-nd - 2]) + geometry.out
    return total(terms, shape, x, xp=xp)
