"""The one-call API: ``qmodel, report = quantize(model, calibration)``, and ``lower``."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import uuid
import warnings
from collections.abc import Callable, Iterable, Mapping
from os import PathLike
from typing import Any, NamedTuple

import torch
import torch.fx

from . import distributed
from .errors import CaptureError, DataError, OutlierFXWarning, SettingError
from .generation import QuantizedCausalLM, first_token_rows, is_causal_lm
from .graph import capture, meta
from .graph.inputs import as_keyword_batch, check_keyword_inputs, check_model_weights
from .graph.kv_cache import CachedDecoder, prefill_batches
from .memory import freed_memory_returned_at_once, return_freed_memory
from .passes.audit import AuditTrail
from .passes.insert_observers import InsertObserversPlan
from .passes.lower import lower_model
from .quantizers.policy import QuantPolicy, parse_bits
from .recipes import SIMULATED, BackendFit, Recipe, backend_fit, choose, run_recipe


@dataclasses.dataclass(frozen=True)
class RunGraphs:
    """The graphs of a run the audit report reads (never serialized): the captured float graph,
    which shares the user's weights, and the calibrated fake-quant graph."""

    captured: torch.fx.GraphModule
    simulated: torch.fx.GraphModule


@dataclasses.dataclass(frozen=True)
class QuantizationReport:
    """What a :func:`quantize` run did: the recipe (and the preset and why, where one was chosen),
    the audit trail of every pass, where quantizers went, and, once measured, the end-to-end
    quality and latency (:meth:`with_measurements`)."""

    recipe: str
    bits: str
    policy: str
    audit: AuditTrail
    placement: InsertObserversPlan
    calibration_seconds: float
    calibration_batches: int
    backend: str = SIMULATED
    preset: str | None = None  # "fast" / "accurate" where quantize() chose the recipe
    why: str | None = None  # why that recipe on that backend
    backend_fit: BackendFit | None = None  # checked before calibration
    run_id: str = ""  # the fake-quant graph of this run carries the same id (meta.GM_RUN_ID)
    quality: Mapping[str, Any] | None = None  # e.g. {"FP32": {...}, "int8 (onednn)": {"cosine": ...}}
    latency: Mapping[str, Any] | None = None  # e.g. {"FP32": {"latency_ms": ...}, ...}
    notes: tuple[str, ...] = ()  # what the user should know about the run (e.g. a capture with static shapes)
    graphs: RunGraphs | None = dataclasses.field(default=None, repr=False, compare=False)

    def kept_float(self) -> list[dict[str, Any]]:
        """Role-bearing tensors the policy keeps float by design (not quantized at all)."""
        return [self._row(p) for p in self.placement.points if p.reason is not None and p.spec is None]

    def not_at_target(self) -> list[dict[str, Any]]:
        """Quantized tensors at another width than the target (e.g. ``mp16``'s 16-bit residual sums)."""
        return [self._row(p) for p in self.placement.points if p.reason is not None and p.spec is not None]

    @staticmethod
    def _row(p: Any) -> dict[str, Any]:
        return {"tensor": meta.module_path(p.node) or p.node.name, "node": p.node.name,
                "roles": sorted(r.value for r in p.roles),
                "quantization": p.spec.describe() if p.spec else "float", "why": p.reason}

    def with_measurements(self, quality: Mapping[str, Any] | None = None,
                          latency: Mapping[str, Any] | None = None) -> QuantizationReport:
        """This report with the run's end-to-end quality and latency (shown by the audit report)."""
        return dataclasses.replace(self, quality=quality if quality is not None else self.quality,
                                   latency=latency if latency is not None else self.latency)

    def as_dict(self) -> dict[str, Any]:
        from .passes.audit import to_jsonable

        return {
            "recipe": self.recipe,
            "preset": self.preset,
            "why": self.why,
            "bits": self.bits,
            "policy": self.policy,
            "notes": list(self.notes),
            "backend": self.backend,
            "backend_fit": to_jsonable(self.backend_fit),
            "calibration_seconds": self.calibration_seconds,
            "calibration_batches": self.calibration_batches,
            "quality": to_jsonable(self.quality),
            "latency": to_jsonable(self.latency),
            "kept_float": self.kept_float(),
            "not_at_target": self.not_at_target(),
            "audit": self.audit.as_dict(),
        }

    def to_json(self) -> str:
        return json.dumps(self.as_dict(), indent=2)

    def headline(self, why: bool = True) -> str:
        """One line: which recipe on which backend (and, with ``why``, why it was chosen)."""
        chosen = f"preset {self.preset} -> recipe {self.recipe}" if self.preset else f"recipe {self.recipe}"
        line = f"{chosen}, {self.bits}, policy {self.policy}, backend {self.backend}"
        return line + (f" ({self.why})" if why and self.why else "")

    def to_text(self) -> str:
        lines = [self.headline(), *(f"note: {note}" for note in self.notes),
                 f"calibrated on {self.calibration_batches} batches in {self.calibration_seconds:.1f}s",
                 self.audit.to_text()]
        if self.backend_fit is not None and not self.backend_fit.whole_int8:
            lines.append(self.backend_fit.summary())
        kept = self.kept_float()
        if kept:
            lines.append(f"{len(kept)} tensors kept float by policy {self.policy} (by design; listed in the JSON "
                         f"report)")
        wide = self.not_at_target()
        if wide:
            lines.append(f"{len(wide)} tensors not at {self.bits}:")
            lines += [f"  {r['tensor']} [{', '.join(r['roles'])}]: {r['quantization']} ({r['why']})" for r in wide[:40]]
            if len(wide) > 40:
                lines.append(f"  ... {len(wide) - 40} more in the JSON report")
        return "\n".join(lines)


