"""`gridrender run`: the whole job in one process, with the DESIGN.md layout."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml
from PIL import Image

from tests.conftest import ROOT, cli

RECORD_KEYS = {
    "cell_id",
    "params",
    "model",
    "clip_skip",
    "clip_layer",
    "clip_layers",
    "versions",
    "device",
    "timings",
    "image_sha256",
    "sampler",
}
PARAM_KEYS = {
    "model",
    "prompt",
    "negative_prompt",
    "clip_skip",
    "seed",
    "sampler",
    "schedule",
    "steps",
    "guidance",
    "width",
    "height",
    "dtype",
    "rng",
}


def snapshot(root: Path) -> dict[str, int]:
    return {p.relative_to(root).as_posix(): p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}


def test_quickstart_from_the_readme(tmp_path):
    result = cli("run", str(ROOT / "examples" / "quickstart.yaml"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    out = tmp_path / "renders"
    job = yaml.safe_load((ROOT / "examples" / "quickstart.yaml").read_text())
    manifest = [json.loads(line) for line in (out / "jobs" / job["name"] / "manifest.jsonl").read_text().splitlines()]
    assert len(manifest) == len(job["prompts"]) * len(job["clip_skip"]) * len(job["seeds"])
    assert all(line["status"] == "done" for line in manifest)
    assert len(list((out / "cells").glob("*.png"))) == len(manifest)


def test_run_writes_cells_records_job_and_manifest(job_file, tmp_path):
    path = job_file(seeds=[1, 2], clip_skip=[1, 2], prompts=["a cow, standing", "a dog"])
    result = cli("run", str(path))
    assert result.returncode == 0, result.stderr
    out = tmp_path / "out"
    manifest = [json.loads(line) for line in (out / "jobs" / "t" / "manifest.jsonl").read_text().splitlines()]
    assert len(manifest) == 8 and {m["status"] for m in manifest} == {"done"}
    assert len({m["cell_id"] for m in manifest}) == 8

    normalized = yaml.safe_load((out / "jobs" / "t" / "job.yaml").read_text())
    assert normalized["dtype"] == "float32" and normalized["seeds"] == [1, 2]

    for line in manifest:
        record = json.loads((out / line["record"]).read_text())
        assert record.keys() >= RECORD_KEYS
        assert set(record["params"]) == PARAM_KEYS
        assert record["cell_id"] == line["cell_id"]
        assert record["clip_layers"] == 12 and record["clip_layer"] == 12 - record["clip_skip"] + 1
        assert record["params"]["clip_skip"] == record["clip_skip"] == line["clip_skip"]
        assert record["sampler"]["class"] == "k-diffusion:sample_euler_ancestral"
        assert record["sampler"]["sigmas"][0] > 14.6 and record["sampler"]["sigmas"][-1] == 0  # A1111 starts at t=999
        assert record["generator"]["device"] == "cpu"
        png = (out / line["image"]).read_bytes()
        import hashlib

        assert record["image_sha256"] == hashlib.sha256(png).hexdigest()
        text = Image.open(out / line["image"]).text["parameters"]
        prompt_line, negative_line, params_line = text.split("\n")
        assert prompt_line == line["prompt"]
        assert negative_line == "Negative prompt: lowres, blurry"
        assert params_line.startswith(
            f"Steps: 3, Sampler: Euler a, Schedule type: Uniform, CFG scale: 7, Seed: {line['seed']}, Size: 64x64, Model hash: "
        )
        assert params_line.endswith(f"Clip skip: {line['clip_skip']}")


def test_running_again_renders_nothing_and_adding_seeds_renders_only_them(job_file, tmp_path):
    path = job_file()
    assert cli("run", str(path)).returncode == 0
    cells = tmp_path / "out" / "cells"
    before = snapshot(cells)
    again = cli("run", str(path))
    assert again.returncode == 0 and "nothing to render" in again.stdout
    assert snapshot(cells) == before

    more = cli("run", str(job_file(seeds=[1, 2, 3])))
    assert more.returncode == 0, more.stderr
    assert "rendering 2 of 6 cells" in more.stdout
    after = snapshot(cells)
    assert {k: v for k, v in after.items() if k in before} == before  # nothing rewritten
    assert len(after) == len(before) + 4


def test_ctrl_c_leaves_no_half_written_file(job_file, tmp_path):
    path = job_file(seeds={"start": 0, "count": 60}, clip_skip=1, batch_size=1)
    proc = subprocess.Popen(
        [sys.executable, "-m", "gridrender", "run", str(path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    cells = tmp_path / "out" / "cells"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and len(list(cells.glob("*.json"))) < 5:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert "interrupted" in stderr

    leftovers = [p.name for p in cells.iterdir() if p.name.startswith(".")]
    assert leftovers == []
    for record in cells.glob("*.json"):
        data = json.loads(record.read_text())  # complete JSON
        Image.open(cells / f"{data['cell_id']}.png").load()  # complete PNG
    stored = len(list(cells.glob("*.json")))
    assert 5 <= stored < 60

    result = cli("run", str(path))
    assert result.returncode == 0, result.stderr
    assert f"rendering {60 - stored} of 60" in result.stdout
    assert len(list(cells.glob("*.json"))) == 60


def test_status_and_finalize_by_name(job_file, tmp_path):
    path = job_file()
    assert cli("run", str(path)).returncode == 0
    status = cli("status", "t", "--output", str(tmp_path / "out"))
    assert status.returncode == 0 and "4/4 done" in status.stdout
    watched = cli("status", str(path), "--watch")  # a finished job: one line, no waiting for a change
    assert watched.returncode == 0 and watched.stdout.count("4/4 done") == 1, watched.stdout + watched.stderr
    final = cli("finalize", str(path))
    assert final.returncode == 0 and "4/4" in final.stdout
    missing = cli("status", "nope", "--output", str(tmp_path / "out"))
    assert missing.returncode == 2


# An emphasis weight that overflows float32 makes the cell's conditioning NaN (as A1111's "Original"
# emphasis does: the row's mean restored by dividing by an infinite mean).
OVERFLOWING = "(a cow:1" + "0" * 38 + ")"


def test_a_nan_cell_fails_alone_and_is_never_stored(job_file, tmp_path):
    """A1111 stops with "A tensor with all NaNs was produced"; here the cell fails with that reason, nothing
    is stored under its id, and the other cells of its batch (first pass and hires pass) land."""
    path = job_file(
        prompts=["a cow", OVERFLOWING],
        clip_skip=1,
        seeds=[1],
        sampler="Euler",
        hires={"scale": 2, "upscaler": "Latent", "steps": 2, "denoise": 0.5, "prompt": ["a cow", OVERFLOWING]},
    )
    result = cli("run", str(path))
    assert result.returncode == 1, result.stderr
    failed = [line for line in result.stderr.splitlines() if line.startswith("failed ")]
    assert sum("NaN/inf latents (first pass" in line for line in failed) == 2
    assert sum("NaN/inf latents (hires pass" in line for line in failed) == 1 and len(failed) == 3
    out = tmp_path / "out"
    manifest = [json.loads(line) for line in (out / "jobs" / "t" / "manifest.jsonl").read_text().splitlines()]
    done = [m for m in manifest if m["status"] == "done"]
    assert len(manifest) == 4 and len(done) == 1 and done[0]["prompt"] == "a cow"
    stored = {p.stem for p in (out / "cells").glob("*.png")}
    assert stored == {done[0]["cell_id"]} and {p.stem for p in (out / "cells").glob("*.json")} == stored
    status = cli("status", "t", "--output", str(out))
    assert status.returncode == 1 and "1/4 done, 3 failed" in status.stdout and "NaN/inf" in status.stderr
