"""Prompt encoding as A1111 does it, with CLIP skip, done by gridrender rather than diffusers.

A prompt becomes 75-token chunks (`scheduler.prompts`), each wrapped in BOS/EOS and
encoded on its own; `clip_skip: N` takes the output of encoder layer L-N+1 (1-based,
of L layers) and applies the encoder's final LayerNorm: 1 is the last layer, 2 the
penultimate. Each token's output is multiplied by its emphasis weight, then the
chunk is rescaled to its original mean (A1111's "Original" emphasis), and the
chunks are concatenated: a prompt of k chunks gives a (77k, width) conditioning.
diffusers' own `clip_skip` counts from 0, skips the negative prompt, and breaks on
transformers >= 5.6, where CLIPTextModel lost its `.text_model` wrapper.

Token ids are those of A1111's tokenizers: ftfy's text fixes first (transformers' slow
CLIPTokenizer applies them when ftfy is installed, as in A1111), and for SDXL's second
encoder open_clip's cleaning (ftfy, HTML unescaped twice), each encoder chunking the text
with its own tokenizer as A1111 does.

SDXL (A1111's sd_hijack_clip.py / sd_hijack_open_clip.py around sgm's GeneralConditioner):
both encoders read every chunk, the second (OpenCLIP bigG) with every id after the
first EOS set to 0; each takes the penultimate layer's output without the final
LayerNorm (clip_skip N >= 3: layer L-N+1 of both, as Forge and ComfyUI), emphasis
applies per encoder and chunk, and the states are concatenated, CLIP-L first. The
pooled vector is the second encoder's projection of its final-normed last layer at
the first chunk's EOS.

One pass yields everything a chunk of cells needs: every chunk of every distinct
text goes through the encoder(s) in one batch, forward hooks capture the layers the
CLIP skips need, and the pass stops after the deepest of them. The batch always
has ROWS rows (padded with empty chunks; more rows take more passes): kernels pick
their blocking by shape, so a fixed shape makes a text's encoding bit-identical
whatever other texts share the pass.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from gridrender.scheduler.errors import RenderError
from gridrender.scheduler.prompts import Encoding, Vocabulary, chunk_prompt
from gridrender.scheduler.tokens import clip_clean, open_clip_clean

ROWS = 8  # 77-token rows per encoder pass
EMBEDDING_KEYS = ("clip_l", "clip_g")  # an SDXL embedding's vectors for each encoder (A1111's names)
# What each encoder's tokenizer does to the text in A1111: transformers' CLIPTokenizer with ftfy,
# then (SDXL's second) open_clip's SimpleTokenizer, which also unescapes HTML twice.
CLEANERS = (clip_clean, open_clip_clean)
# An embedding's vectors: one tensor (SD 1.x), or one per encoder (SDXL)
Vectors = torch.Tensor | Mapping[str, torch.Tensor]


class _Enough(Exception):
    """Raised from a hook once every needed layer has been captured."""


def text_transformer(encoder: torch.nn.Module) -> Any:
    """The module holding embeddings, encoder.layers and final_layer_norm (any transformers)."""
    return getattr(encoder, "text_model", encoder)


def clip_layers(encoder: torch.nn.Module) -> int:
    return len(text_transformer(encoder).encoder.layers)


def clip_layer_for(skip: int, layers: int) -> int:
    """The 1-based encoder layer whose output `clip_skip: skip` uses."""
    if not 1 <= skip <= layers:
        raise ValueError(f"clip_skip must lie in 1..{layers}, got {skip}")
    return layers - skip + 1


def xl_layer_for(skip: int, layers: int) -> int:
    """SDXL: the 1-based layer of an encoder of `layers` that `clip_skip: skip` uses (1 and 2: the penultimate)."""
    if not 1 <= skip <= layers:
        raise ValueError(f"clip_skip must lie in 1..{layers}, got {skip}")
    return layers + 1 - max(skip, 2)


@dataclass(frozen=True)
class Encoded:
    """A text's conditioning for one CLIP skip, and how A1111 counts its tokens."""

    embedding: torch.Tensor  # (77 * chunks, width); SDXL: both encoders' states side by side
    tokens: int
    chunks: int
    pooled: torch.Tensor | None = None  # SDXL: the second encoder's projection at the first chunk's EOS


