"""Finetuning and calibration data.

`load_data(spec, model)` turns a data spec into a `TaskData`: two in-memory
tensor splits ("train", "eval") and the rules for batching them for `model`.

Specs:
  digits        scikit-learn's 1,797 8x8 handwritten digits (10 classes).
  pydoc         the English help texts of `pydoc_data.topics`, one example
                per paragraph (a small offline masked-LM corpus).
  DIR           an image folder: one sub-folder per class (names sorted) of
                .png/.jpg/... images (Pillow) or .npy arrays.
  FILE.txt      one text example per non-empty line.
  FILE.jsonl    one JSON object per line: "text", optional "label" (or "labels").
  DIR           a `datasets` Dataset or DatasetDict saved with
                `save_to_disk`: an "image"/"pixel_values" or "text" column,
                optional "label"/"labels".

The task and inputs follow the model's family (otcompress.architectures):
image models get image classification; text encoders get sequence
classification when the model is a *ForSequenceClassification, else masked
LM; decoders (LLaMA, Qwen2, GPT-2 LM heads) get causal LM; each gets only the
token fields the model takes. A headless model (ViTModel, BertModel,
LlamaModel, GPT2Model) gets "feature-extraction": inputs only.

Causal LM: every text is one example (a pydoc paragraph, a line of a .txt
file, a .jsonl "text"; "label"s are ignored), truncated like MLM text. Its
labels are its input ids with -100 at padding and at the first position,
which no token predicts: the labelled positions are exactly the ones the
shifted next-token loss scores (Hugging Face's own shifted loss on these
labels is the same as on plain input ids). A tokenizer without a pad token
(GPT-2's) pads with its end-of-text token; the attention mask, not the id,
marks padding. Text is always padded on the right.

Splits are fixed (seed 0, independent of `seed`) so every run evaluates on
the same examples: labelled data 75/25 stratified, unlabelled text 90/10.
A DatasetDict's own train/test (or validation) splits are used as given.
The split "all" is every example: train then eval. `TaskData.default_eval_split`
is what `otcompress eval` measures unless told: "eval" for the built-in
digits and pydoc (their train split is what the demo and zoo models were
trained on) and for a DatasetDict with its own test split; "all" for every
other user file (a file given to evaluate is usually a held-out set as a whole).

Headless models (ViTModel, BertModel: no task head) get no labels and no MLM
masks: class labels in the data are ignored, as there is no classifier to
check them against or to train. Their batches are inputs only; they train
and are scored on their pooled embeddings against reference models
(otcompress.embedding), pooled as `TaskData.pooling` says. Headless text
models' data also carries the built-in probe set (`probe_sentences`: short
ordinary English sentences on many topics) tokenised by the same tokenizer,
so a compressed model is also scored on text unlike the user's (none where
most of the probe's tokens are unknown to the tokenizer).

Images are scaled to [0, 1], resized with bilinear `torch.nn.functional.
interpolate` to the config's image_size, converted to its num_channels
(grey repeated, RGB averaged to luminance), then normalised per channel with
the image processor's image_mean/image_std when one is given, else
digits: mean 0.3052, std 0.3760 (the train split's pixel statistics after /16);
other images: mean 0.5, std 0.5 (Hugging Face ViT's default).
Integer arrays are read as 8-bit (/255) when their maximum fits, else
16-bit (/65535); float arrays are taken to be in [0, 1] already.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from otcompress.architectures import FAMILIES, family_or_none, is_headless
from otcompress.errors import DataError, InvalidOptionError, UnsupportedArchitectureError

SPLIT_SEED = 0
EVAL_FRACTION_LABELLED = 0.25
EVAL_FRACTION_TEXT = 0.10
DIGITS_MEAN, DIGITS_STD = 0.3052, 0.3760
DEFAULT_MEAN, DEFAULT_STD = 0.5, 0.5
PYDOC_MIN_WORDS = 3  # drops headings and "See also:"/"Note:" stubs
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
NUMPY_SUFFIX = ".npy"
TASKS = ("image-classification", "masked-lm", "causal-lm", "sequence-classification", "feature-extraction")
LM_TASKS = ("masked-lm", "causal-lm")  # token-level tasks: labels come from the text itself
SPLITS = ("train", "eval")
EVAL_SPLITS = (*SPLITS, "all")
BUILT_IN = ("digits", "pydoc")
PROBE_FILE = Path(__file__).with_name("probe_sentences.txt")
PROBE_MAX_UNKNOWN = 0.5  # share of unknown tokens beyond which a tokenizer gets no probe set

Tensors = dict[str, torch.Tensor]


# --------------------------------------------------------------------------- TaskData


@dataclass
class _Masker:
    """BERT's MLM corruption: of `probability` of the real tokens, 80% become
    [MASK], 10% a random token, 10% stay; only those carry a label."""

    mask_id: int
    vocab_size: int
    special_ids: torch.Tensor
    probability: float

    def __call__(self, ids: torch.Tensor, attention_mask: torch.Tensor,
                 generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        eligible = attention_mask.bool() & ~torch.isin(ids, self.special_ids)
        chosen = (torch.rand(ids.shape, generator=generator) < self.probability) & eligible
        # Every sequence predicts at least one token: a batch of short
        # sequences with nothing masked would have an undefined (NaN) loss.
        score = torch.rand(ids.shape, generator=generator).masked_fill(~eligible, -1.0)
        rows = (~chosen.any(1) & eligible.any(1)).nonzero().squeeze(1)
        chosen[rows, score[rows].argmax(1)] = True
        roll = torch.rand(ids.shape, generator=generator)
        masked = ids.clone()
        masked[chosen & (roll < 0.8)] = self.mask_id
        swap = chosen & (roll >= 0.8) & (roll < 0.9)
        masked[swap] = torch.randint(self.vocab_size, (int(swap.sum()),), generator=generator)
        return masked, torch.where(chosen, ids, torch.full_like(ids, -100))


@dataclass
class TaskData:
    """Two in-memory splits and how to batch them.

    `splits[name]` holds the stored fields: "pixel_values" (+ "labels") for
    images; "input_ids", "attention_mask" (+ "token_type_ids", "labels") for
    text, unmasked and padded to the longest example.
    """

    task: str
    splits: dict[str, Tensors]
    num_labels: int | None = None
    class_names: list[str] | None = None
    spec: str = ""
    masker: _Masker | None = None
    default_eval_split: str = "eval"
    pooling: str | None = None  # feature-extraction: how embeddings are pooled
    probe: Tensors | None = field(default=None, repr=False)  # headless text: the probe set's inputs
    _eval_mlm: tuple[torch.Tensor, torch.Tensor] | None = field(default=None, repr=False)
    _train_mlm: tuple[torch.Tensor, torch.Tensor] | None = field(default=None, repr=False)  # drawn when scored

    def __post_init__(self):
        self._train_mlm = None  # (`dataclasses.replace` would carry another train split's masks)
        if self.masker is not None:
            # Masks for eval are drawn once with a fixed seed: eval loss is
            # deterministic and comparable across models and runs.
            ev = self.splits["eval"]
            gen = torch.Generator().manual_seed(SPLIT_SEED)
            self._eval_mlm = self.masker(ev["input_ids"], ev["attention_mask"], gen)

    @property
    def has_labels(self) -> bool:
        return self.task == "masked-lm" or "labels" in self.splits["train"]

    def num_examples(self, split: str) -> int:
        if split == "all":
            return sum(self.num_examples(s) for s in SPLITS)
        return len(next(iter(self._split(split).values())))

    def batches(self, split: str, batch_size: int, *, shuffle: bool = False, seed: int = 0,
                limit: int | None = None, drop_last: bool = False,
                group_by_length: bool = False) -> Iterator[Tensors]:
        """One pass over `split` as dicts of model inputs with "labels" (inputs
        only for a headless model's feature extraction).

        `limit` caps the number of examples (the first `limit` of the order);
        `seed` drives the shuffle and the train split's MLM masks.
        `group_by_length` (text, with shuffle) is Hugging Face Trainer's
        option: batches of similar length, in random order, so little
        compute goes to padding. `split="all"` is the train split's batches,
        then the eval split's (no batch spans both; each part keeps its own
        MLM masks, so the eval part is scored exactly as under "eval").
        """
        if not self.has_labels and self.task != "feature-extraction":
            raise DataError(f"data spec '{self.spec}': has no labels, needed to train or "
                            f"evaluate {self.task}")
        if split == "all":
            yield from self._all_batches(batch_size, shuffle, seed, limit, drop_last, group_by_length)
            return
        gen = torch.Generator().manual_seed(seed)
        for idx in self._index_batches(split, batch_size, shuffle, gen, limit, drop_last,
                                       group_by_length):
            batch = self._take(split, idx)
            if self.masker is not None:
                batch["input_ids"], batch["labels"] = self._mlm(split, idx, batch, gen, fixed=not shuffle)
            yield batch

    def probe_data(self) -> "TaskData | None":
        """The built-in probe sentences as a TaskData of their own (both
        splits), or None where this data has none (images, labelled tasks,
        tensors built without a tokenizer)."""
        if self.probe is None:
            return None
        return TaskData(self.task, {"train": self.probe, "eval": self.probe}, spec="probe sentences",
                        pooling=self.pooling)

    def calibration_batches(self, samples: int, batch_size: int = 64,
                            seed: int = 0) -> Iterator[Tensors]:
        """Inputs only (no labels, no MLM masking) of up to `samples` train
        examples drawn with `seed`, for activation statistics."""
        if samples < 1:
            raise InvalidOptionError(f"calibration samples must be >= 1, got {samples}")
        gen = torch.Generator().manual_seed(seed)
        for idx in self._index_batches("train", batch_size, True, gen, samples, False):
            batch = self._take("train", idx)
            batch.pop("labels", None)
            yield batch

    # -- helpers

    def _all_batches(self, batch_size, shuffle, seed, limit, drop_last, group_by_length):
        left = limit
        for split in SPLITS:
            if left is not None and left <= 0:
                return
            yield from self.batches(split, batch_size, shuffle=shuffle, seed=seed, limit=left,
                                    drop_last=drop_last, group_by_length=group_by_length)
            if left is not None:
                left -= min(left, self.num_examples(split))

    def _split(self, split: str) -> Tensors:
        if split not in SPLITS:
            raise InvalidOptionError(f"split must be one of {', '.join(EVAL_SPLITS)}, got {split!r}")
        return self.splits[split]

    def _index_batches(self, split, batch_size, shuffle, gen, limit, drop_last,
                       group_by_length=False) -> list[torch.Tensor]:
        if batch_size < 1:
            raise InvalidOptionError(f"batch_size must be >= 1, got {batch_size}")
        n = self.num_examples(split)
        order = torch.randperm(n, generator=gen) if shuffle else torch.arange(n)
        order = order[:limit] if limit is not None else order
        grouped = group_by_length and shuffle and "attention_mask" in self._split(split)
        if grouped:
            order = self._sorted_windows(order, self._split(split)["attention_mask"], batch_size)
        batches = list(order.split(batch_size))
        if drop_last and batches and len(batches[-1]) < batch_size:
            batches.pop()
        if grouped:  # windows were sorted: shuffle which batch comes when
            batches = [batches[i] for i in torch.randperm(len(batches), generator=gen)]
        return batches

    @staticmethod
    def _sorted_windows(order, attention_mask, batch_size, window_batches=50):
        lengths = attention_mask.sum(1)
        windows = order.split(window_batches * batch_size)
        return torch.cat([w[torch.argsort(lengths[w], descending=True, stable=True)]
                          for w in windows])

    def _take(self, split: str, idx: torch.Tensor) -> Tensors:
        batch = {k: v[idx] for k, v in self._split(split).items()}
        if "attention_mask" in batch:
            # Stored padded to the longest example overall; trim to this batch's.
            length = max(int(batch["attention_mask"].sum(1).max()), 1)
            batch = {k: v[:, :length] if v.dim() == 2 else v for k, v in batch.items()}
        return batch

    def _mlm(self, split, idx, batch, gen, fixed=False):
        """Masks: drawn anew for each training pass (shuffled); fixed per
        example for the eval split and for any pass in order (scoring: a
        model's loss on "all" or "train" was different at every batch size)."""
        length = batch["input_ids"].shape[1]
        if split == "eval" or fixed:
            ids, labels = self._eval_mlm if split == "eval" else self._fixed_train_mlm()
            return ids[idx, :length], labels[idx, :length]
        return self.masker(batch["input_ids"], batch["attention_mask"], gen)

    def _fixed_train_mlm(self):
        if self._train_mlm is None:
            tr = self.splits["train"]
            self._train_mlm = self.masker(tr["input_ids"], tr["attention_mask"],
                                          torch.Generator().manual_seed(SPLIT_SEED + 1))
        return self._train_mlm


# --------------------------------------------------------------------------- sources


@dataclass
class _Source:
    """A spec read into examples, not yet tensors. `load(indices)` returns
    the items (image arrays / PIL images, or strings) for those indices."""

    kind: str  # "image" | "text"
    count: int
    load: Callable[[np.ndarray], Sequence]
    labels: np.ndarray | None = None
    class_names: list[str] | None = None
    split: tuple[np.ndarray, np.ndarray] | None = None  # given (train, eval) indices
    default_mean_std: tuple[float, float] = (DEFAULT_MEAN, DEFAULT_STD)
    processed: bool = False  # images already normalised (a saved dataset's "pixel_values")
    label_error: str | None = None  # why the labels cannot be read: an error only where a task trains on them


def _digits_source() -> _Source:
    from sklearn.datasets import load_digits

    d = load_digits()
    images = (d.images / 16.0).astype(np.float32)
    return _Source("image", len(images), lambda idx: images[idx], d.target.astype(np.int64),
                   [str(c) for c in d.target_names], default_mean_std=(DIGITS_MEAN, DIGITS_STD))


def pydoc_paragraphs(split: str | None = None) -> list[str]:
    """The built-in text corpus: `pydoc_data.topics` split on blank lines,
    keeping paragraphs of at least PYDOC_MIN_WORDS words (2,301 paragraphs
    on Python 3.11; the help texts change between Python versions).
    `split` ("train" | "eval") gives the part `load_data("pydoc", ...)` uses."""
    from pydoc_data.topics import topics

    paragraphs = (p.strip() for key in sorted(topics) for p in re.split(r"\n\s*\n", topics[key]))
    paragraphs = [p for p in paragraphs if len(p.split()) >= PYDOC_MIN_WORDS]
    if split is None:
        return paragraphs
    if split not in SPLITS:
        raise InvalidOptionError(f"split must be 'train' or 'eval', got {split!r}")
    idx = _split_indices(_text_source(paragraphs, None, "pydoc"), "pydoc")[SPLITS.index(split)]
    return [paragraphs[i] for i in idx]


def probe_sentences() -> list[str]:
    """The built-in probe set: one sentence per line of PROBE_FILE (ordinary
    English on everyday topics, written for otcompress), blank lines and
    `#` comments skipped."""
    lines = (line.strip() for line in PROBE_FILE.read_text(encoding="utf-8").splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def _probe_inputs(tokenizer, max_length: int, keep: Sequence[str]) -> Tensors | None:
    """The probe sentences tokenised, or None for a tokenizer that does not
    know English (most real tokens unknown): its figure would say nothing."""
    probe = _tokenize(probe_sentences(), tokenizer, max_length, keep)
    unk = tokenizer.unk_token_id
    real = probe.get("attention_mask", torch.ones_like(probe["input_ids"])).bool()
    if unk is not None and (probe["input_ids"][real] == unk).float().mean() > PROBE_MAX_UNKNOWN:
        return None
    return probe


def _text_source(texts: list[str], labels: list | None, spec: str, label_error: str | None = None) -> _Source:
    if not texts:
        raise DataError(f"data spec '{spec}': no text examples")
    ids, names, label_error = _labels_or_why(labels, spec, label_error)
    return _Source("text", len(texts), lambda idx: [texts[i] for i in idx], ids, names, label_error=label_error)


def _labels_or_why(labels: list | None, spec: str, why: str | None = None) -> tuple:
    """(ids, class names, None), or (None, None, why they cannot be read): a
    language model's data ignores its labels, so they fail only a task that
    trains on them (`load_data`)."""
    if labels is None or why:
        return None, None, why
    try:
        return (*_encode_labels(labels, spec), None)
    except DataError as e:
        return None, None, str(e)


def _txt_source(path: Path, spec: str) -> _Source:
    # Lines end at "\n" only: splitlines() also splits at form feeds and U+2028 inside a line.
    lines = [line.strip() for line in _read_text(path, spec).split("\n")]
    return _text_source([line for line in lines if line], None, spec)


def _jsonl_source(path: Path, spec: str) -> _Source:
    texts, labels, lines = [], [], []
    for n, line in enumerate(_read_text(path, spec).split("\n"), 1):  # (as .txt: "\n" only)
        if not line.strip():
            continue
        lines.append(n)  # the file's line number of each example, for errors
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"data spec '{spec}': line {n} is not valid JSON ({e.msg})") from None
        if not isinstance(row, dict) or not isinstance(row.get("text"), str):
            raise DataError(f"data spec '{spec}': line {n} has no string field 'text'")
        texts.append(row["text"])
        labels.append(row.get("label", row.get("labels")))  # "labels" too, as saved datasets name it
    has = [lab is not None for lab in labels]
    why = f"data spec '{spec}': line {lines[has.index(False)]} has no 'label' while others do" \
        if any(has) and not all(has) else None
    return _text_source(texts, labels if any(has) else None, spec, why)


def _read_text(path: Path, spec: str) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")  # a byte-order mark (Windows editors) is no text
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"data spec '{spec}': cannot read ({e})") from None


