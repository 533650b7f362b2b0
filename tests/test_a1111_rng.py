"""A1111's GPU noise, ENSD, 1.9+ Automatic schedules, hires fix and img2img, against references.

The references are written here from A1111's code: modules/rng_philox.py (Philox 4x32-10
and Box-Muller, as a plain scalar transcription), modules/rng.py (ImageRNG: first(),
next(), the ENSD reseed), modules/sd_samplers_common.py (TorchHijack, the torchsde
patch, setup_img2img_steps), modules/sd_samplers_kdiffusion.py (1.9+ samplers_k_diffusion,
get_sigmas, sample, sample_img2img, create_noise_sampler), modules/processing.py
(StableDiffusionProcessingTxt2Img.sample / sample_hr_pass / calculate_target_resolution,
StableDiffusionProcessingImg2Img.init / sample), modules/images.py (resize_image) and
modules/upscaler.py (Upscaler.upscale, UpscalerLanczos), around k-diffusion's own sampling
functions. gridrender's code is never called to build a reference.
"""

from __future__ import annotations

import inspect
import io
import math

import numpy as np
import pytest
import torch
from PIL import Image

from gridrender.scheduler import samplers
from gridrender.scheduler.hires import Hires
from gridrender.scheduler.models import resolve
from tests.support import kdiffusion
from tests.test_a1111 import LatentDiffusion, a1111_cond, differs, model_folder  # noqa: F401  (fixture)

# -- A1111's rng_philox.py, one number at a time -----------------------------------------------

MASK = 0xFFFFFFFF
INV = float(np.float32(2.3283064e-10))  # two_pow32_inv, a float32 constant
INV_2PI = float(np.float32(2.3283064e-10 * 6.2831855))


def philox_normal(seed: int, offset: int, index: int) -> float:
    """Element `index` of a draw at `offset`: counter (offset, 0, index, 0), key (seed low, seed high)."""
    seed = int(seed)  # torchsde hands numpy integers
    c0, c1, c2, c3 = offset & MASK, 0, index & MASK, 0
    k0, k1 = seed & MASK, (seed >> 32) & MASK
    for _ in range(10):
        p0, p1 = c0 * 0xD2511F53, c2 * 0xCD9E8D57
        c0, c1, c2, c3 = ((p1 >> 32) ^ c1 ^ k0) & MASK, p1 & MASK, ((p0 >> 32) ^ c3 ^ k1) & MASK, p0 & MASK
        k0, k1 = (k0 + 0x9E3779B9) & MASK, (k1 + 0xBB67AE85) & MASK
    u = c0 * INV + INV / 2
    v = c1 * INV_2PI + INV_2PI / 2
    return float(np.float32(math.sqrt(-2.0 * math.log(u)) * math.sin(v)))


class PhiloxReference:
    """rng_philox.Generator: each randn() is the next offset."""

    def __init__(self, seed: int):
        self.seed, self.offset = seed, 0

    def randn(self, shape) -> torch.Tensor:
        n = math.prod(shape)
        values = [philox_normal(self.seed, self.offset, i) for i in range(n)]
        self.offset += 1
        return torch.tensor(values, dtype=torch.float32).reshape(shape)


def create_generator(source: str, seed: int):
    """rng.create_generator ("GPU" on a CUDA device is torch's CUDA generator, which NV emulates)."""
    return torch.Generator("cpu").manual_seed(seed) if source == "CPU" else PhiloxReference(seed)


def draw(generator, shape) -> torch.Tensor:
    return torch.randn(shape, generator=generator) if isinstance(generator, torch.Generator) else generator.randn(shape)


class ImageRNG:
    """rng.ImageRNG without variation seeds: first() draws, then ENSD reseeds; next() draws on."""

    def __init__(self, shape, seeds, source, ensd):
        self.shape, self.seeds, self.source, self.ensd = shape, seeds, source, ensd
        self.generators = [create_generator(source, s) for s in seeds]
        self.is_first = True

    def first(self):
        xs = [draw(g, self.shape) for g in self.generators]
        if self.ensd:
            self.generators = [create_generator(self.source, s + self.ensd) for s in self.seeds]
        return torch.stack(xs)

    def next(self):
        if self.is_first:
            self.is_first = False
            return self.first()
        return torch.stack([draw(g, self.shape) for g in self.generators])


class TorchHijack:
    """sd_samplers_common.TorchHijack (1.7+): k-diffusion's randn_like is p.rng.next()."""

    def __init__(self, rng):
        self.rng = rng

    def __getattr__(self, item):
        return (lambda _x: self.rng.next()) if item == "randn_like" else getattr(torch, item)


