"""load_data on real data: digits, pydoc, image folders, text files, saved datasets."""
import json

import numpy as np
import pytest
import torch
from transformers import (AutoTokenizer, BertConfig, BertForMaskedLM,
                          BertForSequenceClassification, ViTConfig)

from otcompress.data import (DIGITS_MEAN, DIGITS_STD, load_data, pydoc_paragraphs,
                             train_wordpiece_tokenizer)
from otcompress.errors import DataError, InvalidOptionError




def vit_config(size=8, channels=1, labels=10):
    return ViTConfig(image_size=size, num_channels=channels, patch_size=4, hidden_size=16,
                     num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                     num_labels=labels)


def bert_config(vocab, labels=2, arch=None):
    return BertConfig(vocab_size=vocab, hidden_size=16, num_hidden_layers=1,
                      num_attention_heads=2, intermediate_size=32, max_position_embeddings=64,
                      num_labels=labels, architectures=arch)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    out = tmp_path_factory.mktemp("tok")
    return train_wordpiece_tokenizer(pydoc_paragraphs("train"), 400, out), out


# --------------------------------------------------------------------------- digits


def test_digits_split_is_stratified_and_fixed():
    a = load_data("digits", vit_config(), seed=0)
    b = load_data("digits", vit_config(), seed=7)  # seed must not move the split
    assert a.task == "image-classification" and a.num_labels == 10
    assert (a.num_examples("train"), a.num_examples("eval")) == (1347, 450)
    for split in ("train", "eval"):
        assert torch.equal(a.splits[split]["pixel_values"], b.splits[split]["pixel_values"])
        assert torch.equal(a.splits[split]["labels"], b.splits[split]["labels"])
    counts = torch.bincount(a.splits["eval"]["labels"], minlength=10)
    total = counts + torch.bincount(a.splits["train"]["labels"], minlength=10)
    assert (counts - total * 0.25).abs().max() <= 1  # every class ~25% in eval
    x = a.splits["train"]["pixel_values"]
    assert abs(x.mean()) < 0.01 and abs(x.std() - 1) < 0.01  # documented mean/std
    assert a.class_names == [str(i) for i in range(10)]


def test_digits_batches_shapes_and_resize():
    small = load_data("digits", vit_config())
    batch = next(small.batches("train", 64))
    assert batch["pixel_values"].shape == (64, 1, 8, 8) and batch["labels"].shape == (64,)
    assert batch["pixel_values"].dtype == torch.float32 and batch["labels"].dtype == torch.int64
    big = load_data("digits", vit_config(size=16, channels=3))
    sizes = [len(b["labels"]) for b in big.batches("eval", 100)]
    assert sizes == [100, 100, 100, 100, 50]
    x = next(big.batches("eval", 8))["pixel_values"]
    assert x.shape == (8, 3, 16, 16)
    assert torch.equal(x[:, 0], x[:, 2])  # grey repeated to every channel
    assert sum(len(b["labels"]) for b in big.batches("train", 64, drop_last=True)) == 21 * 64
    assert sum(len(b["labels"]) for b in big.batches("train", 64, limit=100)) == 100


def test_batches_shuffle_is_seeded():
    data = load_data("digits", vit_config())
    first = lambda **kw: next(data.batches("train", 32, shuffle=True, **kw))["labels"]  # noqa: E731
    assert torch.equal(first(seed=1), first(seed=1))
    assert not torch.equal(first(seed=1), first(seed=2))
    assert torch.equal(next(data.batches("train", 32))["labels"], data.splits["train"]["labels"][:32])


def test_samples_and_calibration_batches():
    data = load_data("digits", vit_config(), samples=100, seed=3)
    assert data.num_examples("train") == 100 and data.num_examples("eval") == 450
    assert len(torch.unique(data.splits["train"]["labels"])) == 10  # stratified
    calib = list(data.calibration_batches(70, batch_size=32, seed=1))
    assert [len(b["pixel_values"]) for b in calib] == [32, 32, 6]
    assert all(set(b) == {"pixel_values"} for b in calib)
    again = next(data.calibration_batches(70, batch_size=32, seed=1))["pixel_values"]
    assert torch.equal(calib[0]["pixel_values"], again)