def _folder_source(root: Path, spec: str) -> _Source:
    classes, files, labels = [], [], []
    for sub in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        found = sorted(p for p in sub.rglob("*") if p.is_file() and _is_image_file(p))
        if found:
            labels += [len(classes)] * len(found)
            files += found
            classes.append(sub.name)
    if not files:
        raise DataError(f"data spec '{spec}': no class sub-folders with image files "
                        f"({', '.join(sorted(IMAGE_SUFFIXES | {NUMPY_SUFFIX}))})")
    return _Source("image", len(files), lambda idx: [_read_image(files[i], spec) for i in idx],
                   np.array(labels, dtype=np.int64), classes)


def _is_image_file(p: Path) -> bool:
    return not p.name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES | {NUMPY_SUFFIX}


def _read_image(path: Path, spec: str):
    try:
        if path.suffix.lower() == NUMPY_SUFFIX:
            return np.load(path, allow_pickle=False)  # never unpickle user files
        from PIL import Image

        with Image.open(path) as img:
            img.load()
            return img
    except ImportError:
        raise DataError(f"data spec '{spec}': reading {path.suffix} images needs Pillow "
                        "(pip install pillow), or use .npy files") from None
    except Exception as e:  # PIL and numpy raise many types for a bad file
        raise DataError(f"data spec '{spec}': cannot read image {path} ({e})") from None


