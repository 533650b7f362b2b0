"""Prompt encoding as A1111 does it, with CLIP skip, done by gridrender rather than diffusers.

A prompt becomes 75-token chunks (`scheduler.prompts`), each wrapped in BOS/EOS and
encoded on its own; `clip_skip: N` takes the output of encoder layer L-N+1 (1-based,
of L layers) and applies the encoder's final LayerNorm: 1 is the last layer, 2 the
penultimate. Each token's output is multiplied by its emphasis weight, then the
chunk is rescaled to its original mean (A1111's "Original" emphasis), and the
chunks are concatenated: a prompt of k chunks gives a (77k, width) conditioning.
diffusers' own `clip_skip` counts from 0, skips the negative prompt, and breaks on
transformers >= 5.6, where CLIPTextModel lost its `.text_model` wrapper.

One pass yields everything a chunk of cells needs: every chunk of every distinct
text goes through the encoder in one batch, forward hooks capture the layers the
CLIP skips need, and the pass stops after the deepest of them. The batch always
has ROWS rows (padded with empty chunks; more rows take more passes): kernels pick
their blocking by shape, so a fixed shape makes a text's encoding bit-identical
whatever other texts share the pass.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from gridrender.scheduler.prompts import Encoding, Vocabulary, chunk_prompt

ROWS = 8  # 77-token rows per encoder pass


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


@dataclass(frozen=True)
class Encoded:
    """A text's conditioning for one CLIP skip, and how A1111 counts its tokens."""

    embedding: torch.Tensor  # (77 * chunks, width)
    tokens: int
    chunks: int


class PromptEncoder:
    def __init__(self, tokenizer: Any, encoder: torch.nn.Module):
        self.tokenizer = tokenizer
        self.encoder = encoder
        self.model: Any = text_transformer(encoder)
        self.layers = clip_layers(encoder)
        vocab = tokenizer.get_vocab()
        self.vocab = Vocabulary(tokenizer.bos_token_id, tokenizer.eos_token_id, vocab.get(",</w>"))
        self.passes = 0  # text-encoder forward passes, for logs and benchmarks

    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        return self.tokenizer(list(texts), truncation=False, add_special_tokens=False)["input_ids"]

    def chunk(self, text: str, embeddings: dict[str, torch.Tensor] | None = None) -> Encoding:
        """A1111's chunks of `text`; `embeddings` maps trigger words to their vectors."""
        triggers = {tuple(ids): (word, len(vectors)) for word, vectors in (embeddings or {}).items()
                    if (ids := self.tokenize([word])[0])}
        return chunk_prompt(text, self.tokenize, self.vocab, triggers)

    @torch.no_grad()
    def encode(self, texts: Sequence[str], skips: set[int],
               embeddings: dict[str, torch.Tensor] | None = None) -> dict[tuple[str, int], Encoded]:
        """(text, clip skip) -> conditioning, for every text and skip, from one encoder pass.

        `embeddings` (trigger word -> vectors) are A1111's textual inversions: a trigger's
        slots get the vectors in place of token embeddings, as EmbeddingsWithFixes does.
        """
        texts = list(dict.fromkeys(texts))
        encodings = [self.chunk(text, embeddings) for text in texts]
        rows = [chunk for encoding in encodings for chunk in encoding.chunks]
        fixes = [[(offset, (embeddings or {})[word]) for offset, word in row.fixes] for row in rows]
        hidden = self._layers([row.tokens for row in rows], {clip_layer_for(s, self.layers) for s in skips}, fixes)
        weights = torch.tensor([row.weights for row in rows], dtype=torch.float32, device=self.model.device)
        result = {}
        for skip in skips:
            z = self.model.final_layer_norm(hidden[clip_layer_for(skip, self.layers)])
            z = emphasize(z, weights)
            start = 0
            for text, encoding in zip(texts, encodings):
                count = len(encoding.chunks)
                embedding = z[start : start + count].reshape(-1, z.shape[-1])
                result[(text, skip)] = Encoded(embedding, encoding.token_count, count)
                start += count
        return result

    def _layers(self, tokens: list[list[int]], wanted: set[int], fixes: list[list]) -> dict[int, torch.Tensor]:
        """The outputs of the `wanted` 1-based encoder layers for rows of 77 token ids."""
        empty = [self.vocab.bos] + [self.vocab.eos] * (len(tokens[0]) - 1)
        parts = []
        for start in range(0, len(tokens), ROWS):
            rows = tokens[start : start + ROWS]
            padding = ROWS - len(rows)
            outputs = self._pass(rows + [empty] * padding, wanted, fixes[start : start + ROWS] + [[]] * padding)
            parts.append({layer: out[: len(rows)] for layer, out in outputs.items()})
        return {layer: torch.cat([part[layer] for part in parts]) for layer in wanted}

    def _pass(self, tokens: list[list[int]], wanted: set[int], fixes: list[list]) -> dict[int, torch.Tensor]:
        deepest = max(wanted)
        captured: dict[int, torch.Tensor] = {}

        def inject(_module, _args, output):
            """A1111's EmbeddingsWithFixes: the embedding's vectors after BOS + offset."""
            for row, row_fixes in enumerate(fixes):
                for offset, vectors in row_fixes:
                    count = min(output.shape[1] - offset - 1, vectors.shape[0])
                    output[row, offset + 1 : offset + 1 + count] = vectors[:count].to(output.dtype)
            return output

        def capture(layer: int):
            def hook(_module, _args, output):
                captured[layer] = output[0] if isinstance(output, tuple) else output
                if layer == deepest:
                    raise _Enough

            return hook

        handles = [self.model.encoder.layers[layer - 1].register_forward_hook(capture(layer)) for layer in wanted]
        if any(fixes):
            handles.append(self.model.embeddings.token_embedding.register_forward_hook(inject))
        try:
            self.model(input_ids=torch.tensor(tokens, device=self.model.device))
        except _Enough:
            pass
        finally:
            for handle in handles:
                handle.remove()
        self.passes += 1
        return captured


def emphasize(z: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """A1111's "Original" emphasis, per 77-token row: weight each token, then restore the row's mean."""
    original = z.mean(dim=(1, 2), keepdim=True)
    z = z * weights.unsqueeze(-1)  # float32 weights: fp16 outputs are weighted in float32, as in A1111
    return z * (original / z.mean(dim=(1, 2), keepdim=True))
