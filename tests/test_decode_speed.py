"""The decode rows of ``outlierfx bench speed`` (``decode_speed.py``) on a generated Llama model
saved with a word tokenizer: the rows appear with finite positive latencies, and each timed
decode step computes what the model computes for that token. No timing assertions: shared
machines are noisy."""

import json
import math

import pytest
import torch

import outlierfx
from outlierfx.backends import runnable_backends
from outlierfx.cli import main
from outlierfx.decode_speed import CACHE_TOKENS, CachedDecodeStep, EagerDecodeStep
from outlierfx.testing import build_model, first_token_grids_everywhere, word_tokenizer

pytestmark = pytest.mark.skipif(not runnable_backends(["onednn"]), reason="no onednn engine")

LOGIT_TOL = 1e-4  # as tests/test_generate.py: a fraction of the largest |logit|


def _tokens(count=CACHE_TOKENS + 1, seed=3):
    return torch.randint(0, 64, (1, count), generator=torch.Generator().manual_seed(seed))


def test_the_timed_decode_steps_compute_the_models_next_token_logits():
    g = build_model("llama", layers=2, kv_heads=2)
    tokens = _tokens(40)
    with torch.no_grad():
        float_logits = g.model(input_ids=tokens).logits[:, -1]
    eager = EagerDecodeStep(g.model, tokens)
    for _ in range(2):  # each round decodes from the same prefilled cache
        eager.prepare()
        with torch.no_grad():
            assert torch.allclose(eager(), float_logits, atol=1e-5)
    calibration = [{"input_ids": _tokens(8, seed)} for seed in range(3)]
    with first_token_grids_everywhere():  # onednn: the step runs its new token alone, on the main grids
        lm, _ = outlierfx.quantize(g.model, calibration, "naive+sink", backend="onednn", progress=False)
    full = lm(tokens).logits[:, -1]
    step = CachedDecodeStep(lm, tokens)
    assert step.rows == [39]
    for _ in range(2):
        step.prepare()
        with torch.no_grad():
            assert float((step() - full).abs().max() / full.abs().max()) <= LOGIT_TOL


def test_bench_speed_writes_decode_rows_for_a_causal_lm(tmp_path):
    g = build_model("llama", layers=2, kv_heads=2)
    folder, out = tmp_path / "llama", tmp_path / "speed.json"
    g.model.save_pretrained(folder)
    word_tokenizer().save_pretrained(folder)
    assert main(["bench", "speed", "--model", str(folder), "--backends", "onednn", "--rounds", "2", "--threads", "1",
                 "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    prefill = [r for r in result["rows"] if "phase" not in r]
    decode = [r for r in result["rows"] if r.get("phase") == "decode"]
    assert [(r["recipe"], r["backend"]) for r in prefill][:3] == [("fp32", "eager"), ("fp32", "inductor"),
                                                                 ("fast (rotate+sink)", "onednn")]
    expected = [("fp32", "eager"), ("fast (rotate+sink)", "onednn"), ("torch.ao dynamic", "fbgemm")]
    try:
        import torchao  # noqa: F401
        expected.append(("torchao pt2e x86", "inductor"))
    except ImportError:
        pass
    assert [(r["recipe"], r["backend"]) for r in decode] == expected
    for row in decode:
        assert math.isfinite(row["metrics"]["decode_ms"]) and row["metrics"]["decode_ms"] > 0
    assert decode[0]["metrics"]["decode_ratio_vs_fp32"] == 1.0
    ours = decode[1]["metrics"]
    assert abs(ours["ppl_incremental"] / ours["ppl_full"] - 1) <= 1e-3  # rounded to 4 decimals in the JSON
    assert result["env"]["decode_cache_tokens"] == CACHE_TOKENS
    assert result["env"]["threads_beyond_cores"] >= 0  # how oversubscribed the cores were while timing
