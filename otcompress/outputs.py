"""Output directories: written to a temporary sibling and moved into place only
when complete, so a failure never leaves a half-written `--out`."""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

import yaml

from otcompress.errors import InvalidOptionError

# Files a user expects beside the weights: tokenizer or image processor.
PREPROCESSOR_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json",
                      "preprocessor_config.json", "added_tokens.json")


def check_out(out, force: bool) -> Path:
    out = Path(out)
    if out.exists() and not force:
        raise InvalidOptionError(f"--out {out} already exists (pass --force to replace it)")
    if not out.parent.exists():
        raise InvalidOptionError(f"--out {out}: parent directory {out.parent} does not exist")
    return out


@contextmanager
def staged_dir(out, force: bool = False):
    """Yields a temporary directory; on success it replaces `out`, on failure
    it is removed and `out` is untouched."""
    out = check_out(out, force)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _replace(tmp, out)


def _replace(tmp: Path, out: Path) -> None:
    if out.exists():
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


def copy_sentence_transformers(source, dest: Path, hidden_size: int) -> dict:
    """Carry a sentence-transformers checkpoint's pipeline files, with the
    pooling dimension rewritten to the fused model's width. Modules with
    weights of their own (a Dense projection) cannot be carried: they read
    the parent's width. Returns {"copied": [...], "skipped": [...]}."""
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
            cfg.write_text(json.dumps(settings, indent=2) + "\n")
        copied.append(folder)
    return {"copied": copied, "skipped": skipped}


def write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, default=_jsonable) + "\n")


def write_yaml(path: Path, obj) -> None:
    path.write_text(yaml.safe_dump(obj, sort_keys=False))


def _jsonable(o):
    try:
        import torch
        if isinstance(o, torch.Tensor):
            return o.tolist()
    except ImportError:  # pragma: no cover
        pass
    return str(o)


def model_card(report: dict) -> str:
    """A Hub-style model card: YAML front matter, then how the model was made."""
    front = {
        "base_model": [report["anchor"], *report["parents"]],
        "library_name": "transformers",
        "tags": ["otcompress", "model-fusion", "optimal-transport"],
    }
    o = {k: None for k in ("alignment", "solver", "reg", "residual", "qk")} | report.get("options", {})
    lines = [
        "---", yaml.safe_dump(front, sort_keys=False).strip(), "---", "",
        "# OT-fused model", "",
        "Made by [otcompress](https://arxiv.org/abs/2310.05719): heterogeneous Optimal-Transport "
        "fusion (Imfeld et al., ICLR 2024). The parents were aligned to the anchor with transport "
        "maps through every block and averaged into the anchor's architecture and width.", "",
        "## Recipe", "",
        f"- anchor: `{report['anchor']}`",
        f"- parents: {', '.join(f'`{p}`' for p in report['parents'])}",
        f"- alignment: {o['alignment']}, solver: {o['solver']}, reg: {o['reg']}, "
        f"residual: {o['residual']}, Q/K maps: {o['qk']}",
        f"- mixing weights (anchor first): {', '.join(f'{w:.3g}' for w in o.get('weights') or [])}",
        f"- calibration tokens: {report.get('calibration_samples', 0)}",
    ]
    ft = report.get("finetune")
    if ft:
        lines.append(f"- finetuned {ft['steps']} steps (lr {ft.get('lr')}, batch {ft.get('batch_size')})")
    metrics = report.get("metrics") or {}
    if metrics:
        lines += ["", "## Metrics", "", "| model | " + " | ".join(_metric_names(metrics)) + " |",
                  "|---|" + "---|" * len(_metric_names(metrics))]
        for name, m in metrics.items():
            lines.append(f"| {name} | " + " | ".join(_fmt(m.get(k)) for k in _metric_names(metrics)) + " |")
    race = report.get("race")
    if race:
        lines += ["", "## Starting-point race", "",
                  f"Every candidate was scored one-shot on {race['holdout_examples']} held-out training "
                  f"examples; the best of each kind then trained the first {race['steps_each']} steps "
                  f"of the run (distilled from the parents); **{race['winner']}** won and continued.", "",
                  "| candidate | held-out loss, one-shot | after the race steps |", "|---|---|---|"]
        lines += [f"| {c['candidate']} | {c['one_shot_holdout_loss']:.4f} | "
                  f"{_fmt(c.get('holdout_loss'))} |" for c in race["candidates"]]
    t = report.get("timings")
    if t:
        lines += ["", "## Cost", "", f"Fusion took {t['total']:.1f} s (activations {t['activations']:.1f} s, "
                  f"alignment {t['align']:.1f} s). See `fusion_report.json` for per-map transport "
                  "statistics.", ""]
    return "\n".join(lines)


def _metric_names(metrics: dict) -> list[str]:
    names = []
    for m in metrics.values():
        names += [k for k, v in m.items() if isinstance(v, (int, float)) and k not in names]
    return names


def _fmt(v) -> str:
    if v is None:
        return "-"
    return f"{v:.4f}" if isinstance(v, float) else str(v)
