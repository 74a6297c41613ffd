"""Partial catalogs -> one catalog: ``lookalike merge PART ... --catalog DIR``.

``lookalike index DUMP --shard I/N`` indexes a deterministic 1/N of a dump into a catalog of its
own. Merging the N parts gives what one run over the whole dump gives, id for id (item keys
aside). The one thing a shard cannot know is a duplicate whose first copy in dump order fell in
another shard: each part then stores its copy as an item. Every indexing run records each id's
position in the dump's order, so the merge keeps, of the same bytes, the copy a single run met
first, and makes the other copies (and their aliases) aliases of it.

Three streaming passes over the parts' rows (and the target's, when it exists); memory holds a
batch of vectors and the few decisions that differ from what the parts already record:

1. by id: the same id with other bytes in two parts is refused; a target id whose bytes a part
   changes is noted, so its old bytes no longer count;
2. by content hash: bytes held by more than one id keep the id first in dump order (the target's
   own items without a position come first, as in an incremental run);
3. writes, a batch per transaction: items with vectors, alignment rows and positions; aliases;
   deletion of the target's items that became aliases; skipped files; feedback.

A rerun makes the same plan and rewrites only what differs, so an interrupted merge completes.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import shutil
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from tqdm import tqdm

from indexer.build import recorded_specs
from indexer.catalog import Catalog, CatalogItem, NewItem
from indexer.encoders.base import EncoderSpec
from indexer.errors import CatalogError, MergeError
from indexer.records import DumpRecord
from indexer.storage import atomic_write
from indexer.vector_store import StoreConfig

log = logging.getLogger(__name__)

BATCH = 1000  # items (with their vectors) read and written per transaction
CHECKPOINT_SECONDS = 60.0

# (id, content hash, dump position or None, id of the item an alias stands for or None, source)
Entry = tuple[str, str, int | None, str | None, str]
_T = TypeVar("_T")


@dataclass
class MergeReport:
    """Counts for the one-line summary at the end of a merge."""

    parts: int = 0
    items: int = 0  # items written into the target (new or changed)
    unchanged: int = 0  # items the target already held as they are
    duplicates: int = 0  # aliases written
    across_parts: int = 0  # items of a part that are duplicates of another part's item
    skipped: Counter[str] = field(default_factory=Counter)
    feedback: int = 0  # feedback events new to the target
    elapsed_s: float = 0.0

    @property
    def items_per_s(self) -> float:
        done = self.items + self.unchanged
        return done / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def summary(self) -> str:
        skipped = sum(self.skipped.values())
        reasons = ", ".join(f"{r} {n}" for r, n in self.skipped.most_common())
        return (
            f"merged {self.parts} part{'' if self.parts == 1 else 's'}: items {self.items}, "
            f"unchanged {self.unchanged}, "
            f"duplicates {self.duplicates} ({self.across_parts} across parts), "
            f"skipped {skipped}{f' ({reasons})' if reasons else ''}, "
            f"feedback {self.feedback}, {self.elapsed_s:.1f} s, {self.items_per_s:.1f} items/s"
        )

    def to_json(self) -> dict[str, object]:
        return {
            "parts": self.parts,
            "items": self.items,
            "unchanged": self.unchanged,
            "duplicates": self.duplicates,
            "across_parts": self.across_parts,
            "skipped": dict(self.skipped),
            "feedback": self.feedback,
            "elapsed_s": round(self.elapsed_s, 3),
            "items_per_s": round(self.items_per_s, 2),
        }


@dataclass
class _Plan:
    """What the passes over ids and hashes decided.

    ``alias_of[id]`` is the id it ends up an alias of, kept only where that differs from what a
    part or the target records (``alias_of[id] == id``: an item, though some source has it as an
    alias). ``stale`` holds target ids whose bytes a part replaces."""

    alias_of: dict[str, str] = field(default_factory=dict)
    stale: set[str] = field(default_factory=set)
    part_entries: int = 0

    def final(self, item_id: str, recorded: str | None) -> str:
        """The id ``item_id`` ends up an alias of (itself: it is an item)."""
        return self.alias_of.get(item_id, recorded or item_id)


def merge_catalogs(
    parts: Sequence[Path], target: Path, *, progress: bool, store: StoreConfig | None = None
) -> MergeReport:
    """Merge the catalogs ``parts`` into ``target`` (created when absent, with the vector
    store ``store`` or FAISS; else upserted by id).

    Raises MergeError when a part is not a catalog, the encoders differ, the target is one of
    the parts, or two parts hold the same id with different bytes."""
    started = time.monotonic()
    specs = _check_parts(parts, target)
    sources: list[Catalog] = []
    merged: Catalog | None = None
    try:
        for part in parts:
            sources.append(Catalog.open_rows(part))
        if recorded_specs(target) is not None:
            merged = Catalog.open(target, expected=specs)
        plan = _plan(sources, merged, progress)
        # Created only now: a refused merge leaves no empty catalog behind.
        merged = merged or Catalog.create_or_open(target, specs, store=store)
        report = MergeReport(parts=len(parts))
        _write(sources, merged, plan, report, progress)
    finally:
        for source in sources:
            source.close()
        if merged is not None:
            merged.close()
    report.elapsed_s = time.monotonic() - started
    return report


# -- checks ------------------------------------------------------------------------------------


def _check_parts(parts: Sequence[Path], target: Path) -> dict[str, EncoderSpec]:
    """Refuse what cannot be merged; the encoder specs the parts share."""
    if not parts:
        raise MergeError("Nothing to merge: name at least one partial catalog.")
    where = target.resolve()
    seen: set[Path] = set()
    encoders: dict[str, Any] | None = None
    for part in parts:
        resolved = part.resolve()
        if resolved == where:
            raise MergeError(
                f"The target {target} is also one of the parts: merge into another --catalog."
            )
        if resolved in seen:
            raise MergeError(f"{part} is named twice.")
        seen.add(resolved)
        try:
            manifest = Catalog.read_manifest(part)
        except CatalogError as exc:
            raise MergeError(f"Cannot merge {part}: {exc}") from exc
        if encoders is None:
            encoders = manifest["encoders"]
        elif manifest["encoders"] != encoders:
            raise MergeError(
                f"{part} was built with other encoders than {parts[0]}:\n"
                + _encoder_difference(encoders, manifest["encoders"])
            )
    assert encoders is not None
    if recorded_specs(target) is not None:
        own = Catalog.read_manifest(target)["encoders"]
        if own != encoders:
            raise MergeError(
                f"The target {target} was built with other encoders than the parts:\n"
                + _encoder_difference(encoders, own)
            )
    specs = recorded_specs(parts[0])
    assert specs is not None
    return dict(specs)


def _encoder_difference(first: dict[str, Any], other: dict[str, Any]) -> str:
    lines = []
    for space in sorted(set(first) | set(other)):
        a, b = first.get(space), other.get(space)
        if a != b:
            lines.append(f"  {space}: {_describe(a)} vs {_describe(b)}")
    return "\n".join(lines)


def _describe(entry: dict[str, Any] | None) -> str:
    if entry is None:
        return "no such space"
    return f"{entry['name']} ({entry['model']}@{entry['revision']}, dim {entry['dim']})"


# -- planning ----------------------------------------------------------------------------------


def _plan(parts: Sequence[Catalog], target: Catalog | None, progress: bool) -> _Plan:
    """Passes 1 and 2 over the parts and ``target`` (None: a new catalog)."""
    plan = _Plan()
    total = sum(_entry_count(c) for c in (*parts, *([target] if target else [])))
    with tqdm(
        total=2 * total, unit="id", desc="planning", disable=not progress, dynamic_ncols=True
    ) as bar:
        _check_ids(parts, target, plan, bar)
        _choose_copies(parts, target, plan, bar)
    return plan


def _entry_count(catalog: Catalog) -> int:
    return len(catalog) + int(catalog.info()["duplicates"])


def _tagged(streams: Iterable[Iterable[Entry]], key: int) -> Iterator[tuple[Entry, int]]:
    """One stream of (entry, source index) sorted on ``entry[key]`` (the id or the content
    hash), from streams sorted on it."""
    tagged = [_tag(stream, i) for i, stream in enumerate(streams)]
    return heapq.merge(*tagged, key=lambda pair: str(pair[0][key]))


def _tag(stream: Iterable[Entry], index: int) -> Iterator[tuple[Entry, int]]:
    for entry in stream:
        yield entry, index


def _by_id(catalog: Catalog) -> Iterable[Entry]:
    items = catalog.iter_entries_by_id(aliases=False, batch=BATCH)
    aliases = catalog.iter_entries_by_id(aliases=True, batch=BATCH)
    return heapq.merge(items, aliases, key=lambda entry: entry[0])


def _check_ids(
    parts: Sequence[Catalog], target: Catalog | None, plan: _Plan, bar: tqdm[Any]
) -> None:
    """Pass 1: refuse ids with different bytes in two parts, or parts without dump positions;
    note the target ids whose bytes a part replaces."""
    conflicts: list[str] = []
    conflict_count = 0
    unplaced: Counter[int] = Counter()
    target_index = len(parts)
    streams = [_by_id(c) for c in (*parts, *([target] if target else []))]
    for item_id, group in itertools.groupby(_tagged(streams, key=0), key=lambda p: p[0][0]):
        in_parts: dict[int, str] = {}
        in_target: set[str] = set()
        for (_, content_hash, position, _, source), index in group:
            bar.update()
            if index == target_index:
                in_target.add(content_hash)
                continue
            in_parts[index] = content_hash
            if position is None and source == "dump":
                unplaced[index] += 1
        hashes = set(in_parts.values())
        if len(hashes) > 1:
            conflict_count += 1
            if len(conflicts) < 5:
                held = ", ".join(f"{parts[i].path} {h[:12]}" for i, h in in_parts.items())
                conflicts.append(f"  id {item_id}: {held}")
        elif hashes and in_target - hashes:
            plan.stale.add(item_id)
        plan.part_entries += len(in_parts)
    if conflict_count:
        raise MergeError(
            f"{conflict_count} ids have different image bytes in different parts "
            "(were they indexed from the same dump?):\n" + "\n".join(conflicts)
        )
    for index, count in unplaced.items():
        path = parts[index].path
        raise MergeError(
            f"{path} has no dump positions for {count} ids (it was indexed by an older "
            f"lookalike). Run `lookalike index DUMP --shard I/N --catalog {path}` again (it "
            "re-encodes nothing unchanged), then merge."
        )


def _choose_copies(
    parts: Sequence[Catalog], target: Catalog | None, plan: _Plan, bar: tqdm[Any]
) -> None:
    """Pass 2: of the ids holding the same bytes, keep the one first in dump order."""
    target_index = len(parts)

    def target_entries(target: Catalog) -> Iterator[Entry]:
        for entry in target.iter_entries_by_hash(batch=BATCH):
            bar.update()
            if entry[0] not in plan.stale:  # its bytes here are about to be replaced
                yield entry

    def part_entries(part: Catalog) -> Iterator[Entry]:
        for entry in part.iter_entries_by_hash(batch=BATCH):
            bar.update()
            yield entry

    streams = [part_entries(p) for p in parts]
    if target is not None:
        streams.append(target_entries(target))
    for _, group in itertools.groupby(_tagged(streams, key=1), key=lambda p: p[0][1]):
        entries = list(group)
        if len(entries) > 1:
            _decide(entries, target_index, plan)


def _decide(entries: list[tuple[Entry, int]], target_index: int, plan: _Plan) -> None:
    """Choose which of the ids holding the same bytes is the item; the others alias it."""
    from_parts = {entry[0] for entry, index in entries if index != target_index}

    def rank(pair: tuple[Entry, int]) -> tuple[int, int, str]:
        (item_id, _, position, _, _), index = pair
        if position is not None:
            return (0, position, item_id)
        # Without a position: the target's own item came first (as in an incremental run);
        # a part's came after the dump (a generated image).
        return (-1 if index == target_index else 1, 0, item_id)

    candidates = [
        pair
        for pair in entries
        if pair[0][3] is None and not (pair[1] == target_index and pair[0][0] in from_parts)
    ]
    if not candidates:
        return
    winner = min(candidates, key=rank)[0][0]
    for (item_id, _, _, alias_of, _), _ in entries:
        if item_id == winner:
            if alias_of is not None:
                plan.alias_of[item_id] = item_id
        elif alias_of != winner:
            plan.alias_of[item_id] = winner


# -- writing -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Alias:
    id: str
    of: str  # the item id it stands for
    file: str
    size: int
    mtime_ns: int
    position: int | None


def _write(
    parts: Sequence[Catalog], target: Catalog, plan: _Plan, report: MergeReport, progress: bool
) -> None:
    with tqdm(
        total=plan.part_entries,
        unit="id",
        desc="merging",
        disable=not progress,
        dynamic_ncols=True,
    ) as bar:
        demoted: list[_Alias] = []
        last_checkpoint = time.monotonic()
        for part in parts:
            for batch in _batched(part.iter_items(BATCH), BATCH):
                demoted += _write_items(part, target, batch, plan, report)
                bar.update(len(batch))
                if time.monotonic() - last_checkpoint > CHECKPOINT_SECONDS:
                    target.checkpoint()
                    last_checkpoint = time.monotonic()
        report.across_parts = len(demoted)
        written: set[str] = set()  # ids with a decision that a part's row already wrote
        from_parts = itertools.chain(demoted, *(_part_aliases(p, plan, bar) for p in parts))
        aliases = itertools.chain(
            _noting(from_parts, plan, written), _target_fixes(target, plan, written)
        )
        became_aliases: dict[str, None] = {}  # target items now aliases, once each
        for rows in _batched(aliases, BATCH):
            became_aliases.update(dict.fromkeys(_write_aliases(target, rows)))
            report.duplicates += len(rows)
        # Last: deleting an item drops its aliases, and by now they all point elsewhere.
        for ids in _batched(became_aliases, BATCH):
            target.delete(ids)
    for part in parts:
        for file, reason, detail, size, mtime_ns in part.skipped_files():
            target.record_skip(file, reason, detail, size, mtime_ns)
            report.skipped[reason] += 1
        for events in _batched(part.iter_feedback(), BATCH):
            report.feedback += target.import_feedback(events)
    target.checkpoint()


def _write_items(
    part: Catalog, target: Catalog, batch: list[CatalogItem], plan: _Plan, report: MergeReport
) -> list[_Alias]:
    """Write the items of ``batch`` that stay items; return the ones that became aliases."""
    files = part.item_files([item.key for item in batch])
    positions = part.dump_positions([item.id for item in batch])
    kept: list[CatalogItem] = []
    demoted: list[_Alias] = []
    for item in batch:
        winner = plan.final(item.id, None)
        if winner == item.id:
            kept.append(item)
        else:
            demoted.append(_Alias(item.id, winner, *files[item.key], positions.get(item.id)))
    if not kept:
        return demoted
    target_keys: dict[str, int] = {}
    for item in kept:
        key = target.key_for_id(item.id, follow_aliases=False)
        if key is not None:
            target_keys[item.id] = key
    held = {i.id: i for i in target.items(list(target_keys.values()))}
    held_files = target.item_files(list(target_keys.values()))
    changed = [
        item
        for item in kept
        if item.id not in held
        or _facts(held[item.id], held_files[held[item.id].key]) != _facts(item, files[item.key])
    ]
    report.items += len(changed)
    report.unchanged += len(kept) - len(changed)
    if changed:
        for item in changed:
            _copy_owned_file(part, target, files[item.key])
        vectors = {
            space: part.stored_vectors(space, [item.key for item in changed])
            for space in part.spaces
        }
        news = [_new_item(item, files[item.key]) for item in changed]
        keys = target.add(news, vectors)
        target_keys.update((item.id, int(k)) for item, k in zip(changed, keys, strict=True))
    _copy_alignment(part, target, kept, target_keys)
    target.record_dump_positions([(i.id, positions[i.id]) for i in kept if i.id in positions])
    return demoted


def _facts(item: CatalogItem, file: tuple[str, int, int]) -> tuple[Any, ...]:
    """What must match for two copies of an item to be the same (not its key)."""
    return (
        item.id,
        file,
        item.content_hash,
        item.width,
        item.height,
        item.prompt,
        item.negative_prompt,
        item.tags,
        item.nsfw_level,
        item.base_model,
        item.model_name,
        item.created_at,
        item.username,
        item.url,
        item.stats,
        item.meta,
        item.source,
    )


def _new_item(item: CatalogItem, file: tuple[str, int, int]) -> NewItem:
    path, size, mtime_ns = file
    record = DumpRecord(
        id=item.id,
        image_path=Path(path),
        url=item.url,
        prompt=item.prompt,
        negative_prompt=item.negative_prompt,
        tags=item.tags,
        nsfw_level=item.nsfw_level,
        base_model=item.base_model,
        model_name=item.model_name,
        created_at=item.created_at,
        username=item.username,
        stats=item.stats,
        meta=item.meta,
    )
    return NewItem(
        record=record,
        file=path,
        content_hash=item.content_hash,
        file_size=size,
        file_mtime_ns=mtime_ns,
        width=item.width or 0,
        height=item.height or 0,
        source=item.source,
    )


def _copy_owned_file(part: Catalog, target: Catalog, file: tuple[str, int, int]) -> None:
    """Copy an image the part owns (a generated one, stored under the part's directory)."""
    relative = Path(file[0])
    if relative.is_absolute():
        return  # a dump file: the user's, where it is
    source, destination = part.path / relative, target.path / relative
    if destination.exists() and destination.stat().st_size == file[1]:
        return
    if not source.exists():
        log.warning("%s is missing; %s keeps an item without its image", source, target.path)
        return
    atomic_write(destination, lambda tmp: shutil.copy2(source, tmp))


def _copy_alignment(
    part: Catalog, target: Catalog, items: list[CatalogItem], target_keys: dict[str, int]
) -> None:
    rows = part.alignment_rows([item.key for item in items])
    if not rows:
        return
    have = target.alignment_rows(list(target_keys.values()))
    keys: list[int] = []
    scores: list[float] = []
    for item in items:
        if item.key in rows:
            key, score = target_keys[item.id], rows[item.key]
            if key not in have or have[key] != score:
                keys.append(key)
                scores.append(np.nan if score is None else score)
    if keys:
        target.set_alignment(keys, scores)


def _part_aliases(part: Catalog, plan: _Plan, bar: tqdm[Any]) -> Iterator[_Alias]:
    for batch in _batched(part.iter_duplicates(BATCH), BATCH):
        positions = part.dump_positions([row[0] for row in batch])
        for alias_id, item_id, file, size, mtime_ns in batch:
            winner = plan.final(alias_id, item_id)
            if winner != alias_id:
                yield _Alias(alias_id, winner, file, size, mtime_ns, positions.get(alias_id))
        bar.update(len(batch))


def _noting(aliases: Iterable[_Alias], plan: _Plan, written: set[str]) -> Iterator[_Alias]:
    for alias in aliases:
        if alias.id in plan.alias_of:
            written.add(alias.id)
        yield alias


def _target_fixes(target: Catalog, plan: _Plan, written: set[str]) -> Iterator[_Alias]:
    """The target's own items and aliases that now stand for another item (a merge into a
    catalog that already held some of these bytes), unless a part's row said so already."""
    wanted = {i: w for i, w in plan.alias_of.items() if i != w and i not in written}
    if not wanted:
        return
    for item_id, winner in wanted.items():
        key = target.key_for_id(item_id, follow_aliases=False)
        if key is not None:
            yield _Alias(item_id, winner, *target.item_files([key])[key], None)
    for alias_id, item_id, file, size, mtime_ns in target.iter_duplicates(BATCH):
        now = wanted.get(alias_id)
        if now is not None and now != item_id:
            yield _Alias(alias_id, now, file, size, mtime_ns, None)


def _write_aliases(target: Catalog, batch: list[_Alias]) -> list[str]:
    """Record ``batch`` as aliases; return those that are items of the target (to delete)."""
    keys: dict[str, int] = {}
    for winner in {alias.of for alias in batch}:
        key = target.key_for_id(winner, follow_aliases=False)
        if key is None:
            raise CatalogError(f"merge: {winner} should be an item of {target.path} by now")
        keys[winner] = key
    target.add_duplicates([(a.id, keys[a.of], a.file, a.size, a.mtime_ns) for a in batch])
    target.record_dump_positions([(a.id, a.position) for a in batch if a.position is not None])
    return [a.id for a in batch if target.key_for_id(a.id, follow_aliases=False) is not None]


def _batched(iterable: Iterable[_T], size: int) -> Iterator[list[_T]]:
    iterator = iter(iterable)
    while batch := list(itertools.islice(iterator, size)):
        yield batch
