"""Readers for the dump formats of ARCHITECTURE §3, detected automatically.

``iter_dump(root)`` walks the dump once with ``os.scandir``, depth first, every directory's
entries in sorted order, and yields a ``DumpRecord`` per image or a ``SkippedEntry`` saying
why something was left out. Within a directory it reads, in this order:

1. JSON documents (``.json``, ``.jsonl``, ``.ndjson``): civitai API pages
   ``{"items": [...]}``, lists / JSONL of items, flat records ``{"image_id", ...}``.
   An item's image is looked up by id (``<id>.<ext>``), then by the URL's file name
   (a scheme-less URL is a path relative to the JSON), next to the JSON and in the
   ``images/`` folder beside it; failing that, the same in the ``images/`` folder of each
   directory above it up to the root, nearest first (``pages/*.json`` or
   ``metadata/<id>.json`` beside ``images/``). An ``images/`` folder's bare pass (3.) waits
   until its parent's whole subtree was walked, so that JSON anywhere below that parent
   claims its images first. A file already claimed by another record is ``duplicate_id``.
2. Sidecars: ``X.json`` holding one item next to an image ``X.<ext>``; id defaults to ``X``
   (as it does for a one-item ``X.json`` with no image beside it, ``metadata/123.json``).
   gallery-dl's ``X.<ext>.json`` holds its civitai item nested (``_from_gallery_dl``).
   They come after the documents above, so an image an API page claims stays claimed.
3. Bare images nobody claimed: id is the path relative to the root without extension,
   prompt from ``read_embedded_metadata``.

The first record of an id wins; later ones are skipped as ``duplicate_id``. Hidden entries
(a name starting with ``.``) are ignored, and so are files lookalike writes beside a dump
itself (``RESERVED_FILENAMES``: the sample dump's ground truth ``truth.jsonl``).

Nothing outside the root is read: ``..`` and absolute references, and symlinks whose
target leaves the root, are skipped as ``outside_root``; symlinked directories are never
descended into (those inside the root are reachable anyway).

Skip reasons: ``missing_image``, ``bad_json``, ``unknown_json``, ``bad_item``,
``duplicate_id``, ``outside_root``, ``unreadable``, ``unsupported_format``.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from operator import attrgetter
from pathlib import Path
from typing import Any, Final
from urllib.parse import unquote, urlsplit

import orjson

from indexer.errors import DumpError
from indexer.images import IMAGE_EXTENSIONS, read_embedded_metadata
from indexer.records import DumpRecord, SkippedEntry, nsfw_level_from_any

logger = logging.getLogger(__name__)

FORMAT_API: Final = "civitai-api"
FORMAT_SIDECAR: Final = "sidecar"
FORMAT_FLAT: Final = "flat"
FORMAT_BARE: Final = "bare"
FORMAT_MIXED: Final = "mixed"
FORMAT_EMPTY: Final = "empty"

GROUND_TRUTH_FILENAME: Final = "truth.jsonl"
RESERVED_FILENAMES: Final = frozenset({GROUND_TRUTH_FILENAME})
"""File names never read as dump data, wherever they are: lookalike's own files."""

JSON_EXTENSIONS: Final = frozenset({".json", ".jsonl", ".ndjson"})
_JSONL_EXTENSIONS: Final = frozenset({".jsonl", ".ndjson"})
# Image and video files we recognise but cannot index: reported rather than silently ignored
# (civitai posts videos too).
_OTHER_MEDIA_EXTENSIONS: Final = frozenset(
    {".bmp", ".tif", ".tiff", ".svg", ".avif", ".heic", ".heif", ".jxl", ".ico", ".jp2"}
    | {".mp4", ".webm", ".mov", ".mkv", ".m4v", ".avi"}
)
_IMAGES_DIR: Final = "images"
_ITEM_KEYS: Final = frozenset(
    {"id", "url", "meta", "nsfw", "nsfwLevel", "browsingLevel", "tags", "baseModel", "prompt"}
)
_FLAT_KEY: Final = "image_id"

Entry = DumpRecord | SkippedEntry


