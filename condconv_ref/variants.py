r"""The registry of variants: what "one case of variant V" is, how to build one, and its reference.

A :class:`Case` is everything one call of a reference op needs, as plain data:
float64 NumPy arrays under the op's own argument names (``x``, ``experts``,
``routing``, ``bias``, ``route_weight``, ``fc1_weight``, ...; absent optional
ones left out), the keyword options (conv options, ``depth_multiplier``,
``temperature``), and the longest sums of the forward and backward passes (for
rounding tolerances).  :data:`VARIANTS` maps each variant name to a
:class:`Variant`: its reference op and VJP, and the builder that makes a case
from a :class:`~condconv_ref.testing.ConvConfig` and a seed.  The same seed
and configuration give the same case everywhere: in ``condconv-ref verify``,
in golden vectors, and in :func:`condconv_ref.testing.check_implementation`.

Variants
--------
``condconv`` and ``depthwise_condconv`` (external routing weights, as the
convolutions of an EfficientNet-CondConv block take them), ``condconv_layer``,
``depthwise_condconv_layer``, ``cond_linear_layer``, ``dynamic_conv_layer``,
``odconv_layer`` are the layers users check (:data:`LAYER_VARIANTS`); the raw
ops ``conv``, ``mix_experts``, ``route_sigmoid``, ``route_softmax``,
``moe_condconv``, ``cond_linear`` and ``moe_cond_linear`` are there for the
library's own checks.

A *layer* variant is called as ``op(x, params, **options)`` with every array
but ``x`` in ``params``; the others as ``op(**arrays, **options)``.  The
linear variants read a configuration as B, F_in = C, F_out = O and E (its
spatial fields are ignored); the depthwise ones need ``groups == C``.

Nothing here imports hypothesis: configurations and their arrays are plain
data (:class:`~condconv_ref.testing.ConvConfig`,
:func:`~condconv_ref.testing.arrays_for`), so cases build, and the references
run, without it.

Examples
--------
>>> from condconv_ref.testing import ConvConfig
>>> from condconv_ref.variants import build_case, reference_forward, reference_vjp
>>> config = ConvConfig(batch=2, in_channels=3, out_channels=4, groups=1, spatial=(6,),
...                     kernel=(3,), stride=(1,), dilation=(1,), padding=1,
...                     padding_mode="zeros", n_experts=2, bias=True)
>>> case = build_case("condconv_layer", config, seed=0)
>>> sorted(case.arrays), case.options["padding"]
(['bias', 'experts', 'route_bias', 'route_weight', 'x'], 1)
>>> y = reference_forward(case)
>>> y.shape, y.dtype
((2, 4, 6), dtype('float64'))
>>> sorted(reference_vjp(case, y))
['bias', 'experts', 'route_bias', 'route_weight', 'x']
>>> case.geometry.padding, case.geometry.out
(((1, 1),), (6,))
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from condconv_ref._cases import CondConvArrays, ConvConfig, Supports, arrays_for
from condconv_ref._validate import ConvGeometry, conv_geometry
from condconv_ref.backends import Backend, get_backend, to_numpy
from condconv_ref.condconv import (
    condconv,
    condconv_jvp,
    condconv_layer,
    condconv_layer_hvp,
    condconv_layer_jvp,
    condconv_layer_vjp,
    condconv_vjp,
    mix_experts,
    mix_experts_jvp,
    mix_experts_vjp,
    moe_condconv,
    moe_condconv_jvp,
    moe_condconv_vjp,
)
from condconv_ref.conv import conv, conv_jvp, conv_vjp
from condconv_ref.depthwise import (
    depthwise_condconv,
    depthwise_condconv_jvp,
    depthwise_condconv_layer,
    depthwise_condconv_layer_hvp,
    depthwise_condconv_layer_jvp,
    depthwise_condconv_layer_vjp,
    depthwise_condconv_vjp,
)
from condconv_ref.dynamic import (
    dynamic_conv_layer,
    dynamic_conv_layer_hvp,
    dynamic_conv_layer_jvp,
    dynamic_conv_layer_vjp,
)
from condconv_ref.linear import (
    cond_linear,
    cond_linear_jvp,
    cond_linear_layer,
    cond_linear_layer_hvp,
    cond_linear_layer_jvp,
    cond_linear_layer_vjp,
    cond_linear_vjp,
    moe_cond_linear,
    moe_cond_linear_jvp,
    moe_cond_linear_vjp,
)
from condconv_ref._attention import BUFFERS, HEADS
from condconv_ref.odconv import odconv_layer, odconv_layer_hvp, odconv_layer_jvp, odconv_layer_vjp
from condconv_ref.routing import (
    route_sigmoid,
    route_sigmoid_jvp,
    route_sigmoid_vjp,
    route_softmax,
    route_softmax_jvp,
    route_softmax_vjp,
)

__all__ = [
    "LAYER_VARIANTS",
    "ODCONV_TEMPERATURE_RANGE",
    "TEMPERATURE_RANGE",
    "VARIANTS",
    "Case",
    "Variant",
    "bind",
    "build_case",
    "hvp_variants",
    "reference_forward",
    "reference_hvp",
    "reference_jvp",
    "reference_vjp",
    "unsupported",
]

TEMPERATURE_RANGE = (0.5, 4.0)
"""The softmax temperatures a seed draws from (log-uniformly) when none is given."""

ODCONV_TEMPERATURE_RANGE = (1e-3, 1e3)
"""The temperatures an ``odconv_layer`` case draws from (log-uniformly) when none is given:
from heads that are almost step functions to heads that are almost constant."""

_KINK_MARGIN = 0.05
_CONV_OPTIONS = ("stride", "padding", "dilation", "groups", "padding_mode")


# ---------------------------------------------------------------- records


@dataclass(frozen=True)
class Case:
    """One call of a variant's reference op, as plain data.

    Attributes
    ----------
    variant : str
        A key of :data:`VARIANTS`.
    arrays : dict of str to array
        The op's array arguments by name, absent optional ones left out;
        float64 NumPy arrays as built (:meth:`to` converts them).
    options : dict
        The keyword options, e.g. ``stride``, ``padding``, ``dilation``,
        ``groups``, ``padding_mode``, ``depth_multiplier``, ``temperature``.
    lengths : tuple of int
        The longest sums in the forward and in the VJP, for rounding tolerances.
    config : ConvConfig or None
        The configuration it was built from.
    seed : int
        The seed of its arrays.
    dtype : str
        The dtype an implementation under check computes in (set by the
        checker): the arrays' own dtype, or ``'bfloat16'`` for float32 arrays
        holding bfloat16 values, which NumPy cannot hold.

    Examples
    --------
    >>> import array_api_strict
    >>> from condconv_ref.testing import ConvConfig
    >>> from condconv_ref.variants import build_case
    >>> config = ConvConfig(batch=2, in_channels=2, out_channels=4, groups=2, spatial=(5, 5),
    ...                     kernel=(3, 3), stride=(2, 2), dilation=(1, 1), padding="same",
    ...                     padding_mode="reflect", n_experts=3, bias=False)
    >>> case = build_case("depthwise_condconv_layer", config, seed=1)
    >>> print(case.describe())  # doctest: +NORMALIZE_WHITESPACE
    depthwise_condconv_layer: x (2, 2, 5, 5), experts (3, 4, 1, 3, 3), route_weight (3, 2);
    depth_multiplier=2, stride=(2, 2), padding='same', dilation=(1, 1), padding_mode='reflect'
    >>> case.layer, sorted(case.params), case.lengths
    (True, ['experts', 'route_weight'], (50, 324))
    >>> case.to(array_api_strict, dtype="float32").x.dtype
    array_api_strict.float32
    """

    variant: str
    arrays: dict[str, Any]
    options: dict[str, Any]
    lengths: tuple[int, int]
    config: Any = None
    seed: int = 0
    dtype: str = "float64"
    layer: bool = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "layer", VARIANTS[self.variant].layer)

    @property
    def x(self) -> Any:
        """The input ``x``."""
        return self.arrays["x"]

    @property
    def params(self) -> dict[str, Any]:
        """Every array but ``x``: a layer's ``params`` mapping."""
        return {name: a for name, a in self.arrays.items() if name != "x"}

    @property
    def differentiable(self) -> list[str]:
        """The names of the arrays the VJP returns a gradient for: all but the variant's
        buffers (``odconv_layer``'s batch-norm running statistics)."""
        buffers = VARIANTS[self.variant].buffers
        return [name for name in self.arrays if name not in buffers]

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        """The shape of every array, by name."""
        return {name: tuple(a.shape) for name, a in self.arrays.items()}

    @property
    def geometry(self) -> ConvGeometry | None:
        """The conv options resolved per spatial dim (padding as ``(before, after)`` pairs,
        output size), or None for a variant without a kernel (linear, mixing, routing)."""
        kernel = self.arrays.get("experts", self.arrays.get("kernel"))
        if kernel is None or VARIANTS[self.variant].linear:
            return None
        nd = self.x.ndim - 2
        options = {name: self.options[name] for name in _CONV_OPTIONS if name in self.options}
        options.setdefault("groups", 1)
        return conv_geometry(self.variant, tuple(self.x.shape[2:]), tuple(kernel.shape[-nd:]),
                             **options)

    def to(self, xp: Any, *, dtype: Any = "float64", device: Any = None) -> Case:
        """This case with its arrays in namespace ``xp`` as ``dtype`` on ``device``."""
        xp_dtype = getattr(xp, dtype) if isinstance(dtype, str) else dtype
        arrays = {name: xp.asarray(np.asarray(to_numpy(a), dtype=np.float64), dtype=xp_dtype,
                                   device=device)
                  for name, a in self.arrays.items()}
        return replace(self, arrays=arrays)

    def arrays_on(self, backend: str | Backend | None = None,
                  dtype: str = "float64") -> dict[str, Any]:
        """The arrays copied onto ``backend`` (default NumPy) and rounded to ``dtype``."""
        chosen = _backend(backend)
        return {name: chosen.asarray(to_numpy(a), dtype=dtype) for name, a in self.arrays.items()}

    def cotangent(self, shape: tuple[int, ...], dtype: str = "float64") -> np.ndarray:
        """The case's fixed cotangent for an output of ``shape``: standard normal draws from
        the case's own stream, rounded to ``dtype``.  The checker, the golden-vector writer
        and the GPU check all use it, so one case gets one cotangent everywhere."""
        return _rng(self.seed, _COTANGENT_STREAM).standard_normal(shape).astype(dtype)

    def tangents(self, dtype: str = "float64") -> dict[str, np.ndarray]:
        """The case's fixed tangents, one per :attr:`differentiable` array (not the buffers):
        standard normal draws from the case's own stream, rounded to ``dtype``.  The checker
        hands them to an implementation's ``jvp``."""
        rng = _rng(self.seed, _TANGENT_STREAM)
        return {name: rng.standard_normal(tuple(self.arrays[name].shape)).astype(dtype)
                for name in self.differentiable}

    def describe(self) -> str:
        """One line: the variant, every array's shape and the options."""
        shapes = ", ".join(f"{name} {shape}" for name, shape in self.shapes.items())
        options = ", ".join(f"{name}={value!r}" for name, value in self.options.items())
        return f"{self.variant}: {shapes}" + (f"; {options}" if options else "")


