"""Align one parent to the anchor by walking the flow graph: compute every
transport map in order, then carry each parameter axis through its map.

Rectangular maps (method.md): an axis that *reads* a space (`In`) is carried by
R = diag(1/mu) T (inputs landing on one anchor unit have their weights summed);
an axis whose entries *live in* a space (`Out`) by C = T diag(1/nu) (each anchor
unit a convex combination of parent units).

Maps come from OT against the anchor's units (mode "ot") or from clustering
the parent's own units into the anchor's widths (mode "fold", see fold.py).
When head widths differ, carried Q rows are multiplied by
sqrt(d_parent / d_anchor): a score is a sum over a head's units divided by
sqrt(head_dim), and a folded or transported unit stands for d_parent/d_anchor
parent units."""
from __future__ import annotations

import math
import time
from collections import Counter
from dataclasses import dataclass

import torch

from otcompress import fold, importance, transport
from otcompress.repair import is_statistic
from otcompress.errors import IncompatibleModelsError, SolverError
from otcompress.options import BY_NAME as _D
from otcompress.flowgraph import ArchSpec, Combine, Heads, In, Out, Share, Solve, Split, out_slot, part_of

MODES = ("ot", "fold", "prune")


@dataclass
class AlignOptions:
    """The engine's share of the fusion options; defaults from `options`
    (reg: the recipes' fixed default, `fuse` resolves None before this)."""
    solver: str = _D["solver"].default
    reg: float = _D["reg"].default
    cost_norm: str = _D["cost_norm"].default
    max_iter: int = _D["max_iter"].default
    tol: float = _D["tol"].default
    mode: str = "ot"  # or "fold" / "prune": maps from the parent alone (_Folder)
    seed: int = _D["seed"].default  # k-means seeding in fold mode
    head_alignment: str = _D["head_alignment"].default  # "cross": one map over all Q (K, V) units; "aware": heads first
    on_unconverged: str = _D["on_unconverged"].default  # or "warn": keep the plan, flag it in the report
    on_uniform: str = _D["on_uniform"].default  # a near-uniform map (all information lost): "warn" or "raise"
    device: object = None  # where maps are computed; None: where the anchor lives (a fold target may be meta)


NEAR_UNIFORM = 0.9  # relative entropy (entropy / log(m n)); a hard map is ~0.5


@dataclass(frozen=True)
class HeadShapes:
    """(number of heads, head width) of the parent and of the anchor, and
    their numbers of key/value heads (fewer than heads with grouped-query
    attention; None = as many as heads)."""
    parent: tuple
    anchor: tuple
    kv: tuple | None = None
    scaled: bool = True  # scores divided by sqrt(head width) (GPT-2's scale_attn_weights=False: not)

    @property
    def kv_heads(self) -> tuple:
        return self.kv or (self.parent[0], self.anchor[0])

    @property
    def score_scale(self) -> float:
        """The factor on carried Q: an anchor unit stands for d_parent/d_anchor
        parent units, so a score (a sum over a head's units) shrinks by it;
        where scores are divided by sqrt(head width), that division makes up
        sqrt of it."""
        ratio = self.parent[1] / self.anchor[1]
        return math.sqrt(ratio) if self.scaled else ratio


def carry(t: torch.Tensor, axis: int, matrix: torch.Tensor) -> torch.Tensor:
    """Contract `axis` of t (size m) with an (m, n) matrix: the axis becomes size n.
    A hard map (at most one entry per row: fold and prune maps) is applied as
    a scaled scatter-add, O(t) instead of O(t n): Qwen2.5-0.5B's fold spent
    most of its carrying time multiplying by zeros."""
    matrix = matrix.to(t.dtype)
    if int(matrix.count_nonzero()) <= matrix.shape[0] and int((matrix != 0).sum(1).max()) <= 1:
        value, target = matrix.abs().max(1)
        rows = (value > 0).nonzero().flatten()
        along = [-1 if a == axis else 1 for a in range(t.dim())]
        src = t.index_select(axis, rows) * matrix[rows, target[rows]].view(along)
        shape = [matrix.shape[1] if a == axis else size for a, size in enumerate(t.shape)]
        return torch.zeros(shape, dtype=t.dtype, device=t.device).index_add_(axis, target[rows], src)
    out = torch.tensordot(t, matrix, dims=([axis], [0]))
    return out.movedim(-1, axis)