@dataclass
class _Listing:
    """One directory's entries, indexed once so that look-ups never touch the disk.

    Paths are plain strings here (millions of ``Path`` objects cost real time).
    ``images`` and ``json_files`` map a file name to the path to read (the real target
    for an in-root symlink) or to None for a symlink whose target leaves the root.
    """

    path: str
    rel: str
    images: dict[str, str | None] = field(default_factory=dict)
    by_stem: dict[str, str] = field(default_factory=dict)
    shared_stems: set[str] = field(default_factory=set)  # "x" where x.gif and x.webp are here
    json_files: dict[str, str | None] = field(default_factory=dict)
    other_media: list[str] = field(default_factory=list)  # image and video files not indexable
    other_by_stem: dict[str, str] = field(default_factory=dict)
    subdirs: list[str] = field(default_factory=list)
    escaped: list[str] = field(default_factory=list)

    def rel_of(self, name: str) -> str:
        return f"{self.rel}/{name}" if self.rel else name

    def bare_id_of(self, name: str) -> str:
        """The id the image ``name`` gets as a bare image: its path under the dump root
        without the extension, or with it where another image here shares its stem (x.gif
        beside x.webp), so that no file's id depends on which one was read first."""
        rel = self.rel_of(name)
        return rel if _stem(name) in self.shared_stems else self.rel_of(_stem(name))

    def path_of(self, name: str) -> str:
        return os.path.join(self.path, name)


@dataclass(frozen=True)
class _Found:
    directory: str
    name: str
    path: str
    bare_id: str  # the id the image gets when indexed bare


def iter_dump(root: Path) -> Iterator[DumpRecord | SkippedEntry]:
    """Yield every image of the dump under ``root`` as a ``DumpRecord``, or a ``SkippedEntry``.

    Order is deterministic (sorted names, depth first). Records carry ids as strings,
    normalised tags and prompts, and an absolute ``image_path`` inside the root.
    Raises ``DumpError`` when ``root`` is not a readable directory.
    """
    return _DumpWalker(_checked_root(root)).walk()


def detect_format(root: Path, sample: int = 64) -> str:
    """Name the dump format under ``root`` for a summary line.

    Returns ``civitai-api``, ``sidecar``, ``flat``, ``bare``, ``mixed`` (more than one) or
    ``empty``. Lists every directory but parses at most ``sample`` JSON files (a JSONL file
    by its first line), so the answer for a large dump is an estimate from its first files.
    """
    return _FormatSniffer(_checked_root(root), sample).detect()


def normalise_prompt(value: Any) -> str | None:
    """Return the prompt with runs of whitespace collapsed to one space, or None if empty."""
    if not isinstance(value, str):
        return None
    return " ".join(value.split()) or None


def normalise_tags(value: Any) -> tuple[str, ...]:
    """Return tags lower-cased, stripped and de-duplicated in their original order.

    Accepts ``[{"id", "name"}]``, a list of strings, or one comma-separated string.
    """
    if isinstance(value, str):
        raw: Iterable[Any] = value.split(",")
    elif isinstance(value, list):
        raw = value
    else:
        return ()
    tags: dict[str, None] = {}
    for tag in raw:
        name = tag.get("name") if isinstance(tag, dict) else tag
        if isinstance(name, str):
            text = " ".join(name.lower().split())
            if text:
                tags.setdefault(text, None)
    return tuple(tags)


def _checked_root(root: Path) -> Path:
    try:
        resolved = Path(root).resolve(strict=True)
    except OSError as exc:
        raise DumpError(f"dump root {root} does not exist or cannot be read: {exc}") from exc
    if not resolved.is_dir():
        raise DumpError(f"dump root {root} is not a directory")
    return resolved


def _scan(directory: str, rel: str, root: str) -> _Listing:
    """List one directory (one ``os.scandir``) into a ``_Listing``; raises ``OSError``."""
    listing = _Listing(directory, rel)
    with os.scandir(directory) as entries:
        ordered = sorted(entries, key=attrgetter("name"))
    for entry in ordered:
        if entry.name.startswith(".") or entry.name in RESERVED_FILENAMES:
            continue
        if entry.is_symlink():
            _add_symlink(listing, entry.name, entry.path, root)
        elif entry.is_dir(follow_symlinks=False):
            listing.subdirs.append(entry.name)
        elif entry.is_file(follow_symlinks=False):  # never a FIFO or device: reads could hang
            _add_file(listing, entry.name, entry.path)
    return listing


