"""Headless (embedding) models: pooling, the similarity objective, scoring
against wider references, training, reg auto and the fuse workflow."""
import json

import pytest
import torch
import transformers as T

import models as M
from otcompress import embedding, pipeline
from otcompress import finetune as ft
from otcompress.data import TaskData
from otcompress.errors import InvalidOptionError


def _text_data(vocab=60, n_train=96, n_eval=48, seed=0):
    g = torch.Generator().manual_seed(seed)

    def split(n):
        ids = torch.randint(4, vocab, (n, 12), generator=g)
        mask = torch.ones_like(ids)
        lengths = torch.randint(5, 13, (n,), generator=g)
        mask[torch.arange(12)[None, :] >= lengths[:, None]] = 0
        return {"input_ids": ids * mask, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}

    return TaskData("feature-extraction", {"train": split(n_train), "eval": split(n_eval)}, pooling="mean")


def test_pooling_counts_real_tokens_only():
    hidden = torch.arange(2 * 4 * 3, dtype=torch.float).reshape(2, 4, 3)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    assert torch.allclose(embedding.pool(hidden, mask, "mean")[0], hidden[0, :2].mean(0))
    assert torch.equal(embedding.pool(hidden, mask, "cls"), hidden[:, 0])
    assert torch.equal(embedding.pool(hidden, mask, "last"), torch.stack([hidden[0, 1], hidden[1, 3]]))
    assert torch.equal(embedding.pool(hidden, mask, "max")[0], hidden[0, 1])
    with pytest.raises(InvalidOptionError, match="pooling 'sum'"):
        embedding.pool(hidden, mask, "sum")


def test_agreement_is_width_free_and_can_fail():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(700, 16, generator=g)  # more rows than one block
    q, _ = torch.linalg.qr(torch.randn(32, 32, generator=g))
    wider = torch.cat([x, torch.zeros(700, 16)], 1) @ q * 3.0  # rotated, padded, rescaled
    same = embedding._pairwise_agreement(x, [wider])
    assert same["loss"] < 1e-12 and same["similarity_pearson"] > 1 - 1e-9
    other = embedding._pairwise_agreement(x, [torch.randn(700, 32, generator=g)])
    assert other["loss"] > 1e-3 and abs(other["similarity_pearson"]) < 0.1
    # Against two references: their mean similarity, as in training.
    both = embedding._pairwise_agreement(x, [wider, wider])
    assert both["loss"] < 1e-12


def test_widened_copy_scores_perfectly_and_another_model_does_not():
    data = _text_data()
    model = M.bert(cls=T.BertModel, seed=1)
    wide = M.transform(model, widen=True)
    perfect = ft.evaluate(model, data, reference=[wide])
    assert perfect["loss"] < 1e-9 and perfect["similarity_pearson"] > 1 - 1e-6 and perfect["examples"] == 48
    other = ft.evaluate(M.bert(cls=T.BertModel, seed=2), data, reference=[wide])
    assert other["loss"] > 1e-3
    with pytest.raises(InvalidOptionError, match="reference models"):
        ft.evaluate(model, data)


def test_headless_training_distils_the_teachers_similarities():
    data = _text_data()
    teacher = M.bert(hidden=48, heads=6, inter=96, cls=T.BertModel, seed=2)
    student = M.bert(cls=T.BertModel, seed=1)
    before = ft.evaluate(student, data, reference=[teacher])["loss"]
    summary = ft.finetune(student, data, steps=40, lr=3e-3, batch_size=32, teachers=[teacher])
    after = ft.evaluate(student, data, reference=[teacher])["loss"]
    assert after < 0.5 * before, (before, after)
    assert summary["final_loss"] < summary["first_loss"]
    with pytest.raises(InvalidOptionError, match="no task head"):
        ft.finetune(M.bert(cls=T.BertModel), data, steps=1)


def test_reg_auto_scores_headless_parents_by_embeddings():
    from otcompress import fuse
    data = _text_data()
    anchor = M.bert(cls=T.BertModel, seed=1)
    parents = [M.bert(hidden=48, heads=6, inter=96, cls=T.BertModel, seed=s) for s in (2, 3)]
    held = list(data.batches("eval", 16))
    model = fuse(anchor, parents, reg="auto", reg_grid=(0.01, 0.5), data=held)
    losses = [row["loss"] for row in model.fusion_report["reg_sweep"]]
    assert len(losses) == 2 and all(l is not None and l > 0 for l in losses)
    assert len(set(losses)) == 2  # the two regs give different models, told apart


