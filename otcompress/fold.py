"""Folding: transport maps from clustering a parent's own units into the target
width (model folding, Wang et al., ICLR 2025), on the same flow graph and
carry rules as OT alignment (method.md, "Folding").

A fold map is a hard transport map with cluster marginals: T[i, j] = 1/m when
parent unit i is in cluster j. Carried on an `Out` axis (C = T diag(1/nu)) it
averages a cluster's rows; on an `In` axis (R = diag(1/mu) T) it sums a
cluster's columns. So folding an exactly 2x-widened copy (every unit twice,
outgoing weights halved) gives back the original function.

The anchor's weights are never read: the target only supplies widths, and the
order of clusters is arbitrary, which is why several parents are folded one
by one and their folds then OT-fused."""
from __future__ import annotations

import torch

from otcompress.errors import IncompatibleModelsError


def kmeans(x: torch.Tensor, k: int, *, seed: int = 0, restarts: int = 4, max_iter: int = 100) -> torch.Tensor:
    """Cluster labels (m,) of the rows of x (m, d) into exactly k non-empty
    clusters: k-means++ seeding, Lloyd iterations, the best of `restarts`.
    In torch on x's device (a few lines; scikit-learn would force a float64
    numpy copy of features that reach hundreds of thousands of columns)."""
    m = x.shape[0]
    if k > m:
        raise IncompatibleModelsError(f"cannot fold {m} units into {k}: the target is wider")
    x = _compress(x.double())
    gen = torch.Generator(device="cpu").manual_seed(seed)
    best, best_inertia = None, float("inf")
    for _ in range(restarts if k < m else 1):
        labels, inertia = _lloyd(x, _kmeans_pp(x, k, gen), max_iter)
        if inertia < best_inertia - 1e-12:
            best, best_inertia = labels, inertia
    return best


def _compress(x):
    """Rows with the same pairwise distances in at most m columns (through the
    Gram matrix): k-means then costs O(m^2 k) per sweep, not O(m d k)."""
    m, d = x.shape
    x = x - x.mean(0, keepdim=True)
    if d <= m:
        return x
    vals, vecs = torch.linalg.eigh(x @ x.T)
    keep = vals > vals.max().clamp_min(1e-300) * 1e-12
    return vecs[:, keep] * vals[keep].sqrt()


def _sq_dist(x, c):
    return ((x * x).sum(1, keepdim=True) - 2 * x @ c.T + (c * c).sum(1)[None, :]).clamp_min_(0)


def _kmeans_pp(x, k, gen):
    m = x.shape[0]
    idx = [int(torch.randint(m, (1,), generator=gen))]
    d2 = _sq_dist(x, x[idx]).squeeze(1)
    for _ in range(1, k):
        total = float(d2.sum())
        if total <= 0:  # fewer distinct points than clusters: take any unused
            free = torch.ones(m, dtype=torch.bool, device=x.device)
            free[idx] = False
            nxt = int(free.nonzero()[0])
        else:
            nxt = int(torch.multinomial((d2 / total).float().cpu(), 1, generator=gen))
        idx.append(nxt)
        d2 = torch.minimum(d2, _sq_dist(x, x[nxt:nxt + 1]).squeeze(1))
    return x[idx].clone()


def _lloyd(x, centres, max_iter):
    m, k = x.shape[0], centres.shape[0]
    labels = None
    for _ in range(max_iter):
        d2 = _sq_dist(x, centres)
        new = d2.argmin(1)
        new = _fill_empty(new, d2, k)
        if labels is not None and torch.equal(new, labels):
            break
        labels = new
        counts = torch.bincount(labels, minlength=k).to(x.dtype)
        centres = torch.zeros_like(centres).index_add_(0, labels, x) / counts[:, None]
    inertia = float(_sq_dist(x, centres).gather(1, labels[:, None]).sum())
    return labels, inertia


def _fill_empty(labels, d2, k):
    """Give every empty cluster the point farthest from its own centre (taken
    from a cluster that keeps at least one point)."""
    counts = torch.bincount(labels, minlength=k)
    for j in (counts == 0).nonzero().flatten().tolist():
        own = d2.gather(1, labels[:, None]).squeeze(1).clone()
        own[counts[labels] <= 1] = -1
        i = int(own.argmax())
        counts[labels[i]] -= 1
        labels[i] = j
        counts[j] = 1
    return labels


