"""The public fusion API: align every parent to the anchor, average, and build
a model of the anchor's class and config."""
from __future__ import annotations

import copy
import dataclasses
import functools
import inspect
import itertools
import math
import platform
import time
import warnings
from contextlib import contextmanager

import torch

from otcompress import activations, architectures, depth, embedding, importance, inputs, modelio
from otcompress import reconstruct as reconstruct_mod, repair as repair_mod
from otcompress.align import AlignOptions, HeadShapes, align_parent
from otcompress.errors import DataError, IncompatibleModelsError, InvalidOptionError, SolverError
from otcompress.options import BY_NAME, FUSE_OPTIONS, REPORTED, FuseOptions, check_api

# The options are declared once, in `options` (`fuse`'s signature is tested against it),
# and checked once, with the models, at the entry (`inputs.check`).
ALIGNMENTS, FROM_PARENTS = inputs.ALIGNMENTS, inputs.FROM_PARENTS
_OPTIONS = FUSE_OPTIONS
REPORT_SCHEMA = "otcompress.fusion_report/1"
REG_GRID = (0.005, 0.01, 0.02, 0.05, 0.08, 0.2, 0.5)
DEFAULT_REG = BY_NAME["reg"].default  # `fuse`'s reg without calibration data (the recipes' default)


def default_reg(reg, data, solver="sinkhorn", alignment="weights", n_parents=1):
    """`fuse`'s reg: as given, or for None "auto" where there is data to choose
    it on and it changes the result (Sinkhorn; a single fold uses no OT), else
    DEFAULT_REG."""
    if reg is not None:
        return reg
    sweeps = data is not None and solver == "sinkhorn" and not (alignment in FROM_PARENTS and n_parents < 2)
    return "auto" if sweeps else DEFAULT_REG


def fuse(anchor, parents, *, alignment="weights", solver="sinkhorn", reg=None, residual="average",
         data=None, weights=None, qk="auto", token_filter=None, cost_norm="gap",
         max_iter=5000, tol=1e-6, reg_grid=None, holdout=None, activation_dtype="float32",
         repair=False, reconstruct=False, seed=0, depth_merge="select", head_alignment="cross", on_unconverged="raise", on_uniform="warn",
         pooling=None, trust_remote_code=False, progress=None, device=None):
    """Fuse `parents` into the `anchor`'s architecture and width.

    anchor, parents: model objects or local model directories; same model type,
        any widths (heterogeneous fusion); parents as deep as the anchor or
        deeper (depth-mapped first: `otcompress.depth`; the report's
        `depth_maps` says which blocks were kept). With alignment="fold"
        or "prune" the anchor may also be a config (a target width, e.g. from
        `architectures.target_config`): its weights are never read.
    alignment: "weights" or "activations" (needs `data`): OT of each parent's
        units onto the anchor's. "fold": cluster each parent's own units into
        the anchor's widths (model folding; the anchor only gives the
        architecture; units weighted by their outgoing norms), then OT-fuse
        the folds with `solver`/`reg` when there are several parents (parent
        weights only). "prune": the same, keeping each parent's most
        important units (whole heads, then units inside them; rotary
        attention whole heads only), scored without `data` by weight
        magnitude (the norm of what feeds a unit times the norm of what
        reads it) and with `data` as `importance.kind` says (by default
        its RMS activation on the data times the norm of what reads it;
        first-order Taylor on labelled batches is measured too); the
        report's `importance` says which, per parent.
    solver, reg: "sinkhorn" (entropic, regulariser `reg` on normalised costs,
        see `cost_norm`) or "emd" (exact). The default (reg=None) is "auto"
        when `data` is given and reg matters (Sinkhorn; folding only with
        several parents), else the fixed DEFAULT_REG = 0.02: on two
        independently trained digits ViTs, activations-based with data, 0.02
        gave 53% one-shot and "auto" 70%. reg="auto" fuses at every value of `reg_grid` and keeps
        the one with the lowest loss on `holdout` batches (default: `data`): the
        task loss where batches carry labels, else the KL divergence to the
        parents' mean prediction; for headless models the similarity loss of
        embeddings pooled by `pooling` (otcompress.embedding; default: the
        family's pooling).
    residual: how maps meet at residual joins: "average", "scalar" or "matrix"
        (the weighted ones measure the anchor on `data`).
    data: one batch (dict of input tensors) or an iterable of batches.
    weights: mixing weights [anchor, parent1, ...], normalised; uniform by default.
    qk: "separate" Q and K maps, "shared" one map, "auto" = shared for EMD.
    token_filter: ViT only, "window_n" or "only_cls" for activation statistics.
    activation_dtype: "float32" or "bfloat16": autocast for the forward passes
        and per-chunk cross-moment products of the activation statistics (~2x
        faster on CPUs with BF16 units; activation costs then carry ~1e-3 error
        on average, ~1e-2 at most (tiny 2-layer BERT);
        the running sums stay float64).
    repair: restore every unit's mean and std on `data` to the parents' (and
        the anchor's, by its weight) statistics carried through the same maps
        (REPAIR; see repair.py). Without `data`, the data-free variant: each
        unit's weight-row norm (its std under isotropic inputs) is restored.
    reconstruct: with `data`, refit every linear layer (flow-graph order)
        by ridge least squares to the parents' (and the anchor's, by its
        weight) outputs on the data's tokens, carried through the same maps,
        from the inputs the fused model feeds it (reconstruct.py); after
        repair when both are on. Without `data` it is refused.
    seed: k-means seeding for folding.
    depth_merge: how a deeper parent's group of blocks becomes one block
        (`otcompress.depth`): "select" its most influential block, or
        "parallel": its blocks side by side, the most important heads (KV
        groups) and MLP units of all of them kept at the parent's widths
        (parent directories are then loaded whole, not streamed).
    head_alignment: "cross" (one map over all Q, K, V units: a unit may move
        across heads) or "aware" (heads matched to heads first, then units
        inside matched heads; Q, K and V of an anchor head come from the same
        parent heads).
    on_unconverged: a Sinkhorn map that misses `tol` within `max_iter`:
        "raise" a SolverError, or "warn" and keep it (flagged `converged: false`
        in the report's transport maps).
    on_uniform: a map whose entropy is over 0.9 of its maximum (nearly the
        flat map: every anchor unit gets the mean of all parent units): "warn"
        (listed in the report's `warnings` and through `warnings.warn`) or
        "raise" (reg "auto" then skips that reg).
    cost_norm: "gap" (default: subtract each row's minimum, which leaves the
        plan unchanged, and divide by the median: reg relative to a typical
        unit's distance from its best match; self-fusion of a real pretrained
        BERT stays exact at reg 0.02, where "max" moved its hidden states by
        0.125), "max" (divide by the maximum: 9 points better one-shot on
        independently trained digits ViT pairs at reg 0.02), "mean" or "none".
    progress: optional callback(stage: str, done: int, total: int | None).
    device: where the maps are computed and the fused model is built when the
        anchor has no weights of its own (a fold target): None = where the
        first parent lives, the CPU for a parent streamed from its directory.
        With a real anchor, fusion runs where the anchor lives.

    Returns a `transformers` model; its `fusion_report` attribute holds the
    per-map transport statistics, options and timings. The caller's models
    keep their train/eval mode."""
    options = {k: v for k, v in locals().items() if k not in ("anchor", "parents")}
    model, report = _fuse(anchor, parents, options)
    model.fusion_report = report
    return model


