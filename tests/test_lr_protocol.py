"""The benchmarks' learning-rate protocol (benchmarks/common.py): an lr at
the edge of its grid is not tuned, so the grid grows past that edge."""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))

import common  # noqa: E402


def test_a_best_lr_at_the_top_extends_the_grid_upwards_by_its_ratio():
    assert common.edge_extension([1e-3, 3e-3], 3e-3) == 9e-3
    assert common.edge_extension([1e-3, 3e-3, 9e-3], 9e-3) == 0.027


def test_a_best_lr_at_the_bottom_extends_the_grid_downwards():
    assert common.edge_extension([1e-4, 1e-3], 1e-4) == 1e-5
    assert common.edge_extension([3e-4, 1e-3, 3e-3], 3e-4) == 1e-4


def test_an_interior_best_lr_stops_the_search():
    assert common.edge_extension([1e-3, 3e-3, 9e-3], 3e-3) is None
    assert common.edge_extension([1e-3, 1e-3], 1e-3) is None  # no ratio to extend by


def test_best_lr_walks_past_the_edge_until_the_best_is_interior(monkeypatch):
    # held-out loss is a parabola in log10(lr) with its minimum at 1e-2: from
    # the grid (1e-3, 3e-3) the search must try 9e-3 and 0.027, and keep 9e-3
    import math
    from otcompress import finetune

    monkeypatch.setattr(finetune, "evaluate", lambda m, holdout, reference=None: {"loss": (math.log10(m) + 2) ** 2})
    seen = []

    def trained_at(lr):
        seen.append(lr)
        return lr, None
    score, lr, _ = common._best_lr([1e-3, 3e-3], trained_at, None, score=lambda m: -m)
    assert seen == [1e-3, 3e-3, 9e-3, 0.027]
    assert lr == 9e-3 and score == -9e-3
