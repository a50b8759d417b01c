"""The transport-map flow graph as data (paper section 4.1).

An architecture is described by
- `axes`: for every parameter, per axis, which transport map (TM) acts on it and
  how: `Out(tm)` for an axis whose entries *live in* the TM's space (a layer's
  output rows, a bias, a LayerNorm gain, an embedding column) and `In(tm)` for an
  axis that *reads from* it (a layer's input columns); `None` for a fixed axis
  (classes, vocabulary, image channels).
- `nodes`: the TMs in the order they are computed: `Solve` (a free output axis:
  OT between parent and anchor units), `Combine` (a residual join, Eq. 1) and
  `Share` (reuse another TM, e.g. K's map equal to Q's); `Heads` marks
  where an attention layer's Q/K/V maps are split into heads.
- `probes`: where activations of a TM's units (or of a residual join's skip and
  branch) are read in the anchor and parents: a module path, and whether its
  input or output.

The engine in `align.py` never mentions a layer type; it walks this description.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional


@dataclass(frozen=True)
class Out:
    tm: str

    @property
    def tms(self) -> tuple:
        return (self.tm,)


@dataclass(frozen=True)
class In:
    tm: str

    @property
    def tms(self) -> tuple:
        return (self.tm,)


@dataclass(frozen=True)
class Split:
    """An output axis made of equal consecutive parts, each living in its own
    map's space (GPT-2's fused c_attn: Q | K | V)."""
    parts: tuple

    @property
    def tms(self) -> tuple:
        return self.parts


Axis = Optional[object]  # Out | In | Split | None


def out_slot(axes, tm):
    """Where `tm`'s units lie on a parameter's axes: (axis, None) for an `Out`
    axis, (axis, (i, n)) for part i of n of a `Split` axis, or None."""
    for axis, a in enumerate(axes):
        if isinstance(a, Out) and a.tm == tm:
            return axis, None
        if isinstance(a, Split) and tm in a.parts:
            return axis, (a.parts.index(tm), len(a.parts))
    return None


def block_index(tm: str) -> int:
    """The block a block's map belongs to: its name's "L<i>." prefix ("L3.attn_res" -> 3)."""
    return int(tm.split(".")[0][1:])


def part_of(t, axis: int, part):
    """The slice of `t` along `axis` that `part` = (i, n) names (all of it for None)."""
    return t if part is None else t.chunk(part[1], dim=axis)[part[0]]


@dataclass(frozen=True)
class Probe:
    """An activation read during a forward pass: `module`'s input or output,
    with the unit axis last (token axes are flattened into samples); `part`
    = (i, n) reads the i-th of n equal slices of the units (a Split output)."""
    module: str
    side: str = "out"  # "in" | "out"
    part: Optional[tuple] = None


@dataclass(frozen=True)
class Solve:
    """A TM computed by OT. `parts` pairs the parameter group (named by the TM on
    its `Out` axes) whose rows are the weights-based features with the probe
    whose units are the activations-based features. Usually one part; several
    make one map for units that must move together (a shared Q/K map)."""
    tm: str
    parts: tuple  # ((group_tm, Probe), ...)
    sequence: bool = True  # token filters (window_n, only_cls) apply


def solve(tm: str, probe: Probe, sequence: bool = True) -> Solve:
    return Solve(tm, ((tm, probe),), sequence)


@dataclass(frozen=True)
class Combine:
    """A residual join y = x + f(x): T_y mixes the skip TM and the branch TM."""
    tm: str
    skip: str
    branch: str
    skip_probe: Probe
    branch_probe: Probe


@dataclass(frozen=True)
class Share:
    tm: str
    same_as: str


@dataclass(frozen=True)
class Heads:
    """Marks one attention layer's head structure: the Q, K and V maps split
    into `heads` blocks of `head_dim` units (counts come from each model's
    config), O reads V. Placed before the Q/K/V nodes; OT alignment uses it
    for the softmax scale, folding to group parent heads into target heads."""
    tm: str  # the marker's own name, e.g. "L3.heads"
    q: str
    k: str
    v: str
    o: str
    # Rotary embeddings fix the order of units inside a head (they come in
    # frequency pairs): maps may move whole heads only, and K/V heads may be
    # fewer than Q heads (grouped-query attention, counts from the config).
    rotary: bool = False
    # The space O reads when it is not V's own: with grouped-query attention
    # the attention output has one block per *query* head (each holding its
    # key/value group's values). Its map is made here, from the head plans.
    attn: Optional[str] = None


@dataclass
class ArchSpec:
    name: str
    axes: dict  # parameter name -> tuple of Axis
    nodes: list  # Solve | Combine | Share, in computation order
    tied: dict = field(default_factory=dict)  # parameter -> parameter it equals
    token_filter: Optional[Callable] = None  # (filter_name, seq_len) -> index tensor

    @property
    def attention(self) -> list:
        return [n for n in self.nodes if isinstance(n, Heads)]

    def node(self, tm: str):
        for n in self.nodes:
            if n.tm == tm:
                return n
        raise KeyError(tm)

    def params_with_out(self, tm: str) -> list:
        return [p for p, axes in self.axes.items() if out_slot(axes, tm) is not None]


def linear(out_tm, in_tm, bias=True, prefix=""):
    """Axes of a `torch.nn.Linear` (weight is (out, in))."""
    ax = {f"{prefix}.weight": (Out(out_tm) if out_tm else None, In(in_tm) if in_tm else None)}
    if bias:
        ax[f"{prefix}.bias"] = (Out(out_tm) if out_tm else None,)
    return ax


def layernorm(tm, prefix):
    return {f"{prefix}.weight": (Out(tm),), f"{prefix}.bias": (Out(tm),)}


def stack(n_layers: int, r_in: str, block, axes: dict, nodes: list) -> str:
    """Chain `block(i, r) -> (axes, nodes, r_out)` over the layers, adding to
    `axes` and `nodes`; returns the last block's output map."""
    r = r_in
    for i in range(n_layers):
        block_axes, block_nodes, r = block(i, r)
        axes.update(block_axes)
        nodes += block_nodes
    return r


