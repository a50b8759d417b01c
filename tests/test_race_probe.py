"""The race's probe (`pipeline.Race._probe`): the parents' starts with the
lowest one-shot losses each train the first steps of the run, and the one
lowest then goes on; the others' steps are counted in what the run spent."""
import pytest
import torch

import models as M
from otcompress import finetune as ft
from otcompress import pipeline
from otcompress.data import load_data

TARGET = {"hidden": 16, "heads": 2, "intermediate": 32}


@pytest.fixture(scope="module")
def digits():
    return load_data("digits", M.vit())


@pytest.fixture(scope="module")
def parents():
    return [M.vit(hidden=32, heads=4, inter=64, seed=s) for s in (2, 3)]


def _counted(monkeypatch):
    """The model each training step of any Trainer trained."""
    trained = []
    step = ft.Trainer._step
    monkeypatch.setattr(ft.Trainer, "_step", lambda self: (trained.append(self.model), step(self))[1])
    return trained


def _ranked(race):
    rows = {c["candidate"]: c["one_shot_holdout_loss"] for c in race["candidates"]}
    rows["fold: all parents"] /= pipeline.ALL_PARENTS_LEAD
    return sorted(rows, key=rows.get)


def test_the_probe_trains_the_two_best_one_shot_starts_and_keeps_the_lower_after(digits, parents, monkeypatch):
    """No anchor, finetuning, reconstruction: five parents' starts. The two
    ranked first one-shot train ceil(N / 10) steps each, the lower held-out
    loss then goes on to N, and the other's steps are spent."""
    trained = _counted(monkeypatch)
    model, report = pipeline.run(None, parents, {"finetune_steps": 20, "batch_size": 32, "samples": 64},
                                 target=TARGET, data=digits)
    race, probe = report["race"], report["race"]["probe"]
    first_two = _ranked(race)[:pipeline.PROBE_TOP]
    assert probe["candidates"] == first_two and probe["steps"] == 2 == pipeline.probe_steps(20)
    rows = {c["candidate"]: c for c in race["candidates"]}
    assert all("probe_holdout_loss" in rows[c] for c in first_two)
    assert not any("probe_holdout_loss" in c for n, c in rows.items() if n not in first_two)
    kept = min(first_two, key=lambda c: rows[c]["probe_holdout_loss"])
    assert race["winner"] == probe["kept"] == kept and race["chosen_by"] == "probe_holdout_loss"
    # The kept start's trainer went on (2 + 18 steps), the other's 2 steps were spent.
    assert len(trained) == 22 and report["finetune"]["steps"] == 20
    assert race["extra_steps"] == 2 and report["steps_spent"] == 22
    assert sum(m is model for m in trained) == 20 and all(m is model for m in trained[-18:])
    assert "the lowest held-out loss then and was the parents" in probe["note"] and "chosen by the probe" in race["note"]


def test_the_probe_keeps_the_start_that_trained_lower_not_the_one_shot_best(digits, parents, monkeypatch):
    """Where the one-shot best is worse after its probe steps, the second goes
    on (its held-out loss is made higher there: the choice, not the losses,
    is what this tests)."""
    loss = pipeline.Race._loss
    seen = {}

    def scored(self, model, name):
        seen[name] = seen.get(name, 0) + 1
        value = loss(self, model, name)
        return value + 100.0 if seen[name] == 2 and name == scored.first else value
    monkeypatch.setattr(pipeline.Race, "_loss", scored)
    recipe = {"finetune_steps": 0, "batch_size": 32, "samples": 64}
    scored.first = "none"
    _, report = pipeline.run(None, parents, recipe, target=TARGET, data=digits)  # one-shot only: the ranking
    scored.first = _ranked(report["race"])[0]
    seen.clear()
    _, report = pipeline.run(None, parents, {**recipe, "finetune_steps": 10}, target=TARGET, data=digits)
    race = report["race"]
    assert race["probe"]["candidates"][0] == scored.first
    assert race["winner"] == race["probe"]["candidates"][1] != scored.first
    assert race["extra_steps"] == 1 and report["steps_spent"] == 11


