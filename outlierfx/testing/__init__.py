"""Test helpers that later passes reuse: generated transformer models (Hypothesis strategies)
and an equivalence assertion. Needs the ``test`` extra (hypothesis)."""

from .equivalence import assert_equivalent
from .models import FAMILIES, GeneratedModel, OutlierSpec, build_model, transformer_models

__all__ = ["FAMILIES", "GeneratedModel", "OutlierSpec", "assert_equivalent", "build_model", "transformer_models"]
