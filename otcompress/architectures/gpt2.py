"""Hugging Face GPT-2 (GPT2LMHeadModel, GPT2Model): a pre-LayerNorm decoder.

- `Conv1D` weights are stored (in, out), the transpose of `nn.Linear`: their
  axes are (In(..), Out(..)).
- Attention: one `c_attn` whose output is Q | K | V side by side, so its
  output axis (and bias) is `Split((q, k, v))`: three equal parts, each living
  in its own map. Q/K/V activations are read from the matching third of
  c_attn's output. `attn.c_proj` reads V's map.
- Embeddings: token (wte) and learned position (wpe) tables are summed into
  one stream: one map, solved from both tables' columns (or from the stream
  that enters the first block).
- MLP: c_fc -> gelu -> c_proj; ln_1, ln_2 before their branches, ln_f last.

The LM head is tied to wte (GPT-2 always ties). The head reads the *final*
residual stream, and with the tie its weights are the embedding table, whose
hidden axis lives in the embedding's map. So a tied model gets one map for the
whole residual stream, the embedding's, as git-re-basin treats a residual
stream: every residual writer (attn.c_proj, mlp.c_proj) is aligned into it
instead of getting a map of its own mixed in at the joins. Then the final
stream, ln_f and the head all live in the embedding's space and the tie is
exact in the flow graph (a head sharing the embedding's map while the stream
before it had another would not be). The price: the stream's map is solved
from the embeddings (or the stream entering block 0) alone. GPT2Model and a
GPT2LMHeadModel saved with tie_word_embeddings=False keep the paper's flow:
each residual writer gets its own map, combined at every join (Eq. 1), and an
untied head reads the final map.

Heterogeneous width: hidden size, heads (head width may differ: the engine
rescales Q) and MLP width (`n_inner`, 4 x hidden when unset). A fold target
takes --hidden, --heads and --intermediate (n_inner; left out, the MLP follows
the parent's n_inner, or 4 x the target's hidden when that is unset).
Heterogeneous depth: with scale_attn_by_inverse_layer_idx a block's scores
depend on its index, so a block moved to another index has its Q rescaled
(`moved_block`)."""
from __future__ import annotations

import torch

from otcompress.architectures import common
from otcompress.flowgraph import (ArchSpec, Combine, Heads, In, Out, Probe, Share, Solve, Split,
                                  layernorm, solve, stack)

MODEL_TYPE = "gpt2"
MODEL_CLASSES = ("GPT2LMHeadModel", "GPT2Model")
# The module list holding the transformer blocks (depth maps renumber it).
BLOCKS = "h"
MUST_MATCH = ("vocab_size", "n_positions", "activation_function", "tie_word_embeddings",
              "scale_attn_weights", "scale_attn_by_inverse_layer_idx")
# A teacher may tie its head or not; `activation_function` (GPT-2's name for
# hidden_act, which the other families leave to the teacher) is still required.
TEACHER_MUST_MATCH = ("vocab_size", "n_positions", "activation_function",
                      "scale_attn_weights", "scale_attn_by_inverse_layer_idx")
INPUTS = ("input_ids", "attention_mask")
INPUT_AXES = common.TEXT_AXES
# Fold-target widths (GPT2Config's own names); n_inner may be unset, meaning 4 x n_embd.
WIDTHS = {"hidden": "n_embd", "heads": "n_head", "intermediate": "n_inner"}
UNSET_WIDTHS = {"n_inner": lambda config: 4 * config.n_embd}


def scores_scaled(config) -> bool:
    """Whether attention scores are divided by sqrt(head width): GPT-2 can turn
    it off (scale_attn_weights=False), and the engine's rescaling of carried Q
    for other head widths depends on it (align.HeadShapes.score_scale)."""
    return bool(getattr(config, "scale_attn_weights", True))


def moved_block(config, sd, block: int, position: int) -> dict:
    """The tensors of `block` that change when it becomes block `position` of
    a shallower model (`depth.apply`): with scale_attn_by_inverse_layer_idx
    GPT-2 divides block i's attention scores by i + 1, so the block keeps its
    function only with Q (the first third of c_attn's output) rescaled by
    (position + 1) / (block + 1). Only those tensors of `sd` are read."""
    if not getattr(config, "scale_attn_by_inverse_layer_idx", False) or block == position:
        return {}
    factor, n = (position + 1) / (block + 1), config.n_embd
    out = {}
    for name in [k for k in sd if f".h.{block}.attn.c_attn." in f".{k}"]:
        t = sd[name]
        q = t[..., :n] if name.endswith("weight") else t[:n]  # Conv1D weights are (in, out)
        rest = t[..., n:] if name.endswith("weight") else t[n:]
        out[name] = torch.cat([q * factor, rest], dim=-1)
    return out


