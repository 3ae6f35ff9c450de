"""A user's own ``torch.compile(qmodel)``, default arguments, on every form of our model: it
compiles and matches the eager model, and runs the kernels docs/torch-compile.md says it does."""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch._dynamo
from torch._inductor.utils import run_and_get_code

import outlierfx
from outlierfx.backends import runnable_backends
from outlierfx.testing import assert_tokens_close, build_model, first_token_grids_everywhere

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
