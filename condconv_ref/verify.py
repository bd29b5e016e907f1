r"""The library checks itself: every op over random cases, by independent routes.

:func:`run` is ``condconv-ref verify`` without the terminal.  It draws ``cases``
random configurations with the test suite's strategies
(:func:`condconv_ref.testing.conv_configs`, through
:func:`condconv_ref.testing.sampling.draw_examples`) and runs every
:class:`Check` of the registry :data:`CHECKS` on each, on one backend and dtype.
One :class:`Row` per check comes back.

The kinds of check
------------------
``MoE equivalence`` (and ``, VJP``)
    CondConv equals the mixture of experts it replaces:
    :math:`\mathrm{conv}(x_b, \sum_e \alpha_{be} W_e)
    = \sum_e \alpha_{be}\,\mathrm{conv}(x_b, W_e)`,
    forward and gradients; the layers against ``moe_condconv`` fed their own routing.
``equals condconv groups=C`` (and ``, VJP``)
    The depthwise fast path against the generic grouped convolution.
``VJP vs finite diff.``
    The dot-product identity :math:`\langle \mathrm{vjp}(c), t\rangle = \langle c, J t\rangle`
    with :func:`condconv_ref.engine.finite_difference_check`; :math:`J t` by
    central differences always in float64 (see *dtypes* below).
``JVP transposes VJP``
    The exact identity :math:`\langle c, \mathrm{jvp}(t)\rangle = \sum_k\langle
    \mathrm{vjp}(c)_k, t_k\rangle`, both sides computed in the chosen dtype, with
    :func:`condconv_ref.engine.transpose_check`: no difference is taken, so the
    bound is the two sides' rounding alone.
``JVP vs finite diff.``
    :math:`\langle c, \mathrm{jvp}(t)\rangle = \langle c, Jt\rangle` with
    :math:`Jt` by float64 central differences
    (:func:`condconv_ref.engine.finite_difference_check`, ``mode="jvp"``).
``HVP vs finite diff.``
    For each layer with a Hessian-vector product:
    :math:`\langle d, \mathrm{hvp}(c, t)\rangle` against float64 Richardson
    differences of :math:`\langle d, \mathrm{vjp}(c, x + s t)\rangle`
    (:func:`condconv_ref.engine.hvp_check`).
``SciPy oracle``
    ``scipy.signal.correlate`` per example and channel
    (:func:`condconv_ref.testing.oracles.scipy_conv`), in float64; skipped, with
    a reason, when SciPy is not installed.

Errors and bounds
-----------------
Every check reports the error in units of the bound of
:mod:`condconv_ref.accuracy` (at most 1 passes), over every element of every
compared array, and where the worst one is:

- comparisons (MoE equivalence, groups=C, the SciPy oracle): each element of
  the result against the other route's, with the bound of the case's scale
  (:mod:`condconv_ref._scales`); two routes in one dtype each carry that
  dtype's rounding;
- finite differences: the dot-product identity against its derived bound
  (:func:`condconv_ref.engine.finite_difference_check`: the VJP's rounding,
  the differences' rounding and their truncation).

dtypes
------
Arrays are drawn in float64 and rounded to the chosen dtype; every op runs in
that dtype.  The finite differences need float64 to mean anything, so the
gradient check evaluates the forward in float64 at the rounded point, and the
VJP in the chosen dtype: in float32 mode it measures the float32 VJP against
float64 finite differences, with the float32 VJP's rounding in the bound.
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import array_api_compat
import numpy as np

from condconv_ref import (
    MemoryBudgetError,
    cond_linear,
    cond_linear_layer,
    cond_linear_layer_vjp,
    cond_linear_vjp,
    condconv,
    condconv_layer,
    condconv_layer_vjp,
    condconv_vjp,
    conv,
    conv_vjp,
    depthwise_condconv,
    depthwise_condconv_layer,
    depthwise_condconv_layer_vjp,
    depthwise_condconv_vjp,
    dynamic_conv_layer,
    dynamic_conv_layer_vjp,
    mix_experts,
    mix_experts_vjp,
    moe_cond_linear,
    moe_cond_linear_vjp,
    moe_condconv,
    moe_condconv_vjp,
    odconv_layer,
    odconv_layer_vjp,
    route_sigmoid,
    route_sigmoid_vjp,
    route_softmax,
    route_softmax_vjp,
)
from condconv_ref import _scales, accuracy
from condconv_ref._validate import check_positive_int
from condconv_ref.accuracy import Comparison
from condconv_ref.backends import Backend, get_backend, require_x64, to_numpy
from condconv_ref.engine import (
    Expected,
    Measurement,
    Row,
    finite_difference_check,
    hvp_check,
    judge,
    rounded,
    transpose_check,
    worst,
)
from condconv_ref.testing import ConvConfig
from condconv_ref.testing._numerics import _check_kept
from condconv_ref.testing.sampling import case_seed, draw_examples
from condconv_ref.variants import Case as VariantCase
from condconv_ref.variants import VARIANTS, bind, build_case

__all__ = [
    "CHECKS",
    "DEFAULT_CASES",
    "DTYPES",
    "FINITE_DIFFERENCES",
    "GROUPED",
    "GROUPED_VJP",
    "HVP_FINITE_DIFFERENCES",
    "JVP_FINITE_DIFFERENCES",
    "MOE",
    "MOE_VJP",
    "ORACLE",
    "TRANSPOSE",
    "Case",
    "Check",
    "CheckSkipped",
    "Measurement",
    "Row",
    "bind",
    "condconv_inputs",
    "condconv_layer_inputs",
    "conv_inputs",
    "depthwise_inputs",
    "depthwise_layer_inputs",
    "draw_cases",
    "dynamic_inputs",
    "equivalence_check",
    "forward_mode_checks",
    "gradient_check",
    "linear_inputs",
    "linear_layer_inputs",
    "mix_inputs",
    "odconv_inputs",
    "oracle_check",
    "route_sigmoid_inputs",
    "route_softmax_inputs",
    "run",
    "second_order_check",
    "vjp_equivalence_check",
]

DEFAULT_CASES = 20
DTYPES = tuple(dtype for dtype in accuracy.DTYPES if dtype != "bfloat16")
"""The dtypes the ops run in here: every dtype of the model NumPy can hold (check a bfloat16
layer with ``condconv-ref check --dtype bfloat16``)."""

MOE = "MoE equivalence"
MOE_VJP = "MoE equivalence, VJP"
GROUPED = "equals condconv groups=C"
GROUPED_VJP = "equals condconv groups=C, VJP"
FINITE_DIFFERENCES = "VJP vs finite diff."
TRANSPOSE = "JVP transposes VJP"
JVP_FINITE_DIFFERENCES = "JVP vs finite diff."
HVP_FINITE_DIFFERENCES = "HVP vs finite diff."
ORACLE = "SciPy oracle"


# ---------------------------------------------------------------- records


class CheckSkipped(Exception):
    """Raised by a check that cannot run here (e.g. SciPy missing); the message says why.

    Examples
    --------
    A check that needs JAX, run alone in place of the registry :data:`CHECKS`:

    >>> from condconv_ref import verify
    >>> def needs_jax(case):
    ...     raise verify.CheckSkipped("jax is not installed")
    >>> registry, verify.CHECKS = verify.CHECKS, [verify.Check("conv", "jax oracle", needs_jax)]
    >>> try:
    ...     rows = verify.run(cases=1)
    ... finally:
    ...     verify.CHECKS = registry
    >>> rows[0].status, rows[0].skipped
    ('SKIP', 'jax is not installed')
    """


@dataclass(frozen=True)
class Case:
    """One random case: its configurations, the seed of its arrays, and where it runs.

    ``config`` sizes the convolution ops (and, read as B, F_in = C, F_out = O,
    E, the linear ones); ``depthwise_config`` has ``groups == C``.

    Examples
    --------
    One configuration serving as both (it is depthwise):

    >>> from condconv_ref import verify
    >>> from condconv_ref.backends import get_backend
    >>> from condconv_ref.testing import ConvConfig
    >>> config = ConvConfig(batch=2, in_channels=2, out_channels=4, groups=2, spatial=(5,),
    ...                     kernel=(3,), stride=(1,), dilation=(1,), padding=1,
    ...                     padding_mode="zeros", n_experts=3, bias=True)
    >>> case = verify.Case(0, 7, config, config, get_backend("numpy"), "float32")
    >>> case.put([1.0, 2.0]).dtype
    dtype('float32')
    >>> case.rng(3).standard_normal() == case.rng(3).standard_normal()
    True
    """

    index: int
    seed: int
    config: ConvConfig
    depthwise_config: ConvConfig
    backend: Backend
    dtype: str

    def put(self, values: np.ndarray) -> Any:
        """``values`` on the case's backend, rounded to its dtype."""
        return self.backend.asarray(values, dtype=self.dtype)

    def rng(self, stream: int) -> np.random.Generator:
        """A generator for one independent stream of this case's random draws."""
        return np.random.default_rng([self.seed, stream])


