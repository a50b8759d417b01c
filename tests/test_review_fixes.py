"""Correctness fixes from a review (issue 17): repair never changes the maps,
one-shot data iterators, "gap" normalisation of 2-column costs, dtypes,
pooler-less BERT, stochastic rescalings of empty rows, GPT-2's score scale."""
from __future__ import annotations

import warnings

import pytest
import torch
import transformers as T

import models as M
import otcompress
from otcompress import architectures, transport


def _map_costs(report):
    """{(parent, map): (cost, iterations)} of every solved map in a fusion report."""
    return {(k, tm): (st.get("cost"), st.get("cluster_size"))
            for k, maps in enumerate(report["transport_maps"]) for tm, st in maps.items()
            if "cost" in st or "cluster_size" in st}


def _untouched_by_repair(model):
    """Tensors repair never corrects (LayerNorms, embeddings, classifier): equal
    across two fusions exactly when their residual-stream maps are equal."""
    return {n: t for n, t in model.state_dict().items()
            if "layernorm" in n.lower() or "embeddings" in n or n.startswith("classifier")}


@pytest.mark.parametrize("alignment,data_free", [("weights", False), ("weights", True),
                                                 ("activations", False), ("fold", False), ("fold", True)])
def test_repair_leaves_the_transport_maps_unchanged(alignment, data_free):
    """Repair statistics travel through the maps but are never matching
    features: every map's cost (fold: its clusters) is the same with and
    without repair, and so is every tensor repair does not correct."""
    torch.manual_seed(0)
    anchor, parent = M.vit(hidden=16, heads=2, inter=32, seed=1), M.vit(hidden=32, heads=4, inter=64, seed=2)
    data = [M.inputs(anchor, batch=8, seed=s) for s in range(2)]
    target = anchor.config if alignment == "fold" else anchor
    kw = dict(alignment=alignment, reg=0.05, data=None if data_free and alignment != "activations" else data)
    plain = otcompress.fuse(target, [parent], **kw)
    fixed = otcompress.fuse(target, [parent], repair=True, **kw)
    assert fixed.fusion_report["repair"]  # repair did run
    a, b = _map_costs(plain.fusion_report), _map_costs(fixed.fusion_report)
    assert a and a == b
    ua, ub = _untouched_by_repair(plain), _untouched_by_repair(fixed)
    assert ua and all(torch.equal(ua[n], ub[n]) for n in ua)


def _vit_pair():
    return M.vit(seed=1), M.vit(hidden=48, heads=6, inter=96, seed=2)


@pytest.mark.parametrize("repair", [False, True])
def test_generator_data_gives_what_a_list_gives(repair):
    """A generator is read once: the statistics, repair and the reg sweep see
    the same batches as from a list (before, the sweep saw none, every loss
    was 0.0 and the smallest reg won)."""
    anchor, parent = _vit_pair()
    batches = [M.inputs(anchor, batch=8, seed=s) for s in range(3)]
    kw = dict(alignment="activations", reg="auto", reg_grid=[0.005, 0.05, 0.5], repair=repair)
    from_list = otcompress.fuse(anchor, [parent], data=batches, **kw).fusion_report
    from_gen = otcompress.fuse(anchor, [parent], data=(b for b in batches), **kw).fusion_report
    assert from_gen["reg_sweep"] == from_list["reg_sweep"]
    assert from_gen["options"]["reg"] == from_list["options"]["reg"]
    assert all(s["loss"] > 0 for s in from_gen["reg_sweep"])
    assert from_gen["calibration_samples"] == from_list["calibration_samples"] > 0


def test_reg_auto_refuses_empty_holdout():
    from otcompress.errors import DataError
    anchor, parent = _vit_pair()
    with pytest.raises(DataError, match="no batches"):
        otcompress.fuse(anchor, [parent], reg="auto", data=M.inputs(anchor), holdout=iter([]))
    from otcompress import fusion
    with pytest.raises(DataError, match="no batches"):  # never a loss of 0, which would win every sweep
        fusion.holdout_loss(anchor, [], None)


def test_default_reg_is_auto_with_data_and_fixed_without():
    """fuse's default reg: chosen on the data when there is data (the sweep is
    in the report), 0.02 without; an explicit reg is kept."""
    anchor, parent = _vit_pair()
    data = M.inputs(anchor, batch=8)
    with_data = otcompress.fuse(anchor, [parent], alignment="activations", data=data).fusion_report
    assert with_data["reg_sweep"] and with_data["options"]["reg"] in [s["reg"] for s in with_data["reg_sweep"]]
    without = otcompress.fuse(anchor, [parent]).fusion_report
    assert without["reg_sweep"] is None and without["options"]["reg"] == 0.02
    fixed = otcompress.fuse(anchor, [parent], alignment="activations", data=data, reg=0.05).fusion_report
    assert fixed["reg_sweep"] is None and fixed["options"]["reg"] == 0.05


