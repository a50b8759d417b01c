"""Output directories: written to a temporary sibling and moved into place only
when complete, so a failure never leaves a half-written `--out`."""
from __future__ import annotations

import errno
import json
import math
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

import yaml

from otcompress.errors import InvalidOptionError
from otcompress.inputs import FROM_PARENTS, parent_weights

# Files a user expects beside the weights: tokenizer or image processor.
PREPROCESSOR_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json",
                      "preprocessor_config.json", "added_tokens.json")


# Every directory otcompress writes holds this file. `--force` replaces only a
# directory that has it (or a report of an older release, below), or an empty
# one: never what a user put there, never a file, a special file or a link.
MARKER = ".otcompress"
_OLD_OUTPUTS = ("fusion_report.json", "finetune_report.json")  # written before the marker existed


def check_out(out, force: bool, inputs=(), log=None, ours=None) -> Path:
    """Refuse an `--out` that exists (unless forced and `ours(out)`: by default
    a directory with MARKER), that is or holds one of the command's `inputs`
    (model paths), or that cannot be written, before any work. `log` hears
    what --force will replace. Missing parent directories are fine:
    `staged_dir` (or `writing`) creates them when the result is written."""
    out = _given(out)
    if os.path.lexists(out):
        _check_replaceable(out, force, inputs, ours or _ours_dir)
        if log:
            log(f"--force: replacing {out}, {_what(out)}")
    base = _existing_ancestor(out.parent)
    if not base.is_dir():
        raise InvalidOptionError(f"--out {out}: {base} is not a directory")
    if not os.access(base, os.W_OK | os.X_OK):
        raise InvalidOptionError(f"--out {out}: cannot write in {base} (permission denied)")
    return out


def _given(out) -> Path:
    if not str(out).strip():  # Path("") is "." : the current directory
        raise InvalidOptionError("--out is empty: give the path to write")
    return Path(out)


def _check_replaceable(out: Path, force: bool, inputs, ours) -> None:
    """An existing `out` may go only with --force, and only when `ours(out)`
    says otcompress wrote it; never a link, nor an input of this command."""
    if out.is_symlink():
        raise InvalidOptionError(f"--out {out} is a symbolic link; otcompress never replaces one "
                                 "(give the real path or another --out)")
    held = _held_input(out, inputs)
    if held is not None:
        raise InvalidOptionError(f"--out {out} is an input of this command ({held}); choose another --out")
    if not ours(out):
        raise InvalidOptionError(f"--out {out} already exists and otcompress did not write it "
                                 f"({_kind(out)}); --force replaces only otcompress outputs: choose another "
                                 "--out or move it away")
    foreign = _foreign_files(out)
    if foreign:
        raise InvalidOptionError(f"--out {out} holds files otcompress did not write ({', '.join(foreign[:3])}"
                                 f"{', ...' if len(foreign) > 3 else ''}); --force never deletes them: move "
                                 "them away or choose another --out")
    if not force:
        raise InvalidOptionError(f"--out {out} already exists (pass --force to replace it)")


def _written(root: Path) -> list[str]:
    """Every path under `root` (files, links, directories), relative, sorted."""
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.name != MARKER)


def _foreign_files(out: Path) -> list[str]:
    """Paths in a marked directory that its MARKER's manifest does not list:
    files a user put there since (a marker of an older release lists none:
    nothing is known of it, as before)."""
    marker = out / MARKER
    if not out.is_dir() or out.is_symlink() or not marker.is_file():
        return []
    listed = set(marker.read_text().splitlines()[1:])
    if not listed:
        return []
    return [p for p in _written(out) if p not in listed]


def input_paths(*given) -> list:
    """The command's inputs that are files or directories (models, a --data
    file or folder; a built-in data name such as "pydoc" is none): `--out`
    may neither be nor hold one."""
    return [g for g in given if isinstance(g, (str, os.PathLike)) and str(g) and os.path.exists(g)]