@dataclass(frozen=True)
class Check:
    """One registry entry: ``run(case)`` returns a :class:`condconv_ref.engine.Measurement`.

    Examples
    --------
    >>> from condconv_ref import verify
    >>> from condconv_ref.backends import get_backend
    >>> from condconv_ref.testing import ConvConfig
    >>> config = ConvConfig(batch=2, in_channels=2, out_channels=4, groups=2, spatial=(5,),
    ...                     kernel=(3,), stride=(1,), dilation=(1,), padding=1,
    ...                     padding_mode="zeros", n_experts=3, bias=True)
    >>> case = verify.Case(0, 7, config, config, get_backend("numpy"), "float32")
    >>> check = verify.CHECKS[0]
    >>> check.op, check.kind
    ('conv', 'VJP vs finite diff.')
    >>> check.run(case).passed
    True
    """

    op: str
    kind: str
    run: Callable[[Case], Measurement]


# ---------------------------------------------------------------- inputs of each op


_INPUTS_DOC = """The ``{variant}`` case of :data:`condconv_ref.variants.VARIANTS` for a random
:class:`Case`{depthwise}, its arrays drawn from ``case.seed``.

Examples
--------
>>> from condconv_ref import verify
>>> from condconv_ref.backends import get_backend
>>> from condconv_ref.testing import ConvConfig
>>> config = ConvConfig(batch=2, in_channels=2, out_channels=4, groups=2, spatial=(5,),
...                     kernel=(3,), stride=(1,), dilation=(1,), padding=1,
...                     padding_mode="zeros", n_experts=3, bias=True)
>>> case = verify.Case(0, 7, config, config, get_backend("numpy"), "float64")
>>> given = verify.{name}(case)
>>> given.variant, given.seed
('{variant}', 7)
"""


