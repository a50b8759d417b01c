"""The fuse workflow as a library call: the starting-point race, resumable
training, held-out splits, fold targets from the command line."""
import copy
import json
from pathlib import Path

import pytest
import torch
import yaml
import transformers as T

import models as M
from otcompress import finetune as ft
from otcompress import pipeline
from otcompress.cli import main
from otcompress.data import load_data
from otcompress.errors import DivergedError, InvalidOptionError


@pytest.fixture(scope="module")
def digits():
    return load_data("digits", M.vit())


@pytest.mark.parametrize("n", [10, 40])  # at 40 the race checks after warm-up whether to give it up
def test_a_parents_start_that_passes_the_anchor_side_one_shot_continues_alone(digits, tmp_path, monkeypatch, n,
                                                                              race_random_parents):
    """The parents' start trains its race steps first; below every
    anchor-side start's one-shot loss by then, it continues and the anchor
    side trains no step: the run spends N, not 1.5 N."""
    anchor, parents = _race_models()  # random anchor: the fold passes its one-shot loss in 5 steps
    steps = []
    step = ft.Trainer._step
    monkeypatch.setattr(ft.Trainer, "_step", lambda self: (steps.append(self.model), step(self))[1])
    recipe = {"finetune_steps": n, "batch_size": 32, "samples": 64, "reconstruct": "off"}
    model, report = pipeline.run(anchor, parents, recipe, tmp_path / "out", data=digits)
    race = report["race"]
    rows = {c["candidate"]: c for c in race["candidates"]}
    assert race["winner"] == "fold: all parents"
    assert race["chosen_by"] == "holdout_loss_below_anchor_side_one_shot"
    anchor_side = [c for c in race["candidates"] if c["group"] != "fold"]
    assert rows["fold: all parents"]["holdout_loss"] < min(c["one_shot_holdout_loss"] for c in anchor_side)
    assert not any("holdout_loss" in c for c in anchor_side)
    assert len(steps) == n and all(m is model for m in steps)  # only the winner ever trained
    assert race["extra_steps"] == 0 and report["steps_spent"] == n
    assert "anchor side trained no step" in (tmp_path / "out" / "README.md").read_text()


def test_a_parents_start_that_cannot_reach_the_anchor_side_is_given_up(digits, tmp_path, monkeypatch,
                                                                       race_random_parents):
    """A parents' start that, after twice its warm-up, would stay above the
    anchor side's one-shot loss even at REACH times its rate so far stops
    there: the anchor side's start trains all N steps, untrained in the race,
    and the run spends N plus those steps, not 1.5 N."""
    anchor, parents = _race_models(digits, steps=150, lr=1e-2)  # random parents' fold, a good anchor
    model, report, steps = _counted_run(anchor, parents, digits, tmp_path / "out", monkeypatch, 40)
    race = report["race"]
    rows = {c["candidate"]: c for c in race["candidates"]}
    fold, side = rows["fold: all parents"], [c for c in race["candidates"] if c["group"] != "fold"]
    assert race["chosen_by"] == "parents_start_cannot_reach_anchor_side"
    assert race["winner"] == min(side, key=lambda c: c["one_shot_holdout_loss"])["candidate"]
    check = ft.climb_check(40, 0.1)
    assert fold["given_up_after"] == check == 10 and race["extra_steps"] == check
    rate = max(0.0, fold["one_shot_holdout_loss"] - fold["holdout_loss"]) / check
    reach = fold["holdout_loss"] - pipeline.REACH * rate * (20 - check)
    assert reach >= min(c["one_shot_holdout_loss"] for c in side)
    assert not any("holdout_loss" in c for c in side)
    assert len(steps) == 50 and all(m is model for m in steps[check:])  # the given-up start, then the winner
    assert report["finetune"]["steps"] == 40 and report["steps_spent"] == 50
    card = (tmp_path / "out" / "README.md").read_text()
    assert "note" not in race and "## Starting-point race" in card
    assert "trained the first 10 steps of the run (distilled from the parents) and was given up there" in card
    assert f"so **{race['winner']}** trained every step of the run" in card and "| fold: all parents |" in card


def test_a_parents_start_far_behind_parents_no_better_than_the_anchor_is_not_raced(digits, tmp_path,
                                                                                     monkeypatch):
    """Parents no better than the anchor side on the held-out examples have
    nothing to give a start made from them: it is not raced, and the anchor
    side's best start trains all N steps, spending N (with the rule off the
    same race spends 50: the give-up test)."""
    anchor, parents = _race_models(digits, steps=150, lr=1e-2)  # random parents, a good anchor
    model, report, steps = _counted_run(anchor, parents, digits, tmp_path / "out", monkeypatch, 40)
    race = report["race"]
    side = [c for c in race["candidates"] if c["group"] != "fold"]
    best_side = min(c["one_shot_holdout_loss"] for c in side)
    assert race["chosen_by"] == pipeline.FAR_BEHIND_KEY and race["extra_steps"] == 0
    assert race["winner"] == min(side, key=lambda c: c["one_shot_holdout_loss"])["candidate"]
    _, holdout = pipeline.split_holdout(digits, seed=0)
    assert race["parents_holdout_loss"] == pytest.approx([ft.evaluate(p, holdout)["loss"] for p in parents])
    assert min(race["parents_holdout_loss"]) >= best_side  # random parents: no better than the anchor
    assert not any("holdout_loss" in c for c in race["candidates"])  # no start trained in the race
    assert len(steps) == 40 and all(m is model for m in steps) and report["steps_spent"] == 40
    card = (tmp_path / "out" / "README.md").read_text()
    assert "while the best parent itself was no better than it" in card and "trained all 40 steps" in card
    # Parents no better than the start are no teachers: distilling would pull it towards them.
    assert report["finetune"]["teachers"] == 0 and "without distilling from them" in report["warnings"][-1]
    assert card.count("# The anchor, finetuned by otcompress") == 1 and "solver: None" not in card
    assert yaml.safe_load(card.split("---")[1])["base_model"] == [report["anchor"]]


