"""Loading models safely: configs first (validate before touching weights),
safetensors or `torch.load(weights_only=True)`, never plain unpickling, and
no remote code unless the user asks for it."""
from __future__ import annotations

import json
import math
import numbers
import os
import warnings
from collections.abc import Mapping
from pathlib import Path

from otcompress.errors import IncompatibleModelsError, InvalidOptionError, ModelLoadError

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


def checked_device(device):
    """`device` if this machine has it (None passes: where the models are),
    else the one-line error: torch's own is an AssertionError or RuntimeError
    deep in a model's `.to`."""
    import torch
    if device is None:
        return None
    try:
        kind = torch.device(device).type
    except (RuntimeError, TypeError, ValueError):
        raise InvalidOptionError(f"device {device!r} is not a torch device (cpu, cuda, cuda:1, mps, ...)") from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise InvalidOptionError(f"device {device}: no CUDA device available")
    return device


def load_model(source, *, trust_remote_code: bool = False, device="cpu", config=None):
    """A model object as is, or a model loaded from a local directory with the
    class its config names (`config`: that config, already read). Either must
    be complete and finite (`check_complete`, `check_finite`)."""
    if not isinstance(source, (str, os.PathLike)):
        check_finite(describe(source), source.state_dict())
        return source
    import transformers
    config = config or load_config(source, trust_remote_code=trust_remote_code)
    path = _local_dir(source)
    if not any((path / f).exists() for f in WEIGHT_FILES):
        raise ModelLoadError(f"{source}: no weights file (model.safetensors or pytorch_model.bin)")
    cls = _recorded_class(config) or transformers.AutoModel
    try:
        model, info = cls.from_pretrained(path, trust_remote_code=trust_remote_code,
                                          local_files_only=True, output_loading_info=True)
    except Exception as e:  # noqa: BLE001 - corrupt/truncated weights surface here
        raise ModelLoadError(f"{source}: {_wrong_shape(path, cls, config) or 'cannot load weights'} "
                             f"({_first_line(e)})") from None
    check_complete(source, cls.__name__, info)
    check_finite(source, model.state_dict())
    return model.to(device).eval()


def _recorded_class(config):
    """The transformers class a config records (`architectures`), None if none
    or one transformers does not name (remote code)."""
    import transformers
    arch = (getattr(config, "architectures", None) or [None])[0]
    return getattr(transformers, arch, None) if arch else None


def model_class(source, config=None, *, trust_remote_code: bool = False):
    """The class `load_model` gives `source` (`config`: its config, already
    read): a model object's own; for a directory the class its config
    records, else the one transformers' AutoModel picks for its model type;
    None where only loading can tell (remote code)."""
    if isinstance(source, LazyModel):
        return source.model_class
    if not isinstance(source, (str, os.PathLike)):
        return type(source)
    config = config or load_config(source, trust_remote_code=trust_remote_code)
    cls = _recorded_class(config)
    if cls is not None or (trust_remote_code and getattr(config, "auto_map", None)):
        return cls
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_MAPPING_NAMES
    name = MODEL_MAPPING_NAMES.get(getattr(config, "model_type", None))
    return getattr(transformers, name, None) if isinstance(name, str) else None


def check_complete(source, class_name, info) -> None:
    """Refuse a checkpoint that lacks a tensor its class has (transformers would
    initialise it at random, so every run differs) or stores tensors the class
    does not take. transformers already leaves out tied weights stored once
    and buffers it does not save or ignores (position_ids)."""
    for what, keys in (("is missing", info.get("missing_keys")), ("has unexpected", info.get("unexpected_keys"))):
        if keys:
            raise ModelLoadError(f"{source}: checkpoint {what} tensor(s) {_names(keys)} for {class_name}; "
                                 "give a complete checkpoint of the class its config names")


def check_finite(source, tensors) -> None:
    """Refuse NaN or infinite values in any floating tensor of `tensors` (a
    state dict, or a LazyStateDict read one tensor at a time), naming it."""
    import torch
    for name in tensors:
        t = tensors[name]
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            nan = int(torch.isnan(t).sum())
            raise ModelLoadError(f"{source}: tensor {name} is not finite ({nan} NaN, "
                                 f"{int((~torch.isfinite(t)).sum()) - nan} infinite of {t.numel()} values)")


