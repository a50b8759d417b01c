"""Streaming fusion: parents given as safetensors directories are read one
tensor at a time (modelio.LazyStateDict / LazyModel), and the fused model is
bit for bit the one fused from the same parents loaded whole."""
import json

import pytest
import torch
import transformers as T

import models as M
import otcompress
from otcompress import architectures, fusion, modelio
from otcompress.errors import InvalidOptionError, ModelLoadError, UnsupportedArchitectureError


def _save(model, path, shard=None):
    model.save_pretrained(path, **({"max_shard_size": shard} if shard else {}))
    return str(path)


def _same(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.fixture
def load_calls(monkeypatch):
    """The sources `modelio.load_model` was asked to load (whole)."""
    calls, real = [], modelio.load_model

    def spy(source, **kw):
        calls.append(source)
        return real(source, **kw)
    monkeypatch.setattr(modelio, "load_model", spy)
    return calls


@pytest.mark.parametrize("shard", [None, "40KB"])
def test_lazy_state_dict_reads_nothing_until_asked(tmp_path, shard):
    model = M.bert(cls=T.BertForSequenceClassification)
    path = _save(model, tmp_path / "m", shard)
    assert json.loads((tmp_path / "m" / "model.safetensors.index.json").read_text()) if shard else True
    sd, ref = modelio.LazyStateDict(path), model.state_dict()
    assert set(sd) == set(ref) and len(sd) == len(ref)
    for name, t in ref.items():
        assert sd.shape(name) == tuple(t.shape) and sd.dtype(name) == t.dtype
    assert sd.reads == 0  # names, shapes and dtypes come from the headers
    name = "bert.encoder.layer.1.intermediate.dense.weight"
    assert torch.equal(sd[name], ref[name]) and sd.reads == 1
    assert sd.nbytes() == sum(t.numel() * t.element_size() for t in ref.values())
    with pytest.raises(KeyError):
        sd["bert.nothing"]
    with pytest.raises(TypeError):
        sd[name] = torch.zeros(1)  # read-only


def test_lazy_state_dict_errors(tmp_path):
    with pytest.raises(ModelLoadError, match="no safetensors"):
        modelio.LazyStateDict(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"\x00" * 16)
    with pytest.raises(ModelLoadError, match="cannot read"):
        modelio.LazyStateDict(tmp_path)


@pytest.mark.parametrize("make", [
    lambda: M.bert(),  # masked LM: decoder weight and bias tied, stored once
    lambda: M.bert(cls=T.BertForSequenceClassification),
    lambda: M.bert(cls=T.BertModel),
    lambda: M.vit(),
    lambda: T.BertForMaskedLM(T.BertConfig(**M.TINY_BERT, tie_word_embeddings=False)),
])
def test_lazy_model_has_the_loaded_models_names_and_values(tmp_path, make):
    model = make()
    path = _save(model, tmp_path / "m", "30KB")
    lazy = modelio.lazy_model(path)
    loaded = modelio.load_model(path)
    assert lazy.model_class is type(loaded) and lazy.class_name == type(loaded).__name__
    ref = loaded.state_dict()
    assert list(lazy.state_dict()) == list(ref)
    assert all(torch.equal(lazy.state_dict()[k], v) for k, v in ref.items())
    spec, lazy_spec = architectures.build_spec(loaded), architectures.build_spec(lazy)
    assert spec.axes == lazy_spec.axes and spec.tied == lazy_spec.tied and spec.nodes == lazy_spec.nodes


def test_lazy_model_defers_to_loading_where_names_or_files_differ(tmp_path):
    from safetensors.torch import load_file, save_file
    model = M.bert(cls=T.BertForSequenceClassification)
    assert modelio.lazy_model(model) is None  # a model object is used as it is
    path = _save(model, tmp_path / "bin")
    sd = load_file(tmp_path / "bin" / "model.safetensors")
    (tmp_path / "bin" / "model.safetensors").unlink()
    torch.save(sd, tmp_path / "bin" / "pytorch_model.bin")
    assert modelio.lazy_model(path) is None  # no safetensors: load_model's business
    renamed = _save(model, tmp_path / "renamed")
    sd["bert.pooler.dense.kernel"] = sd.pop("bert.pooler.dense.weight")
    save_file(sd, tmp_path / "renamed" / "model.safetensors")
    assert modelio.lazy_model(renamed) is None  # from_pretrained would initialise the missing one
    assert modelio.lazy_model(path, trust_remote_code=True) is None


def test_spec_from_keys_checks_names_without_a_model():
    model = M.bert()
    keys = list(model.state_dict())
    spec = architectures.spec_from_keys(model.config, "BertForMaskedLM", keys)
    assert spec.axes == architectures.build_spec(model).axes
    with pytest.raises(UnsupportedArchitectureError, match="does not know: bert.extra"):
        architectures.spec_from_keys(model.config, "BertForMaskedLM", keys + ["bert.extra"])
    with pytest.raises(UnsupportedArchitectureError, match="lacks parameters"):
        architectures.spec_from_keys(model.config, "BertForMaskedLM", keys[1:])
    with pytest.raises(UnsupportedArchitectureError, match="BertForTokenClassification is not supported"):
        architectures.spec_from_keys(model.config, "BertForTokenClassification", keys)


CASES = {
    "bert-mlm-sinkhorn": (M.bert, {}),
    "bert-mlm-emd": (M.bert, {"solver": "emd"}),
    "bert-cls-fold": (lambda **kw: M.bert(cls=T.BertForSequenceClassification, **kw), {"alignment": "fold"}),
    "vit-sinkhorn-weighted": (M.vit, {"reg": 0.05, "weights": [0.5, 0.3, 0.2]}),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_streamed_fusion_is_bit_identical_to_loaded(tmp_path, load_calls, case):
    make, kwargs = CASES[case]
    anchor = _save(make(seed=1), tmp_path / "a")
    parents = [_save(make(hidden=48, heads=6, inter=96, seed=2), tmp_path / "p1", "30KB"),
               _save(make(hidden=64, heads=8, inter=128, seed=3), tmp_path / "p2")]
    streamed = otcompress.fuse(anchor, parents, **kwargs)
    assert load_calls == [anchor]  # the parents were never loaded whole
    loaded = otcompress.fuse(anchor, [modelio.load_model(p) for p in parents], **kwargs)
    assert _same(streamed, loaded)
    assert streamed.fusion_report["parents"] == parents


def test_fold_into_a_target_width_streams(tmp_path, load_calls):
    parents = [_save(M.bert(hidden=48, heads=6, inter=96, seed=s), tmp_path / f"p{s}", "30KB") for s in (2, 3)]
    target = architectures.target_config(modelio.load_config(parents[0]), hidden=32, heads=4, intermediate=64)
    streamed = otcompress.fuse(target, parents, alignment="fold", seed=5)
    assert load_calls == []
    assert _same(streamed, otcompress.fuse(target, [modelio.load_model(p) for p in parents],
                                           alignment="fold", seed=5))


def test_paths_that_run_the_parents_load_them(tmp_path, load_calls):
    make = M.vit
    anchor, parent = _save(make(seed=1), tmp_path / "a"), _save(make(hidden=48, heads=6, seed=2), tmp_path / "p")
    data = [M.inputs(make(), batch=8, seed=0)]
    fused = otcompress.fuse(anchor, [parent], residual="scalar", data=data, reg=0.05)
    assert load_calls == [parent, anchor]  # weighted residuals measure the parents on data
    assert _same(fused, otcompress.fuse(anchor, [modelio.load_model(parent)], residual="scalar",
                                        data=data, reg=0.05))


def test_reads_stay_per_tensor(tmp_path, monkeypatch):
    """Each parent tensor is read a bounded number of times (no hidden full load)."""
    reads = []
    real = modelio.LazyStateDict.__getitem__
    monkeypatch.setattr(modelio.LazyStateDict, "__getitem__", lambda self, k: reads.append(k) or real(self, k))
    anchor = _save(M.bert(seed=1), tmp_path / "a")
    parent = _save(M.bert(hidden=48, heads=6, inter=96, seed=2), tmp_path / "p", "30KB")
    otcompress.fuse(anchor, [parent])
    n = len(modelio.LazyStateDict(parent))
    assert set(reads) <= set(modelio.lazy_model(parent).state_dict())
    assert max(reads.count(k) for k in set(reads)) <= 4 and len(reads) <= 4 * n


# ----------------------------------------------------------------------------- fused straight to disk

DISK_CASES = {
    "bert-mlm-tied": (M.bert, {}),
    "bert-cls-fold": (lambda **kw: M.bert(cls=T.BertForSequenceClassification, **kw), {"alignment": "fold"}),
    "vit-weighted": (M.vit, {"reg": 0.05, "weights": [0.5, 0.3, 0.2]}),
}


def _from_pretrained(path):
    config = T.AutoConfig.from_pretrained(path)
    return getattr(T, config.architectures[0]).from_pretrained(path).eval()


def _pair(tmp_path, make):
    anchor = _save(make(seed=1), tmp_path / "a")
    parents = [_save(make(hidden=48, heads=6, inter=96, seed=2), tmp_path / "p1", "30KB"),
               _save(make(hidden=64, heads=8, inter=128, seed=3), tmp_path / "p2", "30KB")]
    return anchor, parents


@pytest.mark.parametrize("case", sorted(DISK_CASES))
def test_fused_to_disk_is_fuse_written_shard_by_shard(tmp_path, monkeypatch, load_calls, case):
    make, kwargs = DISK_CASES[case]
    anchor, parents = _pair(tmp_path, make)
    events = []  # parent reads and shard writes, in order
    real_read, real_write = modelio.LazyStateDict.__getitem__, modelio.ShardWriter.write
    monkeypatch.setattr(modelio.LazyStateDict, "__getitem__",
                        lambda self, k: events.append("read") or real_read(self, k))
    monkeypatch.setattr(modelio.ShardWriter, "write",
                        lambda self, k, t: events.append("write") or real_write(self, k, t))
    monkeypatch.setattr(fusion, "build_model", None)  # the fused model is never built
    out = tmp_path / "out"
    report = fusion.fuse_to_disk(anchor, parents, out, max_shard_size="20KB", **kwargs)
    monkeypatch.undo()
    assert load_calls == [anchor] and report["parents"] == parents
    if kwargs.get("alignment") != "fold":  # (two parents' folds are fused in memory, then written)
        # Written while the parents are still being read, not buffered to the end.
        assert events.index("write") < len(events) - 1 - events[::-1].index("read")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) >= 2
    assert sorted(p.name for p in out.iterdir() if p.name.endswith(".safetensors")) == sorted(
        set(index["weight_map"].values()))
    written, fused = _from_pretrained(out), otcompress.fuse(anchor, parents, **kwargs)
    assert _same(written, fused)
    assert not _same(written, modelio.load_model(anchor))  # a fuse that returned the anchor fails here
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no staging left


def test_fused_to_disk_keeps_ties(tmp_path):
    for tie in (True, False):
        def make(hidden=32, heads=4, inter=64, seed=0):
            torch.manual_seed(seed)
            return T.BertForMaskedLM(T.BertConfig(**{**M.TINY_BERT, "hidden_size": hidden, "num_attention_heads": heads,
                                                     "intermediate_size": inter}, tie_word_embeddings=tie))
        anchor, parents = _pair(tmp_path / str(tie), make)
        out = tmp_path / str(tie) / "out"
        fusion.fuse_to_disk(anchor, parents, out, max_shard_size="40KB")
        stored = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
        assert ("cls.predictions.decoder.weight" in stored) is not tie  # a tie is stored once
        fused = otcompress.fuse(anchor, parents)
        ref = _save(fused, tmp_path / str(tie) / "ref", "40KB")
        assert set(stored) == set(modelio.LazyStateDict(ref))  # the names save_pretrained stores
        model = _from_pretrained(out)
        emb, dec = model.bert.embeddings.word_embeddings.weight, model.cls.predictions.decoder.weight
        assert (emb.data_ptr() == dec.data_ptr()) is tie
        assert _same(model, fused)


def test_fused_to_disk_needing_the_model_writes_it_whole(tmp_path):
    """Repair corrects the built model: written after it, still equal to fuse()."""
    anchor, parents = _pair(tmp_path, M.bert)
    kwargs = {"repair": True, "data": [M.inputs(M.bert(), batch=8, seed=0)]}
    fusion.fuse_to_disk(anchor, parents, tmp_path / "out", max_shard_size="20KB", **kwargs)
    assert _same(_from_pretrained(tmp_path / "out"), otcompress.fuse(anchor, parents, **kwargs))


def test_failure_midway_leaves_no_output(tmp_path, monkeypatch):
    anchor, parents = _pair(tmp_path, M.bert)
    before = sorted(p.name for p in tmp_path.iterdir())
    real, writes = modelio.ShardWriter.write, []

    def fail_midway(self, name, t):
        writes.append(name)
        if len(writes) == 10:
            raise OSError("disk full")
        real(self, name, t)
    monkeypatch.setattr(modelio.ShardWriter, "write", fail_midway)
    with pytest.raises(OSError, match="disk full"):
        fusion.fuse_to_disk(anchor, parents, tmp_path / "out", max_shard_size="40KB")
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no output, no staging directory
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep").write_text("x")
    monkeypatch.undo()
    with pytest.raises(InvalidOptionError, match="already exists"):
        fusion.fuse_to_disk(anchor, parents, tmp_path / "out")
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["keep"]
    with pytest.raises(TypeError):
        fusion.fuse_to_disk(anchor, parents, tmp_path / "o2", regg=0.1)


def test_the_fuse_workflow_streams_parents_and_writes_as_it_goes(tmp_path, load_calls, monkeypatch):
    """`otcompress fuse` (pipeline.run) with directory parents and nothing to
    train: parents are never loaded whole, the fused model is never built
    (written tensor by tensor), and the directory holds the same bits as the
    in-memory fusion, with the workflow's other files."""
    from otcompress import pipeline
    anchor = _save(M.bert(seed=1), tmp_path / "a")
    parents = [_save(M.bert(hidden=48, heads=6, inter=96, seed=s), tmp_path / f"p{s}", "40KB") for s in (2, 3)]
    expected = otcompress.fuse(M.bert(seed=1), [M.bert(hidden=48, heads=6, inter=96, seed=s) for s in (2, 3)],
                               weights=[0.5, 0.25, 0.25])
    built = []
    load_calls.clear()
    monkeypatch.setattr(fusion, "build_model", lambda *a, **k: built.append(1) or pytest.fail("model built"))
    model, report = pipeline.run(anchor, parents, {"alignment": "weights", "weights": [0.5, 0.25, 0.25]},
                                 tmp_path / "out")
    assert model is None and not built
    assert [c for c in load_calls if isinstance(c, str)] == [anchor]  # parents were streamed
    back = T.BertForMaskedLM.from_pretrained(tmp_path / "out")
    assert _same(back, expected)
    assert not _same(back, M.bert(seed=1))  # not the anchor
    assert json.loads((tmp_path / "out" / "fusion_report.json").read_text())["parents"] == parents
    assert (tmp_path / "out" / "README.md").is_file() and (tmp_path / "out" / "otcompress_config.yaml").is_file()
    assert report["wall_seconds"] > 0 and report["metrics"] == {}


def test_the_fuse_workflow_loads_parents_it_distils_from(tmp_path, load_calls):
    from otcompress import pipeline
    from otcompress.data import load_data
    anchor = M.vit(seed=1)
    parents = [_save(M.vit(hidden=48, heads=6, inter=96, seed=s), tmp_path / f"p{s}") for s in (2, 3)]
    data = load_data("digits", anchor, samples=200)
    model, _ = pipeline.run(anchor, parents, {"alignment": "weights", "finetune_steps": 2, "batch_size": 32},
                            data=data)
    assert sorted(c for c in load_calls if isinstance(c, str)) == parents  # the teachers
    assert model is not None


@pytest.mark.parametrize("alignment", ["weights", "fold"])
def test_a_streamed_parent_with_a_nan_is_refused_naming_the_tensor(tmp_path, load_calls, alignment):
    """The API streams parent directories; their values were not checked
    there (the CLI checked them): a NaN layer-norm bias fused into a NaN
    model, and folding raised an AttributeError."""
    from safetensors.torch import load_file, save_file
    anchor = _save(M.bert(seed=1), tmp_path / "a")
    parent = _save(M.bert(hidden=48, heads=6, inter=96, seed=2), tmp_path / "p")
    tensors = load_file(f"{parent}/model.safetensors")
    name = "bert.encoder.layer.1.output.LayerNorm.bias"
    tensors[name][0] = float("nan")
    save_file(tensors, f"{parent}/model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ModelLoadError, match=f"tensor {name} is not finite"):
        otcompress.fuse(anchor, [parent], alignment=alignment)
    assert parent not in load_calls  # refused as it streamed, not by loading it


def test_a_directory_with_a_single_file_and_an_index_streams_what_from_pretrained_loads(tmp_path):
    """`from_pretrained` takes model.safetensors over a sharded index beside
    it; streaming read the shards, so the same directory fused one model
    in `fuse` and another wherever it was loaded."""
    import shutil
    single, sharded = M.bert(hidden=48, heads=6, inter=96, seed=2), M.bert(hidden=48, heads=6, inter=96, seed=3)
    both = _save(sharded, tmp_path / "both", "30KB")
    shutil.copy(_save(single, tmp_path / "single") + "/model.safetensors", f"{both}/model.safetensors")
    assert _same(T.BertForMaskedLM.from_pretrained(both), single)
    lazy = modelio.LazyStateDict(both)
    assert all(torch.equal(lazy[k], v) for k, v in single.state_dict().items() if k in lazy)
