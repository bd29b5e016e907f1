r"""Check any implementation of a CondConv-style layer against the reference.

:func:`check_implementation` draws cases of a variant with hypothesis
(:func:`condconv_ref.testing.strategies.cases`, within what the implementation
declares it :class:`~condconv_ref.testing.strategies.Supports`), calls the
implementation's ``forward`` (and ``vjp``) on each, and compares the results
with the float64 reference (:func:`condconv_ref.variants.reference_forward`,
:func:`~condconv_ref.variants.reference_vjp`).  When a case fails, hypothesis
shrinks it to a minimal failing case, which the :class:`Report` describes.

The protocol
------------
``forward(case) -> y``
    ``case`` is a :class:`condconv_ref.variants.Case`: ``case.arrays`` holds
    NumPy arrays of the checked ``dtype`` under the reference's names
    (``x``, ``experts``, ``bias``, ``route_weight``, ``routing``,
    ``fc1_weight``, ...; absent optional ones left out), ``case.options`` the
    options (``stride``, ``padding``, ``dilation``, ``groups``,
    ``padding_mode``, ``depth_multiplier``, ``temperature``) and
    ``case.geometry`` the padding resolved into ``(before, after)`` pairs.  The
    layouts are the reference's (see :mod:`condconv_ref.layouts` for
    converters).  ``y`` is any array NumPy can read (NumPy, torch, CuPy, ...).
``vjp(case, cotangent) -> {name: gradient}``
    ``cotangent`` is a NumPy array of the output's shape and of ``dtype``; the
    result has one gradient per array of ``case.arrays``, in the reference's
    layout.

Comparison
----------
Every element must satisfy :math:`|a - r| \le \mathrm{rtol}\,(|r| + \max|r|)`,
with :math:`r` the float64 reference at the case's (rounded) values, and
``rtol`` from :func:`~condconv_ref.testing.default_tolerances` for ``dtype``
and the longest sum of the pass (``case.lengths``):
:math:`16\,\epsilon\sqrt{n}`.  The :math:`\max|r|` term is the absolute
tolerance: a rounding error is relative to the size of the summed terms, which
an element that cancels to near zero does not show.  NaN or infinity against
a finite reference, a wrong shape, a missing or extra gradient, and any
exception the implementation raises are failures too.
"""

from __future__ import annotations

import math
import time
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from hypothesis import HealthCheck, Phase, Verbosity, given, settings
from hypothesis import seed as hypothesis_seed
from hypothesis.errors import Flaky, Unsatisfiable

from condconv_ref._validate import check_positive_int
from condconv_ref.backends import to_numpy
from condconv_ref.testing._numerics import default_tolerances
from condconv_ref.testing.strategies import Supports, cases
from condconv_ref.variants import LAYER_VARIANTS, VARIANTS, Case, reference_forward, reference_vjp

__all__ = [
    "DTYPES",
    "Implementation",
    "ImplementationMismatch",
    "Mismatch",
    "Report",
    "check_implementation",
]

DTYPES = ("float16", "float32", "float64")
_COTANGENT_STREAM = 3


@dataclass(frozen=True)
class Implementation:
    """An implementation to check: its ``forward``, optional ``vjp`` and what it ``supports``.

    See the module docstring for the protocol of ``forward`` and ``vjp``.
    """

    forward: Callable[[Case], Any]
    vjp: Callable[[Case, Any], Mapping[str, Any]] | None = None
    supports: Supports | None = None


@dataclass(frozen=True)
class Mismatch:
    """One output or gradient that differs, or the exception the implementation raised.

    Attributes
    ----------
    what : str
        ``"output"``, ``"gradient 'name'"``, ``"forward"`` or ``"vjp"`` (for an
        exception or a malformed result).
    message : str
        One line: what is wrong.
    index : tuple of int or None
        The worst element (largest :math:`|a - r|`, NaN counted as infinite).
    actual, reference, tolerance : float
        The values at ``index`` and the tolerance there (NaN when not a value
        mismatch).
    count, size : int
        Elements beyond tolerance, and all elements.
    rtol, atol : float
        The tolerances used: ``atol = rtol * max|r|``.
    """

    what: str
    message: str
    index: tuple[int, ...] | None = None
    actual: float = math.nan
    reference: float = math.nan
    tolerance: float = math.nan
    count: int = 0
    size: int = 0
    rtol: float = math.nan
    atol: float = math.nan

    def __str__(self) -> str:
        if self.index is None:
            return f"{self.what}: {self.message}"
        where = "[" + ", ".join(map(str, self.index)) + "]"
        return (f"{self.what} differs in {self.count} of {self.size} elements; worst at "
                f"{where}: actual {self.actual:.9g}, reference {self.reference:.9g}, "
                f"|diff| {abs(self.actual - self.reference):.3g} > tolerance "
                f"{self.tolerance:.3g} (rtol {self.rtol:.3g}, atol {self.atol:.3g})")