_FINITE_FILES = set()  # weight files (path, size, mtime) whose every tensor `check_streamed` found finite


def check_streamed(source, model) -> None:
    """`check_finite` of a streamed parent (a `LazyModel`), reading every
    tensor once per unchanged set of files: the workflow checks its parents
    before any work, and the fusion it calls checks what it streams again."""
    sd = model.state_dict()
    files = tuple(sorted((str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in set(sd.files())))
    if files in _FINITE_FILES:
        return
    check_finite(source, sd)
    _FINITE_FILES.add(files)


def _names(keys, shown=3) -> str:
    keys = sorted(keys)
    more = f" and {len(keys) - shown} more" if len(keys) > shown else ""
    return ", ".join(keys[:shown]) + more


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
        check_labels(anchor_cfg, cfg, k, roles)


def check_labels(anchor_cfg, cfg, k, roles=("anchor", "parent"), head=None):
    """A classifier's label count must match. `head`: the model class's name
    where it is known from elsewhere than the config (a model built in memory
    records none)."""
    from otcompress.architectures import head_of  # imports torch: this module does not

    a = getattr(anchor_cfg, "num_labels", None)
    b = getattr(cfg, "num_labels", None)
    if "Classification" in (head or head_of(anchor_cfg) or "") and a != b:
        raise IncompatibleModelsError(f"label mismatch: {roles[0]} has {a} labels, {roles[1]} {k} has {b}")


def check_teachers(student_cfg, teacher_cfgs) -> None:
    """Fail fast, from configs alone, on teachers `finetune` cannot distil from:
    another model type; any of the family's TEACHER_MUST_MATCH values (those
    that fix the inputs and outputs: image size and channels, vocabulary,
    positions, token types; depth, patch size and widths are the teacher's
    own); no task head, or another head than the student's; another output
    space (num_labels, or vocab_size for masked LM). A headless student learns
    the teachers' embedding similarities, which any head class of the family has."""
    from otcompress.architectures import head_of, recorded_class, teacher_must_match  # imports torch

    # Family, input-fixing values and (classifiers) labels first, as `fuse` checks parents.
    check_compatible(student_cfg, teacher_cfgs, teacher_must_match(student_cfg), roles=("student", "teacher"))
    student_head = head_of(student_cfg)
    if student_head is None and recorded_class(student_cfg):
        return  # a headless student distils embeddings: any teacher's encoder gives them
    for k, cfg in enumerate(teacher_cfgs, 1):
        head = head_of(cfg)
        if head is None:
            raise IncompatibleModelsError(
                f"teacher {k} ({recorded_class(cfg) or cfg.model_type}) has no task head to distil from")
        if student_head is not None and head != student_head:
            raise IncompatibleModelsError(
                f"head mismatch: student is {recorded_class(student_cfg)}, "
                f"teacher {k} is {recorded_class(cfg)}")
        if head == "ForMaskedLM" and cfg.vocab_size != student_cfg.vocab_size:
            raise IncompatibleModelsError(
                f"vocabulary mismatch: student has vocab_size={student_cfg.vocab_size}, "
                f"teacher {k} has vocab_size={cfg.vocab_size}")
        if head.endswith("Classification") and cfg.num_labels != student_cfg.num_labels:
            raise IncompatibleModelsError(
                f"label mismatch: student has {student_cfg.num_labels} labels, "
                f"teacher {k} has {cfg.num_labels}")


def describe(source) -> str:
    if isinstance(source, (str, os.PathLike)):
        return str(source)
    name = getattr(source.config, "_name_or_path", "") or ""
    return name or type(source).__name__


# ----------------------------------------------------------------------------- streaming

_SAFETENSORS_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
                       "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8",
                       "BOOL": "bool", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}


