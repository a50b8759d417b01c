"""The whole fuse workflow as one library call: validate, load, fuse (or race
the candidate starting points), finetune with distillation, measure, write a
`from_pretrained` directory. The CLI only parses, calls this and prints.

The default recipe (alignment "auto") is built not to lose to what a user
gets without otcompress. Which start is best depends on what follows
(benchmarks/results/compress_digits.md): the folded parents win after enough
distilled finetuning, but start far below a good anchor and only overtake it
after about a fifth to a third of a 300-step run, clearly only by half of it
(held-out loss at 30%: 0.593 vs 0.777, at 50%: 0.338 vs 0.584 on the weak
digits anchor; a 0.3 race still kept the anchor on 1 of 3 seeds). So the candidates are the
fold of all parents (with reconstruction also each parent folded and each
pruned on its own, which the fold of all parents must lead by a margin where a
task loss trains after it: `candidates` says why), anchor-weighted OT fusion and the anchor itself; with calibration data every
fused start is reconstructed first (`reconstructs`, reconstruct.py: each layer
refitted to the parents' outputs). All are scored one-shot on held-out
training examples (a tenth of the train split, never the eval split); the
lowest of each group (parents' starts, anchor-side starts) is its group's
start. With N = 0 the lowest one-shot held-out loss wins. With N finetuning
steps, a parents' start already below every anchor-side start one-shot wins
without a race (it has nothing left to overtake; reconstruction puts the weak
digits anchor's fold there); else the parents' start trains the first
`race_fraction * N` steps (0.5) of its N-step run, and continues alone if it is
then below every anchor-side start's one-shot loss (`_passes`: the run spends
N); else the anchor-side start trains the same first steps of the *same* run
(schedule, batches, teachers) and the lower held-out loss continues to N, on
every training example. With only one
start to train (no anchor: the parents' start; an anchor the parents cannot
be folded into: the better anchor-side start) nothing is raced: it trains all
N steps on every example, and the report's race says so. Teachers are the
parents by default.

Headless models (embedding models: BertModel, a sentence-transformers
checkpoint) have no task loss: every loss above is then the similarity
distillation loss of their pooled embeddings against the parents'
(otcompress.embedding), and the parents are always the teachers."""
from __future__ import annotations

import copy
import dataclasses
import math
import os
import re
import time
from pathlib import Path

import torch

from otcompress import finetune as ft, inputs, modelio, outputs, recipes
from otcompress.architectures import is_headless
from otcompress.errors import (DataError, DivergedError, InvalidOptionError, ModelLoadError, OTCompressError,
                               UnreachableShapeError)
from otcompress.options import FUSE_OPTIONS, PASSED, FuseOptions

HOLDOUT_FRACTION, HOLDOUT_MIN = 0.1, 64
ANCHOR_WEIGHT = 0.8  # the OT candidate's mixing weight of the anchor (benchmarks: 0.8 ties, uniform loses)
ALL_PARENTS_LEAD = 2 / 3  # a fold must reach 2/3 of the best parent's prune's one-shot loss (`candidates`)
FUSE_KEYS = PASSED  # recipe values handed to `fusion.fuse` as they are (declared in `options`)


def run(anchor, parents, recipe: dict, out=None, *, target=None, data=None, force=False, device="cpu",
        trust_remote_code=False, progress=None, log=None):
    """Run a recipe (keys of `recipes.RECIPE_KEYS`; missing keys take their
    defaults, as on the command line) and return (model, report); with
    `out`, also write the model directory there (staged: a failure leaves
    nothing behind). The model is None when it was written straight to `out`
    without being built (parents given as directories and streamed, nothing
    to evaluate or train): load it from `out`.
    `anchor` is a model or directory, or None with `target` (a dict of
    widths, e.g. {"hidden": 32}) to fold the parents into the first parent's
    architecture at those widths. `data` (a `TaskData`) replaces the recipe's
    data spec. `progress(stage, done, total)` and `log(message)` are optional
    callbacks."""
    log = log or (lambda msg: None)
    device = modelio.checked_device(device)
    r = {**recipes.defaults(), **recipes.check_recipe(
        {k: v for k, v in recipe.items() if k != "profile"}, "recipe"), "profile": recipe.get("profile")}
    from otcompress.data import spec_path
    mine = outputs.input_paths(anchor, *parents, spec_path(r["data"]))  # --out may neither be nor hold one
    if out is not None:
        outputs.check_out(out, force, inputs=mine, log=log)
    parents = list(parents)
    given = _check_inputs(anchor, parents, r, target, trust_remote_code, data is not None)
    anchor_cfg = given.anchor_config
    # The caller's settings that differ from the defaults must all count (flags are checked by the CLI);
    # a named profile's are defaults too: a flag may make one of them moot (--steps 0 and its lr).
    profile = _profile_values(r["profile"])
    unused = recipes.ineffective(r, [k for k, v in recipe.items() if k in recipes.RECIPE_KEYS
                                     and v != profile.get(k, recipes.RECIPE_KEYS[k][1])],
                                 has_data=bool(r["data"] or data))
    if unused:
        raise InvalidOptionError(f"recipe option '{unused[0]}' {unused[1]}")
    notes = _width_notes(given) if anchor is not None else []
    for note in notes:
        log(f"[yellow]warning:[/yellow] {note}")
    started = time.time()
    # Fusion computes where the anchor lives: load everything on `device` (the configs the checks read).
    load = lambda m, cfg: _on(modelio.load_model(m, trust_remote_code=trust_remote_code, config=cfg),  # noqa: E731
                              device, given=m)
    anchor_m = None if anchor is None else load(anchor, anchor_cfg)
    fuse_anchor = anchor_m if anchor_m is not None else anchor_cfg
    source = anchor if anchor is not None else parents[0]  # its preprocessor files come along
    if data is None and r["data"]:
        data = load_task_data(r["data"], anchor_m or anchor_cfg, source, r["seed"], r["pooling"])
    elif data is not None and r["pooling"]:
        data = dataclasses.replace(data, pooling=r["pooling"])
    if r["finetune_steps"] and not _trainable(data):  # before any fusion, not after it
        raise DataError(f"data spec '{data.spec}' has no labels, needed to finetune {data.task} "
                        f"(--steps {r['finetune_steps']}); give labelled data, or --steps 0 to calibrate only")
    # Headers are read now: a directory that cannot stream (other weight formats, a broken
    # file) is loaded, which says what is wrong before any work.
    lazy = [modelio.lazy_model(p, trust_remote_code=trust_remote_code, config=cfg)
            for p, cfg in zip(parents, given.parent_configs)] if _streamed(parents, r, data) else [None]
    streamed = all(m is not None for m in lazy)
    for p, m in zip(parents, lazy if streamed else []):  # before any work (a loaded model was checked as it loaded)
        modelio.check_streamed(p, m)
    parent_ms = list(parents) if streamed else [load(p, c) for p, c in zip(parents, given.parent_configs)]
    if streamed:
        log("parents are read tensor by tensor from their directories (never loaded whole)")
    finish = lambda rep, **kw: _finish_report(rep, notes, anchor, parents, r, started, **kw)  # noqa: E731
    if streamed and data is None and out is not None and ft.is_main_process():
        # Nothing to evaluate or train: the fused model goes to disk tensor by tensor, never built.
        return None, _fuse_to_disk(fuse_anchor, parent_ms, r, out, force, progress, log,
                                   lambda stage, report: write_files(report, source, stage, r, anchor_cfg.hidden_size),
                                   finish, alignment=_resolve_alignment(r["alignment"], anchor_m), device=device)
    reference = parent_ms if data is not None and data.task == "feature-extraction" else None
    model, report, trainer, holdout, one_shot = _fuse_and_train(fuse_anchor, anchor_m, parent_ms, data, r, device,
                                                                  progress, log, reference, given.foldable)
    trained = None
    if trainer is not None and r["finetune_steps"]:
        trained = {**trainer.summary(), "lr": trainer.lr, "batch_size": r["batch_size"],
                   "teachers": len(trainer.teachers), "holdout_examples": _n(holdout),
                   "restart": trainer.restart}
        trained.pop("losses", None)
    report = finish(report, finetune=trained,
                    metrics=_metrics(anchor_m, model, one_shot, data, r, device, reference, progress))
    from otcompress.data import record_class_names
    if trained is not None and record_class_names(model.config, data):  # what it was trained to call them
        report["class_names"] = list(model.config.id2label.values())
    model.fusion_report = report
    if out is not None and ft.is_main_process():  # under accelerate launch only rank 0 writes
        with outputs.staged_dir(out, force, inputs=mine) as tmp:
            write(model, report, source, tmp, r)
    return model, report


