"""Issue 18's minor findings: each fails without its fix."""
import json
import os
import resource
import signal
import stat
from contextlib import contextmanager

import pytest
import torch
import yaml
from transformers import BertConfig, BertForSequenceClassification

import models as M
from clirun import anchor_and_wide, refused, run
from otcompress import outputs
from otcompress.data import pydoc_paragraphs, train_wordpiece_tokenizer


@pytest.fixture(scope="module")
def z(tmp_path_factory):
    return anchor_and_wide(tmp_path_factory.mktemp("minor"))


def test_json_prints_one_error_object(z, tmp_path, capsys):
    code, out, err = run(capsys, "fuse", "--anchor", z / "anchor", "--parents", z / "wide", "--out", tmp_path / "o",
                         "--reg", "nan", "--json")
    assert code == 2 and err.startswith("error:")
    assert json.loads(out) == {"error": err.strip().removeprefix("error: "), "exit_code": 2}


def test_huge_steps_are_refused(z, tmp_path, capsys):
    refused(*run(capsys, "fuse", "--anchor", z / "anchor", "--parents", z / "wide", "--out", tmp_path / "o",
                 "--steps", "99999999999999999999")[::2], "is not an integer in [0, 100_000_000]")


@contextmanager
def file_size_limit(nbytes):
    """Writes past `nbytes` fail with EFBIG, as a full disk fails them with
    ENOSPC (a real OS error, also inside safetensors' writer); only the soft
    limit is lowered, so it can be restored."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the error, not the signal's kill
    resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, handler)


def test_safetensors_write_past_the_limit_is_a_user_error_naming_out(tmp_path):
    from safetensors.torch import save_file
    with pytest.raises(outputs.InvalidOptionError, match="cannot write there .File too large"):
        with outputs.writing(tmp_path / "out"), file_size_limit(4096):
            save_file({"w": torch.zeros(10_000)}, str(tmp_path / "w.safetensors"))


def test_cli_streamed_fuse_past_the_file_size_limit_exits_2_in_one_line(z, tmp_path, capsys):
    with file_size_limit(32_768):  # the text files fit, the weights (~77 kB) do not
        code, out, err = run(capsys, "fuse", "--anchor", z / "anchor", "--parents", z / "wide",
                             "--out", tmp_path / "o", "-q")
    assert code == 2 and err.count("\n") == 1 and "File too large" in err, err
    assert not (tmp_path / "o").exists()


@pytest.mark.skipif(not (os.path.exists("/dev/full") and stat.S_ISCHR(os.stat("/dev/full").st_mode)),
                    reason="no /dev/full device here (opening it would create a plain file)")
def test_disk_full_is_a_user_error_naming_out(tmp_path):
    with pytest.raises(outputs.InvalidOptionError, match="cannot write there .No space left on device"):
        with outputs.writing(tmp_path / "out"):
            with open("/dev/full", "w") as f:  # a real ENOSPC, as a full disk gives
                f.write("x")
                f.flush()


def test_anchor_free_fold_card_and_config_say_fold(z, tmp_path, capsys):
    out = tmp_path / "folded"
    assert run(capsys, "fuse", "--parents", z / "wide", "--hidden", "32", "--heads", "4", "--intermediate", "64",
               "--out", out, "-q")[0] == 0
    card = (out / "README.md").read_text()
    assert "clustered (folded)" in card and "aligned to the anchor" not in card and "anchor first" not in card
    assert "- target: `target hidden 32" in card and "- target hidden" not in card.split("---")[1]
    assert yaml.safe_load((out / "otcompress_config.yaml").read_text())["alignment"] == "fold"


def test_reports_are_strict_json_with_no_nan(tmp_path):
    """A NaN or Inf anywhere in a report (a diverged held-out loss, a tensor)
    is written as null: strict JSON readers refuse NaN."""
    import json
    import torch
    from otcompress import outputs
    path = tmp_path / "r.json"
    outputs.write_json(path, {"loss": float("nan"), "rows": [{"x": float("inf")}, 1.5], "t": torch.tensor([1.0, float("nan")])})

    def refuse(constant):
        raise ValueError(constant)
    assert json.loads(path.read_text(), parse_constant=refuse) == {"loss": None, "rows": [{"x": None}, 1.5],
                                                                     "t": [1.0, None]}


def test_a_pruned_start_card_says_pruned_from_one_parent(z, tmp_path, capsys):
    """A prune of one parent into the anchor's shape (as the race may choose)
    used no anchor weights: the card must not say it was averaged into them."""
    out = tmp_path / "pruned"
    assert run(capsys, "fuse", "--anchor", z / "anchor", "--parents", z / "wide", "--alignment", "prune",
               "--out", out, "-q")[0] == 0
    card = (out / "README.md").read_text()
    assert "One parent's most important units were kept (pruned)" in card and "no anchor's weights" in card
    assert "averaged into the anchor" not in card and "anchor first" not in card
    assert "- built from one parent (its weight 1)" in card and "- anchor (its shape only): `" in card
    assert yaml.safe_load(card.split("---")[1])["base_model"] == [str(z / "wide")]  # no anchor weights in it


@pytest.mark.parametrize("command", ["eval", "export", "profile", "families", "profiles", "demo", "fuse",
                                     "finetune"])
def test_every_command_help_has_examples(capsys, command):
    code, out, _ = run(capsys, command, "--help")
    assert code == 0 and "Examples:" in out and f"otcompress {command}" in out.split("Examples:")[1]


def test_residual_has_help(capsys):
    out = run(capsys, "fuse", "--help")[1]
    assert "Residual joins" in out


def test_unlabelled_text_for_a_classifier_is_refused_before_fusion(tmp_path, capsys):
    texts = pydoc_paragraphs("train")[:200]
    tok = train_wordpiece_tokenizer(texts, 300, tmp_path / "anchor")
    for name, hidden in (("anchor", 32), ("wide", 48)):
        torch.manual_seed(hidden)
        BertForSequenceClassification(BertConfig(vocab_size=len(tok), hidden_size=hidden, num_hidden_layers=1,
                                                 num_attention_heads=4, intermediate_size=2 * hidden,
                                                 num_labels=2)).save_pretrained(tmp_path / name)
    tok.save_pretrained(tmp_path / "wide")
    (tmp_path / "texts.txt").write_text("\n".join(texts))
    code, _, err = run(capsys, "fuse", "--anchor", tmp_path / "anchor", "--parents", tmp_path / "wide",
                       "--out", tmp_path / "o", "--data", tmp_path / "texts.txt", "--steps", "5")
    refused(code, err, "has no labels", "--steps 0")
    assert not (tmp_path / "o").exists()
