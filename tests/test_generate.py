"""Decoders that generate: one cached graph for prefill and decode (``graph/kv_cache.py``),
``outlierfx.quantize`` on a causal LM and ``QuantizedCausalLM.generate`` (``generation.py``)."""

import copy

import pytest
import torch
from torch.fx.experimental.symbolic_shapes import free_symbols

import outlierfx
from outlierfx.backends import runnable_backends
from outlierfx.errors import DataError, SettingError
from outlierfx.generation import QuantizedCausalLM, next_token
from outlierfx.graph.kv_cache import CachedDecoder, cache_inputs, in_place_cache_writes
from outlierfx.graph.ops import SDPA
from outlierfx.quantizers.observers import FakeQuantize
from outlierfx.testing import build_model, first_token_grids_everywhere, word_tokenizer

NEW_TOKENS = 24
LOGIT_TOL = 1e-4
"""Incremental vs full-sequence logits, as a fraction of the largest |logit|. Both runs put every
activation on the same grids; only float rounding can differ (GEMMs of other row counts, a softmax
over more masked columns) and move a value across a rounding boundary. Measured here: at most
3e-7 (mostly bitwise equal) on fake quant, onednn and the reference form, over 48 new tokens.
SmolLM2 amplifies such rounding much more (see the slow test at the end)."""


def _model(**options):
    return build_model("llama", batch=2, seq=8, kv_heads=2, layers=2, **options)


def _calibration(vocab=64, batches=3, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(0, vocab, (2, 8), generator=gen)} for _ in range(batches)]


def _prompts(batch=2, tokens=5, seed=2):
    return torch.randint(0, 64, (batch, tokens), generator=torch.Generator().manual_seed(seed))


class _LastRowLogits(torch.nn.Module):
    """Wraps a cached graph and keeps each call's next-token scores: the logits of the row that
    holds the last column written so far."""

    def __init__(self, graph):
        super().__init__()
        self.graph, self.seen, self.rows = graph, [], []

    def forward(self, **inputs):
        out = self.graph(**inputs)
        self.rows.append(inputs["cache_position"].tolist())
        last = int(inputs["attention_mask"][0].nonzero().max())
        row = int((inputs["cache_position"] == last).nonzero())
        self.seen.append(out[0][:, row].detach().clone())
        return out


def _decode_and_teacher_force(qmodel, prompt, new_tokens, calls=None):
    """(the new tokens, the scores each step chose them by, the full-sequence scores at the same
    places): ``[batch, new]``, ``[batch, new, vocab]`` twice. ``calls``, a list, gets the cache
    columns of each call of the graph."""
    recorder = _LastRowLogits(qmodel.graph)
    qmodel.graph = recorder
    try:
        out = qmodel.generate(prompt, max_new_tokens=new_tokens, eos_token_id=[])
    finally:
        qmodel.graph = recorder.graph
    if calls is not None:
        calls.extend(recorder.rows)
    teacher = qmodel(out).logits[:, prompt.shape[1] - 1:-1]  # the scores that chose each new token
    return out[:, prompt.shape[1]:], torch.stack(recorder.seen, 1), teacher


def _incremental_vs_full(qmodel, prompt, new_tokens=NEW_TOKENS, calls=None):
    """(generated tokens, the same model's teacher-forced argmax, largest logit gap / max |logit|)."""
    generated, incremental, teacher = _decode_and_teacher_force(qmodel, prompt, new_tokens, calls)
    gap = float((incremental - teacher).abs().max() / teacher.abs().max())
    return generated, teacher.argmax(-1), gap


def test_cached_graph_generates_what_transformers_generates():
    g = _model()
    prompt = _prompts()
    mask = torch.ones_like(prompt)
    mask[0, :2] = 0  # a left-padded batch
    gm = outlierfx.capture(CachedDecoder(g.model), cache_inputs(g.config, g.inputs["input_ids"]))
    ours = QuantizedCausalLM(gm, g.config).generate(prompt, mask, max_new_tokens=12, eos_token_id=[])
    theirs = g.model.generate(prompt, attention_mask=mask, max_new_tokens=12, do_sample=False, eos_token_id=None,
                              pad_token_id=0)
    assert torch.equal(ours, theirs)


