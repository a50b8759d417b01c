"""The fuse() API: self-fusion, heterogeneous fusion, save/load, options, errors."""
import math

import pytest
import torch
import transformers as T

import models as M
import otcompress
from otcompress import activations
from otcompress.errors import (IncompatibleModelsError, InvalidOptionError, ModelLoadError,
                               OTCompressError, UnsupportedArchitectureError)


def _close(a, b, x, tol):
    return float((M.outputs(a, x) - M.outputs(b, x)).abs().max()) < tol


@pytest.mark.parametrize("make", [M.vit, M.bert])
def test_self_fusion_is_identity(make):
    model = make()
    x = M.inputs(model)
    assert _close(otcompress.fuse(model, [model], solver="emd"), model, x, 1e-5)
    assert _close(otcompress.fuse(model, [model, model], solver="sinkhorn", reg=0.002), model, x, 1e-4)


@pytest.mark.parametrize("make,cls", [(M.vit, T.ViTForImageClassification), (M.bert, T.BertForMaskedLM),
                                      (M.bert, T.BertForSequenceClassification)])
@pytest.mark.parametrize("alignment", ["weights", "activations"])
def test_heterogeneous_fusion_keeps_anchor_config_and_round_trips(tmp_path, make, cls, alignment):
    anchor = make(hidden=32, heads=4, inter=64, cls=cls, seed=1)
    parents = [make(hidden=48, heads=6, inter=96, cls=cls, seed=2),
               make(hidden=64, heads=8, inter=160, cls=cls, seed=3)]
    data = [M.inputs(anchor, batch=8, seed=s) for s in range(2)]
    fused = otcompress.fuse(anchor, parents, alignment=alignment, data=data, reg=0.1,
                            token_filter="window_2" if make is M.vit and alignment == "activations" else None)
    assert fused.config.to_dict() == anchor.config.to_dict()
    assert type(fused) is cls
    fused.save_pretrained(tmp_path)
    loaded = cls.from_pretrained(tmp_path)
    x = M.inputs(anchor)
    out = M.outputs(loaded, x)
    assert torch.isfinite(out).all()
    assert torch.equal(out, M.outputs(fused, x))
    assert not _close(fused, anchor, x, 1e-3)  # the parents did contribute
    if cls is T.BertForMaskedLM:
        assert loaded.cls.predictions.decoder.weight.data_ptr() == \
            loaded.bert.embeddings.word_embeddings.weight.data_ptr()
    report = fused.fusion_report
    assert len(report["transport_maps"]) == 2
    for stats in report["transport_maps"][0].values():
        if "marginal_error" in stats:
            assert stats["marginal_error"] < 1e-4 and math.isfinite(stats["entropy"])


def test_fuse_from_directories(tmp_path):
    anchor, parent = M.bert(seed=1), M.bert(hidden=48, heads=6, seed=2)
    anchor.save_pretrained(tmp_path / "a")
    parent.save_pretrained(tmp_path / "p")
    from_dirs = otcompress.fuse(str(tmp_path / "a"), [str(tmp_path / "p")], solver="emd")
    from_objects = otcompress.fuse(anchor, [parent], solver="emd")
    x = M.inputs(anchor)
    assert torch.equal(M.outputs(from_dirs, x), M.outputs(from_objects, x))
    assert from_dirs.fusion_report["parents"] == [str(tmp_path / "p")]


def test_streamed_batches_equal_one_big_batch():
    anchor, parent = M.vit(seed=1), M.vit(hidden=48, heads=6, inter=96, seed=2)
    big = M.inputs(anchor, batch=24, seed=5)
    chunks = [{"pixel_values": big["pixel_values"][i:i + 7]} for i in range(0, 24, 7)]
    a = otcompress.fuse(anchor, [parent], alignment="activations", data=big, solver="emd")
    b = otcompress.fuse(anchor, [parent], alignment="activations", data=chunks, solver="emd")
    x = M.inputs(anchor)
    assert _close(a, b, x, 1e-5)


def test_cross_moments_match_direct_correlation():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(500, 6, generator=g) * 3 + 1, torch.randn(500, 4, generator=g)
    y[:, 0] = x[:, 2] * 2 + 0.1 * y[:, 0]
    cm = activations.CrossMoments()
    for i in range(0, 500, 64):
        cm.update(x[i:i + 64], y[i:i + 64])
    direct = torch.corrcoef(torch.cat([x, y], 1).T)[:6, 6:].double()
    assert torch.allclose(cm.correlation(), direct, atol=1e-5)


