"""What distillation's student and teacher see: images moved and mirrored (Beyer et al.'s consistent
teaching) and pairs of images mixed (function matching), drawn from one seeded generator so a resumed
fine-tune replays the same views.

Example:
    >>> g = torch.Generator().manual_seed(0)
    >>> moved_and_mirrored(torch.ones(2, 1, 3, 3), shift=1, flip=True, generator=g).shape
    torch.Size([2, 1, 3, 3])
    >>> 0 <= beta_sample(1.0, g) <= 1
    True
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import HwpruneError


@dataclass(frozen=True)
class MixedLabels:
    """The labels of a mixed batch: ``lam`` of ``a`` and ``1 - lam`` of ``b``."""

    a: torch.Tensor
    b: torch.Tensor
    lam: float


def moved_and_mirrored(x: torch.Tensor, shift: int, flip: bool, generator: torch.Generator) -> torch.Tensor:
    """Each image of ``x`` (N, C, H, W) moved by its own (dy, dx) in [-shift, shift]² with zeros filling in,
    then mirrored left-right with probability 1/2 if ``flip``."""
    if x.dim() != 4:
        raise HwpruneError(f"distillation's --distill-shift/--distill-flip move and mirror images: expected "
                           f"batches of shape (N, C, H, W), got {tuple(x.shape)}; turn them off for this data")
    n, _, h, w = x.shape
    if shift > 0:
        padded = F.pad(x, (shift, shift, shift, shift))
        offsets = torch.randint(0, 2 * shift + 1, (n, 2), generator=generator).tolist()
        x = torch.stack([padded[i, :, dy:dy + h, dx:dx + w] for i, (dy, dx) in enumerate(offsets)])
    if flip:
        mirrored = torch.rand(n, generator=generator) < 0.5
        x = torch.where(mirrored.to(x.device).view(n, 1, 1, 1), x.flip(3), x)
    return x


def beta_sample(a: float, generator: torch.Generator) -> float:
    """One draw of Beta(a, a) from ``generator`` (reproducible; torch's Beta sampler has no generator):
    the ratio of two Gamma(a) draws, each by Marsaglia and Tsang's method."""
    g1, g2 = _gamma_sample(a, generator), _gamma_sample(a, generator)
    return g1 / (g1 + g2) if g1 + g2 > 0 else 0.5


def _gamma_sample(a: float, generator: torch.Generator) -> float:
    if a < 1:  # boost: Gamma(a) = Gamma(a + 1) · U^(1/a)
        u = float(torch.rand((), generator=generator, dtype=torch.float64))
        return _gamma_sample(a + 1, generator) * u ** (1 / a)
    d = a - 1 / 3
    c = 1 / (9 * d) ** 0.5
    while True:
        z = float(torch.randn((), generator=generator, dtype=torch.float64))
        v = (1 + c * z) ** 3
        if v <= 0:
            continue
        u = float(torch.rand((), generator=generator, dtype=torch.float64))
        if np.log(max(u, 1e-300)) < 0.5 * z * z + d - d * v + d * np.log(v):
            return d * v