@dataclass(frozen=True)
class Variant:
    """One registry entry: the reference op of a variant, its VJP and its case builder.

    ``build(config, seed, temperature)`` returns the :class:`Case`'s arrays,
    options and lengths; ``layer`` says the op takes ``(x, params)``;
    ``depthwise`` that its configurations need ``groups == C``; ``linear``
    that it reads only B, C, O, E and ``bias`` of a configuration;
    ``temperature`` that it has a softmax temperature option; ``buffers`` names the
    arrays it reads but does not differentiate (no gradient is returned for them);
    ``jvp`` is its Jacobian-vector product, ``jvp(tangents, <the op's arguments>)``, or
    None where the library has none yet; ``hvp`` its Hessian-vector product,
    ``hvp(cotangent, tangents, x, params, **options)``, for the layers that have one;
    ``optional`` names the arrays a case may leave
    out (each switched by :meth:`~condconv_ref.testing.ConvConfig.has`).

    Examples
    --------
    >>> from condconv_ref.variants import VARIANTS
    >>> entry = VARIANTS["dynamic_conv_layer"]
    >>> entry.forward.__name__, entry.vjp.__name__
    ('dynamic_conv_layer', 'dynamic_conv_layer_vjp')
    >>> entry.layer, entry.depthwise, entry.linear, entry.temperature
    (True, False, False, True)
    """

    name: str
    forward: Callable[..., Any]
    vjp: Callable[..., Any]
    build: Callable[..., tuple[dict[str, Any], dict[str, Any], tuple[int, int]]]
    layer: bool = False
    depthwise: bool = False
    linear: bool = False
    temperature: bool = False
    buffers: tuple[str, ...] = ()
    jvp: Callable[..., Any] | None = None
    optional: tuple[str, ...] = ()
    hvp: Callable[..., Any] | None = None

    @property
    def takes_values(self) -> bool:
        """Whether ``build`` also takes ``values``, arrays drawn value by value
        (:func:`build_case`); otherwise its arrays always come from the seed."""
        return "values" in inspect.signature(self.build).parameters


