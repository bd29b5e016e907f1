"""The ``condconv-ref`` command.

Each subcommand is one ``add_<name>(subcommands)`` function listed in
:data:`SUBCOMMANDS`: it adds its parser and sets ``handler``, a function of the
parsed arguments that returns the exit status.

Exit statuses: :data:`EXIT_PASSED` (0), :data:`EXIT_FAILED` (1, a check
failed), :data:`EXIT_USAGE` (2, bad input), :data:`EXIT_INCOMPLETE` (3, some
checks could not run, e.g. SciPy is not installed) and :data:`EXIT_INTERNAL`
(70, a bug in condconv_ref).  Bad input, whether rejected by argparse or raised
by a handler as one of :data:`USER_ERRORS` (a case beyond the memory budget
included), is one line on stderr and exit status 2, never a traceback; so is a
command that draws cases (``verify``, ``golden write``, ``check``,
``gpu-check``) run where hypothesis is not installed.  A ``TypeError`` or
``ValueError`` counts as bad input only when the library raised it on purpose
(a ``raise`` statement of condconv_ref, where every message names the function
and the argument); one raised from inside NumPy, say, is an internal error:
its traceback is printed and the exit status is 70.  ``--debug`` prints the
traceback of bad input too.

The command owns its process, so with ``--backend jax`` it turns JAX's 64-bit
mode on (float64 runs in float64, and the finite differences need it) unless the
environment variable ``JAX_ENABLE_X64`` is set: then JAX's setting stands, and
with the mode off a float64 run is refused as bad input, never run in float32.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import linecache
import math
import os
import sys
import traceback
import xml.etree.ElementTree as ElementTree
from pathlib import Path
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from condconv_ref import __version__, golden, gpu, verify
from condconv_ref.backends import BACKEND_NAMES, BackendUnavailable, get_backend
from condconv_ref.accuracy import jsonable
from condconv_ref.engine import Row
from condconv_ref.memory import MemoryBudgetError
from condconv_ref.testing import Supports, checker
from condconv_ref.variants import LAYER_VARIANTS, VARIANTS

__all__ = ["EXIT_FAILED", "EXIT_INCOMPLETE", "EXIT_INTERNAL", "EXIT_PASSED", "EXIT_USAGE",
           "SUBCOMMANDS", "USER_ERRORS", "add_check", "add_golden", "add_gpu_check", "add_verify",
           "build_parser", "main"]

EXIT_PASSED = 0
"""Every check ran and passed."""
EXIT_FAILED = 1
"""A check failed (or a golden directory failed its integrity check)."""
EXIT_USAGE = 2
"""Bad input: an option, a file, a backend that is not available; one line on stderr."""
EXIT_INCOMPLETE = 3
"""Nothing failed, but some checks could not run (an optional dependency is missing): not a
pass."""
EXIT_INTERNAL = 70
"""An internal error, a bug in condconv_ref: its traceback is on stderr (``EX_SOFTWARE`` of
BSD's sysexits)."""

USER_ERRORS = (BackendUnavailable, MemoryBudgetError, OSError, TypeError, ValueError)
"""Exceptions a handler may raise for bad input or a case too large for the memory budget
(:func:`condconv_ref.set_memory_budget`): reported in one line, exit status 2."""

_STATUS_STYLE = {"PASS": "green", "FAIL": "bold red", "SKIP": "yellow"}


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line on stderr and exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


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
    _add_report_options(parser, "rows")
    parser.set_defaults(handler=_verify)


def _verify(args: argparse.Namespace) -> int:
    backend = get_backend(args.backend)
    with _progress_bar() as bar:
        task = bar.add_task("drawing cases", total=None)

        def advance(check: verify.Check, done: int, total: int) -> None:
            bar.update(task, completed=done, total=total, description=f"{check.op}: {check.kind}")

        rows = verify.run(backend=backend, cases=args.cases, seed=args.seed, dtype=args.dtype,
                          progress=advance)
    failed = any(row.status == "FAIL" for row in rows)
    skipped = [f"{row.op} / {row.kind}: {row.skipped}" for row in rows if row.status == "SKIP"]
    status = EXIT_FAILED if failed else EXIT_INCOMPLETE if skipped else EXIT_PASSED
    if args.json:
        _print_json({"command": "verify", "backend": args.backend, "dtype": args.dtype,
                     "cases": args.cases, "seed": args.seed,
                     "passed": status == EXIT_PASSED, "complete": not skipped,
                     "not_run": skipped, "rows": [row.to_json() for row in rows]})
    else:
        console = _wide_console()
        console.print(_table(rows, args))
        _print_notes(console, rows)
    _write_junit(args, "verify", [_row_testcase(row) for row in rows])
    return status


BOUND_CAPTION = ("error/bound = max |actual - expected| / bound over every element, the bound "
                 "derived from the rounding of the summed terms (condconv_ref.accuracy); at most "
                 "1 passes.")



def _units(value: float) -> str:
    """An error in units of the bound, e.g. ``0.031``."""
    return "-" if math.isnan(value) else f"{value:.3g}"


def _print_json(document: dict[str, Any]) -> None:
    print(json.dumps(document, indent=2, allow_nan=False))


def _table(rows: list[Row], args: argparse.Namespace) -> Table:
    table = Table(
        title=f"condconv-ref verify: backend {args.backend}, {args.dtype}, {args.cases} cases, "
              f"seed {args.seed}",
        caption=BOUND_CAPTION)
    for header, justify in (("op", "left"), ("check", "left"), ("cases", "right"),
                            ("error/bound", "right"), ("worst at", "left"),
                            ("result", "center")):
        table.add_column(header, justify=justify, no_wrap=header in ("op", "result"))
    for row in rows:
        status = row.status
        table.add_row(row.op, row.kind, str(row.cases), _units(row.units), row.where,
                      f"[{_STATUS_STYLE[status]}]{status}[/]")
    return table


def _print_notes(console: Console, rows: list[Row]) -> None:
    for row in rows:
        if row.status == "SKIP":
            console.print(f"{row.op} / {row.kind} skipped: {row.skipped}", markup=False)
        elif row.status == "FAIL":
            console.print(f"FAIL {row.op} / {row.kind}: {row.failed} of {row.cases} cases failed; "
                          f"the first, {row.detail}", markup=False, highlight=False)
        if row.notes:
            console.print(f"note {row.op} / {row.kind}: {row.notes}", markup=False,
                          highlight=False)
    failed = sum(row.status == "FAIL" for row in rows)
    skipped = sum(row.status == "SKIP" for row in rows)
    if failed:
        console.print(f"[bold red]{failed} of {len(rows)} checks failed[/]"
                      + (f", {skipped} did not run" if skipped else ""))
    elif skipped:
        console.print(f"[bold yellow]INCOMPLETE: {skipped} of {len(rows)} checks did not run[/] "
                      f"(see the reasons above; install what they name); the other "
                      f"{len(rows) - skipped} passed. Exit status {EXIT_INCOMPLETE}.")
    else:
        console.print(f"[green]all {len(rows)} checks passed[/]")


# ---------------------------------------------------------------- machine-readable reports


def _add_report_options(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("--json", action="store_true",
                        help=f"print the {what} as JSON on stdout instead of a table")
    parser.add_argument("--junit-xml", metavar="FILE", type=Path,
                        help="also write the results as JUnit XML to FILE, one <testcase> per "
                             "row, for CI systems that show test reports")


@dataclasses.dataclass(frozen=True)
class _TestCase:
    """One ``<testcase>`` of a JUnit XML report."""

    classname: str
    name: str
    failure: str = ""
    skipped: str = ""
    seconds: float = 0.0


def _write_junit(args: argparse.Namespace, suite: str, testcases: Sequence[_TestCase]) -> None:
    """Write ``testcases`` to ``args.junit_xml`` (when given) as one JUnit ``<testsuite>``."""
    if args.junit_xml is None:
        return
    root = ElementTree.Element("testsuites")
    element = ElementTree.SubElement(root, "testsuite", {
        "name": f"condconv-ref {suite}", "tests": str(len(testcases)),
        "failures": str(sum(bool(case.failure) for case in testcases)),
        "skipped": str(sum(bool(case.skipped) and not case.failure for case in testcases)),
        "errors": "0", "time": f"{sum(case.seconds for case in testcases):.3f}"})
    for case in testcases:
        entry = ElementTree.SubElement(element, "testcase", {
            "classname": case.classname, "name": case.name, "time": f"{case.seconds:.3f}"})
        if case.failure:
            ElementTree.SubElement(entry, "failure", {
                "message": case.failure.splitlines()[0]}).text = case.failure
        elif case.skipped:
            ElementTree.SubElement(entry, "skipped", {"message": case.skipped})
    ElementTree.indent(root)
    ElementTree.ElementTree(root).write(args.junit_xml, encoding="utf-8", xml_declaration=True)


def _row_testcase(row: Row) -> _TestCase:
    failure = "" if row.status != "FAIL" else (
        f"{row.failed} of {row.cases} cases failed; the first, {row.detail}")
    return _TestCase(f"condconv_ref.verify.{row.op}", row.kind, failure, row.skipped)


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
    write.add_argument("--supports-of", metavar="FILE.py:FACTORY",
                       help="draw only cases within what the implementation FACTORY() returns "
                            "declares it supports (as for condconv-ref check)")
    write.add_argument("--supports", action="append", dest="limits", type=_supports_field,
                       metavar="FIELD=VALUE", default=[],
                       help="a limit of condconv_ref.testing.Supports, e.g. spatial_dims=2, "
                            "padding_forms=int,per_dim, padding_modes=zeros, bias=true, "
                            "max_size=12 (lists comma-separated); repeat for several; these "
                            "override --supports-of")
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
                            "FILE.py returns it, as for condconv-ref check; needs --variant, "
                            "and cases outside what it supports are skipped, not failed")
    check.add_argument("--variant", action="append", dest="variants", metavar="V",
                       choices=list(VARIANTS),
                       help="recompute only this variant's cases; repeat for several "
                            "(default: all; every file is checked either way)")
    check.add_argument("--backend", default="numpy", metavar="NAME",
                       help="where the reference recomputes the cases: "
                            f"{', '.join(BACKEND_NAMES)} (default: %(default)s)")
    _add_report_options(check, "results")
    check.set_defaults(handler=_golden_verify)


def _wide_console() -> Console:
    """A stdout console; at least 140 columns wide when not a terminal, so tables do not wrap."""
    console = Console()
    return console if console.is_terminal else Console(width=max(console.width, 140))


def _progress_bar() -> Progress:
    """A transient progress bar on stderr, so stdout carries only the report."""
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), console=Console(stderr=True), transient=True)


