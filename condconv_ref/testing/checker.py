r"""Check any implementation of a CondConv-style layer against the reference.

:func:`check_implementation` draws cases of a variant with hypothesis
(:func:`condconv_ref.testing.strategies.cases`, within what the implementation
declares it :class:`~condconv_ref.testing.strategies.Supports`), calls the
implementation's ``forward`` (and ``vjp``, ``jvp`` and ``hvp``) on each, and
compares the results with the float64 reference
(:func:`condconv_ref.variants.reference_forward`,
:func:`~condconv_ref.variants.reference_vjp`,
:func:`~condconv_ref.variants.reference_jvp`,
:func:`~condconv_ref.variants.reference_hvp`).  When a case fails, hypothesis
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
``jvp(case, tangents) -> y_dot``
    Forward mode: ``tangents`` maps the name of every differentiable array of
    ``case.arrays`` (all but the variant's buffers) to a NumPy array of its
    shape and of ``dtype`` (:meth:`~condconv_ref.variants.Case.tangents`); the
    result is the directional derivative of the output along them, of the
    output's shape.
``hvp(case, cotangent, tangents) -> {name: gradient_dot}``
    Second order: the derivative of ``vjp(case, cotangent)`` at the fixed
    ``cotangent`` along ``tangents`` (given as for ``jvp``), i.e. the
    Hessian-vector product of :math:`\langle c, f\rangle` over the input and the
    parameters; one array per differentiable array of ``case.arrays``, keyed and
    shaped like the VJP's gradients.  ``cotangent`` is the VJP's and
    ``tangents`` the JVP's, so the three are consistent.  Only the variants
    with a reference Hessian-vector product
    (:func:`~condconv_ref.variants.hvp_variants`) are checked at second order:
    an ``hvp`` passed to :func:`check_implementation` or :func:`check_case` for
    another variant is an error, and one an :class:`Implementation` carries
    (an adapter's, say) is left unchecked, which the report's note says.

Comparison
----------
The reference :math:`r` is computed in float64 at the case's values (already
rounded to ``dtype``), together with the scale of its rounding, and every
element of the implementation's result :math:`a` must satisfy
:math:`|a - r| \le \beta` with the bound :math:`\beta` of
:mod:`condconv_ref.accuracy` for ``dtype``: :math:`\gamma_n(u)` times the sum
of the magnitudes of the terms that make the element, plus the reference's own
rounding and an underflow term.  The figure reported is the error in units of
that bound (at most 1 passes), the same figure every command reports; the
JVP is judged the same way, against the reference JVP and the scale of its
rounding (:func:`condconv_ref.engine.expected_jvp`), and is reported as ``jvp``;
so is the HVP, against the reference HVP and the scale of its rounding
(:func:`condconv_ref.engine.expected_hvp`), each array reported as
``hvp 'x'``, ``hvp 'experts'``, ....
NaN or infinity against a finite reference, a wrong shape, a complex or other
non-real dtype, a missing or extra gradient, and any exception the
implementation raises are failures too.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import sys
import time
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from condconv_ref._cases import Supports
from condconv_ref._validate import check_positive_int
from condconv_ref.accuracy import DTYPES, Comparison, jsonable
from condconv_ref.backends import Backend, get_backend
from condconv_ref.engine import (
    expected_forward,
    expected_hvp,
    expected_jvp,
    expected_vjp,
    judge,
    round_to,
    rounded,
)
from condconv_ref.memory import MemoryBudgetError
from condconv_ref.variants import LAYER_VARIANTS, VARIANTS, Case, hvp_variants

__all__ = [
    "DTYPES",
    "Implementation",
    "ImplementationMismatch",
    "Report",
    "Unsupported",
    "check_case",
    "check_implementation",
    "load_implementation",
]


@dataclass(frozen=True)
class Implementation:
    """An implementation to check: its ``forward``, optional ``vjp``, what it ``supports``,
    an optional ``jvp`` (forward mode) and an optional ``hvp`` (second order).

    See the module docstring for the protocol of ``forward``, ``vjp``, ``jvp`` and ``hvp``.

    Examples
    --------
    The reference itself, declared to support 1-D inputs up to size 5 only:

    >>> from condconv_ref.testing import Implementation, Supports, check_implementation
    >>> from condconv_ref.variants import reference_forward, reference_vjp
    >>> implementation = Implementation(reference_forward, reference_vjp,
    ...                                 Supports(spatial_dims=(1,), max_size=5))
    >>> report = check_implementation(implementation, variant="condconv_layer", max_examples=5)
    >>> report.passed, report.checked_vjp, report.checked_jvp, report.checked_hvp
    (True, True, False, False)

    The reference's second order checked too:

    >>> from condconv_ref.variants import reference_hvp
    >>> implementation = Implementation(
    ...     reference_forward, supports=Supports(spatial_dims=(1,), max_size=5),
    ...     hvp=lambda case, cotangent, tangents: reference_hvp(case, cotangent, tangents))
    >>> check_implementation(implementation, variant="condconv_layer",
    ...                      max_examples=5).checked_hvp
    True
    """

    forward: Callable[[Case], Any]
    vjp: Callable[[Case, Any], Mapping[str, Any]] | None = None
    supports: Supports | None = None
    jvp: Callable[[Case, Mapping[str, Any]], Any] | None = None
    hvp: Callable[[Case, Any, Mapping[str, Any]], Mapping[str, Any]] | None = None


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
    mismatches : tuple of condconv_ref.accuracy.Comparison
        Everything that differs on ``case``, forward first.
    units : float
        Over all passing comparisons: the largest error in units of the bound
        (at most 1; how close the implementation came to failing).
    where : str
        Where that largest error was: the array and element.
    checked_vjp, checked_jvp, checked_hvp : bool
        Whether the VJP, the JVP and the HVP were checked too.
    seed : int
    seconds : float
    note : str
        E.g. that the failure did not reproduce (a non-deterministic implementation).
    declined : int
        Cases the implementation declined by raising :class:`Unsupported`:
        neither passed nor failed.  When it declines every case the check fails.
    turned_away : int
        Drawn cases that ``Supports.accepts`` turned away (not counted in
        ``examples``), see :class:`~condconv_ref.testing.Supports`.
    unbounded : int
        Elements compared over all cases that the model cannot bound in
        ``dtype`` (:attr:`condconv_ref.accuracy.Comparison.unbounded`): not
        checked, and said so in ``str(report)``.

    Examples
    --------
    >>> from condconv_ref.testing import check_implementation
    >>> from condconv_ref.variants import reference_forward
    >>> report = check_implementation(reference_forward, variant="cond_linear_layer",
    ...                               max_examples=5)
    >>> report.passed, report.examples, report.checked_vjp, report.units <= 1
    (True, 5, False, True)
    >>> print(report)  # doctest: +ELLIPSIS
    check_implementation: cond_linear_layer (forward, float64, seed 0): PASSED after 5 examples in ... s
      largest error ... x the bound, at output [...]
    """

    variant: str
    dtype: str
    passed: bool
    examples: int
    case: Case | None = None
    mismatches: tuple[Comparison, ...] = ()
    units: float = 0.0
    where: str = ""
    checked_vjp: bool = False
    seed: int = 0
    seconds: float = 0.0
    note: str = ""
    checked_jvp: bool = False
    declined: int = 0
    turned_away: int = 0
    checked_hvp: bool = False
    unbounded: int = 0

    def to_json(self) -> dict[str, Any]:
        """The report as strict JSON values: the verdict, the figure, and the minimal
        failing case (its shapes, options and one-line description) with every mismatch."""
        record = jsonable({name: getattr(self, name) for name in (
            "variant", "dtype", "passed", "examples", "units", "where", "checked_vjp",
            "checked_jvp", "checked_hvp", "seed", "seconds", "note", "declined",
            "turned_away", "unbounded")})
        record["mismatches"] = [mismatch.to_json() for mismatch in self.mismatches]
        record["case"] = None if self.case is None else {
            "description": self.case.describe(),
            "shapes": {name: list(shape) for name, shape in self.case.shapes.items()},
            "options": jsonable(self.case.options)}
        return record

    def __str__(self) -> str:
        checked = ["forward", *(["VJP"] if self.checked_vjp else []),
                   *(["JVP"] if self.checked_jvp else []),
                   *(["HVP"] if self.checked_hvp else [])]
        what = ", ".join(checked[:-1]) + " and " + checked[-1] if len(checked) > 1 else "forward"
        head = (f"check_implementation: {self.variant} ({what}, {self.dtype}, seed {self.seed}): "
                f"{'PASSED' if self.passed else 'FAILED'} after {self.examples} examples "
                f"in {self.seconds:.1f} s" + _counts(self.declined, self.turned_away))
        if self.passed:
            return (f"{head}\n  largest error {self.units:.2g} x the bound, at {self.where}"
                    + (f"\n  {_unbounded_text(self.unbounded, self.dtype)}"
                       if self.unbounded else "")
                    + (f"\n  {self.note}" if self.note else ""))
        lines = [head]
        if self.case is not None:
            lines.append("minimal failing case:")
            lines.append("  " + ", ".join(f"{name} {shape}"
                                          for name, shape in self.case.shapes.items()))
            if self.case.options:
                lines.append("  " + ", ".join(f"{name}={value!r}"
                                              for name, value in self.case.options.items()))
            lines += [f"  {name} = {_values_text(a)}" for name, a in self.case.arrays.items()
                      if np.size(a) <= _SHOWN_VALUES]
        lines += [f"  {mismatch}" for mismatch in self.mismatches]
        if self.note:
            lines.append(f"  note: {self.note}")
        return "\n".join(lines)


