"""Sheets, gallery, dataset export, reproduce and A1111-readable infotext."""

from __future__ import annotations

import io
import json
import re
import shutil
from pathlib import Path

import pytest
from PIL import Image

from gridrender.scheduler.finalize import read_manifest
from gridrender.scheduler.sheets import build_sheets
from gridrender.scheduler.storage import LocalStore
from tests.conftest import ROOT, cli

ARTIFACTS = ROOT / "test-artifacts"


@pytest.fixture(scope="module")
def rendered_job(tmp_path_factory, private_cache):  # noqa: ARG001  (the CLI it runs uses the private cache)
    """A 2 prompts x 2 clip skips x 3 seeds job, run once for the whole module."""
    import yaml

    folder = tmp_path_factory.mktemp("outputs")
    job = {
        "name": "sheet-test",
        "model": "builtin:tiny",
        "prompts": ["a cow, in a field", "a lighthouse at dusk"],
        "negative_prompt": "lowres",
        "clip_skip": [1, 2],
        "seeds": [1, 2, 3],
        "sampler": "DPM++ 2M Karras",
        "steps": 3,
        "guidance": 7.0,
        "width": 64,
        "height": 64,
        "output": str(folder / "out"),
    }
    path = folder / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    result = cli("run", str(path))
    assert result.returncode == 0, result.stderr
    return path, LocalStore(folder / "out")


def a1111_parse(text: str) -> dict:
    """A1111's PNG-info reading (modules/infotext_utils.parse_generation_parameters), as a test oracle."""
    re_param = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
    *lines, last = text.strip().split("\n")
    if len(re_param.findall(last)) < 3:
        lines.append(last)
        last = ""
    prompt, negative, done_with_prompt = "", "", False
    for line in lines:
        if line.startswith("Negative prompt:"):
            done_with_prompt = True
            line = line[16:].strip()  # noqa: PLW2901  (the oracle stays as A1111 wrote it)
        if done_with_prompt:
            negative += ("" if negative == "" else "\n") + line
        else:
            prompt += ("" if prompt == "" else "\n") + line
    result = {"Prompt": prompt, "Negative prompt": negative}
    for key, value in re_param.findall(last):
        result[key] = json.loads(value) if value.startswith('"') else value
    return result


def test_sheets_one_per_prompt_with_placeholders_for_missing_cells(rendered_job, tmp_path):
    _path, store = rendered_job
    sheets_dir = Path(store.root) / "jobs" / "sheet-test" / "sheets"
    names = sorted(p.name for p in sheets_dir.iterdir())
    assert names == ["001-a-cow-in-a-field.png", "002-a-lighthouse-at-dusk.png"]
    full = Image.open(sheets_dir / names[0]).convert("RGB")

    # finalize on a copy with one cell gone: the sheet keeps its shape and shows a placeholder
    copy = tmp_path / "copy"
    shutil.copytree(store.root, copy)
    lines = list(read_manifest(LocalStore(copy), "sheet-test"))
    (copy / "cells" / f"{lines[0]['cell_id']}.json").unlink()
    (copy / "cells" / f"{lines[0]['cell_id']}.png").unlink()
    result = cli("finalize", "sheet-test", "--output", str(copy))
    assert result.returncode == 0 and "11/12" in result.stdout
    partial = Image.open(copy / "jobs" / "sheet-test" / "sheets" / names[0]).convert("RGB")
    assert partial.size == full.size
    assert partial.tobytes() != full.tobytes()
    assert len(list((copy / "cells").glob("*.png"))) == 11  # finalize rendered nothing


def test_sheet_layout_and_pixel_cap(rendered_job):
    _, store = rendered_job
    lines = list(read_manifest(store, "sheet-test"))
    default = build_sheets(store, "sheet-test", lines)
    swapped = build_sheets(store, "sheet-test", lines, {"rows": "seed", "cols": "clip_skip", "pages": "prompt"})
    by_seed = build_sheets(store, "sheet-test", lines, {"rows": "prompt", "cols": "clip_skip", "pages": "seed"})
    assert len(default) == len(swapped) == 2 and len(by_seed) == 3
    size = lambda s: Image.open(io.BytesIO(s.png)).size
    assert size(default[0])[1] < size(swapped[0])[1]  # three rows of seeds are taller than two of skips
    capped = build_sheets(store, "sheet-test", lines, max_pixels=100_000)
    assert len(capped) > 2 and all("part" in s.name for s in capped)
    assert all(size(s)[0] * size(s)[1] <= 100_000 * 1.2 for s in capped)
    assert sum(s.cells for s in capped) == 12


def test_undeclared_varying_axis_is_warned_about(job_file):
    result = cli("validate", str(job_file(negative_prompt=["lowres", "blurry"])))
    assert result.returncode == 0
    assert "warning" in result.stderr and "negative_prompt varies" in result.stderr
    declared = cli(
        "validate",
        str(job_file(negative_prompt=["lowres", "blurry"], sheet={"rows": "negative_prompt", "cols": "seed", "pages": "prompt"})),
    )
    assert "negative_prompt varies" not in declared.stderr
    assert "clip_skip varies" in declared.stderr  # now clip skip is the undeclared one
    bad = cli("validate", str(job_file(sheet={"rows": "colour"})))
    assert bad.returncode == 2 and "sheet.rows" in bad.stderr


