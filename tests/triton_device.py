"""Where the Triton kernel tests run: on CUDA, or on CPU through Triton's interpreter when
TRITON_INTERPRET=1 is set (a developer aid, slow). A test module that imports this first is
skipped on any other machine."""

import os

import pytest
import torch

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
if not (torch.cuda.is_available() or INTERPRET):
    pytest.skip("needs CUDA (or TRITON_INTERPRET=1)", allow_module_level=True)
pytest.importorskip("triton")

DEVICE = torch.device("cpu" if INTERPRET else "cuda")
