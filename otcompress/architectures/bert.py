"""Hugging Face BERT, post-LayerNorm encoder, with pooler, sequence classifier
and masked-LM head.

Embeddings: word, position and token-type tables are summed into one stream,
so one map is solved from their columns together (a hidden unit's feature
vector is its column over vocabulary, positions and types)."""
from __future__ import annotations

from otcompress.architectures.common import TEXT_AXES, encoder_text_task, text_example_inputs
from otcompress.flowgraph import (ArchSpec, In, Out, Probe, Share, encoder_block, layernorm,
                                  linear, solve, stack)

MODEL_TYPE = "bert"
MODEL_CLASSES = ("BertForMaskedLM", "BertForSequenceClassification", "BertModel")
# The module list holding the transformer blocks (depth maps renumber it).
BLOCKS = "encoder.layer"
MUST_MATCH = ("vocab_size", "max_position_embeddings", "type_vocab_size",
              "hidden_act")
TEACHER_MUST_MATCH = ("vocab_size", "max_position_embeddings", "type_vocab_size")
# finetune applies BertForMaskedLM's vocabulary head (`cls`) to the masked
# positions only: it dominates a small model's step (35% faster on pydoc).
MASKED_LM_HEAD = {"BertForMaskedLM": "cls"}
INPUTS = ("input_ids", "attention_mask", "token_type_ids")
INPUT_AXES = TEXT_AXES


def max_seq_len(config):
    return config.max_position_embeddings


def example_inputs(config, batch_size, seq_len, generator):
    return text_example_inputs(config, INPUTS, batch_size, seq_len, max_seq_len(config), generator)


def task(class_name):
    return encoder_text_task(class_name)


def build(config, keys, *, qk="separate") -> ArchSpec:
    p = "bert." if any(k.startswith("bert.") for k in keys) else ""
    axes, nodes, r = embeddings_and_encoder(config, p, qk=qk)
    E = f"{p}embeddings"
    tied = {}
    if f"{p}pooler.dense.weight" in keys:
        axes.update(linear("pool", r, prefix=f"{p}pooler.dense"))
        nodes.append(solve("pool", Probe(f"{p}pooler", "out"), sequence=False))
    if "classifier.weight" in keys:
        axes.update(linear(None, "pool", prefix="classifier"))
    if "cls.predictions.transform.dense.weight" in keys:
        H = "cls.predictions"
        axes.update(linear("head", r, prefix=f"{H}.transform.dense"))
        axes.update(layernorm("head", f"{H}.transform.LayerNorm"))
        axes[f"{H}.decoder.bias"] = (None,)
        axes[f"{H}.bias"] = (None,)
        if getattr(config, "tie_word_embeddings", True):
            # The decoder *is* the word-embedding table, so the head's output
            # must live in the embedding's space: share its map, keep the tie.
            nodes.append(Share("head", "emb"))
            tied[f"{H}.decoder.weight"] = f"{E}.word_embeddings.weight"
        else:
            nodes.append(solve("head", Probe(f"{H}.transform", "out")))
            axes[f"{H}.decoder.weight"] = (None, In("head"))
    return ArchSpec("bert", axes, nodes, tied=tied)


def embeddings_and_encoder(config, p: str, *, qk: str):
    """Axes and nodes of BERT's embeddings and encoder under the prefix `p`
    ("bert.", "roberta." or ""), and the TM of the encoder's output. RoBERTa
    shares these names and this structure."""
    E = f"{p}embeddings"
    axes = {
        f"{E}.word_embeddings.weight": (None, Out("emb")),
        f"{E}.position_embeddings.weight": (None, Out("emb")),
        f"{E}.token_type_embeddings.weight": (None, Out("emb")),
    }
    axes.update(layernorm("emb", f"{E}.LayerNorm"))
    nodes = [solve("emb", Probe(f"{E}.LayerNorm", "in"))]

    def layer(i, r_in):
        L = f"{p}encoder.layer.{i}"
        path = {
            "q": f"{L}.attention.self.query", "k": f"{L}.attention.self.key",
            "v": f"{L}.attention.self.value", "o": f"{L}.attention.output.dense",
            "ln_attn": f"{L}.attention.output.LayerNorm", "ln_mlp": f"{L}.output.LayerNorm",
            "fc1": f"{L}.intermediate.dense", "fc1_act": f"{L}.intermediate",
            "fc2": f"{L}.output.dense",
            "attn_skip": f"{L}.attention.self.query", "mlp_skip": f"{L}.intermediate.dense",
        }
        return encoder_block(i, r_in, path, qk=qk, pre_ln=False)
    r = stack(config.num_hidden_layers, "emb", layer, axes, nodes)
    return axes, nodes, r
