"""What depth mapping adds to a fusion: BERT-base-shaped models (hidden 768,
12 heads, FFN 3072, vocabulary 30522), random weights. A 12-block parent
into a 6-block anchor (OT, weights) and into a 6-block x 384 fold target,
against the same fusions of a 6-block parent (no depth map). Reports the
depth map's own time (`timings.depth_map` of the fusion report: block scores,
the assignment, the shallower model built on the meta device) and the total.

    python benchmarks/depth_speed.py [--threads 2] [--repeat 3]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common

common.prepare_environment()


def bert(layers, hidden=768, heads=12, inter=3072, seed=0):
    import torch
    import transformers as T
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        cfg = T.BertConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                           intermediate_size=inter)
        return T.BertModel(cfg).eval()


def timed(anchor, parent, repeat, **kw):
    import otcompress
    best = None
    for _ in range(repeat):
        t = time.perf_counter()
        report = otcompress.fuse(anchor, [parent], **kw).fusion_report
        wall = time.perf_counter() - t
        if best is None or wall < best[0]:
            best = (wall, report["timings"].get("depth_map", 0.0))
    return best


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args(argv)
    common.set_threads(args.threads)
    common.quiet_libraries()
    from otcompress.architectures import target_config
    deep, shallow, anchor = bert(12, seed=1), bert(6, seed=2), bert(6, hidden=384, heads=6, inter=1536, seed=3)
    rows = []
    cases = [("OT weights (sinkhorn) onto a 6-block x 384 anchor", anchor, {}),
             ("fold into 6 blocks x 384", target_config(deep.config, layers=6, hidden=384, heads=6,
                                                        intermediate=1536), {"alignment": "fold"})]
    for name, a, kw in cases:
        with_map, t_map = timed(a, deep, args.repeat, **kw)
        without, _ = timed(a, shallow, args.repeat, **kw)
        rows.append([name, f"{with_map:.2f}", f"{t_map:.3f}", f"{100 * t_map / with_map:.1f}%", f"{without:.2f}"])
        common.log(f"{name}: {rows[-1]}")
    md = "\n".join(["# Depth mapping cost (BERT-base-shaped, random weights)", "",
                    f"{args.threads} thread(s), best of {args.repeat}; load average at start "
                    f"{common.environment(args.threads)['loadavg_start']}.", "",
                    *common.md_table(["case", "12-block parent: total s", "depth map s", "share",
                                      "6-block parent: total s"], rows)]) + "\n"
    common.write_results("depth_speed", md, {"rows": rows, "threads": args.threads})
    print(md)


if __name__ == "__main__":
    main()