def _unbounded_text(count: int, dtype: str) -> str:
    """The line saying ``count`` compared elements were past the model's reach in ``dtype``."""
    return (f"{count} element{'s' * (count != 1)} not checked: their sums are too long for "
            f"{dtype} to bound (n u >= 1, see Comparison.unbounded)")


def _counts(declined: int, turned_away: int) -> str:
    """``" (3 declined; 5 drawn cases outside supports)"``, or ``""``."""
    parts = [f"{declined} declined"] * bool(declined)
    parts += [f"{turned_away} drawn case{'s' * (turned_away != 1)} outside supports"] * bool(
        turned_away)
    return f" ({'; '.join(parts)})" if parts else ""


_SHOWN_VALUES = 8
"""Arrays of a failing case with at most this many elements are printed in the report."""


def _values_text(values: Any) -> str:
    """A small array on one line, e.g. ``[[1.0, -1.0]]``."""
    return str(np.asarray(values, dtype=np.float64).tolist())


class ImplementationMismatch(AssertionError):
    """Raised by :func:`check_implementation` when a case fails; ``.report`` has the details.

    Examples
    --------
    A layer that doubles its output fails on the smallest case:

    >>> from condconv_ref.testing import ImplementationMismatch, check_implementation
    >>> from condconv_ref.variants import reference_forward
    >>> def doubled(case):
    ...     return 2 * reference_forward(case)
    >>> try:
    ...     check_implementation(doubled, variant="cond_linear_layer", max_examples=10)
    ... except ImplementationMismatch as error:
    ...     report = error.report
    >>> report.passed, report.mismatches[0].what, report.case.shapes
    (False, 'output', {'x': (1, 1), 'experts': (1, 1, 1), 'route_weight': (1, 1)})
    """

    def __init__(self, report: Report) -> None:
        super().__init__(str(report))
        self.report = report


