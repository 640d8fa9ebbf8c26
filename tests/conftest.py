"""Test setup: CPU-only runs interpret Triton kernels (TRITON_INTERPRET=1 must be set before any
kernel module is imported); the repository root is importable without installation."""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

try:
    import torch

    _has_cuda = torch.cuda.is_available()
except ImportError:  # pragma: no cover
    _has_cuda = False
if not _has_cuda:
    os.environ.setdefault("TRITON_INTERPRET", "1")
else:
    # tests compare fp32 paths with fp32/fp64 references: no TF32 convolutions under them (cuDNN's
    # default; the ViT's patch embed is a conv), as PyTorch already does for fp32 matmuls
    torch.backends.cudnn.allow_tf32 = False
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")


def pytest_configure(config):
    config.addinivalue_line("markers", "interpreted: runs Triton kernels on CPU tensors under the interpreter; "
                                       "skipped on a CUDA machine (its CUDA tests run the compiled kernels)")


def pytest_collection_modifyitems(config, items):
    if os.environ.get("TRITON_INTERPRET") == "1":
        return
    import pytest

    skip = pytest.mark.skip(reason="Triton kernels on CPU tensors need TRITON_INTERPRET=1 (not set on a CUDA "
                                   "machine: the CUDA tests cover the compiled kernels)")
    for item in items:
        if "interpreted" in item.keywords:
            item.add_marker(skip)


try:
    import pytest

    @pytest.fixture(autouse=True)
    def _no_tf32_matmuls():
        """resolve() applies train.allow_tf32 process-wide (the DINOv2 / DINOv3 configs set it): every
        test starts from PyTorch's default, fp32 matmuls in fp32, whatever an earlier test resolved."""
        torch.backends.cuda.matmul.allow_tf32 = False
        yield
except ImportError:  # pragma: no cover
    pass
