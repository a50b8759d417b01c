"""Small real models trained on this machine, cached on disk.

The benchmarks need independently trained parents and anchors of several
widths. Each is trained once per machine and cached under

    cache_dir  >  $OTCOMPRESS_CACHE/zoo  >  ~/.cache/otcompress/zoo

in a folder keyed by every config value, the seed, the training budget,
the recipe and (for text) the corpus. A folder is a `save_pretrained`
layout (with the image processor or tokenizer) plus `zoo.json`: the recipe,
the eval metrics and the training time. Folders are written to a temporary
name and renamed, so a crash never leaves a half-written model behind.

Different seeds give different initialisations and batch orders.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

import torch

from otcompress.errors import InvalidOptionError

RECIPE_VERSION = 1  # bump when training code changes, so old caches are not reused
ZOO_FILE = "zoo.json"
DIGITS_LR, DIGITS_BATCH, DIGITS_WARMUP = 2e-3, 64, 0.3  # warm-up 0.3 + cosine = one-cycle
PYDOC_LR, PYDOC_BATCH, PYDOC_WARMUP, PYDOC_STEPS = 2e-3, 64, 0.05, 1500
# Keys that describe the saving library, not the model.
_UNKEYED = {"transformers_version", "_name_or_path", "architectures", "dtype", "torch_dtype"}


# --------------------------------------------------------------------------- cache


def cache_root(cache_dir=None) -> Path:
    """Where zoo models live: the argument, else $OTCOMPRESS_CACHE/zoo, else
    ~/.cache/otcompress/zoo."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get("OTCOMPRESS_CACHE")
    return (Path(env).expanduser() if env else Path.home() / ".cache" / "otcompress") / "zoo"


def zoo_info(path) -> dict:
    """The recipe, metrics and timing recorded with a zoo model."""
    return json.loads((Path(path) / ZOO_FILE).read_text())


def _digest(*parts) -> str:
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


def _config_key(config) -> dict:
    return {k: v for k, v in config.to_dict().items() if k not in _UNKEYED}


def _cached(path: Path, build: Callable[[Path], None]) -> Path:
    """Return `path`, first building it through a temporary folder if absent."""
    if (path / ZOO_FILE).is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        build(tmp)
        tmp.chmod(0o777 & ~_umask())  # mkdtemp makes it private; a cache is shared
        os.rename(tmp, path)  # atomic on one file system
    except OSError:
        if not (path / ZOO_FILE).is_file():  # not just another process winning the race
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


@contextmanager
def _quiet():
    """transformers draws tqdm bars when saving/loading; library code never prints."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _write_info(folder: Path, info: dict) -> None:
    (folder / ZOO_FILE).write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")


def _new_model(cls, config, seed: int):
    """Initialise from `seed` without disturbing the caller's global RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return cls(config)


def _check_widths(hidden, layers, heads, intermediate):
    for name, v in (("hidden", hidden), ("layers", layers), ("heads", heads),
                    ("intermediate", intermediate)):
        if not isinstance(v, int) or v < 1:
            raise InvalidOptionError(f"{name} must be a positive integer, got {v!r}")
    if hidden % heads:
        raise InvalidOptionError(f"hidden {hidden} is not divisible by heads {heads}")


# --------------------------------------------------------------------------- digits ViT


def digits_vit_config(hidden=64, layers=4, heads=4, intermediate=None, patch=2):
    from transformers import ViTConfig

    intermediate = 2 * hidden if intermediate is None else intermediate
    _check_widths(hidden, layers, heads, intermediate)
    if not isinstance(patch, int) or patch < 1 or 8 % patch:
        raise InvalidOptionError(f"patch must divide the 8x8 digits, got {patch!r}")
    return ViTConfig(image_size=8, num_channels=1, patch_size=patch, hidden_size=hidden,
                     num_hidden_layers=layers, num_attention_heads=heads,
                     intermediate_size=intermediate, num_labels=10,
                     id2label={i: str(i) for i in range(10)},
                     label2id={str(i): i for i in range(10)})


def digits_vit(hidden=64, layers=4, heads=4, intermediate=None, patch=2, seed=0, epochs=30,
               cache_dir=None, progress=None):
    """A ViTForImageClassification trained on digits (AdamW 2e-3, one-cycle,
    batch 64, `epochs` passes over the 1,347 train images); returns
    (model in eval mode, its folder). Cached: the second call only loads."""
    from transformers import ViTForImageClassification

    config = digits_vit_config(hidden, layers, heads, intermediate, patch)
    if not isinstance(epochs, int) or epochs < 0:
        raise InvalidOptionError(f"epochs must be an integer >= 0, got {epochs!r}")
    recipe = {"data": "digits", "lr": DIGITS_LR, "batch_size": DIGITS_BATCH,
              "warmup": DIGITS_WARMUP, "schedule": "linear warm-up, cosine", "epochs": epochs,
              "seed": seed, "version": RECIPE_VERSION}
    name = (f"digits_vit-h{hidden}-l{layers}-a{heads}-i{config.intermediate_size}-p{patch}"
            f"-s{seed}-e{epochs}-{_digest(_config_key(config), recipe)}")

    def build(folder: Path):
        _train_digits_vit(config, recipe, folder, progress)

    with _quiet():
        path = _cached(cache_root(cache_dir) / name, build)
        return ViTForImageClassification.from_pretrained(path).eval(), path


