"""Issue 18's leftovers: a race with one start spends no race steps,
evaluation reports progress, progress labels read cleanly, and headless text
models are also scored on the built-in general-English probe set."""
import json
import math

import pytest
import torch
import transformers as T

import models as M
from otcompress import finetune as ft
from otcompress import fuse, pipeline
from otcompress.cli import main
from otcompress.data import load_data, probe_sentences, pydoc_paragraphs, train_wordpiece_tokenizer


@pytest.fixture(scope="module")
def digits():
    return load_data("digits", M.vit())


def _count_steps(monkeypatch):
    """Every training step any Trainer takes, counted."""
    steps = []
    step = ft.Trainer._step
    monkeypatch.setattr(ft.Trainer, "_step", lambda self: (steps.append(1), step(self))[1])
    return steps


def _params(model):
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def test_a_single_start_is_not_raced_and_trains_all_steps(digits, monkeypatch):
    """No anchor, with finetuning, without reconstruction: the fold of the
    parents is the only start. Nothing races; it trains N steps on every
    example, exactly as an explicit fold run does."""
    parents = [M.vit(hidden=32, heads=4, inter=64, seed=s) for s in (2, 3)]
    target = {"hidden": 16, "heads": 2, "intermediate": 32}
    recipe = {"finetune_steps": 6, "batch_size": 32, "samples": 64, "reconstruct": "off"}
    steps = _count_steps(monkeypatch)
    model, report = pipeline.run(None, parents, recipe, target=target, data=digits)
    race = report["race"]
    assert len(steps) == 6 and report["finetune"]["steps"] == 6
    assert race["steps_each"] == 0 and race["extra_steps"] == 0 and race["chosen_by"] == "only candidate"
    assert "only start possible" in race["note"] and "trained all 6 steps" in race["note"]
    assert [c["candidate"] for c in race["candidates"]] == ["fold: all parents"]
    explicit, _ = pipeline.run(None, parents, {**recipe, "alignment": "fold"}, target=target, data=digits)
    assert torch.equal(_params(model), _params(explicit))


def test_reconstructed_starts_are_chosen_one_shot_and_train_all_steps(digits, monkeypatch):
    """No anchor, with finetuning and reconstruction: the fold of all parents
    and the prune of the parent with the lower held-out loss are scored
    one-shot on the held-out examples; the lowest trains all N steps, nothing
    races (the fold ranked by its loss over ALL_PARENTS_LEAD: test_pipeline)."""
    parents = [M.vit(hidden=32, heads=4, inter=64, seed=s) for s in (2, 3)]
    target = {"hidden": 16, "heads": 2, "intermediate": 32}
    steps = _count_steps(monkeypatch)
    _, report = pipeline.run(None, parents, {"finetune_steps": 6, "batch_size": 32, "samples": 64},
                             target=target, data=digits)
    race = report["race"]
    rows = {c["candidate"]: c["one_shot_holdout_loss"] for c in race["candidates"]}
    assert list(rows) == ["fold: all parents", f"prune: parent {race['single_parent_starts_from']}"]
    rows["fold: all parents"] /= pipeline.ALL_PARENTS_LEAD
    assert race["winner"] == min(rows, key=rows.get) and race["chosen_by"] == "one_shot_holdout_loss"
    assert len(steps) == 6 and race["extra_steps"] == 0 and report["reconstruct"]["modules"] > 0


def test_without_finetuning_the_one_shot_loss_chooses_among_fold_and_prunes(digits):
    parents = [M.vit(hidden=32, heads=4, inter=64, seed=s) for s in (2, 3)]
    target = {"hidden": 16, "heads": 2, "intermediate": 32}
    model, report = pipeline.run(None, parents, {"finetune_steps": 0, "batch_size": 32, "samples": 64},
                                 target=target, data=digits)
    race = report["race"]
    rows = {c["candidate"]: c["one_shot_holdout_loss"] for c in race["candidates"]}
    assert set(rows) == {"fold: all parents", "fold: parent 1", "fold: parent 2", "prune: parent 1",
                         "prune: parent 2"}
    assert race["chosen_by"] == "one_shot_holdout_loss" and race["winner"] == min(rows, key=rows.get)