def bind(op: Callable[..., Any], case: Case, *, vjp: bool = False) -> Callable[..., Any]:
    """``op`` as a function of ``case``'s arrays by keyword (after the cotangent for a VJP).

    Examples
    --------
    >>> import numpy as np
    >>> from condconv_ref import mix_experts
    >>> case = Case("mix_experts", {"routing": np.ones((1, 2)), "experts": np.ones((2, 3))},
    ...             {}, (2, 2))
    >>> bind(mix_experts, case)(**case.arrays)
    array([[2., 2., 2.]])
    """
    options = case.options
    if case.layer:
        if vjp:
            return lambda cotangent, x, **params: op(cotangent, x, params, **options)
        return lambda x, **params: op(x, params, **options)
    if vjp:
        return lambda cotangent, **arrays: op(cotangent, **arrays, **options)
    return lambda **arrays: op(**arrays, **options)


def _backend(backend: str | Backend | None) -> Backend:
    if backend is None:
        return get_backend("numpy")
    return get_backend(backend) if isinstance(backend, str) else backend


def reference_forward(case: Case, backend: str | Backend | None = None,
                      dtype: str = "float64") -> Any:
    """The reference output of ``case``, computed on ``backend`` (default NumPy) in ``dtype``.

    Examples
    --------
    >>> from condconv_ref.testing import ConvConfig
    >>> from condconv_ref.variants import build_case, reference_forward
    >>> config = ConvConfig(batch=2, in_channels=2, out_channels=4, groups=2, spatial=(5, 5),
    ...                     kernel=(3, 3), stride=(2, 2), dilation=(1, 1), padding="same",
    ...                     padding_mode="reflect", n_experts=3, bias=False)
    >>> case = build_case("depthwise_condconv_layer", config, seed=1)
    >>> y = reference_forward(case, "array_api_strict", "float32")
    >>> y.shape, y.dtype
    ((2, 4, 3, 3), array_api_strict.float32)
    >>> type(reference_forward(case)).__name__
    'ndarray'
    """
    reference = VARIANTS[case.variant]
    return bind(reference.forward, case)(**case.arrays_on(backend, dtype))


def reference_vjp(case: Case, cotangent: Any, backend: str | Backend | None = None,
                  dtype: str = "float64") -> dict[str, Any]:
    """The reference gradients of ``case`` at ``cotangent`` (any array, copied to ``backend``).

    Examples
    --------
    >>> import numpy as np
    >>> from condconv_ref.testing import ConvConfig
    >>> from condconv_ref.variants import build_case, reference_vjp
    >>> config = ConvConfig(batch=2, in_channels=2, out_channels=4, groups=2, spatial=(5, 5),
    ...                     kernel=(3, 3), stride=(2, 2), dilation=(1, 1), padding="same",
    ...                     padding_mode="reflect", n_experts=3, bias=False)
    >>> case = build_case("depthwise_condconv_layer", config, seed=1)
    >>> gradients = reference_vjp(case, np.ones((2, 4, 3, 3)), "array_api_strict:device1")
    >>> {name: tuple(gradient.shape) for name, gradient in gradients.items()} == case.shapes
    True
    >>> gradients["x"].device
    array_api_strict.Device('device1')
    """
    chosen = _backend(backend)
    reference = VARIANTS[case.variant]
    cotangent = chosen.asarray(to_numpy(cotangent), dtype=dtype)
    return bind(reference.vjp, case, vjp=True)(cotangent, **case.arrays_on(chosen, dtype))


