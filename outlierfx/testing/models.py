"""Small transformer models built from transformers' own classes with random configurations.

Families: ``bert`` (post-LN encoder), ``gpt2`` (pre-LN decoder, Conv1D layers) and ``llama``
(RMSNorm decoder, optional biases, grouped-query attention); ``qwen2`` (q/k/v biases) and
``mistral`` are the other RMSNorm decoders (``DECODER_FAMILIES``), outside the default mix.
``MORE_FAMILIES`` go beyond the first three: ``modernbert`` (pre-LN encoder without biases,
rotary embeddings, gated GELU, alternating local/global attention), ``qwen2`` and ``gemma``
(RMSNorm with a ``1 + weight`` gain, embeddings scaled by sqrt(hidden), gated tanh-GELU, tied
embeddings by default). Outliers can be injected the way they appear in trained models:
LayerNorm/RMSNorm gamma with a few huge channels, gamma with exact zeros, embedding dimensions
with large values, and a massive first token (a token id only position 0 holds, its embedding
scaled up: the attention-sink activations of trained decoders).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Iterator, Sequence
from typing import Any
from unittest import mock

import torch
from hypothesis import strategies as st

FAMILIES = ("bert", "gpt2", "llama")
DECODER_FAMILIES = ("llama", "qwen2", "mistral")  # pre-norm RMSNorm decoders
MORE_FAMILIES = ("modernbert", "qwen2", "gemma")  # an encoder and two decoders beyond FAMILIES
RMSNORM_FAMILIES = (*DECODER_FAMILIES, "gemma")
ALL_FAMILIES = (*FAMILIES, *DECODER_FAMILIES[1:], "modernbert", "gemma")


@dataclasses.dataclass(frozen=True)
class OutlierSpec:
    gamma_scale: float = 1.0  # factor on a few norm-gamma channels (1 = none)
    gamma_zeros: int = 0  # channels per norm whose gamma is set to exactly 0
    embedding_scale: float = 1.0  # factor on a few embedding dimensions
    channels: tuple[int, ...] = ()  # which channels get the outliers
    first_token_scale: float = 1.0  # factor on the embedding of a token only position 0 holds (1 = none)


@dataclasses.dataclass(frozen=True)
class GeneratedModel:
    family: str
    model: torch.nn.Module
    inputs: dict[str, torch.Tensor]
    config: Any
    outliers: OutlierSpec

    def __repr__(self) -> str:  # shown by Hypothesis on failure
        c = self.config
        return (f"GeneratedModel({self.family}, hidden={c.hidden_size}, heads={c.num_attention_heads}, "
                f"layers={c.num_hidden_layers}, attn={c._attn_implementation}, outliers={self.outliers}, "
                f"input_shape={tuple(self.inputs['input_ids'].shape)})")


def _config(family: str, hidden: int, heads: int, layers: int, ffn: int, vocab: int, options: dict) -> Any:
    from transformers import BertConfig, GPT2Config, LlamaConfig, MistralConfig, Qwen2Config

    if family == "bert":
        return BertConfig(vocab_size=vocab, hidden_size=hidden, num_attention_heads=heads, num_hidden_layers=layers,
                          intermediate_size=ffn, max_position_embeddings=64, hidden_act=options.get("act", "gelu"))
    if family == "gpt2":
        return GPT2Config(vocab_size=vocab, n_embd=hidden, n_head=heads, n_layer=layers, n_inner=ffn, n_positions=64,
                          bos_token_id=0, eos_token_id=0,
                          activation_function=options.get("act", "gelu_new"))
    if family == "llama":
        kv = options.get("kv_heads", heads)
        return LlamaConfig(vocab_size=vocab, hidden_size=hidden, num_attention_heads=heads, num_key_value_heads=kv,
                           num_hidden_layers=layers, intermediate_size=ffn, max_position_embeddings=64,
                           attention_bias=options.get("bias", False), mlp_bias=options.get("bias", False),
                           tie_word_embeddings=options.get("tied", False))
    if family in ("qwen2", "mistral"):
        config_class = Qwen2Config if family == "qwen2" else MistralConfig
        return config_class(vocab_size=vocab, hidden_size=hidden, num_attention_heads=heads,
                            num_key_value_heads=options.get("kv_heads", heads), num_hidden_layers=layers,
                            intermediate_size=ffn, max_position_embeddings=64, sliding_window=None,
                            tie_word_embeddings=options.get("tied", False))
    if family == "modernbert":
        from transformers import ModernBertConfig

        return ModernBertConfig(vocab_size=vocab, hidden_size=hidden, num_attention_heads=heads,
                                num_hidden_layers=layers, intermediate_size=ffn, max_position_embeddings=64,
                                pad_token_id=0, bos_token_id=0, eos_token_id=0, cls_token_id=0, sep_token_id=0,
                                hidden_activation=options.get("act", "gelu"))
    if family == "gemma":
        from transformers import GemmaConfig

        return GemmaConfig(vocab_size=vocab, hidden_size=hidden, num_attention_heads=heads,
                           num_key_value_heads=options.get("kv_heads", heads), head_dim=hidden // heads,
                           num_hidden_layers=layers, intermediate_size=ffn, max_position_embeddings=64,
                           tie_word_embeddings=options.get("tied", True))
    raise ValueError(f"unknown family {family!r}; choose from {ALL_FAMILIES}")


def _model_class(family: str) -> type:
    from transformers import (BertModel, GemmaForCausalLM, GPT2LMHeadModel, LlamaForCausalLM, MistralForCausalLM,
                              ModernBertModel, Qwen2ForCausalLM)

    return {"bert": BertModel, "gpt2": GPT2LMHeadModel, "llama": LlamaForCausalLM, "qwen2": Qwen2ForCausalLM,
            "mistral": MistralForCausalLM, "modernbert": ModernBertModel, "gemma": GemmaForCausalLM}[family]


def _norm_weights(model: torch.nn.Module) -> list[tuple[torch.Tensor, float]]:
    """Gamma of every LayerNorm/RMSNorm module and the offset the module adds to it (Gemma's
    RMSNorm multiplies by ``1 + weight``), measured on an all-ones input (test-data generation
    only, not a pass)."""
    out = []
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if weight is None:
            continue
        if isinstance(module, torch.nn.LayerNorm):
            out.append((weight, 0.0))
        elif type(module).__name__.endswith("RMSNorm"):
            eps = float(getattr(module, "eps", getattr(module, "variance_epsilon", 0.0)))
            with torch.no_grad():  # rms of ones is 1: the output is the applied gain over sqrt(1 + eps)
                gain = module(torch.ones(1, weight.numel())).flatten() * (1.0 + eps) ** 0.5
            out.append((weight, round(float((gain - weight).mean()))))
    return out


def inject_outliers(model: torch.nn.Module, spec: OutlierSpec) -> None:
    """Give ``model`` (a generated model, owned by the test) the outliers of ``spec``, in place.
    A massive first token scales the last embedding row (``build_model`` puts that id at
    position 0 only)."""
    channels = list(spec.channels)
    with torch.no_grad():
        for weight, offset in _norm_weights(model):
            gamma = weight + offset  # the gain the norm applies
            dims = [c % gamma.numel() for c in channels]
            gamma[dims] *= spec.gamma_scale
            if spec.gamma_zeros:
                free = [c for c in range(gamma.numel()) if c not in dims]
                gamma[free[: spec.gamma_zeros]] = 0.0
            weight.copy_(gamma - offset)
        embedding = model.get_input_embeddings().weight
        embedding[:, [c % embedding.shape[1] for c in channels]] *= spec.embedding_scale
        embedding[-1] *= spec.first_token_scale


def build_model(
    family: str,
    *,
    hidden: int = 32,
    heads: int = 4,
    layers: int = 2,
    ffn: int = 64,
    vocab: int = 64,
    batch: int = 2,
    seq: int = 8,
    outliers: OutlierSpec = OutlierSpec(),
    attn: str = "sdpa",
    seed: int = 0,
    pad: bool = True,
    **options: Any,
) -> GeneratedModel:
    """One generated model with inputs (right-padded ``attention_mask`` when ``pad``)."""
    config = _config(family, hidden, heads, layers, ffn, vocab, options)
    config._attn_implementation = attn
    model_class = _model_class(family)
    torch.manual_seed(seed)  # after the imports above: a first import draws from the global generator
    model = model_class(config).eval()
    inject_outliers(model, outliers)
    generator = torch.Generator().manual_seed(seed)
    first_token = outliers.first_token_scale != 1.0
    input_ids = torch.randint(0, vocab - 1 if first_token else vocab, (batch, seq), generator=generator)
    if first_token:
        input_ids[:, 0] = vocab - 1  # the massive token: position 0 only
    mask = torch.ones(batch, seq, dtype=torch.long)
    if pad and batch > 1 and seq > 1:
        mask[0, max(1, seq // 2):] = 0  # first row right-padded, the rest full
    return GeneratedModel(family, model, {"input_ids": input_ids, "attention_mask": mask}, config, outliers)


def word_tokenizer(vocab: int = 64, eos: int = 2) -> Any:
    """A transformers tokenizer for generated models: ``vocab`` words ``w00 .. w{vocab-1}`` split
    on spaces (``w00`` pads and stands for unknown words, word ``eos`` ends a text, as the
    generated Llama config's ``eos_token_id``; two digits, so no word starts another). It saves and loads with ``save_pretrained`` and
    ``AutoTokenizer`` like a real one, so command-line and save tests run without a real model."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = Tokenizer(models.WordLevel({f"w{i:02d}": i for i in range(vocab)}, unk_token="w00"))
    words.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    words.decoder = decoders.WordPiece()  # joins the words with spaces
    return PreTrainedTokenizerFast(tokenizer_object=words, unk_token="w00", pad_token="w00", eos_token=f"w{eos:02d}")


@st.composite
def outlier_specs(draw: st.DrawFn, first_token: bool = False) -> OutlierSpec:
    """Outliers or none; ``first_token``: a massive first token too, where outliers are drawn
    (drawn last, so the draws of ``first_token=False`` stay as they were)."""
    if not draw(st.booleans()):
        return OutlierSpec()
    return OutlierSpec(
        gamma_scale=draw(st.sampled_from([1.0, 10.0, 50.0, 200.0])),
        gamma_zeros=draw(st.integers(0, 2)),
        embedding_scale=draw(st.sampled_from([1.0, 20.0, 100.0])),
        channels=tuple(draw(st.lists(st.integers(0, 63), min_size=1, max_size=3, unique=True))),
        first_token_scale=draw(st.sampled_from([1.0, 100.0, 1000.0])) if first_token else 1.0,
    )


@st.composite
def transformer_models(draw: st.DrawFn, families: tuple[str, ...] = FAMILIES, outliers: bool = True,
                       first_token: bool = False) -> GeneratedModel:
    """Hypothesis strategy: a small random transformer of one of ``families`` with inputs
    (``first_token``: outliers may include a massive first token)."""
    family = draw(st.sampled_from(families))
    head_dim = draw(st.sampled_from([4, 8, 16]))
    heads = draw(st.sampled_from([1, 2, 4]))
    options: dict[str, Any] = {}
    if family in RMSNORM_FAMILIES:
        options["kv_heads"] = draw(st.sampled_from([h for h in (1, 2, 4) if heads % h == 0]))
        if family == "llama":
            options["bias"] = draw(st.booleans())
        options["tied"] = draw(st.booleans())
    if family in ("bert", "modernbert"):
        options["act"] = draw(st.sampled_from(["gelu", "relu", "gelu_new"]))
    if family == "gpt2":
        options["act"] = draw(st.sampled_from(["gelu_new", "gelu", "relu"]))
    return build_model(
        family,
        hidden=head_dim * heads,
        heads=heads,
        layers=draw(st.integers(1, 3)),
        ffn=draw(st.sampled_from([16, 32, 64])),
        vocab=64,
        batch=draw(st.integers(1, 3)),
        seq=draw(st.integers(2, 12)),
        outliers=draw(outlier_specs(first_token)) if outliers else OutlierSpec(),
        attn=draw(st.sampled_from(["sdpa", "eager"])),
        seed=draw(st.integers(0, 2**16)),
        **options,
    )


def saved_llama(folder: str | os.PathLike, layers: int, shapes: Sequence[tuple[int, int, int]]
                ) -> tuple[GeneratedModel, list[dict[str, torch.Tensor]]]:
    """A tied grouped-query Llama of ``layers`` layers saved with ``save_pretrained`` in ``folder``
    (what a capture without weights reads), and one batch of its inputs per ``(seed, seq, batch)``
    of ``shapes``: lengths other than the example's exercise the graph's dynamic sizes."""
    options = {"layers": layers, "tied": True, "kv_heads": 2}
    g = build_model("llama", **options)
    g.model.save_pretrained(folder)
    batches = [build_model("llama", seed=seed, seq=seq, batch=batch, **options).inputs for seed, seq, batch in shapes]
    return g, batches


@contextlib.contextmanager
def first_token_grids_everywhere() -> Iterator[None]:
    """``+sink`` quantizers keep a first-token grid at every site, also where the main grid
    covers the first tokens or (``sink_min_widening``) may grow to (generated models have no
    attention sink): the two-grid paths of the passes get exercised everywhere."""
    from ..quantizers import observers

    with mock.patch.object(observers.Observer, "_shared_grid", lambda self, main, lo, hi: None):
        yield
