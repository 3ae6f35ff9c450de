"""``outlierfx bench speed``: latency, quality and size of FP32 and each int8 path, in one process.

Every candidate runs on the same inputs, interleaved (one call of each per round, so drift in
the machine's speed hits all of them alike), with a fixed thread count; the median over rounds
is reported with its ratio to FP32 eager. Each row carries its quality (embedding cosine /
Lee-50, or perplexity) and its size on disk. Peers run in the same process where installed:
torch.ao ``quantize_dynamic`` always, torchao's PT2E ``X86InductorQuantizer`` if ``torchao``
is importable. With ``onnx=True``, ONNX Runtime runs the FP32 graph and the first backend's
int8 model exported as QDQ ONNX (:func:`outlierfx.export_onnx`) in the same interleaved rounds.
For a causal LM the decode rows (:mod:`outlierfx.decode_speed`: one token at batch 1 after 256 in
the cache) are timed in the same rounds too. The threads runnable machine-wide are sampled
before each timed call: ``env["threads_beyond_cores"]``, and a warning where other processes
competed for the cores (:func:`oversubscription`).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import os
import pathlib
import platform
import random
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch.utils._pytree import tree_map

from . import corpus
from .api import lower, quantize
from .backends.inductor import CompiledInt8
from .backends.runtime import cpu_description
from .benchmarks import CALIBRATION, calibration_batches
from .errors import OutlierFXWarning
from .evaluate import DecoderEval, EncoderEval
from .graph import capture
from .models import LoadedModel, encode, load
from .quantizers.policy import parse_bits
from .recipes import choose
from .serialize import TENSORS_FILE, save, size_on_disk_mb
from .stack_headroom import call_with_stack_headroom

# The backends the acceptance targets are stated on: onednn (eager) and inductor (compiled); the
# torch.ao engines are one --backends away.
DEFAULT_BACKENDS = ("onednn", "inductor")
SHAPES = {"encoder": (8, 128), "decoder": (1, 256)}  # (batch, sequence): MiniLM batch, SmolLM2 prefill


@dataclasses.dataclass
class Candidate:
    name: str
    backend: str
    model: Callable[..., Any]
    size_mb: float | None = None
    setup_s: float = 0.0  # quantize + lower (+ first-call compilation)


def speed_inputs(loaded: LoadedModel, batch: int, seq: int) -> dict[str, torch.Tensor]:
    """``batch`` sequences of exactly ``seq`` real tokens (no padding), from held-out text."""
    if loaded.kind == "decoder":
        ids = DecoderEval.build(loaded, window=seq, windows=batch).wiki
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    texts = [t for t in corpus.wikipedia("evaluation") if len(t.split()) > 2 * seq][:batch]
    inputs = encode(loaded, texts, seq)
    if inputs["input_ids"].shape != (batch, seq):
        raise RuntimeError(f"could not build {batch} x {seq} unpadded inputs")
    return inputs


@dataclasses.dataclass(frozen=True)
class TimedCall:
    """One timed call: ``run`` is timed, ``prepare`` runs (untimed) before each ``run`` (a decode
    step restores its cache there)."""

    run: Callable[[], Any]
    prepare: Callable[[], Any] = lambda: None


def interleaved_medians(models: Mapping[str, Callable[..., Any]], inputs: Mapping[str, torch.Tensor],
                        rounds: int) -> dict[str, float]:
    """Median seconds per call of each model on ``inputs`` (see :func:`interleaved_call_medians`)."""
    return interleaved_call_medians({name: TimedCall(functools.partial(model, **inputs))
                                     for name, model in models.items()}, rounds)


def interleaved_call_medians(calls: Mapping[str, TimedCall], rounds: int) -> dict[str, float]:
    """Median seconds of each call: one warm-up call each, then ``rounds`` rounds of one call
    each, so drift in the machine's speed hits all of them alike. Each round runs the calls in a
    new (seeded) random order: a model run right after FP32 eager (whose weights evict the
    caches) measured ~2 ms (7%) slower on MiniLM than in any other seat, so no model may keep
    one. (The 2026-11-23 JSON files were measured with each round starting one model later
    instead, which keeps most neighbours.) Each timed call runs with its own data-stack chunk
    (:func:`~outlierfx.stack_headroom.call_with_stack_headroom`), so no model's time depends on
    how deep in the benchmark's stack it is called."""
    times: dict[str, list[float]] = {name: [] for name in calls}
    order = list(calls)
    shuffle = random.Random(0).shuffle
    with torch.no_grad():
        for call in calls.values():
            call.prepare()
            call_with_stack_headroom(call.run)
        for _ in range(rounds):
            shuffle(order)
            for name in order:
                calls[name].prepare()
                start = time.perf_counter()
                call_with_stack_headroom(calls[name].run)
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def runnable_tasks() -> int:
    """Threads running or waiting for a core right now, machine-wide, this one included
    (``/proc/loadavg``'s fourth field); 0 where the file does not exist."""
    try:
        with open("/proc/loadavg") as f:
            return int(f.read().split()[3].split("/")[0])
    except OSError:
        return 0