def test_one_kind_of_start_is_chosen_one_shot_and_trains_all_steps(digits, monkeypatch, tmp_path):
    """An anchor wider than the parents cannot be folded into: OT fusion and the
    anchor are alike, the one-shot loss chooses, and the choice trains N steps."""
    anchor = M.vit(hidden=48, heads=4, inter=96, seed=1)
    parents = [M.vit(hidden=32, heads=4, inter=64, seed=s) for s in (2, 3)]
    steps = _count_steps(monkeypatch)
    _, report = pipeline.run(anchor, parents, {"finetune_steps": 4, "batch_size": 32, "samples": 64},
                             tmp_path / "out", data=digits)
    race = report["race"]
    assert len(steps) == 4 and race["extra_steps"] == 0 and race["steps_each"] == 0
    assert race["chosen_by"] == "one_shot_holdout_loss" and "only kind of start" in race["note"]
    rows = race["candidates"]
    assert race["winner"] == min(rows, key=lambda c: c["one_shot_holdout_loss"])["candidate"]
    card = (tmp_path / "out" / "README.md").read_text()
    assert "No race:" in card and "trained all 4 steps" in card


@pytest.mark.parametrize("n", [8, 40])  # at 40 the parents' start is checked after its warm-up, and kept
def test_a_real_race_counts_the_losers_steps(digits, monkeypatch, n, race_random_parents):
    anchor = M.vit(hidden=16, heads=2, inter=32, seed=1)
    ft.finetune(anchor, digits, steps=40, lr=3e-3, batch_size=32)  # ahead of anything the fold reaches in 4 steps
    parents = [M.vit(hidden=32, heads=4, inter=64, seed=s) for s in (2, 3)]
    steps = _count_steps(monkeypatch)
    # Without reconstruct these random parents' fold starts behind the anchor, so the race is run.
    _, report = pipeline.run(anchor, parents, {"finetune_steps": n, "batch_size": 32, "samples": 64,
                                               "reconstruct": "off"}, data=digits)
    race = report["race"]
    assert race["chosen_by"] == "holdout_loss" and race["steps_each"] == n // 2 and "note" not in race
    assert len(steps) == n + race["extra_steps"] == report["steps_spent"] and race["extra_steps"] == n // 2


def test_evaluate_reports_every_batch(digits):
    heard = []
    ft.evaluate(M.vit(), digits, batch_size=100, progress=lambda *a: heard.append(a))
    n = math.ceil(digits.num_examples("eval") / 100)
    assert heard == [("evaluate (eval split)", k, n) for k in range(1, n + 1)]
    heard.clear()
    ft.evaluate(M.vit(), digits, split="all", batch_size=500, progress=lambda *a: heard.append(a))
    assert heard[-1][1] == heard[-1][2] == math.ceil(digits.num_examples("train") / 500) + 1


def test_progress_labels_name_each_parent_once():
    anchor = M.vit(hidden=16, heads=2, inter=32, seed=1)
    parents = [M.vit(hidden=32, heads=4, inter=64, seed=s) for s in (2, 3, 4)]

    def stages(**kw):
        heard = set()
        fuse(anchor, kw.pop("parents", parents), progress=lambda stage, done, total: heard.add(stage), **kw)
        return heard
    assert stages(alignment="fold") == {"fold: parent 1/3", "fold: parent 2/3", "fold: parent 3/3",
                                        "fold: merge the folds"}
    assert stages(alignment="weights", parents=parents[:2]) == {"align: parent 1/2", "align: parent 2/2"}
    assert stages(alignment="fold", parents=parents[:1]) == {"fold"}


# --------------------------------------------------------------------------- the probe set

def test_probe_sentences_are_ordinary_english_and_ship_with_the_package():
    from pathlib import Path
    lines = probe_sentences()
    pyproject = (Path(__file__).parent.parent / "pyproject.toml").read_text()
    assert '"probe_sentences.txt"]' in pyproject  # package-data: an installed wheel has them too
    assert 60 <= len(lines) <= 100 and len(set(lines)) == len(lines)
    assert all(3 <= len(s.split()) <= 20 and s[0].isupper() for s in lines)


@pytest.fixture(scope="module")
def english(tmp_path_factory):
    """Tiny sentence-transformers-style BERTs sharing a tokenizer trained here
    (on the probe set and the user's text), and the user's text: Python's help
    texts, unlike the probe set's everyday English."""
    d = tmp_path_factory.mktemp("english")
    user = [" ".join(p.split()[:20]) for p in pydoc_paragraphs()[:400]]
    (d / "texts.txt").write_text("\n".join(user) + "\n")
    tok = train_wordpiece_tokenizer(user + probe_sentences(), 400, d / "tok")
    models = {"small": M.bert(hidden=16, heads=2, inter=32, cls=T.BertModel, vocab=len(tok), seed=1),
              "big1": M.bert(cls=T.BertModel, vocab=len(tok), seed=2),
              "big2": M.bert(cls=T.BertModel, vocab=len(tok), seed=3)}
    models["wide"] = M.transform(models["small"], widen=True)
    for name, m in models.items():
        m.save_pretrained(d / name)
        tok.save_pretrained(d / name)
    return d, models


