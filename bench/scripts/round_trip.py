"""Save each backend's lowered preset of a packaged model and reload it in a new process, output
for output (issue 27's round trip; MiniLM's is a slow test).

    .venv/bin/python bench/scripts/round_trip.py --model smollm2 --json bench/results/smollm2/round-trip.json
"""

from __future__ import annotations

import argparse
import json
import tempfile

from outlierfx.backends import runnable_backends
from outlierfx.benchmarks import CALIBRATION, calibration_batches
from outlierfx.corpus import wikipedia_sample
from outlierfx.models import encode, load
from outlierfx.testing.round_trip import lowered_presets, reload_in_new_process


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--backends", default="onednn,inductor,x86,reference")
    parser.add_argument("--json")
    args = parser.parse_args()
    loaded = load(args.model)
    backends = runnable_backends(tuple(args.backends.split(",")))
    batches = calibration_batches(loaded, **CALIBRATION[loaded.kind])
    inputs = encode(loaded, wikipedia_sample("evaluation", 2), 128)
    with tempfile.TemporaryDirectory() as tmp:
        results = reload_in_new_process(lowered_presets(loaded.model, batches, backends), inputs, tmp)
    for backend, r in results.items():
        print(f"{backend:10s} bit-exact {r['bit_exact']}  max |diff| {r['max_abs_diff']:.3g}  "
              f"new process load + first call {r['load_and_first_call_s']} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": args.model, "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
