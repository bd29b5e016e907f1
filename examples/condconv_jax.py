"""Check a CondConv layer written in JAX, and one written as a Flax-style module, against the
reference: forward, reverse mode, forward mode and second order.

Two implementations:

* :func:`condconv_layer` -- a JAX function of its parameters and its input,
  channels first: routing ``sigmoid(GAP(x) R^T + r)``, each example's kernel
  mixed from the experts, and the whole batch convolved at once by
  :func:`jax.lax.conv_general_dilated` with ``feature_group_count = B·groups``
  (the grouped-conv batch trick), every padding mode by ``jnp.pad``.  Its
  ``sigmoid`` is a parameter, so the how-to ``docs/howto/check_jax_layer.py``
  swaps in sigmoids with rules of their own.
* :class:`FlaxStyleCondConv` -- what a ``flax.linen`` CondConv looks like from
  outside: ``.apply(variables, x)`` on channels-last input, its experts stored
  as Flax ``Conv`` kernels (E, \\*k, C/g, O) and its routing as a ``Dense``
  layer ``Dense_0`` with the kernel (C, E); each example convolved by
  ``jax.vmap``.  It serves ``depthwise_condconv_layer`` too
  (``feature_group_count = C``).  Flax is not needed: the adapter only calls
  ``.apply``.

Check them with the command line tool: ``condconv-ref check
examples/condconv_jax.py:factory --variant condconv_layer`` (``:flax_factory`` for
the module, with ``--variant condconv_layer`` or ``depthwise_condconv_layer``).  float64 needs JAX's x64 mode, which the factories
switch on.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from condconv_ref import layouts
from condconv_ref.testing import Supports
from condconv_ref.testing.jax_adapter import jax_implementation

SUPPORTS = Supports(spatial_dims=(1, 2), max_size=5, max_batch=3)
"""1-D and 2-D, every padding form and mode, groups, stride, dilation, with and without
biases; small sizes, since each case compiles anew."""

FLAX_SUPPORTS = Supports(spatial_dims=(1, 2), padding_modes=("zeros",), max_size=5, max_batch=3)
"""The Flax-style module pads with zeros only."""

_PADDING_MODES = {"reflect": "reflect", "replicate": "edge", "circular": "wrap"}
"""The reference's padding modes (PyTorch's) as ``jnp.pad`` modes."""


def condconv_layer(sigmoid=jax.nn.sigmoid):
    """``build(case)`` for :func:`~condconv_ref.testing.jax_adapter.jax_implementation`: the
    CondConv layer ``layer(params, x)`` for the case's options, routed by ``sigmoid``."""

    def build(case):
        geometry = case.geometry

        def layer(params, x):
            batch, channels, nd = x.shape[0], x.shape[1], x.ndim - 2
            logits = x.mean(axis=tuple(range(2, x.ndim))) @ params["route_weight"].T
            alpha = sigmoid(logits + params["route_bias"] if "route_bias" in params else logits)
            kernels = jnp.tensordot(alpha, params["experts"], axes=1)  # (B, O, C/g, *k)
            out_channels = kernels.shape[1]
            padding = list(geometry.padding)
            if geometry.padding_mode != "zeros":
                x = jnp.pad(x, [(0, 0), (0, 0), *padding],
                            mode=_PADDING_MODES[geometry.padding_mode])
                padding = [(0, 0)] * nd
            y = jax.lax.conv_general_dilated(
                x.reshape(1, batch * channels, *x.shape[2:]),
                kernels.reshape(batch * out_channels, *kernels.shape[2:]),
                window_strides=geometry.stride, padding=padding,
                rhs_dilation=geometry.dilation, feature_group_count=batch * geometry.groups)
            y = y.reshape(batch, out_channels, *y.shape[2:])
            if "bias" in params:
                y = y + (alpha @ params["bias"]).reshape(batch, out_channels, *(1,) * nd)
            return y

        return layer

    return build


PARAMETERS = {name: name for name in ("experts", "bias", "route_weight", "route_bias")}
""":func:`condconv_layer` takes its parameters under the reference's names and layouts."""


class FlaxStyleCondConv:
    """A CondConv module with Flax's interface, channels last.

    ``.apply(variables, x)`` reads ``{"params": {"experts": (E, *k, C/g, O),
    "bias": (E, O), "Dense_0": {"kernel": (C, E), "bias": (E,)}}}``.
    """

    DIMENSIONS = {1: ("NWC", "WIO", "NWC"), 2: ("NHWC", "HWIO", "NHWC"),
                  3: ("NDHWC", "DHWIO", "NDHWC")}

    def __init__(self, case):
        self.geometry = case.geometry
        depthwise = case.variant == "depthwise_condconv_layer"
        self.groups = case.x.shape[1] if depthwise else self.geometry.groups

    def apply(self, variables, x):
        params, nd = variables["params"], x.ndim - 2
        dense = params["Dense_0"]
        logits = x.mean(axis=tuple(range(1, nd + 1))) @ dense["kernel"]
        alpha = jax.nn.sigmoid(logits + dense["bias"] if "bias" in dense else logits)
        kernels = jnp.tensordot(alpha, params["experts"], axes=1)  # (B, *k, C/g, O)

        def convolve(example, kernel):
            return jax.lax.conv_general_dilated(
                example[None], kernel, self.geometry.stride, list(self.geometry.padding),
                rhs_dilation=self.geometry.dilation, dimension_numbers=self.DIMENSIONS[nd],
                feature_group_count=self.groups)[0]

        y = jax.vmap(convolve)(x, kernels)
        if "bias" in params:
            y = y + (alpha @ params["bias"]).reshape(x.shape[0], *(1,) * nd, -1)
        return y


FLAX_PARAMETERS = {
    "experts": ("params/experts", lambda experts, case: layouts.to_flax_experts(experts)),
    "bias": "params/bias",
    "route_weight": ("params/Dense_0/kernel", lambda weight, case: layouts.to_flax_dense(weight)),
    "route_bias": "params/Dense_0/bias",
}
"""Reference array name -> place in the module's variables (with the layout converters)."""


def factory():
    """The JAX function, for ``condconv-ref check``."""
    jax.config.update("jax_enable_x64", True)  # float64 cases run in float64
    return jax_implementation(condconv_layer(), PARAMETERS, supports=SUPPORTS)


def flax_factory():
    """The Flax-style module, channels last, for ``condconv-ref check``."""
    jax.config.update("jax_enable_x64", True)
    return jax_implementation(FlaxStyleCondConv, FLAX_PARAMETERS, data_format="channels_last",
                              supports=FLAX_SUPPORTS)
