"""Fusion recipes: named YAML files under `profiles/` (or any YAML file),
validated before any heavy work; unknown keys are an error, not ignored."""
from __future__ import annotations

import math
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
    "max_iter": (int, 5000),  # Sinkhorn sweeps per transport map before it counts as unconverged
    "repair": (bool, False),
    "head_alignment": (str, "cross"),
    "on_unconverged": (str, "raise"),
    "on_uniform": (str, "warn"),
    "distill": (bool, True),  # teachers = the parents while finetuning
    "distill_alpha": (float, 0.5),
    "race_fraction": (float, 0.5),
    "pooling": (str, None),  # headless models' embeddings; None: the checkpoint's, else the family's
}


# The values a choice key takes (the CLI's click.Choice lists come from here).
CHOICES = {
    "alignment": ("auto", "weights", "activations", "fold", "prune"),
    "solver": ("sinkhorn", "emd"),
    "residual": ("average", "scalar", "matrix"),
    "qk": ("auto", "separate", "shared"),
    "cost_norm": ("max", "gap", "mean", "none"),
    "activation_dtype": ("float32", "bfloat16"),
    "head_alignment": ("cross", "aware"),
    "on_unconverged": ("raise", "warn"),
    "on_uniform": ("warn", "raise"),
    "pooling": ("mean", "cls", "max", "last"),
}


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


# Numeric keys: a test, and what the test asks for (said in error messages).
RANGES = {
    "samples": (lambda v: v >= 1, "an integer >= 1"),
    "finetune_steps": (lambda v: v >= 0, "an integer >= 0"),
    "batch_size": (lambda v: v >= 1, "an integer >= 1"),
    "max_iter": (lambda v: v >= 1, "an integer >= 1"),
    "lr": (lambda v: _finite(v) and v > 0, "a finite number > 0"),
    "race_fraction": (lambda v: _finite(v) and 0 < v <= 1, "a number in (0, 1]"),
    "distill_alpha": (lambda v: _finite(v) and 0 <= v <= 1, "a number in [0, 1]"),
    "reg": (lambda v: v == "auto" or (_finite(v) and v > 0), "a finite number > 0 or 'auto'"),
    "weights": (lambda v: all(_finite(w) and w >= 0 for w in v), "finite numbers >= 0"),
}


def defaults() -> dict:
    return {k: default for k, (_, default) in RECIPE_KEYS.items()}


def problem(key: str, value) -> str | None:
    """What is wrong with one recipe value (None: nothing); the caller names
    where the value came from."""
    if value is None:
        return None
    if key in CHOICES and value not in CHOICES[key]:
        return f"use one of {', '.join(CHOICES[key])}"
    test, wanted = RANGES.get(key, (None, None))
    if test is not None and not test(value):
        return f"must be {wanted}"
    return None


def available() -> list[str]:
    return sorted(p.stem for p in PROFILE_DIR.glob("*.yaml"))


def descriptions() -> dict[str, str]:
    """Each named profile and the one-line `description` its YAML file gives."""
    out = {}
    for name in available():
        try:
            raw = yaml.safe_load((PROFILE_DIR / f"{name}.yaml").read_text())
        except (yaml.YAMLError, UnicodeDecodeError):
            raw = None
        text = raw.get("description") if isinstance(raw, dict) else None
        out[name] = " ".join(str(text).split()) if text else ""
    return out


def ineffective(recipe: dict, keys, has_data: bool | None = None) -> tuple[str, str] | None:
    """(key, why) for the first of `keys` whose value in `recipe` would change
    nothing, None when every one counts: options are never silently ignored,
    as unknown keys are not. `has_data` defaults to the recipe's data spec."""
    has_data = bool(recipe.get("data")) if has_data is None else has_data
    steps = recipe.get("finetune_steps") or 0
    emd = recipe.get("solver") == "emd" and "has no effect with solver emd (exact OT)"
    untrained = not steps and "applies to finetuning (steps > 0)"
    why = {
        "reg": emd, "max_iter": emd,
        "pooling": not has_data and "needs data (embeddings are pooled to score and train on it)",
        "samples": not has_data and "needs data (it counts calibration examples)",
        "race_fraction": (recipe.get("alignment") != "auto" or not steps)
        and "applies to the default recipe's race (alignment auto, with finetuning steps)",
        "lr": untrained, "distill": untrained, "distill_alpha": untrained,
    }
    return next(((k, why[k]) for k in keys if why.get(k)), None)


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
    recipe = check_recipe(raw, str(path))
    unused = ineffective(recipe, [k for k in ("reg", "max_iter") if k in recipe])  # known from the file alone
    if unused:
        raise InvalidOptionError(f"profile {path}: '{unused[0]}' {unused[1]}: remove it")
    return recipe


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
        value = float(value) if typ is float else value
        wrong = problem(norm, value)
        if wrong:
            raise InvalidOptionError(f"{where}: option '{key}' {wrong}, got {value!r}")
        out[norm] = value
    return out


def _is(value, typ) -> bool:
    if typ is bool:
        return isinstance(value, bool)
    types = typ if isinstance(typ, tuple) else (typ,)
    if float in types and isinstance(value, (int, float)) and not isinstance(value, bool):
        return True
    return isinstance(value, types) and not isinstance(value, bool)