def reference_jvp(case: Case, tangents: Mapping[str, Any], backend: str | Backend | None = None,
                  dtype: str = "float64") -> Any:
    """The reference JVP of ``case`` along ``tangents`` (keyed like the VJP's gradients, absent
    keys zero; any arrays, copied to ``backend``).

    Examples
    --------
    >>> import numpy as np
    >>> from condconv_ref.variants import Case, reference_jvp
    >>> case = Case("mix_experts", {"routing": np.ones((1, 2)), "experts": np.ones((2, 3))},
    ...             {}, (2, 2))
    >>> reference_jvp(case, {"routing": np.array([[1.0, -2.0]])})
    array([[-1., -1., -1.]])
    """
    chosen = _backend(backend)
    reference = VARIANTS[case.variant]
    given = {name: chosen.asarray(to_numpy(t), dtype=dtype) for name, t in tangents.items()}
    return bind(reference.jvp, case, vjp=True)(given, **case.arrays_on(chosen, dtype))


def reference_hvp(case: Case, cotangent: Any, tangents: Mapping[str, Any],
                  backend: str | Backend | None = None, dtype: str = "float64") -> dict[str, Any]:
    """The reference Hessian-vector product of ``case``: the derivative of
    :func:`reference_vjp` at the fixed ``cotangent`` along ``tangents`` (keyed like the
    VJP's gradients, absent keys zero; any arrays, copied to ``backend``), for the
    layers whose registry entry has one (:attr:`Variant.hvp`).

    Raises
    ------
    ValueError
        For a variant without a Hessian-vector product.

    Examples
    --------
    >>> import numpy as np
    >>> from condconv_ref.testing import ConvConfig
    >>> from condconv_ref.variants import build_case, reference_hvp
    >>> config = ConvConfig(batch=1, in_channels=2, out_channels=2, groups=1, spatial=(4,),
    ...                     kernel=(3,), stride=(1,), dilation=(1,), padding=1,
    ...                     padding_mode="zeros", n_experts=2, bias=False)
    >>> case = build_case("condconv_layer", config, seed=1)
    >>> hvp = reference_hvp(case, np.ones((1, 2, 4)), {"x": np.ones((1, 2, 4))})
    >>> {name: tuple(h.shape) for name, h in hvp.items()} == case.shapes
    True
    """
    reference = VARIANTS[case.variant]
    if reference.hvp is None:
        raise ValueError(f"reference_hvp: variant {case.variant!r} has no Hessian-vector "
                         f"product; expected one of {hvp_variants()}")
    chosen = _backend(backend)
    c = chosen.asarray(to_numpy(cotangent), dtype=dtype)
    given = {name: chosen.asarray(to_numpy(t), dtype=dtype) for name, t in tangents.items()}
    arrays = case.arrays_on(chosen, dtype)
    x = arrays.pop("x")
    return reference.hvp(c, given, x, arrays, **case.options)


def hvp_variants() -> list[str]:
    """The variants with a reference Hessian-vector product (:attr:`Variant.hvp`), sorted.

    Examples
    --------
    >>> from condconv_ref.variants import hvp_variants
    >>> "condconv_layer" in hvp_variants(), "conv" in hvp_variants()
    (True, False)
    """
    return sorted(name for name, entry in VARIANTS.items() if entry.hvp is not None)


def build_case(variant: str, config: ConvConfig, seed: int = 0, *,
               temperature: float | None = None, values: CondConvArrays | None = None) -> Case:
    """The case of ``variant`` for ``config``, its arrays drawn from ``seed``.

    Parameters
    ----------
    variant : str
        A key of :data:`VARIANTS`.
    config : ConvConfig
        Sizes and options; depthwise variants need ``config.groups ==
        config.in_channels``.
    seed : int
        Seed of every array (and of the hidden width and, unless given, the
        temperature of softmax routing).
    temperature : float, optional
        The softmax temperature of ``route_softmax`` / ``dynamic_conv_layer``;
        drawn log-uniformly from :data:`TEMPERATURE_RANGE` when None.
    values : CondConvArrays, optional
        The arrays of ``config`` (NumPy, float64) to use instead of those
        :func:`~condconv_ref.testing.arrays_for` draws from ``seed``: what
        :func:`condconv_ref.testing.cases` draws value by value for small
        cases, so that hypothesis shrinks the values too.  The softmax routing
        MLP is still built from ``seed``, clear of its ReLU kinks.

    Raises
    ------
    ValueError
        For an unknown variant, or a depthwise variant on a non-depthwise config.

    Examples
    --------
    >>> import dataclasses
    >>> from condconv_ref.testing import ConvConfig
    >>> from condconv_ref.variants import build_case
    >>> config = ConvConfig(batch=2, in_channels=2, out_channels=4, groups=2, spatial=(5, 5),
    ...                     kernel=(3, 3), stride=(2, 2), dilation=(1, 1), padding="same",
    ...                     padding_mode="reflect", n_experts=3, bias=False)
    >>> case = build_case("dynamic_conv_layer", config, seed=0, temperature=2.0)
    >>> sorted(case.arrays), case.options["temperature"]
    (['experts', 'fc1_weight', 'fc2_weight', 'x'], 2.0)
    >>> build_case("depthwise_condconv", dataclasses.replace(config, groups=1))
    ... # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: build_case: variant 'depthwise_condconv' needs a depthwise config ... groups=1, ...
    """
    if variant not in VARIANTS:
        raise ValueError(f"build_case: variant must be one of {sorted(VARIANTS)}, got {variant!r}")
    entry = VARIANTS[variant]
    if entry.depthwise and not config.is_depthwise:
        raise ValueError(f"build_case: variant {variant!r} needs a depthwise config "
                         f"(groups == in_channels), got groups={config.groups}, "
                         f"in_channels={config.in_channels}")
    if values is None:
        arrays, options, lengths = entry.build(config, seed, temperature)
    elif entry.takes_values:
        arrays, options, lengths = entry.build(config, seed, temperature, values)
    else:
        raise ValueError(f"build_case: variant {variant!r} draws its arrays from the seed "
                         f"only; values must be None")
    return Case(variant, arrays, options, lengths, config, seed)