def _is_saved_dataset(path: Path) -> bool:
    return (path / "dataset_dict.json").is_file() or (
        (path / "state.json").is_file() and (path / "dataset_info.json").is_file())


def _saved_dataset_source(path: Path, spec: str) -> _Source:
    import datasets

    bars_on = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()  # library code never prints
    try:
        loaded = datasets.load_from_disk(str(path))
    except Exception as e:
        raise DataError(f"data spec '{spec}': cannot load saved dataset ({e})") from None
    finally:
        if bars_on:
            datasets.enable_progress_bars()
    if isinstance(loaded, datasets.DatasetDict):
        return _dataset_dict_source(loaded, spec)
    return _dataset_source(loaded, spec)


def _dataset_dict_source(dd, spec: str) -> _Source:
    import datasets

    if "train" not in dd:
        raise DataError(f"data spec '{spec}': saved DatasetDict has no 'train' split "
                        f"(has {', '.join(dd)})")
    held = [s for s in ("test", "validation", "eval") if s in dd]
    # A benchmark's test split often hides its labels (-1, as GLUE's): the next one that has them.
    eval_name = next((s for s in held if _labelled(dd[s])), held[0] if held else None)
    if eval_name is None:
        return _dataset_source(dd["train"], spec)
    train, ev = dd["train"], dd[eval_name]
    try:
        both = datasets.concatenate_datasets([train, ev])
    except ValueError as e:
        raise DataError(f"data spec '{spec}': 'train' and '{eval_name}' splits differ ({e})") from None
    src = _dataset_source(both, spec)
    src.split = (np.arange(len(train)), np.arange(len(train), len(both)))
    return src


