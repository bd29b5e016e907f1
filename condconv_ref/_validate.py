"""Input validation shared by every public op: the bottom layer of the package.

Every public function validates its arguments with these checks, once, at the
public boundary, before any work starts.  :func:`namespace` is the one place
in the package that resolves an array namespace (each public call resolves it
exactly once); :class:`ConvOptions` is the one type that carries a
convolution's options, and :func:`conv_geometry` resolves it per spatial axis.
Messages name the public function and the argument, and say what was expected
and what was received, e.g.::

    condconv: experts has 4 dims, expected 5 for 2-D input (E, O, I/groups, kh, kw)

Nothing in this module imports from the rest of the package.
"""

from __future__ import annotations

import contextvars
import functools
import inspect
import math
import numbers
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Any, TypeVar

import array_api_compat
import numpy

__all__ = [
    "ConvGeometry",
    "ConvOptions",
    "PADDING_MODES",
    "any_array",
    "check_finite_positive",
    "check_tolerance",
    "check_groups",
    "check_ndim",
    "check_nonempty",
    "check_positive_int",
    "check_shape",
    "check_tangent_shapes",
    "conv_geometry",
    "itemsize",
    "namespace",
    "public_op",
    "spatial_tuple",
    "tangent_arrays",
    "tangent_names",
    "tangent_namespace",
    "widened_elements",
]

PADDING_MODES = ("zeros", "reflect", "replicate", "circular")
SPATIAL_LETTERS = {1: ("kw",), 2: ("kh", "kw"), 3: ("kd", "kh", "kw")}


def _describe(a: Any) -> str:
    return type(a).__module__.split(".")[0] + "." + type(a).__qualname__


_PLAIN_NUMPY = (numpy.memmap,)  # the one ndarray subclass that behaves as a plain array


def any_array(fn: str, name: str, value: Any) -> Any:
    """``value`` as an array of the array API: as it is when it is one (or None), else read
    through DLPack (without a copy where the producer allows) or NumPy's ``__array__`` (a
    TensorFlow tensor, say) as a NumPy array; a ``TypeError`` naming ``fn`` and ``name``
    for anything else."""
    if value is None or _is_array(value):
        return value
    if hasattr(value, "__dlpack__"):
        try:
            return numpy.from_dlpack(value)
        except (BufferError, TypeError, RuntimeError, ValueError):
            pass  # e.g. on a device NumPy cannot read: __array__ copies it to the host
    if hasattr(value, "__array__"):
        return numpy.asarray(value)
    raise TypeError(f"{fn}: {name} must be an array (of the array API, or readable through "
                    f"DLPack or NumPy's __array__), got {type(value).__name__}")


def namespace(fn: str, **arrays: Any) -> ModuleType:
    """Return the one array namespace shared by ``arrays`` (``None`` entries skipped).

    Checks that every entry is an array (a plain NumPy array, not a subclass
    such as ``numpy.ma.MaskedArray``, whose mask the array API would ignore),
    that all share one namespace and one device, and that all have the same
    real floating dtype.
    """
    present = {name: a for name, a in arrays.items() if a is not None}
    for name, a in present.items():
        if not _is_array(a):
            raise TypeError(f"{fn}: {name} must be an array, got {_describe(a)}")
        if isinstance(a, numpy.ndarray) and not isinstance(a, _PLAIN_NUMPY) \
                and type(a) is not numpy.ndarray:
            raise TypeError(
                f"{fn}: {name} is a {type(a).__module__}.{type(a).__qualname__}, expected a plain "
                "numpy.ndarray (a subclass such as a masked array or a matrix changes what "
                "NumPy's operations mean; pass numpy.asarray of the values you mean)")
    try:
        xp = array_api_compat.array_namespace(*present.values())
    except TypeError as exc:
        kinds = ", ".join(f"{name} is {_describe(a)}" for name, a in present.items())
        raise TypeError(
            f"{fn}: all arrays must come from one array namespace, got {kinds}"
        ) from exc
    first_name, first = next(iter(present.items()))
    first_device = array_api_compat.device(first)
    for name, a in present.items():
        if not _cached(_REAL_FLOATING, (xp, type(a.dtype), a.dtype),
                       lambda: bool(xp.isdtype(a.dtype, "real floating"))):
            raise TypeError(f"{fn}: {name} has dtype {a.dtype}, expected a real floating dtype")
        if a.dtype != first.dtype:
            raise TypeError(
                f"{fn}: {name} has dtype {a.dtype} but {first_name} has {first.dtype}; "
                "all arrays must share one floating dtype (no implicit promotion)"
            )
        if array_api_compat.device(a) != first_device:
            raise ValueError(
                f"{fn}: {name} is on device {array_api_compat.device(a)} but {first_name} is on "
                f"{first_device}; all arrays must be on one device"
            )
    return xp


