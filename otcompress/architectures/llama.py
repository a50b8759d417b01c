"""Hugging Face LLaMA-style decoders (LLaMA; Qwen2 reuses this file with
q/k/v biases): pre-RMSNorm blocks, rotary grouped-query attention, SwiGLU MLP,
an untied LM head by default; a tied one (Llama-3.2-1B/3B, Qwen2.5-0.5B/1.5B)
*is* the embedding table, so, as in gpt2.py, a tied model keeps one map for the
whole residual stream, the embedding's: o_proj and down_proj write into it
instead of getting maps of their own mixed in at the joins, and the final
norm and the head live in the embedding's space.

Heterogeneous width here means fewer heads (and key/value heads) and a
narrower MLP at the *same* head width: rotary embeddings pair the units inside
a head with fixed frequencies, so maps move whole heads (the engine's
`Heads(rotary=True)` handling) and never reorder units inside one."""
from __future__ import annotations

from otcompress.architectures import common
from otcompress.flowgraph import ArchSpec, In, Out, Probe, norm_weight, rotary_decoder_block, solve, stack

MODEL_TYPE = "llama"
MODEL_CLASSES = ("LlamaForCausalLM", "LlamaModel")
# The module list holding the transformer blocks (depth maps renumber it).
BLOCKS = "layers"
MUST_MATCH = ("vocab_size", "hidden_act", "rope_parameters", "max_position_embeddings",
              "tie_word_embeddings")
TEACHER_MUST_MATCH = ("vocab_size", "rope_parameters", "max_position_embeddings")
INPUTS = ("input_ids", "attention_mask")
INPUT_AXES = common.TEXT_AXES
# Rotary embeddings pair units inside a head: a fold target keeps the parent's head width (this config key).
HEAD_WIDTH = "head_dim"


def example_inputs(config, batch_size, seq_len, generator):
    return common.text_example_inputs(config, INPUTS, batch_size, seq_len, max_seq_len(config), generator)


def max_seq_len(config):
    return config.max_position_embeddings


def task(class_name):
    return "causal-lm"


def build(config, keys, *, qk="separate") -> ArchSpec:
    """`qk` is ignored: rotary heads always get their maps at the Heads marker."""
    p = "model." if any(k.startswith("model.") for k in keys) else ""
    axes = {f"{p}embed_tokens.weight": (None, Out("emb"))}
    nodes = [solve("emb", Probe(f"{p}layers.0.input_layernorm", "in"))]
    qkv_bias = f"{p}layers.0.self_attn.q_proj.bias" in keys
    tied = {}
    if "lm_head.weight" in keys and getattr(config, "tie_word_embeddings", False):
        tied["lm_head.weight"] = f"{p}embed_tokens.weight"

    def layer(i, r_in):
        L = f"{p}layers.{i}"
        path = {"q": f"{L}.self_attn.q_proj", "k": f"{L}.self_attn.k_proj", "v": f"{L}.self_attn.v_proj",
                "o": f"{L}.self_attn.o_proj", "norm_attn": f"{L}.input_layernorm",
                "norm_mlp": f"{L}.post_attention_layernorm", "gate": f"{L}.mlp.gate_proj",
                "up": f"{L}.mlp.up_proj", "down": f"{L}.mlp.down_proj"}
        return rotary_decoder_block(i, r_in, path, qkv_bias=qkv_bias, one_stream=bool(tied))
    r = stack(config.num_hidden_layers, "emb", layer, axes, nodes)
    axes.update(norm_weight(r, f"{p}norm"))
    if "lm_head.weight" in keys and not tied:
        axes["lm_head.weight"] = (None, In(r))  # the vocabulary axis is fixed
    return ArchSpec(MODEL_TYPE, axes, nodes, tied=tied)
