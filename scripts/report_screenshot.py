"""Regenerate docs/report-screenshot.png: quantize the packaged MiniLM (W8A8, recipe ``os`` so the
outlier plots show gamma migration's before/after), write the audit report with measured quality,
and render it in headless Chromium (scripts/setup-browser.sh installs it).

    OMP_NUM_THREADS=1 .venv/bin/python scripts/report_screenshot.py [--recipe os] [--out DIR]
"""

from __future__ import annotations

import argparse
import pathlib
import shutil
import tempfile

import outlierfx
from outlierfx.benchmarks import CALIBRATION, calibration_batches
from outlierfx.evaluate import EncoderEval
from outlierfx.models import load
from outlierfx.report import build_report, screenshot

ROOT = pathlib.Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="os")
    parser.add_argument("--bits", default="W8A8")
    parser.add_argument("--out", help="keep the report here (default: a temporary folder)")
    args = parser.parse_args()
    loaded = load("minilm")
    batches = calibration_batches(loaded, **CALIBRATION["encoder"])
    qmodel, report = outlierfx.quantize(loaded.model, batches, recipe=args.recipe, bits=args.bits)
    evaluator = EncoderEval.build(loaded, sentences=64)
    reference = evaluator.embeddings(loaded.model)
    quality = {"fp32": evaluator.metrics(loaded.model, None),
               f"{args.recipe} {args.bits} (simulated)": evaluator.metrics(qmodel, reference)}
    out = pathlib.Path(args.out) if args.out else pathlib.Path(tempfile.mkdtemp(prefix="outlierfx-report-"))
    html_path, _ = build_report(out, model=loaded.model, qmodel=qmodel, report=report, batches=batches,
                                tokenizer=loaded.tokenizer, quality=quality, model_name="minilm", progress=True)
    png = screenshot(html_path, out / "report.png", width=1280, height=4000)
    target = ROOT / "docs" / "report-screenshot.png"
    shutil.copyfile(png, target)
    print(f"wrote {html_path} and {target}")


if __name__ == "__main__":
    main()
