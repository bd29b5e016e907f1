r"""Numerical test helpers: dtype-aware closeness and finite-difference VJP checks.

Every helper works on any array API namespace.  The namespace is read once from
the arguments, and all arithmetic runs in it, on the arguments' device.
NumPy sees the user's arrays only when a failure message is built: the arrays
are then copied to host memory by :func:`condconv_ref.backends.to_numpy`.

Notation: ``eps`` is the machine epsilon of a dtype (``2**-10`` for float16,
``2**-23`` for float32, ``2**-52`` for float64).  ``<a, b>`` is the sum of
``a * b`` over all elements.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import array_api_compat
import array_api_extra as xpx
import numpy

from condconv_ref._validate import check_positive_int, check_tolerance, namespace
from condconv_ref.backends import to_numpy

__all__ = [
    "VJPCheck",
    "assert_close",
    "check_vjp",
    "default_tolerances",
    "numerical_jvp",
    "numerical_vjp",
]

_EPS = {
    "float16": 2.0**-10,
    "bfloat16": 2.0**-7,
    "float32": 2.0**-23,
    "float64": 2.0**-52,
    "complex64": 2.0**-23,
    "complex128": 2.0**-52,
}
_EXACT_KINDS = ("bool", "int", "uint")
_ROUNDING_SAFETY = 16.0
_FINITE_DIFFERENCE_SAFETY = 64.0


# ---------------------------------------------------------------- dtypes


def _dtype_name(dtype: Any) -> str:
    """``'float32'`` for ``numpy.float32``, ``torch.float32``, strict's float32 or a name."""
    if isinstance(dtype, str):
        return dtype
    try:
        return numpy.dtype(dtype).name
    except TypeError:
        return str(dtype).rsplit(".", 1)[-1]


def _eps(dtype: Any) -> float:
    """Machine epsilon of a floating dtype; 0 for boolean and integer dtypes."""
    dtype_name = _dtype_name(dtype)
    if dtype_name in _EPS:
        return _EPS[dtype_name]
    if dtype_name.rstrip("0123456789") in _EXACT_KINDS:
        return 0.0
    raise ValueError(
        f"default_tolerances: unknown dtype {dtype!r}; expected a boolean, integer or one of "
        f"{', '.join(_EPS)}"
    )


def default_tolerances(dtype: Any, *, reduction_length: int = 1) -> tuple[float, float]:
    r"""Return ``(rtol, atol)`` for comparing results computed in ``dtype``.

    The rule is ``rtol = atol = 16 * eps * sqrt(reduction_length)``.  A sum of
    ``n`` rounded terms of order one carries a random-walk rounding error of
    about ``eps * sqrt(n)``; the factor 16 leaves room for differences in
    summation order between implementations.  Giving ``atol`` the same value
    assumes data of order one, and covers outputs that cancel to near zero.
    Boolean and integer dtypes compare exactly: ``(0.0, 0.0)``.

    For float16 with ``n = 1`` this gives about 1.6e-2, for float32 1.9e-6 and
    for float64 3.6e-15.

    Parameters
    ----------
    dtype : dtype or str
        A NumPy, PyTorch, CuPy or array-api-strict dtype, or its name such as
        ``"float32"``.  Complex dtypes use the epsilon of their real part.
    reduction_length : int, optional
        Number of terms summed into each output element, e.g.
        ``C_in / groups * kh * kw`` for a convolution.  Default 1.

    Returns
    -------
    rtol, atol : float
        Relative and absolute tolerance.

    Raises
    ------
    ValueError
        If ``dtype`` is not a known boolean, integer or floating dtype, or
        ``reduction_length < 1``.

    Examples
    --------
    >>> from condconv_ref.testing import default_tolerances
    >>> rtol, atol = default_tolerances("float32", reduction_length=9)  # 16 eps sqrt(9)
    >>> rtol == atol == 16 * 2.0**-23 * 3
    True
    """
    length = check_positive_int("default_tolerances", "reduction_length", reduction_length)
    tolerance = _ROUNDING_SAFETY * _eps(dtype) * math.sqrt(length)
    return tolerance, tolerance


