"""What a cell's texts imply, completed before its id is made: the LoRAs its prompt tags name
and the embeddings its texts trigger."""

from __future__ import annotations

import re
from typing import Any

from .components import Component, LoraUse
from .models import ModelSpec
from .params import INDEX
from .prompts import encoder_text, lora_tags, search_replace
from .resolution import Components
from .tokens import tokenizer_for

_PROMPT, _NEGATIVE, _SR = INDEX["prompt"], INDEX["negative_prompt"], INDEX["prompt_sr"]
_MODEL, _LORAS, _EMBEDDINGS = INDEX["model"], INDEX["loras"], INDEX["embeddings"]

DERIVED_TEXTS_KEPT = 10_000  # a cell's texts' derivations remembered: bounds memory on data sets of many prompts


class Derivation:
    """What a cell's texts imply: LoRAs its prompt tags name, embeddings its texts trigger."""

    def __init__(self, components: Components):
        self.components = components
        # (prompt, negative prompt, search/replace, model) -> (LoRAs its tags name, embeddings its texts trigger)
        self.cache: dict[
            tuple[str, str, tuple[str, str] | None, ModelSpec], tuple[tuple[LoraUse, ...], tuple[Component, ...]]
        ] = {}

    def derive(self, slots: list[Any]) -> None:
        """Completes a cell's parameter slots (`grid.expand`'s order) with what its texts imply."""
        prompt, negative, sr = slots[_PROMPT], slots[_NEGATIVE], slots[_SR]
        key = (prompt, negative, sr, slots[_MODEL])
        found = self.cache.get(key)
        if found is None:
            if len(self.cache) > DERIVED_TEXTS_KEPT:
                self.cache.clear()
            shown = search_replace(prompt, sr)
            tagged = tuple(LoraUse(self.components.loras[tag.name], tag.te, tag.unet, tag.name) for tag in lora_tags(shown))
            used = self.embeddings(prompt, negative, sr, slots[_MODEL])
            found = self.cache[key] = (tagged, used)
        tagged, used = found
        if tagged:  # applied first: the infotext writes the prompt's tags before the job's own LoRAs
            slots[_LORAS] = tagged + slots[_LORAS]
        slots[_EMBEDDINGS] = used

    def embeddings(self, prompt: str, negative: str, sr: tuple[str, str] | None, model: ModelSpec) -> tuple[Component, ...]:
        """The embeddings a cell's texts trigger."""
        texts = [encoder_text(prompt, sr), encoder_text(negative, sr)]
        return embeddings_used(texts, self.components.embeddings, model)


def embeddings_used(texts: list[str], embeddings: dict[str, Component], model: ModelSpec) -> tuple[Component, ...]:
    """The embeddings whose trigger word's tokens occur in the texts, as A1111 finds them."""
    if not embeddings:
        return ()
    tokenizer = tokenizer_for(model)
    if tokenizer is None:  # no tokenizer on this machine: whole words
        return tuple(
            e
            for word, e in sorted(embeddings.items())
            if any(re.search(rf"(?<![\w]){re.escape(word)}(?![\w])", t) for t in texts)
        )
    ids = [ids for text in texts for ids in tokenizer.tokenize([text])]
    found = []
    for word, embedding in sorted(embeddings.items()):
        needle = tokenizer.tokenize([word])[0]
        if needle and any(_contains(hay, needle) for hay in ids):
            found.append(embedding)
    return tuple(found)


def _contains(hay: list[int], needle: list[int]) -> bool:
    first = needle[0]
    return any(hay[i : i + len(needle)] == needle for i, token in enumerate(hay) if token == first)
