"""A user's collaborative taste, as words and images (``lookalike taste fit`` builds it)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Query

from recommender.taste import TasteError, TasteNotFittedError, UnknownUserError, describe_user
from service.errors import ApiError
from service.routes.deps import EngineDep, error_docs
from service.schemas import TasteOut

router = APIRouter(prefix="/v1/users", tags=["taste"])

UserPath = Annotated[str, Path(min_length=1, max_length=256)]
Count = Annotated[int, Query(ge=0, le=50)]


@router.get(
    "/{user_id}/taste",
    responses=error_docs(
        (404, "no taste known for this user"),
        (409, "no taste model yet"),
        (503, "the taste model cannot be read"),
    ),
)
def user_taste(
    engine: EngineDep, user_id: UserPath, terms: Count = 12, images: Count = 8
) -> TasteOut:
    """The terms and tags nearest the user's taste vector in the text space, and the images
    nearest it in the primary space; users with few events borrow from similar users."""
    try:
        return TasteOut.of(describe_user(engine, user_id, terms, images))
    except UnknownUserError as exc:
        raise ApiError(404, "unknown_user", str(exc)) from None
    except TasteNotFittedError as exc:
        raise ApiError(409, "taste_not_fitted", str(exc)) from None
    except TasteError as exc:  # the model file cannot be read: the server's problem
        raise ApiError(503, "taste_unavailable", str(exc)) from None
