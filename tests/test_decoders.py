"""LLaMA-style decoders (rotary, grouped-query attention, SwiGLU, RMSNorm):
fusion recovers known answers. Variants are built here from the model's own
structure, independently of the engine's family file: unit permutations that
move whole key/value groups with their query heads (never units inside a
rotary head), and function-preserving 2x widening (twice the key/value
groups with their query heads, twice the residual and MLP units).

A tied LM head cannot be widened that way (the one table would be duplicated
as an embedding and halved as a head at once), so tied models (Llama-3.2,
Qwen2.5) are tested by permutations, folds of permuted copies and
heterogeneous fusion."""
import pytest
import torch
import transformers as T

import models as M
import otcompress

TOL = 1e-5
CLASSES = [(T.LlamaConfig, T.LlamaForCausalLM), (T.LlamaConfig, T.LlamaModel),
           (T.Qwen2Config, T.Qwen2ForCausalLM)]
ids = lambda v: getattr(v, "__name__", "")  # noqa: E731


def decoder(config_cls, cls, hidden=32, heads=4, kv=2, inter=48, seed=0, layers=2, tie=False):
    cfg = config_cls(vocab_size=60, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                     num_key_value_heads=kv, intermediate_size=inter, max_position_embeddings=32,
                     head_dim=hidden // heads, attention_dropout=0.0, tie_word_embeddings=tie)
    model = cls(cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=g) / (1 if "embed" in name else p.shape[1]) ** 0.5)
                if "q_proj" in name or "k_proj" in name:
                    p.mul_(2.5)  # attention must matter
            elif "norm" in name:
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
    return model.eval()


def _roles(name):
    """(per-axis unit space, kind) of each parameter, written from HF's layout."""
    table = [("embed_tokens.weight", [None, ("res", "out")]), ("lm_head.weight", [None, ("res", "in")]),
             ("q_proj.weight", [("q", "out"), ("res", "in")]), ("q_proj.bias", [("q", "out")]),
             ("k_proj.weight", [("kv", "out"), ("res", "in")]), ("k_proj.bias", [("kv", "out")]),
             ("v_proj.weight", [("v", "out"), ("res", "in")]), ("v_proj.bias", [("v", "out")]),
             ("o_proj.weight", [("res", "out"), ("attn", "in")]),
             ("gate_proj.weight", [("mlp", "out"), ("res", "in")]), ("up_proj.weight", [("mlp", "out"), ("res", "in")]),
             ("down_proj.weight", [("res", "out"), ("mlp", "in")]), ("norm.weight", [("res", "out")]),
             ("layernorm.weight", [("res", "out")])]
    return next(r for key, r in table if name.endswith(key))


