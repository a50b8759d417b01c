"""Activation statistics for activations-based alignment, accumulated while
streaming calibration batches (nothing is stored across batches).

The cost between a parent unit and an anchor unit is the Euclidean distance of
their z-scored activation vectors over all samples (every token a sample),
sqrt(2 N (1 - rho)): a function of the Pearson correlation rho alone, so per
probe we keep means, variances and the parent-by-anchor cross-moments, O(m n)
memory instead of O(tokens x units)."""
from __future__ import annotations

import functools
import itertools
from collections.abc import Iterable, Mapping
from contextlib import contextmanager, nullcontext

import torch

from otcompress.errors import DataError
from otcompress.flowgraph import Combine, Probe, Solve


class Moments:
    """Running mean and second moment of one side's units (samples x units).

    Shifted data: every batch is shifted by the first batch's mean and the
    shifted values are summed in float64, so large means cancel no digits and
    merging a batch costs O(units), not a Chan merge of every matrix.
    `shifted(x)` folds a batch in and returns its shifted copy, the operand of
    the cross-moment products (one copy per side and batch, shared by every
    CrossMoments that reads this side)."""

    def __init__(self):
        self.count = 0
        self.shift = self.s1 = self.s2 = None
        self.shifting = True
        self.exact_bf16 = False  # the latest batch's operand holds bfloat16 values exactly

    def shifted(self, x: torch.Tensor) -> torch.Tensor:
        """`x`: float32 samples, or bfloat16 ones (autocast forward passes).
        A side that starts in bfloat16 is summed unshifted: its float32 operand
        then holds bfloat16 values exactly, so the products can run as
        bfloat16 GEMMs with float32 accumulation and lose nothing
        (CrossMoments.add); the forward passes already rounded far more."""
        low = x.dtype == torch.bfloat16
        x = x.float()
        if self.shift is None and x.shape[0] == 0:  # nothing to shift by yet (a fully padded batch)
            self.exact_bf16 = False
            return x
        if self.shift is None:
            self.shifting = not low
            self.shift = x.mean(0) if self.shifting else x.new_zeros(x.shape[1])
            self.s1 = torch.zeros(x.shape[1], dtype=torch.float64, device=x.device)
            self.s2 = torch.zeros_like(self.s1)
        xs = x - self.shift if self.shifting else x
        self.exact_bf16 = low and not self.shifting
        # A batch's sums in float32 (15x faster than reducing in float64 here),
        # then carried in float64 across batches.
        self.s1 += xs.sum(0)
        self.s2 += (xs * xs).sum(0)
        self.count += x.shape[0]
        return xs

    @property
    def mean(self) -> torch.Tensor:
        return self.shift.double() + self.s1 / self.count

    @property
    def m2(self) -> torch.Tensor:
        """Sum of squared deviations from the mean, per unit."""
        return (self.s2 - self.s1 * self.s1 / self.count).clamp_min_(0)


