r"""GPU math checks: how far the reference drifts on a GPU from the float64 CPU reference.

:func:`check` is ``condconv-ref gpu-check`` without the terminal.  For every
variant of :data:`condconv_ref.variants.VARIANTS` and both directions
(forward, VJP) it draws ``cases`` random cases, runs the reference on CuPy in
each dtype and compares the results with the NumPy float64 reference.  It also
checks the GPU run itself (bit-for-bit determinism, the extra error of TF32
tensor cores in a subprocess, memory and versions) and, when torch with CUDA
is installed, what torch's own float32 ``conv2d`` does.

Nothing here imports CuPy (or torch) at module level: ``import
condconv_ref.gpu`` works anywhere, and :func:`check` raises
:class:`~condconv_ref.backends.BackendUnavailable` (one line) without CuPy or a
GPU.  The comparison itself, :func:`compare_backend`, works on any backend, so
it is tested on CPU backends.

The comparison
--------------
The inputs of a case (and the cotangent of a VJP) are drawn in float64 and
rounded to the dtype.  The float64 NumPy reference is evaluated **at the
rounded inputs**, so the error measures the arithmetic alone, not the rounding
of the inputs.  For each op, direction and dtype a
:class:`~condconv_ref.engine.Row` reports, over the cases and over every output
array (every gradient of a VJP), the largest error in units of the bound of
:mod:`condconv_ref.accuracy` for the precision the arithmetic is judged by,
and where it was: the same figure as every other command.  A row passes when
that is at most 1 on every case, no case raises, and (with ``determinism``)
the repeated run is bitwise equal.

dtypes and precisions
---------------------
=========  ===================  ======================================
dtype      judged as            why
=========  ===================  ======================================
float64    float64
float32    float32
float16    float16/float32      the library's policy: float16 ops run
                                in float32 and round the result to
                                float16 once
float32    tf32                 the ``CUPY_TF32=1`` subprocess, and
                                torch with cuDNN's default TF32
=========  ===================  ======================================

A float16 row therefore fails if an op accumulates in float16 or rounds an
intermediate result to float16 (relative errors of order :math:`2^{-10}`,
hundreds to thousands of float32 units): it checks the precision policy, not
just float16's own tolerance.

Determinism, TF32, environment
------------------------------
- **Determinism**: every GPU computation runs twice on the same inputs; the
  two results must be equal bit for bit (``Row.repeat_identical``;
  :attr:`GPUReport.nondeterministic` names the rows that differ).
- **TF32**: CuPy reads ``CUPY_TF32`` at its first float32 matmul, so float32
  runs again in ``python -m condconv_ref.gpu --tf32-child ...`` started with
  ``CUPY_TF32=1``; it prints its rows as JSON.  Its rows have precision
  ``tf32`` (when the child confirms CuPy's float32 matmuls use TF32) and
  :meth:`GPUReport.tf32_extra` sets their error beside the float32 rows'.
- **Environment**: device, compute capability, CUDA runtime and driver, CuPy
  version and the bytes the CuPy memory pool holds and uses after the run.
- **torch**: with torch and CUDA, torch's float32 ``conv2d`` (and its
  autograd gradients) on 2-D ``conv`` cases, once with the default
  ``torch.backends.cudnn.allow_tf32`` and, when that default means TF32, once
  with it off: op ``torch conv2d``.

Examples
--------
The same comparison on a CPU backend (what the test suite does):

>>> from condconv_ref import gpu
>>> rows = gpu.compare_backend("numpy", cases=1, dtypes=("float32",), variants=["conv"])
>>> [(row.op, row.kind, row.dtype, row.precision, row.status) for row in rows]
[('conv', 'forward', 'float32', 'float32', 'PASS'), ('conv', 'vjp', 'float32', 'float32', 'PASS')]
>>> rows[0].units <= 1
True
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import subprocess
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import array_api_compat
import numpy as np

from condconv_ref import accuracy
from condconv_ref._validate import check_positive_int
from condconv_ref.backends import Backend, BackendUnavailable, get_backend, to_numpy
from condconv_ref.engine import (
    Expected,
    Row,
    expected_forward,
    expected_vjp,
    judge,
    round_to,
    rounded,
    worst,
)
from condconv_ref.memory import MemoryBudgetError
from condconv_ref.testing._numerics import _check_kept
from condconv_ref.testing.sampling import case_seed, draw_examples
from condconv_ref.variants import VARIANTS, Case, build_case, reference_forward, reference_vjp

__all__ = [
    "COMPUTED_IN",
    "DEFAULT_CASES",
    "DIRECTIONS",
    "DTYPES",
    "SIZES",
    "GPUReport",
    "check",
    "compare_backend",
    "compare_torch",
    "environment",
    "run_tf32_child",
]

DTYPES = tuple(dtype for dtype in accuracy.DTYPES if dtype != "bfloat16")
"""The dtypes the reference runs in (CuPy has no bfloat16)."""
DIRECTIONS = ("forward", "vjp")
DEFAULT_CASES = 8

COMPUTED_IN = {"float64": "float64", "float32": "float32", "float16": "float16/float32"}
"""The precision each dtype's arithmetic is judged by (:data:`condconv_ref.accuracy.PRECISIONS`):
under the library's policy float16 ops run in float32 and round each result to float16 once."""

