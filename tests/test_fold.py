"""Folding, wider heads and statistics repair recover known answers.

Folding never reads the anchor's weights, so the anchor here is the base
plus large noise: a fold that returned the anchor (or averaged it in) fails.
The right answer of folding an exactly equivalent wider copy of the base is
the base itself. Headless models output hidden states in the fold's own unit
order, so they are compared sorted along the unit axis."""
import pytest
import torch
import transformers as T

import models as M
import otcompress
from otcompress import architectures, fold, repair
from otcompress.align import HeadShapes
from otcompress.errors import IncompatibleModelsError, InvalidOptionError

TOL = 1e-5
CASES = [(M.vit, T.ViTForImageClassification), (M.vit, T.ViTModel),
         (M.bert, T.BertForSequenceClassification), (M.bert, T.BertModel)]
ids = lambda v: getattr(v, "__name__", "")  # noqa: E731


def _out(model, x):
    y = M.outputs(model, x)
    return y if getattr(model.config, "num_labels", 0) and hasattr(model, "classifier") else y.sort(-1).values


def _err(model, x, base):
    """Largest output difference, relative to the output scale (float32 sums)."""
    ref = _out(base, x)
    return float((_out(model, x) - ref).abs().max() / ref.abs().max().clamp_min(1))


def _far(anchor, x, base):
    assert _err(anchor, x, base) > 100 * TOL  # the test can fail


@pytest.mark.parametrize("make,cls", CASES, ids=ids)
def test_fold_widened_copy_recovers_the_original(make, cls):
    base = make(cls=cls)
    anchor, x = M.noisy(base, scale=0.5), M.inputs(base)
    _far(anchor, x, base)
    fused = otcompress.fuse(anchor, [M.transform(base, widen=True)], alignment="fold")
    assert fused.config.hidden_size == base.config.hidden_size
    assert _err(fused, x, base) < TOL
    assert fused.fusion_report["transport_maps"][0]["emb"]["method"] == "fold"


@pytest.mark.parametrize("make,cls", CASES[::2], ids=ids)
def test_fold_into_same_width_is_permutation_recovery(make, cls):
    base = make(cls=cls)
    anchor, x = M.noisy(base, scale=0.5), M.inputs(base)
    fused = otcompress.fuse(anchor, [M.transform(base, widen=False, seed=5)], alignment="fold")
    assert _err(fused, x, base) < TOL


@pytest.mark.parametrize("solver", ["emd", "sinkhorn"])
def test_fold_several_parents_then_fuse_the_folds(solver):
    base = M.bert(cls=T.BertForSequenceClassification)
    anchor, x = M.noisy(base, scale=0.5), M.inputs(base)
    parents = [M.transform(base, widen=True, seed=1), M.transform(base, widen=False, seed=2),
               M.widen_head_dim(base)]
    fused = otcompress.fuse(anchor, parents, alignment="fold", solver=solver, reg=0.002)
    assert _err(fused, x, base) < (TOL if solver == "emd" else 1e-4)


def test_fold_to_a_target_config():
    base = M.vit()
    wide = M.transform(base, widen=True)
    target = architectures.target_config(wide.config, hidden=32, heads=4, intermediate=64)
    fused = otcompress.fuse(target, [wide], alignment="fold")
    assert type(fused) is type(wide) and fused.config.hidden_size == 32
    assert _err(fused, M.inputs(base), base) < TOL
    assert fused.fusion_report["anchor"].startswith("target hidden 32")


def test_fold_refuses_a_wider_target():
    small, big = M.vit(hidden=16, heads=2, inter=32), M.vit()
    with pytest.raises(IncompatibleModelsError, match="cannot fold"):
        otcompress.fuse(big, [small], alignment="fold")
    with pytest.raises(InvalidOptionError, match="residual"):
        otcompress.fuse(big, [small], alignment="fold", residual="scalar", data=M.inputs(big))


@pytest.mark.parametrize("make", [M.vit, M.bert], ids=ids)
@pytest.mark.parametrize("alignment", ["weights", "activations", "fold"])
def test_wider_heads_recover(make, alignment):
    """A parent with heads twice as wide (same count, Q rescaled so it computes
    the base's function): Q must be carried with the softmax scale."""
    base = make(cls=T.ViTForImageClassification if make is M.vit else T.BertForSequenceClassification)
    anchor, x = M.noisy(base), M.inputs(base)
    wide = M.widen_head_dim(base)
    assert _err(wide, x, base) < TOL
    fused = otcompress.fuse(anchor, [wide], solver="emd", alignment=alignment,
                            data=M.inputs(base, batch=16, seed=3))
    expected = base if alignment == "fold" else M.average([anchor, base])
    assert _err(fused, x, expected) < TOL


