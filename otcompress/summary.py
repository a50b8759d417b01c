"""The fusion summary the command line prints: which start or alignment
won, widths and parameter counts against the parents' (a model on disk is
counted from its config on the meta device, nothing allocated)."""
from __future__ import annotations


def fusion_summary(report, model, parents, recipe, trust_remote_code=False) -> list[str]:
    """What fusion did, in two lines: the start that won (or the alignment)
    and its regulariser, then widths and parameters against the parents'.
    `model`: the fused model, or the directory it was written to."""
    from otcompress import architectures, modelio
    o = report.get("options") or {}
    race = report.get("race")
    how = f"alignment {o.get('alignment')}"
    if race:
        how = f"start {race['winner']} " + _race_how(race)
    if o.get("alignment") in ("weights", "activations", "fold") and o.get("solver"):
        reg = o.get("reg")
        if o["solver"] == "emd":
            how += ", solver emd (exact)"
        elif report.get("reg_sweep"):
            tried = [s["reg"] for s in report["reg_sweep"]]
            how += f", solver sinkhorn, reg auto picked {reg:g} of {', '.join(f'{r:g}' for r in tried)}"
        elif reg is not None:
            how += f", solver sinkhorn, reg {reg:g}"
    maps = sum(len(m) for m in report.get("transport_maps") or [])
    if maps:
        how += f"; {maps} transport maps"
    if report.get("warnings"):
        how += f", {len(report['warnings'])} warning(s)"
    lines = [f"fused: {how}"]
    parent_cfgs = [modelio.load_config(p, trust_remote_code=trust_remote_code) for p in parents]
    from otcompress.profiling import count_parameters
    config = model.config if hasattr(model, "config") else modelio.load_config(model)
    mine = count_parameters(model) if hasattr(model, "config") else parameters_of(config)
    theirs = [parameters_of(c) for c in parent_cfgs]
    widths = f"widths {architectures.describe_widths(config)} (parents: " + \
        "; ".join(architectures.describe_widths(c) for c in parent_cfgs) + ")"
    if mine and all(theirs):
        ratio = ", ".join(f"{mine / t:.2f}x" for t in theirs)
        widths += f", {mine:,} parameters = {ratio} the parent{'s' + chr(39) if len(theirs) > 1 else chr(39) + 's'}"
    lines.append(widths)
    return lines


def parameters_of(config):
    """A model's parameter count from its config alone: the class its config
    names, built on the meta device (nothing is allocated); None if unknown."""
    try:
        import torch
        import transformers
        from otcompress.profiling import count_parameters
        cls = getattr(transformers, (getattr(config, "architectures", None) or [""])[0], None)
        if cls is None:
            return None
        with torch.device("meta"):
            return count_parameters(cls(config))
    except Exception:  # noqa: BLE001 - a summary line only: no count rather than a failed run
        return None


def _race_how(race) -> str:
    from otcompress.pipeline import FAR_BEHIND_KEY
    if race["chosen_by"] == FAR_BEHIND_KEY:
        return "(not raced: the parents' start was too far behind it one-shot)"
    return "(not raced: the only one to train)" if race.get("note") else \
        f"(race, by {race['chosen_by'].replace('_', ' ')})"