def _profile_values(name) -> dict:
    """A named profile's values (the recipe's defaults there); {} where the
    name is only a label that no longer resolves (a reused report's recipe)."""
    try:
        return recipes.load_recipe(name) if name else {}
    except OTCompressError:
        return {}


def _fuse_to_disk(fuse_anchor, parents, r, out, force, progress, log, write_rest, finish, alignment,
                  device=None):
    """The fusion written to `out` shard by shard (`fusion.fuse_to_disk`), the
    workflow's files added before the move; returns the finished report."""
    log(f"fusing {len(parents)} parent(s) ({alignment}), writing {out} as it goes")
    done = {}

    def add_files(stage, report):
        done["report"] = finish(report)
        write_rest(stage, done["report"])
    _fuse(fuse_anchor, parents, alignment, None, {**{k: r[k] for k in FUSE_KEYS}, "device": device,
                                                  "reconstruct": False}, r, progress,
          weights=r["weights"], out=out, force=force, finish=add_files)
    return done["report"]


def _on(model, device, given):
    """`model` on `device`; a caller's model object elsewhere is copied first
    (`.to` moves a module in place: the caller's would be left moved)."""
    if model is given and any(p.device != torch.device(device) for p in model.parameters()):
        model = copy.deepcopy(model)
    return model.to(device)


def _fuse_and_train(fuse_anchor, anchor_m, parent_ms, data, r, device, progress, log, reference, foldable):
    """The race of starting points (alignment auto, held-out data) or one
    fusion, then the finetuning: (model, fusion report, trainer or None,
    held-out data or None, one-shot metrics or None)."""
    # Held-out examples choose the race's start and reg "auto"; nothing else reads them.
    chooses = r["alignment"] == "auto" or r["reg"] == "auto"
    train, holdout = split_holdout(data, r["seed"]) if _trainable(data) and chooses else (data, None)
    calib = None if data is None else list(data.calibration_batches(r["samples"], r["batch_size"],
                                                                    seed=r["seed"]))
    teachers = parent_ms if r["distill"] or reference else []
    trainer_kw = dict(steps=r["finetune_steps"], lr=r["lr"], batch_size=r["batch_size"], seed=r["seed"],
                      teachers=teachers, distill_alpha=r["distill_alpha"], device=device,
                      progress=(lambda d, t, i=None: progress("finetune", d, t)) if progress else None)
    fuse_kw = {k: r[k] for k in FUSE_KEYS}
    fuse_kw["device"] = device  # where a streamed fold computes (models already loaded stay where they are)
    fuse_kw["reconstruct"] = reconstructs(r, data)
    fuse_kw["pooling"] = data.pooling if data is not None else None  # headless models' reg auto
    if r["alignment"] == "auto" and holdout is not None:
        race = Race(train, holdout, trainer_kw, math.ceil(r["race_fraction"] * r["finetune_steps"]),
                    one_shot=lambda m, name: _evaluate(m, data, device, reference,
                                                       relabelled(progress, f"scoring {name} (eval split)")),
                    reference=reference, progress=progress, parents=_loaded(parent_ms))
        model, trainer, report, one_shot = race.run(
            candidates(fuse_anchor, anchor_m, parent_ms, calib, fuse_kw, r, progress, holdout, foldable), log)
        if trainer is not None:  # the winner continues on every training example
            # (its race steps were distilled; a headless model's teachers are its only loss: kept)
            if reference is None and not _parents_teach(trainer_kw, report, log):
                trainer.teachers = []
            trainer.use_data(data).run(r["finetune_steps"])
        elif r["finetune_steps"]:  # nothing was raced: the one start trains all N steps, on every example
            kw = trainer_kw if _parents_teach(trainer_kw, report, log) else {**trainer_kw, "teachers": []}
            trainer = _train(model, data, kw, log)
        return model, report, trainer, holdout, one_shot
    alignment = _resolve_alignment(r["alignment"], anchor_m)
    log(f"fusing {len(parent_ms)} parent(s) ({alignment})")
    model = _fuse(fuse_anchor, parent_ms, alignment, calib, fuse_kw, r, progress,
                  weights=r["weights"], holdout=holdout)
    one_shot = None
    if _trainable(data):
        one_shot = _evaluate(model, data, device, reference, relabelled(progress, "scoring one-shot (eval split)"))
    # Held-out examples only chose reg (reg auto): training uses every example.
    trainer = _train(model, data, trainer_kw, log) if r["finetune_steps"] else None
    return model, model.fusion_report, trainer, holdout, one_shot


