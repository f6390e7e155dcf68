"""Training and evaluation loops.

Data order is drawn from a generator seeded by ``(seed, stage, epoch)``, so an epoch replays exactly
after a resume. Proximal regularizers act after ``optimizer.step()``; the momentum buffer holds
loss gradients only (METHODS.md §1.7: the regularizer never enters the momentum).
"""

from __future__ import annotations

import math
import time
import zlib
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ..errors import DivergedError


@dataclass
class TrainSettings:
    """Optimizer settings shared by every stage (SGD with momentum, cosine learning rate)."""

    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    batch_size: int = 64
    num_workers: int = 0


class _GlobalBatches:
    """Batch sampler: the global batches a single process would draw (same seeded permutation), of
    which this rank takes its contiguous share. ``loss_scales[i]`` makes the ranks' averaged gradient
    equal the mean over global batch i. Global batches with fewer samples than ranks are dropped on
    every rank (an empty share would stall the collective operations)."""

    def __init__(self, n: int, batch_size: int, generator: torch.Generator):
        from . import distributed

        perm = torch.randperm(n, generator=generator).tolist()
        world = distributed.info().world
        batches = [perm[i : i + batch_size] for i in range(0, n, batch_size)]
        self.batches, self.loss_scales, self.global_sizes = [], [], []
        for b in batches:
            if len(b) < world:
                continue
            share, scale = distributed.rank_share(b)
            self.batches.append(share)
            self.loss_scales.append(scale)
            self.global_sizes.append(len(b))

    def __iter__(self):
        return iter(self.batches)

    def __len__(self):
        return len(self.batches)


def epoch_loader(dataset: Dataset, settings: TrainSettings, seed: int, stage: str, epoch: int, collate_fn=None) -> DataLoader:
    """A shuffled loader whose order depends only on (seed, stage, epoch); under torchrun each rank
    gets its share of the same global batches. Worker processes load data in parallel when
    ``settings.num_workers`` > 0; memory is pinned when a GPU is used."""
    g = torch.Generator()
    g.manual_seed((seed * 1_000_003 + zlib.crc32(stage.encode()) * 101 + epoch) % (2**63))
    sampler = _GlobalBatches(len(dataset), settings.batch_size, g)
    loader = DataLoader(
        dataset, batch_sampler=sampler, num_workers=settings.num_workers, collate_fn=collate_fn,
        pin_memory=torch.cuda.is_available(), persistent_workers=False,
    )
    loader.loss_scales, loader.global_sizes = sampler.loss_scales, sampler.global_sizes
    return loader


def eval_loader(dataset: Dataset, batch_size: int = 256, collate_fn=None) -> DataLoader:
    """In order; under torchrun each rank evaluates every world-th sample (evaluate sums the counts)."""
    from torch.utils.data import Subset

    from . import distributed

    d = distributed.info()
    if d.enabled:
        dataset = Subset(dataset, list(range(d.rank, len(dataset), d.world)))
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate_fn)


def make_optimizer(model: nn.Module, settings: TrainSettings, no_decay: list[torch.Tensor] = (),
                   extra_groups: list[dict] = (), special_groups: list[dict] = ()) -> torch.optim.SGD:
    """SGD with momentum; tensors in ``no_decay`` (regularized groups, BN) get no weight decay.

    ``special_groups`` hold model parameters with their own settings (they leave the default groups);
    ``extra_groups`` hold parameters that are not the model's (auxiliary masks, gates).
    """
    skip = {id(t) for t in no_decay}
    special = {id(p) for g in special_groups for p in g["params"]}
    decay, plain = [], []
    for p in model.parameters():
        if not p.requires_grad or id(p) in special:
            continue
        (plain if id(p) in skip or p.dim() <= 1 else decay).append(p)
    groups = [{"params": decay, "weight_decay": settings.weight_decay}, {"params": plain, "weight_decay": 0.0}]
    groups += [dict(g) for g in special_groups] + list(extra_groups)
    return torch.optim.SGD([g for g in groups if g["params"]], lr=settings.lr, momentum=settings.momentum)


def cosine_lr(base: float, step: int, total: int, floor: float = 0.0) -> float:
    if total <= 0:
        return base
    return floor + (base - floor) * 0.5 * (1 + math.cos(math.pi * min(step, total) / total))


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, device: torch.device | str = "cpu") -> tuple[float, float]:
    """(top-1 accuracy, mean cross-entropy) on a loader (summed over ranks under torchrun)."""
    from . import distributed

    model.eval()
    correct, total, loss = 0, 0, 0.0
    for x, y in loader:
        x, y = x.to(device), y.to(device)
        out = model(x)
        loss += float(F.cross_entropy(out, y, reduction="sum"))
        correct += int((out.argmax(1) == y).sum())
        total += len(y)
    correct, total, loss = distributed.sum_([correct, total, loss])
    return correct / max(total, 1), loss / max(total, 1)