def test_too_far_behind_weighs_the_start_s_deficit_against_the_parents_lead():
    # pydoc LLaMA 8 x 64 -> 4 x 32, seed 0 (one-shot held-out losses): the anchor won its races
    assert pipeline._too_far_behind(4.4717, 4.2598, 4.2007)
    # pydoc BERT 4 x 64 -> 2 x 32, seed 1: the parents' start won
    assert not pipeline._too_far_behind(5.7993, 5.3186, 5.0359)
    assert pipeline._too_far_behind(2.1, 2.0, 2.0) and pipeline._too_far_behind(2.01, 2.0, 2.1)  # no lead
    assert not pipeline._too_far_behind(2.0 + 3 * 0.1 - 1e-9, 2.0, 1.9)  # just FAR_BEHIND times the lead
    assert pipeline._too_far_behind(2.0 + 3 * 0.1 + 1e-9, 2.0, 1.9)
    race = pipeline.Race(None, None, {"steps": 60, "device": "cpu"}, 30, parents=["A", "B"])
    losses = {"A": 1.9, "B": 2.5}
    race._loss = lambda model, name: losses[model]
    side = [({"one_shot_holdout_loss": 2.0}, None)]
    assert not race._far_behind({"one_shot_holdout_loss": 2.2}, side)  # the best parent leads by 0.1
    assert race.parent_losses == [1.9, 2.5]
    losses["A"] = 2.05  # now no parent leads
    race.parent_loss_cache.clear()  # scored once per race
    assert race._far_behind({"one_shot_holdout_loss": 2.2}, side)
    race.reference = ["A", "B"]  # headless models: scored against the parents themselves, not judged
    assert not race._far_behind({"one_shot_holdout_loss": 2.2}, side)
    race.parent_losses = [4.2218, 4.2007]
    why = race._far_behind_why({"candidate": "fold: parent 2", "one_shot_holdout_loss": 4.4717},
                               {"one_shot_holdout_loss": 4.2598})
    assert "(fold: parent 2) trailed it by 0.2119" in why
    assert "3 times the best parent's own lead over it (0.0591)" in why
    from otcompress.summary import _race_how  # the command line's summary line
    assert "too far behind" in _race_how({"chosen_by": pipeline.FAR_BEHIND_KEY, "note": why})


def _counted_run(anchor, parents, digits, out, monkeypatch, n):
    """(model, report, the model each training step trained) of the recipe, N = n."""
    steps = []
    step = ft.Trainer._step
    monkeypatch.setattr(ft.Trainer, "_step", lambda self: (steps.append(self.model), step(self))[1])
    recipe = {"finetune_steps": n, "batch_size": 32, "samples": 64, "reconstruct": "off"}
    return (*pipeline.run(anchor, parents, recipe, out, data=digits), steps)


def test_cannot_reach_projects_the_rate_so_far():
    side = [({"one_shot_holdout_loss": 1.8}, None)]
    # 2.0 -> 1.9 in 10 of 20 steps: at REACH = 2 times 0.01 a step it could reach 1.7
    assert not pipeline._cannot_reach(2.0, 1.9, 10, 20, side)
    assert pipeline._cannot_reach(2.0, 1.9, 10, 20, [({"one_shot_holdout_loss": 1.65}, None)])
    assert pipeline._cannot_reach(2.0, 2.1, 10, 20, side)  # it climbed: no rate at all
    assert not pipeline._cannot_reach(2.0, 1.7, 10, 20, side)  # already below


