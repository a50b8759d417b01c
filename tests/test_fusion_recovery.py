"""Fusion recovers known answers. The anchor is the base model plus noise and
the parent an exactly equivalent transform of the base, so the right answer is
the plain average of anchor and base: a fuse() that returns the anchor, or
that scales rectangular maps wrongly, fails these (asserted below)."""
import pytest
import transformers as T

import models as M
import otcompress
from otcompress import transport

TOL = 1e-5
VIT = [T.ViTForImageClassification, T.ViTModel]
BERT = [T.BertForMaskedLM, T.BertForSequenceClassification, T.BertModel]
ALL = [(M.vit, c) for c in VIT] + [(M.bert, c) for c in BERT]
# A tied MLM decoder cannot split its weights, so 2x widening is not
# function-preserving for BertForMaskedLM: widen the others.
WIDENABLE = [(f, c) for f, c in ALL if c is not T.BertForMaskedLM]


def _case(make, cls, widen):
    base = make(cls=cls)
    anchor = M.noisy(base)
    parent = M.transform(base, widen=widen)
    x = M.inputs(base)
    expected = M.outputs(M.average([anchor, base]), x)
    # The test must be able to fail: the anchor alone is far from the answer.
    assert (M.outputs(anchor, x) - expected).abs().max() > 100 * TOL
    return anchor, parent, x, expected, base


def _err(model, x, expected):
    return float((M.outputs(model, x) - expected).abs().max())


@pytest.mark.parametrize("make,cls", ALL, ids=lambda v: getattr(v, "__name__", ""))
def test_permutation_recovery_emd(make, cls):
    anchor, parent, x, expected, base = _case(make, cls, widen=False)
    fused = otcompress.fuse(anchor, [parent], solver="emd")
    assert _err(fused, x, expected) < TOL


@pytest.mark.parametrize("make,cls", ALL, ids=lambda v: getattr(v, "__name__", ""))
def test_permutation_recovery_activations(make, cls):
    anchor, parent, x, expected, base = _case(make, cls, widen=False)
    data = M.inputs(base, batch=16, seed=3)
    fused = otcompress.fuse(anchor, [parent], solver="emd", alignment="activations", data=data)
    assert _err(fused, x, expected) < TOL


@pytest.mark.parametrize("make,cls", WIDENABLE, ids=lambda v: getattr(v, "__name__", ""))
@pytest.mark.parametrize("alignment", ["weights", "activations"])
def test_widening_recovery(make, cls, alignment):
    anchor, wide, x, expected, base = _case(make, cls, widen=True)
    if cls in (T.ViTForImageClassification, T.BertForSequenceClassification):
        assert _err(wide, x, M.outputs(base, x)) < TOL  # the widened copy is equivalent
    data = M.inputs(base, batch=16, seed=3)
    fused = otcompress.fuse(anchor, [wide], solver="emd", alignment=alignment, data=data)
    assert fused.config.hidden_size == anchor.config.hidden_size
    assert _err(fused, x, expected) < TOL


@pytest.mark.parametrize("residual", ["scalar", "matrix"])
def test_widening_recovery_weighted_residuals(residual):
    anchor, wide, x, expected, base = _case(M.vit, T.ViTForImageClassification, widen=True)
    fused = otcompress.fuse(anchor, [wide], solver="emd", residual=residual,
                            data=M.inputs(base, batch=16, seed=3))
    assert _err(fused, x, expected) < TOL


def test_widening_recovery_small_reg_sinkhorn():
    anchor, wide, x, expected, _ = _case(M.bert, T.BertModel, widen=True)
    fused = otcompress.fuse(anchor, [wide], solver="sinkhorn", reg=0.005)
    assert _err(fused, x, expected) < 1e-4


def test_wrong_rectangular_scaling_is_caught(monkeypatch):
    """The reference code scales one plan by the parent width for both sides;
    the widening test must catch that."""
    anchor, wide, x, expected, _ = _case(M.vit, T.ViTForImageClassification, widen=True)
    monkeypatch.setattr(transport, "row_stochastic", transport.column_stochastic)
    fused = otcompress.fuse(anchor, [wide], solver="emd")
    assert _err(fused, x, expected) > 100 * TOL


def test_wrong_head_pairing_is_caught():
    """Attention must matter in these models: pairing V/O units with another
    head's scores changes the outputs far beyond the tolerance."""
    base = M.vit()
    x = M.inputs(base)
    broken = M.vit()
    sd = base.state_dict()
    for name in sd:
        if ".v_proj." in name:  # swap head 0 and head 1 of V only
            t = sd[name].clone()
            d = base.config.hidden_size // base.config.num_attention_heads
            t[:d], t[d:2 * d] = sd[name][d:2 * d], sd[name][:d]
            sd[name] = t
        if ".o_proj.weight" in name:
            t = sd[name].clone()
            t[:, :d], t[:, d:2 * d] = sd[name][:, d:2 * d], sd[name][:, :d]
            sd[name] = t
    broken.load_state_dict(sd)
    assert _err(broken, x, M.outputs(base, x)) > 1e-2


def test_two_parents_average_with_weights():
    base = M.bert(cls=T.BertForSequenceClassification)
    anchor = M.noisy(base)
    p1, p2 = M.transform(base, widen=False, seed=1), M.transform(base, widen=True, seed=2)
    x = M.inputs(base)
    fused = otcompress.fuse(anchor, [p1, p2], solver="emd")
    assert _err(fused, x, M.outputs(M.average([anchor, base], [1 / 3, 2 / 3]), x)) < TOL
    fused = otcompress.fuse(anchor, [p1, p2], solver="emd", weights=[2, 1, 1])
    assert _err(fused, x, M.outputs(M.average([anchor, base], [0.5, 0.5]), x)) < TOL