def _index_copies(gm):
    return [sum(n.target is op for n in gm.graph.nodes) for op in (torch.ops.aten.index_copy.default,
                                                                    torch.ops.aten.index_copy_.default)]


@pytest.mark.parametrize("backend", ["fake-quant", *runnable_backends(["onednn"])])
def test_in_place_cache_writes_write_the_callers_caches_and_give_the_functional_graphs_outputs(backend):
    g = _model()
    qmodel, _ = outlierfx.quantize(g.model, _calibration(), "naive", backend=backend, progress=False)
    writes = 2 * g.config.num_hidden_layers
    assert _index_copies(qmodel.graph) == [writes, 0]
    in_place = in_place_cache_writes(qmodel.graph)
    assert _index_copies(in_place) == [0, writes] and _index_copies(qmodel.graph) == [writes, 0]
    assert list(in_place.children()) == [qmodel.graph]  # read through the functional graph: nothing copied
    inputs = cache_inputs(g.config, _prompts(), max_cache_len=7)
    logits, keys, values = qmodel.graph(**inputs)
    assert not any(bool(k.any()) for k in inputs["keys"])  # the functional graph left its inputs as they were
    logits_in_place, keys_in_place, values_in_place = in_place(**inputs)
    assert all(a is b for a, b in zip(keys_in_place + values_in_place, inputs["keys"] + inputs["values"]))
    assert torch.equal(logits_in_place, logits)
    assert all(torch.equal(a, b) for a, b in zip(keys_in_place + values_in_place, keys + values))


@pytest.mark.parametrize("backend", [None, *runnable_backends(["onednn"])])
def test_greedy_decoding_is_the_argmax_of_the_same_int8_models_full_sequence_logits(backend):
    g = _model()
    with first_token_grids_everywhere():  # the +sink paths, at every quantizer
        qmodel, report = outlierfx.quantize(g.model, _calibration(), "naive+sink", backend=backend, progress=False)
    assert qmodel.first_token_rows == 1 and report.backend == (backend or "fake-quant")
    for prompt in (_prompts(), _prompts(1, 1)):  # a one-token prompt is all first-token positions
        calls = []
        generated, teacher, gap = _incremental_vs_full(qmodel, prompt, calls=calls)
        assert torch.equal(generated, teacher)
        assert gap <= LOGIT_TOL
        # every decode step runs its new token alone: no first-token row replayed
        assert calls[1:] == [[column] for column in range(prompt.shape[1], prompt.shape[1] + NEW_TOKENS - 1)]
        # the runtime's own graph writes its caches in place and generates the same tokens
        assert torch.equal(qmodel.generate(prompt, max_new_tokens=NEW_TOKENS, eos_token_id=[])[:, prompt.shape[1]:],
                           generated)


@pytest.mark.parametrize("backend", ["fake-quant", *runnable_backends(["onednn", "reference"])])
def test_decode_tokens_use_the_main_grid_and_the_first_token_its_own_grid(backend):
    g = _model()
    with first_token_grids_everywhere():
        qmodel, report = outlierfx.quantize(g.model, _calibration(), "naive+sink", backend="fake-quant",
                                            tokenizer=word_tokenizer(), progress=False)
    # a first-token grid far too coarse: any token put on it instead of the main grid changes the logits
    coarse = 0
    for module in report.graphs.simulated.modules():
        if isinstance(module, FakeQuantize) and module.has_sink_grid:
            module.sink_scale = module.sink_scale * 64
            coarse += 1
    assert coarse
    if backend != "fake-quant":  # lower() of the generating model: the same model around the lowered graph
        fake = qmodel
        qmodel = outlierfx.lower(fake, report, backend).model
        assert isinstance(qmodel, QuantizedCausalLM) and qmodel.graph is not fake.graph
        assert (qmodel.config, qmodel.first_token_rows, qmodel.tokenizer) == (fake.config, 1, fake.tokenizer)
    prompt = _prompts()
    calls = []
    generated, teacher, gap = _incremental_vs_full(qmodel, prompt, calls=calls)
    assert gap <= LOGIT_TOL and torch.equal(generated, teacher)
    # each decode step runs its new token alone, also in the reference form (a static graph, as
    # inductor's): the graph's first-token mask keeps it off the coarse grid, where a call's
    # first row was once put on it whatever its position
    assert calls[1:] == [[column] for column in range(prompt.shape[1], prompt.shape[1] + NEW_TOKENS - 1)]


