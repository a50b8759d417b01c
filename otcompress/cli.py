"""The otcompress command line: a thin shell over the Python API.

Exit codes: 0 success; 2 a user error (bad input, bad option, incompatible
models); 3 a validation gate failed; 1 an internal error; 130 interrupted
(Ctrl-C), 143 terminated (SIGTERM). `--json` prints exactly one JSON object
on stdout, whose `path` names what was written; logs and progress go to
stderr."""
from __future__ import annotations

import errno
import json
import math
import os
import signal
import sys
import threading
import warnings
from pathlib import Path

import click

from otcompress import recipes
from otcompress.options import BY_NAME as OPTIONS
from otcompress.errors import InvalidOptionError, OTCompressError

# Options that take several values after one flag (`--parents a b c`).
MULTI_VALUE = ("--parents", "--teachers", "--weights", "--reference")


class UI:
    """Everything the CLI shows: rich on stderr (plain text when not a terminal),
    tables or exactly one JSON object on stdout."""

    def __init__(self, quiet=False, as_json=False):
        from rich.console import Console
        self.quiet, self.as_json = quiet, as_json
        # soft_wrap: a log line is one line, also in a pipe (rich's width is 80 there).
        self.err = Console(stderr=True, quiet=quiet, soft_wrap=True)
        self.out = Console(stderr=as_json)  # with --json, tables go to stderr too
        global _SHOWN_BY
        _SHOWN_BY = self  # `main` routes the library's warnings here: one line each, silenced by -q

    def log(self, msg):
        self.err.print(msg, highlight=False)

    def _warning(self, message, category, *_args, **_kw):
        self.err.print(f"[yellow]warning:[/yellow] {str(message).removeprefix('otcompress: ')}",
                       highlight=False)

    def progress(self):
        return _Progress(self.err, self.quiet)

    def table(self, title, columns, rows, left=1):
        """The result: on stdout even with -q (which silences logs and progress);
        with --json on stderr, where -q silences it. The first `left` columns
        are text (left-aligned), the others numbers."""
        from rich.table import Table
        t = Table(title=title)
        # The first column names the rows: fold it onto more lines rather than cut it.
        for i, c in enumerate(columns):
            t.add_column(c, justify="left" if i < left else "right", overflow="fold" if i == 0 else "ellipsis")
        for r in rows:
            t.add_row(*[_cell(v) for v in r])
        (self.err if self.as_json else self.out).print(t)

    def result(self, obj):
        if self.as_json:
            click.echo(json.dumps(obj, default=str))


class _Progress:
    """Renders the library's progress callbacks (stage, done, total)."""

    def __init__(self, console, quiet):
        self.console, self.quiet, self.tasks, self.bar = console, quiet, {}, None

    def __enter__(self):
        # Not a terminal (a pipe, a log file): no bar, whose redraws would only be noise there.
        if not self.quiet and self.console.is_terminal:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
            self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                TimeElapsedColumn(), console=self.console, transient=True)
            self.bar.__enter__()
        return self

    def __exit__(self, *exc):
        if self.bar:
            self.bar.__exit__(*exc)

    def __call__(self, stage, done, total=None, *_):
        if not self.bar:
            return
        if stage not in self.tasks:
            self.tasks[stage] = self.bar.add_task(str(stage), total=total)
        self.bar.update(self.tasks[stage], completed=done, total=total)

    def finetune(self, done, total, info=None):
        self("finetune", done, total)


def _cell(v):
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def common(f):
    f = click.option("--quiet", "-q", is_flag=True, help="No logs or progress on stderr (errors and the "
                     "result still print).")(f)
    f = click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout.")(f)
    return f


def device_option(f):
    return click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto",
                        show_default=True, help="Where to run (auto picks CUDA when present).")(f)


def resolve_device(device):
    import torch
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise InvalidOptionError("--device cuda: no CUDA device available")
    return device


FORCE_HELP = ("Replace --out if otcompress wrote it (never a file or directory it did not write, "
              "nor an input).")

def pooling_option(f):
    return click.option("--pooling", type=click.Choice(OPTIONS["pooling"].choices), help=OPTIONS["pooling"].help)(f)


def remote_code_option(f):
    return click.option("--trust-remote-code", is_flag=True,
                        help="DANGEROUS: run model code shipped with a model directory.")(f)


class Bounded(click.ParamType):
    """A finite int or float that passes `test`; `wanted` says what in errors
    ("an integer >= 0"). NaN and infinity are never accepted."""

    def __init__(self, kind, test, wanted):
        self.kind, self.test, self.wanted = kind, test, wanted
        self.name = "integer" if kind is int else "float"

    def convert(self, value, param, ctx):
        if isinstance(value, self.kind) and not isinstance(value, bool):
            v = value
        else:
            try:
                v = self.kind(value)
            except (TypeError, ValueError):
                self.fail(f"{value!r} is not {self.wanted}", param, ctx)
        if not (math.isfinite(v) and self.test(v)):
            self.fail(f"{value} is not {self.wanted}", param, ctx)
        return v