def test_the_probe_is_in_the_card_and_the_cli_summary(digits, parents, tmp_path):
    _, report = pipeline.run(None, parents, {"finetune_steps": 10, "batch_size": 32, "samples": 64},
                             tmp_path / "out", target=TARGET, data=digits)
    card = (tmp_path / "out" / "README.md").read_text()
    assert "each trained the first 1 steps of the run" in card
    assert f"{report['race']['probe']['kept']} had the lowest held-out loss then and was the parents" in card


def test_no_probe_without_finetuning_or_with_one_parents_start(digits, parents):
    _, report = pipeline.run(None, parents, {"finetune_steps": 0, "batch_size": 32, "samples": 64},
                             target=TARGET, data=digits)
    assert "probe" not in report["race"] and report["race"]["chosen_by"] == "one_shot_holdout_loss"
    _, report = pipeline.run(None, parents, {"finetune_steps": 4, "batch_size": 32, "samples": 64,
                                             "reconstruct": "off"}, target=TARGET, data=digits)
    assert "probe" not in report["race"] and report["steps_spent"] == 4  # the fold of all parents alone


def _diverging(monkeypatch, which):
    """Trainer steps raise DivergedError (as a NaN loss does) for the models `which(model)` picks."""
    step = ft.Trainer._step

    def diverging(self):
        if which(self.model):
            raise ft.DivergedError("finetune: loss is not finite")
        return step(self)
    monkeypatch.setattr(ft.Trainer, "_step", diverging)


def test_a_start_that_diverges_in_its_probe_loses_it(digits, parents, monkeypatch):
    """A NaN in a probed start's steps is its loss, not the run's failure;
    the step that met it counts (as `_started` counts a restarted run's)."""
    first = []

    def the_first(model):  # the first model trained: the first probed start
        first[:] = first or [model]
        return model is first[0]
    _diverging(monkeypatch, the_first)
    model, report = pipeline.run(None, parents, {"finetune_steps": 10, "batch_size": 32, "samples": 64},
                                 target=TARGET, data=digits)
    race = report["race"]
    rows = {c["candidate"]: c for c in race["candidates"]}
    assert rows[race["probe"]["candidates"][0]]["probe_holdout_loss"] == float("inf")
    assert race["winner"] == race["probe"]["candidates"][1]
    assert race["extra_steps"] == 1 and report["steps_spent"] == 11 and "diverged" in race["probe"]["note"]
    assert torch.isfinite(torch.cat([p.flatten() for p in model.parameters()])).all()


def test_every_probed_start_diverging_fails_the_run_in_one_line(digits, parents, monkeypatch):
    _diverging(monkeypatch, lambda m: True)
    with pytest.raises(ft.DivergedError, match="not finite"):
        pipeline.run(None, parents, {"finetune_steps": 10, "batch_size": 32, "samples": 64},
                     target=TARGET, data=digits)


def test_the_probe_never_trains_past_the_race_steps(digits, parents, race_random_parents):
    """race_fraction 0.05 of 20 steps: the race trains 1 step per side, so
    the probe trains 1 (a probe of 2 raced the parents' start 2 steps against
    the anchor side's 1)."""
    anchor = M.vit(hidden=16, heads=2, inter=32, seed=1)
    _, report = pipeline.run(anchor, parents, {"finetune_steps": 20, "batch_size": 32, "samples": 64,
                                               "race_fraction": 0.05}, data=digits)
    race = report["race"]
    assert race["probe"]["steps"] == 1 and race["steps_each"] in (0, 1)
    trained = [c for c in race["candidates"] if "holdout_loss" in c]
    assert report["steps_spent"] == 20 + race["extra_steps"]
    assert race["extra_steps"] == 1 + (1 if len(trained) == 2 else 0)