def _dataset_source(ds, spec: str) -> _Source:
    cols = ds.column_names
    label_col = _label_column(cols)
    image_col = next((c for c in ("image", "pixel_values") if c in cols), None)
    if image_col is None and "text" not in cols:
        raise DataError(f"data spec '{spec}': saved dataset has no 'image', 'pixel_values' or "
                        f"'text' column (has {', '.join(cols)})")
    labels, names, why = None, None, None
    if label_col is not None:
        feature = ds.features[label_col]
        labels, names, why = _labels_or_why(list(ds[label_col]), spec)
        names = (list(getattr(feature, "names", None) or []) or names) if why is None else None
    if len(ds) == 0:
        raise DataError(f"data spec '{spec}': saved dataset is empty")
    kind = "image" if image_col is not None else "text"
    # "pixel_values" is what an image processor made: already normalised (normalised again,
    # a digits ViT's own processor output scored 12% against 90% as an "image" column).
    return _Source(kind, len(ds), _column_loader(ds, image_col or "text"), labels, names,
                   processed=image_col == "pixel_values", label_error=why)


def _label_column(cols) -> str | None:
    return next((c for c in ("label", "labels") if c in cols), None)


def _labelled(ds) -> bool:
    """No label column, or no negative (hidden) label in it."""
    col = _label_column(ds.column_names)
    return col is None or not any(isinstance(v, (int, np.integer)) and v < 0 for v in ds[col])