def test_ignoring_the_softmax_scale_is_caught(monkeypatch):
    base = M.vit()
    anchor, x = M.noisy(base), M.inputs(base)
    monkeypatch.setattr(HeadShapes, "score_scale", property(lambda self: 1.0))
    fused = otcompress.fuse(anchor, [M.widen_head_dim(base)], solver="emd")
    assert _err(fused, x, M.average([anchor, base])) > 1e-3


def _unit_stats(model, modules, data):
    """Per-unit mean and std of each module's output, measured here with
    plain hooks (independently of repair.measure)."""
    got, named = {}, dict(model.named_modules())
    handles = [named[m].register_forward_hook(
        lambda mod, a, out, m=m: got.setdefault(m, []).append(out.reshape(-1, out.shape[-1])))
        for m in modules]
    with torch.no_grad():
        for b in data:
            model(**b)
    for h in handles:
        h.remove()
    return {m: (torch.cat(v).double().mean(0), torch.cat(v).double().std(0, unbiased=False))
            for m, v in got.items()}


@pytest.mark.parametrize("make,cls", CASES[::2], ids=ids)
def test_repair_restores_the_target_statistics(make, cls):
    """Anchor A and a widened copy of B, weights 1/2 each: after repair every
    unit's mean and std equal the average of A's and B's (B's carried through
    the recovered maps)."""
    base = make(cls=cls)
    anchor = M.noisy(base, scale=0.3)
    calib = [{k: v for k, v in M.inputs(base, batch=16, seed=s).items() if k != "attention_mask"}
             for s in (3, 4)]
    modules = list(repair.points(architectures.build_spec(anchor)))
    target = {m: [(a + b) / 2 for a, b in zip(sa, sb)] for (m, sa), sb in
              zip(_unit_stats(anchor, modules, calib).items(), _unit_stats(base, modules, calib).values())}
    wide = M.transform(base, widen=True)

    def worst(model):
        got = _unit_stats(model, modules, calib)
        return max(float((g - t).abs().max()) for m in modules for g, t in zip(got[m], target[m]))
    assert worst(otcompress.fuse(anchor, [wide], solver="emd")) > 1e-2  # repair has work to do
    fused = otcompress.fuse(anchor, [wide], solver="emd", repair=True, data=calib)
    assert worst(fused) < 1e-4
    assert fused.fusion_report["repair"]["modules"] == len(modules)


def test_fuse_keeps_callers_modes_and_constructor_arguments():
    base = T.ViTModel(M.vit(cls=T.ViTModel).config, add_pooling_layer=False)
    wide = M.transform(M.vit(cls=T.ViTModel), widen=True)
    wide = T.ViTModel(wide.config, add_pooling_layer=False)
    base.train()
    fused = otcompress.fuse(base, [wide], solver="emd")
    assert base.training and fused.pooler is None and not fused.training


def test_reg_auto_kl_ignores_padded_positions():
    from otcompress import fusion
    model, parent = M.bert(cls=T.BertForMaskedLM), M.bert(cls=T.BertForMaskedLM, seed=5)
    batch = M.inputs(model)  # example 0 is padded from position 9
    garbage = {k: v.clone() for k, v in batch.items()}
    garbage["input_ids"][0, 9:] = (garbage["input_ids"][0, 9:] + 7) % model.config.vocab_size

    def loss(b):
        return fusion.holdout_loss(model, [b], [fusion.parent_targets([parent], b)])
    assert abs(loss(batch) - loss(garbage)) < 1e-6
    unmasked = {k: v for k, v in garbage.items() if k != "attention_mask"}
    assert abs(loss(unmasked) - loss(batch)) > 1e-4  # counting the padding would show


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("alignment", ["weights", "fold"])
def test_fusion_on_cuda(alignment):
    base = M.vit()
    anchor, wide = M.noisy(base).cuda(), M.transform(base, widen=True).cuda()
    fused = otcompress.fuse(anchor, [wide], alignment=alignment, solver="emd")
    assert next(fused.parameters()).is_cuda
    expected = base if alignment == "fold" else M.average([anchor.cpu(), base])
    assert _err(fused.cpu(), M.inputs(base), expected) < TOL


