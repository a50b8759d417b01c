"""Speed and peak memory of `otcompress.fuse` itself (docs/benchmarks.md, "Speed and
memory of the tool itself").

Cases (each in a fresh subprocess, so that peak RSS belongs to that case alone):
  1. two BERT-base-shaped parents (BertForMaskedLM, 12 layers, hidden 768,
     FFN 3072, 12 heads, vocab 8000, HF random init) -> anchor of hidden 384
     (FFN 1536, 6 heads), weights-based, Sinkhorn (reg 0.08) and EMD;
  2. a size sweep (parents hidden 192/384/768, FFN 4x, 12 layers, into
     half-width anchors), Sinkhorn;
  3. activations-based fusion of two 7-layer ViTs (hidden 384, 12 heads, FFN
     1152, 32x32 images, patch 4) from 200 random images in batches of 50,
     with and without token_filter="window_6";
  4. STRUCTURED parents (docs/method.md, "Sinkhorn on structured costs"): a
     12-layer BertModel base of width 384 (6 heads, FFN 1536, vocab 8000,
     tests/models.py weights: fan-in scaled, Q/K sharpened); the anchor is the
     base plus noise (2% of each tensor's std), each of the two parents a
     2x-widened (hidden 768, 12 heads, FFN 3072: BERT-base shape), permuted,
     noisy (10% of each tensor's std) copy of the base. Fused weights-based,
     Sinkhorn reg 0.05; the known answer is the average (1/3 anchor + 2/3 base), and the
     case reports the max |hidden-state difference| to it and every map's
     sweeps. Random weights converge in ~10 sweeps and hide what such parents
     cost; `--with-plain` adds the same case with Anderson acceleration off
     (plain Sinkhorn sweeps, maps that miss tol only warned about: ~150 s
     on 2 busy cores, 2.5 min).

Per case: wall time, CPU time, peak RSS during the fusion (VmHWM reset just
before `fuse` via /proc/self/clear_refs, cross-checked by a sampling thread),
the RSS baseline after the models exist, the parents' parameter bytes, and
where the time goes from what the engine itself reports (nothing of it is
wrapped or patched): `fusion_report["timings"]` (load / activations / align)
and the report's per-map seconds, by kind of node and by map shape.
Folding's speed (MiniLM -> 192, Qwen2.5-0.5B shape -> half width, beside
Torch-Pruning) is benchmarks/fold_speed.py's, and only there.

The machine is shared: each case also records the load average and a GEMM
calibration (float32 GFLOP/s on the same threads just before the fusion), so
numbers from a busy machine can be read against the compute floors.

    python benchmarks/fusion_speed.py            # full run, ~4-5 min on 2 cores
    python benchmarks/fusion_speed.py --quick    # small smoke version, ~1 min
    python benchmarks/fusion_speed.py --only structured [--with-plain]   # case 4 alone

Writes benchmarks/results/fusion_speed.md and .json (fusion_speed.quick.* with --quick,
fusion_speed.partial.* with --only, e.g. `--only vit-acts-all_tokens --repeat 3`: the ViT
activations case and its bfloat16 variant, without touching the full results).
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results"
sys.path.insert(0, str(HERE))
from machine import cpu_name, gemm_gflops  # noqa: E402

# --------------------------------------------------------------------------- cases


def bert_cfg(hidden, layers, vocab, heads=None):
    return {"family": "bert", "hidden": hidden, "intermediate": 4 * hidden, "layers": layers,
            "heads": heads or max(1, hidden // 64), "vocab": vocab}


def vit_cfg(hidden, layers, heads, intermediate, image=32, patch=4):
    return {"family": "vit", "hidden": hidden, "intermediate": intermediate, "layers": layers,
            "heads": heads, "image": image, "patch": patch}


STRUCTURED_ANCHOR_NOISE = 0.02  # anchor = base + this x each tensor's std x N(0, 1)
# Each parent = widened, permuted base + this x std x N(0, 1). At 0.1 plain Sinkhorn
# crawls as issue 8 reported: 768x384 maps run into max_iter 5000 (median ~3000 sweeps),
# the 3072x1536 MLP maps need ~650-1900; at 0.01 the plain sweeps were ~1/3 of that.
STRUCTURED_PARENT_NOISE = 0.1


def plan_cases(quick: bool, omp_env: dict, with_plain: bool = False) -> list[dict]:
    """Every case is a JSON-able dict that the worker subprocess rebuilds from.
    `env`: extra environment of the worker (the OpenMP wait policy)."""
    if quick:
        L, V = 2, 1000
        big = bert_cfg(256, L, V, heads=4)
        half = bert_cfg(128, L, V, heads=2)
        sweep = [(bert_cfg(64, L, V, heads=2), bert_cfg(32, L, V, heads=1)),
                 (bert_cfg(128, L, V, heads=2), bert_cfg(64, L, V, heads=2))]
        vit = vit_cfg(64, 2, 4, 192)
        n_img, bs = 40, 20
    else:
        L, V = 12, 8000
        big = bert_cfg(768, L, V, heads=12)
        half = bert_cfg(384, L, V, heads=6)
        sweep = [(bert_cfg(192, L, V, heads=3), bert_cfg(96, L, V, heads=2)),
                 (bert_cfg(384, L, V, heads=6), bert_cfg(192, L, V, heads=3))]
        vit = vit_cfg(384, 7, 12, 1152)
        n_img, bs = 200, 50
    cases = []
    for solver in ("sinkhorn", "emd"):
        cases.append({"name": f"bert-w{big['hidden']}-{solver}", "group": "bert", "anchor": half,
                      "parent": big, "n_parents": 2, "alignment": "weights", "solver": solver,
                      "reg": 0.08, "target_s": 30.0, "target_rss_x": 2.0})
    for p, a in sweep:  # the largest point of the sweep is the Sinkhorn case above
        cases.append({"name": f"sweep-w{p['hidden']}", "group": "sweep", "anchor": a, "parent": p,
                      "n_parents": 2, "alignment": "weights", "solver": "sinkhorn", "reg": 0.08})
    for tf in (None, "window_6"):
        cases.append({"name": f"vit-acts-{tf or 'all_tokens'}", "group": "vit", "anchor": vit,
                      "parent": vit, "n_parents": 1, "alignment": "activations",
                      "solver": "sinkhorn", "reg": 0.08, "token_filter": tf,
                      "n_images": n_img, "batch": bs, "target_s": 5.0, "target_rss_gb": 1.0})
    for c in cases:
        c["env"] = dict(omp_env)
        if quick:  # the targets are for the full shapes; a smoke run checks nothing against them
            for k in ("target_s", "target_rss_x", "target_rss_gb"):
                c.pop(k, None)
    # Variants, labelled as such: the ViT case with the engine's bfloat16 forward
    # passes (activation_dtype="bfloat16"), and the headline case with the
    # inherited OpenMP policy (GNU OpenMP spin-waits: on a shared machine a
    # 2-thread op waits for a core that another process holds).
    cases.append(dict(cases[-2], name="vit-acts-all_tokens-bf16-forward", group="variant",
                      fuse_kwargs={"activation_dtype": "bfloat16"}))
    if omp_env:
        cases.append(dict(cases[0], name=cases[0]["name"] + "-omp-default", env={}, group="variant"))
    # Structured parents: 2x-widened, permuted, noisy copies of the anchor's base
    # (BertModel: a tied MLM decoder cannot split its weights, so widening it is
    # not function-preserving).
    base = bert_cfg(64, 2, 1000, heads=2) if quick else bert_cfg(384, L, V, heads=6)
    structured = {"name": f"structured-bert-w{2 * base['hidden']}-sinkhorn", "group": "structured",
                  "structured": True, "anchor": base, "parent": dict(base, hidden=2 * base["hidden"],
                                                                     intermediate=2 * base["intermediate"],
                                                                     heads=2 * base["heads"]),
                  "n_parents": 2, "alignment": "weights", "solver": "sinkhorn", "reg": 0.05,
                  "target_s": 15.0}
    cases.append(structured)
    if with_plain:  # the solver as it was: plain sweeps (unconverged maps warned about, not raised)
        cases.append(dict(structured, name=structured["name"] + "-plain", anderson=0, timeout=3600.0,
                          fuse_kwargs={"on_unconverged": "warn"}))
    for c in cases[-(1 + with_plain):]:
        c["env"] = dict(omp_env)
        if quick:
            c.pop("target_s", None)
    return cases


# --------------------------------------------------------------------------- memory


def _status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def rss_bytes() -> int:
    kb = _status_kb("VmRSS")
    if kb is not None:
        return kb * 1024
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0). True if it worked."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    hwm, rss = _status_kb("VmHWM"), _status_kb("VmRSS")
    return hwm is not None and rss is not None and hwm <= rss + 64 * 1024


class RssSampler:
    """Polls RSS every `period` seconds (a cross-check of VmHWM, and the only
    peak where clear_refs is not allowed)."""

    def __init__(self, period=0.005):
        self.period, self.peak, self._stop = period, 0, threading.Event()
        self._pagesize = os.sysconf("SC_PAGE_SIZE")
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        try:
            f = open("/proc/self/statm")
        except OSError:
            return
        with f:
            while not self._stop.is_set():
                f.seek(0)
                self.peak = max(self.peak, int(f.read().split()[1]) * self._pagesize)
                time.sleep(self.period)

    def __enter__(self):
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()


# --------------------------------------------------------------------------- worker


def build_model(cfg: dict, seed: int):
    import torch
    torch.manual_seed(seed)
    if cfg["family"] == "bert":
        from transformers import BertConfig, BertForMaskedLM
        c = BertConfig(vocab_size=cfg["vocab"], hidden_size=cfg["hidden"], num_hidden_layers=cfg["layers"],
                       num_attention_heads=cfg["heads"], intermediate_size=cfg["intermediate"])
        return BertForMaskedLM(c).eval()
    from transformers import ViTConfig, ViTForImageClassification
    c = ViTConfig(hidden_size=cfg["hidden"], num_hidden_layers=cfg["layers"], num_attention_heads=cfg["heads"],
                  intermediate_size=cfg["intermediate"], image_size=cfg["image"], patch_size=cfg["patch"],
                  num_channels=3, num_labels=10)
    return ViTForImageClassification(c).eval()


def build_structured(case: dict):
    """(anchor, parents, known answer, inputs) for a structured case, from the
    test suite's model builders (tests/models.py)."""
    sys.path.insert(0, str(ROOT / "tests"))
    import models as M  # tests/models.py
    import transformers as T
    cfg = case["anchor"]
    base = M.bert(hidden=cfg["hidden"], heads=cfg["heads"], inter=cfg["intermediate"], layers=cfg["layers"],
                  vocab=cfg["vocab"], seed=0, cls=T.BertModel)
    anchor = M.noisy(base, scale=STRUCTURED_ANCHOR_NOISE, seed=123)
    parents = []
    for k in range(1, case["n_parents"] + 1):
        wide = M.transform(base, widen=True, seed=k)  # every unit twice (function-preserving)
        parents.append(M.noisy(M.transform(wide, widen=False, seed=10 + k),  # permuted
                               scale=STRUCTURED_PARENT_NOISE, seed=20 + k))
        del wide
    w = 1.0 / (case["n_parents"] + 1)  # fuse's default: uniform weights over anchor and parents
    known = M.average([anchor, base], [w, 1.0 - w])
    x = M.inputs(anchor)
    return anchor, parents, known, x, M.outputs


