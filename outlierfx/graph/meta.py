"""The node metadata keys outlierfx writes, in one place.

Values are plain strings or frozen dataclasses. Of torch's own keys we read only the standard
ones: ``val``, ``nn_module_stack``, ``source_fn_stack`` and ``stack_trace``.
"""

from __future__ import annotations

import torch.fx

MODULE_PATH = "outlierfx_module_path"
"""Dotted path of the user's module that produced the node, e.g. ``encoder.layer.3.output.LayerNorm``."""

CREATED_BY = "outlierfx_created_by"
"""Name of the pass (or canonicalization step) that created the node."""

GM_EXAMPLE_INPUTS = "outlierfx_example_inputs"
"""Key in ``GraphModule.meta``: the ``(args, kwargs)`` the graph was captured with."""

GM_CAPTURE_REPORT = "outlierfx_capture_report"
"""Key in ``GraphModule.meta``: the :class:`~outlierfx.graph.capture.CaptureReport`."""

GM_CACHE_GRAPH = "outlierfx_cache_graph"
"""Key in ``GraphModule.meta``: ``True`` on a :class:`~outlierfx.graph.kv_cache.CachedDecoder`
graph, whose outputs are ``(logits, keys, values)``. The caches are state that only the graph
itself reads back (the next call's inputs), so a rewrite may change how they hold the keys and
values (:mod:`~outlierfx.passes.rotate_heads` rotates the values) as long as the logits stay;
output checks compare the logits (:func:`compared_outputs`)."""

GM_RUN_ID = "outlierfx_run_id"
"""Key in ``GraphModule.meta``: the id of the ``quantize()`` run that made the graph (its report
carries the same id, so a model is never lowered with another run's report)."""

GM_HF_CONFIG = "outlierfx_hf_config"
"""Key in ``GraphModule.meta``: the Hugging Face config of the quantized model as a JSON string
(``outlierfx.save`` writes it as ``config.json``)."""

GM_LOWERED_FROM = "outlierfx_lowered_from"
"""Key in a lowered ``GraphModule.meta``: the :class:`~outlierfx.passes.lower.LoweredFrom` (the
fake-quant graph and the ``Lower`` options), which ``outlierfx.save`` writes instead of kernels."""

GM_WEIGHT_SOURCE = "outlierfx_weight_source"
"""Key in ``GraphModule.meta`` of a graph captured without weights: the
:class:`~outlierfx.graph.weight_source.WeightSource` its meta-device tensors load from."""


def module_path(node: torch.fx.Node) -> str:
    """The user-facing module path of ``node`` ('' for graph inputs and top-level code)."""
    path = node.meta.get(MODULE_PATH)
    if path is not None:
        return path
    return _path_from_module_stack(node)


def _path_from_module_stack(node: torch.fx.Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    for path, _type in reversed(list(stack.values())):
        if isinstance(path, str) and not path.startswith("_"):
            return path
    return ""


def record_module_paths(graph: torch.fx.Graph) -> None:
    """Store each node's module path under :data:`MODULE_PATH` (from ``nn_module_stack``).

    Parameters are named by their own dotted target, so a weight reads as
    ``encoder.layer.0.output.dense.weight``.
    """
    for node in graph.nodes:
        if MODULE_PATH in node.meta:
            continue
        if node.op == "get_attr":
            node.meta[MODULE_PATH] = str(node.target)
        else:
            node.meta[MODULE_PATH] = _path_from_module_stack(node)


def inherit(new: torch.fx.Node, like: torch.fx.Node, created_by: str) -> None:
    """Give a node made by a rewrite the provenance of the node it replaces."""
    for key in ("nn_module_stack", "stack_trace", "source_fn_stack"):
        if key in like.meta:
            new.meta.setdefault(key, like.meta[key])
    new.meta[MODULE_PATH] = module_path(like)
    new.meta[CREATED_BY] = created_by

WEIGHT_QUANT = "outlierfx_weight_quant"
"""Set by ``ConvertToFakeQuant`` on Linear and embedding nodes whose weight it quantized: the
:class:`~outlierfx.quantizers.spec.QuantSpec` (lowering reads it to build integer weights)."""

NORM_ROLE = "outlierfx_norm_role"
"""Set by ``DetectNorms`` on norm nodes: a :class:`outlierfx.passes.detect_norms.NormSitePlan`."""


def compared_outputs(gm: torch.fx.GraphModule, outputs: object) -> object:
    """What output checks compare of ``gm``'s ``outputs``: the logits of a cache graph
    (:data:`GM_CACHE_GRAPH`), everything otherwise."""
    return outputs[0] if gm.meta.get(GM_CACHE_GRAPH) else outputs  # type: ignore[index]