# ---------------------------------------------------------------- host copies for messages


def _as_float(a: numpy.ndarray) -> numpy.ndarray:
    return a.astype(numpy.complex128 if numpy.iscomplexobj(a) else numpy.float64)


def _worst_mismatch(
    actual: numpy.ndarray, desired: numpy.ndarray, mismatch: numpy.ndarray
) -> tuple[tuple[int, ...], float]:
    """Index and absolute error of the mismatched element farthest from ``desired``.

    An element where only one side is NaN counts as infinitely far.
    """
    with numpy.errstate(invalid="ignore"):
        error = numpy.abs(_as_float(actual) - _as_float(desired))
    distance = numpy.where(mismatch, numpy.nan_to_num(error, nan=numpy.inf), -1.0)
    flat = int(numpy.argmax(distance))
    index = tuple(int(i) for i in numpy.unravel_index(flat, mismatch.shape))
    return index, float(error.reshape(-1)[flat])


def _max_errors(actual: numpy.ndarray, desired: numpy.ndarray) -> tuple[float, float]:
    """Largest absolute and relative error, ignoring NaN errors (NaN on either side)."""
    with numpy.errstate(invalid="ignore", divide="ignore"):
        error = numpy.abs(_as_float(actual) - _as_float(desired))
        relative = error / numpy.abs(_as_float(desired))
    finite = ~numpy.isnan(error)
    if not finite.any():
        return math.nan, math.nan
    relative = relative[finite & ~numpy.isnan(relative)]
    max_relative = float(relative.max()) if relative.size else 0.0
    return float(error[finite].max()), max_relative


def _mismatch_message(
    name: str, actual: Any, desired: Any, mismatch: Any, rtol: float, atol: float
) -> str:
    actual_np, desired_np, mismatch_np = (to_numpy(a) for a in (actual, desired, mismatch))
    index, _ = _worst_mismatch(actual_np, desired_np, mismatch_np)
    max_abs, max_rel = _max_errors(actual_np, desired_np)
    return (
        f"{name}: {int(mismatch_np.sum())} of {mismatch_np.size} elements differ beyond "
        f"|actual - desired| <= atol + rtol * |desired| (rtol={rtol:.3g}, atol={atol:.3g})\n"
        f"  worst at index {index}: actual {actual_np[index].item()!r}, "
        f"desired {desired_np[index].item()!r}\n"
        f"  max abs error {max_abs:.3g}, max rel error {max_rel:.3g}"
    )


# ---------------------------------------------------------------- assert_close


def _same_kind(xp: ModuleType, name: str, actual: Any, desired: Any, check_namespace: bool) -> Any:
    """Return ``desired`` in ``actual``'s namespace and on its device, or raise."""
    desired_xp = array_api_compat.array_namespace(desired)
    if desired_xp is not xp:
        if check_namespace:
            raise AssertionError(
                f"{name}: namespace mismatch, actual is {xp.__name__} but desired is "
                f"{desired_xp.__name__}"
            )
        return xp.asarray(to_numpy(desired), device=array_api_compat.device(actual))
    actual_device = array_api_compat.device(actual)
    desired_device = array_api_compat.device(desired)
    if actual_device != desired_device:
        raise AssertionError(
            f"{name}: device mismatch, actual is on {actual_device} but desired is on "
            f"{desired_device}"
        )
    return desired


def _common_dtype(xp: ModuleType, name: str, actual: Any, desired: Any, check_dtype: bool) -> Any:
    """The dtype both sides are compared in, or raise on a mismatch when checking."""
    if actual.dtype == desired.dtype:
        return actual.dtype
    if check_dtype:
        raise AssertionError(
            f"{name}: dtype mismatch, actual is {actual.dtype} but desired is {desired.dtype}"
        )
    inexact = ("real floating", "complex floating")
    if xp.isdtype(actual.dtype, inexact) != xp.isdtype(desired.dtype, inexact):
        return actual.dtype if xp.isdtype(actual.dtype, inexact) else desired.dtype
    return xp.result_type(actual.dtype, desired.dtype)


