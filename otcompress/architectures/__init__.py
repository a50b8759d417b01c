"""One small data file per model family; the engine, profiling, export and
data look them up by model type (what a family file defines: see `common`)."""
import numbers

from otcompress.architectures import bert, common, distilbert, gpt2, llama, qwen2, roberta, vit
from otcompress.errors import InvalidOptionError, UnsupportedArchitectureError

FAMILIES = {m.MODEL_TYPE: m for m in (vit, bert, roberta, distilbert, llama, qwen2, gpt2)}


def supported() -> dict:
    """{model type: [model classes fusion accepts]}, for listings."""
    return {t: list(m.MODEL_CLASSES) for t, m in FAMILIES.items()}


def family_or_none(config):
    """The family of `config`'s model type, None where no family describes it."""
    return FAMILIES.get(getattr(config, "model_type", None))


def family(config):
    fam = family_or_none(config)
    if fam is None:
        raise UnsupportedArchitectureError(
            f"model type '{getattr(config, 'model_type', '?')}' is not supported "
            f"(supported: {', '.join(sorted(FAMILIES))})")
    return fam


def check_class(model):
    fam = family(model.config)
    name = type(model).__name__
    if name not in fam.MODEL_CLASSES:
        raise UnsupportedArchitectureError(
            f"{name} is not supported for {fam.MODEL_TYPE} (supported: {', '.join(fam.MODEL_CLASSES)})")
    return fam


def build_spec(model, *, qk="separate"):
    """The family's flow graph for `model`, checked against its parameter
    names. `model` may also be a weightless stand-in such as
    `modelio.LazyModel` (a `config`, a `class_name` and `state_dict()` names):
    the check then runs on config and names alone (`spec_from_keys`)."""
    if not hasattr(model, "parameters"):  # a stand-in, not a torch module
        return spec_from_keys(model.config, model.class_name, model.state_dict().keys(), qk=qk)
    fam = check_class(model)
    keys = set(model.state_dict().keys())
    return _checked_spec(fam, model.config, name_of(model), keys, qk)


def spec_from_keys(config, class_name: str, keys, *, qk="separate"):
    """`build_spec` from a config, the model's class name and its tensor names
    (e.g. a safetensors directory's), without a model object."""
    fam = family(config)
    if class_name not in fam.MODEL_CLASSES:
        raise UnsupportedArchitectureError(
            f"{class_name} is not supported for {fam.MODEL_TYPE} "
            f"(supported: {', '.join(fam.MODEL_CLASSES)})")
    return _checked_spec(fam, config, class_name, set(keys), qk)


def _checked_spec(fam, config, name, keys, qk):
    spec = fam.build(config, keys, qk=qk)
    unknown = sorted(keys - set(spec.axes) - set(spec.tied))
    if unknown:
        # Fail loudly: silently skipping a tensor would leave it unfused.
        raise UnsupportedArchitectureError(
            f"{name} has parameters the {fam.MODEL_TYPE} description does not know: "
            f"{', '.join(unknown[:5])}{' ...' if len(unknown) > 5 else ''}")
    missing = sorted(set(spec.axes) - keys)
    if missing:
        raise UnsupportedArchitectureError(
            f"{name} lacks parameters the {fam.MODEL_TYPE} description expects "
            f"(another transformers version?): {', '.join(missing[:5])}")
    return spec


def name_of(model):
    return type(model).__name__


def recorded_class(config):
    """The model class a config records (`architectures`), None if none."""
    return (getattr(config, "architectures", None) or [None])[0]


def head_of(config):
    """The task-head part of the class a config records ("ForMaskedLM",
    "LMHeadModel"), by its family's naming (`common.class_head` unless the
    family defines its own); None when headless ("BertModel") or unrecorded."""
    rule = getattr(family_or_none(config), "class_head", common.class_head)
    return rule(recorded_class(config))


def is_causal_lm(model) -> bool:
    """True for a model its family trains as a causal LM (LLaMA, Qwen2, GPT-2)."""
    fam = family_or_none(getattr(model, "config", None))
    return fam is not None and fam.task(type(model).__name__) == "causal-lm"


