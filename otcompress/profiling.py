"""Cost of a model: parameters, FLOPs, latency (PyTorch and ONNX Runtime), size.

FLOPs are always counted on a copy of the model with *eager* attention: neither
fvcore nor `torch.utils.flop_counter.FlopCounterMode` sees the matmuls inside
`scaled_dot_product_attention` on CPU, so with SDPA (the transformers default)
the attention cost would silently be missing. Latency is measured with the
model as given (usually SDPA), because that is what users run.

Units: fvcore counts one multiply-add as one "flop"; we call that `macs` and
report `flops = 2 * macs` beside it. FlopCounterMode already counts FLOPs.

Text models are fed token ids (and the masks their family takes). Causal LMs
(LLaMA, Qwen2, GPT-2) run one forward pass over the whole prompt without a
KV cache (`use_cache=False`), as scoring, export and finetuning do: FLOPs and
latency are those of the prompt's logits, not of generation.
"""
from __future__ import annotations

import contextlib
import copy
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from otcompress.errors import InvalidOptionError, ModelLoadError
from otcompress.export import export_onnx
from otcompress.runtime import (
    TupleOutput,
    describe_inputs,
    example_inputs,
    family_of,
    forward_options,
    ort_feed,
    ort_session,
    quiet,
)

FLOP_COUNTERS = ("fvcore", "flopcounter")

# fvcore operator names that are matrix products; FlopCounterMode counts only
# these kinds of ops, so they are what the two counters must agree on.
GEMM_OPERATORS = ("linear", "matmul", "bmm", "addmm", "einsum", "conv")

# Files `from_pretrained` loads weights from.
WEIGHT_SUFFIXES = (".safetensors", ".bin")


# ---------------------------------------------------------------- inputs

def model_type_of(model: nn.Module) -> str:
    """The HF `model_type` of a supported family; anything else is a user error."""
    return family_of(model).MODEL_TYPE


# ---------------------------------------------------------------- parameters and size

def count_parameters(model: nn.Module) -> int:
    """Number of unique parameters; tied weights (shared storage) count once."""
    seen_storages = set()
    total = 0
    for parameter in model.parameters():  # already deduplicates shared Parameter objects
        key = (parameter.untyped_storage().data_ptr(), parameter.storage_offset(), tuple(parameter.shape))
        if parameter.device.type != "meta" and key in seen_storages:
            continue
        seen_storages.add(key)
        total += parameter.numel()
    return total


