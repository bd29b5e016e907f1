r"""The check engine: reference with its bound, comparison, finite differences, one row type.

Every command that judges a result is a thin front end over this module: it
draws or loads a :class:`~condconv_ref.variants.Case`, runs the reference in
float64 (:func:`expected_forward`, :func:`expected_vjp`: the value, the scale
of its rounding and the depth, see :mod:`condconv_ref.accuracy`), runs the
subject in its dtype, compares with :func:`judge`, and reports
:class:`Row` s whose figure is the error in units of the bound.

Finite differences
------------------
:func:`finite_difference_check` checks a VJP through the dot-product identity
:math:`\sum\langle \mathrm{vjp}(c), t\rangle = \langle c, Jt\rangle`, with
:math:`Jt` by central differences in float64 at step
:math:`h = \epsilon_{64}^{1/3}\max(1, \max|x|)/\max|t|`.  The two sides may
differ by at most the sum of

- the VJP's own rounding: :math:`\sum \langle \beta_{\bar g}, |t|\rangle`
  (:mod:`condconv_ref.accuracy`, in the dtype under test);
- the rounding of the differences: each evaluation of :math:`f` errs by at
  most :math:`\beta_{64}` of its scale, and each perturbed point
  :math:`x \pm ht` is rounded by :math:`u_{64}|x \pm ht|`, which moves
  :math:`\langle c, f\rangle` by at most
  :math:`u_{64}\langle s_{\bar g}, |x| + h|t|\rangle`; both divided by
  :math:`h`;
- the truncation.  A multilinear op (conv, mixing, condconv, depthwise,
  linear: at most three factors, ``x``, the experts and the routing, and a
  bias) is a polynomial of degree at most 3 along the line
  :math:`x + st`, so the five-point stencil
  :math:`(8D_h - 8D_{-h} - D_{2h} + D_{-2h})/12h`, exact up to degree 4, has no
  truncation error at all (:data:`FIVE_POINT`).  For the others (sigmoid,
  softmax, the layers routed by them) the central difference errs by
  :math:`a h^2 + O(h^4)`: Richardson's :math:`(4D(h/2) - D(h))/3` removes the
  :math:`a h^2` term, and the correction it applied,
  :math:`|D(h/2) - D(h)|/3`, a term of order :math:`h^2`, bounds the
  :math:`O(h^4)` that remains (with the two differences' rounding).

A ReLU (the DynamicConv routing MLP) is not differentiable at 0.  Before
differencing, the check finds the ReLU inputs along the line
:math:`x + st`, :math:`|s| \le h` (quadratic in :math:`s`, since both the
pooled input and the weights move); if one changes sign, the step is halved
to the nearest crossing, and the check says so in its note; a ReLU input
within :math:`10^{-3} h` of its kink skips the case with the reason.  ODConv's
ReLU follows a batch norm, whose inputs are not polynomial in :math:`s` in
train mode: there the line is sampled and a sign change located by bisection.
Arrays a variant does not differentiate (ODConv's running statistics) get no
tangent: they stay where they are.

Examples
--------
>>> from condconv_ref import engine
>>> from condconv_ref.testing import ConvConfig
>>> from condconv_ref.variants import build_case
>>> config = ConvConfig(batch=2, in_channels=2, out_channels=4, groups=2, spatial=(5,),
...                     kernel=(3,), stride=(1,), dilation=(1,), padding=1,
...                     padding_mode="zeros", n_experts=3, bias=True)
>>> case = build_case("condconv_layer", config, seed=7)
>>> expected = engine.expected_forward(case)
>>> comparisons = engine.judge(expected.value * (1 + 2.0**-50), expected, "float64")
>>> comparisons[0].passed, comparisons[0].units < 1
(True, True)
>>> engine.finite_difference_check(case, "float64").units < 1
True
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from functools import partial
from dataclasses import asdict, dataclass, replace
from typing import Any, NamedTuple

import numpy as np

from condconv_ref import _scales
from condconv_ref.accuracy import (
    PRECISIONS,
    Comparison,
    bound,
    compare_all,
    exact_bound,
    gamma,
    jsonable,
    real_host,
)
from condconv_ref.backends import Backend, get_backend, to_numpy
from condconv_ref.variants import (
    VARIANTS,
    Case,
    bind,
    hvp_variants,
    reference_forward,
    reference_hvp,
    reference_jvp,
    reference_vjp,
)

__all__ = [
    "Expected",
    "Measurement",
    "Row",
    "expected_forward",
    "expected_hvp",
    "expected_jvp",
    "expected_vjp",
    "finite_difference_check",
    "hvp_check",
    "hvp_symmetry_check",
    "judge",
    "rounded",
    "transpose_check",
    "worst",
]

_KINK_FLOOR = 1e-3
_KINK_SAMPLES = 16


@dataclass(frozen=True)
class Expected:
    """The float64 reference of one output (or of every gradient), its scale and depth.

    Examples
    --------
    >>> import numpy as np
    >>> from condconv_ref.engine import Expected
    >>> Expected(np.zeros(2), np.ones(2), 3).depth
    3
    """

    value: Any
    scale: Any
    depth: int


class Measurement(NamedTuple):
    """What one check measured on one case: the error in units of the bound, where the
    worst element is, what the case is, and anything the check did to measure it.

    Examples
    --------
    >>> from condconv_ref.engine import Measurement
    >>> Measurement(0.02, "gradient 'x' [0, 1]").passed
    True
    """

    units: float
    where: str = ""
    detail: str = ""
    note: str = ""

    @property
    def passed(self) -> bool:
        """``units <= 1``."""
        return self.units <= 1.0


@dataclass(frozen=True)
class Row:
    """The result of one check over many cases, as every command reports it.

    ``units`` is the largest error in units of the bound over the cases (at
    most 1 passes), ``where`` the case and element it was found at,
    ``failed`` the cases beyond the bound or raising, ``detail`` the first
    failing case, ``notes`` what the check did (steps moved off a kink),
    ``skipped`` the reason the check could not run at all.  ``kind`` is the
    check (``verify``) or the direction, ``forward`` or ``vjp`` (``gpu-check``);
    ``precision`` the one the arithmetic is judged by
    (:data:`condconv_ref.accuracy.PRECISIONS`), ``repeat_identical`` whether a
    repeated run matched bit for bit (None: not repeated) and
    ``baseline_units`` the same errors in units of float32's bound (TF32 rows:
    what TF32 adds).

    Examples
    --------
    >>> from condconv_ref.engine import Row
    >>> Row("conv", "MoE equivalence", cases=2, units=0.01).status
    'PASS'
    >>> Row("conv", "MoE equivalence", cases=2, failed=1, units=3.0).status
    'FAIL'
    >>> Row("conv", "SciPy oracle", cases=0, skipped="scipy is not installed").status
    'SKIP'
    >>> row = Row("conv", "vjp", cases=1, units=float("inf"), failed=1)
    >>> Row.from_json(row.to_json()) == row
    True
    """

    op: str
    kind: str
    cases: int = 0
    failed: int = 0
    units: float = math.nan
    where: str = ""
    detail: str = ""
    notes: str = ""
    skipped: str = ""
    dtype: str = "float64"
    precision: str = ""
    repeat_identical: bool | None = None
    baseline_units: float = math.nan

    @property
    def status(self) -> str:
        """``"PASS"``, ``"FAIL"`` (a case beyond the bound or raising, or a repeat that
        differed) or ``"SKIP"``."""
        if self.skipped:
            return "SKIP"
        return "FAIL" if self.failed or self.repeat_identical is False else "PASS"

    def to_json(self) -> dict[str, Any]:
        """The fields and the status as strict JSON values (NaN and infinity as None);
        :meth:`from_json` reads it back."""
        return jsonable({**asdict(self), "units_infinite": math.isinf(self.units),
                         "status": self.status})

    @classmethod
    def from_json(cls, record: Mapping[str, Any]) -> Row:
        """A row from :meth:`to_json`'s dict."""
        fields = {name: value for name, value in record.items()
                  if name not in ("status", "units_infinite")}
        for name in ("units", "baseline_units"):
            if fields.get(name) is None:
                fields[name] = math.inf if (name == "units"
                                            and record.get("units_infinite")) else math.nan
        return cls(**fields)


