r"""Golden vectors: versioned, checksummed test-vector files that any language can read.

A golden directory holds one ``.npz`` file per case and a ``manifest.json``.
Each ``.npz`` (a zip of ``.npy`` arrays, written uncompressed like
``numpy.savez``) holds every input and parameter of one reference call under
the reference's argument names, the fixed ``cotangent``, the reference
``output`` and one ``grad_<name>`` per gradient.  The manifest records the
format version, the library version, the seed and, per case, the variant, its
options, the file name, size and sha256, and the dtype and shape of every
array.  ``docs/golden-format.md`` specifies the format for readers in other
languages.

- :func:`write` draws cases from the variant registry
  (:mod:`condconv_ref.variants`) and writes a directory; every file goes to a
  temporary name first and is renamed into place, and the manifest is written
  last, so an interrupted run never leaves a directory that looks valid.
- :func:`load` and :func:`iter_cases` read a directory back, after checking it
  (checksums, sizes, the manifest's schema and its own checksum, the dtypes
  and shapes of every array, missing and extra files).  Files are never
  unpickled: ``allow_pickle=False``, and object arrays are refused.
- :func:`verify` recomputes every case, with the reference on any backend or
  with a user's implementation (the ``forward(case)`` / ``vjp(case,
  cotangent)`` protocol of :func:`condconv_ref.testing.check_implementation`),
  and compares.

Reading and verifying need no hypothesis; only :func:`write` draws its cases
with it.

Every problem found in a directory is one line that names the file, collected
in a :class:`GoldenError`.  :data:`SHIPPED` is the small set the package ships
and the test suite recomputes on every run.

Comparison
----------
The error model of :mod:`condconv_ref.accuracy`, as in every other command:
each computed element against the stored one, within the bound of its scale,
which :func:`verify` recomputes from the stored inputs (and cotangent) with
the reference; the stored values themselves carry the set's dtype's rounding.
The figure reported is the error in units of that bound (at most 1 passes).

Examples
--------
>>> import tempfile
>>> from condconv_ref import golden
>>> directory = tempfile.mkdtemp() + "/vectors"
>>> _ = golden.write(directory, variants=["cond_linear_layer"], cases=2, seed=0)
>>> [case.variant for case in golden.iter_cases(directory)]
['cond_linear_layer', 'cond_linear_layer']
>>> golden.verify(directory).passed
True
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import os
import re
import stat
import sys
import tempfile
import zipfile
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from condconv_ref import __version__
from condconv_ref._validate import check_positive_int
from condconv_ref.backends import Backend, get_backend, to_numpy
from condconv_ref.memory import MemoryBudgetError
from condconv_ref import _scales, accuracy
from condconv_ref.accuracy import Comparison, compare, gradient_keys, precision
from condconv_ref.engine import worst
from condconv_ref.testing import Supports
from condconv_ref.testing.checker import Implementation
from condconv_ref.testing.sampling import case_seed, draw_examples
from condconv_ref.variants import (
    LAYER_VARIANTS,
    VARIANTS,
    Case,
    reference_forward,
    reference_vjp,
    unsupported,
)

__all__ = [
    "CASE_FORMAT",
    "DEFAULT_VARIANTS",
    "DTYPES",
    "FORMAT",
    "FORMAT_VERSION",
    "MANIFEST",
    "SHIPPED",
    "CaseResult",
    "GoldenCase",
    "GoldenError",
    "GoldenSet",
    "Report",
    "compare_case",
    "iter_cases",
    "load",
    "load_case",
    "save_case",
    "verify",
    "write",
]

FORMAT = "condconv-ref golden vectors"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
DTYPES = tuple(dtype for dtype in accuracy.DTYPES if dtype in ("float64", "float32"))
"""The dtypes a golden set is written in: those of the model that ``.npy`` readers in every
language hold."""
DEFAULT_VARIANTS = LAYER_VARIANTS
"""The variants :func:`write` writes when none are named: those users check."""

SHIPPED = Path(__file__).resolve().parent / "golden_data"
"""The golden set shipped in the package: 49 float64 cases of the user-facing variants and
``conv``, written by ``scripts/write_golden_data.py``."""

COTANGENT = "cotangent"
OUTPUT = "output"
GRADIENT_PREFIX = "grad_"
_FILE_NAME = re.compile(r"[0-9]{4,}-[a-z][a-z0-9_]*\.npz")
_ARRAY_NAME = re.compile(r"[a-z][a-z0-9_]*")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_TEMPORARY = re.compile(r"\..+\.tmp")
_ZIP_TIME = (1980, 1, 1, 0, 0, 0)
_MANIFEST_BYTES = 2**26  # a manifest larger than 64 MiB is refused unread
_MANIFEST_DEPTH = 16  # the format nests 5 levels deep; anything deeper is refused
_NPY_HEADER_BYTES = 10 + 2**16  # the largest .npy 1.0 header: magic, version, length, text


class GoldenError(ValueError):
    """A golden directory failed its checks; ``problems`` holds one line per problem.

    Every line starts with the file it is about (``manifest.json``, a case
    file, or the directory).

    Examples
    --------
    A case file with bytes appended after it was written:

    >>> import tempfile
    >>> from condconv_ref import golden
    >>> directory = golden.write(tempfile.mkdtemp() + "/vectors", variants=["conv"], cases=2)
    >>> with open(directory / "0001-conv.npz", "ab") as file:
    ...     _ = file.write(b"extra")
    >>> try:
    ...     golden.load(directory)
    ... except golden.GoldenError as error:
    ...     print(error.problems)  # doctest: +ELLIPSIS
    ('0001-conv.npz: more than the ... bytes manifest.json lists (appended to or replaced)',)
    """

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems = tuple(problems)
        super().__init__("\n".join(self.problems))


# ---------------------------------------------------------------- records


@dataclass(frozen=True)
class GoldenCase:
    """One case read back from a golden directory.

    Attributes
    ----------
    index : int
        Position in the manifest.
    file : str
        The ``.npz`` file name.
    case : condconv_ref.variants.Case
        The reference call: variant, input arrays (NumPy, in the set's dtype),
        options and the longest sums ``lengths``.
    cotangent, output : numpy.ndarray
        The fixed cotangent and the reference output.
    gradients : dict of str to numpy.ndarray
        The reference gradients at ``cotangent``, by argument name.
    deviations : dict of str to float
        ``float32_deviation`` of ``"output"`` and of each ``"grad_<name>"``:
        :math:`\\max|r_{32} - r_{64}|`, the reference run in float32 against
        float64 on the stored inputs; a measured rounding scale (see
        :func:`compare_case`).

    Examples
    --------
    >>> from condconv_ref import golden
    >>> first = next(golden.iter_cases(golden.SHIPPED))
    >>> first.index, first.file, first.variant
    (0, '0000-condconv.npz', 'condconv')
    >>> first.case.shapes, sorted(first.gradients)
    ({'x': (1, 1, 1), 'experts': (1, 1, 1, 1), 'routing': (1, 1)}, ['experts', 'routing', 'x'])
    >>> first.cotangent.shape == first.output.shape, sorted(first.deviations)
    (True, ['grad_experts', 'grad_routing', 'grad_x', 'output'])
    """

    index: int
    file: str
    case: Case
    cotangent: np.ndarray
    output: np.ndarray
    gradients: dict[str, np.ndarray]
    deviations: dict[str, float]

    @property
    def variant(self) -> str:
        """The variant name."""
        return self.case.variant


@dataclass(frozen=True)
class GoldenSet:
    """A checked golden directory: its manifest and every case.

    Examples
    --------
    >>> from condconv_ref import golden
    >>> shipped = golden.load(golden.SHIPPED)
    >>> shipped.dtype, len(shipped.cases), shipped.manifest["format_version"]
    ('float64', 49, 1)
    """

    directory: Path
    manifest: dict[str, Any]
    cases: tuple[GoldenCase, ...]

    @property
    def dtype(self) -> str:
        """The dtype of every array, ``"float64"`` or ``"float32"``."""
        return self.manifest["dtype"]


@dataclass(frozen=True)
class CaseResult:
    """The comparison of one case with its stored output and gradients.

    ``units`` is the largest error in units of the bound over every compared
    element (at most 1 when the case passes), ``where`` the array and element
    it was found at; ``mismatches`` everything that differs
    (:class:`condconv_ref.accuracy.Comparison`), including an exception the
    computation raised.  ``skipped`` says why a case was not handed to an
    implementation (it lies outside what the implementation supports); such a
    case neither passes nor fails.

    Examples
    --------
    >>> from condconv_ref import golden
    >>> from condconv_ref.variants import reference_forward
    >>> first = next(golden.iter_cases(golden.SHIPPED))
    >>> result = golden.compare_case(first, 1.01 * reference_forward(first.case), None)
    >>> result.file, result.passed, [mismatch.what for mismatch in result.mismatches]
    ('0000-condconv.npz', False, ['output'])
    """

    index: int
    file: str
    variant: str
    units: float = math.nan
    where: str = ""
    mismatches: tuple[Comparison, ...] = ()
    skipped: str = ""

    @property
    def passed(self) -> bool:
        """Nothing differs (also true of a skipped case: see :attr:`status`)."""
        return not self.mismatches

    @property
    def status(self) -> str:
        """``"PASS"``, ``"FAIL"`` or ``"SKIP"``."""
        return "SKIP" if self.skipped else "PASS" if self.passed else "FAIL"


@dataclass(frozen=True)
class Report:
    """What :func:`verify` found: one :class:`CaseResult` per case.

    Examples
    --------
    >>> from condconv_ref import golden
    >>> report = golden.verify(golden.SHIPPED, variants=["conv"])
    >>> report.passed, len(report.results), report.failures, report.compared
    (True, 7, (), 'reference on numpy')
    """

    directory: Path
    dtype: str
    compared: str
    results: tuple[CaseResult, ...] = ()

    @property
    def passed(self) -> bool:
        """Every case passed."""
        return all(result.passed for result in self.results)

    @property
    def failures(self) -> tuple[CaseResult, ...]:
        """The cases that failed, in order."""
        return tuple(result for result in self.results if not result.passed)

    @property
    def skipped(self) -> tuple[CaseResult, ...]:
        """The cases not handed to the implementation, outside what it supports."""
        return tuple(result for result in self.results if result.skipped)


# ---------------------------------------------------------------- options as JSON


def _to_json(value: Any) -> Any:
    """Options as JSON values: tuples become lists, the rest is kept."""
    if isinstance(value, (tuple, list)):
        return [_to_json(item) for item in value]
    if isinstance(value, dict):
        return {str(key): _to_json(item) for key, item in value.items()}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"golden.write: option value {value!r} of type {type(value).__name__} "
                    f"cannot be stored in JSON")


def _from_json(value: Any) -> Any:
    """The inverse of :func:`_to_json`: lists become tuples (padding pairs stay pairs)."""
    if isinstance(value, list):
        return tuple(_from_json(item) for item in value)
    if isinstance(value, dict):
        return {key: _from_json(item) for key, item in value.items()}
    return value


def _canonical(manifest: Mapping[str, Any]) -> bytes:
    return json.dumps(manifest, sort_keys=True, separators=(",", ":"), ensure_ascii=True,
                      allow_nan=False).encode()


def _manifest_checksum(manifest: Mapping[str, Any]) -> str:
    """sha256 of the manifest without its ``checksum``, as canonical JSON."""
    body = {key: value for key, value in manifest.items() if key != "checksum"}
    return hashlib.sha256(_canonical(body)).hexdigest()


# ---------------------------------------------------------------- writing


def _variant_stream(variant: str) -> int:
    """A stable number per variant name, so a variant's cases do not depend on the others."""
    return zlib.crc32(variant.encode())


def _draw(variants: Sequence[str], count: int, seed: int, supports: Supports,
          case_strategy: Callable[..., Any]) -> list[Case]:
    """``count`` cases of each variant, from the checker's strategy ``case_strategy``
    (:func:`condconv_ref.testing.strategies.cases`) within ``supports``."""
    drawn = []
    for variant in variants:
        drawn += draw_examples(case_strategy(variant, supports), count,
                               seed=case_seed(seed, _variant_stream(variant)))
    return drawn


def _deviation(float64: Any, float32: Any) -> float:
    """``max|r32 - r64|``: how far the reference run in float32 lands from float64."""
    difference = np.abs(to_numpy(float32).astype(np.float64) - to_numpy(float64))
    return float(np.max(difference)) if difference.size else 0.0


def _reference_arrays(case: Case, dtype: str) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """Every array of one case file, and the float32 deviation of each result.

    Inputs are rounded to ``dtype``, the cotangent is standard normal, and the
    output and gradients are computed in float64 from the rounded values; the
    deviations compare them with the reference run in float32 (see
    :func:`compare_case`)."""
    reserved = {COTANGENT, OUTPUT} & set(case.arrays)
    reserved |= {name for name in case.arrays if name.startswith(GRADIENT_PREFIX)}
    if reserved:
        raise ValueError(f"golden.write: variant {case.variant!r} has arguments named "
                         f"{sorted(reserved)}, which the format reserves")
    rounded = {name: np.asarray(a, dtype=dtype) for name, a in case.arrays.items()}
    exact = Case(case.variant, {name: a.astype(np.float64) for name, a in rounded.items()},
                 case.options, case.lengths, case.config, case.seed)
    output = to_numpy(reference_forward(exact))
    cotangent = case.cotangent(output.shape, dtype)
    gradients = reference_vjp(exact, cotangent.astype(np.float64))
    gradients32 = reference_vjp(exact, cotangent, dtype="float32")
    arrays = dict(rounded)
    arrays[COTANGENT] = cotangent
    arrays[OUTPUT] = np.asarray(output, dtype=dtype)
    deviations = {OUTPUT: _deviation(output, reference_forward(exact, dtype="float32"))}
    for name, gradient in gradients.items():
        arrays[GRADIENT_PREFIX + name] = np.asarray(to_numpy(gradient), dtype=dtype)
        deviations[GRADIENT_PREFIX + name] = _deviation(gradient, gradients32[name])
    return arrays, deviations


def _npz_bytes(arrays: Mapping[str, np.ndarray]) -> bytes:
    """An uncompressed ``.npz`` (what ``numpy.savez`` writes) with fixed timestamps, so the
    same arrays always give the same bytes and the same sha256."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_STORED) as archive:
        for name, a in arrays.items():
            member = io.BytesIO()
            np.lib.format.write_array(member, np.ascontiguousarray(a), allow_pickle=False)
            info = zipfile.ZipInfo(name + ".npy", date_time=_ZIP_TIME)
            info.external_attr = 0o644 << 16
            archive.writestr(info, member.getvalue())
    return buffer.getvalue()


def _fsync_directory(directory: Path) -> None:
    with contextlib.suppress(OSError):  # not every platform can open a directory
        descriptor = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)


def _write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to a temporary file beside ``path``, fsync it, then rename it to ``path``.

    If anything fails, the temporary file is removed and ``path`` is untouched.
    """
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.",
                                             suffix=".tmp")
    try:
        with os.fdopen(descriptor, "wb") as stream:
            os.fchmod(stream.fileno(), 0o644)
            stream.write(data)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise


def _is_golden_file(path: Path) -> bool:
    return path.is_file() and (path.name == MANIFEST or path.suffix == ".npz"
                               or _TEMPORARY.fullmatch(path.name) is not None)


def _prepare_directory(directory: Path, force: bool) -> None:
    """Create ``directory``, or empty an existing golden directory when ``force``.

    The manifest goes first, so a directory being replaced never looks valid.
    """
    if directory.exists() and not directory.is_dir():
        raise FileExistsError(f"golden.write: {directory} exists and is not a directory")
    if not directory.exists():
        directory.mkdir(parents=True)
        return
    entries = sorted(directory.iterdir())
    if not entries:
        return
    if not force:
        raise FileExistsError(f"golden.write: {directory} already exists and is not empty; "
                              f"pass force=True (--force) to replace it")
    foreign = [entry.name for entry in entries if not _is_golden_file(entry)]
    if foreign:
        raise FileExistsError(f"golden.write: refusing to replace {directory}: it holds "
                              f"entries that are not golden vectors: {', '.join(foreign[:5])}")
    (directory / MANIFEST).unlink(missing_ok=True)
    _fsync_directory(directory)
    for entry in entries:
        entry.unlink(missing_ok=True)
    _fsync_directory(directory)


def _array_records(arrays: Mapping[str, np.ndarray],
                   deviations: Mapping[str, float]) -> dict[str, Any]:
    records = {}
    for name, a in arrays.items():
        records[name] = {"dtype": a.dtype.name, "shape": list(a.shape)}
        if name in deviations:
            records[name]["float32_deviation"] = deviations[name]
    return records


