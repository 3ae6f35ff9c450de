"""The audit report: one self-contained HTML file (inline CSS, PNGs as data URIs, no scripts) and
the same facts as JSON.

Sections: summary, quality and speed, every pass of the audit trail (plan, nodes added / removed
/ changed, the numeric certificate), outlier plots before and after the recipe's rewrites,
per-tensor quantization error, and the tensors that stayed float (or wider) and why.
"""

from __future__ import annotations

import datetime
import html
import json
import math
import os
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

from ..analysis import TensorOutliers
from ..errors import OutlierFXError
from ..passes.audit import AuditEntry, to_jsonable
from ..quantizers.qerror import TensorQuantError
from . import plots

HTML_NAME = "report.html"
JSON_NAME = "report.json"
PLAN_CHARS = 12_000  # longer plans are cut in the HTML; the JSON has them whole
NODE_LIST = 200  # node names listed per pass and kind in the HTML

_CSS = """
body{font-family:-apple-system,"Segoe UI",Roboto,"Helvetica Neue",Arial,sans-serif;margin:0;color:#1f2933;
background:#f5f7fa;line-height:1.45;font-size:14px}
header{background:#243b53;color:#fff;padding:22px 40px}
header h1{margin:0 0 4px;font-size:24px;font-weight:600}
header p{margin:0;color:#bcccdc}
main{max-width:1200px;margin:0 auto;padding:20px 40px 60px}
section{background:#fff;border:1px solid #d9e2ec;border-radius:6px;padding:16px 22px;margin:18px 0}
h2{font-size:19px;margin:0 0 10px;color:#243b53;border-bottom:1px solid #e4e7eb;padding-bottom:6px}
h3{font-size:15px;margin:16px 0 6px;color:#334e68}
nav ol{margin:4px 0;padding-left:22px;columns:2}
nav a{color:#2f6fb0;text-decoration:none}
table{border-collapse:collapse;margin:8px 0;font-size:13px}
th,td{border:1px solid #d9e2ec;padding:4px 9px;text-align:left;vertical-align:top}
th{background:#f0f4f8;font-weight:600}
td.num{text-align:right;font-variant-numeric:tabular-nums;font-family:ui-monospace,Menlo,Consolas,monospace}
.cards{display:flex;flex-wrap:wrap;gap:10px}
.card{border:1px solid #d9e2ec;border-radius:6px;padding:8px 14px;min-width:140px;background:#f8fafc}
.card .k{font-size:11px;color:#627d98;text-transform:uppercase;letter-spacing:.04em}
.card .v{font-size:18px;font-weight:600}
.badge{display:inline-block;padding:1px 8px;border-radius:10px;font-size:12px;font-weight:600}
.ok{background:#e3f9e5;color:#207227}.warn{background:#fff3c4;color:#8d6708}.bad{background:#ffe3e3;color:#a61b1b}
.muted{color:#627d98}
pre{background:#f0f4f8;padding:8px;white-space:pre-wrap;overflow-wrap:anywhere;font-size:12px;max-height:420px;
overflow-y:auto}
img{max-width:100%;border:1px solid #e4e7eb;margin:6px 0}
details{margin:4px 0}summary{cursor:pointer;color:#2f6fb0}
code{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:12px}
"""


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _num(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return _e("" if value is None else value)
    if isinstance(value, int):
        return f"{value:,}"
    if not math.isfinite(value):
        return _e(value)
    if value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e5):
        return f"{value:.3g}"
    return f"{value:.5g}"


