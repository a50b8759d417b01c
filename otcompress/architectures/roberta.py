"""Hugging Face RoBERTa: BERT's embeddings and post-LayerNorm encoder (same
parameter names under `roberta.`), with its own heads.

- Masked LM (`lm_head`): dense -> GELU -> layer_norm -> decoder. The decoder is
  tied to the word embeddings by default: then the head's output lives in the
  embedding's space and shares its map, and the tie is kept. Untied, the head
  gets its own map, read at the layer norm's output.
- Sequence classifier (`classifier`): dense -> tanh -> out_proj on the first
  token; the dense output is a free axis (one map, one sample per sequence),
  out_proj's classes are fixed.
- RobertaModel has BERT's pooler.

Positions are counted from `pad_token_id + 1`, so the longest sequence is
`max_position_embeddings - pad_token_id - 1` tokens and the pad id must match."""
from __future__ import annotations

from otcompress.architectures.bert import embeddings_and_encoder
from otcompress.architectures.common import TEXT_AXES, encoder_text_task, text_example_inputs
from otcompress.flowgraph import ArchSpec, In, Probe, Share, layernorm, linear, solve

MODEL_TYPE = "roberta"
MODEL_CLASSES = ("RobertaForMaskedLM", "RobertaForSequenceClassification", "RobertaModel")
# The module list holding the transformer blocks (depth maps renumber it).
BLOCKS = "encoder.layer"
MUST_MATCH = ("vocab_size", "max_position_embeddings", "type_vocab_size",
              "pad_token_id", "hidden_act")
TEACHER_MUST_MATCH = ("vocab_size", "max_position_embeddings", "type_vocab_size", "pad_token_id")
INPUTS = ("input_ids", "attention_mask", "token_type_ids")
INPUT_AXES = TEXT_AXES


def max_seq_len(config):
    return config.max_position_embeddings - (config.pad_token_id or 0) - 1


def example_inputs(config, batch_size, seq_len, generator):
    return text_example_inputs(config, INPUTS, batch_size, seq_len, max_seq_len(config), generator)


def task(class_name):
    return encoder_text_task(class_name)


def build(config, keys, *, qk="separate") -> ArchSpec:
    p = "roberta." if any(k.startswith("roberta.") for k in keys) else ""
    axes, nodes, r = embeddings_and_encoder(config, p, qk=qk)
    tied = {}
    if f"{p}pooler.dense.weight" in keys:
        axes.update(linear("pool", r, prefix=f"{p}pooler.dense"))
        nodes.append(solve("pool", Probe(f"{p}pooler", "out"), sequence=False))
    if "classifier.dense.weight" in keys:
        axes.update(linear("cls", r, prefix="classifier.dense"))
        axes.update(linear(None, "cls", prefix="classifier.out_proj"))
        nodes.append(solve("cls", Probe("classifier.dense", "out"), sequence=False))
    if "lm_head.dense.weight" in keys:
        H = "lm_head"
        axes.update(linear("head", r, prefix=f"{H}.dense"))
        axes.update(layernorm("head", f"{H}.layer_norm"))
        axes[f"{H}.decoder.bias"] = (None,)  # the vocabulary axis is fixed
        axes[f"{H}.bias"] = (None,)
        if getattr(config, "tie_word_embeddings", True):
            nodes.append(Share("head", "emb"))
            tied[f"{H}.decoder.weight"] = f"{p}embeddings.word_embeddings.weight"
        else:
            nodes.append(solve("head", Probe(f"{H}.layer_norm", "out")))
            axes[f"{H}.decoder.weight"] = (None, In("head"))
    return ArchSpec("roberta", axes, nodes, tied=tied)
