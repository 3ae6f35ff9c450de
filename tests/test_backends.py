"""Backends as modules: the registry, typed capabilities and kernels, the spec-level kernel
choice, and per-backend lowering of small blocks written out as expected op lists (TVM's
Before/Expected style: build, lower, compare the lowered graph's ops to the list here)."""

import dataclasses

import pytest
import torch

import outlierfx
from outlierfx.backends import (
    BACKENDS,
    BackendError,
    Fallback,
    FirstTokens,
    Kernel,
    KernelKind,
    Output,
    PostOp,
    get_backend,
)
from outlierfx.passes.lower import Lower
from outlierfx.quantizers.spec import Granularity, QuantSpec, activation_spec, weight_spec
from outlierfx.testing import first_token_grids_everywhere

HAVE = set(torch.backends.quantized.supported_engines)
FLOAT = Kernel(KernelKind.INT8_GEMM)
REQUANTIZED = Kernel(KernelKind.INT8_GEMM, frozenset({PostOp.REQUANTIZE}))


class Block(torch.nn.Module):
    """``x + down(gelu(up(norm(x))))``: a pre-LN FFN block."""

    def __init__(self) -> None:
        super().__init__()
        self.norm, self.up, self.down = torch.nn.LayerNorm(16), torch.nn.Linear(16, 32), torch.nn.Linear(32, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(torch.nn.functional.gelu(self.up(self.norm(x))))


def _quantized_block(recipe: str):
    torch.manual_seed(0)
    inputs = {"x": torch.randn(2, 6, 16)}
    inputs["x"][:, 0] *= 30  # a first token with a wide range
    with first_token_grids_everywhere():
        qmodel, _ = outlierfx.quantize(Block().eval(), [inputs], recipe=recipe, policy="linear-inputs", progress=False)
    return qmodel, inputs


def _assert_tokens_close(reference: torch.nn.Module, candidate: torch.nn.Module, inputs: dict) -> None:
    """Every token's output within cosine 0.999 of the reference form's (rounding ties move
    single values by one quantization step)."""
    with torch.no_grad():
        ref, out = reference(**inputs), candidate(**inputs)
    assert float(torch.nn.functional.cosine_similarity(ref, out, dim=-1).min()) >= 0.999


def _ops(gm: torch.fx.GraphModule) -> list[str]:
    """The lowered graph as a list: module types, functions' names, ``.methods``."""
    ops = []
    for node in gm.graph.nodes:
        if node.op == "call_module":
            ops.append(type(gm.get_submodule(str(node.target))).__name__)
        elif node.op == "call_function":
            ops.append(getattr(node.target, "__name__", str(node.target)))
        elif node.op == "call_method":
            ops.append("." + node.target)
    return ops


Q, DQ, DQ_W = "quantize_per_tensor.default", "dequantize_per_tensor.default", "dequantize_per_channel.default"
REFERENCE_BLOCK = ["layer_norm.default", Q, DQ, DQ_W, "linear.default", "gelu.default", Q, DQ, DQ_W, "linear.default",
                   "add.Tensor"]
EXPECTED = {  # naive, linear-inputs: per-tensor uint8 inputs of both Linears
    "reference": (REFERENCE_BLOCK, [FLOAT, FLOAT]),
    "inductor": (REFERENCE_BLOCK, [FLOAT, FLOAT]),
    "x86": (["layer_norm.default", "QuantizedLinear", "gelu.default", "QuantizedLinear", "add.Tensor"], [FLOAT, FLOAT]),
    "fbgemm": (["layer_norm.default", "QuantizedLinear", "gelu.default", "QuantizedLinear", "add.Tensor"],
               [FLOAT, FLOAT]),
    # no float-output int8 GEMM: both outputs stay float, so both Linears fall back
    "qnnpack": (["layer_norm.default", "quantize_per_tensor", ".dequantize", "linear.default", "gelu.default",
                 "quantize_per_tensor", ".dequantize", "linear.default", "add.Tensor"],
                [Kernel.float_gemm(Fallback.NO_FLOAT_OUTPUT_GEMM)] * 2),
    # GELU and the requantization in the first GEMM, the residual add in the second
    "onednn": (["layer_norm.default", "quantize_per_tensor", "QuantizedLinear", "QuantizedLinear"],
               [Kernel(KernelKind.INT8_GEMM, frozenset({PostOp.GELU, PostOp.REQUANTIZE})),
                Kernel(KernelKind.INT8_GEMM, frozenset({PostOp.RESIDUAL_ADD}))]),
}


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b in HAVE or b in ("reference", "inductor")])
def test_each_backend_lowers_a_block_to_its_expected_ops(backend):
    qmodel, inputs = _quantized_block("naive")
    result = Lower(backend, bf16_attention=False if get_backend(backend).capabilities.bf16_attention else None)(qmodel)
    ops, kernels = EXPECTED[backend]
    assert _ops(result.graph_module) == ops
    assert [lin.kernel for lin in result.plan.linears] == kernels
    _assert_tokens_close(Lower("reference")(qmodel).graph_module, result.graph_module, inputs)


