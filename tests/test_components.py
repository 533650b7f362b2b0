"""Sweeps people compare: checkpoints, LoRAs and their weights, VAEs, embeddings, Prompt S/R, wildcards."""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from gridrender.scheduler.finalize import read_manifest
from gridrender.scheduler.grid import make_cell
from gridrender.scheduler.storage import LocalStore
from tests.conftest import ROOT, cli
from tests.support.components import write_embedding, write_lora, write_model, write_vae
from tests.test_outputs import a1111_parse

BASE = dict(
    prompts=["a cow standing in a field"],
    negative_prompt="lowres",
    clip_skip=1,
    seeds=[1],
    steps=3,
    sampler="Euler a",
    dtype="float32",
    width=64,
    height=64,
    batch_size=4,
)


@pytest.fixture(scope="module")
def kit(tmp_path_factory, tiny_folder):
    """A second model, two LoRAs (PEFT and kohya keys), a second VAE and an embedding, on disk."""
    root = tmp_path_factory.mktemp("kit")
    return {
        "model2": write_model(root / "models" / "tiny-alt", tiny_folder, seed=3),
        "lora": write_lora(root / "loras" / "detail.safetensors", tiny_folder, seed=1),
        "kohya": write_lora(root / "loras" / "style.safetensors", tiny_folder, seed=2, kohya=True),
        "vae": write_vae(root / "vaes" / "sharp-vae", tiny_folder, seed=4),
        "embedding": write_embedding(root / "embeddings" / "grdtok.safetensors", width=32, vectors=2, seed=5),
        "root": root,
    }


def pixels(image) -> np.ndarray:
    return np.asarray(image, dtype=int)


def test_a_job_of_model_x_lora_weight_x_vae_x_prompt_sr_renders_every_cell(kit, job_file, tmp_path):
    path = job_file(
        **{
            **BASE,
            "model": ["builtin:tiny", str(kit["model2"])],
            "vae": [None, str(kit["vae"])],
            "loras": [{"path": str(kit["lora"]), "weight": [0.0, 0.6]}],
            "prompt_sr": ["cow", "horse"],
            "sheet": {"rows": "loras", "cols": "prompt_sr", "pages": "model"},
        }
    )
    validated = cli("validate", str(path))
    assert validated.returncode == 0, validated.stderr
    assert "16 cells" in validated.stdout
    assert "vae varies" in validated.stderr and "loras varies" not in validated.stderr  # vae is not laid out: paged
    result = cli("run", str(path))
    assert result.returncode == 0, result.stderr
    store = LocalStore(tmp_path / "out")
    lines = list(read_manifest(store, "t"))
    assert len(lines) == 16 and {line["status"] for line in lines} == {"done"}
    assert {line["model"] for line in lines} == {"builtin:tiny", str(kit["model2"])}
    assert {line["prompt_sr"][1] for line in lines} == {"cow", "horse"}
    record = json.loads((tmp_path / "out" / lines[-1]["record"]).read_text())
    assert record["texts"]["prompt"] == "a horse standing in a field" and record["params"]["prompt"] == BASE["prompts"][0]
    assert record["vae"]["sha256"] and record["loras"][0]["weight"] == 0.6 and len(record["loras"][0]["sha256"]) == 64
    sheets = sorted((tmp_path / "out" / "jobs" / "t" / "sheets").iterdir())
    assert len(sheets) == 4  # pages: 2 models x 2 VAEs (an undeclared axis splits pages)
    # reproduce from the record alone, components found again and checked: the second model
    # with its VAE and the LoRA at 0.6, and the builtin without either
    for line in (lines[-1], lines[0]):
        again = cli("reproduce", str(tmp_path / "out" / line["record"]))
        assert again.returncode == 0 and "0/255" in again.stdout, again.stdout + again.stderr


