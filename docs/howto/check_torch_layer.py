"""Check a PyTorch CondConv layer against condconv_ref: the how-to's script.

The layer is written the way much public PyTorch code writes CondConv
in PyTorch: experts stored flattened (E, O*C/g*kh*kw), sigmoid routing from
nn.Linear on the pooled input, and the grouped-conv batch trick.  Its zeros
path calls ``F.conv2d(..., padding="valid")`` and so ignores ``padding``.  The
script checks three versions of it: ``bug="padding"`` as written,
``bug="detached"`` with the padding fixed but the routing detached from the
autograd graph (a right forward pass, a wrong gradient), and ``bug=None``.

    python docs/howto/check_torch_layer.py            # print the three reports
    python docs/howto/check_torch_layer.py --write    # refresh check_torch_layer.out.txt
    condconv-ref check docs/howto/check_torch_layer.py:seed_layer --variant condconv_layer

The committed ``check_torch_layer.out.txt`` is this script's output;
``tests/test_docs.py`` reruns the script (when torch is installed) and checks
that it still prints the same reports, timings aside.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.utils import _pair, _reverse_repeat_tuple

from condconv_ref import layouts
from condconv_ref.testing import Supports, check_implementation
from condconv_ref.testing.torch_adapter import torch_implementation

OUTPUT = Path(__file__).with_suffix(".out.txt")


class CondConv2D(nn.Module):
    """A CondConv layer as public code writes it, with the bug ``bug`` ("padding",
    "detached" or None)."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0,
                 dilation=1, groups=1, padding_mode="zeros", num_experts=3, bug=None):
        super().__init__()
        self.out_channels, self.groups, self.bug = out_channels, groups, bug
        self.kernel_size, self.stride = _pair(kernel_size), _pair(stride)
        self.padding, self.dilation = _pair(padding), _pair(dilation)
        self.padding_mode = padding_mode
        self.reversed_padding = _reverse_repeat_tuple(self.padding, 2)
        self.kernel_shape = (in_channels // groups, *self.kernel_size)
        params = out_channels * in_channels // groups * self.kernel_size[0] * self.kernel_size[1]
        self.weight = nn.Parameter(torch.empty(num_experts, params))
        self.bias = nn.Parameter(torch.empty(num_experts, out_channels))
        self.routing = nn.Linear(in_channels, num_experts)

    def forward(self, x):
        B, C, H, W = x.shape
        routing_weights = torch.sigmoid(self.routing(F.adaptive_avg_pool2d(x, 1).flatten(1)))
        if self.bug == "detached":
            routing_weights = routing_weights.detach()
        weight = torch.matmul(routing_weights, self.weight)
        weight = weight.view(B * self.out_channels, *self.kernel_shape)
        bias = torch.matmul(routing_weights, self.bias).view(B * self.out_channels)
        x = x.reshape(1, B * C, H, W)
        if self.padding_mode == "zeros":
            out = F.conv2d(x, weight, bias, stride=self.stride,
                           padding="valid" if self.bug == "padding" else self.padding,
                           dilation=self.dilation, groups=self.groups * B)
        else:
            out = F.conv2d(F.pad(x, self.reversed_padding, mode=self.padding_mode), weight,
                           bias, stride=self.stride, dilation=self.dilation,
                           groups=self.groups * B)
        return out.view(B, self.out_channels, *out.shape[-2:])


def implementation(bug):
    """The layer as the checker's ``forward`` and ``vjp`` (autograd), for ``condconv_layer``."""

    def build(case):
        experts, options = case.arrays["experts"], case.options
        return CondConv2D(case.arrays["x"].shape[1], experts.shape[1], experts.shape[3:],
                          stride=options["stride"], padding=options["padding"],
                          dilation=options["dilation"], groups=options["groups"],
                          padding_mode=options["padding_mode"], num_experts=experts.shape[0],
                          bug=bug)

    return torch_implementation(
        build,
        {"experts": ("weight", lambda experts, case: layouts.to_torch_flat_experts(experts)),
         "bias": "bias", "route_weight": "routing.weight", "route_bias": "routing.bias"},
        # What the layer supports: 2-D, one int of padding, every mode, and always
        # both biases (the layer has no switch to turn them off).
        supports=Supports(spatial_dims=(2,), padding_forms=("int",), bias=(True,)))


def seed_layer():
    """The layer as published, for ``condconv-ref check FILE.py:seed_layer``."""
    return implementation("padding")


def fixed_layer():
    """The layer with its padding fixed, for ``condconv-ref check FILE.py:fixed_layer``."""
    return implementation(None)


def reports() -> str:
    lines = []
    for bug in ("padding", "detached", None):
        report = check_implementation(implementation(bug), variant="condconv_layer",
                                      max_examples=100, seed=0, raise_on_failure=False)
        lines += [f"# bug={bug!r}", str(report), ""]
    return "\n".join(lines)


if __name__ == "__main__":
    text = reports()
    print(text)
    if "--write" in sys.argv[1:]:
        OUTPUT.write_text(text)