def test_tied_anchor_refuses_an_untied_parent():
    anchor = M.bert(cls=T.BertForMaskedLM)
    cfg = T.BertConfig.from_dict({**anchor.config.to_dict(), "tie_word_embeddings": False})
    untied = M.sharpen(T.BertForMaskedLM(cfg), 3)
    with pytest.raises(IncompatibleModelsError, match="tie_word_embeddings"):
        otcompress.fuse(anchor, [untied], solver="emd")


@pytest.mark.parametrize("make,cls", CASES[::2] + [(M.bert, T.BertForMaskedLM)], ids=ids)
def test_data_free_repair_restores_row_norms(make, cls):
    """Without data, each unit's weight-row norm is restored: under isotropic
    unit-variance inputs every unit's std then equals the target (the average
    of the anchor's and the base's units), within sampling error."""
    base = make(cls=cls)
    anchor = M.noisy(base, scale=0.3)
    spec = architectures.build_spec(anchor)
    modules = repair.points(spec)
    named = {k: dict(m.named_modules()) for k, m in (("a", anchor), ("b", base))}
    target = {m: (repair.row_norms(named["a"][m].weight, ax) + repair.row_norms(named["b"][m].weight, ax)) / 2
              for m, (_, ax) in modules.items()}
    wide = M.transform(base, widen=True)
    plain = otcompress.fuse(anchor, [wide], solver="emd")
    fused = otcompress.fuse(anchor, [wide], solver="emd", repair=True)
    assert fused.fusion_report["repair"]["data_free"]
    got = dict(fused.named_modules())
    off = {m: float(((repair.row_norms(dict(plain.named_modules())[m].weight, ax) - target[m]).abs()
                     / target[m]).max()) for m, (_, ax) in modules.items()}
    assert max(off.values()) > 1e-2  # averaging shrank some rows: repair has work to do
    g = torch.Generator().manual_seed(0)
    for m, (_, ax) in modules.items():
        w = got[m].weight
        assert torch.allclose(repair.row_norms(w, ax), target[m], rtol=1e-5)
        x = torch.randn(20000, w.shape[1 - ax], generator=g)
        std = (x @ (w.T if ax == 0 else w)).std(0)
        assert float(((std - target[m]).abs() / target[m]).max()) < 0.05  # 20000 samples: ~0.5% typical


def test_fused_model_does_not_inherit_the_anchors_patches():
    base = M.vit()
    anchor = M.noisy(base)
    calls = []
    anchor.register_forward_hook(lambda *a: calls.append(1))
    original = anchor.forward
    anchor.forward = lambda *a, **k: original(*a, **k)  # e.g. a timing wrapper
    fused = otcompress.fuse(anchor, [M.transform(base, widen=True)], solver="emd")
    calls.clear()
    x = M.inputs(base)
    assert _err(fused, x, M.average([M.noisy(base), base])) < TOL and not calls


def test_fused_model_adopts_the_fused_tensors_and_keeps_ties():
    """build_model adopts the fused tensors (no extra copy of the model) and a
    tied decoder is still the embedding parameter itself."""
    anchor = M.bert(cls=T.BertForMaskedLM)
    fused = otcompress.fuse(anchor, [M.bert(hidden=48, heads=6, inter=96, cls=T.BertForMaskedLM, seed=3)])
    assert fused.cls.predictions.decoder.weight is fused.bert.embeddings.word_embeddings.weight
    assert all(p.requires_grad and p.device.type == "cpu" for p in fused.parameters())
    assert not any(p.data_ptr() == q.data_ptr() for p in fused.parameters() for q in anchor.parameters())


def test_fold_into_a_wider_target_names_the_width():
    from otcompress.errors import IncompatibleModelsError
    with pytest.raises(IncompatibleModelsError, match=r"cannot fold parent 1 \(hidden 32\) into a wider target"):
        otcompress.fuse(M.vit(hidden=48, heads=6, inter=96), [M.vit()], alignment="fold")


