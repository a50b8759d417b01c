"""A fusion's inputs checked once, at the entry, before any weights are read.

`check` is the one place where the anchor and parents are looked at as a
whole: every option (`check_options`), the configs (read once, from the
directories or the model objects), family, model type and the family's
must-match values, labels, classes, depths, the token filter against the
patch grid and, where a fold needs it, the target's widths against every
parent's. It returns an `Inputs` that the rest trusts: `pipeline.run` and
`fusion.fuse` / `fuse_to_disk` each call it first; the engine below them
loads the models from it (the configs already read) and checks nothing of
this again. What only the loaded tensors can tell (complete, finite) is
checked as they load (`modelio.load_model`)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from otcompress import architectures, depth, modelio
from otcompress.errors import IncompatibleModelsError, InvalidOptionError
from otcompress.options import CHOICES

ALIGNMENTS = tuple(a for a in CHOICES["alignment"] if a != "auto")  # "auto" is the workflow's race
FROM_PARENTS = ("fold", "prune")  # maps from each parent alone; the anchor gives only the widths


@dataclass(frozen=True)
class Inputs:
    """What `check` found: the anchor and parents as given, their configs
    (for an anchor given as a config or as widths: the fold target's), the
    family, and the options resolved against them."""
    anchor: Any  # a model, a directory, a config (fold target), or None (target widths)
    parents: tuple  # models or directories
    anchor_config: Any
    parent_configs: tuple
    family: Any  # the family module (otcompress.architectures.<family>)
    foldable: bool  # no width or depth of the anchor's exceeds a parent's: fold and prune can make it
    qk: str | None = None  # the Q/K map mode, "auto" resolved
    weights: tuple | None = None  # the mixing weights, anchor first, normalised
    trust_remote_code: bool = False

    @property
    def target(self) -> bool:
        """The anchor has no weights: a config or widths to fold or prune into."""
        return self.anchor is None or _is_config(self.anchor)

    def wider_widths(self) -> list[tuple]:
        """(parent number, width name, parent's, anchor's) wherever the anchor is wider."""
        return architectures.wider_widths(self.anchor_config, self.parent_configs)


def check(anchor, parents, o, *, target: dict | None = None) -> Inputs:
    """The inputs of one fusion, checked before any weights are read.

    anchor, parents: as `fusion.fuse` takes them (models or directories; the
        anchor may be a config, or None with `target`).
    o: the fusion options (`options.FuseOptions`, or any object with its
        fields); `o.alignment` "fold" or "prune" makes a fold target required
        to fit every parent.
    target: widths ({"hidden": 32, ...}) of a fold target made from the first
        parent's config (`architectures.target_config`), in place of an anchor.
    Raises the user errors (`otcompress.errors`) with one-line messages."""
    parents = tuple(parents)
    if not parents:
        raise InvalidOptionError("fusion needs at least one parent")
    weightless = anchor is None or _is_config(anchor)
    if weightless and o.alignment not in FROM_PARENTS:
        raise InvalidOptionError(f"alignment '{o.alignment}' needs an anchor's weights; "
                                 "a target width can only be folded or pruned into")
    resolved = check_options(o.alignment, o.solver, o.reg, o.residual, o.qk, o.token_filter, o.data,
                             o.weights, parents, repair=o.repair, reconstruct=o.reconstruct, head_alignment=o.head_alignment,
                             on_unconverged=o.on_unconverged, on_uniform=o.on_uniform,
                             cost_norm=o.cost_norm, activation_dtype=o.activation_dtype,
                             depth_merge=o.depth_merge)
    trc = bool(o.trust_remote_code)
    parent_cfgs = tuple(modelio.load_config(p, trust_remote_code=trc) for p in parents)
    if anchor is None:
        anchor_cfg = architectures.target_config(parent_cfgs[0], **(target or {}))
    else:
        anchor_cfg = anchor if _is_config(anchor) else modelio.load_config(anchor, trust_remote_code=trc)
    fam = architectures.family(anchor_cfg)
    modelio.check_compatible(anchor_cfg, parent_cfgs, fam.MUST_MATCH)
    what = "the fold target" if weightless else "the anchor"
    depth.check_depths(anchor_cfg, parent_cfgs, what)
    if o.depth_merge == "parallel" and all(depth.depth(c) == depth.depth(anchor_cfg) for c in parent_cfgs):
        raise InvalidOptionError(f"--depth-merge parallel merges a deeper parent's blocks, but no parent is "
                                 f"deeper than {what} ({depth.depth(anchor_cfg)} blocks)")
    _check_classes(anchor, anchor_cfg, parents, parent_cfgs, trc)
    if o.token_filter is not None:  # the models' patch grids agree: MUST_MATCH
        architectures.check_token_filter(anchor_cfg, o.token_filter)
    try:
        architectures.check_fold_target(anchor_cfg, parent_cfgs)
        foldable = True
    except IncompatibleModelsError:
        if weightless or o.alignment in FROM_PARENTS:
            raise
        foldable = False  # OT fusion maps onto any width; only folding needs the anchor narrower
    return Inputs(anchor, parents, anchor_cfg, parent_cfgs, fam, foldable, resolved["qk"],
                  tuple(resolved["weights"]), trc)


def _is_config(x) -> bool:
    from transformers import PretrainedConfig
    return isinstance(x, PretrainedConfig)


def _check_classes(anchor, anchor_cfg, parents, parent_cfgs, trust_remote_code) -> None:
    """The anchor and every parent load as one model class (a fold target
    takes the first parent's), a classifier with their label count; where
    only loading can tell (remote code), the family's class list decides
    later (`architectures.build_spec`)."""
    classes = [modelio.model_class(p, cfg, trust_remote_code=trust_remote_code)
               for p, cfg in zip(parents, parent_cfgs)]
    if anchor is None or _is_config(anchor):
        mine, start = classes[0], 2
    else:
        mine, start = modelio.model_class(anchor, anchor_cfg, trust_remote_code=trust_remote_code), 1
    for k, cls in enumerate(classes[start - 1:], start):
        if mine is not None and cls is not None and cls is not mine:
            raise IncompatibleModelsError(
                f"class mismatch: anchor is {mine.__name__}, parent {k} is {cls.__name__}")
    me = "the fold target" if start == 2 else "anchor"
    for k, cfg in enumerate(parent_cfgs, 1):  # the classes' own names: a config built in memory records none
        modelio.check_labels(anchor_cfg, cfg, k, roles=(me, "parent"), head=mine.__name__ if mine else None)


def check_options(alignment, solver, reg, residual, qk, token_filter, data, weights, parents, *,
                  repair=False, reconstruct=False, head_alignment="cross", on_unconverged="raise",
                  on_uniform="warn", cost_norm="gap", activation_dtype="float32", depth_merge="select") -> dict:
    """Every fusion option checked, before any model is loaded; returns the
    resolved Q/K map mode and the normalised mixing weights."""
    _one_of("alignment", alignment, ALIGNMENTS)
    _one_of("solver", solver, CHOICES["solver"])
    _one_of("residual", residual, CHOICES["residual"])
    _one_of("qk", qk, CHOICES["qk"])
    if solver == "sinkhorn" and reg == "auto":
        if data is None:
            raise InvalidOptionError("reg auto needs calibration or held-out data (data=...)")
    elif solver == "sinkhorn":
        try:
            ok = float(reg) > 0
        except (TypeError, ValueError):
            ok = False
        if not ok:
            raise InvalidOptionError(f"Sinkhorn needs a regulariser reg > 0, got {reg!r}")
    if (alignment == "activations" or residual != "average") and data is None:
        need = "activations-based alignment" if alignment == "activations" else f"residual policy '{residual}'"
        raise InvalidOptionError(f"{need} needs calibration data (data=...)")
    if reconstruct and data is None:
        raise InvalidOptionError("reconstruct refits layers to the parents' outputs on calibration data: "
                                 "give data (data=...)")
    if alignment in FROM_PARENTS and residual != "average":
        raise InvalidOptionError(f"{'folding' if alignment == 'fold' else 'pruning'} maps the residual stream "
                                 "once: use residual 'average'")
    if token_filter is not None and not _valid_filter(token_filter):
        raise InvalidOptionError(f"token filter '{token_filter}': use only_cls or window_N (e.g. window_6)")
    _one_of("head alignment", head_alignment, CHOICES["head_alignment"])
    _one_of("on_unconverged", on_unconverged, CHOICES["on_unconverged"])
    _one_of("on_uniform", on_uniform, CHOICES["on_uniform"])
    _one_of("cost normalisation", cost_norm, CHOICES["cost_norm"])
    _one_of("depth merge", depth_merge, CHOICES["depth_merge"])
    if activation_dtype not in CHOICES["activation_dtype"]:
        raise InvalidOptionError(f"activation dtype '{activation_dtype}': use float32 or bfloat16")
    if qk == "auto":
        qk = "shared" if solver == "emd" else "separate"
    mixed = mixing_weights(weights, len(parents))
    if alignment in FROM_PARENTS and sum(mixed[1:]) <= 0:
        raise InvalidOptionError(f"weights: {'folding' if alignment == 'fold' else 'pruning'} never uses the "
                                 "anchor's share, so the parents' weights must have a positive sum")
    return {"qk": qk, "weights": mixed}


def mixing_weights(weights, n_parents) -> list:
    """The mixing weights [anchor, parent 1, ...] normalised to sum 1; uniform for None."""
    if weights is None:
        return [1.0 / (n_parents + 1)] * (n_parents + 1)
    try:
        weights = [float(w) for w in weights]
    except (TypeError, ValueError):
        raise InvalidOptionError(f"weights must be numbers, got {weights!r}") from None
    if not all(math.isfinite(w) for w in weights):
        raise InvalidOptionError(f"weights must be finite, got {weights}")
    if len(weights) != n_parents + 1:
        raise InvalidOptionError(
            f"weights: need {n_parents + 1} values (anchor first, then each parent), got {len(weights)}")
    if any(w < 0 for w in weights) or sum(weights) <= 0:
        raise InvalidOptionError("weights must be non-negative with a positive sum")
    s = sum(weights)
    return [w / s for w in weights]


def parent_weights(weights) -> list:
    """A fold's or prune's mixing weights of its parents, from the mixing
    weights [anchor, parent 1, ...]: the anchor's share is never used (its
    weights are not read), the parents' renormalised to sum 1."""
    rest = [float(w) for w in weights][1:]
    return [w / sum(rest) for w in rest]


def _valid_filter(name: str) -> bool:
    return name == "only_cls" or (name.startswith("window_") and name[7:].isdigit() and int(name[7:]) > 0)


def _one_of(what, value, allowed):
    if value not in allowed:
        raise InvalidOptionError(f"{what} '{value}': use one of {', '.join(allowed)}")
