"""Lowered int8 Linears against the fake-quant computation, one op at a time (issue 25, stage 3:
"matches the fake-quant model within one output quantization step").

A whole model's output has no single grid: one rounding tie early on moves later values by
more than a step once norms and softmax mix them. So each int8 GEMM of a lowered graph is
checked on the input the lowered graph itself gives it, against what the fake-quant graph
computes from that input (fake-quantize it, multiply by the dequantized int8 weight, add the
bias, then any fused GELU, residual add and requantization). The allowed difference is one step
of the GEMM's output grid:

- a requantized output (uint8 codes): one step of that grid (the larger one where the first
  tokens have a grid of their own);
- a bfloat16 output (Q/K/V GEMMs behind bf16 attention): one bfloat16 step at that value;
- a float32 output: float rounding only (``FLOAT_OUTPUT_REL_TOL`` of the output's largest
  magnitude), since both sides multiply the same integer codes.

:func:`assert_int8_linears_within_one_step` checks the eager engines' graphs (``QuantizedLinear``
modules); :func:`assert_reference_gemms_within_one_step` the decomposed reference form, which is
what inductor compiles (compiled kernels cannot be probed).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.fx

from ..backends.int8_linear import QuantizedLinear
from ..backends.reference import DQ_CHANNEL, DQ_TENSOR, Q_TENSOR
from ..graph.ops import is_call
from ..graph.probe import probe

FLOAT_OUTPUT_REL_TOL = 1e-4
"""Float32 outputs: summation order differs between the int8 kernel and the float GEMM on grid
values (measured differences are ~1e-6 of the output's max)."""
_SLACK = 1.001  # one step, plus the float error of computing the step itself


def quantized_linears(gm: torch.fx.GraphModule) -> dict[torch.fx.Node, QuantizedLinear]:
    """The eager int8 GEMMs of a lowered graph, by the node that calls each."""
    return {n: gm.get_submodule(str(n.target)) for n in gm.graph.nodes
            if n.op == "call_module" and isinstance(gm.get_submodule(str(n.target)), QuantizedLinear)}


def _on_grids(codes: torch.Tensor, grid: tuple, first: tuple | None, n: int) -> torch.Tensor:
    """Plain uint8 codes as values; the first ``n`` positions on ``first`` if given."""
    values = (codes.float() - grid[1]) * grid[0]
    if first is not None and codes.dim() >= 3 and codes.shape[1] > n:
        values[:, :n] = (codes[:, :n].float() - first[1]) * first[0]
    return values


def fake_quant_linear(module: QuantizedLinear, x: torch.Tensor) -> torch.Tensor:
    """What the fake-quant graph computes for this Linear from ``x``: float math on grid values."""
    n, *sink = module.sink if module.sink is not None else (0, None)
    if x.dtype == torch.uint8:  # onednn reads the plain codes (of two grids, with a first-token grid)
        x = _on_grids(x, (module.in_scale, module.in_zero_point), tuple(sink) if n else None, n)
    else:
        grid = x.dequantize() if x.is_quantized else torch.fake_quantize_per_tensor_affine(
            x, module.in_scale, module.in_zero_point, module.in_qmin, module.in_qmax)
        if n and not x.is_quantized and x.dim() >= 3 and x.shape[1] > n:  # the first tokens on their own grid
            grid[:, :n] = torch.fake_quantize_per_tensor_affine(x[:, :n], *sink, 0, 255)
        x = grid
    weight = module.int8_weight().float() * module.weight_scale.float()[:, None]
    y = torch.nn.functional.linear(x, weight, module.bias)
    if module.gelu is not None:
        y = torch.nn.functional.gelu(y, approximate=module.gelu)
    if module.out_qparams is not None:
        n_out, first_grid = _first_token_output_grid(module)
        head = y[:, :n_out].clone() if n_out and y.dim() >= 3 and y.shape[1] > n_out else None
        y = torch.fake_quantize_per_tensor_affine(y, *module.out_qparams, 0, 255)
        if head is not None:
            y[:, :n_out] = torch.fake_quantize_per_tensor_affine(head, *first_grid, 0, 255)
    return y


def _first_token_output_grid(module: QuantizedLinear) -> tuple[int, tuple[float, int]]:
    """How many first positions of a requantized output have a grid of their own, and that grid
    (a first-token output grid; else the output grid, for the first-token input rows)."""
    if module.sink_out is not None:
        return module.sink_out[0], module.sink_out[1:]
    return (module.sink[0] if module.sink is not None else 0), module.out_qparams


def _float_step(reference: torch.Tensor) -> float:
    return FLOAT_OUTPUT_REL_TOL * float(reference.abs().max()) + 1e-6


def bfloat16_step(values: torch.Tensor) -> torch.Tensor:
    """One bfloat16 step (8 significant bits) at each of ``values``."""
    _, exponent = torch.frexp(values.float().abs())
    return torch.ldexp(torch.ones_like(values, dtype=torch.float32), exponent - 8)


def _assert_within(name: str, out: torch.Tensor, ref: torch.Tensor, step: float | torch.Tensor, grid: str) -> None:
    excess = (out.float() - ref).abs() - step * _SLACK
    if float(excess.max()) > 0:
        worst = int(excess.flatten().argmax())
        raise AssertionError(f"int8 GEMM {name} differs from the fake-quant Linear by more than one step of its "
                             f"{grid} output: {float(out.flatten()[worst])} vs {float(ref.flatten()[worst])}")


def assert_int8_linears_within_one_step(lowered: torch.fx.GraphModule, inputs: dict[str, torch.Tensor]) -> int:
    """Each ``QuantizedLinear`` of an eager-engine graph, run on the input the graph gives it,
    equals :func:`fake_quant_linear` within one step of its output grid. Returns how many were
    checked (at least one)."""
    modules = quantized_linears(lowered)
    assert modules, "no Linear was lowered to an int8 kernel"
    seen: dict[torch.fx.Node, torch.Tensor] = {}
    probe(lowered, [a for n in modules for a in n.args], ((), inputs), _keep_a_copy(seen))
    for node, module in modules.items():
        x, *residual = (seen[a] for a in node.args)
        with torch.no_grad():
            out = module(x, *residual)
            if out.dtype == torch.uint8:  # plain codes for the next onednn GEMM
                n_out, first_grid = _first_token_output_grid(module)
                out = _on_grids(out, module.out_qparams, first_grid, n_out)
            out = out.dequantize() if out.is_quantized else out
            ref = fake_quant_linear(module, x) + (residual[0] if residual else 0.0)
        if module.out_qparams:
            first_tokens_scale = module.sink_out[1] if module.sink_out else 0.0
            _assert_within(node.name, out, ref, max(module.out_qparams[0], first_tokens_scale), "uint8")
        elif out.dtype == torch.bfloat16:
            _assert_within(node.name, out, ref, bfloat16_step(ref) + _float_step(ref), "bfloat16")
        else:
            _assert_within(node.name, out, ref, _float_step(ref), "float32")
    return len(modules)


def reference_gemms(gm: torch.fx.GraphModule) -> list[torch.fx.Node]:
    """The int8 GEMMs of the reference form: ``linear`` nodes reading an int8 weight."""
    return [n for n in gm.graph.nodes if is_call(n, torch.ops.aten.linear.default) and is_call(n.args[1], DQ_CHANNEL)]


def assert_reference_gemms_within_one_step(reference: torch.fx.GraphModule, inputs: dict[str, torch.Tensor]) -> int:
    """Each int8 GEMM of the reference form (``linear(dequantize(quantize(x)), dequantize(W), b)``,
    requantized or not) equals the fake-quant Linear on the ``x`` the graph gives it within one
    step of its output grid. Forms this does not read (PEG sub-GEMMs, first-token rows, bf16
    GEMMs) fail rather than pass unchecked. Returns how many were checked (at least one)."""
    gemms = reference_gemms(reference)
    assert gemms, "no Linear was lowered to an int8 GEMM"
    requantized = {g: next(iter(g.users)) for g in gemms if len(g.users) == 1 and is_call(next(iter(g.users)), Q_TENSOR)}
    for gemm in gemms:
        dq = gemm.args[0]
        if not (is_call(dq, DQ_TENSOR) and is_call(dq.args[0], Q_TENSOR)):
            raise AssertionError(f"{gemm.name}: the input is not one per-tensor quantize/dequantize ({dq})")
    watched = [g.args[0].args[0].args[0] for g in gemms] + gemms + list(requantized.values())
    seen: dict[torch.fx.Node, torch.Tensor] = {}
    probe(reference, watched, ((), inputs), _keep_a_copy(seen))
    for gemm in gemms:
        _, scale, zero_point, qmin, qmax, _ = gemm.args[0].args[0].args
        codes, w_scale, w_zero_point, axis, *_ = gemm.args[1].args
        weight = (_constant(reference, codes).float() - _constant(reference, w_zero_point).float()[:, None]) \
            * _constant(reference, w_scale).float()[:, None]
        assert axis == 0, f"{gemm.name}: weights quantized along axis {axis}"
        bias = _constant(reference, gemm.args[2]) if len(gemm.args) > 2 and gemm.args[2] is not None else None
        x = seen[gemm.args[0].args[0].args[0]]
        with torch.no_grad():
            ref = torch.nn.functional.linear(
                torch.fake_quantize_per_tensor_affine(x, float(scale), int(zero_point), int(qmin), int(qmax)),
                weight, bias)
        quantize = requantized.get(gemm)
        if quantize is None:
            _assert_within(gemm.name, seen[gemm], ref, _float_step(ref), "float32")
            continue
        _, out_scale, out_zero_point, out_qmin, out_qmax, _ = quantize.args
        out = (seen[quantize].float() - out_zero_point) * out_scale
        ref = torch.fake_quantize_per_tensor_affine(ref, float(out_scale), int(out_zero_point), int(out_qmin),
                                                    int(out_qmax))
        _assert_within(gemm.name, out, ref, float(out_scale), "uint8")
    return len(gemms)


def _keep_a_copy(seen: dict[torch.fx.Node, torch.Tensor]) -> Callable[[torch.fx.Node, torch.Tensor], None]:
    """A probe callback that stores a copy: a later in-place op (Falcon adds the attention output
    into the MLP output with ``add_``) must not change the value seen."""
    def keep(node: torch.fx.Node, value: torch.Tensor) -> None:
        seen[node] = value.clone()
    return keep


def _constant(gm: torch.fx.GraphModule, node: object) -> torch.Tensor:
    from ..graph.attrs import fetch_attr

    if not (isinstance(node, torch.fx.Node) and node.op == "get_attr"):
        raise AssertionError(f"expected a constant of the graph, got {node}")
    return fetch_attr(gm, str(node.target))
