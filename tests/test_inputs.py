"""The inputs are checked once, at the entry (`otcompress.inputs.check`), before
any weights are read; what follows loads from the checked object and reads no
config again. A library user calling `fuse` gets the workflow's errors."""
import pytest
import transformers as T

import models as M
import otcompress
from otcompress import architectures, inputs, modelio, pipeline
from otcompress.errors import IncompatibleModelsError, InvalidOptionError
from otcompress.options import FuseOptions


@pytest.fixture
def no_weights(monkeypatch):
    """Fails the test if any weights are read."""
    monkeypatch.setattr(modelio, "load_model", lambda *a, **k: pytest.fail("weights were read"))
    monkeypatch.setattr(modelio, "lazy_model", lambda *a, **k: pytest.fail("weights were read"))


@pytest.fixture
def dirs(tmp_path):
    out = {}
    for name, model in (("bert", M.bert()), ("bert2", M.bert(seed=2)), ("base", M.bert(cls=T.BertModel, seed=3)),
                        ("narrow", M.bert(hidden=16, heads=2, inter=32, seed=4))):
        model.save_pretrained(tmp_path / name)
        out[name] = str(tmp_path / name)
    return out


def test_checked_object_holds_configs_and_resolved_options(dirs):
    given = inputs.check(dirs["bert"], [dirs["bert2"]], FuseOptions(reg=0.02, solver="emd", weights=[1, 3]))
    assert given.anchor_config.hidden_size == 32 and len(given.parent_configs) == 1
    assert given.family is architectures.family(given.anchor_config)
    assert given.qk == "shared" and given.weights == (0.25, 0.75) and given.foldable and not given.target


@pytest.mark.parametrize("anchor, parent, alignment, match", [
    ("bert", "base", "weights", "class mismatch: anchor is BertForMaskedLM, parent 1 is BertModel"),
    ("bert", "narrow", "fold", r"cannot fold parent 1 \(hidden 16\) into a wider target"),
])
def test_directories_refused_before_any_weights_are_read(dirs, no_weights, anchor, parent, alignment, match):
    with pytest.raises(IncompatibleModelsError, match=match):
        otcompress.fuse(dirs[anchor], [dirs[parent]], alignment=alignment)


def test_a_wider_anchor_is_foldable_false_not_an_error_for_ot(dirs):
    given = inputs.check(dirs["bert"], [dirs["narrow"]], FuseOptions(reg=0.02))
    assert not given.foldable and given.wider_widths()[0][:2] == (1, "hidden")


def test_a_target_config_needs_fold_or_prune_in_the_library_as_in_the_workflow():
    parent = M.bert()
    target = architectures.target_config(parent.config, hidden=16, heads=2)
    with pytest.raises(InvalidOptionError, match="alignment 'weights' needs an anchor's weights"):
        otcompress.fuse(target, [parent])
    with pytest.raises(InvalidOptionError, match="alignment 'weights' needs an anchor's weights"):
        pipeline.run(None, [parent], {"alignment": "weights"}, target={"hidden": 16, "heads": 2})


def test_each_config_is_read_once(dirs, monkeypatch):
    reads, real = [], T.AutoConfig.from_pretrained

    def spy(path, *a, **k):
        reads.append(str(path))
        return real(path, *a, **k)
    monkeypatch.setattr(T.AutoConfig, "from_pretrained", spy)
    otcompress.fuse(dirs["bert"], [dirs["bert2"]], alignment="fold")  # streamed parent, loaded anchor
    assert sorted(reads) == sorted([dirs["bert"], dirs["bert2"]])
    reads.clear()
    otcompress.fuse(dirs["bert"], [dirs["bert2"]], repair=True)  # both loaded whole
    assert sorted(reads) == sorted([dirs["bert"], dirs["bert2"]])


@pytest.mark.parametrize("option, value, match", [
    ("activation_dtype", "float16", "activation dtype 'float16'"),
    ("cost_norm", "median", "cost normalisation 'median'"),
    ("head_alignment", "heads", "head alignment 'heads'"),
    ("depth_merge", "average", "depth merge 'average'"),
])
def test_every_option_is_checked_at_the_entry_even_where_unused(option, value, match):
    with pytest.raises(InvalidOptionError, match=match):
        otcompress.fuse(M.bert(), [M.bert(seed=2)], **{option: value})