def _inputs(name: str, variant: str, *, depthwise: bool = False) -> Callable[[Case], VariantCase]:
    """The builder ``name`` of ``variant``'s case from a random :class:`Case` (its depthwise
    config when ``depthwise``)."""

    def inputs(case: Case) -> VariantCase:
        return build_case(variant, case.depthwise_config if depthwise else case.config, case.seed)

    inputs.__name__ = inputs.__qualname__ = name
    inputs.__doc__ = _INPUTS_DOC.format(name=name, variant=variant,
                                        depthwise=" (its depthwise config)" if depthwise else "")
    return inputs


conv_inputs = _inputs("conv_inputs", "conv")
mix_inputs = _inputs("mix_inputs", "mix_experts")
route_sigmoid_inputs = _inputs("route_sigmoid_inputs", "route_sigmoid")
condconv_inputs = _inputs("condconv_inputs", "condconv")
condconv_layer_inputs = _inputs("condconv_layer_inputs", "condconv_layer")
depthwise_inputs = _inputs("depthwise_inputs", "depthwise_condconv", depthwise=True)
depthwise_layer_inputs = _inputs("depthwise_layer_inputs", "depthwise_condconv_layer",
                                 depthwise=True)
linear_inputs = _inputs("linear_inputs", "cond_linear")
linear_layer_inputs = _inputs("linear_layer_inputs", "cond_linear_layer")
route_softmax_inputs = _inputs("route_softmax_inputs", "route_softmax")
dynamic_inputs = _inputs("dynamic_inputs", "dynamic_conv_layer")
odconv_inputs = _inputs("odconv_inputs", "odconv_layer")


# ---------------------------------------------------------------- the other side of a comparison


def _moe_sigmoid_layer(x: Any, params: Mapping[str, Any], **options: Any) -> Any:
    """``condconv_layer`` as a mixture of experts: ``moe_condconv`` fed ``route_sigmoid``."""
    routing = route_sigmoid(x, params["route_weight"], params.get("route_bias"))
    return moe_condconv(x, params["experts"], routing, params.get("bias"), **options)


def _moe_softmax_layer(x: Any, params: Mapping[str, Any], *, temperature: float,
                       **options: Any) -> Any:
    """``dynamic_conv_layer`` as a mixture of experts: ``moe_condconv`` fed ``route_softmax``."""
    routing = route_softmax(x, params["fc1_weight"], params["fc2_weight"], params.get("fc1_bias"),
                            params.get("fc2_bias"), temperature=temperature)
    return moe_condconv(x, params["experts"], routing, params.get("bias"), **options)


