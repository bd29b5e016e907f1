"""Finite-difference error against step size for one gradient: the V curve.

Rebuilt on every docs build by the matplotlib plot directive (docs/figures/index.rst).

The gradient is that of ``condconv_layer`` with respect to ``x`` (through the
convolution and the routing), in one random direction ``t`` and against one
random cotangent ``c``: the quantity ``check_vjp`` compares,
``<c, J t>`` by central differences against ``<vjp(c), t>`` from the
hand-derived VJP.  The analytic side is always evaluated in float64 at the
(rounded) point, so the curves show the finite-difference error alone:
truncation ``O(h^2)`` on the right, rounding ``O(eps / h)`` on the left.

The marked step is the one ``numerical_jvp`` picks when given no step; the
script computes it from the documented rule and then confirms, through the
public API, that ``numerical_jvp(step=None)`` returns exactly what it returns
at that step, so the mark cannot drift from the code.
"""

from __future__ import annotations

from functools import partial

import matplotlib.pyplot as plt
import numpy as np

from condconv_ref import condconv_layer, condconv_layer_vjp
from condconv_ref.testing import numerical_jvp

EPS = {"float32": 2.0**-23, "float64": 2.0**-52}
COLORS = {"float32": "tab:orange", "float64": "tab:blue"}
OPTIONS = dict(padding="same", padding_mode="reflect")


def point(rng: np.random.Generator) -> tuple[dict, np.ndarray, np.ndarray]:
    """The arguments, a cotangent of the output, and a tangent of ``x``."""
    args = {"x": rng.normal(size=(2, 3, 6, 6)),
            "experts": rng.normal(size=(3, 4, 3, 3, 3)) / 3.0,
            "bias": rng.normal(size=(3, 4)),
            "route_weight": rng.normal(size=(3, 3)),
            "route_bias": rng.normal(size=3)}
    return args, rng.normal(size=(2, 4, 6, 6)), rng.normal(size=(2, 3, 6, 6))


def layer(x, **params):
    return condconv_layer(x, params, **OPTIONS)


def default_step(x: np.ndarray, tangent: np.ndarray, dtype: str) -> float:
    """``numerical_jvp``'s documented default: eps**(1/3) * max(1, max|x|) / max|t|."""
    return EPS[dtype] ** (1 / 3) * max(1.0, float(np.max(np.abs(x)))) / float(
        np.max(np.abs(tangent)))


def errors(dtype: str, steps: np.ndarray, args, cotangent, tangent):
    cast = {name: a.astype(dtype) for name, a in args.items()}
    at_point = {name: a.astype(np.float64) for name, a in cast.items()}  # the rounded point
    grad_x = condconv_layer_vjp(cotangent, at_point["x"],
                                {k: v for k, v in at_point.items() if k != "x"},
                                **OPTIONS)["x"]
    exact = float(np.sum(grad_x * tangent))
    t = {"x": tangent.astype(dtype)}

    def directional(step):
        jvp = numerical_jvp(layer, cast, t, step=step)
        return float(np.sum(cotangent * jvp.astype(np.float64)))

    measured = np.array([abs(directional(float(h)) - exact) / abs(exact) for h in steps])
    chosen = default_step(cast["x"], t["x"], dtype)
    assert np.array_equal(numerical_jvp(layer, cast, t), numerical_jvp(layer, cast, t, step=chosen)), (
        "numerical_jvp's default step is no longer eps**(1/3) * max(1, max|x|) / max|t|; "
        "update docs/_scripts/fd_step_error.py")
    return measured, chosen, abs(directional(chosen) - exact) / abs(exact)


def main() -> None:
    args, cotangent, tangent = point(np.random.default_rng(0))
    steps = np.logspace(-12, 0, 61)
    figure, axes = plt.subplots(figsize=(7.0, 4.2))
    for dtype in ("float32", "float64"):
        measured, chosen, at_chosen = errors(dtype, steps, args, cotangent, tangent)
        color = COLORS[dtype]
        axes.loglog(steps, np.maximum(measured, 1e-17), "-", color=color, label=dtype)
        axes.plot([chosen], [max(at_chosen, 1e-17)], "o", color=color, markersize=8)
        axes.axvline(chosen, color=color, linestyle="--", linewidth=0.8)
        axes.annotate(f"default step\n{chosen:.1e}", (chosen, max(at_chosen, 1e-17)),
                      textcoords="offset points", xytext=(8, -28 if dtype == "float64" else 10), color=color, fontsize=8)
        rtol = 64 * EPS[dtype] ** (2 / 3)
        axes.axhline(rtol, color=color, linestyle=":", linewidth=0.8)
        axes.annotate(f"check_vjp rtol {rtol:.1e}", (steps[0], rtol), textcoords="offset points",
                      xytext=(2, 3), color=color, fontsize=8)
    axes.set_xlabel("step h")
    axes.set_ylabel("relative error of the directional derivative")
    axes.set_title("central differences, condconv_layer, gradient of x")
    axes.set_ylim(1e-13, 10)
    axes.legend(loc="lower left")
    axes.grid(True, which="major", alpha=0.3)


main()
