"""Hugging Face ViT (transformers 5.x names), pre-LayerNorm encoder.

Embeddings: one map for the residual stream at the embedding output, solved
from the patch projection, class token and position embeddings together (the
three are summed/concatenated into that one stream)."""
from __future__ import annotations

import torch

from otcompress.architectures.common import IMAGE_AXES, image_example_inputs
from otcompress.errors import InvalidOptionError
from otcompress.flowgraph import ArchSpec, Out, Probe, encoder_block, layernorm, linear, solve, stack

MODEL_TYPE = "vit"
MODEL_CLASSES = ("ViTForImageClassification", "ViTModel")
# Config values that must be equal between anchor and parents.
# The module list holding the transformer blocks (depth maps renumber it).
BLOCKS = "layers"
MUST_MATCH = ("image_size", "patch_size", "num_channels", "hidden_act")
TEACHER_MUST_MATCH = ("image_size", "num_channels")  # a teacher may patch and activate otherwise
INPUTS = ("pixel_values",)
INPUT_AXES = IMAGE_AXES
EMBEDDING_POOLING = "cls"  # a headless ViT's embedding: the class token's final state


def example_inputs(config, batch_size, seq_len, generator):
    return image_example_inputs(config, batch_size, generator)


def max_seq_len(config):
    return None  # no token axis in the inputs


def task(class_name):
    return "image-classification"


def build(config, keys, *, qk="separate") -> ArchSpec:
    p = "vit." if any(k.startswith("vit.") for k in keys) else ""
    axes = {
        f"{p}embeddings.patch_embeddings.projection.weight": (Out("emb"), None, None, None),
        f"{p}embeddings.patch_embeddings.projection.bias": (Out("emb"),),
        f"{p}embeddings.cls_token": (None, None, Out("emb")),
        f"{p}embeddings.position_embeddings": (None, None, Out("emb")),
    }
    nodes = [solve("emb", Probe(f"{p}embeddings", "out"))]

    def layer(i, r_in):
        L = f"{p}layers.{i}"
        path = {
            "q": f"{L}.attention.q_proj", "k": f"{L}.attention.k_proj",
            "v": f"{L}.attention.v_proj", "o": f"{L}.attention.o_proj",
            "ln_attn": f"{L}.layernorm_before", "ln_mlp": f"{L}.layernorm_after",
            "fc1": f"{L}.mlp.fc1", "fc1_act": f"{L}.mlp.activation_fn", "fc2": f"{L}.mlp.fc2",
            "attn_skip": f"{L}.layernorm_before", "mlp_skip": f"{L}.layernorm_after",
        }
        return encoder_block(i, r_in, path, qk=qk, pre_ln=True)
    r = stack(config.num_hidden_layers, "emb", layer, axes, nodes)
    axes.update(layernorm(r, f"{p}layernorm"))
    if f"{p}pooler.dense.weight" in keys:
        axes.update(linear("pool", r, prefix=f"{p}pooler.dense"))
        nodes.append(solve("pool", Probe(f"{p}pooler", "out"), sequence=False))
    if "classifier.weight" in keys:
        axes.update(linear(None, r, prefix="classifier"))
    return ArchSpec("vit", axes, nodes, token_filter=token_filter_for(config))


def token_filter_for(config):
    """The activation token filter of a ViT of this config (its patch grid)."""
    grid = config.image_size // config.patch_size

    def select(name: str, seq_len: int) -> torch.Tensor:
        """Token indices kept for activation statistics: `only_cls`, or
        `window_n` = the class token plus the n x n centre patches."""
        if name == "only_cls":
            return torch.tensor([0])
        n = int(name.removeprefix("window_"))
        if n > grid:
            raise InvalidOptionError(f"token filter {name}: the patch grid is only {grid}x{grid}")
        lo = (grid - n) // 2
        rows = torch.arange(lo, lo + n)
        patches = (rows[:, None] * grid + rows[None, :]).flatten() + 1
        return torch.cat([torch.tensor([0]), patches])

    return select
