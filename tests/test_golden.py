"""Golden vectors: write then verify, every corruption named, atomic writes, the shipped set."""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import io
import json
import os
import re
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest

from condconv_ref import golden
from condconv_ref.cli import EXIT_INCOMPLETE, main
from condconv_ref.testing import Implementation, Supports
from condconv_ref.testing.checker import load_implementation
from condconv_ref.variants import VARIANTS, reference_forward, reference_vjp, unsupported

SMALL_VARIANTS = ["condconv", "cond_linear_layer"]
SUPPORTS_2D = Supports(spatial_dims=(2,), padding_forms=("int", "per_dim"))
"""What examples/condconv_torch.py declares."""
ANSI = re.compile(r"\x1b\[[0-9;]*m")


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """A small golden set: two cases each of a conv and a linear variant."""
    directory = tmp_path_factory.mktemp("golden") / "set"
    golden.write(directory, variants=SMALL_VARIANTS, cases=2, seed=3)
    return directory


@pytest.fixture
def copied(written, tmp_path):
    """A fresh copy of ``written`` to corrupt."""
    return shutil.copytree(written, tmp_path / "set")


def _digests(directory):
    return {path.name: hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(directory.iterdir())}


def _lines(text):
    return [line for line in ANSI.sub("", text).splitlines() if line.strip()]


# ---------------------------------------------------------------- write, then verify


def test_written_set_verifies_on_every_backend(written, backend):
    report = golden.verify(written, backend=backend)
    assert report.passed, [str(m) for r in report.failures for m in r.mismatches]
    assert [r.variant for r in report.results] == ["condconv"] * 2 + ["cond_linear_layer"] * 2
    assert all(0 <= r.units <= 1 for r in report.results)
    assert report.compared == f"reference on {backend.name}"


def test_stored_output_and_gradients_are_the_reference_at_the_stored_inputs(written):
    manifest = json.loads((written / golden.MANIFEST).read_text())
    for stored, record in zip(golden.iter_cases(written), manifest["cases"], strict=True):
        assert stored.file == record["file"] and stored.variant == record["variant"]
        assert sorted(stored.case.arrays) == sorted(record["inputs"])
        np.testing.assert_array_equal(stored.output, reference_forward(stored.case))
        gradients = reference_vjp(stored.case, stored.cotangent)
        assert sorted(gradients) == sorted(stored.gradients) == sorted(record["gradients"])
        for name, gradient in gradients.items():
            np.testing.assert_array_equal(stored.gradients[name], gradient)


def test_case_files_are_plain_npz_that_numpy_reads_without_pickle(written):
    manifest = json.loads((written / golden.MANIFEST).read_text())
    for record in manifest["cases"]:
        with np.load(written / record["file"], allow_pickle=False) as data:
            assert sorted(data.files) == sorted(record["arrays"])
            for name, entry in record["arrays"].items():
                assert data[name].dtype == np.dtype("<f8")
                assert list(data[name].shape) == entry["shape"]


def test_manifest_checksum_follows_the_documented_rule(written):
    manifest = json.loads((written / golden.MANIFEST).read_text())
    body = {key: value for key, value in manifest.items() if key != "checksum"}
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    assert manifest["checksum"] == hashlib.sha256(canonical.encode()).hexdigest()
    for record in manifest["cases"]:
        data = (written / record["file"]).read_bytes()
        assert record["sha256"] == hashlib.sha256(data).hexdigest()
        assert record["size"] == len(data)


def test_same_seed_writes_identical_bytes(written, tmp_path):
    again = golden.write(tmp_path / "again", variants=SMALL_VARIANTS, cases=2, seed=3)
    assert _digests(again) == _digests(written)


def test_float32_set_stores_rounded_inputs_and_rounded_float64_results(tmp_path, backend):
    directory = golden.write(tmp_path / "f32", variants=["dynamic_conv_layer"], cases=2, seed=1,
                             dtype="float32")
    for stored in golden.iter_cases(directory):
        assert {a.dtype for a in stored.case.arrays.values()} == {np.dtype(np.float32)}
        assert stored.output.dtype == stored.cotangent.dtype == np.float32
        exact = stored.case.to(np, dtype="float64")
        expected = reference_forward(exact).astype(np.float32)
        np.testing.assert_array_equal(stored.output, expected)
        gradients = reference_vjp(exact, stored.cotangent.astype(np.float64))
        for name, gradient in gradients.items():
            np.testing.assert_array_equal(stored.gradients[name], gradient.astype(np.float32))
    report = golden.verify(directory, backend=backend)
    assert report.passed, [str(m) for r in report.failures for m in r.mismatches]