def _same_shape(
    xp: ModuleType, name: str, actual: Any, desired: Any, check_shape: bool
) -> tuple[Any, Any]:
    """Both sides with one shape: equal shapes when checking, else broadcast."""
    if tuple(actual.shape) == tuple(desired.shape):
        return actual, desired
    if check_shape:
        raise AssertionError(
            f"{name}: shape mismatch, actual has shape {tuple(actual.shape)} but desired has "
            f"{tuple(desired.shape)}"
        )
    try:
        return tuple(xp.broadcast_arrays(actual, desired))
    except (ValueError, RuntimeError) as exc:
        raise AssertionError(
            f"{name}: shapes {tuple(actual.shape)} and {tuple(desired.shape)} do not broadcast"
        ) from exc


def _mismatch_mask(actual: Any, desired: Any, rtol: float, atol: float, *, equal_nan: bool,
                   xp: ModuleType) -> Any:
    """True where the elements differ beyond tolerance; inf matches inf of its sign, and NaN
    matches NaN when ``equal_nan`` (otherwise every NaN is a mismatch)."""
    if not xp.isdtype(actual.dtype, ("real floating", "complex floating")):
        return actual != desired
    identical = actual == desired
    if equal_nan:
        identical = identical | (xp.isnan(actual) & xp.isnan(desired))
    zeros = xp.zeros_like(actual)
    difference = xp.where(identical, zeros, actual) - xp.where(identical, zeros, desired)
    close = xp.abs(difference) <= atol + rtol * xp.abs(desired)
    return ~(close | identical)


def assert_close(
    actual: Any,
    desired: Any,
    *,
    rtol: float | None = None,
    atol: float | None = None,
    reduction_length: int = 1,
    name: str = "array",
    check_dtype: bool = True,
    check_shape: bool = True,
    check_namespace: bool = True,
    equal_nan: bool = True,
) -> None:
    """Assert that two arrays match in namespace, device, dtype, shape and values.

    Elements must satisfy ``|actual - desired| <= atol + rtol * |desired|``,
    or be equal (so infinities of one sign match), or both be NaN (unless
    ``equal_nan`` is False).  Boolean and integer arrays must be equal.

    Parameters
    ----------
    actual, desired : array
        The arrays to compare.  ``desired`` is the reference.
    rtol, atol : float, optional
        Relative and absolute tolerance.  Each one left as ``None`` comes from
        :func:`default_tolerances` for the less precise of the two dtypes.
    reduction_length : int, optional
        Passed to :func:`default_tolerances`.  Default 1.
    name : str, optional
        What is compared; every failure message starts with it.
    check_dtype : bool, optional
        Require equal dtypes.  If False, compare in the promoted dtype.
    check_shape : bool, optional
        Require equal shapes.  If False, broadcast the two arrays.
    check_namespace : bool, optional
        Require one array namespace (and then one device).  If False,
        ``desired`` is copied through host memory into ``actual``'s namespace.
    equal_nan : bool, optional
        Whether NaN in both arrays at one index counts as equal (default, as in
        :func:`numpy.testing.assert_allclose`).  If False, any NaN is a
        mismatch, as in :func:`torch.testing.assert_close`.

    Raises
    ------
    TypeError
        If ``actual`` or ``desired`` is not an array (a Python scalar or a
        list, say).
    AssertionError
        On any mismatch.  A value mismatch reports how many elements differ,
        the index of the worst one (largest ``|actual - desired|``, where NaN
        on one side only counts as infinite), the two values there, the
        largest absolute and relative errors, and the tolerances used.

    Examples
    --------
    >>> import numpy as np
    >>> from condconv_ref.testing import assert_close
    >>> assert_close(np.array([1.0, 2.0]), np.array([1.0, 2.0 + 1e-15]))
    >>> try:
    ...     assert_close(np.array([1.0, 2.0, 3.0]), np.array([1.0, 2.5, 3.0]), name="y")
    ... except AssertionError as error:
    ...     print("(1,)" in str(error), "y" in str(error))
    True True
    >>> nan = np.array([np.nan])
    >>> assert_close(nan, nan)
    >>> assert_close(nan, nan, equal_nan=False)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    AssertionError: array: 1 of 1 elements differ ...
    """
    for argument, value in (("actual", actual), ("desired", desired)):
        if (isinstance(value, (bool, int, float, complex))
                or not array_api_compat.is_array_api_obj(value)):
            raise TypeError(f"assert_close: {argument} must be an array of an array API "
                            f"namespace, got {type(value).__name__} {value!r:.60}; wrap it "
                            f"with the namespace's asarray")
    xp = array_api_compat.array_namespace(actual)
    desired = _same_kind(xp, name, actual, desired, check_namespace)
    default_rtol, default_atol = max(
        default_tolerances(dtype, reduction_length=reduction_length)
        for dtype in (actual.dtype, desired.dtype)
    )
    rtol = default_rtol if rtol is None else check_tolerance("assert_close", "rtol", rtol)
    atol = default_atol if atol is None else check_tolerance("assert_close", "atol", atol)
    dtype = _common_dtype(xp, name, actual, desired, check_dtype)
    actual, desired = xp.astype(actual, dtype, copy=False), xp.astype(desired, dtype, copy=False)
    actual, desired = _same_shape(xp, name, actual, desired, check_shape)
    mismatch = _mismatch_mask(actual, desired, rtol, atol, equal_nan=equal_nan, xp=xp)
    if bool(xp.any(mismatch)):
        raise AssertionError(_mismatch_message(name, actual, desired, mismatch, rtol, atol))


