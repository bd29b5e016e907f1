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
- :func:`cases` draws whole cases of a variant within what an implementation
  :class:`Supports`.

The records themselves (:class:`ConvConfig`, :class:`CondConvArrays`,
:class:`Supports`) and :func:`arrays_for` do not need hypothesis: they live in
``condconv_ref._cases`` and are re-exported here and from
:mod:`condconv_ref.testing`.

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
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
from hypothesis import assume, reject
from hypothesis import strategies as st

from condconv_ref._cases import PADDING_FORMS, CondConvArrays, ConvConfig, Supports, arrays_for
from condconv_ref._validate import PADDING_MODES

if TYPE_CHECKING:
    from condconv_ref.variants import Case

__all__ = [
    "PADDING_FORMS",
    "CondConvArrays",
    "ConvConfig",
    "Supports",
    "PRECISIONS",
    "arrays_for",
    "case_values",
    "cases",
    "condconv_inputs",
    "conv_configs",
    "seeds",
]


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
    optional: Mapping[str, bool | None] | None = None,
    max_hidden: int | None = None,
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
    optional : mapping of str to bool or None, optional
        Switches of single optional arrays (names from ``OPTIONAL_ARRAYS``):
        forced to the value, or drawn when None; the others follow ``bias``.
    max_hidden : int, optional
        Upper bound on ``config.hidden``, the routing MLP's hidden width, drawn
        from 1 (:func:`cases` always draws it); None leaves ``config.hidden``
        None, for the seed to choose.

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
    switches = tuple((name, draw(st.booleans()) if fixed is None else bool(fixed))
                     for name, fixed in sorted((optional or {}).items()))
    hidden = None if max_hidden is None else draw(st.integers(1, max_hidden))

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
                      n_experts=n_experts, bias=has_bias, optional=switches, hidden=hidden)


# ---------------------------------------------------------------- values that shrink

PRECISIONS = 8
"""The finest grid :func:`case_values` rounds to: :math:`2^{-8}`."""


def _rounded(values: Any, bits: int | None) -> Any:
    """``values`` rounded to multiples of ``2**-bits``, none of them to 0 (the smallest
    magnitude is ``2**-bits``), so rounding keeps every term of a sum present."""
    if values is None or bits is None:
        return values
    steps = np.maximum(np.round(np.abs(values) * 2.0**bits), 1.0)
    return np.sign(values) * steps / 2.0**bits


@st.composite
def case_values(draw: st.DrawFn, config: ConvConfig, seed: int) -> CondConvArrays:
    r"""Strategy of the arrays of ``config`` from ``seed``, rounded to a drawn grid, for
    :func:`condconv_ref.variants.build_case`'s ``values``.

    Half of the draws keep the values :func:`arrays_for` makes from ``seed``;
    the others round every array to multiples of :math:`2^{-b}` (a nonzero
    value to at least :math:`2^{-b}` in magnitude, so no term drops out), with
    ``b`` drawn from 0 to :data:`PRECISIONS`.  Hypothesis shrinks towards
    rounding, then towards ``b = 0``: a failing case comes out with whole
    numbers (mostly 1, -1, 2) wherever the failure allows it, not only with
    small shapes.  Values are drawn from the seed rather than element by element
    (``hypothesis.extra.array_api``) because a case holds up to thousands
    of elements: drawn one by one they would make each example far slower, and
    drawn with a fill value most elements would be equal, which hides the
    indexing bugs the checker looks for.

    Examples
    --------
    >>> from hypothesis import given
    >>> config = ConvConfig(batch=1, in_channels=2, out_channels=2, groups=1, spatial=(3,),
    ...                     kernel=(2,), stride=(1,), dilation=(1,), padding=0,
    ...                     padding_mode="zeros", n_experts=2, bias=True)
    >>> @given(case_values(config, seed=0))
    ... def test_values(a):
    ...     assert a.experts.shape == config.experts_shape and a.bias.shape == (2, 2)
    ...     assert ((0 <= a.routing) & (a.routing <= 1)).all()
    >>> test_values()
    >>> from hypothesis import find
    >>> whole = find(case_values(config, seed=0), lambda a: True)
    >>> bool((whole.x == np.round(whole.x)).all())
    True
    """
    # Both choices are always drawn, so the shrinker can switch rounding on and lower b.
    rounds = not draw(st.booleans())
    bits = draw(st.integers(0, PRECISIONS))
    bits = bits if rounds else None
    drawn = arrays_for(config, xp=np, seed=seed)
    return CondConvArrays(*(_rounded(getattr(drawn, name), bits)
                            for name in ("x", "experts", "routing", "bias", "route_weight",
                                         "route_bias")))


# ---------------------------------------------------------------- whole cases of a variant




@st.composite
def cases(draw: st.DrawFn, variant: str, supports: Supports | None = None, *, xp: Any = None,
          dtype: Any = "float64", device: Any = None) -> Case:
    """Strategy of whole :class:`condconv_ref.variants.Case` objects of ``variant``.

    A configuration from :func:`conv_configs` within ``supports``, a seed for
    its arrays, a grid to round them to (:func:`case_values`) and, for the
    softmax variants, a temperature.  A case that ``supports.excludes`` rules
    out is drawn again, up to 10 times per example (then the example is
    rejected).  Shrinking goes towards small configurations, whole-number
    values (0, 1, -1, ...), seed 0 and the simplest temperature.

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
    from condconv_ref.variants import VARIANTS

    if variant not in VARIANTS:
        raise ValueError(f"cases: variant must be one of {sorted(VARIANTS)}, got {variant!r}")
    supports = Supports() if supports is None else supports
    for _ in range(_TRIES):
        case = draw(_any_case(variant, supports))
        if not supports.excluded(case):
            return case if xp is None else case.to(xp, dtype=dtype, device=device)
    reject()


_TRIES = 10
"""Cases :func:`cases` draws for one example before giving up on ``Supports.excludes``."""


@st.composite
def _any_case(draw: st.DrawFn, variant: str, supports: Supports) -> Case:
    """One case of ``variant`` within the fields of ``supports`` (``excludes`` not applied)."""
    from condconv_ref.variants import VARIANTS, build_case

    entry = VARIANTS[variant]
    config = draw(conv_configs(**supports.config_options(depthwise=entry.depthwise,
                                                         linear=entry.linear)))
    seed = draw(seeds())
    temperature = None
    if variant == "odconv_layer":  # six decades: drawn log-uniformly
        low, high = (math.log(t) for t in supports.odconv_temperatures)
        temperature = min(max(math.exp(draw(st.floats(low, high))),
                              supports.odconv_temperatures[0]), supports.odconv_temperatures[1])
    elif entry.temperature:
        temperature = draw(st.floats(*supports.temperatures, allow_nan=False,
                                     allow_infinity=False))
    values = draw(case_values(config, seed)) if entry.takes_values else None
    return build_case(variant, config, seed, temperature=temperature, values=values)
