"""Without a GPU, run the Triton kernels under the interpreter on CPU tensors.

This must happen before anything imports triton (the kernels read the flag at import),
so it lives here, ahead of every test module.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _full_fp32():
    """fp32 matmuls and convolutions in full fp32 on a GPU for every test (the float32
    tolerances assume it; cuDNN allows TF32 by default), restored afterwards: the
    trainer turns TF32 on for its runs."""
    matmul, conv = torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32
    torch.set_float32_matmul_precision("highest")
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.set_float32_matmul_precision(matmul)
    torch.backends.cudnn.allow_tf32 = conv
