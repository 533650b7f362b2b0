"""`gridrender import`: A1111 infotexts to job files, and gridrender's own PNGs back to the same cells.

The infotext strings below are written as A1111 1.6-1.10 and Forge write them (modules/
processing.py create_infotext), with the fields users copy: RNG, ENSD, Schedule type,
Hires fields, Lora hashes, and fields gridrender does not render (ADetailer, ControlNet).
"""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import pytest
import yaml
from PIL import Image, PngImagePlugin

from gridrender.scheduler import importer, infotext
from gridrender.scheduler.finalize import read_manifest
from gridrender.scheduler.jobfile import parse_job
from gridrender.scheduler.plan import prepare
from gridrender.scheduler.storage import LocalStore
from tests.conftest import cli

INFOTEXTS = [
    # 1. A1111 1.10, GPU noise (no RNG field), 1.9+ sampler and schedule, hires fix with its own steps
    (
        "masterpiece, best quality, 1girl, looking at viewer, (smile:1.1)\n"
        "Negative prompt: lowres, bad anatomy, (worst quality:1.4)\n"
        "Steps: 28, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 1234567890, Size: 512x768, "
        "Model hash: 6ce0161689, Model: anything-v5, Denoising strength: 0.45, Clip skip: 2, Hires upscale: 2, "
        "Hires steps: 12, Hires upscaler: Latent (nearest-exact), Version: v1.10.1",
        {
            "sampler": "DPM++ 2M",
            "schedule": "Karras",
            "rng": "GPU",
            "eta_noise_seed_delta": 0,
            "steps": 28,
            "guidance": 7.0,
            "seeds": [1234567890],
            "width": 512,
            "height": 768,
            "clip_skip": 2,
            "hires": {"scale": 2.0, "upscaler": "Latent (nearest-exact)", "steps": 12, "denoise": 0.45},
        },
    ),
    # 2. CPU noise and ENSD (anime infotexts), an ancestral sampler, Automatic, no negative prompt
    (
        "1girl, solo, cherry blossoms\n"
        "Steps: 20, Sampler: Euler a, Schedule type: Automatic, CFG scale: 7.5, Seed: 42, Size: 512x512, "
        "Model hash: e6e99610c4, Model: AnythingV3, Clip skip: 2, ENSD: 31337, RNG: CPU, Version: v1.9.4",
        {
            "sampler": "Euler a",
            "schedule": "Automatic",
            "rng": "CPU",
            "eta_noise_seed_delta": 31337,
            "steps": 20,
            "guidance": 7.5,
            "seeds": [42],
            "clip_skip": 2,
        },
    ),
    # 3. A1111 1.6 (before Schedule type): a combined name, NV noise, Lanczos hires fix with a resize
    (
        "a photo of a lighthouse at dusk, dramatic clouds\n"
        "Negative prompt: blurry\n"
        "Steps: 30, Sampler: DPM++ SDE Karras, CFG scale: 5, Seed: 7, Size: 640x448, Model hash: 0123456789, "
        "Denoising strength: 0.6, RNG: NV, Hires resize: 1280x896, Hires upscaler: Lanczos, Version: v1.6.0",
        {
            "sampler": "DPM++ SDE",
            "schedule": "Karras",
            "rng": "NV",
            "clip_skip": 1,
            "steps": 30,
            "seeds": [7],
            "hires": {"resize": [1280, 896], "upscaler": "Lanczos", "steps": 0, "denoise": 0.6},
        },
    ),
    # 4. An old sampler name without Schedule type made by 1.8: Uniform, as it rendered then
    (
        "portrait of an old man, (wrinkles:1.2), <lora:add_detail:0.7>\n"
        "Negative prompt: cartoon\n"
        "Steps: 25, Sampler: DPM++ 2M, CFG scale: 6, Seed: 99, Size: 512x512, Model hash: 0123456789, "
        'Model: realistic, Lora hashes: "add_detail: 7c6bad76eb54", ADetailer model: face_yolov8n.pt, '
        "ADetailer confidence: 0.3, Version: v1.8.0",
        {"sampler": "DPM++ 2M", "schedule": "Uniform", "rng": "GPU", "steps": 25, "seeds": [99], "guidance": 6.0},
    ),
    # 5. Forge: hires with another sampler and schedule, a quoted hires prompt, ControlNet
    (
        "a castle on a hill\n"
        "Negative prompt: low quality\n"
        "Steps: 24, Sampler: Euler, Schedule type: Uniform, CFG scale: 7, Seed: 31, Size: 768x512, "
        "Model hash: 0123456789, Model: dreamshaper_8, Denoising strength: 0.5, ENSD: 31337, Hires upscale: 1.5, "
        "Hires upscaler: Latent, Hires sampler: DPM++ 2M, Hires schedule type: Exponential, "
        'Hires prompt: "a castle on a hill, detailed, sharp", '
        'ControlNet 0: "Module: canny, Model: control_v11p_sd15_canny, Weight: 1", Version: f0.0.17v1.8.0rc',
        {
            "sampler": "Euler",
            "schedule": "Uniform",
            "eta_noise_seed_delta": 31337,
            "steps": 24,
            "hires": {
                "scale": 1.5,
                "upscaler": "Latent",
                "steps": 0,
                "denoise": 0.5,
                "sampler": "DPM++ 2M",
                "schedule": "Exponential",
                "prompt": "a castle on a hill, detailed, sharp",
            },
        },
    ),
]
# 3 was made by 1.6: A1111 1.10 renders it with alphas_cumprod in float16 (infotext_versions.backcompat)
UNSUPPORTED = [set(), set(), {"Downcast alphas_cumprod"}, {"ADetailer model", "ADetailer confidence"}, {"ControlNet 0"}]


