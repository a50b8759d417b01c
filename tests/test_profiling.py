"""Profiling on tiny real models: real fvcore counts, real ORT sessions, real files."""
import pytest
import torch
from transformers import (
    BertConfig,
    BertForMaskedLM,
    BertForSequenceClassification,
    BertModel,
    OPTConfig,
    OPTModel,
    ViTConfig,
    ViTForImageClassification,
    ViTModel,
)
from torch.utils.flop_counter import FlopCounterMode

from otcompress.errors import InvalidOptionError, ModelLoadError
from otcompress.profiling import (
    count_flops,
    count_parameters,
    example_inputs,
    measure_latency,
    profile_model,
    size_on_disk,
)

from models import TINY_BERT as BERT
from models import TINY_VIT as VIT




def tiny_bert(cls=BertModel):
    torch.manual_seed(0)
    return cls(BertConfig(**BERT)).eval()


def tiny_vit(cls=ViTForImageClassification):
    torch.manual_seed(0)
    return cls(ViTConfig(**VIT)).eval()


def analytic_bert_macs(seq_len, layers=2, hidden=32, intermediate=64, pooler=True):
    """Multiply-adds of BERT's matrix products for one sequence."""
    projections = 4 * seq_len * hidden * hidden          # Q, K, V, output
    attention = 2 * seq_len * seq_len * hidden           # Q K^T and A V over all heads
    feed_forward = 2 * seq_len * hidden * intermediate   # up and down
    return layers * (projections + attention + feed_forward) + (hidden * hidden if pooler else 0)


# ---------------------------------------------------------------- inputs

def test_example_inputs_shapes_and_seq_cap():
    vit_inputs = example_inputs(tiny_vit(), batch_size=3)
    assert list(vit_inputs) == ["pixel_values"]
    assert vit_inputs["pixel_values"].shape == (3, 1, 8, 8)

    bert_inputs = example_inputs(tiny_bert(), batch_size=2, seq_len=128)
    assert list(bert_inputs) == ["input_ids", "attention_mask", "token_type_ids"]
    for tensor in bert_inputs.values():
        assert tensor.shape == (2, 64)  # capped at max_position_embeddings
    assert int(bert_inputs["input_ids"].max()) < 100


def test_unsupported_model_type_is_a_user_error():
    # GPT-2 is supported since issue 9; OPT is not.
    opt = OPTModel(OPTConfig(num_hidden_layers=1, hidden_size=8, num_attention_heads=2, ffn_dim=16,
                             vocab_size=10, max_position_embeddings=8, word_embed_proj_dim=8))
    with pytest.raises(InvalidOptionError, match="opt"):
        example_inputs(opt)
    with pytest.raises(InvalidOptionError):
        profile_model(opt, onnx=False)


# ---------------------------------------------------------------- parameters and size

def test_count_parameters_counts_tied_weights_once():
    model = tiny_bert(BertForMaskedLM)
    assert model.cls.predictions.decoder.weight is model.bert.embeddings.word_embeddings.weight
    unique = {p.data_ptr(): p.numel() for _, p in model.named_parameters(remove_duplicate=False)}
    with_duplicates = sum(p.numel() for _, p in model.named_parameters(remove_duplicate=False))
    assert count_parameters(model) == sum(unique.values())
    assert count_parameters(model) == with_duplicates - (100 * 32 + 100)  # decoder weight and bias are tied


def test_size_on_disk_counts_weight_files_only(tmp_path):
    model = tiny_bert()
    model.save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    assert size_on_disk(tmp_path) == weights.stat().st_size  # config.json not counted
    assert size_on_disk(weights) == weights.stat().st_size
    with pytest.raises(ModelLoadError):
        size_on_disk(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError):
        size_on_disk(tmp_path / "empty")


# ---------------------------------------------------------------- FLOPs