def _parents_teach(trainer_kw, report, log) -> bool:
    """Whether the parents stay the start's teachers: not where the race
    scored them no better than the start it chose on the held-out examples
    (`Race._far_behind`; a warning says so): distilling would pull the start
    towards worse models (a trained anchor with weaker parents: accuracy
    48.4% -> 47.6% distilled 20 steps, 50.0% without)."""
    race = report.get("race") or {}
    parents = race.get("parents_holdout_loss")
    chosen = next((c for c in race.get("candidates", []) if c["candidate"] == race.get("winner")), None)
    if not parents or not trainer_kw["teachers"] or chosen is None or min(parents) < chosen["one_shot_holdout_loss"]:
        return True
    note = (f"the parents scored no better than the start ({race['winner']}) on the held-out examples "
            f"({min(parents):.4g} against {chosen['one_shot_holdout_loss']:.4g}): it was finetuned without "
            "distilling from them")
    log(f"[yellow]warning:[/yellow] {note}")
    report.setdefault("warnings", []).append(note)
    return False


def _train(model, data, trainer_kw, log):
    """Finetune a start all N steps (`_started`, then the rest)."""
    return _started(model, data, trainer_kw, log).run(trainer_kw["steps"])


def _started(model, data, trainer_kw, log, upto=None):
    """A Trainer of `model` that has trained the first steps of its N-step
    run, to the climb check (`finetune.climb_check`, at most `upto`). An
    embedding model's run whose loss climbs by then (`finetune.climb`) is
    collapsing a start better than the lr allows for, and does not recover
    (all-MiniLM-L6-v2 reconstructed to 192 wide, lr 1e-3: the similarity loss
    doubles by step 20, Pearson falls from 0.44 one-shot to 0.09 / 0.16 / 0.09
    over 3 seeds): it restarts once from the start at lr / BACK_OFF (0.53 /
    0.56 / 0.55), as does one whose loss becomes NaN before the check (a
    second one is the one-line error); the steps it spent count (the returned
    trainer's `restart`, read by `run` and the race; `steps_spent`). A task
    head's climb is a transient that training recovers from, and restarting
    it measured worse (digits 4 -> 2 blocks x 32, lr tuned: 96.81 against
    97.33): it is left alone."""
    trainer = ft.Trainer(model, data, **trainer_kw)
    check = ft.climb_check(trainer_kw["steps"], trainer.warmup)
    if upto is not None and upto < check:  # a race too short to show a climb: not judged in it
        return trainer.run(upto)
    if trainer.pooling is None or trainer.world > 1:  # several processes: no one decision (untested: no GPUs)
        return trainer.run(check)
    start = {k: v.detach().clone() for k, v in model.state_dict().items()}
    window = ft.climb_window(check)
    before = trainer.loss_before(window, skip=check - window)  # the batches the climb is measured on
    try:
        trainer.run(check)
        climbed = ft.climb(before, trainer.losses, check)
    except DivergedError:  # NaN/Inf before the check: the steepest climb (at lr / BACK_OFF it may not)
        climbed = (before, math.inf)
    if climbed is None:
        return trainer
    lr = trainer_kw["lr"] / ft.BACK_OFF
    wasted = trainer.done + (climbed[1] == math.inf)  # the step that met NaN computed its forward pass
    then = f"{climbed[1]:.4g}" if math.isfinite(climbed[1]) else "NaN/Inf"
    log(f"[yellow]warning:[/yellow] the training loss climbed from {climbed[0]:.4g} to {then} by "
        f"step {wasted} at lr {trainer_kw['lr']:g}; restarting from the start at lr {lr:g}")
    del trainer  # its optimizer state (2x the parameters) is not kept through the retried run
    model.load_state_dict(start)
    del start
    retried = ft.Trainer(model, data, **{**trainer_kw, "lr": lr}).run(check)
    retried.restart = {"lr_before": trainer_kw["lr"], "lr": lr, "wasted_steps": wasted,
                       "loss_before": round(climbed[0], 6),
                       "loss_at_check": round(climbed[1], 6) if math.isfinite(climbed[1]) else None}
    return retried


def _loaded(parent_ms):
    """The parents as models, or None where they are streamed from disk (no
    teachers, `_streamed`): the race then trains a start far behind too."""
    return parent_ms if all(isinstance(p, torch.nn.Module) for p in parent_ms) else None


def _wasted(trainer) -> int:
    """The steps a trainer's run threw away restarting (`_started`)."""
    return (trainer.restart or {}).get("wasted_steps", 0)


def steps_spent(report: dict) -> int:
    """Every training step a recipe's run took: N, the race's losing starts',
    and those of a run that climbed and restarted (the budget a fair control gets)."""
    trained = report.get("finetune") or {}
    restart = trained.get("restart") or {}
    return trained.get("steps", 0) + (report.get("race") or {}).get("extra_steps", 0) + restart.get("wasted_steps", 0)


def _streamed(parents, r, data) -> bool:
    """Parent directories are read tensor by tensor, never loaded whole, when
    nothing needs them as models: no teachers to distil from, no reference
    embeddings to score against, and fusions without forward passes
    (`fusion.streams`: weights or fold alignment, averaged residuals, no
    repair, no reg sweep)."""
    from otcompress.fusion import streams
    if not all(isinstance(p, (str, os.PathLike)) for p in parents):
        return False
    alignments = ("fold", "weights") if r["alignment"] == "auto" else (r["alignment"],)
    refit = reconstructs(r, data)
    if not all(streams(a, r["solver"], r["reg"], r["residual"], r["repair"], r["depth_merge"], reconstruct=refit)
               for a in alignments):
        return False
    embeddings = data is not None and data.task == "feature-extraction"
    return not embeddings and not (r["finetune_steps"] > 0 and r["distill"])


def reconstructs(r, data) -> bool:
    """The recipe's `reconstruct` for `fuse`: "on"/"off", or "auto": on
    wherever there is data. A reconstructed embedding model can start better
    than the default lr allows for (all-MiniLM-L6-v2 -> 6 x 192: Pearson 0.44
    one-shot, 0.09 after 150 steps at lr 1e-3, 0.53 at 1e-4): the climbing
    loss restarts its run at a tenth of the lr (`_train`)."""
    return data is not None and r["reconstruct"] != "off"