_SUPPORTS_FIELDS = {field.name: field.default for field in dataclasses.fields(Supports)
                    if isinstance(field.default, (int, tuple))}
"""The fields ``--supports`` sets: the limits and choices (not the per-array switches of
``optional`` nor the ``excludes`` function, which a ``--supports-of`` factory carries)."""


def _supports_field(text: str) -> tuple[str, Any]:
    """``FIELD=VALUE`` of :class:`~condconv_ref.testing.Supports`, the value parsed like the
    field's default (an int, or a comma-separated tuple of ints, floats, names or booleans)."""
    name, equals, value = text.partition("=")
    name = name.strip().replace("-", "_")
    if not equals or name not in _SUPPORTS_FIELDS:
        raise argparse.ArgumentTypeError(
            f"expected FIELD=VALUE with FIELD one of {', '.join(_SUPPORTS_FIELDS)}, got {text!r}")
    default = _SUPPORTS_FIELDS[name]
    try:
        if isinstance(default, int):
            return name, int(value)
        kind = type(default[0])
        items = [item.strip() for item in value.split(",") if item.strip()]
        if kind is bool:
            table = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}
            return name, tuple(table[item.lower()] for item in items)
        return name, tuple(kind(item) for item in items)
    except (KeyError, ValueError):
        expected = ("an integer" if isinstance(default, int) else
                    "a comma-separated list like " + ",".join(map(str, default)).lower())
        raise argparse.ArgumentTypeError(f"{name}: cannot read {value!r} as {expected}") from None


