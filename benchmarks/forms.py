"""``python -m benchmarks.forms``: where each form of the convolution engine is fastest.

The engine (``condconv_ref._conv_engine``) takes the gather form for small
convolutions, the flat form for depthwise ones and im2col otherwise.  This
times each applicable form's forward + VJP on a ladder of shapes, dense and
depthwise, interleaved (every form once per round) and reports the medians,
the form the engine picks and the size of the gather form's largest array in
elements, the figure ``_gather.GATHER_ELEMENTS`` bounds.  Run it after
changing a form, and move the threshold to where the measured forms cross.
"""

from __future__ import annotations

import argparse
import importlib
import math
import sys
from collections.abc import Sequence

from benchmarks import environment

# (B, C, O, size, k, groups): dense, then depthwise (groups = C = O).
LADDER = [
    (1, 3, 3, 5, 3, 1), (2, 4, 4, 8, 3, 1), (4, 8, 8, 8, 3, 1), (4, 8, 8, 16, 3, 1),
    (8, 16, 16, 16, 3, 1), (8, 32, 32, 16, 3, 1), (8, 32, 64, 32, 3, 1),
    (2, 4, 4, 8, 3, 4), (4, 16, 16, 16, 3, 16), (8, 32, 32, 16, 5, 32), (8, 64, 64, 28, 5, 64),
]


def measure(shape: tuple[int, ...], dtype: str, repeat: int) -> dict[str, object]:
    """Median seconds of each applicable form's forward + VJP at one shape."""
    import numpy as np

    from benchmarks.measure import median, time_interleaved
    from condconv_ref._validate import conv_geometry

    xp = importlib.import_module("array_api_compat.numpy")
    engine = importlib.import_module("condconv_ref._conv_engine")
    forms = {"gather": importlib.import_module("condconv_ref._gather"),
             "flat": importlib.import_module("condconv_ref._flat"),
             "im2col": importlib.import_module("condconv_ref._im2col")}
    batch, channels, out, size, k, groups = shape
    geometry = conv_geometry("forms", (size, size), (k, k), stride=1, padding=k // 2,
                             dilation=1, groups=groups, padding_mode="zeros")
    rng = np.random.default_rng(0)
    x = rng.standard_normal((batch, channels, size, size)).astype(dtype)
    kernel = rng.standard_normal((batch, out, channels // groups, k, k)).astype(dtype)
    bias = rng.standard_normal((batch, out)).astype(dtype)
    cotangent = rng.standard_normal((batch, out, size, size)).astype(dtype)
    names = {"gather": ("gather_conv", "gather_conv_vjp"),
             "flat": ("flat_depthwise_conv", "flat_depthwise_conv_vjp"),
             "im2col": ("im2col_conv", "im2col_conv_vjp")}
    functions = {}
    for form, module in forms.items():
        if form == "flat" and channels // groups != 1:
            continue
        forward, vjp = (getattr(module, name) for name in names[form])

        def run(forward=forward, vjp=vjp):
            forward(x, kernel, bias, geometry, xp=xp)
            vjp(cotangent, x, kernel, bias, geometry, xp=xp)

        functions[form] = (run, lambda: None)
    samples = time_interleaved(functions, warmup=2, repeat=repeat)
    gathered = engine._gathered_elements(tuple(x.shape), tuple(kernel.shape), geometry)
    return {"shape": shape, "gathered": gathered,
            "picked": engine.conv_form(tuple(x.shape), tuple(kernel.shape), geometry,
                                       np.dtype(dtype).itemsize),
            **{form: median(times) for form, times in samples.items()}}


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.forms", description=__doc__)
    parser.add_argument("--dtypes", default="float64,float32")
    parser.add_argument("--repeat", type=int, default=15)
    environment.add_arguments(parser)
    options = parser.parse_args(argv)
    threshold = importlib.import_module("condconv_ref._gather").GATHER_ELEMENTS
    print(f"forward + VJP, medians of {options.repeat} interleaved rounds, in ms; "
          f"the engine takes the gather form up to 2^{math.log2(threshold):.0f} elements")
    print(f"{'dtype':8} {'B':>2} {'C':>3} {'O':>3} {'n':>3} {'k':>2} {'g':>3} "
          f"{'gathered':>9} {'gather':>8} {'flat':>8} {'im2col':>8}  picked  fastest")
    for dtype in options.dtypes.split(","):
        for shape in LADDER:
            row = measure(shape, dtype, options.repeat)
            times = {form: row[form] for form in ("gather", "flat", "im2col") if form in row}
            cells = " ".join(f"{1e3 * times[f]:8.2f}" if f in times else f"{'-':>8}"
                             for f in ("gather", "flat", "im2col"))
            print(f"{dtype:8} " + " ".join(f"{v:>{w}}" for v, w in zip(shape, (2, 3, 3, 3, 2, 3)))
                  + f" 2^{math.log2(row['gathered']):5.1f}   {cells}  {row['picked']:7} "
                  f"{min(times, key=times.get)}", flush=True)
    return 0


if __name__ == "__main__":
    environment.ensure_environment(sys.argv[1:], module="benchmarks.forms")
    sys.exit(main(sys.argv[1:]))
