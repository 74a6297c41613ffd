"""The items' terms held by key in memory (``TermColumn``), on its own and in the catalog."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import numpy as np
import pytest

from indexer.catalog import DATABASE, TERMS_FILE, Catalog
from indexer.prompts import item_terms, prompt_terms
from indexer.records import DumpRecord
from indexer.term_column import TermColumn
from tests.test_catalog import make_items, new_catalog

STAMP = (7, 1)


def test_a_column_matches_a_dict_through_writes_saves_and_loads(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    words = ["red", "red hair", "cat", "café", "blue sky", "x"]
    model: dict[int, tuple[str, ...]] = {}
    column = TermColumn()
    path = tmp_path / "terms.bin"
    for step in range(300):
        key = int(rng.integers(0, 60))
        if rng.random() < 0.2:
            column.clear(key)
            model[key] = ()
        else:
            terms = tuple(sorted({str(w) for w in rng.choice(words, rng.integers(0, 4))}))
            column.set(key, terms)
            model[key] = terms
        if step % 40 == 39:  # fold the writes into a file, and sometimes read it back anew
            column.save(path, STAMP)
            assert not column.dirty
            if rng.random() < 0.5:
                loaded = TermColumn.load(path, STAMP)
                assert loaded is not None
                column = loaded
        keys = [int(k) for k in rng.integers(-2, 70, 12)]
        assert column.get(keys) == [model.get(k, ()) for k in keys]


def test_a_save_keeps_keys_past_the_old_end_and_the_runs_between_changes(tmp_path: Path) -> None:
    path = tmp_path / "terms.bin"
    column = TermColumn.from_rows((k, (f"t{k}", "shared")) for k in range(5))
    column.save(path, STAMP)
    column.set(2, ("new",))
    column.set(9, ("far",))  # past the saved end: keys 5..8 have none
    column.save(path, STAMP)
    loaded = TermColumn.load(path, STAMP)
    assert loaded is not None
    assert loaded.get(list(range(10))) == [
        ("t0", "shared"),
        ("t1", "shared"),
        ("new",),
        ("t3", "shared"),
        ("t4", "shared"),
        (),
        (),
        (),
        (),
        ("far",),
    ]


def test_each_term_is_numbered_once_and_read_as_one_shared_string(tmp_path: Path) -> None:
    """Re-ranking looks candidates' terms up in dicts: one str object per term, decoded once,
    keeps its hash computed; and saves never number a known term again."""
    path = tmp_path / "terms.bin"
    column = TermColumn.from_rows([(0, ("red", "cat")), (2, ("cat",))])
    column.save(path, STAMP)
    loaded = TermColumn.load(path, STAMP)
    assert loaded is not None
    first, _, second = loaded.get([0, 1, 2])
    assert first == ("red", "cat") and second == ("cat",) and first[1] is second[0]
    for step in range(3):  # known terms again, then one new term
        loaded.set(5 + step, ("cat", "red") if step < 2 else ("cat", "dog"))
        loaded.save(path, STAMP)
    assert len(loaded._names) == 3  # noqa: SLF001 - red, cat, dog
    again = TermColumn.load(path, STAMP)
    assert again is not None
    assert again.get([0, 5, 6, 7, 3]) == [
        ("red", "cat"),
        ("cat", "red"),
        ("cat", "red"),
        ("cat", "dog"),
        (),
    ]
    with pytest.raises(ValueError, match="ascend"):
        TermColumn.from_rows([(3, ("a",)), (1, ("b",))])


def test_a_file_of_another_stamp_or_damaged_is_not_read(tmp_path: Path) -> None:
    path = tmp_path / "terms.bin"
    assert TermColumn.load(path, STAMP) is None  # none written yet
    TermColumn.from_rows([(0, ("a", "b")), (1, ("c",))]).save(path, STAMP)
    assert TermColumn.load(path, STAMP) is not None
    assert TermColumn.load(path, (8, 1)) is None  # written at another generation
    assert TermColumn.load(path, (7, 2)) is None  # under other prompt-term rules
    whole = path.read_bytes()
    path.write_bytes(whole[:-1])  # truncated
    assert TermColumn.load(path, STAMP) is None
    path.write_bytes(b"NOTTERMS" + whole[8:])
    assert TermColumn.load(path, STAMP) is None
    path.write_bytes(b"")
    assert TermColumn.load(path, STAMP) is None


@pytest.fixture
def catalog(tmp_path: Path) -> Catalog:
    return new_catalog(tmp_path / "cat", 30)


def _all_keys(catalog: Catalog) -> list[int]:
    return [k for i in range(40) if (k := catalog.key_for_id(str(i))) is not None]


def test_the_catalogs_terms_match_its_rows_and_follow_every_write(catalog: Catalog) -> None:
    keys = _all_keys(catalog)

    def agree() -> None:
        rows = {s.key: item_terms(s.tags, s.prompt_terms) for s in catalog.item_summaries(keys)}
        assert catalog.term_runs(keys).tuples() == [rows.get(k, ()) for k in keys]

    agree()
    assert catalog.term_runs([keys[0]]).tuples() == [item_terms(("red",), prompt_terms("prompt 0"))]
    changed = DumpRecord(id="3", image_path=Path("/dump/3.png"), prompt="red hair, cat")
    assert catalog.update_metadata("3", changed)
    assert catalog.term_runs([catalog.key_for_id("3")]).tuples() == [("cat", "red hair")]
    catalog.delete(["4"])
    assert catalog.term_runs([keys[4]]).tuples() == [()]
    items, vectors = make_items(28, 5, np.random.default_rng(1))  # two replaced, three new
    catalog.add(items, vectors)
    keys = _all_keys(catalog)
    agree()


def test_a_reopened_catalog_reads_its_terms_from_the_file(
    catalog: Catalog, monkeypatch: pytest.MonkeyPatch
) -> None:
    keys = _all_keys(catalog)
    catalog.update_metadata("3", DumpRecord(id="3", image_path=Path("/dump/3.png"), prompt="cat"))
    catalog.checkpoint()
    before = catalog.term_runs(keys).tuples()
    catalog.close()

    def no_rebuild(*args: object, **kwargs: object) -> TermColumn:
        raise AssertionError("the terms were read from SQLite again")

    monkeypatch.setattr(TermColumn, "from_rows", no_rebuild)
    reopened = Catalog.open(catalog.path)
    assert reopened.term_runs(keys).tuples() == before and not reopened.terms.dirty
    reopened.close()


def test_terms_a_crash_left_behind_are_rebuilt_from_sqlite(catalog: Catalog) -> None:
    keys = _all_keys(catalog)
    before = catalog.term_runs(keys).tuples()
    path = catalog.path
    catalog.close()
    saved = (path / TERMS_FILE).read_bytes()
    # A write committed after the last checkpoint: the file is a generation behind.
    with sqlite3.connect(path / DATABASE) as conn:
        conn.execute("UPDATE items SET tags = '[\"Fresh\"]' WHERE id = '3'")
        conn.execute("UPDATE state SET value = value + 1 WHERE name = 'generation'")
    reopened = Catalog.open(path)
    key3 = reopened.key_for_id("3")
    assert reopened.term_runs([key3]).tuples() == [("fresh", "prompt")]
    assert (path / TERMS_FILE).read_bytes() != saved  # and written again at the open
    reopened.close()
    (path / TERMS_FILE).write_bytes(saved[:100])  # a damaged file: rebuilt as well
    reopened = Catalog.open(path)
    assert reopened.term_runs(keys).tuples() == [
        ("fresh", "prompt") if k == key3 else t for k, t in zip(keys, before, strict=True)
    ]
    reopened.close()


def test_a_catalog_in_a_read_only_directory_still_opens(
    catalog: Catalog, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An upgraded catalog gains its terms file at its first open; where that cannot be
    written, the rebuilt column serves from memory."""
    keys = _all_keys(catalog)
    before = catalog.term_runs(keys).tuples()
    path = catalog.path
    catalog.close()
    (path / TERMS_FILE).unlink()  # as written by a lookalike without the term column

    def refused(*args: object, **kwargs: object) -> None:
        raise PermissionError(13, "Permission denied", str(path / TERMS_FILE))

    monkeypatch.setattr("indexer.term_column.atomic_write", refused)
    reopened = Catalog.open(path)
    assert reopened.term_runs(keys).tuples() == before and reopened.terms.dirty
    reopened.close()


