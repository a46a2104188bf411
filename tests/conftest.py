# The Triton interpreter must be switched on before any module that defines @triton.jit kernels is imported,
# so this comes first, before torch, triton or trainlab are imported anywhere in the test session.
import os
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    # GPU tests are skipped, not deselected, on machines without CUDA; checked at run time, never at import
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(pytest.mark.skipif("not __import__('torch').cuda.is_available()", reason="needs a CUDA device"))


@pytest.fixture
def dev():
    "Device for forced-Triton tests: CPU under the interpreter, else CUDA with compiled kernels, else skip."
    from trainlab.kernels.utils import interpreting  # imported here, after TRITON_INTERPRET is set above
    if interpreting(): return "cpu"
    if torch.cuda.is_available(): return "cuda"
    pytest.skip("impl='triton' needs TRITON_INTERPRET=1 (set before import) or a CUDA device")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
    if torch.cuda.is_available(): torch.cuda.empty_cache()