SIZES = {"max_batch": 4, "max_groups": 3, "max_channels_per_group": 8, "max_out_per_group": 8,
         "max_size": 12}
"""Bounds of the random configurations (:func:`condconv_ref.testing.conv_configs`): larger
than the test suite's, so the sums are long enough for GPU rounding to show."""

TORCH_OP = "torch conv2d"
_TF32_CHILD = "--tf32-child"


# ---------------------------------------------------------------- records


@dataclass(frozen=True)
class GPUReport:
    """Everything :func:`check` measured.

    Attributes
    ----------
    backend : str
        Where the reference ran (``"cupy"`` on a GPU).
    cases, seed : int
        Cases per op and their seed.
    environment : dict of str to str
        Device, versions and memory (:func:`environment`).
    rows : tuple of Row
        The reference in every dtype, then the TF32 rows, then torch's.
    notes : tuple of str
        What was left out and why (TF32 not in effect, torch without CUDA, ...).
    problems : tuple of str
        Checks that could not run although asked for (e.g. the TF32
        subprocess failed); any makes the report fail.

    Examples
    --------
    The report of the checks run on the CPU, with NumPy in place of CuPy:

    >>> from condconv_ref import gpu
    >>> report = gpu.check(backend="numpy", cases=1, dtypes=("float32",), variants=["conv"],
    ...                    tf32=False, torch=False)
    >>> report.backend, report.passed, report.failures, report.nondeterministic
    ('numpy', True, (), ())
    >>> [(row.kind, row.repeat_identical) for row in report.rows], report.tf32_extra()
    ([('forward', True), ('vjp', True)], [])
    """

    backend: str
    cases: int
    seed: int
    environment: dict[str, str]
    rows: tuple[Row, ...]
    notes: tuple[str, ...] = ()
    problems: tuple[str, ...] = ()

    @property
    def passed(self) -> bool:
        """No row failed and every requested check ran."""
        return not self.problems and all(row.status != "FAIL" for row in self.rows)

    @property
    def failures(self) -> tuple[Row, ...]:
        """The failed rows."""
        return tuple(row for row in self.rows if row.status == "FAIL")

    @property
    def nondeterministic(self) -> tuple[str, ...]:
        """``"op direction dtype"`` of every row whose repeated run differed."""
        return tuple(f"{row.op} {row.kind} {row.dtype}" for row in self.rows
                     if row.repeat_identical is False)

    def tf32_extra(self) -> list[tuple[str, str, float, float]]:
        """``(op, direction, float32 units, TF32 units)`` per TF32 row with a float32 twin.

        Both errors are in units of float32's bound (the TF32 row's
        ``baseline_units``), so their ratio is the factor TF32 adds.
        """
        plain = {(row.op, row.kind): row for row in self.rows
                 if row.dtype == "float32" and row.precision == "float32" and not row.skipped}
        return [(row.op, row.kind, plain[row.op, row.kind].units, row.baseline_units)
                for row in self.rows
                if row.precision == "tf32" and not row.skipped and (row.op, row.kind) in plain]


# ---------------------------------------------------------------- cases


def _draw_configs(count: int, seed: int, sizes: Mapping[str, int], **kwargs: Any) -> list[Any]:
    from condconv_ref.testing.strategies import conv_configs

    return draw_examples(conv_configs(**sizes, **kwargs), count, seed=seed)


