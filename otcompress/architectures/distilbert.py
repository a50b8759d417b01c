"""Hugging Face DistilBERT: a post-LayerNorm encoder like BERT's under other
names (q_lin, k_lin, v_lin, out_lin, sa_layer_norm, ffn.lin1/lin2,
output_layer_norm), no token types and no pooler.

- Embeddings: word and position tables summed, then LayerNorm: one map solved
  from both tables' columns.
- Masked LM: vocab_transform -> activation -> vocab_layer_norm ->
  vocab_projector. The projector is tied to the word embeddings by default:
  then the head shares the embedding's map and the tie is kept; untied, the
  head gets its own map, read at vocab_layer_norm's output.
- Sequence classifier: pre_classifier -> ReLU -> classifier on the first
  token; pre_classifier's output is a free axis (one sample per sequence).

The config names its widths dim / n_heads / hidden_dim and its MLP activation
`activation` (hidden_size / num_attention_heads / num_hidden_layers work too,
through the config's attribute map)."""
from __future__ import annotations

from otcompress.architectures.common import TEXT_AXES, encoder_text_task, text_example_inputs
from otcompress.flowgraph import ArchSpec, In, Out, Probe, Share, encoder_block, layernorm, linear, solve, stack

MODEL_TYPE = "distilbert"
MODEL_CLASSES = ("DistilBertForMaskedLM", "DistilBertForSequenceClassification", "DistilBertModel")
# The module list holding the transformer blocks (depth maps renumber it).
BLOCKS = "transformer.layer"
MUST_MATCH = ("vocab_size", "max_position_embeddings", "sinusoidal_pos_embds",
              "activation")
# As before the move: `activation` (DistilBERT's name for hidden_act, which the
# other families leave to the teacher) is still required of a teacher.
TEACHER_MUST_MATCH = MUST_MATCH
INPUTS = ("input_ids", "attention_mask")  # DistilBERT takes no token_type_ids
INPUT_AXES = TEXT_AXES
# The config keys of the widths (hidden, heads, MLP), for fold targets.
WIDTHS = {"hidden": "dim", "heads": "n_heads", "intermediate": "hidden_dim"}


def max_seq_len(config):
    return config.max_position_embeddings


def example_inputs(config, batch_size, seq_len, generator):
    return text_example_inputs(config, INPUTS, batch_size, seq_len, max_seq_len(config), generator)


def task(class_name):
    return encoder_text_task(class_name)


def build(config, keys, *, qk="separate") -> ArchSpec:
    p = "distilbert." if any(k.startswith("distilbert.") for k in keys) else ""
    E = f"{p}embeddings"
    axes = {
        f"{E}.word_embeddings.weight": (None, Out("emb")),
        f"{E}.position_embeddings.weight": (None, Out("emb")),
    }
    axes.update(layernorm("emb", f"{E}.LayerNorm"))
    nodes = [solve("emb", Probe(f"{E}.LayerNorm", "in"))]

    def layer(i, r_in):
        L = f"{p}transformer.layer.{i}"
        path = {
            "q": f"{L}.attention.q_lin", "k": f"{L}.attention.k_lin",
            "v": f"{L}.attention.v_lin", "o": f"{L}.attention.out_lin",
            "ln_attn": f"{L}.sa_layer_norm", "ln_mlp": f"{L}.output_layer_norm",
            "fc1": f"{L}.ffn.lin1", "fc1_act": f"{L}.ffn.activation", "fc2": f"{L}.ffn.lin2",
            "attn_skip": f"{L}.attention.q_lin", "mlp_skip": f"{L}.ffn.lin1",
        }
        return encoder_block(i, r_in, path, qk=qk, pre_ln=False)
    r = stack(config.num_hidden_layers, "emb", layer, axes, nodes)
    tied = {}
    if "pre_classifier.weight" in keys:
        axes.update(linear("cls", r, prefix="pre_classifier"))
        axes.update(linear(None, "cls", prefix="classifier"))
        nodes.append(solve("cls", Probe("pre_classifier", "out"), sequence=False))
    if "vocab_transform.weight" in keys:
        axes.update(linear("head", r, prefix="vocab_transform"))
        axes.update(layernorm("head", "vocab_layer_norm"))
        axes["vocab_projector.bias"] = (None,)  # the vocabulary axis is fixed
        if getattr(config, "tie_word_embeddings", True):
            nodes.append(Share("head", "emb"))
            tied["vocab_projector.weight"] = f"{E}.word_embeddings.weight"
        else:
            nodes.append(solve("head", Probe("vocab_layer_norm", "out")))
            axes["vocab_projector.weight"] = (None, In("head"))
    return ArchSpec("distilbert", axes, nodes, tied=tied)