def _column_loader(ds, column: str):
    def load(idx):
        items = list(ds.select(np.asarray(idx, dtype=np.int64))[column])
        return [str(t) for t in items] if column == "text" else items

    return load


def _encode_labels(raw: list, spec: str) -> tuple[np.ndarray, list[str] | None]:
    """Integer labels stay as given; string labels become sorted class ids."""
    if all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in raw):
        ids = np.asarray(raw, dtype=np.int64)
        if ids.min() < 0:
            raise DataError(f"data spec '{spec}': negative label {int(ids.min())}")
        return ids, None
    if all(isinstance(v, str) for v in raw):
        names = sorted(set(raw))
        index = {n: i for i, n in enumerate(names)}
        return np.array([index[v] for v in raw], dtype=np.int64), names
    raise DataError(f"data spec '{spec}': labels must be all integers or all strings")


def spec_path(spec) -> str | None:
    """The file or folder a data spec reads (`~` expanded); None for a
    built-in data set or no spec."""
    if not spec or spec in BUILT_IN:
        return None
    return str(Path(spec).expanduser())


def _read_spec(spec: str) -> _Source:
    if spec == "digits":
        return _digits_source()
    if spec == "pydoc":
        return _text_source(pydoc_paragraphs(), None, spec)
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix.lower() == ".txt":
        return _txt_source(path, spec)
    if path.is_file() and path.suffix.lower() == ".jsonl":
        return _jsonl_source(path, spec)
    if path.is_dir() and _is_saved_dataset(path):
        return _saved_dataset_source(path, spec)
    if path.is_dir() and any(p.is_dir() for p in path.iterdir()):
        return _folder_source(path, spec)
    missing = "no such file or folder; it is " if not path.exists() else ""
    raise DataError(f"data spec '{spec}': {missing}not 'digits', 'pydoc', an existing image folder, "
                    ".txt/.jsonl file, or saved dataset")


# --------------------------------------------------------------------------- splits


def _split_indices(src: _Source, spec: str) -> tuple[np.ndarray, np.ndarray]:
    if src.split is not None:
        return src.split
    if src.count < 2:
        raise DataError(f"data spec '{spec}': {src.count} example(s); need at least 2 to split")
    if src.labels is None:
        order = np.random.default_rng(SPLIT_SEED).permutation(src.count)
        n_eval = max(1, round(src.count * EVAL_FRACTION_TEXT))
        return np.sort(order[n_eval:]), np.sort(order[:n_eval])
    from sklearn.model_selection import train_test_split

    try:
        # sklearn's split, as the measured digits baselines used.
        train, ev = train_test_split(np.arange(src.count), test_size=EVAL_FRACTION_LABELLED,
                                     stratify=src.labels, random_state=SPLIT_SEED)
    except ValueError:  # a class too rare to stratify (one example): split it as it falls
        train, ev = train_test_split(np.arange(src.count), test_size=EVAL_FRACTION_LABELLED,
                                     random_state=SPLIT_SEED)
    return train, ev


def _subsample(idx: np.ndarray, labels: np.ndarray | None, samples: int, seed: int) -> np.ndarray:
    """Up to `samples` of `idx`, drawn with `seed`, stratified when labelled."""
    if samples >= len(idx):
        return idx
    if labels is None or samples < len(np.unique(labels[idx])):
        return np.sort(np.random.default_rng(seed).permutation(idx)[:samples])
    from sklearn.model_selection import train_test_split

    keep, _ = train_test_split(idx, train_size=samples, stratify=labels[idx], random_state=seed)
    return np.sort(keep)


