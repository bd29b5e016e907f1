r"""Hypothesis strategies for convolution configurations and CondConv inputs.

In the spirit of hypothesis's ``extra/array_api.py``: the strategies draw
*configurations* (plain Python data), and the arrays for a configuration are
created in any array namespace on any device.  User test suites and the
variant ops (depthwise, linear, dynamic) reuse them directly.

- :func:`conv_configs` draws a :class:`ConvConfig` that is always valid: the
  output is non-empty, reflect padding is smaller than the input and circular
  padding at most the input, on every spatial dim.
- :func:`arrays_for` creates the arrays of a configuration from a seed, and
  :func:`condconv_inputs` is the strategy that draws that seed.

Examples
--------
>>> from hypothesis import given
>>> import numpy as np
>>> from condconv_ref import condconv
>>> from condconv_ref.testing.strategies import arrays_for, conv_configs, seeds
>>> @given(config=conv_configs(spatial_dims=(2,)), seed=seeds())
... def test_output_shape(config, seed):
...     a = arrays_for(config, xp=np, seed=seed)
...     y = condconv(a.x, a.experts, a.routing, a.bias, **config.options())
...     assert y.shape == config.output_shape
>>> test_output_shape()
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from hypothesis import assume
from hypothesis import strategies as st

from condconv_ref._validate import PADDING_MODES, ConvGeometry, conv_geometry

if TYPE_CHECKING:
    from condconv_ref.variants import Case

__all__ = [
    "PADDING_FORMS",
    "CondConvArrays",
    "ConvConfig",
    "Supports",
    "arrays_for",
    "cases",
    "condconv_inputs",
    "conv_configs",
    "seeds",
]

PADDING_FORMS = ("int", "per_dim", "pairs", "valid", "same")


@dataclass(frozen=True)
class ConvConfig:
    """One valid convolution / CondConv configuration, as plain Python data.

    Attributes
    ----------
    batch, in_channels, out_channels, groups, n_experts : int
        B, C, O, groups and E.
    spatial, kernel, stride, dilation : tuple of int
        One entry per spatial dim: input size n, kernel size k, stride s, dilation d.
    padding : int, tuple of int, tuple of (int, int), 'valid' or 'same'
        The padding exactly as drawn, in one of the forms the ops accept.
    padding_mode : {'zeros', 'reflect', 'replicate', 'circular'}
    bias : bool
        Whether the op gets a bias (and the layer a routing bias).

    Examples
    --------
    >>> config = ConvConfig(batch=2, in_channels=4, out_channels=6, groups=2,
    ...                     spatial=(5, 5), kernel=(3, 3), stride=(2, 1), dilation=(1, 1),
    ...                     padding="same", padding_mode="reflect", n_experts=3, bias=True)
    >>> config.nd, config.experts_shape, config.output_shape
    (2, (3, 6, 2, 3, 3), (2, 6, 3, 5))
    >>> config.padding_pairs
    ((1, 1), (1, 1))
    >>> sorted(config.options())
    ['dilation', 'groups', 'padding', 'padding_mode', 'stride']
    """

    batch: int
    in_channels: int
    out_channels: int
    groups: int
    spatial: tuple[int, ...]
    kernel: tuple[int, ...]
    stride: tuple[int, ...]
    dilation: tuple[int, ...]
    padding: Any
    padding_mode: str
    n_experts: int
    bias: bool

    @property
    def nd(self) -> int:
        """Number of spatial dims (1, 2 or 3)."""
        return len(self.spatial)

    @property
    def depth_multiplier(self) -> int:
        """Output channels per group, O / groups; the depth multiplier of a depthwise config."""
        return self.out_channels // self.groups

    @property
    def is_depthwise(self) -> bool:
        """True when every input channel is its own group (groups == C)."""
        return self.groups == self.in_channels

    def options(self) -> dict[str, Any]:
        """The keyword options every conv-like op takes: ``op(..., **config.options())``."""
        return dict(stride=self.stride, padding=self.padding, dilation=self.dilation,
                    groups=self.groups, padding_mode=self.padding_mode)

    @property
    def geometry(self) -> ConvGeometry:
        """The options resolved by the library's own validation (padding pairs, output size)."""
        return conv_geometry("ConvConfig", self.spatial, self.kernel, **self.options())

    @property
    def padding_pairs(self) -> tuple[tuple[int, int], ...]:
        """The padding as one ``(before, after)`` pair per spatial dim."""
        return self.geometry.padding

    @property
    def x_shape(self) -> tuple[int, ...]:
        """``(B, C, *spatial)``."""
        return (self.batch, self.in_channels) + self.spatial

    @property
    def kernel_shape(self) -> tuple[int, ...]:
        """``(O, C/groups, *k)``, one expert or a plain conv kernel."""
        return (self.out_channels, self.in_channels // self.groups) + self.kernel

    @property
    def experts_shape(self) -> tuple[int, ...]:
        """``(E, O, C/groups, *k)``."""
        return (self.n_experts,) + self.kernel_shape

    @property
    def output_shape(self) -> tuple[int, ...]:
        """``(B, O, *out)``."""
        return (self.batch, self.out_channels) + self.geometry.out


@dataclass(frozen=True)
class CondConvArrays:
    """The arrays of one :class:`ConvConfig`, all in one namespace, device and dtype.

    Attributes
    ----------
    x : array, shape (B, C, \\*spatial)
        Standard normal.
    experts : array, shape (E, O, C/groups, \\*k)
        Normal with standard deviation 1/sqrt(fan-in), fan-in = C/groups * prod(k).
    routing : array, shape (B, E)
        Uniform in (0, 1), like sigmoid routing weights.
    bias : array, shape (E, O), or None
        Standard normal; None when ``config.bias`` is False.
    route_weight : array, shape (E, C)
        Standard normal routing matrix for :func:`condconv_ref.condconv_layer`.
    route_bias : array, shape (E,), or None
        Standard normal; None when ``config.bias`` is False.
    """

    x: Any
    experts: Any
    routing: Any
    bias: Any
    route_weight: Any
    route_bias: Any

    def layer_params(self) -> dict[str, Any]:
        """The ``params`` mapping of :func:`condconv_ref.condconv_layer` (optional keys only when set)."""
        params = {"experts": self.experts, "route_weight": self.route_weight}
        if self.bias is not None:
            params["bias"] = self.bias
        if self.route_bias is not None:
            params["route_bias"] = self.route_bias
        return params


def arrays_for(config: ConvConfig, *, xp: Any, device: Any = None, dtype: Any = "float64",
               seed: int = 0) -> CondConvArrays:
    """Create the arrays of ``config`` in namespace ``xp`` on ``device``, reproducibly.

    Values are drawn in float64 by ``numpy.random.default_rng(seed)`` and then
    copied with ``xp.asarray(..., dtype=dtype, device=device)``; the same seed
    gives the same values on every backend.

    Parameters
    ----------
    config : ConvConfig
    xp : array namespace
        E.g. ``numpy``, ``array_api_strict``, ``array_api_compat.torch``.
    device : optional
        A device of ``xp``; None for its default device.
    dtype : str or dtype of xp
        A floating dtype, by name (``"float32"``) or as ``xp``'s dtype object.
    seed : int
        Seed of the NumPy generator.

    Returns
    -------
    CondConvArrays

    Examples
    --------
    >>> import array_api_strict as xp
    >>> config = ConvConfig(batch=2, in_channels=3, out_channels=4, groups=1, spatial=(6,),
    ...                     kernel=(3,), stride=(1,), dilation=(1,), padding=1,
    ...                     padding_mode="zeros", n_experts=2, bias=False)
    >>> a = arrays_for(config, xp=xp, dtype="float32", seed=1)
    >>> a.x.shape, a.experts.shape, a.routing.shape, a.bias, a.x.dtype
    ((2, 3, 6), (2, 4, 3, 3), (2, 2), None, array_api_strict.float32)
    """
    rng = np.random.default_rng(seed)
    xp_dtype = getattr(xp, dtype) if isinstance(dtype, str) else dtype
    fan_in = config.in_channels // config.groups * math.prod(config.kernel)

    def put(values: np.ndarray) -> Any:
        return xp.asarray(values, dtype=xp_dtype, device=device)

    x = put(rng.standard_normal(config.x_shape))
    experts = put(rng.standard_normal(config.experts_shape) / math.sqrt(fan_in))
    routing = put(rng.uniform(size=(config.batch, config.n_experts)))
    # Scaled like a fan-in initialisation, so routing logits stay O(1) and the
    # sigmoid does not saturate as the channel count grows.
    route_weight = put(rng.standard_normal((config.n_experts, config.in_channels))
                       / math.sqrt(config.in_channels))
    bias = route_bias = None
    if config.bias:
        bias = put(rng.standard_normal((config.n_experts, config.out_channels)))
        route_bias = put(rng.standard_normal((config.n_experts,)))
    return CondConvArrays(x, experts, routing, bias, route_weight, route_bias)


def seeds() -> st.SearchStrategy[int]:
    """Seeds for :func:`arrays_for` (hypothesis shrinks them towards 0)."""
    return st.integers(0, 2**32 - 1)


def condconv_inputs(config: ConvConfig, xp: Any, *, device: Any = None,
                    dtype: Any = "float64") -> st.SearchStrategy[CondConvArrays]:
    """Strategy of :class:`CondConvArrays` for ``config``: :func:`arrays_for` at a drawn seed.

    Examples
    --------
    >>> import numpy as np
    >>> from hypothesis import given
    >>> config = ConvConfig(batch=1, in_channels=2, out_channels=2, groups=2, spatial=(4, 4),
    ...                     kernel=(2, 2), stride=(1, 1), dilation=(1, 1), padding="valid",
    ...                     padding_mode="zeros", n_experts=3, bias=True)
    >>> @given(arrays=condconv_inputs(config, np))
    ... def test_shapes(arrays):
    ...     assert arrays.experts.shape == config.experts_shape
    ...     assert arrays.bias.shape == (3, 2)
    >>> test_shapes()
    """
    return seeds().map(lambda seed: arrays_for(config, xp=xp, device=device, dtype=dtype,
                                               seed=seed))


def _check_choices(name: str, values: Any, allowed: tuple[Any, ...]) -> tuple[Any, ...]:
    values = tuple(values)
    if not values or any(v not in allowed for v in values):
        raise ValueError(f"conv_configs: {name} must be a non-empty subset of {allowed}, "
                         f"got {values!r}")
    return values


@st.composite
def conv_configs(
    draw: st.DrawFn,
    *,
    spatial_dims: int | tuple[int, ...] = (1, 2, 3),
    max_batch: int = 3,
    max_experts: int = 4,
    max_groups: int = 3,
    max_channels_per_group: int = 3,
    max_out_per_group: int = 3,
    max_size: int = 7,
    max_kernel: int = 3,
    max_stride: int = 2,
    max_dilation: int = 2,
    max_padding: int = 2,
    padding_forms: tuple[str, ...] = PADDING_FORMS,
    padding_modes: tuple[str, ...] = PADDING_MODES,
    depthwise: bool = False,
    bias: bool | None = None,
) -> ConvConfig:
    """Strategy of valid :class:`ConvConfig` objects.

    Every drawn configuration is accepted by the ops: the output is non-empty,
    reflect padding is smaller than the input size and circular padding at
    most the input size, on every spatial dim.  Shrinking goes towards one
    spatial dim, batch 1, one expert, one group and unit kernel, stride and
    dilation.

    Parameters
    ----------
    spatial_dims : int or tuple of int
        The allowed numbers of spatial dims, from {1, 2, 3}.
    max_batch, max_experts, max_groups : int
        Upper bounds on B, E and groups (each drawn from 1).
    max_channels_per_group, max_out_per_group : int
        Upper bounds on C/groups and O/groups.
    max_size, max_kernel, max_stride, max_dilation : int
        Upper bounds, per spatial dim, on the input size, kernel size, stride and dilation.
    max_padding : int
        Upper bound on each explicit padding amount (not on 'same').
    padding_forms : tuple of str
        Subset of ``PADDING_FORMS``: ``'int'`` (one int), ``'per_dim'`` (one int
        per dim), ``'pairs'`` (one (before, after) per dim), ``'valid'``, ``'same'``.
    padding_modes : tuple of str
        Subset of ``('zeros', 'reflect', 'replicate', 'circular')``.
    depthwise : bool
        If True, ``groups == in_channels`` (drawn up to ``max_groups``) and
        ``out_channels = in_channels * depth_multiplier`` with the multiplier
        drawn up to ``max_out_per_group``.
    bias : bool, optional
        Force ``config.bias``; drawn when None.

    Returns
    -------
    hypothesis strategy of ConvConfig

    Examples
    --------
    >>> from hypothesis import given
    >>> @given(conv_configs(depthwise=True, padding_modes=("reflect",)))
    ... def test_depthwise(config):
    ...     assert config.is_depthwise
    ...     assert config.out_channels == config.in_channels * config.depth_multiplier
    ...     assert all(max(p) < n for p, n in zip(config.padding_pairs, config.spatial))
    >>> test_depthwise()
    """
    dims = (spatial_dims,) if isinstance(spatial_dims, int) else spatial_dims
    dims = _check_choices("spatial_dims", dims, (1, 2, 3))
    forms = _check_choices("padding_forms", padding_forms, PADDING_FORMS)
    modes = _check_choices("padding_modes", padding_modes, PADDING_MODES)

    nd = draw(st.sampled_from(sorted(dims)))
    groups = draw(st.integers(1, max_groups))
    if depthwise:
        in_channels = groups
        out_channels = groups * draw(st.integers(1, max_out_per_group))
    else:
        in_channels = groups * draw(st.integers(1, max_channels_per_group))
        out_channels = groups * draw(st.integers(1, max_out_per_group))
    batch = draw(st.integers(1, max_batch))
    n_experts = draw(st.integers(1, max_experts))
    has_bias = draw(st.booleans()) if bias is None else bool(bias)

    kernel = draw(st.tuples(*[st.integers(1, max_kernel)] * nd))
    stride = draw(st.tuples(*[st.integers(1, max_stride)] * nd))
    dilation = draw(st.tuples(*[st.integers(1, max_dilation)] * nd))
    form = draw(st.sampled_from(forms))
    mode = draw(st.sampled_from(modes))

    amount = st.integers(0, max_padding)
    if form == "int":
        padding = draw(amount)
        pairs = [(padding, padding)] * nd
    elif form == "per_dim":
        padding = draw(st.tuples(*[amount] * nd))
        pairs = [(p, p) for p in padding]
    elif form == "pairs":
        padding = draw(st.tuples(*[st.tuples(amount, amount)] * nd))
        pairs = list(padding)
    else:
        padding = form
        pairs = None

    spatial = []
    for axis in range(nd):
        span = dilation[axis] * (kernel[axis] - 1) + 1
        if form == "valid":
            widest, smallest = 0, span
        elif form == "same":
            # total = (ceil(n/s) - 1) s + span - n <= span - 1, so each side is <= span // 2
            widest, smallest = span // 2, 1
        else:
            widest = max(pairs[axis])
            smallest = max(span - sum(pairs[axis]), 1)
        if mode == "reflect":
            smallest = max(smallest, widest + 1)
        elif mode == "circular":
            smallest = max(smallest, widest)
        assume(smallest <= max_size)
        spatial.append(draw(st.integers(smallest, max_size)))

    return ConvConfig(batch=batch, in_channels=in_channels, out_channels=out_channels,
                      groups=groups, spatial=tuple(spatial), kernel=kernel, stride=stride,
                      dilation=dilation, padding=padding, padding_mode=mode,
                      n_experts=n_experts, bias=has_bias)


# ---------------------------------------------------------------- whole cases of a variant


@dataclass(frozen=True)
class Supports:
    """What an implementation supports: the family of cases :func:`cases` draws from.

    Every field narrows what is drawn; the defaults cover everything the
    reference does, on small shapes.  Limits are inclusive; a maximum of 1
    switches a feature off (``max_groups=1``: no grouped convolution,
    ``max_stride=1``, ``max_dilation=1``, ``max_padding=0``).

    Attributes
    ----------
    spatial_dims : tuple of int
        Numbers of spatial dims, from {1, 2, 3}; e.g. ``(2,)`` for a 2-D layer.
    padding_forms : tuple of str
        From ``PADDING_FORMS``: ``'int'`` (one int), ``'per_dim'`` (one per
        dim), ``'pairs'`` (a (before, after) pair per dim), ``'valid'``, ``'same'``
        (TensorFlow's: the extra row goes after).
    padding_modes : tuple of str
        From ``('zeros', 'reflect', 'replicate', 'circular')`` (PyTorch semantics).
    bias : tuple of bool
        ``(False, True)`` draws both; ``(True,)`` always has the expert bias
        (and the routing biases), ``(False,)`` never.
    max_batch, max_experts : int
        Upper bounds on B and E (from 1).
    max_groups : int
        Upper bound on ``groups``; for the depthwise variants, on the channels C.
    max_channels_per_group, max_out_per_group : int
        Upper bounds on C/groups and O/groups; for the depthwise variants
        ``max_out_per_group`` bounds the depth multiplier.
    max_size, max_kernel, max_stride, max_dilation, max_padding : int
        Per spatial dim: input size, kernel size, stride, dilation, each explicit
        padding amount.
    max_features : int
        Upper bound on F_in and F_out of ``cond_linear_layer``.
    temperatures : (float, float)
        The range of the softmax temperature of ``dynamic_conv_layer``.

    Examples
    --------
    A 2-D PyTorch-style layer with symmetric zero padding, no dilation:

    >>> supports = Supports(spatial_dims=(2,), padding_forms=("int",),
    ...                     padding_modes=("zeros",), max_dilation=1)
    >>> supports.max_experts
    4
    """

    spatial_dims: tuple[int, ...] = (1, 2, 3)
    padding_forms: tuple[str, ...] = PADDING_FORMS
    padding_modes: tuple[str, ...] = PADDING_MODES
    bias: tuple[bool, ...] = (False, True)
    max_batch: int = 3
    max_experts: int = 4
    max_groups: int = 3
    max_channels_per_group: int = 3
    max_out_per_group: int = 3
    max_size: int = 7
    max_kernel: int = 3
    max_stride: int = 2
    max_dilation: int = 2
    max_padding: int = 2
    max_features: int = 6
    temperatures: tuple[float, float] = (0.5, 4.0)

    def __post_init__(self) -> None:
        if not self.bias or any(b not in (False, True) for b in self.bias):
            raise ValueError(f"Supports: bias must be a non-empty subset of (False, True), "
                             f"got {self.bias!r}")
        low, high = self.temperatures
        if not 0 < low <= high < math.inf:
            raise ValueError(f"Supports: temperatures must be (low, high) with "
                             f"0 < low <= high < inf, got {self.temperatures!r}")

    def config_options(self, *, depthwise: bool = False, linear: bool = False) -> dict[str, Any]:
        """The keyword arguments of :func:`conv_configs` for these limits.

        A ``linear`` variant gets configurations with one spatial dim of size 1,
        unit kernel and no groups or padding: only B, C = F_in, O = F_out, E
        and ``bias`` matter.
        """
        options = {name: value for name, value in asdict(self).items()
                   if name not in ("bias", "max_features", "temperatures")}
        options["bias"] = self.bias[0] if len(set(self.bias)) == 1 else None
        if linear:
            options.update(spatial_dims=(1,), padding_forms=("int",), padding_modes=("zeros",),
                           max_groups=1, max_channels_per_group=self.max_features,
                           max_out_per_group=self.max_features, max_size=1, max_kernel=1,
                           max_stride=1, max_dilation=1, max_padding=0)
        return {**options, "depthwise": depthwise}


@st.composite
def cases(draw: st.DrawFn, variant: str, supports: Supports | None = None, *, xp: Any = None,
          dtype: Any = "float64", device: Any = None) -> Case:
    """Strategy of whole :class:`condconv_ref.variants.Case` objects of ``variant``.

    A configuration from :func:`conv_configs` within ``supports``, a seed for
    its arrays (:func:`condconv_ref.variants.build_case`) and, for the softmax
    variants, a temperature.  Shrinking goes towards small configurations,
    seed 0 and the simplest temperature.

    Parameters
    ----------
    variant : str
        A key of :data:`condconv_ref.variants.VARIANTS`, e.g. ``"condconv_layer"``.
    supports : Supports, optional
        Limits of what is drawn; default ``Supports()``.
    xp : array namespace, optional
        The namespace of the case's arrays; None keeps the float64 NumPy arrays.
    dtype : str or dtype of xp
        Their dtype when ``xp`` is given.
    device : optional
        Their device when ``xp`` is given.

    Examples
    --------
    >>> import array_api_strict
    >>> from hypothesis import given
    >>> @given(cases("dynamic_conv_layer", Supports(spatial_dims=(2,)), xp=array_api_strict,
    ...              dtype="float32"))
    ... def test_case(case):
    ...     assert case.x.ndim == 4 and case.x.dtype == array_api_strict.float32
    ...     assert 0.5 <= case.options["temperature"] <= 4.0
    >>> test_case()
    """
    from condconv_ref.variants import VARIANTS, build_case

    if variant not in VARIANTS:
        raise ValueError(f"cases: variant must be one of {sorted(VARIANTS)}, got {variant!r}")
    entry = VARIANTS[variant]
    supports = Supports() if supports is None else supports
    config = draw(conv_configs(**supports.config_options(depthwise=entry.depthwise,
                                                         linear=entry.linear)))
    seed = draw(seeds())
    temperature = None
    if entry.temperature:
        temperature = draw(st.floats(*supports.temperatures, allow_nan=False,
                                     allow_infinity=False))
    case = build_case(variant, config, seed, temperature=temperature)
    return case if xp is None else case.to(xp, dtype=dtype, device=device)