def test_write_command_then_verify_command_exit_0(tmp_path, capsys):
    directory = tmp_path / "cli"
    assert main(["golden", "write", "--variant", "condconv_layer", "--cases", "2", "--seed", "5",
                 "--dtype", "float64", "--out", str(directory)]) == 0
    assert "wrote 2 cases" in capsys.readouterr().out
    assert main(["golden", "verify", str(directory)]) == 0
    out = ANSI.sub("", capsys.readouterr().out)
    assert re.search(r"│ condconv_layer\s+│\s+2 │\s+0 │", out), out
    assert "all 2 cases passed" in out


@pytest.mark.parametrize("argv, message", [
    (["golden", "write", "--variant", "nope", "--out", "x"], "invalid choice: 'nope'"),
    (["golden", "write", "--dtype", "float16", "--out", "x"], "invalid choice: 'float16'"),
    (["golden", "write", "--cases", "0", "--out", "x"], "expected an integer >= 1"),
    (["golden", "write", "--cases", "1"], "the following arguments are required: --out"),
    (["golden", "verify", "--backend", "nope"], "unknown backend 'nope'"),
])
def test_usage_errors_are_one_line_and_exit_2(argv, message, capsys):
    assert main(argv) == 2
    (line,) = _lines(capsys.readouterr().err)
    assert message in line and "Traceback" not in line


def test_missing_directory_is_a_usage_error(tmp_path, capsys):
    assert main(["golden", "verify", str(tmp_path / "absent")]) == 2
    (line,) = _lines(capsys.readouterr().err)
    assert "no directory" in line and "absent" in line
    with pytest.raises(FileNotFoundError, match="no directory"):
        golden.load(tmp_path / "absent")


# ---------------------------------------------------------------- corruptions


def _reseal(directory, edit):
    """Edit the manifest and recompute its checksum by the documented rule, as a
    (buggy) writer in another language would."""
    path = directory / golden.MANIFEST
    manifest = json.loads(path.read_text())
    edit(manifest)
    body = {key: value for key, value in manifest.items() if key != "checksum"}
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    manifest["checksum"] = hashlib.sha256(canonical.encode()).hexdigest()
    path.write_text(json.dumps(manifest))


def _replace_case_file(directory, file, arrays):
    """Write ``arrays`` as ``file`` and reseal the manifest's size and sha256 of it."""
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    _replace_bytes(directory, file, buffer.getvalue())


def _replace_bytes(directory, file, data):
    """Write ``data`` as ``file`` and reseal the manifest's size and sha256 of it."""
    (directory / file).write_bytes(data)

    def edit(manifest):
        (record,) = [r for r in manifest["cases"] if r["file"] == file]
        record["size"], record["sha256"] = len(data), hashlib.sha256(data).hexdigest()

    _reseal(directory, edit)


def _stored_arrays(directory, file):
    with np.load(directory / file, allow_pickle=False) as data:
        return {name: data[name] for name in data.files}


def _truncate(directory):
    path = directory / "0001-condconv.npz"
    path.write_bytes(path.read_bytes()[:-100])


def _flip_bit(directory):
    path = directory / "0001-condconv.npz"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x04
    path.write_bytes(bytes(data))


def _remove_listed_file(directory):
    (directory / "0002-cond_linear_layer.npz").unlink()


def _add_extra_file(directory):
    shutil.copy(directory / "0000-condconv.npz", directory / "0009-condconv.npz")


def _unlist_a_file(directory):
    _reseal(directory, lambda manifest: manifest["cases"].pop())


def _store_float32(directory):
    arrays = _stored_arrays(directory, "0000-condconv.npz")
    arrays["x"] = arrays["x"].astype(np.float32)
    _replace_case_file(directory, "0000-condconv.npz", arrays)


def _store_big_endian(directory):
    arrays = _stored_arrays(directory, "0000-condconv.npz")
    arrays["experts"] = arrays["experts"].astype(">f8")
    _replace_case_file(directory, "0000-condconv.npz", arrays)


def _store_wrong_shape(directory):
    arrays = _stored_arrays(directory, "0000-condconv.npz")
    arrays["output"] = arrays["output"][..., :0]
    _replace_case_file(directory, "0000-condconv.npz", arrays)


def _store_extra_array(directory):
    arrays = _stored_arrays(directory, "0000-condconv.npz")
    arrays["note"] = np.zeros(1)
    _replace_case_file(directory, "0000-condconv.npz", arrays)