def fuse_to_disk(anchor, parents, out, *, max_shard_size="5GB", force=False, finish=None, **options) -> dict:
    """`fuse`, written to the model directory `out` (safetensors weights, in
    shards of at most `max_shard_size`, and config.json: a
    `from_pretrained` directory) without the fused model ever being in memory
    whole where `fuse` streams (parents given as directories, see `streams`):
    each fused tensor goes to its shard as soon as every parent has added its
    part, about one layer after it is started. Options that need the fused
    model itself (repair, reg "auto") build it in memory first, then write it.

    Written into a temporary directory beside `out`, moved into place only
    when complete: a failure leaves nothing (and an existing `out` as it was;
    it is replaced only with `force`). `finish(directory, report)` may add
    files (model card, report) before the move.

    options: `fuse`'s keyword options. Returns the fusion report."""
    from otcompress import outputs
    bound = inspect.signature(fuse).bind(anchor, parents, **options)  # TypeError on an unknown option
    bound.apply_defaults()
    options = {k: v for k, v in bound.arguments.items() if k not in ("anchor", "parents")}
    modelio.shard_limit(max_shard_size)  # a wrong size fails now, not once the maps are computed
    with outputs.staged_dir(out, force) as stage:
        _, report = _fuse(anchor, parents, options, out=stage, max_shard_size=max_shard_size)
        if finish is not None:
            finish(stage, report)
    return report


def _fuse(anchor, parents, options, *, out=None, max_shard_size=None):
    """`fuse` and `fuse_to_disk`: (fused model, or None when written to the
    directory `out`; the fusion report)."""
    t_start = time.perf_counter()
    # Each value's type and range, before any work; NumPy numbers as Python's.
    o = FuseOptions(**check_api({k: options[k] for k in _OPTIONS}))  # o.reg, o.data, ...: as given
    parents = _as_list(parents)
    o.reg = default_reg(o.reg, o.data, o.solver, o.alignment, len(parents))
    # Statistics, repair and the reg sweep each iterate the data: a generator is read once, here.
    o.data, o.holdout = activations.reiterable(o.data), activations.reiterable(o.holdout)
    modelio.checked_device(o.device)
    given = inputs.check(anchor, parents, o)  # options and configs, before any weights are read
    opts = {"qk": given.qk, "weights": list(given.weights)}
    anchor_m, parent_ms = _load_all(given, device=o.device,
                                    stream=streams(o.alignment, o.solver, o.reg, o.residual, o.repair,
                                                   o.depth_merge, o.data, o.reconstruct))
    o.device = _work_device(o.device, anchor_m, parent_ms)
    # Deeper parents are seen at the anchor's depth (depth.py); the rest of the engine never knows.
    t_depth = time.perf_counter()
    deeper = parent_ms
    with _eval_mode(anchor_m, *deeper):  # dropout off while the depth map scores the given models
        parent_ms, depth_maps = depth.map_parents(anchor_m, parent_ms, data=o.data, merge=o.depth_merge,
                                                  anchor_counts=o.alignment not in FROM_PARENTS)
    if given.target:
        anchor_m = _retyped_target(anchor_m, parent_ms[0], deeper[0], o.device)
    t_depth = time.perf_counter() - t_depth
    # The given (deeper) parents too: reconstruction measures its targets on them.
    with _eval_mode(anchor_m, *parent_ms, *deeper):
        spec = _checked_spec(anchor_m, parent_ms, opts["qk"])
        heads = _head_shapes(anchor_m, parent_ms)
        t_acts = time.perf_counter()
        stats = _statistics(o, spec, anchor_m, parent_ms)
        spec, sds, modules = _repair_inputs(o, spec, anchor_m, parent_ms)
        t_align = time.perf_counter()
        writer = None
        if out is not None:
            writer = modelio.ShardWriter(out, _stored_layout(anchor_m, sds[0], spec.tied), max_shard_size)
        spec, sds, refits = _reconstruct_inputs(o, spec, sds, anchor_m, parent_ms, list(zip(deeper, depth_maps)))
        fuse_at, repaired = _fuser(o, opts["weights"], spec, sds, heads, stats, anchor_m, (modules, refits),
                                   _disk_sink(o, writer))
        model, map_stats, reg, sweep = _fuse_or_sweep(o, fuse_at, parent_ms)
        if writer is not None:
            _finish_writing(writer, model, anchor_m, out)
            model = None
    times = (t_start, t_acts, t_align, time.perf_counter())
    report = _report(anchor, parents, o, opts, reg, stats, sweep, repaired.get(reg), map_stats, times)
    report["depth_maps"] = [m and m.report() for m in depth_maps]
    if o.alignment in FROM_PARENTS:  # what each parent's units were scored by
        report["importance"] = [s.kind if s else "weights" for s in (stats or {}).get("signals", [None] * len(parents))]
    report["timings"]["depth_map"] = t_depth  # part of "load"
    return model, report