def worst(comparisons: list[Comparison]) -> Comparison | None:
    """The comparison with the largest error in units of the bound (an uncomparable one
    first); None for none.

    Examples
    --------
    >>> from condconv_ref.accuracy import Comparison
    >>> from condconv_ref.engine import worst
    >>> worst([Comparison("output", 0.5), Comparison("gradient 'x'", 2.0)]).what
    "gradient 'x'"
    """
    if not comparisons:
        return None
    return max(comparisons, key=lambda c: (bool(c.reason), c.units))


def rounded(case: Case, dtype: str) -> Case:
    """``case`` with its arrays rounded to ``dtype`` and held as float64 NumPy arrays: the
    point at which the reference is evaluated for a subject that runs in ``dtype``.

    bfloat16 (which NumPy lacks) rounds to nearest even on the top 16 bits of float32.

    Examples
    --------
    >>> import numpy as np
    >>> from condconv_ref.engine import rounded
    >>> from condconv_ref.variants import Case
    >>> case = Case("mix_experts", {"routing": np.array([[1/3]]), "experts": np.ones((1, 2))},
    ...             {}, (1, 1))
    >>> float(rounded(case, "bfloat16").arrays["routing"][0, 0])
    0.333984375
    """
    return replace(case, arrays={name: round_to(a, dtype) for name, a in case.arrays.items()})


def round_to(values: Any, dtype: str) -> np.ndarray:
    """``values`` rounded to ``dtype`` (float64, float32, float16 or bfloat16), as float64."""
    host = np.asarray(to_numpy(values), dtype=np.float64)
    if dtype != "bfloat16":
        return host.astype(dtype).astype(np.float64)
    single = host.astype(np.float32)
    bits = single.view(np.uint32).astype(np.uint64)
    rounding = ((bits >> 16) & 1) + 0x7FFF
    finite = np.isfinite(single)
    kept = np.where(finite, ((bits + rounding) >> 16) << 16, bits).astype(np.uint32)
    return kept.view(np.float32).astype(np.float64)


def expected_forward(case: Case, backend: str | Backend | None = None,
                     dtype: Any = "float64") -> Expected:
    """The reference output of ``case`` in float64 on ``backend``, and the scale and depth
    of a computation of it in ``dtype``."""
    value = np.asarray(to_numpy(reference_forward(case, backend)), dtype=np.float64)
    return Expected(value, _scales.forward_scale(case, dtype), _scales.depth(case, vjp=False))


def expected_vjp(case: Case, cotangent: Any, backend: str | Backend | None = None,
                 dtype: Any = "float64") -> Expected:
    """The reference gradients of ``case`` at ``cotangent`` in float64, and the scales and
    depth of a computation of them in ``dtype``."""
    value = {name: np.asarray(to_numpy(g), dtype=np.float64)
             for name, g in reference_vjp(case, cotangent, backend).items()}
    return Expected(value, _scales.vjp_scale(case, cotangent, dtype),
                    _scales.depth(case, vjp=True))


