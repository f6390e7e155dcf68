"""Weight blocks as pruning units: the groups and index of ``hwprune fit --granularity blocks``.

A layer's weight is read as a matrix ``W`` of shape ``(O, K)``: rows are output features, columns the
input features (a linear layer's weight as it is; a conv's weight ``(C_out, C_in, kh, kw)`` as
``(C_out, C_in·kh·kw)``, the matrix an im2col convolution multiplies). The target's block shape
``R x C`` (``blocks: [R, C]`` under ``conv``/``linear``) cuts it into a grid of ``ceil(O/R) x
ceil(K/C)`` blocks; each block is one unit, and each layer is one :class:`BlockGroup` whose units are
numbered row-major over the grid (the order of BSR storage).

**Edge blocks.** When ``O`` or ``K`` is not a multiple of the block, the last block row / column
holds fewer rows / columns. They are units like the others; their size (number of weights) is
smaller, which the regularizer's size weighting takes into account. Exported, they are padded with
zeros to a full block (BSR needs whole blocks) and the padding is never read or written by the kernels.

**Which layers.** ``nn.Linear`` and ``nn.Conv2d`` with ``groups == 1`` (1x1 and k x k convs; k x k
through the im2col matrix). Not blocked: grouped and depthwise convs (their weight is block-diagonal
in im2col form and tiny), other layer types, the layers that write the model output (the classifier,
kept dense by default: its rows are the classes), layers the user excludes, and layer kinds for which
the target declares no block shape. :func:`block_groups` says why for each.

:class:`BlockIndex` offers the interface of :class:`~hwprune.graph.groups.UnitIndex` (per-unit norms,
scaling, masking), so that WGSEF and :func:`~hwprune.budget.project` work on blocks unchanged. A block
plan masks: the model keeps its dense shapes with exact zero blocks; the speed comes from the
sparse export (``hwprune export --format tvm``).

Example:
    >>> from hwprune.target import load_target
    >>> net = nn.Sequential(nn.Linear(32, 48), nn.ReLU(), nn.Linear(48, 10))
    >>> groups, skipped = block_groups(net, torch.zeros(1, 32), load_target("host-cpu"))
    >>> [(g.name, g.grid, g.size) for g in groups], skipped
    ([('0', (3, 32), 96)], {'2': 'writes the model output'})
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.fx as fx
from torch import nn

from ..errors import ModelError, PlanError
from .groups import PRODUCER, KeepCounts, UnitNumbering, get_tensor

LAYER_KINDS = {nn.Linear: "linear", nn.Conv2d: "conv"}


@dataclass(eq=False)
class BlockGroup(KeepCounts):
    """The blocks of one layer's weight matrix: the units of one group.

    ``matrix`` is ``(O, K)``, ``block`` ``(R, C)``; unit ``u`` is block ``(u // Kb, u % Kb)``.
    """

    name: str
    weight_shape: tuple[int, ...]
    block: tuple[int, int]
    layer_kind: str
    blocked: str | None = None
    multiple: int = 1
    kind: str = field(default="blocks", init=False)

    @property
    def module(self) -> str:
        return self.name

    @property
    def param(self) -> str:
        return "weight"

    @property
    def matrix(self) -> tuple[int, int]:
        return int(self.weight_shape[0]), int(np.prod(self.weight_shape[1:]))

    @property
    def grid(self) -> tuple[int, int]:
        (o, k), (r, c) = self.matrix, self.block
        return -(-o // r), -(-k // c)

    @property
    def size(self) -> int:
        rows, cols = self.grid
        return rows * cols

    @property
    def layers(self) -> tuple[str, ...]:
        return (self.name,)

    @property
    def layer_kinds(self) -> frozenset[str]:
        return frozenset({self.layer_kind})

    @property
    def signature(self) -> list[str]:
        r, c = self.block
        return [f"{self.name}.weight:blocks{r}x{c}"]

    def describe(self) -> str:
        (o, k), (r, c), (gr, gc) = self.matrix, self.block, self.grid
        state = f"blocked: {self.blocked}" if self.blocked else f"{gr}x{gc} grid"
        return f"{self.name}: {self.size} blocks of {r}x{c} over a {o}x{k} {self.layer_kind} weight ({state})"

    def block_mask(self, keep) -> np.ndarray:
        """Boolean ``(block rows, block cols)`` grid: True for the kept blocks (unit indices in ``keep``)."""
        mask = np.zeros(self.size, dtype=bool)
        mask[np.asarray(keep, dtype=np.int64)] = True
        return mask.reshape(self.grid)

    def expand(self, per_block: torch.Tensor) -> torch.Tensor:
        """A per-block tensor ``(size,)`` spread over the weight's entries, in the weight's shape."""
        (o, k), (r, c), (gr, gc) = self.matrix, self.block, self.grid
        full = per_block.reshape(gr, gc).repeat_interleave(r, 0)[:o].repeat_interleave(c, 1)[:, :k]
        return full.reshape(self.weight_shape)

    def block_sq_norms(self, weight: torch.Tensor) -> torch.Tensor:
        """Sum of squares of every block, ``(size,)`` (edge blocks padded with zeros)."""
        (o, k), (r, c), (gr, gc) = self.matrix, self.block, self.grid
        w = weight.reshape(o, k)
        if gr * r != o or gc * c != k:
            w = torch.nn.functional.pad(w, (0, gc * c - k, 0, gr * r - o))
        return w.pow(2).reshape(gr, r, gc, c).sum(dim=(1, 3)).reshape(-1)

    def block_sizes(self) -> np.ndarray:
        """Number of weights in every block (smaller at the edges), ``(size,)``."""
        (o, k), (r, c), (gr, gc) = self.matrix, self.block, self.grid
        rows = np.minimum(r, o - r * np.arange(gr))
        cols = np.minimum(c, k - c * np.arange(gc))
        return np.outer(rows, cols).reshape(-1).astype(np.float64)


def output_layers(gm: fx.GraphModule) -> set[str]:
    """Conv / linear layers whose output reaches the model output through parameter-free ops only."""
    modules = dict(gm.named_modules())
    found: set[str] = set()
    seen: set[fx.Node] = set()
    stack = [n for n in gm.graph.nodes if n.op == "output"]
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        if node.op == "call_module" and isinstance(modules.get(str(node.target)), tuple(LAYER_KINDS) + (nn.Conv1d, nn.Conv3d)):
            found.add(str(node.target))
            continue
        stack.extend(n for n in node.all_input_nodes)
    return found


def block_groups(model: nn.Module, example_inputs, target, *, exclude=(), include_output: bool = False
                 ) -> tuple[list[BlockGroup], dict[str, str]]:
    """One :class:`BlockGroup` per blockable layer, and ``{layer: reason}`` for the layers left dense.

    ``target`` gives the block shape per layer kind (``conv``/``linear``: ``blocks: [R, C]``);
    ``exclude``: layer names or globs kept dense (a name that matches nothing is an error);
    ``include_output``: also block the layers that write the model output (the classifier).
    """
    from .hf import is_hf_model
    from .trace import resolve_excludes, trace

    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    excluded = resolve_excludes(model, exclude)
    skipped: dict[str, str] = {}
    if is_hf_model(model):  # not traceable with torch.fx: the linears of the blocks the adapters recognise
        called, outputs = _hf_block_layers(model, excluded, skipped)
    else:
        gm = trace(model, tuple(example_inputs), excluded)
        outputs = output_layers(gm)
        called = [str(n.target) for n in gm.graph.nodes if n.op == "call_module"]
    groups: list[BlockGroup] = []
    for name in dict.fromkeys(called):
        module = model.get_submodule(name)
        kind = next((k for t, k in LAYER_KINDS.items() if type(module) is t), None)
        if name in excluded or any(name.startswith(e + ".") for e in excluded):
            skipped[name] = "excluded"
            continue
        if kind is None:
            if any(p.dim() >= 2 for p in module.parameters(recurse=False)):
                skipped[name] = f"{type(module).__name__} is not blocked (Linear and Conv2d are)"
            continue
        if kind == "conv" and module.groups != 1:
            skipped[name] = "grouped/depthwise conv (block-diagonal as a matrix)"
            continue
        if name in outputs and not include_output:
            skipped[name] = "writes the model output"
            continue
        shape = target.shape_for(kind, "blocks") if target is not None else None
        if shape is None:
            skipped[name] = f"target '{getattr(target, 'name', None)}' declares no blocks for {kind} layers"
            continue
        groups.append(BlockGroup(name, tuple(module.weight.shape), (shape.rows, shape.cols), kind))
    if not groups:
        why = "; ".join(f"{k}: {v}" for k, v in list(skipped.items())[:6])
        raise ModelError(f"no layer can be cut into weight blocks ({why or 'the model has no Linear/Conv2d layers'})")
    return groups, skipped


def _hf_block_layers(model: nn.Module, excluded: set[str], skipped: dict[str, str]) -> tuple[list[str], set[str]]:
    """A transformers model's blockable layers without a trace: the linears inside the attention and
    feed-forward blocks that :mod:`hwprune.graph.hf`'s adapters recognise (Q, K, V, the attention
    output, the MLP's up and down projections), in module order. Their inputs and outputs stay inside
    a block (each block ends in a residual add and a LayerNorm), so none of them writes the model
    output. Every other layer with a weight matrix (embeddings, the pooler, a task head) stays dense,
    with the reason in ``skipped``.
    """
    from .hf import discover_by_pattern

    recognised = set(discover_by_pattern(model, excluded).layer_kind)
    names = []
    for name, module in model.named_modules():
        if name in recognised:
            names.append(name)
        elif name and any(p.dim() >= 2 for p in module.parameters(recurse=False)):
            skipped[name] = "excluded" if any(name == e or name.startswith(e + ".") for e in excluded) else (
                f"{type(module).__name__} outside the attention and MLP blocks hwprune recognises "
                "(embeddings, pooler and heads stay dense)")
    return names, set()


class BlockIndex(UnitNumbering):
    """Per-block reductions and updates, with the interface of :class:`~hwprune.graph.groups.UnitIndex`.

    Blocks of all prunable groups are numbered globally: group ``g`` owns ids
    ``offsets[g] .. offsets[g] + groups[g].size``. Blocks have one role, ``producer``: the other
    roles of channel units (consumers, BN-normalized weights, buffers) do not exist for them.

    Example:
        >>> from hwprune.target import load_target
        >>> net = nn.Sequential(nn.Linear(32, 48), nn.ReLU(), nn.Linear(48, 10))
        >>> idx = BlockIndex(net, block_groups(net, torch.zeros(1, 32), load_target("host-cpu"))[0])
        >>> idx.n_units                                      # layer 0: 48 x 32 in blocks of 16 x 1
        96
        >>> net[0].weight.data[:16, 0] = 1e-5                # block 0 nearly zero
        >>> idx.mask_(idx.sq_norms() > 1e-6)                 # zero the blocks that are nearly zero
        >>> int((net[0].weight == 0).sum())
        16
    """

    def __init__(self, model: nn.Module, groups: list[BlockGroup]):
        super().__init__(model, groups)
        for g in self.groups:
            w = self._weight(g)
            if tuple(w.shape) != tuple(g.weight_shape):
                raise ModelError(f"layer '{g.name}': weight is {tuple(w.shape)}, the block group expects {g.weight_shape}")

    def _weight(self, g: BlockGroup) -> torch.Tensor:
        return get_tensor(self.model, g.name, "weight")

    def producer_tensors(self) -> list[torch.Tensor]:
        return [self._weight(g) for g in self.groups]

    def sq_norms(self, roles: tuple[str, ...] = (PRODUCER,)) -> torch.Tensor:
        if PRODUCER not in roles or not self.groups:
            return torch.zeros(self.n_units)
        return torch.cat([g.block_sq_norms(self._weight(g).detach()) for g in self.groups])

    def sizes(self, roles: tuple[str, ...] = (PRODUCER,)) -> torch.Tensor:
        if PRODUCER not in roles or not self.groups:
            return torch.zeros(self.n_units, dtype=torch.float64)
        return torch.as_tensor(np.concatenate([g.block_sizes() for g in self.groups]))

    @torch.no_grad()
    def scale_(self, factors: torch.Tensor, roles: tuple[str, ...] = (PRODUCER,)) -> None:
        if PRODUCER not in roles:
            return
        for g, a, b in self._spans():
            w = self._weight(g)
            w.mul_(g.expand(factors[a:b].to(device=w.device, dtype=w.dtype)))

    @torch.no_grad()
    def mask_(self, keep: torch.Tensor) -> None:
        """Zero every dropped block."""
        self.scale_(keep.to(torch.float32))


def groups_from_plan(model: nn.Module, plan) -> list[BlockGroup]:
    """The block groups a block plan names, checked against ``model`` (every mismatch reported)."""
    groups, problems = [], []
    for gp in plan.groups:
        if gp.block is None:
            problems.append(f"group '{gp.name}' has no block shape")
            continue
        try:
            module = model.get_submodule(gp.name)
        except AttributeError:
            problems.append(f"layer '{gp.name}' is not in the model")
            continue
        kind = next((k for t, k in LAYER_KINDS.items() if type(module) is t), None)
        if kind is None:
            problems.append(f"layer '{gp.name}' is a {type(module).__name__}, not Linear/Conv2d")
            continue
        g = BlockGroup(gp.name, tuple(module.weight.shape), tuple(gp.block), kind)
        if g.size != gp.size:
            problems.append(f"layer '{gp.name}' has {g.size} blocks of {gp.block[0]}x{gp.block[1]} in the model, {gp.size} in the plan")
        elif g.signature != gp.members:
            problems.append(f"layer '{gp.name}': plan members {gp.members} do not match {g.signature}")
        elif gp.keep and (min(gp.keep) < 0 or max(gp.keep) >= g.size):
            problems.append(f"layer '{gp.name}' keeps blocks outside [0, {g.size})")
        else:
            groups.append(g)
    if problems:
        raise PlanError("the block plan does not fit this model: " + "; ".join(problems[:10]) + (
            f" (and {len(problems) - 10} more)" if len(problems) > 10 else ""))
    return groups


@torch.no_grad()
def mask_blocks(model: nn.Module, groups: list[BlockGroup], keep: dict[str, np.ndarray]) -> nn.Module:
    """Zero every block not in ``keep[layer]``, in place; the model keeps its shapes.

    Example:
        >>> from hwprune.target import load_target
        >>> net = nn.Sequential(nn.Linear(32, 48), nn.ReLU(), nn.Linear(48, 10))
        >>> groups, _ = block_groups(net, torch.zeros(1, 32), load_target("host-cpu"))
        >>> net = mask_blocks(net, groups, {"0": [0, 5, 7]})
        >>> int((net[0].weight != 0).sum())                # 3 blocks of 16 x 1 weights
        48
    """
    index = BlockIndex(model, [g for g in groups if g.name in keep])
    index.mask_(index.keep_from_plan(keep))
    return model


class MaskHold:
    """Keeps pruned blocks at exactly zero while the masked model is fine-tuned.

    Used where the trainer takes a regularizer: after every optimizer step it zeroes the dropped
    blocks again (the gradient and momentum would otherwise regrow them).
    """

    strength = 0.0

    def __init__(self, index: BlockIndex, keep: torch.Tensor):
        self.index, self.keep = index, keep

    def penalty(self):
        return None

    def after_step(self, lr: float, step: int) -> None:
        self.index.mask_(self.keep)

    def no_weight_decay(self) -> list[torch.Tensor]:
        return []

    def extra_parameters(self) -> list[dict]:
        return []

    def param_groups(self) -> list[dict]:
        return []

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


@torch.no_grad()
def block_stats(model: nn.Module, example_inputs, groups: list[BlockGroup], keep: dict[str, np.ndarray]) -> dict:
    """Per-layer kept blocks and what the dropped blocks save: stored weights and multiply-accumulates
    per sample (a dropped weight saves one MAC per output position of its layer).

    Example:
        >>> from hwprune.target import load_target
        >>> net = nn.Sequential(nn.Linear(32, 48), nn.ReLU(), nn.Linear(48, 10))
        >>> groups, _ = block_groups(net, torch.zeros(1, 32), load_target("host-cpu"))
        >>> stats = block_stats(net, torch.zeros(1, 32), groups, {"0": np.arange(24)})   # 24 of 96 blocks
        >>> stats["layers"][0]["density"], stats["params_removed"], stats["macs_removed"]
        (0.25, 1152, 1152.0)
    """
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    positions: dict[str, float] = {}
    hooks = []
    for g in groups:
        def hook(module, args, out, name=g.name):
            positions[name] = out.numel() / (out.shape[0] * module.weight.shape[0])
        hooks.append(model.get_submodule(g.name).register_forward_hook(hook))
    was_training = model.training
    model.eval()
    try:
        model(*example_inputs)
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    rows, params_removed, macs_removed = [], 0, 0.0
    for g in groups:
        kept = np.asarray(keep.get(g.name, np.arange(g.size)), dtype=np.int64)
        sizes = g.block_sizes()
        dropped = float(sizes.sum() - sizes[kept].sum())
        params_removed += int(dropped)
        macs_removed += dropped * positions.get(g.name, 0.0)
        rows.append({"layer": g.name, "kind": g.layer_kind, "matrix": list(g.matrix), "block": list(g.block),
                     "grid": list(g.grid), "blocks": g.size, "kept": int(len(kept)),
                     "density": len(kept) / g.size, "positions": positions.get(g.name, 0.0)})
    return {"layers": rows, "params_removed": params_removed, "macs_removed": macs_removed}