def test_image_processor_mean_std_is_used():
    class Processor:
        image_mean, image_std = [0.5], [0.5]

    data = load_data("digits", vit_config(), image_processor=Processor())
    ref = load_data("digits", vit_config())
    raw = ref.splits["eval"]["pixel_values"] * DIGITS_STD + DIGITS_MEAN
    assert torch.allclose(data.splits["eval"]["pixel_values"], (raw - 0.5) / 0.5, atol=1e-5)


# --------------------------------------------------------------------------- image folder


def write_image_folder(root):
    from PIL import Image

    rng = np.random.default_rng(0)
    for c, name in enumerate(["zebra", "apple", "mango"]):
        (root / name).mkdir(parents=True)
        for i in range(4):
            if i % 2:  # 12x12 RGB PNG
                img = rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)
                Image.fromarray(img).save(root / name / f"{i}.png")
            else:  # 6x6 grey float array in [0, 1]
                np.save(root / name / f"{i}.npy", rng.random((6, 6)).astype(np.float32))
    (root / "notes.txt").write_text("not a class")
    (root / "apple" / "README").write_text("skipped: not an image")
    return root


def test_image_folder_png_and_npy(tmp_path):
    root = write_image_folder(tmp_path / "imgs")
    data = load_data(str(root), vit_config(labels=3))
    assert data.class_names == ["apple", "mango", "zebra"]  # sorted
    assert data.num_labels == 3
    assert (data.num_examples("train"), data.num_examples("eval")) == (9, 3)
    assert sorted(data.splits["eval"]["labels"].tolist()) == [0, 1, 2]  # stratified
    batch = next(data.batches("train", 16))
    assert batch["pixel_values"].shape == (9, 1, 8, 8)
    assert torch.isfinite(batch["pixel_values"]).all()
    rgb = load_data(str(root), vit_config(size=16, channels=3, labels=3))
    assert next(rgb.batches("eval", 4))["pixel_values"].shape == (3, 3, 16, 16)
    with pytest.raises(DataError, match="3 classes but the model has 2"):
        load_data(str(root), vit_config(labels=2))


# --------------------------------------------------------------------------- text


def test_wordpiece_tokenizer_roundtrip(tokenizer):
    tok, folder = tokenizer
    assert len(tok) == 400 and tok.mask_token == "[MASK]"
    again = AutoTokenizer.from_pretrained(folder)
    text = "The assert statement raises AssertionError."
    assert again(text)["input_ids"] == tok(text)["input_ids"]
    assert tok(text)["input_ids"][0] == tok.cls_token_id


def test_txt_masked_lm(tmp_path, tokenizer):
    tok, _ = tokenizer
    path = tmp_path / "corpus.txt"
    lines = [" ".join(p.split()) for p in pydoc_paragraphs()[:200:2]]
    path.write_text("\n".join(lines) + "\n\n\n")
    data = load_data(str(path), BertForMaskedLM(bert_config(len(tok))), tokenizer=tok)
    assert data.task == "masked-lm" and data.num_labels is None
    assert (data.num_examples("train"), data.num_examples("eval")) == (90, 10)
    batch = next(data.batches("train", 32, seed=0))
    assert set(batch) == {"input_ids", "attention_mask", "token_type_ids", "labels"}
    assert batch["input_ids"].shape == batch["labels"].shape and batch["input_ids"].shape[1] <= 64
    masked = batch["labels"] != -100
    assert masked.any(1).all()  # every sequence predicts something
    real = batch["attention_mask"].bool()
    assert 0.08 < masked.sum() / real.sum() < 0.3
    original = data.splits["train"]["input_ids"][:32, :batch["input_ids"].shape[1]]
    assert torch.equal(batch["labels"][masked], original[masked])
    assert torch.equal(batch["input_ids"][~masked], original[~masked])  # only targets change
    # Eval masks are fixed, and so are train masks read in order (scoring); a training pass's follow the seed.
    ev = [next(data.batches("eval", 8, seed=s)) for s in (0, 9)]
    assert all(torch.equal(ev[0][k], ev[1][k]) for k in ev[0])
    assert torch.equal(next(data.batches("train", 32, seed=1))["labels"], batch["labels"])
    shuffled = [next(data.batches("train", 32, shuffle=True, seed=s))["labels"] for s in (1, 2)]
    assert not torch.equal(*shuffled)
    calib = next(data.calibration_batches(5, 8))
    assert set(calib) == {"input_ids", "attention_mask", "token_type_ids"}
    assert (calib["input_ids"] != tok.mask_token_id).all()