class Unsupported(Exception):
    """Raise it from ``forward``, ``vjp``, ``jvp`` or ``hvp`` to decline a case the
    implementation does not support.

    The checker counts a declined case (:attr:`Report.declined`) and moves
    on: it neither passes nor fails.  A check in which every case is declined
    fails, since nothing was checked.  Declare what an implementation supports
    with :class:`~condconv_ref.testing.Supports` where possible: a declined case
    is drawn in vain.

    Examples
    --------
    A layer without circular padding:

    >>> from condconv_ref.testing import Unsupported, check_implementation
    >>> from condconv_ref.variants import reference_forward
    >>> def forward(case):
    ...     if case.options["padding_mode"] == "circular":
    ...         raise Unsupported("no circular padding")
    ...     return reference_forward(case)
    >>> report = check_implementation(forward, variant="condconv_layer", max_examples=30)
    >>> report.passed, 0 < report.declined < report.examples
    (True, True)
    """


class _CaseFailed(Exception):
    """Raised inside the hypothesis test for a failing case, so that hypothesis shrinks it."""

    def __init__(self, case: Case, mismatches: list[Comparison]) -> None:
        super().__init__("; ".join(map(str, mismatches)))
        self.case = case
        self.mismatches = tuple(mismatches)


# ---------------------------------------------------------------- comparing one case


def _raised(what: str, error: BaseException) -> Comparison:
    frame = traceback.extract_tb(error.__traceback__)[-1:]
    where = f" (at {frame[0].filename}:{frame[0].lineno})" if frame else ""
    return Comparison.raised(what, error, where)


@dataclass
class _Search:
    """One run: its settings, and what it saw (calls, the last failure, passing error ratios)."""

    dtype: str
    backend: Backend
    examples: int = 0
    declined: int = 0
    case_declined: bool = False
    first_declined: str = ""
    turned_away: int = 0
    kept: int = 0
    last_turned_away: str = ""
    failure: _CaseFailed | None = None
    passing: list[Comparison] = field(default_factory=list)


def _judged(actual: Any, expected: Any, search: _Search, what: str | None = None
            ) -> list[Comparison]:
    """The failing comparisons of ``actual`` (named after ``what`` rather than ``output`` or
    ``gradient``, when given); the passing ones are kept in ``search``."""
    comparisons = judge(actual, expected, search.dtype, what=what)
    search.passing += [c for c in comparisons if c.passed]
    return [c for c in comparisons if not c.passed]


def _check_case(case: Case, implementation: Implementation, search: _Search) -> list[Comparison]:
    """Every mismatch of ``implementation`` on ``case`` (already rounded to the dtype)."""
    reference = rounded(case, search.dtype)  # float64 arrays at the values handed over
    expected = expected_forward(reference, search.backend, search.dtype)
    search.case_declined = False
    actual, instead = _called(search, "forward", implementation.forward, case)
    if instead is not None:
        return instead
    mismatches = _judged(actual, expected, search)
    if implementation.vjp is not None:
        mismatches += _check_vjp(case, reference, expected.value.shape, implementation.vjp,
                                 search)
    if implementation.jvp is not None:
        mismatches += _check_jvp(case, reference, implementation.jvp, search)
    if implementation.hvp is not None:
        mismatches += _check_hvp(case, reference, expected.value.shape, implementation.hvp,
                                 search)
    return mismatches


def _called(search: _Search, what: str, function: Any, *args: Any
            ) -> tuple[Any, list[Comparison] | None]:
    """``function(*args)`` and None; or, when it declines (:class:`Unsupported`) or raises,
    None and the comparisons that take the result's place: none for a declined case, a
    failure of ``what`` for an exception."""
    try:
        return function(*args), None
    except MemoryBudgetError:
        raise
    except Unsupported as error:
        return None, _declined(search, what, error)
    except Exception as error:
        return None, [_raised(what, error)]


