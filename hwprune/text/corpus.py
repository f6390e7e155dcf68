"""Real English sentences that need no download: the text of Python's own documentation.

``pydoc_data.topics`` ships with every CPython (it is what ``help("if")`` prints): about 460,000
characters of English prose from the Language Reference and the Library Reference, written by people.
It is the same on every machine with the same Python, installs nothing, and is read offline. hwprune
splits it into sentences, keeps the ones that read as prose (40 to 300 characters, starting with a
capital letter, at least seven words), and holds a fixed, seeded share out for evaluation. On Python
3.11 this gives 1,744 sentences.

More training text, same rule: the docstrings of the standard library's own modules, classes and
functions (about 10,000 more sentences on Python 3.11). They are read with :mod:`ast` from the
``.py`` files, never imported, so no module's code runs; the test suites and IDLE are skipped.
Held-out sentences always come from ``pydoc_data.topics``, and a docstring sentence equal to a
held-out one is dropped from training.

Example:
    >>> train, held_out = split_sentences(python_doc_sentences(), held_out=400, seed=0)
    >>> len(held_out)
    400
"""

from __future__ import annotations

import ast
import os
import re
import sysconfig

import numpy as np

from ..errors import DataError

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"'(])")


_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3", "__pycache__"}


def _prose(texts, min_chars: int, max_chars: int, seen: set[str]) -> list[str]:
    """The sentences of ``texts`` that read as prose and are not in ``seen`` (which grows)."""
    out = []
    for text in texts:
        for s in _SENTENCE_END.split(re.sub(r"\s+", " ", text)):
            s = s.strip()
            if (min_chars <= len(s) <= max_chars and s[0].isupper() and len(s.split()) >= 7
                    and s[-1] in ".!?" and s not in seen):
                seen.add(s)
                out.append(s)
    return out


def python_doc_sentences(min_chars: int = 40, max_chars: int = 300) -> list[str]:
    """Prose sentences of ``pydoc_data.topics``, in a fixed order, without duplicates."""
    try:
        from pydoc_data.topics import topics
    except ImportError:  # some distributions strip it; Debian ships it in libpython3.x-stdlib
        raise DataError("Python's documentation text (pydoc_data.topics) is not installed with this Python; "
                        "install the full standard library (e.g. apt-get install libpython3-stdlib)") from None
    return _prose((topics[key] for key in sorted(topics)), min_chars, max_chars, set())


def stdlib_docstring_sentences(exclude=(), min_chars: int = 40, max_chars: int = 300) -> list[str]:
    """Prose sentences of the standard library's docstrings, in a fixed order, none in ``exclude``.

    Example:
        >>> len(stdlib_docstring_sentences()) > 5000
        True
    """
    root = sysconfig.get_paths()["stdlib"]
    docs = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in _SKIP_DIRS and not d.startswith("config-"))
        for name in sorted(f for f in files if f.endswith(".py")):
            try:
                with open(os.path.join(folder, name), encoding="utf-8") as f:
                    tree = ast.parse(f.read())
            except (OSError, SyntaxError, UnicodeDecodeError, ValueError):
                continue  # a file this Python cannot parse (e.g. a test fixture) has no prose for us
            for node in ast.walk(tree):
                if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                    doc = ast.get_docstring(node)
                    if doc:
                        docs.append(doc)
    return _prose(docs, min_chars, max_chars, set(exclude))


def split_sentences(sentences: list[str], held_out: int, seed: int = 0) -> tuple[list[str], list[str]]:
    """A seeded split into (train, held-out) with ``held_out`` sentences set aside."""
    if not 0 < held_out < len(sentences):
        raise DataError(f"held_out={held_out}: expected between 1 and {len(sentences) - 1} of {len(sentences)} sentences")
    order = np.random.default_rng(seed).permutation(len(sentences))
    test = sorted(order[:held_out].tolist())
    train = sorted(order[held_out:].tolist())
    return [sentences[i] for i in train], [sentences[i] for i in test]