def _padding_form(padding: Any) -> str:
    """Which of :data:`condconv_ref.testing.strategies.PADDING_FORMS` ``padding`` is written in."""
    if isinstance(padding, str):
        return padding
    if isinstance(padding, int):
        return "int"
    return "pairs" if any(isinstance(p, (tuple, list)) for p in padding) else "per_dim"


def _per_dim(value: Any, nd: int) -> tuple[int, ...]:
    return (value,) * nd if isinstance(value, int) else tuple(value)


def _limit(reasons: list[str], what: str, value: Any, limit: int, field_name: str) -> None:
    if value > limit:
        reasons.append(f"{what} {value} > {field_name}={limit}")


def unsupported(case: Case, supports: Supports) -> list[str]:
    """Why ``case`` lies outside what ``supports`` declares; empty when it lies inside.

    A case is inside when :func:`condconv_ref.testing.cases` could draw it
    from ``supports``: its number of spatial dims, padding form and mode,
    optional arrays, and every size, stride, dilation, padding amount, group
    count, hidden width and temperature within the limits, and
    ``supports.excludes`` does not rule it out.  Golden-vector verification
    (:func:`condconv_ref.golden.verify`) does not hand an implementation the
    cases outside.

    Examples
    --------
    >>> from condconv_ref import golden
    >>> from condconv_ref.testing import Supports
    >>> case = golden.load(golden.SHIPPED).cases[8].case
    >>> case.x.ndim, case.options["padding"], "bias" in case.arrays
    (4, ((0, 1), (1, 1)), False)
    >>> unsupported(case, Supports(spatial_dims=(1,), padding_forms=("int",), bias=(True,)))
    ... # doctest: +NORMALIZE_WHITESPACE
    ['no bias, bias=(True,)', '2 spatial dims, spatial_dims=(1,)',
     "padding ((0, 1), (1, 1)) (form 'pairs'), padding_forms=('int',)"]
    >>> unsupported(case, Supports())
    []
    """
    entry = VARIANTS[case.variant]
    arrays, options, reasons = case.arrays, case.options, []
    following = [name for name in entry.optional if name not in supports.optional]
    present = any(name in arrays for name in following)
    if following and present not in supports.bias:
        reasons.append(f"{'a' if present else 'no'} bias, bias={supports.bias}")
    for name in entry.optional:
        if name in supports.optional and (name in arrays) not in supports.optional[name]:
            reasons.append(f"{'a' if name in arrays else 'no'} {name}, "
                           f"optional[{name!r}]={supports.optional[name]}")
    hidden = arrays.get("fc1_weight", arrays.get("fc_weight"))
    if hidden is not None:
        _limit(reasons, "hidden width", hidden.shape[0], supports.max_hidden, "max_hidden")
    excluded = supports.excluded(case)
    if excluded:
        reasons.append(excluded)
    x = arrays.get("x")
    if x is not None:
        _limit(reasons, "batch", x.shape[0], supports.max_batch, "max_batch")
    experts = arrays.get("experts", arrays.get("routing"))
    if experts is not None and "kernel" not in arrays:
        _limit(reasons, "experts", experts.shape[0] if "experts" in arrays else experts.shape[1],
               supports.max_experts, "max_experts")
    if "temperature" in options:
        field_name = "odconv_temperatures" if case.variant == "odconv_layer" else "temperatures"
        low, high = getattr(supports, field_name)
        if not low <= options["temperature"] <= high:
            reasons.append(f"temperature {options['temperature']:.3g} outside "
                           f"{field_name}={(low, high)}")
    if entry.linear:
        _limit(reasons, "F_in", x.shape[1], supports.max_features, "max_features")
        _limit(reasons, "F_out", arrays["experts"].shape[1], supports.max_features,
               "max_features")
        return reasons
    geometry = case.geometry
    if geometry is None:
        return reasons
    return reasons + _conv_unsupported(case, supports, entry)


def _conv_unsupported(case: Case, supports: Supports, entry: Variant) -> list[str]:
    """The reasons of :func:`unsupported` that concern the convolution's shape and options."""
    reasons: list[str] = []
    x, options = case.x, case.options
    kernel = case.arrays.get("experts", case.arrays.get("kernel"))
    nd = x.ndim - 2
    if nd not in supports.spatial_dims:
        reasons.append(f"{nd} spatial dims, spatial_dims={supports.spatial_dims}")
    padding = options.get("padding", 0)
    form = _padding_form(padding)
    if form not in supports.padding_forms:
        written = "" if form == padding else f" (form {form!r})"
        reasons.append(f"padding {padding!r}{written}, padding_forms={supports.padding_forms}")
    mode = options.get("padding_mode", "zeros")
    if mode not in supports.padding_modes:
        reasons.append(f"padding_mode {mode!r}, padding_modes={supports.padding_modes}")
    channels, out_channels = x.shape[1], kernel.shape[-nd - 2]
    groups = channels if entry.depthwise else options.get("groups", 1)
    _limit(reasons, "groups" if not entry.depthwise else "channels", groups,
           supports.max_groups, "max_groups")
    _limit(reasons, "channels per group", channels // groups, supports.max_channels_per_group,
           "max_channels_per_group")
    _limit(reasons, "outputs per group", out_channels // groups, supports.max_out_per_group,
           "max_out_per_group")
    for what, values, limit, name in (
            ("input size", x.shape[2:], supports.max_size, "max_size"),
            ("kernel size", kernel.shape[-nd:], supports.max_kernel, "max_kernel"),
            ("stride", _per_dim(options.get("stride", 1), nd), supports.max_stride, "max_stride"),
            ("dilation", _per_dim(options.get("dilation", 1), nd), supports.max_dilation,
             "max_dilation")):
        _limit(reasons, what, max(values), limit, name)
    if not isinstance(padding, str):
        _limit(reasons, "padding", max(max(pair) for pair in case.geometry.padding),
               supports.max_padding, "max_padding")
    return reasons