def align_parent(spec: ArchSpec, anchor_sd: dict, parent_sd: dict, opts: AlignOptions, *,
                 heads: HeadShapes | None = None, activation_costs: dict | None = None,
                 residual_alpha: dict | None = None, sink=None, progress=None, stepwise: bool = False,
                 signals=None):
    """Align one parent to the anchor. Each parameter is carried to the anchor's
    shape as soon as all of its maps exist and handed to `sink(name, tensor)`;
    maps are dropped once nothing needs them, so memory stays near one layer's
    worth of maps. Returns (aligned state dict or None when `sink` is given,
    per-map stats).

    stepwise: return (steps, stats) without aligning anything yet: `steps` is
        a generator that does one flow-graph node per step (filling `stats`).
        Which parameters reach `sink` at which step depends on the flow graph
        alone, not on the weights, so several parents walked in lockstep hand
        over their versions of a parameter at the same step: streaming fusion
        can finish a fused tensor before the next layer is aligned.
    signals: fold/prune only, the parent's importance measured on data
        (`importance.measure`); None: weight magnitude."""
    stats: dict[str, dict] = {}
    aligned = {} if sink is None else None
    steps = _steps(spec, anchor_sd, parent_sd, opts, stats, heads, activation_costs, residual_alpha,
                   sink or aligned.__setitem__, progress, signals)
    if stepwise:
        return steps, stats
    for _ in steps:
        pass
    return aligned, stats


def _steps(spec, anchor_sd, parent_sd, opts, stats, heads, activation_costs, residual_alpha, sink, progress,
           signals=None):
    maps = _MapStore(spec)
    emit = _scaled_q(spec, heads, sink, kept=opts.mode == "prune")
    # Everything is computed where the anchor lives; parent tensors move there one by one.
    device = opts.device or next(iter(anchor_sd.values())).device
    carried = _InputCarrier(spec, parent_sd, maps, device)
    folder = (_Folder(spec, carried, heads, opts.seed, opts.mode, signals) if opts.mode in ("fold", "prune")
              else None)
    pending = {}  # Q/K/V maps made together at a Heads marker, taken by their Solve nodes
    waiting = {name: {t for a in axes if a is not None for t in a.tms} for name, axes in spec.axes.items()}
    _finalise_ready(spec, waiting, carried, maps, emit)
    for i, node in enumerate(spec.nodes):
        t0 = time.perf_counter()
        if isinstance(node, Heads):
            if folder is not None:
                made, stats[node.tm] = folder.heads(node)
            elif opts.head_alignment == "aware" or node.rotary:
                costs = ({tm: activation_costs[tm] for tm in (node.q, node.k, node.v)
                          if tm in activation_costs} if activation_costs is not None else
                         {tm: _weights_cost(spec, Solve(tm, ((tm, None),)), anchor_sd, carried)
                          for tm in (node.q, node.k, node.v)})
                make = _rotary_head_maps if node.rotary else _head_aware_maps
                made, stats[node.tm] = make(node, costs, heads, opts)
            else:
                made, stats[node.tm] = {}, {"heads": heads and list(heads.parent)}
            if node.attn is not None and node.attn in made:  # no Solve node of its own
                maps.put(node.attn, made.pop(node.attn))
                _finalise_ready(spec, waiting, carried, maps, emit, solved=node.attn)
            pending.update(made)
        elif isinstance(node, Solve):
            if node.tm in pending:
                plan = pending.pop(node.tm)
                stats[node.tm] = {"shape": list(plan.shape), "from": "heads"}
            elif folder is not None:
                plan, stats[node.tm] = folder.solve(node, anchor_sd)
            else:
                plan, stats[node.tm] = _solve_free(spec, node, anchor_sd, carried, activation_costs, opts)
            maps.put(node.tm, plan)
            del plan  # the store keeps a float32 copy: the solver's float64 plan goes now, not at the next solve
        elif isinstance(node, Combine):
            alpha = 0.5 if residual_alpha is None else residual_alpha[node.tm]
            maps.put(node.tm, combine(maps.get(node.skip), maps.get(node.branch), alpha))
            maps.release(node.skip, node.branch)
            stats[node.tm] = {"combine": [node.skip, node.branch], "alpha": _alpha_summary(alpha)}
        elif isinstance(node, Share):
            maps.put(node.tm, maps.get(node.same_as))
            maps.release(node.same_as)
            stats[node.tm] = {"same_as": node.same_as}
        _finalise_ready(spec, waiting, carried, maps, emit, solved=node.tm)
        stats[node.tm]["seconds"] = time.perf_counter() - t0
        if progress:
            progress(opts.mode if folder else "align", i + 1, len(spec.nodes))
        yield node.tm