def _cotangent(case: Case, shape: tuple[int, ...], dtype: str) -> np.ndarray:
    """The case's fixed cotangent for an output of ``shape``, rounded to ``dtype``."""
    return round_to(case.cotangent(shape), dtype)


def _tangents(case: Case, dtype: str) -> dict[str, np.ndarray]:
    """The case's fixed tangents, rounded to ``dtype``."""
    return {name: round_to(t, dtype) for name, t in case.tangents().items()}


def _check_vjp(case: Case, reference: Case, shape: tuple[int, ...], vjp: Any,
               search: _Search) -> list[Comparison]:
    """The mismatches of ``vjp`` at the case's cotangent."""
    cotangent = _cotangent(case, shape, search.dtype)
    expected_grads = expected_vjp(reference, cotangent, search.backend, search.dtype)
    grads, instead = _called(search, "vjp", vjp, case, _handed(cotangent, search.dtype))
    return instead if instead is not None else _judged(grads, expected_grads, search)


def _check_jvp(case: Case, reference: Case, jvp: Any, search: _Search) -> list[Comparison]:
    """The mismatches of ``jvp`` along the case's tangents, judged like an output."""
    tangents = _tangents(case, search.dtype)
    expected = expected_jvp(reference, tangents, search.backend, search.dtype)
    actual, instead = _called(search, "jvp", jvp, case,
                              {name: _handed(t, search.dtype) for name, t in tangents.items()})
    return instead if instead is not None else _judged(actual, expected, search, what="jvp")


def _check_hvp(case: Case, reference: Case, shape: tuple[int, ...], hvp: Any,
               search: _Search) -> list[Comparison]:
    """The mismatches of ``hvp`` at the VJP's cotangent along the JVP's tangents, judged like
    the gradients."""
    cotangent, tangents = _cotangent(case, shape, search.dtype), _tangents(case, search.dtype)
    expected = expected_hvp(reference, cotangent, tangents, search.backend, search.dtype)
    actual, instead = _called(search, "hvp", hvp, case, _handed(cotangent, search.dtype),
                              {name: _handed(t, search.dtype) for name, t in tangents.items()})
    return instead if instead is not None else _judged(actual, expected, search, what="hvp")


def _declined(search: _Search, what: str, error: Unsupported) -> list[Comparison]:
    """Count a case the implementation declined, once however many of its calls declined it
    (no mismatch: the case is neither passed nor failed), and keep the first reason."""
    search.declined += not search.case_declined
    search.case_declined = True
    if not search.first_declined:
        search.first_declined = Comparison.raised(what, error).reason
    return []


def _handed(values: np.ndarray, dtype: str) -> np.ndarray:
    """``values`` as the implementation receives them: ``dtype``, or float32 holding bfloat16
    values (NumPy has no bfloat16)."""
    return values.astype("float32" if dtype == "bfloat16" else dtype)


def _in_dtype(case: Case, dtype: str) -> Case:
    """``case`` as handed to the implementation: its arrays rounded to ``dtype``, and
    ``case.dtype`` set to it."""
    return dataclasses.replace(case, dtype=dtype, arrays={
        name: _handed(round_to(a, dtype), dtype) for name, a in case.arrays.items()})


# ---------------------------------------------------------------- the search


def _backend(fn: str, backend: Any) -> Backend:
    """``backend`` (a name or a :class:`~condconv_ref.backends.Backend`) as a Backend."""
    if isinstance(backend, str):
        return get_backend(backend)
    if not isinstance(backend, Backend):
        raise TypeError(f"{fn}: backend must be a backend name or a Backend, got {backend!r}")
    return backend


def _implementation(forward: Any, vjp: Any, supports: Supports | None, *, variant: str,
                    fn: str = "check_implementation", jvp: Any = None,
                    hvp: Any = None) -> tuple[Implementation, str]:
    """The implementation to check (the arguments over an :class:`Implementation`'s fields),
    and the report's note on an ``hvp`` it carries that ``variant`` cannot check."""
    hvp_argument = hvp
    if isinstance(forward, Implementation):
        given = forward
        forward, vjp = given.forward, vjp if vjp is not None else given.vjp
        jvp = jvp if jvp is not None else given.jvp
        hvp = hvp if hvp is not None else given.hvp
        supports = supports if supports is not None else given.supports
    if not callable(forward):
        raise TypeError(f"{fn}: forward must be callable or an Implementation, "
                        f"got {type(forward).__name__}")
    for name, given_callable in (("vjp", vjp), ("jvp", jvp), ("hvp", hvp)):
        if given_callable is not None and not callable(given_callable):
            raise TypeError(f"{fn}: {name} must be callable, got "
                            f"{type(given_callable).__name__}")
    if supports is not None and not isinstance(supports, Supports):
        raise TypeError(f"{fn}: supports must be a condconv_ref.testing.Supports, "
                        f"got {supports!r}")
    note = ""
    if hvp is not None and VARIANTS[variant].hvp is None:
        if hvp_argument is not None:
            raise ValueError(f"{fn}: hvp is given for variant {variant!r}, which has no "
                             f"reference Hessian-vector product; expected no hvp, or one of "
                             f"the variants with one: {hvp_variants()}")
        hvp, note = None, (f"hvp not checked: {variant} has no reference Hessian-vector "
                           f"product (the variants with one: {', '.join(hvp_variants())})")
    return Implementation(forward, vjp, supports, jvp, hvp), note