# --------------------------------------------------------------------------- images


def _image_geometry(config) -> tuple[tuple[int, int], int]:
    size = config.image_size
    size = tuple(size) if isinstance(size, (list, tuple)) else (size, size)
    return (int(size[0]), int(size[1])), int(config.num_channels)


def _to_chw(item, spec: str) -> torch.Tensor:
    """An image (PIL or array) as a float (C, H, W) tensor in [0, 1]."""
    if hasattr(item, "mode") and hasattr(item, "convert"):  # PIL image
        item = item if item.mode in ("L", "RGB", "I", "I;16", "F") else item.convert("RGB")
    a = np.asarray(item)
    if a.dtype == np.uint8:
        a = a.astype(np.float32) / 255.0
    elif a.dtype == np.uint16:
        a = a.astype(np.float32) / 65535.0
    elif a.dtype == np.bool_ or np.issubdtype(a.dtype, np.integer):
        a = a.astype(np.float32) / (255.0 if a.size == 0 or a.max() <= 255 else 65535.0)
    elif np.issubdtype(a.dtype, np.floating):
        a = a.astype(np.float32)
    else:
        raise DataError(f"data spec '{spec}': image array of dtype {a.dtype} is not numeric")
    if a.ndim == 2:
        a = a[None]
    elif a.ndim == 3 and a.shape[-1] in (1, 3, 4):
        a = a.transpose(2, 0, 1)
    elif not (a.ndim == 3 and a.shape[0] in (1, 3, 4)):
        raise DataError(f"data spec '{spec}': image of shape {a.shape} is not (H, W), "
                        "(H, W, C) or (C, H, W) with C in 1, 3, 4")
    return torch.from_numpy(np.ascontiguousarray(a[:3]))  # drop alpha


def _fit_channels(x: torch.Tensor, channels: int, spec: str) -> torch.Tensor:
    c = x.shape[-3]
    if c == channels:
        return x
    if c == 1:
        return x.expand(*x.shape[:-3], channels, *x.shape[-2:]).clone()
    if c == 3 and channels == 1:
        weights = torch.tensor([0.299, 0.587, 0.114]).view(3, 1, 1)
        return (x * weights).sum(-3, keepdim=True)
    raise DataError(f"data spec '{spec}': images have {c} channels; the model expects {channels}")


def _resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(N, C, H, W) -> (N, C, *size); antialiased when shrinking."""
    if tuple(x.shape[-2:]) == size:
        return x
    shrink = x.shape[-2] > size[0] or x.shape[-1] > size[1]
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=shrink)


def _mean_std(image_processor, default: tuple[float, float], channels: int, spec: str):
    mean, std = default
    if image_processor is not None:
        mean = getattr(image_processor, "image_mean", None) or mean
        std = getattr(image_processor, "image_std", None) or std

    def per_channel(v):
        v = torch.as_tensor(v, dtype=torch.float32).flatten()
        if len(v) == 3 and channels == 1:  # an RGB processor on a grey model
            v = v.mean(0, keepdim=True)
        if len(v) not in (1, channels):
            raise DataError(f"data spec '{spec}': image_processor has {len(v)} mean/std values "
                            f"for {channels} channels")
        return v.expand(channels).reshape(channels, 1, 1)

    return per_channel(mean), per_channel(std)


def _image_tensor(items: Sequence, size, channels, mean, std, spec: str) -> torch.Tensor:
    if isinstance(items, np.ndarray) and items.ndim == 3:  # digits: one vectorised batch
        x = torch.from_numpy(np.ascontiguousarray(items))[:, None]
        x = _fit_channels(_resize(x, size), channels, spec)
    else:
        x = torch.stack([_fit_channels(_resize(_to_chw(it, spec)[None], size)[0], channels, spec)
                         for it in items])
    if x.is_floating_point() and not bool(torch.isfinite(x).all()):  # a .npy or array column holding NaN/Inf
        raise DataError(f"data spec '{spec}': {int((~torch.isfinite(x).flatten(1).all(1)).sum())} image(s) "
                        "hold values that are not finite (NaN/Inf)")
    return ((x - mean) / std).contiguous()


# --------------------------------------------------------------------------- text


def _tokenize(texts: Sequence[str], tokenizer, max_length: int, keep: Sequence[str]) -> Tensors:
    """Token ids padded on the right to the longest text (batches are trimmed
    from the right); of the tokenizer's fields only those in `keep` (the
    model's inputs: DistilBERT takes no token types)."""
    enc = tokenizer(list(texts), truncation=True, max_length=max_length, padding="longest",
                    padding_side="right", return_tensors="pt")
    out = {k: enc[k].long() for k in keep if k in enc}
    if "token_type_ids" in keep and "token_type_ids" not in out:
        # Some tokenizers (transformers 5 fast ones) give none; the model and its ONNX graph
        # take them, and zeros (one segment) are what the model uses when they are left out.
        out["token_type_ids"] = torch.zeros_like(out["input_ids"])
    return out


