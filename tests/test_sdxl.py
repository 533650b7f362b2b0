"""SDXL and its family render A1111's image, from a folder, a single file, eps or v-prediction.

The references are written here from the upstream code, never from gridrender's:
- A1111 modules/sd_models_xl.py (get_learned_conditioning: size conditioning
  (h, w), crop (0, 0), target (h, w); force_zero_negative_prompt for an empty
  negative), modules/sd_hijack_clip.py (tokenize_line, FrozenCLIPEmbedderForSDXLWithCustomWords
  .encode_with_transformers: hidden_states[layer_idx], forward: hstack of chunks and the
  first chunk's pooled), modules/sd_hijack_open_clip.py (FrozenOpenCLIPEmbedder2WithCustomWords:
  id_pad 0 after the first EOS, `layer` "penultimate", pooled), modules/sd_emphasis.py
  (EmphasisOriginal), modules/sd_hijack.py (EmbeddingsWithFixes with textual_inversion_key),
  modules/sd_models.py (rescale_zero_terminal_snr_abar), sd_samplers_kdiffusion.py (CompVisVDenoiser
  for a "v" parameterization);
- sgm (Stability-AI/generative-models) sgm/modules/encoders/modules.py: GeneralConditioner.forward
  (crossattn concatenated on dim 2 in embedder order, force_zero_embeddings), FrozenOpenCLIPEmbedder2
  (text_transformer_forward's "penultimate" = the last block's input, pool = ln_final(last) at
  text.argmax() @ text_projection);
- k-diffusion's own sampling functions and external.CompVisDenoiser / CompVisVDenoiser.
Clip skip N >= 3 takes hidden_states[-N] of both encoders (Forge, ComfyUI), as DESIGN.md says.
"""

from __future__ import annotations

import inspect
import json
import shutil
import string

import numpy as np
import pytest
import torch

from gridrender.scheduler import samplers
from gridrender.scheduler.grid import make_cell
from gridrender.scheduler.models import config_dir, resolve
from gridrender.workers.render import Renderer
from tests.conftest import cli
from tests.support import kdiffusion
from tests.support.singlefile import write_single_file
from tests.test_a1111 import A1111_TABLE, LONG_PROMPT, TorchHijack, a1111_chunks, differs

SIZE = 64
SHORT = "a (cow:1.3) standing in a [field], golden hour"
NEGATIVE = "lowres, (blurry:1.2)"


# -- a tiny SDXL, built here: CLIP-L-like (32 wide, 6 layers) and bigG-like (48 wide, 8 layers) ----


@pytest.fixture(scope="session")
def xl_folder(tmp_path_factory, private_cache):  # noqa: ARG001  (its own HF cache, for its side effect)
    """A StableDiffusionXLPipeline folder with its own weights, of builtin:tiny-sdxl's shapes."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from gridrender.scheduler.tokens import byte_vocab
    from gridrender.workers import builtin

    src = config_dir("tiny-sdxl")
    rng = np.random.Generator(np.random.PCG64(11))
    unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(src / "unet"))
    vae = AutoencoderKL.from_config(AutoencoderKL.load_config(src / "vae"))
    encoder = CLIPTextModel(CLIPTextConfig.from_json_file(src / "text_encoder" / "config.json"))
    encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig.from_json_file(src / "text_encoder_2" / "config.json"))
    assert (encoder.config.hidden_size, encoder.config.num_hidden_layers) != (
        encoder_2.config.hidden_size,
        encoder_2.config.num_hidden_layers,
    )
    assert unet.config.addition_embed_type == "text_time"
    for module in (unet, vae, encoder, encoder_2):
        builtin._fill(module, rng)
    scheduler = EulerDiscreteScheduler.from_config(json.loads((src / "scheduler" / "scheduler_config.json").read_text()))
    vocab = byte_vocab()  # CLIP's layout: BOS and EOS are the last (highest) ids, as sgm's pool relies on
    assert vocab["<|endoftext|>"] == max(vocab.values())
    pipe = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=encoder,
        text_encoder_2=encoder_2,
        tokenizer=CLIPTokenizer(vocab=vocab, merges=[]),
        tokenizer_2=CLIPTokenizer(vocab=vocab, merges=[], pad_token="!"),
        unet=unet,
        scheduler=scheduler,
        add_watermarker=False,
    )
    folder = tmp_path_factory.mktemp("sdxl") / "tiny-xl"
    pipe.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def xl_vpred_folder(xl_folder, tmp_path_factory):
    """The same weights as a v-prediction, zero-terminal-SNR model, said in the scheduler config."""
    folder = tmp_path_factory.mktemp("sdxl-v") / "tiny-xl-v"
    shutil.copytree(xl_folder, folder)
    config_file = folder / "scheduler" / "scheduler_config.json"
    config = json.loads(config_file.read_text())
    config.update(prediction_type="v_prediction", rescale_betas_zero_snr=True)
    config_file.write_text(json.dumps(config))
    return folder


@pytest.fixture(scope="session")
def xl_files(xl_folder, tmp_path_factory):
    """The folder's weights as single files: plain, and with NoobAI-XL's `v_pred` and `ztsnr` markers."""
    base = tmp_path_factory.mktemp("sdxl-files")
    plain = write_single_file(xl_folder, base / "tiny-xl.safetensors")
    markers = {"v_pred": torch.tensor([]), "ztsnr": torch.tensor([])}
    vpred = write_single_file(xl_folder, base / "tiny-xl-vpred.safetensors", extra=markers)
    return plain, vpred


@pytest.fixture(scope="session")
def ours(private_cache):  # noqa: ARG001  (its own HF cache, for its side effect)
    return Renderer()


@pytest.fixture(scope="session")
def xl(xl_folder):
    return resolve(str(xl_folder))


@pytest.fixture(scope="session")
def xl_v(xl_vpred_folder):
    return resolve(str(xl_vpred_folder))


@pytest.fixture(scope="session")
def pipe(ours, xl):
    return ours.cache.get(xl, "float32").pipe


# -- A1111's SDXL conditioning, written from sd_hijack_clip.py, sd_hijack_open_clip.py, sgm ----------


def emphasis_original(z, multipliers):
    """sd_emphasis.EmphasisOriginal.after_transformers."""
    original_mean = z.mean()
    z = z * torch.asarray([multipliers]).reshape((1, -1, 1)).expand(z.shape)
    new_mean = z.mean()
    return z * (original_mean / new_mean)


def with_fixes(encoder, fixes, key):
    """sd_hijack.EmbeddingsWithFixes on an encoder's token embedding (SDXL: vec[textual_inversion_key])."""

    def hook(_module, _args, inputs_embeds):
        tensor = inputs_embeds[0]
        for offset, vec in fixes:
            emb = vec[key] if isinstance(vec, dict) else vec
            emb_len = min(tensor.shape[0] - offset - 1, emb.shape[0])
            tensor = torch.cat([tensor[0 : offset + 1], emb[0:emb_len], tensor[offset + 1 + emb_len :]])
        return tensor[None].to(inputs_embeds.dtype)

    model = getattr(encoder, "text_model", encoder)
    return model.embeddings.token_embedding.register_forward_hook(hook)