def check_implementation(
    forward: Callable[[Case], Any] | Implementation,
    *,
    variant: str,
    vjp: Callable[[Case, Any], Mapping[str, Any]] | None = None,
    supports: Supports | None = None,
    jvp: Callable[[Case, Mapping[str, Any]], Any] | None = None,
    hvp: Callable[[Case, Any, Mapping[str, Any]], Mapping[str, Any]] | None = None,
    dtype: str = "float64",
    max_examples: int = 100,
    seed: int = 0,
    backend: str | Backend = "numpy",
    raise_on_failure: bool = True,
) -> Report:
    """Check an implementation of ``variant`` against the reference on random cases.

    Parameters
    ----------
    forward : callable or Implementation
        ``forward(case) -> y`` (see the module docstring), or an
        :class:`Implementation` bundling ``forward``, ``vjp``, ``supports``,
        ``jvp`` and ``hvp`` (the keyword arguments, when given, take
        precedence).  An ``hvp`` the :class:`Implementation` carries for a
        variant without a reference Hessian-vector product is not checked,
        and the report's ``note`` says so.
    variant : str
        One of :data:`condconv_ref.variants.LAYER_VARIANTS`: ``condconv`` and
        ``depthwise_condconv`` (external routing weights), ``condconv_layer``,
        ``depthwise_condconv_layer``, ``cond_linear_layer``,
        ``dynamic_conv_layer``, ``odconv_layer``; or any other key of
        :data:`condconv_ref.variants.VARIANTS`.
    vjp : callable, optional
        ``vjp(case, cotangent) -> {name: gradient}``; checked when given.
    supports : Supports, optional
        What the implementation supports; default: everything the reference does.
    jvp : callable, optional
        ``jvp(case, tangents) -> y_dot`` (forward mode); checked when given,
        along the case's fixed tangents, in the same search, so a failure of
        the JVP is shrunk like the forward's.
    hvp : callable, optional
        ``hvp(case, cotangent, tangents) -> {name: gradient_dot}`` (second
        order: the derivative of the VJP at ``cotangent`` along ``tangents``);
        checked when given, at the VJP's cotangent and along the JVP's
        tangents, in the same search.  Only for a variant with a reference
        Hessian-vector product (:func:`~condconv_ref.variants.hvp_variants`).
    dtype : {'float64', 'float32', 'float16', 'bfloat16'}
        The dtype the implementation computes in; the arrays handed to it have
        this dtype, except bfloat16, which NumPy lacks: then they are float32
        arrays holding bfloat16 values, and ``case.dtype`` says ``'bfloat16'``
        (the torch adapter runs the module in ``torch.bfloat16``).  The
        reference is always float64 (at the rounded values); the bound is
        ``dtype``'s.
    max_examples : int
        Cases drawn before declaring success (shrinking a failure runs more).
    seed : int
        Seed of the search; the same seed draws the same cases.
    backend : str or Backend
        Where the reference runs (:func:`condconv_ref.backends.get_backend`
        names); the implementation always gets NumPy arrays.
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
        For a bad variant, dtype, count or callable, ``supports`` that admit
        no case, or an ``hvp`` for a variant without a reference Hessian-vector
        product.
    condconv_ref.backends.BackendUnavailable
        If ``backend`` cannot be used here.
    ValueError
        When called inside a hypothesis test (``@given``): check the cases
        your test draws with :func:`check_case` instead.
    ModuleNotFoundError
        Without hypothesis, which draws the cases.
    condconv_ref.MemoryBudgetError
        If a case needs more working memory than the budget, in the reference
        or in the implementation: the case did not run, so it is no failure.

    Examples
    --------
    The reference passes its own check; a layer that forgets the bias fails on
    a minimal case:

    >>> from dataclasses import replace
    >>> from condconv_ref.testing import check_implementation
    >>> from condconv_ref.variants import reference_forward
    >>> check_implementation(reference_forward, variant="condconv_layer",
    ...                      max_examples=10).passed
    True
    >>> def no_bias(case):
    ...     arrays = {name: a for name, a in case.arrays.items() if name != "bias"}
    ...     return reference_forward(replace(case, arrays=arrays))
    >>> report = check_implementation(no_bias, variant="condconv_layer", max_examples=20,
    ...                               raise_on_failure=False)
    >>> report.passed, report.mismatches[0].what, report.case.shapes["x"][0]
    (False, 'output', 1)
    """
    if not isinstance(variant, str) or variant not in VARIANTS:
        raise ValueError(f"check_implementation: variant must be one of {list(LAYER_VARIANTS)} "
                         f"(or another of {sorted(set(VARIANTS) - set(LAYER_VARIANTS))}), "
                         f"got {variant!r}")
    _check_dtype("check_implementation", dtype)
    count = check_positive_int("check_implementation", "max_examples", max_examples)
    seed = check_positive_int("check_implementation", "seed", seed, minimum=0)
    if not isinstance(raise_on_failure, bool):
        raise TypeError(f"check_implementation: raise_on_failure must be True or False, got "
                        f"{raise_on_failure!r}")
    implementation, hvp_note = _implementation(forward, vjp, supports, variant=variant, jvp=jvp,
                                               hvp=hvp)
    search = _Search(dtype, _backend("check_implementation", backend))
    # Only the search needs hypothesis; the rest of the module works without it.
    from hypothesis import HealthCheck, Phase, Verbosity, given, settings
    from hypothesis.control import currently_in_test_context
    from hypothesis import seed as hypothesis_seed
    from hypothesis.errors import Flaky, Unsatisfiable

    from condconv_ref.testing.strategies import cases

    if currently_in_test_context():
        raise ValueError(
            "check_implementation: called inside a hypothesis test (@given); it runs a "
            "hypothesis search of its own, and hypothesis refuses nested searches. Draw the "
            "case in your test instead, with @given(condconv_ref.testing.cases(variant, "
            "supports)) or data.draw(cases(...)), and check it with "
            "condconv_ref.testing.check_case(implementation, case)")

    @settings(max_examples=count, database=None, deadline=None, derandomize=False,
              phases=[Phase.generate, Phase.shrink], verbosity=Verbosity.quiet,
              report_multiple_bugs=False, print_blob=False,
              suppress_health_check=list(HealthCheck))
    @hypothesis_seed(seed)
    @given(cases(variant, _counting(implementation.supports, search), xp=np,
                 dtype="float32" if dtype == "bfloat16" else dtype).map(
        lambda case: _in_dtype(case, dtype)))
    def run(case: Case) -> None:
        search.examples += 1
        mismatches = _check_case(case, implementation, search)
        if mismatches:
            search.failure = _CaseFailed(case, mismatches)
            raise search.failure

    started = time.perf_counter()
    note = hvp_note
    try:
        run()
    except _CaseFailed as failure:  # the final replay of the minimal case
        search.failure = failure
    except Flaky:
        note = "; ".join(filter(None, [
            "the failure did not reproduce when replayed: is the implementation deterministic?",
            hvp_note]))
    except Unsatisfiable:
        raise ValueError("check_implementation: supports admit no valid case") from None
    except _Starved:
        pass  # hypothesis may report it as a flaky failure instead: checked below
    if search.kept == 0 and search.turned_away >= _STARVED:
        raise ValueError(f"check_implementation: supports admit no valid case: excludes "
                         f"turned away all of the first {_STARVED} cases drawn (the last: "
                         f"{search.last_turned_away})")
    return _finish(search, variant, implementation, seed, time.perf_counter() - started, note,
                   raise_on_failure)


