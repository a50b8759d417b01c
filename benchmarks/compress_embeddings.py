"""Headless (embedding) models: does the default recipe give a small encoder
whose embeddings agree with the parents' better than what a user gets
without otcompress (the anchor distilled on the same objective)?

Models: the pydoc BERT masked-LMs of benchmarks/compress_text.py loaded as
bare `BertModel` encoders (mean-pooled embeddings): parents hidden 64 (two
seeds, 1500 steps), targets hidden 32 (weak: 300 steps; good: 1500 steps).
Metric: on the 10% held-out pydoc paragraphs, the Pearson correlation of the
model's pairwise cosine similarities with the parents' mean ones, over every
pair (higher is better), and the mean squared difference (the objective).
Arms: the anchor; the anchor distilled N steps on the similarity objective
(AdamW 1e-3, batch 64, the same loop the recipe uses); the fold of both
parents distilled N steps; the default recipe (its race spends 1.5 N steps
where it runs one). At the `--tune-at` budgets, equal compute: the default
recipe with its lr tuned on held-out train examples, then each parent pruned
by Torch-Pruning (L2) and distilled for every step that recipe run spent, lr
tuned alike. `--reconstruct` sets the recipe's reconstruct key.
Seeds change the finetuning order and the held-out split. Threads: 1.

    python benchmarks/compress_embeddings.py
    python benchmarks/compress_embeddings.py --settings weak-anchor --steps 300 --tune-at 300 \
        --stem compress_embeddings.equal_compute [--reconstruct on]
"""
from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common

common.prepare_environment()


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--steps", type=int, nargs="+", default=[100, 300])
    ap.add_argument("--settings", nargs="+", default=["weak-anchor", "good-anchor"])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--tune-at", type=int, nargs="*", default=[],
                    help="Budgets N that also get the control with its lr tuned on held-out training "
                         "examples (3e-4, 1e-3, 3e-3), as the race is.")
    ap.add_argument("--stem", default="compress_embeddings", help="Results file name.")
    ap.add_argument("--reconstruct", choices=("auto", "on", "off"), default="auto",
                    help="The default recipe's reconstruct (auto: off for these finetuned embedding models).")
    return ap.parse_args(argv)


def encoder(path):
    from transformers import BertModel
    return BertModel.from_pretrained(path, add_pooling_layer=False).eval()


LRS = (3e-4, 1e-3, 3e-3)


def run_arms(anchor, parents, data, seeds, steps_list, tune_at=(), recipe=None):
    import otcompress
    from otcompress import pipeline
    from otcompress.finetune import evaluate, finetune

    rows = {"one-shot": {}, **{n: {} for n in steps_list}}

    def put(stage, arm, model):
        m = evaluate(model, data, reference=parents)
        rows[stage].setdefault(arm, []).append([m["similarity_pearson"], m["loss"]])

    for seed in seeds:
        t0 = time.time()
        put("one-shot", "anchor", anchor)
        fold = otcompress.fuse(anchor, parents, alignment="fold", seed=seed)
        put("one-shot", "fold", fold)
        put("one-shot", "OT fusion, anchor weight 0.8",
            otcompress.fuse(anchor, parents, weights=pipeline.anchor_weighted(len(parents))))
        m, _ = pipeline.run(anchor, parents, {"finetune_steps": 0, "seed": seed}, data=data)
        put("one-shot", "default recipe", m)
        for n in steps_list:
            kw = dict(steps=n, lr=1e-3, batch_size=64, seed=seed, teachers=parents)
            a = copy.deepcopy(anchor)
            finetune(a, data, **kw)
            put(n, "anchor distilled + N", a)
            if n in tune_at:
                put(n, "anchor distilled, lr tuned + N", _lr_tuned(anchor, parents, data, seed, kw))
                note = _equal_compute(put, anchor, parents, data, seed, kw, recipe)
                rows[n].setdefault("default recipe, lr tuned: winner", []).append(note)
            f = copy.deepcopy(fold)
            finetune(f, data, **kw)
            put(n, "fold + distil + N", f)
            m, rep = pipeline.run(anchor, parents, {"finetune_steps": n, "seed": seed, **(recipe or {})}, data=data)
            put(n, "default recipe + N", m)
            rows[n].setdefault("default recipe: winner", []).append(rep["race"]["winner"])
        common.log(f"  seed {seed}: {time.time() - t0:.0f} s")
    return rows


