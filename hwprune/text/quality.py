"""How close a pruned sentence encoder stays to its dense original.

* **mean cosine**: the average cosine similarity between the pruned and the dense embedding of the
  same sentence (1.0 = identical directions);
* **Spearman**: the rank correlation between the dense and the pruned model's similarity of every
  pair of held-out sentences (``n·(n-1)/2`` pairs). It asks whether the pruned model still *orders*
  sentence pairs by similarity the way the dense one does, which is what retrieval and clustering use.

Example:
    >>> e = torch.nn.functional.normalize(torch.randn(50, 8), dim=1)
    >>> q = embedding_quality(e, e)
    >>> round(q.mean_cosine, 6), round(q.spearman, 6)
    (1.0, 1.0)
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F


@dataclass
class EmbeddingQuality:
    """Pruned against dense on the same sentences."""

    mean_cosine: float
    min_cosine: float
    spearman: float
    sentences: int
    pairs: int

    def to_dict(self) -> dict:
        return asdict(self)


def _ranks(x: np.ndarray) -> np.ndarray:
    from scipy.stats import rankdata

    return rankdata(x)


def embedding_quality(dense: torch.Tensor, pruned: torch.Tensor) -> EmbeddingQuality:
    """Compare two ``(n, dim)`` embedding matrices of the same ``n`` sentences."""
    if dense.shape != pruned.shape or dense.dim() != 2 or len(dense) < 3:
        raise ValueError(f"expected two (n, dim) embeddings of the same shape with n >= 3, got {tuple(dense.shape)} and {tuple(pruned.shape)}")
    d = F.normalize(dense.double(), dim=1)
    p = F.normalize(pruned.double(), dim=1)
    cos = (d * p).sum(1)
    iu = torch.triu_indices(len(d), len(d), offset=1)
    sim_d = (d @ d.T)[iu[0], iu[1]].numpy()
    sim_p = (p @ p.T)[iu[0], iu[1]].numpy()
    rd, rp = _ranks(sim_d), _ranks(sim_p)
    spearman = float(np.corrcoef(rd, rp)[0, 1])
    return EmbeddingQuality(float(cos.mean()), float(cos.min()), spearman, len(d), len(sim_d))