@pytest.mark.parametrize("index", range(len(INFOTEXTS)))
def test_a1111_infotexts_import_to_the_settings_they_state(index, tmp_path):
    text, expected = INFOTEXTS[index]
    imported = importer.to_job(infotext.parse_generation_parameters(text), "img", importer.HashIndex(None))
    job = imported.job
    for key, value in expected.items():
        if key == "rng":
            assert job.get("rng", "GPU") == value
        elif key == "eta_noise_seed_delta":
            assert job.get(key, 0) == value
        else:
            assert job[key] == value, key
    assert set(imported.unsupported) == UNSUPPORTED[index]
    assert "\n" not in job["prompts"][0] and job["prompts"][0] == text.split("\n")[0]
    # the written job parses, and its cells hold what A1111 would render
    # planned on the builtin model, without LoRA files: tags out
    job = {
        **job,
        "model": "builtin:tiny",
        "output": str(tmp_path / "out"),
        "prompts": [re.sub(r"<lora:[^>]*>", "", p) for p in job["prompts"]],
    }
    written = imported.yaml().replace(yaml.safe_dump({"model": imported.job["model"]}).strip(), "model: builtin:tiny")
    parsed = parse_job(written.encode())
    assert parsed.cell_count() == 1
    cell = next(prepare(parse_job(yaml.safe_dump(job).encode()), cuda=False).cells())
    from gridrender.scheduler import samplers

    assert (cell.sampler, cell.schedule) == samplers.canonical(expected["sampler"], expected["schedule"])
    for line in UNSUPPORTED[index]:
        assert line in imported.yaml()  # listed in the job file, not dropped


def _import(text: str) -> importer.Imported:
    return importer.to_job(infotext.parse_generation_parameters(text), "img", importer.HashIndex(None))


def _cell(job: dict, tmp_path):
    job = {**job, "model": "builtin:tiny", "output": str(tmp_path / "out")}
    (cell,) = list(prepare(parse_job(yaml.safe_dump(job).encode()), cuda=False).cells())
    return cell


LINE = "Steps: 20, CFG scale: 7, Seed: 5, Size: 512x512, Model: builtin:tiny"


def test_a_hires_sampler_without_its_schedule_type_runs_as_a1111_pastes_it(tmp_path):
    """sd_samplers.get_hr_sampler_and_scheduler: no "Hires schedule type" is "Use same scheduler", and the
    pasted setting is Automatic where the schedule is the first sampler's own (get_sampler_and_scheduler,
    convert_automatic): the hires pass runs the hires sampler's own schedule (get_sigmas: Automatic)."""
    text = (
        f"a cat\n{LINE}, Sampler: DPM++ 2M, Schedule type: Karras, Denoising strength: 0.5, "
        "Hires upscale: 2, Hires upscaler: Latent, Hires sampler: Euler, Version: v1.10.1"
    )
    cell = _cell(_import(text).job, tmp_path)
    assert (cell.sampler, cell.schedule) == ("DPM++ 2M", "Karras")
    assert (cell.hires.sampler, cell.hires.schedule) == ("Euler", "Uniform")
    # a schedule that is not the first sampler's own is the hires pass's too
    text = text.replace("Schedule type: Karras", "Schedule type: Exponential")
    cell = _cell(_import(text).job, tmp_path)
    assert (cell.hires.sampler, cell.hires.schedule) == ("Euler", "Exponential")
    # Euler a's own schedule is Uniform (no 'scheduler' option): the setting stays, DPM++ 2M runs it
    text = text.replace("Sampler: DPM++ 2M, Schedule type: Exponential", "Sampler: Euler a, Schedule type: Uniform")
    cell = _cell(_import(text.replace("Hires sampler: Euler", "Hires sampler: DPM++ 2M")).job, tmp_path)
    assert (cell.hires.sampler, cell.hires.schedule) == ("DPM++ 2M", "Uniform")