@dataclass(frozen=True)
class Report:
    """The result of :func:`check_implementation`; ``str(report)`` is readable.

    Attributes
    ----------
    variant, dtype : str
    passed : bool
    examples : int
        Cases run, shrinking included.
    case : Case or None
        The minimal failing case (arrays as passed to the implementation).
    mismatches : tuple of Mismatch
        Everything that differs on ``case``, forward first.
    worst_ratio : float
        Over all passing comparisons: the largest :math:`|a - r|` over its
        tolerance (below 1; how close the implementation came to failing).
    checked_vjp : bool
    seed : int
    seconds : float
    note : str
        E.g. that the failure did not reproduce (a non-deterministic implementation).
    """

    variant: str
    dtype: str
    passed: bool
    examples: int
    case: Case | None = None
    mismatches: tuple[Mismatch, ...] = ()
    worst_ratio: float = 0.0
    checked_vjp: bool = False
    seed: int = 0
    seconds: float = 0.0
    note: str = ""

    def __str__(self) -> str:
        what = "forward and VJP" if self.checked_vjp else "forward"
        head = (f"check_implementation: {self.variant} ({what}, {self.dtype}, seed {self.seed}): "
                f"{'PASSED' if self.passed else 'FAILED'} after {self.examples} examples "
                f"in {self.seconds:.1f} s")
        if self.passed:
            return (f"{head}\n  largest error {self.worst_ratio:.2g} of the tolerance"
                    + (f"\n  {self.note}" if self.note else ""))
        lines = [head, "minimal failing case:"]
        if self.case is not None:
            lines.append("  " + ", ".join(f"{name} {shape}"
                                          for name, shape in self.case.shapes.items()))
            if self.case.options:
                lines.append("  " + ", ".join(f"{name}={value!r}"
                                              for name, value in self.case.options.items()))
        lines += [f"  {mismatch}" for mismatch in self.mismatches]
        if self.note:
            lines.append(f"  note: {self.note}")
        return "\n".join(lines)


class ImplementationMismatch(AssertionError):
    """Raised by :func:`check_implementation` when a case fails; ``.report`` has the details."""

    def __init__(self, report: Report) -> None:
        super().__init__(str(report))
        self.report = report


class _CaseFailed(Exception):
    """Raised inside the hypothesis test for a failing case, so that hypothesis shrinks it."""

    def __init__(self, case: Case, mismatches: list[Mismatch]) -> None:
        super().__init__("; ".join(map(str, mismatches)))
        self.case = case
        self.mismatches = tuple(mismatches)


# ---------------------------------------------------------------- comparing one case


def _as_float64(value: Any) -> np.ndarray:
    return np.asarray(to_numpy(value), dtype=np.float64)


def _raised(what: str, error: BaseException) -> Mismatch:
    frame = traceback.extract_tb(error.__traceback__)[-1:]
    where = f" (at {frame[0].filename}:{frame[0].lineno})" if frame else ""
    return Mismatch(what, f"raised {type(error).__name__}: {error}{where}")


