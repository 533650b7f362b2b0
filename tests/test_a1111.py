"""Same seed, same image as A1111: prompts, samplers and schedules against references.

The references are written here from A1111's own code (modules/prompt_parser.py,
sd_hijack_clip.py, sd_emphasis.py, sd_samplers_kdiffusion.py, sd_samplers_cfg_denoiser.py,
rng.py, processing.py) around k-diffusion's own sampling functions and
CompVisDenoiser, the library A1111's samplers come from. They run on a model folder
built here, not gridrender's builtin, whose scheduler config is what SD 1.5 folders
ship (leading timestep spacing, steps_offset 1): A1111's samplers ignore it, and so
must gridrender.
"""

from __future__ import annotations

import inspect
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from gridrender.scheduler import samplers
from gridrender.scheduler.grid import make_cell
from gridrender.scheduler.models import resolve
from gridrender.scheduler.prompts import parse_attention
from gridrender.workers.render import Renderer
from tests.conftest import ROOT
from tests.support import kdiffusion
from tests.support.a1111_text import parse_prompt_attention

WORDS = ["masterpiece", "best", "quality", "cow", "standing", "field", "lighthouse", "dusk", "lowres", "blurry"]
LONG_PROMPT = (
    "(masterpiece:1.2), best quality, [blurry], a cow standing in a field of ((sunflowers)), "
    "golden hour, volumetric light, highly detailed fur, (sharp focus:1.1), 85mm lens, bokeh, "
    "BREAK a lighthouse at dusk in the background, \\(cinematic\\), dramatic clouds, rim light, "
    "film grain, [[low contrast]], trending on artstation, award winning photograph of a cow"
)


def _merges_for(words):
    """BPE merges that build each word whole: exercises merges, unlike builtin:tiny's vocabulary."""
    merges, tokens = [], []
    for word in words:
        pieces = [*word[:-1], word[-1] + "</w>"]
        while len(pieces) > 1:
            merges.append((pieces[0], pieces[1]))
            pieces = [pieces[0] + pieces[1], *pieces[2:]]
            tokens.append(pieces[0])
    return list(dict.fromkeys(merges)), list(dict.fromkeys(tokens))


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory, private_cache):  # noqa: ARG001  (its own HF cache, for its side effect)
    """A small SD 1.x pipeline folder with its own weights, BPE merges and a 6-layer text encoder."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from gridrender.scheduler.models import config_dir
    from gridrender.scheduler.tokens import byte_vocab
    from gridrender.workers import builtin

    merges, merged = _merges_for(WORDS)
    vocab = byte_vocab()
    vocab.update({tok: len(vocab) + i for i, tok in enumerate(t for t in merged if t not in vocab)})
    src = config_dir("tiny")
    text_config = CLIPTextConfig.from_json_file(src / "text_encoder" / "config.json")
    text_config.num_hidden_layers, text_config.vocab_size = 6, len(vocab)
    text_config.bos_token_id, text_config.eos_token_id = vocab["<|startoftext|>"], vocab["<|endoftext|>"]
    rng = np.random.Generator(np.random.PCG64(7))
    unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(src / "unet"))
    vae = AutoencoderKL.from_config(AutoencoderKL.load_config(src / "vae"))
    encoder = CLIPTextModel(text_config)
    for module in (unet, vae, encoder):
        builtin._fill(module, rng)
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", timestep_spacing="leading", steps_offset=1
    )
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=encoder,
        tokenizer=CLIPTokenizer(vocab=vocab, merges=merges),
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    folder = tmp_path_factory.mktemp("a1111") / "cow-model"
    pipe.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def model(model_folder):
    return resolve(str(model_folder))


@pytest.fixture(scope="module")
def ours():
    return Renderer()


@pytest.fixture(scope="module")
def pipe(ours, model):
    return ours.cache.get(model, "float32").pipe


# -- A1111's prompt handling, written from modules/sd_hijack_clip.py --------------------------


def a1111_chunks(tokenizer, line):
    """FrozenCLIPEmbedderWithCustomWordsBase.tokenize_line with A1111's defaults."""
    chunk_length, backtrack = 75, 20
    id_start, id_end = tokenizer.bos_token_id, tokenizer.eos_token_id
    comma_token = tokenizer.get_vocab().get(",</w>")
    parsed = parse_prompt_attention(line)  # A1111's, not gridrender's
    tokenized = tokenizer([text for text, _ in parsed], truncation=False, add_special_tokens=False)["input_ids"]
    chunks, tokens, mults = [], [], []
    last_comma = -1

    def next_chunk():
        nonlocal tokens, mults, last_comma
        to_add = chunk_length - len(tokens)
        tokens, mults = tokens + [id_end] * to_add, mults + [1.0] * to_add
        chunks.append(([id_start, *tokens, id_end], [1.0, *mults, 1.0]))
        tokens, mults, last_comma = [], [], -1

    for ids, (text, weight) in zip(tokenized, parsed, strict=True):
        if text == "BREAK" and weight == -1:
            next_chunk()
            continue
        for token in ids:
            if token == comma_token:
                last_comma = len(tokens)
            elif len(tokens) == chunk_length and last_comma != -1 and len(tokens) - last_comma <= backtrack:
                cut = last_comma + 1
                moved_t, moved_m = tokens[cut:], mults[cut:]
                tokens, mults = tokens[:cut], mults[:cut]
                next_chunk()
                tokens, mults = moved_t, moved_m
            if len(tokens) == chunk_length:
                next_chunk()
            tokens.append(token)
            mults.append(weight)
    if tokens or not chunks:
        next_chunk()
    return chunks


