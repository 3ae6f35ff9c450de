"""Real English text for calibration and evaluation, read from the files the ``gensim`` package
ships (``gensim/test/test_data``; the package is never imported).

- Wikipedia: a shortened English dump (~200 articles). Articles are assigned to the
  ``calibration`` or ``evaluation`` split by a hash of their title, so the splits never overlap.
  Calibration samples spread over the articles (:func:`wikipedia_sample`).
- News: 300 Australian news articles (``lee_background.cor``), an out-of-distribution set.
- Lee-50: 50 news documents with averaged human similarity judgements.
- Polarity: 200 labelled movie-review sentences.

User text for calibration: :func:`from_text_file` reads paragraphs from a file and
:func:`calibration_batches` tokenizes paragraphs into batches, refusing text too short to
calibrate on.
"""

from __future__ import annotations

import bz2
import dataclasses
import functools
import os
import pathlib
import re
import xml.etree.ElementTree as ET
import zlib
from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch

from .errors import DataError
from .models import LoadedModel, encode, package_dir

Split = Literal["calibration", "evaluation"]
_WIKI = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"


def data_dir() -> pathlib.Path:
    folder = package_dir("gensim", "gensim") / "test" / "test_data"
    if not folder.is_dir():
        raise DataError(f"gensim's test data folder is missing: {folder}")
    return folder


def _read_lines(name: str) -> list[str]:
    path = data_dir() / name
    text = path.read_text(encoding="latin-1")
    return [line.strip() for line in text.splitlines() if line.strip()]


_MARKUP = [
    (re.compile(r"<!--.*?-->", re.DOTALL), " "),
    (re.compile(r"<ref[^>]*/>"), " "),
    (re.compile(r"<ref[^>]*>.*?</ref>", re.DOTALL), " "),
    (re.compile(r"\{\|.*?\|\}", re.DOTALL), " "),  # tables
    (re.compile(r"\[\[(?:File|Image|Category):[^\[\]]*(?:\[\[[^\]]*\]\][^\[\]]*)*\]\]", re.IGNORECASE), " "),
    (re.compile(r"\[\[(?:[^|\]]*\|)?([^\]]*)\]\]"), r"\1"),  # [[target|label]] -> label
    (re.compile(r"\[https?://\S+ ([^\]]*)\]"), r"\1"),
    (re.compile(r"\[https?://\S+\]"), " "),
    (re.compile(r"<[^>]+>"), " "),
    (re.compile(r"'{2,}"), ""),
    (re.compile(r"&[a-z]+;"), " "),
]
_LEFTOVER_MARKUP = ("[[", "]]", "{{", "}}", "|", "<ref", "</")
_TEMPLATE = re.compile(r"\{\{[^{}]*\}\}")


def _clean_wikitext(text: str) -> list[str]:
    """Plain-text paragraphs of an article (markup, templates, tables and headings dropped)."""
    previous = None
    while previous != text:  # templates nest; strip innermost first
        previous, text = text, _TEMPLATE.sub(" ", text)
    for pattern, repl in _MARKUP:
        text = pattern.sub(repl, text)
    paragraphs = []
    for block in text.split("\n"):
        block = block.strip()
        if not block or block.startswith(("=", "*", "#", "|", "!", ":", ";", "{", "}")):
            continue
        block = re.sub(r"\s+", " ", block)
        if any(mark in block for mark in _LEFTOVER_MARKUP):
            continue  # unbalanced markup the regexes could not strip: drop rather than feed it to a model
        if len(block.split()) >= 20:
            paragraphs.append(block)
    return paragraphs


@functools.lru_cache(maxsize=1)
def _wikipedia_articles() -> tuple[tuple[str, tuple[str, ...]], ...]:
    articles = []
    with bz2.open(data_dir() / _WIKI, "rb") as f:
        title = None
        for _, elem in ET.iterparse(f, events=("end",)):
            tag = elem.tag.rsplit("}", 1)[-1]
            if tag == "title":
                title = elem.text or ""
            elif tag == "text" and title is not None:
                paragraphs = _clean_wikitext(elem.text or "")
                if paragraphs and not (elem.text or "").lstrip().upper().startswith("#REDIRECT"):
                    articles.append((title, tuple(paragraphs)))
            elif tag == "page":
                elem.clear()
    return tuple(articles)


def wikipedia(split: Split) -> list[str]:
    """Paragraphs of the Wikipedia articles in ``split``; the two splits share no article."""
    titles = _titles(split)
    return [p for title, paragraphs in _wikipedia_articles() if title in titles for p in paragraphs]


@functools.lru_cache(maxsize=2)
def _titles(split: Split) -> frozenset[str]:
    if split not in ("calibration", "evaluation"):
        raise DataError(f"unknown split {split!r}; use 'calibration' or 'evaluation'")
    want_eval = split == "evaluation"
    return frozenset(t for t, _ in _wikipedia_articles() if (zlib.crc32(t.encode()) % 4 == 0) == want_eval)


