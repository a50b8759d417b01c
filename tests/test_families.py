"""RoBERTa and DistilBERT: each a data file in otcompress/architectures/.

Recovery tests as in test_fusion_recovery.py: the anchor is the base model plus
noise and the parent an exactly equivalent transform of the base (units and
heads permuted, or every unit duplicated), so the right answer is the plain
average of anchor and base; the anchor alone is asserted to be far from it.
Test models (tests/models.py) have peaked attention (Q/K 2.5x fan-in scale,
22x HF's init at width 32) and non-trivial biases and LayerNorm gains."""
import json

import pytest
import torch
import transformers as T

import models as M
import otcompress
from otcompress import architectures
from otcompress.cli import main
from otcompress.errors import IncompatibleModelsError, InvalidOptionError
from otcompress.export import export_onnx, onnx_predict
from otcompress.profiling import example_inputs, profile_model

TOL = 1e-5
ROBERTA = [T.RobertaForMaskedLM, T.RobertaForSequenceClassification, T.RobertaModel]
DISTILBERT = [T.DistilBertForMaskedLM, T.DistilBertForSequenceClassification, T.DistilBertModel]
ALL = [(M.roberta, c) for c in ROBERTA] + [(M.distilbert, c) for c in DISTILBERT]
ids = lambda v: getattr(v, "__name__", "")  # noqa: E731


def _mlm(cls):
    return cls.__name__.endswith("ForMaskedLM")


def _case(make, cls, widen):
    # A decoder tied to the word embeddings cannot split its input weights, so
    # 2x widening is function-preserving only untied: widen MLMs untied (the
    # tied head is covered by the permutation and heterogeneous tests).
    base = make(cls=cls, tie=not (widen and _mlm(cls)))
    anchor = M.noisy(base)
    parent = M.transform_family(base, widen=widen)
    x = M.family_inputs(base)
    if not cls.__name__.endswith("Model"):  # bare models output the (permuted) hidden units
        assert _err(parent, x, M.outputs(base, x)) < 1e-4  # the transformed copy is equivalent
    expected = M.outputs(M.average([anchor, base]), x)
    # The test must be able to fail: the anchor alone is far from the answer.
    assert _err(anchor, x, expected) > 100 * TOL
    return anchor, parent, x, expected, M.family_inputs(base, batch=16, seed=3)


def _err(model, x, expected):
    return float((M.outputs(model, x) - expected).abs().max())


@pytest.mark.parametrize("alignment", ["weights", "activations"])
@pytest.mark.parametrize("make,cls", ALL, ids=ids)
def test_permutation_recovery_emd(make, cls, alignment):
    anchor, parent, x, expected, data = _case(make, cls, widen=False)
    fused = otcompress.fuse(anchor, [parent], solver="emd", alignment=alignment, data=data)
    assert _err(fused, x, expected) < TOL


@pytest.mark.parametrize("alignment", ["weights", "activations"])
@pytest.mark.parametrize("make,cls", ALL, ids=ids)
def test_widening_recovery_more_heads(make, cls, alignment):
    anchor, wide, x, expected, data = _case(make, cls, widen=True)
    assert wide.config.num_attention_heads == 2 * anchor.config.num_attention_heads
    fused = otcompress.fuse(anchor, [wide], solver="emd", alignment=alignment, data=data)
    assert fused.config.to_dict() == anchor.config.to_dict()
    assert _err(fused, x, expected) < TOL


@pytest.mark.parametrize("make,cls", [(M.roberta, T.RobertaForSequenceClassification),
                                      (M.distilbert, T.DistilBertForMaskedLM)], ids=ids)
@pytest.mark.parametrize("residual", ["scalar", "matrix"])
def test_widening_recovery_weighted_residuals(make, cls, residual):
    """The residual joins' probes (skip and branch activations) exist and fit."""
    anchor, wide, x, expected, data = _case(make, cls, widen=True)
    fused = otcompress.fuse(anchor, [wide], solver="emd", residual=residual, data=data)
    assert _err(fused, x, expected) < TOL


def test_two_parents_average_with_weights():
    base = M.distilbert(cls=T.DistilBertForSequenceClassification)
    anchor = M.noisy(base)
    parents = [M.transform_family(base, widen=False, seed=1), M.transform_family(base, widen=True, seed=2)]
    x = M.family_inputs(base)
    fused = otcompress.fuse(anchor, parents, solver="emd")
    assert _err(fused, x, M.outputs(M.average([anchor, base], [1 / 3, 2 / 3]), x)) < TOL


def test_wrong_head_pairing_is_caught():
    """Attention matters in these models: V/O units paired with another head's
    scores change the outputs far beyond the tolerance."""
    base = M.distilbert(cls=T.DistilBertForSequenceClassification)
    x = M.family_inputs(base)
    d = base.config.dim // base.config.n_heads
    swap = torch.cat([torch.arange(d, 2 * d), torch.arange(d), torch.arange(2 * d, base.config.dim)])
    sd = dict(base.state_dict())
    for name in list(sd):
        if ".v_lin." in name:
            sd[name] = sd[name][swap]
        if name.endswith(".out_lin.weight"):
            sd[name] = sd[name][:, swap]
    broken = type(base)(base.config)
    broken.load_state_dict(sd)
    assert _err(broken.eval(), x, M.outputs(base, x)) > 1e-2