def _check_uniform(tm, stats, opts):
    """Flag (or refuse) a map that has gone nearly uniform: every anchor unit
    then receives the mean of all parent units, and the model is destroyed."""
    if stats.get("relative_entropy", 0.0) > NEAR_UNIFORM:
        stats["near_uniform"] = True
        if opts.on_uniform == "raise":
            raise SolverError(f"transport map {tm} is nearly uniform (relative entropy "
                              f"{stats['relative_entropy']:.2f}) at reg {opts.reg:g}: lower reg")
    return stats


def _scaled_q(spec, heads, emit, kept=False):
    """Wrap `emit` so that carried Q rows (and bias) get the softmax-scale factor.
    kept: units are kept, not merged (pruning): a score then sums d_anchor of
    the parent's d_parent products, and the factor is sqrt(d_anchor / d_parent)."""
    scale = 1.0 if heads is None else heads.score_scale ** (-1 if kept else 1)
    if scale == 1.0:
        return emit
    q_maps = {h.q for h in spec.attention}

    def scaled(name, t):
        for q in q_maps:
            slot = out_slot(spec.axes[name], q)
            if slot is not None:
                t = t.clone()
                part_of(t, *slot).mul_(scale)  # a view: scales Q's part of a fused QKV in place
        emit(name, t)
    return scaled


