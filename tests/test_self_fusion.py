"""Self-fusion of small *trained* models returns them at every shipped
profile and at the defaults. Random weights hide the problem (their costs
are well separated); trained units have near-duplicates, and at the old
BERT profiles' reg 0.1 the maps went uniform layer by layer (asserted below,
so this test can fail)."""
import pytest
import torch
import transformers as T

import models as M
import otcompress
from otcompress import recipes
from otcompress.data import load_data, pydoc_paragraphs, train_wordpiece_tokenizer
from otcompress.finetune import finetune

FUSE_KEYS = ("alignment", "solver", "reg", "residual", "qk", "token_filter", "cost_norm")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    vit = T.ViTForImageClassification(T.ViTConfig(**M.TINY_VIT))
    digits = load_data("digits", vit)
    finetune(vit, digits, steps=120, lr=3e-3, batch_size=64, seed=0)
    tok = train_wordpiece_tokenizer(pydoc_paragraphs()[:800], 300, tmp_path_factory.mktemp("tok"))
    bert = T.BertForMaskedLM(T.BertConfig(**{**M.TINY_BERT, "vocab_size": len(tok), "max_position_embeddings": 128}))
    pydoc = load_data("pydoc", bert, tokenizer=tok)
    finetune(bert, pydoc, steps=80, lr=3e-3, batch_size=32, seed=0)
    return {"vit": (vit.eval(), digits), "bert": (bert.eval(), pydoc)}


def _self_fusion_error(model, data, **options):
    calib = list(data.calibration_batches(64, 32, seed=0))
    fused = otcompress.fuse(model, [model], data=calib, on_unconverged="warn", **options)
    with torch.no_grad():
        return float((fused(**calib[0]).logits - model(**calib[0]).logits).abs().max())


def _profile(name):
    r = {**recipes.defaults(), **recipes.load_recipe(name)}
    return {k: r[k] for k in FUSE_KEYS if r[k] is not None}


PROFILES = [(p, kind) for p in recipes.available()
            for kind in ("vit", "bert") if not p.startswith("vit" if kind == "bert" else "bert")]


@pytest.mark.parametrize("profile,kind", PROFILES + [("defaults", "vit"), ("defaults", "bert")])
def test_self_fusion_returns_the_model(trained, profile, kind):
    model, data = trained[kind]
    options = {"reg": 0.02} if profile == "defaults" else _profile(profile)
    if kind == "bert":
        options.pop("token_filter", None)
    elif options.get("token_filter", "").startswith("window_"):
        options["token_filter"] = "window_2"  # the tiny ViT's patch grid is 4x4
    assert _self_fusion_error(model, data, **options) < 1e-3


@pytest.mark.filterwarnings("ignore")
def test_the_old_soft_profiles_destroyed_trained_models(trained):
    model, data = trained["bert"]
    assert _self_fusion_error(model, data, reg=0.1, cost_norm="max") > 1e-2  # the old profiles' setting