class QuantizationResult(NamedTuple):
    # the fake-quant GraphModule, or the lowered int8 model with ``backend``; for a causal LM a
    # QuantizedCausalLM holding that graph (``.graph``)
    model: torch.nn.Module
    report: QuantizationReport


def quantize(
    model: torch.nn.Module | str | PathLike,
    calibration: Iterable[Mapping[str, torch.Tensor]],
    recipe: str | Recipe | None = None,
    bits: str | int = "W8A8",
    policy: str | QuantPolicy | None = None,
    backend: str | None = None,
    *,
    tokenizer: Any = None,
    generation: bool = True,
    progress: bool = True,
    low_memory: bool = False,
) -> QuantizationResult:
    """Capture ``model``, apply a recipe, calibrate on ``calibration`` and return the quantized
    model with its report: ``qmodel, report = quantize(model, calibration)``.

    ``calibration`` is an iterable of keyword-input dicts (e.g. tokenizer outputs), or of tuples
    of positional inputs for a model that takes tensors by position; the first batch is the
    example for capture. The input model is never modified; a float16/bfloat16 model is
    quantized through a float32 copy (the report's notes say so).

    The backend comes first. With no ``recipe`` (or ``recipe="fast"``/``"accurate"``, the
    presets) the model is lowered to ``backend`` (default: this CPU's best,
    :func:`outlierfx.backends.default_backend`) with the preset chosen for it, and the report
    says which recipe and why. A named paper recipe (``naive``, ``os``, ``peg``, ``quadapter``,
    ``smooth-fold+sink``...) or a :class:`~outlierfx.recipes.Recipe` object returns the
    simulated (fake-quant) model unless ``backend`` is given; ``backend="fake-quant"`` simulates
    a preset. A recipe whose Linears the backend cannot run as whole int8 GEMMs is flagged
    before calibration (an :class:`OutlierFXWarning`, and ``report.backend_fit``).

    A Hugging Face causal LM (:func:`~outlierfx.generation.is_causal_lm`, e.g. from
    ``AutoModelForCausalLM``) comes back as a :class:`~outlierfx.generation.QuantizedCausalLM`
    that generates with a KV cache: ``qmodel.generate(input_ids, max_new_tokens=...)``,
    ``qmodel(input_ids, attention_mask).logits``; ``qmodel.graph`` is the quantized graph (one
    graph with a static KV cache for the prompt and every decode step: one set of quantization
    parameters), and ``tokenizer`` is kept on it (``outlierfx.save`` writes it alongside).
    ``generation=False`` quantizes a causal LM's one-pass forward instead (``use_cache=False``:
    logits of a fixed window, no cache) and returns that GraphModule, as for any other model:
    what scores fixed windows, exports to ONNX or benchmarks prefill latency.

    Under torch.distributed (e.g. ``torchrun --nproc-per-node N``) every rank passes the same
    ``calibration``; each calibrates its share of the batches and all end with the same model:
    the one a single process would make where the recipe only collects statistics, and, where
    it trains (Quadapter, learned ranges, QAT), one trained on gradients averaged across ranks
    in fewer, larger steps (docs/distributed.md); progress shows on rank 0 only.

    ``low_memory=True`` quantizes a model that is never loaded: ``model`` is then the folder it
    was saved in with ``save_pretrained`` (safetensors weights), and the graph is captured
    without weights and calibrated, converted and lowered one decoder block's weights at a time
    (a fraction of the normal run's peak memory; docs/experiments/memory.md).
    It needs a backend (the result is always the lowered model) and a recipe whose passes run
    without the weights in memory (``low_memory.WEIGHT_FREE_PASSES``: every preset's passes, the
    rotations, Quadapter trained block by block and folded, learned ranges, token-wise clipping,
    GPTQ, observers, PEG groups and calibration); QAT (it trains the weights) is refused before
    calibration.
    """
    with freed_memory_returned_at_once() if low_memory else contextlib.nullcontext():
        return _quantize(model, calibration, recipe, bits, policy, backend, tokenizer=tokenizer, generation=generation,
                         progress=progress, low_memory=low_memory)


