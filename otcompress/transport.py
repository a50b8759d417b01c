"""Transport on rectangular (m, n) costs: cost matrices, EMD, Sinkhorn, and the
row/column rescalings of method.md. Pure tensor functions, no model knowledge.

Conventions: a transport map `T` has shape (m, n): m parent units (rows,
marginal `mu`) and n anchor units (columns, marginal `nu`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from otcompress.errors import InvalidOptionError, SolverError

# Plain (scaling) Sinkhorn is 5-30x faster than the log domain here, and exact in
# float64 while exp(-M/reg) stays far from underflow (1e-308 ~ exp(-709)).
_PLAIN_SCALING_MAX_EXPONENT = 200.0


@dataclass
class TransportResult:
    plan: torch.Tensor  # (m, n) float64
    cost: float  # <T, M> on the normalised cost
    marginal_error: float  # relative L1 error of both marginals
    iterations: int
    method: str

    def stats(self) -> dict:
        entropy = float(torch.special.entr(self.plan).sum())
        return {
            "shape": list(self.plan.shape),
            "method": self.method,
            "cost": self.cost,
            "entropy": entropy,
            "marginal_error": self.marginal_error,
            "iterations": self.iterations,
        }


def uniform(n: int) -> torch.Tensor:
    return torch.full((n,), 1.0 / n, dtype=torch.float64)


def euclidean_cost(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Pairwise Euclidean distances between rows of x (m, d) and y (n, d)."""
    x = x.to(torch.float32)
    y = y.to(torch.float32)
    sq = torch.addmm((y * y).sum(1)[None, :], x, y.T, alpha=-2.0).add_((x * x).sum(1, keepdim=True))
    return sq.clamp_min_(0).sqrt_().to(torch.float64)


def normalise_cost(cost: torch.Tensor, how: str = "max") -> torch.Tensor:
    """Scale a cost so that one `reg` means the same softness in every layer
    (paper App. D.3.1)."""
    if how == "none":
        return cost
    scale = {"max": cost.max, "mean": cost.mean}.get(how)
    if scale is None:
        raise InvalidOptionError(f"cost normalisation '{how}': use max, mean or none")
    s = float(scale())
    return cost / s if s > 0 else cost


def marginal_error(plan: torch.Tensor, mu: torch.Tensor, nu: torch.Tensor) -> float:
    rows = (plan.sum(1) - mu).abs().sum() / mu.sum()
    cols = (plan.sum(0) - nu).abs().sum() / nu.sum()
    return float(max(rows, cols))


def emd(mu: torch.Tensor, nu: torch.Tensor, cost: torch.Tensor) -> TransportResult:
    """Exact OT via POT's network simplex, with an iteration cap large enough that
    it does not silently return a sub-optimal plan at n ~ 3000."""
    import ot

    a = mu.double().numpy()
    b = nu.double().numpy()
    a, b = a / a.sum(), b / b.sum()
    M = np.ascontiguousarray(cost.double().numpy())
    plan, log = ot.emd(a, b, M, numItermax=10**8, log=True)
    if log.get("result_code", 1) != 1:
        raise SolverError(f"EMD did not reach optimality: {log.get('warning')}")
    plan = torch.from_numpy(plan)
    return TransportResult(plan, _transport_cost(plan, cost), marginal_error(plan, mu, nu), 0, "emd")


def sinkhorn(mu: torch.Tensor, nu: torch.Tensor, cost: torch.Tensor, reg: float, *,
             max_iter: int = 5000, tol: float = 1e-6) -> TransportResult:
    """Entropic OT. Uses the fast scaling iterations in float64 where they cannot
    underflow, otherwise the log domain (stable for any small reg). Stops when the
    relative L1 marginal error is below `tol`; raises SolverError if it never is."""
    if not reg > 0:
        raise InvalidOptionError(f"Sinkhorn needs reg > 0, got {reg}")
    cost = cost.double()
    mu, nu = mu.double(), nu.double()
    if float(cost.max() - cost.min()) / reg <= _PLAIN_SCALING_MAX_EXPONENT:
        result = _sinkhorn_scaling(mu, nu, cost, reg, max_iter, tol)
        if result is not None:
            return result
    return _sinkhorn_log(mu, nu, cost, reg, max_iter, tol)