def _variant_cases(variants: Sequence[str], count: int, seed: int,
                   sizes: Mapping[str, int]) -> dict[str, list[Case]]:
    """``count`` cases of each variant; case ``i`` of every variant shares its configuration."""
    configs = _draw_configs(count, seed, sizes)
    depthwise = _draw_configs(count, seed, sizes, depthwise=True)
    return {variant: [build_case(variant, depthwise[i] if VARIANTS[variant].depthwise
                                 else configs[i], case_seed(seed, i)) for i in range(count)]
            for variant in variants}


# ---------------------------------------------------------------- measuring one case

Runner = Callable[[Case, np.ndarray], tuple[Any, dict[str, Any]]]
"""``runner(case, cotangent) -> (output, gradients)``: one computation under test."""


@dataclass(frozen=True)
class _Measured:
    units: float
    where: str
    identical: bool | None
    baseline_units: float = math.nan


def _host_arrays(result: Any) -> list[np.ndarray]:
    items = result.values() if isinstance(result, Mapping) else [result]
    return [np.asarray(to_numpy(a)) for a in items]


def _bitwise_equal(first: Any, second: Any) -> bool:
    pairs = zip(_host_arrays(first), _host_arrays(second))
    return all(a.shape == b.shape and a.dtype == b.dtype and a.tobytes() == b.tobytes()
               for a, b in pairs)


def _measure(actual: Any, expected: Expected, precision: str, repeat: Any = None) -> _Measured:
    found = worst(judge(actual, expected, precision))
    units = math.inf if found is None or found.reason else found.units
    baseline = math.nan
    if precision == "tf32" and found is not None:
        baseline_found = worst(judge(actual, expected, "float32"))
        baseline = math.inf if baseline_found.reason else baseline_found.units
    identical = None if repeat is None else _bitwise_equal(actual, repeat)
    return _Measured(units, found.where if found else "", identical, baseline)


def _measure_case(case: Case, dtype: str, precision: str, runner: Runner,
                  repeat: bool) -> tuple[_Measured, _Measured]:
    """Forward and VJP of ``runner`` on ``case`` rounded to ``dtype``, against float64 NumPy."""
    at = rounded(case, dtype)
    output = expected_forward(at, dtype=precision)
    cotangent = round_to(case.cotangent(tuple(output.value.shape)), dtype)
    gradients = expected_vjp(at, cotangent, dtype=precision)
    first = runner(at, cotangent)
    second = runner(at, cotangent) if repeat else (None, None)
    return (_measure(first[0], output, precision, second[0]),
            _measure(first[1], gradients, precision, second[1]))


def _host(result: Any, like: Any, what: str) -> np.ndarray:
    """``result`` copied to the host, after checking that it has ``like``'s namespace, device
    and dtype (``AssertionError`` naming ``what`` if not)."""
    _check_kept(what, result, like, "the inputs", xp=array_api_compat.array_namespace(like),
                shape=False)
    return to_numpy(result)