def test_jsonl_sequence_classification(tmp_path, tokenizer):
    tok, _ = tokenizer
    rows = [{"text": p, "label": ["neg", "pos"][i % 2]} for i, p in enumerate(pydoc_paragraphs()[:40])]
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    model = BertForSequenceClassification(bert_config(len(tok)))
    data = load_data(str(path), model, tokenizer=tok, max_length=32)
    assert data.task == "sequence-classification" and data.num_labels == 2
    assert data.class_names == ["neg", "pos"]
    batch = next(data.batches("eval", 64))
    assert batch["labels"].shape == (10,) and batch["input_ids"].shape[1] <= 32
    assert sorted(batch["labels"].tolist()) == [0] * 5 + [1] * 5
    # The same labelled file feeds a masked LM: labels ignored, same split.
    mlm = load_data(str(path), BertForMaskedLM(bert_config(len(tok))), tokenizer=tok)
    assert mlm.task == "masked-lm" and mlm.num_examples("eval") == 10
    assert "labels" not in mlm.splits["eval"]


def test_named_classes_take_the_model_s_own_ids(tmp_path, tokenizer):
    """Labels spelled as the model's label names get its ids, not sorted
    ones; a class it does not know is an error; unnamed (LABEL_k) models take
    class-index names as ids: a folder of classes "3" and "7" is 3 and 7."""
    tok, _ = tokenizer
    names = ["pos"] * 15 + ["neg"] * 10 + ["neu"] * 5  # counts tell the ids apart (sorted: neg 0, neu 1, pos 2)
    rows = [{"text": p, "label": n} for n, p in zip(names, pydoc_paragraphs()[:30])]
    path = tmp_path / "named.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    cfg = bert_config(len(tok), labels=3)
    cfg.id2label, cfg.label2id = {0: "pos", 1: "neg", 2: "neu"}, {"pos": 0, "neg": 1, "neu": 2}
    data = load_data(str(path), BertForSequenceClassification(cfg), tokenizer=tok, max_length=16)
    labels = torch.cat([data.splits[s]["labels"] for s in ("train", "eval")])
    assert data.class_names == ["pos", "neg", "neu"] and torch.bincount(labels).tolist() == [15, 10, 5]
    cfg.id2label, cfg.label2id = {0: "pos", 1: "neg", 2: "other"}, {"pos": 0, "neg": 1, "other": 2}
    with pytest.raises(DataError, match="class 'neu' is not one of the model's labels"):
        load_data(str(path), BertForSequenceClassification(cfg), tokenizer=tok)
    root = tmp_path / "digits"
    for name in ("3", "7"):
        (root / name).mkdir(parents=True)
        for i in range(4):
            np.save(root / name / f"{i}.npy", np.full((8, 8), float(name) / 10, dtype=np.float32))
    folder = load_data(str(root), vit_config())
    assert sorted(set(torch.cat([folder.splits[s]["labels"] for s in ("train", "eval")]).tolist())) == [3, 7]
    assert folder.class_names[3] == "3" and folder.class_names[7] == "7"


def test_a_jsonl_file_with_a_byte_order_mark_reads(tmp_path, tokenizer):
    tok, _ = tokenizer
    path = tmp_path / "bom.jsonl"
    path.write_text("\n".join(json.dumps({"text": p, "label": i % 2}) for i, p in enumerate(pydoc_paragraphs()[:20])),
                    encoding="utf-8-sig")
    data = load_data(str(path), BertForSequenceClassification(bert_config(len(tok))), tokenizer=tok, max_length=16)
    assert data.num_examples("train") + data.num_examples("eval") == 20