@torch.no_grad()
def recalibrate_bn(model: nn.Module, dataset: Dataset, settings: TrainSettings, seed: int, collate_fn=None,
                   device: torch.device | str = "cpu", max_samples: int = 8192) -> None:
    """Re-estimate every BatchNorm's running statistics with a forward pass over training data.

    Regularizers shrink channels faster than BN's running averages (momentum 0.1) follow: a model
    whose training accuracy is 99.8% can evaluate at 10% with the stale averages, and 98.9% once they
    are re-estimated. Done before every evaluation of a regularized or freshly masked model.
    """
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not bns:
        return
    saved = [(m, m.momentum) for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the pass
    was_training = model.training
    model.train()
    seen = 0
    try:
        loader = epoch_loader(dataset, settings, seed, "bn-recalibration", 0, collate_fn)
        for (x, _), size in zip(loader, loader.global_sizes):
            model(x.to(device))
            seen += size  # global count: every rank stops after the same batch
            if seen >= max_samples:
                break
    finally:
        for m, mom in saved:
            m.momentum = mom
        model.train(was_training)


@dataclass
class EpochStats:
    loss: float
    accuracy: float
    seconds: float
    samples_per_s: float
    lr: float


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """The step's learning rate on every parameter group (scaled by a group's ``lr_scale``)."""
    for g in optimizer.param_groups:
        g["lr"] = lr * g.get("lr_scale", 1.0)


def optimizer_step(loss: torch.Tensor, optimizer: torch.optim.Optimizer, *, step: int, lr: float, regularizer=None,
                   on_step: Callable[[int, float], None] | None = None, after_backward: Callable[[], None] | None = None,
                   scale: float = 1.0) -> None:
    """One step of every training loop: the regularizer's penalty, a check that the loss is finite (on
    every rank together), backward (``loss · scale``), ``after_backward``, the optimizer, the
    regularizer's ``after_step`` (its prox or clamp), then ``on_step(step, task loss)``."""
    from . import distributed

    total = loss
    pen = regularizer.penalty() if regularizer is not None else None
    if pen is not None:
        total = loss + pen
    bad = not bool(torch.isfinite(total))
    if distributed.info().enabled:  # all ranks stop together, or the healthy ones wait forever
        bad = distributed.sum_([float(bad)])[0] > 0
    if bad:
        raise DivergedError(
            f"the loss became {float(total.detach())} at step {step}; the run stopped and the last good checkpoint "
            "is kept. Start a new run (another --out) with a lower --lr or a weaker --method-option strength=...; "
            "--resume keeps the run's settings, so it would diverge again.")
    optimizer.zero_grad(set_to_none=True)
    (total * scale if scale != 1.0 else total).backward()
    if after_backward is not None:
        after_backward()
    optimizer.step()
    if regularizer is not None:
        regularizer.after_step(lr, step)
    if on_step is not None:
        on_step(step, float(loss.detach()))


def train_epoch(
    model: nn.Module,
    loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    *,
    lr_at: Callable[[int], float],
    step0: int,
    regularizer=None,
    on_step: Callable[[int, float], None] | None = None,
    device: torch.device | str = "cpu",
    loss_fn: Callable | None = None,
    after_backward: Callable[[], None] | None = None,
    batch_fn: Callable | None = None,
) -> EpochStats:
    """One epoch. ``lr_at(global_step)`` gives the learning rate; ``on_step(step, loss)`` runs after each
    step with that step's task loss. ``batch_fn(x, y) -> (x, target)`` changes the batch the model
    trains on (distillation's mixing) and what ``loss_fn`` gets as labels; accuracy counts ``y``."""
    model.train()
    t0 = time.perf_counter()
    total_loss, correct, seen = 0.0, 0, 0
    step = step0
    lr = lr_at(step)
    scales = getattr(loader, "loss_scales", None)
    for i, (x, y) in enumerate(loader):
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        lr = lr_at(step)
        set_lr(optimizer, lr)
        x, target = batch_fn(x, y) if batch_fn else (x, y)
        out = model(x)
        loss = loss_fn(out, target, x) if loss_fn else F.cross_entropy(out, target)
        optimizer_step(loss, optimizer, step=step, lr=lr, regularizer=regularizer, on_step=on_step,
                       after_backward=after_backward, scale=scales[i] if scales is not None else 1.0)
        total_loss += float(loss.detach()) * len(y)
        correct += int((out.detach().argmax(1) == y).sum())
        seen += len(y)
        step += 1
    secs = time.perf_counter() - t0
    from . import distributed

    total_loss, correct, seen = distributed.sum_([total_loss, correct, seen])  # the whole job's numbers
    return EpochStats(total_loss / max(seen, 1), correct / max(seen, 1), secs, seen / max(secs, 1e-9), lr)
