"""Request and response bodies of HTTP API v1 (ARCHITECTURE.md section 6), and their conversions
to and from the engine's typed values. Field names here are the public contract."""

from __future__ import annotations

import base64
import binascii
import math
from collections.abc import Sequence
from typing import Annotated, Any, Literal
from urllib.parse import quote

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from indexer.alignment import ALIGNMENT_SCALE
from indexer.catalog import CatalogItem
from indexer.records import NSFW_LEVELS
from recommender.alignment import ScorePair
from recommender.api import (
    FeedbackEvent,
    FeedbackResult,
    Filters,
    ImageQuery,
    ItemQuery,
    Neighbour,
    Page,
    PageItem,
    Query,
    SessionInfo,
    TextQuery,
)
from recommender.taste import TasteDescription

Id = Annotated[str, Field(min_length=1, max_length=256)]
SessionId = Annotated[str, Field(min_length=1, max_length=128)]
Term = Annotated[str, Field(min_length=1, max_length=200)]
MAX_TEXT = 2000
MAX_EVENTS = 1000
MAX_DWELL_MS = 24 * 3600 * 1000.0  # a day: anything longer is a stuck tab, not attention


def image_url(image_id: str) -> str:
    """Where the service serves an item's bytes (relative to the API root).

    Ids of bare-image dumps are relative paths, so ``/`` stays; everything else is quoted.
    """
    return f"/v1/images/{quote(image_id, safe='/')}"


class Strict(BaseModel):
    """Request bodies: unknown fields are refused, so typos do not pass silently."""

    model_config = ConfigDict(extra="forbid")


# --------------------------------------------------------------------------- errors


class ErrorDetail(BaseModel):
    code: str
    message: str


class ErrorBody(BaseModel):
    """Every error answer: ``{"error": {"code", "message"}}``."""

    error: ErrorDetail


# --------------------------------------------------------------------------- sessions


class SessionCreate(Strict):
    user_id: Annotated[str | None, Field(max_length=256)] = None


class SessionCreated(BaseModel):
    session_id: str


class TermWeight(BaseModel):
    term: str
    weight: float


class SessionOut(BaseModel):
    session_id: str
    served: int
    feedback_events: int
    terms: list[TermWeight]

    @classmethod
    def of(cls, info: SessionInfo) -> SessionOut:
        return cls(
            session_id=info.session_id,
            served=info.served,
            feedback_events=info.feedback_events,
            terms=[TermWeight(term=t, weight=w) for t, w in info.terms],
        )


class MuteIn(Strict):
    term: Term


# --------------------------------------------------------------------------- search and feed


class FiltersIn(Strict):
    """Metadata filters. ``max_nsfw_level``: a civitai name (None, Soft, Mature, X, XXX) or 0-4."""

    max_nsfw_level: str | int | None = None
    base_models: Annotated[list[Annotated[str, Field(max_length=200)]], Field(max_length=50)] = []
    tags_required: Annotated[list[Annotated[str, Field(max_length=200)]], Field(max_length=50)] = []
    tags_excluded: Annotated[list[Annotated[str, Field(max_length=200)]], Field(max_length=50)] = []
    # Least prompt-image alignment (100 x CLIP cosine); needs a catalog with a clip space.
    min_alignment: Annotated[float | None, Field(ge=-100, le=100, allow_inf_nan=False)] = None

    @field_validator("max_nsfw_level")
    @classmethod
    def _level(cls, value: str | int | None) -> int | None:
        if value is None:
            return None
        if isinstance(value, int):
            if not 0 <= value < len(NSFW_LEVELS):
                raise ValueError(f"must be 0..{len(NSFW_LEVELS) - 1}")
            return value
        names = {name.lower(): i for i, name in enumerate(NSFW_LEVELS)}
        if value.lower() not in names:
            raise ValueError(f"must be one of {', '.join(NSFW_LEVELS)}")
        return names[value.lower()]

    def to_filters(self) -> Filters:
        level = self.max_nsfw_level
        return Filters(
            max_nsfw_level=level if isinstance(level, int) else None,
            base_models=tuple(self.base_models),
            tags_required=tuple(t.strip().lower() for t in self.tags_required if t.strip()),
            tags_excluded=tuple(t.strip().lower() for t in self.tags_excluded if t.strip()),
            min_alignment=self.min_alignment,
        )


class SearchOptions(Strict):
    """What a search takes besides its query (also the fields of a multipart upload)."""

    session_id: SessionId | None = None
    filters: FiltersIn | None = None
    limit: Annotated[int | None, Field(ge=1)] = None


class SearchIn(SearchOptions):
    """A JSON search: exactly one of ``image_b64``, ``image_id``, ``text``."""

    image_b64: str | None = None
    image_id: Id | None = None
    text: Annotated[str | None, Field(min_length=1, max_length=MAX_TEXT)] = None

    @model_validator(mode="after")
    def _one_query(self) -> SearchIn:
        given = [self.image_b64 is not None, self.image_id is not None, self.text is not None]
        if sum(given) != 1:
            raise ValueError("give exactly one of image_b64, image_id, text (or a file upload)")
        return self

    def query(self) -> Query:
        if self.image_b64 is not None:
            return ImageQuery(decode_b64(self.image_b64, "image_b64"))
        if self.image_id is not None:
            return ItemQuery(self.image_id)
        assert self.text is not None
        return TextQuery(self.text)