def _finish_report(report, notes, anchor, parents, r, started, finetune=None, metrics=None) -> dict:
    """The fusion report with the workflow's own parts: warnings, inputs,
    finetuning, metrics, the resolved recipe and the wall time."""
    report = dict(report)
    report["warnings"] = [*notes, *report.get("warnings", [])]
    report["anchor"] = modelio.describe(anchor) if anchor is not None else report.get("anchor")
    report["parents"] = [modelio.describe(p) for p in parents]  # a model object: its name, not its repr
    if finetune is not None:
        report["finetune"] = finetune
    report["metrics"] = metrics or {}
    report["recipe"] = r
    report["steps_spent"] = steps_spent(report)
    report["wall_seconds"] = time.time() - started
    return report


def _check_inputs(anchor, parents, r, target, trust_remote_code, given_data=False):
    """The workflow's inputs checked once, before any weights are read: the
    fusion's own checks (`inputs.check`: options, configs, fold target) with
    the recipe's options, then what only the workflow needs (data for the
    recipe, tokenizers, pooling, headless training). Returns the `Inputs`."""
    if (anchor is None) == (target is None):
        raise InvalidOptionError("give an anchor, or a target width (hidden/heads/intermediate), not both")
    needs_data = (r["alignment"] == "activations" or r["residual"] != "average" or r["reg"] == "auto"
                  or r["finetune_steps"] > 0)
    if needs_data and not (r["data"] or given_data):
        raise InvalidOptionError("this recipe needs --data (activations, weighted residuals, reg auto "
                                 "or finetuning)")
    o = FuseOptions(**{k: r[k] for k in FUSE_OPTIONS if k in r})
    # "auto" is checked as the fusion it makes without a race (`_resolve_alignment`).
    o.alignment = _resolve_alignment(r["alignment"], anchor)
    o.data = (r["data"] or given_data) or None
    o.reconstruct = r["reconstruct"] == "on"  # only "on" can be refused (no data); "auto" is off without it
    o.trust_remote_code = trust_remote_code
    given = inputs.check(anchor, parents, o, target=target)
    if isinstance(anchor, (str, os.PathLike)):
        check_tokenizers(anchor, parents)
    headless = is_headless(anchor if hasattr(anchor, "config") else given.anchor_config)
    if r["pooling"] and not headless:
        raise InvalidOptionError(f"pooling '{r['pooling']}' applies to headless (embedding) models; this one "
                                 "has a task head")
    if headless and r["finetune_steps"] > 0 and not r["distill"]:
        raise InvalidOptionError("a headless model (no task head) trains only by distilling the parents' "
                                 "embeddings: drop --no-distill or --finetune-steps")
    return given


def _width_notes(given) -> list[str]:
    """An anchor wider than a parent is allowed (OT maps are rectangular) but
    rarely meant: the result has the anchor's width, so nothing is compressed."""
    return [f"the anchor is wider than parent {k} ({what} {target} > {parent}): the result keeps the "
            "anchor's widths; the wide models are usually the parents"
            for k, what, parent, target in given.wider_widths()]


def check_tokenizers(anchor, parents, mine_is="the anchor", theirs_are="parent") -> None:
    """Parents (or teachers, reference models: `theirs_are`) whose tokenizer
    maps tokens to other ids than the anchor's (the model's: `mine_is`) read
    other embedding rows for the same text: fusing them mixes unrelated rows,
    distilling from them or scoring against them compares unrelated outputs.
    The vocabulary size alone does not show it (a shuffled vocabulary)."""
    from otcompress.errors import IncompatibleModelsError
    mine = _vocabulary(anchor)
    if mine is None:
        return
    for k, p in enumerate(parents, 1):
        theirs = _vocabulary(p)
        if theirs is None or theirs == mine:
            continue
        moved = sorted(t for t in mine.keys() & theirs.keys() if mine[t] != theirs[t])
        detail = (f"'{moved[0]}' is id {mine[moved[0]]} in {mine_is}'s, {theirs[moved[0]]} in the {theirs_are}'s"
                  if moved else f"{len(mine.keys() ^ theirs.keys())} tokens are in only one of them")
        raise IncompatibleModelsError(f"tokenizer mismatch: {theirs_are} {k}'s tokenizer is not {mine_is}'s "
                                      f"({detail})")


def _vocabulary(path) -> dict | None:
    """A directory's tokenizer vocabulary; None for a model object or a directory without one."""
    if not isinstance(path, (str, os.PathLike)):
        return None
    path = Path(path)
    if not path.is_dir() or not ((path / "tokenizer_config.json").exists() or (path / "tokenizer.json").exists()):
        return None
    try:
        return _preprocessors(path)[0].get_vocab()
    except Exception as e:  # noqa: BLE001 - any failure to read it is the directory's problem
        raise ModelLoadError(f"{path}: cannot load its tokenizer ({type(e).__name__}: "
                             f"{str(e).splitlines()[0] if str(e) else ''})") from None


def _resolve_alignment(alignment, anchor_m):
    """"auto" without held-out labelled data: fold into a bare target width,
    else the conservative anchor-weighted OT fusion."""
    if alignment != "auto":
        return alignment
    return "fold" if anchor_m is None else "weights"


def _fuse(anchor, parent_ms, alignment, calib, fuse_kw, r, progress, weights=None, holdout=None,
          out=None, force=False, finish=None, used=None):
    """One fusion; reg "auto" is chosen on the held-out examples when there are
    any. With `out`, written there tensor by tensor (`fusion.fuse_to_disk`,
    `finish(directory, report)` adding the other files) and the report returned.
    `used`: which of the recipe's parents (1-based) `parent_ms` are, where not
    all of them (a start built from one parent); its report says so, so that
    its depth maps are read against the right parents."""
    from otcompress import fusion
    if alignment == "weights" and weights is None and r["alignment"] == "auto":
        weights = anchor_weighted(len(parent_ms))
    held = None if holdout is None else list(holdout.batches("eval", r["batch_size"]))
    kw = dict(alignment=alignment, data=calib, weights=weights, seed=r["seed"], holdout=held,
              progress=progress, **fuse_kw)
    if used is not None and kw.get("depth_merge") == "parallel" and not _deeper(anchor, parent_ms):
        kw["depth_merge"] = "select"  # this start's parent has no blocks to merge (another parent has)
    if out is not None:
        return fusion.fuse_to_disk(anchor, parent_ms, out, force=force, finish=finish, **kw)
    model = fusion.fuse(anchor, parent_ms, **kw)
    if used is not None:
        model.fusion_report["parents_used"] = used
        # The fusion numbered the maps of its own parent list: the recipe's numbers (`fusion._flagged_maps`).
        model.fusion_report["warnings"] = [re.sub(r"^parent (\d+) ", lambda m: f"parent {used[int(m[1]) - 1]} ", w)
                                           for w in model.fusion_report.get("warnings", [])]
    return model


