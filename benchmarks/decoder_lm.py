"""Decoder LMs: does OT fusion help small LLaMA causal LMs trained on real text?

Small LLaMA-style causal LMs (rotary grouped-query attention, SwiGLU, RMSNorm)
are trained here on the offline pydoc corpus (the English help texts of
`pydoc_data.topics`, one example per paragraph, fixed 90/10 split from
otcompress.data) with the WordPiece tokenizer of `otcompress.zoo.pydoc_tokenizer`.
The metric is the held-out next-token loss (mean cross-entropy over every
predicted token of the eval split; lower is better), with perplexity and
top-1 token accuracy beside it.

Per seed: two wide parents (hidden 64, 4 heads, 2 KV heads, MLP 128, 2
layers) and one narrow anchor (hidden 32, 2 heads, 1 KV head, MLP 64: the
same head width, as rotary fusion needs), each trained from its own
initialisation and batch order.

  homogeneous    the two parents fused into parent 1's width: vanilla
                 averaging vs OT weights-based (Sinkhorn, the default reg),
                 one-shot and after N finetuning steps; parents and their
                 ensemble (2 forward passes) for reference.
  heterogeneous  the two parents into the narrow anchor with
                 `otcompress.pipeline.run` and the default recipe (it races
                 the fold / OT / anchor starts on held-out train examples,
                 distilling from the parents, and continues the winner to N
                 steps) against the anchor finetuned N steps and the anchor
                 distilled from the parents N steps.

Every finetuning arm uses the same N, lr, batch size and seed. Torch runs on
ONE thread (set below): the machine has 2 cores and other long jobs.
Trained models are cached under the zoo cache (`otcompress.zoo.cache_root`),
keyed by config, seed, recipe and corpus, so a re-run only fuses and
finetunes.

    python benchmarks/decoder_lm.py            # full run, 3 seeds
    python benchmarks/decoder_lm.py --quick    # smoke run

Writes benchmarks/results/decoder_lm.md/.json (decoder_lm.quick.* with --quick).
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

common.prepare_environment()  # before torch is imported

VOCAB = 2000
MAX_LEN = 128
TRAIN_LR, TRAIN_BATCH, TRAIN_WARMUP = 3e-3, 32, 0.05
WIDE = dict(hidden=64, heads=4, kv=2, inter=128)
NARROW = dict(hidden=32, heads=2, kv=1, inter=64)
METRICS = ("loss", "perplexity", "accuracy")
CALIB_SAMPLES = 256  # train paragraphs for activation statistics


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="few steps and one seed: a smoke run")
    ap.add_argument("--seeds", type=int, nargs="+", default=None, help="seeds (default 0 1 2)")
    ap.add_argument("--train-steps", type=int, default=None, help="training steps of every model (250)")
    ap.add_argument("--steps", type=int, default=None, help="finetuning budget N of every arm (100)")
    ap.add_argument("--lr", type=float, default=1e-3, help="finetuning lr of every arm (1e-3)")
    ap.add_argument("--batch-size", type=int, default=32, help="finetuning batch of every arm (32)")
    ap.add_argument("--cache-dir", default=None, help="zoo cache (default ~/.cache/otcompress/zoo)")
    return ap.parse_args(argv)


# --------------------------------------------------------------------------- models


def llama_config(tokenizer, hidden, heads, kv, inter, layers=2):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, num_hidden_layers=layers,
                       num_attention_heads=heads, num_key_value_heads=kv, head_dim=hidden // heads,
                       intermediate_size=inter, max_position_embeddings=MAX_LEN,
                       pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.cls_token_id,
                       eos_token_id=tokenizer.sep_token_id, tie_word_embeddings=False)


def trained_llama(tokenizer, tok_path, widths, seed, steps, cache_dir):
    """A LlamaForCausalLM trained `steps` steps on pydoc's train split, cached;
    returns (model, folder, info). The tokenizer is saved beside it."""
    from transformers import LlamaForCausalLM

    from otcompress import zoo

    config = llama_config(tokenizer, **widths)
    recipe = {"data": "pydoc", "task": "causal-lm", "lr": TRAIN_LR, "batch_size": TRAIN_BATCH,
              "warmup": TRAIN_WARMUP, "schedule": "linear warm-up, cosine", "steps": steps,
              "max_length": MAX_LEN, "seed": seed, "corpus": zoo._corpus_digest(), "tokenizer": tok_path.name}
    depth = f"-l{widths['layers']}" if widths.get("layers", 2) != 2 else ""  # 2-layer names as before
    name = (f"pydoc_llama-h{widths['hidden']}{depth}-a{widths['heads']}-kv{widths['kv']}-i{widths['inter']}"
            f"-s{seed}-n{steps}-{zoo._digest(zoo._config_key(config), recipe)}")

    def build(folder: Path):
        from otcompress.data import load_data
        from otcompress.finetune import evaluate, finetune

        model = zoo._new_model(LlamaForCausalLM, config, seed)
        data = load_data("pydoc", model, tokenizer=tokenizer, max_length=MAX_LEN)
        rep = finetune(model, data, steps=steps, lr=TRAIN_LR, batch_size=TRAIN_BATCH, seed=seed,
                       warmup=TRAIN_WARMUP)
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        zoo._write_info(folder, {"model": "pydoc_llama", "recipe": recipe, "seconds": rep["seconds"],
                                 "final_loss": rep["final_loss"], "eval": evaluate(model, data),
                                 "threads": 1})

    with zoo._quiet():
        path = zoo._cached(zoo.cache_root(cache_dir) / name, build)
        return LlamaForCausalLM.from_pretrained(path).eval(), path, zoo.zoo_info(path)


# --------------------------------------------------------------------------- measuring


def lm_metrics(model, data) -> dict:
    from otcompress.finetune import evaluate

    out = evaluate(model, data)
    return {k: float(out[k]) for k in METRICS} | {"tokens": int(out["tokens"])}


def ensemble_metrics(models, data) -> dict:
    """Mean of the models' next-token distributions (K forward passes)."""
    from otcompress.finetune import evaluate_ensemble

    for m in models:
        m.eval()  # left in eval mode, as before
    out = evaluate_ensemble(models, data)
    return {k: out[k] for k in ("loss", "perplexity", "accuracy", "tokens")}


