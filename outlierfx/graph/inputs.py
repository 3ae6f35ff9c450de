"""Checks on the model and the inputs users bring, before anything is traced or run.

Each check raises a :class:`DataError` that names the problem and the fix; without them the
same mistakes surface as errors from deep inside torch or transformers (an ``IndexError`` from
the embedding for an out-of-vocabulary id, a ``RuntimeError`` for float token ids...).
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

import torch

from ..errors import DataError

TOKEN_ALIGNED = ("input_ids", "attention_mask", "token_type_ids", "position_ids")
"""Inputs with one row per text and one column per token: within one batch they share a shape."""


def check_model_weights(model: torch.nn.Module) -> None:
    """Refuse a model whose weights are not loaded (on the ``meta`` device)."""
    on_meta = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.device.type == "meta"]
    if on_meta:
        raise DataError(
            f"{type(model).__name__} has {len(on_meta)} tensors on the meta device (e.g. {on_meta[0]}): its weights "
            f"were never loaded; load the model with its weights (from_pretrained without device_map='meta' or "
            f"init_empty_weights), or call model.to_empty(device='cpu') and load a state dict"
        )


def check_keyword_inputs(model: torch.nn.Module, inputs: Mapping[str, Any], where: str) -> None:
    """Token ids that are integers inside the model's vocabulary, and token-aligned inputs of one
    shape. ``where`` names the inputs in the message (e.g. ``"calibration batch 3"``)."""
    ids = inputs.get("input_ids")
    if isinstance(ids, torch.Tensor):
        if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
            raise DataError(
                f"{where}: input_ids are {str(ids.dtype).removeprefix('torch.')}; token ids must be integers "
                f"(torch.long): pass the tokenizer's output (tokenizer(texts, return_tensors='pt')) unconverted"
            )
        vocab = _vocabulary_size(model)
        if ids.numel() and vocab is not None and (int(ids.min()) < 0 or int(ids.max()) >= vocab):
            bad = int(ids.max()) if int(ids.max()) >= vocab else int(ids.min())
            raise DataError(
                f"{where}: input_ids contain {bad}, outside {type(model).__name__}'s vocabulary of {vocab} tokens "
                f"(ids 0..{vocab - 1}); tokenize with this model's own tokenizer"
            )
    shapes = {k: tuple(v.shape) for k, v in inputs.items() if k in TOKEN_ALIGNED and isinstance(v, torch.Tensor)}
    if len(set(shapes.values())) > 1:
        listed = ", ".join(f"{k} {s}" for k, s in shapes.items())
        raise DataError(
            f"{where}: inputs disagree in shape ({listed}); they need one row per text and one column per token: "
            f"tokenize the texts of a batch together (tokenizer(texts, padding=True, return_tensors='pt'))"
        )


def _vocabulary_size(model: torch.nn.Module) -> int | None:
    get = getattr(model, "get_input_embeddings", None)
    try:
        embedding = get() if callable(get) else None
    except (NotImplementedError, AttributeError):
        return None
    return embedding.num_embeddings if isinstance(embedding, torch.nn.Embedding) else None


def as_keyword_batch(model: torch.nn.Module, batch: Any, index: int) -> dict[str, Any]:
    """One calibration batch as keyword inputs: a dict as it is, a tuple bound to the names of
    ``model.forward``'s parameters (as :func:`~outlierfx.capture` takes positional inputs)."""
    if isinstance(batch, Mapping):
        return dict(batch)
    name = type(model).__name__
    if isinstance(batch, tuple):
        try:
            return dict(inspect.signature(model.forward).bind_partial(*batch).arguments)
        except TypeError as exc:
            raise DataError(f"calibration batch {index} has {len(batch)} positional inputs, which "
                            f"{name}.forward does not take ({exc}); pass a dict of keyword inputs") from exc
    raise DataError(
        f"calibration batch {index} is a {type(batch).__name__}; each batch must be a dict of keyword inputs, "
        f"e.g. a tokenizer's output {{'input_ids': ..., 'attention_mask': ...}} (or a tuple of positional "
        f"inputs for a model that takes tensors by position)"
    )