def _held_input(out: Path, inputs):
    """The first input that is `out` or lies under it."""
    where = os.path.realpath(out)
    for path in inputs:
        if isinstance(path, (str, os.PathLike)) and str(path):
            real = os.path.realpath(path)
            if real == where or real.startswith(where.rstrip(os.sep) + os.sep):
                return str(path)
    return None


def _ours_dir(out: Path) -> bool:
    if not out.is_dir():
        return False
    return (out / MARKER).is_file() or any((out / f).is_file() for f in _OLD_OUTPUTS) or not any(out.iterdir())


def _kind(out: Path) -> str:
    import stat
    mode = os.lstat(out).st_mode
    if stat.S_ISDIR(mode):
        return f"a directory without {MARKER}"
    if stat.S_ISREG(mode):
        return "a file"
    return "a special file"


def _what(out: Path) -> str:
    return "an empty directory" if out.is_dir() and not any(out.iterdir()) else "an earlier otcompress output"


def ours_file(out: Path, marked) -> bool:
    """A regular file (not a link, FIFO or device) that `marked(path)` says
    otcompress wrote (export: the ONNX file's metadata)."""
    return out.is_file() and not out.is_symlink() and marked(out)


def _existing_ancestor(path: Path) -> Path:
    path = Path(os.path.abspath(path))
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


@contextmanager
def writing(out):
    """Creates `out`'s missing parent directories; if the block fails, removes
    the ones it created. An OS error about writing there (read-only, no
    permission, no space) becomes a user error naming `--out`."""
    out = Path(out)
    created = []
    try:
        for parent in reversed(Path(os.path.abspath(out)).parents):
            if not parent.exists():
                parent.mkdir()
                created.append(parent)
        yield out
    except BaseException as e:
        for d in reversed(created):  # deepest first; only while still empty
            try:
                d.rmdir()
            except OSError:
                break
        e = os_error(e) or e
        if isinstance(e, OSError) and (_about(e, out) or e.errno in FULL):
            raise InvalidOptionError(f"--out {out}: cannot write there ({e.strerror or e})") from None
        raise


FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)  # no space, no quota, over the file-size limit


def os_error(e: BaseException) -> OSError | None:
    """The OS error behind `e`: `e` itself, or the one safetensors' writer
    reports only inside its message ("... (os error 28)"; its error type
    carries no errno), so a full disk while saving weights is a user error too."""
    if isinstance(e, OSError):
        return e
    m = re.search(r"\(os error (\d+)\)", str(e)) if type(e).__name__ == "SafetensorError" else None
    return OSError(int(m.group(1)), os.strerror(int(m.group(1)))) if m else None


def _about(e: OSError, out: Path) -> bool:
    """Whether an OS error concerns `out`, its staging siblings or its parents."""
    where = os.path.abspath(out.parent)
    names = [f for f in (e.filename, getattr(e, "filename2", None)) if f]
    return any(os.path.abspath(f) == where or os.path.abspath(f).startswith(where + os.sep) or
               where.startswith(os.path.abspath(f) + os.sep) for f in names)


@contextmanager
def staged_dir(out, force: bool = False, inputs=()):
    """Yields a temporary directory; on success it replaces `out`, on failure
    (an exception, Ctrl-C or SIGTERM turned into one) it is removed and `out`
    is untouched. Missing parents of `out` are created (and removed again if
    the write fails). Permissions follow the umask, as `mkdir` and `open` do.
    The directory gets MARKER: a later `--force` may replace it. An existing
    `out` is replaced only as `check_out` allows (`inputs`: the command's
    model paths, never replaced)."""
    out = check_out(out, force, inputs)
    with writing(out):
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
        try:
            yield tmp
            # The manifest: a later --force replaces only these (`_foreign_files`).
            (tmp / MARKER).write_text("written by otcompress; `--force` may replace this directory\n"
                                      + "".join(f"{p}\n" for p in _written(tmp)))
            apply_umask(tmp)
            _replace(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


def apply_umask(root: Path) -> None:
    """Give `root` and everything under it the modes a plain `mkdir`/`open`
    would (tempfile.mkdtemp makes 0700 and some writers 0600 files)."""
    mask = os.umask(0)
    os.umask(mask)
    for path in (root, *root.rglob("*")):
        if path.is_symlink():
            continue
        os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~mask)