def _grouped_condconv(x: Any, experts: Any, routing: Any, bias: Any = None, *,
                      depth_multiplier: int, **options: Any) -> Any:
    """``depthwise_condconv`` as ``condconv`` with ``groups=C``; the multiplier is in the shapes."""
    return condconv(x, experts, routing, bias, groups=x.shape[1], **options)


def _grouped_condconv_vjp(cotangent: Any, x: Any, experts: Any, routing: Any, bias: Any = None,
                          *, depth_multiplier: int, **options: Any) -> dict[str, Any]:
    """``depthwise_condconv_vjp`` as ``condconv_vjp`` with ``groups=C``."""
    return condconv_vjp(cotangent, x, experts, routing, bias, groups=x.shape[1], **options)


def _condconv_oracle(arrays: Mapping[str, np.ndarray], config: ConvConfig) -> np.ndarray:
    """SciPy CondConv: the per-example kernels and biases mixed here, in float64."""
    from condconv_ref.testing.oracles import scipy_conv

    routing = arrays["routing"]
    kernels = np.tensordot(routing, arrays["experts"], axes=1)
    bias = routing @ arrays["bias"] if "bias" in arrays else None
    return scipy_conv(arrays["x"], kernels, bias, config)


def _conv_oracle(arrays: Mapping[str, np.ndarray], config: ConvConfig) -> np.ndarray:
    from condconv_ref.testing.oracles import scipy_conv

    return scipy_conv(arrays["x"], arrays["kernel"], arrays.get("bias"), config)


# ---------------------------------------------------------------- measuring


def _host(result: Any) -> Any:
    """``result`` (an array or a dict of gradients) as float64 NumPy."""
    if isinstance(result, Mapping):
        return {name: np.asarray(to_numpy(g), dtype=np.float64) for name, g in result.items()}
    return np.asarray(to_numpy(result), dtype=np.float64)


def _kept(result: Any, like: Any) -> None:
    """Our ops keep the inputs' namespace, device and dtype: raise ``AssertionError`` if not."""
    xp = array_api_compat.array_namespace(like)
    items = result.items() if isinstance(result, Mapping) else [("the result", result)]
    for name, a in items:
        what = name if name == "the result" else f"gradient {name!r}"
        _check_kept(what, a, like, "the inputs", xp=xp, shape=False)


def _measure(comparisons: list[Comparison], described: str) -> Measurement:
    """The worst of ``comparisons`` as a :class:`Measurement`; the detail names it on failure."""
    found = worst(comparisons)
    if found is None:
        return Measurement(0.0, "", described)
    units = math.inf if found.reason else found.units
    detail = described if found.passed else f"{described}\n{found}"
    return Measurement(units, found.where, detail)


def _cotangent(case: Case, output: Any) -> Any:
    """A standard normal cotangent shaped like ``output``, on the case's backend and dtype."""
    return case.put(case.rng(3).standard_normal(tuple(output.shape)))


# ---------------------------------------------------------------- kinds of check


def equivalence_check(op: str, kind: str, f: Callable[..., Any], g: Callable[..., Any],
                      inputs: Callable[[Case], VariantCase]) -> Check:
    """A check that ``f`` and ``g`` give the same result on ``inputs(case)``.

    Examples
    --------
    >>> from condconv_ref import verify
    >>> from condconv_ref.backends import get_backend
    >>> from condconv_ref.testing import ConvConfig
    >>> config = ConvConfig(batch=2, in_channels=2, out_channels=4, groups=2, spatial=(5,),
    ...                     kernel=(3,), stride=(1,), dilation=(1,), padding=1,
    ...                     padding_mode="zeros", n_experts=3, bias=True)
    >>> case = verify.Case(0, 7, config, config, get_backend("numpy"), "float32")
    >>> from condconv_ref import condconv, moe_condconv
    >>> check = verify.equivalence_check("condconv", verify.MOE, condconv, moe_condconv,
    ...                                  verify.condconv_inputs)
    >>> measured = check.run(case)
    >>> measured.passed
    True
    >>> print(measured.detail)  # doctest: +NORMALIZE_WHITESPACE
    condconv: x (2, 2, 5), experts (3, 4, 1, 3), routing (2, 3), bias (3, 4);
    stride=(1,), padding=1, dilation=(1,), groups=2, padding_mode='zeros'
    """

    def run(case: Case) -> Measurement:
        given = rounded(inputs(case), case.dtype)
        args = given.arrays_on(case.backend, case.dtype)
        other = bind(g, given)(**args)
        actual = bind(f, given)(**args)
        _kept(actual, args["x"])
        expected = Expected(_host(other), _scales.forward_scale(given, case.dtype),
                            _scales.depth(given, vjp=False))
        return _measure(judge(actual, expected, case.dtype, case.dtype), given.describe())

    return Check(op, kind, run)