@torch.no_grad()
def a1111_xl_cond(pipe, text, clip_skip, negative=False, chunks=None, fixes=(), tokenizer_2=None):
    """sd_models_xl.get_learned_conditioning([text]) for a batch of one: {crossattn, pooled, time_ids}.

    `chunks`: [(tokens, multipliers)] when the test lays them out itself (embeddings); `fixes`:
    [(offset, {"clip_l": ..., "clip_g": ...})] for the first chunk. Each embedder chunks the text
    with its own tokenizer (`tokenizer_2`: open_clip's, for the second; the same ids by default).
    """
    layer = -max(clip_skip, 2)  # layer_idx / "penultimate" for 1 and 2 (A1111 ignores clip skip on SDXL)
    z_l, z_g, pooled = [], [], None
    chunks_l = chunks or a1111_chunks(pipe.tokenizer, text)
    chunks_g = chunks or a1111_chunks(tokenizer_2 or pipe.tokenizer, text)
    for index, ((tokens, multipliers), (tokens_g, multipliers_g)) in enumerate(zip(chunks_l, chunks_g, strict=True)):
        handles = (
            [with_fixes(pipe.text_encoder, fixes, "clip_l"), with_fixes(pipe.text_encoder_2, fixes, "clip_g")]
            if fixes and index == 0
            else []
        )
        try:
            # embedder 0, FrozenCLIPEmbedderForSDXLWithCustomWords: hidden_states[layer_idx], no final norm
            outputs = pipe.text_encoder(input_ids=torch.asarray([tokens]), output_hidden_states=True)
            z_l.append(emphasis_original(outputs.hidden_states[layer], multipliers))
            # embedder 1, FrozenOpenCLIPEmbedder2WithCustomWords.process_tokens: id_pad after the first id_end
            ids = torch.asarray([tokens_g])
            end = tokens_g.index(pipe.tokenizer.eos_token_id)
            ids[0, end + 1 :] = 0
            outputs = pipe.text_encoder_2(input_ids=ids, output_hidden_states=True)
            z = outputs.hidden_states[layer]  # text_transformer_forward's "penultimate": the last block's input
            if pooled is None:  # FrozenOpenCLIPEmbedder2.pool on ln_final(x["last"]); forward: zs[0].pooled
                final_norm = getattr(pipe.text_encoder_2, "text_model", pipe.text_encoder_2).final_layer_norm
                last = final_norm(outputs.hidden_states[-1])
                pooled = pipe.text_encoder_2.text_projection(last[torch.arange(1), ids.argmax(dim=-1)])
            z_g.append(emphasis_original(z, multipliers_g))
        finally:
            for handle in handles:
                handle.remove()
    crossattn = torch.cat([torch.hstack(z_l), torch.hstack(z_g)], dim=2)  # GeneralConditioner: KEY2CATDIM 2
    if negative and text == "":  # force_zero_negative_prompt: every 'txt' embedder's output zeroed
        crossattn, pooled = torch.zeros_like(crossattn), torch.zeros_like(pooled)
    time_ids = torch.tensor([[SIZE, SIZE, 0, 0, SIZE, SIZE]], dtype=torch.float32)  # (h, w), crop, (h, w)
    return {"crossattn": crossattn, "pooled": pooled, "time_ids": time_ids}


def rescale_zero_terminal_snr_abar(alphas_cumprod):
    """A1111 modules/sd_models.py."""
    alphas_bar_sqrt = alphas_cumprod.sqrt()
    alphas_bar_sqrt_0 = alphas_bar_sqrt[0].clone()
    alphas_bar_sqrt_T = alphas_bar_sqrt[-1].clone()
    alphas_bar_sqrt -= alphas_bar_sqrt_T
    alphas_bar_sqrt *= alphas_bar_sqrt_0 / (alphas_bar_sqrt_0 - alphas_bar_sqrt_T)
    alphas_bar = alphas_bar_sqrt**2
    alphas_bar[-1] = 4.8973451890853435e-08
    return alphas_bar