def test_unlabelled_text_for_classifier_calibrates_but_cannot_train(tmp_path, tokenizer):
    tok, _ = tokenizer
    path = tmp_path / "plain.txt"
    path.write_text("\n".join(" ".join(p.split()) for p in pydoc_paragraphs()[:20]))
    data = load_data(str(path), BertForSequenceClassification(bert_config(len(tok))),
                     tokenizer=tok)
    assert len(next(data.calibration_batches(4))["input_ids"]) == 4
    with pytest.raises(DataError, match="no labels"):
        next(data.batches("train", 4))


def test_pydoc_corpus(tokenizer):
    tok, _ = tokenizer
    paragraphs = pydoc_paragraphs()
    assert len(paragraphs) > 1000 and all(len(p.split()) >= 3 for p in paragraphs)
    train, ev = pydoc_paragraphs("train"), pydoc_paragraphs("eval")
    assert len(train) + len(ev) == len(paragraphs) and len(ev) == round(len(paragraphs) * 0.1)
    data = load_data("pydoc", bert_config(len(tok), arch=["BertForMaskedLM"]), tokenizer=tok)
    assert data.num_examples("train") == len(train) and data.num_examples("eval") == len(ev)


# --------------------------------------------------------------------------- datasets


def test_saved_image_dataset(tmp_path):
    import datasets
    from PIL import Image

    rng = np.random.default_rng(1)
    images = [Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8)) for _ in range(20)]
    ds = datasets.Dataset.from_dict({"image": images, "label": [i % 2 for i in range(20)]})
    ds = ds.cast_column("label", datasets.ClassLabel(names=["even", "odd"]))
    datasets.disable_progress_bars()
    ds.save_to_disk(str(tmp_path / "ds"))
    data = load_data(str(tmp_path / "ds"), vit_config(labels=2))
    assert data.class_names == ["even", "odd"]
    assert (data.num_examples("train"), data.num_examples("eval")) == (15, 5)
    assert next(data.batches("train", 4))["pixel_values"].shape == (4, 1, 8, 8)


def test_saved_text_dataset_dict_keeps_its_splits(tmp_path, tokenizer):
    import datasets

    tok, _ = tokenizer
    texts = pydoc_paragraphs()[:30]
    dd = datasets.DatasetDict({
        "train": datasets.Dataset.from_dict({"text": texts[:24], "labels": [0, 1, 2] * 8}),
        "test": datasets.Dataset.from_dict({"text": texts[24:], "labels": [0, 1, 2] * 2}),
    })
    datasets.disable_progress_bars()
    dd.save_to_disk(str(tmp_path / "dd"))
    model = BertForSequenceClassification(bert_config(len(tok), labels=3))
    data = load_data(str(tmp_path / "dd"), model, tokenizer=tok)
    assert (data.num_examples("train"), data.num_examples("eval")) == (24, 6)
    assert data.splits["eval"]["labels"].tolist() == [0, 1, 2, 0, 1, 2]
    direct = tok(texts[24], truncation=True, max_length=64)["input_ids"]
    assert data.splits["eval"]["input_ids"][0, :len(direct)].tolist() == direct


# --------------------------------------------------------------------------- errors


def test_bad_specs_raise_data_error(tmp_path, tokenizer):
    tok, _ = tokenizer
    (tmp_path / "table.csv").write_text("a,b\n1,2\n")
    (tmp_path / "empty").mkdir()
    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n{oops}\n')
    (tmp_path / "mixed.jsonl").write_text('{"text": "a", "label": 1}\n{"text": "b"}\n')
    (tmp_path / "ok.txt").write_text("one line\nanother line\n")
    for spec in ("nope", str(tmp_path / "missing"), str(tmp_path / "table.csv"),
                 str(tmp_path / "empty")):
        with pytest.raises(DataError, match=r"not 'digits', 'pydoc', an existing image folder"):
            load_data(spec, vit_config())
    bert = BertForMaskedLM(bert_config(len(tok)))
    cases = [
        (str(tmp_path / "bad.jsonl"), bert, {"tokenizer": tok}, "line 2 is not valid JSON"),
        (str(tmp_path / "mixed.jsonl"), BertForSequenceClassification(bert_config(len(tok))), {"tokenizer": tok},
         "line 2 has no 'label'"),
        (str(tmp_path / "ok.txt"), bert, {}, "needs a tokenizer"),
        (str(tmp_path / "ok.txt"), vit_config(), {}, "text data does not fit a vit model"),
        ("digits", bert, {"tokenizer": tok}, "image data does not fit a bert model"),
        ("pydoc", BertForMaskedLM(bert_config(100)), {"tokenizer": tok}, "400 tokens"),
    ]
    for spec, model, kwargs, message in cases:
        with pytest.raises(DataError, match=message):
            load_data(spec, model, **kwargs)


