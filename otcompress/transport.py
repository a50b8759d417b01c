"""Transport on rectangular (m, n) costs: cost matrices, EMD, Sinkhorn, and the
row/column rescalings of docs/method.md ("Aligning one linear layer"). Pure
tensor functions, no model knowledge.

Conventions: a transport map `T` has shape (m, n): m parent units (rows,
marginal `mu`) and n anchor units (columns, marginal `nu`).

Sinkhorn (docs/method.md, "Sinkhorn on structured costs"). One *sweep* takes
the log column scaling g = log v to

    u = mu / (K e^g)          (rows of diag(u) K diag(e^g) now sum to mu exactly)
    G(g) = log nu - log(K^T u)

and the plan diag(u) K diag(e^g) has column sums e^g * K^T u. So the relative
L1 marginal error of the current plan, and the residual G(g) - g =
log(nu / column sums), come out of the matrix-vector product the next sweep
needs anyway: convergence is checked every sweep at no extra cost. Plain
Sinkhorn iterates g <- G(g). On costs where every anchor unit has near
duplicates among the parent's units (widened or permuted copies, fine-tunes of
one base) that fixed-point iteration crawls (thousands of sweeps at reg 0.05);
Anderson acceleration (type II, depth `anderson`, on g) extrapolates from the
last few (g, G(g)) pairs and needs a handful. It is safeguarded: an
extrapolation that makes the marginal error blow up is thrown away (back to the
best point's plain step, then plain sweeps for a hold that doubles with every
consecutive blow-up), a run of sweeps with no new best error restarts the
history, and every restart damps the mixing; so where extrapolation keeps
failing it costs only a few sweeps more than plain Sinkhorn. The same sweep
runs in the log domain (stable at any small reg) when exp(-cost/reg) could
underflow.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np
import torch

from otcompress.errors import InvalidOptionError, SolverError
from otcompress.options import CHOICES

# Plain (scaling) Sinkhorn is 5-30x faster than the log domain here, and exact in
# float64 while exp(-M/reg) stays far from underflow (1e-308 ~ exp(-709)); the
# limit scales with the compute dtype's exponent range (float32: ~25).
_PLAIN_SCALING_MAX_EXPONENT = 200.0

ANDERSON_DEPTH = 5  # history length of the accelerated solver (0 = plain Sinkhorn)
_BLOWUP = 10.0  # an extrapolated point whose error exceeds this x the best so far is rejected
_STALL = 25  # sweeps without a new best error before the Anderson history is restarted
# Tikhonov term of the least-squares mixing, relative to the largest diagonal entry
# (start, factor per restart, cap): it damps extrapolations along nearly collinear
# residual differences. Small is fastest on well-conditioned structured costs (3072x1536
# duplicate cost, reg 0.05: 5 sweeps at 1e-10, 9 at 3e-3); 1e-3..1e-2 converged on every
# case of a battery of duplicate/cluster/random costs with uniform and random marginals
# where 1e-10 stalled on some. So it starts small and grows with every restart.
_TIKHONOV = (1e-10, 100.0, 1e-2)
ON_UNCONVERGED = ("raise", "warn")


class UnconvergedWarning(UserWarning):
    """A transport plan was returned although its marginal error is above `tol`."""


@dataclass
class TransportResult:
    plan: torch.Tensor  # (m, n), float64 by default, on the cost's device
    cost: float  # <T, M> on the (normalised) cost the solver was given
    marginal_error: float  # relative L1 error of both marginals, measured on `plan`
    iterations: int  # Sinkhorn sweeps (each: one product with K and one with K^T); 0 for EMD
    method: str
    converged: bool = True  # marginal_error <= tol (always True for an optimal EMD plan)
    reg: float | None = None
    restarts: int = 0  # Anderson history restarts (blow-ups and stalls)
    entropy: float | None = None  # -sum T log T (natural log); computed from the plan when None

    def stats(self) -> dict:
        if self.entropy is None:
            self.entropy = float(torch.special.entr(self.plan).sum())
        entropy = self.entropy
        m, n = self.plan.shape
        max_entropy = math.log(m * n) if m * n > 1 else 0.0
        return {
            "shape": [m, n],
            "method": self.method,
            "reg": self.reg,
            "cost": self.cost,
            "entropy": entropy,
            # entropy / log(m n): 1.0 = the uniform map (all information lost),
            # log(max(m, n)) / log(m n) ~ 0.5 = a hard assignment
            "relative_entropy": entropy / max_entropy if max_entropy > 0 else 0.0,
            "marginal_error": self.marginal_error,
            "iterations": self.iterations,
            "converged": bool(self.converged),
            "restarts": self.restarts,
        }


def uniform(n: int, *, device=None, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return torch.full((n,), 1.0 / n, dtype=dtype, device=device)


def euclidean_cost(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Pairwise Euclidean distances between rows of x (m, d) and y (n, d)."""
    x = x.to(torch.float32)
    y = y.to(torch.float32)
    sq = torch.addmm((y * y).sum(1)[None, :], x, y.T, alpha=-2.0).add_((x * x).sum(1, keepdim=True))
    return sq.clamp_min_(0).sqrt_().to(torch.float64)


