"""``fluctuation``: one-shot pruning by what each unit's removal changes, measured on real inputs (FLAP).

An, Zhao, Yu, Tang and Wang, "Fluctuation-based Adaptive Structured Pruning for Large Language
Models" (AAAI 2024), without retraining in the paper; here followed by hwprune's fine-tune (for
MiniLM: distillation from the dense model). A unit (a channel, an MLP neuron, an attention head) is
read by the layers after it through columns of their weights. With ``x_i`` an input feature of a
reading layer ``W`` (output ``y``) and ``x̄_i`` its mean over calibration inputs, replacing ``x_i`` by
``x̄_i`` changes output ``o`` by ``W[o, i] (x_i − x̄_i)``. The paper scores the expected squared change,
``Var(x_i) · ‖W[:, i]‖²``; hwprune (``relative=true``, the default) counts each output's change as a
share of that output's variance:

    score_i = Var(x_i) · Σ_o W[o, i]² / Var(y_o)        (summed over a conv's kernel taps)

and a unit's score sums it over its features (32 for a MiniLM head) and over every layer that reads
it. The units with the lowest scores go. Then **bias compensation**: the removed features' mean
contribution ``W[:, removed] · x̄[removed]`` is added to the reading layer's bias (or taken off the
running mean of the BatchNorm right after it), so what disappears is only the fluctuation the score
counted (the same fold as Ye et al.'s ISTA, :func:`~hwprune.regularizers.fold.fold_removed_constants`).

**Weight blocks** (``--granularity blocks``): a block of layer ``W`` sums the same terms over its
entries, ``Σ_{(o, i) in block} Var(x_i) · W[o, i]² / Var(y_o)``, and a removed block's mean
contribution ``W_block · x̄`` goes into that layer's own bias.

Choices where the paper is silent or differs (docs/methods.md): the statistics come from ``samples``
training inputs run through the model in evaluation mode before pruning (the paper: 1,024 sequences
of WikiText-2); scores are not standardized per layer by default, because hwprune's projection already
compares heads with heads and neurons with neurons, and the relative score already puts layers on one
scale; ``standardize=true`` applies the paper's standardization, ``(score − mean) / std`` over each
group's units (the sample standard deviation, as the paper's ``torch.std``; a group whose scores are
all equal gets zeros), before the groups are compared; every rank of a torchrun job measures the same
samples, so all ranks choose the same plan.

Compensation on CNNs: a reading conv without a bias is compensated in the running mean of the
BatchNorm right after it, found on the graph with group discovery's leaves (``fold.bn_after``: library
subclasses such as efficientnet-pytorch's ``Conv2dStaticSamePadding`` are convs there; fx would
otherwise trace into them and find no BatchNorm after them). Exact for 1x1 convs and linear layers;
a k x k conv adds ``Σ_{u,v} W[o, c, u, v] · x̄_c``, exact wherever the kernel lies inside the input (at
a zero-padded border it sees fewer taps).

Measured on all-MiniLM-L6-v2 at 50% of heads and neurons (docs/benchmarks.md): held-out cosine right
after pruning and compensation 0.772, against magnitude's 0.412.

Example:
    >>> hwprune.fit(model, task, target="host-cpu", sparsity=0.5, method="fluctuation")  # doctest: +SKIP
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch import nn

from ..errors import HwpruneError
from ..graph.blocks import BlockGroup
from ..graph.groups import CONSUMER, get_tensor
from .base import Regularizer, register
from .fold import ChannelMoments, FoldReport, fold_removed_constants


@dataclass
class FluctuationConfig:
    """``samples``: training inputs measured before pruning; ``compensate``: fold the removed
    features' mean contribution into the reading layers' biases."""

    samples: int = 512
    compensate: bool = True
    relative: bool = True  # share of each output's variance; false: the paper's Var(x_i)·‖W[:, i]‖²
    standardize: bool = False  # the paper's per-layer standardization: (score - mean) / std within each group

    def __post_init__(self):
        if not (isinstance(self.samples, int) and self.samples >= 1):
            raise HwpruneError(f"fluctuation samples={self.samples!r}: expected a whole number of training inputs >= 1")


def standardize_per_group(scores: np.ndarray, index) -> np.ndarray:
    """FLAP's standardization: ``(s − mean) / std`` over each group's units (sample std); zeros for a
    group whose scores are all equal (or that has one unit).

    Example:
        >>> class Two:                                   # two groups: units 0-2 and 3-4
        ...     groups, offsets = [type("G", (), {"size": 3})(), type("G", (), {"size": 2})()], [0, 3]
        >>> standardize_per_group(np.array([1.0, 2.0, 3.0, 5.0, 5.0]), Two()).tolist()
        [-1.0, 0.0, 1.0, 0.0, 0.0]
    """
    out = np.zeros_like(scores, dtype=np.float64)
    for g, off in zip(index.groups, index.offsets):
        s = np.asarray(scores[int(off): int(off) + g.size], dtype=np.float64)
        std = float(s.std(ddof=1)) if s.size > 1 else 0.0
        if std > 0 and np.isfinite(std):
            out[int(off): int(off) + g.size] = (s - s.mean()) / std
    return out


def _reads_columns(layer: nn.Module) -> bool:
    """A linear layer or an ungrouped conv: input feature i is column i of the weight."""
    return isinstance(layer, nn.Linear) or (isinstance(layer, nn.modules.conv._ConvNd) and layer.groups == 1)


@register
class Fluctuation(Regularizer):
    name = "fluctuation"
    # FLAP standardises its scores so that one layer's can be ranked against another's: keep that ranking
    default_allocation = "learned"
    Config = FluctuationConfig
    trains = False
    calibrates = True

    def __init__(self, config: FluctuationConfig, ctx):
        super().__init__(config, ctx)
        self.stats: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None
        self.out_stats: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.fold_report: FoldReport | None = None
        # Weight blocks: each block layer reads its own input; a block is scored by the same sum over its
        # (output row, input column) entries and compensated in the layer's own bias.
        self.blocks = any(isinstance(g, BlockGroup) for g in self.index.groups)
        # The layers whose inputs are measured, with the unit id of each input feature (None for a block
        # layer: its units are its own blocks, not the features it reads).
        self.readers: dict[str, torch.Tensor | None] = {}
        if self.blocks:
            self.readers = dict.fromkeys(g.name for g in self.index.groups)
            return
        for (module, param, dim), gid in self.index.entries(CONSUMER).items():
            if param == "weight" and dim == 1 and _reads_columns(self.ctx.model.get_submodule(module)):
                self.readers[module] = gid.cpu()
        covered = torch.zeros(self.index.n_units + 1, dtype=torch.bool)
        for gid in self.readers.values():
            covered[gid] = True
        if not bool(covered[:-1].all()):
            g = self.index.groups[int(self.index.group_of_unit()[int((~covered[:-1]).nonzero()[0])])]
            raise HwpruneError(f"--method fluctuation: group {g.name} is read by no linear layer or ungrouped conv, so "
                               "its units cannot be scored; use --method magnitude or wgsef for this model")

    def calibrate(self, forward: Callable[[int], None]) -> None:
        """Measure the readers' input statistics; ``forward(n)`` runs ``n`` training inputs through the
        model (no gradients, evaluation mode)."""
        with ChannelMoments(self.ctx.model, list(self.readers), outputs=self.config.relative) as moments:
            forward(self.config.samples)
        self.stats = moments.stats()
        self.out_stats = moments.stats(outputs=True)
        silent = [m for m in self.readers if m not in self.stats]
        if silent:
            raise HwpruneError(
                f"--method fluctuation: layer '{silent[0]}' reads pruned units but never ran as a module during "
                "calibration (torch.nn.MultiheadAttention, for one, uses its out_proj weight directly); "
                "use --method magnitude or wgsef for this model")

    def _matrix_and_column_stats(self, module: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The layer's weight as the ``(O, K)`` matrix and the mean and std of what each column reads (a
        conv's input channel spread over its kernel taps, im2col column order), float64 on the CPU."""
        w = get_tensor(self.ctx.model, module, "weight").detach().double().cpu()
        taps = int(np.prod(w.shape[2:])) if w.dim() > 2 else 1
        mean, std = self.stats[module]
        return w.reshape(w.shape[0], -1), mean.repeat_interleave(taps), std.repeat_interleave(taps)

    def _effective_weight(self, module: str) -> torch.Tensor:
        """``W[o, c] · σ(x_c)`` (``relative``: also ``/ σ(y_o)``) as an ``(O, K)`` matrix: its squared entries
        are the score terms."""
        w, _, std = self._matrix_and_column_stats(module)
        eff = w * std[None]
        if self.config.relative:
            eff = eff / self.stats_out_var(module).sqrt()[:, None]
        return eff

    def scores(self) -> np.ndarray:
        if self.stats is None:  # before calibration (or used outside fit): the unit norms, never all zeros
            return super().scores()
        if self.blocks:  # a block's score: the sum of its entries' terms
            scores = torch.cat([g.block_sq_norms(self._effective_weight(g.name)) for g in self.index.groups]).numpy()
        else:
            n = self.index.n_units
            acc = torch.zeros(n + 1, dtype=torch.float64)
            for module, gid in self.readers.items():  # Var(x_i) · Σ_o W[o, i]² (/ Var(y_o)), over a conv's taps too
                eff = self._effective_weight(module)
                acc.index_add_(0, gid, eff.pow(2).reshape(eff.shape[0], len(gid), -1).sum(dim=(0, 2)))
            scores = acc[:n].numpy()
        return standardize_per_group(scores, self.index) if self.config.standardize else scores

    def project(self, groups, budget, cost=None, allocation=None, **kwargs):
        """As every method's; standardized scores sum to zero in every group, so only allocations that
        compare scores as they are (``learned``) or not at all (``uniform``) can use them."""
        self.check_allocation(self.config, getattr(allocation, "policy", allocation) or self.default_allocation)
        return super().project(groups, budget, cost, allocation=allocation, **kwargs)

    @classmethod
    def check_allocation(cls, config, policy: str) -> None:
        if config.standardize and policy not in ("learned", "uniform"):
            raise HwpruneError(f"--method fluctuation standardize=true with --allocation {policy}: standardized "
                               "scores sum to zero in every group, which that allocation cannot weigh; use "
                               "--allocation learned (the paper's global ranking) or uniform")

    def stats_out_var(self, module: str) -> torch.Tensor:
        """Variance of each output of a reading layer, floored at 1e-6 of the mean (dead outputs)."""
        var = self.out_stats[module][1] ** 2
        return var.clamp_min(1e-6 * float(var.mean()) + 1e-30)

    def zero_fraction(self) -> float:
        return 0.0

    def finalize(self, groups, keep) -> None:
        if self.config.compensate and self.stats is not None and self.blocks:
            self.fold_report = self._compensate_blocks(keep)
        elif self.config.compensate and self.stats is not None:
            removed = ~self.index.keep_from_plan(keep)
            self.fold_report = fold_removed_constants(self.ctx.model, self.index, removed, None, stats=self.stats)

    @torch.no_grad()
    def _compensate_blocks(self, keep) -> FoldReport:
        """Add each removed block's mean contribution ``W_block · x̄`` to its layer's bias (a layer
        without a bias is left as it is and listed in the report)."""
        report = FoldReport()
        removed = self.index.split(~self.index.keep_from_plan(keep))
        for g in self.index.groups:
            if not bool(removed[g.name].any()):
                continue
            layer = self.ctx.model.get_submodule(g.name)
            if getattr(layer, "bias", None) is None:
                report.unfolded.append(g.name)
                continue
            w, mean, std = self._matrix_and_column_stats(g.name)
            gone = g.expand(removed[g.name].double().cpu()).reshape(w.shape)  # 1 where a weight's block was removed
            layer.bias.add_(((w * gone) @ mean).to(device=layer.bias.device, dtype=layer.bias.dtype))
            report.folded[g.name] = "bias"
            report.max_std = max(report.max_std, float(std[gone.any(0)].max()))
        return report