def expected_jvp(case: Case, tangents: Mapping[str, Any], backend: str | Backend | None = None,
                 dtype: Any = "float64") -> Expected:
    """The reference JVP of ``case`` along ``tangents`` in float64, and the scale and depth of
    a computation of it in ``dtype``."""
    value = np.asarray(to_numpy(reference_jvp(case, tangents, backend)), dtype=np.float64)
    return Expected(value, _scales.jvp_scale(case, tangents, dtype), _scales.jvp_depth(case))


def expected_hvp(case: Case, cotangent: Any, tangents: Mapping[str, Any],
                 backend: str | Backend | None = None, dtype: Any = "float64") -> Expected:
    """The reference Hessian-vector product of a layer ``case`` at ``cotangent`` along
    ``tangents`` in float64 (:func:`~condconv_ref.variants.reference_hvp`), and the scales
    and depth of a computation of it in ``dtype`` (:func:`condconv_ref._scales.hvp_scale`,
    the rounding model :func:`hvp_check` states).

    Examples
    --------
    >>> import numpy as np
    >>> from condconv_ref import engine
    >>> from condconv_ref.testing import ConvConfig
    >>> from condconv_ref.variants import build_case
    >>> config = ConvConfig(batch=1, in_channels=2, out_channels=2, groups=1, spatial=(4,),
    ...                     kernel=(3,), stride=(1,), dilation=(1,), padding=1,
    ...                     padding_mode="zeros", n_experts=2, bias=False)
    >>> case = build_case("condconv_layer", config, seed=1)
    >>> expected = engine.expected_hvp(case, case.cotangent((1, 2, 4)), case.tangents(),
    ...                                dtype="float32")
    >>> sorted(expected.value) == sorted(expected.scale) == sorted(case.arrays)
    True
    >>> engine.judge(expected.value, expected, "float32", what="hvp")[0].passed
    True
    """
    value = {name: np.asarray(to_numpy(g), dtype=np.float64)
             for name, g in reference_hvp(case, cotangent, tangents, backend).items()}
    return Expected(value, _scales.hvp_scale(case, cotangent, tangents, dtype),
                    _scales.hvp_depth(case))


def judge(actual: Any, expected: Expected, dtype: Any,
          reference_dtype: Any = "float64", what: str | None = None) -> list[Comparison]:
    """Compare ``actual`` (an output, or a mapping of gradients) with ``expected``.

    ``reference_dtype`` is the precision the expected values were computed in
    (float64 for the reference; the subject's own dtype when two computations in
    one dtype are compared with each other); ``what`` names the result in the
    comparisons (:func:`~condconv_ref.accuracy.compare_all`), e.g. ``"jvp"`` or
    ``"hvp"``.
    """
    return compare_all(actual, expected.value, expected.scale, depth=expected.depth,
                       dtype=dtype, reference_dtype=reference_dtype, what=what)


# ---------------------------------------------------------------- finite differences


def _inner(a: Mapping[str, np.ndarray], b: Mapping[str, np.ndarray]) -> float:
    return float(sum(np.sum(a[name] * b[name]) for name in b))


def _relu_inputs(arrays: Mapping[str, np.ndarray]) -> np.ndarray:
    """The inputs of the routing MLP's ReLU at ``arrays``."""
    x = arrays["x"]
    pooled = x.mean(axis=tuple(range(2, x.ndim)))
    pre = pooled @ arrays["fc1_weight"].T
    return pre + arrays["fc1_bias"] if "fc1_bias" in arrays else pre


def _nearest_kink(point: Mapping[str, np.ndarray],
                  tangents: Mapping[str, np.ndarray], step: float) -> float:
    """The smallest :math:`|s|` at which a ReLU input along ``point + s * tangents`` is 0
    (the inputs are quadratic in ``s``); infinity where none is."""
    def at(s: float) -> np.ndarray:
        return _relu_inputs({name: a + s * tangents.get(name, 0.0)
                                   for name, a in point.items()})

    middle, plus, minus = at(0.0), at(step), at(-step)
    linear = (plus - minus) / (2 * step)
    quadratic = (plus + minus - 2 * middle) / (2 * step**2)
    nearest = np.full(middle.shape, math.inf)
    nearest[middle == 0] = 0.0
    flat = np.abs(quadratic) <= 1e-300
    with np.errstate(divide="ignore", invalid="ignore"):
        roots_linear = np.where(flat & (linear != 0), np.abs(middle / linear), math.inf)
        discriminant = linear**2 - 4 * quadratic * middle
        root = np.sqrt(np.where(discriminant >= 0, discriminant, np.nan))
        first = np.abs((-linear + root) / (2 * quadratic))
        second = np.abs((-linear - root) / (2 * quadratic))
    roots = np.where(flat, roots_linear, np.fmin(np.nan_to_num(first, nan=math.inf),
                                                 np.nan_to_num(second, nan=math.inf)))
    return float(np.min(np.fmin(nearest, roots), initial=math.inf))


def _batch_norm_relu_inputs(case: Case, arrays: Mapping[str, np.ndarray]) -> np.ndarray:
    """The inputs of ODConv's trunk ReLU (the batch norm's outputs) at ``arrays``."""
    import array_api_compat.numpy

    from condconv_ref._attention import ODCONV_KEYS, trunk

    p = {name: arrays.get(name) for name in ODCONV_KEYS}
    return trunk(arrays["x"], p, train=case.options.get("batch_norm") == "train",
                 eps=case.options.get("bn_eps", 1e-5),
                 xp=array_api_compat.numpy).activation_input