class SDXLEngine(torch.nn.Module):
    """What A1111's CompVis(V)Denoiser wraps for SDXL: apply_model(x, t, cond) -> the UNet with context
    crossattn and vector (pooled + size embeddings), and LegacyDDPMDiscretization's alphas_cumprod."""

    def __init__(self, unet, ztsnr):
        super().__init__()
        self.unet = unet
        betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
        alphas_cumprod = torch.asarray(np.cumprod(1.0 - betas.numpy(), axis=0), dtype=torch.float32)
        self.alphas_cumprod = rescale_zero_terminal_snr_abar(alphas_cumprod) if ztsnr else alphas_cumprod

    def apply_model(self, x, t, cond):
        added = {"text_embeds": cond["pooled"], "time_ids": cond["time_ids"]}
        return self.unet(x, t, encoder_hidden_states=cond["crossattn"], added_cond_kwargs=added).sample


def cat_conds(a, b):
    return {k: torch.cat([a[k], b[k]]) for k in a}


@torch.no_grad()
def a1111_xl_render(pipe, prompt, negative, clip_skip, seed, name, schedule, steps, scale, v=False, cond=None):
    k = kdiffusion.load()
    function, options = A1111_TABLE[name]
    discard = options.get("discard_next_to_last_sigma", False)
    engine = SDXLEngine(pipe.unet, ztsnr=v)
    model_wrap = (k.external.CompVisVDenoiser if v else k.external.CompVisDenoiser)(engine)
    c = cond or a1111_xl_cond(pipe, prompt, clip_skip)
    uc = a1111_xl_cond(pipe, negative, clip_skip, negative=True)

    def cfg_denoiser(x, sigma, cond, uncond, cond_scale):
        if cond["crossattn"].shape[1] == uncond["crossattn"].shape[1]:
            x_out = model_wrap(torch.cat([x, x]), torch.cat([sigma, sigma]), cond=cat_conds(cond, uncond))
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
    }[schedule]()
    if discard:
        sigmas = torch.cat([sigmas[:-2], sigmas[-1:]])
    shape = (4, SIZE // 8, SIZE // 8)
    generator = torch.Generator("cpu").manual_seed(seed)
    x = torch.randn(shape, generator=generator)[None] * sigmas[0]
    func = getattr(k.sampling, function)
    extra = {"eta": 1.0} if "eta" in inspect.signature(func).parameters else {}
    if options.get("brownian_noise"):
        extra["noise_sampler"] = k.sampling.BrownianTreeNoiseSampler(x, sigmas[sigmas > 0].min(), sigmas.max(), seed=[seed])
    if "solver_type" in options:
        extra["solver_type"] = options["solver_type"]
    k.sampling.torch = TorchHijack([generator], shape)
    try:
        samples = func(cfg_denoiser, x, sigmas, extra_args={"cond": c, "uncond": uc, "cond_scale": scale}, disable=True, **extra)
    finally:
        k.sampling.torch = torch
    decoded = pipe.vae.decode(samples.to(pipe.vae.dtype) * (1.0 / pipe.vae.config.scaling_factor)).sample
    pixels = torch.clamp((decoded.float() + 1.0) / 2.0, min=0.0, max=1.0)
    return (255.0 * np.moveaxis(pixels[0].cpu().numpy(), 0, 2)).astype(np.uint8)


def xl_cell(model, **kw):
    """A cell with A1111's CPU random-number source, which these references draw."""
    params = dict(
        prompt=SHORT,
        negative_prompt=NEGATIVE,
        clip_skip=2,
        seed=5,
        sampler="Euler a",
        steps=6,
        guidance=7.0,
        width=SIZE,
        height=SIZE,
        dtype="float32",
        rng="CPU",
    )
    return make_cell(model, **{**params, **kw})


# -- conditioning --------------------------------------------------------------------------------


@pytest.mark.parametrize("skip", [1, 2, 3])
def test_conditioning_is_a1111s_for_short_and_long_prompts_and_an_empty_negative(skip, ours, xl, pipe):
    encoder = ours.cache.get(xl, "float32").encoder
    passes = encoder.passes
    got = encoder.encode([SHORT, LONG_PROMPT, ""], {skip})
    assert encoder.passes - passes == 1  # 6 chunks of 3 texts: one pass of each encoder
    for text in (SHORT, LONG_PROMPT, ""):
        want = a1111_xl_cond(pipe, text, skip)
        encoded = got[(text, skip)]
        assert encoded.embedding.shape == want["crossattn"][0].shape and encoded.embedding.shape[1] == 32 + 48
        torch.testing.assert_close(encoded.embedding, want["crossattn"][0], rtol=0, atol=1e-5)
        torch.testing.assert_close(encoded.pooled, want["pooled"][0], rtol=0, atol=1e-5)
    assert got[(LONG_PROMPT, skip)].chunks == 4  # BREAK, emphasis, comma backtrack: four 75-token chunks


# Prompts where ftfy (both tokenizers) and open_clip's double html.unescape (the second) change the ids.
TRICKY = [
    "“masterpiece”, best quality, 1girl，solo（smile）, ﬁsh",  # noqa: RUF001  (full-width on purpose)
    "ｈｅｌｌｏ world, don’t, café &amp; bar",  # noqa: RUF001
    ">_< &amp; fish &amp;amp; chips, (red:1.2) BREAK blue",
    ", ".join(["“quoted” tag"] * 30) + ", &amp; more",
]  # > 75 tokens: the comma backtrack


@pytest.fixture(scope="session")
def clip_vocab_encoder(tmp_path_factory):
    """A PromptEncoder with CLIP's real (shipped) vocabulary and two tiny random encoders."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from gridrender.scheduler.tokens import CLIP_MERGES, CLIP_VOCAB
    from gridrender.workers.clip import PromptEncoder

    folder = tmp_path_factory.mktemp("clip-vocab")
    for file in (CLIP_VOCAB, CLIP_MERGES):
        shutil.copy(file, folder / file.name)
    tokenizer = CLIPTokenizer.from_pretrained(folder, local_files_only=True)
    torch.manual_seed(0)
    small = dict(vocab_size=49408, intermediate_size=32, num_attention_heads=2, max_position_embeddings=77)
    encoder = CLIPTextModel(CLIPTextConfig(hidden_size=16, num_hidden_layers=3, hidden_act="quick_gelu", **small))
    encoder_2 = CLIPTextModelWithProjection(
        CLIPTextConfig(hidden_size=24, num_hidden_layers=4, projection_dim=20, hidden_act="gelu", **small)
    )
    return PromptEncoder(tokenizer, encoder.eval(), encoder_2.eval())


def test_each_encoder_tokenizes_as_a1111s_tokenizer_for_it(clip_vocab_encoder):
    """CLIP-L: transformers' slow CLIPTokenizer with ftfy (A1111's); OpenCLIP: open_clip's SimpleTokenizer
    (ftfy, html.unescape twice). The references are written from those sources (tests/support/a1111_text.py)."""
    from gridrender.scheduler.tokens import CLIP_MERGES, ClipTokenizer
    from tests.support.a1111_text import ReferenceTokenizer

    references = [ReferenceTokenizer(CLIP_MERGES, "hf"), ReferenceTokenizer(CLIP_MERGES, "open_clip")]
    counts = ClipTokenizer.from_files(CLIP_MERGES.with_name("vocab.json"), CLIP_MERGES)
    for text in TRICKY:
        for index, reference in enumerate(references):
            want = a1111_chunks(reference, text)
            got = clip_vocab_encoder.chunk(text, encoder=index).chunks
            assert [c.tokens for c in got] == [t for t, _ in want], (index, text)
            assert np.allclose([c.weights for c in got], [m for _, m in want], rtol=1e-12), (index, text)
        # validate counts what the worker's first encoder reads
        assert counts.tokenize([text]) == references[0]([text])["input_ids"], text
    # plain ASCII (gridrender skips ftfy where it cannot change anything): still the references' ids
    rng = np.random.default_rng(0)
    for _ in range(50):
        text = "".join(rng.choice(list(string.printable), size=int(rng.integers(0, 60))))
        for index, reference in enumerate(references):
            assert clip_vocab_encoder.tokenize([text], index) == reference([text])["input_ids"], (index, text)
    # where they differ: only open_clip unescapes HTML in a text that has a "<"
    ids_l, ids_g = (clip_vocab_encoder.chunk(TRICKY[2], encoder=i).chunks[0].tokens for i in (0, 1))
    assert ids_l != ids_g


def test_each_encoder_reads_its_own_tokens(clip_vocab_encoder):
    from types import SimpleNamespace

    from gridrender.scheduler.errors import RenderError
    from gridrender.scheduler.tokens import CLIP_MERGES
    from tests.support.a1111_text import ReferenceTokenizer

    encoder = clip_vocab_encoder
    pipe = SimpleNamespace(
        tokenizer=ReferenceTokenizer(CLIP_MERGES, "hf"), text_encoder=encoder.encoders[0], text_encoder_2=encoder.encoders[1]
    )
    tokenizer_2 = ReferenceTokenizer(CLIP_MERGES, "open_clip")
    got = encoder.encode(TRICKY, {2})
    for text in TRICKY:
        want = a1111_xl_cond(pipe, text, 2, tokenizer_2=tokenizer_2)
        torch.testing.assert_close(got[(text, 2)].embedding, want["crossattn"][0], rtol=0, atol=1e-5)
        torch.testing.assert_close(got[(text, 2)].pooled, want["pooled"][0], rtol=0, atol=1e-5)
    # 60 tokens of "&amp;amp;" for CLIP-L are 12 for OpenCLIP: A1111's torch.cat of the two fails
    with pytest.raises(RenderError, match="different numbers of 75-token chunks"):
        encoder.encode(["<3 " + " &amp;amp;" * 15], {2})


def test_clip_skip_1_and_2_are_one_cell_and_3_another(xl, ours):
    one, two, three = (xl_cell(xl, clip_skip=s) for s in (1, 2, 3))
    assert one.id == two.id != three.id
    encoder = ours.cache.get(xl, "float32").encoder
    assert encoder.layers_for(1) == encoder.layers_for(2) == [5, 7] and encoder.layers_for(3) == [4, 6]


def test_an_sdxl_embedding_feeds_both_encoders(ours, xl, pipe, tmp_path, job_file):
    from safetensors.torch import save_file

    from gridrender.scheduler.components import resolve_embeddings
    from gridrender.scheduler.settings import Settings

    rng = torch.Generator().manual_seed(3)
    vectors = {"clip_l": torch.randn(2, 32, generator=rng) * 0.5, "clip_g": torch.randn(2, 48, generator=rng) * 0.5}
    path = tmp_path / "xlemb.safetensors"
    save_file(vectors, str(path))
    (component,) = resolve_embeddings([str(path)], xl, Settings()).values()
    assert component.vectors == 2
    text = "a cow xlemb"
    cell = xl_cell(xl, prompt=text, embeddings=(component,))
    embeddings = ours.encode(xl, [cell])
    # A1111's chunk of this prompt: BOS, "a cow " tokens, two embedding slots (id 0), EOS padding.
    ids = pipe.tokenizer("a cow", add_special_tokens=False)["input_ids"]
    eos, bos = pipe.tokenizer.eos_token_id, pipe.tokenizer.bos_token_id
    tokens = [bos, *ids, 0, 0] + [eos] * (75 - len(ids) - 2) + [eos]
    want = a1111_xl_cond(pipe, text, 2, chunks=[(tokens, [1.0] * 77)], fixes=[(len(ids), vectors)])
    torch.testing.assert_close(embeddings[(text, 2)].embedding, want["crossattn"][0], rtol=0, atol=1e-5)
    torch.testing.assert_close(embeddings[(text, 2)].pooled, want["pooled"][0], rtol=0, atol=1e-5)
    # A1111 gives an SDXL embedding as many slots as clip_g has vectors (create_embedding_from_data:
    # vectors = data['clip_g'].shape[0]); each encoder fills what its own tensor has
    encoder = ours.cache.get(xl, "float32").encoder
    uneven = {"clip_l": vectors["clip_l"][:1], "clip_g": torch.cat([vectors["clip_g"]] * 2)}
    (chunk,) = encoder.chunk(text, {"xlemb": uneven}).chunks
    assert chunk.tokens[1 : len(ids) + 6] == [*ids, 0, 0, 0, 0, eos]
    # an SD 1.x embedding (one tensor) is refused for an SDXL model at validate, naming the key
    save_file({"emb_params": torch.zeros(1, 32)}, str(tmp_path / "sd1emb.safetensors"))
    result = cli("validate", str(job_file(model=str(xl.location), embeddings=[str(tmp_path / "sd1emb.safetensors")])))
    assert result.returncode == 2 and "embeddings" in result.stderr and "SD 1.x embedding" in result.stderr


def test_a_blank_negative_is_encoded_and_only_an_empty_one_is_zeros(ours, xl, pipe):
    """sd_models_xl.get_learned_conditioning zeroes when `all(x == '' for x in batch)`: the text itself.
    A negative of spaces is encoded (one empty chunk), so it is another image and another cell on
    SDXL; on SD 1.x both are the same empty chunk and keep one id."""
    empty, blank = (xl_cell(xl, negative_prompt=n, sampler="Euler", steps=3) for n in ("", "  "))
    assert empty.id != blank.id and blank.negative_text == empty.negative_text == ""
    tiny = resolve("builtin:tiny")
    assert xl_cell(tiny, negative_prompt="").id == xl_cell(tiny, negative_prompt="  ").id
    # Prompt S/R that leaves nothing is empty in A1111 too (the replaced text is compared)
    replaced = xl_cell(xl, negative_prompt="lowres", prompt_sr=("lowres", ""), sampler="Euler", steps=3)
    assert replaced.negative_is_empty and not blank.negative_is_empty
    for cell in (empty, blank):
        got = ours.render(xl, [cell])[0]
        want = a1111_xl_render(pipe, SHORT, cell.negative_prompt, 2, cell.seed, "Euler", "Uniform", 3, 7.0)
        assert differs(got.image, want) <= 2
    assert differs(ours.render(xl, [empty])[0].image, ours.render(xl, [blank])[0].image) > 2


# -- samplers: every A1111 sampler, eps and v-prediction, against k-diffusion ----------------------------

A1111_NAMES = [s.name for s in samplers.A1111]
# Each sampler runs eps and v-pred; the prompt, negative and clip skip rotate so that every case is covered.
CASES = [
    pytest.param(
        name,
        v,
        (SHORT, LONG_PROMPT)[(i + v) % 2],
        ("", NEGATIVE)[(i // 2 + v) % 2],
        (1, 2, 3)[(i + 2 * v) % 3],
        (5, 6) if i % 4 == v else (5,),
        id=f"{name}-{'v' if v else 'eps'}-{'long' if (i + v) % 2 else 'short'}-"
        f"{'neg' if (i // 2 + v) % 2 else 'empty'}-skip{(1, 2, 3)[(i + 2 * v) % 3]}",
    )
    for i, name in enumerate(A1111_NAMES)
    for v in (False, True)
]


@pytest.mark.parametrize("name, v, prompt, negative, skip, seeds", CASES)
def test_sampler_matches_a1111_on_sdxl(name, v, prompt, negative, skip, seeds, ours, xl, xl_v, pipe):
    model = xl_v if v else xl
    schedule = "Karras" if name in ("DPM++ 2M", "DPM2") else "Uniform"
    cells = [
        xl_cell(
            model, sampler=name, schedule=schedule, prompt=prompt, negative_prompt=negative, clip_skip=skip, seed=seed, steps=4
        )
        for seed in seeds
    ]
    rendered = ours.render(model, cells)  # two seeds: together in one batch
    for c, r in zip(cells, rendered, strict=True):
        want = a1111_xl_render(pipe, prompt, negative, skip, c.seed, name, schedule, c.steps, c.guidance, v=v)
        assert differs(r.image, want) <= 2, f"{name} (v={v}): {differs(r.image, want)}/255 from the reference"
        assert np.asarray(r.image).std() > 3
    assert rendered[0].sampler["config"]["denoiser"].endswith("CompVisVDenoiser" if v else "CompVisDenoiser")


def test_v_prediction_uses_a1111s_zero_terminal_snr_schedule(ours, xl_v):
    loaded = ours.cache.get(xl_v, "float32")
    assert xl_v.prediction == "v_prediction" and xl_v.zero_terminal_snr
    cumprod = (1 + loaded.sigmas.sigmas.double() ** 2) ** -1
    assert float(cumprod[-1]) == pytest.approx(4.8973451890853435e-08, rel=1e-5)
    assert 4000 < loaded.sigmas.sigma_max < 5000  # sqrt((1 - a) / a) of the last step


# -- one model, every way users hold it ------------------------------------------------------------


def test_a_folder_and_its_single_file_render_the_same_image(ours, xl, xl_v, xl_files):
    plain, vpred = (resolve(str(f)) for f in xl_files)
    assert plain.kind == "file" and plain.family == "sdxl" and plain.config == "tiny-sdxl"
    assert (plain.clip_layers, plain.clip_layers_2) == (6, 8) and plain.prediction == "epsilon"
    assert vpred.prediction == "v_prediction" and vpred.zero_terminal_snr  # read from the v_pred / ztsnr keys
    for folder_model, file_model in ((xl, plain), (xl_v, vpred)):
        for sampler in ("DPM++ 2M", "Euler a"):
            a = ours.render(folder_model, [xl_cell(folder_model, sampler=sampler)])[0]
            b = ours.render(file_model, [xl_cell(file_model, sampler=sampler)])[0]
            assert differs(a.image, b.image) <= 1, f"{sampler}: folder vs file {differs(a.image, b.image)}/255"


def test_a_job_key_overrides_what_the_files_say(job_file, xl_folder, xl_files):
    from gridrender.scheduler.plan import prepare

    plan = prepare(job_file(model=str(xl_files[1]), prediction="epsilon", noise_schedule="Default"), cuda=False)
    assert (plan.model.prediction, plan.model.zero_terminal_snr) == ("epsilon", False)
    auto = prepare(job_file(model=str(xl_files[1])), cuda=False)
    assert auto.model.identity() != plan.model.identity()  # other images: other cells
    forced = prepare(job_file(model=str(xl_folder), noise_schedule="Zero Terminal SNR"), cuda=False)
    assert forced.model.zero_terminal_snr and forced.model.prediction == "epsilon"


def test_sd1_and_sdxl_share_a_model_axis_and_records_say_each_encoders_layer(job_file, xl_files, ours, tmp_path):
    from PIL import Image

    from gridrender.workers import local
    from gridrender.workers.reproduce import reproduce

    out = tmp_path / "out"
    path = job_file(
        model=["builtin:tiny", str(xl_files[1])],
        clip_skip=[1, 2],
        seeds=[3],
        steps=3,
        sampler="Euler a",
        negative_prompt="",
        sheet={"rows": "clip_skip", "cols": "model", "pages": "seed"},
    )
    checked = cli("validate", str(path))
    assert checked.returncode == 0, checked.stderr
    assert "1 and 2 are one cell" in checked.stderr and "SDXL, 6+8 CLIP layers, v-prediction" in checked.stdout
    result = local.run_job(path, renderer=ours)
    assert not result.chunk.failed and result.finalized.done == result.finalized.total == 4
    records = [json.loads(p.read_text()) for p in (out / "cells").glob("*.json")]
    assert len(records) == 3  # SD 1.x: skip 1 and 2; SDXL: one cell for both
    xl_record = next(r for r in records if r["model"]["family"] == "sdxl")
    assert [(e["encoder"], e["layer"], e["final_layer_norm"]) for e in xl_record["text_encoders"]] == [
        ("text_encoder", 5, False),
        ("text_encoder_2", 7, False),
    ]
    assert xl_record["model"]["prediction"] == "v_prediction" and xl_record["model"]["zero_terminal_snr"]
    parameters = Image.open(out / "cells" / f"{xl_record['cell_id']}.png").text["parameters"]
    assert "Clip skip: " in parameters and "Noise Schedule: Zero Terminal SNR" in parameters
    again = reproduce(str(out / "cells" / f"{xl_record['cell_id']}.json"), renderer=ours)
    assert again.ok and again.max_diff == 0
    sd1 = [r for r in records if r["model"]["family"] == "sd1"]
    assert sorted(r["clip_layer"] for r in sd1) == [11, 12] and all(r["text_encoders"][0]["final_layer_norm"] for r in sd1)


# -- VAE ------------------------------------------------------------------------------------------


def test_force_upcast_and_a_nan_decode_redone_in_float32(ours, xl, xl_folder, tmp_path):
    from diffusers import AutoencoderKL

    from gridrender.scheduler.components import resolve_vae
    from gridrender.scheduler.settings import Settings

    half = ours.render(xl, [xl_cell(xl, dtype="float16")])[0]
    assert half.decode == {"dtype": "float32", "redone_in_float32": False}  # the SDXL VAE says force_upcast
    # An "fp16-fix" style VAE (force_upcast false) that overflows in fp16: a huge first conv, which
    # the GroupNorm after it takes back in float32.
    vae = AutoencoderKL.from_pretrained(xl_folder, subfolder="vae")
    with torch.no_grad():
        vae.decoder.conv_in.weight.mul_(1e5)  # the weights still fit in fp16, the activations do not
        vae.decoder.conv_in.bias.mul_(1e5)
    vae.register_to_config(force_upcast=False)
    vae.save_pretrained(tmp_path / "overflowing-vae")
    component = resolve_vae(str(tmp_path / "overflowing-vae"), xl, Settings())
    rendered = ours.render(xl, [xl_cell(xl, dtype="float16", vae=component)])[0]
    assert rendered.decode == {"dtype": "float32", "redone_in_float32": True}
    pixels = np.asarray(rendered.image)
    assert np.isfinite(pixels).all() and pixels.std() > 1


def test_a_single_file_sdxl_vae_decodes_in_the_models_dtype_as_in_a1111(ours, xl, xl_folder, tmp_path):
    """A single-file VAE has no config of its own (it loads with the model's, which says force_upcast):
    A1111 decodes it in fp16 (devices.dtype_vae) and redoes a NaN decode in fp32; the fp16-fix VAE,
    the usual reason to pick an SDXL VAE file, never needs that."""
    from gridrender.scheduler.components import resolve_vae
    from gridrender.scheduler.settings import Settings
    from tests.support.singlefile import write_single_file_vae

    file = write_single_file_vae(xl_folder / "vae", tmp_path / "xl-vae.safetensors")
    component = resolve_vae(str(file), xl, Settings())
    rendered = ours.render(xl, [xl_cell(xl, dtype="float16", vae=component, sampler="Euler", steps=3)])[0]
    assert rendered.decode == {"dtype": "float16", "redone_in_float32": False}


def test_an_sd1_vae_decodes_in_the_models_dtype_whatever_force_upcast_defaults_to(ours, tiny_folder):
    """diffusers' StableDiffusionPipeline never reads force_upcast (only StableDiffusionXLPipeline's
    decode does), and AutoencoderKL defaults it to True; A1111 decodes SD 1.x in fp16 (devices.dtype_vae,
    unless --no-half-vae). So an SD 1.x fp16 render decodes in fp16."""
    from diffusers import AutoencoderKL

    assert AutoencoderKL.from_pretrained(tiny_folder, subfolder="vae").config.force_upcast  # the default says it
    model = resolve(str(tiny_folder))
    rendered = ours.render(model, [xl_cell(model, dtype="float16", sampler="Euler", steps=3)])[0]
    assert rendered.decode == {"dtype": "float16", "redone_in_float32": False}


def test_nan_latents_fail_the_cells_rather_than_store_a_black_image(ours, tiny_folder, tmp_path):
    """A1111's decode_latent_batch: devices.test_for_nans(batch, "unet") raises before any decode."""
    from diffusers import UNet2DConditionModel

    from gridrender.scheduler.errors import RenderError

    folder = tmp_path / "nan-unet"
    shutil.copytree(tiny_folder, folder)
    unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet")
    with torch.no_grad():
        unet.conv_out.bias.fill_(float("nan"))
    unet.save_pretrained(folder / "unet")
    model = resolve(str(folder))
    with pytest.raises(RenderError, match="UNet produced NaN"):
        ours.render(model, [xl_cell(model, sampler="Euler", steps=2)])


