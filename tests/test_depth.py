"""Heterogeneous depth: parents deeper than the anchor (or fold target).

Deep parents are built from a base model by inserting blocks that compute the
identity (pre-norm: zero residual writers, random everything else) at
positions no fixed stride finds, then permuted or 2x-widened. The right
answers are known: OT fusion onto the base-depth anchor (base + noise) gives
the average of anchor and base, folding gives the base. A depth map that
keeps every other block fails them (tested). The block layout of each family
is written here from Hugging Face's names, not from the engine's files."""
import re

import pytest
import torch
import transformers as T

import models as M
import otcompress
from otcompress import architectures, depth
from otcompress.architectures import target_config
from otcompress.errors import IncompatibleModelsError, InvalidOptionError

import test_decoders as D
import test_gpt2 as G

TOL = 1e-5
# parameter-name pattern of block i, and of the residual writers (zeroed in an identity block)
LAYOUT = {
    "vit": (r"^(vit\.)?layers\.(\d+)\.", r"(o_proj|fc2)\.(weight|bias)$"),
    "bert": (r"^(bert\.)?encoder\.layer\.(\d+)\.", r"(attention\.output\.dense|\.output\.dense)\.(weight|bias)$"),
    "llama": (r"^(model\.)?layers\.(\d+)\.", r"(o_proj|down_proj)\.(weight|bias)$"),
    "qwen2": (r"^(model\.)?layers\.(\d+)\.", r"(o_proj|down_proj)\.(weight|bias)$"),
    "gpt2": (r"^(transformer\.)?h\.(\d+)\.", r"c_proj\.(weight|bias)$"),
    "roberta": (r"^(roberta\.)?encoder\.layer\.(\d+)\.", r"(attention\.output\.dense|\.output\.dense)\.(weight|bias)$"),
    "distilbert": (r"^(distilbert\.)?transformer\.layer\.(\d+)\.", r"(out_lin|lin2)\.(weight|bias)$"),
}
DEEP = ["base", "id", "id", "base"]  # every-other-block keeps an identity block either way


@torch.no_grad()
def deepen(model, layout, seed=5, cls_kw=None):
    """`model` with identity blocks inserted: layout lists 'base' (the next
    base block) or 'id' (a block with random weights and zero writers)."""
    block, writer = LAYOUT[model.config.model_type]
    sd = model.state_dict()
    g = torch.Generator().manual_seed(seed)
    new_sd, b = {}, 0
    for i, kind in enumerate(layout):
        src = b if kind == "base" else 0
        for name, t in sd.items():
            m = re.match(block, name)
            if m is None or int(m.group(2)) != src:
                continue
            new = name[:m.start(2)] + str(i) + name[m.end(2):]
            if kind == "id":
                t = torch.zeros_like(t) if re.search(writer, name) else t + 0.3 * torch.randn(t.shape, generator=g)
            new_sd[new] = t.clone()
        b += kind == "base"
    for name, t in sd.items():
        if re.match(block, name) is None:
            new_sd[name] = t
    cfg = type(model.config).from_dict(model.config.to_dict())
    cfg.num_hidden_layers = len(layout)
    if isinstance(getattr(cfg, "layer_types", None), list):
        cfg.layer_types = [model.config.layer_types[0]] * len(layout)
    out = type(model)(cfg, **(cls_kw or {}))
    out.load_state_dict(new_sd)
    return out.eval()


def _vit():
    return M.vit(cls=T.ViTForImageClassification)


def _bert():
    return M.bert(cls=T.BertForSequenceClassification)


FAMILIES = {
    "vit": (_vit, lambda m, widen: M.transform(m, widen=widen), M.inputs),
    "bert": (_bert, lambda m, widen: M.transform(m, widen=widen), M.inputs),
    "llama-gqa": (lambda: D.decoder(T.LlamaConfig, T.LlamaForCausalLM), D.variant, D._inputs),
    "qwen2": (lambda: D.decoder(T.Qwen2Config, T.Qwen2ForCausalLM), D.variant, D._inputs),
    "gpt2": (lambda: G.gpt2("untied"), G.variant, G._inputs),
    "roberta": (lambda: M.roberta(cls=T.RobertaForSequenceClassification),
                lambda m, widen: M.transform_family(m, widen=widen), M.family_inputs),
    "distilbert": (lambda: M.distilbert(cls=T.DistilBertForSequenceClassification),
                   lambda m, widen: M.transform_family(m, widen=widen), M.family_inputs),
}