class _Folder:
    """Maps for one parent from its own units (mode "fold": clustering; mode
    "prune": keeping the most important units): the residual stream is
    clustered (pruned) once over every tensor that reads or writes it;
    attention is handled head-aware at its `Heads` marker; every other free
    map uses the rows that its weights cost would compare.

    Importance (`otcompress.importance`): weight magnitude (`fold.importance`)
    without `signals`; with them, measured on calibration data: each unit's
    RMS activation times the norm of what reads it (MLP and attention
    units; the residual stream keeps magnitude, see `_stream_plan`), or
    first-order Taylor scores. Folding weighs each unit by its squared outgoing norm
    (`fold.outgoing_weights`: a unit that nothing reads pulls no centroid),
    or with activation signals by its squared activation importance."""

    def __init__(self, spec, carried, heads, seed, mode="fold", signals=None):
        self.spec, self.carried, self.seed, self.mode = spec, carried, seed, mode
        self.head_shapes, self.signals = heads, signals
        self.kind = "weights" if signals is None else signals.kind
        self.group = _residual_groups(spec)
        self.group_plans = {}

    def _energy(self, probes_):
        return importance.energy_share([self.signals.energy[p] for p in probes_ if p in self.signals.energy])

    def _taylor(self, tms):
        parts = [self.signals.taylor[t] for t in tms if t in self.signals.taylor]
        return sum(parts) if parts else None

    def _unit_scores(self, node, out):
        """Measured importance of a free map's units (None: weight magnitude)."""
        if self.kind == "taylor":
            return self._taylor({group for group, _ in node.parts})
        if self.kind == "activations":
            energy = self._energy([p for _, p in node.parts])
            return None if energy is None else fold.activation_importance(energy, out)
        return None

    def solve(self, node, anchor_sd):
        if self.group.get(node.tm) is not None:
            root = self.group[node.tm]
            if root not in self.group_plans:
                self.group_plans[root] = self._stream_plan(root, anchor_sd)
            plan = self.group_plans[root]
        else:
            rows = _feature_rows(self.spec, node, lambda name: self.carried(name))
            out = self._outgoing({group for group, _ in node.parts})
            width = _width(self.spec, node, anchor_sd)
            scores = self._unit_scores(node, out)
            if self.mode == "prune":
                plan = fold.prune_plan(rows, out, width, scores)
            else:
                weights = fold.outgoing_weights(out) if scores is None else scores * scores
                plan = fold.cluster_plan(torch.cat(rows, 1), width, self.seed, weights)
        sizes = (plan > 0).sum(0)
        return plan, {"shape": list(plan.shape), "method": self.mode, "importance": self.kind,
                      "cluster_size": {"min": int(sizes.min()), "max": int(sizes.max())}}

    def _outgoing(self, tms) -> list:
        """Per-unit rows of every axis that reads one of `tms` (`In`): the
        columns of the layers fed by these units, as the parent has them."""
        return [_rows(self.carried.raw(name), axis) for name, axes in self.spec.axes.items()
                for axis, a in enumerate(axes) if isinstance(a, In) and a.tm in tms]

    def _stream_plan(self, root, anchor_sd):
        """One map for the residual stream from every tensor that reads or
        writes it, each taken as it is (tensor, unit axis): the features are
        never copied into rows (`fold.slot_gram`, `fold.slot_shares`).
        Measured importance: Taylor scores; with activations (and without
        data) weight magnitude of what reads a channel. Its writers tell
        channels apart worse: every block's norm gains and output biases
        write every channel, and scoring by writes times reads pruned digits
        parent_b to 91% after distillation against 94.8% by reads (a bug
        that summed each 1-D writer to a constant once made the two agree)."""
        members = {tm for tm, r in self.group.items() if r == root}
        writes, reads, width = [], [], None
        for name, axes in self.spec.axes.items():
            if is_statistic(name):  # carried, never clustered on
                continue
            for axis, role in enumerate(axes):
                for t in (role.tms if role is not None else ()):
                    if t in members:
                        part = (role.parts.index(t), len(role.parts)) if isinstance(role, Split) else None
                        slot = (part_of(self.carried.raw(name), axis, part), axis)
                        (reads if isinstance(role, In) else writes).append(slot)
                        if not isinstance(role, In) and width is None:
                            width = part_of(anchor_sd[name], axis, part).shape[axis]
        out = fold.slot_shares(reads)
        # Measured importance of the stream: Taylor scores only. Its activations
        # mislead (digits ViTs pruned to hidden 16, 300 steps of distillation:
        # parent_b 91.3 +- 1.3% from the raw stream's energy, 91.2 +- 0.3% from its
        # norms' outputs, 94.7 +- 0.3% by weight magnitude with the heads and MLP
        # units by activations): "activations" leaves the stream to magnitude.
        scores = None  # (squared) measured importance
        if self.kind == "taylor":
            scores = self._taylor(members)
            scores = None if scores is None else scores * scores
        if self.mode == "prune":
            if scores is None:  # magnitude: what reads a channel (every block's norm and biases write them all)
                scores = out if out is not None else fold.slot_shares(writes)
            return fold.select_plan(fold.select(scores, width), scores.shape[0])
        weights = out if scores is None else scores
        labels = fold.kmeans(None, width, seed=self.seed, weights=weights, gram=fold.slot_gram(writes + reads))
        return fold.plan(labels, width, weights=weights)

    def _head_scores(self, node, o_cols, group_of=None):
        """Measured per-unit (Q/K, V/O) importances of an attention layer, one
        per query-head unit (`group_of`: rotary, each query head's key/value
        group); None: weight magnitude."""
        if self.kind == "weights":
            return None
        d = None if group_of is None else self.head_shapes.parent[1]
        rep = (lambda x: x) if group_of is None else (  # noqa: E731 a group's units for each of its query heads
            lambda x: x.reshape(-1, d)[group_of].flatten())
        if self.kind == "taylor":
            t = self.signals.taylor
            s_qk = t[node.q] + rep(t[node.k])
            s_vo = t[node.v] if group_of is None else rep(t[node.v]) + t[node.attn]
            return s_qk, s_vo
        e = self.signals.energy
        q, k = (e[importance.unit_probe(self.spec, tm)] for tm in (node.q, node.k))
        # Heads by their shares of both, as by magnitude: ranking heads by what
        # they add through O alone (Minitron) measured worse (digits parent_b,
        # 300 steps: 93.3 +- 0.2% against 94.7 +- 0.3%).
        return q.sqrt() * rep(k).sqrt(), fold.activation_importance(e[importance.context_probe(self.spec, node)],
                                                                     [o_cols])

    def heads(self, node: Heads):
        if self.head_shapes is None:
            raise ValueError("folding attention needs the head shapes of parent and anchor")
        (hp, dp), (ha, da) = self.head_shapes.parent, self.head_shapes.anchor
        rows = {tm: torch.cat(_feature_rows(self.spec, Solve(tm, ((tm, None),)), self.carried), 1)
                for tm in (node.q, node.k, node.v)}
        read_by_o = node.attn if node.rotary and node.attn is not None else node.v
        o_cols = torch.cat(self._outgoing({read_by_o}), 1)
        stats = {"method": self.mode, "heads": [hp, ha], "importance": self.kind}
        if node.rotary:
            if dp != da:
                raise IncompatibleModelsError(f"rotary attention needs equal head widths (parent {dp}, "
                                              f"target {da})")
            if self.mode == "prune":
                group_of = torch.arange(hp, device=o_cols.device) // (hp // self.head_shapes.kv_heads[0])
                t_q, t_kv = fold.prune_rotary_plans(rows[node.q], rows[node.k], rows[node.v], o_cols, hp,
                                                    self.head_shapes.kv_heads, ha, dp,
                                                    self._head_scores(node, o_cols, group_of))
            else:
                t_q, t_kv = fold.rotary_head_plans(rows[node.q], rows[node.k], rows[node.v], hp,
                                                   self.head_shapes.kv_heads, ha, dp, self.seed)
            made = {node.q: t_q, node.k: t_kv, node.v: t_kv}
            if node.attn is not None:  # whole heads: the output blocks follow the query heads
                made[node.attn] = t_q
            return made, stats
        scores = self._head_scores(node, o_cols)
        if self.mode == "prune":
            t_qk, t_v = fold.prune_head_plans(rows[node.q], rows[node.k], rows[node.v], o_cols, hp, ha, da, scores)
        else:
            weights_v = fold.outgoing_weights([o_cols]) if scores is None else scores[1] * scores[1]
            t_qk, t_v = fold.head_plans(rows[node.q], rows[node.k], rows[node.v], o_cols, hp, ha, da, self.seed,
                                        weights_v=weights_v)
        return {node.q: t_qk, node.k: t_qk, node.v: t_v}, stats