def test_bad_options_raise_invalid_option():
    data = load_data("digits", vit_config(), samples=50)
    with pytest.raises(InvalidOptionError, match="split must be"):
        next(data.batches("test", 8))
    with pytest.raises(InvalidOptionError, match="batch_size"):
        next(data.batches("train", 0))
    with pytest.raises(InvalidOptionError, match="samples"):
        load_data("digits", vit_config(), samples=0)
    with pytest.raises(InvalidOptionError, match="model must be"):
        load_data("digits", "vit")


# --------------------------------------------------------------------------- split "all", headless


def test_split_all_is_train_then_eval_and_default_eval_split(tmp_path, tokenizer):
    data = load_data("digits", vit_config())
    assert data.default_eval_split == "eval"  # built-in: the demo/zoo train on its train split
    assert data.num_examples("all") == 1797
    batches = list(data.batches("all", 500))
    assert [len(b["labels"]) for b in batches] == [500, 500, 347, 450]  # no batch spans both
    labels = torch.cat([b["labels"] for b in batches])
    assert torch.equal(labels, torch.cat([data.splits["train"]["labels"], data.splits["eval"]["labels"]]))
    assert sum(len(b["labels"]) for b in data.batches("all", 500, limit=1400)) == 1400
    root = write_image_folder(tmp_path / "imgs")
    folder = load_data(str(root), vit_config(labels=3))
    assert folder.default_eval_split == "all" and folder.num_examples("all") == 12
    tok, _ = tokenizer
    path = tmp_path / "c.txt"
    path.write_text("\n".join(" ".join(p.split()) for p in pydoc_paragraphs()[:50]))
    mlm = load_data(str(path), BertForMaskedLM(bert_config(len(tok))), tokenizer=tok)
    assert mlm.default_eval_split == "all" and mlm.num_examples("all") == 50
    # The eval part of "all" is scored with exactly the eval split's fixed masks.
    tail = list(mlm.batches("all", 64))[-1]
    ev = next(mlm.batches("eval", 64))
    assert all(torch.equal(tail[k], ev[k]) for k in ev)


def test_saved_dataset_dict_defaults_to_its_test_split(tmp_path, tokenizer):
    import datasets

    tok, _ = tokenizer
    texts = pydoc_paragraphs()[:12]
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": texts[:8]}),
                               "test": datasets.Dataset.from_dict({"text": texts[8:]})})
    datasets.disable_progress_bars()
    dd.save_to_disk(str(tmp_path / "dd"))
    data = load_data(str(tmp_path / "dd"), BertForMaskedLM(bert_config(len(tok))), tokenizer=tok)
    assert data.default_eval_split == "eval" and data.num_examples("eval") == 4


