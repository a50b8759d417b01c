"""The otcompress command line: a thin shell over the Python API (the
commands here; their click pieces in `cli_types`, what they show and the
process's signals in `cli_ui`, the fusion summary in `summary`).

Exit codes: 0 success; 2 a user error (bad input, bad option, incompatible
models); 3 a validation gate failed; 1 an internal error; 130 interrupted
(Ctrl-C), 143 terminated (SIGTERM). `--json` prints exactly one JSON object
on stdout, whose `path` names what was written; logs and progress go to
stderr."""
from __future__ import annotations

import os
import signal
import sys

import click

from otcompress import recipes
from otcompress.cli_types import (COUNT, FORCE_HELP, NON_NEGATIVE, POSITIVE, STEPS, bounded, common,
                                  device_option, expand_multi_value, pooling_option, recipe_options,
                                  remote_code_option, resolve_device, resolve_recipe)
from otcompress.cli_ui import (UI, USER_ERRNOS, Signalled, failer, flag_non_finite, handle_signals, internal_error,
                               metrics_table, passive_openmp, profile_row, quiet_hf, restore_signals,
                               route_warnings, short_names, unroute_warnings)
from otcompress.errors import InvalidOptionError, OTCompressError
from otcompress.options import BY_NAME as OPTIONS
from otcompress.outputs import os_error
from otcompress.summary import fusion_summary

__all__ = ["cli", "main", "expand_multi_value", "short_names", "UI"]  # what callers and tests import from here


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
@click.option("--hidden", type=COUNT, help="Fold target hidden size (no --anchor: the first parent's architecture).")
@click.option("--heads", type=COUNT, help="Fold target number of attention heads.")
@click.option("--intermediate", type=COUNT, help="Fold target MLP width.")
@click.option("--kv-heads", type=COUNT, help="Fold target key/value heads (grouped-query attention).")
@click.option("--layers", type=COUNT, help="Fold target depth: fewer blocks than the parents "
              "(each parent is depth-mapped: its most influential blocks are kept, in order).")
@recipe_options
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
    recipe = resolve_recipe(ctx, profile_name, flags)
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
    if race and race.get("note"):  # one start possible: nothing was raced
        ui.log(race["note"])
    elif race:
        ui.table(f"starting-point race ({race['steps_each']} steps each, {race['holdout_examples']} "
                 "held-out examples)", ["candidate", "held-out loss, one-shot", "after the race steps"],
                 [[c["candidate"], c["one_shot_holdout_loss"], c.get("holdout_loss")] for c in race["candidates"]])
    metrics = report.get("metrics") or {}
    first = next(iter(metrics.values()), {})
    metrics_table(ui, metrics, first.get("split"), first.get("examples"))
    # "path" names the written output in every command's JSON; "out" is kept for one release.
    ui.result({"path": str(out), "out": str(out), "report": report})


def _load_data(spec, model, model_path, seed, pooling=None):
    from otcompress.pipeline import load_task_data
    return load_task_data(spec, model, model_path, seed, pooling)


def _check_pooling(pooling, model, trust_remote_code):
    """Before any weights are read: --pooling is for headless models only."""
    if pooling and not _headless(model, trust_remote_code):
        raise InvalidOptionError(f"--pooling applies to headless (embedding) models; {model} has a task head")


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
@click.option("--distill-alpha", type=bounded("distill_alpha"), default=OPTIONS["distill_alpha"].default,
              show_default=True)