def _left_padded_pair():
    """(a 6-token prompt, a 4-token one, both as one batch left-padded to 6 tokens, its mask)."""
    long, short = _prompts(1, 6, seed=3), _prompts(1, 4, seed=4)
    batch = torch.cat([long, torch.cat([torch.zeros(1, 2, dtype=torch.long), short], 1)])
    mask = torch.ones_like(batch)
    mask[1, :2] = 0
    return long, short, batch, mask


@pytest.mark.parametrize("backend", ["fake-quant", *runnable_backends(["onednn"])])
def test_a_left_padded_batch_generates_what_each_prompt_generates_alone(backend):
    g = _model()
    with first_token_grids_everywhere():  # each prompt's first token on its own grid, wherever padding puts it
        qmodel, report = outlierfx.quantize(g.model, _calibration(), "naive+sink", progress=False)
    if backend != "fake-quant":
        qmodel = outlierfx.lower(qmodel, report, backend).model
    long, short, batch, mask = _left_padded_pair()
    together = qmodel.generate(batch, mask, max_new_tokens=10, eos_token_id=[])
    assert torch.equal(together[0, 6:], qmodel.generate(long, max_new_tokens=10, eos_token_id=[])[0, 6:])
    assert torch.equal(together[1, 6:], qmodel.generate(short, max_new_tokens=10, eos_token_id=[])[0, 4:])


@pytest.mark.parametrize("backend", ["fake-quant", *runnable_backends(["onednn", "reference", "inductor"])])
def test_a_left_padded_batch_keeps_each_prompts_first_token_on_its_own_grid(backend):
    # counting first tokens from column 0 put the padding on the first-token grid and the short
    # prompt's first token on the main grid: logits 5-9% of the largest off (2-3x the int8 error)
    g = _model()
    with first_token_grids_everywhere():
        qmodel, report = outlierfx.quantize(g.model, _calibration(), "naive+sink", progress=False)
    if backend != "fake-quant":
        qmodel = outlierfx.lower(qmodel, report, backend).model
    long, short, batch, mask = _left_padded_pair()
    together = qmodel(batch, mask).logits
    for row, prompt in ((0, long), (1, short)):
        alone = qmodel(prompt).logits
        gap = float((together[row:row + 1, -prompt.shape[1]:] - alone).abs().max() / alone.abs().max())
        assert gap <= LOGIT_TOL, f"row {row}: {gap:.2e}"


def test_sampling_follows_the_seed_and_stops_at_eos():
    g = _model()
    qmodel, _ = outlierfx.quantize(g.model, _calibration(), "naive", progress=False)
    prompt = _prompts()
    torch.manual_seed(0)
    first = qmodel.generate(prompt, max_new_tokens=8, do_sample=True, top_k=10, top_p=0.9, eos_token_id=[])
    torch.manual_seed(0)
    assert torch.equal(first, qmodel.generate(prompt, max_new_tokens=8, do_sample=True, top_k=10, top_p=0.9,
                                              eos_token_id=[]))
    greedy = qmodel.generate(prompt, max_new_tokens=8, eos_token_id=[])
    stop = int(greedy[0, prompt.shape[1] + 2])  # row 0's third new token
    ended = qmodel.generate(prompt, max_new_tokens=8, eos_token_id=stop, pad_token_id=63)
    row0 = ended[0, prompt.shape[1]:]
    assert torch.equal(row0[:3], greedy[0, prompt.shape[1]:prompt.shape[1] + 3])
    assert bool((row0[3:] == 63).all())


