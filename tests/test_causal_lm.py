"""Causal LMs (LLaMA, GPT-2) outside the engine: data (pydoc, .txt, .jsonl),
shifted next-token loss, eval, finetune, profile and export through the CLI,
on tiny models with tokenizers trained here. Bad input: one line, exit 2."""
import json
import math

import numpy as np
import pytest
import torch
import transformers as T

from otcompress import finetune as ft
from otcompress.cli import main
from otcompress.data import causal_labels, load_data, pydoc_paragraphs, train_wordpiece_tokenizer


def run(capsys, *args):
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in args])
    out, err = capsys.readouterr()
    return e.value.code, out, err


def bpe_tokenizer(out_dir):
    """A GPT-2-style byte-level BPE tokenizer: no pad token, one end-of-text token."""
    from tokenizers import ByteLevelBPETokenizer
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(pydoc_paragraphs("train")[:300], vocab_size=300, min_frequency=2,
                            special_tokens=["<|endoftext|>"])
    tok = T.PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token="<|endoftext|>",
                                    bos_token="<|endoftext|>", unk_token="<|endoftext|>")
    tok.save_pretrained(out_dir)
    return tok


def llama(vocab, hidden=32, heads=4, kv=2, inter=48, seed=0, cls=T.LlamaForCausalLM, pad=0):
    torch.manual_seed(seed)
    cfg = T.LlamaConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=2, num_attention_heads=heads,
                        num_key_value_heads=kv, intermediate_size=inter, head_dim=hidden // heads,
                        max_position_embeddings=64, pad_token_id=pad)
    return cls(cfg).eval()


def gpt2(vocab, hidden=32, heads=4, seed=0, eos=0):
    torch.manual_seed(seed)
    cfg = T.GPT2Config(vocab_size=vocab, n_embd=hidden, n_layer=2, n_head=heads, n_positions=64,
                       bos_token_id=eos, eos_token_id=eos)
    return T.GPT2LMHeadModel(cfg).eval()


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    d = tmp_path_factory.mktemp("decoders")
    wp = train_wordpiece_tokenizer(pydoc_paragraphs("train")[:300], 200, d / "wordpiece")
    for name, model in (("llama", llama(len(wp), pad=wp.pad_token_id, seed=1)),
                        ("llama_wide", llama(len(wp), hidden=64, heads=8, kv=4, inter=96,
                                             pad=wp.pad_token_id, seed=2)),
                        ("llama_bare", llama(len(wp), cls=T.LlamaModel, pad=wp.pad_token_id))):
        model.save_pretrained(d / name)
        wp.save_pretrained(d / name)
    bpe = bpe_tokenizer(d / "gpt2")
    gpt2(len(bpe), eos=bpe.eos_token_id).save_pretrained(d / "gpt2")
    lines = [p.replace("\n", " ") for p in pydoc_paragraphs("eval")[:60]]
    (d / "text.txt").write_text("\n".join(lines) + "\n")
    (d / "text.jsonl").write_text("\n".join(json.dumps({"text": t, "label": i % 2})
                                            for i, t in enumerate(lines)) + "\n")
    return d


# --------------------------------------------------------------------------- data and loss


def test_labels_are_the_ids_with_padding_and_the_first_position_ignored(zoo):
    tok = T.AutoTokenizer.from_pretrained(zoo / "llama")
    model = T.LlamaForCausalLM.from_pretrained(zoo / "llama")
    data = load_data("pydoc", model, tokenizer=tok)
    assert data.task == "causal-lm" and data.has_labels and data.num_labels is None
    ev = data.splits["eval"]
    assert set(ev) == {"input_ids", "attention_mask", "labels"}
    ids, mask, labels = ev["input_ids"], ev["attention_mask"], ev["labels"]
    assert (labels[:, 0] == -100).all()
    assert torch.equal(labels[:, 1:] == -100, mask[:, 1:] == 0)
    assert torch.equal(labels[labels != -100], ids[labels != -100])
    # Right padding: every row's real tokens come first.
    assert torch.equal(mask, (torch.arange(mask.shape[1]) < mask.sum(1, keepdim=True)).long())
    # Calibration batches are inputs only.
    assert "labels" not in next(data.calibration_batches(8))


def test_shifted_loss_equals_hugging_faces(zoo):
    tok = T.AutoTokenizer.from_pretrained(zoo / "llama")
    model = T.LlamaForCausalLM.from_pretrained(zoo / "llama")
    data = load_data("pydoc", model, tokenizer=tok)
    total, tokens = 0.0, 0
    with torch.no_grad():
        for batch in data.batches("eval", 64):
            n = int((batch["labels"][:, 1:] != -100).sum())
            total += model(**batch).loss.item() * n  # HF shifts the labels itself
            tokens += n
    metrics = ft.evaluate(model, data)
    assert metrics["tokens"] == tokens
    assert metrics["loss"] == pytest.approx(total / tokens, rel=1e-5)
    assert metrics["perplexity"] == pytest.approx(math.exp(metrics["loss"]))
    assert 0 <= metrics["accuracy"] <= 1