# ---------------------------------------------------------------- finite differences


def _max_abs(arrays: Any, *, xp: ModuleType) -> float:
    return max(
        (float(xp.max(xp.abs(a))) for a in arrays if math.prod(a.shape) > 0), default=0.0
    )


def _coarsest_eps(arrays: Any) -> float:
    return max(_eps(a.dtype) for a in arrays)


def _default_step(arguments: Any, *, xp: ModuleType) -> float:
    """``eps**(1/3) * max(1, max|x|)`` over the perturbed arguments."""
    arguments = list(arguments)
    return _coarsest_eps(arguments) ** (1.0 / 3.0) * max(1.0, _max_abs(arguments, xp=xp))


def _check_names(fn: str, args: Mapping[str, Any], names: Any, what: str) -> tuple[str, ...]:
    """Return ``names`` as a tuple, after checking each one names an argument."""
    names = tuple(names)
    unknown = [name for name in names if name not in args]
    if unknown:
        raise ValueError(f"{fn}: {what} names {unknown} are not arguments of f ({list(args)})")
    return names


def _check_like(fn: str, what: str, a: Any, reference: Any, reference_name: str) -> None:
    """Raise ``ValueError`` unless ``a`` has ``reference``'s shape and dtype."""
    if tuple(a.shape) != tuple(reference.shape) or a.dtype != reference.dtype:
        raise ValueError(
            f"{fn}: {what} has shape {tuple(a.shape)} and dtype {a.dtype}, expected those of "
            f"{reference_name}: {tuple(reference.shape)} and {reference.dtype}"
        )