def is_headless(model) -> bool:
    """True for a bare encoder or decoder (ViTModel, BertModel, LlamaModel,
    GPT2Model): no task head, so no classifier whose labels data could be
    checked against. `model` is a model or a config (then its `architectures`
    decide; none recorded = not headless; GPT2LMHeadModel has a head)."""
    config = getattr(model, "config", model)
    if model is config:
        return bool(recorded_class(config)) and head_of(config) is None
    return getattr(model, "base_model", None) is model


# What a teacher of a model type no family describes must share with its
# student: its inputs at least.
UNKNOWN_TEACHER_MUST_MATCH = ("image_size", "num_channels", "vocab_size")


def teacher_must_match(config) -> tuple:
    """Config values a distillation teacher must share with a student of this
    config: its family's TEACHER_MUST_MATCH (the inputs and outputs; depth,
    widths and the like are the teacher's own business)."""
    fam = family_or_none(config)
    return fam.TEACHER_MUST_MATCH if fam is not None else UNKNOWN_TEACHER_MUST_MATCH


# Config keys of the widths a user may set for a fold target; a family file
# can override them with its own WIDTHS (e.g. DistilBERT's FFN is hidden_dim),
# and give UNSET_WIDTHS {config key: config -> value} for a key whose value may
# be None (GPT-2's n_inner: None means 4 x n_embd).
WIDTHS = {"hidden": "hidden_size", "heads": "num_attention_heads", "intermediate": "intermediate_size"}


def _width_keys(config) -> dict:
    return getattr(family(config), "WIDTHS", WIDTHS)


def resolved_widths(config) -> dict:
    """{width name: value} of a config, unset values resolved by the family."""
    unset = getattr(family(config), "UNSET_WIDTHS", {})
    values = {}
    for what, key in _width_keys(config).items():
        value = getattr(config, key, None)
        values[what] = unset[key](config) if value is None and key in unset else value
    return values


def head_shape(config) -> tuple:
    """(number of attention heads, head width) from a config."""
    heads = config.num_attention_heads
    return heads, getattr(config, "head_dim", None) or config.hidden_size // heads


def kv_heads(config) -> int:
    """Key/value heads (fewer than attention heads with grouped-query attention)."""
    return getattr(config, "num_key_value_heads", None) or config.num_attention_heads


