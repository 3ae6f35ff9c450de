"""Exceptions raised for bad input or failed transformations.

Every error carries a message that names the problem and, where possible, the fix; the CLI
prints the message as one line instead of a traceback.
"""

from __future__ import annotations


class OutlierFXError(Exception):
    """Base class of every error outlierfx raises on purpose."""


class CaptureError(OutlierFXError):
    """The model could not be captured into an FX graph."""


class PassError(OutlierFXError):
    """A graph pass failed, or broke an invariant the pass manager checks."""


class DataError(OutlierFXError):
    """Inputs, calibration data or packaged resources are unusable."""


class SettingError(OutlierFXError, ValueError):
    """A setting has a value outlierfx does not accept (bit widths, a policy name, a size)."""


class SavedFormatError(OutlierFXError):
    """A saved model's files cannot be read by this outlierfx and torch (an unknown format
    version or op, a torch too old for its graph, a damaged file)."""


class ExportError(OutlierFXError):
    """A quantized model has a part the export format has no form for (e.g. an activation grid
    that ONNX's QuantizeLinear cannot express), or the ONNX packages are missing."""


class DistributedError(OutlierFXError):
    """A torch.distributed run that cannot go on as set up (ranks given different calibration
    batches, more ranks than batches, a statistic that depends on the order of the batches)."""


class OutlierFXWarning(UserWarning):
    """Something the user should know that does not stop the run (e.g. a recipe the backend
    cannot run as whole int8 GEMMs)."""
