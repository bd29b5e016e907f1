"""Regenerate the golden set shipped in the package, ``condconv_ref/golden_data``.

Run from the repository root::

    python scripts/write_golden_data.py

It is exactly this command (see docs/golden-format.md)::

    condconv-ref golden write --variant condconv --variant condconv_layer \\
        --variant depthwise_condconv_layer --variant cond_linear_layer \\
        --variant dynamic_conv_layer --variant conv --variant odconv_layer \\
        --cases 7 --seed 0 --dtype float64 --out condconv_ref/golden_data --force

49 float64 cases, about 0.5 MB.  With seed 0 they cover every padding form
(int, per-dim, pairs, 'valid', 'same') and mode, strides and dilations above 1,
groups, depth multipliers, 1-3 spatial dims, and bias on and off, and ODConv
with skipped heads and both batch-norm modes;
tests/test_golden.py checks that coverage.  The configurations are drawn by
hypothesis, so another hypothesis version may draw other cases: that is a new
golden set, not a change of semantics, and the old one still verifies.  Only
regenerate it on purpose, and say why in the commit.
"""

import sys
from pathlib import Path

from condconv_ref.cli import main

VARIANTS = ("condconv", "condconv_layer", "depthwise_condconv_layer", "cond_linear_layer",
            "dynamic_conv_layer", "conv", "odconv_layer")
OUT = Path(__file__).resolve().parent.parent / "condconv_ref" / "golden_data"

if __name__ == "__main__":
    arguments = ["golden", "write"]
    for variant in VARIANTS:
        arguments += ["--variant", variant]
    arguments += ["--cases", "7", "--seed", "0", "--dtype", "float64", "--out", str(OUT),
                  "--force"]
    sys.exit(main(arguments))