def _write_supports(args: argparse.Namespace) -> Supports | None:
    """The limits ``golden write`` draws within: ``--supports-of``'s, then ``--supports``."""
    base = None
    if args.supports_of:
        base = checker.load_implementation(args.supports_of).supports or Supports()
    if not args.limits:
        return base
    return dataclasses.replace(base or Supports(), **dict(args.limits))


def _golden_write(args: argparse.Namespace) -> int:
    supports = _write_supports(args)
    with _progress_bar() as bar:
        task = bar.add_task("writing cases", total=None)
        directory = golden.write(args.out, variants=args.variants, cases=args.cases,
                                 seed=args.seed, dtype=args.dtype, force=args.force,
                                 supports=supports,
                                 progress=lambda done, total: bar.update(task, completed=done,
                                                                         total=total))
    written = args.cases * len(args.variants or golden.DEFAULT_VARIANTS)
    Console().print(f"wrote {written} cases and {golden.MANIFEST} to {directory}",
                    markup=False, highlight=False)
    return 0


def _golden_verify(args: argparse.Namespace) -> int:
    if args.against and not args.variants:
        raise ValueError("--against needs --variant V, the variant the implementation "
                         "implements; without it every case of every variant would be "
                         "handed to it")
    against = checker.load_implementation(args.against) if args.against else None
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
        _write_junit(args, "golden verify", [_TestCase(
            "condconv_ref.golden", "integrity", "\n".join(error.problems))])
        return EXIT_FAILED
    failed, skipped = len(report.failures), len(report.skipped)
    ran = len(report.results) - skipped
    status = EXIT_FAILED if failed else EXIT_INCOMPLETE if not ran else EXIT_PASSED
    _write_junit(args, "golden verify", [_TestCase(
        f"condconv_ref.golden.{result.variant}", result.file,
        "\n".join(map(str, result.mismatches)), result.skipped) for result in report.results])
    if args.json:
        _print_json({"command": "golden verify", "directory": str(report.directory),
                     "dtype": report.dtype, "compared": report.compared,
                     "passed": status == EXIT_PASSED, "skipped": skipped,
                     "results": [jsonable({"file": r.file, "variant": r.variant,
                                           "status": r.status, "passed": r.passed,
                                           "units": r.units, "where": r.where,
                                           "skipped": r.skipped,
                                           "mismatches": [m.to_json() for m in r.mismatches]})
                                 for r in report.results]})
        return status
    console = _wide_console()
    console.print(_golden_table(report))
    for result in report.failures:
        for mismatch in result.mismatches:
            console.print(f"FAIL {result.file} ({result.variant}): {mismatch}", markup=False,
                          highlight=False)
    for result in report.skipped:
        console.print(f"skipped {result.file} ({result.variant}): {result.skipped}",
                      markup=False, highlight=False)
    not_run = f", {skipped} skipped (outside what the implementation supports)" if skipped else ""
    if failed:
        console.print(f"[bold red]{failed} of {ran} cases failed[/]{not_run}")
    elif not ran:
        console.print(f"[bold yellow]INCOMPLETE: no case was within what the implementation "
                      f"supports[/] ({skipped} skipped); write a golden set within it with "
                      f"condconv-ref golden write --supports-of {args.against}. Exit status "
                      f"{EXIT_INCOMPLETE}.", highlight=False)
    else:
        console.print(f"[green]{'all ' if ran > 1 else ''}{ran} case{'s' if ran > 1 else ''} "
                      f"passed[/]{not_run}")
    return status


