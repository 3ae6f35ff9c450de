"""Capture a model into one canonical FX graph.

``torch.export`` (non-strict) traces Hugging Face models and plain ``nn.Module``s alike
(``torch.fx.symbolic_trace`` fails on HF BERT's position-id slicing); the exported graph is then
canonicalized (:mod:`.canonicalize`) and checked against the model on the example inputs.
"""

from __future__ import annotations

import collections
import contextlib
import copy
import dataclasses
import functools
import inspect
import linecache
import time
import traceback
from collections.abc import Iterator, Mapping
from typing import Any

import torch
import torch.fx
import torch.utils._pytree as pytree

from ..errors import CaptureError, DataError
from . import meta
from .canonicalize import canonicalize
from .compare import OutputError, output_error, run
from .inputs import check_keyword_inputs, check_model_weights
from .kv_cache import CachedDecoder
from .ops import OpKind, op_kind
from .shapes import propagate_values
from .static_shapes import insert_shape_checks

DEFAULT_REL_TOL = 1e-5
"""Captured graphs must match the model within this fraction of the output's max magnitude..."""
FLOAT_NOISE_FACTOR = 4.0
"""...or, where fp32 rounding alone moves the model further (deep models whose residual stream
carries massive activations: SmolLM2's 25,000s leave ~1e-3 of rounding in every sum), stay within
this multiple of the model's own fp32 error against a float64 copy of it."""

Inputs = tuple[tuple[Any, ...], dict[str, Any]]


@dataclasses.dataclass(frozen=True)
class CaptureReport:
    model: str
    export_seconds: float
    canonicalize_seconds: float
    rewrites: Mapping[str, int]
    op_counts: Mapping[str, int]
    num_nodes: int
    error: OutputError | None  # graph vs model at real tokens
    # where the rel_tol check failed: max abs error against a float64 copy of the model, of the
    # fp32 model itself (the rounding noise) and of the graph
    float_noise: float | None = None
    float_error: float | None = None
    notes: tuple[str, ...] = ()  # what the user should know about this graph (e.g. static shapes)

    def as_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["rewrites"] = dict(self.rewrites)
        out["op_counts"] = dict(self.op_counts)
        return out


def normalize_inputs(model: torch.nn.Module, example_inputs: Any) -> Inputs:
    """Turn a tuple of positional args or a dict of kwargs into ``(args, kwargs)``.

    For models whose ``forward`` takes ``use_cache`` (Hugging Face decoders), ``use_cache=False``
    is added unless given: a KV cache is not part of a quantized prefill graph.
    """
    if isinstance(example_inputs, Mapping):
        args, kwargs = (), dict(example_inputs)
    elif isinstance(example_inputs, tuple):
        args, kwargs = example_inputs, {}
    elif isinstance(example_inputs, torch.Tensor):
        args, kwargs = (example_inputs,), {}
    else:
        raise DataError(
            f"example_inputs must be a tuple of positional arguments or a dict of keyword arguments, "
            f"got {type(example_inputs).__name__}"
        )
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        params = {}
    if params and not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        unknown = sorted(set(kwargs) - set(params))
        if unknown:
            raise DataError(f"inputs {unknown} are not parameters of {type(model).__name__}.forward, which takes "
                            f"{', '.join(params)}; rename or drop them")
    if "use_cache" in params and "use_cache" not in kwargs:
        kwargs["use_cache"] = False
    check_keyword_inputs(model, kwargs, "example inputs")
    for name, value in list(enumerate(args)) + list(kwargs.items()):
        if isinstance(value, torch.Tensor) and value.dtype.is_floating_point and not torch.isfinite(value).all():
            raise DataError(f"example input {name!r} contains NaN or inf")
    return args, kwargs