def test_reads_during_saves_and_writes_always_see_the_latest_terms(tmp_path: Path) -> None:
    """A server reads the column while a generation thread writes and checkpoints it: no read
    may see a key's terms from before a write it follows, or a half-swapped snapshot."""
    import threading
    import time

    column = TermColumn.from_rows((k, (f"t{k}",)) for k in range(200))
    column.save(tmp_path / "terms.bin", (0, 1))
    version = [0] * 200  # the last version written of each key (the writer's record)
    stop, failures, passes = threading.Event(), [], [0]

    def write_and_save() -> None:
        for step in range(1, 30):
            for key in range(step % 7, 200, 7):
                column.set(key, (f"t{key}", f"v{step}"))
                version[key] = step
            column.save(tmp_path / "terms.bin", (step, 1))
        stop.set()

    def read() -> None:
        while not stop.is_set():
            wanted = list(range(200))
            before = list(version)
            got = column.get(wanted)
            for key, terms in zip(wanted, got, strict=True):
                seen = int(terms[1][1:]) if len(terms) > 1 else 0
                if terms[0] != f"t{key}" or seen < before[key]:
                    failures.append((key, terms, before[key]))
            passes[0] += 1
            time.sleep(0.0005)  # let the writer run: a reader spinning on the GIL starved it

    writer, reader = threading.Thread(target=write_and_save), threading.Thread(target=read)
    reader.start()
    writer.start()
    writer.join()
    reader.join()
    assert not failures, failures[:3]
    assert passes[0] > 10, passes  # the reads overlapped the writes
    assert column.get([1])[0] == ("t1", "v29")
