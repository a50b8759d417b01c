"""The CLI run in-process, and the shape of a refusal: exit 2 and one `error:` line."""
import pytest

from otcompress.cli import main


def run(capsys, *args):
    """(exit code, stdout, stderr) of `otcompress ARGS`."""
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in args])
    out, err = capsys.readouterr()
    return e.value.code, out, err


def refused(code, err, *messages):
    """A user error: exit 2, one `error:` line holding every message, no traceback."""
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error:"), err
    assert all(m in lines[0] for m in messages), err


def anchor_and_wide(directory):
    """A small ViT `anchor` and a wider parent `wide` saved in `directory`; returns it."""
    import models as M
    M.vit(seed=1).save_pretrained(directory / "anchor")
    M.vit(hidden=48, heads=6, inter=96, seed=2).save_pretrained(directory / "wide")
    return directory
