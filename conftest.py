"""Runs before test_ofql.py is imported: without a GPU, Triton kernels can only run under Triton's CPU
interpreter, and TRITON_INTERPRET must be set before `triton.jit` decorates them (at `import kernels`,
which `import ofql` does). Nothing else in the suite uses Triton on the CPU (torch.compile's CPU backend
emits C++), so this changes only how kernels.py's kernels run. With a GPU the real kernels are tested."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