def test_a_gridrender_png_with_a_hires_sampler_on_the_same_schedule_imports_to_its_cell(tiny, tmp_path):
    from gridrender.scheduler.grid import make_cell
    from gridrender.scheduler.hires import Hires
    from gridrender.scheduler.infotext import parameters

    # DPM++ 2M with an explicit Karras: the hires Euler runs Karras too, which the text must say
    cell = make_cell(
        tiny,
        prompt="a cat",
        negative_prompt="",
        clip_skip=1,
        seed=5,
        sampler="DPM++ 2M",
        schedule="Karras",
        steps=20,
        guidance=7.0,
        width=64,
        height=64,
        dtype="float32",
        hires=Hires("Latent", 0.5, sampler="Euler"),
    )
    assert (cell.hires.sampler, cell.hires.schedule) == ("Euler", "Karras")
    text = parameters(cell)
    assert "Hires schedule type: Karras" in text
    job = {**_import(text).job, "dtype": "float32"}
    assert _cell(job, tmp_path).id == cell.id


def test_the_hires_prompt_is_written_as_rendered(tiny):
    from gridrender.scheduler.grid import make_cell
    from gridrender.scheduler.hires import Hires
    from gridrender.scheduler.infotext import parameters

    def text(hires_prompt: str) -> str:
        return parameters(
            make_cell(
                tiny,
                prompt="a dog",
                prompt_sr=("dog", "cat"),
                negative_prompt="",
                clip_skip=1,
                seed=1,
                sampler="Euler",
                steps=4,
                guidance=7.0,
                width=64,
                height=64,
                dtype="float32",
                hires=Hires("Latent", 0.5, prompt=hires_prompt),
            )
        )

    # the S/R cell renders "a cat" in both passes: no Hires prompt (create_infotext's get_hr_prompt)
    assert "Hires prompt" not in text("a dog")
    assert "Hires prompt: a cat, sharp" not in text("a dog, sharp") and 'Hires prompt: "a cat, sharp"' in text("a dog, sharp")


def test_fields_that_change_the_image_are_listed_not_taken_for_defaults():
    # Pad conds: written only when A1111 padded the shorter conditioning (Sampler.add_infotext)
    assert "Pad conds" in _import(f"a cat\n{LINE}, Sampler: Euler a, Pad conds: True").unsupported
    # a version A1111 1.10 renders with float16 alphas_cumprod (infotext_versions.backcompat), and one it does not
    for version, downcast in (
        ("v1.6.0", True),
        ("v1.7.0-133-gde03882d", True),
        ("v1.7.0-225-g1a2b3c4", False),
        ("v1.8.0", False),
        ("f0.0.17v1.8.0rc-latest-276-g29be1da7", False),
    ):
        imported = _import(f"a cat\n{LINE}, Sampler: Euler a, Version: {version}")
        assert ("Downcast alphas_cumprod" in imported.unsupported) == downcast, version


def test_sampler_names_and_schedules_as_a1111_reads_them():
    # the name's suffix wins over Schedule type (get_sampler_and_scheduler)
    job = _import(f"a cat\n{LINE}, Sampler: DPM++ 2M Karras, Schedule type: Exponential, Version: v1.10.1").job
    assert (job["sampler"], job["schedule"]) == ("DPM++ 2M", "Karras")
    # no Schedule type and no Version: A1111 before 1.9 wrote it so (1.9+ always writes Schedule type)
    job = _import(f"a cat\n{LINE}, Sampler: DPM++ 2M").job
    assert (job["sampler"], job["schedule"]) == ("DPM++ 2M", "Uniform")
    job = _import(f"a cat\n{LINE}, Sampler: DPM++ 2M, Schedule type: Automatic, Version: v1.9.0").job
    assert (job["sampler"], job["schedule"]) == ("DPM++ 2M", "Automatic")


def test_the_model_is_found_by_its_hash_in_the_model_dir(tmp_path):
    folder = tmp_path / "models"
    folder.mkdir()
    weights = folder / "sub" / "anything-v5.safetensors"
    weights.parent.mkdir()
    weights.write_bytes(b"\0" * (0x110000 + 17))
    from gridrender.scheduler.weightfiles import file_sha256

    index = importer.HashIndex(str(folder))
    assert index.find(file_sha256(weights)[:10]) == weights
    assert index.find(importer._legacy_hash(weights)) == weights  # A1111's old 8-digit hash
    assert index.find("ffffffffff") is None
    params = infotext.parse_generation_parameters(INFOTEXTS[0][0].replace("6ce0161689", file_sha256(weights)[:10]))
    assert importer.to_job(params, "img", index).job["model"] == str(weights)


