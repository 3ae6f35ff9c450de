"""End-to-end quality and latency of a quantized model against its FP32 original, for the report.

One function for the command line's ``demo`` and ``quantize``: quality on held-out text (embedding
cosine and Lee-50 for encoders, Wikipedia and news perplexity for decoders) and the median latency
of FP32 and int8 over interleaved runs in the same process, with sizes.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from .evaluate import DecoderEval, EncoderEval
from .models import LoadedModel
from .speed import SHAPES, interleaved_medians, speed_inputs, state_size_mb


@dataclasses.dataclass(frozen=True)
class Measurement:
    quality: dict[str, dict[str, float]]  # {"FP32": {...}, label: {...}}
    latency: dict[str, dict[str, float]]  # {"FP32": {"latency_ms", "ratio_vs_fp32", "size_mb"}, label: {...}}
    shape: tuple[int, int]  # (batch, sequence) the latency was measured on
    rounds: int

    def lines(self, label: str) -> list[str]:
        """Three short lines: quality, latency, size."""
        q, fp32 = self.quality[label], self.quality["FP32"]
        if "cosine" in q:
            quality = (f"embedding cosine vs FP32 {q['cosine']:.4f}; Lee-50 correlation {q['lee50']:.4f} "
                       f"(FP32 {fp32['lee50']:.4f})")
        else:
            quality = (f"perplexity wiki {q['ppl_wiki']:.2f} (FP32 {fp32['ppl_wiki']:.2f}), news {q['ppl_news']:.2f} "
                       f"(FP32 {fp32['ppl_news']:.2f})")
        t, t0 = self.latency[label], self.latency["FP32"]
        batch, seq = self.shape
        size = (f"size: FP32 {t0['size_mb']:.1f} MB -> int8 {t['size_mb']:.1f} MB (x{t['size_mb'] / t0['size_mb']:.2f})"
                if "size_mb" in t else f"size: FP32 {t0['size_mb']:.1f} MB")
        return [f"quality on held-out text: {quality}",
                f"latency, batch {batch} x {seq}, median of {self.rounds} interleaved runs: FP32 "
                f"{t0['latency_ms']:.1f} ms, int8 {t['latency_ms']:.1f} ms (x{t['ratio_vs_fp32']:.2f})", size]


# Held-out text: 64 Wikipedia paragraphs for encoders (a few seconds per model on MiniLM); 8
# windows of 256 tokens each of Wikipedia and news for decoders (about a minute on SmolLM2).
ENCODER_SENTENCES = 64
DECODER_WINDOWS = 8


def measure(loaded: LoadedModel, int8: torch.nn.Module, label: str, *, rounds: int = 10,
            size_mb: float | None = None) -> Measurement:
    """Quality and latency of ``int8`` (reported as ``label``) against ``loaded.model``.
    ``size_mb``: the int8 model's size on disk, where it was saved."""
    model = loaded.model.eval()
    if loaded.kind == "encoder":
        evaluator: Any = EncoderEval.build(loaded, sentences=ENCODER_SENTENCES)
        reference = evaluator.embeddings(model)
    else:
        evaluator, reference = DecoderEval.build(loaded, windows=DECODER_WINDOWS), None
    with torch.no_grad():
        quality = {"FP32": evaluator.metrics(model, reference), label: evaluator.metrics(int8, reference)}
    batch, seq = SHAPES[loaded.kind]
    seconds = interleaved_medians({"FP32": model, label: int8}, speed_inputs(loaded, batch, seq), rounds)
    fp32_ms, int8_ms = seconds["FP32"] * 1000, seconds[label] * 1000
    fp32_mb = round(state_size_mb(model), 1)
    latency = {"FP32": {"latency_ms": round(fp32_ms, 2), "ratio_vs_fp32": 1.0, "size_mb": fp32_mb},
               label: {"latency_ms": round(int8_ms, 2), "ratio_vs_fp32": round(int8_ms / fp32_ms, 3)}}
    if size_mb is not None:
        latency[label]["size_mb"] = round(size_mb, 1)
    return Measurement(quality, latency, (batch, seq), rounds)
