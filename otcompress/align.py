"""Align one parent to the anchor by walking the flow graph: compute every
transport map in order, then carry each parameter axis through its map.

Rectangular maps (method.md): an axis that *reads* a space (`In`) is carried by
R = diag(1/mu) T (inputs landing on one anchor unit have their weights summed);
an axis whose entries *live in* a space (`Out`) by C = T diag(1/nu) (each anchor
unit a convex combination of parent units)."""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from otcompress import transport
from otcompress.errors import SolverError
from otcompress.flowgraph import ArchSpec, Combine, In, Out, Share, Solve


@dataclass
class AlignOptions:
    solver: str = "sinkhorn"
    reg: float = 0.08
    residual: str = "average"  # average | scalar | matrix
    cost_norm: str = "max"
    max_iter: int = 5000
    tol: float = 1e-6


def carry(t: torch.Tensor, axis: int, matrix: torch.Tensor) -> torch.Tensor:
    """Contract `axis` of t (size m) with an (m, n) matrix: the axis becomes size n."""
    out = torch.tensordot(t, matrix.to(t.dtype), dims=([axis], [0]))
    return out.movedim(-1, axis)


def align_parent(spec: ArchSpec, anchor_sd: dict, parent_sd: dict, opts: AlignOptions, *,
                 activation_costs: dict | None = None, residual_alpha: dict | None = None,
                 progress=None) -> tuple[dict, dict]:
    """Returns (aligned parent state dict at the anchor's shapes, per-map stats)."""
    maps: dict[str, torch.Tensor] = {}
    stats: dict[str, dict] = {}
    inputs_carried = _InputCarrier(spec, parent_sd, maps)
    for i, node in enumerate(spec.nodes):
        t0 = time.perf_counter()
        if isinstance(node, Solve):
            if activation_costs is not None:
                cost = activation_costs[node.tm]
            else:
                cost = _weights_cost(spec, node, anchor_sd, inputs_carried)
            cost = transport.normalise_cost(cost, opts.cost_norm)
            m, n = cost.shape
            try:
                result = transport.solve(transport.uniform(m), transport.uniform(n), cost,
                                         solver=opts.solver, reg=opts.reg,
                                         max_iter=opts.max_iter, tol=opts.tol)
            except SolverError as e:
                raise SolverError(f"transport map {node.tm}: {e}") from None
            maps[node.tm] = result.plan
            stats[node.tm] = result.stats()
        elif isinstance(node, Combine):
            alpha = 0.5 if residual_alpha is None else residual_alpha[node.tm]
            maps[node.tm] = combine(maps[node.skip], maps[node.branch], alpha)
            stats[node.tm] = {"combine": [node.skip, node.branch], "alpha": _alpha_summary(alpha)}
        elif isinstance(node, Share):
            maps[node.tm] = maps[node.same_as]
            stats[node.tm] = {"same_as": node.same_as}
        stats[node.tm]["seconds"] = time.perf_counter() - t0
        if progress:
            progress("align", i + 1, len(spec.nodes))
    aligned = {name: _carry_all(inputs_carried(name), spec.axes[name], maps, inputs_only=False)
               for name in spec.axes}
    return aligned, stats


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


def _carry_all(t, axes, maps, *, inputs_only):
    for axis, role in enumerate(axes):
        if isinstance(role, In):
            if inputs_only:
                t = carry(t, axis, _rescaled(maps, role.tm, transport.row_stochastic))
        elif isinstance(role, Out) and not inputs_only:
            t = carry(t, axis, _rescaled(maps, role.tm, transport.column_stochastic))
    return t


def _rescaled(maps, tm, rescale):
    # Many tensors share a map: rescale each map once (float32, like the weights).
    key = (tm, rescale.__name__)
    if key not in maps:
        maps[key] = rescale(maps[tm]).float()
    return maps[key]


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
