"""The architecture matrix (issue 25): every listed transformers architecture, as a tiny
random-weight model, through capture, naive quantization, onednn and inductor lowering, save/load,
other shapes and the default preset (the stages: ``outlierfx.testing.matrix``).

One thread per test. Compiling for inductor takes 10-45 s a row on one core, so here the
``lower-inductor`` stage runs on ``INDUCTOR_IN_TESTS`` (one row per kind of block) and the
matrix stays within CI's 10 minutes on 2 cores; ``scripts/architecture_matrix.py`` runs it on
every row, and the coverage doc is rendered from that run (checked below).
"""

import pytest
import torch

from outlierfx.testing.architectures import DECODERS, ENCODERS
from outlierfx.testing.matrix import INDUCTOR_IN_TESTS, STAGES, run_architecture


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.skipif("onednn" not in torch.backends.quantized.supported_engines, reason="no onednn engine")
@pytest.mark.parametrize("architecture", ENCODERS + DECODERS)
def test_architecture_passes_every_stage(architecture):
    stages = tuple(s for s in STAGES if s != "lower-inductor" or architecture in INDUCTOR_IN_TESTS)
    row = run_architecture(architecture, stages)
    assert [o.stage for o in row.outcomes] == list(stages) and row.passed, row.summary()


def test_the_inductor_rows_of_the_test_run_are_listed_architectures():
    assert set(INDUCTOR_IN_TESTS) <= set(ENCODERS + DECODERS) and set(INDUCTOR_IN_TESTS) & set(ENCODERS)


def test_the_listed_architectures_are_transformers_model_types_with_the_head_users_load():
    """Encoders load with AutoModel, decoders with AutoModelForCausalLM: a renamed or dropped
    model type in a transformers release fails here instead of silently leaving the matrix."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, MODEL_MAPPING_NAMES

    assert not set(ENCODERS) & set(DECODERS)
    assert set(ENCODERS + DECODERS) <= set(MODEL_MAPPING_NAMES)
    assert set(DECODERS) <= set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def test_types_beyond_the_list_are_enumerated_and_built_where_their_config_allows():
    """``--discover`` (scripts/architecture_matrix.py) runs every other text model type of the
    installed transformers; here only the enumeration and the build check (on the meta device)."""
    from outlierfx.testing.architectures import build_architecture
    from outlierfx.testing.discovery import candidates, why_not_buildable

    found = {c.model_type: c.loader for c in candidates()}
    assert len(found) > 100 and not set(found) & set(ENCODERS + DECODERS)
    assert found["olmo"] == "AutoModelForCausalLM" and found["deberta"] == "AutoModel"
    assert why_not_buildable("olmo") == "" and why_not_buildable("mixtral") == ""  # four experts at the tiny sizes
    assert "composite config" in why_not_buildable("gemma3")  # a vision tower beside the text model
    g = build_architecture("olmo")
    assert sum(p.numel() for p in g.model.parameters()) < 1_000_000


def test_the_coverage_doc_is_rendered_from_a_run_of_the_current_matrix():
    """docs/architectures.md is what scripts/architecture_matrix.py renders of its JSON, and that
    JSON is a run of today's list and stages (rerun the script after changing either)."""
    import importlib.util
    import json
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "scripts" / "architecture_matrix.py"
    spec = importlib.util.spec_from_file_location("architecture_matrix", script)
    generator = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(generator)
    data = json.loads(generator.RESULT.read_text())
    assert [r["architecture"] for r in data["rows"]] == list(ENCODERS + DECODERS)
    assert data["stages"] == list(STAGES)
    assert generator.main(["--check"]) == 0