def _checked_spec(anchor_m, parent_ms, qk):
    """The anchor's flow graph, once every parent is known to tie its output
    head as the anchor does."""
    spec = architectures.build_spec(anchor_m, qk=qk)
    for k, p in enumerate(parent_ms, 1):
        p_spec = architectures.build_spec(p, qk=qk)  # same class, all parameters known
        if set(p_spec.tied) != set(spec.tied):
            # A tied anchor has no decoder of its own to carry an untied parent's into.
            raise IncompatibleModelsError(
                f"the anchor {'ties' if spec.tied else 'does not tie'} its output head to the input "
                f"embeddings but parent {k} {'does not' if spec.tied else 'does'}: set "
                "tie_word_embeddings the same way in both")
    return spec


def _head_shapes(anchor_m, parent_ms) -> list:
    """Per parent, its and the anchor's head shapes and key/value head counts,
    and whether the family divides scores by sqrt(head width) (its
    `scores_scaled(config)`; yes where it has none)."""
    scaled = getattr(architectures.family(anchor_m.config), "scores_scaled", lambda config: True)
    return [HeadShapes(architectures.head_shape(p.config), architectures.head_shape(anchor_m.config),
                       (architectures.kv_heads(p.config), architectures.kv_heads(anchor_m.config)),
                       scaled=bool(scaled(anchor_m.config)))
            for p in parent_ms]


def _statistics(o, spec, anchor_m, parent_ms):
    """Activation statistics on `data` where the alignment or the residual
    policy reads them; for fold/prune, each parent's importance signals
    measured on `data` (`importance.measure`: None per parent where weight
    magnitude is used); else None."""
    if o.alignment in FROM_PARENTS:
        if o.data is None:
            return None
        signals = [importance.measure(spec, p, o.data, o.alignment, progress=o.progress) for p in parent_ms]
        return {"costs": None, "norms": {}, "signals": signals,
                "samples": max([s.samples for s in signals if s is not None], default=0)}
    if o.alignment != "activations" and o.residual == "average":
        return None
    return activations.collect(spec, anchor_m, parent_ms, o.data,
                               need_costs=o.alignment == "activations",
                               need_norms=o.residual != "average",
                               token_filter=o.token_filter, progress=o.progress,
                               forward_dtype=_dtype(o.activation_dtype))


def _repair_inputs(o, spec, anchor_m, parent_ms):
    """(spec, state dicts, repair points): with repair, the spec carries the
    statistics' axes and the state dicts the statistics themselves (None
    points without repair)."""
    sds = [m.state_dict() for m in (anchor_m, *parent_ms)]
    if not o.repair:
        return spec, sds, None
    data_free = o.data is None
    modules = repair_mod.points(spec)
    spec = dataclasses.replace(spec, axes={**spec.axes, **repair_mod.stat_axes(spec, data_free=data_free)})
    if data_free:  # parents' row norms are derived during alignment (align._InputCarrier.raw)
        sds[0] = {**sds[0], **repair_mod.weight_stats(anchor_m, modules)}
    else:  # a fold target (no weights: its share is 0) gets placeholders of the right shapes
        sds = [{**sd, **(repair_mod.placeholders(m, modules) if _weightless(m)
                         else repair_mod.measure(m, list(modules), o.data))}
               for sd, m in zip(sds, (anchor_m, *parent_ms))]
    return spec, sds, modules