class CrossMoments:
    """Means, second moments and cross-moments of paired samples x (m units)
    and y (n units), accumulated batch by batch in float64 from float32
    products of shifted batches (see Moments).

    `update(x, y)` folds raw batches into both sides. To share one side among
    several pairs (the anchor's side, against every parent), give it as
    `y_side` and feed shifted batches with `add(xs, ys)`: the anchor's shift
    and sums are then computed once per batch, not once per parent."""

    def __init__(self, x_side: Moments | None = None, y_side: Moments | None = None):
        self.x = Moments() if x_side is None else x_side
        self.y = Moments() if y_side is None else y_side
        self.s_xy = None

    @property
    def count(self) -> int:
        return self.x.count

    def update(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.add(self.x.shifted(x), self.y.shifted(y))

    def add(self, xs: torch.Tensor, ys: torch.Tensor, out: torch.Tensor | None = None) -> None:
        """Fold in the product of already shifted batches. `out`: an (m, n)
        float32 scratch for the product (reused across calls and pairs, so the
        only per-pair matrix is the float64 sum)."""
        if xs.shape[0] == 0:
            return
        if out is None:
            out = xs.new_empty(xs.shape[1], ys.shape[1])
        fast = self.x.exact_bf16 and self.y.exact_bf16 and xs.device.type == "cpu"
        with _bf16_gemm() if fast else nullcontext():
            # out= keeps a float32 product under autocast too (a plain `@` in a
            # hook of a bfloat16 forward pass would round every sum to bfloat16).
            prod = torch.mm(xs.T, ys, out=out)
        if self.s_xy is None:
            self.s_xy = prod.double()
        else:
            self.s_xy += prod

    def covariance_sum(self) -> torch.Tensor:
        """sum over samples of (x - mean_x)(y - mean_y)^T, (m, n) float64."""
        if self.s_xy is None:
            return torch.zeros(self.x.shift.numel(), self.y.shift.numel(), dtype=torch.float64,
                               device=self.x.shift.device)
        return self.s_xy - torch.outer(self.x.s1, self.y.s1 / self.count)

    def correlation(self) -> torch.Tensor:
        # A unit that never varies has no direction: correlation 0 with everything.
        sx = self.x.m2.clamp_min(1e-12).sqrt()
        sy = self.y.m2.clamp_min(1e-12).sqrt()
        return (self.covariance_sum() / torch.outer(sx, sy)).clamp_(-1.0, 1.0)

    def cost(self) -> torch.Tensor:
        """Distance of z-scored activation vectors, up to a constant factor that
        cost normalisation removes."""
        return (1.0 - self.correlation()).clamp_min_(0).sqrt_()


class LinearImage(CrossMoments):
    """Cross-moments of two Linear layers' outputs x W_x^T + b_x and
    y W_y^T + b_y, derived from those of their inputs: the centred outputs are
    linear in the centred inputs, so cov = W_x cov(x, y) W_y^T exactly. Q, K
    and V read one input: its cross-moments, accumulated once, give all three
    (a third of the products). The outputs' own means and variances are still
    summed from the outputs (`x_side`, `y_side`: O(samples x units))."""

    def __init__(self, inputs: CrossMoments, w_x: torch.Tensor, w_y: torch.Tensor,
                 x_side: Moments, y_side: Moments):
        super().__init__(x_side, y_side)
        self.inputs, self.w_x, self.w_y = inputs, w_x, w_y

    def add(self, xs, ys, out=None):
        raise TypeError("a LinearImage is derived from its inputs' cross-moments; update those")

    def covariance_sum(self) -> torch.Tensor:
        w_x, w_y = (w.to(self.x.s1.device, torch.float64) for w in (self.w_x, self.w_y))
        return w_x @ self.inputs.covariance_sum() @ w_y.T


@contextmanager
def _bf16_gemm():
    """float32 GEMMs through oneDNN's bfloat16 path (bfloat16 inputs, float32
    accumulation and output), where the CPU has bfloat16 instructions: exact
    products for operands that hold bfloat16 values, ~2x the float32 rate."""
    mm = getattr(torch.backends.mkldnn, "matmul", None)
    if mm is None or not _cpu_bf16():
        yield
        return
    before = mm.fp32_precision
    mm.fp32_precision = "bf16"
    try:
        yield
    finally:
        mm.fp32_precision = before


@functools.cache
def _cpu_bf16() -> bool:
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


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


def model_inputs(data, device) -> Iterable[dict]:
    """Each batch of `data` as a model's keyword inputs on `device`; labels
    are dropped (a calibration pass computes no loss)."""
    for batch in iter_batches(data):
        yield {k: v.to(device) for k, v in batch.items() if k != "labels"}


def reiterable(data):
    """`data` (one batch, an iterable of batches, or None) in a form every pass
    can iterate again: a one-shot iterator (a generator) is materialised into
    a list once, so the statistics, repair and the reg sweep all see the same
    batches. Lists, datasets and data loaders are returned as they are."""
    if data is None or isinstance(data, Mapping):
        return data
    if iter(data) is data:  # an iterator: a second pass would see nothing
        return list(data)
    return data


def token_samples(t: torch.Tensor, token_mask, keep_tokens, dtype=torch.float32) -> torch.Tensor:
    """(batch, seq, units) -> (samples, units): every kept token is a sample
    (converted to `dtype`; None keeps the tensor's own)."""
    if t.dim() == 2:
        return t.to(dtype or t.dtype)
    if t.dim() != 3:
        raise ValueError(f"expected (batch, seq, units) activations, got {tuple(t.shape)}")
    if keep_tokens is not None:
        t = t[:, keep_tokens]
        token_mask = None if token_mask is None else token_mask[:, keep_tokens]
    if token_mask is not None:
        return t[token_mask.bool()].to(dtype or t.dtype)
    return t.reshape(-1, t.shape[-1]).to(dtype or t.dtype)


def collect(spec, anchor, parents, data, *, need_costs: bool, need_norms: bool,
            token_filter: str | None = None, device=None, forward_dtype=None,
            max_chunk: int = 16, progress=None) -> dict:
    """Streams `data` through the anchor and every parent once and returns
    {"costs": [ {tm: (m, n) cost} per parent ], "norms": {join tm: ResidualNorms},
     "samples": tokens seen}.

    Memory stays bounded: batches are cut into equal chunks of at most
    `max_chunk` examples; the anchor's hooks keep only the shifted samples its
    pairs need (shifted and summed once, shared by every parent), and each
    parent activation is folded into the statistics by its forward hook the
    moment it is produced, so only the anchor's chunk is held.
    `forward_dtype=torch.bfloat16` runs the forward passes under autocast; the
    statistics stay float32 products summed in float64.

    Work: one forward pass per model and chunk, plus one of a single example
    that finds Linear probes reading one input (Q, K, V): their cross-moments
    are derived from that input's (`LinearImage`) when it saves products.

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
    if token_filter is not None and spec.token_filter is None:
        raise DataError(f"token filter '{token_filter}' only applies to vision transformers")
    device = model_device(anchor) if device is None else torch.device(device)
    a_dev, p_devs = model_device(anchor), [model_device(p) for p in parents]
    total = _num_examples(data)  # for progress: examples, since the token count is known only when seen
    chunks = _chunks(data, device, max_chunk)
    first = next(chunks, None)
    # Linear-output probes that read one input (Q, K, V): probe -> that input's probe.
    via_input = {}
    if first is not None and solve_probes:
        with torch.inference_mode():
            via_input = _shared_inputs([(anchor, a_dev), *zip(parents, p_devs)], solve_probes,
                                       {k: v[:1] for k, v in first.items()}, total, forward_dtype)
    acc = _Accumulator(spec, solves, joins, via_input, len(parents), device, token_filter)
    with torch.inference_mode():
        for inputs in itertools.chain([first] if first is not None else [], chunks):
            acc.add(anchor, a_dev, parents, p_devs, inputs, forward_dtype)
            if progress:
                progress("activations", acc.examples, total)
    moments = acc.moments(anchor, parents)
    if need_costs and acc.seen == 0:
        raise DataError("calibration data is empty")
    costs = [_costs(solves, m) for m in moments]
    return {"costs": costs, "norms": acc.norms, "samples": acc.seen}


def unit_energy(model, probes, data, *, max_chunk: int = 16, progress=None) -> tuple[dict, int]:
    """One model's own second moments: ({probe: E[x^2] per unit (float64)},
    tokens seen), streaming `data` through it once (every unpadded token a
    sample; no anchor, no cross-moments). The mean square is the activation
    half of a unit's importance for pruning (`otcompress.importance`): a unit
    that is ~0 on the data contributes ~0 whatever its weights."""
    device = model_device(model)
    sides = {p: Moments() for p in set(probes)}
    seen = done = 0
    total = _num_examples(data)
    with torch.inference_mode():
        for inputs in _chunks(data, device, max_chunk):
            mask = inputs.get("attention_mask")

            def take(probe, t):
                sides[probe].shifted(token_samples(t.to(device), mask, None))
            with stream(model, sides, take):
                model(**inputs)
            seen = max(m.count for m in sides.values()) if sides else seen
            done += len(next(iter(inputs.values())))
            if progress:
                progress("importance", done, total)
    if sides and seen == 0:
        raise DataError("calibration data is empty")
    return {p: m.mean * m.mean + m.m2 / m.count for p, m in sides.items() if m.count}, seen


class _Chunk:
    """One chunk's state: its mask, the token filter's positions (found at the
    first sequence probe), and what the anchor's pass leaves for the parents'."""

    def __init__(self, mask):
        self.mask = mask
        self.keep = self.tokens = None
        self.raw, self.a_shifted = {}, {}  # join probe -> raw tensor; product probe -> shifted samples


class _Accumulator:
    """`collect`'s running statistics, fed chunk by chunk. The anchor's side of
    every pair is shifted and summed once per chunk and shared by all parents;
    each parent keeps its own side and the float64 cross-moment sums."""

    def __init__(self, spec, solves, joins, via_input, n_parents, device, token_filter):
        self.spec, self.joins, self.via_input = spec, joins, via_input
        self.device, self.token_filter = device, token_filter
        self.solve_probes = {probe for n in solves for _, probe in n.parts}
        self.join_probes = {p for j in joins for p in (j.skip_probe, j.branch_probe)}
        self.product_probes = (self.solve_probes - via_input.keys()) | set(via_input.values())
        sequence = {probe for n in solves if n.sequence for _, probe in n.parts}
        self.sequence_probes = sequence | {via_input[p] for p in via_input if p in sequence}
        # Probes with a Moments per side (all a parent's hooks read); the anchor's
        # hooks also keep the tensors the residual joins read.
        self.sided = self.solve_probes | self.product_probes
        self.streamed = self.sided | self.join_probes
        self.anchor_sides = {p: Moments() for p in self.sided}
        self.parent_sides = [{p: Moments() for p in self.sided} for _ in range(n_parents)]
        self.products = [{p: CrossMoments(sides[p], self.anchor_sides[p]) for p in self.product_probes}
                         for sides in self.parent_sides]
        self.norms = {j.tm: ResidualNorms() for j in joins}
        self.scratch: dict = {}  # one float32 product buffer per (m, n), shared by all probes of that shape
        self.seen = self.examples = 0

    def add(self, anchor, a_dev, parents, p_devs, inputs, forward_dtype) -> None:
        """One forward pass of the anchor, then of each parent, on `inputs`."""
        chunk = _Chunk(inputs.get("attention_mask"))
        with stream(anchor, self.streamed, functools.partial(self._take, chunk)), _autocast(a_dev, forward_dtype):
            anchor(**_on(inputs, a_dev))
        for j in self.joins:
            self.norms[j.tm].update(token_samples(chunk.raw[j.skip_probe], chunk.mask, None),
                                    token_samples(chunk.raw[j.branch_probe], chunk.mask, None))
        chunk.raw.clear()
        for k, parent in enumerate(parents):
            fold = functools.partial(self._fold, chunk, k)
            with stream(parent, self.sided, fold), _autocast(p_devs[k], forward_dtype):
                parent(**_on(inputs, p_devs[k]))
        chunk.a_shifted.clear()
        self.seen += int(chunk.mask.sum()) if chunk.mask is not None else (chunk.tokens or 0)
        self.examples += len(next(iter(inputs.values())))

    def _keep(self, chunk, probe, t):
        """The token filter's positions for a sequence probe (None: every token)."""
        if probe not in self.sequence_probes:
            return None
        if self.token_filter is not None and chunk.keep is None and t.dim() == 3:
            chunk.keep = self.spec.token_filter(self.token_filter, t.shape[1]).to(self.device)
        return chunk.keep

    def _take(self, chunk, probe, t):
        """Anchor hook: only the shifted samples are kept (the raw tensor too
        when a residual join reads it), never a second copy."""
        t = t.to(self.device)
        if chunk.tokens is None:
            chunk.tokens = t.shape[0] * (t.shape[1] if t.dim() == 3 else 1)
        if probe in self.join_probes:
            chunk.raw[probe] = t
        if probe in self.anchor_sides:
            ys = self.anchor_sides[probe].shifted(token_samples(t, chunk.mask, self._keep(chunk, probe, t), None))
            if probe in self.product_probes:
                chunk.a_shifted[probe] = ys

    def _fold(self, chunk, k, probe, t):
        """Parent k's hook: its samples join its side and, against the anchor's
        shifted ones, the cross-moment sums."""
        samples = token_samples(t.to(self.device), chunk.mask, self._keep(chunk, probe, t), None)
        xs = self.parent_sides[k][probe].shifted(samples)
        if probe not in self.product_probes:
            return
        ys = chunk.a_shifted[probe]
        key = (xs.shape[1], ys.shape[1])
        if key not in self.scratch:
            self.scratch[key] = torch.empty(key, device=self.device)
        self.products[k][probe].add(xs, ys, out=self.scratch[key])

    def moments(self, anchor, parents) -> list:
        """Per parent {solve probe: its cross-moments}; a probe read through its
        input (Q, K, V) gets them derived from the input's (`LinearImage`)."""
        moments = []
        for k, parent in enumerate(parents):
            per_probe = {}
            for p in self.solve_probes:
                if p in self.via_input:
                    w_x, w_y = (m.get_submodule(p.module).weight.detach() for m in (parent, anchor))
                    per_probe[p] = LinearImage(self.products[k][self.via_input[p]], w_x, w_y,
                                               self.parent_sides[k][p], self.anchor_sides[p])
                else:
                    per_probe[p] = self.products[k][p]
            moments.append(per_probe)
        return moments


