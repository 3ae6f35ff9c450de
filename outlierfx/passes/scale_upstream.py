"""Folding a per-channel scale into the Linear that produced the scaled tensor, several ops up.

A Quadapter scale on a Linear input whose producer is no norm (an attention context, a SwiGLU
product) stays in the folded graph as ``x * s``: an extra multiply in front of the quantizer,
which costs about 15% of the int8 model's latency on inductor (MiniLM, measured). Often an
earlier Linear's output reaches ``x`` through ops that carry its channels through unchanged and
scale with them:

- attention: ``context = softmax(...) @ V`` with ``V`` the value projection's output split into
  heads (reshape/transpose/view only). Scaling V's channel c scales context channel c;
- SwiGLU: ``act(gate) * up``: scaling ``up``'s channel c scales the product's channel c.

Then ``s`` can go into that Linear's output rows (weight rows and bias) and the multiply goes.
:func:`row_scalable_linear` finds the Linear by walking back through those ops, requiring that
nothing else reads any value on the way (nobody else may see the scaled values) and that the
Linear has exactly as many output channels as ``x`` (grouped-query attention, where one value
head feeds several query heads, does not qualify: its heads would need tied scales).
The walk trusts channel order through the layout ops; :func:`verify_row_folds` checks it
numerically on the example inputs, and a fold that does not reproduce ``x * s`` is not made.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.fx

from ..graph.block_order import probe_batches
from ..graph.copy import copy_graph_module
from ..graph.ops import aten, tensor_val
from ..graph.probe import probe
from ..graph.weight_source import rewrite_input_tensor
from ..quantizers.observers import observation_paused

# ops that move elements of one tensor around without mixing values (channel order is checked
# numerically, not assumed)
_LAYOUT = {
    aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.transpose.int,
    aten.permute.default, aten.contiguous.default, aten.clone.default, aten.alias.default,
    aten.unsqueeze.default, aten.squeeze.dim, aten.squeeze.dims, aten.expand.default, aten.dropout.default,
}


def _stored(node: object) -> bool:
    return isinstance(node, torch.fx.Node) and node.op == "get_attr"


def _linear_with_stored_weight(node: torch.fx.Node) -> bool:
    """A Linear whose weight is stored (or a stored tensor times Quadapter's 1/s columns, which
    the fold turns into a stored one first) and whose bias, if any, is stored."""
    if node.op != "call_function" or node.target is not aten.linear.default:
        return False
    weight, bias = node.args[1], node.args[2] if len(node.args) > 2 else None
    stored = _stored(weight) or (isinstance(weight, torch.fx.Node) and weight.target is aten.mul.Tensor
                                 and _stored(weight.args[0]))
    return stored and (bias is None or _stored(bias))


def row_scalable_linear(operand: torch.fx.Node, channels: int) -> torch.fx.Node | None:
    """The Linear whose output rows map onto ``operand``'s last-axis channels, or None."""
    node = operand
    while True:
        if len(node.users) != 1:  # another reader would see the scaled values
            return None
        if _linear_with_stored_weight(node):
            out = tensor_val(node)
            return node if out is not None and out.dim() > 0 and int(out.shape[-1]) == channels else None
        if node.op != "call_function":
            return None
        if node.target in _LAYOUT:
            nxt = node.args[0]
        elif node.target is aten.matmul.default:  # probs @ V: V's channels are the output's
            nxt = node.args[1]
        elif node.target is aten.mul.Tensor:  # act(gate) * up: exactly one factor may lead to a Linear
            found = [a for a in node.args[:2] if isinstance(a, torch.fx.Node)
                     and row_scalable_linear(a, channels) is not None]
            if len(found) != 1 or not all(isinstance(a, torch.fx.Node) for a in node.args[:2]):
                return None
            nxt = found[0]
        else:
            return None
        if not isinstance(nxt, torch.fx.Node):
            return None
        node = nxt


def scale_rows(gm: torch.fx.GraphModule, linear: torch.fx.Node, scale: torch.Tensor, suffix: str) -> None:
    """Multiply ``linear``'s output channel c (weight row c and bias c) by ``scale[c]``, in new
    tensors (a weight shared with another reader is untied; on a graph captured without weights,
    computed when its block loads them: :func:`~outlierfx.graph.weight_source.rewrite_input_tensor`)."""
    weight = linear.args[1]
    rewrite_input_tensor(gm, linear, weight, lambda w: w * scale[:, None], "s on the output rows: diag(s) W", suffix,
                         lambda w: w.mul_(scale[:, None]))
    bias = linear.args[2] if len(linear.args) > 2 else None
    if isinstance(bias, torch.fx.Node):
        rewrite_input_tensor(gm, linear, bias, lambda b: b * scale, "s on the output rows: s b", suffix)


def verify_row_folds(gm: torch.fx.GraphModule, folds: Mapping[str, tuple[torch.fx.Node, torch.fx.Node, torch.Tensor]],
                     inputs: tuple[tuple, dict], rel_tol: float = 1e-4) -> set[str]:
    """The keys of ``folds`` (key -> (scaled node ``x * s``, upstream Linear, s)) whose fold, all
    made together on a copy, reproduces ``x * s`` on ``inputs``. Observers are paused."""
    ok = set(folds)
    want = _values(gm, [folds[k][0] for k in ok], inputs)
    for _ in range(len(folds) + 1):  # a wrong fold also shifts later sites: drop it, check again
        trial = copy_graph_module(gm)
        by_name = {n.name: n for n in trial.graph.nodes}
        for key in ok:  # y * s after the Linear is what scaling its rows computes
            scaled, linear, scale = folds[key]
            trial_linear = by_name[linear.name]
            attr = f"outlierfx_trial_row_scale_{key}"
            trial.register_buffer(attr, scale)
            with trial.graph.inserting_after(trial_linear):
                s_node = trial.graph.get_attr(attr)
            with trial.graph.inserting_after(s_node):
                out = trial.graph.call_function(aten.mul.Tensor, (trial_linear, s_node))
            trial_linear.replace_all_uses_with(out, delete_user_cb=lambda user, out=out: user is not out)
            new_scaled = by_name[scaled.name]
            new_scaled.replace_all_uses_with(new_scaled.args[0])
        trial.recompile()
        got = _values(trial, [by_name[folds[k][0].name].args[0] for k in ok], inputs)
        wrong = set()
        for key in ok:
            scaled = folds[key][0]
            expected, actual = want[scaled.name], got[scaled.args[0].name]
            tol = rel_tol * float(expected.abs().max()) + 1e-12
            if actual.shape != expected.shape or float((actual - expected).abs().max()) > tol:
                wrong.add(key)
        if not wrong:
            return ok
        order = {n: i for i, n in enumerate(gm.graph.nodes)}
        ok.discard(min(wrong, key=lambda k: order[folds[k][0]]))
    return ok


def _values(gm: torch.fx.GraphModule, nodes: list[torch.fx.Node], inputs: tuple[tuple, dict]
            ) -> dict[str, torch.Tensor]:
    """The values of ``nodes`` on ``inputs``, by node name (observers paused); keyword inputs run
    in block order on a graph captured without weights (:func:`probe_batches`)."""
    seen: dict[str, torch.Tensor] = {}
    with observation_paused():
        if inputs[0]:  # positional inputs: a graph holding its weights (block order takes keywords)
            probe(gm, nodes, inputs, lambda n, v: seen.__setitem__(n.name, v))
        else:
            probe_batches(gm, nodes, [inputs[1]], lambda n, _, v: seen.__setitem__(n.name, v))
    return seen
