"""Peak extra memory of the convolutions stays a small multiple of their inputs and outputs.

The columns of a convolution (im2col) hold K = prod(k) copies of the input; for
a large batch, building them for the whole batch at once would dwarf
everything else.  The ops build them one window (examples, or output rows of
one example) at a time, at most ``conv._WINDOW_BYTES`` each (depthwise: one
chunk of (example, channel) rows, ``depthwise._CHUNK_BYTES``).  The bound
checked here is

    peak extra bytes <= 2 * (inputs + outputs) + 2 * _WINDOW_BYTES

and every case is chosen so that a whole-batch im2col alone would exceed it.
The tests shrink the window budget to 1 MiB (a quarter of the library's
default) so that inputs of 256 KiB show the bound quickly; the windowing does
not depend on the budget's value.

Peak extra memory is measured with :mod:`tracemalloc`, which sees every NumPy
array allocation (NumPy reports them in its own tracemalloc domain): tracing
starts after the inputs exist, so the peak counts exactly what the call
allocates, its results included.  array-api-strict stores NumPy arrays and is
measured the same way; torch and CuPy allocations are invisible to
tracemalloc, so those backends skip.
"""

from __future__ import annotations

import importlib
import math
import tracemalloc
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from condconv_ref import (
    condconv,
    condconv_vjp,
    conv,
    conv_vjp,
    depthwise_condconv,
    depthwise_condconv_vjp,
)

im2col_module = importlib.import_module("condconv_ref._im2col")
flat_module = importlib.import_module("condconv_ref._flat")

WINDOW_BYTES = 2**20
# (op, B, C = O, spatial, k, padding_mode, per-example kernel); float32 inputs of 256 KiB,
# whose whole-batch columns (6-7 MiB) would be 6-7 windows.
CASES = {
    "conv-shared-kernel": ("conv", 16, 4, (32, 32), 5, "zeros", False),
    "conv-one-large-example": ("conv", 1, 4, (128, 128), 5, "zeros", False),
    "conv-3d": ("conv", 4, 4, (16, 16, 16), 3, "zeros", False),
    "condconv-reflect-padding": ("condconv", 16, 4, (32, 32), 5, "reflect", True),
    # Depthwise builds its columns per chunk of (example, channel) rows (_CHUNK_BYTES).
    "depthwise-zeros": ("depthwise", 16, 16, (32, 32), 5, "zeros", True),
    "depthwise-circular-3d": ("depthwise", 4, 8, (16, 16, 16), 3, "circular", True),
}
OPS = {"conv": (conv, conv_vjp), "condconv": (condconv, condconv_vjp),
       "depthwise": (depthwise_condconv, depthwise_condconv_vjp)}


def array_bytes(a: Any) -> int:
    """Bytes of an array, or of every array in a dict; works for any array API namespace."""
    if isinstance(a, dict):
        return sum(array_bytes(v) for v in a.values())
    return math.prod(a.shape) * (np.dtype(str(a.dtype).split(".")[-1]).itemsize)


def peak_extra_bytes(function: Callable[[], Any]) -> tuple[int, Any]:
    """The traced peak of everything allocated during one call, and the call's result."""
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        result = function()
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    return peak, result


def make_arrays(backend, op, batch, channels, spatial, k, per_example):
    rng = np.random.default_rng(0)
    nd = len(spatial)
    x = rng.standard_normal((batch, channels) + spatial)
    if op in ("condconv", "depthwise"):
        in_per_group = 1 if op == "depthwise" else channels
        args = {"x": x, "experts": rng.standard_normal((3, channels, in_per_group) + (k,) * nd),
                "routing": rng.uniform(size=(batch, 3)), "bias": rng.standard_normal((3, channels))}
    else:
        lead = (batch,) if per_example else ()
        args = {"x": x, "kernel": rng.standard_normal(lead + (channels, channels) + (k,) * nd),
                "bias": rng.standard_normal((channels,))}
    cotangent = rng.standard_normal((batch, channels) + spatial)
    return ({name: backend.asarray(a, dtype="float32") for name, a in args.items()},
            backend.asarray(cotangent, dtype="float32"))


@pytest.mark.parametrize("case", list(CASES))
def test_peak_extra_memory_is_a_small_multiple_of_inputs_and_outputs(backend, case,
                                                                     monkeypatch):
    if backend.name.split(":")[0] not in ("numpy", "array_api_strict"):
        pytest.skip(f"tracemalloc does not see {backend.name} allocations")
    op, batch, channels, spatial, k, padding_mode, per_example = CASES[case]
    forward, vjp = OPS[op]
    args, cotangent = make_arrays(backend, op, batch, channels, spatial, k, per_example)
    options = {"padding": k // 2, "padding_mode": padding_mode}
    whole_batch_columns = array_bytes(args["x"]) * k ** len(spatial)
    monkeypatch.setattr(im2col_module, "_WINDOW_BYTES", WINDOW_BYTES)
    monkeypatch.setattr(flat_module, "_CHUNK_BYTES", WINDOW_BYTES)
    window_allowance = 2 * WINDOW_BYTES

    # Warm up on a small input: first calls allocate one-off caches and imports.
    small = {name: a[:1, ...] if name in ("x", "routing") or (per_example and name == "kernel")
             else a for name, a in args.items()}
    vjp(cotangent[:1, ...], **small, **options)

    peak, y = peak_extra_bytes(lambda: forward(**args, **options))
    io_bytes = array_bytes(args) + array_bytes(y)
    assert array_bytes(y) <= peak, "tracemalloc did not see the output's allocation"
    bound = 2 * io_bytes + window_allowance
    assert whole_batch_columns > bound, "case too small to tell windows from whole-batch im2col"
    assert peak <= bound, (
        f"{op} peak extra memory {peak / 2**20:.1f} MiB exceeds 2 x inputs+outputs "
        f"({io_bytes / 2**20:.1f} MiB) + 2 windows ({window_allowance / 2**20:.0f} MiB)")

    peak, grads = peak_extra_bytes(lambda: vjp(cotangent, **args, **options))
    io_bytes = array_bytes(args) + array_bytes(cotangent) + array_bytes(grads)
    bound = 2 * io_bytes + window_allowance
    assert whole_batch_columns > bound, "case too small to tell windows from whole-batch im2col"
    assert peak <= bound, (
        f"{op}_vjp peak extra memory {peak / 2**20:.1f} MiB exceeds 2 x inputs+outputs "
        f"({io_bytes / 2**20:.1f} MiB) + 2 windows ({window_allowance / 2**20:.0f} MiB)")
