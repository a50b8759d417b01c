"""Least-squares reconstruction (reconstruct.py) recovers known answers.

1. Refitting in flow-graph order: a model whose every refittable layer was
   perturbed, refitted to the original's outputs, *is* the original again
   (each layer is measured after the ones before it are refitted; a refit
   from inputs captured up front fits later layers to the perturbed inputs
   and fails).
2. Through the engine: a parent whose every MLP unit is duplicated, the copy
   reading 5% of what the unit wrote (the original 95%), computes the base's
   function; pruning it keeps the 95% copies, so the pruned model's MLP
   writes 95% of the base's, and reconstruction (targets carried through the
   pruning maps) restores the base. The target is a bare config: no anchor
   weights to return.
3. The race: a fold that already leads the anchor one-shot is not raced."""
import copy

import pytest
import torch
import transformers as T

import models as M
import otcompress
from otcompress import pipeline, reconstruct
from otcompress.architectures import build_spec
from otcompress.data import load_data
from otcompress.errors import InvalidOptionError, UnsupportedArchitectureError
from otcompress.finetune import finetune
from test_decoders import decoder

ids = lambda v: getattr(v, "__name__", "")  # noqa: E731


def _batches(model, n=4):
    return [M.inputs(model, batch=8, seed=s) for s in range(n)]


def _err(model, data, base):
    ref = torch.cat([M.outputs(base, x).flatten() for x in data])
    got = torch.cat([M.outputs(model, x).flatten() for x in data])
    return float((got - ref).abs().max() / ref.abs().max())


def _models():
    return {"vit": lambda: M.vit(), "bert": lambda: M.bert(cls=T.BertForSequenceClassification),
            "gpt2": lambda: T.GPT2LMHeadModel(T.GPT2Config(vocab_size=60, n_embd=32, n_layer=2, n_head=4,
                                                          n_positions=32)).eval(),
            "llama": lambda: decoder(T.LlamaConfig, T.LlamaForCausalLM)}


@pytest.mark.parametrize("family", ["vit", "bert", "gpt2", "llama"])
def test_refitting_in_flow_graph_order_recovers_a_perturbed_model(family, monkeypatch):
    monkeypatch.setattr(reconstruct, "RIDGE", 1e-10)
    base = _models()[family]()
    points = reconstruct.points(build_spec(base))
    assert len(points) >= 8  # every block's linear layers (GPT-2: all but the fused QKV)
    data = _batches(base)
    bent = copy.deepcopy(base)
    named = dict(bent.named_modules())
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for m in points:
            w = named[m].weight
            w.add_(0.3 * w.std() * torch.randn(w.shape, generator=g))
    assert _err(bent, data, base) > 1e-2  # the test can fail
    summary = reconstruct.reconstruct(bent, reconstruct.measure(base, points, data), data, points)
    assert _err(bent, data, base) < 1e-4
    assert summary["relative_error"]["after"] < 1e-8 < summary["relative_error"]["before"]
    # (The weights need not come back: a layer read from a LayerNorm sees inputs
    # of rank one less than its width, so one direction of its rows is free.)


def test_ridge_fit_is_exact_without_ridge_and_pulled_to_w0_with_it():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 6, generator=g, dtype=torch.float64)
    w_true, b_true = torch.randn(3, 6, generator=g, dtype=torch.float64), torch.randn(3, dtype=torch.float64)
    y = x @ w_true.T + b_true
    w0 = torch.zeros(3, 6, dtype=torch.float64)
    w, b = reconstruct.ridge_fit(x, y, w0, torch.zeros(3, dtype=torch.float64), ridge=0.0)
    assert torch.allclose(w, w_true) and torch.allclose(b, b_true)
    w, b = reconstruct.ridge_fit(x, y, w0, None, ridge=0.0)  # no bias: no intercept
    assert b is None and not torch.allclose(w, w_true, atol=1e-2)
    w_big, _ = reconstruct.ridge_fit(x, y, w0, torch.zeros(3, dtype=torch.float64), ridge=1e3)
    assert w_big.abs().max() < 0.05 * w_true.abs().max()  # a large ridge stays at w0