@torch.no_grad()
def _gpt2_wide_heads(model):
    """A functionally identical GPT-2 with heads twice as wide (same number of
    heads, hidden and MLP doubled): every unit twice, inputs halved, and Q
    divided by sqrt(2) (scores scaled by 1/sqrt(head width)) or by 2 (unscaled)."""
    from test_gpt2 import _roles
    cfg = model.config
    n, h, inner = cfg.n_embd, cfg.n_head, cfg.n_inner
    d = n // h
    tile = lambda k: torch.arange(k).repeat(2)  # noqa: E731
    # new head j, slot s (of 2d) is old head j's unit s mod d
    per_head = torch.cat([j * d + torch.arange(2 * d) % d for j in range(h)])
    idx = {"res": tile(n), "v": per_head, "mlp": tile(inner), "qkv": torch.cat([per_head, n + per_head, 2 * n + per_head])}
    q_factor = 2 ** -0.5 if cfg.scale_attn_weights else 0.5
    new = T.GPT2Config.from_dict({**cfg.to_dict(), "n_embd": 2 * n, "n_inner": 2 * inner})
    sd = {}
    for name, t in model.state_dict().items():
        for axis, role in enumerate(_roles(name)):
            if role is not None:
                t = t.index_select(axis, idx[role[0]])
                if role[1] == "in":
                    t = t / 2
        if name.endswith("c_attn.weight"):
            t[:, :2 * n] *= q_factor
        elif name.endswith("c_attn.bias"):
            t[:2 * n] *= q_factor
        sd[name] = t
    out = type(model)(new)
    out.load_state_dict(sd)
    return out.eval()


@pytest.mark.parametrize("scaled", [True, False])
def test_gpt2_with_wider_heads_recovers_the_average(scaled):
    """A parent whose heads are twice as wide (head width 16 vs 8) fused back
    with EMD gives exactly the average of anchor and base: carried Q is
    rescaled by sqrt(2) where scores are divided by sqrt(head width), by 2
    where GPT-2's scale_attn_weights=False."""
    from test_gpt2 import _err, _inputs, gpt2
    base = gpt2("bare", hidden=32, heads=4, inner=48)
    base.config.scale_attn_weights = scaled
    base = type(base)(base.config).eval()
    base.load_state_dict(gpt2("bare", hidden=32, heads=4, inner=48).state_dict())
    x = _inputs(base)
    wide = _gpt2_wide_heads(base)
    assert wide.config.n_embd // wide.config.n_head == 16
    ref, got = M.outputs(base, x), M.outputs(wide, x)[..., :32]
    assert float((got - ref).abs().max()) < 1e-4  # the same function
    anchor = M.noisy(base)
    expected = M.average([anchor, base])
    assert _err(anchor, x, expected) > 1e-3
    fused = otcompress.fuse(anchor, [wide], solver="emd")
    assert _err(fused, x, expected) < 1e-5


# --------------------------------------------------------------------------- "gap" on 2-column costs
@pytest.mark.parametrize("n", [2, 3, 7])
def test_gap_normalisation_makes_plans_scale_free(n):
    """"gap" divides by the median row gap (with two columns, where that median
    is 0, by the median positive gap: each row's margin): a cost and the same
    cost x 100 give the same normalised cost and plan."""
    cost = torch.rand(6, n, generator=torch.Generator().manual_seed(n), dtype=torch.float64)
    a, b = transport.normalise_cost(cost, "gap"), transport.normalise_cost(100 * cost, "gap")
    assert torch.allclose(a, b, rtol=1e-12, atol=0)
    margins = (cost - cost.min(1, keepdim=True).values)
    assert float(a.max()) == pytest.approx(float(margins.max() / margins[margins > 0].median())
                                           if n == 2 else float(margins.max() / margins.median()))
    mu, nu = transport.uniform(6), transport.uniform(n)
    pa, pb = (transport.sinkhorn(mu, nu, c, 0.1).plan for c in (a, b))
    assert torch.allclose(pa, pb, atol=1e-9)


def _llama(heads, kv, seed):
    from test_decoders import decoder
    return decoder(T.LlamaConfig, T.LlamaForCausalLM, hidden=32, heads=heads, kv=kv, inter=24, seed=seed)


