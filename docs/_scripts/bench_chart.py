"""The performance table as a bar chart against torch, from docs/_static/bench.json.

Rebuilt on every docs build by the matplotlib plot directive (docs/figures/index.rst).
The JSON is what ``python -m benchmarks --json FILE`` writes; refresh it with

    python -m benchmarks --json docs/_static/bench.json

Left: forward+VJP time of the NumPy backend over PyTorch's CPU time (the
grouped-conv batch trick with autograd, same thread count, same run), per case
and dtype, with the targets marked.  Right: the time
of the mixture-of-experts form (E convolutions) over CondConv's (one mixed
convolution), forward+VJP, against the number of experts.
"""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

# The plot directive runs this file without __file__, in docs/_scripts (conf.py).
HERE = Path(__file__).resolve().parent if "__file__" in globals() else Path.cwd()
BENCH = HERE.parent / "_static" / "bench.json"
DTYPES = ("float32", "float64")
COLORS = {"float32": "tab:orange", "float64": "tab:blue"}
# Targets: forward+VJP time over torch's, NumPy backend (docs/performance.md).
TARGETS = {("S0", "float32"): 1.5, ("S0", "float64"): 1.5, ("S0L", "float32"): 1.5,
           ("S0L", "float64"): 1.5, ("S3", "float32"): 1.0, ("S3", "float64"): 0.8,
           ("S4g", "float32"): 1.2, ("S4g", "float64"): 0.9, ("S5", "float32"): 1.2,
           ("S5", "float64"): 1.2}
ORDER = ("S0", "S0L", "S1", "S2", "S3", "S4", "S4g", "S5", "S6")


def _rows(results: dict, key: str) -> list[dict]:
    return [row for row in results.get(key, [])
            if row.get("status") == "ok" and row.get("backend", "numpy") == "numpy"]


def torch_ratios(axes, results: dict) -> None:
    rows = [row for row in _rows(results, "cases") if "forward_vjp_vs_torch" in row]
    present = {row["case"] for row in rows}
    cases = [case for case in ORDER if case in present] + sorted(present - set(ORDER))
    width = 0.38
    for shift, dtype in zip((-width / 2, width / 2), DTYPES):
        ratios = {row["case"]: row["forward_vjp_vs_torch"] for row in rows if row["dtype"] == dtype}
        positions = [i + shift for i, case in enumerate(cases) if case in ratios]
        values = [ratios[case] for case in cases if case in ratios]
        bars = axes.bar(positions, values, width, color=COLORS[dtype], label=dtype)
        axes.bar_label(bars, fmt="%.2g", fontsize=7, padding=1)
        for i, case in enumerate(cases):
            if (case, dtype) in TARGETS:
                axes.plot([i + shift - width / 2, i + shift + width / 2],
                          [TARGETS[case, dtype]] * 2, color="black", linewidth=1.5)
    axes.axhline(1.0, color="gray", linewidth=0.8, linestyle="--")
    axes.set_yscale("log")
    axes.set_xticks(range(len(cases)), cases)
    axes.set_ylabel("forward+VJP time / torch's")
    axes.set_title("condconv_ref (NumPy) vs torch CPU\n(black: target; lower is faster)",
                   fontsize=9)
    axes.legend(fontsize=8)


def moe_ratios(axes, results: dict) -> None:
    rows = [row for row in _rows(results, "moe") if "forward_vjp_ratio" in row]
    for dtype in DTYPES:
        chosen = [row for row in rows if row["dtype"] == dtype]
        axes.scatter([row["experts"] for row in chosen], [row["forward_vjp_ratio"] for row in chosen],
                     color=COLORS[dtype], label=dtype, zorder=3)
        for row in chosen:
            axes.annotate(row["case"], (row["experts"], row["forward_vjp_ratio"]), fontsize=7,
                          textcoords="offset points", xytext=(4, 2))
    experts = sorted({row["experts"] for row in rows}) or [1, 8]
    span = np.array([min(experts), max(experts)])
    axes.plot(span, span, color="gray", linestyle="--", linewidth=0.8, label="E convolutions")
    axes.axhline(1.0, color="gray", linewidth=0.8)
    axes.set_yscale("log")
    axes.set_xlabel("experts E")
    axes.set_ylabel("moe_condconv / condconv time")
    axes.set_title("mixture of experts over CondConv\n(the paper: about 1 instead of E)",
                   fontsize=9)
    axes.legend(fontsize=8)


def main() -> None:
    results = json.loads(BENCH.read_text())
    figure, (left, right) = plt.subplots(1, 2, figsize=(9.5, 3.8),
                                         gridspec_kw={"width_ratios": [3, 2]}, layout="constrained")
    torch_ratios(left, results)
    moe_ratios(right, results)
    machine, options = results.get("machine", {}), results.get("options", {})
    run = (f"{'quick run, ' if options.get('quick') else ''}medians of "
           f"{options.get('repeat', '?')} repetitions")
    figure.suptitle(f"{machine.get('cpu', '?')}, {machine.get('cpus', '?')} CPUs, NumPy "
                    f"{machine.get('numpy', '?')}, torch {machine.get('torch', '?')}; {run}",
                    fontsize=8)


main()
