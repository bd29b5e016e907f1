"""Process environment for stable timings, set by re-executing Python before NumPy loads.

Two things must be in the environment before NumPy (and its BLAS) is imported:

* ``GLIBC_TUNABLES``: glibc otherwise returns large temporaries to the OS
  between calls (``mmap``/``munmap`` and heap trimming), so every call pays
  fresh page faults and NumPy timings come out bimodal, up to 2x apart from
  one process to the next.  The tunables keep freed memory in the process.
* the BLAS thread count (``OPENBLAS_NUM_THREADS`` and friends), so that NumPy
  and torch (``torch.set_num_threads``) use the same number of threads.

Only the standard library is used here.
"""

from __future__ import annotations

import argparse
import os
import sys

GLIBC_TUNABLES = (
    "glibc.malloc.mmap_threshold=33554432"
    ":glibc.malloc.trim_threshold=4294967296"
    ":glibc.malloc.top_pad=268435456"
)
THREAD_VARIABLES = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")
_REEXEC_MARK = "CONDCONV_BENCHMARKS_REEXEC"


def default_threads() -> int:
    """The CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options that shape the environment (shared with the full command line)."""
    parser.add_argument("--threads", type=int, default=None,
                        help="BLAS threads for NumPy and torch.set_num_threads "
                             "(default: the CPUs available)")
    parser.add_argument("--no-glibc-tunables", action="store_true",
                        help="do not set GLIBC_TUNABLES (timings get noisier)")


def wanted_environment(argv: list[str]) -> dict[str, str]:
    """Environment variables the benchmark process should run with."""
    parser = argparse.ArgumentParser(add_help=False)
    add_arguments(parser)
    options, _ = parser.parse_known_args(argv)
    threads = str(options.threads or default_threads())
    wanted = {name: threads for name in THREAD_VARIABLES}
    if not options.no_glibc_tunables:
        wanted["GLIBC_TUNABLES"] = GLIBC_TUNABLES
    return wanted


def ensure_environment(argv: list[str], module: str = "benchmarks") -> None:
    """Re-execute ``python -m <module> <argv>`` with the wanted environment, unless it is set.

    Must run before NumPy is imported; does nothing on the second pass.
    """
    wanted = wanted_environment(argv)
    if all(os.environ.get(k) == v for k, v in wanted.items()):
        return
    if os.environ.get(_REEXEC_MARK) or "numpy" in sys.modules:
        print("warning: could not set " + ", ".join(sorted(wanted)) + " before NumPy loaded; "
              "timings may be noisier", file=sys.stderr)
        return
    env = {**os.environ, **wanted, _REEXEC_MARK: "1"}
    sys.stdout.flush()
    os.execve(sys.executable, [sys.executable, "-m", module, *argv], env)


def describe() -> str:
    """One line saying how the allocator environment was set."""
    value = os.environ.get("GLIBC_TUNABLES")
    if value is None:
        return "GLIBC_TUNABLES not set (--no-glibc-tunables): NumPy timings may be bimodal"
    how = "set by re-executing Python before NumPy loaded" if os.environ.get(_REEXEC_MARK) \
        else "inherited from the environment"
    return f"GLIBC_TUNABLES={value} ({how})"