def test_a_text_encoder_output_of_mean_zero_fails_the_cells_as_a1111_would(ours, tiny_folder, tmp_path):
    """Seen: a small model whose text encoder's output has mean exactly 0 (here its final norm zeroed):
    A1111's "Original" emphasis restores the mean by dividing 0 by 0, so the conditioning is NaN and
    A1111 stops ("A tensor with all NaNs was produced"). Every cell fails; no black image comes back."""
    from transformers import CLIPTextModel

    from gridrender.workers.clip import text_transformer
    from gridrender.workers.render import CellsFailed

    folder = tmp_path / "zero-mean-te"
    shutil.copytree(tiny_folder, folder)
    encoder = CLIPTextModel.from_pretrained(folder, subfolder="text_encoder")
    with torch.no_grad():
        text_transformer(encoder).final_layer_norm.weight.zero_()
        text_transformer(encoder).final_layer_norm.bias.zero_()
    encoder.save_pretrained(folder / "text_encoder")
    model = resolve(str(folder))
    cells = [xl_cell(model, negative_prompt="", seed=seed, sampler="Euler", steps=2) for seed in (1, 2)]
    with pytest.raises(CellsFailed, match="NaN/inf latents") as failed:
        ours.render(model, cells)
    assert set(failed.value.failed) == {c.id for c in cells} and failed.value.rendered == []


