import os
import sys

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads: see otcompress.cli
import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
# Tiny models on a shared 2-core machine run faster on one thread (every test module).
torch.set_num_threads(1)
