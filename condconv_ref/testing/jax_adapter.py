r"""Turn a JAX function or a Flax-style module into the ``forward`` / ``vjp`` / ``jvp`` /
``hvp`` callables the checker calls.

:func:`jax_implementation` builds your layer for each case, puts the case's
arrays into the variables pytree it takes (nested dicts, e.g. Flax's
``{"params": {"Dense_0": {"kernel": ...}}}``, through a layout converter where
your storage differs) and gets every derivative from JAX's own transforms:
the VJP from :func:`jax.vjp`, the JVP from :func:`jax.jvp`, and the
Hessian-vector product by differentiating that VJP once more.  The converters
run inside the differentiated function, so JAX maps the gradients back to the
reference's layout itself.  JAX is imported only when a callable runs.

Derivatives
-----------
``vjp(case, cotangent)``
    ``jax.vjp`` of the layer as a function of the case's differentiable
    arrays, pulled back along ``cotangent``.
``jvp(case, tangents)``
    ``jax.jvp`` along ``tangents``.  It runs the rule of every
    :func:`jax.custom_jvp` in the layer.  JAX has no forward mode through a
    :func:`jax.custom_vjp` function: there ``jax.jvp`` raises, and the checker
    reports that as a failure of ``jvp`` with JAX's message (as ``jax.jvp``
    and ``jax.jacfwd`` fail on the layer for its users too).
    Check such a layer with ``jvp=False`` (``condconv-ref check --no-jvp``).
``hvp(case, cotangent, tangents)``
    With :math:`g(\theta) = \mathrm{vjp}(\theta; c)` at the fixed cotangent
    :math:`c`: ``"forward-over-reverse"`` (the default, ``hvp=True``) is
    ``jax.jvp`` of :math:`g` along the tangents, :math:`J_g t`, the protocol's
    definition.
    JAX runs it through the functions of a ``custom_vjp`` (its ``fwd`` and
    ``bwd``) as through any other JAX code, so a backward pass whose own
    derivative is wrong is caught.  ``"reverse-over-reverse"`` is ``jax.vjp``
    of :math:`g` pulled back along the tangents, :math:`J_g^\top t`, which
    equals :math:`J_g t` when :math:`g` is the gradient of a twice
    differentiable :math:`\langle c, f\rangle` (its Hessian is symmetric): the
    alternative for a layer through whose VJP JAX refuses forward mode.

float64 needs JAX's x64 mode: without it JAX computes in float32, so a
float64 case is refused with an error saying how to switch it on
(``jax.config.update("jax_enable_x64", True)``, or ``JAX_ENABLE_X64=1`` in the
environment) rather than checked in the wrong precision.

Examples
--------
A 1-D CondConv layer as a plain JAX function of its parameters and its input,
channels first, with a Flax-style ``Dense`` kernel (C, E) for the routing:

>>> import jax
>>> import jax.numpy as jnp
>>> from condconv_ref import layouts
>>> from condconv_ref.testing import Supports, check_implementation
>>> def condconv1d(params, x):
...     alpha = jax.nn.sigmoid(x.mean(axis=2) @ params["routing"]["kernel"])
...     kernels = jnp.tensordot(alpha, params["experts"], axes=1)  # (B, O, C, k)
...     conv = lambda xb, kb: jax.lax.conv_general_dilated(xb[None], kb, (1,), "VALID")[0]
...     return jax.vmap(conv)(x, kernels)
>>> layer = jax_implementation(
...     lambda case: condconv1d,
...     {"experts": "experts",
...      "route_weight": ("routing/kernel", lambda w, case: layouts.to_flax_dense(w))},
...     supports=Supports(spatial_dims=(1,), padding_forms=("valid",), padding_modes=("zeros",),
...                       max_groups=1, max_stride=1, max_dilation=1, bias=(False,)))
>>> report = check_implementation(layer, variant="condconv_layer", dtype="float32",
...                               max_examples=4)
>>> report.passed, report.checked_vjp, report.checked_jvp, report.checked_hvp
(True, True, True, True)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from condconv_ref import layouts
from condconv_ref.backends import require_x64
from condconv_ref._cases import Supports
from condconv_ref.testing.checker import (
    Implementation,
    check_every_array_mapped,
    parameter_mapping,
)
from condconv_ref.testing.tf_adapter import DATA_FORMATS
from condconv_ref.variants import Case

__all__ = ["HVP_MODES", "jax_implementation"]

Converter = Callable[[Any, Case], Any]

HVP_MODES = ("forward-over-reverse", "reverse-over-reverse")
"""How :func:`jax_implementation` differentiates the VJP for the Hessian-vector product:
``jax.jvp`` of it (the default), or ``jax.vjp`` of it."""

_FN = "jax_implementation"


def _variables(mapping: Mapping[str, tuple[str, Converter | None]]) -> dict[str, tuple[str, ...]]:
    """Each array's place in the variables pytree, ``"params/Dense_0/kernel"`` split at
    ``/``; a ``ValueError`` for an empty name, or for a place that is taken or lies
    inside another array's."""
    paths = {name: tuple(target.split("/")) for name, (target, _) in mapping.items()}
    for name, path in paths.items():
        if not all(path):
            raise ValueError(f"{_FN}: parameters[{name!r}] must name a place in the variables "
                             f"pytree as keys joined by '/', e.g. 'params/Dense_0/kernel', got "
                             f"{mapping[name][0]!r}")
    for name, path in paths.items():
        for other, other_path in paths.items():
            if other != name and other_path[:len(path)] == path:
                raise ValueError(f"{_FN}: parameters[{name!r}] and parameters[{other!r}] both "
                                 f"go to {'/'.join(path)!r}: each array needs a place of its "
                                 f"own in the variables pytree")
    return paths


