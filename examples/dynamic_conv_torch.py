"""Check a PyTorch Dynamic Convolution layer, written the way public code writes it.

:class:`DynamicConv2d` is the CondConv layer of ``condconv_torch.py`` (grouped-conv
batch trick, experts flattened to (E, O*C/g*kh*kw)) with the routing of Chen et
al. (2020): a squeeze-and-excitation MLP whose softmax over the experts is
taken at a temperature, ``softmax(fc2(relu(fc1(GAP(x)))) / T)``.

Run ``python examples/dynamic_conv_torch.py [--examples N]``, or
``condconv-ref check examples/dynamic_conv_torch.py:factory --variant dynamic_conv_layer``.
"""

from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F
from condconv_torch import SUPPORTS, CondConv2d
from torch import nn

from condconv_ref import layouts
from condconv_ref.testing import check_implementation
from condconv_ref.testing.torch_adapter import torch_implementation


class DynamicConv2d(CondConv2d):
    """CondConv with softmax-with-temperature attention over the experts."""

    def __init__(self, in_channels, out_channels, kernel_size, hidden, temperature,
                 routing_bias=False, **options):
        super().__init__(in_channels, out_channels, kernel_size, routing_bias=False, **options)
        del self.routing
        self.temperature = temperature
        self.fc1 = nn.Linear(in_channels, hidden, bias=routing_bias)
        self.fc2 = nn.Linear(hidden, self.num_experts, bias=routing_bias)

    def routing_weights(self, x):
        squeeze = F.adaptive_avg_pool2d(x, 1).flatten(1)
        logits = self.fc2(F.relu(self.fc1(squeeze)))
        return torch.softmax(logits / self.temperature, dim=-1)


def build(case):
    """``case -> module`` for ``torch_implementation``."""
    n_experts, out_channels, per_group, *kernel = case.arrays["experts"].shape
    options = dict(case.options)
    temperature = options.pop("temperature")
    in_channels = per_group * options["groups"]
    return DynamicConv2d(in_channels, out_channels, tuple(kernel),
                         hidden=case.arrays["fc1_weight"].shape[0], temperature=temperature,
                         routing_bias="fc1_bias" in case.arrays, bias="bias" in case.arrays,
                         num_experts=n_experts, **options)


PARAMETERS = {
    "experts": ("weight", lambda experts, case: layouts.to_torch_flat_experts(experts)),
    "bias": "bias",
    "fc1_weight": "fc1.weight",
    "fc1_bias": "fc1.bias",
    "fc2_weight": "fc2.weight",
    "fc2_bias": "fc2.bias",
}


def factory():
    """The layer, for ``condconv-ref check``."""
    return torch_implementation(build, PARAMETERS, supports=SUPPORTS)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=100)
    parser.add_argument("--dtype", default="float64", choices=("float64", "float32"))
    args = parser.parse_args(argv)
    report = check_implementation(factory(), variant="dynamic_conv_layer", dtype=args.dtype,
                                  max_examples=args.examples, raise_on_failure=False)
    print(report)
    return 0 if report.passed else 1


if __name__ == "__main__":
    sys.exit(main())
