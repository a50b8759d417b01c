"""Test models: tiny HF ViTs and BERTs with non-trivial weights, and exact
symmetry transforms of them (unit permutations, Net2Net-style 2x widening).

The role of every parameter axis is written here independently of the
engine's architecture files, so a mistake there cannot hide in both."""
from __future__ import annotations

import re

import torch
import transformers as T

# Plain HF-initialised tiny configs for tests that need no special weights.
TINY_BERT = dict(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                 intermediate_size=64, max_position_embeddings=64)
TINY_VIT = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                image_size=8, patch_size=2, num_channels=1, num_labels=10)

VIT_ROLES = [  # regex on the parameter name -> per-axis (space, kind); kind "out" or "in"
    (r"patch_embeddings\.projection\.weight$", [("res", "out"), None, None, None]),
    (r"patch_embeddings\.projection\.bias$", [("res", "out")]),
    (r"(cls_token|position_embeddings)$", [None, None, ("res", "out")]),
    (r"\.(q|k)_proj\.weight$", [("qk", "out"), ("res", "in")]),
    (r"\.(q|k)_proj\.bias$", [("qk", "out")]),
    (r"\.v_proj\.weight$", [("v", "out"), ("res", "in")]),
    (r"\.v_proj\.bias$", [("v", "out")]),
    (r"\.o_proj\.weight$", [("res", "out"), ("v", "in")]),
    (r"\.fc1\.weight$", [("mlp", "out"), ("res", "in")]),
    (r"\.fc1\.bias$", [("mlp", "out")]),
    (r"\.fc2\.weight$", [("res", "out"), ("mlp", "in")]),
    (r"pooler\.dense\.weight$", [("pool", "out"), ("res", "in")]),
    (r"pooler\.dense\.bias$", [("pool", "out")]),
    (r"^classifier\.weight$", [None, ("res", "in")]),
    (r"^classifier\.bias$", [None]),
    (r"(\.o_proj|\.fc2|layernorm\w*)\.(weight|bias)$", [("res", "out")]),
]

BERT_ROLES = [
    (r"embeddings\.(word|position|token_type)_embeddings\.weight$", [None, ("res", "out")]),
    (r"\.(query|key)\.weight$", [("qk", "out"), ("res", "in")]),
    (r"\.(query|key)\.bias$", [("qk", "out")]),
    (r"\.value\.weight$", [("v", "out"), ("res", "in")]),
    (r"\.value\.bias$", [("v", "out")]),
    (r"attention\.output\.dense\.weight$", [("res", "out"), ("v", "in")]),
    (r"intermediate\.dense\.weight$", [("mlp", "out"), ("res", "in")]),
    (r"intermediate\.dense\.bias$", [("mlp", "out")]),
    (r"\.output\.dense\.weight$", [("res", "out"), ("mlp", "in")]),
    (r"pooler\.dense\.weight$", [("pool", "out"), ("res", "in")]),
    (r"pooler\.dense\.bias$", [("pool", "out")]),
    (r"^classifier\.weight$", [None, ("pool", "in")]),
    (r"transform\.dense\.weight$", [("res", "out"), ("res", "in")]),
    (r"decoder\.weight$", [None, ("res", "in")]),
    (r"(decoder\.bias|predictions\.bias|^classifier\.bias)$", [None]),
    (r"(output\.dense|LayerNorm|transform\.dense)\.(weight|bias)$", [("res", "out")]),
]


def roles(name: str, model_type: str):
    for pattern, r in (VIT_ROLES if model_type == "vit" else BERT_ROLES):
        if re.search(pattern, name):
            return r
    raise KeyError(f"test role table does not know {name}")


def vit(hidden=32, heads=4, inter=64, layers=2, seed=0, cls=T.ViTForImageClassification, image=8, patch=2):
    cfg = T.ViTConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                      intermediate_size=inter, image_size=image, patch_size=patch, num_channels=1,
                      num_labels=10, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return sharpen(cls(cfg), seed)


def bert(hidden=32, heads=4, inter=64, layers=2, seed=0, cls=T.BertForMaskedLM, vocab=60):
    cfg = T.BertConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers,
                       num_attention_heads=heads, intermediate_size=inter, max_position_embeddings=32,
                       num_labels=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return sharpen(cls(cfg), seed)