def _extension(name: str) -> str:
    dot = name.rfind(".")
    return name[dot:].lower() if dot > 0 else ""


def _stem(name: str) -> str:
    """``name`` without its extension (as ``_extension`` sees it)."""
    dot = name.rfind(".")
    return name[:dot] if dot > 0 else name


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def _add_symlink(listing: _Listing, name: str, path: str, root: str) -> None:
    """Index a symlink by its real target; one leaving the root is kept as a None entry."""
    real = os.path.realpath(path)
    if not _inside(real, root):
        ext = _extension(name)
        if ext in IMAGE_EXTENSIONS:
            _add_image(listing, name, None)
        elif ext in JSON_EXTENSIONS:
            listing.json_files[name] = None
        else:
            listing.escaped.append(name)
    elif os.path.isdir(real):
        logger.debug("not following symlinked directory %s", listing.rel_of(name))
    elif os.path.isfile(real):
        _add_file(listing, name, real)


def _add_file(listing: _Listing, name: str, path: str) -> None:
    ext = _extension(name)
    if ext in IMAGE_EXTENSIONS:
        _add_image(listing, name, path)
    elif ext in JSON_EXTENSIONS:
        listing.json_files[name] = path
    elif ext in _OTHER_MEDIA_EXTENSIONS:
        listing.other_media.append(name)
        listing.other_by_stem.setdefault(_stem(name), name)


def _add_image(listing: _Listing, name: str, path: str | None) -> None:
    listing.images[name] = path
    stem = _stem(name)
    if listing.by_stem.setdefault(stem, name) != name:
        listing.shared_stems.add(stem)
    # gallery-dl names an image's metadata after the whole file name: 123.jpeg.json
    listing.by_stem.setdefault(name, name)


