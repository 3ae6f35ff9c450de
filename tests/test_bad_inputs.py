"""Bad input through the Python API (issue 25): each case gets an outlierfx error that names the
problem and the fix, never a raw torch or transformers error, and the model is left as it was."""

import pytest
import torch

import outlierfx
from outlierfx.errors import CaptureError, DataError
from outlierfx.serialize import save
from outlierfx.testing import build_model

NAIVE = {"recipe": "naive", "policy": "linear-inputs", "progress": False}


@pytest.fixture(scope="module")
def bert():
    return build_model("bert")


def _unchanged(model, before):
    after = model.state_dict()
    return before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_calibration_dicts_with_wrong_keys_are_named(bert):
    before = {k: v.clone() for k, v in bert.model.state_dict().items()}
    wrong = {"ids": bert.inputs["input_ids"], "mask": bert.inputs["attention_mask"]}
    with pytest.raises(CaptureError, match=r"\['ids', 'mask'\] are not named parameters of BertModel.forward .*"
                                           r"use the names it takes \(input_ids, attention_mask, "):
        outlierfx.quantize(bert.model, [wrong], **NAIVE)
    plain = torch.nn.Linear(8, 8)
    with pytest.raises(DataError, match=r"\['inputs'\] are not parameters of Linear.forward, which takes input"):
        outlierfx.quantize(plain, [{"inputs": torch.randn(2, 8)}], **NAIVE)
    assert _unchanged(bert.model, before)


def test_float_token_ids_are_named(bert):
    floats = dict(bert.inputs, input_ids=bert.inputs["input_ids"].float())
    with pytest.raises(DataError, match=r"calibration batch 0: input_ids are float32; token ids must be integers"):
        outlierfx.quantize(bert.model, [floats], **NAIVE)
    with pytest.raises(DataError, match=r"example inputs: input_ids are float32"):
        outlierfx.capture(bert.model, floats)


def test_out_of_vocabulary_ids_are_named_in_any_batch(bert):
    vocab = bert.config.vocab_size
    beyond = dict(bert.inputs, input_ids=bert.inputs["input_ids"].clone().fill_(vocab + 5))
    with pytest.raises(DataError, match=rf"calibration batch 1: input_ids contain {vocab + 5}, outside BertModel's "
                                        rf"vocabulary of {vocab} tokens .*own tokenizer"):
        outlierfx.quantize(bert.model, [bert.inputs, beyond], **NAIVE)
    negative = dict(bert.inputs, input_ids=bert.inputs["input_ids"].clone().fill_(-1))
    with pytest.raises(DataError, match="input_ids contain -1"):
        outlierfx.capture(bert.model, negative)


def test_inputs_whose_shapes_disagree_within_a_batch_are_named(bert):
    short_mask = dict(bert.inputs, attention_mask=bert.inputs["attention_mask"][:, :5])
    with pytest.raises(DataError, match=r"calibration batch 0: inputs disagree in shape \(input_ids \(2, 8\), "
                                        r"attention_mask \(2, 5\)\).*padding=True"):
        outlierfx.quantize(bert.model, [short_mask], **NAIVE)


def test_a_list_of_tensors_instead_of_dicts_is_named(bert):
    with pytest.raises(DataError, match=r"calibration batch 0 is a Tensor; each batch must be a dict of keyword "
                                        r"inputs, e\.g\. a tokenizer's output"):
        outlierfx.quantize(bert.model, [bert.inputs["input_ids"]], **NAIVE)


def test_a_model_on_the_meta_device_is_named():
    with torch.device("meta"):
        model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU())
    message = r"Sequential has 2 tensors on the meta device \(e\.g\. 0\.weight\): its weights were never loaded"
    with pytest.raises(DataError, match=message):
        outlierfx.quantize(model, [(torch.randn(2, 8),)], **NAIVE)
    with pytest.raises(DataError, match=message):
        outlierfx.capture(model, (torch.randn(2, 8),))


def test_save_of_a_plain_module_is_named(tmp_path):
    with pytest.raises(DataError, match=r"outlierfx.save writes the models outlierfx.quantize and outlierfx.lower "
                                        r"return; got a Linear\. Quantize it first"):
        save(torch.nn.Linear(4, 4), tmp_path / "q")
    assert not (tmp_path / "q").exists()


class BranchesOnValues(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(4, 4)

    def forward(self, x):
        if x.sum() > 0:
            return self.linear(x) * 2
        return self.linear(x)


def test_an_untraceable_model_gets_the_same_error_through_quantize_as_through_capture():
    x = torch.ones(2, 4)
    with pytest.raises(CaptureError) as captured:
        outlierfx.capture(BranchesOnValues(), (x,))
    for batch in [(x,), {"x": x}]:  # positional inputs, as capture takes them, or keyword inputs
        with pytest.raises(CaptureError) as quantized:
            outlierfx.quantize(BranchesOnValues(), [batch], **NAIVE)
        assert str(quantized.value) == str(captured.value)
    assert "tensor *values*" in str(captured.value) and "if x.sum() > 0" in str(captured.value)


def test_a_model_that_fails_on_its_inputs_names_them():
    class NeedsTwo(torch.nn.Module):
        def forward(self, x, y=None):
            return x + y  # y missing: a TypeError inside the model

    with pytest.raises(DataError, match=r"NeedsTwo fails on the example inputs \(TypeError: .*\); give it the inputs"):
        outlierfx.capture(NeedsTwo(), (torch.randn(2),))