def _cell(value: Any) -> str:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return f'<td class="num">{_num(value)}</td>'
    if isinstance(value, (list, tuple)):
        value = ", ".join(str(v) for v in value)
    return f"<td>{_e('' if value is None else value)}</td>"


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(_cell(v) for v in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def dict_table(data: Mapping[str, Any]) -> str:
    """A mapping as a table: ``{row: {column: value}}`` as a grid, anything else as key/value."""
    if data and all(isinstance(v, Mapping) for v in data.values()):
        columns: list[str] = []
        for v in data.values():
            columns += [str(k) for k in v if str(k) not in columns]
        rows = [[name] + [{str(k): x for k, x in v.items()}.get(c) for c in columns] for name, v in data.items()]
        return _table([""] + columns, rows)
    return _table(["", "value"], [[k, v] for k, v in data.items()])


def _img(png: bytes, alt: str) -> str:
    return f'<img src="{plots.png_data_uri(png)}" alt="{_e(alt)}">'


def _card(key: str, value: Any) -> str:
    return f'<div class="card"><div class="k">{_e(key)}</div><div class="v">{_num(value)}</div></div>'


def _certificate(label: str, err: Any) -> str:
    if err is None:
        return f"<tr><td>{_e(label)}</td><td colspan=4 class=muted>not measured</td></tr>"
    cls = "bad" if err.nonfinite else ("ok" if err.max_rel <= 1e-4 else "warn")
    verdict = "non-finite values" if err.nonfinite else ("equivalent" if err.max_rel <= 1e-4 else "changes numerics")
    return (f"<tr><td>{_e(label)}</td>{_cell(err.max_abs)}{_cell(err.max_rel)}{_cell(err.reference_max)}"
            f'<td><span class="badge {cls}">{_e(verdict)}</span></td></tr>')


def _node_list(kind: str, names: Sequence[str]) -> str:
    if not names:
        return ""
    shown = ", ".join(f"<code>{_e(n)}</code>" for n in names[:NODE_LIST])
    more = f" ... and {len(names) - NODE_LIST} more (see the JSON)" if len(names) > NODE_LIST else ""
    return f"<details><summary>{len(names)} nodes {_e(kind)}</summary><p>{shown}{more}</p></details>"


def _pass_section(i: int, entry: AuditEntry) -> str:
    status = '<span class="badge ok">modified</span>' if entry.modified else '<span class="badge">no change</span>'
    summary = getattr(entry.plan, "summary", None)
    summary_text = str(summary()) if callable(summary) else ""
    plan_json = json.dumps(to_jsonable(entry.plan), indent=1)
    cut = len(plan_json) > PLAN_CHARS
    plan_json = plan_json[:PLAN_CHARS] + ("\n... (cut; the whole plan is in report.json)" if cut else "")
    d = entry.diff
    parts = [
        f'<h3 id="pass-{i}">{i}. {_e(entry.pass_name)} {status} <span class="muted">{entry.seconds:.2f} s</span></h3>',
        f"<pre>{_e(summary_text)}</pre>" if summary_text else "",
        (f"<p>Nodes: <b>+{len(d.added)}</b> added, <b>-{len(d.removed)}</b> removed, "
         f"<b>~{len(d.changed)}</b> changed.</p>"),
        _node_list("added", d.added), _node_list("removed", d.removed), _node_list("changed", d.changed),
        ("<table><thead><tr><th>certificate: model outputs</th><th>max |error|</th>"
         "<th>max |error| / max |output|</th><th>max |output|</th><th></th></tr></thead><tbody>"),
        _certificate("vs the previous graph", entry.error_vs_previous),
        _certificate("vs the captured original", entry.error_vs_reference),
        "</tbody></table>",
        f'<p class="muted">Checked on {_e(entry.checked_on.describe())}.</p>' if entry.checked_on else "",
        f"<details><summary>plan (JSON)</summary><pre>{_e(plan_json)}</pre></details>",
    ]
    return "\n".join(p for p in parts if p)


def _outlier_rows(before: Sequence[TensorOutliers], after: Sequence[TensorOutliers] | None) -> list[list[Any]]:
    after_by_node = {t.node: t for t in after or ()}
    rows = []
    for t in before:
        tops = ", ".join(f"{c} ({tok})" for c, tok, _ in t.top_tokens[:3])
        row: list[Any] = [t.module_path or t.node, t.role, t.max_abs, t.max - t.min, t.top1pct_range_share, tops]
        if after is not None:
            new = after_by_node.get(t.node)
            new_range = (new.max - new.min) if new else None
            row += [new_range, (t.max - t.min) / new_range if new_range else None]
        rows.append(row)
    return rows


def _sqnr(value: float) -> Any:
    return "exact" if value == math.inf else value


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def report_data(report: Any, outliers_before: Sequence[TensorOutliers] | None = None,
                outliers_after: Sequence[TensorOutliers] | None = None,
                quant_errors: Sequence[TensorQuantError] | None = None,
                quality: Mapping[str, Any] | None = None, speed: Mapping[str, Any] | None = None,
                title: str | None = None, model_name: str | None = None) -> dict[str, Any]:
    """Everything the report shows, as JSON-ready data (this is ``report.json``)."""
    from .. import __version__

    return _jsonable({
        "title": title or _default_title(report, model_name),
        "model": model_name,
        "generated": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "outlierfx_version": __version__,
        "quantization": report.as_dict(),
        "outliers": {"before": [t.as_dict() for t in outliers_before] if outliers_before is not None else None,
                     "after": [t.as_dict() for t in outliers_after] if outliers_after is not None else None},
        "quantization_errors": [r.as_dict() for r in quant_errors] if quant_errors is not None else None,
        "quality": dict(quality) if quality is not None else None,
        "speed": dict(speed) if speed is not None else None,
    })


def _default_title(report: Any, model_name: str | None) -> str:
    subject = f"{model_name}: " if model_name else ""
    return f"{subject}{report.recipe} recipe, {report.bits}"


def render_html(report: Any, outliers_before: Sequence[TensorOutliers] | None = None,
                outliers_after: Sequence[TensorOutliers] | None = None,
                quant_errors: Sequence[TensorQuantError] | None = None,
                quality: Mapping[str, Any] | None = None, speed: Mapping[str, Any] | None = None,
                title: str | None = None, model_name: str | None = None,
                after_label: str = "after the recipe's rewrites") -> str:
    """The report as one HTML document (no external resources)."""
    title = title or _default_title(report, model_name)
    not_at_target = report.not_at_target()
    sections: list[tuple[str, str, str]] = []  # (id, heading, body)

    cards = [_card("model", model_name or "-"), _card("preset", getattr(report, "preset", None) or "-"),
             _card("recipe", report.recipe), _card("backend", report.backend), _card("bits", report.bits),
             _card("policy", report.policy), _card("passes", len(report.audit)),
             _card("calibration batches", report.calibration_batches),
             _card("calibration s", round(report.calibration_seconds, 2))]
    if quant_errors:
        finite = [r.sqnr_db for r in quant_errors if math.isfinite(r.sqnr_db)]
        cards += [_card("quantized tensors", len(quant_errors))]
        if finite:
            cards += [_card("worst SQNR dB", round(min(finite), 1))]
    kept_float = report.kept_float() if hasattr(report, "kept_float") else []
    cards.append(_card("kept float by the policy", len(kept_float)))
    cards.append(_card("tensors not at target", len(not_at_target)))
    why = getattr(report, "why", None)
    fit = getattr(report, "backend_fit", None)
    notes = (f"<p><b>Why this recipe:</b> {_e(why)}</p>" if why else "") + (
        f"<p><b>Backend fit (checked before calibration):</b> {_e(fit.summary())}</p>" if fit is not None else "")
    sections.append(("summary", "Summary", f'<div class="cards">{"".join(cards)}</div>{notes}'))

    body = []
    if quality:
        body.append("<h3>Quality</h3>" + dict_table(quality))
    if speed:
        body.append("<h3>Speed and size</h3>" + dict_table(speed))
    sections.append(("quality", "Quality and speed",
                     "\n".join(body) or '<p class="muted">Not measured for this run.</p>'))

    passes = [_pass_section(i, e) for i, e in enumerate(report.audit, 1)]
    overview = _table(["#", "pass", "modified", "+nodes", "-nodes", "~nodes", "max |error| vs previous", "rel", "s"], [
        [i, e.pass_name, "yes" if e.modified else "no", len(e.diff.added), len(e.diff.removed), len(e.diff.changed),
         e.error_vs_previous.max_abs if e.error_vs_previous else None,
         e.error_vs_previous.max_rel if e.error_vs_previous else None, round(e.seconds, 2)]
        for i, e in enumerate(report.audit, 1)])
    sections.append(("passes", "Passes and their certificates",
                     "<p>Each pass ran on the graph left by the previous one; the pass manager compared the "
                     "model outputs before and after it on the example batch (the certificate).</p>"
                     + overview + "\n".join(passes)))

    if outliers_before is not None:
        png = plots.outlier_figure(outliers_before, outliers_after, after_label, f"{title}: outlier channels")
        header = ["tensor", "role", "max |x|", "range", "top 1% share", "top channels (token)"]
        if outliers_after is not None:
            header += [f"range {after_label}", "shrink x"]
        note = "" if outliers_after is not None else (
            f'<p class="muted">The {_e(report.recipe)} recipe rewrites nothing before quantization: '
            "the quantizers see these ranges.</p>")
        sections.append(("outliers", "Outliers per layer",
                         "<p>Per-channel max |x| of every norm output (heatmaps, log scale) and the per-tensor "
                         "range of each (right) over the calibration tokens, padding excluded. "
                         "<i>top 1% share</i>: the part of the range only the top 1% of channels need.</p>"
                         + note + _img(png, "outlier heatmaps")
                         + _table(header, _outlier_rows(outliers_before, outliers_after))))

    if quant_errors is not None:
        png = plots.quant_error_figure(quant_errors, f"{title}: SQNR of each quantized tensor, per layer")
        worst = sorted(quant_errors, key=lambda r: r.sqnr_db)
        header = ["tensor", "layer", "roles", "quantization", "SQNR dB", "relative MSE", "max |error|",
                  "clipped", "values"]
        rows = [[r.tensor, r.block, r.roles, r.quantization, _sqnr(r.sqnr_db), r.rel_mse, r.max_abs_error,
                 r.clipped_fraction, r.elements] for r in worst]
        sections.append(("quant-error", "Quantization error per tensor",
                         "<p>What each activation quantizer does to the tensor it receives in the quantized model "
                         "(upstream quantization included), padding excluded. SQNR = 10 log10(signal power / "
                         f"noise power); bars red below {plots.LOW_DB:g} dB, green above {plots.HIGH_DB:g} dB. "
                         "Weights are quantized per output channel (see the ConvertToFakeQuant plan).</p>"
                         + _img(png, "quantization error per layer")
                         + "<h3>All quantized tensors, worst first</h3>" + _table(header, rows)))

    if not_at_target:
        rows = [[r["tensor"], r["node"], r["roles"], r["quantization"], r["why"]] for r in not_at_target]
        body = (f"<p>{len(not_at_target)} tensors that carry a quantization role are not quantized at "
                f"{_e(report.bits)}:</p>" + _table(["tensor", "node", "roles", "kept as", "why"], rows))
    else:
        body = f"<p>Every tensor with a quantization role is quantized at {_e(report.bits)}.</p>"
    if kept_float:
        rows = [[r["tensor"], r["roles"], r["why"]] for r in kept_float]
        body += (f"<h3>Kept float by policy {_e(report.policy)} (by design)</h3>"
                 + _table(["tensor", "roles", "why"], rows))
    sections.append(("float", "Tensors not at the target width", body))

    toc = "".join(f'<li><a href="#{sid}">{_e(heading)}</a></li>' for sid, heading, _ in sections)
    stamp = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    content = "\n".join(f'<section id="{sid}"><h2>{_e(heading)}</h2>\n{b}</section>' for sid, heading, b in sections)
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>outlierfx audit report: {_e(title)}</title>
<style>{_CSS}</style></head>
<body><header><h1>outlierfx audit report</h1><p>{_e(title)} &middot; generated {_e(stamp)}</p></header>
<main><nav><section><h2>Contents</h2><ol>{toc}</ol></section></nav>
{content}
</main></body></html>
"""


def _write_new(path: pathlib.Path, text: str) -> None:
    partial = path.with_name(f".{path.name}.partial-{os.getpid()}")
    partial.write_text(text, encoding="utf-8")
    partial.replace(path)


def write_report(
    out_dir: str | os.PathLike,
    *,
    report: Any,
    outliers_before: Sequence[TensorOutliers] | None = None,
    outliers_after: Sequence[TensorOutliers] | None = None,
    quant_errors: Sequence[TensorQuantError] | None = None,
    quality: Mapping[str, Any] | None = None,
    speed: Mapping[str, Any] | None = None,
    title: str | None = None,
    model_name: str | None = None,
    after_label: str = "after the recipe's rewrites",
    overwrite: bool = False,
) -> tuple[pathlib.Path, pathlib.Path]:
    """Write ``report.html`` and ``report.json`` into ``out_dir`` (created if missing).

    ``report`` is the :class:`~outlierfx.api.QuantizationReport` of ``outlierfx.quantize``;
    the other parts are optional and their sections are left out (quality/speed: "not
    measured") when absent. ``quality`` and ``speed`` are ``{row: {column: value}}`` or flat
    ``{name: value}`` mappings. Existing report files are never replaced unless ``overwrite``.
    """
    out = pathlib.Path(out_dir)
    html_path, json_path = out / HTML_NAME, out / JSON_NAME
    if not overwrite:
        existing = [p for p in (html_path, json_path) if p.exists()]
        if existing:
            raise OutlierFXError(f"{existing[0]} exists; choose another output directory")
    parts: dict[str, Any] = {"outliers_before": outliers_before, "outliers_after": outliers_after,
                             "quant_errors": quant_errors, "quality": quality, "speed": speed, "title": title,
                             "model_name": model_name}
    page = render_html(report, after_label=after_label, **parts)
    data = report_data(report, **parts)
    out.mkdir(parents=True, exist_ok=True)
    _write_new(html_path, page)
    _write_new(json_path, json.dumps(data, indent=1))
    return html_path, json_path
