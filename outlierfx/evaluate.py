"""Quality metrics on held-out text (never the calibration split).

- Encoders: mean cosine similarity between reference and quantized sentence embeddings (masked
  mean pooling) on held-out Wikipedia paragraphs, and the Lee-50 Pearson correlation between
  embedding cosine similarities and human similarity judgements.
- Decoders: perplexity over non-overlapping fixed-length windows of held-out Wikipedia text and
  of the news articles (out of distribution), a fixed number of tokens each.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence

import numpy as np
import torch

from . import corpus
from .models import LoadedModel, encode

Forward = Callable[..., object]


def mean_pooled(model: Forward, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp_min(1)


@dataclasses.dataclass(frozen=True)
class EncoderEval:
    batches: tuple[dict[str, torch.Tensor], ...]
    lee_batches: tuple[dict[str, torch.Tensor], ...]
    lee_human: np.ndarray  # upper-triangle human scores, pair order i<j

    @classmethod
    def build(cls, loaded: LoadedModel, sentences: int = 128, max_length: int = 128, batch: int = 16) -> EncoderEval:
        texts = corpus.wikipedia("evaluation")[:sentences]
        lee = corpus.lee50()
        iu = np.triu_indices(len(lee.documents), k=1)
        return cls(
            tuple(encode(loaded, texts[i : i + batch], max_length) for i in range(0, len(texts), batch)),
            tuple(encode(loaded, lee.documents[i : i + batch], 256) for i in range(0, len(lee.documents), batch)),
            lee.similarity[iu],
        )

    def embeddings(self, model: Forward) -> torch.Tensor:
        return torch.cat([mean_pooled(model, b) for b in self.batches])

    def lee50(self, model: Forward) -> float:
        emb = torch.nn.functional.normalize(torch.cat([mean_pooled(model, b) for b in self.lee_batches]), dim=-1)
        sims = (emb @ emb.T).numpy()
        iu = np.triu_indices(sims.shape[0], k=1)
        return float(np.corrcoef(sims[iu], self.lee_human)[0, 1])

    def metrics(self, model: Forward, reference: torch.Tensor | None) -> dict[str, float]:
        emb = self.embeddings(model)
        cosine = 1.0 if reference is None else float(torch.nn.functional.cosine_similarity(emb, reference).mean())
        return {"cosine": cosine, "lee50": self.lee50(model)}


def token_windows(loaded: LoadedModel, texts: Sequence[str], window: int, count: int) -> torch.Tensor:
    """``count`` non-overlapping windows of ``window`` tokens from the concatenated texts."""
    ids: list[int] = []
    for text in texts:
        ids.extend(loaded.tokenizer(text, add_special_tokens=False)["input_ids"])
        ids.append(loaded.tokenizer.eos_token_id if loaded.tokenizer.eos_token_id is not None else 0)
        if len(ids) >= window * count:
            break
    usable = len(ids) // window
    if usable < count:
        count = usable
    return torch.tensor(ids[: window * count]).reshape(count, window)


@dataclasses.dataclass(frozen=True)
class DecoderEval:
    wiki: torch.Tensor  # (windows, window)
    news: torch.Tensor

    @classmethod
    def build(cls, loaded: LoadedModel, window: int = 256, windows: int = 24) -> DecoderEval:
        return cls(token_windows(loaded, corpus.wikipedia("evaluation"), window, windows),
                   token_windows(loaded, corpus.news(), window, windows))

    @staticmethod
    def perplexity(model: Forward, windows: torch.Tensor, batch: int = 4) -> float:
        total, count = 0.0, 0
        for i in range(0, windows.shape[0], batch):
            ids = windows[i : i + batch]
            with torch.no_grad():
                logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
            loss = torch.nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1), reduction="sum")
            total += float(loss)
            count += ids[:, 1:].numel()
        return math.exp(total / count)

    def metrics(self, model: Forward, reference: object = None) -> dict[str, float]:
        return {"ppl_wiki": self.perplexity(model, self.wiki), "ppl_news": self.perplexity(model, self.news)}
