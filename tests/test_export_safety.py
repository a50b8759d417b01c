"""Issue 18, items 4-5: the ONNX parity gate fails on NaN; `export --quantize
int8 --data` checks everything before writing, feeds token_type_ids its
tokenizer does not give, and leaves no file when it fails; `--force`
replaces only an ONNX file otcompress wrote."""
import json

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification

from clirun import refused, run
from otcompress.data import pydoc_paragraphs, train_wordpiece_tokenizer
from otcompress.errors import ValidationGateError
from otcompress.export import export_onnx, marked

import models as M


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    """A BERT classifier whose tokenizer returns no token_type_ids (as transformers
    5 fast tokenizers may), and a labelled .jsonl."""
    d = tmp_path_factory.mktemp("export-safety")
    texts = pydoc_paragraphs("train")[:200]
    tok = train_wordpiece_tokenizer(texts, 300, d / "model")
    cfg = json.loads((d / "model" / "tokenizer_config.json").read_text())
    cfg["model_input_names"] = ["input_ids", "attention_mask"]
    (d / "model" / "tokenizer_config.json").write_text(json.dumps(cfg))
    torch.manual_seed(0)
    BertForSequenceClassification(BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1,
                                             num_attention_heads=2, intermediate_size=64, num_labels=2,
                                             max_position_embeddings=64)).save_pretrained(d / "model")
    with open(d / "train.jsonl", "w") as f:
        for i, t in enumerate(texts[:120]):
            f.write(json.dumps({"text": t, "label": i % 2}) + "\n")
    return d


def test_the_tokenizer_really_gives_no_token_type_ids(classifier):
    from transformers import AutoTokenizer
    assert "token_type_ids" not in AutoTokenizer.from_pretrained(classifier / "model")(["a b"])


def test_int8_with_data_feeds_zero_token_types(classifier, tmp_path, capsys):
    out = tmp_path / "m.onnx"
    code, stdout, err = run(capsys, "export", classifier / "model", "--out", out, "--quantize", "int8",
                            "--data", classifier / "train.jsonl", "--json")
    assert code == 0, err
    accuracy = json.loads(stdout)["quantized"]["accuracy"]
    assert accuracy["examples"] == 30 and abs(accuracy["delta"]) <= 0.1
    assert marked(out) and marked(tmp_path / "m.int8.onnx")


def test_unlabelled_data_is_refused_before_any_file(classifier, tmp_path, capsys):
    out = tmp_path / "m.onnx"
    refused(*run(capsys, "export", classifier / "model", "--out", out, "--quantize", "int8",
                 "--data", "pydoc")[::2], "has no labels")
    refused(*run(capsys, "export", classifier / "model", "--out", out, "--data", "digits")[::2],
            "give --quantize int8 too")
    assert list(tmp_path.iterdir()) == []


def test_force_replaces_only_an_onnx_file_otcompress_wrote(classifier, tmp_path, capsys):
    model = classifier / "model"
    out = tmp_path / "m.onnx"
    out.write_text("my notes")
    refused(*run(capsys, "export", model, "--out", out, "--force")[::2], "otcompress did not write it")
    assert out.read_text() == "my notes"
    out.unlink()
    (tmp_path / "m.int8.onnx").write_text("mine too")  # the int8 copy's place is checked too
    refused(*run(capsys, "export", model, "--out", out, "--quantize", "int8", "--force")[::2], "m.int8.onnx")
    assert not out.exists() and (tmp_path / "m.int8.onnx").read_text() == "mine too"
    (tmp_path / "m.int8.onnx").unlink()
    assert run(capsys, "export", model, "--out", out, "--quantize", "int8")[0] == 0
    code, _, err = run(capsys, "export", model, "--out", out, "--quantize", "int8", "--force")
    assert code == 0 and f"--force: replacing {out}, an earlier otcompress output" in err
    # Replaced without --quantize: the earlier int8 copy stays (never deleted unasked), and is named as stale.
    code, _, err = run(capsys, "export", model, "--out", out, "--force")
    assert code == 0 and "m.int8.onnx is from an earlier export, not of this model" in err
    assert (tmp_path / "m.int8.onnx").exists()


def test_parity_gate_fails_on_nan_outputs(tmp_path):
    model = M.vit()
    with torch.no_grad():
        model.classifier.weight[0, 0] = float("nan")
    with pytest.raises(ValidationGateError, match="NaN outputs"):
        export_onnx(model, tmp_path / "m.onnx")
    assert list(tmp_path.iterdir()) == []