def finetuned(model, data, args, seed, teachers=None):
    from otcompress.finetune import finetune

    m = copy.deepcopy(model)
    rep = finetune(m, data, steps=args.steps, lr=args.lr, batch_size=args.batch_size, seed=seed,
                   teachers=teachers)
    return m, rep["seconds"]


# --------------------------------------------------------------------------- one seed


def run_seed(seed, args, tokenizer, tok_path, clock, log):
    import otcompress
    from otcompress import pipeline, recipes
    from otcompress.data import load_data

    t = time.perf_counter()
    zoo_models = {}
    for role, widths, s in (("parent 1", WIDE, 10 * seed + 1), ("parent 2", WIDE, 10 * seed + 2),
                            ("anchor", NARROW, 10 * seed + 3)):
        t_m = time.perf_counter()
        zoo_models[role] = trained_llama(tokenizer, tok_path, widths, s, args.train_steps, args.cache_dir)
        log(f"  seed {seed} {role} (h{widths['hidden']}, model seed {s}): "
            f"{time.perf_counter() - t_m:.0f} s (trained in {zoo_models[role][2]['seconds']:.0f} s)")
    clock.phase("train or load models", t)
    (p1, p1_path, _), (p2, p2_path, _), (anchor, anchor_path, _) = (zoo_models[r] for r in
                                                                     ("parent 1", "parent 2", "anchor"))
    data = load_data("pydoc", anchor, tokenizer=tokenizer, max_length=MAX_LEN)
    out = {"seed": seed, "models": {r: {"path": str(p), "train_s": info["seconds"]}
                                    for r, (_, p, info) in zoo_models.items()}}

    # Homogeneous: parent 2 into parent 1's width.
    t = time.perf_counter()
    homo = {"parent 1": lm_metrics(p1, data), "parent 2": lm_metrics(p2, data),
            "ensemble (2 forward passes)": ensemble_metrics([p1, p2], data)}
    vf = otcompress.vanilla_fuse(p1, [p2])
    t_f = time.perf_counter()
    ot = otcompress.fuse(p1, [p2], alignment="weights")
    ot_s = time.perf_counter() - t_f
    homo["vanilla fusion, one-shot"] = lm_metrics(vf, data)
    homo["OT weights-based, one-shot"] = lm_metrics(ot, data) | {"fuse_s": ot_s}
    # Context for the one-shot numbers (not finetuned): exact OT, and OT on activations.
    homo["OT weights-based EMD, one-shot"] = lm_metrics(otcompress.fuse(p1, [p2], solver="emd"), data)
    calib = list(data.calibration_batches(CALIB_SAMPLES, 64, seed=seed))
    homo["OT activations-based, one-shot"] = lm_metrics(
        otcompress.fuse(p1, [p2], alignment="activations", data=calib), data)
    clock.phase("homogeneous one-shot", t)
    t = time.perf_counter()
    for name, start in (("vanilla fusion", vf), ("OT weights-based", ot), ("parent 1", p1)):
        m, s = finetuned(start, data, args, seed)
        homo[f"{name} + N"] = lm_metrics(m, data) | {"finetune_s": s}
    clock.phase("homogeneous + N", t)
    log(f"  seed {seed} homogeneous: " + ", ".join(f"{k} {v['loss']:.3f}" for k, v in homo.items()))

    # Heterogeneous: both parents into the narrow anchor.
    t = time.perf_counter()
    het = {"anchor": lm_metrics(anchor, data)}
    m, s = finetuned(anchor, data, args, seed)
    het["anchor + N finetuned"] = lm_metrics(m, data) | {"finetune_s": s}
    m, s = finetuned(anchor, data, args, seed, teachers=[p1, p2])
    het["anchor + N distilled from the parents"] = lm_metrics(m, data) | {"finetune_s": s}
    clock.phase("heterogeneous controls", t)
    t = time.perf_counter()
    recipe = {**recipes.defaults(), "finetune_steps": args.steps, "lr": args.lr, "batch_size": args.batch_size,
              "seed": seed}
    fused, report = pipeline.run(str(anchor_path), [str(p1_path), str(p2_path)], recipe, data=data)
    pipe_s = time.perf_counter() - t
    race = report.get("race") or {}
    het["otcompress pipeline (default recipe) + N"] = lm_metrics(fused, data) | {
        "wall_s": pipe_s, "winner": race.get("winner")}
    het["race"] = [{"candidate": c["candidate"], "one_shot_loss": (c.get("one_shot") or {}).get("loss"),
                    "one_shot_holdout_loss": c.get("one_shot_holdout_loss"),
                    "raced_holdout_loss": c.get("holdout_loss")} for c in race.get("candidates", [])]
    het["race_steps_each"] = race.get("steps_each")
    het["race_extra_steps"] = race.get("extra_steps")
    clock.phase("heterogeneous pipeline", t)
    log(f"  seed {seed} heterogeneous: " + ", ".join(f"{k} {v['loss']:.3f}" for k, v in het.items()
                                                      if isinstance(v, dict)))
    out["homogeneous"], out["heterogeneous"] = homo, het
    return out