def _quantize(
    model: torch.nn.Module | str | PathLike,
    calibration: Iterable[Mapping[str, torch.Tensor]],
    recipe: str | Recipe | None,
    bits: str | int,
    policy: str | QuantPolicy | None,
    backend: str | None,
    *,
    tokenizer: Any,
    generation: bool,
    progress: bool,
    low_memory: bool,
) -> QuantizationResult:
    """The body of :func:`quantize` (which returns freed memory at once around a low-memory run)."""
    progress = progress and distributed.is_main()
    folder = None
    if low_memory:
        from . import low_memory as weight_free

        folder = weight_free.folder_of(model)
        model = weight_free.model_without_weights(folder)  # on the meta device: its config, its forward's inputs
    batches = _checked_batches(model, calibration, weights_loaded=folder is None)
    widths = parse_bits(bits)
    choose(recipe, backend)[0].policy(widths, policy)  # a bad recipe, backend or policy fails before the capture
    if folder is not None:
        weight_free.check_before_capture(recipe, backend)
    decoder = generation and is_causal_lm(model)
    if tokenizer is not None and not decoder:
        raise SettingError(f"tokenizer= is kept on the generating model of a causal LM; {type(model).__name__} "
                           f"{'is not one' if generation else 'was quantized with generation=False'}: save the "
                           f"tokenizer with the model instead, outlierfx.save(qmodel, DIR, tokenizer=tokenizer)")
    if folder is None:
        model, batches, dtype_notes = _in_float32(model, batches)
        capture_graph = _capturing(model)
        memory_notes: tuple[str, ...] = ()
    else:
        batches, dtype_notes = _float32_batches(batches, weight_free.checkpoint_dtypes(folder),
                                                "it in float32 (each tensor loaded as float32)")
        capture_graph = weight_free.capturing(folder)
        memory_notes = (weight_free.NEVER_LOADED,)
    gm, fallback_notes = None, ()
    if decoder:
        gm, batches, fallback_notes = _capture_with_cache(model, batches, capture_graph)
        decoder = gm is not None
    if gm is None:
        gm = capture_graph(batches[0], None)
    chosen, target, chosen_preset = choose(recipe, backend, gm, widths)  # a preset follows the model's structure and bits
    if folder is not None:
        weight_free.check_runs_weight_free(chosen)  # before any calibration time is spent
    quant_policy = chosen.policy(widths, policy)
    fits: list[BackendFit] = []

    def flag(graph: torch.fx.GraphModule, _placement: InsertObserversPlan) -> None:
        fit = backend_fit(graph, target, quant_policy.weight)
        fits.append(fit)
        if not fit.whole_int8:
            warnings.warn(f"recipe {chosen.name!r} on {target}: {fit.summary()}", OutlierFXWarning, stacklevel=5)

    run = run_recipe(gm, chosen, quant_policy, batches, progress=progress,
                     before_calibration=flag if target is not None else None)
    run_id = uuid.uuid4().hex
    run.graph_module.meta[meta.GM_RUN_ID] = run_id
    config = getattr(model, "config", None)
    if hasattr(config, "to_json_string"):  # a Hugging Face model: outlierfx.save writes its config.json
        run.graph_module.meta[meta.GM_HF_CONFIG] = config.to_json_string()
    report = QuantizationReport(
        chosen.name, str(widths), quant_policy.name, run.audit, run.placement, run.calibration_seconds, len(batches),
        preset=chosen_preset.goal.value if chosen_preset else None, why=chosen_preset.why if chosen_preset else None,
        backend_fit=fits[0] if fits else None, run_id=run_id,
        notes=memory_notes + dtype_notes + fallback_notes + gm.meta[meta.GM_CAPTURE_REPORT].notes
        + ((distributed.describe(),) if distributed.active() else ()),
        graphs=RunGraphs(gm, run.graph_module))
    qmodel: torch.nn.Module = run.graph_module
    if decoder:
        qmodel = QuantizedCausalLM(qmodel, model.config, first_token_rows(qmodel), tokenizer)
    if target is not None:
        return lower(qmodel, report, target, progress=progress)
    return_freed_memory()
    return QuantizationResult(qmodel, report)


