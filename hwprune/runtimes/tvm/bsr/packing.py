"""Block-sparse weights: from a masked layer to BSR (scipy's layout) and to the kernels' layout.

A :class:`SparseLayer` is one layer of a block plan: its name, kind (``linear`` or ``conv``), its
weight as the ``(O, K)`` matrix (a conv's weight as ``(C_out, C_in·kh·kw)``, im2col order), the
block shape, and the kept blocks as BSR arrays in scipy's convention (``data (nnz, R, C)``,
``indices`` = block column, ``indptr`` per block row). Edge blocks are padded with zeros to a full
block; ``padded_shape`` is the BSR matrix's shape, ``shape`` the layer's.

Example:
    >>> from hwprune.apply.plan import Plan
    >>> from hwprune.graph.blocks import block_groups
    >>> from hwprune.target import load_target
    >>> net = nn.Sequential(nn.Linear(32, 48), nn.ReLU(), nn.Linear(48, 10))
    >>> groups, _ = block_groups(net, torch.zeros(1, 32), load_target("host-cpu"))
    >>> layers = sparse_layers(net, Plan.from_groups(groups, {"0": np.arange(24)}, (1, 32)))   # 24 of 96 blocks
    >>> layers[0].to_scipy()
    <Block Sparse Row sparse matrix of dtype 'float32' with 384 stored elements (blocksize=16x1) and shape (48, 32)>
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn


@dataclass
class SparseLayer:
    """One block-sparse layer. ``conv`` holds the conv geometry (kernel, stride, padding, dilation)."""

    name: str
    kind: str
    weight_shape: tuple[int, ...]
    block: tuple[int, int]
    data: np.ndarray  # (nnz, R, C) float32
    indices: np.ndarray  # (nnz,) int32, block column
    indptr: np.ndarray  # (block rows + 1,) int32
    bias: np.ndarray | None = None
    conv: dict[str, Any] | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.weight_shape[0]), int(np.prod(self.weight_shape[1:]))

    @property
    def grid(self) -> tuple[int, int]:
        (o, k), (r, c) = self.shape, self.block
        return -(-o // r), -(-k // c)

    @property
    def padded_shape(self) -> tuple[int, int]:
        (gr, gc), (r, c) = self.grid, self.block
        return gr * r, gc * c

    @property
    def nnz_blocks(self) -> int:
        return int(len(self.indices))

    @property
    def density(self) -> float:
        gr, gc = self.grid
        return self.nnz_blocks / (gr * gc)

    @property
    def is_pointwise(self) -> bool:
        """A linear layer or a 1x1 conv with stride 1 and no padding: no im2col needed."""
        if self.kind == "linear":
            return True
        c = self.conv
        return tuple(c["kernel"]) == (1, 1) and tuple(c["stride"]) == (1, 1) and tuple(c["padding"]) == (0, 0)

    @classmethod
    def from_dense(cls, name: str, kind: str, weight: np.ndarray, block: tuple[int, int], keep: np.ndarray | None = None,
                   **kwargs) -> "SparseLayer":
        """Pack a weight; ``keep`` is a boolean ``(block rows, block cols)`` grid (default: non-zero blocks).

        Example:
            >>> w = np.zeros((32, 4), np.float32); w[:16, 1] = 1
            >>> SparseLayer.from_dense("fc", "linear", w, (16, 1)).indices
            array([1], dtype=int32)
        """
        weight = np.asarray(weight, dtype=np.float32)
        o, k = weight.shape[0], int(np.prod(weight.shape[1:]))
        r, c = block
        gr, gc = -(-o // r), -(-k // c)
        padded = np.zeros((gr * r, gc * c), np.float32)
        padded[:o, :k] = weight.reshape(o, k)
        blocks = padded.reshape(gr, r, gc, c).transpose(0, 2, 1, 3)  # (gr, gc, R, C)
        if keep is None:
            keep = np.abs(blocks).sum(axis=(2, 3)) > 0
        keep = np.asarray(keep, dtype=bool)
        if keep.shape != (gr, gc):
            raise ValueError(f"layer '{name}': block mask is {keep.shape}, expected the {gr}x{gc} block grid")
        rows, cols = np.nonzero(keep)
        indptr = np.concatenate([[0], np.cumsum(keep.sum(axis=1))]).astype(np.int32)
        return cls(name, kind, tuple(int(s) for s in weight.shape), (r, c), np.ascontiguousarray(blocks[rows, cols]),
                   cols.astype(np.int32), indptr, **kwargs)

    def to_dense(self) -> np.ndarray:
        """The weight matrix ``(O, K)`` (zeros where blocks were dropped)."""
        (gr, gc), (r, c) = self.grid, self.block
        blocks = np.zeros((gr, gc, r, c), np.float32)
        rows = np.repeat(np.arange(gr), np.diff(self.indptr))
        blocks[rows, self.indices] = self.data
        o, k = self.shape
        return blocks.transpose(0, 2, 1, 3).reshape(gr * r, gc * c)[:o, :k]

    def to_scipy(self):
        """scipy BSR matrix of ``padded_shape`` (CSR for 1x1 blocks)."""
        import scipy.sparse as sp

        if self.block == (1, 1):
            return sp.csr_matrix((self.data.reshape(-1), self.indices, self.indptr), shape=self.padded_shape)
        return sp.bsr_matrix((self.data, self.indices, self.indptr), shape=self.padded_shape)

    def kernel_arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(data (nnz, C, R), indices, indptr)`` for :mod:`hwprune.runtimes.tvm.bsr.kernels`.

        The R rows of one block column are contiguous (one vector load). A layer whose blocks were all
        dropped stores one explicit zero block, so that no buffer is empty.
        """
        data, indices, indptr = self.data.transpose(0, 2, 1), self.indices, self.indptr
        if len(indices) == 0:
            r, c = self.block
            data = np.zeros((1, c, r), np.float32)
            indices = np.zeros(1, np.int32)
            indptr = np.ones_like(self.indptr)
            indptr[0] = 0
        return np.ascontiguousarray(data, dtype=np.float32), indices.astype(np.int32), indptr.astype(np.int32)

    def manifest(self) -> dict[str, Any]:
        """The JSON description of the layer (shapes, format, block, density, conv geometry)."""
        return {
            "layer": self.name, "kind": self.kind, "weight_shape": list(self.weight_shape), "shape": list(self.shape),
            "padded_shape": list(self.padded_shape), "format": "csr" if self.block == (1, 1) else "bsr",
            "block": list(self.block), "blocks": self.grid[0] * self.grid[1], "nnz_blocks": self.nnz_blocks,
            "density": self.density, "bias": self.bias is not None, **({"conv": self.conv} if self.conv else {}),
        }


