"""The ``condconv-ref`` command.

Each subcommand is one ``add_<name>(subcommands)`` function listed in
:data:`SUBCOMMANDS`: it adds its parser and sets ``handler``, a function of the
parsed arguments that returns the exit status.  Bad input, whether rejected by
argparse or raised by a handler as one of :data:`USER_ERRORS`, is one line on
stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable, Sequence
from typing import NoReturn

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from condconv_ref import __version__, golden, verify
from condconv_ref.backends import BACKEND_NAMES, BackendUnavailable, get_backend
from condconv_ref.variants import VARIANTS

__all__ = ["SUBCOMMANDS", "USER_ERRORS", "add_golden", "add_verify", "build_parser", "main"]

USER_ERRORS = (BackendUnavailable, OSError, TypeError, ValueError)
"""Exceptions a handler may raise for bad input: reported in one line, exit status 2."""

_STATUS_STYLE = {"PASS": "green", "FAIL": "bold red", "SKIP": "yellow"}


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line on stderr and exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _int_at_least(minimum: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected an integer >= {minimum}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {value}")
        return value

    parse.__name__ = f"integer >= {minimum}"
    return parse


# ---------------------------------------------------------------- verify


def add_verify(subcommands: argparse._SubParsersAction) -> None:
    """``condconv-ref verify``: the library checks itself (:mod:`condconv_ref.verify`)."""
    parser = subcommands.add_parser(
        "verify", help="check every op over random cases and print a table",
        description="Run every check of condconv_ref.verify over N random cases: the "
                    "mixture-of-experts equivalences, VJPs against float64 finite differences, "
                    "and a SciPy oracle. Exit status 1 if any check fails.")
    parser.add_argument("--backend", choices=BACKEND_NAMES, default="numpy",
                        help="array library the ops run on (default: %(default)s)")
    parser.add_argument("--cases", type=_int_at_least(1), default=verify.DEFAULT_CASES,
                        metavar="N", help="random cases per check (default: %(default)s)")
    parser.add_argument("--seed", type=_int_at_least(0), default=0, metavar="S",
                        help="seed of the cases; the same seed reruns them (default: %(default)s)")
    parser.add_argument("--dtype", choices=verify.DTYPES, default="float64",
                        help="dtype the ops run in; finite differences always use float64 "
                             "(default: %(default)s)")
    parser.set_defaults(handler=_verify)


def _verify(args: argparse.Namespace) -> int:
    backend = get_backend(args.backend)
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task("drawing cases", total=None)

        def advance(check: verify.Check, done: int, total: int) -> None:
            bar.update(task, completed=done, total=total, description=f"{check.op}: {check.kind}")

        rows = verify.run(backend=backend, cases=args.cases, seed=args.seed, dtype=args.dtype,
                          progress=advance)
    console = Console()
    if not console.is_terminal:
        console = Console(width=max(console.width, 140))
    console.print(_table(rows, args))
    _print_notes(console, rows)
    return 1 if any(row.status == "FAIL" for row in rows) else 0


def _number(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:.2e}"


def _tolerance(row: verify.Row) -> str:
    low, high = row.tol_range
    return _number(low) if low == high or math.isnan(low) else f"{_number(low)}..{_number(high)}"


def _table(rows: list[verify.Row], args: argparse.Namespace) -> Table:
    table = Table(
        title=f"condconv-ref verify: backend {args.backend}, {args.dtype}, {args.cases} cases, "
              f"seed {args.seed}",
        caption="rel err = max|actual - expected| / max|expected|; for finite differences "
                "|<vjp(c),t> - <c,Jt>| / sum of |products|. A case passes when rel err <= its "
                "tolerance.")
    for header, justify in (("op", "left"), ("check", "left"), ("cases", "right"),
                            ("max abs err", "right"), ("max rel err", "right"),
                            ("tolerance", "right"), ("result", "center")):
        table.add_column(header, justify=justify, no_wrap=header in ("op", "result"))
    for row in rows:
        status = row.status
        table.add_row(row.op, row.kind, str(row.cases), _number(row.max_abs_err),
                      _number(row.max_rel_err), _tolerance(row),
                      f"[{_STATUS_STYLE[status]}]{status}[/]")
    return table


def _print_notes(console: Console, rows: list[verify.Row]) -> None:
    for row in rows:
        if row.status == "SKIP":
            console.print(f"{row.op} / {row.kind} skipped: {row.skipped}", markup=False)
        elif row.status == "FAIL":
            console.print(f"FAIL {row.op} / {row.kind}: {row.failed} of {row.cases} cases failed; "
                          f"the first, {row.detail}", markup=False, highlight=False)
    failed = sum(row.status == "FAIL" for row in rows)
    if failed:
        console.print(f"[bold red]{failed} of {len(rows)} checks failed[/]")
    else:
        console.print(f"[green]all {len(rows)} checks passed[/] "
                      f"({sum(row.status == 'SKIP' for row in rows)} skipped)")


# ---------------------------------------------------------------- golden


def add_golden(subcommands: argparse._SubParsersAction) -> None:
    """``condconv-ref golden write|verify``: golden-vector files (:mod:`condconv_ref.golden`)."""
    parser = subcommands.add_parser(
        "golden", help="write or verify golden-vector files (.npz + manifest.json)",
        description="Golden vectors for implementations that cannot call Python: one .npz per "
                    "case (inputs, cotangent, reference output and gradients) and a "
                    "checksummed manifest.json. See docs/golden-format.md.")
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)

    write = actions.add_parser(
        "write", help="draw cases and write a golden directory",
        description="Write N cases of each variant, drawn from seed S, into DIR. Files are "
                    "written atomically and the manifest last.")
    write.add_argument("--variant", action="append", dest="variants", metavar="V",
                       choices=list(VARIANTS),
                       help="a variant to write; repeat for several (default: "
                            f"{', '.join(golden.DEFAULT_VARIANTS)})")
    write.add_argument("--cases", type=_int_at_least(1), default=4, metavar="N",
                       help="cases per variant (default: %(default)s)")
    write.add_argument("--seed", type=_int_at_least(0), default=0, metavar="S",
                       help="seed of the configurations, arrays and cotangents "
                            "(default: %(default)s)")
    write.add_argument("--dtype", choices=golden.DTYPES, default="float64",
                       help="dtype of every stored array (default: %(default)s)")
    write.add_argument("--out", required=True, metavar="DIR", help="the directory to write")
    write.add_argument("--force", action="store_true",
                       help="replace DIR if it already holds a golden set")
    write.set_defaults(handler=_golden_write)

    check = actions.add_parser(
        "verify", help="check a golden directory and recompute every case",
        description="Check DIR's integrity (checksums, schema, dtypes, shapes, missing or extra "
                    "files), then recompute every case and compare. Exit status 1 on any "
                    "integrity problem or mismatch.")
    check.add_argument("directory", metavar="DIR", nargs="?", default=golden.SHIPPED,
                       help="a golden directory (default: the set shipped in the package)")
    check.add_argument("--against", metavar="FILE.py:FACTORY",
                       help="check an implementation instead of the reference: FACTORY() in "
                            "FILE.py returns its forward (and vjp) callables")
    check.add_argument("--variant", action="append", dest="variants", metavar="V",
                       choices=list(VARIANTS),
                       help="recompute only this variant's cases; repeat for several "
                            "(default: all; every file is checked either way)")
    check.add_argument("--backend", default="numpy", metavar="NAME",
                       help="where the reference recomputes the cases: "
                            f"{', '.join(BACKEND_NAMES)} (default: %(default)s)")
    check.set_defaults(handler=_golden_verify)


def _progress_bar() -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), console=Console(stderr=True), transient=True)


def _golden_write(args: argparse.Namespace) -> int:
    with _progress_bar() as bar:
        task = bar.add_task("writing cases", total=None)
        directory = golden.write(args.out, variants=args.variants, cases=args.cases,
                                 seed=args.seed, dtype=args.dtype, force=args.force,
                                 progress=lambda done, total: bar.update(task, completed=done,
                                                                         total=total))
    written = args.cases * len(args.variants or golden.DEFAULT_VARIANTS)
    Console().print(f"wrote {written} cases and {golden.MANIFEST} to {directory}",
                    markup=False, highlight=False)
    return 0


def _golden_verify(args: argparse.Namespace) -> int:
    against = golden.load_implementation(args.against) if args.against else None
    try:
        with _progress_bar() as bar:
            task = bar.add_task("recomputing cases", total=None)
            report = golden.verify(args.directory, against=against, backend=args.backend,
                                   variants=args.variants, progress=lambda done, total: bar.update(
                                       task, completed=done, total=total))
    except golden.GoldenError as error:
        for problem in error.problems:
            print(f"condconv-ref golden verify: {problem}", file=sys.stderr)
        count = len(error.problems)
        print(f"condconv-ref golden verify: {args.directory} failed its integrity check "
              f"({count} problem{'s' if count > 1 else ''}); nothing was recomputed",
              file=sys.stderr)
        return 1
    console = Console()
    if not console.is_terminal:
        console = Console(width=max(console.width, 140))
    console.print(_golden_table(report))
    for result in report.failures:
        for mismatch in result.mismatches:
            console.print(f"FAIL {result.file} ({result.variant}): {mismatch}", markup=False,
                          highlight=False)
    failed = len(report.failures)
    if failed:
        console.print(f"[bold red]{failed} of {len(report.results)} cases failed[/]")
    else:
        console.print(f"[green]all {len(report.results)} cases passed[/]")
    return 1 if failed else 0


def _golden_table(report: golden.Report) -> Table:
    table = Table(
        title=f"condconv-ref golden verify: {report.directory}, {report.dtype}, "
              f"{report.compared}",
        caption="Every element must satisfy |actual - stored| <= rtol (|stored| + max|stored|), "
                "rtol = 16 eps sqrt(longest sum); error/tol is the largest ratio (< 1 passes).")
    for header, justify in (("variant", "left"), ("cases", "right"), ("failed", "right"),
                            ("worst error/tol", "right"), ("rtol", "right"),
                            ("result", "center")):
        table.add_column(header, justify=justify, no_wrap=header in ("variant", "result"))
    for variant in dict.fromkeys(result.variant for result in report.results):
        results = [result for result in report.results if result.variant == variant]
        failed = sum(not result.passed for result in results)
        ratios = [result.worst_ratio for result in results if not math.isnan(result.worst_ratio)]
        rtols = [result.rtol for result in results if not math.isnan(result.rtol)]
        rtol = ("-" if not rtols else _number(rtols[0]) if min(rtols) == max(rtols)
                else f"{_number(min(rtols))}..{_number(max(rtols))}")
        status = "FAIL" if failed else "PASS"
        table.add_row(variant, str(len(results)), str(failed),
                      _number(max(ratios)) if ratios else "-", rtol,
                      f"[{_STATUS_STYLE[status]}]{status}[/]")
    return table


# ---------------------------------------------------------------- the command

SUBCOMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [add_verify, add_golden]
"""One ``add_<name>(subcommands)`` per subcommand, in ``--help`` order."""


def build_parser() -> argparse.ArgumentParser:
    """The ``condconv-ref`` parser with every subcommand of :data:`SUBCOMMANDS`."""
    parser = _Parser(prog="condconv-ref",
                     description="Golden reference and verification toolkit for CondConv-style "
                                 "layers.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    subcommands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add in SUBCOMMANDS:
        add(subcommands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``condconv-ref`` with ``argv`` (default ``sys.argv[1:]``); return the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_request:  # --help, --version, or a usage error already printed
        code = exit_request.code
        return code if isinstance(code, int) else (0 if code is None else 2)
    try:
        return args.handler(args)
    except USER_ERRORS as error:
        message = " ".join(str(error).split())
        print(f"condconv-ref {args.command}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
