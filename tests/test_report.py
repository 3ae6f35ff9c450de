"""The audit report: per-tensor quantization error, the HTML/JSON files, and a real MiniLM report
rendered in headless Chromium."""

import html
import json
import math
import os
import re

import numpy as np
import pytest
import torch

import outlierfx
from outlierfx.errors import DataError, OutlierFXError
from outlierfx.quantizers.observers import FakeQuantize
from outlierfx.quantizers.qerror import quantization_errors
from outlierfx.report import build_report, find_chromium, screenshot, write_report
from outlierfx.testing import OutlierSpec, build_model


@pytest.fixture(scope="module")
def tiny():
    g = build_model("bert", layers=2, batch=3, seq=10, outliers=OutlierSpec(gamma_scale=30.0, channels=(5,)))
    qmodel, report = outlierfx.quantize(g.model, [g.inputs], recipe="naive", bits="W8A8", progress=False)
    return g, qmodel, report


def test_every_quantizer_gets_a_row_in_graph_order(tiny):
    g, qmodel, _ = tiny
    rows = quantization_errors(qmodel, [g.inputs])
    names = [n for n, m in qmodel.named_children() if isinstance(m, FakeQuantize)]
    assert sorted(r.module for r in rows) == sorted(names)
    order = {str(n.target): i for i, n in enumerate(qmodel.graph.nodes)}
    assert [order[r.module] for r in rows] == sorted(order[r.module] for r in rows)
    assert {r.block for r in rows} >= {"encoder.layer.0", "encoder.layer.1", "embeddings/input"}
    assert all(r.roles and r.quantization.startswith("uint8") for r in rows)
    finite = [r for r in rows if math.isfinite(r.sqnr_db)]
    assert len(finite) >= len(rows) - 4  # a few re-quantizations of an already quantized tensor are exact
    for r in finite:  # calibrated on the same batch: min-max ranges rarely clip, 8 bit keeps > 10 dB
        assert r.clipped_fraction < 0.05 and r.sqnr_db > 10
        assert r.rel_mse == pytest.approx(10 ** (-r.sqnr_db / 10))


def test_first_token_grids_count_as_their_own_range_when_measuring_clipping():
    from outlierfx.quantizers.observers import Observer
    from outlierfx.quantizers.qerror import _Accumulator
    from outlierfx.quantizers.spec import activation_spec

    x = torch.randn(4, 10, 16, generator=torch.Generator().manual_seed(0))
    x[:, 0] *= 50  # a sink token far outside the other tokens' range
    observer = Observer(activation_spec(8).with_(sink_tokens=1))
    observer(x)
    fq = FakeQuantize.from_observer(observer)
    assert fq.has_sink_grid
    measure = _Accumulator(fq)
    measure(fq, (x,), fq(x))
    # min-max on this very tensor: only values a rounded zero point pushes half a step out can clip
    # (on the main grid alone, most of the first token's 10% of the values would count)
    assert measure.result("").clipped_fraction < 0.01


def test_error_matches_a_direct_measurement_and_grows_at_lower_width(tiny):
    g, qmodel, _ = tiny
    name = next(n for n, m in qmodel.named_children() if isinstance(m, FakeQuantize) and "layer_norm" in n)
    fq = getattr(qmodel, name)
    seen = []
    handle = fq.register_forward_hook(lambda m, i, o: seen.append((i[0].detach(), o.detach())))
    with torch.no_grad():
        qmodel(**g.inputs)
    handle.remove()
    x, y = seen[0]
    real = g.inputs["attention_mask"].bool()
    x, y = x[real].double(), y[real].double()
    expected = 10 * math.log10(float(x.pow(2).sum() / (y - x).pow(2).sum()))
    row = next(r for r in quantization_errors(qmodel, [g.inputs]) if r.module == name)
    assert row.sqnr_db == pytest.approx(expected, rel=1e-6)
    assert row.elements == x.numel()
    q4, _ = outlierfx.quantize(g.model, [g.inputs], recipe="naive", bits="W8A4", progress=False)
    row4 = next(r for r in quantization_errors(q4, [g.inputs]) if r.module == name)
    assert row4.sqnr_db < row.sqnr_db - 12  # 4 fewer bits: ~24 dB less signal-to-noise
    # a quarter of the calibrated scale: the grid covers a quarter of the range, values beyond saturate
    saved = fq.scale.clone()
    fq.scale.mul_(0.25)
    try:
        squeezed = next(r for r in quantization_errors(qmodel, [g.inputs]) if r.module == name)
    finally:
        fq.scale.copy_(saved)
    # (the outlier channel 5, 1 of 32, owns the range: it is what saturates)
    assert squeezed.clipped_fraction > row.clipped_fraction + 0.01 and squeezed.sqnr_db < row.sqnr_db - 10


def test_padding_is_excluded_and_disabled_quantizers_are_exact(tiny):
    g, qmodel, _ = tiny
    baseline = quantization_errors(qmodel, [g.inputs])
    ids = g.inputs["input_ids"].clone()
    ids[g.inputs["attention_mask"] == 0] = 3  # change only padded tokens
    changed = quantization_errors(qmodel, [dict(g.inputs, input_ids=ids)])
    for a, b in zip(baseline, changed):
        assert (a.module, a.elements) == (b.module, b.elements)
        if math.isfinite(a.sqnr_db):
            assert a.sqnr_db == pytest.approx(b.sqnr_db, rel=1e-6, abs=1e-9)
    fq = getattr(qmodel, baseline[0].module)
    fq.enabled = False
    try:
        row = quantization_errors(qmodel, [g.inputs])[0]
    finally:
        fq.enabled = True
    assert row.sqnr_db == math.inf and row.rel_mse == 0 and row.quantization.startswith("disabled")