def test_exif_user_comment_of_a_jpeg_is_read():
    text = INFOTEXTS[1][0]
    image = Image.new("RGB", (8, 8))
    exif = Image.Exif()
    exif.get_ifd(0x8769)[0x9286] = b"UNICODE\0" + text.encode("utf-16-be")
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", exif=exif)
    assert infotext.read_parameters(buffer.getvalue()) == text


@pytest.fixture(scope="module")
def rendered(tmp_path_factory, private_cache):  # noqa: ARG001  (its own HF cache, for its side effect)
    """A job with what the infotext must carry: NV noise, ENSD, Prompt S/R, a hires fix with its own sampler."""
    folder = tmp_path_factory.mktemp("roundtrip")
    job = {
        "name": "roundtrip",
        "model": "builtin:tiny",
        "prompts": ["a dog in a field, golden hour"],
        "prompt_sr": ["dog", "cat"],
        "negative_prompt": "lowres",
        "clip_skip": 2,
        "seeds": [3],
        "sampler": "Euler a",
        "rng": "NV",
        "eta_noise_seed_delta": 31337,
        "steps": 2,
        "width": 64,
        "height": 64,
        "hires": {"scale": 1.5, "denoise": 0.5, "steps": 2, "sampler": "DPM++ 2M"},
        "batch_size": 2,
        "output": str(folder / "out"),
    }
    path = folder / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    result = cli("run", str(path))
    assert result.returncode == 0, result.stderr
    return folder, LocalStore(folder / "out")


def test_a_png_gridrender_wrote_imports_to_a_job_that_renders_the_same_cell(rendered, tmp_path):
    folder, store = rendered
    lines = [line for line in read_manifest(store, "roundtrip")]
    assert len(lines) == 2
    for line in lines:
        png = folder / "out" / line["image"]
        out = tmp_path / f"{line['cell_id']}.yaml"
        result = cli("import", str(png), "-o", str(out))
        assert result.returncode == 0, result.stderr
        job = yaml.safe_load(out.read_text())
        assert job["rng"] == "NV" and job["eta_noise_seed_delta"] == 31337 and job["hires"]["sampler"].startswith("DPM++ 2M")
        job["output"] = str(tmp_path / "out")
        (cell,) = list(prepare(parse_job(yaml.safe_dump(job).encode()), cuda=False).cells())
        assert cell.id == line["cell_id"]
        assert Image.open(png).size == (96, 96)


def test_records_manifests_and_exports_carry_the_prompt_as_rendered(rendered, tmp_path):
    folder, store = rendered
    lines = list(read_manifest(store, "roundtrip"))
    rendered_prompts = {line["rendered_prompt"] for line in lines}
    assert rendered_prompts == {"a dog in a field, golden hour", "a cat in a field, golden hour"}
    assert {line["prompt"] for line in lines} == {"a dog in a field, golden hour"}  # as written
    for line in lines:
        record = json.loads((folder / "out" / line["record"]).read_text())
        assert record["rendered_prompt"] == line["rendered_prompt"] and record["params"]["prompt"] == line["prompt"]
    result = cli("export", "roundtrip", "--format", "imagefolder", str(tmp_path / "ds"), "--output", str(folder / "out"))
    assert result.returncode == 0, result.stderr
    rows = [json.loads(x) for x in (tmp_path / "ds" / "metadata.jsonl").read_text().splitlines()]
    assert {row["caption"] for row in rows} == rendered_prompts


def test_an_image_without_parameters_is_bad_input(tmp_path):
    path = tmp_path / "plain.png"
    Image.new("RGB", (4, 4)).save(path)
    result = cli("import", str(path))
    assert result.returncode == 2 and "no generation parameters" in result.stderr


def test_import_prints_the_job_and_warns_about_what_it_cannot_render(tmp_path):
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", INFOTEXTS[4][0])
    path = Path(tmp_path / "forge.png")
    Image.new("RGB", (4, 4)).save(path, pnginfo=info)
    result = cli("import", str(path))
    assert result.returncode == 0, result.stderr
    assert "ControlNet 0" in result.stderr and "hires:" in result.stdout


def test_a_hires_cell_reproduces_from_its_record(rendered):
    folder, store = rendered
    line = next(iter(read_manifest(store, "roundtrip")))
    result = cli("reproduce", str(folder / "out" / line["record"]))
    assert result.returncode == 0, result.stdout + result.stderr
