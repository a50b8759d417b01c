"""Every fusion option, once: its type, default, allowed values and help.

The YAML recipe keys and their checks (`recipes`), `fusion.fuse`'s option
list and its report's options, the workflow's pass-through keys
(`pipeline.FUSE_KEYS`) and the CLI's help texts are all derived from
`OPTIONS`; `fuse`'s explicit keyword signature is tested against it. A leaf
module (no YAML, no torch): the engine's tensor code may import it."""
from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field, make_dataclass
from typing import Callable

from otcompress.errors import InvalidOptionError

_SAME = object()  # Option.fuse_default: as the recipe's default


def _finite(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)


def _integer(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _batches(v) -> bool:
    """One batch (a mapping of input tensors) or an iterable of them (not a string)."""
    return isinstance(v, Mapping) or (isinstance(v, Iterable) and not isinstance(v, (str, bytes)))


def _numbers(v, low: float, empty: bool = True) -> bool:
    """A list (tuple, array: not a one-shot iterator, which a check would use up) of finite numbers > `low`."""
    if not isinstance(v, Iterable) or isinstance(v, (str, bytes, Iterator, Mapping)):
        return False
    v = list(v)
    return (empty or len(v) > 0) and all(_finite(x) and x > low for x in v)


BATCHES = "one batch (a dict of input tensors) or an iterable of batches"


@dataclass(frozen=True)
class Option:
    """One option. `type`/`default`: the recipe key's (and the CLI flag's);
    `fuse_default`: `fuse`'s keyword default where it differs. `check`/`wanted`:
    a range test and what it asks for (said in errors). `recipe`: a YAML
    recipe key; `fuse`: a keyword of `fusion.fuse`; `passed`: the workflow
    hands the recipe's value to `fuse` unchanged; `report`: listed in the
    fusion report's options. `flags`: a recipe key's `otcompress fuse`
    flags (empty: `--name-with-dashes`; None: no flag). `api`: (test,
    wanted) of `fuse`'s value where it differs from the recipe's (`api_problem`)."""
    name: str
    type: object = object
    default: object = None
    choices: tuple = ()
    check: Callable | None = None
    wanted: str = ""
    help: str = ""
    recipe: bool = True
    fuse: bool = True
    passed: bool = False
    report: bool = False
    fuse_default: object = _SAME
    flags: tuple | None = ()
    api: tuple = ()  # (test, wanted) of `fuse`'s value where its type or check says nothing of it

    @property
    def cli_flags(self) -> tuple:
        """The `otcompress fuse` flags of a recipe key (none for other options)."""
        if not self.recipe or self.flags is None:
            return ()
        return self.flags or ("--" + self.name.replace("_", "-"),)

    @property
    def fuse_value(self):
        """`fuse`'s keyword default."""
        return self.default if self.fuse_default is _SAME else self.fuse_default


def _api(name, default=None, **kw):
    """A `fuse` keyword that is no recipe key (Python API only)."""
    return Option(name, default=default, recipe=False, **kw)


def _run(name, typ, default, **kw):
    """A workflow key (recipe and CLI) that `fuse` does not take."""
    return Option(name, typ, default, fuse=False, **kw)


POOLINGS = ("mean", "cls", "max", "last")
POOLING_HELP = ("Headless (embedding) models: how embeddings are pooled [default: the checkpoint's "
                "sentence-transformers pooling, else mean (cls for ViT)].")

# In `fuse`'s keyword order (the workflow-only keys after the fuse option they go with).
OPTIONS = (
    Option("alignment", str, "auto", fuse_default="weights", report=True,
           choices=("auto", "weights", "activations", "fold", "prune"),  # auto: race the starts (pipeline.py)
           help="auto: race the starting points on held-out data; fold: cluster "
                "the parents into the anchor's widths."),
    Option("solver", str, "sinkhorn", choices=("sinkhorn", "emd"), passed=True, report=True,
           help="sinkhorn: soft maps (--reg); emd: exact OT (takes no --reg)."),
    Option("reg", (float, str), 0.02, fuse_default=None, passed=True, report=True,
           check=lambda v: v == "auto" or (_finite(v) and v > 0), wanted="a finite number > 0 or 'auto'",
           api=(lambda v: v == "auto" or _finite(v), "a number or 'auto'"),  # its range: `inputs.check_options`
           help="Sinkhorn regulariser: a finite number > 0, or 'auto' (held-out sweep)."),
    Option("residual", str, "average", choices=("average", "scalar", "matrix"), passed=True, report=True,
           help="Residual joins: how the skip path's and the branch's transport maps combine: "
                "average them, or weight them by activation norms, one weight per join (scalar) or "
                "per unit (matrix); these two need --data."),
    Option("data", str, None, api=(_batches, BATCHES),
           help="digits | pydoc | image folder | .txt/.jsonl | saved dataset dir."),
    _run("samples", int, 200, check=lambda v: v >= 1, wanted="an integer >= 1",
         help="Calibration examples for activation statistics."),
    Option("weights", list, None, report=True,
           check=lambda v: all(_finite(w) and w >= 0 for w in v), wanted="finite numbers >= 0",
           api=(lambda v: _numbers(v, -math.inf), "finite numbers (a list)"),
           help="Mixing weights, anchor first [default: uniform; the race's OT start: anchor 0.8]; "
                "folding and pruning use the parents' share."),
    Option("qk", str, "auto", choices=("auto", "separate", "shared"), passed=True, report=True,
           help="Q/K transport maps (auto: shared with emd, else separate)."),
    Option("token_filter", str, None, passed=True, report=True,
           help="ViT activations: window_N or only_cls [default: every token]."),
    Option("cost_norm", str, "gap", choices=("max", "gap", "mean", "none"), passed=True, report=True,
           help="Cost normalisation: gap (reg relative to a unit's best-match gap) or max."),
    Option("max_iter", int, 5000, check=lambda v: v >= 1, wanted="an integer >= 1", passed=True, report=True,
           help="Sinkhorn sweeps per transport map before it counts as unconverged."),
    _api("tol", 1e-6, type=float, report=True, api=(lambda v: _finite(v) and v > 0, "a finite number > 0")),
    _api("reg_grid", type=list, api=(lambda v: _numbers(v, 0, empty=False), "a non-empty list of finite numbers > 0")),
    _api("holdout", api=(_batches, BATCHES)),
    Option("activation_dtype", str, "float32", choices=("float32", "bfloat16"), passed=True, report=True,
           help="Forward passes for activation statistics (bfloat16: faster on BF16 CPUs)."),
    Option("repair", bool, False, passed=True, report=True, help="Restore unit statistics (REPAIR) after fusing."),
    # The workflow's "auto" (pipeline.reconstructs): on wherever it has data; `fuse` takes a bool
    # and keeps the paper's fusion unless asked.
    Option("reconstruct", str, "auto", choices=("auto", "on", "off"), fuse_default=False, report=True,
           api=(lambda v: isinstance(v, bool), "True or False"),
           help="With --data: refit every linear layer by least squares to the parents' outputs, "
                "carried through the same maps (auto: on)."),
    Option("seed", int, 0, report=True),
    Option("depth_merge", str, "select", choices=("select", "parallel"), passed=True, report=True,
           help="Parents deeper than the target: each group of blocks becomes its most influential "
                "block (select), or its blocks' most important heads and MLP units side by side (parallel)."),
    Option("head_alignment", str, "cross", choices=("cross", "aware"), passed=True, report=True,
           help="cross: one map over all Q/K/V units; aware: heads matched first, then units."),
    Option("on_unconverged", str, "raise", choices=("raise", "warn"), passed=True, report=True,
           help="A Sinkhorn map that misses its tolerance: fail, or keep it, flagged."),
    Option("on_uniform", str, "warn", choices=("warn", "raise"), passed=True, report=True,
           help="A map that went nearly uniform (reg too large)."),
    Option("pooling", str, None, choices=POOLINGS, help=POOLING_HELP,
           api=(lambda v: v in POOLINGS, "one of " + ", ".join(POOLINGS))),  # no other check reads fuse's
    _api("trust_remote_code", False, api=(lambda v: isinstance(v, bool), "True or False")),
    _api("progress", api=(callable, "a callable (stage, done, total)")),
    _api("device"),
    _run("finetune_steps", int, 0, flags=("--steps", "--finetune-steps"), check=lambda v: v >= 0, wanted="an integer >= 0",
         help="Brief recovery training steps (0 = none; --finetune-steps is an old name)."),
    _run("lr", float, 1e-3, check=lambda v: _finite(v) and v > 0, wanted="a finite number > 0",
         help="Finetuning learning rate."),
    _run("batch_size", int, 64, check=lambda v: v >= 1, wanted="an integer >= 1"),
    _run("distill", bool, True, help="Distil from the parents while finetuning."),  # teachers = the parents
    _run("distill_alpha", float, 0.5, flags=None, check=lambda v: _finite(v) and 0 <= v <= 1, wanted="a number in [0, 1]"),
    _run("race_fraction", float, 0.5, check=lambda v: _finite(v) and 0 < v <= 1, wanted="a number in (0, 1]",
         help="Share of the finetuning steps each raced start gets."),
)

BY_NAME = {o.name: o for o in OPTIONS}
# Derived views (the names other modules use).
RECIPE_KEYS = {o.name: (o.type, o.default) for o in OPTIONS if o.recipe}  # key: (type, default)
CHOICES = {o.name: o.choices for o in OPTIONS if o.choices}
RANGES = {o.name: (o.check, o.wanted) for o in OPTIONS if o.check}  # key: (test, what it asks for)
FUSE_OPTIONS = tuple(o.name for o in OPTIONS if o.fuse)  # fusion.fuse's keywords
FUSE_DEFAULTS = {o.name: o.fuse_value for o in OPTIONS if o.fuse}
PASSED = tuple(o.name for o in OPTIONS if o.passed)  # recipe values the workflow gives fuse as they are
REPORTED = tuple(o.name for o in OPTIONS if o.report)  # the fusion report's options

# `fusion.fuse`'s options as one object (`o.reg`, `o.data`, ...): its fields are the `fuse` options
# with `fuse`'s defaults; the engine resolves some in place (reg None -> a value, data -> reiterable).
FuseOptions = make_dataclass(
    "FuseOptions", [(n, object, field(default=FUSE_DEFAULTS[n])) for n in FUSE_OPTIONS])
FuseOptions.__module__ = __name__


def defaults() -> dict:
    """Every recipe key and its default."""
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


def api_problem(name: str, value) -> str | None:
    """What is wrong with the value of one `fusion.fuse` keyword as a Python
    caller gives it (None: nothing), by its `api` test, else its choices,
    type and range: a wrong value is a one-line error before any work, not a
    TypeError deep in the engine. Whether it fits the other options and the
    models is `inputs.check`'s."""
    opt = BY_NAME[name]
    if value is None:
        return None
    test, wanted = opt.api or _typed(opt)
    try:
        ok = test is None or bool(test(value))
    except (TypeError, ValueError):
        ok = False
    return None if ok else f"{name} must be {wanted}, got {value!r}"


def check_api(values: dict) -> dict:
    """`values` ({`fusion.fuse` keyword: value}) as plain Python numbers and
    lists (a NumPy integer seed, an array of regs: the engine and the JSON
    report take Python's); InvalidOptionError for the first wrong one
    (`api_problem`)."""
    out = {}
    for name, value in values.items():
        wrong = api_problem(name, value)
        if wrong:
            raise InvalidOptionError(wrong)
        out[name] = _plain(BY_NAME[name], value)
    return out


def _plain(opt, value):
    if value is None or isinstance(value, (bool, str)):
        return value
    numeric = opt.type if isinstance(opt.type, tuple) else (opt.type,)  # reg: a number or "auto"
    if opt.type is list:  # weights, reg_grid
        return [float(x) for x in value]
    if opt.type is int and _integer(value):
        return int(value)
    if float in numeric and isinstance(value, numbers.Real):
        return float(value)
    return value  # anything else as given (device=0 is cuda:0, not 0.0)


def _typed(opt) -> tuple:
    if opt.choices:  # which one: `inputs.check_options` says, in its own words
        return (lambda v: isinstance(v, str)), "one of " + ", ".join(opt.choices)
    kind = {int: (_integer, "an integer"), float: (_finite, "a finite number"),
            bool: (lambda v: isinstance(v, bool), "True or False"),
            str: (lambda v: isinstance(v, str), "a string")}.get(opt.type)
    if kind is None:
        return opt.check, opt.wanted
    if opt.check is None:
        return kind
    return (lambda v: kind[0](v) and opt.check(v)), opt.wanted


def check_recipe(recipe: dict, where: str = "recipe") -> dict:
    """`recipe` with its keys normalised (`max-iter` -> `max_iter`), every key
    known, every value of its type and in range; InvalidOptionError otherwise."""
    out = {}
    for key, value in recipe.items():
        norm = str(key).replace("-", "_")
        if norm not in RECIPE_KEYS:
            raise InvalidOptionError(
                f"{where}: unknown option '{key}' (known: {', '.join(RECIPE_KEYS)})")
        typ = RECIPE_KEYS[norm][0]
        if isinstance(value, bool) and {"on", "off"} <= set(CHOICES.get(norm, ())):
            value = "on" if value else "off"  # YAML 1.1 reads a bare on/off as a bool
        if value is not None and not _is(value, typ):
            raise InvalidOptionError(f"{where}: option '{key}' has the wrong type ({value!r})")
        value = float(value) if typ is float else value
        wrong = problem(norm, value)
        if wrong:
            raise InvalidOptionError(f"{where}: option '{key}' {wrong}, got {value!r}")
        out[norm] = value
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
        "reconstruct": not has_data and "needs data (layers are refitted to the parents' outputs on it)",
        "race_fraction": (recipe.get("alignment") != "auto" or not steps)
        and "applies to the default recipe's race (alignment auto, with finetuning steps)",
        "lr": untrained, "distill": untrained, "distill_alpha": untrained,
    }
    return next(((k, why[k]) for k in keys if why.get(k)), None)


def _is(value, typ) -> bool:
    if typ is bool:
        return isinstance(value, bool)
    types = typ if isinstance(typ, tuple) else (typ,)
    if float in types and isinstance(value, (int, float)) and not isinstance(value, bool):
        return True
    return isinstance(value, types) and not isinstance(value, bool)
