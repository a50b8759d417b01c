"""Shared helpers for the real-data fusion benchmarks (vision_digits.py,
text_mlm.py): thread setup, evaluation (single models and ensembles),
finetuning / distillation arms, the library's regulariser sweep (reg "auto",
chosen on held-out *train* batches) with every point scored, statistics over seeds,
cost profiling, the regulariser-sweep plot and the result files.

Everything torch-related is imported lazily, so `prepare_environment` can set
the OpenMP wait policy before torch is loaded.
"""
from __future__ import annotations

import copy
import json
import math
import os
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

from machine import cpu_name

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results"

# Sinkhorn regularisers of the sweep: `REG_GRID` is the library's (fusion.REG_GRID,
# what reg="auto" tries; read when asked, after `prepare_environment`); hard EMD
# is a separate point.
REG_GRID_QUICK = (0.01, 0.05, 0.2)


def __getattr__(name):
    if name == "REG_GRID":  # imports torch: not at this module's import
        from otcompress.fusion import REG_GRID
        return REG_GRID
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# --------------------------------------------------------------------------- environment


def prepare_environment() -> None:
    """Call before importing torch. GNU OpenMP's default busy-waiting made
    2-thread torch 1.6-3x slower than 1 thread on this shared 2-core machine;
    PASSIVE workers sleep instead (kept if the caller set something else)."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    warnings.filterwarnings("ignore")


def set_threads(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


def quiet_libraries() -> None:
    import logging

    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)


def environment(threads: int) -> dict:
    import torch
    import transformers

    return {"threads": threads, "torch_threads": torch.get_num_threads(),
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
            "cores": os.cpu_count(), "cpu": cpu_name(), "loadavg_start": os.getloadavg(),
            "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__,
            "date": time.strftime("%Y-%m-%d %H:%M:%S"), "argv": sys.argv[1:]}


class Clock:
    """Named wall-time phases, printed as they finish."""

    def __init__(self):
        self.t0 = time.perf_counter()
        self.phases: dict[str, float] = {}

    def phase(self, name: str, since: float) -> None:
        self.phases[name] = self.phases.get(name, 0.0) + time.perf_counter() - since

    def total(self) -> float:
        return time.perf_counter() - self.t0


def log(msg: str) -> None:
    print(msg, flush=True)


# --------------------------------------------------------------------------- evaluation


def evaluate_ensemble(models, data) -> dict:
    """The ensemble of `models` (mean of their softmax outputs): the upper
    bound that costs K forward passes (`otcompress.finetune.evaluate_ensemble`).
    Same metrics as `evaluate_model`."""
    from otcompress.finetune import evaluate_ensemble as ensemble

    for m in models:
        m.eval()  # left in eval mode, as before
    out = ensemble(models, data)
    return {k: float(out[k]) for k in ("accuracy", "loss", "perplexity") if k in out}


def evaluate_model(model, data) -> dict:
    from otcompress.finetune import evaluate

    out = evaluate(model, data)
    return {k: float(v) for k, v in out.items() if k in ("accuracy", "loss", "perplexity")}


# --------------------------------------------------------------------------- training arms


def finetuned(model, data, *, steps, lr, batch_size, seed, teachers=None, distill_alpha=0.5,
              temperature=2.0):
    """A finetuned *copy* of `model` and the seconds it took. With `teachers`,
    Hinton distillation from their averaged softened predictions."""
    from otcompress.finetune import finetune

    m = copy.deepcopy(model)
    rep = finetune(m, data, steps=steps, lr=lr, batch_size=batch_size, seed=seed,
                   teachers=teachers, distill_alpha=distill_alpha, temperature=temperature)
    return m, rep["seconds"]


def lr_tuned(make, train, holdout, lrs, score, *, reference=None, **finetune_kw):
    """(score(model), lr) of `make()` finetuned on `train` at the lr of `lrs`
    whose model has the lowest loss on `holdout` (held-out *training*
    examples, never the eval split: as the race chooses). `reference`: the
    models a headless model's loss is measured against. Only the best so far
    is scored."""
    from otcompress.finetune import finetune

    def trained_at(lr):
        m = make()
        finetune(m, train, lr=lr, **finetune_kw)
        return m, None
    return _best_lr(lrs, trained_at, holdout, score, reference)[:2]


def _best_lr(lrs, trained_at, holdout, score, reference=None, spent=lambda extra: 0):
    """(score(model), lr, extra) for the lr whose `trained_at(lr)` = (model,
    extra) has the lowest loss on `holdout`; only the best so far is scored.
    Losses equal to TIE_DIGITS significant digits are a tie, won by the run
    whose `spent(extra)` steps are fewest: a run that climbed and restarted at
    lr / 10 trains the model the lower lr trains (all-MiniLM-L6-v2 -> 3 x 192:
    lr 1e-3 restarted at 1e-4, held-out loss equal to the 1e-4 run's but for
    float noise) and spent 30 steps more, which its controls would then be given.
    A NaN/Inf loss (a diverged run) is never the best.
    An lr at an edge of the grid is not tuned (every arm of the pydoc BERT and
    LLaMA depth benchmarks chose the top of (1e-3, 3e-3), all-MiniLM's the
    bottom of (1e-4, 1e-3)): the grid is extended by its own ratio past the
    edge the best lr sits on, up to EDGE_STEPS more lrs, until it is interior."""
    from otcompress.finetune import evaluate

    best, tried = None, []

    def trial(lr):
        nonlocal best
        tried.append(lr)
        m, extra = trained_at(lr)
        loss = evaluate(m, holdout, reference=reference)["loss"]
        key = (float(f"{loss:.{TIE_DIGITS}g}") if math.isfinite(loss) else math.inf, spent(extra))
        if best is None or key < best[0]:
            best = (key, score(m), lr, extra)

    for lr in lrs:
        trial(lr)
    for _ in range(EDGE_STEPS if len(lrs) > 1 else 0):
        nxt = edge_extension(tried, best[2])
        if nxt is None:
            break
        trial(nxt)
    return best[1:]


EDGE_STEPS = 2
LR_GRID_NOTE = f"(extended by its own ratio past the edge the best lr sat on, up to {EDGE_STEPS} more lrs)"


def edge_extension(tried, best_lr):
    """The next lr to try when `best_lr` is the largest or smallest of
    `tried` (one grid ratio beyond it), else None: the best is interior.
    A run whose best is its largest lr never diverged there, so going up is
    safe to try; a diverged larger lr is never `best_lr`."""
    grid = sorted(tried)
    lo, hi = grid[0], grid[-1]
    ratio = min(b / a for a, b in zip(grid, grid[1:]))
    if ratio <= 1:
        return None
    if best_lr == hi:
        return float(f"{hi * ratio:.3g}")
    if best_lr == lo:
        return float(f"{lo / ratio:.3g}")
    return None


TIE_DIGITS = 6


def recipe_lr_tuned(anchor, parents, recipe, train, holdout, lrs, score, *, reference=None, target=None):
    """(score(model), lr, fusion report) of the default recipe (`pipeline.run`
    on `train`, its own race included) at the lr of `lrs` whose model has the
    lowest loss on `holdout`: the recipe's lr tuned exactly as `lr_tuned`
    tunes a control's, so no arm gets a tuning the other lacks. `target`: a
    fold target's widths, as `pipeline.run` takes them (with no anchor)."""
    from otcompress import pipeline

    return _best_lr(lrs, lambda lr: pipeline.run(anchor, parents, {**recipe, "lr": lr}, data=train, target=target),
                    holdout, score, reference, spent=pipeline.steps_spent)


