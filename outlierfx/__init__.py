"""outlierfx: outlier-aware quantization passes for transformer language models on torch.fx."""

from .errors import CaptureError, DataError, OutlierFXError, PassError
from .api import QuantizationReport, QuantizationResult, lower, quantize
from .graph import capture

__version__ = "0.1.0"
__all__ = [
    "CaptureError", "DataError", "OutlierFXError", "PassError", "QuantizationReport", "QuantizationResult",
    "capture", "quantize",
]