def itemsize(a: Any, *, xp: ModuleType) -> int:
    """Bytes per element of the floating array ``a``."""
    return xp.finfo(a.dtype).bits // 8


def check_nonempty(fn: str, **arrays: Any) -> None:
    """Raise ``ValueError`` if any of ``arrays`` (``None`` entries skipped) has a zero-size axis.

    Ops call it after their specific checks (which give better messages for,
    e.g., ``E = 0``): an empty array would make an empty output or a
    meaningless one (the mean of no pixels), so it is rejected, never computed.
    """
    for name, a in arrays.items():
        if a is not None and 0 in tuple(a.shape):
            raise ValueError(f"{fn}: {name} has shape {tuple(a.shape)}, expected every axis to "
                             "have size >= 1 (no empty arrays)")


def check_ndim(fn: str, name: str, a: Any, expected: int | Sequence[int], layout: str) -> None:
    """Raise ``ValueError`` unless ``a.ndim`` is ``expected`` (or one of them)."""
    allowed = (expected,) if isinstance(expected, int) else tuple(expected)
    if a.ndim not in allowed:
        want = " or ".join(str(n) for n in allowed)
        raise ValueError(f"{fn}: {name} has {a.ndim} dims, expected {want} {layout}")


def check_shape(fn: str, name: str, a: Any, expected: Sequence[int], layout: str) -> None:
    """Raise ``ValueError`` unless ``a.shape`` equals ``expected``."""
    if tuple(a.shape) != tuple(expected):
        raise ValueError(
            f"{fn}: {name} has shape {tuple(a.shape)}, expected {tuple(expected)} {layout}"
        )


def tangent_arrays(fn: str, tangents: Any, arrays: Mapping[str, Any]) -> dict[str, Any]:
    """The tangents of a ``*_jvp`` call by argument name, after checking their keys.

    ``tangents`` must be a mapping whose keys are names of ``arrays`` given
    (not ``None``): the keys of the op's VJP.  A missing key, or one mapped
    to ``None``, means a zero tangent and is left out of the result.
    """
    if not isinstance(tangents, Mapping):
        raise TypeError(f"{fn}: tangents must be a mapping of arrays keyed like the VJP's "
                        f"gradients, got {_describe(tangents)}")
    allowed = sorted(name for name, a in arrays.items() if a is not None)
    unknown = sorted(repr(name) for name in tangents if name not in allowed)
    if unknown:
        raise ValueError(f"{fn}: tangents has unknown keys [{', '.join(unknown)}], expected "
                         f"keys from {allowed} (the gradients of the VJP)")
    return {name: t for name, t in tangents.items() if t is not None}


def tangent_names(tangents: Mapping[str, Any]) -> dict[str, Any]:
    """``tangents`` keyed ``tangents['x']`` etc., the names :func:`namespace` reports."""
    return {f"tangents[{name!r}]": t for name, t in tangents.items()}