def test_the_fold_of_all_parents_must_lead_the_single_parent_starts(monkeypatch):
    """Where a task loss trains after it, the fold of all parents is the
    parents' start only with a one-shot loss under ALL_PARENTS_LEAD times the
    best single-parent start's; without finetuning the plain loss chooses."""
    losses = {"fold: all parents": 1.0, "fold: parent 1": 1.05, "prune: parent 1": 1.2}
    monkeypatch.setattr(pipeline.Race, "_loss", lambda self, model, name: losses[name])

    def winner(steps):
        lead = pipeline.ALL_PARENTS_LEAD
        entries = [(n, lambda: torch.nn.Linear(1, 1), "fold", lead if n == "fold: all parents" else 1.0)
                   for n in losses]
        race = pipeline.Race(None, None, {"steps": steps, "device": "cpu"}, steps // 2)
        return race.run(entries)[2]["race"]["winner"]
    assert winner(10) == "fold: parent 1" and winner(0) == "fold: all parents"
    losses["fold: all parents"] = 1.05 * pipeline.ALL_PARENTS_LEAD - 1e-6  # a lead as large as asked
    assert winner(10) == "fold: all parents"


def test_a_start_that_cannot_be_built_for_these_shapes_is_skipped(monkeypatch):
    """Pruning keeps whole key/value groups: 4 heads in 2 groups cannot become
    3 in 1. The race goes on without that start (folding can build it) and
    says so; with no start left the error stands."""
    from otcompress.errors import IncompatibleModelsError, UnreachableShapeError

    def cannot():
        raise UnreachableShapeError("cannot prune 4 heads in 2 key/value groups to 3 in 1")
    losses = {"fold": 1.0, "OT fusion, anchor weight 0.8": 1.2, "anchor": 1.1}
    monkeypatch.setattr(pipeline.Race, "_loss", lambda self, model, name: losses[name])
    entries = [("fold", lambda: torch.nn.Linear(1, 1), "fold"), ("prune", cannot, "fold"),
               ("OT fusion, anchor weight 0.8", lambda: torch.nn.Linear(1, 1), "anchor-side"),
               ("anchor", lambda: torch.nn.Linear(1, 1), "anchor-side")]
    race = pipeline.Race(None, None, {"steps": 0, "device": "cpu"}, 0)
    report = race.run(entries)[2]["race"]
    assert report["winner"] == "fold" and [c["candidate"] for c in report["candidates"]] == [e[0] for e in
                                                                                             entries if e[0] != "prune"]
    assert report["skipped"] == [{"candidate": "prune", "why": "cannot prune 4 heads in 2 key/value groups to 3 in 1"}]
    with pytest.raises(IncompatibleModelsError, match="cannot prune"):
        pipeline.Race(None, None, {"steps": 0, "device": "cpu"}, 0).run([("prune", cannot, "fold")] * 2)

    def untied():  # a genuine mismatch of the user's models stops the run, whatever the start
        raise IncompatibleModelsError("the anchor ties its output head to the input embeddings but parent 1 does not")
    with pytest.raises(IncompatibleModelsError, match="ties its output head"):
        pipeline.Race(None, None, {"steps": 0, "device": "cpu"}, 0).run([("fold", untied, "fold"), *entries[2:]])


def test_the_race_with_parallel_merge_and_a_parent_as_shallow_as_the_target(digits):
    parents = [M.vit(layers=4, seed=2), M.vit(layers=2, seed=3)]
    _, report = pipeline.run(None, parents, {"finetune_steps": 0, "samples": 64, "reconstruct": "off",
                                             "depth_merge": "parallel"}, target={"layers": 2}, data=digits)
    assert "fold: parent 2" in [c["candidate"] for c in report["race"]["candidates"]]


def test_weights_that_give_a_parent_no_share_make_no_start_from_it(digits):
    anchor, parents = _race_models()
    names = lambda w: [c["candidate"] for c in pipeline.run(  # noqa: E731
        anchor, parents, {"finetune_steps": 0, "samples": 64, "reconstruct": "off", "weights": w},
        data=digits)[1]["race"]["candidates"]]
    assert names([1, 0, 0]) == ["OT fusion, weights 1, 0, 0", "anchor"]
    assert not any("parent 1" in n for n in names([0, 0, 1]))


def test_the_race_uses_the_users_mixing_weights(digits, monkeypatch):
    """--weights (anchor first) with the default race: the OT start mixes with
    them and the fold of all parents with the parents' share, not defaults."""
    anchor, parents = _race_models()
    seen = {}
    fuse = pipeline._fuse
    monkeypatch.setattr(pipeline, "_fuse", lambda a, ps, alignment, *args, **kw: (
        seen.setdefault(alignment if len(ps) > 1 else None, kw.get("weights")), fuse(a, ps, alignment, *args, **kw))[1])
    _, report = pipeline.run(anchor, parents, {"finetune_steps": 0, "samples": 64, "weights": [0.2, 0.4, 0.4]},
                             data=digits)
    assert seen["weights"] == pytest.approx([0.2, 0.4, 0.4]) and seen["fold"] == [0.2, 0.4, 0.4]
    assert "OT fusion, weights 0.2, 0.4, 0.4" in [c["candidate"] for c in report["race"]["candidates"]]


def test_a_one_parent_start_numbers_its_warnings_by_the_recipe_s_parents(monkeypatch):
    from otcompress import fusion
    model = torch.nn.Linear(1, 1)
    model.fusion_report = {"warnings": ["parent 1 map res is nearly uniform (relative entropy 0.99): lower reg",
                                        "the merge of the folds: map res did not converge"]}
    monkeypatch.setattr(fusion, "fuse", lambda *a, **kw: model)
    r = {**pipeline.recipes.defaults(), "alignment": "auto"}
    out = pipeline._fuse(None, ["p2"], "fold", None, {}, r, None, used=[2])
    assert out.fusion_report["warnings"][0].startswith("parent 2 map res")
    assert out.fusion_report["warnings"][1].startswith("the merge of the folds")


def _params(model):
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def test_trainer_in_pieces_equals_one_run(digits):
    a, b = M.vit(seed=1), M.vit(seed=1)
    kw = dict(steps=8, lr=1e-3, batch_size=16, seed=3, teachers=[M.vit(hidden=48, heads=6, seed=2)])
    ft.Trainer(a, digits, **kw).run(3).run(5)
    ft.Trainer(b, digits, **kw).run(8)
    assert torch.equal(_params(a), _params(b))
    c = M.vit(seed=1)
    ft.Trainer(c, digits, **{**kw, "seed": 4}).run(8)
    assert not torch.equal(_params(a), _params(c))  # the comparison can fail


def test_holdout_is_disjoint_from_training(digits):
    train, holdout = pipeline.split_holdout(digits, seed=0)
    n = digits.num_examples("train")
    assert train.num_examples("train") + holdout.num_examples("eval") == n
    seen = {tuple(x.flatten().tolist()) for x in train.splits["train"]["pixel_values"]}
    assert not any(tuple(x.flatten().tolist()) in seen for x in holdout.splits["eval"]["pixel_values"])
    assert torch.equal(train.splits["eval"]["labels"], digits.splits["eval"]["labels"])


def _race_models(digits=None, steps=40, lr=3e-3):
    """A small anchor and two random parents; with `digits`, the anchor first
    trained 40 steps, so that a few race steps cannot take the parents' fold
    below its one-shot loss and the anchor side trains too."""
    anchor = M.vit(hidden=16, heads=2, inter=32, seed=1)
    if digits is not None:
        ft.finetune(anchor, digits, steps=steps, lr=lr, batch_size=32)
    parents = [M.vit(hidden=32, heads=4, inter=64, seed=s) for s in (2, 3)]
    return anchor, parents


def test_default_recipe_races_the_starting_points(digits, tmp_path, race_random_parents):
    anchor, parents = _race_models(digits)
    # Without reconstruct these random parents' fold starts behind the anchor, so the race is run
    # (a fold that leads one-shot is not: test_reconstruct).
    recipe = {"finetune_steps": 10, "batch_size": 32, "samples": 64, "reconstruct": "off"}
    model, report = pipeline.run(anchor, parents, recipe, tmp_path / "out", data=digits)
    race = report["race"]
    rows = {c["candidate"]: c for c in race["candidates"]}
    # With finetuning the parents' start is their fold (pruned starts only race one-shot).
    assert list(rows) == ["fold: all parents", "OT fusion, anchor weight 0.8", "anchor"]
    # Of the starts of each group only the one better one-shot trains in the race.
    trained = []
    for side in ([rows["fold: all parents"]], [rows["OT fusion, anchor weight 0.8"], rows["anchor"]]):
        trained += [c for c in side if "holdout_loss" in c]
        assert trained[-1:] == [min(side, key=lambda c: c["one_shot_holdout_loss"])]
    losses = {n: c["holdout_loss"] for n, c in rows.items() if "holdout_loss" in c}
    assert set(losses) == {c["candidate"] for c in trained}
    assert len(losses) == 2 and race["winner"] == min(losses, key=losses.get)
    assert race["chosen_by"] == "holdout_loss"
    assert rows["fold: all parents"]["holdout_loss"] >= min(c["one_shot_holdout_loss"] for c in trained[1:])
    assert race["steps_each"] == 5 and race["extra_steps"] == 5
    # Random parents no better than the start kept are no teachers after the race (`_parents_teach`).
    worth = min(race["parents_holdout_loss"]) < rows[race["winner"]]["one_shot_holdout_loss"]
    assert report["finetune"]["steps"] == 10 and report["finetune"]["teachers"] == (2 if worth else 0)
    assert report["steps_spent"] == 15  # the losing start's race steps count
    saved = json.loads((tmp_path / "out" / "fusion_report.json").read_text())
    assert saved["race"]["winner"] == race["winner"]
    assert "starting-point race" in (tmp_path / "out" / "README.md").read_text().lower()
    reloaded = T.ViTForImageClassification.from_pretrained(tmp_path / "out")
    x = M.inputs(reloaded)
    assert torch.allclose(M.outputs(reloaded, x), M.outputs(model.cpu(), x), atol=1e-6)


def test_no_finetuning_is_never_worse_than_the_anchor_on_held_out_data(digits):
    """On the race's held-out tenth this holds by construction (the anchor is a
    candidate); so the winner is required not to be the anchor and is scored
    on the eval split, which neither the race nor the fusion saw (measured:
    2.425 against the anchor's 2.519)."""
    anchor, parents = _race_models()
    model, report = pipeline.run(anchor, parents, {"finetune_steps": 0, "samples": 64}, data=digits)
    _, holdout = pipeline.split_holdout(digits, seed=0)
    assert ft.evaluate(model, holdout)["loss"] <= ft.evaluate(anchor, holdout)["loss"] + 1e-6
    assert report["race"]["winner"] != "anchor"  # else the next line would hold by construction too
    assert ft.evaluate(model, digits, split="eval")["loss"] < ft.evaluate(anchor, digits, split="eval")["loss"]
    assert report["race"]["steps_each"] == 0 and report["race"]["chosen_by"] == "one_shot_holdout_loss"


def test_an_explicit_alignment_skips_the_race(digits):
    anchor, parents = _race_models()
    _, report = pipeline.run(anchor, parents, {"alignment": "fold", "finetune_steps": 2, "samples": 64},
                             data=digits)
    assert "race" not in report and report["options"]["alignment"] == "fold"
    with pytest.raises(InvalidOptionError, match="needs an anchor"):
        pipeline.run(None, parents, {"alignment": "weights"}, target={"hidden": 16})


def run(capsys, *args):
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in args])
    out, err = capsys.readouterr()
    return e.value.code, out, err