def _replace(tmp: Path, out: Path) -> None:
    if os.path.lexists(out):
        if out.is_symlink() or not _ours_dir(out):  # appeared since check_out: never clobber it
            raise InvalidOptionError(f"--out {out} appeared while writing and otcompress did not write it")
        foreign = _foreign_files(out)
        if foreign:  # put there while this run wrote: kept, and this result is not moved in
            raise InvalidOptionError(f"--out {out} got files otcompress did not write while it ran "
                                     f"({', '.join(foreign[:3])}); nothing was replaced: run again")
        old = out.with_name(f".{out.name}.old")
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old) if old.is_dir() else old.unlink()
    else:
        tmp.rename(out)


def copy_preprocessor(source, dest: Path) -> list[str]:
    """Copy the tokenizer / image-processor files of a model directory."""
    if not isinstance(source, (str, os.PathLike)) or not Path(source).is_dir():
        return []
    copied = []
    for name in PREPROCESSOR_FILES:
        f = Path(source) / name
        if f.is_file():
            shutil.copy2(f, dest / name)
            copied.append(name)
    return copied


# sentence-transformers keeps its pipeline beside the weights: which modules run
# (modules.json), their folders (1_Pooling, 2_Normalize, ...) and its settings.
SENTENCE_TRANSFORMERS_FILES = ("modules.json", "sentence_bert_config.json", "config_sentence_transformers.json")
# Module folders that hold no weights, only settings.
_WEIGHTLESS_MODULES = ("Pooling", "Normalize")


def copy_sentence_transformers(source, dest: Path, hidden_size: int, pooling: str | None = None) -> dict:
    """Carry a sentence-transformers checkpoint's pipeline files, with the
    pooling dimension rewritten to the fused model's width, and its mode to
    `pooling` where the run was told one (--pooling: the model was trained and
    scored so). Modules with weights of their own (a Dense projection) cannot
    be carried: they read the parent's width. Returns {"copied": [...], "skipped": [...]}."""
    src = Path(source) if isinstance(source, (str, os.PathLike)) else None
    if src is None or not (src / "modules.json").is_file():
        return {"copied": [], "skipped": []}
    copied, skipped = [], []
    for name in SENTENCE_TRANSFORMERS_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dest / name)
            copied.append(name)
    for module in json.loads((src / "modules.json").read_text()):
        folder = module.get("path") or ""
        if not folder or not (src / folder).is_dir():
            continue
        if not module.get("type", "").endswith(_WEIGHTLESS_MODULES):
            skipped.append(folder)
            continue
        shutil.copytree(src / folder, dest / folder)
        cfg = dest / folder / "config.json"
        if cfg.is_file():
            settings = json.loads(cfg.read_text())
            if "word_embedding_dimension" in settings:
                settings["word_embedding_dimension"] = hidden_size
                if pooling:
                    from otcompress.embedding import ST_POOLING_KEYS
                    settings.update({k: mode == pooling for k, mode in ST_POOLING_KEYS.items()})
            cfg.write_text(json.dumps(settings, indent=2) + "\n")
        copied.append(folder)
    return {"copied": copied, "skipped": skipped}


def write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(json_safe(obj), indent=2, default=_jsonable, allow_nan=False) + "\n")


