"""Tracing a model into an fx graph with shapes, with errors that name the module and the op.

Leaves (modules fx records as one call instead of tracing into):

* built-in torch.nn layers and the user's excluded modules;
* instances of the layer types hwprune knows (:data:`hwprune.graph.ops.MODULE_HANDLERS`), subclasses
  included: model libraries write their convs as ``nn.Conv2d`` subclasses with their own ``forward``
  (same padding, weight standardisation), and tracing into them would leave ``F.conv2d`` on a
  parameter. Whether such a layer keeps the standard channel semantics is checked numerically
  (:mod:`hwprune.graph.leaves`);
* modules whose ``forward`` fx cannot trace (a jit-scripted activation such as geffnet's
  ``HardSwishMe``, data-dependent Python): tracing is retried with every module of that class as a
  leaf, and the walk probes what it does to channels. (A custom autograd function is traced: fx
  records the ops of its ``forward``.)

Everything else is traced through, so a custom block made of convs and adds is understood without help.
"""

from __future__ import annotations

import fnmatch

import torch
import torch.fx as fx
from torch import nn

from ..errors import ModelError


class _Tracer(fx.Tracer):
    """fx tracer that treats excluded modules as leaves and remembers where tracing failed."""

    def __init__(self, leaves: set[str], leaf_types: tuple[type, ...] = ()):
        super().__init__()
        self.leaves = leaves
        self.leaf_types = leaf_types
        self.path: list[tuple[str, str]] = []
        self.failed_at: tuple[str, str] | None = None
        self.failed_module: nn.Module | None = None

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        from .ops import known_layer_types

        return (qualname in self.leaves or isinstance(m, known_layer_types()) or isinstance(m, self.leaf_types)
                or super().is_leaf_module(m, qualname))

    def call_module(self, m, forward, args, kwargs):
        name = self.path_of_module(m)
        self.path.append((name, type(m).__name__))
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_at is None:  # the innermost module is where tracing broke
                self.failed_at = self.path[-1]
                self.failed_module = m
            raise
        finally:
            self.path.pop()


def resolve_excludes(model: nn.Module, patterns) -> set[str]:
    """Module names matched by the user's exclude patterns (exact names or shell globs).

    Every pattern that matches no module is reported at once, with a few valid names.

    Example:
        >>> resolve_excludes(nn.Sequential(nn.Linear(2, 2)), ["0"])
        {'0'}
    """
    names = [n for n, _ in model.named_modules() if n]
    matched: set[str] = set()
    misses = []
    for pat in patterns or ():
        hits = [n for n in names if n == pat or fnmatch.fnmatchcase(n, pat)]
        if not hits:
            misses.append(pat)
        matched.update(hits)
    if misses:
        sample = ", ".join(names[:8]) + (", ..." if len(names) > 8 else "")
        raise ModelError(
            f"exclude: {len(misses)} name(s) match no layer of the model: {', '.join(misses)}. "
            f"Layer names look like: {sample}"
        )
    # An excluded module hides everything inside it; keep only the outermost ones.
    return {n for n in matched if not any(n.startswith(o + ".") for o in matched if o != n)}


# A model whose classes fail one by one is retried this many times at most (one class per retry).
MAX_LEAF_RETRIES = 16


def _symbolic_trace(model: nn.Module, exclude: set[str] = frozenset()):
    """fx-trace ``model`` with hwprune's leaves, retrying with each failing module's class as a leaf.

    Returns ``(graph, root, untraced)``; raises :class:`ModelError` naming the layer when the model
    itself (or a class already made a leaf) cannot be traced.
    """
    leaf_types: tuple[type, ...] = ()
    untraced: dict[str, str] = {}
    while True:  # each pass either returns, raises, or makes one more class a leaf (at most MAX_LEAF_RETRIES)
        tracer = _Tracer(set(exclude), leaf_types)
        try:
            return tracer.trace(model), tracer.root, untraced
        except ModelError:
            raise
        except Exception as e:  # fx raises TraceError, TypeError, NotImplementedError, ...
            where = tracer.failed_at or ("(top level)", type(model).__name__)
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            failed = tracer.failed_module
            if where[0] == "(top level)":  # the model's own forward: there is no layer to exclude
                raise ModelError(
                    f"cannot trace the model's own forward ({where[1]}): {reason}. hwprune follows channels "
                    f"through torch.fx, which cannot trace data-dependent control flow (an `if` or loop on a "
                    f"tensor's value) in forward itself. Move that code into a submodule (hwprune then treats "
                    f"it as one layer and keeps its channels) or write it without Python control flow "
                    f"(e.g. torch.where)"
                ) from None
            if failed is None or failed is model or type(failed) in leaf_types or len(leaf_types) >= MAX_LEAF_RETRIES:
                raise ModelError(
                    f"cannot trace layer '{where[0]}' ({where[1]}): {reason}. hwprune follows channels through "
                    f"torch.fx; data-dependent control flow is not traceable. Exclude the layer to keep it "
                    f"unpruned (--exclude {where[0]})"
                ) from None
            leaf_types += (type(failed),)
            untraced[type(failed).__name__] = reason