def param_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def public_breakdown(report, solves, others) -> dict:
    """Seconds by stage from the fusion report alone: `timings` and the per-map
    seconds (a node's seconds include computing its cost or clustering, the
    solve, and carrying the tensors that became ready)."""
    t = report["timings"]
    solve_nodes = sum(s["seconds"] for s in solves)
    other_nodes = sum(s.get("seconds", 0.0) for s in others)
    return {"load (incl. depth map)": t["load"],
            "activations (forward passes + statistics)": t["activations"],
            "align: solve nodes (cost, solve, carry of ready tensors)": solve_nodes,
            "align: heads / combine / share nodes": other_nodes,
            "align: after the graph walk (final carry, averaging, model build)":
                t["align"] - solve_nodes - other_nodes}


def run_case(case: dict, threads: int, repeat: int = 1) -> dict:
    import torch
    torch.set_num_threads(threads)
    import otcompress
    from otcompress import activations, align, fusion, transport  # noqa: F401  (import before measuring)

    rss_imports = rss_bytes()
    dtype = getattr(torch, case.get("dtype", "float32"))
    known = None
    if case.get("structured"):
        anchor, parents, known, known_x, outputs = build_structured(case)
    else:
        anchor = build_model(case["anchor"], seed=0).to(dtype)
        parents = [build_model(case["parent"], seed=k + 1).to(dtype) for k in range(case["n_parents"])]
    if case.get("anderson") is not None:  # the solver with acceleration off: plain Sinkhorn sweeps
        real_solve = transport.solve
        transport.solve = functools.partial(real_solve, anderson=case["anderson"])
    data = None
    if case["alignment"] == "activations":
        g = torch.Generator().manual_seed(123)
        img = case["anchor"]["image"]
        data = [{"pixel_values": torch.randn(case["batch"], 3, img, img, generator=g).to(dtype)}
                for _ in range(case["n_images"] // case["batch"])]
    import gc
    gc.collect()
    fuse_kwargs = dict(alignment=case["alignment"], solver=case["solver"], reg=case["reg"], data=data,
                       token_filter=case.get("token_filter"), **case.get("fuse_kwargs", {}))
    import inspect
    unknown = set(fuse_kwargs) - set(inspect.signature(otcompress.fuse).parameters)
    if unknown:
        raise SystemExit(f"this engine's fuse() has no option {', '.join(sorted(unknown))}")
    gflops = gemm_gflops()
    load1 = os.getloadavg()[0]
    rss_base = rss_bytes()
    hwm_ok = reset_peak()
    usage0 = os.times()
    with RssSampler() as sampler:
        t0 = time.perf_counter()
        model = otcompress.fuse(anchor, parents, **fuse_kwargs)
        wall = time.perf_counter() - t0
    usage1 = os.times()
    hwm = (_status_kb("VmHWM") or 0) * 1024 if hwm_ok else 0
    peak = max(hwm, sampler.peak)
    report = model.fusion_report
    walls = [wall]
    for _ in range(repeat - 1):  # timing only: the first run's memory and break-down are reported
        del model
        gc.collect()
        t1 = time.perf_counter()
        model = otcompress.fuse(anchor, parents, **fuse_kwargs)  # noqa: F841 - timing only
        walls.append(time.perf_counter() - t1)

    accuracy = {}
    if known is not None:  # the fused model against the known answer, and the anchor's own distance
        with torch.no_grad():
            ref = outputs(known, known_x)
            out = outputs(model, known_x)
            if case.get("save_outputs"):  # for comparing fused models across workers
                torch.save(out, case["save_outputs"])
            accuracy = {"max_abs_diff_fused": float((out - ref).abs().max()),
                        "max_abs_diff_anchor": float((outputs(anchor, known_x) - ref).abs().max()),
                        "max_abs_known": float(ref.abs().max()), "output": "last_hidden_state"}
    per_map = [{"parent": k + 1, "map": name, "shape": s["shape"], "iterations": s.get("iterations", 0),
                "marginal_error": s.get("marginal_error"), "converged": s.get("converged"),
                "restarts": s.get("restarts"), "relative_entropy": s.get("relative_entropy"),
                "seconds": s.get("seconds")}
               for k, per_parent in enumerate(report["transport_maps"]) for name, s in per_parent.items()
               if "shape" in s]
    solves = [s for per_parent in report["transport_maps"] for s in per_parent.values() if "shape" in s]
    others = [s for per_parent in report["transport_maps"] for s in per_parent.values() if "shape" not in s]
    iters = [s.get("iterations", 0) for s in solves]
    by_shape: dict = {}
    for s in solves:
        key = "x".join(map(str, s["shape"]))
        d = by_shape.setdefault(key, {"maps": 0, "seconds": 0.0})
        d["maps"] += 1
        d["seconds"] += s["seconds"]
    breakdown = public_breakdown(report, solves, others)
    return {
        "case": case,
        "threads": torch.get_num_threads(),
        "wall_s": wall,
        "wall_all_s": walls,
        "wall_min_s": min(walls),
        "cpu_s": (usage1.user - usage0.user) + (usage1.system - usage0.system),
        "cpu_user_s": usage1.user - usage0.user,
        "cpu_sys_s": usage1.system - usage0.system,
        "rss_after_imports": rss_imports,
        "rss_baseline": rss_base,
        "rss_peak": peak,
        "rss_peak_hwm": hwm,
        "rss_peak_sampled": sampler.peak,
        "hwm_reset_ok": hwm_ok,
        "parents_param_bytes": sum(param_bytes(p) for p in parents),
        "anchor_param_bytes": param_bytes(anchor),
        "timings": report["timings"],
        "maps_solved": len(solves),
        "maps_other": len(others),
        "report_solve_node_s": sum(s["seconds"] for s in solves),
        "report_other_node_s": sum(s.get("seconds", 0.0) for s in others),
        "iterations": {"min": min(iters, default=0), "max": max(iters, default=0),
                       "mean": sum(iters) / len(iters) if iters else 0.0},
        "methods": sorted({s.get("method", "?") for s in solves}),
        "max_marginal_error": max((s.get("marginal_error", 0.0) for s in solves), default=0.0),
        "by_shape": by_shape,
        "breakdown_s": breakdown,
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "(unset: GNU OpenMP default)"),
        "unaccounted_s": wall - report["timings"]["total"],
        "calibration_samples": report.get("calibration_samples", 0),
        "gemm_gflops_before": gflops,
        "loadavg_1min_before": load1,
        "accuracy": accuracy,
        "per_map": per_map,
        "maps_unconverged": sum(1 for p in per_map if p["converged"] is False),
        "iterations_total": sum(iters),
    }


# --------------------------------------------------------------------------- streaming (--streaming)
#
# Self-contained: parents of BERT-large shape are written to disk once, then
# each mode fuses them in a fresh subprocess; the parents are given as
# directories. "streamed" is what fuse() does with directories (tensors read
# one at a time); "loaded" forces the old whole-model load for comparison.


def streaming_plan(quick: bool) -> dict:
    if quick:
        parent, anchor, shard = bert_cfg(256, 4, 1000, heads=4), bert_cfg(128, 4, 1000, heads=2), "2MB"
    else:  # BERT-large shape; a small vocabulary keeps the layers the bulk of the bytes
        parent, anchor, shard = bert_cfg(1024, 24, 8000, heads=16), bert_cfg(512, 24, 8000, heads=8), "400MB"
    return {"parent": parent, "anchor": anchor, "n_parents": 2, "shard": shard, "reg": 0.08,
            "target_overhead_x": 0.5}


def streaming_make(plan: dict, root: str) -> dict:
    """Write the anchor and parents with save_pretrained (parents sharded)."""
    import torch
    torch.set_num_threads(1)
    paths = {"anchor": str(Path(root) / "anchor"),
             "parents": [str(Path(root) / f"parent{k + 1}") for k in range(plan["n_parents"])]}
    build_model(plan["anchor"], seed=0).save_pretrained(paths["anchor"])
    for k, p in enumerate(paths["parents"]):
        model = build_model(plan["parent"], seed=k + 1)
        model.save_pretrained(p, max_shard_size=plan["shard"])
        del model
    return paths


def _dir_bytes(path) -> int:
    return sum(f.stat().st_size for f in Path(path).glob("*.safetensors"))


def streaming_worker(job: dict, threads: int) -> dict:
    """One fusion in this (fresh) process: the anchor is loaded first, as the
    model the caller holds; the parents stay directories. Peak RSS = VmHWM
    reset just before fuse (cross-checked by a 5 ms sampler)."""
    import gc
    import hashlib

    import torch
    torch.set_num_threads(threads)
    import otcompress
    from otcompress import fusion, modelio
    anchor = modelio.load_model(job["paths"]["anchor"])
    if job["mode"] == "loaded":  # the pre-streaming path, for comparison
        fusion.streams = lambda *a, **k: False
    reads = []
    real_getitem = modelio.LazyStateDict.__getitem__
    modelio.LazyStateDict.__getitem__ = lambda self, k: reads.append(k) or real_getitem(self, k)
    gc.collect()
    load1, base = os.getloadavg()[0], rss_bytes()
    hwm_ok = reset_peak()
    usage0 = os.times()
    options = {"alignment": "weights", "solver": "sinkhorn", "reg": job["reg"]}
    with RssSampler() as sampler:
        t0 = time.perf_counter()
        if job["mode"] == "disk":  # written shard by shard, never in memory whole
            report = fusion.fuse_to_disk(anchor, job["paths"]["parents"], job["out"], max_shard_size=job["shard"],
                                         **options)
        elif job["mode"] == "workflow":  # what `otcompress fuse` runs (no data: nothing to train)
            from otcompress import pipeline
            _, report = pipeline.run(anchor, job["paths"]["parents"], options, job["out"])
        else:
            model = otcompress.fuse(anchor, job["paths"]["parents"], **options)
            report = model.fusion_report
        wall = time.perf_counter() - t0
    usage1 = os.times()
    peak = max((_status_kb("VmHWM") or 0) * 1024 if hwm_ok else 0, sampler.peak)
    written = job["mode"] in ("disk", "workflow")
    if written:  # after the measurement: what from_pretrained makes of the directory
        model = modelio.load_model(job["out"])
    digest = hashlib.sha256()
    for name, t in model.state_dict().items():
        digest.update(name.encode())
        digest.update(t.detach().contiguous().view(torch.uint8).numpy().tobytes())
    return {"mode": job["mode"], "wall_s": wall, "cpu_s": (usage1[0] + usage1[1]) - (usage0[0] + usage0[1]),
            "rss_baseline": base, "rss_peak": peak, "hwm_reset": hwm_ok, "loadavg_1min_before": load1,
            "anchor_param_bytes": param_bytes(anchor), "tensor_reads": len(reads),
            "distinct_tensors_read": len(set(reads)), "timings": report["timings"],
            "fused_sha256": digest.hexdigest(), "threads": threads,
            "files_written": sorted(p.name for p in Path(job["out"]).iterdir()) if written else None}


def _spawn(flag: str, payload: dict, threads: int, timeout: float) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), flag, json.dumps(payload), "--threads", str(threads)]
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    env.update(PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_WAIT_POLICY="PASSIVE",
               TOKENIZERS_PARALLELISM="false", TRANSFORMERS_VERBOSITY="error")
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    return {"error": f"exit {proc.returncode}: " + " | ".join((proc.stderr or proc.stdout).strip().splitlines()[-5:])}