# A1111 1.9+ samplers_k_diffusion: function, and the options that matter here.
TABLE = {
    "DPM++ 2M": ("sample_dpmpp_2m", {"scheduler": "karras"}),
    "DPM++ SDE": ("sample_dpmpp_sde", {"scheduler": "karras", "brownian_noise": True}),
    "DPM++ 2M SDE": ("sample_dpmpp_2m_sde", {"scheduler": "exponential", "brownian_noise": True}),
    "DPM++ 2M SDE Heun": ("sample_dpmpp_2m_sde", {"scheduler": "exponential", "brownian_noise": True, "solver_type": "heun"}),
    "DPM++ 2S a": ("sample_dpmpp_2s_ancestral", {"scheduler": "karras", "uses_ensd": True}),
    "DPM++ 3M SDE": (
        "sample_dpmpp_3m_sde",
        {"scheduler": "exponential", "discard_next_to_last_sigma": True, "brownian_noise": True},
    ),
    "Euler a": ("sample_euler_ancestral", {"uses_ensd": True}),
    "Euler": ("sample_euler", {}),
    "LMS": ("sample_lms", {}),
    "Heun": ("sample_heun", {}),
    "DPM2": ("sample_dpm_2", {"scheduler": "karras", "discard_next_to_last_sigma": True}),
    "DPM2 a": ("sample_dpm_2_ancestral", {"scheduler": "karras", "discard_next_to_last_sigma": True, "uses_ensd": True}),
}
SCHEDULE_LABELS = {"karras": "Karras", "exponential": "Exponential", None: "Uniform"}
LATENT_MODES = {
    "Latent": ("bilinear", False),
    "Latent (antialiased)": ("bilinear", True),
    "Latent (bicubic)": ("bicubic", False),
    "Latent (bicubic antialiased)": ("bicubic", True),
    "Latent (nearest)": ("nearest", False),
    "Latent (nearest-exact)": ("nearest-exact", False),
}


# -- A1111's tiled model upscale (images.split_grid / combine_grid, upscaler_utils) ------------

ESRGAN_TILE, ESRGAN_TILE_OVERLAP = 192, 8  # shared_options: ESRGAN_tile, ESRGAN_tile_overlap


def split_grid(image, tile_w=512, tile_h=512, overlap=64):
    w, h = image.width, image.height
    cols = math.ceil((w - overlap) / (tile_w - overlap))
    rows = math.ceil((h - overlap) / (tile_h - overlap))
    dx = (w - tile_w) / (cols - 1) if cols > 1 else 0
    dy = (h - tile_h) / (rows - 1) if rows > 1 else 0
    tiles = []
    for row in range(rows):
        y = int(row * dy)
        if y + tile_h >= h:
            y = h - tile_h
        row_images = []
        for col in range(cols):
            x = int(col * dx)
            if x + tile_w >= w:
                x = w - tile_w
            row_images.append([x, tile_w, image.crop((x, y, x + tile_w, y + tile_h))])
        tiles.append([y, tile_h, row_images])
    return {"tiles": tiles, "tile_w": tile_w, "tile_h": tile_h, "image_w": w, "image_h": h, "overlap": overlap}


def combine_grid(grid):
    def make_mask_image(r):
        return Image.fromarray((r * 255 / grid["overlap"]).astype(np.uint8), "L")

    overlap = grid["overlap"]
    mask_w = make_mask_image(np.arange(overlap, dtype=np.float32).reshape((1, overlap)).repeat(grid["tile_h"], axis=0))
    mask_h = make_mask_image(np.arange(overlap, dtype=np.float32).reshape((overlap, 1)).repeat(grid["image_w"], axis=1))
    combined_image = Image.new("RGB", (grid["image_w"], grid["image_h"]))
    for y, h, row in grid["tiles"]:
        combined_row = Image.new("RGB", (grid["image_w"], h))
        for x, w, tile in row:
            if x == 0:
                combined_row.paste(tile, (0, 0))
                continue
            combined_row.paste(tile.crop((0, 0, overlap, h)), (x, 0), mask=mask_w)
            combined_row.paste(tile.crop((overlap, 0, w, h)), (x + overlap, 0))
        if y == 0:
            combined_image.paste(combined_row, (0, 0))
            continue
        combined_image.paste(combined_row.crop((0, 0, combined_row.width, overlap)), (0, y), mask=mask_h)
        combined_image.paste(combined_row.crop((0, overlap, combined_row.width, h)), (0, y + overlap))
    return combined_image