def _deeper(anchor, parent_ms) -> bool:
    """Whether a parent has more blocks than the anchor or fold target."""
    from otcompress.depth import depth

    def cfg(m):
        return modelio.load_config(m) if isinstance(m, (str, os.PathLike)) else getattr(m, "config", m)
    return any(depth(cfg(p)) > depth(cfg(anchor)) for p in parent_ms)


def anchor_weighted(n_parents: int) -> list:
    return [ANCHOR_WEIGHT] + [(1 - ANCHOR_WEIGHT) / n_parents] * n_parents


def candidates(fuse_anchor, anchor_m, parent_ms, calib, fuse_kw, r, progress, holdout=None, foldable=True):
    """(name, make, group[, lead[, parent]]) for every start the race tries;
    `make()` builds it lazily. Starts of one group are alike (both keep the
    anchor's function): with finetuning only the one with the lowest one-shot
    held-out loss (divided by its `lead`) trains. `parent`: the number of the one
    parent a start is made from (`Race._from_best_parent`)."""
    out = []
    if foldable:  # `inputs.Inputs.foldable`: else an anchor wider than a parent (OT and the anchor race)
        # Folding and pruning (the maps a pruning tool would make) are one group.
        # Without reconstruction, with finetuning, the fold of all parents is its
        # start: pruning keeps more of a parent one-shot, so it wins the one-shot
        # loss, but it trained to a worse model or at best a tie (all-MiniLM-L6-v2
        # -> 192 wide, 150 steps: Pearson 0.40 folded, 0.33 pruned; digits: ties).
        # Reconstructed starts compute close to what their parents compute, so
        # their one-shot loss ranks them as training does (pydoc BERT MLM, 100
        # steps: prune of A 5.624 one-shot -> 5.034 trained, fold of B 5.657 ->
        # 5.067, fold of both 5.892 -> 5.152): each parent folded and pruned on
        # its own competes too, and folding several parents must earn its place.
        # Each parent is pruned on its own: averaging independently pruned
        # parents is plain averaging of unaligned models.
        # Where a task loss trains after it, a parent's reconstructed *prune* is its start:
        # its units are the parent's own, and it trained better than the parent's fold, which
        # led it one-shot (pydoc BERT 4 x 64 -> 2 x 32, best parent, 100 steps: 5.327 / 5.317
        # against 5.349 / 5.357; digits 4 -> 2 x 16, 300 steps: 96.89 +- 0.22% against 96.22
        # +- 0.97%). A fold (of all parents, or of a lone parent) is chosen over it only with
        # a one-shot loss under ALL_PARENTS_LEAD times its (`Race`). With a small lead the fold
        # of several parents trained worse too: pydoc BERT (0.99x and 1.0x) 5.387 / 5.395
        # against 5.322-5.368; digits 4 -> 2 x 16 (0.85x) 95.78% against 96.22%. Where the
        # parents know different things its lead is large and it trains far better: digits
        # parents on classes 0-4 and 5-9 (0.31-0.45x) 80.7% after 300 steps against 65.9%.
        # The embedding objective, whose target is the parents' similarities together, ranks
        # every start on its one-shot loss (pydoc encoders: the seed the fold of all parents
        # won trained to 98.63 against 98.15 folding parent 1; all-MiniLM-L6-v2 -> 3 x 192,
        # 150 steps: fold 0.581 +- 0.012, prune 0.579 +- 0.013).
        several = len(parent_ms) > 1
        alone = fuse_kw.get("reconstruct") or not r["finetune_steps"]
        prune_first = alone and bool(r["finetune_steps"]) and fuse_kw.get("pooling") is None
        lead = ALL_PARENTS_LEAD if prune_first else 1.0
        share = r["weights"][1:] if r["weights"] else [1.0] * len(parent_ms)  # anchor first
        if any(share):  # --weights giving the parents no share: no start is made from them
            out.append(("fold: all parents" if several else "fold",
                        lambda: _fuse(fuse_anchor, parent_ms, "fold", calib, fuse_kw, r, progress,
                                      weights=r["weights"], holdout=holdout), "fold", lead))
        for alignment in (("prune",) if prune_first or not several else ("fold", "prune")) if alone else ():
            for k, p in [(k, p) for k, p in enumerate(parent_ms, 1) if share[k - 1] > 0]:
                out.append((f"{alignment}: parent {k}" if several else alignment,
                            lambda p=p, a=alignment, k=k: _fuse(fuse_anchor, [p], a, calib, fuse_kw, r, progress,
                                                                holdout=holdout, used=[k]), "fold", 1.0, k))
    if anchor_m is not None:  # the user's --weights (anchor first) where given
        w = inputs.mixing_weights(r["weights"], len(parent_ms)) if r["weights"] else anchor_weighted(len(parent_ms))
        name = f"OT fusion, weights {', '.join(f'{x:.3g}' for x in w)}" if r["weights"] else \
            f"OT fusion, anchor weight {ANCHOR_WEIGHT}"
        out.append((name, lambda: _fuse(anchor_m, parent_ms, "weights", calib, fuse_kw, r, progress, weights=w,
                                        holdout=holdout), "anchor-side"))
        out.append(("anchor", lambda: _anchor_copy(anchor_m), "anchor-side"))
    return out


