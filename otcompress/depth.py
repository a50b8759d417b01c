"""Heterogeneous depth: a deeper parent seen at the target's depth.

A *depth map* assigns every target block a contiguous, ordered group of the
parent's blocks (every parent block in exactly one group). The group is
merged into one block by *selection* (the default): its most useful block is
kept, the others (the blocks that change the residual stream least) are
dropped; or in *parallel* (below). The
result is a parent of the target's depth that the engine fuses or folds like
any other, so depth works everywhere width does (OT, fold, the race,
streaming, fuse_to_disk, every family).

Which blocks to keep is chosen by dynamic programming over a block score
(an order-preserving assignment, as in CLAFusion, Nguyen et al. 2023):
- with calibration data and forward-capable models: the *block influence*
  of ShortGPT, 1 - cos(block input, block output) per token, and, when the
  anchor's weights count (not a fold target), the linear CKA between each
  anchor block's output and each parent block's output;
- without data: the Frobenius norm of the block's residual writers (the
  weights whose output axis is a residual branch's map), which is exactly 0
  for a block that computes the identity in a pre-norm family.
Exactness where it can be: a block that does nothing (zero output
projections) has influence 0 in both scores, so a parent deepened with such
blocks maps back to its own blocks, wherever they were inserted.

Merge "parallel" (`depth_merge`) is the other candidate: the group's
blocks side by side (the parallel approximation x + f1(x) + f2(x) of
x + f1(x) + f2(x + f1(x))) have every block's attention heads (whole KV
groups) and MLP units; the most important of them, as many as one block
holds, make the merged block (`parallel_state`), so the parent keeps its
widths (a Hugging Face config has one width for every block). Units from a
block other than the kept one read the kept block's normalisation: its
affine is absorbed into their input weights, exactly; the output biases
add. A block that does nothing has no important unit, so the merge is exact
there too.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch

from otcompress import architectures
from otcompress.errors import IncompatibleModelsError
from otcompress.flowgraph import Combine, In, Out, block_index, part_of

MERGES = ("select", "parallel")
MAX_TOKENS = 2048  # token samples per block for the activation scores
INFLUENCE_WEIGHT = 0.1  # with an anchor: its CKA decides, influence breaks near-ties
POSITION_TIE = 1e-3  # prefers relative depths that agree, only between equal scores


@dataclass
class DepthMap:
    """Target block j <- parent blocks `groups[j]`, of which `kept[j]` is used."""
    parent_depth: int
    groups: list
    kept: list
    influence: list
    source: str  # "activations" or "weights"
    similarity: list | None = field(default=None, repr=False)  # [target j][parent k] CKA
    merge: str = "select"

    def report(self) -> dict:
        out = {"parent_depth": self.parent_depth, "target_depth": len(self.kept), "groups": self.groups,
               "kept": self.kept, "merge": self.merge, "scored_from": self.source,
               "influence": [round(float(x), 6) for x in self.influence]}
        if self.similarity is not None:
            out["similarity"] = [[round(float(x), 4) for x in row] for row in self.similarity]
        return out


def depth(config) -> int:
    return config.num_hidden_layers


def check_depths(anchor_cfg, parent_cfgs, what: str = "the anchor") -> None:
    """An anchor (or fold target: `what`) deeper than a parent cannot be made
    from it (one line, both depths)."""
    for k, cfg in enumerate(parent_cfgs, 1):
        if depth(cfg) < depth(anchor_cfg):
            raise IncompatibleModelsError(
                f"depth mismatch: {what} has {depth(anchor_cfg)} blocks, parent {k} only {depth(cfg)}; "
                f"a parent must be at least as deep as {what}")


# ----------------------------------------------------------------------------- blocks by name

def _pattern(config):
    blocks = architectures.family(config).BLOCKS
    return re.compile(rf"^((?:[^.]+\.)*?{re.escape(blocks)})\.(\d+)\.(.+)$")


def block_of(config, name: str):
    """(module-list path, block index) of a parameter name, or None outside the blocks."""
    m = _pattern(config).match(name)
    return (m.group(1), int(m.group(2))) if m else None


def kept_name(config, name: str, kept) -> str:
    """The parent's name of a shallower model's tensor or module: block j is
    the parent's block kept[j]."""
    m = _pattern(config).match(name + ".")  # a module path has no trailing leaf: give it an empty one
    return name if m is None else f"{m.group(1)}.{kept[int(m.group(2))]}.{m.group(3)}"[:-1]


