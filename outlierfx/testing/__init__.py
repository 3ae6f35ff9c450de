"""Test helpers that later passes reuse: generated transformer models (Hypothesis strategies)
and an equivalence assertion. Needs the ``test`` extra (hypothesis)."""

from .equivalence import assert_equivalent, assert_tokens_close
from .models import (DECODER_FAMILIES, FAMILIES, MORE_FAMILIES, RMSNORM_FAMILIES, GeneratedModel, OutlierSpec, build_model,
                     first_token_grids_everywhere, saved_llama, transformer_models, word_tokenizer)

__all__ = ["DECODER_FAMILIES", "FAMILIES", "MORE_FAMILIES", "RMSNORM_FAMILIES", "GeneratedModel", "OutlierSpec",
           "assert_equivalent", "assert_tokens_close", "build_model", "first_token_grids_everywhere", "saved_llama",
           "transformer_models", "word_tokenizer"]