def _declare_float32(directory):
    def edit(manifest):
        manifest["cases"][0]["arrays"]["x"]["dtype"] = "float32"

    _reseal(directory, edit)


def _edit_options(directory):
    path = directory / golden.MANIFEST
    manifest = json.loads(path.read_text())
    manifest["cases"][0]["options"]["padding_mode"] = "reflect"
    path.write_text(json.dumps(manifest))


def _edit_checksum_of_a_file(directory):
    path = directory / golden.MANIFEST
    manifest = json.loads(path.read_text())
    digest = manifest["cases"][1]["sha256"]
    manifest["cases"][1]["sha256"] = ("0" if digest[0] != "0" else "1") + digest[1:]
    path.write_text(json.dumps(manifest))


def _escape_the_directory(directory):
    def edit(manifest):
        manifest["cases"][0]["file"] = "../0000-condconv.npz"

    _reseal(directory, edit)


def _newer_format(directory):
    _reseal(directory, lambda manifest: manifest.update(format_version=2))


def _break_json(directory):
    path = directory / golden.MANIFEST
    path.write_text(path.read_text()[:-40])


def _remove_manifest(directory):
    (directory / golden.MANIFEST).unlink()


def _leave_temporary_file(directory):
    (directory / ".0004-condconv.npz.k3j2h1.tmp").write_bytes(b"PK")


def _not_npz(directory):
    path = directory / "0003-cond_linear_layer.npz"
    data = b"this is not a zip archive"
    path.write_bytes(data)

    def edit(manifest):
        record = manifest["cases"][3]
        record["size"], record["sha256"] = len(data), hashlib.sha256(data).hexdigest()

    _reseal(directory, edit)


def _dangle_a_symlink(directory):
    path = directory / "0002-cond_linear_layer.npz"
    path.unlink()
    path.symlink_to(directory / "absent.npz")


def _link_inside(directory):
    """A listed file replaced by a link to another listed file of the directory."""
    path = directory / "0001-condconv.npz"
    path.unlink()
    path.symlink_to("0000-condconv.npz")


def _link_outside(directory):
    path = directory / "0001-condconv.npz"
    outside = directory.parent / "outside.npz"
    path.rename(outside)
    path.symlink_to(outside)


def _link_the_manifest(directory):
    path = directory / golden.MANIFEST
    outside = directory.parent / "manifest-elsewhere.json"
    path.rename(outside)
    path.symlink_to(outside)


def _named_pipe(directory):
    """Reading a named pipe with no writer blocks forever; it must be refused unopened."""
    path = directory / "0003-cond_linear_layer.npz"
    path.unlink()
    os.mkfifo(path)


