"""The same question on text: small BERT masked-LMs on the pydoc corpus
(English help texts of the standard library, 10% held out; the table reports
held-out MLM loss, lower is better). Parents hidden 64 (2 layers, 1500 steps,
the zoo's), targets hidden 32:
  weak-anchor   the h32 model trained 300 steps
  good-anchor   the h32 model trained 1500 steps (like the parents)
Arms and protocol as benchmarks/compress_digits.py (AdamW 1e-3, batch 64;
seeds change the finetuning order and held-out split). Threads: 1.

    python benchmarks/compress_text.py
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common

common.prepare_environment()
import compress_digits  # noqa: E402


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--steps", type=int, nargs="+", default=[30, 100, 300])
    ap.add_argument("--settings", nargs="+", default=["weak-anchor", "good-anchor"])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--stem", default="compress_text", help="Results file name.")
    return ap.parse_args(argv)


def mlm_loss(model, data):
    from otcompress.finetune import evaluate
    return evaluate(model, data)["loss"]


def main(argv=None):
    args = parse_args(argv)
    common.set_threads(args.threads)
    common.quiet_libraries()
    from transformers import AutoTokenizer

    from otcompress.data import load_data
    from otcompress.zoo import pydoc_bert
    env = common.environment(args.threads)
    t0 = time.time()
    parents = [pydoc_bert(hidden=64, seed=s)[0] for s in (0, 1)]
    results = {}
    for name in args.settings:
        common.log(f"setting {name}")
        anchor, path = pydoc_bert(hidden=32, seed=2, steps=300 if name == "weak-anchor" else 1500)
        data = load_data("pydoc", anchor, tokenizer=AutoTokenizer.from_pretrained(path))
        results[name] = compress_digits.run_arms(anchor, parents, data, args.seeds, args.steps, mlm_loss)
    md = compress_digits.markdown(results, args, env, time.time() - t0,
                                  title="Small models that beat the alternatives: pydoc BERT masked-LMs",
                                  command="python benchmarks/compress_text.py",
                                  what="held-out MLM loss (lower is better)", unit="MLM loss", scale=1,
                                  digits=3)
    common.write_results(args.stem, md, {"environment": env, "results": results, "seeds": args.seeds})
    print(md)


if __name__ == "__main__":
    main()