@pytest.mark.parametrize("make,cls", ALL, ids=ids)
def test_self_fusion_is_identity(make, cls):
    model = make(cls=cls)
    x = M.family_inputs(model)
    assert _err(otcompress.fuse(model, [model], solver="emd"), x, M.outputs(model, x)) < TOL
    if _mlm(cls):
        fused = otcompress.fuse(model, [model, model], solver="sinkhorn", reg=0.002)
        assert _err(fused, x, M.outputs(model, x)) < 1e-4


def _tied(model):
    return model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()


@pytest.mark.parametrize("make,cls,tie", [(M.roberta, T.RobertaForMaskedLM, True),
                                          (M.roberta, T.RobertaForSequenceClassification, True),
                                          (M.distilbert, T.DistilBertForMaskedLM, True),
                                          (M.distilbert, T.DistilBertForMaskedLM, False),
                                          (M.distilbert, T.DistilBertForSequenceClassification, True)],
                         ids=lambda v: ids(v) or ("tied" if v is True else "untied" if v is False else ""))
@pytest.mark.parametrize("alignment", ["weights", "activations"])
def test_heterogeneous_fusion_round_trips(tmp_path, make, cls, tie, alignment):
    anchor = make(hidden=32, heads=4, inter=64, cls=cls, seed=1, tie=tie)
    parents = [make(hidden=48, heads=6, inter=96, cls=cls, seed=2, tie=tie),
               make(hidden=64, heads=8, inter=160, cls=cls, seed=3, tie=tie)]
    data = [M.family_inputs(anchor, batch=8, seed=s) for s in range(2)]
    fused = otcompress.fuse(anchor, parents, alignment=alignment, data=data, reg=0.1)
    assert fused.config.to_dict() == anchor.config.to_dict() and type(fused) is cls
    fused.save_pretrained(tmp_path)
    loaded = cls.from_pretrained(tmp_path).eval()
    x = M.family_inputs(anchor)
    out = M.outputs(loaded, x)
    assert torch.isfinite(out).all()
    assert torch.equal(out, M.outputs(fused, x))
    assert _err(fused, x, M.outputs(anchor, x)) > 1e-3  # the parents did contribute
    if _mlm(cls):
        assert _tied(loaded) == tie and _tied(fused) == tie


# ----------------------------------------------------------------------------- the family files


@pytest.mark.parametrize("make,cls", ALL, ids=ids)
def test_example_inputs_fit_every_class(make, cls):
    """The family's inputs are the ones the model takes, up to the longest
    sequence its positions allow (RoBERTa counts positions from pad + 1)."""
    model = make(cls=cls)
    x = example_inputs(model, batch_size=2, seq_len=1000)
    expected = {"roberta": 34 - 1 - 1, "distilbert": 32}[model.config.model_type]
    assert x["input_ids"].shape == (2, expected)
    assert ("token_type_ids" in x) == (model.config.model_type == "roberta")
    with torch.no_grad():
        model(**x)


@pytest.mark.parametrize("family", sorted(architectures.FAMILIES))
def test_every_family_defines_the_interface(family):
    fam = architectures.FAMILIES[family]
    for name in ("MODEL_TYPE", "MODEL_CLASSES", "MUST_MATCH", "TEACHER_MUST_MATCH", "INPUTS", "INPUT_AXES",
                 "build", "example_inputs", "max_seq_len", "task"):
        assert hasattr(fam, name), f"{family} lacks {name}"
    assert fam.INPUT_AXES[0] == "batch"
    assert set(fam.TEACHER_MUST_MATCH) <= set(fam.MUST_MATCH)  # a teacher is held to less than a parent
    for cls, attribute in getattr(fam, "MASKED_LM_HEAD", {}).items():
        assert cls in fam.MODEL_CLASSES and isinstance(attribute, str)
    # The MLP activation must match: averaging a GELU unit into a ReLU one is meaningless.
    assert {"hidden_act", "activation", "activation_function"} & set(fam.MUST_MATCH)  # GPT-2: activation_function


@pytest.mark.parametrize("make,key,value", [(M.roberta, "hidden_act", "relu"),
                                            (M.distilbert, "activation", "relu"),
                                            (M.bert, "hidden_act", "relu"),
                                            (M.roberta, "pad_token_id", 0)])
def test_config_mismatch_is_refused(make, key, value):
    anchor = make(seed=1)
    cfg = type(anchor.config).from_dict(anchor.config.to_dict())
    setattr(cfg, key, value)
    parent = type(anchor)(cfg)
    with pytest.raises(IncompatibleModelsError, match=key):
        otcompress.fuse(anchor, [parent], solver="emd")


