"""Does the default recipe give a small model that beats the alternatives?
Digits ViTs (scikit-learn's 1,797 real 8x8 images; accuracy on the fixed 450
eval images), 4 layers, parents hidden 64.

Settings (issue 11):
  weak-anchor     anchor hidden 16 trained 20 epochs (~76%), parents h64 (~97%)
  good-anchor     anchor hidden 32 trained 30 epochs (~96%)
  low-data        weak anchor, the user finetunes on 10% of the train split
  split-parents   parents trained on different class halves (0-4, 5-9); the
                  anchor (h16) and the user's data are 10% of the train split

Arms, each for N in {30, 100, 300} finetuning steps (AdamW 1e-3, batch 64):
  anchor + N                 finetune the anchor alone
  anchor distilled + N       distil from the parents
  distilled, lr tuned + N    the same at lr 3e-4 / 1e-3 / 3e-3, the one with the
                             lowest loss on held-out *train* examples (N = 300 only)
  fold + distil + N          alignment "fold" (parents folded, folds OT-fused)
  default recipe + N         `pipeline.run` with the default recipe: race of the
                             starting points on held-out train examples, distilled
                             (N + N/2 steps in all: the race's losing start counts)
  ..., lr tuned, recipe's steps   at the largest N, equal compute: the default
                             recipe with its lr tuned (the lr of LRS with the
                             lowest held-out train loss; its race included), then
                             the controls, each given every step that recipe run
                             spent (N + its race's losing start: N/2, or 0 where
                             the race was settled one-shot) at its own tuned lr:
                             the anchor, and each parent pruned to the anchor's
                             shape by Torch-Pruning (L2; Taylor on 256 labelled
                             images)
and one-shot: anchor, fold, OT fusion with anchor weight 0.8, default (N = 0).
Seeds change the finetuning data order (and the held-out split); the zoo
models are fixed. Threads: 1.

    python benchmarks/compress_digits.py            # full run
    python benchmarks/compress_digits.py --quick    # smoke run
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common

common.prepare_environment()

STEPS = (30, 100, 300)
LRS = (3e-4, 1e-3, 3e-3)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--settings", nargs="+", default=["weak-anchor", "good-anchor", "low-data", "split-parents"])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--steps", type=int, nargs="+", default=list(STEPS))
    ap.add_argument("--stem", default=None, help="Results file name (default compress_digits[.quick]).")
    return ap.parse_args(argv)


def subset(data, *, fraction=None, classes=None, seed=0):
    """The train split cut to a stratified `fraction` or to some `classes`."""
    import torch
    train = data.splits["train"]
    labels = train["labels"]
    keep = torch.ones(len(labels), dtype=torch.bool)
    if classes is not None:
        keep &= torch.isin(labels, torch.tensor(classes))
    idx = keep.nonzero().flatten()
    if fraction is not None:
        g = torch.Generator().manual_seed(1000 + seed)
        parts = [idx[labels[idx] == c][torch.randperm(int((labels[idx] == c).sum()), generator=g)]
                 for c in labels[idx].unique()]
        idx = torch.cat([p[: max(1, round(fraction * len(p)))] for p in parts])
    return dataclasses.replace(data, splits={**data.splits, "train": {k: v[idx] for k, v in train.items()}})


def trained(name, config_kw, data, epochs, seed):
    """A digits ViT trained on `data`'s train split, cached by name."""
    import torch
    from transformers import ViTForImageClassification

    from otcompress import zoo
    from otcompress.finetune import finetune
    path = zoo.cache_root() / "bench" / name
    if (path / "config.json").is_file():
        return ViTForImageClassification.from_pretrained(path).eval()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = ViTForImageClassification(zoo.digits_vit_config(**config_kw))
    steps = epochs * max(1, data.num_examples("train") // 64)
    finetune(model, data, steps=steps, lr=2e-3, batch_size=64, seed=seed, warmup=0.3)
    model.save_pretrained(path)
    return model.eval()


def setting_models(name, full, quick):
    from otcompress.zoo import digits_vit
    e = 3 if quick else 1
    ph = 32 if quick else 64
    if name == "split-parents":
        small = subset(full, fraction=0.1)
        parents = [trained(f"split-{c[0]}-h{ph}", {"hidden": ph}, subset(full, classes=c), 30 // e, i)
                   for i, c in enumerate(((0, 1, 2, 3, 4), (5, 6, 7, 8, 9)))]
        anchor = trained("split-anchor-h16-small", {"hidden": 16}, small, 60 // e, 2)
        return anchor, parents, small
    parents = [digits_vit(hidden=ph, seed=s, epochs=30 // e)[0] for s in (0, 1)]
    if name == "good-anchor":
        return digits_vit(hidden=32, seed=2, epochs=30 // e)[0], parents, full
    anchor = digits_vit(hidden=16, seed=2, epochs=20 // e)[0]
    return anchor, parents, subset(full, fraction=0.1) if name == "low-data" else full


def acc(model, data):
    from otcompress.finetune import evaluate
    return evaluate(model, data)["accuracy"]


def run_setting(name, seeds, steps_list, quick):
    from otcompress.data import load_data
    anchor, parents, data = setting_models(name, load_data("digits", _probe()), quick)
    return run_arms(anchor, parents, data, seeds, steps_list, acc)


def run_arms(anchor, parents, data, seeds, steps_list, metric):
    """Every arm of the module docstring, per seed; `metric(model, data)` is
    what the tables report (accuracy here, held-out MLM loss for text)."""
    import otcompress
    from otcompress import pipeline
    from otcompress.finetune import finetune

    rows = {"one-shot": {}, **{n: {} for n in steps_list}}

    def put(stage, arm, value):
        rows[stage].setdefault(arm, []).append(value)

    for seed in seeds:
        t0 = time.time()
        train, holdout = pipeline.split_holdout(data, seed)
        put("one-shot", "anchor", metric(anchor, data))
        put("one-shot", "parents (mean)", sum(metric(p, data) for p in parents) / len(parents))
        fold = otcompress.fuse(anchor, parents, alignment="fold", seed=seed)
        put("one-shot", "fold", metric(fold, data))
        ot = otcompress.fuse(anchor, parents, weights=pipeline.anchor_weighted(len(parents)))
        put("one-shot", "OT fusion, anchor weight 0.8", metric(ot, data))
        base = {"finetune_steps": 0, "seed": seed}
        m, _ = pipeline.run(anchor, parents, base, data=data)
        put("one-shot", "default recipe", metric(m, data))
        for n in steps_list:
            ft = dict(steps=n, lr=1e-3, batch_size=64, seed=seed)
            a = copy.deepcopy(anchor)
            finetune(a, data, **ft)
            put(n, "anchor + N", metric(a, data))
            a = copy.deepcopy(anchor)
            finetune(a, data, teachers=parents, **ft)
            put(n, "anchor distilled + N", metric(a, data))
            # The lr-tuned arms hold out another tenth of `train`: too few examples left (low data) skip them.
            if n == max(steps_list) and train.num_examples("train") >= 2 * pipeline.HOLDOUT_MIN:
                put(n, "anchor distilled, lr tuned + N",
                    lr_tuned(lambda: copy.deepcopy(anchor), train, holdout, data, parents, metric, ft))
                score, lr, rep = common.recipe_lr_tuned(anchor, parents, {**base, "finetune_steps": n}, train,
                                                        holdout, LRS, lambda m: metric(m, data))
                # Equal compute: every step the recipe spent (its race's losing start included: N/2,
                # or none where the race was settled one-shot) is each control's budget too.
                spent = pipeline.steps_spent(rep)
                put(n, "default recipe, lr tuned (N + its race's extra steps)", score)
                put(n, "default recipe, lr tuned: winner", f"{rep['race']['winner']} (lr {lr:g}, {spent} steps)")
                for arm, make in equal_compute_starts(anchor, parents, train, seed).items():
                    put(n, arm, lr_tuned(make, train, holdout, data, parents, metric, {**ft, "steps": spent}))
            f = copy.deepcopy(fold)
            finetune(f, data, teachers=parents, **ft)
            put(n, "fold + distil + N", metric(f, data))
            m, rep = pipeline.run(anchor, parents, {**base, "finetune_steps": n}, data=data)
            put(n, "default recipe + N", metric(m, data))
            put(n, "default recipe: winner", rep["race"]["winner"])
        common.log(f"  seed {seed}: {time.time() - t0:.0f} s")
    return rows


def equal_compute_starts(anchor, parents, train, seed):
    """{arm: () -> start} of the controls that get the recipe's whole budget:
    the anchor, and each parent pruned to the anchor's shape by Torch-Pruning
    (L2 magnitude; Taylor importance on 256 labelled train images)."""
    import pruning_control as pc
    labelled = list(train.batches("train", 64, shuffle=True, seed=seed, limit=256))
    arms = {"anchor distilled, lr tuned, recipe's steps": lambda: copy.deepcopy(anchor)}
    if anchor.config.model_type not in ("vit", "bert"):
        return arms  # pruning_control.torch_prune knows ViT and BERT (classifiers and masked-LMs)
    for k, p in enumerate(parents):
        for imp in ("l2", "taylor"):
            arms[f"TP {imp} of parent {'ab'[k]}, lr tuned, recipe's steps"] = (
                lambda p=p, imp=imp: pc.torch_prune(p, anchor.config, importance=imp, batches=labelled))
    return arms


def lr_tuned(make, train, holdout, data, parents, metric, ft):
    """`metric` of the start distilled at the lr of LRS with the lowest held-out train loss."""
    ft = {k: v for k, v in ft.items() if k != "lr"}
    return common.lr_tuned(make, train, holdout, LRS, lambda m: metric(m, data), teachers=parents, **ft)[0]


def _probe():
    """Any digits ViT config: load_data needs the image geometry and label count."""
    from otcompress.zoo import digits_vit_config
    return digits_vit_config(hidden=16)


def markdown(results, args, env, seconds, *, title="Small models that beat the alternatives: digits ViTs",
             command="python benchmarks/compress_digits.py", what="accuracy % on the 450 eval images",
             unit="accuracy %", scale=100, digits=1):
    lines = [f"# {title}", "",
             f"`{command}` — {seconds:.0f} s, {args.threads} thread(s), seeds {args.seeds} (finetuning "
             f"data order and held-out split), {what}, mean ± std over seeds [min–max].", "",
             f"Machine: {env.get('cpu')}, torch {env.get('torch')}.", ""]
    fmt = lambda v: common.fmt(common.summarize(v), scale, digits)  # noqa: E731
    for name, rows in results.items():
        lines += [f"## {name}", ""]
        steps = [k for k in rows if k != "one-shot"]
        arms = [a for a in rows[max(steps)] if not a.endswith(": winner")]
        table = [[arm, fmt(v)] for arm, v in rows["one-shot"].items()]
        lines += ["One-shot:", ""] + common.md_table(["start", unit], table) + [""]
        table = [[arm] + [fmt(rows[n].get(arm, [])) for n in steps] for arm in arms]
        lines += common.md_table(["arm", *[f"N = {n}" for n in steps]], table)
        winners = {n: rows[n].get("default recipe: winner") for n in steps}
        lines += ["", "Race winners: " + "; ".join(f"N = {n}: {', '.join(w)}" for n, w in winners.items() if w)]
        tuned = rows[max(steps)].get("default recipe, lr tuned: winner")
        lines += [f"Race winners, lr tuned: {', '.join(tuned)}" if tuned else "", ""]
    return "\n".join(lines) + "\n"


def main(argv=None):
    args = parse_args(argv)
    common.set_threads(args.threads)
    common.quiet_libraries()
    env = common.environment(args.threads)
    steps = (10, 30) if args.quick else tuple(args.steps)
    seeds = args.seeds[:1] if args.quick else args.seeds
    t0 = time.time()
    results = {}
    for name in args.settings:
        common.log(f"setting {name}")
        results[name] = run_setting(name, seeds, steps, args.quick)
    stem = args.stem or ("compress_digits.quick" if args.quick else "compress_digits")
    md = markdown(results, args, env, time.time() - t0)
    common.write_results(stem, md, {"environment": env, "results": results, "seeds": seeds})
    print(md)


if __name__ == "__main__":
    main()