def max_seq_len(config):
    return config.n_positions


def example_inputs(config, batch_size, seq_len, generator):
    return common.text_example_inputs(config, INPUTS, batch_size, seq_len, max_seq_len(config), generator)


def task(class_name):
    return "causal-lm"


def conv1d(out_tm, in_tm, prefix):
    """Axes of a GPT-2 `Conv1D` (weight stored (in, out)) and its bias."""
    return {f"{prefix}.weight": (In(in_tm), Out(out_tm)), f"{prefix}.bias": (Out(out_tm),)}


def build(config, keys, *, qk="separate") -> ArchSpec:
    p = "transformer." if any(k.startswith("transformer.") for k in keys) else ""
    tied = {}
    if "lm_head.weight" in keys and getattr(config, "tie_word_embeddings", True):
        tied["lm_head.weight"] = f"{p}wte.weight"
    one_stream = bool(tied)  # see the module docstring
    axes = {f"{p}wte.weight": (None, Out("emb")), f"{p}wpe.weight": (None, Out("emb"))}
    nodes = [solve("emb", Probe(f"{p}h.0.ln_1", "in"))]
    r = stack(config.num_hidden_layers, "emb",
              lambda i, r_in: _block(i, r_in, f"{p}h.{i}", qk=qk, one_stream=one_stream), axes, nodes)
    axes.update(layernorm(r, f"{p}ln_f"))
    if "lm_head.weight" in keys and not tied:
        axes["lm_head.weight"] = (None, In(r))  # the vocabulary axis is fixed
    return ArchSpec(MODEL_TYPE, axes, nodes, tied=tied)


def _block(i: int, r_in: str, L: str, *, qk: str, one_stream: bool):
    """Axes and nodes of block `i` (module path `L`) reading the stream `r_in`."""
    q, k, v, o = (f"L{i}.{n}" for n in "qkvo")
    mid, fc1, fc2, res = f"L{i}.attn_res", f"L{i}.fc1", f"L{i}.fc2", f"L{i}.mlp_res"
    attn, mlp = f"{L}.attn", f"{L}.mlp"
    qkv = Split((q, k, v))
    axes = {f"{attn}.c_attn.weight": (In(r_in), qkv), f"{attn}.c_attn.bias": (qkv,)}
    axes.update(conv1d(o, v, f"{attn}.c_proj"))
    axes.update(conv1d(fc1, mid, f"{mlp}.c_fc"))
    axes.update(conv1d(fc2, fc1, f"{mlp}.c_proj"))
    axes.update(layernorm(r_in, f"{L}.ln_1"))
    axes.update(layernorm(mid, f"{L}.ln_2"))

    part = lambda j: Probe(f"{attn}.c_attn", "out", part=(j, 3))  # noqa: E731 Q, K, V thirds
    if qk == "shared":
        # One map for Q and K: with hard maps Q P (K P)^T = Q K^T (paper Eq. 4).
        qk_nodes = [Solve(q, ((q, part(0)), (k, part(1)))), Share(k, q)]
    else:
        qk_nodes = [solve(q, part(0)), solve(k, part(1))]
    # One stream (tied head): the residual writers live in the stream's map, so
    # every join combines a map with itself and the stream keeps it.
    writer = (lambda tm, probe: Share(tm, r_in)) if one_stream else solve  # noqa: E731
    nodes = [Heads(f"L{i}.heads", q, k, v, o)] + qk_nodes + [
        solve(v, part(2)),
        writer(o, Probe(f"{attn}.c_proj", "out")),
        Combine(mid, r_in, o, Probe(f"{L}.ln_1", "in"), Probe(f"{attn}.c_proj", "out")),
        solve(fc1, Probe(f"{mlp}.c_proj", "in")),  # the gelu's output
        writer(fc2, Probe(f"{mlp}.c_proj", "out")),
        Combine(res, mid, fc2, Probe(f"{L}.ln_2", "in"), Probe(f"{mlp}.c_proj", "out")),
    ]
    return axes, nodes, res
