"""What a prune keeps: per-unit importance signals of one parent, measured on
calibration data (issue 16).

- "weights" (no data): the norm of what computes a unit times the norm of
  what reads it (`fold.importance`), a proxy for the unit's output.
- "activations" (data, as NVIDIA's Minitron): the unit's RMS activation over
  the calibration tokens (`activations.unit_energy`, the parent's own second
  moments) times the norm of what reads it, i.e. the RMS of the unit's
  contribution to the next layer: a unit that is ~0 on the data scores ~0
  however large its weights. Attention: Q and K units by rms(q) rms(k) (a
  score sums q_i k_i), V units by the RMS of the attention output they
  carry (O's input) times O's column; a head by its shares of both. The residual stream keeps weight magnitude:
  measured, its activations (raw or after the norms) chose worse channels
  (align._Folder._stream_plan).
- "taylor" (labelled data): first-order Taylor, |w dL/dw| of the task loss
  summed over every weight of the unit (its rows and the columns that read
  it), gradients summed over the labelled batches.

Which one a prune uses is a data-driven default (`kind`), chosen by
benchmarks/prune_digits.py."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from otcompress import activations
from otcompress.flowgraph import Heads, In, Probe, Solve, Split, part_of
from otcompress.repair import is_statistic

KINDS = ("weights", "activations", "taylor")
# The defaults, measured by benchmarks/prune_digits.py (digits ViTs, weak-anchor shape):
WITH_LABELS = "activations"  # labelled calibration batches
WITHOUT_LABELS = "activations"  # unlabelled calibration batches
FOLD_WEIGHTS = "weights"  # fold's k-means weights: "weights" (outgoing norms) or "activations"


@dataclass
class Signals:
    """One parent's measured signals: `energy` {probe: E[x^2] per unit} for
    "activations", `taylor` {map: per-unit score} for "taylor"."""
    kind: str
    energy: dict = field(default_factory=dict)
    taylor: dict = field(default_factory=dict)
    samples: int = 0


def kind(data, mode: str) -> str:
    """The importance a `mode` ("prune" or "fold") uses on `data` (None: no data)."""
    if data is None:
        return "weights"
    if mode == "fold":
        return FOLD_WEIGHTS
    first = next(iter(activations.iter_batches(data)), None)  # (data is re-iterable here)
    labelled = first is not None and "labels" in first
    return WITH_LABELS if labelled else WITHOUT_LABELS


def measure(spec, model, data, mode: str = "prune", progress=None) -> Signals | None:
    """The signals `kind(data, mode)` needs from `model` (a parent already at
    the target's depth), or None for weight magnitude (no data, or a parent
    streamed from its files, which cannot run)."""
    from otcompress.modelio import LazyModel
    how = kind(data, mode)
    if how == "weights" or isinstance(model, LazyModel):
        return None
    if how == "taylor":
        scores, n = taylor(spec, model, data)
        return Signals("taylor", taylor=scores, samples=n)
    energy, n = activations.unit_energy(model, probes(spec), data, progress=progress)
    return Signals("activations", energy=energy, samples=n)


def probes(spec) -> set:
    """Every probe activation importance reads: each free map's units and
    each attention layer's output (O's input)."""
    out = set()
    for n in spec.nodes:
        if isinstance(n, Solve):
            out.update(p for _, p in n.parts)
        elif isinstance(n, Heads):
            out.add(context_probe(spec, n))
    return out


def context_probe(spec, node: Heads):
    """The attention output that O reads (its module's input)."""
    read = node.attn if node.rotary and node.attn is not None else node.v
    name = next(n for n, axes in spec.axes.items() if any(isinstance(a, In) and a.tm == read for a in axes))
    return Probe(name.rsplit(".", 1)[0], "in")


def unit_probe(spec, tm):
    """The probe of map `tm`'s own units (its Solve node's part), or None."""
    for n in spec.nodes:
        if isinstance(n, Solve):
            for group, p in n.parts:
                if group == tm:
                    return p
    return None


def energy_share(energies) -> torch.Tensor | None:
    """Each unit's share of the activation energy, summed over probes (each
    probe's energies normalised to sum 1); None when there is none."""
    total = None
    for e in energies:
        e = e.double()
        share = e / e.sum().clamp_min(1e-300)
        total = share if total is None else total + share
    return total


def taylor(spec, model, data) -> tuple[dict, int]:
    """({map: per-unit sum of |w dL/dw|}, examples): gradients of the task
    loss (the model's own, from the batches' labels) summed over `data`,
    then every parameter's |w g| summed onto the units of each axis it has
    on a map (rows, columns, a Split's parts)."""
    params = dict(model.named_parameters(remove_duplicate=False))
    flags = {n: p.requires_grad for n, p in params.items()}
    saved = {n: p.grad for n, p in params.items()}
    device = activations.model_device(model)
    n = 0
    try:
        for p in params.values():
            p.requires_grad_(True)
            p.grad = None
        with torch.enable_grad():
            for batch in activations.iter_batches(data):
                batch = {k: v.to(device) for k, v in batch.items()}
                model(**batch).loss.backward()
                n += len(batch["labels"])
        scores = {}
        for name, axes in spec.axes.items():
            p = params.get(name)
            if p is None or p.grad is None or is_statistic(name):
                continue
            s = (p.detach().double() * p.grad.double()).abs()
            for axis, role in enumerate(axes):
                if role is None:
                    continue
                tms = role.parts if isinstance(role, Split) else role.tms
                for i, tm in enumerate(tms):
                    part = (i, len(tms)) if isinstance(role, Split) else None
                    chunk = part_of(s, axis, part)
                    unit = chunk.sum([a for a in range(s.dim()) if a != axis])
                    scores[tm] = unit if tm not in scores else scores[tm] + unit
    finally:
        for name, p in params.items():
            p.grad = saved[name]
            p.requires_grad_(flags[name])
    return scores, n

