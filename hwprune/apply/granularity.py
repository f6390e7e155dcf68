"""What a unit is in a run: whole channels (the model is sliced) or weight blocks (the model is masked).

``FitConfig.granularity`` names one of :data:`GRANULARITIES`; the pipeline asks it every question whose
answer differs between the two, and never tests the name itself.

Example:
    >>> GRANULARITIES["blocks"].budget_kinds
    ('sparsity',)
"""

from __future__ import annotations

from typing import Any, ClassVar

from torch import nn

from ..errors import HwpruneError
from ..graph import discover_groups
from ..graph.groups import UnitIndex


class Granularity:
    """The channel strategy; :class:`Blocks` overrides what differs."""

    name: ClassVar[str] = "channels"
    noun: ClassVar[str] = "channel"  # for messages: "a channel run"
    sparse: ClassVar[bool] = False  # the pruned model keeps dense shapes with zero weights (sparse formats)
    budget_kinds: ClassVar[tuple[str, ...] | None] = None  # None: every budget kind
    default_allocation: ClassVar[str | None] = None  # None: the method's
    # The method a run uses unless --method says otherwise: gradual magnitude pruning, which won on
    # held-out data and on the test set (docs/benchmarks.md, "Allocation and accuracy against Torch-Pruning")
    default_method: ClassVar[str] = "gradual"

    def groups(self, model: nn.Module, example, target, exclude) -> tuple[list, dict]:
        """The model's prunable groups, and the conv/linear layers that keep their width, with why."""
        groups = discover_groups(model, example, exclude=exclude, target=target)
        return groups, dict(groups.unpruned)

    def index(self, model: nn.Module, groups):
        return UnitIndex(model, groups)

    def planned_keep(self, plan: dict) -> list[int] | None:
        """The per-group kept counts the regularizer may aim at (WGSEF's allocation weighting)."""
        return plan["keep"]

    def cut(self, model: nn.Module, groups, keep: dict) -> None:
        """Zero the removed units (the model keeps its shapes; accuracy right after the cut is measured here)."""
        from ..apply.slicing import mask_model

        mask_model(model, groups, keep)

    def shrink(self, model: nn.Module, groups, keep: dict) -> None:
        """Make the cut model smaller: slice the removed channels out."""
        from ..apply.slicing import slice_model

        slice_model(model, groups, keep)

    def after_reinit(self, model: nn.Module, groups, keep: dict) -> None:
        """After a from-scratch re-initialisation: nothing to restore for sliced channels."""

    def finetune_hold(self, model: nn.Module, plan):
        """What keeps removed units removed while fine-tuning (None: slicing already did)."""
        return None

    def report(self, model: nn.Module, example, plan, dense_layers: dict) -> dict[str, Any] | None:
        """Extra counts for the report (None: the model's own parameter and FLOP counts are right)."""
        return None

    def block_of(self, group) -> list[int] | None:
        """What a plan records of a group beyond its kept units (a block group's block shape)."""
        return None

    def read_block(self, entry: dict) -> list[int] | None:
        """That, read back from a plan file's group entry."""
        return None

    def replay(self, model: nn.Module, plan, target=None) -> nn.Module:
        """Apply a saved plan to a fresh ``model`` of the architecture it came from: rediscover the
        groups, check they match the plan, slice."""
        import torch

        from .plan import check_plan
        from .slicing import slice_model

        groups = discover_groups(model, torch.zeros(plan.input_shape), exclude=plan.exclude, target=target)
        check_plan(plan, groups)
        return slice_model(model, groups, plan.keep_by_group())


class Blocks(Granularity):
    """Weight blocks of the target's block shape (:mod:`hwprune.graph.blocks`): masked, not sliced; zero
    blocks are held at zero while fine-tuning; exported as BSR by ``hwprune export --format tvm``."""

    name = "blocks"
    noun = "block"
    sparse = True
    budget_kinds = ("sparsity",)
    default_allocation = "learned"  # one layer's blocks are ranked against another's, as block runs always were
    default_method = "wgsef"  # gradual cuts toward a per-group plan of channels; blocks have none

    def groups(self, model, example, target, exclude):
        from ..graph.blocks import block_groups

        return block_groups(model, example, target, exclude=exclude)

    def index(self, model, groups):
        from ..graph.blocks import BlockIndex

        return BlockIndex(model, groups)

    def planned_keep(self, plan):
        return None

    def cut(self, model, groups, keep):
        index = self.index(model, groups)
        index.mask_(index.keep_from_plan(keep))

    def shrink(self, model, groups, keep):
        """A block plan masks: the model keeps its shapes."""

    def after_reinit(self, model, groups, keep):
        self.cut(model, groups, keep)  # fresh weights, same dropped blocks

    def finetune_hold(self, model, plan):
        from ..graph.blocks import MaskHold, groups_from_plan

        index = self.index(model, groups_from_plan(model, plan))
        return MaskHold(index, index.keep_from_plan(plan.keep_by_group()))

    def report(self, model, example, plan, dense_layers):
        from ..graph.blocks import block_stats, groups_from_plan

        stats = block_stats(model, example, groups_from_plan(model, plan), plan.keep_by_group())
        stats.update(granularity="blocks", dense_layers=dense_layers or {}, note=(
            "model.onnx keeps the dense shapes with exact zero blocks: onnxruntime runs it at dense speed. "
            "The block-sparse speed-up comes from the BSR kernels: hwprune export RUN_DIR --format tvm --measure"))
        return stats

    def block_of(self, group):
        return list(group.block)

    def read_block(self, entry):
        from .plan import read_block

        return read_block(entry)

    def replay(self, model, plan, target=None):
        """Mask instead: the dropped blocks become zeros and the shapes stay."""
        from ..graph.blocks import groups_from_plan, mask_blocks

        return mask_blocks(model, groups_from_plan(model, plan), plan.keep_by_group())


GRANULARITIES: dict[str, Granularity] = {g.name: g for g in (Granularity(), Blocks())}


def granularity(name: str) -> Granularity:
    """The strategy called ``name``; an unknown name is an error listing the valid ones."""
    if name not in GRANULARITIES:
        raise HwpruneError(f"granularity '{name}': expected one of {', '.join(GRANULARITIES)}")
    return GRANULARITIES[name]
