"""The command line's click pieces: shared options, value types (finite,
bounded numbers), the fuse flags declared from `options.OPTIONS`, the recipe
a command line resolves to, and multi-value flags (`--parents a b c`)."""
from __future__ import annotations

import math

import click

from otcompress import recipes
from otcompress.errors import InvalidOptionError
from otcompress.options import BY_NAME as OPTIONS

# Options that take several values after one flag (`--parents a b c`).
MULTI_VALUE = ("--parents", "--teachers", "--weights", "--reference")


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
    from otcompress.modelio import checked_device
    return checked_device(device)


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


def bounded(key):
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


# What click needs beyond a recipe key's declaration (`options.OPTIONS`).
_CLICK = {"weights": dict(multiple=True, type=NON_NEGATIVE),
          "finetune_steps": dict(cls=OneName, type=STEPS),  # --finetune-steps: an old name, not shown
          "seed": dict(type=int)}


def recipe_options(f):
    """Every recipe key's `fuse` flag (`Option.cli_flags`), in the table's
    order: its choices or range, help text and the recipe default shown in
    --help, all from `options.OPTIONS`. A flag itself defaults to None, so a
    profile's value is only replaced by a flag the user gives."""
    for opt in reversed([o for o in OPTIONS.values() if o.cli_flags]):  # click lists the last decorator last
        f = recipe_option(*opt.cli_flags, key=opt.name, **_CLICK.get(opt.name, {}))(f)
    return f


def recipe_option(*decls, key, **kw):
    """The flag `decls` of recipe key `key` (see `recipe_options`)."""
    opt = OPTIONS[key]
    if opt.type is bool and "/" not in decls[0]:  # --repair/--no-repair
        decls = (f"{decls[0]}/--no-{decls[0][2:]}", *decls[1:])
        kw.setdefault("default", None)
    if opt.choices and "type" not in kw:
        kw["type"] = click.Choice(opt.choices)
    if opt.check and opt.type in (int, float) and "type" not in kw:
        kw["type"] = bounded(key)
    kw.setdefault("help", opt.help)
    if opt.default is not None:  # click would put a string show_default in parentheses
        shown = ("on" if opt.default else "off") if isinstance(opt.default, bool) else opt.default
        kw["help"] = f"{kw.get('help', '')}  [default: {shown}]".strip()
    return click.option(*decls, key, **kw)


def resolve_recipe(ctx, profile_name, flags):
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