def test_a_vae_that_decodes_nan_even_in_float32_fails_the_cells(ours, tiny_folder, tmp_path):
    """After the float32 retry, pixels still NaN/inf fail their cells (A1111's test_for_nans(x, "vae"))."""
    from diffusers import AutoencoderKL

    from gridrender.workers.render import CellsFailed

    folder = tmp_path / "nan-vae"
    shutil.copytree(tiny_folder, folder)
    vae = AutoencoderKL.from_pretrained(folder, subfolder="vae")
    with torch.no_grad():
        vae.decoder.conv_out.bias.fill_(float("inf"))
    vae.save_pretrained(folder / "vae")
    model = resolve(str(folder))
    cell = xl_cell(model, sampler="Euler", steps=2)
    with pytest.raises(CellsFailed, match="VAE decoded NaN/inf even in float32") as failed:
        ours.render(model, [cell])
    assert list(failed.value.failed) == [cell.id] and failed.value.rendered == []


# -- offline: CLIP's vocabulary ships with gridrender --------------------------------------------

TEXTS = [
    "a photo of a cat",
    "masterpiece, best quality, 1girl, solo, looking at viewer, (sharp focus:1.1)",
    "Ünïcode  spaces\tand CAPS, don't",
    "a,b,,c 123 4567",
    "<|endoftext|> lighthouse at dusk!!",
]