def _train_digits_vit(config, recipe, folder: Path, progress):
    from transformers import ViTForImageClassification, ViTImageProcessorPil

    from otcompress.data import DIGITS_MEAN, DIGITS_STD, load_data
    from otcompress.finetune import evaluate, finetune

    model = _new_model(ViTForImageClassification, config, recipe["seed"])
    data = load_data("digits", model)
    steps = recipe["epochs"] * (data.num_examples("train") // DIGITS_BATCH)
    report = finetune(model, data, steps=steps, lr=DIGITS_LR, batch_size=DIGITS_BATCH,
                      seed=recipe["seed"], warmup=DIGITS_WARMUP, progress=progress)
    model.save_pretrained(folder)
    # The pixel statistics load_data used, so `AutoImageProcessor` users
    # (and load_data given this processor) normalise the same way.
    ViTImageProcessorPil(size={"height": 8, "width": 8}, image_mean=[DIGITS_MEAN],
                         image_std=[DIGITS_STD]).save_pretrained(folder)
    _write_info(folder, {"model": "digits_vit", "recipe": recipe, "steps": steps,
                         "seconds": report["seconds"], "final_loss": report["final_loss"],
                         "eval": evaluate(model, data), "threads": torch.get_num_threads()})


# --------------------------------------------------------------------------- pydoc BERT


@functools.lru_cache(maxsize=1)
def _corpus_digest() -> str:
    # pydoc's help texts differ between Python versions: key on the text itself.
    from otcompress.data import pydoc_paragraphs

    return _digest(pydoc_paragraphs())


def pydoc_tokenizer(vocab_size=2000, cache_dir=None):
    """The WordPiece tokenizer for pydoc models, trained once on the train
    paragraphs and shared by every seed and width; returns (tokenizer, folder)."""
    from transformers import AutoTokenizer

    from otcompress.data import pydoc_paragraphs, train_wordpiece_tokenizer

    if not isinstance(vocab_size, int) or vocab_size < 100:
        raise InvalidOptionError(f"vocab_size must be an integer >= 100, got {vocab_size!r}")
    key = _digest("pydoc-wordpiece", vocab_size, _corpus_digest(), RECIPE_VERSION)
    path = cache_root(cache_dir) / "tokenizers" / f"pydoc-wordpiece-v{vocab_size}-{key}"

    def build(folder: Path):
        train_wordpiece_tokenizer(pydoc_paragraphs("train"), vocab_size, folder)
        _write_info(folder, {"tokenizer": "wordpiece", "corpus": "pydoc train split",
                             "vocab_size": vocab_size})

    path = _cached(path, build)
    return AutoTokenizer.from_pretrained(path), path


def pydoc_bert_config(hidden=64, layers=2, heads=4, intermediate=None, vocab_size=2000,
                      max_length=128, pad_token_id=0):
    from transformers import BertConfig

    intermediate = 4 * hidden if intermediate is None else intermediate  # BERT's ratio
    _check_widths(hidden, layers, heads, intermediate)
    return BertConfig(vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers,
                      num_attention_heads=heads, intermediate_size=intermediate,
                      max_position_embeddings=max_length, pad_token_id=pad_token_id)


def pydoc_bert(hidden=64, layers=2, heads=4, intermediate=None, vocab_size=2000, seed=0,
               steps=PYDOC_STEPS, cache_dir=None, progress=None):
    """A BertForMaskedLM trained on the pydoc corpus (AdamW 2e-3, warm-up then
    cosine, batch 64, `steps` steps, 15% masking) with its WordPiece
    tokenizer saved beside it; returns (model in eval mode, its folder).
    `AutoTokenizer.from_pretrained(folder)` loads the tokenizer."""
    from transformers import BertForMaskedLM

    if not isinstance(steps, int) or steps < 0:
        raise InvalidOptionError(f"steps must be an integer >= 0, got {steps!r}")
    pydoc_bert_config(hidden, layers, heads, intermediate)  # validate before any work
    tokenizer, _ = pydoc_tokenizer(vocab_size, cache_dir)
    config = pydoc_bert_config(hidden, layers, heads, intermediate, len(tokenizer),
                               pad_token_id=tokenizer.pad_token_id)
    recipe = {"data": "pydoc", "lr": PYDOC_LR, "batch_size": PYDOC_BATCH,
              "warmup": PYDOC_WARMUP, "schedule": "linear warm-up, cosine", "steps": steps,
              "mlm_probability": 0.15, "seed": seed, "corpus": _corpus_digest(),
              "version": RECIPE_VERSION}
    name = (f"pydoc_bert-h{hidden}-l{layers}-a{heads}-i{config.intermediate_size}"
            f"-v{vocab_size}-s{seed}-n{steps}-{_digest(_config_key(config), recipe)}")

    def build(folder: Path):
        _train_pydoc_bert(config, tokenizer, recipe, folder, progress)

    with _quiet():
        path = _cached(cache_root(cache_dir) / name, build)
        return BertForMaskedLM.from_pretrained(path).eval(), path


def _train_pydoc_bert(config, tokenizer, recipe, folder: Path, progress):
    from transformers import BertForMaskedLM

    from otcompress.data import load_data
    from otcompress.finetune import evaluate, finetune

    model = _new_model(BertForMaskedLM, config, recipe["seed"])
    data = load_data("pydoc", model, tokenizer=tokenizer)
    report = finetune(model, data, steps=recipe["steps"], lr=PYDOC_LR, batch_size=PYDOC_BATCH,
                      seed=recipe["seed"], warmup=PYDOC_WARMUP, progress=progress)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    _write_info(folder, {"model": "pydoc_bert", "recipe": recipe,
                         "seconds": report["seconds"], "final_loss": report["final_loss"],
                         "eval": evaluate(model, data),
                         "threads": torch.get_num_threads()})
