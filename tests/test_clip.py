"""CLIP skip exactly as DESIGN.md: layer L-N+1, then the final LayerNorm, for both prompts."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from gridrender.scheduler.errors import JobError
from gridrender.scheduler.grid import make_cell
from gridrender.scheduler.models import resolve
from gridrender.scheduler.plan import prepare
from gridrender.workers.clip import PromptEncoder, clip_layer_for, text_transformer

PROMPTS = ["a cow standing in a field", "lowres, blurry", ""]


@pytest.fixture(scope="module")
def pipe(renderer, tiny):
    return renderer.cache.get(tiny, "float32").pipe


def reference(pipe, texts, skip):
    """Straight from transformers' hidden_states: final_layer_norm(hidden_states[-N]).

    Encoded as gridrender batches rows (padded to ROWS with empty prompts), so that
    both sides run the same kernels and can be compared bit for bit.
    """
    from gridrender.workers.clip import ROWS

    padded = list(texts) + [""] * (ROWS - len(texts))
    ids = pipe.tokenizer(padded, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        out = pipe.text_encoder(ids, output_hidden_states=True)
        assert len(out.hidden_states) == 12 + 1  # embeddings + every layer
        return text_transformer(pipe.text_encoder).final_layer_norm(out.hidden_states[-skip])[: len(texts)]


def encoded(encoder, texts, skips):
    """gridrender's conditioning of `texts` per skip, stacked like the reference."""
    result = encoder.encode(texts, set(skips))
    return {skip: torch.stack([result[(t, skip)].embedding for t in texts]) for skip in skips}


@pytest.mark.parametrize("skip", [1, 2, 3, 12])
def test_skip_n_is_final_norm_of_hidden_states_minus_n(pipe, skip):
    encoder = PromptEncoder(pipe.tokenizer, pipe.text_encoder)
    ours = encoded(encoder, PROMPTS, {skip})[skip]
    torch.testing.assert_close(ours, reference(pipe, PROMPTS, skip), rtol=0, atol=0)


def test_one_pass_yields_every_skip(pipe):
    encoder = PromptEncoder(pipe.tokenizer, pipe.text_encoder)
    both = encoded(encoder, PROMPTS, {1, 2, 5})
    assert encoder.passes == 1
    for skip in (1, 2, 5):
        torch.testing.assert_close(both[skip], reference(pipe, PROMPTS, skip), rtol=0, atol=0)


def test_skip_1_equals_the_pipelines_own_embedding(pipe):
    """The same numbers as diffusers' encode_prompt, up to rounding: diffusers encodes one
    prompt per call, gridrender a fixed batch of rows (kernels round by batch shape)."""
    encoder = PromptEncoder(pipe.tokenizer, pipe.text_encoder)
    ours = encoded(encoder, ["a cow standing in a field", "lowres, blurry"], {1})[1]
    with torch.no_grad():  # the shared pipeline has run under inference_mode: no autograd here
        positive, negative = pipe.encode_prompt(
            "a cow standing in a field", torch.device("cpu"), 1, True, negative_prompt="lowres, blurry"
        )
    torch.testing.assert_close(ours[0], positive[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(ours[1], negative[0], rtol=0, atol=1e-5)


def test_deeper_skips_stop_the_pass_early(pipe):
    encoder = PromptEncoder(pipe.tokenizer, pipe.text_encoder)
    ran = []
    handles = [
        layer.register_forward_hook(lambda _m, _a, _o, i=i: ran.append(i))
        for i, layer in enumerate(text_transformer(pipe.text_encoder).encoder.layers)
    ]
    try:
        encoder.encode(["x"], {3})
    finally:
        for h in handles:
            h.remove()
    assert ran == list(range(10))  # layers 1..10 of 12; 11 and 12 never run


def test_layer_numbering():
    assert clip_layer_for(1, 12) == 12
    assert clip_layer_for(2, 12) == 11
    with pytest.raises(ValueError):
        clip_layer_for(13, 12)
    with pytest.raises(ValueError):
        clip_layer_for(0, 12)


def test_render_applies_the_skip_to_positive_and_negative_prompt(renderer, tiny, pipe):
    """A cell rendered by gridrender (diffusers' Euler a class) equals diffusers fed the reference embeddings."""
    from diffusers import EulerAncestralDiscreteScheduler

    cell = make_cell(
        tiny,
        prompt="a cow standing in a field",
        negative_prompt="lowres, blurry",
        clip_skip=2,
        seed=7,
        sampler="EulerAncestralDiscreteScheduler",
        steps=3,
        guidance=7.0,
        width=64,
        height=64,
        dtype="float32",
        rng="CPU",
    )  # diffusers' own draw from the generator the pipeline is given
    ours = np.asarray(renderer.render(tiny, [cell])[0].image)
    embeds = reference(pipe, ["a cow standing in a field", "lowres, blurry"], 2)
    pipe.scheduler = EulerAncestralDiscreteScheduler.from_config(renderer.cache.get(tiny, "float32").scheduler_config)
    theirs = pipe(
        prompt_embeds=embeds[:1],
        negative_prompt_embeds=embeds[1:],
        num_inference_steps=3,
        guidance_scale=7.0,
        width=64,
        height=64,
        generator=torch.Generator("cpu").manual_seed(7),
        output_type="np",
    ).images[0]
    theirs = (theirs * 255).round().astype(np.uint8)
    assert np.abs(ours.astype(int) - theirs.astype(int)).max() == 0
    # and the skip matters: the skip-1 image differs
    other = renderer.render(tiny, [cell.replace(clip_skip=1)])[0]
    assert np.abs(np.asarray(other.image).astype(int) - ours.astype(int)).max() > 0


def test_clip_skip_beyond_the_models_layers_is_rejected_at_validation(job_file, tiny_folder, tmp_path):
    # A model folder whose text encoder has 6 layers: L is read from the model, not assumed.
    folder = tmp_path / "six-layers"
    shutil.copytree(tiny_folder, folder)
    config_path = folder / "text_encoder" / "config.json"
    config = json.loads(config_path.read_text())
    config["num_hidden_layers"] = 6
    config_path.write_text(json.dumps(config))
    assert resolve(str(folder)).clip_layers == 6
    prepare(job_file(model=str(folder), clip_skip=[1, 6]), cuda=False)
    with pytest.raises(JobError) as info:
        prepare(job_file(model=str(folder), clip_skip=[1, 7]), cuda=False)
    (problem,) = info.value.problems
    assert problem.field == "clip_skip" and problem.line and "outside 1..6" in problem.message


def test_skip_above_2_is_allowed_with_a_warning(job_file):
    plan = prepare(job_file(clip_skip=[1, 3]), cuda=False)
    assert [p.field for p in plan.warnings] == ["clip_skip"]