def _range(key):
    """The click type of a numeric option's values, from its declaration."""
    opt = OPTIONS[key]
    return Bounded(opt.type, opt.check, opt.wanted)


COUNT = Bounded(int, lambda v: v >= 1, "an integer >= 1")
MAX_STEPS = 10**8  # a hundred million steps: beyond any budget, so a larger number is a typo
STEPS = Bounded(int, lambda v: OPTIONS["finetune_steps"].check(v) and v <= MAX_STEPS,
                f"an integer in [0, {MAX_STEPS:_}]")
POSITIVE = Bounded(float, lambda v: v > 0, "a finite number > 0")
NON_NEGATIVE = Bounded(float, lambda v: v >= 0, "a finite number >= 0")


class OneName(click.Option):
    """An option whose help shows its first name only; the other names still
    work (old spellings kept for compatibility)."""

    def get_help_record(self, ctx):
        names = self.opts
        self.opts = names[:1]
        try:
            return super().get_help_record(ctx)
        finally:
            self.opts = names


def recipe_option(*decls, key, **kw):
    """A fuse option for recipe key `key`: its choices or range, help text and
    the recipe default shown in --help, all from `options.OPTIONS` (the flag
    itself defaults to None, so a profile's value is only replaced by a flag
    the user gives)."""
    opt = OPTIONS[key]
    if opt.choices and "type" not in kw:
        kw["type"] = click.Choice(opt.choices)
    if opt.check and opt.type in (int, float) and "type" not in kw:
        kw["type"] = _range(key)
    kw.setdefault("help", opt.help)
    if opt.default is not None:  # click would put a string show_default in parentheses
        shown = ("on" if opt.default else "off") if isinstance(opt.default, bool) else opt.default
        kw["help"] = f"{kw.get('help', '')}  [default: {shown}]".strip()
    return click.option(*decls, key, **kw)


GROUP_EXAMPLES = """\b
Examples:
  otcompress fuse --anchor small/ --parents wide1/ wide2/ --data digits --steps 300 --out fused/
  otcompress fuse --parents wide/ --hidden 256 --heads 4 --intermediate 1024 --out folded/
  otcompress profiles                      # the named recipes for --profile
  otcompress eval fused/ --data digits
  otcompress profile small/ fused/ wide1/  # parameters, FLOPs, latency side by side
  otcompress export fused/ --out fused.onnx --quantize int8

\b
Exit codes: 0 ok, 2 bad input or options, 3 a validation gate failed,
1 internal error, 130 interrupted, 143 terminated."""

FUSE_EXAMPLES = """\b
Examples:
  # default recipe: race the starting points, 300 steps distilled from the parents
  otcompress fuse --anchor small/ --parents wide1/ wide2/ --data digits --steps 300 --out fused/
  # one-shot, weights-based, no data
  otcompress fuse --anchor small/ --parents wide/ --alignment weights --out fused/
  # a named recipe, one value overridden
  otcompress fuse --anchor small/ --parents wide/ --profile vit-soft-acts --data digits --reg auto --out fused/
  # no anchor: fold the parent into target widths
  otcompress fuse --parents wide/ --hidden 256 --heads 4 --intermediate 1024 --out folded/
  # shallower and narrower: a 12-block parent into 6 blocks of half the width
  otcompress fuse --parents wide/ --layers 6 --hidden 384 --heads 6 --intermediate 1536 --out small/

\b
Defaults shown are the recipe's; a --profile replaces them and flags override both."""


@click.group(context_settings={"help_option_names": ["-h", "--help"]}, epilog=GROUP_EXAMPLES)
@click.version_option(package_name="otcompress")
def cli():
    """Compress transformers by heterogeneous Optimal-Transport fusion."""


# ----------------------------------------------------------------------------- fuse

@cli.command(epilog=FUSE_EXAMPLES)
@click.option("--anchor", help="The small model whose architecture the result has "
              "(or give a target width with --hidden/--heads/--intermediate to fold into).")
@click.option("--parents", multiple=True, required=True, help="One or more wider parent models.")
@click.option("--out", required=True, type=click.Path(), help="Output model directory (parents are created).")
@click.option("--profile", "profile_name", help="A recipe: a name from `otcompress profiles` or a YAML file.")
@recipe_option("--alignment", key="alignment")
@click.option("--hidden", type=COUNT, help="Fold target hidden size (no --anchor: the first parent's architecture).")
@click.option("--heads", type=COUNT, help="Fold target number of attention heads.")
@click.option("--intermediate", type=COUNT, help="Fold target MLP width.")
@click.option("--kv-heads", type=COUNT, help="Fold target key/value heads (grouped-query attention).")
@click.option("--layers", type=COUNT, help="Fold target depth: fewer blocks than the parents "
              "(each parent is depth-mapped: its most influential blocks are kept, in order).")