def test_vanilla_fusion_averages_and_rejects_unequal_shapes():
    a, b = M.vit(seed=1), M.vit(seed=2)
    vf = otcompress.vanilla_fuse(a, [b])
    x = M.inputs(a)
    assert _close(vf, M.average([a, b]), x, 1e-6)
    with pytest.raises(IncompatibleModelsError, match="equal shapes"):
        otcompress.vanilla_fuse(a, [M.vit(hidden=48, heads=6)])


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(reg=0), InvalidOptionError, "reg > 0"),
    (dict(reg=-0.1), InvalidOptionError, "reg > 0"),
    (dict(alignment="activations"), InvalidOptionError, "calibration data"),
    (dict(residual="scalar"), InvalidOptionError, "calibration data"),
    (dict(solver="lp"), InvalidOptionError, "solver 'lp'"),
    (dict(weights=[1, 2, 3]), InvalidOptionError, "need 2 values"),
    (dict(alignment="fold", weights=[1, 0]), InvalidOptionError, "parents' weights must have a positive sum"),
    (dict(token_filter="window_x"), InvalidOptionError, "token filter"),
])
def test_bad_options(kwargs, error, match):
    with pytest.raises(error, match=match):
        otcompress.fuse(M.vit(), [M.vit(seed=2)], **kwargs)


@pytest.mark.parametrize("kwargs,match", [
    (dict(data=5, alignment="activations"), "data must be one batch"),
    (dict(holdout=3, reg="auto", data={"pixel_values": torch.zeros(2, 1, 8, 8)}), "holdout must be one batch"),
    (dict(progress=3), "progress must be a callable"),
    (dict(max_iter=2.5), "max_iter must be an integer >= 1, got 2.5"),
    (dict(tol=-1), "tol must be a finite number > 0"),
    (dict(tol="x"), "tol must be"),
    (dict(reg_grid=[], reg="auto", data={"pixel_values": torch.zeros(2, 1, 8, 8)}), "reg_grid must be a non-empty"),
    (dict(reg_grid=iter([0.1])), "reg_grid must be"),  # a one-shot iterator a check would use up
    (dict(seed="a", alignment="fold"), "seed must be an integer"),
    (dict(repair="yes"), "repair must be True or False"),
    (dict(reconstruct="on"), "reconstruct must be True or False"),
    (dict(trust_remote_code="yes"), "trust_remote_code must be True or False"),
    (dict(pooling="x"), "pooling must be one of mean, cls, max, last"),
    (dict(token_filter=5), "token_filter must be a string"),
    (dict(weights=5), "weights must be finite numbers"),
    (dict(reg="big"), "reg must be a number or 'auto'"),
])
def test_a_wrong_api_value_is_one_line_before_any_work(kwargs, match):
    """Python callers' values of the wrong type or range: a one-line error
    naming the option, not a TypeError from deep in the engine (each of these
    raised one, or was accepted, before `options.check_api`)."""
    with pytest.raises(InvalidOptionError, match=match):
        otcompress.fuse(M.vit(), [M.vit(seed=2)], **kwargs)


def test_numpy_values_are_taken_as_python_s(tmp_path):
    """A NumPy integer seed, an array of regs and NumPy scalars fuse as the
    Python values would, and the report stays JSON (each raised deep in the
    engine, or in json.dumps)."""
    import json

    import numpy as np
    from otcompress.architectures import target_config
    p = M.vit(hidden=32, seed=2)
    cfg = target_config(p.config, hidden=16, heads=2)
    a = otcompress.fuse(cfg, [p], alignment="fold", seed=np.int64(1))
    b = otcompress.fuse(cfg, [p], alignment="fold", seed=1)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    batch = M.inputs(M.vit())
    m = otcompress.fuse(M.vit(), [M.vit(seed=2)], reg="auto", reg_grid=np.array([0.01, 0.05]), data=batch,
                        tol=np.float32(1e-6), max_iter=np.int64(4000), weights=np.array([1, 1]))
    json.dumps(m.fusion_report)
    assert m.fusion_report["options"]["max_iter"] == 4000
    from otcompress.options import check_api
    assert check_api({"device": 0, "reg": 1, "seed": np.int64(2)}) == {"device": 0, "reg": 1.0, "seed": 2}
    otcompress.fuse_to_disk(M.vit(), [M.vit(seed=2)], tmp_path / "out", max_shard_size=1e9)
    assert (tmp_path / "out" / "model.safetensors").exists()