def test_cli_folds_into_a_target_width(tmp_path, capsys):
    for s in (2, 3):
        M.vit(hidden=32, heads=4, inter=64, seed=s).save_pretrained(tmp_path / f"p{s}")
    out = tmp_path / "small"
    code, stdout, err = run(capsys, "fuse", "--parents", tmp_path / "p2", tmp_path / "p3", "--hidden", 16,
                            "--heads", 2, "--intermediate", 32, "--out", out, "--json")
    assert code == 0, err
    cfg = T.AutoConfig.from_pretrained(out)
    assert (cfg.hidden_size, cfg.num_attention_heads, cfg.intermediate_size) == (16, 2, 32)
    report = json.loads(stdout)["report"]
    assert report["options"]["alignment"] == "fold"
    for args, message in ((["--hidden", 64], "cannot fold"),
                          (["--anchor", tmp_path / "p2", "--hidden", 16], "not both"),
                          ([], "give --anchor")):
        code, _, err = run(capsys, "fuse", "--parents", tmp_path / "p2", *args, "--out", tmp_path / "bad")
        lines = [x for x in err.strip().splitlines() if x.strip()]
        assert code == 2 and len(lines) == 1 and message in lines[0], err
        assert not (tmp_path / "bad").exists()


def test_profiles_ship_inside_the_package():
    """--profile must work from an installed wheel, not only from a checkout."""
    import otcompress
    from otcompress import recipes
    assert recipes.PROFILE_DIR.parent == Path(otcompress.__file__).parent
    assert {"vit-soft-wts", "bert-soft-wts", "hard-emd"} <= set(recipes.available())
    pyproject = (Path(otcompress.__file__).parent.parent / "pyproject.toml").read_text()
    assert 'otcompress = ["profiles/*.yaml"' in pyproject


