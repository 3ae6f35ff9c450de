"""The documentation contract: docs/results.md is what scripts/results_doc.py makes of
bench/results (a stale copy fails CI), and the README stays a short product page whose test
command is the one CI runs. No model loading: these read files only."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType

REPO = Path(__file__).resolve().parents[1]
README_MAX_LINES = 200


def load_generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("results_doc", REPO / "scripts" / "results_doc.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def ci_test_command() -> str:
    """The pytest line of .ci/run, which CI executes and the README must show verbatim."""
    lines = [line for line in (REPO / ".ci" / "run").read_text().splitlines() if "pytest" in line]
    assert len(lines) == 1, lines
    return lines[0].strip()


def test_results_doc_is_current():
    done = subprocess.run([sys.executable, str(REPO / "scripts" / "results_doc.py"), "--check"],
                          capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 0, done.stderr


def test_check_fails_on_a_stale_results_doc(tmp_path, monkeypatch):
    generator = load_generator()
    results = tmp_path / "results" / "minilm"
    results.mkdir(parents=True)
    rows = [{"model": "minilm", "recipe": "fp32", "bits": "FP32", "backend": "fake-quant",
             "metrics": {"ppl_wiki": 20.0}},
            {"model": "minilm", "recipe": "naive", "bits": "W8A8", "backend": "onednn",
             "metrics": {"ppl_wiki": 25.0}}]
    (results / "accuracy.json").write_text(json.dumps({"rows": rows, "env": {"threads": 2}}))
    output = tmp_path / "results.md"
    monkeypatch.setattr(generator, "RESULTS", tmp_path / "results")
    monkeypatch.setattr(generator, "OUTPUT", output)
    monkeypatch.setattr(generator, "REPO", tmp_path)

    assert generator.main(["--check"]) == 1  # missing
    assert generator.main([]) == 0
    assert generator.main(["--check"]) == 0
    text = output.read_text()
    assert "| naive | W8A8 | onednn | 25 | 1.25 |" in text  # perplexity and its ratio to FP32
    assert "| fp32 | FP32 | simulated | 20 | 1 |" in text

    rows[1]["metrics"]["ppl_wiki"] = 24.0
    (results / "accuracy.json").write_text(json.dumps({"rows": rows}))
    assert generator.main(["--check"]) == 1


def test_readme_is_a_short_page_with_the_ci_test_command():
    readme = (REPO / "README.md").read_text()
    assert len(readme.splitlines()) <= README_MAX_LINES
    assert ci_test_command() in readme
