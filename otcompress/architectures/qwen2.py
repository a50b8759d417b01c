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