def _err(model, x, ref):
    a, b = M.outputs(model, x), M.outputs(ref, x)
    return float((a - b).abs().max() / b.abs().max().clamp_min(1))


def test_identity_blocks_compute_the_identity():
    for name, (make, _, inputs) in FAMILIES.items():
        if name in ("bert", "roberta", "distilbert"):
            continue  # post-norm: no exact identity block
        base = make()
        x = inputs(base)
        assert _err(deepen(base, DEEP), x, base) < TOL, name


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("widen", [False, True], ids=["permuted", "widened"])
def test_ot_onto_a_shallower_anchor_recovers_the_average(family, widen):
    make, variant, inputs = FAMILIES[family]
    base = make()
    anchor, x = M.noisy(base), inputs(base)
    parent = variant(deepen(base, DEEP), widen=widen)
    expected = M.average([anchor, base])
    assert _err(anchor, x, expected) > 100 * TOL  # the test can fail
    fused = otcompress.fuse(anchor, [parent], solver="emd")
    assert _err(fused, x, expected) < TOL
    dmap = fused.fusion_report["depth_maps"][0]
    assert dmap["kept"] == [0, 3] and dmap["groups"] == [[0], [1, 2, 3]]
    assert dmap["scored_from"] == "weights"


@pytest.mark.parametrize("family", ["vit", "llama-gqa", "gpt2"])
def test_activation_depth_maps_recover_the_average(family):
    make, variant, inputs = FAMILIES[family]
    base = make()
    anchor, x = M.noisy(base), inputs(base)
    parent = variant(deepen(base, ["id", "base", "id", "base"]), widen=False)
    data = [inputs(base)]
    fused = otcompress.fuse(anchor, [parent], solver="emd", alignment="activations", data=data)
    assert _err(fused, x, M.average([anchor, base])) < TOL
    dmap = fused.fusion_report["depth_maps"][0]
    assert dmap["kept"] == [1, 3] and dmap["scored_from"] == "activations"
    assert dmap["influence"][0] == pytest.approx(0, abs=1e-9)
    assert dmap["similarity"][0][1] > 0.99  # anchor block 0 against parent block 1 (the base's)


@pytest.mark.parametrize("family", ["vit", "llama-gqa", "qwen2", "gpt2", "bert"])
def test_fold_of_deeper_parents_returns_the_base(family):
    make, variant, inputs = FAMILIES[family]
    base = make()
    x = inputs(base)
    parents = [variant(deepen(base, DEEP), widen=True), variant(deepen(base, ["id", "base", "base"]), widen=False)]
    target = target_config(parents[0].config, hidden=base.config.hidden_size,
                           heads=base.config.num_attention_heads, layers=base.config.num_hidden_layers,
                           intermediate=(getattr(base.config, "intermediate_size", None)
                                         or base.config.n_inner), **_kv(base))
    fused = otcompress.fuse(target, parents, alignment="fold", solver="emd")
    assert fused.config.num_hidden_layers == base.config.num_hidden_layers
    assert _err(fused, x, base) < TOL  # every case has a head: outputs in a fixed order
    assert [m["kept"] for m in fused.fusion_report["depth_maps"]] == [[0, 3], [1, 2]]


def _kv(base):
    return {"kv_heads": base.config.num_key_value_heads} if hasattr(base.config, "num_key_value_heads") else {}


def test_parents_of_different_depths_fuse_together():
    base = _vit()
    anchor, x = M.noisy(base), M.inputs(base)
    parents = [M.transform(deepen(base, DEEP), widen=True), M.transform(deepen(base, ["id", "base", "base"]),
                                                                      widen=False)]
    fused = otcompress.fuse(anchor, parents, solver="emd")
    expected = M.average([anchor, base, base])
    assert _err(fused, x, expected) < TOL


