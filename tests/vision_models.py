"""torchvision and timm for the tests, on the CPU build of torch.

PyPI's torchvision wheels are built against CUDA torch: with ``torch==2.13.0+cpu`` their C++ extension does not load,
and ``import torchvision`` then fails on its fake-tensor registration of ``torchvision::nms`` and ``qnms``, whose
schemas the extension would have defined. :func:`import_torchvision` defines those two schemas first (no kernels: the
tests never run detection ops), so that the pure-Python model definitions of torchvision and timm import. Test-only.
"""

from __future__ import annotations

import importlib
import sys


def import_torchvision():
    """``import torchvision`` on a CPU-only torch (see the module docstring); None when it is not installed."""
    if "torchvision" in sys.modules and hasattr(sys.modules["torchvision"], "models"):
        return sys.modules["torchvision"]
    if importlib.util.find_spec("torchvision") is None:
        return None
    import torch

    if not hasattr(torch.ops.torchvision, "nms"):
        library = torch.library.Library("torchvision", "DEF")  # kept alive in _LIBRARIES
        library.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        library.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        _LIBRARIES.append(library)
    for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
        del sys.modules[name]  # a failed import earlier left half-initialized modules behind
    import torchvision

    return torchvision


def import_timm():
    """``import timm`` (it imports torchvision's FrozenBatchNorm2d)."""
    if import_torchvision() is None:
        return None
    import timm

    return timm


_LIBRARIES: list = []