def _reconstruct_inputs(o, spec, sds, anchor_m, parent_ms, deeper):
    """(spec, state dicts, reconstruction points or None): with reconstruct,
    each model's outputs on the data ride along as `__outputs__` targets.
    `deeper`: (the parent as given, its depth map or None) per parent: a
    parent depth-mapped by selection is measured as given, so the refit makes
    up for its dropped blocks (`reconstruct.measure_deeper`)."""
    if not o.reconstruct:
        return spec, sds, None
    points = reconstruct_mod.points(spec)
    spec = dataclasses.replace(spec, axes={**spec.axes, **reconstruct_mod.target_axes(points)})
    models = [m for m in (anchor_m, *parent_ms) if not _weightless(m)]
    tokens = min(reconstruct_mod.token_budget(m, points) for m in models)  # the same for every model

    def measured_on(m, source):
        if source is not None and source[1] is not None and source[1].merge == "select":
            return reconstruct_mod.measure_deeper(source[0], source[1], spec, points, o.data, tokens)
        return None if _weightless(m) else reconstruct_mod.measure(m, points, o.data, tokens)
    measured = [measured_on(m, src) for m, src in zip((anchor_m, *parent_ms), (None, *deeper))]
    some = next(t for t in measured if t is not None)
    sds = [{**sd, **(t if t is not None else reconstruct_mod.placeholders(m, points, some))}
           for sd, t, m in zip(sds, measured, (anchor_m, *parent_ms))]
    return spec, sds, points


def _disk_sink(o, writer):
    """`done(name, tensor)` writing each fused tensor to its shard, or None:
    straight to disk unless the fused model itself is needed (repair, the reg
    sweep's losses)."""
    if writer is None or o.repair or o.reconstruct or o.reg == "auto":
        return None

    def done(name, t):  # a duplicate of a shared tensor is not stored
        if name in writer:
            writer.write(name, t)
    return done


def _fuser(o, mix, spec, sds, heads, stats, anchor_m, points, done):
    """(fuse_at(reg) -> (model, or None when streamed into `done`; map stats),
    {reg: repair and reconstruct reports} filled as fuse_at repairs).
    `points`: (repair points, reconstruction points), None where off."""
    modules, refits = points
    alpha = None
    if o.residual != "average":
        alpha = {tm: n.alpha(o.residual) for tm, n in stats["norms"].items()}
    costs = stats["costs"] if o.alignment == "activations" else [None] * (len(sds) - 1)
    repaired = {}

    def fuse_at(r):
        align_opts = AlignOptions(solver=o.solver, reg=r, cost_norm=o.cost_norm, max_iter=o.max_iter,
                                  tol=o.tol, seed=o.seed, head_alignment=o.head_alignment,
                                  on_unconverged=o.on_unconverged, on_uniform=o.on_uniform,
                                  device=o.device)
        if o.alignment in FROM_PARENTS:
            signals = (stats or {}).get("signals") or [None] * (len(sds) - 1)
            sd, map_stats = _fold_and_fuse(spec, sds, align_opts, mix, heads, o.progress, done, o.alignment,
                                           signals)
        else:
            sd, map_stats = _align_and_average(spec, sds[0], sds[1:], align_opts, costs, alpha,
                                               mix, heads, o.progress, done)
        if sd is None:
            return None, map_stats
        model = build_model(anchor_m, {k: v for k, v in sd.items() if k in sds[0] and "__" not in k})
        if o.repair:
            repaired.setdefault(r, {})["repair"] = _repair(model, sd, o.data, modules)
        if refits is not None:
            repaired.setdefault(r, {})["reconstruct"] = reconstruct_mod.reconstruct(model, sd, o.data, refits)
        return model, map_stats
    return fuse_at, repaired


def _weightless(model) -> bool:
    """A fold target: parameters on the meta device."""
    return any(p.is_meta for p in model.parameters())


def _work_device(device, anchor_m, parent_ms):
    """Where the maps are computed: None (where the anchor lives) for an anchor
    with weights; for a fold target `device`, else the first parent's (the CPU
    for a streamed parent)."""
    if not _weightless(anchor_m):
        return None
    if device is not None:
        return torch.device(device)
    loaded = [p for p in parent_ms if not isinstance(p, modelio.LazyModel)]
    return next(loaded[0].parameters()).device if loaded else torch.device("cpu")


def _repair(model, sd, data, modules):
    """REPAIR on `data`; without data, from the weight-row norms carried in `sd`."""
    if data is None:
        return repair_mod.repair_from_weights(model, sd, modules)
    return repair_mod.repair(model, sd, data, modules)


def _fuse_or_sweep(o, fuse_at, parent_ms):
    """(model, map stats, the reg used, the sweep's table): one fusion at `reg`
    (None for EMD), or reg "auto"'s sweep over the grid."""
    reg = None if o.solver == "emd" else o.reg
    if reg == "auto":
        grid = o.reg_grid if o.reg_grid is not None else REG_GRID
        return reg_sweep(fuse_at, grid, o.holdout if o.holdout is not None else o.data, parent_ms, o.pooling)
    model, map_stats = fuse_at(None if reg is None else float(reg))
    return model, map_stats, reg, None


def _finish_writing(writer, model, anchor_m, out):
    """Close the shards, writing first a model built in memory (repair, reg
    sweep), and add the config."""
    if model is not None:
        model_sd = model.state_dict()
        for name in writer.names:
            writer.write(name, model_sd[name])
    writer.close()
    _write_config(anchor_m, out)


