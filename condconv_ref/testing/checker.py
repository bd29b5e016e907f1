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
The reference :math:`r` is computed in float64 at the case's values (already
rounded to ``dtype``).  Every element of the implementation's result :math:`a`
must satisfy :math:`|a - r| \le \mathrm{atol} + \mathrm{rtol}\,|r|` with

- ``rtol`` from :func:`~condconv_ref.testing.default_tolerances` for ``dtype``
  and the longest sum of the pass (``case.lengths``), :math:`16\,\epsilon\sqrt{n}`;
- ``atol`` the larger of :math:`\mathrm{rtol}\max|r|` and the *measured
  rounding spread* :math:`64\,(\epsilon/\epsilon_{32})\max|r_{32} - r|`,
  with :math:`r_{32}` the reference run in float32.

The absolute term covers elements that cancel to near zero, whose rounding
error is relative to the size of the summed terms rather than to the result.
The spread covers results much smaller than the terms that made them (the
routing gradients of a softmax, whose rows sum to one): running the reference
in float32 shows how large the rounding error of such a result is, and it is
scaled to ``dtype``'s epsilon.  Over thousands of cases, independent float64
and float32 PyTorch implementations stay below 0.2 of this tolerance, while
any real bug is off by orders of magnitude more.  A result that is
identically zero (say, a routing gradient through a one-expert softmax) gets
``atol = rtol * max|output|`` instead, so rounding noise there is no failure.
NaN or infinity against a
finite reference, a wrong shape, a missing or extra gradient, and any
exception the implementation raises are failures too.
"""

from __future__ import annotations

import importlib.util
import math
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
from condconv_ref.backends import Backend, get_backend, to_numpy
from condconv_ref.memory import MemoryBudgetError
from condconv_ref.testing._numerics import default_tolerances
from condconv_ref.variants import LAYER_VARIANTS, VARIANTS, Case, reference_forward, reference_vjp

__all__ = [
    "DTYPES",
    "Implementation",
    "ImplementationMismatch",
    "Mismatch",
    "Report",
    "check_implementation",
    "load_implementation",
]

DTYPES = ("float16", "float32", "float64")
_ROUNDING_SAFETY = 64.0


@dataclass(frozen=True)
class Implementation:
    """An implementation to check: its ``forward``, optional ``vjp`` and what it ``supports``.

    See the module docstring for the protocol of ``forward`` and ``vjp``.

    Examples
    --------
    The reference itself, declared to support 1-D inputs up to size 5 only:

    >>> from condconv_ref.testing import Implementation, Supports, check_implementation
    >>> from condconv_ref.variants import reference_forward, reference_vjp
    >>> implementation = Implementation(reference_forward, reference_vjp,
    ...                                 Supports(spatial_dims=(1,), max_size=5))
    >>> report = check_implementation(implementation, variant="condconv_layer", max_examples=5)
    >>> report.passed, report.checked_vjp
    (True, True)
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

    Examples
    --------
    >>> print(Mismatch("forward", "raised ValueError: no 3-D support"))
    forward: raised ValueError: no 3-D support
    >>> print(Mismatch("output", "values differ", index=(0, 1), actual=2.5, reference=2.0,
    ...                tolerance=1e-12, count=1, size=6, rtol=1e-12,
    ...                atol=0.0))  # doctest: +NORMALIZE_WHITESPACE
    output differs in 1 of 6 elements; worst at [0, 1]: actual 2.5, reference 2,
    |diff| 0.5 > tolerance 1e-12 (rtol 1e-12, atol 0)
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

    Examples
    --------
    >>> from condconv_ref.testing import check_implementation
    >>> from condconv_ref.variants import reference_forward
    >>> report = check_implementation(reference_forward, variant="cond_linear_layer",
    ...                               max_examples=5)
    >>> report.passed, report.examples, report.checked_vjp, report.worst_ratio < 1
    (True, 5, False, True)
    >>> print(report)  # doctest: +ELLIPSIS
    check_implementation: cond_linear_layer (forward, float64, seed 0): PASSED after 5 examples in ... s
      largest error ... of the tolerance
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


def _spread(reference: np.ndarray, reference32: np.ndarray, dtype: str) -> float:
    """The rounding error a ``dtype`` computation of this result may carry, measured:
    ``max|r32 - r|`` (the reference run in float32) scaled to ``dtype``'s epsilon, times 64."""
    if reference.size == 0:
        return 0.0
    scale = float(np.finfo(dtype).eps / np.finfo(np.float32).eps)
    return _ROUNDING_SAFETY * scale * float(np.max(np.abs(reference32 - reference)))


