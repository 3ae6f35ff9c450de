"""The command line, end to end on the packaged MiniLM: exit codes and the files written."""

import json
import re
import subprocess
import sys

import pytest


def _run(*args, cwd=None, timeout=900):
    return subprocess.run([sys.executable, "-m", "outlierfx", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd)


@pytest.mark.slow
def test_demo_quantizes_once_with_the_fast_preset_and_reports_quality_and_latency(tmp_path):
    # about 2 min alone on 2 cores; the limit only guards against a hang, and a busy machine
    # (another xdist worker on the same cores) can triple the time
    result = _run("demo", "--rounds", "3", cwd=tmp_path, timeout=2400)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert len(out.splitlines()) <= 25, out
    assert "preset fast -> recipe smooth-fold" in out and "why: every Linear is one int8 GEMM" in out
    assert "37/37 Linears on int8 kernels" in out
    cosine = float(re.search(r"embedding cosine vs FP32 (\d\.\d+)", out).group(1))
    assert cosine >= 0.999  # measured 0.9992 on onednn (smooth-fold+sink); naive gives 0.992
    ratio = float(re.search(r"FP32 [\d.]+ MB -> int8 [\d.]+ MB \(x([\d.]+)\)", out).group(1))
    assert ratio <= 0.3
    assert "Loading weights" not in result.stderr and "Warning" not in result.stderr  # quiet loads, no notices
    demo = tmp_path / "outlierfx-demo"
    assert (demo / "model-int8" / "model.safetensors").is_file() and not (demo / "model-int8" / "model.pt").exists()
    page = (demo / "report.html").read_text()
    assert "<img" in page and "Not measured for this run" not in page
    data = json.loads((demo / "report.json").read_text())
    int8_row = next(k for k in data["quality"] if k.startswith("int8"))
    assert data["quality"][int8_row]["cosine"] == pytest.approx(cosine, abs=1e-4)
    assert data["speed"][int8_row]["ratio_vs_fp32"] > 0 and data["quantization"]["preset"] == "fast"
    assert data["outliers"]["after"]  # Quadapter's folded scales rewrote the norms: the view shows it


@pytest.mark.slow
def test_quantize_saves_a_loadable_int8_model_and_never_overwrites(tmp_path):
    out = tmp_path / "int8"
    result = _run("quantize", "minilm", "--recipe", "naive", "--samples", "16", "--backend", "fbgemm", "--out", str(out))
    assert result.returncode == 0, result.stderr
    files = {p.name for p in out.iterdir()}
    assert {"model.safetensors", "graph.json", "config.json", "tokenizer.json", "quantization.json", "report.html",
            "report.json"} <= files
    assert not {name for name in files if name.endswith((".pt", ".pkl", ".bin", ".pickle"))}  # no pickle
    saved = json.loads((out / "graph.json").read_text())
    assert saved["backend"] == "fbgemm" and saved["info"]["recipe"] == "naive"
    written = json.loads((out / "quantization.json").read_text())
    assert written["backend"] == "fbgemm" and written["quality"]["int8 (fbgemm)"]["cosine"] > 0.8  # measured
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    again = _run("quantize", "minilm", "--out", str(out))
    assert again.returncode == 2 and "exists and is not empty" in again.stderr
    assert "Traceback" not in again.stderr
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before

    check = ("import outlierfx, transformers\n"  # the folder is self-contained: model, config and tokenizer
             f"m = outlierfx.load({str(out)!r}); tok = transformers.AutoTokenizer.from_pretrained({str(out)!r})\n"
             "x = dict(tok(['A sentence.', 'Two more words.'], return_tensors='pt', padding=True))\n"
             "print(tuple(m(**x).last_hidden_state.shape))\n")
    loaded = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, timeout=300)
    assert loaded.returncode == 0 and "(2," in loaded.stdout, loaded.stderr


def test_quantize_refuses_an_unknown_backend_in_one_line(tmp_path):
    result = _run("quantize", "minilm", "--backend", "tensorrt", "--out", str(tmp_path / "q"))
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "unknown backend 'tensorrt'" in result.stderr
    assert not (tmp_path / "q").exists()