def _case_record(index: int, case: Case, arrays: Mapping[str, np.ndarray],
                 deviations: Mapping[str, float], file: str, data: bytes) -> dict[str, Any]:
    gradients = [name[len(GRADIENT_PREFIX):] for name in arrays
                 if name.startswith(GRADIENT_PREFIX)]
    return {
        "index": index,
        "variant": case.variant,
        "file": file,
        "size": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
        "seed": case.seed,
        "options": _to_json(case.options),
        "lengths": list(case.lengths),
        "inputs": list(case.arrays),
        "gradients": gradients,
        "arrays": _array_records(arrays, deviations),
    }


def _check_write_arguments(variants: Sequence[str] | None, dtype: str) -> list[str]:
    chosen = list(DEFAULT_VARIANTS if variants is None else variants)
    if isinstance(variants, str) or not chosen:
        raise ValueError(f"golden.write: variants must be a non-empty list of names, "
                         f"got {variants!r}")
    unknown = [name for name in chosen if name not in VARIANTS]
    if unknown:
        raise ValueError(f"golden.write: unknown variant {unknown[0]!r}, expected one of "
                         f"{', '.join(VARIANTS)}")
    if len(set(chosen)) != len(chosen):
        raise ValueError(f"golden.write: variants must not repeat, got {chosen}")
    if dtype not in DTYPES:
        raise ValueError(f"golden.write: dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    return chosen


def write(out: str | os.PathLike[str], *, variants: Sequence[str] | None = None,
          cases: int = 1, seed: int = 0, dtype: str = "float64", force: bool = False,
          supports: Supports | None = None,
          progress: Callable[[int, int], None] | None = None) -> Path:
    """Write a golden directory: ``cases`` cases of each variant, drawn from ``seed``.

    Cases come from the checker's strategy
    :func:`condconv_ref.testing.strategies.cases` (a configuration, a seed for
    :func:`condconv_ref.variants.build_case`'s arrays, a temperature) through
    :func:`condconv_ref.testing.sampling.draw_examples`.  Inputs are rounded to
    ``dtype``; the output and gradients are computed in float64 from the
    rounded inputs and cotangent, then rounded to ``dtype``.  Each result's
    ``float32_deviation`` (the reference run in float32 against float64) goes
    to the manifest for the tolerances of :func:`compare_case`.

    Parameters
    ----------
    out : path
        The directory.  It may be missing or empty; an existing non-empty one is
        refused unless ``force`` is set, and even then only when it holds
        nothing but golden files (``manifest.json``, ``.npz``, temporary files).
    variants : sequence of str, optional
        Names from :data:`condconv_ref.variants.VARIANTS`; default
        :data:`DEFAULT_VARIANTS`.
    cases : int
        Cases per variant, >= 1.
    seed : int
        Seed of the configurations, arrays and cotangents, >= 0.
    dtype : {'float64', 'float32'}
        The dtype every stored array has.
    force : bool
        Replace an existing golden directory.
    supports : condconv_ref.testing.Supports, optional
        Limits of the drawn cases (e.g. ``Supports(max_size=16)`` for larger
        ones); default ``Supports()``, small shapes.  Recorded in the manifest.
    progress : callable, optional
        Called as ``progress(done, total)`` after every case file.

    Returns
    -------
    pathlib.Path
        The directory.

    Raises
    ------
    FileExistsError
        If ``out`` exists and may not be replaced.
    ValueError
        For an unknown variant or dtype, or a bad ``cases`` or ``seed``.
    ModuleNotFoundError
        Without hypothesis, which draws the cases (raised before ``out`` is touched).

    Examples
    --------
    >>> import pathlib, tempfile
    >>> from condconv_ref import golden
    >>> directory = golden.write(pathlib.Path(tempfile.mkdtemp()) / "vectors",
    ...                          variants=["conv"], cases=2, seed=0)
    >>> sorted(path.name for path in directory.iterdir())
    ['0000-conv.npz', '0001-conv.npz', 'manifest.json']
    >>> golden.load(directory).manifest["variants"]
    ['conv']
    """
    chosen = _check_write_arguments(variants, dtype)
    count = check_positive_int("golden.write", "cases", cases)
    seed = check_positive_int("golden.write", "seed", seed, minimum=0)
    supports = Supports() if supports is None else supports
    from condconv_ref.testing.strategies import cases  # before the directory is touched

    directory = Path(out)
    _prepare_directory(directory, force)
    drawn = _draw(chosen, count, seed, supports, cases)
    records = []
    for index, case in enumerate(drawn):
        arrays, deviations = _reference_arrays(case, dtype)
        data = _npz_bytes(arrays)
        file = f"{index:04d}-{case.variant}.npz"
        _write_atomic(directory / file, data)
        records.append(_case_record(index, case, arrays, deviations, file, data))
        if progress is not None:
            progress(index + 1, len(drawn))
    _fsync_directory(directory)
    manifest = _manifest(chosen, count, seed, dtype, supports, records)
    _write_atomic(directory / MANIFEST, _manifest_text(manifest).encode())
    _fsync_directory(directory)
    return directory


def _manifest(variants: list[str], cases: int, seed: int, dtype: str, supports: Supports,
              records: list[dict[str, Any]]) -> dict[str, Any]:
    import hypothesis

    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "library_version": __version__,
        "seed": seed,
        "dtype": dtype,
        "variants": variants,
        "cases_per_variant": cases,
        "generator": {"numpy": np.__version__, "hypothesis": hypothesis.__version__,
                      "supports": _to_json(_supports_record(supports))},
        "cases": records,
    }
    manifest["checksum"] = _manifest_checksum(manifest)
    return manifest


