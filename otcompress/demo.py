"""The built-in default job: ViTs trained here on scikit-learn digits (cached),
two wide parents compressed into a small model with the default recipe, the
same finetuning budget spent on the honest alternatives, profiling and export."""
from __future__ import annotations

import time
from contextlib import nullcontext
from pathlib import Path

import torch

from otcompress import outputs, pipeline
from otcompress.data import load_data
from otcompress.export import export_onnx
from otcompress.finetune import evaluate, finetune
from otcompress.profiling import profile_model
from otcompress.zoo import digits_vit

FULL = {"parent_hidden": 64, "anchor_hidden": 16, "layers": 4, "heads": 4, "epochs": 30, "anchor_epochs": 20}
QUICK = {"parent_hidden": 32, "anchor_hidden": 16, "layers": 2, "heads": 2, "epochs": 5, "anchor_epochs": 5}


def run_demo(out: Path, *, steps=300, quick=False, threads=2, force=False, log=print,
             progress_factory=None) -> dict:
    """Compress two wide digits ViTs into a small one with the default recipe
    (race of the starting points, distillation from the parents) and compare
    it with what a user gets without otcompress, for the same N steps.
    `progress_factory()` makes a context whose value takes the library's
    progress callbacks `(stage, done, total)`. An existing `out` is replaced
    only with `force`, and only if otcompress wrote it (`outputs.check_out`)."""
    outputs.check_out(out, force, log=log)  # before minutes of training
    bar = progress_factory() if progress_factory else nullcontext(None)
    with bar as progress:
        return _run(out, steps, quick, threads, force, log, progress)


def _stage(progress, name):
    """A finetune progress callback `(done, total, info)` reported as stage `name`."""
    return None if progress is None else (lambda done, total, info=None: progress(name, done, total))


def _run(out, steps, quick, threads, force, log, progress):
    torch.set_num_threads(threads)
    size = QUICK if quick else FULL
    steps = min(steps, 20) if quick else steps
    t0 = time.time()
    log(f"training (or loading cached) digits ViTs: parents hidden {size['parent_hidden']}, "
        f"small model hidden {size['anchor_hidden']}")
    parents = [_vit(size, size["parent_hidden"], seed, size["epochs"]) for seed in (0, 1)]
    anchor, anchor_path = _vit(size, size["anchor_hidden"], 2, size["anchor_epochs"])
    data = load_data("digits", anchor)
    parent_ms = [m for m, _ in parents]

    log(f"default recipe: race the starting points, then {steps} steps distilled from the parents")
    with outputs.staged_dir(out, force) as tmp:
        fused, report = pipeline.run(anchor, parent_ms, {"finetune_steps": steps, "seed": 0}, tmp / "fused",
                                     data=data, log=log, progress=progress)
        onnx = export_onnx(fused, tmp / "fused.onnx")
    log(f"the same {steps} steps on the small model alone, and distilled from the parents")
    ft = dict(steps=steps, lr=1e-3, batch_size=64, seed=0)
    anchor_ft = _copy(anchor)
    finetune(anchor_ft, data, progress=_stage(progress, "finetune: anchor alone"), **ft)
    distilled = _copy(anchor)
    finetune(distilled, data, teachers=parent_ms, progress=_stage(progress, "finetune: anchor distilled"), **ft)

    log("profiling (1 thread, batch 1)")
    prof = {id(m): profile_model(m, repeats=20 if not quick else 5, threads=1, onnx=True)
            for m in (parent_ms[0], anchor)}
    one_shot = report["metrics"]["fused (one-shot)"]["accuracy"]
    rows_models = [("parent A", parent_ms[0]), ("parent B", parent_ms[1]), ("small model (anchor)", anchor),
                   (f"anchor + {steps} steps", anchor_ft), (f"anchor distilled {steps} steps", distilled),
                   (f"otcompress start ({report['race']['winner']}) one-shot", None),
                   (f"otcompress: fused + {steps} steps", fused)]
    rows = []
    for name, m in rows_models:
        acc = one_shot if m is None else evaluate(m, data)["accuracy"]
        p = prof[id(parent_ms[0])] if m is not None and m in parent_ms else prof[id(anchor)]
        rows.append([name, round(100 * acc, 2), p["parameters"], round(p["flops"]["flops"] / 1e6, 2),
                     round(p["latency_pytorch"]["median_ms"], 3), round(p["latency_onnx"]["median_ms"], 3)])
    columns = ["model", "accuracy %", "params", "MFLOPs", "torch ms", "ORT ms"]
    log(f"wrote {out}/fused (from_pretrained) and {out}/fused.onnx "
        f"(ORT max abs diff {onnx['max_abs_diff']:.1e}); {time.time() - t0:.0f} s")
    return {"widths": {"a": size["anchor_hidden"], "p": size["parent_hidden"]}, "columns": columns,
            "rows": rows, "path": str(out), "out": str(out), "anchor": str(anchor_path), "race": report["race"]}


def _vit(size, hidden, seed, epochs):
    return digits_vit(hidden=hidden, layers=size["layers"], heads=size["heads"], seed=seed, epochs=epochs)


def _copy(model):
    clone = type(model)(model.config)
    clone.load_state_dict(model.state_dict())
    return clone.eval()