def _save_st(model, path, pooling):
    """A sentence-transformers-style checkpoint directory."""
    model.save_pretrained(path)
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
    (path / "modules.json").write_text(json.dumps(modules))
    (path / "1_Pooling").mkdir()
    (path / "1_Pooling" / "config.json").write_text(json.dumps(
        {"word_embedding_dimension": model.config.hidden_size, f"pooling_mode_{pooling}": True}))


def test_checkpoint_pooling(tmp_path):
    _save_st(M.bert(cls=T.BertModel), tmp_path / "cls", "cls_token")
    assert embedding.checkpoint_pooling(tmp_path / "cls") == "cls"
    assert embedding.checkpoint_pooling(tmp_path) is None
    assert embedding.pooling_mode(M.vit(cls=T.ViTModel).config) == "cls"
    assert embedding.pooling_mode(M.bert(cls=T.BertModel).config) == "mean"


def test_fuse_workflow_on_headless_models(tmp_path):
    """The default recipe on embedding models: the race, finetuning and the
    metrics all use the embedding objective against the parents."""
    data = _text_data(n_train=160)
    anchor = M.bert(hidden=16, heads=2, inter=32, cls=T.BertModel, seed=1)
    parents = [M.bert(cls=T.BertModel, seed=s) for s in (2, 3)]
    recipe = {"finetune_steps": 8, "batch_size": 32, "samples": 64}
    model, report = pipeline.run(anchor, parents, recipe, tmp_path / "out", data=data)
    rows = {c["candidate"]: c for c in report["race"]["candidates"]}
    assert set(rows) >= {"anchor", "fold: all parents", "fold: parent 1", "prune: parent 2"}
    assert rows["fold: all parents"]["lead"] == 1.0  # the embedding objective ranks it on its plain loss
    assert "parents_holdout_loss" not in report["race"]  # the parents are the target: not far-behind judged
    metrics = report["metrics"]
    assert set(metrics) == {"anchor", "fused (one-shot)", "fused + 8 steps"}
    assert all(0 < m["loss"] and -1 <= m["similarity_pearson"] <= 1 for m in metrics.values())
    assert T.BertModel.from_pretrained(tmp_path / "out").config.hidden_size == 16
    with pytest.raises(InvalidOptionError, match="headless"):
        pipeline.run(anchor, parents, {**recipe, "distill": False}, data=data)


def test_int8_export_reports_the_embedding_cosine(tmp_path):
    from otcompress.export import export_onnx, int8_agreement
    data = _text_data()
    model = M.bert(cls=T.BertModel, seed=1)
    report = export_onnx(model, tmp_path / "m.onnx", quantize="int8")
    q = int8_agreement(tmp_path / "m.onnx", report["quantized"]["path"], data)
    assert q["examples"] == 48 and q["pooling"] == "mean"
    assert 0.9 < q["embedding_cosine"] < 1 - 1e-6 and q["embedding_cosine_min"] <= q["embedding_cosine"]
    same = int8_agreement(tmp_path / "m.onnx", tmp_path / "m.onnx", data)
    assert same["embedding_cosine_min"] > 1 - 1e-6


@pytest.fixture(scope="module")
def st_models(tmp_path_factory):
    """Sentence-transformers-style BERT checkpoints with a tokenizer, and a text file."""
    d = tmp_path_factory.mktemp("st")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(55)]
    tok = T.BertTokenizerFast(vocab={t: i for i, t in enumerate(vocab)})
    for name, hidden, heads, seed in (("small", 16, 2, 1), ("big1", 32, 4, 2), ("big2", 32, 4, 3)):
        _save_st(M.bert(hidden=hidden, heads=heads, inter=2 * hidden, cls=T.BertModel, seed=seed), d / name, "mean_tokens")
        tok.save_pretrained(d / name)
    g = torch.Generator().manual_seed(0)
    lines = [" ".join(f"w{int(i)}" for i in torch.randint(0, 55, (int(n),), generator=g))
             for n in torch.randint(3, 20, (300,), generator=g)]
    (d / "texts.txt").write_text("\n".join(lines) + "\n")
    return d


def _cli(capsys, *args):
    """(exit code, stdout, stderr) of one otcompress command run in-process."""
    from otcompress.cli import main
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in args])
    out = capsys.readouterr()
    return e.value.code, out.out, out.err