def _supports_record(supports: Supports) -> dict[str, Any]:
    """The fields of ``supports`` as data: ``excludes`` by its name (a function is no data)."""
    record = asdict(supports)
    excludes = record.pop("excludes")
    record["excludes"] = None if excludes is None else getattr(excludes, "__qualname__",
                                                               repr(excludes))
    return record


_FLAT_LIST = re.compile(r"\[(?:[^\[\]{}\"]|\"[^\"]*\"|\[[^\[\]{}\"]*\])*\]")
_FLAT_OBJECT = re.compile(r"\{(?:[^\[\]{}\"]|\"[^\"]*\"|\[[^\[\]{}\"]*\])*\}")


def _one_line(match: re.Match[str]) -> str:
    compact = json.dumps(json.loads(match.group()))
    return compact if len(compact) <= 100 else match.group()


def _manifest_text(manifest: Mapping[str, Any]) -> str:
    """Indented JSON with short lists and flat objects (array records, options) on one line."""
    text = _FLAT_LIST.sub(_one_line, json.dumps(manifest, indent=1, allow_nan=False))
    return _FLAT_OBJECT.sub(_one_line, text) + "\n"


# ---------------------------------------------------------------- reading and checking


def _read_manifest(directory: Path) -> dict[str, Any]:
    """The parsed manifest, checked against the schema and its checksum; raises GoldenError."""
    if not directory.exists():
        raise FileNotFoundError(f"golden: no directory {directory}")
    if not directory.is_dir():
        raise NotADirectoryError(f"golden: {directory} is not a directory")
    if not os.path.lexists(directory / MANIFEST):
        raise GoldenError([f"{MANIFEST}: missing from {directory} (not a golden directory, or "
                           f"its write was interrupted before the manifest)"])
    data = _read_regular(directory, MANIFEST, _MANIFEST_BYTES)
    if len(data) > _MANIFEST_BYTES:
        raise GoldenError([f"{MANIFEST}: larger than {_MANIFEST_BYTES // 2**20} MiB, refused"])
    try:
        manifest = json.loads(data, parse_constant=_refuse_constant)
    except RecursionError:
        raise GoldenError([f"{MANIFEST}: nested too deeply to parse (the format nests "
                           f"{_MANIFEST_DEPTH} levels at most)"]) from None
    except ValueError as error:  # invalid UTF-8 or JSON, NaN or Infinity
        raise GoldenError([f"{MANIFEST}: not valid JSON ({error})"]) from None
    if _depth(manifest) > _MANIFEST_DEPTH:
        raise GoldenError([f"{MANIFEST}: nested {_depth(manifest)} levels deep, the format "
                           f"nests {_MANIFEST_DEPTH} at most"])
    problems = _schema_problems(manifest)
    if problems:
        raise GoldenError(problems)
    if manifest["checksum"] != _manifest_checksum(manifest):
        raise GoldenError([f"{MANIFEST}: checksum does not match its contents (edited or "
                           f"corrupted after writing)"])
    return manifest


def _depth(value: Any) -> int:
    """How deeply JSON ``value`` nests lists and objects, counted without recursion."""
    deepest, level = 0, [(value, 1)]
    while level:
        item, depth = level.pop()
        if isinstance(item, (dict, list)):
            deepest = max(deepest, depth)
            level += [(child, depth + 1)
                      for child in (item.values() if isinstance(item, dict) else item)]
    return deepest


def _entry_problem(directory: Path, name: str) -> str | None:
    """Why the entry ``name`` of ``directory`` cannot be read as a golden file, or None.

    Symbolic links (wherever they point) and anything but a regular file (a
    named pipe would block a reader forever, a device never ends) are refused
    without being opened.
    """
    try:
        mode = os.lstat(directory / name).st_mode
    except FileNotFoundError:
        return f"{name}: listed in {MANIFEST} but missing"
    except OSError as error:
        return f"{name}: cannot be read ({error.strerror or error})"
    if stat.S_ISLNK(mode):
        return (f"{name}: is a symbolic link, refused unread (golden files must be regular "
                f"files in the directory)")
    if not stat.S_ISREG(mode):
        kind = ("a directory" if stat.S_ISDIR(mode) else "a named pipe" if stat.S_ISFIFO(mode)
                else "a socket" if stat.S_ISSOCK(mode) else "a device")
        return f"{name}: is {kind}, not a regular file; refused unread"
    return None