def test_a_fixed_stride_depth_map_fails_the_recovery():
    """The mutation check: every other block (either phase) keeps an identity block."""
    base = _vit()
    anchor, x = M.noisy(base), M.inputs(base)
    deep = deepen(base, DEEP)
    expected = M.average([anchor, base])
    for kept in ([0, 2], [1, 3]):
        stride = depth.DepthMap(4, depth.groups_of(kept, 4), kept, [0.0] * 4, "weights")
        fused = otcompress.fuse(anchor, [depth.apply(deep, stride)], solver="emd")
        assert _err(fused, x, expected) > 100 * TOL


def test_streamed_deeper_parents_match_in_memory(tmp_path):
    base = M.bert(cls=T.BertModel)
    anchor = M.noisy(base)
    parent = M.transform(deepen(base, DEEP), widen=True)
    parent.save_pretrained(tmp_path / "parent")
    in_memory = otcompress.fuse(anchor, [parent], solver="emd")
    report = otcompress.fuse_to_disk(anchor, [str(tmp_path / "parent")], tmp_path / "out", solver="emd")
    assert report["depth_maps"][0]["kept"] == [0, 3]
    streamed = T.BertModel.from_pretrained(tmp_path / "out")
    sd = in_memory.state_dict()
    assert all(torch.equal(t, sd[k]) for k, t in streamed.state_dict().items())


def test_an_anchor_deeper_than_a_parent_is_refused():
    deep, shallow = M.vit(layers=3), M.vit(layers=2, seed=1)
    with pytest.raises(IncompatibleModelsError, match="anchor has 3 blocks, parent 1 only 2"):
        otcompress.fuse(deep, [shallow])
    with pytest.raises(IncompatibleModelsError, match="the fold target has 3 blocks, parent 1 only 2"):
        otcompress.fuse(target_config(shallow.config, layers=3), [shallow], alignment="fold")
    with pytest.raises(IncompatibleModelsError, match="deeper target"):
        architectures.check_fold_target(target_config(shallow.config, layers=3), [shallow.config])


def test_dynamic_programming_keeps_order_and_the_best_blocks():
    scores = torch.tensor([[0.9, 0.1, 0.8, 0.0], [0.0, 0.2, 0.9, 0.7]], dtype=torch.float64)
    assert depth.assign(scores) == [0, 2]
    assert depth.assign(torch.tensor([[0.0, 0.0, 1.0]], dtype=torch.float64)) == [2]
    assert depth.groups_of([0, 2], 4) == [[0], [1, 2, 3]]
    assert depth.assign(torch.eye(3, dtype=torch.float64)) == [0, 1, 2]


# ----------------------------------------------------------------------------- fold targets

def test_target_config_sets_depth_and_key_value_heads():
    cfg = D.decoder(T.Qwen2Config, T.Qwen2ForCausalLM, layers=4).config
    small = target_config(cfg, layers=2, heads=2, kv_heads=1)
    assert (small.num_hidden_layers, small.num_attention_heads, small.num_key_value_heads) == (2, 2, 1)
    assert len(small.layer_types) == 2
    T.Qwen2ForCausalLM(small)  # builds
    gpt = target_config(G.gpt2("untied", layers=4).config, layers=2)
    assert gpt.n_layer == 2 and T.GPT2LMHeadModel(gpt).config.n_layer == 2


def test_impossible_grouped_query_targets_are_refused():
    cfg = D.decoder(T.LlamaConfig, T.LlamaForCausalLM).config  # 4 heads, 2 KV heads
    with pytest.raises(InvalidOptionError, match="not a multiple of the parent's 2 key/value heads"):
        target_config(cfg, heads=1)
    with pytest.raises(InvalidOptionError, match="not a multiple of 3"):
        target_config(cfg, kv_heads=3)
    with pytest.raises(InvalidOptionError, match="no grouped-query attention"):
        target_config(M.vit().config, kv_heads=1)
    small = target_config(cfg, heads=2, kv_heads=1)  # a valid GQA target folds and runs
    parent = D.variant(D.decoder(T.LlamaConfig, T.LlamaForCausalLM), widen=True)
    folded = otcompress.fuse(small, [parent], alignment="fold")
    folded(**D._inputs(folded))