def counting_load(call: TimedCall, samples: list[int]) -> TimedCall:
    """``call`` with :func:`runnable_tasks` read into ``samples`` before each (untimed) prepare."""
    def prepare() -> None:
        samples.append(runnable_tasks())
        call.prepare()
    return TimedCall(call.run, prepare)


def oversubscription(samples: Sequence[int]) -> float:
    """Threads beyond the cores' count (runnable, this run's counted as busy), on average over
    ``samples`` of :func:`runnable_tasks` taken before the timed calls.

    Above ~0.5 the timed threads waited for cores, and a path of many short OpenMP regions with
    Python between them (onednn's eager decode step: a region per GEMM, libgomp's worker
    spinning through the gaps) slows far more than a compiled one: on a shared 2-core machine
    under a load of 4-6, onednn's SmolLM2 decode step took 1.6-4.5x FP32 eager's wall time at 2
    threads, 0.94x with ``OMP_WAIT_POLICY=PASSIVE``, and 0.70-0.90x of its CPU time at 1 thread
    (docs/generate.md, Decode speed)."""
    cores = os.cpu_count() or 1
    return statistics.fmean(max(0, n - cores) for n in samples) if samples else 0.0


def state_size_mb(model: torch.nn.Module) -> float:
    """Size on disk of ``model``'s state dict saved with ``torch.save``."""
    with tempfile.TemporaryDirectory() as tmp:
        path = f"{tmp}/model.pt"
        torch.save(model.state_dict(), path)
        return size_on_disk_mb(path)


def torchao_pt2e(model: torch.nn.Module, batches: Sequence[dict[str, Any]]) -> Callable[..., Any] | None:
    """torchao PT2E static int8 with X86InductorQuantizer + inductor (None if not installed).
    ``batches``: keyword inputs (tensors, or lists of them: a cache graph's keys and values),
    every dimension of every tensor left to export to keep or make symbolic."""
    try:
        import torchao.quantization.pt2e.quantize_pt2e as pt2e
        from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (
            X86InductorQuantizer,
            get_default_x86_inductor_quantization_config,
        )
    except ImportError:
        return None
    quantizer = X86InductorQuantizer().set_global(get_default_x86_inductor_quantization_config())
    dims = tree_map(lambda t: {i: torch.export.Dim.AUTO for i in range(t.dim())}, dict(batches[0]))
    with torch.no_grad():
        exported = torch.export.export(model, (), dict(batches[0]), dynamic_shapes=dims, strict=False).module()
    prepared = pt2e.prepare_pt2e(exported, quantizer)
    with torch.no_grad():
        for batch in batches:
            prepared(**batch)
    return CompiledInt8(pt2e.convert_pt2e(prepared))  # compiled with freezing on, as ours


def onnx_runtime_candidates(graph: torch.fx.GraphModule, fake: torch.nn.Module, label: str,
                            threads: int) -> list[Candidate]:
    """FP32 and int8 in ONNX Runtime with ``threads`` threads: the captured float ``graph``
    exported as it is, and the fake-quant model ``fake`` exported as QDQ (reported as ``label``)."""
    from .export import OnnxRuntimeModel, export_onnx, graph_to_onnx

    found = []
    with tempfile.TemporaryDirectory() as tmp:  # a session holds its model in memory once made
        for name, write in (("fp32", lambda path: graph_to_onnx(graph, path)),
                            (label, lambda path: export_onnx(fake, path))):
            start = time.perf_counter()
            path = write(pathlib.Path(tmp) / f"{len(found)}.onnx")
            session = OnnxRuntimeModel(path, threads)
            found.append(Candidate(name, "onnxruntime", session, size_on_disk_mb(path), time.perf_counter() - start))
    return found


