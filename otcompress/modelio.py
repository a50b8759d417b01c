"""Loading models safely: configs first (validate before touching weights),
safetensors or `torch.load(weights_only=True)`, never plain unpickling, and
no remote code unless the user asks for it."""
from __future__ import annotations

import os
from pathlib import Path

from otcompress.errors import IncompatibleModelsError, ModelLoadError

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")


def load_config(source, *, trust_remote_code: bool = False):
    """A model's config from a local directory (or the model object's own)."""
    if not isinstance(source, (str, os.PathLike)):
        return source.config
    from transformers import AutoConfig
    path = _local_dir(source)
    try:
        return AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except Exception as e:  # noqa: BLE001 - any failure here is a bad model dir
        raise ModelLoadError(f"{source}: cannot read config.json ({_first_line(e)})") from None


def load_model(source, *, trust_remote_code: bool = False, device="cpu"):
    """A model object as is, or a model loaded from a local directory with the
    class its config names."""
    if not isinstance(source, (str, os.PathLike)):
        return source
    import transformers
    config = load_config(source, trust_remote_code=trust_remote_code)
    path = _local_dir(source)
    if not any((path / f).exists() for f in WEIGHT_FILES):
        raise ModelLoadError(f"{source}: no weights file (model.safetensors or pytorch_model.bin)")
    arch = (getattr(config, "architectures", None) or [None])[0]
    cls = getattr(transformers, arch, None) if arch else None
    if cls is None:
        cls = transformers.AutoModel
    try:
        model = cls.from_pretrained(path, trust_remote_code=trust_remote_code,
                                    local_files_only=True)
    except Exception as e:  # noqa: BLE001 - corrupt/truncated weights surface here
        raise ModelLoadError(f"{source}: cannot load weights ({_first_line(e)})") from None
    return model.to(device).eval()


def _local_dir(source) -> Path:
    path = Path(source).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"{source}: not a model directory (no config.json)")
        return path
    if path.exists():
        raise ModelLoadError(f"{source}: not a directory")
    if _looks_like_hub_name(str(source)):
        raise ModelLoadError(
            f"{source}: not a local directory, and hub models cannot be downloaded offline; "
            "download it first and pass its directory")
    raise ModelLoadError(f"{source}: no such model directory")


def _looks_like_hub_name(s: str) -> bool:
    parts = s.split("/")
    return len(parts) <= 2 and all(p and not p.startswith(".") for p in parts) and not s.startswith("~")


def _first_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return text[0][:200] if text else type(e).__name__


def check_compatible(anchor_cfg, parent_cfgs, must_match, *, roles=("anchor", "parent")) -> None:
    """Fail fast, before weights are read, on anything fusion cannot bridge.
    `roles` names the two sides in the messages (e.g. ("student", "teacher"))."""
    me, them = roles
    for k, cfg in enumerate(parent_cfgs, 1):
        if cfg.model_type != anchor_cfg.model_type:
            raise IncompatibleModelsError(
                f"model-type mismatch: {me} is {anchor_cfg.model_type}, {them} {k} is {cfg.model_type}")
        for key in must_match:
            a, b = getattr(anchor_cfg, key, None), getattr(cfg, key, None)
            if a != b:
                what = {"num_hidden_layers": "depth", "vocab_size": "vocabulary",
                        "image_size": "image-size"}.get(key, key)
                raise IncompatibleModelsError(
                    f"{what} mismatch: {me} has {key}={a}, {them} {k} has {key}={b}")
        _check_labels(anchor_cfg, cfg, k, roles)


def _check_labels(anchor_cfg, cfg, k, roles=("anchor", "parent")):
    a = getattr(anchor_cfg, "num_labels", None)
    b = getattr(cfg, "num_labels", None)
    arch_a = _arch(anchor_cfg)
    if arch_a and "Classification" in arch_a and a != b:
        raise IncompatibleModelsError(f"label mismatch: {roles[0]} has {a} labels, {roles[1]} {k} has {b}")


# Teachers only need the student's inputs and outputs: depth, patching, widths
# and activations are the teacher's own business (a deeper teacher is the usual case).
TEACHER_FREE = ("num_hidden_layers", "patch_size", "hidden_size", "num_attention_heads",
                "intermediate_size", "hidden_act", "layer_norm_eps", "qkv_bias", "tie_word_embeddings")


def check_teachers(student_cfg, teacher_cfgs) -> None:
    """Fail fast, from configs alone, on teachers `finetune` cannot distil from:
    another model type; any of the family's MUST_MATCH values that fix the
    inputs (image size and channels, vocabulary, positions, token types), the
    teacher's internals (TEACHER_FREE: depth, patch size, widths) excepted; no
    task head, or another head than the student's; another output space
    (num_labels, or vocab_size for masked LM)."""
    from otcompress.architectures import family
    from otcompress.errors import UnsupportedArchitectureError

    try:
        must_match = family(student_cfg).MUST_MATCH
    except UnsupportedArchitectureError:
        must_match = ("image_size", "num_channels", "vocab_size")  # an unknown family: inputs at least
    must_match = tuple(k for k in must_match if k not in TEACHER_FREE)
    # Family, input-fixing values and (classifiers) labels first, as `fuse` checks parents.
    check_compatible(student_cfg, teacher_cfgs, must_match, roles=("student", "teacher"))
    student_head = _head(student_cfg)
    for k, cfg in enumerate(teacher_cfgs, 1):
        head = _head(cfg)
        if head is None:
            raise IncompatibleModelsError(
                f"teacher {k} ({_arch(cfg) or cfg.model_type}) has no task head to distil from")
        if student_head is not None and head != student_head:
            raise IncompatibleModelsError(
                f"head mismatch: student is {_arch(student_cfg)}, teacher {k} is {_arch(cfg)}")
        if head == "ForMaskedLM" and cfg.vocab_size != student_cfg.vocab_size:
            raise IncompatibleModelsError(
                f"vocabulary mismatch: student has vocab_size={student_cfg.vocab_size}, "
                f"teacher {k} has vocab_size={cfg.vocab_size}")
        if head.endswith("Classification") and cfg.num_labels != student_cfg.num_labels:
            raise IncompatibleModelsError(
                f"label mismatch: student has {student_cfg.num_labels} labels, "
                f"teacher {k} has {cfg.num_labels}")


def _arch(cfg):
    return (getattr(cfg, "architectures", None) or [None])[0]


def _head(cfg):
    """The task-head part of a config's class name ("ForMaskedLM"), None when
    headless ("BertModel") or unrecorded."""
    arch = _arch(cfg)
    if not arch or "For" not in arch:
        return None
    return arch[arch.index("For"):]


def describe(source) -> str:
    if isinstance(source, (str, os.PathLike)):
        return str(source)
    name = getattr(source.config, "_name_or_path", "") or ""
    return name or type(source).__name__