class _DumpWalker:
    """One pass over a dump; holds the ids seen and the images claimed so far."""

    def __init__(self, root: Path) -> None:
        self.root = str(root)
        self.seen_ids: set[str] = set()
        # Claimed image names per directory; popped once that directory's bare pass ran.
        self.claimed: dict[str, set[str]] = {}
        # Listings scanned ahead (an images/ folder a JSON looked into); popped when walked.
        self.listings: dict[str, _Listing] = {}
        # The images/ folder (path, rel) of each directory on the walk's current path that has
        # one: JSON anywhere below that directory looks there. Dropped once it was walked.
        self.images_of: dict[str, tuple[str, str]] = {}
        # images/ folders walked whose bare pass waits for the end of their parent's subtree.
        self.waiting: dict[str, _Listing | None] = {}
        self.unlistable: set[str] = set()  # directories a look-up could not list

    def walk(self) -> Iterator[Entry]:
        # A plain string on the stack marks the end of a subtree: its images/ folder's bare pass.
        stack: list[tuple[str, str] | str] = [(self.root, "")]
        while stack:
            top = stack.pop()
            if isinstance(top, str):
                yield from self._waited_images(top)
                continue
            directory, rel = top
            try:
                listing = self.listings.pop(directory, None) or _scan(directory, rel, self.root)
            except OSError as exc:
                if directory == self.root:
                    raise DumpError(f"cannot list dump root {directory}: {exc}") from exc
                yield SkippedEntry(rel, "unreadable", str(exc))
                continue
            if _IMAGES_DIR in listing.subdirs:
                images = listing.path_of(_IMAGES_DIR)
                self.images_of[directory] = (images, listing.rel_of(_IMAGES_DIR))
                self.waiting[images] = None
                stack.append(directory)  # popped after every directory below this one
            yield from self._directory(listing)
            for name in reversed(listing.subdirs):
                stack.append((listing.path_of(name), listing.rel_of(name)))

    def _directory(self, listing: _Listing) -> Iterator[Entry]:
        for name in listing.escaped:
            yield SkippedEntry(listing.rel_of(name), "outside_root", "symlink leaves the dump")
        documents = [n for n in listing.json_files if not _is_sidecar_name(listing, n)]
        sidecars = [n for n in listing.json_files if _is_sidecar_name(listing, n)]
        for name in documents + sidecars:
            yield from self._json_file(listing, name)
        if listing.path in self.waiting:
            self.waiting[listing.path] = listing
        else:
            yield from self._bare_images(listing)

    def _waited_images(self, parent: str) -> Iterator[Entry]:
        """The bare pass of ``parent``'s images/ folder, now that all JSON below ``parent``
        (which may claim its images) was read."""
        images, _ = self.images_of.pop(parent)
        listing = self.waiting.pop(images)
        if listing is not None:  # None: it could not be listed (reported when walked)
            yield from self._bare_images(listing)

    # ---- JSON ------------------------------------------------------------------------

    def _json_file(self, listing: _Listing, name: str) -> Iterator[Entry]:
        rel = listing.rel_of(name)
        path = listing.json_files[name]
        if path is None:
            yield SkippedEntry(rel, "outside_root", "symlink leaves the dump")
            return
        if _extension(name) in _JSONL_EXTENSIONS:
            yield from self._jsonl_file(listing, rel, path)
            return
        try:
            with open(path, "rb") as handle:
                content = handle.read()
        except OSError as exc:
            yield SkippedEntry(rel, "unreadable", str(exc))
            return
        try:
            document = _loads(content)
        except ValueError as exc:
            if _looks_like_jsonl(content):
                yield from self._jsonl_lines(listing, rel, content.splitlines())
            else:
                yield SkippedEntry(rel, "bad_json", str(exc))
            return
        yield from self._document(listing, rel, document, sidecar_stem=_stem(name))

    def _jsonl_file(self, listing: _Listing, rel: str, path: str) -> Iterator[Entry]:
        try:
            with open(path, "rb") as handle:
                yield from self._jsonl_lines(listing, rel, handle)
        except OSError as exc:
            yield SkippedEntry(rel, "unreadable", str(exc))

    def _jsonl_lines(self, listing: _Listing, rel: str, lines: Iterable[bytes]) -> Iterator[Entry]:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            where = f"{rel}:{number}"
            try:
                document = _loads(line)
            except ValueError as exc:
                yield SkippedEntry(where, "bad_json", str(exc))
                continue
            yield from self._document(listing, where, document, sidecar_stem=None)

    def _document(
        self, listing: _Listing, rel: str, document: Any, *, sidecar_stem: str | None
    ) -> Iterator[Entry]:
        """Yield the entries of one parsed JSON value (page, list, flat record or item)."""
        if isinstance(document, dict) and isinstance(document.get("items"), list):
            items: list[Any] = document["items"]
            sidecar_stem = None
        elif isinstance(document, list):
            items, sidecar_stem = document, None
        elif isinstance(document, dict) and (_FLAT_KEY in document or _is_item(document)):
            items = [document]
        else:
            yield SkippedEntry(rel, "unknown_json", "neither an API page, an item nor a record")
            return
        for index, item in enumerate(items):
            where = rel if len(items) == 1 else f"{rel}#{index}"
            yield self._item(listing, where, item, sidecar_stem)

    def _item(self, listing: _Listing, rel: str, item: Any, sidecar_stem: str | None) -> Entry:
        if not isinstance(item, dict):
            return SkippedEntry(rel, "bad_item", f"an item must be an object, not {type(item)}")
        item = _from_gallery_dl(item)
        sidecar = sidecar_stem if sidecar_stem in listing.by_stem else None
        own_id = _as_id(item.get(_FLAT_KEY, item.get("id")))
        # Without an id of its own: a 123.json sidecar's is its stem (as always); a gallery-dl
        # 123.jpeg.json's, the id its image would have bare (the path, directory included).
        ident: str | None = own_id or sidecar
        if own_id is None and sidecar is not None and sidecar in listing.images:
            ident = listing.bare_id_of(sidecar)
        elif ident is None and sidecar_stem is not None and _is_safe_name(sidecar_stem):
            # metadata/123.json (or 123.jpeg.json), its image 123.jpeg in images/ above
            has_extension = _extension(sidecar_stem) in IMAGE_EXTENSIONS
            ident = _stem(sidecar_stem) if has_extension else sidecar_stem
        if ident is None:
            return SkippedEntry(rel, "bad_item", "the item has no id")
        if ident in self.seen_ids:
            return SkippedEntry(rel, "duplicate_id", f"id {ident} was read before")
        url = item.get("url") if isinstance(item.get("url"), str) else None
        if sidecar is not None:
            found: _Found | str = self._sidecar_image(listing, sidecar)
        else:
            found = self._locate(listing, ident, url)
        if not isinstance(found, str) and found.name in self.claimed.get(found.directory, ()):
            found = "duplicate_id"  # another record (a page, a sidecar) took this file first
        if isinstance(found, str):
            return SkippedEntry(rel, found, f"id {ident}: {_REASON_TEXT[found]}")
        self.seen_ids.add(ident)
        self.claimed.setdefault(found.directory, set()).add(found.name)
        return _record(item, ident, Path(found.path), found.bare_id)

    def _sidecar_image(self, listing: _Listing, stem: str) -> _Found | str:
        name = listing.by_stem[stem]
        path = listing.images[name]
        if path is None:
            return "outside_root"
        return _Found(listing.path, name, path, listing.bare_id_of(name))

    # ---- image look-up ---------------------------------------------------------------

    def _locate(self, listing: _Listing, ident: str, url: str | None) -> _Found | str:
        """Find an item's image by id, then by URL file name, tier by tier (``_image_tiers``);
        a reason code when not found."""
        safe = _is_safe_name(ident)
        searched: list[_Listing] = []
        for places in self._image_tiers(listing):
            searched += places
            found = self._find(listing, places, ident if safe else None, url)
            if found is not None:
                return found
        if not safe:
            return "outside_root"
        return self._unsupported_file(searched, ident, url) or "missing_image"

    def _find(
        self, listing: _Listing, places: list[_Listing], ident: str | None, url: str | None
    ) -> _Found | str | None:
        """The image named ``ident``, else the URL's file, in ``places``; None if neither."""
        if ident is not None:
            for place in places:
                name = place.by_stem.get(ident)
                if name is not None:
                    return _found_or_escaped(place, name)
        if url is not None:
            found = self._locate_url(listing, places, url)
            if found != "missing_image":
                return found
        return None

    def _unsupported_file(self, places: list[_Listing], ident: str, url: str | None) -> str | None:
        """``unsupported_format`` where the item's file is there but not indexable (a video, a
        BMP), claimed so that it is reported once, with its item."""
        stems = [ident]
        if url is not None:
            stems.append(_stem(unquote(urlsplit(url).path.rsplit("/", 1)[-1])))
        for place in places:
            for stem in stems:
                name = place.other_by_stem.get(stem)
                if name is not None:
                    self.claimed.setdefault(place.path, set()).add(name)
                    return "unsupported_format"
        return None

    def _locate_url(self, listing: _Listing, places: list[_Listing], url: str) -> _Found | str:
        parts = urlsplit(url)
        if parts.scheme == "file":
            return "outside_root"
        if parts.scheme == "" and "/" in url.replace("\\", "/").strip("/"):
            return self._locate_relative(listing, url)
        if parts.scheme == "" and url.startswith(("/", "\\")):
            return "outside_root"
        raw = parts.path.rsplit("/", 1)[-1]
        name = unquote(raw)
        if not _is_safe_name(name):
            return "outside_root"
        # Downloaders save a URL's file name decoded ("my image.jpeg") or as it was in the URL
        # ("my%20image.jpeg"): either is the file.
        for candidate in dict.fromkeys((name, raw)):
            for place in places:
                if candidate in place.images:
                    return _found_or_escaped(place, candidate)
        return "missing_image"

    def _locate_relative(self, listing: _Listing, reference: str) -> _Found | str:
        """A scheme-less URL is a path relative to the JSON; never one that leaves the root."""
        pieces = unquote(reference).replace("\\", "/").split("/")
        if reference.startswith(("/", "\\")) or any(p in ("", ".", "..") for p in pieces):
            return "outside_root"
        directory, rel = listing.path, listing.rel
        place: _Listing | None = listing
        for piece in pieces[:-1]:
            if place is None or piece not in place.subdirs:
                return "missing_image"
            directory, rel = os.path.join(directory, piece), f"{rel}/{piece}" if rel else piece
            place = self._listing_of(directory, rel)
        if place is None or pieces[-1] not in place.images:
            return "missing_image"
        return _found_or_escaped(place, pieces[-1])

    def _image_tiers(self, listing: _Listing) -> Iterator[list[_Listing]]:
        """Where a JSON in ``listing`` looks for its items' images, tier by tier: beside it and
        in its own ``images/`` folder; then the ``images/`` folder of each directory above it,
        nearest first. A match by id or URL in a nearer tier wins."""
        own = self._images_folder_of(listing.path, listing)
        yield [listing] if own is None else [listing, own]
        directory = listing.path
        while directory != self.root:
            directory = os.path.dirname(directory)
            folder = self._images_folder_of(directory, listing)
            if folder is not None:
                yield [folder]

    def _images_folder_of(self, directory: str, listing: _Listing) -> _Listing | None:
        """The listing of ``directory``'s images/ folder (when it is not ``listing`` itself)."""
        folder = self.images_of.get(directory)
        if folder is None or folder[0] == listing.path:
            return None
        return self._listing_of(*folder)

    def _listing_of(self, directory: str, rel: str) -> _Listing | None:
        """A directory's listing, scanned once and kept until the walk reaches it (an
        images/ folder's, until its bare pass); None for one that cannot be listed."""
        listing = self.waiting.get(directory) or self.listings.get(directory)
        if listing is None:
            if directory in self.unlistable:
                return None
            try:
                listing = _scan(directory, rel, self.root)
            except OSError:
                self.unlistable.add(directory)  # not tried again for each item
                return None
            self.listings[directory] = listing
        return listing

    # ---- bare images -----------------------------------------------------------------

    def _bare_images(self, listing: _Listing) -> Iterator[Entry]:
        claimed = self.claimed.pop(listing.path, set())
        for name, path in listing.images.items():
            if name in claimed:
                continue
            rel = listing.rel_of(name)
            if path is None:
                yield SkippedEntry(rel, "outside_root", "symlink leaves the dump")
                continue
            ident = listing.bare_id_of(name)
            if ident in self.seen_ids:
                yield SkippedEntry(rel, "duplicate_id", f"id {ident} was read before")
                continue
            self.seen_ids.add(ident)
            yield _bare_record(ident, Path(path))
        for name in listing.other_media:
            if name not in claimed:  # an item's file: reported with the item
                yield SkippedEntry(listing.rel_of(name), "unsupported_format", _UNSUPPORTED)


