"""``hwprune fit --model minilm``: the pretrained sentence encoder, its corpus and its defaults.

Example:
    >>> job = minilm_job(data=None, seed=0)    # minutes: the teacher runs on every sentence  # doctest: +SKIP
    >>> job.task.metric, len(job.task.held_out)                                               # doctest: +SKIP
    ('mean_cosine', 400)
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from ..errors import DataError
from ..tasks.distill import SentenceDistillTask
from .corpus import python_doc_sentences, split_sentences, stdlib_docstring_sentences

TEXT_MODELS = ("minilm",)
CORPORA = ("pydoc", "stdlib")  # stdlib: pydoc plus the standard library's docstrings
HELD_OUT = 400  # 79,800 sentence pairs for the Spearman correlation


@dataclass
class TextJob:
    """A model, its task, and the training defaults that suit it (flags the user types win)."""

    model: nn.Module
    task: SentenceDistillTask
    data: str
    description: str
    # Pretrained: no dense training; regularize; fine-tune. Measured at 50% with fluctuation (docs/benchmarks.md):
    # 5 epochs of distillation reached held-out cosine 0.954 / Spearman 0.944, 8 epochs 0.959 / 0.950.
    epochs: tuple[int, int, int] = (0, 3, 5)
    # One-shot, data-aware pruning, then distillation: regularized training costs a pretrained encoder
    # 0.19-0.30 of held-out cosine before anything is removed (docs/benchmarks.md, MiniLM). A one-shot
    # method fine-tunes through the regularized epochs too: 8 epochs of distillation.
    method: str = "fluctuation"
    lr: float = 2e-4  # AdamW (tasks/distill.py)
    batch_size: int = 32
    weight_decay: float = 0.0
    # Per method, settings that suit a pretrained transformer (options the user types win). WGSEF's
    # default cap lets surviving units shrink 5% per step, harmless before a BatchNorm but not here:
    # MiniLM's held-out cosine fell to 0.48 within one epoch. 0.2% per step keeps the function.
    method_options: dict = field(default_factory=lambda: {"wgsef": {"max_shrink": 0.002}})


def pydoc_split(seed: int) -> tuple[list[str], list[str]]:
    """(training, held-out) sentences of Python's documentation: the held-out ones are what every MiniLM
    report measures and what ``hwprune export`` checks on.

    Example:
        >>> train, held_out = pydoc_split(seed=0)
        >>> len(held_out)
        400
    """
    return split_sentences(python_doc_sentences(), HELD_OUT, seed=seed)


def minilm_job(data: str | None, seed: int) -> TextJob:
    """all-MiniLM-L6-v2 distilled from itself on Python's documentation text (see text/corpus.py)."""
    from .minilm import load_minilm

    data = data or "stdlib"
    name, _, count = data.partition(":")
    if name not in CORPORA or (count and not (count.isdigit() and int(count) > 0)):
        raise DataError(f"--data {data!r}: --model minilm trains on text; expected {' or '.join(CORPORA)}, "
                        "optionally with the number of training sentences to use (e.g. pydoc:200)")
    train, held_out = pydoc_split(seed)
    corpus = f"pydoc_data.topics (Python's documentation text, ships with Python): {len(train) + len(held_out)} sentences"
    if name == "stdlib":  # the same held-out sentences; more training text
        extra = stdlib_docstring_sentences(exclude=held_out)
        train += extra
        corpus += f", plus {len(extra)} sentences of the standard library's docstrings (training only)"
    if count:  # fewer training sentences (quick runs, tests); the held-out set stays the same
        train = train[: int(count)]
    model, tokenizer = load_minilm()
    task = SentenceDistillTask(model, tokenizer, train, held_out, corpus=corpus)
    return TextJob(model, task, data, f"{corpus}; {len(train)} train, {len(held_out)} held out")