# ---------------------------------------------------------------- builders


def _present(**arrays: Any) -> dict[str, Any]:
    return {name: a for name, a in arrays.items() if a is not None}


_COTANGENT_STREAM = 3
_TANGENT_STREAM = 7


def _rng(seed: int, stream: int) -> np.random.Generator:
    """A generator for one independent stream of a case's random draws."""
    return np.random.default_rng([seed, stream])


def _conv_arrays(config: ConvConfig, seed: int, values: CondConvArrays | None = None) -> Any:
    """The arrays of ``config``: ``values`` when given (drawn element by element by
    :func:`condconv_ref.testing.cases`), else drawn from ``seed``."""
    return arrays_for(config, xp=np, seed=seed) if values is None else values


def _conv_lengths(config: ConvConfig) -> tuple[int, int]:
    """Longest sums: expert mixing x taps, pooling; backward adds col2im, batch x positions,
    and the routing gradient's O x C/g x taps x positions."""
    taps, per_group = math.prod(config.kernel), config.in_channels // config.groups
    positions = math.prod(config.output_shape[2:])
    forward = max(config.n_experts * per_group * taps,
                  config.in_channels * math.prod(config.spatial))
    backward = max(forward, config.n_experts * config.depth_multiplier * taps,
                   config.batch * positions, config.out_channels * per_group * taps * positions)
    return forward, backward


def _depthwise_options(config: ConvConfig) -> dict[str, Any]:
    return dict(depth_multiplier=config.depth_multiplier, stride=config.stride,
                padding=config.padding, dilation=config.dilation,
                padding_mode=config.padding_mode)


def _build_conv(config: ConvConfig, seed: int, temperature: Any,
                values: Any = None) -> Any:
    """``conv``: expert 0 of the configuration as the kernel."""
    a = _conv_arrays(config, seed, values)
    bias = None if a.bias is None else a.bias[0]
    return (_present(x=a.x, kernel=a.experts[0], bias=bias), config.options(),
            _conv_lengths(config))


def _build_mix(config: ConvConfig, seed: int, temperature: Any,
               values: Any = None) -> Any:
    a = _conv_arrays(config, seed, values)
    size = math.prod(a.experts.shape[1:])
    lengths = (config.n_experts, max(config.n_experts, config.batch, size))
    return {"routing": a.routing, "experts": a.experts}, {}, lengths


def _build_route_sigmoid(config: ConvConfig, seed: int, temperature: Any,
                         values: Any = None) -> Any:
    # the op's ``bias`` is the routing bias, switched as the op's own ``bias``
    switched = replace(config, optional=(*config.optional, ("route_bias", config.has("bias"))))
    a = _conv_arrays(switched, seed, values)
    return (_present(x=a.x, weight=a.route_weight, bias=a.route_bias), {},
            _conv_lengths(config))


def _build_condconv(config: ConvConfig, seed: int, temperature: Any,
                    values: Any = None) -> Any:
    """``condconv`` and ``moe_condconv``: external routing weights in (0, 1)."""
    a = _conv_arrays(config, seed, values)
    return (_present(x=a.x, experts=a.experts, routing=a.routing, bias=a.bias),
            config.options(), _conv_lengths(config))


def _layer_arrays(config: ConvConfig, seed: int,
                  values: CondConvArrays | None = None) -> dict[str, Any]:
    a = _conv_arrays(config, seed, values)
    return _present(x=a.x, experts=a.experts, bias=a.bias, route_weight=a.route_weight,
                    route_bias=a.route_bias)


def _build_condconv_layer(config: ConvConfig, seed: int, temperature: Any,
                          values: Any = None) -> Any:
    """``condconv_layer``: sigmoid routing parameters instead of routing weights."""
    return _layer_arrays(config, seed, values), config.options(), _conv_lengths(config)


def _build_depthwise(config: ConvConfig, seed: int, temperature: Any,
                     values: Any = None) -> Any:
    arrays, _, lengths = _build_condconv(config, seed, temperature, values)
    return arrays, _depthwise_options(config), lengths


def _build_depthwise_layer(config: ConvConfig, seed: int, temperature: Any,
                           values: Any = None) -> Any:
    return _layer_arrays(config, seed, values), _depthwise_options(config), _conv_lengths(config)


def _linear_arrays(config: ConvConfig, seed: int, values: CondConvArrays | None = None, *,
                   layer: bool) -> Any:
    """(B, F_in) inputs sized by the configuration: B, F_in = C, F_out = O, E; from
    ``values`` (a configuration with one spatial element, unit kernel) when given."""
    batch, in_features, out_features = config.batch, config.in_channels, config.out_channels
    n_experts = config.n_experts
    if values is not None:
        x, experts = values.x[:, :, 0], values.experts[..., 0]
        routing, route_weight = values.routing, values.route_weight
        bias, route_bias = values.bias, values.route_bias
    else:
        rng = _rng(seed, 1)
        x = rng.standard_normal((batch, in_features))
        experts = (rng.standard_normal((n_experts, out_features, in_features))
                   / math.sqrt(in_features))
        routing = rng.uniform(size=(batch, n_experts))
        route_weight = rng.standard_normal((n_experts, in_features)) / math.sqrt(in_features)
        bias = rng.standard_normal((n_experts, out_features)) if config.any_optional else None
        route_bias = rng.standard_normal(n_experts) if config.any_optional else None
        bias = bias if config.has("bias") else None
        route_bias = route_bias if config.has("route_bias") else None
    lengths = (n_experts * in_features,
               max(n_experts * in_features, n_experts * out_features, batch,
                   out_features * in_features))
    if layer:
        arrays = _present(x=x, experts=experts, bias=bias, route_weight=route_weight,
                          route_bias=route_bias)
    else:
        arrays = _present(x=x, experts=experts, routing=routing, bias=bias)
    return arrays, {}, lengths