def test_next_token_keeps_top_k_and_top_p():
    logits = torch.tensor([[4.0, 3.0, 0.0, -1.0]])
    assert int(next_token(logits, do_sample=False)) == 0
    torch.manual_seed(0)
    drawn = {int(next_token(logits, True, top_k=2)) for _ in range(200)}
    assert drawn == {0, 1}
    # top_p: token 0 has ~70% of the mass, so p=0.5 keeps it alone
    assert {int(next_token(logits, True, top_p=0.5)) for _ in range(50)} == {0}


def test_bad_inputs_name_the_fix():
    g = _model()
    qmodel = QuantizedCausalLM(outlierfx.capture(CachedDecoder(g.model), cache_inputs(g.config, _prompts())),
                               g.config)
    right_padded = torch.ones(2, 5, dtype=torch.long)
    right_padded[0, -1] = 0
    with pytest.raises(DataError, match="left-pad"):
        qmodel.generate(_prompts(), right_padded)
    with pytest.raises(DataError, match="empty"):
        qmodel.generate(_prompts()[:, :0])
    with pytest.raises(DataError, match="token ids"):
        qmodel.generate(_prompts().float())


def test_quantize_returns_a_generating_model_for_a_causal_lm_only():
    bert = build_model("bert")
    encoder, _ = outlierfx.quantize(bert.model, [bert.inputs], "naive", progress=False)
    assert isinstance(encoder, torch.fx.GraphModule)
    with pytest.raises(SettingError, match="tokenizer"):
        outlierfx.quantize(bert.model, [bert.inputs], "naive", tokenizer=word_tokenizer(), progress=False)
    g = _model()
    bare, _ = outlierfx.quantize(g.model.model, _calibration(), "naive", progress=False)  # LlamaModel: no LM head
    assert isinstance(bare, torch.fx.GraphModule)
    one_pass, _ = outlierfx.quantize(g.model, _calibration(), "naive", generation=False, progress=False)
    assert isinstance(one_pass, torch.fx.GraphModule) and _index_copies(one_pass) == [0, 0]  # no KV cache
    with pytest.raises(SettingError, match="generation=False"):
        outlierfx.quantize(g.model, _calibration(), "naive", generation=False, tokenizer=word_tokenizer(),
                           progress=False)
    embeds = {"inputs_embeds": torch.randn(2, 8, g.config.hidden_size)}  # a generating model reads token ids
    with pytest.raises(DataError, match="need input_ids .* generation=False"):
        outlierfx.quantize(g.model, [embeds], "naive", progress=False)
    qmodel, _ = outlierfx.quantize(g.model, _calibration(), "naive", progress=False)
    assert isinstance(qmodel, QuantizedCausalLM) and qmodel.tokenizer is None
    assert _index_copies(qmodel.graph) == [2 * g.config.num_hidden_layers, 0]  # the cache graph


def test_a_causal_lm_the_cache_wrapper_cannot_run_is_quantized_one_pass_with_a_warning():
    """OPT, BLOOM and Falcon ask the cache for what the static functional cache lacks: quantize
    still quantizes them, as their one-pass forward, and says so (warning and report note)."""
    from outlierfx.errors import OutlierFXWarning
    from transformers import LlamaForCausalLM

    class WithoutCacheArgument(LlamaForCausalLM):
        def forward(self, input_ids=None, attention_mask=None, **kwargs):
            if "cache" in kwargs:
                raise TypeError("forward() got an unexpected keyword argument 'cache'")
            return super().forward(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)

    model = WithoutCacheArgument(build_model("llama", layers=1).config).eval()
    with pytest.warns(OutlierFXWarning, match="could not be captured with a KV cache.*one-pass forward") as got:
        qmodel, report = outlierfx.quantize(model, _calibration(), "naive", progress=False)
    assert {w.filename for w in got if "KV cache" in str(w.message)} == {__file__}  # at the caller's line
    assert isinstance(qmodel, torch.fx.GraphModule) and not hasattr(qmodel, "generate")
    assert any("no generate()" in note for note in report.notes)
    one_pass, _ = outlierfx.quantize(model, _calibration(), "naive", generation=False, progress=False)
    assert torch.equal(qmodel(**_calibration()[0]).logits, one_pass(**_calibration()[0]).logits)


