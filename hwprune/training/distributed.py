"""Multi-process training under ``torchrun``: the same result as one process, up to floating-point noise.

How the equivalence is kept:

* **Data**: every rank draws the same seeded permutation and the same global batches as a single
  process would; rank r takes its contiguous share of each global batch. The loss of a rank is
  scaled by ``n_rank · world / n_global`` so that DistributedDataParallel's gradient average equals
  the single-process mean over the global batch, also for an uneven last batch.
* **BatchNorm**: statistics are computed over the global batch (:class:`SyncedBatchNorm`, which all-
  reduces sums with differentiable collectives; torch's SyncBatchNorm refuses CPU tensors).
* **Regularizers** act on parameters, which DDP keeps identical on every rank, so proximal steps, the
  polarization's network-wide mean and the budget projection need no communication; parameters that
  are not the model's (gates, auxiliary masks) get their gradients all-reduced by hand; the task loss
  that the strength controller reads is averaged over ranks.
* Only rank 0 writes checkpoints, exports, measures latency and prints.

Example:
    torchrun --nproc_per_node 2 -m hwprune fit --target host-cpu --sparsity 0.7
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands: world size, rank, and whether it is the one that writes."""

    world: int = 1
    rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


_INFO = DistInfo()


def init_from_env() -> DistInfo:
    """Join the process group torchrun describes in the environment (WORLD_SIZE, RANK, MASTER_*).

    gloo on CPU, NCCL when CUDA is available. A single process returns ``DistInfo(1, 0)``.
    """
    global _INFO
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        _INFO = DistInfo()
        return _INFO
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend=backend)
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    _INFO = DistInfo(dist.get_world_size(), dist.get_rank())
    return _INFO


def info() -> DistInfo:
    """The current process's place (``DistInfo(1, 0)`` when not distributed)."""
    return _INFO


def shutdown() -> None:
    """Leave the process group (a no-op when not distributed)."""
    global _INFO
    if _INFO.enabled and dist.is_initialized():
        dist.destroy_process_group()
    _INFO = DistInfo()


def barrier() -> None:
    if _INFO.enabled:
        dist.barrier()


def mean(value: float) -> float:
    """The mean of a float over all ranks (the value itself when not distributed)."""
    if not _INFO.enabled:
        return value
    t = torch.tensor([float(value)], dtype=torch.float64)
    dist.all_reduce(t)
    return float(t) / _INFO.world


def sum_(values: list[float]) -> list[float]:
    """Element-wise sum of a list of floats over all ranks."""
    if not _INFO.enabled:
        return values
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t)
    return t.tolist()


def all_reduce_grads_(params) -> None:
    """Average the gradients of parameters that DDP does not manage (gates, auxiliary masks)."""
    if not _INFO.enabled:
        return
    for p in params:
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad.div_(_INFO.world)


def rank_share(indices: list[int]) -> tuple[list[int], float]:
    """This rank's contiguous share of one global batch, and the loss scale that makes DDP's average
    of the ranks' mean losses equal the mean over the whole batch."""
    n = len(indices)
    if not _INFO.enabled:
        return indices, 1.0
    w, r = _INFO.world, _INFO.rank
    lo, hi = (n * r) // w, (n * (r + 1)) // w
    share = indices[lo:hi]
    return share, (len(share) * w / n) if n else 0.0


def global_moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-channel mean and (biased) variance of ``x`` over the global batch of all ranks, and the
    global count per channel. Differentiable: gradients flow to every rank's input."""
    import torch.distributed.nn.functional as dnn

    dims = [0] + list(range(2, x.dim()))
    count = torch.tensor([x.numel() / x.shape[1]], dtype=x.dtype, device=x.device)
    packed = dnn.all_reduce(torch.cat([x.sum(dims), (x * x).sum(dims), count]))
    c = x.shape[1]
    n = packed[-1]
    mean = packed[:c] / n
    return mean, packed[c : 2 * c] / n - mean * mean, n


def batch_norm_global(x: torch.Tensor, weight, bias, eps: float) -> torch.Tensor:
    """Batch normalization of ``x`` with global-batch statistics (no running averages touched), for
    code that re-normalizes with other γ, β, as AutoPrune's gates do. In one process: local statistics."""
    if not _INFO.enabled:
        return torch.nn.functional.batch_norm(x, None, None, weight, bias, True, 0.0, eps)
    mean, var, _ = global_moments(x)
    shape = [1, x.shape[1]] + [1] * (x.dim() - 2)
    y = (x - mean.view(shape)) * torch.rsqrt(var.view(shape) + eps)
    if weight is not None:
        y = y * weight.view(shape)
    if bias is not None:
        y = y + bias.view(shape)
    return y


class SyncedBatchNorm(nn.BatchNorm2d):
    """BatchNorm whose training statistics cover the global batch of all ranks, on CPU too.

    Works for 2-D to 5-D inputs (it subclasses BatchNorm2d so that group discovery, slicing and export
    treat it as a BatchNorm). In evaluation, or in a single process, it is exactly torch's BatchNorm.
    """

    def _check_input_dim(self, input):
        if input.dim() < 2:
            raise ValueError(f"expected at least 2-D input, got {input.dim()}-D")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and _INFO.enabled):
            return super().forward(x)
        mean, var, n = global_moments(x)
        c = x.shape[1]
        with torch.no_grad():
            if self.track_running_stats:
                self.num_batches_tracked += 1
                m = (1.0 / float(self.num_batches_tracked)) if self.momentum is None else self.momentum
                unbiased = var * (n / (n - 1).clamp_min(1))
                self.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
                self.running_var.mul_(1 - m).add_(unbiased.detach(), alpha=m)
        shape = [1, c] + [1] * (x.dim() - 2)
        y = (x - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y


def convert_batchnorm(model: nn.Module, to_synced: bool) -> nn.Module:
    """Swap every BatchNorm for a :class:`SyncedBatchNorm` (or back), sharing parameters and buffers."""
    for name, child in list(model.named_children()):
        is_synced = isinstance(child, SyncedBatchNorm)
        if to_synced and isinstance(child, nn.modules.batchnorm._BatchNorm) and not is_synced:
            new = SyncedBatchNorm(child.num_features, child.eps, child.momentum, child.affine, child.track_running_stats)
            new._original_class = type(child)  # converted back after training
        elif not to_synced and is_synced:
            cls = getattr(child, "_original_class", nn.BatchNorm2d)
            new = cls(child.num_features, child.eps, child.momentum, child.affine, child.track_running_stats)
        else:
            convert_batchnorm(child, to_synced)
            continue
        if child.affine:
            new.weight, new.bias = child.weight, child.bias
        if child.track_running_stats:
            new.running_mean, new.running_var = child.running_mean, child.running_var
            new.num_batches_tracked = child.num_batches_tracked
        new.train(child.training)
        setattr(model, name, new)
    return model