@pytest.mark.parametrize("size", ["lots", -1, 0, True, 2.5, None, [1]])
def test_a_wrong_shard_size_fails_before_fusing_and_writes_nothing(tmp_path, size):
    with pytest.raises(InvalidOptionError, match="max_shard_size must be a size > 0"):
        otcompress.fuse_to_disk(M.vit(), [M.vit(seed=2)], tmp_path / "out", max_shard_size=size)
    assert list(tmp_path.iterdir()) == []


def test_a_fold_target_with_other_labels_than_its_parents_is_refused():
    """A config built in memory records no class, so the label check takes
    the class the target is built as (it was a RuntimeError from the head)."""
    from otcompress.architectures import target_config
    p = M.vit(hidden=32)
    cfg = target_config(p.config, hidden=16, heads=2)
    cfg.num_labels = 3
    with pytest.raises(IncompatibleModelsError, match="label mismatch: the fold target has 3 labels, parent 1 has"):
        otcompress.fuse(cfg, [p], alignment="fold")


def test_incompatible_models():
    with pytest.raises(IncompatibleModelsError, match="depth mismatch: the anchor has 3 blocks, parent 1 only 2"):
        otcompress.fuse(M.vit(layers=3), [M.vit()])  # (deeper parents are depth-mapped)
    with pytest.raises(IncompatibleModelsError, match="model-type mismatch"):
        otcompress.fuse(M.vit(), [M.bert()])
    with pytest.raises(IncompatibleModelsError, match="vocabulary mismatch"):
        otcompress.fuse(M.bert(), [M.bert(vocab=70)])
    with pytest.raises(IncompatibleModelsError, match="image-size mismatch"):
        otcompress.fuse(M.vit(), [M.vit(image=16)])
    with pytest.raises(IncompatibleModelsError, match="class mismatch"):
        otcompress.fuse(M.bert(), [M.bert(cls=T.BertModel)])


def test_unsupported_and_missing():
    opt = T.OPTForCausalLM(T.OPTConfig(num_hidden_layers=1, hidden_size=16, num_attention_heads=2, ffn_dim=16,
                                       vocab_size=20, max_position_embeddings=8, word_embed_proj_dim=16))
    with pytest.raises(UnsupportedArchitectureError, match="opt"):  # GPT-2 is supported since issue 9
        otcompress.fuse(opt, [opt])
    with pytest.raises(ModelLoadError, match="no such model directory"):
        otcompress.fuse("/nonexistent/model", [M.vit()])
    with pytest.raises(ModelLoadError, match="offline"):
        otcompress.fuse("google/vit-base-patch16-224", [M.vit()])
    # Checked on the config at the entry (`inputs.check`), as the workflow does: an option error.
    with pytest.raises(InvalidOptionError, match="only applies to vision"):
        otcompress.fuse(M.bert(), [M.bert(seed=2)], alignment="activations", data=M.inputs(M.bert()),
                        token_filter="only_cls")
    assert issubclass(ModelLoadError, OTCompressError)


def test_progress_callback_reports_every_map():
    calls = []
    otcompress.fuse(M.vit(), [M.vit(seed=2)], progress=lambda s, d, t: calls.append((s, d, t)))
    assert calls[-1][1] == calls[-1][2] and "align" in calls[-1][0]


@pytest.mark.parametrize("labelled", [True, False])
def test_reg_auto_sweeps_and_records(labelled):
    anchor, parent = M.vit(seed=1), M.vit(hidden=48, heads=6, inter=96, seed=2)
    calib = M.inputs(anchor, batch=16, seed=1)
    holdout = M.inputs(anchor, batch=16, seed=2)
    if labelled:
        holdout["labels"] = torch.randint(0, 10, (16,))
    fused = otcompress.fuse(anchor, [parent], reg="auto", reg_grid=[0.02, 0.1, 1.0],
                            alignment="activations", data=calib, holdout=holdout)
    sweep = fused.fusion_report["reg_sweep"]
    assert [s["reg"] for s in sweep] == [0.02, 0.1, 1.0]
    best = min(sweep, key=lambda s: s["loss"])
    assert fused.fusion_report["options"]["reg"] == best["reg"]
    assert len({round(s["loss"], 9) for s in sweep}) == 3  # different regs, different models


def test_window_larger_than_grid_is_refused():
    a = M.vit()  # 8x8 images, patch 2: a 4x4 grid
    with pytest.raises(InvalidOptionError, match="grid is only 4x4"):
        otcompress.fuse(a, [M.vit(seed=2)], alignment="activations", data=M.inputs(a), token_filter="window_6")
