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
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from otcompress import depth as _depth

# Per family: the q/k/v projections (relative to a block), the FFN's first
# linear and the output heads Torch-Pruning must leave alone.
_ATTENTION = {"vit": ("attention.q_proj", "attention.k_proj", "attention.v_proj"),
              "bert": ("attention.self.query", "attention.self.key", "attention.self.value")}
_FFN_IN = {"vit": "mlp.fc1", "bert": "intermediate.dense"}
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
    if family not in _ATTENTION:
        raise NotImplementedError(f"torch_prune knows vit and bert, not {family}")
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
        ratios[block.get_submodule(_FFN_IN[family])] = _ratio(ffn, t_ffn)
    ignored = [m for n, m in model.named_modules() if n in _OUTPUT_HEADS]
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
    out = type(model)(target_config)
    out.load_state_dict(model.state_dict(), strict=True)
    return out.eval()