def conv_geometry(module: nn.Conv2d) -> dict[str, Any]:
    """Kernel, stride, padding and dilation of a conv (the im2col the BSR kernel needs)."""
    if isinstance(module.padding, str):
        raise ValueError(f"conv padding '{module.padding}' is not supported for block export; give explicit numbers")
    return {"kernel": list(module.kernel_size), "stride": list(module.stride), "padding": list(module.padding),
            "dilation": list(module.dilation), "in_channels": module.in_channels}


@torch.no_grad()
def sparse_layers(model: nn.Module, plan) -> list[SparseLayer]:
    """The block-sparse layers of ``model`` (already masked to ``plan``), packed with the plan's kept
    blocks (a kept block that happens to be all zero is still stored: the plan is the structure).

    Example:
        >>> [l.name for l in sparse_layers(model, Plan.load("runs/x/plan.json"))]   # doctest: +SKIP
        ['conv1', 'layers.0.0.conv1', ...]
    """
    from ....graph.blocks import groups_from_plan
    from ....errors import PlanError

    if plan.granularity != "blocks":
        raise PlanError("this plan prunes channels (the model is sliced, not block-sparse); "
                        "sparse formats need a block plan: hwprune fit --granularity blocks")
    keep = plan.keep_by_group()
    out = []
    for g in groups_from_plan(model, plan):
        module = model.get_submodule(g.name)
        w = module.weight.detach().cpu().numpy()
        bias = module.bias.detach().cpu().numpy().astype(np.float32) if module.bias is not None else None
        conv = conv_geometry(module) if g.layer_kind == "conv" else None
        out.append(SparseLayer.from_dense(g.name, g.layer_kind, w, g.block, g.block_mask(keep[g.name]),
                                          bias=bias, conv=conv))
    return out