@pytest.mark.parametrize("backend", ["fake-quant", *runnable_backends(["onednn"])])
def test_a_saved_decoder_loads_with_its_cache_and_tokenizer_and_generates_the_same(tmp_path, backend):
    g = _model()
    tokenizer = word_tokenizer()
    with first_token_grids_everywhere():
        qmodel, _ = outlierfx.quantize(g.model, _calibration(), "naive+sink", backend=backend, tokenizer=tokenizer,
                                       progress=False)
    outlierfx.save(qmodel, tmp_path)
    loaded = outlierfx.load(tmp_path)
    assert isinstance(loaded, QuantizedCausalLM) and loaded.first_token_rows == qmodel.first_token_rows == 1
    assert loaded.tokenizer("w05 w06").input_ids == [5, 6]
    prompt = _prompts()
    assert torch.equal(loaded.generate(prompt, max_new_tokens=10), qmodel.generate(prompt, max_new_tokens=10))


def test_a_saved_decoder_converted_to_float64_computes_in_float64(tmp_path):
    # the saved graph's attention is one fused SDPA call whose mask the graph built in float32;
    # torch 2.13's SDPA given float64 q/k/v and a float32 mask silently returns wrong values
    # (SmolLM2's perplexity 1022): the fused call takes its mask in the dtype of its queries
    g = _model()
    qmodel, report = outlierfx.quantize(g.model, _calibration(), "naive", policy="linear-inputs", backend="reference",
                                        progress=False)
    outlierfx.save(qmodel, tmp_path)  # a lowered model saves the graph it was lowered from: attention fused
    saved = outlierfx.load(tmp_path, backend="fake-quant")
    assert any(n.target is SDPA for n in saved.graph.graph.nodes)
    exact, loaded = (QuantizedCausalLM(copy.deepcopy(graph).double(), g.config, cache_dtype=torch.float64)
                     for graph in (report.graphs.simulated, saved.graph))
    prompt = _prompts(1, 20)  # SDPA's wrong values start at 16 tokens here
    expected = exact(prompt).logits
    assert expected.dtype == torch.float64
    assert float((loaded(prompt).logits - expected).abs().max() / expected.abs().max()) <= 1e-12


@pytest.mark.skipif(not runnable_backends(["inductor"]), reason="no inductor int8 engine")
def test_a_saved_inductor_decoder_loads_with_the_fresh_graphs_sizes_and_generates_the_same(tmp_path):
    # Calibration batches whose sizes no model dimension shares (3 x 12): lowering specializes them,
    # so a size the fresh graph knows as 12 must load as 12, not as a symbol that the prompt length
    # and the cache length then share (torch.compile merged the size nodes of such a graph in place
    # while compiling the prefill, and compiling the first decode step failed with an IndexError).
    g = build_model("llama", layers=1, kv_heads=2)
    gen = torch.Generator().manual_seed(1)
    calibration = [{"input_ids": torch.randint(0, 64, (3, 12), generator=gen)} for _ in range(2)]
    qmodel, _ = outlierfx.quantize(g.model, calibration, "rotate+sink", backend="inductor", progress=False)
    outlierfx.save(qmodel, tmp_path)
    loaded = outlierfx.load(tmp_path)
    fresh_graph, loaded_graph = qmodel.graph.reference, loaded.graph.reference
    for fresh, again in zip(fresh_graph.graph.find_nodes(op="placeholder"), loaded_graph.graph.find_nodes(op="placeholder")):
        assert free_symbols(again.meta["val"]) == free_symbols(fresh.meta["val"]), again.name
    prompt = _prompts(batch=1, tokens=4)
    expected = qmodel.generate(prompt, max_new_tokens=3)
    assert torch.equal(loaded.generate(prompt, max_new_tokens=3), expected)


