"""One small data file per model family; the engine, profiling, export and
data look them up by model type (what a family file defines: see `common`)."""
from otcompress.architectures import bert, distilbert, roberta, vit
from otcompress.errors import UnsupportedArchitectureError

FAMILIES = {m.MODEL_TYPE: m for m in (vit, bert, roberta, distilbert)}


def supported() -> dict:
    """{model type: [model classes fusion accepts]}, for listings."""
    return {t: list(m.MODEL_CLASSES) for t, m in FAMILIES.items()}


def family(config):
    fam = FAMILIES.get(getattr(config, "model_type", None))
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
    fam = check_class(model)
    keys = set(model.state_dict().keys())
    spec = fam.build(model.config, keys, qk=qk)
    unknown = sorted(keys - set(spec.axes) - set(spec.tied))
    if unknown:
        # Fail loudly: silently skipping a tensor would leave it unfused.
        raise UnsupportedArchitectureError(
            f"{name_of(model)} has parameters the {fam.MODEL_TYPE} description does not know: "
            f"{', '.join(unknown[:5])}{' ...' if len(unknown) > 5 else ''}")
    missing = sorted(set(spec.axes) - keys)
    if missing:
        raise UnsupportedArchitectureError(
            f"{name_of(model)} lacks parameters the {fam.MODEL_TYPE} description expects "
            f"(another transformers version?): {', '.join(missing[:5])}")
    return spec


def name_of(model):
    return type(model).__name__