def _sampled_kink(case: Case, point: Mapping[str, np.ndarray],
                  tangents: Mapping[str, np.ndarray], step: float) -> float:
    r"""The smallest :math:`|s| \le` ``step`` at which a ReLU input of ODConv's trunk along
    ``point + s * tangents`` is 0, infinity where none is.  In train mode the batch norm
    makes the inputs a ratio in ``s``, not a polynomial, so the line is sampled at
    :data:`_KINK_SAMPLES` points each way and a sign change is located by bisection."""
    def at(s: float) -> np.ndarray:
        return _batch_norm_relu_inputs(case, {name: a + s * tangents[name] if name in tangents
                                              else a for name, a in point.items()})

    middle = at(0.0) > 0
    if np.any(at(0.0) == 0):
        return 0.0
    nearest = math.inf
    for direction in (1.0, -1.0):
        inside = 0.0
        for j in range(1, _KINK_SAMPLES + 1):
            outside = direction * step * j / _KINK_SAMPLES
            if np.any((at(outside) > 0) != middle):
                for _ in range(40):
                    half = (inside + outside) / 2
                    inside, outside = (half, outside) if np.all((at(half) > 0) == middle) \
                        else (inside, half)
                nearest = min(nearest, abs(inside))
                break
            inside = outside
    return nearest


_KINKS = {"route_softmax": lambda case, *line: _nearest_kink(*line),
          "dynamic_conv_layer": lambda case, *line: _nearest_kink(*line),
          "odconv_layer": _sampled_kink}
"""The variants with a ReLU, and how to find its kink along a line."""

CENTRAL = ((1.0, 1.0), (-1.0, -1.0))
"""The central difference: ``(f(x + ht) - f(x - ht)) / 2h`` as (weight, offset) pairs."""
FIVE_POINT = ((8.0, 1.0), (-8.0, -1.0), (-1.0, 2.0), (1.0, -2.0))
"""``(8 f(x + ht) - 8 f(x - ht) - f(x + 2ht) + f(x - 2ht)) / 12h``: exact for polynomials of
degree up to 4 along the line."""


def _forward_scale(case: Case) -> tuple[np.ndarray, int]:
    """The scale and depth of ``case``'s forward (what :func:`_difference` differences)."""
    return _scales.forward_scale(case), _scales.depth(case, vjp=False)


def _difference(case: Case, forward: Any, c: np.ndarray, point: Mapping[str, np.ndarray],
                tangents: Mapping[str, np.ndarray], gradient_scale: Mapping[str, np.ndarray],
                step: float, stencil: tuple[tuple[float, float], ...],
                backend: Backend, value_scale: Any = _forward_scale) -> tuple[float, float]:
    """``<c, Jt>`` by ``stencil`` at ``step`` in float64, and the bound on its rounding error:
    each evaluation of ``f`` within :math:`\\beta_{64}` of its scale (``value_scale`` of the
    moved case: scale and depth), each perturbed point rounded by :math:`u_{64}|x + kht|`
    (which moves ``<c, f>`` by at most
    :math:`u_{64}\\langle s_{\\bar g}, |x| + |k| h |t|\\rangle`), and the weighted sum."""
    denominator = sum(weight * offset for weight, offset in stencil) * step
    u = PRECISIONS["float64"].unit_roundoff
    total, rounding, magnitude = 0.0, 0.0, 0.0
    for weight, offset in stencil:
        moved = {name: a + offset * step * tangents[name] if name in tangents else a
                 for name, a in point.items()}
        value = real_host("the output", forward(**{name: backend.asarray(a, dtype="float64")
                                                   for name, a in moved.items()}))
        total += weight * float(np.sum(c * value))
        magnitude += abs(weight) * float(np.sum(np.abs(c * value)))
        scale, depth = value_scale(replace(case, arrays=moved))
        rounding += abs(weight) * float(np.sum(np.abs(c) * bound(scale, depth)))
        rounding += abs(weight) * u * sum(
            float(np.sum(gradient_scale[name] * (np.abs(point[name]) + abs(offset) * step
                                                 * np.abs(t))))
            for name, t in tangents.items())
    rounding += gamma(c.size + len(stencil), u) * magnitude
    return total / denominator, rounding / abs(denominator)


class _Setup(NamedTuple):
    """What every identity of one case needs: the rounded case, its point, the cotangent,
    random tangents, the backend and the forward."""

    at: Case
    point: dict[str, np.ndarray]
    cotangent: np.ndarray
    tangents: dict[str, np.ndarray]
    backend: Backend
    forward: Any


def _setup(case: Case, dtype: str, backend: str | Backend | None, seed: int,
           forward: Any) -> _Setup:
    """``case`` rounded to ``dtype``, its fixed cotangent (rounded to ``dtype``) and standard
    normal tangents drawn from ``seed`` (rounded to ``dtype``: inputs given in it are exact)."""
    chosen = get_backend("numpy") if backend is None else (
        get_backend(backend) if isinstance(backend, str) else backend)
    at = rounded(case, dtype)
    point = {name: np.asarray(a) for name, a in at.arrays.items()}
    output = np.asarray(to_numpy(reference_forward(at, chosen)), dtype=np.float64)
    c = round_to(case.cotangent(output.shape), dtype)
    rng = np.random.default_rng([seed, 4])
    tangents = {name: round_to(rng.standard_normal(point[name].shape), dtype)
                for name in at.differentiable}  # buffers (running statistics) stay still
    f = bind(forward or VARIANTS[case.variant].forward, at)
    return _Setup(at, point, c, tangents, chosen, f)