def wikipedia_sample(split: Split, count: int, min_words: int = 0) -> list[str]:
    """``count`` passages of ``split`` spread over its articles: every article's first
    paragraph, then every article's second, and so on (deterministic). With ``min_words`` a
    passage joins an article's consecutive paragraphs (one per line) until it has that many
    words: articles' first paragraphs are short, and a decoder's 256-token window wants more.

    The split's first ``count`` paragraphs would be one or two articles (the first 64 calibration
    paragraphs are all "Anarchism"); ranges calibrated on one topic clip the words of another
    (MiniLM's last attention context reached 3.7 on the evaluation text against a calibrated 1.8).
    """
    articles = [p for title, p in _wikipedia_articles() if title in _titles(split)]
    cursors = [0] * len(articles)
    sample: list[str] = []
    while len(sample) < count and any(c < len(a) for c, a in zip(cursors, articles)):
        for i, paragraphs in enumerate(articles):
            if len(sample) >= count or cursors[i] >= len(paragraphs):
                continue
            passage, words = [], 0
            while cursors[i] < len(paragraphs) and (not passage or words < min_words):
                passage.append(paragraphs[cursors[i]])
                words += len(paragraphs[cursors[i]].split())
                cursors[i] += 1
            sample.append("\n".join(passage))
    return sample


def evenly_spaced(texts: Sequence[str], count: int) -> list[str]:
    """``count`` of ``texts`` at evenly spaced positions (all of them when there are fewer): a
    calibration sample from a whole document rather than its beginning."""
    if count >= len(texts):
        return list(texts)
    return [texts[i * len(texts) // count] for i in range(count)]


def news() -> list[str]:
    """The 300 news articles of ``lee_background.cor`` (out of distribution for Wikipedia)."""
    return _read_lines("lee_background.cor")


def polarity() -> list[tuple[str, int]]:
    """Movie-review sentences with labels (1 positive, 0 negative)."""
    out = []
    for line in _read_lines("pang_lee_polarity.cor"):
        label, _, sentence = line.partition(" ")
        out.append((sentence, 1 if label == "__label__pos" else 0))
    return out


@dataclasses.dataclass(frozen=True)
class Lee50:
    documents: tuple[str, ...]
    similarity: np.ndarray  # (50, 50) human similarity, upper triangle filled


def lee50() -> Lee50:
    documents = tuple(_read_lines("lee.cor"))
    matrix = np.loadtxt(data_dir() / "similarities0-1.txt")
    if matrix.shape != (len(documents), len(documents)):
        raise DataError(f"Lee-50 similarity matrix is {matrix.shape}, expected {len(documents)} square")
    return Lee50(documents, matrix)


# Real (non-padding) tokens below which calibration ranges are too noisy to trust: the packaged
# recipes calibrate on ~6,000 (64 paragraphs of <= 128 tokens).
MIN_CALIBRATION_TOKENS = 512


def from_text_file(path: str | os.PathLike, max_words: int = 200) -> list[str]:
    """Paragraphs of a user's text file (UTF-8, else latin-1) for calibration.

    Paragraphs are blocks separated by blank lines, or single lines when the file has no blank
    line; paragraphs longer than ``max_words`` are cut into pieces so that little is lost to
    truncation. Raises :class:`DataError` for a missing, binary or empty file.
    """
    file = pathlib.Path(path)
    if not file.exists():
        raise DataError(f"calibration text file {file} does not exist")
    if not file.is_file():
        raise DataError(f"calibration text {file} is not a file (pass a UTF-8 text file)")
    data = file.read_bytes()
    if b"\x00" in data[:8192]:
        raise DataError(f"calibration text file {file} is binary, not text (pass a UTF-8 text file)")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        text = data.decode("latin-1")
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    blocks = re.split(r"\n\s*\n", text) if re.search(r"\n\s*\n", text.strip()) else text.split("\n")
    paragraphs = []
    for block in blocks:
        words = block.split()
        paragraphs += [" ".join(words[i : i + max_words]) for i in range(0, len(words), max_words)]
    if not paragraphs:
        raise DataError(f"calibration text file {file} is empty")
    return paragraphs


def calibration_batches(
    loaded: LoadedModel,
    texts: Sequence[str],
    max_length: int = 128,
    batch_size: int = 8,
    min_tokens: int = MIN_CALIBRATION_TOKENS,
    source: str = "the calibration text",
) -> list[dict[str, torch.Tensor]]:
    """Tokenize ``texts`` into padded batches of ``batch_size`` paragraphs (each truncated to
    ``max_length`` tokens) for ``loaded.model``. Raises :class:`DataError` when there is no text
    or fewer than ``min_tokens`` real tokens in all; ``source`` names the text in the message."""
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise DataError(f"{source} has no text to calibrate on")
    batches = [encode(loaded, texts[i : i + batch_size], max_length) for i in range(0, len(texts), batch_size)]
    tokens = sum(int(b["attention_mask"].sum()) if "attention_mask" in b else b["input_ids"].numel() for b in batches)
    if tokens < min_tokens:
        raise DataError(f"{source} is too short: {tokens} tokens in {len(texts)} paragraphs (at most {max_length} "
                        f"tokens each), calibration needs at least {min_tokens}; add more text")
    return batches