def blocks_path(model) -> str:
    """The path of the model's list of blocks ("bert.encoder.layer")."""
    return next(b for b in (block_of(model.config, n) for n, _ in model.named_parameters()) if b)[0]


def renamed_keys(config, keys, kept) -> dict:
    """{new name: old name}: the kept blocks renumbered 0..len(kept)-1, the
    other blocks dropped, every other tensor as it is."""
    pattern, new_index = _pattern(config), {k: j for j, k in enumerate(kept)}
    out = {}
    for name in keys:
        m = pattern.match(name)
        if m is None:
            out[name] = name
        elif int(m.group(2)) in new_index:
            out[f"{m.group(1)}.{new_index[int(m.group(2))]}.{m.group(3)}"] = name
    return out


def shallower_config(config, kept):
    """The config of the parent with only the `kept` blocks: depth and a
    family's per-block settings (its `keep_blocks`: Qwen2's attention types)
    follow the blocks."""
    cfg = type(config).from_dict(config.to_dict())
    cfg.num_hidden_layers = len(kept)
    hook = getattr(architectures.family_or_none(config), "keep_blocks", None)
    if hook is not None:
        hook(config, cfg, list(kept))
    return cfg


# ----------------------------------------------------------------------------- scores

def weight_influence(spec, state_dict, n_blocks: int) -> list[float]:
    """Per block, the Frobenius norm of its residual writers (the tensors on
    a residual join's branch map): 0 for a block that adds nothing."""
    score = [0.0] * n_blocks
    for node in spec.nodes:
        if not isinstance(node, Combine):
            continue
        for name in spec.params_with_out(node.branch):
            score[block_index(node.tm)] += float(state_dict[name].double().pow(2).sum())
    return [s ** 0.5 for s in score]


class _BlockRecorder:
    """Hooks on every block: token samples of its input and output."""

    def __init__(self, model, config, n_blocks):
        self.blocks = list(model.get_submodule(blocks_path(model)))[:n_blocks]
        self.ins, self.outs, self.mask = {}, {}, None
        self.handles = []
        for i, block in enumerate(self.blocks):
            self.handles.append(block.register_forward_pre_hook(self._pre(i), with_kwargs=True))
            self.handles.append(block.register_forward_hook(self._post(i)))

    def _pre(self, i):
        def hook(module, args, kwargs):
            self.ins[i] = (args[0] if args else kwargs["hidden_states"]).detach()
        return hook

    def _post(self, i):
        def hook(module, args, out):
            self.outs[i] = (out[0] if isinstance(out, (tuple, list)) else out).detach()
        return hook

    def close(self):
        for h in self.handles:
            h.remove()


def _tokens(t, mask, budget):
    x = t[mask.bool()] if mask is not None and t.dim() == 3 and mask.shape == t.shape[:2] \
        else t.reshape(-1, t.shape[-1])
    return x[:budget].double()