def normalise_cost(cost: torch.Tensor, how: str = "max", *, inplace: bool = False) -> torch.Tensor:
    """Scale a cost so that one `reg` means the same softness in every layer
    (paper App. D.3.1). "gap" subtracts each row's minimum (which leaves the
    plan unchanged) and divides by the median: reg is then relative to how far
    a typical unit is from its best match, not to the largest distance, which
    drifts with depth and with the blur of the maps before it. Where that
    median is 0 (every cost with two columns: half the gaps are the row
    minima themselves; or mostly tied rows) it is the median of the positive
    gaps, with two columns each row's margin between its best and its other
    match; only an all-zero cost is left as it is.
    `inplace`: overwrite `cost` (same values, no m x n copies: for callers
    that built the cost and need only the normalised one)."""
    if how not in CHOICES["cost_norm"]:
        raise InvalidOptionError(f"cost normalisation '{how}': use {', '.join(CHOICES['cost_norm'])}")
    if how == "none":
        return cost
    if how == "gap":
        row_min = cost.min(1, keepdim=True).values
        cost = cost.sub_(row_min) if inplace else cost - row_min
        inplace = True  # a fresh copy now, or the caller's by request
    s = float({"max": cost.max, "mean": cost.mean, "gap": lambda: _median(cost)}[how]())
    if how == "gap" and s == 0 and bool((cost > 0).any()):
        s = float(_median(cost[cost > 0]))
    if not s > 0:
        return cost
    return cost.div_(s) if inplace else cost / s