def size_on_disk(path) -> int:
    """Bytes of the weights files (*.safetensors, *.bin) in a model dir, or of one file."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    if not path.is_dir():
        raise ModelLoadError(f"no such file or directory: {path}")
    weight_files = [f for f in path.iterdir() if f.is_file() and f.name.endswith(WEIGHT_SUFFIXES)]
    if not weight_files:
        raise ModelLoadError(f"no weights files ({', '.join(WEIGHT_SUFFIXES)}) in {path}")
    return sum(f.stat().st_size for f in weight_files)


# ---------------------------------------------------------------- FLOPs

def eager_attention_copy(model: nn.Module) -> nn.Module:
    """A deep copy of `model` that computes attention with explicit matmuls."""
    eager = copy.deepcopy(model).eval()
    if hasattr(eager, "set_attn_implementation"):
        eager.set_attn_implementation("eager")
    else:
        eager.config._attn_implementation = "eager"
    if eager.config._attn_implementation != "eager":
        raise RuntimeError("could not switch the model to eager attention for FLOP counting")
    return eager


def _quiet_fvcore():
    """fvcore warns (via logging and warnings) about every op it cannot count,
    and TorchScript tracing warns about Python control flow: we report the
    skipped ops in the result instead."""
    return quiet("fvcore")


def _fvcore_count(eager_model: nn.Module, inputs: dict[str, torch.Tensor]) -> dict:
    from fvcore.nn import FlopCountAnalysis

    traced = TupleOutput(eager_model, list(inputs)).eval()
    with _quiet_fvcore(), torch.no_grad():
        analysis = FlopCountAnalysis(traced, tuple(inputs.values()))
        analysis.unsupported_ops_warnings(False)
        analysis.uncalled_modules_warnings(False)
        analysis.tracer_warnings("none")
        macs = int(analysis.total())
        by_operator = {name: int(count) for name, count in analysis.by_operator().items()}
        skipped_ops = {name: int(count) for name, count in analysis.unsupported_ops().items()}
    return {"macs": macs, "macs_by_operator": by_operator, "skipped_ops": skipped_ops}


def _flopcounter_count(eager_model: nn.Module, inputs: dict[str, torch.Tensor]) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        eager_model(**inputs, **forward_options(eager_model))
    return int(counter.get_total_flops())


def count_flops(model: nn.Module, inputs: dict[str, torch.Tensor], *, counter: str = "fvcore") -> dict:
    """FLOPs of one forward pass on `inputs`, counted with eager attention.

    Returns `macs` (multiply-adds, fvcore's unit) and `flops` (= 2 * macs),
    the ops fvcore skipped (elementwise ops, softmax, GELU...), and
    `flops_flopcounter` from `torch.utils.flop_counter` as a cross-check.
    `gemm_relative_diff` compares the two counters on the matrix products only,
    the one part both count (fvcore also counts LayerNorm, FlopCounterMode
    does not). If fvcore cannot trace the model, the figures come from
    FlopCounterMode and `counter` says so; `counter="flopcounter"` asks for
    that directly (fvcore traces with TorchScript, which is deprecated).
    """
    if counter not in FLOP_COUNTERS:
        raise InvalidOptionError(f"unknown FLOP counter {counter!r} (supported: {', '.join(FLOP_COUNTERS)})")
    eager_model = eager_attention_copy(model)
    flops_flopcounter = _flopcounter_count(eager_model, inputs)
    result = {
        "counter": "fvcore",
        "attention": "eager",
        "inputs": describe_inputs(inputs),
        "flops_flopcounter": flops_flopcounter,
    }
    if counter == "flopcounter":
        return _flopcounter_result(result, fvcore_error=None)
    try:
        fvcore_counts = _fvcore_count(eager_model, inputs)
    except Exception as error:  # fvcore traces with deprecated TorchScript: any failure falls back
        return _flopcounter_result(result, fvcore_error=f"{type(error).__name__}: {error}".splitlines()[0])
    gemm_macs = sum(fvcore_counts["macs_by_operator"].get(name, 0) for name in GEMM_OPERATORS)
    result.update(
        macs=fvcore_counts["macs"],
        flops=2 * fvcore_counts["macs"],
        macs_by_operator=fvcore_counts["macs_by_operator"],
        skipped_ops=fvcore_counts["skipped_ops"],
        gemm_flops=2 * gemm_macs,
        gemm_relative_diff=_relative_diff(2 * gemm_macs, flops_flopcounter),
    )
    return result


def _flopcounter_result(result: dict, *, fvcore_error: str | None) -> dict:
    """Figures from FlopCounterMode alone (it counts matrix products only)."""
    flops = result["flops_flopcounter"]
    result.update(counter="flopcounter", fvcore_error=fvcore_error, macs=flops // 2, flops=flops, skipped_ops=None)
    return result


def _relative_diff(a: float, b: float) -> float:
    return abs(a - b) / max(abs(a), abs(b), 1)


# ---------------------------------------------------------------- latency

def _latency_summary(times_s: list[float]) -> dict:
    times_ms = np.asarray(times_s) * 1e3
    return {
        "median_ms": float(statistics.median(times_ms)),
        "p90_ms": float(np.percentile(times_ms, 90)),
        "mean_ms": float(times_ms.mean()),
        "min_ms": float(times_ms.min()),
    }


def _check_repeats(repeats: int, warmup: int) -> None:
    if repeats < 1 or warmup < 0:
        raise InvalidOptionError(f"repeats must be >= 1 and warmup >= 0 (got {repeats}, {warmup})")


@contextlib.contextmanager
def torch_threads(threads: int | None):
    """Run with `threads` intra-op threads, restoring the previous setting."""
    previous = torch.get_num_threads()
    if threads is not None:
        if threads < 1:
            raise InvalidOptionError(f"threads must be >= 1 (got {threads})")
        torch.set_num_threads(threads)
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(previous)


def measure_latency(model: nn.Module, inputs: dict[str, torch.Tensor], *, repeats: int = 20,
                    warmup: int = 3, threads: int | None = None) -> dict:
    """PyTorch latency of one forward pass where the model lives: median and p90
    over `repeats` runs. The inputs are moved to the model's device first (not
    timed); on CUDA every run is bracketed by synchronisations, so the time is
    the kernels', not their launch."""
    _check_repeats(repeats, warmup)
    first_parameter = next(model.parameters())
    inputs = {k: v.to(first_parameter.device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
    sync = (lambda: torch.cuda.synchronize(first_parameter.device)) if first_parameter.is_cuda else (lambda: None)
    was_training = model.training
    model.eval()
    options = forward_options(model)
    times_s = []
    try:
        with torch_threads(threads) as used_threads, torch.inference_mode():
            for _ in range(warmup):
                model(**inputs, **options)
            for _ in range(repeats):
                sync()
                start = time.perf_counter()
                model(**inputs, **options)
                sync()
                times_s.append(time.perf_counter() - start)
    finally:
        model.train(was_training)
    return {
        "backend": "pytorch",
        **_latency_summary(times_s),
        "repeats": repeats,
        "warmup": warmup,
        "threads": used_threads,
        **describe_inputs(inputs),
        "dtype": str(first_parameter.dtype).removeprefix("torch."),
        "device": str(first_parameter.device),
        "attention": getattr(model.config, "_attn_implementation", None),
    }


def measure_onnx_latency(onnx_path, inputs: dict[str, torch.Tensor], *, repeats: int = 20,
                         warmup: int = 3, threads: int | None = None) -> dict:
    """onnxruntime CPU latency of one run: median and p90 over `repeats` runs."""
    _check_repeats(repeats, warmup)
    session = ort_session(onnx_path, threads)
    feed = ort_feed(session, inputs)
    for _ in range(warmup):
        session.run(None, feed)
    times_s = []
    for _ in range(repeats):
        start = time.perf_counter()
        session.run(None, feed)
        times_s.append(time.perf_counter() - start)
    return {
        "backend": "onnxruntime",
        **_latency_summary(times_s),
        "repeats": repeats,
        "warmup": warmup,
        "threads": threads,
        **describe_inputs(inputs),
        "dtype": session.get_outputs()[0].type,  # e.g. "tensor(float)"; int8 models still output float
        "device": "cpu",
        "onnx_path": str(onnx_path),
    }


# ---------------------------------------------------------------- everything

def profile_model(model: nn.Module, *, model_dir=None, batch_size: int = 1, seq_len: int = 128,
                  repeats: int = 20, warmup: int = 3, threads: int | None = 1, onnx: bool = True,
                  tmp_dir=None) -> dict:
    """Parameters, FLOPs, size on disk and latency (PyTorch, and ONNX Runtime
    unless `onnx=False`) of `model` on dummy inputs of the given shape.

    The ONNX model is exported (and parity-checked) into a temporary
    directory under `tmp_dir` that is removed afterwards.
    """
    model_type = model_type_of(model)
    inputs = example_inputs(model, batch_size=batch_size, seq_len=seq_len)
    report = {
        "model_type": model_type,
        "model_class": type(model).__name__,
        "inputs": describe_inputs(inputs),
        "parameters": count_parameters(model),
        "size_on_disk_bytes": size_on_disk(model_dir) if model_dir is not None else None,
        "flops": count_flops(model, inputs),
        "latency_pytorch": measure_latency(model, inputs, repeats=repeats, warmup=warmup, threads=threads),
        "latency_onnx": None,
    }
    if onnx:
        report["latency_onnx"], report["onnx_export"] = _onnx_profile(
            model, inputs, repeats=repeats, warmup=warmup, threads=threads, tmp_dir=tmp_dir)
    return report


def _onnx_profile(model, inputs, *, repeats, warmup, threads, tmp_dir):
    with tempfile.TemporaryDirectory(dir=tmp_dir, prefix="otcompress-profile-") as work_dir:
        onnx_path = Path(work_dir) / "model.onnx"
        export_report = export_onnx(model, onnx_path)
        latency = measure_onnx_latency(onnx_path, inputs, repeats=repeats, warmup=warmup, threads=threads)
    latency["onnx_path"] = None  # the temporary file is gone
    export_report = {key: value for key, value in export_report.items() if key != "path"}
    return latency, export_report