_UNSUPPORTED: Final = "not JPEG/PNG/WebP/GIF"
_REASON_TEXT: Final = {
    "missing_image": "no image file found by id or URL file name",
    "outside_root": "the image reference leaves the dump root",
    "duplicate_id": "its image was already read from another record",
    "unsupported_format": f"its file is {_UNSUPPORTED}",
}


def _is_sidecar_name(listing: _Listing, name: str) -> bool:
    return _extension(name) == ".json" and _stem(name) in listing.by_stem


def _is_safe_name(name: str) -> bool:
    """A plain file name: no separator, no NUL, not ``.`` or ``..``."""
    return bool(name) and name not in (".", "..") and not any(c in name for c in "/\\\0")


def _found_or_escaped(place: _Listing, name: str) -> _Found | str:
    path = place.images[name]
    return (
        "outside_root" if path is None else _Found(place.path, name, path, place.bare_id_of(name))
    )


def _loads(content: bytes) -> Any:
    """A JSON value from a file's bytes: orjson, then the standard library for what real dumps
    hold and orjson refuses: a byte-order mark, UTF-16 or UTF-32 text, and the NaN and
    Infinity that Python's ``json.dump`` writes. Raises ValueError (orjson's message)."""
    try:
        return orjson.loads(content)
    except orjson.JSONDecodeError as exc:
        try:
            value = json.loads(content.decode(json.detect_encoding(content)))
        except ValueError:  # UnicodeDecodeError and json's own are ValueErrors too
            raise exc from None
        # json reads a lone surrogate ("\ud83d", half an emoji cut off) that orjson refuses and
        # SQLite could not store: made U+FFFD, as bad UTF-8 is.
        return _without_lone_surrogates(value)