def vjp_equivalence_check(op: str, kind: str, f: Callable[..., Any], f_vjp: Callable[..., Any],
                          g_vjp: Callable[..., Any],
                          inputs: Callable[[Case], VariantCase]) -> Check:
    """A check that the VJPs ``f_vjp`` and ``g_vjp`` of ``f`` agree at a random cotangent.

    Examples
    --------
    >>> from condconv_ref import verify
    >>> from condconv_ref.backends import get_backend
    >>> from condconv_ref.testing import ConvConfig
    >>> config = ConvConfig(batch=2, in_channels=2, out_channels=4, groups=2, spatial=(5,),
    ...                     kernel=(3,), stride=(1,), dilation=(1,), padding=1,
    ...                     padding_mode="zeros", n_experts=3, bias=True)
    >>> case = verify.Case(0, 7, config, config, get_backend("numpy"), "float32")
    >>> from condconv_ref import condconv, condconv_vjp, moe_condconv_vjp
    >>> check = verify.vjp_equivalence_check("condconv", verify.MOE_VJP, condconv, condconv_vjp,
    ...                                      moe_condconv_vjp, verify.condconv_inputs)
    >>> check.run(case).passed
    True
    """

    def run(case: Case) -> Measurement:
        given = rounded(inputs(case), case.dtype)
        args = given.arrays_on(case.backend, case.dtype)
        cotangent = _cotangent(case, bind(f, given)(**args))
        other = bind(g_vjp, given, vjp=True)(cotangent, **args)
        actual = bind(f_vjp, given, vjp=True)(cotangent, **args)
        _kept(actual, args["x"])
        expected = Expected(_host(other), _scales.vjp_scale(given, cotangent, case.dtype),
                            _scales.depth(given, vjp=True))
        return _measure(judge(actual, expected, case.dtype, case.dtype), given.describe())

    return Check(op, kind, run)


def gradient_check(op: str, f: Callable[..., Any], f_vjp: Callable[..., Any],
                   inputs: Callable[[Case], VariantCase]) -> Check:
    """A check of ``f_vjp`` against float64 finite differences of ``f`` (dot-product identity).

    Examples
    --------
    The float32 VJP of ``conv`` against float64 finite differences:

    >>> from condconv_ref import verify
    >>> from condconv_ref.backends import get_backend
    >>> from condconv_ref.testing import ConvConfig
    >>> config = ConvConfig(batch=2, in_channels=2, out_channels=4, groups=2, spatial=(5,),
    ...                     kernel=(3,), stride=(1,), dilation=(1,), padding=1,
    ...                     padding_mode="zeros", n_experts=3, bias=True)
    >>> case = verify.Case(0, 7, config, config, get_backend("numpy"), "float32")
    >>> from condconv_ref import conv, conv_vjp
    >>> check = verify.gradient_check("conv", conv, conv_vjp, verify.conv_inputs)
    >>> check.kind, check.run(case).passed
    ('VJP vs finite diff.', True)
    """

    def run(case: Case) -> Measurement:
        xp = case.backend.xp

        def kept_vjp(cotangent: Any, *args: Any, **kwargs: Any) -> dict[str, Any]:
            grads = f_vjp(cotangent, *args, **kwargs)
            for name, gradient in grads.items():
                _check_kept(f"gradient {name!r}", gradient, cotangent, "the cotangent", xp=xp,
                            shape=False)
            return grads

        return finite_difference_check(inputs(case), case.dtype, case.backend,
                                       seed=case_seed(case.seed, 4), forward=f, vjp=kept_vjp)

    return Check(op, FINITE_DIFFERENCES, run)


