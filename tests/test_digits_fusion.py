"""Two ViTs trained here, independently (different seeds: inits and batch
orders), on real data (scikit-learn digits): OT fusion in one shot must land
far above vanilla averaging, which collapses towards chance."""
import pytest

import otcompress
from otcompress.data import load_data
from otcompress.finetune import evaluate
from otcompress.zoo import digits_vit


@pytest.fixture(scope="module")
def parents(tmp_path_factory):
    cache = tmp_path_factory.mktemp("zoo")
    models = [digits_vit(hidden=32, layers=2, heads=4, seed=s, epochs=20, cache_dir=cache)[0] for s in (0, 1)]
    return models, load_data("digits", models[0])


def test_ot_fusion_far_above_vanilla(parents, record_property):
    (a, b), data = parents
    acc = {name: evaluate(m, data)["accuracy"] for name, m in (("parent A", a), ("parent B", b))}
    assert min(acc.values()) > 0.9  # both parents are real, trained models
    acc["vanilla"] = evaluate(otcompress.vanilla_fuse(a, [b]), data)["accuracy"]
    acc["OT weights sinkhorn 0.01"] = evaluate(otcompress.fuse(a, [b], reg=0.01), data)["accuracy"]
    acc["OT weights emd"] = evaluate(otcompress.fuse(a, [b], solver="emd"), data)["accuracy"]
    calib = list(data.calibration_batches(200, 64))
    acc["OT activations emd"] = evaluate(
        otcompress.fuse(a, [b], alignment="activations", data=calib, solver="emd"), data)["accuracy"]
    for k, v in acc.items():
        record_property(k, round(v, 4))
    print(acc)
    assert acc["vanilla"] < 0.4
    assert acc["OT weights sinkhorn 0.01"] > acc["vanilla"] + 0.15
    assert acc["OT weights emd"] > acc["vanilla"]
    assert acc["OT activations emd"] > acc["vanilla"]
