r"""Plain-data test cases: configurations, their arrays, and what an implementation supports.

Nothing here imports hypothesis, so the variant registry
(:func:`condconv_ref.variants.build_case`), the golden-vector reader and the
checker's records work without it.  :mod:`condconv_ref.testing.strategies`
draws these records with hypothesis and re-exports them; users import them
from :mod:`condconv_ref.testing`.

- :class:`ConvConfig`: one valid convolution / CondConv configuration.
- :func:`arrays_for`: the arrays of a configuration, from a seed, in any
  namespace, on any device.
- :class:`Supports`: the family of cases an implementation supports, which
  :func:`condconv_ref.testing.cases` draws from.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any

import numpy as np

from condconv_ref._validate import PADDING_MODES, ConvGeometry, conv_geometry

if TYPE_CHECKING:
    from condconv_ref.variants import Case

__all__ = ["OPTIONAL_ARRAYS", "PADDING_FORMS", "CondConvArrays", "ConvConfig", "Supports",
           "arrays_for"]

PADDING_FORMS = ("int", "per_dim", "pairs", "valid", "same")

OPTIONAL_ARRAYS = ("bias", "route_bias", "fc1_bias", "fc2_bias", "bn_bias", "channel_bias",
                   "filter_bias", "spatial_bias", "kernel_bias")
"""The arrays a case may leave out, each with its own switch (:attr:`ConvConfig.optional`,
:attr:`Supports.optional`): the expert bias, the sigmoid routing bias, the biases of the
softmax routing MLP, and the biases of ODConv's batch norm and heads."""


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
        Whether the op gets a bias, and, unless ``optional`` says otherwise, every
        other optional array of :data:`OPTIONAL_ARRAYS` (the layer's routing biases).
    optional : tuple of (str, bool)
        Switches of single optional arrays, e.g. ``(("fc1_bias", False),)``:
        present or not whatever ``bias`` says.
    hidden : int or None
        The hidden width of the routing MLP of ``dynamic_conv_layer`` and of
        the attention trunk of ``odconv_layer``; None draws it (1 to 4) from
        the seed.

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
    optional: tuple[tuple[str, bool], ...] = ()
    hidden: int | None = None

    def has(self, name: str) -> bool:
        """Whether the optional array ``name`` (of :data:`OPTIONAL_ARRAYS`) is present.

        Examples
        --------
        >>> config = ConvConfig(batch=1, in_channels=2, out_channels=2, groups=1,
        ...                     spatial=(3,), kernel=(1,), stride=(1,), dilation=(1,),
        ...                     padding=0, padding_mode="zeros", n_experts=2, bias=True,
        ...                     optional=(("fc1_bias", False),))
        >>> config.has("bias"), config.has("fc1_bias"), config.has("fc2_bias")
        (True, False, True)
        """
        return dict(self.optional).get(name, self.bias)

    @property
    def any_optional(self) -> bool:
        """Whether any optional array is present (then all of them are drawn)."""
        return self.bias or any(present for _, present in self.optional)

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

    Examples
    --------
    >>> import numpy as np
    >>> from condconv_ref import condconv_layer
    >>> config = ConvConfig(batch=2, in_channels=3, out_channels=4, groups=1, spatial=(6,),
    ...                     kernel=(3,), stride=(1,), dilation=(1,), padding=1,
    ...                     padding_mode="zeros", n_experts=2, bias=True)
    >>> a = arrays_for(config, xp=np, seed=0)
    >>> a.routing.shape, a.bias.shape, sorted(a.layer_params())
    ((2, 2), (2, 4), ['bias', 'experts', 'route_bias', 'route_weight'])
    >>> condconv_layer(a.x, a.layer_params(), **config.options()).shape
    (2, 4, 6)
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
    if config.any_optional:  # both drawn, so that one switch leaves the other's values alone
        bias = put(rng.standard_normal((config.n_experts, config.out_channels)))
        route_bias = put(rng.standard_normal((config.n_experts,)))
    return CondConvArrays(x, experts, routing, bias if config.has("bias") else None,
                          route_weight, route_bias if config.has("route_bias") else None)


@dataclass(frozen=True)
class Supports:
    """What an implementation supports: the cases :func:`condconv_ref.testing.cases` draws.

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
        (and the routing biases, unless ``optional`` says otherwise), ``(False,)`` never.
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
    odconv_temperatures : (float, float)
        The range of the temperature of ``odconv_layer``, drawn log-uniformly:
        by default from heads that are almost step functions (:math:`10^{-3}`)
        to heads that are almost constant (:math:`10^{3}`).
    optional : mapping of str to tuple of bool
        One switch per optional array of :data:`OPTIONAL_ARRAYS`, e.g.
        ``{"fc1_bias": (False,)}`` for a DynamicConv layer with an expert bias
        but a bias-free first routing layer; arrays not named follow ``bias``.
    max_hidden : int
        Upper bound on the hidden width of ``dynamic_conv_layer``'s routing MLP
        and ``odconv_layer``'s attention trunk (drawn from 1, so it shrinks).
    excludes : callable, optional
        ``excludes(case) -> str | None``: for a limit the fields cannot say
        (square kernels only, equal strides, not both stride and dilation
        above 1), why ``case`` (a :class:`condconv_ref.variants.Case`) is out of
        reach, or None when it is supported.  The strategies draw again in place
        of a case it excludes (:attr:`condconv_ref.testing.Report.turned_away`
        counts them), and golden verification passes such a case by, naming
        the reason.

    Examples
    --------
    A 2-D PyTorch-style layer with symmetric zero padding, no dilation:

    >>> supports = Supports(spatial_dims=(2,), padding_forms=("int",),
    ...                     padding_modes=("zeros",), max_dilation=1)
    >>> supports.max_experts
    4

    A Keras-style layer: square kernels, and stride or dilation above 1 but not both:

    >>> def keras_limits(case):
    ...     kernel = case.arrays["experts"].shape[3:]  # (E, O, C/groups, *k)
    ...     stride, dilation = case.options["stride"], case.options["dilation"]
    ...     if len(set(kernel)) > 1:
    ...         return f"kernel {kernel} is not square"
    ...     if max(stride) > 1 and max(dilation) > 1:
    ...         return "stride and dilation both above 1"
    ...     return None
    >>> keras = Supports(spatial_dims=(2,), excludes=keras_limits)
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
    odconv_temperatures: tuple[float, float] = (1e-3, 1e3)
    optional: Mapping[str, tuple[bool, ...]] = field(default_factory=dict)
    max_hidden: int = 4
    excludes: Callable[[Case], str | None] | None = None

    def __post_init__(self) -> None:
        _switches("bias", self.bias)
        if not isinstance(self.optional, Mapping):
            raise TypeError(f"Supports: optional must be a mapping of array names to tuples "
                            f"of bool, got {self.optional!r}")
        for name, switches in self.optional.items():
            if name not in OPTIONAL_ARRAYS:
                raise ValueError(f"Supports: optional has {name!r}, expected names from "
                                 f"{OPTIONAL_ARRAYS}")
            _switches(f"optional[{name!r}]", switches)
        if isinstance(self.max_hidden, bool) or not isinstance(self.max_hidden, int) \
                or self.max_hidden < 1:
            raise ValueError(f"Supports: max_hidden must be an int >= 1, got {self.max_hidden!r}")
        if self.excludes is not None and not callable(self.excludes):
            raise TypeError(f"Supports: excludes must be callable (case -> reason or None), "
                            f"got {self.excludes!r}")
        for name in ("temperatures", "odconv_temperatures"):
            low, high = getattr(self, name)
            if not 0 < low <= high < math.inf:
                raise ValueError(f"Supports: {name} must be (low, high) with "
                                 f"0 < low <= high < inf, got {getattr(self, name)!r}")

    def config_options(self, *, depthwise: bool = False, linear: bool = False) -> dict[str, Any]:
        """The keyword arguments of :func:`condconv_ref.testing.conv_configs` for these limits.

        A ``linear`` variant gets configurations with one spatial dim of size 1,
        unit kernel and no groups or padding: only B, C = F_in, O = F_out, E
        and ``bias`` matter.
        """
        options = {f.name: getattr(self, f.name) for f in fields(self)
                   if f.name not in ("bias", "max_features", "temperatures",
                                     "odconv_temperatures", "optional", "excludes")}
        options["bias"] = _fixed(self.bias)
        options["optional"] = {name: _fixed(switches) for name, switches in self.optional.items()}
        if linear:
            options.update(spatial_dims=(1,), padding_forms=("int",), padding_modes=("zeros",),
                           max_groups=1, max_channels_per_group=self.max_features,
                           max_out_per_group=self.max_features, max_size=1, max_kernel=1,
                           max_stride=1, max_dilation=1, max_padding=0)
        return {**options, "depthwise": depthwise}

    def excluded(self, case: Case) -> str:
        """Why ``excludes`` rules ``case`` out, or ``""`` when it does not (or is None).

        Raises
        ------
        TypeError
            If ``excludes`` returns something other than a string or None.
        """
        if self.excludes is None:
            return ""
        reason = self.excludes(case)
        if reason is not None and not isinstance(reason, str):
            raise TypeError(f"Supports: excludes must return a reason (str) or None, got "
                            f"{reason!r}")
        return reason or ""


def _switches(name: str, switches: Any) -> None:
    if not isinstance(switches, (tuple, list)) or not switches or any(
            b not in (False, True) for b in switches):
        raise ValueError(f"Supports: {name} must be a non-empty subset of (False, True), "
                         f"got {switches!r}")


def _fixed(switches: tuple[bool, ...]) -> bool | None:
    """The one value of ``switches``, or None when both are allowed (drawn)."""
    return switches[0] if len(set(switches)) == 1 else None
