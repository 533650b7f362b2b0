"""Prompts as A1111 reads them: emphasis, BREAK, 75-token chunks with comma backtrack.

Pure Python on purpose: the scheduler counts tokens and chunks at `validate`, the
worker builds the encoder's input from the same functions, so both sides agree on
what a prompt means. Tokenizing is the caller's (a function text -> token ids).

A1111 reference: modules/prompt_parser.py (parse_prompt_attention) and
modules/sd_hijack_clip.py (tokenize_line), with its defaults: "Original" emphasis,
comma padding backtrack 20, chunks of 75 tokens wrapped in BOS/EOS.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

CHUNK_TOKENS = 75  # tokens of text per chunk; BOS and EOS make it 77
COMMA_BACKTRACK = 20  # A1111's "comma_padding_backtrack" default
ROUND, SQUARE = 1.1, 1 / 1.1
BREAK_MARK = -1.0  # the weight A1111 gives its BREAK pseudo-segment
# A LoRA multiplier's bound, in tags and in `loras:` alike: sliders go to a few units either way; beyond
# this the merged weights overflow fp16 and the image is noise (or NaN) under a valid cell id.
MAX_LORA_WEIGHT = 10.0

_ATTENTION = re.compile(
    r"""
\\\(|
\\\)|
\\\[|
\\]|
\\\\|
\\|
\(|
\[|
:\s*([+-]?[.\d]+)\s*\)|
\)|
]|
[^\\()\[\]:]+|
:
""",
    re.X,
)
_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.S)
# A1111's scheduling syntax: [from:to:when], [to:when], [a|b]. Brackets are never
# nested across these tokens in real prompts; escaped brackets are not syntax.
_SCHEDULED = re.compile(r"(?<!\\)\[[^\[\]]*:\s*[+-]?(?:\d+\.?\d*|\.\d+)\s*(?<!\\)\]")
_ALTERNATE = re.compile(r"(?<!\\)\[[^\[\]]*(?<!\\)\|[^\[\]]*(?<!\\)\]")
_ESCAPE = "escape the brackets as \\[ \\] for literal text"
_SPACES = re.compile(r"\s+")
# modules/extra_networks.py re_extra_net; `lyco` is the alias A1111's Lora extension registers.
_LORA_TAG = re.compile(r"<(?:lora|lyco):([^>]+)>")
# A1111 reads an `AND` between words as composable diffusion (several conditionings).
_AND = re.compile(r"\bAND\b")


@dataclass
class _Segment:
    text: str
    weight: float


class _Attention:
    """parse_prompt_attention's state: the segments read so far, where each open bracket began."""

    def __init__(self) -> None:
        self.segments: list[_Segment] = []
        self.round_brackets: list[int] = []
        self.square_brackets: list[int] = []

    def multiply_range(self, start: int, multiplier: float) -> None:
        for segment in self.segments[start:]:
            segment.weight *= multiplier

    def read(self, token: str, weight: str | None) -> None:
        if token.startswith("\\"):
            self.segments.append(_Segment(token[1:], 1.0))
        elif token == "(":
            self.round_brackets.append(len(self.segments))
        elif token == "[":
            self.square_brackets.append(len(self.segments))
        elif weight is not None and self.round_brackets:
            self.multiply_range(self.round_brackets.pop(), float(weight))
        elif token == ")" and self.round_brackets:
            self.multiply_range(self.round_brackets.pop(), ROUND)
        elif token == "]" and self.square_brackets:
            self.multiply_range(self.square_brackets.pop(), SQUARE)
        else:
            for i, part in enumerate(_BREAK.split(token)):
                if i > 0:
                    self.segments.append(_Segment("BREAK", BREAK_MARK))
                self.segments.append(_Segment(part, 1.0))

    def close_unclosed(self) -> None:
        """Unclosed brackets apply to the rest of the prompt."""
        for start in self.round_brackets:
            self.multiply_range(start, ROUND)
        for start in self.square_brackets:
            self.multiply_range(start, SQUARE)


def _merge_equal_weights(segments: list[_Segment]) -> list[_Segment]:
    """Runs of segments with equal weights as one segment each."""
    merged = [_Segment("", 1.0)] if not segments else segments[:1]
    for segment in segments[1:]:
        if segment.weight == merged[-1].weight:
            merged[-1].text += segment.text
        else:
            merged.append(segment)
    return merged


def parse_attention(text: str) -> list[tuple[str, float]]:
    """(text, weight) segments of a prompt, as A1111's parse_prompt_attention.

    `(x)` multiplies by 1.1, `[x]` divides by 1.1, `(x:1.3)` multiplies by 1.3,
    `\\(` is a literal bracket, `BREAK` becomes ("BREAK", -1). Unclosed brackets
    apply to the rest of the prompt; runs of equal weights are merged.
    """
    attention = _Attention()
    for match in _ATTENTION.finditer(text):
        attention.read(match.group(0), match.group(1))
    attention.close_unclosed()
    return [(segment.text, segment.weight) for segment in _merge_equal_weights(attention.segments)]


