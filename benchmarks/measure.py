"""Timing, GEMM peak and peak-memory measurements on one array backend.

Timing
    :func:`time_interleaved` runs every function once per round, round after
    round, after warm-up rounds; the figure reported is each function's median.
    Interleaving makes the library and torch share the same moments of machine
    load, so their ratio stays meaningful on a busy machine.

GEMM peak
    :func:`gemm_peak` times square ``A @ B`` products of a few sizes with the
    same backend, dtype and thread count, and takes the best median.  Cases
    report their FLOP rate as a fraction of it.

Peak extra memory
    NumPy reports every array allocation to :mod:`tracemalloc` (its own
    tracemalloc domain), so :func:`peak_extra_bytes` starts tracing after the
    inputs exist, calls the function once and reads the traced peak: the most
    bytes held at any moment by arrays (and Python objects) created during the
    call, results included.  On CuPy it is the growth of the default memory
    pool, which keeps freed blocks cached: after ``free_all_blocks`` the pool's
    size after the call is its high-water mark.  Torch's memory is not measured.
"""

from __future__ import annotations

import gc
import statistics
import time
import tracemalloc
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from benchmarks.cases import Unavailable
from condconv_ref.backends import Backend, BackendUnavailable, get_backend

__all__ = ["Runner", "gemm_peak", "nbytes", "peak_extra_bytes", "runner", "time_interleaved"]


@dataclass(frozen=True)
class Runner:
    """The library's backend for one run, and the torch device to compare against."""

    backend: Backend
    torch_device: str

    @property
    def name(self) -> str:
        return self.backend.name

    def asarray(self, a: np.ndarray) -> Any:
        return self.backend.asarray(a)

    def synchronize(self) -> None:
        if self.name == "cupy":
            import cupy

            cupy.cuda.get_current_stream().synchronize()


def runner(name: str) -> Runner:
    """``numpy`` or ``cupy``; raises :class:`Unavailable` with the reason."""
    try:
        backend = get_backend(name)
    except BackendUnavailable as exc:
        raise Unavailable(str(exc)) from None
    return Runner(backend, "cuda" if name == "cupy" else "cpu")


def time_interleaved(functions: Mapping[str, tuple[Callable[[], Any], Callable[[], None]]], *,
                     warmup: int, repeat: int) -> dict[str, list[float]]:
    """Seconds per call of each ``(function, synchronize)``, ``repeat`` interleaved rounds."""
    for _ in range(warmup):
        for function, synchronize in functions.values():
            function()
            synchronize()
    samples: dict[str, list[float]] = {name: [] for name in functions}
    for _ in range(repeat):
        for name, (function, synchronize) in functions.items():
            synchronize()
            start = time.perf_counter()
            function()
            synchronize()
            samples[name].append(time.perf_counter() - start)
    return samples


def median(samples: list[float]) -> float:
    return statistics.median(samples)


def gemm_peak(run: Runner, dtype: str, sizes: tuple[int, ...], *, warmup: int,
              repeat: int) -> tuple[float, int]:
    """Best median FLOP rate (FLOP/s) of ``n x n @ n x n`` over ``sizes``, and its ``n``."""
    rng = np.random.default_rng(0)
    best = (0.0, 0)
    for n in sizes:
        a, b = (run.asarray(rng.standard_normal((n, n)).astype(dtype)) for _ in range(2))
        samples = time_interleaved({"gemm": (lambda: a @ b, run.synchronize)},
                                   warmup=warmup, repeat=repeat)["gemm"]
        best = max(best, (2 * n ** 3 / median(samples), n))
    return best


def nbytes(obj: Any) -> int:
    """Bytes of an array, or of all arrays in a mapping / sequence (None counts 0)."""
    if obj is None:
        return 0
    if isinstance(obj, Mapping):
        return sum(nbytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(nbytes(v) for v in obj)
    return int(obj.nbytes)


def peak_extra_bytes(run: Runner, function: Callable[[], Any]) -> tuple[int, int]:
    """``(peak extra bytes during one call, bytes of its result)``; see the module docstring."""
    gc.collect()
    if run.name == "cupy":
        import cupy

        pool = cupy.get_default_memory_pool()
        run.synchronize()
        pool.free_all_blocks()
        before = pool.total_bytes()
        result = function()
        run.synchronize()
        return pool.total_bytes() - before, nbytes(result)
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        result = function()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    return peak - base, nbytes(result)
