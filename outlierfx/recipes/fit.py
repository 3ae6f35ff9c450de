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
    from ..backends import FirstTokens, KernelKind, get_backend

    chosen = get_backend(backend)
    whole, others = 0, Counter()
    linears = [n for n in gm.graph.nodes if op_kind(n) is OpKind.LINEAR]
    for linear in linears:
        readers = list(linear.users)
        output = _observer_spec(gm, readers[0]) if len(readers) == 1 else None
        kernel = chosen.linear_kernel(_observer_spec(gm, linear.args[0]), weight, output)
        # a first-token grid the torch.ao engines run as a second full GEMM doubles the cost
        if kernel.kind is KernelKind.INT8_GEMM and kernel.first_tokens is not FirstTokens.TWO_GEMMS:
            whole += 1
        else:
            others[kernel.describe()] += 1
    return BackendFit(backend, len(linears), whole, tuple(sorted(others.items())))


def _observer_spec(gm: torch.fx.GraphModule, node: object) -> QuantSpec | None:
    if isinstance(node, torch.fx.Node) and node.op == "call_module":
        module = gm.get_submodule(str(node.target))
        if isinstance(module, Observer):
            return module.spec
    return None