@dataclass
class Chunk:
    """77 token ids (BOS, 75 of text or EOS padding, EOS), a weight per token, embedding slots."""

    tokens: list[int] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)
    fixes: list[tuple[int, Any]] = field(default_factory=list)  # (offset after BOS, embedding key)


@dataclass
class Encoding:
    chunks: list[Chunk]
    token_count: int  # text tokens, as A1111's "N/75" counter shows them


@dataclass(frozen=True)
class Vocabulary:
    """The token ids chunking needs from a CLIP tokenizer."""

    bos: int
    eos: int
    comma: int | None  # id of ",</w>", for the comma backtrack


# A textual-inversion embedding as chunking sees it: its trigger's token ids -> (key, vectors)
Triggers = Mapping[tuple[int, ...], tuple[Any, int]]


# Per first token id: (trigger ids, embedding key, vectors) of the triggers that start with it, longest first
_TriggerLookup = dict[int, list[tuple[tuple[int, ...], Any, int]]]


def _trigger_lookup(embeddings: Triggers | None) -> _TriggerLookup:
    lookup: _TriggerLookup = {}
    for ids, (key, vectors) in (embeddings or {}).items():
        lookup.setdefault(ids[0], []).append((ids, key, vectors))
    for matches in lookup.values():
        matches.sort(key=lambda m: len(m[0]), reverse=True)
    return lookup


class _Chunker:
    """tokenize_line's state: the chunks so far, the one being filled, its last comma."""

    def __init__(self, vocab: Vocabulary, lookup: _TriggerLookup):
        self.vocab, self.lookup = vocab, lookup
        self.chunks: list[Chunk] = []
        self.current = Chunk()
        self.token_count = 0
        self.last_comma = -1

    def next_chunk(self, is_last: bool = False) -> None:
        current = self.current
        self.token_count += len(current.tokens) if is_last else CHUNK_TOKENS
        padding = CHUNK_TOKENS - len(current.tokens)
        if padding > 0:
            current.tokens += [self.vocab.eos] * padding
            current.weights += [1.0] * padding
        current.tokens = [self.vocab.bos, *current.tokens, self.vocab.eos]
        current.weights = [1.0, *current.weights, 1.0]
        self.last_comma = -1
        self.chunks.append(current)
        self.current = Chunk()

    def add(self, tokens: list[int], weight: float) -> None:
        """A segment's tokens, each embedding trigger among them replaced by the embedding's slots."""
        position = 0
        while position < len(tokens):
            token = tokens[position]
            self._make_room(token)
            match = next((m for m in self.lookup.get(token, ()) if tuple(tokens[position : position + len(m[0])]) == m[0]), None)
            if match is None:
                self.current.tokens.append(token)
                self.current.weights.append(weight)
                position += 1
            else:
                ids, key, vectors = match
                self._add_embedding(key, vectors, weight)
                position += len(ids)

    def _make_room(self, token: int) -> None:
        """Before `token`: note a comma; a full chunk passes its words after a recent comma on to the next."""
        current = self.current
        if token == self.vocab.comma:
            self.last_comma = len(current.tokens)
        elif (
            len(current.tokens) == CHUNK_TOKENS
            and self.last_comma != -1
            and len(current.tokens) - self.last_comma <= COMMA_BACKTRACK
        ):
            cut = self.last_comma + 1
            moved_tokens, moved_weights = current.tokens[cut:], current.weights[cut:]
            current.tokens, current.weights = current.tokens[:cut], current.weights[:cut]
            self.next_chunk()
            self.current.tokens, self.current.weights = moved_tokens, moved_weights
        if len(self.current.tokens) == CHUNK_TOKENS:
            self.next_chunk()

    def _add_embedding(self, key: Any, vectors: int, weight: float) -> None:
        """An embedding's slots, all in one chunk."""
        if len(self.current.tokens) + vectors > CHUNK_TOKENS:
            self.next_chunk()
        self.current.fixes.append((len(self.current.tokens), key))
        self.current.tokens += [0] * vectors
        self.current.weights += [weight] * vectors

    def finish(self) -> Encoding:
        if self.current.tokens or not self.chunks:
            self.next_chunk(is_last=True)
        return Encoding(self.chunks, self.token_count)


def chunk_prompt(
    text: str, tokenize: Callable[[Sequence[str]], list[list[int]]], vocab: Vocabulary, embeddings: Triggers | None = None
) -> Encoding:
    """A1111's tokenize_line: weighted segments -> chunks of 75 tokens + BOS/EOS.

    A chunk that fills up moves the words after its last comma (if that comma lies
    within the last 20 tokens) into the next chunk; BREAK closes a chunk early. An
    embedding's trigger takes as many slots as the embedding has vectors, in one chunk.
    """
    chunker = _Chunker(vocab, _trigger_lookup(embeddings))
    parsed = parse_attention(text)
    tokenized = tokenize([segment for segment, _ in parsed])
    for tokens, (segment, weight) in zip(tokenized, parsed, strict=True):
        if segment == "BREAK" and weight == BREAK_MARK:
            chunker.next_chunk()
        else:
            chunker.add(tokens, weight)
    return chunker.finish()