@torch.no_grad()
def split_mlp(model, share=0.95):
    """Every MLP unit twice: both copies compute the unit, the first writes
    `share` of what it wrote, the second the rest. The base's function."""
    cfg = model.config
    inter = cfg.intermediate_size
    src = torch.arange(inter).repeat(2)
    scale = torch.cat([torch.full((inter,), share), torch.full((inter,), 1 - share)])
    new_cfg = type(cfg).from_dict({**cfg.to_dict(), "intermediate_size": 2 * inter})
    sd = {}
    for name, t in model.state_dict().items():
        for axis, role in enumerate(M.roles(name, cfg.model_type)):
            if role is not None and role[0] == "mlp":
                t = t.index_select(axis, src)
                if role[1] == "in":
                    t = t * scale.view([-1 if a == axis else 1 for a in range(t.dim())]).to(t.dtype)
        sd[name] = t
    out = type(model)(new_cfg)
    out.load_state_dict(sd)
    return out.eval()


@pytest.mark.parametrize("make", [M.vit, lambda: M.bert(cls=T.BertForSequenceClassification)], ids=["vit", "bert"])
def test_prune_then_reconstruct_recovers_the_base(make, monkeypatch):
    base = make()
    data = _batches(base)
    parent = split_mlp(base)
    assert _err(parent, data, base) < 1e-5  # the split copy computes the base's function
    pruned = otcompress.fuse(base.config, [parent], alignment="prune", data=data)
    plain = _err(pruned, data, base)
    assert plain > 1e-2  # the kept copies write 95%: the test can fail
    refit = otcompress.fuse(base.config, [parent], alignment="prune", data=data, reconstruct=True)
    assert _err(refit, data, base) < plain / 10  # at the default ridge
    assert refit.fusion_report["reconstruct"]["modules"] == len(reconstruct.points(build_spec(base)))
    assert refit.fusion_report["options"]["reconstruct"] is True
    monkeypatch.setattr(reconstruct, "RIDGE", 1e-10)
    exact = otcompress.fuse(base.config, [parent], alignment="prune", data=data, reconstruct=True)
    assert _err(exact, data, base) < 1e-4


def test_reconstruct_needs_data():
    base = M.vit()
    with pytest.raises(InvalidOptionError, match="reconstruct.*data"):
        otcompress.fuse(base.config, [M.vit(hidden=64, heads=8, inter=128)], alignment="fold", reconstruct=True)


def test_a_fold_that_leads_one_shot_is_not_raced():
    """Each parent pruned (or folded) of dead-copy widenings of a trained base is that base: far
    ahead of an untrained anchor one-shot, so it trains all N steps and no
    race step is spent. With finetuning, a parent's start is its prune
    (`pipeline.candidates`), made from the parent with the lower held-out loss."""
    from test_prune import widen_dead
    digits = load_data("digits", M.vit(hidden=16, heads=2, inter=32))
    base = M.vit(hidden=16, heads=2, inter=32, seed=4)
    finetune(base, digits, steps=60, lr=3e-3, batch_size=64, seed=0)
    base.eval()
    anchor = M.vit(hidden=16, heads=2, inter=32, seed=1)
    parents = [widen_dead(base, seed=s) for s in (3, 4)]
    recipe = {"finetune_steps": 10, "batch_size": 32, "samples": 64}
    model, report = pipeline.run(anchor, parents, recipe, data=digits)
    race = report["race"]
    rows = {c["candidate"]: c for c in race["candidates"]}
    best = race["single_parent_starts_from"]
    assert not any(name.startswith("fold: parent") for name in rows)
    assert rows[f"prune: parent {best}"]["one_shot_holdout_loss"] < rows["anchor"]["one_shot_holdout_loss"]
    assert rows[race["winner"]]["group"] == "fold" and race["extra_steps"] == 0 and race["steps_each"] == 0
    assert "ahead of every anchor-side start" in race["note"]
    assert not any("holdout_loss" in c for c in race["candidates"])  # nothing trained in a race
    assert report["finetune"]["steps"] == 10


def test_the_workflow_reconstructs_where_it_measured_better():
    """auto: on with data, an embedding model too (a start that its lr
    undoes restarts at a tenth of it: test_pipeline); on/off as given; never
    without data. A YAML profile's bare on/off (read as a bool) is the same."""
    labelled = load_data("digits", M.vit(hidden=16, heads=2, inter=32))
    headless = load_data("digits", M.vit(hidden=16, heads=2, inter=32, cls=T.ViTModel))
    assert headless.task == "feature-extraction" and labelled.task != "feature-extraction"
    r = lambda v, steps: {"reconstruct": v, "finetune_steps": steps}  # noqa: E731
    assert pipeline.reconstructs(r("auto", 10), labelled) and pipeline.reconstructs(r("auto", 0), headless)
    assert pipeline.reconstructs(r("auto", 10), headless) and not pipeline.reconstructs(r("off", 10), headless)
    assert not pipeline.reconstructs(r("off", 0), labelled) and not pipeline.reconstructs(r("on", 0), None)
    from otcompress import recipes
    assert recipes.check_recipe({"reconstruct": False})["reconstruct"] == "off"
    with pytest.raises(InvalidOptionError, match="reconstruct"):
        recipes.check_recipe({"reconstruct": "yes"})


