import os
import sys

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads: see otcompress.cli
import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
# Tiny models on a shared 2-core machine run faster on one thread (every test module).
torch.set_num_threads(1)
# The CLI turns transformers' progress bars off for the process (cli_ui), so a test's own
# save_pretrained printed "Writing model shards" to stderr only when no CLI test had run
# before it in that worker: a one-line-error check then failed, depending on test order.
from transformers.utils import logging as _hf_logging  # noqa: E402

_hf_logging.disable_progress_bar()


import pytest  # noqa: E402


@pytest.fixture
def race_random_parents(monkeypatch):
    """Races with random parents, which are no better than a trained anchor:
    the recipe would not race a start made from them (`pipeline._too_far_behind`);
    tests of what a race does when it runs turn that rule off."""
    from otcompress import pipeline
    monkeypatch.setattr(pipeline, "_too_far_behind", lambda *losses: False)