def numerical_jvp(
    f: Callable[..., Any],
    args: Mapping[str, Any],
    tangents: Mapping[str, Any],
    *,
    step: float | None = None,
) -> Any:
    r"""Directional derivative of ``f`` at ``args`` along ``tangents``, by central differences.

    .. math::

        J t \approx \frac{f(x + h t) - f(x - h t)}{2 h}

    where only the arguments named in ``tangents`` move.  The error is
    ``O(h**2)`` from truncation plus ``O(eps / h)`` from rounding.

    Parameters
    ----------
    f : callable
        Called as ``f(**args)``; returns one array.
    args : mapping of str to array
        The point of evaluation.  All arrays share one namespace, device and
        real floating dtype.
    tangents : mapping of str to array
        Direction, for a subset of ``args``; each with its argument's shape
        and dtype.
    step : float, optional
        The step ``h``.  Default ``eps**(1/3) * max(1, max|x|) / max|t|``, with
        the maxima taken over the arguments named in ``tangents`` and over
        ``tangents``: the largest perturbation is then ``eps**(1/3)`` relative
        to the arguments' scale, which balances truncation against rounding.

    Returns
    -------
    array
        The estimate of ``J t``, with the shape and dtype of ``f``'s output.

    Examples
    --------
    >>> import numpy as np
    >>> from condconv_ref.testing import numerical_jvp
    >>> a = np.array([[1.0, 2.0], [3.0, 4.0]])
    >>> jt = numerical_jvp(lambda x: x @ a, {"x": np.ones((1, 2))}, {"x": np.array([[1.0, 0.0]])})
    >>> bool(np.allclose(jt, [[1.0, 2.0]]))  # J t = t a for a linear map
    True
    """
    xp = namespace("numerical_jvp", **args)
    names = _check_names("numerical_jvp", args, tangents, "tangent")
    for n in names:
        _check_like("numerical_jvp", f"tangent {n!r}", tangents[n], args[n], n)
    if step is None:
        largest_tangent = _max_abs(tangents.values(), xp=xp)
        if largest_tangent == 0.0:
            return xp.zeros_like(f(**args))
        step = _default_step((args[n] for n in names), xp=xp) / largest_tangent
    plus = {**args, **{n: args[n] + step * tangents[n] for n in names}}
    minus = {**args, **{n: args[n] - step * tangents[n] for n in names}}
    return (f(**plus) - f(**minus)) / (2.0 * step)


def _numerical_gradient(
    f: Callable[..., Any], args: Mapping[str, Any], arg_name: str, cotangent: Any, step: float,
    *, xp: ModuleType,
) -> Any:
    """``<cotangent, df/dx_i>`` for every element ``i`` of ``args[arg_name]``."""
    x = args[arg_name]
    gradient = xp.zeros_like(x)
    for index in itertools.product(*(range(n) for n in x.shape)):
        plus = f(**{**args, arg_name: xpx.at(x)[index].add(step, copy=True)})
        minus = f(**{**args, arg_name: xpx.at(x)[index].add(-step, copy=True)})
        entry = xp.sum((plus - minus) * cotangent) / (2.0 * step)
        gradient = xpx.at(gradient)[index].set(entry)
    return gradient


def numerical_vjp(
    f: Callable[..., Any],
    args: Mapping[str, Any],
    cotangent: Any,
    *,
    wrt: Any = None,
    step: float | None = None,
) -> dict[str, Any]:
    r"""Gradient of ``<cotangent, f(**args)>``, one central difference per element.

    .. math::

        g_i = \left\langle c, \frac{f(x + h e_i) - f(x - h e_i)}{2 h} \right\rangle

    This costs two calls of ``f`` per element of every argument in ``wrt``:
    use it on small inputs.

    Parameters
    ----------
    f : callable
        Called as ``f(**args)``; returns one array.
    args : mapping of str to array
        The point of evaluation.  All arrays share one namespace, device and
        real floating dtype.
    cotangent : array
        Weights for ``f``'s output; same shape as the output.
    wrt : iterable of str, optional
        Arguments to differentiate.  Default: all of ``args``.
    step : float, optional
        The step ``h``.  Default, per argument ``x``: ``eps**(1/3) * max(1, max|x|)``
        (the rule of :func:`numerical_jvp` with a unit tangent).

    Returns
    -------
    dict of str to array
        For each name in ``wrt``, the gradient, with the argument's shape,
        dtype and device.

    Examples
    --------
    >>> import numpy as np
    >>> from condconv_ref.testing import numerical_vjp
    >>> grads = numerical_vjp(lambda x: x**2, {"x": np.array([3.0, -1.0])}, np.array([1.0, 2.0]))
    >>> bool(np.allclose(grads["x"], [6.0, -4.0]))  # c * 2x
    True
    """
    xp = namespace("numerical_vjp", **args)
    names = _check_names("numerical_vjp", args, args if wrt is None else wrt, "wrt")
    return {
        arg_name: _numerical_gradient(
            f, args, arg_name, cotangent,
            _default_step([args[arg_name]], xp=xp) if step is None else step, xp=xp,
        )
        for arg_name in names
    }


