"""finetune / evaluate on real digits and pydoc text, and the zoo's cache."""
import math
import time

import pytest
import torch
from transformers import (BertConfig, BertForMaskedLM, ViTConfig,
                          ViTForImageClassification)

from otcompress.data import load_data, pydoc_paragraphs, train_wordpiece_tokenizer
from otcompress.errors import InvalidOptionError
from otcompress.finetune import evaluate, evaluate_ensemble, finetune, lr_at
from otcompress.zoo import cache_root, digits_vit, pydoc_bert, zoo_info




def tiny_vit(seed=0, labels=10):
    torch.manual_seed(seed)
    # Patch 4 (4 tokens) learns digits far faster in a few steps than patch 2.
    config = ViTConfig(image_size=8, num_channels=1, patch_size=4, hidden_size=32,
                       num_hidden_layers=1, num_attention_heads=4, intermediate_size=64,
                       num_labels=labels)
    return ViTForImageClassification(config)


@pytest.fixture(scope="module")
def digits():
    return load_data("digits", tiny_vit())


@pytest.fixture(scope="module")
def trained(digits):
    model = tiny_vit(seed=0)
    before = evaluate(model, digits)
    report = finetune(model, digits, steps=60, lr=5e-3, seed=0)
    return model, before, report


def params(model):
    return [p.detach().clone() for p in model.parameters()]


def test_finetune_learns_digits(trained, digits):
    model, before, report = trained
    after = evaluate(model, digits)
    assert before["accuracy"] < 0.2  # chance is 0.1
    assert after["accuracy"] > 0.6  # measured 0.73-0.82 over seeds
    assert after["loss"] < before["loss"] - 0.8
    assert report["steps"] == 60 and len(report["losses"]) == 60
    assert report["final_loss"] < report["first_loss"] - 0.8
    assert not model.training and report["seconds"] > 0


def test_finetune_is_deterministic_and_reports_progress(digits):
    calls = []
    runs = []
    for _ in range(2):
        model = tiny_vit(seed=1)
        report = finetune(model, digits, steps=15, seed=4, progress=lambda *a: calls.append(a))
        runs.append((report["losses"], params(model)))
    assert runs[0][0] == runs[1][0]
    assert all(torch.equal(a, b) for a, b in zip(runs[0][1], runs[1][1]))
    assert [c[:2] for c in calls[:15]] == [(i, 15) for i in range(1, 16)]
    assert set(calls[0][2]) == {"loss", "lr"}
    other = finetune(tiny_vit(seed=1), digits, steps=15, seed=5)
    assert other["losses"] != runs[0][0]  # the seed moves the batch order


def test_steps_zero_is_a_no_op(digits):
    model = tiny_vit()
    model.train()
    before = params(model)
    report = finetune(model, digits, steps=0)
    assert report["steps"] == 0 and report["first_loss"] is None
    assert all(torch.equal(a, b) for a, b in zip(before, params(model)))
    assert not model.training


def test_schedule_warms_up_then_decays():
    lrs = [lr_at(i, 100, 1.0, 0.1) for i in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:])) and 0 < lrs[-1] < 0.01


def test_distillation_from_teachers(trained, digits):
    teacher, _, _ = trained
    other_teacher = tiny_vit(seed=3)
    finetune(other_teacher, digits, steps=30, lr=5e-3, seed=3)
    student = tiny_vit(seed=9)
    report = finetune(student, digits, steps=40, lr=5e-3, seed=9,
                      teachers=[teacher, other_teacher], distill_alpha=0.7, temperature=2.0)
    assert all(math.isfinite(x) for x in report["losses"])
    assert report["final_loss"] < report["first_loss"] - 0.3
    assert report["final_task_loss"] < 2.0  # the hard-label loss fell too (2.3 at chance)
    assert evaluate(student, digits)["accuracy"] > 0.4
    with pytest.raises(InvalidOptionError, match="teacher .* outputs 5 classes"):
        finetune(tiny_vit(), digits, steps=1, teachers=[tiny_vit(labels=5)])


def test_bad_options(digits):
    for kwargs, message in [({"steps": -1}, "steps"), ({"steps": 1, "lr": 0}, "lr"),
                            ({"steps": 1, "distill_alpha": 2}, "distill_alpha"),
                            ({"steps": 1, "warmup": 1.5}, "warmup"),
                            ({"steps": 1, "temperature": 0}, "temperature")]:
        with pytest.raises(InvalidOptionError, match=message):
            finetune(tiny_vit(), digits, **kwargs)