def _host_grads(computed: Mapping[str, Any], names: Sequence[str],
                what: str) -> dict[str, np.ndarray]:
    grads = {name: real_host(f"gradient {name!r}", g) for name, g in computed.items()}
    if sorted(grads, key=str) != sorted(names):
        raise AssertionError(f"the {what} returned gradients for {sorted(map(str, grads))}, "
                             f"expected {sorted(names)}")
    return grads


def _vjp_side(setup: _Setup, dtype: str, vjp: Any) -> Any:
    """``<vjp(c), t>`` and the bound on its rounding, for any tangents (the VJP runs once)."""
    at, c = setup.at, setup.cotangent
    f_vjp = bind(vjp or VARIANTS[at.variant].vjp, at, vjp=True)
    grads = _host_grads(f_vjp(setup.backend.asarray(c, dtype=dtype),
                              **at.arrays_on(setup.backend, dtype)), list(setup.tangents), "VJP")
    gradient_scale = _scales.vjp_scale(at, c, dtype)
    depth = _scales.depth(at, vjp=True)
    u = PRECISIONS["float64"].unit_roundoff

    def side(tangents: Mapping[str, np.ndarray]) -> tuple[float, float]:
        error = sum(float(np.sum(bound(gradient_scale[name], depth, dtype) * np.abs(t)))
                    for name, t in tangents.items())
        error += gamma(sum(t.size for t in tangents.values()), u) * _inner(
            {name: np.abs(g) for name, g in grads.items()},
            {name: np.abs(t) for name, t in tangents.items()})
        return _inner(grads, tangents), error

    return side


def _jvp_side(setup: _Setup, dtype: str, jvp: Any) -> Any:
    """``<c, jvp(t)>`` and the bound on its rounding (:func:`~condconv_ref.accuracy.exact_bound`
    of the JVP's scale, and the float64 inner product's), for any tangents."""
    at, c = setup.at, setup.cotangent
    f_jvp = bind(jvp or VARIANTS[at.variant].jvp, at, vjp=True)
    arrays = at.arrays_on(setup.backend, dtype)
    depth = _scales.jvp_depth(at)
    u = PRECISIONS["float64"].unit_roundoff

    def side(tangents: Mapping[str, np.ndarray]) -> tuple[float, float]:
        given = {name: setup.backend.asarray(t, dtype=dtype) for name, t in tangents.items()}
        value = np.asarray(to_numpy(f_jvp(given, **arrays)), dtype=np.float64)
        if value.shape != c.shape:
            raise AssertionError(f"the JVP returned shape {value.shape}, expected the "
                                 f"output's {c.shape}")
        scale = _scales.jvp_scale(at, tangents, dtype)
        error = float(np.sum(np.abs(c) * exact_bound(scale, depth, dtype)))
        error += gamma(c.size, u) * float(np.sum(np.abs(c * value)))
        return float(np.sum(c * value)), error

    return side


def _explain(identity: Any, tangents: Mapping[str, np.ndarray], what: str, error: float,
             allowed: float) -> str:
    """The failure's line, and which argument's tangent alone breaks ``identity``."""
    detail = f"\n|{what}| = {error:.3g} > bound {allowed:.3g}"
    for name in tangents:
        alone = {other: t if other == name else np.zeros_like(t)
                 for other, t in tangents.items()}
        units_alone = identity(alone)[0]
        if units_alone > 1:
            detail += f"\n  argument {name!r}: {units_alone:.3g} x the bound on its own"
    return detail


def finite_difference_check(case: Case, dtype: str, backend: str | Backend | None = None,
                            seed: int = 0, *, forward: Any = None,
                            vjp: Any = None, jvp: Any = None,
                            mode: str = "vjp") -> Measurement:
    """Check the reference VJP (``mode="jvp"``: JVP) of ``case`` computed in ``dtype`` against
    float64 central differences of its forward, with the derived bound (module docstring).

    Parameters
    ----------
    case : Case
        Its arrays are rounded to ``dtype`` first; the differences are taken
        in float64 at the rounded point.
    dtype : str
        The dtype the VJP (or JVP) runs in.
    backend : str or Backend, optional
        Where both run (default NumPy).
    seed : int
        Seed of the tangents (standard normal, one per argument).
    forward, vjp, jvp : callable, optional
        The op, VJP and JVP to check, called like the variant's reference
        (default the reference itself); the bound is the reference's.
    mode : {"vjp", "jvp"}
        ``"vjp"``: the identity :math:`\\sum\\langle \\mathrm{vjp}(c), t\\rangle =
        \\langle c, Jt\\rangle`; ``"jvp"``: :math:`\\langle c, \\mathrm{jvp}(t)\\rangle =
        \\langle c, Jt\\rangle`, with the JVP's rounding
        (:func:`condconv_ref._scales.jvp_scale`) in place of the VJP's.

    Returns
    -------
    Measurement
        ``units`` the identity's error in units of its bound; ``note`` says
        when the step was moved off a ReLU kink.  A case whose ReLU input is
        at its kink returns NaN units with the reason in ``note``.

    Examples
    --------
    >>> from condconv_ref import engine
    >>> from condconv_ref.testing import ConvConfig
    >>> from condconv_ref.variants import build_case
    >>> config = ConvConfig(batch=2, in_channels=2, out_channels=4, groups=2, spatial=(5,),
    ...                     kernel=(3,), stride=(1,), dilation=(1,), padding=1,
    ...                     padding_mode="zeros", n_experts=3, bias=True)
    >>> case = build_case("dynamic_conv_layer", config, seed=7)
    >>> engine.finite_difference_check(case, "float32", mode="jvp").passed
    True
    """
    if mode not in ("vjp", "jvp"):
        raise ValueError(f"finite_difference_check: mode must be 'vjp' or 'jvp', got {mode!r}")
    setup = _setup(case, dtype, backend, seed, forward)
    side = _vjp_side(setup, dtype, vjp) if mode == "vjp" else _jvp_side(setup, dtype, jvp)
    gradient_scale = _scales.vjp_scale(setup.at, setup.cotangent, dtype)
    identity = _Identity(setup.at, setup.backend, setup.forward, setup.cotangent, setup.point,
                         side, gradient_scale)
    units, error, allowed, note = identity.measure(setup.tangents)
    detail = setup.at.describe()
    if math.isnan(units):
        return Measurement(units, "", detail, note)
    if units > 1:
        analytic = "sum <vjp(c), t>" if mode == "vjp" else "<c, jvp(t)>"
        detail += _explain(identity.measure, setup.tangents, f"{analytic} - <c, Jt>", error,
                           allowed)
    return Measurement(units, "dot-product identity", detail, note)


