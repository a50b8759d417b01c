"""Activation statistics for activations-based alignment, accumulated while
streaming calibration batches (nothing is stored across batches).

The cost between a parent unit and an anchor unit is the Euclidean distance of
their z-scored activation vectors over all samples (every token a sample),
sqrt(2 N (1 - rho)): a function of the Pearson correlation rho alone, so per
probe we keep means, variances and the parent-by-anchor cross-moments, O(m n)
memory instead of O(tokens x units)."""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from contextlib import contextmanager, nullcontext

import torch

from otcompress.errors import DataError
from otcompress.flowgraph import Combine, Probe, Solve


class CrossMoments:
    """Running means, second moments and cross-moments of paired samples
    x (m units) and y (n units), merged batch by batch (Chan et al.) in float64
    so that large token counts lose no precision."""

    def __init__(self):
        self.count = 0
        self.mean_x = self.mean_y = self.m2_x = self.m2_y = self.c_xy = None

    def update(self, x: torch.Tensor, y: torch.Tensor) -> None:
        b = x.shape[0]
        if b == 0:
            return
        mx, my = x.mean(0), y.mean(0)
        xc, yc = x - mx, y - my
        c_b = (xc.T @ yc).double()
        m2x_b, m2y_b = (xc * xc).sum(0).double(), (yc * yc).sum(0).double()
        mx, my = mx.double(), my.double()
        if self.count == 0:
            self.count, self.mean_x, self.mean_y = b, mx, my
            self.m2_x, self.m2_y, self.c_xy = m2x_b, m2y_b, c_b
            return
        n = self.count + b
        dx, dy = mx - self.mean_x, my - self.mean_y
        w = self.count * b / n
        self.c_xy += c_b + w * torch.outer(dx, dy)
        self.m2_x += m2x_b + w * dx * dx
        self.m2_y += m2y_b + w * dy * dy
        self.mean_x += dx * (b / n)
        self.mean_y += dy * (b / n)
        self.count = n

    def correlation(self) -> torch.Tensor:
        # A unit that never varies has no direction: correlation 0 with everything.
        sx = self.m2_x.clamp_min(1e-12).sqrt()
        sy = self.m2_y.clamp_min(1e-12).sqrt()
        return (self.c_xy / torch.outer(sx, sy)).clamp_(-1.0, 1.0)

    def cost(self) -> torch.Tensor:
        """Distance of z-scored activation vectors, up to a constant factor that
        cost normalisation removes."""
        return (1.0 - self.correlation()).clamp_min_(0).sqrt_()


class ResidualNorms:
    """Anchor-side magnitudes of a residual join's skip x and branch f(x), for
    the weighted residual policies (paper Eq. 2)."""

    def __init__(self):
        self.sq_skip = self.sq_branch = 0.0
        self.abs_skip = self.abs_branch = None

    def update(self, skip: torch.Tensor, branch: torch.Tensor) -> None:
        self.sq_skip += float((skip.double() ** 2).sum())
        self.sq_branch += float((branch.double() ** 2).sum())
        a_s, a_b = skip.abs().sum(0).double(), branch.abs().sum(0).double()
        self.abs_skip = a_s if self.abs_skip is None else self.abs_skip + a_s
        self.abs_branch = a_b if self.abs_branch is None else self.abs_branch + a_b

    def alpha(self, policy: str):
        """Weight of the branch map in the join; a scalar or one per anchor unit."""
        if policy == "scalar":
            ns, nb = self.sq_skip ** 0.5, self.sq_branch ** 0.5
            return nb / max(ns + nb, 1e-300)
        return self.abs_branch / (self.abs_skip + self.abs_branch).clamp_min(1e-300)


@contextmanager
def capture(model: torch.nn.Module, probes: Iterable[Probe], device=None):
    """Forward hooks that store each probe's tensor of the latest forward pass
    (moved to `device` when one is given)."""
    store: dict = {}

    def keep(probe, t):
        store[probe] = t if device is None else t.to(device)
    with stream(model, probes, keep):
        yield store


