"""Check a JAX layer in reverse mode, forward mode and at second order: the how-to's script.

The CondConv layer of ``examples/condconv_jax.py`` with its routing's sigmoid
given derivatives of its own, each wrong in one place:

* ``wrong_rule_layer``: a ``jax.custom_jvp`` rule that forgets the factor
  ``1 - y``.  JAX reverses the same rule, so the JVP and the gradients are wrong;
* ``wrong_backward_layer``: a ``jax.custom_vjp`` backward that forgets it; the
  forward mode is JAX's own (none: JAX refuses forward mode through a ``custom_vjp``);
* ``first_order_layer``: a ``custom_jvp`` rule right to first order that holds
  ``y(1 - y)`` constant (``jax.lax.stop_gradient``), so the layer's Hessian-vector
  product misses the sigmoid's second derivative.

``layer`` and ``custom_vjp_layer`` are right (the latter has no forward mode).  Run
from the repository root::

    condconv-ref check docs/howto/check_jax_layer.py:wrong_rule_layer --variant condconv_layer
    condconv-ref check docs/howto/check_jax_layer.py:custom_vjp_layer --variant condconv_layer
    condconv-ref check docs/howto/check_jax_layer.py:wrong_backward_layer \\
        --variant condconv_layer --no-jvp
    condconv-ref check docs/howto/check_jax_layer.py:first_order_layer --variant condconv_layer
"""

from __future__ import annotations

import sys
from pathlib import Path

import jax

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))
from condconv_jax import PARAMETERS, SUPPORTS, condconv_layer  # noqa: E402

from condconv_ref.testing.jax_adapter import jax_implementation  # noqa: E402


def custom_jvp_sigmoid(slope):
    """A sigmoid whose forward mode is ``slope(y)`` times the tangent."""

    @jax.custom_jvp
    def sigmoid(z):
        return jax.nn.sigmoid(z)

    @sigmoid.defjvp
    def rule(primals, tangents):
        y = jax.nn.sigmoid(primals[0])
        return y, slope(y) * tangents[0]

    return sigmoid


wrong_rule_sigmoid = custom_jvp_sigmoid(lambda y: y)  # forgets the factor 1 - y
first_order_sigmoid = custom_jvp_sigmoid(  # right, but y(1 - y) is held constant
    lambda y: jax.lax.stop_gradient(y * (1 - y)))


def custom_vjp_sigmoid(backward):
    """A sigmoid whose reverse mode is ``backward(y, cotangent)``."""

    @jax.custom_vjp
    def sigmoid(z):
        return jax.nn.sigmoid(z)

    def forward(z):
        y = jax.nn.sigmoid(z)
        return y, y

    sigmoid.defvjp(forward, lambda y, cotangent: (backward(y, cotangent),))
    return sigmoid


backward_sigmoid = custom_vjp_sigmoid(lambda y, cotangent: cotangent * y * (1 - y))
wrong_backward_sigmoid = custom_vjp_sigmoid(lambda y, cotangent: cotangent * y)
first_order_backward_sigmoid = custom_vjp_sigmoid(
    lambda y, cotangent: cotangent * jax.lax.stop_gradient(y * (1 - y)))


def _x64():
    jax.config.update("jax_enable_x64", True)  # float64 cases run in float64


def layer():
    """The layer, right in every mode."""
    _x64()
    return jax_implementation(condconv_layer(), PARAMETERS, supports=SUPPORTS)


def wrong_rule_layer():
    """The layer whose sigmoid has the wrong ``custom_jvp`` rule."""
    _x64()
    return jax_implementation(condconv_layer(wrong_rule_sigmoid), PARAMETERS,
                              supports=SUPPORTS)


def first_order_layer():
    """The layer whose sigmoid's rule is right to first order only."""
    _x64()
    return jax_implementation(condconv_layer(first_order_sigmoid), PARAMETERS,
                              supports=SUPPORTS)


def custom_vjp_layer(backward=backward_sigmoid):
    """The layer with a ``custom_vjp`` sigmoid, which JAX cannot run in forward mode (check
    it with ``--no-jvp``); its Hessian-vector product by reverse over reverse."""
    _x64()
    return jax_implementation(condconv_layer(backward), PARAMETERS, supports=SUPPORTS,
                              hvp="reverse-over-reverse")


def wrong_backward_layer():
    """The layer whose ``custom_vjp`` backward forgets the factor ``1 - y``."""
    return custom_vjp_layer(wrong_backward_sigmoid)


def first_order_backward_layer():
    """The ``custom_vjp`` layer whose backward is right to first order only."""
    return custom_vjp_layer(first_order_backward_sigmoid)