def oracle_check(op: str, f: Callable[..., Any], inputs: Callable[[Case], VariantCase],
                 oracle: Callable[[Mapping[str, np.ndarray], Any], np.ndarray]) -> Check:
    """A check of ``f`` against ``oracle(arrays, config)``, a float64 NumPy/SciPy computation
    on the same (rounded) input values; skipped when SciPy is not installed.

    Examples
    --------
    >>> from condconv_ref import verify
    >>> from condconv_ref.backends import get_backend
    >>> from condconv_ref.testing import ConvConfig
    >>> config = ConvConfig(batch=2, in_channels=2, out_channels=4, groups=2, spatial=(5,),
    ...                     kernel=(3,), stride=(1,), dilation=(1,), padding=1,
    ...                     padding_mode="zeros", n_experts=3, bias=True)
    >>> case = verify.Case(0, 7, config, config, get_backend("numpy"), "float32")
    >>> from condconv_ref import conv
    >>> from condconv_ref.testing.oracles import scipy_conv
    >>> def oracle(arrays, config):
    ...     return scipy_conv(arrays["x"], arrays["kernel"], arrays.get("bias"), config)
    >>> verify.oracle_check("conv", conv, verify.conv_inputs, oracle).run(case).passed
    True
    """

    def run(case: Case) -> Measurement:
        if importlib.util.find_spec("scipy") is None:
            raise CheckSkipped("scipy is not installed (pip install scipy)")
        given = rounded(inputs(case), case.dtype)
        args = given.arrays_on(case.backend, case.dtype)
        oracle_value = oracle({name: np.asarray(a) for name, a in given.arrays.items()},
                              given.config)
        expected = Expected(np.asarray(oracle_value, dtype=np.float64),
                            _scales.forward_scale(given, case.dtype),
                            _scales.depth(given, vjp=False))
        actual = bind(f, given)(**args)
        _kept(actual, args["x"])
        return _measure(judge(actual, expected, case.dtype), given.describe())

    return Check(op, ORACLE, run)


def forward_mode_checks(op: str, inputs: Callable[[Case], VariantCase]) -> list[Check]:
    """The checks of ``op``'s reference JVP: the transpose identity with its VJP, and the
    JVP against float64 finite differences of the forward.

    Examples
    --------
    >>> from condconv_ref import verify
    >>> from condconv_ref.backends import get_backend
    >>> from condconv_ref.testing import ConvConfig
    >>> config = ConvConfig(batch=2, in_channels=2, out_channels=4, groups=2, spatial=(5,),
    ...                     kernel=(3,), stride=(1,), dilation=(1,), padding=1,
    ...                     padding_mode="zeros", n_experts=3, bias=True)
    >>> case = verify.Case(0, 7, config, config, get_backend("numpy"), "float32")
    >>> [(check.kind, check.run(case).passed)
    ...  for check in verify.forward_mode_checks("condconv_layer", verify.condconv_layer_inputs)]
    [('JVP transposes VJP', True), ('JVP vs finite diff.', True)]
    """
    entry = VARIANTS[op]

    def transpose(case: Case) -> Measurement:
        return transpose_check(inputs(case), case.dtype, case.backend,
                               seed=case_seed(case.seed, 5), jvp=entry.jvp, vjp=entry.vjp)

    def differences(case: Case) -> Measurement:
        return finite_difference_check(inputs(case), case.dtype, case.backend,
                                       seed=case_seed(case.seed, 5), forward=entry.forward,
                                       jvp=entry.jvp, mode="jvp")

    return [Check(op, TRANSPOSE, transpose), Check(op, JVP_FINITE_DIFFERENCES, differences)]


def second_order_check(op: str, inputs: Callable[[Case], VariantCase]) -> Check:
    """The check of ``op``'s reference HVP against float64 differences of its VJP.

    Examples
    --------
    >>> from condconv_ref import verify
    >>> from condconv_ref.backends import get_backend
    >>> from condconv_ref.testing import ConvConfig
    >>> config = ConvConfig(batch=2, in_channels=2, out_channels=4, groups=2, spatial=(5,),
    ...                     kernel=(3,), stride=(1,), dilation=(1,), padding=1,
    ...                     padding_mode="zeros", n_experts=3, bias=True)
    >>> case = verify.Case(0, 7, config, config, get_backend("numpy"), "float32")
    >>> check = verify.second_order_check("condconv_layer", verify.condconv_layer_inputs)
    >>> check.kind, check.run(case).passed
    ('HVP vs finite diff.', True)
    """
    def differences(case: Case) -> Measurement:
        return hvp_check(inputs(case), case.dtype, case.backend, seed=case_seed(case.seed, 6))

    return Check(op, HVP_FINITE_DIFFERENCES, differences)




