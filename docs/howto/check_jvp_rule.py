"""Check a custom ``torch.autograd.Function`` with a ``jvp`` rule: the how-to's script.

The CondConv layer of ``examples/condconv_torch.py`` with its routing's sigmoid
written as an ``autograd.Function`` with hand-written derivatives: ``backward``
for reverse mode and ``jvp`` for forward mode (``torch.func.jvp``,
``torch.autograd.forward_ad``).  ``wrong_rule_layer`` has a ``jvp`` rule that
forgets the factor ``1 - y``; ``layer`` has the right one.  Forward and
backward are right in both, so only a check of forward mode tells them apart:

    condconv-ref check docs/howto/check_jvp_rule.py:wrong_rule_layer --variant condconv_layer
    condconv-ref check docs/howto/check_jvp_rule.py:layer --variant condconv_layer

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
    """:math:`y = \\sigma(z)`, with :math:`\\bar z = \\bar y\\,y(1 - y)` and
    :math:`\\dot y = y(1 - y)\\,\\dot z`."""

    @staticmethod
    def forward(logits):
        return torch.sigmoid(logits)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(output)  # for backward
        ctx.save_for_forward(output)  # for jvp

    @staticmethod
    def backward(ctx, grad):
        (y,) = ctx.saved_tensors
        return grad * y * (1 - y)

    @staticmethod
    def jvp(ctx, tangent):
        (y,) = ctx.saved_tensors
        return tangent * y * (1 - y)


class WrongRuleSigmoid(Sigmoid):
    """The same forward and backward; the ``jvp`` rule forgets the factor ``1 - y``."""

    @staticmethod
    def jvp(ctx, tangent):
        (y,) = ctx.saved_tensors
        return tangent * y


class CustomRoutingCondConv2d(CondConv2d):
    """CondConv whose routing runs through :class:`Sigmoid`."""

    sigmoid = Sigmoid

    def routing_weights(self, x):
        return self.sigmoid.apply(self.routing(F.adaptive_avg_pool2d(x, 1).flatten(1)))


class WrongRuleCondConv2d(CustomRoutingCondConv2d):
    sigmoid = WrongRuleSigmoid


def layer():
    """The layer as the checker's ``forward``, ``vjp`` and ``jvp``."""
    return torch_implementation(build(CustomRoutingCondConv2d), PARAMETERS, supports=SUPPORTS)


def wrong_rule_layer():
    """The layer with the wrong ``jvp`` rule."""
    return torch_implementation(build(WrongRuleCondConv2d), PARAMETERS, supports=SUPPORTS)