# ---------------------------------------------------------------- check_vjp


@dataclass(frozen=True)
class VJPCheck:
    """Measurements of a passing :func:`check_vjp`.

    Attributes
    ----------
    name : str
        The operation checked.
    analytic : float
        ``sum over wrt of <f_vjp(c)[name], t[name]>``.
    numeric : float
        ``<c, numerical_jvp(f, args, t)>``.
    scale : float
        ``sum |f_vjp(c)[name] * t[name]| + sum |c * numerical_jvp(...)|``: the
        size of the terms, against which ``rtol`` applies.
    rtol, atol : float
        The tolerances used: the check is ``error <= atol + rtol * scale``.

    Examples
    --------
    >>> import numpy as np
    >>> from condconv_ref.testing import check_vjp
    >>> def square(x):
    ...     return x * x
    >>> def square_vjp(cotangent, x):
    ...     return {"x": 2 * x * cotangent}
    >>> result = check_vjp(square, square_vjp, {"x": np.array([1.0, -2.0, 3.0])})
    >>> result.name, result.error <= result.atol + result.rtol * result.scale
    ('square', True)
    """

    name: str
    analytic: float
    numeric: float
    scale: float
    rtol: float
    atol: float

    @property
    def error(self) -> float:
        """``|analytic - numeric|``."""
        return abs(self.analytic - self.numeric)


def _op_name(f: Callable[..., Any]) -> str:
    """``f.__name__``, seeing through ``functools.partial``."""
    return getattr(f, "__name__", None) or getattr(getattr(f, "func", f), "__name__", repr(f))


def _random_like(a: Any, rng: numpy.random.Generator, *, xp: ModuleType) -> Any:
    """Standard normal draws with ``a``'s shape, dtype and device."""
    draws = rng.standard_normal(tuple(a.shape))
    return xp.asarray(draws, dtype=a.dtype, device=array_api_compat.device(a))


def _check_gradients(
    op: str, gradients: Any, args: Mapping[str, Any], names: tuple[str, ...], *, xp: ModuleType
) -> None:
    """The VJP returned one gradient per requested name, each shaped like its argument."""
    if not isinstance(gradients, Mapping):
        raise AssertionError(
            f"{op}: the VJP must return a dict of argument name to gradient, got "
            f"{type(gradients).__name__}"
        )
    missing = [n for n in names if n not in gradients]
    unknown = [n for n in gradients if n not in args]
    if missing or unknown:
        raise AssertionError(
            f"{op}: the VJP returned gradients for {sorted(gradients)}; missing {missing}, "
            f"not arguments of f {unknown}"
        )
    for arg_name in names:
        _check_kept(f"{op}: the gradient for {arg_name!r}", gradients[arg_name], args[arg_name],
                    repr(arg_name), xp=xp)


def _check_kept(what: str, result: Any, like: Any, like_name: str, *, xp: ModuleType,
                shape: bool = True) -> None:
    """``result`` has ``like``'s namespace, device, dtype (and shape), or raise ``AssertionError``."""
    if (not array_api_compat.is_array_api_obj(result)
            or array_api_compat.array_namespace(result) is not xp):
        raise AssertionError(
            f"{what} is {type(result).__name__}, expected an array of {xp.__name__}")
    expected = {"device": array_api_compat.device(like), "dtype": like.dtype}
    found = {"device": array_api_compat.device(result), "dtype": result.dtype}
    if shape:
        expected["shape"], found["shape"] = tuple(like.shape), tuple(result.shape)
    for prop, value in expected.items():
        if found[prop] != value:
            raise AssertionError(
                f"{what} has {prop} {found[prop]}, expected {value} like {like_name}")


def _vjp_tolerances(
    arrays: Any, rtol: float | None, atol: float | None
) -> tuple[float, float]:
    """Default ``rtol = 64 * eps**(2/3)``, ``atol = 0``, for the coarsest dtype."""
    default_rtol = _FINITE_DIFFERENCE_SAFETY * _coarsest_eps(arrays) ** (2.0 / 3.0)
    return (default_rtol if rtol is None else rtol), (0.0 if atol is None else atol)