class LazyStateDict(Mapping):
    """The tensors of a local model directory's safetensors weights (one
    `model.safetensors`, or shards listed in `model.safetensors.index.json`)
    as a read-only mapping that reads nothing until asked: names, shapes and
    dtypes come from the file headers; `sd[name]` reads that one tensor.

    Each read opens its file and closes it again, so the process holds only
    the tensors its caller keeps: safetensors maps the file, and a handle kept
    open would leave every page it ever read resident (a whole parent's worth
    of RSS by the end of a fusion).

    keys: the names to expose (default: every stored tensor), in this order.
    aliases: {name: stored name} for tensors stored under another name (tied
        parameters, which `save_pretrained` writes once; names a checkpoint
        format renames)."""

    def __init__(self, path, *, keys=None, aliases=None):
        from safetensors import safe_open
        self.path = Path(path)
        index = self.path / "model.safetensors.index.json"
        if (self.path / "model.safetensors").is_file():  # first, as `from_pretrained` takes it over an index
            shards = ["model.safetensors"]
        elif index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (OSError, ValueError, KeyError) as e:
                raise ModelLoadError(f"{path}: unreadable {index.name} ({_first_line(e)})") from None
            shards = sorted(set(weight_map.values()))
        else:
            raise ModelLoadError(f"{path}: no safetensors weights (model.safetensors or its index)")
        self._file, self._meta = {}, {}
        for shard in shards:
            try:
                with safe_open(self.path / shard, framework="pt") as f:
                    for name in f.keys():
                        view = f.get_slice(name)
                        self._file[name] = self.path / shard
                        self._meta[name] = (tuple(view.get_shape()), view.get_dtype())
            except Exception as e:  # noqa: BLE001 - a missing or corrupt shard
                raise ModelLoadError(f"{path}: cannot read {shard} ({_first_line(e)})") from None
        self._aliases = {}
        for name, stored in (aliases or {}).items():
            if stored not in self._file:
                raise KeyError(f"alias {name} -> {stored}: {stored} is not stored in {path}")
            if name != stored:
                self._aliases[name] = stored
        names = list(keys) if keys is not None else list(self._file)
        unknown = [k for k in names if self._stored(k) is None]
        if unknown:
            raise KeyError(f"{path} stores no tensor {unknown[0]}"
                           + (f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else ""))
        self._keys = names
        self._key_set = set(names)
        self.reads = 0  # tensors read so far (for tests and benchmarks)

    def files(self) -> list:
        """The weight files the tensors are read from."""
        return list(self._file.values())

    def renamed(self, names: dict) -> "LazyStateDict":
        """The same files under other names: {new name: current name}."""
        view = object.__new__(LazyStateDict)
        view.path, view._file, view._meta = self.path, self._file, self._meta
        view._aliases = {new: self._stored(old) for new, old in names.items() if new != self._stored(old)}
        view._keys, view._key_set, view.reads = list(names), set(names), 0
        return view

    def _stored(self, name):
        name = self._aliases.get(name, name)
        return name if name in self._file else None

    def __getitem__(self, name):
        if name not in self._key_set:
            raise KeyError(name)
        from safetensors import safe_open
        stored = self._stored(name)
        with safe_open(self._file[stored], framework="pt") as f:
            tensor = f.get_tensor(stored)
        self.reads += 1
        return tensor

    def __iter__(self):
        return iter(self._keys)

    def __len__(self):
        return len(self._keys)

    def __contains__(self, name):
        return name in self._key_set

    def shape(self, name) -> tuple:
        """The tensor's shape, from the header (nothing is read)."""
        return self._meta[self._stored(name) if name in self._key_set else name][0]

    def dtype(self, name):
        """The tensor's torch dtype, from the header (nothing is read)."""
        import torch
        code = self._meta[self._stored(name) if name in self._key_set else name][1]
        return getattr(torch, _SAFETENSORS_DTYPES[code])

    def nbytes(self) -> int:
        """Bytes of the stored tensors (aliases counted once)."""
        import torch
        total = 0
        for name, (shape, code) in self._meta.items():
            n = 1
            for s in shape:
                n *= s
            total += n * getattr(torch, _SAFETENSORS_DTYPES[code]).itemsize
        return total

    def __repr__(self):
        return f"LazyStateDict({str(self.path)!r}, {len(self)} tensors)"