def _without_lone_surrogates(value: Any) -> Any:
    if isinstance(value, str):
        return value.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
    if isinstance(value, list):
        return [_without_lone_surrogates(v) for v in value]
    if isinstance(value, dict):
        return {_without_lone_surrogates(k): _without_lone_surrogates(v) for k, v in value.items()}
    return value


def _looks_like_jsonl(content: bytes) -> bool:
    """True when a ``.json`` file that failed to parse holds one JSON object per line."""
    for line in content.splitlines():
        if line.strip():
            try:
                return isinstance(_loads(line), dict)
            except ValueError:
                return False
    return False


# ---- records -------------------------------------------------------------------------


def _as_id(value: Any) -> str | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, str) and value.strip():
        return value.strip()
    return None


def _opt_str(value: Any) -> str | None:
    if isinstance(value, str):
        return value.strip() or None
    if isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)
    return None


def _is_item(document: dict[str, Any]) -> bool:
    """An API item, or gallery-dl's nesting of one (see ``_from_gallery_dl``)."""
    return bool(_ITEM_KEYS & document.keys()) or isinstance(document.get("file"), dict)


def _from_gallery_dl(item: dict[str, Any]) -> dict[str, Any]:
    """gallery-dl's civitai metadata as one API item. It nests the API's image under ``file``
    and puts the uploader under ``user``, the generation data (with its ``meta``) under
    ``generation`` and the tags under ``tags``, at the top level or in ``file``; ``url`` at the
    top level is what it downloaded (``file.url`` may be a bare uuid)."""
    file = item.get("file")
    if not isinstance(file, dict) or "id" in item or _FLAT_KEY in item:
        return item
    flat = dict(file)
    user = item.get("user") or file.get("user")
    if isinstance(user, dict) and not flat.get("username"):
        flat["username"] = user.get("username")
    generation = item.get("generation") or file.get("generation")
    if not flat.get("meta") and isinstance(generation, dict):
        flat["meta"] = generation.get("meta")
    if not flat.get("tags") and item.get("tags"):
        flat["tags"] = item["tags"]
    if isinstance(item.get("url"), str):
        flat["url"] = item["url"]
    return flat