def _build_linear(config: ConvConfig, seed: int, temperature: Any,
                  values: Any = None) -> Any:
    """``cond_linear`` and ``moe_cond_linear``."""
    return _linear_arrays(config, seed, values, layer=False)


def _build_linear_layer(config: ConvConfig, seed: int, temperature: Any,
                        values: Any = None) -> Any:
    return _linear_arrays(config, seed, values, layer=True)


def _softmax_routing(x: np.ndarray, config: ConvConfig, seed: int,
                     temperature: float | None) -> tuple[dict[str, Any], float]:
    """Routing MLP parameters whose ReLU inputs keep clear of the kink, and the temperature.

    Every pre-activation :math:`h_{bj} = \\bar x_b \\cdot w_j + b_j` satisfies
    :math:`|h_{bj}| \\ge 0.05\\,(\\|\\bar x_b\\|\\|w_j\\| + |b_j|)` (rows redrawn
    until it does), so finite differences never straddle it.
    """
    rng = _rng(seed, 2)
    pooled = x.mean(axis=tuple(range(2, x.ndim)))
    drawn_hidden = int(rng.integers(1, 5))  # drawn always: the later draws stay the same
    hidden = drawn_hidden if config.hidden is None else config.hidden
    fc1, fc2 = config.has("fc1_bias"), config.has("fc2_bias")
    fc1_weight = np.empty((hidden, x.shape[1]))
    fc1_bias = np.zeros(hidden)
    for j in range(hidden):
        while True:
            fc1_weight[j] = rng.standard_normal(x.shape[1])
            fc1_bias[j] = rng.standard_normal() if fc1 else 0.0
            size = (np.linalg.norm(pooled, axis=1) * np.linalg.norm(fc1_weight[j])
                    + abs(fc1_bias[j]))
            if np.all(np.abs(pooled @ fc1_weight[j] + fc1_bias[j]) >= _KINK_MARGIN * size):
                break
    fc2_weight = rng.standard_normal((config.n_experts, hidden))
    fc2_bias = rng.standard_normal(config.n_experts) if fc2 else None
    low, high = TEMPERATURE_RANGE
    drawn = float(np.exp(rng.uniform(math.log(low), math.log(high))))
    arrays = _present(fc1_weight=fc1_weight, fc2_weight=fc2_weight,
                      fc1_bias=fc1_bias if fc1 else None, fc2_bias=fc2_bias)
    return arrays, drawn if temperature is None else float(temperature)


def _build_route_softmax(config: ConvConfig, seed: int, temperature: Any,
                         values: Any = None) -> Any:
    """``route_softmax`` of the configuration's input, away from ReLU kinks."""
    a = _conv_arrays(config, seed, values)
    routing, temperature = _softmax_routing(a.x, config, seed, temperature)
    return {"x": a.x, **routing}, {"temperature": temperature}, _conv_lengths(config)


def _build_dynamic(config: ConvConfig, seed: int, temperature: Any,
                   values: Any = None) -> Any:
    """``dynamic_conv_layer``: the experts, softmax routing parameters, temperature."""
    a = _conv_arrays(config, seed, values)
    routing, temperature = _softmax_routing(a.x, config, seed, temperature)
    arrays = _present(x=a.x, experts=a.experts, bias=a.bias, **routing)
    return arrays, {**config.options(), "temperature": temperature}, _conv_lengths(config)


def _odconv_trunk(x: np.ndarray, width: int, rng: np.random.Generator, *, train: bool,
                  bias: bool) -> dict[str, Any]:
    r"""The fc layer and batch norm of an ODConv trunk whose ReLU inputs keep clear of the kink.

    Each feature's parameters are redrawn until every batch-norm output satisfies
    :math:`|z_{bj}| \ge 0.05\,(|\gamma_j \hat a_{bj}| + |\beta_j|)`, so finite
    differences never straddle it.
    """
    pooled = x.mean(axis=tuple(range(2, x.ndim)))
    arrays: dict[str, np.ndarray] = {"fc_weight": np.empty((width, x.shape[1]))}
    arrays.update({name: np.empty(width) for name in ("bn_weight", "bn_bias",
                                                       *(() if train else BUFFERS))})
    for j in range(width):
        while True:
            row = rng.standard_normal(x.shape[1]) / math.sqrt(x.shape[1])
            pre = pooled @ row
            weight, shift = rng.standard_normal(), rng.standard_normal() if bias else 0.0
            if train:
                mean, variance = pre.mean(), pre.var()
            else:
                mean = pre.mean() + rng.standard_normal() * 0.5
                variance = float(rng.uniform(0.1, 2.0))
            normalized = (pre - mean) / math.sqrt(variance + 1e-5)
            z = weight * normalized + shift
            size = np.abs(weight * normalized) + abs(shift)
            if np.all(z != 0) and np.all(np.abs(z) >= _KINK_MARGIN * size):
                break
        arrays["fc_weight"][j], arrays["bn_weight"][j], arrays["bn_bias"][j] = row, weight, shift
        if not train:
            arrays["bn_running_mean"][j], arrays["bn_running_var"][j] = mean, variance
    if not bias:
        del arrays["bn_bias"]
    return arrays


