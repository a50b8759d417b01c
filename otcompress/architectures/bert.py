"""Hugging Face BERT, post-LayerNorm encoder, with pooler, sequence classifier
and masked-LM head.

Embeddings: word, position and token-type tables are summed into one stream,
so one map is solved from their columns together (a hidden unit's feature
vector is its column over vocabulary, positions and types)."""
from __future__ import annotations

from otcompress.flowgraph import (ArchSpec, In, Out, Probe, Share, encoder_block, layernorm,
                                  linear, solve)

MODEL_TYPE = "bert"
MODEL_CLASSES = ("BertForMaskedLM", "BertForSequenceClassification", "BertModel")
MUST_MATCH = ("num_hidden_layers", "vocab_size", "max_position_embeddings", "type_vocab_size")


def build(config, keys, *, qk="separate") -> ArchSpec:
    p = "bert." if any(k.startswith("bert.") for k in keys) else ""
    E = f"{p}embeddings"
    axes = {
        f"{E}.word_embeddings.weight": (None, Out("emb")),
        f"{E}.position_embeddings.weight": (None, Out("emb")),
        f"{E}.token_type_embeddings.weight": (None, Out("emb")),
    }
    axes.update(layernorm("emb", f"{E}.LayerNorm"))
    nodes = [solve("emb", Probe(f"{E}.LayerNorm", "in"))]
    r = "emb"
    for i in range(config.num_hidden_layers):
        L = f"{p}encoder.layer.{i}"
        path = {
            "q": f"{L}.attention.self.query", "k": f"{L}.attention.self.key",
            "v": f"{L}.attention.self.value", "o": f"{L}.attention.output.dense",
            "ln_attn": f"{L}.attention.output.LayerNorm", "ln_mlp": f"{L}.output.LayerNorm",
            "fc1": f"{L}.intermediate.dense", "fc1_act": f"{L}.intermediate",
            "fc2": f"{L}.output.dense",
            "attn_skip": f"{L}.attention.self.query", "mlp_skip": f"{L}.intermediate.dense",
        }
        block_axes, block_nodes, r = encoder_block(i, r, path, qk=qk, pre_ln=False)
        axes.update(block_axes)
        nodes += block_nodes
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
