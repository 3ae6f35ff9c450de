"""The command line, end to end."""

import subprocess
import sys

import pytest


@pytest.mark.slow
def test_demo_runs_and_reports_the_structure():
    result = subprocess.run([sys.executable, "-m", "outlierfx", "demo"], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert "6 transformer blocks, 12 residual adds, 13 norm sites" in result.stdout
    assert "canonical ops: linear=37, layer_norm=13" in result.stdout
    assert "naive: embedding cosine vs FP32" in result.stdout and "best : embedding cosine" in result.stdout
    assert "1. InsertObservers" in result.stdout


def test_unknown_command_fails_cleanly():
    result = subprocess.run([sys.executable, "-m", "outlierfx", "frobnicate"], capture_output=True, text=True)
    assert result.returncode != 0 and "invalid choice" in result.stderr
