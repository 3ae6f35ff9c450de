"""The packaged text: real, non-trivial, with disjoint calibration and evaluation splits."""

import pytest

from outlierfx import corpus
from outlierfx.errors import DataError


def test_wikipedia_splits_are_disjoint_and_substantial():
    calibration, evaluation = corpus.wikipedia("calibration"), corpus.wikipedia("evaluation")
    assert sum(len(p.split()) for p in calibration) > 100_000
    assert sum(len(p.split()) for p in evaluation) > 50_000
    assert not set(calibration) & set(evaluation)
    assert not any("[[" in p or "{{" in p or "<ref" in p for p in calibration + evaluation)


def test_calibration_sample_spreads_over_articles():
    sample = corpus.wikipedia_sample("calibration", 64)
    articles = [set(p) for title, p in corpus._wikipedia_articles() if title in corpus._titles("calibration")]
    assert len(sample) == 64 and len(set(sample)) == 64
    assert set(sample) <= set(corpus.wikipedia("calibration"))
    assert not set(sample) & set(corpus.wikipedia("evaluation"))
    # one paragraph per article while articles last, then a second from each
    assert sum(any(p in a for p in sample) for a in articles) == min(64, len(articles))
    more = corpus.wikipedia_sample("calibration", len(articles) + 5)
    assert more[: len(articles)] == corpus.wikipedia_sample("calibration", len(articles))
    assert len(more) == len(articles) + 5


def test_calibration_passages_join_an_articles_paragraphs_up_to_a_word_count():
    passages = corpus.wikipedia_sample("calibration", 32, min_words=200)
    articles = {title: p for title, p in corpus._wikipedia_articles() if title in corpus._titles("calibration")}
    assert len(passages) == 32
    for passage in passages:
        parts = passage.split("\n")
        # consecutive paragraphs of one article, stopping as soon as 200 words are reached
        source = next(p for p in articles.values() if parts[0] in p)
        start = source.index(parts[0])
        assert list(source[start:start + len(parts)]) == parts
        assert sum(len(p.split()) for p in parts[:-1]) < 200
        assert sum(len(p.split()) for p in parts) >= 200 or start + len(parts) == len(source)
    assert corpus.wikipedia_sample("calibration", 32, min_words=0) == corpus.wikipedia_sample("calibration", 32)


def test_evenly_spaced():
    texts = [str(i) for i in range(10)]
    assert corpus.evenly_spaced(texts, 5) == ["0", "2", "4", "6", "8"]
    assert corpus.evenly_spaced(texts, 20) == texts


def test_unknown_split():
    with pytest.raises(DataError, match="unknown split"):
        corpus.wikipedia("train")


def test_news_polarity_and_lee50():
    assert len(corpus.news()) == 300
    sentences = corpus.polarity()
    assert len(sentences) == 200 and {label for _, label in sentences} == {0, 1}
    lee = corpus.lee50()
    assert len(lee.documents) == 50 and lee.similarity.shape == (50, 50)
    assert (lee.similarity.diagonal() == 1).all()
