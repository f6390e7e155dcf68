"""Real English sentences that need no download: the text of Python's own documentation.

``pydoc_data.topics`` ships with every CPython (it is what ``help("if")`` prints): about 460,000
characters of English prose from the Language Reference and the Library Reference, written by people.
It is the same on every machine with the same Python, installs nothing, and is read offline. hwprune
splits it into sentences, keeps the ones that read as prose (40 to 300 characters, starting with a
capital letter, at least seven words), and holds a fixed, seeded share out for evaluation. On Python
3.11 this gives 2,239 sentences.

Example:
    >>> train, held_out = split_sentences(python_doc_sentences(), held_out=400, seed=0)
    >>> len(held_out)
    400
"""

from __future__ import annotations

import re

import numpy as np

from ..errors import DataError

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"'(])")


def python_doc_sentences(min_chars: int = 40, max_chars: int = 300) -> list[str]:
    """Prose sentences of ``pydoc_data.topics``, in a fixed order, without duplicates."""
    try:
        from pydoc_data.topics import topics
    except ImportError:  # some distributions strip it; Debian ships it in libpython3.x-stdlib
        raise DataError("Python's documentation text (pydoc_data.topics) is not installed with this Python; "
                        "install the full standard library (e.g. apt-get install libpython3-stdlib)") from None
    seen, out = set(), []
    for key in sorted(topics):
        text = re.sub(r"\s+", " ", topics[key])
        for s in _SENTENCE_END.split(text):
            s = s.strip()
            if (min_chars <= len(s) <= max_chars and s[0].isupper() and len(s.split()) >= 7
                    and s[-1] in ".!?" and s not in seen):
                seen.add(s)
                out.append(s)
    return out


def split_sentences(sentences: list[str], held_out: int, seed: int = 0) -> tuple[list[str], list[str]]:
    """A seeded split into (train, held-out) with ``held_out`` sentences set aside."""
    if not 0 < held_out < len(sentences):
        raise DataError(f"held_out={held_out}: expected between 1 and {len(sentences) - 1} of {len(sentences)} sentences")
    order = np.random.default_rng(seed).permutation(len(sentences))
    test = sorted(order[:held_out].tolist())
    train = sorted(order[held_out:].tolist())
    return [sentences[i] for i in train], [sentences[i] for i in test]