def plan(labels: torch.Tensor, k: int, *, dtype=torch.float64) -> torch.Tensor:
    """The hard transport map of a clustering: T[i, labels[i]] = 1/m."""
    m = labels.shape[0]
    t = torch.zeros(m, k, dtype=dtype, device=labels.device)
    t[torch.arange(m, device=labels.device), labels] = 1.0 / m
    return t


def cluster_plan(features: torch.Tensor, k: int, seed: int = 0) -> torch.Tensor:
    return plan(kmeans(features, k, seed=seed), k)


def blocks(features: list) -> torch.Tensor:
    """Concatenate per-tensor feature blocks (m, d_i), each scaled to unit norm so
    that a large table (a vocabulary) does not drown the others."""
    return torch.cat([f / f.norm().clamp_min(1e-12) for f in features], 1)


def head_plans(q, k, v, o_cols, parent_heads: int, target_heads: int, target_dim: int, seed: int = 0):
    """Head-aware fold maps of one attention layer.

    q, k, v: parent rows (units, features) with inputs already carried into the
    target's residual space (bias appended); o_cols: O's columns (units,
    features), one per V unit. Parent heads are grouped into `target_heads`
    groups by features that do not depend on the order of units inside a head
    (each head's Q^T K and O V); then inside each group the units are clustered
    into `target_dim` target units, Q and K together (a score is a sum of Q-K
    unit products, so both must fold the same way) and V with O's columns.
    Returns (T_qk, T_v)."""
    m = q.shape[0]
    d = m // parent_heads
    groups = _group_heads(q, k, v, o_cols, parent_heads, target_heads, d, seed)
    qk, vo = torch.cat([q, k], 1), torch.cat([v, o_cols], 1)
    labels_qk = torch.empty(m, dtype=torch.long, device=q.device)
    labels_v = torch.empty(m, dtype=torch.long, device=q.device)
    for g in range(target_heads):
        units = torch.cat([torch.arange(h * d, (h + 1) * d, device=q.device) for h in groups[g]])
        if units.numel() < target_dim:
            raise IncompatibleModelsError(
                f"cannot fold {units.numel()} attention units into a head of {target_dim}")
        labels_qk[units] = g * target_dim + kmeans(blocks([qk[units]]), target_dim, seed=seed)
        labels_v[units] = g * target_dim + kmeans(blocks([vo[units]]), target_dim, seed=seed)
    n = target_heads * target_dim
    return plan(labels_qk, n), plan(labels_v, n)


def _group_heads(q, k, v, o_cols, parent_heads, target_heads, d, seed):
    if target_heads > parent_heads:
        raise IncompatibleModelsError(
            f"cannot fold {parent_heads} attention heads into {target_heads}: the target has more")
    if target_heads == parent_heads:
        return [[h] for h in range(parent_heads)]
    feats = []
    for h in range(parent_heads):
        s = slice(h * d, (h + 1) * d)
        feats.append(torch.cat([(q[s].T @ k[s]).flatten(), (o_cols[s].T @ v[s]).flatten()]))
    labels = kmeans(torch.stack(feats), target_heads, seed=seed)
    return [(labels == g).nonzero().flatten().tolist() for g in range(target_heads)]


def rotary_head_plans(q, k, v, parent_heads: int, kv_heads: tuple, target_heads: int, d: int, seed: int = 0):
    """Fold maps for rotary (and grouped-query) attention: whole heads only.
    Parent key/value groups are clustered into the target's groups on their
    K and V rows (inside a head the unit order is fixed, so rows compare
    directly); then the query heads of each target group's parent groups are
    clustered into its query heads. Returns (T_q, T_kv)."""
    (gp, ga) = kv_heads
    rp, ra = parent_heads // gp, target_heads // ga
    per_head = lambda x, n: x.reshape(n, -1)  # noqa: E731 (head, d * features)
    g_labels = kmeans(blocks([per_head(k, gp), per_head(v, gp)]), ga, seed=seed)
    q_heads = per_head(q, parent_heads)
    h_labels = torch.empty(parent_heads, dtype=torch.long, device=q.device)
    for c in range(ga):
        members = torch.cat([torch.arange(g * rp, (g + 1) * rp, device=q.device)
                             for g in (g_labels == c).nonzero().flatten().tolist()])
        if members.numel() < ra:
            raise IncompatibleModelsError(f"cannot fold {members.numel()} query heads into {ra}")
        h_labels[members] = c * ra + kmeans(blocks([q_heads[members]]), ra, seed=seed)
    unit = lambda labels: (labels[:, None] * d + torch.arange(d, device=q.device)).flatten()  # noqa: E731
    return plan(unit(h_labels), target_heads * d), plan(unit(g_labels), ga * d)