def tangent_namespace(fn: str, tangents: Any, arrays: Mapping[str, Any], cotangent: Any = None
                      ) -> tuple[dict[str, Any], ModuleType]:
    """A JVP's (or, with its ``cotangent``, an HVP's) tangents checked against its ``arrays``
    (:func:`tangent_arrays`), and the one namespace of the arrays, the tangents and the
    cotangent together (:func:`namespace`)."""
    tangents = tangent_arrays(fn, tangents, arrays)
    return tangents, namespace(fn, **arrays, **tangent_names(tangents), cotangent=cotangent)


def check_tangent_shapes(fn: str, tangents: Mapping[str, Any], arrays: Mapping[str, Any]) -> None:
    """Raise ``ValueError`` unless every tangent has the shape of its argument in ``arrays``."""
    for name, t in tangents.items():
        check_shape(fn, f"tangents[{name!r}]", t, tuple(arrays[name].shape),
                    f"(the shape of {name})")


def check_groups(fn: str, name: str, channels: int, out_channels: int, in_per_group: int,
                 groups: int) -> None:
    """Check that ``groups`` divides the channels and that ``name`` has C/groups inputs."""
    if channels % groups or out_channels % groups:
        raise ValueError(
            f"{fn}: groups={groups} must divide both the input channels ({channels}) "
            f"and the output channels ({out_channels})"
        )
    if in_per_group != channels // groups:
        raise ValueError(
            f"{fn}: {name} has {in_per_group} input channels per group, expected "
            f"{channels // groups} (C={channels} / groups={groups})"
        )


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_positive_int(fn: str, name: str, value: Any, minimum: int = 1) -> int:
    """Return ``value`` as an ``int`` if it is an integer ``>= minimum``."""
    if not _is_int(value):
        raise TypeError(f"{fn}: {name} must be an int, got {value!r}")
    if value < minimum:
        raise ValueError(f"{fn}: {name} must be >= {minimum}, got {value}")
    return int(value)


def check_finite_positive(fn: str, name: str, value: Any) -> float:
    """Return ``value`` as a ``float`` if it is a finite real number ``> 0``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{fn}: {name} must be a real number, got {value!r}")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{fn}: {name} must be finite and > 0, got {value!r}")
    return float(value)


def check_tolerance(fn: str, name: str, value: Any) -> float:
    """Return ``value`` as a ``float`` if it is a finite real number ``>= 0`` (a tolerance)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{fn}: {name} must be a real number, got {value!r}")
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{fn}: {name} must be finite and >= 0, got {value!r}")
    return float(value)


def spatial_tuple(fn: str, name: str, value: Any, nd: int, minimum: int) -> tuple[int, ...]:
    """Expand an int or a length-``nd`` sequence of ints, each ``>= minimum``."""
    if _is_int(value):
        items = (value,) * nd
    elif isinstance(value, Sequence) and not isinstance(value, str):
        items = tuple(value)
        if len(items) != nd or not all(_is_int(v) for v in items):
            raise TypeError(
                f"{fn}: {name} must be an int or {nd} ints (one per spatial dim), got {value!r}"
            )
    else:
        raise TypeError(
            f"{fn}: {name} must be an int or {nd} ints (one per spatial dim), got {value!r}"
        )
    if any(v < minimum for v in items):
        raise ValueError(f"{fn}: {name} must be >= {minimum} in every spatial dim, got {value!r}")
    return tuple(int(v) for v in items)