def test_headless_models_ignore_labels(tmp_path, tokenizer):
    from transformers import BertModel, ViTModel

    # A headless model carries HF's default num_labels=2; digits has 10 classes.
    for model in (ViTModel(vit_config(labels=2)), vit_config(labels=2)):
        if not hasattr(model, "config"):
            model.architectures = ["ViTModel"]
        data = load_data("digits", model)
        assert data.task == "feature-extraction" and not data.has_labels and data.num_labels is None
        assert "labels" not in data.splits["train"]
        batch = next(data.calibration_batches(8, 8))
        assert set(batch) == {"pixel_values"} and batch["pixel_values"].shape == (8, 1, 8, 8)
        assert data.pooling == "cls"  # ViT's embedding: the class token
        assert set(next(data.batches("eval", 8))) == {"pixel_values"}  # inputs only: no labels
    tok, _ = tokenizer
    rows = [{"text": p, "label": i % 10} for i, p in enumerate(pydoc_paragraphs()[:40])]
    path = tmp_path / "l.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    text = load_data(str(path), BertModel(bert_config(len(tok))), tokenizer=tok)
    assert text.task == "feature-extraction" and not text.has_labels
    assert set(next(text.calibration_batches(4, 4))) == {"input_ids", "attention_mask", "token_type_ids"}
    # A classifier still gets its label count checked.
    with pytest.raises(DataError, match="10 classes but the model has 2 labels"):
        load_data("digits", vit_config(labels=2))


def test_bad_split_name():
    data = load_data("digits", vit_config(), samples=50)
    with pytest.raises(InvalidOptionError, match="split must be one of train, eval, all"):
        data.num_examples("test")


def _unnamed_classifier(tmp_path, tok, tok_dir):
    """A saved 2-label BERT classifier with unnamed labels (LABEL_0, LABEL_1) and its tokenizer."""
    import shutil
    torch.manual_seed(0)
    model = BertForSequenceClassification(bert_config(len(tok)))
    model.save_pretrained(tmp_path / "cls")
    for f in tok_dir.iterdir():
        shutil.copy(f, tmp_path / "cls" / f.name)
    return tmp_path / "cls"


def _rows(path, labels):
    path.write_text("\n".join(json.dumps({"text": p, "label": n})
                              for n, p in zip(labels, pydoc_paragraphs()[:len(labels)])) + "\n")
    return str(path)


def test_finetuning_an_unnamed_classifier_records_the_class_names_it_learnt(tmp_path, tokenizer, capsys):
    """"neg"/"pos" are read as 0/1 (sorted); a file holding only "pos" read
    them as 0 alone, so the finetuned model scored a "pos" it knew as 1 as
    class 0 (100% became 0%). The names go into the output's config."""
    from clirun import run
    tok, tok_dir = tokenizer
    model = _unnamed_classifier(tmp_path, tok, tok_dir)
    both = _rows(tmp_path / "both.jsonl", ["neg", "pos"] * 12)
    code, out, _ = run(capsys, "finetune", model, "--data", both, "--steps", "2", "--out", tmp_path / "ft", "--json")
    assert code == 0 and json.loads(out)["class_names"] == ["neg", "pos"]
    settings = json.loads((tmp_path / "ft" / "finetune_report.json").read_text())["finetune"]
    assert settings["lr"] == 1e-3 and settings["seed"] == 0 and settings["batch_size"] > 0  # no lineage needed
    config = json.loads((tmp_path / "ft" / "config.json").read_text())
    assert config["id2label"] == {"0": "neg", "1": "pos"} and config["label2id"] == {"neg": 0, "pos": 1}
    pos = load_data(_rows(tmp_path / "pos.jsonl", ["pos"] * 6),
                    BertForSequenceClassification.from_pretrained(tmp_path / "ft"), tokenizer=tok)
    assert set(torch.cat([pos.splits[s]["labels"] for s in ("train", "eval")]).tolist()) == {1}


def test_labels_spelled_as_an_unnamed_model_s_own_take_its_ids(tmp_path, tokenizer):
    tok, _ = tokenizer
    model = BertForSequenceClassification(bert_config(len(tok)))
    data = load_data(_rows(tmp_path / "l1.jsonl", ["LABEL_1"] * 6), model, tokenizer=tok)
    assert set(torch.cat([data.splits[s]["labels"] for s in ("train", "eval")]).tolist()) == {1}