# --------------------------------------------------------------------------- fusion


def fuse_timed(anchor, parents, **kw):
    import otcompress

    t = time.perf_counter()
    model = otcompress.fuse(anchor, parents, **kw)
    return model, time.perf_counter() - t


def fuse_sweep(anchor, parents, data, *, grid, holdout, calib, alignment="weights",
               weights=None, token_filter=None, residual="average", emd=True, metrics=True):
    """reg "auto" by the library's own sweep (`fusion.reg_sweep`: fuse at every
    Sinkhorn `reg` of `grid`, keep the lowest held-out loss on the labelled
    `holdout` batches, from the train split, never used for evaluation), each
    point also timed and, with `metrics`, scored on the eval split (for the
    figure only); then EMD. Returns {"points": [...], "emd": {...}, "best": the
    model reg "auto" picks, "best_reg", "seconds"}."""
    from otcompress.fusion import holdout_loss, reg_sweep

    kw = {"alignment": alignment, "weights": weights, "token_filter": token_filter,
          "residual": residual}
    if alignment == "activations" or residual != "average":
        kw["data"] = calib
    timed = {}

    def fuse_at(r):
        model, s = fuse_timed(anchor, parents, reg=r, **kw)
        timed[r] = {"fuse_s": s, **(evaluate_model(model, data) if metrics else {})}
        return model, model.fusion_report["transport_maps"]

    best, _, best_reg, sweep = reg_sweep(fuse_at, grid, holdout, parents)
    points = []
    for row in sweep:
        if "error" in row:  # a reg that fails is skipped, and said
            points.append({"reg": row["reg"], "error": row["error"]})
            log(f"    reg {row['reg']:g}: {row['error']}")
        else:
            points.append({"reg": row["reg"], "holdout_loss": row["loss"], **timed[row["reg"]]})
    out = {"points": points, "best": best, "best_reg": best_reg,
           "seconds": sum(t["fuse_s"] for t in timed.values()), "emd": None, "emd_model": None}
    if emd:
        model, s = fuse_timed(anchor, parents, solver="emd", **kw)
        out["emd"] = {"holdout_loss": holdout_loss(model, holdout), "fuse_s": s,
                      **(evaluate_model(model, data) if metrics else {})}
        out["emd_model"] = model
    return out


def repaired(anchor, parents, calib, reg, weights):
    """The engine's statistics repair (`fuse(repair=True)`) at the sweep's
    chosen reg: every unit's mean and std restored to those of the anchor and
    the parents, carried through the maps and mixed by the fusion weights."""
    import otcompress

    return otcompress.fuse(anchor, parents, reg=reg, weights=weights, repair=True,
                           data=[{k: v for k, v in b.items() if k != "labels"} for b in calib])


