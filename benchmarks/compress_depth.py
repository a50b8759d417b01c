"""Shallower and narrower: does the tool's small model beat what a compression
user does to get one? Digits ViTs (scikit-learn's 1,797 real 8x8 images;
accuracy on the fixed 450 eval images): parents 4 blocks x hidden 64 (two
seeds, ~97%), targets 2 blocks x hidden 32 (4 heads, FFN 64) and 2 blocks x
hidden 16 (2 heads, FFN 32).

Every arm gets the same total budget B: every optimizer step the default
recipe spent on that seed (N, plus N/2 where its race trained a losing
start), the same distillation loop (AdamW, batch 64, 0.5 CE + 0.5 KL to both
parents), and its learning rate chosen from LRS by the loss on held-out
*train* examples (never the eval split); 3 seeds (data order and held-out
split):

  default recipe     `pipeline.run` with the small model as anchor: races the
                     depth-mapped, reconstructed parents' starts, OT fusion and
                     the anchor (N steps + race, if one is run)
  recipe, no anchor  `pipeline.run` with only the target shape: the parents'
                     starts (fold of both, each folded, each pruned; all
                     reconstructed), the best one-shot trains B steps
  tool: fold         the parents folded into the target (depth-mapped by block
                     influence on calibration data), no anchor, no
                     reconstruction, then B steps
  every-other + TP   DistilBERT-style: every other block of the better parent
                     (lower held-out train loss), then
                     Torch-Pruning (L2 magnitude) to the target widths, B steps
  ShortGPT + TP      the blocks of the better parent with the highest block influence,
                     then Torch-Pruning (L2, or Taylor on 256 labelled images)
  small + distil     the small model trained from scratch (the anchor), B steps
  random + distil    a random initialisation of the target, B steps

Threads: 1.

    python benchmarks/compress_depth.py            # full run
    python benchmarks/compress_depth.py --quick    # smoke run
"""
from __future__ import annotations

import argparse
import copy
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common

common.prepare_environment()

LRS = (1e-3, 3e-3)
TARGETS = {"h32": dict(hidden=32, heads=4, intermediate=64), "h16": dict(hidden=16, heads=2, intermediate=32)}


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--steps", type=int, nargs="+", default=[300])
    ap.add_argument("--targets", nargs="+", default=list(TARGETS))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--stem", default=None, help="results file name (default compress_depth[.quick])")
    return ap.parse_args(argv)


