"""What the per-family files share: the dynamic axes and dummy inputs of
image and text encoders, the data task a model class takes, and the task head
a model class name says it has.

Every family file defines, besides its flow graph (`build`):
  MODEL_TYPE      the Hugging Face `model_type` it describes
  MODEL_CLASSES   the model classes fusion accepts
  MUST_MATCH      config values anchor and parents must share (depth may differ:
                  a deeper parent is depth-mapped, see otcompress/depth.py)
  TEACHER_MUST_MATCH  the part of MUST_MATCH a distillation teacher must share
                  with its student: the values that fix inputs and outputs
                  (depth, widths, patching and the like are the teacher's own)
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
  WIDTHS          {"hidden", "heads", "intermediate": config key}, where the
                  config names its widths otherwise than hidden_size /
                  num_attention_heads / intermediate_size (fold targets)
  HEAD_WIDTH      the config key of a head's width that a fold target keeps
                  (rotary families: units pair up inside a head), set on the
                  target where the parent's config leaves it implicit
  UNSET_WIDTHS    {config key: config -> value} for a width key whose value may
                  be None (GPT-2's n_inner: None means 4 x n_embd)
  MASKED_LM_HEAD  {masked-LM class name: attribute}: the model's vocabulary
                  head, a module mapping the encoder's last hidden state to
                  logits, that finetune applies to the masked positions only
                  (a class not listed is scored on its full logits)
  class_head(class_name) -> the task-head part of a class name, where the
                  family's names break Hugging Face's convention (`class_head`
                  below)
  BLOCK_KEYS      config keys that describe each block (Qwen2's attention
                  types), with keep_blocks(parent_config, cfg, kept) (a
                  shallower model keeps its blocks' settings) and
                  set_depth(parent_config, cfg, layers) (a fold target's
                  guess before a depth map chose its blocks)
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


def class_head(class_name: str | None) -> str | None:
    """The task-head part of a Hugging Face model class name, by the library's
    naming convention: "ForMaskedLM" of BertForMaskedLM, "LMHeadModel" of
    GPT2LMHeadModel (a causal-LM head without "For"); None for a bare model
    (BertModel, ViTModel) or no name."""
    if class_name and class_name.endswith("LMHeadModel"):
        return "LMHeadModel"
    if not class_name or "For" not in class_name:
        return None
    return class_name[class_name.index("For"):]


def encoder_text_task(class_name: str) -> str:
    """Text encoders: a sequence classifier classifies, anything else (the
    masked LM, the bare model) trains and evaluates as a masked LM."""
    return "sequence-classification" if class_name.endswith("ForSequenceClassification") else "masked-lm"
