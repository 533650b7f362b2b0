"""Prompt encoding with A1111's CLIP skip, done by gridrender rather than diffusers.

`clip_skip: N` takes the output of encoder layer L-N+1 (1-based, of L layers) and
applies the encoder's final LayerNorm: 1 is the last layer, 2 the penultimate.
diffusers' own `clip_skip` counts from 0, skips the negative prompt, and breaks on
transformers >= 5.6, where CLIPTextModel lost its `.text_model` wrapper.

One pass yields every requested skip: forward hooks capture the layers we need and
stop the pass after the deepest of them, so skipping layers really skips work.
"""
from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)


class _Enough(Exception):
    """Raised from a hook once every needed layer has been captured."""


def text_transformer(encoder: torch.nn.Module) -> torch.nn.Module:
    """The module holding embeddings, encoder.layers and final_layer_norm (any transformers)."""
    return getattr(encoder, "text_model", encoder)


def clip_layers(encoder: torch.nn.Module) -> int:
    return len(text_transformer(encoder).encoder.layers)


def clip_layer_for(skip: int, layers: int) -> int:
    """The 1-based encoder layer whose output `clip_skip: skip` uses."""
    if not 1 <= skip <= layers:
        raise ValueError(f"clip_skip must lie in 1..{layers}, got {skip}")
    return layers - skip + 1


class PromptEncoder:
    def __init__(self, tokenizer, encoder: torch.nn.Module):
        self.tokenizer = tokenizer
        self.encoder = encoder
        self.model = text_transformer(encoder)
        self.layers = clip_layers(encoder)
        self.passes = 0  # text-encoder forward passes, for logs and benchmarks
        self.texts = 0  # texts encoded over all passes

    def tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        max_length = self.tokenizer.model_max_length
        tokens = self.tokenizer(texts, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt")
        for text in texts:
            if len(self.tokenizer(text).input_ids) > max_length:
                log.warning("prompt longer than %d tokens is truncated: %r", max_length, text[:80])
        return tokens

    @torch.no_grad()
    def encode(self, texts: list[str], skips: set[int]) -> dict[int, torch.Tensor]:
        """Embeddings of `texts` for each CLIP skip in `skips`, from one encoder pass."""
        wanted = {clip_layer_for(skip, self.layers) for skip in skips}
        deepest = max(wanted)
        captured: dict[int, torch.Tensor] = {}

        def capture(layer: int):
            def hook(_module, _args, output):
                captured[layer] = output[0] if isinstance(output, tuple) else output
                if layer == deepest:
                    raise _Enough

            return hook

        device = self.model.device
        tokens = self.tokenize(texts)
        kwargs = {"input_ids": tokens.input_ids.to(device)}
        if getattr(self.encoder.config, "use_attention_mask", False):
            kwargs["attention_mask"] = tokens.attention_mask.to(device)
        handles = [self.model.encoder.layers[layer - 1].register_forward_hook(capture(layer)) for layer in wanted]
        try:
            self.model(**kwargs)
        except _Enough:
            pass
        finally:
            for handle in handles:
                handle.remove()
        self.passes += 1
        self.texts += len(texts)
        norm = self.model.final_layer_norm
        return {skip: norm(captured[clip_layer_for(skip, self.layers)]) for skip in skips}
