"""Distilling a pruned sentence encoder from its dense self, on real sentences.

The dense model is the teacher; the student is the model being pruned (it starts as a copy). The
loss, per batch of training sentences:

* the mean squared difference of every layer's hidden states, student against teacher, over the real
  tokens (the residual stream is never pruned, so the shapes match layer by layer and each pruned
  block is told what its dense self produced);
* plus ``cosine_weight · (1 − cos)`` between the pooled sentence embeddings, the quantity reported.

The teacher's hidden states of the training sentences are computed once and kept in float16 (about
120 MB for the 1,344 training sentences of the Python documentation): each step then costs one
student forward and backward. The held-out sentences are never trained on; the reported quality is
measured on them (:mod:`hwprune.text.quality`).

Example:
    >>> model, tok = load_minilm()                                            # doctest: +SKIP
    >>> task = SentenceDistillTask(model, tok, train_sentences, held_out)     # doctest: +SKIP
    >>> hwprune.fit(model, task, target="host-cpu", sparsity=0.5)            # doctest: +SKIP
"""

from __future__ import annotations

import copy
import os
import time
import zlib
from typing import Any

import numpy as np
import torch
from torch import nn

from ..text.minilm import SentenceEncoder, mean_pool
from ..text.quality import embedding_quality
from ..training.loop import EpochStats, optimizer_step, set_lr
from .base import Task

LATENCY_SEQ_LEN = 128  # the latency setting: sequence length 128 at batch 1 and 8