def _gradient_mismatch(
    arg_name: str, analytic: Any, numeric: Any, rtol: float, atol: float
) -> str | None:
    """A report line if ``analytic`` and ``numeric`` differ by more than
    ``atol + rtol * max|numeric|`` anywhere, else ``None``."""
    analytic_np, numeric_np = to_numpy(analytic), to_numpy(numeric)
    tolerance = atol + rtol * (float(numpy.abs(numeric_np).max()) if numeric_np.size else 0.0)
    with numpy.errstate(invalid="ignore"):
        error = numpy.abs(_as_float(analytic_np) - _as_float(numeric_np))
        mismatch = ~(error <= tolerance)
    if not mismatch.any():
        return None
    index, worst = _worst_mismatch(analytic_np, numeric_np, mismatch)
    return (
        f"  argument {arg_name!r}: {int(mismatch.sum())} of {mismatch.size} gradient elements "
        f"differ; worst at index {index}: analytic {analytic_np[index].item()!r}, "
        f"numeric {numeric_np[index].item()!r} (|difference| {worst:.3g}, tolerance "
        f"{tolerance:.3g})"
    )


def _identity_check(
    op: str, output: Any, gradients: Mapping[str, Any], tangents: Mapping[str, Any],
    cotangent: Any, jvp: Any, rtol: float | None, atol: float | None, *, xp: ModuleType,
) -> VJPCheck:
    """Both sides of ``sum <vjp(c), t> = <c, J t>``, their scale and the tolerances."""
    analytic_terms = [gradients[n] * tangents[n] for n in tangents]
    numeric_terms = cotangent * jvp
    rtol, atol = _vjp_tolerances([output, *(gradients[n] for n in tangents)], rtol, atol)
    return VJPCheck(
        name=op,
        analytic=sum(float(xp.sum(term)) for term in analytic_terms),
        numeric=float(xp.sum(numeric_terms)),
        scale=sum(float(xp.sum(xp.abs(term))) for term in [*analytic_terms, numeric_terms]),
        rtol=rtol,
        atol=atol,
    )


def _failure_message(
    result: VJPCheck, f: Callable[..., Any], args: Mapping[str, Any], gradients: Mapping[str, Any],
    cotangent: Any, names: tuple[str, ...], step: float | None,
) -> str:
    numeric = numerical_vjp(f, args, cotangent, wrt=names, step=step)
    lines = [
        f"{result.name}: the VJP fails the dot-product test: sum <vjp(c), t> = "
        f"{result.analytic!r} but <c, jvp(t)> = {result.numeric!r}; |difference| "
        f"{result.error:.3g} > atol + rtol * scale = {result.atol:.3g} + {result.rtol:.3g} * "
        f"{result.scale:.3g}"
    ]
    for n in names:
        line = _gradient_mismatch(n, gradients[n], numeric[n], result.rtol, result.atol)
        if line is not None:
            lines.append(line)
    if len(lines) == 1:
        lines.append(
            "  every gradient element agrees with finite differences within tolerance; the "
            "finite-difference noise may exceed rtol (pass a larger rtol or another step)"
        )
    return "\n".join(lines)


