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

The same rule differentiates a VJP.  For a fixed cotangent :math:`c`, the
gradient of :math:`\langle c, f\rangle` with respect to :math:`a_i` is
multilinear in the other arguments, so its derivative along the tangents is
the sum over :math:`j \ne i` of that gradient with :math:`a_j` replaced by
:math:`\dot a_j`: one VJP call per tangent, each contributing only to the
arguments that share a term of :math:`f` with :math:`a_j`.
:func:`mixed_vjp_derivative` does this for the CondConv ops
:math:`f = f_1(x, W, \alpha) + \alpha\beta`.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

import array_api_compat

from condconv_ref._conv_engine import run_conv
from condconv_ref._validate import ConvGeometry

__all__ = ["added", "bias_term", "conv_tangent", "mixed_vjp_derivative", "total"]


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


def mixed_vjp_derivative(op_vjp: Any, cotangent: Any, tangents: dict[str, Any], x: Any,
                         experts: Any, routing: Any, bias: Any, *,
                         xp: ModuleType) -> dict[str, Any]:
    r"""The derivative of ``op_vjp(cotangent, x, experts, routing, bias, *, xp)`` along
    ``tangents`` (any of ``x``, ``experts``, ``routing``, ``bias``) at a fixed cotangent.

    For :math:`f = f_1(x, W, \alpha) + \alpha\beta`, trilinear plus bilinear,
    each tangent enters through one VJP call with its argument replaced:

    * :math:`\dot\alpha`: the VJP at :math:`(x, W, \dot\alpha, \beta)` gives
      :math:`x`, :math:`W` and :math:`\beta`'s shares;
    * :math:`\dot x`: at :math:`(\dot x, W, \alpha)` without the bias, :math:`W`'s
      and :math:`\alpha`'s;
    * :math:`\dot W`: at :math:`(x, \dot W, \alpha)` without the bias, :math:`x`'s
      and :math:`\alpha`'s;
    * :math:`\dot\beta`: at :math:`(0, W, \alpha, \dot\beta)`, :math:`\alpha`'s
      (the zero input removes :math:`f_1`'s share exactly).

    Returns a dict keyed like ``op_vjp``'s, every entry present.
    """
    shapes = {"x": x.shape, "experts": experts.shape, "routing": routing.shape}
    if bias is not None:
        shapes["bias"] = bias.shape
    terms: dict[str, list[Any]] = {name: [] for name in shapes}

    def collect(grads: dict[str, Any], names: tuple[str, ...]) -> None:
        for name in names:
            terms[name].append(grads[name])

    if "routing" in tangents:
        collect(op_vjp(cotangent, x, experts, tangents["routing"], bias, xp=xp),
                ("x", "experts") + (("bias",) if bias is not None else ()))
    if "x" in tangents:
        collect(op_vjp(cotangent, tangents["x"], experts, routing, None, xp=xp),
                ("experts", "routing"))
    if "experts" in tangents:
        collect(op_vjp(cotangent, x, tangents["experts"], routing, None, xp=xp),
                ("x", "routing"))
    if "bias" in tangents and bias is not None:
        collect(op_vjp(cotangent, xp.zeros_like(x), experts, routing, tangents["bias"], xp=xp),
                ("routing",))
    return {name: total(terms[name], tuple(shape), x, xp=xp) for name, shape in shapes.items()}