class LazyModel:
    """A model directory standing in for its model where only the tensors are
    needed (streaming fusion): its config, the class `load_model` would build,
    and a `LazyStateDict` with exactly the names that model's `state_dict()`
    has. Nothing is loaded; the parts of a model fusion reads work alike
    (`config`, `state_dict()`, `training`, `eval()`, `train()`)."""

    training = False

    def __init__(self, path, config, model_class, tensors: LazyStateDict):
        self.path, self.config, self.model_class, self.tensors = Path(path), config, model_class, tensors

    @property
    def class_name(self) -> str:
        return self.model_class.__name__

    def state_dict(self):
        return self.tensors

    def eval(self):
        return self

    def train(self, mode: bool = True):
        return self

    def __repr__(self):
        return f"LazyModel({str(self.path)!r}, {self.class_name})"


def lazy_model(source, *, trust_remote_code: bool = False, config=None):
    """A `LazyModel` for a local directory whose safetensors weights hold
    every tensor its model class has, with the class's shapes; None where the
    model must be loaded whole as `load_model` does: not a directory, no
    safetensors, a class transformers does not name (remote code), tensors
    that `from_pretrained` would convert (split, merge...), initialise or
    reject. Names are resolved as `from_pretrained` resolves them: its
    checkpoint renamings (transformers 5 saves ViT under its 4.x names), the
    base-model prefix, and tied parameters stored once under a partner's name."""
    if not isinstance(source, (str, os.PathLike)) or trust_remote_code:
        return None
    config = config or load_config(source, trust_remote_code=False)
    path = _local_dir(source)
    cls = _recorded_class(config)
    if cls is None:
        return None
    try:
        stored = LazyStateDict(path)
    except ModelLoadError:  # no or unreadable safetensors: load_model reports what is wrong
        return None
    try:
        skeleton, meta = _skeleton(cls, config)
        found = _stored_names(skeleton, meta, list(stored))
    except Exception as e:  # noqa: BLE001 - not a documented reason: say why it is not streamed
        warnings.warn(f"otcompress: {path} is loaded whole, not streamed: its {cls.__name__} could not be laid out "
                      f"without memory ({type(e).__name__}: {_first_line(e)})", stacklevel=2)
        return None
    if found is None or len(found) < len(stored):  # unexpected tensors: load_model says which
        return None
    partners: dict[int, list[str]] = {}
    for name, t in [*skeleton.named_parameters(remove_duplicate=False),
                    *skeleton.named_buffers(remove_duplicate=False)]:
        partners.setdefault(id(t), []).append(name)
    for group in partners.values():
        have = [n for n in group if n in found]
        for n in group:
            if n not in found and have:
                found[n] = found[have[0]]
    if any(n not in found or stored.shape(found[n]) != tuple(t.shape) for n, t in meta.items()):
        return None
    return LazyModel(path, config, cls, LazyStateDict(path, keys=list(meta), aliases=found))


def _wrong_shape(path, cls, config) -> str | None:
    """'tensor NAME has shape S, the config asks for T' for the first stored
    tensor whose header shape differs from its model's (transformers names
    none); None when none is found or the headers cannot be read."""
    try:
        stored = LazyStateDict(path)
        skeleton, meta = _skeleton(cls, config)
        found = _stored_names(skeleton, meta, list(stored)) or {}
    except Exception:  # noqa: BLE001 - a best-effort explanation only
        return None
    for model_name, name in found.items():
        if tuple(stored.shape(name)) != tuple(meta[model_name].shape):
            return (f"tensor {name} has shape {list(stored.shape(name))}, the config asks for "
                    f"{list(meta[model_name].shape)}")
    return None


def _skeleton(cls, config):
    """(model, its state dict) of `cls` at `config` on the meta device: the
    class's names, shapes and ties, no memory."""
    import torch
    with torch.device("meta"):
        skeleton = cls(config)
    return skeleton, skeleton.state_dict()


