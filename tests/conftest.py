import os

import torch

# The tests use tiny tensors: one intra-op thread is faster than two (no OpenMP hand-offs) and keeps the
# suite's timing stable on shared 2-core machines. DMD_DAR_TEST_THREADS=2 runs it on two threads (the suite must pass
# on either: tolerances are derived from dtypes and sizes, not from one machine's summation order).
torch.set_num_threads(int(os.environ.get("DMD_DAR_TEST_THREADS", "1")))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
