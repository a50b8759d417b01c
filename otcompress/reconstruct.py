"""Least-squares reconstruction of the fused model, layer by layer, in the engine.

Repair (repair.py) restores each unit's mean and std: a per-unit affine
correction. Reconstruction goes further, as post-training pruning does
(Kwon et al., NeurIPS 2022, "A Fast Post-Training Pruning Framework for
Transformers"; Frantar and Alistarh's OBC/SparseGPT layer-wise objective):
every linear layer is refitted so that, on the calibration tokens and given
the inputs the *fused* model really feeds it, it reproduces the parents'
outputs carried through the same transport maps as the weights:

    W, b = argmin ||X W^T + b - Y||^2 + mu ||W - W_0||^2

X: the fused layer's inputs (layers before it already refitted), Y: the
target outputs, W_0: the fused weights (the ridge pulls toward them, mu
relative to X's mean eigenvalue). Pruning and folding drop units; each later
layer then sees inputs the parents never produced, and the error compounds.
Refitting in flow-graph order absorbs it where it starts.

The targets need no new machinery: a layer's outputs on the calibration
tokens are a (units, tokens) tensor whose first axis lives in the layer's
output map, so they ride through the flow graph beside the weights as
`<module>.__outputs__` (like repair's `__mean__`), mixed over parents by the
mixing weights. A classifier (no output map: the label axis) is refitted to
the parents' mixed logits."""
from __future__ import annotations

import torch

from otcompress.activations import iter_batches, model_device, model_inputs, reiterable, token_samples
from otcompress.errors import DataError, UnsupportedArchitectureError
from otcompress.flowgraph import Combine, In, Out, Split, block_index

OUTPUTS = "__outputs__"
MAX_TOKENS = 4096  # calibration tokens per layer at most: a (units, tokens) float32 target each
TARGET_FLOATS = 2 ** 28  # per model, all layers' targets together (1 GiB): fewer tokens for wide models
RIDGE = 0.01  # mu / mean eigenvalue of X^T X: keeps a refit near W_0 where X is rank-deficient


def points(spec) -> dict:
    """{module path: (its output axis's role, the weight's output axis, has
    bias)} in flow-graph (parameter) order: 2-D weights read from one map
    (`In`) whose other axis is an output map (`Out`), several (`Split`:
    GPT-2's fused Q | K | V) or the label axis (None), never a parameter tied
    to another (an embedding-tied decoder)."""
    out = {}
    for name, axes in spec.axes.items():
        if not name.endswith(".weight") or len(axes) != 2 or name in spec.tied:
            continue
        kinds = [type(a) for a in axes]
        if kinds.count(In) != 1 or not all(k in (In, Out, Split, type(None)) for k in kinds):
            continue
        axis = kinds.index(In) ^ 1
        module = name[: -len(".weight")]
        bias = spec.axes.get(f"{module}.bias")
        if bias is not None and bias != (axes[axis],):
            continue
        out[module] = (axes[axis], axis, bias is not None)
    return out


def target_axes(modules: dict) -> dict:
    """The flow-graph axes of the targets, to extend `spec.axes` with: units
    on the output axis's role, tokens on a free axis."""
    return {f"{m}.{OUTPUTS}": (role, None) for m, (role, _, _) in modules.items()}


class _Stop(Exception):
    """Ends a forward pass early: once the last module it was run for has been
    read, or carrying what a hook read (`value`) out of it."""

    def __init__(self, value=None):
        super().__init__()
        self.value = value


def _capture(model, modules, data, side: str, max_tokens: int, stop: bool = False) -> dict:
    """{module: (tokens, units) float64} of each module's input or output on
    the first `max_tokens` non-padding calibration tokens (every example's
    pooled vector for a layer after pooling). `stop`: end each forward pass
    after the last of `modules` ran (what follows it is not needed)."""
    named = dict(model.named_modules())
    got = {m: [] for m in modules}
    mask = {}

    def hook(name):
        def fn(_mod, args, kwargs, out):
            have = sum(x.shape[0] for x in got[name])
            if have < max_tokens:
                x = token_samples(_tensor(args, kwargs) if side == "in" else _tensor(out), mask.get("m"), None)
                got[name].append(x.double()[: max_tokens - have])
        return fn

    def halt(_mod, _args, _out):
        raise _Stop
    handles = [named[m].register_forward_hook(hook(m), with_kwargs=True) for m in modules]
    if stop:
        handles.append(named[modules[-1]].register_forward_hook(halt))
    device = model_device(model)
    try:
        with torch.inference_mode():
            for inputs in model_inputs(data, device):
                mask["m"] = inputs.get("attention_mask")
                try:
                    model(**inputs)
                except _Stop:
                    pass
                if all(sum(x.shape[0] for x in xs) >= max_tokens for xs in got.values()):
                    break
    finally:
        for h in handles:
            h.remove()
    if any(not xs for xs in got.values()):
        raise DataError("reconstruct: the calibration data has no tokens")
    return {m: torch.cat(xs) for m, xs in got.items()}