# --------------------------------------------------------------------------- report


def arm_rows(results, section, control):
    """Rows: arm, loss, perplexity, accuracy, paired Δ loss vs `control` (+ = better)."""
    arms = [k for k, v in results[0][section].items() if isinstance(v, dict)]
    rows = []
    for arm in arms:
        vals = {k: [r[section][arm][k] for r in results] for k in METRICS}
        base = [r[section][control]["loss"] for r in results]
        delta = common.summarize([b - v for v, b in zip(vals["loss"], base)])
        rows.append([arm, common.fmt(common.summarize(vals["loss"]), digits=3),
                     common.fmt(common.summarize(vals["perplexity"]), digits=1),
                     common.fmt(common.summarize(vals["accuracy"]), 100.0, 1),
                     "0" if arm == control else common.fmt(delta, digits=3)])
    return rows


def verdict(results, section, arm, control):
    vals = [r[section][arm]["loss"] for r in results]
    base = [r[section][control]["loss"] for r in results]
    c = common.compare(vals, base, higher_better=False)
    imp = c["improvement"]
    if imp["mean"] > c["spread"]:
        word = "better by more than the spread"
    elif imp["mean"] < -c["spread"]:
        word = "worse by more than the spread"
    else:
        word = "within the spread (no difference shown)"
    return (f"- {arm} vs {control}: loss improvement {imp['mean']:+.3f} (per seed "
            f"{', '.join(f'{v:+.3f}' for v in imp['values'])}); spread {c['spread']:.3f} -> **{word}**"
            f"{'; better on every seed' if c['wins_every_seed'] else ''}")


