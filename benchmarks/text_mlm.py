"""Does OT fusion beat the honest alternatives? Text: small BERT masked-LMs
trained here on the offline pydoc corpus (the English help texts of
`pydoc_data.topics`, one example per paragraph, fixed 90/10 split from
otcompress.data) with a WordPiece tokenizer trained locally; the metric is
the held-out masked-LM loss (fixed eval masks; lower is better).

The same two tables as vision_digits.py (docs/benchmarks.md):
  homogeneous    K = 2 and 4 independently trained parents of one width
                 (hidden 64): parents, ensemble, vanilla fusion, OT weights-
                 and activations-based, EMD; one-shot and after N steps.
  heterogeneous  anchor hidden 32 + parents hidden 64 and 96 (same depth):
                 anchor; anchor + N steps; anchor distilled from the parents
                 N steps; OT-fused one-shot and + N steps; parameters, FLOPs,
                 CPU latency of each width; over several seeds.
and the Sinkhorn regulariser sweep (one-shot eval loss against reg, EMD as a
separate point): results/reg_sweep_text.png.

Regularisers are chosen per seed on held-out *train* batches (as
`fuse(reg="auto")`), never on the eval split; the heterogeneous anchor weight
is fixed in advance (default 0.8, as for vision).

    python benchmarks/text_mlm.py            # full run (first run trains the zoo)
    python benchmarks/text_mlm.py --quick    # smoke run

Writes benchmarks/results/text_mlm.md/.json and reg_sweep_text.png
(text_mlm.quick.* and reg_sweep_text.quick.png with --quick).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common

common.prepare_environment()  # before torch is imported

VOCAB = 2000


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny models and budgets: a smoke run")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    ap.add_argument("--steps", type=int, default=None, help="finetuning budget N (default 200)")
    ap.add_argument("--lr", type=float, default=1e-3, help="finetuning lr, every arm (1e-3)")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--seeds", type=int, nargs="+", default=None,
                    help="heterogeneous seeds (default 0 1 2)")
    ap.add_argument("--homo-groups", type=int, default=None,
                    help="seed groups per homogeneous table (default 2)")
    ap.add_argument("--anchor-weight", type=float, default=0.8,
                    help="heterogeneous mixing weight of the anchor (parents share the rest)")
    ap.add_argument("--train-steps", type=int, default=None,
                    help="zoo training steps of every model (default 1500)")
    ap.add_argument("--no-onnx", action="store_true", help="skip ONNX Runtime latency")
    ap.add_argument("--cache-dir", default=None, help="zoo cache (default ~/.cache/otcompress/zoo)")
    return ap.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    common.set_threads(args.threads)
    common.quiet_libraries()
    from otcompress import zoo
    from otcompress.data import load_data

    clock = common.Clock()
    env = common.environment(args.threads)
    q = args.quick
    layers, heads = (1, 2) if q else (2, 4)
    train_steps = args.train_steps or (150 if q else 1500)
    anchor_h, parent_hs, homo_h = (16, [32, 48], 32) if q else (32, [64, 96], 64)
    seeds = args.seeds or ([0, 1] if q else [0, 1, 2])
    n_groups = args.homo_groups or (1 if q else 2)
    pool = list(range(max(4, 2 * n_groups)))  # homogeneous parent seeds, rotated per group
    homo_groups = {2: [tuple(pool[2 * g:2 * g + 2]) for g in range(n_groups)],
                   4: [tuple((pool * 2)[2 * g:2 * g + 4]) for g in range(n_groups)]}
    zoo_log = {}

    def make(hidden, seed):
        t = time.perf_counter()
        model, path = zoo.pydoc_bert(hidden=hidden, layers=layers, heads=heads, vocab_size=VOCAB,
                                     seed=seed, steps=train_steps, cache_dir=args.cache_dir)
        info = zoo.zoo_info(path)
        zoo_log[f"h{hidden}-s{seed}"] = {"path": str(path), "eval": info["eval"],
                                         "train_s": info["seconds"],
                                         "loaded_s": time.perf_counter() - t}
        return model, path

    def describe(hidden):
        return f"BERT h{hidden}, {layers} layers, {heads} heads, FFN {4 * hidden}"

    t = time.perf_counter()
    common.log(f"[text_mlm] zoo models (layers {layers}, {train_steps} steps each) ...")
    needed = {(homo_h, s) for g in homo_groups.values() for grp in g for s in grp}
    needed |= {(h, s) for s in seeds for h in [anchor_h, *parent_hs]}
    for h, s in sorted(needed):
        t_m = time.perf_counter()
        make(h, s)
        common.log(f"  h{h} seed {s}: {time.perf_counter() - t_m:.0f} s")
    tokenizer, _ = zoo.pydoc_tokenizer(VOCAB, args.cache_dir)
    first = make(anchor_h, seeds[0])[0]
    data = load_data("pydoc", first, tokenizer=tokenizer)
    setup = common.Setup(
        name="text_mlm", title="BERT masked-LMs on the pydoc corpus", data=data, make=make,
        describe=describe,
        metrics=[("loss", 1.0, 3, "eval MLM loss", False),
                 ("accuracy", 100.0, 1, "masked-token accuracy %", True)],
        steps=args.steps or (20 if q else 200), lr=args.lr, batch_size=args.batch_size,
        grid=common.REG_GRID_QUICK if q else common.REG_GRID,
        calib_samples=64 if q else 256, holdout_examples=128 if q else 512,
        homo_hidden=homo_h, homo_groups=homo_groups, token_filters=[],
        anchor_hidden=anchor_h, parent_hiddens=parent_hs, hetero_seeds=seeds,
        anchor_weight=args.anchor_weight)
    clock.phase("zoo (train or load)", t)
    common.log(f"  {len(needed)} models ready in {time.perf_counter() - t:.0f} s")

    common.log(f"[text_mlm] heterogeneous, seeds {seeds}, N = {setup.steps} ...")
    het = common.run_heterogeneous(setup, clock)
    common.log(f"[text_mlm] homogeneous, groups {homo_groups} ...")
    homo = common.run_homogeneous(setup, clock)

    t = time.perf_counter()
    common.log("[text_mlm] cost of each width ...")
    costs = common.profile_widths(
        {describe(h): setup.get(h, seeds[0]) for h in [anchor_h, *parent_hs]},
        threads=1, repeats=10 if q else 30, onnx=not args.no_onnx, seq_len=128)
    clock.phase("profiling", t)

    suffix = ".quick" if q else ""
    panels = common.reg_sweep_panels(setup, homo, het, "loss", 1.0)
    png = common.RESULTS / f"reg_sweep_text{suffix}.png"
    common.plot_reg_sweep(png, panels, ylabel="one-shot eval MLM loss", higher_better=False,
                          suptitle="pydoc BERT masked-LMs: one-shot eval loss of OT fusion against "
                                   "the Sinkhorn regulariser (paper fig. 5a on our data)")
    env["loadavg_end"] = os.getloadavg()
    env["wall_s"] = clock.total()
    env["phases_s"] = clock.phases
    payload = {"benchmark": "text_mlm", "quick": q, "environment": env,
               "protocol": protocol(setup, layers, heads, train_steps), "zoo": zoo_log,
               "heterogeneous": het, "homogeneous": homo, "costs": costs,
               "reg_sweep_png": png.name}
    md = render(setup, payload, panels, png.name)
    mdp, jsp = common.write_results(f"text_mlm{suffix}", md, payload)
    print()
    print(md)
    common.log(f"wrote {mdp}, {jsp}, {png} in {clock.total():.0f} s")
    return 0


def protocol(setup, layers, heads, train_steps):
    d = setup.data
    return {"data": "pydoc_data.topics paragraphs (>= 3 words), otcompress.data fixed 90/10 "
                    "split, 15% BERT masking, fixed eval masks",
            "train_examples": d.num_examples("train"), "eval_examples": d.num_examples("eval"),
            "eval_masked_tokens": int((d._eval_mlm[1] != -100).sum()) if d._eval_mlm else None,
            "vocab": VOCAB, "layers": layers, "heads": heads, "zoo_steps": train_steps,
            "finetune_steps": setup.steps, "lr": setup.lr, "batch_size": setup.batch_size,
            "warmup": 0.1, "schedule": "linear warm-up, cosine", "kd_alpha": setup.kd_alpha,
            "kd_temperature": setup.kd_temperature, "reg_grid": list(setup.grid),
            "reg_selection": "lowest masked-LM loss on held-out train batches "
                             "(= fuse(reg='auto')), per seed",
            "calibration_samples": setup.calib_samples,
            "holdout_examples": setup.holdout_examples, "anchor_weight": setup.anchor_weight,
            "homogeneous_groups": {k: [list(g) for g in v] for k, v in setup.homo_groups.items()},
            "heterogeneous_seeds": setup.hetero_seeds, "anchor_hidden": setup.anchor_hidden,
            "parent_hiddens": setup.parent_hiddens, "homo_hidden": setup.homo_hidden}


def render(setup, payload, panels, png_name):
    p = payload["protocol"]
    return common.render(
        setup, payload, panels, png_name,
        command=f"python benchmarks/text_mlm.py{' --quick' if payload['quick'] else ''}",
        data_line=(f"Data: the pydoc help-text paragraphs, fixed split of `otcompress.data` "
                   f"({p['train_examples']} train / {p['eval_examples']} eval paragraphs; "
                   f"{p['eval_masked_tokens']} masked eval tokens, fixed masks, so every model "
                   "is scored on the same tokens). Tokenizer: WordPiece, vocabulary "
                   f"{VOCAB}, trained locally on the train split. Models from "
                   f"`otcompress.zoo.pydoc_bert` ({p['layers']} layers, AdamW 2e-3, warm-up + "
                   f"cosine, {p['zoo_steps']} steps of batch 64; cached)."),
        homo_note=("The first parent of each group is the anchor; uniform mixing weights. "
                   "\"+ N\" = the same finetuning as above, from each fused model (and from "
                   "parent 1 alone, the control). Token filters do not apply to text. The "
                   "4-parent groups are the same four models (seeds 0-3) with a different "
                   "anchor, so their spread is not from independent draws."),
        sweep_label="eval MLM loss (lower is better)",
        notes=[
            ("The anchor weight 0.8 of the heterogeneous table is the one fixed for the vision "
             "benchmark (chosen there from exploratory runs on seed 0); it was not tuned on "
             "this corpus."),
            "The regulariser is never chosen on the eval split.",
            ("Exploration on seed 0 that read the eval split (not part of this run): most of "
             "the one-shot loss of heterogeneous fusion sits in the masked-LM head. Putting the "
             "anchor's `cls.predictions.*` tensors (transform dense + LayerNorm, vocabulary "
             "bias) back into the fused model gives one-shot 5.186 -> 5.132 (anchor 5.117) at "
             "anchor weight 0.8 and 5.480 -> 5.245 at 0.5, and after 200 steps 5.123 -> 5.100 "
             "(0.8) and 5.187 -> 5.111 (0.5), against anchor + 200 steps 5.096: it closes the "
             "gap, it does not open a lead. Taking the anchor's embeddings instead gives 5.147, "
             "either encoder layer 5.166-5.178. The REPAIR-style correction of Linear outputs "
             "barely moves BERT's loss (5.186 -> 5.182): post-LN LayerNorms already "
             "renormalise every block. The anchor finetuned 200 steps at lr 3e-3 reaches "
             "5.081: these pydoc models are still under-trained (1,500 steps), so a short "
             "budget rewards plain further training of the anchor."),
        ])


if __name__ == "__main__":
    sys.exit(main())