def _reference_runner(backend: Backend, dtype: str) -> Runner:
    """The reference op on ``backend`` in ``dtype``, results copied to the host."""

    def run(case: Case, cotangent: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        like = backend.asarray(cotangent, dtype)
        output = _host(reference_forward(case, backend, dtype), like, "the output")
        gradients = reference_vjp(case, cotangent, backend, dtype)
        return output, {name: _host(g, like, f"gradient {name!r}")
                        for name, g in gradients.items()}

    return run


# ---------------------------------------------------------------- rows


def _rows(op: str, dtype: str, precision: str, cases: Sequence[Case], runner: Runner,
          repeat: bool, advance: Callable[[], None]) -> tuple[Row, Row]:
    """The forward and VJP rows of ``runner`` over ``cases``."""
    measured: list[list[tuple[int, _Measured]]] = [[], []]
    errors, first_error = 0, ""
    for index, case in enumerate(cases):
        try:
            pair = _measure_case(case, dtype, precision, runner, repeat)
        except MemoryBudgetError:  # the case is too large for the budget, not wrong: stop
            raise
        except Exception as error:  # an op that raises fails this case, the check goes on
            errors += 1
            first_error = first_error or f"case {index}: {type(error).__name__}: {error}"
        else:
            for direction, measurement in enumerate(pair):
                measured[direction].append((index, measurement))
        advance()
    return tuple(_row(op, direction, dtype, precision, cases, measured[d], errors, first_error,
                      repeat)
                 for d, direction in enumerate(DIRECTIONS))


def _row(op: str, direction: str, dtype: str, precision: str, cases: Sequence[Case],
         measured: list[tuple[int, _Measured]], errors: int, first_error: str,
         repeat: bool) -> Row:
    detail, units, where, baseline = first_error, math.nan, "", math.nan
    if measured:
        index, largest = max(measured, key=lambda item: item[1].units)
        units, where = largest.units, f"case {index}, {largest.where}"
        baseline = max(m.baseline_units for _, m in measured)
        detail = detail or f"case {index} ({largest.where}): {cases[index].describe()}"
    differing = [index for index, m in measured if m.identical is False]
    if differing:
        plural = "s" if len(differing) > 1 else ""
        detail += f"; the repeat differs bitwise in case{plural} {', '.join(map(str, differing))}"
    beyond = sum(not m.units <= 1 for _, m in measured)
    return Row(op, direction, cases=len(cases), failed=errors + beyond, units=units,
               where=where, detail=detail, dtype=dtype, precision=precision,
               repeat_identical=(not differing) if repeat else None, baseline_units=baseline)


def _supports(backend: Backend, dtype: str) -> str:
    """Why ``backend`` cannot run ``dtype``, or ``""``."""
    if not hasattr(backend.xp, dtype):
        return f"{backend.name} has no {dtype}"
    return ""


Progress = Callable[[str, int, int], None]
"""``progress(description, done, total)``, called after every case."""


def _counter(progress: Progress | None, total: int) -> Callable[[str], Callable[[], None]]:
    done = 0

    def stage(description: str) -> Callable[[], None]:
        def advance() -> None:
            nonlocal done
            done += 1
            if progress is not None:
                progress(description, done, total)

        return advance

    return stage


def compare_backend(backend: str | Backend = "numpy", *, cases: int = DEFAULT_CASES,
                    seed: int = 0, dtypes: Sequence[str] = DTYPES,
                    variants: Sequence[str] | None = None, determinism: bool = True,
                    sizes: Mapping[str, int] | None = None,
                    progress: Progress | None = None,
                    precision: str | None = None) -> list[Row]:
    """Run every variant's reference on ``backend`` in each dtype against float64 NumPy.

    Parameters
    ----------
    backend : str or Backend
        A name for :func:`condconv_ref.backends.get_backend` or a backend.
    cases : int
        Random cases per variant, >= 1.
    seed : int
        Seed of the configurations and arrays, >= 0.
    dtypes : sequence of str
        From :data:`DTYPES`.  A dtype the backend lacks gives skipped rows.
    variants : sequence of str, optional
        Keys of :data:`~condconv_ref.variants.VARIANTS`; default all.
    determinism : bool
        Run every computation twice and require bitwise-equal results.
    sizes : mapping, optional
        Bounds for :func:`~condconv_ref.testing.conv_configs`; default :data:`SIZES`.
    progress : callable, optional
        ``progress(description, done, total)`` after every case.
    precision : str, optional
        Judge every row by this precision (``"tf32"`` in the TF32 subprocess)
        instead of the dtype's own (:data:`COMPUTED_IN`).

    Returns
    -------
    list of Row
        Per variant, per direction, per dtype, in that order of nesting.

    Raises
    ------
    condconv_ref.MemoryBudgetError
        If a case needs more working memory than the budget (it stops the run;
        other exceptions fail their case).

    Examples
    --------
    On array-api-strict, which has no float16 (runs on the CPU):

    >>> from condconv_ref import gpu
    >>> rows = gpu.compare_backend("array_api_strict", cases=1, dtypes=("float16", "float64"),
    ...                            variants=["mix_experts"], determinism=False)
    >>> [(row.kind, row.dtype, row.status, row.skipped) for row in rows]
    ... # doctest: +NORMALIZE_WHITESPACE
    [('forward', 'float16', 'SKIP', 'array_api_strict has no float16'),
     ('forward', 'float64', 'PASS', ''),
     ('vjp', 'float16', 'SKIP', 'array_api_strict has no float16'),
     ('vjp', 'float64', 'PASS', '')]
    """
    chosen = get_backend(backend) if isinstance(backend, str) else backend
    dtypes, variants = _check_choices(dtypes, variants)
    count = check_positive_int("compare_backend", "cases", cases)
    seed = check_positive_int("compare_backend", "seed", seed, minimum=0)
    drawn = _variant_cases(variants, count, seed, SIZES if sizes is None else sizes)
    stage = _counter(progress, len(variants) * len(dtypes) * count)
    rows: list[Row] = []
    for variant in variants:
        by_dtype = []
        for dtype in dtypes:
            judged = precision or COMPUTED_IN[dtype]
            reason = _supports(chosen, dtype)
            if reason:
                advance = stage(f"{variant} {dtype}")
                for _ in range(count):
                    advance()
                by_dtype.append(tuple(Row(variant, d, dtype=dtype, precision=judged,
                                          skipped=reason) for d in DIRECTIONS))
                continue
            by_dtype.append(_rows(variant, dtype, judged, drawn[variant],
                                  _reference_runner(chosen, dtype), determinism,
                                  stage(f"{variant} {dtype}")))
        rows += [pair[d] for d in range(len(DIRECTIONS)) for pair in by_dtype]
    return rows


def _check_choices(dtypes: Sequence[str],
                   variants: Sequence[str] | None) -> tuple[tuple[str, ...], tuple[str, ...]]:
    dtypes = tuple(dtypes)
    if not dtypes or any(dtype not in DTYPES for dtype in dtypes):
        raise ValueError(f"gpu: dtypes must be a non-empty subset of {DTYPES}, got {dtypes!r}")
    variants = tuple(VARIANTS) if variants is None else tuple(variants)
    unknown = [variant for variant in variants if variant not in VARIANTS]
    if not variants or unknown:
        raise ValueError(f"gpu: variants must be keys of condconv_ref.variants.VARIANTS, "
                         f"got {list(variants)!r}")
    return dtypes, variants


# ---------------------------------------------------------------- environment


def environment(backend: str | Backend = "cupy") -> dict[str, str]:
    """Where a backend runs: versions, and for CuPy the device, CUDA and memory pool.

    Returns
    -------
    dict of str to str
        Always ``backend``, ``python`` and ``numpy``; for ``cupy`` also
        ``device``, ``compute capability``, ``CUDA runtime``, ``CUDA driver``,
        ``CuPy``, ``device memory`` and ``memory pool`` (bytes held, i.e. the
        high-water mark of this process, and bytes in use); for ``torch``
        the torch version.

    Examples
    --------
    >>> from condconv_ref import gpu
    >>> sorted(gpu.environment("array_api_strict"))
    ['array_api_strict', 'backend', 'numpy', 'python']
    """
    chosen = get_backend(backend) if isinstance(backend, str) else backend
    found = {"backend": chosen.name, "python": sys.version.split()[0], "numpy": np.__version__}
    base = chosen.name.partition(":")[0]
    if base == "cupy":
        found.update(_cupy_environment())
    elif base in ("torch", "array_api_strict", "jax"):
        found[base] = __import__(base).__version__
    return found


def _cuda_version(number: int) -> str:
    return f"{number // 1000}.{number % 1000 // 10}"


def _mib(count: int) -> str:
    return f"{count / 2**20:.1f} MiB"


def _cupy_environment() -> dict[str, str]:
    import cupy

    runtime = cupy.cuda.runtime
    device = cupy.cuda.Device()
    properties = runtime.getDeviceProperties(device.id)
    name = properties["name"]
    pool = cupy.get_default_memory_pool()
    free, total = device.mem_info
    capability = device.compute_capability  # "90" for 9.0, "120" for 12.0
    return {
        "device": name.decode() if isinstance(name, bytes) else str(name),
        "compute capability": f"{capability[:-1]}.{capability[-1]}",
        "CUDA runtime": _cuda_version(runtime.runtimeGetVersion()),
        "CUDA driver": _cuda_version(runtime.driverGetVersion()),
        "CuPy": cupy.__version__,
        "device memory": f"{_mib(total)} total, {_mib(free)} free",
        "memory pool": f"{_mib(pool.total_bytes())} held (peak of this process), "
                       f"{_mib(pool.used_bytes())} in use",
    }


# ---------------------------------------------------------------- TF32


def _cupy_tf32_in_effect() -> tuple[bool, str]:
    """Whether CuPy's float32 matmuls use TF32 in this process, and why not."""
    if os.environ.get("CUPY_TF32") != "1":
        return False, "CUPY_TF32 is not 1 in the subprocess"
    import cupy

    capability = cupy.cuda.Device().compute_capability  # "80" for 8.0
    if int(capability[:-1] or 0) < 8:
        return False, f"compute capability {capability[:-1]}.{capability[-1]} has no TF32"
    try:
        from cupy._core import _routines_linalg as linalg

        in_effect = linalg.get_compute_type(np.float32) == linalg.COMPUTE_TYPE_TF32
    except (ImportError, AttributeError) as error:
        return True, f"assumed from CUPY_TF32=1 (compute type not readable: {error})"
    return in_effect, "" if in_effect else "CuPy's float32 compute type is not TF32"


def _tf32_child(argv: Sequence[str]) -> int:
    """``python -m condconv_ref.gpu --tf32-child ...``: float32 rows as one JSON line."""
    parser = argparse.ArgumentParser(prog="python -m condconv_ref.gpu")
    parser.add_argument(_TF32_CHILD, action="store_true", required=True)
    parser.add_argument("--backend", default="cupy")
    parser.add_argument("--cases", type=int, default=DEFAULT_CASES)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sizes", type=json.loads, default=None)
    parser.add_argument("--variant", action="append", dest="variants")
    args = parser.parse_args(argv)
    backend = get_backend(args.backend)
    if backend.name == "cupy":
        in_effect, why = _cupy_tf32_in_effect()
    else:
        in_effect, why = False, f"backend {backend.name} has no TF32 mode"
    rows = compare_backend(backend, cases=args.cases, seed=args.seed, dtypes=("float32",),
                           variants=args.variants, determinism=False, sizes=args.sizes,
                           precision="tf32")
    print(json.dumps({"tf32": in_effect, "why": why, "cupy_tf32": os.environ.get("CUPY_TF32"),
                      "rows": [row.to_json() for row in rows]}))
    return 0


def run_tf32_child(backend: str = "cupy", *, cases: int = DEFAULT_CASES, seed: int = 0,
                   variants: Sequence[str] | None = None,
                   sizes: Mapping[str, int] | None = None,
                   timeout: float | None = None) -> tuple[list[Row], bool, str]:
    """The float32 rows of a subprocess started with ``CUPY_TF32=1``.

    The subprocess is ``python -m condconv_ref.gpu --tf32-child --backend B
    --cases N --seed S [--sizes JSON] [--variant V ...]``; it prints one JSON
    line ``{"tf32": bool, "why": str, "cupy_tf32": str, "rows": [...]}``.  Its rows are judged
    by precision ``tf32`` (with ``baseline_units`` under float32's bound); :func:`check`
    keeps them only when the subprocess confirms TF32 was in effect.

    Returns
    -------
    rows : list of Row
        The float32 rows of the subprocess (not repeated).
    in_effect : bool
        Whether the subprocess confirmed that CuPy's float32 matmuls used TF32.
    why : str
        Why not, or how it was confirmed when not directly.

    Raises
    ------
    RuntimeError
        If the subprocess fails or prints no JSON; the message holds its last
        line of stderr.

    Examples
    --------
    The subprocess on the CPU, where NumPy has no TF32 mode (so :func:`check`
    would leave its rows out):

    >>> from condconv_ref import gpu
    >>> rows, in_effect, why = gpu.run_tf32_child("numpy", cases=1, variants=["conv"])
    >>> [(row.op, row.kind, row.precision) for row in rows]
    [('conv', 'forward', 'tf32'), ('conv', 'vjp', 'tf32')]
    >>> in_effect, why
    (False, 'backend numpy has no TF32 mode')
    """
    command = [sys.executable, "-m", "condconv_ref.gpu", _TF32_CHILD, "--backend", backend,
               "--cases", str(cases), "--seed", str(seed)]
    if sizes is not None:
        command += ["--sizes", json.dumps(dict(sizes))]
    for variant in variants or ():
        command += ["--variant", variant]
    done = subprocess.run(command, env={**os.environ, "CUPY_TF32": "1"}, capture_output=True,
                          text=True, timeout=timeout, check=False)
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        errors = done.stderr.strip().splitlines()
        raise RuntimeError(f"the TF32 subprocess exited with status {done.returncode}: "
                           f"{errors[-1] if errors else 'no output'}")
    try:
        result = json.loads(lines[-1])
    except json.JSONDecodeError as error:
        raise RuntimeError(f"the TF32 subprocess printed no JSON ({error})") from None
    rows = [Row.from_json(fields) for fields in result["rows"]]
    return rows, bool(result["tf32"]), result["why"]


# ---------------------------------------------------------------- torch


@contextlib.contextmanager
def _cudnn_tf32(torch: Any, allow: bool) -> Iterator[None]:
    previous = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = allow
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32 = previous


_TORCH_PAD_MODES = {"zeros": "constant", "reflect": "reflect", "replicate": "replicate",
                    "circular": "circular"}


def _torch_runner(torch: Any, device: str) -> Runner:
    """``torch.nn.functional.conv2d`` in float32 on ``device``, gradients by autograd."""
    functional = torch.nn.functional

    def run(case: Case, cotangent: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        tensors = {name: torch.tensor(a, dtype=torch.float32, device=device, requires_grad=True)
                   for name, a in case.arrays.items()}
        geometry = case.geometry
        pad = [amount for pair in reversed(geometry.padding) for amount in pair]
        padded = functional.pad(tensors["x"], pad, mode=_TORCH_PAD_MODES[geometry.padding_mode])
        output = functional.conv2d(padded, tensors["kernel"], tensors.get("bias"),
                                   stride=geometry.stride, dilation=geometry.dilation,
                                   groups=geometry.groups)
        grads = torch.autograd.grad(output, list(tensors.values()),
                                    torch.tensor(cotangent, dtype=torch.float32, device=device))
        return (_host(output, tensors["x"], "the output"),
                {name: _host(g, tensors["x"], f"gradient {name!r}")
                 for name, g in zip(tensors, grads)})

    return run


def _torch_tf32(torch: Any, device: str) -> bool:
    """Whether torch's float32 convolutions on ``device`` use TF32 now."""
    if not device.startswith("cuda") or not torch.backends.cudnn.allow_tf32:
        return False
    return torch.cuda.get_device_capability(device)[0] >= 8


def compare_torch(device: str = "cuda", *, cases: int = DEFAULT_CASES, seed: int = 0,
                  sizes: Mapping[str, int] | None = None,
                  progress: Progress | None = None) -> list[Row]:
    """torch's float32 ``conv2d`` and its gradients on ``device`` against float64 NumPy.

    The cases are 2-D ``conv`` cases (padding applied with
    ``torch.nn.functional.pad``, so every padding form and mode maps).  The
    rows are judged by TF32 precision when cuDNN's ``allow_tf32`` (on by
    default) takes effect on ``device``, and then repeated with it off, judged
    by float32; elsewhere there is one float32 run.  ``allow_tf32`` is
    restored afterwards.

    Raises
    ------
    condconv_ref.backends.BackendUnavailable
        Without torch, or without CUDA for a ``cuda`` device.

    Examples
    --------
    On the CPU, where there is no TF32, one float32 run:

    >>> from condconv_ref import gpu
    >>> rows = gpu.compare_torch("cpu", cases=1)
    >>> [(row.kind, row.precision, row.status) for row in rows], rows[0].op
    ([('forward', 'float32', 'PASS'), ('vjp', 'float32', 'PASS')], 'torch conv2d')
    """
    try:
        import torch
    except ImportError as error:
        raise BackendUnavailable(f"torch is not available: {error}") from None
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise BackendUnavailable("torch has no CUDA device")
    count = check_positive_int("compare_torch", "cases", cases)
    configs = _draw_configs(count, seed, SIZES if sizes is None else sizes, spatial_dims=2)
    drawn = [build_case("conv", config, case_seed(seed, i)) for i, config in enumerate(configs)]
    settings = [True, False] if _torch_tf32(torch, device) else [torch.backends.cudnn.allow_tf32]
    stage = _counter(progress, len(settings) * count)
    rows: list[Row] = []
    for allow in settings:
        with _cudnn_tf32(torch, allow):
            precision = "tf32" if _torch_tf32(torch, device) else "float32"
            rows += _rows(TORCH_OP, "float32", precision, drawn, _torch_runner(torch, device),
                          False, stage(f"{TORCH_OP} allow_tf32={allow}"))
    return rows


# ---------------------------------------------------------------- the whole check


def check(cases: int = DEFAULT_CASES, seed: int = 0, dtypes: Sequence[str] = DTYPES,
          tf32: bool = True, determinism: bool = True, torch: bool = True,
          progress: Progress | None = None, *, backend: str = "cupy",
          variants: Sequence[str] | None = None,
          sizes: Mapping[str, int] | None = None) -> GPUReport:
    """Every GPU math check: the reference in each dtype, determinism, TF32, torch, environment.

    Parameters
    ----------
    cases : int
        Random cases per variant, >= 1.
    seed : int
        Seed of the cases, >= 0.
    dtypes : sequence of str
        Dtypes the reference runs in, from :data:`DTYPES`.
    tf32 : bool
        Also run float32 in a ``CUPY_TF32=1`` subprocess (:func:`run_tf32_child`);
        its rows are added when TF32 was in effect there, else a note says why not.
    determinism : bool
        Run everything twice and require bitwise-equal results.
    torch : bool
        Also check torch's float32 ``conv2d`` (:func:`compare_torch`) when torch
        is installed (with CUDA, for the ``cupy`` backend); a note says why not
        otherwise.
    progress : callable, optional
        ``progress(description, done, total)`` after every case of each stage.
    backend : str
        ``"cupy"``; another backend name runs the same checks on the CPU
        (torch then on the CPU), to test the check itself.
    variants : sequence of str, optional
        Default: every variant.
    sizes : mapping, optional
        Bounds of the configurations; default :data:`SIZES`.

    Raises
    ------
    condconv_ref.backends.BackendUnavailable
        Without CuPy or a CUDA device, in one line.

    Examples
    --------
    The checks themselves, run on the CPU with NumPy in place of CuPy; the
    TF32 subprocess runs too, and says why its rows are left out:

    >>> from condconv_ref import gpu
    >>> report = gpu.check(backend="numpy", cases=1, dtypes=("float32", "float16"),
    ...                    variants=["cond_linear_layer"], torch=False)
    >>> report.passed, [(row.kind, row.dtype, row.precision) for row in report.rows]
    ... # doctest: +NORMALIZE_WHITESPACE
    (True, [('forward', 'float32', 'float32'), ('forward', 'float16', 'float16/float32'),
            ('vjp', 'float32', 'float32'), ('vjp', 'float16', 'float16/float32')])
    >>> report.notes
    ('TF32 rows left out: backend numpy has no TF32 mode',)

    On a machine with CuPy and a CUDA GPU, every check with its defaults
    (needs the GPU, so not run here):

    >>> report = gpu.check()  # doctest: +SKIP
    """
    try:
        chosen = get_backend(backend)
    except BackendUnavailable as error:
        raise BackendUnavailable(f"{error}; gpu-check needs CuPy and a CUDA GPU (pip install "
                                 f"'condconv_ref[cuda12]' or 'condconv_ref[cuda13]')") from None
    rows = compare_backend(chosen, cases=cases, seed=seed, dtypes=dtypes, variants=variants,
                           determinism=determinism, sizes=sizes, progress=progress)
    found = environment(chosen)
    notes: list[str] = []
    problems: list[str] = []
    if tf32 and "float32" not in dtypes:
        notes.append("TF32 run skipped: float32 is not among the dtypes")
    elif tf32:
        if progress is not None:
            progress("TF32 subprocess", 0, 1)
        rows += _tf32_rows(backend, notes, problems, cases=cases, seed=seed, variants=variants,
                           sizes=sizes)
    if torch:
        try:
            rows += compare_torch("cuda" if chosen.name == "cupy" else "cpu", cases=cases,
                                  seed=seed, sizes=sizes, progress=progress)
        except BackendUnavailable as error:
            notes.append(f"torch comparison skipped: {error}")
    return GPUReport(chosen.name, cases, seed, found, tuple(rows), tuple(notes), tuple(problems))


def _tf32_rows(backend: str, notes: list[str], problems: list[str], **settings: Any) -> list[Row]:
    """The TF32 child's rows when TF32 was in effect there; a note or a problem otherwise."""
    try:
        rows, in_effect, why = run_tf32_child(backend, **settings)
    except (RuntimeError, subprocess.SubprocessError) as error:
        problems.append(str(error))
        return []
    if why:
        notes.append(f"TF32: {why}" if in_effect else f"TF32 rows left out: {why}")
    return rows if in_effect else []


if __name__ == "__main__":
    sys.exit(_tf32_child(sys.argv[1:]))