def _dynamic_shapes(model: torch.nn.Module, inputs: Inputs) -> Any:
    """Let export decide which tensor dims stay dynamic (batch, sequence) and which specialize."""
    auto = torch.export.Dim.AUTO

    def spec(value: Any) -> Any:  # containers of tensors (a KV cache's list per layer) get one spec per tensor
        if isinstance(value, (list, tuple)) and value and all(isinstance(v, torch.Tensor) for v in value):
            return type(value)(spec(v) for v in value)
        if isinstance(value, torch.Tensor):
            return {i: auto for i in range(value.dim())}
        return None

    args, kwargs = inputs
    if not kwargs:
        return tuple(spec(a) for a in args)
    signature = inspect.signature(model.forward)
    bound = signature.bind_partial(*args, **kwargs).arguments
    for name, value in bound.items():
        if signature.parameters[name].kind is inspect.Parameter.VAR_KEYWORD:
            named = [p.name for p in signature.parameters.values() if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)]
            raise CaptureError(
                f"inputs {sorted(value)} are not named parameters of {type(model).__name__}.forward (they would "
                f"pass through **{name}, which torch.export cannot give dynamic shapes); use the names it takes "
                f"({', '.join(named[:8])}{', ...' if len(named) > 8 else ''}), drop the others "
                f"(outlierfx.models.model_inputs does) or capture with dynamic=False"
            )
    return {name: spec(value) for name, value in bound.items()}


@contextlib.contextmanager
def _tracing_view_of(model: torch.nn.Module, constants: dict[str, Any]) -> Iterator[None]:
    """Trace in eval mode, without autograd, with non-tensor kwargs bound into ``forward``.

    Binding flags such as ``use_cache=False`` keeps them out of the graph's signature, so the
    graph is called with tensors only. The model gets its training flags and ``forward`` back.
    """
    flags = [(m, m.training) for m in model.modules()]
    had_own_forward = "forward" in vars(model)
    if constants:
        model.forward = functools.partial(model.forward, **constants)
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for module, training in flags:
            module.training = training
        if constants:
            if had_own_forward:
                model.forward = model.forward.func
            else:
                del model.forward


def capture(
    model: torch.nn.Module,
    example_inputs: Any,
    *,
    dynamic: bool = True,
    check: bool = True,
    rel_tol: float = DEFAULT_REL_TOL,
) -> torch.fx.GraphModule:
    """Capture ``model`` into a canonical :class:`torch.fx.GraphModule`.

    Args:
        model: a Hugging Face ``PreTrainedModel`` or any ``nn.Module``. It is not modified.
        example_inputs: a tuple of positional args or a dict of kwargs for ``model``.
        dynamic: keep batch and sequence sizes symbolic so the graph accepts other shapes. Where
            the model needs concrete sizes the graph is captured with the example's shapes
            instead, and the report's ``notes`` say so; a graph with static shapes raises a
            :class:`DataError` naming the shapes it takes when called with others.
        check: run the model and the graph on ``example_inputs`` and require their outputs to
            agree (at real tokens, where an ``attention_mask`` says which) within ``rel_tol`` times
            the output's max magnitude, or within ``FLOAT_NOISE_FACTOR`` times the model's own
            fp32 rounding error (measured against a float64 copy) where that is larger.

    The graph is called like the model (same arguments, same output structure). Each node keeps
    the user's module path (``outlierfx.graph.meta.module_path(node)``); ``gm.meta`` holds the
    example inputs and a :class:`CaptureReport`.
    """
    if not isinstance(model, torch.nn.Module):
        raise CaptureError(f"capture expects a torch.nn.Module, got {type(model).__name__}")
    check_model_weights(model)
    full_inputs = normalize_inputs(model, example_inputs)
    args, kwargs = full_inputs
    constants = {k: v for k, v in kwargs.items() if not _holds_tensors(v)}
    inputs = (args, {k: v for k, v in kwargs.items() if k not in constants})
    name = type(model).__name__
    shapes = _dynamic_shapes(model, inputs) if dynamic else None  # names inputs export cannot take
    with _tracing_view_of(model, constants):
        reference = _run_model(model, inputs) if check else None
        traced = _trace(model, inputs, shapes)
    gm = traced.graph_module

    error, noise, from_float64 = None, None, None
    if check:
        mask = _token_mask(inputs)
        actual = run(gm, inputs)
        error = output_error(reference, actual, mask)
        if not error.within(rel_tol):
            noise, from_float64 = _float64_noise(model, inputs, constants, reference, actual, mask)
            if error.nonfinite or from_float64 > FLOAT_NOISE_FACTOR * noise:
                raise CaptureError(
                    f"the captured graph of {name} does not reproduce the model: max abs error "
                    f"{error.max_abs:.3g} ({error.max_rel:.3g} of the output's max |value|, tolerance "
                    f"{rel_tol:g}); against a float64 copy of the model the graph is off by "
                    f"{from_float64:.3g}, the model itself by {noise:.3g} (allowed: {FLOAT_NOISE_FACTOR:g}x); "
                    f"non-finite values: {error.nonfinite}"
                )
    gm.meta[meta.GM_EXAMPLE_INPUTS] = inputs
    if isinstance(model, CachedDecoder):
        gm.meta[meta.GM_CACHE_GRAPH] = True
    gm.meta[meta.GM_CAPTURE_REPORT] = CaptureReport(
        model=name,
        export_seconds=traced.export_seconds,
        canonicalize_seconds=traced.canonicalize_seconds,
        rewrites=traced.rewrites,
        op_counts=count_ops(gm),
        num_nodes=len(gm.graph.nodes),
        error=error,
        float_noise=noise,
        float_error=from_float64,
        notes=traced.notes,
    )
    return gm