def upscale_pil_patch(model, img):
    tensor = (
        torch.from_numpy(np.ascontiguousarray(np.transpose(np.array(img.convert("RGB"))[:, :, ::-1], (2, 0, 1))) / 255)
        .unsqueeze(0)
        .to(dtype=torch.float32)
    )
    with torch.inference_mode():
        arr = model(tensor).squeeze(0).float().cpu().clamp_(0, 1).numpy()
    arr = (255.0 * np.moveaxis(arr, 0, 2)).round().astype(np.uint8)[:, :, ::-1]
    return Image.fromarray(arr, "RGB")


def upscale_with_model(model, img, tile_size, tile_overlap):
    grid = split_grid(img, tile_size, tile_size, tile_overlap)
    newtiles = []
    for y, h, row in grid["tiles"]:
        newrow = []
        for x, w, tile in row:
            output = upscale_pil_patch(model, tile)
            scale_factor = output.width // tile.width
            newrow.append([x * scale_factor, w * scale_factor, output])
        newtiles.append([y * scale_factor, h * scale_factor, newrow])
    return combine_grid(
        {
            "tiles": newtiles,
            "tile_w": grid["tile_w"] * scale_factor,
            "tile_h": grid["tile_h"] * scale_factor,
            "image_w": grid["image_w"] * scale_factor,
            "image_h": grid["image_h"] * scale_factor,
            "overlap": grid["overlap"] * scale_factor,
        }
    )


def calculate_target_resolution(width, height, hr_scale, hr_resize_x, hr_resize_y):
    """StableDiffusionProcessingTxt2Img.calculate_target_resolution: (to_x, to_y, truncate_x, truncate_y)."""
    truncate_x = truncate_y = 0
    if hr_resize_x == 0 and hr_resize_y == 0:
        return int(width * hr_scale), int(height * hr_scale), 0, 0
    if hr_resize_y == 0:
        to_x, to_y = hr_resize_x, hr_resize_x * height // width
    elif hr_resize_x == 0:
        to_x, to_y = hr_resize_y * width // height, hr_resize_y
    else:
        if width / height < hr_resize_x / hr_resize_y:
            to_x, to_y = hr_resize_x, hr_resize_x * height // width
        else:
            to_x, to_y = hr_resize_y * width // height, hr_resize_y
        truncate_x, truncate_y = (to_x - hr_resize_x) // 8, (to_y - hr_resize_y) // 8
    return to_x, to_y, truncate_x, truncate_y


def fake_esrgan() -> torch.nn.Module:
    """A 4x model shaped like ESRGAN (convolutions with biases, pixel shuffle, [0, 1]), seeded random weights.

    Two layers with biases: a tile's black border is not the zero padding of an untiled run.
    """
    torch.manual_seed(11)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 16, 3, padding=1),
        torch.nn.LeakyReLU(0.2),
        torch.nn.Conv2d(16, 48, 3, padding=1),
        torch.nn.PixelShuffle(4),
        torch.nn.Sigmoid(),
    ).eval()