def _golden_table(report: golden.Report) -> Table:
    table = Table(
        title=f"condconv-ref golden verify: {report.directory}, {report.dtype}, "
              f"{report.compared}",
        caption=BOUND_CAPTION)
    for header, justify in (("variant", "left"), ("cases", "right"), ("failed", "right"),
                            ("error/bound", "right"), ("worst at", "left"),
                            ("result", "center")):
        table.add_column(header, justify=justify, no_wrap=header in ("variant", "result"))
    for variant in dict.fromkeys(result.variant for result in report.results):
        every = [result for result in report.results if result.variant == variant]
        results = [result for result in every if not result.skipped]
        if not results:
            table.add_row(variant, "0", "0", "-", f"{len(every)} skipped",
                          f"[{_STATUS_STYLE['SKIP']}]SKIP[/]")
            continue
        failed = sum(not result.passed for result in results)
        measured = [result for result in results if not math.isnan(result.units)]
        largest = max(measured, key=lambda result: result.units, default=None)
        status = "FAIL" if failed else "PASS"
        table.add_row(variant, str(len(results)) + (
                          f" (+{len(every) - len(results)} skipped)" if len(every) > len(results)
                          else ""), str(failed),
                      _units(largest.units) if largest else "-",
                      f"{largest.file}, {largest.where}" if largest else "",
                      f"[{_STATUS_STYLE[status]}]{status}[/]")
    return table