def _read_regular(directory: Path, name: str, limit: int) -> bytes:
    """At most ``limit + 1`` bytes of the regular file ``name``; raises GoldenError.

    The file is checked (:func:`_entry_problem`), then opened without following
    a link and without blocking, and checked again on the open descriptor, so
    that an entry swapped between the check and the open is refused too.
    """
    problem = _entry_problem(directory, name)
    if problem:
        raise GoldenError([problem])
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
    try:
        descriptor = os.open(directory / name, flags | getattr(os, "O_BINARY", 0))
    except OSError as error:
        raise GoldenError([f"{name}: cannot be read ({error.strerror or error})"]) from None
    with os.fdopen(descriptor, "rb") as stream:
        if not stat.S_ISREG(os.fstat(descriptor).st_mode):
            raise GoldenError([f"{name}: is not a regular file; refused unread"])
        try:
            return stream.read(limit + 1)
        except OSError as error:
            raise GoldenError([f"{name}: cannot be read ({error.strerror or error})"]) from None


def _refuse_constant(name: str) -> None:
    raise ValueError(f"{name} is not allowed")


_TOP_LEVEL = {"format": str, "format_version": int, "library_version": str, "seed": int,
              "dtype": str, "variants": list, "cases_per_variant": int, "generator": dict,
              "cases": list, "checksum": str}
_CASE_FIELDS = {"index": int, "variant": str, "file": str, "size": int, "sha256": str,
                "seed": int, "options": dict, "lengths": list, "inputs": list,
                "gradients": list, "arrays": dict}


def _field_problems(record: Any, fields: Mapping[str, type], where: str) -> list[str]:
    if not isinstance(record, dict):
        return [f"{MANIFEST}: {where} is a {type(record).__name__}, expected an object"]
    problems = []
    for name, kind in fields.items():
        if name not in record:
            problems.append(f"{MANIFEST}: {where} has no {name!r}")
        elif not isinstance(record[name], kind) or isinstance(record[name], bool) != (kind is bool):
            problems.append(f"{MANIFEST}: {where} {name!r} is {record[name]!r}, expected a "
                            f"{kind.__name__}")
    problems += [f"{MANIFEST}: {where} has an unknown field {name!r}"
                 for name in record if name not in fields]
    return problems


def _schema_problems(manifest: Any) -> list[str]:
    problems = _field_problems(manifest, _TOP_LEVEL, "the top level")
    if problems:
        return problems
    if manifest["format"] != FORMAT:
        return [f"{MANIFEST}: format is {manifest['format']!r}, expected {FORMAT!r}"]
    if manifest["format_version"] != FORMAT_VERSION:
        return [f"{MANIFEST}: format_version {manifest['format_version']} cannot be read by "
                f"condconv_ref {__version__}, which reads version {FORMAT_VERSION}"]
    if manifest["dtype"] not in DTYPES:
        return [f"{MANIFEST}: dtype is {manifest['dtype']!r}, expected one of {DTYPES}"]
    files: set[str] = set()
    for position, record in enumerate(manifest["cases"]):
        problems += _case_problems(record, position, manifest["dtype"], files)
    return problems


def _case_problems(record: Any, position: int, dtype: str, files: set[str]) -> list[str]:
    where = f"case {position}"
    problems = _field_problems(record, _CASE_FIELDS, where)
    if problems:
        return problems
    if record["index"] != position:
        problems.append(f"{MANIFEST}: {where} has index {record['index']}")
    if record["variant"] not in VARIANTS:
        problems.append(f"{MANIFEST}: {where} has unknown variant {record['variant']!r}")
    file = record["file"]
    if not _FILE_NAME.fullmatch(file):
        problems.append(f"{MANIFEST}: {where} names file {file!r}, expected "
                        f"'NNNN-<variant>.npz' with no directory")
    elif file in files:
        problems.append(f"{MANIFEST}: {where} names file {file!r} a second time")
    files.add(file)
    if not _SHA256.fullmatch(record["sha256"]):
        problems.append(f"{MANIFEST}: {where} sha256 {record['sha256']!r} is not 64 hex digits")
    if not (len(record["lengths"]) == 2 and all(_is_count(n, 1) for n in record["lengths"])):
        problems.append(f"{MANIFEST}: {where} lengths {record['lengths']!r}, expected two "
                        f"positive integers")
    return problems + _array_problems(record, where, dtype)


def _is_count(value: Any, minimum: int = 0) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def _array_problems(record: dict[str, Any], where: str, dtype: str) -> list[str]:
    inputs, gradients = record["inputs"], record["gradients"]
    names = [*inputs, *gradients]
    if not all(isinstance(name, str) and _ARRAY_NAME.fullmatch(name) for name in names):
        return [f"{MANIFEST}: {where} inputs/gradients must be lowercase names, got {names}"]
    expected = [*inputs, COTANGENT, OUTPUT, *(GRADIENT_PREFIX + name for name in gradients)]
    arrays = record["arrays"]
    if sorted(arrays) != sorted(expected):
        return [f"{MANIFEST}: {where} lists arrays {sorted(arrays)}, expected {sorted(expected)} "
                f"from its inputs and gradients"]
    problems = []
    for name, entry in arrays.items():
        result = name == OUTPUT or name.startswith(GRADIENT_PREFIX)
        fields = ["dtype", "float32_deviation", "shape"] if result else ["dtype", "shape"]
        if not (isinstance(entry, dict) and sorted(entry) == fields
                and isinstance(entry["shape"], list)
                and all(_is_count(n) for n in entry["shape"])
                and (not result or _is_deviation(entry["float32_deviation"]))):
            problems.append(f"{MANIFEST}: {where} array {name!r} is {entry!r}, expected "
                            f"{{'dtype': ..., 'shape': [non-negative ints]"
                            f"{', float32_deviation: number >= 0' if result else ''}}}")
        elif entry["dtype"] != dtype:
            problems.append(f"{MANIFEST}: {where} array {name!r} has dtype {entry['dtype']!r}, "
                            f"but the set's dtype is {dtype!r}")
    return problems


def _is_deviation(value: Any) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value) and value >= 0)


def _listing_problems(directory: Path, manifest: Mapping[str, Any]) -> list[str]:
    """Files the manifest lists that are missing, and entries it does not list."""
    listed = {record["file"] for record in manifest["cases"]}
    present = {entry.name: entry for entry in directory.iterdir()}
    problems = [problem for problem in (_entry_problem(directory, file) for file in sorted(listed))
                if problem]
    for name, entry in sorted(present.items()):
        if name in listed or name == MANIFEST:
            continue
        if _TEMPORARY.fullmatch(name):
            problems.append(f"{name}: leftover temporary file of an interrupted write, not "
                            f"listed in {MANIFEST}")
        elif entry.is_dir() and not entry.is_symlink():
            problems.append(f"{name}: unexpected directory, not listed in {MANIFEST}")
        else:
            problems.append(f"{name}: extra file, not listed in {MANIFEST}")
    return problems