class Reference:
    """A1111's txt2img (with hires fix) and img2img for one image, on the test's model folder."""

    def __init__(self, pipe, config):
        self.k = kdiffusion.load()
        self.pipe = pipe
        self.model_wrap = self.k.external.CompVisDenoiser(LatentDiffusion(pipe.unet, config))

    def get_sigmas(self, name, scheduler, steps):
        """KDiffusionSampler.get_sigmas (1.9+): Automatic is the sampler's 'scheduler' option."""
        options = TABLE[name][1]
        discard = options.get("discard_next_to_last_sigma", False)
        steps += 1 if discard else 0
        if scheduler == "Automatic":
            scheduler = SCHEDULE_LABELS[options.get("scheduler")]
        m_min, m_max = self.model_wrap.sigmas[0].item(), self.model_wrap.sigmas[-1].item()
        if scheduler == "Uniform":
            sigmas = self.model_wrap.get_sigmas(steps)
        elif scheduler == "Karras":
            sigmas = self.k.sampling.get_sigmas_karras(n=steps, sigma_min=m_min, sigma_max=m_max)
        else:
            sigmas = self.k.sampling.get_sigmas_exponential(n=steps, sigma_min=m_min, sigma_max=m_max)
        if discard:
            sigmas = torch.cat([sigmas[:-2], sigmas[-1:]])
        return sigmas.cpu()

    def run(self, name, x, sigmas, sigma_sched, rng, seed, source, cond, uncond, scale):
        """The sampler function on sigma_sched, with A1111's noise: TorchHijack, and torchsde patched."""
        k = self.k
        function, options = TABLE[name]

        def cfg_denoiser(x, sigma, cond, uncond, cond_scale):
            if cond.shape[1] == uncond.shape[1]:
                x_out = self.model_wrap(torch.cat([x, x]), torch.cat([sigma, sigma]), cond=torch.cat([cond, uncond]))
            else:
                x_out = torch.cat([self.model_wrap(x, sigma, cond=cond), self.model_wrap(x, sigma, cond=uncond)])
            return x_out[-1:] + (x_out[:1] - x_out[-1:]) * cond_scale

        func = getattr(k.sampling, function)
        extra = {"eta": 1.0} if "eta" in inspect.signature(func).parameters else {}
        if "solver_type" in options:
            extra["solver_type"] = options["solver_type"]
        import torchsde._brownian.brownian_interval as brownian

        def torchsde_randn(size, dtype, device, seed):  # replace_torchsde_browinan: rng.randn_local
            return draw(create_generator(source, seed), size).to(device=device, dtype=dtype)

        original = brownian._randn
        brownian._randn = torchsde_randn
        k.sampling.torch = TorchHijack(rng)
        try:
            if options.get("brownian_noise"):  # create_noise_sampler: over the whole schedule
                extra["noise_sampler"] = k.sampling.BrownianTreeNoiseSampler(
                    x, sigmas[sigmas > 0].min(), sigmas.max(), seed=[seed]
                )
            return func(
                cfg_denoiser,
                x,
                sigma_sched,
                extra_args={"cond": cond, "uncond": uncond, "cond_scale": scale},
                disable=True,
                **extra,
            )
        finally:
            k.sampling.torch = torch
            brownian._randn = original

    def decode(self, samples) -> np.ndarray:
        decoded = self.pipe.vae.decode(samples / self.pipe.vae.config.scaling_factor).sample
        pixels = torch.clamp((decoded.float() + 1.0) / 2.0, min=0.0, max=1.0)
        return (255.0 * np.moveaxis(pixels.cpu().numpy(), 1, 3)).astype(np.uint8)

    def encode(self, images: list[Image.Image], seed: int) -> torch.Tensor:
        """images_tensor_to_samples; LDM's posterior sample() draws from torch's global CPU generator, which
        rng.randn's manual_seed(seed) has just seeded: a generator seeded with the seed stands for it here."""
        arrays = np.stack([np.moveaxis(np.array(im).astype(np.float32) / 255.0, 2, 0) for im in images])
        image = torch.from_numpy(arrays) * 2 - 1
        dist = self.pipe.vae.encode(image).latent_dist
        z = dist.mean + dist.std * torch.randn(dist.mean.shape, generator=torch.Generator().manual_seed(seed))
        return z * self.pipe.vae.config.scaling_factor

    @torch.no_grad()
    def txt2img(self, c, hires=None) -> np.ndarray:
        cond, uncond = a1111_cond(self.pipe, c.prompt, c.clip_skip), a1111_cond(self.pipe, c.negative_prompt, c.clip_skip)
        rng = ImageRNG((4, c.height // 8, c.width // 8), [c.seed], c.rng, c.eta_noise_seed_delta)
        sigmas = self.get_sigmas(c.sampler, "Automatic" if c.schedule == "Automatic" else c.schedule, c.steps)
        x = rng.next() * sigmas[0]
        samples = self.run(c.sampler, x, sigmas, sigmas, rng, c.seed, c.rng, cond, uncond, c.guidance)
        if hires is None:
            return self.decode(samples)[0]
        return self.hires_pass(c, hires, samples, cond, uncond)

    def hires_pass(self, c, hr, samples, cond, uncond) -> np.ndarray:
        target_w, target_h, truncate_x, truncate_y = calculate_target_resolution(
            c.width, c.height, hr.get("scale", 2.0), *hr.get("resize", (0, 0))
        )
        if hr["upscaler"] in LATENT_MODES:
            mode, antialias = LATENT_MODES[hr["upscaler"]]
            samples = torch.nn.functional.interpolate(
                samples, size=(target_h // 8, target_w // 8), mode=mode, antialias=antialias
            )
        else:  # decode, images.resize_image(0, image, w, h, upscaler_name="Lanczos" or a model's), encode
            image = Image.fromarray(self.decode(samples)[0])
            scale = max(target_w / image.width, target_h / image.height)
            dest_w, dest_h = int((image.width * scale) // 8 * 8), int((image.height * scale) // 8 * 8)
            if hr.get("model") is not None:  # Upscaler.upscale: the model until the size is reached
                for i in range(3):
                    if image.width >= dest_w and image.height >= dest_h and (i > 0 or scale != 1):
                        break
                    shape = image.size
                    image = upscale_with_model(hr["model"], image, ESRGAN_TILE, ESRGAN_TILE_OVERLAP)
                    if shape == image.size:
                        break
            else:
                image = image.resize((int(image.width * scale), int(image.height * scale)), resample=Image.LANCZOS)
            if image.size != (dest_w, dest_h):
                image = image.resize((dest_w, dest_h), resample=Image.LANCZOS)
            if image.size != (target_w, target_h):
                image = image.resize((target_w, target_h), resample=Image.LANCZOS)
            samples = self.encode([image], c.seed)
        samples = samples[
            :,
            :,
            truncate_y // 2 : samples.shape[2] - (truncate_y + 1) // 2,
            truncate_x // 2 : samples.shape[3] - (truncate_x + 1) // 2,
        ]
        rng = ImageRNG(tuple(samples.shape[1:]), [c.seed], c.rng, c.eta_noise_seed_delta)
        noise = rng.next()
        name = hr.get("sampler") or c.sampler
        requested = hr["steps"] or c.steps  # sample_img2img(..., steps=hr_second_pass_steps or steps)
        steps = int(requested / min(hr["denoise"], 0.999))  # setup_img2img_steps, fixed steps
        t_enc = requested - 1
        sigmas = self.get_sigmas(name, hr.get("schedule", "Automatic"), steps)
        sigma_sched = sigmas[steps - t_enc - 1 :]
        xi = samples + noise * sigma_sched[0]
        out = self.run(name, xi, sigmas, sigma_sched, rng, c.seed, c.rng, cond, uncond, c.guidance)
        return self.decode(out)[0]

    @torch.no_grad()
    def img2img(self, c, image: Image.Image, denoise: float) -> np.ndarray:
        cond, uncond = a1111_cond(self.pipe, c.prompt, c.clip_skip), a1111_cond(self.pipe, c.negative_prompt, c.clip_skip)
        image = image.convert("RGB").resize((c.width, c.height), resample=Image.LANCZOS)  # resize_image(0), no upscaler
        init_latent = self.encode([image], c.seed)
        rng = ImageRNG((4, c.height // 8, c.width // 8), [c.seed], c.rng, c.eta_noise_seed_delta)
        x = rng.next()
        t_enc = int(min(denoise, 0.999) * c.steps)  # setup_img2img_steps, img2img_fix_steps off
        sigmas = self.get_sigmas(c.sampler, "Automatic", c.steps)
        sigma_sched = sigmas[c.steps - t_enc - 1 :]
        xi = init_latent + x * sigma_sched[0]
        out = self.run(c.sampler, xi, sigmas, sigma_sched, rng, c.seed, c.rng, cond, uncond, c.guidance)
        return self.decode(out)[0]


@pytest.fixture(scope="module")
def model(model_folder):  # noqa: F811
    return resolve(str(model_folder))


@pytest.fixture(scope="module")
def ours():
    from gridrender.workers.render import Renderer

    return Renderer()


@pytest.fixture(scope="module")
def reference(ours, model):
    loaded = ours.cache.get(model, "float32")
    return Reference(loaded.pipe, loaded.scheduler_config)


class Spec:
    """The settings of one A1111 render, as the reference reads them."""

    def __init__(self, **kw):
        base = dict(
            prompt="a cow standing in a field, golden hour",
            negative_prompt="lowres, blurry",
            clip_skip=2,
            seed=5,
            sampler="Euler a",
            schedule="Automatic",
            steps=6,
            guidance=7.0,
            width=64,
            height=64,
            rng="GPU",
            eta_noise_seed_delta=0,
        )
        self.__dict__.update({**base, **kw})

    def cell(self, model, **extra):
        from gridrender.scheduler.grid import make_cell

        params = {k: v for k, v in self.__dict__.items()}
        return make_cell(model, dtype="float32", **params, **extra)


# -- the random numbers ----------------------------------------------------------------------


def test_philox_matches_a1111s_documented_output_and_the_reference():
    from gridrender.workers.philox import PhiloxGenerator

    # rng_philox.py's docstring: Generator(seed=0).randn(shape=(3, 4))
    documented = [
        [-0.92466259, -0.42534415, -2.6438457, 0.14518388],
        [-0.12086647, -0.57972564, -0.62285122, -0.32838709],
        [-1.07454231, -0.36314407, -1.67105067, 2.26550497],
    ]
    np.testing.assert_allclose(PhiloxGenerator(0).randn((3, 4)), documented, atol=1e-6)
    for seed in (0, 5, 31337, 2**32 - 1, 2**32 + 7, 2**63 + 11):
        ours, ref = PhiloxGenerator(seed), PhiloxReference(seed)
        for shape in ((4, 8, 8), (4, 3, 5), (7,)):
            np.testing.assert_allclose(ours.randn(shape), ref.randn(shape).numpy(), rtol=0, atol=2e-6)


def test_an_images_generator_reseeds_with_ensd_after_the_initial_noise():
    from gridrender.workers.noise import BatchNoise

    for source in ("GPU", "NV", "CPU"):
        for ensd in (0, 31337):
            ours = BatchNoise(source, [5, 6], ensd, (4, 3, 3), torch.device("cpu"))
            ref = ImageRNG((4, 3, 3), [5, 6], source, ensd)
            for _ in range(3):
                torch.testing.assert_close(ours.next(), ref.next(), rtol=0, atol=2e-6)
    first_gpu = BatchNoise("GPU", [5], 0, (4, 3, 3), torch.device("cpu")).next()
    first_cpu = BatchNoise("CPU", [5], 0, (4, 3, 3), torch.device("cpu")).next()
    assert not torch.allclose(first_gpu, first_cpu)  # two sources, two noises


@pytest.mark.gpu
def test_torch_cuda_randn_is_the_emulation_for_sd_latent_shapes():
    """GPU means torch's CUDA generator: the emulation must draw what it draws, up to the GPU's thread count.

    torch's normal kernel (ATen DistributionTemplates.h, calc_execution_policy) launches at most
    SMs x maxThreadsPerSM threads; thread i draws one curand_normal4 from Philox subsequence i and
    element i takes its first normal, so a tensor of at most that many numbers is the emulation's.
    Past it, element cap + i takes thread i's second normal (the emulation does not have it), and
    the offset still moves by one block per draw while the tensor has at most 4 x cap numbers.
    """
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    from gridrender.workers.philox import PhiloxGenerator

    props = torch.cuda.get_device_properties(0)
    per_sm = getattr(props, "max_threads_per_multi_processor", None)
    cap = props.multi_processor_count * per_sm if per_sm else None
    shapes = [(4, 64, 64), (4, 96, 64), (4, 128, 128), (4, 152, 104), (4, 256, 256)]
    for seed in (0, 5, 31337, 4294967295):
        for shape in shapes:
            if cap is not None and math.prod(shape) > cap:
                continue  # this card draws past its threads: below
            generator = torch.Generator("cuda").manual_seed(seed)
            emulated = PhiloxGenerator(seed)
            for _ in range(3):  # the initial noise and two later draws
                cuda = torch.randn(shape, device="cuda", generator=generator).cpu().numpy()
                np.testing.assert_allclose(emulated.randn(shape), cuda, rtol=0, atol=1e-5)
    if cap is None:
        pytest.skip("torch does not report max_threads_per_multi_processor: the bound was not checked")
    shape = (4, 8, math.ceil((cap + 4096) / 32))  # a little past the threads this card runs at once
    cuda = torch.randn(shape, device="cuda", generator=torch.Generator("cuda").manual_seed(7)).cpu().numpy()
    emulated = PhiloxGenerator(7).randn(shape)
    np.testing.assert_allclose(emulated.reshape(-1)[:cap], cuda.reshape(-1)[:cap], rtol=0, atol=1e-5)
    assert not np.allclose(emulated.reshape(-1)[cap:], cuda.reshape(-1)[cap:], rtol=0, atol=1e-3)


# -- samplers with GPU noise, Automatic schedules, ENSD ----------------------------------------

KEPT = [s.name for s in samplers.A1111]


def get_align_your_steps_sigmas(n, is_sdxl):
    """sd_schedulers.get_align_your_steps_sigmas (1.10): NVIDIA's 10-step tables, log-linear in between."""

    def loglinear_interp(t_steps, num_steps):
        xs = np.linspace(0, 1, len(t_steps))
        ys = np.log(t_steps[::-1])
        new_ys = np.interp(np.linspace(0, 1, num_steps), xs, ys)
        return np.exp(new_ys)[::-1].copy()

    if is_sdxl:
        sigmas = [14.615, 6.315, 3.771, 2.181, 1.342, 0.862, 0.555, 0.380, 0.234, 0.113, 0.029]
    else:
        sigmas = [14.615, 6.475, 3.861, 2.697, 1.886, 1.396, 0.963, 0.652, 0.399, 0.152, 0.029]
    if n != len(sigmas):
        sigmas = np.append(loglinear_interp(sigmas, n), [0.0])
    else:
        sigmas.append(0.0)
    return torch.FloatTensor(sigmas)


def test_align_your_steps_takes_the_families_table():
    from gridrender.workers.sigmas import ModelSigmas, sigmas_for

    cumprod = torch.cumprod(1 - torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2, 0).float()
    for xl in (False, True):
        for n in (6, 10, 11, 20):
            ours = sigmas_for("Align Your Steps", n, ModelSigmas(cumprod, xl=xl))
            torch.testing.assert_close(ours, get_align_your_steps_sigmas(n, xl), rtol=0, atol=0)
    # what the name renders changed on SDXL: its cells have new ids (Karras' stay)
    from gridrender.scheduler.params import BY_NAME

    assert BY_NAME["schedule"].identity("Karras") == "Karras"
    assert BY_NAME["schedule"].identity("Align Your Steps") != "Align Your Steps"


def test_the_table_is_a1111s_1_9_table():
    assert set(KEPT) == TABLE.keys()
    for name in KEPT:  # Automatic resolves to the sampler's own 'scheduler' option
        assert samplers.canonical(name, "Automatic")[1] == SCHEDULE_LABELS[TABLE[name][1].get("scheduler")]
        assert samplers.lookup(name).uses_ensd == TABLE[name][1].get("uses_ensd", False)


@pytest.mark.parametrize("name", KEPT)
def test_gpu_noise_with_the_automatic_schedule_matches_a1111(name, ours, model, reference):
    spec = Spec(sampler=name)
    (rendered,) = ours.render(model, [spec.cell(model)])
    want = reference.txt2img(spec)
    assert differs(rendered.image, want) <= 2, f"{name}: {differs(rendered.image, want)}/255"
    assert np.asarray(rendered.image).std() > 3


@pytest.mark.parametrize("name", [s.name for s in samplers.A1111 if s.uses_ensd])
@pytest.mark.parametrize("source", ["GPU", "CPU"])
def test_ensd_31337_with_ancestral_samplers_matches_a1111(name, source, ours, model, reference):
    spec = Spec(sampler=name, rng=source, eta_noise_seed_delta=31337, seed=7)
    plain = ours.render(model, [Spec(sampler=name, rng=source, seed=7).cell(model)])[0]
    (rendered,) = ours.render(model, [spec.cell(model)])
    assert differs(rendered.image, reference.txt2img(spec)) <= 2
    assert differs(rendered.image, plain.image) > 2  # the delta changes the ancestral draws


# -- hires fix and img2img -------------------------------------------------------------------


@pytest.mark.parametrize("upscaler", ["Latent", "Lanczos"])
@pytest.mark.parametrize("denoise", [0.45, 0.75])
@pytest.mark.parametrize("hr_steps", [0, 4])
def test_hires_fix_matches_a1111(upscaler, denoise, hr_steps, ours, model, reference):
    spec = Spec(sampler="Euler a", steps=5)
    hires = Hires(upscaler, denoise, hr_steps, 2.0)
    (rendered,) = ours.render(model, [spec.cell(model, hires=hires)])
    assert rendered.image.size == (128, 128)
    want = reference.txt2img(spec, {"upscaler": upscaler, "scale": 2.0, "denoise": denoise, "steps": hr_steps})
    assert differs(rendered.image, want) <= 2, f"{upscaler} {denoise} {hr_steps}: {differs(rendered.image, want)}/255"


@pytest.mark.parametrize("size", [(64, 64), (200, 136), (400, 392)])
def test_esrgan_models_run_in_a1111s_tiles(size, monkeypatch):
    """esrgan_model.esrgan_upscale: 192 px tiles overlapping by 8, blended by images.combine_grid; an image
    smaller than a tile is one tile cropped at a negative offset."""
    from gridrender.scheduler.components import Component
    from gridrender.workers import twopass

    net = fake_esrgan()
    monkeypatch.setattr(twopass, "_upscaler_model", lambda _location, _sha256, _device: net)
    rng = np.random.default_rng(sum(size))
    image = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    ours = twopass.esrgan_upscale(Component("upscaler", "fake", "fake.pth", "/nowhere/fake.pth", "0" * 64), image)
    want = upscale_with_model(net, image, ESRGAN_TILE, ESRGAN_TILE_OVERLAP)
    assert ours.size == want.size == (4 * size[0], 4 * size[1])
    assert differs(ours, want) == 0
    untiled = upscale_pil_patch(net, image)
    assert differs(untiled, want) > 0  # the tiles' borders and seams are A1111's, not the model's


def test_hires_fix_with_an_esrgan_model_matches_a1111(ours, model, reference, monkeypatch):
    from gridrender.scheduler.components import Component
    from gridrender.workers import twopass

    net = fake_esrgan()
    monkeypatch.setattr(twopass, "_upscaler_model", lambda _location, _sha256, _device: net)
    upscaler = Component("upscaler", "fake4x", "fake4x.pth", "/nowhere/fake4x.pth", "1" * 64)
    spec = Spec(sampler="DPM++ 2M", steps=4, width=56, height=48)
    (rendered,) = ours.render(model, [spec.cell(model, hires=Hires("fake4x", 0.55, 3, 2.0, model=upscaler))])
    want = reference.txt2img(spec, {"upscaler": "fake4x", "model": net, "scale": 2.0, "denoise": 0.55, "steps": 3})
    assert rendered.image.size == (112, 96)
    assert differs(rendered.image, want) <= 2, f"{differs(rendered.image, want)}/255"


def test_hires_targets_are_a1111s():
    for width, height in ((512, 768), (768, 512), (640, 448), (64, 48), (520, 512)):
        for scale, rx, ry in (
            (2.0, 0, 0),
            (1.5, 0, 0),
            (1.33, 0, 0),
            (2.0, 1024, 0),
            (2.0, 0, 1000),
            (2.0, 1024, 1024),
            (2.0, 1280, 896),
            (2.0, 800, 1200),
            (2.0, 96, 64),
        ):
            target = Hires("Latent", 0.5, 0, scale, rx, ry).target(width, height)
            assert (target.width, target.height, target.truncate_x, target.truncate_y) == calculate_target_resolution(
                width, height, scale, rx, ry
            ), (width, height, scale, rx, ry)


@pytest.mark.parametrize(("size", "resize", "final"), [((64, 48), (80, 0), (80, 56)), ((64, 64), (96, 64), (96, 64))])
def test_hires_resize_with_one_side_or_a_crop_matches_a1111(size, resize, final, ours, model, reference):
    spec = Spec(sampler="Euler a", steps=4, width=size[0], height=size[1])
    hires = Hires("Latent", 0.6, 3, 2.0, *resize)
    (rendered,) = ours.render(model, [spec.cell(model, hires=hires)])
    assert rendered.image.size == final
    want = reference.txt2img(spec, {"upscaler": "Latent", "resize": resize, "denoise": 0.6, "steps": 3})
    assert differs(rendered.image, want) <= 2, f"{resize}: {differs(rendered.image, want)}/255"


def test_hires_with_another_sampler_and_ensd_shares_its_first_pass(ours, model, reference):
    spec = Spec(sampler="DPM++ 2M", steps=5, eta_noise_seed_delta=31337)
    settings = [Hires("Latent (bicubic antialiased)", 0.6, 3, 1.5, sampler="DPM++ 2S a"), Hires("Latent", 0.5)]
    cells = [spec.cell(model, hires=h) for h in settings]
    rendered = ours.render(model, cells)
    assert len({r.sampler["sigmas"][0] for r in rendered}) == 1  # one first pass
    want = reference.txt2img(
        spec, {"upscaler": "Latent (bicubic antialiased)", "scale": 1.5, "denoise": 0.6, "steps": 3, "sampler": "DPM++ 2S a"}
    )
    assert rendered[0].image.size == (96, 96)
    assert differs(rendered[0].image, want) <= 2
    assert (
        differs(rendered[1].image, reference.txt2img(spec, {"upscaler": "Latent", "scale": 2.0, "denoise": 0.5, "steps": 0})) <= 2
    )
    # alone or beside the other setting, in a job of batch size 2: one shape for every call, the same image
    together = ours.render(model, cells, pad_to=2)
    for i, cell in enumerate(cells):
        assert differs(ours.render(model, [cell], pad_to=2)[0].image, together[i].image) == 0


@pytest.fixture(scope="module")
def init_png(tmp_path_factory):
    rng = np.random.default_rng(3)
    gradient = np.linspace(0, 255, 48, dtype=np.float32)
    pixels = np.stack(
        [gradient[None, :].repeat(40, 0), gradient[:40, None].repeat(48, 1), rng.uniform(0, 255, (40, 48))], axis=2
    ).astype(np.uint8)
    path = tmp_path_factory.mktemp("init") / "init.png"
    Image.fromarray(pixels).save(path)
    return path


@pytest.mark.parametrize("name", ["Euler a", "DPM++ 2M", "DPM++ SDE"])
@pytest.mark.parametrize("denoise", [0.5, 0.8])
def test_img2img_matches_a1111(name, denoise, init_png, ours, model, reference):
    from gridrender.scheduler.components import resolve_init_image

    init = resolve_init_image(str(init_png))
    spec = Spec(sampler=name, steps=6)
    (rendered,) = ours.render(model, [spec.cell(model, init_image=init, denoise=denoise)])
    want = reference.img2img(spec, Image.open(io.BytesIO(init_png.read_bytes())), denoise)
    assert differs(rendered.image, want) <= 2, f"{name} {denoise}: {differs(rendered.image, want)}/255"