def test_quantization_errors_needs_a_fake_quantized_graph(tiny):
    g, qmodel, _ = tiny
    with pytest.raises(DataError, match="no FakeQuantize"):
        quantization_errors(outlierfx.capture(g.model, g.inputs), [g.inputs])
    with pytest.raises(DataError, match="no batches"):
        quantization_errors(qmodel, [])


def test_report_files_are_self_contained_escaped_and_never_overwritten(tiny, tmp_path):
    g, qmodel, report = tiny
    evil = '<script>alert("x")</script>'
    measured = report.with_measurements(quality={"fp32": {"cosine": 1.0}, "int8": {"cosine": 0.98, evil: 1}},
                                        latency={"latency_ms": 3.5})
    html_path, json_path = build_report(tmp_path / "out", report=measured, batches=[g.inputs], model_name=evil)
    page = html_path.read_text()
    assert "<script" not in page and html.escape(evil) in page
    assert not re.search(r"""(src|href)=["']?(https?:|//)""", page)  # no external assets
    assert "<link" not in page
    images = re.findall(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert len(images) == 2  # outlier heatmaps and the per-layer quantization error
    for anchor in re.findall(r'href="#([\w-]+)"', page):  # the table of contents points at sections
        assert f'id="{anchor}"' in page
    for entry in report.audit:
        assert f"{entry.pass_name}" in page
    assert "Not measured for this run" not in page and "3.5" in page
    data = json.loads(json_path.read_text())
    assert data["model"] == evil and data["quality"]["int8"]["cosine"] == 0.98
    assert len(data["quantization_errors"]) == sum(isinstance(m, FakeQuantize) for m in qmodel.children())
    assert data["quantization"]["audit"]["passes"][0]["pass"] == "InsertObservers"
    assert data["outliers"]["before"] and data["outliers"]["after"] is None  # naive rewrites nothing
    assert data["quantization"]["not_at_target"] == report.not_at_target()
    checked = [(i, e.checked_on) for i, e in enumerate(report.audit) if e.checked_on is not None]
    assert checked and all(c.whole_example and c.of_sequences == 3 for _, c in checked)  # a small output: all of it
    assert f"Checked on {html.escape(checked[0][1].describe())}." in page
    assert data["quantization"]["audit"]["passes"][checked[0][0]]["checked_on"] == checked[0][1].as_dict()
    with pytest.raises(OutlierFXError, match="exists"):
        write_report(tmp_path / "out", report=report)
    assert html_path.read_text() == page


def _chromium_or_skip() -> None:
    if find_chromium() is None:
        if os.environ.get("OUTLIERFX_REQUIRE_BROWSER"):
            pytest.fail("Chromium is required (OUTLIERFX_REQUIRE_BROWSER) but not installed: scripts/setup-browser.sh")
        pytest.skip("no Chromium: run scripts/setup-browser.sh")


@pytest.mark.slow
def test_minilm_report_renders_in_headless_chromium(minilm, tmp_path):
    import matplotlib.image

    from outlierfx.benchmarks import calibration_batches

    _chromium_or_skip()
    batches = calibration_batches(minilm, samples=24, max_length=64, batch=8)
    qmodel, report = outlierfx.quantize(minilm.model, batches[:2], recipe="naive", bits="W8A8", progress=False)
    report = report.with_measurements(
        quality={"fp32": {"cosine": 1.0, "lee50": 0.6564}, "naive W8A8": {"cosine": 0.8628, "lee50": 0.6106}},
        latency={"fp32": {"latency_ms": 40.1}, "int8": {"latency_ms": 20.3}})
    html_path, json_path = build_report(tmp_path, report=report, batches=batches[:2], error_batches=batches[2:],
                                        tokenizer=minilm.tokenizer, model_name="minilm")
    data = json.loads(json_path.read_text())
    rows = data["quantization_errors"]
    assert len(rows) == sum(isinstance(m, FakeQuantize) for m in qmodel.children()) > 80
    assert {r["block"] for r in rows} >= {f"encoder.layer.{i}" for i in range(6)}
    assert len(data["outliers"]["before"]) == 25  # 13 norm outputs + 12 residual sums
    assert data["outliers"]["before"][0]["top_channels"][0] == 99  # MiniLM's known outlier dimension
    page = html_path.read_text()
    assert "encoder.layer.5.output.LayerNorm" in page and "model output" in page  # stayed float, and why

    png = screenshot(html_path, tmp_path / "report.png", width=1280, height=4000)
    image = matplotlib.image.imread(png)
    assert image.shape[:2] == (4000, 1280)
    rgb = image[..., :3]
    assert rgb.std() > 0.05  # not blank
    # The embedded plots rendered: the heatmaps' saturated colours (magma) and the SQNR bars
    # (red/orange/green) are absent from the page's own greys and blues.
    saturation = rgb.max(-1) - rgb.min(-1)
    assert (saturation > 0.35).mean() > 0.01
    rows_with_colour = np.flatnonzero((saturation > 0.35).mean(1) > 0.05)
    assert rows_with_colour.size > 300  # several hundred pixel rows of plots
