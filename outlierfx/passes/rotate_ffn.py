"""RotateFFN (QuaRot, Ashkboos et al. 2024): an online Hadamard transform before each FFN's
output Linear, its inverse folded into that Linear's weight.

The FFN's output Linear (down_proj, BERT's output.dense, GPT-2's c_proj) reads the SwiGLU/GELU
output, where decoders make their massive activations: a few channels hundreds of times larger
than the rest, which a per-tensor int8 grid spends its range on. The activation between the
FFN's Linears does not commute with a rotation, so no weight can carry it on the input side;
instead the pass inserts ``x -> x H`` (:data:`~outlierfx.graph.hadamard_op.HADAMARD`, H a seeded
Kronecker Hadamard matrix, ``c + p`` multiply-adds per element) and rotates the Linear's weight
W -> W H, so ``(x H)(W H)^T = x W^T``: exact for every architecture. The run-time cost is the
transform, a float op before the int8 GEMM's input quantization; the plan states it per token.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.fx

from ..graph import meta
from ..graph.attrs import set_attr, unique_attr_name
from ..graph.hadamard_op import HADAMARD
from ..graph.ops import OpKind, has_stored_weight, is_kind, tensor_val
from ..graph.view import GraphView
from ..quantizers.hadamard import KroneckerRotation, kronecker_hadamard
from .base import GraphPass
from .rotation_folding import RIGHT, check_tensors, fold

NAME = "RotateFFN"


@dataclasses.dataclass(frozen=True)
class RotateFFNPlan:
    width: int  # the FFN's inner width (the output Linear's in_features)
    seed: int
    linears: tuple[torch.fx.Node, ...]  # the FFN output Linears whose input is rotated
    blockers: tuple[tuple[str, str], ...]
    rotation: KroneckerRotation | None = dataclasses.field(default=None, repr=False, compare=False)

    def summary(self) -> str:
        if not self.linears:
            lines = ["no FFN output rotated"]
        else:
            r = self.rotation
            c, p = r.left.matrix.shape[0], r.right.matrix.shape[0]
            lines = [f"online Hadamard transform (d={self.width} = {c} x {p}: {r.construction}, seed {self.seed}, "
                     f"{c + p} multiply-adds per element) before {len(self.linears)} FFN output Linears, "
                     f"their weights rotated to match"]
        return "\n".join(lines + [f"  not rotated at {where}: {why}" for where, why in self.blockers])


class RotateFFN(GraphPass[RotateFFNPlan]):
    """Rotate the input of every FFN output Linear online (see module docstring)."""

    # fp32 rounding: the transform's two GEMMs and the rotated weight's longer sums; measured on
    # generated models in tests/test_rotate_ffn.py
    output_rel_tol = 1e-5

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed

    def analyze(self, gm: torch.fx.GraphModule) -> RotateFFNPlan:
        blockers: list[tuple[str, str]] = []
        linears = []
        for res in GraphView(gm).residual_adds:
            if res.kind != "mlp":
                continue
            if not is_kind(res.branch, OpKind.LINEAR) or not has_stored_weight(res.branch):
                blockers.append((_where(res.branch), f"the FFN ends in {res.branch.target}, not a Linear with a "
                                                     f"stored weight"))
                continue
            linears.append(res.branch)
        widths = {int(tensor_val(n.args[1]).shape[-1]) for n in linears}
        if len(widths) > 1:
            return RotateFFNPlan(0, self.seed, (), (("graph", f"FFNs of several widths {sorted(widths)}"),))
        shared: list[tuple[str, str]] = []
        check_tensors(gm, [(n, n.args[1], RIGHT) for n in linears], shared, _where)
        if shared or not linears:
            return RotateFFNPlan(0, self.seed, (), tuple(blockers + shared))
        width = widths.pop()
        return RotateFFNPlan(width, self.seed, tuple(linears), tuple(blockers), kronecker_hadamard(width, self.seed))

    def apply(self, gm: torch.fx.GraphModule, plan: RotateFFNPlan) -> bool:
        if not plan.linears:
            return False
        r = plan.rotation
        q = r.matrix  # built once: each Linear's recorded rotation shares it (30 copies: 560 MB on SmolLM2)
        fold(gm, {str(n.args[1].target): (RIGHT, q) for n in plan.linears}, NAME)
        dtype = tensor_val(plan.linears[0].args[1]).dtype
        left, right = unique_attr_name(gm, "ffn_hadamard_left"), unique_attr_name(gm, "ffn_hadamard_right")
        set_attr(gm, left, r.left.matrix.to(dtype).contiguous())
        set_attr(gm, right, r.right.matrix.to(dtype).contiguous())
        for linear in plan.linears:
            source = linear.args[0]
            with gm.graph.inserting_before(linear):
                nodes = [gm.graph.get_attr(left), gm.graph.get_attr(right)]
                rotated = gm.graph.call_function(HADAMARD, (source, *nodes))
            for node in (*nodes, rotated):
                meta.inherit(node, linear, NAME)
            linear.replace_input_with(source, rotated)
        return True


def _where(node: torch.fx.Node) -> str:
    return meta.module_path(node) or node.name
