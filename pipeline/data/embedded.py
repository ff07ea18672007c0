"""The embedded corpus: English prose that every CPython install ships, so no run needs a network.

Three kinds of documents, in this order:
- `topic:<title>`: the language-reference topics of `pydoc_data.topics` (what `help("assert")`
  prints), one document each;
- `module:<path>`: the docstrings of one standard-library module (module, classes, functions,
  in source order), read from the installed sources with `ast` (nothing is imported); a
  docstring seen in an earlier module is left out;
- `file:<path>`: the plain-text documents of the stdlib folder (license, notes, news files).

Exact duplicates are dropped here; near-duplicates (a topic repeated inside a larger one) are
the splitter's job (pipeline.data.overlap), as for every source. Parsing the stdlib takes
seconds, so `embedded_dataset` builds the `datasets.Dataset` once per machine and Python
version, in the Hugging Face datasets cache.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import os
import sys
import sysconfig
from collections.abc import Iterator
from pathlib import Path

SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}
TEXT_FILES = (  # prose files of the stdlib folder; a distribution may leave some out
    "LICENSE.txt",
    "email/architecture.rst",
    "idlelib/README.txt",
    "idlelib/NEWS.txt",
    "idlelib/NEWS2x.txt",
    "idlelib/HISTORY.txt",
    "idlelib/CREDITS.txt",
    "idlelib/TODO.txt",
    "idlelib/extend.txt",
)
FORMAT = 1  # bump when the documents this module yields change for the same Python


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _module_files(root: Path) -> list[Path]:
    files = []
    for folder, dirs, names in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in SKIP_DIRS)
        files += [Path(folder, n) for n in sorted(names) if n.endswith(".py")]
    return files


def identity() -> dict[str, object]:
    """What the corpus is made of, without parsing it: the Python version, the names and sizes
    of the stdlib sources and text files (a patched file changes its size), this module's format."""
    return dict(_identity())


# Once per process: listing the stdlib walks ~2k files (tens of ms), and a sweep worker asks for
# every trial, three times (the sweeper's check, the run's validation, the token cache key).
@functools.cache
def _identity() -> dict[str, object]:
    root = stdlib_dir()
    files = [p for p in _module_files(root) + [root / f for f in TEXT_FILES] if p.is_file()]
    listing = "\n".join(f"{p.relative_to(root)} {p.stat().st_size}" for p in files)
    return {
        "python": sys.version,
        "format": FORMAT,
        "files": hashlib.sha256(listing.encode()).hexdigest(),
    }


def _docstrings(source: bytes) -> list[str]:
    """Module, class and function docstrings in source order (cleaned as `inspect.cleandoc` does)."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):  # a file for another Python version (lib2to3 fixtures)
        return []
    out: list[str] = []

    def visit(node: ast.AST) -> None:
        doc = ast.get_docstring(node)
        if doc:
            out.append(doc)
        for child in node.body:
            if isinstance(child, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                visit(child)

    visit(tree)
    return out


def documents() -> Iterator[dict[str, str]]:
    """Every document as {"title", "text"}, deterministic for one Python install."""
    from pydoc_data.topics import topics

    seen: set[str] = set()
    for title in sorted(topics):
        if topics[title] not in seen:
            seen.add(topics[title])
            yield {"title": f"topic:{title}", "text": topics[title]}
    root = stdlib_dir()
    for path in _module_files(root):
        docs = [d for d in _docstrings(path.read_bytes()) if d not in seen]
        seen.update(docs)
        if docs:
            yield {"title": f"module:{path.relative_to(root)}", "text": "\n\n".join(docs)}
    for name in TEXT_FILES:
        path = root / name
        if path.is_file():
            yield {"title": f"file:{name}", "text": path.read_text(encoding="utf-8", errors="replace")}


def _generate(identity: dict[str, object]) -> Iterator[dict[str, str]]:
    # `identity` is unused here but hashed by `datasets` into the cache fingerprint.
    yield from documents()


def embedded_dataset():
    """The corpus as a `datasets.Dataset` (columns title, text), cached by `datasets` per identity."""
    import datasets

    return datasets.Dataset.from_generator(_generate, gen_kwargs={"identity": identity()})
