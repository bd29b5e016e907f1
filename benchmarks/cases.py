"""The benchmark cases S1-S6: shapes, inputs, the ops under test and their FLOPs.

===  ===  ==========  ========  ==  ==  ================================
case  B   channels    size      k   E   op
===  ===  ==========  ========  ==  ==  ================================
S1     4  8 -> 8      16x16     3   4   condconv (property-test size)
S2     8  32 -> 64    32x32     3   4   condconv
S3    32  64 -> 128   28x28     3   8   condconv (EfficientNet-like)
S4    32  128         28x28     5   8   depthwise_condconv (groups=128)
S5   256  1280->1000  -         -   8   cond_linear
S6     8  16 -> 32    16x16x16  3   4   condconv, 3-D
===  ===  ==========  ========  ==  ==  ================================

Every convolution uses stride 1 and 'same' padding (k // 2 on each side), a
bias per expert, and routing weights drawn from U(0, 1) like sigmoid outputs.
The ops are imported when first used, so a case whose op does not exist yet
reports "not available" instead of failing the run.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["CASES", "Case", "Unavailable"]

# op kind -> (module, forward, vjp, mixture-of-experts forward, its vjp)
_OPS = {
    "condconv": ("condconv_ref.condconv", "condconv", "condconv_vjp",
                 "moe_condconv", "moe_condconv_vjp"),
    "depthwise": ("condconv_ref.depthwise", "depthwise_condconv", "depthwise_condconv_vjp",
                  None, None),
    "linear": ("condconv_ref.linear", "cond_linear", "cond_linear_vjp",
               "moe_cond_linear", "moe_cond_linear_vjp"),
}


class Unavailable(Exception):
    """An op of the library (or a backend) that this run cannot use; the message is one line."""


def _import_op(module: str, name: str) -> Callable[..., Any]:
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as exc:
        raise Unavailable(f"{name} not available ({module}: {exc})") from None


@dataclass(frozen=True)
class Case:
    """One benchmark shape.  For ``linear`` the channels are features and there is no kernel."""

    name: str
    op: str
    batch: int
    in_channels: int
    out_channels: int
    spatial: tuple[int, ...]
    kernel: int
    experts: int
    note: str = ""

    @property
    def nd(self) -> int:
        return len(self.spatial)

    @property
    def options(self) -> dict[str, Any]:
        """Keyword options of the op: 'same' padding for the convolutions."""
        return {} if self.op == "linear" else {"padding": self.kernel // 2}

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Argument shapes of the op, plus ``"y"``, the output's."""
        b, c, o, e, k = self.batch, self.in_channels, self.out_channels, self.experts, self.kernel
        if self.op == "linear":
            return {"x": (b, c), "experts": (e, o, c), "routing": (b, e), "bias": (e, o),
                    "y": (b, o)}
        in_per_group = 1 if self.op == "depthwise" else c
        return {"x": (b, c) + self.spatial, "experts": (e, o, in_per_group) + (k,) * self.nd,
                "routing": (b, e), "bias": (e, o), "y": (b, o) + self.spatial}

    def describe(self) -> str:
        size = "x".join(map(str, self.spatial)) or "-"
        channels = f"{self.in_channels}" if self.op == "depthwise" else \
            f"{self.in_channels}->{self.out_channels}"
        kernel = f"k={self.kernel}" if self.kernel else "linear"
        return f"B={self.batch} {channels} {size} {kernel} E={self.experts} {self.op}"

    def forward_flops(self) -> int:
        """Nominal FLOPs of the forward: 2 per multiply-add of the convolution (or linear map).

        The kernel mixing (2·B·E per kernel entry) is not counted; it is about
        E / (output positions) of the total for the convolutions.  For the
        linear case both exact forms do 2·B·E·F_out·F_in.  The VJP does twice
        the forward's FLOPs (kernel gradient and input gradient), so a
        forward + VJP counts 3x.
        """
        b, c, o, e, k = self.batch, self.in_channels, self.out_channels, self.experts, self.kernel
        if self.op == "linear":
            return 2 * b * e * o * c
        positions = math.prod(self.spatial)
        in_per_group = 1 if self.op == "depthwise" else c
        return 2 * b * o * in_per_group * k ** self.nd * positions

    def arrays(self, dtype: str, seed: int = 0) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """NumPy ``(args, cotangent)`` in ``dtype``; kernels scaled by 1/sqrt(fan-in)."""
        rng = np.random.default_rng(seed)
        shapes = self.shapes
        fan_in = math.prod(shapes["experts"][2:])
        args = {
            "x": rng.standard_normal(shapes["x"]),
            "experts": rng.standard_normal(shapes["experts"]) / math.sqrt(fan_in),
            "routing": rng.uniform(size=shapes["routing"]),
            "bias": 0.1 * rng.standard_normal(shapes["bias"]),
        }
        cotangent = rng.standard_normal(shapes["y"])
        return {k: v.astype(dtype) for k, v in args.items()}, cotangent.astype(dtype)

    def ops(self) -> tuple[Callable[..., Any], Callable[..., Any]]:
        """``(f, f_vjp)`` from the library; raises :class:`Unavailable` if they do not exist."""
        module, forward, vjp, _, _ = _OPS[self.op]
        return _import_op(module, forward), _import_op(module, vjp)

    def moe_ops(self) -> tuple[Callable[..., Any], Callable[..., Any]] | None:
        """The mixture-of-experts form ``(f, f_vjp)``, or None where the library has none."""
        module, _, _, forward, vjp = _OPS[self.op]
        if forward is None:
            return None
        return _import_op(module, forward), _import_op(module, vjp)


CASES = {
    case.name: case
    for case in (
        Case("S1", "condconv", 4, 8, 8, (16, 16), 3, 4, "property-test size"),
        Case("S2", "condconv", 8, 32, 64, (32, 32), 3, 4),
        Case("S3", "condconv", 32, 64, 128, (28, 28), 3, 8, "EfficientNet-like"),
        Case("S4", "depthwise", 32, 128, 128, (28, 28), 5, 8, "depthwise (groups=128)"),
        Case("S5", "linear", 256, 1280, 1000, (), 0, 8, "linear CondConv"),
        Case("S6", "condconv", 8, 16, 32, (16, 16, 16), 3, 4, "3-D"),
    )
}