def _reference_kmeans(x, k, seed, restarts=4):
    """The clustering before vectorisation (k-means++ seeds drawn one by one
    with torch.multinomial, Lloyd on the features), kept here as the
    reference the fast one must match."""
    from otcompress.fold import _fill_empty
    x = x.double() - x.double().mean(0)
    gen = torch.Generator().manual_seed(seed)
    dist = lambda a, c: ((a * a).sum(1, keepdim=True) - 2 * a @ c.T + (c * c).sum(1)).clamp_min(0)  # noqa: E731
    best = (None, float("inf"))
    for _ in range(restarts):
        idx = [int(torch.randint(x.shape[0], (1,), generator=gen))]
        d2 = dist(x, x[idx]).squeeze(1)
        for _ in range(1, k):
            idx.append(int(torch.multinomial((d2 / d2.sum()).float(), 1, generator=gen)))
            d2 = torch.minimum(d2, dist(x, x[idx[-1:]]).squeeze(1))
        c, labels = x[idx], None
        for _ in range(100):
            new = _fill_empty(dist(x, c).argmin(1), dist(x, c), k)
            if labels is not None and torch.equal(new, labels):
                break
            labels = new
            c = torch.zeros_like(c).index_add_(0, labels, x) / torch.bincount(labels, minlength=k)[:, None]
        inertia = float(dist(x, c).gather(1, labels[:, None]).sum())
        if inertia < best[1]:
            best = (labels, inertia)
    return best


def _inertia(x, labels, k):
    x = x.double()
    c = torch.zeros(k, x.shape[1], dtype=x.dtype).index_add_(0, labels, x) / torch.bincount(labels, minlength=k)[:, None]
    return float(((x - c[labels]) ** 2).sum())


def _same_partition(a, b):
    return len(set(zip(a.tolist(), b.tolist()))) == len(set(a.tolist())) == len(set(b.tolist()))


def test_vectorised_kmeans_finds_the_reference_clustering():
    """Seeds are drawn from another random stream than the reference's (one
    uniform per seed instead of m exponentials: those draws alone cost more
    than half of the 2 s budget on all-MiniLM-L6-v2), so labels match the
    reference as partitions where the clustering is clear, and the quality
    matches on unstructured points."""
    g = torch.Generator().manual_seed(0)
    for m, k, d in [(60, 6, 20), (300, 40, 20), (1000, 100, 50), (64, 8, 700)]:
        centres = 10 * torch.randn(k, d, generator=g)
        truth = torch.cat([torch.arange(k), torch.randint(k, (m - k,), generator=g)])
        x = centres[truth] + 0.01 * torch.randn(m, d, generator=g)
        got = fold.kmeans(x, k, seed=1)
        assert _same_partition(got, truth) and _same_partition(got, _reference_kmeans(x, k, 1)[0])
        assert torch.equal(got, fold.kmeans(x, k, seed=1))  # a seed gives one answer
    ratios = []
    for seed in range(4):
        x = torch.randn(200, 30, generator=g)
        ratios.append(_inertia(x, fold.kmeans(x, 100, seed=seed), 100) / _reference_kmeans(x, 100, seed)[1])
    assert 0.97 < sum(ratios) / len(ratios) < 1.03


def test_weighted_kmeans_ignores_rows_of_weight_zero():
    g = torch.Generator().manual_seed(2)
    live = torch.randn(6, 4, generator=g) * 10
    x = torch.cat([live, live + 0.01, 30 * torch.randn(6, 4, generator=g)])  # 6 pairs and 6 far outliers
    w = torch.cat([torch.ones(12), torch.zeros(6)])
    labels = fold.kmeans(x, 6, weights=w)
    assert _same_partition(labels[:12], torch.arange(6).repeat(2))
    t = fold.plan(labels, 6, weights=w)
    centres = transport_column(t).T @ x.double()
    assert torch.allclose(centres, (live.double() + live.double() + 0.01)[labels[:6].argsort()] / 2, atol=1e-6)


def transport_column(t):
    from otcompress import transport
    return transport.column_stochastic(t)