def test_sentence_transformers_files_are_carried(tmp_path):
    """A sentence-transformers checkpoint's pipeline (modules.json, pooling,
    normalisation, settings) comes along, the pooling width rewritten to the
    fused model's (here a parent folded into a narrower target)."""
    import transformers as T
    T.BertModel(T.BertConfig(**M.TINY_BERT)).save_pretrained(tmp_path / "st")
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
               {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
               {"idx": 3, "name": "3", "path": "3_Dense", "type": "sentence_transformers.models.Dense"}]
    (tmp_path / "st" / "modules.json").write_text(json.dumps(modules))
    (tmp_path / "st" / "sentence_bert_config.json").write_text('{"max_seq_length": 64, "do_lower_case": false}')
    for folder in ("1_Pooling", "2_Normalize", "3_Dense"):
        (tmp_path / "st" / folder).mkdir()
    (tmp_path / "st" / "1_Pooling" / "config.json").write_text(
        '{"word_embedding_dimension": 32, "pooling_mode_mean_tokens": true}')
    _, report = pipeline.run(None, [tmp_path / "st"], {}, tmp_path / "out",
                             target={"hidden": 16, "heads": 2, "intermediate": 32})
    out = tmp_path / "out"
    assert T.AutoConfig.from_pretrained(out).hidden_size == 16
    assert json.loads((out / "1_Pooling" / "config.json").read_text())["word_embedding_dimension"] == 16
    assert (out / "2_Normalize").is_dir() and (out / "modules.json").is_file()
    assert json.loads((out / "sentence_bert_config.json").read_text())["max_seq_length"] == 64
    assert report["sentence_transformers"]["skipped"] == ["3_Dense"]


def _bert_dir(path, model, vocab):
    model.save_pretrained(path)
    T.BertTokenizerFast(vocab={t: i for i, t in enumerate(vocab)}).save_pretrained(path)
    return path


def test_a_shuffled_tokenizer_of_the_same_size_is_refused_before_any_work(tmp_path, monkeypatch, capsys):
    from otcompress.errors import IncompatibleModelsError
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(55)]
    shuffled = vocab[:5] + vocab[5:][::-1]
    anchor = _bert_dir(tmp_path / "a", M.bert(seed=1), vocab)
    same = _bert_dir(tmp_path / "p", M.bert(hidden=48, heads=6, inter=96, seed=2), vocab)
    other = _bert_dir(tmp_path / "q", M.bert(hidden=48, heads=6, inter=96, seed=3), shuffled)
    pipeline.check_tokenizers(anchor, [same])  # the same vocabulary passes
    monkeypatch.setattr(pipeline.modelio, "load_model", lambda *a, **k: pytest.fail("weights were read"))
    with pytest.raises(IncompatibleModelsError, match=r"tokenizer mismatch: parent 2's .*'w0' is id 5"):
        pipeline.run(anchor, [same, other], {"alignment": "weights"})
    # Teachers and reference models are held to the student's tokenizer too (finetune, eval).
    code, _, err = run(capsys, "finetune", anchor, "--data", "pydoc", "--steps", 1, "--out", tmp_path / "o",
                       "--teachers", other)
    assert code == 2 and "tokenizer mismatch: teacher 1's tokenizer is not the model's" in err
    assert not (tmp_path / "o").exists()
    with pytest.raises(IncompatibleModelsError, match=r"reference model 1's tokenizer is not the model's"):
        pipeline.check_tokenizers(anchor, [other], "the model", "reference model")


def test_an_anchor_wider_than_a_parent_is_warned_about():
    logged = []
    anchor, parent = M.vit(hidden=48, heads=6, inter=96, seed=1), M.vit(hidden=32, seed=2)
    _, report = pipeline.run(anchor, [parent], {"alignment": "weights"}, log=logged.append)
    assert any("anchor is wider than parent 1 (hidden 48 > 32)" in w for w in report["warnings"])
    assert any("wider" in line for line in logged)
    _, report = pipeline.run(parent, [anchor], {"alignment": "weights"})
    assert not any("wider" in w for w in report["warnings"])