def test_explicit_head_dim_targets_are_accepted():
    cfg = D.decoder(T.LlamaConfig, T.LlamaForCausalLM, hidden=32, heads=4).config  # head_dim 8
    small = target_config(cfg, hidden=24, heads=2, kv_heads=1)  # 24 % 2 == 0 but heads x head_dim = 16
    assert small.head_dim == 8
    folded = otcompress.fuse(small, [D.decoder(T.LlamaConfig, T.LlamaForCausalLM)], alignment="fold")
    folded(**D._inputs(folded))


def test_a_pooler_less_bert_model_is_depth_mapped():
    base = M.bert(cls=T.BertModel)
    headless = T.BertModel(base.config, add_pooling_layer=False)
    headless.load_state_dict({k: v for k, v in base.state_dict().items() if "pooler" not in k})
    deep = deepen(headless.eval(), DEEP, cls_kw={"add_pooling_layer": False})
    assert deep.pooler is None
    dmap = depth.depth_map(deep, 2)
    shallow = depth.apply(deep, dmap)
    assert shallow.pooler is None and dmap.kept == [0, 3]
    x = M.inputs(base)
    assert _err(shallow, x, headless) < TOL


@pytest.mark.parametrize("family", ["vit", "llama-gqa", "gpt2"])
def test_prune_of_a_deeper_permuted_parent_returns_the_base(family):
    make, variant, inputs = FAMILIES[family]
    base = make()
    parent = variant(deepen(base, DEEP), widen=False)
    target = target_config(parent.config, layers=base.config.num_hidden_layers)
    pruned = otcompress.fuse(target, [parent], alignment="prune")
    assert _err(pruned, inputs(base), base) < TOL
    assert pruned.fusion_report["depth_maps"][0]["kept"] == [0, 3]


def _gpt2_scaled_by_block_index():
    """(base, its deep parent): GPT-2 with scale_attn_by_inverse_layer_idx
    divides block i's attention scores by i + 1, so base block 1, moved to
    index 3 of the deep parent (DEEP), computes as before only with its Q
    doubled (4 / 2); the deep parent computes exactly the base."""
    plain = G.gpt2("untied")
    cfg = type(plain.config).from_dict({**plain.config.to_dict(), "scale_attn_by_inverse_layer_idx": True})
    base = type(plain)(cfg).eval()
    base.load_state_dict(plain.state_dict())
    deep = deepen(base, DEEP)
    n = cfg.n_embd
    with torch.no_grad():
        deep.transformer.h[3].attn.c_attn.weight[:, :n] *= 2
        deep.transformer.h[3].attn.c_attn.bias[:n] *= 2
    return base, deep


@pytest.mark.parametrize("merge", ["select", "parallel"])
def test_gpt2_blocks_scaled_by_their_index_keep_their_function_when_moved(merge):
    base, deep = _gpt2_scaled_by_block_index()
    x = G._inputs(base)
    assert _err(deep, x, base) < TOL
    fused = otcompress.fuse(target_config(deep.config, layers=2), [deep], alignment="fold", solver="emd",
                            depth_merge=merge)
    assert fused.fusion_report["depth_maps"][0]["kept"] == [0, 3]
    assert _err(fused, x, base) < TOL  # without Q rescaled to the new index: 8.6e-2
    unscaled = otcompress.fuse(target_config(base.config, layers=2), [deepen(base, DEEP)], alignment="fold",
                               solver="emd", depth_merge=merge)
    assert _err(unscaled, x, base) > 100 * TOL  # the check can fail: a parent whose block 3 computes otherwise