class SentenceDistillTask(Task):
    """Layer-wise distillation of a BERT-style sentence encoder from its dense copy.

    ``model``: the dense encoder (a copy becomes the frozen teacher); ``tokenizer``: its tokenizer;
    ``train``/``held_out``: lists of sentences.
    """

    name = "sentence-distillation"
    metric = "mean_cosine"
    metric_label = "held-out cosine"
    latency_batch_sizes = (1, 8)

    def __init__(self, model: nn.Module, tokenizer, train: list[str], held_out: list[str], *,
                 max_length: int = 128, cosine_weight: float = 10.0, eval_batch: int = 64, corpus: str = ""):
        self.tokenizer = tokenizer
        self.train_sentences, self.held_out = list(train), list(held_out)
        self.max_length, self.cosine_weight, self.eval_batch = max_length, cosine_weight, eval_batch
        self.corpus = corpus
        self.train_ids = [self._ids(s) for s in self.train_sentences]
        self.eval_ids = [self._ids(s) for s in self.held_out]
        teacher = copy.deepcopy(model).eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
        self.teacher_hidden = self._teacher_states(teacher)  # per sentence: (layers, tokens, hidden) fp16
        self.dense_embeddings = self.embed(teacher, self.eval_ids)
        # One real sentence padded to the latency length: FLOPs per sequence of 128 tokens.
        ids, mask = self._pad([self.eval_ids[0]], LATENCY_SEQ_LEN)
        self.example = (ids, mask)

    # --- data ---------------------------------------------------------------------------------
    def _ids(self, sentence: str) -> list[int]:
        return self.tokenizer(sentence, truncation=True, max_length=self.max_length)["input_ids"]

    def _pad(self, seqs: list[list[int]], length: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        length = length or max(len(s) for s in seqs)
        pad = self.tokenizer.pad_token_id or 0
        ids = torch.full((len(seqs), length), pad, dtype=torch.long)
        mask = torch.zeros((len(seqs), length), dtype=torch.long)
        for i, s in enumerate(seqs):
            s = s[:length]
            ids[i, : len(s)] = torch.as_tensor(s)
            mask[i, : len(s)] = 1
        return ids, mask

    def _length_batches(self, indices: np.ndarray, batch_size: int) -> list[np.ndarray]:
        """Batches of similar length (less padding): sort each window of 8 batches by length."""
        out = []
        window = batch_size * 8
        for start in range(0, len(indices), window):
            chunk = indices[start : start + window]
            chunk = chunk[np.argsort([len(self.train_ids[i]) for i in chunk], kind="stable")]
            out += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
        return out

    @torch.no_grad()
    def _teacher_states(self, teacher: nn.Module) -> list[torch.Tensor]:
        states = []
        order = self._length_batches(np.arange(len(self.train_ids)), self.eval_batch)
        per_sentence: dict[int, torch.Tensor] = {}
        for batch in order:
            ids, mask = self._pad([self.train_ids[i] for i in batch])
            hs = teacher(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[1:]
            stacked = torch.stack(hs, 1)  # (N, layers, L, D)
            for j, i in enumerate(batch):
                per_sentence[int(i)] = stacked[j, :, : len(self.train_ids[i])].to(torch.float16).clone()
        states = [per_sentence[i] for i in range(len(self.train_ids))]
        return states

    @torch.no_grad()
    def embed(self, model: nn.Module, seqs: list[list[int]]) -> torch.Tensor:
        """Sentence embeddings (normalized mean pooling) of token id lists, in order."""
        was = model.training
        model.eval()
        out = []
        try:
            for start in range(0, len(seqs), self.eval_batch):
                ids, mask = self._pad(seqs[start : start + self.eval_batch])
                out.append(mean_pool(model(input_ids=ids, attention_mask=mask).last_hidden_state, mask))
        finally:
            model.train(was)
        return torch.cat(out)

    # --- training -----------------------------------------------------------------------------
    def steps_per_epoch(self, settings) -> int:
        return -(-len(self.train_ids) // settings.batch_size)

    def make_optimizer(self, model, settings, no_decay=(), extra_groups=(), special_groups=()):
        """AdamW: SGD recovers a pruned transformer far more slowly. The token and position embeddings
        are frozen: they are 11.7M of MiniLM's 22.7M parameters, nothing prunes them, and their
        gradients cost as much as the rest of a step."""
        emb = getattr(model, "embeddings", None)
        if emb is not None:
            for p in emb.parameters():
                p.requires_grad_(False)
        skip = {id(t) for t in no_decay}
        special = {id(p) for g in special_groups for p in g["params"]}  # own settings: not in the default groups
        params = [p for p in model.parameters() if p.requires_grad and id(p) not in special]
        decay = [p for p in params if p.dim() > 1 and id(p) not in skip]
        plain = [p for p in params if p.dim() <= 1 or id(p) in skip]
        groups = [{"params": decay, "weight_decay": settings.weight_decay}, {"params": plain, "weight_decay": 0.0}]
        groups += [dict(g) for g in special_groups] + list(extra_groups)
        return torch.optim.AdamW([g for g in groups if g["params"]], lr=settings.lr)

    def loss(self, model: nn.Module, batch: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss, per-sentence cosine to the teacher's embedding) for a batch of training indices."""
        ids, mask = self._pad([self.train_ids[i] for i in batch])
        length = ids.shape[1]
        target = torch.zeros((len(batch),) + self.teacher_hidden[0].shape[:1] + (length, self.teacher_hidden[0].shape[-1]))
        for j, i in enumerate(batch):
            t = self.teacher_hidden[int(i)]
            target[j, :, : t.shape[1]] = t.float()
        out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        student = torch.stack(out.hidden_states[1:], 1)  # (N, layers, L, D)
        m = mask[:, None, :, None].to(student.dtype)
        mse = ((student - target).pow(2) * m).sum() / (m.sum() * student.shape[1] * student.shape[-1])
        cos = (mean_pool(out.last_hidden_state, mask) * mean_pool(target[:, -1], mask)).sum(-1)
        return mse * student.shape[1] + self.cosine_weight * (1 - cos).mean(), cos.detach()

    def train_epoch(self, model, optimizer, *, settings, seed, stage, epoch, lr_at, step0, regularizer=None,
                    on_step=None, device="cpu", after_backward=None):
        # The order depends only on (seed, stage, epoch), so a resumed run replays exactly.
        rng = np.random.default_rng((seed * 1_000_003 + zlib.crc32(stage.encode()) * 101 + epoch) % (2**63))
        batches = self._length_batches(rng.permutation(len(self.train_ids)), settings.batch_size)
        batches = [batches[i] for i in rng.permutation(len(batches))]
        # Eval mode while training: dropout would add noise to a regression target the student must match.
        model.eval()
        t0, step, total, cos_sum, seen = time.perf_counter(), step0, 0.0, 0.0, 0
        lr = lr_at(step)
        for batch in batches:
            lr = lr_at(step)
            set_lr(optimizer, lr)
            loss, cos = self.loss(model, batch)
            optimizer_step(loss, optimizer, step=step, lr=lr, regularizer=regularizer, on_step=on_step,
                           after_backward=after_backward)
            total += float(loss.detach()) * len(batch)
            cos_sum += float(cos.sum())
            seen += len(batch)
            step += 1
        secs = time.perf_counter() - t0
        return EpochStats(total / max(seen, 1), cos_sum / max(seen, 1), secs, seen / max(secs, 1e-9), lr)

    @torch.no_grad()
    def calibration_forward(self, model, samples: int, seed: int, device="cpu") -> None:
        """Training sentences in batches of equal length: no padding token reaches the statistics."""
        was = model.training
        model.eval()
        chosen = np.random.default_rng(seed).permutation(len(self.train_ids))[:samples]
        by_length: dict[int, list[int]] = {}
        for i in sorted(chosen.tolist()):
            by_length.setdefault(len(self.train_ids[i]), []).append(i)
        try:
            for length in sorted(by_length):
                idx = by_length[length]
                for start in range(0, len(idx), self.eval_batch):
                    ids = torch.as_tensor([self.train_ids[i] for i in idx[start : start + self.eval_batch]])
                    model(input_ids=ids.to(device), attention_mask=torch.ones_like(ids).to(device))
        finally:
            model.train(was)

    # --- quality ------------------------------------------------------------------------------
    def evaluate(self, model: nn.Module) -> float:
        """Mean cosine between the model's and the dense model's embeddings of the held-out sentences."""
        return float((self.embed(model, self.eval_ids) * self.dense_embeddings).sum(-1).mean())

    def report(self, dense: nn.Module, pruned: nn.Module) -> dict[str, Any]:
        q = embedding_quality(self.dense_embeddings, self.embed(pruned, self.eval_ids))
        return {"quality": {
            "pruned": q.to_dict(),
            "measure": "pruned vs dense sentence embeddings (mean pooling + L2 norm) of held-out sentences: "
                       "mean cosine, and Spearman correlation of all pairwise similarities",
            "corpus": self.corpus, "train_sentences": len(self.train_ids), "held_out_sentences": len(self.eval_ids),
        }}

    # --- export -------------------------------------------------------------------------------
    def export_onnx(self, model: nn.Module, path: str | os.PathLike) -> None:
        """The encoder with pooling, token ids and mask in (batch and sequence axes dynamic), embedding out."""
        from ..runtimes.onnxruntime import export_onnx
        from ..text.minilm import DYNAMIC_AXES, INPUT_NAMES, OUTPUT_NAME

        export_onnx(SentenceEncoder(model), self.example, path, input_names=INPUT_NAMES, output_name=OUTPUT_NAME,
                    dynamic_axes=DYNAMIC_AXES)

    @torch.no_grad()
    def onnx_max_abs_diff(self, path, model) -> tuple[float, int]:
        """Largest |onnxruntime − torch| over the held-out sentences (padded batches of 64)."""
        from ..runtimes.onnxruntime import ort_session

        sess = ort_session(path)
        enc = SentenceEncoder(model).eval()
        worst = 0.0
        for start in range(0, len(self.eval_ids), self.eval_batch):
            ids, mask = self._pad(self.eval_ids[start : start + self.eval_batch])
            ort = sess.run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})[0]
            worst = max(worst, float(np.max(np.abs(ort - enc(ids, mask).numpy()))))
        return worst, len(self.eval_ids)

    def latency_feeds(self, session, batch_size: int):
        """Real held-out token ids, repeated to 128 tokens, no padding."""
        flat = np.concatenate([np.asarray(s) for s in self.eval_ids])
        ids = np.stack([np.resize(np.roll(flat, -k * LATENCY_SEQ_LEN), LATENCY_SEQ_LEN) for k in range(batch_size)])
        return {"input_ids": ids.astype(np.int64), "attention_mask": np.ones_like(ids, dtype=np.int64)}