def _holds_tensors(value: Any) -> bool:
    """A tensor, or a container of them (a KV cache's list per layer): a graph input, not a flag."""
    return any(isinstance(leaf, torch.Tensor) for leaf in pytree.tree_leaves(value))


@dataclasses.dataclass(frozen=True)
class _Traced:
    graph_module: torch.fx.GraphModule
    rewrites: Mapping[str, int]
    export_seconds: float
    canonicalize_seconds: float
    notes: tuple[str, ...] = ()


def _run_model(model: torch.nn.Module, inputs: Inputs) -> Any:
    """The model's outputs on the example; a model that fails on them was given the wrong inputs."""
    try:
        return run(model, inputs)
    except Exception as exc:  # noqa: BLE001 - whatever the model raises, the inputs are the cause
        first_line = (str(exc).strip().splitlines() or [""])[0]
        raise DataError(
            f"{type(model).__name__} fails on the example inputs ({type(exc).__name__}: {first_line[:300]}); give it "
            f"the inputs its forward takes (for a Hugging Face model, the tokenizer's output)"
        ) from exc


def _trace(model: torch.nn.Module, inputs: Inputs, shapes: Any) -> _Traced:
    """Export and canonicalize, with the symbolic sizes of ``shapes`` (None: static shapes).

    Where that fails (export, or shape propagation through an op whose shape function takes
    only concrete sizes), trace again with the example's static shapes; the graph then checks
    its input shapes and the note says why."""
    if shapes is None:
        return _export_canonical(model, inputs, None)
    try:
        return _export_canonical(model, inputs, shapes)
    except Exception as exc:  # noqa: BLE001 - any failure with symbolic sizes: try the static shapes
        dynamic_failure = exc.__cause__ if isinstance(exc, CaptureError) and exc.__cause__ else exc
    # a failed dynamic export leaves its dynamic-dimension marks on the input tensors, and a second
    # export of the same tensors would trace them symbolically again: the retry exports copies
    fresh = pytree.tree_map(lambda t: t.clone() if isinstance(t, torch.Tensor) else t, inputs)
    traced = _export_canonical(model, fresh, None)
    where = _user_frame(dynamic_failure)
    first_line = (str(dynamic_failure).strip().splitlines() or [""])[0]
    note = (f"captured with static shapes: tracing with dynamic batch and sequence sizes failed"
            f"{f' at {where}' if where else ''} ({type(dynamic_failure).__name__}: {first_line[:200]}); the graph "
            f"takes only the example's input shapes and names them when called with others")
    return dataclasses.replace(traced, notes=(note,))