def test_reconstruct_follows_a_depth_map(monkeypatch):
    """The split-MLP parent made deeper by identity blocks: depth-mapped to
    the base's depth, pruned and reconstructed, it is the base again."""
    from test_depth import DEEP, deepen
    monkeypatch.setattr(reconstruct, "RIDGE", 1e-10)
    base = M.vit()
    data = _batches(base)
    parent = deepen(split_mlp(base), DEEP)
    assert parent.config.num_hidden_layers == 4 and _err(parent, data, base) < 1e-5
    fused = otcompress.fuse(base.config, [parent], alignment="prune", data=data, reconstruct=True)
    assert fused.fusion_report["depth_maps"][0]["kept"] == [0, 3]
    assert _err(fused, data, base) < 1e-4


def test_a_target_block_without_a_residual_writer_is_a_clear_error(monkeypatch):
    """A family whose block had no refitted residual writer could not carry
    the dropped blocks' change: one line, not a KeyError."""
    from test_depth import DEEP, deepen
    base = M.vit()
    parent = deepen(split_mlp(base), DEEP)
    joins = reconstruct._joins
    monkeypatch.setattr(reconstruct, "_joins", lambda spec, modules: {
        b: j for b, j in joins(spec, modules).items() if b != 1})
    with pytest.raises(UnsupportedArchitectureError, match="target block 1 has no refitted residual writer"):
        otcompress.fuse(base.config, [parent], alignment="prune", data=_batches(base), reconstruct=True)


def test_a_deeper_parent_in_train_mode_is_measured_without_dropout():
    """The given (deeper) parent is what the depth map scores and what
    reconstruction measures its targets on: dropout must be off there as for
    every model the engine reads, and the caller's mode comes back."""
    from test_depth import deepen
    base = M.bert(cls=T.BertForSequenceClassification)
    parent = deepen(base, ["base", "id", "base"])
    for m in parent.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.3
    data = [M.inputs(base, batch=8, seed=s) for s in range(4)]

    def fused(training):
        parent.train(training)
        out = otcompress.fuse(base.config, [parent], alignment="prune", data=data, reconstruct=True)
        assert parent.training == training
        return torch.cat([p.flatten() for p in out.parameters()])
    ref = fused(False)
    assert torch.equal(fused(True), ref) and torch.equal(fused(True), ref)


def test_fuse_to_disk_writes_the_reconstructed_model(tmp_path):
    base = M.vit()
    data = _batches(base)
    parent = split_mlp(base)
    parent.save_pretrained(tmp_path / "parent")
    kw = dict(alignment="prune", data=data, reconstruct=True)
    report = otcompress.fuse_to_disk(base.config, [str(tmp_path / "parent")], tmp_path / "out", **kw)
    assert report["reconstruct"]["modules"] > 0
    written = T.ViTForImageClassification.from_pretrained(tmp_path / "out").eval()
    in_memory = otcompress.fuse(base.config, [parent], **kw)
    assert _err(written, data, in_memory) < 1e-6


def test_the_model_card_says_what_reconstruction_did(tmp_path):
    digits = load_data("digits", M.vit(hidden=16, heads=2, inter=32))
    parents = [M.vit(hidden=32, heads=4, inter=64, seed=s) for s in (2, 3)]
    _, report = pipeline.run(None, parents, {"finetune_steps": 0, "samples": 64}, tmp_path / "out",
                             target={"hidden": 16, "heads": 2, "intermediate": 32}, data=digits)
    card = (tmp_path / "out" / "README.md").read_text()
    assert report["reconstruct"]["modules"] > 0
    assert f"reconstruction: {report['reconstruct']['modules']} layers refitted" in card