def test_bert_flops_fvcore_flopcounter_and_analytic_agree():
    model = tiny_bert()
    seq_len = 64
    inputs = example_inputs(model, batch_size=1, seq_len=seq_len)
    analytic_macs = analytic_bert_macs(seq_len)

    result = count_flops(model, inputs)

    assert result["counter"] == "fvcore" and result["attention"] == "eager"
    assert result["flops"] == 2 * result["macs"]
    # Matrix products: both counters see exactly the analytic count (attention included).
    gemm_macs = result["macs_by_operator"]["linear"] + result["macs_by_operator"]["matmul"]
    assert gemm_macs == pytest.approx(analytic_macs, rel=0.01)
    assert result["flops_flopcounter"] == pytest.approx(2 * analytic_macs, rel=0.01)
    assert result["gemm_relative_diff"] < 0.01
    # fvcore's total adds LayerNorm, a few percent on a model this narrow.
    assert result["flops"] == pytest.approx(result["flops_flopcounter"], rel=0.05)
    assert result["macs"] == pytest.approx(analytic_macs, rel=0.05)
    assert "aten::softmax" in result["skipped_ops"]
    # The caller's model keeps its attention implementation.
    assert model.config._attn_implementation == "sdpa"


def test_sdpa_hides_attention_flops_which_is_why_we_count_eager():
    model = tiny_bert()
    inputs = example_inputs(model, batch_size=1, seq_len=64)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(**inputs)
    assert model.config._attn_implementation == "sdpa"
    missing = 2 * analytic_bert_macs(64) - counter.get_total_flops()
    assert missing == pytest.approx(2 * 2 * 2 * 64 * 64 * 32, rel=0.01)  # the attention matmuls


def test_vit_flops_cross_check_and_flopcounter_only_path():
    model = tiny_vit()
    inputs = example_inputs(model)
    fvcore_result = count_flops(model, inputs)
    assert fvcore_result["gemm_relative_diff"] < 0.01
    assert fvcore_result["macs_by_operator"]["conv"] > 0  # the patch embedding

    flopcounter_result = count_flops(model, inputs, counter="flopcounter")
    assert flopcounter_result["counter"] == "flopcounter"
    assert flopcounter_result["flops"] == fvcore_result["flops_flopcounter"]
    assert flopcounter_result["skipped_ops"] is None
    with pytest.raises(InvalidOptionError):
        count_flops(model, inputs, counter="ptflops")


# ---------------------------------------------------------------- latency

def test_measure_latency_records_setup_and_restores_threads():
    model = tiny_bert()
    inputs = example_inputs(model, batch_size=2, seq_len=16)
    torch.set_num_threads(1)
    result = measure_latency(model, inputs, repeats=3, warmup=1, threads=2)
    assert torch.get_num_threads() == 1
    assert result["threads"] == 2
    assert 0 < result["median_ms"] <= result["p90_ms"]
    assert (result["batch_size"], result["seq_len"]) == (2, 16)
    assert result["dtype"] == "float32" and result["attention"] == "sdpa"
    with pytest.raises(InvalidOptionError):
        measure_latency(model, inputs, repeats=0)


@pytest.mark.parametrize("model_class", [ViTForImageClassification, ViTModel, BertForMaskedLM,
                                         BertForSequenceClassification, BertModel])
def test_profile_model_on_every_supported_class(model_class, tmp_path):
    model = tiny_vit(model_class) if model_class.__name__.startswith("ViT") else tiny_bert(model_class)
    model.save_pretrained(tmp_path / "model")

    report = profile_model(model, model_dir=tmp_path / "model", seq_len=16, repeats=2, warmup=1,
                           tmp_dir=tmp_path)

    assert report["model_class"] == model_class.__name__
    assert report["parameters"] == count_parameters(model)
    assert report["size_on_disk_bytes"] == (tmp_path / "model" / "model.safetensors").stat().st_size
    assert report["flops"]["counter"] == "fvcore" and report["flops"]["gemm_relative_diff"] < 0.01
    assert report["latency_pytorch"]["median_ms"] > 0
    assert report["latency_onnx"]["backend"] == "onnxruntime" and report["latency_onnx"]["median_ms"] > 0
    assert report["onnx_export"]["max_abs_diff"] < 1e-4
    # The temporary ONNX export is gone.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
