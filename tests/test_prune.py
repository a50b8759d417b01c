"""Pruning as a transport map (alignment="prune") and importance-weighted
folding recover known answers.

The known answer: a Net2Net-style 2x widening of a base model where every
unit's copy is *dead* (its outgoing weights are zero) computes the base's
function exactly, and the right pruning keeps the originals: the pruned model
is the base itself. An importance that cannot tell a dead copy from its
original (incoming weights alone: both are equal) picks a dead unit about
half of the time and fails. The anchor is the base plus large noise, so a
fusion that returned or mixed in the anchor fails too."""
import re

import pytest
import torch
import transformers as T

import models as M
import otcompress
from otcompress import fold

TOL = 1e-5
ids = lambda v: getattr(v, "__name__", "")  # noqa: E731
# (A tied masked-LM head reads the residual stream with the embedding table
# itself, so its dead copies cannot have zero outgoing weights: not here.)
CASES = [(M.vit, T.ViTForImageClassification), (M.vit, T.ViTModel),
         (M.bert, T.BertForSequenceClassification), (M.bert, T.BertModel)]


def _err(model, x, base):
    ref = M.outputs(base, x)
    return float((M.outputs(model, x) - ref).abs().max() / ref.abs().max().clamp_min(1))


@torch.no_grad()
def widen_dead(model, seed=3):
    """Every unit twice (residual, heads, MLP, pooler): the first copy keeps
    the original's weights, the second has its incoming weights (rows) too,
    but zero outgoing weights (columns). Duplicating every residual unit
    keeps LayerNorm statistics, so the function is the base's. The copies are
    put first in a random half of the positions, so keeping "the first
    half" is not the answer either."""
    cfg = model.config
    g = torch.Generator().manual_seed(seed)
    n, h, inter = cfg.hidden_size, cfg.num_attention_heads, cfg.intermediate_size
    d = n // h

    def pairs(k, unit=1):  # (index of the source unit, alive?) per new position, in blocks of `unit`
        src, alive = [], []
        for b in range(k // unit):
            first_dead = bool(torch.rand(1, generator=g) < 0.5)
            for dead in (first_dead, not first_dead):
                src += list(range(b * unit, (b + 1) * unit))
                alive += [not dead] * unit
        return torch.tensor(src), torch.tensor(alive)
    spaces = {"res": pairs(n), "qk": pairs(n, d), "v": pairs(n, d), "mlp": pairs(inter), "pool": pairs(n)}
    # Q/K and V of a head must move together: one head order for both.
    spaces["v"] = (spaces["qk"][0], spaces["qk"][1])
    return _rebuild(model, spaces, heads=2 * h)


def _rebuild(model, spaces, heads, dead_rows=lambda name, space: False, extra=lambda name, t: t):
    """A copy twice as wide: every axis of `space` indexed by spaces[space]
    = (source units, alive); outgoing ("in") axes of dead units are zeroed,
    and rows too where `dead_rows(name, space)`; `extra(name, t)` last."""
    cfg = model.config
    new_cfg = type(cfg).from_dict(cfg.to_dict())
    new_cfg.hidden_size, new_cfg.num_attention_heads = 2 * cfg.hidden_size, heads
    new_cfg.intermediate_size *= 2
    if getattr(new_cfg, "pooler_output_size", None):
        new_cfg.pooler_output_size *= 2
    sd = {}
    for name, t in model.state_dict().items():
        for axis, role in enumerate(M.roles(name, cfg.model_type)):
            if role is None:
                continue
            space, kind = role
            src, alive = spaces[space]
            t = t.index_select(axis, src)
            if kind == "in" or dead_rows(name, space):
                t = t * alive.view([-1 if a == axis else 1 for a in range(t.dim())]).to(t.dtype)
        sd[name] = extra(name, t)
    out = type(model)(new_cfg)
    out.load_state_dict(sd)
    return out.eval()


@pytest.mark.parametrize("make,cls", CASES, ids=ids)
def test_prune_dead_copies_recovers_the_original(make, cls):
    base = make(cls=cls)
    anchor, x = M.noisy(base, scale=0.5), M.inputs(base)
    parent = widen_dead(base)
    headless = not (hasattr(parent, "classifier") or hasattr(parent, "cls"))
    if not headless:  # (headless: the parent's hidden states are twice as wide)
        assert _err(parent, x, base) < TOL  # the widened copy computes the base's function
    assert _err(anchor, x, base) > 100 * TOL  # the test can fail
    pruned = otcompress.fuse(anchor, [parent], alignment="prune")
    assert pruned.config.hidden_size == base.config.hidden_size
    assert _err(pruned, x, base) < TOL
    for name, t in base.state_dict().items():  # kept units in their original order: the base itself
        if headless and name.startswith("pooler"):  # its outputs are the model's: no copy is dead
            continue
        assert torch.allclose(pruned.state_dict()[name], t, atol=1e-6), name
    maps = pruned.fusion_report["transport_maps"][0]
    assert any(s.get("method") == "prune" for s in maps.values())


def test_incoming_magnitude_alone_cannot_tell_dead_copies(monkeypatch):
    """The same test fails when importance ignores what reads a unit."""
    base = M.bert(cls=T.BertForSequenceClassification)
    x = M.inputs(base)
    monkeypatch.setattr(fold, "importance", lambda in_rows, out_rows: fold.norms(in_rows))
    pruned = otcompress.fuse(M.noisy(base, scale=0.5), [widen_dead(base)], alignment="prune")
    assert _err(pruned, x, base) > 1e-3


@torch.no_grad()
def widen_head_dim_dead(model):
    """Heads twice as wide (same count): inside each head the base's units,
    then copies whose Q rows are zero (they add nothing to any score) and
    whose O columns are zero; Q scaled by sqrt(2), since the softmax scale
    1/sqrt(head_dim) shrinks by that much. Residual and MLP units twice, the
    second copy dead. The same function as the base."""
    cfg = model.config
    n, h, inter = cfg.hidden_size, cfg.num_attention_heads, cfg.intermediate_size
    d = n // h
    per_head = torch.cat([torch.arange(j * d, (j + 1) * d).repeat(2) for j in range(h)])
    head_alive = torch.cat([torch.tensor([True] * d + [False] * d) for _ in range(h)])
    tile = lambda k: (torch.arange(k).repeat(2), torch.arange(2 * k) < k)  # noqa: E731
    spaces = {"res": tile(n), "qk": (per_head, head_alive), "v": (per_head, head_alive), "mlp": tile(inter),
              "pool": tile(n)}
    query = lambda name: bool(re.search(r"(q_proj|query)\.(weight|bias)$", name))  # noqa: E731
    return _rebuild(model, spaces, heads=h, dead_rows=lambda name, space: query(name) and space == "qk",
                    extra=lambda name, t: t * 2 ** 0.5 if query(name) else t)


@pytest.mark.parametrize("make,cls", [CASES[0], CASES[2]], ids=ids)
def test_prune_inside_heads_rescales_q_for_the_narrower_head(make, cls):
    """Keeping d of 2d units in a head: a score then sums the kept products,
    so Q is carried with sqrt(d / 2d) (folding's sqrt(2d / d) would double
    every score here)."""
    base = make(cls=cls)
    x = M.inputs(base)
    parent = widen_head_dim_dead(base)
    assert _err(parent, x, base) < TOL
    pruned = otcompress.fuse(M.noisy(base, scale=0.5), [parent], alignment="prune")
    assert _err(pruned, x, base) < TOL


def _family_models():
    """(parent, target config) per family: ViT, BERT, LLaMA with grouped-query
    attention (tied head), GPT-2 (tied head)."""
    from test_decoders import decoder
    from test_gpt2 import gpt2
    from otcompress import architectures as A
    return {
        "vit": (M.vit(hidden=32, heads=4, inter=64), dict(hidden=16, heads=2, intermediate=24)),
        "bert": (M.bert(cls=T.BertForMaskedLM), dict(hidden=16, heads=4, intermediate=24)),
        "llama-gqa": (decoder(T.LlamaConfig, T.LlamaForCausalLM, hidden=32, heads=4, kv=2, inter=48, tie=True),
                      dict(hidden=16, heads=2, intermediate=24)),
        "gpt2": (gpt2("tied"), dict(hidden=16, heads=2, intermediate=24)),
    }, A


@pytest.mark.parametrize("family", ["vit", "bert", "llama-gqa", "gpt2"])
def test_pruned_model_saves_loads_and_exports(tmp_path, family):
    from otcompress.export import export_onnx
    models, A = _family_models()
    parent, widths = models[family]
    target = A.target_config(parent.config, **widths)
    if family == "llama-gqa":
        target.num_key_value_heads = 1
    pruned = otcompress.fuse(target, [parent], alignment="prune")
    parent.save_pretrained(tmp_path / "parent")  # streamed: read tensor by tensor, written as it goes
    report = otcompress.fusion.fuse_to_disk(target, [tmp_path / "parent"], tmp_path / "disk", alignment="prune")
    assert report["options"]["alignment"] == "prune"
    pruned.save_pretrained(tmp_path / "mem")
    back = type(parent).from_pretrained(tmp_path / "mem")
    streamed = type(parent).from_pretrained(tmp_path / "disk")
    for name, t in back.state_dict().items():  # every tensor has the target's shape
        assert t.shape == type(parent)(target).state_dict()[name].shape, name
        assert torch.equal(t, streamed.state_dict()[name]), name
    assert A.resolved_widths(back.config) == A.resolved_widths(target)
    x = M.inputs(back) if family in ("vit", "bert") else {"input_ids": torch.randint(0, 60, (2, 7))}
    assert torch.isfinite(M.outputs(back, x)).all()
    assert export_onnx(back, tmp_path / "pruned.onnx")["max_abs_diff"] < 1e-4


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("alignment", ["prune", "fold"])
def test_prune_and_weighted_fold_on_cuda(alignment):
    base = M.bert(cls=T.BertForSequenceClassification)
    parent = widen_dead(base) if alignment == "prune" else M.transform(base, widen=True)
    fused = otcompress.fuse(M.noisy(base, scale=0.5).cuda(), [parent.cuda()], alignment=alignment)
    assert next(fused.parameters()).is_cuda
    assert _err(fused.cpu(), M.inputs(base), base) < TOL
