"""Saving and loading quantized models without pickle: ``outlierfx.save`` / ``outlierfx.load``.

A saved folder holds ``model.safetensors`` (every tensor), ``graph.json`` (the graph, the
quantization parameters and the backend, in the schema of :mod:`.graph_codec`), and, where
known, the Hugging Face ``config.json`` and tokenizer files. What is saved is the fake-quant
graph *before* lowering plus the backend's name: kernels are this CPU's and torch's business
(packed weights, compiled code), while the fake-quant graph with its int8 weights and scales is
exact and portable. Loading rebuilds it from JSON and lowers it again with the same pass, so the
reloaded model computes bit for bit what the saved one did (on the same CPU and torch). See
``docs/saved-format.md``.
"""

from __future__ import annotations

import json
import pathlib
import warnings
from typing import Any

import torch
import torch.fx
from safetensors.torch import load_file, save_file

from .. import __version__
from ..backends import BackendError, check_backend, default_backend
from ..backends.inductor import CompiledInt8
from ..errors import DataError, OutlierFXError, OutlierFXWarning, SavedFormatError
from ..graph import meta
from ..memory import return_freed_memory
from ..passes.convert_fake_quant import wire_sink_quantizers
from ..passes.lower import LoweredFrom, lower_model
from ..quantizers.observers import FakeQuantize
from ..recipes import SIMULATED
from .graph_codec import decode_graph, decode_value, encode_graph, encode_value
from .legacy import MODEL_FILE, KernelLeafTracer, SavedModel, load_pickled  # noqa: F401  (names old pickles use)
from .tensors import TensorWriter

GRAPH_FILE = "graph.json"
TENSORS_FILE = "model.safetensors"
FORMAT = "outlierfx.graph"
FORMAT_VERSION = 2  # 1 was the pickled model.pt (outlierfx.json next to it)
READABLE_VERSIONS = (2,)


def save(model: torch.nn.Module, directory: str | pathlib.Path, *, tokenizer: Any = None,
         info: dict[str, Any] | None = None, overwrite: bool = False) -> pathlib.Path:
    """Write ``model`` (what :func:`outlierfx.quantize` or :func:`outlierfx.lower` returned,
    lowered or fake-quant) to the folder ``directory``; returns the folder.

    ``tokenizer``: a Hugging Face tokenizer saved alongside (``save_pretrained``), so the folder
    is self-contained; the model's ``config.json`` is written when ``quantize`` saw one.
    ``info``: extra JSON-able facts to record (e.g. the recipe). Refuses to replace a saved model
    unless ``overwrite``. A :class:`~outlierfx.generation.QuantizedCausalLM` is saved with its
    KV-cache graph (``"decoder"`` in ``graph.json``) and its own tokenizer unless one is given;
    :func:`load` gives it back, ready to ``generate``."""
    from ..generation import QuantizedCausalLM

    decoder = None
    if isinstance(model, QuantizedCausalLM):
        decoder = {"kv_cache": "static", "first_token_rows": model.first_token_rows}
        tokenizer = tokenizer if tokenizer is not None else model.tokenizer
        model = model.graph
    source, backend, lowering = pre_lowering(model)
    folder = pathlib.Path(directory)
    existing = [folder / name for name in (GRAPH_FILE, MODEL_FILE) if (folder / name).exists()]
    if existing and not overwrite:
        raise OutlierFXError(f"{existing[0]} exists; choose another output directory or pass overwrite=True")
    writer = TensorWriter()
    graph = encode_graph(source, writer)
    example = source.meta.get(meta.GM_EXAMPLE_INPUTS)
    if example is None:
        raise OutlierFXError("the graph carries no example inputs; save the model outlierfx.quantize returned")
    doc = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "outlierfx": __version__,
        "torch": torch.__version__.split("+")[0], "backend": backend, "lowering": lowering,
        "example_inputs": encode_value({"args": tuple(example[0]), "kwargs": dict(example[1])}, writer,
                                       "example_inputs"),
        "info": info or {}, "graph": graph,
    }
    if decoder is not None:
        doc["decoder"] = decoder
    folder.mkdir(parents=True, exist_ok=True)
    (folder / GRAPH_FILE).unlink(missing_ok=True)  # graph.json last: its presence marks a complete save
    (folder / MODEL_FILE).unlink(missing_ok=True)  # an old pickle must not outlive an overwrite
    _atomic(folder / TENSORS_FILE, lambda path: save_file(writer.tensors, str(path), metadata={"format": "pt"}))
    config = source.meta.get(meta.GM_HF_CONFIG)
    if config is not None:
        (folder / "config.json").write_text(config)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(folder))
    _atomic(folder / GRAPH_FILE, lambda path: path.write_text(json.dumps(doc, indent=1, allow_nan=False)))
    return folder


