"""What the text space embeds for an item: its prompt without emphasis syntax, else its tags."""

from __future__ import annotations

import re
from collections.abc import Sequence

# A1111 / ComfyUI emphasis: (word:1.2), ((word)), [word], <lora:name:0.8>, embedding:name
_LORA = re.compile(r"<[^<>]*>")
_WEIGHT = re.compile(r":\s*-?\d+(?:\.\d+)?\s*(?=[)\]])")
_BRACKETS = re.compile(r"[()\[\]{}]")
_SPACES = re.compile(r"\s+")


def clean_prompt(prompt: str | None) -> str:
    """The prompt with emphasis syntax and LoRA tags removed and whitespace folded."""
    if not prompt:
        return ""
    text = _LORA.sub(" ", prompt)
    text = _WEIGHT.sub("", text)
    text = _BRACKETS.sub(" ", text)
    return _SPACES.sub(" ", text).strip(" ,")


def text_for_embedding(prompt: str | None, tags: Sequence[str]) -> str:
    """What the text space embeds for an item: the cleaned prompt, else its tags."""
    cleaned = clean_prompt(prompt)
    if cleaned:
        return cleaned
    return ", ".join(tags)
