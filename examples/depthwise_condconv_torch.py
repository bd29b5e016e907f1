"""Check a depthwise CondConv with external routing, as EfficientNet-CondConv blocks use it.

In an EfficientNet-CondConv block (TensorFlow's ``DepthwiseCondConv2D``,
timm's ``CondConv2d`` with ``groups`` equal to the channels) the block computes
one routing vector and hands it to its convolutions: the depthwise layer takes
``routing_weights`` as an argument.  Its reference is the
``depthwise_condconv`` variant: ``x`` and ``routing`` are inputs, the experts
(E, C*m, 1, kh, kw) and bias (E, C*m) parameters; output channel ``c*m + j`` is
input channel ``c``'s ``j``-th filter.

:class:`DepthwiseCondConv2d` stores the experts flattened, (E, C*m*kh*kw), and
runs the whole batch as one convolution with ``groups = C*B`` (the grouped-conv
batch trick).

Run ``python examples/depthwise_condconv_torch.py [--examples N]``, or
``condconv-ref check examples/depthwise_condconv_torch.py:factory --variant
depthwise_condconv``.
"""

from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.utils import _pair, _reverse_repeat_tuple

from condconv_ref import layouts
from condconv_ref.testing import Supports, check_implementation
from condconv_ref.testing.torch_adapter import torch_implementation

SUPPORTS = Supports(spatial_dims=(2,), padding_forms=("int", "per_dim"))
"""2-D, symmetric padding (an int or one per dim), every padding mode, stride, dilation,
depth multipliers, with and without bias."""


class DepthwiseCondConv2d(nn.Module):
    """Depthwise CondConv with routing weights given to ``forward``."""

    def __init__(self, channels, kernel_size, depth_multiplier=1, stride=1, padding=0,
                 dilation=1, bias=True, padding_mode="zeros", num_experts=3):
        super().__init__()
        self.channels, self.out_channels = channels, channels * depth_multiplier
        self.kernel_size, self.stride = _pair(kernel_size), _pair(stride)
        self.padding, self.dilation, self.padding_mode = _pair(padding), _pair(dilation), \
            padding_mode
        self._reversed_padding_repeated_twice = _reverse_repeat_tuple(self.padding, 2)
        size = self.out_channels * self.kernel_size[0] * self.kernel_size[1]
        self.weight = nn.Parameter(torch.randn(num_experts, size))
        self.bias = nn.Parameter(torch.randn(num_experts, self.out_channels)) if bias else None

    def forward(self, x, routing_weights):
        batch, channels, height, width = x.shape
        weight = (routing_weights @ self.weight).view(batch * self.out_channels, 1,
                                                      *self.kernel_size)
        bias = None if self.bias is None else (routing_weights @ self.bias).flatten()
        x = x.reshape(1, batch * channels, height, width)
        padding = self.padding
        if self.padding_mode != "zeros":
            x = F.pad(x, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            padding = 0
        out = F.conv2d(x, weight, bias, stride=self.stride, padding=padding,
                       dilation=self.dilation, groups=batch * channels)
        return out.view(batch, self.out_channels, *out.shape[-2:])


def build(case):
    """The module for ``case``: sizes and options from the case."""
    n_experts, out_channels, _, *kernel = case.arrays["experts"].shape
    options = case.options
    return DepthwiseCondConv2d(case.x.shape[1], tuple(kernel),
                               depth_multiplier=options["depth_multiplier"],
                               stride=options["stride"], padding=options["padding"],
                               dilation=options["dilation"], bias="bias" in case.arrays,
                               padding_mode=options["padding_mode"], num_experts=n_experts)


PARAMETERS = {
    "experts": ("weight", lambda experts, case: layouts.to_torch_flat_experts(experts)),
    "bias": "bias",
}
"""Reference array name -> module parameter (with the layout converter for the experts);
``x`` and ``routing`` are the module's inputs."""


def factory():
    """The layer, for ``condconv-ref check --variant depthwise_condconv``."""
    return torch_implementation(build, PARAMETERS, inputs=("x", "routing"), supports=SUPPORTS)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=100)
    parser.add_argument("--dtype", default="float64", choices=("float64", "float32"))
    args = parser.parse_args(argv)
    report = check_implementation(factory(), variant="depthwise_condconv", dtype=args.dtype,
                                  max_examples=args.examples, raise_on_failure=False)
    print(f"depthwise CondConv, external routing: {report}")
    return 0 if report.passed else 1


if __name__ == "__main__":
    sys.exit(main())