def _report(anchor, parents, o, opts, reg, stats, sweep, repaired, map_stats, times) -> dict:
    """The fusion report; flagged maps are also warned about. `times`: the
    perf_counter marks at the start, before the statistics, before the
    alignment and at the end."""
    flagged = _flagged_maps(map_stats, len(parents))
    for line in flagged:
        warnings.warn(f"otcompress: {line}", stacklevel=3)  # 3: attributed to _fuse's caller
    t_start, t_acts, t_align, t_end = times
    return {
        "warnings": flagged,
        "schema": REPORT_SCHEMA,
        "anchor": (modelio.describe(anchor) if hasattr(anchor, "config") or not hasattr(anchor, "to_dict")
                   else f"target {architectures.describe_widths(anchor)}"),
        "parents": [modelio.describe(p) for p in parents],
        "options": _reported(o, reg=reg, weights=opts["weights"], qk=opts["qk"], repair=bool(o.repair)),
        "calibration_samples": stats["samples"] if stats else 0,
        "reg_sweep": sweep,
        "repair": (repaired or {}).get("repair"),
        "reconstruct": (repaired or {}).get("reconstruct"),
        "transport_maps": map_stats,
        "timings": {"load": t_acts - t_start, "activations": t_align - t_acts,
                    "align": t_end - t_align, "total": t_end - t_start},
        "versions": _versions(),
    }


def _reported(o, **resolved) -> dict:
    """The report's options (`options.REPORTED`): as given in `o`, or as
    resolved (the reg used, normalised weights, the Q/K mode)."""
    return {k: resolved[k] if k in resolved else getattr(o, k) for k in REPORTED}


def _stored_layout(anchor_m, anchor_sd, tied) -> dict:
    """{name: (shape, dtype)} of the tensors a fused model's files hold: as
    `save_pretrained` stores them, one name per tensor the anchor shares
    between parameters (MLM decoder bias: one Parameter under two names) and
    none for a tied parameter (`from_pretrained` ties it again); no repair
    statistics. Sharing is read from the module tree, not from storage
    addresses (every tensor of a fold target is on the meta device, at 0)."""
    owner = {}
    for n, t in [*anchor_m.named_parameters(remove_duplicate=False),
                 *anchor_m.named_buffers(remove_duplicate=False)]:
        owner.setdefault(n, id(t))
    layout, seen = {}, set()
    for name, t in anchor_sd.items():
        shared = owner.get(name, ("storage", t.data_ptr(), tuple(t.shape)) if t.numel() and not t.is_meta else name)
        if name in tied or "__" in name or shared in seen:
            continue
        seen.add(shared)
        layout[name] = (tuple(t.shape), t.dtype)
    return layout


def _write_config(anchor_m, directory):
    """config.json (and generation_config.json for generative models) as
    `save_pretrained` writes them for a model of the anchor's class."""
    config = copy.deepcopy(anchor_m.config)
    config.architectures = [type(anchor_m).__name__]
    config.save_pretrained(directory)
    if getattr(anchor_m, "generation_config", None) is not None and anchor_m.can_generate():
        anchor_m.generation_config.save_pretrained(directory)


def _flagged_maps(map_stats, n_parents: int) -> list:
    """One line per transport map that went nearly uniform or missed its
    tolerance; maps past the parents' own merge the folds (`_fold_and_fuse`)."""
    lines = []
    for k, maps in enumerate(map_stats, 1):
        whose = f"parent {k}" if k <= n_parents else "the merge of the folds:"
        for tm, st in maps.items():
            if st.get("near_uniform"):
                lines.append(f"{whose} map {tm} is nearly uniform (relative entropy "
                             f"{st['relative_entropy']:.2f}): lower reg")
            if st.get("converged") is False:
                lines.append(f"{whose} map {tm} did not converge (marginal error {st['marginal_error']:.1e})")
    return lines


def _align_and_average(spec, anchor_sd, parent_sds, align_opts, costs, alpha, mix, heads, progress, done=None,
                       signals=None):
    """Align the parents and add them, weighted, into a running sum as their
    tensors are produced: no aligned parent is ever held whole. The parents
    are walked in lockstep (one flow-graph node each in turn), so a fused
    tensor is final, and handed to `done(name, tensor)` in the anchor's dtype,
    about one layer after it is started. Returns the fused state dict (None
    when `done` is given: the caller keeps what it needs) and the per-parent
    map stats. `signals`: per parent, fold/prune importance (`importance.measure`)."""
    fused = {} if done is None else None
    total = _RunningSum(anchor_sd, mix, spec.tied, done or fused.__setitem__)
    walks, map_stats = [], []
    for k, parent_sd in enumerate(parent_sds):
        steps, st = align_parent(spec, anchor_sd, parent_sd, align_opts, heads=heads[k],
                                 activation_costs=costs[k], residual_alpha=alpha,
                                 sink=functools.partial(total.add, k),
                                 progress=_parent_progress(progress, k, len(parent_sds)), stepwise=True,
                                 signals=None if signals is None else signals[k])
        walks.append(steps)
        map_stats.append(st)
    for _ in itertools.zip_longest(*walks):
        pass
    total.check_done()
    return (None if fused is None else _finish_sum(fused, anchor_sd, spec.tied)), map_stats