@recipe_option("--solver", key="solver")
@recipe_option("--reg", key="reg")
@recipe_option("--max-iter", key="max_iter")
@recipe_option("--residual", key="residual")
@recipe_option("--weights", key="weights", multiple=True, type=NON_NEGATIVE)
@recipe_option("--qk", key="qk")
@recipe_option("--token-filter", key="token_filter")
@recipe_option("--activation-dtype", key="activation_dtype")
@recipe_option("--head-alignment", key="head_alignment")
@recipe_option("--on-unconverged", key="on_unconverged")
@recipe_option("--on-uniform", key="on_uniform")
@recipe_option("--cost-norm", key="cost_norm")
@recipe_option("--repair/--no-repair", key="repair", default=None)
@recipe_option("--distill/--no-distill", key="distill", default=None)
@recipe_option("--race-fraction", key="race_fraction")
@recipe_option("--data", key="data")
@recipe_option("--samples", key="samples")
@recipe_option("--pooling", key="pooling")
@recipe_option("--steps", "--finetune-steps", key="finetune_steps", cls=OneName, type=STEPS)
@recipe_option("--lr", key="lr")
@recipe_option("--batch-size", key="batch_size")
@recipe_option("--seed", key="seed", type=int)
@click.option("--force", is_flag=True, help=FORCE_HELP)
@device_option
@remote_code_option
@common
@click.pass_context
def fuse(ctx, anchor, parents, out, profile_name, hidden, heads, intermediate, kv_heads, layers, force, device,
         trust_remote_code, quiet, as_json, **flags):
    """Fuse PARENTS into the ANCHOR's width; write a from_pretrained directory."""
    from otcompress import pipeline
    ui = UI(quiet, as_json)
    recipe = _resolve_recipe(ctx, profile_name, flags)
    widths = {k: v for k, v in (("hidden", hidden), ("heads", heads), ("intermediate", intermediate),
                                ("kv_heads", kv_heads), ("layers", layers)) if v is not None}
    if anchor and widths:
        raise InvalidOptionError("give --anchor or a fold target (--hidden/--heads/--intermediate/--kv-heads/"
                                 "--layers), not both")
    if not anchor and not widths:
        raise InvalidOptionError("give --anchor, or a fold target (--hidden, --heads, --intermediate, "
                                 "--kv-heads, --layers)")
    with ui.progress() as prog:
        model, report = pipeline.run(anchor, list(parents), recipe, out, target=widths or None, force=force,
                                     device=resolve_device(device), trust_remote_code=trust_remote_code,
                                     progress=prog, log=ui.log)
    # Written straight to disk (streamed parents, nothing to train): the summary reads the directory.
    for line in fusion_summary(report, model if model is not None else out, parents, recipe, trust_remote_code):
        ui.log(line)
    ui.log(f"[green]wrote[/green] {out}  ({report['wall_seconds']:.1f} s)")
    race = report.get("race")
    if race:
        ui.table(f"starting-point race ({race['steps_each']} steps each, {race['holdout_examples']} "
                 "held-out examples)", ["candidate", "held-out loss, one-shot", "after the race steps"],
                 [[c["candidate"], c["one_shot_holdout_loss"], c.get("holdout_loss")] for c in race["candidates"]])
    metrics = report.get("metrics") or {}
    first = next(iter(metrics.values()), {})
    _metrics_table(ui, metrics, first.get("split"), first.get("examples"))
    # "path" names the written output in every command's JSON; "out" is kept for one release.
    ui.result({"path": str(out), "out": str(out), "report": report})


def fusion_summary(report, model, parents, recipe, trust_remote_code=False) -> list[str]:
    """What fusion did, in two lines: the start that won (or the alignment)
    and its regulariser, then widths and parameters against the parents'.
    `model`: the fused model, or the directory it was written to."""
    from otcompress import architectures, modelio
    o = report.get("options") or {}
    race = report.get("race")
    how = f"start {race['winner']} (race, by {race['chosen_by'].replace('_', ' ')})" if race else \
        f"alignment {o.get('alignment')}"
    if o.get("alignment") in ("weights", "activations", "fold") and o.get("solver"):
        reg = o.get("reg")
        if o["solver"] == "emd":
            how += ", solver emd (exact)"
        elif report.get("reg_sweep"):
            tried = [s["reg"] for s in report["reg_sweep"]]
            how += f", solver sinkhorn, reg auto picked {reg:g} of {', '.join(f'{r:g}' for r in tried)}"
        elif reg is not None:
            how += f", solver sinkhorn, reg {reg:g}"
    maps = sum(len(m) for m in report.get("transport_maps") or [])
    if maps:
        how += f"; {maps} transport maps"
    if report.get("warnings"):
        how += f", {len(report['warnings'])} warning(s)"
    lines = [f"fused: {how}"]
    parent_cfgs = [modelio.load_config(p, trust_remote_code=trust_remote_code) for p in parents]
    from otcompress.profiling import count_parameters
    config = model.config if hasattr(model, "config") else modelio.load_config(model)
    mine = count_parameters(model) if hasattr(model, "config") else _parameters_of(config)
    theirs = [_parameters_of(c) for c in parent_cfgs]
    widths = f"widths {architectures.describe_widths(config)} (parents: " + \
        "; ".join(architectures.describe_widths(c) for c in parent_cfgs) + ")"
    if mine and all(theirs):
        ratio = ", ".join(f"{mine / t:.2f}x" for t in theirs)
        widths += f", {mine:,} parameters = {ratio} the parent{'s' + chr(39) if len(theirs) > 1 else chr(39) + 's'}"
    lines.append(widths)
    return lines


