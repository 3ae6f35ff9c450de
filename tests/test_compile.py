"""A user's own ``torch.compile(qmodel)``, default arguments, on every form of our model: it
compiles and matches the eager model, and runs the kernels docs/torch-compile.md says it does.
Our own compiled form (``CompiledInt8``) compiles again for new shapes and never lets the
compiler edit the graph it keeps."""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch._dynamo
import torch.fx
from torch._dynamo.source import ConstantSource
from torch._inductor.utils import run_and_get_code
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv

import outlierfx
from outlierfx.backends import runnable_backends
from outlierfx.backends.inductor import CompiledInt8
from outlierfx.graph.shapes import propagate_values
from outlierfx.testing import assert_tokens_close, build_model, first_token_grids_everywhere

aten = torch.ops.aten
INT8_GEMM = "qlinear_pointwise"  # inductor's oneDNN int8 GEMM in the generated code


FORMS = ["fake-quant", *runnable_backends(("reference", "onednn", "x86", "inductor"))]


@pytest.fixture(scope="module", params=["one grid", "first-token grids"])
def simulated(request):
    """The fast preset's recipe; with first-token grids kept everywhere, the eager backends run
    their first-token kernels (as on MiniLM and SmolLM2), which once crashed inductor."""
    g = build_model("bert", hidden=32, layers=2)
    with first_token_grids_everywhere() if request.param == "first-token grids" else contextlib.nullcontext():
        sim, report = outlierfx.quantize(g.model, [g.inputs], recipe="smooth-fold+sink", progress=False)
    return g, sim, report


@pytest.mark.parametrize("form", FORMS)
def test_torch_compile_with_default_arguments_compiles_and_matches(simulated, form):
    g, sim, report = simulated
    model = sim if form == "fake-quant" else outlierfx.lower(sim, report, form).model
    torch._dynamo.reset()
    compiled = torch.compile(model)
    with torch.no_grad():
        _, code = run_and_get_code(compiled, **g.inputs)
    # float rounding in fused kernels may move a value across a rounding tie: one step, never more
    assert_tokens_close(model, compiled, g.inputs, min_cosine=0.9999)
    generated = "\n".join(code)
    assert code, "nothing was compiled"
    if form == "inductor":  # compiled with freezing by outlierfx: int8 GEMMs, also when wrapped again
        assert INT8_GEMM in generated
    elif form in ("fake-quant", "reference"):  # one graph of float GEMMs (no freezing: no int8 patterns)
        assert INT8_GEMM not in generated and "extern_kernels.addmm" in generated
    else:  # eager int8 kernels run between compiled float pieces (graph breaks at the packed ops)
        assert INT8_GEMM not in generated and "extern_kernels.addmm" not in generated


@pytest.mark.skipif(not runnable_backends(["inductor"]), reason="no inductor")
def test_compiled_int8_compiles_each_new_shape_and_leaves_its_graph_alone():
    # Two size nodes of one symbol (the lengths of x and y) and a constant: torch 2.13's compiler
    # merges such size nodes in the GraphModule it traces, in place, without regenerating its
    # code; compiling that module again for another shape then failed with an IndexError.
    graph = torch.fx.Graph()
    x, y = graph.placeholder("x"), graph.placeholder("y")
    sizes = [graph.call_function(aten.sym_size.int, (v, 0)) for v in (x, y)]
    ramps = [graph.call_function(aten.arange.default, (n,), {"dtype": torch.float32}) for n in sizes]
    total = graph.call_function(aten.add.Tensor, (graph.call_function(aten.add.Tensor, (x, ramps[0])),
                                                  graph.call_function(aten.mul.Tensor, (y, ramps[1]))))
    graph.output(graph.call_function(aten.mul.Tensor, (total, graph.get_attr("scale"))))
    root = torch.nn.Module()
    root.register_buffer("scale", torch.tensor([2.0]))
    gm = torch.fx.GraphModule(root, graph)
    env = ShapeEnv()
    length = env.create_symintnode(env.create_symbol(4, ConstantSource("n"), dynamic_dim=DimDynamic.DYNAMIC),
                                   hint=4, source=ConstantSource("n"))
    with FakeTensorMode(shape_env=env):
        x.meta["val"], y.meta["val"] = torch.empty(length), torch.empty(length)
    propagate_values(gm, full=True)
    nodes, code = [n.name for n in gm.graph.nodes], gm.code
    torch._dynamo.reset()
    compiled = CompiledInt8(gm)
    for n in (4, 6, 9):  # the second shape compiles again (dynamic), the third reuses it
        ones = torch.ones(n)
        assert torch.equal(compiled(ones, ones), gm(ones, ones))
    assert [n.name for n in gm.graph.nodes] == nodes and gm.code == code and compiled.reference is gm


@pytest.mark.skipif(not runnable_backends(["inductor"]), reason="no inductor")
def test_the_online_hadamard_is_compiled_in_not_called_back_while_the_kept_graph_keeps_the_op():
    from outlierfx.graph.hadamard_op import HADAMARD
    from outlierfx.graph.ops import is_call

    g = build_model("llama", hidden=32, layers=2)
    sim, report = outlierfx.quantize(g.model, [g.inputs], recipe="rotate", generation=False, progress=False)
    assert any(is_call(n, HADAMARD) for n in sim.graph.nodes), "the rotate recipe inserted no online Hadamard"
    lowered = outlierfx.lower(sim, report, "inductor").model
    torch._dynamo.reset()
    with torch.no_grad():
        _, code = run_and_get_code(lowered, **g.inputs)
    generated = "\n".join(code)
    # a custom op left in the compiled graph is a call back into Python per layer (the decode
    # step's cost); the kept graph (saved, exported) still names the op
    assert INT8_GEMM in generated and "ops.outlierfx.hadamard" not in generated
    assert any(is_call(n, HADAMARD) for n in lowered.reference.graph.nodes)
    assert_tokens_close(lowered.reference, lowered, g.inputs, min_cosine=0.9999)