def test_a_tokenizer_without_pad_token_pads_with_end_of_text(zoo):
    tok = T.AutoTokenizer.from_pretrained(zoo / "gpt2")
    assert tok.pad_token_id is None
    model = T.GPT2LMHeadModel.from_pretrained(zoo / "gpt2")
    data = load_data(str(zoo / "text.txt"), model, tokenizer=tok)
    assert tok.pad_token_id is None  # the caller's tokenizer is left alone
    s = data.splits["train"]
    padded = s["attention_mask"] == 0
    assert padded.any() and (s["input_ids"][padded] == tok.eos_token_id).all()
    assert (s["labels"][padded] == -100).all()
    assert data.default_eval_split == "all"  # a user file is evaluated whole by default


def test_jsonl_labels_are_ignored_for_causal_lm(zoo):
    tok = T.AutoTokenizer.from_pretrained(zoo / "llama")
    model = T.LlamaForCausalLM.from_pretrained(zoo / "llama")
    data = load_data(str(zoo / "text.jsonl"), model, tokenizer=tok)
    assert data.task == "causal-lm" and data.num_labels is None and data.class_names is None
    s = data.splits["train"]
    assert torch.equal(s["labels"], causal_labels(s["input_ids"], s["attention_mask"]))


def test_finetune_lowers_the_loss_and_distils_from_a_wider_teacher(zoo):
    tok = T.AutoTokenizer.from_pretrained(zoo / "llama")
    model = T.LlamaForCausalLM.from_pretrained(zoo / "llama")
    teacher = T.LlamaForCausalLM.from_pretrained(zoo / "llama_wide")
    data = load_data("pydoc", model, tokenizer=tok, samples=256)
    before = ft.evaluate(model, data)["loss"]
    summary = ft.finetune(model, data, steps=8, lr=3e-3, batch_size=32, teachers=[teacher])
    assert summary["steps"] == 8 and np.isfinite(summary["final_loss"])
    assert ft.evaluate(model, data)["loss"] < before


# --------------------------------------------------------------------------- CLI


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_cli_eval_on_pydoc_and_a_text_file(zoo, capsys, name):
    code, stdout, err = run(capsys, "eval", zoo / name, "--data", "pydoc", "--json")
    assert code == 0, err
    m = json.loads(stdout)
    assert m["split"] == "eval" and m["tokens"] > 1000
    assert m["perplexity"] == pytest.approx(math.exp(m["loss"])) and 0 <= m["accuracy"] <= 1
    # Untrained: about log(vocab size) nats per token.
    vocab = T.AutoConfig.from_pretrained(zoo / name).vocab_size
    assert abs(m["loss"] - math.log(vocab)) < 0.5
    code, stdout, err = run(capsys, "eval", zoo / name, "--data", zoo / "text.txt", "--json")
    assert code == 0, err
    m = json.loads(stdout)
    assert m["split"] == "all" and m["examples"] == 60


@pytest.mark.parametrize("name,data", [("llama", "pydoc"), ("gpt2", "text.txt")])
def test_cli_finetune(zoo, tmp_path, capsys, name, data):
    spec = data if data == "pydoc" else zoo / data
    out = tmp_path / "ft"
    code, stdout, err = run(capsys, "finetune", zoo / name, "--data", spec, "--steps", 6, "--lr", 3e-3,
                            "--batch-size", 16, "--out", out, "--json")
    assert code == 0, err
    result = json.loads(stdout)
    before, after = result["metrics"]["before"], result["metrics"]["after"]
    assert after["loss"] < before["loss"] and after["tokens"] == before["tokens"] > 0
    back = T.AutoModelForCausalLM.from_pretrained(out)
    assert type(back).__name__ == {"llama": "LlamaForCausalLM", "gpt2": "GPT2LMHeadModel"}[name]
    assert (out / "tokenizer.json").exists()  # the tokenizer travels with the model


def test_cli_finetune_with_a_wider_teacher(zoo, tmp_path, capsys):
    out = tmp_path / "ft"
    code, stdout, err = run(capsys, "finetune", zoo / "llama", "--data", "pydoc", "--steps", 3,
                            "--batch-size", 16, "--teachers", zoo / "llama_wide", "--out", out, "--json")
    assert code == 0, err
    assert json.loads(stdout)["teachers"] == [str(zoo / "llama_wide")]


def _analytic_llama_flops(cfg, seq):
    n, h, kv, d, inter, v = (cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim,
                             cfg.intermediate_size, cfg.vocab_size)
    per_layer = 2 * seq * (2 * n * n + 2 * n * kv * d + 3 * n * inter) + 2 * 2 * h * seq * seq * d
    return cfg.num_hidden_layers * per_layer + 2 * seq * n * v