def test_cli_embedding_models_end_to_end(st_models, tmp_path, capsys):
    """The issue's failing commands on a sentence-transformers checkpoint:
    activations fusion on unlabelled text, reg auto, finetuning, eval."""
    d = st_models
    run = lambda *args: _cli(capsys, *args)  # noqa: E731

    out = tmp_path / "fused"
    code, stdout, err = run("fuse", "--anchor", d / "small", "--parents", d / "big1", d / "big2", "--out", out,
                            "--alignment", "activations", "--reg", "auto", "--data", d / "texts.txt",
                            "--samples", 64, "--steps", 10, "--json")
    assert code == 0, err
    report = json.loads(stdout)["report"]
    assert {"anchor", "fused (one-shot)", "fused + 10 steps"} <= set(report["metrics"])
    assert all("similarity_pearson" in m for m in report["metrics"].values())
    assert len(report["reg_sweep"]) > 1 and report["options"]["reg"] in [r["reg"] for r in report["reg_sweep"]]
    assert (out / "modules.json").is_file() and (out / "1_Pooling" / "config.json").is_file()
    code, stdout, err = run("eval", out, "--data", d / "texts.txt", "--reference", d / "big1", d / "big2", "--json")
    assert code == 0, err
    assert json.loads(stdout)["examples"] == 300  # a user's file: every line
    ft_out = tmp_path / "ft"
    code, stdout, err = run("finetune", out, "--data", d / "texts.txt", "--steps", 3, "--batch-size", 32,
                            "--teachers", d / "big1", "--out", ft_out, "--json")
    assert code == 0, err
    assert (ft_out / "modules.json").is_file() and (ft_out / "1_Pooling" / "config.json").is_file()


def test_the_pooling_a_run_was_told_is_written_with_the_model(st_models, tmp_path, capsys):
    """--pooling cls on mean-pooled checkpoints: the written 1_Pooling says cls
    (as it was trained and scored), for fuse and finetune alike."""
    d = st_models
    code, _, err = _cli(capsys, "fuse", "--anchor", d / "small", "--parents", d / "big1", "--out", tmp_path / "f",
                        "--alignment", "weights", "--data", d / "texts.txt", "--samples", 32, "--pooling", "cls", "-q")
    assert code == 0, err
    modes = lambda out: {k for k, v in json.loads((out / "1_Pooling" / "config.json").read_text()).items()  # noqa: E731
                         if k.startswith("pooling_mode_") and v}
    assert modes(tmp_path / "f") == {"pooling_mode_cls_token"}
    code, _, err = _cli(capsys, "finetune", d / "small", "--data", d / "texts.txt", "--steps", 1, "--teachers",
                        d / "big1", "--pooling", "max", "--out", tmp_path / "t", "-q")
    assert code == 0, err
    assert modes(tmp_path / "t") == {"pooling_mode_max_tokens"}


def test_pooling_option_reaches_scoring_and_is_refused_for_models_with_a_head(st_models, tmp_path, capsys):
    d = st_models
    run = lambda *args: _cli(capsys, *args)  # noqa: E731

    scores = {}
    for pooling in ("mean", "cls"):
        code, stdout, err = run("eval", d / "small", "--data", d / "texts.txt", "--reference", d / "big1",
                                "--pooling", pooling, "--json")
        assert code == 0, err
        scores[pooling] = json.loads(stdout)["loss"]
    assert scores["mean"] != scores["cls"]
    M.bert(vocab=60).save_pretrained(tmp_path / "mlm")
    for args in (["eval", tmp_path / "mlm", "--data", d / "texts.txt"],
                 ["fuse", "--anchor", tmp_path / "mlm", "--parents", tmp_path / "mlm", "--out", tmp_path / "o",
                  "--data", d / "texts.txt"]):
        code, _, err = run(*args, "--pooling", "cls")
        assert code == 2 and err.count("\n") == 1 and "applies to headless (embedding) models" in err, err


def test_reg_auto_pools_as_told():
    from otcompress import fuse
    data = _text_data()
    anchor = M.bert(cls=T.BertModel, seed=1)
    parents = [M.bert(hidden=48, heads=6, inter=96, cls=T.BertModel, seed=2)]
    held = list(data.batches("eval", 16))
    losses = {p: [row["loss"] for row in fuse(anchor, parents, reg="auto", reg_grid=(0.01, 0.5), data=held,
                                              pooling=p).fusion_report["reg_sweep"]] for p in ("mean", "cls")}
    assert losses["mean"] != losses["cls"]