# ---------------------------------------------------------------- the registry

CHECKS: list[Check] = [
    gradient_check("conv", conv, conv_vjp, conv_inputs),
    oracle_check("conv", conv, conv_inputs, _conv_oracle),
    gradient_check("mix_experts", mix_experts, mix_experts_vjp, mix_inputs),
    gradient_check("route_sigmoid", route_sigmoid, route_sigmoid_vjp, route_sigmoid_inputs),
    equivalence_check("condconv", MOE, condconv, moe_condconv, condconv_inputs),
    vjp_equivalence_check("condconv", MOE_VJP, condconv, condconv_vjp, moe_condconv_vjp,
                          condconv_inputs),
    gradient_check("condconv", condconv, condconv_vjp, condconv_inputs),
    oracle_check("condconv", condconv, condconv_inputs, _condconv_oracle),
    gradient_check("moe_condconv", moe_condconv, moe_condconv_vjp, condconv_inputs),
    equivalence_check("condconv_layer", MOE, condconv_layer, _moe_sigmoid_layer,
                      condconv_layer_inputs),
    gradient_check("condconv_layer", condconv_layer, condconv_layer_vjp, condconv_layer_inputs),
    equivalence_check("depthwise_condconv", GROUPED, depthwise_condconv, _grouped_condconv,
                      depthwise_inputs),
    vjp_equivalence_check("depthwise_condconv", GROUPED_VJP, depthwise_condconv,
                          depthwise_condconv_vjp, _grouped_condconv_vjp, depthwise_inputs),
    gradient_check("depthwise_condconv", depthwise_condconv, depthwise_condconv_vjp,
                   depthwise_inputs),
    oracle_check("depthwise_condconv", depthwise_condconv, depthwise_inputs, _condconv_oracle),
    gradient_check("depthwise_condconv_layer", depthwise_condconv_layer,
                   depthwise_condconv_layer_vjp, depthwise_layer_inputs),
    equivalence_check("cond_linear", MOE, cond_linear, moe_cond_linear, linear_inputs),
    vjp_equivalence_check("cond_linear", MOE_VJP, cond_linear, cond_linear_vjp,
                          moe_cond_linear_vjp, linear_inputs),
    gradient_check("cond_linear", cond_linear, cond_linear_vjp, linear_inputs),
    gradient_check("moe_cond_linear", moe_cond_linear, moe_cond_linear_vjp, linear_inputs),
    gradient_check("cond_linear_layer", cond_linear_layer, cond_linear_layer_vjp,
                   linear_layer_inputs),
    gradient_check("route_softmax", route_softmax, route_softmax_vjp, route_softmax_inputs),
    equivalence_check("dynamic_conv_layer", MOE, dynamic_conv_layer, _moe_softmax_layer,
                      dynamic_inputs),
    gradient_check("dynamic_conv_layer", dynamic_conv_layer, dynamic_conv_layer_vjp,
                   dynamic_inputs),
    gradient_check("odconv_layer", odconv_layer, odconv_layer_vjp, odconv_inputs),
    *(check for op, entry in VARIANTS.items() if entry.jvp is not None
      for check in forward_mode_checks(op, _inputs(f"{op}_inputs", op,
                                                   depthwise=entry.depthwise))),
    *(second_order_check(op, _inputs(f"{op}_inputs", op, depthwise=entry.depthwise))
      for op, entry in VARIANTS.items() if entry.hvp is not None),
]
"""Every check ``run`` performs, in table order.  A new op adds its rows here."""


# ---------------------------------------------------------------- running


def draw_cases(backend: Backend, dtype: str, count: int, seed: int) -> list[Case]:
    """``count`` cases: configurations from the test strategies, array seeds from ``seed``.

    Examples
    --------
    >>> from condconv_ref import verify
    >>> from condconv_ref.backends import get_backend
    >>> cases = verify.draw_cases(get_backend("numpy"), "float64", 2, seed=0)
    >>> [case.index for case in cases], cases[1].depthwise_config.is_depthwise
    ([0, 1], True)
    >>> cases[0].seed == cases[1].seed
    False
    """
    from condconv_ref.testing.strategies import conv_configs

    configs = draw_examples(conv_configs(), count, seed=seed)
    depthwise = draw_examples(conv_configs(depthwise=True), count, seed=seed)
    return [Case(i, case_seed(seed, i), config, depthwise_config, backend, dtype)
            for i, (config, depthwise_config) in enumerate(zip(configs, depthwise))]


