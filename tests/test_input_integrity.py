"""Issue 18, items 3-4: a checkpoint missing a tensor (or storing unexpected
ones) and a tensor with NaN or Inf are refused before any work, with one line
naming the tensor; legitimate checkpoints (tied weights stored once, old
position_ids buffers) still load."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import BertForSequenceClassification, BertModel

import models as M
from clirun import refused, run


def edit(directory, change):
    """Rewrite a saved model's safetensors with `change(state_dict)` applied."""
    f = directory / "model.safetensors"
    sd = load_file(f)
    change(sd)
    save_file(sd, f, metadata={"format": "pt"})
    return directory


@pytest.fixture(scope="module")
def z(tmp_path_factory):
    d = tmp_path_factory.mktemp("integrity")
    M.vit(seed=1).save_pretrained(d / "anchor")
    for name in ("wide", "missing", "unexpected", "nan", "inf_query"):
        M.vit(hidden=48, heads=6, inter=96, seed=2).save_pretrained(d / name)
    edit(d / "missing", lambda sd: sd.pop("vit.encoder.layer.1.output.dense.weight"))
    edit(d / "unexpected", lambda sd: sd.__setitem__("vit.extra.weight", torch.zeros(3)))
    edit(d / "nan", lambda sd: sd["classifier.weight"].__setitem__((0, 0), float("nan")))
    edit(d / "inf_query", lambda sd: sd["vit.encoder.layer.0.attention.attention.query.weight"]
         .__setitem__((1, 1), float("inf")))
    return d


def fuse(capsys, z, out, parent, *extra):
    return run(capsys, "fuse", "--anchor", z / "anchor", "--parents", parent, "--out", out, *extra)


# transformers 5 names ViT's tensors otherwise than its (4.x) checkpoint files; errors use the model's names.
MISSING = "vit.layers.1.mlp.fc2.weight"  # stored as vit.encoder.layer.1.output.dense.weight
# Weights alignment without data streams the parents tensor by tensor; activations load them whole.
PATHS = [["--alignment", "weights"], ["--alignment", "activations", "--data", "digits", "--samples", "32"]]


@pytest.mark.parametrize("extra", PATHS, ids=["streamed", "loaded"])
def test_a_parent_missing_a_tensor_is_refused_naming_it(z, tmp_path, capsys, extra):
    code, _, err = fuse(capsys, z, tmp_path / "out", z / "missing", *extra)
    refused(code, err, "missing", MISSING)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("extra", PATHS, ids=["streamed", "loaded"])
def test_a_parent_with_an_unexpected_tensor_is_refused_naming_it(z, tmp_path, capsys, extra):
    refused(*fuse(capsys, z, tmp_path / "out", z / "unexpected", *extra)[::2], "unexpected", "vit.extra.weight")


def test_a_tensor_of_the_wrong_shape_is_named(tmp_path, capsys):
    model = edit(_saved(tmp_path), lambda sd: sd.__setitem__("classifier.weight", torch.zeros(5, 32)))
    refused(*run(capsys, "profile", model, "--no-onnx", "--repeats", 1)[::2],
            "tensor classifier.weight has shape [5, 32], the config asks for [10, 32]")


def _saved(tmp_path):
    M.vit(seed=1).save_pretrained(tmp_path / "m")
    return tmp_path / "m"


def test_an_incomplete_anchor_or_teacher_is_refused(z, tmp_path, capsys):
    code, _, err = run(capsys, "fuse", "--anchor", z / "missing", "--parents", z / "wide", "--out", tmp_path / "o",
                       "--alignment", "weights")
    refused(code, err, "missing")
    code, _, err = run(capsys, "finetune", z / "wide", "--data", "digits", "--steps", "1",
                       "--out", tmp_path / "ft", "--teachers", z / "missing")
    refused(code, err, "missing", MISSING)


def test_a_headless_checkpoint_under_a_head_class_is_refused(tmp_path, capsys):
    base = M.bert(cls=BertModel)
    base.save_pretrained(tmp_path / "encoder")
    cfg = json.loads((tmp_path / "encoder" / "config.json").read_text())
    cfg["architectures"] = ["BertForSequenceClassification"]  # says it has a head; stores none
    (tmp_path / "encoder" / "config.json").write_text(json.dumps(cfg))
    code, _, err = run(capsys, "profile", tmp_path / "encoder", "--no-onnx", "--repeats", "1")
    refused(code, err, "missing", "classifier.weight")


def test_legitimate_checkpoints_still_load(tmp_path):
    from otcompress import modelio
    # Tied MLM decoder stored once; an old checkpoint's position_ids buffer; a head-free class.
    mlm = M.bert()
    mlm.save_pretrained(tmp_path / "mlm")
    edit(tmp_path / "mlm", lambda sd: sd.__setitem__("bert.embeddings.position_ids", torch.arange(32)[None]))
    M.bert(cls=BertModel).save_pretrained(tmp_path / "enc")
    M.bert(cls=BertForSequenceClassification).save_pretrained(tmp_path / "cls")
    for name in ("mlm", "enc", "cls"):
        modelio.load_model(tmp_path / name)
    assert modelio.lazy_model(tmp_path / "enc") is not None  # a complete checkpoint still streams


@pytest.mark.parametrize("extra", PATHS, ids=["streamed", "loaded"])
def test_non_finite_parent_weights_are_refused_naming_the_tensor(z, tmp_path, capsys, extra):
    refused(*fuse(capsys, z, tmp_path / "out", z / "nan", *extra)[::2], "classifier.weight", "1 NaN")
    refused(*fuse(capsys, z, tmp_path / "out", z / "inf_query", *extra)[::2],
            "vit.layers.0.attention.q_proj.weight", "1 infinite")
    assert not (tmp_path / "out").exists()


def test_non_finite_teacher_or_model_is_refused(z, tmp_path, capsys):
    code, _, err = run(capsys, "finetune", z / "wide", "--data", "digits", "--steps", "1",
                       "--out", tmp_path / "ft", "--teachers", z / "nan")
    refused(code, err, "classifier.weight", "NaN")
    refused(*run(capsys, "export", z / "nan", "--out", tmp_path / "m.onnx")[::2], "classifier.weight")
    assert not list(tmp_path.iterdir())


def overflowing(seed=1):
    """Finite weights whose logits overflow to +-inf (so the loss is NaN): what
    the load-time check cannot see."""
    model = M.vit(seed=seed)
    with torch.no_grad():
        model.classifier.weight.fill_(3e38)
        model.classifier.weight[1::2] *= -1
    return model


def test_eval_flags_a_nan_loss_instead_of_printing_accuracy(tmp_path, capsys):
    overflowing().save_pretrained(tmp_path / "m")
    code, out, err = run(capsys, "eval", tmp_path / "m", "--data", "digits", "--json")
    result = json.loads(out)
    assert code == 0 and result["not_finite"] == ["loss"] and result["accuracy"] is None, err
    assert "loss not finite" in err and "no other figure is reported" in err


def test_a_nan_teacher_is_blamed_not_the_learning_rate():
    from otcompress.data import load_data
    from otcompress.errors import InvalidOptionError
    from otcompress.finetune import finetune
    student = M.vit(seed=2)
    data = load_data("digits", student)
    with pytest.raises(InvalidOptionError, match="teacher 1's outputs are not finite") as e:
        finetune(student, data, steps=2, teachers=[overflowing()])
    assert "lr" not in str(e.value)
    with pytest.raises(InvalidOptionError, match="model's outputs are not finite .* before any training step"):
        finetune(overflowing(), data, steps=2)