def model_device(model) -> torch.device:
    """Where a model's parameters (else buffers) live; CPU for an empty module."""
    for t in (*model.parameters(), *model.buffers()):
        return t.device
    return torch.device("cpu")


def _on(inputs: Mapping, device) -> dict:
    return {k: v.to(device) for k, v in inputs.items()}


def iter_batches(data) -> Iterable[Mapping]:
    """`data` is one batch (a dict of input tensors) or an iterable of them."""
    if data is None:
        raise DataError("activations-based alignment and weighted residual policies need calibration data")
    if isinstance(data, Mapping):
        return [data]
    return data


def token_samples(t: torch.Tensor, token_mask, keep_tokens) -> torch.Tensor:
    """(batch, seq, units) -> (samples, units): every kept token is a sample."""
    if t.dim() == 2:
        return t.float()
    if t.dim() != 3:
        raise ValueError(f"expected (batch, seq, units) activations, got {tuple(t.shape)}")
    if keep_tokens is not None:
        t = t[:, keep_tokens]
        token_mask = None if token_mask is None else token_mask[:, keep_tokens]
    if token_mask is not None:
        return t[token_mask.bool()].float()
    return t.reshape(-1, t.shape[-1]).float()


def collect(spec, anchor, parents, data, *, need_costs: bool, need_norms: bool,
            token_filter: str | None = None, device=None, forward_dtype=None,
            max_chunk: int = 16, progress=None) -> dict:
    """Streams `data` through the anchor and every parent once and returns
    {"costs": [ {tm: (m, n) cost} per parent ], "norms": {join tm: ResidualNorms},
     "samples": tokens seen}.

    Memory stays bounded: batches are cut into chunks of `max_chunk` examples,
    and each parent activation is folded into the statistics by its forward
    hook the moment it is produced, so only the anchor's chunk is held.
    `forward_dtype=torch.bfloat16` runs the forward passes under autocast.

    `device` (default: the anchor's) is where the statistics are computed and
    where the costs (and matrix residual weights) are returned. Each model is
    run where it lives: its inputs are moved to it, and its activations to
    `device`, so CPU and CUDA models can be mixed (at the cost of copies).

    Only positions with attention_mask == 1 count as samples. `token_filter`
    selects the tokens of the cost statistics only; residual norms always use
    every (unpadded) token."""
    solves = [n for n in spec.nodes if isinstance(n, Solve)] if need_costs else []
    joins = [n for n in spec.nodes if isinstance(n, Combine)] if need_norms else []
    solve_probes = {probe for n in solves for _, probe in n.parts}
    anchor_probes = solve_probes | {p for j in joins for p in (j.skip_probe, j.branch_probe)}
    sequence_probes = {probe for n in solves if n.sequence for _, probe in n.parts}
    moments = [{p: CrossMoments() for p in solve_probes} for _ in parents]
    norms = {j.tm: ResidualNorms() for j in joins}
    state = {"seen": 0, "examples": 0}
    total = _num_examples(data)  # for progress: examples, since the token count is known only when seen
    device = model_device(anchor) if device is None else torch.device(device)
    a_dev, p_devs = model_device(anchor), [model_device(p) for p in parents]
    with torch.inference_mode(), _autocast(a_dev, forward_dtype), \
            capture(anchor, anchor_probes, device) as a_acts:
        for inputs in _chunks(data, device, max_chunk):
            mask = inputs.get("attention_mask")
            anchor(**_on(inputs, a_dev))
            keep = _keep_tokens(spec, token_filter, a_acts, sequence_probes, device)
            for j in joins:
                norms[j.tm].update(token_samples(a_acts[j.skip_probe], mask, None),
                                   token_samples(a_acts[j.branch_probe], mask, None))
            # The anchor side of every pair, selected once and reused for each parent.
            a_samples = {p: token_samples(a_acts[p], mask, keep if p in sequence_probes else None)
                         for p in solve_probes}
            for k, parent in enumerate(parents):
                def fold(probe, t, k=k):
                    kt = keep if probe in sequence_probes else None
                    moments[k][probe].update(token_samples(t.to(device), mask, kt), a_samples[probe])
                with stream(parent, solve_probes, fold), _autocast(p_devs[k], forward_dtype):
                    parent(**_on(inputs, p_devs[k]))
            state["seen"] += int(mask.sum()) if mask is not None else _batch_tokens(a_acts)
            state["examples"] += len(next(iter(inputs.values())))
            if progress:
                progress("activations", state["examples"], total)
    if need_costs and state["seen"] == 0:
        raise DataError("calibration data is empty")
    costs = [_costs(solves, m) for m in moments]
    return {"costs": costs, "norms": norms, "samples": state["seen"]}


