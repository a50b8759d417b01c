"""Correctness fixes from a review (issue 17): repair never changes the maps,
one-shot data iterators, "gap" normalisation of 2-column costs, dtypes,
pooler-less BERT, stochastic rescalings of empty rows, GPT-2's score scale."""
from __future__ import annotations

import warnings

import pytest
import torch
import transformers as T

import models as M
import otcompress
from otcompress import architectures, transport


def _map_costs(report):
    """{(parent, map): (cost, iterations)} of every solved map in a fusion report."""
    return {(k, tm): (st.get("cost"), st.get("cluster_size"))
            for k, maps in enumerate(report["transport_maps"]) for tm, st in maps.items()
            if "cost" in st or "cluster_size" in st}


def _untouched_by_repair(model):
    """Tensors repair never corrects (LayerNorms, embeddings, classifier): equal
    across two fusions exactly when their residual-stream maps are equal."""
    return {n: t for n, t in model.state_dict().items()
            if "layernorm" in n.lower() or "embeddings" in n or n.startswith("classifier")}


@pytest.mark.parametrize("alignment,data_free", [("weights", False), ("weights", True),
                                                 ("activations", False), ("fold", False), ("fold", True)])
def test_repair_leaves_the_transport_maps_unchanged(alignment, data_free):
    """Repair statistics travel through the maps but are never matching
    features: every map's cost (fold: its clusters) is the same with and
    without repair, and so is every tensor repair does not correct."""
    torch.manual_seed(0)
    anchor, parent = M.vit(hidden=16, heads=2, inter=32, seed=1), M.vit(hidden=32, heads=4, inter=64, seed=2)
    data = [M.inputs(anchor, batch=8, seed=s) for s in range(2)]
    target = anchor.config if alignment == "fold" else anchor
    kw = dict(alignment=alignment, reg=0.05, data=None if data_free and alignment != "activations" else data)
    plain = otcompress.fuse(target, [parent], **kw)
    fixed = otcompress.fuse(target, [parent], repair=True, **kw)
    assert fixed.fusion_report["repair"]  # repair did run
    a, b = _map_costs(plain.fusion_report), _map_costs(fixed.fusion_report)
    assert a and a == b
    ua, ub = _untouched_by_repair(plain), _untouched_by_repair(fixed)
    assert ua and all(torch.equal(ua[n], ub[n]) for n in ua)
