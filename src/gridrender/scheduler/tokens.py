"""CLIP tokenizers found without transformers: token and chunk counts at `validate`.

The tokenizer is built with HF `tokenizers` the way transformers' CLIPTokenizer
builds it (NFC, whitespace collapsed, lower case, CLIP's split pattern, byte-level
BPE with "</w>"), from the model's own vocab.json and merges.txt, after ftfy's fixes as
A1111's tokenizers make them (`clip_clean`; SDXL's second encoder: `open_clip_clean`),
so the scheduler counts what the worker will encode. A single-file checkpoint reads CLIP's BPE
vocabulary shipped with gridrender (`modelconfigs/clip`, derived from open_clip's
bpe_simple_vocab_16e6 the way CLIP's SimpleTokenizer builds it), so it needs no network
and no Hugging Face cache. Where no tokenizer is at hand (a hub model not cached yet),
counts are simply unavailable.
"""

from __future__ import annotations

import html
import json
from collections.abc import Sequence
from functools import cache, lru_cache
from pathlib import Path

import ftfy
from tokenizers import Regex, Tokenizer, normalizers, pre_tokenizers
from tokenizers.models import BPE

from .models import BUILTINS, CONFIG_ROOT, ModelSpec
from .prompts import Encoding, Vocabulary, chunk_prompt

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
# CLIP's vocabulary (SD 1.x and both SDXL encoders), shipped as package data.
CLIP_VOCAB = CONFIG_ROOT / "clip" / "vocab.json"
CLIP_MERGES = CONFIG_ROOT / "clip" / "merges.txt"
_SPLIT = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


def clip_clean(text: str) -> str:
    """What A1111's CLIP-L tokenizer does to a text before BPE, beyond what our normalizer does.

    transformers' slow CLIPTokenizer (A1111's, through ldm/sgm's FrozenCLIPEmbedder) reads
    `whitespace_clean(ftfy.fix_text(text)).lower()` when ftfy is installed (open_clip requires
    it); the fast tokenizer's normalizer collapses whitespace and lower-cases, not ftfy's fixes:
    curly quotes, full-width punctuation (，（）), ligatures, mojibake, HTML entities.
    """  # noqa: RUF002  (the full-width characters are the subject)
    return text if _nothing_to_fix(text) else ftfy.fix_text(text)


def open_clip_clean(text: str) -> str:
    """open_clip's basic_clean, which A1111's second SDXL encoder reads (sd_hijack_open_clip.py
    tokenizes with open_clip's SimpleTokenizer): ftfy.fix_text, then html.unescape twice, stripped."""
    if _nothing_to_fix(text):
        return text.strip()
    return html.unescape(html.unescape(ftfy.fix_text(text))).strip()


@lru_cache(maxsize=4096)  # per cell; a job has few distinct texts, and ftfy costs ~0.1 ms a text
def text_identity(text: str) -> str | tuple[str, str]:
    """A text's part of a cell id: the text itself, or marked when A1111's cleaning changes it.

    Cells rendered before gridrender applied ftfy and open_clip's HTML unescaping read such a
    text differently; marking it gives those cells new ids instead of new pixels under old
    ones. Texts the cleaning leaves alone keep their ids.
    """
    if _nothing_to_fix(text) or (clip_clean(text) == text and open_clip_clean(text) == text.strip()):
        return text
    return ("cleaned by ftfy+html", text)


def _nothing_to_fix(text: str) -> bool:
    """Printable ASCII without '&': ftfy and html.unescape leave it as it is (ftfy costs ~0.1 ms a text)."""
    return text.isascii() and text.isprintable() and "&" not in text


def byte_alphabet() -> list[str]:
    """CLIP's (and GPT-2's) printable stand-in character for each of the 256 bytes."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


def byte_vocab() -> dict[str, int]:
    """builtin:tiny's vocabulary: byte-level CLIP BPE with no merges, every character a token."""
    chars = byte_alphabet()
    tokens = chars + [c + "</w>" for c in chars] + [BOS, EOS]
    return {tok: i for i, tok in enumerate(tokens)}


class ClipTokenizer:
    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        vocab = tokenizer.get_vocab()
        self.vocab = Vocabulary(vocab[BOS], vocab[EOS], vocab.get(",</w>"))

    @classmethod
    def from_vocab(cls, vocab: dict[str, int], merges: list[str]) -> ClipTokenizer:
        pairs = [(a, b) for a, _, b in (m.partition(" ") for m in merges)]
        model = BPE(
            vocab=vocab, merges=pairs, continuing_subword_prefix="", end_of_word_suffix="</w>", fuse_unk=False, unk_token=EOS
        )
        tokenizer = Tokenizer(model)
        tokenizer.normalizer = normalizers.Sequence(
            [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
        )
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(_SPLIT), behavior="removed", invert=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False),
            ]
        )
        tokenizer.add_special_tokens([BOS, EOS])
        return cls(tokenizer)

    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        cleaned = [clip_clean(t) for t in texts]
        return [e.ids for e in self.tokenizer.encode_batch(cleaned, add_special_tokens=False)]

    def encode(self, text: str) -> Encoding:
        return chunk_prompt(text, self.tokenize, self.vocab)

    @classmethod
    def from_files(cls, vocab_json: Path, merges_txt: Path) -> ClipTokenizer:
        vocab = json.loads(Path(vocab_json).read_text(encoding="utf-8"))
        lines = Path(merges_txt).read_text(encoding="utf-8").splitlines()
        merges = [line for line in lines if line and not line.startswith("#version")]
        return cls.from_vocab(vocab, merges)


def _files_of(model: ModelSpec) -> tuple[Path, Path] | None:
    if model.kind == "folder":
        folder = Path(model.location) / "tokenizer"
        return folder / "vocab.json", folder / "merges.txt"
    if model.kind == "file":
        return CLIP_VOCAB, CLIP_MERGES
    from huggingface_hub import try_to_load_from_cache

    vocab, merges = (
        try_to_load_from_cache(model.location, f"tokenizer/{name}", revision=model.revision)
        for name in ("vocab.json", "merges.txt")
    )
    if isinstance(vocab, str) and isinstance(merges, str):
        return Path(vocab), Path(merges)
    return None


def uses_byte_vocab(model: ModelSpec) -> bool:
    """builtin:* models, and single files of their shapes, read the byte-level vocabulary."""
    return model.kind == "builtin" or (model.kind == "file" and model.config in BUILTINS)


@cache
def tokenizer_for(model: ModelSpec) -> ClipTokenizer | None:
    """The model's CLIP tokenizer, or None when its files are not on this machine."""
    if uses_byte_vocab(model):
        return ClipTokenizer.from_vocab(byte_vocab(), [])
    if model.kind == "folder" and (Path(model.location) / "tokenizer" / "tokenizer.json").is_file():
        # transformers >= 5 saves the fast tokenizer only: the same pipeline, serialized
        return ClipTokenizer(Tokenizer.from_file(str(Path(model.location) / "tokenizer" / "tokenizer.json")))
    files = _files_of(model)
    if files is None or not all(f.is_file() for f in files):
        return None
    return ClipTokenizer.from_files(*files)
