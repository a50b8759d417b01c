"""What the per-family files share: the dynamic axes and dummy inputs of
image and text encoders, and the data task a model class takes.

Every family file defines, besides its flow graph (`build`):
  MODEL_TYPE      the Hugging Face `model_type` it describes
  MODEL_CLASSES   the model classes fusion accepts
  MUST_MATCH      config values anchor and parents must share (depth may differ:
                  a deeper parent is depth-mapped, see otcompress/depth.py)
  BLOCKS          the module list holding the transformer blocks ("encoder.layer")
  INPUTS          the model's input names, the first one required
  INPUT_AXES      the dynamic axes of every input for ONNX export
  example_inputs(config, batch_size, seq_len, generator) -> dict of tensors
  max_seq_len(config) -> the longest token sequence, None for images
  task(class_name) -> the data task ("image-classification", "masked-lm",
                      "sequence-classification")
and may define
  EMBEDDING_POOLING  how a headless model's embedding is pooled when its
                     checkpoint does not say ("mean" over real tokens if absent)
  token_filter_for(config) -> select(name, seq_len): the token positions that
                     count as activation samples (vision families only)
"""
from __future__ import annotations

import torch

IMAGE_AXES = {0: "batch"}
TEXT_AXES = {0: "batch", 1: "sequence"}


def image_example_inputs(config, batch_size: int, generator: torch.Generator) -> dict:
    size = config.image_size
    height, width = (size, size) if isinstance(size, int) else tuple(size)
    shape = (batch_size, config.num_channels, height, width)
    return {"pixel_values": torch.randn(shape, generator=generator)}


def text_example_inputs(config, names, batch_size: int, seq_len: int, max_len: int,
                        generator: torch.Generator) -> dict:
    """Random token ids, a full attention mask and (where the model takes them)
    zero token types, `seq_len` capped at `max_len`."""
    shape = (batch_size, min(seq_len, max_len))
    make = {
        "input_ids": lambda: torch.randint(0, config.vocab_size, shape, generator=generator),
        "attention_mask": lambda: torch.ones(shape, dtype=torch.long),
        "token_type_ids": lambda: torch.zeros(shape, dtype=torch.long),
    }
    return {name: make[name]() for name in names}


def encoder_text_task(class_name: str) -> str:
    """Text encoders: a sequence classifier classifies, anything else (the
    masked LM, the bare model) trains and evaluates as a masked LM."""
    return "sequence-classification" if class_name.endswith("ForSequenceClassification") else "masked-lm"