def _tree(leaves: Mapping[tuple[str, ...], Any]) -> dict[str, Any]:
    """Nested dicts holding each leaf at its path."""
    tree: dict[str, Any] = {}
    for path, leaf in leaves.items():
        node = tree
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = leaf
    return tree


def _caller(layer: Any) -> Callable[..., Any]:
    """``layer.apply`` for a Flax-style module, the layer itself for a function."""
    apply = getattr(layer, "apply", None)
    if callable(apply):
        return apply
    if callable(layer):
        return layer
    raise TypeError(f"{_FN}: build(case) must return a function f(variables, *inputs) or a "
                    f"module with .apply(variables, *inputs), got {type(layer).__name__}")


def _host(values: Any) -> np.ndarray:
    """A JAX array as NumPy, widened to float32 from bfloat16 (exactly)."""
    host = np.asarray(values)
    return host.astype(np.float32) if host.dtype.name == "bfloat16" else host


def _tangents(fn: str, given: Mapping[str, Any], names: Sequence[str],
              like: Mapping[str, Any]) -> dict[str, Any]:
    """``given`` as JAX arrays shaped and typed like ``like``, one per name in ``names``
    (zeros for a name not given); a ``ValueError`` for a name that is no differentiable
    array of the case."""
    import jax.numpy as jnp

    unknown = sorted(set(given) - set(names))
    if unknown:
        raise ValueError(f"{fn}: tangents for {unknown}, which are not differentiable arrays of "
                         f"the case (expected some of {list(names)})")
    return {name: jnp.asarray(given[name], dtype=like[name].dtype) if name in given
            else jnp.zeros_like(like[name]) for name in names}


