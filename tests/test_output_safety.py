"""Issue 18, items 1-2 and minors: `--out` never destroys what otcompress did
not write. `--force` replaces only a directory otcompress wrote (it holds
`outputs.MARKER`) or an empty one; never a file, a special file, a symbolic
link or one of the command's own inputs, and it says what it replaced."""
import os
from pathlib import Path

import pytest

import models as M
from otcompress import outputs
from clirun import anchor_and_wide, refused, run


@pytest.fixture(scope="module")
def z(tmp_path_factory):
    return anchor_and_wide(tmp_path_factory.mktemp("safety"))


def fuse(capsys, z, out, *extra, anchor=None, parent=None):
    return run(capsys, "fuse", "--anchor", anchor or z / "anchor", "--parents", parent or z / "wide",
               "--out", out, "--alignment", "weights", *extra)


def precious(tmp_path):
    d = tmp_path / "precious"
    d.mkdir()
    (d / "thesis.txt").write_text("four years of work")
    return d


def test_demo_never_deletes_a_users_directory(tmp_path, capsys):
    d = precious(tmp_path)
    for extra in ([], ["--force"]):
        code, _, err = run(capsys, "demo", "--quick", "--out", d, *extra)
        refused(code, err, "otcompress did not write it")
        assert (d / "thesis.txt").read_text() == "four years of work"


def test_demo_help_offers_force(capsys):
    code, out, _ = run(capsys, "demo", "--help")
    assert code == 0 and "--force" in out


@pytest.mark.parametrize("force", [[], ["--force"]])
def test_fuse_refuses_a_directory_it_did_not_write(z, tmp_path, capsys, force):
    d = precious(tmp_path)
    refused(*fuse(capsys, z, d, *force)[::2], "otcompress did not write it")
    assert sorted(p.name for p in d.iterdir()) == ["thesis.txt"]


def test_force_never_replaces_a_file_fifo_device_or_link(z, tmp_path, capsys):
    f = tmp_path / "notes.txt"
    f.write_text("keep")
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    refused(*fuse(capsys, z, f, "--force")[::2], "(a file)")
    refused(*fuse(capsys, z, fifo, "--force")[::2], "(a special file)")
    refused(*fuse(capsys, z, "/dev/null", "--force")[::2], "(a special file)")
    assert f.read_text() == "keep" and Path(fifo).is_fifo() and Path("/dev/null").is_char_device()
    # A link, even to a directory otcompress wrote: the link and its target stay.
    earlier = tmp_path / "earlier"
    assert fuse(capsys, z, earlier, "-q")[0] == 0
    link = tmp_path / "link"
    link.symlink_to(earlier)
    refused(*fuse(capsys, z, link, "--force")[::2], "is a symbolic link")
    assert link.is_symlink() and (earlier / "config.json").is_file()


def test_force_replaces_an_earlier_output_and_says_so(z, tmp_path, capsys):
    out = tmp_path / "fused"
    assert fuse(capsys, z, out, "-q")[0] == 0
    assert (out / outputs.MARKER).is_file()
    refused(*fuse(capsys, z, out)[::2], "already exists (pass --force to replace it)")
    (out / "README.md").write_text("edited")  # a file otcompress wrote: replaced
    code, _, err = fuse(capsys, z, out, "--force")
    assert code == 0, err
    assert f"--force: replacing {out}, an earlier otcompress output" in err
    assert (out / "README.md").read_text() != "edited" and (out / outputs.MARKER).is_file()


def test_force_never_deletes_a_file_a_user_put_into_an_earlier_output(z, tmp_path, capsys):
    """The marker lists what otcompress wrote: a user's notes, or the --data
    file of this very command, saved into an earlier output stop --force."""
    out = tmp_path / "fused"
    assert fuse(capsys, z, out, "-q")[0] == 0
    (out / "notes").mkdir()
    (out / "notes" / "NOTES.md").write_text("mine")
    refused(*fuse(capsys, z, out, "--force")[::2], "holds files otcompress did not write (notes, notes/NOTES.md)")
    assert (out / "notes" / "NOTES.md").read_text() == "mine"
    (out / "notes" / "NOTES.md").unlink()
    (out / "notes").rmdir()
    data = out / "texts.jsonl"  # the command's own --data file
    data.write_text("")
    refused(*fuse(capsys, z, out, "--force", "--data", data)[::2], "is an input of this command")
    assert data.is_file()


def test_force_never_replaces_an_input(z, tmp_path, capsys):
    # An otcompress output used as the parent, then as --out: refused, the parent intact.
    parent = tmp_path / "made-by-otcompress"
    assert fuse(capsys, z, parent, "-q")[0] == 0
    before = (parent / "model.safetensors").read_bytes()
    refused(*fuse(capsys, z, parent, "--force", parent=parent)[::2], "is an input of this command")
    # A directory holding an input (the anchor inside --out) is refused too.
    holder = tmp_path / "holder"
    assert fuse(capsys, z, holder, "-q")[0] == 0
    M.vit(seed=1).save_pretrained(holder / "anchor")
    refused(*fuse(capsys, z, holder, "--force", anchor=holder / "anchor")[::2], "is an input of this command")
    assert (parent / "model.safetensors").read_bytes() == before and (holder / "anchor" / "config.json").is_file()
    # finetune: its model and teachers are inputs.
    refused(*run(capsys, "finetune", parent, "--data", "digits", "--steps", "1", "--out", parent, "--force")[::2],
            "is an input of this command")


def test_empty_out_is_refused_before_any_work(z, capsys):
    refused(*fuse(capsys, z, "", "--force")[::2], "--out is empty")


def test_replace_rechecks_what_appeared_meanwhile(tmp_path):
    out = tmp_path / "late"
    with pytest.raises(outputs.InvalidOptionError, match="appeared while writing"):
        with outputs.staged_dir(out) as tmp:
            (tmp / "x").write_text("result")
            precious(tmp_path).rename(out)  # a user's directory arrives at --out mid-run
    assert (out / "thesis.txt").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".late")]


def test_replace_keeps_files_put_into_an_earlier_output_while_writing(tmp_path):
    out = tmp_path / "earlier"
    with outputs.staged_dir(out) as tmp:
        (tmp / "x").write_text("first")
    with pytest.raises(outputs.InvalidOptionError, match="got files otcompress did not write while it ran"):
        with outputs.staged_dir(out, force=True) as tmp:
            (tmp / "x").write_text("second")
            (out / "mine.txt").write_text("a user's")  # arrives mid-run
    assert (out / "mine.txt").is_file() and (out / "x").read_text() == "first"



def test_the_data_input_is_the_path_a_spec_reads():
    from otcompress.data import spec_path
    assert spec_path("digits") is None and spec_path("pydoc") is None and spec_path(None) is None
    assert spec_path("~/texts.jsonl") == os.path.expanduser("~/texts.jsonl")  # protected as read
