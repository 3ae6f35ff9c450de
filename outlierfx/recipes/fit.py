"""Before calibration: which Linears a backend will run as whole int8 GEMMs under a recipe.

Once observers are in, every Linear's input spec is known (PEG groups, bit width, a first-token
grid). The backend's own per-Linear decision (:meth:`outlierfx.backends.Backend.linear_kernel`)
then says what lowering will make of it, so a recipe that turns Linears into sub-GEMMs or leaves
them simulated is flagged before calibration time is spent, not discovered after lowering.
"""

from __future__ import annotations

import dataclasses
from collections import Counter

import torch.fx

from ..graph.ops import OpKind, op_kind
from ..quantizers.observers import Observer
from ..quantizers.spec import QuantSpec


@dataclasses.dataclass(frozen=True)
class BackendFit:
    backend: str
    linears: int
    whole_gemms: int  # Linears that lower to one int8 GEMM
    others: tuple[tuple[str, int], ...]  # (kernel description, count) for the rest

    @property
    def whole_int8(self) -> bool:
        return self.whole_gemms == self.linears

    def summary(self) -> str:
        if self.whole_int8:
            return f"all {self.linears} Linears run as one int8 GEMM each on {self.backend}"
        rest = "; ".join(f"{n} x {kernel}" for kernel, n in self.others)
        return (f"{self.linears - self.whole_gemms} of {self.linears} Linears will not run as one int8 GEMM on "
                f"{self.backend} ({rest}): expect a slower model than the 'fast' preset")


def backend_fit(gm: torch.fx.GraphModule, backend: str, weight: QuantSpec | None) -> BackendFit:
    """What ``backend`` will make of each Linear of ``gm`` (observers in, not yet calibrated)."""
    from ..backends import get_backend

    chosen = get_backend(backend)
    whole, others = 0, Counter()
    linears = [n for n in gm.graph.nodes if op_kind(n) is OpKind.LINEAR]
    for linear in linears:
        kernel = chosen.linear_kernel(_input_spec(gm, linear), weight)
        if kernel.whole_int8_gemm:
            whole += 1
        else:
            others[kernel.describe()] += 1
    return BackendFit(backend, len(linears), whole, tuple(sorted(others.items())))


def _input_spec(gm: torch.fx.GraphModule, linear: torch.fx.Node) -> QuantSpec | None:
    source = linear.args[0]
    if isinstance(source, torch.fx.Node) and source.op == "call_module":
        module = gm.get_submodule(str(source.target))
        if isinstance(module, Observer):
            return module.spec
    return None