class PromptEncoder:
    """SD 1.x's one CLIP encoder, or SDXL's two (`encoder_2`: CLIPTextModelWithProjection)."""

    def __init__(self, tokenizer: Any, encoder: torch.nn.Module, encoder_2: torch.nn.Module | None = None):
        self.tokenizer = tokenizer
        self.encoder = encoder
        self.encoders = [encoder] if encoder_2 is None else [encoder, encoder_2]
        self.xl = encoder_2 is not None
        self.model: Any = text_transformer(encoder)
        self.layers = min(clip_layers(e) for e in self.encoders)  # the largest clip_skip
        vocab = tokenizer.get_vocab()
        self.vocab = Vocabulary(tokenizer.bos_token_id, tokenizer.eos_token_id, vocab.get(",</w>"))
        self.passes = 0  # text-encoder forward passes (one per ROWS rows, every encoder), for logs and benchmarks

    def layers_for(self, skip: int) -> list[int]:
        """The 1-based layer each encoder's output is taken from for `clip_skip: skip`."""
        if self.xl:
            return [xl_layer_for(skip, clip_layers(e)) for e in self.encoders]
        return [clip_layer_for(skip, clip_layers(self.encoder))]

    def describe(self, skip: int) -> list[dict[str, Any]]:
        """What a record says about each encoder for this skip: its layer, of how many, and whether normed."""
        names = ["text_encoder", "text_encoder_2"][: len(self.encoders)]
        return [
            {"encoder": name, "layer": layer, "layers": clip_layers(e), "final_layer_norm": not self.xl}
            for name, e, layer in zip(names, self.encoders, self.layers_for(skip), strict=True)
        ]

    def tokenize(self, texts: Sequence[str], encoder: int = 0) -> list[list[int]]:
        """Token ids of `texts` as encoder `encoder`'s tokenizer makes them in A1111 (CLEANERS)."""
        clean = CLEANERS[encoder]
        ids: list[list[int]] = self.tokenizer([clean(t) for t in texts], truncation=False, add_special_tokens=False)["input_ids"]
        return ids

    def chunk(self, text: str, embeddings: Mapping[str, Vectors] | None = None, encoder: int = 0) -> Encoding:
        """A1111's chunks of `text` for one encoder; `embeddings` maps trigger words to their vectors.

        Each SDXL encoder chunks the text with its own tokenizer (A1111 wraps each embedder in
        its own FrozenCLIPEmbedderWithCustomWordsBase); a trigger's ids are the first
        tokenizer's for both (the embedding database registers them through
        GeneralConditioner.tokenize, the first embedder).
        """
        # slots: an SDXL embedding's clip_g count (textual_inversion.py: vectors = data['clip_g'].shape[0])
        triggers = {
            tuple(ids): (word, len(_vectors_for(vectors, 1 if self.xl else 0, self.xl)))
            for word, vectors in (embeddings or {}).items()
            if (ids := self.tokenize([word])[0])
        }
        return chunk_prompt(text, lambda pieces: self.tokenize(pieces, encoder), self.vocab, triggers)

    @torch.no_grad()
    def encode(
        self, texts: Sequence[str], skips: set[int], embeddings: Mapping[str, Vectors] | None = None
    ) -> dict[tuple[str, int], Encoded]:
        """(text, clip skip) -> conditioning, for every text and skip, from one encoder pass.

        `embeddings` (trigger word -> vectors) are A1111's textual inversions: a trigger's
        slots get the vectors in place of token embeddings, as EmbeddingsWithFixes does
        (SDXL: each encoder its own, `clip_l` and `clip_g`).
        """
        texts = list(dict.fromkeys(texts))
        # Each encoder's own chunks: the same but where its tokenizer reads the text otherwise.
        encodings = [[self.chunk(text, embeddings, index) for text in texts] for index in range(len(self.encoders))]
        for text, *chunked in zip(texts, *encodings, strict=True):
            if len({len(e.chunks) for e in chunked}) > 1:  # A1111: torch.cat of the two states fails
                raise RenderError(
                    f"SDXL's two tokenizers split {text[:60]!r} into different numbers of 75-token "
                    "chunks (HTML entities that only OpenCLIP's tokenizer unescapes); A1111 cannot "
                    "render it either"
                )
        rows = [[chunk for encoding in per_encoder for chunk in encoding.chunks] for per_encoder in encodings]
        weights = [
            torch.tensor([row.weights for row in rows_i], dtype=torch.float32, device=self.model.device) for rows_i in rows
        ]
        states: list[dict[int, torch.Tensor]] = []
        pooled: torch.Tensor | None = None
        for index, encoder in enumerate(self.encoders):
            tokens = [row.tokens if index == 0 else self._pad_after_eos(row.tokens) for row in rows[index]]
            fixes = [
                [(offset, _vectors_for((embeddings or {})[word], index, self.xl)) for offset, word in row.fixes]
                for row in rows[index]
            ]
            wanted = {self.layers_for(s)[index] for s in skips}
            pool = self.xl and index == 1
            hidden, pool_out = self._layers(encoder, tokens, wanted, fixes, pool)
            states.append(hidden)
            pooled = pool_out if pool else pooled
        self.passes += -(-len(rows[0]) // ROWS)
        result = {}
        for skip in skips:
            parts = []
            for index, (encoder, hidden) in enumerate(zip(self.encoders, states, strict=True)):
                z = hidden[self.layers_for(skip)[index]]
                if not self.xl:
                    z = text_transformer(encoder).final_layer_norm(z)
                parts.append(emphasize(z, weights[index]))  # each encoder its own emphasis and mean
            z = torch.cat(parts, dim=-1)
            start = 0
            for text, encoding in zip(texts, encodings[0], strict=True):  # A1111 counts with the first
                count = len(encoding.chunks)
                embedding = z[start : start + count].reshape(-1, z.shape[-1])
                first = pooled[start] if pooled is not None else None
                result[(text, skip)] = Encoded(embedding, encoding.token_count, count, first)
                start += count
        return result

    def _pad_after_eos(self, tokens: list[int]) -> list[int]:
        """OpenCLIP's rows as A1111 makes them: every id after the first EOS is 0 (its id_pad)."""
        end = tokens.index(self.vocab.eos) + 1
        return tokens[:end] + [0] * (len(tokens) - end)

    def _layers(
        self, encoder: torch.nn.Module, tokens: list[list[int]], wanted: set[int], fixes: list[list[Any]], pool: bool
    ) -> tuple[dict[int, torch.Tensor], torch.Tensor | None]:
        """The outputs of the `wanted` 1-based encoder layers for rows of 77 token ids (and the pooled vectors)."""
        empty = [self.vocab.bos] + [self.vocab.eos] * (len(tokens[0]) - 1)
        if pool:
            empty = self._pad_after_eos(empty)
            wanted = wanted | {clip_layers(encoder)}
        parts = []
        for start in range(0, len(tokens), ROWS):
            rows = tokens[start : start + ROWS]
            padding = ROWS - len(rows)
            batch = rows + [empty] * padding
            outputs = self._pass(encoder, batch, wanted, fixes[start : start + ROWS] + [[]] * padding)
            if pool:
                outputs[0] = _pooled(encoder, outputs[clip_layers(encoder)], batch, self.vocab.eos)
            parts.append({layer: out[: len(rows)] for layer, out in outputs.items()})
        hidden = {layer: torch.cat([part[layer] for part in parts]) for layer in wanted}
        return hidden, (torch.cat([part[0] for part in parts]) if pool else None)

    def _pass(
        self, encoder: torch.nn.Module, tokens: list[list[int]], wanted: set[int], fixes: list[list[Any]]
    ) -> dict[int, torch.Tensor]:
        model = text_transformer(encoder)
        deepest = max(wanted)
        captured: dict[int, torch.Tensor] = {}

        def inject(_module: torch.nn.Module, _args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
            """A1111's EmbeddingsWithFixes: the embedding's vectors after BOS + offset."""
            for row, row_fixes in enumerate(fixes):
                for offset, vectors in row_fixes:
                    count = min(output.shape[1] - offset - 1, vectors.shape[0])
                    output[row, offset + 1 : offset + 1 + count] = vectors[:count].to(output.dtype)
            return output

        def capture(layer: int) -> Callable[[torch.nn.Module, tuple[Any, ...], Any], None]:
            def hook(_module: torch.nn.Module, _args: tuple[Any, ...], output: Any) -> None:
                captured[layer] = output[0] if isinstance(output, tuple) else output
                if layer == deepest:
                    raise _Enough

            return hook

        handles = [model.encoder.layers[layer - 1].register_forward_hook(capture(layer)) for layer in wanted]
        if any(fixes):
            handles.append(model.embeddings.token_embedding.register_forward_hook(inject))
        try:
            model(input_ids=torch.tensor(tokens, device=model.device))
        except _Enough:
            pass
        finally:
            for handle in handles:
                handle.remove()
        return captured


def _pooled(encoder: torch.nn.Module, last: torch.Tensor, tokens: list[list[int]], eos: int) -> torch.Tensor:
    """sgm's FrozenOpenCLIPEmbedder2.pool: the final-normed last layer at each row's (first) EOS, projected."""
    normed = text_transformer(encoder).final_layer_norm(last)
    at = torch.tensor([row.index(eos) for row in tokens], device=normed.device)
    picked = normed[torch.arange(normed.shape[0], device=normed.device), at]
    projection: Any = encoder.text_projection
    pooled: torch.Tensor = projection(picked)
    return pooled


def _vectors_for(vectors: Vectors, index: int, xl: bool) -> torch.Tensor:
    """An embedding's vectors for encoder `index`: SDXL files hold `clip_l` and `clip_g`."""
    if isinstance(vectors, torch.Tensor):
        return vectors
    return vectors[EMBEDDING_KEYS[index] if xl else EMBEDDING_KEYS[0]]


def emphasize(z: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """A1111's "Original" emphasis, per 77-token row: weight each token, then restore the row's mean."""
    original = z.mean(dim=(1, 2), keepdim=True)
    z = z * weights.unsqueeze(-1)  # float32 weights: fp16 outputs are weighted in float32, as in A1111
    return z * (original / z.mean(dim=(1, 2), keepdim=True))