def _unwrap_meta(value: Any) -> dict[str, Any]:
    """civitai's ``meta`` is an object, null, or nested as ``{"id": .., "meta": {...}}``."""
    if not isinstance(value, dict):
        return {}
    if "meta" in value and "prompt" not in value:
        inner = value["meta"]
        return inner if isinstance(inner, dict) else {}  # {"id": 1, "meta": null}: no meta
    return value


def _nsfw_level(item: dict[str, Any]) -> int:
    """The highest level the item's level fields give (err on the safe side). The boolean
    ``nsfw`` counts only where they give none above None: civitai sets it for Soft images too
    (its documented example: ``nsfw: true, nsfwLevel: "Soft", browsingLevel: 2``), where
    alone (or beside an unrated 0) it means Mature."""
    keys = ("nsfwLevel", "browsingLevel", "original_level", "nsfw_level")
    level = max(
        (nsfw_level_from_any(item[key]) for key in keys if _present(item.get(key))), default=0
    )
    if level == 0 and _present(item.get("nsfw")):
        level = nsfw_level_from_any(item["nsfw"])
    return level


def _present(value: Any) -> bool:
    return value is not None and not (isinstance(value, str) and not value.strip())


def _record(item: dict[str, Any], ident: str, path: Path, bare_id: str) -> DumpRecord:
    if _FLAT_KEY in item:
        return _flat_record(item, ident, path, bare_id)
    meta = _unwrap_meta(item.get("meta"))
    prompt = normalise_prompt(meta.get("prompt", item.get("prompt")))
    negative = normalise_prompt(meta.get("negativePrompt", item.get("negativePrompt")))
    if prompt is None:
        # civitai gives meta: null for many images whose files still carry their prompt (an
        # AUTOMATIC1111 or ComfyUI chunk): read it there, as for a bare image.
        embedded = read_embedded_metadata(path)
        prompt = normalise_prompt(embedded.prompt)
        negative = negative or normalise_prompt(embedded.negative_prompt)
        meta = meta or dict(embedded.params)
    return DumpRecord(
        id=ident,
        image_path=path,
        url=_opt_str(item.get("url")),
        prompt=prompt,
        negative_prompt=negative,
        tags=normalise_tags(item.get("tags")),
        nsfw_level=_nsfw_level(item),
        base_model=_opt_str(item.get("baseModel") or meta.get("baseModel")),
        model_name=_opt_str(meta.get("Model") or meta.get("model")),
        created_at=_opt_str(item.get("createdAt")),
        username=_opt_str(item.get("username")),
        stats=item["stats"] if isinstance(item.get("stats"), dict) else {},
        meta=meta,
        bare_id=bare_id,
    )