def test_families_command(capsys):
    with pytest.raises(SystemExit) as e:
        main(["families", "--json"])
    out, _ = capsys.readouterr()
    assert e.value.code == 0
    listing = json.loads(out)["families"]
    assert listing["roberta"] == [c.__name__ for c in ROBERTA]
    assert listing["distilbert"] == [c.__name__ for c in DISTILBERT]
    assert set(listing) == set(architectures.FAMILIES)
    with pytest.raises(SystemExit) as e:
        main(["families"])
    out, _ = capsys.readouterr()
    assert e.value.code == 0 and "DistilBertForSequenceClassification" in out


# ----------------------------------------------------------------------------- profile and export


def _hf_tiny(cls):
    """HF-initialised: logits of order 1, so the ONNX parity gate (1e-4 absolute) is meaningful."""
    torch.manual_seed(0)
    if cls.__name__.startswith("Roberta"):
        cfg = T.RobertaConfig(vocab_size=60, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                              intermediate_size=64, max_position_embeddings=66, num_labels=3)
    else:
        cfg = T.DistilBertConfig(vocab_size=60, dim=32, n_layers=2, n_heads=4, hidden_dim=64,
                                 max_position_embeddings=64, num_labels=3)
    return cls(cfg).eval()


def _analytic_macs(seq, head, layers=2, hidden=32, inter=64, vocab=60, labels=3):
    per_layer = 4 * seq * hidden * hidden + 2 * seq * seq * hidden + 2 * seq * hidden * inter
    heads = {"mlm": seq * hidden * hidden + seq * hidden * vocab,  # transform dense + decoder
             "cls": hidden * hidden + hidden * labels}  # one token: dense + out_proj
    return layers * per_layer + heads[head]


@pytest.mark.parametrize("cls,head", [(T.RobertaForMaskedLM, "mlm"),
                                      (T.DistilBertForSequenceClassification, "cls")], ids=ids)
def test_profile_counts_flops_and_exports(tmp_path, cls, head):
    model = _hf_tiny(cls)
    report = profile_model(model, seq_len=16, repeats=2, warmup=1, tmp_dir=tmp_path)
    assert report["model_type"] == model.config.model_type
    flops = report["flops"]
    assert flops["attention"] == "eager" and flops["gemm_relative_diff"] < 0.01
    assert flops["flops_flopcounter"] == pytest.approx(2 * _analytic_macs(16, head), rel=0.01)
    assert report["onnx_export"]["max_abs_diff"] < 1e-4
    assert report["latency_onnx"]["median_ms"] > 0


@pytest.mark.parametrize("cls", [T.RobertaForMaskedLM, T.DistilBertForSequenceClassification], ids=ids)
def test_onnx_export_is_dynamic_and_matches_pytorch(tmp_path, cls):
    model = _hf_tiny(cls)
    report = export_onnx(model, tmp_path / "m.onnx")
    names = list(architectures.FAMILIES[model.config.model_type].INPUTS)
    assert report["input_names"] == names
    assert report["dynamic_axes"]["input_ids"] == {0: "batch", 1: "sequence"}
    assert report["dynamic_axes"]["logits"] == ({0: "batch", 1: "sequence"} if _mlm(cls) else {0: "batch"})
    x = example_inputs(model, batch_size=3, seq_len=9)
    x["attention_mask"][1, -4:] = 0
    with torch.no_grad():
        expected = model(**x).logits.numpy()
    assert abs(onnx_predict(tmp_path / "m.onnx", x) - expected).max() < 1e-4


def test_unsupported_family_is_refused_by_profiling():
    opt = T.OPTModel(T.OPTConfig(num_hidden_layers=1, hidden_size=8, num_attention_heads=2, ffn_dim=16,
                                 vocab_size=10, max_position_embeddings=8, word_embed_proj_dim=8))
    with pytest.raises(InvalidOptionError, match="distilbert"):  # names what is supported
        example_inputs(opt)


# ----------------------------------------------------------------------------- data


@pytest.mark.parametrize("make", [M.roberta, M.distilbert], ids=ids)
def test_text_data_fits_the_family(tmp_path, make):
    """load_data gives each family the inputs it takes (DistilBERT: no token
    types), truncated to the longest sequence its positions allow."""
    from otcompress.data import load_data, pydoc_paragraphs, train_wordpiece_tokenizer

    texts = pydoc_paragraphs("train")[:200]
    tokenizer = train_wordpiece_tokenizer(texts, 120, tmp_path / "tok")
    (tmp_path / "t.txt").write_text("\n".join(t.replace("\n", " ") for t in texts))
    model = make(vocab=len(tokenizer))
    data = load_data(str(tmp_path / "t.txt"), model, tokenizer=tokenizer, max_length=512)
    batch = next(data.batches("train", 8))
    fam = architectures.FAMILIES[model.config.model_type]
    assert set(batch) == set(fam.INPUTS) | {"labels"}
    assert batch["input_ids"].shape[1] == fam.max_seq_len(model.config)  # pydoc paragraphs are long
    with torch.no_grad():
        assert torch.isfinite(model(**batch).loss)