def _member_problems(data: bytes, file: str, declared: Mapping[str, Any] | None) -> list[str]:
    """What is wrong with the zip members of a case file, read from its directory alone.

    Every member must be stored (not compressed), appear once, be an array the
    manifest ``declared`` and hold no more than that array's bytes and a
    ``.npy`` header: checked before any member is read, so that no archive
    inflates to more than its manifest promises.  A file with no manifest
    (``declared`` None: a saved case) needs ``.npy`` members no larger than
    the archive, which a stored member cannot exceed.
    """
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            members = archive.infolist()
    except (zipfile.BadZipFile, zipfile.LargeZipFile, ValueError, EOFError) as error:
        return [f"{file}: cannot be read as .npz ({type(error).__name__}: {error})"]
    problems, seen = [], set()
    for member in members:
        name = member.filename.removesuffix(".npy")
        if member.filename in seen:
            problems.append(f"{file}: member {member.filename!r} appears more than once")
        seen.add(member.filename)
        if member.compress_type != zipfile.ZIP_STORED:
            problems.append(f"{file}: member {member.filename!r} is compressed; golden "
                            f"members are stored, and compressed ones are refused uninflated")
        elif declared is None and not member.filename.endswith(".npy"):
            problems.append(f"{file}: member {member.filename!r} is not a .npy array")
        elif declared is None:
            if member.file_size > len(data):
                problems.append(f"{file}: member {member.filename!r} declares "
                                f"{member.file_size} bytes, more than the archive holds; "
                                f"refused unread")
        elif name not in declared or not member.filename.endswith(".npy"):
            problems.append(f"{file}: member {member.filename!r} is not an array {MANIFEST} "
                            f"lists")
        else:
            entry = declared[name]
            limit = (np.dtype(entry["dtype"]).itemsize * math.prod(entry["shape"])
                     + _NPY_HEADER_BYTES)
            if member.file_size > limit:
                problems.append(f"{file}: member {member.filename!r} declares {member.file_size} "
                                f"bytes, more than the {limit} its shape and dtype in "
                                f"{MANIFEST} allow; refused unread")
    return problems


def _read_npz(data: bytes, file: str,
              declared: Mapping[str, Any] | None) -> dict[str, np.ndarray]:
    """The arrays of one ``.npz``; raises GoldenError for anything but plain numeric arrays
    (:func:`_member_problems` says which members are read at all)."""
    if not data.startswith(b"PK\x03\x04"):  # np.load would take anything else for .npy/pickle
        raise GoldenError([f"{file}: not a zip archive (an .npz is a zip of .npy files)"])
    problems = _member_problems(data, file, declared)
    if problems:
        raise GoldenError(problems)
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as archive:
            arrays = {}
            for name in archive.files:
                value = archive[name]
                if not isinstance(value, np.ndarray):
                    raise GoldenError([f"{file}: member {name!r} is not a .npy array"])
                arrays[name] = value
            return arrays
    except GoldenError:
        raise
    except ValueError as error:
        if "Object arrays" in str(error):
            raise GoldenError([f"{file}: holds an object array, which is refused (golden "
                               f"files are never unpickled)"]) from None
        raise GoldenError([f"{file}: cannot be read as .npz ({error})"]) from None
    except Exception as error:  # malformed bytes raise many kinds (zip, zlib, EOF, struct)
        raise GoldenError([f"{file}: cannot be read as .npz ({type(error).__name__}: "
                           f"{error})"]) from None


def _content_problems(arrays: Mapping[str, np.ndarray], record: Mapping[str, Any],
                      file: str) -> list[str]:
    expected = record["arrays"]
    if sorted(arrays) != sorted(expected):
        return [f"{file}: holds arrays {sorted(arrays)}, {MANIFEST} lists {sorted(expected)}"]
    problems = []
    for name, a in arrays.items():
        want = expected[name]
        if a.dtype != np.dtype(want["dtype"]).newbyteorder("<"):
            problems.append(f"{file}: array {name!r} has dtype {a.dtype.str} ({a.dtype}), "
                            f"{MANIFEST} says little-endian {want['dtype']}")
        elif list(a.shape) != want["shape"]:
            problems.append(f"{file}: array {name!r} has shape {list(a.shape)}, {MANIFEST} says "
                            f"{want['shape']}")
        elif a.ndim > 1 and not a.flags.c_contiguous:
            problems.append(f"{file}: array {name!r} is stored in Fortran order, the format "
                            f"requires C order")
        elif not np.all(np.isfinite(a)):
            problems.append(f"{file}: array {name!r} holds NaN or infinity")
    return problems


def _read_case(directory: Path, record: Mapping[str, Any]) -> GoldenCase:
    """One case file, checked against its manifest record; raises GoldenError."""
    file = record["file"]
    data = _read_regular(directory, file, record["size"])
    if len(data) < record["size"]:
        raise GoldenError([f"{file}: truncated: {len(data)} bytes, {MANIFEST} lists "
                           f"{record['size']}"])
    if len(data) > record["size"]:
        raise GoldenError([f"{file}: more than the {record['size']} bytes {MANIFEST} lists "
                           f"(appended to or replaced)"])
    if hashlib.sha256(data).hexdigest() != record["sha256"]:
        raise GoldenError([f"{file}: sha256 does not match {MANIFEST} (contents changed after "
                           f"writing: corrupted or edited)"])
    arrays = _read_npz(data, file, record["arrays"])
    problems = _content_problems(arrays, record, file)
    if problems:
        raise GoldenError(problems)
    inputs = {name: arrays[name] for name in record["inputs"]}
    case = Case(record["variant"], inputs, _from_json(record["options"]),
                tuple(record["lengths"]), None, record["seed"])
    gradients = {name: arrays[GRADIENT_PREFIX + name] for name in record["gradients"]}
    deviations = {name: float(entry["float32_deviation"])
                  for name, entry in record["arrays"].items() if "float32_deviation" in entry}
    return GoldenCase(record["index"], file, case, arrays[COTANGENT], arrays[OUTPUT], gradients,
                      deviations)


def iter_cases(directory: str | os.PathLike[str]) -> Iterator[GoldenCase]:
    """Yield the cases of a golden directory one at a time, each checked as it is read.

    The manifest (schema, checksum) and the directory listing are checked
    before the first case; every case file is checked (size, sha256, arrays,
    dtypes, shapes) before it is yielded.

    Raises
    ------
    GoldenError
        At the first problem, naming the file.

    Examples
    --------
    >>> from condconv_ref import golden
    >>> cases = golden.iter_cases(golden.SHIPPED)
    >>> [next(cases).file for _ in range(2)]
    ['0000-condconv.npz', '0001-condconv.npz']
    """
    path = Path(directory)
    manifest = _read_manifest(path)
    problems = _listing_problems(path, manifest)
    if problems:
        raise GoldenError(problems)
    for record in manifest["cases"]:
        yield _read_case(path, record)