@dataclass(frozen=True)
class ConvOptions:
    """A convolution's options as the caller gave them (:func:`condconv_ref.conv` documents them).

    :meth:`geometry` validates them against the shapes of one call.
    """

    stride: Any = 1
    padding: Any = 0
    dilation: Any = 1
    groups: Any = 1
    padding_mode: Any = "zeros"

    def geometry(self, fn: str, spatial: Sequence[int], kernel: Sequence[int]) -> ConvGeometry:
        """The options validated and resolved per spatial axis (:func:`conv_geometry`).

        Options made of plain ints, strings, tuples and lists are resolved
        once per shape and remembered (a property test calls with the same
        few options thousands of times); anything else is resolved every time.
        """
        fields = (self.stride, self.padding, self.dilation, self.groups, self.padding_mode)
        if not all(_plain(value) for value in fields):
            return self._resolve(fn, spatial, kernel)
        # repr tells 1 from True and 1.0, which compare (and hash) equal.
        key = (fn, tuple(spatial), tuple(kernel), repr(fields))
        geometry = _GEOMETRIES.get(key)
        if geometry is None:
            geometry = self._resolve(fn, spatial, kernel)
            if len(_GEOMETRIES) >= 1024:
                _GEOMETRIES.clear()
            _GEOMETRIES[key] = geometry
        return geometry

    def _resolve(self, fn: str, spatial: Sequence[int], kernel: Sequence[int]) -> ConvGeometry:
        return conv_geometry(fn, spatial, kernel, stride=self.stride, padding=self.padding,
                             dilation=self.dilation, groups=self.groups,
                             padding_mode=self.padding_mode)


_GEOMETRIES: dict[tuple[Any, ...], ConvGeometry] = {}
"""Resolved geometries of plain options, by function, shapes and the options' repr."""


def _plain(value: Any) -> bool:
    """Whether ``value`` is an int, a str, or a tuple or list of plain values (exact types)."""
    kind = type(value)
    return kind is int or kind is str or (kind in (tuple, list) and all(map(_plain, value)))


@dataclass(frozen=True)
class ConvGeometry:
    """Resolved per-axis options of one convolution.

    ``padding`` holds one ``(before, after)`` pair per spatial dim; ``out`` is
    the spatial output shape.
    """

    stride: tuple[int, ...]
    dilation: tuple[int, ...]
    padding: tuple[tuple[int, int], ...]
    padding_mode: str
    groups: int
    out: tuple[int, ...]

    @property
    def padded(self) -> bool:
        return any(before or after for before, after in self.padding)


def _same_padding(size: int, k: int, s: int, d: int) -> tuple[int, int]:
    # TensorFlow 'SAME': output size ceil(n / s); the odd element goes at the end.
    total = max((math.ceil(size / s) - 1) * s + (k - 1) * d + 1 - size, 0)
    return total // 2, total - total // 2


def _padding_pairs(
    fn: str, padding: Any, spatial: Sequence[int], kernel: Sequence[int],
    stride: Sequence[int], dilation: Sequence[int],
) -> tuple[tuple[int, int], ...]:
    nd = len(spatial)
    if isinstance(padding, str):
        if padding == "valid":
            return ((0, 0),) * nd
        if padding == "same":
            return tuple(_same_padding(*args) for args in zip(spatial, kernel, stride, dilation))
        raise ValueError(f"{fn}: padding must be 'valid', 'same', an int or per-dim ints/pairs, got {padding!r}")
    if (
        isinstance(padding, Sequence)
        and len(padding) == nd
        and all(isinstance(p, Sequence) and not isinstance(p, str) for p in padding)
    ):
        pairs = tuple(tuple(p) for p in padding)
        if not all(len(p) == 2 and all(_is_int(v) for v in p) for p in pairs):
            raise TypeError(f"{fn}: padding pairs must be (before, after) ints, got {padding!r}")
        if any(v < 0 for p in pairs for v in p):
            raise ValueError(f"{fn}: padding must be >= 0, got {padding!r}")
        return tuple((int(b), int(a)) for b, a in pairs)
    per_dim = spatial_tuple(fn, "padding", padding, nd, minimum=0)
    return tuple((p, p) for p in per_dim)


