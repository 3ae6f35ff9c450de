"""``quantize(folder, calibration, low_memory=True)``: the model of a Hugging Face folder quantized
without ever being loaded (issue 28; docs/experiments/memory.md, "Block-wise calibration").

The graph is captured without weights
(:func:`~outlierfx.graph.weight_source.capture_without_weights`): every stage after it loads
one decoder block's tensors at a time from the folder's safetensors files. Calibration and the
pass manager's checks run in block order, GPTQ rounds each block's Linears once the block has
seen every batch, ConvertToFakeQuant holds the quantized weights as int8 codes, and Lower
builds the int8 kernels from those codes. The lowered model holds what it runs and nothing of
the checkpoint. This module holds what differs from the normal run
before the recipe starts: the folder, the meta-device model the batches are checked against,
the capture, and the refusals of what cannot run weight-free.
"""

from __future__ import annotations

import os
import pathlib
from collections.abc import Callable
from typing import Any

import torch
import torch.fx

from .errors import SettingError
from .recipes import PRESETS, Recipe, RecipeError, choose

# Recipe passes that run on a graph captured without weights (tested equal to the loaded run in
# tests/test_low_memory_quantize.py). The runner's own passes (InsertObservers, Calibrate,
# ConvertToFakeQuant) and the lowering (FuseAttention, Lower) do too; GroupChannels only groups
# observers' channels; GPTQ collects its Gram matrices in block order and rounds each block's
# Linears into int8 codes (passes/gptq_block_order.py); MigrateGamma and the three rotations
# record their rewrites as derived tensors, computed when a block loads (graph/derived_tensors.py).
# Quadapter inserts its scales on the graph's structure, trains them block by block with each
# segment's weights loaded while it trains (passes/train_quadapter.py; its phase 2, end to end,
# is refused) and folds them as derived tensors. LearnRanges trains on the model's output through
# a forward checkpointed segment by segment (graph/segment_checkpoint.py); ClipTokenwise evaluates
# each search step's candidates together, segment by segment. QAT trains the weights themselves,
# which such a graph loads only inside the passes that know to load them block by block.
WEIGHT_FREE_PASSES: frozenset[str] = frozenset({"GroupChannels", "GPTQ", "MigrateGamma", "RotateResidual",
                                                "RotateHeads", "RotateFFN", "InsertQuadapter", "TrainQuadapter",
                                                "FoldQuadapter", "LearnRanges", "ClipTokenwise"})

NEVER_LOADED = ("the model was never loaded (low_memory=True): captured without weights, then calibrated, "
                "converted, checked and lowered with one block's weights in memory at a time (block order)")


def folder_of(model: Any) -> pathlib.Path:
    """The folder a low-memory run reads, or a SettingError for anything else (a loaded model)."""
    if isinstance(model, torch.nn.Module):
        raise SettingError(f"low_memory=True quantizes a model that is never loaded, but got a loaded "
                           f"{type(model).__name__}; pass the folder the model was saved in with save_pretrained "
                           f"(safetensors weights and config.json), e.g. quantize('path/to/model', batches, "
                           f"backend='onednn', low_memory=True), or quantize the loaded model with low_memory=False")
    if not isinstance(model, (str, os.PathLike)):
        raise SettingError(f"low_memory=True takes the path of a Hugging Face model folder, not "
                           f"{type(model).__name__}")
    return pathlib.Path(model)


def model_without_weights(folder: pathlib.Path) -> torch.nn.Module:
    """The folder's model on the meta device (for the batch checks and its config), after making
    sure the folder has safetensors weights to load block by block."""
    from .graph.weight_source import WeightSource
    from .models import build_without_weights

    model = build_without_weights(folder)  # names a missing folder or config.json
    WeightSource.from_checkpoint(folder, {})  # a folder without safetensors fails here, before any capture
    return model


def check_before_capture(recipe: str | Recipe | None, backend: str | None) -> None:
    """Refuse a run without a backend, and a named recipe with a pass that needs the weights'
    values (a preset's passes are checked once it is chosen for the captured graph)."""
    named, target = choose(recipe, backend)[:2]
    _check_lowered(target, (recipe or "fast") if isinstance(recipe, str | None) else named.name)
    if recipe not in (None, *PRESETS):
        check_runs_weight_free(named)


def _check_lowered(target: str | None, recipe_name: str) -> None:
    """Refuse a low-memory run without a backend: its fake-quant graph holds no weights (they load
    block by block inside the passes), so it does not run as a normal module."""
    if target is None:
        raise SettingError(f"low_memory=True returns the model lowered to a backend: the fake-quant graph of a "
                           f"low-memory run holds no weights (they load block by block inside the passes), so it "
                           f"cannot run as a module; pass backend= (e.g. backend='onednn', or "
                           f"outlierfx.default_backend()) with recipe {recipe_name!r}")


def check_runs_weight_free(recipe: Recipe) -> None:
    """Refuse, before calibration, a recipe with a pass that needs the weights' values."""
    blocked = [step.name for _, step in recipe.steps if step.name not in WEIGHT_FREE_PASSES]
    if blocked:
        raise RecipeError(f"recipe {recipe.name!r} cannot run with low_memory=True: {', '.join(blocked)} "
                          f"{'needs' if len(blocked) == 1 else 'need'} the weights' values in memory, which a "
                          f"low-memory run loads one block at a time (QAT, which trains the weights, is not "
                          f"supported there yet); use a default preset or any other recipe (rotate+sink, "
                          f"smooth-fold+sink, smooth-peg+sink, os, naive+gptq, naive+lsq, peg), or quantize the "
                          f"loaded model with low_memory=False")


def capturing(folder: pathlib.Path) -> Callable[[Any, Callable[[torch.nn.Module], torch.nn.Module] | None],
                                                torch.fx.GraphModule]:
    """``capture(example, wrap)`` for the folder's model captured without weights (``wrap``:
    e.g. :class:`~outlierfx.graph.kv_cache.CachedDecoder`, with ``example`` in its form)."""
    from .graph.weight_source import capture_without_weights

    def capture(example: Any, wrap: Callable[[torch.nn.Module], torch.nn.Module] | None) -> torch.fx.GraphModule:
        return capture_without_weights(folder, example, wrap=wrap)

    return capture


def checkpoint_dtypes(folder: pathlib.Path) -> set[torch.dtype]:
    """The dtypes of the folder's floating-point tensors, from the safetensors headers (no tensor
    is read). The graph holds them in float32: each loads as float32 (``materialize``)."""
    from safetensors import safe_open

    from .models import checkpoint_keys

    by_file: dict[pathlib.Path, list[str]] = {}
    for key, file in checkpoint_keys(folder).items():
        by_file.setdefault(file, []).append(key)
    names = set()
    for file, keys in by_file.items():
        with safe_open(str(file), framework="pt") as f:
            names.update(f.get_slice(key).get_dtype() for key in keys)
    dtypes = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
    return {dtypes[name] for name in names if name in dtypes}