def _lr_tuned(anchor, parents, data, seed, kw):
    """The control at its best lr, chosen on held-out training examples."""
    from otcompress import pipeline
    train, holdout = pipeline.split_holdout(data, seed)
    kw = {k: v for k, v in kw.items() if k != "lr"}
    return common.lr_tuned(lambda: copy.deepcopy(anchor), train, holdout, LRS, lambda m: m,
                           reference=parents, **kw)[0]


def _equal_compute(put, anchor, parents, data, seed, kw, recipe=None):
    """The default recipe (with `recipe`'s keys) lr tuned on held-out train
    examples, then, at every step it spent (N + its race's N/2 where it raced),
    each parent pruned to the anchor's shape by Torch-Pruning (L2), lr tuned alike."""
    import pruning_control as pc

    from otcompress import pipeline
    train, holdout = pipeline.split_holdout(data, seed)
    n = kw["steps"]
    tuned = {k: v for k, v in kw.items() if k not in ("lr", "steps")}
    model, lr, rep = common.recipe_lr_tuned(anchor, parents, {"finetune_steps": n, "seed": seed, **(recipe or {})},
                                            train, holdout, LRS, lambda m: m, reference=parents)
    spent = pipeline.steps_spent(rep)
    put(n, "default recipe, lr tuned (N + its race's extra steps)", model)
    put_note = f"{rep['race']['winner']} (lr {lr:g}, {spent} steps)"
    for k, p in enumerate(parents):
        put(n, f"TP L2 of parent {'ab'[k]}, lr tuned, recipe's steps",
            common.lr_tuned(lambda p=p: pc.torch_prune(p, anchor.config, importance="l2"), train, holdout, LRS,
                            lambda m: m, reference=parents, steps=spent, **tuned)[0])
    return put_note


def markdown(results, args, env, seconds):
    command = " ".join(["python benchmarks/compress_embeddings.py", *sys.argv[1:]])
    lines = ["# Small embedding models: pydoc BERT encoders, similarity agreement with the parents", "",
             f"`{command}` — {seconds:.0f} s, {args.threads} thread(s), "
             f"seeds {args.seeds}; cells: Pearson r of pairwise cosine similarities with the parents' "
             "(x100, higher is better) / their mean squared difference (x1000, lower is better) on the "
             "held-out pydoc paragraphs, mean ± std over seeds.", "",
             f"Machine: {env.get('cpu')}, torch {env.get('torch')}.", ""]

    def cell(values):
        if not values:
            return "-"
        r = common.fmt(common.summarize([v[0] for v in values]), 100, 1, spread=True)
        mse = common.fmt(common.summarize([v[1] for v in values]), 1000, 2, spread=False)
        return f"{r} / {mse}"

    for name, rows in results.items():
        steps = [k for k in rows if k != "one-shot"]
        arms = [a for a in rows[max(steps)] if not a.endswith(": winner")]
        lines += [f"## {name}", "", "One-shot:", ""]
        lines += common.md_table(["start", "r x100 / mse x1000"], [[a, cell(v)] for a, v in rows["one-shot"].items()])
        lines += [""] + common.md_table(["arm", *[f"N = {n}" for n in steps]],
                                        [[a] + [cell(rows[n].get(a)) for n in steps] for a in arms])
        winners = "; ".join(f"N = {n}: {', '.join(rows[n]['default recipe: winner'])}" for n in steps)
        tuned = rows[max(steps)].get("default recipe, lr tuned: winner")
        lines += ["", f"Race winners: {winners}", *([f"Race winners, lr tuned: {', '.join(tuned)}"] if tuned else []),
                  ""]
    return "\n".join(lines) + "\n"


def main(argv=None):
    args = parse_args(argv)
    common.set_threads(args.threads)
    common.quiet_libraries()
    from transformers import AutoTokenizer

    from otcompress.data import load_data
    from otcompress.zoo import pydoc_bert
    env = common.environment(args.threads)
    t0 = time.time()
    parents = [encoder(pydoc_bert(hidden=64, seed=s)[1]) for s in (0, 1)]
    results = {}
    for name in args.settings:
        common.log(f"setting {name}")
        path = pydoc_bert(hidden=32, seed=2, steps=300 if name == "weak-anchor" else 1500)[1]
        anchor = encoder(path)
        data = load_data("pydoc", anchor, tokenizer=AutoTokenizer.from_pretrained(path))
        results[name] = run_arms(anchor, parents, data, args.seeds, args.steps, args.tune_at,
                                 {"reconstruct": args.reconstruct})
    md = markdown(results, args, env, time.time() - t0)
    common.write_results(args.stem, md, {"environment": env, "results": results, "seeds": args.seeds})
    print(md)


if __name__ == "__main__":
    main()