def _tensor(value, kwargs=None):
    """The activation a hook sees: a module's first input (positional, or
    `hidden_states` passed by keyword, as blocks are called) or its output (a
    block returns a tuple whose first element is the hidden states)."""
    if kwargs is not None:
        return value[0] if value else kwargs["hidden_states"]
    return value[0] if isinstance(value, (tuple, list)) else value


def token_budget(model, modules: dict) -> int:
    """Calibration tokens per layer: MAX_TOKENS, fewer where all layers'
    targets would pass TARGET_FLOATS (BERT-base: about 3,200; a layer wider
    than the tokens is still fitted, the ridge resolving what they leave open)."""
    named = dict(model.named_modules())
    units = sum(named[m].weight.shape[axis] for m, (_, axis, _) in modules.items())
    return max(256, min(MAX_TOKENS, TARGET_FLOATS // max(units, 1)))


def measure(model, modules: dict, data, max_tokens: int | None = None) -> dict:
    """{f"{module}.__outputs__": (units, tokens) float32} of `model` on `data`
    (`max_tokens` None: `token_budget`)."""
    max_tokens = token_budget(model, modules) if max_tokens is None else max_tokens
    outs = _capture(model, list(modules), data, "out", max_tokens)
    return {f"{m}.{OUTPUTS}": y.T.float().contiguous() for m, y in outs.items()}


def measure_deeper(parent, dmap, spec, modules: dict, data, max_tokens: int) -> dict:
    """measure() for a parent depth-mapped by selection (`depth.DepthMap`),
    taken on the deeper parent itself. Each target block's layers get the
    outputs of the parent block it keeps, computed on the parent's own
    residual stream (the refit reproduces them from the shallower model's),
    and its first residual writer's target also carries the change that the
    dropped blocks before it made to the stream: the join after it then sees
    what the parent's did, in pre- and post-norm blocks alike. The change of
    dropped blocks after the last kept one goes to the last writer where the
    block does not normalise its own output (pre-norm): a post-norm block's
    norm would not pass a sum through."""
    from otcompress import depth
    joins = _joins(spec, modules)
    bare = [j for j in range(len(dmap.kept)) if j not in joins]
    if bare:  # no supported family has such a block; a new one's file would need a writer to refit
        raise UnsupportedArchitectureError(
            f"reconstruct: target block {bare[0]} has no refitted residual writer, which carries what the "
            "parent's dropped blocks added to the stream; fuse without reconstruction (--reconstruct off)")
    source = {m: depth.kept_name(parent.config, m, dmap.kept) for m in modules}
    # One pass reads the layers and the stream: every block's output (the next one's input).
    blocks = [f"{depth.blocks_path(parent)}.{i}" for i in range(dmap.parent_depth)]
    outs = _capture(parent, [*source.values(), *blocks], data, "out", max_tokens)
    got = {f"{m}.{OUTPUTS}": outs[source[m]].T for m in modules}
    stream = {i + 1: outs[b] for i, b in enumerate(blocks)}
    if dmap.kept[0] > 0:  # blocks dropped before the first kept one: the stream they started from
        stream[0] = _capture(parent, blocks[:1], data, "in", max_tokens, stop=True)[blocks[0]]
    read = 0  # the parent's stream that the target block reads: after the previous kept block
    for j, k in enumerate(dmap.kept):
        if k != read:
            _add(got, joins[j][0][1], stream[k] - stream[read])
        read = k + 1
    last_join, last_writer = joins[len(dmap.kept) - 1][-1]
    if read < dmap.parent_depth and not _normalises(spec, parent.config, last_join):
        _add(got, last_writer, stream[dmap.parent_depth] - stream[read])
    return {k: v.float().contiguous() for k, v in got.items()}


def _joins(spec, modules: dict) -> dict:
    """{block: [(join map, its branch's refitted writer), ...]} in order."""
    out = {}
    for node in spec.nodes:
        if isinstance(node, Combine):
            writers = [m for m, (role, _, _) in modules.items() if isinstance(role, Out) and role.tm == node.branch]
            if writers:
                out.setdefault(block_index(node.tm), []).append((node.tm, writers[0]))
    return out


def _normalises(spec, config, join: str) -> bool:
    """Whether a norm inside the join's block acts on the join's output (post-norm).
    Asked of a block's last join only: that norm's output is then the block's
    output, which a change added before it would not pass through. (A middle
    join's norm, BERT's attention output LayerNorm, says nothing of the block's.)"""
    from otcompress import depth
    return any(len(axes) == 1 and axes[0] == Out(join)
               and (depth.block_of(config, name) or (0, -1))[1] == block_index(join)
               for name, axes in spec.axes.items())


def _add(got: dict, module: str, change: torch.Tensor) -> None:
    key = f"{module}.{OUTPUTS}"
    got[key] = got[key] + change.T.to(got[key].dtype)


def placeholders(model, modules: dict, tokens: dict) -> dict:
    """measure()'s entries for a model without weights (a fold target, whose
    share of the mixed targets is 0): meta tensors of the right shapes;
    `tokens`: a measured model's entries, for the token counts."""
    named = dict(model.named_modules())
    return {k: torch.empty(named[m].weight.shape[axis], tokens[k].shape[1], device="meta")
            for m, (_, axis, _) in modules.items() for k in [f"{m}.{OUTPUTS}"]}


def ridge_fit(x, y, w0, b0, ridge: float):
    """(W, b) minimising ||x W^T + b - y||^2 + mu ||W - w0||^2, mu = ridge x
    the mean eigenvalue of the (centred) x^T x; b is None where b0 is None
    (no intercept: the layer has no bias). Float64 throughout."""
    if b0 is not None:
        x_mean, y_mean = x.mean(0), y.mean(0)
        x, y = x - x_mean, y - y_mean
    gram = x.T @ x
    mu = ridge * float(gram.diagonal().mean().clamp_min(1e-12))
    gram.diagonal().add_(mu)
    w = torch.linalg.solve(gram, x.T @ y + mu * w0.T).T
    return w, (None if b0 is None else y_mean - w @ x_mean)


@torch.no_grad()
def reconstruct(model, targets: dict, data, modules: dict, *, ridge: float | None = None) -> dict:
    """Refit each module of `modules` (`points(spec)`) to `targets` (its
    `__outputs__`) in flow-graph order: each is measured after the ones
    before it are refitted, modules that read the same input from one capture
    (`_siblings`), each forward pass ended once that input is read (`ridge`
    None: RIDGE). Returns a summary: the median relative output error before
    and after."""
    ridge = RIDGE if ridge is None else ridge
    data = reiterable(data)
    named = dict(model.named_modules())
    before, after = [], []
    blocks = None
    for group in _siblings(model, list(modules), data):
        tokens = max(targets[f"{m}.{OUTPUTS}"].shape[1] for m in group)
        block = _block_index(model, group[0])
        if block is not None and blocks is None:
            blocks = _BlockInputs(model, data, tokens)
        if block is not None and blocks.covers(tokens):
            x_all = blocks.capture(block, group[0], tokens)
        else:  # after the blocks (a head, a classifier): the whole model runs
            x_all = _capture(model, group[:1], data, "in", tokens, stop=True)[group[0]]
        for m in group:
            b_, a_ = _refit(named[m], modules[m][1], targets[f"{m}.{OUTPUTS}"], x_all, ridge)
            before.append(b_)
            after.append(a_)
    return {"modules": len(modules), "ridge": ridge,
            "relative_error": {"before": _median(before), "after": _median(after)}}


def _block_index(model, module: str):
    from otcompress import depth
    found = depth.block_of(model.config, f"{module}.weight")
    return None if found is None else found[1]


class _BlockInputs:
    """Each calibration batch's input to the blocks, advanced block by block
    as they are refitted: a layer inside block i is measured by running block
    i alone on its cached input (as SparseGPT goes layer by layer), not the
    model up to it. One forward pass records, per batch, the first block's
    input and every block's other arguments (masks, rotary tables: a block
    may take its own, as Qwen2's sliding-window layers do)."""

    def __init__(self, model, data, max_tokens: int):
        from otcompress import depth
        self.path = depth.blocks_path(model)
        self.blocks = list(model.get_submodule(self.path))
        self.hidden, self.calls, self.masks, self.tokens, self.at = [], [], [], 0, 0
        calls = {}

        def record(i):
            def fn(_mod, args, kwargs):
                calls[i] = (args[1:] if args else (), {k: v for k, v in kwargs.items() if k != "hidden_states"})
                if i == 0:
                    self.hidden.append(_tensor(args, kwargs))
            return fn
        handles = [b.register_forward_pre_hook(record(i), with_kwargs=True) for i, b in enumerate(self.blocks)]
        device = model_device(model)
        try:
            with torch.inference_mode():
                for inputs in model_inputs(data, device):
                    model(**inputs, **_no_cache(model))
                    mask = inputs.get("attention_mask")
                    self.calls.append(dict(calls))
                    self.masks.append(mask)
                    self.tokens += int(mask.sum()) if mask is not None else self.hidden[-1].shape[0] * \
                        self.hidden[-1].shape[1]
                    if self.tokens >= max_tokens:
                        break
        finally:
            for h in handles:
                h.remove()

    def covers(self, max_tokens: int) -> bool:
        return self.tokens >= max_tokens

    def _run(self, i: int, b: int):
        args, kwargs = self.calls[b][i]
        out = self.blocks[i](self.hidden[b], *args, **kwargs)
        return out[0] if isinstance(out, (tuple, list)) else out

    def capture(self, i: int, module: str, max_tokens: int) -> torch.Tensor:
        """(tokens, units) float64: `module`'s input inside block i, each
        block before i having run once on the cached inputs (refitted)."""
        with torch.inference_mode():
            while self.at < i:
                self.hidden = [self._run(self.at, b) for b in range(len(self.hidden))]
                self.at += 1
        named = dict(self.blocks[i].named_modules())
        prefix = module[len(f"{self.path}.{i}."):]
        got = []

        def hook(_mod, args, kwargs, _out):
            raise _Stop(_tensor(args, kwargs))
        handle = named[prefix].register_forward_hook(hook, with_kwargs=True)
        try:
            with torch.inference_mode():
                for b in range(len(self.hidden)):
                    try:
                        self._run(i, b)
                    except _Stop as seen:
                        got.append(token_samples(seen.value, self.masks[b], None).double())
        finally:
            handle.remove()
        return torch.cat(got)[:max_tokens]


def _no_cache(model) -> dict:
    """use_cache=False where the model takes it: blocks are called again, and a
    key/value cache would grow with every call."""
    import inspect
    return {"use_cache": False} if "use_cache" in inspect.signature(model.forward).parameters else {}


def _siblings(model, modules: list, data) -> list:
    """`modules` in flow-graph order, cut into runs that read the very same
    input (Q, K and V; gate and up): one capture serves each run, and
    refitting one cannot change another's input. Found on one batch."""
    first = next(iter(iter_batches(data)))
    ins = _capture(model, modules, [first], "in", 64)
    groups = []
    for m in modules:
        x = ins[m]
        if groups and ins[groups[-1][0]].shape == x.shape and torch.equal(ins[groups[-1][0]], x):
            groups[-1].append(m)
        else:
            groups.append([m])
    return groups


def _refit(layer, out_axis, target, x_all, ridge):
    """Refit one layer from its inputs `x_all` to `target` (units, tokens);
    (relative error before, after)."""
    y = target.T
    x = x_all[: y.shape[0]]
    y = y.to(x.device, torch.float64)
    w0 = layer.weight.double() if out_axis == 0 else layer.weight.double().T
    b0 = None if layer.bias is None else layer.bias.double()
    scale = float(y.pow(2).mean().clamp_min(1e-24))
    before = _error(x, y, w0, b0) / scale
    w, b = ridge_fit(x, y, w0, b0, ridge)
    layer.weight.copy_((w if out_axis == 0 else w.T).to(layer.weight.dtype))
    if b is not None:
        layer.bias.copy_(b.to(layer.bias.dtype))
    return before, _error(x, y, w, b) / scale


def _error(x, y, w, b) -> float:
    pred = x @ w.T + (0 if b is None else b)
    return float((pred - y).pow(2).mean())


def _median(values) -> float:
    return float(torch.tensor(values or [0.0]).median())
