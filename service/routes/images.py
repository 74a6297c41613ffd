"""Image bytes and metadata, by item id."""

from __future__ import annotations

from typing import Final

from fastapi import APIRouter
from fastapi.responses import FileResponse

from indexer.images import sniff_format
from service.errors import ApiError
from service.routes.deps import EngineDep, error_docs
from service.schemas import ImageMeta

router = APIRouter(prefix="/v1/images", tags=["images"])

_MEDIA_TYPES: Final = {
    "JPEG": "image/jpeg",
    "PNG": "image/png",
    "WEBP": "image/webp",
    "GIF": "image/gif",
}
_NOT_FOUND = error_docs((404, "unknown image id"))
# Served bytes are the dump's files: never let a browser run or re-interpret them.
_IMAGE_HEADERS: Final = {
    "X-Content-Type-Options": "nosniff",
    "Content-Security-Policy": "default-src 'none'; sandbox",
    "Cache-Control": "public, max-age=3600",
}


# Registered before the bytes route: ids may contain "/" (bare-image dumps use relative paths).
@router.get("/{image_id:path}/meta", responses=_NOT_FOUND)
def image_meta(engine: EngineDep, image_id: str) -> ImageMeta:
    """Prompt, tags, size, NSFW level and provenance of one image."""
    return ImageMeta.of(engine.item(image_id))


@router.get(
    "/{image_id:path}",
    response_class=FileResponse,
    responses={200: {"content": {"image/*": {}}}, **_NOT_FOUND},
)
def image_bytes(engine: EngineDep, image_id: str) -> FileResponse:
    """The image file itself (JPEG, PNG, WebP or GIF)."""
    path = engine.image_path(image_id)
    try:
        with open(path, "rb") as handle:
            fmt = sniff_format(handle.read(16))
    except OSError:
        raise ApiError(404, "image_missing", f"the file of image {image_id!r} is gone") from None
    if fmt is None:
        raise ApiError(404, "image_missing", f"the file of image {image_id!r} is not an image")
    return FileResponse(path, media_type=_MEDIA_TYPES[fmt], headers=_IMAGE_HEADERS)