def test_fine_stage_flag_names_the_recipe_it_would_run(tmp_path):
    result = _run("quantize", "minilm", "--recipe", "nope", "--fine", "--out", str(tmp_path / "q"))
    assert result.returncode == 2 and "unknown recipe 'nope+lsq'" in result.stderr
    assert not (tmp_path / "q").exists()
    result = _run("bench", "accuracy", "--recipes", "nope", "--fine")
    assert result.returncode == 2 and "unknown recipe 'nope+lsq'" in result.stderr


@pytest.mark.slow
def test_bench_speed_writes_rows_with_latency_quality_and_size(tmp_path):
    path = tmp_path / "speed.json"
    result = _run("bench", "speed", "--model", "minilm", "--recipe", "naive", "--backends", "x86", "--no-peers",
                  "--rounds", "2", "--json", str(path))
    assert result.returncode == 0, result.stderr
    rows = json.loads(path.read_text())["rows"]
    assert [(r["recipe"], r["backend"]) for r in rows] == [("fp32", "eager"), ("fp32", "inductor"), ("naive", "x86")]
    for row in rows:
        assert row["metrics"]["latency_ms"] > 0 and 0 < row["metrics"]["cosine"] <= 1.0001
    assert rows[2]["metrics"]["size_ratio_vs_fp32"] <= 0.3


def test_unknown_command_fails_cleanly():
    result = _run("frobnicate")
    assert result.returncode != 0 and "invalid choice" in result.stderr


@pytest.mark.slow
def test_bench_accuracy_writes_the_fp32_and_recipe_rows(tmp_path):
    path = tmp_path / "acc.json"
    result = _run("bench", "accuracy", "--model", "minilm", "--bits", "W8A8", "--recipes", "naive", "--json", str(path))
    assert result.returncode == 0, result.stderr
    rows = json.loads(path.read_text())["rows"]
    assert [(r["recipe"], r["bits"]) for r in rows] == [("fp32", "FP32"), ("naive", "W8A8")]
    assert rows[0]["metrics"]["cosine"] == 1.0 and 0.5 < rows[1]["metrics"]["cosine"] < 1.0


def test_a_backend_this_cpu_lacks_is_refused_by_name(monkeypatch, tmp_path, capsys):
    import torch

    from outlierfx.cli import main

    monkeypatch.setattr(type(torch.backends.quantized), "supported_engines", property(lambda self: ["qnnpack"]))
    assert main(["quantize", "minilm", "--backend", "fbgemm", "--out", str(tmp_path / "q")]) == 2
    err = capsys.readouterr().err
    assert "backend 'fbgemm' is not available on this CPU (this torch build has: qnnpack)" in err
    assert err.count("\n") == 1 and not (tmp_path / "q").exists()


@pytest.mark.parametrize("argv,message", [
    (["--bits", "W8A17"], "'W8A17' asks for 17-bit activations; each width must be 2..16 bits"),
    (["--bits", "int8"], "bit widths look like W8A8 (weights and activations) or 8 (both), got 'int8'"),
    (["--policy", "everything"], "unknown policy 'everything'; choose full, linear-inputs or mp16"),
    (["--batch", "0"], "--batch must be a positive integer, got 0"),
    (["--seq", "-1"], "--seq must be a positive integer, got -1"),
    (["--seq", "0"], "--seq must be a positive integer, got 0"),
])
def test_bad_settings_end_in_one_line_before_any_model_loads(argv, message, tmp_path, capsys, monkeypatch):
    from outlierfx import models
    from outlierfx.cli import main

    monkeypatch.setattr(models, "load", lambda *a, **k: pytest.fail("loaded a model before checking the settings"))
    assert main(["quantize", "minilm", "--out", str(tmp_path / "q"), *argv]) == 2
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"outlierfx: error: {message}"), captured.err
    assert "Traceback" not in captured.out and not (tmp_path / "q").exists()


def test_the_quantize_summary_prints_the_reports_notes(capsys):
    import torch

    import outlierfx
    from outlierfx.cli import _print_quantized
    from outlierfx.testing.architectures import build_architecture

    g = build_architecture("bert", dtype=torch.bfloat16)
    _, report = outlierfx.quantize(g.model, [g.inputs], recipe="naive", policy="linear-inputs", progress=False)
    _print_quantized(report, 1.0)
    out = capsys.readouterr().out
    assert "note: the model is in bfloat16: outlierfx captured, calibrated and quantized a float32 copy" in out
