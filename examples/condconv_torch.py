"""Check a PyTorch CondConv layer, written the way public code writes it, against the reference.

Two implementations of ``condconv_layer`` in 2-D:

* :class:`CondConv2d` -- the grouped-conv batch trick of timm and of most public
  code: the experts are stored flattened, (E, O*C/g*kh*kw); the per-example
  kernels ``routing @ weight`` are viewed as (B*O, C/g, kh, kw) and the whole
  batch is one convolution with ``groups = g*B``.  Routing is
  ``sigmoid(Linear(GAP(x)))``.  Unlike the layer this is modelled on, ``padding``
  is applied for ``padding_mode="zeros"`` too.
* :class:`LoopCondConv2d` -- the same parameters, one convolution per example
  (TensorFlow ``CondConv2D`` style).

Run ``python examples/condconv_torch.py [--examples N]``, or through the command
line tool: ``condconv-ref check examples/condconv_torch.py:factory --variant
condconv_layer`` (``:loop_factory`` for the loop).
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
"""2-D, symmetric padding (an int or one per dim), every padding mode, groups,
stride, dilation, with and without bias."""


class CondConv2d(nn.Module):
    """CondConv with the grouped-conv batch trick and flattened expert storage."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1,
                 groups=1, bias=True, padding_mode="zeros", num_experts=3, routing_bias=True):
        super().__init__()
        self.in_channels, self.out_channels, self.groups = in_channels, out_channels, groups
        self.kernel_size, self.stride = _pair(kernel_size), _pair(stride)
        self.padding, self.dilation = _pair(padding), _pair(dilation)
        self.padding_mode = padding_mode
        self._reversed_padding_repeated_twice = _reverse_repeat_tuple(self.padding, 2)
        self.num_experts = num_experts
        num_params = out_channels * (in_channels // groups) * self.kernel_size[0] \
            * self.kernel_size[1]
        self.weight = nn.Parameter(torch.randn(num_experts, num_params))
        self.bias = nn.Parameter(torch.randn(num_experts, out_channels)) if bias else None
        self.routing = nn.Linear(in_channels, num_experts, bias=routing_bias)

    def routing_weights(self, x):
        pooled = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return torch.sigmoid(self.routing(pooled))

    def mixed_parameters(self, routing_weights):
        """Per-example kernels (B*O, C/g, kh, kw) and biases (B*O,)."""
        batch = routing_weights.shape[0]
        weight = torch.matmul(routing_weights, self.weight)
        weight = weight.view(batch * self.out_channels, self.in_channels // self.groups,
                             *self.kernel_size)
        bias = None
        if self.bias is not None:
            bias = torch.matmul(routing_weights, self.bias).view(batch * self.out_channels)
        return weight, bias

    def convolve(self, x, weight, bias, groups):
        if self.padding_mode == "zeros":
            return F.conv2d(x, weight, bias, stride=self.stride, padding=self.padding,
                            dilation=self.dilation, groups=groups)
        padded = F.pad(x, self._reversed_padding_repeated_twice, mode=self.padding_mode)
        return F.conv2d(padded, weight, bias, stride=self.stride, dilation=self.dilation,
                        groups=groups)

    def forward(self, x):
        batch, channels, height, width = x.shape
        weight, bias = self.mixed_parameters(self.routing_weights(x))
        out = self.convolve(x.reshape(1, batch * channels, height, width), weight, bias,
                            self.groups * batch)
        return out.view(batch, self.out_channels, *out.shape[-2:])


class LoopCondConv2d(CondConv2d):
    """The same layer, one convolution per example with that example's kernel."""

    def forward(self, x):
        routing_weights = self.routing_weights(x)
        outputs = []
        for example, alpha in zip(x, routing_weights):
            weight, bias = self.mixed_parameters(alpha[None])
            outputs.append(self.convolve(example[None], weight, bias, self.groups))
        return torch.cat(outputs)


def build(layer_class):
    """``case -> module`` for ``torch_implementation``: sizes and options from the case."""

    def module_for(case):
        n_experts, out_channels, per_group, *kernel = case.arrays["experts"].shape
        options = case.options
        return layer_class(per_group * options["groups"], out_channels, tuple(kernel),
                           stride=options["stride"], padding=options["padding"],
                           dilation=options["dilation"], groups=options["groups"],
                           bias="bias" in case.arrays, padding_mode=options["padding_mode"],
                           num_experts=n_experts, routing_bias="route_bias" in case.arrays)

    return module_for


PARAMETERS = {
    "experts": ("weight", lambda experts, case: layouts.to_torch_flat_experts(experts)),
    "bias": "bias",
    "route_weight": "routing.weight",
    "route_bias": "routing.bias",
}
"""Reference array name -> module parameter (with the layout converter for the experts)."""


def factory():
    """The grouped-trick layer, for ``condconv-ref check``."""
    return torch_implementation(build(CondConv2d), PARAMETERS, supports=SUPPORTS)


def loop_factory():
    """The per-example loop, for ``condconv-ref check``."""
    return torch_implementation(build(LoopCondConv2d), PARAMETERS, supports=SUPPORTS)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=100)
    parser.add_argument("--dtype", default="float64", choices=("float64", "float32"))
    args = parser.parse_args(argv)
    passed = True
    for name, make in (("grouped-conv batch trick", factory), ("per-example loop", loop_factory)):
        report = check_implementation(make(), variant="condconv_layer", dtype=args.dtype,
                                      max_examples=args.examples, raise_on_failure=False)
        print(f"{name}: {report}")
        passed &= report.passed
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