def streaming_main(args) -> int:
    import tempfile
    t0 = time.perf_counter()
    plan = streaming_plan(args.quick)
    with tempfile.TemporaryDirectory(prefix="otc-streaming-", dir=args.streaming_dir) as root:
        print(f"[fusion_speed] streaming: writing {plan['n_parents']} parents to {root} ...", flush=True)
        paths = _spawn("--streaming-make", {"plan": plan, "root": root}, 1, args.timeout)
        if "error" in paths:
            raise SystemExit(f"writing the parents failed: {paths['error']}")
        parent_bytes = _dir_bytes(paths["parents"][0])
        shards = len(list(Path(paths["parents"][0]).glob("*.safetensors")))
        rows = []
        for mode in ("disk", "workflow", "streamed", "loaded"):
            print(f"[fusion_speed] streaming: {mode} ...", flush=True)
            r = _spawn("--streaming-worker", {"mode": mode, "paths": paths, "reg": plan["reg"],
                                              "out": str(Path(root) / f"fused-{mode}"), "shard": plan["shard"]},
                       args.threads, args.timeout)
            r.setdefault("mode", mode)
            rows.append(r)
    meta = {"threads": args.threads, "quick": args.quick, "date": time.strftime("%Y-%m-%d %H:%M:%S"),
            "cpu": cpu_name(), "cores": os.cpu_count(), "total_s": time.perf_counter() - t0,
            "loadavg_end": os.getloadavg(), "parent_file_bytes": parent_bytes, "parent_shards": shards}
    text = render_streaming(plan, rows, meta)
    print(text)
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = "fusion_speed.streaming" + (".quick" if args.quick else "")
    (RESULTS / f"{stem}.json").write_text(json.dumps({"meta": meta, "plan": plan, "results": rows}, indent=1))
    (RESULTS / f"{stem}.md").write_text(text)
    print(f"wrote {RESULTS / stem}.md and .json")
    return 0 if all("error" not in r for r in rows) else 1


