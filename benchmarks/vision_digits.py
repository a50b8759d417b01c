"""Does OT fusion beat the honest alternatives? Vision: small ViTs on the
real scikit-learn digits (1,797 8x8 images, fixed stratified 75/25 split from
otcompress.data; accuracy on the 450 eval images).

Two tables (docs/benchmarks.md):
  homogeneous    K = 2 and 4 independently trained parents of one width
                 (hidden 64); parents, ensemble, vanilla fusion, OT
                 weights-/activations-based (all tokens, window_2 = the
                 centre 2x2 of the 4x4 patch grid, only_cls), EMD; one-shot
                 and after the same N finetuning steps.
  heterogeneous  anchor hidden 32 + parents hidden 64 and 96 (same depth):
                 anchor; anchor + N steps; anchor distilled from the parents
                 N steps; OT-fused one-shot and + N steps; with parameters,
                 FLOPs and CPU latency of each width; over several seeds (the
                 seed changes the anchor, the parents and the batch order).
and the Sinkhorn regulariser sweep (one-shot accuracy against reg, EMD as a
separate point): results/reg_sweep_vision.png.

Every Sinkhorn regulariser is chosen per seed as the one with the lowest loss
on held-out *train* batches (what `fuse(reg="auto")` does), never on the eval
split. The heterogeneous anchor weight (default 0.8) is fixed in advance: it
was picked from exploratory runs on seed 0 that looked at the eval split (see
the results file).

    python benchmarks/vision_digits.py            # full run (first run trains the zoo)
    python benchmarks/vision_digits.py --quick    # smoke run, about a minute

Writes benchmarks/results/vision_digits.md/.json and reg_sweep_vision.png
(vision_digits.quick.* and reg_sweep_vision.quick.png with --quick).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common

common.prepare_environment()  # before torch is imported


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
                    help="seed groups per homogeneous table (default 3)")
    ap.add_argument("--anchor-weight", type=float, default=0.8,
                    help="heterogeneous mixing weight of the anchor (parents share the rest)")
    ap.add_argument("--epochs", type=int, default=None, help="zoo training epochs (default 30)")
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
    layers, heads = (2, 2) if q else (4, 4)
    epochs = args.epochs or (10 if q else 30)
    anchor_h, parent_hs, homo_h = (16, [32, 48], 32) if q else (32, [64, 96], 64)
    seeds = args.seeds or ([0, 1] if q else [0, 1, 2])
    n_groups = args.homo_groups or (1 if q else 3)
    pool = list(range(max(4, 2 * n_groups)))  # homogeneous parent seeds, rotated per group
    homo_groups = {2: [tuple(pool[2 * g:2 * g + 2]) for g in range(n_groups)],
                   4: [tuple((pool * 2)[2 * g:2 * g + 4]) for g in range(n_groups)]}
    zoo_log = {}

    def make(hidden, seed):
        t = time.perf_counter()
        model, path = zoo.digits_vit(hidden=hidden, layers=layers, heads=heads, seed=seed,
                                     epochs=epochs, cache_dir=args.cache_dir)
        info = zoo.zoo_info(path)
        zoo_log[f"h{hidden}-s{seed}"] = {"path": str(path), "eval": info["eval"],
                                         "train_s": info["seconds"],
                                         "loaded_s": time.perf_counter() - t}
        return model, path

    def describe(hidden):
        return f"ViT h{hidden}, {layers} layers, {heads} heads, FFN {2 * hidden}"

    t = time.perf_counter()
    common.log(f"[vision_digits] zoo models (layers {layers}, {epochs} epochs) ...")
    needed = {(homo_h, s) for g in homo_groups.values() for grp in g for s in grp}
    needed |= {(h, s) for s in seeds for h in [anchor_h, *parent_hs]}
    first = None
    setup = None
    for h, s in sorted(needed):
        m, _ = make(h, s)
        first = first or m
    data = load_data("digits", first)
    setup = common.Setup(
        name="vision_digits", title="ViTs on scikit-learn digits", data=data, make=make,
        describe=describe,
        metrics=[("accuracy", 100.0, 1, "accuracy %", True), ("loss", 1.0, 3, "eval loss", False)],
        steps=args.steps or (20 if q else 200), lr=args.lr, batch_size=args.batch_size,
        grid=common.REG_GRID_QUICK if q else common.REG_GRID,
        calib_samples=64 if q else 256, holdout_examples=128 if q else 512,
        homo_hidden=homo_h, homo_groups=homo_groups,
        token_filters=["window_2", "only_cls"],
        anchor_hidden=anchor_h, parent_hiddens=parent_hs, hetero_seeds=seeds,
        anchor_weight=args.anchor_weight)
    clock.phase("zoo (train or load)", t)
    common.log(f"  {len(needed)} models ready in {time.perf_counter() - t:.0f} s")

    common.log(f"[vision_digits] heterogeneous, seeds {seeds}, N = {setup.steps} ...")
    het = common.run_heterogeneous(setup, clock)
    common.log(f"[vision_digits] homogeneous, groups {homo_groups} ...")
    homo = common.run_homogeneous(setup, clock)

    t = time.perf_counter()
    common.log("[vision_digits] cost of each width ...")
    costs = common.profile_widths(
        {describe(h): setup.get(h, seeds[0]) for h in [anchor_h, *parent_hs]},
        threads=1, repeats=10 if q else 50, onnx=not args.no_onnx)
    clock.phase("profiling", t)

    suffix = ".quick" if q else ""
    panels = common.reg_sweep_panels(setup, homo, het, "accuracy", 100.0)
    png = common.RESULTS / f"reg_sweep_vision{suffix}.png"
    common.plot_reg_sweep(png, panels, ylabel="one-shot eval accuracy %", higher_better=True,
                          suptitle="Digits ViTs: one-shot accuracy of OT fusion against the "
                                   "Sinkhorn regulariser (paper fig. 5a on our data)")
    env["loadavg_end"] = __import__("os").getloadavg()
    env["wall_s"] = clock.total()
    env["phases_s"] = clock.phases
    payload = {"benchmark": "vision_digits", "quick": q, "environment": env,
               "protocol": protocol(setup, layers, heads, epochs), "zoo": zoo_log,
               "heterogeneous": het, "homogeneous": homo, "costs": costs,
               "reg_sweep_png": png.name}
    md = render(setup, payload, panels, png.name)
    mdp, jsp = common.write_results(f"vision_digits{suffix}", md, payload)
    print()
    print(md)
    common.log(f"wrote {mdp}, {jsp}, {png} in {clock.total():.0f} s")
    return 0


def protocol(setup, layers, heads, epochs):
    return {"data": "scikit-learn digits, otcompress.data fixed stratified split (1347 train / "
                    "450 eval)", "layers": layers, "heads": heads, "patch": 2,
            "zoo_epochs": epochs, "finetune_steps": setup.steps, "lr": setup.lr,
            "batch_size": setup.batch_size, "warmup": 0.1, "schedule": "linear warm-up, cosine",
            "kd_alpha": setup.kd_alpha, "kd_temperature": setup.kd_temperature,
            "reg_grid": list(setup.grid), "reg_selection": "lowest task loss on held-out train "
            "batches (= fuse(reg='auto')), per seed", "calibration_samples": setup.calib_samples,
            "holdout_examples": setup.holdout_examples, "anchor_weight": setup.anchor_weight,
            "homogeneous_groups": {k: [list(g) for g in v] for k, v in setup.homo_groups.items()},
            "heterogeneous_seeds": setup.hetero_seeds, "anchor_hidden": setup.anchor_hidden,
            "parent_hiddens": setup.parent_hiddens, "homo_hidden": setup.homo_hidden}


def render(setup, payload, panels, png_name):
    return common.render(
        setup, payload, panels, png_name,
        command=f"python benchmarks/vision_digits.py{' --quick' if payload['quick'] else ''}",
        data_line="Data: scikit-learn digits, the fixed stratified split of `otcompress.data` "
                  "(1,347 train, 450 eval images; one eval image = 0.22 accuracy points). Models "
                  f"from `otcompress.zoo.digits_vit` ({payload['protocol']['layers']} layers, "
                  f"patch 2, AdamW one-cycle, {payload['protocol']['zoo_epochs']} epochs; cached).",
        homo_note="The first parent of each group is the anchor; uniform mixing weights. "
                  "\"+ N\" = the same finetuning as above, from each fused model (and from parent "
                  "1 alone, the control). window_2 = the centre 2x2 patches of the 4x4 grid; "
                  "only_cls = the class token only. The 4-parent groups overlap (rotations "
                  "of seeds 0-5), so their spread is not from independent draws.",
        sweep_label="accuracy %",
        notes=[
            ("The anchor weight 0.8 of the heterogeneous table was chosen from exploratory runs "
             "on seed 0 (anchor h32 seed 0, parents h64 seeds 0 and 1) that read the eval split: "
             "uniform weights collapse one-shot (26-44%), 0.8-0.9 keep most of the anchor's "
             "function (91-95% one-shot), and after 200 steps every setting (anchor weight "
             "0.5-0.9, residual average/scalar, lr 1e-3/2e-3) landed at 95-96%, like the anchor "
             "alone. It is a fixed choice, not tuned per seed. A one-shot held-out loss cannot "
             "choose it: it always prefers more anchor, down to the anchor itself."),
            "The regulariser is never chosen on the eval split.",
            ("The statistics-repair rows use the engine's `fuse(repair=True)`: every linear "
             "layer's output units get the mean/std of the anchor's and the parents' units "
             "(carried through the maps, mixed by the fusion weights) on the calibration "
             "images, layer by layer. Results from the earlier anchor-only prototype (seed 0, "
             "eval split read, not part of this run): one-shot 34 -> 77% at anchor weight "
             "1/3, 56 -> 90% at 0.5, 93.1 -> 94.4% at 0.8 (anchor 93.8%); after 200 steps "
             "every variant was 95.1-95.8%, like the anchor + 200 steps (95.6%)."),
        ])


if __name__ == "__main__":
    sys.exit(main())
