"""hwprune: make a PyTorch model smaller and faster on a given piece of hardware.

    >>> import hwprune
    >>> target = hwprune.load_target("host-cpu")
    >>> result = hwprune.fit(model, train_loader, target=target, sparsity=0.7, test_data=test_loader)  # doctest: +SKIP
    >>> again = hwprune.hf.from_pretrained("minilm-pruned")  # a sliced transformer saved with save_pretrained  # doctest: +SKIP

Heavy backends (onnxruntime, TVM, matplotlib) are imported only when used, so ``import hwprune`` is fast.
"""

from importlib import import_module

__version__ = "0.1.0"

_LAZY = {
    "fit": ("hwprune.training.pipeline", "fit"),
    "FitConfig": ("hwprune.training.config", "FitConfig"),
    "Budget": ("hwprune.budget", "Budget"),
    "load_target": ("hwprune.target", "load_target"),
    "list_targets": ("hwprune.target", "list_targets"),
    "Target": ("hwprune.target", "Target"),
    "discover_groups": ("hwprune.graph", "discover_groups"),
    "Plan": ("hwprune.apply.plan", "Plan"),
    "apply_plan": ("hwprune.apply.plan", "apply_plan"),
    "load_pruned": ("hwprune.apply.reload", "load_pruned"),
    "slice_model": ("hwprune.apply.slicing", "slice_model"),
    "mask_model": ("hwprune.apply.slicing", "mask_model"),
}

# submodules reachable as attributes of ``hwprune`` without an import of their own (documented entry points)
_SUBMODULES = {"hf": "hwprune.apply.hf"}

__all__ = sorted(_LAZY) + sorted(_SUBMODULES) + ["__version__"]


def __getattr__(name):
    if name in _SUBMODULES:
        module = import_module(_SUBMODULES[name])
        globals()[name] = module
        return module
    if name in _LAZY:
        module, attr = _LAZY[name]
        value = getattr(import_module(module), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'hwprune' has no attribute '{name}'")


def __dir__():
    return __all__