@pytest.mark.parametrize(("backend", "ops", "first_tokens"), [
    # the first rows beside the main graph: a second GEMM per Linear, joined before the residual add
    ("reference", ["layer_norm.default", Q, DQ, "slice.Tensor", Q, DQ, DQ_W, DQ_W, "linear.default", "linear.default",
                   "gelu.default", "gelu.default", Q, DQ, Q, DQ, DQ_W, DQ_W, "linear.default", "linear.default",
                   "slice.Tensor", "clone.default", "add.Tensor", "add.Tensor", "slice_scatter.default"],
     [FirstTokens.SECOND_GEMM] * 2),
    ("x86", ["layer_norm.default", "QuantizedLinear", "gelu.default", "QuantizedLinear", "add.Tensor"],
     [FirstTokens.TWO_GEMMS] * 2),
    # two-grid codes once; both GEMMs fuse a post-op, so their first rows are computed again
    ("onednn", ["layer_norm.default", "two_grid_codes", "QuantizedLinear", "QuantizedLinear"],
     [FirstTokens.RECOMPUTED] * 2),
])
def test_first_token_grids_lower_to_the_expected_ops(backend, ops, first_tokens):
    if backend not in HAVE | {"reference"}:
        pytest.skip(f"no {backend} engine")
    qmodel, inputs = _quantized_block("naive+sink")
    result = Lower(backend, bf16_attention=False if backend == "onednn" else None)(qmodel)
    assert _ops(result.graph_module) == ops
    assert [lin.kernel.first_tokens for lin in result.plan.linears] == first_tokens
    assert all(lin.is_int8 for lin in result.plan.linears) and not result.plan.simulated
    _assert_tokens_close(Lower("reference")(qmodel).graph_module, result.graph_module, inputs)


def test_peg_groups_lower_to_sub_gemms_or_fall_back_where_there_is_no_float_output_gemm():
    qmodel, inputs = _quantized_block("peg")
    groups = Lower("reference")(qmodel).plan.linears[0].kernel.groups
    assert groups > 1
    sub_gemm = ["slice.Tensor", "QuantizedLinear"]
    x86 = Lower("x86")(qmodel)
    assert _ops(x86.graph_module) == ["layer_norm.default", "index_select.default", *sub_gemm,
                                      *(sub_gemm + ["add.Tensor"]) * (groups - 1),
                                      "gelu.default", "QuantizedLinear", "add.Tensor"]
    assert [lin.kernel for lin in x86.plan.linears] == [Kernel(KernelKind.INT8_SUB_GEMMS, groups=groups), FLOAT]
    _assert_tokens_close(Lower("reference")(qmodel).graph_module, x86.graph_module, inputs)
    if "qnnpack" in HAVE:
        qnnpack = Lower("qnnpack")(qmodel)
        assert [lin.kernel.fallback for lin in qnnpack.plan.linears] == [Fallback.NO_SUB_GEMMS,
                                                                         Fallback.NO_FLOAT_OUTPUT_GEMM]
        assert "QuantizedLinear" not in _ops(qnnpack.graph_module)


def test_registry_names_every_backend_and_refuses_others_by_listing_them():
    assert set(BACKENDS) == {"reference", "inductor", "fbgemm", "x86", "qnnpack", "onednn"}
    assert [get_backend(name).name for name in BACKENDS] == list(BACKENDS)
    with pytest.raises(BackendError, match="unknown backend 'tensorrt'; choose one of reference, inductor"):
        get_backend("tensorrt")


def test_capabilities_say_what_each_backend_runs_in_int8():
    caps = {name: get_backend(name).capabilities for name in BACKENDS}
    assert all(c.whole_gemm_granularities == {Granularity.PER_TENSOR} and c.float_fallback for c in caps.values())
    assert [n for n, c in caps.items() if not c.peg_sub_gemms] == ["qnnpack"]
    assert [n for n, c in caps.items() if not c.float_output_gemm] == ["qnnpack"]
    assert [n for n, c in caps.items() if c.bf16_attention] == ["inductor", "onednn"]
    assert [n for n, c in caps.items() if PostOp.GELU in c.post_ops] == ["onednn"]
    assert caps["qnnpack"].first_token_rows is FirstTokens.NONE
    assert caps["x86"].first_token_rows is FirstTokens.TWO_GEMMS
    assert caps["onednn"].first_token_rows is FirstTokens.CORRECTED
    assert "PEG groups in float" in caps["qnnpack"].describe() and "compiled" in caps["inductor"].describe()
    with pytest.raises(ValueError, match="sub-GEMMs"):
        dataclasses.replace(caps["x86"], float_output_gemm=False)


W8 = weight_spec(8)
PEG8 = QuantSpec(granularity=Granularity.PER_GROUP, groups=8)