def test_lora_weight_zero_equals_no_lora_and_a_tag_equals_the_loras_key(renderer, tiny, kit, monkeypatch):
    from gridrender.scheduler.components import LoraUse, resolve_lora
    from gridrender.scheduler.settings import Settings

    lora = resolve_lora(str(kit["lora"]), tiny, Settings())
    base = dict(
        prompt="a cow standing in a field",
        negative_prompt="lowres",
        clip_skip=1,
        seed=3,
        sampler="Euler a",
        steps=3,
        guidance=7.0,
        width=64,
        height=64,
        dtype="float32",
    )
    plain = renderer.render(tiny, [make_cell(tiny, **base)])[0]
    zero = renderer.render(tiny, [make_cell(tiny, **base, loras=(LoraUse(lora, 0.0, 0.0, "detail"),))])[0]
    strong = renderer.render(tiny, [make_cell(tiny, **base, loras=(LoraUse(lora, 0.8, 0.8, "detail"),))])[0]
    assert np.abs(pixels(plain.image) - pixels(zero.image)).max() == 0  # nothing merged: the base weights
    assert np.abs(pixels(plain.image) - pixels(strong.image)).max() > 10  # the LoRA does something
    # the same LoRA named by an A1111 tag in the prompt is the same cell, and the same image
    monkeypatch.setenv("GRIDRENDER_LORA_DIR", str(kit["lora"].parent))
    from gridrender.scheduler.jobfile import parse_job
    from gridrender.scheduler.plan import prepare

    job = parse_job(
        yaml.safe_dump(
            {
                "name": "tag",
                "model": "builtin:tiny",
                **{k: v for k, v in BASE.items() if k != "prompts"},
                "prompts": ["a cow standing in a field <lora:detail:0.8>"],
                "seeds": [3],
            }
        )
    )
    (tagged,) = list(prepare(job, cuda=False).cells())
    assert tagged.id == make_cell(tiny, **base, loras=(LoraUse(lora, 0.8, 0.8, "detail"),)).id
    assert tagged.text == "a cow standing in a field"
    assert np.abs(pixels(renderer.render(tiny, [tagged])[0].image) - pixels(strong.image)).max() == 0


RENDER_SWITCHING = """
import sys, json
import numpy as np
from gridrender.scheduler.components import LoraUse, resolve_lora
from gridrender.scheduler.grid import make_cell
from gridrender.scheduler.models import resolve
from gridrender.scheduler.settings import Settings
from gridrender.workers.render import Renderer

model, settings = resolve("builtin:tiny"), Settings()
loras = {name: resolve_lora(path, model, settings) for name, path in json.loads(sys.argv[1]).items()}
order, out = json.loads(sys.argv[2]), sys.argv[3]
renderer = Renderer()
images = {}
for name, weight in order:
    chosen = (LoraUse(loras[name], weight, weight, name),) if name else ()
    cell = make_cell(model, prompt="a cow standing in a field", negative_prompt="lowres", clip_skip=1, seed=7,
                     sampler="DPM++ 2M Karras", steps=3, guidance=7.0, width=64, height=64, dtype="float32", loras=chosen)
    images[f"{name}:{weight}"] = np.asarray(renderer.render(model, [cell])[0].image)
np.savez(out, **images)
print("loads", renderer.cache.loads)
"""