def trace_graph(model: nn.Module) -> fx.Graph | None:
    """The model's fx graph with the same leaves as :func:`trace` (known layer types, their library
    subclasses, modules fx cannot trace), without shapes; None if it cannot be traced. For analyses
    that read the graph's structure (which BatchNorm follows which conv).

    Example:
        >>> [n.op for n in trace_graph(nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4))).nodes]
        ['placeholder', 'call_module', 'call_module', 'output']
    """
    try:
        return _symbolic_trace(model)[0]
    except ModelError:
        return None


def trace(model: nn.Module, example_inputs: tuple, exclude: set[str] = frozenset()) -> fx.GraphModule:
    """Symbolically trace ``model`` and propagate shapes from ``example_inputs`` (model untouched).

    A submodule whose ``forward`` cannot be traced becomes a leaf (with every module of its class) and
    the trace is retried; the failure is kept in ``gm.meta["untraced"]`` ({class name: reason}) so that
    the walk can say why it treats that layer as a black box.

    Example:
        >>> gm = trace(nn.Sequential(nn.Conv2d(1, 4, 3)), (torch.zeros(1, 1, 8, 8),))
        >>> [n.op for n in gm.graph.nodes]
        ['placeholder', 'call_module', 'output']
    """
    graph, root, untraced = _symbolic_trace(model, exclude)
    gm = fx.GraphModule(root, graph, type(model).__name__)
    gm.meta["untraced"] = untraced
    _propagate_shapes(gm, model, example_inputs)
    return gm


class _ShapeProp(fx.Interpreter):
    """torch.fx's ShapeProp without its printed traceback: records ``tensor_meta`` on every node, and
    names the node that failed."""

    failed: fx.Node | None = None

    def run_node(self, n: fx.Node):
        from torch.fx.node import map_aggregate
        from torch.fx.passes.shape_prop import _extract_tensor_metadata

        try:
            result = super().run_node(n)
        except Exception:
            self.failed = n
            raise
        found = []

        def meta(obj):
            if isinstance(obj, torch.Tensor):
                found.append(True)
                return _extract_tensor_metadata(obj)
            return obj

        m = map_aggregate(result, meta)
        if found:
            n.meta["tensor_meta"] = m
        return result


def _describe_node(node: fx.Node, model: nn.Module) -> str:
    """Where a node is, for a user: the layer it calls or was traced inside, and its op."""
    if node.op == "call_module":
        return f"layer '{node.target}' ({type(model.get_submodule(str(node.target))).__name__})"
    where = module_of(node)
    op = f"Tensor.{node.target}" if node.op == "call_method" else getattr(node.target, "__name__", str(node.target))
    return f"op '{op}' in layer '{where}'" if where else f"op '{op}' in the model's own forward"


def _propagate_shapes(gm: fx.GraphModule, model: nn.Module, example_inputs: tuple) -> None:
    was_training = [(m, m.training) for m in model.modules()]
    model.eval()  # BN must not update its running statistics during the shape pass
    interp = _ShapeProp(gm)
    try:
        with torch.no_grad():
            interp.run(*example_inputs)
    except Exception as e:
        shapes = ", ".join(str(tuple(x.shape)) for x in example_inputs if isinstance(x, torch.Tensor))
        where = f" at {_describe_node(interp.failed, model)}" if interp.failed is not None else ""
        # fx adds "While executing %node ..." to the message: the layer is named above instead
        detail = " ".join(str(e).split("While executing")[0].split()) or type(e).__name__
        raise ModelError(
            f"running the model on an example input of shape {shapes} (one input from the data) failed{where}: "
            f"{type(e).__name__}: {detail}. The model must accept the data's inputs: build it for this shape "
            f"(a model function gets in_channels, num_classes and input_size from the data when it accepts "
            f"them; --image-size changes the images' side), or choose data that fits the model"
        ) from None
    finally:
        for m, t in was_training:
            m.train(t)


def module_of(node: fx.Node) -> str:
    """The innermost module a node was traced inside ('' for the top level)."""
    if node.op == "call_module":
        return str(node.target)
    stack = node.meta.get("nn_module_stack") or {}
    if stack:
        return list(stack.values())[-1][0] if isinstance(list(stack.values())[-1], tuple) else list(stack)[-1]
    return ""


def shape_of(node) -> tuple[int, ...] | None:
    meta = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
    if meta is None or not hasattr(meta, "shape"):
        return None
    return tuple(int(s) for s in meta.shape)