def jax_implementation(
    build: Callable[[Case], Any],
    parameters: Mapping[str, str | tuple[str, Converter]],
    *,
    inputs: Sequence[str] = ("x",),
    data_format: str = "channels_first",
    supports: Supports | None = None,
    jvp: bool = True,
    hvp: bool | str = True,
    jit: bool = True,
) -> Implementation:
    """An :class:`~condconv_ref.testing.Implementation` of a JAX layer, with its ``vjp``,
    ``jvp`` and ``hvp`` from JAX's transforms.

    Parameters
    ----------
    build : callable
        ``build(case) -> layer``: the layer configured for the case's sizes and
        options (``case.arrays[...].shape``, ``case.options``), either a
        function ``layer(variables, *inputs) -> y`` (plain or
        :func:`jax.jit`-compiled) or a module with ``.apply(variables,
        *inputs)``, as a ``flax.linen.Module`` has (Flax itself is not
        needed).  Raise :class:`~condconv_ref.testing.Unsupported` for a case
        the layer cannot take.
    parameters : mapping
        Reference array name -> its place in ``variables``, the keys of the
        nested dicts joined by ``/`` (``"experts"``, or
        ``"params/Dense_0/kernel"`` for Flax), or a pair ``(place, converter)``
        with ``converter(array, case)`` turning the reference's layout into
        yours, e.g. ``lambda w, case: layouts.to_flax_dense(w)``.  Converters
        get JAX arrays and must be differentiable JAX code (the converters of
        :mod:`condconv_ref.layouts` are): JAX differentiates through them, so
        gradients come back in the reference's layout.  Every array of a case
        must be mapped here or named in ``inputs``, or the case fails naming it.
    inputs : sequence of str
        Case arrays passed positionally after ``variables``: ``("x",)``, or
        ``("x", "routing")`` for the external-routing variants.
    data_format : {'channels_first', 'channels_last'}
        The layer's layout of ``x`` and of its output: ``'channels_last'``
        (B, \\*spatial, C), Flax's, hands ``x`` over and reads the output back
        in it (the cotangent and tangents follow, through JAX).  The linear
        variant's (B, F) is the same in both.
    supports : Supports, optional
        Carried into the :class:`Implementation` for the checker.
    jvp : bool, optional
        Supply ``jvp`` (default), so the layer's forward mode is checked; set
        False for a layer with a :func:`jax.custom_vjp`, through which JAX has
        no forward mode.
    hvp : bool or {'forward-over-reverse', 'reverse-over-reverse'}, optional
        Supply ``hvp`` too (default), so the layer's second order is checked
        where the variant has a reference Hessian-vector product
        (:func:`~condconv_ref.variants.hvp_variants`), and how it
        differentiates the VJP (see the module docstring): True is
        ``'forward-over-reverse'``; False leaves ``hvp`` out.
    jit : bool, optional
        Compile the forward and each derivative with :func:`jax.jit` for the
        case at hand (default): several times faster than running the layer
        op by op on the checker's small cases, though compiling still takes
        most of the time.  The layer may be jitted itself or not.  Set False
        for a layer that cannot be traced under ``jit`` (Python control flow
        on array values).

    Returns
    -------
    Implementation
        ``forward(case)`` returns the layer's output; ``vjp(case, cotangent)``
        the gradient of every differentiable case array
        (:attr:`~condconv_ref.variants.Case.differentiable`), in the
        reference's layout (zeros for an array the output does not depend
        on); ``jvp(case, tangents)`` the output's tangent; ``hvp(case,
        cotangent, tangents)`` the derivative of those gradients along the
        tangents (absent tangents are zero), keyed like them.  All are NumPy
        arrays, in float32 for a bfloat16 case.

    Raises
    ------
    TypeError, ValueError
        For a malformed ``parameters`` entry, a place taken twice, or a bad
        ``data_format``, ``jvp``, ``hvp`` or ``jit``.  The callables raise a
        ``ValueError`` for a float64 case while JAX's x64 mode is off, and for
        a case array that is neither mapped nor an input.

    Examples
    --------
    A Flax-style module: anything with ``.apply(variables, x)``.  This linear
    CondConv layer reads ``{"params": {"experts": (E, F_in, F_out), "routing":
    {"kernel": (F_in, E)}}}``, Flax's ``Dense`` layout, transposed from the
    reference's (:func:`condconv_ref.layouts.to_flax_dense`):

    >>> import jax
    >>> import jax.numpy as jnp
    >>> from condconv_ref import layouts
    >>> from condconv_ref.testing import Supports, check_implementation
    >>> class CondLinear:
    ...     def apply(self, variables, x):
    ...         params = variables["params"]
    ...         alpha = jax.nn.sigmoid(x @ params["routing"]["kernel"])
    ...         return jnp.einsum("be,bi,eio->bo", alpha, x, params["experts"])
    >>> flax_dense = lambda weight, case: layouts.to_flax_dense(weight)
    >>> layer = jax_implementation(
    ...     lambda case: CondLinear(),
    ...     {"experts": ("params/experts", flax_dense),
    ...      "route_weight": ("params/routing/kernel", flax_dense)},
    ...     supports=Supports(bias=(False,)))
    >>> report = check_implementation(layer, variant="cond_linear_layer", dtype="float32",
    ...                               max_examples=4)
    >>> report.passed, report.checked_jvp, report.checked_hvp
    (True, True, True)
    """
    for name, flag in (("jvp", jvp), ("jit", jit)):
        if not isinstance(flag, bool):
            raise TypeError(f"{_FN}: {name} must be True or False, got {flag!r}")
    if not isinstance(hvp, bool) and hvp not in HVP_MODES:
        raise ValueError(f"{_FN}: hvp must be True, False or one of {HVP_MODES}, got {hvp!r}")
    if data_format not in DATA_FORMATS:
        raise ValueError(f"{_FN}: data_format must be one of {DATA_FORMATS}, got "
                         f"{data_format!r}")
    mapping = parameter_mapping(_FN, parameters, "a place in the variables pytree")
    paths = _variables(mapping)
    inputs = tuple(inputs)
    channels_last = data_format == "channels_last"

    def to_layer(values: Any) -> Any:
        return layouts.to_channels_last(values) if channels_last and values.ndim > 2 else values

    def from_layer(values: Any) -> Any:
        return layouts.to_channels_first(values) if channels_last and values.ndim > 2 else values

    def model(case: Case) -> tuple[Callable[[dict[str, Any]], Any], dict[str, Any]]:
        """The layer as a function of the differentiable arrays (reference layouts in and
        out, the buffers held fixed), and those arrays, as JAX arrays."""
        import jax.numpy as jnp

        check_every_array_mapped(_FN, case, mapping, inputs, "variables")
        require_x64(_FN, case.dtype)
        dtype = getattr(jnp, case.dtype)  # bfloat16 arrives as float32 holding its values
        arrays = {name: jnp.asarray(a, dtype=dtype) for name, a in case.arrays.items()}
        call = _caller(build(case))

        def layer(differentiable: dict[str, Any]) -> Any:
            every = {**arrays, **differentiable}
            variables = _tree({paths[name]: every[name] if converter is None
                               else converter(every[name], case)
                               for name, (_, converter) in mapping.items() if name in every})
            return from_layer(call(variables, *(to_layer(every[name]) for name in inputs)))

        return layer, {name: arrays[name] for name in case.differentiable}

    def gradients(case: Case, cotangent: Any) -> tuple[Callable[[dict[str, Any]], Any],
                                                       dict[str, Any]]:
        """The VJP at ``cotangent`` as a function of the differentiable arrays, and them."""
        import jax
        import jax.numpy as jnp

        layer, differentiable = model(case)

        def pulled(point: dict[str, Any]) -> dict[str, Any]:
            output, pullback = jax.vjp(layer, point)
            return pullback(jnp.asarray(cotangent, dtype=output.dtype))[0]

        return pulled, differentiable

    def run(function: Callable[..., Any], *arguments: Any) -> Any:
        """``function(*arguments)``, compiled for these arguments' shapes (with ``jit``)."""
        import jax

        return jax.jit(function)(*arguments) if jit else function(*arguments)

    def forward(case: Case) -> np.ndarray:
        layer, differentiable = model(case)
        return _host(run(layer, differentiable))

    def vjp(case: Case, cotangent: Any) -> dict[str, np.ndarray]:
        pulled, differentiable = gradients(case, cotangent)
        return {name: _host(g) for name, g in run(pulled, differentiable).items()}

    def forward_mode(case: Case, tangents: Mapping[str, Any]) -> np.ndarray:
        import jax

        layer, differentiable = model(case)
        given = _tangents(f"{_FN} (jvp)", tangents, list(differentiable), differentiable)
        along = lambda point, tangent: jax.jvp(layer, (point,), (tangent,))[1]  # noqa: E731
        return _host(run(along, differentiable, given))

    def second_order(case: Case, cotangent: Any, tangents: Mapping[str, Any]
                     ) -> dict[str, np.ndarray]:
        import jax

        pulled, differentiable = gradients(case, cotangent)
        given = _tangents(f"{_FN} (hvp)", tangents, list(differentiable), differentiable)
        if hvp in (True, "forward-over-reverse"):
            along = lambda point, tangent: jax.jvp(pulled, (point,), (tangent,))[1]  # noqa: E731
        else:
            along = lambda point, tangent: jax.vjp(pulled, point)[1](tangent)[0]  # noqa: E731
        return {name: _host(h) for name, h in run(along, differentiable, given).items()}

    return Implementation(forward, vjp, supports, forward_mode if jvp else None,
                          second_order if hvp else None)
