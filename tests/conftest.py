"""Without a GPU, run the Triton kernels under the interpreter on CPU tensors.

This must happen before anything imports triton (the kernels read the flag at import),
so it lives here, ahead of every test module.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