def json_safe(obj):
    """`obj` with every NaN/Inf float as None: JSON has no such numbers, and a
    file with them (Python writes NaN) is refused by strict readers."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def write_yaml(path: Path, obj) -> None:
    path.write_text(yaml.safe_dump(obj, sort_keys=False))


def _jsonable(o):
    try:
        import torch
        if isinstance(o, torch.Tensor):
            return json_safe(o.tolist())
    except ImportError:  # pragma: no cover
        pass
    return str(o)


def model_card(report: dict) -> str:
    """A Hub-style model card: YAML front matter, then how the model was made."""
    o = {k: None for k in ("alignment", "solver", "reg", "residual", "qk")} | report.get("options", {})
    from_parents = o["alignment"] in FROM_PARENTS  # built from the parents alone: no anchor weights
    target = str(report["anchor"]).startswith("target ")  # folded into widths given, no anchor model
    anchor_won = o["alignment"] == "anchor"  # the race kept the anchor's own weights (`pipeline.Race`)
    used = [] if anchor_won else report.get("parents_used") or list(range(1, len(report["parents"]) + 1))
    front = {
        "base_model": [*([] if target or from_parents else [report["anchor"]]),
                       *(report["parents"][k - 1] for k in used)],
        "library_name": "transformers",
        "tags": ["otcompress", "model-fusion", "optimal-transport"],
    }
    how = _how_made(o) if from_parents else (
        "The anchor itself was the best start (see below): no parent's weights were used." if anchor_won
        else "The parents were aligned to the anchor with transport maps through every block and "
             "averaged into the anchor's architecture and width.")
    lines = [
        "---", yaml.safe_dump(front, sort_keys=False).strip(), "---", "",
        "# The anchor, finetuned by otcompress" if anchor_won else "# OT-fused model", "",
        "Made by [otcompress](https://arxiv.org/abs/2310.05719): heterogeneous Optimal-Transport "
        f"fusion (Imfeld et al., ICLR 2024). {how}", "",
        "## Recipe", "",
        f"- {'target' if target else 'anchor (its shape only)' if from_parents else 'anchor'}: `{report['anchor']}`",
        f"- parents: {', '.join(f'`{p}`' for p in report['parents'])}" + _used_line(report, used),
    ]
    if not anchor_won:
        lines += [f"- alignment: {o['alignment']}, solver: {o['solver']}, reg: {o['reg']}, "
                  f"residual: {o['residual']}, Q/K maps: {o['qk']}", _weights_line(o, from_parents)]
    if report.get("calibration_samples"):  # tokens the transport statistics read (depth maps and refits say theirs)
        lines.append(f"- calibration tokens: {report['calibration_samples']}")
    lines += _depth_lines(report.get("depth_maps") or [], used)
    refit = report.get("reconstruct")
    if refit:
        err = refit["relative_error"]
        lines.append(f"- reconstruction: {refit['modules']} layers refitted by least squares to the parents' "
                     f"outputs on the calibration data (median relative output error {err['before']:.3g} -> "
                     f"{err['after']:.3g})")
    for ft in [*report.get("finetune_history", []), report.get("finetune")]:
        if ft:
            lines.append(_finetune_line(ft))
    metrics = report.get("metrics") or {}
    if metrics:
        lines += ["", "## Metrics", "", _measured_on(next(iter(metrics.values()))), "",
                  "| model | " + " | ".join(_metric_names(metrics)) + " |",
                  "|---|" + "---|" * len(_metric_names(metrics))]
        for name, m in metrics.items():
            lines.append(f"| {name} | " + " | ".join(_fmt(m.get(k)) for k in _metric_names(metrics)) + " |")
        if "probe_similarity_pearson" in _metric_names(metrics):
            lines += ["", "`probe_similarity_pearson` is measured on otcompress's built-in probe set instead: "
                      "short everyday English sentences, unlike the training text."]
    race = report.get("race")
    if race and race.get("note"):  # nothing was raced: one start possible, or one settled one-shot
        lines += ["", "## Starting point", "", race["note"][0].upper() + race["note"][1:] + "."]
    elif race:
        lines += ["", "## Starting-point race", "",
                  f"Every candidate was scored one-shot on {race['holdout_examples']} held-out training "
                  f"examples; " + _race_outcome(race), "",
                  "| candidate | held-out loss, one-shot | after the race steps |", "|---|---|---|"]
        lines += [f"| {c['candidate']} | {_fmt(c['one_shot_holdout_loss'])} | "
                  f"{_fmt(c.get('holdout_loss'))} |" for c in race["candidates"]]
    if race and race.get("single_parent_starts_from"):
        losses = race.get("single_parent_holdout_loss") or {}
        lines += ["", f"Starts made from one parent were made from parent {race['single_parent_starts_from']}, "
                  "the one with the lowest held-out loss of those they could be made from ("
                  + parent_losses(losses) + "): training regains at best "
                  "about what a start's parent knows."]
    t = report.get("timings")
    if t:
        lines += ["", "## Cost", "", f"Fusion took {t['total']:.1f} s (activations {t['activations']:.1f} s, "
                  f"alignment {t['align']:.1f} s). See `fusion_report.json` for per-map transport "
                  "statistics.", ""]
    return "\n".join(lines)


def _parent_weights(o) -> list:
    """The weights of the parents a fold or prune used (none recorded: [])."""
    return parent_weights(o["weights"]) if o.get("weights") else []


def _how_made(o) -> str:
    several = len(_parent_weights(o)) > 1
    if o["alignment"] == "prune":
        return ("Each parent's most important units were kept (pruned) through every block into the target "
                "widths, as a structured-pruning tool does, and the pruned parents merged; no anchor's weights "
                "were used." if several else
                "One parent's most important units were kept (pruned) through every block into the target "
                "widths, as a structured-pruning tool does; no anchor's weights were used.")
    return ("The parents' units were clustered (folded) through every block into the target widths and merged; "
            "no anchor's weights were used." if several else
            "One parent's units were clustered (folded) through every block into the target widths; no "
            "anchor's weights were used.")


def _weights_line(o, from_parents: bool) -> str:
    if not from_parents:
        return f"- mixing weights (anchor first): {', '.join(f'{w:.3g}' for w in o.get('weights') or [])}"
    w = _parent_weights(o)
    return (f"- the parents' mixing weights: {', '.join(f'{x:.3g}' for x in w)}" if len(w) > 1 else
            "- built from one parent (its weight 1)")


def parent_losses(losses: dict) -> str:
    """{parent number: held-out loss} as the card and the race's log give them."""
    return ", ".join(f"parent {k} {v:.4g}" for k, v in losses.items())