def _rezip(directory, file, write):
    """Rewrite ``file``'s members through ``write(archive, name, npy_bytes)`` and reseal."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, a in _stored_arrays(directory, file).items():
            member = io.BytesIO()
            np.lib.format.write_array(member, a)
            write(archive, name, member.getvalue())
    _replace_bytes(directory, file, buffer.getvalue())


def _compress_a_member(directory):
    _rezip(directory, "0000-condconv.npz", lambda archive, name, data: archive.writestr(
        name + ".npy", data, compress_type=zipfile.ZIP_DEFLATED if name == "x" else None))


def _duplicate_a_member(directory):
    def write(archive, name, data):
        archive.writestr(name + ".npy", data)
        if name == "output":
            with pytest.warns(UserWarning, match="Duplicate name"):
                archive.writestr(name + ".npy", data)

    _rezip(directory, "0000-condconv.npz", write)


def _oversize_a_member(directory):
    """A member holding more than its declared shape: refused before it is read."""
    def write(archive, name, data):
        if name == "x":
            member = io.BytesIO()
            np.lib.format.write_array(member, np.zeros(10**5))
            data = member.getvalue()
        archive.writestr(name + ".npy", data)

    _rezip(directory, "0000-condconv.npz", write)


def _nest_the_manifest(directory):
    (directory / golden.MANIFEST).write_text("[" * 100_000 + "]" * 100_000)


def _nest_the_options(directory):
    def edit(manifest):
        nested = 0
        for _ in range(500):
            nested = [nested]
        manifest["cases"][0]["options"]["padding"] = nested

    _reseal(directory, edit)


CORRUPTIONS = {
    "truncated file": (_truncate, ["0001-condconv.npz: truncated"]),
    "bit-flipped file": (_flip_bit, ["0001-condconv.npz: sha256 does not match"]),
    "listed file missing": (_remove_listed_file,
                            ["0002-cond_linear_layer.npz: listed in manifest.json but missing"]),
    "extra file": (_add_extra_file, ["0009-condconv.npz: extra file, not listed"]),
    "file missing from the manifest": (_unlist_a_file,
                                       ["0003-cond_linear_layer.npz: extra file, not listed"]),
    "wrong dtype": (_store_float32, ["0000-condconv.npz: array 'x' has dtype <f4"]),
    "big-endian dtype": (_store_big_endian, ["0000-condconv.npz: array 'experts' has dtype >f8"]),
    "wrong shape": (_store_wrong_shape, ["0000-condconv.npz: array 'output' has shape"]),
    "extra array": (_store_extra_array, ["0000-condconv.npz: member 'note.npy' is not an array "
                                         "manifest.json lists"]),
    "not an npz": (_not_npz, ["0003-cond_linear_layer.npz: not a zip archive"]),
    "dtype declared wrong": (_declare_float32, ["manifest.json: case 0 array 'x' has dtype "
                                                "'float32', but the set's dtype is 'float64'"]),
    "tampered manifest": (_edit_options, ["manifest.json: checksum does not match"]),
    "tampered file checksum": (_edit_checksum_of_a_file, ["manifest.json: checksum does not "
                                                          "match"]),
    "path outside the directory": (_escape_the_directory,
                                   ["manifest.json: case 0 names file '../0000-condconv.npz'"]),
    "newer format": (_newer_format, ["manifest.json: format_version 2 cannot be read"]),
    "manifest not JSON": (_break_json, ["manifest.json: not valid JSON"]),
    "manifest missing": (_remove_manifest, ["manifest.json: missing from", "interrupted"]),
    "leftover temporary file": (_leave_temporary_file,
                                [".0004-condconv.npz.k3j2h1.tmp: leftover temporary file"]),
    "dangling symlink": (_dangle_a_symlink,
                         ["0002-cond_linear_layer.npz: is a symbolic link, refused unread"]),
    "symlink inside the directory": (_link_inside,
                                     ["0001-condconv.npz: is a symbolic link, refused unread"]),
    "symlink outside the directory": (_link_outside,
                                      ["0001-condconv.npz: is a symbolic link, refused unread"]),
    "manifest a symlink": (_link_the_manifest, ["manifest.json: is a symbolic link"]),
    "named pipe": (_named_pipe, ["0003-cond_linear_layer.npz: is a named pipe, not a regular "
                                 "file; refused unread"]),
    "compressed member": (_compress_a_member, ["0000-condconv.npz: member 'x.npy' is "
                                               "compressed", "refused uninflated"]),
    "duplicated member": (_duplicate_a_member, ["0000-condconv.npz: member 'output.npy' "
                                                "appears more than once"]),
    "member larger than declared": (_oversize_a_member, ["0000-condconv.npz: member 'x.npy' "
                                                         "declares", "refused unread"]),
    "manifest nested 100,000 deep": (_nest_the_manifest, ["manifest.json: nested too deeply"]),
    "options nested 500 deep": (_nest_the_options, ["manifest.json: nested 504 levels deep"]),
}


@pytest.mark.parametrize("corrupt, expected", CORRUPTIONS.values(), ids=CORRUPTIONS.keys())
def test_every_corruption_is_one_named_problem(copied, corrupt, expected, capsys):
    corrupt(copied)
    with pytest.raises(golden.GoldenError) as caught:
        golden.load(copied)
    (problem,) = caught.value.problems
    assert all(part in problem for part in expected), problem
    with pytest.raises(golden.GoldenError):
        golden.verify(copied)
    with pytest.raises(golden.GoldenError):
        list(golden.iter_cases(copied))

    assert main(["golden", "verify", str(copied)]) == 1
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    lines = _lines(captured.err)
    assert lines[0] == f"condconv-ref golden verify: {problem}"
    assert "failed its integrity check (1 problem)" in lines[1] and len(lines) == 2


def test_object_arrays_are_refused_and_never_unpickled(copied, tmp_path):
    marker = tmp_path / "unpickled"

    class Opens:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    path = copied / "0000-condconv.npz"
    arrays = _stored_arrays(copied, path.name)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, a in arrays.items():
            member = io.BytesIO()
            value = np.array([Opens()], dtype=object) if name == "x" else a
            np.lib.format.write_array(member, value, allow_pickle=True)
            archive.writestr(name + ".npy", member.getvalue())
    data = buffer.getvalue()
    path.write_bytes(data)

    def edit(manifest):
        manifest["cases"][0]["size"] = len(data)
        manifest["cases"][0]["sha256"] = hashlib.sha256(data).hexdigest()

    _reseal(copied, edit)
    with pytest.raises(golden.GoldenError, match="0000-condconv.npz: holds an object array"):
        golden.load(copied)
    assert not marker.exists()


def test_every_problem_of_a_directory_is_reported(copied):
    _truncate(copied)
    _add_extra_file(copied)
    _remove_listed_file(copied)
    with pytest.raises(golden.GoldenError) as caught:
        golden.load(copied)
    files = sorted(problem.split(":")[0] for problem in caught.value.problems)
    assert files == ["0001-condconv.npz", "0002-cond_linear_layer.npz", "0009-condconv.npz"]


def test_iter_cases_yields_good_cases_until_the_corrupted_one(copied):
    _flip_bit(copied)
    cases = golden.iter_cases(copied)
    assert next(cases).file == "0000-condconv.npz"
    with pytest.raises(golden.GoldenError, match="0001-condconv.npz: sha256"):
        next(cases)


# ---------------------------------------------------------------- interrupted writes


def _failing_replace(monkeypatch, fail_on):
    """Make the ``fail_on``-th ``os.replace`` raise, as a crash or a full disk would."""
    real_replace, calls = os.replace, []

    def replace(source, target):
        calls.append(target)
        if len(calls) == fail_on or (fail_on == "manifest" and
                                     os.fspath(target).endswith(golden.MANIFEST)):
            raise OSError(28, "No space left on device")
        real_replace(source, target)

    monkeypatch.setattr(os, "replace", replace)


def _assert_not_valid(directory, capsys):
    with pytest.raises(golden.GoldenError, match="manifest.json: missing .*interrupted"):
        golden.load(directory)
    assert main(["golden", "verify", str(directory)]) == 1
    assert "manifest.json: missing" in capsys.readouterr().err


def test_crash_between_case_files_leaves_no_valid_directory(tmp_path, monkeypatch, capsys):
    _failing_replace(monkeypatch, fail_on=2)
    with pytest.raises(OSError, match="No space left"):
        golden.write(tmp_path / "set", variants=SMALL_VARIANTS, cases=2, seed=3)
    monkeypatch.undo()
    assert sorted(p.name for p in (tmp_path / "set").iterdir()) == ["0000-condconv.npz"]
    _assert_not_valid(tmp_path / "set", capsys)


def test_crash_inside_a_file_leaves_nothing_under_its_name(tmp_path, monkeypatch, capsys):
    def fsync(descriptor):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(OSError, match="Input/output error"):
        golden.write(tmp_path / "set", variants=SMALL_VARIANTS, cases=2, seed=3)
    monkeypatch.undo()
    assert list((tmp_path / "set").iterdir()) == []
    _assert_not_valid(tmp_path / "set", capsys)


def test_crash_while_writing_the_manifest_leaves_no_valid_directory(tmp_path, monkeypatch,
                                                                     capsys):
    _failing_replace(monkeypatch, fail_on="manifest")
    with pytest.raises(OSError):
        golden.write(tmp_path / "set", variants=SMALL_VARIANTS, cases=2, seed=3)
    monkeypatch.undo()
    assert len(list((tmp_path / "set").glob("*.npz"))) == 4
    _assert_not_valid(tmp_path / "set", capsys)


def test_killed_writer_leaves_only_temporary_files_that_never_look_valid(tmp_path, monkeypatch,
                                                                          capsys):
    _failing_replace(monkeypatch, fail_on=3)
    monkeypatch.setattr(os, "unlink", lambda path: None)  # killed: no cleanup runs
    with pytest.raises(OSError):
        golden.write(tmp_path / "set", variants=SMALL_VARIANTS, cases=2, seed=3)
    monkeypatch.undo()
    names = sorted(p.name for p in (tmp_path / "set").iterdir())
    assert names[0].startswith(".0002-cond_linear_layer.npz.") and names[0].endswith(".tmp")
    assert names[1:] == ["0000-condconv.npz", "0001-condconv.npz"]
    _assert_not_valid(tmp_path / "set", capsys)
    golden.write(tmp_path / "set", variants=SMALL_VARIANTS, cases=2, seed=3, force=True)
    assert golden.verify(tmp_path / "set").passed


def test_crash_while_replacing_a_set_leaves_it_invalid_not_mixed(copied, monkeypatch, capsys):
    _failing_replace(monkeypatch, fail_on=2)
    with pytest.raises(OSError):
        golden.write(copied, variants=SMALL_VARIANTS, cases=2, seed=4, force=True)
    monkeypatch.undo()
    _assert_not_valid(copied, capsys)


# ---------------------------------------------------------------- overwrite protection


def test_existing_directory_is_not_touched_without_force(copied, capsys):
    before = _digests(copied)
    with pytest.raises(FileExistsError, match="already exists and is not empty.*--force"):
        golden.write(copied, variants=SMALL_VARIANTS, cases=1, seed=9)
    assert main(["golden", "write", "--cases", "1", "--out", str(copied)]) == 2
    (line,) = _lines(capsys.readouterr().err)
    assert "already exists" in line and "--force" in line
    assert _digests(copied) == before


def test_force_replaces_a_golden_directory(copied):
    golden.write(copied, variants=["conv"], cases=1, seed=9, force=True)
    loaded = golden.load(copied)
    assert [case.variant for case in loaded.cases] == ["conv"]
    assert sorted(p.name for p in copied.iterdir()) == ["0000-conv.npz", golden.MANIFEST]


def test_force_refuses_a_directory_with_other_files(copied):
    (copied / "notes.txt").write_text("mine")
    before = _digests(copied)
    with pytest.raises(FileExistsError, match="not golden vectors: notes.txt"):
        golden.write(copied, variants=["conv"], cases=1, seed=9, force=True)
    assert _digests(copied) == before


def test_empty_existing_directory_is_written(tmp_path):
    (tmp_path / "empty").mkdir()
    golden.write(tmp_path / "empty", variants=["conv"], cases=1, seed=0)
    assert golden.verify(tmp_path / "empty").passed


# ---------------------------------------------------------------- the shipped set


def test_shipped_set_agrees_with_the_reference_within_the_bound(backend):
    report = golden.verify(golden.SHIPPED, backend=backend)
    assert report.passed, [f"{r.file}: {m}" for r in report.failures for m in r.mismatches]
    assert len(report.results) == 49
    assert all(0 <= r.units <= 1 for r in report.results)


def _padding_form(padding):
    if isinstance(padding, str):
        return padding
    if isinstance(padding, int):
        return "int"
    return "pairs" if isinstance(padding[0], tuple) else "per_dim"


def test_shipped_set_covers_every_variant_and_option():
    loaded = golden.load(golden.SHIPPED)
    assert loaded.dtype == "float64"
    assert {case.variant for case in loaded.cases} == {
        "condconv", "condconv_layer", "depthwise_condconv_layer", "cond_linear_layer",
        "dynamic_conv_layer", "conv", "odconv_layer"}
    odconv = [case.case for case in loaded.cases if case.variant == "odconv_layer"]
    assert {case.options["batch_norm"] for case in odconv} == {"eval", "train"}
    assert any(f"{head}_weight" not in case.arrays for case in odconv
               for head in ("channel", "filter", "spatial", "kernel"))
    conv_cases = [case.case for case in loaded.cases if "padding" in case.case.options]
    seen = set()
    for case in conv_cases:
        options = case.options
        seen |= {("form", _padding_form(options["padding"])), ("mode", options["padding_mode"]),
                 ("dims", len(options["stride"])), ("stride > 1", max(options["stride"]) > 1),
                 ("dilation > 1", max(options["dilation"]) > 1),
                 ("groups > 1", options.get("groups", 1) > 1),
                 ("multiplier > 1", options.get("depth_multiplier", 1) > 1)}
    seen |= {("bias", "bias" in case.case.arrays) for case in loaded.cases}
    wanted = ({("form", form) for form in ("int", "per_dim", "pairs", "valid", "same")}
              | {("mode", mode) for mode in ("zeros", "reflect", "replicate", "circular")}
              | {("dims", n) for n in (1, 2, 3)} | {("bias", False), ("bias", True)}
              | {(name, True) for name in ("stride > 1", "dilation > 1", "groups > 1",
                                           "multiplier > 1")})
    assert wanted <= seen, sorted(wanted - seen)
    pairs = [case.options["padding"] for case in conv_cases
             if _padding_form(case.options["padding"]) == "pairs"]
    assert all(isinstance(pair, tuple) and len(pair) == 2 for padding in pairs
               for pair in padding)


def test_shipped_set_is_small():
    assert sum(p.stat().st_size for p in golden.SHIPPED.iterdir()) < 1_000_000


def test_verify_command_defaults_to_the_shipped_set(capsys):
    assert main(["golden", "verify", "--variant", "conv"]) == 0
    out = ANSI.sub("", capsys.readouterr().out)
    assert "all 7 cases passed" in out


# ---------------------------------------------------------------- --against


TORCH_LINEAR_LAYER = '''
import torch


def _layer(x, experts, route_weight, bias=None, route_bias=None, routing=torch.sigmoid):
    logits = x @ route_weight.T
    if route_bias is not None:
        logits = logits + route_bias
    weights = routing(logits)
    y = torch.einsum("be,eof,bf->bo", weights, experts, x)
    return y if bias is None else y + weights @ bias


class Layer:
    def __init__(self, routing):
        self.routing = routing

    def _tensors(self, case):
        return {name: torch.tensor(a, dtype=torch.float64, requires_grad=True)
                for name, a in case.arrays.items()}

    def forward(self, case):
        return _layer(routing=self.routing, **self._tensors(case)).detach().numpy()

    def vjp(self, case, cotangent):
        tensors = self._tensors(case)
        y = _layer(routing=self.routing, **tensors)
        y.backward(torch.as_tensor(cotangent, dtype=torch.float64))
        return {name: t.grad.numpy() for name, t in tensors.items()}


def correct():
    layer = Layer(torch.sigmoid)
    return layer.forward, layer.vjp


def softmax_routing():
    layer = Layer(lambda logits: torch.softmax(logits, dim=1))
    return layer.forward, layer.vjp


def raising():
    def forward(case):
        raise RuntimeError("not implemented yet")
    return forward
'''


@pytest.fixture
def implementation_file(tmp_path):
    pytest.importorskip("torch")
    path = tmp_path / "torch_linear.py"
    path.write_text(TORCH_LINEAR_LAYER)
    return path


def test_against_passes_an_independent_torch_implementation(written, implementation_file,
                                                              capsys):
    against = load_implementation(f"{implementation_file}:correct")
    report = golden.verify(written, against=against, variants=["cond_linear_layer"])
    assert report.passed and len(report.results) == 2
    assert report.compared == "implementation, forward and VJP"
    assert main(["golden", "verify", str(written), "--against",
                 f"{implementation_file}:correct", "--variant", "cond_linear_layer"]) == 0
    assert "all 2 cases passed" in ANSI.sub("", capsys.readouterr().out)


def test_against_fails_a_broken_implementation_naming_file_and_array(written,
                                                                      implementation_file,
                                                                      capsys):
    spec = f"{implementation_file}:softmax_routing"
    report = golden.verify(written, against=load_implementation(spec),
                           variants=["cond_linear_layer"])
    assert len(report.failures) == 2
    assert report.failures[0].mismatches[0].what == "output"
    assert main(["golden", "verify", str(written), "--against", spec,
                 "--variant", "cond_linear_layer"]) == 1
    out = ANSI.sub("", capsys.readouterr().out)
    assert "FAIL 0002-cond_linear_layer.npz (cond_linear_layer): output differs" in out
    assert "FAIL 0003-cond_linear_layer.npz (cond_linear_layer): gradient 'x' differs" in out
    assert "2 of 2 cases failed" in out


def test_against_an_implementation_that_raises_fails_its_cases(written, implementation_file):
    spec = f"{implementation_file}:raising"
    report = golden.verify(written, against=load_implementation(spec), variants=SMALL_VARIANTS)
    assert len(report.failures) == 4
    assert all("raised RuntimeError: not implemented yet" in str(r.mismatches[0])
               for r in report.failures)


@pytest.mark.parametrize("spec, message", [
    ("missing.py:correct", "no such file 'missing.py'"),
    ("{file}", "expected path/to/file.py:factory"),
    ("{file}:absent", "has no callable 'absent'"),
])
def test_against_bad_spec_is_one_line_exit_2(written, implementation_file, spec, message,
                                             capsys):
    argv = ["golden", "verify", str(written), "--against", spec.format(file=implementation_file),
            "--variant", "cond_linear_layer"]
    assert main(argv) == 2
    (line,) = _lines(capsys.readouterr().err)
    assert message in line


EXAMPLE_LAYER = f"{Path(__file__).resolve().parents[1] / 'examples' / 'condconv_torch.py'}:factory"


def test_against_hands_a_layer_only_the_cases_it_supports(capsys):
    pytest.importorskip("torch")
    argv = ["golden", "verify", "--against", EXAMPLE_LAYER, "--variant", "condconv_layer"]
    assert main(argv) == 0
    out = ANSI.sub("", capsys.readouterr().out)
    shipped = [case for case in golden.load(golden.SHIPPED).cases
               if case.variant == "condconv_layer"]
    supported = [case for case in shipped if not unsupported(case.case, SUPPORTS_2D)]
    assert 0 < len(supported) < len(shipped)
    passed = f"all {len(supported)} cases" if len(supported) > 1 else f"{len(supported)} case"
    assert f"{passed} passed, {len(shipped) - len(supported)} skipped" in out
    assert "skipped 0007-condconv_layer.npz (condconv_layer): outside what it supports: " \
           "1 spatial dims, spatial_dims=(2,)" in out
    assert "too many values to unpack" not in out


def test_against_without_variant_is_one_line_exit_2(capsys):
    assert main(["golden", "verify", "--against", EXAMPLE_LAYER]) == 2
    (line,) = _lines(capsys.readouterr().err)
    assert "--against needs --variant V" in line
    with pytest.raises(ValueError, match="golden.verify: against needs variants"):
        golden.verify(golden.SHIPPED, against=Implementation(reference_forward))  # no torch


def test_against_with_no_supported_case_is_incomplete_not_passed(written, capsys):
    pytest.importorskip("torch")
    assert main(["golden", "verify", str(written), "--against", EXAMPLE_LAYER,
                 "--variant", "condconv"]) == EXIT_INCOMPLETE
    assert "INCOMPLETE: no case was within what the implementation supports" in ANSI.sub(
        "", capsys.readouterr().out)


def test_write_draws_within_supports_given_on_the_command_line(tmp_path, capsys):
    pytest.importorskip("torch")
    directory = tmp_path / "mine"
    assert main(["golden", "write", "--out", str(directory), "--variant", "condconv_layer",
                 "--cases", "3", "--supports-of", EXAMPLE_LAYER,
                 "--supports", "padding_modes=zeros,reflect", "--supports", "max_size=5"]) == 0
    cases = [case.case for case in golden.load(directory).cases]
    wanted = dataclasses.replace(SUPPORTS_2D, padding_modes=("zeros", "reflect"), max_size=5)
    assert len(cases) == 3 and all(not unsupported(case, wanted) for case in cases)
    assert golden.load(directory).manifest["generator"]["supports"]["max_size"] == 5
    capsys.readouterr()
    assert main(["golden", "verify", str(directory), "--against", EXAMPLE_LAYER,
                 "--variant", "condconv_layer"]) == 0
    assert "all 3 cases passed" in ANSI.sub("", capsys.readouterr().out)


@pytest.mark.parametrize("limit, message", [
    ("spatial_dims", "expected FIELD=VALUE"), ("max_sizes=3", "expected FIELD=VALUE"),
    ("max_size=big", "max_size: cannot read 'big' as an integer"),
    ("bias=maybe", "bias: cannot read 'maybe'")])
def test_write_bad_supports_option_is_one_line_exit_2(tmp_path, limit, message, capsys):
    assert main(["golden", "write", "--out", str(tmp_path / "x"), "--supports", limit]) == 2
    (line,) = _lines(capsys.readouterr().err)
    assert message in line and "--supports" in line


def test_unavailable_backend_is_one_line_exit_2(written, capsys):
    if importlib.util.find_spec("cupy") is not None:
        pytest.skip("cupy is installed here")
    assert main(["golden", "verify", str(written), "--backend", "cupy"]) == 2
    (line,) = _lines(capsys.readouterr().err)
    assert "backend 'cupy' is not available" in line


def test_every_registered_variant_can_be_written(tmp_path):
    directory = golden.write(tmp_path / "all", variants=list(VARIANTS), cases=1, seed=2)
    assert golden.verify(directory).passed


def test_a_saved_case_is_read_as_safely_as_a_golden_file(tmp_path):
    """load_case refuses what golden loading refuses: a link, and a compressed member (which
    could inflate to any size); the saved file itself reads back."""
    case = golden.load(golden.SHIPPED).cases[0].case
    saved = golden.save_case(tmp_path / "case.npz", case)
    assert golden.load_case(saved).describe() == case.describe()
    link = tmp_path / "link.npz"
    link.symlink_to(saved)
    with pytest.raises(golden.GoldenError, match="link"):
        golden.load_case(link)
    compressed = tmp_path / "compressed.npz"
    with zipfile.ZipFile(saved) as source, zipfile.ZipFile(compressed, "w",
                                                           zipfile.ZIP_DEFLATED) as target:
        for member in source.infolist():
            target.writestr(member.filename, source.read(member.filename))
    with pytest.raises(golden.GoldenError, match="compressed"):
        golden.load_case(compressed)
