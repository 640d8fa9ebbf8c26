"""fastdino: a fast, exact DINO training engine.

    from fastdino import DINOLoss   # drop-in for the official DINOLoss
"""
import importlib.util
import os
import sys


def _alias_kernels() -> None:
    """Installed, `kernels/` is `fastdino.kernels` (setup.py package_dir). From a plain checkout
    (no install), register the repository's kernels/ folder under that name."""
    try:
        if importlib.util.find_spec("fastdino.kernels") is not None:
            return
    except ImportError:
        pass
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "kernels")
    init = os.path.join(path, "__init__.py")
    if os.path.exists(init):
        spec = importlib.util.spec_from_file_location("fastdino.kernels", init, submodule_search_locations=[path])
        module = importlib.util.module_from_spec(spec)
        sys.modules["fastdino.kernels"] = module
        globals()["kernels"] = module
        spec.loader.exec_module(module)


_alias_kernels()

from fastdino.losses import DINOLoss  # noqa: E402

__all__ = ["DINOLoss"]
__version__ = "0.1.0"