def _parameters_of(config):
    """A model's parameter count from its config alone: the class its config
    names, built on the meta device (nothing is allocated); None if unknown."""
    try:
        import torch
        import transformers
        from otcompress.profiling import count_parameters
        cls = getattr(transformers, (getattr(config, "architectures", None) or [""])[0], None)
        if cls is None:
            return None
        with torch.device("meta"):
            return count_parameters(cls(config))
    except Exception:  # noqa: BLE001 - a summary line only: no count rather than a failed run
        return None


def _resolve_recipe(ctx, profile_name, flags):
    recipe = recipes.defaults()
    if profile_name:
        recipe.update(recipes.load_recipe(profile_name))
    given = {k: v for k, v in flags.items()
             if ctx.get_parameter_source(k) == click.core.ParameterSource.COMMANDLINE}
    if "weights" in given:
        given["weights"] = list(given["weights"])
    if "reg" in given and given["reg"] != "auto":
        try:
            given["reg"] = float(given["reg"])
        except ValueError:
            given["reg"] = None
        if recipes.problem("reg", given["reg"]) or given["reg"] is None:
            raise InvalidOptionError(f"--reg {flags['reg']}: use a finite regulariser reg > 0, or 'auto'")
    recipe.update({k: v for k, v in given.items() if v is not None})
    unused = recipes.ineffective(recipe, given)
    if unused:
        raise InvalidOptionError(f"--{unused[0].replace('_', '-')} {unused[1]}: drop it")
    recipes.check_recipe(recipe, "options")
    recipe["profile"] = profile_name
    return recipe


def _load_data(spec, model, model_path, seed, pooling=None):
    from otcompress.pipeline import load_task_data
    return load_task_data(spec, model, model_path, seed, pooling)


def _check_pooling(pooling, model, trust_remote_code):
    """Before any weights are read: --pooling is for headless models only."""
    if pooling and not _headless(model, trust_remote_code):
        raise InvalidOptionError(f"--pooling applies to headless (embedding) models; {model} has a task head")


def _metrics_table(ui, metrics, split=None, examples=None):
    """`split` and `examples` (the data the metrics were measured on) add columns."""
    if not metrics:
        return
    names = sorted({k for m in metrics.values() for k, v in m.items() if isinstance(v, float)})
    given = [("split", split), ("examples", examples)]
    extra = [c for c, v in given if v is not None]
    values = [v for _, v in given if v is not None]
    ui.table("metrics", ["model", *extra, *names],
             [[n, *values, *(m.get(k) for k in names)] for n, m in metrics.items()])


# ----------------------------------------------------------------------------- finetune / eval

FINETUNE_EXAMPLES = """\b
Examples:
  otcompress finetune fused/ --data digits --steps 300 --teachers wide1/ wide2/ --out fused-ft/"""


@cli.command(epilog=FINETUNE_EXAMPLES)
@click.argument("model")
@click.option("--data", required=True, help="digits | pydoc | image folder | .txt/.jsonl | saved dataset dir.")
@click.option("--steps", type=STEPS, required=True, help="Training steps.")
@click.option("--out", required=True, type=click.Path(), help="Output model directory (parents are created).")
@click.option("--teachers", multiple=True, help="Distil from these models (same output space).")
@click.option("--distill-alpha", type=_range("distill_alpha"), default=OPTIONS["distill_alpha"].default,
              show_default=True)
