"""torchvision's pure-torch transforms beside a CPU torch its compiled ops were not built for, for reference tests.

transformers 5 runs its default image and video processors (`LlavaOnevisionVideoProcessor`,
`LlavaNextVideoVideoProcessor`, `LlavaOnevisionImageProcessor` ...) through torchvision. PyPI's torchvision wheel
(pinned in setup.py's "test" extra) is built against the CUDA torch: its `_C` extension (nms, roi_align, ...) cannot
load beside the CPU torch used here, and torchvision's `_meta_registrations` then fails on import with "operator
torchvision::nms does not exist", because it registers fake kernels for `torchvision::nms` and `torchvision::qnms`
whether or not the extension loaded. Defining those two operator names (schema only: they are never called) lets
torchvision import, without its compiled ops, and its transforms (resize, crop, normalize: plain torch) run.

    from tests._torchvision import torchvision_or_skip
    torchvision_or_skip()  # before importing transformers' torchvision-backed processors

`prepare()` must run before anything imports transformers' image or video processors in the process, since
transformers imports torchvision as soon as it is installed: tests/conftest.py calls it at startup.
"""

from __future__ import annotations

import glob
import importlib.machinery
import importlib.util
import os
import sys
from types import ModuleType

# The operators torchvision/_meta_registrations.py registers fake kernels for unconditionally (its other
# registrations check that the extension loaded). Schemas as in torchvision's csrc/ops/nms.cpp.
_PLACEHOLDER_OPS = ("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
                    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
_library = None  # the torch.library.Library holding the placeholders: dropping it would undefine them
_absent: str | None = None  # prepare()'s answer, once known


def _extension_loads(package_dir: str) -> bool:
    import torch

    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        for path in glob.glob(os.path.join(package_dir, "_C" + suffix)):
            try:
                torch.ops.load_library(path)
                return True
            except OSError:  # built for another torch (here: the CUDA one)
                return False
    return False


def prepare() -> str:
    """Makes an installed torchvision importable (defines the placeholder ops if its extension cannot load).

    Imports torch only when torchvision is installed, and torchvision not at all. Returns "" when torchvision is
    installed, else why it is not (a skip reason).
    """
    global _library, _absent
    if _absent is not None:
        return _absent
    if "torchvision" not in sys.modules:
        spec = importlib.util.find_spec("torchvision")
        if spec is None or not spec.submodule_search_locations:
            _absent = ("torchvision is not installed (the test extra leaves it out: setup.py says why; "
                       "pip install torchvision==0.28.0)")
            return _absent
        import torch

        if not _extension_loads(list(spec.submodule_search_locations)[0]):
            _library = torch.library.Library("torchvision", "DEF")
            for schema in _PLACEHOLDER_OPS:
                _library.define(schema)
    _absent = ""
    return _absent


def torchvision_or_skip() -> ModuleType:
    """torchvision (see prepare), or skips the calling test (or module, at import) when it is not installed.

    A torchvision that is installed but fails to import for another reason raises: that is a broken environment,
    not a missing optional package.
    """
    import pytest

    why = prepare()
    if why:
        pytest.skip(why, allow_module_level=True)
    import torchvision

    return torchvision
