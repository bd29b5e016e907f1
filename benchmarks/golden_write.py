"""How long golden vectors take: write, check (load) and verify 100 mid-sized cases.

Run from the repository root::

    python -m benchmarks.golden_write [--cases-per-variant 20] [--repeat 3] [--dir PATH]

"Mid-sized": 2-D cases with B <= 8, up to 16 channels per group (2 groups), up
to 32x32 inputs, 5x5 kernels, E <= 4, and linear layers up to 256 features,
drawn by the checker's strategy like any golden set.  Hypothesis favours the
small end: the median input has about 2,000 elements, the largest about 10^5
(e.g. x of shape (8, 26, 22, 27)); 100 cases make 30-50 MB of files.  The
default 20 cases of each of the 5 user-facing variants make 100 cases.

Each repetition writes a fresh directory (every file fsynced and renamed, the
manifest last), then times :func:`condconv_ref.golden.load` (every checksum,
the schema, dtypes and shapes) and :func:`condconv_ref.golden.verify`
(integrity plus recomputing every case with the reference on NumPy).  Medians
are printed.  Like ``python -m benchmarks`` it re-executes Python with
``GLIBC_TUNABLES`` set before NumPy loads (``--no-glibc-tunables`` to skip), so
that timings are not bimodal.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.environment import GLIBC_TUNABLES

_REEXEC_MARK = "CONDCONV_GOLDEN_BENCHMARK_REEXEC"


def _arguments(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.golden_write",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases-per-variant", type=int, default=20,
                        help="cases of each of the 5 user-facing variants (default: 20)")
    parser.add_argument("--repeat", type=int, default=3, help="repetitions (default: 3)")
    parser.add_argument("--dir", type=Path, default=None,
                        help="where to write, and keep, the sets (default: a temporary "
                             "directory, removed afterwards; fsync costs differ between disks)")
    parser.add_argument("--no-glibc-tunables", action="store_true",
                        help="do not set GLIBC_TUNABLES (timings get noisier)")
    return parser.parse_args(argv)


def _ensure_environment(argv: list[str], options: argparse.Namespace) -> None:
    if options.no_glibc_tunables or os.environ.get("GLIBC_TUNABLES") == GLIBC_TUNABLES:
        return
    if os.environ.get(_REEXEC_MARK) or "numpy" in sys.modules:
        print("warning: could not set GLIBC_TUNABLES before NumPy loaded", file=sys.stderr)
        return
    env = {**os.environ, "GLIBC_TUNABLES": GLIBC_TUNABLES, _REEXEC_MARK: "1"}
    sys.stdout.flush()
    os.execve(sys.executable, [sys.executable, "-m", "benchmarks.golden_write", *argv], env)


def _seconds(function) -> tuple[float, object]:
    started = time.perf_counter()
    result = function()
    return time.perf_counter() - started, result


def main(argv: list[str]) -> int:
    options = _arguments(argv)
    _ensure_environment(argv, options)

    from condconv_ref import golden
    from condconv_ref.testing import Supports

    mid_sized = Supports(spatial_dims=(2,), max_batch=8, max_groups=2, max_channels_per_group=16,
                         max_out_per_group=16, max_size=32, max_kernel=5, max_features=256)
    root = options.dir or Path(tempfile.mkdtemp(prefix="golden-benchmark-"))
    timings: dict[str, list[float]] = {"write": [], "load (integrity)": [],
                                      "verify (integrity + recompute)": []}
    for repetition in range(options.repeat):
        directory = root / f"set-{repetition}"
        seconds, _ = _seconds(lambda: golden.write(
            directory, cases=options.cases_per_variant, seed=repetition, supports=mid_sized,
            force=True))
        timings["write"].append(seconds)
        seconds, loaded = _seconds(lambda: golden.load(directory))
        timings["load (integrity)"].append(seconds)
        seconds, report = _seconds(lambda: golden.verify(directory))
        timings["verify (integrity + recompute)"].append(seconds)
        assert report.passed, "the reference disagrees with the vectors it just wrote"
        size = sum(path.stat().st_size for path in directory.iterdir())
        volumes = sorted(math.prod(c.case.x.shape) for c in loaded.cases)
        print(f"repetition {repetition}: {len(loaded.cases)} cases, {size / 2**20:.1f} MiB; "
              f"x elements: median {volumes[len(volumes) // 2]}, largest {volumes[-1]} "
              f"{max((c.case.x.shape for c in loaded.cases), key=math.prod)}")
    count = len(loaded.cases)
    print(f"\nmedians over {options.repeat} repetitions, {count} mid-sized cases "
          f"({GLIBC_TUNABLES if os.environ.get('GLIBC_TUNABLES') else 'GLIBC_TUNABLES unset'}):")
    for what, values in timings.items():
        median = statistics.median(values)
        print(f"  {what:32s} {median:7.2f} s   {1e3 * median / count:6.1f} ms per case")
    if options.dir is None:
        shutil.rmtree(root)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