# --------------------------------------------------------------------------- statistics


def summarize(values) -> dict | None:
    vals = [float(v) for v in values if v is not None]
    if not vals:
        return None
    return {"mean": statistics.fmean(vals), "std": statistics.stdev(vals) if len(vals) > 1 else 0.0,
            "min": min(vals), "max": max(vals), "n": len(vals), "values": vals}


def fmt(stat: dict | None, scale: float = 1.0, digits: int = 2, spread: bool = True) -> str:
    if stat is None:
        return "—"
    m = stat["mean"] * scale
    if stat["n"] == 1 or not spread:
        return f"{m:.{digits}f}"
    return (f"{m:.{digits}f} ± {stat['std'] * scale:.{digits}f} "
            f"[{stat['min'] * scale:.{digits}f}–{stat['max'] * scale:.{digits}f}]")


def md_table(headers, rows) -> list[str]:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return lines


def compare(a_vals, b_vals, higher_better: bool) -> dict:
    """Is arm a better than arm b by more than the spread across seeds?
    Paired per seed (same seed = same anchor, parents and batch order)."""
    sign = 1.0 if higher_better else -1.0
    diffs = [sign * (a - b) for a, b in zip(a_vals, b_vals)]
    sa, sb, sd = summarize(a_vals), summarize(b_vals), summarize(diffs)
    spread = max(sa["std"], sb["std"])
    return {"improvement": sd, "spread": spread,
            "beats_by_more_than_spread": sd["mean"] > spread,
            "wins_every_seed": all(d > 0 for d in diffs)}


# --------------------------------------------------------------------------- cost


def profile_widths(models: dict, *, threads: int = 1, repeats: int = 30, onnx: bool = True,
                   seq_len: int = 128) -> dict:
    """Parameters, FLOPs (fvcore) and CPU latency (PyTorch, ONNX Runtime) at
    batch 1 for each labelled (model, folder)."""
    from otcompress.profiling import profile_model

    out = {}
    for label, (model, path) in models.items():
        t = time.perf_counter()
        try:
            rep = profile_model(model, model_dir=path, threads=threads, repeats=repeats,
                                onnx=onnx, seq_len=seq_len)
        except Exception as e:  # noqa: BLE001 - a profiling failure must not lose the results
            out[label] = {"error": f"{type(e).__name__}: {e}"}
            continue
        out[label] = {
            "parameters": rep["parameters"],
            "flops": rep["flops"].get("flops"),
            "latency_pytorch_ms": rep["latency_pytorch"]["median_ms"],
            "latency_onnx_ms": (rep["latency_onnx"] or {}).get("median_ms"),
            "inputs": rep["inputs"], "threads": threads, "repeats": repeats,
            "seconds": time.perf_counter() - t,
        }
    return out


def cost_table(costs: dict) -> list[str]:
    rows = []
    for label, c in costs.items():
        if "error" in c:
            rows.append([label, "error", c["error"], "", ""])
            continue
        onnx = f"{c['latency_onnx_ms']:.3f}" if c.get("latency_onnx_ms") is not None else "—"
        rows.append([label, f"{c['parameters']:,}", f"{c['flops'] / 1e6:.2f}",
                     f"{c['latency_pytorch_ms']:.3f}", onnx])
    return md_table(["model", "parameters", "MFLOPs / example", "PyTorch ms (median)",
                     "ONNX Runtime ms (median)"], rows)


# --------------------------------------------------------------------------- plot


