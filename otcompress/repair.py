"""Statistics repair (REPAIR, Jordan et al., ICLR 2023), in the engine.

Averaging or folding units shrinks and shifts their activations: a unit that
averages two decorrelated parent units has a smaller variance than either.
Repair restores, layer by layer, each unit's mean and standard deviation on
the calibration data to *target* statistics: those of the parents (and the
anchor, by its mixing weight), carried through the same transport maps as the
weights. The carry needs no new machinery: a unit's mean and std live on the
layer's output axis exactly like its bias, so they travel through the flow
graph as extra `Out` tensors (`<module>.__mean__`, `<module>.__std__`).

Repair points are the linear layers with a free output axis and a bias
(Q, K, V, O, MLP, pooler, LM transform); the correction is affine per unit,
w_j <- w_j * s_t / s_f and b_j <- (b_j - m_f) * s_t / s_f + m_t, applied in
flow-graph order so every layer is measured after the ones before it."""
from __future__ import annotations

import torch

from otcompress.activations import model_inputs, reiterable, token_samples
from otcompress.errors import DataError
from otcompress.flowgraph import In, Out
from otcompress.reconstruct import OUTPUTS  # reconstruction's targets ride along like the statistics

MEAN, STD, ROWNORM = "__mean__", "__std__", "__rownorm__"


def is_statistic(name: str) -> bool:
    """Whether a flow-graph entry is a repair statistic (`<module>.__mean__`...)
    or a reconstruction target (`<module>.__outputs__`):
    carried through the maps once they are made, never a matching feature, so
    switching repair on cannot change a transport map."""
    return name.rsplit(".", 1)[-1] in (MEAN, STD, ROWNORM, OUTPUTS)


def points(spec) -> dict:
    """{module path: (its output map, the weight's output axis)}, in flow-graph
    (parameter) order: 2-D weights with one `Out` and one `In` axis (a Linear
    is (out, in), GPT-2's Conv1D (in, out)) and a bias on the same map."""
    out = {}
    for name, axes in spec.axes.items():
        if name.endswith(".weight") and len(axes) == 2 and {type(a) for a in axes} == {Out, In}:
            axis = 0 if isinstance(axes[0], Out) else 1
            module = name[: -len(".weight")]
            if spec.axes.get(f"{module}.bias") == (axes[axis],):
                out[module] = (axes[axis].tm, axis)
    return out


def stat_axes(spec, *, data_free=False) -> dict:
    """The flow-graph axes of the statistics tensors, to extend `spec.axes` with."""
    kinds = (ROWNORM,) if data_free else (MEAN, STD)
    return {f"{m}.{kind}": (Out(tm),) for m, (tm, _) in points(spec).items() for kind in kinds}


def row_norms(weight, out_axis: int):
    """Per output unit, the norm of its weights: the std of that unit's output
    under isotropic unit-variance inputs (the data-free statistic)."""
    return weight.detach().float().movedim(out_axis, 0).flatten(1).norm(dim=1)


def weight_stats(model, modules: dict) -> dict:
    """The data-free statistics of `model` itself (an anchor's, in its own space)."""
    named = dict(model.named_modules())
    return {f"{m}.{ROWNORM}": row_norms(named[m].weight, axis) for m, (_, axis) in modules.items()}


@torch.no_grad()
def repair_from_weights(model, targets: dict, modules: dict) -> dict:
    """Without data: rescale each output unit's weights to the target row norm,
    so that under isotropic inputs every unit's std is the target's (the mean,
    the bias, is already the carried one)."""
    named = dict(model.named_modules())
    ratios = []
    for m, (_, out_axis) in modules.items():
        w = named[m].weight
        ratio = targets[f"{m}.{ROWNORM}"].to(w.device) / row_norms(w, out_axis).clamp_min(1e-12)
        w.mul_((ratio[:, None] if out_axis == 0 else ratio[None, :]).to(w.dtype))
        ratios.append(ratio.double())
    r = torch.cat(ratios) if ratios else torch.ones(1)
    return {"modules": len(modules), "data_free": True,
            "norm_ratio": {"min": float(r.min()), "median": float(r.median()), "max": float(r.max())}}


def placeholders(model, modules: dict) -> dict:
    """measure()'s entries for a model without weights (a fold target, whose
    share of the fused statistics is 0): meta tensors of the right shapes."""
    named = dict(model.named_modules())
    return {f"{m}.{kind}": torch.empty(named[m].weight.shape[axis], device="meta")
            for m, (_, axis) in modules.items() for kind in (MEAN, STD)}


@torch.inference_mode()
def measure(model, modules, data) -> dict:
    """{f"{module}.__mean__": (units,), f"{module}.__std__": (units,)} of each
    module's output over every non-padding token of `data`, in float64."""
    sums = {m: [0, 0.0, 0.0] for m in modules}
    named = dict(model.named_modules())
    mask = {}

    def hook(name):
        def fn(_mod, _args, out):
            x = token_samples(out, mask.get("m"), None).double()
            s = sums[name]
            s[0] += x.shape[0]
            s[1] = s[1] + x.sum(0)
            s[2] = s[2] + (x * x).sum(0)
        return fn
    handles = [named[m].register_forward_hook(hook(m)) for m in modules]
    device = next(model.parameters()).device
    try:
        for inputs in model_inputs(data, device):
            mask["m"] = inputs.get("attention_mask")
            model(**inputs)
    finally:
        for h in handles:
            h.remove()
    stats = {}
    for m, (n, s1, s2) in sums.items():
        if n == 0:
            raise DataError("repair: the calibration data has no tokens")
        mean = s1 / n
        stats[f"{m}.{MEAN}"] = mean
        stats[f"{m}.{STD}"] = (s2 / n - mean * mean).clamp_min(0).sqrt()
    return stats


@torch.no_grad()
def repair(model, targets: dict, data, modules: dict) -> dict:
    """Rescale and shift each module's output units to `targets`, one module at
    a time (later modules are measured after earlier ones are repaired).
    `modules` is `points(spec)`. Returns a summary of the corrections."""
    data = reiterable(data)  # measured once per module: a generator would be empty after the first
    named = dict(model.named_modules())
    ratios = []
    for m, (_, out_axis) in modules.items():
        now = measure(model, [m], data)
        mean_f, std_f = now[f"{m}.{MEAN}"], now[f"{m}.{STD}"]
        mean_t, std_t = targets[f"{m}.{MEAN}"].double(), targets[f"{m}.{STD}"].double()
        # A dead unit has no scale to restore: leave its scale, fix its mean.
        ratio = torch.where(std_f > 1e-8, std_t / std_f.clamp_min(1e-8), torch.ones_like(std_f))
        layer = named[m]
        w, b = layer.weight, layer.bias
        w.mul_(ratio.to(w.dtype)[:, None] if out_axis == 0 else ratio.to(w.dtype)[None, :])
        b.copy_(((b.double() - mean_f) * ratio + mean_t).to(b.dtype))
        ratios.append(ratio)
    r = torch.cat(ratios) if ratios else torch.ones(1)
    return {"modules": len(modules), "std_ratio": {"min": float(r.min()), "median": float(r.median()),
                                                  "max": float(r.max())}}