_STARVED = 200
"""Drawn cases ``Supports.excludes`` may turn away, none kept, before the check gives up."""


class _Starved(Exception):
    """Raised while drawing when ``Supports.excludes`` has turned away every case so far."""


def _counting(supports: Supports | None, search: _Search) -> Supports | None:
    """``supports`` whose ``excludes`` counts the cases it turns away in ``search``."""
    if supports is None or supports.excludes is None:
        return supports
    excludes = supports.excludes

    def counted(case: Case) -> str | None:
        reason = excludes(case)
        search.turned_away += bool(reason)
        search.kept += not reason
        search.last_turned_away = reason or search.last_turned_away
        if search.kept == 0 and search.turned_away >= _STARVED:
            raise _Starved(reason)
        return reason

    return dataclasses.replace(supports, excludes=counted)


def _finish(search: _Search, variant: str, implementation: Implementation, seed: int,
            seconds: float, note: str, raise_on_failure: bool) -> Report:
    """The :class:`Report` of a finished search (raised as :class:`ImplementationMismatch`
    when it failed and ``raise_on_failure``)."""
    failure = search.failure
    largest = max(search.passing, key=lambda c: c.units, default=None)
    declined_all = failure is None and search.declined >= search.examples > 0
    if declined_all:
        note = (f"the implementation declined all {search.examples} cases, so nothing was "
                f"checked (first: {search.first_declined})" + (f"; {note}" if note else ""))
    report = Report(variant, search.dtype, failure is None and not declined_all,
                    search.examples, failure.case if failure else None,
                    failure.mismatches if failure else (),
                    largest.units if largest else 0.0, largest.where if largest else "",
                    implementation.vjp is not None, seed, seconds, note,
                    checked_jvp=implementation.jvp is not None, declined=search.declined,
                    turned_away=search.turned_away, checked_hvp=implementation.hvp is not None,
                    unbounded=sum(c.unbounded for c in search.passing))
    if declined_all and raise_on_failure:
        raise ImplementationMismatch(report)
    if failure is not None and raise_on_failure:
        raise ImplementationMismatch(report)
    return report


def _check_dtype(fn: str, dtype: Any) -> str:
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise ValueError(f"{fn}: dtype must be one of {DTYPES}, got {dtype!r}")
    return dtype


