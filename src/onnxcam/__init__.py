"""onnxcam: Grad-CAM for any ONNX model, with gradients built from standard ONNX operators."""
from typing import TYPE_CHECKING

from .cam.targets import (ClassTarget, DetectionTarget, FinerTarget, IndexTarget, RegionTarget, ReSTTarget,
                          TopClass, top_classes)
from .errors import OnnxcamError, UnsupportedOpError

if TYPE_CHECKING:  # for type checkers and IDEs; at run time they load on first use (below)
    from .run.explainer import Explainer, Explanation

__version__ = "0.1.0"
__all__ = ["Explainer", "Explanation", "OnnxcamError", "UnsupportedOpError", "ClassTarget", "IndexTarget",
           "RegionTarget", "DetectionTarget", "TopClass", "top_classes", "FinerTarget", "ReSTTarget", "__version__"]


def __getattr__(name: str):
    # Loaded on first use so that the CLI can start (and say what to install) without onnxruntime.
    if name in ("Explainer", "Explanation"):
        from .run import explainer

        return getattr(explainer, name)
    raise AttributeError(f"module 'onnxcam' has no attribute '{name}'")


def __dir__():
    # The lazy names are not in globals() until first use; tab completion and dir() should list them anyway.
    return sorted(set(globals()) | set(__all__))