def test_an_anchor_wider_than_a_parent_races_only_the_anchor_side_starts(digits):
    """No fold or prune can make a wider anchor: the race holds OT fusion and the anchor."""
    anchor, parent = M.vit(hidden=48, heads=6, inter=96, seed=1), M.vit(hidden=32, seed=2)
    _, report = pipeline.run(anchor, [parent], {"finetune_steps": 0, "samples": 64, "batch_size": 32}, data=digits)
    assert [c["candidate"] for c in report["race"]["candidates"]] == ["OT fusion, anchor weight 0.8", "anchor"]


def test_tokenizer_check_skips_model_objects_and_names_a_broken_tokenizer(tmp_path):
    from otcompress.errors import ModelLoadError
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(55)]
    anchor = _bert_dir(tmp_path / "a", M.bert(seed=1), vocab)
    pipeline.check_tokenizers(anchor, [M.bert(hidden=48, heads=6, inter=96, seed=2)])  # a model: nothing to compare
    broken = _bert_dir(tmp_path / "b", M.bert(hidden=48, heads=6, inter=96, seed=2), vocab)
    (broken / "tokenizer.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match=r"b: cannot load its tokenizer"):
        pipeline.check_tokenizers(anchor, [broken])


def test_an_embedding_run_whose_loss_climbs_restarts_from_the_start_at_a_tenth_of_the_lr(tmp_path):
    """An embedding model folded from its parent, trained at an lr that undoes
    the start: the similarity loss climbs after warm-up, the run restarts from
    the start at lr / 10, the steps it spent count, and the result is exactly
    a run at lr / 10. A calm lr never restarts; a task head's run is never
    restarted (its climb is a transient it recovers from)."""
    parent = M.vit(hidden=32, heads=4, inter=64, seed=2, cls=T.ViTModel)
    data = load_data("digits", parent)
    assert data.task == "feature-extraction"
    recipe = {"finetune_steps": 40, "batch_size": 16, "samples": 64}
    run = lambda lr, out=None: pipeline.run(None, [parent], {**recipe, "lr": lr}, out, data=data,  # noqa: E731
                                            target={"hidden": 16, "heads": 2, "intermediate": 32})[1]
    calm = run(1e-3)
    assert calm["finetune"]["restart"] is None and pipeline.steps_spent(calm) == calm["steps_spent"] == 40
    hot = run(0.2, tmp_path / "out")
    restart = hot["finetune"]["restart"]
    assert restart["lr"] == pytest.approx(0.02) and hot["finetune"]["lr"] == pytest.approx(0.02)
    assert restart["loss_at_check"] > ft.CLIMB * restart["loss_before"]
    assert pipeline.steps_spent(hot) == hot["steps_spent"] == 40 + restart["wasted_steps"] > 40
    assert hot["finetune"]["final_loss"] == run(0.02)["finetune"]["final_loss"]  # from the start, not the wreck
    assert "restarted from the start at lr 0.02" in (tmp_path / "out" / "README.md").read_text()


def test_an_embedding_run_whose_loss_becomes_nan_restarts_at_a_tenth_of_the_lr(tmp_path, monkeypatch):
    """A NaN loss in an embedding run's first steps is the steepest climb: the
    run restarts from the start at lr / 10 (exactly a run at that lr), the
    steps before it count; NaN at lr / 10 too is the one-line error."""
    parent = M.vit(hidden=32, heads=4, inter=64, seed=2, cls=T.ViTModel)
    data = load_data("digits", parent)
    recipe = {"finetune_steps": 40, "batch_size": 16, "samples": 64}
    run = lambda lr, out=None: pipeline.run(None, [parent], {**recipe, "lr": lr}, out, data=data,  # noqa: E731
                                            target={"hidden": 16, "heads": 2, "intermediate": 32})[1]
    steps = []  # every step begun, the one that meets NaN included (its forward pass ran)
    step = ft.Trainer._step
    monkeypatch.setattr(ft.Trainer, "_step", lambda self: (steps.append(1), step(self))[1])
    hot = run(30.0, tmp_path / "out")
    restart = hot["finetune"]["restart"]
    assert restart["lr"] == pytest.approx(3.0) and restart["loss_at_check"] is None
    assert 0 < restart["wasted_steps"] < ft.climb_check(40, 0.1)  # NaN before the check
    assert len(steps) == hot["steps_spent"] == 40 + restart["wasted_steps"]
    monkeypatch.setattr(ft, "CLIMB", float("inf"))  # the run to compare with: lr 3 all the way, never restarted
    assert hot["finetune"]["final_loss"] == run(3.0)["finetune"]["final_loss"]  # from the start, not the wreck
    assert "to NaN/Inf in" in (tmp_path / "out" / "README.md").read_text()
    with pytest.raises(DivergedError, match=r"\(lr=1000.0\); try a lower lr"):
        run(1e4)  # restarted at 1000: NaN again within a few steps, and only one restart


def test_a_raced_embedding_start_whose_loss_climbs_restarts_in_the_race(monkeypatch):
    """The race trains its starts through the same climb check as a lone
    run: a collapsing parents' start restarts at lr / 10 inside the race
    (it is not disqualified by an lr too high for it), the steps it threw
    away count, and the row says so."""
    parent = M.vit(hidden=32, heads=4, inter=64, seed=2, cls=T.ViTModel)
    data = load_data("digits", parent)
    small = {"hidden": 16, "heads": 2, "intermediate": 32}
    recipe = {"finetune_steps": 40, "batch_size": 16, "samples": 64}
    anchor, _ = pipeline.run(None, [parent], {**recipe, "finetune_steps": 60}, data=data, target=small)
    steps = []
    step = ft.Trainer._step
    monkeypatch.setattr(ft.Trainer, "_step", lambda self: (steps.append(1), step(self))[1])
    _, report = pipeline.run(anchor, [parent], {**recipe, "lr": 0.2, "reconstruct": "off"}, data=data)
    race = report["race"]
    fold = next(c for c in race["candidates"] if c["group"] == "fold")
    assert fold["restart"]["lr"] == pytest.approx(0.02) and fold["restart"]["wasted_steps"] == 10
    assert fold["restart"]["loss_at_check"] > ft.CLIMB * fold["restart"]["loss_before"]
    # far from the distilled anchor, it is then given up: its steps and its restart's count
    assert race["chosen_by"] == pipeline.GIVEN_UP and fold["given_up_after"] == 10
    assert race["extra_steps"] == 10 + 10
    assert len(steps) == report["steps_spent"]  # every step any run took, its restarts' included


def test_a_nan_loss_before_any_update_is_never_blamed_on_the_lr(digits):
    """Finite outputs but a NaN loss at step 0 (no labelled position in the
    batch): the data, not the lr, so no restart can help."""
    bad = copy.copy(digits)
    bad.splits = {k: dict(v) for k, v in digits.splits.items()}
    bad.splits["train"]["labels"] = digits.splits["train"]["labels"].clone().fill_(-100)
    with pytest.raises(InvalidOptionError, match="before any training step") as err:
        ft.finetune(M.vit(), bad, steps=3, lr=1e-3, batch_size=16)
    assert not isinstance(err.value, DivergedError)


def test_a_task_heads_climbing_run_is_not_restarted(digits):
    parent = M.vit(hidden=32, heads=4, inter=64, seed=2)
    ft.finetune(parent, digits, steps=60, lr=3e-3, batch_size=32)
    _, report = pipeline.run(None, [parent], {"finetune_steps": 40, "batch_size": 16, "samples": 64, "lr": 0.03},
                             data=digits, target={"hidden": 32})
    assert report["finetune"]["restart"] is None and report["steps_spent"] == 40
    # (an embedding model's run at such an lr restarts: the test above)


def test_climb_compares_the_steps_before_the_check_with_the_start():
    assert ft.climb(1.0, [1.0] * 6 + [1.3] * 2, 8) == (1.0, 1.3)
    assert ft.climb(1.0, [1.0] * 6 + [1.2] * 2, 8) is None
    assert ft.climb(1.0, [0.5] * 8, 8) is None
    # A start that already matches its teachers: noise far below any collapse is no climb.
    assert ft.climb(0.0, [0.0] * 6 + [1e-6] * 2, 8) is None and ft.climb(1e-4, [3e-4] * 8, 8) is None
    assert ft.climb(0.0, [0.0] * 6 + [0.01] * 2, 8) == (0.0, 0.01)
    assert ft.climb_check(150, 0.1) == 30 and ft.climb_check(10, 0.1) == 5


def test_a_start_built_from_one_parent_names_it_and_its_depth_map(digits, tmp_path):
    """A race won by one parent's start: its depth map is that parent's, and
    the card and report say which parent it was (not "parent 1" of the list)."""
    parents = [M.vit(layers=4, seed=2), M.vit(layers=3, seed=3)]
    with torch.no_grad():
        parents[0].classifier.weight.mul_(50)  # parent 1's starts score far worse one-shot
    recipe = {"finetune_steps": 0, "samples": 64, "reconstruct": "off"}
    _, report = pipeline.run(None, parents, recipe, tmp_path / "out", target={"layers": 2}, data=digits)
    assert report["race"]["winner"].endswith("parent 2")
    assert report["parents_used"] == [2] and [m["parent_depth"] for m in report["depth_maps"]] == [3]
    card = (tmp_path / "out" / "README.md").read_text()
    assert "- depth map of parent 2 (3 -> 2 blocks" in card and "depth map of parent 1" not in card
    assert "built from parent 2 (`" in card
    assert yaml.safe_load(card.split("---")[1])["base_model"] == [report["parents"][1]]


def test_a_device_the_machine_lacks_is_one_line_and_the_caller_s_models_stay_put():
    import otcompress
    anchor, parents = _race_models()
    with pytest.raises(InvalidOptionError, match="'tpu' is not a torch device"):
        pipeline.run(anchor, parents, {"alignment": "weights"}, device="tpu")
    with pytest.raises(InvalidOptionError, match="is not a torch device"):
        otcompress.fuse(anchor, parents, device="tpu")
    if not torch.cuda.is_available():
        with pytest.raises(InvalidOptionError, match="no CUDA device available"):
            pipeline.run(anchor, parents, {"alignment": "weights"}, device="cuda")
    with pytest.raises(Exception):  # a device no model can compute on: whatever fails, fails on copies
        pipeline.run(anchor, parents, {"alignment": "weights"}, device="meta")
    assert all(p.device.type == "cpu" for m in (anchor, *parents) for p in m.parameters())
    with pytest.raises(InvalidOptionError, match="weights must be finite"):
        otcompress.fuse(anchor, parents, weights=[float("nan"), 1, 1])


def test_a_fixed_alignment_needs_no_held_out_examples(tmp_path):
    """Only the race and reg "auto" choose on held-out examples: a fixed
    alignment with 60 training examples fuses and trains (it was refused:
    "the race holds out 64 and needs at least 128"); the race still refuses
    them, saying how to do without it."""
    from otcompress.data import load_data
    from otcompress.errors import InvalidOptionError
    small = load_data("digits", M.vit(), samples=60)
    anchor, parents = M.vit(seed=1), [M.vit(hidden=48, heads=4, inter=96, seed=2)]
    _, report = pipeline.run(anchor, parents, {"alignment": "weights", "finetune_steps": 2, "batch_size": 16},
                             data=small)
    assert report["finetune"]["steps"] == 2 and report["finetune"]["holdout_examples"] is None
    with pytest.raises(InvalidOptionError, match="give more, or a fixed --alignment"):
        pipeline.run(anchor, parents, {"finetune_steps": 2, "batch_size": 16}, data=small)


@pytest.mark.parametrize("good", [0, 1])
def test_single_parent_starts_are_made_from_the_parent_with_the_lowest_held_out_loss(digits, tmp_path, good):
    """A parent trained on digits beside a random one: with finetuning, the
    start made from one parent is the trained parent's prune, in either
    order (the fold of all parents still competes, with the lead it must
    have over it); without finetuning every parent's fold and prune compete
    on their one-shot loss."""
    parents = [M.vit(hidden=32, heads=4, inter=64, seed=s) for s in (2, 3)]
    ft.finetune(parents[good], digits, steps=60, lr=3e-3, batch_size=32)
    recipe = {"finetune_steps": 4, "batch_size": 32, "samples": 64}
    _, report = pipeline.run(None, parents, recipe, tmp_path / "out", data=digits, target={"hidden": 16, "heads": 2})
    race = report["race"]
    assert f"made from parent {good + 1}, the one with the lowest held-out loss" in \
        (tmp_path / "out" / "README.md").read_text()
    names = [c["candidate"] for c in race["candidates"]]
    assert race["single_parent_starts_from"] == good + 1
    losses = race["single_parent_holdout_loss"]
    assert losses[str(good + 1)] < losses[str(2 - good)]
    assert "parents_holdout_loss" not in race  # only where `_far_behind` judged: `_parents_teach` reads it
    assert names == ["fold: all parents", f"prune: parent {good + 1}"]
    assert race["candidates"][0]["lead"] == pipeline.ALL_PARENTS_LEAD
    _, report = pipeline.run(None, parents, {**recipe, "finetune_steps": 0}, data=digits,
                             target={"hidden": 16, "heads": 2})
    assert "single_parent_starts_from" not in report["race"] and len(report["race"]["candidates"]) == 5


def test_a_lone_parent_s_fold_must_lead_its_prune_where_a_task_loss_trains(digits):
    """One parent, a task loss: its prune is the start, its fold chosen only
    with the lead ALL_PARENTS_LEAD asks (no finetuning: both on their plain
    one-shot loss)."""
    parent = M.vit(hidden=32, heads=4, inter=64, seed=2)
    for steps, lead in ((4, pipeline.ALL_PARENTS_LEAD), (0, 1.0)):
        _, report = pipeline.run(None, [parent], {"finetune_steps": steps, "batch_size": 32, "samples": 64},
                                 data=digits, target={"hidden": 16, "heads": 2})
        rows = {c["candidate"]: c for c in report["race"]["candidates"]}
        assert list(rows) == ["fold", "prune"] and rows["fold"]["lead"] == lead and rows["prune"]["lead"] == 1.0


def test_the_next_best_parent_s_start_is_made_where_the_best_one_s_cannot_be(monkeypatch):
    """Parents ranked by held-out loss (a NaN last): parent 2 is best, but
    its prune cannot be built for this shape, so parent 1's is made and
    competes (before, it was dropped and the fold won as 'the only start')."""
    from otcompress.errors import UnreachableShapeError

    def cannot():
        raise UnreachableShapeError("cannot prune 8 heads in 8 key/value groups to 4 in 1")
    parent_losses = {"parent 1": 2.3, "parent 2": 2.0, "parent 3": float("nan")}
    losses = {"fold: all parents": 3.0, "prune: parent 1": 2.4, **parent_losses}
    monkeypatch.setattr(pipeline.Race, "_loss", lambda self, model, name: losses[name])
    built = lambda: torch.nn.Linear(1, 1)  # noqa: E731
    entries = [("fold: all parents", built, "fold", pipeline.ALL_PARENTS_LEAD),
               ("prune: parent 3", built, "fold", 1.0, 3), ("prune: parent 1", built, "fold", 1.0, 1),
               ("prune: parent 2", cannot, "fold", 1.0, 2)]
    race = pipeline.Race(None, None, {"steps": 10, "device": "cpu"}, 5, parents=["p1", "p2", "p3"])
    report = race.run(entries)[2]["race"]
    assert [c["candidate"] for c in report["candidates"]] == ["fold: all parents", "prune: parent 1"]
    assert report["skipped"][0]["candidate"] == "prune: parent 2"
    assert report["winner"] == "prune: parent 1" and report["single_parent_starts_from"] == 1