class Race:
    """Every candidate start is built and scored one-shot on the held-out
    examples (task loss); with finetuning, the best of each group trains the
    first `steps` steps of its N-step run and is scored again. The lowest
    held-out loss wins. With only one start to train (a fold target without an
    anchor, or only the anchor-side starts), or a parents' start already ahead
    of every anchor-side start one-shot, there is nothing to race: it is
    returned untrained (trainer None) and the caller trains it all N steps.
    So is the anchor side's start when the parents' start is too far behind
    it to race (`_too_far_behind`) or given up (`_cannot_reach`)."""

    def __init__(self, train, holdout, trainer_kw, steps, one_shot=None, reference=None, progress=None,
                 parents=None):
        self.train, self.holdout, self.kw, self.steps = train, holdout, trainer_kw, steps
        self.parents = parents  # loaded parent models (`_far_behind`); None: not judged
        self.parent_losses = None  # their held-out losses, where `_far_behind` judged (`_parents_teach` reads them)
        self.ranked = None  # {parent number: held-out loss} of the parents single-parent starts may come from
        self.best_parent = None  # the one they were made from, where ranked
        self.parent_loss_cache = {}
        self.one_shot = one_shot  # reported only (on the eval split), never used to choose
        self.reference = reference  # headless models: scored against these models' embeddings
        self.progress = progress
        self.rows = []
        self.skipped = []  # starts that cannot be built for these shapes

    def _loss(self, model, name):
        # The probe set is no held-out loss: it never chooses, so it is not scored here.
        return ft.evaluate(model, self.holdout, device=self.kw["device"], reference=self.reference, probe=False,
                           progress=relabelled(self.progress, f"race: scoring {name} (held out)"))["loss"]

    def run(self, entries, log=lambda msg: None):
        entries = self._best_parent_first(list(entries))
        built, unbuilt = [], None
        for name, make, group, *rest in entries:  # rest: (lead, number of the one parent made from)
            parent = rest[1] if len(rest) > 1 else None
            if parent is not None and self.best_parent not in (None, parent):
                continue  # a better parent's start is built (`_best_parent_first`)
            log(f"race: {name}" if len(entries) > 1 else f"start: {name} (the only one possible)")
            t0 = time.perf_counter()
            try:
                model = make()
            except UnreachableShapeError as e:  # e.g. a grouped-query shape pruning cannot keep whole heads
                if len(entries) == 1:
                    raise
                log(f"[yellow]warning:[/yellow] race: {name} cannot be built ({e}); skipped")
                self.skipped.append({"candidate": name, "why": str(e)})
                unbuilt = e
                continue
            if parent is not None and self.ranked and self.best_parent is None:
                self.best_parent = parent
                log(f"race: starts made from one parent are made from parent {parent}, the lowest held-out loss "
                    f"of those they could be made from ({outputs.parent_losses(self.ranked)})")
            # A single start is chosen by nothing: no held-out scoring.
            row = {"candidate": name, "group": group, "lead": rest[0] if rest else 1.0,
                   "one_shot_holdout_loss": self._loss(model, name) if len(entries) > 1 else None,
                   "one_shot": self.one_shot(model, name) if self.one_shot else None,
                   "seconds": time.perf_counter() - t0}
            self.rows.append(row)
            built.append((row, model))
        if not built:
            raise unbuilt
        if len(built) == 1:
            return self._result(*built[0], None, "only candidate", steps=0)
        if self.kw["steps"] == 0:
            row, model = min(built, key=lambda b: b[0]["one_shot_holdout_loss"])
            return self._result(row, model, None, "one_shot_holdout_loss")
        best = {}
        for row, model in built:  # one per group: the lowest one-shot loss
            g = row["group"]
            if g not in best or _ranked(row) < _ranked(best[g][0]):
                best[g] = (row, model)
        if len(best) == 1:  # one group: the one-shot loss chose; racing it alone would choose nothing
            return self._result(*next(iter(best.values())), None, "one_shot_holdout_loss", steps=0)
        if _leads(best.get("fold"), [b for g, b in best.items() if g != "fold"]):
            return self._result(*best["fold"], None, "one_shot_holdout_loss", steps=0,
                                why="ahead of every anchor-side start already one-shot (held out)")
        anchor_side = [b for h, b in best.items() if h != "fold"]
        if "fold" in best and self._far_behind(best["fold"][0], anchor_side):
            side = min(anchor_side, key=lambda b: _ranked(b[0]))
            return self._result(*side, None, FAR_BEHIND_KEY, steps=0,
                                why=self._far_behind_why(best["fold"][0], side[0]))
        trained = []
        # The parents' start trains first: one that its race steps take below every
        # anchor-side start's one-shot loss has overtaken what the anchor side starts
        # from, and continues without the anchor side spending any step (`_passes`);
        # one that cannot get there is given up after twice its warm-up (`_cannot_reach`).
        for g in sorted(best, key=lambda g: g != "fold"):
            row, model = best[g]
            t0 = time.perf_counter()
            trainer = _started(model, self.train, self.kw, log, upto=self.steps)
            if trainer.restart:
                row["restart"] = trainer.restart
            if g == "fold" and self._given_up(row, trainer, anchor_side):
                row["seconds"] += time.perf_counter() - t0
                side = min(anchor_side, key=lambda b: _ranked(b[0]))
                return self._result(*side, None, GIVEN_UP, steps=0, extra=trainer.done + _wasted(trainer))
            trainer.run(self.steps - trainer.done)
            row["holdout_loss"] = self._loss(model, row["candidate"])
            row["seconds"] += time.perf_counter() - t0
            trained.append((row, model, trainer))
            if g == "fold" and _passes(row, anchor_side):
                return self._result(row, model, trainer, "holdout_loss_below_anchor_side_one_shot")
        row, model, trainer = min(trained, key=lambda b: b[0]["holdout_loss"])
        # The steps the losers trained (the winner's race steps are part of its N, its restart's
        # are counted with its run's).
        extra = sum(t.done + _wasted(t) for r, _, t in trained if r is not row)
        return self._result(row, model, trainer, "holdout_loss", extra=extra)

    def _best_parent_first(self, entries):
        """`entries` with the starts made from one parent (each entry's fifth
        field: its number) ordered by their parent's held-out loss, lowest
        first; `run` builds only the first parent's whose start can be built.
        Training regains at best about what the start's parent knows, so a
        start's parent predicts where it trains better than its one-shot loss
        does: pydoc BERT 4 x 64 -> 2 x 32, parent A 0.14 behind B, the fold of
        A led one-shot on one seed of three and lost the race to the anchor
        (5.397 after 150 steps), while the prune of B reached 5.286 in 100.
        Every other race measured here was won by a start of the better
        parent. A pruning tool's user prunes the best parent too. Not without
        finetuning (the one-shot loss is then the result), nor for headless
        models (scored against the parents themselves) or streamed parents
        (not loaded)."""
        made_from = sorted({e[4] for e in entries if len(e) > 4})
        if len(made_from) < 2 or self.parents is None or self.reference is not None or not self.kw["steps"]:
            return entries
        self.ranked = {k: self._parent_loss(k) for k in made_from}
        order = sorted(made_from, key=lambda k: _finite_or_inf(self.ranked[k]))
        singles = iter(sorted((e for e in entries if len(e) > 4), key=lambda e: order.index(e[4])))
        return [next(singles) if len(e) > 4 else e for e in entries]

    def _parent_loss(self, k):
        """Parent k's held-out loss (1-based), scored once per race."""
        if k not in self.parent_loss_cache:
            self.parent_loss_cache[k] = self._loss(self.parents[k - 1], f"parent {k}")
        return self.parent_loss_cache[k]

    def _far_behind(self, row, anchor_side) -> bool:
        """Whether the parents' best start trails the anchor side one-shot by
        more than FAR_BEHIND times the best parent's own held-out lead over
        it (`_too_far_behind`); the parents' losses are scored only here."""
        if self.parents is None or self.reference is not None or not anchor_side:
            # Headless models are scored against the parents themselves: the target
            # training distils towards, not a loss a parent has and a start regains.
            return False
        self.parent_losses = [self._parent_loss(k) for k in range(1, len(self.parents) + 1)]
        side = min(r["one_shot_holdout_loss"] for r, _ in anchor_side)
        return _too_far_behind(row["one_shot_holdout_loss"], side, min(self.parent_losses))

    def _far_behind_why(self, row, side_row) -> str:
        side, parent = side_row["one_shot_holdout_loss"], min(self.parent_losses)
        start = (f"the best anchor-side start one-shot, and the parents' best ({row['candidate']}) trailed it by "
                 f"{row['one_shot_holdout_loss'] - side:.4g} (held-out loss), ")
        if parent >= side:
            return start + (f"while the best parent itself was no better than it ({parent:.4g} against "
                            f"{side:.4g}), so it was not raced")
        return start + (f"more than {FAR_BEHIND:g} times the best parent's own lead over it ({side - parent:.4g}), "
                        f"so it was not raced")

    def _given_up(self, row, trainer, anchor_side) -> bool:
        """Whether the parents' start, trained to twice its warm-up (`_started`),
        is given up there, if that is inside its race steps (`_cannot_reach`)."""
        check = trainer.done
        if check >= self.steps:
            return False
        loss = self._loss(trainer.model, row["candidate"])
        if not _cannot_reach(row["one_shot_holdout_loss"], loss, check, self.steps, anchor_side):
            return False
        row.update(holdout_loss=loss, given_up_after=check)
        return True

    def _result(self, row, model, trainer, key, extra=0, steps=None, why=None):
        """(model, trainer or None, report, one-shot metrics). `steps` 0: no
        start trained in the race; the one returned trains all N steps
        (`why`: the note's reason, where it is not the only start or kind)."""
        fusion = getattr(model, "fusion_report", None)
        report = dict(fusion) if fusion else {"schema": _schema(), "options": {"alignment": "anchor"}}
        report["race"] = {"winner": row["candidate"], "chosen_by": key,
                          "steps_each": self.steps if steps is None else steps,
                          "holdout_examples": _n(self.holdout), "extra_steps": extra,
                          "candidates": self.rows}
        if self.parent_losses is not None:
            report["race"]["parents_holdout_loss"] = self.parent_losses
        if self.best_parent is not None:
            report["race"]["single_parent_starts_from"] = self.best_parent
            report["race"]["single_parent_holdout_loss"] = {str(k): v for k, v in self.ranked.items()}
        if self.skipped:
            report["race"]["skipped"] = self.skipped
        if steps == 0 and key != GIVEN_UP and (key == "only candidate" or self.kw["steps"]):
            why = why or ("the only start possible" if key == "only candidate" else
                          "the only kind of start (chosen one-shot on the held-out examples)")
            trained = f"; it trained all {self.kw['steps']} steps" if self.kw["steps"] else ""
            report["race"]["note"] = f"no race: {row['candidate']} is {why}{trained}"
        return model, trainer, report, row["one_shot"]