def load(directory: str | pathlib.Path, backend: str | None = None, *, trust_pickle: bool = False,
         progress: bool = False) -> torch.nn.Module:
    """The model :func:`save` wrote to ``directory``, lowered to ``backend`` (default: the
    backend it was saved with; ``"fake-quant"``: the simulated model before lowering).

    Never unpickles: a folder in the old format (a pickled ``model.pt``) loads only with
    ``trust_pickle=True``, which runs the code the pickle names (only for files you wrote)."""
    folder = pathlib.Path(directory)
    if not (folder / GRAPH_FILE).is_file():
        return _load_legacy(folder, backend, trust_pickle)
    doc = _read_document(folder / GRAPH_FILE)
    _check_versions(doc, folder)
    try:
        tensors = load_file(str(folder / TENSORS_FILE))
    except Exception as exc:
        raise SavedFormatError(f"cannot read {folder / TENSORS_FILE}: {type(exc).__name__}: {exc}") from exc
    try:
        example = decode_value(doc["example_inputs"], {}, tensors)
        inputs = (tuple(example["args"]), dict(example["kwargs"]))
        gm = decode_graph(doc["graph"], tensors, inputs)
    except (KeyError, TypeError, ValueError) as exc:
        raise SavedFormatError(f"{folder / GRAPH_FILE} does not follow format {FORMAT} version "
                               f"{doc['format_version']}: {type(exc).__name__}: {exc}") from exc
    gm.meta[meta.GM_EXAMPLE_INPUTS] = inputs
    # a file written before quantizers read the graph's first-token mask: wired now, so its
    # first-token grids follow each text's first real token as a fresh model's do
    wire_sink_quantizers(gm, "load")
    if (folder / "config.json").is_file():  # saved again, the folder keeps its config
        gm.meta[meta.GM_HF_CONFIG] = (folder / "config.json").read_text()
    target = backend or doc["backend"]
    if target in (None, SIMULATED):
        return _as_saved(gm.eval(), doc, folder)
    try:
        check_backend(target)
    except BackendError as exc:
        if backend is not None:
            raise
        raise BackendError(f"{folder} was saved for backend {target!r}, which this machine cannot run ({exc}); "
                           f"load it with backend= one it can, e.g. {default_backend()!r}") from exc
    options = doc["lowering"] if target == doc["backend"] and doc["lowering"] else {}
    model, _ = lower_model(gm, target, progress=progress, **options)
    del gm, tensors  # the float weights lowering replaced with int8 codes
    return_freed_memory()
    return _as_saved(model.eval(), doc, folder)


def _as_saved(model: torch.nn.Module, doc: dict[str, Any], folder: pathlib.Path) -> torch.nn.Module:
    """The graph as it was saved: a decoder with a KV cache comes back as a
    :class:`~outlierfx.generation.QuantizedCausalLM` with the folder's config and tokenizer."""
    decoder = doc.get("decoder")
    if decoder is None:
        return model
    from transformers import AutoConfig, AutoTokenizer

    from ..generation import QuantizedCausalLM

    if not (folder / "config.json").is_file():
        raise SavedFormatError(f"{folder} holds a decoder with a KV cache but no config.json (the cache is sized "
                               f"from it); quantize the causal LM again and save what outlierfx.quantize returns")
    config = AutoConfig.from_pretrained(str(folder))
    tokenizer = AutoTokenizer.from_pretrained(str(folder)) if (folder / "tokenizer_config.json").is_file() else None
    return QuantizedCausalLM(model, config, int(decoder["first_token_rows"]), tokenizer)