def _sinkhorn_scaling(mu, nu, cost, reg, max_iter, tol):
    # Shifting the cost by its minimum leaves the plan unchanged and keeps K <= 1.
    # In place throughout: fresh m x n temporaries cost more than the arithmetic.
    K = torch.sub(cost, cost.min()).mul_(-1.0 / reg).exp_()
    u = torch.ones_like(mu)
    v = torch.ones_like(nu)
    it = 0
    for it in range(1, max_iter + 1):
        u = mu / (K @ v)
        v = nu / (K.T @ u)
        if it % 10 == 0 or it == max_iter:
            # After the v-update the column marginal is exact; check the rows.
            row_err = float((u * (K @ v) - mu).abs().sum())
            if not math.isfinite(row_err):
                return None  # fall back to the log domain
            if row_err <= tol:
                break
    plan = K.mul_(u[:, None]).mul_(v[None, :])
    if not math.isfinite(float(plan.sum())):
        return None
    return _finish(plan, mu, nu, cost, reg, it, tol, "sinkhorn")


def _sinkhorn_log(mu, nu, cost, reg, max_iter, tol):
    log_mu, log_nu = mu.log(), nu.log()
    f = torch.zeros_like(mu)
    g = torch.zeros_like(nu)
    neg_cost = -cost / reg
    buf = torch.empty_like(cost)  # one m x n buffer: allocation, not arithmetic, dominates
    it = 0
    for it in range(1, max_iter + 1):
        f = log_mu - _logsumexp(torch.add(neg_cost, g[None, :], out=buf), dim=1)
        g = log_nu - _logsumexp(torch.add(neg_cost, f[:, None], out=buf), dim=0)
        if it % 10 == 0 or it == max_iter:
            torch.add(neg_cost, f[:, None], out=buf).add_(g[None, :]).exp_()
            if float((buf.sum(1) - mu).abs().sum()) <= tol:
                break
    plan = (neg_cost + f[:, None] + g[None, :]).exp()
    return _finish(plan, mu, nu, cost, reg, it, tol, "sinkhorn-log")


def _logsumexp(x: torch.Tensor, dim: int) -> torch.Tensor:
    # In place on the caller's buffer: x is scratch.
    mx = x.amax(dim=dim, keepdim=True)
    return x.sub_(mx).exp_().sum(dim).log_() + mx.squeeze(dim)


def _finish(plan, mu, nu, cost, reg, iterations, tol, method):
    err = marginal_error(plan, mu, nu)
    if not math.isfinite(err) or err > max(tol, 1e-6) * 100:
        raise SolverError(
            f"Sinkhorn (reg={reg:g}) did not converge in {iterations} iterations "
            f"(marginal error {err:.2e}); raise max_iter or reg")
    return TransportResult(plan, _transport_cost(plan, cost), err, iterations, method)


def _transport_cost(plan, cost) -> float:
    return float(torch.dot(plan.reshape(-1), cost.reshape(-1).to(plan.dtype)))


def solve(mu, nu, cost, *, solver: str, reg: float, max_iter: int = 5000,
          tol: float = 1e-6) -> TransportResult:
    if solver == "emd":
        return emd(mu, nu, cost)
    if solver == "sinkhorn":
        return sinkhorn(mu, nu, cost, reg, max_iter=max_iter, tol=tol)
    raise InvalidOptionError(f"solver '{solver}': use sinkhorn or emd")


def row_stochastic(plan: torch.Tensor) -> torch.Tensor:
    """R = diag(1/mu) T: rows sum to 1. Carries a map on a layer's *input* side:
    parent input i ~= sum_j R[i, j] anchor input j, so inputs that land on one
    anchor unit have their weights summed."""
    return plan / plan.sum(1, keepdim=True).clamp_min(1e-300)


def column_stochastic(plan: torch.Tensor) -> torch.Tensor:
    """C = T diag(1/nu): columns sum to 1. Applies a map on an *output* side:
    every anchor unit becomes a convex combination of parent units."""
    return plan / plan.sum(0, keepdim=True).clamp_min(1e-300)
