"""Run the Triton kernels in Triton's CPU interpreter when there is no GPU.

TRITON_INTERPRET is read when a kernel is decorated, i.e. when ``sinkhorn_hf.attention.triton`` first imports its
kernels (on the first call, not at package import). Setting it here, at collection of this folder, comes before
any test runs; if some module decorated the kernels for the GPU earlier on a machine without one,
``triton_unsupported_reason`` says so and the tests fail with that message rather than skip.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