def load(directory: str | os.PathLike[str]) -> GoldenSet:
    """Read and check a whole golden directory.

    Every file is checked before anything is returned, and every problem is
    reported: ``GoldenError.problems`` has one line per problem, each naming
    its file.

    Raises
    ------
    GoldenError
        If the manifest, the listing or any case file has a problem.

    Examples
    --------
    >>> from collections import Counter
    >>> from condconv_ref import golden
    >>> shipped = golden.load(golden.SHIPPED)
    >>> shipped.manifest["seed"], Counter(case.variant for case in shipped.cases)["conv"]
    (0, 7)
    """
    path = Path(directory)
    manifest = _read_manifest(path)
    problems = _listing_problems(path, manifest)
    cases = []
    for record in manifest["cases"]:
        if _entry_problem(path, record["file"]):
            continue  # missing, a link or not a regular file: reported by the listing
        try:
            cases.append(_read_case(path, record))
        except GoldenError as error:
            problems += error.problems
    if problems:
        raise GoldenError(problems)
    return GoldenSet(path, manifest, tuple(cases))


# ---------------------------------------------------------------- one case in a file

CASE_FORMAT = "condconv-ref case"
_CASE_MEMBER = "case"


def save_case(path: str | os.PathLike[str], case: Case,
              mismatches: Sequence[Comparison] = ()) -> Path:
    """Write one case to an ``.npz`` file that :func:`load_case` reads back.

    The file holds the case's arrays as they are (the values handed to an
    implementation, in its dtype) and, in the member ``case``, a JSON record of
    the variant, options, longest sums, seed and dtype, and every mismatch
    found on it, whole (an exception's full message, of which a report shows
    the first line).  It is written atomically.  ``condconv-ref check --save-case FILE`` saves the minimal
    failing case this way, and ``condconv-ref check --case FILE`` reruns it.

    Examples
    --------
    >>> import pathlib, tempfile
    >>> from condconv_ref import golden
    >>> case = golden.load(golden.SHIPPED).cases[8].case
    >>> path = golden.save_case(pathlib.Path(tempfile.mkdtemp()) / "failing.npz", case)
    >>> again = golden.load_case(path)
    >>> again.describe() == case.describe(), again.dtype
    (True, 'float64')
    """
    record = {"format": CASE_FORMAT, "format_version": FORMAT_VERSION,
              "library_version": __version__, "variant": case.variant,
              "options": _to_json(case.options), "lengths": list(case.lengths),
              "seed": case.seed, "dtype": case.dtype, "arrays": list(case.arrays),
              "mismatches": [mismatch.to_json() for mismatch in mismatches]}
    arrays = {name: np.asarray(to_numpy(a)) for name, a in case.arrays.items()}
    path = Path(path)
    text = np.frombuffer(json.dumps(record).encode(), dtype=np.uint8)  # numeric, as every member
    _write_atomic(path, _npz_bytes({**arrays, _CASE_MEMBER: text}))
    return path


_CASE_FILE_LIMIT = 256 * 2**20
"""Bytes a saved case may hold: a minimal failing case is small; this keeps a wrong path
from reading a large file into memory."""


def load_case(path: str | os.PathLike[str]) -> Case:
    """Read a case written by :func:`save_case`.

    Raises
    ------
    OSError
        If the file cannot be read.
    GoldenError
        If it is not a case file of this format (the problems name the file).

    Examples
    --------
    A golden case file holds no case record, so it is refused:

    >>> from condconv_ref import golden
    >>> golden.load_case(golden.SHIPPED / "0000-condconv.npz")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    condconv_ref.golden.GoldenError: 0000-condconv.npz: not a 'condconv-ref case' file ...
    """
    path = Path(path)
    data = _read_regular(path.parent, path.name, _CASE_FILE_LIMIT)
    if len(data) > _CASE_FILE_LIMIT:
        raise GoldenError([f"{path.name}: larger than {_CASE_FILE_LIMIT} bytes, which no saved "
                           f"case is; refused"])
    arrays = _read_npz(data, path.name, None)
    try:
        record = json.loads(arrays.pop(_CASE_MEMBER).astype(np.uint8).tobytes().decode())
        if record.get("format") != CASE_FORMAT or record.get("variant") not in VARIANTS:
            raise KeyError("format")
        inputs = {name: arrays[name] for name in record["arrays"]}
        return Case(record["variant"], inputs, _from_json(record["options"]),
                    tuple(record["lengths"]), None, int(record["seed"]), str(record["dtype"]))
    except (KeyError, TypeError, ValueError, AttributeError, UnicodeDecodeError):
        raise GoldenError([f"{path.name}: not a {CASE_FORMAT!r} file written by "
                           f"golden.save_case (condconv-ref check --save-case)"]) from None


# ---------------------------------------------------------------- comparing


def _coarser(a: str, b: str) -> str:
    return a if precision(a).unit_roundoff >= precision(b).unit_roundoff else b


def _dtype_name(value: Any) -> str:
    """The dtype name of any array (``'float32'``, ``'bfloat16'``, ...), or ``''``."""
    return str(getattr(value, "dtype", "")).rsplit(".", 1)[-1]


def compare_case(golden: GoldenCase, output: Any, gradients: Mapping[str, Any] | None, *,
                 require_dtype: bool = True) -> CaseResult:
    """Compare a computed ``output`` (and ``gradients``, unless None) with a golden case.

    Every element must be within the bound of :mod:`condconv_ref.accuracy` of
    the stored value, for the coarser of the set's dtype and the computed
    one; the scale comes from the reference run on the stored inputs.  With
    ``require_dtype`` a computed array must have the stored dtype.

    Examples
    --------
    The reference recomputed in float64 passes; 1% off does not:

    >>> from condconv_ref import golden
    >>> from condconv_ref.variants import reference_forward, reference_vjp
    >>> case = golden.load(golden.SHIPPED).cases[2]
    >>> output = reference_forward(case.case)
    >>> result = golden.compare_case(case, output, reference_vjp(case.case, case.cotangent))
    >>> result.passed, result.units < 1
    (True, True)
    >>> golden.compare_case(case, 1.01 * output, None).mismatches[0].what
    'output'
    """
    stored_dtype = golden.output.dtype.name
    pairs = [("output", output, golden.output, _scales.forward_scale(golden.case, stored_dtype),
              _scales.depth(golden.case, vjp=False))]
    comparisons: list[Comparison] = []
    if gradients is not None:
        keys = gradient_keys(gradients, golden.gradients)
        comparisons += [keys] if keys else []
        if isinstance(gradients, Mapping):
            scales = _scales.vjp_scale(golden.case, golden.cotangent, stored_dtype)
            depth = _scales.depth(golden.case, vjp=True)
            pairs += [(f"gradient {name!r}", gradients[name], stored, scales[name], depth)
                      for name, stored in golden.gradients.items() if name in gradients]
    for what, actual, stored, scale, depth in pairs:
        found = _dtype_name(actual)
        if require_dtype and found != stored_dtype:
            comparisons.append(Comparison(what, reason=f"has dtype {found or type(actual)}, "
                                                       f"expected {stored_dtype}"))
            continue
        dtype = _coarser(stored_dtype, found) if found in accuracy.DTYPES else stored_dtype
        comparisons.append(compare(what, actual, stored, scale, depth=depth, dtype=dtype,
                                   reference_dtype=stored_dtype))
    largest = worst([c for c in comparisons if not c.reason])
    return CaseResult(golden.index, golden.file, golden.variant,
                      largest.units if largest else math.nan, largest.where if largest else "",
                      tuple(c for c in comparisons if not c.passed))