def _median(x: torch.Tensor, samples: int = 1 << 16) -> torch.Tensor:
    """The median, from a fixed strided sample of at most ~2 `samples` entries
    on large matrices (exact median: 52 ms on a 3072 x 1536 cost, 1.4 s of a
    7 s BERT-base fusion; the sample's is within 0.1% and deterministic)."""
    flat = x.reshape(-1)
    stride = max(1, flat.numel() // samples)
    return flat[::stride].median()


def marginal_error(plan: torch.Tensor, mu: torch.Tensor, nu: torch.Tensor) -> float:
    """max(|T1 - mu|_1 / |mu|_1, |T'1 - nu|_1 / |nu|_1)."""
    return _marginal_error(plan.sum(1), plan.sum(0), mu, nu)


def _marginal_error(rows, cols, mu, nu) -> float:
    mu = mu.to(rows.device, rows.dtype)
    nu = nu.to(cols.device, cols.dtype)
    r = (rows - mu).abs().sum() / mu.sum()
    c = (cols - nu).abs().sum() / nu.sum()
    return float(torch.maximum(r, c))


def emd(mu: torch.Tensor, nu: torch.Tensor, cost: torch.Tensor) -> TransportResult:
    """Exact OT via POT's network simplex (on the CPU, float64), with an iteration
    cap large enough that it does not silently return a sub-optimal plan at
    n ~ 3000. The plan comes back on the cost's device."""
    import ot

    a = mu.detach().double().cpu().numpy()
    b = nu.detach().double().cpu().numpy()
    a, b = a / a.sum(), b / b.sum()
    M = np.ascontiguousarray(cost.detach().double().cpu().numpy())
    plan, log = ot.emd(a, b, M, numItermax=10**8, log=True)
    if log.get("result_code", 1) != 1:
        raise SolverError(f"EMD did not reach optimality: {log.get('warning')}")
    plan = torch.from_numpy(plan).to(cost.device)
    return TransportResult(plan, _transport_cost(plan, cost), marginal_error(plan, mu, nu), 0, "emd",
                           converged=True)


def sinkhorn(mu: torch.Tensor, nu: torch.Tensor, cost: torch.Tensor, reg: float, *,
             max_iter: int = 5000, tol: float = 1e-6, on_unconverged: str = "raise",
             anderson: int = ANDERSON_DEPTH, dtype: torch.dtype | None = None) -> TransportResult:
    """Entropic OT, on the cost's device. Stops when the relative L1 marginal
    error max(|T1 - mu|_1 / |mu|_1, |T'1 - nu|_1 / |nu|_1) is <= `tol` (checked
    every sweep, for free).

    - Scaling iterations where exp(-cost/reg) cannot underflow, else the log
      domain (stable for any small reg); the same accelerated sweep in both.
    - `anderson`: depth of the Anderson acceleration (0 = plain Sinkhorn).
    - `dtype`: compute dtype, float64 by default (float32 has an error floor
      near 1e-6). The plan is returned in it.
    - `on_unconverged`: "raise" (default) raises SolverError naming reg and the
      error reached; "warn" returns the plan with `converged=False` and emits an
      UnconvergedWarning.
    """
    _check_on_unconverged(on_unconverged)
    if not reg > 0:
        raise InvalidOptionError(f"Sinkhorn needs reg > 0, got {reg}")
    if int(anderson) < 0:
        raise InvalidOptionError(f"anderson depth must be >= 0, got {anderson}")
    if int(max_iter) < 1:
        raise InvalidOptionError(f"max_iter must be >= 1, got {max_iter}")
    dtype = dtype or torch.float64
    if not dtype.is_floating_point:
        raise InvalidOptionError(f"Sinkhorn compute dtype must be floating point, got {dtype}")
    if cost.dim() != 2:
        raise InvalidOptionError(f"cost must be a matrix, got shape {tuple(cost.shape)}")
    device = cost.device
    cost = cost.detach().to(dtype)
    mu = mu.detach().to(device=device, dtype=dtype)
    nu = nu.detach().to(device=device, dtype=dtype)
    if mu.shape != (cost.shape[0],) or nu.shape != (cost.shape[1],):
        raise InvalidOptionError(f"marginals of sizes {tuple(mu.shape)}, {tuple(nu.shape)} do not fit "
                                 f"a cost of shape {tuple(cost.shape)}")
    if bool((mu < 0).any()) or bool((nu < 0).any()):
        raise InvalidOptionError("marginals must be non-negative")
    total_mu, total_nu = float(mu.sum()), float(nu.sum())
    if not total_mu > 0 or abs(total_mu - total_nu) > 1e-5 * total_mu:
        raise InvalidOptionError(f"marginals must have the same positive total mass, got {total_mu:.6g} "
                                 f"and {total_nu:.6g}")
    nu_s = nu * (total_mu / total_nu)  # balance exactly what rounding left unbalanced
    rows_kept, cols_kept = mu > 0, nu_s > 0
    if bool(rows_kept.all()) and bool(cols_kept.all()):
        plan, it, method, restarts, potentials = _solve_entropic(mu, nu_s, cost, reg, max_iter, tol,
                                                                 int(anderson))
        summary = _summarise(plan, cost, reg, *potentials)
    else:  # zero-mass units get zero rows/columns; solve on the support
        ri, ci = rows_kept.nonzero().squeeze(1), cols_kept.nonzero().squeeze(1)
        sub_cost = cost[ri][:, ci]
        sub, it, method, restarts, potentials = _solve_entropic(mu[ri], nu_s[ci], sub_cost, reg, max_iter,
                                                                tol, int(anderson))
        entropy = _summarise(sub, sub_cost, reg, *potentials)[3]
        plan = torch.zeros_like(cost)
        plan[ri[:, None], ci[None, :]] = sub
        summary = (*_summarise(plan, cost, reg)[:3], entropy)
    return _finish(plan, mu, nu, reg, it, tol, method, restarts, on_unconverged, summary)


def _summarise(plan, cost, reg, log_u=None, log_v=None, shift=0.0):
    """(row sums, column sums, <T, C>, entropy) in one pass over the plan. With the
    potentials (log T_ij = log_u_i + log_v_j - (C_ij - shift) / reg) the entropy
    -sum T log T = -(log_u . rows + log_v . cols - (<T, C> - shift sum T) / reg)
    needs no m x n logarithm; without them it is None."""
    rows, cols = plan.sum(1), plan.sum(0)
    tcost = float(torch.dot(plan.reshape(-1), cost.reshape(-1).to(plan.dtype)))
    entropy = None
    if log_u is not None:
        entropy = -float(torch.dot(log_u, rows) + torch.dot(log_v, cols)
                         - (tcost - float(shift) * rows.sum()) / reg)
    return rows, cols, tcost, entropy


def _solve_entropic(mu, nu, cost, reg, max_iter, tol, depth):
    """(plan, sweeps, method, restarts, (log_u, log_v, shift)). Scaling iterations
    where safe, falling back to the log domain when they over/underflow."""
    limit = _PLAIN_SCALING_MAX_EXPONENT * math.log(torch.finfo(cost.dtype).max) / math.log(
        torch.finfo(torch.float64).max)
    cmin = cost.min()
    if float(cost.max() - cmin) / reg <= limit:
        out = _sinkhorn_scaling(mu, nu, cost, reg, max_iter, tol, depth, cmin)
        if out is not None:
            return out
    return _sinkhorn_log(mu, nu, cost, reg, max_iter, tol, depth)


class _Anderson:
    """Type-II Anderson mixing for the fixed point g = G(g), depth `depth`:
    from the last pairs (g_i, G_i) with residuals r_i = G_i - g_i, the next
    point is G_k - dG gamma with gamma = argmin |r_k - dR gamma|_2 (dR, dG:
    successive differences), solved by Tikhonov-regularised normal equations.
    The small solve stays on the tensors' device without a host sync."""

    def __init__(self, depth: int):
        self.depth = depth
        self.tikhonov = _TIKHONOV[0]
        self.G: list[torch.Tensor] = []
        self.R: list[torch.Tensor] = []

    def clear(self, damp: bool = False):
        """Forget the history; `damp`: after a failure, regularise the mixing more."""
        self.G.clear()
        self.R.clear()
        if damp:
            self.tikhonov = min(self.tikhonov * _TIKHONOV[1], _TIKHONOV[2])

    def step(self, g: torch.Tensor, G: torch.Tensor, extrapolate: bool = True) -> tuple[torch.Tensor, bool]:
        """(next point, whether it is an extrapolation rather than the plain G)."""
        if self.depth == 0:
            return G, False
        r = G - g
        self.G.append(G)
        self.R.append(r)
        if len(self.G) > self.depth + 1:
            self.G.pop(0)
            self.R.pop(0)
        if len(self.G) < 2 or not extrapolate:
            return G, False
        dR = torch.diff(torch.stack(self.R, 1), dim=1)  # (n, k)
        dG = torch.diff(torch.stack(self.G, 1), dim=1)
        A = dR.T @ dR
        A.diagonal().add_(self.tikhonov * A.diagonal().amax() + torch.finfo(A.dtype).tiny)
        gamma, info = torch.linalg.solve_ex(A, dR.T @ r)
        return G - dG @ gamma, True


def _iterate(sweep, g, nu, max_iter, tol, depth):
    """Safeguarded Anderson-accelerated Sinkhorn on the log column scaling g.
    `sweep(g)` -> (G(g), column sums of the plan whose rows are exact, state).
    Returns (g, state, sweeps, error, restarts) of the best point seen (the last
    one when converged), or None when a plain sweep went non-finite (the caller
    falls back to the log domain).

    Safeguards: an extrapolated point whose error is non-finite or more than
    _BLOWUP x the best so far is dropped, the history cleared, and the solver
    continues from the best point's plain step with plain sweeps for a hold that
    doubles with every consecutive blow-up (so a problem on which extrapolation
    keeps failing costs only ~log2(max_iter) extra sweeps over plain Sinkhorn);
    _STALL sweeps without a new best error clear the history."""
    nu_total = float(nu.sum())
    acc = _Anderson(depth)
    best = None  # (error, g, G, state)
    restarts = since_best = hold = 0
    failures = 0  # consecutive blow-ups without an extrapolation that made progress
    extrapolated = False  # whether g came from an Anderson extrapolation
    it = 0
    for it in range(1, max_iter + 1):
        G, col, state = sweep(g)
        err = float((col - nu).abs().sum()) / nu_total
        if extrapolated and (not math.isfinite(err) or err > _BLOWUP * best[0]):
            failures += 1
            restarts += 1
            acc.clear(damp=True)
            hold = (depth + 1) * 2 ** (failures - 1)
            g, extrapolated = best[2], False
            continue
        if not math.isfinite(err):  # a plain sweep itself broke down
            return None
        if best is None or err < best[0]:
            best = (err, g, G, state)
            since_best = 0
            if extrapolated:
                failures = 0
        else:
            since_best += 1
        if err <= tol:
            return g, state, it, err, restarts
        if since_best >= _STALL and acc.G:
            restarts += 1
            acc.clear(damp=True)
            since_best = 0
        g, extrapolated = acc.step(g, G, extrapolate=hold == 0)
        hold = max(hold - 1, 0)
    return best[1], best[3], it, best[0], restarts


def _sinkhorn_scaling(mu, nu, cost, reg, max_iter, tol, depth, cmin=None):
    # Shifting the cost by its minimum leaves the plan unchanged and keeps K <= 1.
    # In place throughout: fresh m x n temporaries cost more than the arithmetic.
    K = torch.sub(cost, cost.min() if cmin is None else cmin).mul_(-1.0 / reg).exp_()
    log_nu = nu.log()

    def sweep(g):
        v = g.exp()
        u = mu / (K @ v)
        KTu = u @ K
        return log_nu - KTu.log(), v * KTu, u

    out = _iterate(sweep, torch.zeros_like(nu), nu, max_iter, tol, depth)
    if out is None:
        return None
    g, u, it, err, restarts = out
    plan = K.mul_(u[:, None]).mul_(g.exp()[None, :])
    if not math.isfinite(float(plan.sum())):
        return None
    return plan, it, "sinkhorn", restarts, (u.log(), g, cmin if cmin is not None else cost.min())


def _sinkhorn_log(mu, nu, cost, reg, max_iter, tol, depth=ANDERSON_DEPTH):
    log_mu, log_nu = mu.log(), nu.log()
    neg_cost = cost * (-1.0 / reg)
    buf = torch.empty_like(cost)  # one m x n buffer: allocation, not arithmetic, dominates

    def sweep(g):
        f = log_mu - _logsumexp_(torch.add(neg_cost, g[None, :], out=buf), dim=1)
        lse = _logsumexp_(torch.add(neg_cost, f[:, None], out=buf), dim=0)
        return log_nu - lse, (g + lse).exp(), f

    out = _iterate(sweep, torch.zeros_like(nu), nu, max_iter, tol, depth)
    if out is None:
        raise SolverError(f"Sinkhorn (reg={reg:g}) broke down (non-finite values) in the log domain")
    g, f, it, err, restarts = out
    plan = torch.add(neg_cost, f[:, None], out=buf).add_(g[None, :]).exp_()
    return plan, it, "sinkhorn-log", restarts, (f, g, 0.0)


def _logsumexp_(x: torch.Tensor, dim: int) -> torch.Tensor:
    # In place on the caller's buffer: x is scratch.
    mx = x.amax(dim=dim, keepdim=True)
    mx = torch.where(torch.isfinite(mx), mx, torch.zeros_like(mx))
    return x.sub_(mx).exp_().sum(dim).log_() + mx.squeeze(dim)


def _finish(plan, mu, nu, reg, iterations, tol, method, restarts, on_unconverged, summary):
    rows, cols, tcost, entropy = summary
    err = _marginal_error(rows, cols, mu, nu)
    # The plan is rebuilt from the scalings after the loop: allow for rounding.
    converged = math.isfinite(err) and err <= max(tol, 100 * torch.finfo(plan.dtype).eps)
    if not converged:
        msg = (f"Sinkhorn (reg={reg:g}) did not converge in {iterations} iterations "
               f"(marginal error {err:.2e} > tol {tol:.0e}); raise max_iter or reg")
        if on_unconverged == "raise" or not math.isfinite(err):
            raise SolverError(msg)
        warnings.warn(msg, UnconvergedWarning, stacklevel=3)
    return TransportResult(plan, tcost, err, iterations, method, converged=converged, reg=float(reg),
                           restarts=restarts, entropy=entropy)


def _transport_cost(plan, cost) -> float:
    return float(torch.dot(plan.reshape(-1), cost.reshape(-1).to(plan.dtype)))


def _check_on_unconverged(on_unconverged):
    if on_unconverged not in ON_UNCONVERGED:
        raise InvalidOptionError(f"on_unconverged '{on_unconverged}': use raise or warn")


def solve(mu, nu, cost, *, solver: str, reg: float, max_iter: int = 5000,
          tol: float = 1e-6, on_unconverged: str = "raise", **sinkhorn_options) -> TransportResult:
    """`solver` "emd" (exact; `reg` ignored) or "sinkhorn" (entropic; extra
    keyword options such as `anderson` and `dtype` go to `sinkhorn`)."""
    _check_on_unconverged(on_unconverged)
    if solver == "emd":
        return emd(mu, nu, cost)
    if solver == "sinkhorn":
        return sinkhorn(mu, nu, cost, reg, max_iter=max_iter, tol=tol, on_unconverged=on_unconverged,
                        **sinkhorn_options)
    raise InvalidOptionError(f"solver '{solver}': use sinkhorn or emd")


def row_stochastic(plan: torch.Tensor) -> torch.Tensor:
    """R = diag(1/mu) T: rows sum to 1. Carries a map on a layer's *input* side:
    parent input i ~= sum_j R[i, j] anchor input j, so inputs that land on one
    anchor unit have their weights summed."""
    return plan / plan.sum(1, keepdim=True).clamp_min(torch.finfo(plan.dtype).tiny)  # an empty row stays 0


def column_stochastic(plan: torch.Tensor) -> torch.Tensor:
    """C = T diag(1/nu): columns sum to 1. Applies a map on an *output* side:
    every anchor unit becomes a convex combination of parent units."""
    return plan / plan.sum(0, keepdim=True).clamp_min(torch.finfo(plan.dtype).tiny)