def _race_outcome(race: dict) -> str:
    """What the race's training decided, in a sentence (`pipeline.Race`)."""
    if race["chosen_by"] == "holdout_loss_below_anchor_side_one_shot":
        return (f"the parents' best start trained the first {race['steps_each']} steps of the run (distilled "
                f"from the parents) and was then already below every anchor-side start's one-shot loss, so "
                f"**{race['winner']}** continued and the anchor side trained no step.")
    if race["chosen_by"] == "parents_start_cannot_reach_anchor_side":
        given_up = next(c for c in race["candidates"] if c.get("given_up_after"))
        return (f"the parents' best start ({given_up['candidate']}) trained the first "
                f"{given_up['given_up_after']} steps of the run (distilled from the parents) and was given up "
                f"there: even at twice its rate so far it would not have reached the best anchor-side start's "
                f"one-shot loss in its race steps, so **{race['winner']}** trained every step of the run from "
                f"its start.")
    return (f"the best of each kind then trained the first {race['steps_each']} steps of the run (distilled "
            f"from the parents); **{race['winner']}** won and continued.")


def _used_line(report, used) -> str:
    """Which parents a start built from some of them used (`pipeline._fuse`)."""
    if not report.get("parents_used") or len(used) == len(report["parents"]):
        return ""
    return "; this model was built from " + ", ".join(f"parent {k} (`{report['parents'][k - 1]}`)" for k in used) + \
        " alone"