def target_config(parent_config, **widths):
    """A fold target: the parent's config with some widths replaced
    (hidden=..., heads=..., intermediate=..., kv_heads=..., layers=...; None
    keeps the parent's). `layers` below the parent's depth makes a shallower
    target (the parent is depth-mapped onto it, see otcompress/depth.py);
    per-block config lists (Qwen2's layer_types) are guessed here and set by
    the fusion to those of the blocks kept (`fusion._retyped_target`). Heads must be a
    multiple of key/value heads; rotary families keep the parent's head
    width (their HEAD_WIDTH, set where the parent's config leaves it
    implicit), so hidden need not divide by heads there."""
    keys = _width_keys(parent_config)
    extra = ("kv_heads", "layers")
    cfg = type(parent_config).from_dict(parent_config.to_dict())
    for what, value in widths.items():
        if what not in keys and what not in extra:
            raise InvalidOptionError(f"unknown width '{what}' (use {', '.join((*keys, *extra))})")
        if value is not None and (not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 1):
            raise InvalidOptionError(f"--{what.replace('_', '-')} must be a positive integer, got {value!r}")
    widths = {k: None if v is None else int(v) for k, v in widths.items()}  # NumPy integers as Python's
    for what, value in widths.items():
        if value is not None and what in keys:
            setattr(cfg, keys[what], value)
    _set_kv_heads(parent_config, cfg, widths.get("kv_heads"), widths.get("heads") is not None)
    if widths.get("layers") is not None:
        _set_depth(parent_config, cfg, widths["layers"])
    width = getattr(family_or_none(parent_config), "HEAD_WIDTH", None)
    if width and getattr(parent_config, width, None) is None:  # implicit in the parent: hidden / heads
        setattr(cfg, width, getattr(parent_config, keys["hidden"]) // getattr(parent_config, keys["heads"]))
    hidden, heads = getattr(cfg, keys["hidden"]), getattr(cfg, keys["heads"])
    if getattr(cfg, "head_dim", None) is None and hidden % heads:
        raise InvalidOptionError(f"hidden size {hidden} is not divisible by {heads} heads")
    return cfg


def _set_kv_heads(parent_config, cfg, kv, heads_given: bool) -> None:
    """Key/value heads of a target: given, or the parent's while they still
    divide the heads; heads must be a multiple of them."""
    if not hasattr(parent_config, "num_key_value_heads"):
        if kv is not None:
            raise InvalidOptionError(f"--kv-heads: {parent_config.model_type} has no grouped-query attention")
        return
    heads = cfg.num_attention_heads
    if kv is None:
        kv = kv_heads(parent_config)
        if heads % kv:
            raise InvalidOptionError(f"{heads} heads are not a multiple of the parent's {kv} key/value heads: "
                                     "give --kv-heads (a divisor of --heads)")
    elif heads % kv:
        raise InvalidOptionError(f"{heads} heads are not a multiple of {kv} key/value heads")
    cfg.num_key_value_heads = kv


def _set_depth(parent_config, cfg, layers: int) -> None:
    """A target of `layers` blocks; a family's per-block settings follow
    (its `set_depth`: Qwen2's attention types)."""
    cfg.num_hidden_layers = layers
    hook = getattr(family_or_none(parent_config), "set_depth", None)
    if hook is not None:
        hook(parent_config, cfg, layers)


def describe_widths(config) -> str:
    """Widths, then key/value heads where fewer than heads, and the depth."""
    parts = [f"{what} {value}" for what, value in resolved_widths(config).items()]
    if kv_heads(config) != config.num_attention_heads:
        parts.append(f"kv_heads {kv_heads(config)}")
    return ", ".join(parts + [f"layers {config.num_hidden_layers}"])


def check_token_filter(config, name) -> None:
    """A token filter checked against a config alone, before weights are read
    (a window larger than the patch grid raises here)."""
    make = getattr(family(config), "token_filter_for", None)
    if make is None:
        raise InvalidOptionError(f"token filter '{name}' only applies to vision transformers")
    make(config)(name, 0)


def wider_widths(target_cfg, parent_cfgs) -> list[tuple]:
    """(parent number, width name, parent's, target's) wherever the target is wider."""
    target = resolved_widths(target_cfg)
    return [(k, what, parent, target[what])
            for k, cfg in enumerate(parent_cfgs, 1) for what, parent in resolved_widths(cfg).items()
            if target[what] > parent]


def check_fold_target(target_cfg, parent_cfgs) -> None:
    """Folding clusters parent units into the target's: no target width may
    exceed a parent's (checked on configs, before any weights are read)."""
    from otcompress.errors import IncompatibleModelsError
    for k, cfg in enumerate(parent_cfgs, 1):
        if target_cfg.num_hidden_layers > cfg.num_hidden_layers:
            raise IncompatibleModelsError(f"cannot fold parent {k} ({cfg.num_hidden_layers} blocks) into a "
                                          f"deeper target ({target_cfg.num_hidden_layers} blocks)")
    for k, what, parent, target in wider_widths(target_cfg, parent_cfgs)[:1]:
        raise IncompatibleModelsError(f"cannot fold parent {k} ({what} {parent}) into a wider target "
                                      f"({what} {target})")
    for k, cfg in enumerate(parent_cfgs, 1):
        if hasattr(cfg, "num_key_value_heads") and kv_heads(target_cfg) > kv_heads(cfg):
            raise IncompatibleModelsError(f"cannot fold parent {k} ({kv_heads(cfg)} key/value heads) into a "
                                          f"target with more ({kv_heads(target_cfg)})")
