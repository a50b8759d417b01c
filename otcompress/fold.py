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

import numpy as np
import torch

from otcompress.errors import IncompatibleModelsError, UnreachableShapeError


def kmeans(x: torch.Tensor | None, k: int, *, seed: int = 0, restarts: int = 4, max_iter: int = 100,
           weights: torch.Tensor | None = None, gram: torch.Tensor | None = None) -> torch.Tensor:
    """Cluster labels (m,) of the rows of x (m, d) into exactly k non-empty
    clusters: k-means++ seeding, Lloyd iterations, the best of `restarts`.
    In torch on x's device (a few lines; scikit-learn would force a float64
    numpy copy of features that reach hundreds of thousands of columns).

    weights (m,): importance of each row (>= 0). The objective becomes
    sum_i w_i |x_i - c|^2: seeds are drawn with probability w * d^2 and
    centroids are weighted means, so a row of weight 0 never pulls a centroid
    (it is still assigned to the nearest one). None: all rows alike.
    gram: the rows' (centred) Gram matrix instead of x (see `slot_gram`)."""
    m = x.shape[0] if gram is None else gram.shape[0]
    if k > m:
        raise IncompatibleModelsError(f"cannot fold {m} units into {k}: the target is wider")
    if gram is not None:
        rows = _Distances(None, gram.float())
    else:
        # Distances from the Gram matrix in float32 (a float32 Gram is 2-9x faster
        # to build and to sum per cluster; distances carry ~1e-6 relative error,
        # far below any gap k-means acts on); in float64 from the features when
        # the pairwise matrix would not fit.
        x = x.float()
        x = x - x.mean(0, keepdim=True)
        rows = _Distances(x)
        if rows.gram is None:  # rows one at a time: in at most m columns
            rows = _Distances(_compress(x.double()))
    w = None if weights is None else weights.to(rows.sq.device, torch.float64)
    rows.weigh(w)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    best, best_inertia = None, float("inf")
    for _ in range(restarts if k < m else 1):
        labels, inertia = _lloyd(rows, _kmeans_pp(rows, k, gen, w), max_iter, w)
        if inertia < best_inertia - 1e-12:
            best, best_inertia = labels, inertia
    return best


def sized_kmeans(x: torch.Tensor, k: int, min_size: int, *, seed: int = 0, max_iter: int = 50) -> torch.Tensor:
    """`kmeans` labels of the rows of x (m, d) with every cluster holding at
    least `min_size` rows: a target head folded from whole parent heads needs
    enough of them to fill its width (2 heads of 8 units for one of 12), and
    plain k-means can leave it one. Where k-means already meets the sizes its
    labels stand; else Lloyd's steps alternate with an assignment that fills
    `min_size` slots of every cluster before any further one (size-constrained
    k-means, Bradley, Bennett and Demiriz 2000; solved by scipy's
    linear_sum_assignment, which POT already brings)."""
    m = x.shape[0]
    if k * min_size > m:
        raise UnreachableShapeError(f"cannot make {k} groups of at least {min_size} from {m}")
    labels = kmeans(x, k, seed=seed)
    if min_size <= 1 or int(torch.bincount(labels, minlength=k).min()) >= min_size:
        return labels
    from scipy.optimize import linear_sum_assignment

    device = x.device  # the assignment runs on the CPU (scipy); the labels go back where x was
    x = x.detach().cpu().double()
    x = x - x.mean(0, keepdim=True)
    slots = torch.arange(k).repeat_interleave(min_size)  # the slots every cluster must fill, then the free ones
    slots = torch.cat([slots, torch.arange(k).repeat_interleave(m - k * min_size)])
    labels = labels.cpu()
    for _ in range(max_iter):
        centres = torch.stack([x[labels == g].mean(0) for g in range(k)])
        cost = _sq_dist(x, centres)[:, slots]
        # Filling a required slot is worth more than any difference of distances.
        cost[:, :k * min_size] -= cost.max() - cost.min() + 1
        rows, cols = linear_sum_assignment(cost.numpy())
        new = torch.empty(m, dtype=torch.long)
        new[torch.as_tensor(rows)] = slots[torch.as_tensor(cols)]
        if torch.equal(new, labels):
            break
        labels = new
    return labels.to(device)


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