def _finite_or_inf(x: float) -> float:
    return x if math.isfinite(x) else math.inf


def _ranked(row) -> float:
    """A start's one-shot held-out loss as its group ranks it: divided by the
    lead it must have over the others (`candidates`)."""
    return row["one_shot_holdout_loss"] / row["lead"]


def _leads(parents_start, anchor_side) -> bool:
    """Whether the parents' best start (the fold) already has a lower one-shot
    held-out loss than every anchor-side start. The race trains both only
    because the fold starts behind and overtakes with training (module
    docstring); a fold that starts ahead has nothing to overtake, and
    racing it would spend race_fraction * N steps on a start already beaten
    (reconstruct puts the weak digits anchor's fold there: 85% against 76%)."""
    return parents_start is not None and _below_anchor_side(parents_start[0]["one_shot_holdout_loss"], anchor_side)


def _passes(parents_row, anchor_side) -> bool:
    """Whether the parents' start, after its race steps, has a lower held-out
    loss than every anchor-side start has one-shot. Training the anchor side
    too would spend race_fraction * N steps that a fair comparison gives every
    control. The pydoc BERT depth case (4 x 64 -> 2 x 32, N = 100): on every
    seed the parents' start passed the anchor's one-shot loss by N/2 and
    trained past the anchor by N; racing both, the recipe spent 1.5 N and lost
    to Torch-Pruning at 1.5 N (5.363 against 5.309); continuing alone it spends
    N and leads it at N (5.339 against 5.349-5.351, within the spread)."""
    return _below_anchor_side(parents_row["holdout_loss"], anchor_side)


REACH = 2  # a parents' start is given up if twice its mean rate so far cannot take it to the anchor side
GIVEN_UP = "parents_start_cannot_reach_anchor_side"  # the race's chosen_by then


def _cannot_reach(one_shot: float, loss: float, done: int, steps: int, anchor_side) -> bool:
    """Whether the parents' start, `done` of its `steps` race steps in (twice
    the warm-up, `finetune.climb_check`), would stay above the anchor side's
    one-shot loss even improving at REACH times its mean rate so far: loss
    curves flatten, so it cannot pass it, and the rest of its race steps would
    be spent for nothing. The pydoc LLaMA depth case (8 x 64 -> 4 x 32, N = 60):
    the fold of a parent falls 4.472 -> 4.464 in 12 steps against the anchor's
    4.260 one-shot; it was 4.421 after its 30 race steps, and the anchor won every
    seed, spending 1.5 N against a control (the anchor distilled) given 1.5 N.
    Where the parents' start overtakes (pydoc BERT depth: 5.80 -> 5.40 by step
    20, the anchor's one-shot 5.32) its rate so far is many times what it needs."""
    rate = max(0.0, one_shot - loss) / done
    return not _below_anchor_side(loss - REACH * rate * (steps - done), anchor_side)


FAR_BEHIND = 3  # a parents' start this many times the parents' lead behind the anchor side is not raced
FAR_BEHIND_KEY = "parents_start_far_behind"  # the race's chosen_by then