def models(target, quick):
    """(parents, small model trained from scratch, target config)."""
    from otcompress.architectures import target_config
    from otcompress.zoo import digits_vit
    e = 3 if quick else 1
    parents = [digits_vit(hidden=64, seed=s, epochs=30 // e)[0] for s in (0, 1)]
    w = TARGETS[target]
    small = digits_vit(hidden=w["hidden"], heads=w["heads"], intermediate=w["intermediate"], layers=2, seed=2,
                       epochs=20 // e)[0]
    return parents, small, target_config(parents[0].config, layers=2, **w)


def starts(parents, small, cfg, train, seed, source=0):
    """{arm: () -> a model to distil for the whole budget}: the controls and
    the tool's anchor-free fold."""
    calib = list(train.calibration_batches(256, 64, seed=seed))
    labelled = list(train.batches("train", 64, shuffle=True, seed=seed, limit=256))
    return depth_arms(parents, small, cfg, calib, labelled, seed, source=source, engine_prune=True)


def best_parent(parents, holdout) -> int:
    """Index of the parent with the lowest loss on the held-out *training*
    examples: the one a user compressing with a pruning tool would prune
    (the pruning controls once always took parent A; a parent A trained on
    another machine came out 0.14 worse than B and made them look weak)."""
    from otcompress.finetune import evaluate
    losses = [evaluate(p, holdout)["loss"] for p in parents]
    return min(range(len(parents)), key=lambda k: losses[k] if math.isfinite(losses[k]) else math.inf)


def depth_arms(parents, small, cfg, calib, labelled, seed, *, prune=None, tag="TP", engine_prune=False,
               reports=None, source=0):
    """The arms every depth case shares, any family: the tool's fold (and,
    with `engine_prune`, its alignment="prune" of the pruned parent, plain and
    reconstructed on the calibration batches as the recipe's starts are), every-other and
    ShortGPT block dropping of the pruned parent (`parents[source]`, `best_parent`) then width pruning (`prune`, Torch-
    Pruning by default; `tag` names it), the small model, a random init.
    `reports`, a dict, receives the depth maps the tool's starts chose
    ({alignment: [fusion_report depth map per parent]}) and ShortGPT's kept blocks."""
    import torch

    import otcompress
    import pruning_control as pc
    prune = prune or pc.torch_prune

    def random_init():
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return type(parents[0])(copy.deepcopy(cfg)).eval()

    def dropped(kept, importance):
        return lambda: prune(pc.drop_blocks(parents[source], kept), cfg, importance=importance, batches=labelled)

    def tool(alignment, ps, reconstruct=False):
        def make():
            m = otcompress.fuse(cfg, ps, alignment=alignment, data=calib, seed=seed, reconstruct=reconstruct)
            if reports is not None and not reconstruct:
                reports.setdefault(alignment, [d for d in m.fusion_report.get("depth_maps") or [] if d])
            return m
        return make
    n = parents[source].config.num_hidden_layers
    shortgpt = pc.lowest_influence(parents[source], calib, cfg.num_hidden_layers)
    arms = {"tool: fold (no anchor)": tool("fold", parents)}
    if engine_prune:
        one = parents[source:source + 1]
        arms["tool: prune the pruned parent (no anchor)"] = tool("prune", one)
        arms["tool: prune the pruned parent, reconstructed (no anchor)"] = tool("prune", one, reconstruct=True)
        arms["tool: fold the pruned parent, reconstructed (no anchor)"] = tool("fold", one, reconstruct=True)
    arms.update({
        f"every-other + {tag} L2": dropped(pc.every_other(n, cfg.num_hidden_layers), "l2"),
        f"ShortGPT + {tag} L2": dropped(shortgpt, "l2"),
        f"ShortGPT + {tag} Taylor": dropped(shortgpt, "taylor"),
        "small from scratch + distil": lambda: copy.deepcopy(small),
        "random init + distil": random_init,
    })
    if reports is not None:
        reports["ShortGPT kept"] = shortgpt
    return arms


def tuned(make, train, holdout, data, budget, seed, parents):
    """(eval accuracy, lr) of the lr with the lowest held-out train loss."""
    from otcompress.finetune import evaluate
    return common.lr_tuned(make, train, holdout, LRS, lambda m: evaluate(m, data)["accuracy"],
                           steps=budget, batch_size=64, seed=seed, teachers=parents)


def default_recipe(small, parents, train, holdout, data, n, seed, score=None, lrs=LRS, target=None, **recipe):
    """(eval score, lr, race winner, steps spent, depth maps of the winner) of
    `pipeline.run` (extra `recipe` keys, e.g. batch_size), lr tuned alike
    (`common.recipe_lr_tuned`); score: eval accuracy unless given. `small`
    None with `target` (widths): the recipe without an anchor."""
    from otcompress import pipeline
    from otcompress.finetune import evaluate
    score = score or (lambda m: evaluate(m, data)["accuracy"])
    value, lr, rep = common.recipe_lr_tuned(small, parents, {"finetune_steps": n, "seed": seed, **recipe}, train,
                                            holdout, lrs, score, target=target)
    return (value, lr, rep["race"]["winner"], pipeline.steps_spent(rep),
            [d for d in rep.get("depth_maps") or [] if d])


def run_target(target, args, data):
    from otcompress import pipeline
    parents, small, cfg = models(target, args.quick)
    rows, notes = {}, {"lr": {}, "winner": [], "depth_maps": [], "steps_spent": [], "pruned parent": []}
    for n in args.steps:
        for seed in args.seeds:
            t0 = time.time()
            train, holdout = pipeline.split_holdout(data, seed)
            acc, lr, winner, spent, dmaps = default_recipe(small, parents, train, holdout, data, n, seed)
            rows.setdefault(("default recipe", n), []).append(acc)
            notes["lr"].setdefault("default recipe", []).append(lr)
            notes["winner"].append(winner)
            notes["steps_spent"].append(spent)
            notes["depth_maps"].append([d["kept"] for d in dmaps])
            budget = spent  # equal compute: every step the recipe spent
            acc, lr, winner, _, dmaps = default_recipe(None, parents, train, holdout, data, budget, seed,
                                                       target={"layers": 2, **TARGETS[target]})
            rows.setdefault(("recipe, no anchor", n), []).append(acc)
            notes["lr"].setdefault("recipe, no anchor", []).append(f"{lr} ({winner})")
            source = best_parent(parents, holdout)
            notes["pruned parent"].append("AB"[source])
            for arm, make in starts(parents, small, cfg, train, seed, source).items():
                acc, lr = tuned(make, train, holdout, data, budget, seed, parents)
                rows.setdefault((arm, n), []).append(acc)
                notes["lr"].setdefault(arm, []).append(lr)
            common.log(f"  {target} N={n} seed {seed}: {time.time() - t0:.0f} s")
    return rows, notes


def markdown(results, args, env, seconds):
    lines = ["# Shallower and narrower: digits ViTs, 4 blocks x 64 -> 2 blocks", "",
             f"`python benchmarks/compress_depth.py{' --quick' if args.quick else ''}` — {seconds:.0f} s, "
             f"{args.threads} thread(s), seeds {args.seeds}; accuracy % on the 450 eval images, mean ± std "
             "[min–max]. Budget: the default recipe N steps plus its race's losing start where it ran one; "
             "every other arm the steps it spent on that seed. Learning rates chosen per arm and seed from "
             f"{list(LRS)} {common.LR_GRID_NOTE} on held-out train examples.", "",
             f"Machine: {env.get('cpu')}, torch {env.get('torch')}.",
             ""]
    for target, (rows, notes) in results.items():
        lines += [f"## target {target}: {TARGETS[target]}, 2 blocks", ""]
        steps = sorted({n for _, n in rows})
        arms = list(dict.fromkeys(a for a, _ in rows))
        table = [[a] + [common.fmt(common.summarize(rows.get((a, n), [])), 100, 2) for n in steps] for a in arms]
        lines += common.md_table(["arm", *[f"N = {n}" for n in steps]], table)
        lines += ["", f"The pruned parent (lowest held-out train loss, per seed): {notes['pruned parent']}.",
                  f"Race winners: {', '.join(notes['winner'])}; steps the default recipe spent: "
                  f"{notes['steps_spent']}.", f"Depth maps (kept blocks of each parent): {notes['depth_maps']}.",
                  "Learning rates chosen: " + "; ".join(f"{a}: {v}" for a, v in notes["lr"].items()), ""]
    return "\n".join(lines) + "\n"


def main(argv=None):
    args = parse_args(argv)
    common.set_threads(args.threads)
    common.quiet_libraries()
    env = common.environment(args.threads)
    if args.quick:
        args.seeds, args.steps = args.seeds[:1], [30]
    from otcompress.data import load_data
    from otcompress.zoo import digits_vit_config
    data = load_data("digits", digits_vit_config(hidden=16))
    t0 = time.time()
    results = {t: run_target(t, args, data) for t in args.targets}
    stem = args.stem or ("compress_depth.quick" if args.quick else "compress_depth")
    md = markdown(results, args, env, time.time() - t0)
    payload = {"environment": env, "results": {t: {"rows": {f"{a} | N={n}": v for (a, n), v in r.items()},
                                                   "notes": notes} for t, (r, notes) in results.items()}}
    common.write_results(stem, md, payload)
    print(md)


if __name__ == "__main__":
    main()