def test_a_streamed_gpt2_parent_scaled_by_block_index_is_loaded_to_move_its_blocks(tmp_path):
    base, deep = _gpt2_scaled_by_block_index()
    deep.save_pretrained(tmp_path / "deep")
    otcompress.fuse_to_disk(target_config(deep.config, layers=2), [str(tmp_path / "deep")], tmp_path / "out",
                            alignment="fold", solver="emd")
    assert _err(T.GPT2LMHeadModel.from_pretrained(tmp_path / "out").eval(), G._inputs(base), base) < TOL


def test_a_qwen2_fold_target_keeps_the_attention_types_of_the_kept_blocks():
    """A sliding-window Qwen2 parent (full, full, sliding, sliding): the fold
    target's layer_types are those of the blocks its depth map kept, as the
    depth-mapped parent's are (`target_config` alone guessed full, full)."""
    import test_decoders as D
    parent = D.decoder(T.Qwen2Config, T.Qwen2ForCausalLM, layers=4, seed=3)
    cfg = type(parent.config).from_dict({**parent.config.to_dict(), "use_sliding_window": True, "sliding_window": 4,
                                          "max_window_layers": 2, "layer_types": None})
    parent = type(parent)(cfg).eval()
    parent.load_state_dict(D.decoder(T.Qwen2Config, T.Qwen2ForCausalLM, layers=4, seed=3).state_dict())
    assert parent.config.layer_types == ["full_attention"] * 2 + ["sliding_attention"] * 2
    x = {"input_ids": torch.randint(0, 60, (2, 12), generator=torch.Generator().manual_seed(0))}
    dmap = depth.DepthMap(4, [[0, 1], [2, 3]], [1, 2], [0.0] * 4, "weights")
    fused = otcompress.fuse(target_config(parent.config, layers=2), [depth.apply(parent, dmap)], alignment="fold",
                            solver="emd")
    assert fused.config.layer_types == ["full_attention", "sliding_attention"]
    assert _err(fused, x, depth.apply(parent, dmap)) < TOL
    mapped = otcompress.fuse(target_config(parent.config, layers=2), [parent], alignment="fold", solver="emd")
    kept = mapped.fusion_report["depth_maps"][0]["kept"]
    assert mapped.config.layer_types == [parent.config.layer_types[k] for k in kept]
    # max_window_layers says the same (readers older than layer_types derive the
    # types from it): it was min(2, depth) whichever blocks were kept
    for model in (fused, mapped, depth.apply(parent, dmap)):
        again = type(model.config).from_dict({**model.config.to_dict(), "layer_types": None})
        assert again.layer_types == model.config.layer_types


def test_depth_merge_parallel_without_a_deeper_parent_is_refused_and_targets_name_their_depth():
    base = _vit()
    with pytest.raises(InvalidOptionError, match="no parent is deeper than the anchor"):
        otcompress.fuse(M.noisy(base), [M.transform(base, widen=True)], depth_merge="parallel")
    folded = otcompress.fuse(target_config(base.config, layers=1), [deepen(base, DEEP)], alignment="fold",
                             depth_merge="parallel")
    assert folded.fusion_report["anchor"].endswith("layers 1")  # the target's depth is said
    gqa = FAMILIES["llama-gqa"][0]()
    assert "kv_heads 1, layers 1" in architectures.describe_widths(target_config(gqa.config, layers=1,
                                                                                     kv_heads=1))


def test_the_merge_of_folds_is_not_named_a_parent():
    from otcompress.fusion import _flagged_maps
    uniform = {"res": {"near_uniform": True, "relative_entropy": 0.99}}
    assert _flagged_maps([{}, {}, uniform], 2) == ["the merge of the folds: map res is nearly uniform "
                                                   "(relative entropy 0.99): lower reg"]
    assert _flagged_maps([uniform], 1)[0].startswith("parent 1 map res")


def test_target_config_takes_numpy_integers_as_python_ones():
    import json

    import numpy as np
    cfg = target_config(T.BertConfig(num_hidden_layers=4, hidden_size=32, num_attention_heads=4),
                        layers=np.int64(2), heads=np.int32(2))
    assert (cfg.num_hidden_layers, cfg.num_attention_heads) == (2, 2)
    json.loads(cfg.to_json_string())  # a NumPy value would not serialise