@pytest.mark.parametrize("case", ["2 heads, aware", "2 KV heads, 2 query heads each"])
def test_gap_normalised_two_head_plans_follow_reg(case):
    """The 2x2 head plans (2 heads, head-aware; 2 KV groups) are normalised
    like every other map, so reg 0.1 (a tenth of a typical margin) gives a
    decisive head assignment (relative entropy ~0.5, a hard map). Before, the
    2-column cost was left unscaled (its median gap is 0): the same plans had
    relative entropy 0.88-0.995, nearly the flat map, heads averaged."""
    if case.startswith("2 heads"):
        anchor, parent = M.vit(hidden=16, heads=2, inter=32, seed=1), M.vit(hidden=32, heads=2, inter=64, seed=2)
        kw, key = dict(head_alignment="aware", reg=0.1), "heads"
    else:
        anchor, parent = _llama(4, 2, 1), _llama(4, 2, 2)
        kw, key = dict(reg=0.1), "kv_heads"
    maps = otcompress.fuse(anchor, [parent], **kw).fusion_report["transport_maps"][0]
    plans = [st[key] for st in maps.values() if isinstance(st.get(key), dict)]
    assert len(plans) == 2 and all(p["shape"] == [2, 2] for p in plans)
    assert max(p["relative_entropy"] for p in plans) < 0.6


# --------------------------------------------------------------------------- item 7
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_stochastic_rescalings_leave_empty_rows_and_columns_zero(dtype):
    """An empty row or column (a unit no mass reaches) stays 0: the clamp is the
    dtype's smallest normal number (1e-300 is 0 in float32: 0/0 = NaN)."""
    plan = torch.tensor([[0.2, 0.0, 0.1], [0.0, 0.0, 0.0], [0.3, 0.0, 0.4]], dtype=dtype)
    r, c = transport.row_stochastic(plan), transport.column_stochastic(plan)
    assert torch.isfinite(r).all() and torch.isfinite(c).all()
    assert (r[1] == 0).all() and (c[:, 1] == 0).all()
    assert torch.allclose(r.sum(1).float(), torch.tensor([1.0, 0.0, 1.0]), atol=1e-2)


def test_lazy_model_says_why_it_does_not_stream(tmp_path):
    """The documented fallbacks (no safetensors) stay quiet; anything else that
    stops streaming is named in a warning instead of hidden."""
    from otcompress import modelio
    bert = T.BertModel(T.BertConfig(**M.TINY_BERT))
    bert.save_pretrained(tmp_path / "ok")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert modelio.lazy_model(tmp_path / "ok") is not None
        (tmp_path / "none").mkdir()
        (tmp_path / "none" / "config.json").write_text((tmp_path / "ok" / "config.json").read_text())
        assert modelio.lazy_model(tmp_path / "none") is None  # no safetensors: load_model's business
    cfg = (tmp_path / "ok" / "config.json").read_text().replace('"BertModel"', '"ViTModel"')
    (tmp_path / "ok" / "config.json").write_text(cfg)  # a class that cannot lay out this config
    with pytest.warns(UserWarning, match="loaded whole, not streamed.*ViTModel"):
        assert modelio.lazy_model(tmp_path / "ok") is None


@CUDA
def test_measure_latency_and_evaluate_on_cuda_leave_the_model_where_it_was():
    from otcompress.data import load_data
    from otcompress.finetune import evaluate
    from otcompress.profiling import example_inputs, measure_latency
    model = M.vit().cuda()
    assert measure_latency(model, example_inputs(model), repeats=2, warmup=1)["device"].startswith("cuda")
    cpu_model = M.vit()
    evaluate(cpu_model, load_data("digits", cpu_model), device="cuda")
    assert next(cpu_model.parameters()).device.type == "cpu"


# --------------------------------------------------------------------------- items 5 and 6
def _no_pooler(model):
    out = T.BertModel(model.config, add_pooling_layer=False)
    out.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("pooler.")})
    return out.eval()


def _sorted_err(model, x, base):
    a, b = M.outputs(model, x).sort(-1).values, M.outputs(base, x).sort(-1).values
    return float((a - b).abs().max() / b.abs().max().clamp_min(1))