def _depth_lines(depth_maps: list, used: list) -> list[str]:
    """One line per depth-mapped parent (`used`: their 1-based numbers among
    the parents): which of its blocks each block came from."""
    return [f"- depth map of parent {k} ({m['parent_depth']} -> {m['target_depth']} blocks, {m['merge']}, "
            f"scored from {m['scored_from']}): "
            + ", ".join(f"block {j} <- {g} (kept {kept})" for j, (g, kept) in enumerate(zip(m["groups"], m["kept"])))
            + "; block influence of its blocks " + ", ".join(f"{x:.4g}" for x in m["influence"])
            + ("; block similarities to the anchor's in fusion_report.json" if m.get("similarity") else "")
            for k, m in zip(used, depth_maps) if m]


def _finetune_line(ft: dict) -> str:
    line = f"- finetuned {ft['steps']} steps (lr {ft.get('lr')}, batch {ft.get('batch_size')}"
    if ft.get("data"):
        line += f", data `{ft['data']}`"
    teachers = ft.get("teachers")
    if isinstance(teachers, list):
        line += f", distilled from {', '.join(f'`{t}`' for t in teachers)}" if teachers else ", no teachers"
    restart = ft.get("restart")
    if restart:
        then = restart["loss_at_check"]
        then = "NaN/Inf" if then is None else f"{then:.4g}"
        line += (f"; at lr {restart['lr_before']} the loss climbed from {restart['loss_before']:.4g} to "
                 f"{then} in {restart['wasted_steps']} steps, so it restarted from the start at lr {restart['lr']}")
    return line + ")"


def carry_lineage(source, dest: Path, finetune: dict, metrics: dict | None = None) -> list[str]:
    """A finetuned copy keeps how its model was made: the source directory's
    fusion report (with `finetune` set to this run, any earlier one moved to
    `finetune_history`, and `metrics` added), its resolved recipe and a
    regenerated model card. A model that otcompress did not make keeps its
    own model card, with this run appended. Returns the files written."""
    src = Path(source) if isinstance(source, (str, os.PathLike)) else None
    if src is None or not src.is_dir():
        return []
    written = []
    if (src / "fusion_report.json").is_file():
        report = json.loads((src / "fusion_report.json").read_text())
        if report.get("finetune"):
            report["finetune_history"] = [*report.get("finetune_history", []), report["finetune"]]
        report["finetune"] = finetune
        report["metrics"] = {**(report.get("metrics") or {}), **(metrics or {})}
        write_json(dest / "fusion_report.json", report)
        (dest / "README.md").write_text(model_card(report))
        written += ["fusion_report.json", "README.md"]
        if (src / "otcompress_config.yaml").is_file():
            shutil.copy2(src / "otcompress_config.yaml", dest / "otcompress_config.yaml")
            written.append("otcompress_config.yaml")
    elif (src / "README.md").is_file():
        card = (src / "README.md").read_text().rstrip("\n")
        (dest / "README.md").write_text(card + "\n\n## Finetuned with otcompress\n\n" + _finetune_line(finetune) + "\n")
        written.append("README.md")
    return written


def _measured_on(m: dict) -> str:
    if m.get("split") == "eval":
        return f"On the data's held-out eval split ({m.get('examples', '?')} examples), never trained on."
    return f"On the data's split \"{m.get('split', 'eval')}\"."


def _metric_names(metrics: dict) -> list[str]:
    names = []
    for m in metrics.values():
        names += [k for k, v in m.items() if isinstance(v, (int, float)) and k not in names]
    return names


def _fmt(v) -> str:
    if v is None:
        return "-"
    return f"{v:.4f}" if isinstance(v, float) else str(v)