@torch.no_grad()
def a1111_cond(pipe, text, clip_skip):
    """forward(): each chunk through the encoder alone, CLIP skip, "Original" emphasis, hstack."""
    zs = []
    for tokens, mults in a1111_chunks(pipe.tokenizer, text):
        outputs = pipe.text_encoder(input_ids=torch.asarray([tokens]), output_hidden_states=True)
        if clip_skip > 1:
            # transformer.text_model in A1111's transformers; transformers >= 5.6 dropped the wrapper
            z = getattr(pipe.text_encoder, "text_model", pipe.text_encoder).final_layer_norm(outputs.hidden_states[-clip_skip])
        else:
            z = outputs.last_hidden_state
        original_mean = z.mean()
        z = z * torch.asarray([mults]).reshape(1, -1, 1).expand(z.shape)
        z = z * (original_mean / z.mean())
        zs.append(z)
    return torch.hstack(zs)


# -- A1111's k-diffusion sampling, written from sd_samplers_kdiffusion.py and rng.py ---------


class TorchHijack:
    """A1111's replacement of k-diffusion's torch.randn_like: the next per-image CPU draws."""

    def __init__(self, generators, shape):
        self.generators, self.shape = generators, shape

    def __getattr__(self, item):
        if item == "randn_like":
            return lambda _x: torch.stack([torch.randn(self.shape, generator=g) for g in self.generators])
        return getattr(torch, item)


class LatentDiffusion(torch.nn.Module):
    """What CompVisDenoiser wraps: apply_model and the model's alphas_cumprod (LDM: float64, then float32)."""

    def __init__(self, unet, config):
        super().__init__()
        self.unet = unet
        betas = torch.linspace(config["beta_start"] ** 0.5, config["beta_end"] ** 0.5, 1000, dtype=torch.float64) ** 2
        self.alphas_cumprod = torch.cumprod(1 - betas, dim=0).to(torch.float32)

    def apply_model(self, x, t, cond):
        return self.unet(x, t, encoder_hidden_states=cond).sample


