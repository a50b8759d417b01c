"""Engine-native pruning against folding as a start (issue 16): the digits
ViT parents (hidden 64, 4 layers, the zoo's seeds 0 = parent_a and 1 =
parent_b) brought to the weak anchor's shape (hidden 16, 2 heads, FFN 32)
with no anchor weights, then distilled from both parents for N steps (AdamW
1e-3, batch 64, the finetune module's default 0.5 CE + 0.5 KL), 3 data
orders. Every arm gets the same N. Accuracy % on the 450 eval images.
"unweighted fold" is the ablation of issue 16's item 2: the same fold with
every unit weighing alike in the k-means (fold.outgoing_weights patched to
None), as folding was before.

Importance (issue 16 item 1, `otcompress.importance`): each prune scored by
weight magnitude (no data), by activations (RMS activation x the norm of
what reads it, on the race's calibration data: 200 unlabelled train
examples drawn with the seed) or by first-order Taylor (the same 200
examples with their labels); the fold's k-means weighted by outgoing norms
or by squared activation importance. The library's defaults
(importance.WITH_LABELS / WITHOUT_LABELS / FOLD_WEIGHTS) are patched per arm.

    python benchmarks/prune_digits.py [--steps 300] [--seeds 0 1 2] [--arms NAME ...]

Writes benchmarks/results/prune_digits.md and .json.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import sys
import time
from pathlib import Path
from unittest import mock

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common

common.prepare_environment()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--arms", nargs="*", default=None, help="run only these arms (names as in the table)")
    args = ap.parse_args(argv)
    common.set_threads(args.threads)
    common.quiet_libraries()
    env = common.environment(args.threads)
    import otcompress
    from otcompress import architectures, fold, importance
    from otcompress.data import load_data
    from otcompress.finetune import evaluate, finetune
    from otcompress.zoo import digits_vit, digits_vit_config

    data = load_data("digits", digits_vit_config(hidden=16))
    parents = [digits_vit(hidden=64, seed=s, epochs=30)[0] for s in (0, 1)]
    target = architectures.target_config(parents[0].config, hidden=16, heads=2, intermediate=32)
    # arm -> (alignment, parents, importance: weights | activations | taylor, unweighted fold?)
    arms = {"fold of parent_b": ("fold", [parents[1]], "weights"),
            "fold of parent_b, activation weights": ("fold", [parents[1]], "activations"),
            "unweighted fold of parent_b": ("fold", [parents[1]], None),
            "prune of parent_b, weights": ("prune", [parents[1]], "weights"),
            "prune of parent_b, activations": ("prune", [parents[1]], "activations"),
            "prune of parent_b, taylor": ("prune", [parents[1]], "taylor"),
            "prune of parent_a, weights": ("prune", [parents[0]], "weights"),
            "prune of parent_a, activations": ("prune", [parents[0]], "activations"),
            "prune of parent_a, taylor": ("prune", [parents[0]], "taylor"),
            "fold of both": ("fold", parents, "weights")}
    arms = {k: v for k, v in arms.items() if not args.arms or k in args.arms}
    rows = {arm: {"one-shot": [], "one-shot loss": [], f"+ {args.steps}": []} for arm in arms}
    t0 = time.time()
    for seed in args.seeds:
        calib = list(data.calibration_batches(200, 64, seed=seed))  # as the race's calibration data
        labelled = list(data.batches("train", 64, shuffle=True, seed=seed, limit=200))
        for arm, (how, ps, imp) in arms.items():
            batches = {"weights": None, "activations": calib, "taylor": labelled}.get(imp)
            with _importance(fold, importance, imp):
                model = otcompress.fuse(target, ps, alignment=how, seed=seed, data=batches)
            assert model.fusion_report["importance"] == [imp or "weights"] * len(ps), model.fusion_report["importance"]
            scored = evaluate(model, data)
            rows[arm]["one-shot"].append(scored["accuracy"])
            rows[arm]["one-shot loss"].append(scored["loss"])  # what the race ranks starts by (held-out loss)
            model = copy.deepcopy(model)
            if args.steps:
                finetune(model, data, steps=args.steps, lr=1e-3, batch_size=64, seed=seed, teachers=parents)
            rows[arm][f"+ {args.steps}"].append(evaluate(model, data)["accuracy"])
            common.log(f"seed {seed} {arm}: {rows[arm]['one-shot'][-1]:.3f} -> {rows[arm][f'+ {args.steps}'][-1]:.3f}")
    fmt = lambda v: common.fmt(common.summarize(v), 100, 2)  # noqa: E731
    lines = ["# Pruning vs folding as a start: digits ViTs, weak-anchor shape", "",
             f"`python benchmarks/prune_digits.py` — {time.time() - t0:.0f} s, {args.threads} thread(s), seeds "
             f"{args.seeds} (fold seeding and data order), accuracy % on the 450 eval images, mean ± std "
             f"[min–max]; target hidden 16, 2 heads, FFN 32; every arm distilled {args.steps} steps from "
             "both parents. Importance: weights = no data; activations = 200 unlabelled calibration "
             "examples; taylor = the same with labels.", "", f"Machine: {env.get('cpu')}, torch {env.get('torch')}.", ""]
    loss = lambda v: common.fmt(common.summarize(v), 1, 3)  # noqa: E731
    lines += common.md_table(["start", "one-shot", "one-shot loss", f"+ {args.steps} steps"],
                             [[arm, fmt(r["one-shot"]), loss(r["one-shot loss"]), fmt(r[f"+ {args.steps}"])]
                              for arm, r in rows.items()])
    md = "\n".join(lines) + "\n"
    common.write_results("prune_digits" if args.steps else "prune_digits_oneshot", md,
                         {"environment": env, "rows": rows, "seeds": args.seeds})
    print(md)


@contextlib.contextmanager
def _importance(fold, importance, how):
    """The library's importance defaults set to `how` for one arm (None: the
    unweighted fold, every unit alike in the k-means)."""
    if how is None:
        with mock.patch.object(fold, "outgoing_weights", lambda rows: None):
            yield
        return
    with mock.patch.multiple(importance, WITH_LABELS=how, WITHOUT_LABELS=how, FOLD_WEIGHTS=how):
        yield


if __name__ == "__main__":
    main()