def test_probe_scores_a_widened_copy_perfectly_and_another_model_lower(english):
    d, models = english
    data = pipeline.load_task_data(str(d / "texts.txt"), models["small"], d / "small", seed=0)
    assert data.probe_data().num_examples("eval") == len(probe_sentences())
    same = ft.evaluate(models["small"], data, reference=[models["wide"]])
    assert same["probe_similarity_pearson"] > 1 - 1e-6 and same["probe_examples"] == len(probe_sentences())
    other = ft.evaluate(models["big1"], data, reference=[models["wide"]])
    assert other["probe_similarity_pearson"] < 0.9, other
    # The race's held-out scoring leaves it out (it chooses nothing).
    assert "probe_similarity_pearson" not in ft.evaluate(models["small"], data, reference=[models["wide"]],
                                                         probe=False)


def _cli(capsys, monkeypatch, *args):
    """(exit code, stdout, stages the progress display heard) of one command."""
    from otcompress import cli_ui
    heard = []
    monkeypatch.setattr(cli_ui._Progress, "__call__", lambda self, stage, done, total=None, *_: heard.append(
        (stage, done, total)))
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in args])
    out = capsys.readouterr()
    assert e.value.code == 0, out.err
    return out.out, heard


def test_cli_reports_the_probe_and_shows_scoring_progress(english, tmp_path, capsys, monkeypatch):
    d, _ = english
    stdout, heard = _cli(capsys, monkeypatch, "fuse", "--anchor", d / "small", "--parents", d / "big1", d / "big2",
                         "--out", tmp_path / "fused", "--data", d / "texts.txt", "--steps", 4, "--batch-size", 32,
                         "--samples", 64, "--json")
    metrics = json.loads(stdout)["report"]["metrics"]
    assert set(metrics) == {"anchor", "fused (one-shot)", "fused + 4 steps"}
    assert all(-1 <= m["probe_similarity_pearson"] <= 1 for m in metrics.values())
    assert "built-in probe set" in (tmp_path / "fused" / "README.md").read_text()
    stages = {s for s, _, _ in heard}
    assert {"scoring anchor (eval split)", "scoring fused + 4 steps (eval split)"} <= stages, stages
    assert all(d <= t for s, d, t in heard if s.startswith("scoring"))
    stdout, heard = _cli(capsys, monkeypatch, "eval", tmp_path / "fused", "--data", d / "texts.txt",
                         "--reference", d / "big1", d / "big2", "--json")
    result = json.loads(stdout)
    assert -1 <= result["probe_similarity_pearson"] <= 1 and result["probe_examples"] == len(probe_sentences())
    assert heard[-1][0] == "evaluate (all split)" and heard[-1][1] == heard[-1][2] > 1


def test_cli_says_a_single_start_was_not_raced(tmp_path, capsys):
    for s in (2, 3):
        M.vit(hidden=32, heads=4, inter=64, seed=s).save_pretrained(tmp_path / f"p{s}")
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in ("fuse", "--parents", tmp_path / "p2", tmp_path / "p3", "--hidden", 16, "--heads", 2,
                               "--intermediate", 32, "--data", "digits", "--steps", 3, "--samples", 64,
                               "--reconstruct", "off", "--out", tmp_path / "small")])
    err = capsys.readouterr().err
    assert e.value.code == 0, err
    assert "not raced" in err and "only start possible" in err and "it trained all 3 steps" in err
    assert "starting-point race" not in err


def test_no_probe_for_a_tokenizer_that_does_not_know_english(tmp_path):
    """Every probe word unknown: a figure on [UNK]s would say nothing."""
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(55)]
    T.BertTokenizerFast(vocab={t: i for i, t in enumerate(vocab)}).save_pretrained(tmp_path / "m")
    model = M.bert(cls=T.BertModel)
    model.save_pretrained(tmp_path / "m")
    (tmp_path / "texts.txt").write_text("".join(f"w{i} w{i + 1} w{i + 2}\n" for i in range(40)))
    data = pipeline.load_task_data(str(tmp_path / "texts.txt"), model, tmp_path / "m", seed=0)
    assert data.probe_data() is None
    assert "probe_similarity_pearson" not in ft.evaluate(model, data, reference=[M.transform(model, widen=True)])