def _gram(a, blocks=4):
    """a @ a.T, multiplying only the blocks of rows on and above the diagonal
    (10/16 of the flops at 4 x 4; the lower ones are mirrored): each entry is
    the same dot product over the same columns as in the full product, and on
    this machine's MKL bit-identical to it (checked on the shapes of MiniLM
    and Qwen2.5-0.5B folds), so only the time changes, by about 30% on the
    largest Grams (4864 x 896 rows; 896 x 151936 vocabulary columns)."""
    m = a.shape[0]
    if m < 256 or a.device.type != "cpu":
        return a @ a.T
    out = torch.empty(m, m, dtype=a.dtype, device=a.device)
    edge = [i * m // blocks for i in range(blocks + 1)]
    for i in range(blocks):
        rows = slice(edge[i], edge[i + 1])
        for j in range(i, blocks):
            cols = slice(edge[j], edge[j + 1])
            out[rows, cols] = a[rows] @ a[cols].T
            if j > i:
                out[cols, rows] = out[rows, cols].T
    return out


def _sq_dist(x, c, x_sq=None):
    x_sq = (x * x).sum(1, keepdim=True) if x_sq is None else x_sq
    return (x_sq - 2 * x @ c.T + (c * c).sum(1)[None, :]).clamp_min_(0)


class _Distances:
    """Squared distances from every row to row i, as CPU numpy rows: the whole
    pairwise matrix (and the Gram matrix, which Lloyd's steps then use) from
    one matrix product when it fits in PAIRWISE_MAX entries (k-means++ reads
    one row per seed instead of a matrix-vector product over all features;
    nothing else needs the features, however many columns they have), else
    one row at a time. `gram`: the Gram matrix itself, x then unused.

    What every restart of one k-means shares is made once: the Gram matrix's
    rows times the unit weights (`weigh`) and the (k, m) buffer that Lloyd's
    steps sum them into (`sums`; each step overwrites the last one's)."""
    PAIRWISE_MAX = 1 << 26  # 256 MB of float32 each for the two matrices

    def __init__(self, x, gram=None):
        self.x, self.gram, self.pair, self.rows = x, gram, None, None
        self.weighted, self._sums = None, None
        self.m = x.shape[0] if gram is None else gram.shape[0]
        if gram is None and self.m * self.m > self.PAIRWISE_MAX:
            self.sq = (x * x).sum(1)
            return
        if gram is None:
            self.gram = _gram(x)
        self.sq = self.gram.diagonal().clone()
        pair = self.gram * -2  # sq_i - 2 g_ij + sq_j, in place (the same roundings)
        pair += self.sq[:, None]
        pair += self.sq[None, :]
        self.pair = pair.clamp_min_(0)
        self.rows = self.pair.cpu().numpy()

    def __getitem__(self, i):
        if self.rows is not None:
            return self.rows[i]
        return (self.sq - 2 * self.x @ self.x[i] + self.sq[i]).clamp_min_(0).cpu().numpy()

    def weigh(self, w):
        """Keep the Gram matrix's rows times w (None: the Gram matrix itself)."""
        if self.gram is not None:
            self.weighted = self.gram if w is None else self.gram * w.to(self.gram.dtype)[:, None]

    def sums(self, k, zero=True):
        """A (k, m) buffer (zeroed), the same memory every call."""
        if self._sums is None or self._sums.shape[0] != k:
            self._sums = torch.empty(k, self.m, dtype=self.gram.dtype, device=self.gram.device)
        return self._sums.zero_() if zero else self._sums

    def to_seeds(self, seeds):
        """(m, k) distances to the seed rows: a transposed view of `sums`."""
        index = torch.tensor(seeds, device=self.pair.device)
        return torch.index_select(self.pair, 0, index, out=self.sums(len(seeds), zero=False)).T


def _kmeans_pp(rows, k, gen, weights=None):
    """k-means++ seeds: each next seed drawn with probability proportional to
    (weight x) squared distance to the nearest seed so far, by inverse CDF
    from one uniform number per seed (all drawn at once); the loop itself is
    a few numpy operations on length-m vectors. Returns the seeds' row
    indices. (Sampling each seed with `torch.multinomial`, as before, draws m
    exponentials per seed: 1.1 s of all-MiniLM-L6-v2's fold at 1 thread,
    more than half the time budget.)"""
    m = rows.m
    first = int(torch.randint(m, (1,), generator=gen))
    idx = [first]
    u = torch.rand(max(k - 1, 0), generator=gen, dtype=torch.float64).tolist()
    w = None if weights is None else weights.cpu().numpy()
    d2 = np.array(rows[first], copy=True)
    wd2, cdf = np.empty(m), np.empty(m, dtype=np.float64 if w is not None else d2.dtype)
    for s in range(k - 1):
        np.cumsum(d2 if w is None else np.multiply(d2, w, out=wd2), out=cdf)  # d2 * w in float64
        total = cdf[-1]
        if total <= 0:  # fewer distinct (weighted) points than clusters: take any unused
            free = np.ones(m, dtype=bool)
            free[idx] = False
            nxt = int(free.nonzero()[0][0])
        else:
            nxt = min(int(cdf.searchsorted(u[s] * total, side="right")), m - 1)
        idx.append(nxt)
        np.minimum(d2, rows[nxt], out=d2)
    return idx


def _lloyd(rows, seeds, max_iter, weights=None):
    """Lloyd's iterations from the seed rows `seeds` (indices); with the Gram
    matrix at hand, distances to the (weighted) cluster means come from it:
    |x_i - c_j|^2 = |x_i|^2 - 2 <x_i, c_j> + |c_j|^2, the inner products by
    summing the Gram matrix's rows per cluster, O(m^2) a step instead of
    O(m k d); |x_i|^2, the same for every cluster, is added only where a
    distance itself is needed."""
    m, k, x = rows.m, len(seeds), rows.x
    w = torch.ones(m, dtype=torch.float64, device=rows.sq.device) if weights is None else weights
    if rows.gram is None:
        centres = x[seeds]
        dist = lambda labels: (_sq_dist(x, centres if labels is None  # noqa: E731
                                        else _centres(x, labels, k, weights)), None)
    else:
        dist = lambda labels: ((rows.to_seeds(seeds), None) if labels is None  # noqa: E731
                               else (_gram_scores(rows, labels, k, w, weights is None), rows.sq))
    labels = None
    for _ in range(max_iter):
        d, shift = dist(labels)
        new = _argmin_rows(d)
        if int(torch.bincount(new, minlength=k).min()) == 0:
            new = _fill_empty(new, d if shift is None else d + shift[:, None], k)
        if labels is not None and torch.equal(new, labels):
            break  # d holds the distances to these labels' centres
        labels = new
    else:
        d, shift = dist(labels)
    d_own = d.gather(1, labels[:, None]).squeeze(1).double()
    if shift is not None:
        d_own = (d_own + shift.double()).clamp_min(0)
    return labels, float((w * d_own).sum())


def _argmin_rows(d2):
    """d2.argmin(1) (the first of equal minima); on the CPU by numpy over
    contiguous rows (25x faster than torch's argmin at 1536 x 768), or, where
    d2 is the transpose of a contiguous (k, m) matrix (`_gram_scores`), down
    its columns by `_argmin_columns`: no transposed copy (that copy was 15% of
    a Qwen2.5-0.5B fold)."""
    if d2.device.type != "cpu":
        return d2.argmin(1)
    if not d2.is_contiguous() and d2.T.is_contiguous():
        return _argmin_columns(d2.T)
    return torch.from_numpy(d2.contiguous().numpy().argmin(1))


def _argmin_columns(s, block=32):
    """s.argmin(0) of a contiguous (k, m) matrix, the first of equal minima,
    3x faster than torch's own on the CPU (which does not vectorise across
    columns; a plain minimum does): the minimum of each block of rows, the
    first block that holds a column's minimum, then the first minimum inside
    that block. (Without NaN, which k-means distances never hold.)"""
    k, m = s.shape
    if k < 2 * block:
        return s.argmin(0)
    whole = k // block * block
    mins = s[:whole].view(k // block, block, m).amin(1)
    if whole < k:
        mins = torch.cat([mins, s[whole:].amin(0, keepdim=True)])
    first = mins.argmin(0)
    rows = (first[None, :] * block + torch.arange(block, device=s.device)[:, None]).clamp_max_(k - 1)
    return first * block + s.gather(0, rows).argmin(0)  # rows past k repeat the last: never first


def _gram_scores(rows, labels, k, w, uniform):
    """(m, k): squared distances to the clusters' means (weighted by w; a
    cluster whose rows all weigh 0 takes their plain mean) less |x_i|^2.
    The Gram matrix is symmetric: its rows (times w, `_Distances.weigh`) are
    summed per cluster (contiguous adds), in two passes over the (k, m) sums,
    which are `rows.sums(k)`: the result is a transposed view of that buffer,
    valid until the next call."""
    g, m, w = rows.gram, labels.shape[0], w.to(rows.gram.dtype)
    mass = torch.zeros(k, dtype=g.dtype, device=g.device).index_add_(0, labels, w)
    gw = g if uniform else rows.weighted
    if not uniform:
        empty = mass <= 0
        if bool(empty.any()):
            w = torch.where(empty[labels], torch.ones_like(w), w)
            mass = torch.zeros_like(mass).index_add_(0, labels, w)
            gw = g * w[:, None]
    sums = rows.sums(k).index_add_(0, labels, gw)
    own = sums[labels, torch.arange(m, device=g.device)]  # sum over i's cluster of w_l <x_l, x_i>
    norms = torch.zeros_like(mass).index_add_(0, labels, w * own) / (mass * mass)  # |c_j|^2
    return sums.mul_((-2 / mass)[:, None]).add_(norms[:, None]).T


def _centres(x, labels, k, weights):
    """Cluster means; weighted means where weights are given (a cluster whose
    rows all weigh 0 takes their plain mean)."""
    counts = torch.bincount(labels, minlength=k).to(x.dtype)
    plain = torch.zeros(k, x.shape[1], dtype=x.dtype, device=x.device).index_add_(0, labels, x) / counts[:, None]
    if weights is None:
        return plain
    mass = torch.zeros(k, dtype=x.dtype, device=x.device).index_add_(0, labels, weights)
    weighted = torch.zeros_like(plain).index_add_(0, labels, x * weights[:, None])
    return torch.where(mass[:, None] > 0, weighted / mass.clamp_min(1e-300)[:, None], plain)


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


def plan(labels: torch.Tensor, k: int, *, dtype=torch.float64, weights: torch.Tensor | None = None) -> torch.Tensor:
    """The hard transport map of a clustering: T[i, labels[i]] = 1/m, or with
    unit weights T[i, labels[i]] = w_i / sum(w): carried on an `Out` axis a
    cluster's rows are then averaged with those weights (on an `In` axis its
    columns are still summed). Weights are floored at 1e-12 of the largest,
    so every unit keeps a (negligible) share and every cluster a mass."""
    m = labels.shape[0]
    t = torch.zeros(m, k, dtype=dtype, device=labels.device)
    if weights is None or not bool((weights > 0).any()):
        value = 1.0 / m
    else:
        w = weights.to(t.device, dtype)
        w = w.clamp_min(float(w.max()) * 1e-12)
        value = w / w.sum()
    t[torch.arange(m, device=labels.device), labels] = value
    return t


def cluster_plan(features: torch.Tensor, k: int, seed: int = 0, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Fold map of k-means on the features; with unit weights (importance) the
    k-means and the averaging inside each cluster are weighted."""
    return plan(kmeans(features, k, seed=seed, weights=weights), k, weights=weights)


def blocks(features: list) -> torch.Tensor:
    """Concatenate per-tensor feature blocks (m, d_i), each scaled to unit norm so
    that a large table (a vocabulary) does not drown the others."""
    return torch.cat([f / f.norm().clamp_min(1e-12) for f in features], 1)


def norms(features: list) -> torch.Tensor | None:
    """Per-unit L2 norm over per-tensor feature blocks (m, d_i), each block
    scaled to unit norm as in `blocks` (None when there are none)."""
    if not features:
        return None
    sq = sum(((f.double() / f.norm().double().clamp_min(1e-12)) ** 2).sum(1) for f in features)
    return sq.sqrt()


def _unit_rows(t, axis):
    """(m, -1) rows of the units on `axis` (a 2-D tensor is used as it is)."""
    return t.movedim(axis, 0).reshape(t.shape[axis], -1)


def slot_shares(slots) -> torch.Tensor | None:
    """`norms(...)^2` for blocks given as (tensor, unit axis) slots, without
    copying them into rows: each unit's squared norm over each tensor's."""
    total = None
    for t, axis in slots:
        others = [a for a in range(t.dim()) if a != axis]
        sq = (t.float().pow(2).sum(others) if others else t.float().pow(2)).double()  # sum([]) sums all
        share = sq / sq.sum().clamp_min(1e-300)
        total = share if total is None else total + share
    return total


def slot_gram(slots) -> torch.Tensor:
    """The centred Gram matrix (float32) of `blocks` of the slots' unit rows,
    summed tensor by tensor (t^T t for a unit axis 1): no concatenation of
    features that reach hundreds of thousands of columns (a vocabulary
    table, every layer's inputs) is ever made."""
    g = None
    for t, axis in slots:
        t = t.float()
        part = _gram((t.T if axis == 1 else t) if t.dim() == 2 else _unit_rows(t, axis))
        part /= part.trace().clamp_min(1e-24)
        g = part if g is None else g.add_(part)
    mean = g.mean(0)
    return g - mean[None, :] - mean[:, None] + mean.mean()


def outgoing_weights(out_rows: list) -> torch.Tensor | None:
    """Fold weights: each unit's squared outgoing norm (the columns that read
    it, per-tensor normalised). Merging unit i into a centroid c changes the
    layer's output by about |out_i| |x_i - c|, so k-means weighted by
    |out_i|^2 minimises that; a unit nothing reads weighs 0."""
    n = norms(out_rows)
    return None if n is None else n * n


def importance(in_rows: list, out_rows: list) -> torch.Tensor:
    """Magnitude importance of each unit for pruning: the L2 norm of what
    computes it (its feature rows, inputs carried) times the L2 norm of what
    reads it (its outgoing columns), each per-tensor normalised: the size of
    the unit's path, 0 for a unit nothing reads or nothing feeds."""
    imp = norms(in_rows)
    out = norms(out_rows)
    return imp if out is None else imp * out


def activation_importance(energy: torch.Tensor, out_rows: list) -> torch.Tensor:
    """Activation importance (with calibration data): the unit's RMS
    activation (`energy`: its mean square, or its share of a probe's) times
    the L2 norm of what reads it: the RMS of what it adds to the next layer,
    ~0 for a unit that is ~0 on the data however large its weights."""
    out = norms(out_rows)
    rms = energy.double().clamp_min(0).sqrt()
    return rms if out is None else rms * out.to(rms.device)


def select(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k highest scores, in their original order (ties: the
    lower index)."""
    m = scores.shape[0]
    if k > m:
        raise UnreachableShapeError(f"cannot prune {m} units to {k}: the target is wider")
    order = torch.sort(-scores.double(), stable=True).indices
    return order[:k].sort().values


def select_plan(kept: torch.Tensor, m: int, *, dtype=torch.float64) -> torch.Tensor:
    """The hard transport map of a pruning: T[kept[j], j] = 1/k; a dropped
    unit has an empty row (on an `In` axis its columns are dropped)."""
    k = kept.shape[0]
    t = torch.zeros(m, k, dtype=dtype, device=kept.device)
    t[kept, torch.arange(k, device=kept.device)] = 1.0 / k
    return t


def prune_plan(in_rows: list, out_rows: list, k: int, scores: torch.Tensor | None = None) -> torch.Tensor:
    """Keep the k most important units: `scores` (measured on data, see
    `otcompress.importance`), else weight magnitude (`importance`)."""
    scores = importance(in_rows, out_rows) if scores is None else scores
    return select_plan(select(scores, k), scores.shape[0])


def _unit_products(a, b):
    """Per unit |a_i| |b_i| over whole tensors normalised to unit norm."""
    return norms([a]) * norms([b])


def _head_shares(s_qk, s_vo, heads: int, d: int) -> torch.Tensor:
    """A head's importance: its share of all Q/K importance plus its share of all V/O."""
    return (s_qk.reshape(heads, d).sum(1) / s_qk.sum().clamp_min(1e-300)
            + s_vo.reshape(heads, d).sum(1) / s_vo.sum().clamp_min(1e-300))


def prune_head_plans(q, k, v, o_cols, parent_heads: int, target_heads: int, target_dim: int, scores=None):
    """Pruning maps of one attention layer (rows as in `head_plans`): keep the
    `target_heads` most important heads whole, then inside each the
    `target_dim` most important Q/K units (importance |q_i| |k_i|: a score
    sums q_i k_i) and V units (|v_i| |o_i|, O's column). A head's importance
    adds its share of all Q/K and of all V/O importance. `scores`: per-unit
    (Q/K, V/O) importances measured on data instead of these magnitudes.
    Returns (T_qk, T_v)."""
    if target_heads > parent_heads:
        raise UnreachableShapeError(
            f"cannot prune {parent_heads} attention heads to {target_heads}: the target has more")
    m = q.shape[0]
    d = m // parent_heads
    if target_dim > d:
        raise UnreachableShapeError(f"cannot prune heads of {d} units to {target_dim}")
    s_qk, s_vo = (_unit_products(q, k), _unit_products(v, o_cols)) if scores is None else scores
    heads = select(_head_shares(s_qk, s_vo, parent_heads, d), target_heads).tolist()
    kept_qk = torch.cat([h * d + select(s_qk[h * d:(h + 1) * d], target_dim) for h in heads])
    kept_v = torch.cat([h * d + select(s_vo[h * d:(h + 1) * d], target_dim) for h in heads])
    return select_plan(kept_qk, m), select_plan(kept_v, m)


def prune_rotary_plans(q, k, v, o_cols, parent_heads: int, kv_heads: tuple, target_heads: int, d: int,
                       scores=None):
    """Pruning maps for rotary (and grouped-query) attention: whole heads only.
    Each query head's importance adds its shares of all Q/K importance
    (|q_i| |k_i| against its group's K) and of all V/O importance (|v_i| |o_i|,
    its group's V against its own block of O's columns); a key/value group's
    is the sum of its query heads'. The most important groups are kept, and
    in each the most important of its query heads. `scores`: per query-head
    unit (Q/K, V/O) importances measured on data instead. Returns (T_q, T_kv)."""
    (gp, ga), rp = kv_heads, parent_heads // kv_heads[0]
    ra = target_heads // ga
    if ga > gp or ra > rp:
        raise UnreachableShapeError(f"cannot prune {parent_heads} heads in {gp} key/value groups to "
                                    f"{target_heads} in {ga}")
    group_of = torch.arange(parent_heads, device=q.device) // rp
    unit = lambda heads: (heads[:, None] * d + torch.arange(d, device=q.device)).flatten()  # noqa: E731
    if scores is None:
        k_rep, v_rep = k[unit(group_of)], v[unit(group_of)]  # each query head's K and V rows
        scores = _unit_products(q, k_rep), _unit_products(v_rep, o_cols)
    per_head = _head_shares(*scores, parent_heads, d)
    groups = select(per_head.reshape(gp, rp).sum(1), ga)
    heads = torch.cat([g * rp + select(per_head[g * rp:(g + 1) * rp], ra) for g in groups.tolist()])
    return select_plan(unit(heads), parent_heads * d), select_plan(unit(groups), gp * d)


def head_plans(q, k, v, o_cols, parent_heads: int, target_heads: int, target_dim: int, seed: int = 0,
               weights_v: torch.Tensor | None = None):
    """Head-aware fold maps of one attention layer.

    q, k, v: parent rows (units, features) with inputs already carried into the
    target's residual space (bias appended); o_cols: O's columns (units,
    features), one per V unit. Parent heads are grouped into `target_heads`
    groups by features that do not depend on the order of units inside a head
    (each head's Q^T K and O V); then inside each group the units are clustered
    into `target_dim` target units, Q and K together (a score is a sum of Q-K
    unit products, so both must fold the same way) and V with O's columns,
    weighted by `weights_v` (`outgoing_weights`; None: alike). Returns (T_qk, T_v)."""
    m = q.shape[0]
    d = m // parent_heads
    groups = _group_heads(q, k, v, o_cols, parent_heads, target_heads, d, target_dim, seed)
    qk, vo = torch.cat([q, k], 1), torch.cat([v, o_cols], 1)
    labels_qk = torch.empty(m, dtype=torch.long, device=q.device)
    labels_v = torch.empty(m, dtype=torch.long, device=q.device)
    for g in range(target_heads):
        units = torch.cat([torch.arange(h * d, (h + 1) * d, device=q.device) for h in groups[g]])
        labels_qk[units] = g * target_dim + kmeans(blocks([qk[units]]), target_dim, seed=seed)
        w = None if weights_v is None else weights_v[units]
        labels_v[units] = g * target_dim + kmeans(blocks([vo[units]]), target_dim, seed=seed, weights=w)
    n = target_heads * target_dim
    return plan(labels_qk, n), plan(labels_v, n, weights=weights_v)


def _group_heads(q, k, v, o_cols, parent_heads, target_heads, d, target_dim, seed):
    if target_heads > parent_heads:
        raise IncompatibleModelsError(
            f"cannot fold {parent_heads} attention heads into {target_heads}: the target has more")
    if target_heads == parent_heads:
        return [[h] for h in range(parent_heads)]
    feats = []
    for h in range(parent_heads):
        s = slice(h * d, (h + 1) * d)
        feats.append(torch.cat([(q[s].T @ k[s]).flatten(), (o_cols[s].T @ v[s]).flatten()]))
    need = -(-target_dim // d)  # whole parent heads to fill a target head's units
    if target_heads * need > parent_heads:
        raise UnreachableShapeError(f"cannot fold {parent_heads} attention heads of {d} units into {target_heads} "
                                    f"heads of {target_dim}: each needs {need} parent heads")
    labels = sized_kmeans(torch.stack(feats), target_heads, need, seed=seed)
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
    need = -(-ra // rp)  # parent groups whose query heads fill a target group's
    if ga * need > gp:
        raise UnreachableShapeError(f"cannot fold {parent_heads} query heads in {gp} key/value groups into "
                                    f"{target_heads} in {ga}: each target group needs {need} parent groups")
    g_labels = sized_kmeans(blocks([per_head(k, gp), per_head(v, gp)]), ga, need, seed=seed)
    q_heads = per_head(q, parent_heads)
    h_labels = torch.empty(parent_heads, dtype=torch.long, device=q.device)
    for c in range(ga):
        members = torch.cat([torch.arange(g * rp, (g + 1) * rp, device=q.device)
                             for g in (g_labels == c).nonzero().flatten().tolist()])
        h_labels[members] = c * ra + kmeans(blocks([q_heads[members]]), ra, seed=seed)
    unit = lambda labels: (labels[:, None] * d + torch.arange(d, device=q.device)).flatten()  # noqa: E731
    return plan(unit(h_labels), target_heads * d), plan(unit(g_labels), ga * d)