@torch.no_grad()
def sharpen(model, seed):
    """Re-initialise with weights that make every component matter: fan-in
    scaled matrices, Q/K scaled up (HF's std 0.02 makes attention ~uniform, which
    hides heads paired with the wrong values), non-trivial biases and LayerNorms."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if p.dim() >= 2:
            fan_in = p[0].numel() if "embeddings" not in name else 1
            p.copy_(torch.randn(p.shape, generator=g) / fan_in ** 0.5)
            if re.search(r"(q_proj|k_proj|query|key)\.weight$", name):
                p.mul_(2.5)
        elif re.search(r"(layernorm\w*|LayerNorm)\.weight$", name):
            p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))
        else:
            p.copy_(0.2 * torch.randn(p.shape, generator=g))
    return model.eval()


@torch.no_grad()
def noisy(model, scale=0.02, seed=123):
    """A copy with small parameter noise: an anchor that is not the original."""
    g = torch.Generator().manual_seed(seed)
    out = type(model)(model.config)
    sd = {k: v + scale * v.std().clamp_min(1e-3) * torch.randn(v.shape, generator=g) if v.is_floating_point() else v
          for k, v in model.state_dict().items()}
    out.load_state_dict(sd)
    return out.eval()


def _space_index(cfg, seed, widen):
    """Index tensors per unit space. Permutation: one head order shared by Q, K
    and V; within-head orders for Q/K and for V/O. Widening: every unit twice."""
    g = torch.Generator().manual_seed(seed)
    n, h, inter = cfg.hidden_size, cfg.num_attention_heads, cfg.intermediate_size
    d = n // h
    pool = n
    if widen:
        tile = lambda k: torch.arange(k).repeat(2)  # noqa: E731
        return {"res": tile(n), "qk": tile(n), "v": tile(n), "mlp": tile(inter), "pool": tile(pool)}
    heads = torch.randperm(h, generator=g)

    def within():
        return torch.cat([heads[j] * d + torch.randperm(d, generator=g) for j in range(h)])

    return {"res": torch.randperm(n, generator=g), "qk": within(), "v": within(),
            "mlp": torch.randperm(inter, generator=g), "pool": torch.randperm(pool, generator=g)}


@torch.no_grad()
def transform(model, *, widen: bool, seed=7):
    """A functionally identical copy: units permuted, or every unit duplicated
    with outgoing (input-side) weights halved. Duplicating every residual unit
    exactly twice leaves LayerNorm statistics unchanged."""
    cfg = model.config
    idx = _space_index(cfg, seed, widen)
    new_cfg = type(cfg).from_dict(cfg.to_dict())
    if widen:
        new_cfg.hidden_size *= 2
        new_cfg.num_attention_heads *= 2
        new_cfg.intermediate_size *= 2
        if getattr(new_cfg, "pooler_output_size", None):
            new_cfg.pooler_output_size *= 2
    return reindex(model, new_cfg, idx, lambda name: roles(name, cfg.model_type), halve_inputs=widen)


@torch.no_grad()
def reindex(model, new_cfg, idx, role_of, *, halve_inputs: bool, extra=None):
    """A copy of `model` (config `new_cfg`) whose every unit axis is indexed by
    `idx[space]` (`role_of(name)` gives each axis's (space, "out" | "in") or
    None); duplicated units' outgoing ("in") weights are halved when
    `halve_inputs`. `extra(name, t)` may adjust a tensor afterwards."""
    sd = {}
    for name, t in model.state_dict().items():
        for axis, role in enumerate(role_of(name)):
            if role is None:
                continue
            space, kind = role
            t = t.index_select(axis, idx[space])
            if kind == "in" and halve_inputs:
                t = t / 2
        sd[name] = extra(name, t) if extra else t
    out = type(model)(new_cfg)
    out.load_state_dict(sd)
    return out.eval()


def average(models, weights=None):
    """The right answer of fusing perfectly aligned models: a plain average."""
    weights = weights or [1 / len(models)] * len(models)
    sd = {k: sum(w * m.state_dict()[k] for w, m in zip(weights, models)) for k in models[0].state_dict()}
    out = type(models[0])(models[0].config)
    out.load_state_dict(sd)
    return out.eval()


def inputs(model, batch=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    if cfg.model_type == "vit":
        return {"pixel_values": torch.randn(batch, cfg.num_channels, cfg.image_size, cfg.image_size, generator=g)}
    ids = torch.randint(0, cfg.vocab_size, (batch, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[0, 9:] = 0  # padding must not count as samples
    return {"input_ids": ids, "attention_mask": mask,
            "token_type_ids": torch.randint(0, 2, (batch, 12), generator=g)}


@torch.no_grad()
def outputs(model, x):
    out = model(**x)
    return out.logits if hasattr(out, "logits") and out.logits is not None else out.last_hidden_state


@torch.no_grad()
def widen_head_dim(model):
    """A functionally identical copy whose heads are twice as wide (same head
    count): every unit twice, Q scaled by 1/sqrt(2) because the softmax scale
    1/sqrt(head_dim) shrinks while each score sums twice as many products."""
    cfg = model.config
    n, h, inter = cfg.hidden_size, cfg.num_attention_heads, cfg.intermediate_size
    d = n // h
    per_head = torch.cat([torch.arange(j * d, (j + 1) * d).repeat(2) for j in range(h)])
    tile = lambda k: torch.arange(k).repeat(2)  # noqa: E731
    idx = {"res": tile(n), "qk": per_head, "v": per_head, "mlp": tile(inter), "pool": tile(n)}
    new_cfg = type(cfg).from_dict(cfg.to_dict())
    new_cfg.hidden_size *= 2
    new_cfg.intermediate_size *= 2
    def scale_q(name, t):
        return t / 2 ** 0.5 if re.search(r"(q_proj|query)\.(weight|bias)$", name) else t
    return reindex(model, new_cfg, idx, lambda name: roles(name, cfg.model_type), halve_inputs=True,
                   extra=scale_q)


# --------------------------------------------------------------------------- RoBERTa and DistilBERT
# Appended for tests/test_families.py; the helpers above are unchanged. These
# families have their own parameter names and config keys, so they get their
# own role tables, widths, sharpening and transform, written (like the tables
# above) from the models' own structure, not from the engine's files.

ROBERTA_ROLES = [
    (r"embeddings\.(word|position|token_type)_embeddings\.weight$", [None, ("res", "out")]),
    (r"\.(query|key)\.weight$", [("qk", "out"), ("res", "in")]),
    (r"\.(query|key)\.bias$", [("qk", "out")]),
    (r"\.value\.weight$", [("v", "out"), ("res", "in")]),
    (r"\.value\.bias$", [("v", "out")]),
    (r"attention\.output\.dense\.weight$", [("res", "out"), ("v", "in")]),
    (r"intermediate\.dense\.weight$", [("mlp", "out"), ("res", "in")]),
    (r"intermediate\.dense\.bias$", [("mlp", "out")]),
    (r"\.output\.dense\.weight$", [("res", "out"), ("mlp", "in")]),
    (r"pooler\.dense\.weight$", [("pool", "out"), ("res", "in")]),
    (r"pooler\.dense\.bias$", [("pool", "out")]),
    (r"^classifier\.dense\.weight$", [("pool", "out"), ("res", "in")]),
    (r"^classifier\.dense\.bias$", [("pool", "out")]),
    (r"^classifier\.out_proj\.weight$", [None, ("pool", "in")]),
    (r"^lm_head\.dense\.weight$", [("res", "out"), ("res", "in")]),
    (r"^lm_head\.decoder\.weight$", [None, ("res", "in")]),
    (r"^(lm_head\.decoder\.bias|lm_head\.bias|classifier\.out_proj\.bias)$", [None]),
    (r"(output\.dense|LayerNorm|lm_head\.dense|lm_head\.layer_norm)\.(weight|bias)$", [("res", "out")]),
]

DISTILBERT_ROLES = [
    (r"embeddings\.(word|position)_embeddings\.weight$", [None, ("res", "out")]),
    (r"\.(q_lin|k_lin)\.weight$", [("qk", "out"), ("res", "in")]),
    (r"\.(q_lin|k_lin)\.bias$", [("qk", "out")]),
    (r"\.v_lin\.weight$", [("v", "out"), ("res", "in")]),
    (r"\.v_lin\.bias$", [("v", "out")]),
    (r"\.out_lin\.weight$", [("res", "out"), ("v", "in")]),
    (r"\.lin1\.weight$", [("mlp", "out"), ("res", "in")]),
    (r"\.lin1\.bias$", [("mlp", "out")]),
    (r"\.lin2\.weight$", [("res", "out"), ("mlp", "in")]),
    (r"^pre_classifier\.weight$", [("pool", "out"), ("res", "in")]),
    (r"^pre_classifier\.bias$", [("pool", "out")]),
    (r"^classifier\.weight$", [None, ("pool", "in")]),
    (r"^vocab_transform\.weight$", [("res", "out"), ("res", "in")]),
    (r"^vocab_projector\.weight$", [None, ("res", "in")]),
    (r"^(vocab_projector|classifier)\.bias$", [None]),
    (r"(out_lin|lin2|layer_norm|LayerNorm|vocab_transform)\.(weight|bias)$", [("res", "out")]),
]

FAMILY_ROLES = {"roberta": ROBERTA_ROLES, "distilbert": DISTILBERT_ROLES}
# Config keys of (hidden, heads, MLP width) per family: what 2x widening doubles.
FAMILY_WIDTHS = {"roberta": ("hidden_size", "num_attention_heads", "intermediate_size"),
                 "distilbert": ("dim", "n_heads", "hidden_dim")}
FAMILY_QK = r"(query|key|q_lin|k_lin)\.weight$"
FAMILY_NORM = r"(LayerNorm|layer_norm)\.weight$"


def family_roles(name: str, model_type: str):
    for pattern, r in FAMILY_ROLES[model_type]:
        if re.search(pattern, name):
            return r
    raise KeyError(f"test role table does not know {name}")


def roberta(hidden=32, heads=4, inter=64, layers=2, seed=0, cls=T.RobertaForMaskedLM, vocab=60, tie=True):
    cfg = T.RobertaConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers,
                          num_attention_heads=heads, intermediate_size=inter, max_position_embeddings=34,
                          num_labels=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                          tie_word_embeddings=tie)
    return sharpen_family(cls(cfg), seed)


def distilbert(hidden=32, heads=4, inter=64, layers=2, seed=0, cls=T.DistilBertForMaskedLM, vocab=60, tie=True):
    cfg = T.DistilBertConfig(vocab_size=vocab, dim=hidden, n_layers=layers, n_heads=heads, hidden_dim=inter,
                             max_position_embeddings=32, num_labels=3, dropout=0.0, attention_dropout=0.0,
                             seq_classif_dropout=0.0, tie_word_embeddings=tie)
    return sharpen_family(cls(cfg), seed)


@torch.no_grad()
def sharpen_family(model, seed):
    """`sharpen` for these families' names: fan-in scaled matrices, Q/K 2.5x
    that (std 2.5/sqrt(32) = 0.44 at width 32, 22x HF's 0.02: peaked
    attention), LayerNorm gains 1 +- 0.3, biases 0.2 * N(0, 1)."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if p.dim() >= 2:
            fan_in = p[0].numel() if "embeddings" not in name else 1
            p.copy_(torch.randn(p.shape, generator=g) / fan_in ** 0.5)
            if re.search(FAMILY_QK, name):
                p.mul_(2.5)
        elif re.search(FAMILY_NORM, name):
            p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))
        else:
            p.copy_(0.2 * torch.randn(p.shape, generator=g))
    return model.eval()


