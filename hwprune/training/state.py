"""What a run has done so far: the stage it is in and everything a later stage or a resume needs.

The checkpoint stores :meth:`RunState.to_payload` beside the model, optimizer and RNG state; a resumed
run reads back the fields it finds (:meth:`RunState.update_from`), so checkpoints written before a field
existed still load.

Example:
    >>> s = RunState()
    >>> s.enter("regularize"); (s.stage, s.epoch)
    ('regularize', 0)
    >>> RunState.from_payload(s.to_payload()).stage
    'regularize'
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

STAGES = ("dense", "regularize", "finetune", "export", "done")


@dataclass
class RunState:
    stage: str = "dense"
    epoch: int = 0  # epochs finished in the current stage
    history: list[dict[str, Any]] = field(default_factory=list)  # one record per epoch, every stage
    acc: dict[str, float | None] = field(default_factory=dict)  # the task's metric: dense, pruned
    plan: dict | None = None  # the Plan (as a dict) once projected
    projection: dict | None = None  # what the projection did, for the report
    norms_before: list[float] | None = None  # unit scores before and after the regularized stage (plots)
    norms_after: list[float] | None = None
    dense_model: dict | None = None  # the dense model's state dict (teacher, export, report)
    regularizer: dict | None = None  # unused in the state; the checkpoint keeps the regularizer beside it
    target_fraction: float | None = None  # fraction of units the budget removes
    zero_fraction: float | None = None  # fraction the method itself had zeroed before the projection
    finetune_plan: dict | None = None  # epochs, learning-rate scale and distillation of the last stage
    seconds: float = 0.0  # wall time over all sessions of the run
    stage_plan: dict | None = None  # the allocation planned at the start of the regularized stage
    # a latency budget: the planned widths timed before training, and the factor on the budget that made
    # the measured latency meet it (hwprune.latency.budget.close_the_loop); None until planned
    latency_loop: dict | None = None
    # the fine-tune's weight average so far (FitConfig.finetune_average; WeightAverage.state_dict())
    weight_average: dict | None = None

    def enter(self, stage: str) -> None:
        """Move to ``stage`` at its first epoch."""
        if stage not in STAGES:
            raise ValueError(f"stage {stage!r}: expected one of {', '.join(STAGES)}")
        self.stage, self.epoch = stage, 0

    @property
    def sliced(self) -> bool:
        """Whether the model already has the plan's shapes (after the projection)."""
        return self.plan is not None and self.stage in ("finetune", "export", "done")

    def to_payload(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def update_from(self, payload: dict[str, Any]) -> None:
        """Take every field the payload has (a checkpoint from an older version may lack some)."""
        for f in dataclasses.fields(self):
            if f.name in payload:
                setattr(self, f.name, payload[f.name])

    @classmethod
    def from_payload(cls, payload: dict[str, Any]) -> "RunState":
        state = cls()
        state.update_from(payload)
        return state
