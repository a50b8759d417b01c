"""Fusion recipes: named YAML files under `profiles/` (or any YAML file),
validated before any heavy work; unknown keys are an error, not ignored."""
from __future__ import annotations

from pathlib import Path

import yaml

from otcompress.errors import InvalidOptionError

PROFILE_DIR = Path(__file__).parent / "profiles"  # a link to the top-level profiles/ in a checkout

# Every recipe key, its type, and its default (the CLI's defaults come from here).
RECIPE_KEYS = {
    "alignment": (str, "auto"),  # auto: race the starting points (pipeline.py)
    "solver": (str, "sinkhorn"),
    "reg": ((float, str), 0.02),
    "residual": (str, "average"),
    "weights": (list, None),
    "qk": (str, "auto"),
    "token_filter": (str, None),
    "cost_norm": (str, "gap"),
    "activation_dtype": (str, "float32"),
    "data": (str, None),
    "samples": (int, 200),
    "finetune_steps": (int, 0),
    "lr": (float, 1e-3),
    "batch_size": (int, 64),
    "seed": (int, 0),
    "repair": (bool, False),
    "head_alignment": (str, "cross"),
    "on_unconverged": (str, "raise"),
    "on_uniform": (str, "warn"),
    "distill": (bool, True),  # teachers = the parents while finetuning
    "distill_alpha": (float, 0.5),
    "race_fraction": (float, 0.5),
}


def defaults() -> dict:
    return {k: default for k, (_, default) in RECIPE_KEYS.items()}


def available() -> list[str]:
    return sorted(p.stem for p in PROFILE_DIR.glob("*.yaml"))


def load_recipe(name_or_file: str) -> dict:
    """A recipe by profile name (`vit-soft-acts`) or YAML path, checked."""
    path = Path(name_or_file)
    if not path.is_file():
        path = PROFILE_DIR / f"{name_or_file}.yaml"
    if not path.is_file():
        raise InvalidOptionError(
            f"profile '{name_or_file}': no such file or named profile (named: {', '.join(available())})")
    try:
        raw = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        where = getattr(e, "problem_mark", None)
        at = f" at line {where.line + 1}" if where else ""
        raise InvalidOptionError(f"profile {path}: not valid YAML{at}") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise InvalidOptionError(f"profile {path}: must be a mapping of option: value")
    raw.pop("description", None)
    return check_recipe(raw, str(path))


def check_recipe(recipe: dict, where: str = "recipe") -> dict:
    out = {}
    for key, value in recipe.items():
        norm = str(key).replace("-", "_")
        if norm not in RECIPE_KEYS:
            raise InvalidOptionError(
                f"{where}: unknown option '{key}' (known: {', '.join(RECIPE_KEYS)})")
        typ = RECIPE_KEYS[norm][0]
        if value is not None and not _is(value, typ):
            raise InvalidOptionError(f"{where}: option '{key}' has the wrong type ({value!r})")
        out[norm] = float(value) if typ is float else value
    return out


def _is(value, typ) -> bool:
    if typ is bool:
        return isinstance(value, bool)
    types = typ if isinstance(typ, tuple) else (typ,)
    if float in types and isinstance(value, (int, float)) and not isinstance(value, bool):
        return True
    return isinstance(value, types) and not isinstance(value, bool)
