"""ONNX export with an ONNX Runtime parity gate, and int8 dynamic quantisation.

The export is only kept if a real onnxruntime session reproduces PyTorch on
inputs of a *different* batch size (and, for text, sequence length and padding)
than the export example: that proves the dynamic axes and catches constants
baked in by tracing. Everything is written into a temporary directory beside
the output and moved into place only once it has passed, so a failure never
leaves a half-written file.

Causal LMs (LLaMA, Qwen2, GPT-2) are exported as one forward pass over a
prompt: token ids and attention mask in, logits for every position out, with
dynamic batch and sequence axes and no KV cache (no past inputs or present
outputs), so the file scores or greedily extends a prompt by re-running it.

Exporter choice: the TorchScript exporter (`dynamo=False`) takes ~0.4 s on
the tiny test models against ~4 s for `dynamo=True`, and it exports HF ViT and
BERT correctly, so it goes first; if it raises or fails the parity check, the
dynamo exporter is tried. The report says which one produced the file.
"""
from __future__ import annotations

import contextlib
import logging
import math
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from otcompress.embedding import pool
from otcompress.errors import DataError, InvalidOptionError, ValidationGateError
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

QUANTIZE_MODES = ("int8",)
EXPORTERS = {"auto": ("torchscript", "dynamo"), "torchscript": ("torchscript",), "dynamo": ("dynamo",)}

# The export example: batch 2 because torch.export specialises a dimension of
# size 1 to a constant; a short sequence keeps export fast.
EXPORT_BATCH_SIZE = 2
EXPORT_SEQ_LEN = 16

# Leave headroom under protobuf's 2 GiB message limit for the graph itself.
PROTOBUF_LIMIT_BYTES = int(1.8 * 2**30)


# ---------------------------------------------------------------- inputs and outputs

def _check_input_names(model: nn.Module, inputs: dict[str, torch.Tensor]) -> None:
    """Given inputs must be (a subset of) the ones `example_inputs` makes,
    including the first (input_ids / pixel_values)."""
    known = list(example_inputs(model, batch_size=1, seq_len=1))
    unknown = [name for name in inputs if name not in known]
    if unknown or known[0] not in inputs:
        raise InvalidOptionError(f"export inputs must be among {known} and include {known[0]!r} (got {list(inputs)})")


