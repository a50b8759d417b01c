"""How soft do the transport maps get? Map entropy against reg, on trained
models (the zoo's): two digits ViTs (hidden 64, 97%) and two pydoc BERT
masked-LMs (hidden 64), each pair fused weights-based at every reg of a grid,
with both cost normalisations. Per fusion: the mean and the largest relative
entropy (entropy / log(m n): ~0.5 is a hard map, 1.0 the flat map), how many
maps went nearly uniform (> 0.9), the one-shot metric, and self-fusion's
largest output change (the model fused with itself; 0 = returned exactly).
Threads: 1.

    python benchmarks/map_entropy.py
"""
from __future__ import annotations

import statistics
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common

common.prepare_environment()
REGS = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2)


def entropies(report):
    return [st["relative_entropy"] for maps in report["transport_maps"] for st in maps.values()
            if "relative_entropy" in st]


def main():
    import torch
    from transformers import AutoTokenizer

    import otcompress
    from otcompress.data import load_data
    from otcompress.finetune import evaluate
    from otcompress.zoo import digits_vit, pydoc_bert
    common.set_threads(1)
    common.quiet_libraries()
    warnings.filterwarnings("ignore")
    env = common.environment(1)
    t0 = time.time()
    (a, _), (b, _) = digits_vit(hidden=64, seed=0), digits_vit(hidden=64, seed=1)
    (c, path), (d, _) = pydoc_bert(hidden=64, seed=0), pydoc_bert(hidden=64, seed=1)
    cases = [("digits ViT h64 pair", a, b, load_data("digits", a), "accuracy", 100),
             ("pydoc BERT h64 pair", c, d, load_data("pydoc", c, tokenizer=AutoTokenizer.from_pretrained(path)),
              "loss", 1)]
    rows = []
    for name, m1, m2, data, metric, scale in cases:
        x = {k: v for k, v in next(data.batches("eval", 64)).items() if k != "labels"}
        with torch.no_grad():
            ref = m1(**x).logits
        for norm in ("max", "gap"):
            for reg in REGS:
                fused = otcompress.fuse(m1, [m2], reg=reg, cost_norm=norm, on_unconverged="warn")
                self_fused = otcompress.fuse(m1, [m1], reg=reg, cost_norm=norm, on_unconverged="warn")
                with torch.no_grad():
                    moved = float((self_fused(**x).logits - ref).abs().max())
                ent = entropies(fused.fusion_report)
                rows.append([name, norm, reg, f"{statistics.fmean(ent):.3f}", f"{max(ent):.3f}",
                             sum(e > 0.9 for e in ent), len(ent),
                             f"{evaluate(fused, data)[metric] * scale:.3f}", f"{moved:.4f}"])
                common.log("  " + " | ".join(str(v) for v in rows[-1]))
    md = ["# Map entropy against reg (trained models)", "",
          f"`python benchmarks/map_entropy.py` — {time.time() - t0:.0f} s, 1 thread; {env.get('cpu')}.", "",
          "Weights-based Sinkhorn, parent 2 fused into parent 1 (uniform weights). Relative entropy = "
          "entropy / log(m n) per solved map (~0.5 hard, 1.0 flat). `self-fusion max |dlogit|`: parent 1 "
          "fused with itself at the same settings, largest logit change on 64 eval examples.", ""]
    md += common.md_table(["pair", "cost norm", "reg", "mean rel. entropy", "max rel. entropy",
                           "maps > 0.9", "maps", "one-shot metric (acc % / MLM loss)",
                           "self-fusion max |dlogit|"], rows)
    common.write_results("map_entropy", "\n".join(md) + "\n", {"environment": env, "rows": rows})
    print("\n".join(md))


if __name__ == "__main__":
    main()