@torch.no_grad()
def pad_dead_mlp(model, extra, seed=4):
    """The MLP of every block gets `extra` dead units: random incoming rows
    (and biases), zero outgoing columns. The function is unchanged."""
    g = torch.Generator().manual_seed(seed)
    cfg = type(model.config).from_dict(model.config.to_dict())
    cfg.intermediate_size += extra
    sd = {}
    for name, t in model.state_dict().items():
        roles = M.roles(name, model.config.model_type)
        for axis, role in enumerate(roles):
            if role is not None and role[0] == "mlp":
                shape = list(t.shape)
                shape[axis] = extra
                pad = (torch.zeros(shape) if role[1] == "in"
                       else 3 * t.std() * torch.randn(shape, generator=g))  # far from every live unit
                t = torch.cat([t, pad], axis)
        sd[name] = t
    out = type(model)(cfg)
    out.load_state_dict(sd)
    return out.eval()


@pytest.mark.parametrize("make,cls", CASES[::2], ids=ids)
def test_fold_widened_copy_padded_with_dead_units_recovers_the_original(make, cls, monkeypatch):
    """As many dead MLP units as live ones, then every unit twice (Net2Net):
    folding weights each unit by its outgoing norm, so the dead ones pull no
    centroid and the fold is the original. Unweighted k-means folds the dead
    units in and fails. (The dead units are padded before widening: their
    random rows then read both copies of a residual unit alike, as the
    residual stream's clustering needs; a dead unit's columns still count
    there, unweighted.)"""
    base = make(cls=cls)
    anchor, x = M.noisy(base, scale=0.5), M.inputs(base)
    parent = M.transform(pad_dead_mlp(base, base.config.intermediate_size), widen=True)
    assert _err(parent, x, base) < TOL
    assert _err(otcompress.fuse(anchor, [parent], alignment="fold"), x, base) < TOL
    monkeypatch.setattr(fold, "outgoing_weights", lambda out_rows: None)
    assert _err(otcompress.fuse(anchor, [parent], alignment="fold"), x, base) > 1e-3


# --------------------------------------------------------------------------- fewer, wider heads
def test_sized_kmeans_fills_every_cluster_to_its_minimum():
    # five rows near 0 and one far away: plain k-means leaves the far one alone
    x = torch.tensor([[0.0], [0.1], [0.2], [0.3], [0.4], [10.0]])
    assert sorted(torch.bincount(fold.kmeans(x, 2)).tolist()) == [1, 5]
    labels = fold.sized_kmeans(x, 2, 3)
    assert sorted(torch.bincount(labels).tolist()) == [3, 3]
    # the lone row takes the rows nearest to it
    assert labels[5] == labels[4] == labels[3] != labels[0]


def test_sized_kmeans_keeps_kmeans_where_it_meets_the_sizes_and_refuses_the_impossible():
    x = torch.randn(12, 3, generator=torch.Generator().manual_seed(0))
    assert torch.equal(fold.sized_kmeans(x, 3, 1, seed=2), fold.kmeans(x, 3, seed=2))
    with pytest.raises(IncompatibleModelsError, match="at least 5"):
        fold.sized_kmeans(x, 3, 5)


@pytest.mark.parametrize("seed", range(4))
def test_fold_into_fewer_wider_heads(seed):
    """4 heads of 8 into 2 heads of 12: each target head needs two parent
    heads' units, and plain k-means on the heads could give one of them a
    single head ("cannot fold 8 attention units into a head of 12"). The
    result has the target's shape and computes finite outputs (merging heads
    has no exact answer to compare with: random parents keep little of their
    function at 3/4 width, so closeness is not asserted)."""
    parent = M.bert(hidden=32, heads=4, inter=64, layers=2, seed=seed, cls=T.BertForMaskedLM)
    cfg = architectures.target_config(parent.config, hidden=24, heads=2, intermediate=32)
    model = otcompress.fuse(cfg, [parent], alignment="fold", seed=seed)
    attn = model.bert.encoder.layer[0].attention.self
    assert (attn.num_attention_heads, attn.attention_head_size, attn.query.out_features) == (2, 12, 24)
    assert torch.isfinite(model(input_ids=torch.randint(0, 50, (2, 7))).logits).all()


def test_a_head_fold_that_cannot_fill_its_heads_is_refused_in_one_line():
    # 8 heads of 4 into 3 heads of 10: each would need 3 parent heads, 9 in all
    parent = M.bert(hidden=32, heads=8, inter=64, layers=2, seed=0, cls=T.BertForMaskedLM)
    cfg = architectures.target_config(parent.config, hidden=30, heads=3, intermediate=32)
    with pytest.raises(IncompatibleModelsError, match="each needs 3 parent heads"):
        otcompress.fuse(cfg, [parent], alignment="fold")
