"""Which depth merge wins: selection (the group's most influential block) or
parallel (the group's blocks side by side, their most important heads and
MLP units kept; otcompress.depth)? Digits ViTs: parents 4 blocks x hidden 64
(compress_depth's), targets 2 blocks x hidden 32 and x hidden 16; the
anchor-free fold (both parents) and prune (parent A) with each merge,
distilled B = 450 steps at the lr of compress_depth.LRS with the lowest
held-out train loss; accuracy on the 450 eval images; 3 seeds (data order,
held-out split, fold seeding). Threads: 1.

    python benchmarks/depth_merge_digits.py [--targets h32 h16] [--seeds 0 1 2]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common

common.prepare_environment()

BUDGET = 450


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--targets", nargs="+", default=["h32", "h16"])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--threads", type=int, default=1)
    return ap.parse_args(argv)


def run(targets, seeds) -> dict:
    """{"h32 fold select": [(one-shot, tuned accuracy, lr, kept blocks), ...], ...}"""
    import compress_depth as cdp
    import compress_digits as cd

    import otcompress
    from otcompress import pipeline
    from otcompress.data import load_data
    from otcompress.finetune import evaluate
    data = load_data("digits", cd._probe())
    rows = {}
    for target in targets:
        parents, small, cfg = cdp.models(target, False)
        for seed in seeds:
            t0 = time.time()
            train, holdout = pipeline.split_holdout(data, seed)
            calib = list(train.calibration_batches(256, 64, seed=seed))
            for align, ps in (("fold", parents), ("prune", parents[:1])):
                for merge in ("select", "parallel"):
                    def make(align=align, ps=ps, merge=merge):
                        return otcompress.fuse(cfg, ps, alignment=align, data=calib, seed=seed, depth_merge=merge)
                    m = make()
                    acc, lr = cdp.tuned(make, train, holdout, data, BUDGET, seed, parents)
                    rows.setdefault(f"{target} {align} {merge}", []).append(
                        (evaluate(m, data)["accuracy"], acc, lr, m.fusion_report["depth_maps"][0]["kept"]))
            common.log(f"  {target} seed {seed}: {time.time() - t0:.0f} s")
    return rows


def markdown(rows, seeds, threads, seconds, env) -> str:
    fmt = lambda v: common.fmt(common.summarize(v), 100, 2)  # noqa: E731
    table = [[k, fmt([r[0] for r in v]), fmt([r[1] for r in v]), ", ".join(str(r[3]) for r in v)]
             for k, v in rows.items()]
    return "\n".join([
        "# Depth merge: selection or parallel (digits ViTs, 4 -> 2 blocks)", "",
        f"`python benchmarks/depth_merge_digits.py` — {seconds:.0f} s, {threads} thread(s), seeds {seeds}, "
        f"{BUDGET} distillation steps per arm, lr tuned on held-out train examples; accuracy % on the "
        "450 eval images, mean ± std [min–max].", "",
        f"Machine: {env.get('cpu')}, torch {env.get('torch')}.", "",
        *common.md_table(["target, start, merge", "one-shot", f"+ {BUDGET} steps", "kept blocks"], table), ""]) + "\n"


def main(argv=None):
    args = parse_args(argv)
    common.set_threads(args.threads)
    common.quiet_libraries()
    env = common.environment(args.threads)
    t0 = time.time()
    rows = run(args.targets, args.seeds)
    md = markdown(rows, args.seeds, args.threads, time.time() - t0, env)
    common.write_results("depth_merge_digits", md, {"environment": env, "rows": rows})
    print(md)


if __name__ == "__main__":
    main()