def _too_far_behind(start: float, anchor_side: float, parent: float) -> bool:
    """Whether a parents' start whose one-shot held-out loss is `start` is
    not worth racing against an anchor side at `anchor_side`, the best
    parent's own loss being `parent`. Compressing a parent costs loss that
    training wins back at best up to the parent's loss, so a start more than
    FAR_BEHIND times the parents' lead behind the anchor side has little to
    gain and much to regain; parents no better than the anchor side have
    nothing to give. The race would spend twice the warm-up before giving it
    up (`_cannot_reach`), steps a fair control is given too. Measured one-shot
    on held-out train text (trailing / lead): pydoc LLaMA 8 x 64 -> 4 x 32,
    whose parents are barely better than the small model and whose anchor
    won every race, 3.6 / 3.9 / 3.5 over 3 seeds (not raced, the recipe
    spends N and ties the anchor distilled, which it lost to by 0.028 when
    the race gave the start up after 12 steps); pydoc BERT 4 x 64 -> 2 x 32,
    whose parents' start won every race, 2.0 / 1.7 / 2.0; digits trailed
    by 0.2 or led. Not for headless models (`Race._far_behind`)."""
    return start - anchor_side > FAR_BEHIND * (anchor_side - parent)  # a parent no better: a lead <= 0


def _below_anchor_side(loss, anchor_side) -> bool:
    return bool(anchor_side) and all(loss < row["one_shot_holdout_loss"] for row, _ in anchor_side)


def relabelled(progress, stage):
    """`progress` under a stage of the caller's naming (None stays None)."""
    return None if progress is None else (lambda _stage, done, total: progress(stage, done, total))


def _schema():
    from otcompress.fusion import REPORT_SCHEMA
    return REPORT_SCHEMA


def _anchor_copy(anchor_m):
    model = copy.deepcopy(anchor_m).eval()
    model.__dict__.pop("fusion_report", None)
    return model


def split_holdout(data, seed: int):
    """(train, holdout): the train split minus a held-out tenth (at least 64
    examples), and that tenth as a TaskData whose eval split it is. The race
    and reg choices are scored on it, never on the eval split."""
    tensors = data.splits["train"]
    n = len(next(iter(tensors.values())))
    k = max(HOLDOUT_MIN, int(HOLDOUT_FRACTION * n))
    if n < 2 * k:
        raise InvalidOptionError(f"--data has {n} training examples; the race of starting points (and reg "
                                 f"auto) holds out {k} and needs at least {2 * k}: give more, or a fixed "
                                 "--alignment (and --reg)")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed + 7919))
    take = lambda idx: {f: v[idx] for f, v in tensors.items()}  # noqa: E731
    train = dataclasses.replace(data, splits={**data.splits, "train": take(order[k:])})
    holdout = dataclasses.replace(data, splits={"train": take(order[:k]), "eval": take(order[:k])})
    return train, holdout


def _trainable(data) -> bool:
    """Labelled data, or a headless model's inputs (scored against the parents)."""
    return data is not None and (data.has_labels or data.task == "feature-extraction")


def _n(data):
    return None if data is None else data.num_examples("eval")


def _evaluate(model, data, device, reference=None, progress=None):
    """Held-out figures: the data's fixed eval split, never trained on (training
    and the race's held-out tenth use the train split), as `finetune` reports.
    `progress(stage, done, total)` hears every batch scored."""
    return {**ft.evaluate(model, data, split="eval", device=device, reference=reference, progress=progress),
            "split": "eval", "examples": data.num_examples("eval")}


def _metrics(anchor_m, model, one_shot, data, r, device, reference=None, progress=None):
    """Anchor, one-shot and final metrics on the data's eval split; `progress`
    hears every batch scored, under the model's name."""
    if not _trainable(data):
        return {}
    score = lambda m, name: _evaluate(m, data, device, reference,  # noqa: E731
                                      relabelled(progress, f"scoring {name} (eval split)"))
    metrics = {} if anchor_m is None else {"anchor": score(anchor_m, "anchor")}
    if one_shot is not None:
        metrics["fused (one-shot)"] = one_shot
    if r["finetune_steps"]:
        name = f"fused + {r['finetune_steps']} steps"
        metrics[name] = score(model, name)
        if one_shot is not None:
            ft.check_trained(one_shot, metrics[name], r["lr"])
    return metrics


def write(model, report, source, tmp: Path, r):
    """The model directory: weights and config, then `write_files`."""
    model.to("cpu").save_pretrained(tmp)
    write_files(report, source, tmp, r, model.config.hidden_size)


def write_files(report, source, tmp: Path, r, hidden_size: int):
    """Beside the weights: the anchor's preprocessor (and sentence-transformers)
    files, the resolved recipe, the report and a model card."""
    report["copied_preprocessor_files"] = outputs.copy_preprocessor(source, tmp)
    report["sentence_transformers"] = outputs.copy_sentence_transformers(source, tmp, hidden_size, r["pooling"])
    recipe = {k: v for k, v in r.items() if k != "profile"}
    if recipe["alignment"] == "auto" and (report.get("options") or {}).get("alignment") == "fold" \
            and not report.get("race"):  # "auto" without an anchor folded: say so (same result when rerun)
        recipe["alignment"] = "fold"
    outputs.write_yaml(tmp / "otcompress_config.yaml", recipe)
    outputs.write_json(tmp / "fusion_report.json", report)
    (tmp / "README.md").write_text(outputs.model_card(report))


def load_task_data(spec, model, model_path, seed, pooling=None):
    """`load_data` with the tokenizer or image processor saved beside the model;
    a headless model's embeddings pooled by `pooling`, else as its checkpoint's
    sentence-transformers files say, else as its family does."""
    from otcompress.data import load_data
    from otcompress.embedding import checkpoint_pooling
    tokenizer = image_processor = None
    if isinstance(model_path, (str, os.PathLike)) and Path(model_path).is_dir():
        tokenizer, image_processor = _preprocessors(Path(model_path))
    return load_data(spec, model, tokenizer=tokenizer, image_processor=image_processor, seed=seed,
                     pooling=pooling or checkpoint_pooling(model_path))


def _preprocessors(path: Path):
    tokenizer = image_processor = None
    if (path / "tokenizer_config.json").exists() or (path / "tokenizer.json").exists():
        from transformers import AutoTokenizer
        tokenizer = AutoTokenizer.from_pretrained(path)
    if (path / "preprocessor_config.json").exists():
        from transformers import AutoImageProcessor
        image_processor = AutoImageProcessor.from_pretrained(path)
    return tokenizer, image_processor
