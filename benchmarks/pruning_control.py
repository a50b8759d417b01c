"""The compression user's real alternative, as a control for the benchmarks:
drop whole blocks (DistilBERT's every other block, or ShortGPT's lowest
block influence), then prune widths with Torch-Pruning (L2 or Taylor group
importance) to the target config's exact hidden size, heads and FFN width.

Every result is a plain Hugging Face model of the parent's class, built from
its config and filled with `load_state_dict(strict=True)`, so it saves and
loads like any checkpoint and its shapes are checked, not assumed.

Torch-Pruning (1.6.1) reaches the exact attention shape by itself: q, k, v
and the output projection's input are one dependency group (coupled through
scaled_dot_product_attention), `prune_num_heads` removes whole heads and
`prune_head_dims` removes the same within-head positions in every head (the
heads are the group's channel groups). `torch_prune` checks that what was
kept is exactly `heads x head dims` in every layer and raises otherwise.

LLaMA (rotary, grouped-query attention): Torch-Pruning 1.6 prunes query
heads inside each key/value group but never key/value heads themselves (it
turns their pruning off under GQA), and pruning head dims would split
rotary pairs. So a target with fewer key/value heads is reached in two steps:
`drop_kv_groups` removes whole GQA groups (a key/value head with its query
heads and their output-projection columns, scored by the same L2 or Taylor
criterion, written here with torch), then Torch-Pruning prunes the residual
width, the MLP and any query heads left over.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from otcompress import depth as _depth

# Per family: the q/k/v projections (relative to a block), the FFN's first
# linear and the output heads Torch-Pruning must leave alone.
_ATTENTION = {"vit": ("attention.q_proj", "attention.k_proj", "attention.v_proj"),
              "bert": ("attention.self.query", "attention.self.key", "attention.self.value"),
              "llama": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")}
_ATTENTION_OUT = {"llama": "self_attn.o_proj"}
_FFN_IN = {"vit": ("mlp.fc1",), "bert": ("intermediate.dense",), "llama": ("mlp.gate_proj", "mlp.up_proj")}
_OUTPUT_HEADS = ("classifier", "cls.predictions.decoder", "lm_head")
_WRAPPED = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Embedding, nn.LayerNorm)


# ----------------------------------------------------------------------------- depth

def drop_blocks(model, kept: list[int]):
    """A model of the same class with only the `kept` blocks (renumbered) and
    its config's depth (and Qwen2's layer_types) to match; an independent
    copy, so pruning or training it leaves the parent untouched."""
    n = _depth.depth(model.config)
    kept = sorted(kept)
    dmap = _depth.DepthMap(n, _depth.groups_of(kept, n), kept, [0.0] * n, "weights")
    return copy.deepcopy(_depth.apply(model, dmap))


def every_other(n: int, t: int) -> list[int]:
    """DistilBERT's initialisation generalised: t of n blocks, evenly spaced
    from the first (12 -> 6 gives 0, 2, ..., 10)."""
    if not 0 < t <= n:
        raise ValueError(f"cannot keep {t} of {n} blocks")
    return [i * n // t for i in range(t)]


def lowest_influence(model, batches, t: int) -> list[int]:
    """ShortGPT: the t blocks with the highest block influence
    1 - cos(block input, block output) on `batches`, in order; the blocks that
    change the residual stream least are the ones dropped."""
    n = _depth.depth(model.config)
    if not 0 < t <= n:
        raise ValueError(f"cannot keep {t} of {n} blocks")
    influence = _depth.activation_scores(model, model.config, batches, n)[0]
    return sorted(sorted(range(n), key=lambda i: -influence[i])[:t])


# ----------------------------------------------------------------------------- width

def _widths(config):
    return config.hidden_size, config.num_attention_heads, config.intermediate_size


def _kv_heads(config) -> int:
    return getattr(config, "num_key_value_heads", None) or config.num_attention_heads


def _head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _blocks(model):
    path = next(b for b in (_depth.block_of(model.config, n) for n, _ in model.named_parameters()) if b)[0]
    return list(model.get_submodule(path))


def _example_inputs(model, batches):
    """A batch without labels for Torch-Pruning's trace (labels would add the
    loss to the traced graph); a dummy one when no batches are given."""
    if batches:
        return {k: v for k, v in batches[0].items() if k != "labels"}
    cfg = model.config
    if cfg.model_type == "vit":
        return {"pixel_values": torch.zeros(1, cfg.num_channels, cfg.image_size, cfg.image_size)}
    return {"input_ids": torch.ones(1, 8, dtype=torch.long)}


def _unwrapped(model, hidden: int):
    """Bare nn.Parameters on the residual axis (ViT's cls_token and
    position_embeddings): Torch-Pruning prunes them on their last dim only
    when told."""
    out = []
    for name, p in model.named_parameters():
        owner = model.get_submodule(name.rpartition(".")[0])
        if name == "cls.predictions.bias":  # the masked-LM head's vocabulary bias (the decoder's, tied)
            continue
        if not isinstance(owner, _WRAPPED):
            if p.shape[-1] != hidden:
                raise ValueError(f"{name}: a bare parameter of shape {tuple(p.shape)} is not on the residual axis")
            out.append((p, p.dim() - 1))
    return out


def _ratio(n: int, t: int) -> float:
    """The pruning ratio that leaves exactly t of n (Torch-Pruning keeps
    int(n * (1 - ratio)); the half unit guards against float rounding)."""
    return 0.0 if t >= n else 1 - (t + 0.5) / n


def _taylor_gradients(model, batches) -> None:
    """Loss gradients for GroupTaylorImportance, summed over labelled batches."""
    if not batches or any("labels" not in b for b in batches):
        raise ValueError("taylor importance needs batches with labels (a loss to differentiate)")
    model.zero_grad()
    with torch.enable_grad():
        for batch in batches:
            loss = model(**batch).loss
            if loss is None:
                raise ValueError(f"{type(model).__name__} returns no loss: taylor importance needs one")
            loss.backward()


def _check_heads(pruned: list[int], hidden: int, heads: int, t_heads: int, t_head_dim: int, name: str) -> None:
    """The kept q/k/v outputs must be whole heads times the same within-head
    positions: anything else is not a valid attention of the target config."""
    hd = hidden // heads
    kept = sorted(set(range(hidden)) - set(pruned))
    kept_heads, kept_dims = sorted({k // hd for k in kept}), sorted({k % hd for k in kept})
    if (len(kept_heads), len(kept_dims)) != (t_heads, t_head_dim) or len(kept) != t_heads * t_head_dim:
        raise RuntimeError(f"{name}: Torch-Pruning kept {len(kept)} q/k/v outputs over heads {kept_heads} "
                           f"and head dims {kept_dims}, not {t_heads} heads x {t_head_dim} dims")


def _group_scores(model, importance: str, batches) -> list[torch.Tensor]:
    """Per block, one score per key/value group: the sum over the group's
    weights (its query heads' q rows and output-projection columns, its key
    and value rows) of w^2 ("l2", Torch-Pruning's GroupMagnitudeImportance
    up to a per-block constant) or |w * dL/dw| ("taylor")."""
    cfg = model.config
    heads, kv, hd = cfg.num_attention_heads, _kv_heads(cfg), _head_dim(cfg)
    rep = heads // kv
    if importance == "taylor":
        _taylor_gradients(model, batches)
    elif importance != "l2":
        raise ValueError(f"importance is 'l2' or 'taylor', not {importance!r}")

    def unit(p):  # per weight entry
        return p.detach() ** 2 if importance == "l2" else (p.detach() * p.grad).abs()
    out = []
    for block in _blocks(model):
        q, k, v = (unit(block.get_submodule(n).weight) for n in _ATTENTION["llama"])
        o = unit(block.get_submodule(_ATTENTION_OUT["llama"]).weight)
        score = (q.sum(1).view(kv, rep * hd).sum(1) + o.sum(0).view(kv, rep * hd).sum(1)
                 + k.sum(1).view(kv, hd).sum(1) + v.sum(1).view(kv, hd).sum(1))
        out.append(score)
    model.zero_grad(set_to_none=True)
    return out


@torch.no_grad()
def drop_kv_groups(model, t_kv: int, importance: str = "l2", batches=None):
    """A copy of a grouped-query-attention model (LLaMA) with `t_kv` of its
    key/value groups in every block, each kept whole (its key/value head, its
    query heads, their output-projection columns), chosen per block by
    `_group_scores`; the config's heads and key/value heads follow. Exact:
    a removed group's contribution is gone, every kept head computes what it
    did."""
    cfg = model.config
    heads, kv, hd = cfg.num_attention_heads, _kv_heads(cfg), _head_dim(cfg)
    if not 0 < t_kv <= kv:
        raise ValueError(f"cannot keep {t_kv} of {kv} key/value heads")
    rep = heads // kv
    model = copy.deepcopy(model).eval()
    scores = _group_scores(model, importance, batches)
    new_cfg = type(cfg).from_dict(cfg.to_dict())
    new_cfg.num_attention_heads, new_cfg.num_key_value_heads, new_cfg.head_dim = t_kv * rep, t_kv, hd
    sd = model.state_dict()
    path = next(b for b in (_depth.block_of(cfg, n) for n in sd) if b)[0]
    for i, score in enumerate(scores):
        groups = sorted(torch.topk(score, t_kv).indices.tolist())
        kv_rows = torch.cat([torch.arange(g * hd, (g + 1) * hd) for g in groups])
        q_rows = torch.cat([torch.arange(g * rep * hd, (g + 1) * rep * hd) for g in groups])
        pre = f"{path}.{i}."
        for name, rows in zip(_ATTENTION["llama"], (q_rows, kv_rows, kv_rows)):
            for leaf in ("weight", "bias"):
                if pre + f"{name}.{leaf}" in sd:
                    sd[pre + f"{name}.{leaf}"] = sd[pre + f"{name}.{leaf}"][rows].clone()
        o = pre + f"{_ATTENTION_OUT['llama']}.weight"
        sd[o] = sd[o][:, q_rows].clone()
    out = type(model)(new_cfg)
    out.load_state_dict(sd, strict=True)
    return out.eval()


# ----------------------------------------------------------------------------- LLaMA widths, by hand

# LLaMA parameters by name suffix: the axis that is the residual stream, and
# the axis that is the MLP's units (None: none).
_LLAMA_AXES = {"embed_tokens.weight": (1, None), "norm.weight": (0, None), "layernorm.weight": (0, None),
               "q_proj.weight": (1, None), "k_proj.weight": (1, None), "v_proj.weight": (1, None),
               "o_proj.weight": (0, None), "gate_proj.weight": (1, 0), "up_proj.weight": (1, 0),
               "down_proj.weight": (0, 1), "lm_head.weight": (1, None)}


def _llama_axes(name):
    for suffix, axes in _LLAMA_AXES.items():
        if name.endswith(suffix):
            return axes
    raise ValueError(f"{name}: not a LLaMA parameter magnitude_prune knows")


def _keep(score: torch.Tensor, t: int) -> torch.Tensor:
    return torch.sort(torch.topk(score, t).indices).values


@torch.no_grad()
def magnitude_prune(model, target_config, importance: str = "l2", batches=None):
    """Torch-Pruning's structured pruning for LLaMA, written here with torch
    (Torch-Pruning 1.6.1 cannot group transformers 5.x's LlamaForCausalLM):
    whole key/value groups per block (`drop_kv_groups`), then per block the
    MLP units, and across the model the residual units, each with the largest
    group score, the sum over every weight entry of the unit's group of w^2
    ("l2") or |w * dL/dw| ("taylor", loss gradients on labelled `batches`).
    Head widths never change (rotary pairs). Returns a model of `type(model)`
    with `target_config`'s widths, loaded strictly."""
    cfg = model.config
    if cfg.model_type != "llama":
        raise NotImplementedError(f"magnitude_prune knows llama, not {cfg.model_type}; use torch_prune")
    if _depth.depth(cfg) != _depth.depth(target_config):
        raise ValueError("drop blocks first: magnitude_prune changes widths only")
    heads, kv, hd = cfg.num_attention_heads, _kv_heads(cfg), _head_dim(cfg)
    t_heads, t_kv, t_hd = target_config.num_attention_heads, _kv_heads(target_config), _head_dim(target_config)
    t_hidden, t_ffn = target_config.hidden_size, target_config.intermediate_size
    if t_hd != hd or t_kv > kv or t_heads * kv != heads * t_kv or t_hidden > cfg.hidden_size \
            or t_ffn > cfg.intermediate_size:
        raise ValueError(f"no group pruning from {heads} heads / {kv} key/value of {hd}, hidden "
                         f"{cfg.hidden_size}, MLP {cfg.intermediate_size} to {t_heads} / {t_kv} of {t_hd}, "
                         f"hidden {t_hidden}, MLP {t_ffn} (whole key/value groups only)")
    if importance not in ("l2", "taylor"):
        raise ValueError(f"importance is 'l2' or 'taylor', not {importance!r}")
    model = drop_kv_groups(model, t_kv, importance, batches) if t_kv < kv else copy.deepcopy(model).eval()
    if importance == "taylor":
        _taylor_gradients(model, batches)
    params = dict(model.named_parameters())
    unit = {n: (p.detach() ** 2 if importance == "l2" else (p.detach() * p.grad).abs()) for n, p in params.items()}
    model.zero_grad(set_to_none=True)

    def axis_sum(t, axis):  # one value per index of `axis`
        return t.sum(tuple(d for d in range(t.dim()) if d != axis))
    residual = sum(axis_sum(unit[n], _llama_axes(n)[0]) for n in params)
    keep_res = _keep(residual, t_hidden)
    keep_ffn = {}
    for n in params:
        axis = _llama_axes(n)[1]
        if axis is not None:
            block = n.rsplit(".mlp.", 1)[0]
            keep_ffn[block] = keep_ffn.get(block, 0) + axis_sum(unit[n], axis)
    keep_ffn = {b: _keep(s, t_ffn) for b, s in keep_ffn.items()}
    sd = {}
    for n, p in params.items():
        res, ffn = _llama_axes(n)
        t = p.detach().index_select(res, keep_res)
        if ffn is not None:
            t = t.index_select(ffn, keep_ffn[n.rsplit(".mlp.", 1)[0]])
        sd[n] = t.clone()
    out = type(model)(target_config)
    out.load_state_dict(sd, strict=True)
    return out.eval()


def torch_prune(model, target_config, importance: str = "l2", batches=None):
    """A model of `type(model)` with `target_config`'s widths (its depth must
    already match), holding the weights Torch-Pruning kept.

    importance: "l2" (GroupMagnitudeImportance(p=2), data-free) or "taylor"
    (GroupTaylorImportance on the loss gradients of `batches`, which then
    need labels). Pruning is local: each block's attention loses the same
    number of heads (by mean head importance) and the same number of
    within-head dims, each FFN the same units; the residual width is one
    group across the model. The output head keeps its outputs."""
    family = model.config.model_type
    if family not in _ATTENTION or family in _ATTENTION_OUT:
        raise NotImplementedError(f"torch_prune knows vit and bert, not {family}"
                                  + ("; Torch-Pruning 1.6.1 never finishes grouping LLaMA's dependencies "
                                     "(transformers 5.x): use magnitude_prune" if family == "llama" else ""))
    if _depth.depth(model.config) != _depth.depth(target_config):
        raise ValueError("drop blocks first: torch_prune changes widths only")
    import torch_pruning as tp

    (hidden, heads, ffn), (t_hidden, t_heads, t_ffn) = _widths(model.config), _widths(target_config)
    if hidden % heads or t_hidden % t_heads or t_heads > heads or t_hidden // t_heads > hidden // heads \
            or t_hidden > hidden or t_ffn > ffn:
        raise ValueError(f"no structured pruning from hidden {hidden}, {heads} heads, FFN {ffn} "
                         f"to hidden {t_hidden}, {t_heads} heads, FFN {t_ffn}")
    model = copy.deepcopy(model).eval()
    batches = list(batches) if batches is not None else None
    # Torch-Pruning prunes nothing in a scope with no width to remove, heads
    # included: to remove heads only, it is told to leave head dims alone and
    # given a nonzero (then unused) ratio for the q/k/v group.
    head_dims = _ratio(hidden // heads, t_hidden // t_heads)
    prune_head_dims = head_dims > 0 or t_heads == heads
    num_heads, ratios = {}, {}
    for block in _blocks(model):
        for name in _ATTENTION[family]:
            m = block.get_submodule(name)
            num_heads[m] = heads
            ratios[m] = head_dims if prune_head_dims else 0.5
        for name in _FFN_IN[family]:
            ratios[block.get_submodule(name)] = _ratio(ffn, t_ffn)
    ignored = [m for n, m in model.named_modules() if n in _OUTPUT_HEADS]
    mlm = _tied_mlm_head(model)
    if mlm:  # its transform's outputs follow the residual units by hand, below
        ratios[mlm[1]] = 0.0
        before = mlm[0].weight.detach().clone()
    if importance == "l2":
        imp = tp.importance.GroupMagnitudeImportance(p=2)
    elif importance == "taylor":
        imp = tp.importance.GroupTaylorImportance()
        _taylor_gradients(model, batches)
    else:
        raise ValueError(f"importance is 'l2' or 'taylor', not {importance!r}")
    with torch.enable_grad():  # Torch-Pruning traces the graph with autograd
        pruner = tp.pruner.MetaPruner(
            model, _example_inputs(model, batches), importance=imp,
            pruning_ratio=_ratio(hidden, t_hidden),  # the residual width (and BERT's pooler)
            pruning_ratio_dict=ratios, num_heads=num_heads,
            prune_num_heads=True, prune_head_dims=prune_head_dims,
            head_pruning_ratio=max(heads - t_heads - 0.5, 0) / heads,  # ceil(ratio * heads) = heads - t_heads
            ignored_layers=ignored, unwrapped_parameters=_unwrapped(model, hidden))
    names = {m: n for n, m in model.named_modules()}
    for group in pruner.step(interactive=True):
        for dep, idxs in group:
            target = dep.target.module
            if target in num_heads and pruner.DG.is_out_channel_pruning_fn(dep.handler):
                _check_heads(list(idxs), hidden, heads, t_heads, t_hidden // t_heads, names[target])
        group.prune()
    model.zero_grad(set_to_none=True)
    if mlm:
        _follow_residual(model, mlm, before)
    # A BertModel built without its pooler (an embedding encoder) is rebuilt without one.
    extra = {"add_pooling_layer": False} if getattr(model, "pooler", 0) is None else {}
    out = type(model)(target_config, **extra)
    out.load_state_dict(model.state_dict(), strict=True)
    return out.eval()


def _tied_mlm_head(model):
    """(input embeddings, transform dense, transform LayerNorm, decoder) of a
    BERT masked-LM whose decoder is tied to the input embeddings, else None.
    The transform's outputs are the decoder's inputs, i.e. the embedding
    axis: they must keep the residual units the embeddings keep, which
    Torch-Pruning (a separate group for them, weights tied behind its back)
    does not know."""
    head = getattr(getattr(model, "cls", None), "predictions", None)
    emb = model.get_input_embeddings()
    if head is None or head.decoder.weight is not emb.weight:
        return None
    return emb, head.transform.dense, head.transform.LayerNorm, head.decoder


@torch.no_grad()
def _follow_residual(model, mlm, before) -> None:
    """The MLM head's transform outputs cut to the residual units the input
    embeddings kept (found by matching columns), and the decoder tied again."""
    emb, dense, norm, decoder = mlm
    after = emb.weight
    kept = [next(k for k in range(before.shape[1]) if torch.equal(before[:, k], after[:, j]))
            for j in range(after.shape[1])]
    idx = torch.tensor(kept)
    dense.weight = nn.Parameter(dense.weight[idx].clone())
    dense.bias = nn.Parameter(dense.bias[idx].clone())
    dense.out_features = len(kept)
    norm.weight = nn.Parameter(norm.weight[idx].clone())
    norm.bias = nn.Parameter(norm.bias[idx].clone())
    norm.normalized_shape = (len(kept),)
    decoder.weight = emb.weight
    decoder.in_features = len(kept)
