"""The ``terms`` space: hashed tags and prompt terms, steered like any embedding space."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from indexer.prompts import item_terms, prompt_terms
from recommender.feedback import BayesSteerer
from recommender.terms import TERM_DIM, term_features, term_matrix, term_vector


def test_features_are_normalised_tags_prompt_terms_and_their_words() -> None:
    features = term_features(["Blue_Background", "red"], "masterpiece, (striped orbs:1.2)")
    assert {"blue background", "blue", "background", "red", "striped orbs", "orbs"} <= features
    assert "masterpiece" not in features  # quality boilerplate is no taste


def test_item_terms_are_its_distinct_normalised_tags_and_prompt_terms() -> None:
    terms = item_terms(
        ["Red_Hair", "red hair", "  ", "Cat."], prompt_terms("(red hair:1.2), a cat")
    )
    assert terms == ("cat", "red hair")


def test_a_feature_two_terms_share_counts_once() -> None:
    # "red" is a term and a word of "red hair": three features, each weighing 1/sqrt(3).
    row = term_matrix([("red", "red hair")])[0]
    assert np.count_nonzero(row) == 3
    np.testing.assert_allclose(row[row > 0], 1 / np.sqrt(3), rtol=1e-6)
    assert np.array_equal(row, term_vector(["Red", "red_hair"], None))


def test_shared_features_count_once_however_many_occurrences_a_call_has(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import recommender.terms

    items = [("red", "red hair", "hair"), ("blue sky", "sky", "blue"), ("cat",), ()]
    small = term_matrix(items)
    monkeypatch.setattr(recommender.terms, "_EXACT_POSITIONS", 0)  # the path for huge calls
    assert np.array_equal(term_matrix(items), small)
    assert np.allclose(np.linalg.norm(small[:3], axis=1), 1.0) and not small[3].any()


def test_rows_are_unit_or_zero_and_shared_features_make_items_close() -> None:
    rows = term_matrix(
        [
            item_terms(("red", "circle"), prompt_terms("a red circle")),
            item_terms(("red", "square"), ()),
            item_terms(("green", "square"), ()),
            (),
        ]
    )
    assert rows.shape == (4, TERM_DIM)
    assert np.allclose(np.linalg.norm(rows[:3], axis=1), 1.0)
    assert not rows[3].any()
    assert rows[0] @ rows[1] > rows[0] @ rows[2]  # "red" is shared
    assert rows[1] @ rows[2] > 0  # "square" is shared
    assert np.array_equal(term_vector(("red", "square"), None), rows[1])


def test_a_linear_preference_over_terms_learns_a_liked_tag_from_a_page_of_dwell() -> None:
    rng = np.random.default_rng(0)
    colours, shapes = ["red", "green", "blue", "pink"], ["circle", "square", "star", "ring"]
    items = [(c, s) for c in colours for s in shapes]
    x = term_matrix([item_terms((c, s), ()) for c, s in items])
    liked = np.array([1.0 if c == "blue" else -0.5 for c, _ in items])
    steerer = BayesSteerer()
    state = steerer.init_state(term_vector(("red", "circle"), None))
    order = rng.permutation(len(items))
    query = steerer.update(state, x[order], liked[order] + 0.2 * rng.standard_normal(len(items)))
    scores = x @ query
    best = [items[i] for i in np.argsort(-scores)[:4]]
    assert all(colour == "blue" for colour, _ in best)


def test_a_catalog_columns_term_numbers_give_the_rows_their_names_give(
    tmp_path: Path,
) -> None:
    """Ranking passes term numbers (a column's ``TermRuns``), queries pass strings: both
    give the same rows, as the column's vocabulary grows, before and after it is saved."""
    from indexer.term_column import TermColumn

    rng = np.random.default_rng(3)
    words = [f"w{i}" for i in range(60)] + ["red", "red hair", "hair", "blue sky", "sky"]
    column, held = TermColumn(), {}
    for step in range(40):
        for key in rng.integers(0, 300, 8).tolist():
            held[key] = tuple(sorted(set(rng.choice(words, rng.integers(0, 9)).tolist())))
            column.set(key, held[key])
        if step % 10 == 9:
            column.save(tmp_path / "terms.bin", (step, 1))
        keys = rng.integers(-1, 320, 25).tolist()
        runs = column.runs(keys)
        assert runs.tuples() == [held.get(k, ()) for k in keys]
        assert np.array_equal(term_matrix(runs), term_matrix(runs.tuples()))
