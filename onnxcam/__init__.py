"""onnxcam: Grad-CAM for any ONNX model, with gradients built from standard ONNX operators."""
from .errors import OnnxcamError, UnsupportedOpError
from .explainer import Explainer, Explanation

__version__ = "0.1.0"
__all__ = ["Explainer", "Explanation", "OnnxcamError", "UnsupportedOpError", "__version__"]