def _run_check(check: Check, cases: list[Case], advance: Callable[[int], None]) -> Row:
    units, where, failed, detail, notes = 0.0, "", 0, "", []
    dtype = cases[0].dtype if cases else "float64"
    for done, case in enumerate(cases):
        try:
            measurement = check.run(case)
        except CheckSkipped as reason:
            advance(len(cases) - done)
            return Row(check.op, check.kind, cases=0, skipped=str(reason), dtype=dtype)
        except MemoryBudgetError:  # the case is too large for the budget, not wrong: stop
            raise
        except Exception as error:  # an op or a check that raises fails this case
            failed += 1
            units, where = math.inf, f"case {case.index}"
            detail = detail or f"case {case.index}: {type(error).__name__}: {error}"
        else:
            if measurement.note:
                notes.append(f"case {case.index}: {measurement.note}")
            if not math.isnan(measurement.units) and not measurement.units <= units:
                units, where = measurement.units, f"case {case.index}" + (
                    f", {measurement.where}" if measurement.where else "")
            if not (measurement.passed or math.isnan(measurement.units)):
                failed += 1
                detail = detail or (f"case {case.index}: {measurement.units:.3g} x the bound "
                                    f"at {measurement.where}; {measurement.detail}")
        advance(1)
    return Row(check.op, check.kind, cases=len(cases), failed=failed, units=units, where=where,
               detail=detail, notes="; ".join(notes), dtype=dtype)


def run(backend: str | Backend = "numpy", cases: int = DEFAULT_CASES, seed: int = 0,
        dtype: str = "float64",
        progress: Callable[[Check, int, int], None] | None = None) -> list[Row]:
    """Run every check of :data:`CHECKS` over ``cases`` random cases; one :class:`Row` per check.

    Parameters
    ----------
    backend : str or Backend
        A name for :func:`condconv_ref.backends.get_backend` (``numpy``,
        ``array_api_strict``, ``array_api_strict:device1``, ``torch``, ``jax``, ``cupy``)
        or a :class:`~condconv_ref.backends.Backend`.
    cases : int
        Number of random cases, >= 1.
    seed : int
        Seed of the configurations and arrays, >= 0; the same seed reruns the
        same cases.
    dtype : {'float64', 'float32', 'float16'}
        The dtype every op runs in (finite differences always run in float64);
        one the backend has.
    progress : callable, optional
        Called as ``progress(check, done, total)`` after every case.

    Returns
    -------
    list of Row
        In the order of :data:`CHECKS`.  A case that raises counts as failed,
        with the exception in ``Row.detail``.

    Raises
    ------
    condconv_ref.MemoryBudgetError
        If a case needs more working memory than the budget: that stops the
        run, as no check can be judged on a case that did not run.
    condconv_ref.backends.BackendUnavailable
        If the backend cannot be used here.
    ValueError, TypeError
        For a bad ``backend`` name, ``cases``, ``seed`` or ``dtype``; and on JAX
        with its 64-bit mode off, which the finite differences need
        (:func:`condconv_ref.backends.require_x64`).

    Examples
    --------
    >>> from condconv_ref import verify
    >>> rows = verify.run(cases=1)
    >>> {row.status for row in rows}
    {'PASS'}
    >>> next(row.kind for row in rows if row.op == "condconv")
    'MoE equivalence'
    """
    count = check_positive_int("verify", "cases", cases)
    seed = check_positive_int("verify", "seed", seed, minimum=0)
    if dtype not in DTYPES:
        raise ValueError(f"verify: dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    chosen = get_backend(backend) if isinstance(backend, str) else backend
    if not isinstance(chosen, Backend):
        raise TypeError(f"verify: backend must be a backend name or a Backend, got {backend!r}")
    if not hasattr(chosen.xp, dtype):
        raise ValueError(f"verify: backend {chosen.name} has no dtype {dtype}")
    if array_api_compat.is_jax_namespace(chosen.xp):
        require_x64("verify (its finite differences run in float64)", "float64")
    drawn = draw_cases(chosen, dtype, count, seed)
    checks = list(CHECKS)
    total, done = len(checks) * count, 0
    rows = []
    for check in checks:

        def advance(steps: int, check: Check = check) -> None:
            nonlocal done
            done += steps
            if progress is not None:
                progress(check, done, total)

        rows.append(_run_check(check, drawn, advance))
    return rows