def check_case(
    forward: Callable[[Case], Any] | Implementation,
    case: Case,
    *,
    vjp: Callable[[Case, Any], Mapping[str, Any]] | None = None,
    jvp: Callable[[Case, Mapping[str, Any]], Any] | None = None,
    hvp: Callable[[Case, Any, Mapping[str, Any]], Mapping[str, Any]] | None = None,
    dtype: str | None = None,
    backend: str | Backend = "numpy",
    raise_on_failure: bool = True,
) -> Report:
    """Check an implementation on one given case, with no search of its own.

    This is the way to check an implementation inside your own hypothesis
    test: draw the case there, with :func:`condconv_ref.testing.cases` (or
    ``data.draw(cases(...))``), and let your ``@given`` shrink it.
    :func:`check_implementation` runs a hypothesis search itself, and
    hypothesis refuses a search nested in another.  It also reruns a case
    saved by ``condconv-ref check --save-case`` (read it with
    :func:`condconv_ref.golden.load_case`).

    Parameters
    ----------
    forward : callable or Implementation
        As for :func:`check_implementation` (``supports`` plays no part).
    case : condconv_ref.variants.Case
        The case, e.g. drawn by :func:`condconv_ref.testing.cases`.
    vjp, jvp, hvp : callable, optional
        Checked when given (or carried by an :class:`Implementation`), as in
        :func:`check_implementation`.
    dtype : {'float64', 'float32', 'float16', 'bfloat16'}, optional
        The dtype the implementation computes in: the case's arrays are
        rounded to it; default ``case.dtype``.
    backend : str or Backend
        Where the reference runs.
    raise_on_failure : bool
        Raise :class:`ImplementationMismatch` (an ``AssertionError``) on a
        mismatch (default), or return the failing :class:`Report`.

    Returns
    -------
    Report
        With ``examples == 1``; on failure ``case`` is the case as handed over.

    Examples
    --------
    >>> from hypothesis import given, settings
    >>> from condconv_ref.testing import Supports, cases, check_case
    >>> from condconv_ref.variants import reference_forward, reference_vjp
    >>> @settings(max_examples=5)
    ... @given(cases("condconv_layer", Supports(spatial_dims=(2,))))
    ... def test_my_layer(case):
    ...     check_case(reference_forward, case, vjp=reference_vjp, dtype="float32")
    >>> test_my_layer()
    """
    from condconv_ref.variants import Case as CaseType

    if not isinstance(case, CaseType):
        raise TypeError(f"check_case: case must be a condconv_ref.variants.Case, got "
                        f"{type(case).__name__}")
    dtype = _check_dtype("check_case", case.dtype if dtype is None else dtype)
    implementation, note = _implementation(forward, vjp, None, variant=case.variant,
                                           fn="check_case", jvp=jvp, hvp=hvp)
    search = _Search(dtype, _backend("check_case", backend))
    started = time.perf_counter()
    search.examples = 1
    handed = _in_dtype(case, dtype)
    mismatches = _check_case(handed, implementation, search)
    if mismatches:
        search.failure = _CaseFailed(handed, mismatches)
    return _finish(search, case.variant, implementation, case.seed, time.perf_counter() - started,
                   note, raise_on_failure)


# ---------------------------------------------------------------- the adapters' mapping


def parameter_mapping(fn: str, parameters: Mapping[str, Any],
                      target: str) -> dict[str, tuple[str, Callable[..., Any] | None]]:
    """An adapter's ``parameters`` as ``{array name: (target name, converter or None)}``.

    Each value is ``target`` (e.g. a module parameter's name) or a ``(name,
    converter)`` pair; anything else is a ``TypeError`` naming ``fn``.
    """
    mapping: dict[str, tuple[str, Callable[..., Any] | None]] = {}
    for name, given in parameters.items():
        if isinstance(given, str):
            mapping[name] = (given, None)
        elif (isinstance(given, tuple) and len(given) == 2 and isinstance(given[0], str)
              and callable(given[1])):
            mapping[name] = given
        else:
            raise TypeError(f"{fn}: parameters[{name!r}] must be {target} or a (name, "
                            f"converter) pair, got {given!r}")
    return mapping


def check_every_array_mapped(fn: str, case: Case, mapping: Mapping[str, Any],
                             inputs: tuple[str, ...], targets: str) -> None:
    """Raise a ``ValueError`` naming ``fn`` for the arrays of ``case`` that an adapter
    neither maps (``mapping``) to its ``targets`` (e.g. ``"module parameters"``) nor hands
    over as ``inputs``: they would not reach the implementation."""
    unmapped = sorted(set(case.arrays) - set(mapping) - set(inputs))
    if unmapped:
        raise ValueError(f"{fn}: case arrays {unmapped} are neither mapped to {targets} nor "
                         f"inputs (mapped: {sorted(mapping)}, inputs: {list(inputs)})")


# ---------------------------------------------------------------- implementations in files


