"""Merge "parallel" of a deeper parent's block groups (otcompress.depth):
exact where it can be. A block that does nothing contributes no unit (the
identity-block parents of test_depth give back the known answers), and two
blocks whose halves are silent merge into exactly their parallel sum, the
norms of the dropped block absorbed into its units' weights."""
import copy

import pytest
import torch

import models as M
import otcompress
from otcompress import depth
from otcompress.architectures import target_config

from test_depth import DEEP, FAMILIES, TOL, _err, _kv, deepen


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_ot_onto_a_shallower_anchor_recovers_the_average(family):
    make, variant, inputs = FAMILIES[family]
    base = make()
    anchor, x = M.noisy(base), inputs(base)
    parent = variant(deepen(base, DEEP), widen=True)
    expected = M.average([anchor, base])
    assert _err(anchor, x, expected) > 100 * TOL  # a fuse that returned the anchor would fail
    fused = otcompress.fuse(anchor, [parent], solver="emd", depth_merge="parallel")
    assert _err(fused, x, expected) < TOL
    dmap = fused.fusion_report["depth_maps"][0]
    assert dmap["merge"] == "parallel" and dmap["groups"] == [[0], [1, 2, 3]]


@pytest.mark.parametrize("family", ["vit", "llama-gqa", "qwen2", "gpt2", "bert"])
def test_fold_of_deeper_parents_returns_the_base(family):
    make, variant, inputs = FAMILIES[family]
    base = make()
    parents = [variant(deepen(base, DEEP), widen=True), variant(deepen(base, ["id", "base", "base"]), widen=False)]
    target = target_config(parents[0].config, hidden=base.config.hidden_size,
                           heads=base.config.num_attention_heads, layers=base.config.num_hidden_layers,
                           intermediate=(getattr(base.config, "intermediate_size", None)
                                         or base.config.n_inner), **_kv(base))
    fused = otcompress.fuse(target, parents, alignment="fold", solver="emd", depth_merge="parallel")
    assert _err(fused, inputs(base), base) < TOL


# Per family: the blocks, the residual writers whose input axis holds the
# attention heads and the MLP units (silenced by halves), and one block's
# parts as Hugging Face runs them: (norm1, attention, norm2, mlp, whole block).
def _vit_parts(layer, pe):
    return (layer.layernorm_before, lambda t: layer.attention(t)[0], layer.layernorm_after, layer.mlp, layer)


def _gpt2_parts(layer, pe):
    return (layer.ln_1, lambda t: layer.attn(t)[0], layer.ln_2, layer.mlp, layer)


def _llama_parts(layer, pe):
    attn = lambda t: layer.self_attn(hidden_states=t, attention_mask=None, position_embeddings=pe)[0]  # noqa: E731
    return (layer.input_layernorm, attn, layer.post_attention_layernorm, layer.mlp,
            lambda t: layer(t, attention_mask=None, position_embeddings=pe))


PARALLEL = {
    "vit": (lambda m: m.vit.layers, ("attention.o_proj.weight", 1), ("mlp.fc2.weight", 1), _vit_parts),
    "gpt2": (lambda m: m.transformer.h, ("attn.c_proj.weight", 0), ("mlp.c_proj.weight", 0), _gpt2_parts),
    "llama-gqa": (lambda m: m.model.layers, ("self_attn.o_proj.weight", 1), ("mlp.down_proj.weight", 1),
                  _llama_parts),
}


@torch.no_grad()
def _half_silent(model, layers):
    """Block 0 with the second half of its heads (KV groups) and MLP units
    silent, block 1 with the first half; every norm's affine made random."""
    g = torch.Generator().manual_seed(3)
    sd = model.state_dict()
    for name, t in sd.items():
        if t.dim() == 1 and ("norm" in name or ".ln_" in name):
            t.add_(0.3 * torch.randn(t.shape, generator=g))
    prefix = next(n for n in sd if n.endswith(layers[0][0])).removesuffix("0." + layers[0][0])
    for block, half in ((0, 1), (1, 0)):
        for suffix, axis in layers:
            t = sd[f"{prefix}{block}.{suffix}"]
            n = t.shape[axis] // 2
            t.narrow(axis, half * n, n).zero_()
    return model


def _block_out(parts, x):
    out = parts(x)
    return out[0] if isinstance(out, tuple) else out


@pytest.mark.parametrize("kept", [0, 1])
@pytest.mark.parametrize("family", sorted(PARALLEL))
def test_half_silent_blocks_merge_into_their_exact_parallel_sum(family, kept):
    make = FAMILIES[family][0]
    blocks, attn_writer, mlp_writer, parts = PARALLEL[family]
    parent = _half_silent(make(), [attn_writer, mlp_writer])
    dmap = depth.DepthMap(2, [[0, 1]], [kept], [1.0, 1.0], "weights", merge="parallel")
    merged = depth.apply(parent, dmap)
    x = torch.randn(2, 5, parent.config.hidden_size, generator=torch.Generator().manual_seed(4))
    pe = None
    if family == "llama-gqa":
        pe = parent.model.rotary_emb(x, torch.arange(5)[None].expand(2, -1))
    with torch.no_grad():
        layers = [parts(b, pe) for b in blocks(parent)]
        h = x + sum(attn(n1(x)) for n1, attn, _, _, _ in layers)
        expected = h + sum(mlp(n2(h)) for _, _, n2, mlp, _ in layers)
        got = _block_out(parts(blocks(merged)[0], pe)[4], x)
        sequential = _block_out(layers[1][4], _block_out(layers[0][4], x))
    assert float((sequential - expected).abs().max()) > 1e-2  # the parallel sum is not what the parent computes
    assert torch.allclose(got, expected, atol=1e-5, rtol=1e-5), float((got - expected).abs().max())


def test_select_and_parallel_differ_where_blocks_both_work():
    """With two working blocks, selection drops one; parallel keeps units of both."""
    base = FAMILIES["vit"][0]()
    parent = _half_silent(copy.deepcopy(base), [PARALLEL["vit"][1], PARALLEL["vit"][2]])
    x = M.inputs(parent)
    dmaps = {m: depth.DepthMap(2, [[0, 1]], [0], [1.0, 1.0], "weights", merge=m) for m in depth.MERGES}
    outs = {m: M.outputs(depth.apply(parent, d), x) for m, d in dmaps.items()}
    assert float((outs["select"] - outs["parallel"]).abs().max()) > 1e-3


def test_parents_given_as_directories_are_merged_in_memory(tmp_path):
    """A parallel merge reads whole blocks: parent directories are loaded, not
    streamed, and the written model is the in-memory one."""
    base = FAMILIES["vit"][0]()
    anchor = M.noisy(base)
    parent = M.transform(deepen(base, DEEP), widen=True)
    parent.save_pretrained(tmp_path / "parent")
    in_memory = otcompress.fuse(anchor, [parent], solver="emd", depth_merge="parallel")
    report = otcompress.fuse_to_disk(anchor, [str(tmp_path / "parent")], tmp_path / "out", solver="emd",
                                     depth_merge="parallel")
    assert report["depth_maps"][0]["merge"] == "parallel"
    written = type(base).from_pretrained(tmp_path / "out").state_dict()
    assert all(torch.equal(t, written[k]) for k, t in in_memory.state_dict().items())