def _head_aware_maps(node: Heads, costs: dict, heads: HeadShapes, opts):
    """Heads first, then units (issue 8): each (parent head, anchor head) pair
    gets a within-head map, one for Q and K together (a score sums Q-K unit
    products, so both must move alike) and one for V; their transport costs
    make a head-to-head cost, OT on it gives the head plan P, and the layer's
    map is the block matrix P[i, j] * T_ij. So Q, K and V of an anchor head
    are drawn from the same parent heads, unlike one map over all units."""
    (hp, dp), (ha, da) = heads.parent, heads.anchor
    norm = lambda c: transport.normalise_cost(c.double(), opts.cost_norm)  # noqa: E731
    c_q, c_v = norm(costs[node.q]), norm(costs[node.v])
    # A shared Q/K map's activation cost already covers both (no separate K cost).
    c_qk = (c_q * c_q + norm(costs[node.k]) ** 2).sqrt() if node.k in costs else c_q
    blocks = {}
    head_cost = torch.zeros(hp, ha, dtype=torch.float64, device=c_q.device)
    for i in range(hp):
        for j in range(ha):
            rows, cols = slice(i * dp, (i + 1) * dp), slice(j * da, (j + 1) * da)
            pair = [_solve(f"{node.tm}[{i},{j}]", c[rows, cols], opts) for c in (c_qk, c_v)]
            blocks[i, j] = [r.plan for r in pair]
            head_cost[i, j] = sum(r.cost for r in pair)
    head = _solve(f"{node.tm} heads", norm(head_cost), opts)
    t_qk = torch.zeros_like(c_q)
    t_v = torch.zeros_like(c_v)
    for (i, j), (b_qk, b_v) in blocks.items():
        rows, cols = slice(i * dp, (i + 1) * dp), slice(j * da, (j + 1) * da)
        t_qk[rows, cols] = head.plan[i, j] * b_qk
        t_v[rows, cols] = head.plan[i, j] * b_v
    return {node.q: t_qk, node.k: t_qk, node.v: t_v}, {"heads": head.stats(), "method": "head-aware"}


