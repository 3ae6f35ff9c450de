"""FuseAttention on MiniLM: latency and embedding cosine of the int8 paths with and without it.

Naive W8A8 with the ``linear-inputs`` policy (only Linear inputs quantized, so no quantizer
sits inside attention); batch of 8 evaluation Wikipedia paragraphs truncated to 128 tokens;
2 threads; the variants run interleaved, one forward each per round; median of ROUNDS rounds.

    .venv/bin/python bench/scripts/fuse_attention_speed.py [ROUNDS]
"""

from __future__ import annotations

import statistics
import sys
import time

import torch

import outlierfx
from outlierfx import corpus
from outlierfx.evaluate import EncoderEval
from outlierfx.graph.compare import output_error, run
from outlierfx.models import encode, load
from outlierfx.passes import PassManager
from outlierfx.passes.fuse_attention import FuseAttention
from outlierfx.passes.lower import Lower, compile_int8
from outlierfx.quantizers.observers import FakeQuantize


def main(rounds: int = 15) -> None:
    torch.set_num_threads(2)
    minilm = load("minilm")
    texts = corpus.wikipedia_sample("calibration", 64)
    calibration = [encode(minilm, texts[i:i + 8], max_length=128) for i in range(0, 64, 8)]
    batch = encode(minilm, corpus.wikipedia("evaluation")[:8], max_length=128)
    print("batch", tuple(batch["input_ids"].shape), flush=True)

    qmodel, _ = outlierfx.quantize(minilm.model, calibration, recipe="naive", bits="W8A8",
                                   policy="linear-inputs", progress=False)
    start = time.perf_counter()
    fused_result = PassManager([FuseAttention()], sample_inputs=((), batch))(qmodel)
    print(f"FuseAttention + checks: {time.perf_counter() - start:.2f} s", flush=True)
    entry = fused_result.audit.entries[0]
    print(entry.plan.summary().splitlines()[0])
    print("error vs decomposed fake-quant graph:", entry.error_vs_previous, flush=True)
    fused = fused_result.graph_module
    quantizers = [m for m in qmodel.modules() if isinstance(m, FakeQuantize)]  # shared with `fused`
    for m in quantizers:
        m.enabled = False
    print("  the same with every quantizer disabled:", output_error(run(qmodel, ((), batch)), run(fused, ((), batch))))
    for m in quantizers:
        m.enabled = True

    variants = {
        "fp32 eager": minilm.model,
        "fake-quant graph": qmodel,
        "fake-quant graph + FuseAttention": fused,
        "Lower(x86)": Lower("x86")(qmodel).graph_module,
        "FuseAttention -> Lower(x86)": Lower("x86")(fused).graph_module,
        "compile_int8": compile_int8(qmodel),
        "FuseAttention -> compile_int8": compile_int8(fused),
    }
    sdpa = torch.ops.aten.scaled_dot_product_attention.default
    for name in ("FuseAttention -> Lower(x86)",):
        count = sum(1 for n in variants[name].graph.nodes if n.target is sdpa)
        print(f"{name}: {count} SDPA nodes after lowering")
    compile_s = {}
    with torch.no_grad():
        for name, model in variants.items():  # warm up (compiles the compiled variants)
            start = time.perf_counter()
            model(**batch)
            compile_s[name] = time.perf_counter() - start
            model(**batch)
        times: dict[str, list[float]] = {name: [] for name in variants}
        for _ in range(rounds):
            for name, model in variants.items():
                start = time.perf_counter()
                model(**batch)
                times[name].append(time.perf_counter() - start)

    evaluation = EncoderEval.build(minilm, sentences=64)
    reference = evaluation.embeddings(minilm.model)
    fp32_ms = statistics.median(times["fp32 eager"]) * 1e3
    print(f"\n{rounds} interleaved rounds, 2 threads, batch {tuple(batch['input_ids'].shape)}\n")
    print("| variant | median ms | min ms | vs fp32 | first call s | cosine | lee50 |")
    print("|---|---|---|---|---|---|---|")
    for name, model in variants.items():
        metrics = evaluation.metrics(model, reference)
        median = statistics.median(times[name]) * 1e3
        print(f"| {name} | {median:.1f} | {min(times[name]) * 1e3:.1f} | {fp32_ms / median:.2f}x | "
              f"{compile_s[name]:.1f} | {metrics['cosine']:.4f} | {metrics['lee50']:.4f} |", flush=True)


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 15)