def render_streaming(plan: dict, rows: list, meta: dict) -> str:
    pb = meta["parent_file_bytes"]
    ok = [r for r in rows if "error" not in r]
    same = len(ok) == len(rows) > 1 and len({r["fused_sha256"] for r in ok}) == 1
    lines = [f"# Streaming fusion: peak memory ({'quick' if meta['quick'] else 'full'} run)", "",
             "Written by `python benchmarks/fusion_speed.py --streaming" + (" --quick" if meta["quick"] else "") + "`.",
             "",
             f"- {plan['n_parents']} parents {shape_str(plan['parent'])} (BertForMaskedLM, HF random init), saved "
             f"with save_pretrained in {meta['parent_shards']} shards of <= {plan['shard']}; one parent's files: "
             f"{fmt_mb(pb)} MB; anchor {shape_str(plan['anchor'])} loaded before the fusion (in the baseline); "
             f"weights-based, Sinkhorn reg {plan['reg']}",
             f"- `torch.set_num_threads({meta['threads']})`, OMP_WAIT_POLICY=PASSIVE; {meta['cpu']}, {meta['cores']} "
             f"cores shared with other jobs; {meta['date']}; whole run {meta['total_s']:.0f} s",
             "- each mode in a fresh subprocess; parents passed as directories; `disk` = "
             f"`fusion.fuse_to_disk(..., max_shard_size='{plan['shard']}')` (tensors read one at a time, each fused "
             "tensor written to its shard as soon as it is final; the fused model is never in memory whole), "
             "`workflow` = `pipeline.run` (what `otcompress fuse` runs) with the same options and no data: "
             "it streams the parents and writes through fuse_to_disk, plus the report, recipe and card "
             "(the CLI also loads the anchor itself, which here is in the baseline), "
             "`streamed` = fuse() (tensors read one at a time, the fused model returned in memory), `loaded` = "
             "fuse() with streaming switched off (parents loaded whole); peak RSS = VmHWM reset "
             "(/proc/self/clear_refs) just before the call, cross-checked by a 5 ms sampler; overhead = peak - "
             "baseline (baseline: imports + the anchor)",
             f"- fused state dicts identical (sha256; `disk`: the written directory loaded with from_pretrained "
             f"after the measurement): **{'yes' if same else 'NO'}**", ""]
    head = ("| mode | wall s | CPU s | load | baseline MB | peak MB | overhead MB | overhead / one parent | "
            "tensor reads (distinct) | target (< "
            f"{plan['target_overhead_x']:g}x one parent) |")
    lines += [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['mode']} | ERROR: {r['error']} |")
            continue
        over = r["rss_peak"] - r["rss_baseline"]
        x = over / pb
        lines.append(f"| {r['mode']} | {r['wall_s']:.1f} | {r['cpu_s']:.1f} | {r['loadavg_1min_before']:.1f} | "
                     f"{fmt_mb(r['rss_baseline'])} | {fmt_mb(r['rss_peak'])} | {fmt_mb(over)} | {x:.2f}x | "
                     f"{r['tensor_reads']} ({r['distinct_tensors_read']}) | "
                     f"{'OK' if x < plan['target_overhead_x'] else 'MISS'} |")
    if ok:
        a = ok[0]["anchor_param_bytes"]
        lines += ["", f"The anchor's parameters are {fmt_mb(a)} MB ({a / pb:.2f}x one parent). The parents are "
                  "aligned in lockstep (one flow-graph node each in turn), so a fused tensor is final about one "
                  "layer after it is started: `streamed` still ends holding the whole fused model (it returns it), "
                  "`disk` holds only the tensors in flight. Both hold, per parent, its tensors and transport maps "
                  "of about one layer, and the solver's buffers for one map at a time."]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- driver