def decode_b64(text: str, field: str) -> bytes:
    """Decode standard or URL-safe base64 (a ``data:`` URL prefix is allowed); ValueError else."""
    if text.startswith("data:"):
        text = text.partition(",")[2]
    compact = "".join(text.split())
    try:
        if "-" in compact or "_" in compact:
            return base64.urlsafe_b64decode(compact + "=" * (-len(compact) % 4))
        return base64.b64decode(compact + "=" * (-len(compact) % 4), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ValueError(f"{field} is not valid base64") from exc


class ItemOut(BaseModel):
    id: str
    url: str
    score: float
    pick: Literal["top", "explore"]
    prompt: str | None
    tags: list[str]
    width: int | None
    height: int | None
    nsfw_level: str
    generated: bool

    @classmethod
    def of(cls, item: PageItem) -> ItemOut:
        return cls(
            id=item.id,
            url=image_url(item.id),
            score=_finite(item.score),
            pick=item.pick,
            prompt=item.prompt,
            tags=list(item.tags),
            width=item.width,
            height=item.height,
            nsfw_level=item.nsfw_level,
            generated=item.generated,
        )


class FeedOut(BaseModel):
    items: list[ItemOut]
    sparse: bool
    # New images are being made for this session (the generation fallback): ask again soon.
    generating: bool = False

    @classmethod
    def of(cls, page: Page) -> FeedOut:
        return cls(
            items=[ItemOut.of(i) for i in page.items],
            sparse=page.sparse,
            generating=page.generating,
        )


class SearchOut(FeedOut):
    session_id: str

    @classmethod
    def of(cls, page: Page) -> SearchOut:
        return cls(session_id=page.session_id, **FeedOut.of(page).model_dump())


# --------------------------------------------------------------------------- feedback


class EventIn(Strict):
    event_id: Annotated[
        str,
        Field(
            min_length=1,
            max_length=128,
            description="a unique id of this look (a UUID): an id the catalog holds already, "
            "from any session, counts as a duplicate, so a retried request counts once",
        ),
    ]
    image_id: Id
    dwell_ms: Annotated[float, Field(ge=0, le=MAX_DWELL_MS, allow_inf_nan=False)]

    def to_event(self) -> FeedbackEvent:
        return FeedbackEvent(event_id=self.event_id, image_id=self.image_id, dwell_ms=self.dwell_ms)


class FeedbackIn(Strict):
    session_id: SessionId
    events: Annotated[list[EventIn], Field(min_length=1, max_length=MAX_EVENTS)]


class FeedbackOut(BaseModel):
    accepted: int
    duplicates: int

    @classmethod
    def of(cls, result: FeedbackResult) -> FeedbackOut:
        return cls(accepted=result.accepted, duplicates=result.duplicates)


# --------------------------------------------------------------------------- images


class ImageMeta(BaseModel):
    """What the catalog knows about one image."""

    id: str
    url: str
    prompt: str | None
    negative_prompt: str | None
    tags: list[str]
    width: int | None
    height: int | None
    nsfw_level: str
    base_model: str | None
    model_name: str | None
    created_at: str | None
    username: str | None
    source_url: str | None
    stats: dict[str, Any]
    generated: bool
    # For generated images: backend, model, seed, prompt, conditioning summary, and a digest of
    # the session it was made for.
    generation: dict[str, Any] | None = None

    @classmethod
    def of(cls, item: CatalogItem) -> ImageMeta:
        return cls(
            id=item.id,
            url=image_url(item.id),
            prompt=item.prompt,
            negative_prompt=item.negative_prompt,
            tags=list(item.tags),
            width=item.width,
            height=item.height,
            nsfw_level=item.nsfw_name,
            base_model=item.base_model,
            model_name=item.model_name,
            created_at=item.created_at,
            username=item.username,
            source_url=item.url,
            stats=item.stats,
            generated=item.generated,
            generation=item.meta.get("generated") if item.generated else None,
        )


# --------------------------------------------------------------------------- clip-retrieval


class KnnIn(BaseModel):
    """What clip-retrieval's ``ClipClient`` posts to ``/knn-service``.

    Unknown fields are ignored (clip-retrieval's own back end ignores them too). The safety,
    violence, aesthetic and mclip options are accepted and have no effect here.
    """

    model_config = ConfigDict(extra="ignore")

    text: Annotated[str | None, Field(max_length=MAX_TEXT)] = None
    image: str | None = None
    image_url: Annotated[str | None, Field(max_length=4096)] = None
    embedding_input: Annotated[
        list[Annotated[float, Field(allow_inf_nan=False)]] | None, Field(max_length=8192)
    ] = None
    modality: Literal["image", "text"] = "image"
    num_images: Annotated[int, Field(ge=1)] = 40
    num_result_ids: Annotated[int | None, Field(ge=1)] = None
    indice_name: Annotated[str | None, Field(max_length=200)] = None
    deduplicate: bool = True
    use_mclip: bool = False
    use_safety_model: bool = False
    use_violence_detector: bool = False
    aesthetic_score: int | str | None = None
    aesthetic_weight: float | str | None = None

    @model_validator(mode="after")
    def _one_query(self) -> KnnIn:
        given = [self.text, self.image, self.image_url, self.embedding_input]
        if sum(value is not None for value in given) != 1:
            raise ValueError("give exactly one of text, image, image_url, embedding_input")
        return self


class KnnResult(BaseModel):
    id: str
    similarity: float
    url: str
    caption: str | None

    @classmethod
    def of(cls, hit: Neighbour, base_url: str) -> KnnResult:
        return cls(
            id=hit.id,
            similarity=_finite(hit.similarity),
            url=base_url.rstrip("/") + image_url(hit.id),
            caption=hit.prompt,
        )


# --------------------------------------------------------------------------- operations


class Health(BaseModel):
    status: Literal["ok"] = "ok"


class Readiness(BaseModel):
    ready: bool
    items: int | None = None


def _finite(x: float) -> float:
    return float(x) if math.isfinite(x) else 0.0


# --------------------------------------------------------------------------- alignment scores

MAX_SCORE_PAIRS = 64


class ScorePairIn(Strict):
    """One (image, text) pair: an indexed image by ``image_id`` or one sent as ``image_b64``."""

    text: Annotated[str, Field(min_length=1, max_length=MAX_TEXT)]
    image_id: Id | None = None
    image_b64: str | None = None

    @model_validator(mode="after")
    def _one_image(self) -> ScorePairIn:
        if (self.image_id is None) == (self.image_b64 is None):
            raise ValueError("give exactly one of image_id, image_b64")
        return self

    def to_pair(self) -> ScorePair:
        if self.image_id is not None:
            return ScorePair(text=self.text, image_id=self.image_id)
        assert self.image_b64 is not None
        return ScorePair(text=self.text, image=decode_b64(self.image_b64, "image_b64"))


class ScoreIn(Strict):
    """One pair (``text`` and ``image_id`` | ``image_b64`` at the top level) or ``pairs``."""

    text: Annotated[str | None, Field(min_length=1, max_length=MAX_TEXT)] = None
    image_id: Id | None = None
    image_b64: str | None = None
    pairs: Annotated[list[ScorePairIn] | None, Field(min_length=1, max_length=MAX_SCORE_PAIRS)] = (
        None
    )

    @model_validator(mode="after")
    def _one_form(self) -> ScoreIn:
        single = [self.text, self.image_id, self.image_b64]
        if (self.pairs is None) == all(value is None for value in single):
            raise ValueError("give either one pair (text and an image) or `pairs`, not both")
        if self.pairs is None and self.text is None:
            raise ValueError("a single pair needs a `text`")
        if self.pairs is None and (self.image_id is None) == (self.image_b64 is None):
            raise ValueError("a single pair needs exactly one of image_id, image_b64")
        return self

    def to_pairs(self) -> list[ScorePair]:
        """The engine's pairs; ValueError for invalid base64."""
        if self.pairs is not None:
            return [pair.to_pair() for pair in self.pairs]
        assert self.text is not None
        single = ScorePairIn(text=self.text, image_id=self.image_id, image_b64=self.image_b64)
        return [single.to_pair()]


class ScoreOut(BaseModel):
    """Alignment scores (100 x CLIP cosine of image and text), in the order of the pairs."""

    scores: list[float]
    scale: float = ALIGNMENT_SCALE

    @classmethod
    def of(cls, scores: Sequence[float]) -> ScoreOut:
        return cls(scores=[round(_finite(float(s)), 4) for s in scores])


# --------------------------------------------------------------------------- taste


class TasteTerm(BaseModel):
    term: str
    kind: Literal["tag", "term"]
    similarity: float


class TasteImage(BaseModel):
    id: str
    url: str
    similarity: float
    prompt: str | None


class TasteOut(BaseModel):
    """A user's taste: the vocabulary nearest it in the text space, the images nearest it.

    ``events``: items the user had feedback on at the last fit; ``borrowed_from``: how many
    similar users were mixed in (users with few events).
    """

    user_id: str
    events: int
    borrowed_from: int
    terms: list[TasteTerm]
    images: list[TasteImage]

    @classmethod
    def of(cls, taste: TasteDescription) -> TasteOut:
        return cls(
            user_id=taste.user_id,
            events=taste.events,
            borrowed_from=taste.borrowed,
            terms=[
                TasteTerm(term=t, kind="tag" if k == "tag" else "term", similarity=_finite(s))
                for t, k, s in taste.terms
            ],
            images=[
                TasteImage(id=i, url=image_url(i), similarity=_finite(s), prompt=p)
                for i, s, p in taste.images
            ],
        )