def render(payload) -> str:
    env, res, a = payload["environment"], payload["results"], payload["setup"]
    n = a["steps"]
    headers = ["arm", "eval loss", "perplexity", "token accuracy %", f"Δ loss vs control (paired, + = better)"]
    L = [f"# Decoder LMs: small LLaMA causal LMs on the pydoc corpus", "",
         (f"`{env['command']}` — {env['date']}, **1 torch thread** (set by the script; "
          f"OMP_WAIT_POLICY={env['omp_wait_policy']}), {env['cores']}-core {env['cpu']} shared with other "
          f"jobs (load average {env['loadavg_start'][0]:.1f} at start, {env['loadavg_end'][0]:.1f} at end); "
          f"wall time {env['wall_s']:.0f} s ({', '.join(f'{k} {v:.0f} s' for k, v in env['phases_s'].items())}); "
          f"torch {env['torch']}, transformers {env['transformers']}. Training the "
          f"{sum(len(r['models']) for r in res)} models took "
          f"{sum(m['train_s'] for r in res for m in r['models'].values()):.0f} s when they were not yet "
          "cached (counted in the wall time only then)."), "",
         (f"Data: pydoc paragraphs (fixed 90/10 split: {a['train_examples']} train / {a['eval_examples']} eval "
          f"paragraphs, {a['eval_tokens']} predicted eval tokens), WordPiece vocabulary {a['vocab']} "
          f"(`zoo.pydoc_tokenizer`), at most {MAX_LEN} tokens per paragraph. Models: LLaMA, 2 layers; "
          f"parents hidden {WIDE['hidden']}, {WIDE['heads']} heads, {WIDE['kv']} KV heads, MLP {WIDE['inter']}; "
          f"anchor hidden {NARROW['hidden']}, {NARROW['heads']} heads, {NARROW['kv']} KV head, MLP "
          f"{NARROW['inter']} (head width 16 in both); untied heads. Each model trained {a['train_steps']} steps "
          f"(AdamW lr {TRAIN_LR:g}, batch {TRAIN_BATCH}, 5% warm-up, cosine) from its own seed. Every finetuning "
          f"arm: N = {n} steps, AdamW lr {a['lr']:g}, batch {a['batch_size']}, 10% warm-up then cosine, the "
          f"same batch order per seed; distillation: alpha 0.5, temperature 2, teachers = both parents. Seeds "
          f"{a['seeds']}. Numbers: mean ± std [min–max] over seeds; Δ is paired per seed."), "",
         "## Homogeneous: parent 2 fused into parent 1 (hidden 64)", ""]
    L += common.md_table(headers, arm_rows(res, "homogeneous", "parent 1 + N"))
    L += ["", "Control for Δ: parent 1 finetuned N more steps.", ""]
    for arm in ("OT weights-based + N", "vanilla fusion + N"):
        L.append(verdict(res, "homogeneous", arm, "parent 1 + N"))
    L.append(verdict(res, "homogeneous", "OT weights-based, one-shot", "vanilla fusion, one-shot"))
    L += ["", "## Heterogeneous: both parents into the narrow anchor (hidden 32)", ""]
    L += common.md_table(headers, arm_rows(res, "heterogeneous", "anchor + N finetuned"))
    L += ["", "Control for Δ: the anchor finetuned N steps.", ""]
    for control in ("anchor + N finetuned", "anchor + N distilled from the parents"):
        L.append(verdict(res, "heterogeneous", "otcompress pipeline (default recipe) + N", control))
    h0 = res[0]["heterogeneous"]
    L += ["", (f"The pipeline's starting-point race: every start is scored one-shot on held-out train "
               f"examples; the fold and the better anchor-side start (OT or anchor) then train the first "
               f"{h0['race_steps_each']} steps of the N-step run with distillation, and the lower held-out loss "
               f"continues to N on every training example (extra cost: {h0['race_extra_steps']} steps). "
               "One-shot eval loss = before any step, on the eval split (reported only, never used to choose):"),
          ""]
    rows = []
    num = lambda v: "—" if v is None else f"{v:.3f}"  # noqa: E731
    for r in res:
        h = r["heterogeneous"]
        for c in h["race"]:
            rows.append([r["seed"], c["candidate"], num(c["one_shot_loss"]), num(c["one_shot_holdout_loss"]),
                         num(c["raced_holdout_loss"]),
                         "winner" if c["candidate"] == h["otcompress pipeline (default recipe) + N"]["winner"]
                         else ""])
    L += common.md_table(["seed", "candidate", "one-shot eval loss", "one-shot held-out loss",
                          "held-out loss after the race steps", ""], rows)
    L += ["", "## Notes", ""] + [f"- {x}" for x in payload["notes"]] + [""]
    return "\n".join(L) + "\n"