def spawn_case(case: dict, threads: int, timeout: float, repeat: int = 1) -> dict:
    timeout = max(timeout, case.get("timeout", 0.0))
    cmd = [sys.executable, str(Path(__file__).resolve()), "--case", json.dumps(case), "--threads", str(threads),
           "--repeat", str(repeat)]
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    env.update(PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               TOKENIZERS_PARALLELISM="false", TRANSFORMERS_VERBOSITY="error", **case.get("env", {}))
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"case": case, "error": f"timed out after {timeout:.0f} s"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("RESULT "):
            out = json.loads(line[7:])
            out["subprocess_s"] = time.perf_counter() - t0
            return out
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
    return {"case": case, "error": f"exit {proc.returncode}: " + " | ".join(tail)}


GB = 1024 ** 3
MB = 1024 ** 2


def fmt_mb(b):
    return f"{b / MB:,.0f}"


def shape_str(cfg):
    if cfg["family"] == "bert":
        return f"BERT L{cfg['layers']} h{cfg['hidden']} ffn{cfg['intermediate']} v{cfg['vocab']}"
    return f"ViT L{cfg['layers']} h{cfg['hidden']} ffn{cfg['intermediate']}"


def _target(r):
    c, pb, parts = r["case"], r["parents_param_bytes"], []
    if "target_s" in c:
        parts.append(f"time {'OK' if r['wall_s'] < c['target_s'] else 'MISS'} (<{c['target_s']:g} s)")
    if "target_rss_x" in c:
        x = r["rss_peak"] / pb
        parts.append(f"RSS {'OK' if x < c['target_rss_x'] else 'MISS'} (<{c['target_rss_x']:g}x)")
    if "target_rss_gb" in c:
        parts.append(f"RSS {'OK' if r['rss_peak'] < c['target_rss_gb'] * GB else 'MISS'} (<{c['target_rss_gb']:g} GB)")
    return ", ".join(parts)