def conv_geometry(
    fn: str, spatial: Sequence[int], kernel: Sequence[int], *,
    stride: Any, padding: Any, dilation: Any, groups: Any, padding_mode: Any,
) -> ConvGeometry:
    """Validate the convolution options and resolve them per spatial axis."""
    nd = len(spatial)
    stride_t = spatial_tuple(fn, "stride", stride, nd, minimum=1)
    dilation_t = spatial_tuple(fn, "dilation", dilation, nd, minimum=1)
    groups_i = check_positive_int(fn, "groups", groups)
    if padding_mode not in PADDING_MODES:
        raise ValueError(f"{fn}: padding_mode must be one of {PADDING_MODES}, got {padding_mode!r}")
    pairs = _padding_pairs(fn, padding, spatial, kernel, stride_t, dilation_t)
    for axis, ((before, after), size) in enumerate(zip(pairs, spatial)):
        if padding_mode == "reflect" and max(before, after) >= size:
            raise ValueError(
                f"{fn}: reflect padding {(before, after)} on spatial dim {axis} must be smaller "
                f"than the input size {size}"
            )
        if padding_mode == "circular" and max(before, after) > size:
            raise ValueError(
                f"{fn}: circular padding {(before, after)} on spatial dim {axis} must be at most "
                f"the input size {size}"
            )
    out = []
    for axis, (size, k, s, d, (before, after)) in enumerate(
        zip(spatial, kernel, stride_t, dilation_t, pairs)
    ):
        span = d * (k - 1) + 1
        padded = size + before + after
        if padded < span:
            raise ValueError(
                f"{fn}: padded input size {padded} on spatial dim {axis} is smaller than the "
                f"dilated kernel extent {span}; the output would be empty (x has size {size}, "
                f"padding {(before, after)}, dilation {d}, kernel size {k})"
            )
        out.append((padded - span) // s + 1)
    return ConvGeometry(stride_t, dilation_t, pairs, padding_mode, groups_i, tuple(out))


def kernel_layout(nd: int, prefix: str) -> str:
    """Human-readable layout like ``(E, O, I/groups, kh, kw)`` for messages."""
    letters = ", ".join(SPATIAL_LETTERS.get(nd, tuple(f"k{i}" for i in range(nd))))
    return f"for {nd}-D input ({prefix}, {letters})"


# ---------------------------------------------------------------- the public boundary

F = TypeVar("F", bound=Callable[..., Any])


# Per-type and per-dtype answers of the checks every public call makes: these
# depend only on the type (or dtype), and computing them is most of the fixed
# cost of a small call.
_ARRAY_TYPES: dict[type, bool] = {}
_FLOAT16_DTYPES: dict[Any, bool] = {}
_REAL_FLOATING: dict[tuple[ModuleType, type, Any], bool] = {}


def _is_array(a: Any) -> bool:
    kind = type(a)
    known = _ARRAY_TYPES.get(kind)
    if known is not None:
        return known
    answer = array_api_compat.is_array_api_obj(a) and not isinstance(a, (bool, int, float, complex))
    if not kind.__module__.startswith("jax"):  # JAX's float0 arrays are not arrays: per value
        _ARRAY_TYPES[kind] = answer
    return answer


def _cached(table: dict[Any, bool], key: Any, compute: Callable[[], bool]) -> bool:
    """``table[key]``, computed once; an unhashable key is computed every time."""
    try:
        return table[key]
    except KeyError:
        answer = table[key] = compute()
        return answer
    except TypeError:
        return compute()


def _is_float16(a: Any) -> bool:
    """Whether ``a`` is float16, read from its dtype's name (``float16``, ``torch.float16``).

    No namespace is resolved here: :func:`namespace` does that once per call.
    """
    # Keyed with the dtype's type first: dtypes of different libraries must not
    # be compared (array-api-strict warns when they are).
    return _cached(_FLOAT16_DTYPES, (type(a.dtype), a.dtype),
                   lambda: str(a.dtype).rpartition(".")[2] == "float16")


def _map_arrays(value: Any, convert: Callable[[Any], Any]) -> Any:
    """``value`` with ``convert`` applied to it if it is an array, or to each array of a mapping."""
    if _is_array(value):
        return convert(value)
    if isinstance(value, Mapping):
        return {k: convert(v) if _is_array(v) else v for k, v in value.items()}
    return value


def _binder(fn: str, signature: inspect.Signature
            ) -> Callable[[tuple[Any, ...], dict[str, Any]], list[Any]]:
    """``bind(args, kwargs)``: the values given, after checking the call against ``signature``.

    Raises ``TypeError`` naming ``fn`` for a call the signature rejects, or a
    required argument given as ``None``.  A call that names its arguments as
    the signature allows is checked with set arithmetic;
    ``Signature.bind`` (several times slower) only words the error.
    """
    parameters = signature.parameters.values()
    positional = [p.name for p in parameters if p.kind is p.POSITIONAL_OR_KEYWORD]
    keywords = {p.name for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    required = {p.name for p in parameters if p.default is inspect.Parameter.empty
                and p.kind in (p.POSITIONAL_OR_KEYWORD, p.POSITIONAL_ONLY, p.KEYWORD_ONLY)}
    simple = all(p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) for p in parameters)

    def slow(args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
        try:
            return signature.bind(*args, **kwargs).arguments
        except TypeError as exc:
            raise TypeError(f"{fn}: {exc}") from None

    def bind(args: tuple[Any, ...], kwargs: dict[str, Any]) -> list[Any]:
        names = positional[:len(args)]
        if (not simple or len(args) > len(positional) or not kwargs.keys() <= keywords
                or not kwargs.keys().isdisjoint(names)
                or not required <= kwargs.keys() | set(names)):
            given = slow(args, kwargs)
        else:
            given = {**dict(zip(names, args)), **kwargs}
        for name, value in given.items():
            if value is None and name in required:
                raise TypeError(f"{fn}: {name} is required, got None")
        return list(given.values())

    return bind


_WIDENED: contextvars.ContextVar[int] = contextvars.ContextVar("widened", default=0)


def widened_elements() -> int:
    """Elements of the float32 copies :func:`public_op` made of the current call's float16
    inputs (0 outside such a call): :func:`condconv_ref.memory.check_memory` counts them."""
    return _WIDENED.get()


def public_op(function: F) -> F:
    """Decorate a public op or VJP: the checks and the precision policy of the public boundary.

    * Arguments are bound to the signature first; a bad call raises
      ``TypeError`` naming the function, and a required argument given as
      ``None`` raises ``TypeError`` (``None`` means "absent" only for optional
      arrays such as ``bias``).
    * **float16 is computed in float32.**  When every array argument (those in
      a ``params`` mapping included) is float16, they are converted to float32,
      the op runs, and its result (or each gradient of a VJP) is rounded back
      to float16 once.  Sums thus accumulate in float32, and the result has
      the inputs' dtype.  A call mixing float16 with another dtype is left to
      :func:`namespace`, which rejects it.  The float32 copies count against the
      memory budget (:func:`widened_elements`).

    The op itself validates everything else, with :func:`namespace` first.
    """
    fn = function.__name__
    bind = _binder(fn, inspect.signature(function))

    @functools.wraps(function)
    def boundary(*args: Any, **kwargs: Any) -> Any:
        arrays = [a for value in bind(args, kwargs)
                  for a in (value.values() if isinstance(value, Mapping) else (value,))
                  if _is_array(a)]
        if not arrays or not all(_is_float16(a) for a in arrays):
            return function(*args, **kwargs)
        # float16 only: one more resolution, to convert (the op resolves its own once).
        try:
            xp = array_api_compat.array_namespace(*arrays)
        except TypeError:  # several namespaces: the op's call to namespace() says so
            return function(*args, **kwargs)

        def widen(a: Any) -> Any:
            return _map_arrays(a, lambda a: xp.astype(a, xp.float32))

        copies = _WIDENED.set(sum(math.prod(a.shape) for a in arrays))
        try:
            result = function(*map(widen, args), **{k: widen(v) for k, v in kwargs.items()})
        finally:
            _WIDENED.reset(copies)
        return _map_arrays(result, lambda a: xp.astype(a, xp.float16))

    return boundary  # type: ignore[return-value]