def transpose_check(case: Case, dtype: str, backend: str | Backend | None = None,
                    seed: int = 0, *, jvp: Any = None, vjp: Any = None) -> Measurement:
    r"""Check that the JVP and the VJP of ``case``, both computed in ``dtype``, are transposes:
    :math:`\langle c, \mathrm{jvp}(t)\rangle = \sum_k \langle \mathrm{vjp}(c)_k, t_k\rangle`.

    An exact identity: no difference is taken, so the two sides may differ by
    their rounding alone,

    .. math::

        \sum_i |c_i|\,\beta^{\mathrm{jvp}}_i + \sum_k \sum_i \beta^{\mathrm{vjp}}_{k,i}\,|t_{k,i}|
        + \gamma_N(u_{64})\Big(\langle |c|, |\mathrm{jvp}(t)|\rangle
        + \sum_k \langle |\mathrm{vjp}(c)_k|, |t_k|\rangle\Big),

    with :math:`\beta` the bound of a computation in ``dtype`` against the
    exact value (:func:`condconv_ref.accuracy.exact_bound`) at the JVP's scale
    (:func:`condconv_ref._scales.jvp_scale`, depth
    :func:`~condconv_ref._scales.jvp_depth`) and at the VJP's scales, and the
    last term the float64 inner products over :math:`N` elements.

    Parameters
    ----------
    case : Case
        Its arrays, the cotangent and the tangents are rounded to ``dtype``.
    dtype : str
        The dtype both run in.
    backend : str or Backend, optional
        Where they run (default NumPy).
    seed : int
        Seed of the tangents (standard normal, one per argument).
    jvp, vjp : callable, optional
        The JVP and VJP to check, called like the variant's reference
        (default the reference's); the bound is the reference's.

    Returns
    -------
    Measurement
        The identity's error in units of its bound; on failure ``detail``
        names the arguments whose tangent alone breaks it.

    Examples
    --------
    >>> from condconv_ref import engine
    >>> from condconv_ref.testing import ConvConfig
    >>> from condconv_ref.variants import build_case
    >>> config = ConvConfig(batch=2, in_channels=2, out_channels=4, groups=2, spatial=(5,),
    ...                     kernel=(3,), stride=(1,), dilation=(1,), padding=1,
    ...                     padding_mode="zeros", n_experts=3, bias=True)
    >>> case = build_case("condconv_layer", config, seed=7)
    >>> engine.transpose_check(case, "float32").passed
    True
    """
    setup = _setup(case, dtype, backend, seed, None)
    jvp_side, vjp_side = _jvp_side(setup, dtype, jvp), _vjp_side(setup, dtype, vjp)

    def identity(tangents: Mapping[str, np.ndarray]) -> tuple[float, float, float]:
        (left, left_error), (right, right_error) = jvp_side(tangents), vjp_side(tangents)
        error, allowed = abs(left - right), left_error + right_error
        return (0.0 if error == 0 else error / allowed), error, allowed

    units, error, allowed = identity(setup.tangents)
    detail = setup.at.describe()
    if units > 1:
        detail += _explain(identity, setup.tangents, "<c, jvp(t)> - sum <vjp(c), t>", error,
                           allowed)
    return Measurement(units, "transpose identity", detail)