NOTES = [
    "One thread on purpose: the machine has 2 cores and other long jobs; its load average is in the header. "
    "Step times (and so the wall time) move with that load.",
    "The pipeline scores its race on a tenth of the train split (at least 64 paragraphs) held out from the "
    "race's training, then finishes on every training example; it spends the race steps of the losing "
    "start on top of N (its report's `extra_steps`), i.e. more compute than the control arms.",
    "Vanilla fusion averages independently trained parents unit by unit; OT first aligns parent 2's heads, "
    "KV groups, MLP and residual units to parent 1's (rotary heads move whole), then averages.",
    "The ensemble needs both parents' forward passes: an upper reference, not a fused model.",
    "Why OT does no better than vanilla averaging here (a reading, not a proof): LLaMA's maps may only move "
    "whole heads (rotary pairs fix the units inside a Q/K head), and the engine keeps the identity inside V "
    "heads too, though V/o_proj units could be permuted freely; Q/K pairs also have a continuous symmetry "
    "(the same 2-D rotation of each frequency pair in Q and K leaves scores unchanged) that no permutation "
    "captures. So the attention of independently trained parents stays unaligned. On the same corpus and "
    "budget, two GPT-2 LMs (hidden 64, no rotary, seed-1/2, measured once while writing this benchmark) "
    "fused one-shot at 5.06 (OT EMD or activations) against 5.33 for vanilla averaging (parents 4.79/4.92).",
    f"Activation statistics for the activations-based row: {CALIB_SAMPLES} train paragraphs (every "
    "non-padding token a sample).",
]


def rerender(stem="decoder_lm"):
    """Rewrite the .md from the .json (after a change to the report's layout)."""
    payload = json.loads((common.RESULTS / f"{stem}.json").read_text())
    (common.RESULTS / f"{stem}.md").write_text(render(payload))


def main(argv=None):
    args = parse_args(argv)
    common.set_threads(1)
    common.quiet_libraries()
    from otcompress import zoo
    from otcompress.data import load_data

    q = args.quick
    args.seeds = args.seeds or ([0] if q else [0, 1, 2])
    args.train_steps = args.train_steps or (40 if q else 250)
    args.steps = args.steps or (10 if q else 100)
    clock = common.Clock()
    env = common.environment(1)
    log = common.log
    tokenizer, tok_path = zoo.pydoc_tokenizer(VOCAB, args.cache_dir)
    log(f"[decoder_lm] seeds {args.seeds}, train {args.train_steps} steps, N = {args.steps}, 1 thread")
    results = [run_seed(s, args, tokenizer, tok_path, clock, log) for s in args.seeds]
    first = results[0]["heterogeneous"]["anchor"]
    from transformers import LlamaForCausalLM
    data = load_data("pydoc", LlamaForCausalLM(llama_config(tokenizer, **NARROW)), tokenizer=tokenizer,
                     max_length=MAX_LEN)
    env.update(wall_s=clock.total(), phases_s=clock.phases, loadavg_end=__import__("os").getloadavg(),
               command="python benchmarks/decoder_lm.py" + (" " + " ".join(sys.argv[1:]) if sys.argv[1:] else ""))
    payload = {"environment": env, "notes": NOTES,
               "setup": {"seeds": args.seeds, "train_steps": args.train_steps, "steps": args.steps,
                         "lr": args.lr, "batch_size": args.batch_size, "vocab": len(tokenizer),
                         "wide": WIDE, "narrow": NARROW, "max_length": MAX_LEN,
                         "train_examples": data.num_examples("train"),
                         "eval_examples": data.num_examples("eval"), "eval_tokens": first["tokens"]},
               "results": results}
    stem = "decoder_lm.quick" if q else "decoder_lm"
    common.RESULTS.mkdir(exist_ok=True)
    (common.RESULTS / f"{stem}.json").write_text(json.dumps(payload, indent=2, default=str) + "\n")
    text = render(payload)
    (common.RESULTS / f"{stem}.md").write_text(text)
    print(text)
    log(f"[decoder_lm] wrote benchmarks/results/{stem}.md/.json in {clock.total():.0f} s")


if __name__ == "__main__":
    main()