@click.option("--temperature", type=POSITIVE, default=2.0, show_default=True)
@click.option("--lr", type=bounded("lr"), default=OPTIONS["lr"].default, show_default=True)
@click.option("--batch-size", type=bounded("batch_size"), default=OPTIONS["batch_size"].default, show_default=True)
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
    from otcompress.pipeline import check_tokenizers, relabelled
    main_process = ft.is_main_process()  # under accelerate launch / torchrun only rank 0 writes and prints
    ui = UI(quiet or not main_process, as_json and main_process)
    _distill_options_need_teachers(teachers)
    from otcompress.data import spec_path
    mine = outputs.input_paths(model, *teachers, spec_path(data))  # --out may neither be nor hold one
    outputs.check_out(out, force, inputs=mine, log=ui.log)
    device = resolve_device(device)
    if teachers:  # configs only: wrong teachers fail before weights are read or training starts
        modelio.check_teachers(modelio.load_config(model, trust_remote_code=trust_remote_code),
                               [modelio.load_config(t, trust_remote_code=trust_remote_code)
                                for t in teachers])
        check_tokenizers(model, teachers, "the model", "teacher")
    _check_pooling(pooling, model, trust_remote_code)
    if _headless(model, trust_remote_code) and not teachers:
        raise InvalidOptionError(f"{model} has no task head: finetune trains it by distilling the "
                                 "embeddings of --teachers (e.g. its parents); give them")
    m = modelio.load_model(model, trust_remote_code=trust_remote_code)
    task = _load_data(data, m, model, seed, pooling)
    teacher_ms = [modelio.load_model(t, trust_remote_code=trust_remote_code) for t in teachers]
    reference = teacher_ms if task.task == "feature-extraction" else None
    with ui.progress() as prog:
        scored = ft.evaluate(m, task, device=device, reference=reference,
                             progress=relabelled(prog, "scoring before (eval split)"))
        before = flag_non_finite(ui, f"{model} before finetuning", scored)
        summary = ft.finetune(m, task, steps=steps, lr=lr, batch_size=batch_size, seed=seed,
                              teachers=teacher_ms, distill_alpha=distill_alpha, temperature=temperature,
                              device=device, progress=prog.finetune)
        if not main_process:
            return
        trained = ft.evaluate(m, task, device=device, reference=reference,
                              progress=relabelled(prog, "scoring after (eval split)"))
        ft.check_trained(scored, trained, lr)
        after = flag_non_finite(ui, f"{model} after finetuning", trained)
    summary.pop("losses", None)
    # The run's settings, in its own report too (a model without a fusion report carried none).
    summary.update(lr=lr, batch_size=batch_size, seed=seed, distill_alpha=distill_alpha if teachers else None,
                   temperature=temperature if teachers else None)
    result = {"path": str(out), "model": model, "data": data, "teachers": list(teachers), "finetune": summary,
              "split": "eval", "examples": task.num_examples("eval"),
              "metrics": {"before": before, "after": after}}
    section = {**summary, "data": data, "teachers": list(teachers), "from": model, "pooling": task.pooling}
    from otcompress.data import record_class_names
    if record_class_names(m.config, task):  # what it learnt the classes as, for every later eval
        result["class_names"] = list(m.config.id2label.values())
    with outputs.staged_dir(out, force, inputs=mine) as tmp:
        m.to("cpu").save_pretrained(tmp)
        outputs.copy_preprocessor(model, tmp)
        result["sentence_transformers"] = outputs.copy_sentence_transformers(model, tmp, m.config.hidden_size,
                                                                              pooling)
        # The model card and fusion report (how the model was made) come along, with this run added.
        result["carried"] = outputs.carry_lineage(model, tmp, section, {
            f"before finetune ({data})": before, f"finetuned {summary['steps']} steps ({data})": after})
        outputs.write_json(tmp / "finetune_report.json", result)
    metrics_table(ui, result["metrics"], split="eval", examples=result["examples"])
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
    from otcompress.pipeline import check_tokenizers
    ui = UI(quiet, as_json)
    device = resolve_device(device)
    _check_reference(model, list(reference), trust_remote_code)
    check_tokenizers(model, list(reference), "the model", "reference model")
    _check_pooling(pooling, model, trust_remote_code)
    m = modelio.load_model(model, trust_remote_code=trust_remote_code)
    task = _load_data(data, m, model, 0, pooling)
    refs = [modelio.load_model(r, trust_remote_code=trust_remote_code) for r in reference] or None
    split = split or task.default_eval_split
    with ui.progress() as prog:
        scored = ft.evaluate(m, task, split=split, batch_size=batch_size, device=device, reference=refs,
                             progress=prog)
    metrics = flag_non_finite(ui, model, scored)
    examples = task.num_examples(split)
    metrics_table(ui, {model: metrics}, split=split, examples=examples)
    ui.result({"model": model, "data": data, "split": split, "examples": examples,
               "reference": list(reference), **metrics})


def _headless(path, trust_remote_code) -> bool:
    from otcompress import modelio
    from otcompress.architectures import is_headless
    return is_headless(modelio.load_config(path, trust_remote_code=trust_remote_code))


def _distill_options_need_teachers(teachers) -> None:
    """--distill-alpha and --temperature shape the distillation: without
    --teachers there is none, and options are never silently ignored."""
    ctx = click.get_current_context()
    for name in ("distill_alpha", "temperature"):
        if not teachers and ctx.get_parameter_source(name) == click.core.ParameterSource.COMMANDLINE:
            raise InvalidOptionError(f"--{name.replace('_', '-')} applies to distillation: give --teachers, "
                                     "or drop it")


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
             [profile_row(names[p], r) for p, r in results.items()])
    ui.result({"models": results})


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
    stale = ex.int8_path(out)
    if not quantize and stale.exists():  # left as it was (never deleted unasked), but it is no copy of this model
        ui.log(f"[yellow]warning:[/yellow] {stale} is from an earlier export, not of this model: "
               "remove it, or export again with --quantize int8")
    if report.get("exported_as"):
        ui.log(f"the model's weights are {report['exported_as']['model_dtype']}: exported in float32 "
               "(ONNX Runtime's CPU kernels lack most half-precision operators)")
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

def main(argv=None):
    passive_openmp()
    argv = expand_multi_value(list(sys.argv[1:] if argv is None else argv))
    quiet_hf()
    debug = bool(os.environ.get("OTCOMPRESS_DEBUG"))
    fail = failer("--json" in argv)
    previous = handle_signals()
    shown = route_warnings()
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
    except Exception as e:  # noqa: BLE001 - an internal bug (one line unless debugging), or the machine's state
        oe = os_error(e)
        if oe is None or oe.errno not in USER_ERRNOS:
            internal_error(e, debug, fail)
        fail(f"error: {oe.strerror}{f': {oe.filename}' if oe.filename else ''}", 2)
    finally:
        restore_signals(previous)
        unroute_warnings(shown)
    sys.exit(0)


if __name__ == "__main__":  # python -m otcompress.cli (e.g. under accelerate launch)
    main()
