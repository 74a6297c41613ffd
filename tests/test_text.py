"""What the text space embeds for an item."""

from __future__ import annotations

from indexer.text import clean_prompt, text_for_embedding


def test_clean_prompt_drops_emphasis_and_lora_syntax_but_keeps_words() -> None:
    prompt = "masterpiece, ((red:1.3)) [fox], <lora:foxy:0.8> in  snow"
    assert clean_prompt(prompt) == "masterpiece, red fox , in snow"


def test_text_for_embedding_falls_back_to_tags() -> None:
    assert text_for_embedding(None, ("cat", "night")) == "cat, night"
    assert text_for_embedding("  ", ()) == ""
    assert text_for_embedding("a (cat:1.1)", ("x",)) == "a cat"
