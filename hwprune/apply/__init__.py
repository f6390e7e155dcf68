"""Apply a plan to a model: slice the removed units out (:mod:`.slicing`, with per-layer resizers in
:mod:`.resizers`), replay a saved plan (:mod:`.plan`), reload sliced weights (:mod:`.reload`,
:mod:`.hf`)."""

from . import attention, hf  # noqa: F401  (register the nn.MultiheadAttention resizer and the BERT fix-up)
