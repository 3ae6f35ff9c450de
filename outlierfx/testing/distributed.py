"""Data-parallel runs on local gloo processes, for tests: :func:`run_on_local_ranks` starts
``world`` processes (torch.multiprocessing, a file rendezvous), each runs the named scenarios and
rank 0 hands back what they returned; :func:`run_here` runs the same scenarios in this process,
the single-process reference. A scenario quantizes a model on a fixed calibration list and
returns its quantization parameters, weights and int8 outputs as a flat ``{name: tensor}``.

Every run uses one intra-op thread, so the per-batch arithmetic is the same in every process.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import pathlib
import tempfile
from collections.abc import Callable, Iterator
from typing import Any

import torch

Result = dict[str, torch.Tensor]


def _generated_batches(vocab: int, count: int, batch: int, seq: int, seed: int) -> list[dict[str, torch.Tensor]]:
    """``count`` batches of random token ids, each with a right-padded row (real lengths vary)."""
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(count):
        ids = torch.randint(1, vocab - 1, (batch, seq), generator=generator)
        mask = torch.ones(batch, seq, dtype=torch.long)
        mask[-1, int(torch.randint(seq // 2, seq, (1,), generator=generator)):] = 0
        batches.append({"input_ids": ids, "attention_mask": mask})
    return batches


def _first_tensor(output: Any) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    for key in ("logits", "last_hidden_state"):
        if getattr(output, key, None) is not None:
            return getattr(output, key)
    return output[0]


# tensors larger than this come back as a digest of their bytes (SmolLM2's weights: 0.5 GB a rank)
DIGEST_ABOVE = 1 << 20


def _state(prefix: str, graph: torch.nn.Module) -> Result:
    """Every parameter and buffer of a fake-quant graph (weights, scales, zero points); those over
    DIGEST_ABOVE elements as a 16-byte digest (equal digests: equal bits)."""
    return {f"{prefix}/{name}": _digest(t) if t.numel() > DIGEST_ABOVE else t.detach().clone()
            for name, t in graph.state_dict().items()}


def _digest(tensor: torch.Tensor) -> torch.Tensor:
    data = tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
    return torch.tensor(list(hashlib.blake2b(data, digest_size=16).digest()), dtype=torch.uint8)


def _quantized(prefix: str, model: torch.nn.Module, batches: list, held_out: list, **settings: Any) -> Result:
    """``quantize`` (a causal LM: its generating model, the KV-cache graph the command line saves);
    the unquantized model's outputs too (``fp32/``), to measure trained runs' quality against."""
    from ..api import quantize

    qmodel, report = quantize(model, batches, progress=False, **settings)
    return {**_state(prefix, report.graphs.simulated), **_outputs(prefix, qmodel, model, held_out)}


def _outputs(prefix: str, qmodel: torch.nn.Module, model: torch.nn.Module, held_out: list) -> Result:
    """The quantized and the unquantized (``fp32/``) model's outputs on ``held_out``, and how many
    ranks made the quantized one."""
    from .. import distributed

    result = {f"{prefix}/ranks": torch.tensor(distributed.world_size())}  # a run that really was split
    with torch.no_grad():
        for i, batch in enumerate(held_out):
            result[f"{prefix}/output{i}"] = _first_tensor(qmodel(**batch)).detach().clone()
            result[f"fp32/{prefix}/output{i}"] = _first_tensor(model(**batch)).detach().clone()
    return result


def _sink_llama() -> tuple[torch.nn.Module, list, list]:
    """A generated Llama with a massive first token and outlier channels, its calibration batches
    (each text starting with the first-token id 63) and a held-out batch."""
    from .models import OutlierSpec, build_model

    spec = OutlierSpec(gamma_scale=20.0, channels=(3, 17), first_token_scale=30.0)
    model = build_model("llama", hidden=64, heads=4, layers=2, ffn=128, vocab=64, outliers=spec).model
    batches = _generated_batches(63, 6, 2, 12, seed=1)  # id 63 is the first-token id
    for b in batches:
        b["input_ids"][:, 0] = 63
    return model, batches, _generated_batches(63, 1, 2, 12, seed=2)


def llama_default() -> Result:
    """:func:`_sink_llama`, the default preset on this CPU's best backend (``rotate+sink``: min-max
    ranges and first-token ranges only), through ``quantize``'s generating model (its KV-cache
    graph, as ``outlierfx quantize`` saves decoders)."""
    from ..backends import default_backend

    return _quantized("llama", *_sink_llama(), backend=default_backend())


def llama_w4a8() -> Result:
    """:func:`llama_default` at W4A8: the preset below 8-bit weights (GPTQ on asymmetric int4
    rows, its Gram matrices and first-row corrections summed across ranks)."""
    from ..backends import default_backend

    return _quantized("w4", *_sink_llama(), backend=default_backend(), bits="W4A8")


def llama_low_memory() -> Result:
    """:func:`llama_default`'s Llama saved with ``save_pretrained`` and quantized without being
    loaded (``low_memory=True``; ``naive+gptq+sink`` on this CPU's best backend; GPTQ reduces each
    block's Gram matrices across ranks as the block finishes): every tensor of the int8 model and
    its outputs."""
    from .models import OutlierSpec, build_model

    spec = OutlierSpec(gamma_scale=20.0, channels=(3, 17), first_token_scale=30.0)
    model = build_model("llama", hidden=64, heads=4, layers=2, ffn=128, vocab=64, outliers=spec).model
    return _quantized_low_memory("low", model, _generated_batches(63, 6, 2, 12, seed=1),
                                 _generated_batches(63, 1, 2, 12, seed=2), recipe="naive+gptq+sink")


def bert_low_memory_trained() -> Result:
    """:func:`bert_trained`'s BERT, saved and quantized without being loaded (``low_memory=True``)
    under the stages that train and run weight-free: Quadapter (block by block, SmoothQuant init,
    at most 30 steps a block) and learned ranges (``naive+lsq``, 10 steps through a checkpointed
    forward), data-parallel; the unquantized model's outputs too."""
    from ..recipes.papers import paper_recipe, quadapter_recipe, with_fine_stage
    from .models import OutlierSpec, build_model

    model = build_model("bert", hidden=32, heads=4, layers=1, ffn=64, vocab=64,
                        outliers=OutlierSpec(gamma_scale=20.0, channels=(5,))).model
    batches, held_out = _generated_batches(64, 3, 2, 8, seed=5), _generated_batches(64, 1, 2, 8, seed=6)
    return {**_quantized_low_memory("lowlsq", model, batches, held_out,
                                    recipe=with_fine_stage(paper_recipe("naive"), steps=10)),
            **_quantized_low_memory("lowquadapter", model, batches, held_out,
                                    recipe=quadapter_recipe(init="smoothquant", max_steps=30, check_every=5))}


def _quantized_low_memory(prefix: str, model: torch.nn.Module, batches: list, held_out: list, **settings: Any
                          ) -> Result:
    """``model`` saved with ``save_pretrained`` into one folder all ranks read, quantized from it
    with ``low_memory=True`` on this CPU's best backend: every tensor of the int8 model, its
    outputs and the unquantized model's (``fp32/``)."""
    from .. import distributed
    from ..api import quantize
    from ..backends import default_backend

    with tempfile.TemporaryDirectory() as own:
        folder = [own]  # one folder for all ranks: under torch.distributed save_pretrained writes on rank 0 only
        if distributed.active():
            torch.distributed.broadcast_object_list(folder, src=0)
        model.save_pretrained(folder[0])
        if distributed.active():
            torch.distributed.barrier()
        qmodel, _ = quantize(folder[0], batches, backend=default_backend(), progress=False, low_memory=True,
                             **settings)
        if distributed.active():
            torch.distributed.barrier()  # every rank has read the checkpoint before rank 0 removes it
    tensors = [*qmodel.named_parameters(remove_duplicate=False), *qmodel.named_buffers(remove_duplicate=False)]
    return {**{f"{prefix}/{name}": t.detach().clone() for name, t in tensors},
            **_outputs(prefix, qmodel, model, held_out)}


def bert_gptq() -> Result:
    """A generated BERT with outlier channels under GPTQ, both ways of collecting the Gram
    matrices (``naive+gptq``; and sequential, each Linear after the earlier ones are rounded)."""
    from ..recipes.papers import paper_recipe, with_gptq
    from .models import OutlierSpec, build_model

    model = build_model("bert", hidden=64, heads=4, layers=2, ffn=128, vocab=64,
                        outliers=OutlierSpec(gamma_scale=20.0, channels=(5,))).model
    batches, held_out = _generated_batches(64, 5, 2, 12, seed=3), _generated_batches(64, 1, 2, 12, seed=4)
    sequential = with_gptq(paper_recipe("naive"), name="naive+sequential-gptq", sequential=True)
    return {**_quantized("gptq", model, batches, held_out, recipe="naive+gptq"),
            **_quantized("sequential", model, batches, held_out, recipe=sequential)}


def bert_trained() -> Result:
    """A generated BERT under the stages that train, data-parallel (3 batches: 2 ranks' shards
    differ in size): learned ranges (``naive+lsq``, 10 steps), QAT (one epoch) and Quadapter
    (SmoothQuant init, at most 30 steps a block with plateau checks, 4 end-to-end steps)."""
    from ..passes.qat import QAT
    from ..recipes.papers import paper_recipe, quadapter_recipe, with_fine_stage
    from .models import OutlierSpec, build_model

    model = build_model("bert", hidden=32, heads=4, layers=1, ffn=64, vocab=64,
                        outliers=OutlierSpec(gamma_scale=20.0, channels=(5,))).model
    batches, held_out = _generated_batches(64, 3, 2, 8, seed=5), _generated_batches(64, 1, 2, 8, seed=6)
    qat = paper_recipe("qat")
    qat = dataclasses.replace(qat, finish=tuple(dataclasses.replace(s, settings={**s.settings, "epochs": 1})
                                                if s.pass_type is QAT else s for s in qat.finish))
    return {**_quantized("lsq", model, batches, held_out, recipe=with_fine_stage(paper_recipe("naive"), steps=10)),
            **_quantized("qat", model, batches, held_out, recipe=qat),
            **_quantized("quadapter", model, batches, held_out, recipe=quadapter_recipe(
                init="smoothquant", max_steps=30, check_every=5, end_to_end_steps=4))}


def training_shards() -> Result:
    """:func:`outlierfx.passes.training.fit` on 4 batches for 6 steps of ``sum((p - c_i)^2)``,
    recording which batches this rank's loss saw, with and without autograd (training steps,
    and the mean losses), and the trained ``p`` and loss curve; then the error each rank raises
    when training on batch 3 fails."""
    from ..passes.training import fit

    targets = torch.arange(12, dtype=torch.float32).reshape(4, 3)
    p = torch.nn.Parameter(torch.zeros(3))
    trained, evaluated = [], []

    def loss_of(i: int) -> torch.Tensor:
        (trained if torch.is_grad_enabled() else evaluated).append(i)
        return ((p - targets[i]) ** 2).sum()

    losses = fit([p], loss_of, batches=4, steps=6, lr=0.1, desc="test")
    result = {"trained": torch.tensor(trained), "evaluated": torch.tensor(evaluated), "p": p.detach().clone(),
              "losses": torch.tensor(losses, dtype=torch.float64)}

    def fails_on_batch_3(i: int) -> torch.Tensor:  # rank 1's batch in the second step
        if i == 3 and torch.is_grad_enabled():
            raise ValueError("batch 3 is broken")
        return loss_of(i)

    try:
        fit([p], fails_on_batch_3, batches=4, steps=6, lr=0.1, desc="test")
    except Exception as exc:  # noqa: BLE001 - the test reads which error each rank raised
        result["error"] = torch.tensor(list(f"{type(exc).__name__}: {exc}".encode()), dtype=torch.uint8)
    return result


def minilm_fast_preset(train_steps: int = 4) -> Result:
    """The packaged MiniLM with its ``fast`` preset (``smooth-fold+sink`` on onednn) on this
    CPU's best backend, Quadapter training cut to ``train_steps`` steps per block (the
    statistics are the preset's; the steps only cost time) on 6 Wikipedia batches."""
    from .. import corpus
    from ..backends import default_backend
    from ..graph import capture
    from ..models import encode, load
    from ..passes.train_quadapter import TrainQuadapter
    from ..recipes.presets import preset

    minilm = load("minilm")
    texts = corpus.wikipedia_sample("calibration", 12)
    batches = [encode(minilm, texts[i:i + 2], max_length=32) for i in range(0, 12, 2)]
    held_out = [encode(minilm, corpus.wikipedia_sample("evaluation", 2), max_length=32)]
    backend = default_backend()
    recipe = preset("fast", backend, capture(minilm.model, batches[0])).recipe
    finish = tuple(dataclasses.replace(s, settings={**s.settings, "max_steps": train_steps})
                   if s.pass_type is TrainQuadapter else s for s in recipe.finish)
    recipe = dataclasses.replace(recipe, finish=finish)
    return _quantized("minilm", minilm.model, batches, held_out, recipe=recipe, backend=backend)


def smollm2_default() -> Result:
    """The packaged SmolLM2-135M with the default preset (``quantize(model, batches)``, no recipe:
    ``rotate+sink`` on this CPU, a QuantizedCausalLM back) on 4 batches of 2 short Wikipedia
    passages; its int8 logits on one held-out batch."""
    from .. import corpus
    from ..models import encode, load

    smollm2 = load("smollm2")
    texts = corpus.wikipedia_sample("calibration", 8)
    batches = [encode(smollm2, texts[i:i + 2], max_length=32) for i in range(0, 8, 2)]
    held_out = [encode(smollm2, corpus.wikipedia_sample("evaluation", 2), max_length=32)]
    return _quantized("smollm2", smollm2.model, batches, held_out)


def statistics_merge() -> Result:
    """:func:`outlierfx.distributed.reduce_statistics` on holders with rank-dependent values,
    one of which rank 1 never saw, packed two elements per all_reduce (several chunks): the
    merged values, rank by rank."""
    from .. import distributed
    from ..distributed import Reduction

    class Holder(torch.nn.Module):
        STATISTICS = {"low": Reduction.MIN, "high": Reduction.MAX, "count": Reduction.SUM, "rows": Reduction.CONCAT,
                      "unseen_by_1": Reduction.MAX}

    r = distributed.rank()
    holder = Holder()
    holder.low, holder.high = torch.tensor([3.0, -1.0]) - r, torch.tensor([1.0, 2.0]) * (r + 1)
    holder.count = torch.tensor(10 + r)
    holder.rows = torch.arange(r + 1, dtype=torch.float32) + 10 * r  # rank 0: [0], rank 1: [10, 11]
    holder.unseen_by_1 = torch.tensor([4.0, 5.0]) if r == 0 else torch.empty(0)
    packing, distributed.PACK_ELEMENTS = distributed.PACK_ELEMENTS, 2
    try:
        distributed.reduce_statistics([holder])
    finally:
        distributed.PACK_ELEMENTS = packing
    return {"shard": torch.tensor(distributed.shard(list(range(5)))),
            **{name: getattr(holder, name) for name in Holder.STATISTICS}}


def mismatched_batches() -> Result:
    """Ranks given different calibration lists: the message of the error (as bytes)."""
    from .. import distributed
    from ..errors import DistributedError

    try:
        distributed.shard(_generated_batches(64, 2, 1, 4, seed=distributed.rank()))
    except DistributedError as exc:
        return {"error": torch.tensor(list(str(exc).encode()), dtype=torch.uint8)}
    return {}


def nan_on_rank_1() -> Result:
    """Calibration where rank 1's share holds a NaN (which one process finds in the loop): the
    message each rank raises, instead of rank 0 waiting for rank 1 in the merge."""
    from .. import distributed
    from ..quantizers.calibrate import calibrate
    from ..passes.insert_observers import InsertObservers
    from ..quantizers.policy import make_policy
    from ..graph import capture

    graph = capture(_Doubler(), {"x": torch.ones(2, 3, 4)})
    graph = InsertObservers(make_policy("full"))(graph).graph_module
    batches = [{"x": torch.ones(2, 3, 4)}, {"x": torch.full((2, 3, 4), float("nan"))}]
    try:
        calibrate(graph, batches, progress=False)
    except Exception as exc:  # noqa: BLE001 - the test reads which error each rank raised
        message = f"{type(exc).__name__}: {exc}"
        return {"error": torch.tensor(list(message.encode()), dtype=torch.uint8),
                "ranks": torch.tensor(distributed.world_size())}
    return {}


class _Doubler(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x) * 2


SCENARIOS: dict[str, Callable[[], Result]] = {f.__name__: f for f in (
    llama_default, llama_w4a8, llama_low_memory, bert_gptq, bert_trained, bert_low_memory_trained, minilm_fast_preset,
    smollm2_default, statistics_merge, mismatched_batches, nan_on_rank_1, training_shards)}


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def run_here(names: list[str]) -> dict[str, Result]:
    """The scenarios in this process (no process group): the single-process reference."""
    with _one_thread():
        return {name: SCENARIOS[name]() for name in names}


def _rank_main(rank: int, world: int, folder: str, names: list[str]) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=rank, world_size=world)
    try:
        results = {name: SCENARIOS[name]() for name in names}
        torch.save(results, f"{folder}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def run_on_local_ranks(names: list[str], world: int = 2) -> list[dict[str, Result]]:
    """The scenarios on ``world`` local gloo processes; what each rank returned, by rank."""
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as folder:
        mp.spawn(_rank_main, args=(world, folder, names), nprocs=world, join=True)
        return [torch.load(pathlib.Path(folder) / f"rank{r}.pt") for r in range(world)]