# ---------------------------------------------------------------- check


def add_check(subcommands: argparse._SubParsersAction) -> None:
    """``condconv-ref check``: a user's implementation against the reference
    (:func:`condconv_ref.testing.check_implementation`)."""
    parser = subcommands.add_parser(
        "check", help="check your implementation of a variant against the reference",
        description="Import FILE, call FACTORY() and check what it returns against the "
                    "reference on random cases, shrinking a failure to a minimal case. FACTORY "
                    "takes no arguments and returns a condconv_ref.testing.Implementation "
                    "(forward, optional vjp, supports, jvp and hvp), a forward(case) -> y callable, or a "
                    "(forward, vjp) pair; see condconv_ref.testing.checker. Exit status 0 if it "
                    "passes, 1 if it fails.")
    parser.add_argument("target", metavar="FILE.py:FACTORY",
                        help="the file defining the factory, and the factory's name")
    parser.add_argument("--variant", required=True, choices=sorted(VARIANTS), metavar="VARIANT",
                        help=f"the variant implemented: {', '.join(LAYER_VARIANTS)} (or a raw op "
                             f"of condconv_ref.variants)")
    parser.add_argument("--examples", type=_int_at_least(1), default=100, metavar="N",
                        help="random cases before declaring a pass (default: %(default)s)")
    parser.add_argument("--dtype", choices=checker.DTYPES, default="float64",
                        help="dtype of the arrays given to the implementation; the reference is "
                             "float64 (default: %(default)s)")
    parser.add_argument("--seed", type=_int_at_least(0), default=0, metavar="S",
                        help="seed of the cases (default: %(default)s)")
    parser.add_argument("--forward-only", action="store_true",
                        help="do not check the factory's vjp, jvp or hvp")
    parser.add_argument("--no-jvp", action="store_true",
                        help="do not check the factory's jvp (forward mode)")
    parser.add_argument("--no-hvp", action="store_true",
                        help="do not check the factory's hvp (second order: double backward)")
    parser.add_argument("--save-case", metavar="FILE", type=Path,
                        help="on failure, save the minimal failing case to FILE (.npz), to "
                             "rerun with --case FILE or condconv_ref.golden.load_case")
    parser.add_argument("--case", metavar="FILE", type=Path, dest="case_file",
                        help="run only the case saved in FILE (by --save-case), in the dtype "
                             "it was saved in, instead of searching")
    _add_report_options(parser, "report")
    parser.set_defaults(handler=_check)


