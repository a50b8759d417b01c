"""Hugging Face Qwen2: the LLaMA-style decoder with q/k/v biases (see llama.py)."""
from __future__ import annotations

from otcompress.architectures import llama
from otcompress.architectures.llama import INPUT_AXES, INPUTS, example_inputs, max_seq_len, task  # noqa: F401
from otcompress.flowgraph import ArchSpec

MODEL_TYPE = "qwen2"
MODEL_CLASSES = ("Qwen2ForCausalLM", "Qwen2Model")
MUST_MATCH, TEACHER_MUST_MATCH, BLOCKS = llama.MUST_MATCH, llama.TEACHER_MUST_MATCH, llama.BLOCKS
HEAD_WIDTH = llama.HEAD_WIDTH  # Qwen2Config leaves it unset (hidden / heads); Qwen2Attention reads it if set


def build(config, keys, *, qk="separate") -> ArchSpec:
    spec = llama.build(config, keys, qk=qk)
    spec.name = MODEL_TYPE
    return spec


# Per-block settings: which attention each block has. `layer_types` is what
# transformers 5 reads; `max_window_layers` (the leading full-attention blocks)
# is what readers older than layer_types derive the types from, so it must
# say the same. A shallower model's blocks keep the types they were trained with.
BLOCK_KEYS = ("layer_types", "max_window_layers")


def keep_blocks(parent_config, cfg, kept) -> None:
    """`cfg` (a copy of the parent's, `len(kept)` blocks): the kept blocks' types."""
    cfg.layer_types = [parent_config.layer_types[k] for k in kept]
    _window_layers(cfg)


def set_depth(parent_config, cfg, layers: int) -> None:
    """A fold target of `layers` blocks before any block is chosen: types from
    the sliding-window settings for the new depth, else by relative depth
    (block i takes the type at its place in the parent)."""
    if getattr(cfg, "sliding_window", None) is not None and cfg.max_window_layers is not None:
        mwl = min(parent_config.max_window_layers, layers)
        cfg.layer_types = ["sliding_attention" if i >= mwl else "full_attention" for i in range(layers)]
    else:
        types, n = parent_config.layer_types, len(parent_config.layer_types)
        cfg.layer_types = [types[min(n - 1, (2 * i + 1) * n // (2 * layers))] for i in range(layers)]
    _window_layers(cfg)


def _window_layers(cfg) -> None:
    if "sliding_attention" in cfg.layer_types:
        cfg.max_window_layers = cfg.layer_types.index("sliding_attention")
    elif cfg.max_window_layers is not None:
        cfg.max_window_layers = min(cfg.max_window_layers, cfg.num_hidden_layers)
