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


def parse_attention(text: str) -> list[tuple[str, float]]:
    """(text, weight) segments of a prompt, as A1111's parse_prompt_attention.

    `(x)` multiplies by 1.1, `[x]` divides by 1.1, `(x:1.3)` multiplies by 1.3,
    `\\(` is a literal bracket, `BREAK` becomes ("BREAK", -1). Unclosed brackets
    apply to the rest of the prompt; runs of equal weights are merged.
    """
    res: list[list] = []
    round_brackets: list[int] = []
    square_brackets: list[int] = []

    def multiply_range(start: int, multiplier: float) -> None:
        for p in range(start, len(res)):
            res[p][1] *= multiplier

    for match in _ATTENTION.finditer(text):
        token, weight = match.group(0), match.group(1)
        if token.startswith("\\"):
            res.append([token[1:], 1.0])
        elif token == "(":
            round_brackets.append(len(res))
        elif token == "[":
            square_brackets.append(len(res))
        elif weight is not None and round_brackets:
            multiply_range(round_brackets.pop(), float(weight))
        elif token == ")" and round_brackets:
            multiply_range(round_brackets.pop(), ROUND)
        elif token == "]" and square_brackets:
            multiply_range(square_brackets.pop(), SQUARE)
        else:
            for i, part in enumerate(_BREAK.split(token)):
                if i > 0:
                    res.append(["BREAK", BREAK_MARK])
                res.append([part, 1.0])
    for start in round_brackets:
        multiply_range(start, ROUND)
    for start in square_brackets:
        multiply_range(start, SQUARE)
    if not res:
        res = [["", 1.0]]
    i = 0
    while i + 1 < len(res):
        if res[i][1] == res[i + 1][1]:
            res[i][0] += res[i + 1][0]
            res.pop(i + 1)
        else:
            i += 1
    return [(segment, weight) for segment, weight in res]


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


def chunk_prompt(text: str, tokenize: Callable[[Sequence[str]], list[list[int]]], vocab: Vocabulary,
                 embeddings: Triggers | None = None) -> Encoding:
    """A1111's tokenize_line: weighted segments -> chunks of 75 tokens + BOS/EOS.

    A chunk that fills up moves the words after its last comma (if that comma lies
    within the last 20 tokens) into the next chunk; BREAK closes a chunk early. An
    embedding's trigger takes as many slots as the embedding has vectors, in one chunk.
    """
    lookup: dict[int, list[tuple[tuple[int, ...], Any, int]]] = {}
    for ids, (key, vectors) in (embeddings or {}).items():
        lookup.setdefault(ids[0], []).append((ids, key, vectors))
    for matches in lookup.values():
        matches.sort(key=lambda m: len(m[0]), reverse=True)
    parsed = parse_attention(text)
    tokenized = tokenize([segment for segment, _ in parsed])
    chunks: list[Chunk] = []
    current = Chunk()
    token_count = 0
    last_comma = -1

    def next_chunk(is_last: bool = False) -> None:
        nonlocal token_count, last_comma, current
        token_count += len(current.tokens) if is_last else CHUNK_TOKENS
        padding = CHUNK_TOKENS - len(current.tokens)
        if padding > 0:
            current.tokens += [vocab.eos] * padding
            current.weights += [1.0] * padding
        current.tokens = [vocab.bos, *current.tokens, vocab.eos]
        current.weights = [1.0, *current.weights, 1.0]
        last_comma = -1
        chunks.append(current)
        current = Chunk()

    for tokens, (segment, weight) in zip(tokenized, parsed):
        if segment == "BREAK" and weight == BREAK_MARK:
            next_chunk()
            continue
        position = 0
        while position < len(tokens):
            token = tokens[position]
            if token == vocab.comma:
                last_comma = len(current.tokens)
            elif (len(current.tokens) == CHUNK_TOKENS and last_comma != -1
                  and len(current.tokens) - last_comma <= COMMA_BACKTRACK):
                cut = last_comma + 1
                moved_tokens, moved_weights = current.tokens[cut:], current.weights[cut:]
                current.tokens, current.weights = current.tokens[:cut], current.weights[:cut]
                next_chunk()
                current.tokens, current.weights = moved_tokens, moved_weights
            if len(current.tokens) == CHUNK_TOKENS:
                next_chunk()
            match = next((m for m in lookup.get(token, ()) if tuple(tokens[position : position + len(m[0])]) == m[0]),
                         None)
            if match is None:
                current.tokens.append(token)
                current.weights.append(weight)
                position += 1
                continue
            ids, key, vectors = match
            if len(current.tokens) + vectors > CHUNK_TOKENS:
                next_chunk()
            current.fixes.append((len(current.tokens), key))
            current.tokens += [0] * vectors
            current.weights += [weight] * vectors
            position += len(ids)
    if current.tokens or not chunks:
        next_chunk(is_last=True)
    return Encoding(chunks, token_count)


@dataclass(frozen=True)
class LoraTag:
    """An A1111 `<lora:NAME:TE:UNET>` tag: the LoRA's name and its two multipliers."""

    name: str
    te: float  # text-encoder multiplier
    unet: float  # UNet multiplier
    written: str  # the tag as the prompt has it


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
            parts = item.split("=", 2)
            if len(parts) == 2:
                named[parts[0]] = parts[1]
            else:
                positional.append(item)
        if not positional or not positional[0].strip():
            raise ValueError(f"{written}: the tag names no LoRA")
        if len(positional) > 3 or "dyn" in named:
            raise ValueError(f"{written}: `dyn` (a LoRA rank cut) is not supported; write <lora:NAME:TE:UNET>")
        te = _multiplier(written, positional[1]) if len(positional) > 1 else 1.0
        te = _multiplier(written, named["te"]) if "te" in named else te
        unet = _multiplier(written, positional[2]) if len(positional) > 2 else te
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
        raise ValueError(f"{tag}: the weight must be between -{MAX_LORA_WEIGHT:g} and {MAX_LORA_WEIGHT:g}, "
                         f"got {value!r}")
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