@dataclass(frozen=True)
class LoraTag:
    """An A1111 `<lora:NAME:TE:UNET>` tag: the LoRA's name and its two multipliers."""

    name: str
    te: float  # text-encoder multiplier
    unet: float  # UNet multiplier
    written: str  # the tag as the prompt has it


_TE_AT, _UNET_AT = 1, 2  # a tag's positional items: NAME, TE, UNET


def lora_tags(text: str) -> list[LoraTag]:
    """A1111's `<lora:…>` tags in a prompt, read as its extra-network parser and Lora extension read them.

    modules/extra_networks.py splits the tag at ":" into items, `key=value` items are
    named and the others positional; extensions-builtin/Lora/extra_networks_lora.py
    then takes positional[0] as the name, te = positional[1] (else 1), unet =
    positional[2] (else te), with named `te=` and `unet=` winning. `dyn` (a rank
    cut) is not supported. Raises ValueError naming the tag when it cannot be read;
    a multiplier must be a finite number within ±MAX_LORA_WEIGHT. The one place a tag is parsed.
    """
    tags = []
    for match in _LORA_TAG.finditer(text):
        written = match.group(0)
        positional: list[str] = []
        named: dict[str, str] = {}
        for item in match.group(1).split(":"):
            if item.count("=") == 1:  # key=value
                key, value = item.split("=")
                named[key] = value
            else:
                positional.append(item)
        if not positional or not positional[0].strip():
            raise ValueError(f"{written}: the tag names no LoRA")
        if len(positional) > _UNET_AT + 1 or "dyn" in named:
            raise ValueError(f"{written}: `dyn` (a LoRA rank cut) is not supported; write <lora:NAME:TE:UNET>")
        te = _multiplier(written, positional[_TE_AT]) if len(positional) > _TE_AT else 1.0
        te = _multiplier(written, named["te"]) if "te" in named else te
        unet = _multiplier(written, positional[_UNET_AT]) if len(positional) > _UNET_AT else te
        unet = _multiplier(written, named["unet"]) if "unet" in named else unet
        tags.append(LoraTag(positional[0], te, unet, written))
    return tags


def _multiplier(tag: str, value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise ValueError(f"{tag}: {value!r} is not a number (the weight must be a number)") from None
    if not math.isfinite(number):
        raise ValueError(f"{tag}: the weight must be a finite number, got {value!r}")
    if abs(number) > MAX_LORA_WEIGHT:
        raise ValueError(f"{tag}: the weight must be between -{MAX_LORA_WEIGHT:g} and {MAX_LORA_WEIGHT:g}, got {value!r}")
    return number


def strip_lora_tags(text: str) -> str:
    """The prompt as A1111's encoder sees it: extra-network tags removed."""
    return _LORA_TAG.sub("", text)


def search_replace(text: str, sr: tuple[str, str] | None) -> str:
    """A1111's X/Y/Z "Prompt S/R": every occurrence of the search term replaced."""
    return text.replace(sr[0], sr[1]) if sr else text


def encoder_text(text: str, sr: tuple[str, str] | None) -> str:
    """What a cell's text encoder reads: S/R applied, LoRA tags removed, whitespace collapsed.

    CLIP's tokenizer collapses whitespace itself, so "a cow <lora:x:1>" and "a cow" are
    the same conditioning, and with the LoRA in `loras`, the same cell.
    """
    return _SPACES.sub(" ", strip_lora_tags(search_replace(text, sr))).strip()


def is_empty_prompt(text: str, sr: tuple[str, str] | None) -> bool:
    """A1111's test for SDXL's all-zero negative conditioning (sd_models_xl.get_learned_conditioning:
    `force_zero_negative_prompt = is_negative_prompt and all(x == '' for x in batch)`): the text
    itself is '', S/R applied. A negative of spaces is not empty there: it is encoded, not zeroed.
    """
    return search_replace(text, sr) == ""


def unsupported_syntax(text: str) -> str | None:
    """Why A1111 syntax in `text` cannot be rendered as A1111 would, or None.

    Prompt editing ([from:to:when]), alternation ([a|b]) and composable `AND`
    change the conditioning during sampling; gridrender refuses them rather than
    read their brackets as emphasis.
    """
    if match := _SCHEDULED.search(text):
        return f"prompt editing {match.group(0)!r} ([from:to:when]) is not supported; {_ESCAPE}"
    if match := _ALTERNATE.search(text):
        return f"prompt alternation {match.group(0)!r} ([a|b]) is not supported; {_ESCAPE}"
    if _AND.search(text):
        return "composable prompts (`AND` between prompts) are not supported; write `and` for the word"
    return None
