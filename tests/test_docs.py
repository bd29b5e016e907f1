"""The documentation in docs/ stays in step with the code, without a Sphinx build.

Cheap checks that run in the ordinary test suite: every public name reaches the
generated API reference, every VJP has a derivation page, the code the pages
include still exists, and the pages' examples, the how-to scripts and the
figure scripts still run.  Checks that need an optional tool (numpydoc,
matplotlib, torch, a C++ compiler) skip without it.  None of these tests
handles arrays of the library's backends, so none takes the ``backend``
fixture: the pages' examples are NumPy examples.
"""

from __future__ import annotations

import ast
import doctest
import importlib
import importlib.util
import inspect
import re
import runpy
import shutil
import subprocess
import warnings
from pathlib import Path

import pytest

from condconv_ref import golden

DOCS = Path(__file__).resolve().parents[1] / "docs"
NAMESPACES = ("condconv_ref", "condconv_ref.testing")
EXAMPLE_MODULES = NAMESPACES + ("condconv_ref.golden", "condconv_ref.verify",
                                "condconv_ref.variants", "condconv_ref.backends",
                                "condconv_ref.layouts", "condconv_ref.gpu")
"""Modules whose every public function and class needs an Examples section."""
# Public functions and classes of EXAMPLE_MODULES whose docstrings have no
# Examples section yet; every other one must have one.  Remove a name once its
# docstring gains an example.
KNOWN_WITHOUT_EXAMPLES: set[str] = set()