@click.option("--temperature", type=POSITIVE, default=2.0, show_default=True)
@click.option("--lr", type=_range("lr"), default=OPTIONS["lr"].default, show_default=True)
@click.option("--batch-size", type=_range("batch_size"), default=OPTIONS["batch_size"].default, show_default=True)
@click.option("--seed", type=int, default=OPTIONS["seed"].default, show_default=True)
@pooling_option
@click.option("--force", is_flag=True, help=FORCE_HELP)
@device_option
@remote_code_option
@common
def finetune(model, data, steps, out, teachers, distill_alpha, temperature, lr, batch_size, seed, pooling, force,
             device, trust_remote_code, quiet, as_json):
    """Brief recovery training of MODEL (optionally distilled from --teachers)."""
    from otcompress import finetune as ft
    from otcompress import modelio, outputs
    main_process = ft.is_main_process()  # under accelerate launch / torchrun only rank 0 writes and prints
    ui = UI(quiet or not main_process, as_json and main_process)
    outputs.check_out(out, force, inputs=[model, *teachers], log=ui.log)
    device = resolve_device(device)
    if teachers:  # configs only: wrong teachers fail before weights are read or training starts
        modelio.check_teachers(modelio.load_config(model, trust_remote_code=trust_remote_code),
                               [modelio.load_config(t, trust_remote_code=trust_remote_code)
                                for t in teachers])
    _check_pooling(pooling, model, trust_remote_code)
    if _headless(model, trust_remote_code) and not teachers:
        raise InvalidOptionError(f"{model} has no task head: finetune trains it by distilling the "
                                 "embeddings of --teachers (e.g. its parents); give them")
    m = modelio.load_model(model, trust_remote_code=trust_remote_code)
    task = _load_data(data, m, model, seed, pooling)
    teacher_ms = [modelio.load_model(t, trust_remote_code=trust_remote_code) for t in teachers]
    reference = teacher_ms if task.task == "feature-extraction" else None
    before = _flag_non_finite(ui, f"{model} before finetuning", ft.evaluate(m, task, device=device,
                                                                          reference=reference))
    with ui.progress() as prog:
        summary = ft.finetune(m, task, steps=steps, lr=lr, batch_size=batch_size, seed=seed,
                              teachers=teacher_ms, distill_alpha=distill_alpha, temperature=temperature,
                              device=device, progress=prog.finetune)
    if not main_process:
        return
    after = _flag_non_finite(ui, f"{model} after finetuning", ft.evaluate(m, task, device=device,
                                                                        reference=reference))
    summary.pop("losses", None)
    result = {"path": str(out), "model": model, "data": data, "teachers": list(teachers), "finetune": summary,
              "split": "eval", "examples": task.num_examples("eval"),
              "metrics": {"before": before, "after": after}}
    section = {**summary, "lr": lr, "batch_size": batch_size, "seed": seed, "data": data,
               "teachers": list(teachers), "distill_alpha": distill_alpha if teachers else None, "from": model}
    with outputs.staged_dir(out, force, inputs=[model, *teachers]) as tmp:
        m.to("cpu").save_pretrained(tmp)
        outputs.copy_preprocessor(model, tmp)
        result["sentence_transformers"] = outputs.copy_sentence_transformers(model, tmp, m.config.hidden_size)
        # The model card and fusion report (how the model was made) come along, with this run added.
        result["carried"] = outputs.carry_lineage(model, tmp, section, {
            f"before finetune ({data})": before, f"finetuned {summary['steps']} steps ({data})": after})
        outputs.write_json(tmp / "finetune_report.json", result)
    _metrics_table(ui, result["metrics"], split="eval", examples=result["examples"])
    ui.log(f"[green]wrote[/green] {out}")
    ui.result(result)


EVAL_EXAMPLES = """\b
Examples:
  otcompress eval fused/ --data digits
  otcompress eval fused/ --data reviews.jsonl --split eval --json
  otcompress eval st-fused/ --data texts.txt --reference st-large1/ st-large2/  # embedding models"""

PROFILE_EXAMPLES = """\b
Examples:
  otcompress profile small/ wide1/ fused/ --threads 1
  otcompress profile fused/ --batch-size 8 --seq-len 64 --no-onnx --json"""

EXPORT_EXAMPLES = """\b
Examples:
  otcompress export fused/ --out fused.onnx
  otcompress export fused/ --out fused.onnx --quantize int8 --data digits  # int8 accuracy delta
  otcompress export fused/ --out fused.onnx --force  # replace an earlier export"""

DEMO_EXAMPLES = """\b
Examples:
  otcompress demo --quick            # tiny models, ~1 min
  otcompress demo --steps 300 --out runs/demo --force"""

FAMILIES_EXAMPLES = """\b
Examples:
  otcompress families
  otcompress families --json"""

PROFILES_EXAMPLES = """\b
Examples:
  otcompress profiles
  otcompress fuse --anchor small/ --parents wide/ --profile vit-soft-acts --data digits --out fused/"""


@cli.command(name="eval", epilog=EVAL_EXAMPLES)
@click.argument("model")
@click.option("--data", required=True)
@click.option("--split", type=click.Choice(["all", "train", "eval"]),
              help="Which examples: all of them (default for your own files), or the fixed "
                   "train/eval split (eval is the default for digits, pydoc and a saved "
                   "DatasetDict with a test split, whose train part models were trained on).")
@click.option("--batch-size", type=COUNT, default=256, show_default=True)
@click.option("--reference", multiple=True,
              help="Headless (embedding) models: score MODEL's embedding similarities against "
                   "these models' (e.g. its parents).")
