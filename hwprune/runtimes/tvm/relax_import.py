"""A torch model as a Relax module, with its parameters named after the torch parameters.

Shared by the TVM exporters (the BSR export here; the dense TVM path can use the same import). The
model goes through ``torch.export`` and TVM's ``from_exported_program`` with the parameters kept as
function inputs, so that a later pass can find the Relax variable of each torch parameter (and
rewrite what uses it) before the remaining ones are bound as constants.

TVM is imported inside the functions: ``import hwprune`` does not need it.

Example:
    >>> from collections import OrderedDict
    >>> net = nn.Sequential(OrderedDict(conv=nn.Conv2d(3, 8, 3), pool=nn.AdaptiveAvgPool2d(1), flat=nn.Flatten(),
    ...                                 fc=nn.Linear(8, 10)))
    >>> imported = import_torch(net.eval(), torch.zeros(1, 3, 8, 8))
    >>> imported.var_of["fc.weight"]
    'p_fc_weight'
    >>> mod = imported.bound()                                                # every parameter a constant
    >>> len(imported.mod["main"].params), len(mod["main"].params)    # input + 4 parameters, then the input alone
    (5, 1)
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ...errors import HwpruneError
from .build import require_tvm


@dataclass
class ImportedModel:
    """A Relax module whose ``main`` takes ``(input, *params)``; ``params`` by Relax variable name,
    and ``var_of``: torch parameter/buffer name -> Relax variable name."""

    mod: object
    params: dict[str, np.ndarray]
    var_of: dict[str, str]
    input_shape: tuple[int, ...]  # of the first input
    n_inputs: int = 1

    def bound(self, mod=None):
        """``mod`` (default: the imported one) with every remaining parameter bound as a constant and
        unused bindings removed."""
        from tvm import relax

        mod = self.mod if mod is None else mod
        names = {p.name for p in mod["main"].params[self.n_inputs:]}
        consts = {k: v for k, v in self.params.items() if k in names}
        mod = relax.transform.BindParams("main", consts)(mod)
        return relax.transform.DeadCodeElimination(["main"])(mod)


def import_torch(model: nn.Module, example) -> ImportedModel:
    """Trace ``model`` (eval mode, static shapes of ``example``: one tensor or a tuple of the model's
    positional inputs) into Relax, parameters kept as inputs after the model's own.

    Batch norms are decomposed into elementwise ops (``DecomposeOpsForInference``).
    """
    require_tvm()
    from tvm import relax
    from tvm.relax.frontend.torch import from_exported_program

    model = model.eval()
    args = tuple(example) if isinstance(example, (tuple, list)) else (example,)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with torch.no_grad():
                ep = torch.export.export(model, args)
            # torch's decomposition runs first (1-2 s): without it the frontend's own eval-mode batch_norm
            # was wrong in TVM 0.27 (conv + BN: max |diff| 0.28 against torch; with it, 2e-7).
            mod = from_exported_program(ep, keep_params_as_input=True, unwrap_unit_return_tuple=True)
    except Exception as e:  # torch.export / the frontend raise many types; name the step that failed
        raise HwpruneError(f"importing the model into TVM Relax failed: {type(e).__name__}: "
                           f"{str(e).splitlines()[0] if str(e) else ''}") from None
    mod, params = relax.frontend.detach_params(mod)
    mod = relax.transform.DecomposeOpsForInference()(mod)
    sig = ep.graph_signature
    fqn = {**sig.inputs_to_parameters, **sig.inputs_to_buffers}
    names = [p.name for p in mod["main"].params[len(args):]]
    values = {n: v.numpy() for n, v in zip(names, params["main"])}
    return ImportedModel(mod, values, {fqn[n]: n for n in names if n in fqn}, tuple(args[0].shape), len(args))