def _wall(r):
    walls = r.get("wall_all_s", [r["wall_s"]])
    return f"{r['wall_s']:.1f}" + (f" (min {min(walls):.1f} of {len(walls)})" if len(walls) > 1 else "")


def _what(c):
    tf = c.get("token_filter")
    extra = "".join(f", {k}={v}" for k, v in c.get("fuse_kwargs", {}).items())
    return f"{c['alignment']} {c['solver']}" + (f" {tf}" if tf else "") + extra


def render(results: list[dict], meta: dict) -> str:
    kind = ("quick" if meta["quick"] else "full") + (" run, partial" if meta.get("only") else " run")
    flags = (" --quick" if meta["quick"] else "") + (f" --only {meta['only']}" if meta.get("only") else "") \
        + (f" --repeat {meta['repeat']}" if meta.get("repeat", 1) > 1 else "")
    lines = [f"# Fusion speed and peak memory ({kind})", "",
             f"Written by `python benchmarks/fusion_speed.py{flags}`.", ""]
    lines += [f"- machine: {meta['cpu']}, {meta['cores']} cores (shared with other jobs); torch {meta['torch']}, "
              f"transformers {meta['transformers']}, POT {meta['pot']}; `torch.set_num_threads({meta['threads']})`",
              f"- date: {meta['date']}; whole benchmark {meta['total_s']:.0f} s; load average at the end "
              f"{', '.join(f'{x:.1f}' for x in meta['loadavg_end'])}",
              "- each case runs in a fresh subprocess. `peak RSS` = VmHWM reset (/proc/self/clear_refs) just "
              "before `fuse`, cross-checked by a 5 ms RSS sampler; `baseline` = RSS after imports, models and "
              "data exist, i.e. before `fuse`; `overhead` = peak - baseline, the fusion's own memory",
              "- `parents MB` = parameter bytes of all parents (float32); the RSS target is read strictly "
              "(whole-process peak < 2x parents); `overhead / parents` is the fusion's own share",
              "- models: HF random init (seeded), except the `structured` cases (widened, permuted, noisy copies "
              "of one base; their own section below). Random parents give near-constant costs, so Sinkhorn "
              "converges in ~10 sweeps; structured and trained parents need more (see solver_speed.md)",
              "- `GEMM GF/s`: float32 1536^3 matmul speed on the same threads just before each fusion; the "
              "compute floors in docs/benchmarks.md assume ~176 GF/s (2 quiet threads). A lower number means "
              "the machine was busy, and wall times are inflated by about that ratio",
              f"- OpenMP: workers run with OMP_WAIT_POLICY={'PASSIVE' if meta['omp_wait_policy'] == 'passive' else 'inherited'}"
              " unless the row says otherwise (`omp` column); with GNU OpenMP's default spin-waiting and "
              "another process on one of the 2 cores, every parallel op waits for that core (see the "
              "`-omp-default` row)",
              ""]
    ok = [r for r in results if "error" not in r]
    head = ("| case | parents -> anchor | alignment, solver | omp | wall s | CPU s | GEMM GF/s | load | "
            "parents MB | baseline RSS MB | peak RSS MB | overhead MB | peak / parents | overhead / parents | target |")
    lines += [head, "|" + "---|" * (head.count("|") - 1)]
    for r in results:
        c = r["case"]
        if "error" in r:
            lines.append(f"| {c['name']} | {shape_str(c['parent'])} | {_what(c)} | | ERROR: {r['error']} |")
            continue
        pb = r["parents_param_bytes"]
        omp = "passive" if c.get("env", {}).get("OMP_WAIT_POLICY") == "PASSIVE" else "default"
        lines.append(
            f"| {c['name']} | {c['n_parents']}x {shape_str(c['parent'])} -> h{c['anchor']['hidden']} | {_what(c)} | "
            f"{omp} | {_wall(r)} | {r['cpu_s']:.1f} | "
            f"{r['gemm_gflops_before']:.0f} | {r['loadavg_1min_before']:.1f} | {fmt_mb(pb)} | "
            f"{fmt_mb(r['rss_baseline'])} | {fmt_mb(r['rss_peak'])} | {fmt_mb(r['rss_peak'] - r['rss_baseline'])} | "
            f"{r['rss_peak'] / pb:.2f}x | {(r['rss_peak'] - r['rss_baseline']) / pb:.2f}x | {_target(r)} |")
    sweep = sorted((r for r in ok if r["case"]["group"] == "sweep" or
                    (r["case"]["group"] == "bert" and r["case"]["solver"] == "sinkhorn")),
                   key=lambda r: r["case"]["parent"]["hidden"])
    if sweep:
        lines += ["", "## Size sweep (weights-based, Sinkhorn reg 0.08, 2 parents into half width, "
                  f"{sweep[0]['case']['parent']['layers']} layers)", "",
                  "| parent hidden -> anchor | parents params (M) | wall s | "
                  "wall x vs previous | CPU s | peak RSS GiB | overhead GiB |",
                  "|---|---|---|---|---|---|---|"]
        prev = None
        for r in sweep:
            c = r["case"]
            grow = f"{r['wall_s'] / prev:.1f}x" if prev else ""
            prev = r["wall_s"]
            lines.append(f"| {c['parent']['hidden']} -> {c['anchor']['hidden']} | {r['parents_param_bytes'] / 4e6:.1f} | "
                         f"{r['wall_s']:.2f} | {grow} | {r['cpu_s']:.1f} | {r['rss_peak'] / GB:.2f} | "
                         f"{(r['rss_peak'] - r['rss_baseline']) / GB:.2f} |")
    lines += render_structured(ok)
    lines += ["", "## Where the time goes", "",
              "From the fusion report alone (the engine is not wrapped or patched): "
              "`fusion_report['timings']` (load / activations / align / total) and the per-map seconds "
              "(a solve node's seconds include computing its cost, the solve, and carrying the tensors that "
              "became ready; a heads node's, the head-aware maps). `outside fuse` = wall - the report's total.", ""]
    for r in ok:
        c, t = r["case"], r["timings"]
        lines.append(f"### {c['name']}: wall {r['wall_s']:.2f} s (CPU {r['cpu_user_s']:.1f} s user + "
                     f"{r['cpu_sys_s']:.1f} s sys; GEMM {r['gemm_gflops_before']:.0f} GF/s before)")
        lines.append("")
        lines.append(f"- {r['maps_solved']} solved maps ({', '.join(r['methods'])}; iterations "
                     f"{r['iterations']['min']}-{r['iterations']['max']}, mean {r['iterations']['mean']:.0f}; "
                     f"max marginal error {r['max_marginal_error']:.1e})")
        big = sorted(r["by_shape"].items(), key=lambda kv: -kv[1]["seconds"])[:4]
        lines.append("- solve-node seconds by map shape: " + ", ".join(
            f"{k}: {v['maps']} maps, {v['seconds']:.2f} s" for k, v in big))
        lines.append("")
        lines.append("| part | seconds | share of wall |")
        lines.append("|---|---|---|")
        for k, v in r["breakdown_s"].items():
            lines.append(f"| {k} | {v:.2f} | {100 * v / r['wall_s']:.0f}% |")
        lines.append(f"| outside fuse (wall - report total) | {r['unaccounted_s']:.2f} | "
                     f"{100 * r['unaccounted_s'] / r['wall_s']:.0f}% |")
        lines.append("")
    return "\n".join(lines) + "\n"


