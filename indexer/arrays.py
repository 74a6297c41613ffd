"""Numpy helpers shared by the catalog's columns, the vector indexes and the term rows."""

from __future__ import annotations

from typing import Any

import numpy as np
from numpy.typing import NDArray


def grown(array: NDArray[Any], size: int, *, fill: int, spare: float = 0.0) -> NDArray[Any]:
    """``array`` when it holds ``size`` entries, else a copy that does, padded with ``fill``.

    The copy is at least ``1 + spare`` times as long as ``array``: tables indexed by key grow
    a few entries at a time, and a spare share keeps most of those growths from copying.
    """
    if size <= len(array):
        return array
    out = np.full(max(size, int(len(array) * (1 + spare))), fill, dtype=array.dtype)
    out[: len(array)] = array
    return out
