"""A1111's text side, written here from the upstream sources, so references never call gridrender:

- `parse_prompt_attention`: A1111 modules/prompt_parser.py (re_attention, re_break, the function).
- `ReferenceTokenizer`: CLIP's byte-level BPE as open_clip's tokenizer.py SimpleTokenizer builds it
  (bytes_to_unicode, the vocabulary made from the merges, get_pairs, bpe, encode), with the text
  cleaning of each tokenizer A1111 uses for SDXL:
  - "hf": transformers' slow CLIPTokenizer._tokenize with ftfy installed (A1111's CLIP-L, through
    sgm's FrozenCLIPEmbedder): `whitespace_clean(ftfy.fix_text(text)).lower()`, the pattern with
    `<|startoftext|>` / `<|endoftext|>`;
  - "open_clip": open_clip's SimpleTokenizer.encode with clean "lower" (A1111's OpenCLIP bigG,
    sd_hijack_open_clip.py): `whitespace_clean(basic_clean(text)).lower()`, basic_clean being
    ftfy.fix_text, html.unescape twice, strip.
  The merges are read from the merges.txt gridrender ships (the lines of open_clip's
  bpe_simple_vocab_16e6.txt after its header); the vocabulary is built from them here, as
  SimpleTokenizer does, not read from the shipped vocab.json.
"""

from __future__ import annotations

import html
import re
from pathlib import Path
from typing import Any

import ftfy
import regex

# -- modules/prompt_parser.py ---------------------------------------------------------------------

re_attention = re.compile(
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

re_break = re.compile(r"\s*\bBREAK\b\s*", re.S)


def parse_prompt_attention(text: str) -> list[list[Any]]:  # noqa: C901, PLR0912  (A1111's function as written)
    res: list[list[Any]] = []
    round_brackets: list[int] = []
    square_brackets: list[int] = []

    round_bracket_multiplier = 1.1
    square_bracket_multiplier = 1 / 1.1

    def multiply_range(start_position: int, multiplier: float) -> None:
        for p in range(start_position, len(res)):
            res[p][1] *= multiplier

    for m in re_attention.finditer(text):
        text = m.group(0)
        weight = m.group(1)

        if text.startswith("\\"):
            res.append([text[1:], 1.0])
        elif text == "(":
            round_brackets.append(len(res))
        elif text == "[":
            square_brackets.append(len(res))
        elif weight is not None and round_brackets:
            multiply_range(round_brackets.pop(), float(weight))
        elif text == ")" and round_brackets:
            multiply_range(round_brackets.pop(), round_bracket_multiplier)
        elif text == "]" and square_brackets:
            multiply_range(square_brackets.pop(), square_bracket_multiplier)
        else:
            parts = re.split(re_break, text)
            for i, part in enumerate(parts):
                if i > 0:
                    res.append(["BREAK", -1])
                res.append([part, 1.0])

    for pos in round_brackets:
        multiply_range(pos, round_bracket_multiplier)

    for pos in square_brackets:
        multiply_range(pos, square_bracket_multiplier)

    if len(res) == 0:
        res = [["", 1.0]]

    i = 0
    while i + 1 < len(res):
        if res[i][1] == res[i + 1][1]:
            res[i][0] += res[i + 1][0]
            res.pop(i + 1)
        else:
            i += 1

    return res


# -- open_clip/tokenizer.py, transformers' tokenization_clip.py (slow) -------------------------------


def bytes_to_unicode() -> dict[int, str]:
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(2**8):
        if b not in bs:
            bs.append(b)
            cs.append(2**8 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs], strict=True))


def get_pairs(word: tuple[str, ...]) -> set[tuple[str, str]]:
    pairs = set()
    prev_char = word[0]
    for char in word[1:]:
        pairs.add((prev_char, char))
        prev_char = char
    return pairs


def basic_clean(text: str) -> str:
    text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text))
    return text.strip()


def whitespace_clean(text: str) -> str:
    text = " ".join(text.split())
    return text.strip()


def hf_whitespace_clean(text: str) -> str:
    text = regex.sub(r"\s+", " ", text)
    return text.strip()


class ReferenceTokenizer:
    """An HF-like face (`__call__`, bos/eos ids, get_vocab) over SimpleTokenizer's BPE."""

    def __init__(self, merges_txt: Path, flavour: str):
        lines = merges_txt.read_text(encoding="utf-8").split("\n")
        merges = [tuple(m.split()) for m in lines[1 : 49152 - 256 - 2 + 1]]
        vocab = list(bytes_to_unicode().values())
        vocab = vocab + [v + "</w>" for v in vocab]
        for merge in merges:
            vocab.append("".join(merge))
        specials = ["<|startoftext|>", "<|endoftext|>"] if flavour == "hf" else ["<start_of_text>", "<end_of_text>"]
        vocab.extend(specials)
        self.encoder = dict(zip(vocab, range(len(vocab)), strict=True))
        self.bpe_ranks = dict(zip(merges, range(len(merges)), strict=True))
        self.cache = {t: t for t in specials}
        self.byte_encoder = bytes_to_unicode()
        self.flavour = flavour
        self.pat = regex.compile(
            "|".join(regex.escape(t) for t in specials) + r"""|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
            regex.IGNORECASE,
        )
        self.bos_token_id, self.eos_token_id = self.encoder[specials[0]], self.encoder[specials[1]]

    def get_vocab(self) -> dict[str, int]:
        return self.encoder

    def bpe(self, token: str) -> str:
        if token in self.cache:
            return self.cache[token]
        word = (*token[:-1], token[-1] + "</w>")
        pairs = get_pairs(word)
        if not pairs:
            return token + "</w>"
        while True:
            bigram = min(pairs, key=lambda pair: self.bpe_ranks.get(pair, float("inf")))
            if bigram not in self.bpe_ranks:
                break
            first, second = bigram
            new_word: list[str] = []
            i = 0
            while i < len(word):
                try:
                    j = word.index(first, i)
                    new_word.extend(word[i:j])
                    i = j
                except ValueError:
                    new_word.extend(word[i:])
                    break
                if word[i] == first and i < len(word) - 1 and word[i + 1] == second:
                    new_word.append(first + second)
                    i += 2
                else:
                    new_word.append(word[i])
                    i += 1
            word = tuple(new_word)
            if len(word) == 1:
                break
            pairs = get_pairs(word)
        joined = " ".join(word)
        self.cache[token] = joined
        return joined

    def encode(self, text: str) -> list[int]:
        if self.flavour == "hf":
            text = hf_whitespace_clean(ftfy.fix_text(text)).lower()
        else:
            text = whitespace_clean(basic_clean(text)).lower()
        ids = []
        for token in regex.findall(self.pat, text):
            symbols = "".join(self.byte_encoder[b] for b in token.encode("utf-8"))
            ids.extend(self.encoder[t] for t in self.bpe(symbols).split(" "))
        return ids

    # transformers' tokenizer call, as gridrender makes it: never truncating, no special tokens either way.
    def __call__(
        self,
        texts: list[str],
        truncation: bool = False,  # noqa: ARG002
        add_special_tokens: bool = False,  # noqa: ARG002
    ) -> dict[str, Any]:
        return {"input_ids": [self.encode(t) for t in texts]}
