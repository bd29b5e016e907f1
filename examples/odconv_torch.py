"""Check a PyTorch ODConv layer, built the way the authors' module builds it.

:class:`ODConv2d` follows the structure of the ODConv authors' module (Li, Zhou
and Yao, ICLR 2022): an attention trunk of 1x1 convolutions (``fc``, a
``BatchNorm2d``, ReLU), then a channel, a filter, a spatial and a kernel
attention head, each a 1x1 convolution whose output is divided by the
temperature, and the per-example kernels convolved with the grouped-conv batch
trick.  As in that module, a head can be left out (the filter head of a
depthwise layer, the spatial head of a 1x1 kernel, the kernel head of a single
expert); here the case decides which heads the layer has, and whether its batch
norm runs in train or eval mode.

Run ``python examples/odconv_torch.py [--examples N]``, or
``condconv-ref check examples/odconv_torch.py:factory --variant odconv_layer``.
"""

from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F
from torch import nn

from condconv_ref.testing import Supports, check_implementation
from condconv_ref.testing.torch_adapter import torch_implementation

SUPPORTS = Supports(spatial_dims=(2,), padding_forms=("int", "per_dim"), padding_modes=("zeros",))
"""2-D, symmetric zero padding, groups, stride, dilation, any heads, both batch-norm modes."""

HEADS = ("channel", "filter", "spatial", "kernel")


class ODConv2d(nn.Module):
    """Omni-dimensional dynamic convolution with the authors' parameter names."""

    def __init__(self, in_planes, out_planes, kernel_size, stride=1, padding=0, dilation=1,
                 groups=1, kernel_num=4, attention_channel=16, temperature=1.0,
                 heads=HEADS, head_bias=HEADS):
        super().__init__()
        self.in_planes, self.out_planes, self.groups = in_planes, out_planes, groups
        self.kernel_size = tuple(kernel_size)
        self.stride, self.padding, self.dilation = stride, padding, dilation
        self.kernel_num, self.temperature = kernel_num, temperature
        self.fc = nn.Conv2d(in_planes, attention_channel, 1, bias=False)
        self.bn = nn.BatchNorm2d(attention_channel)
        sizes = {"channel": in_planes, "filter": out_planes,
                 "spatial": self.kernel_size[0] * self.kernel_size[1], "kernel": kernel_num}
        for head in HEADS:
            setattr(self, f"{head}_fc", nn.Conv2d(attention_channel, sizes[head], 1,
                                                  bias=head in head_bias)
                    if head in heads else None)
        self.weight = nn.Parameter(torch.randn(kernel_num, out_planes, in_planes // groups,
                                               *self.kernel_size))

    def attention(self, head, hidden):
        """A head's attention, (B, N): softmax over the experts, sigmoid otherwise."""
        logits = getattr(self, f"{head}_fc")(hidden).flatten(1) / self.temperature
        return torch.softmax(logits, dim=1) if head == "kernel" else torch.sigmoid(logits)

    def forward(self, x):
        batch = x.shape[0]
        hidden = F.relu(self.bn(self.fc(F.adaptive_avg_pool2d(x, 1))))
        weight = self.weight
        if self.kernel_fc is not None:
            weight = torch.einsum("be,eoikl->boikl", self.attention("kernel", hidden), weight)
        else:
            weight = weight.sum(dim=0).expand(batch, *weight.shape[1:])
        if self.spatial_fc is not None:
            weight = weight * self.attention("spatial", hidden).view(batch, 1, 1,
                                                                    *self.kernel_size)
        if self.channel_fc is not None:
            x = x * self.attention("channel", hidden).view(batch, -1, 1, 1)
        output = F.conv2d(x.reshape(1, -1, *x.shape[2:]),
                          weight.reshape(-1, self.in_planes // self.groups, *self.kernel_size),
                          stride=self.stride, padding=self.padding, dilation=self.dilation,
                          groups=self.groups * batch)
        output = output.view(batch, self.out_planes, *output.shape[2:])
        if self.filter_fc is not None:
            output = output * self.attention("filter", hidden).view(batch, -1, 1, 1)
        return output


def build(case):
    """``case -> module`` for ``torch_implementation``: sizes, heads and mode from the case."""
    kernel_num, out_planes, per_group, *kernel = case.arrays["experts"].shape
    options = case.options
    module = ODConv2d(per_group * options["groups"], out_planes, kernel,
                      stride=options["stride"], padding=options["padding"],
                      dilation=options["dilation"], groups=options["groups"],
                      kernel_num=kernel_num, attention_channel=case.arrays["fc_weight"].shape[0],
                      temperature=options["temperature"],
                      heads=[head for head in HEADS if f"{head}_weight" in case.arrays],
                      head_bias=[head for head in HEADS if f"{head}_bias" in case.arrays])
    for name, fixed in (("weight", 1.0), ("bias", 0.0)):
        if f"bn_{name}" not in case.arrays:  # a batch-norm affine part the case leaves out:
            del module.bn._parameters[name]  # a constant (1 or 0), not a parameter
            module.bn.register_buffer(name, torch.full((module.bn.num_features,), fixed))
    return module.train(options["batch_norm"] == "train")


def _conv1x1(matrix, case):
    """A 2-D head or fc weight (N, A) as the module's 1x1 convolution weight (N, A, 1, 1)."""
    return matrix[..., None, None]


PARAMETERS = {
    "experts": "weight",
    "fc_weight": ("fc.weight", _conv1x1),
    "bn_weight": "bn.weight",
    "bn_bias": "bn.bias",
    "bn_running_mean": "bn.running_mean",
    "bn_running_var": "bn.running_var",
    **{f"{head}_weight": (f"{head}_fc.weight", _conv1x1) for head in HEADS},
    **{f"{head}_bias": f"{head}_fc.bias" for head in HEADS},
}
"""Reference array name -> module parameter or buffer."""


def factory():
    """The layer, for ``condconv-ref check``."""
    return torch_implementation(build, PARAMETERS, supports=SUPPORTS)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=100)
    parser.add_argument("--dtype", default="float64", choices=("float64", "float32"))
    args = parser.parse_args(argv)
    report = check_implementation(factory(), variant="odconv_layer", dtype=args.dtype,
                                  max_examples=args.examples, raise_on_failure=False)
    print(report)
    return 0 if report.passed else 1


if __name__ == "__main__":
    sys.exit(main())