def browser_executable() -> str | None:
    """A system chromium if there is one; else Playwright's own (None), installed on first use.

    Offline and without either, there is no browser to test in: skip, saying why.
    """
    import subprocess
    import sys

    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found:
        return found
    install = subprocess.run(
        [sys.executable, "-m", "playwright", "install", "chromium"], capture_output=True, text=True, timeout=600, check=False
    )
    if install.returncode != 0:
        pytest.skip(
            "no chromium on this machine and Playwright could not download its own: "
            + (install.stderr.strip().splitlines() or ["?"])[-1]
        )
    return None


def test_gallery_loads_in_a_real_browser(rendered_job):
    playwright = pytest.importorskip("playwright.sync_api")
    chromium = browser_executable()
    _, store = rendered_job
    page_path = Path(store.root) / "jobs" / "sheet-test" / "index.html"
    ARTIFACTS.mkdir(exist_ok=True)
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=chromium,
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
            ],
        )
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 5000})
            errors, requests = [], []
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.on("request", lambda r: requests.append(r.url))
            page.goto(page_path.as_uri())
            page.wait_for_function("Array.from(document.images).every(i => i.complete)", timeout=15000)
            loaded = page.evaluate("Array.from(document.images).filter(i => i.naturalWidth > 0).length")
            assert loaded == 12 + 2  # every cell and both sheets
            assert errors == []
            assert all(url.startswith("file://") for url in requests)  # no network
            page.select_option("select[data-axis=clip_skip]", "2")
            assert page.text_content("#shown") == "6 of 12 cells"
            page.click("#cells figure:not([hidden])")
            assert "clip_skip: 2" in page.text_content("#detail")
            page.screenshot(path=str(ARTIFACTS / "gallery.png"), full_page=True)
        finally:
            browser.close()


def test_export_round_trips_through_datasets_and_webdataset(rendered_job, tmp_path):
    path, store = rendered_job
    assert cli("export", "sheet-test", str(tmp_path / "hf"), "--format", "imagefolder", "--output", store.root).returncode == 0
    import datasets

    ds = datasets.load_dataset("imagefolder", data_dir=str(tmp_path / "hf"), split="train")
    assert ds.num_rows == 12
    assert {"image", "prompt", "seed", "clip_skip", "sampler", "steps", "guidance", "negative_prompt"} <= set(ds.column_names)
    assert sorted(set(ds["clip_skip"])) == [1, 2] and ds[0]["image"].size == (64, 64)

    assert cli("export", str(path), str(tmp_path / "wds"), "--format", "webdataset").returncode == 0
    import webdataset as wds

    shards = sorted(str(p) for p in (tmp_path / "wds").glob("*.tar"))
    samples = list(wds.WebDataset(shards, shardshuffle=False).decode("pil"))
    assert len(samples) == 12
    assert {s["json"]["seed"] for s in samples} == {1, 2, 3}
    assert all(s["png"].size == (64, 64) for s in samples)

    again = cli("export", "sheet-test", str(tmp_path / "hf"), "--format", "imagefolder", "--output", store.root)
    assert again.returncode == 2 and "not empty" in again.stderr


def test_reproduce_from_the_record_alone(rendered_job, tmp_path):
    _, store = rendered_job
    line = list(read_manifest(store, "sheet-test"))[4]
    record = Path(store.root) / line["record"]
    result = cli("reproduce", str(record))
    assert result.returncode == 0, result.stderr
    assert "max pixel difference 0/255" in result.stdout and "PSNR inf" in result.stdout

    # a stored image that was changed no longer reproduces
    copy = tmp_path / "cells"
    copy.mkdir()
    shutil.copy(record, copy / record.name)
    image = Image.open(Path(store.root) / line["image"]).convert("RGB")
    image.putpixel((10, 10), (0, 0, 0) if image.getpixel((10, 10)) != (0, 0, 0) else (255, 255, 255))
    image.save(copy / record.with_suffix(".png").name)
    result = cli("reproduce", str(copy / record.name))
    assert result.returncode == 1 and "DIFFERENT" in result.stdout


def test_png_infotext_reads_back_with_a1111s_parser(rendered_job):
    _, store = rendered_job
    for line in read_manifest(store, "sheet-test"):
        text = Image.open(Path(store.root) / line["image"]).text["parameters"]
        parsed = a1111_parse(text)
        assert parsed["Prompt"] == line["prompt"]
        assert parsed["Negative prompt"] == "lowres"
        assert parsed["Steps"] == "3" and parsed["Sampler"] == "DPM++ 2M Karras" and parsed["CFG scale"] == "7"
        assert parsed["Seed"] == str(line["seed"]) and parsed["Size"] == "64x64"
        assert re.fullmatch(r"[0-9a-f]{10}", parsed["Model hash"])
        assert parsed["Model"] == "builtin:tiny"
        assert parsed["Clip skip"] == str(line["clip_skip"])


def test_no_prompt_can_break_out_of_the_gallerys_script(job_file, tmp_path):
    hostile = "a cow </script><script>window.pwned=1</script><!--"
    assert cli("run", str(job_file(prompts=[hostile], clip_skip=1, seeds=[1]))).returncode == 0
    page = (tmp_path / "out" / "jobs" / "t" / "index.html").read_text()
    data = page.split('<script type="application/json" id="cells-data">', 1)[1].split("</script>", 1)[0]
    assert "<" not in data and json.loads(data)["cells"][0]["prompt"] == hostile
