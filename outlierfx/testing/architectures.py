"""Tiny random-weight models of any architecture transformers ships, built from its config class.

One size for every architecture (hidden 64, 2 layers, 4 heads of 16): the config class's own
defaults decide everything else (its attention, norms, activation, biases), so a model here is
what a user loading that architecture gets, only smaller. Nothing is downloaded.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch

from .models import GeneratedModel, OutlierSpec

ENCODERS = ("bert", "roberta", "distilbert", "xlm-roberta", "electra", "albert", "mpnet", "deberta-v2", "modernbert")
"""Loaded with ``AutoModel`` (the bare encoder, as sentence-embedding users load it)."""
DECODERS = ("gpt2", "gpt_neox", "opt", "bloom", "falcon", "llama", "mistral", "qwen2", "qwen3", "phi", "phi3", "gemma",
            "gemma2", "gemma3_text", "olmo2", "granite", "stablelm", "starcoder2")
"""Loaded with ``AutoModelForCausalLM`` (the causal-LM head, as generation users load it)."""

TINY_SIZES: dict[str, int] = {
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,  # grouped-query attention where the architecture has it
    "head_dim": 16,  # Gemma and Qwen3 default to a head size of their own
    "intermediate_size": 128,
    "hidden_dim": 128,  # DistilBERT's name for the feed-forward width
    "ffn_dim": 128,  # OPT's
    "vocab_size": 128,
    "max_position_embeddings": 64,
    # mixture-of-experts and encoder-decoder names for the same sizes (no listed architecture takes
    # them; the discovered ones do: outlierfx.testing.discovery)
    "num_experts": 4,
    "num_local_experts": 4,
    "n_routed_experts": 4,
    "num_experts_per_tok": 2,
    "n_shared_experts": 1,
    "moe_intermediate_size": 64,
    "d_model": 64,
    "encoder_layers": 2,
    "decoder_layers": 2,
    "encoder_attention_heads": 4,
    "decoder_attention_heads": 4,
    "encoder_ffn_dim": 128,
    "decoder_ffn_dim": 128,
}
"""Config keyword arguments, given to the architectures whose config takes them (GPT-2 takes
``hidden_size`` as an alias of ``n_embd``; Falcon derives ``head_dim`` and takes none)."""
_SPECIAL_TOKENS = ("pad_token_id", "bos_token_id", "eos_token_id", "cls_token_id", "sep_token_id")


def tiny_config(model_type: str, **overrides: Any) -> Any:
    """The config of a tiny ``model_type`` (a transformers ``model_type`` such as ``"mpnet"``).

    Special-token ids of the full-size vocabulary that fall outside the tiny one are moved to
    its last id (ModernBERT and Phi-3 size their padding embedding row by them)."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    config_class = CONFIG_MAPPING[model_type]
    parameters = inspect.signature(config_class.__init__).parameters
    accepted = set(parameters) | set(config_class.attribute_map)
    sizes = {key: value for key, value in {**TINY_SIZES, **overrides}.items() if key in accepted}
    vocab = sizes["vocab_size"]
    for key in _SPECIAL_TOKENS:
        token = parameters[key].default if key in parameters else None
        if key not in sizes and isinstance(token, int) and token >= vocab:
            sizes[key] = vocab - 1
    return config_class(**sizes)


def loader_of(model_type: str) -> str:
    """How users load ``model_type``: ``AutoModel`` for an encoder (listed, or unlisted with a
    masked-LM head: RoBERTa-like types that also have a causal-LM head are encoders first),
    else the causal-LM head where transformers has one (an encoder-decoder's: its decoder)."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, MODEL_FOR_MASKED_LM_MAPPING_NAMES

    if model_type in DECODERS:
        return "AutoModelForCausalLM"
    seq2seq = getattr(CONFIG_MAPPING[model_type], "is_encoder_decoder", False) is True
    if model_type in ENCODERS or (model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES and not seq2seq) \
            or model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return "AutoModel"
    return "AutoModelForCausalLM"


def build_architecture(model_type: str, *, batch: int = 2, seq: int = 8, seed: int = 0,
                       dtype: torch.dtype = torch.float32, pad: bool = True, **overrides: Any) -> GeneratedModel:
    """A tiny random-weight ``model_type`` in ``dtype``, with inputs (the first row right-padded
    when ``pad``), loaded as :func:`loader_of` says; any model type of the installed
    transformers, listed or not (``outlierfx.testing.discovery``)."""
    from transformers import AutoModel, AutoModelForCausalLM
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if model_type not in CONFIG_MAPPING:
        raise ValueError(f"unknown architecture {model_type!r}: not a model type of the installed transformers "
                         f"(the matrix lists {ENCODERS + DECODERS})")
    torch.manual_seed(seed)
    config = tiny_config(model_type, **overrides)
    auto = AutoModelForCausalLM if loader_of(model_type) == "AutoModelForCausalLM" else AutoModel
    model = auto.from_config(config, dtype=dtype).eval()
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, config.vocab_size, (batch, seq), generator=generator)
    pad = getattr(config, "pad_token_id", None)
    if isinstance(pad, int):  # a real position never holds padding (OLMo-2's padding row is zero)
        input_ids[input_ids == pad] = (pad + 1) % config.vocab_size
    mask = torch.ones(batch, seq, dtype=torch.long)
    if pad and batch > 1 and seq > 1:
        mask[0, max(1, seq // 2):] = 0
    return GeneratedModel(model_type, model, {"input_ids": input_ids, "attention_mask": mask}, config, OutlierSpec())