def _compare(what: str, actual: Any, reference: np.ndarray, rtol: float,
             ratios: list[float]) -> Mismatch | None:
    """Elementwise ``|a - r| <= rtol (|r| + max|r|)``; a :class:`Mismatch` or None."""
    try:
        actual = _as_float64(actual)
    except Exception as error:  # not an array NumPy can read
        return _raised(what, error)
    if actual.shape != reference.shape:
        return Mismatch(what, f"has shape {actual.shape}, expected {reference.shape}")
    if reference.size == 0:
        return None
    atol = rtol * float(np.max(np.abs(reference)))
    bound = atol + rtol * np.abs(reference)
    with np.errstate(invalid="ignore"):
        error = np.abs(actual - reference)
    error = np.where(actual == reference, 0.0, np.nan_to_num(error, nan=np.inf))
    bad = ~(error <= bound)
    if not bad.any():
        ratios.append(float(np.max(np.where(bound > 0, error / np.where(bound > 0, bound, 1),
                                            0.0))))
        return None
    flat = int(np.argmax(np.where(bad, error, -1.0)))
    index = tuple(int(i) for i in np.unravel_index(flat, reference.shape))
    return Mismatch(what, "values differ", index, float(actual[index]), float(reference[index]),
                    float(bound[index]), int(bad.sum()), int(reference.size), rtol, atol)


def _cotangent(case: Case, shape: tuple[int, ...], dtype: str) -> np.ndarray:
    rng = np.random.default_rng([case.seed, _COTANGENT_STREAM])
    return rng.standard_normal(shape).astype(dtype)


def _check_case(case: Case, implementation: Implementation, dtype: str, rtol: float | None,
                ratios: list[float]) -> list[Mismatch]:
    """Every mismatch of ``implementation`` on ``case`` (already rounded to ``dtype``)."""
    reference = _as_float64(reference_forward(case))
    forward_rtol = rtol if rtol is not None else default_tolerances(
        dtype, reduction_length=case.lengths[0])[0]
    try:
        actual = implementation.forward(case)
    except Exception as error:
        return [_raised("forward", error)]
    mismatches = [m for m in [_compare("output", actual, reference, forward_rtol, ratios)] if m]
    if implementation.vjp is None:
        return mismatches
    cotangent = _cotangent(case, reference.shape, dtype)
    expected = {name: _as_float64(g) for name, g in reference_vjp(case, cotangent).items()}
    try:
        grads = implementation.vjp(case, cotangent)
    except Exception as error:
        return mismatches + [_raised("vjp", error)]
    if not isinstance(grads, Mapping):
        return mismatches + [Mismatch("vjp", f"returned a {type(grads).__name__}, expected a "
                                             f"mapping of argument name to gradient")]
    missing, extra = sorted(set(expected) - set(grads)), sorted(set(grads) - set(expected))
    if missing or extra:
        mismatches.append(Mismatch("vjp", f"returned gradients for {sorted(grads)}, expected "
                                          f"{sorted(expected)}"))
    backward_rtol = rtol if rtol is not None else default_tolerances(
        dtype, reduction_length=case.lengths[1])[0]
    for name in expected:
        if name in grads:
            mismatch = _compare(f"gradient {name!r}", grads[name], expected[name],
                                backward_rtol, ratios)
            if mismatch:
                mismatches.append(mismatch)
    return mismatches


# ---------------------------------------------------------------- the search


def _implementation(forward: Any, vjp: Any, supports: Supports | None) -> Implementation:
    if isinstance(forward, Implementation):
        given = forward
        return Implementation(given.forward, vjp if vjp is not None else given.vjp,
                              supports if supports is not None else given.supports)
    if not callable(forward):
        raise TypeError(f"check_implementation: forward must be callable or an Implementation, "
                        f"got {type(forward).__name__}")
    if vjp is not None and not callable(vjp):
        raise TypeError(f"check_implementation: vjp must be callable, got {type(vjp).__name__}")
    return Implementation(forward, vjp, supports)


@dataclass
class _Search:
    """What the hypothesis run saw: calls, the last failure, the passing error ratios."""

    examples: int = 0
    failure: _CaseFailed | None = None
    ratios: list[float] = field(default_factory=list)