def _with_batch_at_least_two(inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Repeat a batch of one so that the batch axis can stay dynamic."""
    if next(iter(inputs.values())).shape[0] >= 2:
        return inputs
    return {name: torch.cat([tensor, tensor]) for name, tensor in inputs.items()}


def parity_inputs(model: nn.Module, export_inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inputs that differ from the export example in batch size and, for text,
    in sequence length and padding, so that parity proves the dynamic axes."""
    shape = describe_inputs(export_inputs)
    batch_size = shape["batch_size"] + 1
    if "seq_len" not in shape:
        return example_inputs(model, batch_size=batch_size)  # images: the only input is pixel_values
    export_seq_len = shape["seq_len"]
    max_seq_len = family_of(model).max_seq_len(model.config)
    seq_len = export_seq_len - 3 if export_seq_len > 4 else min(export_seq_len + 3, max_seq_len)
    inputs = example_inputs(model, batch_size=batch_size, seq_len=seq_len)
    if seq_len > 2:
        inputs["attention_mask"][0, -2:] = 0  # a padded row: the mask must not be baked in
    # Same names in the same order as the export example (TupleOutput is positional).
    return {name: inputs[name] for name in export_inputs}


def _dynamic_axes(family, input_names, output_names, outputs) -> dict[str, dict[int, str]]:
    """The family's dynamic input axes (batch everywhere; for text the token
    axis too); outputs share the batch axis and, where the inputs have a
    sequence axis, outputs with one vector per token (last_hidden_state, MLM
    logits) share that too."""
    input_axes = dict(family.INPUT_AXES)
    axes = {name: dict(input_axes) for name in input_names}
    token_axis = {1: input_axes[1]} if input_axes.get(1) == "sequence" else {}
    for name, output in zip(output_names, outputs):
        axes[name] = {0: "batch", **(token_axis if output.dim() == 3 else {})}
    return axes


def _dynamic_shapes(model: nn.Module, family, input_names) -> tuple:
    """torch.export's spelling of the same dynamic input axes (one spec per
    element of TupleOutput's *tensors argument)."""
    dims = {"batch": torch.export.Dim("batch")}
    if "sequence" in family.INPUT_AXES.values():
        dims["sequence"] = torch.export.Dim("sequence", max=family.max_seq_len(model.config))
    return (tuple({axis: dims[name] for axis, name in family.INPUT_AXES.items()} for _ in input_names),)


# ---------------------------------------------------------------- exporters

def _quiet_exporters():
    """Both exporters warn at length (TorchScript deprecation, tracer warnings,
    missing torchvision ops); the library reports, it does not print."""
    return quiet("torch.onnx")


def _run_exporter(exporter: str, wrapper: nn.Module, model: nn.Module, family,
                  inputs: dict[str, torch.Tensor], output_names, outputs, path: Path, opset) -> None:
    input_names = list(inputs)
    common = dict(input_names=input_names, output_names=list(output_names), opset_version=opset)
    with _quiet_exporters(), torch.no_grad():
        if exporter == "torchscript":
            torch.onnx.export(wrapper, tuple(inputs.values()), str(path), dynamo=False,
                              dynamic_axes=_dynamic_axes(family, input_names, output_names, outputs),
                              do_constant_folding=True, **common)
        else:
            # torch 2.13 writes weights to a `.data` sidecar by default; one
            # self-contained file is simpler to ship, and protobuf allows it below 2 GiB.
            torch.onnx.export(wrapper, tuple(inputs.values()), str(path), dynamo=True, verbose=False,
                              dynamic_shapes=_dynamic_shapes(model, family, input_names),
                              external_data=_parameter_bytes(model) >= PROTOBUF_LIMIT_BYTES, **common)


def _parameter_bytes(model: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def _opset_of(path: Path) -> int | None:
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    return next((entry.version for entry in proto.opset_import if entry.domain in ("", "ai.onnx")), None)


def _max_abs_diff(expected: list[np.ndarray], actual: list[np.ndarray]) -> float:
    """Largest elementwise |expected - actual| over all outputs (inf on a shape
    mismatch); NaN when either side has a NaN, so that no `<= atol` gate passes
    it (comparisons with NaN are false, and max() would skip it)."""
    worst = 0.0
    for want, got in zip(expected, actual, strict=True):
        if want.shape != got.shape:
            return float("inf")
        diff = np.abs(want.astype(np.float64) - got.astype(np.float64))
        if np.isnan(diff).any():
            return float("nan")
        worst = max(worst, float(np.max(diff, initial=0.0)))
    return worst


def _torch_outputs(wrapper: nn.Module, inputs: dict[str, torch.Tensor]) -> list[np.ndarray]:
    with torch.inference_mode():
        # .cpu(): the model may live on an accelerator; numpy needs host memory.
        outputs = wrapper(*_on_device(inputs, wrapper).values())
        return [output.detach().float().cpu().numpy() for output in outputs]


def _on_device(inputs: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """`inputs` moved to where `model`'s parameters are (example inputs are made on the CPU)."""
    device = next(model.parameters()).device
    return {name: tensor.to(device) for name, tensor in inputs.items()}


# ---------------------------------------------------------------- public API

def onnx_predict(onnx_path, inputs, *, threads: int | None = None) -> np.ndarray:
    """First output (logits / last_hidden_state) of an ONNX model on `inputs`
    (a dict of tensors or numpy arrays, as from `example_inputs` or a tokenizer)."""
    session = ort_session(onnx_path, threads)
    tensors = {name: torch.as_tensor(value) for name, value in inputs.items()}
    return session.run(None, ort_feed(session, tensors))[0]


def int8_agreement(fp32_path, int8_path, task) -> dict:
    """How the int8 copy compares with the fp32 file on `task`'s eval split
    (a `TaskData`): accuracy of both and the delta where there are labels;
    for a headless model (no labels to score) the cosine similarity of each
    example's pooled int8 embedding to its fp32 one (mean and minimum)."""
    if task.task == "feature-extraction":
        return _embedding_cosines(fp32_path, int8_path, task)
    hits, n = {"fp32": 0, "int8": 0}, 0
    causal = task.task == "causal-lm"
    for batch in task.batches("eval", 256):
        labels = batch.pop("labels")
        if causal:  # the logits at t predict the token at t + 1
            labels = labels[:, 1:]
        keep = labels != -100
        for name, path in (("fp32", fp32_path), ("int8", int8_path)):
            pred = torch.from_numpy(onnx_predict(path, batch).argmax(-1))
            hits[name] += int(((pred[:, :-1] if causal else pred) == labels)[keep].sum())
        n += int(keep.sum())
    acc = {k: v / max(n, 1) for k, v in hits.items()}
    return {**acc, "delta": acc["int8"] - acc["fp32"], "examples": n}


def _embedding_cosines(fp32_path, int8_path, task) -> dict:
    cosines = []
    for batch in task.batches("eval", 256):
        mask = batch.get("attention_mask")
        fp32, int8 = (pool(torch.from_numpy(onnx_predict(p, batch)).float(), mask, task.pooling)
                      for p in (fp32_path, int8_path))
        cosines.append(torch.nn.functional.cosine_similarity(fp32, int8, dim=-1))
    cos = torch.cat(cosines)
    return {"embedding_cosine": float(cos.mean()), "embedding_cosine_min": float(cos.min()),
            "pooling": task.pooling, "examples": len(cos)}


def export_onnx(model: nn.Module, out_path, *, inputs: dict[str, torch.Tensor] | None = None,
                atol: float = 1e-4, quantize: str | None = None, opset: int | None = None,
                check: bool = True, exporter: str = "auto", quantized_path=None, int8_data=None) -> dict:
    """Export `model` to ONNX at `out_path` with a dynamic batch axis (and
    sequence axis for text models), check it against PyTorch in onnxruntime, and
    optionally write an int8 dynamically-quantised copy, compared with the fp32
    file on `int8_data` (a `TaskData`: `int8_agreement`) before either is kept.

    Raises ValidationGateError if the ONNX outputs differ from PyTorch by more
    than `atol` or are NaN, InvalidOptionError on bad options; nothing is
    written then. Files carry MARK in their metadata (`--force` replaces only
    those). Returns a report dict (paths, exporter, opset, names, axes,
    max_abs_diff, sizes, timings, and `quantized` when asked for).
    """
    if quantize not in (None, *QUANTIZE_MODES):
        raise InvalidOptionError(f"unknown quantize mode {quantize!r} (supported: {', '.join(QUANTIZE_MODES)})")
    if exporter not in EXPORTERS:
        raise InvalidOptionError(f"unknown exporter {exporter!r} (supported: {', '.join(EXPORTERS)})")
    if atol < 0:
        raise InvalidOptionError(f"atol must be >= 0 (got {atol})")
    family = family_of(model)
    out_path = Path(out_path)
    quantized_path = Path(quantized_path) if quantized_path else int8_path(out_path)
    if quantize and quantized_path.resolve() == out_path.resolve():
        raise InvalidOptionError(f"the int8 model cannot overwrite the fp32 model at {out_path}")
    if int8_data is not None:
        check_int8_data(int8_data, quantize)
    with _in_float32(model) as half:
        report = _export(model, out_path, inputs=inputs, atol=atol, quantize=quantize, opset=opset, check=check,
                         exporter=exporter, quantized_path=quantized_path, int8_data=int8_data, family=family)
    if half:
        report["exported_as"] = {"dtype": "float32", "model_dtype": half}
    return report


def _export(model, out_path, *, inputs, atol, quantize, opset, check, exporter, quantized_path, int8_data,
            family) -> dict:
    """`export_onnx` once its options are checked."""
    was_training = model.training
    model.eval()
    try:
        if inputs is None:
            inputs = example_inputs(model, EXPORT_BATCH_SIZE, EXPORT_SEQ_LEN)
        _check_input_names(model, inputs)
        export_inputs = _on_device(_with_batch_at_least_two(inputs), model)
        check_inputs = parity_inputs(model, export_inputs)
        # eval(): the TorchScript exporter restores the *wrapper's* training flag
        # recursively afterwards, which would switch dropout on in the model.
        wrapper = TupleOutput(model, list(export_inputs)).eval()
        with torch.inference_mode():
            example_outputs = model(**export_inputs, return_dict=True, **forward_options(model))
        output_names = list(example_outputs.keys())
        report = {
            "path": str(out_path),
            "model_type": family.MODEL_TYPE,
            "input_names": list(export_inputs),
            "output_names": output_names,
            "dynamic_axes": _dynamic_axes(family, list(export_inputs), output_names, example_outputs.to_tuple()),
            "export_inputs": describe_inputs(export_inputs),
            "check_inputs": describe_inputs(check_inputs) if check else None,
            "atol": atol,
        }
        out_path.parent.mkdir(parents=True, exist_ok=True)
        work_dir = Path(tempfile.mkdtemp(dir=out_path.parent, prefix=".otcompress-export-"))
        try:
            staged = work_dir / out_path.name
            report.update(_export_with_gate(
                wrapper, model, family, export_inputs, check_inputs, output_names,
                example_outputs.to_tuple(), staged, opset=opset, atol=atol, check=check, exporter=exporter))
            _mark(staged)
            moves = {}
            if quantize:
                staged_int8 = work_dir.parent / f"{work_dir.name}-{quantized_path.name}"  # beside, not inside
                moves[staged_int8] = quantized_path
                report["quantized"] = _quantize_int8(staged, staged_int8, check_inputs)
                _mark(staged_int8)
                if int8_data is not None:  # judged before either file is in place
                    agreement = int8_agreement(staged, staged_int8, int8_data)
                    kind = "embedding" if int8_data.task == "feature-extraction" else "accuracy"
                    report["quantized"][kind] = agreement
            moves.update({f: out_path.parent / f.name for f in sorted(work_dir.iterdir())})
            report["files"] = [str(d) for d in moves.values() if d != quantized_path]
            _move_all(moves)
        finally:
            shutil.rmtree(work_dir, ignore_errors=True)
            for staged_int8 in work_dir.parent.glob(f"{work_dir.name}-*"):
                staged_int8.unlink()
    finally:
        model.train(was_training)
    # With external data the weights live in sidecars: count them too.
    report["size_bytes"] = sum(Path(f).stat().st_size for f in report["files"])
    if quantize:
        report["quantized"]["path"] = str(quantized_path)
        report["quantized"]["size_ratio"] = report["quantized"]["size_bytes"] / report["size_bytes"]
    return report


HALF = (torch.bfloat16, torch.float16)


@contextlib.contextmanager
def _in_float32(model: nn.Module):
    """A half-precision model (bfloat16 or float16 weights, as many LLaMA and
    Qwen2 checkpoints ship and as folding them writes) is exported in float32:
    ONNX Runtime's CPU kernels lack most bfloat16 operators ("NotImplemented:
    Mul(14)"), and float16 misses a 1e-4 parity gate (8e-3 on a tiny LLaMA).
    Cast in place and back (exact: both are subsets of float32); yields the
    half dtype's name, or None when nothing was cast."""
    tensors = [t for t in (*model.parameters(), *model.buffers()) if t.dtype in HALF]
    if not tensors:
        yield None
        return
    dtypes = [t.dtype for t in tensors]
    name = str(max(set(dtypes), key=dtypes.count)).removeprefix("torch.")
    for t in tensors:
        t.data = t.data.float()
    try:
        yield name
    finally:
        for t, dtype in zip(tensors, dtypes):
            t.data = t.data.to(dtype)


def _export_with_gate(wrapper, model, family, export_inputs, check_inputs, output_names, example_outputs,
                      staged: Path, *, opset, atol, check, exporter) -> dict:
    """Try the exporters in order until one writes a file that passes parity."""
    expected = _torch_outputs(wrapper, check_inputs) if check else None
    attempts = []
    for name in EXPORTERS[exporter]:
        attempt = {"exporter": name}
        attempts.append(attempt)
        for leftover in staged.parent.iterdir():  # a previous attempt's file or sidecar
            leftover.unlink()
        start = time.perf_counter()
        try:
            _run_exporter(name, wrapper, model, family, export_inputs, output_names, example_outputs,
                          staged, opset)
        except Exception as error:  # an exporter's failure is a reason to try the next one
            attempt["error"] = f"{type(error).__name__}: {error}".splitlines()[0][:300]
            continue
        finally:
            attempt["export_s"] = round(time.perf_counter() - start, 3)
        if not check:
            return {"exporter": name, "exporter_attempts": attempts, "opset": _opset_of(staged),
                    "max_abs_diff": None}
        session = ort_session(staged)
        attempt["max_abs_diff"] = _max_abs_diff(expected, session.run(None, ort_feed(session, check_inputs)))
        if attempt["max_abs_diff"] <= atol:
            return {"exporter": name, "exporter_attempts": attempts, "opset": _opset_of(staged),
                    "max_abs_diff": attempt["max_abs_diff"]}
    _raise_export_failure(attempts, atol, check_inputs)


def _raise_export_failure(attempts: list[dict], atol: float, check_inputs) -> None:
    checked = [a for a in attempts if "max_abs_diff" in a]
    if not checked:  # every exporter crashed: a bug or an unsupported model, not a gate
        summary = "; ".join(f"{a['exporter']}: {a['error']}" for a in attempts)
        raise RuntimeError(f"ONNX export failed with every exporter ({summary})")
    best = min(checked, key=lambda a: _nan_last(a["max_abs_diff"]))
    shape = ", ".join(f"{key} {value}" for key, value in describe_inputs(check_inputs).items())
    tried = ", ".join(a["exporter"] for a in attempts)
    diff = "NaN outputs" if math.isnan(best["max_abs_diff"]) else \
        f"max |onnxruntime - pytorch| = {best['max_abs_diff']:.3g} > atol {atol:g}"
    raise ValidationGateError(f"ONNX parity check failed: {diff} ({shape}; exporters tried: {tried}); "
                              "no file written")


def _nan_last(x: float) -> float:
    return math.inf if math.isnan(x) else x


class _DropQuantizationAdvice(logging.Filter):
    """onnxruntime.quantization logs advice on the *root* logger; drop just that."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "pre-processing before quantization" not in record.getMessage()


def _quantize_int8(fp32_path: Path, int8_path: Path, check_inputs) -> dict:
    """Dynamic int8 quantisation of the weights of MatMul/Gemm nodes; reports
    the size and the max abs output difference against the fp32 model."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    advice_filter = _DropQuantizationAdvice()
    root_logger = logging.getLogger()
    root_logger.addFilter(advice_filter)
    start = time.perf_counter()
    try:
        quantize_dynamic(str(fp32_path), str(int8_path), weight_type=QuantType.QInt8)
    finally:
        root_logger.removeFilter(advice_filter)
    quantize_s = time.perf_counter() - start
    fp32_session, int8_session = ort_session(fp32_path), ort_session(int8_path)
    fp32_outputs = fp32_session.run(None, ort_feed(fp32_session, check_inputs))
    int8_outputs = int8_session.run(None, ort_feed(int8_session, check_inputs))
    return {
        "mode": "int8",
        "weight_type": "QInt8",
        "size_bytes": int8_path.stat().st_size,
        "max_abs_diff_vs_fp32": _max_abs_diff(fp32_outputs, int8_outputs),
        "quantize_s": round(quantize_s, 3),
    }


def _move_all(moves: dict) -> None:
    """Move every checked file into place ({staged: destination}: the model,
    any sidecar under the name the model references it by, the int8 copy);
    if one move fails, the ones already made are undone."""
    done = []
    try:
        for staged, destination in moves.items():
            destination.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(str(staged), str(destination))
            done.append(destination)
    except BaseException:
        for destination in done:
            destination.unlink(missing_ok=True)
        raise


# ---------------------------------------------------------------- what export wrote

NEEDS_QUANTIZE = "--data measures the int8 copy: give --quantize int8 too"
MARK = "otcompress"  # an ONNX metadata key: this file was written (and checked) by otcompress


def int8_path(out_path) -> Path:
    """Where the int8 copy of `out_path` goes: m.onnx -> m.int8.onnx."""
    out_path = Path(out_path)
    return out_path.with_name(f"{out_path.stem}.int8.onnx")


def _mark(path: Path) -> None:
    import onnx
    from importlib.metadata import version

    proto = onnx.load(str(path), load_external_data=False)  # weights in a sidecar stay where they are
    onnx.helper.set_model_props(proto, {**{p.key: p.value for p in proto.metadata_props},
                                        MARK: version("otcompress")})
    onnx.save(proto, str(path))


def marked(path) -> bool:
    """Whether the file at `path` is an ONNX model that otcompress wrote."""
    import onnx
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception:  # noqa: BLE001 - not ONNX at all: not ours
        return False
    return any(p.key == MARK for p in proto.metadata_props)


def check_int8_data(task, quantize) -> None:
    """Before any export: --data measures the int8 copy, so it needs one, and
    a labelled task needs labels (a headless model compares embeddings)."""
    if not quantize:
        raise InvalidOptionError(NEEDS_QUANTIZE)
    if task.task != "feature-extraction" and not task.has_labels:
        raise DataError(f"data spec '{task.spec}' has no labels, needed to compare int8 with fp32 "
                        f"{task.task}")