@pooling_option
@device_option
@remote_code_option
@common
def eval_cmd(model, data, split, batch_size, reference, pooling, device, trust_remote_code, quiet, as_json):
    """Accuracy (classification), MLM or causal-LM loss/perplexity of MODEL on --data;
    for a headless model, how its embedding similarities agree with --reference models'."""
    from otcompress import finetune as ft
    from otcompress import modelio
    ui = UI(quiet, as_json)
    device = resolve_device(device)
    _check_reference(model, list(reference), trust_remote_code)
    _check_pooling(pooling, model, trust_remote_code)
    m = modelio.load_model(model, trust_remote_code=trust_remote_code)
    task = _load_data(data, m, model, 0, pooling)
    refs = [modelio.load_model(r, trust_remote_code=trust_remote_code) for r in reference] or None
    split = split or task.default_eval_split
    metrics = _flag_non_finite(ui, model, ft.evaluate(m, task, split=split, batch_size=batch_size, device=device,
                                                       reference=refs))
    examples = task.num_examples(split)
    _metrics_table(ui, {model: metrics}, split=split, examples=examples)
    ui.result({"model": model, "data": data, "split": split, "examples": examples,
               "reference": list(reference), **metrics})


def _flag_non_finite(ui, name, metrics: dict) -> dict:
    """A NaN/Inf loss means the model's outputs are not finite, and its other
    figures mean nothing (the argmax of NaN logits is class 0): they are
    blanked, `not_finite` names the culprits and a warning says so."""
    bad = [k for k, v in metrics.items() if isinstance(v, float) and not math.isfinite(v)]
    if not bad:
        return metrics
    ui.log(f"[yellow]warning:[/yellow] {name}: {', '.join(bad)} not finite: the model's outputs are NaN/Inf "
           "on this data, so no other figure is reported")
    return {**{k: None if isinstance(v, float) and k not in bad else v for k, v in metrics.items()},
            "not_finite": bad}


def _headless(path, trust_remote_code) -> bool:
    from otcompress import modelio
    from otcompress.architectures import is_headless
    return is_headless(modelio.load_config(path, trust_remote_code=trust_remote_code))


def _check_reference(model, reference, trust_remote_code):
    """Before any weights are read: a headless model needs reference models to
    be scored against, and only a headless one takes them."""
    from otcompress import modelio
    if not _headless(model, trust_remote_code):
        if reference:
            raise InvalidOptionError(f"--reference scores a headless model's embeddings; {model} has a task "
                                     "head and is scored on the data's labels")
        return
    if not reference:
        raise InvalidOptionError(f"{model} has no task head: eval scores its embeddings against "
                                 "--reference models (e.g. its parents); give them")
    modelio.check_teachers(modelio.load_config(model, trust_remote_code=trust_remote_code),
                           [modelio.load_config(r, trust_remote_code=trust_remote_code) for r in reference])


# ----------------------------------------------------------------------------- profile / export

SEQ_LEN = 128


@cli.command(epilog=PROFILE_EXAMPLES)
@click.argument("models", nargs=-1, required=True)
@click.option("--batch-size", type=COUNT, default=1, show_default=True)
@click.option("--seq-len", type=COUNT, help=f"Text models only [default: {SEQ_LEN}, or the model's "
              "maximum if shorter; a longer value given here is refused].")
@click.option("--repeats", type=COUNT, default=20, show_default=True)
@click.option("--threads", type=COUNT, default=1, show_default=True)
@click.option("--no-onnx", is_flag=True, help="Skip ONNX Runtime latency.")
@remote_code_option
@common
def profile(models, batch_size, seq_len, repeats, threads, no_onnx, trust_remote_code, quiet, as_json):
    """Parameters, FLOPs, CPU latency and size on disk of MODELS, side by side."""
    from otcompress import architectures, modelio
    from otcompress.profiling import profile_model
    ui = UI(quiet, as_json)
    configs = {path: modelio.load_config(path, trust_remote_code=trust_remote_code) for path in models}
    for path, cfg in configs.items():  # every path and --seq-len checked before any work
        longest = architectures.family(cfg).max_seq_len(cfg)
        if seq_len is not None and longest is not None and seq_len > longest:
            raise InvalidOptionError(f"--seq-len {seq_len}: {path} takes at most {longest} tokens")
    # Every model is loaded before the first is timed: a broken one fails before any work.
    loaded = {path: modelio.load_model(path, trust_remote_code=trust_remote_code) for path in models}
    seq_len = seq_len or SEQ_LEN
    results = {}
    for path, m in loaded.items():
        ui.log(f"profiling {path}")
        results[path] = profile_model(m, model_dir=path, batch_size=batch_size, seq_len=seq_len,
                                      repeats=repeats, threads=threads, onnx=not no_onnx)
    names = short_names(list(results))
    ui.table(f"profile (batch {batch_size}, {threads} thread(s), median of {repeats})",
             ["model", "params", "MFLOPs", "torch ms", "ORT ms", "disk MB"],
             [_profile_row(names[p], r) for p, r in results.items()])
    ui.result({"models": results})


def short_names(paths: list[str]) -> dict[str, str]:
    """Each path's shortest trailing run of components that no other path
    shares (`runs/a/model`, `runs/b/model` -> `a/model`, `b/model`)."""
    parts = {p: Path(p).parts or (str(p),) for p in paths}
    names = {}
    for p, own in parts.items():
        for k in range(1, len(own) + 1):
            tail = own[-k:]
            if not any(q != p and parts[q][-k:] == tail for q in parts):
                names[p] = str(Path(*tail))
                break
        else:
            names[p] = str(p)
    return names