def _reference_result(golden: GoldenCase, backend: Backend, dtype: str) -> CaseResult:
    output = reference_forward(golden.case, backend, dtype)
    gradients = reference_vjp(golden.case, golden.cotangent, backend, dtype)
    return compare_case(golden, output, gradients)


def _implementation_result(golden: GoldenCase, implementation: Implementation) -> CaseResult:
    try:
        output = implementation.forward(golden.case)
    except MemoryBudgetError:
        raise
    except Exception as error:  # the implementation's failure is the case's failure
        return CaseResult(golden.index, golden.file, golden.variant,
                          mismatches=(Comparison.raised("forward", error),))
    gradients = None
    if implementation.vjp is not None:
        try:
            gradients = implementation.vjp(golden.case, golden.cotangent)
        except MemoryBudgetError:
            raise
        except Exception as error:
            return CaseResult(golden.index, golden.file, golden.variant,
                              mismatches=(Comparison.raised("vjp", error),))
        if not isinstance(gradients, Mapping):
            return CaseResult(golden.index, golden.file, golden.variant, mismatches=(
                Comparison("vjp", reason=f"returned a {type(gradients).__name__}, expected a "
                                         f"mapping of argument name to gradient"),))
    return compare_case(golden, output, gradients, require_dtype=False)


def verify(directory: str | os.PathLike[str], *, against: Implementation | None = None,
           backend: str | Backend = "numpy", variants: Sequence[str] | None = None,
           progress: Callable[[int, int], None] | None = None) -> Report:
    """Check a golden directory, then recompute every case and compare.

    Parameters
    ----------
    directory : path
    against : Implementation, optional
        A user's implementation to check instead of the reference: its
        ``forward(case)`` (and ``vjp(case, cotangent)`` when given) receive
        each stored case of ``variants`` (required then) with NumPy arrays in
        the set's dtype, except the cases outside ``against.supports``
        (:func:`condconv_ref.variants.unsupported`), which are skipped with
        the reason.
    backend : str or Backend
        Where the reference recomputes the cases (``numpy``, ``torch``,
        ``cupy``, ...), in the set's dtype; ignored with ``against``.
    variants : sequence of str, optional
        Recompute only the cases of these variants (every file is still
        checked); default all.  Required with ``against``: the variant the
        implementation implements.
    progress : callable, optional
        Called as ``progress(done, total)`` after every case.

    Returns
    -------
    Report
        One :class:`CaseResult` per case.  A computation that raises fails its
        case, with the exception in ``CaseResult.mismatches``.

    Raises
    ------
    GoldenError
        If the directory fails its checks (see :func:`load`); nothing is
        recomputed then.
    condconv_ref.backends.BackendUnavailable, ValueError
        If ``backend`` cannot be used, or cannot hold the set's dtype (float64
        on JAX with its 64-bit mode off, :func:`condconv_ref.backends.require_x64`).
    condconv_ref.MemoryBudgetError
        If a case needs more working memory than the budget, whether the
        reference or ``against`` raises it: the case did not run, so it
        neither passes nor fails.

    Examples
    --------
    The shipped set against the reference on array-api-strict, and against an
    implementation (here the reference again, through the checker's protocol):

    >>> from condconv_ref import golden
    >>> from condconv_ref.testing import Implementation
    >>> from condconv_ref.variants import reference_forward, reference_vjp
    >>> report = golden.verify(golden.SHIPPED, backend="array_api_strict",
    ...                        variants=["cond_linear_layer"])
    >>> report.passed, len(report.results), report.compared
    (True, 7, 'reference on array_api_strict')
    >>> mine = Implementation(reference_forward, reference_vjp)
    >>> golden.verify(golden.SHIPPED, against=mine, variants=["conv"]).compared
    'implementation, forward and VJP'

    A 2-D implementation is handed the 2-D cases only:

    >>> from condconv_ref.testing import Supports
    >>> two_d = Implementation(reference_forward, supports=Supports(spatial_dims=(2,)))
    >>> report = golden.verify(golden.SHIPPED, against=two_d, variants=["condconv_layer"])
    >>> [result.status for result in report.results]
    ['SKIP', 'PASS', 'SKIP', 'SKIP', 'SKIP', 'SKIP', 'PASS']
    >>> report.skipped[0].skipped
    'outside what it supports: 1 spatial dims, spatial_dims=(2,)'
    """
    chosen = None
    if against is None:
        chosen = get_backend(backend) if isinstance(backend, str) else backend
        if not isinstance(chosen, Backend):
            raise TypeError(f"golden.verify: backend must be a backend name or a Backend, "
                            f"got {backend!r}")
    elif not isinstance(against, Implementation):
        raise TypeError(f"golden.verify: against must be a condconv_ref.testing.Implementation, "
                        f"got {type(against).__name__}")
    if variants is not None and (isinstance(variants, str)
                                 or any(name not in VARIANTS for name in variants)):
        raise ValueError(f"golden.verify: variants must be a list of names from "
                         f"{', '.join(VARIANTS)}, got {variants!r}")
    if against is not None and not variants:
        raise ValueError("golden.verify: against needs variants, the variant(s) the "
                         "implementation implements; every other case would be handed to it")
    golden = load(directory)
    if chosen is not None:
        chosen.dtype(golden.dtype)  # on JAX, float64 needs its 64-bit mode: refused up front
    selected = [case for case in golden.cases if variants is None or case.variant in variants]
    results = []
    for done, case in enumerate(selected, start=1):
        outside = [] if against is None else unsupported(case.case, against.supports or Supports())
        if outside:
            results.append(CaseResult(case.index, case.file, case.variant,
                                      skipped="outside what it supports: " + "; ".join(outside)))
        elif against is not None:
            results.append(_implementation_result(case, against))
        else:
            try:
                results.append(_reference_result(case, chosen, golden.dtype))
            except MemoryBudgetError:  # the case is too large for the budget, not wrong: stop
                raise
            except Exception as error:  # the reference raising on a stored case fails it
                results.append(CaseResult(case.index, case.file, case.variant,
                                          mismatches=(Comparison.raised("reference", error),)))
        if progress is not None:
            progress(done, len(selected))
    if against is None:
        compared = f"reference on {chosen.name}"
    else:
        compared = "implementation, forward" + (" and VJP" if against.vjp is not None else "")
    return Report(golden.directory, golden.dtype, compared, tuple(results))


if __name__ == "__main__":
    from condconv_ref.cli import main

    sys.exit(main(["golden", *sys.argv[1:]]))