def _tokens(model, seed):
    ids = torch.randint(0, model.config.vocab_size, (8, 12), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


@torch.no_grad()
def _deepened(base, layout, shift=None):
    """`test_depth.deepen`, then each inserted block's writers' biases set to
    random vectors of norm ~`shift`: such a block adds a constant to the stream."""
    import re
    from test_depth import LAYOUT, deepen
    parent = deepen(base, layout)
    block, writer = LAYOUT[parent.config.model_type]
    g = torch.Generator().manual_seed(1)
    for name, p in parent.named_parameters():
        m = re.match(block, name)
        if shift and m and layout[int(m.group(2))] == "id" and re.search(writer, name) and name.endswith("bias"):
            p.copy_(shift * torch.randn(p.shape, generator=g))
    return parent


@pytest.mark.parametrize("family", ["vit", "gpt2"])
def test_the_last_writer_absorbs_the_blocks_dropped_after_it(family, monkeypatch):
    """A pre-norm parent whose dropped last block adds a constant to the
    stream: the kept block's MLP writer absorbs it (its bias), so the
    shallower model computes the deeper parent's function; refitted to the
    truncated parent's own outputs instead, it would be off by the constant."""
    from otcompress import depth
    monkeypatch.setattr(reconstruct, "RIDGE", 1e-10)
    import test_gpt2
    base = M.vit() if family == "vit" else test_gpt2.gpt2("untied")  # sharpened weights: every block matters
    data = _batches(base, 8) if family == "vit" else [_tokens(base, s) for s in range(8)]
    parent = _deepened(base, ["base", "base", "id"], shift=0.05)
    fused = otcompress.fuse(base.config, [parent], alignment="prune", data=data, reconstruct=True)
    dmap = fused.fusion_report["depth_maps"][0]
    assert dmap["kept"] == [0, 1]
    truncated = depth.apply(parent, depth.DepthMap(3, dmap["groups"], dmap["kept"], dmap["influence"], "activations"))
    assert _err(truncated, data, parent) > 1e-2
    assert _err(fused, data, parent) < 1e-5


def test_the_first_writer_absorbs_the_blocks_dropped_before_it_post_norm(monkeypatch):
    """Post-norm BERT: a dropped middle block (random weights, zero writers)
    still changes the stream (its norms). The kept block's attention writer
    carries that change, so the join after it sees the parent's stream: the
    output is far closer to the parent's than the truncated parent's is."""
    from otcompress import depth
    monkeypatch.setattr(reconstruct, "RIDGE", 1e-10)
    base = _models()["bert"]()
    data = _batches(base, 8)
    parent = _deepened(base, ["base", "id", "base"])
    fused = otcompress.fuse(base.config, [parent], alignment="prune", data=data, reconstruct=True)
    dmap = fused.fusion_report["depth_maps"][0]
    assert dmap["kept"] == [0, 2]
    truncated = depth.apply(parent, depth.DepthMap(3, dmap["groups"], dmap["kept"], dmap["influence"], "activations"))
    assert _err(fused, data, parent) < 0.5 * _err(truncated, data, parent)


@pytest.mark.parametrize("family", ["vit", "bert", "gpt2", "llama", "qwen2"])
def test_block_by_block_capture_equals_running_the_whole_model(family, monkeypatch):
    """A layer inside block i is measured by running block i alone on its
    cached (already refitted) input: the refit is the one the whole model's
    forward passes give, in every family (Qwen2: per-layer masks; decoders:
    no key/value cache grows)."""
    make = {**_models(), "qwen2": lambda: decoder(T.Qwen2Config, T.Qwen2ForCausalLM)}[family]
    base = make()
    points = reconstruct.points(build_spec(base))
    data = _batches(base) if family in ("vit", "bert") else [_tokens(base, s) for s in range(4)]
    bent = copy.deepcopy(base)
    named = dict(bent.named_modules())
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for m in points:
            named[m].weight.add_(0.3 * named[m].weight.std() * torch.randn(named[m].weight.shape, generator=g))
    targets = reconstruct.measure(base, points, data)
    runs = []
    real = reconstruct._BlockInputs.capture
    monkeypatch.setattr(reconstruct._BlockInputs, "capture", lambda *a: runs.append(1) or real(*a))
    by_block = copy.deepcopy(bent)
    reconstruct.reconstruct(by_block, targets, data, points)
    assert len(runs) >= 2 * base.config.num_hidden_layers  # the block path ran
    monkeypatch.setattr(reconstruct, "_block_index", lambda model, module: None)
    whole = copy.deepcopy(bent)
    reconstruct.reconstruct(whole, targets, data, points)
    for (name, a), (_, b) in zip(by_block.named_parameters(), whole.named_parameters()):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6), name