def _rotary_head_maps(node: Heads, costs: dict, heads: HeadShapes, opts):
    """Whole heads only (rotary embeddings fix the units inside a head), and
    query heads move with their key/value group: OT between parent and anchor
    K/V groups on a cost that adds the K and V head costs and the cost of the
    best matching of their query heads (a small OT per group pair); the query
    head plan nests those matchings inside the group plan. Every map is then
    (head plan) x (identity inside a head)."""
    (hp, d), (ha, da) = heads.parent, heads.anchor
    if d != da:
        raise IncompatibleModelsError(f"rotary attention needs equal head widths (parent {d}, anchor {da}): "
                                      "fuse models that differ in head count, not head width")
    (gp, ga), norm = heads.kv_heads, (lambda c: transport.normalise_cost(c.double(), opts.cost_norm))
    rp, ra = hp // gp, ha // ga
    c_q, c_k, c_v = (norm(costs[tm]) for tm in (node.q, node.k, node.v))

    def block(c, i, j):
        return c[i * d:(i + 1) * d, j * d:(j + 1) * d]

    def head_cost(c, i, j):  # identity inside the head: the mean of the block's diagonal
        return block(c, i, j).diagonal().mean()
    group_cost = torch.zeros(gp, ga, dtype=torch.float64, device=c_q.device)
    q_plans, v_plans = {}, {}
    for g in range(gp):
        for h in range(ga):
            qc = torch.stack([torch.stack([head_cost(c_q, g * rp + i, h * ra + j) for j in range(ra)])
                              for i in range(rp)])
            q = _solve(f"{node.tm} q[{g},{h}]", norm(qc), opts) if qc.numel() > 1 else None
            q_plans[g, h] = q.plan if q else torch.ones_like(qc)
            # Values carry no rotation: inside a head their units may move (V's rows with O's columns).
            v = _solve(f"{node.tm} v[{g},{h}]", block(c_v, g, h), opts)
            v_plans[g, h] = v.plan
            group_cost[g, h] = head_cost(c_k, g, h) + v.cost + (q_plans[g, h] * qc).sum()
    groups = _solve(f"{node.tm} kv heads", norm(group_cost), opts)
    within = torch.eye(d, dtype=torch.float64, device=c_q.device) / d
    p_q = torch.zeros(hp, ha, dtype=torch.float64, device=c_q.device)
    t_v = torch.zeros_like(c_v)
    t_attn = torch.zeros_like(c_q)
    for (g, h), plan in q_plans.items():
        p_q[g * rp:(g + 1) * rp, h * ra:(h + 1) * ra] = groups.plan[g, h] * plan
        t_v[g * d:(g + 1) * d, h * d:(h + 1) * d] = groups.plan[g, h] * v_plans[g, h]
        for i in range(rp):  # each query head's output block holds its group's values
            for j in range(ra):
                hi, hj = g * rp + i, h * ra + j
                t_attn[hi * d:(hi + 1) * d, hj * d:(hj + 1) * d] = p_q[hi, hj] * v_plans[g, h]
    made = {node.q: torch.kron(p_q, within), node.k: torch.kron(groups.plan, within), node.v: t_v}
    if node.attn is not None:
        made[node.attn] = t_attn
    return made, {"kv_heads": groups.stats(), "method": "rotary heads"}


def _residual_groups(spec) -> dict:
    """tm -> root of its residual stream (maps joined by Combine or Share);
    maps that join nothing are absent."""
    parent = {}

    def find(t):
        while parent.setdefault(t, t) != t:
            t = parent[t]
        return t
    for n in spec.nodes:
        pairs = ([(n.tm, n.skip), (n.tm, n.branch)] if isinstance(n, Combine)
                 else [(n.tm, n.same_as)] if isinstance(n, Share) else [])
        for a, b in pairs:
            parent[find(a)] = find(b)
    return {t: find(t) for t in parent}