# (example, wrap) -> the graph of the model, or of wrap(model) (e.g. CachedDecoder), captured on example
_CaptureGraph = Callable[[Any, Callable[[torch.nn.Module], torch.nn.Module] | None], torch.fx.GraphModule]


def _capturing(model: torch.nn.Module) -> _CaptureGraph:
    """``capture(example, wrap)`` for a loaded ``model`` (or ``wrap(model)``)."""
    return lambda example, wrap: capture(model if wrap is None else wrap(model), example)


def _capture_with_cache(model: torch.nn.Module, batches: list[dict[str, Any]], capture_graph: _CaptureGraph
                        ) -> tuple[torch.fx.GraphModule | None, list[dict[str, Any]], tuple[str, ...]]:
    """The graph of ``model`` (a causal LM) with an explicit static KV cache
    (:class:`~outlierfx.graph.kv_cache.CachedDecoder`), captured on the first batch in the cache's
    form, with every batch in that form (prompts from an empty cache of their own length, one
    shared by the batches of a shape). The
    batches were checked against ``model`` already, so a failure here (the model run with the
    cache wrapper, or its export) is the wrapper's: then ``(None, batches, note)``, a warning
    says so, and the caller quantizes the one-pass forward as for ``generation=False``."""
    cached = prefill_batches(model.config, batches)
    try:
        return capture_graph(cached[0], CachedDecoder), cached, ()
    except (CaptureError, DataError) as exc:
        reason = str(exc).strip().splitlines()[0]
        note = (f"{type(model).__name__} could not be captured with a KV cache for generation ({reason}); "
                f"outlierfx quantized its one-pass forward instead: the model scores fixed windows and has no "
                f"generate() (quantize(..., generation=False) makes this choice without trying)")
        warnings.warn(note, OutlierFXWarning, stacklevel=4)
        return None, batches, (note,)


def _in_float32(model: torch.nn.Module, batches: list[dict[str, Any]]
                ) -> tuple[torch.nn.Module, list[dict[str, Any]], tuple[str, ...]]:
    """A float32 copy of a float16/bfloat16 model, and its batches' float tensors in float32.

    Observers need float32 statistics (a bfloat16 sum of squares over a batch loses the small
    channels next to the outliers) and the int8 kernels take and return float32 activations; the
    user's model is not changed. Returns the note the report shows, or none for a float32 model."""
    dtypes = {t.dtype for t in [*model.parameters(), *model.buffers()] if t.is_floating_point()}
    if dtypes <= {torch.float32}:
        return model, batches, ()
    batches, notes = _float32_batches(batches, dtypes, "a float32 copy of it")
    return copy.deepcopy(model).float(), batches, notes


