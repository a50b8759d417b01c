"""What running a model for measurement or export needs, shared by
`profiling` and `export` (a leaf: it imports neither).

- `family_of`, `example_inputs`, `describe_inputs`: the model's architecture
  family and the deterministic dummy inputs it makes;
- `forward_options`, `TupleOutput`: how a measured or traced forward pass is
  called (causal LMs without a KV cache; positional tensors in, a tuple out);
- `ort_session`, `ort_feed`: an onnxruntime CPU session and its feed dict;
- `quiet`: silence one library's logger and warnings for a block.
"""
from __future__ import annotations

import contextlib
import logging
import warnings

import numpy as np
import torch
from torch import nn

from otcompress.architectures import FAMILIES, is_causal_lm
from otcompress.errors import InvalidOptionError


def family_of(model: nn.Module):
    """The architecture family (`otcompress.architectures`) of `model`; an
    unknown model type is a user error."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in FAMILIES:
        raise InvalidOptionError(
            f"unsupported model type {model_type!r} for profiling/export "
            f"(supported: {', '.join(FAMILIES)})"
        )
    return FAMILIES[model_type]


def example_inputs(model: nn.Module, batch_size: int = 1, seq_len: int = 128) -> dict[str, torch.Tensor]:
    """Deterministic dummy inputs shaped for `model`, as its family makes them
    (images, or token ids with the masks and types the model takes).

    For text `seq_len` is capped at the longest sequence the model's
    positions allow; image models ignore it.
    """
    if batch_size < 1 or seq_len < 1:
        raise InvalidOptionError(f"batch_size and seq_len must be >= 1 (got {batch_size}, {seq_len})")
    family = family_of(model)
    # A fixed generator: profiling and export checks must be reproducible.
    generator = torch.Generator().manual_seed(0)
    return family.example_inputs(model.config, batch_size, seq_len, generator)


def forward_options(model: nn.Module) -> dict:
    """Keyword options every measured forward pass of `model` gets: causal LMs
    build no KV cache (a DynamicCache output cannot be traced or exported, and
    a prompt pass does not need one)."""
    if is_causal_lm(model):
        return {"use_cache": False}
    return {}


def describe_inputs(inputs: dict[str, torch.Tensor]) -> dict:
    """Batch size and sequence length (or image size) of an input dict."""
    first = next(iter(inputs.values()))
    description = {"batch_size": int(first.shape[0])}
    if "input_ids" in inputs:
        description["seq_len"] = int(inputs["input_ids"].shape[1])
    if "pixel_values" in inputs:
        description["image_size"] = list(inputs["pixel_values"].shape[2:])
    return description


class TupleOutput(nn.Module):
    """Positional-argument, tuple-returning view of an HF model.

    Tracers (fvcore's TorchScript trace, the ONNX exporters) want positional
    tensors in and plain tensors out, not keyword dicts and ModelOutputs.
    """

    def __init__(self, model: nn.Module, input_names: list[str]):
        super().__init__()
        self.model = model
        self.input_names = list(input_names)
        self.options = forward_options(model)  # causal LMs: logits only, no KV cache

    def forward(self, *tensors):
        outputs = self.model(**dict(zip(self.input_names, tensors)), return_dict=True, **self.options)
        return outputs.to_tuple()


@contextlib.contextmanager
def quiet(logger_name: str):
    """Silence one library's logger and Python warnings for a block: the
    library reports in its results, it does not print."""
    logger = logging.getLogger(logger_name)
    previous_level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(previous_level)


def ort_session(onnx_path, threads: int | None = None):
    """A CPU onnxruntime session; `threads` = intra-op threads (None: ORT default)."""
    import onnxruntime as ort  # heavy, and only export and ONNX latency need it

    options = ort.SessionOptions()
    if threads is not None:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    options.log_severity_level = 3  # errors only: ORT's info/warning logs are not ours to print
    return ort.InferenceSession(str(onnx_path), sess_options=options, providers=["CPUExecutionProvider"])


def ort_feed(session, inputs: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """The numpy feed dict for the inputs `session` declares (others are dropped)."""
    names = [node.name for node in session.get_inputs()]
    missing = [name for name in names if name not in inputs]
    if missing:
        raise InvalidOptionError(f"ONNX model needs inputs {missing} that were not given")
    return {name: inputs[name].detach().cpu().numpy() for name in names}