def _flat_record(item: dict[str, Any], ident: str, path: Path, bare_id: str) -> DumpRecord:
    """The flat record ``{image_id, url, created_at, prompt, model, original_level, tags}``."""
    return DumpRecord(
        id=ident,
        image_path=path,
        url=_opt_str(item.get("url")),
        prompt=normalise_prompt(item.get("prompt")),
        negative_prompt=normalise_prompt(item.get("negative_prompt")),
        tags=normalise_tags(item.get("tags")),
        nsfw_level=_nsfw_level(item),
        base_model=_opt_str(item.get("base_model")),
        model_name=_opt_str(item.get("model")),
        created_at=_opt_str(item.get("created_at")),
        username=_opt_str(item.get("username")),
        bare_id=bare_id,
    )


def _bare_record(ident: str, path: Path) -> DumpRecord:
    embedded = read_embedded_metadata(path)
    params = dict(embedded.params)
    return DumpRecord(
        id=ident,
        image_path=path,
        prompt=normalise_prompt(embedded.prompt),
        negative_prompt=normalise_prompt(embedded.negative_prompt),
        model_name=_opt_str(params.get("Model")),
        meta=params,
    )


# ---- format detection ----------------------------------------------------------------


class _FormatSniffer:
    """Lists the tree and classifies up to ``sample`` JSON files; see ``detect_format``."""

    def __init__(self, root: Path, sample: int) -> None:
        self.root = str(root)
        self.budget = sample
        self.kinds: set[str] = set()
        # An images/ folder without JSON of its own is what the dump's JSON refers to, if it
        # has any (beside it, or in pages/ beside it); a bare dump only where none has.
        self.images_folder_without_json = False

    def detect(self) -> str:
        stack: list[tuple[str, str]] = [(self.root, "")]
        while stack:
            directory, rel = stack.pop()
            try:
                listing = _scan(directory, rel, self.root)
            except OSError:
                continue
            self._classify(listing)
            for name in listing.subdirs:
                stack.append((listing.path_of(name), listing.rel_of(name)))
        if not self.kinds and self.images_folder_without_json:
            self.kinds.add(FORMAT_BARE)
        if not self.kinds:
            return FORMAT_EMPTY
        return self.kinds.pop() if len(self.kinds) == 1 else FORMAT_MIXED

    def _classify(self, listing: _Listing) -> None:
        for name, path in listing.json_files.items():
            if self.budget <= 0:
                break
            if path is None:
                continue
            self.budget -= 1
            kind = _sniff_json(path)
            if kind == "item":
                kind = FORMAT_SIDECAR if _is_sidecar_name(listing, name) else FORMAT_API
            if kind is not None:
                self.kinds.add(kind)
        if listing.images and not listing.json_files:
            if os.path.basename(listing.path) == _IMAGES_DIR:
                self.images_folder_without_json = True
            else:
                self.kinds.add(FORMAT_BARE)


def _sniff_json(path: str) -> str | None:
    """Classify a JSON file by its content: API page/list, flat record, single item, or None."""
    try:
        with open(path, "rb") as handle:
            if _extension(path) in _JSONL_EXTENSIONS:
                document: Any = [_loads(handle.readline())]
            else:
                document = _loads(handle.read())
    except (OSError, ValueError):
        return None
    if isinstance(document, dict) and isinstance(document.get("items"), list):
        return FORMAT_API
    first = document[0] if isinstance(document, list) and document else document
    if not isinstance(first, dict):
        return None
    if _FLAT_KEY in first:
        return FORMAT_FLAT
    if _is_item(first):
        return FORMAT_API if isinstance(document, list) else "item"
    return None