def causal_labels(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Next-token labels of a causal LM: the input ids, -100 at padding and at
    the first position (nothing predicts it), so exactly the scored positions
    carry a label."""
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    labels[:, :1] = -100
    return labels


def _padded_tokenizer(tokenizer, task: str):
    """A causal LM's tokenizer without a pad token (GPT-2's) pads with its
    end-of-text token (a copy: the caller's tokenizer is left as it is)."""
    if (task == "causal-lm" and tokenizer is not None and tokenizer.pad_token_id is None
            and tokenizer.eos_token is not None):
        import copy

        tokenizer = copy.deepcopy(tokenizer)
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _check_tokenizer(tokenizer, config, task: str, spec: str) -> None:
    if tokenizer is None:
        raise DataError(f"data spec '{spec}': text data needs a tokenizer")
    if tokenizer.pad_token_id is None:
        raise DataError(f"data spec '{spec}': the tokenizer has no pad token"
                        + (" (nor an end-of-text token to pad with)" if task == "causal-lm" else ""))
    if task == "masked-lm" and tokenizer.mask_token_id is None:
        raise DataError(f"data spec '{spec}': masked LM needs a tokenizer with a mask token")
    if len(tokenizer) > config.vocab_size:
        raise DataError(f"data spec '{spec}': the tokenizer has {len(tokenizer)} tokens but the "
                        f"model's vocabulary has {config.vocab_size}")


def _masker(tokenizer, config, mlm_probability: float) -> _Masker:
    if not 0.0 < mlm_probability < 1.0:
        raise InvalidOptionError(f"mlm_probability must be in (0, 1), got {mlm_probability}")
    special = torch.tensor(sorted(set(tokenizer.all_special_ids)), dtype=torch.long)
    return _Masker(int(tokenizer.mask_token_id), len(tokenizer), special, mlm_probability)


# --------------------------------------------------------------------------- load_data


def _model_task(model) -> tuple[object, str, str]:
    from transformers import PretrainedConfig

    config = getattr(model, "config", model)
    if not isinstance(config, PretrainedConfig):
        raise InvalidOptionError(f"load_data: model must be a transformers model or config, "
                                 f"got {type(model).__name__}")
    name = type(model).__name__ if model is not config else (config.architectures or [""])[0]
    # The model's family (otcompress.architectures) knows its task and inputs.
    fam = _family(config)
    kind = "image" if "pixel_values" in fam.INPUTS else "text"
    return config, "feature-extraction" if is_headless(model) else fam.task(name), kind


def _family(config):
    fam = family_or_none(config)
    if fam is None:
        raise UnsupportedArchitectureError(f"load_data: no data pipeline for model type "
                                           f"'{config.model_type}' (supported: {', '.join(FAMILIES)})")
    return fam


def _as_model_ids(src: _Source, config, spec: str) -> _Source:
    """`src` with named classes (string labels, image folders) numbered as
    the model numbers them: by its own label names (config.label2id), or, where
    its labels are unnamed (LABEL_k), by names that are class indices ("3",
    "7"); otherwise in sorted order, as read. A folder holding only some
    classes, or labels spelled as the model's names, then score as they should
    (they were renumbered 0, 1, ... by order: a digits ViT scored 0% on
    folders "3" and "7")."""
    names = src.class_names
    if not names:
        return src
    label2id = getattr(config, "label2id", None) or {}
    if not _unnamed_labels(config):
        unknown = [n for n in names if n not in label2id]
        if unknown:
            raise DataError(f"data spec '{spec}': class '{unknown[0]}' is not one of the model's labels "
                            f"({', '.join(map(str, list(label2id)[:8]))}{', ...' if len(label2id) > 8 else ''})")
        ids = [int(label2id[n]) for n in names]
    elif all(n.isdigit() and int(n) < config.num_labels for n in names):
        ids = [int(n) for n in names]
    elif all(re.fullmatch(r"LABEL_\d+", n) and int(n[6:]) < config.num_labels for n in names):
        ids = [int(n[6:]) for n in names]  # the model's own unnamed labels, spelled out
    else:
        return src
    named = dict(zip(ids, names))
    id2label = getattr(config, "id2label", None) or {}
    return replace(src, labels=np.asarray(ids, dtype=np.int64)[src.labels],
                   class_names=[named.get(i, str(id2label.get(i, f"LABEL_{i}"))) for i in range(max(ids) + 1)])


def _unnamed_labels(config) -> bool:
    """No label names of the model's own: none, or transformers' LABEL_k."""
    label2id = getattr(config, "label2id", None) or {}
    return all(re.fullmatch(r"LABEL_\d+", str(k)) for k in label2id)


def record_class_names(config, task: "TaskData") -> bool:
    """Write the class names a model with unnamed labels (LABEL_k) was trained
    on into its config (id2label / label2id), numbered as they were read
    (sorted): without them a file holding only "pos" scores as class 0 when
    the model learnt it as 1 (a finetuned model at 100% scored 0%). Names
    that are class indices ("3", "LABEL_3") need none. True where written."""
    names = task.class_names
    if not names or not _unnamed_labels(config):
        return False
    if all(re.fullmatch(r"\d+|LABEL_\d+", str(n)) for n in names):
        return False
    config.id2label = {i: str(names[i]) if i < len(names) else f"LABEL_{i}" for i in range(config.num_labels)}
    config.label2id = {name: i for i, name in config.id2label.items()}
    return True


def _check_labels(num_labels: int, config, spec: str) -> None:
    if num_labels > config.num_labels:
        raise DataError(f"data spec '{spec}': {num_labels} classes but the model has "
                        f"{config.num_labels} labels")


def load_data(spec: str, model, *, tokenizer=None, image_processor=None,
              samples: int | None = None, seed: int = 0, max_length: int = 128,
              mlm_probability: float = 0.15, pooling: str | None = None) -> TaskData:
    """Read `spec` (see the module docstring) into batches that fit `model`
    (a transformers model or config).

    `samples` caps the train split at that many examples drawn with `seed`
    (stratified when labelled); the eval split is never subsampled, so
    metrics stay comparable. Text longer than `max_length` tokens (clipped
    to the longest sequence the model's positions allow) is truncated.
    `pooling` (headless models) overrides the family's embedding pooling.
    """
    if samples is not None and samples < 1:
        raise InvalidOptionError(f"samples must be >= 1, got {samples}")
    config, task, kind = _model_task(model)
    src = _read_spec(spec)
    if src.kind != kind:
        raise DataError(f"data spec '{spec}': {src.kind} data does not fit a "
                        f"{config.model_type} model ({task})")
    ignored = task in (*LM_TASKS, "feature-extraction")  # no classifier: labels are neither checked nor used
    if src.label_error and not ignored:
        raise DataError(src.label_error)
    if src.label_error:  # labels a language model would ignore cannot fail it
        src = replace(src, labels=None, class_names=None, label_error=None)
    train_idx, eval_idx = _split_indices(src, spec)
    if samples is not None:
        train_idx = _subsample(train_idx, src.labels, samples, seed)
    use_labels = src.labels is not None and not ignored
    num_labels = None
    if use_labels:
        src = _as_model_ids(src, config, spec)
        num_labels = max(len(src.class_names or ()), int(src.labels.max()) + 1)
        _check_labels(num_labels, config, spec)

    if kind == "image":
        size, channels = _image_geometry(config)
        mean, std = (0.0, 1.0) if src.processed else \
            _mean_std(image_processor, src.default_mean_std, channels, spec)
        make = lambda idx: {"pixel_values": _image_tensor(src.load(idx), size, channels,  # noqa: E731
                                                          mean, std, spec)}
        masker = None
    else:
        tokenizer = _padded_tokenizer(tokenizer, task)
        _check_tokenizer(tokenizer, config, task, spec)
        fam = _family(config)
        length = min(max_length, fam.max_seq_len(config))
        make = lambda idx: _tokenize(src.load(idx), tokenizer, length, fam.INPUTS)  # noqa: E731
        masker = _masker(tokenizer, config, mlm_probability) if task == "masked-lm" else None

    splits = {}
    for name, idx in (("train", train_idx), ("eval", eval_idx)):
        splits[name] = make(idx)
        if use_labels:
            splits[name]["labels"] = torch.from_numpy(src.labels[idx])
        elif task == "causal-lm":
            splits[name]["labels"] = causal_labels(splits[name]["input_ids"], splits[name]["attention_mask"])
    own_split = spec in BUILT_IN or src.split is not None
    probe = None
    if task == "feature-extraction":
        from otcompress.embedding import pooling_mode
        pooling = pooling or pooling_mode(config)
        if kind == "text":  # tokenised now, while the tokenizer is at hand
            probe = _probe_inputs(tokenizer, length, fam.INPUTS)
    return TaskData(task, splits, num_labels=num_labels,
                    class_names=src.class_names if use_labels else None, spec=spec, masker=masker,
                    default_eval_split="eval" if own_split else "all",
                    pooling=pooling if task == "feature-extraction" else None, probe=probe)


# --------------------------------------------------------------------------- tokenizer


def train_wordpiece_tokenizer(texts, vocab_size: int, out_dir):
    """Train a lower-cased BERT WordPiece tokenizer on `texts` locally (the
    `tokenizers` library), save it to `out_dir` and return it as a
    `BertTokenizerFast` that `AutoTokenizer.from_pretrained(out_dir)` reloads."""
    from tokenizers import BertWordPieceTokenizer
    from transformers import BertTokenizerFast

    texts = [t for t in texts if isinstance(t, str) and t.strip()]
    if not texts:
        raise DataError("train_wordpiece_tokenizer: no non-empty texts")
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    if vocab_size < len(specials) + 1:
        raise InvalidOptionError(f"vocab_size must be > {len(specials)}, got {vocab_size}")
    wp = BertWordPieceTokenizer(lowercase=True)
    wp.train_from_iterator(texts, vocab_size=vocab_size, min_frequency=2,
                           special_tokens=specials, show_progress=False)
    tokenizer = BertTokenizerFast(vocab=wp.get_vocab(), do_lower_case=True)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(os.fspath(out_dir))
    return tokenizer