def test_cli_profile_counts_flops_on_token_ids(zoo, capsys):
    code, stdout, err = run(capsys, "profile", zoo / "llama", zoo / "llama_wide", zoo / "gpt2", "--seq-len", 16,
                            "--repeats", 2, "--json")
    assert code == 0, err
    res = json.loads(stdout)["models"]
    small, wide, g = res[str(zoo / "llama")], res[str(zoo / "llama_wide")], res[str(zoo / "gpt2")]
    for r in (small, wide, g):
        assert r["inputs"] == {"batch_size": 1, "seq_len": 16}
        assert r["flops"]["attention"] == "eager" and r["flops"]["gemm_relative_diff"] < 0.01
        assert r["latency_onnx"]["median_ms"] > 0 and r["onnx_export"]["max_abs_diff"] < 1e-4
    cfg = T.AutoConfig.from_pretrained(zoo / "llama")
    assert small["flops"]["flops_flopcounter"] == _analytic_llama_flops(cfg, 16)
    assert small["flops"]["flops"] < wide["flops"]["flops"]
    assert small["parameters"] < wide["parameters"]


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_cli_export_logits_with_dynamic_axes_and_ort_parity(zoo, tmp_path, capsys, name):
    from otcompress.export import onnx_predict
    onnx_path = tmp_path / "m.onnx"
    code, stdout, err = run(capsys, "export", zoo / name, "--out", onnx_path, "--quantize", "int8", "--json")
    assert code == 0, err
    rep = json.loads(stdout)
    assert rep["output_names"] == ["logits"]  # no KV cache outputs
    assert rep["input_names"] == ["input_ids", "attention_mask"]
    assert rep["dynamic_axes"]["logits"] == {"0": "batch", "1": "sequence"}
    assert rep["max_abs_diff"] < 1e-4 and rep["check_inputs"]["seq_len"] != rep["export_inputs"]["seq_len"]
    model = T.AutoModelForCausalLM.from_pretrained(zoo / name).eval()
    for batch, seq in ((1, 5), (3, 21)):
        ids = torch.randint(0, model.config.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(seq))
        mask = torch.ones_like(ids)
        with torch.no_grad():
            want = model(input_ids=ids, attention_mask=mask, use_cache=False).logits.numpy()
        got = onnx_predict(onnx_path, {"input_ids": ids, "attention_mask": mask})
        assert got.shape == (batch, seq, model.config.vocab_size)
        assert np.abs(got - want).max() < 1e-4
    assert rep["quantized"]["max_abs_diff_vs_fp32"] < 1.0


def test_cli_fuse_decoders_with_pydoc_and_finetune(zoo, tmp_path, capsys, race_random_parents):
    out = tmp_path / "fused"
    code, stdout, err = run(capsys, "fuse", "--anchor", zoo / "llama", "--parents", zoo / "llama_wide",
                            "--out", out, "--data", "pydoc", "--samples", 32, "--finetune-steps", 4,
                            "--batch-size", 16, "--json")
    assert code == 0, err
    report = json.loads(stdout)["report"]
    assert report["race"]["winner"]
    for name, m in report["metrics"].items():
        assert m["perplexity"] > 1 and m["tokens"] > 0, name
    back = T.LlamaForCausalLM.from_pretrained(out)
    assert back.config.hidden_size == 32 and (out / "tokenizer.json").exists()


@pytest.mark.parametrize("args,message", [
    (["eval", "{z}/llama_bare", "--data", "pydoc"], "has no task head"),
    (["eval", "{z}/llama", "--data", "digits"], "image data does not fit a llama model (causal-lm)"),
    (["eval", "{z}/gpt2", "--data", "{z}/nope.txt"], "data spec"),
    (["finetune", "{z}/gpt2", "--data", "pydoc", "--steps", "1", "--out", "{t}/o"], "the tokenizer has 300 tokens"),
])
def test_cli_errors_are_one_line(zoo, tmp_path, capsys, args, message):
    if "the tokenizer has 300 tokens" in message:
        # GPT-2's own BPE tokenizer fits; pydoc through a bigger vocabulary than the model's must not.
        small = tmp_path / "gpt2_small_vocab"
        gpt2(200).save_pretrained(small)
        T.AutoTokenizer.from_pretrained(zoo / "gpt2").save_pretrained(small)
        args = [a.replace("{z}/gpt2", str(small)) for a in args]
    code, _, err = run(capsys, *[a.format(z=zoo, t=tmp_path) for a in args])
    assert code == 2, err
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], err
    assert not (tmp_path / "o").exists()


def test_gpt2_lm_head_counts_as_a_head():
    """GPT2LMHeadModel has no "For" in its name; it must still pass as a teacher."""
    from otcompress import modelio
    from otcompress.architectures import head_of, is_headless
    cfg = T.GPT2Config(vocab_size=50, n_embd=16, n_layer=1, n_head=2, n_positions=32)
    cfg.architectures = ["GPT2LMHeadModel"]
    bare = T.GPT2Config.from_dict({**cfg.to_dict(), "architectures": ["GPT2Model"]})
    assert head_of(cfg) == "LMHeadModel" and head_of(bare) is None
    assert not is_headless(cfg) and is_headless(bare)
    modelio.check_teachers(cfg, [cfg])
