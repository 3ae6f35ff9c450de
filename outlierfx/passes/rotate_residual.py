"""RotateResidual (QuaRot, Ashkboos et al. 2024): rotate the residual stream by a seeded
orthogonal (randomized Hadamard) matrix Q, folded into the weights around it.

Every hidden state h becomes h Q. For orthogonal Q, RMSNorm without gamma commutes with it
(``rms(h Q) = rms(h)``, eps included), so the rotation is carried by weights alone:
- each embedding table E -> E Q (a table tied to the lm_head gets the same E Q: both stay tied;
  an embedding scaled by a scalar, Gemma's sqrt(hidden), stays rotated);
- each Linear writing into the stream (o_proj, down_proj; ``y = x W^T + b``): W -> Q^T W, b -> b Q;
- each Linear reading a norm of the stream (q/k/v, gate/up, lm_head): W -> W Q;
- a graph output that returns the stream, or a norm of it (a base model's last_hidden_state,
  possibly through MigrateGamma's ``* gamma``), gets an explicit ``x @ Q^T``, listed in the plan.
No op is added inside the model, so the run-time cost is zero; what changes is that outlier
channels of the stream are spread over all channels, which per-tensor int8 grids need.

Norm gamma must be gone first (``MigrateGamma()`` folds it into the Linears reading the norm):
a rotated norm input times a per-channel gamma is not the rotated output. The pass refuses such
a graph with a :class:`~outlierfx.errors.PassError`. Where the rotation cannot be exact it does
not apply and the graph is unchanged, the plan saying where and why: LayerNorm subtracts the
mean, which does not commute with a rotation of its input (GPT-2, and post-LN encoders such as
BERT, whose norm outputs also sit on the stream); learned absolute position embeddings added to
the stream; any other op reading or writing the stream.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
import torch.fx

from ..errors import PassError
from ..graph import meta
from ..graph.attrs import set_attr, unique_attr_name
from ..graph.ops import OpKind, aten, is_kind, tensor_val
from ..graph.view import GraphView
from ..quantizers.hadamard import Rotation, hadamard
from .base import GraphPass
from .rotation_folding import RIGHT, Use, check_tensors, fold, linear_uses

NAME = "RotateResidual"


@dataclasses.dataclass(frozen=True)
class RotateResidualPlan:
    hidden_size: int
    seed: int
    construction: str  # how Q was built (see outlierfx.quantizers.hadamard); "" when not applicable
    embeddings: tuple[torch.fx.Node, ...]
    writers: tuple[torch.fx.Node, ...]  # Linears adding into the stream: W -> Q^T W, b -> b Q
    readers: tuple[torch.fx.Node, ...]  # Linears reading a norm of the stream: W -> W Q
    unrotated_outputs: tuple[tuple[torch.fx.Node, torch.fx.Node], ...]  # (consumer, operand) given x @ Q^T
    tied: tuple[str, ...]  # tensors read by several rotated ops, rotated once and kept shared
    blockers: tuple[tuple[str, str], ...]  # (where, why the rotation would not be exact)
    rotation: torch.Tensor | None = dataclasses.field(default=None, repr=False, compare=False)

    @property
    def applicable(self) -> bool:
        return not self.blockers

    def summary(self) -> str:
        if not self.applicable:
            lines = ["residual stream not rotated: the rotation would not be exact here"]
            return "\n".join(lines + [f"  {where}: {why}" for where, why in self.blockers])
        how = self.construction if self.construction.startswith("a given") else f"{self.construction}, seed {self.seed}"
        lines = [f"rotated the residual stream (d={self.hidden_size}) by {how}: "
                 f"{len(self.embeddings)} embeddings, {len(self.writers)} writing linears, "
                 f"{len(self.readers)} reading linears"]
        if self.tied:
            lines.append(f"tied tensors rotated once and kept shared: {list(self.tied)}")
        for consumer, operand in self.unrotated_outputs:
            where = "the graph output" if consumer.op == "output" else f"{consumer.name} (feeding the graph output)"
            lines.append(f"{where} reads the rotated stream ({operand.name}): explicit x @ Q^T added before it")
        return "\n".join(lines)


class RotateResidual(GraphPass[RotateResidualPlan]):
    """Rotate the residual stream of a pre-norm RMSNorm decoder (see module docstring)."""

    # fp32 rounding only: the rotated weights are computed in float64 and rounded once, but every
    # matmul then sums d products of different (spread) values. Measured against the unrotated
    # graph on 120 generated Llama/Qwen2/Mistral models with 200x gamma and 20-100x embedding
    # outliers: at most 2.6e-6 of the output's max magnitude (MigrateGamma itself: 1.5e-6).
    output_rel_tol = 1e-5

    # a given matrix must be orthogonal to this (float64 max |Q^T Q - I|): the fold is exact only
    # for an orthogonal Q, and a float32 matrix saved from training is orthogonal to about 1e-6
    orthogonality_tol = 1e-5

    def __init__(self, seed: int = 0, matrix: torch.Tensor | None = None) -> None:
        """``matrix``: a given d x d orthogonal Q (e.g. a rotation learned offline, SpinQuant's R1)
        instead of the seeded randomized Hadamard; checked for shape and orthogonality."""
        self.seed = seed
        self.matrix = None if matrix is None else self._checked(matrix)

    def _checked(self, matrix: torch.Tensor) -> torch.Tensor:
        q = torch.as_tensor(matrix).detach().to("cpu", torch.float64)
        if q.dim() != 2 or q.shape[0] != q.shape[1]:
            raise PassError(f"{NAME}: the given rotation must be a square matrix, got shape {tuple(q.shape)}")
        error = float((q.T @ q - torch.eye(q.shape[0], dtype=torch.float64)).abs().max())
        if not error <= self.orthogonality_tol:
            raise PassError(f"{NAME}: the given rotation is not orthogonal (max |Q^T Q - I| = {error:.2e}, "
                            f"tolerance {self.orthogonality_tol:g}); orthogonalize it first, e.g. U V^T of its SVD")
        return q

    def analyze(self, gm: torch.fx.GraphModule) -> RotateResidualPlan:
        view = GraphView(gm)
        blockers: list[tuple[str, str]] = []
        embeddings, writers, readers, outputs, with_gamma = _structure(view, blockers)
        tied = check_tensors(gm, _tensor_uses(embeddings, readers, writers), blockers, _where)
        hidden = _hidden_size(_stream(view))
        if blockers:
            return RotateResidualPlan(hidden, self.seed, "", (), (), (), (), (), tuple(dict.fromkeys(blockers)))
        if with_gamma:
            raise PassError(f"{NAME}: norms {with_gamma} still carry gamma, which does not commute with the "
                            f"rotation; run MigrateGamma() first (it folds gamma into the Linears reading the norm)")
        if self.matrix is None:
            rotation = hadamard(hidden, self.seed)
        elif self.matrix.shape[0] != hidden:
            raise PassError(f"{NAME}: the given rotation is {self.matrix.shape[0]} x {self.matrix.shape[0]}, but the "
                            f"residual stream is {hidden} wide")
        else:
            rotation = Rotation(self.matrix, "a given orthogonal matrix")
        return RotateResidualPlan(hidden, self.seed, rotation.construction, tuple(embeddings), tuple(writers),
                                  tuple(dict.fromkeys(readers)), tuple(outputs), tied, (), rotation.matrix)

    def apply(self, gm: torch.fx.GraphModule, plan: RotateResidualPlan) -> bool:
        if not plan.applicable:
            return False
        q = plan.rotation
        uses = _tensor_uses(plan.embeddings, plan.readers, plan.writers)
        fold(gm, {str(tensor.target): (how, q) for _, tensor, how in uses}, NAME)
        if plan.unrotated_outputs:
            target = unique_attr_name(gm, "residual_rotation_inverse")
            dtype = tensor_val(plan.unrotated_outputs[0][1]).dtype
            set_attr(gm, target, q.T.contiguous().to(dtype))
            for consumer, operand in plan.unrotated_outputs:
                with gm.graph.inserting_before(consumer):
                    inverse = gm.graph.get_attr(target)
                    restored = gm.graph.call_function(aten.matmul.default, (operand, inverse))
                meta.inherit(inverse, operand, NAME)
                meta.inherit(restored, operand, NAME)
                consumer.replace_input_with(operand, restored)
        return True


def residual_rotation_blockers(gm: torch.fx.GraphModule) -> tuple[tuple[str, str], ...]:
    """Where and why the residual stream of ``gm`` cannot be rotated exactly (empty: it can,
    once norm gamma is migrated): the structural test behind the ``fast`` preset's choice."""
    blockers: list[tuple[str, str]] = []
    embeddings, writers, readers, _, _ = _structure(GraphView(gm), blockers)
    check_tensors(gm, _tensor_uses(embeddings, readers, writers), blockers, _where)
    return tuple(dict.fromkeys(blockers))


def _structure(view: GraphView, blockers: list[tuple[str, str]]):
    """(embeddings, writers, readers, unrotated outputs, norms with gamma); ``blockers`` gets
    whatever keeps the rotation from being exact."""
    if not view.residual_adds:
        blockers.append(("graph", "no residual stream found"))
    embeddings, writers = _sources_and_writers(view, blockers)
    readers, outputs, with_gamma = _readers(view, blockers)
    return embeddings, writers, readers, outputs, with_gamma


def _embedding_times_scalar(view: GraphView, node: torch.fx.Node) -> torch.fx.Node | None:
    """The embedding ``node`` is, or is times a scalar (Gemma multiplies by sqrt(hidden)): a
    rotation of the table commutes with the scalar, so the product is rotated too."""
    if node.target is aten.mul.Tensor and len(node.args) == 2:
        factors = [a for a in node.args if not _is_scalar(view, a)]
        node = factors[0] if len(factors) == 1 else node
    return node if is_kind(node, OpKind.EMBEDDING) else None


def _is_scalar(view: GraphView, value: object) -> bool:
    """A Python number, or a one-element tensor computed from parameters only."""
    if isinstance(value, (int, float)):
        return True
    val = tensor_val(value)
    return isinstance(value, torch.fx.Node) and view.is_constant(value) and val is not None and val.numel() == 1


def _stream(view: GraphView) -> set[torch.fx.Node]:
    """The tensors carrying the hidden state: every residual add and every shortcut."""
    return {r.add for r in view.residual_adds} | {r.shortcut for r in view.residual_adds}


def _sources_and_writers(view: GraphView, blockers: list[tuple[str, str]]
                         ) -> tuple[list[torch.fx.Node], list[torch.fx.Node]]:
    """The embeddings the stream starts at and the Linears adding into it; ``blockers`` gets
    whatever else starts or writes the stream."""
    adds = {r.add for r in view.residual_adds}
    embeddings, writers = [], []
    for r in view.residual_adds:
        if is_kind(r.branch, OpKind.LINEAR):
            writers.append(r.branch)
        elif is_kind(r.branch, OpKind.RMS_NORM, OpKind.LAYER_NORM):
            blockers.append((_where(r.branch), "a norm writes the stream (a sandwich norm after the sublayer): "
                                               "its per-channel gain does not commute with the rotation, and "
                                               "MigrateGamma cannot move it into the residual add"))
        else:
            blockers.append((_where(r.branch), f"writes the stream through {r.branch.target}, not a Linear"))
        if r.shortcut in adds:
            continue
        embedding = _embedding_times_scalar(view, r.shortcut)
        if embedding is not None and embedding.args[0].op == "get_attr":
            embeddings.append(embedding)
        elif is_kind(r.origin, OpKind.LAYER_NORM, OpKind.RMS_NORM):
            blockers.append((_where(r.origin), "post-LN: the stream is a norm output, and LayerNorm does not "
                                               "commute with a rotation of its input"))
        elif is_kind(r.shortcut, OpKind.ADD) and any(is_kind(a, OpKind.EMBEDDING) for a in r.shortcut.args[:2]):
            blockers.append((_where(r.shortcut), "learned absolute position embeddings are added to the stream"))
        else:
            blockers.append((_where(r.shortcut), f"the stream starts at {r.shortcut.target}, not an embedding"))
    return embeddings, writers


def _readers(view: GraphView, blockers: list[tuple[str, str]]
             ) -> tuple[list[torch.fx.Node], list[tuple[torch.fx.Node, torch.fx.Node]], list[str]]:
    """The Linears reading an RMSNorm of the stream, the (consumer, operand) edges into the graph
    output that need ``x @ Q^T``, and the stream norms still carrying gamma; ``blockers`` gets
    every other reader of the stream."""
    shortcut_of = {r.add: r.shortcut for r in view.residual_adds}
    sites = {site.norm: site for site in view.norm_sites}
    readers, outputs, with_gamma = [], [], []
    for node in sorted(_stream(view), key=view.order.__getitem__):
        for user in node.users:
            if shortcut_of.get(user) is node:
                continue
            if user.op == "output":
                outputs.append((user, node))
                continue
            site = sites.get(user)
            if site is None or user.args[0] is not node:
                blockers.append((_where(user), f"{user.target} reads the stream and cannot absorb a rotation"))
            elif site.kind is OpKind.LAYER_NORM:
                blockers.append((_where(user), "LayerNorm subtracts the mean, which does not commute with a "
                                               "rotation of its input (post-LN encoders, GPT-2)"))
            elif site.is_post_ln:
                blockers.append((_where(user), "the norm output is carried on the stream (post-LN)"))
            else:
                if len(user.args) > 2 and user.args[2] is not None:
                    with_gamma.append(_where(user))
                readers += site.linears
                for other in site.others:
                    # the graph output, or an op feeding only the output (MigrateGamma's "* gamma" on
                    # a base model's last_hidden_state): un-rotate the edge into it
                    if other.op == "output" or (other.users and all(u.op == "output" for u in other.users)):
                        outputs.append((other, site.operand(other)))
                    else:
                        blockers.append((_where(other), f"{other.target} reads a norm of the stream"))
    return readers, outputs, with_gamma


def _tensor_uses(embeddings: Sequence[torch.fx.Node], readers: Sequence[torch.fx.Node],
                 writers: Sequence[torch.fx.Node]) -> list[Use]:
    """(consumer, the tensor argument to rotate, how) for every tensor the rotation touches."""
    return [(n, n.args[0], RIGHT) for n in embeddings] + linear_uses(readers, writers)


def _hidden_size(stream: set[torch.fx.Node]) -> int:
    for node in stream:
        val = tensor_val(node)
        if val is not None:
            return int(val.shape[-1])
    return -1


def _where(node: torch.fx.Node) -> str:
    return meta.module_path(node) or node.name
