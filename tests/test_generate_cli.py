"""``outlierfx quantize`` on a decoder folder saves it with its KV cache; ``outlierfx generate``
continues a prompt from that folder (a generated Llama model and a word tokenizer: seconds)."""

import json
import re

import pytest
import torch

import outlierfx
from outlierfx.backends import runnable_backends
from outlierfx.cli import main
from outlierfx.generation import QuantizedCausalLM
from outlierfx.testing import build_model, word_tokenizer

pytestmark = pytest.mark.skipif(not runnable_backends(["onednn"]), reason="no onednn engine")


def _quantized_llama_folder(tmp_path, layers: int, recipe: str, backend: str):
    """A generated Llama (and word tokenizer) saved as a folder, quantized by the CLI into another."""
    source, out = tmp_path / "llama", tmp_path / "int8"
    build_model("llama", layers=layers, kv_heads=2).model.save_pretrained(source)
    word_tokenizer().save_pretrained(source)
    assert main(["quantize", str(source), "--recipe", recipe, "--backend", backend, "--samples", "16",
                 "--seq", "48", "--no-measure", "--out", str(out)]) == 0
    return out


def test_quantize_then_generate_streams_the_continuation_and_its_speed(tmp_path, capsys):
    out = _quantized_llama_folder(tmp_path, 2, "naive+sink", "onednn")
    assert json.loads((out / "graph.json").read_text())["decoder"] == {"kv_cache": "static", "first_token_rows": 1}
    capsys.readouterr()
    assert main(["generate", str(out), "--prompt", "w05 w09 w11 w20", "--max-new-tokens", "6"]) == 0
    printed = capsys.readouterr().out
    loaded = outlierfx.load(out)
    assert isinstance(loaded, QuantizedCausalLM)
    expected = loaded.generate(torch.tensor([[5, 9, 11, 20]]), max_new_tokens=6)
    assert loaded.tokenizer.decode(expected[0]) in printed  # the prompt, then the new words, streamed
    assert re.search(r"prompt: 4 tokens in \d+ ms; \d more tokens at [\d.]+ tokens/s", printed), printed


@pytest.mark.skipif(not runnable_backends(["inductor"]), reason="no inductor int8 engine")
def test_generate_continues_from_an_inductor_save(tmp_path, capsys):
    # rotate+sink on inductor: the saved graph once loaded with its specialized sizes as symbols,
    # and the first decode step's compilation failed (tests/test_generate.py has the details)
    out = _quantized_llama_folder(tmp_path, 1, "rotate+sink", "inductor")
    assert json.loads((out / "graph.json").read_text())["backend"] == "inductor"
    capsys.readouterr()
    assert main(["generate", str(out), "--prompt", "w05 w09 w11 w20", "--max-new-tokens", "4"]) == 0
    printed = capsys.readouterr().out
    # the prompt, then 4 new words (that a loaded inductor model generates the in-memory model's
    # tokens is tests/test_generate.py's; checking it here would compile the graph twice more)
    assert re.search(r"w05 w09 w11 w20( w\d\d){4}", printed), printed
    assert re.search(r"prompt: 4 tokens in \d+ ms; 3 more tokens at [\d.]+ tokens/s", printed), printed


def test_generate_refuses_a_model_without_a_cache(tmp_path, capsys):
    g = build_model("bert")
    qmodel, _ = outlierfx.quantize(g.model, [g.inputs], "naive", progress=False)
    outlierfx.save(qmodel, tmp_path)
    assert main(["generate", str(tmp_path), "--prompt", "w01"]) == 2
    assert "without a KV cache" in capsys.readouterr().err
