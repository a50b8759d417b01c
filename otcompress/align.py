"""Align one parent to the anchor by walking the flow graph: compute every
transport map in order, then carry each parameter axis through its map.

Rectangular maps (method.md): an axis that *reads* a space (`In`) is carried by
R = diag(1/mu) T (inputs landing on one anchor unit have their weights summed);
an axis whose entries *live in* a space (`Out`) by C = T diag(1/nu) (each anchor
unit a convex combination of parent units)."""
from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass

import torch

from otcompress import transport
from otcompress.errors import SolverError
from otcompress.flowgraph import ArchSpec, Combine, In, Out, Share, Solve


@dataclass
class AlignOptions:
    solver: str = "sinkhorn"
    reg: float = 0.02
    cost_norm: str = "max"
    max_iter: int = 5000
    tol: float = 1e-6


def carry(t: torch.Tensor, axis: int, matrix: torch.Tensor) -> torch.Tensor:
    """Contract `axis` of t (size m) with an (m, n) matrix: the axis becomes size n."""
    out = torch.tensordot(t, matrix.to(t.dtype), dims=([axis], [0]))
    return out.movedim(-1, axis)


def align_parent(spec: ArchSpec, anchor_sd: dict, parent_sd: dict, opts: AlignOptions, *,
                 activation_costs: dict | None = None, residual_alpha: dict | None = None,
                 sink=None, progress=None):
    """Align one parent to the anchor. Each parameter is carried to the anchor's
    shape as soon as all of its maps exist and handed to `sink(name, tensor)`;
    maps are dropped once nothing needs them, so memory stays near one layer's
    worth of maps. Returns (aligned state dict or None when `sink` is given,
    per-map stats)."""
    maps = _MapStore(spec)
    stats: dict[str, dict] = {}
    aligned = {} if sink is None else None
    emit = sink or aligned.__setitem__
    carried = _InputCarrier(spec, parent_sd, maps)
    waiting = {name: {a.tm for a in axes if a is not None} for name, axes in spec.axes.items()}
    _finalise_ready(spec, waiting, carried, maps, emit)
    for i, node in enumerate(spec.nodes):
        t0 = time.perf_counter()
        if isinstance(node, Solve):
            cost = (activation_costs[node.tm] if activation_costs is not None
                    else _weights_cost(spec, node, anchor_sd, carried))
            result = _solve(node.tm, transport.normalise_cost(cost, opts.cost_norm), opts)
            maps.put(node.tm, result.plan)
            stats[node.tm] = result.stats()
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
            progress("align", i + 1, len(spec.nodes))
    return aligned, stats


def _solve(tm, cost, opts):
    m, n = cost.shape
    try:
        return transport.solve(transport.uniform(m), transport.uniform(n), cost, solver=opts.solver,
                               reg=opts.reg, max_iter=opts.max_iter, tol=opts.tol)
    except SolverError as e:
        raise SolverError(f"transport map {tm}: {e}") from None


def _finalise_ready(spec, waiting, carried, maps, emit, solved=None):
    """Carry every parameter whose maps are now all known, hand it on, and
    release what it held."""
    for name in [n for n, tms in waiting.items() if not tms or solved in tms]:
        if solved is not None:
            waiting[name].discard(solved)
        if waiting[name] or not all(maps.has(a.tm) for a in spec.axes[name] if a is not None):
            continue
        emit(name, _carry_all(carried(name), spec.axes[name], maps, inputs_only=False))
        carried.forget(name)
        maps.release(*(a.tm for a in spec.axes[name] if a is not None))
        del waiting[name]


class _MapStore:
    """Transport maps (float32, like the weights) with their row/column
    rescalings, each dropped when its last user is done."""

    def __init__(self, spec):
        self.plans, self.rescaled_cache, self.uses = {}, {}, Counter()
        for axes in spec.axes.values():
            self.uses.update(a.tm for a in axes if a is not None)
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
            self.rescaled_cache[key] = rescale(self.plans[tm])
        return self.rescaled_cache[key]

    def release(self, *tms):
        for tm in tms:
            self.uses[tm] -= 1
            if self.uses[tm] <= 0:
                self.plans.pop(tm, None)
                for kind in ("row_stochastic", "column_stochastic"):
                    self.rescaled_cache.pop((tm, kind), None)


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

    def __init__(self, spec, parent_sd, maps):
        self.spec, self.sd, self.maps, self.cache = spec, parent_sd, maps, {}

    def __call__(self, name):
        if name not in self.cache:
            self.cache[name] = _carry_all(self.sd[name].detach().float(), self.spec.axes[name],
                                          self.maps, inputs_only=True)
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
    return t


def _weights_cost(spec, node: Solve, anchor_sd, inputs_carried) -> torch.Tensor:
    """Euclidean distance between parent and anchor unit features: the rows of
    every parameter on the unit axis (weights with inputs already aligned, bias,
    gains...), concatenated."""
    parent_rows, anchor_rows = [], []
    for group, _probe in node.parts:
        for name in spec.params_with_out(group):
            axis = next(i for i, a in enumerate(spec.axes[name]) if isinstance(a, Out) and a.tm == group)
            parent_rows.append(_rows(inputs_carried(name), axis))
            anchor_rows.append(_rows(anchor_sd[name].detach().float(), axis))
    return transport.euclidean_cost(torch.cat(parent_rows, 1), torch.cat(anchor_rows, 1))


def _rows(t: torch.Tensor, axis: int) -> torch.Tensor:
    t = t.movedim(axis, 0)
    return t.reshape(t.shape[0], -1)