@torch.no_grad()
def variant(model, *, widen, seed=7):
    cfg = model.config
    n, h, kv, d, inter = (cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim,
                          cfg.intermediate_size)
    r = h // kv
    # A tied head is the embedding table: the one tensor takes the residual
    # permutation on both names, and cannot be halved.
    assert not (widen and getattr(cfg, "tie_word_embeddings", False)), "a tied head cannot be widened"
    g = torch.Generator().manual_seed(seed)
    if widen:
        tile = lambda k: torch.arange(k).repeat(2)  # noqa: E731
        q_heads, kv_heads = tile(h), tile(kv)  # head j of the copy is old head j mod h: its group is old j mod kv
        res, mlp = tile(n), tile(inter)
    else:
        kv_heads = torch.randperm(kv, generator=g)
        q_heads = torch.cat([grp * r + torch.randperm(r, generator=g) for grp in kv_heads.tolist()])
        res, mlp = torch.randperm(n, generator=g), torch.randperm(inter, generator=g)
    units = lambda heads: (heads[:, None] * d + torch.arange(d)).flatten()  # noqa: E731 whole heads
    # Values carry no rotation: their units may move inside a head, the same way
    # in V's rows and in O's columns of every query head of the group.
    inner = [torch.arange(d) if widen else torch.randperm(d, generator=g) for _ in range(kv)]
    v_units = torch.cat([grp * d + inner[grp] for grp in kv_heads.tolist()])
    attn_units = torch.cat([qh * d + inner[qh // r] for qh in q_heads.tolist()])
    idx = {"res": res, "mlp": mlp, "q": units(q_heads), "kv": units(kv_heads), "v": v_units, "attn": attn_units}
    new = type(cfg).from_dict(cfg.to_dict())
    if widen:
        new.hidden_size, new.num_attention_heads, new.num_key_value_heads = 2 * n, 2 * h, 2 * kv
        new.intermediate_size, new.head_dim = 2 * inter, d
    return M.reindex(model, new, idx, _roles, halve_inputs=widen)


def _inputs(model):
    ids_ = torch.randint(0, model.config.vocab_size, (3, 10), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids_)
    mask[0, 7:] = 0
    return {"input_ids": ids_, "attention_mask": mask}


def _err(model, x, ref):
    """Max error relative to the output scale (a tied head's logits are several
    times an untied one's: the head is the unit-variance embedding table)."""
    a, b = M.outputs(model, x), M.outputs(ref, x)
    return float((a - b).abs().max() / b.abs().max().clamp_min(1))


def _sorted_err(model, x, ref):
    a, b = M.outputs(model, x), M.outputs(ref, x)
    if a.shape[-1] != model.config.vocab_size:  # headless: hidden units in the fold's own order
        a, b = a.sort(-1).values, b.sort(-1).values
    return float((a - b).abs().max() / b.abs().max().clamp_min(1))


@pytest.mark.parametrize("cfg_cls,cls", CLASSES, ids=ids)
@pytest.mark.parametrize("widen", [False, True], ids=["permuted", "widened"])
@pytest.mark.parametrize("alignment", ["weights", "activations"])
def test_ot_recovers_the_average(cfg_cls, cls, widen, alignment):
    base = decoder(cfg_cls, cls)
    anchor, x = M.noisy(base), _inputs(base)
    parent = variant(base, widen=widen)
    if not (widen and cls is T.LlamaModel):  # a widened bare model has twice the hidden units
        assert _sorted_err(parent, x, base) < TOL  # the variant computes the base's function
    expected = M.average([anchor, base])
    assert _err(anchor, x, expected) > 100 * TOL  # the test can fail
    fused = otcompress.fuse(anchor, [parent], solver="emd", alignment=alignment, data=_inputs(base))
    assert _err(fused, x, expected) < TOL


@pytest.mark.parametrize("cfg_cls,cls", CLASSES, ids=ids)
def test_fold_recovers_the_original(cfg_cls, cls):
    base = decoder(cfg_cls, cls)
    anchor, x = M.noisy(base, scale=0.5), _inputs(base)
    fused = otcompress.fuse(anchor, [variant(base, widen=True), variant(base, widen=False, seed=3)],
                            alignment="fold", solver="emd")
    assert _sorted_err(fused, x, base) < TOL


def test_heterogeneous_gqa_saves_and_loads(tmp_path):
    small = decoder(T.LlamaConfig, T.LlamaForCausalLM, hidden=16, heads=2, kv=1, inter=24, seed=1)
    wide = [decoder(T.LlamaConfig, T.LlamaForCausalLM, hidden=32, heads=4, kv=2, inter=48, seed=s) for s in (2, 3)]
    for alignment in ("weights", "fold"):
        fused = otcompress.fuse(small, wide, alignment=alignment)
        fused.save_pretrained(tmp_path / alignment)
        back = T.LlamaForCausalLM.from_pretrained(tmp_path / alignment)
        assert back.config.num_key_value_heads == 1
        assert torch.isfinite(M.outputs(back, _inputs(back))).all()


def test_rotary_refuses_other_head_widths():
    from otcompress.errors import IncompatibleModelsError
    a = decoder(T.LlamaConfig, T.LlamaForCausalLM, hidden=32, heads=4, kv=2)
    b = decoder(T.LlamaConfig, T.LlamaForCausalLM, hidden=64, heads=4, kv=2, inter=96)
    with pytest.raises(IncompatibleModelsError, match="head widths"):
        otcompress.fuse(a, [b])


@pytest.mark.parametrize("cfg_cls,cls", [(T.LlamaConfig, T.LlamaForCausalLM), (T.Qwen2Config, T.Qwen2ForCausalLM)],
                         ids=["llama", "qwen2"])
def test_a_fold_target_keeps_the_rotary_head_width_in_both_families(tmp_path, cfg_cls, cls):
    """LLaMA's config always holds head_dim, Qwen2's leaves it implicit
    (hidden / heads): --heads 2 --kv-heads 1 on a 4-head model folded LLaMA at
    head width 8 and refused Qwen2 ("rotary attention needs equal head
    widths (parent 8, target 16)"). Both keep it now, and the written model
    reloads as the one folded."""
    from otcompress.architectures import target_config
    torch.manual_seed(0)
    parent = cls(cfg_cls(vocab_size=60, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=48, max_position_embeddings=32)).eval()
    assert (getattr(parent.config, "head_dim", None) is None) == (cls is T.Qwen2ForCausalLM)
    for widths in ({"heads": 2, "kv_heads": 1}, {"hidden": 16}):
        cfg = target_config(parent.config, **widths)
        assert cfg.head_dim == 8
        model = otcompress.fuse(cfg, [parent], alignment="fold")
        model.save_pretrained(tmp_path / "m")
        again = cls.from_pretrained(tmp_path / "m").eval()
        x = torch.randint(0, 60, (2, 7))
        assert torch.allclose(again(input_ids=x).logits, model(input_ids=x).logits, atol=1e-6)
        assert again.model.layers[0].self_attn.q_proj.out_features == cfg.num_attention_heads * 8


# --------------------------------------------------------------------------- tied LM heads
TIED = [(T.LlamaConfig, T.LlamaForCausalLM), (T.Qwen2Config, T.Qwen2ForCausalLM)]


def _is_tied(model):
    return model.lm_head.weight is model.model.embed_tokens.weight


@pytest.mark.parametrize("cfg_cls,cls", TIED, ids=ids)
def test_tied_spec_knows_every_parameter_and_the_tie(cfg_cls, cls):
    from otcompress import architectures
    for tie in (True, False):
        model = decoder(cfg_cls, cls, tie=tie)
        assert _is_tied(model) == tie
        spec = architectures.build_spec(model)
        assert set(model.state_dict()) == set(spec.axes) | set(spec.tied)
        assert spec.tied == ({"lm_head.weight": "model.embed_tokens.weight"} if tie else {})
        # The head reads the final stream and, tied, *is* the embedding table:
        # the final norm must live in the embedding's map, not in a mixture.
        final, = spec.axes["model.norm.weight"][0].tms
        emb, = spec.axes["model.embed_tokens.weight"][1].tms
        assert (_same_map(spec, final) == _same_map(spec, emb)) == tie


def _same_map(spec, tm):
    """The map `tm` equals: followed through Shares and through joins that
    combine a map with itself."""
    from otcompress.flowgraph import Combine, Share
    node = next((n for n in spec.nodes if n.tm == tm), None)
    if isinstance(node, Share):
        return _same_map(spec, node.same_as)
    if isinstance(node, Combine) and _same_map(spec, node.skip) == _same_map(spec, node.branch):
        return _same_map(spec, node.skip)
    return tm


@pytest.mark.parametrize("cfg_cls,cls", TIED, ids=ids)
@pytest.mark.parametrize("alignment", ["weights", "activations"])
def test_tied_ot_recovers_the_average(cfg_cls, cls, alignment):
    base = decoder(cfg_cls, cls, tie=True, seed=4)
    anchor, x = M.noisy(base), _inputs(base)
    parent = variant(base, widen=False)
    assert _is_tied(anchor) and _is_tied(parent)
    assert not torch.equal(parent.model.embed_tokens.weight, base.model.embed_tokens.weight)
    assert _err(parent, x, base) < TOL  # the variant computes the base's function
    expected = M.average([anchor, base])
    assert _err(anchor, x, expected) > 100 * TOL  # the test can fail
    fused = otcompress.fuse(anchor, [parent], solver="emd", alignment=alignment, data=_inputs(base))
    assert _is_tied(fused)
    assert _err(fused, x, expected) < TOL


@pytest.mark.parametrize("cfg_cls,cls", TIED, ids=ids)
def test_tied_fold_of_permuted_copies_recovers_the_original(cfg_cls, cls):
    base = decoder(cfg_cls, cls, tie=True, seed=5)
    anchor, x = M.noisy(base, scale=0.5), _inputs(base)
    assert _err(anchor, x, base) > 100 * TOL  # the test can fail
    fused = otcompress.fuse(anchor, [variant(base, widen=False), variant(base, widen=False, seed=3)],
                            alignment="fold", solver="emd")
    assert _is_tied(fused)
    assert _err(fused, x, base) < TOL


@pytest.mark.parametrize("cfg_cls,cls", TIED, ids=ids)
def test_tied_heterogeneous_fusion_saves_and_loads_tied(tmp_path, cfg_cls, cls):
    small = decoder(cfg_cls, cls, hidden=16, heads=2, kv=1, inter=24, seed=1, tie=True)
    wide = [decoder(cfg_cls, cls, hidden=32, heads=4, kv=2, inter=48, seed=s, tie=True) for s in (2, 3)]
    for alignment, data in (("weights", None), ("activations", _inputs(small)), ("fold", None)):
        fused = otcompress.fuse(small, wide, alignment=alignment, data=data)
        assert _is_tied(fused)
        fused.save_pretrained(tmp_path / alignment)
        back = cls.from_pretrained(tmp_path / alignment)
        assert back.config.tie_word_embeddings and _is_tied(back)
        assert back.config.hidden_size == 16 and back.config.num_key_value_heads == 1
        out = M.outputs(back, _inputs(back))
        assert torch.isfinite(out).all()
        assert torch.allclose(out, M.outputs(fused, _inputs(back)), atol=1e-5)
    from otcompress.export import export_onnx
    report = export_onnx(back, tmp_path / "fused.onnx")  # the tied head exports like an untied one
    assert report["output_names"] == ["logits"] and report["max_abs_diff"] < 1e-4


def test_tied_anchor_refuses_untied_parents():
    from otcompress.errors import IncompatibleModelsError
    tied = decoder(T.LlamaConfig, T.LlamaForCausalLM, tie=True)
    untied = decoder(T.LlamaConfig, T.LlamaForCausalLM, seed=1)
    for anchor, parent in ((tied, untied), (untied, tied)):
        with pytest.raises(IncompatibleModelsError, match="tie_word_embeddings"):
            otcompress.fuse(anchor, [parent])


@pytest.mark.parametrize("cfg_cls,cls", [(T.LlamaConfig, T.LlamaForCausalLM), (T.Qwen2Config, T.Qwen2ForCausalLM)],
                         ids=["llama", "qwen2"])
def test_a_fold_into_fewer_key_value_groups_fills_each_group(cfg_cls, cls):
    """8 query heads in 4 key/value groups into 8 in 2: each target group
    needs two parent groups' query heads, and plain k-means on the groups
    could put three in one ("cannot fold 2 query heads into 4", seeds 1-3 of
    a user's LLaMA). Every seed folds, to the target's shape, finite."""
    from otcompress.architectures import target_config
    for seed in range(6):
        parent = decoder(cfg_cls, cls, hidden=64, heads=8, kv=4, inter=64, seed=seed, layers=3)
        cfg = target_config(parent.config, kv_heads=2, layers=2)
        model = otcompress.fuse(cfg, [parent], alignment="fold", seed=seed)
        attn = model.model.layers[0].self_attn
        assert (attn.k_proj.out_features, attn.q_proj.out_features) == (2 * 8, 8 * 8)
        assert torch.isfinite(M.outputs(model, _inputs(model))).all()
