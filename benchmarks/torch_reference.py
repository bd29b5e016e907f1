"""The same cases in PyTorch, with autograd, as the baseline of the timing ratios.

Convolutions use the grouped-convolution batch trick that PyTorch CondConv
layers use: mix the experts per example, fold the batch into the channels,
``x -> (1, B·C, *spatial)``, kernels ``(B·O, C/g, *k)``, and run one
convolution with ``groups = B·g``.  The linear case uses PyTorch's fastest
exact form, the E experts as one shared matmul weighted by the routing
(``F.linear`` to ``(B, E·F_out)``, then a batched sum); per-example mixed
weights would hold B·F_out·F_in numbers (1.25 GiB in float32 at S5).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from benchmarks.cases import Case, Unavailable

__all__ = ["TorchCase", "torch_case"]

_NAMES = ("x", "experts", "routing", "bias")
_LAYER_NAMES = ("x", "experts", "bias", "route_weight", "route_bias")


def _torch() -> Any:
    try:
        import torch
    except ImportError as exc:
        raise Unavailable(f"torch not installed ({exc})") from None
    return torch


def _conv_forward(case: Case, torch: Any) -> Callable[..., Any]:
    functional = torch.nn.functional
    convolve = {1: functional.conv1d, 2: functional.conv2d, 3: functional.conv3d}[case.nd]
    groups = case.in_channels if case.op == "depthwise" else case.groups

    def forward(x: Any, experts: Any, routing: Any, bias: Any) -> Any:
        batch, n_experts = routing.shape
        kernels = (routing @ experts.reshape(n_experts, -1)).reshape(
            (batch * experts.shape[1],) + tuple(experts.shape[2:]))
        y = convolve(x.reshape((1, -1) + tuple(x.shape[2:])), kernels,
                     (routing @ bias).reshape(-1), padding=case.kernel // 2,
                     groups=batch * groups)
        return y.reshape((batch, -1) + tuple(y.shape[2:]))

    return forward


def _layer_forward(case: Case, torch: Any) -> Callable[..., Any]:
    """CondConv's layer: sigmoid routing of the pooled input, then the convolution."""
    convolve = _conv_forward(case, torch)

    def forward(x: Any, experts: Any, bias: Any, route_weight: Any, route_bias: Any) -> Any:
        pooled = x.mean(dim=tuple(range(2, x.ndim)))
        routing = torch.sigmoid(pooled @ route_weight.T + route_bias)
        return convolve(x, experts, routing, bias)

    return forward


def _linear_forward(x: Any, experts: Any, routing: Any, bias: Any) -> Any:
    import torch

    n_experts, out_features, in_features = experts.shape
    outputs = torch.nn.functional.linear(x, experts.reshape(-1, in_features))
    outputs = outputs.reshape(x.shape[0], n_experts, out_features)
    return (routing.unsqueeze(1) @ outputs).squeeze(1) + routing @ bias


class TorchCase:
    """A case's arrays on a torch device, with timed ``forward`` and ``forward_backward``."""

    def __init__(self, case: Case, args: dict[str, np.ndarray], cotangent: np.ndarray,
                 device: str, threads: int | None) -> None:
        torch = _torch()
        if device == "cuda" and not torch.cuda.is_available():
            raise Unavailable("torch has no CUDA device")
        if threads is not None:
            torch.set_num_threads(threads)
        self.torch = torch
        self.device = device
        self.names = _LAYER_NAMES if case.op == "layer" else _NAMES
        self.function = {"linear": lambda case, torch: _linear_forward,
                         "layer": _layer_forward}.get(case.op, _conv_forward)(case, torch)
        self.inputs = [torch.tensor(args[name], device=device, requires_grad=True)
                       for name in self.names]
        self.cotangent = torch.tensor(cotangent, device=device)

    def synchronize(self) -> None:
        if self.device == "cuda":
            self.torch.cuda.synchronize()

    def forward(self) -> Any:
        """Inference forward (no autograd graph), like the library's forward."""
        with self.torch.no_grad():
            return self.function(*self.inputs)

    def forward_backward(self) -> tuple[Any, tuple[Any, ...]]:
        """Forward with autograd, then the gradients of every input for the cotangent."""
        y = self.function(*self.inputs)
        return y, self.torch.autograd.grad(y, self.inputs, self.cotangent)

    def results(self) -> dict[str, np.ndarray]:
        """``y`` and the gradients as NumPy arrays, named like the library's VJP keys."""
        y, grads = self.forward_backward()
        out = {"y": y.detach().cpu().numpy()}
        out.update({name: g.cpu().numpy() for name, g in zip(self.names, grads)})
        return out


def torch_case(case: Case, args: dict[str, np.ndarray], cotangent: np.ndarray, *,
               device: str = "cpu", threads: int | None = None) -> TorchCase:
    """Build the PyTorch counterpart of ``case``; raises :class:`Unavailable` without torch."""
    return TorchCase(case, args, cotangent, device, threads)