@dataclass(frozen=True)
class _Identity:
    """The dot-product identity of one case at one cotangent, for any tangents: ``analytic``
    gives the analytic side and the bound on its rounding, the forward's differences the
    other."""

    case: Case
    backend: Backend
    forward: Any
    cotangent: np.ndarray
    point: Mapping[str, np.ndarray]
    analytic: Any
    gradient_scale: Mapping[str, np.ndarray]
    value_scale: Any = _forward_scale

    def measure(self, tangents: Mapping[str, np.ndarray]) -> tuple[float, float, float, str]:
        """``(units, |error|, bound, note)``; NaN units when the case sits on a ReLU kink."""
        at, c, point, f = self.case, self.cotangent, self.point, self.forward
        analytic, vjp_error = self.analytic(tangents)
        u = PRECISIONS["float64"].unit_roundoff
        largest_x = max((float(np.max(np.abs(point[name]))) for name in tangents
                         if point[name].size),
                        default=0.0)
        largest_t = max((float(np.max(np.abs(t))) for t in tangents.values() if t.size),
                        default=0.0)
        if largest_t == 0:
            return 0.0, 0.0, 0.0, ""
        step = u ** (1 / 3) * 2 ** (1 / 3) * max(1.0, largest_x) / largest_t
        note = ""
        if at.variant in _KINKS:
            kink = _KINKS[at.variant](at, point, tangents, step)
            if kink <= step:
                if kink < _KINK_FLOOR * step:
                    return math.nan, 0.0, 0.0, ("skipped: a ReLU input of the routing MLP is "
                                                "at its kink")
                note = f"step {step:.2g} -> {kink / 2:.2g} to stay off a ReLU kink"
                step = kink / 2
        difference = partial(_difference, at, f, c, point, tangents, self.gradient_scale,
                             backend=self.backend, value_scale=self.value_scale)
        if at.variant in _scales.MULTILINEAR:  # a polynomial of degree <= 3 along the line: exact
            numeric, rounding = difference(step, FIVE_POINT)
            allowed = vjp_error + rounding
        else:  # Richardson: (4 D(h/2) - D(h)) / 3 removes the truncation's a h^2 term
            coarse, coarse_rounding = difference(step, CENTRAL)
            fine, fine_rounding = difference(step / 2, CENTRAL)
            numeric = (4 * fine - coarse) / 3
            rounding = (4 * fine_rounding + coarse_rounding) / 3
            correction = abs(fine - coarse) / 3  # what it removed: bounds what remains
            allowed = vjp_error + rounding + correction
        error = abs(analytic - numeric)
        return (0.0 if error == 0 else error / allowed), error, allowed, note


# ---------------------------------------------------------------- second order


def _bind_hvp(op: Any, case: Case) -> Any:
    """A layer's HVP as a function of the cotangent, the tangents and ``case``'s arrays."""
    options = case.options
    return lambda cotangent, tangents, x, **params: op(cotangent, tangents, x, params,
                                                       **options)


def hvp_check(case: Case, dtype: str, backend: str | Backend | None = None, seed: int = 0, *,
              hvp: Any = None) -> Measurement:
    r"""Check the Hessian-vector product of a layer ``case``, computed in ``dtype``, against
    float64 differences of its VJP.

    With the fixed cotangent :math:`c`, a tangent :math:`t` and a probe :math:`d`
    (standard normal, drawn from ``seed``), the identity is

    .. math::

        \langle d, \mathrm{hvp}(c, t)\rangle
        = \partial_s \langle d, \mathrm{vjp}(c, \theta + s t)\rangle\big|_{s=0},

    the right side by Richardson's difference of central differences, exactly
    as :func:`finite_difference_check` takes :math:`\langle c, Jt\rangle` (the
    step, the ReLU kink guard, the correction as the truncation's bound), with
    the VJP in place of the forward.  The two sides may differ by at most the sum of

    - the HVP's rounding: :math:`\langle |d|, \beta\rangle` of
      :func:`~condconv_ref.accuracy.exact_bound` in ``dtype``, at depth the
      VJP's plus :data:`~condconv_ref._scales.TANGENT_ADDITIONS`, with the HVP's
      scale (:func:`~condconv_ref._scales.hvp_scale`): for the routed layers the
      VJP's at :math:`|\theta| + |t|` and :math:`|c|` (each term of the HVP is a
      term of the VJP with one factor replaced by its tangent, so for the
      multilinear op this bounds the sum of their magnitudes; the routers' terms
      are held to the same model), for ODConv the first-order rule through each
      step of its HVP;
    - the differences' rounding: each float64 VJP within :math:`\beta_{64}` of
      its scale (:func:`~condconv_ref._scales.vjp_scale` at the moved point),
      and each moved point rounded by :math:`u_{64}|\theta + kht|`, which moves
      :math:`\langle d, \mathrm{vjp}\rangle` by its gradient, the reference HVP
      along :math:`d`, to first order (doubled, for its change over the step);
    - the truncation: the Richardson correction.

    Parameters
    ----------
    case : Case
        A layer with a Hessian-vector product (``VARIANTS[...].hvp``); its
        arrays, the cotangent, the tangents and the probe are rounded to ``dtype``.
    dtype : str
        The dtype the HVP runs in.
    backend : str or Backend, optional
        Where everything runs (default NumPy).
    seed : int
        Seed of the tangents and the probe.
    hvp : callable, optional
        The HVP to check, called like the reference's (default the reference
        itself); the bound is the reference's.

    Returns
    -------
    Measurement
        The identity's error in units of its bound (NaN with the reason in
        ``note`` on a ReLU kink); on failure ``detail`` names the arguments
        whose tangent alone breaks it.

    Examples
    --------
    >>> from condconv_ref import engine
    >>> from condconv_ref.testing import ConvConfig
    >>> from condconv_ref.variants import build_case
    >>> config = ConvConfig(batch=2, in_channels=2, out_channels=4, groups=2, spatial=(5,),
    ...                     kernel=(3,), stride=(1,), dilation=(1,), padding=1,
    ...                     padding_mode="zeros", n_experts=3, bias=True)
    >>> case = build_case("dynamic_conv_layer", config, seed=7)
    >>> engine.hvp_check(case, "float32").passed
    True
    """
    entry = _check_has_hvp("hvp_check", case)
    setup = _setup(case, dtype, backend, seed, None)
    at, c, chosen, point = setup.at, setup.cotangent, setup.backend, setup.point
    names = list(setup.tangents)
    rng = np.random.default_rng([seed, 5])
    probe = {name: round_to(rng.standard_normal(point[name].shape), dtype) for name in names}
    f_vjp = bind(entry.vjp, at, vjp=True)
    c64 = chosen.asarray(c, dtype="float64")
    depth = _scales.depth(at, vjp=True)

    def gradients(**arrays: Any) -> np.ndarray:
        grads = _host_grads(f_vjp(c64, **arrays), names, "VJP")
        return np.concatenate([grads[name].ravel() for name in names])

    def value_scale(moved: Case) -> tuple[np.ndarray, int]:
        scale = _scales.vjp_scale(moved, c)
        return np.concatenate([np.asarray(scale[name]).ravel() for name in names]), depth

    along_probe = _run_hvp(setup, entry.hvp, probe, "float64")
    analytic = _hvp_side(setup, dtype, hvp or entry.hvp, probe)
    identity = _Identity(at, chosen, gradients,
                         np.concatenate([probe[name].ravel() for name in names]), point,
                         analytic, {name: 2 * np.abs(along_probe[name]) for name in names},
                         value_scale)
    units, error, allowed, note = identity.measure(setup.tangents)
    detail = at.describe()
    if math.isnan(units):
        return Measurement(units, "", detail, note)
    if units > 1:
        detail += _explain(identity.measure, setup.tangents,
                           "<d, hvp(c, t)> - d/ds <d, vjp(c, x + s t)>", error, allowed)
    return Measurement(units, "HVP identity", detail, note)


