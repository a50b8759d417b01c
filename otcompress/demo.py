"""The built-in default job: ViTs trained here on scikit-learn digits (cached),
heterogeneous OT fusion of two wide parents into a narrow anchor, the same
finetuning budget spent on the honest alternatives, profiling and export."""
from __future__ import annotations

import time
from pathlib import Path

import torch

import otcompress
from otcompress import outputs
from otcompress.data import load_data
from otcompress.export import export_onnx
from otcompress.finetune import evaluate, finetune
from otcompress.profiling import profile_model
from otcompress.zoo import digits_vit

FULL = {"parent_hidden": 64, "anchor_hidden": 32, "layers": 4, "heads": 4, "epochs": 30}
QUICK = {"parent_hidden": 32, "anchor_hidden": 16, "layers": 2, "heads": 2, "epochs": 5}
# Anchor-heavy mixing: heterogeneous one-shot fusion with uniform weights falls
# below the anchor (benchmarks/results/vision_digits.md); reg is chosen on
# held-out *train* images, never on the eval split.
RECIPE = {"alignment": "weights", "solver": "sinkhorn", "reg": "auto", "residual": "average",
          "weights": [0.8, 0.1, 0.1]}


def run_demo(out: Path, *, steps=200, quick=False, threads=2, log=print, progress_factory=None) -> dict:
    torch.set_num_threads(threads)
    size = QUICK if quick else FULL
    steps = min(steps, 20) if quick else steps
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    log(f"training (or loading cached) digits ViTs: parents hidden {size['parent_hidden']}, "
        f"anchor hidden {size['anchor_hidden']}")
    parents = [_vit(size, size["parent_hidden"], seed) for seed in (0, 1)]
    anchor, anchor_path = _vit(size, size["anchor_hidden"], 2)
    data = load_data("digits", anchor)
    holdout = list(data.batches("train", 64, shuffle=True, seed=1, limit=256))
    parent_ms = [m for m, _ in parents]

    log("fusing (weights-based Sinkhorn, reg chosen on held-out train images)")
    fused = otcompress.fuse(anchor, parent_ms, data=holdout, **RECIPE)
    one_shot = evaluate(fused, data)["accuracy"]
    log(f"finetuning each candidate for {steps} steps")
    ft = dict(steps=steps, lr=1e-3, batch_size=64, seed=0)
    finetune(fused, data, **ft)
    anchor_ft = _copy(anchor)
    finetune(anchor_ft, data, **ft)
    distilled = _copy(anchor)
    finetune(distilled, data, teachers=parent_ms, **ft)

    rows_models = [("parent A", parent_ms[0]), ("parent B", parent_ms[1]), ("anchor", anchor),
                   (f"anchor + {steps} steps", anchor_ft), (f"anchor distilled {steps} steps", distilled),
                   ("OT-fused one-shot", None), (f"OT-fused + {steps} steps", fused)]
    log("profiling (1 thread, batch 1)")
    prof = {id(m): profile_model(m, repeats=20 if not quick else 5, threads=1, onnx=True)
            for m in (parent_ms[0], anchor)}
    rows = []
    for name, m in rows_models:
        acc = one_shot if m is None else evaluate(m, data)["accuracy"]
        p = prof[id(parent_ms[0])] if m is not None and m in parent_ms else prof[id(anchor)]
        rows.append([name, round(100 * acc, 2), p["parameters"], round(p["flops"]["flops"] / 1e6, 2),
                     round(p["latency_pytorch"]["median_ms"], 3), round(p["latency_onnx"]["median_ms"], 3)])

    with outputs.staged_dir(out, force=True) as tmp:
        fused.save_pretrained(tmp / "fused")
        onnx = export_onnx(fused, tmp / "fused.onnx")
        report = dict(fused.fusion_report, metrics={"one_shot_accuracy": one_shot},
                      recipe=RECIPE, finetune_steps=steps)
        outputs.write_json(tmp / "fusion_report.json", report)
    columns = ["model", "accuracy %", "params", "MFLOPs", "torch ms", "ORT ms"]
    log(f"wrote {out}/fused (from_pretrained) and {out}/fused.onnx "
        f"(ORT max abs diff {onnx['max_abs_diff']:.1e}); {time.time() - t0:.0f} s")
    return {"widths": {"a": size["anchor_hidden"], "p": size["parent_hidden"]}, "columns": columns,
            "rows": rows, "out": str(out), "anchor": str(anchor_path)}


def _vit(size, hidden, seed):
    return digits_vit(hidden=hidden, layers=size["layers"], heads=size["heads"], seed=seed,
                      epochs=size["epochs"])


def _copy(model):
    clone = type(model)(model.config)
    clone.load_state_dict(model.state_dict())
    return clone.eval()