def encoder_block(i: int, r_in: str, path: dict, *, qk: str, pre_ln: bool):
    """Axes and nodes of one transformer encoder block (attention + MLP, two
    residual joins). `path` maps the roles q, k, v, o, ln_attn, ln_mlp, fc1, fc2,
    fc1_act (where the MLP's hidden activations are read), attn_skip and mlp_skip
    (modules whose *input* is the residual stream at each join) to module paths.
    Pre-LN (ViT) puts each LayerNorm before its branch, post-LN (BERT) after the
    join. Returns (axes, nodes, output TM name)."""
    q, k, v, o = (f"L{i}.{n}" for n in "qkvo")
    mid, fc1, fc2, res = f"L{i}.attn_res", f"L{i}.fc1", f"L{i}.fc2", f"L{i}.mlp_res"
    axes = {}
    for tm, role in ((q, "q"), (k, "k"), (v, "v")):
        axes.update(linear(tm, r_in, prefix=path[role]))
    axes.update(linear(o, v, prefix=path["o"]))
    axes.update(linear(fc1, mid, prefix=path["fc1"]))
    axes.update(linear(fc2, fc1, prefix=path["fc2"]))
    axes.update(layernorm(r_in if pre_ln else mid, path["ln_attn"]))
    axes.update(layernorm(mid if pre_ln else res, path["ln_mlp"]))

    out = lambda role: Probe(path[role], "out")  # noqa: E731
    if qk == "shared":
        # One map for Q and K: with hard maps Q P (K P)^T = Q K^T (paper Eq. 4).
        qk_nodes = [Solve(q, ((q, out("q")), (k, out("k")))), Share(k, q)]
    else:
        qk_nodes = [solve(q, out("q")), solve(k, out("k"))]
    nodes = [Heads(f"L{i}.heads", q, k, v, o)] + qk_nodes + [
        solve(v, out("v")),
        solve(o, out("o")),
        Combine(mid, r_in, o, Probe(path["attn_skip"], "in"), out("o")),
        solve(fc1, out("fc1_act")),
        solve(fc2, out("fc2")),
        Combine(res, mid, fc2, Probe(path["mlp_skip"], "in"), out("fc2")),
    ]
    return axes, nodes, res


def norm_weight(tm, prefix, bias=False):
    """A LayerNorm (weight and bias) or an RMSNorm (weight only)."""
    return layernorm(tm, prefix) if bias else {f"{prefix}.weight": (Out(tm),)}


def rotary_decoder_block(i: int, r_in: str, path: dict, *, qkv_bias: bool, one_stream: bool = False):
    """One pre-norm decoder block with rotary, possibly grouped-query attention
    and a gated MLP (LLaMA, Qwen2): RMSNorm gains only; gate and up share one
    map (their product is the MLP's hidden unit); O reads the attention output,
    one block per query head holding its group's values (map `L{i}.attn`, made
    at the Heads marker). `path` maps the roles q, k, v, o, norm_attn, norm_mlp,
    gate, up, down to module paths. `one_stream` (a head tied to the embedding
    table): the residual writers o and down share the stream's map instead of
    solving their own, so each join combines a map with itself and the whole
    stream keeps the embedding's map. Returns (axes, nodes, output TM name)."""
    q, k, v, o = (f"L{i}.{n}" for n in "qkvo")
    mid, fc1, fc2, res = f"L{i}.attn_res", f"L{i}.fc1", f"L{i}.fc2", f"L{i}.mlp_res"
    axes = {}
    for tm, role in ((q, "q"), (k, "k"), (v, "v")):
        axes.update(linear(tm, r_in, bias=qkv_bias, prefix=path[role]))
    attn = f"L{i}.attn"
    axes.update(linear(o, attn, bias=False, prefix=path["o"]))
    axes.update(linear(fc1, mid, bias=False, prefix=path["gate"]))
    axes.update(linear(fc1, mid, bias=False, prefix=path["up"]))
    axes.update(linear(fc2, fc1, bias=False, prefix=path["down"]))
    axes.update(norm_weight(r_in, path["norm_attn"]))
    axes.update(norm_weight(mid, path["norm_mlp"]))
    out = lambda role: Probe(path[role], "out")  # noqa: E731
    writer = (lambda tm, probe: Share(tm, r_in)) if one_stream else solve  # noqa: E731
    nodes = [
        Heads(f"L{i}.heads", q, k, v, o, rotary=True, attn=attn),
        solve(q, out("q")), solve(k, out("k")), solve(v, out("v")),
        writer(o, out("o")),
        Combine(mid, r_in, o, Probe(path["norm_attn"], "in"), out("o")),
        solve(fc1, Probe(path["down"], "in")),
        writer(fc2, out("down")),
        Combine(res, mid, fc2, Probe(path["norm_mlp"], "in"), out("down")),
    ]
    return axes, nodes, res
