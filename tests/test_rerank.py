"""Re-rank fusion and the local vocabulary, as pure functions on small arrays."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from recommender.rerank import (
    LocalVocabulary,
    RerankConfig,
    RerankWeights,
    VocabularyConfig,
    prompt_terms,
    rerank,
)


def _e(i: int, d: int = 4) -> np.ndarray:
    v = np.zeros(d, dtype=np.float32)
    v[i] = 1.0
    return v


# --------------------------------------------------------------------------- terms


def test_prompt_terms_strip_syntax_fillers_and_stopwords() -> None:
    prompt = (
        "masterpiece, best quality, (red hair:1.2), a photo of a cat, <lora:foo_v2:0.8> "
        "[blue eyes], ((cyberpunk city)), 8k, highly detailed, score_9, score_8_up, "
        "1girl, long_hair, red hair"
    )
    assert prompt_terms(prompt) == [
        "red hair",
        "cat",
        "blue eyes",
        "cyberpunk city",
        "1girl",
        "long hair",
    ]
    assert prompt_terms(None) == prompt_terms("") == []
    # words of every script are terms (a single CJK character is a word; one Latin letter not)
    prompt = "猫耳の少女, 桜, x, красивая девушка, a photo of a закат, café au lait"
    assert prompt_terms(prompt) == [
        "猫耳の少女",
        "桜",
        "красивая девушка",
        "закат",
        "café au lait",
    ]
    assert len(prompt_terms(", ".join(f"word{i}" for i in range(100)), max_terms=5)) == 5


# --------------------------------------------------------------------------- vocabulary


def test_vocabulary_weights_decay_and_top_terms() -> None:
    vocab = LocalVocabulary(VocabularyConfig(tag_weight=1.0, term_weight=0.5, decay=0.5))
    vocab.add(_e(0), tags=["Cat", "portrait"], terms=["cat", "red hair"], weight=2.0)
    vocab.add(None, tags=["dog"], weight=1.0)
    vocab.add(_e(1), tags=["ignored"], weight=0.0)  # non-positive weights add nothing
    vocab.add(_e(1), tags=["ignored"], weight=float("nan"))
    # a term given as tag and prompt word counts once, at the tag weight
    assert vocab.top_terms(10) == [("cat", 2.0), ("portrait", 2.0), ("dog", 1.0), ("red hair", 1.0)]
    vocab.decay()
    assert vocab.top_terms(1) == [("cat", 1.0)]
    centroid = vocab.prompt_centroid()
    assert centroid is not None
    np.testing.assert_allclose(centroid, _e(0))


def test_vocabulary_mute_removes_and_refuses_a_term() -> None:
    vocab = LocalVocabulary()
    vocab.add(None, tags=["cat", "dog"], weight=1.0)
    vocab.mute(" Cat ")
    vocab.add(None, tags=["cat"], weight=5.0)
    assert [t for t, _ in vocab.top_terms(5)] == ["dog"]
    assert vocab.muted == frozenset({"cat"})
    vocab.unmute("cat")
    vocab.add(None, tags=["cat"], weight=5.0)
    assert vocab.top_terms(1) == [("cat", 5.0)]


def test_muted_terms_are_bounded_the_oldest_let_back_first() -> None:
    vocab = LocalVocabulary(VocabularyConfig(max_muted=3))
    for term in ("a1", "b2", "c3", "a1", "d4"):  # muting again refreshes a term
        vocab.mute(term)
    assert vocab.muted == frozenset({"c3", "a1", "d4"})
    vocab.add(None, tags=["b2"], weight=1.0)  # no longer muted: it pulls again
    assert vocab.top_terms(1) == [("b2", 1.0)]


def test_vocabulary_is_bounded() -> None:
    vocab = LocalVocabulary(VocabularyConfig(max_prompts=3, max_terms=4))
    for i in range(10):
        vocab.add(_e(i % 4), tags=[f"t{i}"], weight=1.0 + i)
    assert len(vocab.term_weights()) == 4
    assert [t for t, _ in vocab.top_terms(4)] == ["t9", "t8", "t7", "t6"]
    # the three heaviest prompts remain: e1 (w=10), e0 (w=9), e3 (w=8)
    centroid = vocab.prompt_centroid()
    assert centroid is not None
    np.testing.assert_allclose(centroid, np.array([9, 10, 0, 8]) / 27, rtol=1e-6)


# --------------------------------------------------------------------------- fusion


def test_without_vocabulary_image_similarity_decides() -> None:
    img = np.array([0.2, 0.9, 0.5, 0.7], dtype=np.float32)
    res = rerank(img)
    assert res.signals == ("image",)
    assert res.order.tolist() == [1, 3, 2, 0]
    assert res.scores.shape == (4,) and res.scores.dtype == np.float32
    # an empty vocabulary and no text: still image only
    res2 = rerank(img, LocalVocabulary(), text_vecs=np.eye(4), terms=[["a"]] * 4)
    assert res2.signals == ("image",)
    np.testing.assert_allclose(res2.scores, res.scores)


def test_prompt_and_tag_weights_change_the_order() -> None:
    img = np.array([0.9, 0.8, 0.7], dtype=np.float32)
    text = np.stack([_e(0), _e(1), _e(2)])
    terms = [["dog"], ["cat"], ["cat", "hat"]]
    vocab = LocalVocabulary()
    vocab.add(_e(2), tags=["cat", "hat"], weight=1.0)
    image_only = RerankConfig(weights=RerankWeights(image=1, prompt=0, tags=0, clip=0))
    prompt_heavy = RerankConfig(weights=RerankWeights(image=0.2, prompt=1, tags=0, clip=0))
    tags_heavy = RerankConfig(weights=RerankWeights(image=0.2, prompt=0, tags=1, clip=0))
    assert rerank(img, vocab, text, terms, config=image_only).order.tolist() == [0, 1, 2]
    res = rerank(img, vocab, text, terms, config=prompt_heavy)
    assert res.order[0] == 2 and res.signals == ("image", "prompt")
    res = rerank(img, vocab, text, terms, config=tags_heavy)
    assert res.order.tolist() == [2, 1, 0] and res.signals == ("image", "tags")


def test_missing_prompts_and_tags_are_neutral() -> None:
    img = np.array([0.5, 0.5, 0.5], dtype=np.float32)
    text = np.stack([_e(0), np.zeros(4, dtype=np.float32), _e(1)])
    vocab = LocalVocabulary()
    vocab.add(_e(0), weight=1.0)
    cfg = RerankConfig(weights=RerankWeights(image=1, prompt=1, tags=1, clip=0))
    res = rerank(img, vocab, text, [[], [], []], config=cfg)
    assert res.signals == ("image", "prompt")  # no candidate has tags: the signal drops out
    # matching prompt > no prompt (the mean) > other prompt
    assert res.order.tolist() == [0, 1, 2]
    assert res.scores[1] == pytest.approx((res.scores[0] + res.scores[2]) / 2)


def test_weights_renormalise_over_available_signals() -> None:
    img = np.array([0.1, 0.4, 0.9], dtype=np.float32)
    half = rerank(img, config=RerankConfig(weights=RerankWeights(image=0.5)))
    full = rerank(img, config=RerankConfig(weights=RerankWeights(image=1.0)))
    np.testing.assert_allclose(half.scores, full.scores)


def test_clip_signal_is_used_when_present() -> None:
    img = np.array([0.9, 0.8], dtype=np.float32)
    cfg = RerankConfig(weights=RerankWeights(image=0.3, clip=1.0))
    assert rerank(img, clip_sim=[0.1, 0.6], config=cfg).order.tolist() == [1, 0]
    res = rerank(img, clip_sim=[np.nan, np.nan], config=cfg)
    assert res.signals == ("image",) and res.order.tolist() == [0, 1]


def test_muted_term_stops_pulling_and_is_penalised() -> None:
    img = np.array([0.8, 0.8, 0.8], dtype=np.float32)
    terms = [["cat"], ["dog"], ["tree"]]
    vocab = LocalVocabulary()
    vocab.add(None, tags=["cat", "dog"], weight=1.0)
    cfg = RerankConfig(weights=RerankWeights(image=1, tags=1), muted_penalty=0.5)
    before = rerank(img, vocab, terms=terms, config=cfg)
    assert set(before.order[:2].tolist()) == {0, 1}
    vocab.mute("cat")
    after = rerank(img, vocab, terms=terms, config=cfg)
    assert after.order.tolist() == [1, 2, 0]


def test_size_mismatches_are_refused() -> None:
    vocab = LocalVocabulary()
    vocab.add(_e(0), tags=["a"], weight=1.0)
    with pytest.raises(ValueError):
        rerank([0.1, 0.2], vocab, text_vecs=np.eye(4)[:3])
    with pytest.raises(ValueError):
        rerank([0.1, 0.2], vocab, terms=[["a"]])
    with pytest.raises(ValueError):
        rerank([0.1, 0.2], clip_sim=[0.1])
    with pytest.raises(ValueError):
        RerankWeights(image=-1)


def test_terms_as_a_columns_numbers_rank_as_their_names_do(tmp_path: Path) -> None:
    from indexer.term_column import TermColumn

    rng = np.random.default_rng(5)
    words = ["red", "cat", "red hair", "dog", "sky", "blue", "tree"]
    terms = [tuple(sorted(set(rng.choice(words, rng.integers(0, 4)).tolist()))) for _ in range(30)]
    column = TermColumn.from_rows(enumerate(terms))
    column.save(tmp_path / "terms.bin", (1, 1))
    vocab = LocalVocabulary()
    vocab.add(None, tags=["red", "sky"], terms=["cat"], weight=1.0)
    vocab.mute("dog")
    image = rng.random(30)
    by_name = rerank(image, vocab, terms=terms)
    by_number = rerank(image, vocab, terms=column.runs(list(range(30))))
    assert np.array_equal(by_name.order, by_number.order)
    np.testing.assert_allclose(by_name.scores, by_number.scores, rtol=1e-6)
    assert by_name.signals == ("image", "tags")
