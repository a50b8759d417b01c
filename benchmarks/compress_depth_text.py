"""Shallower and narrower on text: does the tool's small model beat what a
compression user does to get one? Two cases on the pydoc corpus (the English
help texts of `pydoc_data.topics`, fixed 90/10 split, WordPiece vocabulary
2000 from `otcompress.zoo.pydoc_tokenizer`):

  bert   BERT masked-LMs (`zoo.pydoc_bert`): parents 4 blocks x hidden 64
         (4 heads, FFN 256; seeds 0 and 1, 600 steps) -> 2 blocks x hidden 32
         (2 heads, FFN 128); the small model is that shape trained 600 steps
         (seed 2). Metric: held-out masked-LM loss on the eval split (fixed
         masks; lower is better), masked-token accuracy beside it.
  llama  LLaMA causal LMs (`decoder_lm.trained_llama`: rotary, grouped-query
         attention, SwiGLU, RMSNorm): parents 8 blocks x hidden 64 (4 heads,
         2 key/value heads, MLP 128; seeds 1 and 2, 400 steps) -> 4 blocks x
         hidden 32 (2 heads, 1 key/value head, MLP 64; head width 16 in
         both); the small model is that shape trained 400 steps (seed 3).
         Metric: held-out next-token loss (perplexity beside it).
  llama-weak  the same with the small model trained 100 steps, not 400:
         parents with much to give it.

Arms (as benchmarks/compress_depth.py): every arm gets B = 1.5 N steps (the
default recipe's race spends N + N/2), the same distillation loop (AdamW,
batch 32, 0.5 task loss + 0.5 KL to both parents), its lr chosen from LRS by
the loss on held-out *train* examples; seeds change data order and held-out
split.

  default recipe     `pipeline.run` with the small model as anchor
  tool: fold         the parents folded into the target (depth-mapped), B steps
  tool: prune        the engine's alignment="prune" of the better parent
                     (lower held-out train loss), B steps
  every-other + W    blocks 0, 2, ... of that parent, width-pruned (L2), B steps
  ShortGPT + W       that parent's most influential blocks, width-pruned (L2 or
                     Taylor on 128 labelled paragraphs), B steps
  small + distil     the small model trained from scratch, B steps
  random + distil    a random initialisation of the target, B steps

W is Torch-Pruning for BERT. For LLaMA it is `pruning_control.magnitude_prune`
(whole key/value groups, MLP and residual units by the same L2 / Taylor group
scores, written with torch): Torch-Pruning 1.6.1 never finishes building
LLaMA's dependency groups under transformers 5.x. Threads: 1.

    python benchmarks/compress_depth_text.py --case bert [--quick]
    python benchmarks/compress_depth_text.py --case llama [--quick]
    python benchmarks/compress_depth_text.py --case llama-weak --steps 60
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common

common.prepare_environment()
import compress_depth  # noqa: E402

LRS = (1e-3, 3e-3)
BATCH = 32
CASES = {
    "bert": {"parents": dict(hidden=64, layers=4, heads=4), "parent_seeds": (0, 1), "small_seed": 2,
             "target": dict(layers=2, hidden=32, heads=2, intermediate=128), "train_steps": 600,
             "metrics": ("loss", "accuracy")},
    "llama": {"parents": dict(hidden=64, heads=4, kv=2, inter=128, layers=8), "parent_seeds": (1, 2), "small_seed": 3,
              "target": dict(layers=4, hidden=32, heads=2, kv_heads=1, intermediate=64), "train_steps": 400,
              "metrics": ("loss", "perplexity")},
}
# The LLaMA case with a weak small model (100 steps, not 400): parents with much to give.
CASES["llama-weak"] = {**CASES["llama"], "family": "llama", "small_steps": 100}


def family(case) -> str:
    return CASES[case].get("family", case)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--case", choices=list(CASES), required=True)
    ap.add_argument("--quick", action="store_true", help="one seed, N = 10: a smoke run")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=100, help="N (every arm trains 1.5 N)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--stem", default=None, help="results file name (default compress_depth_<case>[.quick])")
    ap.add_argument("--merge", nargs="+", default=None, metavar="STEM",
                    help="no run: join these result files (runs of other seeds, same settings) into --stem")
    return ap.parse_args(argv)


def models(case):
    """(parents, small model, target config, data) of a case; trained once, cached."""
    from otcompress.architectures import target_config
    from otcompress.data import load_data
    c = CASES[case]
    if case == "bert":
        from transformers import AutoTokenizer

        from otcompress.zoo import pydoc_bert
        parents = [pydoc_bert(**c["parents"], seed=s, steps=c["train_steps"])[0] for s in c["parent_seeds"]]
        t = c["target"]
        small, path = pydoc_bert(hidden=t["hidden"], layers=t["layers"], heads=t["heads"],
                                 intermediate=t["intermediate"], seed=c["small_seed"], steps=c["train_steps"])
        data = load_data("pydoc", small, tokenizer=AutoTokenizer.from_pretrained(path))
    else:
        import decoder_lm

        from otcompress import zoo
        tok, tok_path = zoo.pydoc_tokenizer(decoder_lm.VOCAB)
        parents = [decoder_lm.trained_llama(tok, tok_path, c["parents"], s, c["train_steps"], None)[0]
                   for s in c["parent_seeds"]]
        t = c["target"]
        narrow = dict(hidden=t["hidden"], heads=t["heads"], kv=t["kv_heads"], inter=t["intermediate"],
                      layers=t["layers"])
        small = decoder_lm.trained_llama(tok, tok_path, narrow, c["small_seed"], c.get("small_steps", c["train_steps"]),
                                         None)[0]
        data = load_data("pydoc", small, tokenizer=tok, max_length=decoder_lm.MAX_LEN)
    cfg = target_config(parents[0].config, **c["target"])
    for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size"):
        assert getattr(cfg, k) == getattr(small.config, k), k  # the small model has the target's shape
    return parents, small, cfg, data


def run_case(args, after_seed=lambda rows, notes: None):
    import pruning_control as pc
    from otcompress import pipeline
    from otcompress.finetune import evaluate
    parents, small, cfg, data = models(args.case)
    metrics = CASES[args.case]["metrics"]
    prune = pc.magnitude_prune if family(args.case) == "llama" else pc.torch_prune
    tag = "L2-group" if family(args.case) == "llama" else "TP"
    n = args.steps
    rows, notes = {}, {"lr": {}, "winner": [], "steps_spent": [], "winner_depth_maps": [], "tool_depth_maps": [],
                       "shortgpt_kept": [], "seconds": [], "reference": {}, "pruned parent": []}
    for name, m in [("parent A", parents[0]), ("parent B", parents[1]), ("small model (no steps)", small)]:
        notes["reference"][name] = {k: float(evaluate(m, data)[k]) for k in metrics}

    def score(m):
        out = evaluate(m, data)
        return {k: float(out[k]) for k in metrics}
    for seed in args.seeds:
        t0 = time.time()
        train, holdout = pipeline.split_holdout(data, seed)
        s, lr, winner, spent, dmaps = compress_depth.default_recipe(small, parents, train, holdout, data, n, seed,
                                                                    score=score, lrs=LRS, batch_size=BATCH)
        rows.setdefault("default recipe", []).append(s)
        notes["lr"].setdefault("default recipe", []).append(lr)
        notes["winner"].append(winner)
        notes["steps_spent"].append(spent)
        notes["winner_depth_maps"].append(dmaps)
        common.log(f"  {args.case} seed {seed} default recipe: {s} (lr {lr}, winner {winner}, {spent} steps)")
        budget = spent  # equal compute: every step the recipe spent on this seed
        calib = list(train.calibration_batches(256, BATCH, seed=seed))
        labelled = list(train.batches("train", BATCH, shuffle=True, seed=seed, limit=128))
        reports = {}
        source = compress_depth.best_parent(parents, holdout)
        notes["pruned parent"].append("AB"[source])
        arms = compress_depth.depth_arms(parents, small, cfg, calib, labelled, seed, prune=prune, tag=tag,
                                         engine_prune=True, reports=reports, source=source)
        for arm, make in arms.items():
            s, lr = common.lr_tuned(make, train, holdout, LRS, score, steps=budget, batch_size=BATCH, seed=seed,
                                    teachers=parents)
            rows.setdefault(arm, []).append(s)
            notes["lr"].setdefault(arm, []).append(lr)
            common.log(f"  {args.case} seed {seed} {arm}: {s} (lr {lr})")
        notes["tool_depth_maps"].append({k: v for k, v in reports.items() if k != "ShortGPT kept"})
        notes["shortgpt_kept"].append(reports["ShortGPT kept"])
        notes["seconds"].append(time.time() - t0)
        common.log(f"  {args.case} seed {seed}: {time.time() - t0:.0f} s, load {os.getloadavg()[0]:.1f}; depth maps: "
                   f"winner {notes['winner_depth_maps'][-1]}, tool {notes['tool_depth_maps'][-1]}, "
                   f"ShortGPT {reports['ShortGPT kept']}")
        after_seed(rows, notes)  # a partial result survives an interrupted run
    return rows, notes


def _maps(dmaps) -> str:
    return "; ".join(f"groups {d['groups']} kept {d['kept']} ({d['scored_from']}, {d['merge']})" for d in dmaps)


def markdown(args, rows, notes, env, seconds) -> str:
    c = CASES[args.case]
    key, other = c["metrics"]
    scale = 100 if other == "accuracy" else 1
    n = args.steps
    title = {"bert": "pydoc BERT masked-LMs, 4 blocks x 64 -> 2 blocks x 32",
             "llama": "pydoc LLaMA causal LMs (GQA), 8 blocks x 64 -> 4 blocks x 32"}[family(args.case)]
    if c.get("small_steps"):
        title += f", small model trained {c['small_steps']} steps"
    what = {"bert": "eval masked-LM loss (lower is better) and masked-token accuracy %",
            "llama": "eval next-token loss (lower is better) and perplexity"}[family(args.case)]
    L = [f"# Shallower and narrower on text: {title}", "",
         f"`python benchmarks/compress_depth_text.py --case {args.case}{' --quick' if args.quick else ''}` — "
         f"{seconds:.0f} s wall ({', '.join(f'{s:.0f}' for s in notes['seconds'])} s per seed), "
         f"{args.threads} thread(s) on a shared 2-core machine (load average {env['loadavg_start'][0]:.1f} at "
         f"start, {env['loadavg_end'][0]:.1f} at end), seeds {args.seeds}; N = {n}, every arm the steps the default recipe spent on "
         f"that seed ({notes['steps_spent']}: N plus its race's losing start where it ran one), batch {BATCH}, lr per arm and seed from "
         f"{list(LRS)} {common.LR_GRID_NOTE} on held-out train paragraphs. {what}, mean ± std [min–max].", "",
         f"Parents {c['parents']} (seeds {list(c['parent_seeds'])}), small model {c['target']} (seed "
         f"{c['small_seed']}), trained {c['train_steps']} and {c.get('small_steps', c['train_steps'])} steps. Machine: {env.get('cpu')}, torch "
         f"{env.get('torch')}, transformers {env.get('transformers')}.", "",
         "Before any step: " + "; ".join(f"{k} {v[key]:.3f}" for k, v in notes["reference"].items()) + ".", "",
         {"bert": "Width pruning of the controls: Torch-Pruning (the masked-LM head's transform follows the "
                  "embeddings' residual units, its decoder stays tied).",
          "llama": "Width pruning of the controls (\"L2-group\"): `pruning_control.magnitude_prune`, whole key/value "
                   "groups, MLP and residual units by L2 or Taylor group scores written with torch; Torch-Pruning "
                   "1.6.1 never finishes building LLaMA's dependency groups under transformers 5.x.",
          }[family(args.case)],
         ""]
    best = "default recipe"
    base = [r[key] for r in rows[best]]
    table = []
    for arm, vals in rows.items():
        a = [v[key] for v in vals]
        delta = common.summarize([x - b for x, b in zip(a, base)])  # + = the arm's loss is higher than the recipe's
        table.append([arm, common.fmt(common.summarize(a), 1, 3),
                      common.fmt(common.summarize([v[other] for v in vals]), scale, 2 if scale == 100 else 1),
                      "0" if arm == best else common.fmt(delta, 1, 3)])
    L += common.md_table(["arm", f"eval {key}", other + (" %" if scale == 100 else ""),
                          f"Δ {key} vs default recipe (paired; + = the arm is worse)"], table)
    L += ["", "Verdicts (lower loss is better; the spread is the larger std of the two arms):", ""]
    for tool in ("default recipe", "tool: fold (no anchor)"):
        for arm, vals in rows.items():
            if arm == tool or arm.startswith("tool") or arm == "default recipe":
                continue
            r = common.compare([v[key] for v in rows[tool]], [v[key] for v in vals], higher_better=False)
            imp = r["improvement"]
            word = ("better by more than the spread" if imp["mean"] > r["spread"] else
                    "worse by more than the spread" if imp["mean"] < -r["spread"] else "within the spread")
            L.append(f"- {tool} vs {arm}: {imp['mean']:+.3f} (per seed "
                     f"{', '.join(f'{v:+.3f}' for v in imp['values'])}; spread {r['spread']:.3f}) -> **{word}**")
    L += ["", f"Race winners: {notes['winner']}; steps the default recipe spent: {notes['steps_spent']}.", "",
          f"The parent the controls and the tool's prune arms start from (lowest held-out train loss, per seed): "
          f"{notes.get('pruned parent', ['A'] * len(notes['winner']))}.", ""]
    L += ["Depth maps (target block j <- parent blocks groups[j], of which kept[j] is used):", ""]
    for seed, w, t, sg in zip(args.seeds, notes["winner_depth_maps"], notes["tool_depth_maps"],
                              notes["shortgpt_kept"]):
        L.append(f"- seed {seed}: race winner: {_maps(w) or 'the anchor (the small model: already at the target depth)'}; "
                 + "; ".join(f"tool {k}: {_maps(v)}" for k, v in t.items())
                 + f"; ShortGPT kept {sg}")
    L += ["", "Learning rates chosen: " + "; ".join(f"{a}: {v}" for a, v in notes["lr"].items()), ""]
    return "\n".join(L) + "\n"


def merge(args, env):
    """One result from runs of other seeds (each with its own --stem)."""
    import json
    parts = [json.loads((common.RESULTS / f"{s}.json").read_text()) for s in args.merge]
    if len({(p["steps"], p["case"]["train_steps"]) for p in parts}) != 1:
        raise SystemExit("the runs to merge differ in N or models")
    rows, notes = {}, {}
    for p in parts:
        for arm, vals in p["rows"].items():
            rows.setdefault(arm, []).extend(vals)
        for k, v in p["notes"].items():
            if k == "lr":
                for arm, lrs in v.items():
                    notes.setdefault("lr", {}).setdefault(arm, []).extend(lrs)
            elif k == "reference":
                notes[k] = v
            else:
                notes.setdefault(k, []).extend(v)
    for p in parts:  # runs written before results named their seeds ran the default ones
        p.setdefault("seeds", [0, 1, 2][:len(p["notes"]["seconds"])])
    args.seeds, args.steps = [s for p in parts for s in p["seeds"]], parts[0]["steps"]
    args.quick = False
    env = {**parts[0]["environment"], "loadavg_end": parts[-1]["environment"]["loadavg_end"],
           "merged_from": args.merge}
    md = markdown(args, rows, notes, env, sum(notes["seconds"]))
    if len(parts) > 1:
        md = md.replace(" wall (", " summed over the merged runs (", 1)
        md += f"\nMerged from the runs {args.merge} (one process per seed, side by side).\n"
    common.write_results(args.stem or f"compress_depth_{args.case}", md,
                         {**parts[0], "environment": env, "seeds": args.seeds, "rows": rows, "notes": notes})
    print(md)


def main(argv=None):
    args = parse_args(argv)
    common.set_threads(args.threads)
    common.quiet_libraries()
    env = common.environment(args.threads)
    if args.quick:
        args.seeds, args.steps = args.seeds[:1], 10
    if args.merge:
        return merge(args, env)
    t0 = time.time()
    stem = args.stem or f"compress_depth_{args.case}" + (".quick" if args.quick else "")

    def write(rows, notes):
        env["loadavg_end"] = os.getloadavg()
        done = argparse.Namespace(**{**vars(args), "seeds": args.seeds[:len(notes["seconds"])]})
        md = markdown(done, rows, notes, env, time.time() - t0)
        common.write_results(stem, md, {"environment": env, "case": CASES[args.case], "seeds": done.seeds,
                                        "steps": args.steps, "budget": notes["steps_spent"], "lrs": LRS,
                                        "batch_size": BATCH, "rows": rows, "notes": notes})
        return md
    rows, notes = run_case(args, write)
    print(write(rows, notes))


if __name__ == "__main__":
    main()