def _shared_inputs(models, probes, example, examples, forward_dtype) -> dict:
    """{probe: Probe(module, "in")} for the Linear-output probes whose modules
    read one and the same input tensor in every model (Q, K and V of an
    attention layer), found by a forward pass of one example; only groups where
    the shared input's products, over the expected tokens (`examples` x this
    example's; unknown: assumed many), cost less than the members' own plus
    deriving them (float64, `LinearImage`)."""
    def linear(model, probe):
        try:
            return model.get_submodule(probe.module)
        except AttributeError:
            return None
    cands = [p for p in probes if p.side == "out" and p.part is None
             and all(type(linear(m, p)) is torch.nn.Linear for m, _ in models)]  # noqa: E721 - exactly F.linear
    if not cands:
        return {}
    groupings, tokens = [], 0
    for model, dev in models:
        seen = []  # [input tensor, [probes]]; holding the tensors keeps `is` meaningful

        def pre(module, args, probe):
            if not args:  # input given by keyword: not grouped (nor read by an "in" probe)
                return
            for entry in seen:
                if entry[0] is args[0]:
                    entry[1].append(probe)
                    return
            seen.append([args[0], [probe]])
        handles = [linear(model, p).register_forward_pre_hook(functools.partial(pre, probe=p)) for p in cands]
        try:
            with _autocast(dev, forward_dtype):
                model(**_on(example, dev))
        finally:
            for h in handles:
                h.remove()
        tokens = max([tokens] + [t.shape[:-1].numel() for t, _ in seen])
        groupings.append({frozenset(g) for _, g in seen if len(g) > 1})
    expected = None if examples is None else examples * tokens
    anchor, parents = models[0][0], [m for m, _ in models[1:]]
    chosen = {}
    for group in set.intersection(*groupings):
        members = sorted(group, key=lambda p: p.module)
        a_in = linear(anchor, members[0]).in_features
        per_token_direct = per_token_shared = derive = 0
        for parent in parents:
            p_in = linear(parent, members[0]).in_features
            per_token_shared += p_in * a_in
            for p in members:
                m, n = linear(parent, p).out_features, linear(anchor, p).out_features
                per_token_direct += m * n
                derive += 2 * (m * p_in * a_in + m * a_in * n)  # float64: about twice a float32 product
        saved = per_token_direct - per_token_shared
        if saved > 0 and (expected is None or expected * saved > derive):
            chosen.update({p: Probe(members[0].module, "in") for p in members})
    return chosen


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
    for inputs in model_inputs(data, device):
        n = next(iter(inputs.values())).shape[0]
        # Equal chunks (50 -> 13, 13, 12, 12 rather than 16, 16, 16, 2): a tiny
        # last chunk runs the forward passes at a worse GEMM rate.
        size = -(-n // max(1, -(-n // max_chunk))) if n else 1
        for i in range(0, n, size):
            yield {k: v[i:i + size] for k, v in inputs.items()}


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