@torch.no_grad()
def activation_scores(model, config, batches, n_blocks: int):
    """(influence per block, block-output token samples per block) on `batches`."""
    from otcompress.activations import _on, model_device
    rec = _BlockRecorder(model, config, n_blocks)
    device = model_device(model)
    cos_sum, count, outs = [0.0] * n_blocks, 0, [[] for _ in range(n_blocks)]
    try:
        for batch in batches:
            budget = MAX_TOKENS - sum(o.shape[0] for o in outs[0])
            if budget <= 0:
                break
            model(**_on(batch, device))
            mask = batch.get("attention_mask")
            mask = None if mask is None else mask.to(device)
            for i in range(n_blocks):
                x, y = _tokens(rec.ins[i], mask, budget), _tokens(rec.outs[i], mask, budget)
                cos_sum[i] += float(torch.nn.functional.cosine_similarity(x, y, dim=-1).sum())
                outs[i].append(y.cpu())
            count += x.shape[0]
    finally:
        rec.close()
    return [1 - c / max(count, 1) for c in cos_sum], [torch.cat(o) for o in outs]


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Linear CKA of two sample-aligned activation matrices (n, d1), (n, d2)."""
    x, y = x - x.mean(0), y - y.mean(0)
    cross = (y.T @ x).pow(2).sum()
    norm = (x.T @ x).pow(2).sum().sqrt() * (y.T @ y).pow(2).sum().sqrt()
    return float(cross / norm) if norm > 0 else 0.0


# ----------------------------------------------------------------------------- the assignment

def assign(scores: torch.Tensor) -> list[int]:
    """Kept parent blocks k_0 < k_1 < ... maximising sum_j scores[j, k_j]
    (dynamic programming over target blocks j and parent blocks k)."""
    t, n = scores.shape
    best = torch.full((t, n), -float("inf"), dtype=torch.float64)
    came = torch.zeros((t, n), dtype=torch.long)
    best[0, :n - t + 1] = scores[0, :n - t + 1]
    for j in range(1, t):
        run, arg = -float("inf"), -1
        for k in range(j, n - t + j + 1):  # room for j blocks before, t - 1 - j after
            if best[j - 1, k - 1] > run:
                run, arg = float(best[j - 1, k - 1]), k - 1
            best[j, k], came[j, k] = scores[j, k] + run, arg
    kept = [int(torch.argmax(best[t - 1]))]
    for j in range(t - 1, 0, -1):
        kept.append(int(came[j, kept[-1]]))
    return kept[::-1]


def groups_of(kept: list[int], n: int) -> list[list[int]]:
    """Contiguous groups: each kept block with the dropped blocks before it;
    blocks after the last kept one join the last group."""
    groups, start = [], 0
    for j, k in enumerate(kept):
        end = n if j == len(kept) - 1 else k + 1
        groups.append(list(range(start, end)))
        start = end
    return groups


def _scores(influence, n_target, similarity=None) -> torch.Tensor:
    """scores[j, k] of keeping parent block k as target block j: its
    influence (relative to the largest), or with the anchor's similarities
    CKA(anchor block j, parent block k) + INFLUENCE_WEIGHT x influence;
    agreeing relative depths break exact ties only."""
    infl = torch.tensor(influence, dtype=torch.float64)
    infl = infl / infl.max() if infl.max() > 0 else infl
    n = len(influence)
    pos_t = (torch.arange(n_target, dtype=torch.float64) + 0.5) / n_target
    pos_p = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    scores = infl[None, :] - POSITION_TIE * (pos_t[:, None] - pos_p[None, :]).abs()
    if similarity is not None:
        scores = INFLUENCE_WEIGHT * scores + torch.tensor(similarity, dtype=torch.float64)
    return scores


def depth_map(parent, n_target: int, *, batches=None, anchor_outputs=None, merge="select") -> DepthMap:
    """The depth map of one parent (a model, or a weightless `LazyModel`):
    from activations on `batches` when given (and the parent can run), with
    the anchor's block outputs `anchor_outputs` for similarity when given;
    else from the weights."""
    n = depth(parent.config)
    similarity = None
    if batches is not None:
        influence, outs = activation_scores(parent, parent.config, batches, n)
        if anchor_outputs is not None:
            similarity = [[linear_cka(a, o[:a.shape[0]]) for o in outs] for a in anchor_outputs]
        source = "activations"
    else:
        spec = architectures.build_spec(parent)
        influence = weight_influence(spec, parent.state_dict(), n)
        source = "weights"
    kept = assign(_scores(influence, n_target, similarity))
    return DepthMap(n, groups_of(kept, n), kept, influence, source, similarity, merge)


# ----------------------------------------------------------------------------- the shallower parent

def apply(parent, dmap: DepthMap):
    """The parent with only `dmap.kept` blocks, renumbered: a model of the
    parent's class sharing the parent's tensors (no copy; merge "parallel":
    the merged blocks are new tensors), or, for a `LazyModel` (merge
    "select" only), a `LazyModel` reading the same files under the new names."""
    from otcompress import modelio
    cfg = shallower_config(parent.config, dmap.kept)
    if isinstance(parent, modelio.LazyModel):
        if dmap.merge != "select":  # a streamed parent is never read whole
            raise ValueError("a streamed parent is depth-mapped by selection only")
        if not moved(parent.config, parent.tensors, dmap):
            names = renamed_keys(parent.config, list(parent.tensors), dmap.kept)
            return modelio.LazyModel(parent.path, cfg, parent.model_class, parent.tensors.renamed(names))
        # Blocks whose tensors change with their position: this parent is loaded whole.
        parent = modelio.load_model(parent.path, config=parent.config).eval()
    sd = parent.state_dict()
    sd = {**sd, **moved(parent.config, sd, dmap)}
    if dmap.merge != "select":
        sd = parallel_state(parent, dmap, sd)
    names = renamed_keys(parent.config, list(sd), dmap.kept)
    with torch.device("meta"):
        model = type(parent)(cfg)
    _drop_absent(model, parent)
    model.load_state_dict({new: sd[old] for new, old in names.items()}, strict=True, assign=True)
    _adopt_buffers(model, parent, dmap.kept)
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    return model.eval()


def moved(config, sd, dmap: DepthMap) -> dict:
    """The tensors that change when each block of group j becomes block j of
    the shallower model, for families whose blocks depend on their position
    (the family's `moved_block`: GPT-2 with scale_attn_by_inverse_layer_idx)."""
    move = getattr(architectures.family(config), "moved_block", None)
    out = {}
    for j, group in enumerate(dmap.groups if move else ()):
        for b in group if dmap.merge != "select" else [dmap.kept[j]]:  # selection drops the rest
            out.update(move(config, sd, b, j))
    return out


# ----------------------------------------------------------------------------- parallel merge

def parallel_state(parent, dmap: DepthMap, sd=None) -> dict:
    """The parent's state dict (or `sd`, its tensors as `moved`) with each
    kept block replaced by its group merged in parallel (module docstring);
    blocks outside `dmap.kept` are left as they are (`apply` drops them)."""
    spec = architectures.build_spec(parent)
    sd = parent.state_dict() if sd is None else sd
    heads, d = architectures.head_shape(parent.config)
    shape = (heads // architectures.kv_heads(parent.config), d)  # (query heads per KV group, head width)
    blocks = _Blocks(parent.config, sd)
    out = dict(sd)
    for group, kept in zip(dmap.groups, dmap.kept):
        if len(group) > 1:
            out.update(_merged_block(spec, sd, blocks, [kept] + [b for b in group if b != kept], shape))
    return out


class _Blocks:
    """Parameter names per block: `names(b)` = {name inside the block: full name}."""

    def __init__(self, config, names):
        self.by_block = {}
        for name in names:
            where = block_of(config, name)
            if where is not None:
                self.by_block.setdefault(where[1], {})[name.split(f"{where[0]}.{where[1]}.", 1)[1]] = name

    def names(self, b: int) -> dict:
        return self.by_block[b]


def _local(tm: str, b: int) -> str:
    """A map's role inside block b ("q", "fc1", "attn_res"); "in" for the
    residual stream entering the block (another block's map, or "emb")."""
    return tm[len(f"L{b}."):] if tm.startswith(f"L{b}.") else "in"


def _merged_block(spec, sd, blocks, order, shape) -> dict:
    """{full name in block order[0]: merged tensor}: the units of every block
    in `order` (the kept block first) compete on importance."""
    kept = order[0]
    versions = {b: _absorbed(spec, sd, blocks, b, kept) if b != kept else
                {local: sd[name] for local, name in blocks.names(b).items()} for b in order}
    axes = {b: {local: spec.axes[name] for local, name in blocks.names(b).items()} for b in order}
    units = _unit_maps(spec, kept)
    chosen = {}
    for family, roles in units.items():
        scores = [_importance(versions[b], axes[b], b, roles, shape if family == "heads" else None) for b in order]
        chosen[family] = _select(scores)
    branches = {_local(n.branch, kept) for n in spec.nodes if type(n) is Combine and n.tm.startswith(f"L{kept}.")}
    out = {}
    for local, name in blocks.names(kept).items():
        roles = [(ax, _local(tm, kept), part) for ax, a in enumerate(axes[kept][local]) if a is not None
                 for part, tm in enumerate(a.tms)]
        unit_roles = [(ax, r, part) for ax, r, part in roles if any(r in rs for rs in units.values())]
        if unit_roles:
            out[name] = _gathered(versions, axes, order, local, unit_roles, units, chosen, shape)
        elif roles and all(r in branches for _, r, _ in roles):  # an output bias: every block adds its own
            out[name] = sum(versions[b][local] for b in order)
    return out


def _unit_maps(spec, b) -> dict:
    """{family: roles}: "heads" -> the attention maps whose units move by
    whole KV group (q, k, v, and the output's input "attn" where it has one
    of its own), and each other map inside the block that one of its tensors
    reads (the MLP's "fc1") -> itself."""
    node = spec.node(f"L{b}.heads")
    heads = {_local(t, b) for t in (node.q, node.k, node.v, node.attn) if t is not None}
    combines = {n.tm for n in spec.nodes if type(n) is Combine}
    inner = {_local(a.tm, b) for name, axes in spec.axes.items() for a in axes
             if type(a) is In and a.tm.startswith(f"L{b}.") and a.tm not in combines}
    return {"heads": heads, **{r: {r} for r in sorted(inner - heads)}}


def _unit_index(role: str, units: torch.Tensor, shape) -> torch.Tensor:
    """Indices along a `role` axis for the chosen `units`: themselves, or
    for attention (`shape` = (query heads per KV group, head width)) every
    entry of the chosen KV groups (q and the output's input: all their query
    heads; k and v: their one head)."""
    if shape is None:
        return units
    width = shape[0] * shape[1] if role in ("q", "attn") else shape[1]
    return (units[:, None] * width + torch.arange(width, device=units.device)).flatten()


def _slices(t, ax, part, nparts):
    return part_of(t, ax, None if nparts == 1 else (part, nparts))


def _importance(tensors, axes, b, roles, shape) -> torch.Tensor:
    """Per unit (KV group for attention) of block b: the norm of what writes
    it times the norm of what reads it (for attention: its V rows and the
    output's columns, what the group adds to the residual stream); 0 when
    either is 0."""
    write_role = "v" if shape is not None else next(iter(roles))
    read_role = ("attn" if "attn" in roles else "v") if shape is not None else write_role
    write = read = 0.0
    for local, t in tensors.items():
        for ax, a in enumerate(axes[local]):
            for part, tm in enumerate(a.tms if a is not None else ()):
                reads = type(a) is In
                if _local(tm, b) != (read_role if reads else write_role):
                    continue
                sl = _slices(t, ax, part, len(a.tms)).double().movedim(ax, 0)
                sq = sl.reshape(sl.shape[0], -1).pow(2).sum(1)
                read, write = (read + sq, write) if reads else (read, write + sq)
    n = write.shape[0] // (1 if shape is None else shape[1])
    return (write.reshape(n, -1).sum(1) * read.reshape(n, -1).sum(1)).sqrt()


def _select(scores: list) -> list:
    """Per block (in `order`), the indices of its chosen units: as many as
    one block has, by importance (ties: earlier block, lower index)."""
    flat = torch.cat(scores)
    k = scores[0].shape[0]
    top = torch.sort(-flat, stable=True).indices[:k].sort().values
    out, start = [], 0
    for s in scores:
        out.append(top[(top >= start) & (top < start + s.shape[0])] - start)
        start += s.shape[0]
    return out


def _gathered(versions, axes, order, local, unit_roles, units, chosen, shape) -> torch.Tensor:
    """The kept block's tensor `local` with its unit axis made of the chosen
    units of every block."""
    (ax,) = {ax for ax, _, _ in unit_roles}  # one unit axis per tensor
    nparts = len(axes[order[0]][local][ax].tms)
    parts = []
    for part in range(nparts):
        role = next(r for a, r, p in unit_roles if p == part)
        family = next(f for f, rs in units.items() if role in rs)
        head_shape = shape if family == "heads" else None
        pieces = []
        for b, idx in zip(order, chosen[family]):
            sl = _slices(versions[b][local], ax, part, nparts)
            pieces.append(sl.index_select(ax, _unit_index(role, idx, head_shape)))
        parts.append(torch.cat(pieces, ax))
    return torch.cat(parts, ax)


def _absorbed(spec, sd, blocks, b, kept) -> dict:
    """Block b's tensors as they read the kept block's normalisations: a
    linear reading norm N_b(x) = n(x) g_b + beta_b gets weights W diag(g_b / g_a)
    and bias + W (beta_b - beta_a g_b / g_a), so it computes the same on
    N_a(x). Post-norm blocks read another block's norm: nothing changes."""
    names, kept_names = blocks.names(b), blocks.names(kept)
    axes = {local: spec.axes[name] for local, name in names.items()}
    norms = {}  # role of the stream it normalises -> module (inside the block)
    for local, a in axes.items():
        if sd[names[local]].dim() == 1 and len(a) == 1 and type(a[0]) is Out and local.endswith(".weight"):
            norms[_local(a[0].tm, b)] = local[: -len(".weight")]
    out = {local: sd[name] for local, name in names.items()}
    for local, a in axes.items():
        ins = [(ax, _local(x.tm, b)) for ax, x in enumerate(a) if type(x) is In]
        if not ins or ins[0][1] not in norms or sd[names[local]].dim() != 2:
            continue
        ax, role = ins[0]
        module = norms[role]
        g_b, g_a = sd[names[f"{module}.weight"]].double(), sd[kept_names[f"{module}.weight"]].double()
        ratio = torch.where(g_a.abs() > 1e-12, g_b / g_a.where(g_a.abs() > 1e-12, torch.ones_like(g_a)),
                            torch.zeros_like(g_a))
        w = sd[names[local]].double()
        shape = [1, 1]
        shape[ax] = -1
        out[local] = (w * ratio.reshape(shape)).to(sd[names[local]].dtype)
        bias_name = local[: -len("weight")] + "bias"
        if f"{module}.bias" in names and bias_name in names:
            delta = sd[names[f"{module}.bias"]].double() - sd[kept_names[f"{module}.bias"]].double() * ratio
            out[bias_name] = (sd[names[bias_name]].double() + torch.tensordot(w, delta, dims=([ax], [0]))
                              ).to(sd[names[bias_name]].dtype)
    return out


def _drop_absent(model, parent) -> None:
    """Submodules the parent was built without (a BertModel's pooler with
    add_pooling_layer=False) are left out of the rebuilt model too."""
    for name, module in list(model.named_modules()):
        for leaf in list(module._modules):
            owner = parent.get_submodule(name) if _has(parent, name) else None
            if owner is not None and leaf not in owner._modules and getattr(owner, leaf, 0) is None:
                delattr(module, leaf)
                setattr(module, leaf, None)


def _has(model, name) -> bool:
    try:
        model.get_submodule(name)
        return True
    except AttributeError:
        return False


def _adopt_buffers(model, parent, kept) -> None:
    """Buffers outside the state dict (rotary frequencies) are the parent's
    own: the model was built on the meta device."""
    buffers = dict(parent.named_buffers())
    for new, old in renamed_keys(parent.config, list(buffers), kept).items():
        owner, _, leaf = new.rpartition(".")
        module = model.get_submodule(owner)
        if module._buffers.get(leaf) is not None and module._buffers[leaf].is_meta:
            module._buffers[leaf] = buffers[old]


def map_parents(anchor_m, parent_ms, *, data=None, anchor_counts=True, merge="select"):
    """(parents at the anchor's depth, their depth maps or None where the
    depth already matches). Activation scores need `data` as a re-iterable
    collection (a one-shot iterator is left for the fusion itself) and
    forward-capable models; otherwise the weights score the blocks.
    `anchor_counts`: the anchor's own block outputs take part (not for a fold
    target, whose weights are a random initialisation). `merge`: "select" or
    "parallel" (module docstring; `fusion.streams` never streams a parent for it).
    Every parent is at least as deep as the anchor (`check_depths`, at the
    entry: `inputs.check`)."""
    from otcompress import activations, modelio
    n_target = depth(anchor_m.config)
    if all(depth(p.config) == n_target for p in parent_ms):
        return parent_ms, [None] * len(parent_ms)
    batches = None
    if data is not None:
        batches = activations.iter_batches(data)
        if iter(batches) is batches:  # one pass only: keep it for the fusion
            batches = None
    anchor_outputs = None
    if batches is not None and anchor_counts and isinstance(anchor_m, torch.nn.Module):
        anchor_outputs = activation_scores(anchor_m, anchor_m.config, batches, n_target)[1]
    out, maps = [], []
    for p in parent_ms:
        if depth(p.config) == n_target:
            out.append(p)
            maps.append(None)
            continue
        runnable = batches is not None and not isinstance(p, modelio.LazyModel)
        dmap = depth_map(p, n_target, batches=batches if runnable else None,
                         anchor_outputs=anchor_outputs if runnable else None, merge=merge)
        out.append(apply(p, dmap))
        maps.append(dmap)
    return out, maps