def _check(args: argparse.Namespace) -> int:
    implementation = checker.load_implementation(args.target)
    implementation = dataclasses.replace(
        implementation, vjp=None if args.forward_only else implementation.vjp,
        jvp=None if args.forward_only or args.no_jvp else implementation.jvp,
        hvp=None if args.forward_only or args.no_hvp else implementation.hvp)
    if args.case_file is not None:
        case = golden.load_case(args.case_file)
        if case.variant != args.variant:
            raise ValueError(f"--case {args.case_file} holds a {case.variant} case, but "
                             f"--variant is {args.variant}")
        report = checker.check_case(implementation, case, raise_on_failure=False)
    else:
        report = checker.check_implementation(implementation, variant=args.variant,
                                              dtype=args.dtype, max_examples=args.examples,
                                              seed=args.seed, raise_on_failure=False)
    saved = None
    if args.save_case is not None and report.case is not None:
        saved = golden.save_case(args.save_case, report.case, report.mismatches)
    _write_junit(args, "check", [_TestCase(
        f"condconv_ref.check.{args.variant}", args.target, "" if report.passed else str(report),
        seconds=report.seconds)])
    if args.json:
        _print_json({"command": "check", "target": args.target,
                     "saved_case": None if saved is None else str(saved), **report.to_json()})
    else:
        print(report)
        if saved is not None:
            print(f"  saved to {saved}; rerun with: condconv-ref check {args.target} "
                  f"--variant {args.variant} --case {saved}")
    return EXIT_PASSED if report.passed else EXIT_FAILED


# ---------------------------------------------------------------- gpu-check


def add_gpu_check(subcommands: argparse._SubParsersAction) -> None:
    """``condconv-ref gpu-check``: the reference on a GPU against float64 NumPy
    (:func:`condconv_ref.gpu.check`)."""
    parser = subcommands.add_parser(
        "gpu-check", help="run the reference on CuPy and report how far GPU arithmetic drifts",
        description="For every op and its VJP over N random cases, run the reference on CuPy in "
                    "each dtype and compare with the float64 NumPy reference; check that two "
                    "identical GPU runs match bit for bit, measure the error TF32 adds (in a "
                    "CUPY_TF32=1 subprocess) and, with torch and CUDA, torch's float32 conv2d. "
                    "See docs/gpu.md. Exit status 1 if any check fails, 2 without CuPy or a GPU.")
    parser.add_argument("--cases", type=_int_at_least(1), default=gpu.DEFAULT_CASES,
                        metavar="N", help="random cases per op (default: %(default)s)")
    parser.add_argument("--seed", type=_int_at_least(0), default=0, metavar="S",
                        help="seed of the cases; the same seed reruns them (default: %(default)s)")
    parser.add_argument("--dtype", action="append", dest="dtypes", choices=gpu.DTYPES,
                        help="a dtype to run in; repeat for several (default: all)")
    parser.add_argument("--variant", action="append", dest="variants", metavar="V",
                        choices=list(VARIANTS),
                        help="an op to check; repeat for several (default: every variant)")
    parser.add_argument("--no-tf32", dest="tf32", action="store_false",
                        help="skip the CUPY_TF32=1 subprocess")
    parser.add_argument("--no-determinism", dest="determinism", action="store_false",
                        help="run each computation once, without the bitwise repeat check")
    parser.add_argument("--no-torch", dest="torch", action="store_false",
                        help="skip the comparison of torch's conv2d")
    parser.add_argument("--backend", choices=BACKEND_NAMES, default="cupy",
                        help="where the reference runs; a CPU backend runs the same checks on "
                             "the CPU, to test the check itself (default: %(default)s)")
    parser.set_defaults(handler=_gpu_check)