def test_the_shipped_vocabulary_tokenizes_as_clips_tokenizer(tmp_path):
    """vocab.json / merges.txt derived from open_clip's bpe_simple_vocab_16e6 are CLIP's (49408 tokens)."""
    from transformers import CLIPTokenizer

    from gridrender.scheduler.tokens import CLIP_MERGES, CLIP_VOCAB, ClipTokenizer

    for file in (CLIP_VOCAB, CLIP_MERGES):
        shutil.copy(file, tmp_path / file.name)
    theirs = CLIPTokenizer.from_pretrained(tmp_path, local_files_only=True)
    assert len(theirs) == 49408 and (theirs.bos_token_id, theirs.eos_token_id) == (49406, 49407)
    # transformers' documented example for openai/clip-vit-large-patch14
    assert theirs("a photo of a cat")["input_ids"] == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert theirs.get_vocab()[",</w>"] == 267
    ours = ClipTokenizer.from_files(CLIP_VOCAB, CLIP_MERGES)
    for text in TEXTS:
        assert ours.tokenize([text]) == theirs([text], add_special_tokens=False)["input_ids"], text


def test_single_files_load_with_no_network_and_an_empty_hugging_face_cache(tmp_path, monkeypatch):
    """The shipped configs and vocabulary make a from_single_file config folder; real-size headers resolve."""
    import struct

    from huggingface_hub import constants
    from transformers import CLIPTokenizer

    from gridrender.scheduler.tokens import tokenizer_for
    from gridrender.workers.pipelines import single_file_config

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-hf"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-hf-home"))

    def header_only(name, shapes):
        header = json.dumps({k: {"dtype": "F16", "shape": s, "data_offsets": [0, 0]} for k, s in shapes.items()}).encode()
        path = tmp_path / name
        path.write_bytes(struct.pack("<Q", len(header)) + header)
        return path

    unet = {"model.diffusion_model.input_blocks.0.0.weight": [320, 4, 3, 3]}
    sd15 = {
        "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight": [49408, 768],
        **{f"cond_stage_model.transformer.text_model.encoder.layers.{i}.mlp.fc1.weight": [3072, 768] for i in range(12)},
    }
    sdxl = {
        "conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight": [49408, 768],
        **{f"conditioner.embedders.0.transformer.text_model.encoder.layers.{i}.mlp.fc1.weight": [3072, 768] for i in range(12)},
        "conditioner.embedders.1.model.token_embedding.weight": [49408, 1280],
        **{f"conditioner.embedders.1.model.transformer.resblocks.{i}.mlp.c_fc.weight": [5120, 1280] for i in range(32)},
        "v_pred": [0],
        "ztsnr": [0],
    }
    one = resolve(str(header_only("sd15.safetensors", {**unet, **sd15})))
    xl = resolve(str(header_only("noobai-vpred.safetensors", {**unet, **sdxl})))
    assert (one.family, one.config, one.clip_layers) == ("sd1", "sd15", 12)
    assert (xl.family, xl.config, xl.clip_layers, xl.clip_layers_2) == ("sdxl", "sdxl", 12, 32)
    assert (xl.prediction, xl.zero_terminal_snr) == ("v_prediction", True)
    assert tokenizer_for(xl).tokenize(["a photo of a cat"]) == [[320, 1125, 539, 320, 2368]]
    for model, tokenizers in ((one, ["tokenizer"]), (xl, ["tokenizer", "tokenizer_2"])):
        folder = single_file_config(model.config)
        for name in tokenizers:
            tokenizer = CLIPTokenizer.from_pretrained(folder / name, local_files_only=True)
            assert tokenizer("a photo of a cat")["input_ids"] == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert not (tmp_path / "empty-hf").exists() or not any((tmp_path / "empty-hf").iterdir())