def test_a_bert_without_its_pooler_folds_and_fuses():
    """BertModel(add_pooling_layer=False): the fold target is built without a
    pooler too (was KeyError 'pooler.dense.weight'); folding its widened copy
    gives the original back, and OT fusion of a permuted copy the average."""
    base = _no_pooler(M.bert(cls=T.BertModel))
    x = M.inputs(base)
    wide = _no_pooler(M.transform(M.bert(cls=T.BertModel), widen=True))
    folded = otcompress.fuse(base.config, [wide], alignment="fold")
    assert folded.pooler is None and not any(k.startswith("pooler") for k in folded.state_dict())
    assert _sorted_err(folded, x, base) < 1e-5
    full = M.bert(cls=T.BertModel)
    anchor, parent = _no_pooler(M.noisy(full)), _no_pooler(M.transform(full, widen=False))
    expected = _no_pooler(M.average([M.noisy(full), full]))
    assert float((M.outputs(anchor, x) - M.outputs(expected, x)).abs().max()) > 1e-2
    fused = otcompress.fuse(anchor, [parent], solver="emd")
    assert fused.pooler is None
    assert float((M.outputs(fused, x) - M.outputs(expected, x)).abs().max()) < 1e-4


def _bf16_llama():
    from test_decoders import decoder
    model = decoder(T.LlamaConfig, T.LlamaForCausalLM, hidden=32, heads=4, kv=2, inter=48, seed=3)
    model.config.dtype = torch.bfloat16  # as from_pretrained(dtype=torch.bfloat16) records it
    return model.to(torch.bfloat16)


