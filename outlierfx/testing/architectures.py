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


def build_architecture(model_type: str, *, batch: int = 2, seq: int = 8, seed: int = 0,
                       dtype: torch.dtype = torch.float32, pad: bool = True, **overrides: Any) -> GeneratedModel:
    """A tiny random-weight ``model_type`` in ``dtype``, with inputs (the first row right-padded
    when ``pad``): the bare model for an encoder, the causal-LM head for a decoder."""
    from transformers import AutoModel, AutoModelForCausalLM

    if model_type not in ENCODERS + DECODERS:
        raise ValueError(f"unknown architecture {model_type!r}; choose from {ENCODERS + DECODERS}")
    torch.manual_seed(seed)
    config = tiny_config(model_type, **overrides)
    auto = AutoModelForCausalLM if model_type in DECODERS else AutoModel
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
