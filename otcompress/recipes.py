"""Fusion recipes: named YAML files under `profiles/` (or any YAML file),
validated before any heavy work (by `options`, where every key is declared);
unknown keys are an error, not ignored."""
from __future__ import annotations

from pathlib import Path

import yaml

from otcompress.errors import InvalidOptionError
# The options themselves (keys, types, defaults, checks) live in `options`; re-exported here.
from otcompress.options import CHOICES, RANGES, RECIPE_KEYS, check_recipe, defaults, ineffective, problem  # noqa: F401

PROFILE_DIR = Path(__file__).parent / "profiles"  # a link to the top-level profiles/ in a checkout


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
