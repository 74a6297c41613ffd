"""Salient terms of generation prompts: what a person's taste in tags and words is read from.

Parsed once, when an item is indexed (the catalog stores them), so that a feed page never
parses the prompts of the hundreds of candidates it scores. ``PROMPT_TERMS_VERSION`` names
this parser's rules: a catalog parsed under another version is parsed again when opened.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable

PROMPT_TERMS_VERSION = 2  # 2: words in every script, not only ASCII letters and digits
"""Bump when the rules below change what ``prompt_terms`` returns."""

STOPWORDS = frozenset(
    """a an and are as at be been but by for from has have he her his i in into is it its of
    on or she so than that the their them then there these they this to was were with
    very photo image picture""".split()
)
"""Words that carry no preference on their own."""

_FILLER = (
    "masterpiece", "best quality", "high quality", "highest quality", "top quality",
    "good quality", "normal quality", "low quality", "worst quality", "lowres", "highres",
    "absurdres", "ultra detailed", "ultra-detailed", "highly detailed", "extremely detailed",
    "very detailed", "detailed", "intricate", "intricate details", "sharp focus", "8k", "4k",
    "2k", "uhd", "hd", "hdr", "raw photo", "trending on artstation", "artstation",
    "award winning", "award-winning", "official art", "wallpaper", "beautiful", "amazing",
    "perfect", "score_9", "score_8_up", "score_7_up", "score_6_up", "score_5_up",
    "score_4_up", "source_anime", "source_realistic", "rating_safe", "rating_questionable",
    "rating_explicit", "break", "bad anatomy", "bad hands", "blurry", "watermark",
    "signature", "jpeg artifacts", "easynegative",
)  # fmt: skip
FILLER_PHRASES = frozenset(" ".join(f.replace("_", " ").split()) for f in _FILLER)
"""Quality boilerplate of generation prompts: never a term (matched per chunk and per word)."""

_ANGLE = re.compile(r"<[^>]*>")  # <lora:name:0.8>, <hypernet:...>, embeddings
_WEIGHT = re.compile(r":\s*-?\d+(?:\.\d+)?\s*(?=[)\]}>]|,|$)")  # the ":1.2" of (red:1.2)
_BRACKETS = re.compile(r"[()\[\]{}]")
_CHUNK_SPLIT = re.compile(r",|\n|\|| BREAK |\bAND\b|\.(?:\s|$)")
_WORD = re.compile(r"[^\W_][\w'-]*[^\W_]|[^\W_]")  # letters and digits of any script


# Both are pure, and indexing and queries repeat prompts and terms: cached.
@functools.lru_cache(maxsize=1 << 17)
def normalise_term(term: str) -> str:
    """Lower-case, collapse white space and strip punctuation at the ends."""
    return " ".join(term.lower().replace("_", " ").split()).strip(" .,:;!?'\"-")


def item_terms(tags: Iterable[str], prompt_terms: Iterable[str]) -> tuple[str, ...]:
    """An item's distinct terms, sorted: its tags normalised and its prompt terms (which
    ``prompt_terms`` gives normalised). Tag similarity and the ``terms`` space compare these."""
    found = {normalise_term(tag) for tag in tags}
    found.update(prompt_terms)
    found.discard("")
    return tuple(sorted(found))


def prompt_terms(prompt: str | None, max_terms: int = 32) -> list[str]:
    """Salient terms of a generation prompt, in order of first appearance, de-duplicated.

    Weight syntax (``(red:1.2)``, ``[x]``, ``{x}``), LoRA/embedding tags (``<lora:x:0.8>``),
    quality boilerplate (masterpiece, best quality, 8k, ...) and stopwords are removed. A
    comma-separated chunk of 1-3 remaining words is one term (``red hair``); a longer chunk is
    split into its words, as is a chunk that lost stopwords ("a photo of a cat" -> cat).
    """
    return list(_prompt_terms(prompt, max_terms)) if prompt else []


@functools.lru_cache(maxsize=1 << 16)
def _prompt_terms(prompt: str, max_terms: int) -> tuple[str, ...]:
    text = _ANGLE.sub(" ", prompt)
    text = _BRACKETS.sub(" ", _WEIGHT.sub("", text.replace("\\(", "(").replace("\\)", ")")))
    out: dict[str, None] = {}
    for chunk in _CHUNK_SPLIT.split(text):
        chunk = normalise_term(chunk)
        if not chunk or chunk in FILLER_PHRASES:
            continue
        all_words = [w for w in _WORD.findall(chunk) if not w.replace(".", "").isdigit()]
        words = [w for w in all_words if w not in STOPWORDS and w not in FILLER_PHRASES]
        # a short chunk that lost nothing is a phrase ("red hair"); otherwise its words count
        phrase = len(words) == len(all_words) and 1 <= len(words) <= 3
        for term in [" ".join(words)] if phrase else words:
            # one Latin letter says nothing; one CJK character is a word (猫, cat)
            if (len(term) > 1 or not term.isascii()) and term not in FILLER_PHRASES:
                out.setdefault(term, None)
        if len(out) >= max_terms:
            break
    return tuple(out)[:max_terms]


__all__ = ["FILLER_PHRASES", "PROMPT_TERMS_VERSION", "STOPWORDS", "normalise_term", "prompt_terms"]
