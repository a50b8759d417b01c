"""Embeddings of headless models, and the objective that trains and scores
them without labels.

A headless model (BertModel, ViTModel, a sentence-transformers checkpoint)
has no task head, so there is no task loss to finetune, to choose `reg` or
to race on. What a user of an embedding model needs kept is which inputs it
finds similar. Parents are wider than the fused model, so their embeddings
cannot be compared coordinate by coordinate; their *similarity structure*
can: for a batch, the matrix of pairwise cosine similarities is the same
size whatever the width. The objective is the mean squared difference
between the student's similarity matrix and the teachers' mean one
(similarity-preserving distillation, Tung & Mori 2019, on pooled
embeddings); scoring adds the Pearson correlation of the two over every
pair of examples, the agreement a retrieval or STS user sees.

Pooling follows a sentence-transformers checkpoint's `1_Pooling/config.json`
when the model directory has one, else the family's EMBEDDING_POOLING
(mean over real tokens for text, the class token for ViT).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.nn.functional as F

from otcompress.errors import InvalidOptionError
from otcompress.options import CHOICES

POOLINGS = CHOICES["pooling"]
# sentence-transformers' Pooling config keys, in the order it applies them.
ST_POOLING_KEYS = {"pooling_mode_cls_token": "cls", "pooling_mode_mean_tokens": "mean",
                   "pooling_mode_max_tokens": "max", "pooling_mode_lasttoken": "last"}
EVAL_BLOCK = 512  # rows of the pairwise similarity matrix computed at once


def pooling_mode(config) -> str:
    """The family's pooling, for a checkpoint whose files do not say
    (`checkpoint_pooling`, which `pipeline.load_task_data` asks first)."""
    from otcompress.architectures import family
    return getattr(family(config), "EMBEDDING_POOLING", "mean")


def checkpoint_pooling(model_dir) -> str | None:
    """The pooling of a sentence-transformers checkpoint directory, None if it is not one."""
    if not isinstance(model_dir, (str, os.PathLike)) or not (Path(model_dir) / "modules.json").is_file():
        return None
    root = Path(model_dir)
    for module in json.loads((root / "modules.json").read_text()):
        if module.get("type", "").endswith("Pooling"):
            cfg = root / module.get("path", "") / "config.json"
            settings = json.loads(cfg.read_text()) if cfg.is_file() else {}
            chosen = [mode for key, mode in ST_POOLING_KEYS.items() if settings.get(key)]
            return chosen[0] if chosen else "mean"
    return None


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor | None, mode: str) -> torch.Tensor:
    """(batch, tokens, width) -> (batch, width), over real tokens only."""
    if mode not in POOLINGS:
        raise InvalidOptionError(f"pooling '{mode}': use one of {', '.join(POOLINGS)}")
    if mode == "cls":
        return hidden[:, 0]
    mask = (torch.ones(hidden.shape[:2], device=hidden.device) if attention_mask is None
            else attention_mask.to(hidden.device, hidden.dtype))
    if mode == "mean":
        return (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp(min=1)
    if mode == "max":
        return hidden.masked_fill(mask[..., None] == 0, float("-inf")).amax(1)
    last = (mask.sum(1).long() - 1).clamp(min=0)  # right padding: the last real token
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]


def embed(model, batch: dict, mode: str) -> torch.Tensor:
    """Pooled float embeddings of `batch` from `model`'s base (any head class
    of the family has one: a classifier teacher embeds as its encoder does)."""
    base = getattr(model, "base_model", model)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    hidden = base(**inputs).last_hidden_state
    return pool(hidden.float(), inputs.get("attention_mask"), mode)


def similarities(x: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of every row of x with every other."""
    x = F.normalize(x.float(), dim=-1)
    return x @ x.T


def similarity_loss(student: torch.Tensor, teachers: list[torch.Tensor]) -> torch.Tensor:
    """Mean squared difference of the batch's similarity matrices: the
    student's against the teachers' mean (the diagonal is 1 in both)."""
    target = torch.stack([similarities(t) for t in teachers]).mean(0)
    return F.mse_loss(similarities(student), target)


def teacher_embeddings(teachers, batch, mode) -> list[torch.Tensor]:
    """The teachers' pooled embeddings of `batch`, without gradients."""
    with torch.no_grad():
        return [embed(t, batch, mode) for t in teachers]


@torch.inference_mode()
def score(model, batches, reference, mode: str, device) -> dict:
    """The model's embeddings against the reference models' over every pair of
    distinct examples in `batches` (training and the reg sweep compare within
    a batch): "loss" (mean squared difference of the cosine similarities) and
    "similarity_pearson"; "examples" counts them."""
    if not reference:
        raise InvalidOptionError("a headless model's embeddings are scored against reference "
                                 "models (its parents or teachers); none were given")
    mine, theirs = [], [[] for _ in reference]
    for batch in batches:
        batch = {k: v.to(device) for k, v in batch.items() if k != "labels"}
        mine.append(embed(model, batch, mode).cpu())
        for acc, r in zip(theirs, reference):
            acc.append(embed(r, batch, mode).cpu())
    return _pairwise_agreement(torch.cat(mine), [torch.cat(t) for t in theirs])


def _pairwise_agreement(student: torch.Tensor, teachers: list[torch.Tensor]) -> dict:
    """Blockwise over the n x n similarity matrices (n may be large), off the
    diagonal: the mean squared difference and the Pearson correlation."""
    n = student.shape[0]
    if n < 2:
        raise InvalidOptionError("scoring embeddings needs at least 2 examples")
    s = F.normalize(student.double(), dim=-1)
    ts = [F.normalize(t.double(), dim=-1) for t in teachers]
    sums = torch.zeros(5, dtype=torch.float64)  # x, y, xx, yy, xy
    sq = 0.0
    for start in range(0, n, EVAL_BLOCK):
        rows = slice(start, min(start + EVAL_BLOCK, n))
        x = s[rows] @ s.T
        y = torch.stack([t[rows] @ t.T for t in ts]).mean(0)
        off = torch.ones_like(x, dtype=torch.bool)
        off[torch.arange(x.shape[0]), torch.arange(start, rows.stop)] = False
        x, y = x[off], y[off]
        sq += float(((x - y) ** 2).sum())
        sums += torch.stack([x.sum(), y.sum(), (x * x).sum(), (y * y).sum(), (x * y).sum()])
    pairs = n * (n - 1)
    mx, my, mxx, myy, mxy = (sums / pairs).tolist()
    var_x, var_y = mxx - mx * mx, myy - my * my
    pearson = (mxy - mx * my) / (var_x * var_y) ** 0.5 if var_x > 0 and var_y > 0 else float("nan")
    return {"loss": sq / pairs, "similarity_pearson": pearson, "examples": n}
