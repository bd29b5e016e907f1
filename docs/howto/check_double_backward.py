"""Check a layer's double backward (gradient penalties, meta-learning): the how-to's script.

The CondConv layer of ``examples/condconv_torch.py`` with its routing's sigmoid
written as an ``autograd.Function`` with hand-written derivatives.
``detached_layer``'s ``backward`` computes with the saved output detached, a
common way to save memory or silence a warning: its first derivatives are
right, but differentiating the backward again (``create_graph=True``) loses
the sigmoid's second derivative, silently.  ``layer`` keeps the output in the
graph.  Forward, backward and forward mode are right in both, so only a check
of second order tells them apart:

    condconv-ref check docs/howto/check_double_backward.py:detached_layer --variant condconv_layer
    condconv-ref check docs/howto/check_double_backward.py:layer --variant condconv_layer

(run from the repository root; the script imports ``examples/condconv_torch.py``).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))
from condconv_torch import PARAMETERS, SUPPORTS, CondConv2d, build  # noqa: E402

from condconv_ref.testing.torch_adapter import torch_implementation  # noqa: E402


class Sigmoid(torch.autograd.Function):
    """:math:`y = \\sigma(z)`, with :math:`\\bar z = \\bar y\\,y(1 - y)`, differentiable
    again: ``y`` is saved as an output, so autograd differentiates through it."""

    @staticmethod
    def forward(logits):
        return torch.sigmoid(logits)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(output)
        ctx.save_for_forward(output)

    @staticmethod
    def backward(ctx, grad):
        (y,) = ctx.saved_tensors
        return grad * y * (1 - y)

    @staticmethod
    def jvp(ctx, tangent):
        (y,) = ctx.saved_tensors
        return tangent * y * (1 - y)


class DetachedSigmoid(Sigmoid):
    """The same forward, backward values and ``jvp``; the backward's ``y`` is detached, so
    its derivative, :math:`\\bar y\\,\\sigma''(z)`, is lost."""

    @staticmethod
    def backward(ctx, grad):
        (y,) = ctx.saved_tensors
        y = y.detach()
        return grad * y * (1 - y)


class CustomRoutingCondConv2d(CondConv2d):
    """CondConv whose routing runs through :class:`Sigmoid`."""

    sigmoid = Sigmoid

    def routing_weights(self, x):
        return self.sigmoid.apply(self.routing(F.adaptive_avg_pool2d(x, 1).flatten(1)))


class DetachedCondConv2d(CustomRoutingCondConv2d):
    sigmoid = DetachedSigmoid


def layer():
    """The layer as the checker's ``forward``, ``vjp``, ``jvp`` and ``hvp``."""
    return torch_implementation(build(CustomRoutingCondConv2d), PARAMETERS, supports=SUPPORTS)


def detached_layer():
    """The layer whose backward is not differentiable through ``y``."""
    return torch_implementation(build(DetachedCondConv2d), PARAMETERS, supports=SUPPORTS)
