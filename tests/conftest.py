import os

import torch

# The tests use tiny tensors: one intra-op thread is faster than two (no OpenMP hand-offs) and keeps the
# suite's timing stable on shared 2-core machines.
torch.set_num_threads(1)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