def _run_hvp(setup: _Setup, f_hvp: Any, tangents: Mapping[str, np.ndarray],
             dtype: str) -> dict[str, np.ndarray]:
    """``f_hvp`` at the setup's cotangent along ``tangents``, all in ``dtype``, on the host."""
    at, chosen = setup.at, setup.backend
    given = {name: chosen.asarray(t, dtype=dtype) for name, t in tangents.items()}
    return _host_grads(_bind_hvp(f_hvp, at)(chosen.asarray(setup.cotangent, dtype=dtype), given,
                                            **at.arrays_on(chosen, dtype)),
                       list(setup.tangents), "HVP")


def _hvp_side(setup: _Setup, dtype: str, f_hvp: Any, probe: Mapping[str, np.ndarray]) -> Any:
    """``<probe, hvp(c, t)>`` in ``dtype`` and the bound on its rounding (:func:`hvp_check`
    states it), for any tangents ``t``."""
    at, c = setup.at, setup.cotangent
    depth = _scales.hvp_depth(at)
    u = PRECISIONS["float64"].unit_roundoff

    def side(tangents: Mapping[str, np.ndarray]) -> tuple[float, float]:
        grads = _run_hvp(setup, f_hvp, tangents, dtype)
        scale = _scales.hvp_scale(at, c, tangents, dtype)
        error = sum(float(np.sum(np.abs(d) * exact_bound(scale[name], depth, dtype)))
                    for name, d in probe.items())
        error += gamma(sum(d.size for d in probe.values()), u) * _inner(
            {name: np.abs(g) for name, g in grads.items()},
            {name: np.abs(d) for name, d in probe.items()})
        return _inner(grads, probe), error

    return side


def _check_has_hvp(fn: str, case: Case) -> Any:
    """The registry entry of ``case``'s variant, which must have a Hessian-vector product."""
    entry = VARIANTS[case.variant]
    if entry.hvp is None:
        raise ValueError(f"{fn}: case has variant {case.variant!r}, which has no "
                         f"Hessian-vector product; expected one of {hvp_variants()}")
    return entry


def hvp_symmetry_check(case: Case, dtype: str, backend: str | Backend | None = None,
                       seed: int = 0, *, hvp: Any = None) -> Measurement:
    r"""Check that the Hessian of :math:`\langle c, f\rangle` that the HVP of a layer
    ``case`` applies is symmetric: :math:`\langle t_2, \mathrm{hvp}(c, t_1)\rangle =
    \langle t_1, \mathrm{hvp}(c, t_2)\rangle` over the input and every parameter.

    An exact identity, both sides computed in ``dtype``; they may differ by the
    sum of their rounding bounds, each as the HVP's in :func:`hvp_check`.
    Arguments and result as :func:`hvp_check` (:math:`t_1, t_2` standard normal
    from ``seed``).

    Examples
    --------
    >>> from condconv_ref import engine
    >>> from condconv_ref.testing import ConvConfig
    >>> from condconv_ref.variants import build_case
    >>> config = ConvConfig(batch=2, in_channels=2, out_channels=4, groups=2, spatial=(5,),
    ...                     kernel=(3,), stride=(1,), dilation=(1,), padding=1,
    ...                     padding_mode="zeros", n_experts=3, bias=True)
    >>> case = build_case("condconv_layer", config, seed=7)
    >>> engine.hvp_symmetry_check(case, "float32").passed
    True
    """
    entry = _check_has_hvp("hvp_symmetry_check", case)
    setup = _setup(case, dtype, backend, seed, None)
    first = setup.tangents
    rng = np.random.default_rng([seed, 5])
    second = {name: round_to(rng.standard_normal(t.shape), dtype) for name, t in first.items()}
    f_hvp = hvp or entry.hvp
    (left, left_error) = _hvp_side(setup, dtype, f_hvp, second)(first)
    (right, right_error) = _hvp_side(setup, dtype, f_hvp, first)(second)
    error, allowed = abs(left - right), left_error + right_error
    units = 0.0 if error == 0 else error / allowed
    detail = setup.at.describe()
    if units > 1:
        detail += (f"\n|<t2, hvp(c, t1)> - <t1, hvp(c, t2)>| = {error:.3g} > bound "
                   f"{allowed:.3g}")
    return Measurement(units, "Hessian symmetry", detail)