def check_implementation(
    forward: Callable[[Case], Any] | Implementation,
    *,
    variant: str,
    vjp: Callable[[Case, Any], Mapping[str, Any]] | None = None,
    supports: Supports | None = None,
    dtype: str = "float64",
    max_examples: int = 100,
    seed: int = 0,
    rtol: float | None = None,
    raise_on_failure: bool = True,
) -> Report:
    """Check an implementation of ``variant`` against the reference on random cases.

    Parameters
    ----------
    forward : callable or Implementation
        ``forward(case) -> y`` (see the module docstring), or an
        :class:`Implementation` bundling ``forward``, ``vjp`` and ``supports``
        (the keyword arguments, when given, take precedence).
    variant : str
        One of ``condconv`` (external routing weights), ``condconv_layer``,
        ``depthwise_condconv_layer``, ``cond_linear_layer``,
        ``dynamic_conv_layer``; or any other key of
        :data:`condconv_ref.variants.VARIANTS`.
    vjp : callable, optional
        ``vjp(case, cotangent) -> {name: gradient}``; checked when given.
    supports : Supports, optional
        What the implementation supports; default: everything the reference does.
    dtype : {'float64', 'float32', 'float16'}
        The dtype of the arrays handed to the implementation.  The reference is
        always float64 (at the rounded values); the tolerances are ``dtype``'s.
    max_examples : int
        Cases drawn before declaring success (shrinking a failure runs more).
    seed : int
        Seed of the search; the same seed draws the same cases.
    rtol : float, optional
        Override the dtype's relative tolerance (the absolute one stays
        ``rtol * max|reference|``).
    raise_on_failure : bool
        Raise :class:`ImplementationMismatch` on failure (default), or return
        the failing :class:`Report`.

    Returns
    -------
    Report

    Raises
    ------
    ImplementationMismatch
        If a case fails and ``raise_on_failure``; its ``report`` has the
        minimal case.
    ValueError, TypeError
        For a bad variant, dtype, count or callable, or ``supports`` that admit
        no case.

    Examples
    --------
    The reference passes its own check; a layer that forgets the bias fails on
    a minimal case:

    >>> from condconv_ref.testing import check_implementation
    >>> from condconv_ref.variants import reference_forward
    >>> check_implementation(reference_forward, variant="condconv_layer",
    ...                      max_examples=10).passed
    True
    >>> def no_bias(case):
    ...     params = {k: v for k, v in case.params.items() if k != "bias"}
    ...     return reference_forward(type(case)(case.variant, {"x": case.x, **params},
    ...                                         case.options, case.lengths))
    >>> report = check_implementation(no_bias, variant="condconv_layer", max_examples=20,
    ...                               raise_on_failure=False)
    >>> report.passed, report.mismatches[0].what, report.case.shapes["x"][0]
    (False, 'output', 1)
    """
    if variant not in VARIANTS:
        raise ValueError(f"check_implementation: variant must be one of {list(LAYER_VARIANTS)} "
                         f"(or another of {sorted(set(VARIANTS) - set(LAYER_VARIANTS))}), "
                         f"got {variant!r}")
    if dtype not in DTYPES:
        raise ValueError(f"check_implementation: dtype must be one of {DTYPES}, got {dtype!r}")
    count = check_positive_int("check_implementation", "max_examples", max_examples)
    seed = check_positive_int("check_implementation", "seed", seed, minimum=0)
    implementation = _implementation(forward, vjp, supports)
    search = _Search()

    @settings(max_examples=count, database=None, deadline=None, derandomize=False,
              phases=[Phase.generate, Phase.shrink], verbosity=Verbosity.quiet,
              report_multiple_bugs=False, print_blob=False,
              suppress_health_check=list(HealthCheck))
    @hypothesis_seed(seed)
    @given(cases(variant, implementation.supports, xp=np, dtype=dtype))
    def run(case: Case) -> None:
        search.examples += 1
        mismatches = _check_case(case, implementation, dtype, rtol, search.ratios)
        if mismatches:
            search.failure = _CaseFailed(case, mismatches)
            raise search.failure

    started = time.perf_counter()
    note = ""
    try:
        run()
    except _CaseFailed as failure:  # the final replay of the minimal case
        search.failure = failure
    except Flaky:
        note = "the failure did not reproduce when replayed: is the implementation deterministic?"
    except Unsatisfiable:
        raise ValueError("check_implementation: supports admit no valid case") from None
    seconds = time.perf_counter() - started
    failure = search.failure
    report = Report(variant, dtype, failure is None, search.examples,
                    failure.case if failure else None, failure.mismatches if failure else (),
                    max(search.ratios, default=0.0), implementation.vjp is not None, seed,
                    seconds, note)
    if failure is not None and raise_on_failure:
        raise ImplementationMismatch(report)
    return report