def check_vjp(
    f: Callable[..., Any],
    f_vjp: Callable[..., Mapping[str, Any]],
    args: Mapping[str, Any],
    *,
    cotangent: Any = None,
    wrt: Any = None,
    rtol: float | None = None,
    atol: float | None = None,
    step: float | None = None,
    seed: int = 0,
    name: str | None = None,
) -> VJPCheck:
    r"""Check a VJP against finite differences with the dot-product identity.

    With random tangents ``t`` (one per name in ``wrt``) and a random
    cotangent ``c``, a correct VJP satisfies

    .. math::

        \sum_{\text{name}} \langle \mathrm{vjp}(c)_\text{name}, t_\text{name} \rangle
        = \langle c, J t \rangle,

    and :func:`numerical_jvp` estimates ``J t`` with two calls of ``f``.  The
    check passes when ``|lhs - rhs| <= atol + rtol * scale``, where ``scale``
    sums the absolute values of all the products in both inner products.

    Before that, each gradient must match its argument's namespace, device,
    shape and dtype, and the VJP must return a gradient for every name in
    ``wrt`` and none for names that are not arguments.

    Parameters
    ----------
    f : callable
        Called as ``f(**args)``; returns one array.
    f_vjp : callable
        Called as ``f_vjp(cotangent, **args)``; returns a dict of argument name
        to gradient.
    args : mapping of str to array
        The point of evaluation.  All arrays share one namespace, device and
        real floating dtype.
    cotangent : array, optional
        Weights for ``f``'s output.  Default: drawn at random.
    wrt : iterable of str, optional
        Arguments to check.  Default: all of ``args``.
    rtol : float, optional
        Default ``64 * eps**(2/3)`` for the coarsest dtype involved: 2.4e-9 for
        float64 and 1.6e-3 for float32.  Central differences with the default
        step err by ``O(eps**(2/3))`` relative to ``scale``; the factor 64
        covers moderate third derivatives.  Functions far from linear at the
        step scale, or outputs much larger than their changes, need more.
        In float32 the check therefore catches only gradient errors larger
        than about 0.2% of ``scale``; check VJPs in float64 where possible.
    atol : float, optional
        Default 0.
    step : float, optional
        Finite-difference step; see :func:`numerical_jvp`.
    seed : int, optional
        Seed of the NumPy generator that draws ``c`` (if not given) and then
        the tangents in ``wrt`` order, all standard normal.
    name : str, optional
        Name of the operation in messages.  Default ``f.__name__``.

    Returns
    -------
    VJPCheck
        The two sides of the identity, the scale and the tolerances used.

    Raises
    ------
    AssertionError
        If the gradients are malformed, or the identity fails.  After an
        identity failure every gradient is compared element by element with
        :func:`numerical_vjp` (tolerance ``atol + rtol * max|numeric|``), and the
        message lists each argument that differs with its worst element index
        and the analytic and numeric values there.

    Examples
    --------
    >>> import numpy as np
    >>> from condconv_ref.testing import check_vjp
    >>> def f(x, w):
    ...     return np.tanh(x @ w)
    >>> def f_vjp(cotangent, x, w):
    ...     g = cotangent * (1 - np.tanh(x @ w) ** 2)
    ...     return {"x": g @ w.T, "w": x.T @ g}
    >>> rng = np.random.default_rng(0)
    >>> args = {"x": rng.normal(size=(2, 3)), "w": rng.normal(size=(3, 4))}
    >>> result = check_vjp(f, f_vjp, args)
    >>> def wrong_vjp(cotangent, x, w):
    ...     grads = f_vjp(cotangent, x, w)
    ...     return {"x": grads["x"], "w": 1.01 * grads["w"]}
    >>> try:
    ...     check_vjp(f, wrong_vjp, args)
    ... except AssertionError as error:
    ...     print(str(error).splitlines()[1].split(":")[0].strip())
    argument 'w'
    """
    op = name or _op_name(f)
    for tolerance, value in (("rtol", rtol), ("atol", atol)):
        if value is not None:
            check_tolerance("check_vjp", tolerance, value)
    xp = namespace(op, **args)
    names = _check_names(op, args, args if wrt is None else wrt, "wrt")
    rng = numpy.random.default_rng(seed)
    output = f(**args)
    if cotangent is None:
        cotangent = _random_like(output, rng, xp=xp)
    _check_like(op, "cotangent", cotangent, output, "the output of f")
    tangents = {arg_name: _random_like(args[arg_name], rng, xp=xp) for arg_name in names}
    gradients = f_vjp(cotangent, **args)
    _check_gradients(op, gradients, args, names, xp=xp)
    jvp = numerical_jvp(f, args, tangents, step=step)
    result = _identity_check(op, output, gradients, tangents, cotangent, jvp, rtol, atol, xp=xp)
    if not result.error <= result.atol + result.rtol * result.scale:
        raise AssertionError(_failure_message(result, f, args, gradients, cotangent, names, step))
    return result