def _as_implementation(made: Any, source: str) -> Implementation:
    if isinstance(made, Implementation):
        return made
    if isinstance(made, tuple) and len(made) == 2 and all(callable(f) for f in made):
        return Implementation(*made)
    if callable(made):
        return Implementation(made)
    raise TypeError(f"{source} returned a {type(made).__name__}; expected an Implementation, "
                    f"a forward callable, or a (forward, vjp) pair")


def _module_name(path: Path) -> tuple[str, Path | None]:
    """The name to import ``path`` under, and the folder to import it from.

    A file inside a package (its folder holds an ``__init__.py``) gets its
    dotted name, e.g. ``condconv_ref.conv``, from the first parent folder that
    is not a package; a standalone file a private name and no folder.
    """
    folder = path.parent
    parts = [] if path.stem == "__init__" else [path.stem]
    while (folder / "__init__.py").is_file():
        parts.insert(0, folder.name)
        folder = folder.parent
    if folder == path.parent or not all(part.isidentifier() for part in parts):
        return f"_condconv_check_{path.stem}", None
    return ".".join(parts), folder


def _import_packaged(name: str, root: Path) -> ModuleType:
    importlib.invalidate_caches()  # the file may be newer than the finders' listings
    sys.path.insert(0, str(root))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(root))


def _import_standalone(name: str, path: Path) -> ModuleType:
    """``path`` as module ``name``, registered in ``sys.modules`` (where dataclasses and
    pickle look modules up), with its own folder importable as when it runs as a script."""
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ImportError("not a Python file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    sys.path.insert(0, str(path.parent))
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    finally:
        sys.path.remove(str(path.parent))
    return module


def load_implementation(target: str) -> Implementation:
    r"""Load ``"path/to/file.py:factory"``: import the file, call ``factory()``.

    The factory takes no arguments and returns an :class:`Implementation`
    (e.g. from :func:`condconv_ref.testing.torch_adapter.torch_implementation`),
    whose ``vjp``, ``jvp`` and ``hvp`` come with it, a ``forward`` callable, or
    a ``(forward, vjp)`` pair.

    A file inside a package (a folder with an ``__init__.py``, and its parents
    up to the first folder without one) is imported under its package-qualified
    name, ``pkg.sub.file``, with the folder above the package importable, so
    its relative imports work and a module that is already imported is not
    imported twice.  Any other file runs as a module named after it, with its
    own directory importable (as when it runs as a script), so it can import
    its neighbours.

    Raises
    ------
    ValueError
        For a malformed target, or a file that cannot be imported (or whose
        package name imports another file), or a factory that is missing or
        raises (the message is one line).
    OSError
        If the file does not exist.
    TypeError
        If the factory returns something else.

    Examples
    --------
    >>> import pathlib, tempfile
    >>> folder = pathlib.Path(tempfile.mkdtemp())
    >>> _ = (folder / "mine.py").write_text(
    ...     "from condconv_ref.variants import reference_forward\n"
    ...     "def factory():\n    return reference_forward\n")
    >>> load_implementation(f"{folder / 'mine.py'}:factory").vjp is None
    True

    A file of a package, ``my_layers/impl.py``, that imports its neighbour
    relatively:

    >>> (folder / "my_layers").mkdir()
    >>> _ = (folder / "my_layers" / "__init__.py").write_text("")
    >>> _ = (folder / "my_layers" / "forward.py").write_text(
    ...     "from condconv_ref.variants import reference_forward\n"
    ...     "def forward(case):\n    return reference_forward(case)\n")
    >>> _ = (folder / "my_layers" / "impl.py").write_text(
    ...     "from .forward import forward\n"
    ...     "def factory():\n    return forward\n")
    >>> load_implementation(f"{folder / 'my_layers' / 'impl.py'}:factory").forward.__module__
    'my_layers.forward'
    """
    path_text, colon, name = str(target).rpartition(":")
    if not colon or not path_text or not name.isidentifier():
        raise ValueError(f"load_implementation: expected path/to/file.py:factory, got {target!r}")
    path = Path(path_text)
    if not path.is_file():
        raise FileNotFoundError(f"load_implementation: no such file {str(path)!r}")
    module_name, root = _module_name(path.resolve())
    try:
        if root is None:
            module = _import_standalone(module_name, path.resolve())
        else:
            module = _import_packaged(module_name, root)
    except (Exception, SystemExit) as error:
        raise ValueError(f"load_implementation: importing {str(path)!r} raised "
                         f"{type(error).__name__}: {error}") from error
    imported = getattr(module, "__file__", None)
    if root is not None and (imported is None or Path(imported).resolve() != path.resolve()):
        raise ValueError(f"load_implementation: {str(path)!r} is module {module_name} of its "
                         f"package, but importing {module_name} gives {imported!r}; another "
                         f"package of that name comes first on sys.path")
    factory = getattr(module, name, None)
    if not callable(factory):
        raise ValueError(f"load_implementation: {str(path)!r} has no callable {name!r}")
    try:
        made = factory()
    except (Exception, SystemExit) as error:
        raise ValueError(f"load_implementation: {name}() raised {type(error).__name__}: "
                         f"{error}") from error
    return _as_implementation(made, f"load_implementation: {name}()")