def test_ensemble_averages_the_members_distributions(digits):
    """An ensemble of one scores as the model does; two average their
    distributions (whose cross-entropy is at most the members' mean: -log is
    convex). The models keep their mode."""
    a, b = tiny_vit(seed=0).eval(), tiny_vit(seed=1).train()
    alone, one = evaluate(a, digits), evaluate_ensemble([a], digits)
    assert (one["accuracy"], one["examples"]) == (alone["accuracy"], alone["examples"])
    assert one["loss"] == pytest.approx(alone["loss"], rel=1e-5)
    both = evaluate_ensemble([a, b], digits)
    assert both["loss"] <= (alone["loss"] + evaluate(b, digits)["loss"]) / 2 + 1e-6
    assert b.training and not a.training


@pytest.fixture(scope="module")
def pydoc_mlm(tmp_path_factory):
    tok = train_wordpiece_tokenizer(pydoc_paragraphs("train"), 300, tmp_path_factory.mktemp("t"))
    config = BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1,
                        num_attention_heads=2, intermediate_size=64, max_position_embeddings=64)
    torch.manual_seed(0)
    model = BertForMaskedLM(config)
    return model, load_data("pydoc", model, tokenizer=tok, samples=256, max_length=64)


def test_mlm_evaluate_is_deterministic_and_finetune_lowers_it(pydoc_mlm):
    model, data = pydoc_mlm
    first, second = evaluate(model, data), evaluate(model, data, batch_size=7)
    assert first["loss"] == pytest.approx(second["loss"], rel=1e-5)
    assert first["tokens"] == second["tokens"] > 500
    assert first["perplexity"] == pytest.approx(math.exp(first["loss"]))
    teacher = BertForMaskedLM(model.config)
    report = finetune(model, data, steps=30, lr=5e-3, batch_size=32, teachers=[teacher],
                      distill_alpha=0.2)
    assert all(math.isfinite(x) for x in report["losses"])
    assert evaluate(model, data)["loss"] < first["loss"] - 0.3


# --------------------------------------------------------------------------- zoo


def test_zoo_digits_vit_is_cached(tmp_path):
    kwargs = dict(hidden=16, layers=1, heads=2, patch=4, epochs=1, cache_dir=tmp_path)
    steps = []
    start = time.perf_counter()
    model, path = digits_vit(seed=0, progress=lambda *a: steps.append(a), **kwargs)
    trained_s = time.perf_counter() - start
    start = time.perf_counter()
    again, again_path = digits_vit(seed=0, progress=lambda *a: steps.append(a), **kwargs)
    loaded_s = time.perf_counter() - start
    assert again_path == path and path.parent == tmp_path
    assert len(steps) == 21  # the second call trained nothing
    assert loaded_s < trained_s / 2
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(),
                                                  again.state_dict().values()))
    info = zoo_info(path)
    assert info["recipe"]["epochs"] == 1 and info["steps"] == 21
    assert 0.0 <= info["eval"]["accuracy"] <= 1.0
    assert (path / "config.json").is_file() and (path / "preprocessor_config.json").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp left
    other, other_path = digits_vit(seed=1, **kwargs)
    assert other_path != path
    assert not torch.equal(other.classifier.weight, model.classifier.weight)


def test_zoo_cache_root_follows_env(monkeypatch, tmp_path):
    monkeypatch.setenv("OTCOMPRESS_CACHE", str(tmp_path))
    assert cache_root() == tmp_path / "zoo"
    assert cache_root(tmp_path / "x") == tmp_path / "x"
    monkeypatch.delenv("OTCOMPRESS_CACHE")
    assert cache_root().parts[-3:] == (".cache", "otcompress", "zoo")


def test_zoo_pydoc_bert_shares_its_tokenizer(tmp_path):
    from transformers import AutoTokenizer

    kwargs = dict(hidden=16, layers=1, heads=2, vocab_size=200, steps=3, cache_dir=tmp_path)
    model, path = pydoc_bert(seed=0, **kwargs)
    _, path1 = pydoc_bert(seed=1, **kwargs)
    assert isinstance(model, BertForMaskedLM) and path != path1
    assert len(list((tmp_path / "tokenizers").iterdir())) == 1  # trained once
    tok = AutoTokenizer.from_pretrained(path)
    assert len(tok) == model.config.vocab_size == 200
    assert zoo_info(path)["eval"]["perplexity"] > 1
