import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
# Small ops on a shared 2-core machine run far faster on one thread.
torch.set_num_threads(1)