def test_finetuning_to_outputs_that_are_not_finite_writes_nothing(tmp_path, tokenizer, capsys):
    """lr 1e4: every training loss stays finite, the weights reach ~1e7 and
    the outputs NaN; the model was written and the command exited 0."""
    from clirun import refused, run
    tok, tok_dir = tokenizer
    model = _unnamed_classifier(tmp_path, tok, tok_dir)
    data = _rows(tmp_path / "both.jsonl", ["neg", "pos"] * 12)
    code, _, err = run(capsys, "finetune", model, "--data", data, "--steps", "3", "--lr", "1e4",
                       "--out", tmp_path / "ft")
    refused(code, err, "outputs are not finite after training", "nothing written")
    assert not (tmp_path / "ft").exists()


def test_a_saved_pixel_values_column_is_taken_as_already_processed(tmp_path):
    """A processor's output saved as "pixel_values" scores as the images it
    came from (it was normalised a second time: 12% against 90%)."""
    import datasets
    from PIL import Image
    rng = np.random.default_rng(1)
    arrays = [rng.integers(0, 256, (8, 8), dtype=np.uint8) for _ in range(20)]
    labels = [i % 2 for i in range(20)]
    datasets.disable_progress_bars()
    datasets.Dataset.from_dict({"image": [Image.fromarray(a) for a in arrays], "label": labels}).save_to_disk(
        str(tmp_path / "img"))
    images = load_data(str(tmp_path / "img"), vit_config(labels=2))
    processed = torch.cat([images.splits[s]["pixel_values"] for s in ("train", "eval")])
    idx = torch.cat([images.splits[s]["labels"] for s in ("train", "eval")])
    datasets.Dataset.from_dict({"pixel_values": processed.numpy().tolist(), "label": idx.tolist()}).save_to_disk(
        str(tmp_path / "pv"))
    pv = load_data(str(tmp_path / "pv"), vit_config(labels=2))
    again = torch.cat([pv.splits[s]["pixel_values"] for s in ("train", "eval")])
    assert sorted(map(tuple, again.flatten(1).tolist())) == sorted(map(tuple, processed.flatten(1).tolist()))


def test_text_lines_end_at_newlines_only(tmp_path, tokenizer):
    """Form feeds and U+2028 inside a line are text (splitlines() cut there:
    30 lines became 60 examples, and a valid JSONL row was 'not valid JSON')."""
    tok, _ = tokenizer
    model = BertForMaskedLM(bert_config(len(tok)))
    (tmp_path / "ff.txt").write_text("".join(f"line {i} one\x0cline {i} two\n" for i in range(30)))
    data = load_data(str(tmp_path / "ff.txt"), model, tokenizer=tok)
    assert data.num_examples("train") + data.num_examples("eval") == 30
    rows = [json.dumps({"text": f"a\u2028b {i}"}, ensure_ascii=False) for i in range(10)]
    (tmp_path / "u.jsonl").write_text("\n".join(rows) + "\n", encoding="utf-8")
    data = load_data(str(tmp_path / "u.jsonl"), model, tokenizer=tok)
    assert data.num_examples("train") + data.num_examples("eval") == 10