def _family_space_index(n, h, inter, seed, widen):
    """As `_space_index`: one head order shared by Q, K and V, within-head
    orders for Q/K and for V/O; widening: every unit twice."""
    g = torch.Generator().manual_seed(seed)
    if widen:
        tile = lambda k: torch.arange(k).repeat(2)  # noqa: E731
        return {"res": tile(n), "qk": tile(n), "v": tile(n), "mlp": tile(inter), "pool": tile(n)}
    d = n // h
    heads = torch.randperm(h, generator=g)

    def within():
        return torch.cat([heads[j] * d + torch.randperm(d, generator=g) for j in range(h)])

    return {"res": torch.randperm(n, generator=g), "qk": within(), "v": within(),
            "mlp": torch.randperm(inter, generator=g), "pool": torch.randperm(n, generator=g)}


@torch.no_grad()
def transform_family(model, *, widen: bool, seed=7):
    """`transform` for RoBERTa and DistilBERT: a functionally identical copy
    with units permuted, or every unit duplicated and input-side weights
    halved (not function-preserving for a decoder tied to the embeddings)."""
    cfg = model.config
    keys = FAMILY_WIDTHS[cfg.model_type]
    n, h, inter = (getattr(cfg, k) for k in keys)
    idx = _family_space_index(n, h, inter, seed, widen)
    new_cfg = type(cfg).from_dict(cfg.to_dict())
    if widen:
        for k in keys:
            setattr(new_cfg, k, 2 * getattr(cfg, k))
    return reindex(model, new_cfg, idx, lambda name: family_roles(name, cfg.model_type), halve_inputs=widen)


def family_inputs(model, batch=4, seed=0):
    """`inputs` without token types for DistilBERT, which takes none."""
    x = inputs(model, batch, seed)
    if model.config.model_type == "distilbert":
        x.pop("token_type_ids")
    return x