def _width(spec, node, anchor_sd):
    group = node.parts[0][0]
    name = spec.params_with_out(group)[0]
    axis, part = out_slot(spec.axes[name], group)
    return part_of(anchor_sd[name], axis, part).shape[axis]


def _solve_free(spec, node: Solve, anchor_sd, carried, activation_costs, opts):
    """(plan, stats) of a free map. A weights cost is built here, so it is
    normalised in place: for a 4096 x 2048 MLP map each float64 copy is 64 MB."""
    if activation_costs is not None:  # the caller's (kept across a reg sweep): normalise a copy
        cost = transport.normalise_cost(activation_costs[node.tm], opts.cost_norm)
    else:
        cost = transport.normalise_cost(_weights_cost(spec, node, anchor_sd, carried), opts.cost_norm,
                                        inplace=True)
    result = _solve(node.tm, cost, opts)
    del cost  # the solver is done with it; the stats below need only the plan
    return result.plan, _check_uniform(node.tm, result.stats(), opts)


def _solve(tm, cost, opts):
    m, n = cost.shape
    try:
        return transport.solve(transport.uniform(m, device=cost.device), transport.uniform(n, device=cost.device),
                               cost, solver=opts.solver, reg=opts.reg, max_iter=opts.max_iter, tol=opts.tol,
                               on_unconverged=opts.on_unconverged)
    except SolverError as e:
        raise SolverError(f"transport map {tm}: {e}") from None


def _finalise_ready(spec, waiting, carried, maps, emit, solved=None):
    """Carry every parameter whose maps are now all known, hand it on, and
    release what it held. A derived `__rownorm__` entry goes before the weight
    it is derived from: releasing the weight may free the weight's input map
    (a head reading the last stream is that map's last user)."""
    ready = [n for n, tms in waiting.items() if not tms or solved in tms]
    for name in sorted(ready, key=lambda n: not n.endswith(".__rownorm__")):
        if solved is not None:
            waiting[name].discard(solved)
        if waiting[name] or not all(maps.has(t) for a in spec.axes[name] if a is not None for t in a.tms):
            continue
        emit(name, _carry_all(carried(name), spec.axes[name], maps, inputs_only=False))
        carried.forget(name)
        maps.done_with(spec.axes[name])
        del waiting[name]


class _MapStore:
    """Transport maps (float32, like the weights) with their row/column
    rescalings, each dropped when its last user is done."""

    def __init__(self, spec):
        self.plans, self.rescaled_cache, self.uses = {}, {}, Counter()
        # Users of each rescaling, so each copy goes when its own users are done:
        # an MLP map's column-stochastic copy once its layer's rows are carried,
        # while the map lives on until the next layer's inputs are carried
        # (4096 x 2048: 32 MB a copy, per parent walked in lockstep).
        self.rescaled_uses = Counter()
        for axes in spec.axes.values():
            self.uses.update(t for a in axes if a is not None for t in a.tms)
            self.rescaled_uses.update((t, _rescaling(a)) for a in axes if a is not None for t in a.tms)
        for n in spec.nodes:
            if isinstance(n, Combine):
                self.uses.update([n.skip, n.branch])
            elif isinstance(n, Share):
                self.uses[n.same_as] += 1

    def put(self, tm, plan):
        self.plans[tm] = plan.float()

    def has(self, tm):
        return tm in self.plans

    def get(self, tm):
        return self.plans[tm]

    def rescaled(self, tm, rescale):
        key = (tm, rescale.__name__)
        if key not in self.rescaled_cache:
            # A pruned unit has an empty row (0/0 in float32): it carries as zeros.
            self.rescaled_cache[key] = rescale(self.plans[tm]).nan_to_num_(0.0)
        return self.rescaled_cache[key]

    def done_with(self, axes):
        """A parameter with these axes is carried: release its maps and rescalings."""
        for a in axes:
            for tm in (a.tms if a is not None else ()):
                key = (tm, _rescaling(a))
                self.rescaled_uses[key] -= 1
                if self.rescaled_uses[key] <= 0:
                    self.rescaled_cache.pop(key, None)
                self.release(tm)

    def release(self, *tms):
        for tm in tms:
            self.uses[tm] -= 1
            if self.uses[tm] <= 0:
                self.plans.pop(tm, None)
                for kind in ("row_stochastic", "column_stochastic"):
                    self.rescaled_cache.pop((tm, kind), None)


