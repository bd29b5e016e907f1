r"""The error model: how far a correct computation may be from the float64 reference.

Every comparison in the library (``condconv-ref verify``, ``check``,
``golden verify``, ``gpu-check``, :func:`condconv_ref.testing.check_implementation`
and the test suite) uses this one model and reports the same figure: the
**error in units of the bound**, :math:`\max_i |a_i - r_i| / \beta_i`, which is
at most 1 for a result that passes, together with the array and index of the
worst element.

The bound
---------
For every compared element the reference computes, next to its float64 value
:math:`r_i`, the *scale* :math:`s_i` of the rounding it must tolerate: the sum
of the magnitudes of every term that went into it.  For the multilinear ops
(``conv``, ``mix_experts``, ``condconv``, ``moe_condconv``,
``depthwise_condconv``, ``cond_linear`` and their VJPs) the same op evaluated
on the absolute values of its arguments gives that sum exactly,
:math:`s = f(|x|, |W|, |\alpha|, |b|) = \sum |x||W||\alpha| + \ldots`.  For the
routing (pooling, sigmoid, softmax with temperature, the ReLU MLP) and the
layers built on it, :mod:`condconv_ref._scales` propagates a scale through each
step to first order: a step :math:`v = \phi(u)` carries
:math:`s_v = |\phi'(u)|\,s_u + |v|` (the inherited error plus its own
rounding), a product or sum of inexact values the same rule with absolute
values.

An element passes when

.. math::

    |a_i - r_i| \le \beta_i = \bigl(\gamma_n(u) + \gamma_n(u_{64})
        + \gamma_{4}(u_\text{in}) + u_\text{out}\bigr)\, s_i
        + \bigl(n\,(2\lambda u + 2\lambda_{64} u_{64}) + 4\lambda\bigr)(1 + s_i)
        + \lambda u_\text{out}

with

- :math:`\gamma_n(u) = n u / (1 - n u)`, the standard bound on the relative
  error of a sum or product of :math:`n` rounded operations (Higham,
  *Accuracy and Stability of Numerical Algorithms*, section 3.1), valid for any
  order of summation, blocked, pairwise or fused-multiply-add;
- :math:`u` the unit roundoff of the precision under test
  (:data:`PRECISIONS`: :math:`2^{-53}` for float64, :math:`2^{-24}` float32,
  :math:`2^{-11}` float16, :math:`2^{-8}` bfloat16) and :math:`u_{64}` that of
  the float64 reference, whose own rounding is allowed for too;
- :math:`n` the *depth*: the longest sum of the computation (``Case.lengths``)
  plus :data:`ELEMENTARY_ROUNDINGS` for the elementary functions (an
  argument shift, ``exp``/``log1p`` within two ulps, a division);
- :math:`u_\text{in}` the rounding of matmul *operands* by a precision that
  multiplies in fewer bits than it stores (TF32: :math:`2^{-11}`; 0 for the
  others): each term is a product of at most three factors across at most two
  nested matmuls, so at most :data:`OPERAND_ROUNDINGS` such roundings;
- :math:`u_\text{out}` one final rounding of each result to a coarser storage
  dtype (float16 results of float32 arithmetic, the library's float16 policy:
  :math:`2^{-11}`; 0 for the others), at most :math:`u_\text{out} |r_i| \le
  u_\text{out} s_i`, or half the spacing of the storage dtype's subnormals,
  :math:`\lambda u_\text{out}`, for a result that lands among them (the term
  :math:`\lambda u_\text{out}` added to :math:`\beta_i`);
- :math:`\lambda` the smallest positive normal number of the precision: a
  rounding into the subnormal range errs by at most half the subnormal
  spacing :math:`2\lambda u`, counted whole so that it is representable
  (:math:`2^{-1074}` in float64: IEEE gradual underflow); each of the
  :math:`n` roundings may, and an underflowed intermediate is carried at
  most by :math:`1 + s_i`.  Elementary functions may also *flush*: many fast
  ``exp`` and sigmoid implementations (PyTorch's vectorised CPU kernels among
  them) return 0 for a result below :math:`\lambda`, an error of up to
  :math:`\lambda` each, so the :data:`ELEMENTARY_ROUNDINGS` of the depth add
  :math:`\lambda` each, carried by :math:`1 + s_i` too.  Flush-to-zero
  *arithmetic* (sums and products) stays outside the model.

No factor is tuned: a correct computation in the precision under test is
inside :math:`\beta` by construction (to first order in :math:`u`), and an
error above it is a defect.  The bound is a worst case; typical rounding
errors are far below it (a random walk grows like :math:`\sqrt n`, the bound
like :math:`n`), so the reported figure of a correct implementation is
usually between :math:`10^{-3}` and :math:`10^{-1}`.

NaN and infinity: an element passes when both sides are the same non-finite
value (NaN against NaN, :math:`+\infty` against :math:`+\infty`), and fails
with an infinite figure otherwise.

Examples
--------
A cancelling sum, :math:`-0.5 + 0.47`, judged by the size of its terms:

>>> import numpy as np
>>> from condconv_ref import accuracy
>>> expected, scale = np.array([-0.03]), np.array([0.97])
>>> actual = expected + 2e-16
>>> result = accuracy.compare("output", actual, expected, scale, depth=2)
>>> result.passed, result.units < 1
(True, True)
>>> accuracy.compare("output", expected + 1e-12, expected, scale, depth=2).passed
False
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import array_api_compat
import numpy as np

from condconv_ref.backends import to_numpy

__all__ = [
    "DTYPES",
    "ELEMENTARY_ROUNDINGS",
    "OPERAND_ROUNDINGS",
    "PRECISIONS",
    "Comparison",
    "Precision",
    "bound",
    "compare",
    "compare_all",
    "exact_bound",
    "gamma",
    "gradient_keys",
    "jsonable",
    "precision",
    "real_host",
]


@dataclass(frozen=True)
class Precision:
    """One floating-point precision of the model.

    Attributes
    ----------
    name : str
    unit_roundoff : float
        :math:`u`: half the distance from 1 to the next number, the largest
        relative error of one rounding.
    smallest_normal : float
        :math:`\\lambda`: the underflow threshold of the arithmetic (the
        storage dtype's, for the final rounding, is its own precision's).
    operand_roundoff : float
        The rounding of matmul operands when the multiply unit keeps fewer
        bits than the storage dtype (TF32), else 0.
    storage : str
        The array dtype that holds results of this precision.
    result_roundoff : float
        One final rounding of each result to a storage dtype coarser than the
        arithmetic (float16 results of float32 arithmetic), else 0.

    Examples
    --------
    >>> from condconv_ref.accuracy import PRECISIONS
    >>> PRECISIONS["float32"].unit_roundoff == 2.0**-24
    True
    >>> PRECISIONS["tf32"].storage, PRECISIONS["tf32"].operand_roundoff == 2.0**-11
    ('float32', True)
    """

    name: str
    unit_roundoff: float
    smallest_normal: float
    operand_roundoff: float = 0.0
    storage: str = ""
    result_roundoff: float = 0.0


PRECISIONS: Mapping[str, Precision] = {
    "float64": Precision("float64", 2.0**-53, 2.0**-1022, storage="float64"),
    "float32": Precision("float32", 2.0**-24, 2.0**-126, storage="float32"),
    "float16": Precision("float16", 2.0**-11, 2.0**-14, storage="float16"),
    "bfloat16": Precision("bfloat16", 2.0**-8, 2.0**-126, storage="bfloat16"),
    "tf32": Precision("tf32", 2.0**-24, 2.0**-126, operand_roundoff=2.0**-11,
                      storage="float32"),
    "float16/float32": Precision("float16/float32", 2.0**-24, 2.0**-126, storage="float16",
                                 result_roundoff=2.0**-11),
}
"""Every precision the model knows.  TF32 is float32 storage and accumulation with
10-bit-mantissa multiplies (NVIDIA tensor cores); ``float16/float32`` is the library's
float16 policy, float32 arithmetic whose results are rounded to float16 once (an op that
accumulated in float16 fails it)."""

DTYPES = ("float64", "float32", "float16", "bfloat16")
"""The array dtypes a check can run in.  A command accepts those its backend has
(NumPy has no bfloat16: a bfloat16 check hands float32 arrays holding
bfloat16 values to a framework that runs them in bfloat16)."""

ELEMENTARY_ROUNDINGS = 4
"""Roundings an elementary function adds to the depth: an argument shift, ``exp`` or
``log1p`` (two ulps), a division."""

OPERAND_ROUNDINGS = 4
"""Operand roundings per term with TF32: two nested matmuls, two operands each."""

def precision(name: Any) -> Precision:
    """The :class:`Precision` of a dtype or precision name (``'float32'``, ``numpy.float32``,
    ``torch.bfloat16``, ``'tf32'``).

    Raises
    ------
    ValueError
        For a name the model does not know.

    Examples
    --------
    >>> import numpy as np
    >>> from condconv_ref.accuracy import precision
    >>> precision(np.float16).unit_roundoff == 2.0**-11
    True
    >>> precision("int8")
    Traceback (most recent call last):
    ...
    ValueError: accuracy.precision: dtype must be one of float64, float32, float16, bfloat16, tf32, float16/float32, got 'int8'
    """
    if isinstance(name, Precision):
        return name
    if isinstance(name, str):
        text = name
    else:
        try:
            text = np.dtype(name).name
        except TypeError:  # torch, array-api-strict, ... dtypes: their printed name
            text = str(name).rsplit(".", 1)[-1]
    if text not in PRECISIONS:
        raise ValueError(f"accuracy.precision: dtype must be one of {', '.join(PRECISIONS)}, "
                         f"got {name!r}")
    return PRECISIONS[text]


def gamma(n: int, u: float) -> float:
    """:math:`\\gamma_n(u) = n u / (1 - n u)`; infinite when :math:`n u \\ge 1` (no bound).

    Examples
    --------
    >>> from condconv_ref.accuracy import gamma
    >>> gamma(10, 2.0**-53) == 10 * 2.0**-53 / (1 - 10 * 2.0**-53)
    True
    >>> gamma(4096, 2.0**-11)
    inf
    """
    product = n * u
    return math.inf if product >= 1 else product / (1 - product)


def exact_bound(scale: Any, depth: int, dtype: Any = "float64") -> np.ndarray:
    """The bound on ``|actual - exact|`` for each element: :math:`\\beta` without the
    reference's share (its :math:`\\gamma_n(u_{64})` and float64 underflow terms).

    For identities between two computations in ``dtype`` of one exact quantity,
    such as :math:`\\langle c, Jt\\rangle = \\langle J^\\top c, t\\rangle` for a JVP
    and a VJP, where no float64 reference takes part.

    Examples
    --------
    >>> import numpy as np
    >>> from condconv_ref.accuracy import bound, exact_bound, gamma
    >>> float(exact_bound(np.array([1.0]), depth=3, dtype="float32")[0]) == (
    ...     gamma(3, 2.0**-24) + 3 * 2.0**-126 * 2 * 2.0**-24 * 2)
    True
    >>> bool(exact_bound(np.array([1.0]), 3, "float64")[0] < bound(np.array([1.0]), 3)[0])
    True
    """
    tested = precision(dtype)
    s = np.abs(np.asarray(scale, dtype=np.float64))
    relative = (gamma(depth, tested.unit_roundoff)
                + gamma(OPERAND_ROUNDINGS, tested.operand_roundoff) + tested.result_roundoff)
    return relative * s + depth * tested.smallest_normal * 2 * tested.unit_roundoff * (1.0 + s)


def bound(scale: Any, depth: int, dtype: Any = "float64",
          reference_dtype: Any = "float64") -> np.ndarray:
    """The bound :math:`\\beta` on ``|actual - reference|`` for each element (module docstring).

    Parameters
    ----------
    scale : array_like
        The reference's scale of each element (sum of the magnitudes of its terms).
    depth : int
        The longest chain of roundings, :math:`n`.
    dtype : str or dtype
        The precision of the computation under test.
    reference_dtype : str or dtype
        The precision the reference was computed in: float64, or the dtype
        under test when two computations in one dtype are compared.

    Examples
    --------
    >>> import numpy as np
    >>> from condconv_ref.accuracy import bound, gamma
    >>> beta = bound(np.array([1.0]), depth=3, dtype="float32")
    >>> bool(beta[0] > gamma(3, 2.0**-24))
    True
    """
    tested, reference = precision(dtype), precision(reference_dtype)
    s = np.abs(np.asarray(scale, dtype=np.float64))
    relative = (gamma(depth, tested.unit_roundoff) + gamma(depth, reference.unit_roundoff)
                + gamma(OPERAND_ROUNDINGS, tested.operand_roundoff) + tested.result_roundoff)
    underflow = (depth * (tested.smallest_normal * 2 * tested.unit_roundoff
                          + reference.smallest_normal * 2 * reference.unit_roundoff)
                 + ELEMENTARY_ROUNDINGS * tested.smallest_normal)  # a flushed exp or sigmoid
    # the final rounding of a result that lands in the storage dtype's subnormals errs by up
    # to half their spacing, lambda u_out, which u_out |r| does not cover
    stored_subnormal = PRECISIONS[tested.storage].smallest_normal * tested.result_roundoff
    # an element whose terms are all zero is exactly zero at any depth: where the depth is past
    # the model's reach (n u >= 1, gamma infinite) only the others have no bound
    scaled = np.where(s > 0, math.inf, 0.0) if math.isinf(relative) else relative * s
    return scaled + underflow * (1.0 + s) + stored_subnormal


@dataclass(frozen=True)
class Comparison:
    """One array (an output or a gradient) against the reference, in the model's terms.

    Attributes
    ----------
    what : str
        ``"output"``, ``"gradient 'x'"``, ... or ``"forward"`` / ``"vjp"`` for a
        result that could not be compared at all.
    units : float
        :math:`\\max_i |a_i - r_i| / \\beta_i`: at most 1 passes; infinite for
        a wrong shape, type or dtype kind, or a non-finite value against a
        finite one.
    index : tuple of int or None
        The worst element.
    actual, reference, bound : float
        The values and :math:`\\beta` at ``index``.
    count, size : int
        Elements beyond the bound, and all elements.
    reason : str
        Why the result could not be compared (an exception, a wrong shape), on one line.
    detail : str
        The whole of a longer message whose first line is ``reason`` (e.g. an
        exception that wraps another's message); empty when ``reason`` says it all.
    unbounded : int
        Elements the model cannot bound: their longest chain of roundings
        :math:`n` is past what the precision allows (:math:`n u \\ge 1`, so
        :math:`\\gamma_n(u)` is infinite: 256 roundings in bfloat16, 2048 in
        float16) and their terms are not all zero.  They cannot fail, so they
        were not checked; reports say how many.

    Examples
    --------
    >>> from condconv_ref.accuracy import Comparison
    >>> print(Comparison("gradient 'x'", 3.5, (0, 2), 1.25, 1.0, 0.0625, 1, 6))
    gradient 'x' differs in 1 of 6 elements; worst at [0, 2]: actual 1.25, reference 1, |diff| 0.25 = 3.5 x bound 0.0625
    >>> print(Comparison("forward", reason="raised ValueError: no 3-D support"))
    forward: raised ValueError: no 3-D support
    """

    what: str
    units: float = math.inf
    index: tuple[int, ...] | None = None
    actual: float = math.nan
    reference: float = math.nan
    bound: float = math.nan
    count: int = 0
    size: int = 0
    reason: str = ""
    detail: str = ""
    unbounded: int = 0

    @classmethod
    def raised(cls, what: str, error: BaseException, where: str = "") -> Comparison:
        """The comparison of a call that raised ``error``: its first line as ``reason``
        (``where`` appended), the whole message as ``detail`` when it has more lines.

        Examples
        --------
        >>> failed = Comparison.raised("forward", ValueError("bad input\\n  from: the kernel"))
        >>> print(failed)
        forward: raised ValueError: bad input (+1 more line)
        >>> failed.detail
        'ValueError: bad input\\n  from: the kernel'
        """
        text = f"{type(error).__name__}: {error}"
        lines = [line for line in text.splitlines() if line.strip()] or [text]
        more = len(lines) - 1
        extra = f" (+{more} more line{'s' if more > 1 else ''})" if more else ""
        return cls(what, reason=f"raised {lines[0].rstrip()}{extra}{where}",
                   detail=text if more else "")

    @property
    def passed(self) -> bool:
        """Within the bound everywhere (``units <= 1``), and comparable at all."""
        return not self.reason and self.units <= 1.0

    def to_json(self) -> dict[str, Any]:
        """The fields, ``passed`` and the one-line message as strict JSON values."""
        return jsonable({**asdict(self), "passed": self.passed, "message": str(self)})

    @property
    def where(self) -> str:
        """``what`` and the worst index, e.g. ``"gradient 'x' [0, 2]"``."""
        if self.index is None:
            return self.what
        return f"{self.what} [{', '.join(map(str, self.index))}]"

    def __str__(self) -> str:
        if self.reason:
            return f"{self.what}: {self.reason}"
        head = (f"{self.what} differs in {self.count} of {self.size} elements"
                if not self.passed else f"{self.what} within the bound")
        if self.index is None:
            return head
        return (f"{head}; worst at [{', '.join(map(str, self.index))}]: actual "
                f"{self.actual:.9g}, reference {self.reference:.9g}, |diff| "
                f"{abs(self.actual - self.reference):.3g} = {self.units:.3g} x bound "
                f"{self.bound:.3g}")


def jsonable(record: Mapping[str, Any]) -> dict[str, Any]:
    """``record`` with NaN and infinite floats as None (strict JSON), tuples as lists.

    Examples
    --------
    >>> from condconv_ref.accuracy import jsonable
    >>> jsonable({"units": float("inf"), "index": (0, 1), "what": "output"})
    {'units': None, 'index': [0, 1], 'what': 'output'}
    """
    def value(item: Any) -> Any:
        if isinstance(item, float) and not math.isfinite(item):
            return None
        if isinstance(item, (tuple, list)):
            return [value(element) for element in item]
        return item

    return {name: value(item) for name, item in record.items()}


def _as_real(what: str, value: Any) -> np.ndarray | Comparison:
    """``value`` as a float64 NumPy array, or a :class:`Comparison` saying why it is not one.

    Only an array of a real floating dtype is read: an integer, boolean or
    complex result is a wrong result, never converted (a complex one would lose
    its imaginary part), and so are a Python list or number and a NumPy masked
    array (whose mask the conversion would drop).
    """
    if isinstance(value, np.ma.MaskedArray):
        return Comparison(what, reason="is a numpy masked array, expected a plain array (its "
                                       "mask would be lost)")
    if not (isinstance(value, np.ndarray) or array_api_compat.is_array_api_obj(value)) \
            or isinstance(value, (bool, int, float, complex)):
        return Comparison(what, reason=f"is a {type(value).__module__}.{type(value).__qualname__}"
                                       f", expected an array")
    try:
        host = np.asarray(to_numpy(value) if not isinstance(value, np.ndarray) else value)
    except Exception as error:  # an array NumPy cannot read (e.g. on a device it cannot reach)
        return Comparison(what, reason=f"cannot be read ({type(error).__name__}: {error})")
    if host.dtype.kind != "f":
        return Comparison(what, reason=f"has dtype {host.dtype} (kind {host.dtype.kind!r}), "
                                       f"expected a real floating dtype")
    return host.astype(np.float64)


def real_host(what: str, value: Any) -> np.ndarray:
    """``value`` (any array NumPy can read) as float64 NumPy, or raise ``AssertionError``.

    For a result that is compared some other way than :func:`compare`; it
    refuses what :func:`compare` fails (a complex, integer or boolean dtype, a
    list, a masked array), naming ``what``.

    Examples
    --------
    >>> import numpy as np
    >>> from condconv_ref.accuracy import real_host
    >>> real_host("output", np.ones(2, dtype=np.float32))
    array([1., 1.])
    >>> real_host("output", np.ones(2) + 1e6j)
    Traceback (most recent call last):
    ...
    AssertionError: output: has dtype complex128 (kind 'c'), expected a real floating dtype
    """
    host = _as_real(what, value)
    if isinstance(host, Comparison):
        raise AssertionError(str(host))
    return host


def compare(what: str, actual: Any, reference: Any, scale: Any, *, depth: int,
            dtype: Any = "float64", reference_dtype: Any = "float64") -> Comparison:
    """Compare ``actual`` with ``reference`` element by element under the model.

    Parameters
    ----------
    what : str
        The name in messages, e.g. ``"output"`` or ``"gradient 'x'"``.
    actual : array
        Any array NumPy can read (NumPy, torch, CuPy, array-api-strict); an
        array of a complex or other non-real dtype fails.
    reference, scale : array
        The float64 reference and its scale (same shape).
    depth : int
        The longest chain of roundings.
    dtype : str or dtype
        The precision ``actual`` was computed in.
    reference_dtype : str or dtype
        The precision ``reference`` was computed in.

    Returns
    -------
    Comparison

    Examples
    --------
    >>> import numpy as np
    >>> from condconv_ref.accuracy import compare
    >>> r = np.array([1.0, np.nan, np.inf])
    >>> compare("output", r.copy(), r, np.ones(3), depth=1).passed
    True
    >>> print(compare("output", np.zeros(2), r, np.ones(3), depth=1))
    output: has shape (2,), expected (3,)
    >>> compare("output", r + 1j, r, np.ones(3), depth=1).reason
    "has dtype complex128 (kind 'c'), expected a real floating dtype"
    """
    host = _as_real(what, actual)
    if isinstance(host, Comparison):
        return host
    expected = np.asarray(reference, dtype=np.float64)
    if host.shape != expected.shape:
        return Comparison(what, reason=f"has shape {host.shape}, expected {expected.shape}")
    if expected.size == 0:
        return Comparison(what, 0.0, size=0)
    beta = bound(np.broadcast_to(scale, expected.shape), depth, dtype, reference_dtype)
    with np.errstate(invalid="ignore", over="ignore"):
        error = np.abs(host - expected)
    same = (host == expected) | (np.isnan(host) & np.isnan(expected))
    error = np.where(same, 0.0, np.nan_to_num(error, nan=np.inf, posinf=np.inf))
    with np.errstate(divide="ignore", invalid="ignore"):
        units = np.where(error == 0, 0.0, error / beta)
    flat = int(np.argmax(units))
    index = tuple(int(i) for i in np.unravel_index(flat, expected.shape))
    return Comparison(what, float(units[index]), index, float(host[index]),
                      float(expected[index]), float(beta[index]),
                      int(np.count_nonzero(units > 1)), int(expected.size),
                      unbounded=int(np.count_nonzero(np.isinf(beta))))


def gradient_keys(actual: Any, reference: Mapping[str, Any],
                  what: str = "vjp") -> Comparison | None:
    """A failing comparison of ``what`` (``"vjp"``) when ``actual`` is not a mapping with
    exactly ``reference``'s gradient names; None when it is.

    Examples
    --------
    >>> from condconv_ref.accuracy import gradient_keys
    >>> gradient_keys({"x": 1}, {"x": 2}) is None
    True
    >>> gradient_keys([1], {"x": 2}).reason
    'returned a list, expected a mapping of argument name to gradient'
    """
    if not isinstance(actual, Mapping):
        return Comparison(what, reason=f"returned a {type(actual).__name__}, expected a "
                                       f"mapping of argument name to gradient")
    if sorted(actual, key=str) != sorted(reference):
        return Comparison(what, reason=f"returned gradients for {sorted(map(str, actual))}, "
                                       f"expected {sorted(reference)}")
    return None


def compare_all(actual: Any, reference: Any, scale: Any, *, depth: int,
                dtype: Any = "float64", reference_dtype: Any = "float64",
                what: str | None = None) -> list[Comparison]:
    """:func:`compare` an output, or every gradient of a VJP (dicts keyed by argument name).

    A missing or extra gradient, or a result that is not a mapping where
    gradients are expected, is a failing :class:`Comparison` of ``"vjp"``.
    ``what`` names another result: an output ``what`` instead of ``"output"``
    (e.g. ``"jvp"``), gradients ``"<what> 'x'"`` instead of ``"gradient 'x'"``
    and a wrong mapping ``what`` (e.g. ``"hvp"``).

    Examples
    --------
    >>> import numpy as np
    >>> from condconv_ref.accuracy import compare_all
    >>> ones = {"x": np.ones(2), "w": np.ones(3)}
    >>> [c.what for c in compare_all(ones, ones, ones, depth=1)]
    ["gradient 'x'", "gradient 'w'"]
    >>> print(compare_all({"x": np.ones(2)}, ones, ones, depth=1)[0])
    vjp: returned gradients for ['x'], expected ['w', 'x']
    >>> [c.what for c in compare_all(ones, ones, ones, depth=1, what="hvp")]
    ["hvp 'x'", "hvp 'w'"]
    """
    if not isinstance(reference, Mapping):
        return [compare(what or "output", actual, reference, scale, depth=depth, dtype=dtype,
                        reference_dtype=reference_dtype)]
    keys = gradient_keys(actual, reference, what or "vjp")
    if not isinstance(actual, Mapping):
        return [keys]
    found = [keys] if keys else []
    found += [compare(f"{what or 'gradient'} {name!r}", actual[name], reference[name],
                      scale[name], depth=depth, dtype=dtype, reference_dtype=reference_dtype)
              for name in reference if name in actual]
    return found