def speed(model_name: str, recipe: str | None = None, bits: str = "W8A8", backends: Sequence[str] = DEFAULT_BACKENDS,
          policy: str | None = None, threads: int = 2, rounds: int = 10, peers: bool = True,
          quality: bool = True, progress: bool = True, onnx: bool = False, decode: bool = True) -> dict[str, Any]:
    """FP32 eager and compiled, each int8 path of ours and the peers, timed in one interleaved run.
    ``recipe=None``: each backend's ``fast`` preset (one quantization per distinct recipe).
    ``onnx``: also FP32 and the first backend's int8 model in ONNX Runtime. ``decode`` (causal
    LMs): also the decode rows (:mod:`outlierfx.decode_speed`), timed in the same rounds."""
    torch.set_num_threads(threads)
    loaded = load(model_name)
    model = loaded.model.eval()
    batch, seq = SHAPES[loaded.kind]
    inputs = speed_inputs(loaded, batch, seq)
    calibration = calibration_batches(loaded, **CALIBRATION[loaded.kind])
    say = print if progress else (lambda *a, **k: None)

    candidates = [Candidate("fp32", "eager", model, state_size_mb(model))]
    start = time.perf_counter()
    say("compiling the FP32 model with inductor")
    compiled_fp32 = torch.compile(copy.deepcopy(model))
    with torch.no_grad():
        compiled_fp32(**inputs)
    candidates.append(Candidate("fp32", "inductor", compiled_fp32, candidates[0].size_mb, time.perf_counter() - start))

    simulated: dict[str, tuple[Any, Any, float]] = {}  # recipe name -> (fake-quant model, report, seconds)
    graph = capture(model, dict(calibration[0]))  # a preset follows the model's structure
    first_int8: tuple[str, Any] | None = None  # (label, fake-quant model): what onnx=True exports
    ours: list[tuple[str, str, Any]] = []  # (label, backend, recipe): what the decode rows quantize again
    for backend in backends:
        chosen, _, chosen_preset = choose(recipe, backend, graph, parse_bits(bits))
        if chosen.name not in simulated:
            start = time.perf_counter()
            # the prefill rows time the one-pass forward (the decode rows quantize the cache graph)
            fake, report = quantize(model, calibration, recipe=chosen, bits=bits, policy=policy, generation=False,
                                    progress=progress)
            simulated[chosen.name] = (fake, report, time.perf_counter() - start)
            say(f"quantized ({chosen.name}, {bits}) in {simulated[chosen.name][2]:.1f}s")
        fake, report, quantize_s = simulated[chosen.name]
        start = time.perf_counter()
        if backend == "inductor":
            say("compiling the int8 model with inductor (a few minutes on 2 cores)")
        lowered = lower(fake, report, backend).model  # FuseAttention, then Lower (inductor: compiled on first call)
        with torch.no_grad():
            lowered(**inputs)
        setup = quantize_s + time.perf_counter() - start
        with tempfile.TemporaryDirectory() as tmp:
            size = size_on_disk_mb(save(lowered, tmp) / TENSORS_FILE)
        label = f"{chosen_preset.goal.value} ({chosen.name})" if chosen_preset else chosen.name
        candidates.append(Candidate(label, backend, lowered, size, setup))
        first_int8 = first_int8 or (label, fake)
        ours.append((label, backend, chosen))
        say(f"lowered to {backend} in {time.perf_counter() - start:.1f}s")
    if onnx and first_int8 is not None:
        say("exporting FP32 and int8 to ONNX for ONNX Runtime")
        candidates += onnx_runtime_candidates(graph, first_int8[1], first_int8[0], threads)
    eager_peers: list[tuple[str, str, torch.nn.Module]] = []  # peers that keep the Hugging Face model (and its cache)
    if peers:
        start = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dynamic = torch.ao.quantization.quantize_dynamic(copy.deepcopy(model), {torch.nn.Linear}, dtype=torch.qint8)
        candidates.append(Candidate("torch.ao dynamic", "fbgemm", dynamic, state_size_mb(dynamic),
                                    time.perf_counter() - start))
        eager_peers.append(("torch.ao dynamic", "fbgemm", dynamic))
        start = time.perf_counter()
        exported = copy.deepcopy(model)
        if loaded.kind == "decoder":  # logits only: torch.export cannot return transformers' DynamicCache
            exported.config.use_cache = False
        pt2e = torchao_pt2e(exported, calibration[:4])
        if pt2e is not None:
            with torch.no_grad():
                pt2e(**inputs)
            candidates.append(Candidate("torchao pt2e x86", "inductor", pt2e, None, time.perf_counter() - start))

    decoders: list[Any] = []
    if decode and loaded.kind == "decoder":
        from . import decode_speed  # builds on this module's timing and peers

        say(f"decode rows: the KV-cache graph, each path prefilled with {decode_speed.CACHE_TOKENS} tokens")
        decoders = decode_speed.decode_candidates(loaded, calibration, ours, bits, policy, eager_peers, torchao=peers,
                                                  say=say)
    calls = {str(i): TimedCall(functools.partial(c.model, **inputs)) for i, c in enumerate(candidates)}
    calls |= {f"decode {i}": d.timed() for i, d in enumerate(decoders)}
    runnable: list[int] = []
    medians = interleaved_call_medians({name: counting_load(call, runnable) for name, call in calls.items()}, rounds)
    waiting = oversubscription(runnable)
    if waiting >= 0.5:
        warnings.warn(f"~{waiting:.1f} threads more than the {os.cpu_count()} cores were runnable while the rounds "
                      f"ran: the latencies include waits for a core, most on eager paths of many small calls "
                      f"(onednn's decode step); time on an idle machine, or with --threads 1", OutlierFXWarning,
                      stacklevel=2)

    evaluator = None
    reference = None
    if quality:
        evaluator = EncoderEval.build(loaded, sentences=64) if loaded.kind == "encoder" else DecoderEval.build(loaded)
        reference = evaluator.embeddings(model) if loaded.kind == "encoder" else None
    base = medians["0"]
    rows = []
    for i, c in enumerate(candidates):
        latency = medians[str(i)]
        metrics: dict[str, Any] = {"latency_ms": round(latency * 1000, 2), "latency_ratio_vs_fp32": round(latency / base, 3)}
        if c.size_mb is not None:
            metrics["size_mb"] = round(c.size_mb, 1)
            metrics["size_ratio_vs_fp32"] = round(c.size_mb / candidates[0].size_mb, 3)
        if evaluator is not None:
            with torch.no_grad():
                metrics.update({k: round(v, 4) for k, v in evaluator.metrics(c.model, reference).items()})
        metrics["setup_s"] = round(c.setup_s, 1)
        row = {"model": model_name, "recipe": c.name, "bits": "FP32" if c.name == "fp32" else bits,
               "backend": c.backend, "metrics": metrics}
        rows.append(row)
        say(format_row(row))
    env = {"torch": torch.__version__, "python": platform.python_version(), "threads": threads, "rounds": rounds,
           "batch": batch, "seq": seq, "cpu": cpu_description(),
           "threads_beyond_cores": round(waiting, 2),
           "policies": sorted({r.policy for _, r, _ in simulated.values()})}
    if decoders:
        windows = DecoderEval.build(loaded, decode_speed.CACHE_TOKENS, decode_speed.PPL_WINDOWS).wiki if quality else None
        for row in decode_speed.decode_rows(model_name, bits, decoders,
                                            [medians[f"decode {i}"] for i in range(len(decoders))], windows):
            rows.append(row)
            say(decode_speed.format_decode_row(row))
        env |= decode_speed.decode_env(windows)
    return {"rows": rows, "env": env}


def format_row(row: dict[str, Any]) -> str:
    m = row["metrics"]
    quality = "  ".join(f"{k} {m[k]}" for k in ("cosine", "lee50", "ppl_wiki", "ppl_news") if k in m)
    size = f"{m['size_mb']:7.1f} MB" if "size_mb" in m else "      - MB"
    return (f"{row['recipe']:24} {row['backend']:11} {m['latency_ms']:9.1f} ms  x{m['latency_ratio_vs_fp32']:.3f}  "
            f"{size}  {quality}")
