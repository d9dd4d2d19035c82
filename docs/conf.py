"""Sphinx configuration of the sparsevae documentation.

Build with ``python -m sphinx -W -b html docs docs/_build/html`` (warnings are errors). The build
needs no network: notebooks are not executed (they are stored with their outputs), and the
intersphinx links to other packages are made only when their inventories can be reached
(``SPARSEVAE_DOCS_OFFLINE=1`` turns them off).
"""

from __future__ import annotations

import re
import sys
import warnings
from datetime import date
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
# Build from the source tree even when the package is not installed.
sys.path.insert(0, str(ROOT / "src"))

import sparsevae  # noqa: E402

# sphinx-autodoc-typehints calls an API that Sphinx 9 deprecates: noise, not a problem of ours.
warnings.filterwarnings("ignore", message=r".*set_application.* is deprecated")

# -- Project -------------------------------------------------------------------------------------
project = "sparsevae"
author = "sparsevae developers"
copyright = f"{date.today().year}, {author}"
version = release = sparsevae.__version__

# -- General -------------------------------------------------------------------------------------
extensions = [
    "myst_nb",  # Markdown (MyST) pages and notebooks; includes myst_parser
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
    "sphinx_autodoc_typehints",  # after napoleon
    "sphinxarg.ext",  # the command line interface page
    "sphinx.ext.intersphinx",
]
templates_path = ["_templates"]
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store", "**.ipynb_checkpoints"]
source_suffix = {".rst": "restructuredtext", ".md": "myst-nb", ".ipynb": "myst-nb"}
master_doc = "index"
default_role = "literal"
nitpicky = False  # references that do not resolve stay plain text (e.g. offline builds)


# -- Links to other packages' documentation --------------------------------------------------------
def _online(host: str = "docs.scvi-tools.org", timeout: float = 3.0) -> bool:
    """Whether the inventories can be fetched (offline builds skip intersphinx, with no warning)."""
    import os
    import socket

    if os.environ.get("SPARSEVAE_DOCS_OFFLINE", "0") == "1":
        return False
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
    except OSError:
        return False
    return True


intersphinx_mapping = (
    {
        "python": ("https://docs.python.org/3", None),
        "anndata": ("https://anndata.readthedocs.io/en/stable/", None),
        "scanpy": ("https://scanpy.readthedocs.io/en/stable/", None),
        "scvi": ("https://docs.scvi-tools.org/en/stable/", None),
        "numpy": ("https://numpy.org/doc/stable/", None),
        "pandas": ("https://pandas.pydata.org/docs/", None),
        "matplotlib": ("https://matplotlib.org/stable/", None),
        "torch": ("https://docs.pytorch.org/docs/stable/", None),
        "lightning": ("https://lightning.ai/docs/pytorch/stable/", None),
        "gseapy": ("https://gseapy.readthedocs.io/en/latest/", None),
    }
    if _online()
    else {}
)
intersphinx_timeout = 10
pygments_style = "default"


# -- Tutorials -----------------------------------------------------------------------------------
# The notebooks live in ../tutorials (where users find them and the tests run them); the docs
# render a copy of their stored outputs (docs/tutorials/ is generated, not tracked).
def _copy_tutorials() -> None:
    import shutil

    dst = HERE / "tutorials"
    dst.mkdir(exist_ok=True)
    for old in dst.glob("*.ipynb"):
        old.unlink()
    for nb in sorted((ROOT / "tutorials").glob("*.ipynb")):
        shutil.copy2(nb, dst / nb.name)


_copy_tutorials()

# -- MyST / myst-nb ------------------------------------------------------------------------------
myst_enable_extensions = ["amsmath", "colon_fence", "deflist", "dollarmath", "html_image"]
myst_heading_anchors = 3
nb_execution_mode = "off"  # tutorials are stored with their outputs; the docs never run them
nb_merge_streams = True