def _float32_batches(batches: list[dict[str, Any]], model_dtypes: set[torch.dtype], what: str
                     ) -> tuple[list[dict[str, Any]], tuple[str, ...]]:
    """For a model in ``model_dtypes`` other than float32, its batches' float tensors in float32
    and the note the report shows (none for a float32 model); ``what`` outlierfx quantized."""
    low = sorted(str(d).removeprefix("torch.") for d in model_dtypes if d != torch.float32)
    if not low:
        return batches, ()
    batches = [{k: v.float() if isinstance(v, torch.Tensor) and v.is_floating_point() else v for k, v in b.items()}
               for b in batches]
    note = (f"the model is in {', '.join(low)}: outlierfx captured, calibrated and quantized {what} "
            f"(float32 statistics; the int8 kernels take float32 activations); the quantized model returns float32")
    return batches, (note,)


def _checked_batches(model: torch.nn.Module, calibration: Iterable[Any], weights_loaded: bool = True
                     ) -> list[dict[str, Any]]:
    """The calibration batches as keyword inputs, each checked before any tracing (the first is
    the example for capture); ``model`` may be on the meta device where not ``weights_loaded``
    (a low-memory run: its names, vocabulary and config are checked, not its weights)."""
    if not isinstance(model, torch.nn.Module):
        hint = " (or the folder of a saved model with low_memory=True)" if isinstance(model, (str, PathLike)) else ""
        raise DataError(f"quantize expects a torch.nn.Module{hint}, got {type(model).__name__}")
    if weights_loaded:
        check_model_weights(model)
    batches = [as_keyword_batch(model, batch, i) for i, batch in enumerate(calibration)]
    if not batches:
        raise DataError("the calibration set is empty")
    for i, batch in enumerate(batches):
        check_keyword_inputs(model, batch, f"calibration batch {i}")
    first_mask = batches[0].get("attention_mask")
    if isinstance(first_mask, torch.Tensor) and not bool(first_mask.any()):
        raise DataError("the first calibration batch is all padding (attention_mask is all zeros)")
    return batches


def lower(qmodel: torch.nn.Module, report: QuantizationReport, backend: str | None = None, *,
          progress: bool = False) -> QuantizationResult:
    """Lower a fake-quant model from :func:`quantize` to ``backend`` (default: this CPU's best);
    the report gains the ``FuseAttention`` pass (attention chains with no quantizer inside become
    one fused kernel) and the ``Lower`` pass (which Linears run in int8, which fall back to
    float, and why). ``report`` must be the one :func:`quantize` returned with ``qmodel``. A
    :class:`~outlierfx.generation.QuantizedCausalLM` comes back as one, its graph lowered (the
    same config, first-token rows and tokenizer)."""
    from .backends import check_backend, default_backend

    if isinstance(qmodel, QuantizedCausalLM):
        graph, lowering_report = lower(qmodel.graph, report, backend, progress=progress)
        return QuantizationResult(QuantizedCausalLM(graph, qmodel.config, qmodel.first_token_rows, qmodel.tokenizer,
                                                    qmodel.cache_dtype), lowering_report)
    run_id = qmodel.meta.get(meta.GM_RUN_ID) if isinstance(qmodel, torch.fx.GraphModule) else None
    if run_id is None or run_id != report.run_id:
        raise DataError(f"this report (recipe {report.recipe!r}) was not made with this model; pass the report "
                        f"quantize() returned together with it: qmodel, report = quantize(...); lower(qmodel, report)")
    backend = check_backend(backend or default_backend())
    model, lowering = lower_model(qmodel, backend, progress=progress)
    return_freed_memory()  # the float weights the int8 kernels replaced, the check runs' activations
    audit = AuditTrail(report.audit.entries + lowering.entries)
    return QuantizationResult(model, dataclasses.replace(report, audit=audit, backend=backend))