def test_a_language_model_ignores_labels_it_could_not_read(tmp_path, tokenizer):
    """Labels on some lines only, or of mixed types: a classifier's error, but
    a masked-LM (or causal-LM, headless) model never reads them ("line 2 has
    no 'label'" failed an MLM's eval)."""
    tok, _ = tokenizer
    texts = pydoc_paragraphs()[:12]
    rows = [{"text": t, **({"label": i % 2} if i % 3 else {})} for i, t in enumerate(texts)]
    (tmp_path / "partial.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    mixed = [{"text": t, "label": i if i % 2 else str(i)} for i, t in enumerate(texts)]
    (tmp_path / "mixed.jsonl").write_text("\n".join(json.dumps(r) for r in mixed) + "\n")
    for name, message in (("partial", "has no 'label'"), ("mixed", "all integers or all strings")):
        data = load_data(str(tmp_path / f"{name}.jsonl"), BertForMaskedLM(bert_config(len(tok))), tokenizer=tok)
        assert data.num_examples("train") + data.num_examples("eval") == 12
        with pytest.raises(DataError, match=message):
            load_data(str(tmp_path / f"{name}.jsonl"), BertForSequenceClassification(bert_config(len(tok))),
                      tokenizer=tok)


def test_a_class_too_rare_to_stratify_still_splits(tmp_path, tokenizer):
    """One example of a class: the stratified 75/25 split cannot be made, and
    eval of the whole file ("all") failed on it; it splits unstratified."""
    tok, _ = tokenizer
    labels = [0] * 10 + [1] * 9 + [2]
    (tmp_path / "rare.jsonl").write_text("\n".join(json.dumps({"text": t, "label": lab})
                                                    for t, lab in zip(pydoc_paragraphs(), labels)) + "\n")
    data = load_data(str(tmp_path / "rare.jsonl"), BertForSequenceClassification(bert_config(len(tok), labels=3)),
                     tokenizer=tok)
    assert data.num_examples("all") == 20 and data.num_examples("eval") == 5


def test_a_dataset_dict_whose_test_labels_are_hidden_evaluates_on_validation(tmp_path, tokenizer):
    """GLUE-style: test labels are -1 (hidden); it failed with "negative
    label -1" whatever split was asked for."""
    import datasets
    tok, _ = tokenizer
    texts = pydoc_paragraphs()[:36]
    dd = datasets.DatasetDict({
        "train": datasets.Dataset.from_dict({"text": texts[:24], "label": [0, 1] * 12}),
        "validation": datasets.Dataset.from_dict({"text": texts[24:30], "label": [1, 0] * 3}),
        "test": datasets.Dataset.from_dict({"text": texts[30:], "label": [-1] * 6}),
    })
    datasets.disable_progress_bars()
    dd.save_to_disk(str(tmp_path / "glue"))
    data = load_data(str(tmp_path / "glue"), BertForSequenceClassification(bert_config(len(tok))), tokenizer=tok)
    assert data.splits["eval"]["labels"].tolist() == [1, 0] * 3 and data.num_examples("train") == 24


def test_masked_lm_scores_of_any_split_do_not_depend_on_the_batch_size(tmp_path, tokenizer):
    """Masks are fixed per example wherever a split is read in order (eval of
    "all", a user file's default, drew new train masks per batch: 5.609 /
    5.627 at batch 1 / 256); training passes still draw new ones."""
    tok, _ = tokenizer
    model = BertForMaskedLM(bert_config(len(tok))).eval()
    data = load_data("pydoc", model, tokenizer=tok, max_length=32)
    from otcompress.finetune import evaluate
    scores = [evaluate(model, data, split="all", batch_size=b) for b in (3, 64)]
    assert scores[0]["tokens"] == scores[1]["tokens"] and scores[0]["loss"] == pytest.approx(scores[1]["loss"])
    one, two = (next(data.batches("train", 8, shuffle=True, seed=s))["labels"] for s in (1, 2))
    assert not torch.equal(one, two)


def test_a_missing_data_path_says_so_and_jsonl_takes_labels_too(tmp_path, tokenizer):
    tok, _ = tokenizer
    with pytest.raises(DataError, match="nope.txt': no such file or folder"):
        load_data(str(tmp_path / "nope.txt"), vit_config())
    rows = [json.dumps({"text": t, "labels": i % 2}) for i, t in enumerate(pydoc_paragraphs()[:12])]
    (tmp_path / "l.jsonl").write_text("\n".join(rows) + "\n")
    data = load_data(str(tmp_path / "l.jsonl"), BertForSequenceClassification(bert_config(len(tok))), tokenizer=tok)
    assert sorted(torch.cat([data.splits[s]["labels"] for s in ("train", "eval")]).tolist()) == [0] * 6 + [1] * 6


def test_an_image_holding_nan_is_a_data_error(tmp_path):
    """A .npy image with NaN evaluated to accuracy null, exit 0."""
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        for i in range(4):
            np.save(tmp_path / name / f"{i}.npy", np.full((8, 8), 0.5, dtype=np.float32))
    bad = np.full((8, 8), 0.5, dtype=np.float32)
    bad[2, 3] = np.nan
    np.save(tmp_path / "a" / "0.npy", bad)
    with pytest.raises(DataError, match="1 image\\(s\\) hold values that are not finite"):
        load_data(str(tmp_path), vit_config(labels=2))