def _gpu_check(args: argparse.Namespace) -> int:
    with _progress_bar() as bar:
        task = bar.add_task("starting", total=None)
        report = gpu.check(cases=args.cases, seed=args.seed, dtypes=args.dtypes or gpu.DTYPES,
                           tf32=args.tf32, determinism=args.determinism, torch=args.torch,
                           backend=args.backend, variants=args.variants,
                           progress=lambda description, done, total: bar.update(
                               task, description=description, completed=done, total=total))
    console = _wide_console()
    console.print(_gpu_table(report))
    for name, value in report.environment.items():
        console.print(f"{name}: {value}", markup=False, highlight=False)
    if report.tf32_extra():
        console.print(_tf32_table(report))
    _print_gpu_notes(console, report)
    return 0 if report.passed else 1


def _gpu_table(report: gpu.GPUReport) -> Table:
    device = report.environment.get("device")
    where = f"{report.backend} on {device}" if device else report.backend
    table = Table(
        title=f"condconv-ref gpu-check: {where}, {report.cases} cases, seed {report.seed}",
        caption="Against the float64 NumPy reference at the same (rounded) inputs. "
                + BOUND_CAPTION + " judged as: the precision whose bound applies (float16/"
                "float32: float32 arithmetic rounded to float16 once). repeat: a second "
                "identical run matched bit for bit (docs/gpu.md).")
    for header, justify in (("op", "left"), ("direction", "left"), ("dtype", "left"),
                            ("judged as", "left"), ("cases", "right"),
                            ("error/bound", "right"), ("worst at", "left"),
                            ("repeat", "center"), ("result", "center")):
        table.add_column(header, justify=justify, no_wrap=header in ("op", "result"))
    repeat = {None: "-", True: "same", False: "[bold red]DIFFERS[/]"}
    for row in report.rows:
        status = row.status
        table.add_row(row.op, row.kind, row.dtype, row.precision, str(row.cases),
                      _units(row.units), row.where, repeat[row.repeat_identical],
                      f"[{_STATUS_STYLE[status]}]{status}[/]")
    return table


def _tf32_table(report: gpu.GPUReport) -> Table:
    table = Table(title="extra error of TF32, in units of float32's bound",
                  caption="factor = TF32 error / float32 error on the same cases")
    for header in ("op", "direction", "float32", "TF32", "factor"):
        table.add_column(header, justify="left" if header in ("op", "direction") else "right")
    for op, direction, plain, tf32 in report.tf32_extra():
        factor = tf32 / plain if plain else math.inf if tf32 else 1.0
        table.add_row(op, direction, _units(plain), _units(tf32), _units(factor))
    return table


def _print_gpu_notes(console: Console, report: gpu.GPUReport) -> None:
    for note in report.notes:
        console.print(f"note: {note}", markup=False, highlight=False)
    for row in report.rows:
        if row.status == "SKIP":
            console.print(f"{row.op} / {row.kind} / {row.dtype} skipped: {row.skipped}",
                          markup=False, highlight=False)
        elif row.status == "FAIL":
            console.print(f"FAIL {row.op} / {row.kind} / {row.dtype} (judged as "
                          f"{row.precision}): {row.units:.3g} x the bound at {row.where}; "
                          f"{row.detail}",
                          markup=False, highlight=False)
    if report.nondeterministic:
        console.print(f"not bitwise repeatable: {', '.join(report.nondeterministic)}",
                      markup=False, highlight=False)
    for problem in report.problems:
        console.print(f"[bold red]problem:[/] {problem}", highlight=False)
    if report.passed:
        console.print(f"[green]all {len(report.rows)} rows passed[/]")
    else:
        console.print(f"[bold red]{len(report.failures)} of {len(report.rows)} rows failed, "
                      f"{len(report.problems)} problems[/]")


