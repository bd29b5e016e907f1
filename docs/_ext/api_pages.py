"""Generate the API reference source from the package's ``__all__`` lists.

Nothing here is a hand list of names: the pages are rebuilt from ``__all__`` on
every build, so a name added to the package appears in the reference without
touching the docs.

* ``condconv_ref`` and ``condconv_ref.testing`` get one section each, listing
  every name of their ``__all__`` (dunder names such as ``__version__`` aside).
* Every other public module of the package (no leading underscore in any part
  of its dotted name) that has an ``__all__`` gets a section for the names that
  the two namespaces above do not already document.  A module whose names are
  all re-exported (``condconv_ref.conv``, ...) gets no section of its own.

``api_sources()`` returns the generated reStructuredText without writing it,
for ``tests/test_docs.py``; ``write_api_pages`` (called by ``docs/conf.py``)
writes them into ``api/modules/``, rewriting a page only when its text changed
so that incremental builds stay incremental.
"""

from __future__ import annotations

import importlib
import pkgutil
from pathlib import Path
from types import ModuleType

PACKAGE = "condconv_ref"
NAMESPACES = ("condconv_ref", "condconv_ref.testing")
OUTPUT = Path("api") / "modules"
STUBS = "../generated"


def _is_public(modname: str) -> bool:
    return not any(part.startswith("_") for part in modname.split("."))


def public_modules() -> list[str]:
    """Every public module of the package, the two namespaces first, then sorted."""
    package = importlib.import_module(PACKAGE)
    found = {
        info.name
        for info in pkgutil.walk_packages(package.__path__, prefix=PACKAGE + ".")
        if _is_public(info.name)
    }
    rest = sorted(found - set(NAMESPACES))
    return list(NAMESPACES) + rest


def public_names(module: ModuleType) -> list[str]:
    """The documented names of ``module``: its ``__all__`` without dunder names."""
    names = getattr(module, "__all__", None)
    if names is None:
        return []
    return [name for name in names if not (name.startswith("__") and name.endswith("__"))]


def _owners(modules: dict[str, ModuleType]) -> dict[int, str]:
    """Where each function, class or module is documented: ``id(obj) -> module name``.

    The two namespaces come first; otherwise the module that defines the object
    (``obj.__module__``), when it lists it; otherwise the first module listing it.
    """
    owners: dict[int, str] = {}
    for modname in NAMESPACES:
        for name in public_names(modules[modname]):
            owners.setdefault(id(getattr(modules[modname], name)), modname)
    for modname, module in modules.items():
        for name in public_names(module):
            obj = getattr(module, name)
            home = getattr(obj, "__module__", None)
            if id(obj) in owners:
                continue
            if home in modules and name in public_names(modules[home]):
                owners[id(obj)] = home
            else:
                owners[id(obj)] = modname
    return owners


def _shareable(obj: object) -> bool:
    # Plain constants (strings, tuples, numbers) may be equal objects by
    # accident; only functions, classes and modules are deduplicated.
    return callable(obj) or isinstance(obj, ModuleType)


def sections() -> list[tuple[str, list[str], list[str]]]:
    """``(module, names documented here, names re-exported from elsewhere)`` per module.

    A function or class is documented once (see :func:`_owners`); every other
    module that lists it points there.
    """
    modules = {modname: importlib.import_module(modname) for modname in public_modules()}
    owners = _owners(modules)
    result = []
    for modname, module in modules.items():
        own, reexported = [], []
        for name in public_names(module):
            obj = getattr(module, name)
            owner = owners.get(id(obj), modname) if _shareable(obj) else modname
            if owner == modname:
                own.append(name)
            else:
                reexported.append(f"{owner}.{name}")
        result.append((modname, own, reexported))
    return result


def stub_names() -> set[str]:
    """Fully qualified names that get an autosummary stub page."""
    return {f"{modname}.{name}" for modname, own, _ in sections() for name in own}


def _title(text: str, underline: str = "=") -> str:
    return f"{text}\n{underline * len(text)}\n"


def _shadowed(modname: str) -> bool:
    """True when ``parent.name`` is something other than the module, e.g. the function
    ``condconv_ref.conv`` re-exported over the module ``condconv_ref.conv``.

    Both would claim the same object name, so the module is then documented
    without an index entry.
    """
    parent, _, name = modname.rpartition(".")
    if not parent:
        return False
    return getattr(importlib.import_module(parent), name, None) is not importlib.import_module(
        modname)


def _page(modname: str, own: list[str], reexported: list[str]) -> str:
    lines = [
        ".. This page is generated by docs/_ext/api_pages.py from __all__; do not edit.",
        "",
        _title(f"``{modname}``"),
        f".. automodule:: {modname}",
        "   :no-members:",
        *(["   :no-index:"] if _shadowed(modname) else []),
        "",
        f".. currentmodule:: {modname}",
        "",
    ]
    if own:
        lines += [".. autosummary::", f"   :toctree: {STUBS}", ""]
        lines += [f"   {name}" for name in own]
        lines.append("")
    if reexported:
        lines += ["Also available here, documented where they are listed first:", ""]
        lines += [f"- :obj:`~{target}` (``{target}``)" for target in reexported]
        lines.append("")
    return "\n".join(lines)


def api_sources() -> dict[str, str]:
    """Relative path (under the docs source dir) -> generated text, one page per module.

    Modules with no names of their own and nothing re-exported (no ``__all__``)
    get no page; modules whose every name is re-exported get a short page that
    points to where each name is documented.
    """
    pages = {}
    for modname, own, reexported in sections():
        if own or reexported:
            pages[str(OUTPUT / f"{modname}.rst")] = _page(modname, own, reexported)
    return pages


def write_api_pages(srcdir: Path) -> list[Path]:
    """Write :func:`api_sources` under ``srcdir``; drop stale pages; return the written paths."""
    pages = api_sources()
    out = Path(srcdir) / OUTPUT
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for relative, text in pages.items():
        path = Path(srcdir) / relative
        if not path.exists() or path.read_text() != text:
            path.write_text(text)
            written.append(path)
    keep = {Path(srcdir) / relative for relative in pages}
    for path in out.glob("*.rst"):
        if path not in keep:
            path.unlink()
    stubs = Path(srcdir) / OUTPUT.parent / "generated"
    current = stub_names()
    for path in stubs.glob("*.rst"):
        if path.stem not in current:
            path.unlink()
    return written
