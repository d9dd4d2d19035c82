"""The documentation builds with warnings as errors, and documents every public object.

The build needs the ``docs`` extra (``pip install -e ".[docs]"``); without it the build tests
are skipped. The docstring checks need only the package.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import sparsevae

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
DOC_TOOLS = {
    "sphinx": "sphinx",
    "myst_nb": "myst-nb",
    "sphinx_book_theme": "sphinx-book-theme",
    "sphinx_autodoc_typehints": "sphinx-autodoc-typehints",
    "sphinxarg": "sphinx-argparse",
}
PUBLIC_MODULES = ["tl", "pl", "datasets"]


def _missing_doc_tools() -> list[str]:
    return [pkg for mod, pkg in DOC_TOOLS.items() if importlib.util.find_spec(mod) is None]


# ---------------------------------------------------------------------------- public objects
def _defined_in_package(cls: type, name: str) -> bool:
    for klass in cls.__mro__:
        if name in vars(klass):
            return klass.__module__.split(".")[0] == "sparsevae"
    return False


def _class_members(cls: type, qualname: str) -> list[tuple[str, object, str]]:
    """Public members that sparsevae itself defines on ``cls`` (not inherited from scvi-tools)."""
    fields = set(getattr(cls, "__dataclass_fields__", {}))
    out = []
    for name in sorted(dir(cls)):
        if name.startswith("_") or name in fields or not _defined_in_package(cls, name):
            continue
        raw = inspect.getattr_static(cls, name)
        kind = "property" if isinstance(raw, property) else "method"
        if kind == "method" and not callable(getattr(cls, name)):
            continue  # a constant, not part of the callable API
        out.append((f"{qualname}.{name}", getattr(cls, name), kind))
    return out


def public_objects() -> list[tuple[str, object, str]]:
    """``(qualified name, object, kind)`` of every public object the API reference must show."""
    objects: list[tuple[str, object, str]] = [("sparsevae.SparseVAE", sparsevae.SparseVAE, "class")]
    objects += _class_members(sparsevae.SparseVAE, "sparsevae.SparseVAE")
    for mod_name in PUBLIC_MODULES:
        mod = importlib.import_module(f"sparsevae.{mod_name}")
        for name in mod.__all__:
            obj = getattr(mod, name)
            qualname = f"sparsevae.{mod_name}.{name}"
            if inspect.isclass(obj):
                objects.append((qualname, obj, "class"))
                objects += _class_members(obj, qualname)
            else:
                objects.append((qualname, obj, "function"))
    return objects


def _has_section(doc: str, title: str) -> bool:
    return re.search(rf"^{title}\n-{{3,}}\s*$", doc, flags=re.MULTILINE) is not None


def _takes_arguments(obj: object) -> bool:
    try:
        params = inspect.signature(obj).parameters
    except (TypeError, ValueError):  # pragma: no cover - builtins
        return False
    return any(name not in ("self", "cls") for name in params)


def _docstring_problems(qualname: str, obj: object, kind: str) -> list[str]:
    doc = inspect.getdoc(obj.fget if isinstance(obj, property) else obj) or ""
    if not doc.strip():
        return [f"{qualname}: no docstring"]
    problems = []
    if kind == "class":
        if not (_has_section(doc, "Parameters") or _has_section(doc, "Attributes")):
            problems.append(f"{qualname}: no 'Parameters' (or 'Attributes') section")
    elif kind != "property":
        if _takes_arguments(obj) and not _has_section(doc, "Parameters"):
            problems.append(f"{qualname}: no 'Parameters' section")
        if not _has_section(doc, "Returns"):
            problems.append(f"{qualname}: no 'Returns' section")
    return problems


def test_public_objects_have_parameters_and_returns_sections():
    objects = public_objects()
    assert len(objects) > 20
    problems = [p for name, obj, kind in objects for p in _docstring_problems(name, obj, kind)]
    assert not problems, "Docstrings to complete:\n" + "\n".join(problems)


# ---------------------------------------------------------------------------- the build
@pytest.fixture(scope="module")
def built_docs(tmp_path_factory):
    missing = _missing_doc_tools()
    if missing:
        pytest.skip(
            f"docs tools not installed ({', '.join(missing)}): pip install -e '.[docs]' to build "
            "the documentation in the tests"
        )
    out = tmp_path_factory.mktemp("docs")
    html = out / "html"
    # Offline (CI has no internet): no intersphinx inventories to fetch.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg", "SPARSEVAE_DOCS_OFFLINE": "1"}
    cmd = [
        sys.executable, "-m", "sphinx",
        "-W", "--keep-going",  # warnings are errors; report all of them
        "-b", "html",
        "-d", str(out / "doctrees"),  # fresh environment: a full build every time
        "-q",
        str(DOCS), str(html),
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, cwd=ROOT)
    return proc, html


@pytest.mark.slow
def test_docs_build_without_warnings(built_docs):
    proc, html = built_docs
    assert proc.returncode == 0, f"sphinx -W failed:\n{proc.stdout[-5000:]}\n{proc.stderr[-5000:]}"
    assert "WARNING" not in proc.stderr, proc.stderr[-5000:]
    for page in ["index", "installation", "quickstart", "api", "cli", "changelog"]:
        assert (html / f"{page}.html").is_file(), page
    for page in ["model", "prior", "interpretation", "choosing", "multistudy"]:
        assert (html / "user_guide" / f"{page}.html").is_file(), page
    assert (html / "_static" / "sparsevae_overview.png").is_file()
    # The CLI page is generated from the argument parser.
    cli = (html / "cli.html").read_text(encoding="utf-8")
    assert "--n-factors" in cli and "demo" in cli and "fit" in cli


@pytest.mark.slow
def test_every_public_object_is_in_the_api_reference(built_docs):
    proc, html = built_docs
    assert proc.returncode == 0
    ids: set[str] = set()
    for page in (html / "generated").glob("*.html"):
        ids.update(re.findall(r'id="(sparsevae\.[\w.]+)"', page.read_text(encoding="utf-8")))
    missing = [qualname for qualname, _, _ in public_objects() if qualname not in ids]
    assert not missing, "Not in the API reference (add them to docs/api.md):\n" + "\n".join(missing)


def test_optional_benchmarks_page_follows_the_file(built_docs):
    proc, html = built_docs
    assert proc.returncode == 0
    index = (html / "index.html").read_text(encoding="utf-8")
    if (DOCS / "benchmarks.md").exists():
        assert (html / "benchmarks.html").is_file()
        assert 'href="benchmarks.html"' in index
    else:
        assert 'href="benchmarks.html"' not in index