def _profile_row(path, r):
    ort = r.get("latency_onnx") or {}
    disk = r.get("size_on_disk_bytes")
    return [path, r["parameters"], r["flops"]["flops"] / 1e6, r["latency_pytorch"]["median_ms"],
            ort.get("median_ms"), disk / 1e6 if disk else None]


@cli.command(epilog=EXPORT_EXAMPLES)
@click.argument("model")
@click.option("--out", required=True, type=click.Path(), help="The .onnx file to write (parents are created).")
@click.option("--quantize", type=click.Choice(["int8"]), help="Also write a dynamically quantised copy.")
@click.option("--atol", type=NON_NEGATIVE, default=1e-4, show_default=True, help="Parity gate vs PyTorch.")
@click.option("--data", help="Report the int8 accuracy delta on this data (headless models: the embedding "
              "cosine to fp32).")
@pooling_option
@click.option("--force", is_flag=True, help=FORCE_HELP)
@remote_code_option
@common
def export(model, out, quantize, atol, data, pooling, force, trust_remote_code, quiet, as_json):
    """Export MODEL to ONNX, validated in ONNX Runtime against PyTorch."""
    from otcompress import export as ex
    from otcompress import modelio, outputs
    ui = UI(quiet, as_json)
    for path in [out, ex.int8_path(out)] if quantize else [out]:  # the int8 copy must be free too
        outputs.check_out(path, force, inputs=[model], log=ui.log, ours=lambda p: outputs.ours_file(p, ex.marked))
    _check_pooling(pooling, model, trust_remote_code)
    if pooling and not data:
        raise InvalidOptionError("--pooling says how to compare int8 embeddings on --data; give --data")
    if data and not quantize:
        raise InvalidOptionError(ex.NEEDS_QUANTIZE)
    m = modelio.load_model(model, trust_remote_code=trust_remote_code)
    task = _load_data(data, m, model, 0, pooling) if data else None
    # export_onnx checks --data first, stages its files and moves them into place only after
    # the parity gate and the int8 comparison: a failure leaves neither file.
    with outputs.writing(out):
        report = ex.export_onnx(m, out, atol=atol, quantize=quantize, int8_data=task)
    if quantize:  # every file written, the int8 copy too
        report["files"] = [*report["files"], report["quantized"]["path"]]
    ui.log(f"[green]wrote[/green] {out}  (max abs diff vs PyTorch {report['max_abs_diff']:.2e}, atol {atol})")
    if quantize:
        q = report["quantized"]
        ui.log(f"[green]wrote[/green] {q['path']}  ({q['size_bytes'] / 1e6:.2f} MB, "
               f"{q['size_ratio']:.2f}x of fp32)")
        if "accuracy" in q:
            a = q["accuracy"]
            ui.log(f"int8 accuracy {a['int8']:.4f} vs fp32 {a['fp32']:.4f} (delta {a['delta']:+.4f})")
        if "embedding" in q:
            e = q["embedding"]
            ui.log(f"int8 embeddings: cosine to fp32 {e['embedding_cosine']:.4f} on average, "
                   f"{e['embedding_cosine_min']:.4f} at worst ({e['examples']} examples, {e['pooling']} pooling)")
    ui.result(report)


# ----------------------------------------------------------------------------- demo

@cli.command(epilog=DEMO_EXAMPLES)
@click.option("--out", type=click.Path(), default="runs/demo", show_default=True)
@click.option("--steps", type=STEPS, default=300, show_default=True, help="Finetuning budget N.")
@click.option("--quick", is_flag=True, help="Tiny models and few steps (smoke run, ~1 min).")
@click.option("--threads", type=COUNT, default=2, show_default=True)
@click.option("--force", is_flag=True, help=FORCE_HELP)
@common
def demo(out, steps, quick, threads, force, quiet, as_json):
    """Train (once, cached) ViTs on digits, fuse, finetune, profile, export."""
    from otcompress.demo import run_demo
    ui = UI(quiet, as_json)
    result = run_demo(out, steps=steps, quick=quick, threads=threads, force=force, log=ui.log,
                      progress_factory=ui.progress)
    ui.table("otcompress demo: digits, anchor hidden {a} vs parents hidden {p}".format(**result["widths"]),
             result["columns"], [[name, f"{acc:.2f}", *rest] for name, acc, *rest in result["rows"]])
    ui.result(result)


# ----------------------------------------------------------------------------- families

@cli.command(epilog=FAMILIES_EXAMPLES)
@common
def families(quiet, as_json):
    """The model classes otcompress fuses, per family (model type)."""
    from otcompress.architectures import supported
    ui = UI(quiet, as_json)
    table = supported()
    ui.table("supported model classes", ["model class", "family"],
             [[cls, model_type] for model_type, classes in table.items() for cls in classes], left=2)
    ui.result({"families": table})