# A1111's samplers_k_diffusion (1.6+): k-diffusion function and the options that matter here.
A1111_TABLE = {
    "Euler a": ("sample_euler_ancestral", {}),
    "Euler": ("sample_euler", {}),
    "LMS": ("sample_lms", {}),
    "Heun": ("sample_heun", {}),
    "DPM2": ("sample_dpm_2", {"discard_next_to_last_sigma": True}),
    "DPM2 a": ("sample_dpm_2_ancestral", {"discard_next_to_last_sigma": True}),
    "DPM++ 2S a": ("sample_dpmpp_2s_ancestral", {}),
    "DPM++ 2M": ("sample_dpmpp_2m", {}),
    "DPM++ SDE": ("sample_dpmpp_sde", {"brownian_noise": True}),
    "DPM++ 2M SDE": ("sample_dpmpp_2m_sde", {"brownian_noise": True}),
    "DPM++ 2M SDE Heun": ("sample_dpmpp_2m_sde", {"brownian_noise": True, "solver_type": "heun"}),
    "DPM++ 3M SDE": ("sample_dpmpp_3m_sde", {"discard_next_to_last_sigma": True, "brownian_noise": True}),
}


@torch.no_grad()
def a1111_render(pipe, scheduler_config, prompt, negative, clip_skip, seed, name, schedule, steps, scale, size=64):
    k = kdiffusion.load()
    function, options = A1111_TABLE[name]
    discard = options.get("discard_next_to_last_sigma", False)
    model_wrap = k.external.CompVisDenoiser(LatentDiffusion(pipe.unet, scheduler_config))
    cond, uncond = a1111_cond(pipe, prompt, clip_skip), a1111_cond(pipe, negative, clip_skip)

    def cfg_denoiser(x, sigma, cond, uncond, cond_scale):
        if cond.shape[1] == uncond.shape[1]:
            x_out = model_wrap(torch.cat([x, x]), torch.cat([sigma, sigma]), cond=torch.cat([cond, uncond]))
        else:
            x_out = torch.cat([model_wrap(x, sigma, cond=cond), model_wrap(x, sigma, cond=uncond)])
        denoised_uncond = x_out[-1:]
        return denoised_uncond + (x_out[:1] - denoised_uncond) * cond_scale

    n = steps + 1 if discard else steps
    sigma_min, sigma_max = model_wrap.sigmas[0].item(), model_wrap.sigmas[-1].item()
    sigmas = {
        "Uniform": lambda: model_wrap.get_sigmas(n),
        "Karras": lambda: k.sampling.get_sigmas_karras(n=n, sigma_min=sigma_min, sigma_max=sigma_max),
        "Exponential": lambda: k.sampling.get_sigmas_exponential(n=n, sigma_min=sigma_min, sigma_max=sigma_max),
        "Polyexponential": lambda: k.sampling.get_sigmas_polyexponential(n=n, sigma_min=sigma_min, sigma_max=sigma_max),
    }[schedule]()
    if discard:
        sigmas = torch.cat([sigmas[:-2], sigmas[-1:]])
    shape = (4, size // 8, size // 8)
    generator = torch.Generator("cpu").manual_seed(seed)
    x = torch.randn(shape, generator=generator)[None] * sigmas[0]  # ImageRNG.first(), CPU source
    func = getattr(k.sampling, function)
    params = inspect.signature(func).parameters
    extra = {"eta": 1.0} if "eta" in params else {}  # A1111's eta_ancestral default
    if options.get("brownian_noise"):
        extra["noise_sampler"] = k.sampling.BrownianTreeNoiseSampler(x, sigmas[sigmas > 0].min(), sigmas.max(), seed=[seed])
    if "solver_type" in options:
        extra["solver_type"] = options["solver_type"]
    k.sampling.torch = TorchHijack([generator], shape)  # ImageRNG.next() for every later draw
    try:
        samples = func(
            cfg_denoiser, x, sigmas, extra_args={"cond": cond, "uncond": uncond, "cond_scale": scale}, disable=True, **extra
        )
    finally:
        k.sampling.torch = torch
    decoded = pipe.vae.decode(samples / pipe.vae.config.scaling_factor).sample
    pixels = torch.clamp((decoded.float() + 1.0) / 2.0, min=0.0, max=1.0)
    return (255.0 * np.moveaxis(pixels[0].cpu().numpy(), 0, 2)).astype(np.uint8)


def cell(model, **kw):
    """A cell with A1111's CPU random-number source, which these references draw (GPU: test_a1111_rng.py)."""
    params = dict(
        prompt="a cow standing in a field, golden hour",
        negative_prompt="lowres, blurry",
        clip_skip=2,
        seed=5,
        sampler="Euler a",
        steps=8,
        guidance=7.0,
        width=64,
        height=64,
        dtype="float32",
        rng="CPU",
    )
    return make_cell(model, **{**params, **kw})


def differs(a, b) -> int:
    return int(np.abs(np.asarray(a, dtype=int) - np.asarray(b, dtype=int)).max())


# -- prompts ----------------------------------------------------------------------------------

DOCUMENTED = [  # parse_prompt_attention's doctests, A1111 modules/prompt_parser.py
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
    ("(unbalanced", [("unbalanced", 1.1)]),
    ("\\(literal\\]", [("(literal]", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
    (
        "a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
        [
            ("a ", 1.0),
            ("house", 1.5730000000000004),
            (" ", 1.1),
            ("on", 1.0),
            (" a ", 1.1),
            ("hill", 0.55),
            (", sun, ", 1.1),
            ("sky", 1.4641000000000006),
            (".", 1.1),
        ],
    ),
]


@pytest.mark.parametrize("text, expected", DOCUMENTED)
def test_parse_attention_matches_a1111s_documented_examples(text, expected):
    assert parse_attention(text) == expected


def test_parse_attention_break_weights_and_escapes():
    assert parse_attention("a BREAK b") == [("a", 1.0), ("BREAK", -1.0), ("b", 1.0)]
    assert parse_attention("(cat: 1.5 ) [dog]") == [("cat", 1.5), (" ", 1.0), ("dog", 1 / 1.1)]
    assert parse_attention("\\\\ back") == [("\\ back", 1.0)]
    assert parse_attention("") == [("", 1.0)]


def test_a_long_prompt_with_emphasis_and_break_encodes_as_a1111(pipe, ours, model):
    tokens = len(pipe.tokenizer(LONG_PROMPT, add_special_tokens=False)["input_ids"])
    assert tokens > 150
    encoder = ours.cache.get(model, "float32").encoder
    for skip in (1, 2, 4):
        got = encoder.encode([LONG_PROMPT, "lowres"], {skip})
        want = a1111_cond(pipe, LONG_PROMPT, skip)[0]
        assert got[(LONG_PROMPT, skip)].embedding.shape == want.shape and want.shape[0] == 77 * 4
        torch.testing.assert_close(got[(LONG_PROMPT, skip)].embedding, want, rtol=0, atol=1e-5)
        torch.testing.assert_close(got[("lowres", skip)].embedding, a1111_cond(pipe, "lowres", skip)[0], rtol=0, atol=1e-5)


def test_chunks_break_at_the_last_comma_of_a_full_chunk(pipe, ours, model):
    encoder = ours.cache.get(model, "float32").encoder
    # builtin-like vocabulary: every letter a token; "xx..." words of 5 tokens each
    text = ", ".join(["abcde"] * 14) + ", fghij klmno"  # 14*5 + 13 commas = 83 tokens, then 10 more
    chunks = encoder.chunk(text).chunks
    reference = a1111_chunks(pipe.tokenizer, text)
    assert [c.tokens for c in chunks] == [t for t, _ in reference]
    comma = pipe.tokenizer.get_vocab()[",</w>"]
    first = chunks[0].tokens[1:-1]
    last_comma = len(first) - 1 - first[::-1].index(comma)
    assert 55 <= last_comma < 74  # the chunk was cut after its last comma, within the last 20 tokens ...
    assert first[last_comma + 1 :] == [pipe.tokenizer.eos_token_id] * (74 - last_comma)  # ... and padded
    assert len(chunks) == 2


def test_the_scheduler_side_counts_tokens_as_the_worker_tokenizes(pipe, ours, model):
    from gridrender.scheduler.tokens import tokenizer_for

    counter = tokenizer_for(model)  # from the folder's tokenizer.json, without transformers
    encoder = ours.cache.get(model, "float32").encoder
    for text in (LONG_PROMPT, "Ünïcode  spaces\tand CAPS, 1girl", "", "a,b,,c"):
        assert counter.tokenize([text]) == pipe.tokenizer([text], add_special_tokens=False)["input_ids"]
        counted, encoded = counter.encode(text), encoder.chunk(text)
        assert (counted.token_count, len(counted.chunks)) == (encoded.token_count, len(a1111_chunks(pipe.tokenizer, text)))


# -- samplers ---------------------------------------------------------------------------------

A1111_NAMES = [s.name for s in samplers.A1111]
REQUIRED = ["Euler", "Euler a", "Heun", "LMS", "DPM++ 2M", "DPM++ 2M Karras", "DPM++ SDE Karras", "DPM2"]


def test_every_required_sampler_is_in_the_table_and_the_table_is_a1111s():
    assert {samplers.canonical(n)[0] for n in REQUIRED} <= set(A1111_NAMES)
    assert set(A1111_NAMES) <= A1111_TABLE.keys()


@pytest.mark.parametrize("name", sorted(set(A1111_NAMES) | set(REQUIRED)))
def test_sampler_matches_the_kdiffusion_reference(name, ours, model, pipe):
    base, schedule = samplers.canonical(name)
    config = ours.cache.get(model, "float32").scheduler_config
    cells = [cell(model, sampler=name, seed=seed) for seed in (5, 6)]
    rendered = ours.render(model, cells)  # together in one batch
    for c, r in zip(cells, rendered, strict=True):
        want = a1111_render(pipe, config, c.prompt, c.negative_prompt, c.clip_skip, c.seed, base, schedule, c.steps, c.guidance)
        assert differs(r.image, want) <= 2, f"{name}: {differs(r.image, want)}/255 from the k-diffusion reference"
        assert np.asarray(r.image).std() > 3  # a real image, not a flat colour both sides agree on


@pytest.mark.parametrize("name, schedule", [("DPM++ 2M", "Exponential"), ("Euler", "Karras"), ("Euler a", "Polyexponential")])
def test_schedules_match_kdiffusions(name, schedule, ours, model, pipe):
    config = ours.cache.get(model, "float32").scheduler_config
    c = cell(model, sampler=name, schedule=schedule)
    (r,) = ours.render(model, [c])
    want = a1111_render(pipe, config, c.prompt, c.negative_prompt, c.clip_skip, c.seed, name, schedule, c.steps, c.guidance)
    assert differs(r.image, want) <= 2


@pytest.mark.parametrize("schedule", [s.label for s in samplers.SCHEDULES if s.label != "Automatic"])
def test_every_schedule_gives_steps_plus_one_decreasing_sigmas(schedule, ours, model):
    from gridrender.workers.sigmas import sigmas_for

    sigmas = sigmas_for(schedule, 10, ours.cache.get(model, "float32").sigmas)
    assert len(sigmas) == 11 and bool((sigmas[:-1] > sigmas[1:]).all())
    # within the model's sigma range (SD 1.x's); DDIM's every-100th timestep starts lower, at t=901
    assert (5 if schedule == "DDIM" else 14) < float(sigmas[0]) < 16.1 and float(sigmas[-1]) <= 0.03


def test_a_long_prompt_against_a_short_negative_matches_a1111(ours, model, pipe):
    """Different chunk counts: A1111 runs the UNet once for cond and once for uncond."""
    config = ours.cache.get(model, "float32").scheduler_config
    c = cell(model, prompt=LONG_PROMPT, sampler="DPM++ 2M Karras", clip_skip=1)
    (r,) = ours.render(model, [c])
    assert r.prompt_tokens["prompt"]["chunks"] == 4 and r.prompt_tokens["negative_prompt"]["chunks"] == 1
    want = a1111_render(pipe, config, c.prompt, c.negative_prompt, 1, c.seed, "DPM++ 2M", "Karras", c.steps, c.guidance)
    assert differs(r.image, want) <= 2


def test_the_models_own_scheduler_config_does_not_change_a1111_samplers(ours, model, model_folder, tmp_path):
    import shutil

    other = tmp_path / "other-config"
    shutil.copytree(model_folder, other)
    config_file = other / "scheduler" / "scheduler_config.json"
    config = json.loads(config_file.read_text())
    config.update(timestep_spacing="trailing", steps_offset=0, _class_name="DDIMScheduler")
    config_file.write_text(json.dumps(config))
    a = ours.render(model, [cell(model)])[0]
    again = resolve(str(other))
    b = ours.render(again, [cell(again)])[0]
    assert differs(a.image, b.image) == 0


# -- batches and fresh processes, every sampler -----------------------------------------------

RENDER_ALL = """
import json, sys
import numpy as np
from gridrender.scheduler import samplers
from gridrender.scheduler.grid import make_cell
from gridrender.scheduler.models import resolve
from gridrender.workers.render import Renderer

model, out = resolve(sys.argv[1]), sys.argv[2]
renderer = Renderer()
arrays = {}
for name in samplers.valid_samplers():
    cells = [make_cell(model, prompt=p, negative_prompt="lowres", clip_skip=s, seed=seed, sampler=name, steps=4,
                       guidance=7.0, width=64, height=64, dtype="float32")
             for p, s, seed in [("a cow standing in a field", 2, 11), ("a lighthouse at dusk", 1, 12),
                                ("a cow standing in a field", 1, 13), ("golden hour", 2, 14)]]
    arrays[name + "|alone"] = np.asarray(renderer.render(model, cells[:1], pad_to=4)[0].image)  # as a job of batch 4 runs it
    arrays[name + "|unpadded"] = np.asarray(renderer.render(model, cells[:1])[0].image)  # a job of batch size 1
    # among 3 other cells, batched as a worker batches a chunk (samplers that draw noise per call: one by one)
    embeddings = renderer.encode(model, cells)
    batched = [r for b in renderer.batches(cells, 4, embeddings) for r in renderer.render(model, b, embeddings, pad_to=4)]
    arrays[name + "|batch"] = np.asarray(next(r for r in batched if r.cell.id == cells[0].id).image)
np.savez(out, **arrays)
"""


def test_every_sampler_is_the_same_alone_in_a_batch_and_in_two_fresh_processes(model_folder, tmp_path):
    # Two processes at once: they share nothing but the model folder, and the wall time halves.
    outs = [tmp_path / f"run{n}.npz" for n in range(2)]
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", RENDER_ALL, str(model_folder), str(out)],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for out in outs
    ]
    try:
        outputs = [process.communicate(timeout=600) for process in processes]
    finally:
        for process in processes:
            process.kill()
    for process, (_, stderr) in zip(processes, outputs, strict=True):
        assert process.returncode == 0, stderr
    runs = [np.load(out) for out in outs]
    first, second = runs
    for name in samplers.valid_samplers():
        alone, batch = first[name + "|alone"], first[name + "|batch"]
        # alone in a short batch (padded to the job's batch size) or among 3 others: one shape, the same image
        assert differs(alone, batch) == 0, f"{name}: alone vs in a batch of 4 differ by {differs(alone, batch)}/255"
        assert differs(alone, second[name + "|alone"]) == 0, f"{name}: two processes differ"
        assert differs(batch, second[name + "|batch"]) == 0, f"{name}: two processes differ in a batch"
        if samplers.lookup(name).family == "a1111":  # and a job of batch size 1: kernels round differently
            assert differs(first[name + "|unpadded"], batch) <= 1, f"{name}: batch 1 vs 4"


def test_prompt_syntax_a1111_would_schedule_is_refused_at_validate(job_file):
    from tests.conftest import cli

    for prompt, needle in (
        ("a [cat:dog:0.5] in a field", "prompt editing"),
        ("a [cat|dog]", "alternation"),
        ("a cat AND a dog", "composable"),
    ):
        result = cli("validate", str(job_file(prompts=[prompt])))
        assert result.returncode == 2 and needle in result.stderr and "prompts.0" in result.stderr, result.stderr
    ok = cli("validate", str(job_file(prompts=["a \\[cat:dog:0.5\\] (literal:1.2)", LONG_PROMPT])))
    assert ok.returncode == 0, ok.stderr
    assert "chunks of 75" in ok.stdout