def _export_canonical(model: torch.nn.Module, inputs: Inputs, dynamic_shapes: Any) -> _Traced:
    start = time.perf_counter()
    try:
        exported = torch.export.export(model, inputs[0], inputs[1], dynamic_shapes=dynamic_shapes, strict=False)
    except Exception as exc:  # export raises many unrelated types; all mean "untraceable"
        raise CaptureError(explain_export_failure(type(model).__name__, exc)) from exc
    export_seconds = time.perf_counter() - start
    start = time.perf_counter()
    gm = exported.module()
    rewrites = canonicalize(gm)
    if dynamic_shapes is None:
        insert_shape_checks(gm)
    propagate_values(gm, full=True)
    return _Traced(gm, rewrites, export_seconds, time.perf_counter() - start)


def _token_mask(inputs: Inputs) -> torch.Tensor | None:
    """The attention mask when there is a 2-D one: padded positions' outputs carry no meaning."""
    mask = inputs[1].get("attention_mask")
    return mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None


def _float64_noise(model: torch.nn.Module, inputs: Inputs, constants: dict[str, Any], reference: Any,
                   actual: Any, mask: torch.Tensor | None) -> tuple[float, float]:
    """(the model's fp32 output vs a float64 copy's, the graph's vs the same): how much fp32
    rounding alone moves this model on these inputs, and how far the graph is from exact."""
    wide = pytree.tree_map(lambda t: t.double() if isinstance(t, torch.Tensor) and t.is_floating_point() else t,
                           inputs)
    try:
        twin = copy.deepcopy(model).double()
        with _tracing_view_of(twin, constants):
            exact = run(twin, wide)
    except Exception:  # a model that cannot run in float64 gets no noise allowance  # noqa: BLE001
        return 0.0, float("inf")
    return output_error(exact, reference, mask).max_abs, output_error(exact, actual, mask).max_abs


def count_ops(gm: torch.fx.GraphModule) -> dict[str, int]:
    """Number of nodes of each canonical kind, e.g. ``{"linear": 37, "layer_norm": 13, ...}``."""
    counts = collections.Counter(kind.value for n in gm.graph.nodes if (kind := op_kind(n)) is not None)
    return {kind.value: counts.get(kind.value, 0) for kind in OpKind}


_HINTS = (
    ("data-dependent", "the model branches or sizes a tensor on tensor *values*",
     "make the branch depend on shapes only, or express it with torch.cond"),
    ("guard on data-dependent", "the model branches on tensor *values*",
     "make the branch depend on shapes only, or express it with torch.cond"),
    (".item()", "the model reads a Python number out of a tensor",
     "keep the value as a tensor, or pass it as a Python argument"),
    ("numpy", "the model calls NumPy on a tensor", "use the torch equivalent"),
    ("Cannot access data pointer", "the model reads raw tensor memory (NumPy, ctypes or a C extension)",
     "use torch ops so the tracer can follow them"),
    ("Unsupported", "the model uses a construct torch.export does not support",
     "rewrite that part with plain torch ops"),
)


def explain_export_failure(model_name: str, exc: BaseException) -> str:
    """One message naming what failed, where in the user's code, and how to fix it."""
    text = f"{type(exc).__name__}: {exc}"
    first_line = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
    what, fix = "torch.export could not trace it", "check the error below, or capture a smaller submodule"
    for needle, description, suggestion in _HINTS:
        if needle.lower() in text.lower():
            what, fix = description, suggestion
            break
    where = _user_frame(exc)
    location = f" at {where}" if where else ""
    return f"cannot capture {model_name}: {what}{location}. Fix: {fix}. ({first_line[:300]})"


def _user_frame(exc: BaseException) -> str | None:
    """The innermost traceback frame outside torch and Python's own libraries."""
    frames = traceback.extract_tb(exc.__traceback__)
    skip = ("/torch/", "/site-packages/torch", "/contextlib.py", "/functools.py", "/outlierfx/graph/")
    for frame in reversed(frames):
        if not any(s in frame.filename for s in skip):
            code = (frame.line or linecache.getline(frame.filename, frame.lineno)).strip()
            return f"{frame.filename}:{frame.lineno}" + (f" `{code}`" if code else "")
    return None