def _build_odconv(config: ConvConfig, seed: int, temperature: Any) -> Any:
    """``odconv_layer``: the experts, a trunk clear of the ReLU kink, a random subset of the
    four heads (each present with probability 3/4), the batch-norm mode (train with
    probability 1/2 when B >= 2) and the temperature, all from the seed."""
    a = _conv_arrays(config, seed)
    choices = _rng(seed, 5)  # the choices first: the same for every size of the configuration
    train = bool(choices.random() < 0.5) and config.batch >= 2
    present = [head for head in HEADS if choices.random() < 0.75]
    width = int(choices.integers(1, 5))  # drawn always: the later draws stay the same
    width = width if config.hidden is None else config.hidden
    low, high = ODCONV_TEMPERATURE_RANGE
    drawn = float(np.exp(choices.uniform(math.log(low), math.log(high))))
    rng = _rng(seed, 6)
    arrays = {"x": a.x, "experts": a.experts,
              **_odconv_trunk(a.x, width, rng, train=train, bias=config.has("bn_bias"))}
    sizes = {"channel": config.in_channels, "filter": config.out_channels,
             "spatial": math.prod(config.kernel), "kernel": config.n_experts}
    for head in present:
        arrays[f"{head}_weight"] = rng.standard_normal((sizes[head], width))
        if config.has(f"{head}_bias"):
            arrays[f"{head}_bias"] = rng.standard_normal(sizes[head])
    options = {**config.options(), "temperature": drawn if temperature is None
               else float(temperature), "batch_norm": "train" if train else "eval"}
    forward, backward = _conv_lengths(config)
    # the trunk's and heads' sums (C, B, A, the head sizes, the positions pooled) and the three
    # attention products around the convolution
    trunk = max(config.in_channels, config.batch, width, *sizes.values(),
                math.prod(config.spatial))
    extra = max(config.out_channels * (config.in_channels // config.groups),
                math.prod(config.spatial))
    return arrays, options, (max(forward, trunk) + 3, max(backward, trunk, extra) + 3)


# ---------------------------------------------------------------- the registry

_BIAS = ("bias",)
_LAYER_BIASES = ("bias", "route_bias")
_MLP_BIASES = ("fc1_bias", "fc2_bias")

VARIANTS: Mapping[str, Variant] = {
    entry.name: entry for entry in [
        Variant("conv", conv, conv_vjp, _build_conv, jvp=conv_jvp, optional=_BIAS),
        Variant("mix_experts", mix_experts, mix_experts_vjp, _build_mix, jvp=mix_experts_jvp),
        Variant("route_sigmoid", route_sigmoid, route_sigmoid_vjp, _build_route_sigmoid,
                jvp=route_sigmoid_jvp, optional=_BIAS),
        Variant("route_softmax", route_softmax, route_softmax_vjp, _build_route_softmax,
                temperature=True, jvp=route_softmax_jvp, optional=_MLP_BIASES),
        Variant("condconv", condconv, condconv_vjp, _build_condconv, jvp=condconv_jvp,
                optional=_BIAS),
        Variant("moe_condconv", moe_condconv, moe_condconv_vjp, _build_condconv,
                jvp=moe_condconv_jvp, optional=_BIAS),
        Variant("condconv_layer", condconv_layer, condconv_layer_vjp, _build_condconv_layer,
                layer=True, jvp=condconv_layer_jvp, optional=_LAYER_BIASES,
                hvp=condconv_layer_hvp),
        Variant("depthwise_condconv", depthwise_condconv, depthwise_condconv_vjp,
                _build_depthwise, depthwise=True, jvp=depthwise_condconv_jvp, optional=_BIAS),
        Variant("depthwise_condconv_layer", depthwise_condconv_layer,
                depthwise_condconv_layer_vjp, _build_depthwise_layer, layer=True,
                depthwise=True, jvp=depthwise_condconv_layer_jvp, optional=_LAYER_BIASES,
                hvp=depthwise_condconv_layer_hvp),
        Variant("cond_linear", cond_linear, cond_linear_vjp, _build_linear, linear=True,
                jvp=cond_linear_jvp, optional=_BIAS),
        Variant("moe_cond_linear", moe_cond_linear, moe_cond_linear_vjp, _build_linear,
                linear=True, jvp=moe_cond_linear_jvp, optional=_BIAS),
        Variant("cond_linear_layer", cond_linear_layer, cond_linear_layer_vjp,
                _build_linear_layer, layer=True, linear=True, jvp=cond_linear_layer_jvp,
                optional=_LAYER_BIASES, hvp=cond_linear_layer_hvp),
        Variant("dynamic_conv_layer", dynamic_conv_layer, dynamic_conv_layer_vjp,
                _build_dynamic, layer=True, temperature=True, jvp=dynamic_conv_layer_jvp,
                optional=("bias",) + _MLP_BIASES, hvp=dynamic_conv_layer_hvp),
        Variant("odconv_layer", odconv_layer, odconv_layer_vjp, _build_odconv, layer=True,
                temperature=True, buffers=BUFFERS, jvp=odconv_layer_jvp,
                optional=("bn_bias",) + tuple(f"{head}_bias" for head in HEADS),
                hvp=odconv_layer_hvp),
    ]
}
"""Every variant by name.  A new op adds one :class:`Variant` here."""

LAYER_VARIANTS = ("condconv", "condconv_layer", "depthwise_condconv", "depthwise_condconv_layer",
                  "cond_linear_layer", "dynamic_conv_layer", "odconv_layer")
"""The variants users check their implementations against
(:func:`condconv_ref.testing.check_implementation`)."""
