"""Command line of ``python -m benchmarks``: run the cases, print plain-text tables, write JSON."""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from benchmarks import environment
from benchmarks.cases import CASES, Case, Unavailable
from benchmarks.measure import (
    Runner,
    gemm_peak,
    median,
    nbytes,
    peak_extra_bytes,
    runner,
    time_interleaved,
)
from benchmarks.property_loop import examples_per_second
from benchmarks.torch_reference import torch_case

DTYPES = ("float32", "float64")
FULL = {"repeat": 7, "warmup": 2, "gemm_sizes": (1024, 2048, 3072), "property_examples": 100}
QUICK = {"repeat": 3, "warmup": 1, "gemm_sizes": (2048,), "property_examples": 20}
GPU_GEMM_SIZES = (4096, 8192)


def _names(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def parse_arguments(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="Time condconv_ref's ops (cases S1-S6) against the GEMM peak and PyTorch.")
    parser.add_argument("--quick", action="store_true",
                        help=f"fewer repetitions ({QUICK['repeat']}), one GEMM size, "
                             f"{QUICK['property_examples']} property examples")
    parser.add_argument("--cases", type=_names, default=list(CASES),
                        help="comma-separated case names (default: all of " + ",".join(CASES) + ")")
    parser.add_argument("--dtypes", type=_names, default=list(DTYPES),
                        help="comma-separated dtypes (default: float32,float64)")
    parser.add_argument("--repeat", type=int, help=f"timed repetitions (default {FULL['repeat']})")
    parser.add_argument("--warmup", type=int,
                        help=f"untimed warm-up calls (default {FULL['warmup']})")
    parser.add_argument("--backend", choices=("auto", "numpy", "cupy"), default="auto",
                        help="auto: NumPy, and CuPy when a GPU is present")
    parser.add_argument("--no-torch", action="store_true", help="skip the PyTorch comparison")
    parser.add_argument("--no-moe", action="store_true",
                        help="skip the moe_condconv / condconv ratio")
    parser.add_argument("--property-examples", type=int,
                        help="hypothesis examples for the property-loop speed, 0 to skip "
                             f"(default {FULL['property_examples']})")
    parser.add_argument("--json", metavar="FILE", help="also write every figure to FILE as JSON")
    environment.add_arguments(parser)
    options = parser.parse_args(argv)
    defaults = QUICK if options.quick else FULL
    for key in ("repeat", "warmup", "property_examples"):
        if getattr(options, key) is None:
            setattr(options, key, defaults[key])
    options.gemm_sizes = defaults["gemm_sizes"]
    unknown = [name for name in options.cases if name not in CASES]
    bad_dtypes = [name for name in options.dtypes if name not in DTYPES]
    if unknown or bad_dtypes:
        parser.error(f"unknown cases {unknown} or dtypes {bad_dtypes}; "
                     f"cases are {list(CASES)}, dtypes {list(DTYPES)}")
    if options.repeat < 1 or options.warmup < 0:
        parser.error("--repeat must be >= 1 and --warmup >= 0")
    return options


# ---------------------------------------------------------------- one case


def _relative_error(ours: dict[str, Any], reference: dict[str, np.ndarray]) -> float:
    """Largest ``max|ours - reference| / max|reference|`` over the output and gradients."""
    from condconv_ref.backends import to_numpy

    worst = 0.0
    for name, expected in reference.items():
        got = to_numpy(ours[name]).astype(np.float64)
        scale = float(np.max(np.abs(expected))) or 1.0
        worst = max(worst, float(np.max(np.abs(got - expected))) / scale)
    return worst


def measure_case(run: Runner, case: Case, dtype: str, options: argparse.Namespace,
                 peak_flops: float) -> dict[str, Any]:
    """Timings, FLOP rates, memory and the torch ratio of one case in one dtype."""
    row: dict[str, Any] = {"case": case.name, "dtype": dtype, "backend": run.name,
                           "shape": case.describe()}
    try:
        forward_op, vjp_op = case.ops()
    except Unavailable as exc:
        return {**row, "status": str(exc)}
    args_np, cotangent_np = case.arrays(dtype)
    args = {name: run.asarray(a) for name, a in args_np.items()}
    cotangent = run.asarray(cotangent_np)

    def forward() -> Any:
        return forward_op(**args, **case.options)

    def forward_vjp() -> tuple[Any, dict[str, Any]]:
        return forward(), vjp_op(cotangent, **args, **case.options)

    functions: dict[str, tuple[Callable[[], Any], Callable[[], None]]] = {
        "forward": (forward, run.synchronize), "forward_vjp": (forward_vjp, run.synchronize)}
    if not options.no_torch:
        try:
            reference = torch_case(case, args_np, cotangent_np, device=run.torch_device,
                                   threads=options.threads or environment.default_threads())
        except Unavailable as exc:
            row["torch"] = str(exc)
        else:
            functions["torch_forward"] = (reference.forward, reference.synchronize)
            functions["torch_forward_backward"] = (reference.forward_backward,
                                                   reference.synchronize)
            y, grads = forward_vjp()
            row["torch_relative_error"] = _relative_error({"y": y, **grads}, reference.results())
    samples = time_interleaved(functions, warmup=options.warmup, repeat=options.repeat)
    row.update({f"{name}_s": median(times) for name, times in samples.items()})
    row["samples_s"] = samples
    flops = case.forward_flops()
    row["forward_gflops"] = flops / row["forward_s"] / 1e9
    row["forward_vjp_gflops"] = 3 * flops / row["forward_vjp_s"] / 1e9
    row["forward_peak_fraction"] = row["forward_gflops"] * 1e9 / peak_flops
    row["forward_vjp_peak_fraction"] = row["forward_vjp_gflops"] * 1e9 / peak_flops
    if "torch_forward_s" in row:
        row["forward_vs_torch"] = row["forward_s"] / row["torch_forward_s"]
        row["forward_vjp_vs_torch"] = row["forward_vjp_s"] / row["torch_forward_backward_s"]
    inputs = nbytes(args)
    peak, result = peak_extra_bytes(run, forward)
    row["forward_memory_bytes"], row["forward_io_bytes"] = peak, inputs + result
    peak, result = peak_extra_bytes(run, forward_vjp)
    row["forward_vjp_memory_bytes"] = peak
    row["forward_vjp_io_bytes"] = inputs + nbytes(cotangent) + result
    row["status"] = "ok"
    return row


def measure_moe(run: Runner, case: Case, dtype: str, options: argparse.Namespace
                ) -> dict[str, Any] | None:
    """Median time of the mixture-of-experts form over the mixed-kernel form."""
    try:
        pair, moe = case.ops(), case.moe_ops()
    except Unavailable as exc:
        return {"case": case.name, "dtype": dtype, "status": str(exc)}
    if moe is None:
        return None
    args_np, cotangent_np = case.arrays(dtype)
    args = {name: run.asarray(a) for name, a in args_np.items()}
    cotangent = run.asarray(cotangent_np)

    def timed(forward_op: Callable[..., Any], vjp_op: Callable[..., Any]):
        def forward() -> Any:
            return forward_op(**args, **case.options)

        def forward_vjp() -> Any:
            return forward(), vjp_op(cotangent, **args, **case.options)

        return (forward, run.synchronize), (forward_vjp, run.synchronize)

    (cond_f, cond_fv), (moe_f, moe_fv) = timed(*pair), timed(*moe)
    samples = time_interleaved(
        {"forward": cond_f, "moe_forward": moe_f,
         "forward_vjp": cond_fv, "moe_forward_vjp": moe_fv},
        warmup=1, repeat=max(1, options.repeat // 2))
    times = {name: median(s) for name, s in samples.items()}
    return {"case": case.name, "dtype": dtype, "experts": case.experts, "status": "ok",
            **{f"{name}_s": t for name, t in times.items()},
            "forward_ratio": times["moe_forward"] / times["forward"],
            "forward_vjp_ratio": times["moe_forward_vjp"] / times["forward_vjp"]}


# ---------------------------------------------------------------- tables


def _format(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def table(rows: list[dict[str, Any]], columns: list[tuple[str, str, str]]) -> str:
    """Plain-text table; ``columns`` are (header, key, format spec); missing values print '-'."""
    cells = [[header for header, _, _ in columns]]
    notes = []
    for row in rows:
        if row.get("status", "ok") != "ok":
            notes.append(f"{row['case']} {row['dtype']}: {row['status']}")
            continue
        cells.append([_format(row.get(key), spec) for _, key, spec in columns])
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    lines = ["  ".join(cell.rjust(w) if i > 1 else cell.ljust(w)
                       for i, (cell, w) in enumerate(zip(line, widths))).rstrip()
             for line in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines + notes)


CASE_COLUMNS = [
    ("case", "case", ""), ("dtype", "dtype", ""),
    ("fwd ms", "forward_ms", ".2f"), ("torch", "torch_forward_ms", ".2f"),
    ("x torch", "forward_vs_torch", ".2f"),
    ("fwd+vjp ms", "forward_vjp_ms", ".2f"), ("torch", "torch_forward_backward_ms", ".2f"),
    ("x torch", "forward_vjp_vs_torch", ".2f"),
    ("GFLOP/s", "forward_vjp_gflops", ".1f"), ("% peak", "forward_vjp_peak_percent", ".0f"),
    ("fwd % peak", "forward_peak_percent", ".0f"),
    ("mem MiB", "forward_vjp_memory_mib", ".1f"), ("x io", "forward_vjp_memory_ratio", ".2f"),
    ("fwd x io", "forward_memory_ratio", ".2f"), ("vs torch", "torch_relative_error", ".0e"),
]
MOE_COLUMNS = [
    ("case", "case", ""), ("dtype", "dtype", ""), ("E", "experts", "d"),
    ("condconv ms", "forward_ms", ".2f"), ("moe ms", "moe_forward_ms", ".2f"),
    ("moe/condconv", "forward_ratio", ".2f"),
    ("fwd+vjp ms", "forward_vjp_ms", ".2f"), ("moe ms", "moe_forward_vjp_ms", ".2f"),
    ("moe/condconv", "forward_vjp_ratio", ".2f"),
]


def _display(row: dict[str, Any]) -> dict[str, Any]:
    """Milliseconds, percentages and MiB for printing."""
    shown = dict(row)
    for key, value in row.items():
        if key.endswith("_s") and isinstance(value, float):
            shown[key[:-2] + "_ms"] = 1e3 * value
        if key.endswith("_peak_fraction"):
            shown[key.replace("fraction", "percent")] = 100 * value
    for prefix in ("forward", "forward_vjp"):
        if f"{prefix}_memory_bytes" in row:
            shown[f"{prefix}_memory_mib"] = row[f"{prefix}_memory_bytes"] / 2**20
            shown[f"{prefix}_memory_ratio"] = (row[f"{prefix}_memory_bytes"]
                                               / row[f"{prefix}_io_bytes"])
    return shown


# ---------------------------------------------------------------- header and main


def machine() -> dict[str, Any]:
    """CPU, versions and thread counts, for the header and the JSON."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as info:
            cpu = next(line.split(":", 1)[1].strip() for line in info
                       if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    blas = np.show_config(mode="dicts")["Build Dependencies"]["blas"]
    facts = {"cpu": cpu, "cpus": os.cpu_count(), "python": platform.python_version(),
             "numpy": np.__version__, "blas": f"{blas.get('name')} {blas.get('version')}",
             "blas_threads": os.environ.get("OPENBLAS_NUM_THREADS"),
             "environment": environment.describe()}
    try:
        import torch
    except ImportError:
        facts["torch"] = None
    else:
        facts["torch"] = torch.__version__
    return facts


def _gpu_name() -> str:
    import cupy

    name = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)["name"]
    return name.decode() if isinstance(name, bytes) else str(name)


def run_backend(run: Runner, options: argparse.Namespace, out: dict[str, Any]) -> None:
    sizes = GPU_GEMM_SIZES if run.name == "cupy" else options.gemm_sizes
    if run.name == "cupy":
        out["machine"]["gpu"] = _gpu_name()
        print(f"\n[cupy] {out['machine']['gpu']}; torch on cuda for the ratios")
    peaks = {}
    for dtype in options.dtypes:
        flops, n = gemm_peak(run, dtype, sizes, warmup=options.warmup, repeat=options.repeat)
        peaks[dtype] = {"gflops": flops / 1e9, "n": n}
    out["gemm_peak"][run.name] = peaks
    print(f"\n[{run.name}] GEMM peak (best median of n x n @ n x n over n in {sizes}): "
          + ", ".join(f"{d} {p['gflops']:.1f} GFLOP/s (n={p['n']})" for d, p in peaks.items()))
    rows = []
    for name in options.cases:
        for dtype in options.dtypes:
            row = measure_case(run, CASES[name], dtype, options, peaks[dtype]["gflops"] * 1e9)
            rows.append(row)
            print(f"  measured {name} {dtype}", file=sys.stderr, flush=True)
    out["cases"].extend(rows)
    print(f"\n[{run.name}] cases (medians of {options.repeat} after {options.warmup} warm-up; "
          "'x torch' = our time / torch's; GFLOP/s and % peak of forward+VJP at 3x the "
          "forward's FLOPs; mem = peak extra memory of forward+VJP, x io = over inputs + "
          "cotangent + outputs + gradients; vs torch = largest difference from torch's output "
          "and gradients, relative to their largest magnitude)")
    print(table([_display(r) for r in rows], CASE_COLUMNS))
    for row in rows:
        if row.get("torch_relative_error") is not None and row["torch_relative_error"] > (
                1e-3 if row["dtype"] == "float32" else 1e-9):
            print(f"  WARNING {row['case']} {row['dtype']}: torch and the library differ by "
                  f"{row['torch_relative_error']:.2e} (relative)")
        elif "torch" in row:
            print(f"  {row['case']} {row['dtype']}: torch skipped: {row['torch']}")
    if options.no_moe:
        return
    moe_rows = [r for name in options.cases for dtype in options.dtypes
                if (r := measure_moe(run, CASES[name], dtype, options)) is not None]
    out["moe"].extend({**r, "backend": run.name} for r in moe_rows)
    print(f"\n[{run.name}] mixture of experts (E convolutions) over CondConv (one mixed "
          "convolution); the paper's claim: about 1 instead of E")
    print(table([_display(r) for r in moe_rows], MOE_COLUMNS))


def _load_line(when: str, facts: dict[str, Any]) -> str:
    load = os.getloadavg()[0]
    facts[f"load_average_{when}"] = load
    busy = load > 0.5 * (facts["cpus"] or 1)
    return (f"load average at {when}: {load:.2f}"
            + (" -- the machine is busy; timings (and the multi-threaded BLAS above all) "
               "suffer from other processes" if busy else ""))


def main(argv: Sequence[str]) -> int:
    options = parse_arguments(argv)
    facts = machine()
    print(f"condconv_ref benchmarks: {facts['cpu']}, {facts['cpus']} CPUs; Python "
          f"{facts['python']}, NumPy {facts['numpy']} ({facts['blas']}, "
          f"{facts['blas_threads']} threads), torch {facts['torch'] or 'not installed'}")
    print(facts["environment"])
    print(_load_line("start", facts))
    out: dict[str, Any] = {"machine": facts, "options": {
        k: v for k, v in vars(options).items() if k != "json"},
        "gemm_peak": {}, "cases": [], "moe": [], "skipped": {}}
    backends = ["numpy", "cupy"] if options.backend == "auto" else [options.backend]
    for name in backends:
        try:
            run = runner(name)
        except Unavailable as exc:
            out["skipped"][name] = str(exc)
            print(f"\n[{name}] skipped: {exc}")
            continue
        run_backend(run, options, out)
    if options.property_examples > 0:
        rate, count = examples_per_second(options.property_examples)
        out["property_loop"] = {"examples_per_second": rate, "examples": count}
        print(f"\nproperty-test loop at S1 (float64, NumPy; forward + VJP + finite-difference "
              f"check_vjp per example): {rate:.1f} hypothesis examples/s over {count} examples")
    print("\n" + _load_line("end", facts))
    if options.json:
        with open(options.json, "w") as handle:
            json.dump(out, handle, indent=1, default=str)
        print(f"\nwrote {options.json}")
    return 0
