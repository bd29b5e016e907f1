"""Check a layer's double backward (gradient penalties, meta-learning): the how-to's script.

The CondConv layer of ``check_jvp_rule.py``, whose routing's sigmoid is an
``autograd.Function`` with hand-written derivatives.  ``detached_layer``'s
``backward`` computes with the saved output detached, a common way to save
memory or silence a warning: its first derivatives are right, but
differentiating the backward again (``create_graph=True``) loses the sigmoid's
second derivative, silently.  ``layer`` (``check_jvp_rule.py``'s) keeps the
output in the graph.  Forward, backward and forward mode are right in both, so
only a check of second order tells them apart:

    condconv-ref check docs/howto/check_double_backward.py:detached_layer --variant condconv_layer
    condconv-ref check docs/howto/check_double_backward.py:layer --variant condconv_layer

(run from the repository root; the script imports ``check_jvp_rule.py`` beside it and
``examples/condconv_torch.py``).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from check_jvp_rule import (  # noqa: E402
    PARAMETERS,
    SUPPORTS,
    CustomRoutingCondConv2d,
    Sigmoid,
    build,
    layer,
)

from condconv_ref.testing.torch_adapter import torch_implementation  # noqa: E402

__all__ = ["detached_layer", "layer"]


class DetachedSigmoid(Sigmoid):
    """The same forward, backward values and ``jvp`` rule as ``check_jvp_rule.Sigmoid``; the
    backward's ``y`` is detached, so its derivative, :math:`\\bar y\\,\\sigma''(z)\\,\\dot z`,
    is lost."""

    @staticmethod
    def backward(ctx, grad):
        (y,) = ctx.saved_tensors
        y = y.detach()
        return grad * y * (1 - y)


class DetachedCondConv2d(CustomRoutingCondConv2d):
    sigmoid = DetachedSigmoid


def detached_layer():
    """The layer whose backward is not differentiable through ``y``."""
    return torch_implementation(build(DetachedCondConv2d), PARAMETERS, supports=SUPPORTS)