def _stored_names(skeleton, meta, stored) -> dict | None:
    """{model name: stored name} by transformers' own key renaming; None when
    a stored tensor would be transformed, not just renamed, or two stored
    names would land on one model name."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightRenaming, rename_source_key
        transforms = get_model_conversion_mapping(skeleton)
    except ImportError:  # another transformers: names must match as stored
        transforms, rename_source_key = [], None
    if any(not isinstance(t, WeightRenaming) for t in transforms):
        return None
    found = {}
    for name in stored:
        model_name = name if rename_source_key is None else rename_source_key(
            name, transforms, [], skeleton.base_model_prefix, meta)[0]
        if model_name in found:
            return None
        if model_name in meta:
            found[model_name] = name
    return found


# ----------------------------------------------------------------------------- writing shard by shard

def shard_limit(max_shard_size) -> int:
    """A shard's size limit in bytes, from bytes or a size string ("5GB",
    "500MiB"), as `save_pretrained` reads it; InvalidOptionError otherwise."""
    from transformers.utils.hub import convert_file_size_to_int
    size = max_shard_size
    if isinstance(size, numbers.Real) and not isinstance(size, bool) and float(size).is_integer():
        size = int(size)  # 1e9, a NumPy integer: bytes
    try:
        limit = convert_file_size_to_int(size) if not isinstance(size, bool) else 0
    except (TypeError, ValueError, AttributeError):  # it calls .upper() on what is no int
        limit = 0
    if not isinstance(limit, int) or limit <= 0:
        raise InvalidOptionError(f"max_shard_size must be a size > 0 in bytes or such as '5GB' or '500MiB', "
                                 f"got {max_shard_size!r}")
    return limit


class ShardWriter:
    """Safetensors shards written one tensor at a time, in any order, as
    `save_pretrained` lays them out (`model.safetensors`, or numbered shards
    and `model.safetensors.index.json`). Names, shapes and dtypes are known
    before any value (the anchor's), so every shard's header and offsets are
    fixed up front: each file is created at its final size and a tensor's
    bytes go straight to their place when it arrives. Nothing is buffered, so
    the caller holds only the tensor in flight.

    layout: {name: (shape, torch dtype)} in the order to store them; a shard
    takes tensors in that order until the next would pass `max_shard_size`
    (bytes, or a size string such as "5GB"; a larger tensor gets a shard of
    its own)."""

    def __init__(self, directory, layout: dict, max_shard_size="5GB"):
        import torch
        limit = shard_limit(max_shard_size)
        codes = {getattr(torch, name): code for code, name in _SAFETENSORS_DTYPES.items()}
        groups, size = [[]], 0
        for name, (shape, dtype) in layout.items():
            n = math.prod(shape) * dtype.itemsize
            if groups[-1] and size + n > limit:
                groups.append([])
                size = 0
            groups[-1].append((name, list(shape), codes[dtype], n))
            size += n
        self.directory = Path(directory)
        files = (["model.safetensors"] if len(groups) == 1 else
                 [f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))])
        self._where = {}  # name -> (file, offset, bytes)
        for file, group in zip(files, groups):
            self._create(self.directory / file, group)
        self._files = files
        self.names = list(layout)
        self._unwritten = set(layout)

    def _create(self, path, group):
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for name, shape, code, n in group:
            header[name] = {"dtype": code, "shape": shape, "data_offsets": [offset, offset + n]}
            offset += n
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned, as safetensors writes it
        start = 8 + len(text)
        with open(path, "wb") as f:
            f.write(len(text).to_bytes(8, "little"))
            f.write(text)
            f.truncate(start + offset)  # sparse until the tensors arrive
        for name, (begin, end) in ((k, v["data_offsets"]) for k, v in header.items() if k != "__metadata__"):
            self._where[name] = (path, start + begin, end - begin)

    def __contains__(self, name):
        return name in self._where

    def write(self, name, tensor):
        """Store `tensor` (its layout's shape and dtype) under `name`."""
        import torch
        path, offset, n = self._where[name]
        data = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
        if data.numel() != n:
            raise ValueError(f"{name}: {data.numel()} bytes where the layout has {n}")
        with open(path, "r+b") as f:
            f.seek(offset)
            f.write(memoryview(data.numpy()))
        self._unwritten.discard(name)

    def close(self) -> list:
        """Write the index (several shards); returns the weight files' names."""
        if self._unwritten:
            raise RuntimeError(f"{len(self._unwritten)} tensors never written, e.g. {sorted(self._unwritten)[0]}")
        if len(self._files) > 1:
            index = {"metadata": {"total_size": sum(n for _, _, n in self._where.values())},
                     "weight_map": {name: path.name for name, (path, _, _) in self._where.items()}}
            (self.directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        return list(self._files)