class _RunningSum:
    """anchor x mix[0] + sum_k parent_k x mix[k + 1], per tensor, in float32:
    a tensor's sum is started when its first parent part arrives and handed to
    `done` (in the anchor's dtype) once every parent has added its own. Parts
    are added in parent order, whatever order they arrive in, so the bits are
    those of one whole-model sum per parent. Tied parameters are skipped (they
    are their partner)."""

    def __init__(self, anchor_sd, mix, tied, done):
        self.anchor_sd, self.mix, self.tied, self.done = anchor_sd, mix, tied, done
        self.sums = {}  # name -> [float32 sum, parts added so far, {parent: part arrived early}]
        self.finished = 0

    def add(self, k, name, t):
        if name in self.tied:
            return
        if name not in self.sums:
            a = self.anchor_sd[name]
            if a.is_meta:  # a fold target: shapes and dtypes only, never a part of the sum
                if self.mix[0] != 0:
                    raise RuntimeError(f"{name}: an anchor without weights cannot be mixed in")
                start = torch.zeros(a.shape, dtype=torch.float32, device=t.device)
            else:
                start = a.detach().float() * self.mix[0]
            self.sums[name] = [start, 0, {}]
        entry = self.sums[name]
        entry[2][k] = t
        while entry[1] in entry[2]:
            entry[0].add_(entry[2].pop(entry[1]), alpha=self.mix[entry[1] + 1])
            entry[1] += 1
        if entry[1] == len(self.mix) - 1:
            del self.sums[name]
            self.finished += 1
            self.done(name, entry[0].to(self.anchor_sd[name].dtype))

    def check_done(self):
        expected = sum(1 for name in self.anchor_sd if name not in self.tied)
        if self.sums or self.finished != expected:  # a flow-graph bug, not a user error
            raise RuntimeError(f"fusion finished {self.finished} of {expected} tensors; "
                               f"unfinished: {sorted(self.sums)[:3]}")


def _fold_and_fuse(spec, sds, align_opts, mix, heads, progress, done=None, mode="fold", signals=None):
    """Fold (or prune: `mode`) every parent into the anchor's widths, then
    OT-fuse the folds onto the first one with the parents' weights (the
    anchor's weights are unused). With several parents the folds are held in
    memory (one anchor each); only the last stage streams into `done`.
    `signals`: per parent, its importance measured on data (None: weights)."""
    fold_opts = dataclasses.replace(align_opts, mode=mode)
    signals = signals or [None] * (len(sds) - 1)
    if len(sds) == 2:
        return _align_and_average(spec, sds[0], sds[1:], fold_opts, [None], None, [0.0, 1.0], heads,
                                  progress, done, signals)
    folds, map_stats = [], []
    for k, parent_sd in enumerate(sds[1:]):
        sd, st = _align_and_average(spec, sds[0], [parent_sd], fold_opts, [None], None, [0.0, 1.0],
                                    [heads[k]], _parent_progress(progress, k, len(sds) - 1), signals=[signals[k]])
        folds.append(sd)
        map_stats += st
    w = inputs.parent_weights(mix)
    a = heads[0]
    same = [HeadShapes(a.anchor, a.anchor, (a.kv_heads[1], a.kv_heads[1]))] * (len(folds) - 1)
    sd, st = _align_and_average(spec, folds[0], folds[1:], align_opts, [None] * (len(folds) - 1), None,
                                w, same, _parent_progress(progress, 0, 1, "fold: merge the folds"), done)
    return sd, map_stats + st


@contextmanager
def _eval_mode(*models):
    """Dropout off while fusing; the caller's models get their mode back."""
    modes = [m.training for m in models]
    for m in models:
        m.eval()
    try:
        yield
    finally:
        for m, was in zip(models, modes):
            m.train(was)


def _finish_sum(fused, anchor_sd, tied) -> dict:
    """The fused state dict in the anchor's order, tied parameters restored."""
    for name, src in tied.items():
        fused[name] = fused[src]
    return {name: fused[name] for name in anchor_sd}


def reg_sweep(fuse_at, grid, holdout, parent_ms, pooling=None):
    """reg "auto": fuse at every reg of `grid` and keep the model with the
    lowest `holdout_loss` on the batches of `holdout`: the task loss where
    every batch carries labels, else the loss against the parents'
    (`parent_targets`, headless models' embeddings pooled by `pooling`).
    `fuse_at(reg)` -> (model, map statistics); a reg whose fusion raises
    SolverError is skipped (and listed). Returns (model, map statistics,
    reg, the sweep's table: one {"reg", "loss"} or {"reg", "loss": None,
    "error"} per reg)."""
    batches = list(activations.iter_batches(holdout))
    if not batches:
        raise DataError("reg auto: the held-out data has no batches")
    targets = None
    if not all("labels" in b for b in batches):
        pooling = pooling or embedding.pooling_mode(parent_ms[0].config)
        targets = [parent_targets(parent_ms, b, pooling) for b in batches]
    best, sweep = None, []
    for r in grid:
        try:
            model, map_stats = fuse_at(float(r))
        except SolverError as e:
            sweep.append({"reg": float(r), "loss": None, "error": str(e)})
            continue
        loss = holdout_loss(model, batches, targets)
        sweep.append({"reg": float(r), "loss": loss})
        if math.isfinite(loss) and (best is None or loss < best[0]):
            best = (loss, float(r), model, map_stats)
    if best is None:
        raise SolverError(f"reg auto: no regulariser in {list(grid)} gave a usable model")
    return best[2], best[3], best[1], sweep


def _inputs(model, batch):
    """The batch's model inputs on the model's device."""
    device = next(model.parameters()).device
    return {k: v.to(device) for k, v in batch.items() if k != "labels"}


