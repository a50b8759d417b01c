"""Issue 18, item 6: `fuse` reports held-out figures (the eval split, which it
never trains on) for a user's own data, as `finetune` does, named as such in
its report, model card and table; not accuracy on the examples it trained on."""
import json

import numpy as np
import pytest
from sklearn.datasets import load_digits

import models as M
from clirun import anchor_and_wide, run


@pytest.fixture(scope="module")
def z(tmp_path_factory):
    d = anchor_and_wide(tmp_path_factory.mktemp("heldout"))
    digits = load_digits()
    for k, (image, label) in enumerate(zip(digits.images[:400], digits.target[:400])):
        (d / "folder" / str(label)).mkdir(parents=True, exist_ok=True)
        np.save(d / "folder" / str(label) / f"{k}.npy", (image / 16).astype(np.float32))
    return d


def test_fuse_reports_the_eval_split_as_finetune_and_eval_do(z, tmp_path, capsys):
    out = tmp_path / "fused"
    code, stdout, err = run(capsys, "fuse", "--anchor", z / "anchor", "--parents", z / "wide", "--out", out,
                            "--alignment", "weights", "--data", z / "folder", "--steps", "20", "--json")
    assert code == 0, err
    metrics = json.loads(stdout)["report"]["metrics"]
    assert {m["split"] for m in metrics.values()} == {"eval"} and {m["examples"] for m in metrics.values()} == {100}
    assert json.loads((out / "fusion_report.json").read_text())["metrics"] == metrics
    assert "held-out eval split (100 examples), never trained on" in (out / "README.md").read_text()
    # `eval --split eval` of the written model gives the fused row's figures.
    code, stdout, err = run(capsys, "eval", out, "--data", z / "folder", "--split", "eval", "--json")
    assert code == 0, err
    assert json.loads(stdout)["accuracy"] == pytest.approx(metrics["fused + 20 steps"]["accuracy"])
    # finetune reports on the same split.
    code, stdout, err = run(capsys, "finetune", out, "--data", z / "folder", "--steps", "1", "--out",
                            tmp_path / "ft", "--json")
    assert code == 0, err
    ft = json.loads(stdout)
    assert ft["split"] == "eval" and ft["examples"] == 100