@pytest.mark.slow
@pytest.mark.skipif(not runnable_backends(["onednn"]), reason="no onednn engine")
def test_smollm2_int8_greedy_decoding_and_its_cache_exact_in_float64(smollm2):
    from outlierfx import corpus

    batches = corpus.calibration_batches(smollm2, corpus.wikipedia_sample("calibration", 16), max_length=48)
    qmodel, report = outlierfx.quantize(smollm2.model, batches, backend="onednn", progress=False)
    assert report.recipe == "rotate+sink" and qmodel.first_token_rows == 1
    prompt = smollm2.tokenizer(["The history of the city begins in"], return_tensors="pt").input_ids
    generated, incremental, teacher = _decode_and_teacher_force(qmodel, prompt, 64)
    # In float32 the two runs round differently (attention GEMMs of other row counts) and
    # SmolLM2's int8 grids turn last-bit differences into whole grid steps: the logits differ by a
    # few % of the largest one (measured 2-8%). Greedy decoding then follows the teacher-forced
    # argmax except where its top two logits lie within that step's gap (measured: 64/64 tokens
    # equal in one run, 63/64 in another, the other a near-tie).
    steps = (generated != teacher.argmax(-1))[0].nonzero().flatten().tolist()
    for step in steps:
        chosen, best = int(generated[0, step]), int(teacher[0, step].argmax())
        margin = float(teacher[0, step, best] - teacher[0, step, chosen])
        assert margin <= float((incremental[0, step] - teacher[0, step]).abs().max()), (step, margin)
    exact = QuantizedCausalLM(copy.deepcopy(report.graphs.simulated).double(), smollm2.model.config,
                              qmodel.first_token_rows, cache_dtype=torch.float64)
    assert _incremental_vs_full(exact, prompt, 8)[2] <= 1e-12



PPL_TOL = 1e-4
"""Incremental vs full-sequence perplexity of the same int8 model, relative. The issue accepts
0.5% on SmolLM2 (where float32 rounding through int8 grids moves logits by a few %: see the slow
test above); on the generated Llama both runs put every activation on the same grids, so the
two perplexities agree to float rounding (measured below 1e-6)."""


@pytest.mark.parametrize("backend", [None, *runnable_backends(["onednn"])])
def test_incremental_perplexity_equals_the_full_sequence_perplexity(backend):
    from outlierfx.evaluate import DecoderEval
    from outlierfx.generation import incremental_perplexity

    g = _model()
    with first_token_grids_everywhere():
        qmodel, _ = outlierfx.quantize(g.model, _calibration(), "naive+sink", backend=backend, progress=False)
    windows = _prompts(batch=2, tokens=20, seed=5)
    incremental = qmodel.incremental_logits(windows).logits
    full = qmodel(windows).logits
    assert incremental.shape == full.shape
    assert float((incremental - full).abs().max() / full.abs().max()) <= LOGIT_TOL
    by_cache, by_call = incremental_perplexity(qmodel, windows), DecoderEval.perplexity(qmodel, windows)
    assert 1.0 < by_call < 64 * 4  # a real perplexity (random weights: near the vocabulary's 64)
    assert abs(by_cache / by_call - 1) <= PPL_TOL


@pytest.mark.parametrize("backend", [None, *runnable_backends(["onednn"])])
def test_rotate_sink_rotates_every_head_of_the_generating_model(backend):
    g = _model()
    qmodel, report = outlierfx.quantize(g.model, _calibration(), "rotate+sink", backend=backend, progress=False)
    (heads,) = [e for e in report.audit if e.pass_name == "RotateHeads"]
    assert heads.modified and len(heads.plan.paths) == g.config.num_hidden_layers and not heads.plan.blockers
    generated, teacher, gap = _incremental_vs_full(qmodel, _prompts())
    assert torch.equal(generated, teacher) and gap <= LOGIT_TOL