def _its_by_shape(r) -> dict:
    by: dict = {}
    for p in r.get("per_map", []):
        by.setdefault("x".join(map(str, p["shape"])), []).append(p["iterations"])
    return by


def _median(v):
    v = sorted(v)
    return v[len(v) // 2] if len(v) % 2 else (v[len(v) // 2 - 1] + v[len(v) // 2]) / 2


def render_structured(ok: list) -> list:
    rows = [r for r in ok if r["case"].get("structured")]
    if not rows:
        return []
    c0 = rows[0]["case"]
    lines = ["", "## Structured parents (Sinkhorn on structured costs)", "",
             f"Anchor: a {c0['anchor']['layers']}-layer BertModel base of width {c0['anchor']['hidden']} "
             f"({c0['anchor']['heads']} heads, FFN {c0['anchor']['intermediate']}, vocab {c0['anchor']['vocab']}; "
             f"tests/models.py weights) plus noise ({STRUCTURED_ANCHOR_NOISE:g} x each tensor's std). Parents: "
             f"{c0['n_parents']} copies of the base, each 2x widened (every residual, head and MLP unit twice: "
             f"hidden {c0['parent']['hidden']}, {c0['parent']['heads']} heads, FFN {c0['parent']['intermediate']}), "
             f"permuted and given noise {STRUCTURED_PARENT_NOISE:g} x std. "
             f"`fuse(anchor, parents, alignment='weights', solver='sinkhorn', reg={c0['reg']:g})`. Known answer: "
             f"the average 1/{c0['n_parents'] + 1} anchor + {c0['n_parents']}/{c0['n_parents'] + 1} base (exact "
             "for noise-free parents with hard maps; the parents' noise and the soft maps move the fused model "
             "off it); `max |dh|` = max |last_hidden_state difference| to it on 4 sequences of 12 tokens "
             "(tests/models.inputs); `anchor` = the same for the anchor alone. Sweeps = Sinkhorn sweeps per map "
             "(`fusion_report['transport_maps']`); `plain` rows: Anderson acceleration off (the solver before "
             "issue 8), unconverged maps only warned about; `vs accelerated` = max |hidden difference| between "
             "that row's fused model and the accelerated row's.", "",
             "| case | torch threads | wall s | GEMM GF/s | load | maps | sweeps total | sweeps per map by shape "
             "(min / median / max) | unconverged maps | max marginal error | max \|dh\| fused | max \|dh\| "
             "anchor | max \|h\| | vs accelerated | target |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        a = r.get("accuracy", {})
        vs = a.get("max_abs_diff_to_accelerated")
        shapes = "; ".join(f"{k}: {min(v)} / {_median(v):g} / {max(v)}" for k, v in _its_by_shape(r).items())
        lines.append(f"| {r['case']['name']} | {r['threads']} | {r['wall_s']:.1f} | {r['gemm_gflops_before']:.0f} | "
                     f"{r['loadavg_1min_before']:.1f} | {r['maps_solved']} | {r['iterations_total']} | {shapes} | "
                     f"{r['maps_unconverged']} | {r['max_marginal_error']:.1e} | "
                     f"{a.get('max_abs_diff_fused', float('nan')):.4f} | {a.get('max_abs_diff_anchor', float('nan')):.4f} | "
                     f"{a.get('max_abs_known', float('nan')):.2f} | {'' if vs is None else f'{vs:.1e}'} | "
                     f"{_target(r)} |")
    for r in rows:
        lines += ["", f"Sweeps per map, {r['case']['name']} (parent: map=sweeps; `!` = not converged):", ""]
        for k in sorted({p["parent"] for p in r["per_map"]}):
            maps = [p for p in r["per_map"] if p["parent"] == k]
            lines.append(f"- parent {k}: " + ", ".join(
                f"{p['map']}={p['iterations']}{'' if p['converged'] is not False else '!'}" for p in maps))
    return lines


def compare_structured_outputs(results):
    """Max |hidden difference| between each structured variant's fused model and
    the accelerated one's (same inputs): does the solver change the result?"""
    import torch
    ok = [r for r in results if "error" not in r and r["case"].get("structured")]
    ref = next((r for r in ok if r["case"].get("anderson") is None), None)
    if ref is None or not Path(ref["case"]["save_outputs"]).exists():
        return
    base = torch.load(ref["case"]["save_outputs"])
    for r in ok:
        if r is not ref and Path(r["case"]["save_outputs"]).exists():
            diff = (torch.load(r["case"]["save_outputs"]) - base).abs().max()
            r["accuracy"]["max_abs_diff_to_accelerated"] = float(diff)


def print_summary(results):
    print(f"{'case':26s} {'wall s':>7s} {'CPU s':>6s} {'GF/s':>5s} {'parents MB':>10s} {'base MB':>8s} "
          f"{'peak MB':>8s} {'peak/par':>8s} {'solves s':>8s} {'rest s':>7s}")
    for r in results:
        if "error" in r:
            print(f"{r['case']['name']:26s} ERROR {r['error']}")
            continue
        print(f"{r['case']['name']:26s} {r['wall_s']:7.2f} {r['cpu_s']:6.1f} {r['gemm_gflops_before']:5.0f} "
              f"{r['parents_param_bytes'] / MB:10.0f} {r['rss_baseline'] / MB:8.0f} {r['rss_peak'] / MB:8.0f} "
              f"{r['rss_peak'] / r['parents_param_bytes']:7.2f}x {r['report_solve_node_s']:8.2f} "
              f"{r['wall_s'] - r['report_solve_node_s']:7.2f}")
        if r["case"].get("structured"):
            a = r.get("accuracy", {})
            print(f"{'':26s} structured: threads {r['threads']}, {r['maps_solved']} maps, {r['iterations_total']} "
                  f"sweeps (by shape min/median/max: " + "; ".join(
                      f"{k} {min(v)}/{_median(v):g}/{max(v)}" for k, v in _its_by_shape(r).items())
                  + f"), unconverged {r['maps_unconverged']}, max |dh| to the known answer "
                  f"{a.get('max_abs_diff_fused', float('nan')):.4f} (anchor alone "
                  f"{a.get('max_abs_diff_anchor', float('nan')):.4f})"
                  + (f", to the accelerated fused model {a['max_abs_diff_to_accelerated']:.1e}"
                     if "max_abs_diff_to_accelerated" in a else ""))
        print(f"{'':26s} " + "; ".join(f"{k} {v:.2f}" for k, v in r["breakdown_s"].items()))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    ap.add_argument("--quick", action="store_true", help="small models: a smoke run in about a minute")
    ap.add_argument("--only", default=None, help="run only cases whose name contains this string")
    ap.add_argument("--repeat", type=int, default=1,
                    help="run each fusion this many times in its worker; the table's wall time is the first "
                         "run's (with its memory and break-down), the JSON keeps all (default 1)")
    ap.add_argument("--timeout", type=float, default=400.0, help="per-case subprocess timeout, seconds")
    ap.add_argument("--omp-wait-policy", choices=("passive", "inherit"), default="passive",
                    help="OMP_WAIT_POLICY of the workers: 'passive' (default; robust on a shared machine) "
                         "or 'inherit' this shell's environment. The headline BERT case is also run "
                         "with the inherited policy for comparison when 'passive' is used")
    ap.add_argument("--with-plain", action="store_true",
                    help="also run the structured case with Anderson acceleration off (plain Sinkhorn; ~150 s)")
    ap.add_argument("--case", default=None, help=argparse.SUPPRESS)  # worker mode: one case as JSON
    ap.add_argument("--streaming", action="store_true",
                    help="instead: parents of BERT-large shape written to disk, fused streamed vs loaded whole "
                         "(peak RSS against one parent's file size); writes fusion_speed.streaming.md")
    ap.add_argument("--streaming-dir", default=None, help="where --streaming writes its parents (default: TMPDIR)")
    ap.add_argument("--streaming-make", default=None, help=argparse.SUPPRESS)  # worker: write the models
    ap.add_argument("--streaming-worker", default=None, help=argparse.SUPPRESS)  # worker: one fusion
    args = ap.parse_args(argv)
    if args.streaming_make is not None:
        job = json.loads(args.streaming_make)
        print("RESULT " + json.dumps(streaming_make(job["plan"], job["root"])), flush=True)
        return 0
    if args.streaming_worker is not None:
        import warnings
        warnings.filterwarnings("ignore")
        print("RESULT " + json.dumps(streaming_worker(json.loads(args.streaming_worker), args.threads)), flush=True)
        return 0
    if args.streaming:
        return streaming_main(args)

    if args.case is not None:
        import warnings
        warnings.filterwarnings("ignore")
        print("RESULT " + json.dumps(run_case(json.loads(args.case), args.threads, args.repeat)), flush=True)
        return 0

    t0 = time.perf_counter()
    omp_env = {"OMP_WAIT_POLICY": "PASSIVE"} if args.omp_wait_policy == "passive" else {}
    cases = [c for c in plan_cases(args.quick, omp_env, args.with_plain)
             if not args.only or args.only in c["name"]]
    results = []
    import tempfile
    outdir = tempfile.TemporaryDirectory(prefix="otc-fusion-speed-")
    for case in cases:
        if case.get("structured"):
            case["save_outputs"] = str(Path(outdir.name) / f"{case['name']}.pt")
        print(f"[fusion_speed] {case['name']} ...", flush=True)
        results.append(spawn_case(case, args.threads, args.timeout, args.repeat))
    compare_structured_outputs(results)
    outdir.cleanup()
    import ot
    import torch
    import transformers
    meta = {"quick": args.quick, "only": args.only, "repeat": args.repeat, "threads": args.threads,
            "omp_wait_policy": args.omp_wait_policy,
            "loadavg_end": os.getloadavg(), "cores": os.cpu_count(), "cpu": cpu_name(),
            "torch": torch.__version__, "transformers": transformers.__version__, "pot": ot.__version__,
            "python": platform.python_version(), "date": time.strftime("%Y-%m-%d %H:%M:%S"),
            "total_s": time.perf_counter() - t0}
    print()
    print_summary(results)
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = "fusion_speed.quick" if args.quick else "fusion_speed"
    if args.only:
        stem += ".partial"
    (RESULTS / f"{stem}.json").write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    (RESULTS / f"{stem}.md").write_text(render(results, meta))
    print(f"\nwrote {RESULTS / stem}.md and .json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