def _costs(solves, moments: dict) -> dict:
    """Turn moments into float32 costs, freeing each probe's moments as soon as
    no later map needs them (peak memory: one set of moments, not two)."""
    last_use = {probe: i for i, n in enumerate(solves) for _, probe in n.parts}
    costs = {}
    for i, node in enumerate(solves):
        costs[node.tm] = _solve_cost(node, moments).float()
        for _, probe in node.parts:
            if last_use[probe] == i:
                moments.pop(probe, None)
    return costs


def _chunks(data, device, max_chunk):
    for batch in iter_batches(data):
        inputs = {k: v.to(device) for k, v in batch.items() if k != "labels"}
        n = next(iter(inputs.values())).shape[0]
        for i in range(0, n, max_chunk):
            yield {k: v[i:i + max_chunk] for k, v in inputs.items()}


def _num_examples(data):
    """Examples in `data` when it is one batch or a sized collection of them, else None."""
    if isinstance(data, Mapping):
        data = [data]
    if not isinstance(data, (list, tuple)):
        return None
    return sum(len(next(iter(b.values()))) for b in data if b)


def _autocast(device, dtype):
    if dtype is None or dtype == torch.float32:
        return nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtype)


@contextmanager
def stream(model, probes, fold):
    """Forward hooks that hand each probe's tensor to `fold(probe, tensor)` at once."""
    modules = dict(model.named_modules())
    handles = []
    for probe in set(probes):
        if probe.module not in modules:
            raise KeyError(f"probe module {probe.module} not in {type(model).__name__}")

        def fn(module, args, output, probe=probe):
            t = args[0] if probe.side == "in" else output
            t = t[0] if isinstance(t, tuple) else t
            if probe.part is not None:  # one map's slice of a fused output (Q | K | V)
                t = t.chunk(probe.part[1], dim=-1)[probe.part[0]]
            fold(probe, t)
        handles.append(modules[probe.module].register_forward_hook(fn))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _solve_cost(node: Solve, moments: dict) -> torch.Tensor:
    parts = [moments[probe].cost() for _, probe in node.parts]
    if len(parts) == 1:
        return parts[0]
    # Several parts (shared Q/K): distances of concatenated features add in squares.
    return torch.stack([c * c for c in parts]).sum(0).sqrt()


def _keep_tokens(spec, token_filter, acts, sequence_probes, device):
    if token_filter is None:
        return None
    if spec.token_filter is None:
        raise DataError(f"token filter '{token_filter}' only applies to vision transformers")
    seq_len = next((acts[p].shape[1] for p in sequence_probes if acts[p].dim() == 3), None)
    if seq_len is None:
        # No cost statistics over tokens (weights alignment with a weighted
        # residual): the filter has nothing to select from.
        return None
    return spec.token_filter(token_filter, seq_len).to(device)


def _batch_tokens(acts) -> int:
    t = next(iter(acts.values()))
    return t.shape[0] * (t.shape[1] if t.dim() == 3 else 1)