def _rescaling(role) -> str:
    """The rescaling that carries an axis of this role (the cache key's kind)."""
    return "row_stochastic" if isinstance(role, In) else "column_stochastic"


def combine(t_skip: torch.Tensor, t_branch: torch.Tensor, alpha) -> torch.Tensor:
    """Residual join (paper Eq. 1). The weight is measured on the anchor, so it
    is applied per anchor unit (column): each column stays a convex combination
    of the two maps' columns and keeps the anchor marginal."""
    a = torch.as_tensor(alpha, dtype=t_skip.dtype)
    return t_skip * (1 - a) + t_branch * a


def _alpha_summary(alpha):
    if isinstance(alpha, torch.Tensor):
        return {"mean": float(alpha.mean()), "min": float(alpha.min()), "max": float(alpha.max())}
    return float(alpha)


class _InputCarrier:
    """Parent tensors with their `In` axes carried, computed once and reused for
    both the weights-based features and the final alignment."""

    def __init__(self, spec, parent_sd, maps, device):
        self.spec, self.sd, self.maps, self.device, self.cache = spec, parent_sd, maps, device, {}

    def raw(self, name):
        """The parent tensor in float32 on the working device, nothing carried.
        A `<module>.__rownorm__` entry (data-free repair) is derived here: the
        norms of the module's weight rows once its inputs are carried, i.e. in
        the anchor's input space, one per parent output unit."""
        if name.endswith(".__rownorm__") and name not in self.sd:
            weight = name[: -len("__rownorm__")] + "weight"
            axis = next(i for i, a in enumerate(self.spec.axes[weight]) if isinstance(a, Out))
            return self(weight).movedim(axis, 0).flatten(1).norm(dim=1)
        return self.sd[name].detach().to(self.device).float()

    def __call__(self, name):
        if name not in self.cache:
            self.cache[name] = _carry_all(self.raw(name), self.spec.axes[name], self.maps, inputs_only=True)
        return self.cache[name]

    def forget(self, name):
        self.cache.pop(name, None)


def _carry_all(t, axes, maps, *, inputs_only):
    for axis, role in enumerate(axes):
        if isinstance(role, In):
            if inputs_only:
                t = carry(t, axis, maps.rescaled(role.tm, transport.row_stochastic))
        elif isinstance(role, Out) and not inputs_only:
            t = carry(t, axis, maps.rescaled(role.tm, transport.column_stochastic))
        elif isinstance(role, Split) and not inputs_only:
            t = torch.cat([carry(chunk, axis, maps.rescaled(tm, transport.column_stochastic))
                           for chunk, tm in zip(t.chunk(len(role.parts), dim=axis), role.parts)], axis)
    return t


def _feature_rows(spec, node: Solve, tensor) -> list:
    """Per-unit feature blocks of a free map: the rows of every parameter on the
    unit axis (weights with inputs already carried, bias, gains...); never the
    repair statistics, which only ride along once the map is made."""
    rows = []
    for group, _probe in node.parts:
        for name in spec.params_with_out(group):
            if is_statistic(name):
                continue
            axis, part = out_slot(spec.axes[name], group)
            rows.append(_rows(part_of(tensor(name), axis, part), axis))
    return rows


def _weights_cost(spec, node: Solve, anchor_sd, inputs_carried) -> torch.Tensor:
    """Euclidean distance between parent and anchor unit features."""
    parent_rows = _feature_rows(spec, node, inputs_carried)
    anchor_rows = _feature_rows(spec, node, lambda name: anchor_sd[name].detach().float())
    return transport.euclidean_cost(torch.cat(parent_rows, 1), torch.cat(anchor_rows, 1))


def _rows(t: torch.Tensor, axis: int) -> torch.Tensor:
    t = t.movedim(axis, 0)
    return t.reshape(t.shape[0], -1)