# ---------------------------------------------------------------- the command

SUBCOMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [add_verify, add_golden,
                                                                   add_check, add_gpu_check]
"""One ``add_<name>(subcommands)`` per subcommand, in ``--help`` order."""


def build_parser() -> argparse.ArgumentParser:
    """The ``condconv-ref`` parser with every subcommand of :data:`SUBCOMMANDS`."""
    parser = _Parser(prog="condconv-ref",
                     description="Golden reference and verification toolkit for CondConv-style "
                                 "layers.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    _add_debug(parser, default=False)
    subcommands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add in SUBCOMMANDS:
        add(subcommands)
    for leaf in _leaf_parsers(parser):
        _add_debug(leaf, default=argparse.SUPPRESS)
    return parser


def _add_debug(parser: argparse.ArgumentParser, default: Any) -> None:
    parser.add_argument("--debug", action="store_true", default=default,
                        help="print the traceback of an error in the input too")


def _leaf_parsers(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    """The parsers of the subcommands that run (``golden write``, not ``golden``)."""
    leaves = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                leaves += _leaf_parsers(child) or [child]
    return leaves


_PACKAGE = Path(__file__).resolve().parent


def _raised_on_purpose(error: BaseException) -> bool:
    """Whether ``error`` comes from a ``raise`` statement of condconv_ref itself, where every
    message names the function and the argument, rather than from inside another library."""
    frames = traceback.extract_tb(error.__traceback__)
    if not frames:
        return False
    last = frames[-1]
    inside = Path(last.filename).resolve().is_relative_to(_PACKAGE)
    return inside and linecache.getline(last.filename, last.lineno or 0).lstrip().startswith(
        "raise")


def _is_user_error(error: BaseException) -> bool:
    """Bad input (one line, exit status 2) rather than a bug in the library (a traceback)."""
    if isinstance(error, (BackendUnavailable, MemoryBudgetError, OSError)):
        return True
    return isinstance(error, USER_ERRORS) and _raised_on_purpose(error)


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``condconv-ref`` with ``argv`` (default ``sys.argv[1:]``); return the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_request:  # --help, --version, or a usage error already printed
        code = exit_request.code
        return code if isinstance(code, int) else (0 if code is None else EXIT_USAGE)
    try:
        _jax_x64(getattr(args, "backend", None))
        return args.handler(args)
    except ModuleNotFoundError as error:
        if (error.name or "").partition(".")[0] != "hypothesis":
            return _internal_error(args, error)
        message = (f"hypothesis is not available: cannot import hypothesis ({error}); this "
                   f"command draws its cases with it (pip install hypothesis)")
    except Exception as error:
        if not _is_user_error(error):
            return _internal_error(args, error)
        if args.debug:
            traceback.print_exc()
        message = " ".join(str(error).split())
    print(f"condconv-ref {args.command}: error: {message}", file=sys.stderr)
    return EXIT_USAGE


def _jax_x64(backend: Any) -> None:
    """On the jax backend, turn JAX's 64-bit mode on unless ``JAX_ENABLE_X64`` is set."""
    if backend is None or str(backend).partition(":")[0] != "jax" \
            or "JAX_ENABLE_X64" in os.environ:
        return
    get_backend("jax")  # the one-line BackendUnavailable when JAX is missing
    import jax

    jax.config.update("jax_enable_x64", True)


def _internal_error(args: argparse.Namespace, error: BaseException) -> int:
    traceback.print_exception(error)
    print(f"condconv-ref {args.command}: internal error: {type(error).__name__}: {error}\n"
          f"This is a bug in condconv_ref, not in your input; please report it with the "
          f"traceback above (exit status {EXIT_INTERNAL}).", file=sys.stderr)
    return EXIT_INTERNAL


if __name__ == "__main__":
    sys.exit(main())
