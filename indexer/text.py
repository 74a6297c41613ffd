"""Prompt text handling shared by the indexer (what to embed) and the recommender (terms)."""

from __future__ import annotations

import re
from collections.abc import Sequence

# A1111 / ComfyUI emphasis: (word:1.2), ((word)), [word], <lora:name:0.8>, embedding:name
_LORA = re.compile(r"<[^<>]*>")
_WEIGHT = re.compile(r":\s*-?\d+(?:\.\d+)?\s*(?=[)\]])")
_BRACKETS = re.compile(r"[()\[\]{}]")
_SPACES = re.compile(r"\s+")
_WORD = re.compile(r"[a-z][a-z0-9'\-]*")

# Words that say nothing about what is in the picture: quality boilerplate and grammar.
FILLER_WORDS = frozenset(
    """
    a an the and or of in on at with without to for from by is are be as it its this that
    very highly ultra extremely best high quality masterpiece detailed detail details
    intricate 4k 8k 16k hd uhd hdr resolution realistic photorealistic sharp focus lighting
    trending artstation award winning beautiful amazing stunning epic professional
    render rendered illustration image picture photo art artwork style score_9 score_8_up
    score_7_up absurdres lowres worst bad normal jpeg artifacts
    """.split()
)


def clean_prompt(prompt: str | None) -> str:
    """The prompt with emphasis syntax and LoRA tags removed and whitespace folded."""
    if not prompt:
        return ""
    text = _LORA.sub(" ", prompt)
    text = _WEIGHT.sub("", text)
    text = _BRACKETS.sub(" ", text)
    return _SPACES.sub(" ", text).strip(" ,")


def prompt_terms(prompt: str | None) -> list[str]:
    """Salient lower-case words of a prompt, in order, without filler or duplicates."""
    seen: dict[str, None] = {}
    for word in _WORD.findall(clean_prompt(prompt).lower()):
        if word not in FILLER_WORDS and len(word) > 1:
            seen.setdefault(word, None)
    return list(seen)


def text_for_embedding(prompt: str | None, tags: Sequence[str]) -> str:
    """What the text space embeds for an item: the cleaned prompt, else its tags."""
    cleaned = clean_prompt(prompt)
    if cleaned:
        return cleaned
    return ", ".join(tags)
