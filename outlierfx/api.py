"""The one-call API: ``quantize(model, calibration, recipe=..., bits=...)``."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Mapping
from typing import Any, NamedTuple

import torch
import torch.fx

from .errors import DataError
from .graph import capture, meta
from .passes.audit import AuditTrail
from .passes.convert_fake_quant import ConvertToFakeQuant
from .passes.fuse_attention import FuseAttention
from .passes.insert_observers import InsertObservers, InsertObserversPlan
from .passes.lower import Lower
from .passes.manager import PassManager
from .passes.recipes import get_recipe
from .backends.registry import check_backend
from .quantizers.calibrate import calibrate
from .quantizers.policy import QuantPolicy, parse_bits


@dataclasses.dataclass(frozen=True)
class QuantizationReport:
    recipe: str
    bits: str
    policy: str
    audit: AuditTrail
    placement: InsertObserversPlan
    calibration_seconds: float
    calibration_batches: int
    backend: str = "fake-quant"

    def not_at_target(self) -> list[dict[str, Any]]:
        """Every role-bearing tensor that is not quantized at the target width, and why."""
        rows = []
        for p in self.placement.points:
            if p.reason is None:
                continue
            rows.append({
                "tensor": meta.module_path(p.node) or p.node.name,
                "node": p.node.name,
                "roles": sorted(r.value for r in p.roles),
                "quantization": p.spec.describe() if p.spec else "float",
                "why": p.reason,
            })
        return rows

    def as_dict(self) -> dict[str, Any]:
        return {
            "recipe": self.recipe,
            "bits": self.bits,
            "policy": self.policy,
            "backend": self.backend,
            "calibration_seconds": self.calibration_seconds,
            "calibration_batches": self.calibration_batches,
            "not_at_target": self.not_at_target(),
            "audit": self.audit.as_dict(),
        }

    def to_json(self) -> str:
        return json.dumps(self.as_dict(), indent=2)

    def to_text(self) -> str:
        rows = self.not_at_target()
        lines = [f"recipe {self.recipe}, {self.bits}, policy {self.policy}, backend {self.backend}; calibrated on "
                 f"{self.calibration_batches} batches in {self.calibration_seconds:.1f}s", self.audit.to_text()]
        if rows:
            lines.append(f"{len(rows)} tensors not at {self.bits}:")
            lines += [f"  {r['tensor']} [{', '.join(r['roles'])}]: {r['quantization']} ({r['why']})" for r in rows[:40]]
            if len(rows) > 40:
                lines.append(f"  ... {len(rows) - 40} more in the JSON report")
        return "\n".join(lines)


class QuantizationResult(NamedTuple):
    model: torch.nn.Module  # the fake-quant GraphModule, or the lowered int8 model with ``backend``
    report: QuantizationReport


def quantize(
    model: torch.nn.Module,
    calibration: Iterable[Mapping[str, torch.Tensor]],
    recipe: str = "naive",
    bits: str | int = "W8A8",
    policy: str | QuantPolicy | None = None,
    backend: str | None = None,
    *,
    progress: bool = True,
) -> QuantizationResult:
    """Capture ``model``, apply ``recipe``, calibrate on ``calibration`` and return the
    quantized model with its report: ``qmodel, report = quantize(...)``.

    ``calibration`` is an iterable of keyword-input dicts (e.g. tokenizer outputs); the first
    batch is the example for capture. ``backend=None`` returns the fake-quant graph
    (simulation); ``"x86"``, ``"fbgemm"`` or ``"qnnpack"`` lower it to torch.ao int8 kernels,
    ``"inductor"`` compiles it to fused oneDNN int8 kernels (on the first call), ``"reference"``
    gives the integer quantize/dequantize form. The input model is never modified.
    """
    batches = list(calibration)
    if not batches:
        raise DataError("the calibration set is empty")
    if backend is not None:
        check_backend(backend)
    first_mask = batches[0].get("attention_mask") if isinstance(batches[0], Mapping) else None
    if isinstance(first_mask, torch.Tensor) and not bool(first_mask.any()):
        raise DataError("the first calibration batch is all padding (attention_mask is all zeros)")
    chosen = get_recipe(recipe)
    widths = parse_bits(bits)
    quant_policy = chosen.policy(widths, policy)
    gm = capture(model, dict(batches[0]))
    prepared = PassManager([*chosen.prepare(), InsertObservers(quant_policy), *chosen.observe()])(gm)
    seconds = calibrate(prepared.graph_module, batches, progress=progress)
    finish = [*chosen.finish(batches, quant_policy, progress), ConvertToFakeQuant(quant_policy.weight, quant_policy.embedding)]
    converted = PassManager(finish)(prepared.graph_module)
    audit = AuditTrail(prepared.audit.entries + converted.audit.entries)
    placement = next(e.plan for e in audit.entries if isinstance(e.plan, InsertObserversPlan))
    report = QuantizationReport(chosen.name, str(widths), quant_policy.name, audit, placement, seconds, len(batches))
    if backend is not None:
        return lower(converted.graph_module, report, backend)
    return QuantizationResult(converted.graph_module, report)


def lower(qmodel: torch.fx.GraphModule, report: QuantizationReport, backend: str = "x86") -> QuantizationResult:
    """Lower a fake-quant model from :func:`quantize` to ``backend``; the report gains the
    ``FuseAttention`` pass (attention chains with no quantizer inside become one fused kernel)
    and the ``Lower`` pass (which Linears run in int8, which fall back to float, and why)."""
    check_backend(backend)
    lowered = PassManager([FuseAttention(), Lower(backend)])(qmodel)
    audit = AuditTrail(report.audit.entries + lowered.audit.entries)
    model: torch.nn.Module = lowered.graph_module
    if backend == "inductor":
        from .backends.inductor import CompiledInt8

        model = CompiledInt8(lowered.graph_module)
    return QuantizationResult(model, dataclasses.replace(report, audit=audit, backend=backend))