def test_an_sdxl_hub_id_resolves_its_family_and_prediction_from_the_cache(monkeypatch, tmp_path, xl_vpred_folder):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    repo = tmp_path / "hf" / "models--someone--noob-vpred"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("b" * 40)
    snapshot = repo / "snapshots" / ("b" * 40)
    for name in ("model_index.json", "text_encoder/config.json", "text_encoder_2/config.json", "scheduler/scheduler_config.json"):
        (snapshot / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(xl_vpred_folder / name, snapshot / name)
    model = resolve("someone/noob-vpred")
    assert (model.kind, model.family, model.revision, model.clip_layers, model.clip_layers_2) == ("hub", "sdxl", "b" * 40, 6, 8)
    assert model.identity() == {
        "kind": "hub",
        "name": "someone/noob-vpred",
        "revision": "b" * 40,
        "prediction": "v_prediction",
        "zero_terminal_snr": True,
    }


def test_an_sd1_v_prediction_model_runs_on_the_v_denoiser(ours, tiny_folder, tmp_path):
    folder = tmp_path / "sd1-v"
    shutil.copytree(tiny_folder, folder)
    config_file = folder / "scheduler" / "scheduler_config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "prediction_type": "v_prediction"}))
    eps, v = resolve(str(tiny_folder)), resolve(str(folder))
    assert (v.family, v.prediction, v.zero_terminal_snr) == ("sd1", "v_prediction", False)
    a, b = (ours.render(m, [xl_cell(m, sampler="Euler")])[0] for m in (eps, v))
    assert b.sampler["config"]["denoiser"] == "k-diffusion:CompVisVDenoiser" and a.sampler["sigmas"] == b.sampler["sigmas"]
    assert differs(a.image, b.image) > 10  # the same weights read as v: another image