# -- API reference -------------------------------------------------------------------------------
def _package_members() -> dict[str, dict[str, list[str]]]:
    """For each public class: members defined by sparsevae itself, and members to leave out.

    The class templates list a class's own members first and the ones inherited from other
    packages (scvi-tools, torch) apart; dataclass fields are left out (the class docstring's
    ``Attributes`` section describes them).
    """
    import importlib
    import inspect

    table: dict[str, dict[str, list[str]]] = {}
    for mod_name in [
        "sparsevae",
        "sparsevae.tl",
        "sparsevae.pl",
        "sparsevae.datasets",
        "sparsevae.module",
        "sparsevae.nn",
        "sparsevae.priors",
        "sparsevae.train",
    ]:
        mod = importlib.import_module(mod_name)
        for obj_name in getattr(mod, "__all__", []):
            cls = getattr(mod, obj_name, None)
            if not inspect.isclass(cls):
                continue
            fields = set(getattr(cls, "__dataclass_fields__", {}))
            own = []
            for member in dir(cls):
                for klass in cls.__mro__:
                    if member in vars(klass):
                        if klass.__module__.split(".")[0] == "sparsevae":
                            own.append(member)
                        break
            table[f"{mod_name}.{obj_name}"] = {
                "own": sorted(set(own) - fields),
                "skip": sorted(fields),
            }
    return table


autosummary_generate = True
autosummary_context = {"package_members": _package_members()}
autodoc_member_order = "bysource"
autodoc_default_options = {"members": False}
autoclass_content = "class"
napoleon_google_docstring = False
napoleon_numpy_docstring = True
napoleon_include_init_with_doc = False
napoleon_use_rtype = True
napoleon_use_param = True
napoleon_use_ivar = True  # attributes as fields, so autosummary's attribute entries don't clash
typehints_defaults = "comma"

# -- HTML ----------------------------------------------------------------------------------------
html_theme = "sphinx_book_theme"
html_title = "sparsevae"
html_static_path = ["_static"]
html_show_sourcelink = False
html_theme_options = {"navigation_with_keys": False, "show_toc_level": 2}


# -- Hooks ---------------------------------------------------------------------------------------
def _drop_missing_toctree_entries(app, docname: str, source: list[str]) -> None:
    """Leave pages that are generated elsewhere out of the index's toctree until they exist.

    ``benchmarks.md`` is written by ``benchmarks/make_report.py``; without it the entry would be
    a dangling toctree reference, which is an error under ``-W``.
    """
    if docname != "index":
        return
    optional = ["benchmarks"]
    text = source[0]
    for name in optional:
        if not any((HERE / f"{name}{suffix}").exists() for suffix in (".md", ".ipynb", ".rst")):
            text = re.sub(rf"(?m)^{re.escape(name)}\s*$\n?", "", text)
    source[0] = text


_SECTION = re.compile(r"^\s*-{3,}\s*$")


def _prose_returns(app, what, name, obj, options, lines: list[str]) -> None:
    """Let numpydoc ``Returns`` sections be prose, as in scanpy.

    The docstrings describe what is returned in sentences, on unindented lines under the
    ``Returns`` heading (the type is in the annotation). napoleon would read every such line as a
    separate ``type``; this indents the prose under an empty field so that it renders as one
    description (and sphinx-autodoc-typehints adds the return type from the annotation).
    Sections in ``name : type`` form are left alone. Runs before napoleon.
    """
    i = 0
    while i < len(lines) - 1:
        if lines[i].strip() == "Returns" and _SECTION.match(lines[i + 1]):
            start = i + 2
            end = start
            while end < len(lines):
                if end + 1 < len(lines) and lines[end].strip() and _SECTION.match(lines[end + 1]):
                    break
                end += 1
            body = lines[start:end]
            while body and not body[-1].strip():
                body.pop()
            first = next((line for line in body if line.strip()), "")
            named = re.match(r"^\s*[\w*]+\s+:\s", first) is not None
            if body and not named and not first.startswith(" "):
                new = [":"] + [("    " + line) if line.strip() else "" for line in body] + [""]
                lines[start:end] = new
                end = start + len(new)
            i = end
        else:
            i += 1


def setup(app):
    """Connect the hooks."""
    app.connect("source-read", _drop_missing_toctree_entries)
    app.connect("autodoc-process-docstring", _prose_returns, priority=100)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