def _api_pages():
    spec = importlib.util.spec_from_file_location("api_pages", DOCS / "_ext" / "api_pages.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


API_PAGES = _api_pages()


def _autosummary_entries(text: str) -> list[str]:
    """The names listed under every ``.. autosummary::`` directive of ``text``."""
    names, inside = [], False
    for line in text.splitlines():
        if line.startswith(".. autosummary::"):
            inside = True
        elif inside and line.startswith("   ") and not line.strip().startswith(":"):
            names.append(line.strip())
        elif inside and line.strip() and not line.startswith("   "):
            inside = False
    return names


def _documented() -> dict[str, str]:
    """Fully qualified name -> the generated page that documents it with a stub."""
    documented = {}
    for relative, text in API_PAGES.api_sources().items():
        modname = Path(relative).stem
        for name in _autosummary_entries(text):
            documented[f"{modname}.{name}"] = relative
    return documented


def _public_names(modname: str) -> list[str]:
    module = importlib.import_module(modname)
    return [name for name in getattr(module, "__all__", [])
            if not (name.startswith("__") and name.endswith("__"))]


def test_every_public_name_of_the_namespaces_has_an_api_page():
    documented = _documented()
    missing = [f"{modname}.{name}" for modname in NAMESPACES for name in _public_names(modname)
               if f"{modname}.{name}" not in documented]
    assert not missing, f"public names missing from the generated API reference: {missing}"


def test_every_public_module_name_is_documented_or_points_to_its_page():
    documented = _documented()
    pages = API_PAGES.api_sources()
    for modname in API_PAGES.public_modules():
        names = _public_names(modname)
        if not names:
            continue
        page = pages[str(API_PAGES.OUTPUT / f"{modname}.rst")]
        for name in names:
            if f"{modname}.{name}" in documented:
                continue
            pointers = re.findall(r":obj:`~([\w.]+)`", page)
            targets = [target for target in pointers if target.rsplit(".", 1)[-1] == name]
            assert targets and all(target in documented for target in targets), (
                f"{modname}.{name} is neither documented on {modname}'s page nor points to a "
                f"page that documents it")


def test_public_functions_and_classes_have_examples():
    without = []
    for modname in EXAMPLE_MODULES:
        module = importlib.import_module(modname)
        for name in _public_names(modname):
            obj = getattr(module, name)
            if not (inspect.isfunction(obj) or inspect.isclass(obj)):
                continue
            if not re.search(r"^Examples\n-{8}", inspect.getdoc(obj) or "", re.MULTILINE):
                without.append(f"{modname}.{name}")
    unexpected = sorted(set(without) - KNOWN_WITHOUT_EXAMPLES)
    assert not unexpected, f"public names without an Examples section: {unexpected}"


def test_every_vjp_has_a_derivation_page():
    pages = {path.stem: path.read_text() for path in (DOCS / "derivations").glob("*.rst")}
    index = pages.pop("index")
    for name in _public_names("condconv_ref"):
        if not name.endswith("_vjp"):
            continue
        op = name.removesuffix("_vjp")
        pages_naming = [stem for stem, text in pages.items()
                        if f":func:`condconv_ref.{name}`" in text
                        and f":func:`condconv_ref.{op}`" in text]
        assert pages_naming, f"no derivation page in docs/derivations names {op} and {name}"
        assert all(f"\n   {stem}\n" in index for stem in pages_naming), (
            f"derivation page(s) {pages_naming} missing from docs/derivations/index.rst")


def test_every_jvp_has_a_derivation_page():
    pages = {path.stem: path.read_text() for path in (DOCS / "derivations").glob("*.rst")}
    index = pages.pop("index")
    for name in _public_names("condconv_ref"):
        if name.endswith("_jvp"):
            pages_naming = [stem for stem, text in pages.items()
                            if f":func:`condconv_ref.{name}`" in text]
            assert pages_naming, f"no derivation page in docs/derivations names {name}"
            assert all(f"\n   {stem}\n" in index for stem in pages_naming), (
                f"derivation page(s) {pages_naming} missing from docs/derivations/index.rst")


def _included_objects() -> list[tuple[Path, str, Path]]:
    """(page, object name, source file) for every ``literalinclude`` with ``:pyobject:``."""
    found = []
    for page in DOCS.rglob("*.rst"):
        if "_build" in page.parts:
            continue
        text = page.read_text()
        pattern = r"\.\. literalinclude:: (\S+)\n((?:   :.*\n)*)"
        for path, options in re.findall(pattern, text):
            match = re.search(r":pyobject: (\S+)", options)
            if match:
                found.append((page, match.group(1), (page.parent / path).resolve()))
    return found


def test_code_included_by_the_derivations_still_exists():
    included = _included_objects()
    assert len(included) >= 10
    for page, name, source in included:
        assert source.is_file(), f"{page.name} includes {source}, which does not exist"
        tree = ast.parse(source.read_text())
        defined = {node.name for node in ast.walk(tree)
                   if isinstance(node, (ast.FunctionDef, ast.ClassDef))}
        assert name in defined, f"{page.name} includes {name} from {source.name}, which is gone"


def _pages_with_examples() -> list[Path]:
    return sorted(page for page in DOCS.rglob("*.rst")
                  if "_build" not in page.parts and ">>> " in page.read_text())


@pytest.mark.parametrize("page", _pages_with_examples(), ids=lambda p: str(p.relative_to(DOCS)))
def test_docs_page_examples_run(page):
    flags = doctest.ELLIPSIS | doctest.IGNORE_EXCEPTION_DETAIL | doctest.DONT_ACCEPT_TRUE_FOR_1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = doctest.testfile(str(page), module_relative=False, optionflags=flags,
                                  raise_on_error=False, verbose=False, report=True)
    assert result.attempted > 0
    assert result.failed == 0, f"{result.failed} example(s) of {page.relative_to(DOCS)} failed"


def test_numpydoc_parses_every_documented_docstring():
    docscrape = pytest.importorskip("numpydoc.docscrape")
    for modname, own, _ in API_PAGES.sections():
        module = importlib.import_module(modname)
        for name in own:
            obj = getattr(module, name)
            if not (inspect.isfunction(obj) or inspect.isclass(obj)):
                continue
            with warnings.catch_warnings():
                warnings.simplefilter("error")
                docscrape.get_doc_object(obj)


@pytest.mark.parametrize("script", ["fd_step_error.py", "bench_chart.py", "routing.py",
                                    "grouped_batch_trick.py"])
def test_figure_scripts_draw(script, monkeypatch):
    pytest.importorskip("matplotlib")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    monkeypatch.chdir(DOCS / "_scripts")
    try:
        runpy.run_path(str(DOCS / "_scripts" / script))
        assert plt.get_fignums(), f"{script} drew no figure"
        axes = plt.gcf().get_axes()
        assert axes and all(ax.has_data() for ax in axes), f"{script} left an empty panel"
    finally:
        plt.close("all")


def _comparable(report_text: str) -> str:
    """A report's structure: what failed, on which case, where; not the digits.

    Timings, traceback paths, example counts and floating-point values change
    with the machine and with how the cases' arrays are drawn; the verdicts,
    the minimal case's shapes and options, the failing outputs and the worst
    indices do not.
    """
    text = re.sub(r" \(at [^)]*\)", "", report_text)
    text = re.sub(r"after \d+ examples in \d+\.\d s", "after <n> examples in <t> s", text)
    return re.sub(r"-?\d+\.\d*(?:e[-+]?\d+)?|\d+e[-+]?\d+", "<x>", text).strip()


def test_torch_how_to_output_is_what_its_script_prints():
    pytest.importorskip("torch")
    script = runpy.run_path(str(DOCS / "howto" / "check_torch_layer.py"))
    committed = (DOCS / "howto" / "check_torch_layer.out.txt").read_text()
    fresh = script["reports"]()
    assert _comparable(fresh) == _comparable(committed), (
        "docs/howto/check_torch_layer.out.txt is stale; refresh it with "
        "`python docs/howto/check_torch_layer.py --write`")
    assert "FAILED" in committed and "PASSED" in committed


def test_cpp_golden_reader_reproduces_the_shipped_vectors(tmp_path):
    compiler = shutil.which("g++") or shutil.which("c++")
    if compiler is None:
        pytest.skip("no C++ compiler")
    program = tmp_path / "golden_cond_linear"
    subprocess.run([compiler, "-std=c++17", "-O1", "-o", str(program),
                    str(DOCS / "howto" / "golden_cond_linear.cpp")], check=True)
    files = sorted(str(path) for path in Path(golden.SHIPPED).glob("*-cond_linear_layer.npz"))
    assert files, "the shipped golden set has no cond_linear_layer case"
    run = subprocess.run([str(program), *files], capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.count("PASS ") == len(files)