def pre_lowering(model: torch.nn.Module) -> tuple[torch.fx.GraphModule, str | None, dict[str, Any] | None]:
    """The fake-quant graph ``model`` was lowered from (what :func:`save` writes and
    :func:`outlierfx.export_onnx` exports), the backend it was lowered to (None: not lowered) and
    the ``Lower`` options."""
    graph = model.reference if isinstance(model, CompiledInt8) else model
    lowered = graph.meta.get(meta.GM_LOWERED_FROM) if isinstance(graph, torch.fx.GraphModule) else None
    if isinstance(lowered, LoweredFrom):
        return lowered.fake_quant(), lowered.backend, {"max_sub_gemms": lowered.max_sub_gemms,
                                                 "bf16_attention": lowered.bf16_attention}
    if isinstance(graph, torch.fx.GraphModule) and any(isinstance(m, FakeQuantize) for m in graph.modules()):
        return graph, None, None
    raise DataError(f"outlierfx.save writes the models outlierfx.quantize and outlierfx.lower return; got a "
                    f"{type(model).__name__}. Quantize it first: qmodel, report = outlierfx.quantize(model, calibration) "
                    f"(lowered by hand? lower with outlierfx.lower or the Lower pass)")


def _atomic(path: pathlib.Path, write: Any) -> None:
    """``write(tmp)`` then rename: a crash never leaves half a file under the final name."""
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    tmp.replace(path)


def _read_document(path: pathlib.Path) -> dict[str, Any]:
    try:
        doc = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SavedFormatError(f"cannot read {path}: {exc}; save the model again with outlierfx.save") from exc
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise SavedFormatError(f"{path} is not an outlierfx saved graph (no \"format\": \"{FORMAT}\")")
    return doc


def _check_versions(doc: dict[str, Any], folder: pathlib.Path) -> None:
    """The format version must be one this outlierfx reads; torch must be at least the minor
    version the graph was saved with (its aten ops may be missing from an older torch)."""
    version = doc.get("format_version")
    if version not in READABLE_VERSIONS:
        newer = isinstance(version, int) and version > max(READABLE_VERSIONS)
        raise SavedFormatError(f"{folder} holds saved-graph format version {version!r}; this outlierfx "
                               f"({__version__}) reads versions {list(READABLE_VERSIONS)}: "
                               + ("upgrade outlierfx" if newer else "quantize and save the model again"))
    saved, running = _minor(doc.get("torch", "")), _minor(torch.__version__)
    if saved is None:
        raise SavedFormatError(f"{folder / GRAPH_FILE} does not say which torch wrote it; save the model again")
    if running[0] != saved[0] or running < saved:
        raise SavedFormatError(f"{folder} was saved with torch {doc['torch']}; this is torch {torch.__version__}, "
                               f"which may lack its ops: use torch >= {saved[0]}.{saved[1]}, < {saved[0] + 1}")


def _minor(version: str) -> tuple[int, int] | None:
    parts = version.split("+")[0].split(".")
    try:
        return int(parts[0]), int(parts[1])
    except (IndexError, ValueError):
        return None


def _load_legacy(folder: pathlib.Path, backend: str | None, trust_pickle: bool) -> torch.nn.Module:
    pickled = folder / MODEL_FILE
    if not pickled.is_file():
        raise OutlierFXError(f"no saved outlierfx model in {folder} (no {GRAPH_FILE}); save one with outlierfx.save")
    if not trust_pickle:
        raise OutlierFXError(f"{folder} holds the old pickled format ({MODEL_FILE}), which runs code when opened; "
                             f"outlierfx.load does not unpickle. If you wrote it yourself, pass trust_pickle=True, "
                             f"or quantize the model again and save it with outlierfx.save")
    if backend is not None:
        raise OutlierFXError(f"{pickled} holds an already lowered model; it cannot be lowered to {backend!r}: "
                             f"load it without backend=")
    warnings.warn(f"unpickling {pickled} (trust_pickle=True): it runs the code the file names; re-save the model "
                  f"with outlierfx.save for the pickle-free format", OutlierFXWarning, stacklevel=3)
    return load_pickled(pickled)


def size_on_disk_mb(path: str | pathlib.Path) -> float:
    """Size of a file, or of all files under a directory, in MB (10^6 bytes)."""
    path = pathlib.Path(path)
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    return sum(p.stat().st_size for p in files) / 1e6