@pytest.mark.parametrize(("activation", "output", "expected"), [
    (activation_spec(), None, {"*": FLOAT, "qnnpack": Kernel.float_gemm(Fallback.NO_FLOAT_OUTPUT_GEMM)}),
    (activation_spec(), activation_spec(), {"*": REQUANTIZED}),
    (PEG8, None, {"*": Kernel(KernelKind.INT8_SUB_GEMMS, groups=8),
                  "qnnpack": Kernel.float_gemm(Fallback.NO_SUB_GEMMS, groups=8)}),
    (QuantSpec(granularity=Granularity.PER_GROUP, groups=96), None,
     {"*": Kernel.float_gemm(Fallback.TOO_MANY_GROUPS, groups=96),
      "qnnpack": Kernel.float_gemm(Fallback.NO_SUB_GEMMS, groups=96)}),
    (QuantSpec(granularity=Granularity.PER_GROUP, groups=1), None,  # K=1: one grid, one GEMM
     {"*": FLOAT, "qnnpack": Kernel.float_gemm(Fallback.NO_FLOAT_OUTPUT_GEMM)}),
    (activation_spec(16), None, {"*": Kernel.float_gemm(Fallback.INPUT_WIDER_THAN_8_BIT)}),
    (activation_spec().with_(sink_tokens=1), None,
     {"*": Kernel(KernelKind.INT8_GEMM, first_tokens=FirstTokens.SECOND_GEMM),
      "x86": Kernel(KernelKind.INT8_GEMM, first_tokens=FirstTokens.TWO_GEMMS),
      "fbgemm": Kernel(KernelKind.INT8_GEMM, first_tokens=FirstTokens.TWO_GEMMS),
      "onednn": Kernel(KernelKind.INT8_GEMM, first_tokens=FirstTokens.CORRECTED),
      "qnnpack": Kernel.float_gemm(Fallback.INPUT_TWO_GRIDS)}),
    (activation_spec().with_(sink_tokens=1), activation_spec(),  # eager engines: first tokens need a float output
     {"*": Kernel.float_gemm(Fallback.INPUT_TWO_GRIDS),
      "reference": Kernel(KernelKind.INT8_GEMM, frozenset({PostOp.REQUANTIZE}), FirstTokens.SECOND_GEMM),
      "inductor": Kernel(KernelKind.INT8_GEMM, frozenset({PostOp.REQUANTIZE}), FirstTokens.SECOND_GEMM)}),
    (QuantSpec(symmetric=True), None,  # the eager engines read uint8 codes
     {"*": Kernel.float_gemm(Fallback.SIGNED_INPUT), "reference": FLOAT, "inductor": FLOAT}),
    (None, None, {"*": Kernel.float_gemm(Fallback.INPUT_NOT_QUANTIZED)}),
])
def test_linear_kernel_decides_from_the_specs_alone(activation, output, expected):
    for name in BACKENDS:
        kernel = get_backend(name).linear_kernel(activation, W8, output)
        assert kernel == expected.get(name, expected["*"]), name
        assert kernel.describe()


def test_linear_kernel_agrees_with_the_plan_on_a_calibrated_graph():
    qmodel, _ = _quantized_block("naive")
    for name in ("reference", "x86", "qnnpack"):
        planned = [lin.kernel for lin in Lower(name)(qmodel).plan.linears]
        assert planned == [get_backend(name).linear_kernel(activation_spec(), W8)] * 2, name


def test_linear_kernel_refuses_a_weight_no_int8_kernel_takes_and_says_float_weights_stay_float():
    backend = get_backend("x86")
    assert backend.linear_kernel(activation_spec(), None) == Kernel.float_gemm(Fallback.WEIGHT_NOT_QUANTIZED)
    assert backend.linear_kernel(activation_spec(), None).kind is KernelKind.FLOAT_GEMM
    with pytest.raises(BackendError, match="per-row int8 codes"):
        backend.linear_kernel(activation_spec(), weight_spec(16))


def test_kernels_are_validated_and_described():
    assert REQUANTIZED.output is Output.UINT8 and FLOAT.output is Output.FLOAT and FLOAT.is_int8
    assert not Kernel.float_gemm(Fallback.SIGNED_INPUT).is_int8
    with pytest.raises(ValueError, match="fallback"):
        Kernel(KernelKind.FLOAT_GEMM)
    with pytest.raises(ValueError, match="sub-GEMMs"):
        Kernel(KernelKind.INT8_SUB_GEMMS, groups=1)
    assert Kernel(KernelKind.INT8_GEMM, frozenset({PostOp.GELU, PostOp.REQUANTIZE})).describe() == \
        "int8 GEMM, GELU fused, requantized uint8 output"
    assert Kernel.float_gemm(Fallback.TOO_MANY_GROUPS, 96).describe().startswith(
        "float GEMM on int8 weights (input in 96 PEG groups;")
