"""Save a real model's lowered forms and reload each in a NEW Python process, output for output
(the saved-format contract: any process, bit for bit). Used by the slow test on MiniLM and by
``bench/scripts/round_trip.py`` for SmolLM2."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from safetensors.torch import save_file

import outlierfx

ROOT = pathlib.Path(outlierfx.__file__).resolve().parent.parent

_CHECK = """
import json, sys, time, torch, outlierfx
from safetensors.torch import load_file
results = {}
for backend, folder in json.loads(sys.argv[1]).items():
    data = load_file(folder + '.check.safetensors')
    expected = data.pop('expected')
    start = time.perf_counter()
    model = outlierfx.load(folder)
    with torch.no_grad():
        out = model(**data)[0]
    results[backend] = {'bit_exact': bool(torch.equal(out, expected)),
                        'max_abs_diff': float((out - expected).abs().max()),
                        'load_and_first_call_s': round(time.perf_counter() - start, 1)}
print(json.dumps(results))
"""


def reload_in_new_process(models: Mapping[str, torch.nn.Module], inputs: Mapping[str, torch.Tensor],
                          folder: str | os.PathLike, timeout: float = 1800) -> dict[str, dict[str, Any]]:
    """Save each lowered model (backend -> model) under ``folder``, run it on ``inputs`` here, then
    load and run every one in one new process; returns per backend whether the outputs are equal
    bit for bit, the largest difference, and the new process's load + first-call seconds."""
    folders = {}
    for backend, model in models.items():
        path = pathlib.Path(folder) / backend
        folders[backend] = str(outlierfx.save(model, path))
        with torch.no_grad():
            expected = model(**inputs)[0]
        save_file({**inputs, "expected": expected.contiguous()}, folders[backend] + ".check.safetensors")
    result = subprocess.run([sys.executable, "-c", _CHECK, json.dumps(folders)], capture_output=True, text=True,
                            timeout=timeout, env={**os.environ, "PYTHONPATH": str(ROOT)})
    if result.returncode != 0:
        raise RuntimeError(f"the new process failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def lowered_presets(model: torch.nn.Module, batches: Sequence[Mapping[str, torch.Tensor]],
                    backends: Sequence[str]) -> dict[str, torch.nn.Module]:
    """Each backend's lowered ``fast`` preset, quantized once per distinct preset recipe (onednn,
    inductor and reference share theirs; the torch.ao engines have their own)."""
    from ..graph import capture
    from ..passes.lower import lower_model
    from ..recipes import choose
    from ..serialize import pre_lowering

    graph = capture(model, dict(batches[0]))
    fake: dict[str, torch.fx.GraphModule] = {}  # preset recipe -> its fake-quant graph
    lowered = {}
    for backend in backends:
        recipe = choose(None, backend, graph)[0].name
        if recipe not in fake:
            qmodel, _ = outlierfx.quantize(model, list(batches), backend=backend, generation=False, progress=False)
            fake[recipe] = pre_lowering(qmodel)[0]
        lowered[backend] = lower_model(fake[recipe], backend)[0]
    return lowered