def _compare(what: str, actual: Any, reference: np.ndarray, rtol: float, spread: float,
             scale: float, ratios: list[float]) -> Mismatch | None:
    """Elementwise ``|a - r| <= atol + rtol |r|``, ``atol = max(rtol max|r|, spread)``, or
    ``rtol * scale`` where that is 0; a :class:`Mismatch` or None."""
    try:
        actual = _as_float64(actual)
    except Exception as error:  # not an array NumPy can read
        return _raised(what, error)
    if actual.shape != reference.shape:
        return Mismatch(what, f"has shape {actual.shape}, expected {reference.shape}")
    if reference.size == 0:
        return None
    atol = max(rtol * float(np.max(np.abs(reference))), spread)
    if atol == 0:  # an identically zero result (e.g. a gradient through a 1-expert softmax)
        atol = rtol * scale
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


@dataclass
class _Search:
    """One run: its settings, and what it saw (calls, the last failure, passing error ratios)."""

    dtype: str
    rtol: float | None
    backend: Backend
    examples: int = 0
    failure: _CaseFailed | None = None
    ratios: list[float] = field(default_factory=list)


def _rtol(search: _Search, length: int) -> float:
    if search.rtol is not None:
        return search.rtol
    return default_tolerances(search.dtype, reduction_length=length)[0]


def _check_case(case: Case, implementation: Implementation, search: _Search) -> list[Mismatch]:
    """Every mismatch of ``implementation`` on ``case`` (already rounded to the dtype)."""
    reference = _as_float64(reference_forward(case, search.backend))
    reference32 = _as_float64(reference_forward(case, search.backend, "float32"))
    try:
        actual = implementation.forward(case)
    except MemoryBudgetError:
        raise
    except Exception as error:
        return [_raised("forward", error)]
    scale = float(np.max(np.abs(reference), initial=0.0))
    mismatch = _compare("output", actual, reference, _rtol(search, case.lengths[0]),
                        _spread(reference, reference32, search.dtype), scale, search.ratios)
    mismatches = [mismatch] if mismatch else []
    if implementation.vjp is None:
        return mismatches
    return mismatches + _check_vjp(case, implementation.vjp, reference.shape, scale, search)


def _check_vjp(case: Case, vjp: Callable[[Case, Any], Any], shape: tuple[int, ...],
               scale: float, search: _Search) -> list[Mismatch]:
    """Every mismatch of ``vjp`` on ``case`` at the case's cotangent."""
    cotangent = case.cotangent(shape, search.dtype)
    expected = {name: _as_float64(g)
                for name, g in reference_vjp(case, cotangent, search.backend).items()}
    expected32 = reference_vjp(case, cotangent, search.backend, "float32")
    try:
        grads = vjp(case, cotangent)
    except MemoryBudgetError:
        raise
    except Exception as error:
        return [_raised("vjp", error)]
    if not isinstance(grads, Mapping):
        return [Mismatch("vjp", f"returned a {type(grads).__name__}, expected a mapping of "
                                f"argument name to gradient")]
    mismatches = []
    if sorted(grads) != sorted(expected):
        mismatches.append(Mismatch("vjp", f"returned gradients for {sorted(grads)}, expected "
                                          f"{sorted(expected)}"))
    rtol = _rtol(search, case.lengths[1])
    for name in [name for name in expected if name in grads]:
        spread = _spread(expected[name], _as_float64(expected32[name]), search.dtype)
        mismatch = _compare(f"gradient {name!r}", grads[name], expected[name], rtol, spread,
                            scale, search.ratios)
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
    backend: str | Backend = "numpy",
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
        For a bad variant, dtype, count or callable, or ``supports`` that admit
        no case.
    condconv_ref.backends.BackendUnavailable
        If ``backend`` cannot be used here.
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
    if variant not in VARIANTS:
        raise ValueError(f"check_implementation: variant must be one of {list(LAYER_VARIANTS)} "
                         f"(or another of {sorted(set(VARIANTS) - set(LAYER_VARIANTS))}), "
                         f"got {variant!r}")
    if dtype not in DTYPES:
        raise ValueError(f"check_implementation: dtype must be one of {DTYPES}, got {dtype!r}")
    count = check_positive_int("check_implementation", "max_examples", max_examples)
    seed = check_positive_int("check_implementation", "seed", seed, minimum=0)
    implementation = _implementation(forward, vjp, supports)
    search = _Search(dtype, rtol, get_backend(backend) if isinstance(backend, str) else backend)
    # Only the search needs hypothesis; the rest of the module works without it.
    from hypothesis import HealthCheck, Phase, Verbosity, given, settings
    from hypothesis import seed as hypothesis_seed
    from hypothesis.errors import Flaky, Unsatisfiable

    from condconv_ref.testing.strategies import cases

    @settings(max_examples=count, database=None, deadline=None, derandomize=False,
              phases=[Phase.generate, Phase.shrink], verbosity=Verbosity.quiet,
              report_multiple_bugs=False, print_blob=False,
              suppress_health_check=list(HealthCheck))
    @hypothesis_seed(seed)
    @given(cases(variant, implementation.supports, xp=np, dtype=dtype))
    def run(case: Case) -> None:
        search.examples += 1
        mismatches = _check_case(case, implementation, search)
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
    a ``forward`` callable, or a ``(forward, vjp)`` pair.

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
