"""Capture, canonical ops, graph views and numeric comparison."""

from .capture import CaptureReport, capture, count_ops
from .compare import OutputError, output_error
from .ops import OpKind, op_kind

__all__ = ["CaptureReport", "OpKind", "OutputError", "capture", "count_ops", "op_kind", "output_error"]