def test_folding_bfloat16_parents_writes_bfloat16(tmp_path):
    """A bfloat16 parent folds into a bfloat16 model (the config says so too),
    in memory and streamed from its directory to disk; its values are the
    float32 fold's, rounded."""
    parent = _bf16_llama()
    assert parent.config.dtype == torch.bfloat16
    target = architectures.target_config(parent.config, hidden=16, intermediate=24)
    folded = otcompress.fuse(target, [parent], alignment="fold")
    assert {p.dtype for p in folded.parameters()} == {torch.bfloat16}
    assert folded.config.dtype == torch.bfloat16
    ref = otcompress.fuse(target, [parent.float()], alignment="fold")
    for (n, a), b in zip(folded.state_dict().items(), ref.state_dict().values()):
        assert torch.allclose(a.float(), b, rtol=1e-2, atol=1e-2), n
    parent = _bf16_llama()
    parent.save_pretrained(tmp_path / "p")
    otcompress.fuse_to_disk(target, [str(tmp_path / "p")], tmp_path / "out", alignment="fold")
    from safetensors import safe_open
    with safe_open(tmp_path / "out" / "model.safetensors", framework="pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
    back = T.LlamaForCausalLM.from_pretrained(tmp_path / "out")
    assert back.dtype == torch.bfloat16
    assert torch.equal(back.model.layers[0].mlp.up_proj.weight, folded.model.layers[0].mlp.up_proj.weight)


# --------------------------------------------------------------------------- exact recovery tests that were missing
@pytest.mark.parametrize("make,cls", [(M.vit, T.ViTForImageClassification), (M.bert, T.BertForSequenceClassification)],
                         ids=["vit", "bert"])
@pytest.mark.parametrize("widen", [False, True], ids=["permuted", "widened"])
@pytest.mark.parametrize("alignment", ["weights", "activations"])
def test_head_aware_alignment_recovers_the_average(make, cls, widen, alignment):
    """head_alignment="aware" (heads matched first, then units inside matched
    heads) recovers the average of anchor and base from a permuted or 2x
    widened copy, like the cross-head map."""
    base = make(cls=cls)
    anchor, parent, x = M.noisy(base), M.transform(base, widen=widen), M.inputs(base)
    expected = M.outputs(M.average([anchor, base]), x)
    assert float((M.outputs(anchor, x) - expected).abs().max()) > 1e-3  # the test can fail
    fused = otcompress.fuse(anchor, [parent], solver="emd", head_alignment="aware", alignment=alignment,
                            data=M.inputs(base, batch=16, seed=3))
    methods = [st.get("method") for tm, st in fused.fusion_report["transport_maps"][0].items()
               if tm.endswith(".heads")]
    assert methods == ["head-aware"] * base.config.num_hidden_layers
    assert float((M.outputs(fused, x) - expected).abs().max()) < 1e-5


@torch.no_grad()
def _more_query_heads(model):
    """A functionally identical LLaMA/Qwen2 with twice the query heads per
    key/value group (each query head twice inside its group, O's columns
    halved); same head width, same KV heads."""
    cfg = model.config
    h, kv, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    rp = h // kv
    heads = [g * rp + (i % rp) for g in range(kv) for i in range(2 * rp)]  # new group g: its old heads, twice
    units = torch.cat([torch.arange(j * d, (j + 1) * d) for j in heads])
    new = type(cfg).from_dict({**cfg.to_dict(), "num_attention_heads": 2 * h})
    sd = {}
    for name, t in model.state_dict().items():
        if "q_proj" in name:
            t = t.index_select(0, units)
        elif "o_proj.weight" in name:
            t = t.index_select(1, units) / 2
        sd[name] = t
    out = type(model)(new)
    out.load_state_dict(sd)
    return out.eval()


@pytest.mark.parametrize("cfg_cls,cls", [(T.LlamaConfig, T.LlamaForCausalLM), (T.Qwen2Config, T.Qwen2ForCausalLM)],
                         ids=["llama", "qwen2"])
@pytest.mark.parametrize("alignment", ["weights", "activations"])
def test_gqa_with_more_query_heads_per_group_recovers_the_average(cfg_cls, cls, alignment):
    """A parent with 4 query heads per key/value group against an anchor with 2
    (2 KV groups both): the query-head plans inside each group pair are 4x2,
    and the fused model is exactly the average of anchor and base."""
    from test_decoders import _err, _inputs, decoder
    base = decoder(cfg_cls, cls)
    parent, x = _more_query_heads(base), _inputs(base)
    assert parent.config.num_attention_heads == 8 and parent.config.num_key_value_heads == 2
    assert float((M.outputs(parent, x) - M.outputs(base, x)).abs().max()) < 1e-5  # the same function
    anchor = M.noisy(base)
    expected = M.average([anchor, base])
    assert _err(anchor, x, expected) > 1e-3  # the test can fail
    fused = otcompress.fuse(anchor, [parent], solver="emd", alignment=alignment, data=_inputs(base))
    assert _err(fused, x, expected) < 1e-5


def _gpt2_pair():
    from test_gpt2 import gpt2, variant
    base = gpt2("bare")
    return base, variant(base, widen=True)


def _qwen2_pair():
    from test_decoders import decoder, variant
    base = decoder(T.Qwen2Config, T.Qwen2ForCausalLM)
    return base, variant(base, widen=True)


@pytest.mark.parametrize("pair", [_gpt2_pair, _qwen2_pair], ids=["gpt2", "qwen2"])
def test_repair_on_decoders_restores_the_target_statistics(pair):
    """Repair on GPT-2 (Conv1D, (in, out) weights) and Qwen2 (Q/K/V biases,
    grouped-query attention): after repair every repair point's units have
    the mean and std of the average of the anchor's and the base's (a 2x
    widened copy's, carried through the recovered maps)."""
    from otcompress import repair
    from test_fold import _unit_stats
    base, wide = pair()
    anchor = M.noisy(base, scale=0.3)
    g = torch.Generator().manual_seed(3)
    calib = [{"input_ids": torch.randint(0, base.config.vocab_size, (8, 12), generator=g)} for _ in range(2)]
    modules = list(repair.points(architectures.build_spec(anchor)))
    assert len(modules) >= 2 * base.config.num_hidden_layers
    target = {m: [(a + b) / 2 for a, b in zip(sa, sb)] for (m, sa), sb in
              zip(_unit_stats(anchor, modules, calib).items(), _unit_stats(base, modules, calib).values())}

    def worst(model):
        got = _unit_stats(model, modules, calib)
        return max(float((g - t).abs().max() / t.abs().max()) for m in modules for g, t in zip(got[m], target[m]))
    assert worst(otcompress.fuse(anchor, [wide], solver="emd")) > 1e-2  # repair has work to do
    fused = otcompress.fuse(anchor, [wide], solver="emd", repair=True, data=calib)
    assert worst(fused) < 1e-4


@CUDA
def test_streamed_fold_runs_on_the_device_asked_for(tmp_path):
    """A fold target has no weights to say where to work: `device` does (the
    CLI's --device), also for parents streamed from their directories."""
    parent = M.vit(hidden=32, heads=4, inter=64, seed=2)
    parent.save_pretrained(tmp_path / "p")
    target = architectures.target_config(parent.config, hidden=16, heads=2, intermediate=32)
    on_gpu = otcompress.fuse(target, [str(tmp_path / "p")], alignment="fold", device="cuda")
    assert next(on_gpu.parameters()).is_cuda
    on_cpu = otcompress.fuse(target, [str(tmp_path / "p")], alignment="fold")
    x = M.inputs(on_cpu)
    assert torch.allclose(M.outputs(on_gpu, {k: v.cuda() for k, v in x.items()}).cpu(), M.outputs(on_cpu, x),
                          atol=1e-4)