@cli.command(epilog=PROFILES_EXAMPLES)
@common
def profiles(quiet, as_json):
    """The named recipes for `fuse --profile NAME`, one line each."""
    ui = UI(quiet, as_json)
    named = recipes.descriptions()
    ui.table(f"profiles (in {recipes.PROFILE_DIR.resolve()})", ["profile", "description"],
             [[name, text or "-"] for name, text in named.items()], left=2)
    ui.result({"profiles": named})


# ----------------------------------------------------------------------------- entry point

def expand_multi_value(argv: list[str]) -> list[str]:
    """`--parents a b c` -> `--parents a --parents b --parents c`: Click's
    options take one value per flag."""
    out, current = [], None
    for arg in argv:
        if arg.startswith("-") and not _is_number(arg):
            name = arg.split("=", 1)[0]
            current = name if name in MULTI_VALUE and "=" not in arg else None
            out.append(arg)
        elif current is not None and out[-1] != current:
            out += [current, arg]
        else:
            out.append(arg)
    return out


def _is_number(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False


def _passive_openmp():
    # Spinning OpenMP workers wait for a core another process holds: on a shared
    # 2-core machine that made fusion 3x slower. Must be set before torch loads.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def _quiet_hf():
    # Hugging Face's own progress bars would interleave with ours on stderr.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    if "transformers" in sys.modules:  # already imported: the env vars came too late
        from transformers.utils import logging as hf_logging
        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()


class Signalled(BaseException):
    """SIGINT or SIGTERM arrived: unwinds like Ctrl-C (staged outputs are
    removed on the way out), then the process exits 128 + the signal number.
    A BaseException of its own, so that neither `except Exception` in the
    library nor click (which turns KeyboardInterrupt into Abort) swallows it."""

    def __init__(self, signum):
        super().__init__(signum)
        self.signum = signum


def _raise_signalled(signum, frame):
    raise Signalled(signum)


def _handle_signals():
    """Install the SIGINT/SIGTERM handlers (main thread only); returns the
    previous handlers, for `_restore_signals`."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    return {sig: signal.signal(sig, _raise_signalled) for sig in (signal.SIGINT, signal.SIGTERM)}


def _restore_signals(previous):
    for sig, handler in previous.items():
        signal.signal(sig, handler)


_SHOWN_BY = None  # the UI of the command that runs (main routes warnings to it)


def _warnings_to_ui(previous):
    """A `warnings.showwarning` that prints through the running command's UI
    (before one exists, as `previous` did)."""
    def show(message, category, filename, lineno, file=None, line=None):
        if _SHOWN_BY is None:
            return previous(message, category, filename, lineno, file, line)
        _SHOWN_BY._warning(message, category)
    return show


def main(argv=None):
    _passive_openmp()
    argv = expand_multi_value(list(sys.argv[1:] if argv is None else argv))
    _quiet_hf()
    debug = bool(os.environ.get("OTCOMPRESS_DEBUG"))
    fail = _failer("--json" in argv)
    previous = _handle_signals()
    shown = warnings.showwarning
    warnings.showwarning = _warnings_to_ui(shown)
    try:
        cli.main(args=argv, prog_name="otcompress", standalone_mode=False)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    except Signalled as e:
        fail("error: interrupted" if e.signum == signal.SIGINT else "error: terminated", 128 + e.signum)
    except click.exceptions.Abort as e:
        if isinstance(e.__context__, KeyboardInterrupt):
            fail("error: interrupted", 130)
        fail("error: aborted", 1)
    except click.ClickException as e:
        fail(f"error: {e.format_message()}", 2)
    except OTCompressError as e:
        fail(f"error: {e}", e.exit_code)
    except KeyboardInterrupt:
        fail("error: interrupted", 130)
    except OSError as e:
        if e.errno not in _USER_ERRNOS:
            _internal(e, debug, fail)
        fail(f"error: {e.strerror}{f': {e.filename}' if e.filename else ''}", 2)
    except Exception as e:  # noqa: BLE001 - an internal bug: one line unless debugging
        _internal(e, debug, fail)
    finally:
        _restore_signals(previous)
        warnings.showwarning = shown
        global _SHOWN_BY
        _SHOWN_BY = None
    sys.exit(0)


# The machine's state, not a bug: no space or quota left, a read-only file system.
_USER_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS)


def _internal(e, debug, fail):
    if debug:
        raise e
    fail(f"internal error: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''} "
         "(set OTCOMPRESS_DEBUG=1 for a traceback)", 1)


def _failer(as_json):
    """`fail(message, code)`: the one line on stderr, with --json also one JSON
    object on stdout ({"error", "exit_code"}), then the exit."""
    def fail(message, code):
        click.echo(message, err=True)
        if as_json:
            click.echo(json.dumps({"error": message.split(": ", 1)[1], "exit_code": code}))
        sys.exit(code)
    return fail


if __name__ == "__main__":  # python -m otcompress.cli (e.g. under accelerate launch)
    main()
