"""GPT-2 (Conv1D layers, fused Q|K|V, learned positions, pre-LN, tied LM head):
fusion recovers known answers. The variants are built here from the model's
own structure, independently of otcompress/architectures/gpt2.py: Conv1D
weights are (in, out); c_attn's output columns are Q, K, V thirds; one head
order is shared by Q, K and V, with one within-head order for Q/K and one for
V/c_proj. 2x widening doubles the residual, the heads (same head width) and
the MLP, with input-side weights halved.

A tied head cannot be widened that way (the one table would be duplicated as
an embedding and halved as a head at once), so widening is tested on GPT2Model
and on an untied GPT2LMHeadModel, permutations on all three."""
import pytest
import torch
import transformers as T

import models as M
import otcompress
from otcompress import architectures

TOL = 1e-5
KINDS = ["tied", "untied", "bare"]


def gpt2(kind="tied", hidden=32, heads=4, inner=48, layers=2, seed=0, vocab=60):
    cfg = T.GPT2Config(vocab_size=vocab, n_embd=hidden, n_layer=layers, n_head=heads, n_inner=inner,
                       n_positions=32, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                       bos_token_id=0, eos_token_id=0, tie_word_embeddings=kind != "untied")
    model = (T.GPT2Model if kind == "bare" else T.GPT2LMHeadModel)(cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                embedding = name.endswith(("wte.weight", "wpe.weight"))
                # Conv1D is (in, out): the fan-in is the first axis (lm_head is an nn.Linear).
                fan_in = 1 if embedding else p.shape[1] if name == "lm_head.weight" else p.shape[0]
                p.copy_(torch.randn(p.shape, generator=g) / fan_in ** 0.5)
                if name.endswith("c_attn.weight"):
                    p[:, :2 * hidden].mul_(2.5)  # Q and K columns: attention must matter
            elif name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")):
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
    return model.eval()


def _roles(name):
    """Per-axis (unit space, "out" | "in") of each GPT-2 parameter."""
    table = [("wte.weight", [None, ("res", "out")]), ("wpe.weight", [None, ("res", "out")]),
             ("attn.c_attn.weight", [("res", "in"), ("qkv", "out")]), ("attn.c_attn.bias", [("qkv", "out")]),
             ("attn.c_proj.weight", [("v", "in"), ("res", "out")]), ("attn.c_proj.bias", [("res", "out")]),
             ("mlp.c_fc.weight", [("res", "in"), ("mlp", "out")]), ("mlp.c_fc.bias", [("mlp", "out")]),
             ("mlp.c_proj.weight", [("mlp", "in"), ("res", "out")]), ("mlp.c_proj.bias", [("res", "out")]),
             ("lm_head.weight", [None, ("res", "in")])]
    for key, r in table:
        if name.endswith(key):
            return r
    if name.split(".")[-2] in ("ln_1", "ln_2", "ln_f"):
        return [("res", "out")]
    raise KeyError(f"test role table does not know {name}")


@torch.no_grad()
def variant(model, *, widen, seed=7):
    """A functionally identical copy: units permuted, or 2x widened."""
    cfg = model.config
    n, h, inner = cfg.n_embd, cfg.n_head, cfg.n_inner
    d = n // h
    g = torch.Generator().manual_seed(seed)
    if widen:
        tile = lambda k: torch.arange(k).repeat(2)  # noqa: E731 (head j of the copy = old head j mod h)
        res, q, v, mlp = tile(n), tile(n), tile(n), tile(inner)
    else:
        heads = torch.randperm(h, generator=g)  # one head order for Q, K and V

        def within():
            return torch.cat([heads[j] * d + torch.randperm(d, generator=g) for j in range(h)])
        res, q, v, mlp = torch.randperm(n, generator=g), within(), within(), torch.randperm(inner, generator=g)
    # c_attn's output is [Q | K | V]: K moves with Q, each third indexes its own block.
    idx = {"res": res, "v": v, "mlp": mlp, "qkv": torch.cat([q, n + q, 2 * n + v])}
    new = T.GPT2Config.from_dict(cfg.to_dict())
    if widen:
        new.n_embd, new.n_head, new.n_inner = 2 * n, 2 * h, 2 * inner
    sd = {}
    for name, t in model.state_dict().items():
        for axis, role in enumerate(_roles(name)):
            if role is not None:
                t = t.index_select(axis, idx[role[0]])
                if role[1] == "in" and widen:
                    t = t / 2
        sd[name] = t
    out = type(model)(new)
    out.load_state_dict(sd)
    return out.eval()


def _inputs(model, batch=3, seq=10):
    ids = torch.randint(0, model.config.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, 7:] = 0  # padding must not count as samples
    return {"input_ids": ids, "attention_mask": mask}


def _err(model, x, ref):
    """Max error relative to the output scale (a tied head's logits are ~10x
    a hidden unit's: the head is the unit-variance embedding table)."""
    a, b = M.outputs(model, x), M.outputs(ref, x)
    return float((a - b).abs().max() / b.abs().max().clamp_min(1))


def _same_function(variant_m, base, x):
    """The variant computes the base's function (a widened bare model's hidden
    units come twice: compare its first copy)."""
    a, b = M.outputs(variant_m, x), M.outputs(base, x)
    if a.shape[-1] != b.shape[-1]:
        a = a[..., :b.shape[-1]]
    elif a.shape[-1] != base.config.vocab_size:  # a permuted bare model: hidden units in its own order
        a, b = a.sort(-1).values, b.sort(-1).values
    return float((a - b).abs().max() / b.abs().max().clamp_min(1))


CASES = [(kind, widen) for kind in KINDS for widen in (False, True) if not (widen and kind == "tied")]


@pytest.mark.parametrize("kind,widen", CASES, ids=[f"{k}-{'widened' if w else 'permuted'}" for k, w in CASES])
@pytest.mark.parametrize("alignment", ["weights", "activations"])
def test_ot_recovers_the_average(kind, widen, alignment):
    base = gpt2(kind)
    anchor, x = M.noisy(base), _inputs(base)
    parent = variant(base, widen=widen)
    assert _same_function(parent, base, x) < TOL
    expected = M.average([anchor, base])
    assert _err(anchor, x, expected) > 100 * TOL  # the test can fail
    fused = otcompress.fuse(anchor, [parent], solver="emd", alignment=alignment, data=_inputs(base, batch=6))
    assert _err(fused, x, expected) < TOL


@pytest.mark.parametrize("kind", KINDS)
def test_two_parents_recover_the_weighted_average(kind):
    base = gpt2(kind, seed=1)
    anchor, x = M.noisy(base), _inputs(base)
    parents = [variant(base, widen=False, seed=3), variant(base, widen=kind != "tied", seed=5)]
    expected = M.average([anchor, base], weights=[1 / 3, 2 / 3])
    assert _err(anchor, x, expected) > 100 * TOL
    fused = otcompress.fuse(anchor, parents, solver="emd", qk="separate")
    assert _err(fused, x, expected) < TOL


def test_a_fuse_that_ignores_the_head_order_fails():
    """Q/K/V thirds permuted with different head orders: no longer the same
    function, so an engine that mixed the thirds up would still be caught."""
    base = gpt2("tied")
    x = _inputs(base)
    good = variant(base, widen=False)
    broken = type(good)(good.config)
    sd = dict(good.state_dict())
    n = base.config.n_embd
    w = sd["transformer.h.0.attn.c_attn.weight"].clone()
    w[:, 2 * n:] = w[:, 2 * n:].roll(n // base.config.n_head, dims=1)  # V heads moved, Q/K not
    sd["transformer.h.0.attn.c_attn.weight"] = w
    broken.load_state_dict(sd)
    assert _same_function(good, base, x) < TOL
    assert _same_function(broken.eval(), base, x) > 100 * TOL


@pytest.mark.parametrize("kind", KINDS)
def test_self_fusion_returns_the_model(kind):
    base = gpt2(kind, seed=2)
    x = _inputs(base)
    for solver in ("emd", "sinkhorn"):
        fused = otcompress.fuse(base, [base], solver=solver, reg=0.005, cost_norm="gap")
        assert _err(fused, x, base) < 1e-4


def test_the_tied_head_stays_tied_through_heterogeneous_fusion(tmp_path):
    small = gpt2("tied", hidden=16, heads=2, inner=24, seed=1)
    wide = [gpt2("tied", hidden=32, heads=4, inner=48, seed=s) for s in (2, 3)]
    for alignment, data in (("weights", None), ("activations", _inputs(small, batch=6)), ("fold", None)):
        fused = otcompress.fuse(small, wide, alignment=alignment, data=data)
        assert fused.lm_head.weight.data_ptr() == fused.transformer.wte.weight.data_ptr()
        fused.save_pretrained(tmp_path / alignment)
        back = T.GPT2LMHeadModel.from_pretrained(tmp_path / alignment)
        assert back.config.n_embd == 16 and back.config.n_head == 2
        assert torch.equal(back.lm_head.weight, back.transformer.wte.weight)
        assert torch.allclose(M.outputs(back, _inputs(back)), M.outputs(fused, _inputs(back)), atol=1e-5)


def test_heterogeneous_head_widths_and_untied_heads(tmp_path):
    """Wider heads in the parents (head width 8 vs 4): Q is rescaled; an untied
    head reads the final map."""
    small = gpt2("untied", hidden=16, heads=4, inner=24, seed=1)
    wide = gpt2("untied", hidden=64, heads=8, inner=96, seed=2)
    fused = otcompress.fuse(small, [wide], alignment="activations", data=_inputs(small, batch=6))
    fused.save_pretrained(tmp_path / "f")
    back = T.GPT2LMHeadModel.from_pretrained(tmp_path / "f")
    assert back.lm_head.weight.data_ptr() != back.transformer.wte.weight.data_ptr()
    assert torch.isfinite(M.outputs(back, _inputs(back))).all()


def test_spec_knows_every_parameter_and_the_tie():
    for kind in KINDS:
        model = gpt2(kind)
        spec = architectures.build_spec(model)
        assert set(model.state_dict()) == set(spec.axes) | set(spec.tied)
        assert bool(spec.tied) == (kind == "tied")


def test_tied_and_untied_models_do_not_mix():
    from otcompress.errors import IncompatibleModelsError
    with pytest.raises(IncompatibleModelsError, match="tie_word_embeddings"):
        otcompress.fuse(gpt2("tied"), [gpt2("untied", seed=1)])


def test_fold_recovers_the_original():
    for kind in ("bare", "untied"):
        base = gpt2(kind, seed=4)
        anchor, x = M.noisy(base, scale=0.5), _inputs(base)
        fused = otcompress.fuse(anchor, [variant(base, widen=True), variant(base, widen=False, seed=3)],
                                alignment="fold", solver="emd")
        assert _same_function(fused, base, x) < TOL


def test_another_activation_is_refused():
    from otcompress.errors import IncompatibleModelsError
    anchor = gpt2("untied")
    cfg = T.GPT2Config.from_dict(anchor.config.to_dict())
    cfg.activation_function = "relu"
    with pytest.raises(IncompatibleModelsError, match="activation_function"):
        otcompress.fuse(anchor, [T.GPT2LMHeadModel(cfg)])


def test_fold_into_a_narrower_mlp_with_intermediate(tmp_path):
    """--intermediate on GPT-2, whose n_inner may be unset (4 x n_embd)."""
    from otcompress.errors import IncompatibleModelsError
    parent = gpt2("tied", inner=None, seed=6)
    assert parent.config.n_inner is None and parent.transformer.h[0].mlp.c_fc.weight.shape[1] == 128
    assert "intermediate 128" in architectures.describe_widths(parent.config)
    with pytest.raises(IncompatibleModelsError, match=r"\(intermediate 128\) into a wider target"):
        architectures.check_fold_target(architectures.target_config(parent.config, intermediate=200),
                                        [parent.config])
    target = architectures.target_config(parent.config, intermediate=40)
    fused = otcompress.fuse(target, [parent], alignment="fold")
    fused.save_pretrained(tmp_path / "f")
    back = T.GPT2LMHeadModel.from_pretrained(tmp_path / "f")
    assert back.config.n_inner == 40 and back.config.n_embd == 32
    assert all(block.mlp.c_fc.weight.shape == (32, 40) for block in back.transformer.h)
    assert torch.equal(back.lm_head.weight, back.transformer.wte.weight)
    assert torch.isfinite(M.outputs(back, _inputs(back))).all()


@pytest.mark.parametrize("kind", ["bare", "untied"])
def test_fold_a_widened_model_into_the_original_widths(kind):
    base = gpt2(kind, seed=4)
    x = _inputs(base)
    wide = variant(base, widen=True)
    n, h, inner = base.config.n_embd, base.config.n_head, base.config.n_inner
    target = architectures.target_config(wide.config, hidden=n, heads=h, intermediate=inner)
    assert (target.n_embd, target.n_head, target.n_inner) == (n, h, inner) != (wide.config.n_inner,) * 3
    fused = otcompress.fuse(target, [wide], alignment="fold", solver="emd")
    assert getattr(fused, "transformer", fused).h[0].mlp.c_fc.weight.shape == (n, inner)
    assert _same_function(fused, base, x) < TOL