@torch.inference_mode()
def parent_targets(parent_ms, batch, pooling="mean"):
    """What `holdout_loss` scores a fused model's outputs on `batch` against:
    the parents' mean prediction; headless parents: their pooled embeddings."""
    from otcompress.architectures import is_headless
    if is_headless(parent_ms[0]):
        return _Embeddings([embedding.embed(p, _inputs(p, batch), pooling) for p in parent_ms], pooling)
    probs = [torch.softmax(_logits(p(**_inputs(p, batch))), -1) for p in parent_ms]
    return sum(probs) / len(probs)


class _Embeddings(list):
    """Headless parents' embeddings of one batch (pooled by `pooling`): the reg sweep's target."""

    def __init__(self, embeddings, pooling):
        super().__init__(embeddings)
        self.pooling = pooling


def _logits(out):
    logits = getattr(out, "logits", None)
    if logits is None:
        raise InvalidOptionError("reg auto needs labelled held-out data or a model with a prediction head")
    return logits


@torch.inference_mode()
def holdout_loss(model, batches, targets=None) -> float:
    """The loss reg "auto" chooses by, over held-out `batches`: with `targets`
    None the mean task loss (every batch carries labels), else per batch its
    `parent_targets`: the KL divergence to the parents' mean prediction over
    the real (non-padding) positions, or for headless models the similarity
    distillation loss of the embeddings (otcompress.embedding)."""
    total, n = 0.0, 0
    for i, b in enumerate(batches):
        inputs = _inputs(model, b)
        if targets is not None and isinstance(targets[i], _Embeddings):
            loss = embedding.similarity_loss(embedding.embed(model, inputs, targets[i].pooling), targets[i])
        elif targets is None:
            loss = model(**inputs, labels=b["labels"].to(inputs[next(iter(inputs))].device)).loss
        else:
            logp = torch.log_softmax(_logits(model(**inputs)), -1)
            target = targets[i].to(logp.device)
            mask = inputs.get("attention_mask")
            if mask is not None and logp.dim() == 3:
                logp, target = logp[mask.bool()], target[mask.bool()]
            loss = torch.nn.functional.kl_div(logp.flatten(0, -2), target.flatten(0, -2),
                                              reduction="batchmean")
        total += float(loss)
        n += 1
    if n == 0:  # a loss of 0 would win every comparison
        raise DataError("held-out loss: no batches")
    return total / n


def vanilla_fuse(anchor, parents, *, weights=None, trust_remote_code=False):
    """The baseline: plain parameter averaging, equal shapes only."""
    parents = _as_list(parents)
    given = inputs.check(anchor, parents, FuseOptions(weights=weights, reg=DEFAULT_REG,
                                                      trust_remote_code=trust_remote_code))
    anchor_m, parent_ms = _load_all(given)
    spec = architectures.build_spec(anchor_m)
    for k, p in enumerate(parent_ms, 1):
        if depth.depth(p.config) != depth.depth(anchor_m.config):
            raise IncompatibleModelsError(
                f"vanilla fusion needs equal depths: the anchor has {depth.depth(anchor_m.config)} blocks, "
                f"parent {k} {depth.depth(p.config)}; use OT fusion or folding for deeper parents")
    sds = [anchor_m.state_dict()] + [p.state_dict() for p in parent_ms]
    for k, sd in enumerate(sds[1:], 1):
        for name, t in sds[0].items():
            if sd[name].shape != t.shape:
                raise IncompatibleModelsError(
                    f"vanilla fusion needs equal shapes: {name} is {tuple(t.shape)} in the anchor "
                    f"and {tuple(sd[name].shape)} in parent {k}; use OT fusion for different widths")
    fused = {}
    total = _RunningSum(sds[0], list(given.weights), spec.tied, fused.__setitem__)
    for k, sd in enumerate(sds[1:]):
        for name in sds[0]:
            total.add(k, name, sd[name].float())
    return build_model(anchor_m, _finish_sum(fused, sds[0], spec.tied))


def build_model(anchor, state_dict):
    """A model of the anchor's class, config and constructor arguments (a
    pooler-less ViTModel stays pooler-less) holding `state_dict`, on the
    anchor's device."""
    # Copy the module structure, not the anchor's weights (placeholders on the
    # meta device), then adopt the fused tensors themselves: no third copy of
    # the model exists while the result is built.
    memo = {id(p): torch.nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
            for p in anchor.parameters()}
    model = copy.deepcopy(anchor, memo)
    model.__dict__.pop("fusion_report", None)
    for module in model.modules():  # the copy must not inherit the caller's patches or hooks
        module.__dict__.pop("forward", None)
        module._forward_hooks.clear()
        module._forward_pre_hooks.clear()
    model.load_state_dict(state_dict, strict=True, assign=True)
    if hasattr(model, "tie_weights"):
        model.tie_weights()  # assign makes one parameter per name: share the tied ones again
    return model.eval()


def _as_list(parents):
    if parents is None:
        return []
    if isinstance(parents, (list, tuple)):
        return list(parents)
    return [parents]