@pytest.mark.usefixtures("private_cache")
def test_switching_loras_in_one_process_matches_fresh_processes(kit, tmp_path):
    loras = json.dumps({"detail": str(kit["lora"]), "style": str(kit["kohya"])})

    def run(order, out):
        result = subprocess.run(
            [sys.executable, "-c", RENDER_SWITCHING, loras, json.dumps(order), str(out)],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        assert result.returncode == 0, result.stderr
        return np.load(out), result.stdout

    switching, log = run(
        [["detail", 0.8], ["style", 1.0], ["", 0], ["detail", 0.4], ["style", 1.0], ["detail", 0.8]], tmp_path / "switching.npz"
    )
    assert "loads 1" in log  # one model load for every switch
    for name, weight in (["style", 1.0], ["detail", 0.4]):  # kohya keys; a weight seen after two switches
        fresh, _ = run([[name, weight]], tmp_path / f"fresh-{name}-{weight}.npz")
        key = f"{name}:{weight}"
        assert np.abs(switching[key].astype(int) - fresh[key].astype(int)).max() <= 1, key


def test_embeddings_trigger_by_their_file_stem_and_join_the_id_only_where_used(kit, job_file, tmp_path):
    path = job_file(
        **{**BASE, "prompts": ["a cow in grdtok style", "a cow in plain style"], "embeddings": [str(kit["embedding"].parent)]}
    )
    result = cli("run", str(path))
    assert result.returncode == 0, result.stderr
    lines = list(read_manifest(LocalStore(tmp_path / "out"), "t"))
    used = {line["prompt"]: line.get("embeddings", []) for line in lines}
    assert used == {"a cow in grdtok style": ["grdtok"], "a cow in plain style": []}
    record = json.loads((tmp_path / "out" / lines[0]["record"]).read_text())
    assert record["embeddings"][0]["name"] == "grdtok" and record["embeddings"][0]["vectors"] == 2
    text = Image.open(tmp_path / "out" / lines[0]["image"]).text["parameters"]
    assert re.search(r"TI hashes: \"grdtok: [0-9a-f]{12}\"", text)
    # the same prompt without the embedding is another cell with another image
    without = cli("run", str(job_file("plain.yaml", **{**BASE, "prompts": ["a cow in grdtok style"]})))
    assert without.returncode == 0
    other = next(iter(read_manifest(LocalStore(tmp_path / "out"), "t")))
    assert other["cell_id"] != lines[0]["cell_id"]
    a = pixels(Image.open(tmp_path / "out" / lines[0]["image"]).convert("RGB"))
    b = pixels(Image.open(tmp_path / "out" / other["image"]).convert("RGB"))
    assert np.abs(a - b).max() > 0


def test_infotext_carries_model_vae_lora_and_ti_fields_civitai_reads(kit, job_file, tmp_path):
    path = job_file(
        **{
            **BASE,
            "prompts": ["a cow, grdtok"],
            "vae": str(kit["vae"]),
            "embeddings": [str(kit["embedding"])],
            "loras": [{"path": str(kit["lora"]), "weight": 0.5}],
        }
    )
    assert cli("run", str(path)).returncode == 0
    (line,) = list(read_manifest(LocalStore(tmp_path / "out"), "t"))
    parsed = a1111_parse(Image.open(tmp_path / "out" / line["image"]).text["parameters"])
    assert parsed["Prompt"] == "a cow, grdtok <lora:detail:0.5>"
    assert parsed["Model"] == "builtin:tiny" and re.fullmatch(r"[0-9a-f]{10}", parsed["Model hash"])
    assert parsed["VAE"] == "sharp-vae" and re.fullmatch(r"[0-9a-f]{10}", parsed["VAE hash"])
    data = kit["lora"].read_bytes()  # A1111's hash (hashes.py addnet_hash_safetensors): the data after the header
    addnet = hashlib.sha256(data[8 + int.from_bytes(data[:8], "little") :]).hexdigest()
    assert parsed["Lora hashes"] == f"detail: {addnet[:12]}"
    assert re.fullmatch(r"grdtok: [0-9a-f]{12}", parsed["TI hashes"])


def test_a_wildcard_job_resubmitted_expands_to_the_same_cells(job_file, tmp_path, monkeypatch):
    from gridrender.scheduler.plan import prepare

    wildcards = tmp_path / "wildcards"
    wildcards.mkdir()
    (wildcards / "colors.txt").write_text("red\nblue\ngreen\n")
    monkeypatch.setenv("GRIDRENDER_WILDCARD_DIR", str(wildcards))
    combinatorial = prepare(job_file(**{**BASE, "prompts": ["a {small|big} __colors__ cow"]}), cuda=False)
    assert sorted(combinatorial.job.values_of("prompts")) == sorted(
        f"a {s} {c} cow" for s in ("small", "big") for c in ("red", "blue", "green")
    )
    path = job_file(**{**BASE, "prompts": ["a {small|big} __colors__ cow"], "prompt_samples": 4, "seeds": [1, 2]})
    first = [c.id for c in prepare(path, cuda=False).cells()]
    again = [c.id for c in prepare(path, cuda=False).cells()]
    assert first == again and len(first) == 8
    assert cli("run", str(path), env={"GRIDRENDER_WILDCARD_DIR": str(wildcards)}).returncode == 0
    stored = yaml.safe_load((tmp_path / "out" / "jobs" / "t" / "job.yaml").read_text())
    assert stored["prompt_samples"]["count"] == 4 and isinstance(stored["prompt_samples"]["seed"], int)
    from_stored = prepare(tmp_path / "out" / "jobs" / "t" / "job.yaml", cuda=False)
    assert [c.id for c in from_stored.cells()] == first


@pytest.mark.parametrize(
    "overrides, key",
    [
        ({"loras": [{"path": "no/such/lora.safetensors"}]}, "loras.0.path"),
        ({"loras": [{"path": "LORA", "weight": "strong"}]}, "loras.0.weight"),
        ({"loras": [{"path": "WRONG_LORA"}]}, "loras.0.path"),
        ({"vae": "no/such/vae"}, "vae"),
        ({"vae": "LORA"}, "vae"),
        ({"embeddings": ["WRONG_EMBEDDING"]}, "embeddings"),
        ({"prompt_sr": ["zebra", "cat"]}, "prompt_sr"),
        ({"prompts": ["a cow <lora:detail:lots>"]}, "prompts"),
        ({"model": ["builtin:tiny", "no/such/model"]}, "model.1"),
    ],
)
def test_bad_components_are_refused_naming_the_key(overrides, key, kit, job_file, tmp_path):
    wrong = tmp_path / "wrong"
    replace = {
        "LORA": str(kit["lora"]),
        "WRONG_LORA": str(_wide_lora(wrong)),
        "WRONG_EMBEDDING": str(write_embedding(wrong / "wide.safetensors", width=48, vectors=1, seed=1)),
    }
    text = yaml.safe_dump({**BASE, **overrides})
    for placeholder, value in replace.items():
        text = text.replace(placeholder, value)
    path = job_file(**yaml.safe_load(text))
    for command in ("validate", "run"):
        result = cli(command, str(path), env={"GRIDRENDER_LORA_DIR": str(kit["lora"].parent)})
        assert result.returncode == 2, (command, result.stdout, result.stderr)
        assert key in result.stderr, (key, result.stderr)
    assert not (tmp_path / "out").exists()


def _wide_lora(folder: Path) -> Path:
    """A LoRA trained for a model whose layers are wider than builtin:tiny's."""
    import torch
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "wide-lora.safetensors"
    save_file(
        {
            "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight": torch.zeros(4, 320),
            "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_B.weight": torch.zeros(320, 4),
        },
        str(path),
    )
    return path


def test_model_lora_weight_vae_and_prompt_sr_axes_through_workers(kit, cluster, job_file):
    cluster.worker()
    path = job_file(
        output=cluster.output,
        **{
            **BASE,
            "model": ["builtin:tiny", str(kit["model2"])],
            "loras": [{"path": str(kit["kohya"]), "weight": [0.5, 1.0]}],
            "prompt_sr": ["cow", "horse"],
            "vae": [None, str(kit["vae"])],
        },
    )
    result = cluster.cli("submit", str(path), "--wait")
    assert result.returncode == 0, result.stderr
    assert "16 cells" in result.stdout
    assert len([k for k in cluster.keys() if k.endswith(".json")]) == 16  # noqa: SIM118  (the cluster's method)
    assert cluster.workers[0].text().count("model load #") == 2  # one per model; LoRA and VAE switches load none


def test_a_single_file_vae_decodes_as_its_folder_does(renderer, tiny, kit, tmp_path):
    from gridrender.scheduler.components import resolve_vae
    from gridrender.scheduler.settings import Settings
    from tests.support.singlefile import write_single_file_vae

    folder = resolve_vae(str(kit["vae"]), tiny, Settings())
    single = resolve_vae(str(write_single_file_vae(kit["vae"], tmp_path / "sharp-vae.safetensors")), tiny, Settings())
    assert single.sha256 != folder.sha256
    base = dict(
        prompt="a cow",
        negative_prompt="",
        clip_skip=1,
        seed=2,
        sampler="Euler",
        steps=3,
        guidance=7.0,
        width=64,
        height=64,
        dtype="float32",
    )
    own, a, b = (renderer.render(tiny, [make_cell(tiny, **base, vae=v)])[0] for v in (None, folder, single))
    assert np.abs(pixels(a.image) - pixels(b.image)).max() == 0
    assert np.abs(pixels(a.image) - pixels(own.image)).max() > 10  # another VAE, another image