def plot_reg_sweep(path: Path, panels: list[dict], *, ylabel: str, higher_better: bool,
                   suptitle: str) -> None:
    """One panel per dict {"title", "curves", "refs"}. A curve is a line
    (mean over seeds, shaded min-max) against reg on a log axis, with hard
    EMD drawn as a separate point at the left, off the reg axis; refs are
    dotted horizontal reference lines (parents, anchor, vanilla fusion)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(6.2 * len(panels), 4.8), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, panel in zip(axes[0], panels):
        regs = sorted({r for c in panel["curves"] for r in c["regs"]})
        x_emd = regs[0] / 4
        for i, c in enumerate(panel["curves"]):
            col = colors[i % len(colors)]
            ax.plot(c["regs"], c["mean"], "o-", color=col, label=c["label"], lw=1.6, ms=4)
            ax.fill_between(c["regs"], c["min"], c["max"], color=col, alpha=0.15, lw=0)
            if c.get("emd") is not None:
                e = c["emd"]
                ax.errorbar([x_emd * (1 + 0.15 * i)], [e["mean"]],
                            yerr=[[e["mean"] - e["min"]], [e["max"] - e["mean"]]],
                            fmt="s", color=col, ms=6, capsize=3)
            for reg in [r for r in c.get("chosen", []) if r in c["regs"]]:
                i_reg = c["regs"].index(reg)
                ax.plot([reg], [c["mean"][i_reg]], "*", color=col, ms=12, mec="k", mew=0.6)
        styles = [":", "--", "-."]
        for j, (label, value) in enumerate(panel.get("refs", [])):
            ax.axhline(value, color="0.35", ls=styles[j % len(styles)], lw=1)
            ax.annotate(label, (regs[-1], value), textcoords="offset points", xytext=(-4, 3),
                        ha="right", fontsize=8, color="0.3")
        ax.axvline(regs[0] / 2, color="0.8", lw=0.8)
        ax.set_xscale("log")
        ax.minorticks_off()
        ax.set_xticks([x_emd] + regs)
        ax.set_xticklabels(["EMD"] + [f"{r:g}" for r in regs], fontsize=8)
        ax.set_xlabel("Sinkhorn reg (max-normalised costs); EMD = exact OT")
        ax.set_ylabel(ylabel)
        ax.set_title(panel.get("short", panel["title"]), fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="best")
    fig.suptitle(suptitle, fontsize=11)
    fig.text(0.01, 0.01, ("higher is better" if higher_better else "lower is better")
             + "; line = mean over seeds, band = min-max over seeds; "
               "stars = reg chosen on held-out train batches (per seed)",
             fontsize=7, color="0.4")
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def curve_from_sweeps(label: str, sweeps: list[dict], key: str, scale: float = 1.0) -> dict:
    """Aggregate per-seed sweeps (same grid) into one plotted curve."""
    all_regs = [p["reg"] for p in sweeps[0]["points"]]
    cols = [[s["points"][i][key] * scale for s in sweeps if key in s["points"][i]]
            for i in range(len(all_regs))]
    # A reg at which Sinkhorn failed for some seed is left out of the line
    # (the JSON keeps the error); means over a subset of seeds would mislead.
    keep = [i for i, c in enumerate(cols) if len(c) == len(sweeps)]
    regs, cols = [all_regs[i] for i in keep], [cols[i] for i in keep]
    curve = {"label": label, "regs": regs, "mean": [statistics.fmean(c) for c in cols],
             "min": [min(c) for c in cols], "max": [max(c) for c in cols], "emd": None,
             "failed_regs": [r for i, r in enumerate(all_regs) if i not in keep]}
    if all(s.get("emd") for s in sweeps):
        e = [s["emd"][key] * scale for s in sweeps]
        curve["emd"] = {"mean": statistics.fmean(e), "min": min(e), "max": max(e)}
    curve["chosen"] = sorted({s["best_reg"] for s in sweeps})
    return curve


# --------------------------------------------------------------------------- output


def strip_models(obj):
    """JSON-able copy: drop model objects kept in sweep dicts."""
    if isinstance(obj, dict):
        return {k: strip_models(v) for k, v in obj.items() if k not in ("best", "emd_model")}
    if isinstance(obj, (list, tuple)):
        return [strip_models(v) for v in obj]
    return obj


def write_results(stem: str, markdown: str, payload: dict) -> tuple[Path, Path]:
    RESULTS.mkdir(parents=True, exist_ok=True)
    md, js = RESULTS / f"{stem}.md", RESULTS / f"{stem}.json"
    md.write_text(markdown)
    js.write_text(json.dumps(strip_models(payload), indent=1, default=_json_default) + "\n")
    return md, js


def _json_default(o):
    if isinstance(o, Path):
        return str(o)
    try:
        return float(o)
    except (TypeError, ValueError):
        return repr(o)


# --------------------------------------------------------------------------- the two tables


class Setup:
    """What a benchmark plugs into the shared tables.

    make(hidden, seed) -> (model, folder) from the zoo (trained once, cached);
    describe(hidden) -> a short architecture label;
    metrics: [(key, scale, digits, label, higher_better)], the first is primary.
    """

    def __init__(self, *, name, title, data, make, describe, metrics, steps, lr, batch_size,
                 grid, calib_samples, holdout_examples, homo_hidden, homo_groups,
                 token_filters, anchor_hidden, parent_hiddens, hetero_seeds, anchor_weight,
                 kd_alpha=0.5, kd_temperature=2.0):
        self.__dict__.update(locals())
        del self.__dict__["self"]
        self._models = {}

    def get(self, hidden, seed):
        key = (hidden, seed)
        if key not in self._models:
            self._models[key] = self.make(hidden, seed)
        return self._models[key]

    @property
    def primary(self):
        return self.metrics[0]

    def calib_holdout(self, seed):
        """Calibration inputs for activation statistics and labelled held-out
        batches for choosing reg: both from the *train* split, never eval."""
        calib = list(self.data.calibration_batches(self.calib_samples, 64, seed=1000 + seed))
        holdout = list(self.data.batches("train", 128, shuffle=True, seed=2000 + seed,
                                         limit=self.holdout_examples))
        return calib, holdout

    def finetune(self, model, seed, teachers=None):
        return finetuned(model, self.data, steps=self.steps, lr=self.lr,
                         batch_size=self.batch_size, seed=seed, teachers=teachers,
                         distill_alpha=self.kd_alpha, temperature=self.kd_temperature)


def _entry(setup, model, *, seed, finetune=True, teachers=None, **extra):
    entry = {"one_shot": evaluate_model(model, setup.data), **extra}
    if finetune:
        ft, s = setup.finetune(model, seed, teachers)
        entry["finetuned"] = evaluate_model(ft, setup.data)
        entry["finetune_s"] = s
    return entry


def _sweep_info(sw):
    return {"reg": sw["best_reg"],
            "fuse_s": statistics.fmean(p["fuse_s"] for p in sw["points"] if "fuse_s" in p)}


def run_homogeneous(setup: Setup, clock: Clock) -> dict:
    """Parents of one width, K of them; the first parent is the anchor;
    uniform mixing weights (the paper's setting)."""
    out = {}
    for K, groups in setup.homo_groups.items():
        arms, sweeps = {}, {"weights": [], "activations": []}

        def add(arm, entry, arms=arms):
            arms.setdefault(arm, []).append(entry)

        for g, seeds in enumerate(groups):
            t = time.perf_counter()
            models = [setup.get(setup.homo_hidden, s)[0] for s in seeds]
            anchor, rest = models[0], models[1:]
            calib, hold = setup.calib_holdout(g)
            per_parent = [evaluate_model(m, setup.data) for m in models]
            add("parents (mean of the K)", {"one_shot": {
                k: statistics.fmean(p[k] for p in per_parent) for k in per_parent[0]},
                "each": per_parent})
            add("ensemble (mean softmax, K passes)",
                {"one_shot": evaluate_ensemble(models, setup.data)})
            add("parent 1 alone (the anchor) + N", _entry(setup, anchor, seed=g))
            import otcompress

            t_v = time.perf_counter()
            vf = otcompress.vanilla_fuse(anchor, rest)
            add("vanilla fusion (plain average)",
                _entry(setup, vf, seed=g, fuse_s=time.perf_counter() - t_v))
            for alignment, label in (("weights", "OT weights"), ("activations", "OT activations")):
                sw = fuse_sweep(anchor, rest, setup.data, grid=setup.grid, holdout=hold,
                                calib=calib, alignment=alignment)
                sweeps[alignment].append(sw)
                tag = ", all tokens" if alignment == "activations" and setup.token_filters else ""
                add(f"{label}, Sinkhorn (reg on holdout){tag}",
                    _entry(setup, sw["best"], seed=g, **_sweep_info(sw)))
                add(f"{label}, EMD (hard)",
                    _entry(setup, sw["emd_model"], seed=g, fuse_s=sw["emd"]["fuse_s"]))
            for filt in setup.token_filters:
                sw = fuse_sweep(anchor, rest, setup.data, grid=setup.grid, holdout=hold,
                                calib=calib, alignment="activations", token_filter=filt,
                                emd=False, metrics=False)
                add(f"OT activations, Sinkhorn (reg on holdout), {filt}",
                    _entry(setup, sw["best"], seed=g, **_sweep_info(sw)))
            clock.phase(f"homogeneous K={K}", t)
            log(f"  homogeneous K={K} group {g} {seeds}: {time.perf_counter() - t:.0f} s; " +
                ", ".join(f"{a}: {_short(arms[a][-1], setup)}" for a in arms))
        out[K] = {"groups": [list(s) for s in groups], "arms": arms,
                  "sweeps": {k: [strip_models(s) for s in v] for k, v in sweeps.items()}}
    return out


def _short(entry, setup):
    key, scale, digits, _, _ = setup.primary
    one = entry["one_shot"][key] * scale
    ft = entry.get("finetuned", {}).get(key)
    return f"{one:.{digits}f}" + (f"->{ft * scale:.{digits}f}" if ft is not None else "")


def run_heterogeneous(setup: Setup, clock: Clock) -> dict:
    """Narrow anchor, wider parents of the same depth; one row per arm."""
    arms, sweeps = {}, {"weighted": [], "activations": [], "uniform": []}
    aw = setup.anchor_weight
    n_par = len(setup.parent_hiddens)
    mix = [aw] + [(1 - aw) / n_par] * n_par
    names = {
        "anchor": f"anchor alone ({setup.describe(setup.anchor_hidden)})",
        "anchor_ft": "anchor + N steps finetuning (honest control)",
        "anchor_kd": "anchor + N steps distillation from the parents",
        "fw_one": f"OT-fused, weights-based, anchor weight {aw:g}: one-shot",
        "fw_ft": f"OT-fused, weights-based, anchor weight {aw:g}: + N steps finetuning",
        "fa_one": f"OT-fused, activations-based, anchor weight {aw:g}: one-shot",
        "fa_ft": f"OT-fused, activations-based, anchor weight {aw:g}: + N steps finetuning",
        "fw_kd": f"(extra) OT-fused, weights-based, anchor weight {aw:g}: + N steps distillation",
        "fr_one": (f"(extra) OT-fused, weights-based, anchor weight {aw:g}, "
                   "with the engine's statistics repair: one-shot"),
        "fr_ft": (f"(extra) OT-fused, weights-based, anchor weight {aw:g}, "
                  "with statistics repair: + N steps finetuning"),
        "fu_one": "(reference) OT-fused, weights-based, uniform weights: one-shot",
        "fu_rep": ("(extra) OT-fused, weights-based, uniform weights, "
                   "with statistics repair: one-shot"),
        "ensemble": f"(reference) ensemble of the {n_par} parents (mean softmax)",
    }
    for h in setup.parent_hiddens:
        names[f"parent{h}"] = f"(reference) parent {setup.describe(h)}"

    def add(key, entry):
        arms.setdefault(key, []).append(entry)

    for s in setup.hetero_seeds:
        t = time.perf_counter()
        anchor = setup.get(setup.anchor_hidden, s)[0]
        parents = [setup.get(h, s)[0] for h in setup.parent_hiddens]
        calib, hold = setup.calib_holdout(100 + s)
        for h, p in zip(setup.parent_hiddens, parents):
            add(f"parent{h}", {"value": evaluate_model(p, setup.data)})
        add("ensemble", {"value": evaluate_ensemble(parents, setup.data)})
        add("anchor", {"value": evaluate_model(anchor, setup.data)})
        m, sec = setup.finetune(anchor, s)
        add("anchor_ft", {"value": evaluate_model(m, setup.data), "finetune_s": sec})
        m, sec = setup.finetune(anchor, s, teachers=parents)
        add("anchor_kd", {"value": evaluate_model(m, setup.data), "finetune_s": sec})

        sw = fuse_sweep(anchor, parents, setup.data, grid=setup.grid, holdout=hold, calib=calib,
                        alignment="weights", weights=mix)
        sweeps["weighted"].append(sw)
        info = _sweep_info(sw)
        add("fw_one", {"value": evaluate_model(sw["best"], setup.data), **info})
        m, sec = setup.finetune(sw["best"], s)
        add("fw_ft", {"value": evaluate_model(m, setup.data), "finetune_s": sec, **info})
        m, sec = setup.finetune(sw["best"], s, teachers=parents)
        add("fw_kd", {"value": evaluate_model(m, setup.data), "finetune_s": sec, **info})
        t_r = time.perf_counter()
        rep = repaired(anchor, parents, calib, sw["best_reg"], mix)
        t_r = time.perf_counter() - t_r
        add("fr_one", {"value": evaluate_model(rep, setup.data), "repair_s": t_r, **info})
        m, sec = setup.finetune(rep, s)
        add("fr_ft", {"value": evaluate_model(m, setup.data), "finetune_s": sec, **info})

        sw = fuse_sweep(anchor, parents, setup.data, grid=setup.grid, holdout=hold, calib=calib,
                        alignment="activations", weights=mix)
        sweeps["activations"].append(sw)
        info = _sweep_info(sw)
        add("fa_one", {"value": evaluate_model(sw["best"], setup.data), **info})
        m, sec = setup.finetune(sw["best"], s)
        add("fa_ft", {"value": evaluate_model(m, setup.data), "finetune_s": sec, **info})

        sw = fuse_sweep(anchor, parents, setup.data, grid=setup.grid, holdout=hold, calib=calib,
                        alignment="weights", weights=None)
        sweeps["uniform"].append(sw)
        add("fu_one", {"value": evaluate_model(sw["best"], setup.data), **_sweep_info(sw)})
        add("fu_rep", {"value": evaluate_model(repaired(anchor, parents, calib, sw["best_reg"], None),
                                               setup.data), **_sweep_info(sw)})
        clock.phase("heterogeneous", t)
        key, scale, digits, _, _ = setup.primary
        log(f"  heterogeneous seed {s}: {time.perf_counter() - t:.0f} s; " + ", ".join(
            f"{k}: {arms[k][-1]['value'][key] * scale:.{digits}f}" for k in arms))

    checks = {}
    for key, scale, digits, label, higher in setup.metrics:
        vals = {k: [e["value"][key] for e in v] for k, v in arms.items()}
        checks[key] = {
            "fused_ft_vs_anchor_ft": compare(vals["fw_ft"], vals["anchor_ft"], higher),
            "fused_ft_vs_anchor_kd": compare(vals["fw_ft"], vals["anchor_kd"], higher),
            "fused_acts_ft_vs_anchor_ft": compare(vals["fa_ft"], vals["anchor_ft"], higher),
            "fused_acts_ft_vs_anchor_kd": compare(vals["fa_ft"], vals["anchor_kd"], higher),
            "fused_kd_vs_anchor_kd": compare(vals["fw_kd"], vals["anchor_kd"], higher),
            "repaired_ft_vs_anchor_ft": compare(vals["fr_ft"], vals["anchor_ft"], higher),
            "fused_one_shot_vs_anchor": compare(vals["fw_one"], vals["anchor"], higher),
        }
    return {"seeds": list(setup.hetero_seeds), "mix": mix, "names": names, "arms": arms,
            "checks": checks, "sweeps": {k: [strip_models(s) for s in v] for k, v in sweeps.items()}}


# --------------------------------------------------------------------------- rendering


def _stat(entries, stage, key):
    return summarize([e[stage][key] for e in entries if stage in e])


def homogeneous_markdown(setup: Setup, homo: dict) -> list[str]:
    lines = []
    for K, res in homo.items():
        groups = res["groups"]
        lines += ["", (f"### {K} parents ({setup.describe(setup.homo_hidden)}), "
                       f"{len(groups)} seed groups: {groups}"), ""]
        headers = ["method"]
        for key, scale, digits, label, higher in setup.metrics:
            headers += [f"{label} one-shot", f"{label} + N steps"]
        headers += ["reg chosen", "s per fusion"]
        rows = []
        for arm, entries in res["arms"].items():
            row = [arm]
            for key, scale, digits, label, higher in setup.metrics:
                row += [fmt(_stat(entries, "one_shot", key), scale, digits),
                        fmt(_stat(entries, "finetuned", key), scale, digits)]
            regs = [e.get("reg") for e in entries if e.get("reg") is not None]
            row.append(", ".join(f"{r:g}" for r in regs) if regs else "")
            fs = [e["fuse_s"] for e in entries if e.get("fuse_s") is not None]
            row.append(f"{statistics.fmean(fs):.2f}" if fs else "")
            rows.append(row)
        lines += md_table(headers, rows)
    return lines


def heterogeneous_markdown(setup: Setup, het: dict) -> list[str]:
    names, arms = het["names"], het["arms"]
    order = ["anchor", "anchor_ft", "anchor_kd", "fw_one", "fw_ft", "fa_one", "fa_ft", "fw_kd",
             "fr_one", "fr_ft", "fu_one", "fu_rep"] + [f"parent{h}" for h in setup.parent_hiddens] + ["ensemble"]
    key0, scale0, digits0, label0, higher0 = setup.primary
    base = [e["value"][key0] for e in arms["anchor_ft"]]
    headers = ["arm"] + [f"{label}" for _, _, _, label, _ in setup.metrics] + [
        f"Δ {label0} vs anchor + N (paired, + = better)", "reg chosen"]
    rows = []
    for k in order:
        entries = arms[k]
        row = [names[k]]
        for key, scale, digits, label, higher in setup.metrics:
            row.append(fmt(summarize([e["value"][key] for e in entries]), scale, digits))
        sign = 1 if higher0 else -1
        diffs = [sign * (e["value"][key0] - b) for e, b in zip(entries, base)]
        row.append(fmt(summarize(diffs), scale0, digits0) if k != "anchor_ft" else "0")
        regs = [e.get("reg") for e in entries if e.get("reg") is not None]
        row.append(", ".join(f"{r:g}" for r in regs))
        rows.append(row)
    return md_table(headers, rows)


def verdict_lines(setup: Setup, het: dict) -> list[str]:
    lines = []
    for key, scale, digits, label, higher in setup.metrics:
        c = het["checks"][key]
        for name, desc in (("fused_ft_vs_anchor_ft", "OT-fused (weights) + N vs anchor + N"),
                           ("fused_ft_vs_anchor_kd", "OT-fused (weights) + N vs distillation + N"),
                           ("fused_acts_ft_vs_anchor_ft", "OT-fused (activations) + N vs anchor + N"),
                           ("fused_acts_ft_vs_anchor_kd",
                            "OT-fused (activations) + N vs distillation + N"),
                           ("fused_kd_vs_anchor_kd",
                            "(extra) OT-fused + N distillation vs distillation + N"),
                           ("repaired_ft_vs_anchor_ft",
                            "(extra) OT-fused + statistics repair + N vs anchor + N")):
            r = c[name]
            imp = r["improvement"]
            lines.append(
                f"- {label}: {desc}: improvement {imp['mean'] * scale:+.{digits}f} "
                f"(per seed {', '.join(f'{v * scale:+.{digits}f}' for v in imp['values'])}); "
                f"spread across seeds (larger std of the two arms) {r['spread'] * scale:.{digits}f} "
                f"-> **{_verdict(imp['mean'], r['spread'])}**"
                f"{'; better on every seed' if r['wins_every_seed'] else ''}")
    return lines


def _verdict(improvement: float, spread: float) -> str:
    if improvement > spread:
        return "better by more than the spread"
    if improvement < -spread:
        return "worse by more than the spread"
    return "within the spread (no difference shown)"


def reg_sweep_panels(setup: Setup, homo: dict, het: dict, key: str, scale: float) -> list[dict]:
    panels = []
    K0 = min(homo) if homo else None
    if K0 is not None:
        res = homo[K0]
        curves = [curve_from_sweeps(f"OT {a}-based, {K0} parents", res["sweeps"][a], key, scale)
                  for a in ("weights", "activations") if res["sweeps"][a]]
        refs = [("parents (mean)", _stat(res["arms"]["parents (mean of the K)"], "one_shot",
                                          key)["mean"] * scale),
                ("vanilla fusion", _stat(res["arms"]["vanilla fusion (plain average)"],
                                         "one_shot", key)["mean"] * scale)]
        panels.append({"title": f"(a) homogeneous: {K0} parents, {setup.describe(setup.homo_hidden)}",
                       "short": f"(a) homogeneous: {K0} parents of hidden {setup.homo_hidden}",
                       "curves": curves, "refs": refs})
    if het:
        aw = setup.anchor_weight
        curves = [curve_from_sweeps(f"weights-based, anchor weight {aw:g}", het["sweeps"]["weighted"],
                                    key, scale),
                  curve_from_sweeps(f"activations-based, anchor weight {aw:g}",
                                    het["sweeps"]["activations"], key, scale),
                  curve_from_sweeps("weights-based, uniform weights", het["sweeps"]["uniform"],
                                    key, scale)]
        refs = [("anchor alone", summarize([e["value"][key] for e in het["arms"]["anchor"]])["mean"]
                 * scale)]
        panels.append({"title": f"(b) heterogeneous: anchor {setup.describe(setup.anchor_hidden)} + "
                                f"parents h{'/h'.join(str(h) for h in setup.parent_hiddens)}",
                       "short": (f"(b) heterogeneous: anchor hidden {setup.anchor_hidden} + parents "
                                 f"{' and '.join(str(h) for h in setup.parent_hiddens)}"),
                       "curves": curves, "refs": refs})
    return panels


def reg_sweep_markdown(setup: Setup, panels: list[dict], label: str, digits: int = 2) -> list[str]:
    lines = []
    d = digits
    for p in panels:
        lines += ["", f"{p['title']} — one-shot {label}, mean [min–max] over seeds:", ""]
        regs = sorted({r for c in p["curves"] for r in c["regs"] + c["failed_regs"]})
        headers = ["curve"] + [f"{r:g}" for r in regs] + ["EMD", "reg chosen on holdout"]
        rows = []
        for c in p["curves"]:
            cells = {r: f"{m:.{d}f} [{lo:.{d}f}–{hi:.{d}f}]"
                     for r, m, lo, hi in zip(c["regs"], c["mean"], c["min"], c["max"])}
            row = [c["label"]] + [cells.get(r, "Sinkhorn did not converge" if r in c["failed_regs"]
                                            else "—") for r in regs]
            e = c.get("emd")
            row.append(f"{e['mean']:.{d}f} [{e['min']:.{d}f}–{e['max']:.{d}f}]" if e else "—")
            row.append(", ".join(f"{r:g}" for r in c.get("chosen", [])))
            rows.append(row)
        lines += md_table(headers, rows)
        lines += ["", "References: " + "; ".join(f"{k} {v:.{d}f}" for k, v in p["refs"])]
    return lines


def render(setup: Setup, payload: dict, panels: list[dict], png_name: str, *, command: str,
           data_line: str, homo_note: str, notes: list[str], sweep_label: str) -> str:
    env, het, homo = payload["environment"], payload["heterogeneous"], payload["homogeneous"]
    N = setup.steps
    L = [f"# Real-data fusion benchmark: {setup.title}",
         "",
         (f"`{command}` — {env['date']}, {env['threads']} torch threads "
          f"(OMP_WAIT_POLICY={env['omp_wait_policy']}), {env['cores']}-core {env['cpu']} shared "
          f"with other jobs (load average {env['loadavg_start'][0]:.1f} at start, "
          f"{env['loadavg_end'][0]:.1f} at end); wall time {env['wall_s']:.0f} s "
          f"({', '.join(f'{k} {v:.0f} s' for k, v in env['phases_s'].items())})."),
         "",
         (data_line + " "
          f"Every finetuning arm: N = {N} steps, AdamW lr {setup.lr:g}, batch {setup.batch_size}, "
          "10% warm-up then cosine, the same batch order for every arm of a seed. Distillation: "
          f"alpha {setup.kd_alpha}, temperature {setup.kd_temperature}, teachers = the parents. "
          f"Sinkhorn reg: chosen per seed from the grid {list(setup.grid)} as the lowest task "
          f"loss on {setup.holdout_examples} held-out *train* examples (what `reg=\"auto\"` "
          f"does); activation statistics from {setup.calib_samples} train examples. "
          "Numbers: mean ± std [min–max] over seeds."),
         "",
         "## Heterogeneous fusion (compression)",
         "",
         (f"Anchor {setup.describe(setup.anchor_hidden)}; parents "
          f"{' and '.join(setup.describe(h) for h in setup.parent_hiddens)}; seeds "
          f"{het['seeds']} (the seed changes the anchor, both parents, the calibration/holdout "
          f"draw and the batch order). Mixing weights [anchor, parents...] = "
          f"{[round(w, 3) for w in het['mix']]} (anchor weight fixed in advance, see the "
          f"notes). N = {N} steps."),
         ""]
    L += heterogeneous_markdown(setup, het)
    L += ["", ("**Target** (OT-fused + N beats anchor + N and distillation + N by more than "
               "the spread across seeds; improvement > 0 = better):"), ""]
    L += verdict_lines(setup, het)
    L += ["", "### Cost of each width (batch 1, 1 thread, seed-0 models)", ""]
    L += cost_table(payload["costs"])
    L += ["", ("FLOPs scale with width as expected; at these tiny sizes the batch-1 latency is "
               "per-operator overhead, not arithmetic, so it barely follows width, and medians "
               "on this shared machine move by tens of percent between runs.")]
    L += ["", "## Homogeneous fusion", "", homo_note]
    L += homogeneous_markdown(setup, homo)
    L += ["", f"## Sinkhorn regulariser sweep (paper figure 5a on our data): `{png_name}`", "",
          f"![reg sweep]({png_name})"]
    L += reg_sweep_markdown(setup, panels, sweep_label, setup.primary[2])
    L += ["", "## Notes", ""] + [f"- {n}" for n in notes] + [""]
    return "\n".join(L) + "\n"