def streams(alignment, solver, reg, residual, repair, depth_merge="select", data=None, reconstruct=False) -> bool:
    """Whether parents given as directories can be streamed: the engine then
    needs only their tensors one at a time (weights or fold alignment,
    averaged residuals, no repair, no reg sweep, deeper parents merged by
    selection, no importance measured on `data`), never a forward pass."""
    measured = alignment in FROM_PARENTS and importance.kind(data, alignment) != "weights"
    return (alignment in ("weights", *FROM_PARENTS) and residual == "average" and not repair and not reconstruct
            and not (solver == "sinkhorn" and reg == "auto") and depth_merge == "select" and not measured)


def _load_all(given, *, stream=False, device=None):
    """The models of checked inputs (`inputs.check`: configs, classes and
    depths agree), from objects or directories, the configs already read; an
    anchor given as a config (a target width for folding) becomes a
    weightless model of the parents' class (`_fold_target`).
    With `stream`, a parent directory of safetensors weights becomes a
    weightless `modelio.LazyModel`: its tensors are read one at a time as the
    flow graph needs them, so the parent is never in memory whole (falls back
    to loading where `modelio.lazy_model` says the directory needs it)."""
    trc = given.trust_remote_code
    parent_ms = [(stream and modelio.lazy_model(p, trust_remote_code=trc, config=cfg))
                 or modelio.load_model(p, trust_remote_code=trc, config=cfg)
                 for p, cfg in zip(given.parents, given.parent_configs)]
    for p, m in zip(given.parents, parent_ms):  # a loaded model was checked as it loaded
        if isinstance(m, modelio.LazyModel):
            modelio.check_streamed(p, m)
    if given.target:
        anchor_m = _fold_target(given.anchor_config, parent_ms[0], device)
    else:
        anchor_m = modelio.load_model(given.anchor, trust_remote_code=trc, config=given.anchor_config)
    return anchor_m, parent_ms


def _retyped_target(target, mapped, parent, device):
    """The fold target with the per-block settings (a family's BLOCK_KEYS:
    Qwen2's attention types) of the blocks the first parent's depth map kept
    (`depth.shallower_config`), which `target_config` could not know: a block
    keeps the type it was trained with. Rebuilt (weightless) where they differ."""
    keys = getattr(architectures.family_or_none(mapped.config), "BLOCK_KEYS", ())
    kept = {k: getattr(mapped.config, k) for k in keys}
    if all(getattr(target.config, k, None) == v for k, v in kept.items()):
        return target
    cfg = type(target.config).from_dict({**target.config.to_dict(), **kept})
    return _fold_target(cfg, parent, device)


def _fold_target(config, parent, device=None):
    """The fold target: a model of the parent's class at `config`'s widths whose
    parameters are on the meta device in the parent's dtypes (nothing is
    allocated or initialised: the fold writes every one; the fused model is
    written in those dtypes), its buffers real on `device` (None: where the
    parent lives, the CPU for a streamed parent). Optional parts the parent was built without
    (a BertModel's pooler with add_pooling_layer=False) are left out too."""
    from accelerate import init_empty_weights
    lazy = isinstance(parent, modelio.LazyModel)
    with init_empty_weights(include_buffers=False):
        model = (parent.model_class if lazy else type(parent))(copy.deepcopy(config))
    if not lazy:
        _drop_absent_parts(model, parent)
    psd = parent.state_dict()
    fallback = next((psd.dtype(n) if lazy else psd[n].dtype for n in psd), torch.float32)
    if device is None:
        device = torch.device("cpu") if lazy else next(parent.parameters()).device
    replaced = {}  # one meta parameter per shared (tied) parameter
    for prefix, module in model.named_modules():
        for pname, p in list(module._parameters.items()):
            if p is None:
                continue
            name = f"{prefix}.{pname}" if prefix else pname
            if id(p) not in replaced:
                dtype = (psd.dtype(name) if lazy else psd[name].dtype) if name in psd else fallback
                replaced[id(p)] = torch.nn.Parameter(torch.empty(p.shape, dtype=dtype, device="meta"),
                                                     requires_grad=p.requires_grad)
            module._parameters[pname] = replaced[id(p)]
        for bname, b in list(module._buffers.items()):
            if b is not None:
                module._buffers[bname] = b.to(device)
    return model


def _drop_absent_parts(model, parent):
    """Set to None every submodule the parent has as None (a pooler-less BertModel)."""
    for path, _ in list(model.named_modules()):
        owner, _, attr = path.rpartition(".")
        try:
            parent_owner, owner_m = parent.get_submodule(owner), model.get_submodule(owner)
        except AttributeError:  # absent in the parent, or inside a part already dropped
            continue
        if attr and getattr(parent_owner, attr, owner_m) is None:  # HF keeps `self.pooler = None` as a plain attribute
            setattr(owner_m, attr, None)


def _dtype(name):
    """An activation dtype's torch dtype (checked at the entry: `inputs.check_options`)."""
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[name]


def _parent_progress(progress, k, n, stage=None):
    """`progress` with its stage naming parent k of n ("fold: parent 2/3");
    one parent needs no name. A progress already labelled keeps its label:
    a fold aligns each parent alone, inside its own labelling. With `stage`,
    every parent reports under that one stage (the merge of the folds walks
    them in lockstep, so one bar shows them all)."""
    if progress is None or getattr(progress, "labelled", False) or (n == 1 and stage is None):
        return progress

    def labelled(s, done, total):
        progress(stage or f"{s}: parent {k + 1}/{n}", done, total)
    labelled.labelled = True
    return labelled


def _versions():
    import numpy
    import transformers
    return {"python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "numpy": numpy.__version__}
